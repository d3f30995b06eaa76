//! ha-edge: parse the command line, load the config, run, and map the result to an exit code.
//!
//! Exit codes: 0 success; 1 run finished but not everything was delivered; 2 bad config,
//! credentials or usage; 3 the destination refused us (credentials, bucket, region); 4 the
//! journal is unusable.
//!
//! # Commands
//! - `run [--once]`: the daemon, or one pass over what is complete now.
//! - `validate [--offline]`: the config (every problem at once), the journal, and unless
//!   offline one cheap request to the destination and to each bucket source.
//! - `status [--json] [--stale-after 1h]`: what the journal says, with a health exit code.
//! - `receipts [--since T] [--until T] [--source S] [--format ndjson|csv] [verify]`: the chain
//!   of custody.
//! - `relay [--check]`: the cloud side of the QUIC link.
//!
//! Must not break: the exit codes above (scripts and systemd depend on them), and no secret in any
//! output.

/// The allocator, per command: musl's for the agent, mimalloc for the relay.
#[allow(unsafe_code)]
mod alloc;
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: alloc::Switch = alloc::Switch;

/// Wiring and reload.
mod app;
/// The bandwidth limit and its timetable.
mod bandwidth;
/// The command line.
mod cli;
/// The TOML files, validated.
mod config;
/// Globs on relative paths.
mod glob;
/// SHA-256.
mod hash;
/// Every object and part, in SQLite.
mod journal;
/// Paths to keys.
mod keymap;
/// PHI-safe keys and logs: key templates, pseudonyms, withheld paths.
mod phi;
/// What is in flight, and the live display.
mod progress;
/// Chain of custody: receipts and their batches in the bucket.
mod receipts;
/// The QUIC link: client and relay.
mod relay;
/// Which failures are tried again.
mod retry;
/// The S3 client, uploader and verifier.
mod s3;
/// Which object goes when, and what follows.
mod scheduler;
/// Signals.
mod shutdown;
/// Delivery.
mod sink;
/// Discovery.
mod source;
/// `ha-edge status`.
mod status;
/// Completion objects of studies released whole (`stable_dir`).
mod studies;
/// sd_notify and the watchdog.
mod systemd;
/// Metrics and health endpoints.
mod telemetry;
/// What identifies a source version.
mod validate;
mod version;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::{Config, LogFormat};

/// The run finished, but not everything was delivered.
const EXIT_INCOMPLETE: u8 = 1;
/// Bad config, credentials or usage.
const EXIT_CONFIG: u8 = 2;
/// The destination refused us (or `status`: refusing or unreachable).
const EXIT_DESTINATION: u8 = 3;
/// The journal is unusable.
const EXIT_JOURNAL: u8 = 4;

/// Parses the command line and runs the command.
fn main() -> ExitCode {
    alloc::tune();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config, offline } => validate(&config, offline),
        Command::Status {
            config,
            json,
            objects: true,
            state,
            limit,
            ..
        } => status::objects(&config, json, state, limit),
        Command::Status {
            config,
            json,
            stale_after,
            ..
        } => status(&config, json, stale_after),
        Command::Run {
            config,
            once,
            dry_run,
        } => run(&config, once, dry_run),
        Command::Relay { config, check } => {
            // Before the runtime starts a thread (see alloc).
            alloc::use_mimalloc();
            relay_main(&config, check)
        }
        Command::Lookup { config, key, json } => status::lookup(&config, key, json),
        Command::Check {
            kind,
            max_line,
            files,
        } => validate::cli::check(kind, max_line, &files),
        Command::Receipts {
            config,
            since,
            until,
            source,
            format,
            action,
        } => receipts::cli::main(
            &config,
            receipts::cli::Args {
                since,
                until,
                source,
                format,
                action,
            },
        ),
    }
}

/// `ha-edge relay`: validate its file (`--check`) or run the relay.
fn relay_main(file: &Path, check: bool) -> ExitCode {
    let cfg = match config::RelayConfig::load(file) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    if check {
        out(&format!(
            "{}: ok (listen {}, {} agent{})\n",
            file.display(),
            cfg.listen,
            cfg.agents.len(),
            if cfg.agents.len() == 1 { "" } else { "s" }
        ));
        return ExitCode::SUCCESS;
    }
    init_logging(cfg.log_format, &cfg.log_level);
    let rt = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        let mut requests =
            shutdown::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Some(r) = requests.recv().await {
                if matches!(r, shutdown::Request::Stop) {
                    let _ = stop_tx.send(true);
                    break;
                }
                tracing::info!(
                    "SIGHUP: the relay reads its config at start only; restart it to apply changes"
                );
            }
        });
        relay::server::serve(cfg, stop_rx)
            .await
            .map_err(|e| e.to_string())
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_CONFIG, e),
    }
}

/// Writes to stdout; a closed pipe (`ha-edge status | head -1`) ends the output quietly instead
/// of panicking as `println!` would.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Writes a line to stderr; a closed or broken stderr (a log pipe whose reader went away, a
/// journald restarting) is ignored: losing a message must never kill the agent, as
/// `eprintln!` would (it panics, and panic = "abort" ends the process).
fn err_line(text: &str) {
    use std::io::Write;
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{text}");
}

/// Prints `msg` as the one error line and exits with `code`.
fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    err_line(&format!("ha-edge: {msg}"));
    ExitCode::from(code)
}

/// The log sink: stderr, where a failed write is dropped (see `err_line`).
struct LogWriter;

impl std::io::Write for LogWriter {
    /// Writes to stderr; a closed stderr drops the line instead of panicking.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Above the progress bars, while they are drawn.
        progress::suspend(|| {
            let _ = std::io::stderr().write_all(buf);
        });
        Ok(buf.len())
    }

    /// Flushes stderr, ignoring a closed one.
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The agent runs on one thread (`new_current_thread`): it schedules objects and drives every
/// connection. The work that takes CPU or may block (opening, reading and hashing files,
/// directory walks) goes to tokio's blocking pool, and the journal has its own writer thread, so
/// one thread is enough for the rest. For many small files it is also cheaper: with a worker per
/// core, every object crossed between workers (17 futex calls and 12 context switches per file
/// for 5,000 x 20 KiB); on one thread it took 17 % less CPU and 6 % less wall time, and large
/// files went as fast. The relay serves many agents at once: one worker per core
/// (`new_multi_thread`).
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder
        .enable_all()
        .build()
        .map_err(|e| fail(EXIT_INCOMPLETE, format!("cannot start the runtime: {e}")))
}

/// Loads the config, printing every problem on failure.
fn load(file: &Path) -> Result<Config, ExitCode> {
    Config::load(file).map_err(|e| fail(EXIT_CONFIG, e))
}

/// `ha-edge validate`: the config, the journal, and (unless `--offline`) the destination and
/// bucket sources with one cheap request each.
fn validate(file: &Path, offline: bool) -> ExitCode {
    let config = match load(file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &config.destination {
        config::Destination::S3(d) => {
            if let Err(e) = s3::credentials::resolve(d) {
                return fail(EXIT_CONFIG, format!("{}: destination: {e}", file.display()));
            }
        }
        config::Destination::Relay(r) => {
            if let Err(e) = relay::client::cert_and_key(r).and_then(|(c, k)| {
                relay::tls::client_config(
                    &r.ca_file,
                    &c,
                    &k,
                    std::time::Duration::from_secs(30),
                    r.congestion,
                )
                .map_err(Into::into)
            }) {
                return fail(EXIT_CONFIG, format!("{}: destination: {e}", file.display()));
            }
        }
    }
    for s in &config.sources {
        if let config::SourceKind::Bucket(conn) = &s.kind {
            if let Err(e) = s3::credentials::resolve_source(conn) {
                return fail(
                    EXIT_CONFIG,
                    format!("{}: source {:?}: {e}", file.display(), s.name),
                );
            }
        }
    }
    if config.agent.journal.exists() {
        let checked = journal::Journal::open_readonly(&config.agent.journal)
            .and_then(|j| j.check_integrity());
        if let Err(e) = checked {
            return fail(EXIT_JOURNAL, e);
        }
    }
    if !offline {
        let rt = match runtime(tokio::runtime::Builder::new_current_thread()) {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        let problems = rt.block_on(check_online(&config));
        rt.shutdown_timeout(std::time::Duration::from_secs(1));
        if !problems.is_empty() {
            for p in &problems {
                err_line(&format!("ha-edge: {}: {p}", file.display()));
            }
            return ExitCode::from(EXIT_DESTINATION);
        }
    }
    let to = match &config.destination {
        config::Destination::S3(d) => format!("s3://{}/{} at {}", d.bucket, d.prefix, d.endpoint),
        config::Destination::Relay(r) => {
            format!("relay {} (prefix {:?})", r.relays.join(", "), r.prefix)
        }
    };
    out(&format!(
        "{}: ok ({} source{} -> {to}){}\n",
        file.display(),
        config.sources.len(),
        if config.sources.len() == 1 { "" } else { "s" },
        if offline {
            "; not checked online (--offline)"
        } else {
            "; credentials, buckets and endpoints answer"
        }
    ));
    out(&template_examples(&config));
    ExitCode::SUCCESS
}

/// For `validate`: the key one example file of each source with a key_template gets (a file
/// found in the source directory, else a made-up one). The path is shown only with
/// `log_paths = "full"`.
fn template_examples(config: &Config) -> String {
    let mut text = String::new();
    // Checked with the config already: a key that cannot be read was reported there.
    let _ = phi::install(config);
    for s in &config.sources {
        let Some(t) = &s.key_template else { continue };
        let found = s.is_dir().then(|| {
            walkdir::WalkDir::new(&s.path)
                .max_depth(8)
                .into_iter()
                .take(10_000)
                .filter_map(Result::ok)
                .find(|e| e.file_type().is_file())
                .and_then(|e| e.path().strip_prefix(&s.path).ok().map(Path::to_path_buf))
        });
        let rel = found
            .flatten()
            .unwrap_or_else(|| PathBuf::from("STUDY_0001/series1/image0001.dcm"));
        let prefix = format!("{}{}", config.destination.prefix(), s.key_prefix);
        let input = phi::KeyInput {
            source: &s.name,
            rel: &rel,
            discovered: jiff::Timestamp::now(),
            sha256: Some([0; 32]),
        };
        let key =
            keymap::key_of(&prefix, Some(t), &input).unwrap_or_else(|e| format!("(no key: {e})"));
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "source {:?}: key_template gives {} the key {key}\n",
                s.name,
                if phi::keys_only() {
                    "an example file".to_string()
                } else {
                    format!("{}", rel.display())
                }
            ),
        );
    }
    text
}

/// What `validate` asks the servers, with the real credentials: the destination bucket
/// (ListObjectsV2, one key: unlike HeadBucket its error answer names the cause), each bucket
/// source the same way, or the relay's handshake. Every failure, with the advice `run` gives.
async fn check_online(config: &Config) -> Vec<String> {
    use std::time::Duration;
    let timeout = config.agent.request_timeout.min(Duration::from_secs(15));
    let mut problems = Vec::new();
    let list = |client: std::sync::Arc<s3::S3Client>, prefix: String| async move {
        client.list_objects(&prefix, None).await.map(drop)
    };
    match &config.destination {
        config::Destination::S3(d) => {
            let checked = match s3::credentials::resolve(d) {
                Ok(creds) => match s3::S3Client::new(d, creds, 1, timeout, 1) {
                    Ok(c) => list(c, d.prefix.clone()).await,
                    Err(e) => Err(e),
                },
                Err(e) => {
                    problems.push(format!("destination: {e}"));
                    Ok(())
                }
            };
            match checked {
                Ok(()) => {}
                // A least-privilege policy may allow PutObject without ListBucket.
                Err(e) if e.code() == Some("AccessDenied") => {
                    tracing::debug!(error = %e, "listing refused; uploads may still be allowed");
                }
                Err(e) => problems.push(format!("destination: {}", e.for_operator())),
            }
        }
        config::Destination::Relay(r) => {
            match relay::client::RelayClient::new(r, "validate", timeout) {
                Ok(client) => {
                    if let Err(e) = client.connection().await {
                        problems.push(format!("destination: relay {}: {e}", r.relays.join(", ")));
                    }
                }
                Err(e) => problems.push(format!("destination: {e}")),
            }
        }
    }
    for s in &config.sources {
        let config::SourceKind::Bucket(conn) = &s.kind else {
            continue;
        };
        let checked = match s3::credentials::resolve_source(conn) {
            Ok(creds) => match s3::S3Client::new(conn, creds, 1, timeout, 1) {
                Ok(c) => list(c, conn.prefix.clone()).await,
                Err(e) => Err(e),
            },
            Err(e) => {
                problems.push(format!("source {:?}: {e}", s.name));
                continue;
            }
        };
        if let Err(e) = checked {
            problems.push(format!("source {:?}: {}", s.name, e.for_operator()));
        }
    }
    problems
}

/// `ha-edge status`: the journal's report, with the health exit code.
fn status(file: &Path, json: bool, stale_after: std::time::Duration) -> ExitCode {
    let path = match config::journal_path(file) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let mut st = match journal::Journal::open_readonly(&path).and_then(|j| j.status()) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_JOURNAL, e),
    };
    if config::keys_only(file) {
        for h in &mut st.held.last {
            h.path = "(withheld)".into();
        }
    }
    let report = status::assess(st, stale_after);
    if json {
        out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ));
    } else {
        out(&status::render_report(&report));
    }
    ExitCode::from(report.health.exit_code())
}

/// Logs to stderr (journald under systemd) as text or JSON, never panicking on a closed stderr.
/// The filter (`RUST_LOG`, else `log_level`) is levels and `target=level` directives: tracing's
/// `Targets`, which needs no regex engine (EnvFilter's span and field filters would cost the
/// binary about 200 KiB for nothing an operator of this daemon uses).
fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| config::check_log_filter(v).is_ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(|| LogWriter)
        // Its own report of a failed write would go to stderr with eprintln!, and panic.
        .log_internal_errors(false)
        .with_target(false);
    match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                layer
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .init(),
    }
}

/// `ha-edge run`: the daemon (or `--once`), with signals wired to stop and reload.
fn run(file: &Path, once: bool, dry_run: bool) -> ExitCode {
    let config = match load(file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.agent.log_format, &config.agent.log_level);
    let rt = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        let requests = shutdown::install().map_err(|e| (EXIT_INCOMPLETE, format!("cannot install signal handlers: {e}")))?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %file.display(), once, "ha-edge starting");
        app::serve(file, config, app::RunOptions { once, dry_run }, requests).await.map_err(|e| {
            let code = match e {
                app::AppError::Journal(_) => EXIT_JOURNAL,
                app::AppError::Credentials(_)
                | app::AppError::SourceCredentials { .. }
                | app::AppError::Relay(_)
                | app::AppError::Metrics(_)
                | app::AppError::Pseudonym(_)
                | app::AppError::Setup(_) => EXIT_CONFIG,
            };
            (code, e.to_string())
        })
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    let summary = match result {
        Ok(s) => s,
        Err((code, msg)) => return fail(code, msg),
    };
    if !once {
        tracing::info!(delivered = summary.delivered, "stopped");
        return ExitCode::SUCCESS;
    }
    if dry_run {
        err_line(&format!(
            "ha-edge: dry run: {} objects ({} bytes) would be sent, {} would be quarantined, {} not yet settled, {} refused; nothing was sent or changed",
            summary.listed, summary.listed_bytes, summary.quarantined, summary.unsettled, summary.refused
        ));
        return ExitCode::SUCCESS;
    }
    err_line(&format!(
        "ha-edge: {} delivered ({} bytes), {} rejected, {} quarantined, {} conflicts, {} failed (resume on the next run), {} vanished, {} changed during upload, {} not yet settled, {} refused{}",
        summary.delivered,
        summary.bytes,
        summary.rejected,
        summary.quarantined,
        summary.conflicts,
        summary.failed,
        summary.vanished,
        summary.changed,
        summary.unsettled,
        summary.refused,
        if summary.source_errors > 0 {
            format!(", {} source listings failed", summary.source_errors)
        } else {
            String::new()
        }
    ));
    if let Some(e) = &summary.destination_error {
        return fail(EXIT_DESTINATION, format!("destination refused: {e}"));
    }
    if summary.all_delivered() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INCOMPLETE)
    }
}
