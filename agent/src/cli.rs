//! Command line: `run`, `validate`, `status`, `relay`.
//!
//! Must not break: commands, flags and their meanings (scripts depend on them).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the agent's config lives.
pub const DEFAULT_CONFIG: &str = "/etc/ha-edge/ha-edge.toml";
/// Where the relay's config lives.
pub const DEFAULT_RELAY_CONFIG: &str = "/etc/ha-edge/relay.toml";

#[derive(Debug, Parser)]
#[command(
    name = "ha-edge",
    version,
    about = "Moves settled files from local and NFS directories to S3, crash-safe and verified"
)]
/// The command line.
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands (their names and flags are an interface: scripts depend on them).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGTERM/SIGINT (or, with --once, until what is complete now is sent).
    Run {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Transfer what is complete now, then exit: 0 if all was delivered, non-zero otherwise.
        #[arg(long)]
        once: bool,
        /// With --once: list what would be sent (why, size, key) and send nothing, change
        /// nothing (the journal neither).
        #[arg(long, requires = "once")]
        dry_run: bool,
    },
    /// Check the config (and the journal, if it exists), then ask the destination and bucket
    /// sources with the real credentials (or the relay, its handshake); print every problem.
    /// Exit 0 ok, 2 config, 3 a server refuses or does not answer, 4 journal.
    Validate {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Check the config only, without asking any server (systemd's ExecStartPre: a tunnel
        /// that is down must not stop the agent from starting).
        #[arg(long)]
        offline: bool,
    },
    /// Show what the journal holds: health, counts per state, bytes pending, what is held back,
    /// last errors. Exit 0 healthy, 1 degraded, 3 destination refusing or unreachable, 4 no
    /// usable journal.
    Status {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Pending work older than this makes the health "degraded" (exit 1).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        stale_after: std::time::Duration,
        /// List objects (key, size, state, age, last error), newest first, instead of the
        /// summary; every object not finished unless --state says which.
        #[arg(long)]
        objects: bool,
        /// With --objects: only these.
        #[arg(long, value_enum, requires = "objects")]
        state: Option<ObjectState>,
        /// With --objects: at most this many.
        #[arg(long, default_value_t = 50, requires = "objects")]
        limit: usize,
    },
    /// Check record files as `validate` would before sending them (FHIR NDJSON by default for
    /// .ndjson, DICOM for .dcm; a manifest.json next to a file supplies its type and count).
    /// Prints one line per file and the throughput; exits 1 if any file fails.
    Check {
        /// The check (default: by file extension).
        #[arg(long = "as", value_enum)]
        kind: Option<CheckKind>,
        /// The longest NDJSON line accepted, in bytes.
        #[arg(long, default_value_t = 16 << 20)]
        max_line: usize,
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Resolve a destination key to the source file it came from (on this box only: the
    /// mapping of pseudonymised keys lives in the local journal).
    Lookup {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The destination key (as in the bucket, status and logs).
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the receipts of delivered objects (read-only; safe while the daemon runs), or
    /// `verify` the receipt batches in the bucket. Times: RFC 3339 (`2026-12-01T08:00:00Z`) or
    /// an age (`24h`: since 24 hours ago).
    Receipts {
        #[arg(short, long, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
        /// Only receipts verified at or after this time.
        #[arg(long)]
        since: Option<String>,
        /// Only receipts verified before this time.
        #[arg(long)]
        until: Option<String>,
        /// Only this source's receipts.
        #[arg(long)]
        source: Option<String>,
        /// One JSON object per line, or CSV with a header line.
        #[arg(long, value_enum, default_value_t = ReceiptFormat::Ndjson)]
        format: ReceiptFormat,
        #[command(subcommand)]
        action: Option<ReceiptsAction>,
    },
    /// Run the cloud-side QUIC relay: accept agents (mutual TLS), verify, land in S3 or a directory.
    Relay {
        #[arg(short, long, default_value = DEFAULT_RELAY_CONFIG)]
        config: PathBuf,
        /// Check the relay config and exit.
        #[arg(long)]
        check: bool,
    },
}

/// The check `ha-edge check` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckKind {
    FhirNdjson,
    Dicom,
}

/// How `ha-edge receipts` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReceiptFormat {
    Ndjson,
    Csv,
}

/// What `ha-edge receipts` can do besides printing.
#[derive(Debug, Subcommand)]
pub enum ReceiptsAction {
    /// Check the receipt batches in the bucket: the chain of SHA-256s, the counts, and that the
    /// newest receipt of each key matches the object there. Exit 0 if all holds, 1 if not.
    Verify {
        /// The bucket holding the batches (default: the destination's).
        #[arg(long)]
        bucket: Option<String>,
        /// Their key prefix (default: `[receipts] prefix`, or `_receipts/`).
        #[arg(long)]
        prefix: Option<String>,
        /// Only this agent's chain (default: every agent under the prefix).
        #[arg(long)]
        agent: Option<String>,
    },
}

/// `status --objects --state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ObjectState {
    Pending,
    Uploading,
    Refused,
    Quarantined,
    Conflict,
    Failed,
}
