//! Network loss and server faults, injected by the proxy between agent and server: connections
//! refused, black-holed, slowed down and reset mid-body; 500, 503 SlowDown with Retry-After,
//! truncated answers and timeouts on chosen requests; a bucket policy refusing one source's keys.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn status_text(setup: &Setup) -> String {
    let cfg = setup.config_path().display().to_string();
    let out = output_within(
        setup.command(bin(), &["status", "-c", &cfg]),
        Duration::from_secs(20),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn outage_is_logged_once_shown_in_status_probed_gently_and_survived() {
    let s3 = S3Server::start();
    s3.create_bucket("outage");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("outage");
    setup.write_config(
        &proxy.endpoint(),
        "max_retries = 2\nrequest_timeout = \"2s\"\nconcurrency = 2",
        "settle = \"200ms\"\nrescan_interval = \"1s\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    write_settled(&setup.src().join("before.ndjson"), &data(1, 1000));
    assert!(wait_until(Duration::from_secs(20), || s3
        .object("outage", "fhir/before.ndjson")
        .is_some()));

    // The tunnel goes down; exports keep arriving.
    proxy.down.store(true, Ordering::Relaxed);
    let outage_start = Instant::now();
    let files = setup.write_files("during-", 12, 100, 20_000);
    assert!(
        wait_until(Duration::from_secs(20), || status_text(&setup)
            .contains("destination: unreachable since")),
        "status must show the outage: {}",
        status_text(&setup)
    );
    // Long enough to see probes (the driver's unit tests check their timing exactly).
    std::thread::sleep(Duration::from_secs(4).saturating_sub(outage_start.elapsed()));
    let attempts = proxy.refused.load(Ordering::Relaxed);
    let secs = outage_start.elapsed().as_secs_f64();
    proxy.down.store(false, Ordering::Relaxed);
    eprintln!(
        "outage of {secs:.1} s: {attempts} connection attempts ({:.2}/s) for 12 waiting files",
        attempts as f64 / secs
    );
    assert!(attempts >= 2, "the agent never probed during the outage");
    assert!(
        (attempts as f64) / secs <= 3.0,
        "{attempts} attempts in {secs:.1} s: the agent hammers a dead link"
    );

    // The link is back: everything arrives, and the log tells the story once each way.
    assert!(
        wait_until(Duration::from_secs(60), || files
            .iter()
            .all(|(n, _)| s3.object("outage", &format!("fhir/{n}")).is_some())),
        "files not delivered after the outage: {:?}",
        s3.keys("outage")
    );
    for (n, b) in &files {
        assert_eq!(s3.object("outage", &format!("fhir/{n}")).unwrap(), *b);
    }
    assert!(wait_until(Duration::from_secs(10), || status_text(&setup)
        .contains("destination: ok")));
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    // The journal recorded one error: the outage's start, not one per request or object, and
    // no object counted a failed attempt.
    let st = setup.status_json(bin());
    let errors = st["last_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]["key"].is_null(),
        "a destination error, not an object's: {errors:?}"
    );
    assert_eq!(st["agent"]["destination"], "ok", "{st}");
}

#[test]
fn black_hole_and_latency_are_survived_without_duplicates() {
    let s3 = S3Server::start();
    s3.create_bucket("hole");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("hole");
    let files = setup.write_files("f", 8, 200, 30_000);
    setup.write_config(
        &proxy.endpoint(),
        "max_retries = 12\nrequest_timeout = \"1s\"\nconcurrency = 2",
        "",
    );
    // Accepts connections and never answers, for 3 seconds; then answers slowly.
    proxy.black_hole.store(true, Ordering::Relaxed);
    let (bh, dl) = (proxy.black_hole.clone(), proxy.delay_ms.clone());
    let healer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        dl.store(300, Ordering::Relaxed);
        bh.store(false, Ordering::Relaxed);
    });
    let out = setup.run_once(bin());
    healer.join().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    for (n, b) in &files {
        assert_eq!(s3.object("hole", &format!("fhir/{n}")).unwrap(), *b, "{n}");
    }
    let swallowed = proxy.swallowed.load(Ordering::Relaxed);
    assert!(swallowed >= 1, "nothing was black-holed");
    // 300 ms of latency per request stays under the 1 s timeout: no request is sent twice.
    let puts: Vec<String> = proxy
        .seen()
        .iter()
        .filter(|r| r.op() == "PutObject")
        .map(|r| r.target.clone())
        .collect();
    let mut unique = puts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        puts.len(),
        unique.len(),
        "latency alone must not cause re-sends"
    );
    eprintln!("black hole: {swallowed} connections swallowed; then 300 ms latency per request");
}

#[test]
fn server_faults_are_retried_within_bounds_and_delivered() {
    let s3 = S3Server::start();
    s3.create_bucket("faults");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("faults");
    let mut files: Vec<(String, Vec<u8>)> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| (format!("{n}.ndjson"), data(n.len() as u64 + 300, 40_000)))
        .collect();
    files.push(("big.ndjson".into(), data(301, 12 * MIB)));
    for (n, b) in &files {
        write_settled(&setup.src().join(n), b);
    }
    setup.write_config(
        &proxy.endpoint(),
        "max_retries = 6\nrequest_timeout = \"2s\"\nconcurrency = 1\npart_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"",
        "",
    );
    let status = |status, code, retry_after| Fault::Status {
        status,
        code,
        retry_after,
    };
    let rules = [
        Rule::new("PutObject", status(500, "InternalError", None), 2).on_target("/a.ndjson"),
        Rule::new("PutObject", status(503, "SlowDown", Some(2)), 1).on_target("/b.ndjson"),
        Rule::new("PutObject", Fault::BlackHole, 1).on_target("/c.ndjson"),
        Rule::new("PutObject", Fault::ResetMidBody, 1).on_target("/d.ndjson"),
        Rule::new("PutObject", Fault::TruncateResponse, 1).on_target("/e.ndjson"),
        Rule::new(
            "CreateMultipartUpload",
            status(500, "InternalError", None),
            1,
        ),
        Rule::new("UploadPart", Fault::ResetMidBody, 1),
        Rule::new("UploadPart", Fault::TruncateResponse, 1),
        Rule::new("UploadPart", status(503, "SlowDown", None), 1),
        Rule::new("CompleteMultipartUpload", Fault::TruncateResponse, 1),
        Rule::new("HeadObject", Fault::TruncateResponse, 1),
        Rule::new("HeadObject", status(500, "InternalError", None), 1),
    ];
    let planned: u32 = rules.iter().map(|r| r.times).sum();
    for r in rules {
        proxy.add_rule(r);
    }
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    for (n, b) in &files {
        let stored = s3.object("faults", &format!("fhir/{n}")).expect(n);
        assert_eq!(sha256(&stored), sha256(b), "{n}");
    }
    assert_eq!(s3.open_uploads(), 0);
    let seen = proxy.seen();
    let injected = proxy.faults_injected();
    assert_eq!(
        u32::try_from(injected).unwrap(),
        planned,
        "every planned fault fired"
    );
    // Without faults: HeadBucket, 5 PUTs (each confirmed by the SHA-256 in its answer), Create
    // + 3 parts + Complete + HEAD = 12. Each fault costs exactly one more request, and nothing
    // else is repeated, but for two: the PUT of e whose answer was lost is sent again
    // create-only, answered 412, and one HEAD proves the object there is ours; the Create
    // answered 500 may have made an upload, so ListMultipartUploads looks for it before the
    // second Create (two more). (The completion sent again after its lost answer is settled
    // by that same HEAD instead of the usual one.)
    assert_eq!(
        seen.len(),
        12 + injected + 2,
        "requests: {:?}",
        seen.iter()
            .map(|r| (r.op(), r.fault.clone()))
            .collect::<Vec<_>>()
    );
    // Retry-After: 2 was honoured.
    let b: Vec<Instant> = seen
        .iter()
        .filter(|r| r.op() == "PutObject" && r.target.ends_with("/b.ndjson"))
        .map(|r| r.at)
        .collect();
    assert_eq!(b.len(), 2);
    let waited = b[1].duration_since(b[0]);
    assert!(
        waited >= Duration::from_millis(1900),
        "Retry-After ignored: {waited:?}"
    );
    eprintln!(
        "{injected} faults injected, {} requests in all; SlowDown retry waited {waited:?}",
        seen.len()
    );
}

#[test]
fn completion_refused_as_unknown_checks_the_object_once_and_resumes_next_run() {
    let s3 = S3Server::start();
    s3.create_bucket("complete");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("complete");
    let bytes = data(77, 12 * MIB);
    write_settled(&setup.src().join("big.ndjson"), &bytes);
    setup.write_config(
        &proxy.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"",
        "",
    );
    // The proxy answers CompleteMultipartUpload itself with NoSuchUpload: the upload stays open
    // on the server and no object exists, so the agent must not count it as delivered.
    proxy.add_rule(Rule::new(
        "CompleteMultipartUpload",
        Fault::Status {
            status: 404,
            code: "NoSuchUpload",
            retry_after: None,
        },
        1,
    ));
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("not there after the upload"), "{err}");
    assert!(s3.object("complete", "fhir/big.ndjson").is_none());
    // One HEAD decides whether the completion went through; nothing asks twice.
    let ops: Vec<&str> = proxy.seen().iter().map(SeenRequest::op).collect();
    let after_complete = ops
        .iter()
        .skip_while(|op| **op != "CompleteMultipartUpload")
        .filter(|op| **op == "HeadObject")
        .count();
    assert_eq!(after_complete, 1, "{ops:?}");
    assert_eq!(proxy.parts_sent().len(), 3);

    // The next run finds the upload and its three parts, and only completes it.
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        sha256(&s3.object("complete", "fhir/big.ndjson").unwrap()),
        sha256(&bytes)
    );
    assert_eq!(proxy.parts_sent().len(), 3, "no part is sent again");
    assert_eq!(s3.open_uploads(), 0);
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 1)]);
}

#[test]
fn access_denied_on_one_source_is_reported_once_and_other_sources_go_on() {
    let s3 = S3Server::start();
    s3.create_bucket("policy");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("policy");
    let (a, b) = (setup.src().join("dkfz"), setup.src().join("embl"));
    for i in 0..4 {
        write_settled(&a.join(format!("p{i}.ndjson")), &data(400 + i, 5000));
        write_settled(&b.join(format!("p{i}.ndjson")), &data(500 + i, 5000));
    }
    let config = format!(
        r#"[agent]
journal = "{journal}"
max_retries = 1

[[source]]
name = "dkfz"
type = "fs"
path = "{a}"
key_prefix = "{{source}}/"

[[source]]
name = "embl"
type = "fs"
path = "{b}"
key_prefix = "{{source}}/"

{destination}"#,
        journal = setup.journal().display(),
        a = a.display(),
        b = b.display(),
        destination = setup.destination_toml(&proxy.endpoint()),
    );
    std::fs::write(setup.config_path(), config).unwrap();
    // The bucket policy denies the dkfz prefix.
    proxy.add_rule(
        Rule::new(
            "PutObject",
            Fault::Status {
                status: 403,
                code: "AccessDenied",
                retry_after: None,
            },
            1000,
        )
        .on_target("/fhir/dkfz/"),
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(30), || (0..4).all(|i| s3
            .object("policy", &format!("fhir/embl/p{i}.ndjson"))
            .is_some())),
        "the other source must go on: {:?}\n{}",
        s3.keys("policy"),
        setup.daemon_log()
    );
    // The refused source is paused (and, for a while, not hammered).
    assert!(
        wait_until(Duration::from_secs(20), || status_text(&setup)
            .contains("source dkfz: refused since")),
        "{}",
        status_text(&setup)
    );
    std::thread::sleep(Duration::from_secs(1));
    let st = status_text(&setup);
    assert!(st.contains("AccessDenied"), "{st}");
    let denied = proxy.seen().iter().filter(|r| r.fault.is_some()).count();
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    // Reported once (one error in the journal, the destination's), not per object.
    let errors = setup.status_json(bin())["last_errors"].clone();
    assert_eq!(errors.as_array().unwrap().len(), 1, "{errors}");
    assert!(errors[0]["key"].is_null(), "{errors}");
    assert!(
        denied <= 4 + 1,
        "refused keys must not be retried in a loop: {denied} denied requests"
    );
    assert!(s3
        .keys("policy")
        .iter()
        .all(|k| k.starts_with("fhir/embl/")));
}
