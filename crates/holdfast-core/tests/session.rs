//! The session state machine, driven over in-memory transports under paused tokio time: no
//! sockets, no real sleeps. Hours of protocol (stale connects, pings, token expiry) take
//! milliseconds.

#![allow(clippy::unwrap_used)]

use holdfast_core::Node;
use holdfast_core::config::{ChannelOptions, NodeConfig};
use holdfast_core::engine::Broker as _;
use holdfast_core::node::PublishRequest;
use holdfast_core::testing::{self, EngineCall, Stage, TestClient, token};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

fn history(name: &str) -> ChannelOptions {
    ChannelOptions {
        name: name.into(),
        history_size: 100,
        history_ttl: Duration::from_secs(300),
        allow_subscribe_for_client: true,
        allow_publish_for_subscriber: true,
        ..Default::default()
    }
}

fn config() -> NodeConfig {
    let mut c = NodeConfig::default();
    c.channel.without_namespace = ChannelOptions {
        allow_subscribe_for_client: true,
        allow_publish_for_subscriber: true,
        ..Default::default()
    };
    c.channel.namespaces.push(ChannelOptions {
        force_recovery: true,
        ..history("rec")
    });
    c.channel.namespaces.push(ChannelOptions {
        force_positioning: true,
        ..history("pos")
    });
    c.channel.namespaces.push(ChannelOptions {
        force_recovery: true,
        delivery_cursor: true,
        ..history("personal")
    });
    c
}

async fn connected(node: &Node, tok: &str) -> (TestClient, Value) {
    let mut c = TestClient::connect(node);
    let r = c.call("connect", json!({ "token": tok })).await;
    assert!(r["connect"].is_object(), "{r}");
    (c, r)
}

async fn user(node: &Node, user: &str) -> TestClient {
    connected(node, &token(user, None)).await.0
}

fn code(r: &Value) -> u64 {
    r["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error, got {r}"))
}

async fn publish(node: &Node, channel: &str, n: u64) -> u64 {
    let req = PublishRequest {
        data: json!({ "n": n }).to_string().into(),
        ..Default::default()
    };
    node.publish(channel, req)
        .await
        .unwrap()
        .position
        .map_or(0, |p| p.offset)
}

/// The offsets of the next `n` publications pushed on `channel`.
async fn offsets(c: &mut TestClient, channel: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = c.push().await;
        if p["channel"] == channel && p.get("pub").is_some() {
            out.push(p["pub"]["offset"].as_u64().unwrap_or(0));
        }
    }
    out
}

fn counts(node: &Node) -> (u64, u64, u64) {
    let c = &node.hub().counts;
    (
        c.clients.load(Ordering::Relaxed),
        c.subscriptions.load(Ordering::Relaxed),
        c.channels.load(Ordering::Relaxed),
    )
}

/// Waits (in virtual time) until the node's counts are `want`.
async fn settled(node: &Node, want: (u64, u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts(node) != want {
        assert!(
            Instant::now() < deadline,
            "counts {:?}, want {want:?}",
            counts(node)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_command_must_be_connect() {
    let (node, _) = testing::node(config());
    let mut c = TestClient::connect(&node);
    c.send("subscribe", json!({"channel": "a"})).await;
    assert_eq!(c.closed().await, Some((3501, "bad request".into())));
    let mut c = user(&node, "u").await;
    c.send("connect", json!({"token": token("u", None)})).await;
    assert_eq!(
        c.closed().await,
        Some((3501, "bad request".into())),
        "connect twice"
    );
}

#[tokio::test(start_paused = true)]
async fn no_connect_within_the_stale_delay_closes_with_3502() {
    let (node, _) = testing::node(config());
    let started = Instant::now();
    let mut c = TestClient::connect(&node);
    assert_eq!(c.closed().await, Some((3502, "stale".into())));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn pings_come_every_interval_and_a_missing_pong_closes_with_3012() {
    let (node, _) = testing::node(config());
    let mut c = user(&node, "u").await;
    c.auto_pong = false;
    let connected_at = Instant::now();
    assert_eq!(c.next().await, json!({}), "a ping");
    let first = connected_at.elapsed();
    // The first ping comes in the second half of the first interval (spreading a node's pings).
    assert!(
        first >= Duration::from_millis(12_500) && first <= Duration::from_secs(25),
        "{first:?}"
    );
    c.send_raw("{}").await;
    let pinged = Instant::now();
    assert_eq!(c.next().await, json!({}), "the next ping");
    let gap = pinged.elapsed();
    assert!(
        gap >= Duration::from_secs(24) && gap <= Duration::from_secs(26),
        "{gap:?}"
    );
    // Not answered: 3012 after the pong timeout (8 s).
    let unanswered = Instant::now();
    assert_eq!(c.closed().await, Some((3012, "no pong".into())));
    let waited = unanswered.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(9),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unasked_pong_closes_with_3501() {
    let (node, _) = testing::node(config());
    let mut c = user(&node, "u").await;
    c.send_raw("{}").await;
    assert_eq!(c.closed().await, Some((3501, "bad request".into())));
}

#[tokio::test(start_paused = true)]
async fn an_expiring_connection_closes_with_3005_unless_refreshed_in_time() {
    // No pongs asked: these clients do not read while time passes.
    let mut cfg = config();
    cfg.client.pong_timeout = Duration::ZERO;
    let (node, _) = testing::node(cfg);
    let (mut a, r) = connected(&node, &token("a", Some(60))).await;
    assert_eq!(r["connect"]["expires"], true, "{r}");
    assert_eq!(r["connect"]["ttl"], 60, "{r}");
    let (mut b, _) = connected(&node, &token("b", Some(60))).await;
    // The connect result said `pong: false`: a client then sends no pongs.
    a.auto_pong = false;
    b.auto_pong = false;
    let started = Instant::now();
    // b refreshes after 50 s with a token valid for 120 s more.
    tokio::time::sleep(Duration::from_secs(50)).await;
    let r = b
        .call("refresh", json!({"token": token("b", Some(120))}))
        .await;
    assert_eq!(r["refresh"]["ttl"], 120, "{r}");
    // a is closed at expiry + the grace (25 s).
    assert_eq!(a.closed().await, Some((3005, "connection expired".into())));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(85) && waited < Duration::from_secs(87),
        "{waited:?}"
    );
    // b is still served, and closed at its new expiry + grace.
    let r = b.call("presence_stats", json!({"channel": "a"})).await;
    assert_eq!(code(&r), 108, "served (presence is off here): {r}");
    assert_eq!(b.closed().await, Some((3005, "connection expired".into())));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(50 + 120 + 25) && waited < Duration::from_secs(197),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_subscription_token_unsubscribes_with_2501() {
    let (node, _) = testing::node(config());
    let mut c = user(&node, "u").await;
    let sub_tok =
        json!({"sub": "u", "channel": "$secret", "exp": holdfast_core::time::unix_secs() + 30});
    let r = c
        .call(
            "subscribe",
            json!({"channel": "$secret", "token": sub_tok.to_string()}),
        )
        .await;
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    assert_eq!(r["subscribe"]["ttl"], 30, "{r}");
    let started = Instant::now();
    let p = c.push().await;
    assert_eq!(p["channel"], "$secret");
    assert_eq!(p["unsubscribe"]["code"], 2501, "{p}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(55) && waited < Duration::from_secs(57),
        "expiry (30 s) + grace (25 s): {waited:?}"
    );
    assert_eq!(counts(&node), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_busy_connection_still_unsubscribes_an_expired_subscription() {
    let (node, _) = testing::node(config());
    // One frame in flight: the writer waits for the client to read, and a publication arrives
    // each time, so a message is always queued when the writer looks at its notifications.
    let mut c = TestClient::connect_with(&node, 1);
    let r = c
        .call("connect", json!({ "token": token("u", None) }))
        .await;
    assert!(r["connect"].is_object(), "{r}");
    let sub_tok =
        json!({"sub": "u", "channel": "$busy", "exp": holdfast_core::time::unix_secs() + 30});
    let r = c
        .call(
            "subscribe",
            json!({"channel": "$busy", "token": sub_tok.to_string()}),
        )
        .await;
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    // One frame waits in the channel and the writer waits to put the next one: from here on
    // the writer goes from one write straight to the next.
    publish(&node, "$busy", 0).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    publish(&node, "$busy", 1).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    let started = Instant::now();
    for n in 2..1200 {
        let m = c.next().await;
        publish(&node, "$busy", n).await;
        tokio::time::advance(Duration::from_millis(100)).await;
        if m["push"]["unsubscribe"].is_object() {
            assert_eq!(m["push"]["unsubscribe"]["code"], 2501, "{m}");
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(55) && waited < Duration::from_secs(57),
                "expiry (30 s) + grace (25 s): {waited:?}"
            );
            return;
        }
    }
    panic!("the expired subscription was not unsubscribed while publications kept coming");
}

#[tokio::test(start_paused = true)]
async fn recovery_merges_publications_that_arrive_during_the_history_read() {
    let (node, engine) = testing::node(config());
    let mut c = user(&node, "u").await;
    let r = c.call("subscribe", json!({"channel": "rec:m"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    c.call("unsubscribe", json!({"channel": "rec:m"})).await;
    for n in 1..=3 {
        publish(&node, "rec:m", n).await;
    }
    // Two publications land before the read (in the read and the live buffer), two after it.
    let hook_node = node.clone();
    engine.on_history(move |ch, stage| {
        if ch != "rec:m" {
            return None;
        }
        let node = hook_node.clone();
        Some(Box::pin(async move {
            let range = if stage == Stage::Before { 4..=5 } else { 6..=7 };
            for n in range {
                publish(&node, "rec:m", n).await;
            }
        }))
    });
    let r = c
        .call(
            "subscribe",
            json!({"channel": "rec:m", "recover": true, "offset": 1, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], true, "{r}");
    let recovered: Vec<u64> = s["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(recovered, [2, 3, 4, 5]);
    assert_eq!(
        offsets(&mut c, "rec:m", 2).await,
        [6, 7],
        "live ones follow, no duplicate"
    );
    engine.on_history(|_, _| None);
    publish(&node, "rec:m", 8).await;
    assert_eq!(offsets(&mut c, "rec:m", 1).await, [8]);
}

/// A position-only history read.
const TOP: holdfast_core::engine::HistoryQuery = holdfast_core::engine::HistoryQuery {
    since: None,
    limit: Some(0),
    reverse: false,
    meta_ttl: Duration::from_secs(60),
};

#[tokio::test(start_paused = true)]
async fn a_position_check_during_a_subscribe_is_judged_when_it_goes_live() {
    let (node, engine) = testing::node(config());
    publish(&node, "rec:chk", 1).await;
    // After the subscribe's history read, before it goes live, the broker vouches for a top the
    // reply does not reach (a reconnect found publications that never arrived).
    let hook_engine = engine.clone();
    engine.on_history(move |ch, stage| {
        if ch != "rec:chk" || stage != Stage::After {
            return None;
        }
        let engine = hook_engine.clone();
        Some(Box::pin(async move {
            let top = engine.inner.history("rec:chk", &TOP).await.unwrap().top;
            engine.check_position(
                "rec:chk",
                &holdfast_core::engine::StreamTop {
                    offset: top.offset + 3,
                    epoch: top.epoch,
                },
            );
        }))
    });
    let mut c = user(&node, "u").await;
    let r = c.call("subscribe", json!({"channel": "rec:chk"})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    let m = tokio::time::timeout(Duration::from_secs(30), c.next())
        .await
        .expect("told to resubscribe at once, not at the next publication");
    assert_eq!(m["push"]["unsubscribe"]["code"], 2500, "{m}");
    // A check whose top the buffered deliveries reach is no gap: publications that landed
    // after the read (buffered) and then a check vouching for them.
    let (hook_engine, hook_node) = (engine.clone(), node.clone());
    engine.on_history(move |ch, stage| {
        if ch != "rec:chk" || stage != Stage::After {
            return None;
        }
        let (engine, node) = (hook_engine.clone(), hook_node.clone());
        Some(Box::pin(async move {
            for n in 10..12 {
                publish(&node, "rec:chk", n).await;
            }
            let top = engine.inner.history("rec:chk", &TOP).await.unwrap().top;
            engine.check_position("rec:chk", &top);
        }))
    });
    let r = c.call("subscribe", json!({"channel": "rec:chk"})).await;
    let from = r["subscribe"]["offset"].as_u64().unwrap();
    assert_eq!(
        offsets(&mut c, "rec:chk", 2).await,
        [from + 1, from + 2],
        "the buffered ones follow the reply: {r}"
    );
    publish(&node, "rec:chk", 12).await;
    let p = tokio::time::timeout(Duration::from_secs(30), c.push())
        .await
        .expect("a push");
    assert_eq!(
        p["pub"]["offset"],
        from + 3,
        "still live, not unsubscribed: {p}"
    );
    c.call("unsubscribe", json!({"channel": "rec:chk"})).await;
    // A check the reply does reach changes nothing.
    engine.on_history(|_, _| None);
    let r = c.call("subscribe", json!({"channel": "rec:chk"})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    let top = r["subscribe"]["offset"].as_u64().unwrap();
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    engine.check_position(
        "rec:chk",
        &holdfast_core::engine::StreamTop {
            offset: top,
            epoch: epoch.into(),
        },
    );
    publish(&node, "rec:chk", 2).await;
    assert_eq!(offsets(&mut c, "rec:chk", 1).await, [top + 1]);
}

#[tokio::test(start_paused = true)]
async fn a_position_out_of_the_window_is_told_or_refused_with_the_flag() {
    let mut cfg = config();
    cfg.channel.namespaces.push(ChannelOptions {
        history_size: 2,
        force_recovery: true,
        ..history("small")
    });
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await;
    let r = c.call("subscribe", json!({"channel": "small:a"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    c.call("unsubscribe", json!({"channel": "small:a"})).await;
    for n in 1..=5 {
        publish(&node, "small:a", n).await;
    }
    let r = c
        .call(
            "subscribe",
            json!({"channel": "small:a", "recover": true, "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert!(
        r["subscribe"].get("recovered").is_none(),
        "told recovered: false: {r}"
    );
    assert_eq!(r["subscribe"]["offset"], 5);
    c.call("unsubscribe", json!({"channel": "small:a"})).await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "small:a", "recover": true, "offset": 0, "epoch": epoch, "flag": 2}),
        )
        .await;
    assert_eq!(code(&r), 112, "{r}");
    assert_eq!(counts(&node), (1, 0, 0), "the refused one left nothing");
}

#[tokio::test(start_paused = true)]
async fn a_gap_unsubscribes_a_client_side_subscription_with_2500() {
    let (node, engine) = testing::node(config());
    let mut c = user(&node, "u").await;
    let r = c.call("subscribe", json!({"channel": "pos:a"})).await;
    assert_eq!(r["subscribe"]["positioned"], true, "{r}");
    engine.lose("pos:a", 3);
    for n in 1..=4 {
        publish(&node, "pos:a", n).await;
    }
    assert_eq!(offsets(&mut c, "pos:a", 2).await, [1, 2]);
    let p = c.push().await;
    assert_eq!(p["unsubscribe"]["code"], 2500, "{p}");
    settled(&node, (1, 0, 0)).await;
    // The client recovers what it missed.
    let r = c.call("subscribe", json!({"channel": "pos:a"})).await;
    assert_eq!(r["subscribe"]["offset"], 4, "{r}");
}

#[tokio::test(start_paused = true)]
async fn a_gap_in_a_server_side_subscription_closes_with_3010() {
    let (node, engine) = testing::node(config());
    let tok = json!({"sub": "u", "channels": ["pos:s"]}).to_string();
    let (mut c, _) = connected(&node, &tok).await;
    engine.lose("pos:s", 2);
    for n in 1..=3 {
        publish(&node, "pos:s", n).await;
    }
    assert_eq!(offsets(&mut c, "pos:s", 1).await, [1]);
    assert_eq!(c.closed().await, Some((3010, "insufficient state".into())));
    settled(&node, (0, 0, 0)).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_is_closed_with_3008_and_others_go_on() {
    let mut cfg = config();
    cfg.client.queue_max_size = 64 * 1024;
    let (node, _) = testing::node(cfg);
    // One frame in flight at most: the rest waits in the node's outbox.
    let mut slow = TestClient::connect_with(&node, 1);
    let r = slow
        .call("connect", json!({"token": token("slow", None)}))
        .await;
    assert!(r["connect"].is_object());
    slow.call("subscribe", json!({"channel": "feed"})).await;
    let mut good = user(&node, "good").await;
    good.call("subscribe", json!({"channel": "feed"})).await;
    for n in 0..400 {
        let req = PublishRequest {
            data: json!({ "n": n, "pad": "x".repeat(250) }).to_string().into(),
            ..Default::default()
        };
        node.publish("feed", req).await.unwrap();
        // Writers run between publications, as they do on a busy node.
        tokio::task::yield_now().await;
    }
    assert_eq!(
        offsets(&mut good, "feed", 400).await.len(),
        400,
        "the reader gets everything"
    );
    assert_eq!(slow.closed().await, Some((3008, "slow".into())));
    settled(&node, (1, 1, 1)).await;
}

#[tokio::test(start_paused = true)]
async fn channel_limits_106_for_clients_and_3505_for_server_side_subscriptions() {
    let mut cfg = config();
    cfg.client.channel_limit = 2;
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await;
    c.call("subscribe", json!({"channel": "a"})).await;
    c.call("subscribe", json!({"channel": "b"})).await;
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "c"})).await),
        106
    );
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "a"})).await),
        105
    );
    let mut d = TestClient::connect(&node);
    let tok = json!({"sub": "v", "channels": ["x", "y", "z"]}).to_string();
    d.send("connect", json!({ "token": tok })).await;
    assert_eq!(d.closed().await, Some((3505, "channel limit".into())));
    settled(&node, (1, 2, 2)).await;
}

#[tokio::test(start_paused = true)]
async fn every_refusal_path_leaves_nothing_attached() {
    let mut cfg = config();
    cfg.client.user_connection_limit = 1;
    cfg.client.subscribe_to_user_personal_channel.enabled = true;
    cfg.client
        .subscribe_to_user_personal_channel
        .personal_channel_namespace = "personal".into();
    let (node, engine) = testing::node(cfg);
    // Connect: an unknown namespace among the token's channels.
    let mut c = TestClient::connect(&node);
    let tok = json!({"sub": "u", "channels": ["rec:a", "nope:x"]}).to_string();
    assert_eq!(code(&c.call("connect", json!({ "token": tok })).await), 102);
    c.hang_up();
    settled(&node, (0, 0, 0)).await;
    // Connect: the engine fails on a server-side channel after others attached.
    engine.fail(Some("pos:"));
    let mut c = TestClient::connect(&node);
    let tok = json!({"sub": "u", "channels": ["rec:a", "pos:z"]}).to_string();
    assert_eq!(code(&c.call("connect", json!({ "token": tok })).await), 100);
    c.hang_up();
    settled(&node, (0, 0, 0)).await;
    // Subscribe: the engine fails; a foreign personal channel; a refused recovery.
    let mut c = user(&node, "u").await;
    settled(&node, (1, 1, 1)).await;
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "pos:y"})).await),
        100
    );
    engine.fail(None);
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "personal:#v"})).await),
        103
    );
    let r = c
        .call(
            "subscribe",
            json!({"channel": "rec:r", "recover": true, "offset": 9, "epoch": "xxxxxxxx", "flag": 2}),
        )
        .await;
    assert_eq!(code(&r), 112);
    settled(&node, (1, 1, 1)).await;
    // Connect: over the user's connection limit.
    let mut d = TestClient::connect(&node);
    d.send("connect", json!({"token": token("u", None)})).await;
    assert_eq!(d.closed().await, Some((3504, "connection limit".into())));
    settled(&node, (1, 1, 1)).await;
    c.hang_up();
    settled(&node, (0, 0, 0)).await;
    assert!(engine.subscribed().is_empty(), "{:?}", engine.subscribed());
}

#[tokio::test(start_paused = true)]
async fn a_command_flood_gets_111_then_3013() {
    let mut cfg = config();
    cfg.client.command_rate_limit = 10;
    cfg.client.command_burst = 10;
    cfg.client.command_excess_disconnect = 5;
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await; // connect took one token
    let frame: Vec<String> = (100..109)
        .map(|id| format!(r#"{{"id":{id},"presence_stats":{{"channel":"x"}}}}"#))
        .collect();
    c.send_raw(&frame.join("\n")).await;
    for id in 100..109 {
        assert_eq!(code(&c.reply(id).await), 108, "within the burst: served");
    }
    let r = c.call("presence_stats", json!({"channel": "x"})).await;
    assert_eq!(code(&r), 111, "over the rate: {r}");
    // One second refills ten tokens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        code(&c.call("presence_stats", json!({"channel": "x"})).await),
        108
    );
    let flood: Vec<String> = (200..230)
        .map(|id| format!(r#"{{"id":{id},"presence_stats":{{"channel":"x"}}}}"#))
        .collect();
    c.send_raw(&flood.join("\n")).await;
    assert_eq!(c.closed().await, Some((3013, "too many requests".into())));
}

#[tokio::test(start_paused = true)]
async fn a_delivery_on_a_cursor_channel_is_confirmed_within_the_confirm_delay() {
    let mut cfg = config();
    cfg.client.subscribe_to_user_personal_channel.enabled = true;
    cfg.client
        .subscribe_to_user_personal_channel
        .personal_channel_namespace = "personal".into();
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await;
    c.auto_pong = false;
    publish(&node, "personal:#u", 1).await;
    assert_eq!(offsets(&mut c, "personal:#u", 1).await, [1]);
    let delivered = Instant::now();
    assert_eq!(c.next().await, json!({}), "a ping asks for confirmation");
    assert_eq!(delivered.elapsed(), Duration::from_millis(500));
    c.send_raw("{}").await;
    c.call("presence_stats", json!({"channel": "x"})).await;
    let cursor = node.delivery_cursor("u", "personal:#u").await.unwrap();
    assert_eq!(cursor.map(|p| p.offset), Some(1));
    // The next device (no position) starts after it.
    let (_d, r) = connected(&node, &token("u", None)).await;
    let sub = &r["connect"]["subs"]["personal:#u"];
    assert!(sub.get("publications").is_none(), "{r}");
}

#[tokio::test(start_paused = true)]
async fn a_positionless_connect_starts_at_the_top_unless_the_namespace_keeps_cursors() {
    let (node, _) = testing::node(config());
    for n in 1..=3 {
        publish(&node, "rec:s", n).await;
        publish(&node, "personal:s", n).await;
    }
    let tok = json!({"sub": "u", "channels": ["rec:s", "personal:s"]}).to_string();
    let (_c, r) = connected(&node, &tok).await;
    let subs = &r["connect"]["subs"];
    assert!(
        subs["rec:s"].get("publications").is_none(),
        "as on Centrifugo: {r}"
    );
    assert_eq!(subs["rec:s"]["offset"], 3);
    assert_eq!(
        subs["personal:s"]["publications"].as_array().map(Vec::len),
        Some(3),
        "delivery_cursor: from the stream start: {r}"
    );
}

#[tokio::test(start_paused = true)]
async fn server_api_subscribe_reaches_the_users_connections() {
    let (node, _) = testing::node(config());
    let mut c = user(&node, "u").await;
    publish(&node, "rec:api", 1).await;
    node.subscribe_user(
        "u",
        None,
        holdfast_core::session::ServerSubscribe {
            channel: "rec:api".into(),
            recover_since: Some((0, String::new())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let p = c.push().await;
    assert!(p["subscribe"].is_object(), "{p}");
    assert_eq!(p["channel"], "rec:api");
    publish(&node, "rec:api", 2).await;
    assert_eq!(
        offsets(&mut c, "rec:api", 2).await,
        [1, 2],
        "recovered from the stream start, then live"
    );
    assert!(
        node.hub().has_subscribers("rec:api"),
        "the server-side subscription is live"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_every_connection_with_3001() {
    let (node, engine) = testing::node(config());
    let mut a = user(&node, "a").await;
    let mut b = user(&node, "b").await;
    // Open but not connected yet: not in the hub, closed through the shutdown token.
    let mut c = TestClient::connect(&node);
    a.call("subscribe", json!({"channel": "rec:z"})).await;
    let stop = node.clone();
    let shutdown = tokio::spawn(async move { stop.shutdown(Duration::from_secs(5)).await });
    assert_eq!(a.closed().await, Some((3001, "shutdown".into())));
    assert_eq!(b.closed().await, Some((3001, "shutdown".into())));
    assert_eq!(c.closed().await, Some((3001, "shutdown".into())));
    a.hang_up();
    b.hang_up();
    c.hang_up();
    shutdown.await.unwrap();
    assert_eq!(counts(&node), (0, 0, 0));
    assert!(
        engine
            .calls()
            .contains(&EngineCall::Unsubscribe("rec:z".into()))
    );
}

fn delta_config() -> NodeConfig {
    let mut c = config();
    c.channel.namespaces.push(ChannelOptions {
        force_recovery: true,
        allowed_delta_types: vec!["fossil".into()],
        ..history("delta")
    });
    c.channel.namespaces.push(ChannelOptions {
        force_recovery: true,
        allow_tags_filter: true,
        ..history("tags")
    });
    c
}

/// The n-th answer of a stream: long enough that a delta pays, a few words more each time.
fn answer(n: u64) -> Value {
    let words: Vec<String> = (1..=n).map(|i| format!("wörd{i}")).collect();
    json!({ "text": format!("An answer streamed whole, each time a bit longer: {}", words.join(" ")) })
}

async fn publish_answer(node: &Node, channel: &str, n: u64) {
    let req = PublishRequest {
        data: answer(n).to_string().into(),
        delta: true,
        ..Default::default()
    };
    node.publish(channel, req).await.unwrap();
}

/// What a client's delta decoder does with one publication: returns the payload and keeps it as
/// the base (JSON: `data` is a string, the payload or a fossil delta of the base).
fn decode(base: &mut Vec<u8>, p: &Value) -> Value {
    let data = p["data"]
        .as_str()
        .expect("delta subscribers get data as a string");
    let bytes = if p["delta"] == true {
        holdfast_core::fossil::apply(base, data.as_bytes()).expect("a delta of the base")
    } else {
        data.as_bytes().to_vec()
    };
    *base = bytes;
    serde_json::from_slice(base).unwrap()
}

#[tokio::test(start_paused = true)]
async fn delta_chains_survive_recovery_with_publications_during_the_read() {
    let (node, engine) = testing::node(delta_config());
    let mut c = user(&node, "u").await;
    let r = c.call("subscribe", json!({"channel": "delta:a"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    c.call("unsubscribe", json!({"channel": "delta:a"})).await;
    for n in 1..=3 {
        publish_answer(&node, "delta:a", n).await;
    }
    // Two publications land before the history read, two after it (buffered, sent after the
    // reply): the chain must stay exact through both.
    let hook_node = node.clone();
    engine.on_history(move |ch, stage| {
        if ch != "delta:a" {
            return None;
        }
        let node = hook_node.clone();
        Some(Box::pin(async move {
            let range = if stage == Stage::Before { 4..=5 } else { 6..=7 };
            for n in range {
                publish_answer(&node, "delta:a", n).await;
            }
        }))
    });
    let r = c
        .call(
            "subscribe",
            json!({"channel": "delta:a", "recover": true, "offset": 1, "epoch": epoch, "delta": "fossil"}),
        )
        .await;
    engine.on_history(|_, _| None);
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], true, "{r}");
    assert_eq!(s["delta"], true, "{r}");
    let mut base = Vec::new();
    let recovered = s["publications"].as_array().unwrap();
    assert_eq!(recovered.len(), 4, "{r}");
    assert!(
        recovered[0].get("delta").is_none(),
        "the chain starts in full"
    );
    for (i, p) in recovered.iter().enumerate() {
        assert_eq!(decode(&mut base, p), answer(i as u64 + 2));
        if i > 0 {
            assert_eq!(
                p["delta"], true,
                "recovered publications after the first are deltas"
            );
        }
    }
    for n in 6..=7 {
        let p = c.push().await;
        assert_eq!(decode(&mut base, &p["pub"]), answer(n));
    }
    // A second subscriber joins: its first publication is in full, the first one's a delta.
    let mut d = user(&node, "v").await;
    let r = d
        .call(
            "subscribe",
            json!({"channel": "delta:a", "delta": "fossil"}),
        )
        .await;
    assert_eq!(r["subscribe"]["delta"], true);
    let mut d_base = Vec::new();
    for n in 8..=10 {
        publish_answer(&node, "delta:a", n).await;
        let p = c.push().await;
        assert_eq!(p["pub"]["delta"], true, "{p}");
        assert_eq!(decode(&mut base, &p["pub"]), answer(n));
        let q = d.push().await;
        assert_eq!(q["pub"].get("delta").is_some(), n > 8, "{q}");
        assert_eq!(decode(&mut d_base, &q["pub"]), answer(n));
    }
}

#[tokio::test(start_paused = true)]
async fn a_filtered_subscription_skips_without_a_gap_and_recovers_filtered() {
    let (node, _) = testing::node(delta_config());
    let mut c = user(&node, "u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "tags:t", "tf": {"key": "k", "cmp": "in", "vals": ["a", "c"]}}),
        )
        .await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    let tagged = |n: u64, k: &str| PublishRequest {
        data: json!({ "n": n }).to_string().into(),
        tags: Some(std::sync::Arc::new([("k".to_owned(), k.to_owned())].into())),
        ..Default::default()
    };
    for (n, k) in [(1, "a"), (2, "b"), (3, "c"), (4, "b")] {
        node.publish("tags:t", tagged(n, k)).await.unwrap();
    }
    node.publish("tags:t", tagged(5, "a")).await.unwrap();
    // Positioned: 2 and 4 were skipped, not lost; no 2500.
    let got: Vec<u64> = [c.push().await, c.push().await, c.push().await]
        .iter()
        .map(|p| p["pub"]["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [1, 3, 5]);
    c.call("unsubscribe", json!({"channel": "tags:t"})).await;
    for (n, k) in [(6, "b"), (7, "c"), (8, "b")] {
        node.publish("tags:t", tagged(n, k)).await.unwrap();
    }
    let r = c
        .call(
            "subscribe",
            json!({"channel": "tags:t", "recover": true, "offset": 5, "epoch": epoch,
                   "tf": {"key": "k", "cmp": "in", "vals": ["a", "c"]}}),
        )
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let recovered: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(recovered, [7], "only what the filter passes is recovered");
    assert_eq!(r["subscribe"]["offset"], 5);
    node.publish("tags:t", tagged(9, "a")).await.unwrap();
    assert_eq!(c.push().await["pub"]["offset"], 9);
}

/// `client.write_delay`: what arrives while the writer waits goes out in one frame, the first
/// message no later than the delay; `client.max_messages_in_frame` caps a frame.
#[tokio::test(start_paused = true)]
async fn write_delay_joins_messages_into_one_frame_within_the_delay() {
    async fn five_spread(node: &Node, c: &mut TestClient) -> (u64, Duration) {
        let before = c.frames;
        let t0 = Instant::now();
        for n in 0..5 {
            publish(node, "a", n).await;
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        assert_eq!(offsets(c, "a", 5).await.len(), 5);
        (c.frames - before, t0.elapsed())
    }
    // Off (the default): one frame per publication, each at once.
    let (node, _) = testing::node(config());
    let mut c = user(&node, "u").await;
    c.call("subscribe", json!({"channel": "a"})).await;
    let (frames, _) = five_spread(&node, &mut c).await;
    assert_eq!(frames, 5);

    let mut cfg = config();
    cfg.client.write_delay = Duration::from_millis(50);
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await;
    c.call("subscribe", json!({"channel": "a"})).await;
    let (frames, took) = five_spread(&node, &mut c).await;
    assert_eq!(frames, 1, "20 ms of publications in one frame");
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(60),
        "{took:?}"
    );

    let mut cfg = config();
    cfg.client.write_delay = Duration::from_millis(50);
    cfg.client.max_messages_in_frame = 2;
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await;
    c.call("subscribe", json!({"channel": "a"})).await;
    let (frames, _) = five_spread(&node, &mut c).await;
    assert_eq!(frames, 3, "at most two messages per frame");
}
