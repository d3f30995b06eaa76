//! Configuration: one TOML file, read in two phases.
//!
//! Phase one deserializes into `Raw*` structs (serde, `deny_unknown_fields`) so that a typo or a
//! wrong type is reported with the file, line and dotted key. Phase two validates every value into
//! typed fields (sizes, durations, paths, globs) and collects *every* problem before reporting, so
//! an operator fixes a file in one pass. `ha-edge validate` and `ha-edge run` share this code.
//!
//! Secrets never live here: the destination's credentials come from the environment, systemd
//! credentials or an AWS shared credentials file (see `s3::credentials`).
//!
//! This module holds what both files share (problems, the validator's value checks, sizes and
//! durations); `agent` reads the agent's file with its `source` and `destination` tables, and
//! `relay` the relay's.
//!
//! Must not break: phase two collects every problem before failing, and nothing is acted on from a
//! file with any problem.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::glob::{Glob, GlobSet};
use toml::Spanned;

/// The agent's file and `[agent]`.
mod agent;
/// `[destination]`.
mod destination;
/// The relay's file.
mod relay;
/// `[[source]]`.
mod source;
#[cfg(test)]
mod tests;
/// `validate`, `max_line`, `on_invalid`, `quarantine_dir`.
mod validation;

pub use agent::{resolve_lenient, AgentConfig, Config, LogFormat};
#[cfg(test)]
pub use destination::MetaRules;
pub use destination::{
    Checksum, Congestion, Destination, Overwrite, RelayDestination, S3Destination, Sse,
};
pub use relay::{AgentAuth, RelayConfig, StoreConfig};
pub use source::{AfterUpload, Completion, OnChange, SourceConfig, SourceKind, WatchMode};

/// S3 limits on multipart parts.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3 allows at most 10,000 parts per upload.
pub const MAX_PARTS: u64 = 10_000;

/// One problem in a config file, located to a line and a dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based line of the value (or of the table).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The dotted key (`source[1].settle`).
    pub key: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

/// All problems found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file read.
    pub file: PathBuf,
    /// Every problem found, in file order.
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

/// Deserializes the file into `T`, reporting every key that is unknown or of the wrong type,
/// not just the first: each offending key is reported, taken out, and the rest is read again
/// (at most once per key in the file). A syntax error stops at once: nothing after it can be
/// trusted.
fn parse_raw_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<ConfigProblem>> {
    use toml::de::DeTable;
    let mut table = DeTable::parse(text).map_err(|e| vec![toml_problem(text, "", &e)])?;
    let mut problems = Vec::new();
    loop {
        let de = toml::de::Deserializer::from(table.clone());
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) if problems.is_empty() => return Ok(v),
            Ok(_) => return Err(problems),
            Err(e) => {
                // Spanned<T> shows up as a private path segment; drop it.
                let segments: Vec<serde_path_to_error::Segment> = e
                    .path()
                    .iter()
                    .filter(|s| !matches!(s, serde_path_to_error::Segment::Map { key } if key.starts_with("$__serde_spanned")))
                    .cloned()
                    .collect();
                let key = e
                    .path()
                    .to_string()
                    .split('.')
                    .filter(|s| !s.starts_with("$__serde_spanned"))
                    .collect::<Vec<_>>()
                    .join(".");
                let key = if key.is_empty() { String::new() } else { key };
                problems.push(toml_problem(text, &key, e.inner()));
                if !remove_at(table.get_mut(), &segments) || problems.len() > 200 {
                    return Err(problems);
                }
            }
        }
    }
}

/// Removes the value at `path` from a parsed file; false if there is none (then nothing more
/// can be learnt by reading again).
fn remove_at(table: &mut toml::de::DeTable<'_>, path: &[serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let Segment::Map { key } = first else {
        return false;
    };
    if rest.is_empty() {
        return table.remove(key.as_str()).is_some();
    }
    let Some((_, value)) = table.iter_mut().find(|(k, _)| k.get_ref() == key) else {
        return false;
    };
    remove_in_value(value.get_mut(), rest)
}

fn remove_in_value(
    value: &mut toml::de::DeValue<'_>,
    path: &[serde_path_to_error::Segment],
) -> bool {
    use serde_path_to_error::Segment;
    use toml::de::DeValue;
    match (value, path.first()) {
        // Arrays of tables: step into the element.
        (DeValue::Array(items), Some(Segment::Seq { index })) => match items.get_mut(*index) {
            Some(item) => remove_in_value(item.get_mut(), &path[1..]),
            None => false,
        },
        (DeValue::Table(t), Some(_)) => remove_at(t, path),
        _ => false,
    }
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

    fn endpoint_url(&mut self, e: &Spanned<String>, key: &str) -> Option<reqwest::Url> {
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
    fn readable_file(&mut self, c: &Spanned<String>, key: &str, absolute: bool) -> PathBuf {
        let p = PathBuf::from(c.get_ref());
        if absolute && !p.is_absolute() {
            self.problem(c.span(), key, "must be an absolute path");
        } else if let Err(e) = std::fs::File::open(&p) {
            self.problem(c.span(), key, format!("cannot read {}: {e}", p.display()));
        }
        p
    }

    /// An integer between `min` and `max` (both fit `T`), or `default` (and a problem).
    fn int_in<T: TryFrom<i64>>(
        &mut self,
        v: Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: T,
    ) -> T {
        let Some(v) = v else { return default };
        match T::try_from(*v.get_ref()) {
            Ok(n) if (min..=max).contains(v.get_ref()) => n,
            _ => {
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
        let mut set = Vec::new();
        for g in globs.into_inner() {
            match Glob::new(g.get_ref()) {
                Ok(glob) => set.push(glob),
                Err(e) => self.problem(g.span(), key, format!("bad glob {:?}: {e}", g.get_ref())),
            }
        }
        GlobSet::new(set)
    }
}

/// Whether a log filter is one an operator meant: every directive is a level (`info`) or
/// `target=level`, with level one of trace, debug, info, warn, error, off. tracing's own parser
/// takes any bare word as a target name, so `warning` would silence every log line.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.iter().any(|v| v.eq_ignore_ascii_case(l.trim()));
    if filter.trim().is_empty() {
        return Err("is empty".into());
    }
    for d in filter.split(',') {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !is_level(level) {
            return Err(format!(
                "{:?} is not a log level (use one of trace, debug, info, warn, error, off, or target=level such as \"ha_edge=debug\")",
                d.trim()
            ));
        }
    }
    filter
        .parse::<tracing_subscriber::filter::Targets>()
        .map(drop)
        .map_err(|e| e.to_string())
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
/// Whether `[agent] log_paths = "keys"` (read leniently, like `journal_path`: for `status`).
pub fn keys_only(file: &Path) -> bool {
    agent_key(file, "log_paths").is_ok_and(|l| l.as_str() == Some("keys"))
}

/// One `[agent]` value, read leniently (no validation of the rest of the file): what `status`
/// and `lookup` need to find the journal and how to show paths, even beside a config the
/// daemon would refuse.
fn agent_key(file: &Path, key: &str) -> Result<toml::Value, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", file.display(), e.message()))?;
    table
        .get("agent")
        .and_then(|a| a.get(key))
        .cloned()
        .ok_or_else(|| format!("{}: agent.{key} is not set", file.display()))
}

pub fn journal_path(file: &Path) -> Result<PathBuf, String> {
    agent_key(file, "journal")?
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| format!("{}: agent.journal is not a string", file.display()))
}
