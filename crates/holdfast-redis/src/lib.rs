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
mod config;
mod keys;
mod map;
mod pubsub;
mod scripts;
mod sentinel;

pub(crate) use config::Target;
use config::parse_address;
pub use config::{RedisConfig, RedisTlsConfig};
use keys::Keys;
pub use map::RedisMapBroker;

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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// A command connection: auto-reconnecting, pipelining concurrent commands.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(Arc<ClusterCmd>),
    Sentinel(Arc<sentinel::SentinelConn>),
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis command timed out",
    ))
}

/// A cluster command connection with the longest a command may take, retries and slot
/// refreshes included: a command parked by the cluster client while a shard fails over is cut
/// there instead of waiting for ever (seen under a master kill: subscribes hung until
/// shutdown). A command cut so replaces the connection with a fresh one: after a master kill
/// the client was seen to park every later command of that connection for good (both nodes
/// of a failover run, 90 s, while newly made connections worked).
pub(crate) struct ClusterCmd {
    client: redis::cluster::ClusterClient,
    config: redis::cluster::ClusterConfig,
    limit: Duration,
    /// The connection and its generation.
    current: Mutex<(redis::cluster_async::ClusterConnection, u64)>,
}

impl ClusterCmd {
    fn new(
        client: redis::cluster::ClusterClient,
        config: redis::cluster::ClusterConfig,
        limit: Duration,
    ) -> Self {
        let conn = client.get_pending_async_connection_with_config(config.clone());
        Self {
            client,
            config,
            limit,
            current: Mutex::new((conn, 0)),
        }
    }

    fn get(&self) -> (redis::cluster_async::ClusterConnection, u64) {
        self.current.lock().clone()
    }

    /// Replaces generation `gen` (a command on it timed out); a later generation is kept.
    fn replace(&self, gen_: u64) {
        let mut cur = self.current.lock();
        if cur.1 == gen_ {
            tracing::warn!("redis cluster command timed out: replacing the connection");
            metrics::counter!("holdfast_redis_cluster_reconnects_total").increment(1);
            *cur = (
                self.client
                    .get_pending_async_connection_with_config(self.config.clone()),
                gen_ + 1,
            );
        }
    }

    async fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut redis::cluster_async::ClusterConnection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let (mut c, gen_) = self.get();
        match tokio::time::timeout(self.limit, f(&mut c)).await {
            Ok(r) => r,
            Err(_) => {
                self.replace(gen_);
                Err(timed_out())
            }
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => {
                Box::pin(async move { c.run(async |c| c.req_packed_command(cmd).await).await })
            }
            Conn::Sentinel(c) => Box::pin(async move { c.command(cmd).await }),
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
            Conn::Cluster(c) => Box::pin(async move {
                c.run(async |c| c.req_packed_commands(pipeline, offset, count).await)
                    .await
            }),
            Conn::Sentinel(c) => Box::pin(async move { c.commands(pipeline, offset, count).await }),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get().0.get_db(),
            Conn::Sentinel(c) => c.db(),
        }
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

/// Runs a history read (HISTORY, or MAP_STREAM: the same ARGV and reply) whose keys are set.
async fn history_read(
    mut inv: redis::ScriptInvocation<'_>,
    c: &mut Conn,
    query: &HistoryQuery,
) -> Result<HistoryPage, EngineError> {
    let (since, since_epoch) = match &query.since {
        Some((o, e)) => (o.to_string(), e.as_str()),
        None => (String::new(), ""),
    };
    let limit: i64 = match query.limit {
        None => -1,
        Some(n) => i64::try_from(n).unwrap_or(i64::MAX),
    };
    inv.arg(&*new_epoch())
        .arg(ms(query.meta_ttl))
        .arg(since)
        .arg(since_epoch)
        .arg(limit)
        .arg(if query.reverse { "1" } else { "0" });
    let v: Value = inv.invoke_async(c).await.map_err(unavailable)?;
    let (top, publications) = parse_history(v)?;
    Ok(HistoryPage { publications, top })
}

/// The `{top, epoch, ...}` head of a script's reply (the rest stays in `it`).
fn reply_top(
    it: &mut impl Iterator<Item = Value>,
    bad: impl Fn(&str) -> EngineError,
) -> Result<StreamTop, EngineError> {
    let offset = match it.next() {
        Some(Value::Int(n)) => u64::try_from(n).map_err(|_| bad("negative top"))?,
        _ => return Err(bad("top")),
    };
    let epoch: Arc<str> = match it.next() {
        Some(v) => String::from_redis_value(v)
            .map_err(|_| bad("epoch"))?
            .into(),
        None => return Err(bad("epoch")),
    };
    Ok(StreamTop { offset, epoch })
}

/// Parses a HISTORY script reply into the position and the entries.
fn parse_history(v: Value) -> Result<(StreamTop, Vec<Arc<Publication>>), EngineError> {
    let bad =
        |what: &str| EngineError::Unavailable(format!("redis: unexpected history reply ({what})"));
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    let mut it = items.into_iter();
    let top = reply_top(&mut it, bad)?;
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
        Self::build(cfg, true)
    }

    /// An engine for a map broker's own Redis ([`RedisMapBroker`]): its pub/sub carries map
    /// channels only, not the control channel (the node's engine does; hearing it twice would
    /// apply every control command twice when both share a Redis and prefix).
    pub fn for_maps(cfg: RedisConfig) -> Result<Arc<Self>, String> {
        Self::build(cfg, false)
    }

    fn build(cfg: RedisConfig, control: bool) -> Result<Arc<Self>, String> {
        if let Some((field, msg)) = cfg.validate().into_iter().next() {
            return Err(format!("{field}: {msg}"));
        }
        let targets: Vec<Target> = cfg
            .addresses
            .iter()
            .map(|a| parse_address(a, &cfg.tls, &cfg.sentinel_tls))
            .collect::<Result<_, _>>()?;
        let cluster = matches!(targets.first(), Some(Target::Cluster(_)));
        let mut cmds = Vec::with_capacity(targets.len());
        let mc = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        for t in &targets {
            let mc = mc.clone();
            cmds.push(match t {
                Target::Sentinel(s) => Conn::Sentinel(Arc::new(sentinel::SentinelConn::new(
                    s.clone(),
                    mc,
                    cfg.connect_timeout,
                    cfg.connect_timeout + 3 * cfg.command_timeout,
                ))),
                Target::Single(client) => Conn::Single(
                    redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), mc)
                        .map_err(|e| e.to_string())?,
                ),
                Target::Cluster(client) => {
                    let cc = redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(cfg.connect_timeout)
                        .set_response_timeout(cfg.command_timeout);
                    Conn::Cluster(Arc::new(ClusterCmd::new(
                        (**client).clone(),
                        cc,
                        cfg.connect_timeout + 3 * cfg.command_timeout,
                    )))
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
                    .map(|s| {
                        pubsub::spawn(shared.clone(), t.clone(), i, control && i == 0 && s == 0)
                    })
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
            .arg(opts.version)
            .arg(&opts.version_epoch)
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
            suppressed: suppressed != 0,
            stale: suppressed == 2,
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
        // The shard answers within its own timeout; this bound only guards against a shard
        // that stopped answering at all.
        let limit = 2 * (self.shared.cfg.ping_timeout() + self.shared.cfg.command_timeout);
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(EngineError::Unavailable(
                "redis pub/sub is reconnecting".into(),
            )),
            Err(_) => Err(EngineError::Unavailable(
                "redis pub/sub subscribe timed out".into(),
            )),
        }
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
        let mut inv = self.shared.scripts.history.prepare_invoke();
        inv.key(k.stream(channel)).key(k.meta(channel));
        history_read(inv, &mut self.shared.conn(channel), query).await
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
        assert!(bad("rediss://127.0.0.1:6380").is_empty());
        assert!(!bad("rediss+unix:///tmp/r.sock").is_empty());
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
