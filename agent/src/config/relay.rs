//! The relay's own file (`ha-edge relay -c relay.toml`), validated the same way as the agent's.
//!
//! Must not break: an agent identity maps to exactly one key prefix, and no two prefixes overlap.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::destination::RawDestination;
use super::*;

/// The relay's file as written (phase one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelayFile {
    relay: Option<Spanned<RawRelay>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgentAuth>>,
    store: Option<Spanned<RawStore>>,
}

/// `[relay]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    listen: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    client_ca_file: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    max_streams_per_agent: Option<Spanned<i64>>,
    max_partials: Option<Spanned<i64>>,
    max_partial_bytes: Option<Spanned<toml::Value>>,
    max_handshakes: Option<Spanned<i64>>,
    max_connections_per_address: Option<Spanned<i64>>,
    stream_buffer: Option<Spanned<toml::Value>>,
    partial_ttl: Option<Spanned<toml::Value>>,
    idle_timeout: Option<Spanned<toml::Value>>,
    log_format: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    /// Address of the metrics endpoint; off if unset.
    metrics: Option<Spanned<String>>,
    /// QUIC congestion controller: "bbr" (default) or "cubic".
    congestion: Option<Spanned<String>>,
}

/// One `[[agent]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentAuth {
    identity: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
}

/// `[store]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    part_size: Option<Spanned<toml::Value>>,
    assembly_memory: Option<Spanned<toml::Value>>,
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    bucket: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    sse: Option<Spanned<String>>,
    kms_key_id: Option<Spanned<String>>,
    path_style: Option<Spanned<bool>>,
    profile: Option<Spanned<String>>,
    credentials_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

/// `ha-edge relay` settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The UDP address QUIC listens on.
    pub listen: std::net::SocketAddr,
    /// The relay's name in its logs.
    pub name: String,
    /// The relay's certificate (PEM), with its chain.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// Agents' certificates must chain to this CA.
    pub client_ca_file: PathBuf,
    /// Partial transfers and the directory store's index.
    pub state_dir: PathBuf,
    /// Objects one agent may send at once.
    pub max_streams_per_agent: u32,
    /// Open partial transfers per agent identity.
    pub max_partials: usize,
    /// Bytes of partial transfers per agent identity (the largest object it can send).
    pub max_partial_bytes: u64,
    /// Connections still in their handshake (TLS and Hello), across all clients.
    pub max_handshakes: usize,
    /// Open connections from one IP address (authenticated or not).
    pub max_connections_per_address: usize,
    /// Flow-control window per stream: the bytes one stream may have in flight.
    pub stream_buffer: u64,
    /// How long an untouched partial transfer is kept for a resume.
    pub partial_ttl: Duration,
    /// A connection silent this long is closed (also the handshake deadline).
    pub idle_timeout: Duration,
    /// The agents allowed in, each with its key prefix.
    pub agents: Vec<AgentAuth>,
    /// Where verified objects land.
    pub store: StoreConfig,
    /// Text or JSON lines.
    pub log_format: LogFormat,
    /// A tracing filter.
    pub log_level: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: off).
    pub metrics: Option<std::net::SocketAddr>,
    /// The QUIC congestion controller for what the relay sends.
    pub congestion: super::Congestion,
}

/// One agent identity (a DNS name in its certificate) and the key prefix it may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAuth {
    /// The DNS name its certificate must carry (matched exactly).
    pub identity: String,
    /// The only key prefix it may write under.
    pub prefix: crate::keymap::Prefix,
}

/// Where the relay lands verified objects.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Dir(PathBuf),
    S3 {
        bucket: Box<S3Destination>,
        part_size: u64,
        /// Memory for parts being assembled, across all transfers; beyond it, parts are
        /// assembled in a file in the state directory.
        assembly_memory: u64,
    },
}

impl RelayConfig {
    /// Reads and validates the relay's file; every problem at once.
    pub fn load(file: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            problems: vec![ConfigProblem {
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        RelayConfig::parse(file, &text)
    }

    /// Validates `text` as the relay file `file`.
    pub fn parse(file: &Path, text: &str) -> Result<RelayConfig, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_path_buf(),
            problems,
        };
        let raw: RawRelayFile = parse_raw_as(text).map_err(fail)?;
        let env = |_: &str| None;
        let mut v = Validator {
            text,
            env: &env,
            problems: Vec::new(),
        };
        let cfg = v.relay_file(raw);
        match cfg {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => {
                v.problems.sort_by_key(|p| (p.line, p.column));
                Err(fail(v.problems))
            }
        }
    }
}

impl Validator<'_> {
    /// Phase two of the relay's file: every value checked, every problem collected.
    fn relay_file(&mut self, raw: RawRelayFile) -> Option<RelayConfig> {
        let Some(r) = raw.relay else {
            self.problem(0..0, "relay", "missing [relay] table");
            return None;
        };
        let span = r.span();
        let r = r.into_inner();
        let listen = match r.listen {
            Some(l) => match l.get_ref().parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem(
                        l.span(),
                        "relay.listen",
                        format!(
                            "must be ip:port (e.g. \"0.0.0.0:4433\"), got {:?}",
                            l.get_ref()
                        ),
                    );
                    None
                }
            },
            None => {
                self.problem(
                    span.clone(),
                    "relay.listen",
                    "missing (e.g. \"0.0.0.0:4433\")",
                );
                None
            }
        };
        let file = |v: Option<Spanned<String>>, key: &str, what: &str, me: &mut Self| match v {
            Some(c) => Some(me.readable_file(&c, key, true)),
            None => {
                me.problem(span.clone(), key, format!("missing ({what})"));
                None
            }
        };
        let cert_file = file(
            r.cert_file,
            "relay.cert_file",
            "the relay's certificate, PEM",
            self,
        );
        let key_file = file(r.key_file, "relay.key_file", "its private key, PEM", self);
        let client_ca_file = file(
            r.client_ca_file,
            "relay.client_ca_file",
            "the CA that signs agents' certificates",
            self,
        );
        let state_span = r.state_dir.as_ref().map_or(0..0, Spanned::span);
        let state_dir = match r.state_dir {
            Some(d) if Path::new(d.get_ref()).is_absolute() => Some(PathBuf::from(d.into_inner())),
            Some(d) => {
                self.problem(d.span(), "relay.state_dir", "must be an absolute path");
                None
            }
            None => Some(PathBuf::from("/var/lib/ha-edge-relay")),
        };
        let max_streams = self.int_in(
            r.max_streams_per_agent,
            "relay.max_streams_per_agent",
            1,
            1024,
            64u32,
        );
        let max_partials = self.int_in(r.max_partials, "relay.max_partials", 1, 1_000_000, 64usize);
        let max_handshakes = self.int_in(
            r.max_handshakes,
            "relay.max_handshakes",
            1,
            100_000,
            64usize,
        );
        let max_connections_per_address = self.int_in(
            r.max_connections_per_address,
            "relay.max_connections_per_address",
            1,
            100_000,
            32usize,
        );
        let max_partial_bytes = self.size(
            r.max_partial_bytes,
            "relay.max_partial_bytes",
            1 << 20,
            u64::MAX,
            64 << 30,
        );
        let stream_buffer = self.size(
            r.stream_buffer,
            "relay.stream_buffer",
            64 * 1024,
            1 << 30,
            4 << 20,
        );
        let partial_ttl = self.duration(
            r.partial_ttl,
            "relay.partial_ttl",
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        );
        let idle_timeout = self.duration(
            r.idle_timeout,
            "relay.idle_timeout",
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        let log_format = match r.log_format {
            None => LogFormat::Text,
            Some(f) if f.get_ref() == "text" => LogFormat::Text,
            Some(f) if f.get_ref() == "json" => LogFormat::Json,
            Some(f) => {
                self.problem(f.span(), "relay.log_format", "must be \"text\" or \"json\"");
                LogFormat::Text
            }
        };
        let log_level = r
            .log_level
            .map_or_else(|| "info".to_string(), Spanned::into_inner);
        let metrics = r.metrics.and_then(|m| match m.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    m.span(),
                    "relay.metrics",
                    format!(
                        "must be an address and port, e.g. \"127.0.0.1:9465\", got {:?}",
                        m.get_ref()
                    ),
                );
                None
            }
        });
        let congestion = self.congestion(r.congestion, "relay.congestion");
        let mut agents = Vec::new();
        if raw.agent.is_empty() {
            self.problem(
                0..0,
                "agent",
                "no [[agent]] table: no agent could write anything (add identity and prefix)",
            );
        }
        for (i, a) in raw.agent.into_iter().enumerate() {
            let sp = a.span();
            let a = a.into_inner();
            let id_span = a.identity.as_ref().map_or(sp.clone(), Spanned::span);
            let identity = match a.identity {
                Some(id)
                    if rustls_pki_types::ServerName::try_from(id.get_ref().as_str())
                        .is_ok_and(|n| matches!(n, rustls_pki_types::ServerName::DnsName(_))) =>
                {
                    Some(id.into_inner())
                }
                Some(id) => {
                    self.problem(
                        id.span(),
                        &format!("agent[{i}].identity"),
                        format!("must be a DNS name as in the agent certificate's subjectAltName, got {:?}", id.get_ref()),
                    );
                    None
                }
                None => {
                    self.problem(sp.clone(), &format!("agent[{i}].identity"), "missing");
                    None
                }
            };
            let prefix = match a.prefix {
                Some(p) => match crate::keymap::Prefix::parse(p.get_ref()) {
                    Ok(prefix) => {
                        if let Some(other) = agents
                            .iter()
                            .find(|o: &&AgentAuth| o.prefix.overlaps(&prefix))
                        {
                            let how = if other.prefix == prefix {
                                "the same prefix as"
                            } else {
                                "a prefix overlapping that of"
                            };
                            self.problem(
                                p.span(),
                                &format!("agent[{i}].prefix"),
                                format!("{:?} is {how} {:?} ({:?}): one identity could write into the other's keys; give each its own folder", prefix.as_str(), other.identity, other.prefix.as_str()),
                            );
                        }
                        Some(prefix)
                    }
                    Err(why) => {
                        self.problem(p.span(), &format!("agent[{i}].prefix"), why);
                        None
                    }
                },
                None => {
                    self.problem(
                        sp,
                        &format!("agent[{i}].prefix"),
                        "missing (the key prefix this agent may write, e.g. \"fhir/dkfz/\")",
                    );
                    None
                }
            };
            if let (Some(identity), Some(prefix)) = (identity, prefix) {
                if agents.iter().any(|a: &AgentAuth| a.identity == identity) {
                    self.problem(
                        id_span,
                        &format!("agent[{i}].identity"),
                        format!("{identity:?} is listed twice (one prefix per identity)"),
                    );
                }
                agents.push(AgentAuth { identity, prefix });
            }
        }
        let store = match raw.store {
            Some(st) => {
                let sp = st.span();
                self.store(st.into_inner(), sp)
            }
            None => {
                self.problem(
                    0..0,
                    "store",
                    "missing [store] table (type = \"dir\" or \"s3\")",
                );
                None
            }
        };
        if let (Some(StoreConfig::Dir(landing)), Some(state)) = (&store, &state_dir) {
            let (l, st) = (resolve_lenient(landing), resolve_lenient(state));
            if st.starts_with(&l) || l.starts_with(&st) {
                self.problem(
                    state_span,
                    "relay.state_dir",
                    format!(
                        "{} and the store's path {} must be apart: partial transfers would land as objects, or objects be taken for state",
                        state.display(),
                        landing.display()
                    ),
                );
            }
        }
        Some(RelayConfig {
            listen: listen?,
            name: r
                .name
                .map_or_else(|| "ha-edge-relay".to_string(), Spanned::into_inner),
            cert_file: cert_file?,
            key_file: key_file?,
            client_ca_file: client_ca_file?,
            state_dir: state_dir?,
            max_streams_per_agent: max_streams,
            max_partials,
            max_partial_bytes,
            max_handshakes,
            max_connections_per_address,
            stream_buffer,
            partial_ttl,
            idle_timeout,
            agents,
            store: store?,
            log_format,
            log_level,
            metrics,
            congestion,
        })
    }

    /// The landing place: a directory, or a bucket (with its own credentials).
    fn store(&mut self, st: RawStore, span: Range<usize>) -> Option<StoreConfig> {
        let part_size = self.size(
            st.part_size,
            "store.part_size",
            MIN_PART_SIZE,
            MAX_PART_SIZE,
            16 << 20,
        );
        let is_s3 = st.kind.as_ref().is_some_and(|k| k.get_ref() == "s3");
        if let (Some(m), false) = (&st.assembly_memory, is_s3) {
            self.problem(
                m.span(),
                "store.assembly_memory",
                "only applies to type = \"s3\"",
            );
        }
        let assembly_memory = self.size(
            st.assembly_memory,
            "store.assembly_memory",
            0,
            64 << 30,
            128 << 20,
        );
        match st.kind.as_ref().map(|k| k.get_ref().as_str()) {
            Some("dir") => match st.path {
                Some(p) if Path::new(p.get_ref()).is_absolute() => {
                    Some(StoreConfig::Dir(PathBuf::from(p.into_inner())))
                }
                Some(p) => {
                    self.problem(p.span(), "store.path", "must be an absolute path");
                    None
                }
                None => {
                    self.problem(span, "store.path", "missing (where landed objects go)");
                    None
                }
            },
            Some("s3") => {
                if let Some(p) = &st.path {
                    self.problem(p.span(), "store.path", "only applies to type = \"dir\"");
                }
                let before = self.problems.len();
                let raw = RawDestination {
                    kind: st.kind,
                    endpoint: st.endpoint,
                    region: st.region,
                    bucket: st.bucket,
                    prefix: st.prefix,
                    sse: st.sse,
                    kms_key_id: st.kms_key_id,
                    path_style: st.path_style,
                    profile: st.profile,
                    credentials_file: st.credentials_file,
                    ca_file: st.ca_file,
                    relay: None,
                    server_name: None,
                    cert_file: None,
                    key_file: None,
                    congestion: None,
                    overwrite: None,
                    checksum: None,
                    storage_class: None,
                    tags: None,
                    content_types: None,
                };
                let d = self.s3_destination(raw, span);
                for p in &mut self.problems[before..] {
                    if let Some(rest) = p.key.strip_prefix("destination.") {
                        p.key = format!("store.{rest}");
                    }
                }
                Some(StoreConfig::S3 {
                    bucket: Box::new(d?),
                    part_size,
                    assembly_memory,
                })
            }
            _ => {
                let sp = st.kind.as_ref().map_or(span, Spanned::span);
                self.problem(sp, "store.type", "must be \"dir\" or \"s3\"");
                None
            }
        }
    }
}
