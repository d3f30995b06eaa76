//! Seeing it move: what is in flight and how far each object has got, for the live display of
//! `run --once` on a terminal, the progress log lines without one, and the daemon's lines for
//! objects in flight over a minute.
//!
//! # Design
//! - `Board` is a process-wide tally written from the transfer path with atomics and one short
//!   lock per object start and end: objects expected, done, bytes done, and per object in
//!   flight its key, size and bytes acknowledged (a part the server acknowledged, a single PUT
//!   when answered, relay data when written).
//! - `run_display` reads the board on a timer. On a terminal (`--once`, stderr a tty) it draws
//!   indicatif bars: the whole run (objects, bytes, rate, ETA) and one bar per large object in
//!   flight; log lines go above the bars (see `main.rs`'s writer). Without a terminal it logs a
//!   progress line every 30 s while anything is in flight; the daemon logs every 30 s the
//!   objects in flight for more than a minute (key, bytes, rate).
//!
//! Must not break: the board never blocks a transfer (atomics, and a lock held only to add or
//! remove an entry); the display writes to stderr only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// An object in flight.
pub struct InFlight {
    pub key: String,
    pub size: u64,
    pub sent: AtomicU64,
    pub started: Instant,
}

/// The tally.
#[derive(Default)]
pub struct Board {
    /// Objects and bytes expected in this run (`--once`; 0 in the daemon).
    pub expected_objects: AtomicU64,
    pub expected_bytes: AtomicU64,
    /// Objects and bytes delivered.
    pub done_objects: AtomicU64,
    pub done_bytes: AtomicU64,
    /// By journal row id.
    in_flight: Mutex<BTreeMap<i64, Arc<InFlight>>>,
}

/// The process's board.
pub fn board() -> &'static Board {
    static B: LazyLock<Board> = LazyLock::new(Board::default);
    &B
}

impl Board {
    /// Row `id` (`key`, `size` bytes) starts; returns its entry, to advance as bytes are
    /// acknowledged.
    pub fn begin(&self, id: i64, key: &str, size: u64) -> Arc<InFlight> {
        let e = Arc::new(InFlight {
            key: key.to_string(),
            size,
            sent: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.lock().insert(id, e.clone());
        e
    }

    /// Bytes of row `id` acknowledged.
    pub fn advance(&self, id: i64, bytes: u64) {
        if let Some(e) = self.lock().get(&id) {
            e.sent.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Row `id` is no longer in flight; `delivered` counts it done.
    pub fn end(&self, id: i64, delivered: bool) {
        let e = self.lock().remove(&id);
        if delivered {
            self.done_objects.fetch_add(1, Ordering::Relaxed);
            if let Some(e) = e {
                self.done_bytes.fetch_add(e.size, Ordering::Relaxed);
            }
        }
    }

    /// What is in flight now, oldest first.
    pub fn in_flight(&self) -> Vec<Arc<InFlight>> {
        let mut v: Vec<Arc<InFlight>> = self.lock().values().cloned().collect();
        v.sort_by_key(|e| e.started);
        v
    }

    /// Bytes done, counting what objects in flight have had acknowledged.
    pub fn bytes_moving(&self) -> u64 {
        self.done_bytes.load(Ordering::Relaxed)
            + self
                .lock()
                .values()
                .map(|e| e.sent.load(Ordering::Relaxed).min(e.size))
                .sum::<u64>()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Arc<InFlight>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `--once` on a terminal: live bars.
    Bars,
    /// `--once` without a terminal: a log line every 30 s.
    Lines,
    /// The daemon: objects in flight for over a minute, every 30 s.
    Daemon,
}

/// The bars, while they are drawn (log lines go above them: `suspend`).
pub static BARS: LazyLock<Mutex<Option<indicatif::MultiProgress>>> =
    LazyLock::new(|| Mutex::new(None));

/// Runs `f` with the bars out of the way (a log line printed above them).
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let bars = BARS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match bars {
        Some(mp) => mp.suspend(f),
        None => f(),
    }
}

/// Objects at least this large get a bar of their own.
const LARGE: u64 = 8 * 1024 * 1024;
/// How often the lines are logged.
const EVERY: Duration = Duration::from_secs(30);
/// The daemon reports an object in flight longer than this.
const LONG: Duration = Duration::from_secs(60);

/// Shows progress in `mode` until `stop`.
pub async fn run_display(mode: Mode, mut stop: watch::Receiver<bool>) {
    match mode {
        Mode::Bars => bars(stop).await,
        Mode::Lines | Mode::Daemon => {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
            let started = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                if mode == Mode::Lines {
                    log_line(started);
                } else {
                    log_long();
                }
            }
        }
    }
}

/// One line for the whole run (`--once` without a terminal), while anything is in flight.
fn log_line(started: Instant) {
    let b = board();
    let flying = b.in_flight();
    if flying.is_empty() {
        return;
    }
    let moved = b.bytes_moving();
    #[allow(clippy::cast_precision_loss)]
    let rate = moved as f64 / started.elapsed().as_secs_f64().max(1e-3) / 1e6;
    tracing::info!(
        done = b.done_objects.load(Ordering::Relaxed),
        total = b.expected_objects.load(Ordering::Relaxed),
        bytes = moved,
        total_bytes = b.expected_bytes.load(Ordering::Relaxed),
        mb_per_s = format!("{rate:.1}"),
        in_flight = flying.len(),
        "progress"
    );
}

/// The daemon: each object in flight for over a minute.
fn log_long() {
    for e in board().in_flight() {
        let age = e.started.elapsed();
        if age < LONG {
            continue;
        }
        let sent = e.sent.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let rate = sent as f64 / age.as_secs_f64() / 1e6;
        tracing::info!(key = %e.key, bytes = sent, size = e.size, secs = age.as_secs(), mb_per_s = format!("{rate:.1}"), "still sending");
    }
}

/// The live display: one bar for the run, one per large object in flight.
async fn bars(mut stop: watch::Receiver<bool>) {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    *BARS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mp.clone());
    let b = board();
    let total = mp.add(ProgressBar::new(b.expected_bytes.load(Ordering::Relaxed)));
    total.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let object_style =
        ProgressStyle::with_template("  {msg} [{bar:20}] {binary_bytes}/{binary_total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let mut per: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let expected = b.expected_objects.load(Ordering::Relaxed);
        let done = b.done_objects.load(Ordering::Relaxed);
        total.set_length(b.expected_bytes.load(Ordering::Relaxed).max(1));
        total.set_position(b.bytes_moving());
        total.set_message(format!("objects {done}/{expected}"));
        let flying = b.in_flight();
        let large: Vec<&Arc<InFlight>> = flying.iter().filter(|e| e.size >= LARGE).collect();
        per.retain(|k, bar| {
            let keep = large.iter().any(|e| &e.key == k);
            if !keep {
                bar.finish_and_clear();
            }
            keep
        });
        for e in large {
            let bar = per.entry(e.key.clone()).or_insert_with(|| {
                let bar = mp.add(ProgressBar::new(e.size));
                bar.set_style(object_style.clone());
                bar.set_message(e.key.clone());
                bar
            });
            bar.set_position(e.sent.load(Ordering::Relaxed).min(e.size));
        }
        if stopping || *stop.borrow() {
            for bar in per.values() {
                bar.finish_and_clear();
            }
            total.finish();
            *BARS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            return;
        }
    }
}
