//! `ha-edge relay`: the cloud side of the QUIC link. Accepts agents with client certificates
//! signed by the configured CA, authorizes each identity for one key prefix, receives objects
//! one stream each (driven by the sans-IO `Receive` machine), verifies size and SHA-256, lands
//! them in a directory or an S3 bucket, and only then acknowledges.
//!
//! Bounds: streams per agent identity (a semaphore across its connections, plus QUIC's stream
//! limit per connection), bytes in flight per stream (QUIC flow control, `stream_buffer`),
//! open partial transfers and their bytes per identity (`max_partials`, `max_partial_bytes`:
//! one agent cannot starve another), free space on the state disk checked before an offer is
//! accepted, and partial transfers idle longer than `partial_ttl` are deleted.
//!
//! # Design
//! - **Admission**: at most `max_handshakes` handshakes at once and `max_connections_per_address`
//!   connections per peer address, each handshake bounded by `idle_timeout`; then the client
//!   certificate's DNS name must equal an `[[agent]] identity` exactly (no wildcards, no CN).
//!   A resumed TLS session's certificate is verified again; its hello (in 0-RTT) is answered in
//!   the relay's first flight, and no object stream is served before the handshake completes.
//! - **Streams**: each object is one stream driven by the sans-IO `Receive` machine: Offer
//!   (key under the identity's prefix, size, SHA-256) → Resume from what the partial holds (or
//!   AlreadyHave, or a Refusal with a reason) → data → Commit → Stored once landed. A sealed
//!   offer names a transfer id instead (the partial is keyed on it) and brings the SHA-256 with
//!   its commit (`Seal`); one that names no SHA-256 for a key holding an object of its size is
//!   answered `Present`, and the agent offers again with the SHA-256 (AlreadyHave, or resume).
//! - **Landing** (`store.rs`): the partial is fsynced, its size and SHA-256 checked, then
//!   renamed into the landing directory or uploaded to S3 (one verified upload); a permanent
//!   failure removes the partial, a temporary one keeps it for the agent's next attempt.
//!
//! Must not break: an agent writes only under the prefix its certificate is authorized for, and an
//! acknowledgement is sent only after the object landed verified.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ha_edge_proto::{Receive, ReceiveEvent, Refusal, ServerHandshake};
use rustls_pki_types::CertificateDer;
use tokio::sync::{watch, Semaphore};

use super::client::{CLOSE_SHUTDOWN, CLOSE_UNAUTHORIZED};
use super::store::{Landed, Landing, Limits, Partial, Store, StoreError};
use super::tls;
use crate::config::{AgentAuth, RelayConfig, StoreConfig};
use crate::keymap;
use crate::s3::{credentials, S3Client};
use crate::telemetry::{metrics, serve as endpoint};

/// The most idle connections to S3 the relay keeps (each holds a socket and its TLS buffers,
/// some tens of KiB).
const MAX_IDLE_S3_CONNECTIONS: usize = 256;

/// Why the relay cannot start (certificates, listen address, store).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store credentials: {0}")]
    Credentials(#[from] credentials::CredentialsError),
    #[error("store: {0}")]
    S3(#[from] crate::s3::S3Error),
    #[error("metrics: cannot listen on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Who may start a connection: a bound on handshakes in flight (TLS and the protocol's Hello,
/// each within `idle_timeout`), and on open connections per IP address, so that clients that
/// never finish (or never authenticate) cannot hold the relay's memory and sockets.
struct Admission {
    handshakes: Arc<Semaphore>,
    per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    max_per_address: usize,
}

/// One connection's place under `max_connections_per_address`, given back when dropped.
struct AddressSlot {
    admission: Arc<Admission>,
    ip: std::net::IpAddr,
}

impl Admission {
    /// A connection slot for `ip`, if it has fewer than its limit (unauthenticated peers cannot
    /// exhaust the relay).
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut m = self.per_address.lock().expect("not poisoned");
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            admission: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    /// Gives the address's slot back.
    fn drop(&mut self) {
        let mut m = self.admission.per_address.lock().expect("not poisoned");
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// What every connection task of the relay shares.
struct Shared {
    store: Store,
    agents: Vec<AgentAuth>,
    name: String,
    /// Verifies a resumed session's certificate again.
    client_tls: tls::ClientTls,
    idle: Duration,
    max_streams: u32,
    /// Streams in use per agent identity, across its connections.
    streams: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Shared {
    /// The stream limit of one identity, shared by all its connections.
    fn streams_of(&self, identity: &str) -> Arc<Semaphore> {
        let mut m = self.streams.lock().expect("not poisoned");
        m.entry(identity.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_streams as usize)))
            .clone()
    }
}

/// Runs the relay until `shutdown` turns true.
pub async fn serve(
    cfg: RelayConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let landing = match &cfg.store {
        StoreConfig::Dir(p) => Landing::Dir(p.clone()),
        StoreConfig::S3 {
            bucket,
            part_size,
            assembly_memory,
        } => {
            let creds = credentials::resolve(bucket)?;
            // Idle connections kept for reuse: as many as the agents' streams and the part
            // uploads may use at once (bounded), so that small objects landing side by side
            // do not open, and TLS-handshake, a connection each once the pool is full.
            let pool = usize::try_from(cfg.max_streams_per_agent)
                .unwrap_or(usize::MAX)
                .saturating_mul(cfg.agents.len().max(1))
                .saturating_add(super::remote::PART_UPLOADS)
                .min(MAX_IDLE_S3_CONNECTIONS);
            let client = S3Client::new(bucket, creds, 5, Duration::from_secs(120), pool)?;
            Landing::S3 {
                client,
                prefix: bucket.prefix.clone(),
                part_size: *part_size,
                assembly: super::remote::Budget::new(*assembly_memory),
            }
        }
    };
    let limits = Limits {
        partials: cfg.max_partials,
        partial_bytes: cfg.max_partial_bytes,
    };
    let store = Store::open(landing, &cfg.state_dir, limits)?;
    if let Some(addr) = cfg.metrics {
        let listener = endpoint::bind(addr)
            .await
            .map_err(|source| RelayError::Metrics { addr, source })?;
        tracing::info!(address = %addr, "metrics on /metrics, /healthz, /readyz");
        let exporter = Arc::new(RelayExporter {
            partial_dir: cfg.state_dir.join("partial"),
        });
        tokio::spawn(endpoint::serve(listener, exporter, shutdown.clone()));
    }
    let transport = tls::transport(
        cfg.idle_timeout,
        cfg.stream_buffer,
        cfg.max_streams_per_agent,
        cfg.congestion,
    );
    let (server_cfg, client_tls) = tls::server_config(
        &cfg.cert_file,
        &cfg.key_file,
        &cfg.client_ca_file,
        transport,
    )?;
    let endpoint =
        quinn::Endpoint::server(server_cfg, cfg.listen).map_err(|source| RelayError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let shared = Arc::new(Shared {
        store,
        agents: cfg.agents.clone(),
        name: cfg.name.clone(),
        client_tls,
        idle: cfg.idle_timeout,
        max_streams: cfg.max_streams_per_agent,
        streams: Mutex::new(HashMap::new()),
    });
    let admission = Arc::new(Admission {
        handshakes: Arc::new(Semaphore::new(cfg.max_handshakes)),
        per_address: Mutex::new(HashMap::new()),
        max_per_address: cfg.max_connections_per_address,
    });
    tracing::info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), store = %shared.store.describe(), agents = shared.agents.len(), "relay listening");
    crate::systemd::ready();
    let sweep = (cfg.partial_ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut expiry = tokio::time::interval(sweep);
    // Transfers kept in S3 are swept apart from the accept loop (a listing takes round trips).
    {
        let (shared, ttl, mut stop) = (shared.clone(), cfg.partial_ttl, shutdown.clone());
        let every = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tick.tick() => {}
                }
                let n = shared.store.expire_remote(ttl).await;
                if n > 0 {
                    tracing::info!(expired = n, ttl = %humantime::format_duration(ttl), "aborted idle transfers kept in S3");
                }
            }
        });
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = expiry.tick() => {
                let n = shared.store.expire(cfg.partial_ttl);
                if n > 0 {
                    tracing::info!(expired = n, ttl = %humantime::format_duration(cfg.partial_ttl), "deleted idle partial transfers");
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let Some(slot) = admission.admit(remote.ip()) else {
                    tracing::debug!(%remote, "refused: too many connections from this address (max_connections_per_address)");
                    metrics::relay().refused("too_many_connections");
                    incoming.refuse();
                    continue;
                };
                let Ok(handshake) = admission.handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "refused: too many handshakes in progress (max_handshakes)");
                    metrics::relay().refused("too_many_handshakes");
                    incoming.refuse();
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let deadline = tokio::time::Instant::now() + shared.idle;
                    match incoming.accept() {
                        Ok(connecting) => connection(connecting, shared, handshake, deadline).await,
                        Err(e) => tracing::debug!(%remote, error = %e, "connection attempt dropped"),
                    }
                });
            }
        }
    }
    tracing::info!("relay stopping");
    endpoint.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"relay stopping");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    Ok(())
}

/// Why an agent's certificate does not admit it.
enum Unauthorized {
    /// It no longer verifies against the client CA (a resumed session's, checked again).
    Invalid(String),
    /// It carries no `[[agent]]` identity.
    NoIdentity,
}

/// The first configured agent whose identity the certificate carries. A resumed session's
/// certificate (`again`: verified in the handshake that made the session, perhaps hours ago)
/// must first verify against the client CA now; a full handshake's was verified just now.
fn authorize<'a>(
    conn: &quinn::Connection,
    agents: &'a [AgentAuth],
    again: Option<&tls::ClientTls>,
) -> Result<&'a AgentAuth, Unauthorized> {
    let certs = conn
        .peer_identity()
        .and_then(|c| c.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(Unauthorized::NoIdentity)?;
    if let Some(client_tls) = again {
        client_tls.verify(&certs).map_err(Unauthorized::Invalid)?;
    }
    let leaf = certs.first().ok_or(Unauthorized::NoIdentity)?;
    agents
        .iter()
        .find(|a| tls::carries_identity(leaf, &a.identity))
        .ok_or(Unauthorized::NoIdentity)
}

/// An unknown CA, an expired certificate or none: refused in the TLS handshake.
fn refused_in_tls(remote: std::net::SocketAddr, e: &quinn::ConnectionError) {
    metrics::relay().refused("tls_handshake");
    tracing::warn!(%remote, error = %e, "connection refused in the handshake");
}

/// One agent's connection: TLS, authorization, the protocol handshake (by `deadline`, holding
/// one of the `max_handshakes` places), then its object streams.
///
/// The connection is taken as 0.5-RTT: a resumed agent's hello (in 0-RTT, its certificate known
/// from the session) is answered in the relay's first flight. A full handshake's certificate
/// comes with the agent's Finished, so there the relay waits for the handshake first. Either
/// way no object stream is served before the handshake has completed: 0-RTT data can be
/// replayed, and a replayed flight never completes it (its hello is answered, to no one).
async fn connection(
    connecting: quinn::Connecting,
    shared: Arc<Shared>,
    handshake: tokio::sync::OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) {
    let remote = connecting.remote_address();
    // quinn converts every incoming connection ("a 0.5-RTT connection will always be
    // successfully constructed"); `done` resolves when the TLS handshake has ended, and it
    // completed if the connection is still open then.
    let Ok((conn, mut done)) = connecting.into_0rtt() else {
        return tracing::debug!(%remote, "connection not convertible to 0.5-RTT; dropped");
    };
    let mut is_complete = false;
    // A resumed session knows the agent's certificate from its first flight (and brings the
    // hello in 0-RTT); a full handshake's comes with the agent's Finished.
    let resumed = conn.peer_identity().is_some();
    if !resumed {
        match tokio::time::timeout_at(deadline, &mut done).await {
            Ok(_) => match conn.close_reason() {
                None => is_complete = true,
                Some(e) => return refused_in_tls(remote, &e),
            },
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake not finished in time; dropped");
                return conn.close(
                    quinn::VarInt::from_u32(CLOSE_UNAUTHORIZED),
                    b"handshake not finished in time",
                );
            }
        }
    }
    let again = resumed.then_some(&shared.client_tls);
    let agent = match authorize(&conn, &shared.agents, again) {
        Ok(agent) => agent.clone(),
        Err(unauthorized) => {
            let why: &[u8] = match unauthorized {
                Unauthorized::Invalid(e) => {
                    tracing::warn!(%remote, error = %e, "refused: the resumed session's certificate no longer verifies");
                    metrics::relay().refused("tls_resumption");
                    b"this certificate no longer verifies"
                }
                Unauthorized::NoIdentity => {
                    tracing::warn!(%remote, "refused: the certificate carries no identity listed in [[agent]]");
                    metrics::relay().refused("unknown_identity");
                    b"this certificate carries no identity the relay authorizes"
                }
            };
            // A close during the handshake reaches the agent as a bare transport error (RFC
            // 9000 10.2.3), which it would take for an outage: the refusal waits for the
            // handshake's end, so that its code and reason arrive.
            if !is_complete {
                let _ = tokio::time::timeout_at(deadline, &mut done).await;
            }
            return conn.close(quinn::VarInt::from_u32(CLOSE_UNAUTHORIZED), why);
        }
    };
    let close_late = |conn: &quinn::Connection| {
        tracing::debug!(%remote, "protocol handshake not finished in time; closed");
        conn.close(
            quinn::VarInt::from_u32(CLOSE_UNAUTHORIZED),
            b"handshake not finished in time",
        );
    };
    // The control stream: the handshake, all of it by the deadline.
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return,
        Err(_) => return close_late(&conn),
    };
    let mut hs = ServerHandshake::with_capabilities(
        &shared.name,
        announced_capabilities(),
        Instant::now(),
        shared.idle,
    );
    let mut buf = vec![0u8; 4096];
    let name = loop {
        let n = match tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => n,
            Ok(_) => return,
            Err(_) => return close_late(&conn),
        };
        let res = hs.handle_input(&buf[..n], Instant::now());
        while let Some(f) = hs.poll_transmit() {
            let _ = send.write_all(&f).await;
        }
        match res {
            Ok(Some(name)) => break name,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(identity = %agent.identity, %remote, error = %e, "handshake failed");
                let _ = send.finish();
                return;
            }
        }
    };
    let _ = send.finish();
    // Nothing more is served until the TLS handshake completes: a hello in 0-RTT may be a
    // replay, and a replayed flight never completes it.
    if !is_complete {
        match tokio::time::timeout_at(deadline, &mut done).await {
            Ok(_) if conn.close_reason().is_none() => {}
            Ok(_) => return,
            Err(_) => return close_late(&conn),
        }
    }
    drop(handshake);
    metrics::relay().handshake(if resumed { "resumed" } else { "full" });
    tracing::info!(identity = %agent.identity, agent = %name, %remote, prefix = %agent.prefix, resumed, "agent connected");
    let _open = Open::connection();
    let streams = shared.streams_of(&agent.identity);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(identity = %agent.identity, reason = %e, "agent connection ended");
                return;
            }
        };
        // At most max_streams_per_agent streams of this identity at once, across connections.
        let Ok(permit) = streams.clone().acquire_owned().await else {
            return;
        };
        let (shared, agent) = (shared.clone(), agent.clone());
        metrics::relay().streams.inc();
        tokio::spawn(async move {
            let _permit = permit;
            object_stream(send, recv, &agent, &shared).await;
        });
    }
}

/// The relay's `/metrics`: the counters, and the partial transfers on disk at each scrape.
struct RelayExporter {
    partial_dir: std::path::PathBuf,
}

impl endpoint::Exporter for RelayExporter {
    fn metrics(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(async move {
            let dir = self.partial_dir.clone();
            let (count, bytes) = tokio::task::spawn_blocking(move || {
                std::fs::read_dir(dir).map_or((0, 0), |rd| {
                    rd.filter_map(Result::ok)
                        .filter_map(|e| e.metadata().ok())
                        .filter(std::fs::Metadata::is_file)
                        .fold((0i64, 0i64), |(n, b), m| {
                            (n + 1, b + i64::try_from(m.len()).unwrap_or(i64::MAX))
                        })
                })
            })
            .await
            .unwrap_or((0, 0));
            let m = metrics::relay();
            m.partials.set(count);
            m.partial_bytes.set(bytes);
            m.encode()
        })
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The capabilities the relay announces: all of this build's. A debug build (the tests') takes
/// `HA_EDGE_RELAY_CAPABILITIES` (bits) to play an older relay.
fn announced_capabilities() -> u64 {
    #[cfg(debug_assertions)]
    if let Some(bits) = std::env::var("HA_EDGE_RELAY_CAPABILITIES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return bits;
    }
    ha_edge_proto::CAPABILITIES
}

/// An open agent connection, counted in `ha_edge_relay_connections` while it lives.
struct Open;

impl Open {
    fn connection() -> Open {
        metrics::relay().connections.inc();
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::relay().connections.dec();
    }
}

/// One object: offer, decision, data into the partial transfer, commit, verification, landing.
async fn object_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    agent: &AgentAuth,
    shared: &Shared,
) {
    let mut rx = Receive::new(Instant::now(), shared.idle);
    let mut partial: Option<Partial> = None;
    let mut offer: Option<Offered> = None;
    let mut received = 0u64;
    let mut finished = false;
    loop {
        while let Some(f) = rx.poll_transmit() {
            if send.write_all(&f).await.is_err() {
                return;
            }
        }
        if finished {
            let _ = send.finish();
            // Let the answer reach the agent before the stream is dropped.
            let _ = tokio::time::timeout(shared.idle, send.stopped()).await;
            return;
        }
        let read = match rx.poll_timeout() {
            Some(deadline) => {
                match tokio::time::timeout_at(deadline.into(), recv.read_chunk(usize::MAX, true))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        if let Err(e) = rx.handle_timeout(Instant::now()) {
                            tracing::info!(identity = %agent.identity, error = %e, "stream idle; the partial transfer stays for a resume");
                            return;
                        }
                        continue;
                    }
                }
            }
            // Chunks as quinn holds them: no copy into a buffer of ours first.
            None => recv.read_chunk(usize::MAX, true).await,
        };
        let chunk = match read {
            Ok(Some(c)) => c.bytes,
            // The agent went away (connection lost, stopped): what arrived stays for a resume.
            Ok(None) | Err(_) => {
                if let Some(Offered { key, .. }) = &offer {
                    tracing::info!(identity = %agent.identity, key = %key, received, "transfer interrupted; the partial transfer is kept for a resume");
                }
                return;
            }
        };
        let mut input = &chunk[..];
        // Until a decision, the machine holds back what follows an offer (an eager offer's
        // data): decode again after each batch of events.
        while !finished {
            let events = match rx.handle_input(input, Instant::now()) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(identity = %agent.identity, error = %e, "protocol violation; stream closed");
                    finished = true;
                    break;
                }
            };
            input = &[];
            if events.is_empty() {
                break;
            }
            for ev in events {
                match ev {
                    ev @ (ReceiveEvent::Offered { .. } | ReceiveEvent::SealedOffered { .. }) => {
                        let Some(o) = Offered::of(ev) else { continue };
                        finished = decide(&mut rx, &mut partial, agent, shared, &o).await;
                        let eager = o.eager;
                        offer = Some(o);
                        if finished && eager {
                            // Answered without the data: the rest of the stream is not wanted.
                            let _ = recv.stop(quinn::VarInt::from_u32(0));
                        }
                    }
                    ReceiveEvent::Data { offset, bytes } => {
                        let Some(p) = partial.as_mut() else {
                            metrics::relay().refused("unavailable");
                            rx.refuse(Refusal::Unavailable, "no partial transfer open".into());
                            finished = true;
                            break;
                        };
                        let len = bytes.len() as u64;
                        if let Err(e) = p.append(offset, bytes).await {
                            tracing::error!(error = %e, "cannot write a partial transfer");
                            metrics::relay().refused("unavailable");
                            rx.refuse(Refusal::Unavailable, format!("the relay cannot write: {e}"));
                            finished = true;
                            break;
                        }
                        received += len;
                        metrics::relay().bytes_received.inc_by(len);
                    }
                    ev @ (ReceiveEvent::Committed | ReceiveEvent::Sealed { .. }) => {
                        let (Some(p), Some(o)) = (partial.take(), offer.as_ref()) else {
                            metrics::relay().refused("unavailable");
                            rx.refuse(Refusal::Unavailable, "no partial transfer open".into());
                            finished = true;
                            break;
                        };
                        finished = true;
                        let (key, size) = (&o.key, &o.size);
                        // The SHA-256 the bytes must have: the offer's, or the seal's (which
                        // must be the sealed offer's, had it named one).
                        let sha = match ev {
                            ReceiveEvent::Sealed { sha256 } => {
                                if o.sha256.is_some_and(|named| named != sha256) {
                                    rx.mismatch("the seal's SHA-256 is not the offer's".into());
                                    drop(p);
                                    continue;
                                }
                                sha256
                            }
                            _ => o.name,
                        };
                        match shared.store.land(p, key, *size, &sha).await {
                            Ok(Landed::Stored) => {
                                tracing::info!(identity = %agent.identity, key = %key, size, received, "stored and verified");
                                metrics::relay().objects_landed.inc();
                                metrics::relay().bytes_landed.inc_by(*size);
                                rx.stored();
                            }
                            Ok(Landed::Mismatch(detail)) => {
                                tracing::warn!(identity = %agent.identity, key = %key, %detail, "received bytes do not match the offer; dropped, the agent sends again");
                                rx.mismatch(detail);
                            }
                            Err(e) if e.is_permanent() => {
                                tracing::error!(identity = %agent.identity, key = %key, error = %e, "cannot land the object, and never will as it is: refused (partial transfer removed)");
                                metrics::relay().refused("rejected");
                                rx.refuse(Refusal::Rejected, e.to_string());
                            }
                            Err(e) => {
                                tracing::error!(identity = %agent.identity, key = %key, error = %e, "cannot land the object; the agent will try again");
                                metrics::relay().refused("unavailable");
                                rx.refuse(Refusal::Unavailable, e.to_string());
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An offer on a stream, plain, eager or sealed.
struct Offered {
    key: String,
    size: u64,
    /// The SHA-256 the offer names (a sealed offer may not).
    sha256: Option<[u8; 32]>,
    /// The full-object CRC-64/NVME a sealed offer may name besides.
    crc64nvme: Option<u64>,
    /// What names its partial transfer: the SHA-256, or a sealed offer's transfer id's name.
    name: [u8; 32],
    /// Its data from 0 follows at once, so it is accepted from 0 only.
    eager: bool,
    /// Its SHA-256 comes with its commit (`Seal`).
    sealed: bool,
}

impl Offered {
    /// The offer an event makes, if it is one.
    fn of(ev: ReceiveEvent) -> Option<Offered> {
        Some(match ev {
            ReceiveEvent::Offered {
                key,
                size,
                sha256,
                eager,
            } => Offered {
                key,
                size,
                sha256: Some(sha256),
                crc64nvme: None,
                name: sha256,
                eager,
                sealed: false,
            },
            ReceiveEvent::SealedOffered {
                key,
                size,
                transfer,
                sha256,
                crc64nvme,
            } => Offered {
                key,
                size,
                sha256,
                crc64nvme,
                name: super::store::sealed_name(&transfer),
                eager: false,
                sealed: true,
            },
            ReceiveEvent::Data { .. } | ReceiveEvent::Committed | ReceiveEvent::Sealed { .. } => {
                return None
            }
        })
    }
}

/// Answers an offer; returns whether the stream is finished.
async fn decide(
    rx: &mut Receive,
    partial: &mut Option<Partial>,
    agent: &AgentAuth,
    shared: &Shared,
    offer: &Offered,
) -> bool {
    let (key, size, eager) = (offer.key.as_str(), offer.size, offer.eager);
    if let Err(e) = keymap::bucket_key("", key) {
        tracing::warn!(identity = %agent.identity, key = ?key, reason = %e, "refused: bad key");
        metrics::relay().refused("bad_key");
        rx.refuse(Refusal::BadKey, e.to_string());
        return true;
    }
    if !agent.prefix.covers(key) {
        tracing::warn!(identity = %agent.identity, key = %key, prefix = %agent.prefix, "refused: key outside the agent's prefix");
        metrics::relay().refused("unauthorized");
        rx.refuse(
            Refusal::Unauthorized,
            format!("{} may write under {:?} only", agent.identity, agent.prefix),
        );
        return true;
    }
    // An offer without its SHA-256 (sealed) for a key that holds an object of its size: the
    // agent hashes its object and offers again with the SHA-256 (a lost journal, say).
    let known = match offer.sha256 {
        Some(sha) => shared.store.has(key, size, &sha, offer.crc64nvme).await,
        None => shared.store.present(key, size).await,
    };
    match known {
        Ok(true) if offer.sha256.is_none() => {
            tracing::info!(identity = %agent.identity, key = %key, size, "an object of the offered size is there; asking for the SHA-256");
            rx.present();
            return true;
        }
        Ok(true) => {
            tracing::info!(identity = %agent.identity, key = %key, "already stored with this SHA-256");
            rx.already_have();
            return true;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(key = %key, error = %e, "store lookup failed");
            metrics::relay().refused("unavailable");
            rx.refuse(Refusal::Unavailable, e.to_string());
            return true;
        }
    }
    match shared
        .store
        .open_transfer(&agent.identity, key, size, &offer.name, offer.sealed)
        .await
    {
        Ok(mut p) => {
            if eager && p.len > 0 {
                if let Err(e) = p.restart().await {
                    tracing::error!(error = %e, "cannot write a partial transfer");
                    metrics::relay().refused("unavailable");
                    rx.refuse(Refusal::Unavailable, format!("the relay cannot write: {e}"));
                    return true;
                }
            }
            let offset = p.len;
            if offset > 0 {
                tracing::info!(identity = %agent.identity, key = %key, offset, size, "resuming a partial transfer");
            }
            *partial = Some(p);
            if rx.accept(offset, Instant::now()).is_err() {
                return true;
            }
            false
        }
        // This agent's share is used up, or the disk is full: "busy, try later" (others go on).
        Err(
            e @ (StoreError::Busy(_)
            | StoreError::InUse
            | StoreError::Quota { .. }
            | StoreError::Full { .. }),
        ) => {
            tracing::warn!(identity = %agent.identity, key = %key, size, error = %e, "offer refused for now");
            metrics::relay().refused("busy");
            rx.refuse(Refusal::Busy, e.to_string());
            true
        }
        Err(e @ StoreError::TooLarge { .. }) => {
            tracing::warn!(identity = %agent.identity, key = %key, size, error = %e, "offer refused");
            metrics::relay().refused("rejected");
            rx.refuse(Refusal::Rejected, e.to_string());
            true
        }
        Err(e) => {
            tracing::error!(key = %key, error = %e, "cannot open a partial transfer");
            metrics::relay().refused("unavailable");
            rx.refuse(Refusal::Unavailable, e.to_string());
            true
        }
    }
}
