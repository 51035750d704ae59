//! Protocol features on the wire, byte for byte: delta forms (JSON string payloads, `delta`
//! flags), tag filters and their refusals, compaction ids, server-side filters from subscription
//! tokens, and hostile input against them (unknown delta types, filters past the bounds or the
//! decoder's nesting limit, binary publications for JSON delta subscribers).

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use holdfast_core::fossil;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[channel.without_namespace]
allow_subscribe_for_client = true
history_size = 10
history_ttl = "60s"
force_recovery = true
[[channel.namespaces]]
name = "delta"
allowed_delta_types = ["fossil"]
allow_subscribe_for_client = true
[[channel.namespaces]]
name = "tags"
allow_tags_filter = true
allow_subscribe_for_client = true
history_size = 10
history_ttl = "60s"
force_recovery = true
[[channel.namespaces]]
name = "compact"
allow_channel_compaction = true
allow_subscribe_for_client = true
[[channel.namespaces]]
name = "private"
allow_tags_filter = true
"#;

async fn server() -> TestServer {
    TestServer::start(config_from(CONFIG)).await
}

async fn api_publish(srv: &TestServer, body: Value) -> Value {
    let r = api(srv, "publish", body).await;
    assert!(r.get("error").is_none(), "{r}");
    r["result"].clone()
}

#[tokio::test]
async fn delta_publications_are_json_strings_and_fossil_deltas_of_the_previous() {
    let srv = server().await;
    let (mut c, _) = srv.connected("42").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "delta:a", "delta": "fossil", "flag": 1}),
        )
        .await;
    assert_eq!(r["subscribe"]["delta"], true, "{r}");
    assert!(
        r["subscribe"].get("id").is_none(),
        "no compaction id where the namespace does not allow it: {r}"
    );
    let first = json!({"text": "a long enough answer that a delta pays off: héllo ✓"});
    let second = json!({"text": "a long enough answer that a delta pays off: héllo ✓ and more"});
    api_publish(
        &srv,
        json!({"channel": "delta:a", "data": first, "delta": true}),
    )
    .await;
    let p1 = c.push().await;
    let pub1 = &p1["pub"];
    // In full, as the JSON text inside a string; no delta flag.
    assert!(pub1.get("delta").is_none(), "{p1}");
    let text1 = pub1["data"].as_str().expect("data is a string");
    assert_eq!(serde_json::from_str::<Value>(text1).unwrap(), first);
    api_publish(
        &srv,
        json!({"channel": "delta:a", "data": second, "delta": true}),
    )
    .await;
    let p2 = c.push().await;
    assert_eq!(p2["pub"]["delta"], true, "{p2}");
    let patch = p2["pub"]["data"].as_str().expect("a delta is a string");
    assert!(patch.len() < text1.len(), "the delta is smaller: {patch}");
    let decoded = fossil::apply(text1.as_bytes(), patch.as_bytes()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&decoded).unwrap(), second);
    // Not allowed by the publisher: in full again (and it becomes the base).
    api_publish(&srv, json!({"channel": "delta:a", "data": {"n": 3}})).await;
    let p3 = c.push().await;
    assert!(p3["pub"].get("delta").is_none(), "{p3}");
    assert_eq!(p3["pub"]["data"], "{\"n\":3}");
    srv.stop().await;
}

#[tokio::test]
async fn unknown_delta_types_close_with_3501_and_filters_turn_delta_off() {
    let srv = server().await;
    let (mut c, _) = srv.connected("42").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "tags:x", "delta": "fossil", "tf": {"key": "k", "cmp": "ex"}}),
        )
        .await;
    assert!(
        r["subscribe"].get("delta").is_none(),
        "delta is not negotiated together with a filter: {r}"
    );
    let r = c
        .call(
            "subscribe",
            json!({"channel": "delta:y", "delta": "fossil"}),
        )
        .await;
    assert_eq!(r["subscribe"]["delta"], true);
    c.send("subscribe", json!({"channel": "delta:z", "delta": "zstd"}))
        .await;
    match c.closed().await {
        Closed::Code(code, _) => assert_eq!(code, 3501),
        other => panic!("expected 3501, got {other:?}"),
    }
    srv.stop().await;
}

#[tokio::test]
async fn filters_are_validated_bounded_and_refused_where_not_allowed() {
    let srv = server().await;
    let (mut c, _) = srv.connected("42").await;
    let refused = |r: &Value| (code(r), r["error"]["message"].as_str().unwrap().to_owned());
    let r = c
        .call(
            "subscribe",
            json!({"channel": "c1", "tf": {"key": "k", "cmp": "ex"}}),
        )
        .await;
    let (code1, msg) = refused(&r);
    assert_eq!(code1, 107);
    assert!(msg.contains("not allowed"), "{msg}");
    for (tf, why) in [
        (
            json!({"key": "k", "cmp": "gt", "val": "ten"}),
            "not a number",
        ),
        (
            json!({"op": "xor", "nodes": [{"key": "k", "cmp": "ex"}]}),
            "unknown op",
        ),
        (json!({"op": "not", "nodes": []}), "not"),
        (
            json!({"key": "k", "cmp": "in", "vals": (0..2000).map(|i| i.to_string()).collect::<Vec<_>>()}),
            "1024 vals",
        ),
    ] {
        let r = c
            .call("subscribe", json!({"channel": "tags:bad", "tf": tf}))
            .await;
        let (code2, msg) = refused(&r);
        assert_eq!(code2, 107, "{r}");
        assert!(msg.contains(why), "{msg} should say {why}");
    }
    // Past the bound (16) but inside the decoder's nesting limit: 107 with a reason.
    let mut deep = json!({"key": "k", "cmp": "ex"});
    for _ in 0..20 {
        deep = json!({"op": "not", "nodes": [deep]});
    }
    let r = c
        .call("subscribe", json!({"channel": "tags:deep", "tf": deep}))
        .await;
    assert!(refused(&r).1.contains("deeper than 16"), "{r}");
    // The connection is undisturbed.
    let r = c.call("subscribe", json!({"channel": "tags:ok"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    // Nested past what the JSON decoder accepts at all: a malformed command closes with 3501.
    let mut deeper = json!({"key": "k", "cmp": "ex"});
    for _ in 0..200 {
        deeper = json!({"op": "not", "nodes": [deeper]});
    }
    let id = c.next_id();
    let frame = json!({"id": id, "subscribe": {"channel": "tags:deeper", "tf": deeper}});
    c.send_raw(&frame.to_string()).await;
    match c.closed().await {
        Closed::Code(code, _) => assert_eq!(code, 3501),
        other => panic!("expected 3501, got {other:?}"),
    }
    // The server serves others.
    let (mut other, _) = srv.connected("43").await;
    let r = other.call("subscribe", json!({"channel": "tags:ok"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn a_token_filter_narrows_and_the_client_cannot_widen_it() {
    let srv = server().await;
    let (mut c, _) = srv.connected("42").await;
    let token = sub_token(
        "42",
        "private:feed",
        json!({"tf": {"key": "tenant", "cmp": "eq", "val": "acme"}}),
    );
    // The client asks for everything that has a tenant; the token's filter still applies.
    let r = c
        .call(
            "subscribe",
            json!({"channel": "private:feed", "token": token, "tf": {"key": "tenant", "cmp": "ex"}}),
        )
        .await;
    assert!(r.get("subscribe").is_some(), "{r}");
    for (n, tenant) in [(1, "other"), (2, "acme"), (3, "other"), (4, "acme")] {
        api_publish(
            &srv,
            json!({"channel": "private:feed", "data": {"n": n}, "tags": {"tenant": tenant}}),
        )
        .await;
    }
    assert_eq!(c.push().await["pub"]["data"]["n"], 2);
    assert_eq!(c.push().await["pub"]["data"]["n"], 4);
    // A malformed filter in a token is an invalid subscription token (103, as any other).
    let (mut d, _) = srv.connected("42").await;
    let bad = sub_token("42", "private:feed", json!({"tf": {"key": 5}}));
    let r = d
        .call(
            "subscribe",
            json!({"channel": "private:feed", "token": bad}),
        )
        .await;
    assert_eq!(code(&r), 103, "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn compaction_ids_replace_the_channel_in_publication_pushes_only() {
    let srv = server().await;
    let (mut c, _) = srv.connected("42").await;
    let r = c
        .call("subscribe", json!({"channel": "compact:a", "flag": 1}))
        .await;
    let id = r["subscribe"]["id"].as_i64().expect("an id");
    assert!(id > 0);
    let r = c
        .call("subscribe", json!({"channel": "plain", "flag": 1}))
        .await;
    assert!(r["subscribe"].get("id").is_none(), "{r}");
    let (mut c2, _) = srv.connected("43").await;
    let r = c2
        .call("subscribe", json!({"channel": "compact:a", "flag": 1}))
        .await;
    assert_eq!(
        r["subscribe"]["id"].as_i64(),
        Some(id),
        "one id per channel on a node: one encoded push for all"
    );
    api_publish(&srv, json!({"channel": "compact:a", "data": {"n": 1}})).await;
    let p = c.push().await;
    assert_eq!(p["id"].as_i64(), Some(id), "{p}");
    assert!(p.get("channel").is_none(), "{p}");
    assert_eq!(p["pub"]["data"]["n"], 1);
    // The unsubscribe push keeps the channel name.
    let r = api(
        &srv,
        "unsubscribe",
        json!({"user": "42", "channel": "compact:a", "invalidate": true}),
    )
    .await;
    assert!(r.get("error").is_none(), "{r}");
    let p = c.push().await;
    assert_eq!(p["channel"], "compact:a", "{p}");
    assert_eq!(p["unsubscribe"]["code"], 2502);
    srv.stop().await;
}

#[tokio::test]
async fn a_binary_publication_closes_a_json_delta_subscriber_with_3506() {
    let srv = server().await;
    let (mut c, _) = srv.connected("42").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "delta:bin", "delta": "fossil"}),
        )
        .await;
    assert_eq!(r["subscribe"]["delta"], true);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode([0xff, 0x00, 0x01]);
    api_publish(&srv, json!({"channel": "delta:bin", "b64data": b64})).await;
    match c.closed().await {
        Closed::Code(code, _) => assert_eq!(code, 3506),
        other => panic!("expected 3506, got {other:?}"),
    }
    srv.stop().await;
}

/// centrifuge-js reorders the messages of a joined frame when another frame follows closely (its
/// per-frame dispatch chains overtake each other), which breaks delta decoding: a connection
/// named `js` gets one message per frame; others keep joined frames.
#[tokio::test]
async fn centrifuge_js_gets_one_message_per_frame() {
    let srv = server().await;
    for (name, joined) in [("js", false), ("python", true)] {
        let mut c = TestClient::connect(&srv.ws_url()).await;
        let r = c
            .call(
                "connect",
                json!({"token": token("42", None, json!({})), "name": name}),
            )
            .await;
        assert!(r.get("connect").is_some(), "{r}");
        let ch = format!("delta:frames_{name}");
        c.call("subscribe", json!({"channel": ch, "delta": "fossil"}))
            .await;
        let before = c.frames;
        // Queued faster than the writer runs (this test's runtime has one thread): the writer
        // finds them together.
        for n in 0..20 {
            publish(&srv, &ch, json!({ "n": n })).await;
        }
        for n in 0..20 {
            assert_eq!(c.push().await["pub"]["data"], format!("{{\"n\":{n}}}"));
        }
        let frames = c.frames - before;
        if joined {
            assert!(frames < 20, "{name}: {frames} frames for 20 messages");
        } else {
            assert_eq!(frames, 20, "{name}: one frame per message");
        }
    }
    srv.stop().await;
}
