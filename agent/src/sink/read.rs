//! Reading the bytes of one source version, for any destination: a file (checked against its
//! version before every read) or a bucket object (ranged GETs pinned to its ETag), within
//! one memory budget shared by every object in flight.
//!
//! # Design
//! - `pin` opens one version: a file by `open_pinned` (no symlink out of the root, regular files
//!   only, O_NONBLOCK so a FIFO never blocks, the version and ctime checked), a bucket object by
//!   HEAD (compared with the listing; its ETag kept for If-Match when the listing had none).
//! - Every later read of that `Pinned` checks it again (a file's version and ctime before each
//!   read, an object's headers on each ranged GET), so an upload never mixes two versions.
//! - `hash_all` is pass one: the SHA-256 of the whole source and of each part, read in chunks
//!   within the budget; the parts sent later must hash the same.
//!
//! Must not break: every read checks that the source is still the pinned version, and no read
//! starts before its bytes are reserved in the budget.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::hash::Sha256;
use bytes::Bytes;

use super::error::DestinationError;
use super::Outcome;
use crate::journal::{Hashed, JournalError, ObjectRow};
use crate::retry::Class;
use crate::s3::{S3Client, S3Error};
use crate::version::Version;

/// Read size of the hashing pass over a file.
const HASH_CHUNK: usize = 1 << 20;
/// Range size of the hashing pass over a source object.
const OBJECT_HASH_RANGE: u64 = 8 << 20;

pub use crate::s3::multipart::Budget;

/// Why an object could not proceed; mapped to an `Outcome` at the end.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("source file {}: {source}", crate::phi::shown(.path))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("source {0} is gone")]
    Vanished(String),
    #[error("source {0} changed during the upload; it will be sent again once it settles")]
    Changed(String),
    /// The source bucket's server failed or refused a read.
    #[error("reading the source: {0}")]
    Source(S3Error),
    #[error("verification failed for s3://{bucket}/{key}: {detail}")]
    Verify {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("source file {} is a symlink that now points outside the source root", crate::phi::shown(.0))]
    Escaped(PathBuf),
    #[error("source {} is not a regular file ({kind}): refused, it will not be uploaded", crate::phi::shown(.0), kind = .1)]
    NotRegular(PathBuf, &'static str),
    /// Another writer's object is at the destination key (`overwrite = "own"`).
    #[error("conflict at s3://{bucket}/{key}: {detail}; the source is left untouched (set destination.overwrite = \"always\" to replace it, or move the other object away)")]
    Conflict {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("interrupted by shutdown")]
    Interrupted,
}

impl Stop {
    /// What the scheduler does with an object that stopped for this reason (shared by both
    /// destinations; the relay maps its own link errors before this).
    pub fn into_outcome(self) -> Outcome {
        match self {
            Stop::Interrupted => Outcome::Interrupted,
            Stop::Vanished(_) => Outcome::Vanished(self.to_string()),
            Stop::Changed(_) => Outcome::Changed(self.to_string()),
            Stop::Escaped(_) | Stop::NotRegular(..) => Outcome::Rejected(self.to_string()),
            Stop::Conflict { .. } => Outcome::Conflict(self.to_string()),
            // No permission will not fix itself by retrying; other I/O errors (EIO, ESTALE on
            // NFS) may.
            Stop::Io { ref source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Outcome::Rejected(self.to_string())
            }
            Stop::Io { .. } => Outcome::Retry(self.to_string()),
            Stop::Journal(j) => Outcome::Fatal(j),
            Stop::Verify { .. } => Outcome::Retry(self.to_string()),
            // The source's server: never a destination outage or refusal. Its listing reports
            // lasting refusals once; the object waits with a growing backoff.
            Stop::Source(ref s3) => match s3.class() {
                Class::Object => Outcome::Rejected(self.to_string()),
                _ => Outcome::Retry(self.to_string()),
            },
            Stop::S3(s3) => match s3.class() {
                Class::Transient if s3.is_unanswered() => Outcome::Unreachable(s3.to_string()),
                Class::Transient => Outcome::Retry(s3.to_string()),
                Class::Destination | Class::Object => {
                    Outcome::Destination(DestinationError::from_s3(&s3))
                }
            },
        }
    }
}

/// Where an object's bytes come from.
#[derive(Clone)]
pub enum Origin {
    /// A directory source's root.
    Dir(PathBuf),
    /// A bucket source: its server and the key prefix the relative paths are under.
    Bucket {
        client: Arc<S3Client>,
        prefix: String,
    },
}

impl Origin {
    /// The source key of a bucket row (`prefix` + relative path).
    pub fn source_key(prefix: &str, rel: &Path) -> String {
        format!("{prefix}{}", rel.to_string_lossy())
    }
}

/// One version of a source, opened for reading: every read fails with `Changed` once the
/// source is no longer that version.
pub enum Pinned {
    File {
        file: File,
        path: PathBuf,
        fp: Version,
        /// The ctime when it was opened (or hashed, from the journal): a writer can restore an
        /// mtime, never a ctime, so a rewrite in place is seen.
        ctime_ns: i64,
    },
    Object {
        client: Arc<S3Client>,
        key: String,
        fp: Version,
        /// The ETag every read is pinned to (If-Match), if known.
        etag: Option<String>,
    },
}

/// A path for messages (withheld with `log_paths = "keys"`).
fn file_path(p: &Path) -> String {
    crate::phi::shown(p).to_string()
}

impl Pinned {
    /// A pinned file's parts (the caller has matched `Pinned::File`).
    fn file(&self) -> (&File, &PathBuf, &Version, &i64) {
        match self {
            Pinned::File {
                file,
                path,
                fp,
                ctime_ns,
            } => (file, path, fp, ctime_ns),
            Pinned::Object { .. } => unreachable!("called on a pinned file only"),
        }
    }

    /// The source, for messages (a path, or s3://bucket/key).
    pub fn what(&self) -> String {
        match self {
            Pinned::File { path, .. } => file_path(path),
            Pinned::Object { client, key, .. } => format!("s3://{}/{key}", client.bucket()),
        }
    }

    /// A pinned file's ctime (fixed in the journal before a streamed upload starts).
    pub fn ctime_ns(&self) -> Option<i64> {
        match self {
            Pinned::File { ctime_ns, .. } => Some(*ctime_ns),
            Pinned::Object { .. } => None,
        }
    }

    /// The ETag this transfer pinned itself to, to record with the hash: for a bucket object
    /// listed without one (a listed ETag is part of the version already).
    pub fn pinned_etag(&self) -> Option<String> {
        match self {
            Pinned::Object { fp, etag, .. } if fp.listed_etag().is_none() => etag.clone(),
            _ => None,
        }
    }

    /// An error of the source's server: changed (412), vanished (404) or a source failure, never a
    /// destination one.
    pub fn source_error(&self, e: S3Error) -> Stop {
        match (e.status(), e.code()) {
            (Some(412), _) | (_, Some("PreconditionFailed")) => Stop::Changed(self.what()),
            (_, Some("NoSuchKey")) | (Some(404), _) if e.code() != Some("NoSuchBucket") => {
                Stop::Vanished(self.what())
            }
            _ => Stop::Source(e),
        }
    }

    /// What the source's server said of a pinned object (its size, Last-Modified, ETag) must be
    /// of the version sent; anything else (or a file) is `Changed`.
    pub fn answer_pinned(
        &self,
        total: Option<u64>,
        last_modified: Option<&str>,
        answered_etag: Option<&str>,
    ) -> Result<(), Stop> {
        match self {
            Pinned::Object { fp, etag, .. }
                if fp.matches_object(etag.as_deref(), total, last_modified, answered_etag) =>
            {
                Ok(())
            }
            _ => Err(Stop::Changed(self.what())),
        }
    }

    /// Reads `len` bytes at `off` and their SHA-256, after checking the version.
    pub async fn read(self: &Arc<Self>, off: u64, len: u64) -> Result<(Bytes, [u8; 32]), Stop> {
        let bytes = match &**self {
            Pinned::File { .. } => {
                let me = self.clone();
                return blocking(move || {
                    let (file, path, fp, ctime_ns) = me.file();
                    check_pinned(file, path, fp, *ctime_ns)?;
                    let mut buf = vec![0u8; buffer_len(len)?];
                    file.read_exact_at(&mut buf, off)
                        .map_err(|source| Stop::Io {
                            path: path.clone(),
                            source,
                        })?;
                    let sha = Sha256::digest(&buf);
                    Ok((Bytes::from(buf), sha))
                })
                .await;
            }
            Pinned::Object { .. } => self.fetch(off, len).await?,
        };
        blocking(move || {
            let sha = Sha256::digest(&bytes);
            Ok((bytes, sha))
        })
        .await
    }

    /// A ranged GET of a pinned object, its answer checked against the pinned version.
    pub async fn fetch(&self, off: u64, len: u64) -> Result<Bytes, Stop> {
        let Pinned::Object {
            client, key, etag, ..
        } = self
        else {
            unreachable!("fetch is for objects")
        };
        let r = client
            .get_range(key, off, len, etag.as_deref())
            .await
            .map_err(|e| self.source_error(e))?;
        self.answer_pinned(r.total, r.last_modified.as_deref(), r.etag.as_deref())?;
        Ok(r.body)
    }

    /// Whether the source is still the pinned version, before an upload is completed: a file by
    /// its metadata, an object by a HEAD (a GET under way may go on serving the version it
    /// began with after the object was replaced, so the end of a read says nothing).
    pub async fn check(self: &Arc<Self>) -> Result<(), Stop> {
        match &**self {
            Pinned::File { .. } => {
                let me = self.clone();
                blocking(move || {
                    let (file, path, fp, ctime_ns) = me.file();
                    check_pinned(file, path, fp, *ctime_ns)
                })
                .await
            }
            Pinned::Object { client, key, .. } => {
                let head = match client.head_object(key).await {
                    Ok(Some(h)) => h,
                    Ok(None) => return Err(Stop::Vanished(self.what())),
                    Err(e) => return Err(self.source_error(e)),
                };
                self.answer_pinned(
                    Some(head.size),
                    head.last_modified.as_deref(),
                    head.etag.as_deref(),
                )
            }
        }
    }

    /// The hash pass: the SHA-256 of the whole source and, with `part_size`, of each part,
    /// read in chunks within the memory budget. Every part later sent must be the bytes hashed
    /// here, so the recorded SHA-256 is that of the bytes stored, whatever a writer does to the
    /// file in between.
    pub async fn hash_all(
        self: &Arc<Self>,
        budget: &Budget,
        size: u64,
        part_size: Option<u64>,
    ) -> Result<Hashed, Stop> {
        if let Pinned::File { .. } = &**self {
            let me = self.clone();
            return blocking(move || {
                let (file, path, fp, ctime_ns) = me.file();
                let mut h = PartHasher::new(part_size);
                let mut buf = vec![0u8; HASH_CHUNK];
                let mut off = 0u64;
                while off < size {
                    // At most HASH_CHUNK, a usize.
                    let n =
                        usize::try_from((size - off).min(HASH_CHUNK as u64)).unwrap_or(HASH_CHUNK);
                    file.read_exact_at(&mut buf[..n], off)
                        .map_err(|source| Stop::Io {
                            path: path.clone(),
                            source,
                        })?;
                    h.update(&buf[..n]);
                    off += n as u64;
                }
                check_pinned(file, path, fp, *ctime_ns)?;
                Ok(h.finish(Some(*ctime_ns)))
            })
            .await;
        }
        // An object: sequential ranged GETs, each pinned. The source is read twice (here and
        // per part) on the institution's side; the tunnel carries each byte once.
        let mut h = PartHasher::new(part_size);
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(OBJECT_HASH_RANGE);
            let _permit = budget.reserve(n).await;
            let bytes = self.fetch(off, n).await?;
            h = blocking(move || {
                h.update(&bytes);
                Ok(h)
            })
            .await?;
            off += n;
        }
        Ok(h.finish(None))
    }
}

/// The whole-object SHA-256 and, at part boundaries, one per part, in one pass.
struct PartHasher {
    whole: Sha256,
    part_size: Option<u64>,
    part: Sha256,
    in_part: u64,
    parts: Vec<[u8; 32]>,
}

impl PartHasher {
    /// A hasher of the whole source and, with `part_size`, of each part.
    fn new(part_size: Option<u64>) -> PartHasher {
        PartHasher {
            whole: Sha256::new(),
            part_size,
            part: Sha256::new(),
            in_part: 0,
            parts: Vec::new(),
        }
    }

    /// Feeds the next bytes, in order.
    fn update(&mut self, mut bytes: &[u8]) {
        self.whole.update(bytes);
        let Some(ps) = self.part_size else { return };
        while !bytes.is_empty() {
            let take = usize::try_from(ps - self.in_part)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            self.part.update(&bytes[..take]);
            self.in_part += take as u64;
            bytes = &bytes[take..];
            if self.in_part == ps {
                let done = std::mem::take(&mut self.part);
                self.parts.push(done.finalize());
                self.in_part = 0;
            }
        }
    }

    /// The whole hash and the part hashes.
    fn finish(mut self, ctime_ns: Option<i64>) -> Hashed {
        if self.part_size.is_some() && (self.in_part > 0 || self.parts.is_empty()) {
            self.parts.push(self.part.finalize());
        }
        Hashed {
            sha256: self.whole.finalize(),
            parts: self.parts,
            ctime_ns,
        }
    }
}

/// Opens the source version the row describes: a file (refusing a symlink that leads out of
/// the root) or a bucket object (HEAD, compared with what the listing saw).
pub async fn pin(row: &ObjectRow, origin: &Origin) -> Result<Arc<Pinned>, Stop> {
    let fp = row.version.clone();
    match origin {
        Origin::Dir(root) => {
            let (root, path) = (root.clone(), root.join(&row.rel_path));
            let journaled_ctime = row.ctime_ns;
            blocking(move || {
                let (file, ctime_ns) = open_pinned(&root, &path, &fp)?;
                // A hash fixed before a restart holds for the file as it was then.
                if journaled_ctime.is_some_and(|c| c != ctime_ns) {
                    return Err(Stop::Changed(file_path(&path)));
                }
                Ok(Arc::new(Pinned::File {
                    file,
                    path,
                    fp,
                    ctime_ns,
                }))
            })
            .await
        }
        Origin::Bucket { client, prefix } => {
            let mut pinned = Pinned::Object {
                client: client.clone(),
                key: Origin::source_key(prefix, &row.rel_path),
                fp,
                etag: row.source_etag().map(str::to_string),
            };
            let Pinned::Object { key, etag, fp, .. } = &mut pinned else {
                unreachable!("built above")
            };
            let head = match client.head_object(key).await {
                Ok(Some(h)) => h,
                Ok(None) => return Err(Stop::Vanished(pinned.what())),
                Err(e) => return Err(pinned.source_error(e)),
            };
            if !fp.matches_object(
                etag.as_deref(),
                Some(head.size),
                head.last_modified.as_deref(),
                head.etag.as_deref(),
            ) {
                return Err(Stop::Changed(pinned.what()));
            }
            if etag.is_none() {
                *etag = head.etag;
            }
            Ok(Arc::new(pinned))
        }
    }
}

/// Opens the source file, refusing a symlink that leads out of the root and anything but a
/// regular file, and checks that it is still the version the journal knows. Returns the file
/// and its ctime, which every later check compares.
pub fn open_pinned(root: &Path, path: &Path, expect: &Version) -> Result<(File, i64), Stop> {
    let io = |source| Stop::Io {
        path: path.to_path_buf(),
        source,
    };
    // lstat each component below the root (the root itself may be a symlink, e.g. to a
    // mount): only a path that goes through a symlink needs resolving, and then it must stay
    // inside the resolved root. Cheaper than canonicalizing every path: one lstat per
    // component below the root instead of a readlink per component from `/`.
    let rel = path.strip_prefix(root).unwrap_or(path);
    let mut cur = root.to_path_buf();
    let mut through_link = false;
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                through_link = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Stop::Vanished(file_path(path)))
            }
            Err(e) => return Err(io(e)),
        }
    }
    let real = if through_link {
        let real = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Stop::Vanished(file_path(path)))
            }
            Err(e) => return Err(io(e)),
        };
        let real_root = std::fs::canonicalize(root).map_err(io)?;
        if !real.starts_with(&real_root) {
            return Err(Stop::Escaped(path.to_path_buf()));
        }
        real
    } else {
        path.to_path_buf()
    };
    // O_NONBLOCK: a FIFO put where a file was would otherwise block this open forever (until
    // a writer comes). O_NOCTTY: a terminal device never becomes ours. The type of what was
    // opened is checked on the descriptor itself, so nothing can be swapped in between; on a
    // regular file O_NONBLOCK changes nothing.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&real)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Stop::Vanished(file_path(path)))
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(Stop::NotRegular(path.to_path_buf(), file_kind(&meta)));
    }
    if Version::of_file(&meta) != *expect {
        return Err(Stop::Changed(file_path(path)));
    }
    Ok((file, ctime_of(&meta)))
}

/// What kind of non-regular file this is, for the refusal.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// A file's ctime in ns since the epoch.
pub fn ctime_of(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.ctime().saturating_mul(1_000_000_000) + meta.ctime_nsec()
}

/// Whether the open file is still the pinned version: size, mtime, inode and
/// ctime, which a writer cannot put back.
pub fn check_pinned(file: &File, path: &Path, expect: &Version, ctime_ns: i64) -> Result<(), Stop> {
    let meta = file.metadata().map_err(|source| Stop::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if Version::of_file(&meta) != *expect || ctime_of(&meta) != ctime_ns {
        return Err(Stop::Changed(file_path(path)));
    }
    Ok(())
}

/// A buffer of `len` bytes, if this machine can address one (a 32-bit target cannot hold a
/// part of 4 GiB or more).
pub fn buffer_len(len: u64) -> Result<usize, Stop> {
    usize::try_from(len).map_err(|_| {
        Stop::Source(S3Error::Setup(format!(
            "a read of {len} bytes does not fit this machine's memory: lower agent.part_size"
        )))
    })
}

/// Runs file IO on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Stop> + Send + 'static,
) -> Result<T, Stop> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Stop::Journal(JournalError::Panicked))?
}
