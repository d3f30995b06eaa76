//! The agent's file (`/etc/ha-edge/ha-edge.toml`): its `[agent]` table, and the whole file put
//! together.
//!
//! Must not break: every problem in the file is reported at once, with file, line and key.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::destination::RawDestination;
use super::source::RawSource;
use super::*;

// ---------------------------------------------------------------------------------------------
// Phase one: the file as written.

/// The agent's file as written (phase one: serde, unknown keys refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<Spanned<RawAgent>>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    destination: Option<Spanned<RawDestination>>,
    receipts: Option<Spanned<RawReceipts>>,
}

/// `[receipts]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReceipts {
    /// Key prefix of the receipt batches in the destination bucket, e.g. "_receipts/".
    prefix: Option<Spanned<String>>,
    /// How often a batch is cut, e.g. "5m".
    every: Option<Spanned<toml::Value>>,
}

/// `[agent]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    /// SQLite journal file; must be an absolute path on local disk.
    journal: Option<Spanned<String>>,
    /// Objects transferred at the same time.
    concurrency: Option<Spanned<i64>>,
    /// Objects below `multipart_threshold` transferred at the same time (besides
    /// `concurrency`), within the same memory budget.
    small_objects_in_flight: Option<Spanned<i64>>,
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
    /// This agent's name in receipts (default: the host name).
    name: Option<Spanned<String>>,
    /// How long receipts are kept in the journal (default: forever).
    receipts_keep: Option<Spanned<toml::Value>>,
    /// `"full"` (default) or `"keys"`: with keys, no output names a source path.
    log_paths: Option<Spanned<String>>,
    /// The pseudonymisation key for `{hmac:…}`, when not in `$CREDENTIALS_DIRECTORY`.
    pseudonym_key_file: Option<Spanned<String>>,
    /// Address of the metrics endpoint (`/metrics`, `/healthz`, `/readyz`); off if unset.
    metrics: Option<Spanned<String>>,
    /// The bandwidth limit for object data, e.g. "40Mbit" ("off": none, "0": paused).
    bandwidth: Option<Spanned<toml::Value>>,
    /// Windows of local time with their own limit; the first that holds wins.
    bandwidth_schedule: Option<Vec<Spanned<RawWindow>>>,
}

/// One `bandwidth_schedule` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    rate: Option<Spanned<toml::Value>>,
}

// ---------------------------------------------------------------------------------------------
// Phase two: validated, typed values.

/// The agent's whole file, validated: what `ha-edge run` works from.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[agent]`: the journal, concurrency, part sizes, retries, logging.
    pub agent: AgentConfig,
    /// `[[source]]`: where objects come from (at least one; key spaces apart).
    pub sources: Vec<SourceConfig>,
    /// `[destination]`: an S3 bucket or a QUIC relay.
    pub destination: Destination,
    /// `[receipts]`: receipt batches in the bucket, if set.
    pub receipts: Option<ReceiptsConfig>,
}

/// `[receipts]`: batches of receipts uploaded to the destination bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptsConfig {
    /// Key prefix (default `_receipts/`), outside every source's key space.
    pub prefix: String,
    /// How often a batch is cut (default 5 minutes).
    pub every: Duration,
}

/// The `[agent]` table.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The journal file (default `/var/lib/ha-edge/journal.db`).
    pub journal: PathBuf,
    /// Objects in transfer at once.
    pub concurrency: usize,
    /// Objects below `multipart_threshold` in transfer at once, besides `concurrency`: small
    /// objects are bounded by their bytes (the shared memory budget), so that a link with a long
    /// round trip is not idle between PUTs.
    pub small_objects_in_flight: usize,
    /// Parts in memory at once, across all objects: with `part_size`, the memory bound.
    pub parts_in_flight: usize,
    /// Multipart part size (raised per object to stay within 10,000 parts).
    pub part_size: u64,
    /// Objects this large or larger go multipart; smaller ones in one PUT.
    pub multipart_threshold: u64,
    /// Retries of one request on a transient failure.
    pub max_retries: u32,
    /// The bound on one request (and on the QUIC idle timeout).
    pub request_timeout: Duration,
    /// How long a stop lets parts in flight finish.
    pub shutdown_grace: Duration,
    /// Text or JSON lines.
    pub log_format: LogFormat,
    /// A tracing filter (`info`, or `info,ha_edge::sink=debug`).
    pub log_level: String,
    /// This agent's name in receipts and their keys.
    pub name: String,
    /// How long receipts are kept (None: forever).
    pub receipts_keep: Option<Duration>,
    /// `log_paths = "keys"`: logs, errors, status and metrics carry keys, never source paths.
    pub keys_only: bool,
    /// Where the pseudonymisation key is read from when not in the credentials directory.
    pub pseudonym_key_file: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: off).
    pub metrics: Option<std::net::SocketAddr>,
    /// The bandwidth limit and its timetable.
    pub bandwidth: crate::bandwidth::Schedule,
}

/// How log lines are written (stderr, for journald).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
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

    /// Parses and validates `text` as the file `file`, with `env` standing in for the process
    /// environment (tests).
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
            Err(problems) => {
                return Err(ConfigError {
                    file: file.to_path_buf(),
                    problems,
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

/// Phase one: every syntax, type and unknown-key problem at once (each offending key is removed
/// and the rest parsed again).
fn parse_raw(text: &str) -> Result<RawConfig, Vec<ConfigProblem>> {
    parse_raw_as(text)
}

/// The host name (the default agent name), made safe for keys; `ha-edge` if there is none.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if name.is_empty() {
        "ha-edge".into()
    } else {
        name
    }
}

impl Validator<'_> {
    /// A rate as written: a string (`"40Mbit"`, `"off"`) or the number 0.
    fn rate(&mut self, v: &Spanned<toml::Value>, key: &str) -> crate::bandwidth::Rate {
        let text = match v.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            other => other.to_string(),
        };
        match crate::bandwidth::schedule::parse_rate(&text) {
            Ok(r) => r,
            Err(e) => {
                self.problem(v.span(), key, e);
                crate::bandwidth::Rate::Unlimited
            }
        }
    }

    /// `bandwidth` and `bandwidth_schedule`.
    fn bandwidth(
        &mut self,
        default: Option<Spanned<toml::Value>>,
        windows: Option<Vec<Spanned<RawWindow>>>,
    ) -> crate::bandwidth::Schedule {
        use crate::bandwidth::schedule::{parse_clock, parse_days, Window};
        let default = default.map_or(crate::bandwidth::Rate::Unlimited, |v| {
            self.rate(&v, "agent.bandwidth")
        });
        let mut out = Vec::new();
        for (i, w) in windows.unwrap_or_default().into_iter().enumerate() {
            let span = w.span();
            let w = w.into_inner();
            let at = |k: &str| format!("agent.bandwidth_schedule[{i}].{k}");
            let days = match w.days {
                None => [true; 7],
                Some(d) => parse_days(d.get_ref()).unwrap_or_else(|e| {
                    self.problem(d.span(), &at("days"), e);
                    [true; 7]
                }),
            };
            let mut clock = |v: Option<Spanned<String>>, k: &str, default: u16| match v {
                None => default,
                Some(c) => parse_clock(c.get_ref()).unwrap_or_else(|e| {
                    self.problem(c.span(), &at(k), e);
                    default
                }),
            };
            let from = clock(w.from, "from", 0);
            let to = clock(w.to, "to", 24 * 60);
            let rate = match w.rate {
                Some(r) => self.rate(&r, &at("rate")),
                None => {
                    self.problem(
                        span,
                        &at("rate"),
                        "missing (e.g. rate = \"10Mbit\", \"off\" or \"0\")",
                    );
                    crate::bandwidth::Rate::Unlimited
                }
            };
            out.push(Window {
                days,
                from,
                to,
                rate,
            });
        }
        crate::bandwidth::Schedule {
            default,
            windows: out,
        }
    }

    /// Phase two of `[receipts]`.
    fn receipts(&mut self, r: RawReceipts, _span: Range<usize>) -> ReceiptsConfig {
        let prefix = match r.prefix {
            None => "_receipts/".to_string(),
            Some(p) => {
                let v = p.get_ref();
                if v.is_empty() || !v.ends_with('/') || v.starts_with('/') || v.contains("..") {
                    self.problem(
                        p.span(),
                        "receipts.prefix",
                        format!(
                            "must be a key prefix ending in '/', e.g. \"_receipts/\", got {v:?}"
                        ),
                    );
                }
                p.into_inner()
            }
        };
        let every = self.duration(
            r.every,
            "receipts.every",
            Duration::from_secs(1),
            Duration::from_secs(300),
        );
        ReceiptsConfig { prefix, every }
    }
}

impl AgentConfig {
    /// Whether the journal lies inside a directory source, compared on resolved paths (`..`
    /// and symlinks, in the journal's path or the source's, resolved first).
    fn journal_inside_any(&self, sources: &[SourceConfig]) -> bool {
        let journal = resolve_lenient(&self.journal);
        sources
            .iter()
            .any(|s| s.is_dir() && journal.starts_with(resolve_lenient(&s.path)))
    }
}

/// The path with symlinks and `..` resolved as far as it exists, and the rest (not yet
/// created) appended lexically, with `.` and `..` applied.
pub fn resolve_lenient(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for c in rest.iter().rev() {
                match Path::new(c).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    Some(_) => out.push(c),
                }
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => {
                // `..` as the last component, or the root: resolve it lexically.
                match existing.components().next_back() {
                    Some(Component::ParentDir) => {
                        rest.push("..".into());
                        existing.pop();
                    }
                    _ => return path.to_path_buf(),
                }
            }
        }
    }
}

impl Validator<'_> {
    /// Phase two of the whole file, and the checks across tables (sources' key spaces, the journal
    /// outside the sources).
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
        self.check_key_spaces_apart(
            &sources,
            &places,
            destination.as_ref().map_or("", Destination::prefix),
        );
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
        if let Some((idx, span)) = sources
            .iter()
            .zip(&places)
            .find(|(s, _)| {
                s.key_template
                    .as_ref()
                    .is_some_and(crate::phi::Template::uses_hmac)
            })
            .map(|(_, (idx, name_span, _))| (*idx, name_span.clone()))
        {
            let creds = (self.env)("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            let file = agent.as_ref().and_then(|a| a.pseudonym_key_file.clone());
            if let Err(why) = crate::phi::read_pseudonym_key(creds.as_deref(), file.as_deref()) {
                self.problem(
                    span,
                    &format!("source[{idx}].key_template"),
                    format!("{{hmac:…}} needs the site's pseudonymisation key: {why}"),
                );
            }
        }
        for (s, (idx, name_span, _)) in sources.iter().zip(&places) {
            if !matches!(s.complete_when, crate::config::Completion::StableDir { .. }) {
                continue;
            }
            if matches!(destination, Some(Destination::Relay(_))) {
                self.problem(
                    name_span.clone(),
                    &format!("source[{idx}].complete_when"),
                    "stable_dir writes {dir}/_complete.json to the bucket, which needs an S3 destination",
                );
            }
            if s.key_template
                .as_ref()
                .is_some_and(crate::phi::Template::uses_sha256)
            {
                self.problem(
                    name_span.clone(),
                    &format!("source[{idx}].key_template"),
                    "{sha256} cannot name a study's completion object; with stable_dir use {dir} or {hmac:dir}",
                );
            }
        }
        if matches!(destination, Some(Destination::Relay(_))) {
            for (s, (idx, name_span, _)) in sources.iter().zip(&places) {
                if s.validation.on_invalid == crate::validate::OnInvalid::UploadFlagged {
                    self.problem(
                        name_span.clone(),
                        &format!("source[{idx}].on_invalid"),
                        "\"upload-flagged\" tags the object in S3; a relay destination cannot tag it (use \"quarantine\")",
                    );
                }
            }
        }
        let receipts = raw.receipts.map(|r| {
            let span = r.span();
            self.receipts(r.into_inner(), span)
        });
        if let (Some(r), Some(d)) = (&receipts, &destination) {
            if !matches!(d, Destination::S3(_)) {
                self.problem(
                    0..0,
                    "receipts",
                    "receipt batches go to an S3 bucket; with a relay destination, leave [receipts] out (receipts stay in the journal: `ha-edge receipts`)",
                );
            }
            // Batches go under the bucket's root, not under the destination prefix. A source
            // whose keys could fall there refuses those keys (visibly, as any other refused
            // name), so a file can never overwrite a batch.
            for s in &mut sources {
                let space = format!("{}{}", d.prefix(), s.key_prefix);
                if r.prefix.starts_with(&space) || space.starts_with(&r.prefix) {
                    s.reserved_prefix = Some(r.prefix.clone());
                }
            }
        }
        Some(Config {
            agent: agent?,
            sources,
            destination: destination?,
            receipts,
        })
    }

    /// Phase two of `[agent]`.
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
                    span,
                    "agent.journal",
                    "missing (the SQLite journal file, e.g. \"/var/lib/ha-edge/journal.db\")",
                );
                None
            }
        };
        let concurrency = self.int_in(a.concurrency, "agent.concurrency", 1, 256, 4usize);
        let small_objects_in_flight = self.int_in(
            a.small_objects_in_flight,
            "agent.small_objects_in_flight",
            1,
            1024,
            32usize,
        );
        let parts_in_flight =
            self.int_in(a.parts_in_flight, "agent.parts_in_flight", 1, 256, 4usize);
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
        let max_retries = self.int_in(a.max_retries, "agent.max_retries", 0, 100, 6u32);
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
                if let Err(why) = check_log_filter(l.get_ref()) {
                    self.problem(
                        l.span(),
                        "agent.log_level",
                        format!("not a log filter: {:?}: {why}", l.get_ref()),
                    );
                }
                l.into_inner()
            }
        };
        let name = match a.name {
            None => host_name(),
            Some(n) => {
                let ok = !n.get_ref().is_empty()
                    && n.get_ref().len() <= 63
                    && n.get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    self.problem(
                        n.span(),
                        "agent.name",
                        format!(
                            "must be 1 to 63 letters, digits, '-', '_' or '.', got {:?} (it is part of receipt keys)",
                            n.get_ref()
                        ),
                    );
                }
                n.into_inner()
            }
        };
        let receipts_keep = a.receipts_keep.map(|k| {
            self.duration(
                Some(k),
                "agent.receipts_keep",
                Duration::from_secs(86_400),
                Duration::MAX,
            )
        });
        let metrics = a.metrics.and_then(|m| match m.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    m.span(),
                    "agent.metrics",
                    format!(
                        "must be an address and port, e.g. \"127.0.0.1:9464\", got {:?}",
                        m.get_ref()
                    ),
                );
                None
            }
        });
        let bandwidth = self.bandwidth(a.bandwidth, a.bandwidth_schedule);
        let keys_only = match a.log_paths {
            None => false,
            Some(l) => match l.get_ref().as_str() {
                "full" => false,
                "keys" => true,
                other => {
                    self.problem(
                        l.span(),
                        "agent.log_paths",
                        format!("must be \"full\" or \"keys\", got {other:?}"),
                    );
                    false
                }
            },
        };
        let pseudonym_key_file = a
            .pseudonym_key_file
            .map(|f| self.readable_file(&f, "agent.pseudonym_key_file", true));
        Some(AgentConfig {
            keys_only,
            pseudonym_key_file,
            journal: journal?,
            name,
            metrics,
            bandwidth,
            receipts_keep,
            concurrency,
            small_objects_in_flight,
            parts_in_flight,
            part_size,
            multipart_threshold,
            max_retries,
            request_timeout,
            shutdown_grace,
            log_format,
            log_level,
        })
    }
}
