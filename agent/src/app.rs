//! Wiring and the scheduler: open the journal, start the sources, and hand runnable objects to
//! the sink, at most `concurrency` at a time. The scheduler is the only place where delivery
//! outcomes become journal states and retry decisions.
//!
//! Destination-level refusals (credentials, bucket, region) pause dispatching instead of failing
//! every object: the operator is told once, `status` shows it, and the daemon probes again with
//! one object after a growing delay. `--once` stops at the first such refusal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::Path;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::Destination;
use crate::config::{AfterUpload, Config, SourceConfig, SourceKind};
use crate::journal::{Journal, JournalError, ObjectRow, State};
use crate::relay::client::{LinkError, RelayClient};
use crate::retry::{Backoff, Class};
use crate::s3::{credentials, S3Client, S3Error};
use crate::shutdown::Request;
use crate::sink::read::Origin;
use crate::sink::relay::RelaySink;
use crate::sink::s3::{Confirm, S3Sink, UploadParams};
use crate::sink::{Outcome, Sink};
use crate::source::bucket::{self, BucketAfter, BucketSource};
use crate::source::fs::{after_upload, AfterResult, FsSource, SourceReport};
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("S3 credentials: {0}")]
    Credentials(#[from] credentials::CredentialsError),
    #[error("source {source_name:?}: {error}")]
    SourceCredentials {
        source_name: String,
        error: credentials::CredentialsError,
    },
    #[error(transparent)]
    Setup(#[from] S3Error),
    #[error(transparent)]
    Relay(#[from] LinkError),
}

#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub once: bool,
}

/// What a run did; `--once` prints it and derives the exit code from it.
#[derive(Debug, Default)]
pub struct Summary {
    pub delivered: u64,
    pub bytes: u64,
    pub rejected: u64,
    /// Objects left alone because another writer's object is at their key.
    pub conflicts: u64,
    pub vanished: u64,
    pub failed: u64,
    pub changed: u64,
    pub unsettled: usize,
    pub refused: usize,
    pub destination_error: Option<String>,
    /// The destination stopped answering (`--once` stops dispatching and exits 1).
    pub unreachable: Option<String>,
    /// Bucket listings that failed.
    pub source_errors: usize,
}

impl Summary {
    pub fn all_delivered(&self) -> bool {
        self.rejected == 0
            && self.conflicts == 0
            && self.refused == 0
            && self.changed == 0
            && self.failed == 0
            && self.source_errors == 0
            && self.destination_error.is_none()
            && self.unreachable.is_none()
    }
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

/// Rows fetched from the journal per dispatch query.
const PREFETCH: usize = 64;
/// Delivered objects whose commit may be pending while others transfer.
const COMMIT_BACKLOG: usize = 64;

/// Delay before probing a destination that refused us, growing up to 10 minutes.
const PROBE: Backoff = Backoff {
    base: Duration::from_secs(30),
    cap: Duration::from_secs(600),
};

/// Delay before probing a destination that stopped answering, growing up to 1 minute (the
/// request-level retries have already waited before an outage is declared).
const OUTAGE_PROBE: Backoff = Backoff {
    base: Duration::from_secs(2),
    cap: Duration::from_secs(60),
};

/// A source whose keys the destination refuses (403 AccessDenied on its prefix), while other
/// sources go on.
struct SourcePause {
    code: String,
    message: String,
    round: u32,
    until: Instant,
}

struct Scheduler {
    journal: Journal,
    sink: Arc<Sink>,
    sources: HashMap<String, SourceConfig>,
    /// Where each source's bytes come from.
    origins: HashMap<String, Origin>,
    once: bool,
    summary: Summary,
    paused_until: Option<Instant>,
    probe_round: u32,
    refused_code: Option<String>,
    /// Since when the destination has not answered at all (outage), if it has not.
    unreachable_since: Option<Instant>,
    source_pauses: HashMap<String, SourcePause>,
    /// The journal already says "destination: ok" (written on changes only, not per object).
    destination_ok_recorded: bool,
}

/// This machine's name, for the relay's logs (authorization uses the certificate).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "ha-edge".into())
}

/// Runs until stopped, restarting with a new config on SIGHUP when that config is valid.
pub async fn serve(
    file: &Path,
    mut config: Config,
    opts: RunOptions,
    mut requests: mpsc::UnboundedReceiver<Request>,
) -> Result<Summary, AppError> {
    loop {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut next_config = None;
        let running = run(config.clone(), opts, stop_rx);
        tokio::pin!(running);
        let result = loop {
            tokio::select! {
                res = &mut running => break res,
                Some(req) = requests.recv() => match req {
                    Request::Stop => {
                        systemd::stopping();
                        next_config = None;
                        let _ = stop_tx.send(true);
                    }
                    Request::Reload if opts.once => {
                        tracing::info!("SIGHUP ignored in --once mode");
                    }
                    Request::Reload => match Config::load(file) {
                        Ok(new) => {
                            tracing::info!(config = %file.display(), "config re-read and valid: restarting with it after parts in flight finish");
                            systemd::reloading();
                            next_config = Some(new);
                            let _ = stop_tx.send(true);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reload refused: the config file is not valid; keeping the running config");
                        }
                    },
                },
            }
        };
        match next_config.take() {
            Some(new) => {
                result?;
                config = new;
            }
            None => return result,
        }
    }
}

pub async fn run(
    config: Config,
    opts: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Summary, AppError> {
    // Credentials first: a run that cannot authenticate must not create a journal.
    let dest_creds = match &config.destination {
        Destination::S3(d) => Some(credentials::resolve(d)?),
        Destination::Relay(_) => None,
    };
    let a = &config.agent;
    let mut origins: HashMap<String, Origin> = HashMap::new();
    for s in &config.sources {
        let origin = match &s.kind {
            SourceKind::Dir => Origin::Dir(s.path.clone()),
            SourceKind::Bucket(conn) => {
                let creds = credentials::resolve_source(conn).map_err(|error| {
                    AppError::SourceCredentials {
                        source_name: s.name.clone(),
                        error,
                    }
                })?;
                tracing::info!(source = %s.name, endpoint = %conn.endpoint, bucket = %conn.bucket, prefix = %conn.prefix, access_key_id = %creds.access_key_id(), credentials = %creds.origin, "bucket source");
                let client = S3Client::new(
                    conn,
                    creds,
                    a.max_retries,
                    a.request_timeout,
                    a.concurrency * 2,
                )?;
                Origin::Bucket {
                    client,
                    prefix: conn.prefix.clone(),
                }
            }
        };
        origins.insert(s.name.clone(), origin);
    }
    let journal = Journal::open(&config.agent.journal)?;
    let a = &config.agent;
    let sink = match (&config.destination, dest_creds) {
        (Destination::S3(d), Some(creds)) => {
            tracing::info!(
                endpoint = %d.endpoint,
                bucket = %d.bucket,
                access_key_id = %creds.access_key_id(),
                credentials = %creds.origin,
                "destination"
            );
            let client = S3Client::new(
                d,
                creds,
                a.max_retries,
                a.request_timeout,
                a.concurrency * 2,
            )?;
            let params = UploadParams {
                part_size: a.part_size,
                multipart_threshold: a.multipart_threshold,
            };
            Sink::S3(S3Sink::new(
                client,
                journal.clone(),
                params,
                a.parts_in_flight,
            ))
        }
        (Destination::Relay(r), _) => {
            tracing::info!(relay = %r.relay, server_name = %r.server_name, prefix = %r.prefix, "destination: QUIC relay");
            let agent_name = hostname();
            let client = RelayClient::new(
                r,
                &agent_name,
                a.request_timeout.min(std::time::Duration::from_secs(60)),
            )?;
            let budget = (a.parts_in_flight as u64 * a.part_size).max(a.multipart_threshold);
            Sink::Relay(RelaySink::new(client, journal.clone(), budget))
        }
        (Destination::S3(_), None) => unreachable!("credentials resolved above"),
    };
    let sink = Arc::new(sink);
    let requeued = journal.requeue_conflicts().await?;
    if requeued > 0 {
        tracing::info!(
            objects = requeued,
            "looking again at objects held by a conflict"
        );
    }
    journal
        .set_agent_state(
            "started",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        )
        .await?;
    journal
        .set_agent_state("pid", std::process::id().to_string())
        .await?;

    let wake = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sources: JoinSet<Result<SourceReport, JournalError>> = JoinSet::new();
    let mut summary = Summary::default();
    // `--once` keeps its sources to look again for manifests held back until their files are in.
    let mut once_sources: Vec<FsSource> = Vec::new();
    let mut held = 0usize;
    for s in &config.sources {
        if let Some(Origin::Bucket { client, .. }) = origins.get(&s.name) {
            let mut src = BucketSource::new(
                s.clone(),
                client.clone(),
                format!("{}{}", config.destination.prefix(), s.key_prefix),
                journal.clone(),
                wake.clone(),
            );
            if opts.once {
                let r = src.scan_once().await?;
                tracing::info!(source = %s.name, objects = r.seen, queued = r.offered, refused = r.refused, listing_failed = r.failed > 0, "listed");
                summary.refused += r.refused;
                summary.source_errors += r.failed;
            } else {
                sources.spawn(src.run(stop_rx.clone()));
            }
            continue;
        }
        let mut src = FsSource::new(
            s.clone(),
            format!("{}{}", config.destination.prefix(), s.key_prefix),
            journal.clone(),
            wake.clone(),
        );
        if opts.once {
            let r = src.scan_once().await?;
            tracing::info!(source = %s.name, files = r.seen, queued = r.offered, unsettled = r.unsettled, refused = r.refused, "scanned");
            summary.unsettled += r.unsettled;
            summary.refused += r.refused;
            held += r.held;
            once_sources.push(src);
        } else {
            sources.spawn(src.run(stop_rx.clone()));
        }
    }

    let mut sched = Scheduler {
        journal: journal.clone(),
        sink,
        sources: config
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect(),
        origins,
        once: opts.once,
        summary,
        paused_until: None,
        probe_round: 0,
        refused_code: None,
        unreachable_since: None,
        source_pauses: HashMap::new(),
        destination_ok_recorded: false,
    };
    sched.preflight().await?;
    systemd::ready();
    systemd::status("running");
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    let concurrency = config.agent.concurrency;
    // `concurrency` objects transfer at a time; an object whose upload is verified gives its
    // slot to the next one while its delivery waits for the journal's commit (fsync), so the
    // commit is off the transfer path even when the disk is slow. Such a task holds its journal
    // row and its bytes' share of the memory budget (a crash would send them again, so data
    // sent but not recorded stays within `parts_in_flight x part_size`); at most COMMIT_BACKLOG
    // of them wait at once.
    let transfers = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let max_tasks = concurrency + COMMIT_BACKLOG;
    let (obj_stop_tx, obj_stop_rx) = watch::channel(false);
    let mut inflight: JoinSet<Finished> = JoinSet::new();
    let mut inflight_ids: Vec<i64> = Vec::new();
    let mut cursor = 0i64;
    // Rows fetched ahead, so that dispatching an object does not wait for a journal query.
    let mut queued: std::collections::VecDeque<ObjectRow> = std::collections::VecDeque::new();
    let mut fetched_all = false;
    let mut draining = false;
    let mut grace_deadline: Option<tokio::time::Instant> = None;
    let mut delivered_at_scan = 0u64;

    loop {
        let mut exhausted = false;
        let may_dispatch = !draining && sched.destination_open();
        if may_dispatch && transfers.available_permits() > 0 && inflight.len() < max_tasks {
            // While probing a paused destination, one object at a time.
            let free = if sched.probe_round > 0 {
                1usize.saturating_sub(inflight.len())
            } else {
                transfers
                    .available_permits()
                    .min(max_tasks - inflight.len())
            };
            if free > 0 && queued.is_empty() {
                let want = PREFETCH.max(free);
                let rows = journal
                    .runnable(
                        want,
                        if opts.once { cursor } else { 0 },
                        !opts.once,
                        inflight_ids.clone(),
                    )
                    .await?;
                fetched_all = rows.len() < want;
                for row in &rows {
                    cursor = cursor.max(row.id);
                }
                queued.extend(rows);
            }
            exhausted = queued.is_empty() && fetched_all;
            let take = free.min(queued.len());
            let rows: Vec<ObjectRow> = queued.drain(..take).collect();
            for row in rows {
                if sched.defer_if_source_paused(&row).await? {
                    continue;
                }
                inflight_ids.push(row.id);
                let span = tracing::info_span!("object", id = row.id, key = %row.key);
                let sink = sched.sink.clone();
                let origin = sched.origins.get(&row.source).cloned();
                let stop = obj_stop_rx.clone();
                let keep = sched
                    .sources
                    .get(&row.source)
                    .is_none_or(|s| s.after_upload == AfterUpload::Keep);
                let journal = journal.clone();
                let slot = transfers
                    .clone()
                    .try_acquire_owned()
                    .expect("no more objects dispatched than free transfer slots");
                let wake = wake.clone();
                inflight.spawn(
                    async move {
                        let started = Instant::now();
                        let (outcome, unrecorded) = match (&origin, row.state) {
                            (None, _) => {
                                let why =
                                    format!("source {:?} is no longer in the config", row.source);
                                (Outcome::Retry(why), None)
                            }
                            (Some(_), State::Delivered) => {
                                let landed = crate::journal::Landed::default();
                                (
                                    Outcome::Delivered(row.sha256.unwrap_or_default(), landed),
                                    None,
                                )
                            }
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
                        // A first delivery is committed here, alongside the other objects in
                        // flight: the journal's group commit can batch them, the scheduler
                        // loop never waits for an fsync, and the transfer slot is free for the
                        // next object meanwhile. What a crash would send again stays counted in
                        // the memory budget until the commit (`unrecorded`). Nothing acts on
                        // this object (after_upload) before the commit: that happens once this
                        // task is joined.
                        let committed = match &outcome {
                            Outcome::Delivered(sha, landed) if row.state != State::Delivered => {
                                drop(slot);
                                wake.notify_one();
                                let done = journal
                                    .delivered(row.id, row.fingerprint, *sha, landed.clone(), keep)
                                    .await;
                                drop(unrecorded);
                                Some(done)
                            }
                            _ => None,
                        };
                        Finished {
                            took: started.elapsed(),
                            row,
                            outcome,
                            committed,
                        }
                    }
                    .instrument(span),
                );
            }
        }
        if inflight.is_empty() {
            if draining {
                break;
            }
            if opts.once && (exhausted || !may_dispatch) {
                // Manifests held back for files delivered in this run: look once more.
                if may_dispatch && held > 0 && sched.summary.delivered > delivered_at_scan {
                    delivered_at_scan = sched.summary.delivered;
                    let (mut offered, mut unsettled) = (0, 0);
                    held = 0;
                    for src in &mut once_sources {
                        let r = src.scan_once().await?;
                        offered += r.offered;
                        unsettled += r.unsettled;
                        held += r.held;
                    }
                    sched.summary.unsettled = unsettled;
                    if offered > 0 {
                        fetched_all = false;
                        continue;
                    }
                }
                break;
            }
        }
        let poll = if opts.once {
            Duration::from_secs(3600)
        } else {
            let next = journal
                .next_wakeup_ms()
                .await?
                .map(|ms| Duration::from_millis(ms as u64));
            let until_probe = sched
                .paused_until
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
                sched.settle_outcome(done).await?;
            }
            Some(res) = sources.join_next(), if !sources.is_empty() => {
                if let Ok(Err(e)) = res {
                    return Err(e.into());
                }
            }
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                // Fed from the scheduler loop itself: if the loop stalls, systemd restarts us.
                systemd::watchdog();
                let s = &sched.summary;
                systemd::status(&format!(
                    "{} delivered since start, {} in flight, destination {}",
                    s.delivered,
                    inflight.len(),
                    if sched.refused_code.is_some() {
                        "refusing"
                    } else if sched.unreachable_since.is_some() {
                        "unreachable"
                    } else {
                        "ok"
                    }
                ));
            }
            _ = wake.notified(), if !draining => {}
            _ = tokio::time::sleep(poll), if !draining => {}
            _ = shutdown.changed(), if !draining => {
                draining = true;
                let _ = stop_tx.send(true);
                let _ = obj_stop_tx.send(true);
                let grace = config.agent.shutdown_grace;
                tracing::info!(in_flight = inflight.len(), grace = %humantime::format_duration(grace), "shutting down: finishing parts in flight");
                grace_deadline = Some(tokio::time::Instant::now() + grace);
            }
            _ = async { tokio::time::sleep_until(grace_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if draining && grace_deadline.is_some() => {
                tracing::warn!(in_flight = inflight.len(), "grace period over: stopping; unfinished parts resume on the next start");
                inflight.abort_all();
                while inflight.join_next().await.is_some() {}
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    while let Some(res) = sources.join_next().await {
        if let Ok(Err(e)) = res {
            return Err(e.into());
        }
    }
    if let Sink::Relay(r) = &*sched.sink {
        // Tell the relay we are gone (streams in flight resume on the next start).
        let _ = tokio::time::timeout(Duration::from_secs(2), r.client().close()).await;
    }
    Ok(sched.summary)
}

impl Scheduler {
    /// The destination refuses everyone: tell the operator once per distinct cause, publish it
    /// for `status`, and pause (daemon) or stop dispatching (`--once`).
    async fn refuse(&mut self, err: &S3Error) -> Result<(), JournalError> {
        let msg = err.for_operator();
        let code = err.code().unwrap_or_default().to_string();
        if self.refused_code.as_deref() != Some(code.as_str()) {
            tracing::error!(endpoint = %self.sink.endpoint(), bucket = %self.sink.bucket(), error = %msg, "destination refuses uploads; pausing this destination");
            self.journal.note_error(msg.clone()).await?;
            self.refused_code = Some(code);
        }
        self.destination_ok_recorded = false;
        let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        self.journal
            .set_agent_state("destination", format!("refusing since {since}: {msg}"))
            .await?;
        if self.once {
            self.summary.destination_error.get_or_insert(msg);
        } else {
            self.probe_round += 1;
            let delay = PROBE.nth(self.probe_round, fastrand::f64());
            self.paused_until = Some(Instant::now() + delay);
            tracing::info!(probe_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())), "will probe the destination again");
        }
        Ok(())
    }

    /// HeadBucket before the first upload, so a missing bucket or wrong region is reported at
    /// once. A 403 proves nothing here (a least-privilege policy may lack s3:ListBucket), and a
    /// network error neither: the first real request decides those.
    async fn preflight(&mut self) -> Result<(), JournalError> {
        match self.sink.preflight().await {
            Ok(()) => {
                if let Sink::S3(s3) = &*self.sink {
                    s3.probe_conditional().await;
                }
                self.destination_ok_recorded = true;
                self.journal
                    .set_agent_state("destination", "ok".into())
                    .await
            }
            Err(e) if e.class() == Class::Destination && e.status() != Some(403) => {
                self.refuse(&e).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "bucket check inconclusive; continuing");
                Ok(())
            }
        }
    }

    /// The source changed under an upload: the object waits one settle period, then is tried
    /// again (and by then a rescan has recorded the new fingerprint).
    async fn wait_for_settle(&mut self, row: &ObjectRow, msg: String) -> Result<(), JournalError> {
        tracing::info!(reason = %msg, "source changed; waiting for it to settle");
        self.summary.changed += 1;
        // A bucket object is looked at again after the next listing has seen its new version.
        let settle = self
            .sources
            .get(&row.source)
            .map_or(Duration::from_secs(30), |s| {
                if s.is_dir() {
                    s.settle
                } else {
                    s.poll_interval
                }
            });
        self.journal
            .retry_later(row.id, settle.as_millis() as i64, false, msg)
            .await
    }

    /// Rows of a source whose keys the destination refuses wait until that source's next probe
    /// (daemon) or are left for the next run (`--once`). Returns true if the row was deferred.
    async fn defer_if_source_paused(&mut self, row: &ObjectRow) -> Result<bool, JournalError> {
        let Some(p) = self.source_pauses.get(&row.source) else {
            return Ok(false);
        };
        if self.once {
            self.summary.failed += 1;
            return Ok(true);
        }
        let now = Instant::now();
        if now >= p.until {
            return Ok(false);
        }
        let wait = p.until.duration_since(now).as_millis() as i64;
        let msg = p.message.clone();
        self.journal.retry_later(row.id, wait, false, msg).await?;
        Ok(true)
    }

    /// The destination refuses this source's keys only: pause that source, tell the operator
    /// once per cause, publish it for `status`.
    async fn refuse_source(&mut self, row: &ObjectRow, err: &S3Error) -> Result<(), JournalError> {
        let msg = err.for_operator();
        let code = err.code().unwrap_or_default().to_string();
        let now = Instant::now();
        let (round, new_cause) = match self.source_pauses.get(&row.source) {
            Some(p) if p.code == code && now < p.until => (p.round, false),
            Some(p) if p.code == code => (p.round + 1, false),
            _ => (1, true),
        };
        if new_cause {
            tracing::error!(source = %row.source, error = %msg, "destination refuses this source's keys; pausing this source (others go on)");
            self.journal.note_error(msg.clone()).await?;
            let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            self.journal
                .set_agent_state(
                    format!("source.{}", row.source),
                    format!("refused since {since}: {msg}"),
                )
                .await?;
        }
        let delay = PROBE.nth(round, fastrand::f64());
        self.source_pauses.insert(
            row.source.clone(),
            SourcePause {
                code,
                message: msg.clone(),
                round,
                until: now + delay,
            },
        );
        if self.once {
            self.summary.destination_error.get_or_insert(msg);
        } else {
            let wait = delay.as_millis() as i64;
            self.journal
                .retry_later(row.id, wait, false, err.to_string())
                .await?;
        }
        Ok(())
    }

    /// No answer from the destination: say so once when the outage starts, pause, and probe
    /// with one object at a growing interval (daemon); stop dispatching (`--once`).
    async fn outage(&mut self, row: &ObjectRow, msg: String) -> Result<(), JournalError> {
        if self.unreachable_since.is_none() {
            tracing::warn!(endpoint = %self.sink.endpoint(), error = %msg, "destination unreachable; pausing uploads and probing until it answers");
            self.journal.note_error(msg.clone()).await?;
            let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            self.journal
                .set_agent_state("destination", format!("unreachable since {since}: {msg}"))
                .await?;
            self.destination_ok_recorded = false;
            self.unreachable_since = Some(Instant::now());
        } else {
            tracing::debug!(error = %msg, "destination still unreachable");
        }
        if self.once {
            self.summary.failed += 1;
            self.summary.unreachable.get_or_insert(msg.clone());
            return self.journal.retry_later(row.id, 0, false, msg).await;
        }
        let now = Instant::now();
        if self.paused_until.is_none_or(|t| now >= t) {
            self.probe_round += 1;
            let delay = OUTAGE_PROBE.nth(self.probe_round, fastrand::f64());
            self.paused_until = Some(now + delay);
        }
        let wait = self
            .paused_until
            .map_or(0, |t| t.saturating_duration_since(now).as_millis() as i64);
        self.journal.retry_later(row.id, wait, false, msg).await
    }

    fn destination_open(&self) -> bool {
        if self.once {
            return self.summary.destination_error.is_none() && self.summary.unreachable.is_none();
        }
        self.paused_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Deletes or moves a delivered source (file or bucket object), only if it is still the
    /// version delivered; the row is done afterwards, or retried in a minute on failure.
    async fn after_upload(
        &mut self,
        row: &ObjectRow,
        action: &AfterUpload,
    ) -> Result<(), JournalError> {
        let j = &self.journal;
        let res: Result<String, String> = match self.origins.get(&row.source) {
            Some(Origin::Bucket { client, prefix }) => {
                let key = Origin::source_key(prefix, &row.rel_path);
                match bucket::after_upload(
                    client,
                    &key,
                    &row.rel_path,
                    action,
                    row.fingerprint,
                    row.etag.as_deref(),
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
                    row.fingerprint,
                    action.clone(),
                );
                let res = tokio::task::spawn_blocking(move || after_upload(&root, &rel, &act, fp))
                    .await
                    .map_err(|_| JournalError::Panicked)?;
                match res {
                    Ok(AfterResult::LeftChanged) => {
                        tracing::warn!(path = %row.rel_path.display(), "source changed after delivery: left in place; the new version will be sent");
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
                j.set_state(row.id, State::Done).await
            }
            Err(e) => {
                let msg = format!("after_upload failed for {}: {e}", row.rel_path.display());
                tracing::warn!(error = %e, "after_upload failed; will try again");
                j.retry_later(row.id, 60_000, true, msg).await
            }
        }
    }

    async fn settle_outcome(&mut self, done: Finished) -> Result<(), JournalError> {
        let Finished {
            row,
            outcome,
            took,
            committed,
        } = done;
        let j = &self.journal;
        match outcome {
            Outcome::Delivered(sha256, landed) => {
                if let Some(since) = self.unreachable_since.take() {
                    tracing::info!(endpoint = %self.sink.endpoint(), outage_secs = since.elapsed().as_secs(), "destination answers again; resuming uploads");
                    self.probe_round = 0;
                    self.paused_until = None;
                }
                if self.probe_round > 0 || self.refused_code.is_some() {
                    tracing::info!(bucket = %self.sink.bucket(), "destination accepts requests again");
                    self.probe_round = 0;
                    self.paused_until = None;
                    self.refused_code = None;
                }
                if self.source_pauses.remove(&row.source).is_some() {
                    tracing::info!(source = %row.source, "destination accepts this source's keys again");
                    j.set_agent_state(format!("source.{}", row.source), "ok".into())
                        .await?;
                }
                if !self.destination_ok_recorded {
                    j.set_agent_state("destination", "ok".into()).await?;
                    self.destination_ok_recorded = true;
                }
                let action = self
                    .sources
                    .get(&row.source)
                    .map_or(AfterUpload::Keep, |s| s.after_upload.clone());
                let first_time = row.state != State::Delivered;
                if first_time {
                    let fp = row.fingerprint;
                    let recorded = match committed {
                        Some(r) => r?,
                        None => {
                            j.delivered(row.id, fp, sha256, landed, action == AfterUpload::Keep)
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
                    self.summary.bytes += row.fingerprint.size;
                    let mbps = row.fingerprint.size as f64 / took.as_secs_f64().max(1e-6) / 1e6;
                    tracing::info!(key = %row.key, size = row.fingerprint.size, secs = took.as_secs_f64(), mb_per_s = format!("{mbps:.1}"), "delivered and verified");
                }
                if action != AfterUpload::Keep {
                    self.after_upload(&row, &action).await?;
                }
            }
            Outcome::Retry(msg) => {
                let n = row.attempts + 1;
                let delay = Backoff::OBJECT.nth(n, fastrand::f64());
                if self.once {
                    self.summary.failed += 1;
                    tracing::warn!(error = %msg, "not delivered in this run; it resumes on the next run");
                } else {
                    tracing::warn!(error = %msg, attempt = n, retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())), "transfer failed; will retry");
                }
                j.retry_later(row.id, delay.as_millis() as i64, true, msg)
                    .await?;
            }
            Outcome::Unreachable(msg) => self.outage(&row, msg).await?,
            Outcome::Destination(err) if err.is_scoped_to_keys() => {
                self.refuse_source(&row, &err).await?;
            }
            Outcome::Destination(err) => {
                j.retry_later(row.id, 0, false, err.to_string()).await?;
                self.refuse(&err).await?;
            }
            Outcome::Rejected(msg) => {
                tracing::error!(error = %msg, "rejected: this object will not be uploaded");
                self.summary.rejected += 1;
                j.finish_with_error(row.id, State::Rejected, msg).await?;
            }
            Outcome::Conflict(msg) => {
                // Reported once, as an error: the object stays until the operator decides,
                // and its source is never deleted or moved.
                tracing::error!(error = %msg, "conflict: another writer's object is at this key; not overwritten, source kept");
                self.summary.conflicts += 1;
                j.finish_with_error(row.id, State::Conflict, msg).await?;
            }
            Outcome::Vanished(msg) => {
                tracing::warn!(error = %msg, "source file disappeared before upload; skipped");
                self.summary.vanished += 1;
                j.finish_with_error(row.id, State::Vanished, msg).await?;
            }
            Outcome::Changed(msg) => {
                j.reset(row.id, None, msg.clone()).await?;
                self.wait_for_settle(&row, msg).await?;
            }
            Outcome::Interrupted => {
                tracing::info!("interrupted; resumes from the journal on the next start");
            }
            Outcome::Fatal(e) => return Err(e),
        }
        Ok(())
    }
}
