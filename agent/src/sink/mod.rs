//! Delivery: where objects go. Each delivery ends in one `Outcome`, and the scheduler alone turns
//! outcomes into journal states and retry decisions.

pub mod read;
pub mod relay;
pub mod s3;

use tokio::sync::watch;

use crate::journal::{JournalError, ObjectRow};
use crate::relay::client::LinkError;
use crate::s3::S3Error;

/// The destination: an S3 bucket, or a QUIC relay.
pub enum Sink {
    S3(s3::S3Sink),
    Relay(relay::RelaySink),
}

impl Sink {
    pub async fn deliver(
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

    /// Where objects go, for logs.
    pub fn endpoint(&self) -> String {
        match self {
            Sink::S3(s) => s.client().endpoint().to_string(),
            Sink::Relay(r) => format!("quic://{}", r.client().relay()),
        }
    }

    pub fn bucket(&self) -> String {
        match self {
            Sink::S3(s) => s.client().bucket().to_string(),
            Sink::Relay(_) => "(the relay's)".into(),
        }
    }

    /// One cheap request before the first upload (HeadBucket; connect and handshake).
    pub async fn preflight(&self) -> Result<(), S3Error> {
        match self {
            Sink::S3(s) => s.client().head_bucket().await,
            Sink::Relay(r) => match r.client().connection().await {
                Ok(_) => Ok(()),
                Err(LinkError::Refused { relay, detail }) => Err(S3Error::Relay {
                    relay,
                    what: "this agent".into(),
                    code: "RelayRefused",
                    message: detail,
                }),
                Err(LinkError::Setup(m)) => Err(S3Error::Setup(m)),
                Err(e) => Err(S3Error::Transport {
                    unsent: true,
                    op: "Connect",
                    bucket: r.client().relay().to_string(),
                    key: String::new(),
                    detail: e.to_string(),
                }),
            },
        }
    }
}

/// What a delivery keeps from the memory budget until the scheduler has committed it: the share
/// of a whole object that is sent but not yet recorded as delivered. A crash now sends those
/// bytes again, so they count against the same bound as bytes in flight (`parts_in_flight x
/// part_size`), and a slow journal disk holds back new reads instead of piling up re-sends.
pub type Unrecorded = Option<tokio::sync::OwnedSemaphorePermit>;

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
    /// The destination refuses (credentials, bucket, region, or access to this source's prefix):
    /// pause, tell the operator once.
    Destination(crate::s3::S3Error),
    /// This object can never be delivered as it is.
    Rejected(String),
    /// Another writer's object is at the key: left alone, the source kept, the operator told.
    Conflict(String),
    /// The source file disappeared before it was sent.
    Vanished(String),
    /// The source file changed under the upload; the object waits for it to settle again.
    Changed(String),
    /// Shutdown stopped it; the journal holds where it got to.
    Interrupted,
    /// The journal failed: nothing can be recorded, so the agent must stop.
    Fatal(JournalError),
}
