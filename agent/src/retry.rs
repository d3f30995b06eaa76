//! The one place that decides whether a failed request is tried again.
//!
//! | failure                                                        | class        |
//! |----------------------------------------------------------------|--------------|
//! | connect error, timeout, connection reset, truncated response   | Transient    |
//! | 500, 502, 503 (incl. SlowDown), 504, 429, 408                  | Transient    |
//! | 400 RequestTimeout, BadDigest, XAmzContentSHA256Mismatch       | Transient (bytes damaged or slow in transit) |
//! | 403 (bad key, bad signature, access denied, expired token, clock skew) | Destination |
//! | 404 NoSuchBucket, 301/307 redirects, 400 AuthorizationHeaderMalformed (wrong region) | Destination |
//! | any other 4xx                                                  | Object       |
//!
//! *Transient* failures are retried with decorrelated jitter ("Exponential Backoff and Jitter",
//! AWS Architecture Blog), bounded in count by `agent.max_retries`; a `Retry-After` answer is
//! honoured. *Destination* failures are the operator's to fix (credentials, bucket, region,
//! clock): they are reported once and the agent pauses that destination instead of failing every
//! object in turn. *Object* failures reject that one object.
//!
//! Must not break: a request is retried only if it is idempotent or surely unsent, and a
//! destination-level refusal is never retried by the request layer.

use std::time::Duration;

/// What a failure means for what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Transient,
    Destination,
    Object,
}

/// What went wrong, reduced to what the policy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure<'a> {
    /// The server answered with an HTTP status and (maybe) an S3 error code.
    Status { status: u16, code: &'a str },
    /// No usable answer: connect error, timeout, reset, truncated body.
    Transport,
}

/// The table above.
pub fn classify(f: Failure<'_>) -> Class {
    let (status, code) = match f {
        Failure::Transport => return Class::Transient,
        Failure::Status { status, code } => (status, code),
    };
    match (status, code) {
        (500 | 502 | 503 | 504 | 429 | 408, _) => Class::Transient,
        (400, "RequestTimeout" | "BadDigest" | "XAmzContentSHA256Mismatch" | "IncompleteBody") => {
            Class::Transient
        }
        (403, _) => Class::Destination,
        (404, "NoSuchBucket") => Class::Destination,
        (301 | 307, _) => Class::Destination,
        (400, "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException") => {
            Class::Destination
        }
        // What the config asks every object to be written with (storage_class, tags): no
        // object can go until the config changes.
        (400, "InvalidStorageClass" | "InvalidTag") => Class::Destination,
        // The server lacks the operation: asking again cannot help.
        (501, _) => Class::Destination,
        (s, _) if s >= 500 => Class::Transient,
        _ => Class::Object,
    }
}

/// Backoff parameters for one retry loop.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The largest delay.
    pub cap: Duration,
}

impl Backoff {
    /// Between retries of one request: 200 ms growing to 20 s.
    pub const REQUEST: Backoff = Backoff {
        base: Duration::from_millis(200),
        cap: Duration::from_secs(20),
    };
    /// Between attempts of one object: 5 s growing to 10 min.
    pub const OBJECT: Backoff = Backoff {
        base: Duration::from_secs(5),
        cap: Duration::from_secs(600),
    };

    /// Decorrelated jitter: `min(cap, uniform(base, prev * 3))`. `unit` is a uniform sample in
    /// [0, 1) supplied by the caller, which keeps this function pure and testable.
    pub fn next(&self, prev: Duration, unit: f64) -> Duration {
        let lo = self.base.as_secs_f64();
        let hi = (prev.as_secs_f64() * 3.0).max(lo);
        let d = lo + (hi - lo) * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(d.min(self.cap.as_secs_f64()))
    }

    /// The n-th object-level delay (n starts at 1) without jitter below half of it.
    pub fn nth(&self, n: u32, unit: f64) -> Duration {
        let exp = self.base.as_secs_f64() * 2f64.powi(n.saturating_sub(1).min(30) as i32);
        let full = exp.min(self.cap.as_secs_f64());
        Duration::from_secs_f64(full / 2.0 + full / 2.0 * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(status: u16, code: &str) -> Class {
        classify(Failure::Status { status, code })
    }

    /// The table of the module header, row by row.
    #[test]
    fn policy_table() {
        assert_eq!(classify(Failure::Transport), Class::Transient);
        assert_eq!(st(500, "InternalError"), Class::Transient);
        assert_eq!(st(503, "SlowDown"), Class::Transient);
        assert_eq!(st(429, ""), Class::Transient);
        assert_eq!(st(400, "RequestTimeout"), Class::Transient);
        assert_eq!(st(400, "BadDigest"), Class::Transient);
        assert_eq!(st(403, "SignatureDoesNotMatch"), Class::Destination);
        assert_eq!(st(403, "InvalidAccessKeyId"), Class::Destination);
        assert_eq!(st(403, "AccessDenied"), Class::Destination);
        assert_eq!(st(404, "NoSuchBucket"), Class::Destination);
        assert_eq!(st(301, "PermanentRedirect"), Class::Destination);
        assert_eq!(st(400, "AuthorizationHeaderMalformed"), Class::Destination);
        assert_eq!(st(501, "NotImplemented"), Class::Destination);
        assert_eq!(
            st(400, "InvalidStorageClass"),
            Class::Destination,
            "a config problem"
        );
        assert_eq!(st(400, "EntityTooLarge"), Class::Object);
        assert_eq!(st(404, "NoSuchKey"), Class::Object);
        assert_eq!(st(400, "InvalidArgument"), Class::Object);
    }

    /// Request delays stay between the base and the cap.
    #[test]
    fn decorrelated_jitter_stays_in_bounds() {
        let b = Backoff::REQUEST;
        let mut prev = b.base;
        for i in 0..100 {
            let unit = (i as f64 * 0.37) % 1.0;
            let d = b.next(prev, unit);
            assert!(d >= b.base && d <= b.cap, "{d:?}");
            assert!(d.as_secs_f64() <= (prev.as_secs_f64() * 3.0).max(b.base.as_secs_f64()) + 1e-9);
            prev = d;
        }
        // The upper end grows geometrically and is capped.
        assert_eq!(b.next(Duration::from_secs(100), 0.99), b.cap);
        assert_eq!(b.next(b.base, 0.0), b.base);
    }

    /// Object delays double per attempt up to the cap, jittered down by at most half.
    #[test]
    fn object_backoff_doubles_up_to_cap() {
        let b = Backoff::OBJECT;
        assert_eq!(b.nth(1, 1.0), Duration::from_secs(5));
        assert_eq!(b.nth(2, 1.0), Duration::from_secs(10));
        assert_eq!(b.nth(3, 0.0), Duration::from_secs(10));
        assert_eq!(b.nth(40, 1.0), Duration::from_secs(600));
    }
}
