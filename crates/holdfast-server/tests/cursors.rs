//! Durable delivery cursors: offline delivery without client state.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};

fn cfg(ping: &str, size: u32) -> holdfast_server::config::Config {
    config_from(&format!(
        r#"
[client]
ping_interval = "{ping}"
pong_timeout = "500ms"
[client.subscribe_to_user_personal_channel]
enabled = true
[channel.without_namespace]
history_size = {size}
history_ttl = "300s"
force_recovery = true
delivery_cursor = true
[[channel.namespaces]]
name = "plain"
history_size = 10
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
"#
    ))
}

fn offsets(sub: &Value) -> Vec<u64> {
    sub["publications"].as_array().map_or_else(Vec::new, |a| {
        a.iter().map(|p| p["offset"].as_u64().unwrap()).collect()
    })
}

async fn send_to(srv: &TestServer, user: &str, n: u64) {
    publish(srv, &format!("#{user}"), json!({"n": n})).await;
}

#[tokio::test]
async fn offline_user_gets_everything_on_first_connect_without_a_position() {
    let srv = TestServer::start(cfg("25s", 100)).await;
    for n in 1..=3 {
        send_to(&srv, "u", n).await;
    }
    let (_c, r) = srv.connected("u").await;
    let sub = &r["connect"]["subs"]["#u"];
    assert_eq!(sub["recovered"], true, "{r}");
    assert_eq!(offsets(sub), [1, 2, 3]);
    srv.stop().await;
}

#[tokio::test]
async fn pong_confirms_delivery_and_a_new_device_starts_after_it() {
    let srv = TestServer::start(cfg("1s", 100)).await;
    for n in 1..=3 {
        send_to(&srv, "u", n).await;
    }
    let (mut a, r) = srv.connected("u").await;
    assert_eq!(offsets(&r["connect"]["subs"]["#u"]), [1, 2, 3]);
    // The client answers the next ping; the pong proves it read everything before it.
    a.auto_pong = false;
    assert_eq!(a.next().await, json!({}));
    a.send_raw("{}").await;
    let node = srv.state.node.clone();
    let mut cursor = None;
    for _ in 0..500 {
        cursor = node.delivery_cursor("u", "#u").await.unwrap();
        if cursor.is_some() {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(
        cursor.map(|c| c.offset),
        Some(3),
        "the pong confirmed offset 3"
    );
    drop(a);
    send_to(&srv, "u", 4).await;
    send_to(&srv, "u", 5).await;
    // Another device, no stored position: only what has not reached the user yet.
    let (_b, r) = srv.connected("u").await;
    let sub = &r["connect"]["subs"]["#u"];
    assert_eq!(sub["recovered"], true, "{r}");
    assert_eq!(offsets(sub), [4, 5], "nothing twice, nothing lost");
    srv.stop().await;
}

#[tokio::test]
async fn explicit_ack_moves_the_cursor() {
    let srv = TestServer::start(cfg("25s", 100)).await;
    for n in 1..=5 {
        send_to(&srv, "u", n).await;
    }
    let (mut a, r) = srv.connected("u").await;
    let epoch = r["connect"]["subs"]["#u"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let ack = |offset: u64, epoch: &str| json!({"method": "holdfast.ack", "data": {"channel": "#u", "offset": offset, "epoch": epoch}});
    let r = a.call("rpc", ack(4, &epoch)).await;
    assert_eq!(r["rpc"], json!({"data": {}}), "{r}");
    assert_eq!(
        a.call("rpc", ack(9, &epoch)).await["error"]["code"],
        107,
        "cannot ack what was not delivered"
    );
    assert_eq!(
        a.call("rpc", ack(2, "zzzzzzzz")).await["error"]["code"],
        107,
        "foreign epoch"
    );
    let r = a.call("rpc", json!({"method": "holdfast.ack", "data": {"channel": "elsewhere", "offset": 1, "epoch": epoch}})).await;
    assert_eq!(r["error"]["code"], 103, "not subscribed");
    assert!(a.call("subscribe", json!({"channel": "plain:x"})).await["subscribe"].is_object());
    let r = a.call("rpc", json!({"method": "holdfast.ack", "data": {"channel": "plain:x", "offset": 0, "epoch": ""}})).await;
    assert_eq!(r["error"]["code"], 108, "no cursor in that namespace");
    assert_eq!(
        a.call("rpc", json!({"method": "holdfast.ack", "data": "nope"}))
            .await["error"]["code"],
        107
    );
    // An older ack never moves the cursor back.
    a.call("rpc", ack(2, &epoch)).await;
    assert_eq!(
        srv.state
            .node
            .delivery_cursor("u", "#u")
            .await
            .unwrap()
            .map(|c| c.offset),
        Some(4)
    );
    let (_b, r) = srv.connected("u").await;
    assert_eq!(offsets(&r["connect"]["subs"]["#u"]), [5]);
    srv.stop().await;
}

#[tokio::test]
async fn two_devices_of_one_user_each_get_everything_live() {
    let srv = TestServer::start(cfg("25s", 100)).await;
    let (mut a, _) = srv.connected("u").await;
    let (mut b, _) = srv.connected("u").await;
    for n in 1..=3 {
        send_to(&srv, "u", n).await;
    }
    for c in [&mut a, &mut b] {
        for want in 1..=3 {
            assert_eq!(c.push().await["pub"]["offset"], want);
        }
    }
    srv.stop().await;
}

#[tokio::test]
async fn cursor_beyond_retention_is_told_never_silent() {
    let srv = TestServer::start(cfg("25s", 2)).await;
    send_to(&srv, "u", 1).await;
    send_to(&srv, "u", 2).await;
    let (mut a, r) = srv.connected("u").await;
    let epoch = r["connect"]["subs"]["#u"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    a.call(
        "rpc",
        json!({"method": "holdfast.ack", "data": {"channel": "#u", "offset": 2, "epoch": epoch}}),
    )
    .await;
    drop(a);
    for n in 3..=6 {
        send_to(&srv, "u", n).await;
    }
    let (_b, r) = srv.connected("u").await;
    let sub = &r["connect"]["subs"]["#u"];
    assert!(
        sub.get("recovered").is_none(),
        "3 and 4 fell out of the window: not recovered: {r}"
    );
    assert_eq!(sub["was_recovering"], true, "the client is told");
    assert!(sub.get("publications").is_none(), "no partial recovery");
    assert_eq!(sub["offset"], 6);
    srv.stop().await;
}

#[tokio::test]
async fn a_delivery_is_confirmed_promptly_not_at_the_next_regular_ping() {
    // Regular pings every 20 s (the first one after 10-20 s); the confirmation ping after a
    // delivery comes within client.delivery_cursor_confirm_delay (500 ms by default).
    let srv = TestServer::start(cfg("20s", 100)).await;
    let (mut a, r) = srv.connected("u").await;
    assert!(offsets(&r["connect"]["subs"]["#u"]).is_empty(), "{r}");
    a.auto_pong = false;
    send_to(&srv, "u", 1).await;
    assert_eq!(a.push().await["pub"]["offset"], 1);
    let delivered = std::time::Instant::now();
    assert_eq!(a.next().await, json!({}), "a ping asks for confirmation");
    let waited = delivered.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(5),
        "the confirmation ping came {waited:?} after the delivery, not at the regular ping"
    );
    a.send_raw("{}").await;
    // A later command's reply means the pong (and its cursor save) was handled.
    a.call("presence_stats", json!({"channel": "plain:x"}))
        .await;
    let cursor = srv.state.node.delivery_cursor("u", "#u").await.unwrap();
    assert_eq!(cursor.map(|c| c.offset), Some(1));
    drop(a);
    // The user's next device (no position) starts after what the first one confirmed.
    let (_b, r) = srv.connected("u").await;
    assert!(
        offsets(&r["connect"]["subs"]["#u"]).is_empty(),
        "nothing twice: {r}"
    );
    srv.stop().await;
}
