//! Bad input: a corpus of broken configs (each must be refused by `validate` and `run` with
//! exit code 2 and an error naming the file, the line and the key, creating nothing), and a
//! corpus of hostile file names in the watched tree.

use std::path::Path;
use std::time::Duration;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A valid config, one setting per line, so that each broken variant changes known lines.
fn base(setup: &Setup) -> Vec<String> {
    [
        "[agent]".to_string(),                                  // 1
        format!("journal = \"{}\"", setup.journal().display()), // 2
        "concurrency = 4".into(),                               // 3
        "part_size = \"8MiB\"".into(),                          // 4
        "max_retries = 6".into(),                               // 5
        "".into(),                                              // 6
        "[[source]]".into(),                                    // 7
        "name = \"exports\"".into(),                            // 8
        "type = \"fs\"".into(),                                 // 9
        format!("path = \"{}\"", setup.src().display()),        // 10
        "settle = \"5s\"".into(),                               // 11
        "include = [\"**/*.ndjson\"]".into(),                   // 12
        "after_upload = \"keep\"".into(),                       // 13
        "".into(),                                              // 14
        "[destination]".into(),                                 // 15
        "type = \"s3\"".into(),                                 // 16
        "endpoint = \"http://127.0.0.1:9\"".into(),             // 17
        "region = \"eu-central-1\"".into(),                     // 18
        "bucket = \"exports\"".into(),                          // 19
        "path_style = true".into(),                             // 20
    ]
    .into()
}

enum Edit {
    /// Replace line n (1-based).
    Set(usize, &'static str),
    /// Replace line n with text computed from the setup.
    SetWith(usize, fn(&Setup) -> String),
    /// Append lines at the end.
    Append(&'static str),
    AppendWith(fn(&Setup) -> String),
}

struct Case {
    what: &'static str,
    edits: Vec<Edit>,
    /// The line the error must point at (None: a missing key, reported without a line of its own).
    line: Option<usize>,
    key: &'static str,
}

fn case(what: &'static str, edits: Vec<Edit>, line: Option<usize>, key: &'static str) -> Case {
    Case {
        what,
        edits,
        line,
        key,
    }
}

fn corpus() -> Vec<Case> {
    use Edit::*;
    vec![
        case(
            "syntax: value missing",
            vec![Set(3, "concurrency = ")],
            Some(3),
            "concurrency",
        ),
        case(
            "syntax: unclosed string",
            vec![Set(18, "region = \"eu-central-1")],
            Some(18),
            "region",
        ),
        case(
            "syntax: duplicate key",
            vec![Set(5, "concurrency = 2")],
            Some(5),
            "concurrency",
        ),
        case(
            "unknown key in [agent]",
            vec![Set(3, "concurency = 4")],
            Some(3),
            "agent.concurency",
        ),
        case(
            "unknown key in a source",
            vec![Set(11, "setle = \"5s\"")],
            Some(11),
            "source[0].setle",
        ),
        case(
            "unknown key in [destination]",
            vec![Set(20, "pathstyle = true")],
            Some(20),
            "destination.pathstyle",
        ),
        case(
            "wrong type: concurrency",
            vec![Set(3, "concurrency = \"four\"")],
            Some(3),
            "agent.concurrency",
        ),
        case(
            "impossible: concurrency 0",
            vec![Set(3, "concurrency = 0")],
            Some(3),
            "agent.concurrency",
        ),
        case(
            "impossible: negative retries",
            vec![Set(5, "max_retries = -1")],
            Some(5),
            "agent.max_retries",
        ),
        case(
            "part_size below 5 MiB",
            vec![Set(4, "part_size = \"4MiB\"")],
            Some(4),
            "agent.part_size",
        ),
        case(
            "part_size above 5 GiB",
            vec![Set(4, "part_size = \"6GiB\"")],
            Some(4),
            "agent.part_size",
        ),
        case(
            "part_size not a size",
            vec![Set(4, "part_size = \"lots\"")],
            Some(4),
            "agent.part_size",
        ),
        case(
            "relative journal path",
            vec![Set(2, "journal = \"state/journal.db\"")],
            Some(2),
            "agent.journal",
        ),
        case(
            "journal of the wrong type",
            vec![Set(2, "journal = 5")],
            Some(2),
            "agent.journal",
        ),
        case(
            "missing bucket",
            vec![Set(19, "")],
            None,
            "destination.bucket",
        ),
        case(
            "invalid bucket name",
            vec![Set(19, "bucket = \"Bad_Bucket\"")],
            Some(19),
            "destination.bucket",
        ),
        case(
            "endpoint not a URL",
            vec![Set(17, "endpoint = \"not a url\"")],
            Some(17),
            "destination.endpoint",
        ),
        case(
            "endpoint with another scheme",
            vec![Set(17, "endpoint = \"ftp://127.0.0.1:9\"")],
            Some(17),
            "destination.endpoint",
        ),
        case(
            "unknown destination type",
            vec![Set(16, "type = \"gcs\"")],
            Some(16),
            "destination.type",
        ),
        case(
            "unknown source type",
            vec![Set(9, "type = \"nfs4\"")],
            Some(9),
            "source[0].type",
        ),
        case(
            "relative source path",
            vec![Set(10, "path = \"in\"")],
            Some(10),
            "source[0].path",
        ),
        case(
            "source path that does not exist",
            vec![Set(10, "path = \"/nonexistent/ha-edge/in\"")],
            Some(10),
            "source[0].path",
        ),
        case(
            "settle not a duration",
            vec![Set(11, "settle = \"soon\"")],
            Some(11),
            "source[0].settle",
        ),
        case(
            "include not a list",
            vec![Set(12, "include = \"**/*.ndjson\"")],
            Some(12),
            "source[0].include",
        ),
        case(
            "include with a broken glob",
            vec![Set(12, "include = [\"[unclosed\"]")],
            Some(12),
            "source[0].include",
        ),
        case(
            "unknown after_upload action",
            vec![Set(13, "after_upload = \"shred\"")],
            Some(13),
            "source[0].after_upload",
        ),
        case(
            "unknown watch mode",
            vec![Set(13, "watch = \"inotify\"")],
            Some(13),
            "source[0].watch",
        ),
        case(
            "poll_interval too short",
            vec![Set(13, "poll_interval = \"100ms\"")],
            Some(13),
            "source[0].poll_interval",
        ),
        case(
            "unknown on_change",
            vec![Set(13, "on_change = \"replace\"")],
            Some(13),
            "source[0].on_change",
        ),
        case(
            "marker with a slash",
            vec![Set(13, "complete_when = { marker = \"../{name}.done\" }")],
            Some(13),
            "source[0].complete_when.marker",
        ),
        case(
            "unknown sse",
            vec![Append("sse = \"rot13\"")],
            Some(21),
            "destination.sse",
        ),
        case(
            "unreadable credentials file",
            vec![Append(
                "credentials_file = \"/nonexistent/ha-edge/credentials\"",
            )],
            Some(21),
            "destination.credentials_file",
        ),
        case(
            "overlapping sources",
            vec![AppendWith(|s| {
                format!(
                    "\n[[source]]\nname = \"nested\"\ntype = \"fs\"\npath = \"{}/sub\"",
                    s.src().display()
                )
            })],
            Some(25),
            "source[1].path",
        ),
        case(
            "duplicate source names",
            vec![AppendWith(|s| {
                format!(
                    "\n[[source]]\nname = \"exports\"\ntype = \"fs\"\npath = \"{}\"",
                    s.dir.path().join("other").display()
                )
            })],
            Some(23),
            "source[1].name",
        ),
        case(
            "journal inside a source",
            vec![SetWith(2, |s| {
                format!("journal = \"{}/j.db\"", s.src().display())
            })],
            Some(2),
            "agent.journal",
        ),
        case(
            "no [destination]",
            vec![
                Set(15, ""),
                Set(16, ""),
                Set(17, ""),
                Set(18, ""),
                Set(19, ""),
                Set(20, ""),
            ],
            None,
            "destination",
        ),
    ]
}

#[test]
fn every_broken_config_is_refused_precisely_by_validate_and_run() {
    let setup = Setup::new("cfg");
    std::fs::create_dir_all(setup.src().join("sub")).unwrap();
    std::fs::create_dir_all(setup.dir.path().join("other")).unwrap();
    let path = setup.config_path();
    let shown = path.display().to_string();
    // The base is valid (so each case fails for its own reason only).
    std::fs::write(&path, base(&setup).join("\n") + "\n").unwrap();
    let out = output_within(
        setup.command(bin(), &["validate", "--offline", "-c", &shown]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "base config: {}", stderr_of(&out));
    let _ = std::fs::remove_file(setup.journal());
    let _ = std::fs::remove_dir_all(setup.journal().parent().unwrap());

    let cases = corpus();
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for c in &cases {
        let mut lines = base(&setup);
        for e in &c.edits {
            match e {
                Edit::Set(n, t) => lines[n - 1] = t.to_string(),
                Edit::SetWith(n, f) => lines[n - 1] = f(&setup),
                Edit::Append(t) => lines.push(t.to_string()),
                Edit::AppendWith(f) => lines.extend(f(&setup).lines().map(str::to_string)),
            }
        }
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        for verb in ["validate", "run"] {
            let mut args = vec![verb, "-c", shown.as_str()];
            if verb == "run" {
                args.push("--once");
            }
            let out = output_within(setup.command(bin(), &args), Duration::from_secs(30));
            let err = stderr_of(&out);
            let at = match c.line {
                Some(l) => format!("{shown}:{l}:"),
                None => format!("{shown}:"),
            };
            let ok = out.status.code() == Some(2)
                && err.lines().any(|l| l.contains(&at) && l.contains(c.key))
                && !setup.journal().exists();
            if !ok {
                failures.push(format!(
                    "{} ({verb}): exit {:?}, wanted `{at}` and `{}` on one line:\n{err}",
                    c.what,
                    out.status.code(),
                    c.key
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{} broken configs refused precisely by validate and run",
        cases.len()
    );
}

#[test]
fn hostile_names_are_uploaded_safely_or_refused_and_never_escape() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s3 = S3Server::start();
    s3.create_bucket("names");
    let setup = Setup::new("names");
    let src = setup.src();
    let outside_dir = setup.dir.path().join("outside");
    let outside = outside_dir.join("secret.ndjson");
    write_settled(&outside, b"SECRET outside the root");

    // Names that are odd but harmless: uploaded under exactly that key.
    let long_dirs = format!(
        "{0}/{1}/{2}",
        "d".repeat(250),
        "e".repeat(250),
        "f".repeat(250)
    );
    let accepted: Vec<String> = vec![
        "-rf".into(),
        "--help".into(),
        "-".into(),
        "...".into(),
        "..ndjson".into(),
        "a..b.ndjson".into(),
        "sp ace.ndjson".into(),
        "percent%2F..%2Fx.ndjson".into(),
        "quote\"s'.ndjson".into(),
        "back\\slash.ndjson".into(),
        "ümlaut-日本-🧬.ndjson".into(),
        "semi;colon&amp=1.ndjson".into(),
        "?query#frag.ndjson".into(),
        "*star[1].ndjson".into(),
        // Long, but within what the test server can store: s3s-fs keeps each key base64-encoded
        // in a file name (255 bytes at most), so ~180-byte keys are its limit; S3 takes 1,024.
        "x".repeat(150),
    ];
    for (i, name) in accepted.iter().enumerate() {
        write_settled(&src.join(name), &data(900 + i as u64, 100 + i));
    }
    // Names and entries that must be refused with a warning.
    let mut refused = 0;
    let mut refuse = |p: &Path, bytes: &[u8]| {
        write_settled(p, bytes);
        refused += 1;
    };
    refuse(&src.join("new\nline.ndjson"), b"1");
    refuse(&src.join("tab\there.ndjson"), b"2");
    refuse(&src.join("carriage\rreturn.ndjson"), b"3");
    refuse(&src.join(OsStr::from_bytes(b"latin1-\xe9.ndjson")), b"4");
    refuse(&src.join(OsStr::from_bytes(b"bad-\xff\xfe")), b"5");
    refuse(&src.join("del\x7f.ndjson"), b"6");
    refuse(
        &src.join(format!(
            "{long_dirs}/{}/{}",
            "h".repeat(200),
            "i".repeat(100)
        )),
        b"7",
    ); // key > 1024 bytes
    let links = [
        ("escape.ndjson", outside),
        ("escape-dir", outside_dir),
        ("root", "/".into()),
        ("dangling.ndjson", src.join("nothing-here")),
        ("loop-a", "loop-b".into()),
        ("loop-b", "loop-a".into()),
        ("self", "self".into()),
        ("up.ndjson", "../outside/secret.ndjson".into()),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, src.join(name)).unwrap();
    }
    let fifo_ok = std::process::Command::new("mkfifo")
        .arg(src.join("fifo.ndjson"))
        .status()
        .unwrap()
        .success();
    let chr_ok = std::process::Command::new("mknod")
        .arg(src.join("chardev.ndjson"))
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success();
    let blk_ok = std::process::Command::new("mknod")
        .arg(src.join("blockdev.ndjson"))
        .args(["b", "7", "250"])
        .status()
        .unwrap()
        .success();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("socket.ndjson")).unwrap();
    assert!(fifo_ok && chr_ok && blk_ok, "mkfifo/mknod (as root) needed");

    setup.write_config(&s3.endpoint(), "", "");
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    // What was refused is not "all delivered" (finding 15): exit 1, and the rest is sent.
    assert_eq!(out.status.code(), Some(1), "{err}");
    let mut expected: Vec<String> = accepted.iter().map(|n| format!("fhir/{n}")).collect();
    expected.sort();
    assert_eq!(s3.keys("names"), expected, "{err}");
    for (i, name) in accepted.iter().enumerate() {
        assert_eq!(
            s3.object("names", &format!("fhir/{name}")).unwrap(),
            data(900 + i as u64, 100 + i),
            "{name}"
        );
    }
    // Nothing from outside the root, under any key.
    for key in s3.keys("names") {
        assert_ne!(
            s3.object("names", &key).unwrap(),
            b"SECRET outside the root"
        );
    }
    for needle in [
        "control character",
        "not valid UTF-8",
        "1024",
        "escape.ndjson",
        "escape-dir",
        "up.ndjson",
        "loop-a",
        "fifo.ndjson",
        "chardev.ndjson",
        "blockdev.ndjson",
        "socket.ndjson",
    ] {
        assert!(err.contains(needle), "no warning about {needle}:\n{err}");
    }
    let entries = refused + links.len() + 4;
    eprintln!(
        "{} hostile names uploaded safely, {entries} entries refused or skipped",
        accepted.len()
    );

    // The daemon (events + rescans) over the same tree: stays up, sends nothing more.
    setup.write_config(&s3.endpoint(), "", "rescan_interval = \"1s\"");
    let mut daemon = setup.spawn_daemon(bin());
    std::fs::write(src.join("another\nnewline.ndjson"), b"x").unwrap();
    // Seen and refused (shown in `status`), and the daemon still up.
    assert!(
        wait_until(Duration::from_secs(20), || setup.status_json(bin())["held"]
            ["last"]
            .as_array()
            .is_some_and(|held| held.iter().any(|h| h["path"]
                == "another\nnewline.ndjson"
                && h["state"] == "refused"))),
        "{}",
        setup.daemon_log()
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert_eq!(s3.keys("names"), expected);
}
