//! Every query of the daemon's journal, one method each; each runs in the writer's group
//! transaction (see `worker.rs`). State names in SQL come from `State` (see `model.rs`): no
//! query spells a state by hand.
//!
//! Must not break: each method states the rows it may change and in which state; a transition
//! that guards on the row's version (`set_hashed`, `delivered`) writes nothing when the
//! source changed meanwhile.

use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::LazyLock;

use rusqlite::{named_params, params, Connection, OptionalExtension};

use super::model::{
    offer_action, states_sql, Custody, Landed, ObjectRow, OfferAction, PartRow, State, Version,
    VersionColumns,
};
use super::store::{path_bytes, Candidate, Hashed, Journal, JournalError, OfferStats};

/// Objects with work to do, higher priority first and oldest first within one priority, from
/// a cursor (the last row's priority and id); served by the partial index `objects_active`
/// (schema 6), so each call reads only the rows it returns, without a sort.
static RUNNABLE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT id, source, rel_path, key, size, mtime_ns, inode, state, sha256,
        upload_id, part_size, attempts, pinned_etag,
        (SELECT p.dest_etag FROM objects p WHERE p.key = objects.key AND p.id < objects.id
            AND p.dest_etag IS NOT NULL ORDER BY p.id DESC LIMIT 1),
        ctime_ns, part_hashes, kind, etag, priority, flag, upload_checksum, crc64nvme
    FROM objects
    WHERE state IN ({})
      AND next_attempt_ms <= ?1
      AND (?2 IS NULL OR priority < ?2 OR (priority = ?2 AND id > ?3))
    ORDER BY priority DESC, id LIMIT ?4",
        states_sql(&State::ACTIVE)
    )
});
/// The earliest retry time still ahead (partial index `objects_backoff`).
static WAKEUP_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT MIN(next_attempt_ms) FROM objects WHERE state IN ({}) AND next_attempt_ms > ?1",
        states_sql(&State::ACTIVE)
    )
});
/// Paths held back by their newest row (rejected, conflict).
static HELD_PATHS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT rel_path FROM refused WHERE source = ?1
         UNION
         SELECT o.rel_path FROM objects o
          WHERE o.source = ?1 AND o.state IN ({})
            AND o.id = (SELECT MAX(n.id) FROM objects n
                         WHERE n.source = o.source AND n.rel_path = o.rel_path)",
        states_sql(&State::HELD)
    )
});
/// Held rows of a path whose file is gone become vanished.
static RELEASE_HELD_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE objects SET state = ?4, updated_ms = ?3,
                last_error = 'the source file is gone; no longer held'
          WHERE source = ?1 AND rel_path = ?2 AND state IN ({})",
        states_sql(&State::HELD)
    )
});

/// A guard: the row is still about the version in the named parameters `:kind`, `:size`,
/// `:mtime`, `:inode` and `:etag`.
const VERSION_IS: &str = "kind = :kind AND size = :size AND mtime_ns = :mtime AND inode = :inode
    AND etag IS :etag";

/// Errors kept in the `errors` table for `status`.
const ERRORS_KEPT: i64 = 1000;

impl Journal {
    /// Records settled files of one source; one transaction for the whole batch.
    pub async fn offer(
        &self,
        source: String,
        batch: Vec<Candidate>,
        reupload_changed: bool,
    ) -> Result<OfferStats, JournalError> {
        self.call_at(move |c, now| offer_in(c, now, &source, &batch, reupload_changed))
            .await
            .inspect(|stats| self.offered(stats))
    }

    /// Counts an offer that changed something (the dispatcher fetches again).
    pub(super) fn offered(&self, stats: &OfferStats) {
        if stats.inserted + stats.refreshed > 0 {
            self.offers
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// For each relative path of `source`: whether its newest journal row is delivered (or done).
    pub async fn delivered_among(
        &self,
        source: String,
        rels: Vec<PathBuf>,
    ) -> Result<Vec<bool>, JournalError> {
        Ok(self
            .latest_states(source, rels)
            .await?
            .into_iter()
            .map(|st| st.is_some_and(|st| State::LANDED.contains(&st)))
            .collect())
    }

    /// The newest row's state of each path of `source` (None: never seen).
    pub async fn latest_states(
        &self,
        source: String,
        rels: Vec<PathBuf>,
    ) -> Result<Vec<Option<State>>, JournalError> {
        self.call(move |c| {
            let mut q = c.prepare_cached(
                "SELECT state FROM objects WHERE source = ?1 AND rel_path = ?2
                 ORDER BY id DESC LIMIT 1",
            )?;
            rels.iter()
                .map(|r| {
                    q.query_row(params![source, path_bytes(r)], |row| row.get(0))
                        .optional()
                })
                .collect()
        })
        .await
    }

    /// Objects with work to do, higher priority first, oldest first within one priority.
    /// `after` (the priority and id of the last row seen) lets a one-shot run page through the
    /// objects; `respect_backoff` makes the daemon wait out each object's retry delay; `skip`
    /// are ids already in flight.
    pub async fn runnable(
        &self,
        limit: usize,
        after: Option<(i64, i64)>,
        respect_backoff: bool,
        skip: Vec<i64>,
    ) -> Result<Vec<ObjectRow>, JournalError> {
        self.call_at(move |c, now| {
            let not_before = if respect_backoff { now } else { i64::MAX };
            let mut stmt = c.prepare_cached(&RUNNABLE_SQL)?;
            let rows = stmt
                .query_map(
                    params![
                        not_before,
                        after.map(|a| a.0),
                        after.map_or(0, |a| a.1),
                        (limit + skip.len()) as i64
                    ],
                    row_to_object,
                )?
                .filter(|r| r.as_ref().map_or(true, |o| !skip.contains(&o.id)))
                .take(limit)
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Milliseconds until the earliest backed-off object becomes runnable, if any. Objects
    /// runnable already are not counted: they are dispatched as soon as a slot frees.
    pub async fn next_wakeup_ms(&self) -> Result<Option<i64>, JournalError> {
        self.call_at(move |c, now| {
            c.query_row(&WAKEUP_SQL, [now], |r| r.get::<_, Option<i64>>(0))
                .map(|m| m.map(|t| (t - now).max(0)))
        })
        .await
    }

    /// Fixes the whole-object hash and the version it was computed from, and marks the row
    /// `uploading` without an upload id: from here on an upload may exist on the server that the
    /// journal does not know yet (CreateMultipartUpload sent, answer not recorded), and recovery
    /// looks for it. Returns false if the row changed meanwhile (a rescan saw a newer version),
    /// in which case nothing is written. `pinned_etag` is the ETag every later read of a bucket
    /// object listed without one is pinned to.
    pub async fn set_hashed(
        &self,
        id: i64,
        version: Version,
        hashed: Hashed,
        pinned_etag: Option<String>,
    ) -> Result<bool, JournalError> {
        self.call_at(move |c, now| {
            let parts: Vec<u8> = hashed.parts.concat();
            let v = VersionColumns::of(&version);
            let n = c.execute(
                &format!(
                    "UPDATE objects SET sha256 = :sha, state = :uploading, upload_id = NULL,
                            updated_ms = :now, pinned_etag = COALESCE(:pin, pinned_etag),
                            ctime_ns = :ctime, part_hashes = :parts,
                            started_ms = COALESCE(started_ms, :now)
                     WHERE id = :id AND state = :pending AND {VERSION_IS}"
                ),
                named_params! {
                    ":id": id,
                    ":sha": &hashed.sha256[..],
                    ":now": now,
                    ":pin": pinned_etag,
                    ":ctime": hashed.ctime_ns,
                    ":parts": parts,
                    ":pending": State::Pending,
                    ":uploading": State::Uploading,
                    ":kind": v.kind,
                    ":size": v.size,
                    ":mtime": v.mtime_ns,
                    ":inode": v.inode,
                    ":etag": v.etag,
                },
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Records the multipart upload of an `uploading` row (with its part size) before the first
    /// part is sent.
    pub async fn begin_multipart(
        &self,
        id: i64,
        upload_id: String,
        part_size: u64,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET state = ?5, upload_id = ?2, part_size = ?3, updated_ms = ?4
                 WHERE id = ?1",
                params![id, upload_id, part_size as i64, now, State::Uploading],
            )
            .map(drop)
        })
        .await
    }

    /// A streamed upload begins (no hash pass: see `ObjectRow::streamed`): the version (and a
    /// file's ctime, an object's pinned ETag) is fixed before any byte is sent, the SHA-256
    /// only once every byte was read (`set_streamed_hash`). Returns false, writing nothing, if
    /// the row is no longer pending for that version.
    pub async fn start_streamed(
        &self,
        id: i64,
        version: Version,
        ctime_ns: Option<i64>,
        pinned_etag: Option<String>,
    ) -> Result<bool, JournalError> {
        self.call_at(move |c, now| {
            let v = VersionColumns::of(&version);
            let n = c.execute(
                &format!(
                    "UPDATE objects SET sha256 = NULL, crc64nvme = NULL, state = :uploading,
                            upload_id = NULL, updated_ms = :now,
                            pinned_etag = COALESCE(:pin, pinned_etag), ctime_ns = :ctime,
                            part_hashes = NULL, upload_checksum = :streamed,
                            started_ms = COALESCE(started_ms, :now)
                     WHERE id = :id AND state = :pending AND {VERSION_IS}"
                ),
                named_params! {
                    ":id": id,
                    ":now": now,
                    ":pin": pinned_etag,
                    ":ctime": ctime_ns,
                    ":streamed": STREAMED,
                    ":pending": State::Pending,
                    ":uploading": State::Uploading,
                    ":kind": v.kind,
                    ":size": v.size,
                    ":mtime": v.mtime_ns,
                    ":inode": v.inode,
                    ":etag": v.etag,
                },
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// A streamed upload has read every byte: its SHA-256 and CRC-64/NVME, fixed before
    /// completion is asked for.
    pub async fn set_streamed_hash(
        &self,
        id: i64,
        sha256: [u8; 32],
        crc64nvme: u64,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET sha256 = ?2, crc64nvme = ?3, updated_ms = ?4 WHERE id = ?1",
                params![id, &sha256[..], crate::hash::Crc64Nvme::b64(crc64nvme), now],
            )
            .map(drop)
        })
        .await
    }

    /// Conflicts are looked at again once per start: the operator may have moved the other
    /// object away (or set overwrite = "always"). Returns how many go back to pending.
    pub async fn requeue_conflicts(&self) -> Result<usize, JournalError> {
        self.call(|c| {
            c.execute(
                "UPDATE objects SET state = ?1, next_attempt_ms = 0, sha256 = NULL,
                        upload_id = NULL, part_size = NULL, ctime_ns = NULL, part_hashes = NULL,
                        upload_checksum = NULL, crc64nvme = NULL
                 WHERE state = ?2
                   AND id = (SELECT MAX(n.id) FROM objects n
                              WHERE n.source = objects.source AND n.rel_path = objects.rel_path)",
                params![State::Pending, State::Conflict],
            )
        })
        .await
    }

    /// The multipart upload recorded for an object, if any.
    pub async fn upload_id(&self, id: i64) -> Result<Option<String>, JournalError> {
        self.call(move |c| {
            c.query_row("SELECT upload_id FROM objects WHERE id = ?1", [id], |r| {
                r.get::<_, Option<String>>(0)
            })
            .optional()
            .map(Option::flatten)
        })
        .await
    }

    /// Records a part the server acknowledged; a crash after this never sends it again.
    pub async fn record_part(&self, id: i64, part: PartRow) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO parts
                        (object_id, part_number, size, sha256_b64, etag, crc64nvme_b64)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    part.number,
                    part.size as i64,
                    // '' for a part sent unsigned, without its SHA-256 (the column is NOT NULL).
                    part.sha256_b64.as_deref().unwrap_or_default(),
                    part.etag,
                    part.crc64nvme_b64
                ],
            )
            .map(drop)
        })
        .await
    }

    /// The parts recorded for an object, in order.
    pub async fn parts(&self, id: i64) -> Result<Vec<PartRow>, JournalError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT part_number, size, sha256_b64, etag, crc64nvme_b64 FROM parts
                 WHERE object_id = ?1 ORDER BY part_number",
            )?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok(PartRow {
                        number: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        sha256_b64: Some(r.get::<_, String>(2)?).filter(|s| !s.is_empty()),
                        etag: r.get(3)?,
                        crc64nvme_b64: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Forgets parts the server no longer has.
    pub async fn drop_parts(&self, id: i64, numbers: Vec<u32>) -> Result<(), JournalError> {
        self.call(move |c| {
            for n in &numbers {
                c.execute(
                    "DELETE FROM parts WHERE object_id = ?1 AND part_number = ?2",
                    params![id, n],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Moves a row to `state` (completing before CompleteMultipartUpload; done after
    /// after_upload).
    pub async fn set_state(&self, id: i64, state: State) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, state, now],
            )
            .map(drop)
        })
        .await
    }

    /// Starts an object over: pending, no hash, no upload, no parts; optionally a new version.
    /// An ETag the transfer pinned itself to is forgotten (one the listing gave is part of the
    /// version, and stays).
    pub async fn reset(
        &self,
        id: i64,
        version: Option<Version>,
        why: String,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute("DELETE FROM parts WHERE object_id = ?1", [id])?;
            c.execute(
                "UPDATE objects SET state = ?4, sha256 = NULL, upload_id = NULL,
                        part_size = NULL, last_error = ?2, updated_ms = ?3, ctime_ns = NULL,
                        part_hashes = NULL, pinned_etag = NULL, upload_checksum = NULL,
                        crc64nvme = NULL
                 WHERE id = ?1",
                params![id, why, now, State::Pending],
            )?;
            if let Some(v) = &version {
                let v = VersionColumns::of(v);
                c.execute(
                    "UPDATE objects SET kind = ?2, size = ?3, mtime_ns = ?4, inode = ?5, etag = ?6
                     WHERE id = ?1",
                    params![id, v.kind, v.size, v.mtime_ns, v.inode, v.etag],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The object is in the bucket and verified. With `finished`, nothing is left to do
    /// (after_upload = keep); otherwise the after_upload action is still owed. Returns false,
    /// writing nothing, if the row is no longer about `version` (a rescan saw a newer version
    /// of the file while this one was being sent).
    pub async fn delivered(
        &self,
        id: i64,
        version: Version,
        sha256: [u8; 32],
        landed: Landed,
        custody: Custody,
        finished: bool,
    ) -> Result<bool, JournalError> {
        self.call_at(move |c, now| {
            let state = if finished {
                State::Done
            } else {
                State::Delivered
            };
            let v = VersionColumns::of(&version);
            let n = c.execute(
                &format!(
                    "UPDATE objects SET state = :state, delivered_ms = :now, updated_ms = :now,
                            last_error = NULL, next_attempt_ms = 0, sha256 = :sha,
                            dest_etag = :dest_etag, dest_version = :dest_version,
                            part_hashes = NULL
                     WHERE id = :id AND {VERSION_IS}"
                ),
                named_params! {
                    ":id": id,
                    ":state": state,
                    ":now": now,
                    ":sha": &sha256[..],
                    ":dest_etag": landed.etag,
                    ":dest_version": landed.version,
                    ":kind": v.kind,
                    ":size": v.size,
                    ":mtime": v.mtime_ns,
                    ":inode": v.inode,
                    ":etag": v.etag,
                },
            )?;
            if n == 1 {
                c.execute("DELETE FROM parts WHERE object_id = ?1", [id])?;
                super::receipts::insert(c, id, now, &sha256, &landed, &custody)?;
            }
            Ok(n == 1)
        })
        .await
    }

    /// Sets the source priority of every row of `source` still to be dispatched, and of the
    /// rows it offers from now on (kept in `agent_state` as `priority:<source>`).
    pub async fn set_priorities(&self, priorities: Vec<(String, i64)>) -> Result<(), JournalError> {
        self.call(move |c| {
            for (source, priority) in &priorities {
                c.execute(
                    "INSERT INTO agent_state (name, value) VALUES ('priority:' || ?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    params![source, priority.to_string()],
                )?;
                c.execute(
                    &format!(
                        "UPDATE objects SET priority = ?2
                          WHERE source = ?1 AND priority != ?2 AND state IN ({})",
                        states_sql(&State::ACTIVE)
                    ),
                    params![source, priority],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// A delivered object's after_upload action is done: the row is finished, and its receipt
    /// gets an event saying what happened to the source and when.
    pub async fn after_upload_done(
        &self,
        id: i64,
        action: &'static str,
        result: String,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, State::Done, now],
            )?;
            super::receipts::insert_after_upload(c, id, now, action, &result)
        })
        .await
    }

    /// Ends an object with a terminal state (rejected, vanished) and records why.
    pub async fn finish_with_error(
        &self,
        id: i64,
        state: State,
        message: String,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET state = ?2, last_error = ?3, updated_ms = ?4 WHERE id = ?1",
                params![id, state, message, now],
            )?;
            c.execute("DELETE FROM parts WHERE object_id = ?1", [id])?;
            insert_error(c, now, Some(id), &message)?;
            Ok(())
        })
        .await
    }

    /// Records the check a row failed before it is sent flagged (`on_invalid =
    /// "upload-flagged"`), or clears it when the version passes.
    pub async fn set_flag(&self, id: i64, flag: Option<String>) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET flag = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, flag, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Puts an object back to be tried again no earlier than `delay_ms` from now.
    pub async fn retry_later(
        &self,
        id: i64,
        delay_ms: i64,
        count_attempt: bool,
        message: String,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE objects SET attempts = attempts + ?2, next_attempt_ms = ?3, last_error = ?4,
                        updated_ms = ?5
                 WHERE id = ?1",
                params![id, count_attempt as i64, now + delay_ms, message, now],
            )?;
            if count_attempt {
                insert_error(c, now, Some(id), &message)?;
            }
            Ok(())
        })
        .await
    }

    /// Records paths of `source` that discovery refuses (name, type), with why; a path offered
    /// later is taken off the list by `offer`.
    pub async fn note_refused(
        &self,
        source: String,
        refused: Vec<(PathBuf, String)>,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            let mut q = c.prepare_cached(
                "INSERT INTO refused (source, rel_path, reason, at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, rel_path) DO UPDATE SET reason = excluded.reason",
            )?;
            for (rel, why) in &refused {
                q.execute(params![source, path_bytes(rel), why, now])?;
            }
            Ok(())
        })
        .await
    }

    /// The relative paths of `source` held back: refused at discovery, or whose newest row is
    /// rejected or in conflict (few: each is an operator's matter).
    pub async fn held_paths(&self, source: String) -> Result<Vec<PathBuf>, JournalError> {
        self.call(move |c| {
            let mut q = c.prepare_cached(&HELD_PATHS_SQL)?;
            let rows = q.query_map([&source], |r| r.get::<_, Vec<u8>>(0))?;
            rows.map(|r| r.map(|b| PathBuf::from(std::ffi::OsString::from_vec(b))))
                .collect()
        })
        .await
    }

    /// Held paths whose file is gone: no longer held (a refusal is forgotten, a rejected or
    /// conflicting object becomes `vanished`).
    pub async fn release_held(
        &self,
        source: String,
        gone: Vec<PathBuf>,
    ) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            for rel in &gone {
                c.execute(
                    "DELETE FROM refused WHERE source = ?1 AND rel_path = ?2",
                    params![source, path_bytes(rel)],
                )?;
                c.execute(
                    &RELEASE_HELD_SQL,
                    params![source, path_bytes(rel), now, State::Vanished],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Records an error that is not tied to one object (e.g. destination refused).
    pub async fn note_error(&self, message: String) -> Result<(), JournalError> {
        self.call_at(move |c, now| insert_error(c, now, None, &message))
            .await
    }

    /// One fact published earlier with `set_agent_state`.
    pub async fn agent_state(&self, name: &'static str) -> Result<Option<String>, JournalError> {
        self.call(move |c| {
            c.query_row(
                "SELECT value FROM agent_state WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    /// Publishes one fact for `status` (`destination`, `source.<name>`, `started`, `pid`).
    pub async fn set_agent_state(
        &self,
        name: impl Into<String>,
        value: String,
    ) -> Result<(), JournalError> {
        let name: String = name.into();
        self.call(move |c| {
            c.execute(
                "INSERT INTO agent_state (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )
            .map(drop)
        })
        .await
    }
}

/// Keeps an error for `status`, and at most `ERRORS_KEPT` of them.
pub(super) fn insert_error(
    c: &Connection,
    now: i64,
    id: Option<i64>,
    message: &str,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO errors (at_ms, object_id, message) VALUES (?1, ?2, ?3)",
        params![now, id, message],
    )?;
    c.execute(
        "DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?1",
        [ERRORS_KEPT],
    )?;
    Ok(())
}

/// A row of `RUNNABLE_SQL`; an unknown state or version kind is an error.
fn row_to_object(r: &rusqlite::Row<'_>) -> rusqlite::Result<ObjectRow> {
    let sha: Option<Vec<u8>> = r.get(8)?;
    Ok(ObjectRow {
        id: r.get(0)?,
        source: r.get(1)?,
        rel_path: PathBuf::from(std::ffi::OsString::from_vec(r.get::<_, Vec<u8>>(2)?)),
        key: r.get(3)?,
        // kind, size, mtime_ns, inode, etag: columns 16, 4, 5, 6, 17.
        version: VersionColumns {
            kind: match r.get::<_, String>(16)?.as_str() {
                "file" => "file",
                "object" => "object",
                _ => "unknown",
            },
            size: r.get(4)?,
            mtime_ns: r.get(5)?,
            inode: r.get(6)?,
            etag: r.get(17)?,
        }
        .version()
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(16, rusqlite::types::Type::Text, e.into())
        })?,
        state: r.get(7)?,
        sha256: sha.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()),
        upload_id: r.get(9)?,
        part_size: r.get::<_, Option<i64>>(10)?.map(|n| n as u64),
        attempts: r.get(11)?,
        pinned_etag: r.get(12)?,
        prior_etag: r.get(13)?,
        ctime_ns: r.get(14)?,
        part_hashes: r.get::<_, Option<Vec<u8>>>(15)?.map(|b| {
            b.chunks_exact(32)
                .map(|c| <[u8; 32]>::try_from(c).unwrap_or_default())
                .collect()
        }),
        priority: r.get(18)?,
        flag: r.get(19)?,
        streamed: r.get::<_, Option<String>>(20)?.as_deref() == Some(STREAMED),
        crc64nvme: r
            .get::<_, Option<String>>(21)?
            .as_deref()
            .and_then(crc_of_b64),
    })
}

/// `objects.upload_checksum` of a streamed upload (schema 8).
const STREAMED: &str = "crc64nvme";

/// A CRC-64/NVME as S3 writes it (base64 of 8 big-endian bytes).
pub fn crc_of_b64(b64: &str) -> Option<u64> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

/// The offer rule applied to each candidate, in the caller's transaction.
pub(super) fn offer_in(
    c: &rusqlite::Connection,
    now: i64,
    source: &str,
    batch: &[Candidate],
    reupload_changed: bool,
) -> rusqlite::Result<OfferStats> {
    let mut stats = OfferStats::default();
    {
        let mut latest = c.prepare_cached(
            "SELECT id, state, kind, size, mtime_ns, inode, etag FROM objects
             WHERE source = ?1 AND rel_path = ?2 ORDER BY id DESC LIMIT 1",
        )?;
        let mut insert = c.prepare_cached(
            "INSERT INTO objects (source, rel_path, key, size, mtime_ns, inode, state,
                                  discovered_ms, updated_ms, etag, kind, priority)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?9, ?7, ?7, ?8, ?10,
                     COALESCE((SELECT CAST(value AS INTEGER) FROM agent_state
                                WHERE name = 'priority:' || ?1), 0))",
        )?;
        let mut unrefuse =
            c.prepare_cached("DELETE FROM refused WHERE source = ?1 AND rel_path = ?2")?;
        let mut refresh = c.prepare_cached(
            "UPDATE objects SET size = ?2, mtime_ns = ?3, inode = ?4, sha256 = NULL,
                                updated_ms = ?5, etag = ?6, kind = ?8, pinned_etag = NULL
             WHERE id = ?1 AND state = ?7",
        )?;
        for cand in batch {
            let row = latest
                .query_row(params![source, path_bytes(&cand.rel_path)], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, State>(1)?,
                        VersionColumns::read(r, 2)?,
                    ))
                })
                .optional()?;
            let v = VersionColumns::of(&cand.version);
            unrefuse.execute(params![source, path_bytes(&cand.rel_path)])?;
            let latest = row.as_ref().map(|(_, s, v)| (*s, v));
            match offer_action(latest, &cand.version, reupload_changed) {
                OfferAction::Insert => {
                    insert.execute(params![
                        source,
                        path_bytes(&cand.rel_path),
                        cand.key,
                        v.size,
                        v.mtime_ns,
                        v.inode,
                        now,
                        v.etag,
                        State::Pending,
                        v.kind
                    ])?;
                    stats.inserted += 1;
                }
                OfferAction::Refresh => {
                    let id = row.as_ref().map(|(id, _, _)| *id).unwrap_or_default();
                    refresh.execute(params![
                        id,
                        v.size,
                        v.mtime_ns,
                        v.inode,
                        now,
                        v.etag,
                        State::Pending,
                        v.kind
                    ])?;
                    stats.refreshed += 1;
                }
                OfferAction::Nothing => {}
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn file(size: u64) -> Version {
        Version::File {
            size,
            mtime_ns: 1,
            inode: 1,
        }
    }

    fn cand(p: &str, size: u64) -> Candidate {
        Candidate {
            rel_path: PathBuf::from(p),
            key: p.to_string(),
            version: file(size),
        }
    }

    #[tokio::test]
    async fn bucket_etags_are_listed_pinned_and_forgotten_on_reset() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        // Listed with an ETag: part of the version, kept across a reset.
        let listed = Candidate {
            version: Version::object(1, Some(5), Some("\"abc\"")),
            ..cand("listed", 1)
        };
        // Listed without one: the transfer pins one, a reset forgets it.
        let unlisted = Candidate {
            version: Version::object(2, Some(5), None),
            ..cand("unlisted", 2)
        };
        j.offer("b".into(), vec![listed.clone(), unlisted.clone()], true)
            .await
            .unwrap();
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        let (l, u) = (&rows[0], &rows[1]);
        assert_eq!(l.version, listed.version);
        assert_eq!(l.source_etag(), Some("\"abc\""));
        assert_eq!(u.source_etag(), None);
        assert!(j
            .set_hashed(
                u.id,
                u.version.clone(),
                Hashed::whole([2; 32]),
                Some("\"pin\"".into())
            )
            .await
            .unwrap());
        assert!(j
            .set_hashed(l.id, l.version.clone(), Hashed::whole([1; 32]), None)
            .await
            .unwrap());
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        assert_eq!(rows[0].source_etag(), Some("\"abc\""));
        assert_eq!(rows[1].source_etag(), Some("\"pin\""));
        assert_eq!(
            rows[1].version, unlisted.version,
            "a pin is not the version"
        );
        j.reset(rows[0].id, None, "x".into()).await.unwrap();
        j.reset(rows[1].id, None, "x".into()).await.unwrap();
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        assert_eq!(rows[0].source_etag(), Some("\"abc\""));
        assert_eq!(rows[1].source_etag(), None);
        // A new listing with another ETag is another version: the pending row is refreshed.
        let changed = Candidate {
            version: Version::object(1, Some(5), Some("\"def\"")),
            ..cand("listed", 1)
        };
        let s = j
            .offer("b".into(), vec![changed.clone()], true)
            .await
            .unwrap();
        assert_eq!(s.refreshed, 1);
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        assert_eq!(rows[0].version, changed.version);
        // A file and an object of the same size and time are not the same version.
        assert_ne!(file(1), Version::object(1, None, None));
    }

    /// A journal of schema 4 (an ETag hash in the inode column of bucket rows) opens with each
    /// row's version intact: files stay files, a listed object keeps its ETag as its version,
    /// an unlisted one its pinned ETag as the pin.
    #[tokio::test]
    async fn schema_4_rows_keep_their_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let c = Connection::open(&path).unwrap();
            for sql in &super::super::schema::MIGRATIONS[..4] {
                c.execute_batch(sql).unwrap();
            }
            c.pragma_update(None, "user_version", 4).unwrap();
            c.execute_batch(
                "INSERT INTO objects (source, rel_path, key, size, mtime_ns, inode, state,
                                      discovered_ms, updated_ms, etag)
                 VALUES ('d', CAST('a' AS BLOB), 'a', 1, 7, 42, 'pending', 0, 0, NULL),
                        ('b', CAST('l' AS BLOB), 'l', 2, 5000000000, 912, 'pending', 0, 0, '\"L\"'),
                        ('b', CAST('u' AS BLOB), 'u', 3, 5000000000, 0, 'uploading', 0, 0, '\"P\"');",
            )
            .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let rows = j.runnable(10, None, false, vec![]).await.unwrap();
        assert_eq!(
            rows[0].version,
            Version::File {
                size: 1,
                mtime_ns: 7,
                inode: 42
            }
        );
        assert_eq!(rows[1].version, Version::object(2, Some(5), Some("\"L\"")));
        assert_eq!(rows[1].pinned_etag, None);
        assert_eq!(rows[2].version, Version::object(3, Some(5), None));
        assert_eq!(rows[2].source_etag(), Some("\"P\""));
    }

    /// Offering the same files twice adds nothing; a changed pending file is refreshed, a changed
    /// delivered one is a new version; `delivered` is guarded by the version.
    #[tokio::test]
    async fn offer_is_idempotent_and_versions_changes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        let s = j
            .offer("s".into(), vec![cand("a", 1), cand("b", 2)], true)
            .await
            .unwrap();
        assert_eq!(s.inserted, 2);
        let s = j
            .offer("s".into(), vec![cand("a", 1), cand("b", 2)], true)
            .await
            .unwrap();
        assert_eq!(s, OfferStats::default());
        // A pending file that changes is refreshed in place...
        let s = j.offer("s".into(), vec![cand("a", 5)], true).await.unwrap();
        assert_eq!(s.refreshed, 1);
        // ...a delivered one becomes a new version.
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        let b = rows.iter().find(|r| r.key == "b").unwrap().id;
        let fp = rows.iter().find(|r| r.key == "b").unwrap().version.clone();
        assert!(!j
            .delivered(
                b,
                file(99),
                [7; 32],
                Landed::default(),
                Custody::default(),
                true
            )
            .await
            .unwrap());
        assert!(j
            .delivered(b, fp, [7; 32], Landed::default(), Custody::default(), true)
            .await
            .unwrap());
        let s = j.offer("s".into(), vec![cand("b", 3)], true).await.unwrap();
        assert_eq!(s.inserted, 1);
        let st = j.status().unwrap();
        assert_eq!(st.objects["pending"], 2);
        assert_eq!(st.objects["done"], 1);
        assert_eq!(st.bytes_pending, 8);
    }

    /// States, upload ids and parts survive a reopen; a hash for a stale version writes nothing; a
    /// reset forgets the parts.
    #[tokio::test]
    async fn state_survives_reopen_and_hash_guard_detects_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let j = Journal::open(&path).unwrap();
            j.offer("s".into(), vec![cand("a", 1)], true).await.unwrap();
            let id = j.runnable(1, None, true, vec![]).await.unwrap()[0].id;
            let stale = file(9);
            assert!(!j
                .set_hashed(id, stale, Hashed::whole([1; 32]), None)
                .await
                .unwrap());
            assert!(j
                .set_hashed(id, file(1), Hashed::whole([1; 32]), None)
                .await
                .unwrap());
            j.begin_multipart(id, "up-1".into(), 5 << 20).await.unwrap();
            j.record_part(
                id,
                PartRow {
                    number: 1,
                    size: 5 << 20,
                    sha256_b64: Some("x".into()),
                    crc64nvme_b64: None,
                    etag: "\"e\"".into(),
                },
            )
            .await
            .unwrap();
            // A part sent unsigned over https has no SHA-256 of its own.
            j.record_part(
                id,
                PartRow {
                    number: 2,
                    size: 1,
                    sha256_b64: None,
                    crc64nvme_b64: Some("c".into()),
                    etag: "\"f\"".into(),
                },
            )
            .await
            .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, State::Uploading);
        assert_eq!(rows[0].upload_id.as_deref(), Some("up-1"));
        assert_eq!(rows[0].sha256, Some([1; 32]));
        let parts = j.parts(rows[0].id).await.unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].sha256_b64.as_deref(), Some("x"));
        assert_eq!(parts[1].sha256_b64, None);
        assert_eq!(parts[1].crc64nvme_b64.as_deref(), Some("c"));
        j.reset(rows[0].id, None, "gone".into()).await.unwrap();
        assert!(j.parts(rows[0].id).await.unwrap().is_empty());
        j.check_integrity().unwrap();
    }

    /// The daemon waits out each object's backoff, `--once` does not; the cursor visits each row
    /// once.
    #[tokio::test]
    async fn backoff_and_cursor_filter_runnable() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        j.offer("s".into(), vec![cand("a", 1), cand("b", 1)], true)
            .await
            .unwrap();
        let rows = j.runnable(10, None, true, vec![]).await.unwrap();
        j.retry_later(rows[0].id, 60_000, true, "later".into())
            .await
            .unwrap();
        assert_eq!(j.runnable(10, None, true, vec![]).await.unwrap().len(), 1);
        assert_eq!(j.runnable(10, None, false, vec![]).await.unwrap().len(), 2);
        assert_eq!(
            j.runnable(10, Some((0, rows[0].id)), false, vec![])
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            j.runnable(10, None, false, vec![rows[1].id])
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(j.next_wakeup_ms().await.unwrap().is_some());
        assert_eq!(j.status().unwrap().last_errors[0].message, "later");
    }

    /// Dispatch order: higher priority first, oldest first within one; a cursor pages through
    /// in that order; a priority set later applies to rows already waiting.
    #[tokio::test]
    async fn runnable_goes_by_priority_then_age_and_pages_by_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        j.set_priorities(vec![("low".into(), 0), ("high".into(), 5)])
            .await
            .unwrap();
        j.offer("low".into(), vec![cand("l1", 1), cand("l2", 1)], true)
            .await
            .unwrap();
        j.offer("high".into(), vec![cand("h1", 1)], true)
            .await
            .unwrap();
        j.offer("new".into(), vec![cand("n1", 1)], true)
            .await
            .unwrap();
        let order =
            |rows: Vec<ObjectRow>| -> Vec<String> { rows.into_iter().map(|r| r.key).collect() };
        let all = j.runnable(10, None, true, vec![]).await.unwrap();
        assert_eq!(order(all), ["h1", "l1", "l2", "n1"]);
        let first = j.runnable(2, None, true, vec![]).await.unwrap();
        let last = first.last().map(|r| (r.priority, r.id));
        assert_eq!(order(first), ["h1", "l1"]);
        assert_eq!(
            order(j.runnable(10, last, true, vec![]).await.unwrap()),
            ["l2", "n1"]
        );
        // A reload gives "new" the highest priority: its waiting row goes first now.
        j.set_priorities(vec![("new".into(), 9)]).await.unwrap();
        let all = j.runnable(10, None, true, vec![]).await.unwrap();
        assert_eq!(order(all), ["n1", "h1", "l1", "l2"]);
    }

    /// The dispatch queries use the partial indexes (no scan of finished rows, no sort).
    #[test]
    fn dispatch_queries_use_the_active_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        let plan = |sql: &str| {
            let sql = sql.to_string();
            j.with(move |c| {
                let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let nulls = std::iter::repeat_n(rusqlite::types::Null, st.parameter_count());
                let rows =
                    st.query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap()
            .join("; ")
        };
        let runnable = plan(&RUNNABLE_SQL);
        assert!(runnable.contains("objects_active"), "{runnable}");
        assert!(!runnable.contains("TEMP B-TREE"), "{runnable}");
        let wakeup = plan(&WAKEUP_SQL);
        assert!(wakeup.contains("objects_backoff"), "{wakeup}");
    }

    /// A file that is not a database is reported as damaged, with what to do.
    #[test]
    fn garbage_file_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = Journal::open(&path).err().expect("must fail");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("move the file"));
    }
}
