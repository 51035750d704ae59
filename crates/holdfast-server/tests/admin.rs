//! The admin web UI's server side: off unless enabled with credentials, password login with
//! signed sessions and a brute-force limit, the API for its pages, the redacted configuration,
//! live tracing, its listener, and the development first page.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const PASSWORD: &str = "admin-pass";
const ADMIN_SECRET: &str = "admin-secret-0123456789";

fn admin_config() -> holdfast_server::config::Config {
    let mut c = config_from(
        "[channel.without_namespace]\njoin_leave = true\npresence = true\nhistory_size = 10\n\
         history_ttl = \"60s\"\nallow_subscribe_for_client = true\n",
    );
    c.admin.enabled = true;
    c.admin.password = PASSWORD.into();
    c.admin.secret = ADMIN_SECRET.into();
    c
}

async fn login(srv: &TestServer, password: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(srv.http("/admin/auth"))
        .json(&json!({ "password": password }))
        .send()
        .await
        .unwrap()
}

async fn admin_api(srv: &TestServer, token: &str, method: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(srv.http(&format!("/admin/api/{method}")))
        .header("Authorization", format!("token {token}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn token_of(srv: &TestServer) -> String {
    let r = login(srv, PASSWORD).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_owned()
}

async fn status(url: String) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn admin_is_off_by_default_and_without_credentials() {
    let srv = TestServer::start(base_config()).await;
    assert_eq!(status(srv.http("/admin/")).await, 404);
    assert_eq!(login(&srv, "").await.status(), 404);
    srv.stop().await;

    let mut c = base_config();
    c.admin.enabled = true;
    c.admin.password = PASSWORD.into();
    let warnings: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("admin.enabled") && w.contains("admin.secret")),
        "{warnings:?}"
    );
    let srv = TestServer::start(c).await;
    assert_eq!(status(srv.http("/admin/")).await, 404, "no secret: no UI");
    assert_eq!(
        status(srv.http("/")).await,
        404,
        "no first page in production"
    );
    srv.stop().await;
}

#[tokio::test]
async fn login_issues_sessions_and_failures_are_limited() {
    let srv = TestServer::start(admin_config()).await;
    let page = reqwest::get(srv.http("/admin/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let settings: Value = reqwest::get(srv.http("/admin/settings"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(settings["insecure"], false);

    let token = token_of(&srv).await;
    let r = admin_api(&srv, &token, "info", json!({})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"]["nodes"].as_array().unwrap().len(), 1, "{v}");

    // No session, a forged one, one signed with another secret: refused.
    assert_eq!(admin_api(&srv, "", "info", json!({})).await.status(), 401);
    assert_eq!(
        admin_api(&srv, "not-a-token", "info", json!({}))
            .await
            .status(),
        401
    );
    let other = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "admin", "exp": 4_000_000_000u64 }),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret"),
    )
    .unwrap();
    assert_eq!(
        admin_api(&srv, &other, "info", json!({})).await.status(),
        401
    );
    // Signed with the admin secret but without the admin audience (a connection token made
    // with a shared secret): not a session.
    let no_aud = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "admin", "exp": 4_000_000_000u64 }),
        &jsonwebtoken::EncodingKey::from_secret(ADMIN_SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        admin_api(&srv, &no_aud, "info", json!({})).await.status(),
        401
    );
    // An API key is not an admin session.
    assert_eq!(
        admin_api(&srv, API_KEY, "info", json!({})).await.status(),
        401
    );
    // What another site's page could send without a preflight is refused.
    let r = reqwest::Client::new()
        .post(srv.http("/admin/api/publish"))
        .header("Authorization", format!("token {token}"))
        .header("Content-Type", "text/plain")
        .body(r#"{"channel":"x","data":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = reqwest::Client::new()
        .post(srv.http("/admin/api/info"))
        .header("Authorization", format!("token {token}"))
        .header("Sec-Fetch-Site", "cross-site")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = reqwest::Client::new()
        .post(srv.http("/admin/trace"))
        .json(&json!({ "channel": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Five wrong passwords from one address lock it out for the window, the right one too.
    for _ in 0..5 {
        assert_eq!(login(&srv, "wrong").await.status(), 401);
    }
    let r = login(&srv, PASSWORD).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Sessions issued before still work.
    assert_eq!(
        admin_api(&srv, &token, "info", json!({})).await.status(),
        200
    );
    srv.stop().await;

    // Attempts sent at once are counted before any is checked: five get an answer, the rest 429.
    let srv = TestServer::start(admin_config()).await;
    let all = futures_util::future::join_all((0..12).map(|_| login(&srv, "wrong"))).await;
    let refused = all.iter().filter(|r| r.status() == 401).count();
    let limited = all.iter().filter(|r| r.status() == 429).count();
    assert_eq!((refused, limited), (5, 7));
    srv.stop().await;
}

#[tokio::test]
async fn pages_api_lists_connections_and_hides_secrets() {
    let srv = TestServer::start(admin_config()).await;
    let token = token_of(&srv).await;
    let (mut c, _) = srv.connected("alice").await;
    let r = c.call("subscribe", json!({ "channel": "room" })).await;
    assert!(r.get("error").is_none(), "{r}");

    let v: Value = admin_api(&srv, &token, "connections", json!({ "user": "alice" }))
        .await
        .json()
        .await
        .unwrap();
    let conns = v["result"]["connections"].as_object().unwrap();
    assert_eq!(conns.len(), 1, "{v}");
    let (_, conn) = conns.iter().next().unwrap();
    assert_eq!(conn["user"], "alice");
    assert_eq!(conn["transport"], "websocket");
    assert_eq!(conn["protocol"], "json");
    assert_eq!(conn["ip"], "127.0.0.1");
    assert!(conn["connected_at"].as_u64().unwrap() > 1_700_000_000);
    assert!(conn["state"]["channels"].get("room").is_some(), "{conn}");
    let v: Value = admin_api(&srv, &token, "connections", json!({ "user": "nobody" }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["connections"], json!({}));

    // The server API through the session, with its error shapes.
    let v: Value = admin_api(&srv, &token, "channels", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["channels"]["room"]["num_clients"], 1, "{v}");
    let v: Value = admin_api(&srv, &token, "no_such_method", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], 104, "{v}");
    let v: Value = admin_api(&srv, &token, "health", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["engine"], "ok");
    assert_eq!(v["result"]["connections"], 1);

    let r = admin_api(&srv, &token, "config", json!({})).await;
    let text = r.text().await.unwrap();
    for secret in [SECRET, API_KEY, PASSWORD, ADMIN_SECRET] {
        assert!(!text.contains(secret), "{secret} shown in {text}");
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["result"]["client"]["token"]["hmac_secret_key"],
        "********"
    );
    assert_eq!(v["result"]["admin"]["enabled"], true);
    srv.stop().await;
}

/// The lines of an NDJSON trace stream, one at a time.
struct Lines {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Lines {
    async fn next(&mut self) -> Value {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line).unwrap();
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .expect("a trace line in time")
                .unwrap()
                .expect("the trace stream open");
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// The next event of `kind` (others, such as pings, are skipped).
    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next().await;
            if v["type"] == kind {
                return v;
            }
        }
    }
}

async fn trace_request(srv: &TestServer, token: &str, target: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(srv.http("/admin/trace"))
        .header("Authorization", format!("token {token}"))
        .json(&target)
        .send()
        .await
        .unwrap()
}

async fn trace(srv: &TestServer, token: &str, target: Value) -> Lines {
    let resp = trace_request(srv, token, target).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    Lines {
        resp,
        buf: Vec::new(),
    }
}

#[tokio::test]
async fn trace_follows_a_channel_and_a_user() {
    let srv = TestServer::start(admin_config()).await;
    let token = token_of(&srv).await;
    let mut chan = trace(&srv, &token, json!({ "channel": "room" })).await;
    assert_eq!(chan.next().await["target"]["channel"], "room");
    let mut user = trace(&srv, &token, json!({ "user": "bob" })).await;
    assert_eq!(user.next().await["target"]["user"], "bob");

    let (mut bob, connected) = srv.connected("bob").await;
    let e = user.next_of("connect").await;
    assert_eq!(e["client"], connected["connect"]["client"]);
    assert_eq!(e["transport"], "websocket");
    let r = bob.call("subscribe", json!({ "channel": "room" })).await;
    assert!(r.get("error").is_none(), "{r}");
    let e = chan.next_of("subscribe").await;
    assert_eq!(e["user"], "bob");
    assert_eq!(chan.next_of("join").await["user"], "bob");
    assert_eq!(user.next_of("subscribe").await["channel"], "room");

    publish(&srv, "room", json!({ "text": "traced" })).await;
    let e = chan.next_of("publication").await;
    assert_eq!(e["offset"], 1);
    assert_eq!(e["data"], r#"{"text":"traced"}"#);
    assert_eq!(e["truncated"], false);
    assert_eq!(user.next_of("publication").await["channel"], "room");
    // A channel nobody follows is not traced.
    publish(&srv, "elsewhere", json!({ "text": "not traced" })).await;

    // Oversized payloads are cut.
    publish(&srv, "room", json!({ "text": "x".repeat(5000) })).await;
    let e = chan.next_of("publication").await;
    assert_eq!(e["truncated"], true);
    assert_eq!(e["data"].as_str().unwrap().len(), 1024);

    let v = api(
        &srv,
        "disconnect",
        json!({ "user": "bob", "disconnect": { "code": 4001, "reason": "bye" } }),
    )
    .await;
    assert!(v.get("error").is_none(), "{v}");
    let e = user.next_of("disconnect").await;
    assert_eq!(e["code"], 4001);
    assert_eq!(e["reason"], "bye");
    assert_eq!(chan.next_of("unsubscribe").await["user"], "bob");
    drop(bob);

    // At most 8 at once; a closed one frees its place.
    let mut more = Vec::new();
    for _ in 0..6 {
        more.push(trace(&srv, &token, json!({ "channel": "other" })).await);
    }
    let r = trace_request(&srv, &token, json!({ "user": "x" })).await;
    assert_eq!(r.status(), 429);
    drop(more);
    eventually("traces closed", || srv.state.node.hub().tracer.count() == 2).await;
    let r = trace_request(&srv, &token, json!({ "channel": "" })).await;
    assert_eq!(r.status(), 400, "a trace needs a channel or a user");
    srv.stop().await;
}

#[tokio::test]
async fn admin_is_served_on_the_internal_port_when_there_is_one() {
    for external in [false, true] {
        let mut c = admin_config();
        c.admin.external = external;
        let state = holdfast_server::server::build(c).await.unwrap();
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (pa, ia) = (public.local_addr().unwrap(), internal.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(holdfast_server::server::run(
            state.clone(),
            public,
            Some(internal),
            async {
                let _ = rx.await;
            },
        ));
        eventually("ready", || state.node.is_ready()).await;
        let (on_public, on_internal) = (
            status(format!("http://{pa}/admin/")).await,
            status(format!("http://{ia}/admin/")).await,
        );
        if external {
            assert_eq!((on_public, on_internal), (200, 404));
        } else {
            assert_eq!((on_public, on_internal), (404, 200));
        }
        let _ = tx.send(());
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn first_page_is_served_in_development_only() {
    let mut c = base_config();
    c.client.insecure = true;
    let srv = TestServer::start(c).await;
    let r = reqwest::get(srv.http("/")).await.unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("centrifuge.js"), "{html}");
    let js = reqwest::get(srv.http("/centrifuge.js")).await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.text().await.unwrap().contains("globalThis.Centrifuge"));
    assert_eq!(status(srv.http("/first.js")).await, 200);
    srv.stop().await;
    // Trace streams end when the node shuts down (checked by stop() returning).
    let srv = TestServer::start(admin_config()).await;
    let token = token_of(&srv).await;
    let mut t = trace(&srv, &token, json!({ "channel": "room" })).await;
    t.next().await;
    // The trace ends at its next second's tick, well before the 5 s drain would cut it.
    tokio::time::timeout(Duration::from_secs(3), srv.stop())
        .await
        .expect("shutdown does not wait for an open trace");
}
