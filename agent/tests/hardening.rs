//! Regression tests for the attack review (issue "Hardening"): one test per finding, named
//! `fNN_...` after the finding's number, each against the real binary and a real s3s-fs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// `ha-edge status --json` parsed, and its exit code.
fn status_json(setup: &Setup) -> (serde_json::Value, Option<i32>) {
    setup.status_json_and_code(bin())
}

fn validate(setup: &Setup, extra: &[&str]) -> std::process::Output {
    let cfg = setup.config_path();
    let mut args = vec!["validate", "-c", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    output_within(setup.command(bin(), &args), Duration::from_secs(60))
}

/// Two directory sources `a` and `b` (each with `Patient.ndjson`) to one destination.
fn two_sources(setup: &Setup, endpoint: &str, a_extra: &str, b_extra: &str) {
    let (a, b) = (setup.dir.path().join("a"), setup.dir.path().join("b"));
    write_settled(&a.join("Patient.ndjson"), b"site A\n");
    write_settled(&b.join("Patient.ndjson"), b"site B\n");
    let text = format!(
        "[agent]\njournal = \"{}\"\n\n\
         [[source]]\nname = \"a\"\ntype = \"fs\"\npath = \"{}\"\nafter_upload = \"delete\"\n{a_extra}\n\n\
         [[source]]\nname = \"b\"\ntype = \"fs\"\npath = \"{}\"\nafter_upload = \"delete\"\n{b_extra}\n\n{}",
        setup.journal().display(),
        a.display(),
        b.display(),
        setup.destination_toml(endpoint)
    );
    std::fs::write(setup.config_path(), text).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 1. Two sources, same relative names, one destination.

#[test]
fn f01_validate_refuses_two_sources_that_map_to_the_same_keys() {
    let s3 = S3Server::start();
    s3.create_bucket("same");
    let setup = Setup::new("same");
    two_sources(&setup, &s3.endpoint(), "", "");
    let out = validate(&setup, &["--offline"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("source[1]") && err.contains("key_prefix"),
        "names the clash and the fix: {err}"
    );
    // `run` refuses the same config and touches nothing.
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(setup.dir.path().join("a/Patient.ndjson").exists());
    assert!(s3.keys("same").is_empty());

    // One key space per source: both delivered side by side.
    two_sources(
        &setup,
        &s3.endpoint(),
        "key_prefix = \"{source}/\"",
        "key_prefix = \"{source}/\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        s3.keys("same"),
        vec!["fhir/a/Patient.ndjson", "fhir/b/Patient.ndjson"]
    );
    assert_eq!(
        s3.object("same", "fhir/a/Patient.ndjson").unwrap(),
        b"site A\n"
    );
}

#[test]
fn f01_an_object_the_agent_did_not_write_is_a_conflict_and_the_source_stays() {
    let s3 = S3Server::start();
    s3.create_bucket("cas");
    let setup = Setup::new("cas");
    // Someone else's objects are at the keys already: a small and a multipart one.
    s3.put("cas", "fhir/Patient.ndjson", b"not ours\n");
    s3.put("cas", "fhir/big.ndjson", b"not ours either\n");
    write_settled(&setup.src().join("Patient.ndjson"), b"ours\n");
    let big = data(7, 11 * MIB);
    write_settled(&setup.src().join("big.ndjson"), &big);
    setup.write_config(
        &s3.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"",
        "after_upload = \"delete\"",
    );
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a conflict is not success: {err}"
    );
    assert_eq!(
        s3.object("cas", "fhir/Patient.ndjson").unwrap(),
        b"not ours\n"
    );
    assert_eq!(
        s3.object("cas", "fhir/big.ndjson").unwrap(),
        b"not ours either\n"
    );
    assert!(setup.src().join("Patient.ndjson").exists(), "source kept");
    assert!(setup.src().join("big.ndjson").exists(), "source kept");
    assert_eq!(s3.open_uploads(), 0, "the conflicting upload is aborted");
    assert_eq!(
        setup.journal_counts(),
        vec![("conflict".to_string(), 2)],
        "{err}"
    );
    let (st, code) = status_json(&setup);
    assert_eq!(st["objects"]["conflict"], 2, "{st}");
    assert_eq!(code, Some(1), "status says degraded: {st}");
    let held: Vec<String> = st["held"]["last"]
        .as_array()
        .expect("held.last")
        .iter()
        .map(|h| h["path"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(held.iter().any(|p| p.ends_with("Patient.ndjson")), "{st}");
    // Reported once, not retried: a second run leaves it alone and says so again in its exit.
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(
        s3.object("cas", "fhir/Patient.ndjson").unwrap(),
        b"not ours\n"
    );
}

#[test]
fn f01_own_objects_are_replaced_and_a_lost_answer_is_idempotent() {
    let s3 = S3Server::start();
    s3.create_bucket("own");
    let setup = Setup::new("own");
    let file = setup.src().join("Observation.ndjson");
    write_settled(&file, b"version 1\n");
    setup.write_config(&s3.endpoint(), "", "");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    // A new version of a file it delivered replaces its own object (If-Match on its ETag).
    std::fs::write(&file, b"version 2, longer\n").unwrap();
    write_settled(&file, b"version 2, longer\n");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        s3.object("own", "fhir/Observation.ndjson").unwrap(),
        b"version 2, longer\n"
    );
    // The same bytes already there (an answer lost, a journal started afresh): delivered.
    let again = Setup::new("own");
    write_settled(
        &again.src().join("Observation.ndjson"),
        b"version 2, longer\n",
    );
    again.write_config(&s3.endpoint(), "", "");
    let out = again.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(again.journal_counts(), vec![("done".to_string(), 1)]);
    // Someone else replaced our object (another writer, through S3): the next version is a
    // conflict, theirs stays.
    let other = Setup::new("own");
    write_settled(&other.src().join("Observation.ndjson"), b"someone else's\n");
    other.write_config_with(
        &other
            .destination_toml(&s3.endpoint())
            .replace("[destination]\n", "[destination]\noverwrite = \"always\"\n"),
        "",
        "",
    );
    let out = other.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    write_settled(&file, b"version 3\n");
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(
        s3.object("own", "fhir/Observation.ndjson").unwrap(),
        b"someone else's\n"
    );
    // overwrite = "always" is the operator's explicit choice.
    let text = std::fs::read_to_string(setup.config_path()).unwrap();
    std::fs::write(
        setup.config_path(),
        text.replace("[destination]\n", "[destination]\noverwrite = \"always\"\n"),
    )
    .unwrap();
    write_settled(&file, b"version 4\n");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        s3.object("own", "fhir/Observation.ndjson").unwrap(),
        b"version 4\n"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A file rewritten in place during its upload, mtime restored.

#[test]
fn f02_a_file_rewritten_in_place_with_its_mtime_restored_never_completes_mixed() {
    let s3 = S3Server::start();
    s3.create_bucket("inplace");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("inplace");
    let path = setup.src().join("big.ndjson");
    let old = data(21, 16 * MIB);
    write_settled(&path, &old);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    setup.write_config(
        &proxy.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nparts_in_flight = 1\nconcurrency = 1",
        "",
    );
    proxy.delay_ms.store(300, Ordering::Relaxed);
    let mut child = setup.spawn_once(bin());
    // Once the first part is on its way, rewrite the whole file in place, same size, and put
    // the mtime back.
    assert!(wait_until(Duration::from_secs(60), || proxy
        .parts_sent()
        .contains(&1)));
    let new = data(22, 16 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.write_all_at(&new, 0).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let status = wait_within(&mut child, Duration::from_secs(120));
    let mut log = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        !status.success(),
        "the changed file is not reported delivered: {log}"
    );
    // Whatever is in the bucket is one version, whole, and its recorded SHA-256 is its own.
    if let Some(stored) = s3.object("inplace", "fhir/big.ndjson") {
        let meta = s3.metadata("inplace", "fhir/big.ndjson").unwrap();
        assert_eq!(meta["user_metadata"]["sha256"], sha256(&stored), "{log}");
        assert!(
            stored == old || stored == new,
            "mixed versions stored: {log}"
        );
    }
    assert!(log.contains("changed"), "{log}");
    // Once it settles, the new version goes whole.
    proxy.delay_ms.store(0, Ordering::Relaxed);
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        sha256(&s3.object("inplace", "fhir/big.ndjson").unwrap()),
        sha256(&new)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The journal deleted while the agent runs.

#[test]
fn f03_a_journal_deleted_while_running_stops_the_agent_with_exit_4_and_a_copy() {
    let s3 = S3Server::start();
    s3.create_bucket("gone");
    let setup = Setup::new("gone");
    write_settled(&setup.src().join("one.ndjson"), b"1\n");
    setup.write_config(
        &s3.endpoint(),
        "",
        "settle = \"1s\"\nrescan_interval = \"1s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(30), || s3
        .object("gone", "fhir/one.ndjson")
        .is_some()));
    assert!(wait_until(Duration::from_secs(10), || setup
        .journal_counts()
        .contains(&("done".to_string(), 1))));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", setup.journal().display()));
    }
    write_settled(&setup.src().join("two.ndjson"), b"2\n");
    let status = wait_within(&mut daemon, Duration::from_secs(30));
    let log = setup.daemon_log();
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(log.contains("was removed"), "{log}");
    // What the open handle held is kept beside it.
    let copy = std::fs::read_dir(setup.journal().parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("journal.db.recovered"))
        .unwrap_or_else(|| panic!("no recovered copy: {log}"));
    let c = rusqlite::Connection::open(&copy).unwrap();
    let n: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM objects WHERE key = 'fhir/one.ndjson' AND state = 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The journal inside its own source, spelled with `..` or through a symlink.

#[test]
fn f04_a_journal_inside_its_source_is_refused_however_it_is_spelled() {
    let s3 = S3Server::start();
    let setup = Setup::new("loop");
    let root = setup.dir.path();
    std::fs::create_dir_all(root.join("state")).unwrap();
    std::os::unix::fs::symlink(setup.src(), root.join("link")).unwrap();
    for journal in [
        format!("{}/state/../in/journal.db", root.display()),
        format!("{}/link/journal.db", root.display()),
        format!("{}/link/sub/journal.db", root.display()),
    ] {
        let text = format!(
            "[agent]\njournal = \"{journal}\"\n\n[[source]]\nname = \"exports\"\ntype = \"fs\"\npath = \"{}\"\n\n{}",
            setup.src().display(),
            setup.destination_toml(&s3.endpoint())
        );
        std::fs::write(setup.config_path(), text).unwrap();
        let out = validate(&setup, &["--offline"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{journal}: {err}");
        assert!(err.contains("agent.journal"), "{err}");
    }
    // The source reached through a symlink to the journal's directory.
    let text = format!(
        "[agent]\njournal = \"{}/in/journal.db\"\n\n[[source]]\nname = \"exports\"\ntype = \"fs\"\npath = \"{}/link\"\n\n{}",
        root.display(),
        root.display(),
        setup.destination_toml(&s3.endpoint())
    );
    std::fs::write(setup.config_path(), text).unwrap();
    let out = validate(&setup, &["--offline"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
}

// ---------------------------------------------------------------------------------------------
// 5. A pending file replaced by a FIFO.

#[test]
fn f05_a_pending_file_replaced_by_a_fifo_is_refused_not_waited_on() {
    let s3 = S3Server::start();
    s3.create_bucket("fifo");
    let setup = Setup::new("fifo");
    let path = setup.src().join("Patient.ndjson");
    write_settled(&path, b"x\n");
    // First run: the destination is down, so the file stays pending in the journal.
    setup.write_config("http://127.0.0.1:9", "max_retries = 0", "");
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(setup.journal_counts(), vec![("pending".to_string(), 1)]);
    std::fs::remove_file(&path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    setup.write_config(&s3.endpoint(), "", "");
    let cfg = setup.config_path();
    let out = output_within(
        setup.command(bin(), &["run", "-c", cfg.to_str().unwrap(), "--once"]),
        Duration::from_secs(30),
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    let (st, _) = status_json(&setup);
    let reasons = st["held"]["last"].to_string();
    assert!(reasons.contains("Patient.ndjson"), "{st}");
}

// ---------------------------------------------------------------------------------------------
// 6. Journal, WAL and SHM files under umask 022.

#[test]
fn f06_journal_files_are_private_whatever_the_umask() {
    let s3 = S3Server::start();
    s3.create_bucket("modes");
    let setup = Setup::new("modes");
    write_settled(&setup.src().join("a.ndjson"), b"a\n");
    setup.write_config(
        &s3.endpoint(),
        "",
        "settle = \"1s\"\nrescan_interval = \"1s\"",
    );
    let cfg = setup.config_path();
    let log = std::fs::File::create(setup.dir.path().join("daemon.log")).unwrap();
    // The agent under umask 022, as a shell would start it.
    let mut cmd = setup.command(
        Path::new("/bin/sh"),
        &["-c", "umask 022; exec \"$0\" run -c \"$1\""],
    );
    cmd.arg(bin()).arg(&cfg).stdout(Stdio::null()).stderr(log);
    let mut child = cmd.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(30), || s3
        .object("modes", "fhir/a.ndjson")
        .is_some()));
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    let j = setup.journal();
    let wal = Path::new(&format!("{}-wal", j.display())).to_path_buf();
    let shm = Path::new(&format!("{}-shm", j.display())).to_path_buf();
    assert_eq!(mode(&j).unwrap(), 0o600, "journal");
    assert_eq!(mode(&wal).unwrap(), 0o600, "wal");
    assert_eq!(mode(&shm).unwrap(), 0o600, "shm");
    assert_eq!(mode(j.parent().unwrap()).unwrap(), 0o700, "state directory");
    sigterm(&child);
    wait_within(&mut child, Duration::from_secs(30));
}

// ---------------------------------------------------------------------------------------------
// 7. A closed log pipe.

#[test]
fn f07_a_closed_log_pipe_does_not_kill_the_agent() {
    let s3 = S3Server::start();
    s3.create_bucket("pipe");
    let setup = Setup::new("pipe");
    let files = setup.write_files("p", 20, 70, 1000);
    setup.write_config(&s3.endpoint(), "", "");
    let cfg = setup.config_path();
    let mut child = setup
        .command(bin(), &["run", "-c", cfg.to_str().unwrap(), "--once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away at once, as `| head -1` does after its line.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_within(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(s3.keys("pipe").len(), files.len());
}

// ---------------------------------------------------------------------------------------------
// 17. CreateMultipartUpload is not idempotent.

#[test]
fn f17_an_ambiguous_create_is_not_retried_blindly_but_looked_for_first() {
    let s3 = S3Server::start();
    s3.create_bucket("create");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("create");
    let big = data(17, 11 * MIB);
    write_settled(&setup.src().join("big.ndjson"), &big);
    setup.write_config(
        &proxy.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nrequest_timeout = \"2s\"",
        "",
    );
    // The server creates the upload; its answer never comes back.
    proxy.add_rule(Rule::new(
        "CreateMultipartUpload",
        Fault::ForwardThenHold,
        1,
    ));
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        sha256(&s3.object("create", "fhir/big.ndjson").unwrap()),
        sha256(&big)
    );
    let ops: Vec<&str> = proxy
        .seen()
        .iter()
        .map(|r| r.op())
        .filter(|op| *op == "CreateMultipartUpload" || *op == "ListMultipartUploads")
        .collect();
    // Looked for (and would abort) what the lost answer may have left, then started anew.
    assert_eq!(
        ops,
        [
            "CreateMultipartUpload",
            "ListMultipartUploads",
            "CreateMultipartUpload"
        ],
        "{err}"
    );
    // s3s-fs cannot list uploads (501): the agent says so once; there, only a lifecycle rule
    // removes the upload the first request made (on AWS and MinIO the listing finds it).
    assert!(err.contains("cannot list multipart uploads"), "{err}");
    assert_eq!(s3.open_uploads(), 1);
}

// ---------------------------------------------------------------------------------------------
// 13. `validate` asks the servers.

#[test]
fn f13_validate_checks_credentials_bucket_and_endpoint_online() {
    let s3 = S3Server::start();
    s3.create_bucket("online");
    let setup = Setup::new("online");
    setup.write_config(&s3.endpoint(), "", "");
    let cfg = setup.config_path();
    let cfg = cfg.to_str().unwrap();
    let run = |cmd: std::process::Command| output_within(cmd, Duration::from_secs(60));
    let out = run(setup.command(bin(), &["validate", "-c", cfg]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    // A wrong secret.
    let mut cmd = setup.command(bin(), &["validate", "-c", cfg]);
    cmd.env("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    let out = run(cmd);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("secret key does not match"), "{err}");
    assert!(!err.contains("wrong-secret"), "no secret in output: {err}");
    // The same config offline: fine (the unit's ExecStartPre).
    let mut cmd = setup.command(bin(), &["validate", "--offline", "-c", cfg]);
    cmd.env("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    assert!(run(cmd).status.success());
    // A missing bucket, and an endpoint nobody answers at.
    for (endpoint, bucket, says) in [
        (s3.endpoint(), "nosuchbucket", "bucket does not exist"),
        ("http://127.0.0.1:9".to_string(), "online", "cannot connect"),
    ] {
        let other = Setup::new(bucket);
        other.write_config(&endpoint, "max_retries = 0", "");
        let c = other.config_path();
        let out = run(other.command(bin(), &["validate", "-c", c.to_str().unwrap()]));
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(3), "{bucket}: {err}");
        assert!(err.contains(says), "{bucket}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// 16. `status` exit codes and typed fields.

#[test]
fn f16_status_exit_codes_say_healthy_degraded_or_refusing() {
    let s3 = S3Server::start();
    s3.create_bucket("health");
    let setup = Setup::new("health");
    write_settled(&setup.src().join("a.ndjson"), b"a\n");
    setup.write_config(&s3.endpoint(), "", "");
    assert!(setup.run_once(bin()).status.success());
    let (st, code) = status_json(&setup);
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["health"], "healthy");
    assert!(st["objects"]["done"].is_u64(), "numbers are numbers: {st}");
    assert!(st["bytes_delivered"].is_u64(), "{st}");
    // A name that can never be a key: held, degraded (exit 1), with path and reason.
    write_settled(&setup.src().join("bad\nname.ndjson"), b"x\n");
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let (st, code) = status_json(&setup);
    assert_eq!(code, Some(1), "{st}");
    assert_eq!(st["health"], "degraded");
    assert_eq!(st["held"]["count"], 1, "{st}");
    assert_eq!(st["held"]["last"][0]["state"], "refused", "{st}");
    assert!(
        st["held"]["last"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("control character"),
        "{st}"
    );
    // Removed by the operator: no longer held, healthy again.
    std::fs::remove_file(setup.src().join("bad\nname.ndjson")).unwrap();
    assert!(setup.run_once(bin()).status.success());
    let (st, code) = status_json(&setup);
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["held"]["count"], 0, "{st}");
    // The destination refuses us (wrong secret): exit 3.
    write_settled(&setup.src().join("b.ndjson"), b"b\n");
    let cfg = setup.config_path();
    let mut cmd = setup.command(bin(), &["run", "-c", cfg.to_str().unwrap(), "--once"]);
    cmd.env("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    let out = output_within(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    let (st, code) = status_json(&setup);
    assert_eq!(code, Some(3), "{st}");
    assert_eq!(st["health"], "refusing", "{st}");
}

// ---------------------------------------------------------------------------------------------
// 15. What will never be sent is visible.

#[test]
fn f15_manifests_that_can_never_be_published_are_reported_and_held_visibly() {
    let s3 = S3Server::start();
    s3.create_bucket("manifests");
    let setup = Setup::new("manifests");
    let src = setup.src();
    let manifest = |urls: &str| {
        format!(
            r#"{{"transactionTime": "2026-12-01T10:00:00Z", "request": "x", "output": [{urls}]}}"#
        )
    };
    let cases = [
        (
            "not-a-string",
            manifest(r#"{"type": "Patient", "url": 42}"#),
            "not a string",
        ),
        (
            "dot-dot",
            manifest(r#"{"type": "Patient", "url": "https://h/e/.."}"#),
            "file name",
        ),
        (
            "itself",
            manifest(r#"{"type": "Patient", "url": "https://h/e/manifest.json"}"#),
            "lists itself",
        ),
        (
            "excluded",
            manifest(r#"{"type": "Patient", "url": "https://h/e/Patient.tmp"}"#),
            "never sends",
        ),
    ];
    for (dir, text, _) in &cases {
        write_settled(&src.join(dir).join("manifest.json"), text.as_bytes());
        write_settled(&src.join(dir).join("Patient.ndjson"), b"{}\n");
    }
    write_settled(&src.join("excluded/Patient.tmp"), b"{}\n");
    setup.write_config(&s3.endpoint(), "", "exclude = [\"**/*.tmp\"]");
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused manifests are not success: {err}"
    );
    let keys = s3.keys("manifests");
    assert_eq!(keys.len(), 4, "only the NDJSON files: {keys:?}");
    assert!(
        keys.iter().all(|k| k.ends_with("Patient.ndjson")),
        "{keys:?}"
    );
    let (st, code) = status_json(&setup);
    assert_eq!(code, Some(1), "{st}");
    assert_eq!(st["held"]["count"], 4, "{st}");
    let held = st["held"]["last"].as_array().unwrap();
    for (dir, _, says) in &cases {
        let item = held
            .iter()
            .find(|h| h["path"] == format!("{dir}/manifest.json"))
            .unwrap_or_else(|| panic!("{dir}: {st}"));
        assert!(
            item["reason"].as_str().unwrap().contains(says),
            "{dir}: {item}"
        );
        // Said once, as an error.
        let said = err
            .lines()
            .filter(|l| l.contains("refused") && l.contains(&format!("{dir}/manifest.json")))
            .count();
        assert_eq!(said, 1, "{dir}: {err}");
    }
}

/// Finding 1, on a server that ignores conditional writes: the probe's answer is remembered
/// in the journal; with "ignored", every write is preceded by a HEAD of its key, so someone
/// else's object is still never replaced.
#[test]
fn f01_where_conditions_are_ignored_a_head_before_each_write_keeps_others_objects() {
    let s3 = S3Server::start();
    s3.create_bucket("nocond");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("nocond");
    write_settled(&setup.src().join("first.ndjson"), b"1\n");
    setup.write_config(&proxy.endpoint(), "", "");
    assert!(setup.run_once(bin()).status.success());
    // What the probe would have found on such a server.
    let c = rusqlite::Connection::open(setup.journal()).unwrap();
    let n = c
        .execute(
            "UPDATE agent_state SET value = 'ignored ' || substr(value, length('honoured ') + 1)
             WHERE name = 'conditional_writes' AND value LIKE 'honoured %'",
            [],
        )
        .unwrap();
    assert_eq!(n, 1, "the probe's answer is in the journal");
    drop(c);
    s3.put("nocond", "fhir/Patient.ndjson", b"not ours\n");
    write_settled(&setup.src().join("Patient.ndjson"), b"ours\n");
    write_settled(&setup.src().join("free.ndjson"), b"free\n");
    let puts_before = proxy.count("PutObject");
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ignores conditional writes"), "{err}");
    assert_eq!(
        s3.object("nocond", "fhir/Patient.ndjson").unwrap(),
        b"not ours\n"
    );
    assert_eq!(s3.object("nocond", "fhir/free.ndjson").unwrap(), b"free\n");
    // Only the free key was written: the conflict was found by the HEAD before any write.
    assert_eq!(proxy.count("PutObject") - puts_before, 1, "{err}");
    let mut counts = setup.journal_counts();
    counts.sort();
    assert_eq!(
        counts,
        vec![("conflict".to_string(), 1), ("done".to_string(), 2)]
    );
}

/// Finding 1, and the start of a run: the conditional-write probe runs beside the first
/// uploads instead of before them (four round trips less before the first byte moves on a
/// long link), yet no write of a key is made before its answer is known. Here the probe's
/// answers are slow (1.5 s each) and say the server ignores conditions: the large object's
/// parts go out while the probe waits, and each write (the small object's PUT, the large
/// one's completion) comes after the probe, behind a HEAD of its key.
#[test]
fn f01_the_probe_runs_beside_the_first_uploads_and_every_write_waits_for_its_answer() {
    let s3 = S3Server::start();
    s3.create_bucket("slowprobe");
    let proxy = Proxy::start(s3.port);
    // Both probe writes answered 200 after a pause: a slow server that lets the second
    // create-only write through.
    proxy.add_rule(
        Rule::new(
            "PutObject",
            Fault::Status {
                status: 200,
                code: "",
                retry_after: None,
            },
            2,
        )
        .on_probe()
        .after(Duration::from_millis(1500)),
    );
    let setup = Setup::new("slowprobe");
    let big = data(11, 12 * MIB);
    write_settled(&setup.src().join("big.ndjson"), &big);
    write_settled(&setup.src().join("small.ndjson"), b"small\n");
    setup.write_config(
        &proxy.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"",
        "",
    );
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ignores conditional writes"), "{err}");
    assert_eq!(s3.object("slowprobe", "fhir/big.ndjson").unwrap(), big);
    assert_eq!(
        s3.object("slowprobe", "fhir/small.ndjson").unwrap(),
        b"small\n"
    );

    let mut seen = proxy.requests.lock().unwrap().clone();
    seen.sort_by_key(|r| r.at);
    let probe_done = seen
        .iter()
        .filter(|r| r.is_probe())
        .map(|r| r.at)
        .max()
        .expect("the probe ran");
    let first_part = seen
        .iter()
        .find(|r| r.op() == "UploadPart")
        .expect("parts were sent")
        .at;
    assert!(
        first_part < probe_done,
        "the first part waited for the probe ({:?} after its last request)",
        first_part - probe_done
    );
    for (key, write) in [
        ("big.ndjson", "CompleteMultipartUpload"),
        ("small.ndjson", "PutObject"),
    ] {
        let on_key = |op: &str| {
            seen.iter()
                .filter(|r| r.op() == op && r.path() == format!("/slowprobe/fhir/{key}"))
                .map(|r| r.at)
                .collect::<Vec<_>>()
        };
        let writes = on_key(write);
        assert_eq!(writes.len(), 1, "{key}: {writes:?}");
        let heads = on_key("HeadObject");
        assert!(
            heads.iter().any(|h| *h > probe_done && *h < writes[0]),
            "{key}: no HEAD between the probe's answer and the write"
        );
    }
}

/// Finding 16: a destination that does not answer, and pending work older than the threshold.
#[test]
fn f16_status_says_unreachable_and_stale() {
    let setup = Setup::new("gone");
    write_settled(&setup.src().join("a.ndjson"), b"a\n");
    setup.write_config("http://127.0.0.1:9", "max_retries = 0", "");
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let cfg = setup.config_path();
    let out = output_within(
        setup.command(
            bin(),
            &[
                "status",
                "-c",
                cfg.to_str().unwrap(),
                "--json",
                "--stale-after",
                "0s",
            ],
        ),
        Duration::from_secs(30),
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(3), "{st}");
    assert_eq!(st["health"], "unreachable", "{st}");
    let detail = st["health_detail"].to_string();
    assert!(detail.contains("oldest pending"), "{st}");
}

/// Finding 1, multipart: a new version replaces our own object, and is a conflict (upload
/// aborted) once another writer has replaced it.
#[test]
fn f01_a_new_multipart_version_replaces_only_our_own_object() {
    let s3 = S3Server::start();
    s3.create_bucket("mpown");
    let setup = Setup::new("mpown");
    let file = setup.src().join("big.ndjson");
    let parts = "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"";
    setup.write_config(&s3.endpoint(), parts, "");
    write_settled(&file, &data(31, 11 * MIB));
    assert!(setup.run_once(bin()).status.success());
    let v2 = data(32, 12 * MIB);
    write_settled(&file, &v2);
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        sha256(&s3.object("mpown", "fhir/big.ndjson").unwrap()),
        sha256(&v2)
    );
    // Another writer replaces it through S3.
    let other = Setup::new("mpown");
    let theirs = data(33, 6 * MIB);
    write_settled(&other.src().join("big.ndjson"), &theirs);
    other.write_config_with(
        &other
            .destination_toml(&s3.endpoint())
            .replace("[destination]\n", "[destination]\noverwrite = \"always\"\n"),
        parts,
        "",
    );
    assert!(other.run_once(bin()).status.success());
    write_settled(&file, &data(34, 13 * MIB));
    let out = setup.run_once(bin());
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(
        sha256(&s3.object("mpown", "fhir/big.ndjson").unwrap()),
        sha256(&theirs)
    );
    assert_eq!(
        s3.open_uploads(),
        0,
        "the upload of the conflicting version is aborted"
    );
    assert!(setup
        .journal_counts()
        .contains(&("conflict".to_string(), 1)));
}

/// A server may refuse a conditional write (412) before it reads the body, and then close the
/// connection without saying so. That connection must not go back to the client's pool: the
/// next request would be sent on it and die there (after a crash, the re-sent objects' 412s
/// made a following part of 5 MiB go twice, once into the dead connection).
#[test]
fn f01_a_write_refused_by_its_condition_leaves_no_dead_connection_behind() {
    let s3 = S3Server::start();
    s3.create_bucket("refused");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("refused");
    let body = data(12, 96 * 1024);
    write_settled(&setup.src().join("again.ndjson"), &body);
    setup.write_config(&proxy.endpoint(), "", "");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    // A lost journal: the object is sent again, create-only, and refused because it is there;
    // the refusing server closes the connection 300 ms after its answer.
    std::fs::remove_dir_all(setup.journal().parent().unwrap()).unwrap();
    let before = proxy.seen().len();
    proxy.add_rule(Rule::new(
        "PutObject",
        Fault::RefuseThenClose {
            status: 412,
            code: "PreconditionFailed",
            after: Duration::from_millis(300),
        },
        1,
    ));
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("already holds these bytes"),
        "settled as ours: {err}"
    );
    assert_eq!(proxy.faults_injected(), 1);
    let seen = proxy.seen();
    let after: Vec<String> = seen[before..]
        .iter()
        .map(|r| format!("{} {} -> {:?}", r.method, r.target, r.status))
        .collect();
    assert!(
        seen[before..].iter().all(|r| r.status.is_some()),
        "a request died on the refused write's connection: {after:#?}"
    );
}
