//! End-to-end: the real `ha-edge` binary against a real S3 server (s3s-fs, SigV4-verifying) on
//! 127.0.0.1. Each test has its own server, bucket, source directory and journal.

use std::path::Path;
use std::time::{Duration, Instant};

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

#[test]
fn delivers_small_and_multipart_files_byte_identical() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let src = setup.src();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("Patient.ndjson", data(1, 1500)),
        ("2026/11/Observation 1+2.ndjson", data(2, 70_000)),
        ("2026/ümlaut-日本.ndjson", data(3, 10)),
        ("empty.ndjson", Vec::new()),
        ("imaging/big.ndjson", data(4, 23 * MIB + 123)),
    ];
    for (name, bytes) in &files {
        write_settled(&src.join(name), bytes);
    }
    // Not selected: excluded patterns, and not matching include.
    write_settled(&src.join("partial.ndjson.tmp"), b"x");
    write_settled(&src.join(".hidden.ndjson"), b"x");
    write_settled(&src.join("notes.txt"), b"x");
    setup.write_config(
        &s3.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"",
        "include = [\"**/*.ndjson\"]\nexclude = [\"**/*.tmp\", \"**/.*\"]\nsettle = \"30s\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));

    let mut expected: Vec<String> = files.iter().map(|(n, _)| format!("fhir/{n}")).collect();
    expected.sort();
    assert_eq!(s3.keys("exports"), expected);
    for (name, bytes) in &files {
        let key = format!("fhir/{name}");
        let stored = s3.object("exports", &key).expect("object stored");
        assert_eq!(sha256(&stored), sha256(bytes), "{key}");
        let meta = s3.metadata("exports", &key).expect("metadata");
        if bytes.len() < 8 * MIB {
            // A single PUT carries its SHA-256.
            assert_eq!(meta["user_metadata"]["sha256"], sha256(bytes), "{key}");
        } else {
            // A multipart upload, read once: the server computed the full-object CRC64NVME over
            // what it assembled and checked it against the one sent with the completion.
            assert_eq!(meta["checksum_type"], "FULL_OBJECT", "{key}: {meta}");
            let sums = s3.checksums("exports", &key).expect("checksums");
            assert_eq!(
                sums["checksum_crc64nvme"],
                crc64nvme_b64(bytes),
                "{key}: {sums}"
            );
        }
    }
    // The journal keeps the SHA-256 of every object, multipart ones included.
    assert_eq!(
        setup.journal_sha256("fhir/imaging/big.ndjson").as_deref(),
        Some(sha256(&files[4].1).as_str())
    );
    assert_eq!(s3.open_uploads(), 0);
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 5)]);

    // A second run finds nothing new and sends nothing.
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 5)]);
}

#[test]
fn settle_waits_for_a_file_still_being_written() {
    let s3 = S3Server::start();
    s3.create_bucket("settle");
    let setup = Setup::new("settle");
    setup.write_config(
        &s3.endpoint(),
        "",
        "settle = \"1500ms\"\nrescan_interval = \"1s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    let path = setup.src().join("growing.ndjson");
    let mut written = Vec::new();
    // Keep appending for ~2.5 s: the file never stays unchanged for 1.5 s.
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_millis(2500) {
        let chunk = data(i, 4096);
        written.extend_from_slice(&chunk);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&chunk).unwrap();
        drop(f);
        i += 1;
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            s3.object("settle", "fhir/growing.ndjson").is_none(),
            "uploaded while still being written"
        );
    }
    let done = wait_until(Duration::from_secs(15), || {
        s3.object("settle", "fhir/growing.ndjson")
            .is_some_and(|b| b.len() == written.len())
    });
    assert!(done, "not uploaded after it settled");
    assert_eq!(
        sha256(&s3.object("settle", "fhir/growing.ndjson").unwrap()),
        sha256(&written)
    );
    // `status` reads the journal while the daemon holds it. The object shows in the bucket a
    // moment before the agent commits its delivery, so poll.
    let cfg = setup.config_path().display().to_string();
    let mut last = serde_json::Value::Null;
    let recorded = wait_until(Duration::from_secs(10), || {
        let out = output_within(
            setup.command(bin(), &["status", "-c", &cfg, "--json"]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{}", stderr_of(&out));
        last = serde_json::from_slice(&out.stdout).unwrap();
        last["objects"]["done"] == 1
    });
    assert!(recorded, "{last}");
    assert_eq!(last["agent"]["pid"], daemon.id().to_string(), "{last}");
    sigterm(&daemon);
    let st = wait_within(&mut daemon, Duration::from_secs(20));
    assert!(st.success(), "SIGTERM must exit 0, got {st:?}");
}

#[test]
fn after_upload_delete_and_move_only_after_verification() {
    let s3 = S3Server::start();
    s3.create_bucket("after");
    // delete
    let setup = Setup::new("after");
    write_settled(&setup.src().join("a/x.ndjson"), b"delete me");
    setup.write_config(&s3.endpoint(), "", "after_upload = \"delete\"");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        s3.object("after", "fhir/a/x.ndjson").as_deref(),
        Some(&b"delete me"[..])
    );
    assert!(
        !setup.src().join("a/x.ndjson").exists(),
        "source must be deleted after delivery"
    );

    // move_to
    let setup = Setup::new("after");
    let done_dir = setup.dir.path().join("done");
    write_settled(&setup.src().join("b/y.ndjson"), b"move me");
    setup.write_config(
        &s3.endpoint(),
        "",
        &format!("after_upload = {{ move_to = \"{}\" }}", done_dir.display()),
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        s3.object("after", "fhir/b/y.ndjson").as_deref(),
        Some(&b"move me"[..])
    );
    assert!(!setup.src().join("b/y.ndjson").exists());
    assert_eq!(
        std::fs::read(done_dir.join("b/y.ndjson")).unwrap(),
        b"move me"
    );
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 1)]);

    // A refused upload touches nothing.
    let setup = Setup::new("no-such-bucket");
    write_settled(&setup.src().join("keep.ndjson"), b"stay");
    setup.write_config(&s3.endpoint(), "", "after_upload = \"delete\"");
    let out = setup.run_once(bin());
    assert!(!out.status.success());
    assert!(
        setup.src().join("keep.ndjson").exists(),
        "a failed upload must not delete the source"
    );
}

/// A single PUT counts as verified by the SHA-256 the server computed over what it stored (sent
/// back in its answer); HEAD reads it back when the answer has none, or when the source is
/// deleted next. A wrong checksum in the answer is a failed delivery, and nothing is touched.
#[test]
fn single_puts_are_confirmed_by_the_servers_checksum_or_read_back() {
    let s3 = S3Server::start();
    s3.create_bucket("confirm");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("confirm");
    let files = setup.write_files("p", 6, 700, 3000);
    setup.write_config(&proxy.endpoint(), "max_retries = 0", "");
    // p1's answer claims another SHA-256; p2's answer carries none.
    for (target, value) in [
        (
            "/p1.ndjson",
            Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        ),
        ("/p2.ndjson", None),
    ] {
        let fault = Fault::RewriteHeader {
            name: "x-amz-checksum-sha256",
            value,
        };
        proxy.add_rule(Rule::new("PutObject", fault, 1).on_target(target));
    }
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "p1 is not delivered: {err}");
    assert!(
        err.contains("verification failed for s3://confirm/fhir/p1.ndjson")
            && err.contains("the server computed SHA-256 AAAA"),
        "{err}"
    );
    let heads: Vec<String> = proxy
        .seen()
        .iter()
        .filter(|r| r.op() == "HeadObject")
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(heads, vec!["/confirm/fhir/p2.ndjson".to_string()]);
    let mut counts = setup.journal_counts();
    counts.sort();
    assert_eq!(
        counts,
        vec![("done".to_string(), 5), ("pending".to_string(), 1)]
    );

    // The next run sends p1 again (its answer is right now) and nothing else.
    let before = proxy.count("PutObject");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(proxy.count("PutObject") - before, 1);
    for (n, b) in &files {
        let stored = s3.object("confirm", &format!("fhir/{n}")).expect(n);
        assert_eq!(sha256(&stored), sha256(b), "{n}");
    }

    // Sources deleted after the upload: every object is read back first.
    let setup = Setup::new("confirm");
    for (n, b) in &files[..3] {
        write_settled(&setup.src().join("del").join(n), b);
    }
    setup.write_config(&proxy.endpoint(), "", "after_upload = \"delete\"");
    let before = proxy.count("HeadObject");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(proxy.count("HeadObject") - before, 3);
    assert!(!setup.src().join("del/p0.ndjson").exists());
}

#[test]
fn wrong_secret_key_fails_fast_with_a_clear_error() {
    let s3 = S3Server::start();
    s3.create_bucket("creds");
    let setup = Setup::new("creds");
    for i in 0..20 {
        write_settled(&setup.src().join(format!("f{i}.ndjson")), b"data");
    }
    setup.write_config(&s3.endpoint(), "", "");
    let cfg = setup.config_path();
    let mut cmd = setup.command(bin(), &["run", "-c", cfg.to_str().unwrap(), "--once"]);
    cmd.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let started = Instant::now();
    let out = output_within(cmd, Duration::from_secs(60));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    assert!(err.contains("check the credentials"), "{err}");
    // Reported once, not once per object.
    assert_eq!(
        err.matches("destination refuses uploads").count(),
        1,
        "{err}"
    );
    assert!(s3.keys("creds").is_empty());
    // Nothing was lost: the objects wait in the journal and go out once the key is right.
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(s3.keys("creds").len(), 20);
}

#[test]
fn missing_bucket_fails_fast_with_a_clear_error() {
    let s3 = S3Server::start();
    let setup = Setup::new("does-not-exist");
    write_settled(&setup.src().join("a.ndjson"), b"data");
    setup.write_config(&s3.endpoint(), "", "");
    let started = Instant::now();
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.contains("NoSuchBucket"), "{err}");
    assert!(err.contains("does-not-exist"), "{err}");
    assert!(err.contains("check destination.bucket"), "{err}");
}

#[test]
fn hostile_names_are_refused_and_never_escape_the_root() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s3 = S3Server::start();
    s3.create_bucket("hostile");
    let setup = Setup::new("hostile");
    let src = setup.src();
    let outside = setup.dir.path().join("secret.txt");
    write_settled(&outside, b"outside the root");
    write_settled(&src.join("ok.ndjson"), b"fine");
    write_settled(&src.join("-rf"), b"leading dash");
    write_settled(&src.join("inside-target.ndjson"), b"target");
    std::os::unix::fs::symlink(&outside, src.join("escape.ndjson")).unwrap();
    std::os::unix::fs::symlink("/", src.join("rootdir")).unwrap();
    std::os::unix::fs::symlink(src.join("inside-target.ndjson"), src.join("link.ndjson")).unwrap();
    std::os::unix::fs::symlink("loop-b", src.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", src.join("loop-b")).unwrap();
    write_settled(&src.join("new\nline.ndjson"), b"newline");
    write_settled(
        &src.join(OsStr::from_bytes(b"latin1-\xe9.ndjson")),
        b"latin-1",
    );
    let fifo = src.join("pipe.ndjson");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(ok.success());
    setup.write_config(&s3.endpoint(), "", "");
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    // What was refused is not "all delivered" (finding 15): exit 1, and the rest is sent.
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        s3.keys("hostile"),
        vec![
            "fhir/-rf",
            "fhir/inside-target.ndjson",
            "fhir/link.ndjson",
            "fhir/ok.ndjson"
        ]
    );
    assert_eq!(s3.object("hostile", "fhir/link.ndjson").unwrap(), b"target");
    for needle in [
        "escape.ndjson",
        "pipe.ndjson",
        "loop-a",
        "control character",
        "not valid UTF-8",
    ] {
        assert!(err.contains(needle), "no warning about {needle}: {err}");
    }
    assert!(
        !err.contains("outside the root\n"),
        "content of the outside file leaked"
    );
}

#[test]
fn validate_and_run_report_every_config_problem_with_file_line_and_key() {
    let setup = Setup::new("cfg");
    let cfg = setup.config_path();
    std::fs::write(
        &cfg,
        format!(
            "[agent]\njournal = \"relative.db\"\npart_size = \"1MiB\"\n\n[[source]]\nname = \"x\"\ntype = \"fs\"\npath = \"{}\"\nsettle = \"soon\"\n\n[destination]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nregion = \"eu-central-1\"\nbucket = \"Bad_Bucket\"\npath_style = true\n",
            setup.src().display()
        ),
    )
    .unwrap();
    let path = cfg.display().to_string();
    for args in [
        vec!["validate", "-c", &path],
        vec!["run", "-c", &path, "--once"],
    ] {
        let out = output_within(setup.command(bin(), &args), Duration::from_secs(30));
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{path}:2:11: agent.journal: must be an absolute path"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{path}:3:13: agent.part_size: must be between 5 MiB"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("{path}:9:10: source[0].settle: not a duration")),
            "{err}"
        );
        assert!(
            err.contains(&format!("{path}:15:10: destination.bucket")),
            "{err}"
        );
        assert!(
            !setup.journal().exists(),
            "a bad config must not create a journal"
        );
    }
    // A typo in a key names the key and line.
    std::fs::write(&cfg, "[agent]\njournal = \"/tmp/x.db\"\nconcurency = 2\n").unwrap();
    let out = output_within(
        setup.command(bin(), &["validate", "-c", &path]),
        Duration::from_secs(30),
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains(&format!("{path}:3:1: agent.concurency: unknown field")),
        "{err}"
    );
}

#[test]
fn status_reports_the_journal_as_text_and_json() {
    let s3 = S3Server::start();
    s3.create_bucket("status");
    let setup = Setup::new("status");
    write_settled(&setup.src().join("a.ndjson"), &data(9, 1000));
    write_settled(&setup.src().join("b.ndjson"), &data(10, 2000));
    setup.write_config(&s3.endpoint(), "", "");
    let cfg = setup.config_path().display().to_string();
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = output_within(
        setup.command(bin(), &["status", "-c", &cfg, "--json"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["objects"]["done"], 2);
    assert_eq!(v["objects"]["pending"], 0);
    assert_eq!(v["bytes_delivered"], 3000);
    assert_eq!(v["bytes_pending"], 0);
    assert_eq!(v["agent"]["destination"], "ok");
    let out = output_within(
        setup.command(bin(), &["status", "-c", &cfg]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("done        2"), "{text}");
    assert!(text.contains("last errors: none"), "{text}");
    // A reader that has gone away (`| head -1`) must not make it crash: stdout is a pipe whose
    // read end is already closed, so every write fails with EPIPE.
    for args in [
        vec!["status", "-c", &cfg],
        vec!["status", "-c", &cfg, "--json"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut cmd = setup.command(bin(), &args);
        let st = cmd
            .stdout(writer)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}: {st:?}");
    }
}

#[test]
fn daemon_events_never_follow_symlinks_or_enter_excluded_directories() {
    let s3 = S3Server::start();
    s3.create_bucket("events");
    let setup = Setup::new("events");
    let outside = setup.dir.path().join("outside");
    write_settled(&outside.join("secret.ndjson"), b"must stay on premises");
    setup.write_config(
        &s3.endpoint(),
        "",
        "exclude = [\"**/.*\"]\nsettle = \"0s\"\nrescan_interval = \"1s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(10), || setup
        .daemon_log()
        .contains("watching with inotify")));
    // Created while the daemon watches: each produces inotify events for paths below the root.
    std::os::unix::fs::symlink(&outside, setup.src().join("linked-dir")).unwrap();
    std::fs::create_dir(setup.src().join(".cache")).unwrap();
    std::thread::sleep(Duration::from_millis(500)); // the watch on .cache is in place
    write_settled(
        &setup.src().join(".cache/inner.ndjson"),
        b"excluded by its directory",
    );
    write_settled(&setup.src().join("real.ndjson"), b"ok");
    assert!(wait_until(Duration::from_secs(15), || s3
        .object("events", "fhir/real.ndjson")
        .is_some()));
    // Give the events and a rescan (every second) time to do anything wrong.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(s3.keys("events"), vec!["fhir/real.ndjson"]);
    // Not even offered: nothing behind the link or in the excluded directory reached the journal.
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 1)]);
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
}

#[test]
fn network_cut_is_retried_with_backoff_and_bounded() {
    use std::sync::atomic::Ordering;
    let s3 = S3Server::start();
    s3.create_bucket("cut");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("cut");
    write_settled(&setup.src().join("a.ndjson"), &data(5, 50_000));
    setup.write_config(&proxy.endpoint(), "max_retries = 8", "");
    proxy.down.store(true, Ordering::Relaxed);
    let child = setup.spawn_once(bin());
    std::thread::sleep(Duration::from_millis(1000));
    let refused_while_down = proxy.refused.load(Ordering::Relaxed);
    proxy.down.store(false, Ordering::Relaxed);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(s3.object("cut", "fhir/a.ndjson").unwrap(), data(5, 50_000));
    // Backoff, not a hammer: a handful of attempts in that second, bounded by max_retries.
    assert!(
        refused_while_down >= 1,
        "the agent never tried during the outage"
    );
    assert!(
        refused_while_down <= 9,
        "{refused_while_down} attempts in 1 s"
    );
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_one_otherwise() {
    let s3 = S3Server::start();
    s3.create_bucket("reload");
    let setup = Setup::new("reload");
    let cfg = setup.write_config(
        &s3.endpoint(),
        "",
        "settle = \"0s\"\nrescan_interval = \"1s\"",
    );
    let good = std::fs::read_to_string(&cfg).unwrap();
    let mut daemon = setup.spawn_daemon(bin());
    let arrives = |key: &str| {
        wait_until(Duration::from_secs(15), || {
            s3.object("reload", key).is_some()
        })
    };

    write_settled(&setup.src().join("a.ndjson"), b"a");
    assert!(arrives("fhir/a.ndjson"));

    // An invalid config is refused; the running one stays in force.
    std::fs::write(
        &cfg,
        good.replace("[agent]", "[agent]\npart_size = \"1MiB\""),
    )
    .unwrap();
    send_signal(&daemon, "HUP");
    assert!(
        wait_until(Duration::from_secs(10), || setup
            .daemon_log()
            .contains("reload refused: the config file is not valid")),
        "{}",
        setup.daemon_log()
    );
    write_settled(&setup.src().join("b.ndjson"), b"b");
    assert!(arrives("fhir/b.ndjson"), "the old config must keep running");

    // A valid one takes effect.
    let v2 = good.replace("prefix = \"fhir/\"", "prefix = \"v2/\"");
    std::fs::write(&cfg, &v2).unwrap();
    send_signal(&daemon, "HUP");
    // `status` names the config in force: the new one once the restart has happened.
    let in_force = format!("sha256:{}", &sha256(v2.as_bytes())[..16]);
    assert!(
        wait_until(Duration::from_secs(20), || setup.status_json(bin())
            ["agent"]["config"]
            == in_force.as_str()),
        "{}",
        setup.daemon_log()
    );
    write_settled(&setup.src().join("c.ndjson"), b"c");
    assert!(arrives("v2/c.ndjson"), "the new config was not applied");

    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    let log = setup.daemon_log();
    assert!(
        log.contains("reload refused: the config file is not valid"),
        "{log}"
    );
    assert!(log.contains("agent.part_size"), "{log}");
    assert_eq!(
        s3.keys("reload"),
        vec!["fhir/a.ndjson", "fhir/b.ndjson", "v2/c.ndjson"]
    );
}
