//! The memory map broker: map state and change streams in this process.
//!
//! A write takes its channel's lock, appends to the stream, updates the state and calls the
//! node's handler before releasing it, so state, stream and delivery agree per channel. A
//! sweeper removes expired keys once a second, each removal a stream entry like any other. A
//! restart loses everything and every channel starts under a new epoch, so a subscriber that
//! recovers is told to start over (112) instead of being given a stale state.

use super::map::Suppressed;
use super::map::{KeyMode, MapBroker, MapOutcome, MapSettings, MapWrite, StatePage, StateQuery};
use super::window::StreamWindow;
use super::{BrokerHandler, EngineError, HistoryPage, HistoryQuery, StreamTop, new_epoch};
use crate::shard::Sharded;
use async_trait::async_trait;
use holdfast_protocol::Publication;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::time::Instant;

const SHARDS: usize = 64;

/// Idempotency results kept per channel (as the memory engine).
const MAX_IDEMPOTENCY_KEYS_PER_CHANNEL: usize = 100_000;

/// Most keys one sweep removes from one channel (the rest wait for the next second), so a
/// mass expiry never holds a shard's lock for long.
const SWEEP_BATCH: usize = 1000;

/// The memory map broker.
#[derive(Debug)]
pub struct MemoryMapBroker {
    channels: Sharded<Mutex<HashMap<Arc<str>, SharedMap>>>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
}

type SharedMap = Arc<Mutex<MapChannel>>;

#[derive(Debug)]
struct Entry {
    publication: Arc<Publication>,
    expires: Option<Instant>,
    version: u64,
    version_epoch: Arc<str>,
}

/// One map channel: its state, expiries, change stream and idempotency results. A write is
/// [`MapChannel::check`]ed, then [`MapChannel::apply`]ed: a broker that must store a write
/// before it takes effect (a durable one) can do so between the two.
#[derive(Debug)]
struct MapChannel {
    entries: BTreeMap<String, Entry>,
    /// (expiry, key) of every expiring key.
    expiries: BTreeSet<(Instant, String)>,
    stream: StreamWindow,
    /// The stream's retention as last written (the sweeper appends removals with it).
    retention: super::HistoryOptions,
    idempotent: HashMap<String, (StreamTop, Instant)>,
}

impl MapChannel {
    fn new(now: Instant, settings: &MapSettings) -> Self {
        Self {
            entries: BTreeMap::new(),
            expiries: BTreeSet::new(),
            stream: StreamWindow::new(new_epoch(), now, settings.stream.meta_ttl),
            retention: settings.stream,
            idempotent: HashMap::new(),
        }
    }

    /// Appends `p` (its offset set here) to the stream and returns it as stored.
    fn append(&mut self, mut p: Publication, now: Instant) -> Arc<Publication> {
        p.offset = self.stream.top + 1;
        let p = Arc::new(p);
        let retention = self.retention;
        self.stream.push(p.clone(), &retention, now);
        p
    }

    fn unschedule(&mut self, key: &str, e: &Entry) {
        if let Some(at) = e.expires {
            self.expiries.remove(&(at, key.to_owned()));
        }
    }

    /// A write's outcome when it writes nothing (idempotent repeat, stale version, key mode),
    /// or the limit it breaks; `None`: [`MapChannel::apply`] it.
    fn check(
        &mut self,
        write: &MapWrite,
        settings: &MapSettings,
        now: Instant,
    ) -> Result<Option<MapOutcome>, EngineError> {
        if let Some(k) = &write.idempotency_key {
            if let Some((pos, exp)) = self.idempotent.get(k)
                && *exp > now
            {
                return Ok(Some(MapOutcome {
                    position: pos.clone(),
                    suppressed: Some(Suppressed::Idempotent),
                }));
            }
            if self.idempotent.len() >= MAX_IDEMPOTENCY_KEYS_PER_CHANNEL {
                self.idempotent.retain(|_, (_, exp)| *exp > now);
                if self.idempotent.len() >= MAX_IDEMPOTENCY_KEYS_PER_CHANNEL {
                    return Err(EngineError::Limit("idempotency keys per channel"));
                }
            }
        }
        let existing = self.entries.get(&write.key);
        let suppressed = match (write.key_mode, existing) {
            (KeyMode::IfNew, Some(_)) | (KeyMode::IfExists, None) => Some(Suppressed::KeyMode),
            // Removing what is not there changes nothing: no stream entry for it.
            (_, None) if write.removed => Some(Suppressed::KeyMode),
            (_, Some(e))
                if write.version > 0
                    && e.version > 0
                    && (write.version_epoch.is_empty()
                        || *write.version_epoch == *e.version_epoch)
                    && write.version <= e.version =>
            {
                Some(Suppressed::Version)
            }
            _ => None,
        };
        if suppressed.is_some() {
            return Ok(Some(MapOutcome {
                position: self.stream.top(),
                suppressed,
            }));
        }
        if existing.is_none() && self.entries.len() >= settings.max_keys {
            return Err(EngineError::Limit("keys per map channel"));
        }
        Ok(None)
    }

    /// Writes a checked write: appends it to the stream and updates the state; returns it as
    /// stored and the new position.
    fn apply(
        &mut self,
        write: MapWrite,
        settings: &MapSettings,
        now: Instant,
    ) -> (Arc<Publication>, StreamTop) {
        self.retention = settings.stream;
        let MapWrite {
            key,
            data,
            removed,
            info,
            tags,
            binary,
            idempotency_key,
            idempotency_ttl,
            version,
            version_epoch,
            ..
        } = write;
        let p = self.append(
            Publication {
                data,
                info,
                tags,
                time: unix_ms(),
                binary,
                key: key.clone(),
                removed,
                ..Default::default()
            },
            now,
        );
        if let Some(old) = self.entries.remove(&key) {
            self.unschedule(&key, &old);
        }
        if !removed {
            let expires = settings.key_ttl.map(|t| now + t);
            if let Some(at) = expires {
                self.expiries.insert((at, key.clone()));
            }
            self.entries.insert(
                key,
                Entry {
                    publication: p.clone(),
                    expires,
                    version,
                    version_epoch: version_epoch.into(),
                },
            );
        }
        let position = self.stream.top();
        if let Some(k) = idempotency_key {
            self.idempotent
                .insert(k, (position.clone(), now + idempotency_ttl));
        }
        (p, position)
    }

    /// A page of state (keeps the channel's epoch alive for `meta_ttl`).
    fn page(
        &mut self,
        query: &StateQuery,
        settings: &MapSettings,
        now: Instant,
    ) -> Result<StatePage, EngineError> {
        self.stream.meta_expire = self.stream.meta_expire.max(now + settings.stream.meta_ttl);
        let top = match &query.revision {
            Some((offset, epoch)) => {
                if **epoch != *self.stream.epoch || *offset > self.stream.top {
                    return Err(EngineError::UnrecoverablePosition);
                }
                StreamTop {
                    offset: *offset,
                    epoch: self.stream.epoch.clone(),
                }
            }
            None => self.stream.top(),
        };
        let visible = |e: &Entry| e.publication.offset <= top.offset;
        if let Some(k) = &query.key {
            let entries = self
                .entries
                .get(k)
                .filter(|e| visible(e))
                .map(|e| vec![e.publication.clone()])
                .unwrap_or_default();
            return Ok(StatePage {
                entries,
                cursor: String::new(),
                top,
            });
        }
        let start = if query.cursor.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(query.cursor.clone())
        };
        // A page covers `limit` keys, visible or not: entries written after the revision are
        // left out (a page may hold fewer), so no read walks more than a page of keys under
        // the channel's lock.
        let limit = query.limit.max(1);
        let mut entries = Vec::with_capacity(limit.min(self.entries.len()));
        let mut last = None;
        let mut more = false;
        for (scanned, (k, e)) in self.entries.range((start, Bound::Unbounded)).enumerate() {
            if scanned == limit {
                more = true;
                break;
            }
            last = Some(k);
            if visible(e) {
                entries.push(e.publication.clone());
            }
        }
        let cursor = match (more, last) {
            (true, Some(k)) => k.clone(),
            _ => String::new(),
        };
        Ok(StatePage {
            entries,
            cursor,
            top,
        })
    }

    /// Extends the expiry of `keys`; returns those not there.
    fn touch(&mut self, keys: &[String], settings: &MapSettings, now: Instant) -> Vec<String> {
        let mut missing = Vec::new();
        for k in keys {
            let Some(old) = self.entries.get(k).and_then(|e| e.expires) else {
                if !self.entries.contains_key(k) {
                    missing.push(k.clone());
                }
                continue;
            };
            let Some(ttl) = settings.key_ttl else {
                continue;
            };
            self.expiries.remove(&(old, k.clone()));
            let at = now + ttl;
            self.expiries.insert((at, k.clone()));
            if let Some(e) = self.entries.get_mut(k) {
                e.expires = Some(at);
            }
        }
        missing
    }

    /// Removes up to `max` keys whose time has come, each a removal appended to the stream;
    /// returns the removals.
    fn expire_due(&mut self, now: Instant, max: usize) -> Vec<Arc<Publication>> {
        let mut out = Vec::new();
        let mut removed = 0;
        while let Some((at, key)) = self.expiries.first().cloned() {
            if at > now || removed == max {
                break;
            }
            removed += 1;
            self.expiries.pop_first();
            if self.entries.remove(&key).is_none() {
                continue;
            }
            out.push(self.append(
                Publication {
                    key,
                    removed: true,
                    time: unix_ms(),
                    ..Default::default()
                },
                now,
            ));
        }
        out
    }
}

impl MemoryMapBroker {
    /// Creates the broker and its sweeper (which stops when the broker is dropped). Must be
    /// called inside a Tokio runtime.
    pub fn new() -> Arc<Self> {
        let b = Arc::new(Self {
            channels: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
            handler: OnceLock::new(),
        });
        let weak = Arc::downgrade(&b);
        tokio::spawn(sweep_loop(weak));
        b
    }

    fn channel(&self, channel: &str, settings: &MapSettings) -> SharedMap {
        let mut shard = self.channels.get(channel).lock();
        if let Some(c) = shard.get(channel) {
            return c.clone();
        }
        let c = Arc::new(Mutex::new(MapChannel::new(Instant::now(), settings)));
        shard.insert(channel.into(), c.clone());
        c
    }

    fn existing(&self, channel: &str) -> Option<SharedMap> {
        self.channels.get(channel).lock().get(channel).cloned()
    }

    /// Number of channels held.
    pub fn num_channels(&self) -> usize {
        self.channels.iter().map(|s| s.lock().len()).sum()
    }

    /// Removes expired keys (each removal appended and delivered), expired idempotency results,
    /// and channels with no keys whose stream's epoch has expired.
    pub fn sweep(&self) {
        let now = Instant::now();
        let handler = self.handler.get();
        for shard in self.channels.iter() {
            let mut shard = shard.lock();
            shard.retain(|name, ch| {
                // Only the shard holds it (callers clone it under this shard lock): no write or
                // read is about to use it, so dropping it cannot lose one.
                let unused = Arc::strong_count(ch) == 1;
                let mut c = ch.lock();
                for p in c.expire_due(now, SWEEP_BATCH) {
                    metrics::counter!("holdfast_map_keys_expired_total").increment(1);
                    if let Some(h) = handler {
                        h.on_publication(name, &p, &c.stream.epoch);
                    }
                }
                c.idempotent.retain(|_, (_, exp)| *exp > now);
                c.stream.expire(now);
                // A channel with expiries left for the next sweep is kept for it.
                !(unused
                    && c.entries.is_empty()
                    && c.idempotent.is_empty()
                    && now >= c.stream.meta_expire)
            });
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn sweep_loop(b: Weak<MemoryMapBroker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match b.upgrade() {
            Some(b) => b.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl MapBroker for MemoryMapBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(
        &self,
        channel: &str,
        write: MapWrite,
        settings: &MapSettings,
    ) -> Result<MapOutcome, EngineError> {
        let ch = self.channel(channel, settings);
        let mut c = ch.lock();
        let now = Instant::now();
        if let Some(suppressed) = c.check(&write, settings, now)? {
            return Ok(suppressed);
        }
        let (p, position) = c.apply(write, settings, now);
        if let Some(h) = self.handler.get() {
            h.on_publication(channel, &p, &position.epoch);
        }
        Ok(MapOutcome {
            position,
            suppressed: None,
        })
    }

    async fn read_state(
        &self,
        channel: &str,
        query: &StateQuery,
        settings: &MapSettings,
    ) -> Result<StatePage, EngineError> {
        let ch = self.channel(channel, settings);
        let mut c = ch.lock();
        c.page(query, settings, Instant::now())
    }

    async fn read_stream(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError> {
        match self.existing(channel) {
            Some(ch) => ch.lock().stream.read(query, Instant::now()),
            None => {
                // A stream no one has written or read yet: a fresh epoch, as a state read makes.
                let settings = MapSettings {
                    key_ttl: None,
                    stream: super::HistoryOptions {
                        size: 1,
                        ttl: Duration::ZERO,
                        meta_ttl: query.meta_ttl,
                    },
                    max_keys: usize::MAX,
                };
                self.channel(channel, &settings)
                    .lock()
                    .stream
                    .read(query, Instant::now())
            }
        }
    }

    async fn touch(
        &self,
        channel: &str,
        keys: &[String],
        settings: &MapSettings,
    ) -> Result<Vec<String>, EngineError> {
        let Some(ch) = self.existing(channel) else {
            return Ok(keys.to_vec());
        };
        let mut c = ch.lock();
        Ok(c.touch(keys, settings, Instant::now()))
    }

    async fn num_keys(&self, channel: &str) -> Result<usize, EngineError> {
        Ok(self.existing(channel).map_or(0, |c| c.lock().entries.len()))
    }

    async fn clear(&self, channel: &str) -> Result<(), EngineError> {
        let Some(ch) = self.existing(channel) else {
            return Ok(());
        };
        let mut c = ch.lock();
        let now = Instant::now();
        let retention = c.retention;
        let meta = c.stream.meta_expire.saturating_duration_since(now);
        c.entries.clear();
        c.expiries.clear();
        c.idempotent.clear();
        c.stream = StreamWindow::new(new_epoch(), now, meta.max(retention.meta_ttl));
        // Every subscriber's position is in the old epoch: tell them to start over.
        if let Some(h) = self.handler.get() {
            h.check_position(channel, &c.stream.top());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::conformance;

    #[tokio::test(start_paused = true)]
    async fn map_conformance_suite() {
        conformance::run_map(|| async { MemoryMapBroker::new() as Arc<dyn MapBroker> }).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_mass_expiry_is_swept_a_batch_at_a_time() {
        let b = MemoryMapBroker::new();
        let s = conformance::map_settings(Some(Duration::from_secs(5)));
        let s = MapSettings {
            max_keys: 5000,
            ..s
        };
        for i in 0..2500 {
            let w = MapWrite {
                key: format!("k{i}"),
                data: bytes::Bytes::from_static(b"1"),
                ..Default::default()
            };
            b.publish("m", w, &s).await.expect("publish");
        }
        tokio::time::advance(Duration::from_secs(6)).await;
        b.sweep();
        assert_eq!(b.num_keys("m").await.expect("keys"), 1500, "one batch");
        b.sweep();
        b.sweep();
        assert_eq!(
            b.num_keys("m").await.expect("keys"),
            0,
            "the rest, a batch a sweep"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn restart_means_new_epoch() {
        let s = conformance::map_settings(None);
        let q = StateQuery {
            limit: 10,
            ..Default::default()
        };
        let a = MemoryMapBroker::new().read_state("m", &q, &s).await;
        let b = MemoryMapBroker::new().read_state("m", &q, &s).await;
        assert_ne!(a.expect("read").top.epoch, b.expect("read").top.epoch);
    }
}
