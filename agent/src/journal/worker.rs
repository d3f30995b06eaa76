//! The writer thread: owns the daemon's connection, takes every request that is queued, runs
//! them in one transaction and commits once (one fsync for the group), and only then answers.
//! A request that fails is rolled back alone; a full disk pauses everything and retries the same
//! group; a journal file removed or replaced under it is saved and every later request fails.
//!
//! Must not break: a job's `finish` runs only after the transaction holding its writes has
//! committed (or failed for good), and a group that hit a full disk is run again whole.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::store::{now_ms, private_file, set_private};

/// Work for the writer thread: `run` executes inside the group's transaction and may run more
/// than once (the whole group is run again after the disk was full or when another job of the
/// group failed); `finish` gets the outcome once the enclosing transaction has committed or
/// failed for good.
pub(super) struct Job {
    /// The request's writes, run inside the group's transaction (perhaps more than once).
    pub(super) run: Box<dyn FnMut(&Connection) -> RunResult + Send>,
    /// Called once with the outcome, after the commit.
    pub(super) finish: Completion,
}
/// Hands a job's final outcome to its caller.
pub(super) type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

/// What one run of a job did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum RunResult {
    Ok,
    Failed,
    /// The database or its filesystem is full: nothing can be written until space returns.
    DiskFull,
}

/// SQLITE_FULL: nothing can be written until space returns.
pub(super) fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Requests taken into one transaction at most.
pub(super) const MAX_GROUP: usize = 512;

/// Which file a path names (device and inode): the journal the writer holds open must still be
/// the one at its path, or every commit goes into a file nobody will ever open again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    /// The device and inode `path` names now.
    pub(super) fn of(path: &Path) -> std::io::Result<FileIdentity> {
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

/// The writer thread: takes every request that is queued, runs them (see `run_group`) inside
/// one transaction, commits once (one fsync for the whole group), and only then answers them.
/// A request that fails is rolled back alone; a failed commit fails the whole group.
#[allow(clippy::needless_pass_by_value)] // the thread's body: it owns what it is given
pub(super) fn writer(
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

/// What became of a group of jobs.
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

/// Opens the group's write transaction.
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
    let began = std::time::Instant::now();
    let commit = conn.execute_batch("COMMIT");
    crate::telemetry::metrics::agent()
        .journal_commit
        .observe(began.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use crate::journal::store::QUEUE_LIMIT;
    use crate::journal::Journal;

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
            None,
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
                None,
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

    /// The queue to the writer is bounded: while the writer is busy, at most QUEUE_LIMIT
    /// requests wait in it and later callers wait for a place (they are not queued, so memory
    /// stays bounded however fast sources offer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_to_the_writer_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db")).unwrap();
        // Hold the writer until told to go on.
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        j.submit(
            move |_| {
                let _ = go_rx.lock().unwrap().recv();
                Ok(())
            },
            None,
            move |r| {
                let _ = held_tx.send(r.is_ok());
            },
        )
        .unwrap();
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..QUEUE_LIMIT + 50 {
            let j = j.clone();
            callers.spawn(async move { j.note_error("x".into()).await });
        }
        // Every caller has either taken a place or is waiting for one.
        let placed = |j: &Journal| j.queue_places_taken();
        for _ in 0..1000 {
            if placed(&j) == QUEUE_LIMIT {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(placed(&j), QUEUE_LIMIT, "requests queued beyond the limit");
        go_tx.send(()).unwrap();
        assert!(held_rx.await.unwrap());
        let mut done = 0;
        while let Some(r) = callers.join_next().await {
            r.unwrap().unwrap();
            done += 1;
        }
        assert_eq!(done, QUEUE_LIMIT + 50, "every waiting caller got its turn");
        assert_eq!(placed(&j), 0);
    }
}
