//! Map channels through the real server: the TOML keys, the server API methods (`map_*`) with
//! their answers and refusals, a WebSocket subscriber fed by them, and the metrics.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};

const CFG: &str = r#"
[channel.without_namespace]
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "board"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "persistent"
stream_size = 50
max_keys = 3
max_key_length = 16

[[channel.namespaces]]
name = "status"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "durable"
key_ttl = "30s"

[[channel.namespaces]]
name = "room"
allow_subscribe_for_client = true
map_clients_presence_channel_prefix = "clients:"

[[channel.namespaces]]
name = "clients"
subscription_type = "map_clients"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "ephemeral"
key_ttl = "30s"
"#;

fn err(r: &Value) -> (u64, &str) {
    (
        r["error"]["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("expected an error, got {r}")),
        r["error"]["message"].as_str().unwrap_or_default(),
    )
}

#[tokio::test]
async fn map_api_writes_reads_and_refuses() {
    let srv = TestServer::start(config_from(CFG)).await;
    let r = api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "a", "data": {"v": 1}, "version": 2}),
    )
    .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    let epoch = r["result"]["epoch"].as_str().unwrap().to_owned();
    api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "b", "b64data": "AAEC"}),
    )
    .await;
    // An older version never overwrites a newer one; a conditional write that does not hold
    // is suppressed; an idempotent repeat answers as the first write.
    let r = api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "a", "data": {"v": 0}, "version": 1}),
    )
    .await;
    assert_eq!(r["result"]["suppressed"], true, "{r}");
    assert_eq!(r["result"]["suppress_reason"], "version");
    let r = api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "a", "data": {}, "key_mode": "if_new"}),
    )
    .await;
    assert_eq!(r["result"]["suppress_reason"], "key_mode", "{r}");
    let once = json!({"channel": "board:1", "key": "c", "data": {"n": 1}, "idempotency_key": "x1"});
    let first = api(&srv, "map_publish", once.clone()).await;
    let again = api(&srv, "map_publish", once).await;
    assert_eq!(again["result"]["offset"], first["result"]["offset"]);
    assert_eq!(again["result"]["suppress_reason"], "idempotency");
    // State (paged), stream, stats.
    let r = api(
        &srv,
        "map_read_state",
        json!({"channel": "board:1", "limit": 2}),
    )
    .await;
    let keys: Vec<&str> = r["result"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["a", "b"], "{r}");
    assert_eq!(
        r["result"]["entries"][1]["b64data"], "AAEC",
        "binary values as b64data"
    );
    let cursor = r["result"]["cursor"].as_str().unwrap().to_owned();
    let r = api(
        &srv,
        "map_read_state",
        json!({"channel": "board:1", "limit": 2, "cursor": cursor,
               "revision_offset": r["result"]["offset"], "revision_epoch": epoch}),
    )
    .await;
    assert_eq!(r["result"]["entries"][0]["key"], "c", "{r}");
    assert!(
        r["result"].get("cursor").is_none(),
        "the last page has no cursor: {r}"
    );
    let r = api(
        &srv,
        "map_read_state",
        json!({"channel": "board:1", "key": "a"}),
    )
    .await;
    assert_eq!(r["result"]["entries"][0]["data"], json!({"v": 1}), "{r}");
    api(
        &srv,
        "map_remove",
        json!({"channel": "board:1", "key": "b"}),
    )
    .await;
    let r = api(
        &srv,
        "map_read_stream",
        json!({"channel": "board:1", "since_offset": 2, "since_epoch": epoch, "limit": 10}),
    )
    .await;
    let stream: Vec<(u64, &str, bool)> = r["result"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["key"].as_str().unwrap(),
                e["removed"] == true,
            )
        })
        .collect();
    assert_eq!(stream, [(3, "c", false), (4, "b", true)], "{r}");
    let r = api(&srv, "map_stats", json!({"channel": "board:1"})).await;
    assert_eq!(r["result"]["num_keys"], 2, "{r}");
    // Refusals, each with a clear code, and nothing written.
    let cases = [
        (
            "map_publish",
            json!({"channel": "board:1", "data": {}}),
            107,
        ),
        (
            "map_publish",
            json!({"channel": "board:1", "key": "a"}),
            107,
        ),
        (
            "map_publish",
            json!({"channel": "board:1", "key": "k".repeat(17), "data": {}}),
            107,
        ),
        (
            "map_publish",
            json!({"channel": "plain", "key": "a", "data": {}}),
            107,
        ),
        (
            "map_publish",
            json!({"channel": "nope:1", "key": "a", "data": {}}),
            102,
        ),
        (
            "map_publish",
            json!({"channel": "board:1", "key": "a", "data": {}, "key_mode": "sometimes"}),
            107,
        ),
        (
            "map_read_state",
            json!({"channel": "board:1", "limit": -1}),
            107,
        ),
        (
            "map_read_state",
            json!({"channel": "board:1", "revision_offset": 1, "revision_epoch": "forged"}),
            112,
        ),
        (
            "map_read_stream",
            json!({"channel": "board:1", "since_offset": 1, "since_epoch": "forged"}),
            112,
        ),
        ("publish", json!({"channel": "board:1", "data": {}}), 107),
    ];
    for (method, body, want) in cases {
        let r = api(&srv, method, body.clone()).await;
        assert_eq!(err(&r).0, want, "{method} {body}: {r}");
    }
    // max_keys = 3: a fourth key is refused, an existing one may still change.
    api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "d", "data": {}}),
    )
    .await;
    let r = api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "e", "data": {}}),
    )
    .await;
    assert_eq!(err(&r).0, 106, "{r}");
    let r = api(
        &srv,
        "map_publish",
        json!({"channel": "board:1", "key": "a", "data": {"v": 9}}),
    )
    .await;
    assert!(r["result"]["offset"].is_u64(), "{r}");
    let r = api(&srv, "map_stats", json!({"channel": "board:1"})).await;
    assert_eq!(r["result"]["num_keys"], 3, "{r}");
    // In a batch, as single commands.
    let r = api(
        &srv,
        "batch",
        json!({"commands": [
            {"map_publish": {"channel": "status:1", "key": "x", "data": {"s": 1}}},
            {"map_stats": {"channel": "status:1"}},
        ]}),
    )
    .await;
    assert_eq!(r["result"]["replies"][1]["map_stats"]["num_keys"], 1, "{r}");
    // Clear: no keys, a new epoch.
    api(&srv, "map_clear", json!({"channel": "board:1"})).await;
    let r = api(&srv, "map_read_state", json!({"channel": "board:1"})).await;
    assert!(r["result"]["entries"].as_array().unwrap().is_empty(), "{r}");
    assert_ne!(r["result"]["epoch"], epoch);
    // An undecodable body is HTTP 400.
    let resp = reqwest::Client::new()
        .post(srv.http("/api/map_publish"))
        .header("X-API-Key", API_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    srv.stop().await;
}

#[tokio::test]
async fn a_websocket_map_subscriber_sees_api_writes_and_presence() {
    let srv = TestServer::start(config_from(CFG)).await;
    api(
        &srv,
        "map_publish",
        json!({"channel": "status:agents", "key": "a1", "data": {"s": "run"}}),
    )
    .await;
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "status:agents", "type": 1, "phase": 2}),
        )
        .await;
    let s = &r["subscribe"];
    assert!(s.get("phase").is_none(), "one page: straight to live: {r}");
    assert_eq!(s["state"][0]["key"], "a1", "{r}");
    assert_eq!(
        s["recoverable"], true,
        "durable is recoverable's other name: {r}"
    );
    api(
        &srv,
        "map_remove",
        json!({"channel": "status:agents", "key": "a1"}),
    )
    .await;
    let p = c.push().await;
    assert_eq!(p["pub"]["key"], "a1", "{p}");
    assert_eq!(p["pub"]["removed"], true, "{p}");
    // A connection joining a room is an entry of its clients map, gone when it leaves.
    let (mut w, _) = srv.connected("w").await;
    let r = w
        .call(
            "subscribe",
            json!({"channel": "clients:room:1", "type": 2, "phase": 2}),
        )
        .await;
    assert!(r["subscribe"].is_object(), "{r}");
    let (mut j, connect) = srv.connected("joiner").await;
    j.call("subscribe", json!({"channel": "room:1"})).await;
    let p = w.push().await;
    assert_eq!(p["pub"]["key"], connect["connect"]["client"], "{p}");
    assert_eq!(p["pub"]["info"]["user"], "joiner", "{p}");
    drop(j);
    let p = w.push().await;
    assert_eq!(p["pub"]["removed"], true, "{p}");
    let metrics = reqwest::get(srv.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "holdfast_map_writes_total",
        "holdfast_map_subscriptions_total",
        "holdfast_map_presence_entries",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    srv.stop().await;
}

#[tokio::test]
async fn map_configuration_mistakes_are_named() {
    let cases = [
        (
            "[[channel.namespaces]]\nname = \"m1\"\nsubscription_type = \"map\"\n",
            "map.mode",
        ),
        (
            "[[channel.namespaces]]\nname = \"m2\"\nsubscription_type = \"map\"\n[channel.namespaces.map]\nmode = \"persistent\"\nkey_ttl = \"10s\"\n",
            "map.key_ttl",
        ),
        (
            "[[channel.namespaces]]\nname = \"m3\"\nsubscription_type = \"map\"\n[channel.namespaces.map]\nmode = \"recoverable\"\n",
            "map.key_ttl",
        ),
        (
            "[[channel.namespaces]]\nname = \"m4\"\nmap_users_presence_channel_prefix = \"nowhere:\"\n",
            "map_users_presence_channel_prefix",
        ),
        (
            "[[channel.namespaces]]\nname = \"m5\"\nsubscription_type = \"shared_poll\"\n",
            "subscription_type",
        ),
    ];
    for (toml, key) in cases {
        let c = config_from(toml);
        let e = holdfast_server::server::build(c)
            .await
            .err()
            .unwrap_or_else(|| panic!("{toml} should be refused"));
        assert!(format!("{e:#}").contains(key), "{toml}: {e:#}");
    }
}
