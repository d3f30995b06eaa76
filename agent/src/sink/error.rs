//! What a destination refused, in the sink layer's terms: whom the refusal concerns (`Scope`),
//! a code the scheduler can compare (`Code`: a new code is a new cause, told once), and the
//! advice for the operator. Every sink maps its own errors into it (S3 answers, relay
//! refusals), so the scheduler never sees a transport's error type.
//!
//! Must not break: `Scope::Destination` pauses every upload and `Scope::Source` one source's,
//! so a refusal is scoped to keys only where the destination said so (403 AccessDenied on a
//! prefix, a relay's authorization of this agent's prefix).

use crate::retry::Class;
use crate::s3::S3Error;

/// Whom a refusal concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This object only (rejected; the others go on).
    Object,
    /// The keys of the object's source (a bucket policy on its prefix).
    Source,
    /// Every request (credentials, bucket, region, clock, the relay refusing this agent).
    Destination,
}

/// Why, as far as the scheduler must tell causes apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    SignatureMismatch,
    UnknownAccessKey,
    ExpiredCredentials,
    ClockSkew,
    /// 403 AccessDenied (on S3, usually a policy on some keys), or a key outside this agent's
    /// prefix at the relay.
    AccessDenied,
    NoSuchBucket,
    WrongRegion,
    /// The server lacks an operation the upload needs.
    NotImplemented,
    /// The relay refuses this agent (certificate, identity).
    AgentRefused,
    /// The relay speaks another protocol version.
    VersionRefused,
    /// The client could not be set up (TLS, certificates).
    Setup,
    /// Any other answer, with the server's code.
    Other(String),
}

impl Code {
    /// A stable name, compared by the scheduler to tell causes apart.
    pub fn as_str(&self) -> &str {
        match self {
            Code::SignatureMismatch => "SignatureDoesNotMatch",
            Code::UnknownAccessKey => "InvalidAccessKeyId",
            Code::ExpiredCredentials => "ExpiredToken",
            Code::ClockSkew => "RequestTimeTooSkewed",
            Code::AccessDenied => "AccessDenied",
            Code::NoSuchBucket => "NoSuchBucket",
            Code::WrongRegion => "WrongRegion",
            Code::NotImplemented => "NotImplemented",
            Code::AgentRefused => "RelayRefused",
            Code::VersionRefused => "RelayVersion",
            Code::Setup => "Setup",
            Code::Other(c) => c,
        }
    }
}

/// A refusal by the destination, with what the operator should check.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct DestinationError {
    /// Whom it concerns.
    pub scope: Scope,
    /// Why.
    pub code: Code,
    /// What the destination said, with the operation and key.
    pub detail: String,
    /// What the operator should check.
    pub advice: Option<&'static str>,
}

impl DestinationError {
    /// An S3 answer that refuses (`Class::Destination` or `Class::Object`).
    pub fn from_s3(e: &S3Error) -> DestinationError {
        let code = match (e.status(), e.code().unwrap_or_default()) {
            (_, "SignatureDoesNotMatch") => Code::SignatureMismatch,
            (_, "InvalidAccessKeyId") => Code::UnknownAccessKey,
            (_, "ExpiredToken" | "InvalidToken") => Code::ExpiredCredentials,
            (_, "RequestTimeTooSkewed") => Code::ClockSkew,
            (Some(403), "AccessDenied") => Code::AccessDenied,
            (_, "NoSuchBucket") => Code::NoSuchBucket,
            (Some(301 | 307), _) | (_, "AuthorizationHeaderMalformed") => Code::WrongRegion,
            (Some(501), _) | (_, "NotImplemented") => Code::NotImplemented,
            _ if matches!(e, S3Error::Setup(_)) => Code::Setup,
            (_, other) => Code::Other(other.to_string()),
        };
        let scope = if e.class() == Class::Object {
            Scope::Object
        } else if code == Code::AccessDenied {
            Scope::Source
        } else {
            Scope::Destination
        };
        DestinationError {
            scope,
            code,
            detail: e.to_string(),
            advice: e.advice(),
        }
    }

    /// The error with its advice, as reported to the operator.
    pub fn for_operator(&self) -> String {
        match self.advice {
            Some(advice) => format!("{self} ({advice})"),
            None => self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::ServiceError;

    fn answer(status: u16, code: &str) -> S3Error {
        S3Error::Service(Box::new(ServiceError {
            op: "PutObject",
            bucket: "b".into(),
            key: "fhir/a.ndjson".into(),
            status,
            code: code.into(),
            message: "no".into(),
            retry_after: None,
        }))
    }

    /// Only a 403 AccessDenied is scoped to the source's keys; credentials, bucket and region
    /// concern every request; other 4xx concern the object.
    #[test]
    fn s3_answers_get_their_scope_code_and_advice() {
        let cases = [
            (403, "AccessDenied", Scope::Source, Code::AccessDenied),
            (
                403,
                "SignatureDoesNotMatch",
                Scope::Destination,
                Code::SignatureMismatch,
            ),
            (
                403,
                "InvalidAccessKeyId",
                Scope::Destination,
                Code::UnknownAccessKey,
            ),
            (
                403,
                "RequestTimeTooSkewed",
                Scope::Destination,
                Code::ClockSkew,
            ),
            (404, "NoSuchBucket", Scope::Destination, Code::NoSuchBucket),
            (
                301,
                "PermanentRedirect",
                Scope::Destination,
                Code::WrongRegion,
            ),
            (
                501,
                "NotImplemented",
                Scope::Destination,
                Code::NotImplemented,
            ),
            (
                400,
                "InvalidArgument",
                Scope::Object,
                Code::Other("InvalidArgument".into()),
            ),
        ];
        for (status, code, scope, want) in cases {
            let e = DestinationError::from_s3(&answer(status, code));
            assert_eq!((e.scope, &e.code), (scope, &want), "{status} {code}");
            assert!(e.detail.contains(code), "{}", e.detail);
        }
        let e = DestinationError::from_s3(&answer(403, "SignatureDoesNotMatch"));
        assert!(
            e.for_operator().contains("check the credentials"),
            "{}",
            e.for_operator()
        );
    }
}
