//! The one policy that turns how a delivery ended (`Outcome`) into a journal transition, a
//! retry delay and what the run counts; destination-level signals go through `Health`. Every
//! delay of the scheduler is defined here.
//!
//! Must not break: only `Transition::Deliver` lets the source be deleted or moved (after the
//! delivery is committed); a conflict or rejection is terminal for that version and keeps the
//! source; a refusal or outage never counts as an object's attempt.

use std::time::Duration;

use tokio::time::Instant;

use super::health::{Action, Health, Signal};
use crate::journal::{JournalError, ObjectRow, State};
use crate::retry::Backoff;
use crate::sink::error::Scope;
use crate::sink::Outcome;

/// Delay before probing a destination that refused us, growing up to 10 minutes.
pub const PROBE: Backoff = Backoff {
    base: Duration::from_secs(30),
    cap: Duration::from_secs(600),
};

/// Delay before probing a destination that stopped answering, growing up to 1 minute (the
/// request-level retries have already waited before an outage is declared).
pub const OUTAGE_PROBE: Backoff = Backoff {
    base: Duration::from_secs(2),
    cap: Duration::from_secs(60),
};

/// Delay before an object that failed (after the request-level retries) is tried again.
pub const OBJECT_RETRY: Backoff = Backoff::OBJECT;

/// Delay before a failed after_upload action (delete, move) is tried again.
pub const AFTER_UPLOAD_RETRY: Duration = Duration::from_secs(60);

/// The settle period of an object whose source is no longer in the config.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(30);

/// What the journal records for one finished object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Record the delivery (unless the object's task did already), then owe the after_upload
    /// action.
    Deliver {
        sha256: [u8; 32],
        landed: crate::journal::Landed,
    },
    /// Back to the queue, not before `delay` from now.
    RetryLater {
        delay: Duration,
        count_attempt: bool,
        message: String,
    },
    /// A terminal state for this version (rejected, conflict, vanished), with why.
    Finish { state: State, message: String },
    /// The source changed under the upload: start over once it has settled again.
    StartOver { message: String, settle: Duration },
    /// Nothing to record (shutdown interrupted it; the journal holds where it got to).
    Leave,
}

/// How the run's summary counts the object (`--once` derives its exit code from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// Counted once the delivery is committed (it may turn out stale: see the driver).
    Delivered,
    /// Not delivered in this run (`--once`: it resumes on the next run).
    Failed,
    Rejected,
    /// Failed its record check.
    Quarantined,
    Conflict,
    Vanished,
    Changed,
    /// `--dry-run`: would be sent.
    Listed,
    Nothing,
}

/// What follows from one outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What the journal records.
    pub transition: Transition,
    /// How the run counts it.
    pub tally: Tally,
    /// What the destination's health says (notices, `--once` stop).
    pub health: Action,
}

/// What the policy needs to know of the run and the object's source.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// `--once`: nothing waits; failures are counted.
    pub once: bool,
    /// How long the object's source takes to settle after a change (a bucket source: its poll
    /// interval, by when a listing has seen the new version).
    pub settle: Duration,
    /// A uniform sample in [0, 1) for the retry jitter.
    pub jitter: f64,
}

/// Decides what follows from `outcome` for `row`. A journal failure ends the run.
pub fn decide(
    outcome: Outcome,
    row: &ObjectRow,
    cx: Context,
    health: &mut Health,
    now: Instant,
) -> Result<Decision, JournalError> {
    let plain = |transition, tally| Decision {
        transition,
        tally,
        health: Action::default(),
    };
    Ok(match outcome {
        Outcome::Delivered(sha256, landed) => Decision {
            transition: Transition::Deliver { sha256, landed },
            tally: Tally::Delivered,
            health: health.on_signal(
                Signal::Accepted {
                    source: &row.source,
                },
                now,
            ),
        },
        Outcome::Retry(message) => {
            let delay = OBJECT_RETRY.nth(row.attempts + 1, cx.jitter);
            let tally = if cx.once {
                Tally::Failed
            } else {
                Tally::Nothing
            };
            plain(
                Transition::RetryLater {
                    delay,
                    count_attempt: true,
                    message,
                },
                tally,
            )
        }
        Outcome::Unreachable(message) => {
            let health = health.on_signal(Signal::Unreachable { message: &message }, now);
            Decision {
                transition: Transition::RetryLater {
                    delay: health.retry_in.unwrap_or_default(),
                    count_attempt: false,
                    message,
                },
                tally: if cx.once {
                    Tally::Failed
                } else {
                    Tally::Nothing
                },
                health,
            }
        }
        Outcome::Destination(err) if err.scope == Scope::Object => plain(
            Transition::Finish {
                state: State::Rejected,
                message: err.to_string(),
            },
            Tally::Rejected,
        ),
        Outcome::Destination(err) => {
            let advice = err.for_operator();
            let code = err.code.as_str();
            let signal = if err.scope == Scope::Source {
                Signal::SourceRefused {
                    source: &row.source,
                    code,
                    message: &advice,
                }
            } else {
                Signal::Refused {
                    code,
                    message: &advice,
                }
            };
            let health = health.on_signal(signal, now);
            let transition = match health.retry_in {
                Some(delay) => Transition::RetryLater {
                    delay,
                    count_attempt: false,
                    message: err.to_string(),
                },
                // `--once`, refused on this source's keys: the object stays as it is.
                None => Transition::Leave,
            };
            Decision {
                transition,
                tally: Tally::Nothing,
                health,
            }
        }
        Outcome::Rejected(message) => plain(
            Transition::Finish {
                state: State::Rejected,
                message,
            },
            Tally::Rejected,
        ),
        Outcome::Quarantined(invalid) => plain(
            Transition::Finish {
                state: State::Quarantined,
                message: format!("quarantined: {invalid}"),
            },
            Tally::Quarantined,
        ),
        Outcome::Conflict(message) => plain(
            Transition::Finish {
                state: State::Conflict,
                message,
            },
            Tally::Conflict,
        ),
        Outcome::Vanished(message) => plain(
            Transition::Finish {
                state: State::Vanished,
                message,
            },
            Tally::Vanished,
        ),
        Outcome::Changed(message) => plain(
            Transition::StartOver {
                message,
                settle: cx.settle,
            },
            Tally::Changed,
        ),
        Outcome::Interrupted => plain(Transition::Leave, Tally::Nothing),
        Outcome::Listed => plain(Transition::Leave, Tally::Listed),
        Outcome::Fatal(e) => return Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::S3Error;
    use crate::sink::error::DestinationError;
    use crate::version::Version;

    fn row(attempts: u32) -> ObjectRow {
        ObjectRow {
            id: 1,
            source: "fhir".into(),
            rel_path: "a.ndjson".into(),
            key: "fhir/a.ndjson".into(),
            version: Version::File {
                size: 1,
                mtime_ns: 1,
                inode: 1,
            },
            state: State::Pending,
            sha256: None,
            upload_id: None,
            part_size: None,
            attempts,
            pinned_etag: None,
            prior_etag: None,
            ctime_ns: None,
            part_hashes: None,
            priority: 0,
            flag: None,
            streamed: false,
            crc64nvme: None,
        }
    }

    fn cx(once: bool) -> Context {
        Context {
            once,
            settle: Duration::from_secs(7),
            jitter: 0.5,
        }
    }

    fn denied(code: &str) -> S3Error {
        S3Error::Service(Box::new(crate::s3::ServiceError {
            op: "PutObject",
            bucket: "b".into(),
            key: "k".into(),
            status: 403,
            code: code.into(),
            message: "Access Denied".into(),
            retry_after: None,
        }))
    }

    /// Each outcome's transition, tally and delay; a refusal or outage never counts as an
    /// attempt of the object, a failure does, with a delay that grows with the attempts.
    #[test]
    fn every_outcome_has_one_transition() {
        let now = Instant::now();
        let mut h = Health::new(false, 9);
        let d = |o, attempts, h: &mut Health| decide(o, &row(attempts), cx(false), h, now).unwrap();
        let first = d(Outcome::Retry("503".into()), 0, &mut h);
        let later = d(Outcome::Retry("503".into()), 6, &mut h);
        match (&first.transition, &later.transition) {
            (
                Transition::RetryLater {
                    delay: a,
                    count_attempt: true,
                    ..
                },
                Transition::RetryLater {
                    delay: b,
                    count_attempt: true,
                    ..
                },
            ) => assert!(a < b && *b <= OBJECT_RETRY.cap, "{a:?} {b:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(first.tally, Tally::Nothing, "the daemon goes on trying");
        let once = decide(Outcome::Retry("503".into()), &row(0), cx(true), &mut h, now).unwrap();
        assert_eq!(once.tally, Tally::Failed);

        for (o, state) in [
            (Outcome::Rejected("too big".into()), State::Rejected),
            (Outcome::Conflict("theirs".into()), State::Conflict),
            (Outcome::Vanished("gone".into()), State::Vanished),
        ] {
            let got = d(o, 0, &mut h);
            assert!(matches!(got.transition, Transition::Finish { state: s, .. } if s == state));
        }
        let changed = d(Outcome::Changed("mtime".into()), 0, &mut h);
        assert_eq!(
            changed.transition,
            Transition::StartOver {
                message: "mtime".into(),
                settle: Duration::from_secs(7)
            }
        );
        assert_eq!(
            d(Outcome::Interrupted, 0, &mut h).transition,
            Transition::Leave
        );

        let out = d(Outcome::Unreachable("timeout".into()), 3, &mut h);
        assert!(matches!(
            out.transition,
            Transition::RetryLater {
                count_attempt: false,
                ..
            }
        ));
        let refused = d(
            Outcome::Destination(DestinationError::from_s3(&denied("InvalidAccessKeyId"))),
            3,
            &mut h,
        );
        assert!(matches!(
            refused.transition,
            Transition::RetryLater {
                count_attempt: false,
                ..
            }
        ));
        let object = d(
            Outcome::Destination(DestinationError::from_s3(&S3Error::Service(Box::new(
                crate::s3::ServiceError {
                    op: "PutObject",
                    bucket: "b".into(),
                    key: "k".into(),
                    status: 400,
                    code: "InvalidArgument".into(),
                    message: "bad".into(),
                    retry_after: None,
                },
            )))),
            0,
            &mut h,
        );
        assert!(matches!(
            object.transition,
            Transition::Finish {
                state: State::Rejected,
                ..
            }
        ));
        assert_eq!(object.tally, Tally::Rejected);
        let delivered = d(Outcome::Delivered([0; 32], Default::default()), 0, &mut h);
        assert!(matches!(delivered.transition, Transition::Deliver { .. }));
        assert!(
            !delivered.health.notices.is_empty(),
            "the destination is back"
        );
        let fatal = decide(
            Outcome::Fatal(JournalError::Panicked),
            &row(0),
            cx(false),
            &mut h,
            now,
        );
        assert!(fatal.is_err());
    }
}
