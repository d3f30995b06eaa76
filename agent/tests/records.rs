//! End-to-end: record checks (FHIR Bulk Data NDJSON and DICOM) with quarantine, and
//! pseudonymised keys with paths withheld from every output, against a real S3 server
//! (s3s-fs) on 127.0.0.1 and the real binary.

use std::collections::BTreeSet;
use std::path::Path;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");

fn bin() -> &'static Path {
    Path::new(BIN)
}

const CHECKS: &str = "validate = [{ include = \"**/*.ndjson\", as = \"fhir-ndjson\" }, { include = \"**/*.dcm\", as = \"dicom\" }]\nmax_line = \"2KiB\"\nsettle = \"30s\"";

fn run_with(setup: &Setup, args: &[&str]) -> (String, Option<i32>) {
    let cfg = setup.config_path();
    let mut all = vec![args[0], "-c", cfg.to_str().unwrap()];
    all.extend_from_slice(&args[1..]);
    let out = output_within(
        setup.command(bin(), &all),
        std::time::Duration::from_secs(60),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr_of(&out),
        out.status.code(),
    )
}

/// Every broken file of the corpus is quarantined with its reason (and moved to
/// quarantine_dir), every valid one delivered, the manifest whose files are quarantined held
/// back while the complete export's manifest goes; `--once` says so in its exit code; a fixed
/// file is checked again and sent.
#[test]
fn each_invalid_record_file_is_quarantined_with_its_reason_and_valid_ones_are_delivered() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let bad = corpus::write(&setup.src());
    let qdir = setup.dir.path().join("quarantine");
    setup.write_config(
        &s3.endpoint(),
        "",
        &format!("{CHECKS}\nquarantine_dir = \"{}\"", qdir.display()),
    );
    let out = setup.run_once(bin());
    let log = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("{} quarantined", bad.len())), "{log}");

    let keys: BTreeSet<String> = s3.keys("exports").into_iter().collect();
    let want: BTreeSet<String> = [
        "fhir/export1/patients.ndjson",
        "fhir/export1/observations.ndjson",
        "fhir/export2/p.ndjson",
        "fhir/export2/manifest.json",
        "fhir/dicom/ok.dcm",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(keys, want, "{log}");

    // Each quarantined file: its reason in status, moved out of the source.
    let (text, code) = run_with(
        &setup,
        &["status", "--objects", "--state", "quarantined", "--json"],
    );
    assert_eq!(code, Some(0), "{text}");
    let items: Vec<serde_json::Value> = serde_json::from_str(text.trim_end_matches(|c| c != ']'))
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(items.len(), bad.len(), "{text}");
    for (rel, reason) in &bad {
        let item = items
            .iter()
            .find(|i| i["path"] == rel.as_str())
            .unwrap_or_else(|| panic!("{rel} not quarantined: {text}"));
        let err = item["last_error"].as_str().unwrap();
        assert!(err.contains(reason), "{rel}: {err:?} should say {reason:?}");
        // No record content in a reason: the made-up name in notfhir.ndjson stays out.
        assert!(!err.contains(corpus::MARKER), "{err}");
        assert!(qdir.join(rel).exists(), "{rel} not moved to quarantine_dir");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&qdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(!setup.src().join(rel).exists(), "{rel} still in the source");
    }
    // The held manifest says why, once; status is degraded (files held).
    assert_eq!(log.matches("FHIR export incomplete").count(), 1, "{log}");
    let (st, code) = setup.status_json_and_code(bin());
    assert_eq!(code, Some(1), "{st}");
    assert_eq!(st["objects"]["quarantined"], bad.len() as u64, "{st}");

    // A fixed file is a new version: checked again, and sent.
    write_settled(
        &setup.src().join("loose/truncated.ndjson"),
        corpus::ndjson("Patient", 2).as_bytes(),
    );
    let out = setup.run_once(bin());
    assert!(
        s3.object("exports", "fhir/loose/truncated.ndjson")
            .is_some(),
        "{}",
        stderr_of(&out)
    );
}

/// `on_invalid = "upload-flagged"`: a broken file is sent, tagged for the cloud-side validator.
#[test]
fn upload_flagged_sends_an_invalid_file_with_a_tag() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("exports");
    write_settled(&setup.src().join("bad.ndjson"), b"not json at all {{{\n");
    write_settled(
        &setup.src().join("good.ndjson"),
        corpus::ndjson("Patient", 2).as_bytes(),
    );
    setup.write_config(
        &proxy.endpoint(),
        "",
        "validate = \"fhir-ndjson\"\non_invalid = \"upload-flagged\"\nsettle = \"30s\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let tag_of = |key: &str| {
        proxy
            .seen()
            .into_iter()
            .find(|r| r.method == "PUT" && r.path().ends_with(key))
            .and_then(|r| r.header("x-amz-tagging").map(str::to_string))
    };
    assert_eq!(
        tag_of("bad.ndjson").as_deref(),
        Some("ha-edge-validation=failed")
    );
    assert_eq!(tag_of("good.ndjson"), None);
    assert!(s3.object("exports", "fhir/bad.ndjson").is_some());
}

/// With a key template of pseudonyms and `log_paths = "keys"`, the directory name (a patient
/// identifier) appears in no key, no log line, no status output and no receipt batch; the
/// operator on the box resolves a key with `ha-edge lookup`; two files never share a key.
#[test]
fn pseudonymised_keys_keep_the_identifier_out_of_every_output() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let marker = corpus::MARKER;
    for (rel, seed) in [
        (format!("{marker}/series1/a.dcm"), 1),
        (format!("{marker}/series1/b.dcm"), 2),
        (format!("{marker}/series2/a.dcm"), 3),
        ("OTHER_PATIENT/series1/a.dcm".to_string(), 4),
    ] {
        let p = setup.src().join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_settled(&p, &corpus::dicom("1.2.3", &format!("1.2.3.{seed}")));
    }
    // A name the destination can never take: refused, and still not named anywhere.
    let refused = setup.src().join(format!("{marker}/bad\nname.dcm"));
    write_settled(&refused, b"x");
    let key_file = setup.dir.path().join("pseudonym.key");
    std::fs::write(&key_file, "test-site-key-0123456789abcdef\n").unwrap();
    let cfg = setup.write_config(
        &s3.endpoint(),
        &format!(
            "log_paths = \"keys\"\npseudonym_key_file = \"{}\"\nname = \"edge-1\"",
            key_file.display()
        ),
        "key_template = \"{source}/{date:%Y}/{hmac:dir}/{name}\"\nvalidate = \"dicom\"\nsettle = \"30s\"",
    );
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[receipts]\nprefix = \"_receipts/\"\n");
    std::fs::write(&cfg, text).unwrap();

    // `validate` shows the key an example file gets, without the path.
    let (shown, code) = run_with(&setup, &["validate", "--offline"]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("key_template gives an example file the key fhir/exports/20"),
        "{shown}"
    );
    let out = setup.run_once(bin());
    let mut outputs = shown + &String::from_utf8_lossy(&out.stdout) + &stderr_of(&out);
    assert!(outputs.contains("4 delivered"), "{outputs}");
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["status", "--objects", "--json"],
        vec!["status", "--objects"],
    ] {
        outputs += &run_with(&setup, &args).0;
    }
    let keys = s3.keys("exports");
    let data_keys: Vec<&String> = keys
        .iter()
        .filter(|k| !k.starts_with("_receipts/"))
        .collect();
    assert_eq!(data_keys.len(), 4, "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("_receipts/")), "{keys:?}");
    for k in &keys {
        outputs += k;
        outputs += &String::from_utf8_lossy(&s3.object("exports", k).unwrap());
    }
    assert!(
        !outputs.contains(marker),
        "the identifier leaked: {}",
        outputs
            .lines()
            .filter(|l| l.contains(marker))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        outputs.contains("(withheld)"),
        "the refused path is shown withheld"
    );
    // Same directory, same pseudonym; another directory, another one.
    let dir_of = |k: &str| k.split('/').nth(3).unwrap().to_string();
    let dirs: BTreeSet<String> = data_keys.iter().map(|k| dir_of(k)).collect();
    assert_eq!(dirs.len(), 3, "{data_keys:?}");

    // On the box, the operator resolves a key.
    let key = data_keys[0];
    let (found, code) = run_with(&setup, &["lookup", key]);
    assert_eq!(code, Some(0), "{found}");
    assert!(found.contains(marker), "{found}");
    // And `ha-edge receipts` (on the box) shows the path the batches leave out.
    let (receipts, _) = run_with(&setup, &["receipts"]);
    assert!(receipts.contains(marker), "{receipts}");
    let (none, code) = run_with(&setup, &["lookup", "fhir/no/such/key"]);
    assert_eq!(code, Some(1), "{none}");
}

/// `stable_dir = "2s"`: a study directory written slowly over 3 s (two series) is sent only as a
/// whole, once nothing in it changed for 2 s, and its `_complete.json` (each file's key, size
/// and SHA-256) lands after the last file.
#[test]
fn a_study_written_slowly_is_delivered_whole_and_its_completion_object_lands_last() {
    use std::time::{Duration, Instant};
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let proxy = Proxy::start(s3.port);
    let setup = Setup::new("exports");
    setup.write_config(
        &proxy.endpoint(),
        "",
        "complete_when = { stable_dir = \"2s\" }\nvalidate = \"dicom\"\nwatch = \"events\"",
    );
    let mut daemon = setup.spawn_daemon(bin());
    assert!(wait_until(Duration::from_secs(10), || setup
        .daemon_log()
        .contains("watching with inotify")));
    let study = setup.src().join("STUDY_0815");
    let mut written = Vec::new();
    let start = Instant::now();
    for i in 0..7 {
        let rel = format!("series{}/img{i}.dcm", i % 2);
        let bytes = corpus::dicom("1.2.3.4", &format!("1.2.3.4.{}", i % 2));
        let p = study.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        written.push((format!("fhir/STUDY_0815/{rel}"), bytes));
        // While it is being written, nothing of the study is sent.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let sent: Vec<String> = s3
                .keys("exports")
                .into_iter()
                .filter(|k| k.starts_with("fhir/STUDY"))
                .collect();
            assert!(
                sent.is_empty(),
                "sent before the study was complete: {sent:?} {}",
                setup.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let last_write = Instant::now();
    assert!(last_write - start >= Duration::from_secs(3));
    let complete = "fhir/STUDY_0815/_complete.json";
    assert!(
        wait_until(Duration::from_secs(20), || s3
            .object("exports", complete)
            .is_some()),
        "{}",
        setup.daemon_log()
    );
    assert!(
        last_write.elapsed() >= Duration::from_secs(2),
        "released before its quiet time"
    );
    let keys: std::collections::BTreeSet<String> = s3
        .keys("exports")
        .into_iter()
        .filter(|k| k.starts_with("fhir/STUDY"))
        .collect();
    assert_eq!(keys.len(), written.len() + 1, "{keys:?}");
    // The completion object came after every file, and lists each with its hash.
    let puts: Vec<String> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.method == "PUT" && !r.is_probe())
        .map(|r| r.path().to_string())
        .collect();
    assert!(puts.last().unwrap().ends_with("_complete.json"), "{puts:?}");
    let doc: serde_json::Value =
        serde_json::from_slice(&s3.object("exports", complete).unwrap()).unwrap();
    let files = doc["files"].as_array().unwrap();
    assert_eq!(files.len(), written.len(), "{doc}");
    for (key, bytes) in &written {
        let f = files
            .iter()
            .find(|f| f["key"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} not listed: {doc}"));
        assert_eq!(f["size"], bytes.len() as u64);
        assert_eq!(f["sha256"], sha256(bytes));
        assert_eq!(s3.object("exports", key).as_deref(), Some(&bytes[..]));
    }
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());

    // `--once` on a study still within its quiet time sends nothing of it.
    let fresh = setup.src().join("STUDY_0816/a.dcm");
    std::fs::create_dir_all(fresh.parent().unwrap()).unwrap();
    std::fs::write(&fresh, corpus::dicom("1.2.5", "1.2.5.1")).unwrap();
    setup.write_config(
        &proxy.endpoint(),
        "",
        "complete_when = { stable_dir = \"30s\" }",
    );
    let out = setup.run_once(bin());
    // (Both studies are younger than 30 s now; the delivered one is not sent again either.)
    assert!(
        stderr_of(&out).contains("0 delivered"),
        "{}",
        stderr_of(&out)
    );
    assert!(
        stderr_of(&out).contains("2 not yet settled"),
        "{}",
        stderr_of(&out)
    );
    assert!(s3.object("exports", "fhir/STUDY_0816/a.dcm").is_none());
}

/// A bucket source's objects are checked through the same pinned reads (ranged GETs): the
/// broken one is quarantined, the valid one delivered.
#[test]
fn bucket_objects_are_checked_before_they_are_sent() {
    let onprem = S3Server::start();
    onprem.create_bucket("onprem");
    let cloud = S3Server::start();
    cloud.create_bucket("cloud");
    let setup = Setup::new("cloud");
    onprem.put(
        "onprem",
        "exports/ok.ndjson",
        corpus::ndjson("Observation", 50).as_bytes(),
    );
    onprem.put(
        "onprem",
        "exports/bad.ndjson",
        b"{\"resourceType\":\"Observation\"}\n",
    );
    setup.write_bucket_config(
        &cloud.endpoint(),
        &onprem.endpoint(),
        "onprem",
        "",
        "validate = \"fhir-ndjson\"",
    );
    let out = setup.run_once(bin());
    let log = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("1 quarantined"), "{log}");
    assert!(cloud.object("cloud", "fhir/ok.ndjson").is_some(), "{log}");
    assert!(cloud.object("cloud", "fhir/bad.ndjson").is_none());
    let (text, _) = run_with(&setup, &["status", "--objects", "--state", "quarantined"]);
    assert!(text.contains("Observation without an id"), "{text}");
}

/// `stable_dir` with a marker: a study that has long been quiet still waits for `{dir}.done`
/// next to it; the marker is never sent. Files of two DICOM studies in one study directory are
/// reported.
#[test]
fn a_study_waits_for_its_marker_and_two_studies_in_one_directory_are_reported() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    for (i, study) in ["1.2.3.1", "1.2.3.1", "1.2.3.2"].iter().enumerate() {
        let p = setup.src().join(format!("ACC_1/img{i}.dcm"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_settled(&p, &corpus::dicom(study, &format!("{study}.1")));
    }
    setup.write_config(
        &s3.endpoint(),
        "",
        "complete_when = { stable_dir = \"2s\", marker = \"{dir}.done\" }\nvalidate = \"dicom\"",
    );
    let out = setup.run_once(bin());
    assert!(
        stderr_of(&out).contains("0 delivered"),
        "{}",
        stderr_of(&out)
    );
    assert!(s3.keys("exports").iter().all(|k| !k.contains("ACC_1")));
    write_settled(&setup.src().join("ACC_1.done"), b"");
    let out = setup.run_once(bin());
    let log = stderr_of(&out);
    assert!(log.contains("3 delivered"), "{log}");
    assert!(
        s3.object("exports", "fhir/ACC_1/_complete.json").is_some(),
        "{log}"
    );
    assert!(s3.keys("exports").iter().all(|k| !k.ends_with(".done")));
    assert_eq!(log.matches("more than one DICOM study").count(), 1, "{log}");
    let st = setup.status_json(bin());
    assert!(
        st["last_errors"]
            .to_string()
            .contains("more than one DICOM study"),
        "{st}"
    );
}

/// `key_template = "{source}/{sha256}"`: content-addressed keys, hashed at discovery.
#[test]
fn content_addressed_keys_name_the_sha256_of_the_bytes() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let (a, b) = (data(1, 3000), data(2, 5000));
    write_settled(&setup.src().join("x/a.bin"), &a);
    write_settled(&setup.src().join("y/b.bin"), &b);
    setup.write_config(&s3.endpoint(), "", "key_template = \"{source}/{sha256}\"");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    for bytes in [&a, &b] {
        let key = format!("fhir/exports/{}", sha256(bytes));
        assert_eq!(
            s3.object("exports", &key).as_deref(),
            Some(&bytes[..]),
            "{key}"
        );
    }
}
