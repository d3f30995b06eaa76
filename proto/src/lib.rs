//! The wire protocol between an ha-edge agent and its relay: messages, their framing, and
//! sans-IO session state machines for both ends. Nothing here does I/O or needs an async
//! runtime: the agent and the relay drive these machines over QUIC streams (quinn), and the
//! tests drive them in memory.
//!
//! Guarantees the format gives its users:
//! - a frame is a 4-byte big-endian length and one bincode message; a frame over `MAX_FRAME`
//!   is refused before its body is buffered, and bincode's own limit stops a hostile length
//!   inside a message from allocating;
//! - an object is delivered only on `Stored` (the relay verified size and SHA-256 and stored
//!   it) or `AlreadyHave` (it holds the same key with the same SHA-256); a sealed offer's
//!   SHA-256 comes with its commit, and is checked the same way;
//! - `Accept{offset}` is the relay's promise that it holds the bytes before `offset`, so a
//!   transfer resumes there after a dropped connection or a relay restart;
//! - the encoding is pinned by a golden-bytes test: changing it needs a new `VERSION`.

mod message;
mod session;

pub use message::{
    decode_one, encode, Decoder, FrameError, Message, Refusal, CAPABILITIES, CAP_EAGER, CAP_SEAL,
    MAX_DATA, MAX_FRAME, VERSION,
};
pub use session::{
    ClientHandshake, Handshake, Receive, ReceiveEvent, ServerHandshake, SessionError, Upload,
    UploadEvent,
};

/// The ALPN protocol name both ends require in the TLS handshake.
pub const ALPN: &[u8] = b"ha-edge/1";
