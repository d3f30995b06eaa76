//! Sans-IO state machines for both ends. Each takes received bytes and the current time, and
//! tells its caller what to send (`poll_transmit`), what happened (events), and when it gives up
//! waiting (`poll_timeout` / `handle_timeout`). The caller owns the sockets, the files and the
//! clock; nothing here blocks, spawns or reads a file.
//!
//! A connection has one control stream (handshake) and one stream per object:
//!
//! ```text
//! agent                         relay
//! Hello{version, agent}  --->
//!                        <---   Welcome{version} | Refuse{Version}
//! (per object, new stream)
//! Offer{key, size, sha}  --->
//!                        <---   Accept{offset} | AlreadyHave | Refuse{reason}
//! Data{offset, bytes}*   --->   (from the accepted offset, contiguous, up to size)
//! Commit                 --->
//!                        <---   Stored | Mismatch
//! ```
//!
//! To a relay that announced `CAP_EAGER`, the agent may instead send `EagerOffer`, its data from
//! offset 0 and `Commit` at once; the relay answers `Accept{0}` then `Stored` | `Mismatch`, or
//! `AlreadyHave` | `Refuse` and ignores the rest of the stream. One round trip per object
//! instead of two (the agent uses it for small objects, whose bytes fit the stream's window).
//!
//! To a relay that announced `CAP_SEAL`, the agent may offer an object before it knows its
//! SHA-256: `SealedOffer{key, size, transfer}` names the transfer (the relay keys its partial
//! on it), is answered like `Offer`, and ends with `Seal{sha256}` instead of `Commit`; the
//! relay checks what it holds against that SHA-256 before `Stored`, as against an offer's. The
//! agent hashes the bytes as it sends them, so it reads the object once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::message::{encode, Decoder, FrameError, Message, Refusal, CAPABILITIES, VERSION};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unexpected {got} while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("data at offset {got}, expected {expected}")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("data past the offered size ({size} bytes)")]
    PastEnd { size: u64 },
    #[error("commit after {sent} of {size} bytes")]
    Incomplete { sent: u64, size: u64 },
    #[error("the relay accepted from offset {offset}, past the size {size}")]
    BadOffset { offset: u64, size: u64 },
    #[error("the peer sent an error: {0}")]
    Peer(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u16),
}

fn name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::Offer { .. } => "Offer",
        Message::Accept { .. } => "Accept",
        Message::AlreadyHave => "AlreadyHave",
        Message::Refuse { .. } => "Refuse",
        Message::Data { .. } => "Data",
        Message::Commit => "Commit",
        Message::Stored => "Stored",
        Message::Mismatch { .. } => "Mismatch",
        Message::Error { .. } => "Error",
        Message::EagerOffer { .. } => "EagerOffer",
        Message::SealedOffer { .. } => "SealedOffer",
        Message::Seal { .. } => "Seal",
        Message::Present => "Present",
    }
}

/// What both ends share: a decoder, an outbox and an idle deadline.
#[derive(Debug)]
struct Io {
    decoder: Decoder,
    outbox: VecDeque<Vec<u8>>,
    idle: Duration,
    deadline: Option<Instant>,
}

impl Io {
    fn new(idle: Duration) -> Io {
        Io {
            decoder: Decoder::new(),
            outbox: VecDeque::new(),
            idle,
            deadline: None,
        }
    }

    fn send(&mut self, m: &Message) {
        self.outbox.push_back(encode(m));
    }

    /// Waiting for the peer from now on.
    fn wait(&mut self, now: Instant) {
        self.deadline = Some(now + self.idle);
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    fn transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// Takes received bytes; the next whole message, if one is in.
    fn receive(&mut self, bytes: &[u8]) -> Result<Option<Message>, SessionError> {
        self.decoder.push(bytes)?;
        Ok(self.decoder.next_message()?)
    }

    /// A handshake waits for one message, then has no deadline.
    fn handshake_timeout(&self, done: bool) -> Option<Instant> {
        (!done).then_some(self.deadline).flatten()
    }

    fn check_handshake_timeout(&self, done: bool, now: Instant) -> Result<(), SessionError> {
        if !done && self.expired(now) {
            return Err(SessionError::Timeout(self.idle));
        }
        Ok(())
    }
}

/// The agent's side of the handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    io: Io,
    done: bool,
}

/// The outcome of a handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    Done { peer: String, capabilities: u64 },
    Refused { reason: Refusal, message: String },
}

impl ClientHandshake {
    pub fn new(agent: &str, now: Instant, idle: Duration) -> ClientHandshake {
        let mut io = Io::new(idle);
        io.send(&Message::Hello {
            version: VERSION,
            agent: agent.to_string(),
            capabilities: CAPABILITIES,
        });
        io.wait(now);
        ClientHandshake { io, done: false }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.io.transmit()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.io.handshake_timeout(self.done)
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        self.io.check_handshake_timeout(self.done, now)
    }

    /// Returns the outcome once the relay's answer is in.
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        _now: Instant,
    ) -> Result<Option<Handshake>, SessionError> {
        let Some(m) = self.io.receive(bytes)? else {
            return Ok(None);
        };
        self.done = true;
        match m {
            Message::Welcome {
                version,
                relay,
                capabilities,
            } if version == VERSION => Ok(Some(Handshake::Done {
                peer: relay,
                capabilities,
            })),
            Message::Welcome { version, .. } => Err(SessionError::Version(version)),
            Message::Refuse { reason, message } => Ok(Some(Handshake::Refused { reason, message })),
            Message::Error { message } => Err(SessionError::Peer(message)),
            other => Err(SessionError::Unexpected {
                got: name(&other),
                state: "waiting for Welcome",
            }),
        }
    }
}

/// The relay's side of the handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    io: Io,
    relay: String,
    done: bool,
    capabilities: u64,
}

impl ServerHandshake {
    pub fn new(relay: &str, now: Instant, idle: Duration) -> ServerHandshake {
        ServerHandshake::with_capabilities(relay, CAPABILITIES, now, idle)
    }

    /// A handshake announcing `capabilities` (of this build's; fewer: as an older relay).
    pub fn with_capabilities(
        relay: &str,
        capabilities: u64,
        now: Instant,
        idle: Duration,
    ) -> ServerHandshake {
        let mut io = Io::new(idle);
        io.wait(now);
        ServerHandshake {
            io,
            relay: relay.to_string(),
            done: false,
            capabilities: capabilities & CAPABILITIES,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.io.transmit()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.io.handshake_timeout(self.done)
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        self.io.check_handshake_timeout(self.done, now)
    }

    /// Returns the agent's self-declared name once its Hello is in (and queues the answer).
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        _now: Instant,
    ) -> Result<Option<String>, SessionError> {
        let Some(m) = self.io.receive(bytes)? else {
            return Ok(None);
        };
        self.done = true;
        match m {
            Message::Hello { version, agent, .. } if version == VERSION => {
                self.io.send(&Message::Welcome {
                    version: VERSION,
                    relay: self.relay.clone(),
                    capabilities: self.capabilities,
                });
                Ok(Some(agent))
            }
            Message::Hello { version, .. } => {
                self.io.send(&Message::Refuse {
                    reason: Refusal::Version,
                    message: format!("this relay speaks protocol version {VERSION}"),
                });
                Err(SessionError::Version(version))
            }
            other => {
                self.io.send(&Message::Error {
                    message: "expected Hello".into(),
                });
                Err(SessionError::Unexpected {
                    got: name(&other),
                    state: "waiting for Hello",
                })
            }
        }
    }
}

/// What an upload needs from its caller, or how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadEvent {
    /// The relay holds the bytes before `offset`: send from there (`send_data`, then `commit`).
    SendFrom(u64),
    /// Delivered: the relay already had this object.
    AlreadyStored,
    /// Delivered: the relay verified and stored it.
    Stored,
    /// The relay will not take it.
    Refused { reason: Refusal, message: String },
    /// The relay received something else than offered and dropped it: offer again.
    Mismatch(String),
    /// To a sealed offer without its SHA-256: an object of that size is at the key; hash the
    /// object and offer it again with its SHA-256.
    Present,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpState {
    AwaitAnswer,
    Sending { next: u64 },
    AwaitAck,
    Finished,
}

/// The agent's side of one object stream.
#[derive(Debug)]
pub struct Upload {
    io: Io,
    size: u64,
    state: UpState,
    ack_wait: Duration,
    kind: OfferKind,
    /// The relay's `Accept{0}` to an eager offer has arrived.
    accepted: bool,
}

/// What an upload offered, which decides the answers it takes and how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfferKind {
    /// `Offer`: answered, then data, then `Commit`.
    Plain,
    /// `EagerOffer`: data follows at once; `Accept{0}` is expected before `Stored`.
    Eager,
    /// `SealedOffer`: ends with `Seal`, not `Commit`; `AlreadyHave` answers it only if it
    /// named its SHA-256 (`named`), `Present` only if it did not.
    Sealed { named: bool },
}

impl Upload {
    pub fn new(key: &str, size: u64, sha256: [u8; 32], now: Instant, idle: Duration) -> Upload {
        let offer = Message::Offer {
            key: key.to_string(),
            size,
            sha256,
        };
        Upload::offering(&offer, size, UpState::AwaitAnswer, now, idle)
    }

    /// An eager offer (only to a relay that announced `CAP_EAGER`): `send_data` from offset 0
    /// and `commit` may follow at once; the answers are read after the commit.
    pub fn new_eager(
        key: &str,
        size: u64,
        sha256: [u8; 32],
        now: Instant,
        idle: Duration,
    ) -> Upload {
        let offer = Message::EagerOffer {
            key: key.to_string(),
            size,
            sha256,
        };
        Upload::offering(&offer, size, UpState::Sending { next: 0 }, now, idle)
    }

    /// A sealed offer (only to a relay that announced `CAP_SEAL`): answered like `new`, it
    /// ends with `seal(sha256)` once every byte is sent. `known`: its SHA-256 (and
    /// CRC-64/NVME) if known already.
    pub fn new_sealed(
        key: &str,
        size: u64,
        transfer: [u8; 32],
        known: Option<([u8; 32], Option<u64>)>,
        now: Instant,
        idle: Duration,
    ) -> Upload {
        let offer = Message::SealedOffer {
            key: key.to_string(),
            size,
            transfer,
            sha256: known.map(|k| k.0),
            crc64nvme: known.and_then(|k| k.1),
        };
        Upload::offering(&offer, size, UpState::AwaitAnswer, now, idle)
    }

    /// An upload that has queued `offer` and waits from `now`, starting in `state`.
    fn offering(
        offer: &Message,
        size: u64,
        state: UpState,
        now: Instant,
        idle: Duration,
    ) -> Upload {
        let mut io = Io::new(idle);
        io.send(offer);
        io.wait(now);
        let kind = match offer {
            Message::EagerOffer { .. } => OfferKind::Eager,
            Message::SealedOffer { sha256, .. } => OfferKind::Sealed {
                named: sha256.is_some(),
            },
            _ => OfferKind::Plain,
        };
        Upload {
            io,
            size,
            state,
            ack_wait: idle,
            kind,
            accepted: false,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.io.transmit()
    }

    /// When to give up waiting for the relay (None while the caller is sending data).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            UpState::AwaitAnswer | UpState::AwaitAck => self.io.deadline,
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if self.poll_timeout().is_some() && self.io.expired(now) {
            let waited = match self.state {
                UpState::AwaitAck => self.ack_wait,
                _ => self.io.idle,
            };
            self.state = UpState::Finished;
            return Err(SessionError::Timeout(waited));
        }
        Ok(())
    }

    /// Where the next data goes, while sending (after `SendFrom`, before the commit).
    pub fn sending_at(&self) -> Option<u64> {
        match self.state {
            UpState::Sending { next } => Some(next),
            _ => None,
        }
    }

    /// Queues `bytes` at `offset`, which must continue where the last data ended.
    pub fn send_data(&mut self, offset: u64, bytes: Vec<u8>) -> Result<(), SessionError> {
        let UpState::Sending { next } = self.state else {
            return Err(SessionError::Unexpected {
                got: "Data",
                state: "not sending",
            });
        };
        if offset != next {
            return Err(SessionError::OutOfOrder {
                got: offset,
                expected: next,
            });
        }
        let end = offset + bytes.len() as u64;
        if end > self.size {
            return Err(SessionError::PastEnd { size: self.size });
        }
        self.io.send(&Message::Data { offset, bytes });
        self.state = UpState::Sending { next: end };
        Ok(())
    }

    /// Queues the commit once every byte is queued. The answer is due within `ack_wait`: the
    /// relay verifies and lands the object first, which takes time in proportion to its size.
    pub fn commit(&mut self, now: Instant, ack_wait: Duration) -> Result<(), SessionError> {
        if matches!(self.kind, OfferKind::Sealed { .. }) {
            return Err(SessionError::Unexpected {
                got: "Commit",
                state: "sending a sealed offer (it ends with Seal)",
            });
        }
        self.end(&Message::Commit, now, ack_wait)
    }

    /// `commit` for a sealed offer: every byte is queued, and `sha256` is theirs.
    pub fn seal(
        &mut self,
        sha256: [u8; 32],
        now: Instant,
        ack_wait: Duration,
    ) -> Result<(), SessionError> {
        if !matches!(self.kind, OfferKind::Sealed { .. }) {
            return Err(SessionError::Unexpected {
                got: "Seal",
                state: "sending an offer that named its SHA-256",
            });
        }
        self.end(&Message::Seal { sha256 }, now, ack_wait)
    }

    /// Queues the commit or seal once every byte is queued.
    fn end(
        &mut self,
        last: &Message,
        now: Instant,
        ack_wait: Duration,
    ) -> Result<(), SessionError> {
        match self.state {
            UpState::Sending { next } if next == self.size => {
                self.io.send(last);
                self.io.deadline = Some(now + ack_wait);
                self.ack_wait = ack_wait;
                self.state = UpState::AwaitAck;
                Ok(())
            }
            UpState::Sending { next } => Err(SessionError::Incomplete {
                sent: next,
                size: self.size,
            }),
            _ => Err(SessionError::Unexpected {
                got: name(last),
                state: "not sending",
            }),
        }
    }

    /// Takes what the relay sent; its answer, once one is in. Several messages in one read are
    /// taken in order (an eager offer's `Accept{0}` and `Stored` may come together).
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Option<UploadEvent>, SessionError> {
        self.io.decoder.push(bytes)?;
        while let Some(m) = self.io.decoder.next_message()? {
            if let Some(ev) = self.message(m, now)? {
                return Ok(Some(ev));
            }
        }
        Ok(None)
    }

    /// One message from the relay: an event, or nothing yet (an eager offer's `Accept{0}`).
    fn message(&mut self, m: Message, now: Instant) -> Result<Option<UploadEvent>, SessionError> {
        if self.kind == OfferKind::Eager {
            return self.eager_message(m, now);
        }
        let ev = match (self.state, m) {
            (UpState::AwaitAnswer, Message::Accept { offset }) if offset <= self.size => {
                self.state = UpState::Sending { next: offset };
                self.io.wait(now);
                UploadEvent::SendFrom(offset)
            }
            (UpState::AwaitAnswer, Message::Accept { offset }) => {
                self.state = UpState::Finished;
                return Err(SessionError::BadOffset {
                    offset,
                    size: self.size,
                });
            }
            (UpState::AwaitAnswer, Message::Present)
                if self.kind == (OfferKind::Sealed { named: false }) =>
            {
                self.state = UpState::Finished;
                UploadEvent::Present
            }
            // Only to an offer that named its SHA-256: "the same object" needs one.
            (UpState::AwaitAnswer, Message::AlreadyHave)
                if self.kind != (OfferKind::Sealed { named: false }) =>
            {
                self.state = UpState::Finished;
                UploadEvent::AlreadyStored
            }
            // After Commit too: landing can fail (a store error, permanent or not), and the relay
            // says which in its refusal.
            (
                UpState::AwaitAnswer | UpState::Sending { .. } | UpState::AwaitAck,
                Message::Refuse { reason, message },
            ) => {
                self.state = UpState::Finished;
                UploadEvent::Refused { reason, message }
            }
            (UpState::AwaitAck, Message::Stored) => {
                self.state = UpState::Finished;
                UploadEvent::Stored
            }
            (UpState::AwaitAck, Message::Mismatch { message }) => {
                self.state = UpState::Finished;
                UploadEvent::Mismatch(message)
            }
            (_, Message::Error { message }) => {
                self.state = UpState::Finished;
                return Err(SessionError::Peer(message));
            }
            (state, other) => {
                self.state = UpState::Finished;
                return Err(SessionError::Unexpected {
                    got: name(&other),
                    state: up_state_name(state),
                });
            }
        };
        Ok(Some(ev))
    }

    /// The answers to an eager offer: `Accept{0}` (while sending or after the commit) then
    /// `Stored` | `Mismatch`; or `AlreadyHave` | `Refuse` at any point.
    fn eager_message(
        &mut self,
        m: Message,
        _now: Instant,
    ) -> Result<Option<UploadEvent>, SessionError> {
        let live = !matches!(self.state, UpState::Finished);
        let ev = match m {
            Message::Accept { offset: 0 } if live && !self.accepted => {
                self.accepted = true;
                return Ok(None);
            }
            Message::Accept { offset } if live && !self.accepted => {
                self.state = UpState::Finished;
                return Err(SessionError::BadOffset {
                    offset,
                    size: self.size,
                });
            }
            Message::AlreadyHave if live && !self.accepted => UploadEvent::AlreadyStored,
            Message::Refuse { reason, message } if live => UploadEvent::Refused { reason, message },
            Message::Stored if self.state == UpState::AwaitAck && self.accepted => {
                UploadEvent::Stored
            }
            Message::Mismatch { message } if self.state == UpState::AwaitAck && self.accepted => {
                UploadEvent::Mismatch(message)
            }
            Message::Error { message } => {
                self.state = UpState::Finished;
                return Err(SessionError::Peer(message));
            }
            other => {
                let state = up_state_name(self.state);
                self.state = UpState::Finished;
                return Err(SessionError::Unexpected {
                    got: name(&other),
                    state,
                });
            }
        };
        self.state = UpState::Finished;
        Ok(Some(ev))
    }
}

fn up_state_name(s: UpState) -> &'static str {
    match s {
        UpState::AwaitAnswer => "waiting for the answer to an offer",
        UpState::Sending { .. } => "sending data",
        UpState::AwaitAck => "waiting for the acknowledgement",
        UpState::Finished => "finished",
    }
}

/// What the relay's caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveEvent {
    /// Decide: `accept(offset)`, `already_have()` or `refuse(..)`. For an eager offer
    /// (`eager`), data from offset 0 follows at once: accept only from 0. Until the decision,
    /// no later message is decoded; call `handle_input(&[])` after it for the buffered ones.
    Offered {
        key: String,
        size: u64,
        sha256: [u8; 32],
        eager: bool,
    },
    /// A sealed offer: decide as for `Offered` (`already_have()` only if it names a
    /// SHA-256); the partial is keyed on `transfer`, and the SHA-256 to check comes with
    /// `Sealed`.
    SealedOffered {
        key: String,
        size: u64,
        transfer: [u8; 32],
        sha256: Option<[u8; 32]>,
        crc64nvme: Option<u64>,
    },
    /// Bytes at `offset` (contiguous from the accepted offset, within the size): store them.
    Data { offset: u64, bytes: Vec<u8> },
    /// Every byte is in: verify and answer `stored()` or `mismatch(..)`.
    Committed,
    /// Every byte of a sealed offer is in, and this is their SHA-256 as the agent read them:
    /// verify against it and answer `stored()` or `mismatch(..)`.
    Sealed { sha256: [u8; 32] },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    AwaitOffer,
    Deciding { size: u64 },
    Receiving { next: u64, size: u64 },
    Verifying,
    Finished,
}

/// The relay's side of one object stream.
#[derive(Debug)]
pub struct Receive {
    io: Io,
    state: RxState,
    /// The offer was eager: what follows a refusal is ignored, not an error.
    eager: bool,
    /// The offer was sealed: it ends with `Seal`, not `Commit`.
    sealed: bool,
}

impl Receive {
    pub fn new(now: Instant, idle: Duration) -> Receive {
        let mut io = Io::new(idle);
        io.wait(now);
        Receive {
            io,
            state: RxState::AwaitOffer,
            eager: false,
            sealed: false,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.io.transmit()
    }

    /// When to give up on a silent agent.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            RxState::AwaitOffer | RxState::Receiving { .. } => self.io.deadline,
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if self.poll_timeout().is_some() && self.io.expired(now) {
            self.state = RxState::Finished;
            return Err(SessionError::Timeout(self.io.idle));
        }
        Ok(())
    }

    pub fn accept(&mut self, offset: u64, now: Instant) -> Result<(), SessionError> {
        let RxState::Deciding { size } = self.state else {
            return Err(SessionError::Unexpected {
                got: "Accept",
                state: "not deciding",
            });
        };
        if offset > size || (self.eager && offset != 0) {
            return Err(SessionError::BadOffset { offset, size });
        }
        self.io.send(&Message::Accept { offset });
        self.io.wait(now);
        self.state = RxState::Receiving { next: offset, size };
        Ok(())
    }

    pub fn already_have(&mut self) {
        self.io.send(&Message::AlreadyHave);
        self.state = RxState::Finished;
    }

    /// To a sealed offer that named no SHA-256: an object of its size is at the key; the
    /// agent offers again with the SHA-256.
    pub fn present(&mut self) {
        self.io.send(&Message::Present);
        self.state = RxState::Finished;
    }

    pub fn refuse(&mut self, reason: Refusal, message: String) {
        self.io.send(&Message::Refuse { reason, message });
        self.state = RxState::Finished;
    }

    pub fn stored(&mut self) {
        self.io.send(&Message::Stored);
        self.state = RxState::Finished;
    }

    pub fn mismatch(&mut self, message: String) {
        self.io.send(&Message::Mismatch { message });
        self.state = RxState::Finished;
    }

    /// Decodes what arrived; every complete message becomes at most one event.
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Vec<ReceiveEvent>, SessionError> {
        self.io.decoder.push(bytes)?;
        let mut events = Vec::new();
        // Nothing after an offer is decoded before the caller decides on it.
        while !matches!(self.state, RxState::Deciding { .. }) {
            let Some(m) = self.io.decoder.next_message()? else {
                break;
            };
            self.io.wait(now);
            let ev = match (self.state, m) {
                (RxState::AwaitOffer, Message::Offer { key, size, sha256 }) => {
                    self.state = RxState::Deciding { size };
                    ReceiveEvent::Offered {
                        key,
                        size,
                        sha256,
                        eager: false,
                    }
                }
                (RxState::AwaitOffer, Message::EagerOffer { key, size, sha256 }) => {
                    self.state = RxState::Deciding { size };
                    self.eager = true;
                    ReceiveEvent::Offered {
                        key,
                        size,
                        sha256,
                        eager: true,
                    }
                }
                (
                    RxState::AwaitOffer,
                    Message::SealedOffer {
                        key,
                        size,
                        transfer,
                        sha256,
                        crc64nvme,
                    },
                ) => {
                    self.state = RxState::Deciding { size };
                    self.sealed = true;
                    ReceiveEvent::SealedOffered {
                        key,
                        size,
                        transfer,
                        sha256,
                        crc64nvme,
                    }
                }
                // The rest of an eager offer that was answered already (refused, already had).
                (RxState::Finished, Message::Data { .. } | Message::Commit) if self.eager => {
                    continue
                }
                (RxState::Receiving { next, size }, Message::Data { offset, bytes }) => {
                    if offset != next {
                        return Err(self.fail(SessionError::OutOfOrder {
                            got: offset,
                            expected: next,
                        }));
                    }
                    let end = offset + bytes.len() as u64;
                    if end > size {
                        return Err(self.fail(SessionError::PastEnd { size }));
                    }
                    self.state = RxState::Receiving { next: end, size };
                    ReceiveEvent::Data { offset, bytes }
                }
                (RxState::Receiving { next, size }, Message::Commit)
                    if next == size && !self.sealed =>
                {
                    self.state = RxState::Verifying;
                    ReceiveEvent::Committed
                }
                (RxState::Receiving { next, size }, Message::Seal { sha256 })
                    if next == size && self.sealed =>
                {
                    self.state = RxState::Verifying;
                    ReceiveEvent::Sealed { sha256 }
                }
                (RxState::Receiving { next, size }, Message::Commit)
                    if next < size && !self.sealed =>
                {
                    return Err(self.fail(SessionError::Incomplete { sent: next, size }));
                }
                (RxState::Receiving { next, size }, Message::Seal { .. })
                    if next < size && self.sealed =>
                {
                    return Err(self.fail(SessionError::Incomplete { sent: next, size }));
                }
                (_, Message::Error { message }) => {
                    self.state = RxState::Finished;
                    return Err(SessionError::Peer(message));
                }
                (state, other) => {
                    return Err(self.fail(SessionError::Unexpected {
                        got: name(&other),
                        state: rx_state_name(state),
                    }));
                }
            };
            events.push(ev);
        }
        Ok(events)
    }

    /// A violation: tell the agent and finish.
    fn fail(&mut self, e: SessionError) -> SessionError {
        self.io.send(&Message::Error {
            message: e.to_string(),
        });
        self.state = RxState::Finished;
        e
    }
}

fn rx_state_name(s: RxState) -> &'static str {
    match s {
        RxState::AwaitOffer => "waiting for an offer",
        RxState::Deciding { .. } => "deciding on an offer",
        RxState::Receiving { .. } => "receiving data",
        RxState::Verifying => "verifying",
        RxState::Finished => "finished",
    }
}
