//! The bandwidth limit: one token bucket for the whole process, over the bytes of object data
//! put on the wire (S3 PutObject and UploadPart bodies, QUIC stream writes), changed live at the
//! timetable's edges and on reload.
//!
//! # Design
//! - `bucket.rs` is the pure token bucket (time passed in); `schedule.rs` the pure timetable.
//! - `Limiter` wraps the bucket for async callers: `acquire(n)` waits until `n` bytes may go.
//!   A paused limit (`0`) holds every transfer until the rate changes. Requests other than
//!   object data (HEAD, LIST, Create/Complete) are small and not metered.
//! - `Throttled` is an HTTP body that hands its bytes to hyper in 64 KiB chunks as the limiter
//!   allows, so a limited upload is smooth on the link, not a burst per part.
//! - `run_schedule` sets the rate from the timetable at start and at every minute's edge, in
//!   local time (the zone of `/etc/localtime`, or `TZ`).
//!
//! Must not break: with a rate set, the bytes let through over a long window are the rate
//! times the window (within one burst and one chunk); with none, nothing waits.

pub mod bucket;
pub mod schedule;

use std::pin::Pin;
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

pub use bucket::Rate;
use bucket::{TokenBucket, Wait};
pub use schedule::Schedule;

/// Bytes metered per step.
pub const CHUNK: usize = 64 * 1024;

/// The process's limiter.
pub struct Limiter {
    bucket: Mutex<TokenBucket>,
    changed: watch::Sender<Rate>,
}

/// The one limiter of this process.
pub fn limiter() -> &'static Limiter {
    static L: LazyLock<Limiter> = LazyLock::new(|| Limiter {
        bucket: Mutex::new(TokenBucket::new(Rate::Unlimited, Instant::now())),
        changed: watch::channel(Rate::Unlimited).0,
    });
    &L
}

impl Limiter {
    /// Sets the rate (logged and published when it changes).
    pub fn set_rate(&self, rate: Rate) {
        let mut b = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if b.rate() == rate {
            return;
        }
        b.set_rate(rate, Instant::now());
        drop(b);
        tracing::info!(rate = %rate, "bandwidth limit");
        crate::telemetry::metrics::agent()
            .bandwidth_limit
            .set(rate.as_f64());
        self.changed.send_replace(rate);
    }

    /// Whether a limit is in force (else data is not metered at all).
    pub fn is_limited(&self) -> bool {
        *self.changed.borrow() != Rate::Unlimited
    }

    /// Takes `n` bytes now, or says how long to wait.
    fn take(&self, n: usize) -> Result<(), Wait> {
        self.bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(n as u64, Instant::now())
    }

    /// Waits until `n` bytes may go.
    pub async fn acquire(&self, n: usize) {
        let mut changed = self.changed.subscribe();
        loop {
            match self.take(n) {
                Ok(()) => return,
                Err(Wait::For(d)) => {
                    tokio::select! {
                        () = tokio::time::sleep(d) => {}
                        _ = changed.changed() => {}
                    }
                }
                Err(Wait::Paused) => {
                    let _ = changed.changed().await;
                }
            }
        }
    }
}

/// A request body metered by the limiter, `CHUNK` bytes at a time.
pub struct Throttled {
    data: Bytes,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Throttled {
    /// `data` as a metered body.
    pub fn new(data: Bytes) -> Throttled {
        Throttled { data, wait: None }
    }
}

impl http_body::Body for Throttled {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        loop {
            if self.data.is_empty() {
                return Poll::Ready(None);
            }
            if let Some(w) = self.wait.as_mut() {
                if w.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            let n = self.data.len().min(CHUNK);
            match limiter().take(n) {
                Ok(()) => {
                    let chunk = self.data.split_to(n);
                    return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
                }
                // Paused: look again every 250 ms (a body cannot hold a watch subscription
                // across polls cheaply; the pause is minutes long anyway).
                Err(Wait::For(d)) => self.wait = Some(Box::pin(tokio::time::sleep(d))),
                Err(Wait::Paused) => {
                    self.wait = Some(Box::pin(tokio::time::sleep(Duration::from_millis(250))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

use std::future::Future as _;

/// Sets the limiter to the timetable's rate now (local time); returns the local time used.
pub fn apply(schedule: &Schedule) -> jiff::Zoned {
    let now = jiff::Zoned::now();
    let weekday = usize::from(now.weekday().to_monday_zero_offset().unsigned_abs());
    let minute = u16::try_from(i32::from(now.hour()) * 60 + i32::from(now.minute())).unwrap_or(0);
    limiter().set_rate(schedule.rate_at(weekday, minute));
    now
}

/// Keeps the limiter at the timetable's rate: now, then at every minute's edge, until `stop`.
pub async fn run_schedule(schedule: Schedule, mut stop: watch::Receiver<bool>) {
    loop {
        let now = apply(&schedule);
        if schedule.windows.is_empty() {
            return;
        }
        let into_minute = Duration::from_secs(u64::from(now.second().unsigned_abs()));
        let next = Duration::from_secs(60).saturating_sub(into_minute) + Duration::from_millis(50);
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            _ = stop.changed() => return,
        }
    }
}
