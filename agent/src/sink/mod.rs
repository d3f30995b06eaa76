//! Delivery: where objects go. Each delivery ends in one `Outcome`, and the scheduler alone turns
//! outcomes into journal states and retry decisions.

pub mod s3;

use crate::journal::JournalError;

#[derive(Debug)]
pub enum Outcome {
    /// In the bucket and verified (size and SHA-256); carries that SHA-256.
    Delivered([u8; 32]),
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
    /// The source file disappeared before it was sent.
    Vanished(String),
    /// The source file changed under the upload; the object waits for it to settle again.
    Changed(String),
    /// Shutdown stopped it; the journal holds where it got to.
    Interrupted,
    /// The journal failed: nothing can be recorded, so the agent must stop.
    Fatal(JournalError),
}
