//! The driver: one `select!` loop that hands runnable journal rows to the sink, at most
//! `concurrency` at a time, and carries out what the policy decides when each one finishes.
//! Health and policy are pure (`health.rs`, `policy.rs`); everything here is IO: journal
//! queries and writes, tasks, logs, the service manager.
//!
//! # Design
//! ```text
//!  journal.runnable ──prefetch (64)──▶ queued ──▶ object task (≤ concurrency transfer slots)
//!         ▲                                            │ sink.deliver → Outcome
//!         │                                            │ first delivery: commit `delivered`
//!         │                                            ▼ (slot freed before the fsync)
//!         └──── journal writes ◀── settle ◀── policy::decide ◀── inflight.join_next
//!                                     │
//!                                     └── health notices → logs, `status`, --once stop
//! ```
//! - One loop, one `select!`: a finished object, a source that failed, the watchdog tick, a
//!   wake-up from a source's offer, the next backed-off row (or probe) coming due, a stop.
//! - Slots: `concurrency` objects transfer at once. Small objects (below `small_below` bytes,
//!   so that `small_objects` of them fit the sink's memory budget: bounded by bytes, not by
//!   count) may also take extra slots, so that a long round trip does not leave the link idle
//!   between PUTs. The extra slots open one per delivered object, up to `small_objects`, and
//!   all close at the first failed attempt (`SmallSlots`): a dead link sees no more objects at
//!   once than `concurrency`. Rows go in dispatch order: a row whose kind of slot is taken
//!   waits, and the rows after it too. An object whose upload is
//!   verified frees its slot while its delivery waits for the journal's commit, and at most
//!   `COMMIT_BACKLOG` such tasks wait, so a slow disk slows intake, never the link.
//! - A paused destination gets one object at a time (`Health::probing`); a paused source's rows
//!   are put back with the pause's delay before they take a slot.
//! - `--once` walks the journal once by id (a cursor), ignoring backoff, and looks once more for
//!   FHIR manifests held back for files delivered in the run.
//! - A stop: sources stop, object tasks are told to finish the parts they have in flight, and
//!   after `shutdown_grace` whatever is left is aborted (the journal holds where it got to).
//!
//! Must not break: a delivery is committed before its source is deleted or moved (the object's
//! task commits it, or `settle` does, and after_upload runs only after that); the loop never
//! waits on a transfer, only on the next event; a stop lets parts in flight finish within the
//! grace period.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use super::health::{Action, Gate, Health, Notice, Signal, SourceGate, Stop};
use super::policy::{self, Context, Tally, Transition};
use crate::config::{AfterUpload, SourceConfig};
use crate::journal::{Custody, Journal, JournalError, Landed, ObjectRow, State};
use crate::sink::read::Origin;
use crate::sink::s3::Confirm;
use crate::sink::{Destination, Outcome, Preflight};
use crate::source::bucket::{self, BucketAfter};
use crate::source::fs::{after_upload, AfterResult, FsSource, SourceReport};
use crate::systemd;

/// What a run did; `--once` prints it and derives the exit code from it.
#[derive(Debug, Default)]
pub struct Summary {
    /// Objects delivered and verified in this run.
    pub delivered: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Objects that can never be delivered as they are.
    pub rejected: u64,
    /// Objects left alone because another writer's object is at their key.
    pub conflicts: u64,
    /// Files that failed their record check and were not sent.
    pub quarantined: u64,
    /// Sources that disappeared before they were sent.
    pub vanished: u64,
    /// Objects not delivered in this run (`--once`; they resume on the next).
    pub failed: u64,
    /// Sources that changed under their upload (sent once they settle again).
    pub changed: u64,
    /// Files seen but not complete yet.
    pub unsettled: usize,
    /// Paths refused at discovery (name, type, the journal itself).
    pub refused: usize,
    /// The destination refused us (`--once` stops and exits 3).
    pub destination_error: Option<String>,
    /// The destination stopped answering (`--once` stops dispatching and exits 1).
    pub unreachable: Option<String>,
    /// Bucket listings that failed.
    pub source_errors: usize,
    /// `--dry-run`: objects that would be sent, and their bytes.
    pub listed: u64,
    pub listed_bytes: u64,
}

impl Summary {
    /// Whether everything found was delivered: `--once` exits 0 only then.
    pub fn all_delivered(&self) -> bool {
        self.rejected == 0
            && self.conflicts == 0
            && self.quarantined == 0
            && self.refused == 0
            && self.changed == 0
            && self.failed == 0
            && self.source_errors == 0
            && self.destination_error.is_none()
            && self.unreachable.is_none()
    }
}

/// Rows fetched from the journal per dispatch query.
const PREFETCH: usize = 64;
/// Delivered objects whose commit may be pending while others transfer.
const COMMIT_BACKLOG: usize = 64;

/// What the driver works with, wired by `app.rs`.
pub struct Wiring<D> {
    /// The journal every decision is committed to.
    pub journal: Journal,
    /// Where objects go.
    pub sink: Arc<D>,
    /// Each source's settings (after_upload, settle), by name.
    pub sources: HashMap<String, SourceConfig>,
    /// Where each source's bytes come from.
    pub origins: HashMap<String, Origin>,
    /// `--once`: dispatch what is there, then stop.
    pub once: bool,
    /// Objects in transfer at once.
    pub concurrency: usize,
    /// Objects below `small_below` bytes in transfer at once, besides `concurrency` (their
    /// bytes are bounded by the sink's memory budget).
    pub small_objects: usize,
    /// The size from which an object takes one of the `concurrency` slots (the multipart
    /// threshold).
    pub small_below: u64,
    /// How long a stop lets parts in flight finish.
    pub shutdown_grace: Duration,
    /// `[agent] name`, for receipts.
    pub agent: String,
    /// `--dry-run`: every row goes to the sink (a delivered row's after_upload too), which
    /// only lists it.
    pub dry_run: bool,
}

/// The sources feeding the journal.
pub struct Intake {
    /// Daemon: the sources' tasks.
    pub running: JoinSet<Result<SourceReport, JournalError>>,
    /// Tells the sources to stop.
    pub stop: watch::Sender<bool>,
    /// Notified when a source offered something (or a slot freed).
    pub wake: Arc<Notify>,
    /// `--once`: the directory sources, looked at again for manifests held back until their
    /// files are in.
    pub once_sources: Vec<FsSource>,
    /// `--once`: manifests held back at the first scan.
    pub held: usize,
}

/// An object task's result.
struct Finished {
    row: ObjectRow,
    outcome: Outcome,
    took: Duration,
    /// For a first delivery: the journal commit of `delivered`, made by the task itself (false:
    /// the row changed meanwhile and nothing was written).
    committed: Option<Result<bool, JournalError>>,
}

/// The extra slots of small objects: none at first and after a failed attempt, one more per
/// delivered object, up to the configured number (`small_objects_in_flight`). Slots in use
/// when they close come back to the semaphore; `excess` counts them, and they are forgotten
/// as they return.
struct SmallSlots {
    sem: Arc<tokio::sync::Semaphore>,
    open: usize,
    max: usize,
    excess: usize,
}

impl SmallSlots {
    fn new(max: usize) -> SmallSlots {
        SmallSlots {
            sem: Arc::new(tokio::sync::Semaphore::new(0)),
            open: 0,
            max,
            excess: 0,
        }
    }

    /// Forgets slots that came back after their window closed.
    fn absorb(&mut self) {
        if self.excess > 0 {
            self.excess -= self.sem.forget_permits(self.excess);
        }
    }

    /// Extra slots free now.
    fn available(&mut self) -> usize {
        self.absorb();
        self.sem.available_permits().saturating_sub(self.excess)
    }

    /// One extra slot, if one is free.
    fn take(&mut self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.available() == 0 {
            return None;
        }
        self.sem.clone().try_acquire_owned().ok()
    }

    /// An object was delivered: one more extra slot (up to the maximum).
    fn grow(&mut self) {
        if self.open < self.max {
            self.open += 1;
            if self.excess > 0 {
                self.excess -= 1;
            } else {
                self.sem.add_permits(1);
            }
        }
    }

    /// An attempt failed: no extra slots until objects are delivered again.
    fn close(&mut self) {
        self.excess += self.open;
        self.open = 0;
        self.absorb();
    }
}

/// The driver's state: the wiring, the health machine, and what the run did.
struct Scheduler<D> {
    w: Wiring<D>,
    health: Health,
    summary: Summary,
    /// What record checks read within: the sink's budget (or one part's worth without one).
    budget: crate::sink::read::Budget,
    /// The DICOM study seen first in each directory, to report a directory holding two.
    studies: StudyUids,
}

/// Dispatches until the journal has nothing left (`--once`) or until `shutdown`.
pub async fn run<D: Destination>(
    w: Wiring<D>,
    mut intake: Intake,
    summary: Summary,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Summary, JournalError> {
    let once = w.once;
    let journal = w.journal.clone();
    let wake = intake.wake.clone();
    // Told when an object's transfer slot frees before its commit.
    let freed = Arc::new(Notify::new());
    let budget = w
        .sink
        .budget()
        .unwrap_or_else(|| crate::sink::read::Budget::new(8 << 20));
    let mut sched = Scheduler {
        health: Health::new(once, fastrand::u64(..)),
        w,
        summary,
        budget,
        studies: StudyUids::default(),
    };
    // What the sink learns once (S3: the conditional-write probe, four round trips) runs beside
    // the first deliveries; it is let finish before the run ends, so it leaves nothing behind.
    let learning = sched.preflight().await?;
    systemd::ready();
    systemd::status("running");
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    let concurrency = sched.w.concurrency;
    // `concurrency` objects transfer at a time; an object whose upload is verified gives its
    // slot to the next one while its delivery waits for the journal's commit (fsync), so the
    // commit is off the transfer path even when the disk is slow. Such a task holds its journal
    // row and its bytes' share of the memory budget (a crash would send them again, so data
    // sent but not recorded stays within `parts_in_flight x part_size`); at most COMMIT_BACKLOG
    // of them wait at once.
    let transfers = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut small = SmallSlots::new(sched.w.small_objects);
    let small_below = sched.w.small_below;
    let max_tasks = concurrency + sched.w.small_objects + COMMIT_BACKLOG;
    let (obj_stop_tx, obj_stop_rx) = watch::channel(false);
    let mut inflight: JoinSet<Finished> = JoinSet::new();
    let mut inflight_ids: Vec<i64> = Vec::new();
    let mut cursor: Option<(i64, i64)> = None;
    let mut visited: HashSet<i64> = HashSet::new();
    // The journal's offer generation when `queued` was fetched.
    let mut fetched_at = 0u64;
    // Rows fetched ahead, so that dispatching an object does not wait for a journal query.
    let mut queued: VecDeque<ObjectRow> = VecDeque::new();
    let mut fetched_all = false;
    let mut draining = false;
    let mut grace_deadline: Option<Instant> = None;
    let mut delivered_at_scan = 0u64;

    loop {
        let mut exhausted = false;
        let gate = sched.health.gate(Instant::now());
        let may_dispatch = !draining && gate != Gate::Closed;
        let slots_free = transfers.available_permits() + small.available();
        if may_dispatch && slots_free > 0 && inflight.len() < max_tasks {
            // While probing a paused destination, one object at a time.
            let free = if sched.health.probing() {
                1usize.saturating_sub(inflight.len())
            } else {
                slots_free.min(max_tasks - inflight.len())
            };
            // `--once` pages through the journal in dispatch order and visits each row once
            // (a row that failed waits for the next run); a rescan that offered more starts the
            // paging over, skipping the rows already visited.
            // A source offered something since the last fetch: what is prefetched may no
            // longer be what goes first (a higher priority), so ask the journal again.
            if !once && journal.offer_generation() != fetched_at {
                queued.clear();
            }
            while free > 0 && queued.is_empty() && !(once && fetched_all) {
                fetched_at = journal.offer_generation();
                let want = PREFETCH.max(free);
                let rows = journal
                    .runnable(
                        want,
                        if once { cursor } else { None },
                        !once,
                        inflight_ids.clone(),
                    )
                    .await?;
                fetched_all = rows.len() < want;
                if let Some(last) = rows.last() {
                    cursor = Some((last.priority, last.id));
                }
                if once {
                    queued.extend(rows.into_iter().filter(|r| visited.insert(r.id)));
                } else {
                    queued.extend(rows);
                    break;
                }
            }
            exhausted = queued.is_empty() && fetched_all;
            let mut started = 0;
            while started < free {
                let Some(next) = queued.front() else { break };
                // In dispatch order: the next row waits for a slot it may take (a small
                // object takes a transfer slot first, else an extra one).
                let slot = match transfers.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) if next.version.size() < small_below => match small.take() {
                        Some(slot) => slot,
                        None => break,
                    },
                    Err(_) => break,
                };
                let row = queued.pop_front().expect("looked at above");
                if sched.defer_if_source_paused(&row).await? {
                    continue;
                }
                inflight_ids.push(row.id);
                started += 1;
                let task = sched.object_task(row, slot, obj_stop_rx.clone(), freed.clone());
                inflight.spawn(task);
            }
        }
        if inflight.is_empty() {
            if draining {
                break;
            }
            if once && (exhausted || !may_dispatch) {
                // Manifests held back for files delivered in this run: look once more.
                if may_dispatch && intake.held > 0 && sched.summary.delivered > delivered_at_scan {
                    delivered_at_scan = sched.summary.delivered;
                    let (mut offered, mut unsettled) = (0, 0);
                    intake.held = 0;
                    for src in &mut intake.once_sources {
                        let r = src.scan_once().await?;
                        offered += r.offered;
                        unsettled += r.unsettled;
                        intake.held += r.held;
                    }
                    sched.summary.unsettled = unsettled;
                    if offered > 0 {
                        fetched_all = false;
                        cursor = None;
                        continue;
                    }
                }
                break;
            }
        }
        let poll = if once {
            Duration::from_secs(3600)
        } else {
            let next = journal
                .next_wakeup_ms()
                .await?
                .map(|ms| Duration::from_millis(ms.max(0).unsigned_abs()));
            let until_probe = sched
                .health
                .next_probe()
                .map(|t| t.saturating_duration_since(Instant::now()));
            [Some(Duration::from_secs(30)), next, until_probe]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(Duration::from_secs(30))
                .max(Duration::from_millis(50))
        };
        tokio::select! {
            Some(res) = inflight.join_next(), if !inflight.is_empty() => {
                let Ok(done) = res else { continue };
                inflight_ids.retain(|id| *id != done.row.id);
                match &done.outcome {
                    Outcome::Delivered(..) => small.grow(),
                    Outcome::Retry(_) | Outcome::Unreachable(_) | Outcome::Destination(_) => {
                        small.close()
                    }
                    _ => {}
                }
                sched.settle(done).await?;
            }
            Some(res) = intake.running.join_next(), if !intake.running.is_empty() => {
                if let Ok(Err(e)) = res {
                    return Err(e);
                }
            }
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                // Fed from the scheduler loop itself: if the loop stalls, systemd restarts us.
                systemd::watchdog();
                systemd::status(&format!(
                    "{} delivered since start, {} in flight, destination {}",
                    sched.summary.delivered,
                    inflight.len(),
                    sched.health.label()
                ));
            }
            () = wake.notified(), if !draining => {}
            () = freed.notified(), if !draining => {}
            () = tokio::time::sleep(poll), if !draining => {}
            _ = shutdown.changed(), if !draining => {
                draining = true;
                let _ = intake.stop.send(true);
                let _ = obj_stop_tx.send(true);
                let grace = sched.w.shutdown_grace;
                tracing::info!(in_flight = inflight.len(), grace = %humantime::format_duration(grace), "shutting down: finishing parts in flight");
                grace_deadline = Some(Instant::now() + grace);
            }
            () = async { tokio::time::sleep_until(grace_deadline.unwrap_or_else(Instant::now)).await }, if draining && grace_deadline.is_some() => {
                tracing::warn!(in_flight = inflight.len(), "grace period over: stopping; unfinished parts resume on the next start");
                inflight.abort_all();
                while inflight.join_next().await.is_some() {}
                break;
            }
        }
    }
    let _ = intake.stop.send(true);
    while let Some(res) = intake.running.join_next().await {
        if let Ok(Err(e)) = res {
            return Err(e);
        }
    }
    if let Some(mut task) = learning {
        if tokio::time::timeout(sched.w.shutdown_grace, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    sched.w.sink.close().await;
    Ok(sched.summary)
}

impl<D: Destination> Scheduler<D> {
    /// The task that delivers one object.
    fn object_task(
        &self,
        row: ObjectRow,
        slot: tokio::sync::OwnedSemaphorePermit,
        stop: watch::Receiver<bool>,
        wake: Arc<Notify>,
    ) -> impl std::future::Future<Output = Finished> + Send + 'static {
        let span = tracing::info_span!("object", id = row.id, key = %row.key);
        let sink = self.w.sink.clone();
        let origin = self.w.origins.get(&row.source).cloned();
        let keep = self
            .w
            .sources
            .get(&row.source)
            .is_none_or(|s| s.after_upload == AfterUpload::Keep);
        let journal = self.w.journal.clone();
        let dry_run = self.w.dry_run;
        let mut custody = self.custody(&row);
        // The record check a fresh row gets before its first byte is sent.
        let check = self.w.sources.get(&row.source).and_then(|s| {
            let kind = s.validation.for_path(&row.rel_path);
            // The directory a second DICOM study is reported in: the study (stable_dir), or
            // the file's own directory.
            let dir = s.complete_when.study_of(&row.rel_path).unwrap_or_else(|| {
                row.rel_path
                    .parent()
                    .unwrap_or(std::path::Path::new(""))
                    .to_path_buf()
            });
            (kind != crate::validate::Kind::None && row.state == State::Pending).then_some((
                kind,
                s.validation.max_line,
                s.validation.on_invalid,
                dir,
            ))
        });
        let budget = self.budget.clone();
        let studies = self.studies.clone();
        async move {
            let started = Instant::now();
            custody.started_ms = Some(crate::receipts::record::now_ms());
            let board = crate::progress::board();
            board.begin(row.id, &row.key, row.version.size());
            let mut row = row;
            let checked = match (&origin, check) {
                (Some(origin), Some((kind, max_line, on_invalid, dir))) => {
                    let how = Check {
                        kind,
                        max_line,
                        on_invalid,
                        dry_run,
                        dir,
                    };
                    check_row(&mut row, origin, how, &budget, &journal, &studies).await
                }
                _ => None,
            };
            let (outcome, unrecorded) = match (&origin, row.state) {
                _ if checked.is_some() => (checked.expect("checked"), None),
                (None, _) => {
                    let why = format!("source {:?} is no longer in the config", row.source);
                    (Outcome::Retry(why), None)
                }
                (Some(origin), _) if dry_run => {
                    sink.deliver(&row, origin, Confirm::Answer, stop).await
                }
                (Some(_), State::Delivered) => (
                    Outcome::Delivered(row.sha256.unwrap_or_default(), Landed::default()),
                    None,
                ),
                (Some(origin), _) => {
                    // Read back before the source is deleted or moved.
                    let confirm = if keep {
                        Confirm::Answer
                    } else {
                        Confirm::ReadBack
                    };
                    sink.deliver(&row, origin, confirm, stop).await
                }
            };
            // A first delivery is committed here, alongside the other objects in flight: the
            // journal's group commit can batch them, the scheduler loop never waits for an
            // fsync, and the transfer slot is free for the next object meanwhile. What a crash
            // would send again stays counted in the memory budget until the commit
            // (`unrecorded`). Nothing acts on this object (after_upload) before the commit:
            // that happens once this task is joined.
            let committed = match &outcome {
                Outcome::Delivered(sha, landed) if row.state != State::Delivered => {
                    drop(slot);
                    wake.notify_one();
                    let done = journal
                        .delivered(
                            row.id,
                            row.version.clone(),
                            *sha,
                            landed.clone(),
                            custody,
                            keep,
                        )
                        .await;
                    drop(unrecorded);
                    Some(done)
                }
                _ => None,
            };
            // A row delivered before (its after_upload still owed) is not counted again.
            board.end(
                row.id,
                matches!(outcome, Outcome::Delivered(..)) && row.state != State::Delivered,
            );
            Finished {
                took: started.elapsed(),
                row,
                outcome,
                committed,
            }
        }
        .instrument(span)
    }

    /// What a receipt of `row` needs from outside the journal.
    fn custody(&self, row: &ObjectRow) -> Custody {
        let action = self
            .w
            .sources
            .get(&row.source)
            .map_or(&AfterUpload::Keep, |s| &s.after_upload);
        let (source_bucket, source_prefix) = match self.w.origins.get(&row.source) {
            Some(Origin::Bucket { client, prefix }) => {
                (Some(client.bucket().to_string()), prefix.clone())
            }
            _ => (None, String::new()),
        };
        let endpoint = self.w.sink.endpoint();
        let endpoint = match url::Url::parse(&endpoint) {
            Ok(u) if u.scheme() != "quic" => match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => endpoint,
            },
            _ => endpoint,
        };
        let bucket = self.w.sink.bucket();
        Custody {
            agent: self.w.agent.clone(),
            endpoint,
            bucket: if bucket.starts_with('(') {
                String::new()
            } else {
                bucket
            },
            source_bucket,
            source_prefix,
            after_upload: after_upload_name(action),
            started_ms: None,
            withhold_path: crate::phi::keys_only()
                || self.w.sources.get(&row.source).is_some_and(|s| {
                    s.key_template
                        .as_ref()
                        .is_some_and(crate::phi::Template::uses_hmac)
                }),
        }
    }

    /// One cheap request before the first upload, so a missing bucket, a wrong region or a
    /// relay that refuses this agent is reported at once. If the destination is fine, the
    /// sink's `ready` is started in the background (its task is returned).
    async fn preflight(&mut self) -> Result<Option<JoinHandle<()>>, JournalError> {
        match self.w.sink.preflight().await {
            Preflight::Ok => {
                let sink = self.w.sink.clone();
                let ready = tokio::spawn(async move { sink.ready().await });
                self.health.preflight_ok();
                self.w
                    .journal
                    .set_agent_state("destination", "ok".into())
                    .await?;
                Ok(Some(ready))
            }
            Preflight::Refused(e) => {
                let advice = e.for_operator();
                let signal = Signal::Refused {
                    code: e.code.as_str(),
                    message: &advice,
                };
                let action = self.health.on_signal(signal, Instant::now());
                self.act(&action).await.map(|()| None)
            }
            Preflight::Inconclusive(why) => {
                tracing::debug!(error = %why, "destination check inconclusive; continuing");
                Ok(None)
            }
        }
    }

    /// Rows of a source whose keys the destination refuses wait until that source's next probe
    /// (daemon) or are left for the next run (`--once`). Returns true if the row was deferred.
    async fn defer_if_source_paused(&mut self, row: &ObjectRow) -> Result<bool, JournalError> {
        match self.health.source_gate(&row.source, Instant::now()) {
            SourceGate::Open => Ok(false),
            SourceGate::Skip => {
                self.summary.failed += 1;
                Ok(true)
            }
            SourceGate::Wait(wait, msg) => {
                let (ms, msg) = (millis(wait), msg.to_string());
                self.w.journal.retry_later(row.id, ms, false, msg).await?;
                Ok(true)
            }
        }
    }

    /// Tells the operator and `status` what health noticed; a `--once` stop ends dispatching.
    async fn act(&mut self, action: &Action) -> Result<(), JournalError> {
        let j = &self.w.journal;
        let since = || humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let m = crate::telemetry::metrics::agent();
        for notice in &action.notices {
            match notice {
                Notice::Refusing { message, new_cause } => {
                    m.destination(false, std::time::Instant::now());
                    m.set_refusing(Some(message.clone()));
                    if *new_cause {
                        tracing::error!(endpoint = %self.w.sink.endpoint(), bucket = %self.w.sink.bucket(), error = %message, "destination refuses uploads; pausing this destination");
                        j.note_error(message.clone()).await?;
                    }
                    j.set_agent_state(
                        "destination",
                        format!("refusing since {}: {message}", since()),
                    )
                    .await?;
                }
                Notice::ProbeIn(delay) => {
                    tracing::info!(probe_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())), "will probe the destination again");
                }
                Notice::Unreachable { message } => {
                    m.destination(false, std::time::Instant::now());
                    tracing::warn!(endpoint = %self.w.sink.endpoint(), error = %message, "destination unreachable; pausing uploads and probing until it answers");
                    j.note_error(message.clone()).await?;
                    j.set_agent_state(
                        "destination",
                        format!("unreachable since {}: {message}", since()),
                    )
                    .await?;
                }
                Notice::StillUnreachable { message } => {
                    tracing::debug!(error = %message, "destination still unreachable");
                }
                Notice::Back { outage } => {
                    m.destination(true, std::time::Instant::now());
                    tracing::info!(endpoint = %self.w.sink.endpoint(), outage_secs = outage.as_secs(), "destination answers again; resuming uploads");
                }
                Notice::Accepting => {
                    m.destination(true, std::time::Instant::now());
                    m.set_refusing(None);
                    tracing::info!(bucket = %self.w.sink.bucket(), "destination accepts requests again");
                }
                Notice::DestinationOk => {
                    m.destination(true, std::time::Instant::now());
                    m.set_refusing(None);
                    j.set_agent_state("destination", "ok".into()).await?;
                }
                Notice::SourceRefused { source, message } => {
                    tracing::error!(source = %source, error = %message, "destination refuses this source's keys; pausing this source (others go on)");
                    j.note_error(message.clone()).await?;
                    j.set_agent_state(
                        format!("source.{source}"),
                        format!("refused since {}: {message}", since()),
                    )
                    .await?;
                }
                Notice::SourceAccepting { source } => {
                    tracing::info!(source = %source, "destination accepts this source's keys again");
                    j.set_agent_state(format!("source.{source}"), "ok".into())
                        .await?;
                }
            }
        }
        match &action.stop {
            Some(Stop::Refused(m)) => {
                self.summary
                    .destination_error
                    .get_or_insert_with(|| m.clone());
            }
            Some(Stop::Unreachable(m)) => {
                self.summary.unreachable.get_or_insert_with(|| m.clone());
            }
            None => {}
        }
        Ok(())
    }

    /// How long `source` takes to settle after a change: a bucket object is looked at again
    /// after the next listing has seen its new version.
    fn settle_of(&self, source: &str) -> Duration {
        self.w
            .sources
            .get(source)
            .map_or(policy::DEFAULT_SETTLE, |s| {
                if s.is_dir() {
                    s.settle
                } else {
                    s.poll_interval
                }
            })
    }

    /// The source changed under an upload: the object waits one settle period, then is tried
    /// again (and by then a rescan has recorded the new version).
    async fn wait_for_settle(&mut self, row: &ObjectRow, msg: String) -> Result<(), JournalError> {
        tracing::info!(reason = %msg, "source changed; waiting for it to settle");
        self.summary.changed += 1;
        let settle = millis(self.settle_of(&row.source));
        self.w.journal.retry_later(row.id, settle, false, msg).await
    }

    /// Carries out what the policy decides for a finished object.
    async fn settle(&mut self, done: Finished) -> Result<(), JournalError> {
        let Finished {
            row,
            outcome,
            took,
            committed,
        } = done;
        if let Outcome::Interrupted = outcome {
            tracing::info!("interrupted; resumes from the journal on the next start");
        }
        let cx = Context {
            once: self.w.once,
            settle: self.settle_of(&row.source),
            jitter: fastrand::f64(),
        };
        let decision = policy::decide(outcome, &row, cx, &mut self.health, Instant::now())?;
        self.act(&decision.health).await?;
        let j = self.w.journal.clone();
        let m = crate::telemetry::metrics::agent();
        match decision.tally {
            Tally::Failed => {
                self.summary.failed += 1;
                m.finished(&row.source, "failed");
            }
            Tally::Rejected => {
                self.summary.rejected += 1;
                m.finished(&row.source, "refused");
            }
            Tally::Quarantined => {
                self.summary.quarantined += 1;
                m.finished(&row.source, "quarantined");
            }
            Tally::Conflict => {
                self.summary.conflicts += 1;
                m.finished(&row.source, "conflict");
            }
            Tally::Vanished => {
                self.summary.vanished += 1;
                m.finished(&row.source, "vanished");
            }
            // Counted once the delivery is known to be recorded; a change by wait_for_settle.
            Tally::Listed => {
                self.summary.listed += 1;
                self.summary.listed_bytes += row.version.size();
            }
            Tally::Delivered | Tally::Changed | Tally::Nothing => {}
        }
        match decision.transition {
            Transition::Deliver { sha256, landed } => {
                let action = self
                    .w
                    .sources
                    .get(&row.source)
                    .map_or(AfterUpload::Keep, |s| s.after_upload.clone());
                if row.state != State::Delivered {
                    let keep = action == AfterUpload::Keep;
                    let recorded = match committed {
                        Some(r) => r?,
                        None => {
                            let custody = self.custody(&row);
                            j.delivered(row.id, row.version.clone(), sha256, landed, custody, keep)
                                .await?
                        }
                    };
                    if !recorded {
                        // A rescan recorded a newer version while this one was being sent: the
                        // bucket holds the older one for now; the newer one goes next.
                        let msg = "source changed while it was being sent".to_string();
                        return self.wait_for_settle(&row, msg).await;
                    }
                    self.summary.delivered += 1;
                    self.summary.bytes += row.version.size();
                    // Bytes first: a scrape that sees the object delivered sees its bytes too.
                    m.bytes_sent
                        .get_or_create(&crate::telemetry::metrics::SourceLabel {
                            source: row.source.clone(),
                        })
                        .inc_by(row.version.size());
                    m.finished(&row.source, "delivered");
                    let mbps = row.version.size() as f64 / took.as_secs_f64().max(1e-6) / 1e6;
                    tracing::info!(key = %row.key, size = row.version.size(), secs = took.as_secs_f64(), mb_per_s = format!("{mbps:.1}"), "delivered and verified");
                }
                if action != AfterUpload::Keep {
                    self.after_upload(&row, &action).await?;
                }
            }
            Transition::RetryLater {
                delay,
                count_attempt,
                message,
            } => {
                if count_attempt {
                    if self.w.once {
                        tracing::warn!(error = %message, "not delivered in this run; it resumes on the next run");
                    } else {
                        tracing::warn!(error = %message, attempt = row.attempts + 1, retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())), "transfer failed; will retry");
                    }
                }
                j.retry_later(row.id, millis(delay), count_attempt, message)
                    .await?;
            }
            Transition::Finish { state, message } => {
                match state {
                    State::Rejected => {
                        tracing::error!(key = %row.key, error = %message, "rejected: this object will not be uploaded");
                    }
                    // Reported once, as an error: the object stays until the operator decides,
                    // and its source is never deleted or moved.
                    State::Conflict => {
                        tracing::error!(key = %row.key, error = %message, "conflict: another writer's object is at this key; not overwritten, source kept");
                    }
                    State::Quarantined => {
                        let moved = self.quarantine(&row).await;
                        tracing::error!(key = %row.key, error = %message, moved_to_quarantine = moved, "quarantined: failed its record check; not sent");
                    }
                    _ => {
                        tracing::warn!(key = %row.key, error = %message, "source file disappeared before upload; skipped");
                    }
                }
                j.finish_with_error(row.id, state, message).await?;
            }
            Transition::StartOver { message, .. } => {
                j.reset(row.id, None, message.clone()).await?;
                self.wait_for_settle(&row, message).await?;
            }
            Transition::Leave => {}
        }
        Ok(())
    }

    /// Moves a quarantined file to its source's `quarantine_dir` (same relative path), if set
    /// and not a dry run; returns whether it moved. A failure is logged and leaves it in place.
    async fn quarantine(&self, row: &ObjectRow) -> bool {
        let (Some(Origin::Dir(root)), Some(dir)) = (
            self.w.origins.get(&row.source),
            self.w
                .sources
                .get(&row.source)
                .and_then(|s| s.validation.quarantine_dir.clone()),
        ) else {
            return false;
        };
        if self.w.dry_run {
            return false;
        }
        let (root, rel, fp) = (root.clone(), row.rel_path.clone(), row.version.clone());
        // Quarantined records stay readable by the agent's user only (the directory is made
        // 0700 if it does not exist; its subdirectories follow the umask below it).
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir);
        }
        let act = AfterUpload::MoveTo(dir);
        let res = tokio::task::spawn_blocking(move || after_upload(&root, &rel, &act, &fp)).await;
        match res {
            Ok(Ok(AfterResult::Moved)) => true,
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                tracing::warn!(key = %row.key, error = %e, "could not move the quarantined file to quarantine_dir; left in place");
                false
            }
            Err(_) => false,
        }
    }

    /// Deletes or moves a delivered source (file or bucket object), only if it is still the
    /// version delivered; the row is done afterwards, or retried later on failure.
    async fn after_upload(
        &mut self,
        row: &ObjectRow,
        action: &AfterUpload,
    ) -> Result<(), JournalError> {
        let j = &self.w.journal;
        let res: Result<String, String> = match self.w.origins.get(&row.source) {
            Some(Origin::Bucket { client, prefix }) => {
                let key = Origin::source_key(prefix, &row.rel_path);
                match bucket::after_upload(
                    client,
                    &key,
                    &row.rel_path,
                    action,
                    &row.version,
                    row.pinned_etag.as_deref(),
                )
                .await
                {
                    Ok(BucketAfter::LeftChanged) => {
                        tracing::warn!(key = %key, "source object changed after delivery: left in place; the new version will be sent");
                        Ok("left changed".into())
                    }
                    Ok(r) => Ok(format!("{r:?}")),
                    Err(e) => Err(e.to_string()),
                }
            }
            Some(Origin::Dir(root)) => {
                let (root, rel, fp, act) = (
                    root.clone(),
                    row.rel_path.clone(),
                    row.version.clone(),
                    action.clone(),
                );
                let res = tokio::task::spawn_blocking(move || after_upload(&root, &rel, &act, &fp))
                    .await
                    .map_err(|_| JournalError::Panicked)?;
                match res {
                    Ok(AfterResult::LeftChanged) => {
                        tracing::warn!(path = %crate::phi::shown(&row.rel_path), "source changed after delivery: left in place; the new version will be sent");
                        Ok("left changed".into())
                    }
                    Ok(r) => Ok(format!("{r:?}")),
                    Err(e) => Err(e.to_string()),
                }
            }
            None => Err(format!(
                "source {:?} is no longer in the config",
                row.source
            )),
        };
        match res {
            Ok(r) => {
                tracing::debug!(result = %r, "after_upload done");
                j.after_upload_done(row.id, after_upload_name(action), r.to_lowercase())
                    .await
            }
            Err(e) => {
                let msg = format!(
                    "after_upload failed for {}: {e}",
                    crate::phi::shown(&row.rel_path)
                );
                tracing::warn!(error = %e, "after_upload failed; will try again");
                j.retry_later(row.id, millis(policy::AFTER_UPLOAD_RETRY), true, msg)
                    .await
            }
        }
    }
}

/// How one row is checked.
struct Check {
    kind: crate::validate::Kind,
    max_line: usize,
    on_invalid: crate::validate::OnInvalid,
    dry_run: bool,
    /// The directory that should hold one DICOM study.
    dir: std::path::PathBuf,
}

/// The first DICOM study UID (its SHA-256: a UID is an identifier) seen per source directory.
#[derive(Clone, Default)]
struct StudyUids(Arc<std::sync::Mutex<StudyMap>>);

/// (source, directory) to the SHA-256 of the first study UID seen there ([0; 32]: reported).
type StudyMap = HashMap<(String, std::path::PathBuf), [u8; 32]>;

impl StudyUids {
    /// Notes a file's study; true the first time a directory shows a second one.
    fn second_study(&self, source: &str, dir: &std::path::Path, uid: &str) -> bool {
        let h = crate::hash::Sha256::digest(uid.as_bytes());
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() > 10_000 {
            m.clear();
        }
        let first = m
            .entry((source.to_string(), dir.to_path_buf()))
            .or_insert(h);
        if *first == h || *first == [0; 32] {
            return false;
        }
        // Reported once per directory.
        *first = [0; 32];
        true
    }
}

/// The record check of a fresh row, on the version that is then sent: None to go on and send
/// it (a failure with `upload-flagged` marks the row first), else how it ends (quarantined, or
/// the source changed or vanished under the read).
async fn check_row(
    row: &mut ObjectRow,
    origin: &Origin,
    how: Check,
    budget: &crate::sink::read::Budget,
    journal: &Journal,
    studies: &StudyUids,
) -> Option<Outcome> {
    use crate::validate::{self, Kind, OnInvalid};
    let mut expect = validate::fhir::Expect::default();
    if let (Origin::Dir(root), Kind::FhirNdjson) = (origin, how.kind) {
        let dir = row.rel_path.parent().unwrap_or(std::path::Path::new(""));
        let name = row.rel_path.file_name().and_then(|n| n.to_str());
        if let (Ok(bytes), Some(name)) = (
            tokio::fs::read(root.join(dir).join(crate::source::fs::MANIFEST)).await,
            name,
        ) {
            expect = crate::source::fs::manifest_expect(&bytes, name).unwrap_or_default();
        }
    }
    let pinned = match crate::sink::read::pin(row, origin).await {
        Ok(p) => p,
        Err(stop) => return Some(stop.into_outcome()),
    };
    let size = row.version.size();
    let res = validate::check_source(&pinned, size, how.kind, expect, how.max_line, budget).await;
    let m = crate::telemetry::metrics::agent();
    match res {
        Err(stop) => Some(stop.into_outcome()),
        Ok(Ok(valid)) => {
            m.validated(&row.source, true);
            if let Some(uid) = valid.dicom.as_ref().and_then(|d| d.study_uid.as_deref()) {
                if studies.second_study(&row.source, &how.dir, uid) {
                    let msg = format!(
                        "a directory holds files of more than one DICOM study (seen at {})",
                        row.key
                    );
                    tracing::warn!(key = %row.key, "{msg}");
                    if let Err(e) = journal.note_error(msg).await {
                        return Some(Outcome::Fatal(e));
                    }
                }
            }
            if row.flag.take().is_some() && !how.dry_run {
                if let Err(e) = journal.set_flag(row.id, None).await {
                    return Some(Outcome::Fatal(e));
                }
            }
            None
        }
        Ok(Err(invalid)) => {
            m.validated(&row.source, false);
            match how.on_invalid {
                OnInvalid::Quarantine => Some(Outcome::Quarantined(invalid)),
                OnInvalid::UploadFlagged => {
                    let msg = invalid.to_string();
                    tracing::warn!(check = %msg, "failed its record check; sending it tagged ha-edge-validation=failed (on_invalid = upload-flagged)");
                    // Fixed before the first byte: a resumed upload is tagged too.
                    if let Err(e) = journal.set_flag(row.id, Some(msg.clone())).await {
                        return Some(Outcome::Fatal(e));
                    }
                    row.flag = Some(msg);
                    None
                }
            }
        }
    }
}

/// An after_upload action's name in receipts.
fn after_upload_name(a: &AfterUpload) -> &'static str {
    match a {
        AfterUpload::Keep => "keep",
        AfterUpload::Delete => "delete",
        AfterUpload::MoveTo(_) | AfterUpload::MoveToPrefix(_) => "move",
    }
}

/// A delay as the journal's milliseconds.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The driver under tokio's paused clock: a scripted destination (what each delivery answers)
/// over a real journal whose clock follows tokio's, so that minutes of outage and probing run
/// in milliseconds and every delay is checked exactly, not by sleeping.
#[cfg(test)]
mod tests {
    /// A directory whose files belong to two DICOM studies is reported once; one study per
    /// directory, or the same study in two directories, is not.
    #[test]
    fn a_second_study_in_a_directory_is_reported_once() {
        let s = StudyUids::default();
        let d = std::path::Path::new("STUDY_1");
        assert!(!s.second_study("pacs", d, "1.2.3"));
        assert!(!s.second_study("pacs", d, "1.2.3"));
        assert!(!s.second_study("pacs", std::path::Path::new("STUDY_2"), "1.2.3"));
        assert!(s.second_study("pacs", d, "1.2.4"));
        assert!(!s.second_study("pacs", d, "1.2.5"), "reported once");
        assert!(!s.second_study("other", d, "1.2.4"), "per source");
    }

    use std::collections::VecDeque;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::config::Config;
    use crate::journal::Candidate;
    use crate::sink::{s3::Confirm, Unrecorded};
    use crate::version::Version;

    /// How long a scripted delivery takes (in paused time).
    const TRANSFER: Duration = Duration::from_millis(200);

    /// `gap`, the wait before attempt `round` (0-based) after a failure, is that round's delay
    /// of `backoff`: jittered down to half at most, never beyond it (1 s of slack for the
    /// driver's own work in paused time).
    fn assert_round_delay(what: &str, round: usize, gap: Duration, backoff: crate::retry::Backoff) {
        let full = backoff.base.saturating_mul(1 << round).min(backoff.cap);
        assert!(
            gap >= full / 2 && gap <= full + Duration::from_secs(1),
            "{what} {round}: {gap:?} after the previous failure (round delay {full:?})"
        );
    }

    /// A destination that answers from a script (then `Delivered`), and records when it was
    /// asked and how many deliveries were in flight then.
    #[derive(Default)]
    struct Scripted {
        script: Mutex<VecDeque<Outcome>>,
        /// (when, deliveries in flight including this one)
        calls: Mutex<Vec<(Instant, usize)>>,
        in_flight: AtomicUsize,
        /// Deliveries answered `Delivered`, and who waits for their number.
        delivered: AtomicUsize,
        progress: Notify,
        /// The key of each delivery asked for, in order, and who waits for the next.
        keys: Mutex<Vec<String>>,
        asked: Notify,
        /// If set, each delivery waits for a permit before it answers (the test says when).
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Scripted {
        /// Answers `n` deliveries with `failure()`, then delivers.
        fn failing(n: usize, failure: impl Fn() -> Outcome) -> Arc<Scripted> {
            let dest = Scripted::default();
            dest.script
                .lock()
                .unwrap()
                .extend((0..n).map(|_| failure()));
            Arc::new(dest)
        }
    }

    impl Destination for Scripted {
        async fn deliver(
            &self,
            _row: &ObjectRow,
            _origin: &Origin,
            _confirm: Confirm,
            _stop: watch::Receiver<bool>,
        ) -> (Outcome, Unrecorded) {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.calls.lock().unwrap().push((Instant::now(), n));
            self.keys.lock().unwrap().push(_row.key.clone());
            self.asked.notify_one();
            match &self.gate {
                Some(gate) => gate.acquire().await.expect("open").forget(),
                None => tokio::time::sleep(TRANSFER).await,
            }
            let next = self.script.lock().unwrap().pop_front();
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let outcome = next.unwrap_or_else(|| {
                self.delivered.fetch_add(1, Ordering::SeqCst);
                self.progress.notify_one();
                Outcome::Delivered([7; 32], Landed::default())
            });
            (outcome, None)
        }
        async fn preflight(&self) -> Preflight {
            Preflight::Ok
        }
        async fn ready(&self) {}
        fn endpoint(&self) -> String {
            "scripted://".into()
        }
        fn bucket(&self) -> String {
            "scripted".into()
        }
        async fn close(&self) {}
    }

    struct World {
        _dir: tempfile::TempDir,
        journal: Journal,
        config: Config,
        /// Slots for small objects and the size they are below: none by default (every object
        /// takes one of the `concurrency` slots, which the tests count).
        small: (usize, u64),
    }

    /// A journal on a clock that follows tokio's (paused) time, with `objects` files offered.
    async fn world(objects: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("urgent")).unwrap();
        let text = format!(
            "[agent]\njournal = \"{d}/journal.db\"\nconcurrency = 4\n\n\
             [[source]]\nname = \"fhir\"\ntype = \"fs\"\npath = \"{d}/in\"\nkey_prefix = \"f/\"\n\n\
             [[source]]\nname = \"urgent\"\ntype = \"fs\"\npath = \"{d}/urgent\"\n\
             key_prefix = \"u/\"\npriority = 10\n\n\
             [destination]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nregion = \"r\"\n\
             bucket = \"bucket\"\nprefix = \"p/\"\npath_style = true\n",
            d = dir.path().display()
        );
        let config = Config::parse_with_env(&dir.path().join("t.toml"), &text, &|_| None).unwrap();
        let (base, t0) = (crate::journal::now_ms(), Instant::now());
        let clock: crate::journal::Clock =
            Arc::new(move || base + i64::try_from(t0.elapsed().as_millis()).unwrap_or(i64::MAX));
        let journal = Journal::open_with_clock(&config.agent.journal, clock).unwrap();
        let batch = (0..objects)
            .map(|i| Candidate {
                rel_path: PathBuf::from(format!("{i}.ndjson")),
                key: format!("p/{i}.ndjson"),
                version: Version::File {
                    size: 10,
                    mtime_ns: 1,
                    inode: i as u64,
                },
            })
            .collect();
        journal.offer("fhir".into(), batch, true).await.unwrap();
        World {
            _dir: dir,
            journal,
            config,
            small: (1, 0),
        }
    }

    /// Runs the daemon's driver against `dest` until it has delivered `objects` and the journal
    /// has recorded them, then stops it and returns what it did. No timer of the test's own
    /// runs meanwhile: paused time advances only to the driver's (and the deliveries') timers.
    async fn drive(w: &World, dest: Arc<Scripted>, objects: usize) -> Summary {
        drive_woken(w, dest, objects, Arc::new(Notify::new())).await
    }

    /// `drive`, with the sources' wake-up given (a test that offers more while it runs).
    async fn drive_woken(
        w: &World,
        dest: Arc<Scripted>,
        objects: usize,
        wake: Arc<Notify>,
    ) -> Summary {
        let wiring = Wiring {
            journal: w.journal.clone(),
            sink: dest.clone(),
            sources: w
                .config
                .sources
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            origins: w
                .config
                .sources
                .iter()
                .map(|s| (s.name.clone(), Origin::Dir(s.path.clone())))
                .collect(),
            once: false,
            concurrency: w.config.agent.concurrency,
            small_objects: w.small.0,
            small_below: w.small.1,
            shutdown_grace: Duration::from_secs(5),
            agent: "test".into(),
            dry_run: false,
        };
        let (stop_sources, _) = watch::channel(false);
        let intake = Intake {
            running: JoinSet::new(),
            stop: stop_sources,
            wake,
            once_sources: Vec::new(),
            held: 0,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let journal = w.journal.clone();
        let watcher = tokio::spawn(async move {
            // A hang must fail, not stall CI: real time (paused time cannot run out).
            let started = std::time::Instant::now();
            loop {
                let done = journal.status().unwrap().objects["done"];
                if usize::try_from(done).unwrap() >= objects {
                    break;
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(120),
                    "the driver did not deliver {objects} objects"
                );
                if dest.delivered.load(Ordering::SeqCst) >= objects {
                    // All answered; the last commits are on their way.
                    tokio::task::yield_now().await;
                } else {
                    dest.progress.notified().await;
                }
            }
            let _ = stop_tx.send(true);
        });
        let summary = run(wiring, intake, Summary::default(), stop_rx)
            .await
            .unwrap();
        watcher.await.unwrap();
        summary
    }

    /// Small objects have extra slots besides `concurrency`, opened one per delivered object:
    /// the first four of 80 go alone (as many as `concurrency`); once they are delivered, four
    /// more slots are open (8 at once), and so on up to 4 + 16, never more. Deliveries answer
    /// only when the test lets them (a gate), so what is in flight is counted exactly.
    #[tokio::test(start_paused = true)]
    async fn small_objects_go_many_at_a_time_once_the_link_delivers() {
        let mut w = world(80).await;
        w.small = (16, 100); // the objects are 10 bytes
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let dest = Arc::new(Scripted {
            gate: Some(gate.clone()),
            ..Scripted::default()
        });
        let d = dest.clone();
        let driver = tokio::spawn(async move { drive(&w, d, 80).await.delivered });
        // Waits (real time bounded) until `n` deliveries are under way, then lets the driver
        // dispatch whatever more it would (paused time moves on only once it is idle).
        let in_flight_settles_at = |n: usize| {
            let dest = dest.clone();
            async move {
                let started = std::time::Instant::now();
                while dest.in_flight.load(Ordering::SeqCst) < n {
                    assert!(
                        started.elapsed() < std::time::Duration::from_secs(20),
                        "{} in flight, waiting for {n}",
                        dest.in_flight.load(Ordering::SeqCst)
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                dest.in_flight.load(Ordering::SeqCst)
            }
        };
        assert_eq!(
            in_flight_settles_at(4).await,
            4,
            "no extra slot before a delivery"
        );
        let mut delivered = 0;
        for want in [8, 16, 20, 20] {
            let now = dest.in_flight.load(Ordering::SeqCst);
            gate.add_permits(now);
            delivered += now;
            // The answered ones leave; as many new ones as slots are open come.
            while dest.delivered.load(Ordering::SeqCst) < delivered {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(
                in_flight_settles_at(want).await,
                want,
                "after {delivered} delivered"
            );
        }
        gate.add_permits(1000);
        assert_eq!(driver.await.unwrap(), 80);
        let peak = dest.calls.lock().unwrap().iter().map(|c| c.1).max();
        assert_eq!(peak, Some(20), "never more than concurrency + 16 at once");
    }

    /// The extra slots of small objects: one opens per delivery, up to the maximum; a failure
    /// closes them all, also those in use (they are not free again when they come back).
    #[test]
    fn small_slots_open_per_delivery_and_close_on_failure() {
        let mut s = SmallSlots::new(3);
        assert!(s.take().is_none());
        for _ in 0..5 {
            s.grow();
        }
        assert_eq!(s.available(), 3, "at most the maximum");
        let (a, b) = (s.take().unwrap(), s.take().unwrap());
        assert_eq!(s.available(), 1);
        s.close();
        assert_eq!(s.available(), 0);
        drop((a, b));
        assert_eq!(s.available(), 0, "slots in use when closed stay closed");
        s.grow();
        assert_eq!(s.available(), 1);
        assert!(s.take().is_some());
    }

    /// Priorities: with a backlog of a low-priority source in flight and prefetched, an object
    /// of a higher-priority source offered meanwhile takes the next free transfer slot.
    #[tokio::test(start_paused = true)]
    async fn a_higher_priority_object_takes_the_next_free_slot() {
        let w = world(20).await;
        w.journal
            .set_priorities(vec![("fhir".into(), 0), ("urgent".into(), 10)])
            .await
            .unwrap();
        let dest = Arc::new(Scripted::default());
        let wake = Arc::new(Notify::new());
        let (journal, d, woken) = (w.journal.clone(), dest.clone(), wake.clone());
        let offer = tokio::spawn(async move {
            while d.keys.lock().unwrap().len() < 4 {
                d.asked.notified().await;
            }
            let urgent = Candidate {
                rel_path: PathBuf::from("urgent.ndjson"),
                key: "p/urgent.ndjson".into(),
                version: Version::File {
                    size: 10,
                    mtime_ns: 1,
                    inode: 999,
                },
            };
            journal
                .offer("urgent".into(), vec![urgent], true)
                .await
                .unwrap();
            let asked_before = d.keys.lock().unwrap().len();
            woken.notify_one();
            asked_before
        });
        let summary = drive_woken(&w, dest.clone(), 21, wake).await;
        assert_eq!(summary.delivered, 21);
        let asked_before = offer.await.unwrap();
        let keys = dest.keys.lock().unwrap().clone();
        let at = keys.iter().position(|k| k == "p/urgent.ndjson").unwrap();
        // The next free slot (a dispatch round already under way when the offer landed may
        // finish first: at most concurrency - 1 more).
        assert!(
            at <= asked_before + 3,
            "offered after {asked_before} deliveries began, dispatched as number {at}: {keys:?}"
        );
    }

    /// An outage: the four objects in flight fail at once and the operator hears of it once;
    /// then one object at a time probes, at the outage probe's growing delays (each at least
    /// its lower bound, none beyond the cap); when the destination answers, all are delivered
    /// and the journal says so.
    #[tokio::test(start_paused = true)]
    async fn an_outage_is_probed_one_object_at_a_time_with_growing_delays() {
        let w = world(6).await;
        let failures = 4 + 5; // the first wave of four, then five failed probes
        let dest = Scripted::failing(failures, || {
            Outcome::Unreachable("connect: connection refused".into())
        });
        let summary = drive(&w, dest.clone(), 6).await;
        assert_eq!(summary.delivered, 6);
        let calls = dest.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), failures + 6, "{calls:?}");
        // The first wave: four at once.
        assert!(calls[..4].iter().any(|(_, n)| *n == 4), "{calls:?}");
        // Probes: one object at a time, with delays growing within OUTAGE_PROBE's bounds.
        let probes = &calls[4..=failures];
        assert!(probes.iter().all(|(_, n)| *n == 1), "{calls:?}");
        let first_failure = calls[3].0 + TRANSFER;
        let mut prev = first_failure;
        for (round, (at, _)) in probes.iter().enumerate() {
            assert_round_delay("probe", round, *at - prev, policy::OUTAGE_PROBE);
            prev = *at + TRANSFER;
        }
        // Told once; the journal says ok again.
        let st = w.journal.status().unwrap();
        let told = st
            .last_errors
            .iter()
            .filter(|e| e.message.contains("connection refused"))
            .count();
        assert_eq!(told, 1, "{:?}", st.last_errors);
        assert_eq!(st.agent.get("destination").map(String::as_str), Some("ok"));
    }

    /// A failed object waits out its own backoff, growing with its attempts, while the others
    /// go on; the journal counts the attempts.
    #[tokio::test(start_paused = true)]
    async fn a_failing_object_backs_off_while_the_others_go_on() {
        let w = world(1).await;
        let dest = Scripted::failing(3, || Outcome::Retry("503 SlowDown".into()));
        let summary = drive(&w, dest.clone(), 1).await;
        assert_eq!(summary.delivered, 1);
        let calls = dest.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 4, "{calls:?}");
        for (attempt, pair) in calls.windows(2).enumerate() {
            let gap = pair[1].0 - (pair[0].0 + TRANSFER);
            assert_round_delay("retry", attempt, gap, policy::OBJECT_RETRY);
        }
    }
}
