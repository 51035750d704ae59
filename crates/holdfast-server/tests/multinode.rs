//! Several real `holdfast` processes over real `redis-server` processes: deliveries, presence
//! and API commands across nodes, `info` over live nodes, a node killed or shut down (its
//! clients recover on another node with zero loss), Redis restarted with and without
//! persistence (clients recover or are told, never silently lose), sharding over two Redis
//! instances and a 3-master Redis Cluster with sharded pub/sub; a master killed under load
//! behind Redis Sentinel and in a Redis Cluster with replicas (the replica promoted, publishing
//! resumes, nothing lost silently).

#![allow(clippy::unwrap_used)]

mod common;
use common::redis::{RedisCluster, RedisSentinel, RedisServer, free_port, raw};
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const NODE_WAIT: Duration = Duration::from_secs(30);

struct Node {
    child: Option<Child>,
    port: u16,
}

impl Node {
    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/connection/websocket", self.port)
    }

    async fn api(&self, method: &str, body: Value) -> Value {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/api/{method}", self.port))
            .header("X-API-Key", API_KEY)
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn ready_status(&self) -> u16 {
        match reqwest::get(format!("http://127.0.0.1:{}/ready", self.port)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    async fn wait_ready(&self, want: u16) {
        let deadline = tokio::time::Instant::now() + NODE_WAIT;
        while self.ready_status().await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} /ready never answered {want}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_config(dir: &Path, addresses: &[String], prefix: &str) -> PathBuf {
    write_config_with(dir, addresses, prefix, "")
}

/// [`write_config`] with more TOML after it (namespaces).
fn write_config_with(dir: &Path, addresses: &[String], prefix: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("config.toml");
    let addrs: Vec<String> = addresses.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(
        &p,
        format!(
            r#"
[client.token]
hmac_secret_key = "{SECRET}"
[http_api]
key = "{API_KEY}"
[engine]
type = "redis"
[engine.redis]
address = [{}]
prefix = "{prefix}"
ping_interval = "200ms"
command_timeout = "1s"
connect_timeout = "500ms"
[log]
level = "warn"
[shutdown]
timeout = "5s"
[channel.without_namespace]
history_size = 10000
history_ttl = "600s"
force_recovery = true
force_positioning = true
presence = true
join_leave = true
force_push_join_leave = true
allow_subscribe_for_client = true
allow_presence_for_subscriber = true
{extra}
"#,
            addrs.join(", ")
        ),
    )
    .unwrap();
    p
}

async fn start_node(cfg: &Path) -> Node {
    let port = free_port();
    Node {
        child: Some(spawn_holdfast(cfg, port, NODE_WAIT).await),
        port,
    }
}

fn test_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("holdfast-multinode-{}-{name}", std::process::id()))
}

async fn client(node: &Node, user: &str) -> TestClient {
    let mut c = TestClient::connect(&node.ws()).await;
    let r = c.connect_token(&token(user, None, json!({}))).await;
    assert!(r.get("connect").is_some(), "{r}");
    c
}

/// The next publication pushed on `channel`, skipping join/leave pushes.
async fn next_pub(c: &mut TestClient, channel: &str) -> Value {
    loop {
        let p = c.push().await;
        if p["channel"] == channel && p.get("pub").is_some() {
            return p["pub"].clone();
        }
        assert!(
            p.get("join").is_some() || p.get("leave").is_some(),
            "unexpected push {p}"
        );
    }
}

async fn publish_ok(node: &Node, channel: &str, data: Value) -> u64 {
    let r = node
        .api("publish", json!({"channel": channel, "data": data}))
        .await;
    assert!(r.get("error").is_none(), "publish failed: {r}");
    r["result"]["offset"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_publications_presence_and_api_commands() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start();
    let cfg = write_config(&test_dir("share"), &[redis.url()], "share");
    let (a, b) = (start_node(&cfg).await, start_node(&cfg).await);

    let mut cb = client(&b, "ub").await;
    let r = cb.call("subscribe", json!({"channel": "room"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let mut ca = client(&a, "ua").await;
    let r = ca.call("subscribe", json!({"channel": "room"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    // The join of a's client reaches b's client through Redis.
    loop {
        let join = cb.push().await;
        assert!(join.get("join").is_some(), "{join}");
        if join["join"]["info"]["user"] == "ua" {
            break;
        }
    }

    // Published on a, delivered on both.
    let off = publish_ok(&a, "room", json!({"hello": 1})).await;
    assert_eq!(off, 1);
    assert_eq!(next_pub(&mut cb, "room").await["data"], json!({"hello": 1}));
    assert_eq!(next_pub(&mut ca, "room").await["data"], json!({"hello": 1}));

    // Presence asked on either node lists both clients.
    for n in [&a, &b] {
        let p = n.api("presence_stats", json!({"channel": "room"})).await;
        assert_eq!(
            p["result"],
            json!({"num_clients": 2, "num_users": 2}),
            "{p}"
        );
    }

    // info lists both live nodes; channels counts subscribers on every node.
    let deadline = tokio::time::Instant::now() + NODE_WAIT;
    loop {
        let info = a.api("info", json!({})).await;
        if info["result"]["nodes"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "info: {info}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ch = a.api("channels", json!({"pattern": "ro*"})).await;
    assert_eq!(
        ch["result"]["channels"]["room"]["num_clients"], 2,
        "channels: {ch}"
    );

    // API unsubscribe sent to b reaches a's client; API disconnect sent to a closes b's.
    let r = b
        .api("unsubscribe", json!({"user": "ua", "channel": "room"}))
        .await;
    assert!(r.get("error").is_none(), "{r}");
    let p = ca.push().await;
    assert_eq!(p["unsubscribe"]["code"], 2000, "{p}");
    let r = a.api("disconnect", json!({"user": "ub"})).await;
    assert!(r.get("error").is_none(), "{r}");
    match cb.closed().await {
        Closed::Code(code, _) => assert_eq!(code, 3503),
        other => panic!("expected 3503, got {other:?}"),
    }

    // A node that stops drops out of info.
    let mut b = b;
    b.terminate();
    let deadline = tokio::time::Instant::now() + NODE_WAIT;
    loop {
        let info = a.api("info", json!({})).await;
        if info["result"]["nodes"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "info: {info}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const MAP_NAMESPACES: &str = r#"
[[channel.namespaces]]
name = "board"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "persistent"

[[channel.namespaces]]
name = "lobby"
allow_subscribe_for_client = true
map_users_presence_channel_prefix = "here:"

[[channel.namespaces]]
name = "here"
subscription_type = "map_users"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "ephemeral"
key_ttl = "3s"
"#;

/// Subscribes `c` to a map channel (type 1 map, 3 map_users) and returns the state's keys.
async fn map_subscribe(c: &mut TestClient, channel: &str, sub_type: u64) -> Vec<String> {
    let r = c
        .call(
            "subscribe",
            json!({"channel": channel, "type": sub_type, "phase": 2}),
        )
        .await;
    let s = &r["subscribe"];
    assert!(s.is_object() && s.get("phase").is_none(), "{r}");
    s["state"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["key"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_map_state_and_presence_and_it_outlives_a_node() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start();
    let cfg = write_config_with(&test_dir("maps"), &[redis.url()], "maps", MAP_NAMESPACES);
    let (a, b) = (start_node(&cfg).await, start_node(&cfg).await);
    let put = |key: &str, n: u64| json!({"channel": "board:1", "key": key, "data": {"n": n}});
    let r = a.api("map_publish", put("k1", 1)).await;
    assert!(r.get("error").is_none(), "{r}");
    // Written through a, read on b: one state in Redis (the map broker follows the engine).
    let mut cb = client(&b, "ub").await;
    assert_eq!(map_subscribe(&mut cb, "board:1", 1).await, ["k1"]);
    let r = a.api("map_publish", put("k2", 2)).await;
    assert!(r.get("error").is_none(), "{r}");
    let p = cb.push().await;
    assert_eq!(
        (&p["pub"]["key"], &p["pub"]["data"]["n"]),
        (&json!("k2"), &json!(2)),
        "{p}"
    );
    // Presence: a user in a's lobby is an entry of the here: map b's client watches.
    let mut watcher = client(&b, "watcher").await;
    assert!(
        map_subscribe(&mut watcher, "here:lobby:1", 3)
            .await
            .is_empty()
    );
    let mut ca = client(&a, "ua").await;
    let r = ca.call("subscribe", json!({"channel": "lobby:1"})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    let p = watcher.push().await;
    assert_eq!(p["pub"]["key"], "ua", "{p}");
    // The state lives in Redis, not in a node: a restarted node serves it whole.
    let mut a = a;
    a.terminate();
    let a = start_node(&cfg).await;
    let mut fresh = client(&a, "late").await;
    assert_eq!(map_subscribe(&mut fresh, "board:1", 1).await, ["k1", "k2"]);
    // ua's connection went with the old a: its entry expires by key_ttl and b's watcher sees
    // the removal (swept by whichever node comes first).
    let p = watcher.push().await;
    assert_eq!(
        (&p["pub"]["key"], &p["pub"]["removed"]),
        (&json!("ua"), &json!(true)),
        "{p}"
    );
}

/// A client on a node that goes away (killed, or shut down with 3001) reconnects to another
/// node and recovers exactly what it missed, once, in order.
async fn node_loss_is_recovered(sigkill: bool) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start();
    let name = if sigkill { "kill" } else { "term" };
    let cfg = write_config(&test_dir(name), &[redis.url()], name);
    let (mut a, b) = (start_node(&cfg).await, start_node(&cfg).await);
    let mut c = client(&a, "u").await;
    let r = c.call("subscribe", json!({"channel": "feed"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=50u64 {
        assert_eq!(publish_ok(&b, "feed", json!({"n": n})).await, n);
    }
    let mut last = 0;
    for n in 1..=50u64 {
        let p = next_pub(&mut c, "feed").await;
        assert_eq!(p["offset"], n);
        assert_eq!(p["data"]["n"], n);
        last = n;
    }
    if sigkill {
        a.kill();
        assert_eq!(c.closed().await, Closed::NoFrame);
    } else {
        a.terminate();
        match c.closed().await {
            Closed::Code(code, _) => assert_eq!(code, 3001, "shutdown code"),
            other => panic!("expected 3001, got {other:?}"),
        }
    }
    for n in 51..=100u64 {
        publish_ok(&b, "feed", json!({"n": n})).await;
    }
    let mut c = client(&b, "u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "feed", "recover": true, "offset": last, "epoch": epoch}),
        )
        .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let got: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        (51..=100).collect::<Vec<_>>(),
        "missed ones, once, in order"
    );
    for n in 101..=110u64 {
        publish_ok(&b, "feed", json!({"n": n})).await;
        assert_eq!(next_pub(&mut c, "feed").await["offset"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_recover_on_another_with_zero_loss() {
    node_loss_is_recovered(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_closes_with_3001_and_clients_recover_elsewhere() {
    node_loss_is_recovered(false).await;
}

/// Offsets a client holding `channel` up to offset `from` ends up holding up to `until`,
/// whether they arrive live or through a recovery after the server told it to (unsubscribe
/// 2500). Returns the offsets and how many times it was told.
async fn collect_until(
    c: &mut TestClient,
    channel: &str,
    epoch: &mut String,
    from: u64,
    until: u64,
) -> (Vec<u64>, usize) {
    let mut got: Vec<u64> = Vec::new();
    let mut told = 0;
    let mut last = from;
    while last < until {
        let p = c.push().await;
        if p.get("join").is_some() || p.get("leave").is_some() {
            continue;
        }
        if let Some(u) = p.get("unsubscribe") {
            assert_eq!(u["code"], 2500, "{p}");
            told += 1;
            let r = c
                .call(
                    "subscribe",
                    json!({"channel": channel, "recover": true, "offset": last, "epoch": epoch}),
                )
                .await;
            let s = &r["subscribe"];
            assert!(s.is_object(), "{r}");
            if s["recovered"] == true {
                for p in s["publications"].as_array().into_iter().flatten() {
                    last = p["offset"].as_u64().unwrap();
                    got.push(last);
                }
            } else {
                // Told: history is gone. Start over at the new position.
                *epoch = s["epoch"].as_str().unwrap().to_owned();
                last = s["offset"].as_u64().unwrap_or(0);
                got.push(u64::MAX);
            }
            continue;
        }
        let o = p["pub"]["offset"].as_u64().unwrap();
        got.push(o);
        last = o;
    }
    (got, told)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_fsync_persistence_loses_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let cfg = write_config(&test_dir("aof"), &[redis.url()], "aof");
    let a = start_node(&cfg).await;
    let mut c = client(&a, "u").await;
    let r = c.call("subscribe", json!({"channel": "p"})).await;
    let mut epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish_ok(&a, "p", json!({"n": n})).await;
    }
    for n in 1..=3u64 {
        assert_eq!(next_pub(&mut c, "p").await["offset"], n);
    }
    redis.kill();
    // While Redis is down: publishes fail with error 100, /ready says so.
    let r = a.api("publish", json!({"channel": "p", "data": {}})).await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    a.wait_ready(503).await;
    redis.restart();
    a.wait_ready(200).await;
    for n in 4..=6 {
        // The command connection reconnects on use: retry until Redis answers.
        let deadline = tokio::time::Instant::now() + NODE_WAIT;
        loop {
            let r = a
                .api("publish", json!({"channel": "p", "data": {"n": n}}))
                .await;
            if r.get("error").is_none() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{r}");
        }
    }
    let (got, _told) = collect_until(&mut c, "p", &mut epoch, 3, 6).await;
    assert_eq!(
        got,
        [4, 5, 6],
        "after the restart: live or recovered, nothing lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_tells_clients_recovered_false() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut redis = RedisServer::start();
    let cfg = write_config(&test_dir("nopersist"), &[redis.url()], "np");
    let a = start_node(&cfg).await;
    let mut c = client(&a, "u").await;
    let r = c.call("subscribe", json!({"channel": "q"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish_ok(&a, "q", json!({"n": n})).await;
    }
    for n in 1..=3u64 {
        assert_eq!(next_pub(&mut c, "q").await["offset"], n);
    }
    redis.restart();
    // The node notices, resubscribes, finds the stream gone and tells the subscriber.
    let p = c.push().await;
    assert_eq!(p["unsubscribe"]["code"], 2500, "{p}");
    let r = c
        .call(
            "subscribe",
            json!({"channel": "q", "recover": true, "offset": 3, "epoch": epoch}),
        )
        .await;
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert_ne!(
        r["subscribe"]["recovered"], true,
        "told recovered: false: {r}"
    );
    assert_ne!(r["subscribe"]["epoch"], epoch, "a new epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_over_two_redis_instances() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (r1, r2) = (RedisServer::start(), RedisServer::start());
    let cfg = write_config(&test_dir("shard"), &[r1.url(), r2.url()], "shard");
    let (a, b) = (start_node(&cfg).await, start_node(&cfg).await);
    let mut c = client(&b, "u").await;
    for i in 0..16 {
        let r = c
            .call("subscribe", json!({"channel": format!("s{i}")}))
            .await;
        assert!(r.get("subscribe").is_some(), "{r}");
    }
    for i in 0..16 {
        publish_ok(&a, &format!("s{i}"), json!({"i": i})).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 16 {
        let p = c.push().await;
        if p.get("pub").is_some() {
            seen.insert(p["channel"].as_str().unwrap().to_owned());
        }
    }
    for r in [&r1, &r2] {
        let n: u64 = raw(r.port, "DBSIZE")
            .unwrap()
            .trim_start_matches(':')
            .trim()
            .parse()
            .unwrap();
        assert!(n > 0, "instance {} holds no keys", r.port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_nodes_share_channels_over_sharded_pubsub() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = RedisCluster::start();
    let cfg = write_config(&test_dir("cluster"), &[cluster.url()], "cl");
    let (a, b) = (start_node(&cfg).await, start_node(&cfg).await);
    let mut c = client(&b, "u").await;
    for i in 0..8 {
        let r = c
            .call("subscribe", json!({"channel": format!("k{i}")}))
            .await;
        assert!(r.get("subscribe").is_some(), "{r}");
    }
    for i in 0..8 {
        assert_eq!(publish_ok(&a, &format!("k{i}"), json!({"i": i})).await, 1);
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 8 {
        let p = c.push().await;
        if p.get("pub").is_some() {
            seen.insert(p["channel"].as_str().unwrap().to_owned());
        }
    }
    let p = a.api("presence", json!({"channel": "k0"})).await;
    assert_eq!(
        p["result"]["presence"].as_object().map(|m| m.len()),
        Some(1),
        "{p}"
    );
    // API disconnect crosses nodes in cluster mode too.
    let r = a.api("disconnect", json!({"user": "u"})).await;
    assert!(r.get("error").is_none(), "{r}");
    match c.closed().await {
        Closed::Code(code, _) => assert_eq!(code, 3503),
        other => panic!("expected 3503, got {other:?}"),
    }
}

/// A node that has just started asks its peers to announce themselves: `info` asked of it lists
/// them at once, not after their next heartbeat (here a minute away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_hears_from_its_peers_at_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start();
    let dir = test_dir("hello");
    let cfg_path = write_config(&dir, &[redis.url()], "hello");
    let load = || {
        holdfast_server::config::load(Some(&cfg_path), Vec::new(), &[])
            .unwrap()
            .config
    };
    let start = |state: std::sync::Arc<holdfast_server::server::AppState>| async move {
        state.node.set_heartbeat(Duration::from_secs(60));
        let (srv, ready) = TestServer::start_unready(state).await;
        let _ = ready.send(());
        eventually("node ready", || srv.state.node.is_ready()).await;
        srv
    };
    let a = start(holdfast_server::server::build(load()).await.unwrap()).await;
    let b = start(holdfast_server::server::build(load()).await.unwrap()).await;
    let a_id = a.state.node.id().to_owned();
    eventually("B lists A after its hello", || {
        b.state.node.nodes().iter().any(|n| n.uid == a_id)
    })
    .await;
    let r = api(&b, "info", json!({})).await;
    assert_eq!(
        r["result"]["nodes"].as_array().map(Vec::len),
        Some(2),
        "{r}"
    );
    b.stop().await;
    a.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes `{"n": n}` through node `port`'s API: (offset, epoch) when acknowledged.
async fn try_publish(http: &reqwest::Client, port: u16, n: u64) -> Option<(u64, String)> {
    let r: Value = http
        .post(format!("http://127.0.0.1:{port}/api/publish"))
        .header("X-API-Key", API_KEY)
        .json(&json!({"channel": "f", "data": {"n": n}}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let res = r.get("result")?;
    Some((res["offset"].as_u64()?, res["epoch"].as_str()?.to_owned()))
}

/// While a publisher runs, `fail` kills the Redis master. Publishing must resume on the
/// promoted replica, and the subscriber must end with every acknowledged publication of the
/// final epoch, once, in order (live or recovered), or have been told (recovered: false).
async fn master_failover_under_load(address: String, prefix: &str, fail: impl FnOnce()) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let cfg = write_config(&test_dir(prefix), &[address], prefix);
    let a = start_node(&cfg).await;
    let mut c = client(&a, "u").await;
    let r = c.call("subscribe", json!({"channel": "f"})).await;
    let mut epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (stop2, count2, port) = (stop.clone(), count.clone(), a.port);
    let publisher = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let (mut acked, mut refused, mut n) = (Vec::new(), 0u64, 0u64);
        while !stop2.load(Ordering::Relaxed) {
            n += 1;
            match try_publish(&http, port, n).await {
                Some(a) => {
                    acked.push(a);
                    count2.store(acked.len(), Ordering::Relaxed);
                }
                None => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, refused)
    });
    let wait_for = |n: usize, what: &'static str| {
        let count = count.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while count.load(Ordering::Relaxed) < n {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(30, "publishing before the failure").await;
    let before = count.load(Ordering::Relaxed);
    fail();
    let failed_at = tokio::time::Instant::now();
    wait_for(
        before + 50,
        "publishing never resumed after the master was killed",
    )
    .await;
    let resumed_after = failed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = publisher.await.unwrap();
    let final_epoch = acked.last().unwrap().1.clone();
    let last = acked.last().unwrap().0;
    let (got, told) = collect_until(&mut c, "f", &mut epoch, 0, last).await;
    eprintln!(
        "{prefix}: {} acknowledged, {refused} refused while failing over, resumed after {resumed_after:?}, subscriber resubscribed {told} time(s), {}",
        acked.len(),
        if got.contains(&u64::MAX) {
            "told recovered: false"
        } else {
            "recovered every publication"
        }
    );
    // Once, in order: offsets only grow between tellings.
    let received: Vec<u64> = got.iter().copied().filter(|o| *o != u64::MAX).collect();
    let told_at = got.iter().rposition(|o| *o == u64::MAX);
    let after_told = &got[told_at.map_or(0, |i| i + 1)..];
    assert!(
        after_told.windows(2).all(|w| w[0] < w[1]),
        "duplicates or disorder: {got:?}"
    );
    // Every acknowledged publication of the final epoch reached it, unless it was told.
    for (offset, e) in &acked {
        if *e == final_epoch && told_at.is_none() {
            assert!(
                received.contains(offset),
                "acknowledged offset {offset} lost silently"
            );
        }
    }
    if told_at.is_some() {
        // After being told, it holds everything acknowledged past its new position.
        let first_after = after_told.first().copied().unwrap_or(last);
        for (offset, e) in &acked {
            if *e == final_epoch && *offset >= first_after {
                assert!(
                    after_told.contains(offset),
                    "offset {offset} lost after recovery"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_promotes_the_replica_and_publishing_resumes_without_silent_loss() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut s = RedisSentinel::start();
    let old = s.master.port;
    let url = s.url();
    let replica_port = s.replica.port;
    master_failover_under_load(url, "sentinel", || s.master.kill()).await;
    assert_eq!(
        s.master_port(),
        Some(replica_port),
        "the sentinel promoted the replica (old master {old})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_replica_takes_over_a_killed_master_without_silent_loss() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cluster = RedisCluster::start_with_replicas(1);
    let url = cluster.url();
    // The master holding the test channel's keys is the one to kill (found once it has them).
    let nodes: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let victim = std::sync::Arc::new(std::sync::Mutex::new(None));
    let v2 = victim.clone();
    master_failover_under_load(url, "clusterfail", || {
        let i = nodes
            .iter()
            .position(|p| {
                raw(*p, "ROLE").is_ok_and(|r| r.contains("master"))
                    && raw(*p, "KEYS *").is_ok_and(|r| r.contains(":f\r\n"))
            })
            .expect("the master holding channel f");
        cluster.nodes[i].kill();
        *v2.lock().unwrap() = Some(i);
    })
    .await;
    assert!(victim.lock().unwrap().is_some());
}
