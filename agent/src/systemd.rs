//! systemd integration: readiness, reload and stop notifications, the watchdog, and a one-line
//! status for `systemctl status`. Every call is a no-op when the agent was not started by
//! systemd (no `$NOTIFY_SOCKET`), so the same binary runs anywhere.
//!
//! Must not break: every function is a no-op without `$NOTIFY_SOCKET`, and the watchdog is fed
//! only from the scheduler's loop (or a known stall), so a hung loop is restarted.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd, if it started us.
fn send(state: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Start-up is done (`Type=notify`).
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A SIGHUP reload has begun.
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// A stop has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The line `systemctl status` shows.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Tells systemd the scheduler loop is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to feed the watchdog (half its timeout), if systemd asked for one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
