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
//!
//! # Design
//! - A pass walks `start` (the root on a full pass, a touched path after an event) in a blocking
//!   task that streams chunks of at most `SCAN_CHUNK` files; the async side decides per file with
//!   `complete::next` and offers complete files in batches of `OFFER_BATCH`.
//! - Between passes it remembers only what is unfinished: files still settling (with when to
//!   look again), files waiting for their marker, FHIR manifests held until their files are
//!   delivered; a full pass forgets what is gone and releases held paths whose files are gone.
//! - Refusals (names that cannot be keys, non-regular files, the live journal) are logged once
//!   per process and journaled for `status`.
//!
//! Must not break: nothing is offered before it is complete (see `complete.rs`), a refused path is
//! never offered, and the rescan stays the truth whatever inotify says.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};

use crate::config::{AfterUpload, Completion, OnChange, SourceConfig, WatchMode};
use crate::journal::{Candidate, Journal, JournalError};
use crate::keymap;
use crate::version::Version;

/// When a file is complete (pure).
mod complete;
use complete::{due, next, settle, Next, Tracked};
pub use complete::{manifest_expect, parse_manifest, study_version, Manifest, MANIFEST};

/// The completion object written after the last file of a study (`{dir}/_complete.json`).
pub const STUDY_COMPLETE: &str = "_complete.json";
/// Candidates per journal transaction.
const OFFER_BATCH: usize = 1000;
/// Files handed over by the directory walk at a time.
const SCAN_CHUNK: usize = 1000;
/// Quiet time after an event before the touched paths are looked at.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// More distinct event paths than this in one burst: do a full rescan instead.
const MAX_EVENT_PATHS: usize = 2048;

/// A regular file as seen by a scan.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The path relative to the source root.
    pub rel: PathBuf,
    /// The version seen.
    pub fp: Version,
    /// Its mtime (for the settle rule).
    pub mtime: SystemTime,
    /// False while the completion marker this file needs is missing (always true without one).
    pub marked: bool,
}

/// One chunk of a walk.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Regular files (and symlinks to regular files inside the root).
    pub files: Vec<Seen>,
    /// (relative path, why) of entries that will never be uploaded.
    pub refused: Vec<(PathBuf, String)>,
}

/// Walks `start` (the root, a subdirectory or one file inside the root), handing over what it
/// finds in chunks of at most `chunk` files, so that memory stays flat however large the tree.
/// `emit` returns false to stop the walk.
pub fn scan_into(
    cfg: &SourceConfig,
    root_real: &Path,
    start: &Path,
    chunk: usize,
    emit: &mut dyn FnMut(ScanResult) -> bool,
) {
    let root = &cfg.path;
    // A pass below the root (after an event) must not enter what a full scan would skip: a
    // directory that is excluded, or reached through a symlink.
    if start != root {
        let Ok(rel) = start.strip_prefix(root) else {
            return;
        };
        let mut dir = root.clone();
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            dir.push(c);
            let is_last = i + 1 == comps.len();
            let meta = match std::fs::symlink_metadata(&dir) {
                Ok(m) => m,
                Err(_) => return,
            };
            if !is_last
                && (meta.file_type().is_symlink() || cfg.exclude.is_match(rel_of(root, &dir)))
            {
                return;
            }
        }
    }
    let mut out = ScanResult::default();
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
                    let why = e
                        .io_error()
                        .map_or("a filesystem loop".to_string(), |io| io.kind().to_string());
                    out.refused
                        .push((rel.to_path_buf(), format!("cannot read: {why}")));
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
        // Markers are signals, never uploaded; the files they complete are looked up here, on
        // the walk's blocking thread.
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if cfg.complete_when.is_marker(name) {
            continue;
        }
        let marked = cfg.complete_when.marker_for(name).is_none_or(|m| {
            let dir = entry.path().parent().unwrap_or(root);
            std::fs::symlink_metadata(dir.join(m)).is_ok()
        });
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        out.files.push(Seen {
            rel: rel.to_path_buf(),
            fp: Version::of_file(&meta),
            mtime,
            marked,
        });
        if out.files.len() >= chunk && !emit(std::mem::take(&mut out)) {
            return;
        }
    }
    emit(out);
}

/// `p` relative to `root` (p itself if it is not below it).
fn rel_of<'a>(root: &Path, p: &'a Path) -> &'a Path {
    p.strip_prefix(root).unwrap_or(p)
}

/// Counts of one discovery pass, for `--once` summaries and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct SourceReport {
    /// Files (or objects) seen.
    pub seen: usize,
    /// New or changed ones offered to the journal.
    pub offered: usize,
    /// Not complete yet: still settling, waiting for a marker, or a manifest held back.
    pub unsettled: usize,
    /// Paths refused (name, type, the journal itself).
    pub refused: usize,
    /// FHIR manifests held back until the files they list are delivered.
    pub held: usize,
    /// Listings that failed (bucket sources).
    pub failed: usize,
}

/// Filesystem types where inotify cannot see every change (other clients' writes), by statfs
/// magic number.
pub fn network_fs_name(magic: u32) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "nfs",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x517B => "smb",
        0x6573_5546 => "fuse",
        0x00C3_6400 => "ceph",
        0x0102_1997 => "9p",
        0x5346_414F => "afs",
        0x4750_4653 => "gpfs",
        0x0BD0_0BD0 => "lustre",
        0x0116_1970 => "gfs2",
        _ => return None,
    })
}

/// The statfs magic number of the filesystem holding `path`.
#[allow(unsafe_code)]
fn fs_magic(path: &Path) -> Option<u32> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // The magic numbers are 32-bit; f_type is wider on some targets.
    #[allow(clippy::cast_possible_truncation)]
    (rc == 0).then_some(st.f_type as u32)
}

/// The discovery mode for a source, and why (for the log).
pub fn decide_watch(mode: WatchMode, magic: Option<u32>) -> (WatchMode, String) {
    match mode {
        WatchMode::Poll => (WatchMode::Poll, "configured".into()),
        WatchMode::Events => (WatchMode::Events, "configured".into()),
        WatchMode::Auto => match magic {
            Some(m) => match network_fs_name(m) {
                Some(name) => (
                    WatchMode::Poll,
                    format!("{name} filesystem: inotify does not see writes by other clients"),
                ),
                None => (WatchMode::Events, format!("local filesystem (type {m:#x})")),
            },
            None => (
                WatchMode::Poll,
                "filesystem type unknown (statfs failed)".into(),
            ),
        },
    }
}

/// Whether a manifest may be offered now.
enum Gate {
    Release,
    Hold,
    /// The manifest can never be published as it is (why): refused, reported once.
    Refuse(String),
}

/// One directory source: its settings, what it tracks between passes, and where it offers.
pub struct FsSource {
    cfg: SourceConfig,
    root_real: PathBuf,
    prefix: String,
    journal: Journal,
    wake: Arc<Notify>,
    tracked: HashMap<PathBuf, (Tracked, Instant)>,
    warned: HashSet<PathBuf>,
    /// Files waiting for their completion marker, as of the last full pass.
    awaiting_marker: HashSet<PathBuf>,
    /// Manifests held back, as of the last pass that looked at them.
    held: HashSet<PathBuf>,
    /// The live journal's files (database, -wal, -shm, -journal), resolved: never uploaded,
    /// whatever name or symlink leads to them.
    own_files: Vec<PathBuf>,
    /// When each file still settling was first seen, and whether its long wait was logged.
    first_seen: HashMap<PathBuf, (Instant, bool)>,
    /// What `status` was last told of the files settling (count, oldest in s since the epoch).
    published: Option<(usize, i64)>,
}

impl FsSource {
    /// A source for `cfg`, mapping paths under the key `prefix`; `wake` tells the scheduler that
    /// something was offered.
    pub fn new(cfg: SourceConfig, prefix: String, journal: Journal, wake: Arc<Notify>) -> FsSource {
        let root_real = std::fs::canonicalize(&cfg.path).unwrap_or_else(|_| cfg.path.clone());
        let db = crate::config::resolve_lenient(journal.path());
        let own_files = ["", "-wal", "-shm", "-journal"]
            .iter()
            .map(|s| PathBuf::from(format!("{}{s}", db.display())))
            .collect();
        FsSource {
            own_files,
            cfg,
            root_real,
            prefix,
            journal,
            wake,
            tracked: HashMap::new(),
            warned: HashSet::new(),
            awaiting_marker: HashSet::new(),
            held: HashSet::new(),
            first_seen: HashMap::new(),
            published: None,
        }
    }

    /// Logs a file first seen (debug) and, once, one that waits longer than twice its settle
    /// time (info): a file that keeps changing, or a writer that never finishes.
    fn note_settling(&mut self, rel: &Path, now: Instant) {
        let (name, settle) = (&self.cfg.name, self.cfg.settle);
        let (first, logged) = self.first_seen.entry(rel.to_path_buf()).or_insert_with(|| {
            tracing::debug!(source = %name, path = %crate::phi::shown(rel), settle = %humantime::format_duration(settle), "seen; waiting for it to settle");
            (now, false)
        });
        let waited = now.saturating_duration_since(*first);
        if !*logged && waited > settle * 2 {
            *logged = true;
            tracing::info!(source = %name, path = %crate::phi::shown(rel), waited_secs = waited.as_secs(), settle = %humantime::format_duration(settle), "still settling after twice its settle time (still being written?)");
        }
    }

    /// Tells `status` how many files are settling and since when the oldest (when that
    /// changed).
    async fn publish_settling(&mut self) -> Result<(), JournalError> {
        let now = Instant::now();
        let settling: Vec<&(Instant, bool)> = self
            .first_seen
            .iter()
            .filter(|(p, _)| self.tracked.contains_key(*p) && !self.held.contains(*p))
            .map(|(_, v)| v)
            .collect();
        let oldest = settling
            .iter()
            .map(|(t, _)| now.saturating_duration_since(*t))
            .max()
            .unwrap_or_default();
        let since_s =
            crate::receipts::record::now_ms() / 1000 - i64::try_from(oldest.as_secs()).unwrap_or(0);
        let facts = (
            settling.len(),
            if settling.is_empty() { 0 } else { since_s },
        );
        // Within a second or two is the same fact: no journal write per pass.
        if self
            .published
            .is_some_and(|(n, t)| n == facts.0 && (t - facts.1).abs() <= 2)
        {
            return Ok(());
        }
        self.published = Some(facts);
        self.journal
            .set_agent_state(
                format!("settling.{}", self.cfg.name),
                format!("{{\"count\":{},\"oldest_since\":{}}}", facts.0, facts.1),
            )
            .await
    }

    /// Held paths (refused, rejected, in conflict) whose file the operator removed are no
    /// longer held: otherwise `status` would stay degraded for a file that is not there.
    async fn release_gone_held(&mut self) -> Result<(), JournalError> {
        let held = self.journal.held_paths(self.cfg.name.clone()).await?;
        let root = self.root_real.clone();
        // A file moved to quarantine_dir is still held while it is there.
        let quarantine = self.cfg.validation.quarantine_dir.clone();
        let gone: Vec<PathBuf> = held
            .into_iter()
            .filter(|rel| {
                std::fs::symlink_metadata(root.join(rel)).is_err()
                    && quarantine
                        .as_ref()
                        .is_none_or(|q| std::fs::symlink_metadata(q.join(rel)).is_err())
            })
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for rel in &gone {
            self.warned.remove(rel);
        }
        tracing::info!(source = %self.cfg.name, paths = gone.len(), "held files removed by the operator: no longer held");
        self.journal.release_held(self.cfg.name.clone(), gone).await
    }

    /// The key of `rel` (with `{sha256}` in the template: of the content hashed, else a
    /// stand-in that only checks the rest of the key).
    fn key(&self, rel: &Path, sha256: Option<[u8; 32]>) -> Result<String, keymap::KeyError> {
        let input = crate::phi::KeyInput {
            source: &self.cfg.name,
            rel,
            discovered: jiff::Timestamp::now(),
            sha256: sha256.or(Some([0; 32])),
        };
        keymap::key_of(&self.prefix, self.cfg.key_template.as_ref(), &input)
            .and_then(|k| keymap::unreserved(k, self.cfg.reserved_prefix.as_deref()))
    }

    /// `{sha256}` templates: the key of a settled file from its content, if it is still the
    /// version seen (else None: it changed, and is looked at again).
    async fn content_key(&self, rel: &Path, seen: &Version) -> Option<String> {
        let (root, rel_owned, seen) = (self.root_real.clone(), rel.to_path_buf(), seen.clone());
        let sha = tokio::task::spawn_blocking(move || -> std::io::Result<Option<[u8; 32]>> {
            use std::io::Read;
            // Opened as the uploader opens it: no symlink out of the root, regular files only,
            // never blocking on a FIFO put in its place.
            let (mut f, _) = crate::sink::read::open_pinned(&root, &root.join(&rel_owned), &seen)
                .map_err(std::io::Error::other)?;
            let mut h = crate::hash::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let now = Version::of_file(&f.metadata()?);
            Ok((now == seen).then(|| h.finalize()))
        })
        .await
        .ok()?
        .ok()??;
        self.key(rel, Some(sha)).ok()
    }

    /// Whether a path (absolute, inside the root) is a completion marker.
    fn is_marker(&self, p: &Path) -> bool {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| self.cfg.complete_when.is_marker(n))
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
        let name = self.cfg.name.clone();
        let (mode, why) = decide_watch(self.cfg.watch, fs_magic(&self.cfg.path));
        let watcher = match mode {
            WatchMode::Events => self.watch(tx, overflow.clone()),
            _ => None,
        };
        let interval = match (mode, &watcher) {
            (WatchMode::Events, Some(_)) => {
                tracing::info!(source = %name, path = %self.cfg.path.display(), reason = %why, rescan = %humantime::format_duration(self.cfg.rescan_interval), "watching with inotify events and periodic rescans");
                self.cfg.rescan_interval
            }
            (WatchMode::Events, None) => {
                tracing::warn!(source = %name, path = %self.cfg.path.display(), poll = %humantime::format_duration(self.cfg.poll_interval), "inotify unavailable; polling instead");
                self.cfg.poll_interval
            }
            _ => {
                tracing::info!(source = %name, path = %self.cfg.path.display(), reason = %why, poll = %humantime::format_duration(self.cfg.poll_interval), "polling (full scans, no events)");
                self.cfg.poll_interval
            }
        };
        let mut total = self.scan_once().await?;
        let mut next_rescan = Instant::now() + interval;
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
                        next_rescan = now + interval;
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
                        next_rescan = Instant::now() + interval;
                    } else {
                        let mut paths: HashSet<PathBuf> = HashSet::new();
                        for p in std::mem::take(&mut pending) {
                            // A study is looked at whole; a marker completes files next to it
                            // (or, with stable_dir, the study next to it): look at its directory.
                            let study = p
                                .strip_prefix(&self.cfg.path)
                                .ok()
                                .and_then(|rel| self.cfg.complete_when.study_of(rel))
                                .map(|d| self.cfg.path.join(d));
                            let marker_study = match &self.cfg.complete_when {
                                Completion::StableDir { marker: Some((pre, suf)), .. } if self.is_marker(&p) => {
                                    p.file_name().and_then(|n| n.to_str()).and_then(|n| {
                                        let dir = n.strip_prefix(pre.as_str())?.strip_suffix(suf.as_str())?;
                                        Some(p.with_file_name(dir))
                                    })
                                }
                                _ => None,
                            };
                            match (study.or(marker_study), p.parent()) {
                                (Some(d), _) => paths.insert(d),
                                (None, Some(dir)) if self.is_marker(&p) => paths.insert(dir.to_path_buf()),
                                _ => paths.insert(p),
                            };
                        }
                        for p in paths {
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

    /// Starts inotify on the tree (if the mode says so); events are sent as touched paths.
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
        // The walk runs on a blocking thread and hands over chunks: memory stays flat however
        // large the tree.
        let (tx, mut rx) = mpsc::channel::<ScanResult>(2);
        let walk = tokio::task::spawn_blocking(move || {
            scan_into(&cfg, &root_real, &start_owned, SCAN_CHUNK, &mut |chunk| {
                tx.blocking_send(chunk).is_ok()
            })
        });
        let mut report = SourceReport::default();
        let now = SystemTime::now();
        let now_mono = Instant::now();
        // Only paths this source remembers something about (tracked, held, awaiting a marker).
        let mut seen_now: HashSet<PathBuf> = HashSet::new();
        let mut awaiting_now: HashSet<PathBuf> = HashSet::new();
        let mut batch = Vec::new();
        // `stable_dir`: the study being gathered (the walk is depth-first, so a study's files
        // come together), and the studies holding a refused path in this pass.
        let mut study: Option<(PathBuf, Vec<(Seen, String)>)> = None;
        let mut refused_studies: HashSet<PathBuf> = HashSet::new();
        while let Some(chunk) = rx.recv().await {
            report.seen += chunk.files.len();
            // Refusals seen for the first time in this process: logged once, and journaled
            // for `status`.
            let mut newly: Vec<(PathBuf, String)> = Vec::new();
            for (rel, why) in chunk.refused {
                if let Some(d) = self.cfg.complete_when.study_of(&rel) {
                    refused_studies.insert(d);
                }
                report.refused += 1;
                if self.warned.insert(rel.clone()) {
                    tracing::warn!(source = %self.cfg.name, path = %crate::phi::shown(&rel), reason = %why, "refused: will not upload");
                    newly.push((rel, why));
                }
            }
            for s in chunk.files {
                let file_name = s.rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let own = self.root_real.join(&s.rel);
                let refusal = if self.own_files.contains(&own) {
                    Err("it is ha-edge's own live journal".to_string())
                } else {
                    self.key(&s.rel, None)
                        .map_err(|why| format!("name cannot be an object key: {why}"))
                };
                let in_study = self.cfg.complete_when.study_of(&s.rel);
                if let Some(d) = &in_study {
                    if study.as_ref().is_some_and(|(cur, _)| cur != d) {
                        let (dir, files) = study.take().expect("checked");
                        let refused = refused_studies.contains(&dir);
                        report.offered += self
                            .close_study(dir, files, refused, full, &mut seen_now)
                            .await?;
                    }
                    if study.is_none() {
                        study = Some((d.clone(), Vec::new()));
                    }
                }
                let key = match refusal {
                    Ok(k) => k,
                    Err(why) => {
                        report.refused += 1;
                        if let Some(d) = in_study {
                            refused_studies.insert(d);
                        }
                        if self.warned.insert(s.rel.clone()) {
                            tracing::warn!(source = %self.cfg.name, path = %crate::phi::shown(&s.rel), reason = %why, "refused: will not upload");
                            newly.push((s.rel.clone(), why));
                        }
                        continue;
                    }
                };
                if in_study.is_some() {
                    if let Some((_, files)) = study.as_mut() {
                        files.push((s, key));
                    }
                    continue;
                }
                if full
                    && (self.tracked.contains_key(&s.rel)
                        || self.held.contains(&s.rel)
                        || self.awaiting_marker.contains(&s.rel))
                {
                    seen_now.insert(s.rel.clone());
                }
                let prev = self.tracked.get(&s.rel).map(|(t, _)| t);
                let (settled, t) = settle(prev, &s.fp, s.mtime, now, now_mono, self.cfg.settle);
                let mut step = next(s.marked, settled, &self.cfg.complete_when, file_name);
                if step == Next::AwaitMarker {
                    awaiting_now.insert(s.rel.clone());
                    self.awaiting_marker.insert(s.rel.clone());
                    continue;
                }
                self.awaiting_marker.remove(&s.rel);
                if step == Next::CheckManifest {
                    match self.manifest_gate(&s.rel).await? {
                        Gate::Release => {
                            self.held.remove(&s.rel);
                            step = Next::Offer;
                        }
                        Gate::Refuse(why) => {
                            report.refused += 1;
                            self.held.remove(&s.rel);
                            self.tracked.remove(&s.rel);
                            if self.warned.insert(s.rel.clone()) {
                                tracing::error!(source = %self.cfg.name, manifest = %crate::phi::shown(&s.rel), reason = %why, "refused: will not upload");
                                newly.push((s.rel.clone(), why));
                            }
                            continue;
                        }
                        Gate::Hold => {
                            // Looked at again shortly: deliveries of the listed files release it.
                            self.held.insert(s.rel.clone());
                            if full {
                                seen_now.insert(s.rel.clone());
                            }
                            let t = Tracked {
                                fp: s.fp,
                                since: now_mono,
                            };
                            self.tracked
                                .insert(s.rel, (t, now_mono + Duration::from_secs(1)));
                            continue;
                        }
                    }
                }
                if step == Next::Offer {
                    let key = if self
                        .cfg
                        .key_template
                        .as_ref()
                        .is_some_and(crate::phi::Template::uses_sha256)
                    {
                        match self.content_key(&s.rel, &s.fp).await {
                            Some(k) => k,
                            None => continue, // changed while hashed: seen again next pass
                        }
                    } else {
                        key
                    };
                    self.tracked.remove(&s.rel);
                    self.first_seen.remove(&s.rel);
                    batch.push(Candidate {
                        rel_path: s.rel,
                        key,
                        version: s.fp,
                    });
                    if batch.len() >= OFFER_BATCH {
                        report.offered += self.offer(std::mem::take(&mut batch)).await?;
                    }
                } else {
                    let d = due(&t, s.mtime, now, now_mono, self.cfg.settle);
                    if full {
                        seen_now.insert(s.rel.clone());
                    }
                    self.note_settling(&s.rel, now_mono);
                    self.tracked.insert(s.rel, (t, d));
                }
            }
            if !newly.is_empty() {
                self.journal
                    .note_refused(self.cfg.name.clone(), newly)
                    .await?;
            }
        }
        walk.await.map_err(|_| JournalError::Panicked)?;
        if let Some((dir, files)) = study.take() {
            let refused = refused_studies.contains(&dir);
            report.offered += self
                .close_study(dir, files, refused, full, &mut seen_now)
                .await?;
        }
        if !batch.is_empty() {
            report.offered += self.offer(batch).await?;
        }
        if full {
            self.release_gone_held().await?;
            // Forget tracked files that disappeared.
            self.tracked.retain(|p, _| seen_now.contains(p));
            self.held.retain(|p| seen_now.contains(p));
            self.awaiting_marker = awaiting_now;
        } else if start != self.cfg.path {
            // A single-path pass for a file that is gone.
            if let Ok(rel) = start.strip_prefix(&self.cfg.path) {
                if !start.exists() {
                    self.tracked.remove(rel);
                }
            }
        }
        self.first_seen.retain(|p, _| self.tracked.contains_key(p));
        self.publish_settling().await?;
        report.unsettled = self.tracked.len() + self.awaiting_marker.len();
        report.held = self.held.len();
        Ok(report)
    }

    /// Whether a FHIR Bulk Data manifest may go now: only once every file it lists is
    /// delivered, so that a consumer waiting for the manifest never sees a partial export.
    /// Listed files that are not in the directory are reported (once per manifest version).
    async fn manifest_gate(&mut self, rel: &Path) -> Result<Gate, JournalError> {
        let abs = self.cfg.path.join(rel);
        let Ok(bytes) = tokio::fs::read(&abs).await else {
            return Ok(Gate::Release); // gone or unreadable: the uploader reports it
        };
        let names = match parse_manifest(&bytes) {
            Manifest::NotBulkData => return Ok(Gate::Release),
            Manifest::Invalid(why) => {
                return Ok(Gate::Refuse(format!("invalid FHIR manifest: {why}")))
            }
            Manifest::Lists(names) => names,
        };
        let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let listed: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        // Files it lists that will never be delivered: then neither will the manifest.
        let held = self.journal.held_paths(self.cfg.name.clone()).await?;
        // A listed file that failed its record check holds the export back (it may be fixed
        // and checked again), it does not end it.
        let quarantined: Vec<&PathBuf> = self
            .journal
            .latest_states(self.cfg.name.clone(), listed.clone())
            .await?
            .into_iter()
            .zip(&listed)
            .filter(|(st, _)| *st == Some(crate::journal::State::Quarantined))
            .map(|(_, p)| p)
            .collect();
        if !quarantined.is_empty() {
            if self.warned.insert(rel.to_path_buf()) {
                tracing::error!(source = %self.cfg.name, manifest = %crate::phi::shown(rel), quarantined = quarantined.len(), "FHIR export incomplete: files it lists are quarantined; holding the manifest back until they are fixed");
            }
            return Ok(Gate::Hold);
        }
        for (name, p) in names.iter().zip(&listed) {
            let never = if p == rel {
                Some("the manifest lists itself".to_string())
            } else if !self.cfg.selects(p) || self.is_marker(&self.cfg.path.join(p)) {
                Some(format!(
                    "it lists {name}, which this source never sends (include/exclude, or a completion marker)"
                ))
            } else if self.key(p, None).is_err() {
                Some(format!(
                    "it lists {name}, whose name cannot be an object key"
                ))
            } else if held.contains(p) && !quarantined.contains(&p) {
                Some(format!(
                    "it lists {name}, which is held back (refused, rejected or in conflict: see status)"
                ))
            } else {
                None
            };
            if let Some(why) = never {
                return Ok(Gate::Refuse(format!(
                    "FHIR manifest can never be published: {why}"
                )));
            }
        }
        let mut missing = Vec::new();
        for (name, p) in names.iter().zip(&listed) {
            if tokio::fs::symlink_metadata(self.cfg.path.join(p))
                .await
                .is_err()
            {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            if self.warned.insert(rel.to_path_buf()) {
                tracing::warn!(source = %self.cfg.name, manifest = %crate::phi::shown(rel), missing = %shown_names(&missing), "FHIR manifest lists files that are not in its directory; holding the manifest back until they arrive");
            }
            return Ok(Gate::Hold);
        }
        let delivered = self
            .journal
            .delivered_among(self.cfg.name.clone(), listed)
            .await?;
        if delivered.iter().all(|d| *d) {
            tracing::info!(source = %self.cfg.name, manifest = %crate::phi::shown(rel), files = names.len(), "every file of the FHIR export is delivered; sending its manifest");
            Ok(Gate::Release)
        } else {
            tracing::debug!(source = %self.cfg.name, manifest = %crate::phi::shown(rel), waiting = delivered.iter().filter(|d| !**d).count(), "FHIR manifest waits for its files");
            Ok(Gate::Hold)
        }
    }

    /// `stable_dir`: one study directory as the walk found it. Released whole (one journal
    /// transaction with its study row) once nothing in it changed for the quiet time and its
    /// marker (if any) is there; otherwise remembered and looked at again when due. A study
    /// holding a refused path is never released half: it waits, reported once.
    async fn close_study(
        &mut self,
        dir: PathBuf,
        files: Vec<(Seen, String)>,
        refused: bool,
        full: bool,
        seen_now: &mut HashSet<PathBuf>,
    ) -> Result<usize, JournalError> {
        let Completion::StableDir { quiet, marker, .. } = self.cfg.complete_when.clone() else {
            return Ok(0);
        };
        let (now, now_mono) = (SystemTime::now(), Instant::now());
        let (fp, newest) =
            study_version(files.iter().map(|(s, _)| (s.rel.as_path(), &s.fp, s.mtime)));
        let prev = self.tracked.get(&dir).map(|(t, _)| t);
        let (settled, t) = settle(prev, &fp, newest, now, now_mono, quiet);
        let marked = marker.as_ref().is_none_or(|(p, sfx)| {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let at = self.cfg.path.join(dir.parent().unwrap_or(Path::new("")));
            std::fs::symlink_metadata(at.join(format!("{p}{name}{sfx}"))).is_ok()
        });
        if settled && marked && !refused && !files.is_empty() {
            self.tracked.remove(&dir);
            self.first_seen.remove(&dir);
            let completion = match self.key(&dir.join(STUDY_COMPLETE), None) {
                Ok(k) => k,
                Err(why) => {
                    if self.warned.insert(dir.clone()) {
                        tracing::error!(source = %self.cfg.name, study = %crate::phi::shown(&dir), reason = %why, "study cannot get a completion object key; not released");
                    }
                    return Ok(0);
                }
            };
            let n = files.len();
            let batch: Vec<Candidate> = files
                .into_iter()
                .map(|(s, key)| Candidate {
                    rel_path: s.rel,
                    key,
                    version: s.fp,
                })
                .collect();
            let reupload = self.cfg.on_change == OnChange::Upload;
            let stats = self
                .journal
                .offer_study(
                    self.cfg.name.clone(),
                    batch,
                    reupload,
                    dir,
                    completion.clone(),
                )
                .await?;
            if stats.inserted + stats.refreshed > 0 {
                tracing::info!(source = %self.cfg.name, completion = %completion, files = n, quiet = %humantime::format_duration(quiet), "study complete (nothing changed for its quiet time): its files are released together");
                self.wake.notify_one();
            }
            return Ok(stats.inserted);
        }
        if refused && self.warned.insert(dir.clone()) {
            tracing::error!(source = %self.cfg.name, study = %crate::phi::shown(&dir), "study held back: a file in it is refused (see status), and a study is never sent in part");
        }
        let due_at = if settled {
            // Waiting for its marker (or a refusal to be resolved): look again shortly.
            now_mono + Duration::from_secs(1)
        } else {
            due(&t, newest, now, now_mono, quiet)
        };
        if full {
            seen_now.insert(dir.clone());
        }
        self.note_settling(&dir, now_mono);
        self.tracked.insert(dir, (t, due_at));
        Ok(0)
    }

    /// Offers complete files to the journal; returns how many were new or changed, and wakes the
    /// scheduler if any.
    async fn offer(&self, batch: Vec<Candidate>) -> Result<usize, JournalError> {
        let reupload = self.cfg.on_change == OnChange::Upload;
        let stats = self
            .journal
            .offer(self.cfg.name.clone(), batch, reupload)
            .await?;
        let n = stats.inserted + stats.refreshed;
        if n > 0 {
            tracing::debug!(source = %self.cfg.name, new = stats.inserted, changed = stats.refreshed, "queued settled files");
            self.wake.notify_one();
        }
        Ok(stats.inserted)
    }
}

/// File names for a log line: listed, or only counted with `log_paths = "keys"`.
fn shown_names(names: &[&String]) -> String {
    if crate::phi::keys_only() {
        format!("{} file(s)", names.len())
    } else {
        format!("{names:?}")
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
    fp: &Version,
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
    if Version::of_file(&meta) != *fp {
        return Ok(AfterResult::LeftChanged);
    }
    match action {
        AfterUpload::Keep | AfterUpload::MoveToPrefix(_) => Ok(AfterResult::Kept),
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
    use crate::config::Completion;

    /// `watch = "auto"` polls on NFS, SMB, FUSE and other network filesystems.
    #[test]
    fn auto_mode_polls_on_network_filesystems() {
        assert_eq!(
            decide_watch(WatchMode::Auto, Some(0x6969)).0,
            WatchMode::Poll
        );
        assert_eq!(
            decide_watch(WatchMode::Auto, Some(0xFE53_4D42)).0,
            WatchMode::Poll
        );
        assert_eq!(
            decide_watch(WatchMode::Auto, Some(0x6573_5546)).0,
            WatchMode::Poll
        );
        assert!(decide_watch(WatchMode::Auto, Some(0x6969))
            .1
            .contains("nfs"));
        assert_eq!(
            decide_watch(WatchMode::Auto, Some(0xEF53)).0,
            WatchMode::Events
        );
        assert_eq!(decide_watch(WatchMode::Auto, None).0, WatchMode::Poll);
        assert_eq!(
            decide_watch(WatchMode::Poll, Some(0xEF53)).0,
            WatchMode::Poll
        );
        assert_eq!(
            decide_watch(WatchMode::Events, Some(0x6969)).0,
            WatchMode::Events
        );
        // This machine's temp dir is local: a real statfs call works.
        assert!(fs_magic(&std::env::temp_dir()).is_some());
    }

    /// Marker templates name the file they complete, and markers themselves are never sent.
    #[test]
    fn markers_name_their_files_and_are_recognised() {
        let per_file = Completion::FileMarker {
            prefix: String::new(),
            suffix: ".done".into(),
        };
        assert_eq!(
            per_file.marker_for("a.ndjson").as_deref(),
            Some("a.ndjson.done")
        );
        assert!(per_file.is_marker("a.ndjson.done"));
        assert!(!per_file.is_marker("a.ndjson"));
        assert!(!per_file.is_marker(".done"));
        let dir = Completion::DirMarker("_SUCCESS".into());
        assert_eq!(dir.marker_for("x").as_deref(), Some("_SUCCESS"));
        assert!(dir.is_marker("_SUCCESS"));
        assert!(!Completion::Settle.is_marker("_SUCCESS"));
    }
}
