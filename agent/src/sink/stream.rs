//! Reading one source version once, in order, for a multipart upload checked by a full-object
//! CRC-64/NVME: the parts are cut from one sequential read (one positioned read stream per file,
//! one GET per bucket object, pinned to its ETag), and the whole object's SHA-256 and CRC are
//! computed as the bytes pass. Each part's own SHA-256 (its signature) and CRC are computed in
//! its upload task (`s3::multipart`), in parallel.
//!
//! # Design
//! - `read` is called for the parts the server lacks, in order, once each part's share of the
//!   memory budget is held. The parts before it that the server holds already (a resumed
//!   upload) are read first, in small chunks, only to hash them: each must have the CRC-64/NVME
//!   journaled when it was sent, or the source is not that version. So after a restart the
//!   prefix is read once more; within one attempt, every byte is read once.
//! - A file is checked against its version (size, mtime, inode, ctime) before every part and at
//!   the end; an object's GET is pinned with If-Match and its answer compared with the listing.
//!   A GET cut short is opened again from the next byte needed (still pinned), a few times.
//! - `finish` reads what is left (parts held at the end) and returns the SHA-256 and CRC of
//!   every byte: what the journal, the completion and the receipt carry.
//!
//! Must not break: the hashes returned are of exactly the bytes the server holds or was sent,
//! in order; no part is read before its budget is held; a changed source is `Stop::Changed`.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::read::{blocking, buffer_len, check_pinned, Pinned, Stop};
use crate::hash::{Crc64Nvme, Sha256};
use crate::journal::{Journal, PartRow};
use crate::s3::multipart::PartSource;
use crate::s3::Streamed;

/// Chunk size for hashing parts the server holds already (a resumed upload).
const SKIP_CHUNK: usize = 1 << 20;
/// How many times a GET cut short is opened again within one attempt.
const REOPENS: u32 = 3;

/// The in-order reader of one upload.
pub struct StreamParts {
    pinned: Arc<Pinned>,
    /// Parts the server holds (a resumed upload): number -> the CRC-64/NVME journaled for it.
    held: HashMap<u32, Option<String>>,
    part_size: u64,
    size: u64,
    journal: Journal,
    id: i64,
    cursor: tokio::sync::Mutex<Cursor>,
}

/// Where the read stands, and the hashes of everything before it.
#[derive(Default)]
struct Cursor {
    pos: u64,
    sha: Sha256,
    crc: Crc64Nvme,
    /// A bucket object's open GET, and what is left of its last chunk.
    body: Option<Streamed>,
    rest: Bytes,
    reopens: u32,
}

impl StreamParts {
    /// A reader of `pinned` (`size` bytes in parts of `part_size`); `held` are the parts the
    /// server has already.
    pub fn new(
        pinned: Arc<Pinned>,
        held: &[PartRow],
        part_size: u64,
        size: u64,
        journal: Journal,
        id: i64,
    ) -> StreamParts {
        StreamParts {
            pinned,
            held: held
                .iter()
                .map(|p| (p.number, p.crc64nvme_b64.clone()))
                .collect(),
            part_size,
            size,
            journal,
            id,
            cursor: tokio::sync::Mutex::new(Cursor::default()),
        }
    }

    /// A reader for a transfer that goes on from any byte (the QUIC relay's sealed offers):
    /// no parts, `hash_up_to` the offset the relay holds, then `next_bytes` to the end, then
    /// `finish`.
    pub fn whole(pinned: Arc<Pinned>, size: u64, journal: Journal, id: i64) -> StreamParts {
        StreamParts::new(pinned, &[], size.max(1), size, journal, id)
    }

    /// Reads and hashes the bytes before `to` without handing them out: what a resumed
    /// transfer's receiver holds already, read once more (only after a fault) so that the
    /// whole-object hashes cover it. Nothing checks them here: the receiver checks the whole.
    pub async fn hash_up_to(&self, to: u64) -> Result<(), Stop> {
        let mut cur = self.cursor.lock().await;
        while cur.pos < to {
            let n = (to - cur.pos).min(SKIP_CHUNK as u64);
            self.next(&mut cur, n).await?;
        }
        Ok(())
    }

    /// The next `len` bytes in order (fewer at the end), with their offset; hashed into the
    /// whole-object hashes.
    pub async fn next_bytes(&self, len: u64) -> Result<(u64, Bytes), Stop> {
        let mut cur = self.cursor.lock().await;
        let at = cur.pos;
        let len = len.min(self.size - at);
        if let Pinned::File { .. } = &*self.pinned {
            return Ok((at, self.next(&mut cur, len).await?));
        }
        let mut buf = BytesMut::with_capacity(buffer_len(len)?);
        while (buf.len() as u64) < len {
            let chunk = self.next(&mut cur, len - buf.len() as u64).await?;
            buf.extend_from_slice(&chunk);
        }
        Ok((at, buf.freeze()))
    }

    /// Reads the rest (parts the server holds, after the last one sent) and returns the SHA-256
    /// and CRC-64/NVME of the whole source (whether it is still that version is checked before
    /// completion).
    pub async fn finish(&self) -> Result<([u8; 32], u64), Stop> {
        let mut cur = self.cursor.lock().await;
        self.skip_to(&mut cur, self.size).await?;
        let cur = std::mem::take(&mut *cur);
        Ok((cur.sha.finalize(), cur.crc.sum()))
    }

    /// Hashes the parts the server holds from the cursor up to `to` (a part boundary, or the
    /// end), checking each against its journaled CRC.
    async fn skip_to(&self, cur: &mut Cursor, to: u64) -> Result<(), Stop> {
        while cur.pos < to {
            let number = u32::try_from(cur.pos / self.part_size + 1).unwrap_or(u32::MAX);
            let len = (self.size - cur.pos).min(self.part_size);
            let Some(want) = self.held.get(&number) else {
                // Only parts the server holds are skipped; anything else is a caller's bug.
                return Err(Stop::Changed(self.pinned.what()));
            };
            let mut part = Crc64Nvme::new();
            let mut left = len;
            while left > 0 {
                let n = left.min(SKIP_CHUNK as u64);
                let chunk = self.next(cur, n).await?;
                part.update(&chunk);
                left -= chunk.len() as u64;
            }
            if want
                .as_deref()
                .is_some_and(|w| w != Crc64Nvme::b64(part.sum()))
            {
                return Err(Stop::Changed(self.pinned.what()));
            }
        }
        Ok(())
    }

    /// The next `len` bytes at the cursor (at most `len`; fewer only from a bucket object, one
    /// chunk at a time), added to the whole-source hashes.
    async fn next(&self, cur: &mut Cursor, len: u64) -> Result<Bytes, Stop> {
        let bytes = match &*self.pinned {
            Pinned::File { .. } => {
                let (pinned, pos) = (self.pinned.clone(), cur.pos);
                let (mut sha, mut crc) =
                    (std::mem::take(&mut cur.sha), std::mem::take(&mut cur.crc));
                let (bytes, sha, crc) = blocking(move || {
                    let Pinned::File {
                        file,
                        path,
                        fp,
                        ctime_ns,
                    } = &*pinned
                    else {
                        unreachable!("matched a file")
                    };
                    check_pinned(file, path, fp, *ctime_ns)?;
                    let mut buf = vec![0u8; buffer_len(len)?];
                    file.read_exact_at(&mut buf, pos)
                        .map_err(|source| Stop::Io {
                            path: path.clone(),
                            source,
                        })?;
                    sha.update(&buf);
                    crc.update(&buf);
                    Ok((Bytes::from(buf), sha, crc))
                })
                .await?;
                (cur.sha, cur.crc) = (sha, crc);
                bytes
            }
            Pinned::Object { .. } => {
                let bytes = self.object_chunk(cur, len).await?;
                cur.sha.update(&bytes);
                cur.crc.update(&bytes);
                bytes
            }
        };
        cur.pos += bytes.len() as u64;
        Ok(bytes)
    }

    /// Up to `len` bytes of a bucket object at the cursor, from its open GET (opened, or opened
    /// again after a cut, from the cursor, pinned to the ETag).
    async fn object_chunk(&self, cur: &mut Cursor, len: u64) -> Result<Bytes, Stop> {
        loop {
            if !cur.rest.is_empty() {
                let n = usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .min(cur.rest.len());
                return Ok(cur.rest.split_to(n));
            }
            if cur.body.is_none() {
                cur.body = Some(self.open(cur.pos).await?);
            }
            let body = cur.body.as_mut().expect("opened above");
            match body.chunk().await {
                Ok(Some(c)) => cur.rest = c,
                // The body ended or broke before the object's end: open it again from here.
                Ok(None) | Err(_) if cur.reopens < REOPENS => {
                    cur.reopens += 1;
                    cur.body = None;
                    tracing::debug!(source = %self.pinned.what(), at = cur.pos, "source read cut short; reading on from there");
                }
                Ok(None) => {
                    return Err(Stop::Source(crate::s3::S3Error::Protocol {
                        op: "GetObject",
                        bucket: String::new(),
                        key: self.pinned.what(),
                        detail: format!("the object ended at byte {} of {}", cur.pos, self.size),
                    }))
                }
                Err(e) => return Err(Stop::Source(e)),
            }
        }
    }

    /// Opens the object's GET from `from`, pinned to its ETag, and checks the answer against
    /// the version being sent.
    async fn open(&self, from: u64) -> Result<Streamed, Stop> {
        let Pinned::Object {
            client, key, etag, ..
        } = &*self.pinned
        else {
            unreachable!("opened for objects only")
        };
        let s = client
            .get_stream(key, from, etag.as_deref())
            .await
            .map_err(|e| self.pinned.source_error(e))?;
        self.pinned
            .answer_pinned(s.total, s.last_modified.as_deref(), s.etag.as_deref())?;
        Ok(s)
    }
}

impl PartSource for StreamParts {
    /// Failures stop the delivery with their reason.
    type Error = Stop;

    /// One read, in order.
    fn in_order(&self) -> bool {
        true
    }

    /// Hashes the held parts before `offset`, then reads this part (`len` bytes); its own
    /// hashes are computed in its task.
    async fn read(
        &self,
        _number: u32,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Option<[u8; 32]>), Stop> {
        let mut cur = self.cursor.lock().await;
        self.skip_to(&mut cur, offset).await?;
        if let Pinned::File { .. } = &*self.pinned {
            return Ok((self.next(&mut cur, len).await?, None));
        }
        let mut buf = BytesMut::with_capacity(buffer_len(len)?);
        while (buf.len() as u64) < len {
            let chunk = self.next(&mut cur, len - buf.len() as u64).await?;
            buf.extend_from_slice(&chunk);
        }
        Ok((buf.freeze(), None))
    }

    /// Journals an acknowledged part (`journal_part`).
    async fn sent(&self, part: &PartRow) -> Result<(), Stop> {
        journal_part(&self.journal, self.id, part).await
    }
}

/// An acknowledged part of object `id`, journaled (after a crash it is not sent again) and
/// shown on the progress board; shared by both ways of reading the parts.
pub async fn journal_part(journal: &Journal, id: i64, part: &PartRow) -> Result<(), Stop> {
    journal.record_part(id, part.clone()).await?;
    crate::progress::board().advance(id, part.size);
    Ok(())
}
