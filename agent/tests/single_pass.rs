//! Every source byte read once (issue 18): a multipart upload is checked by the server's
//! full-object CRC64NVME instead of a SHA-256 pass before it, and a server that refuses that
//! checksum gets the SHA-256 scheme with one warning. The real binary against s3s-fs.
//!
//! The bucket source's single read (bytes counted by a proxy), the resume after kill -9 and the
//! object replaced mid-read are in `bucket_source.rs`.

use std::path::Path;
use std::sync::Mutex;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// The tests of this file measure what the agent's process read (`rchar` of this process, which
/// takes in a child's counts when the child is reaped): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A 40 MiB file in 5 MiB parts: read once with `checksum = "crc64nvme"` (the default), twice
/// with `"sha256"` (a hash pass, then the parts). The same bytes arrive either way; the server
/// checks the full-object CRC64NVME of the first, and the journal holds both SHA-256s.
#[test]
fn a_multipart_file_is_read_once_and_the_server_checks_its_full_object_crc() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let size = 40 * MIB;
    let body = data(18, size);
    let mut read = Vec::new();
    for checksum in ["crc64nvme", "sha256"] {
        let s3 = S3Server::start();
        s3.create_bucket("once");
        let setup = Setup::new("once");
        write_settled(&setup.src().join("scan.ndjson"), &body);
        let dest = format!(
            "{}checksum = \"{checksum}\"\n",
            setup.destination_toml(&s3.endpoint())
        );
        setup.write_config_with(
            &dest,
            "part_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"\nlog_level = \"warn\"",
            "",
        );
        let before = rchar("self");
        let out = setup.run_once(bin());
        read.push(rchar("self") - before);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let key = "fhir/scan.ndjson";
        assert_eq!(
            sha256(&s3.object("once", key).expect("stored")),
            sha256(&body)
        );
        assert_eq!(
            setup.journal_sha256(key).as_deref(),
            Some(sha256(&body).as_str())
        );
        let meta = s3.metadata("once", key).expect("metadata");
        if checksum == "crc64nvme" {
            assert_eq!(meta["checksum_type"], "FULL_OBJECT", "{meta}");
            let sums = s3.checksums("once", key).expect("checksums");
            assert_eq!(sums["checksum_crc64nvme"], crc64nvme_b64(&body), "{sums}");
        } else {
            assert_eq!(meta["user_metadata"]["sha256"], sha256(&body), "{meta}");
        }
        assert_eq!(s3.open_uploads(), 0);
    }
    // The file's bytes, plus the config, the journal's pages and the server's answers.
    let slack = 2 * MIB as u64;
    assert!(
        read[0] >= size as u64 && read[0] < size as u64 + slack,
        "crc64nvme read {} bytes for a {size}-byte file",
        read[0]
    );
    assert!(
        read[1] >= 2 * size as u64,
        "sha256 (hash pass first) read {} bytes",
        read[1]
    );
}

/// A server that refuses CRC64NVME on CreateMultipartUpload (as an older S3-compatible one
/// does): the agent says so once and sends every object with the SHA-256 scheme, verified.
#[test]
fn a_server_that_refuses_crc64nvme_gets_sha256_with_one_warning() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s3 = S3Server::start();
    s3.create_bucket("old");
    let proxy = Proxy::start(s3.port);
    proxy.add_rule(
        Rule::new(
            "CreateMultipartUpload",
            Fault::Status {
                status: 400,
                code: "InvalidArgument",
                retry_after: None,
            },
            100,
        )
        .with_header("x-amz-checksum-algorithm", "CRC64NVME"),
    );
    let setup = Setup::new("old");
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("big{i}.ndjson"), data(40 + i, 11 * MIB)))
        .collect();
    for (name, body) in &files {
        write_settled(&setup.src().join(name), body);
    }
    setup.write_config(
        &proxy.endpoint(),
        "part_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"\nconcurrency = 1",
        "",
    );
    let out = setup.run_once(bin());
    let log = stderr_of(&out);
    assert!(out.status.success(), "{log}");
    for (name, body) in &files {
        let key = format!("fhir/{name}");
        assert_eq!(
            sha256(&s3.object("old", &key).expect("stored")),
            sha256(body)
        );
        let meta = s3.metadata("old", &key).expect("metadata");
        assert_eq!(meta["user_metadata"]["sha256"], sha256(body), "{meta}");
    }
    assert_eq!(
        proxy.faults_injected(),
        1,
        "asked once; the other objects go straight to SHA-256"
    );
    assert_eq!(
        log.matches("refuses full-object CRC64NVME").count(),
        1,
        "one warning: {log}"
    );
    assert_eq!(s3.open_uploads(), 0);
}
