//! The encoding is a contract with relays and agents of other versions: golden bytes pin it,
//! round trips hold for any message, and the frame limit holds before allocation.

use ha_edge_proto::*;
use proptest::prelude::*;

fn samples() -> Vec<Message> {
    vec![
        Message::Hello {
            version: 1,
            agent: "dkfz-edge-01".into(),
            capabilities: 0,
        },
        Message::Welcome {
            version: 1,
            relay: "relay".into(),
            capabilities: 0,
        },
        Message::Offer {
            key: "fhir/dkfz/a.ndjson".into(),
            size: 300,
            sha256: [0xab; 32],
        },
        Message::Accept { offset: 1 << 20 },
        Message::AlreadyHave,
        Message::Refuse {
            reason: Refusal::Unauthorized,
            message: "no".into(),
        },
        Message::Data {
            offset: 7,
            bytes: vec![1, 2, 3],
        },
        Message::Commit,
        Message::Stored,
        Message::Mismatch {
            message: "x".into(),
        },
        Message::Error {
            message: "e".into(),
        },
        Message::SealedOffer {
            key: "k".into(),
            size: 300,
            transfer: [0xcd; 32],
            sha256: None,
            crc64nvme: Some(7),
        },
        Message::Seal { sha256: [0xef; 32] },
        Message::Present,
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Changing any of these bytes breaks agents and relays already deployed: bump VERSION instead.
const GOLDEN: &[&str] = &[
    "0000001000010c646b667a2d656467652d303100",
    "0000000901010572656c617900",
    "000000370212666869722f646b667a2f612e6e646a736f6efb2c01abababababababababababababababababababababababababababababababab",
    "0000000603fc00001000",
    "0000000104",
    "000000050501026e6f",
    "00000006060703010203",
    "0000000107",
    "0000000108",
    "00000003090178",
    "000000030a0165",
    "000000290c016bfb2c01cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd000107",
    "000000210defefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef",
    "000000010e",
];

#[test]
fn golden_bytes() {
    let got: Vec<String> = samples().iter().map(|m| hex(&encode(m))).collect();
    assert_eq!(got.len(), GOLDEN.len(), "{got:#?}");
    for (i, (g, want)) in got.iter().zip(GOLDEN).enumerate() {
        assert_eq!(
            g,
            want,
            "message {i} ({:?}) encodes differently",
            samples()[i]
        );
    }
    assert_eq!(VERSION, 1);
    assert_eq!(ALPN, b"ha-edge/1");
}

#[test]
fn a_frame_over_the_limit_is_refused_from_its_length_alone() {
    let mut d = Decoder::new();
    let len = (u32::try_from(MAX_FRAME).unwrap() + 1).to_be_bytes();
    assert_eq!(d.push(&len), Err(FrameError::TooLarge(MAX_FRAME + 1)));
    // A 4 GiB claim is refused with nothing but the prefix buffered.
    let mut d = Decoder::new();
    assert!(d.push(&[0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(d.buffered() <= 4);
    // A Vec inside a message claiming more than the frame holds fails to decode, no panic.
    let mut frame = encode(&Message::Data {
        offset: 0,
        bytes: vec![0; 4],
    });
    // Body: variant 6, offset 0, length 4 -> claim 250 (varint single byte) instead.
    let pos = frame.len() - 5;
    frame[pos] = 250;
    assert!(decode_one(&frame).is_err());
    // Trailing bytes inside a frame are an error, not ignored.
    let mut frame = encode(&Message::Commit);
    frame.push(0);
    frame[3] += 1;
    assert_eq!(decode_one(&frame), Err(FrameError::Trailing(1)));
}

#[test]
fn the_largest_data_message_fits_a_frame() {
    let m = Message::Data {
        offset: u64::MAX,
        bytes: vec![0xff; MAX_DATA],
    };
    let f = encode(&m);
    assert!(f.len() - 4 <= MAX_FRAME);
    assert_eq!(decode_one(&f).unwrap(), Some(m));
}

fn any_refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        Just(Refusal::Version),
        Just(Refusal::Unauthorized),
        Just(Refusal::BadKey),
        Just(Refusal::Busy),
        Just(Refusal::Unavailable),
        Just(Refusal::Rejected),
    ]
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), ".{0,40}", any::<u64>()).prop_map(|(version, agent, capabilities)| {
            Message::Hello {
                version,
                agent,
                capabilities,
            }
        }),
        (any::<u16>(), ".{0,40}", any::<u64>()).prop_map(|(version, relay, capabilities)| {
            Message::Welcome {
                version,
                relay,
                capabilities,
            }
        }),
        (".{0,200}", any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(key, size, sha256)| Message::Offer { key, size, sha256 }),
        any::<u64>().prop_map(|offset| Message::Accept { offset }),
        Just(Message::AlreadyHave),
        (any_refusal(), ".{0,80}")
            .prop_map(|(reason, message)| Message::Refuse { reason, message }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(offset, bytes)| Message::Data { offset, bytes }),
        Just(Message::Commit),
        Just(Message::Stored),
        ".{0,80}".prop_map(|message| Message::Mismatch { message }),
        ".{0,80}".prop_map(|message| Message::Error { message }),
        (
            ".{0,200}",
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<Option<[u8; 32]>>(),
            any::<Option<u64>>()
        )
            .prop_map(
                |(key, size, transfer, sha256, crc64nvme)| Message::SealedOffer {
                    key,
                    size,
                    transfer,
                    sha256,
                    crc64nvme
                }
            ),
        any::<[u8; 32]>().prop_map(|sha256| Message::Seal { sha256 }),
        Just(Message::Present),
    ]
}

proptest! {
    #[test]
    fn any_message_round_trips_however_the_stream_is_split(
        msgs in proptest::collection::vec(any_message(), 1..8),
        cut in any::<usize>(),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let cut = cut % (stream.len() + 1);
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for part in [&stream[..cut], &stream[cut..]] {
            d.push(part).unwrap();
            while let Some(m) = d.next_message().unwrap() {
                out.push(m);
            }
        }
        prop_assert_eq!(out, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut d = Decoder::new();
        if d.push(&bytes).is_ok() {
            while let Ok(Some(_)) = d.next_message() {}
        }
    }
}
