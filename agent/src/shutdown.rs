//! Signals become requests. SIGTERM or SIGINT asks for a graceful stop (stop discovery, let parts
//! in flight finish within `shutdown_grace`, exit 0); a second one exits at once. SIGHUP asks to
//! re-read the config. Either way the journal already holds everything needed to resume.
//!
//! Must not break: a graceful stop never abandons a committed journal state; a second signal exits
//! without waiting.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stop,
    Reload,
}

/// Installs the handlers; requests arrive on the returned channel. A second SIGTERM or SIGINT
/// exits at once.
pub fn install() -> std::io::Result<mpsc::UnboundedReceiver<Request>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let req = tokio::select! {
                _ = term.recv() => Request::Stop,
                _ = int.recv() => Request::Stop,
                _ = hup.recv() => Request::Reload,
            };
            if req == Request::Stop {
                stops += 1;
                if stops > 1 {
                    tracing::warn!(
                        "second stop signal: exiting now; the journal resumes unfinished work"
                    );
                    std::process::exit(130);
                }
                tracing::info!(
                    "stop signal received: stopping gracefully (send it again to stop at once)"
                );
            }
            if tx.send(req).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
