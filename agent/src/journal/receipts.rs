//! Receipts: written in the transaction that marks a version delivered, read by `ha-edge
//! receipts`, and gathered into the NDJSON batches that go to the bucket.
//!
//! Must not break: one receipt per delivered version (`object_id` is unique), never updated
//! (triggers of schema 6 refuse it), deleted only by retention (`prune_receipts`, which records
//! its cutoff first; the triggers refuse any other delete); a batch's lines are the receipts and
//! events after the previous batch's, in order.

use rusqlite::{params, Connection, OptionalExtension};

use super::model::{Custody, Landed};
use super::store::{Journal, JournalError};
use crate::receipts::record::{self, AfterUploadEvent, DestinationRef, Receipt, SourceRef};

/// One stored receipt or event, as `ha-edge receipts` and the batches see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptLine {
    /// A delivery's receipt (its JSON as stored) and, if any, its after_upload event's time.
    Receipt {
        seq: i64,
        json: String,
        after_upload_at: Option<String>,
    },
    /// An after_upload event (its JSON as stored).
    Event { seq: i64, json: String },
}

/// A batch uploaded (or to upload) to the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// Its number (1, 2, ...).
    pub seq: i64,
    /// Its object key.
    pub key: String,
    /// The hex SHA-256 of its bytes (the next batch carries it).
    pub sha256: String,
    /// The last receipt and event it holds.
    pub last_receipt: i64,
    pub last_event: i64,
    /// Its lines, header included.
    pub lines: i64,
    /// When the upload was confirmed (None: recorded, not yet confirmed).
    pub uploaded_ms: Option<i64>,
}

/// What `receipts` selects.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Verified at or after (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Verified before.
    pub until_ms: Option<i64>,
    /// Of this source only.
    pub source: Option<String>,
}

/// Writes the receipt of row `id`, just marked delivered at `now`.
pub(super) fn insert(
    c: &Connection,
    id: i64,
    now: i64,
    sha256: &[u8; 32],
    landed: &Landed,
    custody: &Custody,
) -> rusqlite::Result<()> {
    #[allow(clippy::type_complexity)]
    let (
        source,
        rel,
        key,
        kind,
        size,
        mtime_ns,
        inode,
        etag,
        pinned,
        ctime_ns,
        discovered,
        started,
    ): (
        String,
        Vec<u8>,
        String,
        String,
        i64,
        i64,
        i64,
        Option<String>,
        Option<String>,
        Option<i64>,
        i64,
        Option<i64>,
    ) = c.query_row(
        "SELECT source, rel_path, key, kind, size, mtime_ns, inode, etag, pinned_etag, ctime_ns,
                discovered_ms, started_ms
           FROM objects WHERE id = ?1",
        [id],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
                r.get(11)?,
            ))
        },
    )?;
    let path = String::from_utf8_lossy(&rel).into_owned();
    let file = kind == "file";
    let source_ref = SourceRef {
        name: source.clone(),
        kind,
        // Pseudonymised keys or `log_paths = "keys"`: the path stays in the journal's own row
        // (`ha-edge receipts` shows it on the box); the receipt, and so its batch, omits it.
        path: (file && !custody.withhold_path).then(|| path.clone()),
        bucket: if file {
            None
        } else {
            custody.source_bucket.clone()
        },
        key: (!file && !custody.withhold_path).then(|| format!("{}{path}", custody.source_prefix)),
        etag: etag.or(pinned),
        size: size.max(0).unsigned_abs(),
        mtime_ns: file.then_some(mtime_ns),
        inode: file.then_some(inode.max(0).unsigned_abs()),
        ctime_ns: if file {
            ctime_ns.or(landed.source_ctime_ns)
        } else {
            None
        },
        last_modified: (!file && mtime_ns > 0).then(|| record::rfc3339_ms(mtime_ns / 1_000_000)),
    };
    let receipt = Receipt {
        receipt: record::new_id(),
        format: record::FORMAT,
        agent: custody.agent.clone(),
        ha_edge: env!("CARGO_PKG_VERSION").to_string(),
        source: source_ref,
        sha256: hex::encode(sha256),
        destination: DestinationRef {
            endpoint: custody.endpoint.clone(),
            bucket: custody.bucket.clone(),
            key,
            etag: landed.etag.clone(),
            version_id: landed.version.clone(),
            checksum: landed.checksum.clone(),
            sse: landed.sse.clone(),
            kms_key_id: landed.kms_key_id.clone(),
            sse_confirmed: landed.sse_confirmed,
        },
        discovered_at: record::rfc3339_ms(discovered),
        upload_started_at: started.or(custody.started_ms).map(record::rfc3339_ms),
        verified_at: record::rfc3339_ms(now),
        after_upload: custody.after_upload.to_string(),
    };
    let json = serde_json::to_string(&receipt)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    c.execute(
        "INSERT INTO receipts (object_id, source, at_ms, receipt) VALUES (?1, ?2, ?3, ?4)",
        params![id, source, now, json],
    )?;
    Ok(())
}

/// Appends the after_upload event of row `id`'s receipt (none if it has no receipt: a delivery
/// recorded before schema 6).
pub(super) fn insert_after_upload(
    c: &Connection,
    id: i64,
    now: i64,
    action: &str,
    result: &str,
) -> rusqlite::Result<()> {
    let found: Option<(i64, String)> = c
        .query_row(
            "SELECT seq, receipt FROM receipts WHERE object_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((seq, json)) = found else {
        return Ok(());
    };
    let receipt_id = serde_json::from_str::<Receipt>(&json)
        .map(|r| r.receipt)
        .unwrap_or_default();
    let event = AfterUploadEvent {
        event: "after_upload".into(),
        receipt: receipt_id,
        action: action.to_string(),
        result: result.to_string(),
        at: record::rfc3339_ms(now),
    };
    let json = serde_json::to_string(&event)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    c.execute(
        "INSERT INTO receipt_events (receipt_seq, at_ms, event) VALUES (?1, ?2, ?3)",
        params![seq, now, json],
    )?;
    Ok(())
}

impl Journal {
    /// Calls `each` for every receipt that `filter` selects, in order (read-only; safe while
    /// the daemon runs). Stops at the first error `each` returns.
    pub fn for_each_receipt(
        &self,
        filter: Filter,
        mut each: impl FnMut(ReceiptLine) -> std::io::Result<()> + Send + 'static,
    ) -> Result<std::io::Result<()>, JournalError> {
        self.with(move |c| {
            let mut stmt = c.prepare(
                "SELECT r.seq, r.receipt,
                        (SELECT e.event FROM receipt_events e WHERE e.receipt_seq = r.seq
                          ORDER BY e.seq DESC LIMIT 1),
                        (SELECT o.rel_path FROM objects o WHERE o.id = r.object_id)
                   FROM receipts r
                  WHERE (?1 IS NULL OR r.at_ms >= ?1) AND (?2 IS NULL OR r.at_ms < ?2)
                    AND (?3 IS NULL OR r.source = ?3)
                  ORDER BY r.seq",
            )?;
            let mut rows = stmt.query(params![filter.since_ms, filter.until_ms, filter.source])?;
            while let Some(r) = rows.next()? {
                let event: Option<String> = r.get(2)?;
                let after_upload_at = event
                    .and_then(|e| serde_json::from_str::<AfterUploadEvent>(&e).ok())
                    .map(|e| e.at);
                let rel: Option<Vec<u8>> = r.get(3)?;
                let line = ReceiptLine::Receipt {
                    seq: r.get(0)?,
                    json: with_local_path(r.get(1)?, rel.as_deref()),
                    after_upload_at,
                };
                if let Err(e) = each(line) {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(()))
        })
    }

    /// The receipts and events after the last batch (at most `limit` of each), in order, and
    /// the last batch (None before the first).
    pub async fn unbatched(
        &self,
        limit: usize,
    ) -> Result<(Option<BatchRow>, Vec<ReceiptLine>), JournalError> {
        self.call(move |c| {
            let last = last_batch(c)?;
            let (after_r, after_e) = last
                .as_ref()
                .map_or((0, 0), |b| (b.last_receipt, b.last_event));
            let lines = lines_after(c, (after_r, i64::MAX), (after_e, i64::MAX), limit)?;
            Ok((last, lines))
        })
        .await
    }

    /// Records a batch before it is uploaded (so its number and content are fixed: a crash
    /// uploads the same bytes again), or confirms its upload.
    pub async fn record_batch(&self, batch: BatchRow) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO receipt_batches (seq, key, sha256, last_receipt, last_event, lines,
                                              uploaded_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (seq) DO UPDATE SET uploaded_ms = excluded.uploaded_ms",
                params![
                    batch.seq,
                    batch.key,
                    batch.sha256,
                    batch.last_receipt,
                    batch.last_event,
                    batch.lines,
                    batch.uploaded_ms
                ],
            )
            .map(drop)
        })
        .await
    }

    /// Every batch recorded, in order.
    pub fn batches(&self) -> Result<Vec<BatchRow>, JournalError> {
        self.with(|c| {
            let mut q = c.prepare(
                "SELECT seq, key, sha256, last_receipt, last_event, lines, uploaded_ms
                   FROM receipt_batches ORDER BY seq",
            )?;
            let rows = q.query_map([], batch_row)?;
            rows.collect()
        })
    }

    /// The receipts and events a recorded batch holds (to upload it again after a crash).
    pub async fn batch_lines(&self, batch: BatchRow) -> Result<Vec<ReceiptLine>, JournalError> {
        self.call(move |c| {
            let (after_r, after_e): (i64, i64) = c
                .query_row(
                    "SELECT last_receipt, last_event FROM receipt_batches WHERE seq = ?1",
                    [batch.seq - 1],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .unwrap_or((0, 0));
            let lines = lines_after(
                c,
                (after_r, batch.last_receipt),
                (after_e, batch.last_event),
                usize::MAX,
            )?;
            Ok(lines)
        })
        .await
    }

    /// Retention: deletes receipts and events older than `cutoff_ms` (and only those: the
    /// cutoff is recorded first, and the schema's triggers refuse to delete anything newer).
    /// With `keep_unbatched` (receipts go to the bucket), receipts not yet in a confirmed batch
    /// are kept whatever their age. Returns how many receipts went.
    pub async fn prune_receipts(
        &self,
        cutoff_ms: i64,
        keep_unbatched: bool,
    ) -> Result<usize, JournalError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO agent_state (name, value) VALUES ('receipts_cutoff_ms', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                [cutoff_ms.to_string()],
            )?;
            let batched: i64 = c.query_row(
                "SELECT COALESCE(MAX(last_receipt), -1) FROM receipt_batches
                  WHERE uploaded_ms IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            let keep_after = if keep_unbatched { batched } else { i64::MAX };
            c.execute(
                "DELETE FROM receipt_events WHERE at_ms < ?1
                   AND receipt_seq IN (SELECT seq FROM receipts WHERE at_ms < ?1 AND seq <= ?2)",
                params![cutoff_ms, keep_after],
            )?;
            c.execute(
                "DELETE FROM receipts WHERE at_ms < ?1 AND seq <= ?2",
                params![cutoff_ms, keep_after],
            )
        })
        .await
    }
}

/// The receipts with seq in `(receipts.0, receipts.1]` and the events in `(events.0,
/// events.1]`, at most `limit` of each, receipts first, each in order.
fn lines_after(
    c: &Connection,
    receipts: (i64, i64),
    events: (i64, i64),
    limit: usize,
) -> rusqlite::Result<Vec<ReceiptLine>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut lines = Vec::new();
    let mut q = c.prepare_cached(
        "SELECT seq, receipt FROM receipts WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
    )?;
    for r in q.query_map(params![receipts.0, receipts.1, limit], |r| {
        Ok(ReceiptLine::Receipt {
            seq: r.get(0)?,
            json: r.get(1)?,
            after_upload_at: None,
        })
    })? {
        lines.push(r?);
    }
    let mut q = c.prepare_cached(
        "SELECT seq, event FROM receipt_events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
    )?;
    for r in q.query_map(params![events.0, events.1, limit], |r| {
        Ok(ReceiptLine::Event {
            seq: r.get(0)?,
            json: r.get(1)?,
        })
    })? {
        lines.push(r?);
    }
    Ok(lines)
}

/// The newest batch, if any.
/// A receipt as shown on the box: a path withheld from the receipt (and its batch) is filled
/// in from the journal's own row.
fn with_local_path(json: String, rel: Option<&[u8]>) -> String {
    let Some(rel) = rel else { return json };
    let Ok(mut r) = serde_json::from_str::<crate::receipts::record::Receipt>(&json) else {
        return json;
    };
    let path = String::from_utf8_lossy(rel).into_owned();
    match r.source.kind.as_str() {
        "file" if r.source.path.is_none() => r.source.path = Some(path),
        "object" if r.source.key.is_none() => r.source.key = Some(path),
        _ => return json,
    }
    serde_json::to_string(&r).unwrap_or(json)
}

fn last_batch(c: &Connection) -> rusqlite::Result<Option<BatchRow>> {
    c.query_row(
        "SELECT seq, key, sha256, last_receipt, last_event, lines, uploaded_ms
           FROM receipt_batches ORDER BY seq DESC LIMIT 1",
        [],
        batch_row,
    )
    .optional()
}

/// A row of `receipt_batches`.
fn batch_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchRow> {
    Ok(BatchRow {
        seq: r.get(0)?,
        key: r.get(1)?,
        sha256: r.get(2)?,
        last_receipt: r.get(3)?,
        last_event: r.get(4)?,
        lines: r.get(5)?,
        uploaded_ms: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Candidate, Journal, Landed};
    use crate::version::Version;

    /// Retention removes receipts older than its cutoff and nothing newer; with batches to the
    /// bucket, only those already in a confirmed batch. Nothing else may delete a receipt.
    #[tokio::test]
    async fn retention_removes_only_what_is_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        for (i, p) in ["a", "b"].iter().enumerate() {
            let v = Version::File {
                size: 1,
                mtime_ns: 1,
                inode: i as u64,
            };
            let cand = Candidate {
                rel_path: p.into(),
                key: (*p).to_string(),
                version: v.clone(),
            };
            j.offer("s".into(), vec![cand], true).await.unwrap();
            let id = j.runnable(1, None, true, vec![]).await.unwrap()[0].id;
            let ok = j
                .delivered(id, v, [1; 32], Landed::default(), Custody::default(), true)
                .await
                .unwrap();
            assert!(ok);
        }
        let count = |j: &Journal| {
            j.with(|c| c.query_row("SELECT COUNT(*) FROM receipts", [], |r| r.get::<_, i64>(0)))
                .unwrap()
        };
        assert_eq!(count(&j), 2);
        // Outside retention, a delete is refused.
        let refused = j.with(|c| c.execute("DELETE FROM receipts", []));
        assert!(refused.is_err());
        // A cutoff before both: nothing goes. Batches expected but none confirmed: nothing.
        assert_eq!(j.prune_receipts(0, false).await.unwrap(), 0);
        assert_eq!(j.prune_receipts(i64::MAX, true).await.unwrap(), 0);
        assert_eq!(count(&j), 2);
        // Past both, no batches expected: both go.
        assert_eq!(j.prune_receipts(i64::MAX, false).await.unwrap(), 2);
        assert_eq!(count(&j), 0);
    }
}
