//! The agent's end of the QUIC link: one connection to the relay, reused by every object (one
//! stream each), opened again when it is lost. The handshake runs on the first stream.
//!
//! # Design
//! - `connection()` returns the live connection or opens one (under a lock, so concurrent objects
//!   share one handshake); a lost connection is noticed by the next stream and opened again.
//! - Fail-over: `destination.relay` may list several relays, and a name may resolve to several
//!   addresses. They are tried in order from the one last used; a connection that failed moves
//!   the agent on to the next one, where its transfers resume (a relay keeping partial state in
//!   S3 answers the offset any replica holds).
//! - Errors are classified for the scheduler: no answer is `Unreachable` (an outage, probed
//!   gently), a refusal of this agent is `Refused` (a destination refusal, reported once), bad
//!   certificates or keys are `Setup`.
//!
//! Must not break: one connection is shared by all streams and reopened when lost; a refusal is
//! reported, never retried in a tight loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_edge_proto::{ClientHandshake, Handshake};
use tokio::sync::Mutex;

use super::tls::{self, TlsError};
use crate::config::RelayDestination;

/// Application close code the relay uses when a certificate carries no authorized identity.
pub const CLOSE_UNAUTHORIZED: u32 = 1;
/// Application close code of an orderly shutdown.
pub const CLOSE_SHUTDOWN: u32 = 2;
/// How long a closing agent waits for its close to reach the relay: one round trip, within.
const CLOSE_WAIT: std::ops::Range<Duration> = Duration::from_millis(10)..Duration::from_millis(500);

/// Why the link to the relay failed: unreachable (an outage), refused (this agent), set-up, or a
/// protocol error.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("relay setup: {0}")]
    Setup(String),
    /// No connection, or it was lost: the path is down (or the relay is).
    #[error("relay {relay}: {detail}")]
    Unreachable { relay: String, detail: String },
    /// The relay will not talk to this agent (certificate, identity, version).
    #[error("relay {relay} refuses this agent: {detail}")]
    Refused { relay: String, detail: String },
    #[error("relay {relay}: protocol error: {detail}")]
    Protocol { relay: String, detail: String },
}

impl From<TlsError> for LinkError {
    /// Certificate and key problems are set-up errors (the operator's to fix).
    fn from(e: TlsError) -> LinkError {
        LinkError::Setup(e.to_string())
    }
}

/// The agent's connection to one relay, shared by every object task.
pub struct RelayClient {
    endpoint: quinn::Endpoint,
    /// The relays as configured, for messages ("a:4433, b:4433").
    relay: String,
    relays: Vec<String>,
    /// Where the next connection attempt starts, in the list of resolved addresses.
    next: std::sync::atomic::AtomicUsize,
    server_name: String,
    agent: String,
    idle: Duration,
    conn: Mutex<Option<quinn::Connection>>,
    /// The capability bits the relay announced in its last handshake.
    capabilities: std::sync::atomic::AtomicU64,
}

/// Where the agent's certificate and key come from.
pub fn cert_and_key(dest: &RelayDestination) -> Result<(PathBuf, PathBuf), LinkError> {
    if let (Some(c), Some(k)) = (&dest.cert_file, &dest.key_file) {
        return Ok((c.clone(), k.clone()));
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from).ok_or_else(|| {
        LinkError::Setup("no client certificate: set destination.cert_file and key_file, or provide relay_cert.pem and relay_key.pem via systemd LoadCredential=".into())
    })?;
    let find = |name: &str| {
        crate::s3::credentials::credential_file(&dir, name)
            .ok_or_else(|| LinkError::Setup(format!("no {name} in {}", dir.display())))
    };
    Ok((find("relay_cert.pem")?, find("relay_key.pem")?))
}

impl RelayClient {
    /// A client for `dest`, naming itself `agent_name` in the handshake; `idle` bounds the QUIC
    /// idle timeout (a cut link is noticed within it).
    pub fn new(
        dest: &RelayDestination,
        agent: &str,
        idle: Duration,
    ) -> Result<Arc<RelayClient>, LinkError> {
        let (cert, key) = cert_and_key(dest)?;
        let cfg = tls::client_config(&dest.ca_file, &cert, &key, idle, dest.congestion)?;
        let bind: std::net::SocketAddr = "[::]:0".parse().expect("literal");
        let mut endpoint = quinn::Endpoint::client(bind)
            .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal")))
            .map_err(|e| LinkError::Setup(format!("cannot open a UDP socket: {e}")))?;
        endpoint.set_default_client_config(cfg);
        Ok(Arc::new(RelayClient {
            endpoint,
            relay: dest.relays.join(", "),
            relays: dest.relays.clone(),
            next: std::sync::atomic::AtomicUsize::new(0),
            server_name: dest.server_name.clone(),
            agent: agent.to_string(),
            idle,
            conn: Mutex::new(None),
            capabilities: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// host:port of the relay.
    pub fn relay(&self) -> &str {
        &self.relay
    }

    /// Whether the relay takes eager offers (data and commit without waiting for the answer).
    pub fn eager(&self) -> bool {
        self.capabilities.load(std::sync::atomic::Ordering::Relaxed) & ha_edge_proto::CAP_EAGER != 0
    }

    /// Whether the relay takes sealed offers (the SHA-256 sent with the commit).
    pub fn sealed(&self) -> bool {
        self.capabilities.load(std::sync::atomic::Ordering::Relaxed) & ha_edge_proto::CAP_SEAL != 0
    }

    /// The QUIC idle timeout.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// An outage of the relay, with what failed.
    fn unreachable(&self, detail: impl Into<String>) -> LinkError {
        LinkError::Unreachable {
            relay: self.relay.clone(),
            detail: detail.into(),
        }
    }

    /// Maps a lost or refused connection to what it means for the agent.
    pub fn connection_error(&self, e: &quinn::ConnectionError) -> LinkError {
        use quinn::ConnectionError as C;
        match e {
            C::ConnectionClosed(c) => {
                let code = u64::from(c.error_code);
                if (0x100..0x200).contains(&code) {
                    LinkError::Refused {
                        relay: self.relay.clone(),
                        detail: format!(
                            "TLS handshake refused (alert {}): is this agent's certificate signed by the CA the relay trusts, and still valid?",
                            code - 0x100
                        ),
                    }
                } else {
                    self.unreachable(e.to_string())
                }
            }
            C::ApplicationClosed(a)
                if a.error_code == quinn::VarInt::from_u32(CLOSE_UNAUTHORIZED) =>
            {
                LinkError::Refused {
                    relay: self.relay.clone(),
                    detail: String::from_utf8_lossy(&a.reason).into_owned(),
                }
            }
            C::VersionMismatch => LinkError::Refused {
                relay: self.relay.clone(),
                detail: "no common QUIC version".into(),
            },
            _ => self.unreachable(e.to_string()),
        }
    }

    /// The open connection, or a new one (connect, TLS, handshake) to the first relay address
    /// that answers, from the one last used on.
    pub async fn connection(&self) -> Result<quinn::Connection, LinkError> {
        use std::sync::atomic::Ordering;
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let mut candidates = Vec::new();
        let mut unresolved = Vec::new();
        for relay in &self.relays {
            match tokio::net::lookup_host(relay).await {
                Ok(addrs) => candidates.extend(addrs.map(|a| (relay.as_str(), a))),
                Err(e) => unresolved.push(format!("{relay}: cannot resolve: {e}")),
            }
        }
        if candidates.is_empty() {
            return Err(self.unreachable(if unresolved.is_empty() {
                "the names resolve to no address".to_string()
            } else {
                unresolved.join("; ")
            }));
        }
        let start = self.next.load(Ordering::Relaxed) % candidates.len();
        let mut last = None;
        for i in 0..candidates.len() {
            let at = (start + i) % candidates.len();
            let (relay, addr) = candidates[at];
            let began = Instant::now();
            match self.connect(addr).await {
                Ok((conn, early)) => {
                    self.next.store(at, Ordering::Relaxed);
                    // From the first packet to the relay's answer to the hello: two round trips,
                    // one when the session resumed with the hello in 0-RTT.
                    let setup_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
                    if i > 0 || start > 0 {
                        tracing::warn!(relay, remote = %addr, setup_ms, early_data = early, "connected to another relay (fail-over)");
                    } else {
                        tracing::info!(relay, remote = %addr, setup_ms, early_data = early, "connected to the relay");
                    }
                    *guard = Some(conn.clone());
                    return Ok(conn);
                }
                // Another relay may take this agent; a refusal of the agent itself is final.
                Err(e @ LinkError::Unreachable { .. }) => {
                    if candidates.len() > 1 {
                        tracing::warn!(relay, remote = %addr, error = %e, "relay unreachable; trying the next");
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| self.unreachable("no relay answered")))
    }

    /// One connection attempt to `addr`: QUIC, TLS, then the protocol's handshake. Returns the
    /// connection, and whether the hello went in 0-RTT (and the relay took it).
    ///
    /// With a session ticket from an earlier connection to this relay, the hello goes out in
    /// 0-RTT and the relay answers it in its first flight: the connection is ready in one round
    /// trip, not two. It is handed out only once the TLS handshake has completed, so no offer
    /// and no commit is ever sent in 0-RTT (which an attacker could replay); the hello is the
    /// one idempotent message that is. If the relay refuses the early data (its sessions were
    /// lost, a restart), the hello is sent again after the handshake.
    async fn connect(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<(quinn::Connection, bool), LinkError> {
        let connecting = self
            .endpoint
            .connect(addr, &self.server_name)
            .map_err(|e| LinkError::Setup(e.to_string()))?;
        let no_answer = || self.unreachable(format!("{addr}: no answer within {:?}", self.idle));
        let (conn, accepted) = match connecting.into_0rtt() {
            Ok(resumed) => resumed,
            // No session to resume: a full handshake, then the hello.
            Err(connecting) => {
                let conn = tokio::time::timeout(self.idle, connecting)
                    .await
                    .map_err(|_| no_answer())?
                    .map_err(|e| self.connection_error(&e))?;
                self.handshake(&conn).await?;
                return Ok((conn, false));
            }
        };
        let early = self.handshake(&conn).await;
        // Whether the relay took the 0-RTT data; false too if the connection failed.
        let took = tokio::time::timeout(self.idle, accepted)
            .await
            .map_err(|_| no_answer())?;
        if let Some(reason) = conn.close_reason() {
            return Err(self.connection_error(&reason));
        }
        match (early, took) {
            (Ok(()), true) => Ok((conn, true)),
            (Err(e), true) => Err(e),
            (_, false) => {
                tracing::debug!(relay = %self.relay, remote = %addr, "0-RTT refused by the relay; hello sent again");
                self.handshake(&conn).await?;
                Ok((conn, false))
            }
        }
    }

    /// Hello and Welcome on the first stream: protocol version and identity; a refusal is
    /// `Refused`.
    async fn handshake(&self, conn: &quinn::Connection) -> Result<(), LinkError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| self.connection_error(&e))?;
        let mut hs = ClientHandshake::new(&self.agent, Instant::now(), self.idle);
        while let Some(frame) = hs.poll_transmit() {
            send.write_all(&frame)
                .await
                .map_err(|e| self.write_error(conn, e))?;
        }
        let mut buf = vec![0u8; 4096];
        loop {
            let deadline = hs
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + self.idle);
            let n = tokio::time::timeout_at(deadline.into(), recv.read(&mut buf))
                .await
                .map_err(|_| self.unreachable("no handshake answer"))?
                .map_err(|e| self.read_error(conn, e))?
                .ok_or_else(|| self.unreachable("the relay closed the handshake stream"))?;
            let out =
                hs.handle_input(&buf[..n], Instant::now())
                    .map_err(|e| LinkError::Protocol {
                        relay: self.relay.clone(),
                        detail: e.to_string(),
                    })?;
            match out {
                None => continue,
                Some(Handshake::Done { peer, capabilities }) => {
                    tracing::debug!(relay = %self.relay, peer = %peer, capabilities, "relay handshake done");
                    self.capabilities
                        .store(capabilities, std::sync::atomic::Ordering::Relaxed);
                    let _ = send.finish();
                    return Ok(());
                }
                Some(Handshake::Refused { reason, message }) => {
                    return Err(LinkError::Refused {
                        relay: self.relay.clone(),
                        detail: format!("{reason:?}: {message}"),
                    })
                }
            }
        }
    }

    /// A connection that failed: forget it, so the next object connects again.
    pub async fn forget(&self, conn: &quinn::Connection) {
        let mut guard = self.conn.lock().await;
        if guard
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            log_stats(conn);
            *guard = None;
            // The next attempt starts with the next relay address.
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A failed stream write: the connection's reason if it closed, else a protocol error.
    pub fn write_error(&self, conn: &quinn::Connection, e: quinn::WriteError) -> LinkError {
        match (e, conn.close_reason()) {
            (_, Some(reason)) => self.connection_error(&reason),
            (quinn::WriteError::ConnectionLost(c), _) => self.connection_error(&c),
            (other, None) => self.unreachable(other.to_string()),
        }
    }

    /// A failed stream read: the connection's reason if it closed, else a protocol error.
    pub fn read_error(&self, conn: &quinn::Connection, e: quinn::ReadError) -> LinkError {
        match (e, conn.close_reason()) {
            (_, Some(reason)) => self.connection_error(&reason),
            (quinn::ReadError::ConnectionLost(c), _) => self.connection_error(&c),
            (other, None) => self.unreachable(other.to_string()),
        }
    }

    /// Closes the connection (at shutdown). The close goes out at once; the wait after it is
    /// one round trip (10 ms to 500 ms), time for the relay to hear it, not the whole closing
    /// period (three probe timeouts, 0.2 s and more), which every `run --once` would add to its
    /// run. A close that is lost all the same costs the relay its idle timeout for this
    /// connection, nothing more: transfers resume from what it stored.
    pub async fn close(&self) {
        let mut wait = CLOSE_WAIT.start;
        if let Some(c) = self.conn.lock().await.take() {
            log_stats(&c);
            wait = c.rtt().clamp(CLOSE_WAIT.start, CLOSE_WAIT.end);
            c.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"agent stopping");
        }
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
    }
}

/// What a connection moved and lost, when it ends (sizing windows and choosing `congestion`).
fn log_stats(conn: &quinn::Connection) {
    let s = conn.stats();
    tracing::info!(
        sent_bytes = s.udp_tx.bytes,
        sent_packets = s.path.sent_packets,
        lost_packets = s.path.lost_packets,
        lost_bytes = s.path.lost_bytes,
        congestion_events = s.path.congestion_events,
        rtt_ms = u64::try_from(s.path.rtt.as_millis()).unwrap_or(u64::MAX),
        cwnd = s.path.cwnd,
        "relay connection statistics"
    );
}
