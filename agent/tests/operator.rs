//! End-to-end: what an operator sees and controls, against a real S3 server (s3s-fs): the
//! Prometheus endpoint during and after a real transfer (checked by `promtool`), `/readyz` while
//! the destination refuses us, and the bandwidth limit.

use std::path::Path;
use std::time::{Duration, Instant};

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// Objects done, as `status --json` says (0 before the journal exists).
fn done(setup: &Setup) -> i64 {
    let cfg = setup.config_path();
    let out = output_within(
        setup.command(bin(), &["status", "-c", cfg.to_str().unwrap(), "--json"]),
        Duration::from_secs(30),
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["objects"]["done"].as_i64())
        .unwrap_or(0)
}

/// Scrapes `/metrics` in the classic format, checked by promtool.
fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics", None).expect("scrape");
    assert_eq!(status, 200, "{body}");
    if let Err(e) = promtool_check(&body) {
        panic!("promtool check metrics: {e}\n{body}");
    }
    body
}

#[test]
fn metrics_count_what_was_delivered_during_and_after_a_transfer() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let small = setup.write_files("small", 3, 10, 100_000);
    let big = data(7, 12 * MIB);
    write_settled(&setup.src().join("big.ndjson"), &big);
    let proxy = Proxy::start(s3.port);
    let port = free_port();
    // 4 MB/s: the big file takes about 3 s, long enough to be seen in flight.
    setup.write_config(
        &proxy.endpoint(),
        &format!("metrics = \"127.0.0.1:{port}\"\nbandwidth = \"4MB\"\nname = \"edge-m\""),
        "settle = \"1s\"",
    );
    let mut child = setup.spawn_daemon(bin());
    let delivered = "ha_edge_objects_total{source=\"exports\",outcome=\"delivered\"}";
    // During: the small files are in, the big one still waits.
    let mut during = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            during = http_get(port, "/metrics", None)
                .map(|r| r.1)
                .unwrap_or_default();
            metric(&during, delivered) == Some(3.0)
                && metric(&during, "ha_edge_pending_objects{source=\"exports\"}") == Some(1.0)
        }),
        "small files not delivered: {during}\n{}",
        setup.daemon_log()
    );
    if let Err(e) = promtool_check(&during) {
        panic!("promtool check metrics: {e}\n{during}");
    }
    let pending =
        |m: &str, what: &str| metric(m, &format!("ha_edge_pending_{what}{{source=\"exports\"}}"));
    // What was sent plus what waits is every byte; what waits is the big file.
    let total: usize = small.iter().map(|(_, b)| b.len()).sum::<usize>() + big.len();
    let sent = metric(&during, "ha_edge_bytes_sent_total{source=\"exports\"}");
    assert_eq!(sent, Some((total - big.len()) as f64), "{during}");
    assert_eq!(
        pending(&during, "bytes"),
        Some(big.len() as f64),
        "{during}"
    );
    let age = metric(
        &during,
        "ha_edge_oldest_pending_age_seconds{source=\"exports\"}",
    );
    assert!(age.is_some_and(|a| a > 0.0), "{during}");
    assert_eq!(
        metric(&during, "ha_edge_bandwidth_limit_bytes_per_second"),
        Some(4_000_000.0)
    );
    assert_eq!(metric(&during, "ha_edge_destination_up"), Some(1.0));
    assert_eq!(
        metric(&during, "ha_edge_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );
    // After: every counter equals what the journal says was delivered.
    assert!(
        wait_until(Duration::from_secs(60), || done(&setup) == 4),
        "{}",
        setup.daemon_log()
    );
    let after = scrape(port);
    assert_eq!(metric(&after, delivered), Some(4.0), "{after}");
    assert_eq!(
        metric(&after, "ha_edge_bytes_sent_total{source=\"exports\"}"),
        Some(total as f64)
    );
    assert_eq!(pending(&after, "objects"), Some(0.0));
    assert_eq!(pending(&after, "bytes"), Some(0.0));
    for outcome in ["failed", "refused", "quarantined", "conflict"] {
        let s = format!("ha_edge_objects_total{{source=\"exports\",outcome=\"{outcome}\"}}");
        assert_eq!(metric(&after, &s), Some(0.0), "{s}");
    }
    let put_retries =
        |m: &str| metric(m, "ha_edge_request_retries_total{op=\"PutObject\"}").unwrap_or(0.0);
    let retries_before = put_retries(&after); // Every request is timed: 3 single PUTs at least, and the journal's commits.
    let puts = metric(
        &after,
        "ha_edge_request_duration_seconds_count{op=\"PutObject\"}",
    );
    assert!(puts.is_some_and(|n| n >= 3.0), "{after}");
    assert!(metric(&after, "ha_edge_journal_commit_seconds_count").is_some_and(|n| n > 0.0));
    // No key or path in any label.
    assert!(
        !after.contains("small0") && !after.contains("big.ndjson"),
        "{after}"
    );
    // Two answers 503 SlowDown to the next file: each is retried, and counted.
    proxy.add_rule(Rule::new(
        "PutObject",
        Fault::Status {
            status: 503,
            code: "SlowDown",
            retry_after: None,
        },
        2,
    ));
    write_settled(&setup.src().join("late.ndjson"), &data(77, 5000));
    assert!(
        wait_until(Duration::from_secs(60), || done(&setup) == 5),
        "{}",
        setup.daemon_log()
    );
    let after = scrape(port);
    assert_eq!(metric(&after, delivered), Some(5.0), "{after}");
    assert_eq!(put_retries(&after), retries_before + 2.0, "{after}");
    // OpenMetrics for a scraper that asks for it, health and readiness.
    let (status, om) = http_get(
        port,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    )
    .unwrap();
    assert_eq!(status, 200);
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert_eq!(http_get(port, "/healthz", None).unwrap().0, 200);
    assert_eq!(http_get(port, "/readyz", None).unwrap().0, 200);
    sigterm(&child);
    assert!(wait_within(&mut child, Duration::from_secs(20)).success());
}

#[test]
fn readyz_says_not_ready_while_the_destination_refuses() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let proxy = Proxy::start(s3.port);
    // A key the destination does not know: every request of this agent is refused.
    proxy.add_rule(Rule::new(
        "PutObject",
        Fault::Status {
            status: 403,
            code: "InvalidAccessKeyId",
            retry_after: None,
        },
        1000,
    ));
    let setup = Setup::new("exports");
    setup.write_files("a", 1, 1, 1000);
    let port = free_port();
    setup.write_config(
        &proxy.endpoint(),
        &format!("metrics = \"127.0.0.1:{port}\""),
        "settle = \"1s\"",
    );
    let mut child = setup.spawn_daemon(bin());
    let mut last = (0, String::new());
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = http_get(port, "/readyz", None).unwrap_or_default();
            last.0 == 503
        }),
        "{last:?}\n{}",
        setup.daemon_log()
    );
    assert!(last.1.contains("refuses"), "{last:?}");
    assert!(!last.1.contains(ACCESS_KEY) && !last.1.contains(SECRET_KEY));
    assert_eq!(
        http_get(port, "/healthz", None).unwrap().0,
        200,
        "alive all the same"
    );
    let m = scrape(port);
    assert_eq!(metric(&m, "ha_edge_destination_up"), Some(0.0), "{m}");
    sigterm(&child);
    assert!(wait_within(&mut child, Duration::from_secs(20)).success());
}

#[test]
fn the_bandwidth_limit_holds_the_transfer_to_its_rate() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let bytes = data(3, 12 * MIB);
    write_settled(&setup.src().join("big.ndjson"), &bytes);
    setup.write_files("s", 4, 20, 500_000);
    let total = 12 * MIB + 4 * 500_000;
    // 3 MiB/s over multipart (5 MiB parts) and single PUTs at once: about 4.7 s.
    setup.write_config(
        &s3.endpoint(),
        "bandwidth = \"3MiB\"\npart_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"",
        "settle = \"1s\"",
    );
    let started = Instant::now();
    let out = setup.run_once(bin());
    let took = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Without a terminal: no bars (no escape sequences), just log lines.
    let err = stderr_of(&out);
    assert!(
        !err.contains('\x1b') && !err.contains("objects 0/"),
        "{err}"
    );
    let expected = total as f64 / (3.0 * MIB as f64);
    // Loose bounds for a shared CI machine; bench/bandwidth.sh measures ±5 % over 60 s.
    assert!(
        took >= expected * 0.9 && took <= expected * 1.5 + 1.0,
        "took {took:.2} s for {total} bytes at 3 MiB/s (expected {expected:.2} s)"
    );
    assert_eq!(
        s3.object("exports", "fhir/big.ndjson").map(|b| sha256(&b)),
        Some(sha256(&bytes))
    );
}

#[test]
fn objects_carry_storage_class_tags_and_a_content_type_by_extension() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("exports");
    let src = setup.src();
    for (name, len) in [
        ("Patient.ndjson", 100),
        ("manifest.json", 100),
        ("img/1.dcm", 100),
        ("notes.txt", 100),
        ("blob.bin", 100),
        ("big.NDJSON", 9 * MIB),
    ] {
        write_settled(&src.join(name), &data(len as u64, len));
    }
    let destination = format!(
        "{}storage_class = \"REDUCED_REDUNDANCY\"\ntags = {{ site = \"dkfz\", source = \"{{source}}\" }}\n\
         content_types = {{ \".txt\" = \"text/plain\" }}\n",
        setup.destination_toml(&proxy.endpoint())
    );
    setup.write_config_with(
        &destination,
        "part_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"",
        "settle = \"1s\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    for (key, ty) in [
        ("fhir/Patient.ndjson", "application/fhir+ndjson"),
        ("fhir/manifest.json", "application/json"),
        ("fhir/img/1.dcm", "application/dicom"),
        ("fhir/notes.txt", "text/plain"),
        ("fhir/blob.bin", "application/octet-stream"),
        ("fhir/big.NDJSON", "application/fhir+ndjson"),
    ] {
        let meta = s3
            .metadata("exports", key)
            .unwrap_or_else(|| panic!("{key}"));
        assert_eq!(meta["content_type"], ty, "{key}");
    }
    // Every write of an object (single PUT, CreateMultipartUpload) carries the class and tags
    // (s3s-fs takes only STANDARD and REDUCED_REDUNDANCY; S3 takes every class).
    let writes: Vec<SeenRequest> = proxy
        .seen()
        .into_iter()
        .filter(|r| !r.is_probe() && matches!(r.op(), "PutObject" | "CreateMultipartUpload"))
        .collect();
    assert_eq!(writes.len(), 6, "{writes:?}");
    for w in &writes {
        assert_eq!(
            w.header("x-amz-storage-class"),
            Some("REDUCED_REDUNDANCY"),
            "{}",
            w.target
        );
        assert_eq!(
            w.header("x-amz-tagging"),
            Some("site=dkfz&source=exports"),
            "{}",
            w.target
        );
    }
}

/// `status --objects [--state] [--json] [--limit]` as JSON.
fn objects_json(setup: &Setup, args: &[&str]) -> Vec<serde_json::Value> {
    let cfg = setup.config_path();
    let mut all = vec!["status", "-c", cfg.to_str().unwrap(), "--objects", "--json"];
    all.extend_from_slice(args);
    let out = output_within(setup.command(bin(), &all), Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn status_lists_objects_by_state_and_shows_files_settling() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let proxy = Proxy::start(s3.port);
    proxy.add_rule(
        Rule::new(
            "PutObject",
            Fault::Status {
                status: 400,
                code: "EntityTooLarge",
                retry_after: None,
            },
            100,
        )
        .on_target("fhir/bad"),
    );
    let setup = Setup::new("exports");
    setup.write_files("good", 2, 1, 1000);
    write_settled(&setup.src().join("bad.ndjson"), &data(9, 1000));
    write_settled(&setup.src().join("bad2.ndjson"), &data(8, 1000));
    setup.write_config(&proxy.endpoint(), "", "settle = \"30s\"");
    let mut child = setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(30), || done(&setup) == 2
            && objects_json(&setup, &["--state", "refused"]).len() == 2),
        "{}",
        setup.daemon_log()
    );
    // A file written now settles in 30 s: status says so.
    std::fs::write(setup.src().join("fresh.ndjson"), b"{}").unwrap();
    let mut st = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            st = setup.status_json(bin());
            st["settling"][0]["count"] == 1
        }),
        "{st}"
    );
    assert_eq!(st["settling"][0]["source"], "exports");
    let cfg = setup.config_path();
    let text = output_within(
        setup.command(bin(), &["status", "-c", cfg.to_str().unwrap()]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("settling 1 (oldest "), "{text}");

    // Every object not finished: the rejected ones, with why.
    let open = objects_json(&setup, &[]);
    assert_eq!(open.len(), 2, "{open:?}");
    let mut keys: Vec<&str> = open.iter().map(|o| o["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["fhir/bad.ndjson", "fhir/bad2.ndjson"]);
    for o in &open {
        assert_eq!(o["state"], "rejected");
        assert_eq!(o["size"], 1000);
        assert!(o["last_error"].as_str().unwrap().contains("EntityTooLarge"));
    }
    assert_eq!(objects_json(&setup, &["--state", "refused"]).len(), 2);
    assert!(objects_json(&setup, &["--state", "pending"]).is_empty());
    assert!(objects_json(&setup, &["--state", "conflict"]).is_empty());
    sigterm(&child);
    assert!(wait_within(&mut child, Duration::from_secs(20)).success());
    // Bounded: --limit.
    let text = output_within(
        setup.command(
            bin(),
            &[
                "status",
                "-c",
                cfg.to_str().unwrap(),
                "--objects",
                "--limit",
                "1",
            ],
        ),
        Duration::from_secs(30),
    );
    let lines: Vec<String> = String::from_utf8_lossy(&text.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 2, "a header and one object: {lines:?}");
    assert!(lines[0].starts_with("STATE"), "{lines:?}");
}

#[test]
fn dry_run_lists_what_would_go_and_changes_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("exports");
    setup.write_files("a", 2, 1, 1000);
    // Delete after upload: a dry run must not delete anything either.
    setup.write_config(
        &proxy.endpoint(),
        "",
        "settle = \"1s\"\nafter_upload = \"delete\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Now: one file changed, one new; nothing else.
    write_settled(&setup.src().join("a0.ndjson"), &data(5, 1500));
    write_settled(&setup.src().join("new.ndjson"), &data(6, 700));
    std::fs::write(setup.src().join("fresh.ndjson"), b"{}").unwrap();
    let journal_before = std::fs::read(setup.journal()).unwrap();
    let rows_before = setup.journal_column("SELECT id || ' ' || state || ' ' || size FROM objects");
    let requests_before = proxy.seen().len();
    let keys_before = s3.keys("exports");

    let cfg = setup.config_path();
    let out = output_within(
        setup.command(
            bin(),
            &["run", "-c", cfg.to_str().unwrap(), "--once", "--dry-run"],
        ),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            vec!["changed", "1500", "fhir/a0.ndjson"],
            vec!["new", "700", "fhir/new.ndjson"],
        ],
        "{stdout}"
    );
    assert!(stderr_of(&out).contains(
        "dry run: 2 objects (2200 bytes) would be sent, 0 would be quarantined, 1 not yet settled"
    ));
    // Nothing sent, nothing changed: no request, the same objects, the journal byte for byte,
    // the source files all there.
    assert_eq!(
        proxy.seen().len(),
        requests_before,
        "{:?}",
        &proxy.seen()[requests_before..]
    );
    assert_eq!(s3.keys("exports"), keys_before);
    assert_eq!(std::fs::read(setup.journal()).unwrap(), journal_before);
    assert_eq!(
        setup.journal_column("SELECT id || ' ' || state || ' ' || size FROM objects"),
        rows_before
    );
    for f in ["a0.ndjson", "new.ndjson", "fresh.ndjson"] {
        assert!(setup.src().join(f).exists(), "{f}");
    }
    // And the real run then sends exactly what the dry run listed.
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("2 delivered"),
        "{}",
        stderr_of(&out)
    );
}

/// A tmux server of this test's own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a detached 120x30 session.
    fn start(command: &str) -> Tmux {
        let socket = format!("ha-edge-test-{}-{}", std::process::id(), free_port());
        let ok = std::process::Command::new("tmux")
            .args([
                "-L",
                &socket,
                "new-session",
                "-d",
                "-x",
                "120",
                "-y",
                "30",
                command,
            ])
            .status()
            .expect("tmux (scripts/test.sh installs it)")
            .success();
        assert!(ok, "tmux new-session");
        Tmux { socket }
    }

    /// What the screen shows now.
    fn screen(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

#[test]
fn run_once_on_a_terminal_shows_live_progress() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    write_settled(&setup.src().join("imaging/big.ndjson"), &data(1, 20 * MIB));
    setup.write_files("small", 2, 5, 2000);
    // 4 MiB/s: about 5 s, time enough to look at the screen mid-way.
    setup.write_config(
        &s3.endpoint(),
        "bandwidth = \"4MiB\"\npart_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"",
        "settle = \"1s\"",
    );
    let command = format!(
        "env AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY} RUST_LOG=warn \
         {BIN} run --once -c {}; echo exit=$?; sleep 120",
        setup.config_path().display()
    );
    let tmux = Tmux::start(&command);
    // Mid-way: the run's bar (objects done of all, bytes, rate, ETA) and the large object's own.
    let mut screen = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            screen = tmux.screen();
            screen.contains("fhir/imaging/big.ndjson") && screen.contains("objects 2/3")
        }),
        "{screen}"
    );
    let run_line = screen
        .lines()
        .find(|l| l.starts_with("objects 2/3"))
        .unwrap_or_default();
    assert!(
        run_line.contains("B/s") && run_line.contains("ETA"),
        "{screen}"
    );
    assert!(run_line.contains("/20.00 MiB"), "bytes of all: {screen}");
    let object_line = screen
        .lines()
        .find(|l| l.contains("fhir/imaging/big.ndjson"))
        .unwrap_or_default();
    assert!(object_line.contains("/20.00 MiB"), "{screen}");
    // The end: the run's bar full, the large object's bar gone, the summary, exit 0.
    assert!(
        wait_until(Duration::from_secs(60), || {
            screen = tmux.screen();
            screen.contains("exit=")
        }),
        "{screen}"
    );
    assert!(screen.contains("objects 3/3"), "{screen}");
    assert!(!screen.contains("fhir/imaging/big.ndjson ["), "{screen}");
    assert!(screen.contains("3 delivered"), "{screen}");
    assert!(screen.contains("exit=0"), "{screen}");
}

#[test]
fn a_small_export_of_a_higher_priority_source_overtakes_an_imaging_backlog() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let imaging = setup.dir.path().join("imaging");
    for i in 0..6 {
        write_settled(&imaging.join(format!("series-{i}.dcm")), &data(i, 4 * MIB));
    }
    // One object at a time at 8 MiB/s: each imaging file takes about half a second.
    let text = format!(
        "[agent]\njournal = \"{journal}\"\nconcurrency = 1\nbandwidth = \"8MiB\"\n\n\
         [[source]]\nname = \"imaging\"\ntype = \"fs\"\npath = \"{imaging}\"\nsettle = \"1s\"\n\
         key_prefix = \"imaging/\"\npriority = 0\n\n\
         [[source]]\nname = \"fhir\"\ntype = \"fs\"\npath = \"{fhir}\"\nsettle = \"1s\"\n\
         key_prefix = \"fhir-export/\"\npriority = 10\n\n{dest}",
        journal = setup.journal().display(),
        imaging = imaging.display(),
        fhir = setup.src().display(),
        dest = setup.destination_toml(&s3.endpoint()),
    );
    std::fs::write(setup.config_path(), text).unwrap();
    let mut child = setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(30), || done(&setup) >= 1),
        "{}",
        setup.daemon_log()
    );
    // The backlog is under way; now a small FHIR export arrives.
    write_settled(&setup.src().join("Patient.ndjson"), &data(99, 2000));
    assert!(
        wait_until(Duration::from_secs(60), || done(&setup) == 7),
        "{}",
        setup.daemon_log()
    );
    sigterm(&child);
    assert!(wait_within(&mut child, Duration::from_secs(20)).success());
    // Delivered as the next object: after it went, imaging files were still waiting.
    let order = setup.journal_column("SELECT key FROM objects ORDER BY delivered_ms, id");
    let at = order
        .iter()
        .position(|k| k == "fhir/fhir-export/Patient.ndjson")
        .unwrap();
    // Written once one imaging file was done and one in flight: it goes next (a third
    // imaging file may have been dispatched in the instant before it was seen).
    assert!(at <= 3, "the FHIR file went as number {at}: {order:?}");
    assert!(
        order.len() == 7 && order[at + 1..].iter().all(|k| k.contains("imaging/")),
        "{order:?}"
    );
}

/// The alert rules the README offers are valid Prometheus rules.
#[test]
fn the_alert_rules_pass_promtool() {
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus/ha-edge.rules.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 4 rules found"));
}
