//! Holdfast's embedded durable engine: a single node that loses nothing across restarts.
//!
//! Every change is a record in an append-only log. A writer thread takes every request queued
//! while the previous write was in progress, appends them as one batch closed by a commit marker,
//! and fsyncs once (group commit: many channels share one fsync). Only then are the publications
//! applied to the in-memory windows and fanned out, in offset order, and the publishers answered:
//! durability before visibility. History reads are served from memory and never wait for the
//! disk. On start the log is replayed; a torn last batch (the write a crash interrupted, never
//! acknowledged) is cut off; damage anywhere else stops the start. A background compaction
//! rewrites the live state into a new log so disk use stays bounded by the history sizes.
//!
//! Why not redb (the crate first chosen): its non-durable commits are lost on a process crash,
//! so it could not offer a mode that skips fsync yet survives `kill -9`; and its per-commit
//! fsync cannot be shared across publishers the way one log append can.

mod hwm;
mod log;
mod record;
mod start;
mod writer;

use start::{apply_replayed, found, rotate_epochs, write_log_file};
pub use start::{check, request_new_epochs};
use writer::{Writer, snapshot};

pub use log::OpenError;

use async_trait::async_trait;
use holdfast_core::engine::{
    Broker, BrokerHandler, CursorStore, EngineError, HistoryOptions, HistoryPage, HistoryQuery,
    MemoryEngine, PresenceStore, PublishOptions, PublishOutcome, StreamTop, StreamWindow,
    new_epoch,
};
use holdfast_core::shard::Sharded;
use holdfast_protocol::{ClientInfo, Publication};
use log::Paths;
use parking_lot::Mutex;
use record::Record;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Requests queued for the writer at most; publishers wait for room beyond it.
const QUEUE: usize = 65_536;
/// Most requests in one batch.
const MAX_BATCH: usize = 8192;
/// How often the high-water record is synced to disk while commits come (and once more when
/// they stop): a power cut can leave it this far behind the log, never ahead.
const HIGH_WATER_SYNC: Duration = Duration::from_secs(1);
/// Compaction starts when the log is this big and twice the last snapshot.
const MIN_COMPACT_BYTES: u64 = 64 << 20;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After fsync: survives power loss.
    Fsync,
    /// After the write reaches the operating system: survives a crash of the process
    /// (`kill -9`), not of the machine.
    Os,
}

/// Where and how the engine stores its log.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Data directory (created if missing).
    pub path: PathBuf,
    /// Acknowledge after fsync or after write.
    pub durability: Durability,
    /// Compaction threshold (the log is rewritten above this and twice the live data).
    pub min_compact_bytes: u64,
}

impl DiskConfig {
    /// Defaults for a directory.
    pub fn new(path: impl Into<PathBuf>, durability: Durability) -> Self {
        Self {
            path: path.into(),
            durability,
            min_compact_bytes: MIN_COMPACT_BYTES,
        }
    }
}

fn unix_ms() -> i64 {
    holdfast_core::time::unix_ms()
}

/// A wall-clock deadline for the log from a monotonic one.
fn to_wall(at: Instant, now: Instant, now_ms: i64) -> i64 {
    if at >= now {
        now_ms + (at - now).as_millis() as i64
    } else {
        now_ms - (now - at).as_millis() as i64
    }
}

/// A monotonic deadline from the log's wall-clock one.
fn from_wall(ms: i64, now: Instant, now_ms: i64) -> Instant {
    if ms >= now_ms {
        now + Duration::from_millis((ms - now_ms) as u64)
    } else {
        now
    }
}

type Shard<T> = Mutex<HashMap<Arc<str>, T>>;

#[derive(Debug, Default)]
struct ChanInner {
    stream: Option<StreamWindow>,
    /// Highest offset the writer handed out (committed, or in the batch being written). Only
    /// the writer thread moves it, so a failed write gives its offsets back before any later
    /// publication takes one: no offset is skipped.
    reserved: u64,
    /// idempotency key → (result, expiry).
    idempotent: HashMap<String, (Option<StreamTop>, Instant)>,
}

#[derive(Debug, Default)]
struct Chan {
    /// Held by an idempotent publish from its key check until it is stored, so a repeat with
    /// the same key waits for the first one's result.
    order: tokio::sync::Mutex<()>,
    inner: Mutex<ChanInner>,
}

type CursorKey = (Arc<str>, Arc<str>);

/// Committed state, shared by callers, the writer and the sweeper.
#[derive(Debug)]
struct State {
    channels: Sharded<Shard<Arc<Chan>>>,
    cursors: Mutex<HashMap<CursorKey, (StreamTop, Instant)>>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// The log could not be cut back to its last commit after a failed write: nothing more is
    /// acknowledged (restart to recover from the log).
    poisoned: AtomicBool,
    /// Why the last write failed, while writes fail (a full disk): `/health` shows it. Cleared
    /// by the next successful commit (the writer retries on its own every second).
    degraded: Mutex<Option<String>>,
    /// A commit's high-water record waits for its sync (the sweeper asks the idle writer).
    high_water_dirty: AtomicBool,
    log_bytes: AtomicU64,
}

const SHARDS: usize = 64;

impl State {
    fn shard(&self, channel: &str) -> &Shard<Arc<Chan>> {
        self.channels.get(channel)
    }

    fn chan(&self, channel: &str) -> Arc<Chan> {
        let mut shard = self.shard(channel).lock();
        shard.entry(channel.into()).or_default().clone()
    }

    fn existing(&self, channel: &str) -> Option<Arc<Chan>> {
        self.shard(channel).lock().get(channel).cloned()
    }
}

enum Req {
    Publish {
        channel: Arc<str>,
        /// Set by the writer with the offset, from the committed state.
        epoch: Arc<str>,
        publication: Arc<Publication>,
        history: Option<HistoryOptions>,
        idempotency: Option<(String, Duration)>,
        /// Latest-state version (checked by the caller under the channel's order lock).
        version: Option<(u64, Arc<str>)>,
        ack: oneshot::Sender<Result<Option<StreamTop>, EngineError>>,
    },
    Stream {
        channel: Arc<str>,
        epoch: Arc<str>,
        meta_ttl: Duration,
    },
    Remove {
        channel: Arc<str>,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    Cursor {
        user: Arc<str>,
        channel: Arc<str>,
        pos: StreamTop,
        ttl: Duration,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Retry a write while degraded (an empty commit): clears the degraded state once the disk
    /// takes writes again, even when nobody publishes.
    Probe,
    /// Sync the high-water record if a commit since the last sync left it dirty.
    SyncHighWater,
}

/// The disk engine (broker, presence and cursors).
#[derive(Debug)]
pub struct DiskEngine {
    state: Arc<State>,
    tx: mpsc::Sender<Req>,
    /// Presence is about live connections: it is not persisted.
    presence: Arc<MemoryEngine>,
    path: PathBuf,
}

/// What opening the store found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Records replayed.
    pub records: u64,
    /// Bytes of a torn last write discarded.
    pub torn_bytes: u64,
    /// Streams restored.
    pub streams: usize,
    /// The log went backwards (restored backup, truncation, lost write): why. Every stream then
    /// got a new epoch, so clients recovering are told `recovered: false`.
    pub rollback: Option<String>,
    /// Streams given a new epoch because of the rollback.
    pub new_epochs: usize,
}

impl DiskEngine {
    /// Opens (or creates) the store and replays it. Must be called inside a Tokio runtime.
    pub fn open(cfg: DiskConfig) -> Result<(Arc<Self>, OpenReport), OpenError> {
        std::fs::create_dir_all(&cfg.path).map_err(log::io_err(&cfg.path))?;
        let paths = Paths::new(&cfg.path);
        let lock = File::create(&paths.lock).map_err(log::io_err(&paths.lock))?;
        if lock.try_lock().is_err() {
            return Err(OpenError::Locked(cfg.path.clone()));
        }
        // A compaction interrupted before its rename leaves a partial file: discard it.
        let _ = std::fs::remove_file(&paths.compact);
        let created = !paths.log.exists();
        if created {
            log::create(&paths.log)?;
        }
        let state = Arc::new(State {
            channels: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
            cursors: Mutex::new(HashMap::new()),
            handler: OnceLock::new(),
            poisoned: AtomicBool::new(false),
            degraded: Mutex::new(None),
            high_water_dirty: AtomicBool::new(false),
            log_bytes: AtomicU64::new(0),
        });
        // The evidence is read before anything touches the log (cutting a torn tail changes the
        // file's change time).
        let record = hwm::read(&paths.hwm)
            .map_err(log::io_err(&paths.hwm))?
            .map(|(_, m)| m);
        let identity = std::fs::metadata(&paths.log)
            .map(|m| hwm::Identity::of(&m))
            .map_err(log::io_err(&paths.log))?;
        let now = Instant::now();
        let now_ms = unix_ms();
        let replayed = log::replay(&paths.log, |r| apply_replayed(&state, r, now, now_ms))?;
        let requested = paths.new_epochs.exists();
        let rollback = if requested {
            Some(hwm::Rollback::Requested)
        } else if created {
            None
        } else {
            hwm::judge(record.as_ref(), found(&replayed, identity))
        };
        let mut seq = replayed.last_seq;
        let mut new_epochs = 0;
        let file = if let Some(why) = &rollback {
            // Offsets clients saw may come again under the same epoch: every stream starts a new
            // one (history kept, renumbered under it), and the log is rewritten with them.
            new_epochs = rotate_epochs(&state);
            seq = seq.max(record.map_or(0, |m| m.seq)) + 1;
            tracing::error!(
                path = %paths.log.display(),
                streams = new_epochs,
                torn_bytes = replayed.torn,
                "the log went backwards: {why}. Every stream gets a new epoch: clients are told recovered: false, never given an offset twice"
            );
            let records = snapshot(&state);
            write_log_file(&paths.compact, &records, seq, cfg.durability)
                .map_err(log::io_err(&paths.compact))?;
            std::fs::rename(&paths.compact, &paths.log).map_err(log::io_err(&paths.log))?;
            log::sync_dir(&cfg.path).map_err(log::io_err(&cfg.path))?;
            if requested {
                std::fs::remove_file(&paths.new_epochs)
                    .and_then(|()| log::sync_dir(&cfg.path))
                    .map_err(log::io_err(&paths.new_epochs))?;
            }
            let len = std::fs::metadata(&paths.log)
                .map_err(log::io_err(&paths.log))?
                .len();
            state.log_bytes.store(len, Ordering::Relaxed);
            log::open_append(&paths.log, len)?
        } else {
            if replayed.torn > 0 {
                tracing::warn!(
                    bytes = replayed.torn,
                    "discarded the torn end of the log (a write interrupted by a crash; it was never acknowledged)"
                );
            }
            state.log_bytes.store(replayed.committed, Ordering::Relaxed);
            log::open_append(&paths.log, replayed.committed)?
        };
        let mut high_water = hwm::HighWater::open(&paths.hwm).map_err(log::io_err(&paths.hwm))?;
        let meta = file.metadata().map_err(log::io_err(&paths.log))?;
        let mark = hwm::Mark {
            seq,
            log: hwm::Identity::of(&meta),
            pending_ino: 0,
            len: meta.len(),
        };
        high_water
            .write(&mark)
            .and_then(|()| high_water.sync())
            .map_err(log::io_err(&paths.hwm))?;
        let streams: usize = state.channels.iter().map(|s| s.lock().len()).sum();
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer::new(state.clone(), (file, paths, lock), &cfg, seq, high_water);
        std::thread::Builder::new()
            .name("holdfast-disk-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(log::io_err(&cfg.path))?;
        let engine = Arc::new(Self {
            state,
            tx,
            presence: MemoryEngine::new(),
            path: cfg.path,
        });
        tokio::spawn(sweep_loop(
            Arc::downgrade(&engine.state),
            engine.tx.downgrade(),
        ));
        Ok((
            engine,
            OpenReport {
                records: replayed.records,
                torn_bytes: replayed.torn,
                streams,
                rollback: rollback.map(|r| r.to_string()),
                new_epochs,
            },
        ))
    }

    /// Data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the log now.
    pub fn log_bytes(&self) -> u64 {
        self.state.log_bytes.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), EngineError> {
        if self.state.poisoned.load(Ordering::Acquire) {
            Err(EngineError::Unavailable(
                "the disk engine could not repair its log after a failed write; restart it".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Why writes fail now (a full disk), if they do.
    pub fn degraded(&self) -> Option<String> {
        self.state.degraded.lock().clone()
    }

    async fn submit<T>(
        &self,
        req: Req,
        rx: oneshot::Receiver<Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| EngineError::Unavailable("the disk writer stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("the disk writer stopped".into()))?
    }
}

fn save_cursor(state: &State, user: Arc<str>, channel: Arc<str>, pos: StreamTop, exp: Instant) {
    let mut cursors = state.cursors.lock();
    match cursors.get_mut(&(user.clone(), channel.clone())) {
        Some((cur, e)) if cur.epoch == pos.epoch && cur.offset >= pos.offset => *e = (*e).max(exp),
        Some(slot) => *slot = (pos, exp),
        None => {
            cursors.insert((user, channel), (pos, exp));
        }
    }
}

async fn sweep_loop(state: std::sync::Weak<State>, writer: mpsc::WeakSender<Req>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        if let Some(tx) = writer.upgrade() {
            if state.degraded.lock().is_some() {
                let _ = tx.try_send(Req::Probe);
            }
            if state.high_water_dirty.load(Ordering::Acquire) {
                let _ = tx.try_send(Req::SyncHighWater);
            }
        }
        let now = Instant::now();
        for shard in state.channels.iter() {
            shard.lock().retain(|_, chan| {
                let mut inner = chan.inner.lock();
                inner.idempotent.retain(|_, (_, exp)| *exp > now);
                if let Some(w) = &mut inner.stream {
                    w.expire(now);
                    if now >= w.meta_expire {
                        inner.stream = None;
                        inner.reserved = 0;
                    }
                }
                // Keep a channel a publisher is using (its order lock is taken).
                inner.stream.is_some()
                    || !inner.idempotent.is_empty()
                    || chan.order.try_lock().is_err()
            });
        }
        state.cursors.lock().retain(|_, (_, exp)| *exp > now);
        metrics::gauge!("holdfast_disk_log_bytes")
            .set(state.log_bytes.load(Ordering::Relaxed) as f64);
    }
}

#[async_trait]
impl Broker for DiskEngine {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.state.handler.set(handler.clone());
        self.presence.set_handler(handler);
    }

    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: &PublishOptions,
    ) -> Result<PublishOutcome, EngineError> {
        self.check()?;
        if opts.history.is_none() && opts.idempotency_key.is_none() {
            // Nothing to store: delivered like the memory engine does.
            let p = Arc::new(publication);
            if let Some(h) = self.state.handler.get() {
                h.on_publication(channel, &p, &Arc::from(""));
            }
            return Ok(PublishOutcome::default());
        }
        let publication = Arc::new(publication);
        let idempotency = opts
            .idempotency_key
            .clone()
            .map(|k| (k, opts.idempotency_ttl));
        let (ack, rx) = oneshot::channel();
        let req = Req::Publish {
            channel: channel.into(),
            epoch: Arc::from(""),
            publication,
            history: opts.history,
            idempotency,
            version: (opts.version > 0 && opts.history.is_some())
                .then(|| (opts.version, Arc::from(opts.version_epoch.as_str()))),
            ack,
        };
        if let Req::Publish {
            version: Some((v, ve)),
            ..
        } = &req
        {
            // Checked and stored in one step: the order lock keeps a second versioned
            // publish of the channel out until this one is applied.
            let chan = self.state.chan(channel);
            let order = chan.order.lock().await;
            {
                let inner = chan.inner.lock();
                if let Some(key) = &opts.idempotency_key
                    && let Some((pos, exp)) = inner.idempotent.get(key)
                    && *exp > Instant::now()
                {
                    return Ok(PublishOutcome {
                        position: pos.clone(),
                        suppressed: true,
                        stale: false,
                    });
                }
                if let Some(w) = &inner.stream
                    && !w.version_allows(*v, ve)
                {
                    return Ok(PublishOutcome {
                        position: Some(w.top()),
                        suppressed: true,
                        stale: true,
                    });
                }
            }
            let position = self.submit(req, rx).await?;
            drop(order);
            return Ok(PublishOutcome {
                position,
                suppressed: false,
                stale: false,
            });
        }
        let Some(key) = &opts.idempotency_key else {
            // The writer hands out offsets in queue order: no lock needed here.
            let position = self.submit(req, rx).await?;
            return Ok(PublishOutcome {
                position,
                suppressed: false,
                stale: false,
            });
        };
        // An idempotent publish holds the channel's order lock until stored, so a repeat waits
        // for the first one's result.
        let chan = self.state.chan(channel);
        let order = chan.order.lock().await;
        {
            let inner = chan.inner.lock();
            if let Some((pos, exp)) = inner.idempotent.get(key)
                && *exp > Instant::now()
            {
                return Ok(PublishOutcome {
                    position: pos.clone(),
                    suppressed: true,
                    stale: false,
                });
            }
        }
        let position = self.submit(req, rx).await?;
        drop(order);
        Ok(PublishOutcome {
            position,
            suppressed: false,
            stale: false,
        })
    }

    async fn publish_join(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.presence.publish_join(channel, info).await
    }

    async fn publish_leave(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.presence.publish_leave(channel, info).await
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
        let chan = self.state.chan(channel);
        let now = Instant::now();
        let (page, created) = {
            let mut inner = chan.inner.lock();
            let created = inner.stream.is_none();
            if created {
                inner.stream = Some(StreamWindow::new(new_epoch(), now, query.meta_ttl));
                inner.reserved = 0;
            }
            let w = inner
                .stream
                .get_or_insert_with(|| StreamWindow::new(new_epoch(), now, query.meta_ttl));
            (w.read(query, now), created.then(|| w.epoch.clone()))
        };
        if let Some(epoch) = created {
            // Keep the epoch across restarts; not waited for: losing it only means a new epoch,
            // which clients are told about.
            let _ = self.tx.try_send(Req::Stream {
                channel: channel.into(),
                epoch,
                meta_ttl: query.meta_ttl,
            });
        }
        page
    }

    fn problem(&self) -> Option<String> {
        self.degraded()
    }

    async fn publish_control(&self, data: bytes::Bytes) -> Result<(), EngineError> {
        if let Some(h) = self.state.handler.get() {
            h.on_control(&data);
        }
        Ok(())
    }

    async fn remove_history(&self, channel: &str) -> Result<(), EngineError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        self.submit(
            Req::Remove {
                channel: channel.into(),
                ack,
            },
            rx,
        )
        .await
    }
}

#[async_trait]
impl PresenceStore for DiskEngine {
    async fn add_presence(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.presence.add_presence(channel, info).await
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), EngineError> {
        self.presence.remove_presence(channel, client).await
    }

    async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, EngineError> {
        self.presence.presence(channel).await
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), EngineError> {
        self.presence.presence_stats(channel).await
    }
}

#[async_trait]
impl CursorStore for DiskEngine {
    async fn save_cursor(
        &self,
        user: &str,
        channel: &str,
        pos: &StreamTop,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        let req = Req::Cursor {
            user: user.into(),
            channel: channel.into(),
            pos: pos.clone(),
            ttl,
            ack,
        };
        self.submit(req, rx).await
    }

    async fn load_cursor(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<Option<StreamTop>, EngineError> {
        let now = Instant::now();
        let cursors = self.state.cursors.lock();
        Ok(cursors
            .get(&(Arc::from(user), Arc::from(channel)))
            .filter(|(_, exp)| *exp > now)
            .map(|(p, _)| p.clone()))
    }
}

#[cfg(test)]
mod tests;
