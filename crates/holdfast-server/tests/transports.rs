//! HTTP-streaming, SSE (with bidirectional emulation through `/emulation`) and the
//! unidirectional transports, through a real server: what their clients read, byte for byte
//! where the format matters, and the guarantees WebSocket has (recovery, pings, slow clients,
//! shutdown, bad input).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const ALL: &str = r#"
[client]
allowed_origins = ["http://app.example"]
[client.subscribe_to_user_personal_channel]
enabled = true
[channel.without_namespace]
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true
[http_stream]
enabled = true
[sse]
enabled = true
[uni_sse]
enabled = true
[uni_http_stream]
enabled = true
[uni_websocket]
enabled = true
"#;

/// A streamed response read message by message: JSON lines, or SSE `data:` events.
struct Stream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    sse: bool,
}

impl Stream {
    async fn open(resp: reqwest::Response, sse: bool) -> Self {
        assert_eq!(resp.status(), 200, "stream refused");
        Self {
            resp,
            buf: Vec::new(),
            sse,
        }
    }

    /// The next message (pings included); None when the response ended.
    async fn next_any(&mut self) -> Option<Value> {
        loop {
            let sep: &[u8] = if self.sse { b"\n\n" } else { b"\n" };
            if let Some(i) = self.buf.windows(sep.len()).position(|w| w == sep) {
                let item: Vec<u8> = self.buf.drain(..i + sep.len()).collect();
                let text = String::from_utf8(item[..i].to_vec()).unwrap();
                let text = text.trim_start_matches("\r\n");
                if text.is_empty() {
                    continue;
                }
                let json = if self.sse {
                    text.strip_prefix("data: ")
                        .unwrap_or_else(|| panic!("not a data event: {text:?}"))
                } else {
                    text
                };
                return Some(serde_json::from_str(json).unwrap());
            }
            match tokio::time::timeout(WAIT, self.resp.chunk()).await {
                Ok(Ok(Some(c))) => self.buf.extend_from_slice(&c),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("nothing received in {WAIT:?}"),
            }
        }
    }

    /// The next message that is not a ping.
    async fn next(&mut self) -> Value {
        loop {
            let m = self.next_any().await.expect("stream ended");
            if m != json!({}) {
                return m;
            }
        }
    }

    /// Reads until the response ends; returns what came last (not a ping).
    async fn end(&mut self) -> Option<Value> {
        let mut last = None;
        while let Some(m) = self.next_any().await {
            if m != json!({}) {
                last = Some(m);
            }
        }
        last
    }
}

/// `url?cf_connect=<value, percent-encoded>`.
fn with_connect(url: String, value: &str) -> String {
    let mut out = url + "?cf_connect=";
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /connection/uni_sse` with `req` as the connect request (the response, whatever status).
async fn uni_sse_get(srv: &TestServer, req: &Value) -> reqwest::Response {
    let url = with_connect(srv.http("/connection/uni_sse"), &req.to_string());
    reqwest::Client::new().get(url).send().await.unwrap()
}

async fn post(srv: &TestServer, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    reqwest::Client::new()
        .post(srv.http(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// An emulated HTTP-streaming connection: the stream plus its session and node.
struct Emulated {
    stream: Stream,
    session: String,
    node: String,
    next_id: u32,
    /// Messages read while waiting for a reply.
    pending: std::collections::VecDeque<Value>,
}

impl Emulated {
    async fn connect(srv: &TestServer, token: &str) -> (Self, Value) {
        let connect = json!({"id": 1, "connect": {"token": token}}).to_string();
        let mut stream =
            Stream::open(post(srv, "/connection/http_stream", connect).await, false).await;
        let reply = stream.next().await;
        let r = &reply["connect"];
        let e = Self {
            session: r["session"].as_str().unwrap().to_owned(),
            node: r["node"].as_str().unwrap().to_owned(),
            stream,
            next_id: 2,
            pending: Default::default(),
        };
        (e, reply)
    }

    /// Sends one command through `/emulation` (on `srv`, which may not own the session).
    async fn send(&mut self, srv: &TestServer, method: &str, params: Value) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let data = json!({"id": id, method: params}).to_string();
        let body = json!({"session": self.session, "node": self.node, "data": data});
        let resp = post(srv, "/emulation", body.to_string()).await;
        assert_eq!(resp.status(), 204, "{:?}", resp.text().await);
        id
    }

    async fn call(&mut self, srv: &TestServer, method: &str, params: Value) -> Value {
        let id = self.send(srv, method, params).await;
        loop {
            let m = self.stream.next().await;
            if m["id"] == json!(id) {
                return m;
            }
            self.pending.push_back(m);
        }
    }

    /// The next message that is not a reply to [`Emulated::call`].
    async fn next(&mut self) -> Value {
        match self.pending.pop_front() {
            Some(m) => m,
            None => self.stream.next().await,
        }
    }
}

#[tokio::test]
async fn http_stream_emulation_runs_the_protocol() {
    let srv = TestServer::start(config_from(ALL)).await;
    let (mut c, reply) = Emulated::connect(&srv, &token("42", None, json!({}))).await;
    assert_eq!(reply["connect"]["node"], json!(srv.state.node.id()));
    assert!(
        reply["connect"]["subs"]["#42"].is_object(),
        "personal channel subscribed: {reply}"
    );
    let sub = c.call(&srv, "subscribe", json!({"channel": "news"})).await;
    assert_eq!(sub["subscribe"]["recoverable"], json!(true), "{sub}");
    let p = c
        .call(
            &srv,
            "publish",
            json!({"channel": "news", "data": {"n": 1}}),
        )
        .await;
    assert!(p.get("error").is_none(), "{p}");
    let push = c.next().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"n": 1}), "{push}");
    publish(&srv, "#42", json!({"to": "42"})).await;
    let push = c.next().await;
    assert_eq!(push["push"]["channel"], json!("#42"));
    let h = c
        .call(&srv, "history", json!({"channel": "news", "limit": 10}))
        .await;
    assert_eq!(h["history"]["publications"][0]["data"], json!({"n": 1}));
    // Another user's personal channel stays closed on this transport too.
    let r = c.call(&srv, "subscribe", json!({"channel": "#43"})).await;
    assert_eq!(code(&r), 103);
    srv.stop().await;
}

#[tokio::test]
async fn protobuf_http_stream_connects() {
    use holdfast_protocol::proto::pb;
    use prost::Message as _;
    let srv = TestServer::start(config_from(ALL)).await;
    let cmd = pb::Command {
        id: 1,
        connect: Some(pb::ConnectRequest {
            token: token("7", None, json!({})),
            ..Default::default()
        }),
        ..Default::default()
    };
    let body = cmd.encode_length_delimited_to_vec();
    let mut resp = reqwest::Client::new()
        .post(srv.http("/connection/http_stream"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let reply = loop {
        if let Ok(r) = pb::Reply::decode_length_delimited(&buf[..]) {
            break r;
        }
        let c = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buf.extend_from_slice(&c);
    };
    let connect = reply.connect.expect("connect result");
    assert_eq!(connect.node, srv.state.node.id());
    assert!(!connect.session.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn sse_emulation_connects_from_the_query_and_pongs_through_emulation() {
    let mut cfg = config_from(ALL);
    cfg.client.node.ping_interval = Duration::from_secs(2);
    cfg.client.node.pong_timeout = Duration::from_secs(1);
    let srv = TestServer::start(cfg).await;
    let connect = json!({"id": 1, "connect": {"token": token("5", None, json!({}))}}).to_string();
    let open = |connect: String| {
        let url = srv.http("/connection/sse");
        async move {
            let resp = reqwest::Client::new()
                .get(with_connect(url, &connect))
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.headers()["content-type"],
                "text/event-stream; charset=utf-8"
            );
            assert_eq!(resp.headers()["x-accel-buffering"], "no");
            Stream::open(resp, true).await
        }
    };
    let mut answering = open(connect.clone()).await;
    let mut silent = open(connect).await;
    let reply = answering.next().await;
    let (session, node) = (
        reply["connect"]["session"].as_str().unwrap().to_owned(),
        reply["connect"]["node"].as_str().unwrap().to_owned(),
    );
    assert_eq!(reply["connect"]["pong"], json!(true));
    // Two pings answered through /emulation keep the connection; the silent one is closed
    // with 3012 (no pong), told by a disconnect push.
    for _ in 0..2 {
        assert_eq!(answering.next_any().await.unwrap(), json!({}));
        let body = json!({"session": session, "node": node, "data": "{}"});
        assert_eq!(
            post(&srv, "/emulation", body.to_string()).await.status(),
            204
        );
    }
    let last = silent.end().await.unwrap();
    assert_eq!(last["push"]["disconnect"]["code"], json!(3012), "{last}");
    srv.stop().await;
    let last = answering.end().await.unwrap();
    assert_eq!(
        last,
        json!({"push": {"disconnect": {"code": 3001, "reason": "shutdown"}}}),
        "shutdown tells the client"
    );
}

#[tokio::test]
async fn uni_http_stream_sends_bare_pushes_and_recovers_from_positions() {
    let srv = TestServer::start(config_from(ALL)).await;
    let tok = token("42", None, json!({}));
    let mut a = Stream::open(
        post(
            &srv,
            "/connection/uni_http_stream",
            json!({"token": tok}).to_string(),
        )
        .await,
        false,
    )
    .await;
    let c = a.next().await;
    let sub = &c["connect"]["subs"]["#42"];
    assert!(c["connect"]["session"].is_string(), "{c}");
    assert!(c["connect"].get("pong").is_none(), "no pongs on uni: {c}");
    assert!(c["connect"].get("node").is_none(), "{c}");
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish(&srv, "#42", json!({"n": n})).await;
    }
    for n in 1..=3 {
        let p = a.next().await;
        assert_eq!(
            p,
            json!({"channel": "#42", "pub": {"data": {"n": n}, "offset": n}}),
            "a bare push"
        );
    }
    drop(a);
    publish(&srv, "#42", json!({"n": 4})).await;
    // Back with the position it had: the missed publication comes in the connect push.
    let req =
        json!({"token": tok, "subs": {"#42": {"recover": true, "offset": 3, "epoch": epoch}}});
    let mut b = Stream::open(
        post(&srv, "/connection/uni_http_stream", req.to_string()).await,
        false,
    )
    .await;
    let c = b.next().await;
    let sub = &c["connect"]["subs"]["#42"];
    assert_eq!(sub["recovered"], json!(true), "{c}");
    assert_eq!(sub["publications"][0]["data"], json!({"n": 4}), "{c}");
    srv.stop().await;
}

#[tokio::test]
async fn uni_sse_works_from_a_get_and_refuses_with_disconnects() {
    let srv = TestServer::start(config_from(ALL)).await;
    let get = async |req: Value| Stream::open(uni_sse_get(&srv, &req).await, true).await;
    let mut s = get(json!({"token": token("9", None, json!({}))})).await;
    assert!(s.next().await["connect"]["subs"]["#9"].is_object());
    publish(&srv, "#9", json!("hi")).await;
    assert_eq!(s.next().await["pub"]["data"], json!("hi"));
    // A bad token: the client cannot read an error reply, so it gets the disconnect.
    let mut bad = get(json!({"token": "garbage"})).await;
    let d = bad.end().await.unwrap();
    assert_eq!(d["disconnect"]["code"], json!(3500), "{d}");
    // An expired token (error 109) becomes 3005, as Centrifugo maps it.
    let mut expired = get(json!({"token": token("9", Some(-10), json!({}))})).await;
    let d = expired.end().await.unwrap();
    assert_eq!(d["disconnect"]["code"], json!(3005), "{d}");
    srv.stop().await;
}

#[tokio::test]
async fn uni_websocket_takes_the_connect_request_as_its_first_message() {
    let srv = TestServer::start(config_from(ALL)).await;
    let url = format!("ws://{}/connection/uni_websocket", srv.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let tok = token("11", None, json!({}));
    ws.send(Message::text(json!({"token": tok}).to_string()))
        .await
        .unwrap();
    let mut next = async || loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v != json!({}) {
                return v;
            }
        }
    };
    assert!(next().await["connect"]["subs"]["#11"].is_object());
    publish(&srv, "#11", json!(1)).await;
    assert_eq!(
        next().await,
        json!({"channel": "#11", "pub": {"data": 1, "offset": 1}})
    );
    srv.stop().await;
}

#[tokio::test]
async fn bad_requests_on_the_http_endpoints_get_their_codes() {
    let mut cfg = config_from(ALL);
    cfg.emulation.max_request_body_size = 2048;
    let srv = TestServer::start(cfg).await;
    let client = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    // /emulation: garbage, unknown session, oversized, missing fields.
    assert_eq!(status(post(&srv, "/emulation", "not json").await), 400);
    let unknown = json!({"session": "nope", "node": srv.state.node.id(), "data": "{}"});
    let r = post(&srv, "/emulation", unknown.to_string()).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown session");
    let big = json!({"session": "s", "node": "", "data": "x".repeat(4096)});
    assert_eq!(status(post(&srv, "/emulation", big.to_string()).await), 413);
    let other = json!({"session": "s", "node": "another-node", "data": "{}"});
    let r = post(&srv, "/emulation", other.to_string()).await;
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown node");
    // Connect endpoints: empty bodies, non-object connect requests, wrong methods.
    assert_eq!(status(post(&srv, "/connection/http_stream", "").await), 400);
    assert_eq!(
        status(post(&srv, "/connection/uni_http_stream", "[1]").await),
        400
    );
    assert_eq!(
        status(post(&srv, "/connection/uni_http_stream", "").await),
        400
    );
    let r = client
        .get(srv.http("/connection/http_stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // A garbage first frame on an emulated stream: the session closes with 3501.
    let mut s = Stream::open(post(&srv, "/connection/http_stream", "{{{").await, false).await;
    let d = s.end().await.unwrap();
    assert_eq!(d["push"]["disconnect"]["code"], json!(3501), "{d}");
    // Nothing above disturbed a working connection.
    let (mut c, _) = Emulated::connect(&srv, &token("1", None, json!({}))).await;
    let r = c.call(&srv, "subscribe", json!({"channel": "ok"})).await;
    assert!(r.get("error").is_none(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let srv = TestServer::start(config_from(ALL)).await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str, path: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, srv.http(path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    for path in ["/connection/http_stream", "/emulation", "/connection/sse"] {
        let ok = preflight("http://app.example", path).await.unwrap();
        assert_eq!(ok.status(), 204, "{path}");
        let h = ok.headers();
        assert_eq!(h["access-control-allow-origin"], "http://app.example");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-allow-headers"], "content-type");
        assert_eq!(h["access-control-max-age"], "300");
        let no = preflight("http://evil.example", path).await.unwrap();
        assert_eq!(no.status(), 403, "{path}");
    }
    // The stream itself: allowed origins get the CORS headers, others are refused.
    let connect = json!({"id": 1, "connect": {"token": token("1", None, json!({}))}}).to_string();
    let r = client
        .post(srv.http("/connection/http_stream"))
        .header("origin", "http://app.example")
        .body(connect.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    drop(r);
    let r = client
        .post(srv.http("/connection/http_stream"))
        .header("origin", "http://evil.example")
        .body(connect)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    srv.stop().await;
}

#[tokio::test]
async fn a_slow_sse_reader_is_disconnected_without_slowing_others() {
    let mut cfg = config_from(ALL);
    cfg.client.node.queue_max_size = 256 * 1024;
    let srv = TestServer::start(cfg).await;
    // Both users follow one channel through a server-side subscription (token `channels`).
    let sub = async |user: &str| {
        let req = json!({"token": token(user, None, json!({"channels": ["feed"]}))});
        Stream::open(uni_sse_get(&srv, &req).await, true).await
    };
    let mut reader = sub("r").await;
    let slow = sub("s").await; // never read
    assert!(reader.next().await["connect"]["subs"]["feed"].is_object());
    let payload = json!({"blob": "x".repeat(32 * 1024)});
    let n = 400;
    let slow_before = srv
        .state
        .node
        .stats()
        .slow_disconnects
        .load(std::sync::atomic::Ordering::Relaxed);
    // The reader takes each publication before the next is sent (it keeps up); the slow
    // one reads nothing and falls behind by the whole run.
    let (read_tx, mut read_rx) = tokio::sync::mpsc::channel(1);
    let reading = tokio::spawn(async move {
        for i in 1..=n {
            let m = reader.next().await;
            assert_eq!(
                m["pub"]["offset"],
                json!(i),
                "every publication, in order: {m}"
            );
            read_tx.send(()).await.unwrap();
        }
    });
    for _ in 0..n {
        publish(&srv, "feed", payload.clone()).await;
        read_rx.recv().await.unwrap();
    }
    reading.await.unwrap();
    eventually("the slow SSE reader is closed with 3008", || {
        srv.state
            .node
            .stats()
            .slow_disconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            > slow_before
    })
    .await;
    drop(slow);
    srv.stop().await;
}

#[tokio::test]
async fn emulation_reaches_the_owning_node_over_redis() {
    let redis = common::redis::RedisServer::start();
    let toml = format!(
        "{ALL}\n[engine]\ntype = \"redis\"\n[engine.redis]\naddress = [\"{}\"]\n",
        redis.url()
    );
    let a = TestServer::start(config_from(&toml)).await;
    let b = TestServer::start(config_from(&toml)).await;
    let (mut c, _) = Emulated::connect(&a, &token("3", None, json!({}))).await;
    // The subscribe goes to node b, which does not own the session: it forwards it.
    let r = c.call(&b, "subscribe", json!({"channel": "across"})).await;
    assert!(r.get("error").is_none(), "{r}");
    publish(&b, "across", json!("x")).await;
    assert_eq!(c.next().await["push"]["pub"]["data"], json!("x"));
    // An unknown session on the owning node is reported through the other node too.
    let body = json!({"session": "gone", "node": c.node, "data": "{}"});
    let r = post(&b, "/emulation", body.to_string()).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown session");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn http2_multiplexes_sse_streams_and_websocket_over_one_connection() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let srv = TestServer::start(config_from(ALL)).await;
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    // h2c with prior knowledge: one TCP connection for everything below.
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut bodies = Vec::new();
    for user in ["h2a", "h2b", "h2c"] {
        let req = json!({"token": token(user, None, json!({}))}).to_string();
        let uri = with_connect(srv.http("/connection/uni_sse"), &req);
        let resp = send
            .send_request(
                hyper::Request::get(uri)
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    // Reads SSE events from an HTTP/2 body until one holds `want`.
    async fn event_with(body: &mut hyper::body::Incoming, want: &str) -> String {
        let mut text = String::new();
        loop {
            if let Some(e) = text.split("\n\n").find(|e| e.contains(want)) {
                return e.to_owned();
            }
            let f = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
            let f = f.expect("stream ended").unwrap();
            if let Ok(d) = f.into_data() {
                text.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
    }
    for (body, user) in bodies.iter_mut().zip(["h2a", "h2b", "h2c"]) {
        event_with(body, &format!("\"#{user}\"")).await;
    }
    publish(&srv, "#h2b", json!("only b")).await;
    let e = event_with(&mut bodies[1], "only b").await;
    assert_eq!(
        e,
        r##"data: {"channel":"#h2b","pub":{"data":"only b","offset":1}}"##
    );
    // WebSocket over a stream of the same connection (RFC 8441 extended CONNECT).
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(srv.http("/connection/websocket"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "extended CONNECT accepted");
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let connect = json!({"id": 1, "connect": {"token": token("h2ws", None, json!({}))}});
    ws.send(Message::text(connect.to_string())).await.unwrap();
    let m = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let r: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
    assert!(r["connect"]["client"].is_string(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn an_emulation_flood_is_refused_with_codes_and_disturbs_no_one_else() {
    let mut cfg = config_from(ALL);
    cfg.client.node.command_rate_limit = 50;
    cfg.client.node.command_burst = 50;
    cfg.client.node.command_excess_disconnect = 20;
    cfg.http_stream.max_request_body_size = 4096;
    cfg.uni_http_stream.max_request_body_size = 4096;
    let srv = TestServer::start(cfg).await;
    let (mut calm, _) = Emulated::connect(&srv, &token("calm", None, json!({}))).await;
    let (flood, _) = Emulated::connect(&srv, &token("flood", None, json!({}))).await;
    // 400 commands in 400 concurrent /emulation requests: each is taken (204), refused while
    // the session's queue stays full (429), or finds the session already closed (404); the
    // session ends with 3013 once its command rate is exceeded persistently.
    let client = reqwest::Client::new();
    let posts = (0..400).map(|i| {
        let data = json!({"id": i + 2, "presence_stats": {"channel": "x"}}).to_string();
        let body = json!({"session": flood.session, "node": flood.node, "data": data});
        let req = client
            .post(srv.http("/emulation"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send();
        async move { req.await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(posts).await;
    assert!(
        statuses.iter().all(|s| [204, 404, 429].contains(s)),
        "{statuses:?}"
    );
    let mut flood = flood;
    let last = flood.stream.end().await.unwrap();
    assert_eq!(last["push"]["disconnect"]["code"], json!(3013), "{last}");
    // Oversized connect bodies on the streaming endpoints.
    let big = "x".repeat(8192);
    assert_eq!(
        post(&srv, "/connection/http_stream", big.clone())
            .await
            .status(),
        413
    );
    assert_eq!(
        post(&srv, "/connection/uni_http_stream", big)
            .await
            .status(),
        413
    );
    // The other session never noticed.
    let r = calm
        .call(&srv, "subscribe", json!({"channel": "still-fine"}))
        .await;
    assert!(r.get("error").is_none(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn connection_limits_apply_to_streamed_connections() {
    let mut cfg = config_from(ALL);
    cfg.client.connection_limit_per_ip = 2;
    let srv = TestServer::start(cfg).await;
    let open =
        async |user: &str| uni_sse_get(&srv, &json!({"token": token(user, None, json!({}))})).await;
    let a = open("l1").await;
    let (b, _) = Emulated::connect(&srv, &token("l2", None, json!({}))).await;
    let third = open("l3").await;
    assert_eq!(
        third.status(),
        429,
        "the per-IP limit counts SSE and HTTP-streaming"
    );
    drop(a);
    drop(b);
    eventually("the places are free again", || {
        srv.state.transport.limits.active() == 0
    })
    .await;
    assert_eq!(open("l4").await.status(), 200);
    srv.stop().await;
}
