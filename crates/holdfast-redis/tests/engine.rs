//! The Redis engine against real `redis-server` processes spawned on free ports: the shared
//! conformance suite (one instance, two sharded instances, a 3-master cluster), two engines
//! sharing Redis as two nodes would, and the failure paths (Redis killed and restarted, a
//! pub/sub connection killed, a stream that went back, publishes while Redis is down).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../holdfast-server/tests/common/redis.rs"]
mod redis_server;

use bytes::Bytes;
use holdfast_core::engine::conformance::{self};
use holdfast_core::engine::map::{MapBroker, MapWrite, StateQuery};
use holdfast_core::engine::{
    Broker, BrokerHandler, Engine, EngineError, HistoryOptions, HistoryQuery, PresenceStore,
    PublishOptions, StreamTop,
};
use holdfast_protocol::{ClientInfo, Publication};
use holdfast_redis::{RedisConfig, RedisEngine, RedisMapBroker};
use parking_lot::Mutex;
use redis_server::{RedisCluster, RedisServer, raw};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static PREFIX: AtomicU64 = AtomicU64::new(0);

fn config(addresses: Vec<String>) -> RedisConfig {
    let mut c = RedisConfig::new(addresses);
    c.prefix = format!(
        "t{}x{}",
        std::process::id(),
        PREFIX.fetch_add(1, Ordering::Relaxed)
    );
    c.ping_interval = Duration::from_millis(200);
    c.command_timeout = Duration::from_secs(1);
    c.connect_timeout = Duration::from_millis(500);
    c
}

async fn engine(cfg: RedisConfig) -> Arc<RedisEngine> {
    let e = RedisEngine::new(cfg).expect("engine");
    tokio::time::timeout(Duration::from_secs(20), e.connected())
        .await
        .expect("engine connects");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_one_instance() {
    let r = RedisServer::start();
    let url = r.url();
    conformance::run_all(|| {
        let url = url.clone();
        async move { Engine::from_one(engine(config(vec![url])).await) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_sharded_over_two_instances() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let urls = vec![a.url(), b.url()];
    conformance::run_all(|| {
        let urls = urls.clone();
        async move { Engine::from_one(engine(config(urls)).await) }
    })
    .await;
    // Channels really are spread: both instances hold streams.
    let e = engine(config(vec![a.url(), b.url()])).await;
    for i in 0..40 {
        e.publish(&format!("spread{i}"), publication(i), &hist())
            .await
            .expect("publish");
    }
    for r in [&a, &b] {
        let keys = raw(r.port, "DBSIZE").expect("dbsize");
        let n: u64 = keys.trim_start_matches(':').trim().parse().expect("count");
        assert!(n >= 10, "instance {} holds only {n} keys", r.port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_redis_cluster_with_sharded_pubsub() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    conformance::run_all(|| {
        let url = url.clone();
        async move { Engine::from_one(engine(config(vec![url])).await) }
    })
    .await;
    // Two engines as two nodes: a publication on one reaches the other over SSUBSCRIBE.
    let cfg = config(vec![cluster.url()]);
    let (a, b) = (engine(cfg.clone()).await, engine(cfg).await);
    let rec = Rec::new();
    b.set_handler(rec.clone());
    a.set_handler(Rec::new());
    for ch in ["x", "y", "zz", "room:1", "room:2"] {
        b.subscribe(ch).await.expect("subscribe");
        a.publish(ch, publication(1), &hist())
            .await
            .expect("publish");
    }
    rec.wait("5 channels delivered across nodes", |ev| {
        ev.iter().filter(|e| matches!(e, Ev::Pub(..))).count() == 5
    })
    .await;
    // Keys of the publications are spread over the three masters.
    let mut holding = 0;
    for n in &cluster.nodes {
        let keys = raw(n.port, "DBSIZE").expect("dbsize");
        let k: u64 = keys.trim_start_matches(':').trim().parse().expect("count");
        if k > 0 {
            holding += 1;
        }
    }
    assert!(holding >= 2, "only {holding} masters hold keys");
}

/// Everything a node would be told.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Pub(String, u64, String),
    Join(String),
    Leave(String),
    Check(String, u64, String),
    Rewind(String, u64),
    Control(Vec<u8>),
}

#[derive(Debug, Default)]
struct Rec(Mutex<Vec<Ev>>);

impl Rec {
    fn new() -> Arc<Self> {
        Arc::default()
    }
    async fn wait(&self, what: &str, done: impl Fn(&[Ev]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.0.lock().clone();
            if done(&seen) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; saw {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    fn pubs(&self, ch: &str) -> Vec<u64> {
        self.0
            .lock()
            .iter()
            .filter_map(|e| match e {
                Ev::Pub(c, o, _) if c == ch => Some(*o),
                _ => None,
            })
            .collect()
    }
}

impl BrokerHandler for Rec {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        self.0
            .lock()
            .push(Ev::Pub(channel.into(), p.offset, epoch.to_string()));
    }
    fn on_join(&self, channel: &str, _info: &Arc<ClientInfo>) {
        self.0.lock().push(Ev::Join(channel.into()));
    }
    fn on_leave(&self, channel: &str, _info: &Arc<ClientInfo>) {
        self.0.lock().push(Ev::Leave(channel.into()));
    }
    fn check_position(&self, channel: &str, top: &StreamTop) {
        self.0
            .lock()
            .push(Ev::Check(channel.into(), top.offset, top.epoch.to_string()));
    }
    fn on_rewind(&self, channel: &str, top: &StreamTop) {
        self.0.lock().push(Ev::Rewind(channel.into(), top.offset));
    }
    fn on_control(&self, data: &[u8]) {
        self.0.lock().push(Ev::Control(data.to_vec()));
    }
}

fn hist() -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size: 100,
            ttl: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(600),
        }),
        ..Default::default()
    }
}

fn publication(n: u64) -> Publication {
    Publication {
        data: Bytes::from(format!("{{\"n\":{n}}}")),
        ..Default::default()
    }
}

fn info(client: &str) -> Arc<ClientInfo> {
    Arc::new(ClientInfo {
        user: "u".into(),
        client: client.into(),
        conn_info: None,
        chan_info: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_deliveries_presence_and_control() {
    let r = RedisServer::start();
    let cfg = config(vec![r.url()]);
    let (a, b) = (engine(cfg.clone()).await, engine(cfg).await);
    let (ra, rb) = (Rec::new(), Rec::new());
    a.set_handler(ra.clone());
    b.set_handler(rb.clone());
    b.subscribe("room").await.expect("subscribe");
    for n in 1..=3 {
        a.publish("room", publication(n), &hist())
            .await
            .expect("publish");
    }
    rb.wait("3 deliveries on b", |_| rb.pubs("room").len() == 3)
        .await;
    assert_eq!(rb.pubs("room"), [1, 2, 3], "in offset order");
    assert!(
        ra.pubs("room").is_empty(),
        "a did not subscribe the channel"
    );
    a.publish_join("room", info("c1")).await.expect("join");
    rb.wait("join", |ev| ev.contains(&Ev::Join("room".into())))
        .await;
    // Presence added on a is seen on b.
    a.add_presence("room", info("c1")).await.expect("add");
    assert_eq!(b.presence_stats("room").await.expect("stats"), (1, 1));
    // Control reaches both nodes.
    a.publish_control(Bytes::from_static(b"hello"))
        .await
        .expect("control");
    for rec in [&ra, &rb] {
        rec.wait("control", |ev| ev.contains(&Ev::Control(b"hello".to_vec())))
            .await;
    }
    // After unsubscribing, b no longer receives the channel.
    b.unsubscribe("room").await.expect("unsubscribe");
    b.subscribe("marker").await.expect("subscribe");
    a.publish("room", publication(4), &hist())
        .await
        .expect("publish");
    a.publish("marker", publication(1), &hist())
        .await
        .expect("publish");
    rb.wait("marker", |_| rb.pubs("marker") == [1]).await;
    assert_eq!(rb.pubs("room"), [1, 2, 3], "nothing after unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_vanished_node_expires() {
    let r = RedisServer::start();
    let mut cfg = config(vec![r.url()]);
    cfg.presence_ttl = Duration::from_secs(3);
    let a = engine(cfg.clone()).await;
    let b = engine(cfg).await;
    a.set_handler(Rec::new());
    b.set_handler(Rec::new());
    a.add_presence("p", info("ca")).await.expect("add");
    b.add_presence("p", info("cb")).await.expect("add");
    drop(a); // a node that dies without removing its clients
    // b keeps refreshing its own entry; a's expires after the TTL.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let who: Vec<String> = b
            .presence("p")
            .await
            .expect("presence")
            .iter()
            .map(|i| i.client.to_string())
            .collect();
        if who == ["cb"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence now {who:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And b's survives well past one TTL thanks to the refresh.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(b.presence_stats("p").await.expect("stats"), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_is_a_new_epoch_and_subscribers_are_checked() {
    let mut r = RedisServer::start();
    let e = engine(config(vec![r.url()])).await;
    let rec = Rec::new();
    e.set_handler(rec.clone());
    e.subscribe("c").await.expect("subscribe");
    let first = e
        .publish("c", publication(1), &hist())
        .await
        .expect("publish");
    let epoch1 = first.position.expect("position").epoch;
    rec.wait("first delivery", |_| rec.pubs("c") == [1]).await;
    r.kill();
    // While Redis is down: publishes fail with a clear error, the engine is not healthy.
    let err = e.publish("c", publication(2), &hist()).await;
    assert!(
        matches!(err, Err(EngineError::Unavailable(_))),
        "publish while down: {err:?}"
    );
    rec.wait("not healthy", |_| !e.healthy()).await;
    r.restart();
    tokio::time::timeout(Duration::from_secs(20), e.connected())
        .await
        .expect("reconnects by itself");
    // The position check ran after the resubscribe: the stream is gone (no epoch).
    rec.wait("position check", |ev| {
        ev.iter()
            .any(|x| matches!(x, Ev::Check(c, 0, ep) if c == "c" && ep.is_empty()))
    })
    .await;
    let after = e
        .publish("c", publication(3), &hist())
        .await
        .expect("publish");
    let pos = after.position.expect("position");
    assert_ne!(pos.epoch, epoch1, "lost history means a new epoch");
    assert_eq!(pos.offset, 1);
    rec.wait("delivery after restart", |ev| {
        ev.iter()
            .any(|x| matches!(x, Ev::Pub(c, 1, ep) if c == "c" && **ep == *pos.epoch))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_missed_while_pubsub_was_down_are_reported() {
    let r = RedisServer::start();
    let rec = Rec::new();
    // Same prefix for both, so they share channels as two nodes do.
    let cfg = config(vec![r.url()]);
    let (node, publisher) = (engine(cfg.clone()).await, engine(cfg).await);
    node.set_handler(rec.clone());
    publisher.set_handler(Rec::new());
    node.subscribe("m").await.expect("subscribe");
    publisher
        .publish("m", publication(1), &hist())
        .await
        .expect("publish");
    rec.wait("offset 1", |_| rec.pubs("m") == [1]).await;
    // Kill the subscriber connections from the server side, publish while they rebuild.
    let killed = raw(r.port, "CLIENT KILL TYPE pubsub").expect("kill");
    assert!(killed.starts_with(':'), "{killed}");
    for n in 2..=4 {
        publisher
            .publish("m", publication(n), &hist())
            .await
            .expect("publish");
    }
    rec.wait("a position check naming the top", |ev| {
        ev.iter()
            .any(|x| matches!(x, Ev::Check(c, top, _) if c == "m" && *top >= 2))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_went_back_is_reported_as_a_rewind() {
    let r = RedisServer::start();
    let cfg = config(vec![r.url()]);
    let prefix = cfg.prefix.clone();
    let e = engine(cfg).await;
    let rec = Rec::new();
    e.set_handler(rec.clone());
    e.subscribe("w").await.expect("subscribe");
    for n in 1..=5 {
        e.publish("w", publication(n), &hist())
            .await
            .expect("publish");
    }
    rec.wait("5 deliveries", |_| rec.pubs("w").len() == 5).await;
    // Simulate Redis losing its newest writes (an AOF everysec crash, a failover to a replica
    // that lagged): the stream's counter goes back to 2.
    let keys = raw(r.port, &format!("KEYS {prefix}:*:m:w")).expect("keys");
    let meta = keys
        .lines()
        .find(|l| l.starts_with(&prefix))
        .expect("meta key")
        .to_owned();
    let set = raw(r.port, &format!("HSET {meta} s 2")).expect("hset");
    assert!(set.starts_with(':'), "{set}");
    // (The stream keeps entries 3..5: the publish script starts it over.)
    let out = e
        .publish("w", publication(6), &hist())
        .await
        .expect("publish");
    assert_eq!(out.position.map(|p| p.offset), Some(3));
    rec.wait("the rewind", |ev| ev.contains(&Ev::Rewind("w".into(), 2)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_fail_clearly_while_down_and_work_after() {
    let mut r = RedisServer::start();
    let e = engine(config(vec![r.url()])).await;
    e.set_handler(Rec::new());
    e.publish("h", publication(1), &hist())
        .await
        .expect("publish");
    r.kill();
    let q = HistoryQuery {
        since: None,
        limit: None,
        reverse: false,
        meta_ttl: Duration::from_secs(60),
    };
    assert!(matches!(
        e.history("h", &q).await,
        Err(EngineError::Unavailable(_))
    ));
    assert!(matches!(e.subscribe("h").await, Err(EngineError::Unavailable(_))) || !e.healthy());
    r.restart();
    tokio::time::timeout(Duration::from_secs(20), e.connected())
        .await
        .expect("reconnects");
    // The command connection reconnects on use.
    let mut ok = false;
    for _ in 0..50 {
        if e.history("h", &q).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "history works again after Redis returns");
}

// ---- The Redis map broker -------------------------------------------------------------------

async fn map_broker(cfg: RedisConfig) -> Arc<dyn MapBroker> {
    RedisMapBroker::new(engine(cfg).await)
}

fn map_put(key: &str, v: &str) -> MapWrite {
    MapWrite {
        key: key.into(),
        data: Bytes::from(v.to_owned()),
        ..Default::default()
    }
}

fn state_query() -> StateQuery {
    StateQuery {
        limit: 100,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_conformance_one_instance() {
    let r = RedisServer::start();
    let url = r.url();
    conformance::run_map(|| map_broker(config(vec![url.clone()]))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_conformance_sharded_over_two_instances() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let urls = vec![a.url(), b.url()];
    conformance::run_map(|| map_broker(config(urls.clone()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_conformance_redis_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    conformance::run_map(|| map_broker(config(vec![url.clone()]))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_map_and_its_expiry() {
    let r = RedisServer::start();
    let cfg = config(vec![r.url()]);
    let (a, b) = (map_broker(cfg.clone()).await, map_broker(cfg).await);
    let rec = Rec::new();
    a.set_handler(Rec::new());
    b.set_handler(rec.clone());
    b.subscribe("room").await.expect("subscribe");
    let s = conformance::map_settings(Some(Duration::from_secs(2)));
    let w = a
        .publish("room", map_put("alice", "here"), &s)
        .await
        .expect("publish");
    assert_eq!(w.position.offset, 1);
    rec.wait("the write reaches the other node", |_| {
        rec.pubs("room") == [1]
    })
    .await;
    let page = b
        .read_state("room", &state_query(), &s)
        .await
        .expect("state");
    assert_eq!(page.top, w.position, "one stream, one position");
    assert_eq!(page.entries.len(), 1);
    assert_eq!(
        (&*page.entries[0].key, &page.entries[0].data[..]),
        ("alice", &b"here"[..])
    );
    // Some node's sweeper removes the key at its TTL; the removal reaches the subscriber.
    rec.wait("the expiry's removal delivered", |_| {
        rec.pubs("room") == [1, 2]
    })
    .await;
    for m in [&a, &b] {
        assert_eq!(m.num_keys("room").await.expect("keys"), 0);
    }
    let stream = b
        .read_stream(
            "room",
            &HistoryQuery {
                since: Some((1, w.position.epoch.to_string())),
                limit: None,
                reverse: false,
                meta_ttl: Duration::from_secs(60),
            },
        )
        .await
        .expect("stream");
    assert_eq!(stream.publications.len(), 1, "one removal, swept once");
    assert!(stream.publications[0].removed && stream.publications[0].key == "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_state_survives_a_persistent_redis_restart_and_a_lost_one_is_told() {
    let s = conformance::map_settings(None);
    // With an append-only file, a kill -9 and restart keeps the state and its epoch.
    let mut r = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let m = map_broker(config(vec![r.url()])).await;
    m.set_handler(Rec::new());
    let w = m
        .publish("p", map_put("k", "v"), &s)
        .await
        .expect("publish");
    r.kill();
    r.restart();
    let page = loop {
        match m.read_state("p", &state_query(), &s).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(page.top, w.position, "same epoch, same offset");
    assert_eq!(page.entries.len(), 1);
    // Without persistence the state is gone: a subscriber is told (the position check after
    // the pub/sub reconnect), and the channel starts over under a new epoch.
    let mut r = RedisServer::start();
    let m = map_broker(config(vec![r.url()])).await;
    let rec = Rec::new();
    m.set_handler(rec.clone());
    m.subscribe("p").await.expect("subscribe");
    let w = m
        .publish("p", map_put("k", "v"), &s)
        .await
        .expect("publish");
    rec.wait("first write", |_| rec.pubs("p") == [1]).await;
    r.kill();
    r.restart();
    rec.wait("subscribers checked after the restart", |ev| {
        ev.iter()
            .any(|x| matches!(x, Ev::Check(c, 0, ep) if c == "p" && ep.is_empty()))
    })
    .await;
    let page = m.read_state("p", &state_query(), &s).await.expect("state");
    assert!(page.entries.is_empty());
    assert_ne!(
        page.top.epoch, w.position.epoch,
        "a new epoch: never a stale state"
    );
}
