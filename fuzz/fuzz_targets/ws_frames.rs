//! WebSocket client bytes through the server's frame decoder, arriving in pieces of any size:
//! events or a refusal, never a panic; no message over the limit; the same events whatever
//! the pieces.
#![no_main]
use bytes::BytesMut;
use holdfast_transport::frame::{DecodeError, Decoder, Event};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fn run(data: &[u8], piece: usize) -> Vec<Result<Event, DecodeError>> {
    let mut d = Decoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(e)) => {
                    if let Event::Message { data, text } = &e {
                        assert!(data.len() <= MAX);
                        assert!(!text || std::str::from_utf8(data).is_ok());
                    }
                    out.push(Ok(e));
                }
                Ok(None) => break,
                Err(e @ DecodeError::TooBig { .. }) => out.push(Err(e)),
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&p, rest)) = data.split_first() else {
        return;
    };
    let whole = run(rest, rest.len().max(1));
    let pieces = run(rest, usize::from(p % 16) + 1);
    assert_eq!(whole, pieces);
});
