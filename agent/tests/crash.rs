//! Crash safety with the real binary: SIGKILL in the middle of a multipart upload, and a graceful
//! SIGTERM. A sniffing proxy between agent and server counts every UploadPart request, so the
//! tests can prove which parts were sent again after the restart.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;
const KEY: &str = "fhir/scan/big.dcm";

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A 6-part object (5 MiB parts), uploaded through a proxy that delays each request so the
/// upload takes long enough to be interrupted at a chosen point.
fn slow_setup(bucket: &str, parts_in_flight: u32) -> (S3Server, Proxy, Setup, Vec<u8>) {
    let (s3, proxy, setup, bytes, _) = slow_setup_with(bucket, parts_in_flight, false);
    (s3, proxy, setup, bytes)
}

/// `slow_setup`, with `tls` over https: a TLS front before the proxy (parts then go unsigned,
/// with their CRC-64/NVME, and the journal holds no SHA-256 of each part).
fn slow_setup_with(
    bucket: &str,
    parts_in_flight: u32,
    tls: bool,
) -> (S3Server, Proxy, Setup, Vec<u8>, Option<TlsFront>) {
    let s3 = S3Server::start();
    s3.create_bucket(bucket);
    let proxy = Proxy::start(s3.port);
    proxy.delay_ms.store(250, Ordering::Relaxed);
    let front = tls.then(|| TlsFront::start(proxy.port));
    let setup = Setup::new(bucket);
    let bytes = data(42, 6 * 5 * MIB - 1000);
    write_settled(&setup.src().join("scan/big.dcm"), &bytes);
    let destination = match &front {
        Some(f) => format!(
            "{}ca_file = \"{}\"\n",
            setup.destination_toml(&f.endpoint()),
            f.ca().display()
        ),
        None => setup.destination_toml(&proxy.endpoint()),
    };
    setup.write_config_with(
        &destination,
        &format!("part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nconcurrency = 1\nparts_in_flight = {parts_in_flight}\nshutdown_grace = \"20s\""),
        "",
    );
    (s3, proxy, setup, bytes, front)
}

#[test]
fn kill_9_mid_multipart_resumes_without_resending_recorded_parts() {
    kill_9_mid_multipart(false);
}

/// The same over https, where the parts went unsigned and the journal keeps only their CRCs:
/// the resumed upload's full-object CRC-64/NVME, combined with the recorded parts', is the one
/// the server confirms.
#[test]
fn kill_9_mid_multipart_over_https_resumes_without_resending_recorded_parts() {
    kill_9_mid_multipart(true);
}

fn kill_9_mid_multipart(tls: bool) {
    let (s3, proxy, setup, bytes, _front) = slow_setup_with("crash", 1, tls);
    let mut agent = setup.spawn_daemon(bin());
    let reached = wait_until(Duration::from_secs(60), || {
        setup.journal_parts(KEY).len() >= 2
    });
    assert!(reached, "the upload never got going");
    // The next part is now in the proxy's 250 ms delay: the kill lands with a part in flight.
    std::thread::sleep(Duration::from_millis(100));
    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    // The part in flight at the kill may still sit in the proxy's delay: count it as sent before.
    assert!(
        proxy.wait_idle(Duration::from_secs(10)),
        "proxy never let go of the dead agent"
    );
    let recorded = setup.journal_parts(KEY);
    let sent_before = proxy.parts_sent().len();
    assert!(recorded.len() >= 2 && recorded.len() < 6, "{recorded:?}");
    assert!(
        s3.object("crash", KEY).is_none(),
        "must not be complete yet"
    );

    proxy.delay_ms.store(0, Ordering::Relaxed);
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stored = s3.object("crash", KEY).expect("object after restart");
    assert_eq!(
        sha256(&stored),
        sha256(&bytes),
        "object must be byte-identical"
    );
    let sent_after: Vec<u32> = proxy.parts_sent()[sent_before..].to_vec();
    for p in &recorded {
        assert!(
            !sent_after.contains(p),
            "part {p} was recorded before the crash but sent again: {sent_after:?}"
        );
    }
    // Only the missing parts, plus at most the one part in flight at the kill, went out again.
    assert!(
        sent_after.len() <= 6 - recorded.len(),
        "re-sent too much: {sent_after:?} after {recorded:?}"
    );
    let total = proxy.parts_sent().len();
    assert!(
        total <= 6 + 1,
        "parts in flight x 1 crash bounds re-sending; sent {total}"
    );
    assert_eq!(s3.open_uploads(), 0, "no multipart upload may be left open");
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 1)]);
    let sums = s3.checksums("crash", KEY).expect("checksums");
    assert_eq!(sums["checksum_crc64nvme"], crc64nvme_b64(&bytes), "{sums}");
    if tls {
        assert!(proxy
            .seen()
            .iter()
            .filter(|r| r.op() == "UploadPart")
            .all(|r| r.header("x-amz-content-sha256") == Some("UNSIGNED-PAYLOAD")));
    }
}

#[test]
fn sigterm_finishes_parts_in_flight_and_restart_resends_nothing() {
    let (s3, proxy, setup, bytes) = slow_setup("graceful", 2);
    let mut agent = setup.spawn_daemon(bin());
    let reached = wait_until(Duration::from_secs(60), || {
        setup.journal_parts(KEY).len() >= 2
    });
    assert!(reached, "the upload never got going");
    sigterm(&agent);
    let st = wait_within(&mut agent, Duration::from_secs(30));
    assert!(st.success(), "SIGTERM must exit 0: {st:?}");
    let recorded = setup.journal_parts(KEY);
    let sent = proxy.parts_sent();
    let mut sent_sorted = sent;
    sent_sorted.sort();
    assert_eq!(
        sent_sorted, recorded,
        "every part sent before SIGTERM must have finished and been recorded"
    );
    assert!(
        recorded.len() < 6,
        "the test must interrupt the upload: {recorded:?}"
    );

    proxy.delay_ms.store(0, Ordering::Relaxed);
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(sha256(&s3.object("graceful", KEY).unwrap()), sha256(&bytes));
    let mut all = proxy.parts_sent();
    all.sort();
    assert_eq!(
        all,
        vec![1, 2, 3, 4, 5, 6],
        "zero parts re-sent after a graceful stop"
    );
    assert_eq!(s3.open_uploads(), 0);
}

#[test]
fn kill_9_after_completion_verifies_the_object_instead_of_sending_it_again() {
    let (s3, proxy, setup, bytes) = slow_setup("completed", 2);
    // The server completes the upload; the agent never hears back and is killed waiting.
    proxy.add_rule(Rule::new(
        "CompleteMultipartUpload",
        Fault::ForwardThenHold,
        1,
    ));
    let mut agent = setup.spawn_daemon(bin());
    let completed = wait_until(Duration::from_secs(60), || {
        s3.object("completed", KEY).is_some()
    });
    assert!(completed, "the upload never completed");
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(
        proxy.wait_idle(Duration::from_secs(10)),
        "proxy never let go of the dead agent"
    );
    assert_eq!(setup.journal_counts(), vec![("completing".to_string(), 1)]);
    let seen_before = proxy.seen().len();

    // s3s-fs reports no checksum for a multipart object; AWS reports the composite one.
    let composite: &'static str = Box::leak(composite_sha256(&bytes, 5 * MIB).into_boxed_str());
    proxy.add_rule(Rule::new(
        "HeadObject",
        Fault::RewriteHeader {
            name: "x-amz-checksum-sha256",
            value: Some(composite),
        },
        1,
    ));
    proxy.delay_ms.store(0, Ordering::Relaxed);
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("upload had completed before the restart; verified"),
        "{err}"
    );
    let after: Vec<&'static str> = proxy.seen()[seen_before..]
        .iter()
        .map(SeenRequest::op)
        .collect();
    assert!(
        !after
            .iter()
            .any(|op| op.starts_with("Put") || *op == "UploadPart"),
        "a completed upload was sent again: {after:?}"
    );
    assert_eq!(
        sha256(&s3.object("completed", KEY).unwrap()),
        sha256(&bytes)
    );
    assert_eq!(setup.journal_counts(), vec![("done".to_string(), 1)]);
    assert_eq!(s3.open_uploads(), 0);
}

#[test]
fn upload_gone_from_server_starts_that_object_over_cleanly() {
    let (s3, proxy, setup, bytes) = slow_setup("vanish", 1);
    let mut agent = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(60), || !setup
        .journal_parts(KEY)
        .is_empty()));
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The server loses the upload (as after AbortMultipartUpload by a lifecycle rule).
    for e in std::fs::read_dir(s3.data.path()).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(".upload") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    proxy.delay_ms.store(0, Ordering::Relaxed);
    let out = setup.run_once(bin());
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("starting this object over"), "{err}");
    assert_eq!(sha256(&s3.object("vanish", KEY).unwrap()), sha256(&bytes));
    assert_eq!(s3.open_uploads(), 0);
}
