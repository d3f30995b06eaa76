//! Delivery: where objects go. Each delivery ends in one `Outcome`, and the scheduler alone turns
//! outcomes into journal states and retry decisions.
//!
//! # The contract of a sink
//! - `deliver` takes one journal row and its origin, does whatever its protocol needs (committing
//!   each step to the journal before the next one depends on it) and returns one `Outcome`.
//! - `Delivered` carries the SHA-256 stored and what the destination answered; the scheduler
//!   commits it and only then acts on the source.
//! - A sink never sleeps to retry an object: it reports `Retry`, `Unreachable` or a
//!   `DestinationError`, and the scheduler's policy decides when to try again.
//!
//! Must not break: a delivery returns exactly one `Outcome`, and `Delivered` only after the stored
//! object was verified.

/// `--dry-run`: lists instead of sending.
pub mod dry_run;
/// What a destination refused, in the sink layer's terms.
pub mod error;
/// Reading one source version, within the memory budget.
pub mod read;
/// Delivery to a QUIC relay.
pub mod relay;
/// Delivery to an S3 bucket.
pub mod s3;
/// Reading a source once, in order, for a multipart upload with a full-object CRC.
pub mod stream;

use tokio::sync::watch;

use crate::journal::{JournalError, ObjectRow};
use crate::relay::client::LinkError;
use crate::retry::Class;
use error::{Code, DestinationError, Scope};

/// What the scheduler needs of a destination. `Sink` is the real one (S3 or a relay); the
/// driver's own tests give it a scripted one, to check its timing with tokio's paused clock.
pub trait Destination: Send + Sync + 'static {
    /// Delivers one object (see `Sink::deliver`).
    fn deliver(
        &self,
        row: &ObjectRow,
        origin: &read::Origin,
        confirm: s3::Confirm,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = (Outcome, Unrecorded)> + Send;
    /// One cheap request before the first upload.
    fn preflight(&self) -> impl std::future::Future<Output = Preflight> + Send;
    /// After a preflight found the destination fine: what the sink learns once per journal
    /// (S3: whether conditional writes are honoured). Runs in the background, beside the first
    /// deliveries: a delivery that depends on what it learns waits for it in the sink.
    fn ready(&self) -> impl std::future::Future<Output = ()> + Send;
    /// Where objects go, for logs.
    fn endpoint(&self) -> String;
    /// The bucket, for logs.
    fn bucket(&self) -> String;
    /// The run is over: say goodbye (the relay), bounded in time.
    fn close(&self) -> impl std::future::Future<Output = ()> + Send;
    /// The memory budget its reads share (record checks read within it too).
    fn budget(&self) -> Option<read::Budget> {
        None
    }
}

/// The destination: an S3 bucket, or a QUIC relay.
pub enum Sink {
    S3(s3::S3Sink),
    Relay(relay::RelaySink),
}

impl Destination for Sink {
    /// Delivers one object, confirmed as `confirm` says; the second value is its share of the
    /// memory budget until the delivery is committed.
    async fn deliver(
        &self,
        row: &ObjectRow,
        origin: &read::Origin,
        confirm: s3::Confirm,
        stop: watch::Receiver<bool>,
    ) -> (Outcome, Unrecorded) {
        match self {
            Sink::S3(s) => s.deliver(row, origin, confirm, stop).await,
            // The relay confirms by hashing what it stored (Stored) in every case, and holds
            // nothing back: a crash before the commit asks the relay, which has the object.
            Sink::Relay(r) => (r.deliver(row, origin, stop).await, None),
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Sink::S3(s) => s.client().endpoint().to_string(),
            Sink::Relay(r) => format!("quic://{}", r.client().relay()),
        }
    }

    fn bucket(&self) -> String {
        match self {
            Sink::S3(s) => s.client().bucket().to_string(),
            Sink::Relay(_) => "(the relay's)".into(),
        }
    }

    /// HeadBucket; for a relay, connect and handshake.
    async fn preflight(&self) -> Preflight {
        match self {
            Sink::S3(s) => match s.client().head_bucket().await {
                Ok(()) => Preflight::Ok,
                // A 403 proves nothing here (a least-privilege policy may lack s3:ListBucket),
                // and a network error neither: the first real request decides those.
                Err(e) if e.class() == Class::Destination && e.status() != Some(403) => {
                    Preflight::Refused(DestinationError::from_s3(&e))
                }
                Err(e) => Preflight::Inconclusive(e.to_string()),
            },
            Sink::Relay(r) => match r.client().connection().await {
                Ok(_) => Preflight::Ok,
                Err(LinkError::Refused { relay, detail }) => {
                    Preflight::Refused(relay::refused_agent(&relay, &detail))
                }
                Err(LinkError::Setup(m)) => Preflight::Refused(DestinationError {
                    scope: Scope::Destination,
                    code: Code::Setup,
                    detail: m,
                    advice: None,
                }),
                Err(e) => Preflight::Inconclusive(e.to_string()),
            },
        }
    }

    async fn ready(&self) {
        if let Sink::S3(s3) = self {
            s3.probe_conditional().await;
        }
    }

    fn budget(&self) -> Option<read::Budget> {
        Some(match self {
            Sink::S3(s) => s.budget().clone(),
            Sink::Relay(r) => r.budget().clone(),
        })
    }

    async fn close(&self) {
        if let Sink::Relay(r) = self {
            // Tell the relay we are gone (streams in flight resume on the next start).
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), r.client().close()).await;
        }
    }
}

/// What the check before the first upload found.
#[derive(Debug)]
pub enum Preflight {
    Ok,
    /// The destination refuses: reported at once, before any object is tried.
    Refused(DestinationError),
    /// Nothing certain (no answer, or an answer that proves nothing): the first upload decides.
    Inconclusive(String),
}

/// What a delivery keeps from the memory budget until the scheduler has committed it: the share
/// of a whole object that is sent but not yet recorded as delivered. A crash now sends those
/// bytes again, so they count against the same bound as bytes in flight (`parts_in_flight x
/// part_size`), and a slow journal disk holds back new reads instead of piling up re-sends.
pub type Unrecorded = Option<tokio::sync::OwnedSemaphorePermit>;

/// How one delivery ended: the scheduler's only input from a sink.
#[derive(Debug)]
pub enum Outcome {
    /// In the bucket and verified (size and SHA-256); carries that SHA-256 and what the
    /// destination answered (ETag, version), recorded so that only this object is replaced.
    Delivered([u8; 32], crate::journal::Landed),
    /// Transient failure after the request-level retries: try the object again later.
    Retry(String),
    /// No answer from the destination at all (connect error, timeout, reset) after the
    /// request-level retries: the path is down, not this object.
    Unreachable(String),
    /// The destination refuses: this object (rejected), this source's keys (that source
    /// pauses) or everything (credentials, bucket, region: the destination pauses); the
    /// operator is told once.
    Destination(DestinationError),
    /// This object can never be delivered as it is.
    Rejected(String),
    /// It failed its record check (`validate`): not sent. The reason holds no record content.
    Quarantined(crate::validate::Invalid),
    /// Another writer's object is at the key: left alone, the source kept, the operator told.
    Conflict(String),
    /// The source file disappeared before it was sent.
    Vanished(String),
    /// The source file changed under the upload; the object waits for it to settle again.
    Changed(String),
    /// Shutdown stopped it; the journal holds where it got to.
    Interrupted,
    /// `--dry-run`: listed as what would be sent; nothing was sent.
    Listed,
    /// The journal failed: nothing can be recorded, so the agent must stop.
    Fatal(JournalError),
}
