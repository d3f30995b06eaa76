//! The journal handle: opening (permissions, pragmas, migrations), and the two ways a query
//! reaches SQLite. The daemon's journal belongs to one writer thread (`worker.rs`) fed through a
//! bounded queue: async callers wait for a queue slot (backpressure), then for the commit of the
//! group their request ran in, so a slow fsync never stalls a tokio worker. `status` and
//! `validate` use a read-only connection in place.
//!
//! # Design
//! - `open` creates the file 0600 (its directory 0700) before SQLite touches it, so the -wal and
//!   -shm files inherit that mode; sets WAL, `synchronous = FULL`, foreign keys, in-memory temp
//!   storage; migrates; and starts the writer thread with the file's (device, inode).
//! - `call` (async) takes a place in the bounded queue (`QUEUE_LIMIT`), queues a job, and awaits
//!   its reply, which comes after the group commit; `with` (blocking) does the same without a
//!   place, for one-off reads. A job may run more than once (its group is run again after a full
//!   disk or a failing neighbour), so jobs are written to be idempotent within a transaction.
//! - `open_readonly` is for `status` and `validate`: no writer, no migration, works while the
//!   daemon runs (WAL readers never block the writer).
//!
//! Must not break: a request's reply is sent only after its transaction committed; nothing in
//! here answers before the disk has it.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};

use super::model::Version;
use super::schema;
use super::worker::{self, Completion, FileIdentity, Job, RunResult};

/// Why the journal cannot be used. Every variant ends the run (exit 4): nothing may happen that
/// cannot be recorded.
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
    /// Classifies a SQLite error: damage is `Corrupt` (with what to do), anything else `Sqlite`.
    pub(super) fn from_sqlite(path: &Path, e: rusqlite::Error) -> JournalError {
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
    /// The SHA-256 of the whole source version.
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
    /// The path relative to the source root (or key below a bucket source's prefix).
    pub rel_path: PathBuf,
    /// The destination key it maps to.
    pub key: String,
    /// The version seen (a file's size, mtime, inode; an object's ETag, size, time).
    pub version: Version,
}

/// What one offer did to the journal.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OfferStats {
    /// New rows (first sightings, and new versions of finished objects).
    pub inserted: usize,
    /// Pending rows updated to the version seen now.
    pub refreshed: usize,
}

/// Requests queued for the writer thread at most; a caller beyond that waits for a slot. Large
/// enough that a full group (see `worker::MAX_GROUP`) is always queued behind the one running.
pub const QUEUE_LIMIT: usize = 2 * worker::MAX_GROUP;

/// How requests reach SQLite.
enum Backend {
    /// The daemon's journal: one thread owns the connection and group-commits requests. The
    /// semaphore bounds the queue: an async request holds one permit until it is answered.
    Writer {
        sender: std::sync::mpsc::Sender<Job>,
        slots: Arc<tokio::sync::Semaphore>,
    },
    /// `status` and `validate`: a read-only connection used in place.
    ReadOnly(Mutex<Connection>),
}

/// A handle on the journal; clones share the one writer thread.
#[derive(Clone)]
pub struct Journal {
    backend: Arc<Backend>,
    path: Arc<PathBuf>,
    clock: Clock,
    /// Offers that added or changed rows, counted once committed: the scheduler fetches again
    /// when it changed (what it prefetched may no longer go first).
    pub(super) offers: Arc<std::sync::atomic::AtomicU64>,
}

/// Where the journal's times come from (ms since the epoch): the wall clock, or in tests a
/// clock that follows tokio's paused time, so that retry delays and `runnable` agree with it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// This machine's wall clock in ms since the epoch (what the journal's times are in).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A path's raw bytes, as `rel_path` stores them (no lossy conversion).
pub(super) fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

impl Journal {
    /// Opens (creating if needed) the journal, brings its schema up to date, and starts the
    /// writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Journal::open_with_clock(path, Arc::new(now_ms))
    }

    /// `open`, with the journal's times taken from `clock`.
    pub fn open_with_clock(path: &Path, clock: Clock) -> Result<Journal, JournalError> {
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
            .spawn(move || worker::writer(conn, rx, watched, identity))
            .map_err(open_err)?;
        Ok(Journal {
            backend: Arc::new(Backend::Writer {
                sender: tx,
                slots: Arc::new(tokio::sync::Semaphore::new(QUEUE_LIMIT)),
            }),
            path: Arc::new(path.to_path_buf()),
            clock,
            offers: Arc::default(),
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
            clock: Arc::new(now_ms),
            offers: Arc::default(),
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
    pub(super) fn with<R: Send + 'static>(
        &self,
        mut f: impl FnMut(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, JournalError> {
        match &*self.backend {
            Backend::ReadOnly(conn) => {
                let guard = conn.lock().map_err(|_| JournalError::Panicked)?;
                f(&guard).map_err(|e| JournalError::from_sqlite(&self.path, e))
            }
            Backend::Writer { .. } => {
                let (tx, rx) = std::sync::mpsc::channel();
                self.submit(f, None, move |r| {
                    let _ = tx.send(r);
                })?;
                rx.recv().map_err(|_| JournalError::Panicked)?
            }
        }
    }

    /// Runs `f`; resolves once its transaction has committed.
    pub(super) async fn call<R: Send + 'static>(
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
            Backend::Writer { slots, .. } => {
                // Backpressure: wait for a place in the writer's queue.
                let slot = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| JournalError::Panicked)?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.submit(f, Some(slot), move |r| {
                    let _ = tx.send(r);
                })?;
                rx.await.map_err(|_| JournalError::Panicked)?
            }
        }
    }

    /// `call`, with the journal's time now (the caller's: the writer thread has no clock of its
    /// own in tests) passed to `f`.
    pub(super) async fn call_at<R: Send + 'static>(
        &self,
        mut f: impl FnMut(&Connection, i64) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, JournalError> {
        let now = self.now();
        self.call(move |c| f(c, now)).await
    }

    /// Queues `f` for the writer thread; `reply` gets its result after the commit. `place` is
    /// the caller's place in the bounded queue, given back once the reply is sent (the blocking
    /// `with` takes none: it is for one-off reads, and it waits for its answer anyway).
    pub(super) fn submit<R: Send + 'static>(
        &self,
        mut f: impl FnMut(&Connection) -> rusqlite::Result<R> + Send + 'static,
        place: Option<tokio::sync::OwnedSemaphorePermit>,
        reply: impl FnOnce(Result<R, JournalError>) + Send + 'static,
    ) -> Result<(), JournalError> {
        let Backend::Writer { sender, .. } = &*self.backend else {
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
                Err(e) if worker::is_disk_full(e) => RunResult::DiskFull,
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
            // The place is free before the caller hears back.
            drop(place);
            reply(out);
        });
        sender
            .send(Job { run, finish })
            .map_err(|_| JournalError::Panicked)
    }

    /// Places in the writer's queue held now (requests queued or running, not yet answered).
    #[cfg(test)]
    pub(super) fn queue_places_taken(&self) -> usize {
        match &*self.backend {
            Backend::Writer { slots, .. } => QUEUE_LIMIT - slots.available_permits(),
            Backend::ReadOnly(_) => 0,
        }
    }

    /// The journal's time now, in ms since the epoch (taken by the caller of a request, so
    /// that a test's paused clock is the one used).
    pub(super) fn now(&self) -> i64 {
        (self.clock)()
    }

    /// How many offers added or changed rows so far (in this process).
    pub fn offer_generation(&self) -> u64 {
        self.offers.load(std::sync::atomic::Ordering::Acquire)
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
}

/// Creates `path` 0600 if it does not exist, and makes it 0600 if it does.
pub(super) fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    set_private(path)
}

/// Makes `path` 0600.
pub(super) fn set_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Brings the schema up to `schema::CURRENT`, one migration per transaction; refuses a newer
/// journal.
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
    for (i, sql) in schema::MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}
