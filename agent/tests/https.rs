//! S3 over https, as in production: the real binary against s3s-fs behind a TLS front
//! (stunnel), with the recording proxy between the two so the tests see each request as sent.
//!
//! Over https a multipart upload's parts go with `x-amz-content-sha256: UNSIGNED-PAYLOAD` and
//! their CRC-64/NVME, which the server checks (the AWS SDKs' rule: the payload is left unsigned
//! only over TLS and with a checksum the server verifies), so no part is hashed with SHA-256
//! for its signature; over plain http each part's payload stays signed with its SHA-256.

use std::path::Path;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// s3s-fs, the recording proxy in front of it, and (for https) the TLS front before both.
struct Https {
    s3: S3Server,
    proxy: Proxy,
    tls: Option<TlsFront>,
}

impl Https {
    fn start(bucket: &str, tls: bool) -> Https {
        let s3 = S3Server::start();
        s3.create_bucket(bucket);
        let proxy = Proxy::start(s3.port);
        let tls = tls.then(|| TlsFront::start(proxy.port));
        Https { s3, proxy, tls }
    }

    /// The `[destination]` table: the https endpoint with its CA, or the proxy's http one.
    fn destination(&self, setup: &Setup) -> String {
        match &self.tls {
            Some(t) => format!(
                "{}ca_file = \"{}\"\n",
                setup.destination_toml(&t.endpoint()),
                t.ca().display()
            ),
            None => setup.destination_toml(&self.proxy.endpoint()),
        }
    }
}

const AGENT: &str = "part_size = \"5MiB\"\nmultipart_threshold = \"8MiB\"\nlog_level = \"warn\"";

/// Sends one 23 MiB file (5 parts) and one small file; returns what the proxy saw.
fn send(bucket: &str, tls: bool) -> (Https, Vec<u8>, Vec<u8>) {
    let w = Https::start(bucket, tls);
    let setup = Setup::new(bucket);
    let big = data(41, 23 * MIB);
    let small = data(42, 20 * 1024);
    write_settled(&setup.src().join("scan.ndjson"), &big);
    write_settled(&setup.src().join("small.ndjson"), &small);
    setup.write_config_with(&w.destination(&setup), AGENT, "");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    for (key, body) in [("fhir/scan.ndjson", &big), ("fhir/small.ndjson", &small)] {
        assert_eq!(
            sha256(&w.s3.object(bucket, key).expect("stored")),
            sha256(body),
            "{key}"
        );
        assert_eq!(
            setup.journal_sha256(key).as_deref(),
            Some(sha256(body).as_str())
        );
    }
    let meta = w.s3.metadata(bucket, "fhir/scan.ndjson").expect("metadata");
    assert_eq!(meta["checksum_type"], "FULL_OBJECT", "{meta}");
    let sums =
        w.s3.checksums(bucket, "fhir/scan.ndjson")
            .expect("checksums");
    assert_eq!(sums["checksum_crc64nvme"], crc64nvme_b64(&big), "{sums}");
    assert_eq!(w.s3.open_uploads(), 0);
    (w, big, small)
}

/// Over https: every part is sent unsigned with its CRC-64/NVME, the server's full-object
/// CRC-64/NVME matches the file, and the single PUT (whose SHA-256 the agent has anyway) stays
/// signed with it.
#[test]
fn over_https_parts_go_unsigned_with_a_crc64nvme_the_server_checks() {
    let (w, big, small) = send("tls", true);
    let seen = w.proxy.seen();
    let parts: Vec<&SeenRequest> = seen.iter().filter(|r| r.op() == "UploadPart").collect();
    assert_eq!(parts.len(), 5, "{parts:?}");
    for p in &parts {
        assert_eq!(
            p.header("x-amz-content-sha256"),
            Some("UNSIGNED-PAYLOAD"),
            "{}",
            p.head
        );
        let n = p.part_number().expect("partNumber") as usize;
        let part = &big[(n - 1) * 5 * MIB..(n * 5 * MIB).min(big.len())];
        assert_eq!(
            p.header("x-amz-checksum-crc64nvme"),
            Some(crc64nvme_b64(part).as_str()),
            "{}",
            p.head
        );
    }
    let put = seen
        .iter()
        .find(|r| r.op() == "PutObject" && r.path().ends_with("small.ndjson"))
        .expect("the small file's PUT");
    assert_eq!(
        put.header("x-amz-content-sha256"),
        Some(sha256(&small).as_str())
    );
}

/// Over plain http the same upload's parts stay signed with their SHA-256.
#[test]
fn over_http_parts_stay_signed_with_their_sha256() {
    let (w, big, _) = send("plain", false);
    let seen = w.proxy.seen();
    let parts: Vec<&SeenRequest> = seen.iter().filter(|r| r.op() == "UploadPart").collect();
    assert_eq!(parts.len(), 5);
    for p in parts {
        let n = p.part_number().expect("partNumber") as usize;
        let part = &big[(n - 1) * 5 * MIB..(n * 5 * MIB).min(big.len())];
        assert_eq!(
            p.header("x-amz-content-sha256"),
            Some(sha256(part).as_str())
        );
    }
}

/// A part whose bytes change behind the TLS (a faulty disk, memory or middlebox) is refused by
/// the server's check of its CRC-64/NVME; the agent sends it again and the object arrives
/// intact.
#[test]
fn an_unsigned_part_changed_on_the_way_is_refused_by_its_crc_and_sent_again() {
    let w = Https::start("bad", true);
    w.proxy
        .add_rule(Rule::new("UploadPart", Fault::CorruptBody, 1).on_target("partNumber=2&"));
    let setup = Setup::new("bad");
    let big = data(43, 23 * MIB);
    write_settled(&setup.src().join("scan.ndjson"), &big);
    setup.write_config_with(&w.destination(&setup), AGENT, "");
    let out = setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(w.proxy.faults_injected(), 1);
    assert_eq!(
        sha256(&w.s3.object("bad", "fhir/scan.ndjson").expect("stored")),
        sha256(&big)
    );
    let sent_2 = w
        .proxy
        .seen()
        .iter()
        .filter(|r| r.op() == "UploadPart" && r.part_number() == Some(2))
        .count();
    assert_eq!(sent_2, 2, "part 2 sent again after the refusal");
    assert_eq!(w.s3.open_uploads(), 0);
}
