//! Wiring: credentials, the journal, the sink and the sources, handed to the scheduler; and
//! `serve`, which restarts all of it with a new config on SIGHUP.
//!
//! # Reload
//! SIGHUP re-reads the file; if it is valid, the running scheduler is asked to stop (parts in
//! flight finish within `shutdown_grace`) and a new run starts with the new config on the same
//! journal; if not, the problems are logged and the running config stays. `--once` ignores it.
//!
//! Must not break: credentials are resolved before the journal is created (a run that cannot
//! authenticate leaves nothing behind), and a reload keeps the running config when the new one
//! is not valid.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::config::{Config, Destination, SourceKind};
use crate::journal::{Journal, JournalError};
use crate::progress;
use crate::receipts;
use crate::relay::client::{LinkError, RelayClient};
use crate::s3::{credentials, S3Client, S3Error};
use crate::scheduler::{self, Intake, Summary, Wiring};
use crate::shutdown::Request;
use crate::sink::dry_run::DryRun;
use crate::sink::read::Origin;
use crate::sink::relay::RelaySink;
use crate::sink::s3::{S3Sink, UploadParams};
use crate::sink::Sink;
use crate::source::bucket::BucketSource;
use crate::source::fs::{FsSource, SourceReport};
use crate::systemd;
use crate::telemetry;

/// Why a run could not start or had to stop (mapped to exit codes in `main.rs`).
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
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("pseudonymisation key: {0}")]
    Pseudonym(String),
}

/// How `ha-edge run` was asked to run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// `--once`: send what is complete now, then exit.
    pub once: bool,
    /// `--dry-run` (with `--once`): list what would be sent; send and change nothing.
    pub dry_run: bool,
}

/// Runs until stopped, restarting with a new config on SIGHUP when that config is valid.
pub async fn serve(
    file: &Path,
    mut config: Config,
    opts: RunOptions,
    mut requests: mpsc::UnboundedReceiver<Request>,
) -> Result<Summary, AppError> {
    let mut digest = config_digest(file);
    // The metrics endpoint outlives reloads (its port stays bound); it reads the journal of
    // the config it started with.
    let (metrics_stop, metrics_rx) = watch::channel(false);
    if let Some(addr) = config.agent.metrics.filter(|_| !opts.dry_run) {
        let listener = telemetry::serve::bind(addr)
            .await
            .map_err(|e| AppError::Metrics(format!("cannot listen on {addr}: {e}")))?;
        tracing::info!(address = %addr, "metrics on /metrics, /healthz, /readyz");
        let exporter = Arc::new(telemetry::AgentExporter::new(
            config.agent.journal.clone(),
            config.sources.iter().map(|s| s.name.clone()).collect(),
        ));
        tokio::spawn(telemetry::serve::serve(listener, exporter, metrics_rx));
    }
    let _metrics_stop = metrics_stop;
    loop {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut next_config = None;
        let running = run(config.clone(), digest.clone(), opts, stop_rx);
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
                            digest = config_digest(file);
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

/// One run with one config: credentials, journal, sink and sources wired, then the scheduler until
/// it is done (`--once`) or `shutdown`.
pub async fn run(
    config: Config,
    config_digest: String,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary, AppError> {
    // Credentials first: a run that cannot authenticate must not create a journal.
    let dest_creds = match &config.destination {
        // A dry run talks to no destination.
        _ if opts.dry_run => None,
        Destination::S3(d) => Some(credentials::resolve(d)?),
        Destination::Relay(_) => None,
    };
    let a = &config.agent;
    // The key was checked with the config; it is read again here, where it is used.
    crate::phi::install(&config).map_err(AppError::Pseudonym)?;
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
                    (a.concurrency + a.small_objects_in_flight) * 2,
                )?;
                Origin::Bucket {
                    client,
                    prefix: conn.prefix.clone(),
                }
            }
        };
        origins.insert(s.name.clone(), origin);
    }
    // A dry run works on a copy of the journal (the real one is never written) and lists what
    // it would send instead of sending it.
    let scratch = if opts.dry_run {
        Some(Scratch::copy_of(&config.agent.journal)?)
    } else {
        None
    };
    let journal = match &scratch {
        Some(s) => Journal::open(&s.journal())?,
        None => Journal::open(&config.agent.journal)?,
    };
    telemetry::metrics::agent()
        .journal_open
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for s in &config.sources {
        telemetry::metrics::agent().register_source(&s.name);
    }
    let a = &config.agent;
    let mut receipts_client: Option<Arc<S3Client>> = None;
    let sink = match (&config.destination, dest_creds) {
        _ if opts.dry_run => None,
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
                (a.concurrency + a.small_objects_in_flight) * 2,
            )?;
            receipts_client = Some(client.clone());
            let params = UploadParams {
                part_size: a.part_size,
                multipart_threshold: a.multipart_threshold,
            };
            Some(Sink::S3(S3Sink::new(
                client,
                journal.clone(),
                params,
                a.parts_in_flight,
            )))
        }
        (Destination::Relay(r), _) => {
            tracing::info!(relay = %r.relays.join(", "), server_name = %r.server_name, prefix = %r.prefix, "destination: QUIC relay");
            let client = RelayClient::new(
                r,
                &a.name,
                a.request_timeout.min(std::time::Duration::from_secs(60)),
            )?;
            let budget = (a.parts_in_flight as u64 * a.part_size).max(a.multipart_threshold);
            Some(Sink::Relay(RelaySink::new(client, journal.clone(), budget)))
        }
        (Destination::S3(_), None) => unreachable!("credentials resolved above"),
    };
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
    // Priorities apply to what waits already, too (a reload may change them).
    journal
        .set_priorities(
            config
                .sources
                .iter()
                .map(|s| (s.name.clone(), s.priority))
                .collect(),
        )
        .await?;
    // Which config is in force (after a reload too): `status` shows it.
    journal.set_agent_state("config", config_digest).await?;

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

    let journal_handle = journal.clone();
    let intake = Intake {
        running: sources,
        stop: stop_tx,
        wake,
        once_sources,
        held,
    };
    let Some(sink) = sink else {
        let real = Journal::open_readonly(&config.agent.journal).ok();
        let wiring = wire(journal, Arc::new(DryRun::new(real)), &config, origins, opts);
        let summary = scheduler::dispatch::run(wiring, intake, summary, shutdown).await?;
        drop(scratch);
        return Ok(summary);
    };
    let wiring = wire(journal, Arc::new(sink), &config, origins, opts);
    let (display_stop, display_rx) = watch::channel(false);
    let display = {
        use std::io::IsTerminal;
        let mode = match (opts.once, std::io::stderr().is_terminal()) {
            (true, true) => progress::Mode::Bars,
            (true, false) => progress::Mode::Lines,
            (false, _) => progress::Mode::Daemon,
        };
        if opts.once {
            let pending = journal_handle.unsent_totals().await?;
            let b = progress::board();
            b.expected_objects
                .store(pending.0, std::sync::atomic::Ordering::Relaxed);
            b.expected_bytes
                .store(pending.1, std::sync::atomic::Ordering::Relaxed);
        }
        tokio::spawn(progress::run_display(mode, display_rx))
    };
    // The limit in force before the first byte; then the timetable's edges.
    crate::bandwidth::apply(&config.agent.bandwidth);
    tokio::spawn(crate::bandwidth::run_schedule(
        config.agent.bandwidth.clone(),
        shutdown.clone(),
    ));
    let housekeeping =
        Housekeeping::start(&config, &journal_handle, receipts_client, opts, &shutdown).await?;
    let summary = scheduler::dispatch::run(wiring, intake, summary, shutdown).await;
    let _ = display_stop.send(true);
    let _ = display.await;
    let summary = summary?;
    housekeeping.finish().await;
    Ok(summary)
}

/// The scheduler's wiring for `sink`.
fn wire<D>(
    journal: Journal,
    sink: Arc<D>,
    config: &Config,
    origins: HashMap<String, Origin>,
    opts: RunOptions,
) -> Wiring<D> {
    Wiring {
        journal,
        sink,
        sources: config
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect(),
        origins,
        once: opts.once,
        concurrency: config.agent.concurrency,
        small_objects: small_objects(config),
        small_below: small_below(&config.agent),
        shutdown_grace: config.agent.shutdown_grace,
        agent: config.agent.name.clone(),
        dry_run: opts.dry_run,
    }
}

/// Extra slots for small objects, direct to S3 and through a relay alike (a relay bounds each
/// agent's streams itself: QUIC's stream limit holds back what is over `max_streams_per_agent`).
fn small_objects(config: &Config) -> usize {
    config.agent.small_objects_in_flight
}

/// Objects below this size are small: `small_objects_in_flight` of them fit the sink's memory
/// budget (1 MiB with the defaults), and they are single PUTs.
fn small_below(a: &crate::config::AgentConfig) -> u64 {
    let budget = (a.parts_in_flight as u64 * a.part_size).max(a.multipart_threshold);
    (budget / a.small_objects_in_flight.max(1) as u64).min(a.multipart_threshold)
}

/// A private scratch directory holding a copy of the journal, removed when dropped.
struct Scratch {
    dir: std::path::PathBuf,
}

impl Scratch {
    /// A copy of the journal at `real` (an empty journal if there is none yet).
    fn copy_of(real: &Path) -> Result<Scratch, JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!(
            "ha-edge-dry-run-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let io = |e: std::io::Error| JournalError::Open {
            path: dir.clone(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io)?;
        let scratch = Scratch { dir };
        if real.exists() {
            Journal::open_readonly(real)?.copy_to(&scratch.journal())?;
        }
        Ok(scratch)
    }

    fn journal(&self) -> std::path::PathBuf {
        self.dir.join("journal.db")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The receipts' housekeeping beside a run: retention, and batches in the bucket.
struct Housekeeping {
    tasks: JoinSet<()>,
    /// `--once`: one flush of the batches at the end of the run.
    once_flush: Option<(Journal, Arc<S3Client>, receipts::batch::Settings)>,
    /// `--once` with `stable_dir` sources: one look at the studies at the end of the run.
    once_studies: Option<(Journal, Arc<S3Client>, String)>,
}

impl Housekeeping {
    /// Prunes receipts past `receipts_keep` now and hourly, and starts the batch task.
    async fn start(
        config: &Config,
        journal: &Journal,
        client: Option<Arc<S3Client>>,
        opts: RunOptions,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Housekeeping, JournalError> {
        let mut tasks = JoinSet::new();
        let to_bucket = config.receipts.is_some() && client.is_some();
        if let Some(keep) = config.agent.receipts_keep {
            let cutoff = move || {
                receipts::record::now_ms() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX)
            };
            let pruned = journal.prune_receipts(cutoff(), to_bucket).await?;
            if pruned > 0 {
                tracing::info!(receipts = pruned, keep = %humantime::format_duration(keep), "old receipts removed (receipts_keep)");
            }
            if !opts.once {
                let (j, mut stop) = (journal.clone(), shutdown.clone());
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                            _ = stop.changed() => return,
                        }
                        if let Err(e) = j.prune_receipts(cutoff(), to_bucket).await {
                            tracing::warn!(error = %e, "receipt retention failed; trying again in an hour");
                        }
                    }
                });
            }
        }
        let mut once_studies = None;
        let studies = config
            .sources
            .iter()
            .any(|s| matches!(s.complete_when, crate::config::Completion::StableDir { .. }));
        if let (true, Some(client)) = (studies, &client) {
            let (j, c, agent) = (journal.clone(), client.clone(), config.agent.name.clone());
            if opts.once {
                once_studies = Some((j, c, agent));
            } else {
                tasks.spawn(crate::studies::run(j, c, agent, shutdown.clone()));
            }
        }
        let mut once_flush = None;
        if let (Some(r), Some(client)) = (&config.receipts, client) {
            let settings = receipts::batch::Settings {
                prefix: r.prefix.clone(),
                agent: config.agent.name.clone(),
                every: r.every,
            };
            if opts.once {
                once_flush = Some((journal.clone(), client, settings));
            } else {
                tasks.spawn(receipts::batch::run(
                    journal.clone(),
                    client,
                    settings,
                    shutdown.clone(),
                ));
            }
        }
        Ok(Housekeeping {
            tasks,
            once_flush,
            once_studies,
        })
    }

    /// After the run: the last batch, and the tasks' end.
    async fn finish(mut self) {
        if let Some((journal, client, agent)) = self.once_studies.take() {
            if let Err(e) = crate::studies::complete_ready(&journal, &client, &agent).await {
                tracing::warn!(error = %e, "studies not completed; the next run looks again");
            }
        }
        if let Some((journal, client, settings)) = self.once_flush.take() {
            match receipts::batch::flush(&journal, &client, &settings).await {
                Ok(n) => tracing::info!(batches = n, "receipts uploaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "receipts not uploaded; the next run sends them");
                    let _ = journal.note_error(e.to_string()).await;
                }
            }
        }
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The SHA-256 of the config file as read (the first 16 hex digits), so `status` can say which
/// config is in force.
fn config_digest(file: &Path) -> String {
    std::fs::read(file).map_or_else(
        |e| format!("unreadable ({e})"),
        |bytes| {
            format!(
                "sha256:{}",
                &hex::encode(crate::hash::Sha256::digest(&bytes))[..16]
            )
        },
    )
}
