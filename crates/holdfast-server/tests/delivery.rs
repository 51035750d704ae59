//! Delivery guarantees: recovery, positioning, slow consumers, idempotency, batching, shutdown.

#![allow(clippy::unwrap_used)]

mod common;
use common::engines::{FaultyEngine, Stage};
use common::*;
use serde_json::{Value, json};

const CFG: &str = r#"
[channel.without_namespace]
allow_subscribe_for_client = true
[[channel.namespaces]]
name = "rec"
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
allow_history_for_subscriber = true
[[channel.namespaces]]
name = "small"
history_size = 2
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
[[channel.namespaces]]
name = "gap"
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
"#;

fn pub_offsets(v: &Value) -> Vec<u64> {
    v.as_array().map_or_else(Vec::new, |a| {
        a.iter().map(|p| p["offset"].as_u64().unwrap()).collect()
    })
}

/// Collects `n` publication pushes of `channel`, returning their offsets.
async fn pubs(c: &mut TestClient, channel: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = c.push().await;
        if p["channel"] == channel && p.get("pub").is_some() {
            out.push(p["pub"]["offset"].as_u64().unwrap_or(0));
        }
    }
    out
}

#[tokio::test]
async fn recovery_after_reconnect() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "rec:a"})).await;
    let s = &r["subscribe"];
    assert_eq!(
        (s["recoverable"].clone(), s["positioned"].clone()),
        (json!(true), json!(true))
    );
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish(&srv, "rec:a", json!({"n": n})).await;
    }
    assert_eq!(pubs(&mut c, "rec:a", 3).await, [1, 2, 3]);
    drop(c);
    for n in 4..=6 {
        publish(&srv, "rec:a", json!({"n": n})).await;
    }
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "rec:a", "recover": true, "offset": 3, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], true, "{r}");
    assert_eq!(s["was_recovering"], true);
    assert_eq!(
        s["offset"], 3,
        "offset is the requested position on success"
    );
    assert_eq!(s["epoch"], epoch.as_str());
    assert_eq!(pub_offsets(&s["publications"]), [4, 5, 6]);
    assert_eq!(s["publications"][0]["data"], json!({"n": 4}));
    publish(&srv, "rec:a", json!({"n": 7})).await;
    assert_eq!(
        pubs(&mut c, "rec:a", 1).await,
        [7],
        "live publications continue after the reply"
    );
    // At the top already: recovered with nothing to deliver.
    let (mut d, _) = srv.connected("u").await;
    let r = d
        .call(
            "subscribe",
            json!({"channel": "rec:a", "recover": true, "offset": 7, "epoch": epoch}),
        )
        .await;
    assert_eq!(r["subscribe"]["recovered"], true);
    assert!(r["subscribe"].get("publications").is_none());
    srv.stop().await;
}

#[tokio::test]
async fn unrecoverable_positions_are_told() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "small:a"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    drop(c);
    for n in 1..=4 {
        publish(&srv, "small:a", json!({"n": n})).await;
    }
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "small:a", "recover": true, "offset": 0, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert!(
        s.get("recovered").is_none(),
        "history window was exceeded: not recovered: {r}"
    );
    assert_eq!(s["was_recovering"], true);
    assert_eq!(s["offset"], 4, "the current top is given");
    assert!(s.get("publications").is_none(), "never a partial recovery");
    // Foreign epoch.
    let (mut d, _) = srv.connected("u").await;
    let r = d
        .call(
            "subscribe",
            json!({"channel": "rec:b", "recover": true, "offset": 1, "epoch": "xxxxxxxx"}),
        )
        .await;
    assert!(r["subscribe"].get("recovered").is_none(), "{r}");
    // Flag 2: reject instead of recovered:false.
    let r = d.call("subscribe", json!({"channel": "small:b", "recover": true, "offset": 5, "epoch": "xxxxxxxx", "flag": 2})).await;
    assert_eq!(r["error"]["code"], 112, "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn publications_during_recovery_are_merged_without_gap_or_duplicate() {
    let engine = FaultyEngine::new("none", vec![]);
    let srv = TestServer::start_with_engine(config_from(CFG), engine.clone()).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "rec:m"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    drop(c);
    for n in 1..=3 {
        publish(&srv, "rec:m", json!({"n": n})).await;
    }
    // While the resubscribe reads history: two publications land before the read (they are in
    // both the read and the live buffer) and two after it (live only).
    let node = srv.state.node.clone();
    engine.set_hook(move |ch, stage| {
        if ch != "rec:m" {
            return None;
        }
        let node = node.clone();
        Some(Box::pin(async move {
            let range = if stage == Stage::Before { 4..=5 } else { 6..=7 };
            for n in range {
                let req = holdfast_core::node::PublishRequest {
                    data: serde_json::to_vec(&json!({"n": n})).unwrap().into(),
                    ..Default::default()
                };
                node.publish("rec:m", req).await.unwrap();
            }
        }))
    });
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "rec:m", "recover": true, "offset": 1, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["recovered"], true, "{r}");
    assert_eq!(pub_offsets(&s["publications"]), [2, 3, 4, 5]);
    assert_eq!(
        pubs(&mut c, "rec:m", 2).await,
        [6, 7],
        "live ones follow, without the duplicates 4 and 5"
    );
    publish(&srv, "rec:m", json!({"n": 8})).await;
    assert_eq!(pubs(&mut c, "rec:m", 1).await, [8]);
    srv.stop().await;
}

#[tokio::test]
async fn positioning_gap_unsubscribes_client_side_with_2500() {
    let engine = FaultyEngine::new("gap:", vec![3]);
    let srv = TestServer::start_with_engine(config_from(CFG), engine).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "gap:a"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=4 {
        publish(&srv, "gap:a", json!({"n": n})).await;
    }
    assert_eq!(pubs(&mut c, "gap:a", 2).await, [1, 2]);
    let p = c.push().await;
    assert_eq!(
        p,
        json!({"channel": "gap:a", "unsubscribe": {"code": 2500, "reason": "insufficient state"}}),
        "offset 3 was lost in transit: the client is told"
    );
    // The client resubscribes from its position and recovers what was lost.
    let r = c
        .call(
            "subscribe",
            json!({"channel": "gap:a", "recover": true, "offset": 2, "epoch": epoch}),
        )
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(pub_offsets(&r["subscribe"]["publications"]), [3, 4]);
    srv.stop().await;
}

#[tokio::test]
async fn positioning_gap_on_server_side_subscription_disconnects_with_3010() {
    let engine = FaultyEngine::new("gap:", vec![2]);
    let srv = TestServer::start_with_engine(config_from(CFG), engine).await;
    let mut c = srv.client().await;
    let r = c
        .connect_token(&token("u", None, json!({"channels": ["gap:s"]})))
        .await;
    assert_eq!(r["connect"]["subs"]["gap:s"]["positioned"], true);
    for n in 1..=3 {
        publish(&srv, "gap:s", json!({"n": n})).await;
    }
    assert_eq!(pubs(&mut c, "gap:s", 1).await, [1]);
    assert_eq!(
        c.closed().await,
        Closed::Code(3010, "insufficient state".into())
    );
    srv.stop().await;
}

#[tokio::test]
async fn slow_consumer_is_disconnected_while_others_keep_receiving() {
    let srv = TestServer::start(config_from(&format!(
        "{CFG}\n[client]\nqueue_max_size = 65536\n"
    )))
    .await;
    let (mut slow, rs) = srv.connected("slow").await;
    let slow_id = rs["connect"]["client"].as_str().unwrap().to_owned();
    let (mut fast, _) = srv.connected("fast").await;
    slow.call("subscribe", json!({"channel": "firehose"})).await;
    fast.call("subscribe", json!({"channel": "firehose"})).await;
    let payload = "x".repeat(16 * 1024);
    let node = srv.state.node.clone();
    // The fast reader counts everything it receives.
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let p = fast.push().await;
            if p["pub"]["data"]["last"] == true {
                return n;
            }
            n += 1;
        }
    });
    // `slow` never reads. Publish until the server gives up on it (bounded).
    let mut sent = 0u64;
    for _ in 0..20_000 {
        publish(&srv, "firehose", json!({"p": payload})).await;
        sent += 1;
        tokio::task::yield_now().await;
        if node
            .hub()
            .client(&slow_id)
            .is_none_or(|c| c.closing_reason().is_some())
        {
            break;
        }
    }
    let reason = node.hub().client(&slow_id).and_then(|c| c.closing_reason());
    assert!(
        reason.as_ref().is_none_or(|r| r.code == 3008),
        "closed for being slow, got {reason:?}"
    );
    publish(&srv, "firehose", json!({"last": true})).await;
    assert_eq!(
        reader.await.unwrap(),
        sent,
        "the fast subscriber got every publication"
    );
    assert_eq!(slow.closed().await, Closed::Code(3008, "slow".into()));
    srv.stop().await;
}

#[tokio::test]
async fn idempotent_publish_is_delivered_once() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (mut c, _) = srv.connected("u").await;
    c.call("subscribe", json!({"channel": "rec:i"})).await;
    let req = || holdfast_core::node::PublishRequest {
        data: bytes::Bytes::from_static(b"{\"once\":true}"),
        idempotency_key: Some("key-1".into()),
        ..Default::default()
    };
    let a = srv.state.node.publish("rec:i", req()).await.unwrap();
    let b = srv.state.node.publish("rec:i", req()).await.unwrap();
    assert_eq!(a.position, b.position);
    assert!(b.suppressed);
    publish(&srv, "rec:i", json!({"after": true})).await;
    let p1 = c.push().await;
    let p2 = c.push().await;
    assert_eq!(
        (p1["pub"]["offset"].clone(), p2["pub"]["offset"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(
        p2["pub"]["data"],
        json!({"after": true}),
        "the repeat was not delivered"
    );
    srv.stop().await;
}

#[tokio::test]
async fn batched_frames_both_ways() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (mut c, _) = srv.connected("u").await;
    let frame = "{\"id\":10,\"subscribe\":{\"channel\":\"a\"}}\n{\"id\":11,\"subscribe\":{\"channel\":\"b\"}}";
    c.send_raw(frame).await;
    assert!(c.reply(10).await["subscribe"].is_object());
    assert!(c.reply(11).await["subscribe"].is_object());
    // Publications queued while the writer cannot run are written as few frames.
    let before = c.frames;
    for n in 0..200 {
        publish(&srv, "a", json!({"n": n})).await;
    }
    let mut got = 0;
    while got < 200 {
        if c.push().await.get("pub").is_some() {
            got += 1;
        }
    }
    let frames = c.frames - before;
    assert!(frames < 20, "200 publications arrived in {frames} frames");
    srv.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_3001_to_everyone() {
    let mut srv = TestServer::start(config_from(CFG)).await;
    let (mut a, _) = srv.connected("a").await;
    let (mut b, _) = srv.connected("b").await;
    b.call("subscribe", json!({"channel": "rec:x"})).await;
    let mut pending = srv.client().await; // not connected yet
    let task = srv.trigger_stop();
    for c in [&mut a, &mut b, &mut pending] {
        assert_eq!(c.closed().await, Closed::Code(3001, "shutdown".into()));
    }
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let mut cfg = config_from(CFG);
    cfg.websocket.message_size_limit = 4096;
    let srv = TestServer::start(cfg).await;
    let (mut c, _) = srv.connected("u").await;
    let big = json!({"id": 2, "publish": {"channel": "a", "data": {"x": "y".repeat(5000)}}});
    c.send_raw(&big.to_string()).await;
    assert_eq!(
        c.closed().await,
        Closed::Code(1009, "message too big".into())
    );
    let (mut d, _) = srv.connected("v").await;
    assert!(
        d.call("subscribe", json!({"channel": "a"})).await["subscribe"].is_object(),
        "others unaffected"
    );
    srv.stop().await;
}

/// Every refused or failed connect and subscribe leaves nothing behind: no hub subscription, no
/// channel, no registered connection.
#[tokio::test]
async fn every_refusal_path_leaves_nothing_attached() {
    let engine = FaultyEngine::new("none", vec![]);
    let cfg = config_from(&format!(
        "{CFG}\n[client]\nchannel_limit = 3\nuser_connection_limit = 1\n\
         [client.subscribe_to_user_personal_channel]\nenabled = true\n\
         [[channel.namespaces]]\nname = \"cur\"\nhistory_size = 10\nhistory_ttl = \"300s\"\n\
         force_recovery = true\ndelivery_cursor = true\nallow_subscribe_for_client = true\n"
    ));
    let srv = TestServer::start_with_engine(cfg, engine.clone()).await;
    let hub = srv.state.node.hub();
    let counts = || {
        (
            hub.counts
                .clients
                .load(std::sync::atomic::Ordering::Relaxed),
            hub.counts
                .subscriptions
                .load(std::sync::atomic::Ordering::Relaxed),
            hub.counts
                .channels
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    async fn settled(what: &str, counts: &impl Fn() -> (u64, u64, u64), want: (u64, u64, u64)) {
        eventually(&format!("{what}: counts {want:?}"), || counts() == want).await;
    }
    let tok = |extra: Value| token("u", None, extra);

    // Connect: an unknown namespace among the token's channels (102).
    let (c, r) = srv
        .connected_with(&tok(json!({"channels": ["rec:a", "nope:x"]})))
        .await;
    assert_eq!(code(&r), 102, "{r}");
    drop(c);
    settled("unknown namespace", &counts, (0, 0, 0)).await;

    // Connect: more server-side channels than client.channel_limit (3505).
    let mut c = srv.client().await;
    let t = tok(json!({"channels": ["rec:a", "rec:b", "rec:c"]}));
    c.send("connect", json!({"token": t})).await;
    assert_eq!(c.closed().await, Closed::Code(3505, "channel limit".into()));
    settled("channel limit", &counts, (0, 0, 0)).await;

    // Connect: the engine fails on the last server-side channel, after the first ones attached.
    *engine.fail_prefix.lock().unwrap() = Some("small:".into());
    let (c, r) = srv
        .connected_with(&tok(json!({"channels": ["rec:a", "small:z"]})))
        .await;
    assert_eq!(code(&r), 100, "{r}");
    drop(c);
    settled("engine failure on connect", &counts, (0, 0, 0)).await;

    // Subscribe: the engine fails (100); the connection keeps only its personal channel.
    let (mut c, _) = srv.connected("u").await;
    settled("connected", &counts, (1, 1, 1)).await;
    let r = c.call("subscribe", json!({"channel": "small:y"})).await;
    assert_eq!(code(&r), 100, "{r}");
    settled("engine failure on subscribe", &counts, (1, 1, 1)).await;
    *engine.fail_prefix.lock().unwrap() = None;

    // Subscribe: an unrecoverable position with the reject flag (112).
    let r = c
        .call(
            "subscribe",
            json!({"channel": "rec:r", "recover": true, "offset": 9, "epoch": "xxxxxxxx", "flag": 2}),
        )
        .await;
    assert_eq!(code(&r), 112, "{r}");
    // Subscribe: another user's personal channel (103); over the channel limit (106).
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "#v"})).await),
        103
    );
    c.call("subscribe", json!({"channel": "rec:1"})).await;
    c.call("subscribe", json!({"channel": "rec:2"})).await;
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "rec:3"})).await),
        106
    );
    settled("refused subscribes", &counts, (1, 3, 3)).await;

    // Connect: the user already has user_connection_limit connections (3504).
    let mut d = srv.client().await;
    d.send("connect", json!({"token": tok(json!({}))})).await;
    assert_eq!(
        d.closed().await,
        Closed::Code(3504, "connection limit".into())
    );
    settled("user connection limit", &counts, (1, 3, 3)).await;
    drop(c);
    settled("closed", &counts, (0, 0, 0)).await;

    // A binary publication cannot reach a JSON connection (3506): on subscribe...
    let binary = |n: u8| holdfast_core::node::PublishRequest {
        data: vec![0xff, n].into(),
        binary: true,
        ..Default::default()
    };
    srv.state.node.publish("rec:bin", binary(1)).await.unwrap();
    let (mut c, _) = srv.connected("u").await;
    c.send(
        "subscribe",
        json!({"channel": "rec:bin", "recover": true, "offset": 0, "epoch": ""}),
    )
    .await;
    assert_eq!(
        c.closed().await,
        Closed::Code(3506, "inappropriate protocol".into())
    );
    settled("binary on subscribe", &counts, (0, 0, 0)).await;
    // ...and on connect, where the personal channel and a delivery-cursor channel recover it.
    srv.state.node.publish("cur:u", binary(2)).await.unwrap();
    let mut c = srv.client().await;
    c.send(
        "connect",
        json!({"token": tok(json!({"channels": ["rec:a", "cur:u"]})), "name": "t"}),
    )
    .await;
    assert_eq!(
        c.closed().await,
        Closed::Code(3506, "inappropriate protocol".into())
    );
    settled("binary on connect", &counts, (0, 0, 0)).await;
    srv.stop().await;
}
