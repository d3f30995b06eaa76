//! End-to-end: receipts (chain of custody) against a real S3 server (s3s-fs) on 127.0.0.1: one
//! receipt per delivered version, `ha-edge receipts` as NDJSON and CSV, receipt batches in the
//! bucket that chain by SHA-256, and `ha-edge receipts verify` catching a tampered batch.

use std::path::Path;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// `ha-edge receipts -c <config> <args>`: its stdout, and whether it exited 0.
fn receipts(setup: &Setup, args: &[&str]) -> (String, bool, String) {
    let cfg = setup.config_path();
    let mut all = vec!["receipts", "-c", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = output_within(
        setup.command(bin(), &all),
        std::time::Duration::from_secs(60),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
        stderr_of(&out),
    )
}

fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON receipt per line"))
        .collect()
}

#[test]
fn every_delivered_version_has_one_receipt_with_what_the_server_answered() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let src = setup.src();
    write_settled(&src.join("Patient.ndjson"), &data(1, 1500));
    write_settled(&src.join("big/Observation.ndjson"), &data(2, 11 * MIB));
    setup.write_config(
        &s3.endpoint(),
        "name = \"edge-dkfz-1\"\npart_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"",
        "settle = \"30s\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));

    let (text, ok, err) = receipts(&setup, &[]);
    assert!(ok, "{err}");
    let mut lines = parse_lines(&text);
    assert_eq!(lines.len(), 2, "{text}");
    lines.sort_by_key(|r| r["destination"]["key"].as_str().unwrap().to_string());
    let etags = setup.journal_column("SELECT dest_etag FROM objects ORDER BY key");
    for (r, (name, bytes, etag)) in lines.iter().zip([
        ("Patient.ndjson", data(1, 1500), &etags[0]),
        ("big/Observation.ndjson", data(2, 11 * MIB), &etags[1]),
    ]) {
        assert_eq!(r["agent"], "edge-dkfz-1");
        assert_eq!(r["ha_edge"], env!("CARGO_PKG_VERSION"));
        assert_eq!(r["source"]["name"], "exports");
        assert_eq!(r["source"]["kind"], "file");
        assert_eq!(r["source"]["path"], name);
        assert_eq!(r["source"]["size"], bytes.len());
        let meta = std::fs::metadata(src.join(name)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(r["source"]["inode"], meta.ino());
        assert_eq!(
            r["source"]["ctime_ns"],
            meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            "{name}: the ctime read with the bytes"
        );
        assert_eq!(r["sha256"], sha256(&bytes));
        assert_eq!(r["destination"]["bucket"], "exports");
        assert_eq!(r["destination"]["key"], format!("fhir/{name}"));
        assert_eq!(
            r["destination"]["endpoint"],
            format!("127.0.0.1:{}", s3.port)
        );
        assert_eq!(r["destination"]["etag"].as_str(), Some(etag.as_str()));
        assert!(!etag.is_empty(), "the server's ETag is recorded");
        assert_eq!(r["after_upload"], "keep");
        assert_eq!(r["after_upload_at"], serde_json::Value::Null);
        for t in ["discovered_at", "upload_started_at", "verified_at"] {
            let at = r[t].as_str().unwrap_or_else(|| panic!("{t} in {r}"));
            humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{t} {at}: {e}"));
        }
        assert!(r["discovered_at"].as_str() <= r["verified_at"].as_str());
        assert_eq!(r["receipt"].as_str().unwrap().len(), 32);
    }
    // The checksum the server reported for the stored multipart object: the full-object
    // CRC64NVME it checked at completion (its SHA-256 is the receipt's `sha256`).
    assert_eq!(
        lines[1]["destination"]["checksum"],
        format!("crc64nvme:{}", crc64nvme_b64(&data(2, 11 * MIB)))
    );
    assert_eq!(lines[1]["sha256"], sha256(&data(2, 11 * MIB)));

    // A second run sends nothing and writes no receipt; a changed file is a new version with a
    // receipt of its own, the first one untouched.
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(parse_lines(&receipts(&setup, &[]).0).len(), 2);
    write_settled(&src.join("Patient.ndjson"), &data(3, 1600));
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let after = parse_lines(&receipts(&setup, &[]).0);
    assert_eq!(after.len(), 3);
    let patient: Vec<&serde_json::Value> = after
        .iter()
        .filter(|r| r["source"]["path"] == "Patient.ndjson")
        .collect();
    assert_eq!(patient.len(), 2);
    assert_eq!(patient[0]["sha256"], sha256(&data(1, 1500)));
    assert_eq!(patient[1]["sha256"], sha256(&data(3, 1600)));
    assert!(
        after.contains(&lines[0]),
        "the first receipt is kept as it was"
    );

    // Filters and CSV.
    assert_eq!(receipts(&setup, &["--source", "other"]).0, "");
    assert_eq!(receipts(&setup, &["--since", "2999-01-01T00:00:00Z"]).0, "");
    assert_eq!(
        parse_lines(&receipts(&setup, &["--since", "1h"]).0).len(),
        3
    );
    let (csv, ok, err) = receipts(&setup, &["--format", "csv"]);
    assert!(ok, "{err}");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(
        rows[0].starts_with("receipt,agent,ha_edge,source,"),
        "{}",
        rows[0]
    );
    assert!(rows.iter().skip(1).all(|r| r.contains(",edge-dkfz-1,")));

    // The receipts table refuses an update (append-only), even from outside ha-edge.
    let conn = rusqlite::Connection::open(setup.journal()).unwrap();
    let e = conn
        .execute("UPDATE receipts SET receipt = '{}' WHERE seq = 1", [])
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    let e = conn.execute("DELETE FROM receipts", []).unwrap_err();
    assert!(e.to_string().contains("retention"), "{e}");
}

#[test]
fn a_deleted_source_gets_an_after_upload_event() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    write_settled(&setup.src().join("a.ndjson"), &data(1, 100));
    setup.write_config(
        &s3.endpoint(),
        "",
        "settle = \"30s\"\nafter_upload = \"delete\"",
    );
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!setup.src().join("a.ndjson").exists());
    let r = parse_lines(&receipts(&setup, &[]).0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["after_upload"], "delete");
    let at = r[0]["after_upload_at"].as_str().expect("after_upload_at");
    assert!(at >= r[0]["verified_at"].as_str().unwrap());
}

/// The batch objects under `_receipts/<agent>/`, in key order.
fn batch_keys(s3: &S3Server) -> Vec<String> {
    s3.keys("exports")
        .into_iter()
        .filter(|k| k.starts_with("_receipts/edge-1/"))
        .collect()
}

#[test]
fn receipt_batches_chain_in_the_bucket_and_verify_catches_tampering() {
    let s3 = S3Server::start();
    s3.create_bucket("exports");
    let setup = Setup::new("exports");
    let src = setup.src();
    write_settled(&src.join("a.ndjson"), &data(1, 100));
    write_settled(&src.join("b.ndjson"), &data(2, 200));
    let cfg = |setup: &Setup| {
        setup.write_config(&s3.endpoint(), "name = \"edge-1\"", "settle = \"30s\"");
        let text = std::fs::read_to_string(setup.config_path()).unwrap();
        std::fs::write(
            setup.config_path(),
            format!("{text}\n[receipts]\nprefix = \"_receipts/\"\nevery = \"5m\"\n"),
        )
        .unwrap();
    };
    cfg(&setup);
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    write_settled(&src.join("c.ndjson"), &data(3, 300));
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));

    // Two batches: the receipts of each run, the second carrying the first's SHA-256.
    let keys = batch_keys(&s3);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys[0].ends_with("/00000001.ndjson") && keys[1].ends_with("/00000002.ndjson"));
    let first = s3.object("exports", &keys[0]).unwrap();
    let second = s3.object("exports", &keys[1]).unwrap();
    let header = |b: &[u8]| -> serde_json::Value {
        serde_json::from_str(String::from_utf8_lossy(b).lines().next().unwrap()).unwrap()
    };
    assert_eq!(header(&first)["batch"], 1);
    assert_eq!(header(&first)["prev_sha256"], serde_json::Value::Null);
    assert_eq!(header(&first)["receipts"], 2);
    assert_eq!(header(&second)["prev_sha256"], sha256(&first));
    assert_eq!(header(&second)["receipts"], 1);
    // What the bucket holds is what `receipts` prints.
    let local: Vec<String> = parse_lines(&receipts(&setup, &[]).0)
        .into_iter()
        .map(|r| r["receipt"].as_str().unwrap().to_string())
        .collect();
    let in_bucket: Vec<String> = [&first, &second]
        .iter()
        .flat_map(|b| {
            String::from_utf8_lossy(b)
                .lines()
                .skip(1)
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["receipt"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(in_bucket, local);

    let (text, ok, err) = receipts(&setup, &["verify"]);
    assert!(ok, "verify of an intact chain: {text} {err}");
    assert!(
        text.contains("2 batches, 3 receipts, 3 objects checked"),
        "{text}"
    );

    // Tamper with batch 1 in the bucket (a receipt's SHA-256 rewritten): the chain breaks at
    // batch 2, even from the cloud side (another config, no journal).
    let path = s3.data.path().join("exports").join(&keys[0]);
    let tampered = String::from_utf8(first.clone()).unwrap().replacen(
        &sha256(&data(1, 100)),
        &sha256(&data(9, 100)),
        1,
    );
    assert_ne!(tampered.as_bytes(), &first[..]);
    std::fs::write(&path, &tampered).unwrap();
    let cloud = Setup::new("exports");
    cloud.write_config(&s3.endpoint(), "name = \"auditor\"", "");
    let (text, ok, err) = receipts(&cloud, &["verify"]);
    assert!(!ok, "a tampered batch must fail verify: {text}");
    assert!(
        err.contains("prev_sha256") && err.contains("00000002.ndjson"),
        "{err}"
    );
    std::fs::write(&path, &first).unwrap();
    assert!(
        receipts(&cloud, &["verify"]).1,
        "restored chain verifies again"
    );

    // The last batch has no successor to betray it: on the box, the journal's record does.
    let last = s3.data.path().join("exports").join(&keys[1]);
    let tampered = String::from_utf8(second)
        .unwrap()
        .replace("c.ndjson", "x.ndjson");
    std::fs::write(&last, tampered).unwrap();
    let (_, ok, err) = receipts(&setup, &["verify"]);
    assert!(!ok);
    assert!(err.contains("journal recorded for batch 2"), "{err}");
}
