//! Record validation before anything leaves: FHIR Bulk Data NDJSON and DICOM Part 10.
//!
//! # Design
//! - The checks are pure and streaming (`fhir::NdjsonCheck` is fed chunks, `dicom::check` the
//!   head of a file); `check_source` drives them over one pinned source version (a file read
//!   in order on a blocking thread, a bucket object by ranged GETs pinned to its ETag, within
//!   the memory budget), so what is checked is exactly the version that is then sent.
//! - The scheduler runs it on a `pending` row before its first byte is sent. A file that fails
//!   becomes `quarantined` (or, with `on_invalid = "upload-flagged"`, is sent with a tag); a
//!   new version of it is a new row and is checked again.
//!
//! Must not break: a reason (`Invalid`) never carries record content, so it may be logged,
//! journaled and shown in `status`.

pub mod cli;
pub mod dicom;
pub mod fhir;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::sink::read::{blocking, check_pinned, Budget, Pinned, Stop};

/// Which check a file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    FhirNdjson,
    Dicom,
    None,
}

impl Kind {
    /// As written in the config.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "fhir-ndjson" => Some(Kind::FhirNdjson),
            "dicom" => Some(Kind::Dicom),
            "none" => Some(Kind::None),
            _ => None,
        }
    }
}

/// What to do with a file that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInvalid {
    /// Not sent; journaled as `quarantined` (and moved to `quarantine_dir` if set).
    Quarantine,
    /// Sent with the tag `ha-edge-validation=failed`, for a cloud-side validator.
    UploadFlagged,
}

/// A source's validation settings: the first rule whose glob matches a path decides.
#[derive(Debug, Clone)]
pub struct Rules {
    pub rules: Vec<(Option<crate::glob::Glob>, Kind)>,
    /// The longest NDJSON line accepted (and the most memory one check holds).
    pub max_line: usize,
    pub on_invalid: OnInvalid,
    /// Where quarantined files are moved (directory sources), if set.
    pub quarantine_dir: Option<std::path::PathBuf>,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            rules: Vec::new(),
            max_line: 16 << 20,
            on_invalid: OnInvalid::Quarantine,
            quarantine_dir: None,
        }
    }
}

impl Rules {
    /// The check for a path relative to the source root. A Bulk Data manifest is checked by
    /// the manifest gate, never as NDJSON.
    pub fn for_path(&self, rel: &Path) -> Kind {
        let kind = self
            .rules
            .iter()
            .find(|(g, _)| g.as_ref().is_none_or(|g| g.is_match(rel)))
            .map_or(Kind::None, |(_, k)| *k);
        let is_manifest =
            rel.file_name().and_then(|n| n.to_str()) == Some(crate::source::fs::MANIFEST);
        if kind == Kind::FhirNdjson && is_manifest {
            Kind::None
        } else {
            kind
        }
    }
}

/// Why a file failed: the rule, where, and a reason without record content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub rule: &'static str,
    /// The 1-based line (NDJSON).
    pub line: Option<u64>,
    /// The byte offset of the line or element.
    pub offset: Option<u64>,
    pub reason: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rule)?;
        match (self.line, self.offset) {
            (Some(l), Some(o)) => write!(f, " line {l} (byte {o})")?,
            (Some(l), None) => write!(f, " line {l}")?,
            (None, Some(o)) => write!(f, " byte {o}")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.reason)
    }
}

/// What a valid file told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Valid {
    /// NDJSON: its resources.
    pub records: Option<u64>,
    /// DICOM: its syntax and UIDs.
    pub dicom: Option<dicom::DicomInfo>,
}

/// Read size of a check.
const CHUNK: u64 = 1 << 20;
/// Range size of a check over a bucket object.
const OBJECT_RANGE: u64 = 8 << 20;

/// A check in progress.
enum Progress {
    Ndjson(fhir::NdjsonCheck),
    Head(Vec<u8>),
}

impl Progress {
    /// Feeds bytes; false once the answer is known.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        match self {
            Progress::Ndjson(c) => {
                c.feed(bytes);
                !c.failed()
            }
            Progress::Head(h) => {
                h.extend_from_slice(bytes);
                true
            }
        }
    }

    fn finish(self) -> Result<Valid, Invalid> {
        match self {
            Progress::Ndjson(c) => c.finish().map(|n| Valid {
                records: Some(n),
                dicom: None,
            }),
            Progress::Head(h) => dicom::check(&h).map(|i| Valid {
                records: None,
                dicom: Some(i),
            }),
        }
    }
}

/// Checks one pinned source version of `size` bytes. The outer error is a read failure (the
/// source changed, vanished, or its server failed), handled like one of an upload.
pub async fn check_source(
    pinned: &Arc<Pinned>,
    size: u64,
    kind: Kind,
    expect: fhir::Expect,
    max_line: usize,
    budget: &Budget,
) -> Result<Result<Valid, Invalid>, Stop> {
    let (len, progress) = match kind {
        Kind::None => return Ok(Ok(Valid::default())),
        Kind::Dicom => (size.min(dicom::HEAD as u64), Progress::Head(Vec::new())),
        Kind::FhirNdjson => (
            size,
            Progress::Ndjson(fhir::NdjsonCheck::new(max_line, expect)),
        ),
    };
    let progress = match &**pinned {
        // A file: read and checked in order on one blocking thread, chunk by chunk.
        Pinned::File { .. } => {
            let _permit = budget.reserve(CHUNK.min(len.max(1))).await;
            let me = pinned.clone();
            blocking(move || {
                let Pinned::File {
                    file,
                    path,
                    fp,
                    ctime_ns,
                } = &*me
                else {
                    unreachable!("matched a file")
                };
                use std::os::unix::fs::FileExt;
                let mut progress = progress;
                let mut buf = vec![0u8; crate::sink::read::buffer_len(CHUNK.min(len))?];
                let mut off = 0u64;
                while off < len {
                    let n = usize::try_from((len - off).min(CHUNK)).unwrap_or(buf.len());
                    file.read_exact_at(&mut buf[..n], off)
                        .map_err(|source| Stop::Io {
                            path: path.clone(),
                            source,
                        })?;
                    off += n as u64;
                    if !progress.feed(&buf[..n]) {
                        break;
                    }
                }
                // What was checked is the version pinned (a writer cannot slip in between).
                check_pinned(file, path, fp, *ctime_ns)?;
                Ok(progress)
            })
            .await?
        }
        // An object: ranged GETs pinned to its ETag, each checked on a blocking thread.
        Pinned::Object { .. } => {
            let mut progress = progress;
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(OBJECT_RANGE);
                let _permit = budget.reserve(n).await;
                let bytes = pinned.fetch(off, n).await?;
                off += n;
                let (p, more) = blocking(move || {
                    let mut p = progress;
                    let more = p.feed(&bytes);
                    Ok((p, more))
                })
                .await?;
                progress = p;
                if !more {
                    break;
                }
            }
            progress
        }
    };
    Ok(progress.finish())
}
