//! Discovery and completeness: poll mode without events, marker files, FHIR Bulk Data manifests
//! sent last, a file that changes under its upload, and `on_change = "ignore"`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

#[test]
fn poll_mode_finds_files_within_one_interval_without_events() {
    let s3 = S3Server::start();
    s3.create_bucket("poll");
    let setup = Setup::new("poll");
    // A rescan interval far beyond the test: only polling can find the file in time.
    setup.write_config(
        &s3.endpoint(),
        "",
        "watch = \"poll\"\npoll_interval = \"1s\"\nrescan_interval = \"1h\"\nsettle = \"0s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(10), || setup
        .daemon_log()
        .contains("polling (full scans, no events)")));
    let t0 = Instant::now();
    write_settled(&setup.src().join("late.ndjson"), b"found by polling");
    assert!(
        wait_until(Duration::from_secs(10), || s3
            .object("poll", "fhir/late.ndjson")
            .is_some()),
        "{}",
        setup.daemon_log()
    );
    let took = t0.elapsed();
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert!(
        took < Duration::from_millis(2500),
        "found after {took:?}, more than one 1 s poll interval plus the upload"
    );
    assert!(!setup.daemon_log().contains("watching with inotify"));
}

#[test]
fn auto_mode_uses_events_on_a_local_filesystem_and_says_why() {
    let s3 = S3Server::start();
    s3.create_bucket("auto");
    let setup = Setup::new("auto");
    setup.write_config(
        &s3.endpoint(),
        "",
        "rescan_interval = \"1h\"\nsettle = \"0s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(10), || setup
        .daemon_log()
        .contains("watching with inotify")));
    write_settled(&setup.src().join("evented.ndjson"), b"found by an event");
    assert!(wait_until(Duration::from_secs(5), || s3
        .object("auto", "fhir/evented.ndjson")
        .is_some()));
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert!(
        setup.daemon_log().contains("local filesystem"),
        "{}",
        setup.daemon_log()
    );
}

#[test]
fn markers_complete_files_and_are_never_uploaded() {
    let s3 = S3Server::start();
    s3.create_bucket("marker");
    let setup = Setup::new("marker");
    setup.write_config(
        &s3.endpoint(),
        "",
        "complete_when = { marker = \"{name}.done\" }\nrescan_interval = \"1s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(10), || setup
        .daemon_log()
        .contains("watching with inotify")));
    // Old enough to pass any settle rule: only the marker may release it. Its event and a
    // rescan (every second) have looked at it by the check.
    write_settled(&setup.src().join("a.ndjson"), b"complete when marked");
    std::thread::sleep(Duration::from_millis(1200));
    assert!(s3.keys("marker").is_empty(), "sent before its marker");
    std::fs::write(setup.src().join("a.ndjson.done"), b"").unwrap();
    assert!(wait_until(Duration::from_secs(10), || s3
        .object("marker", "fhir/a.ndjson")
        .is_some()));
    // A rescan later, the marker itself is still not sent.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        s3.keys("marker"),
        vec!["fhir/a.ndjson"],
        "the marker is not uploaded"
    );
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());

    // A directory marker: nothing from the directory until _SUCCESS is there.
    let s3 = S3Server::start();
    s3.create_bucket("dirmarker");
    let setup = Setup::new("dirmarker");
    write_settled(&setup.src().join("run1/part-0.ndjson"), b"0");
    write_settled(&setup.src().join("run1/part-1.ndjson"), b"1");
    write_settled(&setup.src().join("run2/part-0.ndjson"), b"2");
    std::fs::write(setup.src().join("run2/_SUCCESS"), b"").unwrap();
    setup.write_config(
        &s3.endpoint(),
        "",
        "complete_when = { marker = \"_SUCCESS\" }",
    );
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    // run1 is not complete: the run reports it as not yet settled.
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("2 not yet settled"), "{err}");
    assert_eq!(s3.keys("dirmarker"), vec!["fhir/run2/part-0.ndjson"]);
}

fn manifest(names: &[&str]) -> String {
    let output: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                r#"{{"type": "{}", "url": "https://fhir.dkfz.example/export/42/{n}"}}"#,
                n.split('.').next().unwrap_or("x")
            )
        })
        .collect();
    format!(
        r#"{{"transactionTime": "2026-11-26T10:00:00Z", "request": "https://fhir.dkfz.example/$export", "requiresAccessToken": true, "output": [{}], "error": []}}"#,
        output.join(", ")
    )
}

#[test]
fn fhir_manifest_is_written_last_and_missing_files_are_reported() {
    let s3 = S3Server::start();
    s3.create_bucket("fhir");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("fhir");
    let export = setup.src().join("export-42");
    let files = ["Patient.ndjson", "Observation.ndjson", "Encounter.ndjson"];
    for (i, n) in files.iter().enumerate() {
        write_settled(&export.join(n), &data(50 + i as u64, 30_000 * (i + 1)));
    }
    // The manifest sorts first by id and by name; it must still go last.
    write_settled(&export.join("manifest.json"), manifest(&files).as_bytes());
    setup.write_config(&proxy.endpoint(), "concurrency = 4", "");
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    let puts: Vec<String> = proxy
        .seen()
        .iter()
        .filter(|r| r.op() == "PutObject")
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(puts.len(), 4, "{puts:?}");
    assert!(
        puts.last().unwrap().ends_with("/export-42/manifest.json"),
        "the manifest must be the last object written: {puts:?}"
    );
    assert_eq!(
        s3.object("fhir", "fhir/export-42/manifest.json").unwrap(),
        manifest(&files).into_bytes()
    );

    // An export whose manifest lists a file that is not there: reported, manifest held back.
    let partial = setup.src().join("export-43");
    write_settled(&partial.join("Patient.ndjson"), b"p");
    write_settled(
        &partial.join("manifest.json"),
        manifest(&["Patient.ndjson", "Condition.ndjson"]).as_bytes(),
    );
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("Condition.ndjson"),
        "missing file not reported: {err}"
    );
    assert!(s3.object("fhir", "fhir/export-43/Patient.ndjson").is_some());
    assert!(
        s3.object("fhir", "fhir/export-43/manifest.json").is_none(),
        "a manifest of an incomplete export must not be sent"
    );
    // Once the file arrives, the export completes, manifest last.
    write_settled(&partial.join("Condition.ndjson"), b"c");
    let before = proxy.seen().len();
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let puts: Vec<String> = proxy.seen()[before..]
        .iter()
        .filter(|r| r.op() == "PutObject")
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert!(puts[1].ends_with("/export-43/manifest.json"), "{puts:?}");
}

#[test]
fn a_file_changed_during_its_upload_never_mixes_versions() {
    let s3 = S3Server::start();
    s3.create_bucket("pinned");
    let proxy = Proxy::start(s3.port);
    proxy.delay_ms.store(300, Ordering::Relaxed);
    let setup = Setup::new("pinned");
    let path = setup.src().join("scan.dcm");
    let v1 = data(61, 6 * 5 * MIB);
    write_settled(&path, &v1);
    setup.write_config(
        &proxy.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nconcurrency = 1\nparts_in_flight = 1",
        "settle = \"1s\"\nrescan_interval = \"1s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(30), || !setup
        .journal_parts("fhir/scan.dcm")
        .is_empty()));
    // Rewritten in place mid-upload (same inode, new bytes, same size).
    let v2 = data(62, 6 * 5 * MIB);
    std::fs::write(&path, &v2).unwrap();
    proxy.delay_ms.store(0, Ordering::Relaxed);
    let ok = wait_until(Duration::from_secs(60), || {
        s3.object("pinned", "fhir/scan.dcm")
            .is_some_and(|b| sha256(&b) == sha256(&v2))
    });
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(30)).success());
    let log = setup.daemon_log();
    assert!(ok, "the new version never arrived:\n{log}");
    assert!(log.contains("changed"), "{log}");
    assert_eq!(s3.open_uploads(), 0, "the mixed upload must be aborted");
    // Every object ever completed was one consistent version: the proxy saw exactly one
    // CompleteMultipartUpload (for v2), none for the half-sent v1.
    let completes = proxy.count("CompleteMultipartUpload");
    assert_eq!(completes, 1);
}

#[test]
fn on_change_ignore_never_sends_a_delivered_path_again() {
    let s3 = S3Server::start();
    s3.create_bucket("ignore");
    let setup = Setup::new("ignore");
    write_settled(&setup.src().join("a.ndjson"), b"first");
    setup.write_config(&s3.endpoint(), "", "on_change = \"ignore\"");
    assert!(setup.run_once(bin()).status.success());
    write_settled(&setup.src().join("a.ndjson"), b"second version");
    assert!(setup.run_once(bin()).status.success());
    assert_eq!(s3.object("ignore", "fhir/a.ndjson").unwrap(), b"first");
    // The default sends the new version.
    setup.write_config(&s3.endpoint(), "", "");
    assert!(setup.run_once(bin()).status.success());
    assert_eq!(
        s3.object("ignore", "fhir/a.ndjson").unwrap(),
        b"second version"
    );
}

/// A FUSE mount (bindfs) of a backing directory: files written to the backing directory do not
/// go through the mount, so inotify on the mount never hears of them, as with files written by
/// another NFS client. Unmounted on drop.
struct FuseMirror(std::path::PathBuf);

impl FuseMirror {
    fn mount(backing: &Path, at: &Path) -> FuseMirror {
        std::fs::create_dir_all(backing).unwrap();
        let ok = std::process::Command::new("bindfs")
            .arg(backing)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "bindfs (FUSE) is needed: scripts/test.sh installs it (apt-get install bindfs)"
        );
        FuseMirror(at.to_path_buf())
    }
}

impl Drop for FuseMirror {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount")
            .arg("-u")
            .arg(&self.0)
            .status();
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn auto_mode_polls_a_fuse_mount_where_writes_bypass_inotify() {
    for mode in ["events", "auto"] {
        let s3 = S3Server::start();
        s3.create_bucket("fuse");
        let setup = Setup::new("fuse");
        let backing = setup.dir.path().join("backing");
        let _mount = FuseMirror::mount(&backing, &setup.src());
        setup.write_config(
            &s3.endpoint(),
            "",
            &format!(
                "watch = \"{mode}\"\npoll_interval = \"1s\"\nrescan_interval = \"1h\"\nsettle = \"0s\""
            ),
        );
        let mut daemon = setup.spawn_daemon(bin());
        assert!(wait_until(Duration::from_secs(10), || setup
            .daemon_log()
            .contains("source=exports")));
        std::thread::sleep(Duration::from_millis(500));
        // Written by "another client": straight into the backing directory.
        write_settled(
            &backing.join("other-client.ndjson"),
            b"written behind the mount",
        );
        let found = wait_until(Duration::from_secs(4), || {
            s3.object("fuse", "fhir/other-client.ndjson").is_some()
        });
        sigterm(&daemon);
        assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
        let log = setup.daemon_log();
        match mode {
            // The failure auto mode exists for: events alone never see the file.
            "events" => assert!(!found, "inotify saw a write behind a FUSE mount?\n{log}"),
            _ => {
                assert!(log.contains("fuse filesystem"), "{log}");
                assert!(found, "polling must find it within one interval:\n{log}");
            }
        }
    }
}
