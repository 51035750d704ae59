//! The Redis map broker: map channels' state and change streams in Redis, shared by every node.
//!
//! A map channel's change stream is its Redis stream and meta, exactly as a stream channel's
//! history, and its writes go out on the channel's pub/sub like publications: the engine's
//! pub/sub shards carry them, with the same position checks after a reconnect (a subscriber
//! that missed writes is told). Beside them the channel keeps its state (key → the publication
//! that last wrote it, with its offset), the keys in order (for paging) and their expiries;
//! each write is one Lua script, so state, stream and delivery agree per channel. Key expiry is
//! swept by every node once a second from per-partition sets of channels with expiring keys
//! (running the same sweep twice removes nothing twice); see `scripts::map_lib`.

use crate::{RedisEngine, Shared, codec, history_read, ms, reply_top, scripts, unavailable};
use async_trait::async_trait;
use holdfast_core::engine::map::{
    KeyMode, MapBroker, MapOutcome, MapSettings, MapWrite, StatePage, StateQuery, Suppressed,
};
use holdfast_core::engine::{
    Broker, BrokerHandler, EngineError, HistoryPage, HistoryQuery, StreamTop, new_epoch,
};
use holdfast_protocol::Publication;
use redis::{FromRedisValue, Script, Value};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Most keys one sweep of one channel removes (the rest wait for the next second).
const SWEEP_BATCH: usize = 1000;
/// Most channels one sweep of one partition visits.
const SWEEP_CHANNELS: usize = 100;
/// Most partitions (of all instances) one tick visits; the next tick goes on from there.
const SWEEP_PARTITIONS: usize = 256;

struct MapScripts {
    publish: Script,
    state: Script,
    stream: Script,
    touch: Script,
    expire: Script,
    clear: Script,
}

/// The Redis map broker (over the engine's connections and pub/sub).
pub struct RedisMapBroker {
    engine: Arc<RedisEngine>,
    scripts: Arc<MapScripts>,
    /// Set by the first map call: a node that never serves a map channel never sweeps.
    active: Arc<AtomicBool>,
    sweeper: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RedisMapBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisMapBroker").finish_non_exhaustive()
    }
}

impl Drop for RedisMapBroker {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bad(what: &str) -> EngineError {
    EngineError::Unavailable(format!("redis: unexpected map reply ({what})"))
}

/// `<offset>:<epoch>` as the scripts answer positions.
fn position(s: &str) -> Result<StreamTop, EngineError> {
    let (o, e) = s.split_once(':').ok_or_else(|| bad("position"))?;
    Ok(StreamTop {
        offset: o.parse().map_err(|_| bad("offset"))?,
        epoch: e.into(),
    })
}

/// A state entry: `<offset>:<encoded publication>`.
fn entry(v: &[u8]) -> Result<Publication, EngineError> {
    let colon = v
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| bad("entry"))?;
    let offset: u64 = std::str::from_utf8(&v[..colon])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("entry offset"))?;
    codec::decode_pub(&v[colon + 1..], offset).map_err(|_| bad("entry encoding"))
}

impl RedisMapBroker {
    /// A map broker over `engine`'s connections; its expiry sweeper stops when it is dropped.
    /// Must be called inside a Tokio runtime.
    pub fn new(engine: Arc<RedisEngine>) -> Arc<Self> {
        let scripts = Arc::new(MapScripts {
            publish: Script::new(scripts::MAP_PUBLISH),
            state: Script::new(scripts::MAP_STATE),
            stream: Script::new(scripts::MAP_STREAM),
            touch: Script::new(scripts::MAP_TOUCH),
            expire: Script::new(scripts::MAP_EXPIRE),
            clear: Script::new(scripts::MAP_CLEAR),
        });
        let active = Arc::new(AtomicBool::new(false));
        let sweeper = tokio::spawn(sweep_loop(
            Arc::downgrade(&engine.shared),
            scripts.clone(),
            active.clone(),
        ));
        Arc::new(Self {
            engine,
            scripts,
            active,
            sweeper,
        })
    }

    /// The engine's connections, marking the broker in use (its sweeper starts).
    fn shared(&self) -> &Shared {
        if !self.active.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::Relaxed);
        }
        &self.engine.shared
    }

    fn script<'a>(&self, s: &'a Script, channel: &str) -> redis::ScriptInvocation<'a> {
        let mut inv = s.prepare_invoke();
        for k in self.shared().keys.map(channel) {
            inv.key(k);
        }
        inv
    }
}

/// Once a second, while the node serves map channels, sweeps up to [`SWEEP_PARTITIONS`]
/// partitions, going on from the last (every partition each second with the default 64).
async fn sweep_loop(shared: Weak<Shared>, scripts: Arc<MapScripts>, active: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0usize;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if active.load(Ordering::Relaxed) {
            next = sweep(&shared, &scripts, next).await;
        }
    }
}

/// Sweeps partitions from number `from` (over all instances); returns where the next sweep
/// starts.
async fn sweep(shared: &Shared, scripts: &MapScripts, from: usize) -> usize {
    use futures_util::StreamExt;
    let now = unix_ms();
    let k = &shared.keys;
    let parts = k.partitions() as usize;
    let total = k.instances() * parts;
    let count = total.min(SWEEP_PARTITIONS);
    let targets = (0..count).map(|n| {
        let at = (from + n) % total;
        (at / parts, (at % parts) as u32)
    });
    let removed: usize = futures_util::stream::iter(targets)
        .map(|(instance, partition)| async move {
            let mut c = shared.cmds[instance].clone();
            let due: Vec<String> = match redis::cmd("ZRANGEBYSCORE")
                .arg(k.map_expiring(partition))
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_CHANNELS)
                .query_async(&mut c)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "map expiry sweep: read failed");
                    return 0;
                }
            };
            let mut n = 0;
            for ch in due {
                let mut inv = scripts.expire.prepare_invoke();
                for key in k.map(&ch) {
                    inv.key(key);
                }
                inv.arg(now)
                    .arg(SWEEP_BATCH)
                    .arg(&ch)
                    .arg(k.pubsub(&ch))
                    .arg(shared.publish_cmd());
                match inv.invoke_async::<usize>(&mut c).await {
                    Ok(r) => n += r,
                    Err(e) => {
                        tracing::warn!(channel = %ch, error = %e, "map expiry sweep failed");
                    }
                }
            }
            n
        })
        .buffer_unordered(8)
        .fold(0, |a, n| async move { a + n })
        .await;
    if removed > 0 {
        metrics::counter!("holdfast_map_keys_expired_total").increment(removed as u64);
    }
    (from + count) % total
}

#[async_trait]
impl MapBroker for RedisMapBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        // The engine's pub/sub delivers map writes; its handler is the node's either way.
        let _ = self.engine.shared.handler.set(handler);
    }

    async fn subscribe(&self, channel: &str) -> Result<(), EngineError> {
        Broker::subscribe(&*self.engine, channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), EngineError> {
        Broker::unsubscribe(&*self.engine, channel).await
    }

    async fn publish(
        &self,
        channel: &str,
        write: MapWrite,
        settings: &MapSettings,
    ) -> Result<MapOutcome, EngineError> {
        let shared = self.shared();
        let k = &shared.keys;
        let p = Publication {
            data: write.data,
            info: write.info,
            tags: write.tags,
            time: unix_ms() as i64,
            binary: write.binary,
            key: write.key.clone(),
            removed: write.removed,
            ..Default::default()
        };
        let idem = write.idempotency_key.as_deref();
        let mut inv = self.script(&self.scripts.publish, channel);
        inv.key(match idem {
            Some(key) => k.idempotency(channel, key),
            None => k.meta(channel),
        });
        inv.arg(codec::encode_pub(&p))
            .arg(settings.stream.size.max(1))
            .arg(ms(settings.stream.ttl).max(1))
            .arg(ms(settings.stream.meta_ttl))
            .arg(&*new_epoch())
            .arg(k.pubsub(channel))
            .arg(shared.publish_cmd())
            .arg(if idem.is_some() {
                ms(write.idempotency_ttl).max(1)
            } else {
                0
            })
            .arg(write.version)
            .arg(&write.version_epoch)
            .arg(&write.key)
            .arg(if write.removed { "1" } else { "0" })
            .arg(match write.key_mode {
                KeyMode::Any => "",
                KeyMode::IfNew => "new",
                KeyMode::IfExists => "exists",
            })
            .arg(settings.key_ttl.map_or(0, ms))
            .arg(unix_ms())
            .arg(settings.max_keys)
            .arg(channel);
        let (code, pos): (u8, String) = inv
            .invoke_async(&mut shared.conn(channel))
            .await
            .map_err(unavailable)?;
        let suppressed = match code {
            0 => None,
            1 => Some(Suppressed::Idempotent),
            2 => Some(Suppressed::Version),
            3 => Some(Suppressed::KeyMode),
            4 => return Err(EngineError::Limit("keys per map channel")),
            _ => return Err(bad("publish code")),
        };
        Ok(MapOutcome {
            position: position(&pos)?,
            suppressed,
        })
    }

    async fn read_state(
        &self,
        channel: &str,
        query: &StateQuery,
        settings: &MapSettings,
    ) -> Result<StatePage, EngineError> {
        let shared = self.shared();
        let mut inv = self.script(&self.scripts.state, channel);
        let (rev_offset, rev_epoch) = match &query.revision {
            Some((o, e)) => (o.to_string(), e.as_str()),
            None => (String::new(), ""),
        };
        inv.arg(&*new_epoch())
            .arg(ms(settings.stream.meta_ttl))
            .arg(&query.cursor)
            .arg(query.limit.max(1))
            .arg(if query.key.is_some() { "1" } else { "0" })
            .arg(query.key.as_deref().unwrap_or(""))
            .arg(rev_offset)
            .arg(rev_epoch);
        let v: Value = inv
            .invoke_async(&mut shared.conn(channel))
            .await
            .map_err(unavailable)?;
        let Value::Array(items) = v else {
            return Err(bad("state"));
        };
        let mut it = items.into_iter();
        let top = reply_top(&mut it, bad)?;
        match it.next() {
            Some(Value::Int(1)) => {}
            Some(Value::Int(0)) => return Err(EngineError::UnrecoverablePosition),
            _ => return Err(bad("state flag")),
        }
        let cursor = match it.next() {
            Some(v) => String::from_redis_value(v).map_err(|_| bad("cursor"))?,
            None => return Err(bad("cursor")),
        };
        let mut entries = Vec::new();
        for v in it {
            match v {
                Value::Nil => {}
                Value::BulkString(b) => {
                    let p = entry(&b)?;
                    // Written after the revision: the stream after it carries the write.
                    if p.offset <= top.offset {
                        entries.push(Arc::new(p));
                    }
                }
                _ => return Err(bad("entry")),
            }
        }
        Ok(StatePage {
            entries,
            cursor,
            top,
        })
    }

    async fn read_stream(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError> {
        let shared = self.shared();
        let inv = self.script(&self.scripts.stream, channel);
        history_read(inv, &mut shared.conn(channel), query).await
    }

    async fn touch(
        &self,
        channel: &str,
        keys: &[String],
        settings: &MapSettings,
    ) -> Result<Vec<String>, EngineError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let shared = self.shared();
        let mut inv = self.script(&self.scripts.touch, channel);
        inv.arg(settings.key_ttl.map_or(0, ms))
            .arg(unix_ms())
            .arg(ms(settings.stream.meta_ttl));
        for k in keys {
            inv.arg(k);
        }
        inv.invoke_async(&mut shared.conn(channel))
            .await
            .map_err(unavailable)
    }

    async fn num_keys(&self, channel: &str) -> Result<usize, EngineError> {
        let shared = self.shared();
        redis::cmd("HLEN")
            .arg(&shared.keys.map(channel)[2])
            .query_async(&mut shared.conn(channel))
            .await
            .map_err(unavailable)
    }

    async fn clear(&self, channel: &str) -> Result<(), EngineError> {
        let shared = self.shared();
        let epoch = new_epoch();
        let mut inv = self.script(&self.scripts.clear, channel);
        inv.arg(&*epoch)
            .arg(channel)
            .arg(shared.keys.pubsub(channel))
            .arg(shared.publish_cmd());
        inv.invoke_async::<()>(&mut shared.conn(channel))
            .await
            .map_err(unavailable)
    }
}
