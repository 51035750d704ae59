//! Proxies to a real HTTP backend (an axum app in the test) and lifecycle webhooks.

#![allow(clippy::unwrap_used)]

mod common;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A backend whose answer per path is set by the test; it records every request.
#[derive(Default)]
struct Backend {
    answers: parking_lot::Mutex<std::collections::HashMap<String, Answer>>,
    seen: parking_lot::Mutex<Vec<(String, HeaderMap, Value)>>,
    /// Webhook requests to fail before accepting.
    webhook_failures: AtomicUsize,
    notify: tokio::sync::Notify,
}

#[derive(Clone)]
enum Answer {
    Json(Value),
    Status(u16),
    Slow(Duration, Value),
}

impl Backend {
    fn set(&self, path: &str, a: Answer) {
        self.answers.lock().insert(path.to_owned(), a);
    }

    fn requests(&self, path: &str) -> Vec<(HeaderMap, Value)> {
        self.seen
            .lock()
            .iter()
            .filter(|(p, ..)| p == path)
            .map(|(_, h, v)| (h.clone(), v.clone()))
            .collect()
    }

    /// Waits until `pred` holds over the requests of `path`.
    async fn wait_for(
        &self,
        path: &str,
        pred: impl Fn(&[(HeaderMap, Value)]) -> bool,
    ) -> Vec<(HeaderMap, Value)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            let r = self.requests(path);
            if pred(&r) {
                return r;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "timed out waiting for {path} requests; got {r:?}"
            );
        }
    }
}

async fn handle(
    State(b): State<Arc<Backend>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let path = uri.path().to_owned();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if path == "/webhook" && b.webhook_failures.load(Ordering::SeqCst) > 0 {
        b.webhook_failures.fetch_sub(1, Ordering::SeqCst);
        b.seen.lock().push(("/webhook-failed".into(), headers, v));
        b.notify.notify_waiters();
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    b.seen.lock().push((path.clone(), headers, v));
    b.notify.notify_waiters();
    let answer = b
        .answers
        .lock()
        .get(&path)
        .cloned()
        .unwrap_or(Answer::Json(json!({"result": {}})));
    match answer {
        Answer::Json(v) => axum::Json(v).into_response(),
        Answer::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Answer::Slow(d, v) => {
            tokio::time::sleep(d).await;
            axum::Json(v).into_response()
        }
    }
}

async fn backend() -> (Arc<Backend>, String) {
    let b = Arc::new(Backend::default());
    let app = axum::Router::new()
        .fallback(post(handle))
        .with_state(b.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (b, url)
}

fn cfg(url: &str, extra: &str) -> String {
    format!(
        r#"
[client.proxy.connect]
enabled = true
endpoint = "{url}/connect"
http_headers = ["Authorization", "X-Custom"]
[client.proxy.connect.http.static_headers]
X-Secret = "s3cret"
[channel.proxy.subscribe]
endpoint = "{url}/subscribe"
[channel.proxy.publish]
endpoint = "{url}/publish"
[channel.proxy.sub_refresh]
endpoint = "{url}/sub_refresh"
[rpc.proxy]
endpoint = "{url}/rpc"
timeout = "300ms"
[rpc.without_namespace]
proxy_enabled = true
[[rpc.routes]]
method = "agents.*"
proxy = "agents"
[[proxies]]
name = "agents"
endpoint = "{url}/agents"
max_in_flight = 1
[[channel.namespaces]]
name = "sp"
subscribe_proxy_enabled = true
publish_proxy_enabled = true
sub_refresh_proxy_enabled = true
[[channel.namespaces]]
name = "open"
allow_subscribe_for_client = true
{extra}
"#
    )
}

async fn connect_via_proxy(
    srv: &TestServer,
    extra_headers: &[(&str, &str)],
) -> (TestClient, Value) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = srv.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "centrifuge-json".parse().unwrap());
    for (k, v) in extra_headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = TestClient::from_ws(ws);
    let r = c
        .call(
            "connect",
            json!({"name": "t", "data": {"hello": "backend"}}),
        )
        .await;
    (c, r)
}

#[tokio::test]
async fn connect_proxy_decides_and_sees_forwarded_headers() {
    let (b, url) = backend().await;
    b.set("/connect", Answer::Json(json!({"result": {"user": "55", "info": {"name": "Ann"}, "data": {"welcome": true}, "channels": ["open:news"]}})));
    let srv = TestServer::start(config_from(&cfg(&url, ""))).await;
    let (mut c, r) = connect_via_proxy(
        &srv,
        &[
            ("Authorization", "Bearer abc"),
            ("X-Custom", "1"),
            ("X-Other", "no"),
            ("Cookie", "sid=9"),
        ],
    )
    .await;
    assert_eq!(r["connect"]["data"], json!({"welcome": true}), "{r}");
    assert!(
        r["connect"]["subs"]["open:news"].is_object(),
        "channels from the proxy are server-side subscriptions"
    );
    let reqs = b.requests("/connect");
    let (h, body) = &reqs[0];
    assert_eq!(body["transport"], "websocket");
    assert_eq!(body["protocol"], "json");
    assert_eq!(body["encoding"], "json");
    assert_eq!(body["data"], json!({"hello": "backend"}));
    assert_eq!(body["client"], r["connect"]["client"]);
    assert_eq!(
        h["authorization"], "Bearer abc",
        "configured header forwarded"
    );
    assert_eq!(h["x-custom"], "1");
    assert_eq!(h["cookie"], "sid=9", "cookies go to the connect proxy");
    assert!(
        h.get("x-other").is_none(),
        "other headers are not forwarded"
    );
    assert_eq!(h["x-secret"], "s3cret", "static headers");
    // The user the backend chose publishes with its info.
    c.call("subscribe", json!({"channel": "open:x"})).await;
    srv.state
        .node
        .publish(
            "open:x",
            holdfast_core::node::PublishRequest {
                data: bytes::Bytes::from_static(b"{}"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(c.push().await.get("pub").is_some());
    srv.stop().await;
}

#[tokio::test]
async fn connect_proxy_error_disconnect_timeout_and_non_200() {
    let (b, url) = backend().await;
    let srv = TestServer::start(config_from(&cfg(&url, ""))).await;
    b.set(
        "/connect",
        Answer::Json(json!({"error": {"code": 1000, "message": "custom"}})),
    );
    let (_c, r) = connect_via_proxy(&srv, &[]).await;
    assert_eq!(r["error"], json!({"code": 1000, "message": "custom"}));
    b.set(
        "/connect",
        Answer::Json(json!({"disconnect": {"code": 4501, "reason": "unauthorized"}})),
    );
    let (mut c, r) = {
        let mut c = srv.client().await;
        c.send("connect", json!({})).await;
        let closed = c.closed().await;
        (c, closed)
    };
    let _ = &mut c;
    assert_eq!(r, Closed::Code(4501, "unauthorized".into()));
    b.set("/connect", Answer::Status(500));
    let (_c, r) = connect_via_proxy(&srv, &[]).await;
    assert_eq!(
        r["error"],
        json!({"code": 100, "message": "internal server error", "temporary": true}),
        "non-200 is a temporary error"
    );
    b.set(
        "/connect",
        Answer::Slow(Duration::from_secs(3), json!({"result": {"user": "x"}})),
    );
    let (_c, r) = connect_via_proxy(&srv, &[]).await;
    assert_eq!(
        r["error"]["code"], 100,
        "timeout (1s default) is a temporary error"
    );
    // With a token the proxy is not asked.
    let n = b.requests("/connect").len();
    let (_c, r) = srv.connected("tok").await;
    assert!(r["connect"].is_object());
    assert_eq!(b.requests("/connect").len(), n);
    srv.stop().await;
}

#[tokio::test]
async fn subscribe_and_publish_proxies() {
    let (b, url) = backend().await;
    let srv = TestServer::start(config_from(&cfg(&url, ""))).await;
    let (mut c, _) = srv.connected("42").await;
    b.set(
        "/subscribe",
        Answer::Json(json!({"result": {"data": {"granted": 1}, "info": {"role": "admin"}}})),
    );
    let r = c
        .call(
            "subscribe",
            json!({"channel": "sp:room", "data": {"why": "chat"}}),
        )
        .await;
    assert_eq!(r["subscribe"]["data"], json!({"granted": 1}), "{r}");
    let (_, body) = &b.requests("/subscribe")[0];
    assert_eq!(
        (
            body["user"].clone(),
            body["channel"].clone(),
            body["data"].clone()
        ),
        (json!("42"), json!("sp:room"), json!({"why": "chat"}))
    );
    b.set(
        "/subscribe",
        Answer::Json(json!({"error": {"code": 403, "message": "forbidden"}})),
    );
    assert_eq!(
        c.call("subscribe", json!({"channel": "sp:closed"})).await["error"]["code"],
        403
    );
    // Publish proxy rewrites the data; the publication carries the subscription's chan_info.
    b.set(
        "/publish",
        Answer::Json(json!({"result": {"data": {"rewritten": true}}})),
    );
    let r = c
        .call("publish", json!({"channel": "sp:room", "data": {"raw": 1}}))
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let p = c.push().await;
    assert_eq!(p["pub"]["data"], json!({"rewritten": true}));
    assert_eq!(p["pub"]["info"]["chan_info"], json!({"role": "admin"}));
    assert_eq!(b.requests("/publish")[0].1["data"], json!({"raw": 1}));
    b.set(
        "/publish",
        Answer::Json(json!({"disconnect": {"code": 4000, "reason": "stop"}})),
    );
    c.send("publish", json!({"channel": "sp:room", "data": {}}))
        .await;
    assert_eq!(c.closed().await, Closed::Code(4000, "stop".into()));
    srv.stop().await;
}

#[tokio::test]
async fn rpc_routing_timeout_and_overload() {
    let (b, url) = backend().await;
    let srv = TestServer::start(config_from(&cfg(&url, ""))).await;
    let (mut c, _) = srv.connected("7").await;
    b.set(
        "/rpc",
        Answer::Json(json!({"result": {"data": {"from": "rpc"}}})),
    );
    b.set(
        "/agents",
        Answer::Json(json!({"result": {"data": {"from": "agents"}}})),
    );
    assert_eq!(
        c.call("rpc", json!({"method": "getPrice", "data": {"id": 1}}))
            .await["rpc"]["data"],
        json!({"from": "rpc"})
    );
    assert_eq!(
        c.call("rpc", json!({"method": "agents.run", "data": {}}))
            .await["rpc"]["data"],
        json!({"from": "agents"})
    );
    let (_, body) = &b.requests("/rpc")[0];
    assert_eq!(
        (
            body["method"].clone(),
            body["data"].clone(),
            body["user"].clone()
        ),
        (json!("getPrice"), json!({"id": 1}), json!("7"))
    );
    // Timeout (300ms on the RPC proxy): error 100 for that call only.
    b.set(
        "/rpc",
        Answer::Slow(Duration::from_secs(2), json!({"result": {}})),
    );
    let r = c.call("rpc", json!({"method": "slow", "data": {}})).await;
    assert_eq!(
        r["error"],
        json!({"code": 100, "message": "internal server error", "temporary": true})
    );
    assert_eq!(
        c.call("rpc", json!({"method": "agents.ok", "data": {}}))
            .await["rpc"]["data"],
        json!({"from": "agents"}),
        "the connection stays"
    );
    // The agents proxy allows one request in flight: a second concurrent one gets 111.
    b.set(
        "/agents",
        Answer::Slow(Duration::from_millis(500), json!({"result": {"data": {}}})),
    );
    let (mut d, _) = srv.connected("8").await;
    let first = c
        .send("rpc", json!({"method": "agents.a", "data": {}}))
        .await;
    b.wait_for("/agents", |r| r.len() >= 3).await;
    let r = d
        .call("rpc", json!({"method": "agents.b", "data": {}}))
        .await;
    assert_eq!(
        r["error"],
        json!({"code": 111, "message": "too many requests", "temporary": true})
    );
    assert!(c.reply(first).await["rpc"].is_object());
    srv.stop().await;
}

#[tokio::test]
async fn refresh_and_sub_refresh_proxies() {
    let (b, url) = backend().await;
    let extra = format!("[client.proxy.refresh]\nenabled = true\nendpoint = \"{url}/refresh\"\n");
    let srv = TestServer::start(config_from(&cfg(&url, &extra))).await;
    let soon = holdfast_core::time::unix_secs() + 1;
    b.set(
        "/connect",
        Answer::Json(json!({"result": {"user": "r", "expire_at": soon}})),
    );
    b.set(
        "/refresh",
        Answer::Json(json!({"result": {"expire_at": holdfast_core::time::unix_secs() + 3600}})),
    );
    let (mut c, r) = connect_via_proxy(&srv, &[]).await;
    assert!(
        r["connect"].get("expires").is_none(),
        "the server refreshes: the client is not asked to: {r}"
    );
    b.wait_for("/refresh", |r| !r.is_empty()).await;
    assert_eq!(b.requests("/refresh")[0].1["user"], "r");
    // Subscription refresh: expires in 1s, the proxy says expired → unsubscribe 2501.
    b.set(
        "/subscribe",
        Answer::Json(json!({"result": {"expire_at": holdfast_core::time::unix_secs() + 1}})),
    );
    b.set(
        "/sub_refresh",
        Answer::Json(json!({"result": {"expired": true}})),
    );
    c.call("subscribe", json!({"channel": "sp:temp"})).await;
    assert_eq!(
        c.push().await,
        json!({"channel": "sp:temp", "unsubscribe": {"code": 2501, "reason": "subscription expired"}})
    );
    assert_eq!(b.requests("/sub_refresh")[0].1["channel"], "sp:temp");
    // The connection refresh says expired: 3005.
    b.set(
        "/refresh",
        Answer::Json(json!({"result": {"expired": true}})),
    );
    b.set(
        "/connect",
        Answer::Json(
            json!({"result": {"user": "r2", "expire_at": holdfast_core::time::unix_secs() + 1}}),
        ),
    );
    let (mut d, _) = connect_via_proxy(&srv, &[]).await;
    assert_eq!(
        d.closed().await,
        Closed::Code(3005, "connection expired".into())
    );
    srv.stop().await;
}

#[tokio::test]
async fn webhooks_are_batched_and_retried_until_the_backend_accepts() {
    let (b, url) = backend().await;
    let extra = format!(
        "[webhooks]\nenabled = true\nendpoint = \"{url}/webhook\"\nbatch_max_wait = \"50ms\"\n"
    );
    let srv = TestServer::start(config_from(&cfg(&url, &extra))).await;
    b.webhook_failures.store(3, Ordering::SeqCst);
    let (mut c, r) = srv.connected("w").await;
    let client = r["connect"]["client"].clone();
    c.call("subscribe", json!({"channel": "open:a"})).await;
    c.call("unsubscribe", json!({"channel": "open:a"})).await;
    drop(c);
    let reqs = b
        .wait_for("/webhook", |r| {
            let n: usize = r
                .iter()
                .map(|(_, v)| v["events"].as_array().map_or(0, Vec::len))
                .sum();
            n >= 4
        })
        .await;
    let events: Vec<Value> = reqs
        .iter()
        .flat_map(|(_, v)| v["events"].as_array().unwrap().clone())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["client"] == client)
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["connected", "subscribed", "unsubscribed", "disconnected"],
        "{events:?}"
    );
    assert!(
        b.requests("/webhook-failed").len() >= 3,
        "failed deliveries were retried"
    );
    let d = events.iter().find(|e| e["type"] == "disconnected").unwrap();
    assert_eq!(d["code"], 3000);
    assert!(
        events
            .iter()
            .all(|e| e["id"].is_string() && e["time"].is_i64()),
        "ids to deduplicate"
    );
    srv.stop().await;
}

#[tokio::test]
async fn webhook_queue_overflow_drops_and_counts() {
    let (b, url) = backend().await;
    let extra = format!(
        "[webhooks]\nenabled = true\nendpoint = \"{url}/webhook\"\nqueue_size = 2\nbatch_size = 1\nmax_retry_delay = \"5s\"\n"
    );
    let srv = TestServer::start(config_from(&cfg(&url, &extra))).await;
    b.webhook_failures.store(1_000_000, Ordering::SeqCst);
    let metrics = || async {
        reqwest::get(srv.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let dropped = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("holdfast_webhook_dropped_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = dropped(&metrics().await);
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(srv.connected(&format!("o{i}")).await.0);
    }
    assert!(
        dropped(&metrics().await) >= before + 5.0,
        "events beyond the queue are dropped and counted"
    );
    drop(clients);
    srv.stop().await;
}
