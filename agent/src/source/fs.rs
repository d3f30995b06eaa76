//! Discovery in a directory tree: an initial scan, inotify events as a latency hint, and a
//! periodic full rescan as the truth (events can be lost: queue overflow, and never for changes
//! made by another NFS client).
//!
//! A file is offered to the journal once it has *settled*: its mtime is at least `settle` old, or
//! its size and mtime have stayed the same for `settle` of this machine's clock (which also
//! copes with a file server whose clock runs ahead). Files still changing are tracked in memory
//! and re-checked when they are due, without a full rescan.
//!
//! Safety rules: a symlink is followed only if its target is a regular file inside the source
//! root; directories behind symlinks are not entered (no loops, no escapes); FIFOs, sockets and
//! devices are never opened; names that cannot be mapped to a key are refused. Each refused path
//! is logged once per process, not on every rescan.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};

use crate::config::{AfterUpload, SourceConfig};
use crate::journal::{Candidate, Fingerprint, Journal, JournalError};
use crate::keymap;

/// Candidates per journal transaction.
const OFFER_BATCH: usize = 1000;
/// Quiet time after an event before the touched paths are looked at.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// More distinct event paths than this in one burst: do a full rescan instead.
const MAX_EVENT_PATHS: usize = 2048;

/// A regular file as seen by a scan.
#[derive(Debug, Clone)]
pub struct Seen {
    pub rel: PathBuf,
    pub fp: Fingerprint,
    pub mtime: SystemTime,
}

/// A file seen but not settled yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    pub fp: Fingerprint,
    /// When this fingerprint was first seen (this machine's monotonic clock).
    pub since: Instant,
}

/// The settle rule. Returns whether the file is complete, and what to remember if it is not.
pub fn settle(
    prev: Option<&Tracked>,
    fp: Fingerprint,
    mtime: SystemTime,
    now: SystemTime,
    now_mono: Instant,
    settle: Duration,
) -> (bool, Tracked) {
    let unchanged = prev.filter(|t| t.fp == fp);
    let tracked = Tracked {
        fp,
        since: unchanged.map_or(now_mono, |t| t.since),
    };
    let old_enough = now.duration_since(mtime).is_ok_and(|age| age >= settle);
    let stable_long_enough =
        unchanged.is_some_and(|t| now_mono.saturating_duration_since(t.since) >= settle);
    (old_enough || stable_long_enough, tracked)
}

/// When a tracked file should be looked at again.
fn due(
    t: &Tracked,
    mtime: SystemTime,
    now: SystemTime,
    now_mono: Instant,
    settle: Duration,
) -> Instant {
    let by_clock = t.since + settle;
    let by_mtime = match now.duration_since(mtime) {
        Ok(age) => now_mono + settle.saturating_sub(age),
        Err(_) => by_clock,
    };
    by_clock.min(by_mtime) + Duration::from_millis(10)
}

#[derive(Debug, Default)]
pub struct ScanResult {
    pub files: Vec<Seen>,
    /// (relative path, why) of entries that will never be uploaded.
    pub refused: Vec<(PathBuf, String)>,
}

/// Walks `start` (the root, a subdirectory or one file inside `root`).
pub fn scan(cfg: &SourceConfig, root_real: &Path, start: &Path) -> ScanResult {
    let mut out = ScanResult::default();
    let root = &cfg.path;
    // A pass below the root (after an event) must not enter what a full scan would skip: a
    // directory that is excluded, or reached through a symlink.
    if start != root {
        let Ok(rel) = start.strip_prefix(root) else {
            return out;
        };
        let mut dir = root.clone();
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            dir.push(c);
            let is_last = i + 1 == comps.len();
            let meta = match std::fs::symlink_metadata(&dir) {
                Ok(m) => m,
                Err(_) => return out,
            };
            if !is_last
                && (meta.file_type().is_symlink() || cfg.exclude.is_match(rel_of(root, &dir)))
            {
                return out;
            }
        }
    }
    let walker = walkdir::WalkDir::new(start)
        .follow_links(false)
        .follow_root_links(start == root)
        .into_iter()
        .filter_entry(|e| {
            // Skip excluded directories without entering them.
            let rel = e.path().strip_prefix(root).unwrap_or(e.path());
            !(e.file_type().is_dir() && !rel.as_os_str().is_empty() && cfg.exclude.is_match(rel))
        });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                if e.io_error().map(|io| io.kind()) != Some(std::io::ErrorKind::NotFound) {
                    let rel = e
                        .path()
                        .and_then(|p| p.strip_prefix(root).ok())
                        .unwrap_or(Path::new(""));
                    out.refused
                        .push((rel.to_path_buf(), format!("cannot read: {e}")));
                }
                continue;
            }
        };
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        if !cfg.selects(rel) {
            continue;
        }
        let meta = if ft.is_symlink() {
            match std::fs::canonicalize(entry.path()) {
                Ok(target) if target.starts_with(root_real) => match std::fs::metadata(&target) {
                    Ok(m) if m.is_file() => m,
                    Ok(_) => continue, // a link to a directory inside the root: its files are found there
                    Err(e) => {
                        out.refused.push((
                            rel.to_path_buf(),
                            format!("cannot read symlink target: {e}"),
                        ));
                        continue;
                    }
                },
                Ok(_) => {
                    out.refused.push((
                        rel.to_path_buf(),
                        "symlink points outside the source root".into(),
                    ));
                    continue;
                }
                Err(e) => {
                    out.refused
                        .push((rel.to_path_buf(), format!("broken or looping symlink: {e}")));
                    continue;
                }
            }
        } else if ft.is_file() {
            match entry.metadata() {
                Ok(m) => m,
                Err(_) => continue, // vanished between readdir and stat
            }
        } else {
            out.refused.push((
                rel.to_path_buf(),
                "not a regular file (FIFO, socket or device)".into(),
            ));
            continue;
        };
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        out.files.push(Seen {
            rel: rel.to_path_buf(),
            fp: Fingerprint::of(&meta),
            mtime,
        });
    }
    out
}

fn rel_of<'a>(root: &Path, p: &'a Path) -> &'a Path {
    p.strip_prefix(root).unwrap_or(p)
}

/// Counts of one discovery pass, for `--once` summaries and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct SourceReport {
    pub seen: usize,
    pub offered: usize,
    pub unsettled: usize,
    pub refused: usize,
}

pub struct FsSource {
    cfg: SourceConfig,
    root_real: PathBuf,
    prefix: String,
    journal: Journal,
    wake: Arc<Notify>,
    tracked: HashMap<PathBuf, (Tracked, Instant)>,
    warned: HashSet<PathBuf>,
}

impl FsSource {
    pub fn new(cfg: SourceConfig, prefix: String, journal: Journal, wake: Arc<Notify>) -> FsSource {
        let root_real = std::fs::canonicalize(&cfg.path).unwrap_or_else(|_| cfg.path.clone());
        FsSource {
            cfg,
            root_real,
            prefix,
            journal,
            wake,
            tracked: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// One full scan; returns what it found. Used by `--once` and at daemon start.
    pub async fn scan_once(&mut self) -> Result<SourceReport, JournalError> {
        let start = self.cfg.path.clone();
        self.pass(&start, true).await
    }

    /// Runs until `stop` turns true.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<SourceReport, JournalError> {
        let (tx, mut rx) = mpsc::channel::<PathBuf>(4096);
        let overflow = Arc::new(AtomicBool::new(false));
        let watcher = self.watch(tx, overflow.clone());
        let name = self.cfg.name.clone();
        match &watcher {
            Some(_) => {
                tracing::info!(source = %name, path = %self.cfg.path.display(), rescan = %humantime::format_duration(self.cfg.rescan_interval), "watching with inotify events and periodic rescans")
            }
            None => {
                tracing::warn!(source = %name, path = %self.cfg.path.display(), rescan = %humantime::format_duration(self.cfg.rescan_interval), "inotify unavailable; discovering by periodic rescans only")
            }
        }
        let mut total = self.scan_once().await?;
        let mut next_rescan = Instant::now() + self.cfg.rescan_interval;
        let mut pending: HashSet<PathBuf> = HashSet::new();
        loop {
            let next_due = self.tracked.values().map(|(_, d)| *d).min();
            let wake_at = next_due.map_or(next_rescan, |d| d.min(next_rescan));
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(wake_at.into()) => {
                    let now = Instant::now();
                    if now >= next_rescan || overflow.swap(false, Ordering::Relaxed) {
                        let r = self.scan_once().await?;
                        total.offered += r.offered;
                        next_rescan = now + self.cfg.rescan_interval;
                    } else {
                        let due: Vec<PathBuf> = self.tracked.iter()
                            .filter(|(_, (_, d))| *d <= now)
                            .map(|(p, _)| self.cfg.path.join(p))
                            .collect();
                        for p in due {
                            total.offered += self.pass(&p, false).await?.offered;
                        }
                    }
                }
                Some(path) = rx.recv() => {
                    pending.insert(path);
                    // Debounce: gather the rest of the burst.
                    let until = tokio::time::Instant::now() + DEBOUNCE;
                    while let Ok(Some(p)) = tokio::time::timeout_at(until, rx.recv()).await {
                        if pending.len() < MAX_EVENT_PATHS { pending.insert(p); } else { overflow.store(true, Ordering::Relaxed); }
                    }
                    if overflow.swap(false, Ordering::Relaxed) {
                        pending.clear();
                        total.offered += self.scan_once().await?.offered;
                        next_rescan = Instant::now() + self.cfg.rescan_interval;
                    } else {
                        for p in std::mem::take(&mut pending) {
                            if p.starts_with(&self.cfg.path) {
                                total.offered += self.pass(&p, false).await?.offered;
                            }
                        }
                    }
                }
            }
        }
        drop(watcher);
        Ok(total)
    }

    fn watch(
        &self,
        tx: mpsc::Sender<PathBuf>,
        overflow: Arc<AtomicBool>,
    ) -> Option<notify::RecommendedWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let handler = move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if ev.need_rescan() {
                    overflow.store(true, Ordering::Relaxed);
                }
                if matches!(ev.kind, EventKind::Access(_)) {
                    return;
                }
                for p in ev.paths {
                    if tx.try_send(p).is_err() {
                        overflow.store(true, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => overflow.store(true, Ordering::Relaxed),
        };
        let mut w = notify::recommended_watcher(handler).ok()?;
        w.watch(&self.cfg.path, RecursiveMode::Recursive).ok()?;
        Some(w)
    }

    /// Scans `start`, applies the settle rule and offers settled files to the journal.
    async fn pass(&mut self, start: &Path, full: bool) -> Result<SourceReport, JournalError> {
        let (cfg, root_real, start_owned) = (
            self.cfg.clone(),
            self.root_real.clone(),
            start.to_path_buf(),
        );
        let result = tokio::task::spawn_blocking(move || scan(&cfg, &root_real, &start_owned))
            .await
            .map_err(|_| JournalError::Panicked)?;
        let mut report = SourceReport {
            seen: result.files.len(),
            ..Default::default()
        };
        for (rel, why) in result.refused {
            report.refused += 1;
            if self.warned.insert(rel.clone()) {
                tracing::warn!(source = %self.cfg.name, path = %rel.display(), reason = %why, "refused: will not upload");
            }
        }
        let now = SystemTime::now();
        let now_mono = Instant::now();
        let mut seen_now: HashSet<PathBuf> = HashSet::new();
        let mut batch = Vec::new();
        for s in result.files {
            let key = match keymap::object_key(&self.prefix, &s.rel) {
                Ok(k) => k,
                Err(why) => {
                    report.refused += 1;
                    if self.warned.insert(s.rel.clone()) {
                        tracing::warn!(source = %self.cfg.name, path = ?s.rel, reason = %why, "refused: name cannot be an object key");
                    }
                    continue;
                }
            };
            if full {
                seen_now.insert(s.rel.clone());
            }
            let prev = self.tracked.get(&s.rel).map(|(t, _)| t);
            let (ready, t) = settle(prev, s.fp, s.mtime, now, now_mono, self.cfg.settle);
            if ready {
                self.tracked.remove(&s.rel);
                batch.push(Candidate {
                    rel_path: s.rel,
                    key,
                    fingerprint: s.fp,
                });
                if batch.len() >= OFFER_BATCH {
                    report.offered += self.offer(std::mem::take(&mut batch)).await?;
                }
            } else {
                let d = due(&t, s.mtime, now, now_mono, self.cfg.settle);
                self.tracked.insert(s.rel, (t, d));
            }
        }
        if !batch.is_empty() {
            report.offered += self.offer(batch).await?;
        }
        if full {
            // Forget tracked files that disappeared.
            self.tracked.retain(|p, _| seen_now.contains(p));
        } else if start != self.cfg.path {
            // A single-path pass for a file that is gone.
            if let Ok(rel) = start.strip_prefix(&self.cfg.path) {
                if !start.exists() {
                    self.tracked.remove(rel);
                }
            }
        }
        report.unsettled = self.tracked.len();
        Ok(report)
    }

    async fn offer(&self, batch: Vec<Candidate>) -> Result<usize, JournalError> {
        let stats = self.journal.offer(self.cfg.name.clone(), batch).await?;
        let n = stats.inserted + stats.refreshed;
        if n > 0 {
            tracing::debug!(source = %self.cfg.name, new = stats.inserted, changed = stats.refreshed, "queued settled files");
            self.wake.notify_one();
        }
        Ok(stats.inserted)
    }
}

/// What happened to the source file after delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterResult {
    Kept,
    Deleted,
    Moved,
    /// The file changed since it was delivered: left alone (the new version is found by a scan).
    LeftChanged,
    /// Already gone (a previous attempt finished before a crash).
    Gone,
}

/// Applies `after_upload` to a delivered file, only if it is still the version delivered.
pub fn after_upload(
    root: &Path,
    rel: &Path,
    action: &AfterUpload,
    fp: Fingerprint,
) -> std::io::Result<AfterResult> {
    let path = root.join(rel);
    if matches!(action, AfterUpload::Keep) {
        return Ok(AfterResult::Kept);
    }
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AfterResult::Gone),
        Err(e) => return Err(e),
    };
    if Fingerprint::of(&meta) != fp {
        return Ok(AfterResult::LeftChanged);
    }
    match action {
        AfterUpload::Keep => Ok(AfterResult::Kept),
        AfterUpload::Delete => {
            std::fs::remove_file(&path)?;
            Ok(AfterResult::Deleted)
        }
        AfterUpload::MoveTo(dir) => {
            let dest = dir.join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::rename(&path, &dest) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    // Another filesystem: copy, make it durable, then remove the original.
                    let tmp = dest.with_extension("ha-edge-partial");
                    std::fs::copy(&path, &tmp)?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    std::fs::rename(&tmp, &dest)?;
                    std::fs::remove_file(&path)?;
                }
                Err(e) => return Err(e),
            }
            Ok(AfterResult::Moved)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: Fingerprint = Fingerprint {
        size: 1,
        mtime_ns: 1,
        inode: 1,
    };
    const S: Duration = Duration::from_secs(30);

    #[test]
    fn old_mtime_is_settled_at_first_sight() {
        let now = SystemTime::now();
        let (ready, _) = settle(
            None,
            FP,
            now - Duration::from_secs(31),
            now,
            Instant::now(),
            S,
        );
        assert!(ready);
    }

    #[test]
    fn fresh_file_waits_until_stable_for_settle() {
        let now = SystemTime::now();
        let t0 = Instant::now();
        let (ready, t) = settle(None, FP, now, now, t0, S);
        assert!(!ready);
        let (ready, t) = settle(
            Some(&t),
            FP,
            now,
            now + Duration::from_secs(10),
            t0 + Duration::from_secs(10),
            S,
        );
        assert!(!ready);
        assert_eq!(t.since, t0);
        // A change restarts the clock.
        let grown = Fingerprint { size: 2, ..FP };
        let (ready, t2) = settle(
            Some(&t),
            grown,
            now,
            now + Duration::from_secs(29),
            t0 + Duration::from_secs(29),
            S,
        );
        assert!(!ready);
        assert_eq!(t2.since, t0 + Duration::from_secs(29));
        let (ready, _) = settle(
            Some(&t2),
            grown,
            now,
            now + Duration::from_secs(60),
            t0 + Duration::from_secs(60),
            S,
        );
        assert!(ready);
    }

    #[test]
    fn mtime_in_the_future_falls_back_to_local_clock() {
        let now = SystemTime::now();
        let t0 = Instant::now();
        let future = now + Duration::from_secs(3600);
        let (ready, t) = settle(None, FP, future, now, t0, S);
        assert!(!ready);
        let (ready, _) = settle(Some(&t), FP, future, now + S, t0 + S, S);
        assert!(ready);
    }

    #[test]
    fn zero_settle_takes_everything() {
        let now = SystemTime::now();
        assert!(settle(None, FP, now, now, Instant::now(), Duration::ZERO).0);
    }
}
