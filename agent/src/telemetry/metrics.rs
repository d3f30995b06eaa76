//! The metrics ha-edge exposes (Prometheus / OpenMetrics text, by `prometheus-client`): one
//! set for the agent, one for the relay, each in its own registry so that neither shows the
//! other's. Labels are bounded: a source name, an outcome, an operation, a refusal reason;
//! never a key or a path.
//!
//! Must not break: the metric names and labels (dashboards and alert rules use them; the README
//! lists them).

use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `{source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// `{source, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub source: String,
    pub outcome: &'static str,
}

/// `{op}`: an S3 operation (PutObject, UploadPart, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// `{version}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

/// `{source, result}`: a record check's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub source: String,
    pub result: &'static str,
}

/// `{reason}`: why the relay refused an agent or an offer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `{kind}`: an agent connection's TLS handshake: `resumed` (a session ticket from an earlier
/// connection; the agent's hello in 0-RTT) or `full`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    pub kind: &'static str,
}

/// The outcomes `ha_edge_objects_total` counts (all shown, from 0, for every source).
pub const OUTCOMES: [&str; 6] = [
    "delivered",
    "failed",
    "refused",
    "quarantined",
    "conflict",
    "vanished",
];

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Request latencies: 5 ms to about 80 s.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// The agent's metrics.
pub struct Agent {
    registry: Mutex<Registry>,
    pub objects: Family<OutcomeLabels, Counter>,
    pub bytes_sent: Family<SourceLabel, Counter>,
    pub pending_objects: Family<SourceLabel, Gauge>,
    pub pending_bytes: Family<SourceLabel, Gauge>,
    pub oldest_pending_age: Family<SourceLabel, FloatGauge>,
    pub destination_up: Gauge,
    pub outage_seconds: FloatCounter,
    pub retries: Family<OpLabel, Counter>,
    pub request_duration: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub journal_commit: Histogram,
    pub bandwidth_limit: FloatGauge,
    /// Record checks, by source and result (`valid`, `invalid`).
    pub validations: Family<ResultLabels, Counter>,
    /// When the current outage's seconds were last added to `outage_seconds`.
    outage_since: Mutex<Option<Instant>>,
    /// For `/readyz`: the journal is open (a run is going) ...
    pub journal_open: std::sync::atomic::AtomicBool,
    /// ... and the destination does not refuse us (Some: why it does).
    pub refusing: Mutex<Option<String>>,
}

impl Agent {
    fn new() -> Agent {
        let mut r = with_build_info();
        let m = Agent {
            registry: Mutex::new(Registry::default()),
            objects: Family::default(),
            bytes_sent: Family::default(),
            pending_objects: Family::default(),
            pending_bytes: Family::default(),
            oldest_pending_age: Family::default(),
            destination_up: Gauge::default(),
            outage_seconds: FloatCounter::default(),
            retries: Family::default(),
            request_duration: Family::new_with_constructor(request_buckets),
            journal_commit: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            bandwidth_limit: FloatGauge::default(),
            validations: Family::default(),
            outage_since: Mutex::new(None),
            journal_open: std::sync::atomic::AtomicBool::new(false),
            refusing: Mutex::new(None),
        };
        r.register(
            "ha_edge_objects",
            "Objects finished, by source and outcome",
            m.objects.clone(),
        );
        r.register(
            "ha_edge_bytes_sent",
            "Bytes of objects delivered and verified, by source",
            m.bytes_sent.clone(),
        );
        r.register(
            "ha_edge_pending_objects",
            "Objects waiting to be sent, by source",
            m.pending_objects.clone(),
        );
        r.register(
            "ha_edge_pending_bytes",
            "Bytes waiting to be sent, by source",
            m.pending_bytes.clone(),
        );
        r.register(
            "ha_edge_oldest_pending_age_seconds",
            "Age of the oldest object waiting to be sent, by source (0: none)",
            m.oldest_pending_age.clone(),
        );
        r.register(
            "ha_edge_destination_up",
            "1 while the destination accepts uploads, 0 while it refuses or does not answer",
            m.destination_up.clone(),
        );
        r.register(
            "ha_edge_outage_seconds",
            "Seconds the destination was refusing or unreachable",
            m.outage_seconds.clone(),
        );
        r.register(
            "ha_edge_request_retries",
            "Requests sent again after a transient failure, by operation",
            m.retries.clone(),
        );
        r.register(
            "ha_edge_request_duration_seconds",
            "Time per request attempt, by operation",
            m.request_duration.clone(),
        );
        r.register(
            "ha_edge_journal_commit_seconds",
            "Time per journal group commit (one fsync)",
            m.journal_commit.clone(),
        );
        r.register(
            "ha_edge_bandwidth_limit_bytes_per_second",
            "The bandwidth limit in force (+Inf: none; 0: paused)",
            m.bandwidth_limit.clone(),
        );
        r.register(
            "ha_edge_validations",
            "Record checks (validate) of files before they are sent, by source and result",
            m.validations.clone(),
        );
        m.bandwidth_limit.set(f64::INFINITY);
        m.destination_up.set(1);
        *m.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = r;
        m
    }

    /// Every outcome of `source` shown from 0 (so a rate over it exists before the first).
    pub fn register_source(&self, source: &str) {
        for outcome in OUTCOMES {
            let _ = self.objects.get_or_create(&OutcomeLabels {
                source: source.to_string(),
                outcome,
            });
        }
        let l = SourceLabel {
            source: source.to_string(),
        };
        let _ = self.bytes_sent.get_or_create(&l);
        let _ = self.pending_objects.get_or_create(&l);
        let _ = self.pending_bytes.get_or_create(&l);
        let _ = self.oldest_pending_age.get_or_create(&l);
    }

    /// One record check of `source`: valid or not.
    pub fn validated(&self, source: &str, valid: bool) {
        self.validations
            .get_or_create(&ResultLabels {
                source: source.to_string(),
                result: if valid { "valid" } else { "invalid" },
            })
            .inc();
    }

    /// One object of `source` finished with `outcome`.
    pub fn finished(&self, source: &str, outcome: &'static str) {
        self.objects
            .get_or_create(&OutcomeLabels {
                source: source.to_string(),
                outcome,
            })
            .inc();
    }

    /// The destination's state changed: up, or refusing / unreachable (an outage).
    pub fn destination(&self, up: bool, now: Instant) {
        self.account_outage(now);
        let mut since = self
            .outage_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (up, since.is_some()) {
            (true, true) => *since = None,
            (false, false) => *since = Some(now),
            _ => {}
        }
        self.destination_up.set(i64::from(up));
    }

    /// The destination refuses us (`Some(why)`) or no longer does.
    pub fn set_refusing(&self, why: Option<String>) {
        *self
            .refusing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// `/readyz`: the journal is open and the destination does not refuse us.
    pub fn ready(&self) -> Result<(), String> {
        if !self.journal_open.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the journal is not open (starting, or stopped on an error)".into());
        }
        match &*self
            .refusing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(why) => Err(format!("the destination refuses uploads: {why}")),
            None => Ok(()),
        }
    }

    /// Adds the current outage's seconds so far to `outage_seconds` (called at every scrape and
    /// state change, so the counter grows during an outage, not only after it).
    pub fn account_outage(&self, now: Instant) {
        let mut since = self
            .outage_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = *since {
            self.outage_seconds
                .inc_by(now.saturating_duration_since(t).as_secs_f64());
            *since = Some(now);
        }
    }

    /// The exposition (OpenMetrics text).
    pub fn encode(&self) -> String {
        self.account_outage(Instant::now());
        encode(&self.registry)
    }
}

/// The relay's metrics.
pub struct Relay {
    registry: Mutex<Registry>,
    pub connections: Gauge,
    pub streams: Counter,
    pub bytes_landed: Counter,
    pub bytes_received: Counter,
    pub objects_landed: Counter,
    pub refusals: Family<ReasonLabel, Counter>,
    pub handshakes: Family<HandshakeLabel, Counter>,
    pub partials: Gauge,
    pub partial_bytes: Gauge,
}

impl Relay {
    fn new() -> Relay {
        let mut r = with_build_info();
        let m = Relay {
            registry: Mutex::new(Registry::default()),
            connections: Gauge::default(),
            streams: Counter::default(),
            bytes_landed: Counter::default(),
            bytes_received: Counter::default(),
            objects_landed: Counter::default(),
            refusals: Family::default(),
            handshakes: Family::default(),
            partials: Gauge::default(),
            partial_bytes: Gauge::default(),
        };
        r.register(
            "ha_edge_relay_connections",
            "Agent connections open",
            m.connections.clone(),
        );
        r.register(
            "ha_edge_relay_streams",
            "Object streams accepted",
            m.streams.clone(),
        );
        r.register(
            "ha_edge_relay_bytes_landed",
            "Bytes of objects verified and stored",
            m.bytes_landed.clone(),
        );
        r.register(
            "ha_edge_relay_bytes_received",
            "Bytes of object data received from agents (a resumed transfer counts only what it sends again)",
            m.bytes_received.clone(),
        );
        r.register(
            "ha_edge_relay_objects_landed",
            "Objects verified and stored",
            m.objects_landed.clone(),
        );
        r.register(
            "ha_edge_relay_refusals",
            "Agents or offers refused, by reason",
            m.refusals.clone(),
        );
        r.register(
            "ha_edge_relay_handshakes",
            "Agent connections admitted, by TLS handshake: resumed (a session ticket; the agent's hello in 0-RTT, answered in the relay's first flight) or full",
            m.handshakes.clone(),
        );
        r.register(
            "ha_edge_relay_partials",
            "Partial transfers kept for resumption",
            m.partials.clone(),
        );
        r.register(
            "ha_edge_relay_partial_bytes",
            "Bytes held in partial transfers",
            m.partial_bytes.clone(),
        );
        *m.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = r;
        m
    }

    /// A refusal, by reason.
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An admitted agent connection, by its TLS handshake: `resumed` or `full`.
    pub fn handshake(&self, kind: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabel { kind })
            .inc();
    }

    /// The exposition (OpenMetrics text).
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// A registry holding `ha_edge_build_info{version}` (always 1).
fn with_build_info() -> Registry {
    let mut r = Registry::default();
    let build: Family<VersionLabel, Gauge> = Family::default();
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    r.register(
        "ha_edge_build_info",
        "The running ha-edge version (always 1)",
        build,
    );
    r
}

/// A registry's exposition (OpenMetrics text).
fn encode(registry: &Mutex<Registry>) -> String {
    let mut out = String::new();
    let r = registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// The agent's metrics (process-wide: one agent per process).
pub fn agent() -> &'static Agent {
    static M: LazyLock<Agent> = LazyLock::new(Agent::new);
    &M
}

/// The relay's metrics (process-wide).
pub fn relay() -> &'static Relay {
    static M: LazyLock<Relay> = LazyLock::new(Relay::new);
    &M
}
