//! Hostile and broken input: every case gets its close code, nothing panics, others keep going.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};

/// Frames that must close a connection with 3501, before or after connect.
fn bad_frames() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        r#"{"id":1,"connect":{"token":"#,                      // truncated
        r#"{"id":1,"subscribe":{"channel":"a"}"#,              // truncated object
        r#"{"id":"1","subscribe":{"channel":"a"}}"#,           // id of the wrong type
        r#"{"id":1,"subscribe":{"channel":["a"]}}"#,           // channel of the wrong type
        r#"{"id":1,"history":{"channel":"a","limit":"all"}}"#, // limit of the wrong type
        r#"{"id":1,"frobnicate":{}}"#,                         // unknown command
        r#"{"id":1}"#,                                         // no request
        r#"{"id":1,"ping":{}}"#,                               // ping is not a client command
        r#"{"id":99999999999,"subscribe":{"channel":"a"}}"#,   // id beyond u32
        r#"{"id":-5,"subscribe":{"channel":"a"}}"#,            // negative id
        r#"{"subscribe":{"channel":"a"}}"#,                    // no id
        r#"[]"#,
        r#"null"#,
        r#""string""#,
        r#"{"id":1,"subscribe":{"channel":"a"}}}"#, // trailing garbage
        "\n",
        "{}\n\n{}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push(vec![0xff, 0xfe, 0x00, 0x80, 0x81]); // not UTF-8
    v.push(b"{\"id\":1,\"subscribe\":{\"channel\":\"\xff\xfe\"}}".to_vec()); // invalid UTF-8 inside JSON
    // Deterministic pseudo-random bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in [1usize, 7, 64, 500, 3000] {
        let mut b = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push((x & 0xff) as u8);
        }
        v.push(b);
    }
    v
}

#[tokio::test]
async fn malformed_frames_close_with_3501_and_others_are_unaffected() {
    let mut cfg = base_config();
    cfg.client.insecure = true;
    let srv = TestServer::start(cfg).await;
    // A well-behaved subscriber watches a channel throughout.
    let (mut good, _) = srv.connected("good").await;
    good.call("subscribe", json!({"channel": "watch"})).await;
    for (i, frame) in bad_frames().into_iter().enumerate() {
        for connect_first in [false, true] {
            let mut c = srv.client().await;
            if connect_first {
                assert!(c.call("connect", json!({})).await["connect"].is_object());
            }
            c.send_binary(&frame).await;
            assert_eq!(
                c.closed().await,
                Closed::Code(3501, "bad request".into()),
                "case {i} ({:?}), connected: {connect_first}",
                String::from_utf8_lossy(&frame)
            );
        }
        publish(&srv, "watch", json!({"i": i})).await;
        let p = good.push().await;
        assert_eq!(p["pub"]["data"]["i"], i, "the good client keeps receiving");
    }
    // Batches stop at the first bad command, after the good ones were answered.
    let mut c = srv.client().await;
    c.send_raw("{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"x\"}}\n{\"id\":3,\"bogus\":1}").await;
    assert!(c.reply(1).await["connect"].is_object());
    assert!(c.reply(2).await["subscribe"].is_object());
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    let health: Value = reqwest::get(srv.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    srv.stop().await;
}

#[tokio::test]
async fn non_websocket_requests_get_json_4xx() {
    let srv = TestServer::start(base_config()).await;
    let r = reqwest::get(srv.ws_url().replace("ws://", "http://"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "expected a WebSocket upgrade");
    // Raw garbage on the socket: the HTTP layer answers 400 or drops it; the server lives on.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01garbage\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("server closes the garbage connection");
    let (mut c, r) = srv.connected("u").await;
    assert!(r["connect"].is_object());
    assert!(
        c.call("subscribe", json!({"channel": "x"}))
            .await
            .get("error")
            .is_some()
    );
    srv.stop().await;
}

mod raw {
    //! A WebSocket client written by hand, to send what no library sends.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Opens a connection and completes the upgrade (JSON subprotocol).
    pub(crate) async fn open(srv: &TestServer) -> TcpStream {
        open_on(srv, TcpStream::connect(srv.addr).await.unwrap()).await
    }

    /// Opens a connection with a small receive buffer (what the server sends waits in its
    /// own send queue until read) and completes the upgrade.
    pub(crate) async fn open_slow_reader(srv: &TestServer) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        open_on(srv, sock.connect(srv.addr).await.unwrap()).await
    }

    /// Completes the upgrade on an open connection.
    pub(crate) async fn open_on(srv: &TestServer, mut s: TcpStream) -> TcpStream {
        let req = format!(
            "GET /connection/websocket HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: centrifuge-json\r\n\r\n",
            srv.addr
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s
    }

    /// One frame as a client writes it (`masked` as it must be).
    pub(crate) fn frame(opcode: u8, fin: bool, masked: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n < 65536 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x11, 0x22, 0x33, 0x44];
        if masked {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    /// A masked text frame.
    pub(crate) fn text(s: &str) -> Vec<u8> {
        frame(0x1, true, true, s.as_bytes())
    }

    /// Reads server frames until a close frame: its code; `None` when the connection ended (or
    /// was reset) without one.
    pub(crate) async fn close_code<R: AsyncReadExt + Unpin>(s: &mut R) -> Option<u16> {
        let mut buf = Vec::new();
        loop {
            let (opcode, p) = next_frame(s, &mut buf).await?;
            if opcode == 0x8 {
                return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
            }
        }
    }

    /// The next server frame (opcode, payload), reading into `buf` as needed; `None` when the
    /// connection ended (or was reset).
    pub(crate) async fn next_frame<R: AsyncReadExt + Unpin>(
        s: &mut R,
        buf: &mut Vec<u8>,
    ) -> Option<(u8, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if buf.len() >= 2 {
                assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
                let opcode = buf[0] & 0x0f;
                let len_head = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => {
                        Some((u16::from_be_bytes([buf[2], buf[3]]) as usize, 4))
                    }
                    127 if buf.len() >= 10 => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(&buf[2..10]);
                        Some((u64::from_be_bytes(a) as usize, 10))
                    }
                    126 | 127 => None,
                    n => Some((n as usize, 2)),
                };
                if let Some((len, head)) = len_head
                    && buf.len() >= head + len
                {
                    let p = buf[head..head + len].to_vec();
                    buf.drain(..head + len);
                    return Some((opcode, p));
                }
            }
            let mut chunk = vec![0u8; 65536];
            match tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .expect("timed out waiting for a frame")
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[tokio::test]
async fn websocket_protocol_violations_close_with_1002() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = base_config();
    cfg.client.insecure = true;
    let srv = TestServer::start(cfg).await;
    let mut close_999 = raw::frame(0x8, true, true, &999u16.to_be_bytes());
    close_999.truncate(close_999.len());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "continuation without a start",
            raw::frame(0x0, true, true, b"{}"),
        ),
        ("unmasked client frame", raw::frame(0x1, true, false, b"{}")),
        ("reserved data opcode", raw::frame(0x3, true, true, b"{}")),
        ("reserved control opcode", raw::frame(0xb, true, true, b"")),
        (
            "oversized control frame",
            raw::frame(0x9, true, true, &[b'p'; 126]),
        ),
        (
            "fragmented control frame",
            raw::frame(0x9, false, true, b"p"),
        ),
        ("reserved bits", {
            let mut f = raw::text("{}");
            f[0] |= 0x40;
            f
        }),
        ("close code 999", close_999),
    ];
    for (what, bytes) in cases {
        let mut s = raw::open(&srv).await;
        s.write_all(&bytes).await.unwrap();
        assert_eq!(raw::close_code(&mut s).await, Some(1002), "{what}");
    }
    // Others are unaffected.
    let (mut c, _) = srv.connected("u").await;
    assert!(c.call("subscribe", json!({"channel": "a"})).await["subscribe"].is_object());
    srv.stop().await;
}

/// The WebSocket layer's own duties: a ping is answered with a pong carrying its payload, even
/// in the middle of a fragmented message; fragments make one message; a client's close is
/// answered with its code.
#[tokio::test]
async fn websocket_pings_fragments_and_the_closing_handshake() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = base_config();
    cfg.client.insecure = true;
    let srv = TestServer::start(cfg).await;
    let mut s = raw::open(&srv).await;
    let connect = br#"{"id":1,"connect":{"name":"raw"}}"#;
    let mut bytes = raw::frame(0x1, false, true, &connect[..5]);
    bytes.extend(raw::frame(0x9, true, true, b"are you there"));
    bytes.extend(raw::frame(0x0, false, true, &connect[5..20]));
    bytes.extend(raw::frame(0x0, true, true, &connect[20..]));
    s.write_all(&bytes).await.unwrap();
    let mut buf = Vec::new();
    let (op, pong) = raw::next_frame(&mut s, &mut buf).await.expect("a pong");
    assert_eq!((op, pong.as_slice()), (0xA, &b"are you there"[..]));
    let (op, reply) = raw::next_frame(&mut s, &mut buf)
        .await
        .expect("the connect reply");
    assert_eq!(op, 0x1);
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["id"], 1);
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    // A message in one frame after the fragments: the decoder is back at a frame boundary.
    s.write_all(&raw::text(r#"{"id":2,"subscribe":{"channel":"news"}}"#))
        .await
        .unwrap();
    let (_, reply) = raw::next_frame(&mut s, &mut buf)
        .await
        .expect("subscribe reply");
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert!(reply["subscribe"].is_object(), "{reply}");
    // The client closes: the server answers with the same code, then ends the connection.
    s.write_all(&raw::frame(0x8, true, true, &4000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(raw::close_code(&mut s).await, Some(4000));
    assert_eq!(raw::next_frame(&mut s, &mut buf).await, None);
    srv.stop().await;
}

/// A client that pings without reading does not grow a queue of pongs on the server: while
/// the socket is full, the pongs of many pings are one (RFC 6455 §5.5.3), and the connection
/// works afterwards.
#[tokio::test]
async fn pings_from_a_client_that_does_not_read_are_answered_once() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = base_config();
    cfg.client.insecure = true;
    let srv = TestServer::start(cfg).await;
    let mut s = raw::open_slow_reader(&srv).await;
    // 12.7 MB of pongs if each were answered: more than the server's socket can hold.
    let pings = 100_000;
    let payload = [b'p'; 125];
    let one = raw::frame(0x9, true, true, &payload);
    let burst: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * pings)
        .collect();
    s.write_all(&burst).await.unwrap();
    s.write_all(&raw::text(r#"{"id":1,"connect":{}}"#))
        .await
        .unwrap();
    // Every pong before the connect reply is read now.
    let mut buf = Vec::new();
    let mut pongs = 0;
    let reply = loop {
        let (op, p) = raw::next_frame(&mut s, &mut buf).await.expect("a frame");
        if op == 0xA {
            assert_eq!(p, payload);
            pongs += 1;
        } else {
            break p;
        }
    };
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    assert!(pongs >= 1, "pings are answered");
    assert!(
        pongs < pings,
        "{pongs} pongs for {pings} pings: the unread ones were not coalesced"
    );
    srv.stop().await;
}

/// A client that keeps sending while the server closes it, and reads slowly, still reads the
/// close frame, not a reset: after closing, the server goes on reading (and dropping) its input
/// for a bounded time while the close frame waits behind what the client has not read yet.
#[tokio::test]
async fn a_client_still_sending_reads_the_close_frame() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let mut cfg = base_config();
    cfg.client.insecure = true;
    cfg.client.command_rate_limit = 20;
    cfg.client.command_burst = 20;
    cfg.client.command_excess_disconnect = 20;
    let srv = TestServer::start(cfg).await;
    let mut s = raw::open_slow_reader(&srv).await;
    s.write_all(&raw::text(r#"{"id":1,"connect":{}}"#))
        .await
        .unwrap();
    s.write_all(&raw::text(r#"{"id":2,"subscribe":{"channel":"big"}}"#))
        .await
        .unwrap();
    eventually("subscribed", || {
        srv.state
            .node
            .hub()
            .counts
            .subscriptions
            .load(Ordering::Relaxed)
            == 1
    })
    .await;
    // 100 KB of publications the client has not read yet...
    for n in 0..5 {
        let req = holdfast_core::node::PublishRequest {
            data: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(20_000)).into(),
            ..Default::default()
        };
        srv.state.node.publish("big", req).await.unwrap();
    }
    // ...while it floods commands: closed with 3013.
    let (mut r, mut w) = s.into_split();
    let flood = tokio::spawn(async move {
        let cmd = raw::text(r#"{"id":3,"presence_stats":{"channel":"x"}}"#);
        let burst: Vec<u8> = cmd.iter().copied().cycle().take(cmd.len() * 50).collect();
        while w.write_all(&burst).await.is_ok() {}
    });
    eventually("the server closed the session", || {
        srv.state.node.hub().counts.clients.load(Ordering::Relaxed) == 0
    })
    .await;
    // Only now does the client read: the backlog, then the close frame.
    assert_eq!(
        raw::close_code(&mut r).await,
        Some(3013),
        "3013 arrives, not a reset"
    );
    flood.abort();

    // An oversized message, followed by more of it: 1009.
    let s = raw::open(&srv).await;
    let (mut r, mut w) = s.into_split();
    let flood = tokio::spawn(async move {
        let big = raw::frame(0x1, true, true, &vec![b'x'; 100_000]);
        while w.write_all(&big).await.is_ok() {}
    });
    assert_eq!(
        raw::close_code(&mut r).await,
        Some(1009),
        "1009 arrives, not a reset"
    );
    flood.abort();
    srv.stop().await;
}
