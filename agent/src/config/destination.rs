//! The `[destination]` table: an S3 bucket, or a QUIC relay (also the relay's own S3 store).
//!
//! Must not break: no secret is read from or written to the TOML; a key prefix always ends in '/'
//! (or is empty).

use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::*;

/// `[destination]` as written: keys of both kinds, checked against `type` in phase two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDestination {
    /// `type`: "s3" (the default) or "quic".
    #[serde(rename = "type")]
    pub(super) kind: Option<Spanned<String>>,
    /// The S3 endpoint URL.
    pub(super) endpoint: Option<Spanned<String>>,
    /// The SigV4 region.
    pub(super) region: Option<Spanned<String>>,
    /// The bucket.
    pub(super) bucket: Option<Spanned<String>>,
    /// The key prefix every object lands under.
    pub(super) prefix: Option<Spanned<String>>,
    /// "AES256" or "aws:kms".
    pub(super) sse: Option<Spanned<String>>,
    /// The KMS key for `sse = "aws:kms"` (the bucket's default if left out).
    pub(super) kms_key_id: Option<Spanned<String>>,
    /// Path-style URLs (MinIO, most on-premise servers).
    pub(super) path_style: Option<Spanned<bool>>,
    /// Profile in the AWS shared credentials file.
    pub(super) profile: Option<Spanned<String>>,
    /// AWS shared credentials file (default: $AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials).
    pub(super) credentials_file: Option<Spanned<String>>,
    /// Extra PEM CA bundle trusted for an on-premise HTTPS endpoint; for type = "quic", the CA
    /// that signed the relay's certificate (the only one trusted).
    pub(super) ca_file: Option<Spanned<String>>,
    // type = "quic": a relay inside the cloud VPC that lands objects with its own credentials.
    /// `type = "quic"`: host:port of the relay, or a list of them (fail-over in order).
    pub(super) relay: Option<Spanned<toml::Value>>,
    /// The name the relay's certificate must carry.
    pub(super) server_name: Option<Spanned<String>>,
    /// This agent's certificate (PEM).
    pub(super) cert_file: Option<Spanned<String>>,
    /// Its key (PEM).
    pub(super) key_file: Option<Spanned<String>>,
    /// QUIC congestion controller: "bbr" (default) or "cubic".
    pub(super) congestion: Option<Spanned<String>>,
    /// "own" (default): replace only objects this agent wrote; "always": any.
    pub(super) overwrite: Option<Spanned<String>>,
    /// "crc64nvme" (default): multipart uploads checked by a full-object CRC-64/NVME, the
    /// source read once; "sha256": the SHA-256 hashed first and stored in the metadata.
    pub(super) checksum: Option<Spanned<String>>,
    /// The storage class of objects written (e.g. "INTELLIGENT_TIERING").
    pub(super) storage_class: Option<Spanned<String>>,
    /// Object tags (values may hold `{source}`).
    pub(super) tags: Option<Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
    /// Content types by file extension, over the built-in ones (`{ ".ndjson" = "…" }`).
    pub(super) content_types: Option<Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
}

/// Where objects go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// An S3 bucket, reached directly (`type = "s3"`).
    S3(S3Destination),
    /// A relay over QUIC (`type = "quic"`), which lands objects with its own credentials.
    Relay(RelayDestination),
}

impl Destination {
    /// The key prefix every object key starts with.
    pub fn prefix(&self) -> &str {
        match self {
            Destination::S3(d) => &d.prefix,
            Destination::Relay(r) => &r.prefix,
        }
    }
}

/// `[destination] type = "quic"`.
#[derive(Debug, Clone)]
pub struct RelayDestination {
    /// host:port of each relay, in the order they are tried (a name may resolve to several
    /// addresses: each is tried).
    pub relays: Vec<String>,
    /// The name the relay's certificate must carry.
    pub server_name: String,
    /// The CA that signed the relay's certificate.
    pub ca_file: PathBuf,
    /// This agent's certificate and key (PEM); default: `relay_cert.pem` / `relay_key.pem` in
    /// `$CREDENTIALS_DIRECTORY`.
    pub cert_file: Option<PathBuf>,
    /// The key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The key prefix under which this agent's objects land (ends in '/', or empty).
    pub prefix: String,
    /// The QUIC congestion controller of the connection (the agent is the sender).
    pub congestion: Congestion,
}

/// A QUIC congestion controller (`congestion`, on the agent's `[destination]` and `[relay]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// BBR: paces at the measured bottleneck rate, and does not take random loss (a lossy
    /// tunnel) for congestion. The default: measured fastest on every lossy link of the grid.
    #[default]
    Bbr,
    /// CUBIC: halves on loss like TCP; on a lossy link one connection is held to what the
    /// Mathis formula allows.
    Cubic,
}

impl Validator<'_> {
    /// `congestion = "bbr" | "cubic"` at `key` (BBR if unset).
    pub(super) fn congestion(&mut self, v: Option<Spanned<String>>, key: &str) -> Congestion {
        match v {
            None => Congestion::default(),
            Some(c) => match c.get_ref().as_str() {
                "bbr" => Congestion::Bbr,
                "cubic" => Congestion::Cubic,
                other => {
                    self.problem(
                        c.span(),
                        key,
                        format!("must be \"bbr\" or \"cubic\", got {other:?}"),
                    );
                    Congestion::default()
                }
            },
        }
    }
}

/// Which objects at a destination key the agent may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Only what it wrote itself: a first delivery is create-only (`If-None-Match: *`), a new
    /// version replaces the object only if it is still the one recorded (`If-Match: <ETag>`).
    /// Anything else there is a conflict, left alone, and the source is kept.
    Own,
    /// Any object at the key (the bucket's versioning, if on, keeps the old one).
    Always,
}

/// How a multipart upload's integrity is checked by the server (`destination.checksum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// A CRC-64/NVME per part and of the whole object (`FULL_OBJECT`), which the server checks
    /// at completion; the source is read once, and its SHA-256 computed on the way goes to the
    /// journal and the receipt (a multipart object's metadata is fixed before its bytes).
    /// A server that refuses it gets `Sha256`, with one warning.
    Crc64Nvme,
    /// SHA-256 per part; the whole-object SHA-256, hashed in a pass before the upload, in
    /// `x-amz-meta-sha256` (the source is read twice).
    Sha256,
}

/// Server-side encryption asked for on every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    Aes256,
    Kms { key_id: Option<String> },
}

/// How to reach a bucket: the destination's, or a bucket source's.
#[derive(Debug, Clone)]
pub struct S3Destination {
    /// The server's URL (scheme and host, no path).
    pub endpoint: reqwest::Url,
    /// The SigV4 region.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// The key prefix (ends in '/', or empty).
    pub prefix: String,
    /// Server-side encryption for writes, if any.
    pub sse: Option<Sse>,
    /// Path-style URLs (`host/bucket/key`), as MinIO and most on-premise servers want.
    pub path_style: bool,
    /// A profile of the shared credentials file.
    pub profile: Option<String>,
    /// A shared credentials file to read the keys from.
    pub credentials_file: Option<PathBuf>,
    /// A CA to trust besides the built-in web roots (on-premise endpoints).
    pub ca_file: Option<PathBuf>,
    /// Destinations only (bucket sources are read, never written but for `move_to_prefix`).
    pub overwrite: Overwrite,
    /// How multipart uploads are checked (`checksum`).
    pub checksum: Checksum,
    /// What objects are written with: storage class, tags, content types.
    pub object_meta: MetaRules,
}

/// How the objects ha-edge writes are labelled: `storage_class`, `tags` and content types by
/// extension (the built-in table, with the config's entries over it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaRules {
    /// `x-amz-storage-class`, if set.
    pub storage_class: Option<String>,
    /// Tag names and value templates (`{source}` is the source's name), in name order.
    pub tags: Vec<(String, String)>,
    /// Extensions (with the dot, lower case) and their content types; others are
    /// `application/octet-stream`.
    pub content_types: Vec<(String, String)>,
}

/// The content types known without configuration.
pub const CONTENT_TYPES: &[(&str, &str)] = &[
    (".ndjson", "application/fhir+ndjson"),
    (".json", "application/json"),
    (".dcm", "application/dicom"),
];

/// The storage classes S3 knows.
const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
];

impl MetaRules {
    /// The content type of `key`, by its extension.
    pub fn content_type(&self, key: &str) -> &str {
        let lower = key.to_ascii_lowercase();
        self.content_types
            .iter()
            .find(|(ext, _)| lower.ends_with(ext.as_str()))
            .map_or("application/octet-stream", |(_, t)| t.as_str())
    }

    /// The `x-amz-tagging` value for an object of `source` (URL-encoded `k=v&k=v`), if any
    /// tags are set.
    pub fn tagging(&self, source: &str) -> Option<String> {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        if self.tags.is_empty() {
            return None;
        }
        Some(
            self.tags
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        utf8_percent_encode(k, NON_ALPHANUMERIC),
                        utf8_percent_encode(&v.replace("{source}", source), NON_ALPHANUMERIC)
                    )
                })
                .collect::<Vec<_>>()
                .join("&"),
        )
    }
}

impl Validator<'_> {
    /// `storage_class`, `tags` and `content_types`.
    fn meta_rules(&mut self, d: &RawDestination) -> MetaRules {
        let storage_class = d.storage_class.as_ref().map(|c| {
            if !STORAGE_CLASSES.contains(&c.get_ref().as_str()) {
                self.problem(
                    c.span(),
                    "destination.storage_class",
                    format!(
                        "unknown storage class {:?} (one of {})",
                        c.get_ref(),
                        STORAGE_CLASSES.join(", ")
                    ),
                );
            }
            c.get_ref().clone()
        });
        let mut tags = Vec::new();
        if let Some(t) = &d.tags {
            if t.get_ref().len() > 10 {
                self.problem(
                    t.span(),
                    "destination.tags",
                    "S3 allows at most 10 tags per object",
                );
            }
            for (k, v) in t.get_ref() {
                if k.is_empty() || k.len() > 128 || v.get_ref().len() > 256 {
                    self.problem(
                        v.span(),
                        &format!("destination.tags.{k}"),
                        "a tag name is 1 to 128 characters, a value at most 256",
                    );
                }
                tags.push((k.clone(), v.get_ref().clone()));
            }
        }
        let mut content_types: Vec<(String, String)> = Vec::new();
        if let Some(t) = &d.content_types {
            for (ext, ty) in t.get_ref() {
                if !ext.starts_with('.') || !ty.get_ref().contains('/') {
                    self.problem(
                        ty.span(),
                        &format!("destination.content_types.{ext}"),
                        "an extension with its dot and a media type, e.g. \".ndjson\" = \"application/fhir+ndjson\"",
                    );
                }
                content_types.push((ext.to_ascii_lowercase(), ty.get_ref().clone()));
            }
        }
        for (ext, ty) in CONTENT_TYPES {
            if !content_types.iter().any(|(e, _)| e == ext) {
                content_types.push(((*ext).to_string(), (*ty).to_string()));
            }
        }
        // Longest extension first: ".tar.gz" before ".gz".
        content_types.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        MetaRules {
            storage_class,
            tags,
            content_types,
        }
    }

    /// Phase two of `[destination]`: an S3 bucket or a relay, by `type`.
    pub(super) fn destination(
        &mut self,
        d: RawDestination,
        span: Range<usize>,
    ) -> Option<Destination> {
        let quic = match &d.kind {
            Some(k) if k.get_ref() == "s3" => false,
            Some(k) if k.get_ref() == "quic" => true,
            Some(k) => {
                self.problem(
                    k.span(),
                    "destination.type",
                    format!(
                        "unknown destination type {:?} (supported: \"s3\", \"quic\")",
                        k.get_ref()
                    ),
                );
                false
            }
            None => {
                self.problem(
                    span.clone(),
                    "destination.type",
                    "missing (use type = \"s3\" or \"quic\")",
                );
                false
            }
        };
        let misplaced: Vec<(&str, Option<Range<usize>>)> = if quic {
            vec![
                ("endpoint", d.endpoint.as_ref().map(Spanned::span)),
                ("region", d.region.as_ref().map(Spanned::span)),
                ("bucket", d.bucket.as_ref().map(Spanned::span)),
                ("sse", d.sse.as_ref().map(Spanned::span)),
                ("kms_key_id", d.kms_key_id.as_ref().map(Spanned::span)),
                ("path_style", d.path_style.as_ref().map(Spanned::span)),
                ("profile", d.profile.as_ref().map(Spanned::span)),
                (
                    "credentials_file",
                    d.credentials_file.as_ref().map(Spanned::span),
                ),
                ("storage_class", d.storage_class.as_ref().map(Spanned::span)),
                ("tags", d.tags.as_ref().map(Spanned::span)),
                ("content_types", d.content_types.as_ref().map(Spanned::span)),
            ]
        } else {
            vec![
                ("relay", d.relay.as_ref().map(Spanned::span)),
                ("server_name", d.server_name.as_ref().map(Spanned::span)),
                ("cert_file", d.cert_file.as_ref().map(Spanned::span)),
                ("key_file", d.key_file.as_ref().map(Spanned::span)),
                ("congestion", d.congestion.as_ref().map(Spanned::span)),
            ]
        };
        if quic {
            if let Some(o) = &d.overwrite {
                self.problem(
                    o.span(),
                    "destination.overwrite",
                    "only applies to type = \"s3\" (the relay decides how it lands objects)",
                );
            }
            if let Some(o) = &d.checksum {
                self.problem(
                    o.span(),
                    "destination.checksum",
                    "only applies to type = \"s3\" (the relay decides how it lands objects)",
                );
            }
        }
        let (other, why) = if quic {
            (
                "s3",
                " (the relay holds the bucket settings and credentials)",
            )
        } else {
            ("quic", "")
        };
        for (key, sp) in misplaced {
            if let Some(sp) = sp {
                self.problem(
                    sp,
                    &format!("destination.{key}"),
                    format!("only applies to type = \"{other}\"{why}"),
                );
            }
        }
        if quic {
            self.relay_destination(d, span).map(Destination::Relay)
        } else {
            self.s3_destination(d, span).map(Destination::S3)
        }
    }

    /// `type = "quic"`: relay address, its name and CA, this agent's certificate.
    fn relay_destination(
        &mut self,
        d: RawDestination,
        span: Range<usize>,
    ) -> Option<RelayDestination> {
        let relay = match d.relay {
            Some(r) => {
                let span = r.span();
                let entries: Option<Vec<String>> = match r.into_inner() {
                    toml::Value::String(one) => Some(vec![one]),
                    toml::Value::Array(list) if !list.is_empty() => list
                        .into_iter()
                        .map(|v| match v {
                            toml::Value::String(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                    _ => None,
                };
                match entries {
                    None => {
                        self.problem(
                            span,
                            "destination.relay",
                            "must be \"host:port\" or a list of them (e.g. [\"relay-a:4433\", \"relay-b:4433\"])",
                        );
                        None
                    }
                    Some(entries) => {
                        let bad: Vec<&String> = entries
                            .iter()
                            .filter(|e| match e.rsplit_once(':') {
                                Some((host, port)) => {
                                    host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p > 0)
                                }
                                None => true,
                            })
                            .collect();
                        if bad.is_empty() {
                            let host = entries[0]
                                .rsplit_once(':')
                                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                                .unwrap_or_default();
                            Some((entries, host))
                        } else {
                            self.problem(
                                span,
                                "destination.relay",
                                format!("must be host:port, got {:?}", bad[0]),
                            );
                            None
                        }
                    }
                }
            }
            None => {
                self.problem(
                    span.clone(),
                    "destination.relay",
                    "missing (e.g. \"relay.example.org:4433\")",
                );
                None
            }
        };
        let server_name = d
            .server_name
            .map(Spanned::into_inner)
            .or_else(|| relay.as_ref().map(|(_, host)| host.clone()));
        let ca_file = match d.ca_file {
            Some(c) => Some(self.readable_file(&c, "destination.ca_file", true)),
            None => {
                self.problem(
                    span.clone(),
                    "destination.ca_file",
                    "missing (the CA that signed the relay's certificate)",
                );
                None
            }
        };
        let cert_file = d
            .cert_file
            .map(|c| self.readable_file(&c, "destination.cert_file", true));
        let key_file = d
            .key_file
            .map(|c| self.readable_file(&c, "destination.key_file", true));
        if cert_file.is_some() != key_file.is_some() {
            self.problem(
                span,
                "destination.key_file",
                "cert_file and key_file go together (or neither: both from $CREDENTIALS_DIRECTORY)",
            );
        }
        let prefix = match d.prefix {
            None => String::new(),
            Some(p) => self.key_prefix(p, "destination.prefix"),
        };
        let congestion = self.congestion(d.congestion, "destination.congestion");
        Some(RelayDestination {
            congestion,
            relays: relay?.0,
            server_name: server_name?,
            ca_file: ca_file?,
            cert_file,
            key_file,
            prefix,
        })
    }

    /// How to reach a bucket (the destination's, a bucket source's, the relay's store): endpoint,
    /// region, bucket, prefix, encryption, credentials' place.
    pub(super) fn s3_destination(
        &mut self,
        d: RawDestination,
        span: Range<usize>,
    ) -> Option<S3Destination> {
        let object_meta = self.meta_rules(&d);
        let endpoint = match d.endpoint {
            Some(e) => self.endpoint_url(&e, "destination.endpoint"),
            None => {
                self.problem(
                    span.clone(),
                    "destination.endpoint",
                    "missing (e.g. \"https://s3.eu-central-1.amazonaws.com\")",
                );
                None
            }
        };
        let region = match d.region {
            Some(r) => self.region(r, "destination.region"),
            None => {
                self.problem(
                    span.clone(),
                    "destination.region",
                    "missing (e.g. \"eu-central-1\")",
                );
                None
            }
        };
        let bucket = match d.bucket {
            Some(b) => {
                if let Err(why) = check_bucket_name(b.get_ref()) {
                    self.problem(b.span(), "destination.bucket", why);
                }
                Some(b.into_inner())
            }
            None => {
                self.problem(span.clone(), "destination.bucket", "missing");
                None
            }
        };
        let prefix = match d.prefix {
            None => String::new(),
            Some(p) => self.key_prefix(p, "destination.prefix"),
        };
        let sse = match d.sse {
            None => None,
            Some(s) => match s.get_ref().as_str() {
                "AES256" => Some(Sse::Aes256),
                "aws:kms" => Some(Sse::Kms {
                    key_id: d.kms_key_id.as_ref().map(|k| k.get_ref().clone()),
                }),
                other => {
                    self.problem(
                        s.span(),
                        "destination.sse",
                        format!("must be \"AES256\" or \"aws:kms\", got {other:?}"),
                    );
                    None
                }
            },
        };
        if let Some(k) = &d.kms_key_id {
            if !matches!(sse, Some(Sse::Kms { .. })) {
                self.problem(
                    k.span(),
                    "destination.kms_key_id",
                    "only applies with sse = \"aws:kms\"",
                );
            }
        }
        let credentials_file = d
            .credentials_file
            .map(|c| self.readable_file(&c, "destination.credentials_file", true));
        let ca_file = d
            .ca_file
            .map(|c| self.readable_file(&c, "destination.ca_file", false));
        let overwrite = match &d.overwrite {
            None => Overwrite::Own,
            Some(o) => match o.get_ref().as_str() {
                "own" => Overwrite::Own,
                "always" => Overwrite::Always,
                other => {
                    self.problem(
                        o.span(),
                        "destination.overwrite",
                        format!("must be \"own\" or \"always\", got {other:?}"),
                    );
                    Overwrite::Own
                }
            },
        };
        let checksum = match &d.checksum {
            None => Checksum::Crc64Nvme,
            Some(o) => match o.get_ref().as_str() {
                "crc64nvme" => Checksum::Crc64Nvme,
                "sha256" => Checksum::Sha256,
                other => {
                    self.problem(
                        o.span(),
                        "destination.checksum",
                        format!("must be \"crc64nvme\" or \"sha256\", got {other:?}"),
                    );
                    Checksum::Crc64Nvme
                }
            },
        };
        let dest = S3Destination {
            checksum,
            overwrite,
            object_meta,
            endpoint: endpoint?,
            region: region?,
            bucket: bucket?,
            prefix,
            sse,
            path_style: d.path_style.map(Spanned::into_inner).unwrap_or(false),
            profile: d.profile.map(Spanned::into_inner),
            credentials_file,
            ca_file,
        };
        let ip_host = matches!(
            dest.endpoint.host(),
            Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))
        );
        if ip_host && !dest.path_style {
            self.problem(
                span,
                "destination.path_style",
                "must be true when the endpoint is an IP address (virtual-hosted buckets need a DNS name)",
            );
        }
        Some(dest)
    }
}
