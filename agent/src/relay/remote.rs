//! Partial transfers kept in S3, so that any relay replica can resume them: a large object is
//! streamed into a multipart upload as its bytes arrive, and what the relay holds of it is
//! described by a small state object in the bucket, not by the relay's disk.
//!
//! # Design
//! - **One state object per transfer**, under the relay-private prefix `.ha-edge-relay/transfers/`
//!   (beneath the store's prefix), named by a hash of (agent identity, key, SHA-256): the
//!   upload ID, how it is checked, the parts uploaded (number, ETag, and SHA-256 or
//!   CRC-64/NVME), and the SHA-256 midstate after them. It is created once (`If-None-Match: *`; a replica that loses the race uses the
//!   winner's upload) and rewritten after each part. We chose this over ListMultipartUploads
//!   because s3s-fs (and some other stores) do not implement it, and because the midstate has to
//!   be kept somewhere: parts of an open upload cannot be read back to hash them again.
//! - **Resume:** an offer for the same (identity, key, SHA-256) reads the state, checks with
//!   ListParts that the upload still holds those parts, and is answered `Accept{parts ×
//!   part_size}`. A state whose upload is gone starts over.
//! - **Checksums:** over https the upload is checked by CRC-64/NVME, per part and of the whole
//!   object (`FULL_OBJECT`, combined from the parts' at completion, so a replica resuming it
//!   needs only the state object), and its parts go with `UNSIGNED-PAYLOAD`: TLS protects
//!   them on the way and S3 checks each against its signed CRC, as the AWS SDKs do. That spares
//!   the relay a SHA-256 of every part, a third of its CPU. Over http (and on a store that
//!   refuses CRC-64/NVME, said once) each part is signed with its SHA-256, which is also its
//!   checksum (composite). Either way the whole-object SHA-256 is computed as the bytes
//!   arrive, checked against the offer, and kept in `x-amz-meta-sha256`.
//! - **Sealed offers** (the agent hashes as it sends; the SHA-256 comes with the commit): the
//!   state object is named by the transfer id, and the upload is checked by CRC-64/NVME over
//!   http too, since its metadata, fixed at creation, cannot name the SHA-256. The completed
//!   object is verified by its full-object CRC; the SHA-256, checked here before completion,
//!   stays in the agent's journal and receipt (as for the agent's own multipart uploads). A
//!   store that refuses CRC-64/NVME keeps sealed transfers whole on the relay's disk.
//! - **Receiving:** bytes go into the whole-object hash, the part's checksum, and the part being
//!   assembled (at most `part_size`): in memory while the relay's assembly budget
//!   (`store.assembly_memory`, shared by all transfers) has room for the whole part, else in
//!   one part file on the relay's disk (0600). A full part is uploaded in the background (at
//!   most one per transfer, and `PART_UPLOADS` across the relay, so memory is bounded; a part
//!   assembled in memory keeps its share of the budget until S3 has it), and the state object
//!   is rewritten as soon as S3 has it, while the next part is assembled. A relay killed
//!   mid-transfer loses the part in flight to S3 and the one being assembled, nothing
//!   recorded. Assembling in memory spares each byte a write, a read and a thread hop; with
//!   the relay's allocator and the reuse of part buffers (see `Budget`; an idle relay keeps
//!   up to the budget of them) it took the relay's CPU for 1 GiB on loopback from about 10 s
//!   to 5.5 s (README, "QUIC relay").
//! - **Commit:** the last part is uploaded, the whole-object SHA-256 (midstate and the bytes
//!   since) is checked against the offer *before* CompleteMultipartUpload; a mismatch aborts the
//!   upload. The completed object is verified (size, `x-amz-meta-sha256`, and the composite
//!   SHA-256 or the full-object CRC-64/NVME), then the state
//!   object is deleted and `Stored` sent.
//!
//! Must not break: nothing is completed whose SHA-256 differs from the offer, and a part is
//! recorded in the state only once S3 has acknowledged it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::store::{Landed, StoreError};
use crate::hash::{Crc64Nvme, Sha256, Sha256Resumable};
use crate::s3::multipart::PartRow;
use crate::s3::verify::{self, VerifyError};
use crate::s3::{PartChecksum, Precondition, S3Client};

/// Part uploads in flight across the relay (each holds one part in memory).
pub const PART_UPLOADS: usize = 8;

/// The bounded number of part uploads at once.
fn uploads() -> &'static tokio::sync::Semaphore {
    static S: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    S.get_or_init(|| tokio::sync::Semaphore::new(PART_UPLOADS))
}

/// The memory that parts being assembled may take, across the relay: a part is assembled in
/// memory only if its whole length fits (counted in KiB, so any budget fits a 32-bit usize).
/// A part's buffer comes back once S3 has the part and is used again for the next one: a
/// fresh multi-MiB buffer per part cost the relay a tenth of its CPU in page faults (the
/// kernel zeroing the pages again). Kept buffers keep their share of the budget, so what the
/// relay holds for assembly, in use or kept, stays within it.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<tokio::sync::Semaphore>,
    kept: Arc<std::sync::Mutex<Vec<Buffer>>>,
}

/// Memory for one part, with its share of the budget.
pub struct Buffer {
    bytes: BytesMut,
    share: tokio::sync::OwnedSemaphorePermit,
}

impl Budget {
    /// A budget of `bytes` (0: every part is assembled on disk).
    pub fn new(bytes: u64) -> Budget {
        let kib = usize::try_from(bytes / 1024)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Budget {
            permits: Arc::new(tokio::sync::Semaphore::new(kib)),
            kept: Arc::default(),
        }
    }

    /// An empty buffer for a part of `len` bytes, if the budget has room now: a kept one large
    /// enough, else a new one (kept ones that do not fit give their share back first).
    fn take(&self, len: u64) -> Option<Buffer> {
        let want = usize::try_from(len).ok()?;
        let kib = u32::try_from(len.div_ceil(1024)).ok()?;
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = kept.iter().position(|b| b.bytes.capacity() >= want) {
            return Some(kept.swap_remove(i));
        }
        loop {
            if let Ok(share) = self.permits.clone().try_acquire_many_owned(kib) {
                return Some(Buffer {
                    bytes: BytesMut::with_capacity(want),
                    share,
                });
            }
            // Too small for this part: its memory and share go back, and room is tried again.
            drop(kept.pop()?);
        }
    }

    /// A part's buffer once S3 has the part (`bytes` the only handle left on its memory).
    fn give_back(&self, bytes: Bytes, share: tokio::sync::OwnedSemaphorePermit) {
        if let Ok(mut bytes) = bytes.try_into_mut() {
            bytes.clear();
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            kept.push(Buffer { bytes, share });
        }
    }
}

/// Where the part being assembled is.
enum Assembly {
    /// Nothing of the next part yet.
    Empty,
    /// In memory, within the budget; the buffer goes with the bytes to their upload.
    Memory(Buffer),
    /// In the part file (the budget had no room when the part began).
    Disk,
}

/// Which transfer: the store's prefix, the agent, its key and what it offered.
pub struct At<'a> {
    pub prefix: &'a str,
    pub identity: &'a str,
    pub key: &'a str,
    pub size: u64,
    /// The offer's SHA-256, or what names a sealed offer's transfer (`sealed`).
    pub sha: &'a [u8; 32],
    /// The SHA-256 comes with the commit: the upload is checked by CRC-64/NVME and its
    /// metadata names no SHA-256.
    pub sealed: bool,
    pub part_size: u64,
}

/// The state object of one transfer, as stored (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    v: u32,
    identity: String,
    key: String,
    size: u64,
    /// The offer's SHA-256, or (`sealed`) what names the transfer.
    sha256: String,
    part_size: u64,
    upload_id: String,
    parts: Vec<StatePart>,
    /// SHA-256 midstate after the parts (8 words, hex), and the bytes it covers.
    midstate: String,
    hashed: u64,
    /// The upload is checked by CRC-64/NVME, per part and of the whole object, its parts sent
    /// unsigned (https); else by SHA-256 per part (composite). Older state objects: SHA-256.
    #[serde(default)]
    crc64nvme: bool,
    /// A sealed offer's transfer: the SHA-256 to check comes with the commit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    sealed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StatePart {
    n: u32,
    etag: String,
    /// Base64 SHA-256 of the part (SHA-256 uploads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    /// Base64 CRC-64/NVME of the part (CRC-64/NVME uploads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc64nvme: Option<String>,
}

/// The checksum of the part being assembled, as its upload is checked.
// One per transfer, replaced at each part: boxing the SHA-256 state would only add a heap hop.
#[allow(clippy::large_enum_variant)]
enum PartSum {
    Sha256(Sha256),
    Crc64Nvme(Crc64Nvme),
}

impl PartSum {
    fn new(crc64nvme: bool) -> PartSum {
        if crc64nvme {
            PartSum::Crc64Nvme(Crc64Nvme::new())
        } else {
            PartSum::Sha256(Sha256::new())
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            PartSum::Sha256(h) => h.update(bytes),
            PartSum::Crc64Nvme(c) => c.update(bytes),
        }
    }

    /// The part's SHA-256 or CRC-64/NVME.
    fn finish(self) -> (Option<[u8; 32]>, Option<u64>) {
        match self {
            PartSum::Sha256(h) => (Some(h.finalize()), None),
            PartSum::Crc64Nvme(c) => (None, Some(c.sum())),
        }
    }
}

/// A store that refused CRC-64/NVME uploads: said once, then SHA-256 for the relay's life.
static CRC_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a new upload to `client` is checked by CRC-64/NVME: over https, where its parts
/// then go unsigned (one SHA-256 pass fewer over every byte), unless the store refused it.
/// Over http each part is hashed with SHA-256 for its signature anyway, so it is also the
/// part's checksum, as before.
fn new_upload_uses_crc(client: &S3Client) -> bool {
    takes_crc(client) && !client.signs_part_payload(true)
}

/// Whether uploads to `client` may be checked by CRC-64/NVME: its configuration asks for it
/// and the store has not refused it.
pub fn takes_crc(client: &S3Client) -> bool {
    client.checksum() == crate::config::Checksum::Crc64Nvme
        && !CRC_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A transfer whose partial state is in S3.
pub struct Remote {
    client: Arc<S3Client>,
    dest_key: String,
    state_key: String,
    state: State,
    whole: Sha256Resumable,
    part: PartSum,
    budget: Budget,
    assembly: Assembly,
    part_file: Arc<File>,
    part_path: PathBuf,
    part_len: u64,
    /// The part being uploaded (its number and task), recorded when it is done.
    pending: Option<(u32, tokio::task::JoinHandle<PartDone>)>,
}

/// What a part's upload task gives back: the part, and the whole hash's midstate after it.
type PartDone = Result<(StatePart, Option<([u32; 8], u64)>), crate::s3::S3Error>;

/// The state object's key for a transfer.
fn state_key(prefix: &str, identity: &str, key: &str, sha: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    for p in [identity.as_bytes(), key.as_bytes(), sha] {
        h.update(p);
        h.update([0]);
    }
    format!(
        "{prefix}.ha-edge-relay/transfers/{}.json",
        hex::encode(h.finalize())
    )
}

fn midstate_hex(state: &[u32; 8]) -> String {
    state.iter().map(|w| format!("{w:08x}")).collect()
}

fn midstate_parse(s: &str) -> Option<[u32; 8]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u32; 8];
    for (i, w) in out.iter_mut().enumerate() {
        *w = u32::from_str_radix(s.get(i * 8..i * 8 + 8)?, 16).ok()?;
    }
    Some(out)
}

/// Starts the multipart upload of a new transfer: checked by CRC-64/NVME where
/// `new_upload_uses_crc` says so and the store takes it, else by SHA-256 per part (a refusal is
/// said once and remembered). Its upload ID, and whether it is checked by CRC-64/NVME.
/// A sealed transfer (`sha` None: not known yet) is checked by CRC-64/NVME over http too, or
/// not created: its refusal is returned (the store keeps it on disk instead; it asks only
/// where `takes_crc`).
async fn create_upload(
    client: &S3Client,
    key: &str,
    sha: Option<&[u8; 32]>,
    meta: &crate::s3::ObjectMeta,
) -> Result<(String, bool), crate::s3::S3Error> {
    if new_upload_uses_crc(client) || sha.is_none() {
        match client
            .create_multipart(key, PartChecksum::Crc64Nvme(sha), meta)
            .await
        {
            Ok(id) => return Ok((id, true)),
            Err(e) if e.refuses_crc64nvme() => {
                if !CRC_REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(endpoint = %client.endpoint(), error = %e, "the store refuses full-object CRC64NVME checksums on multipart uploads: using SHA-256 per part instead (every byte then hashed twice with SHA-256)");
                }
                if sha.is_none() {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    // A sealed transfer returned above, created or refused.
    let sha = sha.expect("a sealed transfer is created with CRC-64/NVME or refused");
    let id = client
        .create_multipart(key, PartChecksum::Sha256(sha), meta)
        .await?;
    Ok((id, false))
}

impl Remote {
    /// The transfer `at` into the bucket: resumed from its state object if one is there and
    /// its upload still holds the parts, else a new upload. The part being assembled takes
    /// memory from `budget`, or goes to `part_path`.
    pub async fn open(
        client: &Arc<S3Client>,
        at: At<'_>,
        budget: &Budget,
        part_path: &Path,
    ) -> Result<Remote, StoreError> {
        let At {
            prefix,
            identity,
            key,
            size,
            sha,
            sealed,
            part_size,
        } = at;
        let dest_key = format!("{prefix}{key}");
        let state_key = state_key(prefix, identity, key, sha);
        let want = |s: &State| {
            s.v == 1
                && s.identity == identity
                && s.key == dest_key
                && s.size == size
                && s.sha256 == hex::encode(sha)
                && s.sealed == sealed
                && s.part_size == part_size
        };
        let mut state = None;
        if let Some(s) = read_state(client, &state_key).await? {
            if want(&s) && holds(client, &s).await? {
                state = Some(s);
            } else {
                // Another transfer's or a dead upload's: replaced below.
                let _ = client.abort_multipart(&s.key, &s.upload_id).await;
                client.delete_object(&state_key).await?;
            }
        }
        let state = match state {
            Some(s) => s,
            None => {
                let mut meta = client.meta_for(&dest_key, "");
                meta.agent_identity = Some(identity.to_string());
                let named = (!sealed).then_some(sha);
                let (upload_id, crc64nvme) = create_upload(client, &dest_key, named, &meta).await?;
                let fresh = State {
                    v: 1,
                    identity: identity.to_string(),
                    key: dest_key.clone(),
                    size,
                    sha256: hex::encode(sha),
                    part_size,
                    upload_id: upload_id.clone(),
                    parts: Vec::new(),
                    midstate: midstate_hex(&Sha256Resumable::new().midstate().expect("empty").0),
                    hashed: 0,
                    crc64nvme,
                    sealed,
                };
                match write_state(client, &state_key, &fresh, &Precondition::Create).await {
                    Ok(()) => fresh,
                    // Another replica created it first: take its upload.
                    Err(e) if e.status() == Some(412) => {
                        let _ = client.abort_multipart(&dest_key, &upload_id).await;
                        read_state(client, &state_key)
                            .await?
                            .filter(want)
                            .ok_or(StoreError::InUse)?
                    }
                    Err(e) => {
                        let _ = client.abort_multipart(&dest_key, &upload_id).await;
                        return Err(e.into());
                    }
                }
            }
        };
        let words = midstate_parse(&state.midstate).ok_or_else(|| {
            StoreError::Io(std::io::Error::other("unreadable transfer state object"))
        })?;
        let whole = Sha256Resumable::from_midstate(words, state.hashed);
        let part = PartSum::new(state.crc64nvme);
        let part_file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(part_path)?
        };
        Ok(Remote {
            client: client.clone(),
            dest_key,
            state_key,
            state,
            whole,
            part,
            budget: budget.clone(),
            assembly: Assembly::Empty,
            part_file: Arc::new(part_file),
            part_path: part_path.to_path_buf(),
            part_len: 0,
            pending: None,
        })
    }

    /// The bytes S3 holds of the object: where the agent goes on.
    pub fn held(&self) -> u64 {
        self.state.parts.len() as u64 * self.state.part_size
    }

    /// Takes the next bytes. A full part is read into memory and uploaded in the background
    /// (recorded in the state object once S3 has it) while the next one is assembled; at most
    /// one part per transfer is in flight, so a slow upload holds back the stream (QUIC flow
    /// control) rather than growing memory.
    pub async fn append(&mut self, mut bytes: &[u8]) -> Result<(), StoreError> {
        while !bytes.is_empty() {
            let room = usize::try_from(self.state.part_size - self.part_len).unwrap_or(usize::MAX);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            if let Assembly::Empty = self.assembly {
                // The part's whole length, so that it never outgrows what the budget gave.
                let len = self
                    .state
                    .part_size
                    .min(self.state.size.saturating_sub(self.whole.len()))
                    .max(now.len() as u64);
                self.assembly = match self.budget.take(len) {
                    Some(buf) => Assembly::Memory(buf),
                    None => Assembly::Disk,
                };
            }
            self.whole.update(now);
            self.part.update(now);
            match &mut self.assembly {
                Assembly::Memory(buf) => buf.bytes.extend_from_slice(now),
                Assembly::Disk | Assembly::Empty => {
                    let (file, at, buf) = (self.part_file.clone(), self.part_len, now.to_vec());
                    tokio::task::spawn_blocking(move || file.write_all_at(&buf, at))
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))??;
                }
            }
            self.part_len += now.len() as u64;
            bytes = rest;
            if self.part_len == self.state.part_size {
                self.cut_part(false).await?;
            }
        }
        Ok(())
    }

    /// The part being assembled is complete: wait for the one before it to be recorded, then
    /// upload this one in the background (`last`: inline, and not recorded, since completion
    /// follows at once).
    async fn cut_part(&mut self, last: bool) -> Result<(), StoreError> {
        let (body, permit) = match std::mem::replace(&mut self.assembly, Assembly::Empty) {
            Assembly::Memory(buf) => (buf.bytes.freeze(), Some(buf.share)),
            Assembly::Disk | Assembly::Empty => {
                let len = usize::try_from(self.part_len).map_err(std::io::Error::other)?;
                let file = self.part_file.clone();
                let body = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, 0)?;
                    // The disk holds the part being assembled, nothing of those before.
                    file.set_len(0)?;
                    Ok(buf)
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
                (Bytes::from(body), None)
            }
        };
        self.part_len = 0;
        let (sha, crc) =
            std::mem::replace(&mut self.part, PartSum::new(self.state.crc64nvme)).finish();
        let midstate = self.whole.midstate();
        self.settle().await?;
        let n = u32::try_from(self.state.parts.len() + 1).map_err(std::io::Error::other)?;
        let slot = uploads().acquire().await.expect("never closed");
        let mut recorded = self.state.clone();
        let (client, key, state_key) = (
            self.client.clone(),
            self.dest_key.clone(),
            self.state_key.clone(),
        );
        let budget = self.budget.clone();
        let task = async move {
            let _slot = slot;
            let kept = permit.is_some().then(|| body.clone());
            let sent = client
                .upload_part(&key, &recorded.upload_id, n, body, sha.as_ref(), crc)
                .await;
            if let (Some(bytes), Some(share)) = (kept, permit) {
                budget.give_back(bytes, share);
            }
            let etag = sent?;
            let part = StatePart {
                n,
                etag,
                sha256: sha.as_ref().map(|s| crate::s3::b64(s)),
                crc64nvme: crc.map(Crc64Nvme::b64),
            };
            if !last {
                recorded.parts.push(part.clone());
                if let Some((words, hashed)) = midstate {
                    recorded.midstate = midstate_hex(&words);
                    recorded.hashed = hashed;
                }
                write_state(&client, &state_key, &recorded, &Precondition::None).await?;
            }
            Ok::<_, crate::s3::S3Error>((part, midstate))
        };
        if last {
            let done = task.await;
            self.record(n, done).await
        } else {
            self.pending = Some((n, tokio::spawn(task)));
            Ok(())
        }
    }

    /// Waits for the part in flight, if any, and takes it into the state.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Some((n, task)) = self.pending.take() else {
            return Ok(());
        };
        let done = task
            .await
            .map_err(|e| std::io::Error::other(format!("part upload task: {e}")))?;
        self.record(n, done).await
    }

    /// Takes an uploaded part into the state, or turns its failure into the store's error.
    async fn record(&mut self, n: u32, done: PartDone) -> Result<(), StoreError> {
        match done {
            Ok((part, midstate)) => {
                self.state.parts.push(part);
                if let Some((words, hashed)) = midstate {
                    self.state.midstate = midstate_hex(&words);
                    self.state.hashed = hashed;
                }
                Ok(())
            }
            // The upload is gone (aborted, expired by a lifecycle rule): so is the state, and
            // the agent's next offer starts over.
            Err(e) if e.code() == Some("NoSuchUpload") => {
                let _ = self.client.delete_object(&self.state_key).await;
                Err(e.into())
            }
            // S3 computed another SHA-256 than the bytes had when they arrived: they changed on
            // this disk. The part is not recorded; the agent's next offer resends it.
            Err(e)
                if matches!(
                    e.code(),
                    Some("BadDigest" | "InvalidDigest" | "XAmzContentSHA256Mismatch")
                ) =>
            {
                Err(StoreError::Verify {
                    key: self.dest_key.clone(),
                    detail: format!(
                        "S3 refused part {n} ({e}): its bytes changed at the relay after they arrived; the agent sends it again"
                    ),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every byte is in: the last part, the whole-object SHA-256 checked against `sha` (the
    /// offer's, or a sealed offer's from its commit), then completion and verification; a
    /// mismatch aborts the upload and lands nothing.
    pub async fn finish(mut self, sha: &[u8; 32]) -> Result<Landed, StoreError> {
        if self.part_len > 0 {
            self.cut_part(true).await?;
        } else {
            self.settle().await?;
        }
        let got_len = self.whole.len();
        let got = self.whole.clone().finalize();
        let size = self.state.size;
        let named = self.state.sealed || hex::encode(sha) == self.state.sha256;
        if got_len != size || got != *sha || !named {
            let detail = format!(
                "received {got_len} bytes with SHA-256 {}, offered {size} bytes with {}",
                hex::encode(got),
                hex::encode(sha)
            );
            self.abandon().await;
            return Ok(Landed::Mismatch(detail));
        }
        let rows: Vec<PartRow> = self
            .state
            .parts
            .iter()
            .map(|p| PartRow {
                number: p.n,
                etag: p.etag.clone(),
                size: self
                    .state
                    .part_size
                    .min(size - u64::from(p.n - 1) * self.state.part_size),
                sha256_b64: p.sha256.clone(),
                crc64nvme_b64: p.crc64nvme.clone(),
            })
            .collect();
        let whole_crc = if self.state.crc64nvme {
            Some(whole_crc(&rows).ok_or_else(|| {
                std::io::Error::other("a part of the transfer state has no CRC-64/NVME")
            })?)
        } else {
            None
        };
        let client = self.client.clone();
        if let Err(e) = client
            .complete_multipart(
                &self.dest_key,
                &self.state.upload_id,
                &crate::s3::multipart::Upload::manifest(&rows),
                &Precondition::None,
                whole_crc,
            )
            .await
        {
            return Err(e.into());
        }
        verify::verify_full(&client, &self.dest_key, size, sha, whole_crc, Some(&rows))
            .await
            .map_err(|e| match e {
                VerifyError::S3(e) => StoreError::S3(e),
                VerifyError::Mismatch(m) => StoreError::Verify {
                    key: self.dest_key.clone(),
                    detail: m.to_string(),
                },
            })?;
        client.delete_object(&self.state_key).await?;
        let _ = std::fs::remove_file(&self.part_path);
        Ok(Landed::Stored)
    }

    /// Gives the transfer up: the upload aborted, the state object and the part file deleted.
    pub async fn abandon(mut self) {
        if let Some((_, task)) = self.pending.take() {
            task.abort();
        }
        let _ = self
            .client
            .abort_multipart(&self.dest_key, &self.state.upload_id)
            .await;
        let _ = self.client.delete_object(&self.state_key).await;
        let _ = std::fs::remove_file(&self.part_path);
    }
}

/// The whole object's CRC-64/NVME from its parts' (None if one has none).
fn whole_crc(parts: &[PartRow]) -> Option<u64> {
    use base64::Engine as _;
    parts.iter().try_fold(Crc64Nvme::new().sum(), |whole, p| {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(p.crc64nvme_b64.as_ref()?)
            .ok()?;
        let part = u64::from_be_bytes(raw.try_into().ok()?);
        Some(Crc64Nvme::combine(whole, part, p.size))
    })
}

/// Gives up transfers whose state object has not changed for `ttl` (an agent that never came
/// back): their uploads aborted, their state objects deleted. An active transfer rewrites its
/// state after every part. Returns how many.
pub async fn expire(client: &S3Client, prefix: &str, ttl: std::time::Duration) -> usize {
    let dir = format!("{prefix}.ha-edge-relay/transfers/");
    let now = std::time::SystemTime::now();
    let mut token: Option<String> = None;
    let mut n = 0;
    loop {
        let Ok(page) = client.list_objects(&dir, token.as_deref()).await else {
            return n;
        };
        for o in &page.objects {
            let old = o
                .last_modified
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                .is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= ttl));
            if !old {
                continue;
            }
            if let Ok(Some(s)) = read_state(client, &o.key).await {
                if client.abort_multipart(&s.key, &s.upload_id).await.is_err() {
                    continue;
                }
            }
            if client.delete_object(&o.key).await.is_ok() {
                n += 1;
            }
        }
        match page.next_token {
            Some(t) if Some(&t) != token.as_ref() => token = Some(t),
            _ => return n,
        }
    }
}

/// The state object at `key`, if there is one.
async fn read_state(client: &S3Client, key: &str) -> Result<Option<State>, StoreError> {
    let mut stream = match client.get_stream(key, 0, None).await {
        Ok(s) => s,
        Err(e) if e.status() == Some(404) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut body = Vec::new();
    while let Some(chunk) = stream.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > 1 << 20 {
            return Err(StoreError::Io(std::io::Error::other(
                "transfer state object over 1 MiB",
            )));
        }
    }
    Ok(serde_json::from_slice(&body).ok())
}

/// Writes the state object.
async fn write_state(
    client: &S3Client,
    key: &str,
    state: &State,
    when: &Precondition,
) -> Result<(), crate::s3::S3Error> {
    let body = serde_json::to_vec(state).expect("serializable");
    let sha = Sha256::digest(&body);
    client
        .put_object(
            key,
            Bytes::from(body),
            &sha,
            when,
            &crate::s3::ObjectMeta::default(),
        )
        .await
        .map(|_| ())
}

/// Whether the upload still holds exactly the parts the state records.
async fn holds(client: &S3Client, s: &State) -> Result<bool, StoreError> {
    match client.list_parts(&s.key, &s.upload_id).await {
        Ok(parts) => Ok(s.parts.iter().all(|p| {
            parts
                .iter()
                .any(|q| q.number == p.n && q.etag.trim_matches('"') == p.etag.trim_matches('"'))
        }) && (!s.parts.is_empty() || parts.is_empty())),
        Err(e) if e.code() == Some("NoSuchUpload") || e.status() == Some(404) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assembly_budget_holds_whole_parts_and_takes_them_back() {
        let b = Budget::new(10 << 20);
        let first = b.take(8 << 20).expect("room for one 8 MiB part");
        assert!(b.take(8 << 20).is_none(), "not for a second");
        let small = b.take(2 << 20).expect("the rest fits a 2 MiB part");
        drop(first);
        assert!(
            b.take(8 << 20).is_some(),
            "the first part's share came back"
        );
        drop(small);
        assert!(Budget::new(0).take(1).is_none(), "0: every part on disk");
        // A part of 1 byte takes 1 KiB: none slips through for free.
        let tiny = Budget::new(1024);
        let _one = tiny.take(1).unwrap();
        assert!(tiny.take(1).is_none());
    }

    #[test]
    fn a_part_buffer_given_back_is_used_again_within_the_budget() {
        let b = Budget::new(8 << 20);
        let mut buf = b.take(8 << 20).unwrap();
        buf.bytes.extend_from_slice(&[7; 4096]);
        let frozen = buf.bytes.freeze();
        let extra = frozen.clone();
        // Another handle on the bytes (a retry still holding them): not kept.
        b.give_back(frozen, buf.share);
        assert!(
            b.take(8 << 20).is_some(),
            "its share came back all the same"
        );
        drop(extra);
        let buf = b.take(8 << 20).unwrap();
        let frozen = buf.bytes.freeze();
        let at2 = frozen.as_ptr();
        b.give_back(frozen, buf.share);
        // Kept: the next part gets the same memory, empty, and the budget counts it once.
        let again = b.take(4 << 20).unwrap();
        assert_eq!(again.bytes.as_ptr(), at2);
        assert!(again.bytes.is_empty() && again.bytes.capacity() >= 8 << 20);
        assert!(
            b.take(1).is_none(),
            "the kept buffer holds the whole budget"
        );
        drop(again);
        // A kept buffer too small for the part gives its share back to a new one.
        let b = Budget::new(8 << 20);
        let small = b.take(1 << 20).unwrap();
        b.give_back(small.bytes.freeze(), small.share);
        let big = b.take(8 << 20).expect("the small kept buffer made room");
        assert!(big.bytes.capacity() >= 8 << 20);
    }

    #[test]
    fn midstates_round_trip_through_hex() {
        let words = [1, 2, 0xdead_beef, 4, 5, 6, 7, u32::MAX];
        assert_eq!(midstate_parse(&midstate_hex(&words)), Some(words));
        assert_eq!(midstate_parse("00"), None);
    }
}
