//! Where the relay keeps what it receives: partial transfers on its own disk (so a transfer
//! resumes after a dropped connection or a relay restart), and the landing place for verified
//! objects, a directory or an S3 bucket (through the agent's S3 client: SigV4, multipart,
//! checksums, SSE, verification).
//!
//! # Layout on disk
//! - `state_dir/partial/<identity tag>-<hash of key and SHA-256>`: one file per transfer
//!   (0600, directory 0700), appended in order; its length is where a resumed transfer goes on.
//!   A sealed offer's transfer is named by its transfer id (`sealed_name`) in place of the
//!   SHA-256, which comes with its commit.
//! - `state_dir/index/<hash of key>`: for a directory landing, the SHA-256 and size landed at
//!   that key, so a repeated offer is answered AlreadyHave without reading the object.
//! - Limits per identity: open partials (`max_partials`) and their offered bytes
//!   (`max_partial_bytes`), reserved when an offer is accepted; and the free space of the state
//!   disk, checked before it is.
//!
//! Must not break: a partial transfer lands only after its size and SHA-256 are verified, and one
//! agent's partials never count against another's limits.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::hash::Sha256;
use bytes::Bytes;

use super::remote::Remote;
use crate::s3::multipart::{Budget, PartRow, PartSource, SendError, Upload};
use crate::s3::verify::{self, VerifyError};
use crate::s3::{PartChecksum, Precondition, S3Client, S3Error};

/// Parts of an object landed in S3 at a time.
const LAND_PARALLEL: usize = 4;

/// Why the relay cannot take or land an object; `is_permanent` tells the agent whether to try
/// again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("relay disk: {0}")]
    Io(#[from] std::io::Error),
    #[error("relay store: {0}")]
    S3(#[from] S3Error),
    #[error("this agent has {0} open partial transfers, its limit (relay.max_partials); try again later")]
    Busy(usize),
    #[error("this agent's partial transfers would take {would} bytes, more than its limit of {limit} (relay.max_partial_bytes); try again later")]
    Quota { would: u64, limit: u64 },
    #[error("the object is {size} bytes, more than any agent may have in partial transfers ({limit}, relay.max_partial_bytes): it can never be taken")]
    TooLarge { size: u64, limit: u64 },
    #[error("the relay's state disk has {free} bytes free, {needed} are needed; try again later")]
    Full { needed: u64, free: u64 },
    #[error("this transfer is already in progress on another stream")]
    InUse,
    #[error("the relay's landed object {key} failed verification: {detail}")]
    Verify { key: String, detail: String },
}

impl StoreError {
    /// Whether landing this object can never succeed as it is (asking again will not help):
    /// the key names a directory (or goes through a file) in the landing directory, or the S3
    /// store refuses the object itself.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Io(e) => matches!(
                e.raw_os_error(),
                Some(libc::EISDIR | libc::ENOTDIR | libc::ENAMETOOLONG)
            ),
            StoreError::S3(e) => e.class() == crate::retry::Class::Object,
            StoreError::TooLarge { .. } => true,
            _ => false,
        }
    }
}

/// Where verified objects go.
pub enum Landing {
    Dir(PathBuf),
    S3 {
        client: Arc<S3Client>,
        prefix: String,
        part_size: u64,
        /// The memory parts being assembled may take (see `remote`).
        assembly: super::remote::Budget,
    },
}

/// What each agent identity may hold in partial transfers, so that one agent (abandoning
/// transfers, or offering a huge object) cannot starve the others.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open partial transfers per identity.
    pub partials: usize,
    /// Bytes of partial state per identity (offered sizes, reserved at acceptance).
    pub partial_bytes: u64,
}

/// Free space kept on the state disk beyond what accepted offers reserve.
const DISK_RESERVE: u64 = 1 << 20;

/// The relay's store: partial transfers under `state_dir`, verified objects in the landing place.
pub struct Store {
    landing: Landing,
    partial_dir: PathBuf,
    index_dir: PathBuf,
    limits: Limits,
    /// Partial transfers held by a stream, with the size offered (reserved against limits).
    in_use: Arc<Mutex<HashMap<PathBuf, u64>>>,
}

/// A partial transfer being received; at most one stream holds it.
pub struct Partial {
    /// The partial file on the relay's disk (0600).
    pub path: PathBuf,
    file: Arc<File>,
    /// The bytes it holds so far: where the agent resumes.
    pub len: u64,
    /// Partial transfers held by a stream, with the size offered (reserved against limits).
    in_use: Arc<Mutex<HashMap<PathBuf, u64>>>,
    /// For an S3 landing of a multipart object: the transfer streamed into a multipart upload,
    /// its state in the bucket (then the file holds only the part being assembled).
    remote: Option<Remote>,
}

impl Drop for Partial {
    /// Gives the partial back to the store (its limits count it no more).
    fn drop(&mut self) {
        if let Ok(mut set) = self.in_use.lock() {
            set.remove(&self.path);
        }
    }
}

impl Partial {
    /// Drops what the partial holds (an eager offer sends from 0 whatever was kept). Eager
    /// offers are small objects, never streamed into S3.
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        if self.remote.is_some() {
            return Err(StoreError::Io(std::io::Error::other(
                "a transfer kept in S3 cannot restart from 0",
            )));
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.set_len(0))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        self.len = 0;
        Ok(())
    }

    /// Appends `bytes` (which the session checked to start at the current end).
    pub async fn append(&mut self, offset: u64, bytes: Vec<u8>) -> Result<(), StoreError> {
        let end = offset + bytes.len() as u64;
        if let Some(r) = self.remote.as_mut() {
            r.append(&bytes).await?;
            self.len = end;
            return Ok(());
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        self.len = end;
        Ok(())
    }
}

/// What a commit came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Landed {
    Stored,
    /// Size or SHA-256 differ from the offer; the partial is dropped.
    Mismatch(String),
}

/// What names the partial of a sealed offer's transfer (never an offer's SHA-256).
pub fn sealed_name(transfer: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ha-edge sealed transfer\0");
    h.update(transfer);
    h.finalize()
}

/// The first 16 hex digits of the identity's SHA-256: its partial transfers' name prefix.
fn agent_tag(identity: &str) -> String {
    hex_sha(&[identity.as_bytes()])[..16].to_string()
}

/// Bytes available to this process on the filesystem of `dir`.
#[allow(unsafe_code)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    #[allow(clippy::unnecessary_cast)]
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Hex SHA-256 over `parts`: the names of partial and index files.
fn hex_sha(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    hex::encode(h.finalize())
}

impl Store {
    /// Opens the store: creates `state_dir` (0700) with its partial and index folders.
    pub fn open(landing: Landing, state_dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        let partial_dir = state_dir.join("partial");
        let index_dir = state_dir.join("stored");
        // Partial transfers are patient data in transit, their names keys: private.
        for d in [&partial_dir, &index_dir] {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        if let Landing::Dir(root) = &landing {
            std::fs::create_dir_all(root)?;
        }
        Ok(Store {
            landing,
            partial_dir,
            index_dir,
            limits,
            in_use: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Where objects land, for the relay's start-up log line.
    pub fn describe(&self) -> String {
        match &self.landing {
            Landing::Dir(root) => format!("directory {}", root.display()),
            Landing::S3 { client, prefix, .. } => {
                format!("s3://{}/{prefix} at {}", client.bucket(), client.endpoint())
            }
        }
    }

    /// Whether `key` is stored with this size and SHA-256 (in S3: in its metadata, or, for an
    /// object that cannot name it, a sealed transfer's, the full-object CRC-64/NVME `crc`).
    pub async fn has(
        &self,
        key: &str,
        size: u64,
        sha: &[u8; 32],
        crc: Option<u64>,
    ) -> Result<bool, StoreError> {
        match &self.landing {
            Landing::Dir(root) => {
                let index = self.index_dir.join(hex_sha(&[key.as_bytes()]));
                let Ok(text) = tokio::fs::read_to_string(&index).await else {
                    return Ok(false);
                };
                let on_disk = tokio::fs::metadata(root.join(key)).await.ok();
                Ok(text.trim() == format!("{} {size}", hex::encode(sha))
                    && on_disk.is_some_and(|m| m.len() == size))
            }
            Landing::S3 { client, prefix, .. } => {
                let head = client.head_object(&format!("{prefix}{key}")).await?;
                Ok(head.is_some_and(|h| {
                    h.size == size
                        && match h.meta_sha256.as_deref() {
                            Some(m) => m.eq_ignore_ascii_case(&hex::encode(sha)),
                            None => crc.is_some_and(|c| verify::check_crc(&h, c).is_ok()),
                        }
                }))
            }
        }
    }

    /// Whether an object of `size` bytes is at `key` (whatever its bytes): a sealed offer
    /// that named no SHA-256 is then asked for it, so that a lost journal resends nothing.
    pub async fn present(&self, key: &str, size: u64) -> Result<bool, StoreError> {
        match &self.landing {
            Landing::Dir(root) => Ok(tokio::fs::metadata(root.join(key))
                .await
                .is_ok_and(|m| m.is_file() && m.len() == size)),
            Landing::S3 { client, prefix, .. } => Ok(client
                .head_object(&format!("{prefix}{key}"))
                .await?
                .is_some_and(|h| h.size == size)),
        }
    }

    /// Opens (or creates) the partial transfer of (agent, key, SHA-256); its length is the
    /// offset the agent resumes from.
    #[cfg(test)]
    pub fn open_partial(
        &self,
        agent: &str,
        key: &str,
        size: u64,
        sha: &[u8; 32],
    ) -> Result<Partial, StoreError> {
        self.open_local(agent, key, size, sha, size)
    }

    /// `open_partial`, with at most `on_disk` bytes of the object ever on this disk (all of
    /// it, or one part when the rest goes to S3 as it arrives).
    fn open_local(
        &self,
        agent: &str,
        key: &str,
        size: u64,
        sha: &[u8; 32],
        on_disk: u64,
    ) -> Result<Partial, StoreError> {
        // Named by the agent's identity first, so its share is counted by name.
        let tag = agent_tag(agent);
        let path = self.partial_dir.join(format!(
            "{tag}-{}.part",
            hex_sha(&[agent.as_bytes(), key.as_bytes(), sha])
        ));
        let mut in_use = self.in_use.lock().map_err(|_| StoreError::InUse)?;
        if in_use.contains_key(&path) {
            return Err(StoreError::InUse);
        }
        let limit = self.limits.partial_bytes;
        if size > limit {
            return Err(StoreError::TooLarge { size, limit });
        }
        let have = std::fs::metadata(&path).map_or(0, |m| m.len().min(size));
        // This identity's other partial transfers: their count, and the bytes they may grow to
        // (what is on disk; the sizes they were offered are not kept, so an abandoned one
        // counts what it holds).
        let (mut count, mut bytes) = (0usize, 0u64);
        for e in std::fs::read_dir(&self.partial_dir)?.filter_map(Result::ok) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&tag) && name.ends_with(".part") && e.path() != path {
                count += 1;
                let on_disk = e.metadata().map_or(0, |m| m.len());
                bytes += in_use.get(&e.path()).copied().unwrap_or(0).max(on_disk);
            }
        }
        if count >= self.limits.partials {
            return Err(StoreError::Busy(count));
        }
        if bytes + size > limit {
            return Err(StoreError::Quota {
                would: bytes + size,
                limit,
            });
        }
        let needed = on_disk.saturating_sub(have);
        if let Some(free) = free_bytes(&self.partial_dir) {
            if free < needed + DISK_RESERVE {
                return Err(StoreError::Full { needed, free });
            }
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?
        };
        let mut len = file.metadata()?.len();
        if len > size {
            file.set_len(0)?;
            len = 0;
        }
        in_use.insert(path.clone(), size);
        Ok(Partial {
            path,
            file: Arc::new(file),
            len,
            in_use: self.in_use.clone(),
            remote: None,
        })
    }

    /// Opens the transfer of (agent, key, `name`): for an S3 landing of an object larger than
    /// one part, streamed into a multipart upload whose state is kept in the bucket (any relay
    /// replica resumes it); otherwise a partial file on this relay's disk. `name` is the
    /// offer's SHA-256, or for a sealed offer (`sealed`: its SHA-256 comes with the commit)
    /// what its transfer id names (`sealed_name`).
    pub async fn open_transfer(
        &self,
        agent: &str,
        key: &str,
        size: u64,
        name: &[u8; 32],
        sealed: bool,
    ) -> Result<Partial, StoreError> {
        // A sealed transfer's upload is checked by CRC-64/NVME (the object's metadata, fixed
        // at its creation, cannot name a SHA-256 not known yet): a store that refuses it keeps
        // sealed transfers whole on this disk, landed by one verified upload.
        let streamed = match &self.landing {
            Landing::S3 {
                client, part_size, ..
            } if size > *part_size && (!sealed || super::remote::takes_crc(client)) => {
                Some(*part_size)
            }
            _ => None,
        };
        let mut p = self.open_local(agent, key, size, name, streamed.unwrap_or(size))?;
        if let (
            Landing::S3 {
                client,
                prefix,
                part_size,
                assembly,
            },
            Some(_),
        ) = (&self.landing, streamed)
        {
            let at = super::remote::At {
                prefix,
                identity: agent,
                key,
                size,
                sha: name,
                sealed,
                part_size: *part_size,
            };
            match Remote::open(client, at, assembly, &p.path).await {
                Ok(r) => {
                    p.len = r.held();
                    p.remote = Some(r);
                }
                // Refused just now (said once): the whole object on this disk instead.
                Err(StoreError::S3(e)) if sealed && e.refuses_crc64nvme() => {
                    drop(p);
                    return self.open_local(agent, key, size, name, size);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(p)
    }

    /// Verifies a complete partial against the offer and lands it. On a mismatch the partial
    /// is deleted, so the agent's next offer starts from zero.
    /// Verifies and lands a committed transfer. A permanent failure also removes the partial
    /// transfer (it can never land); a temporary one keeps it for the agent's next attempt.
    pub async fn land(
        &self,
        partial: Partial,
        key: &str,
        size: u64,
        sha: &[u8; 32],
    ) -> Result<Landed, StoreError> {
        let path = partial.path.clone();
        let mut partial = partial;
        if let Some(r) = partial.remote.take() {
            drop(partial);
            return r.finish(sha).await;
        }
        let landed = self.land_verified(partial, key, size, sha).await;
        if let Err(e) = &landed {
            if e.is_permanent() {
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
        landed
    }

    /// Lands a partial whose size and SHA-256 match the offer: to S3 by one verified upload, or
    /// into the landing directory by rename (copy across filesystems), fsynced; a mismatch lands
    /// nothing.
    async fn land_verified(
        &self,
        partial: Partial,
        key: &str,
        size: u64,
        sha: &[u8; 32],
    ) -> Result<Landed, StoreError> {
        // What is verified is what is on the relay's disk, read back: the bytes that will land.
        // For S3 that read is the upload's own (one pass, checked before completion).
        let mismatch = |got_len: u64, got: [u8; 32]| {
            format!(
                "received {got_len} bytes with SHA-256 {}, offered {size} bytes with {}",
                hex::encode(got),
                hex::encode(sha)
            )
        };
        if let Landing::S3 {
            client,
            prefix,
            part_size,
            ..
        } = &self.landing
        {
            // No fsync: what lands is read back and hashed now, and S3 holds it durably; a
            // crash before that resends the object.
            let dest_key = format!("{prefix}{key}");
            return match upload_file(client, &dest_key, &partial.path, size, sha, *part_size)
                .await?
            {
                Some((len, got)) => {
                    let _ = std::fs::remove_file(&partial.path);
                    Ok(Landed::Mismatch(mismatch(len, got)))
                }
                None => {
                    tokio::fs::remove_file(&partial.path).await?;
                    Ok(Landed::Stored)
                }
            };
        }
        let (file, path) = (partial.file.clone(), partial.path.clone());
        let digest = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, [u8; 32])> {
            file.sync_all()?;
            let mut h = Sha256::new();
            let mut f = File::open(&path)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n_total = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                n_total += n as u64;
            }
            Ok((n_total, h.finalize()))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        if digest != (size, *sha) {
            let detail = mismatch(digest.0, digest.1);
            let _ = std::fs::remove_file(&partial.path);
            return Ok(Landed::Mismatch(detail));
        }
        match &self.landing {
            Landing::Dir(root) => {
                let dest = root.join(key);
                if let Some(parent) = dest.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                match tokio::fs::rename(&partial.path, &dest).await {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                        let tmp = dest.with_extension("relay-partial");
                        tokio::fs::copy(&partial.path, &tmp).await?;
                        tokio::fs::File::open(&tmp).await?.sync_all().await?;
                        tokio::fs::rename(&tmp, &dest).await?;
                        tokio::fs::remove_file(&partial.path).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
                if let Some(parent) = dest.parent() {
                    tokio::fs::File::open(parent).await?.sync_all().await?;
                }
                let index = self.index_dir.join(hex_sha(&[key.as_bytes()]));
                tokio::fs::write(&index, format!("{} {size}\n", hex::encode(sha))).await?;
            }
            Landing::S3 { .. } => unreachable!("landed above"),
        }
        drop(partial);
        Ok(Landed::Stored)
    }

    /// Gives up transfers kept in S3 whose state has not changed for `ttl` (their uploads
    /// aborted). Returns how many.
    pub async fn expire_remote(&self, ttl: Duration) -> usize {
        match &self.landing {
            Landing::S3 { client, prefix, .. } => super::remote::expire(client, prefix, ttl).await,
            Landing::Dir(_) => 0,
        }
    }

    /// Deletes partial transfers untouched for `ttl` (not those in use). Returns how many.
    pub fn expire(&self, ttl: Duration) -> usize {
        let now = SystemTime::now();
        let in_use = self.in_use.lock().map(|s| s.clone()).unwrap_or_default();
        let Ok(rd) = std::fs::read_dir(&self.partial_dir) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if in_use.contains_key(&p) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= ttl));
            if old && std::fs::remove_file(&p).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// Sends a local file to S3 (single PUT or multipart, `LAND_PARALLEL` parts at a time), hashing
/// the bytes as they are read: if they are not the offered size and SHA-256, nothing is stored
/// (no PUT, or the multipart upload aborted) and what was read is returned. Then checks the
/// stored object.
async fn upload_file(
    client: &Arc<S3Client>,
    key: &str,
    path: &Path,
    size: u64,
    sha: &[u8; 32],
    part_size: u64,
) -> Result<Option<(u64, [u8; 32])>, StoreError> {
    let on_disk = std::fs::metadata(path)?.len();
    if on_disk != size {
        return Ok(Some((on_disk, [0; 32])));
    }
    let file = Arc::new(LocalParts {
        file: Arc::new(File::open(path)?),
        whole: Mutex::new(Sha256::new()),
    });
    let mut parts = None;
    if size <= part_size {
        let (body, got) = file.read(1, 0, size).await?;
        let got = got.unwrap_or_default();
        if got != *sha {
            return Ok(Some((size, got)));
        }
        let answer = client
            .put_object(
                key,
                body,
                sha,
                &Precondition::None,
                &client.meta_for(key, ""),
            )
            .await?;
        // The server computed this SHA-256 over what it stored (and refused the PUT had it
        // differed from the checksum sent): verified without a HEAD.
        if answer.checksum_sha256.as_deref() == Some(crate::s3::b64(sha).as_str()) {
            return Ok(None);
        }
    } else {
        let upload_id = client
            .create_multipart(key, PartChecksum::Sha256(sha), &client.meta_for(key, ""))
            .await?;
        let upload = Upload {
            client,
            key,
            upload_id: &upload_id,
            size,
            part_size,
            crc64nvme: false,
        };
        let budget = Budget::new(LAND_PARALLEL as u64 * part_size);
        let (_never, stop) = tokio::sync::watch::channel(false);
        let sent = match upload.send_parts(&file, &budget, Vec::new(), &stop).await {
            Ok(sent) => sent,
            Err(e) => {
                let _ = client.abort_multipart(key, &upload_id).await;
                return Err(match e {
                    SendError::Failed(e) => e,
                    SendError::Stopped | SendError::Panicked(_) => {
                        StoreError::Io(std::io::Error::other("the upload's part tasks failed"))
                    }
                });
            }
        };
        let got: [u8; 32] =
            std::mem::take(&mut *file.whole.lock().expect("not poisoned")).finalize();
        if got != *sha {
            let _ = client.abort_multipart(key, &upload_id).await;
            return Ok(Some((size, got)));
        }
        let done = client
            .complete_multipart(
                key,
                &upload_id,
                &Upload::manifest(&sent),
                &Precondition::None,
                None,
            )
            .await;
        if let Err(e) = done {
            let _ = client.abort_multipart(key, &upload_id).await;
            return Err(e.into());
        }
        parts = Some(sent);
    }
    verify::verify(client, key, size, sha, parts.as_deref())
        .await
        .map_err(|e| match e {
            VerifyError::S3(e) => StoreError::S3(e),
            VerifyError::Mismatch(m) => StoreError::Verify {
                key: key.to_string(),
                detail: m.to_string(),
            },
        })?;
    Ok(None)
}

/// A partial transfer on the relay's disk, read part by part in order (hashed whole as read).
struct LocalParts {
    file: Arc<File>,
    whole: Mutex<Sha256>,
}

impl PartSource for LocalParts {
    /// Failures are the store's.
    type Error = StoreError;
    /// Read in order: the whole-file hash is computed as the parts are read.
    fn in_order(&self) -> bool {
        true
    }

    /// Reads one part of the partial file and adds it to the whole-file hash (parts are read in
    /// order).
    async fn read(
        &self,
        _number: u32,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Option<[u8; 32]>), StoreError> {
        let file = self.file.clone();
        let (body, sha) =
            tokio::task::spawn_blocking(move || -> std::io::Result<(Bytes, [u8; 32])> {
                let mut buf = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
                file.read_exact_at(&mut buf, offset)?;
                let sha: [u8; 32] = Sha256::digest(&buf);
                Ok((Bytes::from(buf), sha))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        self.whole.lock().expect("not poisoned").update(&body);
        Ok((body, Some(sha)))
    }

    /// Nothing to record: the relay's partial file is its own journal.
    async fn sent(&self, _part: &PartRow) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b)
    }

    /// A partial resumes where it stopped, lands only when its size and SHA-256 match, and is
    /// deleted once idle past its TTL (never while in use).
    #[tokio::test]
    async fn partials_resume_land_verified_and_expire_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("landed");
        let limits = Limits {
            partials: 2,
            partial_bytes: 1 << 30,
        };
        let store = Store::open(
            Landing::Dir(root.clone()),
            &dir.path().join("state"),
            limits,
        )
        .unwrap();
        let data = b"0123456789".to_vec();
        let digest = sha(&data);
        // First session: 4 bytes arrive, then the stream is gone.
        let mut p = store.open_partial("a", "fhir/a/x", 10, &digest).unwrap();
        assert_eq!(p.len, 0);
        p.append(0, data[..4].to_vec()).await.unwrap();
        // The same transfer cannot be opened twice at once.
        assert!(matches!(
            store.open_partial("a", "fhir/a/x", 10, &digest),
            Err(StoreError::InUse)
        ));
        drop(p);
        // Second session resumes at 4.
        let mut p = store.open_partial("a", "fhir/a/x", 10, &digest).unwrap();
        assert_eq!(p.len, 4);
        p.append(4, data[4..].to_vec()).await.unwrap();
        assert!(!store.has("fhir/a/x", 10, &digest, None).await.unwrap());
        assert_eq!(
            store.land(p, "fhir/a/x", 10, &digest).await.unwrap(),
            Landed::Stored
        );
        assert_eq!(std::fs::read(root.join("fhir/a/x")).unwrap(), data);
        assert!(store.has("fhir/a/x", 10, &digest, None).await.unwrap());
        assert!(!store
            .has("fhir/a/x", 10, &sha(b"other"), None)
            .await
            .unwrap());

        // A partial whose bytes differ from the offer is dropped at commit.
        let mut p = store
            .open_partial("a", "fhir/a/y", 3, &sha(b"abc"))
            .unwrap();
        p.append(0, b"abd".to_vec()).await.unwrap();
        let path = p.path.clone();
        assert!(matches!(
            store.land(p, "fhir/a/y", 3, &sha(b"abc")).await.unwrap(),
            Landed::Mismatch(_)
        ));
        assert!(!path.exists());

        // Limits: two open partials at most; idle ones expire, one in use does not.
        let held = store.open_partial("a", "k1", 5, &sha(b"1")).unwrap();
        let other = store.open_partial("a", "k2", 5, &sha(b"2")).unwrap();
        drop(other);
        assert!(matches!(
            store.open_partial("a", "k3", 5, &sha(b"3")),
            Err(StoreError::Busy(2))
        ));
        assert_eq!(store.expire(Duration::ZERO), 1, "k2 is idle, k1 is in use");
        assert!(held.path.exists());
        assert!(store.open_partial("a", "k3", 5, &sha(b"3")).is_ok());
    }
}
