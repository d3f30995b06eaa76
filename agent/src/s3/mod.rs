//! One small S3 client: the handful of operations ha-edge needs, SigV4-signed, with retries
//! decided by `crate::retry`. Every body is in memory (`Bytes`) when it is sent, so its SHA-256
//! is in the signature and in `x-amz-checksum-sha256`, and a retry re-sends the same bytes.
//!
//! # Operations
//! | method | S3 operation | notes |
//! |---|---|---|
//! | `put_object` | PutObject | with the write's condition; returns checksum, ETag, version |
//! | `create_multipart` | CreateMultipartUpload | CRC64NVME full-object, or SHA-256 with `x-amz-meta-sha256`; SSE; not retried when ambiguous |
//! | `upload_part` | UploadPart | `x-amz-checksum-crc64nvme` or `-sha256` per part |
//! | `list_parts` | ListParts | resume after a restart |
//! | `complete_multipart` | CompleteMultipartUpload | with the condition; a 200 with an error body is an error |
//! | `abort_multipart` | AbortMultipartUpload | a missing upload is fine |
//! | `head_bucket`, `head_object` | HeadBucket, HeadObject | preflight; verification |
//! | `get_range` | GetObject (Range) | bucket sources, If-Match on the pinned ETag |
//! | `get_stream` | GetObject (from an offset) | a bucket source read once, in order, as it arrives |
//! | `list_objects` | ListObjectsV2 | bucket sources, `validate` |
//! | `copy_object`, `delete_object` | CopyObject, DeleteObject | a bucket source's after_upload |
//!
//! Must not break: every body's SHA-256 is signed and sent, so the server rejects damaged bytes; a
//! retry re-sends the same bytes.

/// Where the keys come from (environment, files, web identity, instance roles).
pub mod credentials;
/// The one multipart uploader, shared by the agent's sink and the relay's landing.
pub mod multipart;
/// Temporary credentials (web identity, container endpoint), renewed before they expire.
pub mod refresh;
/// SigV4.
mod sign;
/// The one check of a stored object against what was sent.
pub mod verify;
/// The XML documents.
mod xml;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::hash::Sha256;
use base64::Engine as _;
use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, Url};

use crate::config::{S3Destination, Sse};
use crate::retry::{classify, Backoff, Class, Failure};
pub use credentials::Credentials;
pub use xml::{ListPage, ServerPart};

/// Characters left alone in a key path: RFC 3986 unreserved plus '/'.
const KEY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');
/// Query values: unreserved only.
const QUERY_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// An error answer from the server.
#[derive(Debug, thiserror::Error)]
#[error("{op} s3://{bucket}/{key}: HTTP {status} {code}: {message}")]
pub struct ServiceError {
    /// The S3 operation (`PutObject`, `UploadPart`, ...).
    pub op: &'static str,
    /// The bucket the request was for.
    pub bucket: String,
    /// The key the request was for (empty for bucket-level operations).
    pub key: String,
    /// The HTTP status.
    pub status: u16,
    /// The S3 error code from the body (`AccessDenied`, `NoSuchUpload`, ...), or the status text.
    pub code: String,
    /// The server's message.
    pub message: String,
    /// A `Retry-After` the server asked for (honoured by the request retries).
    pub retry_after: Option<Duration>,
}

/// Why a request failed: an error answer, no usable answer, an answer that makes no sense, or a
/// client that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error(transparent)]
    Service(Box<ServiceError>),
    #[error("{op} s3://{bucket}/{key}: {detail}")]
    Transport {
        op: &'static str,
        bucket: String,
        key: String,
        detail: String,
        /// The request surely never reached the server (no connection could be made).
        unsent: bool,
    },
    #[error("{op} s3://{bucket}/{key}: unexpected answer: {detail}")]
    Protocol {
        op: &'static str,
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("cannot build the HTTP client: {0}")]
    Setup(String),
}

impl S3Error {
    /// What the retry policy makes of this error (see `crate::retry`).
    pub fn class(&self) -> Class {
        match self {
            S3Error::Service(e) => classify(Failure::Status {
                status: e.status,
                code: &e.code,
            }),
            S3Error::Transport { .. } | S3Error::Protocol { .. } => classify(Failure::Transport),
            S3Error::Setup(_) => Class::Destination,
        }
    }

    /// No HTTP answer came back (connect error, timeout, reset, truncated answer).
    pub fn is_unanswered(&self) -> bool {
        matches!(self, S3Error::Transport { .. })
    }

    /// Whether a request that is not idempotent may have taken effect although it failed:
    /// no answer came back after it was sent, or the server answered an error that does not
    /// say the request was not carried out (500 InternalError may come after the work).
    pub fn is_ambiguous(&self) -> bool {
        match self {
            S3Error::Transport { unsent, .. } => !unsent,
            S3Error::Protocol { .. } => true,
            S3Error::Service(e) => e.status >= 500 && e.status != 503,
            _ => false,
        }
    }

    /// The S3 error code of an error answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            S3Error::Service(e) => Some(&e.code),
            _ => None,
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            S3Error::Service(e) => Some(e.status),
            _ => None,
        }
    }

    /// The error with its advice, as reported to the operator.
    pub fn for_operator(&self) -> String {
        match self.advice() {
            Some(advice) => format!("{self} ({advice})"),
            None => self.to_string(),
        }
    }

    /// The server does not take CRC64NVME checksums (an older S3-compatible server): 501, or
    /// a 400 that names the checksum or the argument.
    pub fn refuses_crc64nvme(&self) -> bool {
        matches!(self.status(), Some(400 | 501))
            && matches!(
                self.code(),
                Some("NotImplemented" | "InvalidArgument" | "InvalidRequest" | "InvalidChecksum")
            )
    }

    /// A sentence for the operator on destination-level errors: what is wrong and what to check.
    pub fn advice(&self) -> Option<&'static str> {
        let S3Error::Service(e) = self else {
            return None;
        };
        Some(match (e.status, e.code.as_str()) {
            (403, "SignatureDoesNotMatch") => "the secret key does not match the access key ID: check the credentials",
            (403, "InvalidAccessKeyId") => "the server does not know this access key ID: check the credentials",
            (403, "ExpiredToken" | "InvalidToken") => "the session token is expired or invalid: renew the credentials",
            (403, "RequestTimeTooSkewed") => "this machine's clock is too far off: fix time synchronisation (NTP)",
            (403, _) => "access denied: check the credentials and the bucket policy (s3:PutObject, s3:GetObject, multipart permissions)",
            (404, "NoSuchBucket") => "the bucket does not exist at this endpoint: check destination.bucket and destination.endpoint",
            (301 | 307, _) | (400, "AuthorizationHeaderMalformed") => "the bucket lives in another region or endpoint: check destination.region and destination.endpoint",
            _ => return None,
        })
    }
}

/// A write that must not replace what someone else stored (`overwrite = "own"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    None,
    /// Only if nothing is at the key (`If-None-Match: *`).
    Create,
    /// Only if the object at the key is still this one (`If-Match: <ETag>`).
    Replace(String),
}

impl Precondition {
    /// The conditional header of this precondition, if any.
    fn add_to(&self, headers: &mut Vec<(&'static str, String)>) {
        match self {
            Precondition::None => {}
            Precondition::Create => headers.push(("if-none-match", "*".into())),
            Precondition::Replace(etag) => headers.push(("if-match", etag.clone())),
        }
    }
}

/// How a written object is labelled: its content type, tags and storage class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `content-type` (default `application/octet-stream`).
    pub content_type: Option<String>,
    /// `x-amz-tagging` (URL-encoded `k=v&k=v`).
    pub tagging: Option<String>,
    /// `x-amz-storage-class`.
    pub storage_class: Option<String>,
    /// `x-amz-meta-agent-identity`: the agent a relay landed the object for.
    pub agent_identity: Option<String>,
}

impl ObjectMeta {
    fn add_to(&self, headers: &mut Vec<(&'static str, String)>) {
        headers.push((
            "content-type",
            self.content_type
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into()),
        ));
        if let Some(t) = &self.tagging {
            headers.push(("x-amz-tagging", t.clone()));
        }
        if let Some(c) = &self.storage_class {
            headers.push(("x-amz-storage-class", c.clone()));
        }
        if let Some(a) = &self.agent_identity {
            headers.push(("x-amz-meta-agent-identity", a.clone()));
        }
    }
}

/// How a multipart upload's parts and whole object are checked by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartChecksum<'a> {
    /// SHA-256 per part (composite checksum); the whole object's SHA-256, hashed before the
    /// upload starts, in `x-amz-meta-sha256`.
    Sha256(&'a [u8; 32]),
    /// CRC-64/NVME per part and of the whole object (`FULL_OBJECT`), which the server checks
    /// at completion: no pass over the source before the upload. The whole object's SHA-256
    /// goes into the metadata if it is known first (the relay has it from the agent's offer).
    Crc64Nvme(Option<&'a [u8; 32]>),
}

/// What a PutObject answer tells.
#[derive(Debug, Clone, Default)]
pub struct PutAnswer {
    /// The SHA-256 the server computed over what it stored, if it says.
    pub checksum_sha256: Option<String>,
    /// The new object's ETag, as sent (quoted).
    pub etag: Option<String>,
    /// Where the bucket is versioned.
    pub version: Option<String>,
    /// `x-amz-server-side-encryption`, if the server says.
    pub sse: Option<String>,
    /// `x-amz-server-side-encryption-aws-kms-key-id`, if the server says.
    pub kms_key_id: Option<String>,
}

/// What HEAD tells about a stored object.
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// Content-Length: the stored object's size.
    pub size: u64,
    /// `x-amz-meta-sha256`: the hex SHA-256 ha-edge stored with the object.
    pub meta_sha256: Option<String>,
    /// `x-amz-checksum-sha256`: the server's own checksum, whole or composite (`...-N`), if it
    /// keeps one.
    pub checksum_sha256: Option<String>,
    /// `x-amz-checksum-crc64nvme`: the server's CRC-64/NVME of the whole object, if it keeps one.
    pub checksum_crc64nvme: Option<String>,
    /// The ETag, as sent (quoted).
    pub etag: Option<String>,
    /// The `Last-Modified` header (an HTTP date).
    pub last_modified: Option<String>,
    /// `x-amz-version-id`, where the bucket is versioned.
    pub version: Option<String>,
    /// `x-amz-server-side-encryption`, if the server says.
    pub sse: Option<String>,
    /// `x-amz-server-side-encryption-aws-kms-key-id`, if the server says.
    pub kms_key_id: Option<String>,
}

/// A byte range read from an object, with what the server says about the object it came from.
#[derive(Debug, Clone)]
pub struct Ranged {
    /// The bytes of the range.
    pub body: Bytes,
    /// The ETag of the object the bytes came from.
    pub etag: Option<String>,
    /// Its `Last-Modified` (an HTTP date).
    pub last_modified: Option<String>,
    /// The object's whole size (from Content-Range, or Content-Length for a whole-object read).
    pub total: Option<u64>,
}

/// An open GET whose body is read as it arrives (`S3Client::get_stream`), with what the server
/// says about the object it comes from.
pub struct Streamed {
    /// The ETag of the object the bytes come from.
    pub etag: Option<String>,
    /// Its `Last-Modified` (an HTTP date).
    pub last_modified: Option<String>,
    /// The object's whole size (from Content-Range, or Content-Length from byte 0).
    pub total: Option<u64>,
    resp: reqwest::Response,
    /// How long one chunk may take to arrive.
    timeout: Duration,
    op: &'static str,
    bucket: String,
    key: String,
}

impl Streamed {
    /// The next bytes of the body, or None at its end; a stall longer than the request timeout
    /// is an error.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, S3Error> {
        let transport = |detail: String| S3Error::Transport {
            op: self.op,
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            detail,
            unsent: false,
        };
        match tokio::time::timeout(self.timeout, self.resp.chunk()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(transport(describe(&e))),
            Err(_) => Err(transport(format!(
                "no data for {} s while reading the object",
                self.timeout.as_secs()
            ))),
        }
    }
}

/// One request as signed and sent (a retry sends it again as it is, re-signed).
struct Request {
    method: Method,
    url: Url,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    payload_sha256_hex: String,
}

/// The one hop-by-hop header a request may carry (`Connection: close`, for a write expected to
/// be refused, which a server may answer before reading the body and then close: the
/// connection is not pooled). Sent, never signed: a proxy on the way may drop it.
const HOP_BY_HOP: &str = "connection";

/// An answer: status, headers, body.
struct Response {
    headers: reqwest::header::HeaderMap,
    body: Bytes,
}

/// A client for one bucket at one endpoint, shared (`Arc`) by every transfer to it: one connection
/// pool, one set of credentials (refreshed when they expire).
pub struct S3Client {
    /// The connection pool, replaced by a fresh one after a write refused by its condition
    /// (`renew_pool`).
    http: std::sync::RwLock<reqwest::Client>,
    /// What a fresh pool is built from.
    tls_config: rustls::ClientConfig,
    pool: usize,
    dest: S3Destination,
    creds: Credentials,
    max_retries: u32,
    timeout: Duration,
    /// The endpoint is https: parts checked by CRC-64/NVME go with an unsigned payload.
    tls: bool,
}

impl S3Client {
    /// A client for `dest`: TLS with the configured CA (or the built-in web roots), up to `pool`
    /// idle connections, every request bounded by `timeout` and retried up to `max_retries` times
    /// when the policy allows.
    pub fn new(
        dest: &S3Destination,
        creds: Credentials,
        max_retries: u32,
        timeout: Duration,
        pool: usize,
    ) -> Result<Arc<S3Client>, S3Error> {
        let tls = tls_config(dest.ca_file.as_deref()).map_err(S3Error::Setup)?;
        let http = http_client(tls.clone(), pool)?;
        Ok(Arc::new(S3Client {
            http: std::sync::RwLock::new(http),
            tls_config: tls,
            pool,
            dest: dest.clone(),
            creds,
            max_retries,
            timeout,
            tls: dest.endpoint.scheme() == "https",
        }))
    }

    /// A write refused by its condition (412): the server may have answered before reading
    /// the body and then close the connection without saying so, and the client would pool it
    /// for the next request, which dies there (a part of several MiB sent for nothing). Later
    /// requests go through a fresh pool; the old one's connections close as their requests
    /// end. A 412 is rare (a write re-sent after a crash, another writer's object), so the
    /// connections opened again cost little.
    fn renew_pool(&self, op: &str, key: &str) {
        match http_client(self.tls_config.clone(), self.pool) {
            Ok(fresh) => {
                *self
                    .http
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                tracing::debug!(
                    op,
                    key,
                    "a write refused by its condition: later requests use fresh connections"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the connection pool"),
        }
    }

    /// Whether a part of an upload checked by CRC-64/NVME (`with_crc`) is signed with its
    /// SHA-256. Over https it is not: the body is sent with `UNSIGNED-PAYLOAD`, protected on
    /// the way by TLS and checked by the server against its signed CRC-64/NVME header, as the
    /// AWS SDKs do. That spares one SHA-256 pass over every byte of a multipart object (the
    /// whole-object SHA-256 is still computed, for the journal and the receipt). Over plain
    /// http the SHA-256 signature is what keeps a changed body from being accepted.
    pub fn signs_part_payload(&self, with_crc: bool) -> bool {
        !(self.tls && with_crc)
    }

    /// The key prefix of this bucket's configuration (the destination's `prefix`).
    pub fn prefix(&self) -> &str {
        &self.dest.prefix
    }

    /// Whether this destination may replace objects ha-edge did not write (`overwrite`).
    pub fn overwrite(&self) -> crate::config::Overwrite {
        self.dest.overwrite
    }

    /// How multipart uploads are checked (`destination.checksum`).
    pub fn checksum(&self) -> crate::config::Checksum {
        self.dest.checksum
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.dest.bucket
    }

    /// How an object of `source` at `key` is labelled (the destination's rules).
    pub fn meta_for(&self, key: &str, source: &str) -> ObjectMeta {
        let rules = &self.dest.object_meta;
        ObjectMeta {
            content_type: Some(rules.content_type(key).to_string()),
            tagging: rules.tagging(source),
            storage_class: rules.storage_class.clone(),
            agent_identity: None,
        }
    }

    /// `meta_for`, and for an object that failed its record check (`on_invalid =
    /// "upload-flagged"`) the tag `ha-edge-validation=failed` besides the configured ones.
    pub fn meta_for_row(&self, key: &str, source: &str, flagged: bool) -> ObjectMeta {
        let mut meta = self.meta_for(key, source);
        if flagged {
            let tag = "ha-edge-validation=failed";
            meta.tagging = Some(match meta.tagging.take() {
                Some(t) if !t.is_empty() => format!("{t}&{tag}"),
                _ => tag.to_string(),
            });
        }
        meta
    }

    /// The server-side encryption the destination asks for.
    pub fn sse(&self) -> Option<&Sse> {
        self.dest.sse.as_ref()
    }

    /// The endpoint URL, for logs.
    pub fn endpoint(&self) -> &Url {
        &self.dest.endpoint
    }

    /// The bucket's base URL, without a trailing slash: `scheme://host/bucket` (path style) or
    /// `scheme://bucket.host` (virtual-hosted).
    fn bucket_base(&self) -> String {
        let ep = &self.dest.endpoint;
        if self.dest.path_style {
            format!("{}://{}/{}", ep.scheme(), authority(ep), self.dest.bucket)
        } else {
            format!("{}://{}.{}", ep.scheme(), self.dest.bucket, authority(ep))
        }
    }

    /// The URL of `key` (path or virtual-host style), with `query` encoded once.
    fn url(&self, key: &str, query: &[(&str, &str)]) -> Url {
        let mut s = format!(
            "{}/{}",
            self.bucket_base(),
            utf8_percent_encode(key, KEY_SET)
        );
        for (i, (k, v)) in query.iter().enumerate() {
            s.push(if i == 0 { '?' } else { '&' });
            s.push_str(k);
            if !v.is_empty() || *k != "uploads" {
                s.push('=');
                s.push_str(&utf8_percent_encode(v, QUERY_SET).to_string());
            }
        }
        Url::parse(&s).unwrap_or_else(|_| self.dest.endpoint.clone())
    }

    /// The server-side encryption headers of the configuration, for writes.
    fn sse_headers(&self, headers: &mut Vec<(&'static str, String)>) {
        match &self.dest.sse {
            None => {}
            Some(Sse::Aes256) => headers.push(("x-amz-server-side-encryption", "AES256".into())),
            Some(Sse::Kms { key_id }) => {
                headers.push(("x-amz-server-side-encryption", "aws:kms".into()));
                if let Some(id) = key_id {
                    headers.push(("x-amz-server-side-encryption-aws-kms-key-id", id.clone()));
                }
            }
        }
    }

    /// Single PUT of a whole object whose SHA-256 is `sha256`. Returns the SHA-256 (base64) the
    /// server computed over what it stored, if it says.
    pub async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        sha256: &[u8; 32],
        when: &Precondition,
        meta: &ObjectMeta,
    ) -> Result<PutAnswer, S3Error> {
        self.put(key, body, sha256, when, meta, false).await
    }

    /// `put_object` of a write expected to be refused (the conditional-write probe's second
    /// create-only write): its connection is closed after the answer, not pooled, since a
    /// server may refuse it before reading the body and close the connection; a request sent
    /// meanwhile on that connection would fail and be sent again. Known in advance here, so
    /// the connection is never offered to another request; a write refused unexpectedly
    /// renews the pool after its answer (`renew_pool`), which leaves a short window.
    pub async fn put_object_expecting_refusal(
        &self,
        key: &str,
        body: Bytes,
        sha256: &[u8; 32],
        when: &Precondition,
    ) -> Result<PutAnswer, S3Error> {
        self.put(key, body, sha256, when, &ObjectMeta::default(), true)
            .await
    }

    async fn put(
        &self,
        key: &str,
        body: Bytes,
        sha256: &[u8; 32],
        when: &Precondition,
        meta: &ObjectMeta,
        close: bool,
    ) -> Result<PutAnswer, S3Error> {
        let mut headers = vec![
            ("x-amz-checksum-sha256", b64(sha256)),
            ("x-amz-meta-sha256", hex::encode(sha256)),
        ];
        meta.add_to(&mut headers);
        when.add_to(&mut headers);
        self.sse_headers(&mut headers);
        if close {
            headers.push((HOP_BY_HOP, "close".to_string()));
        }
        let req = Request {
            method: Method::PUT,
            url: self.url(key, &[]),
            headers,
            body,
            payload_sha256_hex: hex::encode(sha256),
        };
        let resp = self.execute("PutObject", key, req).await?;
        let header = |n: &str| {
            resp.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(PutAnswer {
            checksum_sha256: header("x-amz-checksum-sha256"),
            etag: header("etag"),
            version: header("x-amz-version-id"),
            sse: header("x-amz-server-side-encryption"),
            kms_key_id: header("x-amz-server-side-encryption-aws-kms-key-id"),
        })
    }

    /// Starts a multipart upload. With `PartChecksum::Sha256` the whole-object SHA-256 (known
    /// first) goes into the metadata; with `Crc64Nvme` the server is asked for a full-object
    /// CRC-64/NVME, which completion checks against the one sent then.
    pub async fn create_multipart(
        &self,
        key: &str,
        checksum: PartChecksum<'_>,
        meta: &ObjectMeta,
    ) -> Result<String, S3Error> {
        let mut headers = match checksum {
            PartChecksum::Sha256(sha256) => vec![
                ("x-amz-meta-sha256", hex::encode(sha256)),
                ("x-amz-checksum-algorithm", "SHA256".to_string()),
            ],
            PartChecksum::Crc64Nvme(sha256) => {
                let mut h = vec![
                    ("x-amz-checksum-algorithm", "CRC64NVME".to_string()),
                    ("x-amz-checksum-type", "FULL_OBJECT".to_string()),
                ];
                if let Some(sha256) = sha256 {
                    h.push(("x-amz-meta-sha256", hex::encode(sha256)));
                }
                h
            }
        };
        meta.add_to(&mut headers);
        self.sse_headers(&mut headers);
        let req = Request {
            method: Method::POST,
            url: self.url(key, &[("uploads", "")]),
            headers,
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        let resp = self.execute("CreateMultipartUpload", key, req).await?;
        let body = String::from_utf8_lossy(&resp.body);
        xml::parse_upload_id(&body)
            .ok_or_else(|| self.protocol("CreateMultipartUpload", key, "no UploadId"))
    }

    /// Sends one part, checked by the server with its CRC-64/NVME (`crc64nvme`, for uploads
    /// created with `PartChecksum::Crc64Nvme`) or its SHA-256 (one checksum header per request,
    /// as S3 requires), and signed with its SHA-256 unless `signs_part_payload` says it goes
    /// unsigned; returns its ETag. A SHA-256 that is needed and not given is computed here.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Bytes,
        sha256: Option<&[u8; 32]>,
        crc64nvme: Option<u64>,
    ) -> Result<String, S3Error> {
        let n = number.to_string();
        let sha = || sha256.copied().unwrap_or_else(|| Sha256::digest(&body));
        let (checksum, payload) = match crc64nvme {
            Some(crc) => (
                ("x-amz-checksum-crc64nvme", crate::hash::Crc64Nvme::b64(crc)),
                if self.signs_part_payload(true) {
                    hex::encode(sha())
                } else {
                    sign::UNSIGNED_PAYLOAD.to_string()
                },
            ),
            None => {
                let sha = sha();
                (("x-amz-checksum-sha256", b64(&sha)), hex::encode(sha))
            }
        };
        let req = Request {
            method: Method::PUT,
            url: self.url(key, &[("partNumber", &n), ("uploadId", upload_id)]),
            headers: vec![checksum],
            body,
            payload_sha256_hex: payload,
        };
        let resp = self.execute("UploadPart", key, req).await?;
        resp.headers
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| self.protocol("UploadPart", key, "no ETag"))
    }

    /// Every part the server holds for an upload (follows pagination).
    pub async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<ServerPart>, S3Error> {
        let mut all = Vec::new();
        let mut marker: Option<u32> = None;
        loop {
            let m = marker.map(|m| m.to_string());
            let mut q = vec![("uploadId", upload_id)];
            if let Some(m) = &m {
                q.push(("part-number-marker", m));
            }
            let req = Request {
                method: Method::GET,
                url: self.url(key, &q),
                headers: vec![],
                body: Bytes::new(),
                payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
            };
            let resp = self.execute("ListParts", key, req).await?;
            let page = xml::parse_list_parts(&String::from_utf8_lossy(&resp.body))
                .ok_or_else(|| self.protocol("ListParts", key, "not a ListPartsResult"))?;
            all.extend(page.parts);
            match page.next_marker {
                Some(next) if Some(next) != marker => marker = Some(next),
                _ => break,
            }
        }
        all.sort_by_key(|p| p.number);
        all.dedup_by_key(|p| p.number);
        Ok(all)
    }

    /// Completes an upload from (part number, ETag, base64 checksum) in order. With
    /// `crc64nvme` (an upload created with `PartChecksum::Crc64Nvme`) the parts' checksums are
    /// CRC-64/NVME and the whole object's is sent, for the server to check what it assembled.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String, String)],
        when: &Precondition,
        crc64nvme: Option<u64>,
    ) -> Result<(), S3Error> {
        let element = if crc64nvme.is_some() {
            "ChecksumCRC64NVME"
        } else {
            "ChecksumSHA256"
        };
        let body = xml::complete_body(
            element,
            parts.iter().map(|(n, e, s)| (*n, e.as_str(), s.as_str())),
        );
        let body = Bytes::from(body);
        let sha = hex::encode(Sha256::digest(&body));
        let mut headers = vec![("content-type", "application/xml".to_string())];
        if let Some(crc) = crc64nvme {
            headers.push(("x-amz-checksum-crc64nvme", crate::hash::Crc64Nvme::b64(crc)));
            headers.push(("x-amz-checksum-type", "FULL_OBJECT".to_string()));
        }
        when.add_to(&mut headers);
        let req = Request {
            method: Method::POST,
            url: self.url(key, &[("uploadId", upload_id)]),
            headers,
            body,
            payload_sha256_hex: sha,
        };
        let resp = self.execute("CompleteMultipartUpload", key, req).await?;
        self.error_in_ok("CompleteMultipartUpload", key, &resp.body)
    }

    /// Open multipart uploads of exactly `key` (first page of ListMultipartUploads, up to 1,000:
    /// ha-edge starts at most one upload per key at a time).
    pub async fn list_uploads_for_key(&self, key: &str) -> Result<Vec<String>, S3Error> {
        let url = format!(
            "{}/?uploads&prefix={}",
            self.bucket_base(),
            utf8_percent_encode(key, QUERY_SET)
        );
        let req = Request {
            method: Method::GET,
            url: Url::parse(&url)
                .map_err(|e| self.protocol("ListMultipartUploads", key, &e.to_string()))?,
            headers: vec![],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        let resp = self.execute("ListMultipartUploads", key, req).await?;
        xml::parse_uploads_for_key(&String::from_utf8_lossy(&resp.body), key).ok_or_else(|| {
            self.protocol(
                "ListMultipartUploads",
                key,
                "not a ListMultipartUploadsResult",
            )
        })
    }

    /// Aborts an upload; an upload that is already gone counts as aborted.
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let req = Request {
            method: Method::DELETE,
            url: self.url(key, &[("uploadId", upload_id)]),
            headers: vec![],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        match self.execute("AbortMultipartUpload", key, req).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Checks that the bucket exists and answers. A 404 becomes `NoSuchBucket` (HEAD answers
    /// carry no error document).
    pub async fn head_bucket(&self) -> Result<(), S3Error> {
        // Path style addresses the bucket as `/bucket`; virtual-hosted as `/` on its own host.
        let url = if self.dest.path_style {
            self.bucket_base()
        } else {
            format!("{}/", self.bucket_base())
        };
        let req = Request {
            method: Method::HEAD,
            url: Url::parse(&url).map_err(|e| self.protocol("HeadBucket", "", &e.to_string()))?,
            headers: vec![],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        match self.execute("HeadBucket", "", req).await {
            Ok(_) => Ok(()),
            Err(S3Error::Service(mut e)) if e.status == 404 => {
                e.code = "NoSuchBucket".into();
                Err(S3Error::Service(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Size and checksums of a stored object, or None if there is no such object.
    pub async fn head_object(&self, key: &str) -> Result<Option<Head>, S3Error> {
        let req = Request {
            method: Method::HEAD,
            url: self.url(key, &[]),
            headers: vec![("x-amz-checksum-mode", "ENABLED".to_string())],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        let resp = match self.execute("HeadObject", key, req).await {
            Ok(r) => r,
            Err(e) if e.status() == Some(404) && e.code() != Some("NoSuchBucket") => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let header = |n: &str| {
            resp.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = header("content-length")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.protocol("HeadObject", key, "no Content-Length"))?;
        Ok(Some(Head {
            size,
            meta_sha256: header("x-amz-meta-sha256"),
            checksum_sha256: header("x-amz-checksum-sha256"),
            checksum_crc64nvme: header("x-amz-checksum-crc64nvme"),
            etag: header("etag"),
            last_modified: header("last-modified"),
            version: header("x-amz-version-id"),
            sse: header("x-amz-server-side-encryption"),
            kms_key_id: header("x-amz-server-side-encryption-aws-kms-key-id"),
        }))
    }

    /// Reads `len` bytes at `start` (the whole object if `len` is 0 and `start` is 0). With
    /// `if_match`, a server that honours it answers 412 PreconditionFailed once the object is no
    /// longer that version; the caller also compares the ETag that comes back.
    pub async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
        if_match: Option<&str>,
    ) -> Result<Ranged, S3Error> {
        let range = (len > 0).then(|| format!("bytes={start}-{}", start + len - 1));
        let req = self.get_request(key, range, if_match);
        let resp = self.execute("GetObject", key, req).await?;
        let header = |n: &str| {
            resp.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // "bytes 0-99/1234" -> 1234; a server that ignored the range sends the whole object.
        let total = match header("content-range") {
            Some(cr) => cr.rsplit('/').next().and_then(|t| t.trim().parse().ok()),
            None if start == 0 => Some(resp.body.len() as u64),
            None => None,
        };
        if len > 0 && resp.body.len() as u64 != len {
            return Err(self.protocol(
                "GetObject",
                key,
                &format!(
                    "asked for {len} bytes at {start}, got {} (range ignored?)",
                    resp.body.len()
                ),
            ));
        }
        Ok(Ranged {
            etag: header("etag"),
            last_modified: header("last-modified"),
            total,
            body: resp.body,
        })
    }

    /// Opens a GET of the object from byte `from` to its end (pinned with `if_match`), whose
    /// body the caller reads as it arrives (`Streamed::chunk`): one request per object instead
    /// of one per range. Failures to open are retried like any request.
    pub async fn get_stream(
        &self,
        key: &str,
        from: u64,
        if_match: Option<&str>,
    ) -> Result<Streamed, S3Error> {
        let req = self.get_request(key, (from > 0).then(|| format!("bytes={from}-")), if_match);
        let op = "GetObject";
        let mut delay = Backoff::REQUEST.base;
        let mut attempt = 0;
        loop {
            let err = match self.send_signed(op, key, &req, None).await {
                Ok(resp) if resp.status().is_success() => {
                    let header = |n: &str| {
                        resp.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let total = match header("content-range") {
                        Some(cr) => cr.rsplit('/').next().and_then(|t| t.trim().parse().ok()),
                        None if from == 0 => resp.content_length(),
                        None => None,
                    };
                    return Ok(Streamed {
                        etag: header("etag"),
                        last_modified: header("last-modified"),
                        total,
                        resp,
                        timeout: self.timeout,
                        op,
                        bucket: self.dest.bucket.clone(),
                        key: key.to_string(),
                    });
                }
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    let body = resp.bytes().await.unwrap_or_default();
                    self.service_error(op, key, status, &headers, &body)
                }
                Err(e) => e,
            };
            if err.class() != Class::Transient || attempt >= self.max_retries {
                return Err(err);
            }
            attempt += 1;
            delay = Backoff::REQUEST.next(delay, fastrand::f64());
            tokio::time::sleep(delay).await;
        }
    }

    /// A GetObject request: a `range` header if given, pinned with `If-Match` if an ETag is.
    fn get_request(&self, key: &str, range: Option<String>, if_match: Option<&str>) -> Request {
        let mut headers = Vec::new();
        if let Some(r) = range {
            headers.push(("range", r));
        }
        if let Some(tag) = if_match.filter(|t| !t.is_empty()) {
            headers.push(("if-match", tag.to_string()));
        }
        Request {
            method: Method::GET,
            url: self.url(key, &[]),
            headers,
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        }
    }

    /// One page of ListObjectsV2 under `prefix`.
    pub async fn list_objects(
        &self,
        prefix: &str,
        token: Option<&str>,
    ) -> Result<ListPage, S3Error> {
        let mut url = format!(
            "{}/?list-type=2&prefix={}",
            self.bucket_base(),
            utf8_percent_encode(prefix, QUERY_SET)
        );
        if let Some(t) = token {
            url.push_str("&continuation-token=");
            url.push_str(&utf8_percent_encode(t, QUERY_SET).to_string());
        }
        let req = Request {
            method: Method::GET,
            url: Url::parse(&url)
                .map_err(|e| self.protocol("ListObjectsV2", prefix, &e.to_string()))?,
            headers: vec![],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        let resp = self.execute("ListObjectsV2", prefix, req).await?;
        xml::parse_list_objects(&String::from_utf8_lossy(&resp.body))
            .ok_or_else(|| self.protocol("ListObjectsV2", prefix, "not a ListBucketResult"))
    }

    /// Server-side copy within the bucket, only if the source is still version `if_match`.
    pub async fn copy_object(&self, from: &str, to: &str, if_match: &str) -> Result<(), S3Error> {
        let mut headers = vec![(
            "x-amz-copy-source",
            format!(
                "/{}/{}",
                self.dest.bucket,
                utf8_percent_encode(from, KEY_SET)
            ),
        )];
        if !if_match.is_empty() {
            headers.push(("x-amz-copy-source-if-match", if_match.to_string()));
        }
        let req = Request {
            method: Method::PUT,
            url: self.url(to, &[]),
            headers,
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        let resp = self.execute("CopyObject", to, req).await?;
        self.error_in_ok("CopyObject", to, &resp.body)
    }

    /// Deletes an object; one that is already gone counts as deleted.
    pub async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        let req = Request {
            method: Method::DELETE,
            url: self.url(key, &[]),
            headers: vec![],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        match self.execute("DeleteObject", key, req).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) && e.code() != Some("NoSuchBucket") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Some operations (completion, copy) may answer 200 and still fail, with an `<Error>`
    /// document in the body.
    fn error_in_ok(&self, op: &'static str, key: &str, body: &[u8]) -> Result<(), S3Error> {
        match xml::parse_error(&String::from_utf8_lossy(body)) {
            Some(e) => Err(S3Error::Service(Box::new(ServiceError {
                op,
                bucket: self.dest.bucket.clone(),
                key: key.to_string(),
                status: if e.code == "InternalError" { 500 } else { 400 },
                code: e.code,
                message: e.message,
                retry_after: None,
            }))),
            None => Ok(()),
        }
    }

    /// An answer that makes no sense for `op`.
    fn protocol(&self, op: &'static str, key: &str, detail: &str) -> S3Error {
        S3Error::Protocol {
            op,
            bucket: self.dest.bucket.clone(),
            key: key.to_string(),
            detail: detail.to_string(),
        }
    }

    /// Signs and sends `req`, retrying transient failures with jittered backoff.
    async fn execute(
        &self,
        op: &'static str,
        key: &str,
        req: Request,
    ) -> Result<Response, S3Error> {
        let mut delay = Backoff::REQUEST.base;
        let mut attempt = 0;
        let m = crate::telemetry::metrics::agent();
        let label = crate::telemetry::metrics::OpLabel { op };
        loop {
            let began = std::time::Instant::now();
            let sent = self.send_once(op, key, &req).await;
            m.request_duration
                .get_or_create(&label)
                .observe(began.elapsed().as_secs_f64());
            let err = match sent {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            if err.class() != Class::Transient || attempt >= self.max_retries {
                return Err(err);
            }
            // A request that is not idempotent is sent again only if it surely had no effect;
            // otherwise its caller decides (CreateMultipartUpload: find and abort the upload
            // a lost answer may have created).
            if !is_idempotent(op) && err.is_ambiguous() {
                return Err(err);
            }
            attempt += 1;
            m.retries.get_or_create(&label).inc();
            delay = Backoff::REQUEST.next(delay, fastrand::f64());
            if let S3Error::Service(e) = &err {
                if let Some(ra) = e.retry_after {
                    delay = delay.max(ra).min(Duration::from_secs(120));
                }
            }
            tracing::debug!(op, key, attempt, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), error = %err, "retrying request");
            tokio::time::sleep(delay).await;
        }
    }

    /// MinIO's ListenBucketNotification: a long-lived GET whose body is a stream of JSON lines,
    /// one per event (object created under `prefix`). Returns the open response; the caller
    /// reads it as it arrives. Not an AWS S3 operation: other servers refuse it or answer a
    /// listing and close.
    pub async fn listen_notifications(&self, prefix: &str) -> Result<reqwest::Response, S3Error> {
        let url = format!(
            "{}?events={}&prefix={}",
            if self.dest.path_style {
                self.bucket_base()
            } else {
                format!("{}/", self.bucket_base())
            },
            utf8_percent_encode("s3:ObjectCreated:*", QUERY_SET),
            utf8_percent_encode(prefix, QUERY_SET)
        );
        let req = Request {
            method: Method::GET,
            url: Url::parse(&url)
                .map_err(|e| self.protocol("ListenBucketNotification", prefix, &e.to_string()))?,
            headers: vec![],
            body: Bytes::new(),
            payload_sha256_hex: sign::EMPTY_SHA256.to_string(),
        };
        let op = "ListenBucketNotification";
        let resp = self.send_signed(op, prefix, &req, None).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        Err(self.service_error(op, prefix, status, &headers, &body))
    }

    /// Signs and sends one request; `timeout` bounds the whole exchange (None: a stream).
    async fn send_signed(
        &self,
        op: &'static str,
        key: &str,
        req: &Request,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, S3Error> {
        let transport = |detail: String, unsent: bool| S3Error::Transport {
            op,
            bucket: self.dest.bucket.clone(),
            key: key.to_string(),
            detail,
            unsent,
        };
        let host = req.url.host_str().unwrap_or_default().to_string();
        let host = match req.url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        let mut to_sign: Vec<(&str, &str)> = vec![("host", host.as_str())];
        to_sign.extend(
            req.headers
                .iter()
                .filter(|(k, _)| *k != HOP_BY_HOP)
                .map(|(k, v)| (*k, v.as_str())),
        );
        let creds = self
            .creds
            .current()
            .await
            .map_err(|e| transport(e.to_string(), true))?;
        let signed = sign::signing_headers(
            &creds,
            &self.dest.region,
            req.method.as_str(),
            req.url.as_str(),
            &to_sign,
            &req.payload_sha256_hex,
            SystemTime::now(),
        )
        .map_err(|e| transport(e.to_string(), true))?;
        // Object data goes through the bandwidth limiter (when one is set).
        let body = if req.method == Method::PUT
            && !req.body.is_empty()
            && crate::bandwidth::limiter().is_limited()
        {
            reqwest::Body::wrap(crate::bandwidth::Throttled::new(req.body.clone()))
        } else {
            reqwest::Body::from(req.body.clone())
        };
        let http = self
            .http
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut rb = http.request(req.method.clone(), req.url.clone()).body(body);
        if let Some(t) = timeout {
            rb = rb.timeout(t);
        }
        for (k, v) in &req.headers {
            rb = rb.header(*k, v);
        }
        for (k, v) in signed {
            rb = rb.header(k, v);
        }
        rb.send()
            .await
            .map_err(|e| transport(describe(&e), e.is_connect()))
    }

    /// An error answer, with its S3 code and message from the XML body.
    fn service_error(
        &self,
        op: &'static str,
        key: &str,
        status: reqwest::StatusCode,
        headers: &reqwest::header::HeaderMap,
        body: &[u8],
    ) -> S3Error {
        let doc = xml::parse_error(&String::from_utf8_lossy(body));
        let (code, message) = match doc {
            Some(d) => (d.code, d.message),
            None => (
                status.canonical_reason().unwrap_or("").replace(' ', ""),
                String::new(),
            ),
        };
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        S3Error::Service(Box::new(ServiceError {
            op,
            bucket: self.dest.bucket.clone(),
            key: key.to_string(),
            status: status.as_u16(),
            code,
            message,
            retry_after,
        }))
    }

    /// Signs and sends one request, bounded by the request timeout.
    async fn send_once(
        &self,
        op: &'static str,
        key: &str,
        req: &Request,
    ) -> Result<Response, S3Error> {
        let transport = |detail: String| S3Error::Transport {
            op,
            bucket: self.dest.bucket.clone(),
            key: key.to_string(),
            detail,
            unsent: false,
        };
        let resp = self.send_signed(op, key, req, Some(self.timeout)).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if status == reqwest::StatusCode::PRECONDITION_FAILED && !req.body.is_empty() {
            self.renew_pool(op, key);
        }
        let body = resp.bytes().await.map_err(|e| transport(describe(&e)))?;
        if status.is_success() {
            return Ok(Response { headers, body });
        }
        Err(self.service_error(op, key, status, &headers, &body))
    }
}

/// Whether sending `op` twice has the effect of sending it once. Creating a multipart upload
/// does not: each request makes a new upload. (A conditional PUT or completion sent again is
/// answered 412 or NoSuchUpload, and the caller checks the stored object.)
fn is_idempotent(op: &str) -> bool {
    op != "CreateMultipartUpload"
}

/// host[:port] of a URL.
fn authority(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

/// Standard base64 with padding, as S3 wants checksums.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// reqwest's Display hides the cause; walk the chain for something an operator can act on.
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// TLS with ring: the built-in web roots plus the configured CA, if any.
/// The HTTP client of an `S3Client`: TLS by `tls`, up to `pool` idle connections.
fn http_client(tls: rustls::ClientConfig, pool: usize) -> Result<reqwest::Client, S3Error> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("ha-edge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| S3Error::Setup(e.to_string()))
}

fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca_file {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("cannot read CA file {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad certificate in {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("unusable certificate in {}: {e}", ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(path_style: bool) -> Arc<S3Client> {
        let dest = S3Destination {
            checksum: crate::config::Checksum::Crc64Nvme,
            overwrite: crate::config::Overwrite::Own,
            object_meta: crate::config::MetaRules::default(),
            endpoint: if path_style {
                "http://127.0.0.1:9000"
            } else {
                "http://s3.local:9000"
            }
            .parse()
            .unwrap(),
            region: "eu-central-1".into(),
            bucket: "bkt".into(),
            prefix: String::new(),
            sse: None,
            path_style,
            profile: None,
            credentials_file: None,
            ca_file: None,
        };
        S3Client::new(
            &dest,
            Credentials::new("a", "b", None),
            0,
            Duration::from_secs(1),
            1,
        )
        .unwrap()
    }

    /// Keys are percent-encoded once in the URL (and signed that way).
    #[test]
    fn urls_encode_keys_once() {
        let c = client(true);
        assert_eq!(
            c.url("fhir/a b+c%.ndjson", &[]).as_str(),
            "http://127.0.0.1:9000/bkt/fhir/a%20b%2Bc%25.ndjson"
        );
        assert_eq!(
            c.url("k", &[("partNumber", "3"), ("uploadId", "a+b/c=")])
                .as_str(),
            "http://127.0.0.1:9000/bkt/k?partNumber=3&uploadId=a%2Bb%2Fc%3D"
        );
        assert_eq!(
            c.url("k", &[("uploads", "")]).as_str(),
            "http://127.0.0.1:9000/bkt/k?uploads"
        );
        assert_eq!(
            client(false).url("k", &[]).as_str(),
            "http://bkt.s3.local:9000/k"
        );
    }

    /// Destination-level errors carry the operator's advice.
    #[test]
    fn destination_errors_carry_advice() {
        let e = S3Error::Service(Box::new(ServiceError {
            op: "PutObject",
            bucket: "b".into(),
            key: "k".into(),
            status: 403,
            code: "SignatureDoesNotMatch".into(),
            message: String::new(),
            retry_after: None,
        }));
        assert_eq!(e.class(), Class::Destination);
        assert!(e.advice().unwrap().contains("secret key"));
    }
}
