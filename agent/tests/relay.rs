//! The QUIC relay path: real quinn endpoints on 127.0.0.1 (the `ha-edge relay` process and the
//! agent), certificates generated here with rcgen, the relay landing in a directory or in the
//! real S3 test server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ha_edge_tests::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: usize = 1024 * 1024;
const RELAY_NAME: &str = "relay.test";
const DKFZ: &str = "dkfz-edge-01.agents.test";

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A CA that signs certificates into `dir`.
struct Ca {
    dir: PathBuf,
    name: String,
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Ca {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            params,
            key,
        }
    }

    fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A leaf certificate for `dns`; `expired` puts its validity in the past.
    fn issue(&self, file: &str, dns: &str, expired: bool) -> (PathBuf, PathBuf) {
        let validity = expired.then_some((2020, 2021));
        self.issue_with(file, &[dns], dns, validity)
    }

    /// A leaf certificate for `dns`, valid from a day ago until `until`.
    fn issue_until(
        &self,
        file: &str,
        dns: &str,
        until: time::OffsetDateTime,
    ) -> (PathBuf, PathBuf) {
        self.issue_params(file, &[dns], dns, |p| {
            p.not_before = until - time::Duration::days(1);
            p.not_after = until;
        })
    }

    /// A leaf certificate with these DNS subjectAltNames (none: a CN-only certificate), valid
    /// from the start of one year to the start of another if given.
    fn issue_with(
        &self,
        file: &str,
        sans: &[&str],
        cn: &str,
        validity: Option<(i32, i32)>,
    ) -> (PathBuf, PathBuf) {
        self.issue_params(file, sans, cn, |params| {
            if let Some((from, to)) = validity {
                params.not_before = rcgen::date_time_ymd(from, 1, 1);
                params.not_after = rcgen::date_time_ymd(to, 1, 1);
            }
        })
    }

    fn issue_params(
        &self,
        file: &str,
        sans: &[&str],
        cn: &str,
        set: impl FnOnce(&mut CertificateParams),
    ) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        set(&mut params);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A running `ha-edge relay`.
struct Relay {
    child: Child,
    dir: PathBuf,
}

impl Relay {
    fn config(dir: &Path, port: u16, ca: &Ca, store: &str, agents: &str) -> PathBuf {
        let (cert, key) = ca.issue("relay", RELAY_NAME, false);
        let text = format!(
            r#"[relay]
listen = "127.0.0.1:{port}"
name = "test-relay"
cert_file = "{cert}"
key_file = "{key}"
client_ca_file = "{ca}"
state_dir = "{state}"
idle_timeout = "3s"
partial_ttl = "1h"

{agents}

[store]
{store}
"#,
            cert = cert.display(),
            key = key.display(),
            ca = ca.pem().display(),
            state = dir.join("relay-state").display(),
        );
        let path = dir.join("relay.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(dir: &Path) -> Relay {
        Relay::start_announcing(dir, None)
    }

    /// A relay announcing only `capabilities` (bits), as an older one would.
    fn start_announcing(dir: &Path, capabilities: Option<u64>) -> Relay {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("relay.log"))
            .unwrap();
        let mut cmd = Command::new(bin());
        if let Some(bits) = capabilities {
            cmd.env("HA_EDGE_RELAY_CAPABILITIES", bits.to_string());
        }
        let child = cmd
            .args(["relay", "-c"])
            .arg(dir.join("relay.toml"))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("RUST_LOG", "ha_edge=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Relay {
            child,
            dir: dir.to_path_buf(),
        };
        let listening = |r: &Relay| r.log().matches("relay listening").count();
        let before = listening(&r).saturating_sub(1);
        assert!(
            wait_until(Duration::from_secs(20), || listening(&r) > before),
            "{}",
            r.log()
        );
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// Bytes the relay holds in partial transfers.
    fn partial_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.join("relay-state/partial"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn partial_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.join("relay-state/partial"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    setup: Setup,
    ca: Ca,
    relay_port: u16,
    landed: PathBuf,
}

const DKFZ_AGENT: &str =
    "[[agent]]\nidentity = \"dkfz-edge-01.agents.test\"\nprefix = \"fhir/dkfz/\"";

/// A `[store]` landing in bucket "cloud" of `s3` (5 MiB parts).
fn s3_store(s3: &S3Server) -> String {
    s3_store_at(&s3.endpoint(), None)
}

/// A `[store]` landing in bucket "cloud" at `endpoint`, trusting `ca` (an https front).
fn s3_store_at(endpoint: &str, ca: Option<&Path>) -> String {
    let ca = ca.map_or(String::new(), |c| {
        format!("\nca_file = \"{}\"", c.display())
    });
    format!(
        "type = \"s3\"\nendpoint = \"{endpoint}\"\nregion = \"eu-central-1\"\nbucket = \"cloud\"\npath_style = true\npart_size = \"5MiB\"{ca}"
    )
}

/// A relay landing in a directory, and an agent set up for it (its certificate `agent`).
fn world(store: Option<&str>) -> World {
    let setup = Setup::new("unused");
    let dir = setup.dir.path().to_path_buf();
    let ca = Ca::new(&dir, "ca");
    let relay_port = free_udp_port();
    let landed = dir.join("landed");
    let store = store
        .map(str::to_string)
        .unwrap_or_else(|| format!("type = \"dir\"\npath = \"{}\"", landed.display()));
    Relay::config(&dir, relay_port, &ca, &store, DKFZ_AGENT);
    World {
        setup,
        ca,
        relay_port,
        landed,
    }
}

impl World {
    /// The agent's config: destination the relay (or a proxy at `port`), with this certificate.
    fn agent_config(&self, port: u16, cert: &str, prefix: &str, agent_extra: &str) {
        let (c, k) = self.ca.issue(cert, DKFZ, false);
        self.agent_config_with(port, &c, &k, &self.ca.pem(), prefix, agent_extra);
    }

    fn agent_config_with(
        &self,
        port: u16,
        cert: &Path,
        key: &Path,
        ca: &Path,
        prefix: &str,
        agent_extra: &str,
    ) {
        self.agent_config_to(
            &format!("\"127.0.0.1:{port}\""),
            cert,
            key,
            ca,
            prefix,
            agent_extra,
        );
    }

    /// The agent's config with `relay = <relay>` as written (a string or a list).
    fn agent_config_to(
        &self,
        relay: &str,
        cert: &Path,
        key: &Path,
        ca: &Path,
        prefix: &str,
        agent_extra: &str,
    ) {
        let dest = format!(
            "[destination]\ntype = \"quic\"\nrelay = {relay}\nserver_name = \"{RELAY_NAME}\"\n\
             ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nprefix = \"{prefix}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        );
        self.setup
            .write_config_with(&dest, agent_extra, "settle = \"0s\"");
    }

    fn relay(&self) -> Relay {
        Relay::start(self.setup.dir.path())
    }

    /// A UDP forwarder in front of the relay (to cut the link), and the agent (identity
    /// "agent", prefix "fhir/dkfz/") configured through it. `request_timeout` bounds the QUIC
    /// idle timeout: a cut link is noticed within 3 s.
    fn agent_behind_link(&self) -> UdpProxy {
        let link = UdpProxy::start(self.relay_port);
        self.agent_config(link.port, "agent", "fhir/dkfz/", "request_timeout = \"3s\"");
        link
    }

    /// Turns the relay's metrics endpoint on (before `relay()`); its port.
    fn relay_metrics(&self) -> u16 {
        metrics_on(&self.setup.dir.path().join("relay.toml"))
    }

    /// Waits until `name` has landed under the agent's prefix (a directory landing).
    fn wait_landed(&self, relay: &Relay, name: &str) -> PathBuf {
        let landed = self.landed.join("fhir/dkfz").join(name);
        assert!(
            wait_until(Duration::from_secs(60), || landed.exists()),
            "{name} did not land\n{}\n{}",
            self.setup.daemon_log(),
            relay.log()
        );
        landed
    }

    /// Cuts `link`, writes `meanwhile` (work that meets the cut), and waits until the agent has
    /// noticed (its QUIC idle timeout): its journal says the destination is unreachable.
    fn cut_until_noticed(&self, link: &UdpProxy, meanwhile: Option<(&str, &[u8])>) {
        link.down.store(true, Ordering::Relaxed);
        if let Some((name, bytes)) = meanwhile {
            write_settled(&self.setup.src().join(name), bytes);
        }
        assert!(
            self.destination_becomes("unreachable since"),
            "the agent never noticed the cut: {}",
            self.setup.daemon_log()
        );
    }

    /// Waits (up to 30 s) until `status` says the destination's state begins with `state`.
    fn destination_becomes(&self, state: &str) -> bool {
        wait_until(Duration::from_secs(30), || {
            self.setup.status_json(bin())["agent"]["destination"]
                .as_str()
                .is_some_and(|d| d.starts_with(state))
        })
    }

    /// Writes `name`, starts the agent daemon, and returns once the relay holds `held` bytes
    /// of it (the transfer is under way).
    fn send_until_held(&self, relay: &Relay, name: &str, bytes: &[u8], held: u64) -> Child {
        write_settled(&self.setup.src().join(name), bytes);
        let daemon = self.setup.spawn_daemon(bin());
        assert!(
            wait_until(Duration::from_secs(60), || relay.partial_bytes() >= held),
            "{}\n{}",
            self.setup.daemon_log(),
            relay.log()
        );
        daemon
    }
}

#[test]
fn many_files_and_a_large_one_land_in_s3_through_the_relay_verified_and_only_once() {
    let s3 = S3Server::start();
    s3.create_bucket("cloud");
    let w = world(Some(&s3_store(&s3)));
    let metrics_port = w.relay_metrics();
    let relay = w.relay();
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let mut files = mixed_workload(5, 40);
    files.push(("imaging/ct-series.dcm".into(), data(9, 24 * MIB)));
    for (name, bytes) in &files {
        write_settled(&w.setup.src().join(name), bytes);
    }
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    for (name, bytes) in &files {
        let key = format!("fhir/dkfz/{name}");
        let got = s3.object("cloud", &key).unwrap_or_default();
        assert_eq!(sha256(&got), sha256(bytes), "{key}");
        assert_checked(&s3, &w.setup, &key, bytes);
    }
    assert_eq!(s3.keys("cloud").len(), files.len());
    assert_eq!(s3.open_uploads(), 0);
    assert_eq!(
        relay.log().matches("stored and verified").count(),
        files.len()
    );
    // The agent closed its connection before exiting, and the relay heard it (not its idle
    // timeout).
    assert!(
        wait_until(Duration::from_secs(5), || relay.log().lines().any(|l| l
            .contains("agent connection ended")
            && l.contains("agent stopping"))),
        "{}",
        relay.log()
    );
    let scrape = || {
        let (status, body) = http_get(metrics_port, "/metrics", None).expect("relay /metrics");
        assert_eq!(status, 200);
        promtool_check(&body).unwrap_or_else(|e| panic!("promtool: {e}\n{body}"));
        body
    };
    let m = scrape();
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(
        metric(&m, "ha_edge_relay_objects_landed_total"),
        Some(files.len() as f64),
        "{m}"
    );
    assert_eq!(
        metric(&m, "ha_edge_relay_bytes_landed_total"),
        Some(bytes as f64),
        "{m}"
    );
    assert!(metric(&m, "ha_edge_relay_streams_total").is_some_and(|n| n >= files.len() as f64));
    assert_eq!(metric(&m, "ha_edge_relay_partials"), Some(0.0), "{m}");
    // A fresh journal (say, a replaced edge box): the relay already has every object.
    std::fs::remove_dir_all(w.setup.journal().parent().unwrap()).unwrap();
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stderr_of(&out)
            .matches("the relay already stores this object")
            .count(),
        files.len()
    );
    assert_eq!(
        relay.log().matches("stored and verified").count(),
        files.len(),
        "nothing stored twice"
    );
    let m = scrape();
    assert_eq!(
        metric(&m, "ha_edge_relay_objects_landed_total"),
        Some(files.len() as f64)
    );
}

/// Writes `files`, runs the agent daemon until the relay has stored them all and the journal
/// is done, and returns what the daemon read (`rchar`).
fn send_all_counting_reads(w: &World, relay: &Relay, files: &[(String, Vec<u8>)]) -> u64 {
    for (name, bytes) in files {
        write_settled(&w.setup.src().join(name), bytes);
    }
    let mut daemon = w.setup.spawn_daemon(bin());
    let stored = || relay.log().matches("stored and verified").count();
    let all = wait_until(Duration::from_secs(90), || stored() == files.len())
        && wait_until(Duration::from_secs(30), || {
            w.setup.journal_counts() == vec![("done".to_string(), files.len() as i64)]
        });
    let read = rchar(&daemon.id().to_string());
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(all, "{}\n{}", w.setup.daemon_log(), relay.log());
    read
}

/// The agent read each file once: the files' bytes, plus at most 2 MiB of config,
/// certificates, journal pages and the relay's answers.
fn assert_read_once(read: u64, files: &[(String, Vec<u8>)]) {
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert!(
        read >= total && read < total + 2 * MIB as u64,
        "the agent read {read} bytes for {total} bytes of files"
    );
}

/// Objects small enough for one flight (eager offers, up to 1 MiB) are read once: hashed from
/// the bytes that are then sent, not read a second time to send them.
#[test]
fn small_objects_go_through_the_relay_read_once() {
    let s3 = S3Server::start();
    s3.create_bucket("cloud");
    let w = world(Some(&s3_store(&s3)));
    let relay = w.relay();
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let files: Vec<(String, Vec<u8>)> = (0..16)
        .map(|i| (format!("small/f{i}.ndjson"), data(300 + i, 600 * 1024)))
        .collect();
    let read = send_all_counting_reads(&w, &relay, &files);
    for (name, bytes) in &files {
        let got = s3.object("cloud", &format!("fhir/dkfz/{name}"));
        assert_eq!(got.as_deref().map(sha256), Some(sha256(bytes)), "{name}");
    }
    assert_read_once(read, &files);
}

/// Objects larger than one flight are read once too: offered sealed (named by a transfer id,
/// their SHA-256 sent with the commit), hashed as they are sent. Both landings of the relay:
/// whole on its disk (up to one part) and streamed into a multipart upload.
#[test]
fn large_objects_go_through_the_relay_read_once() {
    let s3 = S3Server::start();
    s3.create_bucket("cloud");
    let w = world(Some(&s3_store(&s3)));
    let relay = w.relay();
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let files: Vec<(String, Vec<u8>)> = vec![
        ("imaging/ct-1.dcm".into(), data(401, 12 * MIB + 77)),
        ("imaging/ct-2.dcm".into(), data(402, 16 * MIB)),
        ("imaging/sr.dcm".into(), data(403, 3 * MIB + 5)),
    ];
    let read = send_all_counting_reads(&w, &relay, &files);
    assert_read_once(read, &files);
    for (name, bytes) in &files {
        let key = format!("fhir/dkfz/{name}");
        assert_eq!(
            s3.object("cloud", &key).as_deref().map(sha256),
            Some(sha256(bytes))
        );
        assert_checked(&s3, &w.setup, &key, bytes);
    }
    assert_eq!(s3.open_uploads(), 0);
    assert_eq!(
        relay.log().matches("stored and verified").count(),
        files.len()
    );
}

/// A relay without sealed offers (an older one) still gets large objects: hashed first, then
/// read again to be sent, the plain offer naming the SHA-256.
#[test]
fn an_older_relay_without_sealed_offers_gets_large_objects_hashed_first() {
    let w = world(None);
    let relay = Relay::start_announcing(w.setup.dir.path(), Some(ha_edge_proto::CAP_EAGER));
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let files = vec![("imaging/ct.dcm".to_string(), data(404, 9 * MIB + 1))];
    let read = send_all_counting_reads(&w, &relay, &files);
    let landed = std::fs::read(w.landed.join("fhir/dkfz/imaging/ct.dcm")).unwrap();
    assert_eq!(sha256(&landed), sha256(&files[0].1));
    assert_eq!(
        w.setup.journal_sha256("fhir/dkfz/imaging/ct.dcm"),
        Some(sha256(&files[0].1))
    );
    let size = files[0].1.len() as u64;
    assert!(
        read >= 2 * size && read < 2 * size + 2 * MIB as u64,
        "a hash pass, then the send: {read} bytes read for {size}"
    );
}

/// A bucket source through the relay: each object is fetched once (one GET, pinned to its
/// ETag), hashed as it is sent, however large.
#[test]
fn bucket_objects_go_through_the_relay_fetched_once() {
    let onprem = S3Server::start();
    onprem.create_bucket("onprem");
    let src = Proxy::start(onprem.port);
    let w = world(None);
    let relay = w.relay();
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let cfg = std::fs::read_to_string(w.setup.config_path()).unwrap();
    let dir_source = format!(
        "type = \"fs\"\npath = \"{}\"\nsettle = \"0s\"",
        w.setup.src().display()
    );
    assert!(cfg.contains(&dir_source), "{cfg}");
    let bucket_source = format!(
        "type = \"s3\"\nendpoint = \"{}\"\nbucket = \"onprem\"\nprefix = \"exports/\"",
        src.endpoint()
    );
    std::fs::write(
        w.setup.config_path(),
        cfg.replace(&dir_source, &bucket_source),
    )
    .unwrap();
    let objects = [
        ("exports/Patient.ndjson", data(41, 70_000)),
        ("exports/imaging/ct.dcm", data(42, 13 * MIB + 3)),
    ];
    for (k, v) in &objects {
        onprem.put("onprem", k, v);
    }
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    for (k, v) in &objects {
        let landed = w
            .landed
            .join("fhir/dkfz")
            .join(k.strip_prefix("exports/").unwrap());
        assert_eq!(
            std::fs::read(&landed).map(|b| sha256(&b)).ok(),
            Some(sha256(v)),
            "{k}"
        );
    }
    let gets: Vec<_> = src
        .seen()
        .into_iter()
        .filter(|r| r.op() == "Get" && !r.target.contains("list-type"))
        .collect();
    let ranges: Vec<_> = gets
        .iter()
        .map(|r| format!("{} {}", r.target, r.header("range").unwrap_or("whole")))
        .collect();
    assert_eq!(gets.len(), objects.len(), "one GET per object: {ranges:#?}");
    assert!(
        gets.iter().all(|r| r.header("if-match").is_some()),
        "pinned to the ETag"
    );
    let total: usize = objects.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(
        src.object_bytes.load(Ordering::Relaxed),
        total as u64,
        "each source byte fetched once"
    );
}

#[test]
fn a_dropped_connection_resumes_from_the_offset_the_relay_confirms() {
    let w = world(None);
    let metrics_port = w.relay_metrics();
    let relay = w.relay();
    let link = w.agent_behind_link();
    let big = data(21, 64 * MIB);
    let mut daemon = w.send_until_held(&relay, "big.dcm", &big, 16 * MIB as u64);
    w.cut_until_noticed(&link, None);
    let held = relay.partial_bytes();
    link.down.store(false, Ordering::Relaxed);
    let landed = w.landed.join("fhir/dkfz/big.dcm");
    assert!(
        wait_until(Duration::from_secs(90), || landed.exists()),
        "{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert_eq!(sha256(&std::fs::read(&landed).unwrap()), sha256(&big));
    let log = w.setup.daemon_log();
    assert!(
        log.contains("the relay holds the first bytes already"),
        "{log}"
    );
    assert!(relay.log().contains("resuming a partial transfer"));
    // Object bytes the relay took: the file exactly once (what was in flight at the cut never
    // arrived; the resume starts at what the relay held).
    let (_, m) = http_get(metrics_port, "/metrics", None).expect("relay /metrics");
    assert_eq!(
        metric(&m, "ha_edge_relay_bytes_received_total"),
        Some(big.len() as f64),
        "object bytes received more than once"
    );
    // Bytes on the wire towards the relay: the file once, plus QUIC overhead, what was in
    // flight when the link went down, and retransmissions (BBR does not slow down for the
    // datagrams this proxy's socket drops: 10 to 30 % here); far from the 2x of two whole sends.
    let sent = link.bytes_up.load(Ordering::Relaxed);
    let resent = sent.saturating_sub(big.len() as u64);
    eprintln!(
        "held at the cut: {held} bytes; sent in all: {sent} bytes for {} (overhead and re-sent: {resent})",
        big.len()
    );
    assert!(held >= 16 * MIB as u64);
    assert!(
        sent < big.len() as u64 * 3 / 2,
        "{sent} bytes sent for a {} byte file",
        big.len()
    );
    assert!(relay.partial_files().is_empty());
}

/// An agent that loses its connection and comes back resumes its TLS session: its hello goes
/// in 0-RTT and the relay answers it in its first flight, so the connection is ready in one
/// round trip. Nothing else goes in 0-RTT (replayable): the object waiting for the connection,
/// sent in one flight when it is ready, is never among the early bytes.
#[test]
fn a_reconnecting_agent_sends_its_hello_in_0rtt_and_nothing_else() {
    let w = world(None);
    let metrics_port = w.relay_metrics();
    let relay = w.relay();
    let link = w.agent_behind_link();
    write_settled(&w.setup.src().join("first.ndjson"), &data(31, 40 * 1024));
    let mut daemon = w.setup.spawn_daemon(bin());
    w.wait_landed(&relay, "first.ndjson");
    assert_eq!(
        link.early_up.load(Ordering::Relaxed),
        0,
        "no session to resume on the first connection"
    );
    // An object (sent in one flight: an eager offer, its data and its commit) meets the cut
    // link, and waits for the connection. What goes into the cut is not counted.
    let second = data(32, 40 * 1024);
    w.cut_until_noticed(&link, Some(("second.ndjson", &second)));
    // Back for the next connection attempt: its first flight goes through whole.
    link.up_at_next_attempt.store(true, Ordering::Relaxed);
    let landed = w.wait_landed(&relay, "second.ndjson");
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert_eq!(std::fs::read(landed).unwrap(), second);
    let (_, m) = http_get(metrics_port, "/metrics", None).expect("relay /metrics");
    assert_eq!(
        metric(&m, "ha_edge_relay_handshakes_total{kind=\"full\"}"),
        Some(1.0),
        "{m}\n{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    assert_eq!(
        metric(&m, "ha_edge_relay_handshakes_total{kind=\"resumed\"}"),
        Some(1.0),
        "the reconnection did not resume: {m}\n{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    // The hello in its 0-RTT packet, padded with the first datagram to 1,200 bytes at most:
    // far below the 40 KiB object (or the ~12 KB a first flight may carry).
    let early = link.early_up.load(Ordering::Relaxed);
    assert!(
        (1..=1200).contains(&early),
        "{early} bytes went in 0-RTT packets\n{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
}

/// A resumed TLS session carries the agent's certificate from the handshake that made it,
/// unverified since. The relay verifies it again: one that has expired since is refused on
/// resumption as it would be in a full handshake, and nothing of the agent's lands.
#[test]
fn a_certificate_expired_since_the_session_began_is_refused_on_resumption() {
    let w = world(None);
    let metrics_port = w.relay_metrics();
    let relay = w.relay();
    let link = UdpProxy::start(w.relay_port);
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(6);
    let (cert, key) = w.ca.issue_until("short-lived", DKFZ, until);
    w.agent_config_with(
        link.port,
        &cert,
        &key,
        &w.ca.pem(),
        "fhir/dkfz/",
        "request_timeout = \"3s\"",
    );
    write_settled(&w.setup.src().join("first.ndjson"), b"{}\n");
    let mut daemon = w.setup.spawn_daemon(bin());
    w.wait_landed(&relay, "first.ndjson");
    w.cut_until_noticed(&link, Some(("second.ndjson", b"{}\n")));
    // The certificate's validity is what must pass (to the second, as X.509 counts it).
    let expired = until + time::Duration::seconds(1);
    assert!(wait_until(Duration::from_secs(30), || {
        time::OffsetDateTime::now_utc() > expired
    }));
    link.up_at_next_attempt.store(true, Ordering::Relaxed);
    assert!(
        w.destination_becomes("refusing since"),
        "the relay did not refuse the expired certificate: {}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    sigterm(&daemon);
    let _ = wait_within(&mut daemon, Duration::from_secs(20));
    assert!(!w.landed.join("fhir/dkfz/second.ndjson").exists());
    let (_, m) = http_get(metrics_port, "/metrics", None).expect("relay /metrics");
    assert_eq!(
        metric(
            &m,
            "ha_edge_relay_refusals_total{reason=\"tls_resumption\"}"
        ),
        Some(1.0),
        "not refused on resumption: {m}\n{}",
        relay.log()
    );
    assert_eq!(
        metric(&m, "ha_edge_relay_handshakes_total{kind=\"resumed\"}"),
        None,
        "{m}"
    );
}

/// An agent killed (-9) in the middle of a sealed offer (its SHA-256 not known yet) offers the
/// same transfer after its restart: the relay answers the offset it holds, the agent reads
/// those bytes once more only to hash them, and sends the rest; nothing crosses twice, and the
/// relay checks the whole against the SHA-256 of the commit.
#[test]
fn an_agent_killed_mid_transfer_resumes_its_sealed_offer_from_the_relays_offset() {
    let w = world(None);
    let metrics_port = w.relay_metrics();
    let relay = w.relay();
    // Held to 40 MB/s, so that the kill lands mid-transfer.
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "bandwidth = \"40MB\"");
    let big = data(23, 96 * MIB);
    let mut daemon = w.send_until_held(&relay, "mri.dcm", &big, 16 * MIB as u64);
    let _ = daemon.kill(); // SIGKILL
    let _ = daemon.wait();
    let held = relay.partial_bytes();
    assert!(
        held < big.len() as u64,
        "the transfer ended before the kill"
    );
    assert_eq!(
        w.setup
            .journal_column("SELECT state || ' ' || CASE WHEN sha256 IS NULL THEN 'none' ELSE 'set' END FROM objects"),
        ["uploading none"],
        "the SHA-256 is fixed only once every byte was read"
    );
    // Once the relay noticed the first connection is gone, the transfer is free to resume.
    let mut daemon = w.setup.spawn_daemon(bin());
    let landed = w.landed.join("fhir/dkfz/mri.dcm");
    assert!(
        wait_until(Duration::from_secs(90), || landed.exists()),
        "{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    let read = rchar(&daemon.id().to_string());
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert_eq!(sha256(&std::fs::read(&landed).unwrap()), sha256(&big));
    let log = w.setup.daemon_log();
    assert!(
        log.contains("hashing them again, sending the rest"),
        "{log}"
    );
    assert_eq!(
        w.setup.journal_sha256("fhir/dkfz/mri.dcm"),
        Some(sha256(&big))
    );
    // The restarted agent read the file once: the held prefix to hash it, the rest to send it.
    let size = big.len() as u64;
    assert!(
        read >= size && read < size + 2 * MIB as u64,
        "the restarted agent read {read} bytes of a {size} byte file"
    );
    // What the relay took: the file once (what was in flight at the kill never arrived, or
    // arrived before the relay's offset was read).
    let (_, m) = http_get(metrics_port, "/metrics", None).expect("relay /metrics");
    assert_eq!(
        metric(&m, "ha_edge_relay_bytes_received_total"),
        Some(size as f64),
        "object bytes received more than once"
    );
    assert!(relay.partial_files().is_empty());
}

#[test]
fn a_relay_restarted_mid_transfer_resumes_where_its_disk_says() {
    let w = world(None);
    let mut relay = w.relay();
    w.agent_config(
        w.relay_port,
        "agent",
        "fhir/dkfz/",
        "request_timeout = \"3s\"",
    );
    let big = data(22, 48 * MIB);
    let mut daemon = w.send_until_held(&relay, "series.dcm", &big, 12 * MIB as u64);
    let _ = relay.child.kill(); // SIGKILL
    let _ = relay.child.wait();
    let held = relay.partial_bytes();
    let relay = w.relay();
    let landed = w.landed.join("fhir/dkfz/series.dcm");
    assert!(
        wait_until(Duration::from_secs(90), || landed.exists()),
        "{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert_eq!(sha256(&std::fs::read(&landed).unwrap()), sha256(&big));
    let log = relay.log();
    let resumed = log
        .lines()
        .rfind(|l| l.contains("resuming a partial transfer"))
        .unwrap_or_else(|| panic!("{log}"));
    let offset: u64 = resumed
        .split("offset=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert_eq!(offset, held, "resumed from what the relay's disk held");
    // The agent's session was with the relay before the restart, which took its sessions
    // along: the hello sent in 0-RTT is refused, and sent again after a full handshake.
    assert!(
        w.setup
            .daemon_log()
            .contains("0-RTT refused by the relay; hello sent again"),
        "{}",
        w.setup.daemon_log()
    );
}

/// Flips one byte the relay already holds (a bad disk, a bad copy) in the middle of a transfer;
/// `landed` reads the object where the relay lands it.
fn corrupt_mid_transfer(w: &World, relay: &Relay, landed: &dyn Fn() -> Option<Vec<u8>>) {
    let link = w.agent_behind_link();
    let big = data(23, 24 * MIB);
    let mut daemon = w.send_until_held(relay, "scan.dcm", &big, 2 * MIB as u64);
    flip_byte(&relay.partial_files().pop().unwrap(), 1000);
    assert!(
        wait_until(Duration::from_secs(120), || landed().is_some()),
        "{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    sigterm(&daemon);
    assert!(wait_within(&mut daemon, Duration::from_secs(20)).success());
    assert_eq!(
        sha256(&landed().unwrap()),
        sha256(&big),
        "only the good version lands"
    );
    assert!(
        relay.log().contains("do not match the offer"),
        "{}",
        relay.log()
    );
    assert!(
        w.setup
            .daemon_log()
            .contains("received something else than offered"),
        "{}",
        w.setup.daemon_log()
    );
    // Sent twice: the corrupted attempt is thrown away whole.
    assert!(link.bytes_up.load(Ordering::Relaxed) > 2 * big.len() as u64 - MIB as u64);
}

#[test]
fn corrupted_bytes_at_the_relay_are_detected_and_the_object_sent_again() {
    let w = world(None);
    let relay = w.relay();
    let path = w.landed.join("fhir/dkfz/scan.dcm");
    corrupt_mid_transfer(&w, &relay, &|| std::fs::read(&path).ok());
}

/// Landing in S3, the relay streams each part into the multipart upload as it arrives. With no
/// memory for assembly (`assembly_memory = "0"`) the part being assembled is on its disk: a
/// byte flipped there is caught by S3 itself (the part's SHA-256 was computed as the bytes
/// arrived), that part is not recorded, and the agent resends from the last part S3 holds; the
/// rest is not sent again.
#[test]
fn corrupted_bytes_never_reach_s3_the_part_is_sent_again() {
    let s3 = S3Server::start();
    s3.create_bucket("cloud");
    let w = world(Some(&format!("{}\nassembly_memory = \"0\"", s3_store(&s3))));
    let relay = w.relay();
    let link = w.agent_behind_link();
    let big = data(23, 24 * MIB);
    // Part 1 (5 MiB) is in S3, part 2 is being assembled on the relay's disk.
    let mut daemon = w.send_until_held(&relay, "scan.dcm", &big, 2 * MIB as u64);
    assert!(
        wait_until(Duration::from_secs(60), || state_parts(&s3) == Some(1)
            && relay.partial_bytes() >= MIB as u64),
        "{:?}\n{}",
        s3.keys("cloud"),
        relay.log()
    );
    flip_byte(&relay.partial_files().pop().unwrap(), 1000);
    let key = "fhir/dkfz/scan.dcm";
    landed_then_stop(&w, &s3, key, &big, &relay, &mut daemon);
    assert!(relay.log().contains("S3 refused part"), "{}", relay.log());
    assert!(
        w.setup
            .daemon_log()
            .contains("the relay holds the first bytes already"),
        "{}",
        w.setup.daemon_log()
    );
    assert_eq!(s3.open_uploads(), 0);
    // The state object is gone with the transfer: the bucket holds the object only.
    assert_eq!(s3.keys("cloud"), [key]);
    // Part 1 was not sent again: the agent resumed after it, at 5 MiB.
    let log = w.setup.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("the relay holds the first bytes already")
                && l.contains("offset=5242880")),
        "{log}"
    );
    // (No bound on the bytes on the wire: the refusal is seen when the part after the bad one
    // is cut, and BBR retransmits what the forwarder drops; the resume offset above is what
    // shows that part 1 was not sent again.)
    drop(link);
}

/// The parts recorded in the relay's one transfer state object in bucket "cloud", if there is
/// one.
fn state_parts(s3: &S3Server) -> Option<usize> {
    Some(state_object(s3)?["parts"].as_array()?.len())
}

/// The relay's one transfer state object in bucket "cloud", if there is one.
fn state_object(s3: &S3Server) -> Option<serde_json::Value> {
    let keys: Vec<String> = s3
        .keys("cloud")
        .into_iter()
        .filter(|k| k.starts_with(".ha-edge-relay/transfers/"))
        .collect();
    let [one] = keys.as_slice() else { return None };
    serde_json::from_slice(&s3.object("cloud", one)?).ok()
}

#[test]
fn certificates_from_another_ca_or_expired_are_refused_at_the_handshake() {
    let w = world(None);
    let relay = w.relay();
    write_settled(&w.setup.src().join("a.ndjson"), b"{}\n");
    let other = Ca::new(w.setup.dir.path(), "other-ca");
    let (c, k) = other.issue("stranger", DKFZ, false);
    let (ce, ke) = w.ca.issue("expired", DKFZ, true);
    let (cf, kf) = w.ca.issue_with("future", &[DKFZ], DKFZ, Some((2099, 2100)));
    for (cert, key, what) in [
        (&c, &k, "another CA"),
        (&ce, &ke, "expired"),
        (&cf, &kf, "not yet valid"),
    ] {
        w.agent_config_with(w.relay_port, cert, key, &w.ca.pem(), "fhir/dkfz/", "");
        let out = w.setup.run_once(bin());
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(3), "{what}: {err}");
        assert!(err.contains("refuses this agent"), "{what}: {err}");
        assert!(err.contains("TLS handshake refused"), "{what}: {err}");
    }
    assert!(!w.landed.join("fhir/dkfz/a.ndjson").exists());
    assert!(
        relay
            .log()
            .matches("connection refused in the handshake")
            .count()
            >= 3,
        "{}",
        relay.log()
    );
    // A certificate from the right CA whose name is not in [[agent]]: refused by identity.
    let (ci, ki) = w.ca.issue("unknown", "unknown.agents.test", false);
    w.agent_config_with(w.relay_port, &ci, &ki, &w.ca.pem(), "fhir/dkfz/", "");
    let out = w.setup.run_once(bin());
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("carries no identity"));
}

#[test]
fn an_agent_cannot_write_outside_its_prefix() {
    let w = world(None);
    let relay = w.relay();
    write_settled(&w.setup.src().join("x.ndjson"), b"{}\n");
    // Authorized for fhir/dkfz/, configured to write fhir/embl/.
    w.agent_config(w.relay_port, "agent", "fhir/embl/", "");
    let out = w.setup.run_once(bin());
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("may write under"), "{err}");
    assert!(!w.landed.join("fhir/embl/x.ndjson").exists());
    assert!(relay.log().contains("key outside the agent's prefix"));
    assert!(relay.partial_files().is_empty(), "nothing was accepted");
}

/// A quinn client endpoint with a certificate for DKFZ from the world's CA (trusting only it),
/// keeping its connections alive every `keep_alive` if set.
fn raw_endpoint(w: &World, cert_name: &str, keep_alive: Option<Duration>) -> quinn::Endpoint {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let (cert, key) = w.ca.issue(cert_name, DKFZ, false);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(w.ca.pem()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&key).unwrap())
        .unwrap();
    cfg.alpn_protocols = vec![ha_edge_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    if let Some(k) = keep_alive {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(k));
        client.transport_config(Arc::new(transport));
    }
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client);
    ep
}

/// A bare protocol client (quinn + ha-edge-proto, no agent): offers keys the agent itself would
/// never produce.
async fn offer_raw(w: &World, keys: &[&str]) -> Vec<ha_edge_proto::UploadEvent> {
    let sized: Vec<(&str, u64)> = keys.iter().map(|k| (*k, 1)).collect();
    offer_raw_sized(w, &sized).await
}

/// Like `offer_raw`, with a size per offer; every accepted offer is abandoned (no data sent).
async fn offer_raw_sized(w: &World, offers: &[(&str, u64)]) -> Vec<ha_edge_proto::UploadEvent> {
    use std::time::Instant;
    let ep = raw_endpoint(w, "raw", None);
    let addr = format!("127.0.0.1:{}", w.relay_port).parse().unwrap();
    let conn = ep.connect(addr, RELAY_NAME).unwrap().await.unwrap();
    let idle = Duration::from_secs(5);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut hs = ha_edge_proto::ClientHandshake::new("raw", Instant::now(), idle);
    while let Some(f) = hs.poll_transmit() {
        send.write_all(&f).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    loop {
        let n = recv.read(&mut buf).await.unwrap().unwrap();
        if hs
            .handle_input(&buf[..n], Instant::now())
            .unwrap()
            .is_some()
        {
            break;
        }
    }
    let mut out = Vec::new();
    for (k, size) in offers {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut up = ha_edge_proto::Upload::new(k, *size, [7; 32], Instant::now(), idle);
        while let Some(f) = up.poll_transmit() {
            send.write_all(&f).await.unwrap();
        }
        loop {
            let n = recv.read(&mut buf).await.unwrap().unwrap();
            if let Some(ev) = up.handle_input(&buf[..n], Instant::now()).unwrap() {
                out.push(ev);
                break;
            }
        }
    }
    conn.close(0u32.into(), b"done");
    out
}

/// Each answer's refusal reason, None for an answer that is not a refusal.
fn refusals(answers: &[ha_edge_proto::UploadEvent]) -> Vec<Option<ha_edge_proto::Refusal>> {
    answers
        .iter()
        .map(|a| match a {
            ha_edge_proto::UploadEvent::Refused { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_refuses_dot_dot_absolute_and_foreign_keys_from_any_client() {
    use ha_edge_proto::{Refusal, UploadEvent};
    let w = world(None);
    let relay = w.relay();
    let answers = offer_raw(
        &w,
        &[
            "fhir/dkfz/../embl/x.ndjson",
            "/fhir/dkfz/x.ndjson",
            "fhir/dkfz//x.ndjson",
            "fhir/embl/x.ndjson",
            "fhir/dkfz/ok.ndjson",
        ],
    )
    .await;
    let reasons = refusals(&answers);
    assert_eq!(
        reasons,
        [
            Some(Refusal::BadKey),
            Some(Refusal::BadKey),
            Some(Refusal::BadKey),
            Some(Refusal::Unauthorized),
            None
        ],
        "{answers:?}\n{}",
        relay.log()
    );
    assert_eq!(answers[4], UploadEvent::SendFrom(0));
    assert!(!w.landed.join("fhir/embl").exists());
}

// ---------------------------------------------------------------------------------------------
// Hardening findings 8 and 9: authorization by path segment and by exact identity.

fn relay_check(dir: &Path) -> std::process::Output {
    output_within(
        {
            let mut c = Command::new(bin());
            c.args(["relay", "--check", "-c"])
                .arg(dir.join("relay.toml"));
            c
        },
        Duration::from_secs(30),
    )
}

#[test]
fn f08_an_agent_prefix_is_a_path_segment_not_a_string_prefix() {
    let w = world(None);
    let dir = w.setup.dir.path();
    let store = format!("type = \"dir\"\npath = \"{}\"", w.landed.display());
    // Written without the trailing '/': still means the folder fhir/dkfz/.
    Relay::config(
        dir,
        w.relay_port,
        &w.ca,
        &store,
        "[[agent]]\nidentity = \"dkfz-edge-01.agents.test\"\nprefix = \"fhir/dkfz\"",
    );
    let relay = w.relay();
    write_settled(&w.setup.src().join("x.ndjson"), b"{}\n");
    // Each attempt with a fresh journal (keys are fixed when a file is discovered).
    let fresh = || {
        let _ = std::fs::remove_dir_all(w.setup.journal().parent().unwrap());
    };
    for prefix in ["fhir/dkfz-other/", "fhir/dkfz"] {
        fresh();
        w.agent_config(w.relay_port, "agent", prefix, "");
        let out = w.setup.run_once(bin());
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(3), "{prefix}: {err}");
        assert!(err.contains("may write under"), "{prefix}: {err}");
    }
    assert!(!w.landed.join("fhir/dkfz-other").exists());
    assert!(!w.landed.join("fhir/dkfzx.ndjson").exists());
    fresh();
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    assert!(w.landed.join("fhir/dkfz/x.ndjson").exists());
    drop(relay);

    // `relay --check` refuses prefixes that cannot be authorized apart.
    let two = |a: &str, b: &str| {
        format!(
            "[[agent]]\nidentity = \"a.agents.test\"\nprefix = \"{a}\"\n\n\
             [[agent]]\nidentity = \"b.agents.test\"\nprefix = \"{b}\""
        )
    };
    for (agents, key) in [
        (two("", "fhir/b/"), "agent[0].prefix"),
        (two("fhir//a/", "fhir/b/"), "agent[0].prefix"),
        (two("fhir/a/", "fhir/a/"), "agent[1].prefix"),
        (two("fhir/", "fhir/b/"), "agent[1].prefix"),
    ] {
        Relay::config(dir, w.relay_port, &w.ca, &store, &agents);
        let out = relay_check(dir);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{agents}: {err}");
        assert!(err.contains(key), "{agents}: {err}");
    }
    Relay::config(dir, w.relay_port, &w.ca, &store, &two("fhir/a", "fhir/ab"));
    let out = relay_check(dir);
    assert!(
        out.status.success(),
        "apart by segment: {}",
        stderr_of(&out)
    );
    // The relay's state inside the directory it lands in.
    let inside = format!("type = \"dir\"\npath = \"{}\"", dir.display());
    Relay::config(dir, w.relay_port, &w.ca, &inside, DKFZ_AGENT);
    let out = relay_check(dir);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("state_dir"), "{}", stderr_of(&out));
}

#[test]
fn f09_a_wildcard_or_cn_only_certificate_never_authorizes() {
    let w = world(None);
    let relay = w.relay();
    // The real agent delivers first; the impostors must not replace its object.
    write_settled(&w.setup.src().join("a.ndjson"), b"the real one\n");
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (cw, kw) =
        w.ca.issue_with("wildcard", &["*.agents.test"], "wildcard", None);
    let (cn, kn) = w.ca.issue_with("cn-only", &[], DKFZ, None);
    for (cert, key, what) in [(&cw, &kw, "wildcard SAN"), (&cn, &kn, "CN only")] {
        write_settled(
            &w.setup.src().join("a.ndjson"),
            format!("{what}\n").as_bytes(),
        );
        w.agent_config_with(w.relay_port, cert, key, &w.ca.pem(), "fhir/dkfz/", "");
        let out = w.setup.run_once(bin());
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(3), "{what}: {err}");
        assert!(err.contains("carries no identity"), "{what}: {err}");
    }
    assert_eq!(
        std::fs::read(w.landed.join("fhir/dkfz/a.ndjson")).unwrap(),
        b"the real one\n",
        "{}",
        relay.log()
    );
}

#[test]
fn f11_a_landing_that_fails_after_commit_is_answered_and_handled() {
    let w = world(None);
    let relay = w.relay();
    // The key names a directory in the landing directory: it can never land there.
    std::fs::create_dir_all(w.landed.join("fhir/dkfz/x.ndjson/inside")).unwrap();
    write_settled(&w.setup.src().join("x.ndjson"), &data(11, 300_000));
    write_settled(&w.setup.src().join("ok.ndjson"), b"{}\n");
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let out = w.setup.run_once(bin());
    let err = stderr_of(&out);
    // Permanent: rejected once (not retried as a protocol violation), the other file lands.
    assert_eq!(out.status.code(), Some(1), "{err}\n{}", relay.log());
    assert!(err.contains("1 rejected"), "{err}");
    assert!(
        err.contains("the relay refuses the key fhir/dkfz/x.ndjson"),
        "{err}"
    );
    assert!(!err.contains("unexpected"), "{err}");
    assert!(w.landed.join("fhir/dkfz/ok.ndjson").is_file());
    let mut counts = w.setup.journal_counts();
    counts.sort();
    assert_eq!(
        counts,
        vec![("done".to_string(), 1), ("rejected".to_string(), 1)]
    );
    assert!(
        relay.partial_files().is_empty(),
        "the partial of a transfer that can never land is removed: {:?}",
        relay.partial_files()
    );
}

const EMBL: &str = "embl-edge-01.agents.test";

#[tokio::test(flavor = "multi_thread")]
async fn f10_one_agent_abusing_the_relay_limits_does_not_starve_another() {
    use ha_edge_proto::Refusal;
    let w = world(None);
    let dir = w.setup.dir.path().to_path_buf();
    let store = format!("type = \"dir\"\npath = \"{}\"", w.landed.display());
    let agents = format!(
        "max_partials = 2\nmax_partial_bytes = \"64MiB\"\n\n{DKFZ_AGENT}\n\n\
         [[agent]]\nidentity = \"{EMBL}\"\nprefix = \"fhir/embl/\""
    );
    Relay::config(&dir, w.relay_port, &w.ca, &store, &agents);
    let relay = w.relay();
    // Agent A (dkfz) abandons transfers up to its limit, then offers 1 GiB.
    let answers = offer_raw_sized(
        &w,
        &[
            ("fhir/dkfz/a1.ndjson", 10),
            ("fhir/dkfz/a2.ndjson", 10),
            ("fhir/dkfz/a3.ndjson", 10),
            ("fhir/dkfz/huge.ndjson", 1 << 30),
        ],
    )
    .await;
    let reasons = refusals(&answers);
    assert_eq!(
        reasons[..3],
        [None, None, Some(Refusal::Busy)],
        "{answers:?}\n{}",
        relay.log()
    );
    // The 1 GiB offer can never fit A's share: refused for good (Rejected), not "busy".
    assert!(reasons[3].is_some_and(|r| !r.is_temporary()), "{answers:?}");
    assert!(
        relay.partial_bytes() < 1 << 20,
        "the 1 GiB offer took no space"
    );
    // Agent B (embl) is not affected by A's share.
    let (c, k) = w.ca.issue("embl", EMBL, false);
    // (within its own limit of two partial transfers at once)
    w.agent_config_with(
        w.relay_port,
        &c,
        &k,
        &w.ca.pem(),
        "fhir/embl/",
        "concurrency = 2",
    );
    for i in 0..3 {
        write_settled(
            &w.setup.src().join(format!("b{i}.ndjson")),
            &data(900 + i, 200_000),
        );
    }
    let setup = &w.setup;
    let out = tokio::task::block_in_place(|| setup.run_once(bin()));
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    for i in 0..3 {
        assert!(w.landed.join(format!("fhir/embl/b{i}.ndjson")).is_file());
    }
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn f10_an_offer_larger_than_the_free_state_disk_is_refused_busy_and_takes_nothing() {
    use ha_edge_proto::{Refusal, UploadEvent};
    let w = world(None);
    let _state = Tmpfs::mount(&w.setup.dir.path().join("relay-state"), "8m");
    let relay = w.relay();
    let answers = offer_raw_sized(
        &w,
        &[
            ("fhir/dkfz/big.ndjson", 20 << 20),
            ("fhir/dkfz/small.ndjson", 1000),
        ],
    )
    .await;
    match &answers[0] {
        UploadEvent::Refused { reason, message } => {
            assert_eq!(*reason, Refusal::Busy, "{message}");
            assert!(message.contains("state disk"), "{message}");
        }
        other => panic!("{other:?}\n{}", relay.log()),
    }
    assert_eq!(answers[1], UploadEvent::SendFrom(0), "{}", relay.log());
    assert_eq!(relay.partial_bytes(), 0);
    // Finding 6 on the relay: partial transfers (and their directory) are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let partials = relay.partial_files();
    assert_eq!(partials.len(), 1, "the small offer's partial transfer");
    assert_eq!(mode(&partials[0]), 0o600);
    assert_eq!(mode(partials[0].parent().unwrap()), 0o700);
}

/// A client that completes TLS with a valid certificate, keeps the connection alive, and never
/// says Hello.
async fn silent_connection(w: &World) -> Result<quinn::Connection, String> {
    let ep = raw_endpoint(w, "silent", Some(Duration::from_millis(500)));
    let addr = format!("127.0.0.1:{}", w.relay_port).parse().unwrap();
    let conn = ep.connect(addr, RELAY_NAME).map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // Prove the connection is open: the relay must accept it before refusing anything else.
    Ok(conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn f12_silent_connections_are_bounded_per_address_and_in_time() {
    let w = world(None);
    let dir = w.setup.dir.path().to_path_buf();
    let store = format!("type = \"dir\"\npath = \"{}\"", w.landed.display());
    let agents = format!("max_connections_per_address = 4\n\n{DKFZ_AGENT}");
    Relay::config(&dir, w.relay_port, &w.ca, &store, &agents);
    let relay = w.relay();
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        match silent_connection(&w).await {
            Ok(c) => open.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(open.len(), 4, "{}", relay.log());
    assert_eq!(refused, 4);
    // The relay ends each silent connection at its handshake deadline (idle_timeout, 3 s
    // here), keep-alives or not.
    for c in &open {
        let closed = tokio::time::timeout(Duration::from_secs(10), c.closed()).await;
        assert!(closed.is_ok(), "still open: {}", relay.log());
    }
    // And then the real agent gets in.
    write_settled(&w.setup.src().join("a.ndjson"), b"{}\n");
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    let setup = &w.setup;
    let out = tokio::task::block_in_place(|| setup.run_once(bin()));
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
}

#[test]
fn f13_validate_asks_the_relay() {
    let w = world(None);
    let quick = "request_timeout = \"3s\"";
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", quick);
    let cfg = w.setup.config_path();
    let validate = |extra: &[&str]| {
        let mut args = vec!["validate", "-c", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        output_within(w.setup.command(bin(), &args), Duration::from_secs(60))
    };
    // No relay yet: refused (exit 3), offline fine.
    let out = validate(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("relay"), "{}", stderr_of(&out));
    assert!(validate(&["--offline"]).status.success());
    let relay = w.relay();
    let out = validate(&[]);
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    // A certificate the relay does not authorize.
    let (c, k) = w.ca.issue("unknown", "unknown.agents.test", false);
    w.agent_config_with(w.relay_port, &c, &k, &w.ca.pem(), "fhir/dkfz/", "");
    let out = validate(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("carries no identity"),
        "{}",
        stderr_of(&out)
    );
}

/// Two relays in front of one S3 bucket; the one serving a 200 MiB transfer is killed (-9)
/// mid-way. The agent moves to the other, which finds the transfer's state in S3 and answers
/// the offset S3 holds: only what the first relay had not recorded there (the part in flight to
/// S3 and the one being assembled, in memory) is sent again. The object is byte-identical and no upload is
/// left open.
#[test]
fn the_agent_fails_over_to_the_next_relay_and_resumes_from_what_s3_holds() {
    fails_over_and_resumes(false);
}

/// The same over https: the upload is checked by CRC-64/NVME, its parts sent unsigned; the
/// second relay takes the parts' CRCs from the state object and the server confirms the whole
/// object's, combined from them.
#[test]
fn over_https_the_next_relay_resumes_a_crc64nvme_upload_from_what_s3_holds() {
    fails_over_and_resumes(true);
}

fn fails_over_and_resumes(tls: bool) {
    let s3 = S3Server::start();
    s3.create_bucket("cloud");
    let front = tls.then(|| TlsFront::start(s3.port));
    let store = match &front {
        Some(f) => s3_store_at(&f.endpoint(), Some(&f.ca())),
        None => s3_store(&s3),
    };
    let w = world(Some(&store));
    let first = w.relay();
    // A second relay in front of the same bucket, in its own directory (its own disk).
    let dir_b = w.setup.dir.path().join("relay-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let port_b = free_udp_port();
    let cfg_b = Relay::config(&dir_b, port_b, &w.ca, &store, DKFZ_AGENT);
    let metrics_b = metrics_on(&cfg_b);
    let second = Relay::start(&dir_b);
    let (c, k) = w.ca.issue("agent", DKFZ, false);
    w.agent_config_to(
        &format!("[\"127.0.0.1:{}\", \"127.0.0.1:{port_b}\"]", w.relay_port),
        &c,
        &k,
        &w.ca.pem(),
        "fhir/dkfz/",
        "request_timeout = \"3s\"",
    );
    let part = 5 * MIB as u64;
    let big = data(31, 200 * MIB);
    write_settled(&w.setup.src().join("big.dcm"), &big);
    let mut daemon = w.setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(120), || state_parts(&s3)
            .is_some_and(|n| n >= 16)),
        "{}\n{}",
        w.setup.daemon_log(),
        first.log()
    );
    // Freeze the first relay, note what it holds, then kill it: no goodbye on the connection.
    send_signal(&first.child, "STOP");
    let recorded = state_parts(&s3).unwrap() as u64;
    let state = state_object(&s3).unwrap();
    // A sealed offer (the agent hashes as it sends): the upload is checked by CRC-64/NVME over
    // http too, since its metadata cannot name a SHA-256 not known yet.
    assert_eq!(state["sealed"], true, "{state}");
    assert_eq!(state["crc64nvme"], true, "{state}");
    for p in state["parts"].as_array().unwrap() {
        assert!(p["crc64nvme"].is_string(), "{p}");
        assert!(p["sha256"].is_null(), "{p}");
    }
    let on_disk = first.partial_bytes();
    assert_eq!(
        on_disk, 0,
        "parts are assembled in memory (the default budget): nothing of them is on the disk"
    );
    let mut first = first;
    let _ = first.child.kill();
    let _ = first.child.wait();
    let key = "fhir/dkfz/big.dcm";
    landed_then_stop(&w, &s3, key, &big, &second, &mut daemon);
    assert!(second.log().contains("stored and verified"));
    let log = w.setup.daemon_log();
    assert!(
        log.contains("connected to another relay (fail-over)"),
        "{log}"
    );
    // The second relay took the rest from the offset S3 holds: every recorded part stayed.
    let (_, m) = http_get(metrics_b, "/metrics", None).expect("relay /metrics");
    let took = metric(&m, "ha_edge_relay_bytes_received_total").unwrap();
    assert_eq!(
        took,
        (big.len() as u64 - recorded * part) as f64,
        "resumed at the {recorded} parts S3 holds"
    );
    eprintln!(
        "killed with {recorded} parts recorded in S3 and {on_disk} bytes on its disk (parts assemble in memory): the second relay took everything after part {recorded}"
    );
    assert_eq!(s3.open_uploads(), 0, "no upload left open");
    assert_eq!(s3.keys("cloud"), [key], "no state object left");
    assert_checked(&s3, &w.setup, key, &big);
}

/// A relay landing in bucket "cloud" over https: s3s-fs, the recording proxy in front of it
/// (which sees each request as sent), and a TLS front before both; the agent set up for the
/// relay with `agent_extra`.
/// (Bind `_front` when taking it apart: a field left out is dropped at once, and the front
/// with it.)
struct OverHttps {
    s3: S3Server,
    proxy: Proxy,
    _front: TlsFront,
    w: World,
    relay: Relay,
}

impl OverHttps {
    fn start(agent_extra: &str) -> OverHttps {
        let s3 = S3Server::start();
        s3.create_bucket("cloud");
        let proxy = Proxy::start(s3.port);
        let front = TlsFront::start(proxy.port);
        let w = world(Some(&s3_store_at(&front.endpoint(), Some(&front.ca()))));
        let relay = w.relay();
        w.agent_config(w.relay_port, "agent", "fhir/dkfz/", agent_extra);
        OverHttps {
            s3,
            proxy,
            _front: front,
            w,
            relay,
        }
    }
}

/// Over https the relay lands a large object as the agent's direct path does: its parts go
/// with `UNSIGNED-PAYLOAD` and their CRC-64/NVME (no SHA-256 of each part), the server checks
/// the whole object's CRC-64/NVME, and the object keeps its SHA-256 in its metadata.
#[test]
fn over_https_the_relay_sends_parts_unsigned_with_their_crc64nvme() {
    let OverHttps {
        s3,
        proxy,
        w,
        relay,
        _front: _tls,
    } = OverHttps::start("");
    let big = data(33, 23 * MIB);
    write_settled(&w.setup.src().join("ct.dcm"), &big);
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    let key = "fhir/dkfz/ct.dcm";
    assert_eq!(sha256(&s3.object("cloud", key).unwrap()), sha256(&big));
    assert_checked(&s3, &w.setup, key, &big);
    let seen = proxy.seen();
    let parts: Vec<&SeenRequest> = seen.iter().filter(|r| r.op() == "UploadPart").collect();
    assert_eq!(parts.len(), 5, "{parts:?}");
    for p in parts {
        let n = p.part_number().unwrap() as usize;
        let part = &big[(n - 1) * 5 * MIB..(n * 5 * MIB).min(big.len())];
        assert_eq!(p.header("x-amz-content-sha256"), Some("UNSIGNED-PAYLOAD"));
        assert_eq!(
            p.header("x-amz-checksum-crc64nvme"),
            Some(crc64nvme_b64(part).as_str())
        );
    }
    assert_eq!(s3.open_uploads(), 0);
}

/// The relay keeps its https connections to S3 for the next request: many small objects
/// through it open no more connections than were ever busy at once. (A TLS handshake per PUT
/// costs CPU on both sides and a round trip, and S3 throttles new connections.)
#[test]
fn over_https_the_relay_reuses_its_connections_to_s3() {
    let OverHttps {
        s3,
        proxy,
        w,
        relay,
        _front: _tls,
    } = OverHttps::start("");
    let files = w.setup.write_files("obs", 400, 70, 20 * 1024);
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    for (name, bytes) in &files {
        let got = s3.object("cloud", &format!("fhir/dkfz/{name}")).unwrap();
        assert_eq!(sha256(&got), sha256(bytes), "{name}");
    }
    let accepted = proxy.accepted.load(std::sync::atomic::Ordering::SeqCst);
    let peak = proxy.peak_open.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("{accepted} connections to S3 for 400 objects, at most {peak} open at once");
    assert!(
        accepted <= peak + 4,
        "{accepted} connections opened for at most {peak} open at once: connections are not kept"
    );
}

/// A store behind https that refuses CRC-64/NVME uploads (an older S3-compatible server): the
/// relay says so once and lands every object with SHA-256 parts, verified.
#[test]
fn over_https_a_store_that_refuses_crc64nvme_gets_sha256_parts_with_one_warning() {
    let OverHttps {
        s3,
        proxy,
        w,
        relay,
        _front: _tls,
    } = OverHttps::start("concurrency = 1");
    proxy.add_rule(
        Rule::new(
            "CreateMultipartUpload",
            Fault::Status {
                status: 501,
                code: "NotImplemented",
                retry_after: None,
            },
            100,
        )
        .with_header("x-amz-checksum-algorithm", "CRC64NVME"),
    );
    let files: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| (format!("ct{i}.dcm"), data(60 + i, 11 * MIB)))
        .collect();
    for (name, body) in &files {
        write_settled(&w.setup.src().join(name), body);
    }
    let out = w.setup.run_once(bin());
    assert!(out.status.success(), "{}\n{}", stderr_of(&out), relay.log());
    for (name, body) in &files {
        let key = format!("fhir/dkfz/{name}");
        assert_eq!(sha256(&s3.object("cloud", &key).unwrap()), sha256(body));
        let meta = s3.metadata("cloud", &key).unwrap();
        assert_eq!(meta["user_metadata"]["sha256"], sha256(body), "{meta}");
    }
    assert_eq!(proxy.faults_injected(), 1, "asked once, then SHA-256");
    let parts: Vec<SeenRequest> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.op() == "UploadPart")
        .collect();
    assert_eq!(parts.len(), 6);
    assert!(parts
        .iter()
        .all(|p| p.header("x-amz-checksum-sha256").is_some()
            && p.header("x-amz-content-sha256") != Some("UNSIGNED-PAYLOAD")));
    assert_eq!(
        relay
            .log()
            .matches("the store refuses full-object CRC64NVME checksums")
            .count(),
        1
    );
    assert_eq!(s3.open_uploads(), 0);
}

/// A transfer kept in S3 whose agent never comes back is given up after `partial_ttl`: its
/// upload aborted and its state object deleted (by whichever replica sweeps first).
#[test]
fn an_abandoned_transfer_in_s3_is_aborted_after_the_partial_ttl() {
    let s3 = S3Server::start();
    s3.create_bucket("cloud");
    let w = world(Some(&s3_store(&s3)));
    let cfg = w.setup.dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("partial_ttl = \"1h\"", "partial_ttl = \"3s\"");
    std::fs::write(&cfg, text).unwrap();
    let relay = w.relay();
    w.agent_config(w.relay_port, "agent", "fhir/dkfz/", "");
    // Large enough that it cannot finish between the first recorded part and the kill.
    write_settled(&w.setup.src().join("big.dcm"), &data(41, 200 * MIB));
    let mut daemon = w.setup.spawn_daemon(bin());
    assert!(
        wait_until(Duration::from_secs(60), || state_parts(&s3)
            .is_some_and(|n| n >= 1)),
        "{}",
        relay.log()
    );
    // The agent is gone for good.
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(s3.object("cloud", "fhir/dkfz/big.dcm").is_none());
    // The sweep logs once it has aborted and deleted: wait for both, not for S3 alone.
    assert!(
        wait_until(Duration::from_secs(30), || state_parts(&s3).is_none()
            && s3.open_uploads() == 0
            && relay.log().contains("aborted idle transfers kept in S3")),
        "{}",
        relay.log()
    );
    assert!(s3.keys("cloud").is_empty(), "{:?}", s3.keys("cloud"));
}

/// Waits until `key` is in bucket "cloud", stops the agent (SIGTERM, a clean exit) and checks
/// the object is `bytes`, byte for byte.
fn landed_then_stop(
    w: &World,
    s3: &S3Server,
    key: &str,
    bytes: &[u8],
    relay: &Relay,
    daemon: &mut Child,
) {
    assert!(
        wait_until(Duration::from_secs(120), || s3
            .object("cloud", key)
            .is_some()),
        "{}\n{}",
        w.setup.daemon_log(),
        relay.log()
    );
    sigterm(daemon);
    assert!(wait_within(daemon, Duration::from_secs(20)).success());
    assert_eq!(sha256(&s3.object("cloud", key).unwrap()), sha256(bytes));
}

/// What an object the relay landed in S3 proves about its bytes. Up to one part (5 MiB here),
/// landed by one verified upload: its SHA-256, in `x-amz-meta-sha256`. Larger, streamed into a
/// multipart upload from a sealed offer (the agent hashes as it sends, so the SHA-256 is known
/// only after the upload was created): the full-object CRC-64/NVME that S3 checked at
/// completion, and the SHA-256 the relay checked, in the agent's journal (and receipt).
fn assert_checked(s3: &S3Server, setup: &Setup, key: &str, bytes: &[u8]) {
    let meta = s3.metadata("cloud", key).unwrap();
    if bytes.len() <= 5 * MIB {
        assert_eq!(
            meta["user_metadata"]["sha256"],
            sha256(bytes),
            "{key}: {meta}"
        );
        return;
    }
    assert_eq!(meta["checksum_type"], "FULL_OBJECT", "{key}: {meta}");
    let sums = s3.checksums("cloud", key).unwrap();
    assert_eq!(
        sums["checksum_crc64nvme"],
        crc64nvme_b64(bytes),
        "{key}: {sums}"
    );
    assert_eq!(setup.journal_sha256(key), Some(sha256(bytes)), "{key}");
}

/// Flips the byte at `at` in the file at `path` (a bad disk, a bad copy).
fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
}

/// Turns the metrics endpoint on in the relay config at `cfg` (before the relay starts); its
/// port.
fn metrics_on(cfg: &Path) -> u16 {
    let port = free_port();
    let text = std::fs::read_to_string(cfg).unwrap().replace(
        "partial_ttl = \"1h\"\n",
        &format!("partial_ttl = \"1h\"\nmetrics = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(cfg, text).unwrap();
    port
}
