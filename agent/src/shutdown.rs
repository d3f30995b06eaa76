//! Signals become one shutdown path: the first SIGTERM or SIGINT asks for a graceful stop (stop
//! discovery, let parts in flight finish within `shutdown_grace`, exit 0); a second one exits at
//! once. Either way the journal already holds everything needed to resume.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Returns a receiver that turns true on the first SIGTERM/SIGINT.
pub fn install() -> std::io::Result<watch::Receiver<bool>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: stopping gracefully (send it again to stop at once)");
        let _ = tx.send(true);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now; the journal resumes unfinished work");
        std::process::exit(130);
    });
    Ok(rx)
}
