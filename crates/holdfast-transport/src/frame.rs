//! RFC 6455 framing for the server side of a WebSocket, without a per-connection buffer held
//! while the connection is idle: [`Decoder`] turns the bytes read so far into messages, pings
//! and closes (checking every rule a server must: masking, reserved bits and opcodes,
//! control-frame limits, fragmentation order, UTF-8 of text messages, close codes, the message
//! size limit); [`header`] writes the header of a server frame (never masked), which the writer
//! sends next to the payload in one vectored write, without copying the payload.

use bytes::{Buf, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The largest close reason that fits a control frame (125 bytes less the 2-byte code).
pub const MAX_CLOSE_REASON: usize = 123;

/// What a client sent, one complete unit at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A data message, reassembled from its fragments; a text message is valid UTF-8.
    Message { data: Bytes, text: bool },
    /// A ping: the server answers with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong (unsolicited or an answer): nothing to do.
    Pong,
    /// A close frame with its status code, if it carried one.
    Close { code: Option<u16> },
}

/// Why the bytes cannot go on being read as a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A message (or one frame of it) longer than the limit. Its payload is skipped as it
    /// arrives, so the frames after it (the client's close) are still read.
    TooBig { size: u64, max: usize },
    /// A violation of RFC 6455 (answered with close code 1002); nothing after it is parsed.
    Protocol(&'static str),
    /// A text message that is not UTF-8.
    Utf8,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooBig { size, max } => {
                write!(f, "message of {size} bytes over the limit of {max}")
            }
            DecodeError::Protocol(what) => f.write_str(what),
            DecodeError::Utf8 => f.write_str("text message is not UTF-8"),
        }
    }
}

/// Incremental decoder of client frames. Holds only the fragments of a message being
/// reassembled; the bytes not yet decoded stay with the caller.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// A fragmented data message being reassembled: text or binary, and the fragments so far.
    partial: Option<(bool, BytesMut)>,
    /// Payload bytes of an oversized frame still to be discarded.
    skip: u64,
    /// The fragmented message being received went over the limit: its remaining fragments
    /// are skipped up to the final one (control frames between them are still read).
    discarding: bool,
}

impl Decoder {
    /// A decoder refusing messages longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            partial: None,
            skip: 0,
            discarding: false,
        }
    }

    /// Bytes the decoder needs before it can say more: at least one.
    pub fn wants_more(&self) -> bool {
        self.skip > 0 || self.partial.is_some() || self.discarding
    }

    /// Decodes the next event from the front of `buf`, consuming what it used. `Ok(None)`: more
    /// bytes are needed (what is in `buf` stays there, except a skipped payload).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, DecodeError> {
        loop {
            if self.skip > 0 {
                let n = (buf.len() as u64).min(self.skip) as usize;
                buf.advance(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            if buf.len() < 2 {
                return Ok(None);
            }
            let (b0, b1) = (buf[0], buf[1]);
            if b0 & 0x70 != 0 {
                return Err(DecodeError::Protocol(
                    "reserved bits set without an extension",
                ));
            }
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0F;
            if !matches!(
                opcode,
                OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
            ) {
                return Err(DecodeError::Protocol("reserved opcode"));
            }
            if b1 & 0x80 == 0 {
                return Err(DecodeError::Protocol("unmasked frame from a client"));
            }
            let control = opcode & 0x08 != 0;
            let (len, len_bytes) = match b1 & 0x7F {
                126 => {
                    if buf.len() < 4 {
                        return Ok(None);
                    }
                    (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 2)
                }
                127 => {
                    if buf.len() < 10 {
                        return Ok(None);
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    let len = u64::from_be_bytes(b);
                    if len >> 63 != 0 {
                        return Err(DecodeError::Protocol("frame length with the top bit set"));
                    }
                    (len, 8)
                }
                n => (u64::from(n), 0),
            };
            let head = 2 + len_bytes + 4;
            if control {
                if !fin {
                    return Err(DecodeError::Protocol("fragmented control frame"));
                }
                if len > 125 {
                    return Err(DecodeError::Protocol("control frame over 125 bytes"));
                }
            } else {
                let in_message = self.partial.is_some() || self.discarding;
                match (opcode, in_message) {
                    (OP_CONTINUATION, false) => {
                        return Err(DecodeError::Protocol("continuation without a start"));
                    }
                    (OP_TEXT | OP_BINARY, true) => {
                        return Err(DecodeError::Protocol("new message inside a fragmented one"));
                    }
                    _ => {}
                }
                if self.discarding {
                    // A later fragment of a message already refused: skip it silently.
                    if buf.len() < head {
                        return Ok(None);
                    }
                    buf.advance(head);
                    self.skip = len;
                    self.discarding = !fin;
                    continue;
                }
                let so_far = self.partial.as_ref().map_or(0, |(_, b)| b.len() as u64);
                let size = so_far.saturating_add(len);
                if size > self.max_message as u64 {
                    if buf.len() < head {
                        return Ok(None);
                    }
                    buf.advance(head);
                    self.partial = None;
                    self.skip = len;
                    self.discarding = !fin;
                    return Err(DecodeError::TooBig {
                        size,
                        max: self.max_message,
                    });
                }
            }
            // Bounded: a control frame is at most 125 bytes, a data frame at most the limit.
            let len = len as usize;
            if buf.len() < head + len {
                // Room for the rest, up to 64 KiB at a time: a header alone does not make the
                // server set aside the whole message before its bytes arrive.
                buf.reserve((head + len - buf.len()).min(64 * 1024));
                return Ok(None);
            }
            let mask = [buf[head - 4], buf[head - 3], buf[head - 2], buf[head - 1]];
            buf.advance(head);
            let mut payload = buf.split_to(len);
            apply_mask(&mut payload, mask);
            match opcode {
                OP_PING => return Ok(Some(Event::Ping(payload.freeze()))),
                OP_PONG => return Ok(Some(Event::Pong)),
                OP_CLOSE => return close_event(&payload).map(Some),
                _ => {}
            }
            if fin && self.partial.is_none() {
                let text = opcode == OP_TEXT;
                if text && std::str::from_utf8(&payload).is_err() {
                    return Err(DecodeError::Utf8);
                }
                return Ok(Some(Event::Message {
                    data: payload.freeze(),
                    text,
                }));
            }
            match &mut self.partial {
                Some((_, acc)) => acc.extend_from_slice(&payload),
                None => self.partial = Some((opcode == OP_TEXT, payload)),
            }
            if fin && let Some((text, data)) = self.partial.take() {
                if text && std::str::from_utf8(&data).is_err() {
                    return Err(DecodeError::Utf8);
                }
                return Ok(Some(Event::Message {
                    data: data.freeze(),
                    text,
                }));
            }
        }
    }
}

fn close_event(payload: &[u8]) -> Result<Event, DecodeError> {
    match payload.len() {
        0 => Ok(Event::Close { code: None }),
        1 => Err(DecodeError::Protocol("close frame of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(DecodeError::Protocol("close code not allowed on the wire"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(DecodeError::Protocol("close reason is not UTF-8"));
            }
            Ok(Event::Close { code: Some(code) })
        }
    }
}

/// Close codes a peer may send (RFC 6455 §7.4 and the IANA registry; 1004–1006 and 1015 are
/// reserved for local use, below 1000 and 1016–2999 unassigned).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `buf` with the client's masking key, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// The header of an unmasked, final server frame.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The header of a final, unmasked frame with `opcode` and a payload of `len` bytes.
pub fn header(opcode: u8, len: usize) -> Header {
    let mut bytes = [0u8; 10];
    bytes[0] = 0x80 | opcode;
    let n = if len < 126 {
        bytes[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        bytes[1] = 126;
        bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        bytes[1] = 127;
        bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    Header { bytes, len: n }
}

/// The payload of a close frame: the code and the reason, cut to fit on a character boundary.
pub fn close_payload(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    Bytes::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn client(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&key);
        let mut p = payload.to_vec();
        apply_mask(&mut p, key);
        f.extend_from_slice(&p);
        f
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Vec<Result<Event, DecodeError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf) {
                Ok(Some(e)) => out.push(Ok(e)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    if matches!(e, DecodeError::Protocol(_) | DecodeError::Utf8) {
                        return out;
                    }
                }
            }
        }
    }

    fn text(s: &str) -> Event {
        Event::Message {
            data: Bytes::copy_from_slice(s.as_bytes()),
            text: true,
        }
    }

    #[test]
    fn masking_round_trips_at_every_length_and_offset() {
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut b = orig.clone();
            apply_mask(&mut b, [1, 2, 3, 4]);
            let naive: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, x)| x ^ [1, 2, 3, 4][i % 4])
                .collect();
            assert_eq!(b, naive);
            apply_mask(&mut b, [1, 2, 3, 4]);
            assert_eq!(b, orig);
        }
    }

    #[test]
    fn frames_decode_byte_by_byte_and_all_at_once() {
        let big = "x".repeat(70_000);
        let mut stream = client(OP_TEXT, true, b"{}");
        stream.extend(client(OP_TEXT, false, b"hel"));
        stream.extend(client(OP_PING, true, b"p"));
        stream.extend(client(OP_CONTINUATION, true, b"lo"));
        stream.extend(client(OP_TEXT, true, big.as_bytes()));
        stream.extend(client(OP_BINARY, true, &[0xff, 0]));
        stream.extend(client(OP_PONG, true, b""));
        stream.extend(client(OP_CLOSE, true, &close_payload(1000, "bye")));
        let want = vec![
            Ok(text("{}")),
            Ok(Event::Ping(Bytes::from_static(b"p"))),
            Ok(text("hello")),
            Ok(text(&big)),
            Ok(Event::Message {
                data: Bytes::from_static(&[0xff, 0]),
                text: false,
            }),
            Ok(Event::Pong),
            Ok(Event::Close { code: Some(1000) }),
        ];
        assert_eq!(decode_all(&mut Decoder::new(100_000), &stream), want);
        // One byte at a time.
        let mut d = Decoder::new(100_000);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &stream {
            buf.extend_from_slice(&[*b]);
            while let Some(e) = d.decode(&mut buf).expect("valid stream") {
                got.push(Ok(e));
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn violations_are_refused() {
        let mut reserved = client(OP_TEXT, true, b"{}");
        reserved[0] |= 0x40;
        let mut unmasked = client(OP_TEXT, true, b"");
        unmasked[1] &= 0x7F;
        unmasked.truncate(2);
        let mut huge_len = vec![0x82, 0x80 | 127];
        huge_len.extend_from_slice(&u64::MAX.to_be_bytes());
        huge_len.extend_from_slice(&[0; 4]);
        let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
            (
                "continuation first",
                client(OP_CONTINUATION, true, b"x"),
                DecodeError::Protocol("continuation without a start"),
            ),
            (
                "new message mid-fragment",
                [client(OP_TEXT, false, b"a"), client(OP_TEXT, true, b"b")].concat(),
                DecodeError::Protocol("new message inside a fragmented one"),
            ),
            (
                "reserved bits",
                reserved,
                DecodeError::Protocol("reserved bits set without an extension"),
            ),
            (
                "unmasked",
                unmasked,
                DecodeError::Protocol("unmasked frame from a client"),
            ),
            (
                "reserved opcode",
                client(0x3, true, b""),
                DecodeError::Protocol("reserved opcode"),
            ),
            (
                "long ping",
                client(OP_PING, true, &[0; 126]),
                DecodeError::Protocol("control frame over 125 bytes"),
            ),
            (
                "fragmented ping",
                client(OP_PING, false, b""),
                DecodeError::Protocol("fragmented control frame"),
            ),
            (
                "close code 999",
                client(OP_CLOSE, true, &999u16.to_be_bytes()),
                DecodeError::Protocol("close code not allowed on the wire"),
            ),
            (
                "close of one byte",
                client(OP_CLOSE, true, &[3]),
                DecodeError::Protocol("close frame of one byte"),
            ),
            (
                "top length bit",
                huge_len,
                DecodeError::Protocol("frame length with the top bit set"),
            ),
            (
                "bad UTF-8",
                client(OP_TEXT, true, &[0xc3, 0x28]),
                DecodeError::Utf8,
            ),
            (
                "bad UTF-8 across fragments",
                [
                    client(OP_TEXT, false, &[0xe2, 0x82]),
                    client(OP_CONTINUATION, true, &[0x28]),
                ]
                .concat(),
                DecodeError::Utf8,
            ),
        ];
        for (what, bytes, want) in cases {
            let got = decode_all(&mut Decoder::new(1000), &bytes);
            assert_eq!(got.last(), Some(&Err(want)), "{what}");
        }
    }

    #[test]
    fn an_oversized_message_is_skipped_and_the_close_after_it_still_read() {
        let mut d = Decoder::new(100);
        let mut stream = client(OP_TEXT, false, &[b'a'; 60]);
        stream.extend(client(OP_CONTINUATION, true, &[b'b'; 60]));
        stream.extend(client(OP_BINARY, true, &[0; 300]));
        stream.extend(client(OP_CLOSE, true, &close_payload(1000, "")));
        let got = decode_all(&mut d, &stream);
        assert_eq!(
            got,
            vec![
                Err(DecodeError::TooBig {
                    size: 120,
                    max: 100
                }),
                Err(DecodeError::TooBig {
                    size: 300,
                    max: 100
                }),
                Ok(Event::Close { code: Some(1000) }),
            ]
        );
        // Over the limit in a first fragment: the rest of the message is skipped, pings
        // between its fragments still answered, and the next message read.
        let mut d = Decoder::new(100);
        let mut stream = client(OP_BINARY, false, &[0; 150]);
        stream.extend(client(OP_PING, true, b"p"));
        stream.extend(client(OP_CONTINUATION, false, &[0; 10]));
        stream.extend(client(OP_CONTINUATION, true, &[0; 10]));
        stream.extend(client(OP_TEXT, true, b"{}"));
        assert_eq!(
            decode_all(&mut d, &stream),
            vec![
                Err(DecodeError::TooBig {
                    size: 150,
                    max: 100
                }),
                Ok(Event::Ping(Bytes::from_static(b"p"))),
                Ok(text("{}")),
            ]
        );
        // Nothing is buffered for the skipped payload, and the limit holds without the
        // payload having arrived.
        let mut d = Decoder::new(100);
        let mut head = BytesMut::from(&client(OP_BINARY, true, &[0; 5000])[..8]);
        assert!(matches!(
            d.decode(&mut head),
            Err(DecodeError::TooBig { .. })
        ));
        assert!(head.is_empty() && d.wants_more());
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        assert_eq!(header(OP_TEXT, 5).as_slice(), &[0x81, 5]);
        assert_eq!(header(OP_BINARY, 126).as_slice(), &[0x82, 126, 0, 126]);
        assert_eq!(
            header(OP_TEXT, 65_536).as_slice(),
            &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]
        );
        let p = close_payload(4000, &"é".repeat(100));
        assert_eq!(p.len(), 2 + 122, "cut on a character boundary");
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
