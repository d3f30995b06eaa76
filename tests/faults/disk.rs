//! Disk trouble: a damaged journal, a full journal filesystem, and source files that disappear
//! between discovery and upload.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn run_cmd(setup: &Setup, verb: &str) -> std::process::Output {
    let cfg = setup.config_path().display().to_string();
    let mut args = vec![verb, "-c", &cfg];
    if verb == "run" {
        args.push("--once");
    }
    output_within(setup.command(bin(), &args), Duration::from_secs(60))
}

#[test]
fn damaged_journal_stops_run_and_validate_with_advice_and_touches_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("damaged");
    let setup = Setup::new("damaged");
    for i in 0..40 {
        write_settled(
            &setup.src().join(format!("d{i}.ndjson")),
            &data(600 + i, 3000),
        );
    }
    setup.write_config(&s3.endpoint(), "", "after_upload = \"delete\"");
    let out = run_cmd(&setup, "run");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let journal = setup.journal();
    // Everything into the main file (the run may leave its last commits in the WAL), so that
    // damaging that file damages the data.
    rusqlite::Connection::open(&journal)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let good = std::fs::read(&journal).unwrap();
    assert!(
        good.len() > 8192,
        "journal too small to damage meaningfully"
    );

    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 3] = [
        ("truncated to half", |b| b.truncate(b.len() / 2)),
        ("header overwritten", |b| b[..100].fill(0x5a)),
        ("page garbage", |b| {
            let n = b.len();
            b[4096..n - 1024].fill(0xa5)
        }),
    ];
    for (what, damage) in damages {
        // New exports wait in the source; nothing may touch them while the journal is bad.
        let fresh: Vec<_> = (0..3)
            .map(|i| {
                setup
                    .src()
                    .join(format!("{}-{i}.ndjson", what.replace(' ', "_")))
            })
            .collect();
        for p in &fresh {
            write_settled(p, b"new export");
        }
        let keys_before = s3.keys("damaged");
        let mut bytes = good.clone();
        damage(&mut bytes);
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", journal.display()));
        }
        std::fs::write(&journal, &bytes).unwrap();
        for verb in ["run", "validate"] {
            let out = run_cmd(&setup, verb);
            let err = stderr_of(&out);
            assert_eq!(
                out.status.code(),
                Some(4),
                "{what}: {verb} must exit 4: {err}"
            );
            assert!(
                err.contains(&journal.display().to_string()),
                "{what}: {verb} must name the journal: {err}"
            );
            assert!(
                err.contains("is damaged") && err.contains("move the file"),
                "{what}: {verb} must say what to do: {err}"
            );
        }
        for p in &fresh {
            assert!(p.exists(), "{what}: a source file was touched");
        }
        assert_eq!(
            s3.keys("damaged"),
            keys_before,
            "{what}: the bucket changed"
        );
        for p in &fresh {
            std::fs::remove_file(p).unwrap();
        }
    }
}

/// A small tmpfs for the journal (needs CAP_SYS_ADMIN, as root in CI). Unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test mounts a small tmpfs to fill the journal's filesystem: run it as root"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` with a filler file until writes fail.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    filler
}

#[test]
fn full_journal_filesystem_pauses_everything_and_resumes_when_space_returns() {
    let s3 = S3Server::start();
    s3.create_bucket("full");
    let setup = Setup::new("full");
    let state = setup.journal().parent().unwrap().to_path_buf();
    let _fs = Tmpfs::mount(&state, "2m");
    setup.write_config(
        &s3.endpoint(),
        "",
        "settle = \"200ms\"\nrescan_interval = \"1s\"",
    );
    write_settled(&setup.src().join("first.ndjson"), &data(700, 5000));
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(20), || s3
        .object("full", "fhir/first.ndjson")
        .is_some()));
    assert!(wait_until(Duration::from_secs(10), || setup
        .journal_counts()
        == vec![("done".to_string(), 1)]));

    let filler = fill(&state);
    let files = setup.write_files("while-full-", 20, 710, 8000);
    assert!(
        wait_until(Duration::from_secs(20), || setup
            .daemon_log()
            .contains("journal's filesystem is full")),
        "the full disk must be reported: {}",
        setup.daemon_log()
    );
    std::thread::sleep(Duration::from_secs(2));
    // Intake stopped: nothing was sent that the journal could not record.
    assert_eq!(s3.keys("full"), vec!["fhir/first.ndjson"]);
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon must stay up"
    );

    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(40), || files
            .iter()
            .all(|(n, _)| s3.object("full", &format!("fhir/{n}")).is_some())),
        "work must resume when space returns: {:?}\n{}",
        s3.keys("full"),
        setup.daemon_log()
    );
    for (n, b) in &files {
        assert_eq!(s3.object("full", &format!("fhir/{n}")).unwrap(), *b);
    }
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    let log = setup.daemon_log();
    assert_eq!(
        log.matches("journal's filesystem is full").count(),
        1,
        "reported once:\n{log}"
    );
    assert!(log.contains("journal writable again"), "{log}");
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 21)]);
}

#[test]
fn source_file_deleted_after_discovery_is_reported_and_skipped() {
    let s3 = S3Server::start();
    s3.create_bucket("gone");
    let proxy = Proxy::start(s3.port);
    proxy.delay_ms.store(300, Ordering::Relaxed);
    let setup = Setup::new("gone");
    for i in 0..6 {
        write_settled(
            &setup.src().join(format!("g{i}.ndjson")),
            &data(800 + i, 2000),
        );
    }
    setup.write_config(&proxy.endpoint(), "concurrency = 1", "");
    let child = setup.spawn_once(bin());
    // Discovered (in the journal), not yet sent: take it away.
    assert!(wait_until(Duration::from_secs(20), || setup
        .journal_keys("1")
        .len()
        == 6));
    std::fs::remove_file(setup.src().join("g5.ndjson")).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("disappeared before upload"), "{err}");
    assert_eq!(
        setup.journal_keys("state = 'vanished'"),
        vec!["fhir/g5.ndjson"]
    );
    assert_eq!(s3.keys("gone").len(), 5);
    // Not retried: a second run sends nothing for it.
    let before = proxy.seen().len();
    let out = setup.run_once(bin());
    assert!(out.status.success());
    assert_eq!(proxy.seen().len() - before, 1, "only the bucket check");
}
