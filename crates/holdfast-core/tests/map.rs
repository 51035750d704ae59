//! Map subscriptions through the session, over in-memory transports under paused time: a client
//! mirror that follows centrifuge-js's algorithm (state pages, stream pages, live) must equal the
//! server's state whatever happens meanwhile.

#![allow(clippy::unwrap_used)]

use holdfast_core::Node;
use holdfast_core::config::{ChannelOptions, MapMode, MapOptions, NodeConfig, SubscriptionType};
use holdfast_core::engine::map::{MapWrite, StateQuery};
use holdfast_core::testing::{self, TestClient, token};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

fn map_ns(name: &str, mode: MapMode, key_ttl: u64) -> ChannelOptions {
    ChannelOptions {
        name: name.into(),
        subscription_type: SubscriptionType::Map,
        allow_subscribe_for_client: true,
        map: MapOptions {
            mode: Some(mode),
            key_ttl: Duration::from_secs(key_ttl),
            stream_size: if mode == MapMode::Ephemeral { 0 } else { 20 },
            min_page_size: 1,
            allow_publish_for_subscriber: true,
            allow_remove_for_subscriber: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn config() -> NodeConfig {
    let mut c = NodeConfig::default();
    // The tests sleep through key TTLs without reading: no pings meanwhile.
    c.client.ping_interval = Duration::from_secs(3600);
    c.channel.without_namespace = ChannelOptions {
        allow_subscribe_for_client: true,
        ..Default::default()
    };
    c.channel
        .namespaces
        .push(map_ns("pm", MapMode::Persistent, 0));
    c.channel
        .namespaces
        .push(map_ns("rm", MapMode::Recoverable, 30));
    c.channel
        .namespaces
        .push(map_ns("em", MapMode::Ephemeral, 30));
    c.channel.namespaces.push(ChannelOptions {
        name: "game".into(),
        allow_subscribe_for_client: true,
        map_clients_presence_channel_prefix: "clients:".into(),
        map_users_presence_channel_prefix: "users:".into(),
        ..Default::default()
    });
    c.channel.namespaces.push(ChannelOptions {
        subscription_type: SubscriptionType::MapClients,
        ..map_ns("clients", MapMode::Ephemeral, 30)
    });
    c.channel.namespaces.push(ChannelOptions {
        subscription_type: SubscriptionType::MapUsers,
        ..map_ns("users", MapMode::Recoverable, 30)
    });
    c
}

async fn user(node: &Node, user: &str) -> TestClient {
    let mut c = TestClient::connect(node);
    let r = c
        .call("connect", json!({ "token": token(user, None) }))
        .await;
    assert!(r["connect"].is_object(), "{r}");
    c
}

fn code(r: &Value) -> u64 {
    r["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error, got {r}"))
}

async fn put(node: &Node, channel: &str, key: &str, v: u64) -> u64 {
    let w = MapWrite {
        key: key.into(),
        data: json!({ "v": v }).to_string().into(),
        ..Default::default()
    };
    node.map_publish(channel, w).await.unwrap().position.offset
}

async fn remove(node: &Node, channel: &str, key: &str) {
    let w = MapWrite {
        key: key.into(),
        removed: true,
        ..Default::default()
    };
    node.map_publish(channel, w).await.unwrap();
}

/// The server's state of a channel: key → value.
async fn server_state(node: &Node, channel: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let q = StateQuery {
            cursor: cursor.clone(),
            limit: 1000,
            ..Default::default()
        };
        let page = node.map_read_state(channel, q).await.unwrap();
        for e in &page.entries {
            out.insert(e.key.clone(), serde_json::from_slice(&e.data).unwrap());
        }
        if page.cursor.is_empty() {
            return out;
        }
        cursor = page.cursor;
    }
}

/// A client's copy of a map channel, kept as centrifuge-js keeps it.
#[derive(Debug, Default)]
struct Mirror {
    channel: String,
    state: BTreeMap<String, Value>,
    offset: u64,
    epoch: String,
    recoverable: bool,
    /// Replies seen per phase (2 = state pages, 1 = stream pages, 0 = live).
    pages: [usize; 3],
    recovered: bool,
    synced: bool,
    /// 1 map, 2 map_clients, 3 map_users.
    sub_type: u64,
}

fn apply(state: &mut BTreeMap<String, Value>, p: &Value) {
    let key = p["key"].as_str().unwrap().to_owned();
    if p["removed"] == true {
        state.remove(&key);
    } else {
        state.insert(key, p["data"].clone());
    }
}

impl Mirror {
    fn new(channel: &str) -> Self {
        Self {
            channel: channel.into(),
            sub_type: 1,
            ..Default::default()
        }
    }

    fn of_type(channel: &str, sub_type: u64) -> Self {
        Self {
            sub_type,
            ..Self::new(channel)
        }
    }

    /// Subscribes: recovers from the stream when the last live reply said recoverable, else
    /// (or when told 112) pages through the state.
    async fn subscribe(&mut self, c: &mut TestClient, limit: u64) {
        self.pages = [0; 3];
        if self.recoverable && !self.epoch.is_empty() && self.recover(c, limit).await {
            return;
        }
        self.full_sync(c, limit).await;
    }

    async fn recover(&mut self, c: &mut TestClient, limit: u64) -> bool {
        let mut offset = self.offset;
        let mut missed = Vec::new();
        loop {
            let r = c
                .call(
                    "subscribe",
                    json!({"channel": self.channel, "type": self.sub_type, "phase": 1, "flag": 1,
                           "limit": limit, "offset": offset, "epoch": self.epoch, "recover": true}),
                )
                .await;
            if r.get("error").is_some() {
                assert_eq!(code(&r), 112, "{r}");
                return false;
            }
            let s = &r["subscribe"];
            missed.extend(s["publications"].as_array().cloned().unwrap_or_default());
            match s["phase"].as_i64().unwrap_or(0) {
                1 => {
                    self.pages[1] += 1;
                    offset = s["offset"].as_u64().unwrap();
                }
                0 => {
                    self.pages[0] += 1;
                    assert_eq!(s["recovered"], true, "{r}");
                    self.recovered = true;
                    self.synced = false;
                    for p in &missed {
                        apply(&mut self.state, p);
                    }
                    self.live(s);
                    return true;
                }
                other => panic!("unexpected phase {other}: {r}"),
            }
        }
    }

    async fn full_sync(&mut self, c: &mut TestClient, limit: u64) {
        let mut state = BTreeMap::new();
        let mut stream = Vec::new();
        let mut req = json!({"channel": self.channel, "type": self.sub_type, "phase": 2, "flag": 1, "limit": limit});
        loop {
            let r = c.call("subscribe", req.clone()).await;
            let s = &r["subscribe"];
            assert!(s.is_object(), "{r}");
            for e in s["state"].as_array().cloned().unwrap_or_default() {
                apply(&mut state, &e);
            }
            stream.extend(s["publications"].as_array().cloned().unwrap_or_default());
            let phase = s["phase"].as_i64().unwrap_or(0);
            match phase {
                2 => {
                    self.pages[2] += 1;
                    let (offset, epoch) = (s["offset"].as_u64().unwrap_or(0), &s["epoch"]);
                    req = match s["cursor"].as_str() {
                        Some(cursor) => {
                            json!({"channel": self.channel, "type": self.sub_type, "phase": 2,
                            "flag": 1, "limit": limit, "cursor": cursor, "offset": offset, "epoch": epoch})
                        }
                        None => json!({"channel": self.channel, "type": self.sub_type, "phase": 1,
                            "flag": 1, "limit": limit, "offset": offset, "epoch": epoch}),
                    };
                }
                1 => {
                    self.pages[1] += 1;
                    req["offset"] = s["offset"].clone();
                }
                0 => {
                    self.pages[0] += 1;
                    assert_ne!(s["recovered"], true, "a fresh sync is not a recovery: {r}");
                    for p in &stream {
                        apply(&mut state, p);
                    }
                    self.state = state;
                    self.recovered = false;
                    self.synced = true;
                    self.live(s);
                    return;
                }
                other => panic!("unexpected phase {other}: {r}"),
            }
        }
    }

    fn live(&mut self, s: &Value) {
        assert_eq!(
            s["type"], self.sub_type,
            "the live reply names the map type: {s}"
        );
        self.offset = s["offset"].as_u64().unwrap_or(0);
        self.epoch = s["epoch"].as_str().unwrap_or_default().to_owned();
        self.recoverable = s["recoverable"] == true;
    }

    /// Applies live pushes until the one writing `key` (a barrier the test wrote last).
    async fn follow_until(&mut self, c: &mut TestClient, key: &str) {
        loop {
            let p = c.push().await;
            if p["channel"] != self.channel.as_str() {
                continue;
            }
            if let Some(u) = p.get("unsubscribe") {
                panic!("unsubscribed: {u}");
            }
            let Some(publication) = p.get("pub") else {
                continue;
            };
            let offset = publication["offset"].as_u64().unwrap();
            if offset <= self.offset {
                // Queued before an unsubscribe (a client drops what comes for a channel it
                // left); everything after the live reply is newer than its offset.
                continue;
            }
            assert_eq!(
                offset,
                self.offset + 1,
                "live pushes follow without a gap: {p}"
            );
            self.offset = offset;
            apply(&mut self.state, publication);
            if publication["key"] == key {
                return;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn paging_through_a_changing_state_ends_with_the_servers_state() {
    let (node, _) = testing::node(config());
    for k in 0..10 {
        put(&node, "pm:m", &format!("k{k:02}"), k).await;
    }
    let mut c = user(&node, "u").await;
    // Page 1 (limit 3), then writes while the client pages: to keys already read, keys not
    // yet read, removals and new keys.
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:m", "type": 1, "phase": 2, "flag": 1, "limit": 3}),
        )
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["phase"], 2, "{r}");
    assert_eq!(s["state"].as_array().unwrap().len(), 3);
    assert!(s["cursor"].is_string());
    put(&node, "pm:m", "k00", 100).await;
    put(&node, "pm:m", "k08", 108).await;
    remove(&node, "pm:m", "k05").await;
    put(&node, "pm:m", "new", 1).await;
    let mut m = Mirror::new("pm:m");
    m.subscribe(&mut c, 3).await;
    assert!(m.synced);
    assert_eq!(m.state, server_state(&node, "pm:m").await);
    assert!(m.pages[2] >= 3, "paged: {:?}", m.pages);
    // Live: updates and removals arrive in order.
    put(&node, "pm:m", "k01", 201).await;
    remove(&node, "pm:m", "k02").await;
    put(&node, "pm:m", "barrier", 0).await;
    m.follow_until(&mut c, "barrier").await;
    assert_eq!(m.state, server_state(&node, "pm:m").await);
}

#[tokio::test(start_paused = true)]
async fn a_client_far_behind_reads_stream_pages_before_going_live() {
    let (node, _) = testing::node(config());
    for k in 0..3 {
        put(&node, "pm:s", &format!("k{k}"), k).await;
    }
    let mut c = user(&node, "u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:s", "type": 1, "phase": 2, "flag": 1, "limit": 2}),
        )
        .await;
    let s = &r["subscribe"];
    let (offset, epoch) = (s["offset"].as_u64().unwrap(), s["epoch"].clone());
    // Seven changes while the client holds its first page: more than a page behind.
    for n in 0..7 {
        put(&node, "pm:s", "k0", 10 + n).await;
    }
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:s", "type": 1, "phase": 2, "flag": 1, "limit": 2,
                   "cursor": s["cursor"], "offset": offset, "epoch": epoch}),
        )
        .await;
    assert_eq!(
        r["subscribe"]["phase"], 2,
        "the last state page, not live: {r}"
    );
    assert!(r["subscribe"].get("cursor").is_none(), "{r}");
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:s", "type": 1, "phase": 1, "flag": 1, "limit": 2,
                   "offset": offset, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["phase"], 1, "a stream page: {r}");
    let pubs: Vec<u64> = s["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(pubs, [offset + 1, offset + 2]);
    assert_eq!(
        s["offset"],
        offset + 2,
        "a stream page names its last offset"
    );
    // A position the stream no longer reaches (stream_size 20) is told 112.
    for n in 0..30 {
        put(&node, "pm:s", "k1", n).await;
    }
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:s", "type": 1, "phase": 1, "flag": 1, "limit": 2,
                   "offset": offset + 2, "epoch": epoch}),
        )
        .await;
    assert_eq!(code(&r), 112, "{r}");
    // The mirror starts over and still ends equal.
    let mut m = Mirror::new("pm:s");
    m.subscribe(&mut c, 2).await;
    assert_eq!(m.state, server_state(&node, "pm:s").await);
}

#[tokio::test(start_paused = true)]
async fn recoverable_maps_catch_up_from_the_stream_and_ephemeral_ones_resync() {
    let (node, _) = testing::node(config());
    for ch in ["rm:a", "em:a"] {
        put(&node, ch, "x", 1).await;
        put(&node, ch, "y", 2).await;
    }
    let mut c = user(&node, "u").await;
    let mut rm = Mirror::new("rm:a");
    let mut em = Mirror::new("em:a");
    rm.subscribe(&mut c, 100).await;
    em.subscribe(&mut c, 100).await;
    assert!(rm.recoverable, "recoverable mode says so");
    assert!(!em.recoverable, "ephemeral mode is not recoverable");
    c.call("unsubscribe", json!({"channel": "rm:a"})).await;
    c.call("unsubscribe", json!({"channel": "em:a"})).await;
    for ch in ["rm:a", "em:a"] {
        put(&node, ch, "x", 10).await;
        remove(&node, ch, "y").await;
        put(&node, ch, "z", 3).await;
    }
    rm.subscribe(&mut c, 100).await;
    em.subscribe(&mut c, 100).await;
    assert!(rm.recovered && !rm.synced, "caught up from the stream");
    assert_eq!(rm.pages, [1, 0, 0]);
    assert!(em.synced && !em.recovered, "a fresh snapshot");
    assert_eq!(rm.state, server_state(&node, "rm:a").await);
    assert_eq!(em.state, server_state(&node, "em:a").await);
}

#[tokio::test(start_paused = true)]
async fn expired_keys_reach_subscribers_as_removals() {
    let (node, _) = testing::node(config());
    put(&node, "rm:t", "old", 1).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    put(&node, "rm:t", "fresh", 2).await;
    let mut c = user(&node, "u").await;
    let mut m = Mirror::new("rm:t");
    m.subscribe(&mut c, 100).await;
    assert_eq!(m.state.len(), 2);
    // "old" expires 30 s after its write, "fresh" 20 s later.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let p = c.push().await;
    assert_eq!(p["pub"]["key"], "old", "{p}");
    assert_eq!(p["pub"]["removed"], true, "{p}");
    apply(&mut m.state, &p["pub"]);
    assert_eq!(m.state, server_state(&node, "rm:t").await);
    assert_eq!(node.map_num_keys("rm:t").await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn clients_write_where_allowed_and_bad_requests_get_clear_refusals() {
    let (node, _) = testing::node(config());
    let mut c = user(&node, "u").await;
    let mut m = Mirror::new("pm:w");
    m.subscribe(&mut c, 100).await;
    // A subscriber may write and remove (allow_*_for_subscriber).
    let r = c
        .call(
            "publish",
            json!({"channel": "pm:w", "type": 1, "key": "me", "data": {"s": "on"}}),
        )
        .await;
    assert!(r["publish"].is_object(), "{r}");
    let r = c
        .call(
            "publish",
            json!({"channel": "pm:w", "type": 1, "key": "me", "removed": true}),
        )
        .await;
    assert!(r["publish"].is_object(), "{r}");
    put(&node, "pm:w", "barrier", 0).await;
    m.follow_until(&mut c, "barrier").await;
    assert_eq!(m.state, server_state(&node, "pm:w").await);
    // A client not subscribed may not.
    let mut other = user(&node, "v").await;
    let r = other
        .call(
            "publish",
            json!({"channel": "pm:w", "type": 1, "key": "k", "data": {}}),
        )
        .await;
    assert_eq!(code(&r), 103, "{r}");
    // Type mismatches either way.
    let r = other.call("subscribe", json!({"channel": "pm:w"})).await;
    assert_eq!(code(&r), 107, "a stream subscribe to a map channel: {r}");
    let r = other
        .call(
            "subscribe",
            json!({"channel": "plain", "type": 1, "phase": 2}),
        )
        .await;
    assert_eq!(code(&r), 107, "a map subscribe to a stream channel: {r}");
    let r = c
        .call("publish", json!({"channel": "pm:w", "data": {"x": 1}}))
        .await;
    assert_eq!(code(&r), 107, "a stream publish to a map channel: {r}");
    // Oversized keys, bad cursors and foreign epochs.
    let long = "k".repeat(300);
    let r = c
        .call(
            "publish",
            json!({"channel": "pm:w", "type": 1, "key": long, "data": {}}),
        )
        .await;
    assert_eq!(code(&r), 107, "{r}");
    let r = other
        .call(
            "subscribe",
            json!({"channel": "pm:w", "type": 1, "phase": 2, "cursor": "k"}),
        )
        .await;
    assert_eq!(code(&r), 107, "a cursor without its position: {r}");
    let r = other
        .call(
            "subscribe",
            json!({"channel": "pm:w", "type": 1, "phase": 1, "offset": 1, "epoch": "forged"}),
        )
        .await;
    assert_eq!(code(&r), 112, "{r}");
    let r = other
        .call(
            "subscribe",
            json!({"channel": "pm:w", "type": 1, "phase": 7}),
        )
        .await;
    assert_eq!(code(&r), 107, "{r}");
    // Nothing of that disturbed the subscriber.
    put(&node, "pm:w", "after", 1).await;
    m.follow_until(&mut c, "after").await;
    assert_eq!(m.state, server_state(&node, "pm:w").await);
}

/// Random writes, removals, expiries, disconnects and reconnects against three mirrors (one per
/// mode); after each round every mirror equals the server's state.
#[tokio::test(start_paused = true)]
async fn random_changes_and_reconnects_leave_every_mirror_equal_to_the_server() {
    let (node, _) = testing::node(config());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let channels = ["pm:x", "rm:x", "em:x"];
    let mut clients = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        let mut c = user(&node, &format!("u{i}")).await;
        let mut m = Mirror::new(ch);
        m.subscribe(&mut c, 4).await;
        clients.push((c, m, true));
    }
    for round in 0..40u64 {
        for _ in 0..rng.random_range(1..12) {
            let ch = channels[rng.random_range(0..channels.len())];
            let key = format!("k{}", rng.random_range(0..15));
            if rng.random_bool(0.25) {
                remove(&node, ch, &key).await;
            } else {
                put(&node, ch, &key, rng.random_range(0..1000)).await;
            }
        }
        if rng.random_bool(0.2) {
            // Expiries in the expiring modes.
            tokio::time::sleep(Duration::from_secs(rng.random_range(1..40))).await;
        }
        for (c, m, live) in clients.iter_mut() {
            if *live && rng.random_bool(0.3) {
                c.call("unsubscribe", json!({"channel": m.channel})).await;
                *live = false;
            } else if !*live {
                m.subscribe(c, rng.random_range(1..6)).await;
                *live = true;
            }
        }
        for (c, m, live) in clients.iter_mut() {
            let ch = m.channel.clone();
            let barrier = format!("barrier{round}");
            put(&node, &ch, &barrier, round).await;
            if *live {
                m.follow_until(c, &barrier).await;
                assert_eq!(
                    m.state,
                    server_state(&node, &ch).await,
                    "round {round} on {ch}"
                );
            }
            remove(&node, &ch, &barrier).await;
        }
    }
}

/// The next live push on `channel` (other channels' pushes skipped).
async fn next_on(c: &mut TestClient, channel: &str) -> Value {
    loop {
        let p = c.push().await;
        if p["channel"] == channel && p.get("pub").is_some() {
            return p["pub"].clone();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn presence_maps_follow_connections_and_users() {
    let (node, _) = testing::node(config());
    let mut a1 = user(&node, "alice").await;
    let mut a2 = user(&node, "alice").await;
    let mut b = user(&node, "bob").await;
    for c in [&mut a1, &mut a2, &mut b] {
        let r = c.call("subscribe", json!({"channel": "game:1"})).await;
        assert!(r["subscribe"].is_object(), "{r}");
    }
    let mut w = user(&node, "watcher").await;
    let mut clients = Mirror::of_type("clients:game:1", 2);
    clients.subscribe(&mut w, 100).await;
    let mut users = Mirror::of_type("users:game:1", 3);
    users.subscribe(&mut w, 100).await;
    assert_eq!(
        clients.state.len(),
        3,
        "one entry per connection: {:?}",
        clients.state
    );
    let users_of = |m: &Mirror| m.state.keys().cloned().collect::<Vec<_>>();
    assert_eq!(users_of(&users), ["alice", "bob"], "one entry per user");
    let snapshot = node
        .map_read_state(
            "clients:game:1",
            StateQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        snapshot
            .entries
            .iter()
            .all(|e| e.info.as_ref().is_some_and(|i| *i.client == *e.key)),
        "a connection's entry carries its client info"
    );
    // A map subscription of the wrong presence type is refused.
    let mut x = user(&node, "x").await;
    let r = x
        .call(
            "subscribe",
            json!({"channel": "users:game:1", "type": 2, "phase": 2}),
        )
        .await;
    assert_eq!(code(&r), 107, "{r}");
    // Clients cannot write presence maps.
    let r = w
        .call(
            "publish",
            json!({"channel": "clients:game:1", "type": 1, "key": "x", "data": {}}),
        )
        .await;
    assert_eq!(code(&r), 107, "{r}");
    // One of alice's connections leaves: its entry goes at once, alice stays.
    a2.call("unsubscribe", json!({"channel": "game:1"})).await;
    let p = next_on(&mut w, "clients:game:1").await;
    assert_eq!(p["removed"], true, "{p}");
    // bob disconnects: his connection's entry goes at once, his user entry by TTL.
    b.hang_up();
    let p = next_on(&mut w, "clients:game:1").await;
    assert_eq!(p["removed"], true, "{p}");
    assert_eq!(node.map_num_keys("clients:game:1").await.unwrap(), 1);
    assert_eq!(node.map_num_keys("users:game:1").await.unwrap(), 2);
    // Alice's entry is kept alive past its TTL by the node while she is subscribed.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let p = next_on(&mut w, "users:game:1").await;
    assert_eq!(
        (p["key"].as_str(), p["removed"].as_bool()),
        (Some("bob"), Some(true)),
        "{p}"
    );
    assert_eq!(
        node.map_num_keys("users:game:1").await.unwrap(),
        1,
        "alice is still there"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        node.map_num_keys("users:game:1").await.unwrap(),
        1,
        "and stays while subscribed"
    );
    a1.hang_up();
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(
        node.map_num_keys("users:game:1").await.unwrap(),
        0,
        "gone after the last one left"
    );
    assert_eq!(node.map_num_keys("clients:game:1").await.unwrap(), 0);
}

#[test]
fn presence_prefixes_must_name_presence_namespaces() {
    let mut c = config();
    c.channel.namespaces.push(ChannelOptions {
        name: "bad".into(),
        map_clients_presence_channel_prefix: "users:".into(),
        map_users_presence_channel_prefix: "nowhere:".into(),
        ..Default::default()
    });
    let errs = c.validate().unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert!(
        keys.iter()
            .any(|k| k.ends_with("map_clients_presence_channel_prefix")),
        "{errs:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.ends_with("map_users_presence_channel_prefix")),
        "{errs:?}"
    );
    let mut c = config();
    c.channel.namespaces.push(ChannelOptions {
        name: "nomode".into(),
        subscription_type: SubscriptionType::Map,
        ..Default::default()
    });
    let errs = c.validate().unwrap_err();
    assert!(errs.iter().any(|e| e.key.ends_with("map.mode")), "{errs:?}");
}

#[tokio::test(start_paused = true)]
async fn a_cleared_map_tells_its_subscribers_to_start_over() {
    let (node, _) = testing::node(config());
    put(&node, "pm:c", "a", 1).await;
    let mut c = user(&node, "u").await;
    let mut m = Mirror::new("pm:c");
    m.subscribe(&mut c, 100).await;
    node.map_clear("pm:c").await.unwrap();
    let p = c.push().await;
    assert_eq!(p["unsubscribe"]["code"], 2500, "{p}");
    // The client resubscribes from its position: the old epoch is refused, it re-syncs.
    m.subscribe(&mut c, 100).await;
    assert!(m.synced, "a fresh snapshot");
    assert!(m.state.is_empty());
}

#[tokio::test(start_paused = true)]
async fn more_changes_than_a_recovery_read_takes_go_in_stream_pages() {
    let mut cfg = config();
    cfg.client.recovery_max_publication_limit = 5;
    let (node, _) = testing::node(cfg);
    put(&node, "pm:l", "a", 0).await;
    let mut c = user(&node, "u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:l", "type": 1, "phase": 2, "flag": 1, "limit": 50}),
        )
        .await;
    assert!(r["subscribe"].get("phase").is_none(), "live at once: {r}");
    let s = &r["subscribe"];
    let (offset, epoch) = (s["offset"].as_u64().unwrap(), s["epoch"].clone());
    c.call("unsubscribe", json!({"channel": "pm:l"})).await;
    // Ten changes: within a page of 50, beyond what the live step's read takes (5).
    for n in 0..10 {
        put(&node, "pm:l", "a", n).await;
    }
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:l", "type": 1, "phase": 1, "flag": 1, "limit": 50,
                   "offset": offset, "epoch": epoch, "recover": true}),
        )
        .await;
    assert_eq!(r["subscribe"]["phase"], 1, "a stream page, not 112: {r}");
    assert_eq!(r["subscribe"]["publications"].as_array().unwrap().len(), 10);
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:l", "type": 1, "phase": 1, "flag": 1, "limit": 50,
                   "offset": offset + 10, "epoch": epoch, "recover": true}),
        )
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "then live: {r}");
}

#[tokio::test(start_paused = true)]
async fn a_tag_filter_on_a_map_subscription_is_refused() {
    let mut cfg = config();
    for ns in &mut cfg.channel.namespaces {
        ns.allow_tags_filter = true;
    }
    let (node, _) = testing::node(cfg);
    let mut c = user(&node, "u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "pm:f", "type": 1, "phase": 2,
                   "tf": {"key": "k", "cmp": "eq", "val": "v"}}),
        )
        .await;
    assert_eq!(code(&r), 107, "{r}");
}

#[tokio::test(start_paused = true)]
async fn map_channels_are_not_subscribed_at_the_engines_broker() {
    let (node, engine) = testing::node(config());
    let mut c = user(&node, "u").await;
    let mut m = Mirror::new("pm:b");
    m.subscribe(&mut c, 100).await;
    let r = c.call("subscribe", json!({"channel": "plain"})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    let calls = engine.calls();
    assert!(
        calls.contains(&testing::EngineCall::Subscribe("plain".into())),
        "{calls:?}"
    );
    assert!(
        !calls.contains(&testing::EngineCall::Subscribe("pm:b".into())),
        "a map channel's publications come from the map broker: {calls:?}"
    );
    c.call("unsubscribe", json!({"channel": "pm:b"})).await;
    assert!(
        !engine
            .calls()
            .contains(&testing::EngineCall::Unsubscribe("pm:b".into()))
    );
}

#[test]
fn presence_map_key_ttl_must_leave_room_for_refreshes() {
    let mut c = config();
    c.channel.namespaces.push(ChannelOptions {
        subscription_type: SubscriptionType::MapUsers,
        ..map_ns("fast", MapMode::Ephemeral, 2)
    });
    let errs = c.validate().unwrap_err();
    assert!(
        errs.iter().any(|e| e.key.ends_with("map.key_ttl")),
        "{errs:?}"
    );
}
