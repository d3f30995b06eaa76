//! SigV4 signing of one request (aws-sigv4), with the S3-specific settings: single percent
//! encoding, no path normalisation, and the payload SHA-256 in `x-amz-content-sha256`.
//!
//! Must not break: the signed payload hash is the body's SHA-256, or `UNSIGNED-PAYLOAD` only
//! for a request sent over TLS whose body carries a checksum header the server checks (the
//! AWS SDKs' rule; `S3Client::upload_part` decides), and keys are encoded exactly once.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;

use super::credentials::Credentials;

/// SHA-256 of the empty payload.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The payload "hash" of a request whose body is not signed: its integrity rests on TLS and on
/// the `x-amz-checksum-*` header, which is signed and which the server checks.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// A request that could not be signed (a bug or bad credentials' format).
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the request: {0}")]
pub struct SignError(String);

/// Returns the headers (name, value) that sign a request. `headers` are the headers to cover
/// (x-amz-*, content-md5), `url` the full, already-encoded URL.
pub fn signing_headers(
    creds: &Credentials,
    region: &str,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    payload_sha256_hex: &str,
    time: SystemTime,
) -> Result<Vec<(String, String)>, SignError> {
    let identity = creds.to_aws().into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SignError(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        if payload_sha256_hex == UNSIGNED_PAYLOAD {
            SignableBody::UnsignedPayload
        } else {
            SignableBody::Precomputed(payload_sha256_hex.to_string())
        },
    )
    .map_err(|e| SignError(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SignError(e.to_string()))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// The worked example "GET Object" from the S3 SigV4 documentation (header-based auth).
    #[test]
    fn matches_the_s3_documentation_example() {
        let creds = Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
        );
        // 20130524T000000Z
        let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
        let h = signing_headers(
            &creds,
            "us-east-1",
            "GET",
            "https://examplebucket.s3.amazonaws.com/test.txt",
            &[
                ("host", "examplebucket.s3.amazonaws.com"),
                ("range", "bytes=0-9"),
            ],
            EMPTY_SHA256,
            t,
        )
        .unwrap();
        let auth = h.iter().find(|(k, _)| k == "authorization").unwrap();
        assert_eq!(
            auth.1,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        assert!(h
            .iter()
            .any(|(k, v)| k == "x-amz-date" && v == "20130524T000000Z"));
    }

    /// S3 signs the path as sent: encoded once, not twice.
    #[test]
    fn key_with_spaces_is_signed_as_encoded_once() {
        let creds = Credentials::new("AK", "SK", None);
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = signing_headers(
            &creds,
            "eu-central-1",
            "PUT",
            "http://h/b/a%20b",
            &[],
            EMPTY_SHA256,
            t,
        )
        .unwrap();
        let b = signing_headers(
            &creds,
            "eu-central-1",
            "PUT",
            "http://h/b/a%2520b",
            &[],
            EMPTY_SHA256,
            t,
        )
        .unwrap();
        assert_ne!(a, b, "double encoding would make these equal");
        let auth = &a.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert!(auth.contains("/eu-central-1/s3/aws4_request"), "{auth}");
    }
}
