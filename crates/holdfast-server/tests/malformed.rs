//! Hostile and broken input: every case gets its close code, nothing panics, others keep going.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::json;

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
    let health: serde_json::Value = reqwest::get(srv.http("/health"))
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
    let body: serde_json::Value = r.json().await.unwrap();
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
