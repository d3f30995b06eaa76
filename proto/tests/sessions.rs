//! Both ends driven in memory: bytes from one side's `poll_transmit` are fed to the other's
//! `handle_input`, split at awkward places, with a simulated clock.

use std::time::{Duration, Instant};

use ha_edge_proto::*;

const IDLE: Duration = Duration::from_secs(10);

/// Moves everything `from` has queued into `to`, one byte at a time when `bytewise`.
fn pump<F, T>(mut from: F, mut to: T, bytewise: bool)
where
    F: FnMut() -> Option<Vec<u8>>,
    T: FnMut(&[u8]),
{
    while let Some(frame) = from() {
        if bytewise {
            for b in frame.chunks(1) {
                to(b);
            }
        } else {
            to(&frame);
        }
    }
}

fn sha(n: u8) -> [u8; 32] {
    [n; 32]
}

#[test]
fn handshake_agrees_on_the_version() {
    let now = Instant::now();
    let mut c = ClientHandshake::new("dkfz-edge-01", now, IDLE);
    let mut s = ServerHandshake::new("relay-1", now, IDLE);
    let mut agent = None;
    pump(
        || c.poll_transmit(),
        |b| {
            if let Some(a) = s.handle_input(b, now).unwrap() {
                agent = Some(a);
            }
        },
        true,
    );
    assert_eq!(agent.as_deref(), Some("dkfz-edge-01"));
    let mut out = None;
    pump(
        || s.poll_transmit(),
        |b| {
            if let Some(h) = c.handle_input(b, now).unwrap() {
                out = Some(h);
            }
        },
        false,
    );
    assert_eq!(
        out,
        Some(Handshake::Done {
            peer: "relay-1".into(),
            capabilities: CAPABILITIES
        })
    );
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn a_relay_refuses_another_version_and_says_why() {
    let now = Instant::now();
    let mut s = ServerHandshake::new("relay-1", now, IDLE);
    let hello = encode(&Message::Hello {
        version: VERSION + 1,
        agent: "future".into(),
        capabilities: 0,
    });
    assert_eq!(
        s.handle_input(&hello, now),
        Err(SessionError::Version(VERSION + 1))
    );
    let answer = decode_one(&s.poll_transmit().unwrap()).unwrap().unwrap();
    assert!(matches!(
        answer,
        Message::Refuse {
            reason: Refusal::Version,
            ..
        }
    ));
}

/// A whole transfer: offer, accept from an offset, data in chunks, commit, stored.
fn transfer(offset: u64, data: &[u8], bytewise: bool) -> Vec<u8> {
    let now = Instant::now();
    let size = data.len() as u64;
    let mut up = Upload::new("fhir/dkfz/a.ndjson", size, sha(1), now, IDLE);
    let mut rx = Receive::new(now, IDLE);
    let mut events = Vec::new();
    pump(
        || up.poll_transmit(),
        |b| events.extend(rx.handle_input(b, now).unwrap()),
        bytewise,
    );
    assert_eq!(
        events,
        [ReceiveEvent::Offered {
            key: "fhir/dkfz/a.ndjson".into(),
            size,
            sha256: sha(1),
            eager: false,
        }]
    );
    rx.accept(offset, now).unwrap();
    let mut answer = None;
    pump(
        || rx.poll_transmit(),
        |b| {
            if let Some(e) = up.handle_input(b, now).unwrap() {
                answer = Some(e);
            }
        },
        bytewise,
    );
    assert_eq!(answer, Some(UploadEvent::SendFrom(offset)));
    let mut off = offset;
    for chunk in data[usize::try_from(offset).unwrap()..].chunks(7) {
        up.send_data(off, chunk.to_vec()).unwrap();
        off += chunk.len() as u64;
    }
    up.commit(now, IDLE).unwrap();
    assert!(
        up.poll_timeout().is_some(),
        "waiting for the ack is bounded"
    );
    let mut received = Vec::new();
    let mut committed = false;
    pump(
        || up.poll_transmit(),
        |b| {
            for e in rx.handle_input(b, now).unwrap() {
                match e {
                    ReceiveEvent::Data { offset: o, bytes } => {
                        assert_eq!(o, offset + received.len() as u64);
                        received.extend(bytes);
                    }
                    ReceiveEvent::Committed => committed = true,
                    other => panic!("{other:?}"),
                }
            }
        },
        bytewise,
    );
    assert!(committed);
    rx.stored();
    let mut end = None;
    pump(
        || rx.poll_transmit(),
        |b| {
            if let Some(e) = up.handle_input(b, now).unwrap() {
                end = Some(e);
            }
        },
        bytewise,
    );
    assert_eq!(end, Some(UploadEvent::Stored));
    assert_eq!(up.poll_timeout(), None);
    received
}

#[test]
fn a_transfer_from_zero_and_a_resumed_one_carry_exactly_the_missing_bytes() {
    let data: Vec<u8> = (0..100u8).collect();
    assert_eq!(transfer(0, &data, false), data);
    assert_eq!(transfer(0, &data, true), data);
    // Resumed: the relay held 60 bytes; only the rest crosses.
    assert_eq!(transfer(60, &data, true), data[60..]);
    // Everything held already: nothing but the commit.
    assert!(transfer(100, &data, false).is_empty());
    // An empty object.
    assert!(transfer(0, &[], false).is_empty());
}

#[test]
fn the_relay_can_answer_already_have_refuse_or_mismatch() {
    let now = Instant::now();
    for (decide, expect) in [
        (0, UploadEvent::AlreadyStored),
        (
            1,
            UploadEvent::Refused {
                reason: Refusal::Unauthorized,
                message: "fhir/embl/ is not yours".into(),
            },
        ),
    ] {
        let mut up = Upload::new("fhir/embl/x", 3, sha(2), now, IDLE);
        let mut rx = Receive::new(now, IDLE);
        rx.handle_input(&up.poll_transmit().unwrap(), now).unwrap();
        if decide == 0 {
            rx.already_have();
        } else {
            rx.refuse(Refusal::Unauthorized, "fhir/embl/ is not yours".into());
        }
        let ev = up.handle_input(&rx.poll_transmit().unwrap(), now).unwrap();
        assert_eq!(ev, Some(expect));
        assert!(
            up.send_data(0, vec![1, 2, 3]).is_err(),
            "nothing to send now"
        );
    }
    // Mismatch after commit.
    let mut up = Upload::new("k", 2, sha(3), now, IDLE);
    let mut rx = Receive::new(now, IDLE);
    rx.handle_input(&up.poll_transmit().unwrap(), now).unwrap();
    rx.accept(0, now).unwrap();
    up.handle_input(&rx.poll_transmit().unwrap(), now).unwrap();
    up.send_data(0, vec![9, 9]).unwrap();
    up.commit(now, IDLE).unwrap();
    while let Some(f) = up.poll_transmit() {
        rx.handle_input(&f, now).unwrap();
    }
    rx.mismatch("sha256 differs".into());
    let ev = up.handle_input(&rx.poll_transmit().unwrap(), now).unwrap();
    assert_eq!(ev, Some(UploadEvent::Mismatch("sha256 differs".into())));
}

#[test]
fn violations_end_the_stream_with_an_error_to_the_peer() {
    let now = Instant::now();
    // Data before any offer.
    let mut rx = Receive::new(now, IDLE);
    let data = encode(&Message::Data {
        offset: 0,
        bytes: vec![1],
    });
    assert!(matches!(
        rx.handle_input(&data, now),
        Err(SessionError::Unexpected { got: "Data", .. })
    ));
    assert!(matches!(
        decode_one(&rx.poll_transmit().unwrap()).unwrap(),
        Some(Message::Error { .. })
    ));
    // A gap, data past the end, an early commit.
    for (msgs, expect) in [
        (
            vec![Message::Data {
                offset: 5,
                bytes: vec![1],
            }],
            SessionError::OutOfOrder {
                got: 5,
                expected: 0,
            },
        ),
        (
            vec![Message::Data {
                offset: 0,
                bytes: vec![0; 11],
            }],
            SessionError::PastEnd { size: 10 },
        ),
        (
            vec![
                Message::Data {
                    offset: 0,
                    bytes: vec![0; 4],
                },
                Message::Commit,
            ],
            SessionError::Incomplete { sent: 4, size: 10 },
        ),
    ] {
        let mut rx = Receive::new(now, IDLE);
        let offer = encode(&Message::Offer {
            key: "k".into(),
            size: 10,
            sha256: sha(0),
        });
        rx.handle_input(&offer, now).unwrap();
        rx.accept(0, now).unwrap();
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        assert_eq!(rx.handle_input(&bytes, now), Err(expect));
    }
    // The agent side refuses an offset past the size, and its own out-of-order data.
    let mut up = Upload::new("k", 10, sha(0), now, IDLE);
    up.poll_transmit();
    assert_eq!(
        up.handle_input(&encode(&Message::Accept { offset: 11 }), now),
        Err(SessionError::BadOffset {
            offset: 11,
            size: 10
        })
    );
    let mut up = Upload::new("k", 10, sha(0), now, IDLE);
    up.handle_input(&encode(&Message::Accept { offset: 2 }), now)
        .unwrap();
    assert!(up.send_data(0, vec![0]).is_err());
    assert!(
        up.commit(now, IDLE).is_err(),
        "commit before every byte is queued"
    );
}

#[test]
fn silence_times_out_on_both_ends_but_not_while_the_caller_sends() {
    let t0 = Instant::now();
    let mut up = Upload::new("k", 10, sha(0), t0, IDLE);
    assert_eq!(up.poll_timeout(), Some(t0 + IDLE));
    assert!(up.handle_timeout(t0 + IDLE / 2).is_ok());
    assert_eq!(
        up.handle_timeout(t0 + IDLE),
        Err(SessionError::Timeout(IDLE))
    );
    // Sending: the agent's own pace, no deadline; after the commit, one again.
    let mut up = Upload::new("k", 1, sha(0), t0, IDLE);
    let t1 = t0 + Duration::from_secs(3);
    up.handle_input(&encode(&Message::Accept { offset: 0 }), t1)
        .unwrap();
    assert_eq!(up.poll_timeout(), None);
    up.send_data(0, vec![7]).unwrap();
    let t2 = t1 + Duration::from_secs(60);
    // The acknowledgement may take longer than the idle time (the relay lands the object).
    let ack_wait = IDLE * 6;
    up.commit(t2, ack_wait).unwrap();
    assert_eq!(up.poll_timeout(), Some(t2 + ack_wait));
    assert!(up.handle_timeout(t2 + IDLE * 2).is_ok());
    assert_eq!(
        up.handle_timeout(t2 + ack_wait),
        Err(SessionError::Timeout(ack_wait))
    );
    // The relay gives up on an agent that stops sending mid-object; each message resets it.
    let mut rx = Receive::new(t0, IDLE);
    let offer = encode(&Message::Offer {
        key: "k".into(),
        size: 10,
        sha256: sha(0),
    });
    rx.handle_input(&offer, t0).unwrap();
    assert_eq!(rx.poll_timeout(), None, "deciding is the relay's own work");
    rx.accept(0, t0).unwrap();
    let t3 = t0 + Duration::from_secs(9);
    rx.handle_input(
        &encode(&Message::Data {
            offset: 0,
            bytes: vec![1],
        }),
        t3,
    )
    .unwrap();
    assert!(rx.handle_timeout(t0 + IDLE).is_ok());
    assert_eq!(
        rx.handle_timeout(t3 + IDLE),
        Err(SessionError::Timeout(IDLE))
    );
}

/// Finding 11: landing can fail after Commit; the relay's refusal then is an answer the agent
/// understands (permanent or not), not a protocol violation.
#[test]
fn a_refusal_after_commit_is_an_answer() {
    for reason in [Refusal::Rejected, Refusal::Unavailable] {
        let now = Instant::now();
        let mut up = Upload::new("fhir/dkfz/a.ndjson", 3, sha(1), now, IDLE);
        let mut rx = Receive::new(now, IDLE);
        pump(
            || up.poll_transmit(),
            |b| drop(rx.handle_input(b, now).unwrap()),
            false,
        );
        rx.accept(0, now).unwrap();
        pump(
            || rx.poll_transmit(),
            |b| drop(up.handle_input(b, now).unwrap()),
            false,
        );
        up.send_data(0, b"abc".to_vec()).unwrap();
        up.commit(now, IDLE).unwrap();
        let mut committed = false;
        pump(
            || up.poll_transmit(),
            |b| {
                committed |= rx
                    .handle_input(b, now)
                    .unwrap()
                    .contains(&ReceiveEvent::Committed)
            },
            false,
        );
        assert!(committed);
        rx.refuse(reason, "the key names a directory".into());
        let mut end = None;
        pump(
            || rx.poll_transmit(),
            |b| end = up.handle_input(b, now).unwrap(),
            false,
        );
        assert_eq!(
            end,
            Some(UploadEvent::Refused {
                reason,
                message: "the key names a directory".into()
            })
        );
        assert!(!reason.is_temporary() || reason == Refusal::Unavailable);
    }
}

/// An eager offer: offer, data and commit in one flight, the answers in one read.
fn eager_transfer(data: &[u8], bytewise: bool) -> (Vec<u8>, Option<UploadEvent>) {
    let now = Instant::now();
    let size = data.len() as u64;
    let mut up = Upload::new_eager("fhir/dkfz/e.ndjson", size, sha(2), now, IDLE);
    assert_eq!(up.poll_timeout(), None, "sending: no deadline");
    let mut off = 0;
    for chunk in data.chunks(5) {
        up.send_data(off, chunk.to_vec()).unwrap();
        off += chunk.len() as u64;
    }
    up.commit(now, IDLE).unwrap();
    let mut rx = Receive::new(now, IDLE);
    let mut events = Vec::new();
    pump(
        || up.poll_transmit(),
        |b| events.extend(rx.handle_input(b, now).unwrap()),
        bytewise,
    );
    // Nothing past the offer is decoded before the decision.
    assert_eq!(
        events,
        [ReceiveEvent::Offered {
            key: "fhir/dkfz/e.ndjson".into(),
            size,
            sha256: sha(2),
            eager: true,
        }]
    );
    assert!(
        rx.accept(3, now).is_err() || size < 3,
        "an eager offer is accepted from 0 only"
    );
    let mut rx = Receive::new(now, IDLE);
    let mut up2 = Upload::new_eager("fhir/dkfz/e.ndjson", size, sha(2), now, IDLE);
    let mut off = 0;
    for chunk in data.chunks(5) {
        up2.send_data(off, chunk.to_vec()).unwrap();
        off += chunk.len() as u64;
    }
    up2.commit(now, IDLE).unwrap();
    let mut wire = Vec::new();
    while let Some(f) = up2.poll_transmit() {
        wire.extend(f);
    }
    let first = rx.handle_input(&wire, now).unwrap();
    assert_eq!(first.len(), 1);
    rx.accept(0, now).unwrap();
    let mut received = Vec::new();
    let mut committed = false;
    for e in rx.handle_input(&[], now).unwrap() {
        match e {
            ReceiveEvent::Data { offset, bytes } => {
                assert_eq!(offset, received.len() as u64);
                received.extend(bytes);
            }
            ReceiveEvent::Committed => committed = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(committed);
    rx.stored();
    let mut answer = None;
    // Accept{0} and Stored in one read: the one event is Stored.
    let mut back = Vec::new();
    while let Some(f) = rx.poll_transmit() {
        back.extend(f);
    }
    pump(
        || (!back.is_empty()).then(|| std::mem::take(&mut back)),
        |b| {
            if let Some(e) = up2.handle_input(b, now).unwrap() {
                assert!(answer.is_none(), "one answer");
                answer = Some(e);
            }
        },
        bytewise,
    );
    (received, answer)
}

#[test]
fn an_eager_offer_lands_in_one_flight() {
    let data: Vec<u8> = (0..100u8).collect();
    for bytewise in [false, true] {
        let (got, answer) = eager_transfer(&data, bytewise);
        assert_eq!(got, data);
        assert_eq!(answer, Some(UploadEvent::Stored));
    }
}

#[test]
fn a_refused_eager_offer_ignores_the_rest_of_the_stream() {
    let now = Instant::now();
    let mut up = Upload::new_eager("fhir/dkfz/e.ndjson", 10, sha(3), now, IDLE);
    up.send_data(0, vec![7; 10]).unwrap();
    up.commit(now, IDLE).unwrap();
    let mut wire = Vec::new();
    while let Some(f) = up.poll_transmit() {
        wire.extend(f);
    }
    let mut rx = Receive::new(now, IDLE);
    // Already had: the data and commit after it are no protocol violation.
    let ev = rx.handle_input(&wire[..5], now).unwrap();
    assert!(ev.is_empty());
    let ev = rx.handle_input(&wire[5..], now).unwrap();
    assert_eq!(ev.len(), 1);
    rx.already_have();
    assert_eq!(rx.handle_input(&[], now).unwrap(), []);
    assert!(rx.poll_transmit().is_some());
    assert_eq!(rx.poll_transmit(), None, "no Error after AlreadyHave");
    let answer = up
        .handle_input(&encode(&Message::AlreadyHave), now)
        .unwrap();
    assert_eq!(answer, Some(UploadEvent::AlreadyStored));
}

#[test]
fn an_eager_upload_refuses_stored_before_accept_and_a_resume_offset() {
    let now = Instant::now();
    let mk = || {
        let mut up = Upload::new_eager("k", 4, sha(4), now, IDLE);
        up.send_data(0, vec![1; 4]).unwrap();
        up.commit(now, IDLE).unwrap();
        up
    };
    // Stored without Accept{0}: the relay cannot have verified what it never accepted.
    assert!(mk().handle_input(&encode(&Message::Stored), now).is_err());
    // An eager offer is never resumed: Accept{2} is a violation.
    assert!(matches!(
        mk().handle_input(&encode(&Message::Accept { offset: 2 }), now),
        Err(SessionError::BadOffset { .. })
    ));
}

#[test]
fn a_plain_offer_still_waits_for_its_answer() {
    let now = Instant::now();
    let mut up = Upload::new("k", 4, sha(5), now, IDLE);
    assert!(
        up.send_data(0, vec![1; 4]).is_err(),
        "no data before Accept"
    );
}

/// A sealed offer (the SHA-256 follows the bytes): answered like an offer, resumed from the
/// relay's offset, and ended by `Seal`, whose SHA-256 the relay is handed to check.
#[test]
fn a_sealed_offer_names_its_transfer_and_carries_the_sha256_with_its_seal() {
    let data: Vec<u8> = (0..100u8).collect();
    for (offset, bytewise) in [(0, false), (60, true), (100, false)] {
        let now = Instant::now();
        let mut up = Upload::new_sealed("fhir/dkfz/s.dcm", 100, sha(7), None, now, IDLE);
        let mut rx = Receive::new(now, IDLE);
        let mut events = Vec::new();
        pump(
            || up.poll_transmit(),
            |b| events.extend(rx.handle_input(b, now).unwrap()),
            bytewise,
        );
        assert_eq!(
            events,
            [ReceiveEvent::SealedOffered {
                key: "fhir/dkfz/s.dcm".into(),
                size: 100,
                transfer: sha(7),
                sha256: None,
                crc64nvme: None,
            }]
        );
        rx.accept(offset, now).unwrap();
        let mut answer = None;
        pump(
            || rx.poll_transmit(),
            |b| answer = answer.clone().or(up.handle_input(b, now).unwrap()),
            bytewise,
        );
        assert_eq!(answer, Some(UploadEvent::SendFrom(offset)));
        let mut off = offset;
        for chunk in data[usize::try_from(offset).unwrap()..].chunks(9) {
            up.send_data(off, chunk.to_vec()).unwrap();
            off += chunk.len() as u64;
        }
        assert!(
            matches!(up.commit(now, IDLE), Err(SessionError::Unexpected { .. })),
            "a sealed offer ends with Seal, not Commit"
        );
        up.seal(sha(8), now, IDLE).unwrap();
        let mut received = Vec::new();
        let mut sealed = None;
        pump(
            || up.poll_transmit(),
            |b| {
                for e in rx.handle_input(b, now).unwrap() {
                    match e {
                        ReceiveEvent::Data { bytes, .. } => received.extend(bytes),
                        ReceiveEvent::Sealed { sha256 } => sealed = Some(sha256),
                        other => panic!("{other:?}"),
                    }
                }
            },
            bytewise,
        );
        assert_eq!(received, data[usize::try_from(offset).unwrap()..]);
        assert_eq!(
            sealed,
            Some(sha(8)),
            "the relay is handed the SHA-256 to check"
        );
        rx.stored();
        let back = rx.poll_transmit().unwrap();
        assert_eq!(
            up.handle_input(&back, now).unwrap(),
            Some(UploadEvent::Stored)
        );
    }
}

#[test]
fn a_sealed_offer_takes_no_commit_and_a_plain_one_no_seal() {
    let now = Instant::now();
    // The relay: Commit after a sealed offer, Seal after a plain one, Seal before the end.
    let cases: [(Message, Message); 3] = [
        (
            Message::SealedOffer {
                key: "k".into(),
                size: 2,
                transfer: sha(1),
                sha256: None,
                crc64nvme: None,
            },
            Message::Commit,
        ),
        (
            Message::Offer {
                key: "k".into(),
                size: 2,
                sha256: sha(1),
            },
            Message::Seal { sha256: sha(1) },
        ),
        (
            Message::SealedOffer {
                key: "k".into(),
                size: 3,
                transfer: sha(1),
                sha256: None,
                crc64nvme: None,
            },
            Message::Seal { sha256: sha(1) },
        ),
    ];
    for (offer, last) in cases {
        let mut rx = Receive::new(now, IDLE);
        assert_eq!(rx.handle_input(&encode(&offer), now).unwrap().len(), 1);
        rx.accept(0, now).unwrap();
        let _ = rx.poll_transmit();
        let data = encode(&Message::Data {
            offset: 0,
            bytes: vec![1, 2],
        });
        assert_eq!(rx.handle_input(&data, now).unwrap().len(), 1);
        assert!(
            rx.handle_input(&encode(&last), now).is_err(),
            "{offer:?} then {last:?}"
        );
    }
    // The agent: Seal on a plain offer is refused; AlreadyHave answers a sealed offer only
    // if it named a SHA-256 (an unnamed object cannot be "the same").
    let mut plain = Upload::new("k", 0, sha(1), now, IDLE);
    plain
        .handle_input(&encode(&Message::Accept { offset: 0 }), now)
        .unwrap();
    assert!(plain.seal(sha(1), now, IDLE).is_err());
    let mut unnamed = Upload::new_sealed("k", 4, sha(1), None, now, IDLE);
    assert!(unnamed
        .handle_input(&encode(&Message::AlreadyHave), now)
        .is_err());
    let mut unnamed = Upload::new_sealed("k", 4, sha(1), None, now, IDLE);
    assert_eq!(
        unnamed
            .handle_input(&encode(&Message::Present), now)
            .unwrap(),
        Some(UploadEvent::Present),
        "an object of that size is there: hash and offer again"
    );
    let mut named = Upload::new_sealed("k", 4, sha(1), Some((sha(2), None)), now, IDLE);
    assert!(
        named.handle_input(&encode(&Message::Present), now).is_err(),
        "Present answers only an offer without its SHA-256"
    );
    let mut named = Upload::new_sealed("k", 4, sha(1), Some((sha(2), Some(9))), now, IDLE);
    assert_eq!(
        named
            .handle_input(&encode(&Message::AlreadyHave), now)
            .unwrap(),
        Some(UploadEvent::AlreadyStored)
    );
}
