//! The messages, and their encoding: a 4-byte big-endian length, then the message in bincode's
//! standard configuration (varint integers). The length is checked against the limit before
//! anything is allocated for the body, and bincode itself is limited to the same size, so a
//! hostile length inside a message (a `Vec` claiming 4 GiB) cannot allocate either.

use bincode::{Decode, Encode};

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The largest frame (length prefix excluded) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The most file bytes one `Data` message carries (leaves room for the header in a frame).
pub const MAX_DATA: usize = 512 * 1024;
/// Capability bit: the relay takes `EagerOffer` (an offer whose data and commit follow at once,
/// without waiting for its answer: one round trip per object instead of two).
pub const CAP_EAGER: u64 = 1;
/// Capability bit: the relay takes `SealedOffer` (an offer named by a transfer id, its SHA-256
/// sent with the commit, `Seal`): the agent hashes the object as it sends it, reading it once.
pub const CAP_SEAL: u64 = 2;
/// Capability bits this build announces in the handshake (unknown bits are ignored).
pub const CAPABILITIES: u64 = CAP_EAGER | CAP_SEAL;

/// Why the relay refuses an offer (or a handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Refusal {
    /// No common protocol version.
    Version,
    /// This agent may not write that key (outside its prefix).
    Unauthorized,
    /// The key is not acceptable (`..`, absolute, empty segment, control characters).
    BadKey,
    /// Limits reached (streams, partial transfers): try again later.
    Busy,
    /// The relay cannot store objects now (its store failed): try again later.
    Unavailable,
    /// The store will never take this object as it is (its key names a directory there, the
    /// store refuses the object): permanent; may come as the answer to Commit. Appended last,
    /// so the encoding of the others is unchanged.
    Rejected,
}

impl Refusal {
    /// Whether the same offer may succeed later without any change on the agent's side.
    pub fn is_temporary(self) -> bool {
        matches!(self, Refusal::Busy | Refusal::Unavailable)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Message {
    /// Agent -> relay, first on the control stream.
    Hello {
        version: u16,
        /// The agent's name for logs; authorization uses the client certificate, not this.
        agent: String,
        capabilities: u64,
    },
    /// Relay -> agent: the handshake is done.
    Welcome {
        version: u16,
        relay: String,
        capabilities: u64,
    },
    /// Agent -> relay, first on an object stream: this object, whole.
    Offer {
        key: String,
        size: u64,
        sha256: [u8; 32],
    },
    /// Relay -> agent: send from `offset` (bytes before it are safely held by the relay).
    Accept { offset: u64 },
    /// Relay -> agent: an object with this key and SHA-256 is already stored.
    AlreadyHave,
    /// Relay -> agent: not accepted.
    Refuse { reason: Refusal, message: String },
    /// Agent -> relay: bytes of the offered object at `offset`.
    Data { offset: u64, bytes: Vec<u8> },
    /// Agent -> relay: every byte is sent.
    Commit,
    /// Relay -> agent: size and SHA-256 verified, object stored. The only delivery proof.
    Stored,
    /// Relay -> agent: what arrived does not match the offer; the relay dropped it, send again
    /// from the start.
    Mismatch { message: String },
    /// Either way: a protocol violation; the stream ends.
    Error { message: String },
    /// Agent -> relay, first on an object stream, only to a relay that announced `CAP_EAGER`:
    /// this object, whole, with `Data` from offset 0 and `Commit` following without waiting
    /// for the answer. The relay answers `Accept{0}` (it holds nothing of the object, whatever
    /// a partial held) then `Stored` | `Mismatch`, or `AlreadyHave` | `Refuse` and ignores the
    /// rest of the stream. Appended last, so the encoding of the others is unchanged.
    EagerOffer {
        key: String,
        size: u64,
        sha256: [u8; 32],
    },
    /// Agent -> relay, first on an object stream, only to a relay that announced `CAP_SEAL`:
    /// this object, whole, its SHA-256 to follow with the commit (`Seal`), because the agent
    /// hashes the bytes as it sends them. `transfer` names the transfer for a resume (the
    /// relay keys its partial on agent, key and transfer); `sha256` and `crc64nvme`, if the
    /// agent knows them already (a retry), let the relay answer `AlreadyHave` (a store whose
    /// object cannot name its SHA-256 may show its full-object CRC-64/NVME). Answered like
    /// `Offer`. Appended last, so the encoding of the others is unchanged.
    SealedOffer {
        key: String,
        size: u64,
        transfer: [u8; 32],
        sha256: Option<[u8; 32]>,
        crc64nvme: Option<u64>,
    },
    /// Agent -> relay: every byte of a `SealedOffer` is sent, and this is their SHA-256. The
    /// relay checks what it holds against it before `Stored`, as against an offer's.
    Seal { sha256: [u8; 32] },
    /// Relay -> agent, to a `SealedOffer` that named no SHA-256: an object of the offered size
    /// is at the key already (a journal lost, say). The agent hashes its object and offers it
    /// again with the SHA-256, which the relay may answer `AlreadyHave`; nothing is sent twice.
    Present,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("{0} bytes after the message inside its frame")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// One message as a frame (length prefix + body).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    bincode::encode_into_std_write(msg, &mut out, config())
        .expect("writing into a Vec cannot fail and messages stay within the limit");
    let len = u32::try_from(out.len() - 4).expect("messages stay within the limit");
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Reassembles frames from a byte stream, however it is split. Decoded frames are skipped, not
/// moved out: the bytes after them are moved to the front only once they are all that is
/// left of a read, so each byte is copied in once (a memmove per message had cost as much as
/// the copy in).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the undecoded bytes begin in `buf`.
    start: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Bytes received and not yet part of a decoded message.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The undecoded bytes.
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Takes received bytes. A frame whose length exceeds the limit is refused before its body
    /// is buffered: at most one limit's worth of bytes is ever held.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.buffered() >= 4 {
            let len = frame_len(self.pending());
            if len > MAX_FRAME {
                return Err(FrameError::TooLarge(len));
            }
        }
        if self.start > 0 {
            // What is left of earlier reads (less than a frame, or frames not yet asked for)
            // goes to the front before the new bytes are appended.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= 4 {
            let len = frame_len(&self.buf);
            if len > MAX_FRAME {
                return Err(FrameError::TooLarge(len));
            }
        }
        Ok(())
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let pending = self.pending();
        if pending.len() < 4 {
            return Ok(None);
        }
        let len = frame_len(pending);
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if pending.len() < 4 + len {
            return Ok(None);
        }
        let (msg, used): (Message, usize) =
            bincode::decode_from_slice(&pending[4..4 + len], config())
                .map_err(|e| FrameError::Decode(e.to_string()))?;
        if used != len {
            return Err(FrameError::Trailing(len - used));
        }
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(msg))
    }
}

fn frame_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// Decodes exactly one frame from `bytes` (for tests and fuzzing).
pub fn decode_one(bytes: &[u8]) -> Result<Option<Message>, FrameError> {
    let mut d = Decoder::new();
    d.push(bytes)?;
    d.next_message()
}
