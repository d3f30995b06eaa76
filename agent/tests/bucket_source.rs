//! Bucket sources (`type = "s3"`): a second real S3-compatible server on 127.0.0.1 plays the
//! institution's MinIO. Objects (one large enough for multipart) are transferred and verified by
//! SHA-256, sent once, sent again when changed, resumed after kill -9 by re-reading only the
//! missing ranges, aborted and re-sent whole when replaced mid-transfer, and moved or deleted
//! at the source only after delivery.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;
const SMALL_PARTS: &str = "part_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"";

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Ranged or whole-object reads of the source objects (not listings, not HEADs).
fn object_reads(proxy: &Proxy) -> Vec<SeenRequest> {
    proxy
        .seen()
        .into_iter()
        .filter(|r| r.op() == "Get" && !r.target.contains("list-type"))
        .collect()
}

struct Pair {
    onprem: S3Server,
    cloud: S3Server,
    /// In front of the on-premise server: counts what ha-edge reads there.
    src_proxy: Proxy,
    setup: Setup,
}

impl Pair {
    /// Puts a proxy answering `delay_ms` late in front of the destination (so a kill or a
    /// change lands between parts) and points the config at it.
    fn slow_destination(&self, delay_ms: u64) -> Proxy {
        let proxy = Proxy::start(self.cloud.port);
        proxy.delay_ms.store(delay_ms, Ordering::Relaxed);
        let cfg = std::fs::read_to_string(self.setup.config_path()).unwrap();
        std::fs::write(
            self.setup.config_path(),
            cfg.replace(&self.cloud.endpoint(), &proxy.endpoint()),
        )
        .unwrap();
        proxy
    }
}

fn pair(agent_extra: &str, source_extra: &str) -> Pair {
    let onprem = S3Server::start();
    onprem.create_bucket("onprem");
    let cloud = S3Server::start();
    cloud.create_bucket("cloud");
    let src_proxy = Proxy::start(onprem.port);
    let setup = Setup::new("cloud");
    setup.write_bucket_config(
        &cloud.endpoint(),
        &src_proxy.endpoint(),
        "onprem",
        agent_extra,
        source_extra,
    );
    Pair {
        onprem,
        cloud,
        src_proxy,
        setup,
    }
}

#[test]
fn bucket_objects_are_sent_once_verified_and_again_when_changed() {
    let p = pair(SMALL_PARTS, "exclude = [\"*.tmp\"]");
    let objects = [
        ("exports/Patient.ndjson", data(1, 3000)),
        ("exports/2026/11/Observation.ndjson", data(2, 70_000)),
        ("exports/imaging/ct.dcm", data(3, 21 * MIB)), // multipart: 5 parts
    ];
    for (k, v) in &objects {
        p.onprem.put("onprem", k, v);
    }
    p.onprem.put("onprem", "exports/half.tmp", b"excluded");
    p.onprem
        .put("onprem", "elsewhere/x.ndjson", b"outside the prefix");

    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    for (k, v) in &objects {
        let dest = format!("fhir/{}", k.strip_prefix("exports/").unwrap());
        let got = p.cloud.object("cloud", &dest).unwrap_or_default();
        assert_eq!(sha256(&got), sha256(v), "{dest}");
    }
    assert_eq!(
        p.cloud.keys("cloud").len(),
        3,
        "{:?}",
        p.cloud.keys("cloud")
    );
    assert_eq!(p.cloud.open_uploads(), 0);
    // The large object went up in parts, checked by the server's full-object CRC64NVME; its
    // SHA-256 is in the journal.
    let sums = p.cloud.checksums("cloud", "fhir/imaging/ct.dcm").unwrap();
    assert_eq!(
        sums["checksum_crc64nvme"],
        crc64nvme_b64(&objects[2].1),
        "{sums}"
    );
    assert_eq!(
        p.setup.journal_sha256("fhir/imaging/ct.dcm").as_deref(),
        Some(sha256(&objects[2].1).as_str())
    );
    // Every object is read once: one GET each (the large one pinned with If-Match), and the
    // bytes read from the source are exactly the objects' bytes.
    let reads = object_reads(&p.src_proxy);
    let ct_reads: Vec<_> = reads
        .iter()
        .filter(|r| r.target.contains("ct.dcm"))
        .collect();
    assert_eq!(ct_reads.len(), 1, "one GET for the multipart object");
    assert!(
        ct_reads[0].header("if-match").is_some(),
        "pinned to its ETag"
    );
    assert_eq!(reads.len(), objects.len(), "one GET per object");
    let total: usize = objects.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(
        p.src_proxy.object_bytes.load(Ordering::Relaxed),
        total as u64,
        "each source byte read once"
    );

    // A restart lists again and sends nothing, reading no object.
    let before = object_reads(&p.src_proxy).len();
    let rows = p.setup.journal_counts();
    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(p.setup.journal_counts(), rows, "nothing new in the journal");
    assert_eq!(object_reads(&p.src_proxy).len(), before);

    // A changed object is a new version: sent again, and only it.
    p.onprem.put(
        "onprem",
        "exports/Patient.ndjson",
        b"{\"resourceType\":\"Patient\"}\n",
    );
    let done = |s: &Setup| {
        s.journal_counts()
            .iter()
            .find(|(st, _)| st == "done")
            .map_or(0, |c| c.1)
    };
    let before = done(&p.setup);
    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(done(&p.setup), before + 1, "one new version delivered");
    assert_eq!(
        p.cloud.object("cloud", "fhir/Patient.ndjson").unwrap(),
        b"{\"resourceType\":\"Patient\"}\n"
    );
}

#[test]
fn kill_mid_transfer_resumes_without_sending_a_recorded_part_again() {
    let p = pair(
        &format!("{SMALL_PARTS}\nparts_in_flight = 2"),
        "poll_interval = \"1h\"",
    );
    // The destination answers slowly, so the kill lands between parts.
    let dest_proxy = p.slow_destination(300);
    let big = data(7, 40 * MIB); // 8 parts of 5 MiB
    p.onprem.put("onprem", "exports/study/series.dcm", &big);
    let key = "fhir/study/series.dcm";

    let mut daemon = p.setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(60), || p.setup.journal_parts(key).len()
            >= 3),
        "{}",
        p.setup.daemon_log()
    );
    let _ = daemon.kill(); // SIGKILL
    let _ = daemon.wait();
    let journaled = p.setup.journal_parts(key);
    let recorded = journaled.len();
    assert!(recorded < 8, "killed too late: {recorded} parts");
    dest_proxy.delay_ms.store(0, Ordering::Relaxed);
    assert!(
        p.src_proxy.wait_idle(Duration::from_secs(10)),
        "source proxy never let go"
    );
    assert!(dest_proxy.wait_idle(Duration::from_secs(10)));

    let reads_before = object_reads(&p.src_proxy).len();
    let sent_before = dest_proxy.parts_sent();
    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let reread = object_reads(&p.src_proxy).len() - reads_before;
    assert_eq!(
        reread, 1,
        "the resumed transfer reads the object once more, in one GET"
    );
    assert!(stderr_of(&out).contains("resuming multipart upload"));
    // Parts the journal recorded before the kill are not sent again; of the rest, each once.
    let resent: Vec<u32> = dest_proxy.parts_sent()[sent_before.len()..].to_vec();
    let mut want: Vec<u32> = (1..=8).filter(|n| !journaled.contains(n)).collect();
    let mut got = resent.clone();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "sent after the restart: {resent:?}, journaled before: {journaled:?}"
    );
    // At most the parts in flight at the kill (2) were sent before it but not journaled.
    let before_kill: std::collections::BTreeSet<u32> = sent_before.iter().copied().collect();
    let twice = got.iter().filter(|n| before_kill.contains(n)).count();
    assert!(twice <= 2, "parts sent twice: {twice} (in flight: 2)");
    assert_eq!(sha256(&p.cloud.object("cloud", key).unwrap()), sha256(&big));
    assert_eq!(p.cloud.open_uploads(), 0);
}

#[test]
fn a_source_object_replaced_mid_transfer_is_aborted_and_sent_whole_in_its_new_version() {
    let p = pair(
        &format!("{SMALL_PARTS}\nparts_in_flight = 1"),
        "poll_interval = \"1s\"",
    );
    let dest_proxy = p.slow_destination(400);
    let key = "fhir/scan.dcm";
    let old = data(11, 30 * MIB);
    let new = data(12, 25 * MIB);
    p.onprem.put("onprem", "exports/scan.dcm", &old);

    let mut daemon = p.setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(60), || !p
            .setup
            .journal_parts(key)
            .is_empty()),
        "{}",
        p.setup.daemon_log()
    );
    p.onprem.put("onprem", "exports/scan.dcm", &new);
    dest_proxy.delay_ms.store(0, Ordering::Relaxed);
    let arrived = wait_until(Duration::from_secs(60), || {
        p.cloud
            .object("cloud", key)
            .is_some_and(|b| b.len() == new.len())
            && p.setup.journal_keys("state = 'done'").len() == 1
    });
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    let log = p.setup.daemon_log();
    assert!(arrived, "{log}");
    assert_eq!(sha256(&p.cloud.object("cloud", key).unwrap()), sha256(&new));
    assert!(log.contains("changed during the upload"), "{log}");
    assert_eq!(
        p.cloud.open_uploads(),
        0,
        "the old version's upload is aborted"
    );
    // Only whole versions were ever completed: the old one never was.
    let completes = dest_proxy.count("CompleteMultipartUpload");
    assert_eq!(completes, 1);
}

#[test]
fn after_upload_moves_or_deletes_source_objects_only_once_delivered() {
    let p = pair("", "after_upload = { move_to_prefix = \"processed/\" }");
    let objects = [
        ("exports/a.ndjson", data(21, 1000)),
        ("exports/sub/b.ndjson", data(22, 2000)),
    ];
    for (k, v) in &objects {
        p.onprem.put("onprem", k, v);
    }
    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    for (k, v) in &objects {
        let rest = k.strip_prefix("exports/").unwrap();
        assert_eq!(
            p.cloud.object("cloud", &format!("fhir/{rest}")).as_ref(),
            Some(v)
        );
        assert_eq!(p.onprem.object("onprem", k), None, "{k} moved away");
        assert_eq!(
            p.onprem
                .object("onprem", &format!("processed/{rest}"))
                .as_ref(),
            Some(v),
            "{k} kept under processed/"
        );
    }
    assert_eq!(p.setup.journal_keys("state = 'done'").len(), 2);

    // after_upload = "delete"
    let cfg = std::fs::read_to_string(p.setup.config_path()).unwrap();
    std::fs::write(
        p.setup.config_path(),
        cfg.replace(
            "after_upload = { move_to_prefix = \"processed/\" }",
            "after_upload = \"delete\"",
        ),
    )
    .unwrap();
    p.onprem.put("onprem", "exports/c.ndjson", b"third");
    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("ha-edge: 1 delivered"));
    assert_eq!(
        p.cloud.object("cloud", "fhir/c.ndjson").as_deref(),
        Some(&b"third"[..])
    );
    assert_eq!(p.onprem.object("onprem", "exports/c.ndjson"), None);
}

#[test]
fn wrong_or_missing_source_keys_are_reported_clearly_and_nothing_is_sent() {
    let p = pair("", "");
    p.onprem.put("onprem", "exports/a.ndjson", b"a");
    let cfg = p.setup.config_path();
    let args = ["run", "-c", cfg.to_str().unwrap(), "--once"];

    // Missing keys: a config-class error before any journal exists.
    let cmd = {
        let mut c = p.setup.command(bin(), &args);
        c.env_remove("ONPREM_S3_ACCESS_KEY")
            .env_remove("ONPREM_S3_SECRET_KEY");
        c
    };
    let out = output_within(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("source \"minio\": no keys for the source bucket"),
        "{}",
        stderr_of(&out)
    );
    assert!(!p.setup.journal().exists());

    // Wrong secret: the listing is refused, said once, and the run fails.
    let cmd = {
        let mut c = p.setup.command(bin(), &args);
        c.env("ONPREM_S3_SECRET_KEY", "not-the-secret");
        c
    };
    let out = output_within(cmd, Duration::from_secs(60));
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("cannot list the source bucket").count(),
        1,
        "{err}"
    );
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    assert!(p.cloud.keys("cloud").is_empty());
}

#[test]
fn bucket_notifications_bring_new_objects_before_the_next_listing_and_survive_a_lost_stream() {
    // Listings an hour apart: only a notification can bring an object over in time.
    let p = pair("", "poll_interval = \"1h\"\nnotifications = true");
    let mut daemon = p.setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(20), || p.src_proxy.listen_requests()
            == 1
            && p.setup
                .daemon_log()
                .contains("listening to bucket notifications")),
        "{}",
        p.setup.daemon_log()
    );
    let record = |key: &str| {
        format!(
            r#"{{"Records":[{{"eventVersion":"2.0","eventSource":"minio:s3","eventName":"s3:ObjectCreated:Put","s3":{{"bucket":{{"name":"onprem"}},"object":{{"key":"{}","size":5}}}}}}]}}"#,
            key.replace('/', "%2F")
        )
    };
    p.onprem.put("onprem", "exports/first.ndjson", b"first");
    p.src_proxy.notify(" "); // keep-alive: not an event
    p.src_proxy.notify(&record("exports/first.ndjson"));
    assert!(
        wait_until(Duration::from_secs(5), || p
            .cloud
            .object("cloud", "fhir/first.ndjson")
            .is_some()),
        "{}",
        p.setup.daemon_log()
    );

    // The stream is lost: reported once, opened again, and events work again.
    p.src_proxy.cut_streams();
    assert!(
        wait_until(Duration::from_secs(20), || p.src_proxy.listen_requests()
            >= 2
            && p.setup.daemon_log().contains("stream open again")),
        "{}",
        p.setup.daemon_log()
    );
    p.onprem.put("onprem", "exports/second.ndjson", b"again");
    p.src_proxy.notify(&record("exports/second.ndjson"));
    assert!(
        wait_until(Duration::from_secs(5), || p
            .cloud
            .object("cloud", "fhir/second.ndjson")
            .is_some()),
        "{}",
        p.setup.daemon_log()
    );
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    let log = p.setup.daemon_log();
    assert_eq!(log.matches("notification stream lost").count(), 1, "{log}");
    // One listing at start-up and one per event burst; none from the hourly poll.
    let listings = p
        .src_proxy
        .seen()
        .iter()
        .filter(|r| r.target.contains("list-type=2"))
        .count();
    assert_eq!(listings, 3, "start + one per notification");
}

/// A source GET cut off mid-body (the proxy passes on half the answer and closes): the agent
/// opens the object again from the next byte it needs (a ranged GET, still pinned) within the
/// same attempt, and the object arrives byte-identical.
#[test]
fn a_source_read_cut_short_goes_on_from_the_next_byte() {
    let p = pair(SMALL_PARTS, "");
    let big = data(31, 20 * MIB);
    p.onprem.put("onprem", "exports/cut.dcm", &big);
    p.src_proxy
        .add_rule(Rule::new("Get", Fault::TruncateResponse, 1).on_target("cut.dcm"));
    let out = p.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        sha256(&p.cloud.object("cloud", "fhir/cut.dcm").unwrap()),
        sha256(&big)
    );
    let gets: Vec<SeenRequest> = object_reads(&p.src_proxy)
        .into_iter()
        .filter(|r| r.target.contains("cut.dcm"))
        .collect();
    assert_eq!(gets.len(), 2, "the cut GET and one more");
    let range = gets[1]
        .header("range")
        .expect("the second GET starts where the first ended");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .expect("bytes=N-");
    assert!(from > 0 && from < big.len() as u64, "{range}");
    assert!(gets[1].header("if-match").is_some(), "still pinned");
    assert_eq!(p.src_proxy.faults_injected(), 1);
    assert_eq!(p.cloud.open_uploads(), 0);
}

/// A source object that is gone when the agent reads on after a cut (404 on the second GET):
/// the object counts as vanished and the multipart upload already started is aborted, not left
/// open on the destination.
#[test]
fn a_source_object_gone_mid_read_leaves_no_upload_open() {
    let p = pair(SMALL_PARTS, "");
    p.onprem
        .put("onprem", "exports/gone.dcm", &data(32, 20 * MIB));
    p.src_proxy
        .add_rule(Rule::new("Get", Fault::TruncateResponse, 1).on_target("gone.dcm"));
    p.src_proxy.add_rule(
        Rule::new(
            "Get",
            Fault::Status {
                status: 404,
                code: "NoSuchKey",
                retry_after: None,
            },
            1,
        )
        .on_target("gone.dcm"),
    );
    let out = p.setup.run_once(bin());
    let log = stderr_of(&out);
    let seen: Vec<_> = p
        .src_proxy
        .seen()
        .iter()
        .map(|r| (r.method.clone(), r.target.clone(), r.fault.clone()))
        .collect();
    assert_eq!(p.src_proxy.faults_injected(), 2, "{seen:?}");
    assert_eq!(p.cloud.open_uploads(), 0, "{log}");
    assert!(p.cloud.object("cloud", "fhir/gone.dcm").is_none());
    assert_eq!(
        p.setup.journal_keys("state = 'vanished'"),
        vec!["fhir/gone.dcm".to_string()],
        "{log}"
    );
}
