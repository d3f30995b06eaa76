//! Delivery of one journaled object to a QUIC relay (`[destination] type = "quic"`): one stream
//! per object on a shared connection, driven by the sans-IO `Upload` machine of `ha-edge-proto`.
//!
//! Journal states are the S3 path's, and an object is delivered only on the relay's `Stored`
//! (it verified size and SHA-256 and stored the object) or `AlreadyHave`. A transfer interrupted
//! by a lost connection, a relay restart or our own restart offers the object again and sends
//! from the offset the relay confirms it holds.
//!
//! Every source byte is read once:
//! - An object that goes in one flight (an eager offer, up to 1 MiB) is read into memory within
//!   the budget and hashed from the bytes that are sent; its SHA-256 is journaled before the
//!   offer.
//! - A larger one goes as a sealed offer (to a relay that announced `CAP_SEAL`): the journal
//!   fixes its version first (`uploading`, no hash), the offer names a transfer id derived from
//!   the journal row and that version, the object is read once, in order (`StreamParts`, one
//!   GET for a bucket object), hashed as it is sent, and its SHA-256 (and CRC-64/NVME) is
//!   journaled before it goes with the commit (`Seal`). A resume reads the prefix the relay
//!   holds once more, only to hash it. A relay that holds an object of that size at the key
//!   answers `Present`: the object is hashed and offered again with its SHA-256, which the
//!   relay may answer `AlreadyHave` (a lost journal resends nothing).
//! - To an older relay, a larger object is hashed first and read again to be sent.
//!
//! # One object on one stream
//! ```text
//!  agent                                    relay
//!  Offer {key, size, sha256}  ───────────▶
//!   | SealedOffer {key, size, transfer}
//!                             ◀───────────  Resume {offset} | AlreadyHave | Present | Refuse
//!  Data (from offset) …       ───────────▶  appended to the partial, in order
//!  Commit | Seal {sha256}     ───────────▶  fsync, size and SHA-256 checked, landed
//!                             ◀───────────  Stored | Refuse {reason}
//! ```
//! Refusals map into the sink's `DestinationError` (this agent, a key outside its prefix, the
//! protocol version) or to `Rejected`/`Retry` (a bad key; busy or unavailable).
//!
//! Must not break: an object counts as delivered only on the relay's `Stored` or `AlreadyHave`
//! for a SHA-256 journaled before the relay was asked to check it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ha_edge_proto::{Refusal, SessionError, Upload, UploadEvent, MAX_DATA};
use tokio::sync::watch;

use super::error::{Code, DestinationError, Scope};
use super::read::{pin, Budget, Origin, Pinned, Stop};
use super::stream::StreamParts;
use super::Outcome;
use crate::journal::{Hashed, Journal, ObjectRow, State};
use crate::relay::client::{LinkError, RelayClient};

/// Delivery to one relay over one shared QUIC connection.
pub struct RelaySink {
    client: Arc<RelayClient>,
    journal: Journal,
    budget: Budget,
}

/// Why a relay delivery stopped.
#[derive(Debug, thiserror::Error)]
enum RStop {
    #[error(transparent)]
    Read(#[from] Stop),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("relay protocol: {0}")]
    Session(#[from] SessionError),
    #[error("the relay refuses {key}: {reason:?}: {message}")]
    Refused {
        key: String,
        reason: Refusal,
        message: String,
    },
    #[error(
        "the relay received something else than offered for {key} ({message}); sending it again"
    )]
    Mismatch { key: String, message: String },
}

/// Objects up to this size go in one flight (an eager offer): well inside one stream's
/// flow-control window, so the whole object is written before any answer is read.
const EAGER_MAX: u64 = 2 * MAX_DATA as u64;

/// What the relay answered, or that the stream ended without an answer.
type Answer = Result<UploadEvent, RStop>;

impl RelaySink {
    /// A sink over `client`; `budget_bytes` bounds the bytes read ahead of the stream.
    pub fn new(client: Arc<RelayClient>, journal: Journal, budget_bytes: u64) -> RelaySink {
        RelaySink {
            client,
            journal,
            budget: Budget::new(budget_bytes),
        }
    }

    /// The link.
    /// The memory budget its reads share.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn client(&self) -> &Arc<RelayClient> {
        &self.client
    }

    /// Delivers one object: fix its hash, offer it, send from the offset the relay holds, and wait
    /// for Stored.
    pub async fn deliver(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        stop: watch::Receiver<bool>,
    ) -> Outcome {
        match self.send(row, origin, stop).await {
            Ok(sha) => Outcome::Delivered(sha, crate::journal::Landed::default()),
            Err(e) => self.outcome(e),
        }
    }

    /// Maps why a relay delivery stopped to its outcome (refusals into `DestinationError`).
    fn outcome(&self, e: RStop) -> Outcome {
        match e {
            RStop::Read(stop) => stop.into_outcome(),
            RStop::Link(LinkError::Unreachable { .. }) => Outcome::Unreachable(e.to_string()),
            RStop::Link(LinkError::Refused { relay, detail }) => {
                Outcome::Destination(refused_agent(&relay, &detail))
            }
            RStop::Link(LinkError::Setup(ref m)) => Outcome::Destination(DestinationError {
                scope: Scope::Destination,
                code: Code::Setup,
                detail: m.clone(),
                advice: None,
            }),
            RStop::Link(LinkError::Protocol { .. }) | RStop::Session(_) => {
                Outcome::Retry(e.to_string())
            }
            RStop::Refused {
                key,
                reason,
                message,
            } => match reason {
                Refusal::Unauthorized => Outcome::Destination(DestinationError {
                    scope: Scope::Source,
                    code: Code::AccessDenied,
                    detail: format!("relay {} refuses {key}: {message}", self.client.relay()),
                    advice: Some(PREFIX_ADVICE),
                }),
                Refusal::Version => Outcome::Destination(DestinationError {
                    scope: Scope::Destination,
                    code: Code::VersionRefused,
                    detail: format!("relay {} refuses {key}: {message}", self.client.relay()),
                    advice: Some(AGENT_ADVICE),
                }),
                Refusal::BadKey | Refusal::Rejected => {
                    Outcome::Rejected(format!("the relay refuses the key {key}: {message}"))
                }
                Refusal::Busy | Refusal::Unavailable => {
                    Outcome::Retry(format!("the relay cannot take {key} now: {message}"))
                }
            },
            RStop::Mismatch { .. } => Outcome::Retry(e.to_string()),
        }
    }

    /// The delivery's steps; the SHA-256 once the relay has the object.
    async fn send(
        &self,
        row: &ObjectRow,
        origin: &Origin,
        stop: watch::Receiver<bool>,
    ) -> Result<[u8; 32], RStop> {
        let fp = row.version.clone();
        let size = fp.size();
        let pinned = pin(row, origin).await?;
        // The relay's capabilities come with the connection.
        let conn = self.client.connection().await?;
        if size > EAGER_MAX && self.client.sealed() {
            let sent = self.sealed(&conn, row, pinned, stop).await;
            return self.forget_if_unreachable(&conn, sent).await;
        }
        // An object that goes in one flight is read once, within the budget: hashed from the
        // bytes that are then sent. A larger one (to a relay without sealed offers) is hashed
        // first, then read to be sent.
        let whole = if self.client.eager() && size <= EAGER_MAX {
            let permit = self.budget.reserve(size).await;
            let (bytes, sha) = pinned.read(0, size).await?;
            Some((permit, bytes, sha))
        } else {
            None
        };
        // The hash is fixed before the first offer, and kept for every later attempt: the relay
        // keys its partial transfer on (key, SHA-256), and checks the bytes against it.
        let sha = match (row.state, row.sha256) {
            (State::Uploading | State::Completing, Some(sha)) => sha,
            _ => {
                let hashed = match &whole {
                    Some((_, _, sha)) => Hashed {
                        sha256: *sha,
                        parts: Vec::new(),
                        ctime_ns: pinned.ctime_ns(),
                    },
                    None => pinned.hash_all(&self.budget, size, None).await?,
                };
                let sha = hashed.sha256;
                if !self
                    .journal
                    .set_hashed(row.id, fp.clone(), hashed, pinned.pinned_etag())
                    .await
                    .map_err(Stop::Journal)?
                {
                    return Err(Stop::Changed(pinned.what()).into());
                }
                sha
            }
        };
        let sent = match whole {
            Some((_permit, bytes, _)) => self.eager(&conn, row, &pinned, sha, bytes).await,
            None => self.offer(&conn, row, &pinned, sha, stop).await,
        };
        self.forget_if_unreachable(&conn, sent).await
    }

    /// A connection that failed is not used again.
    async fn forget_if_unreachable(
        &self,
        conn: &quinn::Connection,
        sent: Result<[u8; 32], RStop>,
    ) -> Result<[u8; 32], RStop> {
        if let Err(RStop::Link(LinkError::Unreachable { .. })) = &sent {
            self.client.forget(conn).await;
        }
        sent
    }

    /// An object larger than one flight, to a relay that takes sealed offers: read once, in
    /// order, hashed as it is sent; its SHA-256 (fixed in the journal first) goes with the
    /// commit. A resumed transfer reads the bytes the relay holds once more, to hash them.
    async fn sealed(
        &self,
        conn: &quinn::Connection,
        row: &ObjectRow,
        pinned: Arc<Pinned>,
        stop: watch::Receiver<bool>,
    ) -> Result<[u8; 32], RStop> {
        let size = row.version.size();
        // Fixed before: a retry (the relay found a mismatch, or the commit's answer was lost).
        let mut known = match (row.state, row.sha256) {
            (State::Uploading | State::Completing, Some(sha)) => Some((sha, row.crc64nvme)),
            _ => None,
        };
        if row.state == State::Pending
            && !self
                .journal
                .start_streamed(
                    row.id,
                    row.version.clone(),
                    pinned.ctime_ns(),
                    pinned.pinned_etag(),
                )
                .await
                .map_err(Stop::Journal)?
        {
            return Err(Stop::Changed(pinned.what()).into());
        }
        let idle = self.client.idle();
        let transfer = transfer_id(row);
        let mut buf = vec![0u8; 16 * 1024];
        // At most twice: once more with the SHA-256 if an object of this size is at the key.
        let (offset, mut up, mut send, mut recv) = loop {
            let (mut send, mut recv) = self.open_stream(conn).await?;
            let mut up = Upload::new_sealed(&row.key, size, transfer, known, Instant::now(), idle);
            self.flush(conn, &mut up, &mut send).await?;
            match self.answer(conn, &mut up, &mut recv, &mut buf).await? {
                UploadEvent::SendFrom(offset) => break (offset, up, send, recv),
                UploadEvent::AlreadyStored => {
                    tracing::info!(key = %row.key, "the relay already stores this object (same SHA-256)");
                    // The machine takes `AlreadyHave` only for an offer that named its SHA-256.
                    return known.map(|k| k.0).ok_or_else(|| {
                        SessionError::Unexpected {
                            got: "AlreadyHave",
                            state: "a sealed offer without its SHA-256",
                        }
                        .into()
                    });
                }
                UploadEvent::Present if known.is_none() => {
                    tracing::info!(key = %row.key, "an object of this size is at the key; hashing ours to compare");
                    let reader =
                        StreamParts::whole(pinned.clone(), size, self.journal.clone(), row.id);
                    reader.hash_up_to(size).await?;
                    pinned.check().await?;
                    let (sha, crc) = reader.finish().await?;
                    self.journal
                        .set_streamed_hash(row.id, sha, crc)
                        .await
                        .map_err(Stop::Journal)?;
                    known = Some((sha, Some(crc)));
                }
                other => return self.ended(row, other),
            }
        };
        let reader = StreamParts::whole(pinned.clone(), size, self.journal.clone(), row.id);
        if offset > 0 {
            tracing::info!(key = %row.key, offset, size, "the relay holds the first bytes already; hashing them again, sending the rest");
            reader.hash_up_to(offset).await?;
        }
        while let Some(next) = up.sending_at().filter(|&next| next < size) {
            if *stop.borrow() {
                // The relay keeps what it has; the next start resumes from there.
                return Err(Stop::Interrupted.into());
            }
            let want = (size - next).min(MAX_DATA as u64);
            let _permit = self.budget.reserve(want).await;
            let (at, bytes) = reader.next_bytes(want).await?;
            let len = bytes.len() as u64;
            let stream = (&mut send, &mut recv);
            self.send_data(conn, &mut up, stream, &mut buf, row, at, bytes)
                .await?;
            crate::progress::board().advance(row.id, len);
        }
        // Still the version read (a file: size, mtime, inode, ctime; an object: its ETag).
        pinned.check().await?;
        let (sha, crc) = reader.finish().await?;
        match known {
            // The journal's hash is of another content than was read now: the source changed
            // in a way its version does not show.
            Some((k, _)) if k != sha => return Err(Stop::Changed(pinned.what()).into()),
            Some(_) => {}
            // Fixed before the relay is asked to check it: an answer lost after the relay
            // stored the object is recognised by it on the next offer.
            None => self
                .journal
                .set_streamed_hash(row.id, sha, crc)
                .await
                .map_err(Stop::Journal)?,
        }
        let landing = std::time::Duration::from_secs(size / 4_000_000);
        up.seal(sha, Instant::now(), idle + landing)?;
        self.flush(conn, &mut up, &mut send).await?;
        let _ = send.finish();
        match self.answer(conn, &mut up, &mut recv, &mut buf).await? {
            UploadEvent::Stored => {
                tracing::debug!(key = %row.key, sent = size - offset, "stored by the relay (sealed)");
                Ok(sha)
            }
            other => self.ended(row, other),
        }
    }

    /// A small object in one flight: offer, data and commit at once (the relay announced
    /// `CAP_EAGER`), then its answers: one round trip instead of two. `body` is the whole
    /// object, read once (its share of the budget held by the caller).
    async fn eager(
        &self,
        conn: &quinn::Connection,
        row: &ObjectRow,
        pinned: &Arc<Pinned>,
        sha: [u8; 32],
        body: Bytes,
    ) -> Result<[u8; 32], RStop> {
        let size = row.version.size();
        let idle = self.client.idle();
        let (mut send, mut recv) = self.open_stream(conn).await?;
        let mut up = Upload::new_eager(&row.key, size, sha, Instant::now(), idle);
        for (i, chunk) in body.chunks(MAX_DATA).enumerate() {
            up.send_data(i as u64 * MAX_DATA as u64, chunk.to_vec())?;
        }
        // Still the version read (a file: size, mtime, inode, ctime; an object: its ETag).
        pinned.check().await?;
        up.commit(Instant::now(), idle)?;
        match write_frames(&mut up, &mut send).await {
            Ok(()) => {
                let _ = send.finish();
                crate::progress::board().advance(row.id, size);
            }
            // The relay answered without the data (already had it, refused) and stopped the
            // stream: its answer says which.
            Err(quinn::WriteError::Stopped(_)) => {}
            Err(e) => return Err(self.client.write_error(conn, e).into()),
        }
        let mut buf = vec![0u8; 4096];
        match self.answer(conn, &mut up, &mut recv, &mut buf).await? {
            UploadEvent::Stored => {
                tracing::debug!(key = %row.key, sent = size, "stored by the relay (eager)");
                Ok(sha)
            }
            UploadEvent::AlreadyStored => {
                tracing::info!(key = %row.key, "the relay already stores this object (same SHA-256)");
                Ok(sha)
            }
            other => self.ended(row, other),
        }
    }

    /// One offer on a new stream, and the bytes from where the relay resumes.
    async fn offer(
        &self,
        conn: &quinn::Connection,
        row: &ObjectRow,
        pinned: &Arc<Pinned>,
        sha: [u8; 32],
        stop: watch::Receiver<bool>,
    ) -> Result<[u8; 32], RStop> {
        let size = row.version.size();
        let idle = self.client.idle();
        let (mut send, mut recv) = self.open_stream(conn).await?;
        let mut up = Upload::new(&row.key, size, sha, Instant::now(), idle);
        self.flush(conn, &mut up, &mut send).await?;
        let mut buf = vec![0u8; 16 * 1024];
        match self.answer(conn, &mut up, &mut recv, &mut buf).await? {
            UploadEvent::SendFrom(offset) => {
                if offset > 0 {
                    tracing::info!(key = %row.key, offset, size, "the relay holds the first bytes already; sending the rest");
                }
                let mut off = offset;
                while off < size {
                    if *stop.borrow() {
                        // The relay keeps what it has; the next start resumes from there.
                        return Err(Stop::Interrupted.into());
                    }
                    let len = (size - off).min(MAX_DATA as u64);
                    let _permit = self.budget.reserve(len).await;
                    let (bytes, _) = pinned.read(off, len).await?;
                    let stream = (&mut send, &mut recv);
                    self.send_data(conn, &mut up, stream, &mut buf, row, off, bytes)
                        .await?;
                    off += len;
                    // Written to the stream (QUIC's flow control holds it to what the relay
                    // takes): the live display's progress for this object.
                    crate::progress::board().advance(row.id, len);
                }
                pinned.check().await?;
                // The relay reads the object back, verifies it and lands it before answering:
                // allow for that at a slow 4 MB/s on top of the idle time (a dead link is still
                // noticed at once: QUIC's keep-alives and idle timeout end the connection).
                let landing = std::time::Duration::from_secs(size / 4_000_000);
                up.commit(Instant::now(), idle + landing)?;
                self.flush(conn, &mut up, &mut send).await?;
                let _ = send.finish();
                match self.answer(conn, &mut up, &mut recv, &mut buf).await? {
                    UploadEvent::Stored => {
                        tracing::debug!(key = %row.key, sent = size - offset, "stored by the relay");
                        Ok(sha)
                    }
                    other => self.ended(row, other),
                }
            }
            UploadEvent::AlreadyStored => {
                tracing::info!(key = %row.key, "the relay already stores this object (same SHA-256)");
                Ok(sha)
            }
            other => self.ended(row, other),
        }
    }

    /// Queues `bytes` at `at` and writes them to the stream. A relay that stopped reading has
    /// answered (a refusal): its answer is the error.
    #[allow(clippy::too_many_arguments)]
    async fn send_data(
        &self,
        conn: &quinn::Connection,
        up: &mut Upload,
        (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
        buf: &mut [u8],
        row: &ObjectRow,
        at: u64,
        bytes: Bytes,
    ) -> Result<(), RStop> {
        up.send_data(at, Vec::from(bytes))?;
        match write_frames(up, send).await {
            Ok(()) => Ok(()),
            Err(quinn::WriteError::Stopped(_)) => {
                let answer = self.answer(conn, up, recv, buf).await?;
                self.ended(row, answer).map(drop)
            }
            Err(e) => Err(self.client.write_error(conn, e).into()),
        }
    }

    /// A new object stream on the connection.
    async fn open_stream(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), RStop> {
        conn.open_bi()
            .await
            .map_err(|e| self.client.connection_error(&e).into())
    }

    /// The relay's last word on a stream.
    fn ended(&self, row: &ObjectRow, ev: UploadEvent) -> Result<[u8; 32], RStop> {
        Err(match ev {
            UploadEvent::Refused { reason, message } => RStop::Refused {
                key: row.key.clone(),
                reason,
                message,
            },
            UploadEvent::Mismatch(message) => RStop::Mismatch {
                key: row.key.clone(),
                message,
            },
            other => RStop::Session(SessionError::Unexpected {
                got: match other {
                    UploadEvent::SendFrom(_) => "Accept",
                    UploadEvent::AlreadyStored => "AlreadyHave",
                    UploadEvent::Present => "Present",
                    _ => "Stored",
                },
                state: "this point of the transfer",
            }),
        })
    }

    /// Writes what the protocol machine has to send.
    async fn flush(
        &self,
        conn: &quinn::Connection,
        up: &mut Upload,
        send: &mut quinn::SendStream,
    ) -> Result<(), RStop> {
        write_frames(up, send)
            .await
            .map_err(|e| self.client.write_error(conn, e).into())
    }

    /// Reads until the machine reports the relay's answer (or its deadline passes).
    async fn answer(
        &self,
        conn: &quinn::Connection,
        up: &mut Upload,
        recv: &mut quinn::RecvStream,
        buf: &mut [u8],
    ) -> Answer {
        loop {
            let deadline = up
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + self.client.idle());
            let read = tokio::time::timeout_at(deadline.into(), recv.read(buf)).await;
            let n = match read {
                Err(_) => {
                    up.handle_timeout(Instant::now())?;
                    continue;
                }
                Ok(r) => r.map_err(|e| self.client.read_error(conn, e))?,
            };
            let Some(n) = n else {
                return Err(RStop::Link(LinkError::Unreachable {
                    relay: self.client.relay().to_string(),
                    detail: "the relay ended the stream without an answer".into(),
                }));
            };
            if let Some(ev) = up.handle_input(&buf[..n], Instant::now())? {
                return Ok(ev);
            }
        }
    }
}

/// Writes what the protocol machine has to send, metered by the process's bandwidth limit (as
/// on the S3 path).
async fn write_frames(
    up: &mut Upload,
    send: &mut quinn::SendStream,
) -> Result<(), quinn::WriteError> {
    let limiter = crate::bandwidth::limiter();
    while let Some(frame) = up.poll_transmit() {
        if limiter.is_limited() {
            for chunk in frame.chunks(crate::bandwidth::CHUNK) {
                limiter.acquire(chunk.len()).await;
            }
        }
        send.write_all(&frame).await?;
    }
    Ok(())
}

/// What names a sealed offer's transfer at the relay, the same on every attempt at this
/// version of the object (a restart included): the journal's row and the version it holds.
/// A partial the relay holds under it from another journal is caught by the SHA-256 check.
fn transfer_id(row: &ObjectRow) -> [u8; 32] {
    let mut h = crate::hash::Sha256::new();
    h.update(b"ha-edge relay transfer\0");
    h.update(row.id.to_be_bytes());
    h.update(row.key.as_bytes());
    h.update([0]);
    row.version.feed(&mut h);
    h.finalize()
}

/// What to check when the relay refuses a key.
const PREFIX_ADVICE: &str = "the relay authorizes this agent's certificate for another key prefix: check destination.prefix and the relay's [[agent]] prefix";
/// What to check when the relay refuses this agent.
const AGENT_ADVICE: &str = "check destination.cert_file and key_file (or relay_cert.pem and relay_key.pem in the credentials), the CA the relay trusts (client_ca_file) and its [[agent]] identities";

/// The relay refuses this agent (its certificate or identity).
pub fn refused_agent(relay: &str, detail: &str) -> DestinationError {
    DestinationError {
        scope: Scope::Destination,
        code: Code::AgentRefused,
        detail: format!("relay {relay} refuses this agent: {detail}"),
        advice: Some(AGENT_ADVICE),
    }
}
