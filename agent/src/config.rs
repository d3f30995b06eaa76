//! Configuration: one TOML file, read in two phases.
//!
//! Phase one deserializes into `Raw*` structs (serde, `deny_unknown_fields`) so that a typo or a
//! wrong type is reported with the file, line and dotted key. Phase two validates every value into
//! typed fields (sizes, durations, paths, globs) and collects *every* problem before reporting, so
//! an operator fixes a file in one pass. `ha-edge validate` and `ha-edge run` share this code.
//!
//! Secrets never live here: the destination's credentials come from the environment, systemd
//! credentials or an AWS shared credentials file (see `s3::credentials`).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use toml::Spanned;

/// S3 limits on multipart parts.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3 allows at most 10,000 parts per upload.
pub const MAX_PARTS: u64 = 10_000;

/// One problem in a config file, located to a line and a dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

/// All problems found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} has {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(
                f,
                "\n  {}:{}:{}: {}: {}",
                self.file.display(),
                p.line,
                p.column,
                if p.key.is_empty() { "(file)" } else { &p.key },
                p.message
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Phase one: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<Spanned<RawAgent>>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    destination: Option<Spanned<RawDestination>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    /// SQLite journal file; must be an absolute path on local disk.
    journal: Option<Spanned<String>>,
    /// Objects transferred at the same time.
    concurrency: Option<Spanned<i64>>,
    /// Multipart parts (and single-PUT bodies) held in memory at once, across all objects.
    parts_in_flight: Option<Spanned<i64>>,
    /// Size of one multipart part.
    part_size: Option<Spanned<toml::Value>>,
    /// Files at or above this size are sent as multipart uploads.
    multipart_threshold: Option<Spanned<toml::Value>>,
    /// Attempts per HTTP request before the object is put back with a backoff.
    max_retries: Option<Spanned<i64>>,
    /// Upper bound for one HTTP request.
    request_timeout: Option<Spanned<toml::Value>>,
    /// How long in-flight parts may take to finish after SIGTERM.
    shutdown_grace: Option<Spanned<toml::Value>>,
    /// "text" or "json".
    log_format: Option<Spanned<String>>,
    /// Default log filter, e.g. "info" or "ha_edge=debug"; RUST_LOG overrides it.
    log_level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    include: Option<Spanned<Vec<Spanned<String>>>>,
    exclude: Option<Spanned<Vec<Spanned<String>>>>,
    settle: Option<Spanned<toml::Value>>,
    /// Full rescan period; events between rescans are a latency hint only.
    rescan_interval: Option<Spanned<toml::Value>>,
    after_upload: Option<Spanned<toml::Value>>,
    watch: Option<Spanned<String>>,
    poll_interval: Option<Spanned<toml::Value>>,
    on_change: Option<Spanned<String>>,
    complete_when: Option<Spanned<toml::Value>>,
    // type = "s3": the bucket (e.g. the institution's MinIO). Endpoint, bucket and keys fall back
    // to ONPREM_S3_ENDPOINT, ONPREM_S3_BUCKET, ONPREM_S3_ACCESS_KEY / ONPREM_S3_SECRET_KEY.
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    bucket: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    path_style: Option<Spanned<bool>>,
    profile: Option<Spanned<String>>,
    credentials_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    /// MinIO's ListenBucketNotification stream as a latency hint (the listing stays the truth).
    notifications: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    bucket: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    sse: Option<Spanned<String>>,
    kms_key_id: Option<Spanned<String>>,
    path_style: Option<Spanned<bool>>,
    /// Profile in the AWS shared credentials file.
    profile: Option<Spanned<String>>,
    /// AWS shared credentials file (default: $AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials).
    credentials_file: Option<Spanned<String>>,
    /// Extra PEM CA bundle trusted for an on-premise HTTPS endpoint; for type = "quic", the CA
    /// that signed the relay's certificate (the only one trusted).
    ca_file: Option<Spanned<String>>,
    // type = "quic": a relay inside the cloud VPC that lands objects with its own credentials.
    relay: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Phase two: validated, typed values.

#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentConfig,
    pub sources: Vec<SourceConfig>,
    pub destination: Destination,
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
    /// host:port of the relay.
    pub relay: String,
    /// The name the relay's certificate must carry.
    pub server_name: String,
    /// The CA that signed the relay's certificate.
    pub ca_file: PathBuf,
    /// This agent's certificate and key (PEM); default: `relay_cert.pem` / `relay_key.pem` in
    /// `$CREDENTIALS_DIRECTORY`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub journal: PathBuf,
    pub concurrency: usize,
    pub parts_in_flight: usize,
    pub part_size: u64,
    pub multipart_threshold: u64,
    pub max_retries: u32,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterUpload {
    Keep,
    Delete,
    /// Directory sources: move the file under this directory.
    MoveTo(PathBuf),
    /// Bucket sources: copy the object under this key prefix, then delete it.
    MoveToPrefix(String),
}

/// What a source reads from.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// A directory tree (`type = "fs"`) rooted at `SourceConfig::path`.
    Dir,
    /// A bucket on an S3-compatible server (`type = "s3"`); its `prefix` is the part of the
    /// bucket this source covers, and keys below it map like relative paths.
    Bucket(Box<S3Destination>),
}

/// How a directory source notices new files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// Poll on network and FUSE filesystems (inotify never sees other clients' writes), events
    /// elsewhere.
    Auto,
    /// inotify events as a latency hint, plus a full rescan every `rescan_interval`.
    Events,
    /// A full scan every `poll_interval`, no events.
    Poll,
}

/// What happens when a delivered file changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChange {
    /// Upload the new version (the same key: the bucket's versioning keeps the old one).
    Upload,
    /// Leave it: a delivered path is never sent again.
    Ignore,
}

/// When a file counts as complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Size and mtime unchanged for `settle`.
    Settle,
    /// A marker file next to it, named from a template with `{name}` (e.g. `{name}.done`).
    FileMarker { prefix: String, suffix: String },
    /// A marker file in its directory (e.g. `_SUCCESS`) completes every file there.
    DirMarker(String),
}

impl Completion {
    /// The marker that completes `file_name`, if markers are used.
    pub fn marker_for(&self, file_name: &str) -> Option<String> {
        match self {
            Completion::Settle => None,
            Completion::FileMarker { prefix, suffix } => {
                Some(format!("{prefix}{file_name}{suffix}"))
            }
            Completion::DirMarker(m) => Some(m.clone()),
        }
    }

    /// Whether `file_name` is itself a marker (markers are signals, never uploaded).
    pub fn is_marker(&self, file_name: &str) -> bool {
        match self {
            Completion::Settle => false,
            Completion::FileMarker { prefix, suffix } => {
                file_name.len() > prefix.len() + suffix.len()
                    && file_name.starts_with(prefix.as_str())
                    && file_name.ends_with(suffix.as_str())
            }
            Completion::DirMarker(m) => file_name == m,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
    /// The root of a directory source (empty for a bucket source).
    pub path: PathBuf,
    pub include: Option<GlobSet>,
    pub exclude: GlobSet,
    pub settle: Duration,
    pub rescan_interval: Duration,
    pub after_upload: AfterUpload,
    pub watch: WatchMode,
    pub poll_interval: Duration,
    pub on_change: OnChange,
    pub complete_when: Completion,
    /// Bucket sources: listen to MinIO's bucket notifications between listings.
    pub notifications: bool,
}

impl SourceConfig {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, SourceKind::Dir)
    }

    /// Whether a path relative to the source root passes include/exclude.
    pub fn selects(&self, rel: &Path) -> bool {
        if self.exclude.is_match(rel) {
            return false;
        }
        match &self.include {
            Some(set) => set.is_match(rel),
            None => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    Aes256,
    Kms { key_id: Option<String> },
}

/// How to reach a bucket: the destination's, or a bucket source's.
#[derive(Debug, Clone)]
pub struct S3Destination {
    pub endpoint: reqwest::Url,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub sse: Option<Sse>,
    pub path_style: bool,
    pub profile: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl Config {
    /// Reads and validates `file`, reporting every problem at once.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            problems: vec![ConfigProblem {
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Config::parse(file, &text)
    }

    /// Validates config text; `file` is used for messages only. Bucket sources may take their
    /// endpoint and bucket from the process environment (ONPREM_S3_*).
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(file, text, &|k| std::env::var(k).ok())
    }

    pub fn parse_with_env(
        file: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut v = Validator {
            text,
            env,
            problems: Vec::new(),
        };
        let raw: RawConfig = match parse_raw(text) {
            Ok(raw) => raw,
            Err(problem) => {
                return Err(ConfigError {
                    file: file.to_path_buf(),
                    problems: vec![problem],
                })
            }
        };
        let config = v.config(raw);
        match config {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => {
                v.problems.sort_by_key(|p| (p.line, p.column));
                Err(ConfigError {
                    file: file.to_path_buf(),
                    problems: v.problems,
                })
            }
        }
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigProblem> {
    parse_raw_as(text)
}

fn parse_raw_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigProblem> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_problem(text, "", &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        // Spanned<T> shows up as a private path segment; drop it.
        let key = e
            .path()
            .to_string()
            .split('.')
            .filter(|s| !s.starts_with("$__serde_spanned"))
            .collect::<Vec<_>>()
            .join(".");
        let key = if key.is_empty() { String::new() } else { key };
        toml_problem(text, &key, e.inner())
    })
}

fn toml_problem(text: &str, key: &str, e: &toml::de::Error) -> ConfigProblem {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    let key = if key.is_empty() {
        key_on_line(text, line).unwrap_or_default()
    } else {
        key.to_string()
    };
    ConfigProblem {
        line,
        column,
        key,
        message: e.message().trim().to_string(),
    }
}

/// For a syntax error, which has no key path: the dotted key that line sets, qualified by the
/// nearest table header above it (`[[source]]` tables are numbered as in other messages).
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let name = lines.get(line.checked_sub(1)?)?.split_once('=')?.0.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    if name.is_empty() || !name.chars().all(plain) {
        return None;
    }
    let mut table = String::new();
    let mut sources = 0;
    for l in &lines[..line - 1] {
        let t = l.trim();
        if let Some(inner) = t.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let inner = inner.trim();
            table = if inner == "source" {
                sources += 1;
                format!("source[{}]", sources - 1)
            } else {
                inner.to_string()
            };
        } else if let Some(inner) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = inner.trim().to_string();
        }
    }
    Some(if table.is_empty() {
        name.to_string()
    } else {
        format!("{table}.{name}")
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

struct Validator<'a> {
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<ConfigProblem>,
}

impl Validator<'_> {
    fn problem(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(ConfigProblem {
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let journal_span = raw
            .agent
            .as_ref()
            .and_then(|a| a.get_ref().journal.as_ref().map(|j| j.span()))
            .unwrap_or(0..0);
        let agent = match raw.agent {
            Some(a) => {
                let span = a.span();
                self.agent(a.into_inner(), span)
            }
            None => {
                self.problem(
                    0..0,
                    "agent",
                    "missing [agent] table (it needs at least `journal`)",
                );
                None
            }
        };
        if raw.source.is_empty() {
            self.problem(
                0..0,
                "source",
                "no [[source]] table: nothing to watch (add at least one)",
            );
        }
        let mut sources = Vec::new();
        // (index in the file, span of `name`, span of `path`) of each valid source.
        let mut places = Vec::new();
        for (i, s) in raw.source.into_iter().enumerate() {
            let span = s.span();
            let inner = s.into_inner();
            let name = inner.name.as_ref().map_or(span.clone(), |n| n.span());
            let path = inner
                .path
                .as_ref()
                .or(inner.prefix.as_ref())
                .map_or(span.clone(), |p| p.span());
            if let Some(src) = self.source(i, inner, span) {
                sources.push(src);
                places.push((i, name, path));
            }
        }
        self.check_sources_apart(&sources, &places);
        let destination = match raw.destination {
            Some(d) => {
                let span = d.span();
                self.destination(d.into_inner(), span)
            }
            None => {
                self.problem(0..0, "destination", "missing [destination] table");
                None
            }
        };
        if agent
            .as_ref()
            .is_some_and(|a| a.journal_inside_any(&sources))
        {
            self.problem(
                journal_span,
                "agent.journal",
                "the journal must not live inside a watched source directory",
            );
        }
        Some(Config {
            agent: agent?,
            sources,
            destination: destination?,
        })
    }

    fn agent(&mut self, a: RawAgent, span: Range<usize>) -> Option<AgentConfig> {
        let journal = match a.journal {
            Some(j) => {
                let p = PathBuf::from(j.get_ref());
                if !p.is_absolute() {
                    self.problem(
                        j.span(),
                        "agent.journal",
                        format!(
                            "must be an absolute path, got {:?} (e.g. \"/var/lib/ha-edge/journal.db\")",
                            j.get_ref()
                        ),
                    );
                    None
                } else if j.get_ref().ends_with('/') {
                    self.problem(
                        j.span(),
                        "agent.journal",
                        "must name a file, not a directory",
                    );
                    None
                } else {
                    Some(p)
                }
            }
            None => {
                self.problem(
                    span.clone(),
                    "agent.journal",
                    "missing (the SQLite journal file, e.g. \"/var/lib/ha-edge/journal.db\")",
                );
                None
            }
        };
        let concurrency = self.int_in(a.concurrency, "agent.concurrency", 1, 256, 4);
        let parts_in_flight = self.int_in(a.parts_in_flight, "agent.parts_in_flight", 1, 256, 4);
        let part_size = self.size(
            a.part_size,
            "agent.part_size",
            MIN_PART_SIZE,
            MAX_PART_SIZE,
            8 * 1024 * 1024,
        );
        let multipart_threshold = self.size(
            a.multipart_threshold,
            "agent.multipart_threshold",
            MIN_PART_SIZE,
            MAX_PART_SIZE,
            16 * 1024 * 1024,
        );
        let max_retries = self.int_in(a.max_retries, "agent.max_retries", 0, 100, 6);
        let request_timeout = self.duration(
            a.request_timeout,
            "agent.request_timeout",
            Duration::from_secs(1),
            Duration::from_secs(300),
        );
        let shutdown_grace = self.duration(
            a.shutdown_grace,
            "agent.shutdown_grace",
            Duration::ZERO,
            Duration::from_secs(30),
        );
        let log_format = match a.log_format {
            None => LogFormat::Text,
            Some(f) => match f.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    self.problem(
                        f.span(),
                        "agent.log_format",
                        format!("must be \"text\" or \"json\", got {other:?}"),
                    );
                    LogFormat::Text
                }
            },
        };
        let log_level = match a.log_level {
            None => "info".to_string(),
            Some(l) => {
                if tracing_subscriber::EnvFilter::builder()
                    .parse(l.get_ref())
                    .is_err()
                {
                    self.problem(
                        l.span(),
                        "agent.log_level",
                        format!(
                            "not a log filter: {:?} (try \"info\" or \"ha_edge=debug\")",
                            l.get_ref()
                        ),
                    );
                }
                l.into_inner()
            }
        };
        Some(AgentConfig {
            journal: journal?,
            concurrency: concurrency as usize,
            parts_in_flight: parts_in_flight as usize,
            part_size,
            multipart_threshold,
            max_retries: max_retries as u32,
            request_timeout,
            shutdown_grace,
            log_format,
            log_level,
        })
    }

    fn source(&mut self, i: usize, mut s: RawSource, span: Range<usize>) -> Option<SourceConfig> {
        let at = |k: &str| format!("source[{i}].{k}");
        let name = match s.name.take() {
            Some(n) => {
                let ok = !n.get_ref().is_empty()
                    && n.get_ref().len() <= 64
                    && n.get_ref()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
                if !ok {
                    self.problem(
                        n.span(),
                        &at("name"),
                        format!(
                            "must be 1-64 characters of A-Z a-z 0-9 . _ -, got {:?}",
                            n.get_ref()
                        ),
                    );
                }
                Some(n.into_inner())
            }
            None => {
                self.problem(
                    span.clone(),
                    &at("name"),
                    "missing (a short unique name for this source)",
                );
                None
            }
        };
        let is_bucket = match &s.kind {
            Some(k) if k.get_ref() == "fs" => false,
            Some(k) if k.get_ref() == "s3" => true,
            Some(k) => {
                self.problem(
                    k.span(),
                    &at("type"),
                    format!(
                        "unknown source type {:?} (supported: \"fs\", \"s3\")",
                        k.get_ref()
                    ),
                );
                false
            }
            None => {
                self.problem(
                    span.clone(),
                    &at("type"),
                    "missing (use type = \"fs\" or \"s3\")",
                );
                false
            }
        };
        // Keys that belong to the other kind of source.
        type Misplaced<'k> = Vec<(&'k str, Option<Range<usize>>)>;
        let (other_kind, misplaced): (&str, Misplaced<'_>) = if is_bucket {
            (
                "fs",
                vec![
                    ("path", s.path.as_ref().map(Spanned::span)),
                    ("settle", s.settle.as_ref().map(Spanned::span)),
                    ("watch", s.watch.as_ref().map(Spanned::span)),
                    (
                        "rescan_interval",
                        s.rescan_interval.as_ref().map(Spanned::span),
                    ),
                    ("complete_when", s.complete_when.as_ref().map(Spanned::span)),
                ],
            )
        } else {
            (
                "s3",
                vec![
                    ("endpoint", s.endpoint.as_ref().map(Spanned::span)),
                    ("region", s.region.as_ref().map(Spanned::span)),
                    ("bucket", s.bucket.as_ref().map(Spanned::span)),
                    ("prefix", s.prefix.as_ref().map(Spanned::span)),
                    ("path_style", s.path_style.as_ref().map(Spanned::span)),
                    ("profile", s.profile.as_ref().map(Spanned::span)),
                    (
                        "credentials_file",
                        s.credentials_file.as_ref().map(Spanned::span),
                    ),
                    ("ca_file", s.ca_file.as_ref().map(Spanned::span)),
                    ("notifications", s.notifications.as_ref().map(Spanned::span)),
                ],
            )
        };
        for (key, sp) in misplaced {
            if let Some(sp) = sp {
                let why = if key == "complete_when" || key == "settle" {
                    " (a bucket object appears whole when its upload completes)"
                } else {
                    ""
                };
                self.problem(
                    sp,
                    &at(key),
                    format!("only applies to type = \"{other_kind}\" sources{why}"),
                );
            }
        }
        let bucket = if is_bucket {
            self.bucket_source(i, &mut s, span.clone())
        } else {
            None
        };
        let path = if is_bucket {
            Some(PathBuf::new())
        } else {
            self.source_path(i, s.path.take(), span.clone())
        };
        let include = s
            .include
            .take()
            .map(|globs| self.globs(globs, &at("include")));
        let exclude = match s.exclude.take() {
            Some(globs) => self.globs(globs, &at("exclude")),
            None => GlobSet::empty(),
        };
        let settle = self.duration(
            s.settle.take(),
            &at("settle"),
            Duration::ZERO,
            Duration::from_secs(30),
        );
        let after_upload = self.after_upload(i, s.after_upload.take(), path.as_deref(), is_bucket);
        self.source_rest(
            i,
            s,
            name,
            path,
            bucket,
            include,
            exclude,
            settle,
            after_upload,
        )
    }

    fn source_path(
        &mut self,
        i: usize,
        p: Option<Spanned<String>>,
        span: Range<usize>,
    ) -> Option<PathBuf> {
        let at = |k: &str| format!("source[{i}].{k}");
        match p {
            Some(p) => {
                let pb = PathBuf::from(p.get_ref());
                if !pb.is_absolute() {
                    self.problem(
                        p.span(),
                        &at("path"),
                        format!("must be an absolute path, got {:?}", p.get_ref()),
                    );
                    None
                } else {
                    match std::fs::metadata(&pb) {
                        Ok(m) if m.is_dir() => Some(pb),
                        Ok(_) => {
                            self.problem(
                                p.span(),
                                &at("path"),
                                format!("{} is not a directory", pb.display()),
                            );
                            None
                        }
                        Err(e) => {
                            self.problem(
                                p.span(),
                                &at("path"),
                                format!("cannot use {}: {e}", pb.display()),
                            );
                            None
                        }
                    }
                }
            }
            None => {
                self.problem(span, &at("path"), "missing (the directory to watch)");
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn source_rest(
        &mut self,
        i: usize,
        s: RawSource,
        name: Option<String>,
        path: Option<PathBuf>,
        bucket: Option<S3Destination>,
        include: Option<GlobSet>,
        exclude: GlobSet,
        settle: Duration,
        after_upload: AfterUpload,
    ) -> Option<SourceConfig> {
        let at = |k: &str| format!("source[{i}].{k}");
        let rescan_interval = self.duration(
            s.rescan_interval,
            &at("rescan_interval"),
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let watch = match s.watch {
            None => WatchMode::Auto,
            Some(w) => match w.get_ref().as_str() {
                "auto" => WatchMode::Auto,
                "events" => WatchMode::Events,
                "poll" => WatchMode::Poll,
                other => {
                    self.problem(
                        w.span(),
                        &at("watch"),
                        format!("must be \"auto\", \"events\" or \"poll\", got {other:?}"),
                    );
                    WatchMode::Auto
                }
            },
        };
        let poll_interval = self.duration(
            s.poll_interval,
            &at("poll_interval"),
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        let on_change = match s.on_change {
            None => OnChange::Upload,
            Some(v) => match v.get_ref().as_str() {
                "upload" => OnChange::Upload,
                "ignore" => OnChange::Ignore,
                other => {
                    self.problem(
                        v.span(),
                        &at("on_change"),
                        format!("must be \"upload\" or \"ignore\", got {other:?}"),
                    );
                    OnChange::Upload
                }
            },
        };
        let complete_when = match s.complete_when {
            None => Completion::Settle,
            Some(v) => {
                let sp = v.span();
                let marker = match v.into_inner() {
                    toml::Value::String(s) if s == "settle" => None,
                    toml::Value::Table(t)
                        if t.len() == 1 && t.get("marker").is_some_and(|v| v.is_str()) =>
                    {
                        Some(t["marker"].as_str().unwrap_or_default().to_string())
                    }
                    other => {
                        self.problem(
                            sp.clone(),
                            &at("complete_when"),
                            format!("must be \"settle\" or {{ marker = \"{{name}}.done\" }} (or a directory marker such as \"_SUCCESS\"), got {other}"),
                        );
                        None
                    }
                };
                match marker {
                    None => Completion::Settle,
                    Some(m) if m.is_empty() || m.contains('/') || m == "{name}" => {
                        self.problem(
                            sp,
                            &at("complete_when.marker"),
                            "must be a file name (no '/'), and not just {name}",
                        );
                        Completion::Settle
                    }
                    Some(m) => match m.split_once("{name}") {
                        Some((prefix, suffix)) => Completion::FileMarker {
                            prefix: prefix.to_string(),
                            suffix: suffix.to_string(),
                        },
                        None => Completion::DirMarker(m),
                    },
                }
            }
        };
        let kind = match bucket {
            Some(conn) => SourceKind::Bucket(Box::new(conn)),
            None if path.as_deref().is_some_and(|p| p.as_os_str().is_empty()) => return None,
            None => SourceKind::Dir,
        };
        let notifications = s.notifications.is_some_and(Spanned::into_inner);
        Some(SourceConfig {
            name: name?,
            notifications,
            kind,
            path: path?,
            include,
            exclude,
            settle,
            rescan_interval,
            after_upload,
            watch,
            poll_interval,
            on_change,
            complete_when,
        })
    }

    fn after_upload(
        &mut self,
        i: usize,
        v: Option<Spanned<toml::Value>>,
        path: Option<&Path>,
        is_bucket: bool,
    ) -> AfterUpload {
        let at = |k: &str| format!("source[{i}].{k}");
        let Some(v) = v else {
            return AfterUpload::Keep;
        };
        let sp = v.span();
        let one = |t: &toml::Table, k: &str| t.len() == 1 && t.get(k).is_some_and(|v| v.is_str());
        match v.into_inner() {
            toml::Value::String(s) if s == "keep" => AfterUpload::Keep,
            toml::Value::String(s) if s == "delete" => AfterUpload::Delete,
            toml::Value::Table(t) if !is_bucket && one(&t, "move_to") => {
                let dest = PathBuf::from(t["move_to"].as_str().unwrap_or_default());
                if !dest.is_absolute() {
                    self.problem(sp, &at("after_upload.move_to"), "must be an absolute path");
                } else if let Some(src) = path {
                    if dest.starts_with(src) {
                        self.problem(
                            sp,
                            &at("after_upload.move_to"),
                            "must be outside the source path (moved files would be found again)",
                        );
                    }
                }
                AfterUpload::MoveTo(dest)
            }
            toml::Value::Table(t) if is_bucket && one(&t, "move_to_prefix") => {
                let p = t["move_to_prefix"].as_str().unwrap_or_default().to_string();
                if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c == ".." || c == ".")
                {
                    self.problem(
                        sp,
                        &at("after_upload.move_to_prefix"),
                        "must be a key prefix such as \"processed/\" (not empty, no leading '/', no '.' or '..' segments)",
                    );
                }
                AfterUpload::MoveToPrefix(p)
            }
            other => {
                let moved = if is_bucket {
                    "{ move_to_prefix = \"processed/\" }"
                } else {
                    "{ move_to = \"/abs/dir\" }"
                };
                self.problem(
                    sp,
                    &at("after_upload"),
                    format!("must be \"keep\", \"delete\" or {moved}, got {other}"),
                );
                AfterUpload::Keep
            }
        }
    }

    /// The bucket of a `type = "s3"` source. Endpoint and bucket fall back to ONPREM_S3_ENDPOINT
    /// and ONPREM_S3_BUCKET; the region defaults to us-east-1 (MinIO's) and path-style
    /// addressing is on by default (on-premise servers rarely have wildcard DNS).
    fn bucket_source(
        &mut self,
        i: usize,
        s: &mut RawSource,
        span: Range<usize>,
    ) -> Option<S3Destination> {
        let at = |k: &str| format!("source[{i}].{k}");
        let from_env =
            |v: Option<Spanned<String>>, var: &str, env: &dyn Fn(&str) -> Option<String>| {
                v.or_else(|| {
                    env(var)
                        .filter(|x| !x.is_empty())
                        .map(|x| Spanned::new(span.clone(), x))
                })
            };
        let endpoint = match from_env(s.endpoint.take(), "ONPREM_S3_ENDPOINT", self.env) {
            Some(e) => self.endpoint_url(e, &at("endpoint")),
            None => {
                self.problem(
                    span.clone(),
                    &at("endpoint"),
                    "missing (set endpoint here or ONPREM_S3_ENDPOINT in the environment)",
                );
                None
            }
        };
        let bucket = match from_env(s.bucket.take(), "ONPREM_S3_BUCKET", self.env) {
            Some(b) => {
                if let Err(why) = check_bucket_name(b.get_ref()) {
                    self.problem(b.span(), &at("bucket"), why);
                }
                Some(b.into_inner())
            }
            None => {
                self.problem(
                    span.clone(),
                    &at("bucket"),
                    "missing (set bucket here or ONPREM_S3_BUCKET in the environment)",
                );
                None
            }
        };
        let region = match s.region.take() {
            Some(r) => self.region(r, &at("region")),
            None => Some("us-east-1".to_string()),
        };
        let prefix = match s.prefix.take() {
            Some(p) => self.key_prefix(p, &at("prefix")),
            None => String::new(),
        };
        let credentials_file = s
            .credentials_file
            .take()
            .map(|c| self.readable_file(c, &at("credentials_file"), true));
        let ca_file = s
            .ca_file
            .take()
            .map(|c| self.readable_file(c, &at("ca_file"), false));
        let conn = S3Destination {
            endpoint: endpoint?,
            region: region?,
            bucket: bucket?,
            prefix,
            sse: None,
            path_style: s.path_style.take().is_none_or(Spanned::into_inner),
            profile: s.profile.take().map(Spanned::into_inner),
            credentials_file,
            ca_file,
        };
        let ip_host = matches!(
            conn.endpoint.host(),
            Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))
        );
        if ip_host && !conn.path_style {
            self.problem(
                span,
                &at("path_style"),
                "must be true when the endpoint is an IP address (virtual-hosted buckets need a DNS name)",
            );
        }
        Some(conn)
    }

    fn endpoint_url(&mut self, e: Spanned<String>, key: &str) -> Option<reqwest::Url> {
        match reqwest::Url::parse(e.get_ref()) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {
                if u.path() != "/" || u.query().is_some() {
                    self.problem(
                        e.span(),
                        key,
                        "must be scheme://host[:port] without a path (the bucket goes in `bucket`)",
                    );
                }
                Some(u)
            }
            Ok(_) => {
                self.problem(e.span(), key, "must be an http:// or https:// URL");
                None
            }
            Err(err) => {
                self.problem(e.span(), key, format!("not a URL: {err}"));
                None
            }
        }
    }

    fn region(&mut self, r: Spanned<String>, key: &str) -> Option<String> {
        let ok = !r.get_ref().is_empty()
            && r.get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if ok {
            Some(r.into_inner())
        } else {
            self.problem(
                r.span(),
                key,
                format!("not a region name: {:?}", r.get_ref()),
            );
            None
        }
    }

    fn key_prefix(&mut self, p: Spanned<String>, key: &str) -> String {
        if p.get_ref().starts_with('/') {
            self.problem(
                p.span(),
                key,
                "must not start with '/' (keys are relative to the bucket)",
            );
        }
        if p.get_ref().split('/').any(|c| c == ".." || c == ".") {
            self.problem(p.span(), key, "must not contain '.' or '..' segments");
        }
        if p.get_ref().len() > 512 {
            self.problem(p.span(), key, "is longer than 512 bytes");
        }
        p.into_inner()
    }

    /// An absolute (if `absolute`) path to a file this process can read.
    fn readable_file(&mut self, c: Spanned<String>, key: &str, absolute: bool) -> PathBuf {
        let p = PathBuf::from(c.get_ref());
        if absolute && !p.is_absolute() {
            self.problem(c.span(), key, "must be an absolute path");
        } else if let Err(e) = std::fs::File::open(&p) {
            self.problem(c.span(), key, format!("cannot read {}: {e}", p.display()));
        }
        p
    }

    /// Problems are reported at the later of two clashing sources.
    fn check_sources_apart(
        &mut self,
        sources: &[SourceConfig],
        places: &[(usize, Range<usize>, Range<usize>)],
    ) {
        for (i, a) in sources.iter().enumerate() {
            for (j, b) in sources.iter().enumerate().skip(i + 1) {
                let (idx, name_span, path_span) = places[j].clone();
                if a.name == b.name {
                    self.problem(
                        name_span,
                        &format!("source[{idx}].name"),
                        format!("two sources are named {:?}", a.name),
                    );
                }
                let (key, what_a, what_b) = match (&a.kind, &b.kind) {
                    (SourceKind::Dir, SourceKind::Dir)
                        if a.path.starts_with(&b.path) || b.path.starts_with(&a.path) =>
                    {
                        (
                            "path",
                            a.path.display().to_string(),
                            b.path.display().to_string(),
                        )
                    }
                    (SourceKind::Bucket(x), SourceKind::Bucket(y))
                        if x.endpoint == y.endpoint
                            && x.bucket == y.bucket
                            && (x.prefix.starts_with(&y.prefix)
                                || y.prefix.starts_with(&x.prefix)) =>
                    {
                        let show = |c: &S3Destination| format!("s3://{}/{}", c.bucket, c.prefix);
                        ("prefix", show(x), show(y))
                    }
                    _ => continue,
                };
                self.problem(
                    path_span,
                    &format!("source[{idx}].{key}"),
                    format!(
                        "sources {:?} ({what_a}) and {:?} ({what_b}) overlap: a file would be sent twice",
                        a.name, b.name,
                    ),
                );
            }
        }
    }

    fn destination(&mut self, d: RawDestination, span: Range<usize>) -> Option<Destination> {
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
            ]
        } else {
            vec![
                ("relay", d.relay.as_ref().map(Spanned::span)),
                ("server_name", d.server_name.as_ref().map(Spanned::span)),
                ("cert_file", d.cert_file.as_ref().map(Spanned::span)),
                ("key_file", d.key_file.as_ref().map(Spanned::span)),
            ]
        };
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

    fn relay_destination(
        &mut self,
        d: RawDestination,
        span: Range<usize>,
    ) -> Option<RelayDestination> {
        let relay = match d.relay {
            Some(r) => match r.get_ref().rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) =>
                {
                    Some((
                        r.get_ref().clone(),
                        host.trim_matches(['[', ']']).to_string(),
                    ))
                }
                _ => {
                    self.problem(
                        r.span(),
                        "destination.relay",
                        format!("must be host:port, got {:?}", r.get_ref()),
                    );
                    None
                }
            },
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
            Some(c) => Some(self.readable_file(c, "destination.ca_file", true)),
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
            .map(|c| self.readable_file(c, "destination.cert_file", true));
        let key_file = d
            .key_file
            .map(|c| self.readable_file(c, "destination.key_file", true));
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
        Some(RelayDestination {
            relay: relay?.0,
            server_name: server_name?,
            ca_file: ca_file?,
            cert_file,
            key_file,
            prefix,
        })
    }

    fn s3_destination(&mut self, d: RawDestination, span: Range<usize>) -> Option<S3Destination> {
        let endpoint = match d.endpoint {
            Some(e) => self.endpoint_url(e, "destination.endpoint"),
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
            .map(|c| self.readable_file(c, "destination.credentials_file", true));
        let ca_file = d
            .ca_file
            .map(|c| self.readable_file(c, "destination.ca_file", false));
        let dest = S3Destination {
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

    fn int_in(
        &mut self,
        v: Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        match v {
            None => default,
            Some(v) if (min..=max).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                self.problem(
                    v.span(),
                    key,
                    format!("must be between {min} and {max}, got {}", v.get_ref()),
                );
                default
            }
        }
    }

    fn size(
        &mut self,
        v: Option<Spanned<toml::Value>>,
        key: &str,
        min: u64,
        max: u64,
        default: u64,
    ) -> u64 {
        let Some(v) = v else { return default };
        let span = v.span();
        match parse_size(v.get_ref()) {
            Ok(n) if (min..=max).contains(&n) => n,
            Ok(n) => {
                self.problem(
                    span,
                    key,
                    format!(
                        "must be between {} and {}, got {}",
                        fmt_size(min),
                        fmt_size(max),
                        fmt_size(n)
                    ),
                );
                default
            }
            Err(why) => {
                self.problem(span, key, why);
                default
            }
        }
    }

    fn duration(
        &mut self,
        v: Option<Spanned<toml::Value>>,
        key: &str,
        min: Duration,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        let span = v.span();
        match parse_duration(v.get_ref()) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.problem(
                    span,
                    key,
                    format!("must be at least {}", humantime::format_duration(min)),
                );
                default
            }
            Err(why) => {
                self.problem(span, key, why);
                default
            }
        }
    }

    fn globs(&mut self, globs: Spanned<Vec<Spanned<String>>>, key: &str) -> GlobSet {
        let mut b = GlobSetBuilder::new();
        for g in globs.into_inner() {
            match Glob::new(g.get_ref()) {
                Ok(glob) => {
                    b.add(glob);
                }
                Err(e) => self.problem(
                    g.span(),
                    key,
                    format!("bad glob {:?}: {}", g.get_ref(), e.kind()),
                ),
            }
        }
        b.build().unwrap_or_else(|_| GlobSet::empty())
    }
}

impl AgentConfig {
    fn journal_inside_any(&self, sources: &[SourceConfig]) -> bool {
        sources
            .iter()
            .any(|s| s.is_dir() && self.journal.starts_with(&s.path))
    }
}

// ---------------------------------------------------------------------------------------------
// The relay's own file (`ha-edge relay -c relay.toml`), validated the same way.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelayFile {
    relay: Option<Spanned<RawRelay>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgentAuth>>,
    store: Option<Spanned<RawStore>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    listen: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    client_ca_file: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    max_streams_per_agent: Option<Spanned<i64>>,
    max_partials: Option<Spanned<i64>>,
    stream_buffer: Option<Spanned<toml::Value>>,
    partial_ttl: Option<Spanned<toml::Value>>,
    idle_timeout: Option<Spanned<toml::Value>>,
    log_format: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentAuth {
    identity: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    part_size: Option<Spanned<toml::Value>>,
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    bucket: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    sse: Option<Spanned<String>>,
    kms_key_id: Option<Spanned<String>>,
    path_style: Option<Spanned<bool>>,
    profile: Option<Spanned<String>>,
    credentials_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

/// `ha-edge relay` settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: std::net::SocketAddr,
    pub name: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Agents' certificates must chain to this CA.
    pub client_ca_file: PathBuf,
    /// Partial transfers and the directory store's index.
    pub state_dir: PathBuf,
    pub max_streams_per_agent: u32,
    pub max_partials: usize,
    /// Flow-control window per stream: the bytes one stream may have in flight.
    pub stream_buffer: u64,
    pub partial_ttl: Duration,
    pub idle_timeout: Duration,
    pub agents: Vec<AgentAuth>,
    pub store: StoreConfig,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// One agent identity (a DNS name in its certificate) and the key prefix it may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAuth {
    pub identity: String,
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Dir(PathBuf),
    S3 {
        bucket: Box<S3Destination>,
        part_size: u64,
    },
}

impl RelayConfig {
    pub fn load(file: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            problems: vec![ConfigProblem {
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        RelayConfig::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<RelayConfig, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_path_buf(),
            problems,
        };
        let raw: RawRelayFile = parse_raw_as(text).map_err(|p| fail(vec![p]))?;
        let env = |_: &str| None;
        let mut v = Validator {
            text,
            env: &env,
            problems: Vec::new(),
        };
        let cfg = v.relay_file(raw);
        match cfg {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => {
                v.problems.sort_by_key(|p| (p.line, p.column));
                Err(fail(v.problems))
            }
        }
    }
}

impl Validator<'_> {
    fn relay_file(&mut self, raw: RawRelayFile) -> Option<RelayConfig> {
        let Some(r) = raw.relay else {
            self.problem(0..0, "relay", "missing [relay] table");
            return None;
        };
        let span = r.span();
        let r = r.into_inner();
        let listen = match r.listen {
            Some(l) => match l.get_ref().parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem(
                        l.span(),
                        "relay.listen",
                        format!(
                            "must be ip:port (e.g. \"0.0.0.0:4433\"), got {:?}",
                            l.get_ref()
                        ),
                    );
                    None
                }
            },
            None => {
                self.problem(
                    span.clone(),
                    "relay.listen",
                    "missing (e.g. \"0.0.0.0:4433\")",
                );
                None
            }
        };
        let file = |v: Option<Spanned<String>>, key: &str, what: &str, me: &mut Self| match v {
            Some(c) => Some(me.readable_file(c, key, true)),
            None => {
                me.problem(span.clone(), key, format!("missing ({what})"));
                None
            }
        };
        let cert_file = file(
            r.cert_file,
            "relay.cert_file",
            "the relay's certificate, PEM",
            self,
        );
        let key_file = file(r.key_file, "relay.key_file", "its private key, PEM", self);
        let client_ca_file = file(
            r.client_ca_file,
            "relay.client_ca_file",
            "the CA that signs agents' certificates",
            self,
        );
        let state_dir = match r.state_dir {
            Some(d) if Path::new(d.get_ref()).is_absolute() => Some(PathBuf::from(d.into_inner())),
            Some(d) => {
                self.problem(d.span(), "relay.state_dir", "must be an absolute path");
                None
            }
            None => Some(PathBuf::from("/var/lib/ha-edge-relay")),
        };
        let max_streams = self.int_in(
            r.max_streams_per_agent,
            "relay.max_streams_per_agent",
            1,
            1024,
            16,
        );
        let max_partials = self.int_in(r.max_partials, "relay.max_partials", 1, 1_000_000, 256);
        let stream_buffer = self.size(
            r.stream_buffer,
            "relay.stream_buffer",
            64 * 1024,
            1 << 30,
            4 << 20,
        );
        let partial_ttl = self.duration(
            r.partial_ttl,
            "relay.partial_ttl",
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        );
        let idle_timeout = self.duration(
            r.idle_timeout,
            "relay.idle_timeout",
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        let log_format = match r.log_format {
            None => LogFormat::Text,
            Some(f) if f.get_ref() == "text" => LogFormat::Text,
            Some(f) if f.get_ref() == "json" => LogFormat::Json,
            Some(f) => {
                self.problem(f.span(), "relay.log_format", "must be \"text\" or \"json\"");
                LogFormat::Text
            }
        };
        let log_level = r
            .log_level
            .map_or_else(|| "info".to_string(), Spanned::into_inner);
        let mut agents = Vec::new();
        if raw.agent.is_empty() {
            self.problem(
                0..0,
                "agent",
                "no [[agent]] table: no agent could write anything (add identity and prefix)",
            );
        }
        for (i, a) in raw.agent.into_iter().enumerate() {
            let sp = a.span();
            let a = a.into_inner();
            let id_span = a.identity.as_ref().map_or(sp.clone(), Spanned::span);
            let identity = match a.identity {
                Some(id)
                    if rustls_pki_types::ServerName::try_from(id.get_ref().as_str())
                        .is_ok_and(|n| matches!(n, rustls_pki_types::ServerName::DnsName(_))) =>
                {
                    Some(id.into_inner())
                }
                Some(id) => {
                    self.problem(
                        id.span(),
                        &format!("agent[{i}].identity"),
                        format!("must be a DNS name as in the agent certificate's subjectAltName, got {:?}", id.get_ref()),
                    );
                    None
                }
                None => {
                    self.problem(sp.clone(), &format!("agent[{i}].identity"), "missing");
                    None
                }
            };
            let prefix = match a.prefix {
                Some(p) => Some(self.key_prefix(p, &format!("agent[{i}].prefix"))),
                None => {
                    self.problem(
                        sp,
                        &format!("agent[{i}].prefix"),
                        "missing (the key prefix this agent may write, e.g. \"fhir/dkfz/\")",
                    );
                    None
                }
            };
            if let (Some(identity), Some(prefix)) = (identity, prefix) {
                if agents.iter().any(|a: &AgentAuth| a.identity == identity) {
                    self.problem(
                        id_span,
                        &format!("agent[{i}].identity"),
                        format!("{identity:?} is listed twice (one prefix per identity)"),
                    );
                }
                agents.push(AgentAuth { identity, prefix });
            }
        }
        let store = match raw.store {
            Some(st) => {
                let sp = st.span();
                self.store(st.into_inner(), sp)
            }
            None => {
                self.problem(
                    0..0,
                    "store",
                    "missing [store] table (type = \"dir\" or \"s3\")",
                );
                None
            }
        };
        Some(RelayConfig {
            listen: listen?,
            name: r
                .name
                .map_or_else(|| "ha-edge-relay".to_string(), Spanned::into_inner),
            cert_file: cert_file?,
            key_file: key_file?,
            client_ca_file: client_ca_file?,
            state_dir: state_dir?,
            max_streams_per_agent: max_streams as u32,
            max_partials: max_partials as usize,
            stream_buffer,
            partial_ttl,
            idle_timeout,
            agents,
            store: store?,
            log_format,
            log_level,
        })
    }

    fn store(&mut self, st: RawStore, span: Range<usize>) -> Option<StoreConfig> {
        let part_size = self.size(
            st.part_size,
            "store.part_size",
            MIN_PART_SIZE,
            MAX_PART_SIZE,
            16 << 20,
        );
        match st.kind.as_ref().map(|k| k.get_ref().as_str()) {
            Some("dir") => match st.path {
                Some(p) if Path::new(p.get_ref()).is_absolute() => {
                    Some(StoreConfig::Dir(PathBuf::from(p.into_inner())))
                }
                Some(p) => {
                    self.problem(p.span(), "store.path", "must be an absolute path");
                    None
                }
                None => {
                    self.problem(span, "store.path", "missing (where landed objects go)");
                    None
                }
            },
            Some("s3") => {
                if let Some(p) = &st.path {
                    self.problem(p.span(), "store.path", "only applies to type = \"dir\"");
                }
                let before = self.problems.len();
                let raw = RawDestination {
                    kind: st.kind,
                    endpoint: st.endpoint,
                    region: st.region,
                    bucket: st.bucket,
                    prefix: st.prefix,
                    sse: st.sse,
                    kms_key_id: st.kms_key_id,
                    path_style: st.path_style,
                    profile: st.profile,
                    credentials_file: st.credentials_file,
                    ca_file: st.ca_file,
                    relay: None,
                    server_name: None,
                    cert_file: None,
                    key_file: None,
                };
                let d = self.s3_destination(raw, span);
                for p in &mut self.problems[before..] {
                    if let Some(rest) = p.key.strip_prefix("destination.") {
                        p.key = format!("store.{rest}");
                    }
                }
                Some(StoreConfig::S3 {
                    bucket: Box::new(d?),
                    part_size,
                })
            }
            _ => {
                let sp = st.kind.as_ref().map_or(span, Spanned::span);
                self.problem(sp, "store.type", "must be \"dir\" or \"s3\"");
                None
            }
        }
    }
}

/// "5 MiB" for whole units, bytesize's rounding otherwise.
pub fn fmt_size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{} {name}", n / unit);
        }
    }
    bytesize::ByteSize(n).display().iec().to_string()
}

/// Parses "8MiB", "16 MB", "1GiB" or a plain integer number of bytes.
pub fn parse_size(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
        toml::Value::String(s) => s
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|_| format!("not a size: {s:?} (write e.g. \"8MiB\" or \"64 MB\")")),
        other => Err(format!("expected a size such as \"8MiB\", got {other}")),
    }
}

/// Parses "30s", "5m", "1h 30m" or a plain integer number of seconds.
pub fn parse_duration(v: &toml::Value) -> Result<Duration, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
        toml::Value::String(s) => humantime::parse_duration(s)
            .map_err(|e| format!("not a duration: {s:?} ({e}; write e.g. \"30s\" or \"5m\")")),
        other => Err(format!("expected a duration such as \"30s\", got {other}")),
    }
}

/// S3 bucket naming rules (the subset every S3-compatible server shares).
pub fn check_bucket_name(b: &str) -> Result<(), String> {
    let ok_chars = b
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !(3..=63).contains(&b.len()) {
        return Err(format!("bucket names are 3 to 63 characters, got {:?}", b));
    }
    if !ok_chars {
        return Err(format!("bucket names use a-z 0-9 . - only, got {b:?}"));
    }
    let first = b.chars().next().unwrap_or('-');
    let last = b.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err(format!(
            "bucket names start and end with a letter or digit, got {b:?}"
        ));
    }
    Ok(())
}

/// Just `agent.journal`, for `status`, which must work even when other parts of the config
/// (a source directory, say) are currently broken.
pub fn journal_path(file: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", file.display(), e.message()))?;
    table
        .get("agent")
        .and_then(|a| a.get("journal"))
        .and_then(|j| j.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{}: agent.journal is not set", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(dir: &Path) -> String {
        format!(
            r#"
[agent]
journal = "{d}/journal.db"

[[source]]
name = "fhir"
type = "fs"
path = "{d}/in"
include = ["**/*.ndjson"]
settle = "2s"

[destination]
type = "s3"
endpoint = "http://127.0.0.1:9000"
region = "eu-central-1"
bucket = "fhir-bucket"
prefix = "fhir/"
path_style = true
"#,
            d = dir.display()
        )
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        Config::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .problems
    }

    const BUCKET_ONLY: &str = r#"
[agent]
journal = "/var/lib/ha-edge/journal.db"

[[source]]
name = "minio"
type = "s3"
prefix = "exports/"
after_upload = { move_to_prefix = "processed/" }

[destination]
type = "s3"
endpoint = "https://s3.eu-central-1.amazonaws.com"
region = "eu-central-1"
bucket = "fhir-bucket"
"#;

    #[test]
    fn bucket_source_takes_endpoint_and_bucket_from_the_environment() {
        let env = |k: &str| match k {
            "ONPREM_S3_ENDPOINT" => Some("http://10.0.0.5:9000".to_string()),
            "ONPREM_S3_BUCKET" => Some("exports-bucket".to_string()),
            _ => None,
        };
        let c = Config::parse_with_env(Path::new("t.toml"), BUCKET_ONLY, &env).unwrap();
        let SourceKind::Bucket(conn) = &c.sources[0].kind else {
            panic!("not a bucket source")
        };
        assert_eq!(conn.endpoint.as_str(), "http://10.0.0.5:9000/");
        assert_eq!(conn.bucket, "exports-bucket");
        assert_eq!(conn.region, "us-east-1");
        assert_eq!(conn.prefix, "exports/");
        assert!(conn.path_style);
        assert_eq!(
            c.sources[0].after_upload,
            AfterUpload::MoveToPrefix("processed/".into())
        );
        // The config wins over the environment.
        let text = BUCKET_ONLY.replace(
            "prefix = \"exports/\"",
            "prefix = \"exports/\"\nbucket = \"from-config\"",
        );
        let c = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap();
        let SourceKind::Bucket(conn) = &c.sources[0].kind else {
            panic!("not a bucket source")
        };
        assert_eq!(conn.bucket, "from-config");
        // Neither: both named, at the source's line.
        let err = Config::parse_with_env(Path::new("t.toml"), BUCKET_ONLY, &|_| None).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["source[0].endpoint", "source[0].bucket"]);
        assert!(err.problems[0].message.contains("ONPREM_S3_ENDPOINT"));
        assert_eq!(err.problems[0].line, 5);
    }

    #[test]
    fn keys_of_the_other_source_type_are_refused() {
        let env = |k: &str| match k {
            "ONPREM_S3_ENDPOINT" => Some("http://minio.local:9000".to_string()),
            "ONPREM_S3_BUCKET" => Some("bkt".to_string()),
            _ => None,
        };
        let text = BUCKET_ONLY.replace(
            "prefix = \"exports/\"",
            "prefix = \"exports/\"\nsettle = \"5s\"\npath = \"/srv\"",
        );
        let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["source[0].settle", "source[0].path"]);
        assert!(err.problems[0].message.contains("type = \"fs\""));
        // move_to is for files, move_to_prefix for objects.
        let text = BUCKET_ONLY.replace("move_to_prefix", "move_to");
        let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
        assert_eq!(err.problems[0].key, "source[0].after_upload");
        assert!(err.problems[0].message.contains("move_to_prefix"));
        let text = BUCKET_ONLY.replace("\"processed/\"", "\"/abs/\"");
        let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
        assert_eq!(err.problems[0].key, "source[0].after_upload.move_to_prefix");

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let text = good(dir.path()).replace("settle = \"2s\"", "settle = \"2s\"\nbucket = \"x\"");
        assert_eq!(problems(&text)[0].key, "source[0].bucket");
    }

    #[test]
    fn overlapping_bucket_prefixes_are_refused() {
        let env = |k: &str| match k {
            "ONPREM_S3_ENDPOINT" => Some("http://minio.local:9000".to_string()),
            "ONPREM_S3_BUCKET" => Some("bkt".to_string()),
            _ => None,
        };
        let second = "\n[[source]]\nname = \"all\"\ntype = \"s3\"\nprefix = \"\"\n";
        let text = BUCKET_ONLY.replace("\n[destination]", &format!("{second}\n[destination]"));
        let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
        assert_eq!(err.problems[0].key, "source[1].prefix");
        assert!(err.problems[0].message.contains("overlap"));
        let other = second.replace("prefix = \"\"", "prefix = \"other/\"");
        let text = BUCKET_ONLY.replace("\n[destination]", &format!("{other}\n[destination]"));
        assert!(Config::parse_with_env(Path::new("t.toml"), &text, &env).is_ok());
    }

    #[test]
    fn relay_example_is_valid_and_mistakes_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/relay.toml"),
        )
        .unwrap();
        let mut text = text.replace(
            "/var/lib/ha-edge-relay",
            &dir.path().join("state").display().to_string(),
        );
        for f in ["server.pem", "server.key", "agents-ca.pem"] {
            let p = dir.path().join(f);
            std::fs::write(&p, "x").unwrap();
            text = text.replace(&format!("/etc/ha-edge/relay/{f}"), &p.display().to_string());
        }
        let c = RelayConfig::parse(Path::new("relay.toml"), &text).unwrap();
        assert_eq!(c.agents.len(), 2);
        assert_eq!(c.agents[1].prefix, "fhir/embl/");
        assert!(
            matches!(&c.store, StoreConfig::S3 { bucket, part_size } if bucket.bucket == "healthalliance-fhir" && *part_size == 16 << 20)
        );
        assert_eq!(c.stream_buffer, 4 << 20);

        let bad = text
            .replace("listen = \"0.0.0.0:4433\"", "listen = \"anywhere\"")
            .replace("prefix = \"fhir/embl/\"", "prefix = \"../x/\"")
            .replace(
                "identity = \"embl-edge-01.agents.example.org\"",
                "identity = \"not a name\"",
            )
            .replace("region = \"eu-central-1\"", "region = \"eu central\"");
        let err = RelayConfig::parse(Path::new("relay.toml"), &bad).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "relay.listen",
                "agent[1].identity",
                "agent[1].prefix",
                "store.region"
            ]
        );
        assert!(err.to_string().contains("relay.toml:"));
        // One prefix per identity.
        let twice = text.replace("embl-edge-01", "dkfz-edge-01");
        let err = RelayConfig::parse(Path::new("relay.toml"), &twice).unwrap_err();
        assert_eq!(err.problems[0].key, "agent[1].identity");
        assert!(err.problems[0].message.contains("listed twice"));
        // No [store], no [[agent]].
        let err = RelayConfig::parse(Path::new("r.toml"), "[relay]\nlisten = \"127.0.0.1:1\"\n")
            .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"store") && keys.contains(&"agent") && keys.contains(&"relay.cert_file"),
            "{keys:?}"
        );
    }

    #[test]
    fn quic_destination_needs_its_ca_and_refuses_s3_keys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let quic = format!(
            "[destination]\ntype = \"quic\"\nrelay = \"relay.example.org:4433\"\nca_file = \"{}\"\nprefix = \"fhir/dkfz/\"\n",
            ca.display()
        );
        let base = good(dir.path());
        let at = base.find("[destination]").unwrap();
        let text = format!("{}{quic}", &base[..at]);
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        let Destination::Relay(r) = &c.destination else {
            panic!("a relay destination")
        };
        assert_eq!(r.server_name, "relay.example.org");
        assert_eq!(c.destination.prefix(), "fhir/dkfz/");
        let text = format!(
            "{}{}bucket = \"b-c-d\"\n",
            &base[..at],
            quic.replace("relay.example.org:4433", "no-port")
        );
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["destination.relay", "destination.bucket"]);
    }

    #[test]
    fn good_config_validates_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let c = Config::parse(Path::new("t.toml"), &good(dir.path())).unwrap();
        assert_eq!(c.agent.part_size, 8 << 20);
        assert_eq!(c.agent.concurrency, 4);
        assert_eq!(c.sources[0].settle, Duration::from_secs(2));
        assert!(c.sources[0].selects(Path::new("a/b.ndjson")));
        assert!(!c.sources[0].selects(Path::new("a/b.tmp")));
        let Destination::S3(d) = &c.destination else {
            panic!("an S3 destination")
        };
        assert_eq!(d.prefix, "fhir/");
        assert!(d.path_style);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let p = problems("[agent]\njournal = \"/j.db\"\nconcurency = 3\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].line, 3);
        assert_eq!(p[0].key, "agent.concurency");
        assert!(p[0].message.contains("unknown field"), "{}", p[0].message);
    }

    #[test]
    fn wrong_type_names_dotted_key() {
        let p = problems("[agent]\njournal = 5\n");
        assert_eq!(p[0].line, 2);
        assert_eq!(p[0].key, "agent.journal");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let text = good(dir.path())
            .replace("journal.db\"", "journal.db\"\npart_size = \"1MiB\"")
            .replace("settle = \"2s\"", "settle = \"soon\"")
            .replace("fhir-bucket", "Bad_Bucket");
        let p = problems(&text);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["agent.part_size", "source[0].settle", "destination.bucket"],
            "{p:?}"
        );
        assert_eq!(p[0].line, 4);
    }

    #[test]
    fn relative_paths_and_overlaps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("in/sub")).unwrap();
        let text = good(dir.path()).replace(
            &format!("journal = \"{}/journal.db\"", dir.path().display()),
            "journal = \"journal.db\"",
        ) + &format!(
            "\n[[source]]\nname = \"sub\"\ntype = \"fs\"\npath = \"{}/in/sub\"\n",
            dir.path().display()
        );
        // [[source]] after [destination] is valid TOML; the second source overlaps the first.
        let p = problems(&text);
        assert!(p.iter().any(|p| p.key == "agent.journal"), "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.key == "source[1].path" && p.message.contains("overlap")),
            "{p:?}"
        );
    }

    #[test]
    fn documented_example_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../examples/ha-edge.toml")
            .replace("/srv/exports/fhir", &dir.path().display().to_string());
        let c = Config::parse(Path::new("examples/ha-edge.toml"), &text).unwrap();
        let Destination::S3(d) = &c.destination else {
            panic!("an S3 destination")
        };
        assert_eq!(d.sse, Some(Sse::Aes256));
        assert_eq!(c.sources[0].after_upload, AfterUpload::Keep);
        assert_eq!(c.agent.multipart_threshold, 16 << 20);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size(&toml::Value::String("8MiB".into())), Ok(8 << 20));
        assert_eq!(
            parse_size(&toml::Value::String("5 MiB".into())),
            Ok(5 << 20)
        );
        assert_eq!(parse_size(&toml::Value::Integer(1024)), Ok(1024));
        assert!(parse_size(&toml::Value::String("lots".into())).is_err());
        assert_eq!(
            parse_duration(&toml::Value::String("1m 30s".into())),
            Ok(Duration::from_secs(90))
        );
        assert!(parse_duration(&toml::Value::Boolean(true)).is_err());
    }

    #[test]
    fn bucket_names() {
        assert!(check_bucket_name("healthalliance-fhir").is_ok());
        assert!(check_bucket_name("ab").is_err());
        assert!(check_bucket_name("-abc").is_err());
        assert!(check_bucket_name("ABC").is_err());
    }

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }
}
