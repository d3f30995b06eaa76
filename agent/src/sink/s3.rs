//! Delivery of one journaled object to S3: single PUT below the threshold, multipart above, with
//! every step committed to the journal before the next one depends on it, and the stored object
//! verified before it counts as delivered: a single PUT by the SHA-256 the server computed over
//! what it stored (sent back in its answer), read back with HEAD (size, SHA-256) when the answer
//! has none or the source is deleted or moved next; a multipart upload always with HEAD.
//!
//! Memory is bounded by one semaphore of bytes shared by all objects: a part (or a single-PUT
//! body) is read only after its bytes are reserved, so at most `parts_in_flight x part_size`
//! bytes of file data are held at once, whatever the number or size of files.
//!
//! The bytes come from a file (directory sources) or from an object on another S3-compatible
//! server (bucket sources), through one `Pinned` reader: a file is checked against its
//! version before every part, an object is read by ranged GETs pinned to its ETag
//! (If-Match, and the answer's ETag compared), so an upload never mixes two versions.
//!
//! # Design
//! - **Fresh object, single PUT** (below `multipart_threshold`): reserve the size in the budget,
//!   read and hash in one pass, PUT with `x-amz-checksum-sha256` and the write's condition, and
//!   confirm by the server's checksum in the answer (or a HEAD: none given, or the source is
//!   deleted or moved next). The hash is recorded with the delivery, in one commit.
//! - **Fresh object, multipart, `checksum = "crc64nvme"`** (the default): pin the source
//!   version and commit it with its ctime (`uploading`, no upload id yet), CreateMultipartUpload
//!   for a full-object CRC-64/NVME and commit its id, then read the source once, in order
//!   (`sink::stream`), hashing it whole (SHA-256 and CRC) as the parts are cut and sent (each
//!   journaled once acknowledged); commit the SHA-256 and CRC, mark `completing`, complete with
//!   the CRC (the server checks it against what it assembled) under the condition, verify with
//!   HEAD. A server that refuses CRC64NVME gets the next scheme, with one warning.
//! - **Fresh object, multipart, `checksum = "sha256"`**: pin the source version, hash it whole
//!   and per part (pass one), commit hash, part hashes and ctime (`uploading`, no upload id
//!   yet), CreateMultipartUpload with the SHA-256 in its metadata and commit its id, send the
//!   parts, mark `completing`, complete under the condition, verify with HEAD (`s3::verify`).
//! - **Resume**: an `uploading` row with an upload id lists the parts the server holds, forgets
//!   journaled parts it lacks, and sends the rest (a streamed upload reads the parts the server
//!   holds once more, to hash them, checking each against its journaled CRC); without an upload
//!   id, uploads of the key that
//!   the journal never learnt of are aborted first. `completing` asks the stored object: ours
//!   means delivered. NoSuchUpload or a changed source starts the object over.
//! - **Conditions** (`overwrite = "own"`): create-only for a key never delivered, replace only
//!   the recorded ETag for a new version; a 412 is settled by one HEAD (ours: delivered; else a
//!   conflict). A server that ignores conditions (probed once per journal) gets a HEAD first.
//!   The probe runs beside the first uploads (creating an upload and sending parts write no
//!   key); a PUT or a completion waits for its answer.
//!
//! Must not break: nothing is replaced that is not ours (`overwrite = "own"`), and `Delivered`
//! comes only after verification.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::hash::Sha256;
use bytes::Bytes;
use tokio::sync::watch;

use super::read::{blocking, check_pinned, open_pinned, pin, Budget, Origin, Pinned, Stop};
use super::stream::StreamParts;
use super::{Outcome, Unrecorded};
use crate::config::{Checksum, Overwrite, Sse, MAX_PARTS, MAX_PART_SIZE};
use crate::journal::{Journal, JournalError, Landed, ObjectRow, PartRow, State};
use crate::s3::multipart::{PartSource, SendError, Upload};
use crate::s3::verify::{self, VerifyError};
use crate::s3::{b64, Head, ObjectMeta, PartChecksum, Precondition, S3Client, S3Error};

/// How objects are cut into requests.
#[derive(Debug, Clone, Copy)]
pub struct UploadParams {
    /// The configured part size (raised per object past 10,000 parts).
    pub part_size: u64,
    /// From this size on, multipart; below, one PUT.
    pub multipart_threshold: u64,
}

/// Delivery to one S3 bucket, shared by every object task.
pub struct S3Sink {
    client: Arc<S3Client>,
    journal: Journal,
    params: UploadParams,
    budget: Budget,
    warned_no_listing: std::sync::atomic::AtomicBool,
    overwrite: Overwrite,
    /// Whether the server honours conditional writes, found once (`conditional`): by the probe
    /// `ready` runs beside the first uploads, or by the first write that needs the answer
    /// first. If not, every write is preceded by a HEAD of its key (a race remains, said once).
    conditional: tokio::sync::OnceCell<bool>,
    /// Multipart uploads are checked by a full-object CRC-64/NVME and read once (`checksum =
    /// "crc64nvme"`, until the server refuses it).
    crc64nvme: std::sync::atomic::AtomicBool,
}

impl S3Sink {
    /// A sink for `client`'s bucket; `parts_in_flight` parts of `params.part_size` bound its
    /// memory.
    pub fn new(
        client: Arc<S3Client>,
        journal: Journal,
        params: UploadParams,
        parts_in_flight: usize,
    ) -> S3Sink {
        let budget_bytes =
            (parts_in_flight as u64 * params.part_size).max(params.multipart_threshold);
        S3Sink {
            overwrite: client.overwrite(),
            crc64nvme: std::sync::atomic::AtomicBool::new(client.checksum() == Checksum::Crc64Nvme),
            client,
            journal,
            params,
            budget: Budget::new(budget_bytes),
            warned_no_listing: std::sync::atomic::AtomicBool::new(false),
            conditional: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether new multipart uploads are streamed with a full-object CRC-64/NVME.
    fn crc64nvme(&self) -> bool {
        self.crc64nvme.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The server refused a CRC-64/NVME upload: say so once, and use SHA-256 (a hash pass, then
    /// the upload) from now on.
    fn fall_back_to_sha256(&self, e: &S3Error) {
        if self
            .crc64nvme
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(endpoint = %self.client.endpoint(), error = %e, "the destination refuses full-object CRC64NVME checksums on multipart uploads: using SHA-256 instead (each object is read twice: once to hash it, once to send it); set destination.checksum = \"sha256\" to say so in the config");
        }
    }

    /// Finds out whether the server honours conditional writes (see `conditional`), so that
    /// the answer is there before the first write needs it. Run beside the first uploads: it
    /// makes no write of any object's key, and every such write waits for its answer.
    pub async fn probe_conditional(&self) {
        self.conditional().await;
    }

    /// Whether the server honours conditional writes: probed at most once per run (a caller
    /// arriving while the probe runs waits for its answer) and remembered in the journal.
    async fn conditional(&self) -> bool {
        *self.conditional.get_or_init(|| self.probe()).await
    }

    /// Asks the server whether it honours `If-None-Match: *`, once per journal: a private
    /// marker key is created twice, create-only. A server that lets the second write through
    /// ignores the header; then every write HEADs its key first, and the operator is told once.
    /// Inconclusive answers (no permission, no network) keep conditional writes on.
    async fn probe(&self) -> bool {
        if self.overwrite == Overwrite::Always {
            return true;
        }
        // Once per destination and journal: the answer is remembered.
        let target = format!("{} {}", self.client.endpoint(), self.client.bucket());
        if let Ok(Some(known)) = self.journal.agent_state("conditional_writes").await {
            if let Some(rest) = known.strip_prefix("ignored ") {
                if rest == target {
                    self.warn_conditions_ignored();
                    return false;
                }
            } else if known.strip_prefix("honoured ") == Some(target.as_str()) {
                return true;
            }
        }
        // One fixed key: a probe cut short by a crash leaves at most this one object, and the
        // next start removes it first.
        let key = format!("{}.ha-edge-probe/conditional-write", self.client.prefix());
        let body = Bytes::from_static(b"ha-edge conditional write probe\n");
        let sha = Sha256::digest(&body);
        let _ = self.client.delete_object(&key).await;
        let first = self
            .client
            .put_object(
                &key,
                body.clone(),
                &sha,
                &Precondition::Create,
                &ObjectMeta::default(),
            )
            .await;
        if first.is_err() {
            tracing::debug!(key, "conditional write probe inconclusive");
            let _ = self.client.delete_object(&key).await;
            return true;
        }
        let second = self
            .client
            .put_object_expecting_refusal(&key, body, &sha, &Precondition::Create)
            .await;
        let _ = self.client.delete_object(&key).await;
        let (found, honoured) = match second {
            Err(e) if is_precondition_failed(&e) => {
                tracing::debug!("destination honours conditional writes (If-None-Match)");
                ("honoured", true)
            }
            Ok(_) => {
                self.warn_conditions_ignored();
                ("ignored", false)
            }
            Err(e) => {
                tracing::debug!(error = %e, "conditional write probe inconclusive");
                return true;
            }
        };
        let _ = self
            .journal
            .set_agent_state("conditional_writes", format!("{found} {target}"))
            .await;
        honoured
    }

    /// The server ignores conditional writes: say so, once per run (every write HEADs its key
    /// first from now on).
    fn warn_conditions_ignored(&self) {
        tracing::warn!(endpoint = %self.client.endpoint(), "the destination ignores conditional writes (If-None-Match: *): falling back to HEAD before every write, which leaves a short race with other writers to the same keys");
    }

    /// The condition a write of this row is made under: create-only for a key never delivered,
    /// replace-only-ours for a new version of one that was.
    fn precondition(&self, row: &ObjectRow) -> Precondition {
        match (self.overwrite, &row.prior_etag) {
            (Overwrite::Always, _) => Precondition::None,
            (Overwrite::Own, None) => Precondition::Create,
            (Overwrite::Own, Some(etag)) => Precondition::Replace(etag.clone()),
        }
    }

    /// Before a write that must not replace someone else's object: nothing at the key, or the
    /// object we recorded, means go ahead (Ok(None)); our own bytes there already count as
    /// delivered; anything else is a conflict.
    async fn key_before_write(
        &self,
        row: &ObjectRow,
        sha: &[u8; 32],
        crc: Option<u64>,
    ) -> Result<Option<Sent>, Stop> {
        self.settle_key(row, sha, crc, true).await
    }

    /// After a write's condition failed (412): our bytes are there (delivered), or it is a
    /// conflict.
    async fn after_precondition_failed(
        &self,
        row: &ObjectRow,
        sha: &[u8; 32],
        crc: Option<u64>,
    ) -> Result<Sent, Stop> {
        self.settle_key(row, sha, crc, false)
            .await?
            .ok_or_else(|| self.conflict(row, "the write's condition failed".into()))
    }

    /// What is at the key decides (see `key_before_write` and `after_precondition_failed`).
    /// Our own bytes there already (an answer lost, a journal started afresh) count as
    /// delivered; anything else is a conflict. Ours means our size and our SHA-256 in its
    /// metadata, or (an upload checked by CRC-64/NVME, `crc`) the server's full-object CRC.
    async fn settle_key(
        &self,
        row: &ObjectRow,
        sha: &[u8; 32],
        crc: Option<u64>,
        before: bool,
    ) -> Result<Option<Sent>, Stop> {
        // A server may close the connection after its 412 without reading our body: the pooled
        // connection is then dead, and one more try takes a fresh one.
        let head = match self.client.head_object(&row.key).await {
            Err(e) if e.is_unanswered() => self.client.head_object(&row.key).await?,
            other => other?,
        };
        let size = row.version.size();
        let ours = hex::encode(sha);
        match head {
            None if before => Ok(None),
            Some(h) if before && h.etag.is_some() && h.etag == row.prior_etag => Ok(None),
            Some(h)
                if h.size == size
                    && (h
                        .meta_sha256
                        .as_deref()
                        .is_some_and(|m| m.eq_ignore_ascii_case(&ours))
                        || crc.is_some_and(|c| verify::check_crc(&h, c).is_ok())) =>
            {
                tracing::info!(key = %row.key, "the object at the key already holds these bytes; counted as delivered");
                Ok(Some(Sent {
                    sha: *sha,
                    landed: landed_of(&h),
                    unrecorded: None,
                }))
            }
            None => Err(self.conflict(row, "the write's condition failed, and now nothing is at the key (another writer is busy with it)".into())),
            Some(h) => Err(self.conflict(
                row,
                format!(
                    "another object is there (size {}, ETag {}, x-amz-meta-sha256 {}); ours: size {size}, SHA-256 {ours}, recorded ETag {}",
                    h.size,
                    h.etag.as_deref().unwrap_or("none"),
                    h.meta_sha256.as_deref().unwrap_or("none"),
                    row.prior_etag.as_deref().unwrap_or("none (first delivery)"),
                ),
            )),
        }
    }

    /// Another writer's object is at the key: the operator's matter, with both objects' facts.
    fn conflict(&self, row: &ObjectRow, detail: String) -> Stop {
        Stop::Conflict {
            bucket: self.client.bucket().to_string(),
            key: row.key.clone(),
            detail,
        }
    }

    /// Before a write on a server that ignores conditions: HEAD decides (see `key_before_write`).
    async fn check_key_first(&self, row: &ObjectRow, sha: &[u8; 32]) -> Result<Option<Sent>, Stop> {
        if self.overwrite == Overwrite::Always || self.conditional().await {
            return Ok(None);
        }
        self.key_before_write(row, sha, None).await
    }

    /// The bucket's client.
    /// The memory budget its reads share.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn client(&self) -> &Arc<S3Client> {
        &self.client
    }

    /// Delivers one object (state pending, uploading or completing) and verifies it.
    pub async fn deliver(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
        stop: watch::Receiver<bool>,
    ) -> (Outcome, Unrecorded) {
        let result = match row.state {
            State::Pending => self.fresh(row, origin, confirm, stop.clone()).await,
            State::Uploading | State::Completing => {
                self.resume(row, origin, confirm, stop.clone()).await
            }
            other => {
                let why = format!("object {} in state {other} cannot be uploaded", row.key);
                return (Outcome::Rejected(why), None);
            }
        };
        // The upload vanished mid-way (aborted by a lifecycle rule, or a server that lost it):
        // start this object over, once per attempt.
        let result = match result {
            // A concurrent conditional write to the same key won the race (409
            // ConditionalRequestConflict): this upload starts over.
            Err(Stop::S3(e)) if e.code() == Some("ConditionalRequestConflict") => {
                if let Ok(Some(id)) = self.journal.upload_id(row.id).await {
                    let _ = self.client.abort_multipart(&row.key, &id).await;
                }
                tracing::warn!(key = %row.key, "a concurrent write to the key conflicted; starting this upload over");
                self.start_over(row, origin, confirm, stop, "conditional write conflict")
                    .await
            }
            Err(Stop::S3(e)) if e.code() == Some("NoSuchUpload") => {
                tracing::warn!(key = %row.key, "multipart upload no longer exists on the server; starting this object over");
                self.start_over(
                    row,
                    origin,
                    confirm,
                    stop,
                    "upload vanished from the server",
                )
                .await
            }
            other => other,
        };
        match result {
            Ok(sent) => {
                let landed = with_requested_sse(sent.landed, self.client.sse());
                (Outcome::Delivered(sent.sha, landed), sent.unrecorded)
            }
            Err(e) => (self.outcome(row, e).await, None),
        }
    }

    /// Maps why a delivery stopped to its outcome; the upload of a version that will never be
    /// completed is aborted first.
    async fn outcome(&self, row: &ObjectRow, e: Stop) -> Outcome {
        let outcome = e.into_outcome();
        // This version will never be completed (gone, refused, or another version now):
        // whatever the server holds of its upload is useless, and would stay open (and billed).
        // The journal knows the upload (the row given may have been read before this attempt
        // created one); an upload aborted already counts as aborted.
        if matches!(
            outcome,
            Outcome::Vanished(_) | Outcome::Rejected(_) | Outcome::Changed(_)
        ) {
            let id = match self.journal.upload_id(row.id).await {
                Ok(Some(id)) => Some(id),
                _ => row.upload_id.clone(),
            };
            if let Some(id) = id {
                let _ = self.client.abort_multipart(&row.key, &id).await;
            }
        }
        outcome
    }

    /// Delivers an object from the start: one PUT below the threshold; else a multipart upload
    /// read once (`fresh_streamed`), or with `checksum = "sha256"` a hash pass, then a recorded
    /// multipart upload.
    async fn fresh(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
        stop: watch::Receiver<bool>,
    ) -> Result<Sent, Stop> {
        let fp = row.version.clone();
        if fp.size() < self.params.multipart_threshold {
            return self.single_put(row, origin, confirm).await;
        }
        if self.crc64nvme() {
            return self.fresh_streamed(row, origin, confirm, stop).await;
        }
        let pinned = pin(row, origin).await?;
        let part_size = part_size_for(fp.size(), self.params.part_size);
        // Pass one: the whole-object hash and each part's, fixed in the journal before any byte
        // is sent; every part sent must be those bytes.
        let hashed = pinned
            .hash_all(&self.budget, fp.size(), Some(part_size))
            .await?;
        let (sha, expected) = (hashed.sha256, hashed.parts.clone());
        if !self
            .journal
            .set_hashed(row.id, fp.clone(), hashed, pinned.pinned_etag())
            .await?
        {
            return Err(Stop::Changed(pinned.what()));
        }
        if let Some(done) = self.check_key_first(row, &sha).await? {
            return Ok(done);
        }
        let meta = self
            .client
            .meta_for_row(&row.key, &row.source, row.flag.is_some());
        let upload_id = self
            .create_recorded(&row.key, PartChecksum::Sha256(&sha), &meta)
            .await?;
        self.journal
            .begin_multipart(row.id, upload_id.clone(), part_size)
            .await?;
        tracing::debug!(key = %row.key, %upload_id, part_size, "multipart upload started");
        self.upload_parts(
            row,
            pinned,
            &upload_id,
            part_size,
            &sha,
            Some(expected),
            Vec::new(),
            stop,
        )
        .await
    }

    /// CreateMultipartUpload, retried once after an ambiguous failure: the answer was lost, but
    /// the upload may exist, so what the journal never knew of is found and aborted first.
    async fn create_recorded(
        &self,
        key: &str,
        checksum: PartChecksum<'_>,
        meta: &ObjectMeta,
    ) -> Result<String, Stop> {
        match self.client.create_multipart(key, checksum, meta).await {
            Ok(id) => Ok(id),
            Err(e) if e.is_ambiguous() => {
                tracing::warn!(key, error = %e, "CreateMultipartUpload may have gone through without its answer; aborting what it may have left before starting again");
                self.sweep_unrecorded_uploads(key).await?;
                Ok(self.client.create_multipart(key, checksum, meta).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A multipart upload read once: the version committed, the upload created for a
    /// full-object CRC-64/NVME and recorded, then the parts cut from one in-order read.
    async fn fresh_streamed(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
        stop: watch::Receiver<bool>,
    ) -> Result<Sent, Stop> {
        let fp = row.version.clone();
        let pinned = pin(row, origin).await?;
        let part_size = part_size_for(fp.size(), self.params.part_size);
        if !self
            .journal
            .start_streamed(row.id, fp, pinned.ctime_ns(), pinned.pinned_etag())
            .await?
        {
            return Err(Stop::Changed(pinned.what()));
        }
        // A server that ignores conditions is asked about the key before completion, once the
        // hashes are known (`complete`): nothing is replaced before then.
        let meta = self
            .client
            .meta_for_row(&row.key, &row.source, row.flag.is_some());
        let upload_id = match self
            .create_recorded(&row.key, PartChecksum::Crc64Nvme(None), &meta)
            .await
        {
            Ok(id) => id,
            Err(Stop::S3(e)) if e.refuses_crc64nvme() => {
                return self.crc_refused(row, origin, confirm, stop, &e, None).await
            }
            Err(e) => return Err(e),
        };
        self.journal
            .begin_multipart(row.id, upload_id.clone(), part_size)
            .await?;
        tracing::debug!(key = %row.key, %upload_id, part_size, "multipart upload started (CRC64NVME, one read)");
        match self
            .stream_parts(row, pinned, &upload_id, part_size, Vec::new(), stop.clone())
            .await
        {
            // The first part's checksum refused (a server that took the upload's but not the
            // parts'): the upload is aborted and the object sent with SHA-256.
            Err(Stop::S3(e)) if e.refuses_crc64nvme() => {
                self.crc_refused(row, origin, confirm, stop, &e, Some(&upload_id))
                    .await
            }
            other => other,
        }
    }

    /// The server refused CRC64NVME: the upload it may have started is aborted, and the object
    /// goes again from the start with SHA-256 (said once).
    async fn crc_refused(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
        stop: watch::Receiver<bool>,
        e: &S3Error,
        upload_id: Option<&str>,
    ) -> Result<Sent, Stop> {
        if let Some(id) = upload_id {
            let _ = self.client.abort_multipart(&row.key, id).await;
        }
        self.fall_back_to_sha256(e);
        self.start_over(
            row,
            origin,
            confirm,
            stop,
            "the destination refused CRC64NVME",
        )
        .await
    }

    /// Sends the parts a streamed upload lacks from one in-order read of the source, fixes the
    /// SHA-256 and CRC of every byte in the journal, and completes.
    #[allow(clippy::too_many_arguments)]
    async fn stream_parts(
        &self,
        row: &ObjectRow,
        pinned: Arc<Pinned>,
        upload_id: &str,
        part_size: u64,
        done: Vec<PartRow>,
        stop: watch::Receiver<bool>,
    ) -> Result<Sent, Stop> {
        let size = row.version.size();
        let upload = self.upload(row, upload_id, part_size, true);
        let source = Arc::new(StreamParts::new(
            pinned.clone(),
            &done,
            part_size,
            size,
            self.journal.clone(),
            row.id,
        ));
        let parts = self
            .sent_parts(
                row,
                upload_id,
                upload.send_parts(&source, &self.budget, done, &stop),
            )
            .await?;
        let read = match source.finish().await {
            // A hash fixed before (a restart after every byte was read) must be found again.
            Ok((sha, _)) if row.sha256.is_some_and(|fixed| fixed != sha) => {
                Err(Stop::Changed(pinned.what()))
            }
            other => other,
        };
        let (sha, crc) = match read {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, Stop::Changed(_)) {
                    // Parts of another version: the upload must never complete.
                    self.client.abort_multipart(&row.key, upload_id).await?;
                }
                return Err(e);
            }
        };
        self.journal.set_streamed_hash(row.id, sha, crc).await?;
        self.complete(row, &pinned, upload_id, &parts, &sha, Some(crc))
            .await
    }

    /// The multipart upload of `row` (parts with their CRC-64/NVME if `crc64nvme`).
    fn upload<'a>(
        &'a self,
        row: &'a ObjectRow,
        upload_id: &'a str,
        part_size: u64,
        crc64nvme: bool,
    ) -> Upload<'a> {
        Upload {
            client: &self.client,
            key: &row.key,
            upload_id,
            size: row.version.size(),
            part_size,
            crc64nvme,
        }
    }

    /// The end of `send_parts`: the parts, or why the delivery stops (an upload of a changed
    /// source is aborted: it must never complete).
    async fn sent_parts(
        &self,
        row: &ObjectRow,
        upload_id: &str,
        sending: impl std::future::Future<Output = Result<Vec<PartRow>, SendError<Stop>>>,
    ) -> Result<Vec<PartRow>, Stop> {
        match sending.await {
            Ok(parts) => Ok(parts),
            Err(SendError::Stopped) => Err(Stop::Interrupted),
            Err(SendError::Panicked(why)) => {
                tracing::error!(error = %why, "a part's task failed");
                Err(Stop::Journal(JournalError::Panicked))
            }
            Err(SendError::Failed(e)) => {
                if matches!(e, Stop::Changed(_)) {
                    // The parts sent so far are of the old version: the upload must never
                    // complete.
                    self.client.abort_multipart(&row.key, upload_id).await?;
                }
                Err(e)
            }
        }
    }

    /// One PUT: read and hash the whole object in one go (within the budget), write it create-only
    /// or replace-ours, and confirm by the server's checksum or a HEAD.
    async fn single_put(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
    ) -> Result<Sent, Stop> {
        let fp = row.version.clone();
        // Memory first, then open, read and hash in one hand-off to the blocking pool.
        let size = fp.size();
        let permit = self.budget.reserve(size).await;
        let (body, sha, ctime) = match origin {
            Origin::Dir(root) => {
                let (root2, p2) = (root.clone(), root.join(&row.rel_path));
                let fp = fp.clone();
                blocking(move || {
                    let (file, ctime_ns) = open_pinned(&root2, &p2, &fp)?;
                    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
                    file.read_exact_at(&mut buf, 0).map_err(|source| Stop::Io {
                        path: p2.clone(),
                        source,
                    })?;
                    check_pinned(&file, &p2, &fp, ctime_ns)?;
                    let sha = Sha256::digest(&buf);
                    Ok((Bytes::from(buf), sha, Some(ctime_ns)))
                })
                .await?
            }
            // One GET, its answer compared with the listing: no HEAD needed first.
            Origin::Bucket { client, prefix } => {
                let pinned = Arc::new(Pinned::Object {
                    client: client.clone(),
                    key: Origin::source_key(prefix, &row.rel_path),
                    fp: fp.clone(),
                    etag: row.source_etag().map(str::to_string),
                });
                let (body, sha) = pinned.read(0, size).await?;
                (body, sha, None)
            }
        };
        // Nothing on the server depends on the journal before a single PUT (a crash before
        // `delivered` is committed just sends the same bytes again), so the hash is recorded
        // with the delivery, under the version guard, in one commit.
        if let Some(done) = self.check_key_first(row, &sha).await? {
            return Ok(done);
        }
        let when = self.precondition(row);
        let meta = self
            .client
            .meta_for_row(&row.key, &row.source, row.flag.is_some());
        let answer = match self
            .client
            .put_object(&row.key, body, &sha, &when, &meta)
            .await
        {
            Ok(a) => a,
            Err(e) if is_precondition_failed(&e) => {
                return self.after_precondition_failed(row, &sha, None).await
            }
            Err(e) => return Err(e.into()),
        };
        let mut landed = Landed {
            etag: answer.etag.clone(),
            version: answer.version.clone(),
            checksum: answer
                .checksum_sha256
                .as_ref()
                .map(|c| format!("sha256:{c}")),
            sse: answer.sse.clone(),
            kms_key_id: answer.kms_key_id.clone(),
            sse_confirmed: answer.sse.is_some(),
            source_ctime_ns: ctime,
        };
        match answer.checksum_sha256 {
            Some(cs) if cs != b64(&sha) => {
                return Err(Stop::Verify {
                    bucket: self.client.bucket().to_string(),
                    key: row.key.clone(),
                    detail: format!("the server computed SHA-256 {cs} for what it stored"),
                })
            }
            // The server hashed what it stored and it is our SHA-256 (so also our size).
            Some(_) if confirm == Confirm::Answer => {}
            _ => {
                let head = self.verify(&row.key, fp.size(), &sha, None, None).await?;
                if landed.etag.is_none() {
                    landed = Landed {
                        source_ctime_ns: ctime,
                        ..landed_of(&head)
                    };
                } else if landed.checksum.is_none() {
                    landed.checksum = landed_of(&head).checksum;
                }
            }
        }
        // Until `delivered` is committed, a crash sends these bytes again: they stay counted.
        Ok(Sent {
            sha,
            landed,
            unrecorded: Some(permit),
        })
    }

    /// Continues an upload found in the journal after a restart or a retry.
    async fn resume(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
        stop: watch::Receiver<bool>,
    ) -> Result<Sent, Stop> {
        if row.upload_id.is_none() {
            // Interrupted between "hashed" and "upload id recorded": CreateMultipartUpload may
            // have gone through, and that upload would stay open (and billed) forever.
            self.sweep_unrecorded_uploads(&row.key).await?;
            return self
                .start_over(row, origin, confirm, stop, "upload start was interrupted")
                .await;
        }
        // A streamed upload has its SHA-256 only once every byte was read.
        let (Some(upload_id), Some(part_size), true) = (
            &row.upload_id,
            row.part_size,
            row.sha256.is_some() || row.streamed,
        ) else {
            return self
                .start_over(
                    row,
                    origin,
                    confirm,
                    stop,
                    "incomplete journal row; starting over",
                )
                .await;
        };
        let fp = row.version.clone();
        let pinned = match pin(row, origin).await {
            Ok(p) => p,
            Err(Stop::Changed(p)) => {
                self.client.abort_multipart(&row.key, upload_id).await?;
                return Err(Stop::Changed(p));
            }
            Err(e) => return Err(e),
        };
        let journaled = self.journal.parts(row.id).await?;
        let server = match self.client.list_parts(&row.key, upload_id).await {
            Ok(parts) => Some(parts),
            Err(e) if e.code() == Some("NoSuchUpload") => None,
            Err(e) => return Err(e.into()),
        };
        let on_server = |p: &PartRow| {
            server
                .iter()
                .flatten()
                .any(|s| s.number == p.number && s.size == p.size && s.etag == p.etag)
        };
        let (mut keep, mut drop) = (Vec::new(), Vec::new());
        for p in &journaled {
            if on_server(p) {
                keep.push(p.clone());
            } else {
                drop.push(p.number);
            }
        }
        // The upload is gone (NoSuchUpload, or listed without any part we recorded, as some
        // servers do for an upload they completed or lost).
        if server.is_none() || (keep.is_empty() && !drop.is_empty()) {
            // Completion is requested only after `completing` is committed: then it may have
            // gone through before the restart, and the stored object decides.
            if let (State::Completing, Some(sha)) = (row.state, row.sha256) {
                if let Ok(head) = self
                    .verify(&row.key, fp.size(), &sha, row.crc64nvme, Some(&journaled))
                    .await
                {
                    tracing::info!(key = %row.key, "upload had completed before the restart; verified");
                    return Ok(Sent {
                        sha,
                        landed: landed_of(&head),
                        unrecorded: None,
                    });
                }
            }
            tracing::warn!(key = %row.key, "multipart upload no longer exists on the server; starting this object over");
            if server.is_some() {
                let _ = self.client.abort_multipart(&row.key, upload_id).await;
            }
            return self
                .start_over(
                    row,
                    origin,
                    confirm,
                    stop,
                    "upload vanished from the server",
                )
                .await;
        }
        if !drop.is_empty() {
            tracing::warn!(key = %row.key, parts = ?drop, "parts recorded in the journal are missing on the server; sending them again");
            self.journal.drop_parts(row.id, drop).await?;
        }
        tracing::info!(key = %row.key, parts_done = keep.len(), "resuming multipart upload");
        match row.sha256 {
            _ if row.streamed => {
                self.stream_parts(row, pinned, upload_id, part_size, keep, stop)
                    .await
            }
            Some(sha) => {
                self.upload_parts(
                    row,
                    pinned,
                    upload_id,
                    part_size,
                    &sha,
                    row.part_hashes.clone(),
                    keep,
                    stop,
                )
                .await
            }
            None => unreachable!("checked above: a row that is not streamed has its SHA-256"),
        }
    }

    /// Aborts uploads of `key` that the journal never recorded. A server without
    /// ListMultipartUploads (501) gets one warning per process: only a lifecycle rule
    /// (AbortIncompleteMultipartUpload) can clean up there.
    async fn sweep_unrecorded_uploads(&self, key: &str) -> Result<(), Stop> {
        match self.client.list_uploads_for_key(key).await {
            Ok(ids) => {
                for id in ids {
                    self.client.abort_multipart(key, &id).await?;
                    tracing::info!(key, upload_id = %id, "aborted a multipart upload left by an interrupted start");
                }
                Ok(())
            }
            Err(e) if e.status() == Some(501) || e.code() == Some("NotImplemented") => {
                if !self
                    .warned_no_listing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(key, "the server cannot list multipart uploads (ListMultipartUploads not implemented): an upload whose start was interrupted by a crash may stay open there; set an AbortIncompleteMultipartUpload lifecycle rule on the bucket");
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets the object's upload in the journal and sends it again from the start.
    async fn start_over(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        confirm: Confirm,
        stop: watch::Receiver<bool>,
        why: &str,
    ) -> Result<Sent, Stop> {
        self.journal.reset(row.id, None, why.to_string()).await?;
        let fresh_row = ObjectRow {
            state: State::Pending,
            sha256: None,
            upload_id: None,
            part_size: None,
            // A pin of this attempt is forgotten by the reset (a listed ETag stays).
            pinned_etag: None,
            ctime_ns: None,
            part_hashes: None,
            streamed: false,
            crc64nvme: None,
            ..row.clone()
        };
        Box::pin(self.fresh(&fresh_row, origin, confirm, stop)).await
    }

    /// Sends the parts an upload lacks (see `s3::multipart`), checks the source is still the
    /// version hashed, completes under the write's condition and verifies the result.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        row: &ObjectRow,
        source: Arc<Pinned>,
        upload_id: &str,
        part_size: u64,
        sha: &[u8; 32],
        expected: Option<Vec<[u8; 32]>>,
        done: Vec<PartRow>,
        stop: watch::Receiver<bool>,
    ) -> Result<Sent, Stop> {
        let upload = self.upload(row, upload_id, part_size, false);
        let parts_source = Arc::new(SourceParts {
            source: source.clone(),
            expected: expected.unwrap_or_default(),
            journal: self.journal.clone(),
            id: row.id,
        });
        let parts = self
            .sent_parts(
                row,
                upload_id,
                upload.send_parts(&parts_source, &self.budget, done, &stop),
            )
            .await?;
        self.complete(row, &source, upload_id, &parts, sha, None)
            .await
    }

    /// Completes an upload whose parts are all there: the source must still be the version
    /// sent; then completion under the write's condition (with the full-object CRC, `crc`, for
    /// a streamed upload) and the check of the stored object.
    async fn complete(
        &self,
        row: &ObjectRow,
        source: &Arc<Pinned>,
        upload_id: &str,
        parts: &[PartRow],
        sha: &[u8; 32],
        crc: Option<u64>,
    ) -> Result<Sent, Stop> {
        let size = row.version.size();
        if let Err(e) = source.check().await {
            self.client.abort_multipart(&row.key, upload_id).await?;
            return Err(e);
        }
        // A new version replaces our own object only. Not every server honours If-Match on
        // completion (nor any condition, see `probe_conditional`): HEAD first in those cases.
        let when = self.precondition(row);
        if matches!(when, Precondition::Replace(_)) || !self.conditional().await {
            let found = self.key_before_write(row, sha, crc).await;
            if !matches!(found, Ok(None)) {
                // Someone else's object (a conflict), or ours already: this upload is not needed.
                self.client.abort_multipart(&row.key, upload_id).await?;
                return found.map(|done| done.expect("matched Some above"));
            }
        }
        self.journal.set_state(row.id, State::Completing).await?;
        let list = Upload::manifest(parts);
        match self
            .client
            .complete_multipart(&row.key, upload_id, &list, &when, crc)
            .await
        {
            Ok(()) => {}
            Err(e) if is_precondition_failed(&e) => {
                let _ = self.client.abort_multipart(&row.key, upload_id).await;
                return self.after_precondition_failed(row, sha, crc).await;
            }
            // The first attempt may have gone through with its answer lost: the retry then
            // fails (NoSuchUpload on S3; some servers answer 403 for an upload id they no
            // longer know). The stored object decides.
            Err(e) => {
                return match self.verify(&row.key, size, sha, crc, Some(parts)).await {
                    Ok(head) => {
                        tracing::info!(key = %row.key, error = %e, "completion had gone through before the error; object verified");
                        Ok(Sent {
                            sha: *sha,
                            landed: landed_of(&head),
                            unrecorded: None,
                        })
                    }
                    // The upload is gone and the stored object is not ours: say what is wrong
                    // with the object.
                    Err(not_ours) if e.code() == Some("NoSuchUpload") => Err(not_ours),
                    Err(_) => Err(e.into()),
                };
            }
        }
        let head = self.verify(&row.key, size, sha, crc, Some(parts)).await?;
        Ok(Sent {
            sha: *sha,
            landed: landed_of(&head),
            unrecorded: None,
        })
    }

    /// HEAD the object: the size must match, the SHA-256 in its metadata (or, for a streamed
    /// upload, the server's full-object CRC-64/NVME, `crc`) must be ours, and a checksum the
    /// server reports must be the one for our bytes.
    async fn verify(
        &self,
        key: &str,
        size: u64,
        sha: &[u8; 32],
        crc: Option<u64>,
        parts: Option<&[PartRow]>,
    ) -> Result<Head, Stop> {
        verify::verify_full(&self.client, key, size, sha, crc, parts)
            .await
            .map_err(|e| match e {
                VerifyError::S3(e) => Stop::S3(e),
                VerifyError::Mismatch(m) => Stop::Verify {
                    bucket: self.client.bucket().to_string(),
                    key: key.to_string(),
                    detail: m.to_string(),
                },
            })
    }
}

/// The agent's side of a multipart upload: parts read from the pinned source version, each
/// the bytes hashed in the first pass, and each acknowledged part journaled before it counts.
struct SourceParts {
    source: Arc<Pinned>,
    /// The SHA-256 of every part from the hash pass (empty: not known, e.g. an older journal).
    expected: Vec<[u8; 32]>,
    journal: Journal,
    id: i64,
}

impl PartSource for SourceParts {
    /// Failures stop the delivery with their reason.
    type Error = Stop;

    /// Reads one part from the pinned source; its SHA-256 must be the one of the hash pass.
    async fn read(
        &self,
        number: u32,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Option<[u8; 32]>), Stop> {
        let (body, sha) = self.source.read(offset, len).await?;
        // The bytes hashed in pass one, or the source is not that version.
        if self
            .expected
            .get(number as usize - 1)
            .is_some_and(|want| *want != sha)
        {
            return Err(Stop::Changed(self.source.what()));
        }
        Ok((body, Some(sha)))
    }

    /// Journals an acknowledged part: after a crash it is not sent again.
    async fn sent(&self, part: &PartRow) -> Result<(), Stop> {
        super::stream::journal_part(&self.journal, self.id, part).await
    }
}

/// What a HEAD says the delivery landed as (ETag, version, checksum, encryption).
fn landed_of(head: &Head) -> Landed {
    Landed {
        etag: head.etag.clone(),
        version: head.version.clone(),
        checksum: match (&head.checksum_sha256, &head.checksum_crc64nvme) {
            (Some(c), _) => Some(format!("sha256:{c}")),
            (None, Some(c)) => Some(format!("crc64nvme:{c}")),
            (None, None) => None,
        },
        sse: head.sse.clone(),
        kms_key_id: head.kms_key_id.clone(),
        sse_confirmed: head.sse.is_some(),
        source_ctime_ns: None,
    }
}

/// Where the server did not say how the object is encrypted, what was asked for.
fn with_requested_sse(mut landed: Landed, sse: Option<&Sse>) -> Landed {
    if landed.sse.is_none() {
        match sse {
            None => {}
            Some(Sse::Aes256) => landed.sse = Some("AES256".into()),
            Some(Sse::Kms { key_id }) => {
                landed.sse = Some("aws:kms".into());
                landed.kms_key_id.clone_from(key_id);
            }
        }
    }
    landed
}

/// 412 PreconditionFailed: the write's condition (If-None-Match, If-Match) did not hold.
fn is_precondition_failed(e: &S3Error) -> bool {
    e.status() == Some(412) || e.code() == Some("PreconditionFailed")
}

/// A delivered object: its SHA-256, what the destination answered, and for a single PUT its
/// share of the budget (a multipart upload recorded every part before giving its share back).
struct Sent {
    sha: [u8; 32],
    landed: Landed,
    unrecorded: Unrecorded,
}

/// How a single PUT is confirmed before the object counts as delivered (a multipart upload is
/// always read back with HEAD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// By the SHA-256 the server computed over what it stored, which S3 sends back in its answer
    /// (`x-amz-checksum-sha256`); read back with HEAD only if the answer has none.
    Answer,
    /// Read back with HEAD as well: the source is deleted or moved next.
    ReadBack,
}

/// The part size for a file: the configured one, raised if needed to stay within 10,000 parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    let min_needed = size.div_ceil(MAX_PARTS);
    let mib = 1024 * 1024;
    configured
        .max(min_needed.div_ceil(mib) * mib)
        .min(MAX_PART_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configured part size holds until an object would need more than 10,000 parts.
    #[test]
    fn part_size_grows_only_past_ten_thousand_parts() {
        let mib = 1 << 20;
        assert_eq!(part_size_for(100 * mib, 8 * mib), 8 * mib);
        // 100 GiB / 10,000 = 10.24 MiB -> 11 MiB
        assert_eq!(part_size_for(100 << 30, 8 * mib), 11 * mib);
        assert!((5u64 << 40).div_ceil(part_size_for(5 << 40, 8 * mib)) <= MAX_PARTS);
    }
}
