//! One receipt: what left the building, from where, with which bytes, to where, and when. Built
//! inside the journal transaction that marks the version delivered (`journal/receipts.rs`) and
//! stored as one line of JSON, exactly as later printed and uploaded.
//!
//! Must not break: the field names (they are an interface: auditors' scripts read them); a
//! receipt's JSON once written is never rewritten.

use serde::{Deserialize, Serialize};

/// The version of the receipt format, in every receipt (`"format"`).
pub const FORMAT: u32 = 1;

/// A delivered object version's receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// A random 128-bit id (hex), unique across agents.
    pub receipt: String,
    /// The receipt format (`FORMAT`).
    pub format: u32,
    /// `[agent] name` (default: the host name).
    pub agent: String,
    /// The ha-edge version that delivered it.
    pub ha_edge: String,
    /// Where it came from.
    pub source: SourceRef,
    /// Hex SHA-256 of the bytes sent (and verified in the bucket).
    pub sha256: String,
    /// Where it is now.
    pub destination: DestinationRef,
    /// When ha-edge first saw this version (RFC 3339, UTC).
    pub discovered_at: String,
    /// When its upload began (none if it was already in the bucket).
    pub upload_started_at: Option<String>,
    /// When the stored object was verified and the delivery committed.
    pub verified_at: String,
    /// What was to happen to the source afterwards: `keep`, `delete` or `move`. Its time, for
    /// `delete` and `move`, is an `after_upload` event (the receipt itself is never updated).
    pub after_upload: String,
}

/// The source version delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    /// The source's name in the config.
    pub name: String,
    /// `file` or `object`.
    pub kind: String,
    /// Files: the path relative to the source root.
    pub path: Option<String>,
    /// Objects: the source bucket and key.
    pub bucket: Option<String>,
    /// Objects: the key in the source bucket.
    pub key: Option<String>,
    /// Objects: the source ETag (as listed, or pinned by the transfer).
    pub etag: Option<String>,
    /// The size in bytes.
    pub size: u64,
    /// Files: mtime in nanoseconds since the epoch.
    pub mtime_ns: Option<i64>,
    /// Files: the inode.
    pub inode: Option<u64>,
    /// Files: ctime in nanoseconds since the epoch, when it was read.
    pub ctime_ns: Option<i64>,
    /// Objects: LastModified (RFC 3339).
    pub last_modified: Option<String>,
}

/// The destination object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRef {
    /// The endpoint's host[:port] (S3) or the relay's address (`quic://host:port`).
    pub endpoint: String,
    /// The bucket (empty where the relay does not say).
    pub bucket: String,
    /// The object key.
    pub key: String,
    /// The ETag the server answered.
    pub etag: Option<String>,
    /// The VersionId, where the bucket is versioned.
    pub version_id: Option<String>,
    /// The checksum the server reported for what it stored (`sha256:<base64>`, whole or
    /// composite `-N`).
    pub checksum: Option<String>,
    /// Server-side encryption: `AES256`, `aws:kms`, or none.
    pub sse: Option<String>,
    /// The KMS key id, for `aws:kms`.
    pub kms_key_id: Option<String>,
    /// Whether the server confirmed the encryption in its answer (false: as requested).
    pub sse_confirmed: bool,
}

/// An event appended after a receipt: its source was deleted or moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterUploadEvent {
    /// Always `after_upload`.
    pub event: String,
    /// The receipt it belongs to.
    pub receipt: String,
    /// `delete` or `move`.
    pub action: String,
    /// What happened: `deleted`, `moved`, `gone` (already), `left changed`.
    pub result: String,
    /// When (RFC 3339, UTC).
    pub at: String,
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0).unsigned_abs());
    humantime::format_rfc3339_millis(t).to_string()
}

/// This machine's wall clock in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new random receipt id (128 bits, hex).
pub fn new_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// The CSV header of `receipts --format csv`.
pub const CSV_HEADER: &[&str] = &[
    "receipt",
    "agent",
    "ha_edge",
    "source",
    "source_kind",
    "source_path",
    "source_bucket",
    "source_key",
    "source_etag",
    "size",
    "mtime_ns",
    "inode",
    "ctime_ns",
    "sha256",
    "endpoint",
    "bucket",
    "key",
    "etag",
    "version_id",
    "checksum",
    "sse",
    "kms_key_id",
    "discovered_at",
    "upload_started_at",
    "verified_at",
    "after_upload",
    "after_upload_at",
];

impl Receipt {
    /// The CSV fields, in `CSV_HEADER`'s order; `after_at` from the receipt's event, if any.
    pub fn csv_fields(&self, after_at: Option<&str>) -> Vec<String> {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        let n = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_default();
        let s = &self.source;
        let d = &self.destination;
        let after_at = match (self.after_upload.as_str(), after_at) {
            (_, Some(t)) => t.to_string(),
            ("keep", None) => self.verified_at.clone(),
            _ => String::new(),
        };
        vec![
            self.receipt.clone(),
            self.agent.clone(),
            self.ha_edge.clone(),
            s.name.clone(),
            s.kind.clone(),
            o(&s.path),
            o(&s.bucket),
            o(&s.key),
            o(&s.etag),
            s.size.to_string(),
            n(s.mtime_ns),
            s.inode.map(|i| i.to_string()).unwrap_or_default(),
            n(s.ctime_ns),
            self.sha256.clone(),
            d.endpoint.clone(),
            d.bucket.clone(),
            d.key.clone(),
            o(&d.etag),
            o(&d.version_id),
            o(&d.checksum),
            o(&d.sse),
            o(&d.kms_key_id),
            self.discovered_at.clone(),
            o(&self.upload_started_at),
            self.verified_at.clone(),
            self.after_upload.clone(),
            after_at,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times are UTC with milliseconds.
    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
