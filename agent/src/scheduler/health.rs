//! Destination health and per-source pauses: a pure state machine, fed what deliveries said
//! (`on_signal(signal, now)`) and asked whether objects may go (`gate(now)`). It does no IO and
//! reads no clock; what the operator must be told comes back as `Notice`s for the driver to log
//! and publish.
//!
//! ```text
//!            refused (403, bucket, region)                 no answer (outage)
//!   open ────────────────────────────▶ paused(refused) ◀──▶ paused(unreachable) ◀──── open
//!     ▲   one object probes when the pause ends; the probe round grows the pause      │
//!     └──────────────────────── a delivery goes through ◀──────────────────────────────┘
//! ```
//! A refusal of one source's keys only (403 on its prefix) pauses that source, not the
//! destination. In `--once` mode nothing waits: the first refusal or outage stops dispatching.
//!
//! Must not break: the operator hears of a cause once (a new refusal code, the start of an
//! outage, the end of it), never once per object; a paused destination gets one object at a
//! time until it accepts again.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::policy::{OUTAGE_PROBE, PROBE};

/// What a delivery told about the destination.
#[derive(Debug, Clone, Copy)]
pub enum Signal<'a> {
    /// An object went through: the destination (and this source's keys) accept us.
    Accepted { source: &'a str },
    /// The destination refuses everyone (credentials, bucket, region).
    Refused { code: &'a str, message: &'a str },
    /// The destination refuses this source's keys only.
    SourceRefused {
        source: &'a str,
        code: &'a str,
        message: &'a str,
    },
    /// No answer at all after the request-level retries.
    Unreachable { message: &'a str },
}

/// What the operator is told, and what `status` publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The destination refuses uploads: logged as an error when `new_cause`; published always.
    Refusing { message: String, new_cause: bool },
    /// The destination stopped answering (once per outage).
    Unreachable { message: String },
    /// Still no answer (debug only).
    StillUnreachable { message: String },
    /// The next probe of a paused destination is in this long.
    ProbeIn(Duration),
    /// The destination answers again after an outage this long.
    Back { outage: Duration },
    /// The destination accepts requests again after refusing them.
    Accepting,
    /// The journal should say "destination: ok" (published on changes only).
    DestinationOk,
    /// The destination refuses this source's keys (a new cause).
    SourceRefused { source: String, message: String },
    /// The destination accepts this source's keys again.
    SourceAccepting { source: String },
}

/// Why a `--once` run stops dispatching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The destination (or a source's keys) refuses us.
    Refused(String),
    /// The destination does not answer.
    Unreachable(String),
}

/// What the driver does after a signal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Action {
    /// The object that brought the signal is tried again this long from now (None: the signal
    /// does not decide that).
    pub retry_in: Option<Duration>,
    /// `--once`: stop dispatching, for this reason.
    pub stop: Option<Stop>,
    /// What to tell the operator and `status`, in order.
    pub notices: Vec<Notice>,
}

/// May objects be dispatched now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// As many as there are slots.
    Open,
    /// The pause is over: one object at a time, to see whether the destination accepts again.
    Probe,
    /// Paused until the next probe (daemon), or stopped (`--once`).
    Closed,
}

/// What `gate` says of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceGate<'a> {
    Open,
    /// The destination refuses this source's keys: try the object again this long from now.
    Wait(Duration, &'a str),
    /// `--once`: leave the object for the next run.
    Skip,
}

/// Why the destination is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cause {
    Refused { code: String },
    Unreachable { since: Instant },
}

/// A paused destination: why, how many probes so far, until when.
#[derive(Debug, Clone)]
struct Pause {
    cause: Cause,
    /// Probes so far; each one grows the next pause.
    round: u32,
    until: Instant,
}

/// A source whose keys the destination refuses.
#[derive(Debug, Clone)]
struct SourcePause {
    code: String,
    message: String,
    round: u32,
    until: Instant,
}

/// The machine: the destination's pause, the sources' pauses, what is published.
#[derive(Debug)]
pub struct Health {
    once: bool,
    rng: fastrand::Rng,
    pause: Option<Pause>,
    /// `--once`: dispatching stopped.
    stopped: bool,
    sources: HashMap<String, SourcePause>,
    /// The journal already says "destination: ok".
    ok_published: bool,
}

impl Health {
    /// `seed` feeds the jitter of probe delays (tests pass a fixed one).
    pub fn new(once: bool, seed: u64) -> Health {
        Health {
            once,
            rng: fastrand::Rng::with_seed(seed),
            pause: None,
            stopped: false,
            sources: HashMap::new(),
            ok_published: false,
        }
    }

    /// The preflight check found the destination fine (published by the caller).
    pub fn preflight_ok(&mut self) {
        self.ok_published = true;
    }

    /// Whether objects may be dispatched at `now`.
    pub fn gate(&self, now: Instant) -> Gate {
        if self.stopped {
            return Gate::Closed;
        }
        match &self.pause {
            None => Gate::Open,
            Some(p) if now >= p.until => Gate::Probe,
            Some(_) => Gate::Closed,
        }
    }

    /// Whether a paused destination is being probed (one object at a time, also while that
    /// object is in flight).
    pub fn probing(&self) -> bool {
        self.pause.is_some()
    }

    /// When the next probe is due, if the destination is paused.
    pub fn next_probe(&self) -> Option<Instant> {
        self.pause.as_ref().map(|p| p.until)
    }

    /// "ok", "refusing" or "unreachable", for the service manager's status line.
    pub fn label(&self) -> &'static str {
        match self.pause.as_ref().map(|p| &p.cause) {
            None => "ok",
            Some(Cause::Refused { .. }) => "refusing",
            Some(Cause::Unreachable { .. }) => "unreachable",
        }
    }

    /// Whether an object of `source` may go now.
    pub fn source_gate(&self, source: &str, now: Instant) -> SourceGate<'_> {
        match self.sources.get(source) {
            None => SourceGate::Open,
            Some(_) if self.once => SourceGate::Skip,
            Some(p) if now >= p.until => SourceGate::Open,
            Some(p) => SourceGate::Wait(p.until - now, &p.message),
        }
    }

    /// What a delivery's signal changes, and what follows from it.
    pub fn on_signal(&mut self, signal: Signal<'_>, now: Instant) -> Action {
        match signal {
            Signal::Accepted { source } => self.accepted(source, now),
            Signal::Refused { code, message } => self.refused(code, message, now),
            Signal::SourceRefused {
                source,
                code,
                message,
            } => self.source_refused(source, code, message, now),
            Signal::Unreachable { message } => self.unreachable(message, now),
        }
    }

    /// A delivery went through: every pause of it ends, once.
    fn accepted(&mut self, source: &str, now: Instant) -> Action {
        let mut notices = Vec::new();
        match self.pause.take().map(|p| p.cause) {
            Some(Cause::Unreachable { since }) => notices.push(Notice::Back {
                outage: now.saturating_duration_since(since),
            }),
            Some(Cause::Refused { .. }) => notices.push(Notice::Accepting),
            None => {}
        }
        if self.sources.remove(source).is_some() {
            notices.push(Notice::SourceAccepting {
                source: source.to_string(),
            });
        }
        if !self.ok_published {
            self.ok_published = true;
            notices.push(Notice::DestinationOk);
        }
        Action {
            retry_in: None,
            stop: None,
            notices,
        }
    }

    /// The destination refuses everyone: pause (daemon) or stop (`--once`).
    fn refused(&mut self, code: &str, message: &str, now: Instant) -> Action {
        let new_cause = !matches!(&self.pause, Some(Pause { cause: Cause::Refused { code: c }, .. }) if c == code);
        self.ok_published = false;
        let mut notices = vec![Notice::Refusing {
            message: message.to_string(),
            new_cause,
        }];
        if self.once {
            self.stopped = true;
            self.pause = Some(Pause {
                cause: Cause::Refused { code: code.into() },
                round: 0,
                until: now,
            });
            return Action {
                retry_in: Some(Duration::ZERO),
                stop: Some(Stop::Refused(message.to_string())),
                notices,
            };
        }
        let round = self.pause.as_ref().map_or(0, |p| p.round) + 1;
        let delay = PROBE.nth(round, self.rng.f64());
        self.pause = Some(Pause {
            cause: Cause::Refused { code: code.into() },
            round,
            until: now + delay,
        });
        notices.push(Notice::ProbeIn(delay));
        Action {
            retry_in: Some(Duration::ZERO),
            stop: None,
            notices,
        }
    }

    /// The destination refuses one source's keys: pause that source.
    fn source_refused(&mut self, source: &str, code: &str, message: &str, now: Instant) -> Action {
        let (round, new_cause) = match self.sources.get(source) {
            Some(p) if p.code == code && now < p.until => (p.round, false),
            Some(p) if p.code == code => (p.round + 1, false),
            _ => (1, true),
        };
        let delay = PROBE.nth(round, self.rng.f64());
        self.sources.insert(
            source.to_string(),
            SourcePause {
                code: code.to_string(),
                message: message.to_string(),
                round,
                until: now + delay,
            },
        );
        let notices = if new_cause {
            vec![Notice::SourceRefused {
                source: source.to_string(),
                message: message.to_string(),
            }]
        } else {
            Vec::new()
        };
        if self.once {
            self.stopped = true;
            return Action {
                retry_in: None,
                stop: Some(Stop::Refused(message.to_string())),
                notices,
            };
        }
        Action {
            retry_in: Some(delay),
            stop: None,
            notices,
        }
    }

    /// No answer: one shared pause for every object of the outage, grown by each failed probe.
    fn unreachable(&mut self, message: &str, now: Instant) -> Action {
        let mut notices = Vec::new();
        let since = match &self.pause {
            Some(Pause {
                cause: Cause::Unreachable { since },
                ..
            }) => {
                notices.push(Notice::StillUnreachable {
                    message: message.to_string(),
                });
                *since
            }
            _ => {
                self.ok_published = false;
                notices.push(Notice::Unreachable {
                    message: message.to_string(),
                });
                now
            }
        };
        if self.once {
            self.stopped = true;
            self.pause = Some(Pause {
                cause: Cause::Unreachable { since },
                round: 0,
                until: now,
            });
            return Action {
                retry_in: Some(Duration::ZERO),
                stop: Some(Stop::Unreachable(message.to_string())),
                notices,
            };
        }
        // Objects in flight when the outage began come back one by one: the pause is set by
        // the first and only grown by a probe (a failure once the pause is over).
        let (round, until) = match &self.pause {
            Some(p) if now < p.until => (p.round, p.until),
            p => {
                let round = p.as_ref().map_or(0, |p| p.round) + 1;
                (round, now + OUTAGE_PROBE.nth(round, self.rng.f64()))
            }
        };
        self.pause = Some(Pause {
            cause: Cause::Unreachable { since },
            round,
            until,
        });
        Action {
            retry_in: Some(until - now),
            stop: None,
            notices,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &'static str) -> Signal<'static> {
        Signal::Refused {
            code,
            message: "403 InvalidAccessKeyId",
        }
    }

    fn count(a: &Action, f: impl Fn(&Notice) -> bool) -> usize {
        a.notices.iter().filter(|n| f(n)).count()
    }

    /// A refusal pauses the destination, tells the operator once per cause, and lets one
    /// object probe when the pause is over, with a pause that grows each round up to its cap.
    #[test]
    fn a_refusing_destination_is_paused_and_probed_with_a_growing_delay() {
        let t0 = Instant::now();
        let mut h = Health::new(false, 1);
        assert_eq!(h.gate(t0), Gate::Open);
        let a = h.on_signal(refused("InvalidAccessKeyId"), t0);
        assert_eq!(
            a.retry_in,
            Some(Duration::ZERO),
            "the object waits for the probe"
        );
        assert_eq!(
            count(&a, |n| matches!(
                n,
                Notice::Refusing {
                    new_cause: true,
                    ..
                }
            )),
            1
        );
        let first = h.next_probe().unwrap() - t0;
        // The n-th delay is jittered down to half of it, never more.
        assert!(first >= PROBE.base / 2 && first <= PROBE.base, "{first:?}");
        assert_eq!(h.gate(t0 + first / 2), Gate::Closed);
        assert_eq!(h.gate(t0 + first), Gate::Probe);
        assert_eq!(h.label(), "refusing");
        // Probes that are refused again: the same cause is not logged again; the pause grows.
        let mut now = t0 + first;
        let mut last = first;
        for _ in 0..12 {
            let a = h.on_signal(refused("InvalidAccessKeyId"), now);
            assert_eq!(
                count(&a, |n| matches!(
                    n,
                    Notice::Refusing {
                        new_cause: true,
                        ..
                    }
                )),
                0
            );
            let pause = h.next_probe().unwrap() - now;
            assert!(pause <= PROBE.cap, "{pause:?}");
            last = last.max(pause);
            now += pause;
        }
        assert!(last > first, "the pause grows ({first:?} -> {last:?})");
        // A different cause is news.
        let a = h.on_signal(refused("SignatureDoesNotMatch"), now);
        assert_eq!(
            count(&a, |n| matches!(
                n,
                Notice::Refusing {
                    new_cause: true,
                    ..
                }
            )),
            1
        );
        // A delivery ends the pause, once.
        let a = h.on_signal(Signal::Accepted { source: "s" }, now);
        assert!(a.notices.contains(&Notice::Accepting));
        assert!(a.notices.contains(&Notice::DestinationOk));
        assert_eq!(h.gate(now), Gate::Open);
        let a = h.on_signal(Signal::Accepted { source: "s" }, now);
        assert!(a.notices.is_empty(), "{:?}", a.notices);
    }

    /// An outage is announced once however many objects fail with it; they wait for one
    /// shared pause, and the end of the outage is announced with its length.
    #[test]
    fn an_outage_is_announced_once_and_its_end_with_its_length() {
        let t0 = Instant::now();
        let mut h = Health::new(false, 2);
        let msg = Signal::Unreachable {
            message: "connect refused",
        };
        let a = h.on_signal(msg, t0);
        assert_eq!(count(&a, |n| matches!(n, Notice::Unreachable { .. })), 1);
        let until = h.next_probe().unwrap();
        assert_eq!(a.retry_in, Some(until - t0));
        // Eight more objects in flight fail a little later: no new notice, same pause.
        for i in 1..=8u64 {
            let now = t0 + Duration::from_millis(10 * i);
            let a = h.on_signal(msg, now);
            assert_eq!(count(&a, |n| matches!(n, Notice::Unreachable { .. })), 0);
            assert_eq!(h.next_probe(), Some(until));
            assert_eq!(a.retry_in, Some(until - now));
        }
        assert_eq!(h.label(), "unreachable");
        // The probe fails: the pause grows, counted from then.
        let a = h.on_signal(msg, until);
        assert!(h.next_probe().unwrap() > until);
        assert_eq!(count(&a, |n| matches!(n, Notice::Unreachable { .. })), 0);
        let back = until + Duration::from_secs(5);
        let a = h.on_signal(Signal::Accepted { source: "s" }, back);
        assert_eq!(
            a.notices,
            vec![Notice::Back { outage: back - t0 }, Notice::DestinationOk]
        );
    }

    /// A refusal of one source's keys pauses that source only; `--once` skips its objects.
    #[test]
    fn a_source_refused_is_paused_alone() {
        let t0 = Instant::now();
        let mut h = Health::new(false, 3);
        let sig = Signal::SourceRefused {
            source: "imaging",
            code: "AccessDenied",
            message: "403 AccessDenied on imaging/",
        };
        let a = h.on_signal(sig, t0);
        let wait = a.retry_in.unwrap();
        assert!(wait >= PROBE.base / 2, "{wait:?}");
        assert_eq!(count(&a, |n| matches!(n, Notice::SourceRefused { .. })), 1);
        assert_eq!(h.gate(t0), Gate::Open, "other sources go on");
        assert_eq!(h.source_gate("fhir", t0), SourceGate::Open);
        assert!(matches!(h.source_gate("imaging", t0), SourceGate::Wait(w, _) if w == wait));
        assert_eq!(h.source_gate("imaging", t0 + wait), SourceGate::Open);
        // The probe is refused again: no new notice, a longer pause.
        let a = h.on_signal(sig, t0 + wait);
        assert!(a.notices.is_empty());
        let a = h.on_signal(Signal::Accepted { source: "imaging" }, t0 + wait * 3);
        assert!(a.notices.contains(&Notice::SourceAccepting {
            source: "imaging".into()
        }));
        assert_eq!(h.source_gate("imaging", t0 + wait * 3), SourceGate::Open);

        let mut once = Health::new(true, 3);
        let a = once.on_signal(sig, t0);
        assert!(matches!(a.stop, Some(Stop::Refused(_))));
        assert_eq!(once.source_gate("imaging", t0), SourceGate::Skip);
        assert_eq!(once.gate(t0), Gate::Closed);
    }

    /// `--once` never waits: the first refusal or outage stops dispatching with its reason.
    #[test]
    fn once_stops_at_the_first_refusal_or_outage() {
        let t0 = Instant::now();
        let mut h = Health::new(true, 4);
        let a = h.on_signal(refused("AccessDenied"), t0);
        assert_eq!(a.stop, Some(Stop::Refused("403 InvalidAccessKeyId".into())));
        assert!(!a.notices.iter().any(|n| matches!(n, Notice::ProbeIn(_))));
        assert_eq!(h.gate(t0 + Duration::from_secs(3600)), Gate::Closed);

        let mut h = Health::new(true, 4);
        let a = h.on_signal(Signal::Unreachable { message: "timeout" }, t0);
        assert_eq!(a.stop, Some(Stop::Unreachable("timeout".into())));
        assert_eq!(a.retry_in, Some(Duration::ZERO));
        assert_eq!(h.gate(t0), Gate::Closed);
    }
}
