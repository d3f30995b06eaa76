//! What `ha-edge status` reads from the journal: counts per state, bytes, agent facts, what is
//! held back, the last errors. Read-only; works on a journal of an older ha-edge (not migrated).
//!
//! Must not break: it never writes (the daemon may be running) and never prints a secret.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use serde::Serialize;

use super::model::{states_sql, State};
use super::store::{Journal, JournalError};

/// One recent error, for `status`.
#[derive(Debug, Serialize)]
pub struct StatusError {
    /// When (RFC 3339, seconds).
    pub at: String,
    /// The destination key, if the error is an object's.
    pub key: Option<String>,
    /// What went wrong, as logged.
    pub message: String,
}

/// A file or object that will not be sent as it is: refused at discovery (name, type, the
/// journal itself), rejected, or in conflict with another writer's object.
#[derive(Debug, Serialize)]
pub struct HeldItem {
    /// When it was refused, rejected or found in conflict.
    pub at: String,
    /// The source's name.
    pub source: String,
    /// The path relative to the source (lossy UTF-8).
    pub path: String,
    /// The destination key, if it got one.
    pub key: Option<String>,
    /// "refused", "rejected" or "conflict".
    pub state: String,
    /// Why it is held, for the operator.
    pub reason: String,
}

/// What is held back until the operator acts.
#[derive(Debug, Serialize)]
pub struct Held {
    /// How many paths are held.
    pub count: u64,
    /// The newest, at most 20.
    pub last: Vec<HeldItem>,
}

/// One object as `status --objects` lists it.
#[derive(Debug, Serialize)]
pub struct ObjectItem {
    pub source: String,
    /// The destination key (empty for a path refused at discovery).
    pub key: String,
    /// The path relative to the source (lossy UTF-8).
    pub path: String,
    pub size: u64,
    /// Its journal state (`refused`: refused at discovery).
    pub state: String,
    /// Since it was discovered.
    pub age_secs: u64,
    /// Failed attempts so far.
    pub attempts: u64,
    pub last_error: Option<String>,
}

/// Which objects `status --objects` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectFilter {
    /// Everything not finished (not done, not vanished).
    Open,
    Pending,
    /// Uploading or completing.
    Uploading,
    /// Rejected, or refused at discovery.
    Refused,
    Quarantined,
    Conflict,
    /// Still to send, with failed attempts (retrying).
    Failed,
}

/// One `ObjectItem` from the columns source, key, rel_path, size, state, discovered_ms,
/// attempts, last_error.
fn object_item(r: &rusqlite::Row<'_>, now: i64) -> rusqlite::Result<ObjectItem> {
    let rel: Vec<u8> = r.get(2)?;
    let discovered: i64 = r.get(5)?;
    Ok(ObjectItem {
        source: r.get(0)?,
        key: r.get(1)?,
        path: String::from_utf8_lossy(&rel).into_owned(),
        size: r.get::<_, i64>(3)?.max(0).unsigned_abs(),
        state: r.get(4)?,
        age_secs: ((now - discovered).max(0) / 1000).unsigned_abs(),
        attempts: r.get::<_, i64>(6)?.max(0).unsigned_abs(),
        last_error: r.get(7)?,
    })
}

/// Files of one source seen but not yet settled.
#[derive(Debug, Serialize)]
pub struct Settling {
    pub source: String,
    pub count: u64,
    /// How long the oldest has waited.
    pub oldest_secs: u64,
}

/// What `ha-edge status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The journal file read.
    pub journal: PathBuf,
    /// Rows per state (every state is listed, zeros included).
    pub objects: BTreeMap<String, u64>,
    /// Bytes still to be sent (pending, uploading, completing).
    pub bytes_pending: u64,
    /// Bytes in the bucket, verified (delivered, done).
    pub bytes_delivered: u64,
    /// How long the oldest object still to send has waited.
    pub oldest_pending_age_secs: Option<u64>,
    /// Facts the daemon published (destination health, per-source refusals, start time, pid).
    pub agent: BTreeMap<String, String>,
    /// Files seen but not settled yet, per source (as the daemon last published).
    pub settling: Vec<Settling>,
    /// Paths held back (refused, rejected, in conflict).
    pub held: Held,
    /// The ten newest errors.
    pub last_errors: Vec<StatusError>,
}

/// Paths held back: the newest journal row of a path in `rejected` or `conflict`, and paths
/// refused at discovery.
fn held_sql(with_refused: bool) -> String {
    let rows = format!(
        "SELECT o.updated_ms, o.source, o.rel_path, o.key, o.state, COALESCE(o.last_error, '')
           FROM objects o
          WHERE o.state IN ({})
            AND o.id = (SELECT MAX(n.id) FROM objects n
                         WHERE n.source = o.source AND n.rel_path = o.rel_path)",
        states_sql(&State::HELD)
    );
    if with_refused {
        rows + " UNION ALL SELECT at_ms, source, rel_path, NULL, 'refused', reason FROM refused"
    } else {
        rows
    }
}

/// What waits to be sent from one source (for the metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub source: String,
    pub objects: u64,
    pub bytes: u64,
    /// When the oldest of them was discovered (ms since the epoch).
    pub oldest_ms: i64,
}

impl Journal {
    /// For `--dry-run`: whether row `id` is in this journal still to be sent (an earlier run
    /// left it), and whether any row of the path is.
    pub fn seen_before(
        &self,
        id: i64,
        source: &str,
        rel: &std::path::Path,
    ) -> Result<(bool, bool), JournalError> {
        use std::os::unix::ffi::OsStrExt;
        let (source, rel) = (source.to_string(), rel.as_os_str().as_bytes().to_vec());
        self.with(move |c| {
            let pending: bool = c.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM objects WHERE id = ?1 AND state IN ({}))",
                    states_sql(&State::ACTIVE)
                ),
                [id],
                |r| r.get(0),
            )?;
            let any: bool = c.query_row(
                "SELECT EXISTS (SELECT 1 FROM objects WHERE source = ?1 AND rel_path = ?2)",
                rusqlite::params![source, rel],
                |r| r.get(0),
            )?;
            Ok((pending, any))
        })
    }

    /// Writes a consistent copy of the journal to `to` (for `--dry-run`; read-only is enough).
    pub fn copy_to(&self, to: &std::path::Path) -> Result<(), JournalError> {
        let to = to.to_string_lossy().into_owned();
        self.with(move |c| c.execute("VACUUM INTO ?1", [&to]).map(drop))
    }

    /// Objects for `status --objects`, newest first, at most `limit`.
    pub fn list_objects(
        &self,
        filter: ObjectFilter,
        limit: usize,
    ) -> Result<Vec<ObjectItem>, JournalError> {
        let now = self.now();
        self.with(move |c| {
            let rows = "SELECT source, key, rel_path, size, state, discovered_ms, attempts,
                               last_error, id FROM objects";
            let refused = "SELECT source, '', rel_path, 0, 'refused', at_ms, 0, reason, 0
                             FROM refused";
            let sql = match filter {
                ObjectFilter::Open => {
                    format!("{rows} WHERE state NOT IN ('done', 'vanished') UNION ALL {refused}")
                }
                ObjectFilter::Pending => format!("{rows} WHERE state = 'pending'"),
                ObjectFilter::Uploading => {
                    format!("{rows} WHERE state IN ('uploading', 'completing')")
                }
                ObjectFilter::Refused => {
                    format!("{rows} WHERE state = 'rejected' UNION ALL {refused}")
                }
                ObjectFilter::Quarantined => format!("{rows} WHERE state = 'quarantined'"),
                ObjectFilter::Conflict => format!("{rows} WHERE state = 'conflict'"),
                ObjectFilter::Failed => format!(
                    "{rows} WHERE state IN ({}) AND attempts > 0 AND last_error IS NOT NULL",
                    states_sql(&State::ACTIVE)
                ),
            };
            let mut q = c.prepare(&format!("{sql} ORDER BY 6 DESC, 9 DESC LIMIT ?1"))?;
            let items = q.query_map([limit as i64], |r| object_item(r, now))?;
            items.collect()
        })
    }

    /// `ha-edge lookup`: every journal row with this destination key, newest first (the one
    /// place, besides receipts, where a pseudonymised key maps back to its source path).
    pub fn lookup(&self, key: String) -> Result<Vec<ObjectItem>, JournalError> {
        let now = self.now();
        self.with(move |c| {
            let mut q = c.prepare(
                "SELECT source, key, rel_path, size, state, discovered_ms, attempts, last_error, id
                   FROM objects WHERE key = ?1 ORDER BY id DESC",
            )?;
            let items = q.query_map([&key], |r| object_item(r, now))?;
            items.collect()
        })
    }

    /// Objects and bytes waiting to be sent, in all (through the writer: the run's own view).
    pub async fn unsent_totals(&self) -> Result<(u64, u64), JournalError> {
        self.call(|c| {
            c.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM objects WHERE state IN ({})",
                    states_sql(&State::UNSENT)
                ),
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?.max(0).unsigned_abs(),
                        r.get::<_, i64>(1)?.max(0).unsigned_abs(),
                    ))
                },
            )
        })
        .await
    }

    /// What waits to be sent, per source (read-only; cheap: served by the active index).
    pub fn pending_by_source(&self) -> Result<Vec<Pending>, JournalError> {
        self.with(|c| {
            let mut q = c.prepare_cached(&format!(
                "SELECT source, COUNT(*), COALESCE(SUM(size), 0), MIN(discovered_ms) FROM objects
                  WHERE state IN ({}) GROUP BY source",
                states_sql(&State::UNSENT)
            ))?;
            let rows = q.query_map([], |r| {
                Ok(Pending {
                    source: r.get(0)?,
                    objects: r.get::<_, i64>(1)?.max(0).unsigned_abs(),
                    bytes: r.get::<_, i64>(2)?.max(0).unsigned_abs(),
                    oldest_ms: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Everything `ha-edge status` shows, in one read transaction.
    pub fn status(&self) -> Result<Status, JournalError> {
        let journal = self.path().to_path_buf();
        let now = self.now();
        self.with(move |c| {
            let mut objects = BTreeMap::new();
            for st in State::ALL {
                objects.insert(st.as_str().to_string(), 0u64);
            }
            let mut stmt = c.prepare("SELECT state, COUNT(*) FROM objects GROUP BY state")?;
            for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
                let (state, n) = row?;
                objects.insert(state, n as u64);
            }
            let unsent = states_sql(&State::UNSENT);
            let bytes_pending: i64 = c.query_row(
                &format!("SELECT COALESCE(SUM(size), 0) FROM objects WHERE state IN ({unsent})"),
                [],
                |r| r.get(0),
            )?;
            let bytes_delivered: i64 = c.query_row(
                &format!(
                    "SELECT COALESCE(SUM(size), 0) FROM objects WHERE state IN ({})",
                    states_sql(&State::LANDED)
                ),
                [],
                |r| r.get(0),
            )?;
            let oldest: Option<i64> = c.query_row(
                &format!("SELECT MIN(discovered_ms) FROM objects WHERE state IN ({unsent})"),
                [],
                |r| r.get(0),
            )?;
            let mut agent = BTreeMap::new();
            let mut stmt = c.prepare("SELECT name, value FROM agent_state ORDER BY name")?;
            for row in
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            {
                let (k, v) = row?;
                agent.insert(k, v);
            }
            let mut stmt = c.prepare(
                "SELECT e.at_ms, o.key, e.message FROM errors e
                 LEFT JOIN objects o ON o.id = e.object_id
                 ORDER BY e.id DESC LIMIT 10",
            )?;
            let last_errors = stmt
                .query_map([], |r| {
                    let at: i64 = r.get(0)?;
                    Ok(StatusError {
                        at: humantime::format_rfc3339_seconds(
                            UNIX_EPOCH + std::time::Duration::from_millis(at.max(0) as u64),
                        )
                        .to_string(),
                        key: r.get(1)?,
                        message: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // A journal of an older ha-edge (opened read-only, not migrated) has no such table.
            let has_refused: bool = c.query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'refused'",
                [],
                |r| r.get(0),
            )?;
            let held_sql = held_sql(has_refused);
            let count: i64 =
                c.query_row(&format!("SELECT COUNT(*) FROM ({held_sql})"), [], |r| {
                    r.get(0)
                })?;
            let mut stmt = c.prepare(&format!("{held_sql} ORDER BY 1 DESC LIMIT 20"))?;
            let last = stmt
                .query_map([], |r| {
                    let at: i64 = r.get(0)?;
                    let rel: Vec<u8> = r.get(2)?;
                    Ok(HeldItem {
                        at: humantime::format_rfc3339_seconds(
                            UNIX_EPOCH + std::time::Duration::from_millis(at.max(0) as u64),
                        )
                        .to_string(),
                        source: r.get(1)?,
                        path: String::from_utf8_lossy(&rel).into_owned(),
                        key: r.get(3)?,
                        state: r.get(4)?,
                        reason: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let settling = agent
                .iter()
                .filter_map(|(k, v)| {
                    let source = k.strip_prefix("settling.")?;
                    let j: serde_json::Value = serde_json::from_str(v).ok()?;
                    let count = j["count"].as_u64()?;
                    let since = j["oldest_since"].as_i64()?;
                    (count > 0).then(|| Settling {
                        source: source.to_string(),
                        count,
                        oldest_secs: (now / 1000 - since).max(0).unsigned_abs(),
                    })
                })
                .collect();
            Ok(Status {
                settling,
                held: Held {
                    count: count as u64,
                    last,
                },
                journal: journal.clone(),
                objects,
                bytes_pending: bytes_pending as u64,
                bytes_delivered: bytes_delivered as u64,
                oldest_pending_age_secs: oldest.map(|t| ((now - t).max(0) / 1000).unsigned_abs()),
                agent,
                last_errors,
            })
        })
    }
}
