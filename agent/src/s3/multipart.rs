//! The one multipart uploader, used by the agent's sink and by the relay's S3 landing alike:
//! sends the parts an upload still lacks, a bounded number of bytes at a time, each checked by
//! the server with its CRC-64/NVME (`x-amz-checksum-crc64nvme`, for a full-object checksum) or
//! its SHA-256 (`x-amz-checksum-sha256`) and signed with its SHA-256 (a CRC-checked part over
//! https goes unsigned, and is then not hashed with SHA-256 at all), and reports each
//! acknowledged part before it counts.
//! Where the bytes come from, and what is done with an acknowledged part (the agent journals
//! it), is the caller's `PartSource`.
//!
//! # Use
//! ```text
//! let upload = Upload { client, key, upload_id, size, part_size, crc64nvme: false };
//! let parts = upload.send_parts(&source, &budget, already_sent, &stop).await?;
//! client.complete_multipart(key, upload_id, &Upload::manifest(&parts), &condition).await?;
//! verify::verify(client, key, size, &sha256, Some(&parts)).await?;
//! ```
//! The agent's `PartSource` reads the pinned source version once, in order, hashing it whole as
//! it goes (or, for an upload whose hash was fixed first, in parallel), and journals each part;
//! the relay's reads its partial file in order (hashing it whole as it goes) and records nothing.
//! A part's own SHA-256 and CRC are computed in its task, on the blocking pool, so the in-order
//! reader only reads and keeps the whole-object hashes.
//!
//! Must not break: a part is reported (`PartSource::sent`) only after the server acknowledged
//! it, and a part's bytes are read only once their share of the budget is held; the first
//! error stops new parts (those in flight finish), and the upload is never completed here.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::{b64, S3Client, S3Error};
use crate::hash::{Crc64Nvme, Sha256};

/// One part the server acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRow {
    /// The part number (1-based).
    pub number: u32,
    /// Its size in bytes.
    pub size: u64,
    /// Base64 SHA-256 of the part (the signed payload hash; the checksum header of uploads
    /// checked by SHA-256). None for a part sent unsigned over https with its CRC-64/NVME,
    /// which no one hashed with SHA-256 (`S3Client::signs_part_payload`).
    pub sha256_b64: Option<String>,
    /// Base64 CRC-64/NVME of the part, for uploads with a full-object CRC-64/NVME.
    pub crc64nvme_b64: Option<String>,
    /// The server's ETag for it (CompleteMultipartUpload lists it).
    pub etag: String,
}

/// Where an upload's bytes come from, and who hears of each part sent.
pub trait PartSource: Send + Sync + 'static {
    /// The caller's error type (an S3 failure converts into it).
    type Error: From<S3Error> + Send + 'static;

    /// Whether parts must be read one after another, in order (a source hashed whole as it is
    /// read). Otherwise each part is read in its own task, in parallel.
    fn in_order(&self) -> bool {
        false
    }

    /// Reads part `number` (`len` bytes at `offset`): its bytes and, if the source hashed
    /// them already, their SHA-256 (else the part's task does).
    fn read(
        &self,
        number: u32,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(Bytes, Option<[u8; 32]>), Self::Error>> + Send;

    /// The server acknowledged `part`; an error stops the upload.
    fn sent(&self, part: &PartRow) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Permits of the memory budget are KiB, so any part size fits a u32 permit count.
const PERMIT: u64 = 1024;

/// Bytes held in memory at once, across all uploads that share it (with the agent: together
/// with bytes sent but not yet recorded in the journal): a read waits for its share first.
#[derive(Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    kib: u32,
}

impl Budget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: u64) -> Budget {
        let kib = u32::try_from((bytes / PERMIT).max(1)).unwrap_or(u32::MAX);
        Budget {
            sem: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds them.
    pub async fn reserve(&self, bytes: u64) -> OwnedSemaphorePermit {
        let kib = u32::try_from(bytes.div_ceil(PERMIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.kib);
        self.sem
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget semaphore is never closed")
    }
}

/// Why `send_parts` stopped before every part was there.
#[derive(Debug)]
pub enum SendError<E> {
    /// The source or the server failed (the first error; parts in flight were let finish).
    Failed(E),
    /// Asked to stop: the parts sent so far are reported, the rest is left for later.
    Stopped,
    /// A part's task panicked (a bug).
    Panicked(String),
}

/// One multipart upload under way.
pub struct Upload<'a> {
    /// The bucket's client.
    pub client: &'a Arc<S3Client>,
    /// The object's key.
    pub key: &'a str,
    /// The multipart upload.
    pub upload_id: &'a str,
    /// The whole object's size.
    pub size: u64,
    /// Every part's size but the last's.
    pub part_size: u64,
    /// Parts carry their CRC-64/NVME (the upload was created for a full-object CRC-64/NVME).
    pub crc64nvme: bool,
}

impl Upload<'_> {
    /// How many parts the object has.
    pub fn count(&self) -> u32 {
        u32::try_from(self.size.div_ceil(self.part_size).max(1)).unwrap_or(u32::MAX)
    }

    /// Sends every part not in `done` and returns all parts in order.
    pub async fn send_parts<P: PartSource>(
        &self,
        source: &Arc<P>,
        budget: &Budget,
        done: Vec<PartRow>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Vec<PartRow>, SendError<P::Error>> {
        let count = self.count();
        let mut parts: Vec<Option<PartRow>> = vec![None; count as usize];
        for p in done {
            if (1..=count).contains(&p.number) {
                let i = (p.number - 1) as usize;
                parts[i] = Some(p);
            }
        }
        let missing: Vec<u32> = (1..=count)
            .filter(|n| parts[(*n - 1) as usize].is_none())
            .collect();
        let mut tasks: JoinSet<Result<PartRow, P::Error>> = JoinSet::new();
        let mut first_err: Option<SendError<P::Error>> = None;
        let mut next = missing.into_iter();
        loop {
            let launch = first_err.is_none() && !*stop.borrow();
            if let Some(n) = launch.then(|| next.next()).flatten() {
                let off = u64::from(n - 1) * self.part_size;
                let len = (self.size - off).min(self.part_size);
                // The budget is taken before the read; a part finishing meanwhile is handled.
                let permit = tokio::select! {
                    p = budget.reserve(len) => p,
                    Some(res) = tasks.join_next() => {
                        collect(res, &mut parts, &mut first_err);
                        budget.reserve(len).await
                    }
                };
                let read_now = if source.in_order() {
                    match source.read(n, off, len).await {
                        Ok(r) => Some(r),
                        Err(e) => {
                            first_err.get_or_insert(SendError::Failed(e));
                            continue;
                        }
                    }
                } else {
                    None
                };
                let (client, source) = (self.client.clone(), source.clone());
                let (key, upload_id) = (self.key.to_string(), self.upload_id.to_string());
                let with_crc = self.crc64nvme;
                let with_sha = client.signs_part_payload(with_crc);
                tasks.spawn(async move {
                    let _permit = permit;
                    let (body, sha) = match read_now {
                        Some(r) => r,
                        None => source.read(n, off, len).await?,
                    };
                    let (body, sha, crc) = part_sums(body, sha, with_sha, with_crc).await;
                    let etag = client
                        .upload_part(&key, &upload_id, n, body, sha.as_ref(), crc)
                        .await?;
                    let part = PartRow {
                        number: n,
                        size: len,
                        sha256_b64: sha.as_ref().map(|s| b64(s)),
                        crc64nvme_b64: crc.map(Crc64Nvme::b64),
                        etag,
                    };
                    source.sent(&part).await?;
                    Ok(part)
                });
                continue;
            }
            match tasks.join_next().await {
                Some(res) => collect(res, &mut parts, &mut first_err),
                None => break,
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if parts.iter().any(Option::is_none) {
            return Err(SendError::Stopped);
        }
        Ok(parts.into_iter().flatten().collect())
    }

    /// The list CompleteMultipartUpload takes: number, ETag, checksum of each part (its
    /// CRC-64/NVME where it has one, else its SHA-256).
    pub fn manifest(parts: &[PartRow]) -> Vec<(u32, String, String)> {
        parts
            .iter()
            .map(|p| {
                let sum = p.crc64nvme_b64.as_ref().or(p.sha256_b64.as_ref());
                (p.number, p.etag.clone(), sum.cloned().unwrap_or_default())
            })
            .collect()
    }
}

/// With `with_sha`, a part's SHA-256 (unless the source gave it), and with `with_crc` its
/// CRC-64/NVME, on the blocking pool: parts are hashed in parallel, off the runtime's threads.
async fn part_sums(
    body: Bytes,
    sha: Option<[u8; 32]>,
    with_sha: bool,
    with_crc: bool,
) -> (Bytes, Option<[u8; 32]>, Option<u64>) {
    let hash_sha = with_sha && sha.is_none();
    if !hash_sha && !with_crc {
        return (body, sha, None);
    }
    let sums = move |body: &[u8]| {
        let sha = if hash_sha {
            Some(Sha256::digest(body))
        } else {
            sha
        };
        (sha, with_crc.then(|| Crc64Nvme::digest(body)))
    };
    let work = body.clone();
    match tokio::task::spawn_blocking(move || sums(&work)).await {
        Ok((sha, crc)) => (body, sha, crc),
        // The blocking pool is shutting down: hash here.
        Err(_) => {
            let (sha, crc) = sums(&body);
            (body, sha, crc)
        }
    }
}

/// Takes a finished part task's result: the part, or the first error.
fn collect<E>(
    res: Result<Result<PartRow, E>, tokio::task::JoinError>,
    parts: &mut [Option<PartRow>],
    first_err: &mut Option<SendError<E>>,
) {
    match res {
        Ok(Ok(p)) => {
            let i = (p.number - 1) as usize;
            parts[i] = Some(p);
        }
        Ok(Err(e)) => {
            first_err.get_or_insert(SendError::Failed(e));
        }
        Err(join) => {
            first_err.get_or_insert_with(|| SendError::Panicked(join.to_string()));
        }
    }
}
