//! The SQLite connection and every query. One connection behind a mutex; callers on the async
//! runtime go through `spawn_blocking`, so a slow fsync never stalls a tokio worker.

use std::collections::BTreeMap;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use super::model::{offer_action, Fingerprint, Landed, ObjectRow, OfferAction, PartRow, State};
use super::schema;

/// Objects with work to do, in id order from a cursor; served by the partial index
/// `objects_active` (schema 2), so each call reads only the rows it returns.
const RUNNABLE_SQL: &str = "SELECT id, source, rel_path, key, size, mtime_ns, inode, state, sha256,
        upload_id, part_size, attempts, etag,
        (SELECT p.dest_etag FROM objects p WHERE p.key = objects.key AND p.id < objects.id
            AND p.dest_etag IS NOT NULL ORDER BY p.id DESC LIMIT 1),
        ctime_ns, part_hashes
    FROM objects
    WHERE state IN ('pending', 'uploading', 'completing', 'delivered')
      AND next_attempt_ms <= ?1 AND id > ?2
    ORDER BY id LIMIT ?3";
/// The earliest retry time still ahead (partial index `objects_backoff`).
const WAKEUP_SQL: &str = "SELECT MIN(next_attempt_ms) FROM objects
    WHERE state IN ('pending', 'uploading', 'completing', 'delivered') AND next_attempt_ms > ?1";

/// Errors kept in the `errors` table for `status`.
const ERRORS_KEPT: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the journal {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the journal {path} was written by a newer ha-edge (schema {found}, this build knows {known}); upgrade ha-edge")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("the journal {path} is damaged ({detail}). Stop ha-edge, move the file (and its -wal and -shm files) aside, and start again: source files are found again by the next scan, and objects already in the bucket are uploaded once more")]
    Corrupt { path: PathBuf, detail: String },
    #[error("journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no journal at {0} (ha-edge has not run with this config yet)")]
    Missing(PathBuf),
    #[error("journal {path}: cannot commit: {detail}")]
    Commit { path: PathBuf, detail: String },
    #[error("the journal thread panicked")]
    Panicked,
}

impl JournalError {
    fn from_sqlite(path: &Path, e: rusqlite::Error) -> JournalError {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match e.sqlite_error_code() {
            Some(DatabaseCorrupt | NotADatabase) => JournalError::Corrupt {
                path: path.to_path_buf(),
                detail: e.to_string(),
            },
            _ => JournalError::Sqlite {
                path: path.to_path_buf(),
                source: e,
            },
        }
    }
}

/// The hash pass over one source version: what every later byte sent must match.
#[derive(Debug, Clone)]
pub struct Hashed {
    pub sha256: [u8; 32],
    /// The SHA-256 of each part, in order.
    pub parts: Vec<[u8; 32]>,
    /// A file's ctime when it was hashed (None for bucket objects).
    pub ctime_ns: Option<i64>,
}

#[cfg(test)]
impl Hashed {
    /// A hash of the whole source only (no parts, no ctime).
    pub fn whole(sha256: [u8; 32]) -> Hashed {
        Hashed {
            sha256,
            parts: Vec::new(),
            ctime_ns: None,
        }
    }
}

/// A settled file offered by a source.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub rel_path: PathBuf,
    pub key: String,
    pub fingerprint: Fingerprint,
    /// A bucket object's ETag as listed (None for files).
    pub etag: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OfferStats {
    pub inserted: usize,
    pub refreshed: usize,
}

#[derive(Debug, Serialize)]
pub struct StatusError {
    pub at: String,
    pub key: Option<String>,
    pub message: String,
}

/// A file or object that will not be sent as it is: refused at discovery (name, type, the
/// journal itself), rejected, or in conflict with another writer's object.
#[derive(Debug, Serialize)]
pub struct HeldItem {
    pub at: String,
    pub source: String,
    pub path: String,
    /// The destination key, if it got one.
    pub key: Option<String>,
    /// "refused", "rejected" or "conflict".
    pub state: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Held {
    pub count: u64,
    /// The newest, at most 20.
    pub last: Vec<HeldItem>,
}

/// What `ha-edge status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub journal: PathBuf,
    pub objects: BTreeMap<String, u64>,
    pub bytes_pending: u64,
    pub bytes_delivered: u64,
    pub oldest_pending_age_secs: Option<u64>,
    pub agent: BTreeMap<String, String>,
    pub held: Held,
    pub last_errors: Vec<StatusError>,
}

/// Paths held back: the newest journal row of a path in `rejected` or `conflict`, and paths
/// refused at discovery.
const HELD_SQL: &str = "
    SELECT o.updated_ms, o.source, o.rel_path, o.key, o.state, COALESCE(o.last_error, '')
      FROM objects o
     WHERE o.state IN ('rejected', 'conflict')
       AND o.id = (SELECT MAX(n.id) FROM objects n
                    WHERE n.source = o.source AND n.rel_path = o.rel_path)
    UNION ALL
    SELECT at_ms, source, rel_path, NULL, 'refused', reason FROM refused";

/// Work for the writer thread: `run` executes inside the group's transaction and may run more
/// than once (the whole group is run again after the disk was full or when another job of the
/// group failed); `finish` gets the outcome once the enclosing transaction has committed or
/// failed for good.
struct Job {
    run: Box<dyn FnMut(&Connection) -> RunResult + Send>,
    finish: Completion,
}
type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

/// What one run of a job did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RunResult {
    Ok,
    Failed,
    /// The database or its filesystem is full: nothing can be written until space returns.
    DiskFull,
}

fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Requests taken into one transaction at most.
const MAX_GROUP: usize = 512;

enum Backend {
    /// The daemon's journal: one thread owns the connection and group-commits requests.
    Writer(std::sync::mpsc::Sender<Job>),
    /// `status` and `validate`: a read-only connection used in place.
    ReadOnly(Mutex<Connection>),
}

#[derive(Clone)]
pub struct Journal {
    backend: Arc<Backend>,
    path: Arc<PathBuf>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

impl Journal {
    /// Opens (creating if needed) the journal, brings its schema up to date, and starts the
    /// writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let open_err = |e: std::io::Error| JournalError::Open {
            path: path.to_path_buf(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        };
        // The journal holds patient file paths: private whatever the umask. SQLite creates the
        // -wal and -shm files with the database file's mode, so creating that one 0600 (and
        // correcting an older one) covers all three.
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(open_err)?;
        }
        private_file(path).map_err(open_err)?;
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", path.display()));
            if side.exists() {
                set_private(&side).map_err(open_err)?;
            }
        }
        let mut conn = Connection::open(path).map_err(|e| JournalError::Open {
            path: path.to_path_buf(),
            source: e,
        })?;
        let setup = |c: &mut Connection| -> rusqlite::Result<()> {
            c.busy_timeout(std::time::Duration::from_secs(10))?;
            c.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.pragma_update(None, "foreign_keys", "ON")?;
            // Savepoints (see `run_isolated`) and sorts use temporary storage; in memory, a
            // statement journal grows in 1 KiB chunks, not 64 KiB ones (with musl's allocator
            // each of those was an mmap/munmap pair).
            c.pragma_update(None, "temp_store", "MEMORY")?;
            Ok(())
        };
        setup(&mut conn).map_err(|e| JournalError::from_sqlite(path, e))?;
        migrate(&mut conn, path)?;
        let identity = FileIdentity::of(path).map_err(open_err)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let watched = path.to_path_buf();
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer(conn, rx, watched, identity))
            .map_err(open_err)?;
        Ok(Journal {
            backend: Arc::new(Backend::Writer(tx)),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// Opens an existing journal read-only (for `status`; works while the daemon runs).
    pub fn open_readonly(path: &Path) -> Result<Journal, JournalError> {
        if !path.exists() {
            return Err(JournalError::Missing(path.to_path_buf()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| JournalError::Open {
            path: path.to_path_buf(),
            source: e,
        })?;
        let j = Journal {
            backend: Arc::new(Backend::ReadOnly(Mutex::new(conn))),
            path: Arc::new(path.to_path_buf()),
        };
        j.with(|c| c.busy_timeout(std::time::Duration::from_secs(5)))?;
        let version: i64 = j.with(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))?;
        if version > schema::CURRENT {
            return Err(JournalError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known: schema::CURRENT,
            });
        }
        Ok(j)
    }

    /// Runs `f` and blocks until its transaction has committed.
    fn with<R: Send + 'static>(
        &self,
        mut f: impl FnMut(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, JournalError> {
        match &*self.backend {
            Backend::ReadOnly(conn) => {
                let guard = conn.lock().map_err(|_| JournalError::Panicked)?;
                f(&guard).map_err(|e| JournalError::from_sqlite(&self.path, e))
            }
            Backend::Writer(_) => {
                let (tx, rx) = std::sync::mpsc::channel();
                self.submit(f, move |r| {
                    let _ = tx.send(r);
                })?;
                rx.recv().map_err(|_| JournalError::Panicked)?
            }
        }
    }

    /// Runs `f`; resolves once its transaction has committed.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnMut(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, JournalError> {
        match &*self.backend {
            Backend::ReadOnly(_) => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.with(f))
                    .await
                    .map_err(|_| JournalError::Panicked)?
            }
            Backend::Writer(_) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.submit(f, move |r| {
                    let _ = tx.send(r);
                })?;
                rx.await.map_err(|_| JournalError::Panicked)?
            }
        }
    }

    /// Queues `f` for the writer thread; `reply` gets its result after the commit.
    fn submit<R: Send + 'static>(
        &self,
        mut f: impl FnMut(&Connection) -> rusqlite::Result<R> + Send + 'static,
        reply: impl FnOnce(Result<R, JournalError>) + Send + 'static,
    ) -> Result<(), JournalError> {
        let Backend::Writer(sender) = &*self.backend else {
            return Err(JournalError::Panicked);
        };
        let path = self.path.clone();
        // The latest run's result; None if the job never got to run.
        let slot: Arc<Mutex<Option<rusqlite::Result<R>>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let run = Box::new(move |c: &Connection| {
            let r = f(c);
            let res = match &r {
                Ok(_) => RunResult::Ok,
                Err(e) if is_disk_full(e) => RunResult::DiskFull,
                Err(_) => RunResult::Failed,
            };
            if let Ok(mut g) = slot2.lock() {
                *g = Some(r);
            }
            res
        });
        let finish: Completion = Box::new(move |commit: Result<(), String>| {
            let result = slot.lock().ok().and_then(|mut g| g.take());
            let out = match (result, commit) {
                (Some(Ok(v)), Ok(())) => Ok(v),
                (Some(Err(e)), _) => Err(JournalError::from_sqlite(&path, e)),
                (_, Err(detail)) => Err(JournalError::Commit {
                    path: path.to_path_buf(),
                    detail,
                }),
                (None, Ok(())) => Err(JournalError::Panicked),
            };
            reply(out);
        });
        sender
            .send(Job { run, finish })
            .map_err(|_| JournalError::Panicked)
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A full consistency check (for `validate`).
    pub fn check_integrity(&self) -> Result<(), JournalError> {
        let result: String = self.with(|c| c.query_row("PRAGMA quick_check", [], |r| r.get(0)))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(JournalError::Corrupt {
                path: self.path.to_path_buf(),
                detail: result,
            })
        }
    }

    /// Records settled files of one source; one transaction for the whole batch.
    pub async fn offer(
        &self,
        source: String,
        batch: Vec<Candidate>,
        reupload_changed: bool,
    ) -> Result<OfferStats, JournalError> {
        self.call(move |c| {
            let mut stats = OfferStats::default();
            let now = now_ms();
            {
                let mut latest = c.prepare_cached(
                    "SELECT id, state, size, mtime_ns, inode FROM objects
                     WHERE source = ?1 AND rel_path = ?2 ORDER BY id DESC LIMIT 1",
                )?;
                let mut insert = c.prepare_cached(
                    "INSERT INTO objects (source, rel_path, key, size, mtime_ns, inode, state,
                                          discovered_ms, updated_ms, etag)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?8)",
                )?;
                let mut unrefuse =
                    c.prepare_cached("DELETE FROM refused WHERE source = ?1 AND rel_path = ?2")?;
                let mut refresh = c.prepare_cached(
                    "UPDATE objects SET size = ?2, mtime_ns = ?3, inode = ?4, sha256 = NULL,
                                        updated_ms = ?5, etag = ?6
                     WHERE id = ?1 AND state = 'pending'",
                )?;
                for cand in &batch {
                    let row = latest
                        .query_row(params![source, path_bytes(&cand.rel_path)], |r| {
                            let state: String = r.get(1)?;
                            Ok((
                                r.get::<_, i64>(0)?,
                                state.parse::<State>().unwrap_or(State::Rejected),
                                Fingerprint {
                                    size: r.get::<_, i64>(2)? as u64,
                                    mtime_ns: r.get(3)?,
                                    inode: r.get::<_, i64>(4)? as u64,
                                },
                            ))
                        })
                        .optional()?;
                    let fp = cand.fingerprint;
                    unrefuse.execute(params![source, path_bytes(&cand.rel_path)])?;
                    match offer_action(row.map(|(_, s, f)| (s, f)), fp, reupload_changed) {
                        OfferAction::Insert => {
                            insert.execute(params![
                                source,
                                path_bytes(&cand.rel_path),
                                cand.key,
                                fp.size as i64,
                                fp.mtime_ns,
                                fp.inode as i64,
                                now,
                                cand.etag
                            ])?;
                            stats.inserted += 1;
                        }
                        OfferAction::Refresh => {
                            let id = row.map(|(id, _, _)| id).unwrap_or_default();
                            refresh.execute(params![
                                id,
                                fp.size as i64,
                                fp.mtime_ns,
                                fp.inode as i64,
                                now,
                                cand.etag
                            ])?;
                            stats.refreshed += 1;
                        }
                        OfferAction::Nothing => {}
                    }
                }
            }
            Ok(stats)
        })
        .await
    }

    /// For each relative path of `source`: whether its newest journal row is delivered (or done).
    pub async fn delivered_among(
        &self,
        source: String,
        rels: Vec<PathBuf>,
    ) -> Result<Vec<bool>, JournalError> {
        self.call(move |c| {
            let mut q = c.prepare_cached(
                "SELECT state FROM objects WHERE source = ?1 AND rel_path = ?2
                 ORDER BY id DESC LIMIT 1",
            )?;
            rels.iter()
                .map(|r| {
                    let st: Option<String> = q
                        .query_row(params![source, path_bytes(r)], |row| row.get(0))
                        .optional()?;
                    Ok(matches!(st.as_deref(), Some("delivered" | "done")))
                })
                .collect()
        })
        .await
    }

    /// Objects with work to do, oldest first. `after_id` lets a one-shot run visit each object
    /// once; `respect_backoff` makes the daemon wait out each object's retry delay; `skip` are
    /// ids already in flight.
    pub async fn runnable(
        &self,
        limit: usize,
        after_id: i64,
        respect_backoff: bool,
        skip: Vec<i64>,
    ) -> Result<Vec<ObjectRow>, JournalError> {
        self.call(move |c| {
            let not_before = if respect_backoff { now_ms() } else { i64::MAX };
            let mut stmt = c.prepare_cached(RUNNABLE_SQL)?;
            let rows = stmt
                .query_map(
                    params![not_before, after_id, (limit + skip.len()) as i64],
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
        self.call(|c| {
            let now = now_ms();
            c.query_row(WAKEUP_SQL, [now], |r| r.get::<_, Option<i64>>(0))
                .map(|m| m.map(|t| (t - now).max(0)))
        })
        .await
    }

    /// Fixes the whole-object hash and the fingerprint it was computed from, and marks the row
    /// `uploading` without an upload id: from here on an upload may exist on the server that the
    /// journal does not know yet (CreateMultipartUpload sent, answer not recorded), and recovery
    /// looks for it. Returns false if the row changed meanwhile (a rescan saw a newer version),
    /// in which case nothing is written. A bucket object's `etag` is the version every later
    /// read of this upload is pinned to.
    pub async fn set_hashed(
        &self,
        id: i64,
        fp: Fingerprint,
        hashed: Hashed,
        etag: Option<String>,
    ) -> Result<bool, JournalError> {
        self.call(move |c| {
            let parts: Vec<u8> = hashed.parts.concat();
            let n = c.execute(
                "UPDATE objects SET sha256 = ?2, state = 'uploading', upload_id = NULL, updated_ms = ?6,
                        etag = COALESCE(?7, etag), ctime_ns = ?8, part_hashes = ?9
                 WHERE id = ?1 AND state = 'pending' AND size = ?3 AND mtime_ns = ?4 AND inode = ?5",
                params![id, &hashed.sha256[..], fp.size as i64, fp.mtime_ns, fp.inode as i64, now_ms(), etag, hashed.ctime_ns, parts],
            )?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn begin_multipart(
        &self,
        id: i64,
        upload_id: String,
        part_size: u64,
    ) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute(
                "UPDATE objects SET state = 'uploading', upload_id = ?2, part_size = ?3, updated_ms = ?4
                 WHERE id = ?1",
                params![id, upload_id, part_size as i64, now_ms()],
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
                "UPDATE objects SET state = 'pending', next_attempt_ms = 0, sha256 = NULL,
                        upload_id = NULL, part_size = NULL, ctime_ns = NULL, part_hashes = NULL
                 WHERE state = 'conflict'
                   AND id = (SELECT MAX(n.id) FROM objects n
                              WHERE n.source = objects.source AND n.rel_path = objects.rel_path)",
                [],
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

    pub async fn record_part(&self, id: i64, part: PartRow) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO parts (object_id, part_number, size, sha256_b64, etag)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id,
                    part.number,
                    part.size as i64,
                    part.sha256_b64,
                    part.etag
                ],
            )
            .map(drop)
        })
        .await
    }

    pub async fn parts(&self, id: i64) -> Result<Vec<PartRow>, JournalError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT part_number, size, sha256_b64, etag FROM parts
                 WHERE object_id = ?1 ORDER BY part_number",
            )?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok(PartRow {
                        number: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        sha256_b64: r.get(2)?,
                        etag: r.get(3)?,
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

    pub async fn set_state(&self, id: i64, state: State) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute(
                "UPDATE objects SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, state.as_str(), now_ms()],
            )
            .map(drop)
        })
        .await
    }

    /// Starts an object over: pending, no hash, no upload, no parts; optionally a new fingerprint.
    /// An ETag the transfer pinned itself to is forgotten (one the listing gave, shown by a
    /// non-zero ETag hash in the fingerprint, stays).
    pub async fn reset(
        &self,
        id: i64,
        fp: Option<Fingerprint>,
        why: String,
    ) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute("DELETE FROM parts WHERE object_id = ?1", [id])?;
            c.execute(
                "UPDATE objects SET state = 'pending', sha256 = NULL, upload_id = NULL,
                        part_size = NULL, last_error = ?2, updated_ms = ?3, ctime_ns = NULL,
                        part_hashes = NULL,
                        etag = CASE WHEN inode = 0 THEN NULL ELSE etag END
                 WHERE id = ?1",
                params![id, why, now_ms()],
            )?;
            if let Some(fp) = fp {
                c.execute(
                    "UPDATE objects SET size = ?2, mtime_ns = ?3, inode = ?4 WHERE id = ?1",
                    params![id, fp.size as i64, fp.mtime_ns, fp.inode as i64],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The object is in the bucket and verified. With `finished`, nothing is left to do
    /// (after_upload = keep); otherwise the after_upload action is still owed. Returns false,
    /// writing nothing, if the row no longer has fingerprint `fp` (a rescan saw a newer version
    /// of the file while this one was being sent).
    pub async fn delivered(
        &self,
        id: i64,
        fp: Fingerprint,
        sha256: [u8; 32],
        landed: Landed,
        finished: bool,
    ) -> Result<bool, JournalError> {
        self.call(move |c| {
            let now = now_ms();
            let state = if finished { State::Done } else { State::Delivered };
            let n = c.execute(
                "UPDATE objects SET state = ?2, delivered_ms = ?3, updated_ms = ?3, last_error = NULL,
                        next_attempt_ms = 0, sha256 = ?4, dest_etag = ?8, dest_version = ?9,
                        part_hashes = NULL
                 WHERE id = ?1 AND size = ?5 AND mtime_ns = ?6 AND inode = ?7",
                params![
                    id,
                    state.as_str(),
                    now,
                    &sha256[..],
                    fp.size as i64,
                    fp.mtime_ns,
                    fp.inode as i64,
                    landed.etag,
                    landed.version
                ],
            )?;
            if n == 1 {
                c.execute("DELETE FROM parts WHERE object_id = ?1", [id])?;
            }
            Ok(n == 1)
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
        self.call(move |c| {
            let now = now_ms();
            c.execute(
                "UPDATE objects SET state = ?2, last_error = ?3, updated_ms = ?4 WHERE id = ?1",
                params![id, state.as_str(), message, now],
            )?;
            c.execute("DELETE FROM parts WHERE object_id = ?1", [id])?;
            insert_error(c, now, Some(id), &message)?;
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
        self.call(move |c| {
            let now = now_ms();
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
        self.call(move |c| {
            let mut q = c.prepare_cached(
                "INSERT INTO refused (source, rel_path, reason, at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, rel_path) DO UPDATE SET reason = excluded.reason",
            )?;
            let now = now_ms();
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
            let mut q = c.prepare_cached(
                "SELECT rel_path FROM refused WHERE source = ?1
                 UNION
                 SELECT o.rel_path FROM objects o
                  WHERE o.source = ?1 AND o.state IN ('rejected', 'conflict')
                    AND o.id = (SELECT MAX(n.id) FROM objects n
                                 WHERE n.source = o.source AND n.rel_path = o.rel_path)",
            )?;
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
        self.call(move |c| {
            let now = now_ms();
            for rel in &gone {
                c.execute(
                    "DELETE FROM refused WHERE source = ?1 AND rel_path = ?2",
                    params![source, path_bytes(rel)],
                )?;
                c.execute(
                    "UPDATE objects SET state = 'vanished', updated_ms = ?3,
                            last_error = 'the source file is gone; no longer held'
                      WHERE source = ?1 AND rel_path = ?2 AND state IN ('rejected', 'conflict')",
                    params![source, path_bytes(rel), now],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Records an error that is not tied to one object (e.g. destination refused).
    pub async fn note_error(&self, message: String) -> Result<(), JournalError> {
        self.call(move |c| insert_error(c, now_ms(), None, &message))
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

    pub fn status(&self) -> Result<Status, JournalError> {
        let journal = self.path.to_path_buf();
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
            let bytes_pending: i64 = c.query_row(
                "SELECT COALESCE(SUM(size), 0) FROM objects
                 WHERE state IN ('pending', 'uploading', 'completing')",
                [],
                |r| r.get(0),
            )?;
            let bytes_delivered: i64 = c.query_row(
                "SELECT COALESCE(SUM(size), 0) FROM objects WHERE state IN ('delivered', 'done')",
                [],
                |r| r.get(0),
            )?;
            let oldest: Option<i64> = c.query_row(
                "SELECT MIN(discovered_ms) FROM objects
                 WHERE state IN ('pending', 'uploading', 'completing')",
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
            let held_sql = if has_refused {
                HELD_SQL.to_string()
            } else {
                HELD_SQL[..HELD_SQL.find("UNION ALL").unwrap_or(HELD_SQL.len())].to_string()
            };
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
            Ok(Status {
                held: Held {
                    count: count as u64,
                    last,
                },
                journal: journal.clone(),
                objects,
                bytes_pending: bytes_pending as u64,
                bytes_delivered: bytes_delivered as u64,
                oldest_pending_age_secs: oldest.map(|t| ((now_ms() - t).max(0) / 1000) as u64),
                agent,
                last_errors,
            })
        })
    }
}

/// Creates `path` 0600 if it does not exist, and makes it 0600 if it does.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    set_private(path)
}

fn set_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Which file a path names (device and inode): the journal the writer holds open must still be
/// the one at its path, or every commit goes into a file nobody will ever open again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// The journal file was removed or replaced under the running writer. Whatever the open
/// connection holds is copied next to it (`VACUUM INTO`, a consistent snapshot, created 0600),
/// and the message says what to do.
fn journal_removed(conn: &Connection, path: &Path) -> String {
    let copy = PathBuf::from(format!("{}.recovered-{}", path.display(), now_ms() / 1000));
    let saved = private_file(&copy)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])
                .map_err(|e| e.to_string())
        })
        .and_then(|_| set_private(&copy).map_err(|e| e.to_string()));
    match saved {
        Ok(()) => format!(
            "the journal {} was removed or replaced while ha-edge ran; everything it held is saved in {}: stop ha-edge, move that file to {} and start again (nothing is re-sent)",
            path.display(),
            copy.display(),
            path.display()
        ),
        Err(e) => format!(
            "the journal {} was removed or replaced while ha-edge ran, and a copy could not be saved ({e}): stop ha-edge; on restart, objects already in the bucket are checked and not duplicated (overwrite = \"own\")",
            path.display()
        ),
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), JournalError> {
    let err = |e| JournalError::from_sqlite(path, e);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if version > schema::CURRENT {
        return Err(JournalError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: schema::CURRENT,
        });
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

/// The writer thread: takes every request that is queued, runs them (see `run_group`) inside
/// one transaction, commits once (one fsync for the whole group), and only then answers them.
/// A request that fails is rolled back alone; a failed commit fails the whole group.
fn writer(
    conn: Connection,
    rx: std::sync::mpsc::Receiver<Job>,
    path: PathBuf,
    identity: FileIdentity,
) {
    // Set while the disk is full: since when, and how long to wait before the next try.
    let mut full_since: Option<std::time::Instant> = None;
    let mut wait = std::time::Duration::from_millis(500);
    // Set once the journal file is found removed: every later request fails with it.
    let mut removed: Option<String> = None;
    loop {
        let first = match rx.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(j) => j,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Idle: look anyway, so the operator hears of it at once.
                if removed.is_none() && FileIdentity::of(&path).ok() != Some(identity) {
                    let msg = journal_removed(&conn, &path);
                    tracing::error!(error = %msg, "journal removed");
                    removed = Some(msg);
                }
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Before anything is written: is the file we hold still the journal? (one stat per
        // group of requests)
        if removed.is_none() && FileIdentity::of(&path).ok() != Some(identity) {
            removed = Some(journal_removed(&conn, &path));
        }
        if let Some(msg) = &removed {
            for job in jobs.drain(..) {
                (job.finish)(Err(msg.clone()));
            }
            continue;
        }
        loop {
            match run_group(&conn, &mut jobs) {
                GroupResult::Done(outcomes) => {
                    if let Some(since) = full_since.take() {
                        tracing::warn!(
                            stalled_secs = since.elapsed().as_secs(),
                            "journal writable again; resuming"
                        );
                        wait = std::time::Duration::from_millis(500);
                    }
                    for (job, outcome) in jobs.drain(..).zip(outcomes) {
                        (job.finish)(outcome);
                    }
                    break;
                }
                GroupResult::DiskFull(detail) => {
                    // Nothing of this group was written. Everything that needs the journal
                    // waits here (intake, uploads recording their progress), so no work is
                    // done that could not be recorded; the group runs again when space returns.
                    if full_since.is_none() {
                        tracing::error!(error = %detail, "the journal's filesystem is full: all work paused until space is freed (nothing recorded so far is lost)");
                        full_since = Some(std::time::Instant::now());
                    }
                    // A known stall, not a hang: keep systemd's watchdog fed meanwhile.
                    crate::systemd::watchdog();
                    crate::systemd::status("journal filesystem full: paused");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    }
}

enum GroupResult {
    /// Committed (or failed for good): each job's outcome, in order.
    Done(Vec<Result<(), String>>),
    /// Rolled back because the disk is full; run the group again later.
    DiskFull(String),
}

/// Runs a group of jobs in one transaction. First every job runs straight in it (no savepoint,
/// so SQLite writes no statement journal); if one fails, all is rolled back and the group runs
/// again with each job in its own savepoint, so that the failing job alone is lost.
fn run_group(conn: &Connection, jobs: &mut [Job]) -> GroupResult {
    if let Err(r) = begin(conn, jobs.len()) {
        return r;
    }
    for job in jobs.iter_mut() {
        match (job.run)(conn) {
            RunResult::Ok => {}
            RunResult::DiskFull => {
                let _ = conn.execute_batch("ROLLBACK");
                return GroupResult::DiskFull("database or disk is full".into());
            }
            RunResult::Failed => {
                let _ = conn.execute_batch("ROLLBACK");
                return run_isolated(conn, jobs);
            }
        }
    }
    commit(conn, vec![None; jobs.len()])
}

fn begin(conn: &Connection, jobs: usize) -> Result<(), GroupResult> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| {
        if is_disk_full(&e) {
            GroupResult::DiskFull(e.to_string())
        } else {
            GroupResult::Done(vec![Err(e.to_string()); jobs])
        }
    })
}

/// Runs a group of jobs in one transaction, each in its own savepoint.
fn run_isolated(conn: &Connection, jobs: &mut [Job]) -> GroupResult {
    let full = |e: &rusqlite::Error| is_disk_full(e).then(|| e.to_string());
    if let Err(r) = begin(conn, jobs.len()) {
        return r;
    }
    let mut own = Vec::with_capacity(jobs.len());
    for job in jobs.iter_mut() {
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            if let Some(d) = full(&e) {
                let _ = conn.execute_batch("ROLLBACK");
                return GroupResult::DiskFull(d);
            }
            own.push(Some(e.to_string()));
            continue;
        }
        let res = (job.run)(conn);
        if res == RunResult::DiskFull {
            let _ = conn.execute_batch("ROLLBACK");
            return GroupResult::DiskFull("database or disk is full".into());
        }
        let end = if res == RunResult::Ok {
            conn.execute_batch("RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        match end {
            Ok(()) => own.push(None),
            Err(e) => {
                if let Some(d) = full(&e) {
                    let _ = conn.execute_batch("ROLLBACK");
                    return GroupResult::DiskFull(d);
                }
                own.push(Some(e.to_string()));
            }
        }
    }
    commit(conn, own)
}

/// Commits the open transaction; each job's outcome is its own error (if its savepoint could not
/// be handled) or the commit's.
fn commit(conn: &Connection, own: Vec<Option<String>>) -> GroupResult {
    let commit = conn.execute_batch("COMMIT");
    if let Err(e) = &commit {
        let _ = conn.execute_batch("ROLLBACK");
        if is_disk_full(e) {
            return GroupResult::DiskFull(e.to_string());
        }
    }
    let commit = commit.map_err(|e| e.to_string());
    GroupResult::Done(
        own.into_iter()
            .map(|o| match (&commit, o) {
                (Ok(()), None) => Ok(()),
                (Ok(()), Some(e)) => Err(e),
                (Err(e), _) => Err(e.clone()),
            })
            .collect(),
    )
}

fn insert_error(c: &Connection, now: i64, id: Option<i64>, message: &str) -> rusqlite::Result<()> {
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

fn row_to_object(r: &rusqlite::Row<'_>) -> rusqlite::Result<ObjectRow> {
    let state: String = r.get(7)?;
    let sha: Option<Vec<u8>> = r.get(8)?;
    Ok(ObjectRow {
        id: r.get(0)?,
        source: r.get(1)?,
        rel_path: PathBuf::from(std::ffi::OsString::from_vec(r.get::<_, Vec<u8>>(2)?)),
        key: r.get(3)?,
        fingerprint: Fingerprint {
            size: r.get::<_, i64>(4)? as u64,
            mtime_ns: r.get(5)?,
            inode: r.get::<_, i64>(6)? as u64,
        },
        state: state.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, e.into())
        })?,
        sha256: sha.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()),
        upload_id: r.get(9)?,
        part_size: r.get::<_, Option<i64>>(10)?.map(|n| n as u64),
        attempts: r.get(11)?,
        etag: r.get(12)?,
        prior_etag: r.get(13)?,
        ctime_ns: r.get(14)?,
        part_hashes: r.get::<_, Option<Vec<u8>>>(15)?.map(|b| {
            b.chunks_exact(32)
                .map(|c| <[u8; 32]>::try_from(c).unwrap_or_default())
                .collect()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs queued together share one transaction; one that fails is lost alone, and the others
    /// are committed (the group is run again with a savepoint per job).
    #[test]
    fn a_failing_job_is_rolled_back_alone_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        // Hold the writer so that the next three jobs are queued as one group.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        j.submit(
            move |_| {
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(())
            },
            move |r| held_tx.send(r.is_ok()).unwrap(),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for (n, sql) in [
            (1, "INSERT INTO errors (at_ms, message) VALUES (1, 'first')"),
            (2, "INSERT INTO no_such_table VALUES (1)"),
            (3, "INSERT INTO errors (at_ms, message) VALUES (3, 'third')"),
        ] {
            let tx = tx.clone();
            j.submit(
                move |c| c.execute(sql, []),
                move |r| tx.send((n, r.is_ok())).unwrap(),
            )
            .unwrap();
        }
        assert!(held_rx.recv().unwrap());
        let mut got: Vec<(i32, bool)> = (0..3).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![(1, true), (2, false), (3, true)]);
        let kept: Vec<String> = j
            .with(|c| {
                let mut st = c.prepare("SELECT message FROM errors ORDER BY at_ms")?;
                let rows = st.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .unwrap();
        assert_eq!(kept, vec!["first".to_string(), "third".to_string()]);
    }

    fn cand(p: &str, size: u64) -> Candidate {
        Candidate {
            rel_path: PathBuf::from(p),
            key: p.to_string(),
            fingerprint: Fingerprint {
                size,
                mtime_ns: 1,
                inode: 1,
            },
            etag: None,
        }
    }

    #[tokio::test]
    async fn bucket_etags_are_listed_pinned_and_forgotten_on_reset() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        // Listed with an ETag (non-zero ETag hash in the inode slot): kept across a reset.
        let listed = Candidate {
            etag: Some("\"abc\"".into()),
            ..cand("listed", 1)
        };
        // Listed without one (inode slot 0): the transfer pins one, a reset forgets it.
        let mut unlisted = cand("unlisted", 2);
        unlisted.fingerprint.inode = 0;
        j.offer("b".into(), vec![listed, unlisted.clone()], true)
            .await
            .unwrap();
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        let (l, u) = (&rows[0], &rows[1]);
        assert_eq!(l.etag.as_deref(), Some("\"abc\""));
        assert_eq!(u.etag, None);
        assert!(j
            .set_hashed(
                u.id,
                u.fingerprint,
                Hashed::whole([2; 32]),
                Some("\"pin\"".into())
            )
            .await
            .unwrap());
        assert!(j
            .set_hashed(l.id, l.fingerprint, Hashed::whole([1; 32]), None)
            .await
            .unwrap());
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        assert_eq!(rows[0].etag.as_deref(), Some("\"abc\""));
        assert_eq!(rows[1].etag.as_deref(), Some("\"pin\""));
        j.reset(l.id, None, "x".into()).await.unwrap();
        j.reset(u.id, None, "x".into()).await.unwrap();
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        assert_eq!(rows[0].etag.as_deref(), Some("\"abc\""));
        assert_eq!(rows[1].etag, None);
        // A new listing with another ETag refreshes the pending row's ETag.
        let changed = Candidate {
            etag: Some("\"def\"".into()),
            fingerprint: Fingerprint {
                inode: 7,
                ..rows[0].fingerprint
            },
            ..cand("listed", 1)
        };
        let s = j.offer("b".into(), vec![changed], true).await.unwrap();
        assert_eq!(s.refreshed, 1);
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        assert_eq!(rows[0].etag.as_deref(), Some("\"def\""));
    }

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
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        let b = rows.iter().find(|r| r.key == "b").unwrap().id;
        let fp = rows.iter().find(|r| r.key == "b").unwrap().fingerprint;
        assert!(!j
            .delivered(
                b,
                cand("b", 99).fingerprint,
                [7; 32],
                Landed::default(),
                true
            )
            .await
            .unwrap());
        assert!(j
            .delivered(b, fp, [7; 32], Landed::default(), true)
            .await
            .unwrap());
        let s = j.offer("s".into(), vec![cand("b", 3)], true).await.unwrap();
        assert_eq!(s.inserted, 1);
        let st = j.status().unwrap();
        assert_eq!(st.objects["pending"], 2);
        assert_eq!(st.objects["done"], 1);
        assert_eq!(st.bytes_pending, 8);
    }

    #[tokio::test]
    async fn state_survives_reopen_and_hash_guard_detects_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let j = Journal::open(&path).unwrap();
            j.offer("s".into(), vec![cand("a", 1)], true).await.unwrap();
            let id = j.runnable(1, 0, true, vec![]).await.unwrap()[0].id;
            let stale = Fingerprint {
                size: 9,
                mtime_ns: 1,
                inode: 1,
            };
            assert!(!j
                .set_hashed(id, stale, Hashed::whole([1; 32]), None)
                .await
                .unwrap());
            assert!(j
                .set_hashed(id, cand("a", 1).fingerprint, Hashed::whole([1; 32]), None)
                .await
                .unwrap());
            j.begin_multipart(id, "up-1".into(), 5 << 20).await.unwrap();
            j.record_part(
                id,
                PartRow {
                    number: 1,
                    size: 5 << 20,
                    sha256_b64: "x".into(),
                    etag: "\"e\"".into(),
                },
            )
            .await
            .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, State::Uploading);
        assert_eq!(rows[0].upload_id.as_deref(), Some("up-1"));
        assert_eq!(rows[0].sha256, Some([1; 32]));
        assert_eq!(j.parts(rows[0].id).await.unwrap().len(), 1);
        j.reset(rows[0].id, None, "gone".into()).await.unwrap();
        assert!(j.parts(rows[0].id).await.unwrap().is_empty());
        j.check_integrity().unwrap();
    }

    #[tokio::test]
    async fn backoff_and_cursor_filter_runnable() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        j.offer("s".into(), vec![cand("a", 1), cand("b", 1)], true)
            .await
            .unwrap();
        let rows = j.runnable(10, 0, true, vec![]).await.unwrap();
        j.retry_later(rows[0].id, 60_000, true, "later".into())
            .await
            .unwrap();
        assert_eq!(j.runnable(10, 0, true, vec![]).await.unwrap().len(), 1);
        assert_eq!(j.runnable(10, 0, false, vec![]).await.unwrap().len(), 2);
        assert_eq!(
            j.runnable(10, rows[0].id, false, vec![])
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            j.runnable(10, 0, false, vec![rows[1].id])
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(j.next_wakeup_ms().await.unwrap().is_some());
        assert_eq!(j.status().unwrap().last_errors[0].message, "later");
    }

    #[test]
    fn dispatch_queries_use_the_active_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        let plan = |sql: &'static str| {
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
        let runnable = plan(RUNNABLE_SQL);
        assert!(runnable.contains("objects_active"), "{runnable}");
        assert!(!runnable.contains("TEMP B-TREE"), "{runnable}");
        let wakeup = plan(WAKEUP_SQL);
        assert!(wakeup.contains("objects_backoff"), "{wakeup}");
    }

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
