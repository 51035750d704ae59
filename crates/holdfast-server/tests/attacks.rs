//! An attacker's view: forged, stale and misused tokens, and operations without permission.
//! Each case gets the protocol's answer, is logged, and leaves other connections alone.

#![allow(clippy::unwrap_used)]

mod common;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[channel.without_namespace]
allow_subscribe_for_client = true
[[channel.namespaces]]
name = "closed"
[[channel.namespaces]]
name = "quiet"
allow_subscribe_for_client = true
"#;

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Connects with `tok` and expects the connection to be closed with 3500.
async fn refused(srv: &TestServer, tok: &str, what: &str) {
    let mut c = srv.client().await;
    c.send("connect", json!({ "token": tok })).await;
    assert_eq!(
        c.closed().await,
        Closed::Code(3500, "invalid token".into()),
        "{what}"
    );
}

#[tokio::test]
async fn forged_and_misused_connection_tokens_are_refused() {
    let srv = TestServer::start(config_from(CONFIG)).await;
    let (mut watcher, _) = srv.connected("watcher").await;
    watcher.call("subscribe", json!({"channel": "w"})).await;

    let now = holdfast_core::time::unix_secs();
    // alg none: header and claims, no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "admin"}))
    );
    refused(&srv, &none, "alg none").await;
    // A valid token with its signature replaced.
    let good = token("u", None, json!({}));
    let (head, _) = good.rsplit_once('.').unwrap();
    refused(
        &srv,
        &format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 32])),
        "bad signature",
    )
    .await;
    // Signed with another secret.
    let other = holdfast_server::jwt::sign_hs256("guessed", &json!({"sub": "u"})).unwrap();
    refused(&srv, &other, "wrong secret").await;
    // Not valid yet.
    refused(
        &srv,
        &token("u", None, json!({"nbf": now + 3600})),
        "nbf in the future",
    )
    .await;
    // A subscription token used as a connection token.
    refused(
        &srv,
        &sub_token("u", "$closed:x", json!({})),
        "connection token with channel",
    )
    .await;
    // A huge token (40 KB of claims, inside the frame limit).
    refused(
        &srv,
        &token("u", None, json!({"pad": "x".repeat(40_000)})),
        "huge token",
    )
    .await;
    // Claims of the wrong type.
    refused(
        &srv,
        &token("u", None, json!({"exp": "never"})),
        "exp not a number",
    )
    .await;
    refused(
        &srv,
        &token("u", None, json!({"channels": "all"})),
        "channels not a list",
    )
    .await;

    // The watcher saw none of it.
    publish(&srv, "w", json!({"still": "here"})).await;
    assert_eq!(
        watcher.push().await["pub"]["data"],
        json!({"still": "here"})
    );
    srv.stop().await;
}

#[tokio::test]
async fn subscription_token_for_another_client_is_refused() {
    let srv = TestServer::start(config_from(CONFIG)).await;
    let (mut c, res) = srv.connected("42").await;
    let mine = res["connect"]["client"].as_str().unwrap().to_owned();
    let (mut d, _) = srv.connected("42").await;
    // Same user, same channel, but bound to connection `mine`: d may not use it.
    let tok = sub_token("42", "$closed:x", json!({ "client": mine }));
    d.send(
        "subscribe",
        json!({"channel": "$closed:x", "token": tok.clone()}),
    )
    .await;
    assert_eq!(d.closed().await, Closed::Code(3500, "invalid token".into()));
    // The connection it was issued for may.
    let r = c
        .call("subscribe", json!({"channel": "$closed:x", "token": tok}))
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn operations_without_permission() {
    let srv = TestServer::start(config_from(CONFIG)).await;
    let (mut c, _) = srv.connected("42").await;
    // Subscribing where the namespace does not allow it, and to a private channel without token.
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "closed:x"})).await),
        103
    );
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "$quiet:x"})).await),
        103
    );
    // Publishing, presence and history without the options that allow them.
    assert!(c.call("subscribe", json!({"channel": "quiet:x"})).await["subscribe"].is_object());
    let p = c
        .call(
            "publish",
            json!({"channel": "quiet:x", "data": {"spoof": true}}),
        )
        .await;
    assert_eq!(code(&p), 103, "publish");
    assert_eq!(
        code(&c.call("presence", json!({"channel": "quiet:x"})).await),
        108,
        "presence off"
    );
    assert_eq!(
        code(&c.call("history", json!({"channel": "quiet:x"})).await),
        108,
        "history off"
    );
    assert_eq!(
        code(
            &c.call("publish", json!({"channel": "closed:x", "data": {}}))
                .await
        ),
        103
    );
    // Nothing was published.
    let h = api(&srv, "history", json!({"channel": "quiet:x"})).await;
    assert!(
        h["error"].is_object()
            || h["result"]["publications"]
                .as_array()
                .is_none_or(Vec::is_empty),
        "{h}"
    );
    // The server API without a key, with a wrong one, and with the key in a cookie.
    let http = reqwest::Client::new();
    for (name, value) in [
        ("X-Other", API_KEY),
        ("X-API-Key", "wrong"),
        ("Cookie", API_KEY),
    ] {
        let r = http
            .post(srv.http("/api/publish"))
            .header(name, value)
            .body(r#"{"channel":"quiet:x","data":{}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{name}");
    }
    srv.stop().await;
}
