//! Holdfast's Redis engine: many nodes over one or more Redis instances, or a Redis Cluster.
//!
//! - **Publish** is one Lua script per publication: idempotency check, epoch creation, offset
//!   increment, `XADD MAXLEN` with the offset as entry id, TTLs, and the pub/sub publish of the
//!   encoded publication with its offset and epoch, atomically per channel. A history read is
//!   one script too (`XRANGE`/`XREVRANGE` plus the stream position).
//! - **Delivery**: a node subscribes a channel's pub/sub when its first local subscriber
//!   arrives, over one of `pubsub_shards` RESP3 connections per instance (chosen by channel
//!   hash, so per-channel order holds); see [`pubsub`] for liveness and rebuilds.
//! - **Presence** is a hash plus a sorted set of expiries per channel; nodes refresh the
//!   entries of their own clients every third of `presence_ttl`.
//! - **Scale-out**: channels are spread over several independent instances by jump consistent
//!   hash, or over a Redis Cluster with sharded pub/sub. Every key of one channel carries the
//!   same `{partition}` hash tag.
//! - **Control**: node-to-node commands travel on one control channel (first instance).

#![deny(missing_docs)]

mod codec;
mod pubsub;
mod scripts;

use async_trait::async_trait;
use bytes::Bytes;
use holdfast_core::engine::{
    Broker, BrokerHandler, CursorStore, EngineError, HistoryPage, HistoryQuery, PresenceStore,
    PublishOptions, PublishOutcome, StreamTop, new_epoch,
};
use holdfast_protocol::{ClientInfo, Publication};
use parking_lot::Mutex;
use redis::{FromRedisValue, RedisFuture, Script, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// Redis engine settings (`engine.redis.*`, deserialised from the server's configuration as
/// they are).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` (`rediss://` for TLS is not built in), one per
    /// independent instance (channels are spread over them), or a single
    /// `redis+cluster://host:port[,host:port…]` naming seed nodes of a Redis Cluster. In the
    /// configuration `address`: one string or a list.
    #[serde(rename = "address", deserialize_with = "one_or_many")]
    pub addresses: Vec<String>,
    /// Prefix of every key and pub/sub channel (several Holdfast clusters can share a Redis).
    pub prefix: String,
    /// Hash-tag partitions channels are spread over (keys of one channel share one).
    /// Changing it changes key names: streams start over with new epochs.
    pub partitions: u32,
    /// Pub/sub connections per instance (channels hashed over them).
    pub pubsub_shards: usize,
    /// Connect timeout.
    #[serde(with = "holdfast_core::config::duration")]
    pub connect_timeout: Duration,
    /// Command timeout: a publish against an unreachable Redis fails after at most this.
    #[serde(with = "holdfast_core::config::duration")]
    pub command_timeout: Duration,
    /// How often each pub/sub connection is probed.
    #[serde(with = "holdfast_core::config::duration")]
    pub ping_interval: Duration,
    /// Presence entries expire this long after their node last refreshed them.
    #[serde(with = "holdfast_core::config::duration")]
    pub presence_ttl: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self::new(vec!["redis://127.0.0.1:6379".into()])
    }
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl RedisConfig {
    /// Defaults for `addresses`.
    pub fn new(addresses: Vec<String>) -> Self {
        Self {
            addresses,
            prefix: "holdfast".into(),
            partitions: 64,
            pubsub_shards: 2,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(60),
        }
    }

    fn ping_timeout(&self) -> Duration {
        self.command_timeout.max(self.ping_interval)
    }

    /// Checks the settings; each problem as (field, message).
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        if self.addresses.is_empty() {
            errs.push(("engine.redis.address", "needs at least one address".into()));
        }
        for a in &self.addresses {
            if let Err(e) = parse_address(a) {
                errs.push(("engine.redis.address", e));
            }
        }
        if self.addresses.len() > 1 && self.addresses.iter().any(|a| a.contains("+cluster://")) {
            errs.push((
                "engine.redis.address",
                "a redis+cluster:// address must be the only address".into(),
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            errs.push((
                "engine.redis.prefix",
                "must be non-empty without { or }".into(),
            ));
        }
        if !(1..=16384).contains(&self.partitions) {
            errs.push(("engine.redis.partitions", "must be 1..=16384".into()));
        }
        if !(1..=64).contains(&self.pubsub_shards) {
            errs.push(("engine.redis.pubsub_shards", "must be 1..=64".into()));
        }
        if self.presence_ttl < Duration::from_secs(3) {
            errs.push(("engine.redis.presence_ttl", "must be at least 3s".into()));
        }
        if self.ping_interval.is_zero() || self.command_timeout.is_zero() {
            errs.push((
                "engine.redis",
                "ping_interval and command_timeout must be positive".into(),
            ));
        }
        errs
    }
}

/// Where one instance (or the cluster) is.
#[derive(Clone)]
pub(crate) enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

fn resp3(url: &str) -> Result<redis::ConnectionInfo, String> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|e| format!("{url}: {e}"))?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(settings))
}

/// Parses one `engine.redis.address` entry.
fn parse_address(a: &str) -> Result<Target, String> {
    if a.starts_with("redis+sentinel://") || a.starts_with("rediss+sentinel://") {
        return Err(format!(
            "{a}: Sentinel is not supported yet; point Holdfast at the master through a \
             proxy, or use Redis Cluster"
        ));
    }
    if a.starts_with("rediss") {
        return Err(format!("{a}: TLS to Redis is not built in"));
    }
    if let Some(rest) = a.strip_prefix("redis+cluster://") {
        let (cred, hosts) = match rest.rsplit_once('@') {
            Some((c, h)) => (format!("{c}@"), h),
            None => (String::new(), rest),
        };
        let hosts = hosts.split('/').next().unwrap_or_default();
        let seeds: Result<Vec<_>, String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| resp3(&format!("redis://{cred}{h}")))
            .collect();
        let seeds = seeds?;
        if seeds.is_empty() {
            return Err(format!("{a}: names no seed node"));
        }
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(|e| format!("{a}: {e}"))?;
        return Ok(Target::Cluster(Box::new(client)));
    }
    if !(a.starts_with("redis://") || a.starts_with("unix://") || a.starts_with("redis+unix://")) {
        return Err(format!(
            "{a}: expected redis://, unix:// or redis+cluster://"
        ));
    }
    redis::Client::open(resp3(a)?)
        .map(Target::Single)
        .map_err(|e| format!("{a}: {e}"))
}

/// A command connection: auto-reconnecting, pipelining concurrent commands.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Key and channel names.
#[derive(Debug)]
pub(crate) struct Keys {
    prefix: String,
    partitions: u32,
    instances: usize,
    control: String,
}

/// FNV-1a: stable across versions and machines (every node must agree).
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping & Veach): adding an instance moves only 1/n of the channels.
fn jump(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    let n = buckets as i64;
    while j < n {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

impl Keys {
    fn new(prefix: &str, partitions: u32, instances: usize) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions,
            instances,
            control: format!("{prefix}:{{ctl}}"),
        }
    }
    fn partition(&self, ch: &str) -> u32 {
        (fnv(ch) % u64::from(self.partitions)) as u32
    }
    fn instance(&self, ch: &str) -> usize {
        if self.instances <= 1 {
            0
        } else {
            jump(fnv(ch).rotate_left(17), self.instances)
        }
    }
    fn key(&self, kind: &str, ch: &str) -> String {
        format!("{}:{{{}}}:{kind}:{ch}", self.prefix, self.partition(ch))
    }
    fn stream(&self, ch: &str) -> String {
        self.key("s", ch)
    }
    fn meta(&self, ch: &str) -> String {
        self.key("m", ch)
    }
    pub(crate) fn pubsub(&self, ch: &str) -> String {
        self.key("c", ch)
    }
    fn presence_hash(&self, ch: &str) -> String {
        self.key("ph", ch)
    }
    fn presence_zset(&self, ch: &str) -> String {
        self.key("pz", ch)
    }
    fn idempotency(&self, ch: &str, key: &str) -> String {
        format!(
            "{}:{{{}}}:i:{}:{ch}:{key}",
            self.prefix,
            self.partition(ch),
            ch.len()
        )
    }
    fn cursor(&self, user: &str, ch: &str) -> String {
        format!(
            "{}:{{{}}}:u:{}:{user}:{ch}",
            self.prefix,
            self.partition(ch),
            user.len()
        )
    }
    pub(crate) fn control(&self) -> &str {
        &self.control
    }
    /// The node channel of a pub/sub channel name.
    pub(crate) fn channel_of<'a>(&self, name: &'a [u8]) -> Option<&'a str> {
        let rest = name
            .strip_prefix(self.prefix.as_bytes())?
            .strip_prefix(b":{")?;
        let close = rest.iter().position(|&b| b == b'}')?;
        let rest = rest[close..].strip_prefix(b"}:c:")?;
        std::str::from_utf8(rest).ok()
    }
}

struct Scripts {
    publish: Script,
    history: Script,
    presence_add: Script,
    presence_get: Script,
    presence_remove: Script,
    cursor_save: Script,
}

/// (channel, client) of a presence entry.
type PresenceKey = (Arc<str>, Arc<str>);

/// What the engine's tasks share.
pub(crate) struct Shared {
    cfg: RedisConfig,
    pub(crate) keys: Keys,
    cluster: bool,
    cmds: Vec<Conn>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    scripts: Scripts,
    /// Presence entries of this node's clients, refreshed until removed.
    local_presence: Mutex<HashMap<PresenceKey, Vec<u8>>>,
    /// Notified whenever a pub/sub shard connects.
    connected: tokio::sync::Notify,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> EngineError {
    EngineError::Unavailable(format!("redis: {e}"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Shared {
    pub(crate) fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    fn conn(&self, ch: &str) -> Conn {
        self.cmds[self.keys.instance(ch)].clone()
    }

    fn publish_cmd(&self) -> &'static str {
        if self.cluster { "spublish" } else { "publish" }
    }

    /// The stream position without creating a stream (`{0, ""}` when there is none).
    pub(crate) async fn stream_top(
        &self,
        instance: usize,
        ch: &str,
    ) -> Result<StreamTop, EngineError> {
        let mut c = self.cmds[instance].clone();
        let v: Value = self
            .scripts
            .history
            .key(self.keys.stream(ch))
            .key(self.keys.meta(ch))
            .arg("")
            .arg(0)
            .arg("")
            .arg("")
            .arg(0)
            .arg("0")
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        let (top, _) = parse_history(v)?;
        Ok(top)
    }

    async fn refresh_presence(&self) {
        use futures_util::StreamExt;
        let entries: Vec<(PresenceKey, Vec<u8>)> = self
            .local_presence
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ttl = ms(self.cfg.presence_ttl);
        let mut failed = 0usize;
        let mut runs =
            futures_util::stream::iter(entries.into_iter().map(|((ch, client), blob)| {
                let mut c = self.conn(&ch);
                let (h, z) = (self.keys.presence_hash(&ch), self.keys.presence_zset(&ch));
                async move {
                    self.scripts
                        .presence_add
                        .key(h)
                        .key(z)
                        .arg(&*client)
                        .arg(blob)
                        .arg(ttl)
                        .invoke_async::<()>(&mut c)
                        .await
                }
            }))
            .buffer_unordered(64);
        while let Some(r) = runs.next().await {
            if r.is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            tracing::warn!(failed, "presence refresh failed for some entries");
        }
    }
}

/// Parses a HISTORY script reply into the position and the entries.
fn parse_history(v: Value) -> Result<(StreamTop, Vec<Arc<Publication>>), EngineError> {
    let bad =
        |what: &str| EngineError::Unavailable(format!("redis: unexpected history reply ({what})"));
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    let mut it = items.into_iter();
    let top = match it.next() {
        Some(Value::Int(n)) => u64::try_from(n).map_err(|_| bad("negative top"))?,
        _ => return Err(bad("top")),
    };
    let epoch: Arc<str> = match it.next() {
        Some(v) => String::from_redis_value(v)
            .map_err(|_| bad("epoch"))?
            .into(),
        None => return Err(bad("epoch")),
    };
    let top = StreamTop { offset: top, epoch };
    let mut pubs = Vec::new();
    match it.next() {
        None => {}
        Some(Value::BulkString(b)) if b == b"epoch" => {
            return Err(EngineError::UnrecoverablePosition);
        }
        Some(Value::SimpleString(s)) if s == "epoch" => {
            return Err(EngineError::UnrecoverablePosition);
        }
        Some(Value::Array(entries)) => {
            pubs.reserve(entries.len());
            for e in entries {
                let Value::Array(parts) = e else {
                    return Err(bad("entry"));
                };
                let mut p = parts.into_iter();
                let id = match p.next() {
                    Some(v) => String::from_redis_value(v).map_err(|_| bad("id"))?,
                    None => return Err(bad("id")),
                };
                let offset: u64 = id
                    .split('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("id"))?;
                let fields = match p.next() {
                    Some(Value::Array(f)) => f,
                    _ => return Err(bad("fields")),
                };
                let data = fields
                    .into_iter()
                    .nth(1)
                    .and_then(|v| match v {
                        Value::BulkString(b) => Some(b),
                        _ => None,
                    })
                    .ok_or_else(|| bad("data"))?;
                let publication = codec::decode_pub(&data, offset).map_err(|_| bad("payload"))?;
                pubs.push(Arc::new(publication));
            }
        }
        Some(_) => return Err(bad("entries")),
    }
    Ok((top, pubs))
}

/// The Redis engine: [`Broker`], [`PresenceStore`] and [`CursorStore`].
#[derive(Debug)]
pub struct RedisEngine {
    shared: Arc<Shared>,
    /// Per instance, its pub/sub shards.
    shards: Vec<Vec<pubsub::ShardHandle>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl RedisEngine {
    /// Builds the engine and starts connecting in the background (see [`RedisEngine::connected`]).
    /// Fails only on invalid settings. Must run inside a Tokio runtime.
    pub fn new(cfg: RedisConfig) -> Result<Arc<Self>, String> {
        if let Some((field, msg)) = cfg.validate().into_iter().next() {
            return Err(format!("{field}: {msg}"));
        }
        let targets: Vec<Target> = cfg
            .addresses
            .iter()
            .map(|a| parse_address(a))
            .collect::<Result<_, _>>()?;
        let cluster = matches!(targets.first(), Some(Target::Cluster(_)));
        let mut cmds = Vec::with_capacity(targets.len());
        for t in &targets {
            cmds.push(match t {
                Target::Single(client) => {
                    let mc = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(cfg.connect_timeout))
                        .set_response_timeout(Some(cfg.command_timeout))
                        .set_number_of_retries(1)
                        .set_min_delay(Duration::from_millis(20))
                        .set_max_delay(Duration::from_millis(200));
                    Conn::Single(
                        redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), mc)
                            .map_err(|e| e.to_string())?,
                    )
                }
                Target::Cluster(client) => {
                    let cc = redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(cfg.connect_timeout)
                        .set_response_timeout(cfg.command_timeout);
                    Conn::Cluster(client.get_pending_async_connection_with_config(cc))
                }
            });
        }
        let shared = Arc::new(Shared {
            keys: Keys::new(&cfg.prefix, cfg.partitions, targets.len()),
            cfg: cfg.clone(),
            cluster,
            cmds,
            handler: OnceLock::new(),
            scripts: Scripts {
                publish: Script::new(scripts::PUBLISH),
                history: Script::new(scripts::HISTORY),
                presence_add: Script::new(scripts::PRESENCE_ADD),
                presence_get: Script::new(scripts::PRESENCE_GET),
                presence_remove: Script::new(scripts::PRESENCE_REMOVE),
                cursor_save: Script::new(scripts::CURSOR_SAVE),
            },
            local_presence: Mutex::default(),
            connected: tokio::sync::Notify::new(),
        });
        let shards = targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                (0..cfg.pubsub_shards)
                    .map(|s| pubsub::spawn(shared.clone(), t.clone(), i, i == 0 && s == 0))
                    .collect()
            })
            .collect();
        let refresher = tokio::spawn(refresh_loop(Arc::downgrade(&shared)));
        Ok(Arc::new(Self {
            shared,
            shards,
            refresher,
        }))
    }

    /// Resolves once every pub/sub connection is up (the node can then be marked ready).
    pub async fn connected(&self) {
        loop {
            let n = self.shared.connected.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.healthy_now() {
                return;
            }
            n.await;
        }
    }

    fn healthy_now(&self) -> bool {
        self.shards
            .iter()
            .flatten()
            .all(|s| s.connected.load(Ordering::Acquire))
    }

    fn shard(&self, ch: &str) -> &pubsub::ShardHandle {
        let k = &self.shared.keys;
        let shards = &self.shards[k.instance(ch)];
        &shards[k.partition(ch) as usize % shards.len()]
    }

    async fn publish_raw(&self, ch: &str, msg: Vec<u8>) -> Result<(), EngineError> {
        let mut c = self.shared.conn(ch);
        redis::cmd(self.shared.publish_cmd())
            .arg(self.shared.keys.pubsub(ch))
            .arg(msg)
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }
}

async fn refresh_loop(shared: Weak<Shared>) {
    let every = match shared.upgrade() {
        Some(s) => s.cfg.presence_ttl / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        s.refresh_presence().await;
    }
}

#[async_trait]
impl Broker for RedisEngine {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        if self.shared.handler.set(handler).is_err() {
            tracing::warn!("redis engine handler set twice; keeping the first");
        }
    }

    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: &PublishOptions,
    ) -> Result<PublishOutcome, EngineError> {
        let k = &self.shared.keys;
        let payload = codec::encode_pub(&publication);
        let (size, ttl, meta_ttl) = match &opts.history {
            Some(h) => (h.size.max(1), ms(h.ttl).max(1), ms(h.meta_ttl)),
            None => (0, 0, 0),
        };
        let idem_key = opts
            .idempotency_key
            .as_deref()
            .map(|key| k.idempotency(channel, key));
        let idem_ttl = if idem_key.is_some() {
            ms(opts.idempotency_ttl).max(1)
        } else {
            0
        };
        let mut c = self.shared.conn(channel);
        let meta = k.meta(channel);
        let (suppressed, result): (i64, String) = self
            .shared
            .scripts
            .publish
            .key(k.stream(channel))
            .key(&meta)
            .key(idem_key.as_deref().unwrap_or(&meta))
            .arg(payload)
            .arg(size)
            .arg(ttl)
            .arg(meta_ttl)
            .arg(&*new_epoch())
            .arg(k.pubsub(channel))
            .arg(self.shared.publish_cmd())
            .arg(idem_ttl)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        let position = match result.split_once(':') {
            Some((o, e)) => Some(StreamTop {
                offset: o.parse().map_err(|_| {
                    EngineError::Unavailable("redis: unexpected publish reply".into())
                })?,
                epoch: e.into(),
            }),
            None => None,
        };
        Ok(PublishOutcome {
            position,
            suppressed: suppressed == 1,
        })
    }

    async fn publish_join(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.publish_raw(channel, codec::wire_event(b'j', &info))
            .await
    }

    async fn publish_leave(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.publish_raw(channel, codec::wire_event(b'l', &info))
            .await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shard(channel)
            .tx
            .send(pubsub::ShardCmd::Subscribe(channel.to_owned(), tx))
            .map_err(|_| EngineError::Unavailable("redis engine stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("redis engine stopped".into()))?
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), EngineError> {
        self.shard(channel)
            .tx
            .send(pubsub::ShardCmd::Unsubscribe(channel.to_owned()))
            .map_err(|_| EngineError::Unavailable("redis engine stopped".into()))
    }

    async fn history(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError> {
        let k = &self.shared.keys;
        let mut c = self.shared.conn(channel);
        let (since, since_epoch) = match &query.since {
            Some((o, e)) => (o.to_string(), e.as_str()),
            None => (String::new(), ""),
        };
        let limit: i64 = match query.limit {
            None => -1,
            Some(n) => i64::try_from(n).unwrap_or(i64::MAX),
        };
        let v: Value = self
            .shared
            .scripts
            .history
            .key(k.stream(channel))
            .key(k.meta(channel))
            .arg(&*new_epoch())
            .arg(ms(query.meta_ttl))
            .arg(since)
            .arg(since_epoch)
            .arg(limit)
            .arg(if query.reverse { "1" } else { "0" })
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        let (top, publications) = parse_history(v)?;
        Ok(HistoryPage { publications, top })
    }

    async fn remove_history(&self, channel: &str) -> Result<(), EngineError> {
        let mut c = self.shared.conn(channel);
        redis::cmd("DEL")
            .arg(self.shared.keys.stream(channel))
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn publish_control(&self, data: Bytes) -> Result<(), EngineError> {
        let mut c = self.shared.cmds[0].clone();
        redis::cmd(self.shared.publish_cmd())
            .arg(self.shared.keys.control())
            .arg(&data[..])
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }

    fn distributed(&self) -> bool {
        true
    }

    fn healthy(&self) -> bool {
        self.healthy_now()
    }

    async fn ready(&self) {
        self.connected().await;
    }
}

#[async_trait]
impl PresenceStore for RedisEngine {
    async fn add_presence(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        let k = &self.shared.keys;
        let blob = codec::encode_info(&info);
        let mut c = self.shared.conn(channel);
        self.shared
            .scripts
            .presence_add
            .key(k.presence_hash(channel))
            .key(k.presence_zset(channel))
            .arg(&*info.client)
            .arg(&blob)
            .arg(ms(self.shared.cfg.presence_ttl))
            .invoke_async::<()>(&mut c)
            .await
            .map_err(unavailable)?;
        self.shared
            .local_presence
            .lock()
            .insert((channel.into(), Arc::from(&*info.client)), blob);
        Ok(())
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), EngineError> {
        self.shared
            .local_presence
            .lock()
            .remove(&(Arc::from(channel), Arc::from(client)));
        let k = &self.shared.keys;
        let mut c = self.shared.conn(channel);
        self.shared
            .scripts
            .presence_remove
            .key(k.presence_hash(channel))
            .key(k.presence_zset(channel))
            .arg(client)
            .invoke_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, EngineError> {
        let k = &self.shared.keys;
        let mut c = self.shared.conn(channel);
        let blobs: Vec<Vec<u8>> = self
            .shared
            .scripts
            .presence_get
            .key(k.presence_hash(channel))
            .key(k.presence_zset(channel))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(blobs.len());
        for b in blobs {
            match codec::decode_info(&b) {
                Ok(i) => out.push(Arc::new(i)),
                Err(e) => tracing::warn!(channel, error = %e, "undecodable presence entry"),
            }
        }
        Ok(out)
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), EngineError> {
        let all = self.presence(channel).await?;
        let mut users: Vec<&str> = all.iter().map(|i| &*i.user).collect();
        users.sort_unstable();
        users.dedup();
        Ok((
            u32::try_from(all.len()).unwrap_or(u32::MAX),
            u32::try_from(users.len()).unwrap_or(u32::MAX),
        ))
    }
}

#[async_trait]
impl CursorStore for RedisEngine {
    async fn save_cursor(
        &self,
        user: &str,
        channel: &str,
        pos: &StreamTop,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let mut c = self.shared.conn(channel);
        self.shared
            .scripts
            .cursor_save
            .key(self.shared.keys.cursor(user, channel))
            .arg(pos.offset)
            .arg(&*pos.epoch)
            .arg(ms(ttl).max(1))
            .invoke_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn load_cursor(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<Option<StreamTop>, EngineError> {
        let mut c = self.shared.conn(channel);
        let v: Option<String> = redis::cmd("GET")
            .arg(self.shared.keys.cursor(user, channel))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(v.and_then(|s| {
            let (o, e) = s.split_once(':')?;
            Some(StreamTop {
                offset: o.parse().ok()?,
                epoch: e.into(),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_share_a_hash_tag() {
        let k = Keys::new("hf", 64, 1);
        let ch = "chat:room}{x";
        let name = k.pubsub(ch);
        assert_eq!(k.channel_of(name.as_bytes()), Some(ch));
        let tag = |s: &str| {
            let o = s.find('{').unwrap_or(0);
            let c = s[o..].find('}').unwrap_or(0) + o;
            s[o..=c].to_owned()
        };
        for key in [
            k.stream(ch),
            k.meta(ch),
            k.presence_hash(ch),
            k.presence_zset(ch),
            k.idempotency(ch, "key"),
            k.cursor("u:1", ch),
        ] {
            assert_eq!(tag(&key), tag(&name), "{key}");
        }
        assert_eq!(k.channel_of(b"hf:{3}:s:x"), None);
        assert_eq!(k.channel_of(b"other:{3}:c:x"), None);
    }

    #[test]
    fn jump_hash_spreads_and_moves_little() {
        let chans: Vec<String> = (0..10_000).map(|i| format!("ch{i}")).collect();
        let mut counts = [0usize; 3];
        let mut moved = 0;
        for c in &chans {
            let k3 = Keys::new("p", 64, 3).instance(c);
            counts[k3] += 1;
            if Keys::new("p", 64, 2).instance(c) != k3 {
                moved += 1;
            }
        }
        for n in counts {
            assert!((2_800..3_900).contains(&n), "uneven spread {counts:?}");
        }
        assert!(
            (2_800..3_900).contains(&moved),
            "2→3 instances moves about a third: {moved}"
        );
    }

    #[test]
    fn addresses_are_checked() {
        let bad = |a: &str| RedisConfig::new(vec![a.into()]).validate();
        assert!(bad("redis://127.0.0.1:6379").is_empty());
        assert!(bad("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").is_empty());
        assert!(!bad("http://x").is_empty());
        assert!(!bad("redis+sentinel://h:26379/m").is_empty());
        assert!(!bad("redis+cluster://").is_empty());
        let two = RedisConfig::new(vec![
            "redis+cluster://127.0.0.1:7000".into(),
            "redis://127.0.0.1:6379".into(),
        ]);
        assert!(!two.validate().is_empty());
    }
}
