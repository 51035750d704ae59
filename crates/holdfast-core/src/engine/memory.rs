//! The memory engine: history, presence and idempotency in this process.
//!
//! Publish takes the channel's lock, appends, and calls the node's handler before releasing it,
//! so history append and delivery are atomic per channel and deliveries come in offset order.
//! A restart loses everything; every stream then starts under a new epoch, so clients that
//! recover are told `recovered: false` instead of being given wrong offsets.

use super::window::StreamWindow;
use super::{
    Broker, BrokerHandler, CursorStore, EngineError, HistoryPage, HistoryQuery, PresenceStore,
    PublishOptions, PublishOutcome, StreamTop, new_epoch,
};
use crate::shard::Sharded;
use async_trait::async_trait;
use holdfast_protocol::{ClientInfo, Publication};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::time::Instant;

const SHARDS: usize = 64;

/// Idempotency results kept per channel; beyond it publishes with a new key are refused rather
/// than silently losing the guarantee.
const MAX_IDEMPOTENCY_KEYS_PER_CHANNEL: usize = 100_000;

/// The memory engine (broker and presence).
#[derive(Debug)]
pub struct MemoryEngine {
    /// Channel states (streams and idempotency results), sharded by channel name.
    channels: Sharded<Mutex<HashMap<Arc<str>, SharedChannel>>>,
    /// Presence per channel: channel → client id → info.
    presence: Sharded<Mutex<HashMap<Arc<str>, ChannelPresence>>>,
    /// The node that receives deliveries.
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Delivery cursors: (user, channel) → position and expiry.
    cursors: Sharded<Mutex<HashMap<CursorKey, (StreamTop, Instant)>>>,
}

type CursorKey = (Arc<str>, Arc<str>);

type ChannelPresence = HashMap<Arc<str>, Arc<ClientInfo>>;
type SharedChannel = Arc<Mutex<ChannelState>>;

#[derive(Debug, Default)]
struct ChannelState {
    stream: Option<StreamWindow>,
    /// idempotency key → (result, expiry).
    idempotent: HashMap<String, (Option<StreamTop>, Instant)>,
}

impl MemoryEngine {
    /// Creates the engine and its background sweeper (which stops when the engine is dropped).
    /// Must be called inside a Tokio runtime.
    pub fn new() -> Arc<Self> {
        let engine = Arc::new(Self {
            channels: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
            presence: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
            handler: OnceLock::new(),
            cursors: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
        });
        let weak = Arc::downgrade(&engine);
        tokio::spawn(sweep_loop(weak));
        engine
    }

    fn channel_state(&self, channel: &str) -> Arc<Mutex<ChannelState>> {
        let mut shard = self.channels.get(channel).lock();
        if let Some(s) = shard.get(channel) {
            return s.clone();
        }
        let s = Arc::new(Mutex::new(ChannelState::default()));
        shard.insert(channel.into(), s.clone());
        s
    }

    fn existing_channel_state(&self, channel: &str) -> Option<Arc<Mutex<ChannelState>>> {
        self.channels.get(channel).lock().get(channel).cloned()
    }

    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    /// Number of channels with state (streams or idempotency results).
    pub fn num_channel_states(&self) -> usize {
        self.channels.iter().map(|s| s.lock().len()).sum()
    }

    /// Drops expired items, expired streams and expired idempotency results.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.cursors.iter() {
            shard.lock().retain(|_, (_, exp)| *exp > now);
        }
        for shard in self.channels.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, state| {
                let mut st = state.lock();
                st.idempotent.retain(|_, (_, exp)| *exp > now);
                if let Some(stream) = &mut st.stream {
                    stream.expire(now);
                    if now >= stream.meta_expire {
                        st.stream = None;
                    }
                }
                st.stream.is_some() || !st.idempotent.is_empty()
            });
        }
    }
}

async fn sweep_loop(engine: Weak<MemoryEngine>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match engine.upgrade() {
            Some(e) => e.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl Broker for MemoryEngine {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(
        &self,
        channel: &str,
        mut publication: Publication,
        opts: &PublishOptions,
    ) -> Result<PublishOutcome, EngineError> {
        if opts.history.is_none() && opts.idempotency_key.is_none() {
            let p = Arc::new(publication);
            if let Some(h) = self.handler() {
                h.on_publication(channel, &p, &Arc::from(""));
            }
            return Ok(PublishOutcome::default());
        }
        let state = self.channel_state(channel);
        let mut st = state.lock();
        let now = Instant::now();
        if let Some(key) = &opts.idempotency_key {
            if let Some((pos, exp)) = st.idempotent.get(key)
                && *exp > now
            {
                return Ok(PublishOutcome {
                    position: pos.clone(),
                    suppressed: true,
                    stale: false,
                });
            }
            if st.idempotent.len() >= MAX_IDEMPOTENCY_KEYS_PER_CHANNEL {
                st.idempotent.retain(|_, (_, exp)| *exp > now);
                if st.idempotent.len() >= MAX_IDEMPOTENCY_KEYS_PER_CHANNEL {
                    return Err(EngineError::Limit("idempotency keys per channel"));
                }
            }
        }
        let (position, epoch) = match &opts.history {
            Some(h) => {
                let stream = st
                    .stream
                    .get_or_insert_with(|| StreamWindow::new(new_epoch(), now, h.meta_ttl));
                stream.expire(now);
                if !stream.version_allows(opts.version, &opts.version_epoch) {
                    return Ok(PublishOutcome {
                        position: Some(stream.top()),
                        suppressed: true,
                        stale: true,
                    });
                }
                stream.set_version(opts.version, &opts.version_epoch);
                publication.offset = stream.top + 1;
                let p = Arc::new(publication);
                stream.push(p.clone(), h, now);
                let epoch = stream.epoch.clone();
                if let Some(handler) = self.handler() {
                    handler.on_publication(channel, &p, &epoch);
                }
                (Some(stream.top()), epoch)
            }
            None => {
                let p = Arc::new(publication);
                let epoch: Arc<str> = Arc::from("");
                if let Some(handler) = self.handler() {
                    handler.on_publication(channel, &p, &epoch);
                }
                (None, epoch)
            }
        };
        drop(epoch);
        if let Some(key) = &opts.idempotency_key {
            st.idempotent
                .insert(key.clone(), (position.clone(), now + opts.idempotency_ttl));
        }
        Ok(PublishOutcome {
            position,
            suppressed: false,
            stale: false,
        })
    }

    async fn publish_join(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        if let Some(h) = self.handler() {
            h.on_join(channel, &info);
        }
        Ok(())
    }

    async fn publish_leave(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        if let Some(h) = self.handler() {
            h.on_leave(channel, &info);
        }
        Ok(())
    }

    async fn subscribe(&self, _channel: &str) -> Result<(), EngineError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &str) -> Result<(), EngineError> {
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError> {
        let state = self.channel_state(channel);
        let mut st = state.lock();
        let now = Instant::now();
        st.stream
            .get_or_insert_with(|| StreamWindow::new(new_epoch(), now, query.meta_ttl))
            .read(query, now)
    }

    async fn publish_control(&self, data: bytes::Bytes) -> Result<(), EngineError> {
        if let Some(h) = self.handler() {
            h.on_control(&data);
        }
        Ok(())
    }

    async fn remove_history(&self, channel: &str) -> Result<(), EngineError> {
        if let Some(state) = self.existing_channel_state(channel)
            && let Some(stream) = &mut state.lock().stream
        {
            stream.items.clear();
        }
        Ok(())
    }
}

#[async_trait]
impl PresenceStore for MemoryEngine {
    async fn add_presence(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        let mut shard = self.presence.get(channel).lock();
        shard
            .entry(channel.into())
            .or_default()
            .insert(info.client.clone(), info);
        Ok(())
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), EngineError> {
        let mut shard = self.presence.get(channel).lock();
        if let Some(m) = shard.get_mut(channel) {
            m.remove(client);
            if m.is_empty() {
                shard.remove(channel);
            }
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, EngineError> {
        let shard = self.presence.get(channel).lock();
        Ok(shard
            .get(channel)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), EngineError> {
        let shard = self.presence.get(channel).lock();
        Ok(match shard.get(channel) {
            Some(m) => {
                let users: HashSet<&str> = m.values().map(|i| &*i.user).collect();
                (m.len() as u32, users.len() as u32)
            }
            None => (0, 0),
        })
    }
}

#[async_trait]
impl CursorStore for MemoryEngine {
    async fn save_cursor(
        &self,
        user: &str,
        channel: &str,
        pos: &StreamTop,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let key: CursorKey = (user.into(), channel.into());
        let mut shard = self.cursors.get(&key).lock();
        let exp = Instant::now() + ttl;
        match shard.get_mut(&key) {
            Some((cur, e)) if cur.epoch == pos.epoch && cur.offset >= pos.offset => *e = exp,
            Some(slot) => *slot = (pos.clone(), exp),
            None => {
                shard.insert(key, (pos.clone(), exp));
            }
        }
        Ok(())
    }

    async fn load_cursor(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<Option<StreamTop>, EngineError> {
        let key: CursorKey = (user.into(), channel.into());
        let shard = self.cursors.get(&key).lock();
        let now = Instant::now();
        Ok(shard
            .get(&key)
            .filter(|(_, exp)| *exp > now)
            .map(|(p, _)| p.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::conformance;

    #[tokio::test(start_paused = true)]
    async fn conformance_suite() {
        conformance::run_all(|| async { crate::engine::Engine::from_one(MemoryEngine::new()) })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn restart_means_new_epoch() {
        let q = HistoryQuery {
            since: None,
            limit: Some(0),
            reverse: false,
            meta_ttl: Duration::from_secs(60),
        };
        let a = MemoryEngine::new().history("c", &q).await.expect("history");
        let b = MemoryEngine::new().history("c", &q).await.expect("history");
        assert_ne!(a.top.epoch, b.top.epoch);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_drops_expired_streams() {
        let e = MemoryEngine::new();
        let q = HistoryQuery {
            since: None,
            limit: Some(0),
            reverse: false,
            meta_ttl: Duration::from_secs(5),
        };
        e.history("c", &q).await.expect("history");
        assert_eq!(e.num_channel_states(), 1);
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(e.num_channel_states(), 0);
    }
}
