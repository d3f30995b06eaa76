//! `[[source]]` tables: directories and buckets to watch, when a file is complete, and what
//! happens to it after upload.
//!
//! # Keys
//! | key | `type = "dir"` | `type = "s3"` |
//! |---|---|---|
//! | `name` | required, unique | required, unique |
//! | `path` | the root (absolute, a directory) | - |
//! | `endpoint`, `region`, `bucket`, `prefix`, `path_style` | - | the bucket (`ONPREM_S3_*` fall-backs) |
//! | `profile`, `credentials_file`, `ca_file` | - | its keys and CA |
//! | `notifications` | - | MinIO's event stream as a latency hint |
//! | `include`, `exclude` | globs on the relative path | globs on the key below `prefix` |
//! | `settle`, `watch`, `rescan_interval` | completeness and discovery | - |
//! | `poll_interval` | polling mode | listing period |
//! | `complete_when` | settle, or a marker | - |
//! | `after_upload` | keep, delete, `{ move_to = dir }` | keep, delete, `{ move_to_prefix = p }` |
//! | `on_change` | upload a changed delivered file again, or ignore | same, for new object versions |
//! | `key_prefix` | under `destination.prefix` (`{source}` = name) | same |
//!
//! A key of the other type is a problem naming that key; so is anything that cannot be checked
//! (a pattern that does not compile, a move target inside the source).
//!
//! Must not break: two sources never map onto the same keys, and a path or pattern that cannot be
//! checked is a problem reported, never a default taken silently.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::glob::GlobSet;
use serde::Deserialize;
use toml::Spanned;

use super::*;

/// One `[[source]]` as written: keys of both kinds, checked against `type` in phase two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    /// The source's name (required, unique).
    pub(super) name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    /// `type = "dir"`: the root.
    pub(super) path: Option<Spanned<String>>,
    include: Option<Spanned<Vec<Spanned<String>>>>,
    exclude: Option<Spanned<Vec<Spanned<String>>>>,
    /// Dispatch priority: higher first (default 0).
    priority: Option<Spanned<i64>>,
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
    /// `type = "s3"`: the key prefix listed.
    pub(super) prefix: Option<Spanned<String>>,
    path_style: Option<Spanned<bool>>,
    profile: Option<Spanned<String>>,
    credentials_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    /// MinIO's ListenBucketNotification stream as a latency hint (the listing stays the truth).
    notifications: Option<Spanned<bool>>,
    /// Put this source's keys under `destination.prefix` + this (`{source}` is the source's
    /// name), so sources with the same relative names never share a key.
    pub(super) key_prefix: Option<Spanned<String>>,
    /// Record checks: `"fhir-ndjson"`, `"dicom"`, `"none"` or `[{ include, as }]`.
    validate: Option<Spanned<toml::Value>>,
    /// The longest NDJSON line accepted (default 16MiB).
    max_line: Option<Spanned<toml::Value>>,
    /// `"quarantine"` (default) or `"upload-flagged"`.
    on_invalid: Option<Spanned<String>>,
    /// Directory sources: where quarantined files are moved (else left in place).
    quarantine_dir: Option<Spanned<String>>,
    /// The key of each file, e.g. `"{source}/{date:%Y/%m/%d}/{hmac:dir}/{name}"` (default: the
    /// relative path).
    key_template: Option<Spanned<String>>,
}

/// What happens to a source once its delivery is committed and verified.
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
    /// Study directories (`depth` levels below the root) are complete when nothing in them
    /// changed for `quiet` (and, with a marker template such as `{dir}.done`, the marker next
    /// to the directory exists); then all their files are released together. Files above that
    /// depth settle one by one, with `quiet` as their settle time.
    StableDir {
        quiet: Duration,
        depth: usize,
        /// The marker's name around the directory's name (`{dir}.done`: "", ".done").
        marker: Option<(String, String)>,
    },
}

impl Completion {
    /// The marker that completes `file_name`, if markers are used.
    pub fn marker_for(&self, file_name: &str) -> Option<String> {
        match self {
            Completion::Settle | Completion::StableDir { .. } => None,
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
            Completion::StableDir {
                marker: Some((prefix, suffix)),
                ..
            } => {
                file_name.len() > prefix.len() + suffix.len()
                    && file_name.starts_with(prefix.as_str())
                    && file_name.ends_with(suffix.as_str())
            }
            Completion::StableDir { marker: None, .. } => false,
        }
    }

    /// With `stable_dir`: the study directory a path lies in (its first `depth` components),
    /// if it lies below that depth.
    pub fn study_of(&self, rel: &Path) -> Option<PathBuf> {
        let Completion::StableDir { depth, .. } = self else {
            return None;
        };
        let comps: Vec<_> = rel.components().collect();
        (comps.len() > *depth).then(|| comps[..*depth].iter().collect())
    }
}

/// One `[[source]]`, validated.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Its name: in logs, `status`, the journal and `{source}` in key prefixes.
    pub name: String,
    /// A directory, or a bucket.
    pub kind: SourceKind,
    /// The root of a directory source (empty for a bucket source).
    pub path: PathBuf,
    /// Only paths matching these (all, if None).
    pub include: Option<GlobSet>,
    /// Never paths matching these.
    pub exclude: GlobSet,
    /// How long a file must be unchanged (or old) to be complete.
    pub settle: Duration,
    /// How often the whole tree is walked (the truth; events are a hint).
    pub rescan_interval: Duration,
    /// Keep, delete, or move a delivered source.
    pub after_upload: AfterUpload,
    /// inotify, polling, or chosen by filesystem type.
    pub watch: WatchMode,
    /// How often to look in polling mode (and how often a bucket is listed).
    pub poll_interval: Duration,
    /// Whether a delivered file that changes is sent again.
    pub on_change: OnChange,
    /// When a file is complete: settled, or its marker is there.
    pub complete_when: Completion,
    /// Bucket sources: listen to MinIO's bucket notifications between listings.
    pub notifications: bool,
    /// This source's part of the destination key space, after `destination.prefix` (`{source}`
    /// already replaced by the name). Empty by default.
    pub key_prefix: String,
    /// Where `key_prefix` was written, for problems found once the whole file is read.
    pub(super) key_prefix_span: Option<Range<usize>>,
    /// Higher goes first; within one priority, oldest first.
    pub priority: i64,
    /// Keys under this prefix are refused (the receipt batches live there), if set.
    pub reserved_prefix: Option<String>,
    /// Record checks before a file is sent.
    pub validation: crate::validate::Rules,
    /// How a relative path becomes a key (None: the path itself).
    pub key_template: Option<crate::phi::Template>,
}

impl SourceConfig {
    /// Whether this source is a directory (not a bucket).
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

impl Validator<'_> {
    /// Phase two of one `[[source]]`.
    pub(super) fn source(
        &mut self,
        i: usize,
        mut s: RawSource,
        span: Range<usize>,
    ) -> Option<SourceConfig> {
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
        /// Keys given that do not belong to the source's type, with where they are.
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
            self.source_path(i, s.path.take(), span)
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
        let raw = super::validation::RawValidation {
            validate: s.validate.take(),
            max_line: s.max_line.take(),
            on_invalid: s.on_invalid.take(),
            quarantine_dir: s.quarantine_dir.take(),
        };
        let validation = self.validation(i, raw, path.as_deref(), is_bucket);
        let key_template = s.key_template.take().and_then(|t| {
            match crate::phi::Template::parse(t.get_ref()) {
                Ok(tpl) if is_bucket && tpl.uses_sha256() => {
                    self.problem(t.span(), &at("key_template"), "{sha256} needs a directory source (a bucket object's key is fixed before it is read)");
                    None
                }
                Ok(tpl) => Some(tpl),
                Err(why) => {
                    self.problem(t.span(), &at("key_template"), why);
                    None
                }
            }
        });
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
            validation,
            key_template,
        )
    }

    /// A directory source's root: absolute, existing, a directory.
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

    /// The settings both kinds share: patterns, timing, after_upload, completion.
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
        validation: crate::validate::Rules,
        key_template: Option<crate::phi::Template>,
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
            Some(v)
                if v.get_ref()
                    .as_table()
                    .is_some_and(|t| t.contains_key("stable_dir")) =>
            {
                self.stable_dir(i, v)
            }
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
        let key_prefix_span = s.key_prefix.as_ref().map(Spanned::span);
        let priority = self.int_in(s.priority, &at("priority"), -1000, 1000, 0i64);
        let key_prefix = match (s.key_prefix, &name) {
            (Some(p), Some(n)) => {
                let span = p.span();
                let expanded = p.get_ref().replace("{source}", n);
                self.key_prefix(Spanned::new(span, expanded), &at("key_prefix"))
            }
            _ => String::new(),
        };
        Some(SourceConfig {
            key_prefix,
            key_prefix_span,
            priority,
            reserved_prefix: None,
            validation,
            key_template,
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

    /// `complete_when = { stable_dir = "60s", marker = "{dir}.done", depth = 1 }`.
    fn stable_dir(&mut self, i: usize, v: Spanned<toml::Value>) -> Completion {
        let key = format!("source[{i}].complete_when");
        let sp = v.span();
        let t = v.into_inner();
        let t = t.as_table().cloned().unwrap_or_default();
        for k in t.keys() {
            if !["stable_dir", "marker", "depth"].contains(&k.as_str()) {
                self.problem(
                    sp.clone(),
                    &format!("{key}.{k}"),
                    "unknown key (stable_dir takes stable_dir, marker and depth)",
                );
            }
        }
        let quiet = self.duration(
            t.get("stable_dir")
                .cloned()
                .map(|d| Spanned::new(sp.clone(), d)),
            &format!("{key}.stable_dir"),
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let depth = match t.get("depth") {
            None => 1,
            Some(toml::Value::Integer(n)) if (1..=8).contains(n) => {
                usize::try_from(*n).unwrap_or(1)
            }
            Some(other) => {
                self.problem(
                    sp.clone(),
                    &format!("{key}.depth"),
                    format!("must be 1 to 8 (the directory level below the root that is one study), got {other}"),
                );
                1
            }
        };
        let marker = match t.get("marker") {
            None => None,
            Some(toml::Value::String(m)) => match m.split_once("{dir}") {
                Some((p, s)) if !(m.contains('/') || p.is_empty() && s.is_empty()) => {
                    Some((p.to_string(), s.to_string()))
                }
                _ => {
                    self.problem(
                        sp,
                        &format!("{key}.marker"),
                        "must be a file name around {dir}, e.g. \"{dir}.done\" (it sits next to the study directory)",
                    );
                    None
                }
            },
            Some(other) => {
                self.problem(
                    sp,
                    &format!("{key}.marker"),
                    format!("must be a string such as \"{{dir}}.done\", got {other}"),
                );
                None
            }
        };
        Completion::StableDir {
            quiet,
            depth,
            marker,
        }
    }

    /// `after_upload`: keep, delete, or a move target that is not inside the source.
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
            Some(e) => self.endpoint_url(&e, &at("endpoint")),
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
            .map(|c| self.readable_file(&c, &at("credentials_file"), true));
        let ca_file = s
            .ca_file
            .take()
            .map(|c| self.readable_file(&c, &at("ca_file"), false));
        let conn = S3Destination {
            overwrite: Overwrite::Own,
            checksum: super::destination::Checksum::Crc64Nvme,
            object_meta: super::destination::MetaRules::default(),
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

    /// Problems are reported at the later of two clashing sources.
    pub(super) fn check_sources_apart(
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

    /// Two sources must never be able to produce the same destination key: then one source's
    /// file would replace the other's object (and, with after_upload, both sources would be
    /// deleted while only one copy exists). Their key spaces are `key_prefix` + relative path,
    /// so they are apart only if neither key prefix is a prefix of the other.
    pub(super) fn check_key_spaces_apart(
        &mut self,
        sources: &[SourceConfig],
        places: &[(usize, Range<usize>, Range<usize>)],
        destination_prefix: &str,
    ) {
        for (i, a) in sources.iter().enumerate() {
            for (j, b) in sources.iter().enumerate().skip(i + 1) {
                let space = |s: &SourceConfig| {
                    let fixed = s
                        .key_template
                        .as_ref()
                        .map_or(String::new(), |t| t.fixed_prefix(&s.name));
                    format!("{}{fixed}", s.key_prefix)
                };
                let (pa, pb) = (&space(a), &space(b));
                if !(pa.starts_with(pb.as_str()) || pb.starts_with(pa.as_str())) {
                    continue;
                }
                let (idx, name_span, _) = places[j].clone();
                let span = b.key_prefix_span.clone().unwrap_or(name_span);
                self.problem(
                    span,
                    &format!("source[{idx}].key_prefix"),
                    format!(
                        "sources {:?} and {:?} both send to keys under {:?}: two files with the same relative path would be one object, and one would overwrite the other. Give each source its own key space, e.g. key_prefix = \"{{source}}/\" in every [[source]], or distinct key_prefix values that are not prefixes of each other",
                        a.name,
                        b.name,
                        format!("{destination_prefix}{}", if pa.len() < pb.len() { pa } else { pb }),
                    ),
                );
            }
        }
    }
}
