//! Command line: `run`, `validate`, `status`, `relay`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const DEFAULT_CONFIG: &str = "/etc/ha-edge/ha-edge.toml";
pub const DEFAULT_RELAY_CONFIG: &str = "/etc/ha-edge/relay.toml";

#[derive(Debug, Parser)]
#[command(
    name = "ha-edge",
    version,
    about = "Moves settled files from local and NFS directories to S3, crash-safe and verified"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGTERM/SIGINT (or, with --once, until what is complete now is sent).
    Run {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Transfer what is complete now, then exit: 0 if all was delivered, non-zero otherwise.
        #[arg(long)]
        once: bool,
    },
    /// Check the config (and the journal, if it exists); print every problem.
    Validate {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show what the journal holds: counts per state, bytes pending, last errors.
    Status {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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
