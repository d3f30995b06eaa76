//! The token bucket: pure, with time passed in.
//!
//! Tokens are bytes. A take of `n` bytes goes ahead whenever the bucket is not in debt, and may
//! put it in debt (so a chunk larger than the burst still goes); the next take waits until the
//! debt is paid back at the rate. Over any long window the bytes let through are the rate times
//! the window, plus at most one burst and one chunk.

use std::time::Duration;

use tokio::time::Instant;

/// A bandwidth limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// No limit.
    Unlimited,
    /// At most this many bytes per second; 0 holds every transfer until the rate changes.
    BytesPerSec(u64),
}

impl Rate {
    /// For the metric: +Inf for no limit.
    pub fn as_f64(self) -> f64 {
        match self {
            Rate::Unlimited => f64::INFINITY,
            #[allow(clippy::cast_precision_loss)]
            Rate::BytesPerSec(n) => n as f64,
        }
    }
}

impl std::fmt::Display for Rate {
    /// `off`, `paused`, or the rate in Mbit/s.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Unlimited => f.write_str("off (no limit)"),
            Rate::BytesPerSec(0) => f.write_str("0 (paused)"),
            #[allow(clippy::cast_precision_loss)]
            Rate::BytesPerSec(n) => write!(f, "{:.1} Mbit/s", *n as f64 * 8.0 / 1e6),
        }
    }
}

/// Why a take must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// This long, then take again.
    For(Duration),
    /// Until the rate changes (paused).
    Paused,
}

/// The bucket.
#[derive(Debug)]
pub struct TokenBucket {
    rate: Rate,
    /// Bytes that may go now; negative: debt.
    tokens: f64,
    /// At most this many tokens saved up.
    burst: f64,
    last: Instant,
}

/// The burst: 50 ms at the rate, at least 16 KiB.
fn burst_of(rate: Rate) -> f64 {
    match rate {
        Rate::Unlimited => f64::INFINITY,
        #[allow(clippy::cast_precision_loss)]
        Rate::BytesPerSec(n) => (n as f64 / 20.0).max(16.0 * 1024.0),
    }
}

impl TokenBucket {
    /// A full bucket at `rate`.
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: burst_of(rate),
            burst: burst_of(rate),
            last: now,
        }
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Changes the rate; what was saved up is capped at the new burst, a debt is kept.
    pub fn set_rate(&mut self, rate: Rate, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst_of(rate);
        if self.tokens.is_infinite() || self.tokens > self.burst {
            self.tokens = self.burst;
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Rate::BytesPerSec(r) = self.rate {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            #[allow(clippy::cast_precision_loss)]
            let add = r as f64 * dt;
            self.tokens = (self.tokens + add).min(self.burst);
        }
        self.last = now;
    }

    /// Takes `n` bytes if the bucket is not in debt; otherwise says how long to wait.
    pub fn take(&mut self, n: u64, now: Instant) -> Result<(), Wait> {
        self.refill(now);
        match self.rate {
            Rate::Unlimited => Ok(()),
            Rate::BytesPerSec(0) => Err(Wait::Paused),
            Rate::BytesPerSec(r) => {
                if self.tokens >= 0.0 {
                    #[allow(clippy::cast_precision_loss)]
                    let n = n as f64;
                    self.tokens -= n;
                    Ok(())
                } else {
                    #[allow(clippy::cast_precision_loss)]
                    let secs = -self.tokens / r as f64;
                    Err(Wait::For(
                        Duration::from_secs_f64(secs).max(Duration::from_millis(1)),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sending as fast as the bucket allows for 60 s lets through the rate times 60 s, within
    /// one burst and one chunk.
    #[test]
    fn a_minute_at_the_limit_is_the_rate_times_a_minute() {
        let t0 = Instant::now();
        let rate = 1_250_000; // 10 Mbit/s
        let mut b = TokenBucket::new(Rate::BytesPerSec(rate), t0);
        let (chunk, mut now, mut sent) = (64 * 1024u64, t0, 0u64);
        while now < t0 + Duration::from_secs(60) {
            match b.take(chunk, now) {
                Ok(()) => sent += chunk,
                Err(Wait::For(d)) => now += d,
                Err(Wait::Paused) => unreachable!(),
            }
        }
        let expected = rate * 60;
        let slack = (rate / 20).max(16 * 1024) + 2 * chunk;
        assert!(sent.abs_diff(expected) <= slack, "{sent} vs {expected}");
    }

    /// Paused holds every take until the rate changes; unlimited never waits.
    #[test]
    fn paused_waits_for_a_change_and_unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::BytesPerSec(0), t0);
        assert_eq!(b.take(1, t0), Err(Wait::Paused));
        b.set_rate(Rate::Unlimited, t0);
        assert_eq!(b.take(u64::MAX, t0), Ok(()));
        b.set_rate(Rate::BytesPerSec(1000), t0);
        assert_eq!(
            b.take(100_000, t0),
            Ok(()),
            "a chunk beyond the burst still goes..."
        );
        assert!(
            matches!(b.take(1, t0), Err(Wait::For(d)) if d.as_secs() >= 60),
            "...into debt"
        );
    }
}
