//! Certificates and keys for the QUIC link: mutual TLS 1.3, each side trusting only the CA it
//! is configured with (never the public web roots).
//!
//! # What is checked
//! - The agent checks the relay's certificate against `destination.ca_file` and its name
//!   against `server_name`; the relay checks the agent's against `client_ca_file`, and then its
//!   DNS name against the `[[agent]]` identities (in `server.rs`).
//! - Both sides speak TLS 1.3 only, with ring as the one crypto provider; keys are read from
//!   files (or `$CREDENTIALS_DIRECTORY`), never from the TOML.
//!
//! # Resumption and 0-RTT
//! - The relay keeps sessions in memory (stateful, `SESSIONS` of them) and hands each agent
//!   `TICKETS` single-use tickets per connection; TLS 1.3 allows 0-RTT only with such tickets, so
//!   a recorded first flight replayed to the relay finds its ticket spent (a full handshake,
//!   its early data refused).
//! - An agent that reconnects to the same relay resumes and sends its protocol hello in 0-RTT;
//!   nothing else goes before the handshake completes (`client.rs`), and the relay serves no
//!   object stream before it either (`server.rs`).
//! - A resumed session carries the agent's certificate from the first handshake, unverified
//!   since: the relay verifies it again against `client_ca_file` at the current time
//!   (`ClientTls::verify`), so an expired certificate is refused on resumption too.
//!
//! Must not break: each side trusts only its configured CA, and a certificate without the expected
//! name is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;

use crate::config::Congestion;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key that cannot be used, with its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("{path} holds no certificate")]
    NoCert { path: PathBuf },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |detail: String| TlsError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// A trust store of exactly the CA file's certificates.
pub fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| TlsError::Read {
            path: ca.to_path_buf(),
            detail: format!("unusable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// ring, the one crypto provider of the binary.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport limits both sides use: idle timeout, keep-alive, the flow-control windows that
/// bound how much one stream (and one connection) may have in flight, and the congestion
/// controller of what this side sends.
pub fn transport(
    idle: Duration,
    stream_window: u64,
    streams: u32,
    congestion: Congestion,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
    };
    let keep_alive = (idle / 3).max(Duration::from_millis(200));
    let idle = quinn::IdleTimeout::try_from(idle).unwrap_or(quinn::VarInt::from_u32(30_000).into());
    t.max_idle_timeout(Some(idle));
    // Well inside the idle timeout, so a quiet but healthy connection (the relay landing a
    // large object) is never taken for a dead one.
    t.keep_alive_interval(Some(keep_alive));
    let window = quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX);
    t.stream_receive_window(window);
    // The whole connection's window: all streams' windows, but at most 64 MiB (or one stream's),
    // which covers the bandwidth-delay product of a 1 Gbit/s link at 500 ms.
    let conn_window = stream_window
        .saturating_mul(u64::from(streams.max(1)))
        .min((64 << 20u64).max(stream_window));
    t.receive_window(quinn::VarInt::from_u64(conn_window).unwrap_or(quinn::VarInt::MAX));
    t.send_window(conn_window);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams.saturating_add(1)));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// The agent's side: trusts `ca` only, presents its certificate.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    idle: Duration,
    congestion: Congestion,
) -> Result<quinn::ClientConfig, TlsError> {
    let setup = |e: String| TlsError::Setup(e);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| setup(format!("client certificate {}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ha_edge_proto::ALPN.to_vec()];
    // Resumed sessions (kept in memory, rustls's default) may carry the hello in 0-RTT.
    cfg.enable_early_data = true;
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| setup(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(quic));
    c.transport_config(Arc::new(transport(idle, 8 << 20, 64, congestion)));
    Ok(c)
}

/// Sessions the relay remembers for resumption (each some hundreds of bytes and the agent's
/// certificate chain).
const SESSIONS: usize = 1024;
/// Single-use tickets the relay hands an agent per connection: one is spent by each attempt to
/// resume, failed ones (an outage) included.
const TICKETS: usize = 4;

/// The relay's check of agents' certificates, kept to verify a resumed session's certificate
/// again (it was verified in the handshake that made the session, perhaps hours ago).
#[derive(Clone, Debug)]
pub struct ClientTls {
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl ClientTls {
    /// Whether `chain` (leaf first) verifies against the client CA now.
    pub fn verify(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        self.verifier
            .verify_client_cert(leaf, rest, rustls_pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The relay's side: presents its certificate, requires a client certificate signed by
/// `client_ca` (unknown and expired ones are refused in the handshake), and takes 0-RTT from
/// resumed sessions (see the module's notes).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    transport_cfg: quinn::TransportConfig,
) -> Result<(quinn::ServerConfig, ClientTls), TlsError> {
    let setup = |e: String| TlsError::Setup(e);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(client_ca)?),
        provider(),
    )
    .build()
    .map_err(|e| setup(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| setup(format!("server certificate {}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ha_edge_proto::ALPN.to_vec()];
    // Stateful, single-use tickets: the only kind TLS 1.3 (and rustls) takes 0-RTT with.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSIONS);
    cfg.send_tls13_tickets = TICKETS;
    cfg.max_early_data_size = u32::MAX; // QUIC's only value for "0-RTT allowed"
    let quic =
        quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| setup(e.to_string()))?;
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(quic));
    s.transport_config(Arc::new(transport_cfg));
    Ok((s, ClientTls { verifier }))
}

/// Whether a (chain-verified) client certificate carries exactly `identity` as a DNS
/// subjectAltName. A wildcard name (`*.agents.test`) never matches: it would let one
/// certificate speak for every agent under that domain. The subject's CN is not looked at.
pub fn carries_identity(cert: &CertificateDer<'_>, identity: &str) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.valid_dns_names()
        .any(|n| !n.contains('*') && n.eq_ignore_ascii_case(identity))
}
