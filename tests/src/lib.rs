//! End-to-end harness for ha-edge: a real S3-compatible server (s3s-fs, which verifies SigV4 and
//! supports multipart uploads) on 127.0.0.1, a sniffing TCP proxy that counts and can slow down
//! requests, and helpers to write configs and run the real `ha-edge` binary.
//!
//! Each test gets its own server process, data directory and port, so tests never share state.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The record-check corpus (FHIR NDJSON, DICOM).
pub mod corpus;

pub const ACCESS_KEY: &str = "ha-edge-test-ak";
pub const SECRET_KEY: &str = "ha-edge-test-secret-key";

/// Where the s3s-fs binary is: $HA_EDGE_S3S_FS, then PATH, then /opt/s3s-fs/bin.
pub fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("HA_EDGE_S3S_FS") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("s3s-fs");
        if p.is_file() {
            return p;
        }
    }
    let p = PathBuf::from("/opt/s3s-fs/bin/s3s-fs");
    assert!(
        p.is_file(),
        "s3s-fs not found: run `scripts/install-s3s-fs.sh` (or set HA_EDGE_S3S_FS)"
    );
    p
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Starts the server `command(port)` makes on a free port, trying another port if it does not
/// listen within 10 s (another process took it meanwhile); its process and port.
fn spawn_listening(what: &str, mut command: impl FnMut(u16) -> Command) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = command(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        if wait_for_port(port, Duration::from_secs(10)) {
            return (child, port);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{what} did not start");
}

/// A running s3s-fs with its own data directory.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub data: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let data = tempfile::tempdir().expect("temp dir");
        let (child, port) = spawn_listening("s3s-fs", |port| {
            let mut c = Command::new(s3s_fs_bin());
            c.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(data.path());
            c
        });
        S3Server { child, port, data }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.data.path().join(name)).expect("create bucket dir");
    }

    /// Stores an object the way a PUT would make it visible: whole at once (written beside,
    /// then renamed into place).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let dest = self.data.path().join(bucket).join(key);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        let tmp = self.data.path().join(format!(".put-{}", fastrand_name()));
        std::fs::write(&tmp, bytes).expect("write object");
        std::fs::rename(&tmp, &dest).expect("rename object");
    }

    /// The stored bytes of an object (s3s-fs keeps objects as plain files).
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.data.path().join(bucket).join(key)).ok()
    }

    /// All object keys in a bucket, sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let root = self.data.path().join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        std::fs::read_dir(self.data.path())
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with(".upload-") && n.ends_with(".json")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// The keys of multipart uploads started and neither completed nor aborted (s3s-fs keeps an
    /// `.upload-<id>.json` per open upload and the upload's metadata under the key's name).
    pub fn open_upload_keys(&self) -> Vec<String> {
        use base64::Engine as _;
        let names: Vec<String> = std::fs::read_dir(self.data.path())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let mut keys = Vec::new();
        for n in &names {
            let Some(id) = n
                .strip_prefix(".upload-")
                .and_then(|r| r.strip_suffix(".json"))
            else {
                continue;
            };
            let suffix = format!(".upload-{id}.metadata.json");
            let key = names
                .iter()
                .find_map(|m| m.strip_suffix(&suffix))
                .and_then(|m| m.split_once(".object-"))
                .and_then(|(_, k)| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(k)
                        .ok()
                })
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .unwrap_or_else(|| format!("<unknown key of upload {id}>"));
            keys.push(key);
        }
        keys.sort();
        keys
    }

    /// The user metadata s3s-fs stored for an object.
    pub fn metadata(&self, bucket: &str, key: &str) -> Option<serde_json::Value> {
        use base64::Engine as _;
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let name = format!(".bucket-{}.object-{}.metadata.json", enc(bucket), enc(key));
        let text = std::fs::read_to_string(self.data.path().join(name)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The checksums s3s-fs computed over a stored object (its `.internal.json`: e.g.
    /// `checksum_crc64nvme` for a multipart upload created for a full-object CRC64NVME).
    pub fn checksums(&self, bucket: &str, key: &str) -> Option<serde_json::Value> {
        use base64::Engine as _;
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let name = format!(".bucket-{}.object-{}.internal.json", enc(bucket), enc(key));
        let text = std::fs::read_to_string(self.data.path().join(name)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fastrand_name() -> String {
    use std::sync::atomic::AtomicUsize;
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An https front for a plain-HTTP server on 127.0.0.1 (stunnel, Debian's `stunnel4`): TLS
/// terminated with a certificate for `localhost` and 127.0.0.1 from a CA made for it, the bytes
/// passed on unchanged. S3 over https is what the agent and the relay speak in production.
pub struct TlsFront {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl TlsFront {
    /// Starts a front for `upstream` (e.g. an `S3Server`'s or a `Proxy`'s port).
    pub fn start(upstream: u16) -> TlsFront {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ha-edge test S3 CA");
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write CA");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        leaf.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate().expect("key");
        let issuer = Issuer::new(ca, ca_key);
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
        let (cert, key) = (dir.path().join("s3.pem"), dir.path().join("s3.key"));
        std::fs::write(&cert, leaf_cert.pem()).expect("write cert");
        std::fs::write(&key, leaf_key.serialize_pem()).expect("write key");
        let bin = ["stunnel4", "stunnel"]
            .into_iter()
            .flat_map(|b| {
                let path = std::env::var("PATH").unwrap_or_default();
                path.split(':')
                    .map(|d| Path::new(d).join(b))
                    .collect::<Vec<_>>()
            })
            .find(|p| p.is_file())
            .expect("stunnel not found: install Debian's stunnel4 (scripts/test.sh does)");
        let (child, port) = spawn_listening("stunnel", |port| {
            let conf = dir.path().join("stunnel.conf");
            std::fs::write(
                &conf,
                format!(
                    "foreground = yes\npid =\noutput = {log}\ndebug = 4\n\n[s3]\n\
                     accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\n\
                     cert = {cert}\nkey = {key}\n",
                    log = dir.path().join("stunnel.log").display(),
                    cert = cert.display(),
                    key = key.display()
                ),
            )
            .expect("write stunnel.conf");
            let mut c = Command::new(&bin);
            c.arg(&conf);
            c
        });
        TlsFront { child, port, dir }
    }

    /// `https://localhost:PORT`.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The CA that issued the front's certificate (for `ca_file`).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request the proxy saw going to the server.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub target: String,
    pub body_len: u64,
    /// When the proxy saw the request head.
    pub at: Instant,
    /// The fault injected into this request, if any.
    pub fault: Option<Fault>,
    /// The request head as sent (request line and headers).
    pub head: String,
    /// The status of the answer the client was given, once one was (None: the request was
    /// never answered, e.g. its connection died or its sender was killed).
    pub status: Option<u16>,
}

impl SeenRequest {
    /// A request header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.head, name)
    }

    /// A request of the agent's conditional-write probe (a private marker key written twice,
    /// create-only, once per journal): faulted only by rules made `on_probe`, never counted.
    pub fn is_probe(&self) -> bool {
        self.target.contains(".ha-edge-probe")
    }

    /// `partNumber` of an UploadPart request.
    pub fn part_number(&self) -> Option<u32> {
        if self.method != "PUT" {
            return None;
        }
        self.query_param("partNumber")?.parse().ok()
    }

    /// The request target without its query: "/bucket/key".
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// A query parameter of the request target, as sent (not decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            kv.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }

    /// The S3 operation, as far as the tests need to tell them apart.
    pub fn op(&self) -> &'static str {
        let q = self.target.split_once('?').map_or("", |(_, q)| q);
        match self.method.as_str() {
            "PUT" if q.contains("partNumber=") => "UploadPart",
            "PUT" => "PutObject",
            "POST" if q.starts_with("uploads") => "CreateMultipartUpload",
            "POST" => "CompleteMultipartUpload",
            "GET" if q.contains("uploadId=") => "ListParts",
            "GET" if q.contains("uploads") => "ListMultipartUploads",
            "GET" => "Get",
            "HEAD" if self.target.trim_start_matches('/').contains('/') => "HeadObject",
            "HEAD" => "HeadBucket",
            "DELETE" if q.contains("uploadId=") => "AbortMultipartUpload",
            _ => "Other",
        }
    }
}

/// What the proxy does to a request that matches a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and S3 error code instead of forwarding (the request body
    /// is read and dropped); `retry_after` adds a Retry-After header (seconds).
    Status {
        status: u16,
        code: &'static str,
        retry_after: Option<u32>,
    },
    /// Read the request and never answer.
    BlackHole,
    /// Read half of the request body, then reset the connection (RST).
    ResetMidBody,
    /// Forward the request, then pass back only part of the answer and close.
    TruncateResponse,
    /// Forward the request and never pass the answer back: the server did the work, the client
    /// waits.
    ForwardThenHold,
    /// Forward the request; in the answer, replace the header `name` with `value`, or remove
    /// it if `value` is None.
    RewriteHeader {
        name: &'static str,
        value: Option<&'static str>,
    },
    /// Forward the request with one byte of its body changed (the middle one), as a faulty
    /// disk, memory or middlebox behind the TLS would: only a checksum the server checks
    /// catches it.
    CorruptBody,
    /// Answer with this status and S3 error code before reading the request body, as a server
    /// refusing a write by its condition does, then read nothing more and close the connection
    /// `after` later (no `Connection: close` said): a client that pooled it meanwhile loses the
    /// next request it sends on it.
    RefuseThenClose {
        status: u16,
        code: &'static str,
        after: Duration,
    },
}

/// Injects `fault` into the next `times` requests of operation `op` (see `SeenRequest::op`)
/// whose target contains `target_contains`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub op: &'static str,
    pub target_contains: String,
    /// Only requests with this header (name) holding this value.
    pub header: Option<(&'static str, &'static str)>,
    pub fault: Fault,
    pub times: u32,
    /// The rule is for the agent's conditional-write probe (`SeenRequest::is_probe`), and only
    /// for it; other rules never touch the probe.
    pub probe: bool,
    /// How long the proxy waits before it acts on a matching request (a slow server).
    pub after: Duration,
}

impl Rule {
    pub fn new(op: &'static str, fault: Fault, times: u32) -> Rule {
        Rule {
            op,
            target_contains: String::new(),
            header: None,
            fault,
            times,
            probe: false,
            after: Duration::ZERO,
        }
    }

    /// For the agent's conditional-write probe's requests only.
    pub fn on_probe(mut self) -> Rule {
        self.probe = true;
        self
    }

    /// Acts on a matching request only after `wait` (its answer comes that much later).
    pub fn after(mut self, wait: Duration) -> Rule {
        self.after = wait;
        self
    }

    /// Only requests whose header `name` holds `value` (e.g. a checksum algorithm).
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Rule {
        self.header = Some((name, value));
        self
    }

    pub fn on_target(mut self, part: &str) -> Rule {
        self.target_contains = part.to_string();
        self
    }
}

/// A fault-injecting HTTP/1.1 proxy in front of the server. It handles each connection one
/// request and one answer at a time (as the agent's client does), so it can count requests,
/// delay them, answer them itself, black-hole or reset them, truncate answers, refuse
/// connections (`down`) or accept and never answer any (`black_hole`).
pub struct Proxy {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    pub delay_ms: Arc<AtomicU64>,
    pub down: Arc<AtomicBool>,
    pub black_hole: Arc<AtomicBool>,
    /// Connections accepted and closed at once because the proxy was down.
    pub refused: Arc<AtomicU64>,
    /// Connections accepted while the proxy black-holed everything.
    pub swallowed: Arc<AtomicU64>,
    pub rules: Arc<Mutex<Vec<Rule>>>,
    /// Body bytes of GetObject answers passed on to the client.
    pub object_bytes: Arc<AtomicU64>,
    /// Client connections the proxy is serving right now.
    open: Arc<AtomicU64>,
    /// Client connections accepted in all, and the most open at once.
    pub accepted: Arc<AtomicU64>,
    pub peak_open: Arc<AtomicU64>,
    streams: Streams,
    stop: Arc<AtomicBool>,
}

/// Open notification streams: each gets `Some(line)` to send, or `None` to drop the connection.
type Streams = Arc<Mutex<Vec<std::sync::mpsc::Sender<Option<String>>>>>;

#[derive(Clone)]
struct ProxyShared {
    upstream: u16,
    requests: Arc<Mutex<Vec<SeenRequest>>>,
    delay_ms: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    black_hole: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    rules: Arc<Mutex<Vec<Rule>>>,
    object_bytes: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    peak_open: Arc<AtomicU64>,
    streams: Streams,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let shared = ProxyShared {
            upstream,
            requests: Arc::new(Mutex::new(Vec::new())),
            delay_ms: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicBool::new(false)),
            black_hole: Arc::new(AtomicBool::new(false)),
            swallowed: Arc::new(AtomicU64::new(0)),
            rules: Arc::new(Mutex::new(Vec::new())),
            object_bytes: Arc::new(AtomicU64::new(0)),
            open: Arc::new(AtomicU64::new(0)),
            accepted: Arc::new(AtomicU64::new(0)),
            peak_open: Arc::new(AtomicU64::new(0)),
            streams: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let refused = Arc::new(AtomicU64::new(0));
        let (sh, rf) = (shared.clone(), refused.clone());
        listener.set_nonblocking(true).expect("nonblocking");
        thread::spawn(move || {
            while !sh.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if sh.down.load(Ordering::Relaxed) {
                            rf.fetch_add(1, Ordering::Relaxed);
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let sh = sh.clone();
                        let now_open = sh.open.fetch_add(1, Ordering::SeqCst) + 1;
                        sh.accepted.fetch_add(1, Ordering::SeqCst);
                        sh.peak_open.fetch_max(now_open, Ordering::SeqCst);
                        thread::spawn(move || {
                            let open = sh.open.clone();
                            serve_connection(client, &sh);
                            open.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            requests: shared.requests,
            delay_ms: shared.delay_ms,
            down: shared.down,
            black_hole: shared.black_hole,
            refused,
            swallowed: shared.swallowed,
            rules: shared.rules,
            object_bytes: shared.object_bytes,
            open: shared.open,
            accepted: shared.accepted,
            peak_open: shared.peak_open,
            streams: shared.streams,
            stop: shared.stop,
        }
    }

    /// Sends one line (a MinIO notification record) on every open notification stream.
    /// s3s-fs has no ListenBucketNotification, so the proxy answers that request itself with a
    /// stream the test feeds.
    pub fn notify(&self, line: &str) {
        self.streams
            .lock()
            .expect("lock")
            .retain(|tx| tx.send(Some(line.to_string())).is_ok());
    }

    /// Drops every open notification stream's connection (a lost stream).
    pub fn cut_streams(&self) {
        for tx in self.streams.lock().expect("lock").drain(..) {
            let _ = tx.send(None);
        }
    }

    /// Waits until the proxy serves no connection (at most `within`); true if it got there.
    /// After an agent is killed, its requests may still sit in the proxy's delay and be
    /// recorded late: wait for this before taking "what was sent before the kill".
    /// Idle means idle for 50 ms on end: a connection still in the listen backlog is accepted
    /// within 5 ms.
    pub fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut idle_since = Instant::now();
        loop {
            if self.open.load(Ordering::SeqCst) > 0 {
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= Duration::from_millis(50) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Requests of operation `op` (see `SeenRequest::op`) seen so far.
    pub fn count(&self, op: &str) -> usize {
        self.seen().iter().filter(|r| r.op() == op).count()
    }

    /// ListenBucketNotification requests seen so far.
    pub fn listen_requests(&self) -> usize {
        self.seen()
            .iter()
            .filter(|r| r.method == "GET" && r.target.contains("events="))
            .count()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests seen so far, without the agent's one-time conditional-write probe (see
    /// `SeenRequest::is_probe`): tests count the work on their objects.
    pub fn seen(&self) -> Vec<SeenRequest> {
        let all = self.requests.lock().expect("lock");
        all.iter().filter(|r| !r.is_probe()).cloned().collect()
    }

    /// UploadPart requests seen so far, as part numbers in arrival order.
    pub fn parts_sent(&self) -> Vec<u32> {
        self.seen()
            .iter()
            .filter_map(SeenRequest::part_number)
            .collect()
    }

    /// Body bytes of all PutObject and UploadPart requests seen (sent or started).
    pub fn data_bytes_sent(&self) -> u64 {
        self.seen()
            .iter()
            .filter(|r| r.method == "PUT")
            .map(|r| r.body_len)
            .sum()
    }

    pub fn add_rule(&self, rule: Rule) {
        self.rules.lock().expect("lock").push(rule);
    }

    /// Requests that got a fault injected.
    pub fn faults_injected(&self) -> usize {
        self.seen().iter().filter(|r| r.fault.is_some()).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads from `s` into `buf` until it holds a full HTTP head; returns the head's length.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Some(i + 4);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Moves `len` body bytes from `from` (some may already sit in `buf`) to `to` (None: drop them).
fn relay_body(
    from: &mut TcpStream,
    buf: &mut Vec<u8>,
    to: Option<&mut TcpStream>,
    len: u64,
) -> bool {
    relay_counted(from, buf, to, len, None)
}

/// `relay_body`, adding the bytes passed on to `counted`.
fn relay_counted(
    from: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut to: Option<&mut TcpStream>,
    len: u64,
    counted: Option<&AtomicU64>,
) -> bool {
    let count = |n: usize| {
        if let Some(c) = counted {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let take = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
    if let Some(t) = to.as_mut() {
        if t.write_all(&buf[..take]).is_err() {
            return false;
        }
        count(take);
    }
    buf.drain(..take);
    let mut left = len - take as u64;
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        match from.read(&mut chunk[..want]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                if let Some(t) = to.as_mut() {
                    if t.write_all(&chunk[..n]).is_err() {
                        return false;
                    }
                    count(n);
                }
                left -= n as u64;
            }
        }
    }
    true
}

/// Closes a connection with a TCP reset instead of a FIN.
#[allow(unsafe_code)]
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("small"),
        );
    }
    drop(s);
}

/// Holds a connection open without answering until the client gives up or the proxy stops.
fn hold(mut client: TcpStream, stop: &AtomicBool) {
    let _ = client.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match client.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// A ListenBucketNotification stream: chunked JSON lines as the test sends them.
fn serve_notifications(mut client: TcpStream, sh: &ProxyShared) {
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    sh.streams.lock().expect("lock").push(tx);
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    if client.write_all(head.as_bytes()).is_err() {
        return;
    }
    while !sh.stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(line)) => {
                let data = format!("{line}\n");
                let chunk = format!("{:x}\r\n{data}\r\n", data.len());
                if client.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
            }
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn serve_connection(mut client: TcpStream, sh: &ProxyShared) {
    if sh.black_hole.load(Ordering::Relaxed) {
        sh.swallowed.fetch_add(1, Ordering::Relaxed);
        return hold(client, &sh.stop);
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", sh.upstream)) else {
        return;
    };
    let mut cbuf: Vec<u8> = Vec::new();
    let mut sbuf: Vec<u8> = Vec::new();
    while let Some(head_end) = read_head(&mut client, &mut cbuf) {
        let head = String::from_utf8_lossy(&cbuf[..head_end]).into_owned();
        let mut first = head.split("\r\n").next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default().to_string();
        let body_len: u64 = header_value(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let delay = sh.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            thread::sleep(Duration::from_millis(delay));
        }
        if sh.down.load(Ordering::Relaxed) {
            break;
        }
        if sh.black_hole.load(Ordering::Relaxed) {
            sh.swallowed.fetch_add(1, Ordering::Relaxed);
            return hold(client, &sh.stop);
        }
        let mut seen = SeenRequest {
            method,
            target,
            body_len,
            at: Instant::now(),
            fault: None,
            head: head.clone(),
            status: None,
        };
        let mut wait = Duration::ZERO;
        {
            let mut rules = sh.rules.lock().expect("lock");
            if let Some(r) = rules.iter_mut().find(|r| {
                r.times > 0
                    && r.op == seen.op()
                    && seen.target.contains(&r.target_contains)
                    && r.header
                        .is_none_or(|(n, v)| seen.header(n).is_some_and(|h| h.contains(v)))
                    && seen.is_probe() == r.probe
            }) {
                r.times -= 1;
                seen.fault = Some(r.fault.clone());
                wait = r.after;
            }
        }
        thread::sleep(wait);
        let fault = seen.fault.clone();
        let is_head = seen.method == "HEAD";
        let is_object_get = seen.op() == "Get" && !seen.target.contains("list-type");
        let is_listen = seen.method == "GET" && seen.target.contains("events=");
        let index = {
            let mut requests = sh.requests.lock().expect("lock");
            requests.push(seen);
            requests.len() - 1
        };
        let answered = |status: u16| {
            if let Some(r) = sh.requests.lock().expect("lock").get_mut(index) {
                r.status = Some(status);
            }
        };
        if is_listen {
            return serve_notifications(client, sh);
        }
        cbuf.drain(..head_end);
        match fault {
            Some(Fault::Status {
                status,
                code,
                retry_after,
            }) => {
                if !relay_body(&mut client, &mut cbuf, None, body_len) {
                    break;
                }
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
                );
                let mut resp = format!(
                    "HTTP/1.1 {status} Injected\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n",
                    if is_head { 0 } else { body.len() }
                );
                if let Some(s) = retry_after {
                    resp.push_str(&format!("retry-after: {s}\r\n"));
                }
                resp.push_str("\r\n");
                if !is_head {
                    resp.push_str(&body);
                }
                if client.write_all(resp.as_bytes()).is_err() {
                    break;
                }
                answered(status);
                continue;
            }
            Some(Fault::BlackHole) => {
                return hold(client, &sh.stop);
            }
            Some(Fault::RefuseThenClose {
                status,
                code,
                after,
            }) => {
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>refused by the test proxy</Message></Error>"
                );
                let resp = format!(
                    "HTTP/1.1 {status} Refused\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if client.write_all(resp.as_bytes()).is_ok() {
                    answered(status);
                }
                thread::sleep(after);
                // What the client sent on the connection meanwhile dies unanswered: seen all
                // the same (after the refused request's unread body).
                let _ = client.set_read_timeout(Some(Duration::from_millis(50)));
                let mut chunk = [0u8; 64 * 1024];
                while let Ok(n @ 1..) = client.read(&mut chunk) {
                    cbuf.extend_from_slice(&chunk[..n]);
                }
                let skip = usize::try_from(body_len)
                    .unwrap_or(usize::MAX)
                    .min(cbuf.len());
                let text = String::from_utf8_lossy(&cbuf[skip..]).into_owned();
                for line in text.split("\r\n") {
                    let mut words = line.split(' ');
                    if let (Some(m @ ("GET" | "HEAD" | "PUT" | "POST" | "DELETE")), Some(t)) =
                        (words.next(), words.next())
                    {
                        sh.requests.lock().expect("lock").push(SeenRequest {
                            method: m.to_string(),
                            target: t.to_string(),
                            body_len: 0,
                            at: Instant::now(),
                            fault: None,
                            head: line.to_string(),
                            status: None,
                        });
                    }
                }
                break;
            }
            Some(Fault::ResetMidBody) => {
                let half = body_len / 2;
                relay_body(&mut client, &mut cbuf, None, half);
                reset(client);
                return;
            }
            Some(Fault::CorruptBody) => {
                // The whole body is read, one byte changed, and put back to be forwarded.
                let want = usize::try_from(body_len).unwrap_or(usize::MAX);
                let mut chunk = vec![0u8; 64 * 1024];
                while cbuf.len() < want {
                    match client.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => cbuf.extend_from_slice(&chunk[..n]),
                    }
                }
                if cbuf.len() < want {
                    break;
                }
                if let Some(b) = cbuf.get_mut(want / 2) {
                    *b ^= 0x5a;
                }
            }
            Some(
                Fault::TruncateResponse | Fault::RewriteHeader { .. } | Fault::ForwardThenHold,
            )
            | None => {}
        }
        // Forward the request and its body.
        if server.write_all(head.as_bytes()).is_err()
            || !relay_body(&mut client, &mut cbuf, Some(&mut server), body_len)
        {
            // The server may have answered before reading the whole body (s3s-fs answers a
            // failed If-None-Match with 412 at once) and closed: pass that answer back, as a
            // client talking to the server directly would see it. If it was the client that
            // went away (killed mid-body), the server has nothing to say: wait only briefly.
            let _ = server.set_read_timeout(Some(Duration::from_millis(200)));
            if let Some(end) = read_head(&mut server, &mut sbuf) {
                if client.write_all(&sbuf).is_ok() {
                    answered(status_of(&String::from_utf8_lossy(&sbuf[..end])));
                }
            }
            break;
        }
        // Relay the answer.
        let Some(resp_end) = read_head(&mut server, &mut sbuf) else {
            break;
        };
        let rhead = String::from_utf8_lossy(&sbuf[..resp_end]).into_owned();
        let status = status_of(&rhead);
        let chunked = header_value(&rhead, "transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let rlen: u64 = if is_head || status == 204 || status == 304 {
            0
        } else {
            header_value(&rhead, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if fault == Some(Fault::ForwardThenHold) {
            return hold(client, &sh.stop);
        }
        if fault == Some(Fault::TruncateResponse) {
            // Half the head if there is no body, else the head and half the body (read from
            // the server first, so the cut does not depend on how the answer arrived).
            let half = usize::try_from(rlen / 2).unwrap_or(usize::MAX);
            while rlen > 0 && sbuf.len() - resp_end < half {
                let mut chunk = [0u8; 64 * 1024];
                match server.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sbuf.extend_from_slice(&chunk[..n]),
                }
            }
            let cut = if rlen == 0 && !chunked {
                resp_end / 2
            } else {
                resp_end
                    + ((sbuf.len() - resp_end)
                        .min(usize::try_from(rlen.max(2)).unwrap_or(usize::MAX) / 2))
            };
            let _ = client.write_all(&sbuf[..cut.min(sbuf.len())]);
            let _ = server.shutdown(Shutdown::Both);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let written = match &fault {
            Some(Fault::RewriteHeader { name, value }) => {
                client.write_all(rewrite_header(&rhead, name, *value).as_bytes())
            }
            _ => client.write_all(&sbuf[..resp_end]),
        };
        if written.is_err() {
            break;
        }
        answered(status);
        sbuf.drain(..resp_end);
        if chunked {
            // Relay until the last chunk.
            loop {
                let end = if sbuf.starts_with(b"0\r\n\r\n") {
                    Some(5)
                } else {
                    find(&sbuf, b"\r\n0\r\n\r\n").map(|i| i + 7)
                };
                if let Some(end) = end {
                    if client.write_all(&sbuf[..end]).is_err() {
                        return;
                    }
                    sbuf.drain(..end);
                    break;
                }
                let mut chunk = [0u8; 16 * 1024];
                match server.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sbuf.extend_from_slice(&chunk[..n]),
                }
            }
        } else if !relay_counted(
            &mut server,
            &mut sbuf,
            Some(&mut client),
            rlen,
            is_object_get.then_some(&*sh.object_bytes),
        ) {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

/// The status code of an HTTP answer head (0 if unreadable).
fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An HTTP answer head (ending in an empty line) with header `name` replaced or removed.
fn rewrite_header(head: &str, name: &str, value: Option<&str>) -> String {
    let mut lines: Vec<String> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| {
            !l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .map(str::to_string)
        .collect();
    if let Some(v) = value {
        lines.push(format!("{name}: {v}"));
    }
    lines.join("\r\n") + "\r\n\r\n"
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Bytes a process has read through read(2) and friends (files, sockets, a journal's pages):
/// `rchar` of `/proc/<proc>/io`, for a pid or "self" (which takes in reaped children's counts).
pub fn rchar(proc: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{proc}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The CRC-64/NVME of `bytes` as S3 writes it (`x-amz-checksum-crc64nvme`: base64 of the 8
/// big-endian bytes), computed here independently of the agent.
pub fn crc64nvme_b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let mut d = crc64fast_nvme::Digest::new();
    d.write(bytes);
    base64::engine::general_purpose::STANDARD.encode(d.sum64().to_be_bytes())
}

/// S3's checksum of an object uploaded in parts of `part` bytes with SHA-256 checksums, as
/// AWS reports it (base64 of the SHA-256 of the parts' digests, "-" and the part count).
pub fn composite_sha256(bytes: &[u8], part: usize) -> String {
    use base64::Engine as _;
    let mut h = Sha256::new();
    for chunk in bytes.chunks(part) {
        h.update(Sha256::digest(chunk));
    }
    let digest = base64::engine::general_purpose::STANDARD.encode(h.finalize());
    format!("{digest}-{}", bytes.len().div_ceil(part))
}

/// Deterministic pseudo-random bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Writes a file and backdates its mtime so it counts as settled.
pub fn write_settled(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, bytes).expect("write");
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(old).expect("set mtime");
}

/// A seeded mix of file sizes: mostly small files (0..64 KiB), some of 1-4 MiB (single PUT
/// below a 5 MiB threshold), and every 20th large enough for 2-4 parts of 5 MiB.
pub fn mixed_workload(seed: u64, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mib = 1024 * 1024;
    (0..count)
        .map(|i| {
            let len = if i % 20 == 7 {
                rng.usize(6 * mib..20 * mib)
            } else if i % 7 == 3 {
                rng.usize(mib..4 * mib)
            } else if i % 50 == 0 {
                0
            } else {
                rng.usize(1..64 * 1024)
            };
            let name = format!("batch-{:02}/obj-{i:04}.ndjson", i % 13);
            (
                name,
                data(seed.wrapping_mul(1000).wrapping_add(i as u64), len),
            )
        })
        .collect()
}

/// A scratch setup for one agent: a source directory, a journal and a config file.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub bucket: String,
}

impl Setup {
    pub fn new(bucket: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("in")).expect("mkdir in");
        Setup {
            dir,
            bucket: bucket.to_string(),
        }
    }

    pub fn src(&self) -> PathBuf {
        self.dir.path().join("in")
    }

    /// Writes `count` settled files `<stem><i>.ndjson` of `size` bytes (contents from seed
    /// `seed + i`) into the source directory; returns their names and contents.
    pub fn write_files(
        &self,
        stem: &str,
        count: u64,
        seed: u64,
        size: usize,
    ) -> Vec<(String, Vec<u8>)> {
        let files: Vec<(String, Vec<u8>)> = (0..count)
            .map(|i| (format!("{stem}{i}.ndjson"), data(seed + i, size)))
            .collect();
        for (n, b) in &files {
            write_settled(&self.src().join(n), b);
        }
        files
    }

    pub fn journal(&self) -> PathBuf {
        self.dir.path().join("state/journal.db")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ha-edge.toml")
    }

    /// Writes a config for `endpoint`; `agent_extra` and `source_extra` are appended to those
    /// tables (TOML lines).
    pub fn write_config(&self, endpoint: &str, agent_extra: &str, source_extra: &str) -> PathBuf {
        self.write_config_with(&self.destination_toml(endpoint), agent_extra, source_extra)
    }

    /// Writes a config with this `[destination]` table.
    pub fn write_config_with(
        &self,
        destination: &str,
        agent_extra: &str,
        source_extra: &str,
    ) -> PathBuf {
        let source = format!(
            "name = \"exports\"\ntype = \"fs\"\npath = \"{}\"\n{source_extra}",
            self.src().display()
        );
        self.write_config_text(agent_extra, &source, destination)
    }

    /// Writes a config with one bucket source (`src_endpoint`, bucket `src_bucket`, prefix
    /// `exports/`) instead of the directory.
    pub fn write_bucket_config(
        &self,
        endpoint: &str,
        src_endpoint: &str,
        src_bucket: &str,
        agent_extra: &str,
        source_extra: &str,
    ) -> PathBuf {
        let source = format!(
            "name = \"minio\"\ntype = \"s3\"\nendpoint = \"{src_endpoint}\"\n\
             bucket = \"{src_bucket}\"\nprefix = \"exports/\"\n{source_extra}"
        );
        self.write_config_text(agent_extra, &source, &self.destination_toml(endpoint))
    }

    /// The config file: `[agent]` with the journal, one `[[source]]`, the destination.
    fn write_config_text(&self, agent_extra: &str, source: &str, destination: &str) -> PathBuf {
        let text = format!(
            "[agent]\njournal = \"{}\"\n{agent_extra}\n\n[[source]]\n{source}\n\n{destination}",
            self.journal().display()
        );
        std::fs::write(self.config_path(), text).expect("write config");
        self.config_path()
    }

    /// The `[destination]` table for this setup's bucket at `endpoint` (prefix `fhir/`).
    pub fn destination_toml(&self, endpoint: &str) -> String {
        format!(
            "[destination]\ntype = \"s3\"\nendpoint = \"{endpoint}\"\nregion = \"eu-central-1\"\n\
             bucket = \"{}\"\nprefix = \"fhir/\"\npath_style = true\n",
            self.bucket
        )
    }

    /// `ha-edge run --once` started in the background, its output piped.
    pub fn spawn_once(&self, bin: &Path) -> Child {
        let cfg = self.config_path();
        self.command(
            bin,
            &["run", "-c", cfg.to_str().expect("utf-8 path"), "--once"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ha-edge")
    }

    /// A command for the ha-edge binary with test credentials in the environment.
    pub fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            // Bucket sources (the on-premise MinIO role is played by another s3s-fs).
            .env("ONPREM_S3_ACCESS_KEY", ACCESS_KEY)
            .env("ONPREM_S3_SECRET_KEY", SECRET_KEY)
            .env_remove("ONPREM_S3_ENDPOINT")
            .env_remove("ONPREM_S3_BUCKET")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("RUST_LOG", "ha_edge=debug,info")
            .stdin(Stdio::null());
        c
    }

    /// `ha-edge run --once`, failing the test if it takes more than two minutes.
    pub fn run_once(&self, bin: &Path) -> Output {
        let cfg = self.config_path();
        let cmd = self.command(
            bin,
            &["run", "-c", cfg.to_str().expect("utf-8 path"), "--once"],
        );
        output_within(cmd, Duration::from_secs(120))
    }

    /// Starts `ha-edge run` in the background; its log goes to `daemon_log()`.
    pub fn spawn_daemon(&self, bin: &Path) -> Child {
        let cfg = self.config_path();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        self.command(bin, &["run", "-c", cfg.to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ha-edge")
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `ha-edge status --json` parsed (the structured answer tests should prefer to log text).
    pub fn status_json(&self, bin: &Path) -> serde_json::Value {
        self.status_json_and_code(bin).0
    }

    /// `ha-edge status --json` parsed, and its exit code.
    pub fn status_json_and_code(&self, bin: &Path) -> (serde_json::Value, Option<i32>) {
        let cfg = self.config_path();
        let out = output_within(
            self.command(
                bin,
                &["status", "-c", cfg.to_str().expect("utf-8"), "--json"],
            ),
            Duration::from_secs(30),
        );
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (v, out.status.code())
    }

    /// (state, count) pairs from the journal, read directly with SQLite.
    pub fn journal_counts(&self) -> Vec<(String, i64)> {
        let c = rusqlite::Connection::open_with_flags(
            self.journal(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open journal");
        let mut s = c
            .prepare("SELECT state, COUNT(*) FROM objects GROUP BY state ORDER BY state")
            .expect("prepare");
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// Keys of journal rows matching an SQL condition on `objects` (empty if unreadable).
    pub fn journal_keys(&self, condition: &str) -> Vec<String> {
        self.journal_column(&format!("SELECT key FROM objects WHERE {condition}"))
    }

    /// The one text column of an SQL query on the journal (empty if unreadable).
    pub fn journal_column(&self, sql: &str) -> Vec<String> {
        let Ok(c) = rusqlite::Connection::open_with_flags(
            self.journal(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return Vec::new();
        };
        let Ok(mut s) = c.prepare(sql) else {
            return Vec::new();
        };
        s.query_map([], |r| r.get(0))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// The hex SHA-256 the journal holds for the newest row of `key`.
    pub fn journal_sha256(&self, key: &str) -> Option<String> {
        self.journal_column(&format!(
            "SELECT hex(sha256) FROM objects WHERE key = '{}' AND sha256 IS NOT NULL
             ORDER BY id DESC LIMIT 1",
            key.replace('\'', "''")
        ))
        .pop()
        .map(|h| h.to_lowercase())
    }

    /// Part numbers recorded in the journal for an object key.
    pub fn journal_parts(&self, key: &str) -> Vec<u32> {
        let Ok(c) = rusqlite::Connection::open_with_flags(
            self.journal(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return Vec::new();
        };
        let Ok(mut s) = c.prepare(
            "SELECT p.part_number FROM parts p JOIN objects o ON o.id = p.object_id
             WHERE o.key = ?1 ORDER BY p.part_number",
        ) else {
            return Vec::new();
        };
        s.query_map([key], |r| r.get(0))
            .map(|rows| rows.filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Sends SIGTERM to a child process (SIGKILL is `Child::kill`).
pub fn sigterm(child: &Child) {
    send_signal(child, "TERM");
}

/// Sends a signal by name ("TERM", "HUP", ...).
pub fn send_signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{name} failed");
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command to completion, killing it and failing if it outlives `limit`.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("command did not finish within {limit:?}");
        }
    }
}

/// Waits for a child to exit, killing it and failing if it outlives `limit`.
pub fn wait_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP forwarder in front of a QUIC relay: `down` drops every datagram both ways (a cut
/// link); `bytes_up` counts what the agent sent towards the relay, `early_up` the bytes of
/// its 0-RTT packets (QUIC v1 long headers of type 0-RTT, read from the clear header).
/// `up_at_next_attempt` brings a cut link back just before the agent's next connection attempt
/// (an Initial packet with a connection id not seen before), so that attempt's first flight,
/// and nothing of an attempt made into the cut, is what the relay gets first.
pub struct UdpProxy {
    pub port: u16,
    pub down: Arc<AtomicBool>,
    pub bytes_up: Arc<AtomicU64>,
    pub early_up: Arc<AtomicU64>,
    pub up_at_next_attempt: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// The destination connection id of a QUIC v1 Initial packet at the start of a datagram (long
/// header, type 0; the fixed bit may be greased, RFC 9287).
fn quic_initial_dcid(d: &[u8]) -> Option<&[u8]> {
    if d.first()? & 0xb0 != 0x80 {
        return None;
    }
    let len = usize::from(*d.get(5)?);
    d.get(6..6 + len)
}

/// The bytes of the 0-RTT packets in one QUIC datagram (RFC 9000 17.2: coalesced long-header
/// packets, each with its length; a short-header packet ends the datagram).
pub fn quic_0rtt_bytes(mut d: &[u8]) -> u64 {
    fn varint(d: &[u8]) -> Option<(u64, usize)> {
        let first = *d.first()?;
        let len = 1usize << (first >> 6);
        let bytes = d.get(..len)?;
        let mut v = u64::from(first & 0x3f);
        for b in &bytes[1..] {
            v = (v << 8) | u64::from(*b);
        }
        Some((v, len))
    }
    let mut early = 0;
    let mut walk = || -> Option<()> {
        while d.first()? & 0x80 != 0 {
            let kind = (d[0] >> 4) & 0x03;
            let mut at = 5; // first byte, version
            let dcid = usize::from(*d.get(at)?);
            at += 1 + dcid;
            let scid = usize::from(*d.get(at)?);
            at += 1 + scid;
            if kind == 0 {
                let (token, n) = varint(d.get(at..)?)?;
                at += n + usize::try_from(token).ok()?;
            }
            let (len, n) = varint(d.get(at..)?)?;
            let end = at + n + usize::try_from(len).ok()?;
            if kind == 1 {
                early += end as u64;
            }
            d = d.get(end..)?;
        }
        Some(())
    };
    let _ = walk();
    early
}

impl UdpProxy {
    pub fn start(upstream: u16) -> UdpProxy {
        use std::net::UdpSocket;
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind udp proxy");
        front
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let port = front.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let bytes_up = Arc::new(AtomicU64::new(0));
        let early_up = Arc::new(AtomicU64::new(0));
        let up_at_next_attempt = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, b, e, up, st) = (
            down.clone(),
            bytes_up.clone(),
            early_up.clone(),
            up_at_next_attempt.clone(),
            stop.clone(),
        );
        thread::spawn(move || {
            let mut peers: std::collections::HashMap<std::net::SocketAddr, Arc<UdpSocket>> =
                std::collections::HashMap::new();
            let mut buf = vec![0u8; 65536];
            let mut attempts = std::collections::HashSet::<Vec<u8>>::new();
            while !st.load(Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(dcid) = quic_initial_dcid(&buf[..n]) {
                    if attempts.insert(dcid.to_vec()) && up.swap(false, Ordering::Relaxed) {
                        e.store(0, Ordering::Relaxed);
                        d.store(false, Ordering::Relaxed);
                    }
                }
                if d.load(Ordering::Relaxed) {
                    continue;
                }
                b.fetch_add(n as u64, Ordering::Relaxed);
                e.fetch_add(quic_0rtt_bytes(&buf[..n]), Ordering::Relaxed);
                let sock = peers.entry(client).or_insert_with(|| {
                    let s = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind upstream"));
                    s.connect(("127.0.0.1", upstream))
                        .expect("connect upstream");
                    s.set_read_timeout(Some(Duration::from_millis(50)))
                        .expect("timeout");
                    let (back, front2, d2, st2) = (
                        s.clone(),
                        front.try_clone().expect("clone socket"),
                        d.clone(),
                        st.clone(),
                    );
                    thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while !st2.load(Ordering::Relaxed) {
                            let Ok(n) = back.recv(&mut buf) else { continue };
                            if !d2.load(Ordering::Relaxed) {
                                let _ = front2.send_to(&buf[..n], client);
                            }
                        }
                    });
                    s
                });
                let _ = sock.send(&buf[..n]);
            }
        });
        UdpProxy {
            port,
            down,
            bytes_up,
            early_up,
            up_at_next_attempt,
            stop,
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A free UDP port on 127.0.0.1 (for a relay to listen on).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.1, one request, connection closed): the status code
/// and body. `accept` is sent as the Accept header if given.
pub fn http_get(port: u16, path: &str, accept: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `name` (with its labels as written, e.g.
/// `ha_edge_objects_total{source="exports",outcome="delivered"}`) in an exposition.
pub fn metric(exposition: &str, sample: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// `promtool check metrics` on an exposition: Ok, or what promtool said. Fails the test if
/// promtool is missing (scripts/test.sh installs Debian's `prometheus` package).
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
