//! Arbitrary bytes into the frame decoder and into the relay's session: no panic, no
//! unbounded allocation, every error a clean `Err`.
#![no_main]

use std::time::{Duration, Instant};

use ha_edge_proto::{encode, Decoder, Receive, ReceiveEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The decoder alone, fed in two pieces.
    let mut d = Decoder::new();
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    if d.push(&data[..cut]).is_ok() && d.push(&data[cut..]).is_ok() {
        while let Ok(Some(m)) = d.next_message() {
            // Whatever decodes re-encodes to a frame that decodes to the same message.
            let mut again = Decoder::new();
            again.push(&encode(&m)).expect("own frames are within the limit");
            assert_eq!(again.next_message().expect("own frames decode"), Some(m));
        }
    }
    // The relay's session, accepting whatever is offered.
    let now = Instant::now();
    let mut rx = Receive::new(now, Duration::from_secs(5));
    if let Ok(events) = rx.handle_input(data, now) {
        for e in events {
            if let ReceiveEvent::Offered { size, .. } = e {
                let _ = rx.accept(size / 2, now);
            }
        }
    }
    while rx.poll_transmit().is_some() {}
});
