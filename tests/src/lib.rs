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

fn free_port() -> u16 {
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

/// A running s3s-fs with its own data directory.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub data: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let data = tempfile::tempdir().expect("temp dir");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(s3s_fs_bin())
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(data.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start s3s-fs");
            if wait_for_port(port, Duration::from_secs(10)) {
                return S3Server { child, port, data };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs did not start");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.data.path().join(name)).expect("create bucket dir");
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

    /// The user metadata s3s-fs stored for an object.
    pub fn metadata(&self, bucket: &str, key: &str) -> Option<serde_json::Value> {
        use base64::Engine as _;
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let name = format!(".bucket-{}.object-{}.metadata.json", enc(bucket), enc(key));
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

/// One HTTP request the proxy saw going to the server.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub target: String,
    pub body_len: u64,
}

impl SeenRequest {
    /// `partNumber` of an UploadPart request.
    pub fn part_number(&self) -> Option<u32> {
        if self.method != "PUT" {
            return None;
        }
        let q = self.target.split_once('?')?.1;
        q.split('&')
            .find_map(|kv| kv.strip_prefix("partNumber="))
            .and_then(|n| n.parse().ok())
    }
}

/// A TCP proxy in front of the server that parses the client-to-server byte stream into HTTP
/// requests (so tests can count them), can delay each request, and can cut all connections.
pub struct Proxy {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
    pub delay_ms: Arc<AtomicU64>,
    pub down: Arc<AtomicBool>,
    /// Connections accepted and closed at once because the proxy was down.
    pub refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (rq, dl, dn, st, rf) = (
            requests.clone(),
            delay_ms.clone(),
            down.clone(),
            stop.clone(),
            refused.clone(),
        );
        listener.set_nonblocking(true).expect("nonblocking");
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if dn.load(Ordering::Relaxed) {
                            rf.fetch_add(1, Ordering::Relaxed);
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                            continue;
                        };
                        let (rq, dl, dn) = (rq.clone(), dl.clone(), dn.clone());
                        let (c2, s2) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        thread::spawn(move || pipe_plain(s2, c2));
                        thread::spawn(move || pipe_requests(client, server, rq, dl, dn));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            requests,
            delay_ms,
            down,
            refused,
            stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.requests.lock().expect("lock").clone()
    }

    /// UploadPart requests seen so far, as part numbers in arrival order.
    pub fn parts_sent(&self) -> Vec<u32> {
        self.seen()
            .iter()
            .filter_map(SeenRequest::part_number)
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipe_plain(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards client->server bytes, recording each request head and skipping its body by
/// Content-Length (ha-edge always sends one).
fn pipe_requests(
    mut client: TcpStream,
    mut server: TcpStream,
    log: Arc<Mutex<Vec<SeenRequest>>>,
    delay_ms: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Read until a full head is buffered.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break Some(i + 4);
            }
            match client.read(&mut chunk) {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(head_end) = head_end else { break };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default().to_string();
        let body_len: u64 = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let delay = delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            thread::sleep(Duration::from_millis(delay));
        }
        if down.load(Ordering::Relaxed) {
            break;
        }
        log.lock().expect("lock").push(SeenRequest {
            method,
            target,
            body_len,
        });
        if server.write_all(&buf[..head_end]).is_err() {
            break;
        }
        buf.drain(..head_end);
        let mut left = body_len;
        let take = (left as usize).min(buf.len());
        if server.write_all(&buf[..take]).is_err() {
            break;
        }
        buf.drain(..take);
        left -= take as u64;
        while left > 0 {
            let want = (left as usize).min(chunk.len());
            match client.read(&mut chunk[..want]) {
                Ok(0) | Err(_) => {
                    left = 0;
                    buf.clear();
                    let _ = server.shutdown(Shutdown::Both);
                }
                Ok(n) => {
                    if server.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n as u64;
                }
            }
        }
    }
    let _ = server.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
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

    pub fn journal(&self) -> PathBuf {
        self.dir.path().join("state/journal.db")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ha-edge.toml")
    }

    /// Writes a config for `endpoint`; `agent_extra` and `source_extra` are appended to those
    /// tables (TOML lines).
    pub fn write_config(&self, endpoint: &str, agent_extra: &str, source_extra: &str) -> PathBuf {
        let text = format!(
            r#"[agent]
journal = "{journal}"
{agent_extra}

[[source]]
name = "exports"
type = "fs"
path = "{src}"
{source_extra}

[destination]
type = "s3"
endpoint = "{endpoint}"
region = "eu-central-1"
bucket = "{bucket}"
prefix = "fhir/"
path_style = true
"#,
            journal = self.journal().display(),
            src = self.src().display(),
            bucket = self.bucket,
        );
        std::fs::write(self.config_path(), text).expect("write config");
        self.config_path()
    }

    /// A command for the ha-edge binary with test credentials in the environment.
    pub fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
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
