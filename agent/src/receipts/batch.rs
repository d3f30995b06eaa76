//! Receipt batches in the bucket: building one (pure) and the task that uploads them.
//!
//! A batch is NDJSON: a header line, then the receipts and after_upload events since the
//! previous batch, each exactly as stored in the journal.
//! ```text
//! {"batch":3,"agent":"edge-1","format":1,"prev_sha256":"<hex of batch 2's bytes>","receipts":120,"events":4}
//! {"receipt":"…","format":1,"agent":"edge-1",…}
//! {"event":"after_upload","receipt":"…",…}
//! ```
//! Key: `<prefix><agent>/<yyyy>/<mm>/<dd>/<seq, 8 digits>.ndjson` (the day the batch was first
//! recorded, UTC), written with `If-None-Match: *`.
//!
//! Must not break: the bytes of batch n are a function of what the journal recorded for it
//! (number, previous SHA-256, agent, lines), so the same batch uploaded again after a crash is
//! byte-identical; a batch is recorded before it is uploaded and confirmed after.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::hash::Sha256;
use crate::journal::{BatchRow, Journal, JournalError, ReceiptLine};
use crate::s3::{ObjectMeta, Precondition, S3Client};

/// At most this many receipts (and as many events) per batch: about 1 MB of NDJSON, so that
/// cutting a batch after a large run holds a few MB at most (10,000 took 12 MiB more RSS).
pub const MAX_LINES: usize = 1_000;

/// A batch's first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The batch number (1, 2, ...).
    pub batch: i64,
    /// The agent that wrote it.
    pub agent: String,
    /// The receipt format.
    pub format: u32,
    /// Hex SHA-256 of the previous batch's bytes (None for batch 1).
    pub prev_sha256: Option<String>,
    /// How many receipt lines follow.
    pub receipts: u64,
    /// How many event lines follow.
    pub events: u64,
}

/// A batch ready to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// Its object key.
    pub key: String,
    /// Its bytes.
    pub body: bytes::Bytes,
    /// Their SHA-256.
    pub sha256: [u8; 32],
}

/// The key of batch `seq` recorded on day `ms` (ms since the epoch).
pub fn key_for(prefix: &str, agent: &str, seq: i64, ms: i64) -> String {
    let day = crate::receipts::record::rfc3339_ms(ms);
    // "2026-12-01T..." -> 2026/12/01
    let (y, m, d) = (&day[0..4], &day[5..7], &day[8..10]);
    format!("{prefix}{agent}/{y}/{m}/{d}/{seq:08}.ndjson")
}

/// The bytes of a batch: header, then the receipts, then the events, each one line.
pub fn build(
    key: String,
    seq: i64,
    agent: &str,
    prev_sha256: Option<String>,
    lines: &[ReceiptLine],
) -> Built {
    let receipts = lines
        .iter()
        .filter(|l| matches!(l, ReceiptLine::Receipt { .. }))
        .count() as u64;
    let header = Header {
        batch: seq,
        agent: agent.to_string(),
        format: crate::receipts::record::FORMAT,
        prev_sha256,
        receipts,
        events: lines.len() as u64 - receipts,
    };
    let mut body = serde_json::to_vec(&header).unwrap_or_default();
    body.push(b'\n');
    for l in lines {
        let json = match l {
            ReceiptLine::Receipt { json, .. } | ReceiptLine::Event { json, .. } => json,
        };
        body.extend_from_slice(json.as_bytes());
        body.push(b'\n');
    }
    let sha = Sha256::digest(&body);
    Built {
        key,
        body: body.into(),
        sha256: sha,
    }
}

/// Where batches go and how often.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The key prefix (`[receipts] prefix`, e.g. `_receipts/`).
    pub prefix: String,
    /// `[agent] name`.
    pub agent: String,
    /// How often a batch is cut.
    pub every: Duration,
}

/// Uploads what is recorded but unconfirmed, then cuts and uploads new batches until nothing
/// is left. Returns how many batches it uploaded.
pub async fn flush(
    journal: &Journal,
    client: &S3Client,
    settings: &Settings,
) -> Result<usize, BatchError> {
    let mut uploaded = 0;
    loop {
        let (last, lines) = journal.unbatched(MAX_LINES).await?;
        if let Some(b) = last.as_ref().filter(|b| b.uploaded_ms.is_none()) {
            // Recorded, not confirmed (a crash or a failed upload): the same bytes again.
            let lines = journal.batch_lines(b.clone()).await?;
            let prev = previous_sha(journal, b.seq)?;
            let built = build(b.key.clone(), b.seq, &settings.agent, prev, &lines);
            if hex::encode(built.sha256) != b.sha256 {
                return Err(BatchError::Changed(b.key.clone()));
            }
            upload(client, &built).await?;
            journal
                .record_batch(BatchRow {
                    uploaded_ms: Some(crate::receipts::record::now_ms()),
                    ..b.clone()
                })
                .await?;
            uploaded += 1;
            continue;
        }
        if lines.is_empty() {
            return Ok(uploaded);
        }
        let seq = last.as_ref().map_or(1, |b| b.seq + 1);
        let key = key_for(
            &settings.prefix,
            &settings.agent,
            seq,
            crate::receipts::record::now_ms(),
        );
        let built = build(
            key,
            seq,
            &settings.agent,
            last.as_ref().map(|b| b.sha256.clone()),
            &lines,
        );
        let last_of = |want_receipt: bool| {
            lines
                .iter()
                .filter_map(|l| match (l, want_receipt) {
                    (ReceiptLine::Receipt { seq, .. }, true)
                    | (ReceiptLine::Event { seq, .. }, false) => Some(*seq),
                    _ => None,
                })
                .max()
        };
        let row = BatchRow {
            seq,
            key: built.key.clone(),
            sha256: hex::encode(built.sha256),
            last_receipt: last_of(true).unwrap_or(last.as_ref().map_or(0, |b| b.last_receipt)),
            last_event: last_of(false).unwrap_or(last.as_ref().map_or(0, |b| b.last_event)),
            lines: lines.len() as i64 + 1,
            uploaded_ms: None,
        };
        journal.record_batch(row).await?;
        // The next turn of the loop uploads it (the recorded-but-unconfirmed branch).
    }
}

/// The SHA-256 of the batch before `seq` (None for the first).
fn previous_sha(journal: &Journal, seq: i64) -> Result<Option<String>, JournalError> {
    Ok(journal
        .batches()?
        .into_iter()
        .find(|b| b.seq == seq - 1)
        .map(|b| b.sha256))
}

/// Writes a batch create-once; an object already there with the same SHA-256 (a crash after
/// the upload, before its confirmation) counts as uploaded.
async fn upload(client: &S3Client, b: &Built) -> Result<(), BatchError> {
    let body = b.body.clone();
    match client
        .put_object(
            &b.key,
            body,
            &b.sha256,
            &Precondition::Create,
            &ObjectMeta {
                content_type: Some("application/x-ndjson".into()),
                ..ObjectMeta::default()
            },
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(412) || e.code() == Some("PreconditionFailed") => {
            let head = client
                .head_object(&b.key)
                .await
                .map_err(|e| BatchError::S3(e.for_operator()))?;
            let ours = hex::encode(b.sha256);
            match head {
                Some(h) if h.meta_sha256.as_deref() == Some(ours.as_str()) => Ok(()),
                _ => Err(BatchError::Taken(b.key.clone())),
            }
        }
        Err(e) => Err(BatchError::S3(e.for_operator())),
    }
}

/// Why batches could not be uploaded.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("receipt batch upload failed: {0}")]
    S3(String),
    /// Another object is at the batch's key: the chain would fork. Nothing is overwritten.
    #[error("receipt batch {0} exists in the bucket with other content: another agent with the same name? (nothing overwritten; batches stop until this is resolved)")]
    Taken(String),
    /// The journal's receipts no longer give the recorded batch (damage or tampering).
    #[error("receipt batch {0} no longer matches the SHA-256 recorded for it: the journal's receipts changed")]
    Changed(String),
}

/// The daemon's batch task: a flush every `every`, and one last flush at a stop.
pub async fn run(
    journal: Journal,
    client: Arc<S3Client>,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(settings.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        match flush(&journal, &client, &settings).await {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(batches = n, "receipts uploaded");
                }
                last_error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                // Said once per cause, not at every tick.
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "receipts not uploaded; trying again");
                    let _ = journal.note_error(msg.clone()).await;
                }
                last_error = Some(msg);
            }
        }
        if stopping || *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(seq: i64, json: &str) -> ReceiptLine {
        ReceiptLine::Receipt {
            seq,
            json: json.into(),
            after_upload_at: None,
        }
    }

    /// The same batch built twice is the same bytes; the header counts and chains.
    #[test]
    fn batches_are_deterministic_and_chained() {
        let lines = vec![
            receipt(1, r#"{"receipt":"a"}"#),
            ReceiptLine::Event {
                seq: 1,
                json: r#"{"event":"after_upload"}"#.into(),
            },
        ];
        let a = build("k".into(), 2, "edge", Some("ff".into()), &lines);
        let b = build("k".into(), 2, "edge", Some("ff".into()), &lines);
        assert_eq!(a, b);
        let text = String::from_utf8(a.body.to_vec()).unwrap();
        let mut it = text.lines();
        let h: Header = serde_json::from_str(it.next().unwrap()).unwrap();
        assert_eq!((h.batch, h.receipts, h.events), (2, 1, 1));
        assert_eq!(h.prev_sha256.as_deref(), Some("ff"));
        assert_eq!(it.next(), Some(r#"{"receipt":"a"}"#));
        let c = build("k".into(), 2, "edge", Some("fe".into()), &lines);
        assert_ne!(c.sha256, b.sha256, "the previous hash is part of the bytes");
    }

    /// Keys sort in chain order within a day and name the day.
    #[test]
    fn keys_name_agent_day_and_number() {
        assert_eq!(
            key_for("_receipts/", "edge-1", 7, 1_700_000_000_000),
            "_receipts/edge-1/2023/11/14/00000007.ndjson"
        );
    }
}
