//! Abuse limits and admission checks: each test fails when its protection is missing.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, http};

/// Opens a WebSocket from `source` (a loopback address) with extra headers; `Ok` on 101,
/// otherwise the HTTP status and body.
async fn upgrade_from(
    srv: &TestServer,
    source: [u8; 4],
    headers: &[(&str, &str)],
) -> Result<TestClient, (u16, String)> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(source), 0).into())
        .unwrap();
    let stream = sock.connect(srv.addr).await.unwrap();
    let mut req = srv.ws_url().into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
    {
        Ok((ws, _)) => Ok(TestClient::from_ws(ws)),
        Err(WsError::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

async fn upgrade(srv: &TestServer, headers: &[(&str, &str)]) -> Result<TestClient, (u16, String)> {
    upgrade_from(srv, [127, 0, 0, 1], headers).await
}

#[tokio::test]
async fn cross_site_origins_are_refused_by_default() {
    let srv = TestServer::start(base_config()).await;
    let host = srv.addr.to_string();
    let same = format!("http://{host}");
    assert!(upgrade(&srv, &[]).await.is_ok(), "no Origin: not a browser");
    assert!(
        upgrade(&srv, &[("Origin", &same)]).await.is_ok(),
        "same host"
    );
    let (status, body) = upgrade(&srv, &[("Origin", "https://evil.example")])
        .await
        .err()
        .expect("a foreign origin must be refused");
    assert_eq!(status, 403);
    assert!(body.contains("origin not allowed"), "{body}");
    assert_eq!(
        upgrade(&srv, &[("Origin", "null")])
            .await
            .err()
            .map(|e| e.0),
        Some(403)
    );
    srv.stop().await;
}

#[tokio::test]
async fn allowed_origin_patterns() {
    let mut cfg = base_config();
    cfg.client.allowed_origins = vec!["https://*.example.com".into()];
    let srv = TestServer::start(cfg).await;
    assert!(
        upgrade(&srv, &[("Origin", "https://app.example.com")])
            .await
            .is_ok()
    );
    let host = format!("http://{}", srv.addr);
    assert_eq!(
        upgrade(&srv, &[("Origin", &host)]).await.err().map(|e| e.0),
        Some(403),
        "with patterns, only the patterns count"
    );
    assert_eq!(
        upgrade(&srv, &[("Origin", "https://example.com.evil.net")])
            .await
            .err()
            .map(|e| e.0),
        Some(403)
    );
    srv.stop().await;
}

#[tokio::test]
async fn connections_per_node_get_503_and_places_free_on_close() {
    let mut cfg = base_config();
    cfg.client.connection_limit = 2;
    let srv = TestServer::start(cfg).await;
    let a = upgrade(&srv, &[]).await.unwrap();
    let _b = upgrade(&srv, &[]).await.unwrap();
    let (status, body) = upgrade(&srv, &[]).await.err().expect("over the node limit");
    assert_eq!(status, 503);
    assert!(body.contains("connections_per_node"), "{body}");
    drop(a);
    eventually("a place is free", || {
        srv.state.transport.limits.active() < 2
    })
    .await;
    assert!(upgrade(&srv, &[]).await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn connections_per_ip_do_not_affect_other_addresses() {
    let mut cfg = base_config();
    cfg.client.connection_limit_per_ip = 2;
    let srv = TestServer::start(cfg).await;
    let _a = upgrade(&srv, &[]).await.unwrap();
    let _b = upgrade(&srv, &[]).await.unwrap();
    let (status, body) = upgrade(&srv, &[])
        .await
        .err()
        .expect("over the per-IP limit");
    assert_eq!(status, 429);
    assert!(body.contains("connections_per_ip"), "{body}");
    let mut other = upgrade_from(&srv, [127, 0, 0, 2], &[]).await.unwrap();
    let res = other.connect_token(&token("u", None, json!({}))).await;
    assert!(res.get("connect").is_some(), "{res}");
    srv.stop().await;
}

#[tokio::test]
async fn connection_attempts_per_ip_per_second() {
    let mut cfg = base_config();
    cfg.client.connection_rate_limit_per_ip = 3;
    let srv = TestServer::start(cfg).await;
    let mut refused = 0;
    for _ in 0..10 {
        if let Err((status, _)) = upgrade(&srv, &[]).await {
            assert_eq!(status, 429);
            refused += 1;
        }
    }
    assert!(
        refused >= 5,
        "a burst of 10 attempts at 3/s: {refused} refused"
    );
    assert!(
        upgrade_from(&srv, [127, 0, 0, 3], &[]).await.is_ok(),
        "another address"
    );
    srv.stop().await;
}

#[tokio::test]
async fn command_flood_gets_111_then_3013_and_others_are_unaffected() {
    let mut cfg = base_config();
    cfg.client.insecure = true;
    cfg.client.command_rate_limit = 5;
    cfg.client.command_burst = 5;
    cfg.client.command_excess_disconnect = 20;
    let srv = TestServer::start(cfg).await;
    let (mut good, _) = srv.connected("good").await;
    let (mut bad, _) = srv.connected("bad").await; // connect took one token
    // Ten presence_stats calls in one frame: four fit in the bucket, the rest get 111.
    let mut frame = String::new();
    for id in 100..110 {
        frame.push_str(&format!(
            r#"{{"id":{id},"presence_stats":{{"channel":"x"}}}}"#
        ));
        frame.push('\n');
    }
    bad.send_raw(frame.trim_end()).await;
    let mut refused = 0;
    for id in 100..110 {
        let r = bad.reply(id).await;
        if r["error"]["code"] == 111 {
            refused += 1;
        }
    }
    assert!(refused >= 5, "{refused} of 10 refused");
    // A persistent flood closes the connection with 3013.
    let flood: Vec<String> = (200..260)
        .map(|id| format!(r#"{{"id":{id},"presence_stats":{{"channel":"x"}}}}"#))
        .collect();
    bad.send_raw(&flood.join("\n")).await;
    assert_eq!(
        bad.closed().await,
        Closed::Code(3013, "too many requests".into())
    );
    // The well-behaved client is served normally.
    let r = good
        .call("publish", json!({"channel": "x", "data": {}}))
        .await;
    assert!(r.get("error").is_none(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn api_rate_limit_gets_429() {
    let mut cfg = base_config();
    cfg.http_api.rate_limit = 2;
    let srv = TestServer::start(cfg).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = http
            .post(srv.http("/api/info"))
            .header("X-API-Key", API_KEY)
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 429 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(body["error"].as_str().unwrap().contains("rate"), "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses[0], 200);
    assert!(statuses.contains(&429), "{statuses:?}");
    srv.stop().await;
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_huge_headers_get_431() {
    let mut cfg = base_config();
    cfg.http_server.header_read_timeout = Duration::from_millis(300);
    let srv = TestServer::start(cfg).await;
    // Slowloris: a request head that never ends.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    read_to_close(&mut s).await;
    // An idle keep-alive connection is closed too.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // A 40 KiB header.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let big = "a".repeat(40 * 1024);
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    // Others are served.
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("presence_stats", json!({"channel": "x"})).await;
    assert!(r.get("id").is_some(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn per_ip_limits_use_forwarded_addresses_only_behind_trusted_proxies() {
    let mut cfg = base_config();
    cfg.client.connection_limit_per_ip = 1;
    cfg.http_server.trusted_proxies = vec!["127.0.0.1/32".into()];
    let srv = TestServer::start(cfg).await;
    // Behind the trusted proxy (127.0.0.1): each forwarded client has its own budget.
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    let _a = upgrade(&srv, &xff("203.0.113.1")).await.unwrap();
    let _b = upgrade(&srv, &xff("203.0.113.2")).await.unwrap();
    let _c = upgrade(&srv, &[("Forwarded", "for=\"[2001:db8::3]:4711\"")])
        .await
        .unwrap();
    let (status, _) = upgrade(&srv, &xff("203.0.113.1"))
        .await
        .err()
        .expect("203.0.113.1 is at its limit");
    assert_eq!(status, 429);
    // A client that is not a trusted proxy cannot pick its address with the header: its TCP
    // address (127.0.0.2) is what counts.
    let _d = upgrade_from(&srv, [127, 0, 0, 2], &xff("198.51.100.1"))
        .await
        .unwrap();
    let (status, _) = upgrade_from(&srv, [127, 0, 0, 2], &xff("198.51.100.2"))
        .await
        .err()
        .expect("the header from an untrusted peer is ignored");
    assert_eq!(status, 429);
    srv.stop().await;
}

#[tokio::test]
async fn api_bodies_declared_too_large_or_trickling_are_cut() {
    let mut cfg = base_config();
    cfg.http_api.max_body_size = 4096;
    cfg.http_api.body_read_timeout = Duration::from_millis(300);
    let srv = TestServer::start(cfg).await;
    let head = |len: usize| {
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let status_of = |resp: &str| -> u16 {
        resp.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    // Declared above the limit: 413 before a byte of the body is sent.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(head(1 << 20).as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_of(&resp), 413, "{resp}");
    // A valid key, 500 bytes announced, 10 sent, then nothing: cut by the body read timeout.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(head(500).as_bytes()).await.unwrap();
    s.write_all(b"{\"channel\"").await.unwrap();
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_of(&resp), 408, "{resp}");
    assert!(started.elapsed() < WAIT, "cut, not held");
    srv.stop().await;
}

#[tokio::test]
async fn api_rate_limit_is_per_api_key() {
    let mut cfg = base_config();
    cfg.http_api.insecure = true;
    cfg.http_api.rate_limit = 1;
    let srv = TestServer::start(cfg).await;
    let http = reqwest::Client::new();
    let call = |key: &'static str| {
        let http = http.clone();
        let url = srv.http("/api/info");
        async move {
            http.post(url)
                .header("X-API-Key", key)
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let mut a = Vec::new();
    for _ in 0..4 {
        a.push(call("key-a").await);
    }
    assert!(a.contains(&429), "key-a over its budget: {a:?}");
    assert_eq!(call("key-b").await, 200, "key-b has its own budget");
    srv.stop().await;
}
