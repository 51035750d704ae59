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
        let writer = Writer {
            state: state.clone(),
            file,
            paths,
            dir: cfg.path.clone(),
            durability: cfg.durability,
            min_compact: cfg.min_compact_bytes,
            last_snapshot: state.log_bytes.load(Ordering::Relaxed),
            compaction: None,
            seq,
            high_water,
            high_water_synced: std::time::Instant::now(),
            _lock: lock,
        };
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

/// Checks a data directory without opening it for writing (for `holdfast disk check`): reads
/// the whole log, and judges it against the high-water record (a rollback is reported in
/// [`OpenReport::rollback`]; the next start gives every stream a new epoch).
pub fn check(path: &Path) -> Result<OpenReport, OpenError> {
    let paths = Paths::new(path);
    if !paths.log.exists() {
        return Ok(OpenReport::default());
    }
    let record = hwm::read(&paths.hwm)
        .map_err(log::io_err(&paths.hwm))?
        .map(|(_, m)| m);
    let identity = std::fs::metadata(&paths.log)
        .map(|m| hwm::Identity::of(&m))
        .map_err(log::io_err(&paths.log))?;
    let mut channels = std::collections::HashSet::new();
    let r = log::replay(&paths.log, |rec| {
        if let Record::Stream { channel, .. } | Record::State { channel, .. } = rec {
            channels.insert(channel);
        }
    })?;
    let rollback = if paths.new_epochs.exists() {
        Some(hwm::Rollback::Requested)
    } else {
        hwm::judge(record.as_ref(), found(&r, identity))
    };
    Ok(OpenReport {
        records: r.records,
        torn_bytes: r.torn,
        new_epochs: if rollback.is_some() {
            channels.len()
        } else {
            0
        },
        streams: channels.len(),
        rollback: rollback.map(|r| r.to_string()),
    })
}

fn found(r: &log::Replayed, identity: hwm::Identity) -> hwm::Found {
    hwm::Found {
        seq: r.last_seq,
        identity,
        committed: r.committed,
        torn: r.torn,
    }
}

/// Asks the next start of a directory that is not in use to give every stream a new epoch
/// (`holdfast disk new-epochs`), keeping history.
pub fn request_new_epochs(path: &Path) -> Result<(), OpenError> {
    let paths = Paths::new(path);
    if !paths.log.exists() {
        return Err(log::io_err(&paths.log)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no log in this directory",
        )));
    }
    let lock = File::create(&paths.lock).map_err(log::io_err(&paths.lock))?;
    if lock.try_lock().is_err() {
        return Err(OpenError::Locked(path.to_owned()));
    }
    File::create(&paths.new_epochs)
        .and_then(|f| f.sync_all())
        .and_then(|()| log::sync_dir(path))
        .map_err(log::io_err(&paths.new_epochs))
}

/// Gives every stream a new epoch (after a rollback); returns how many. Idempotency results
/// follow their stream to the new epoch.
fn rotate_epochs(state: &State) -> usize {
    let mut n = 0;
    for shard in state.channels.iter() {
        for chan in shard.lock().values() {
            let mut inner = chan.inner.lock();
            let Some(w) = &mut inner.stream else { continue };
            let old = std::mem::replace(&mut w.epoch, new_epoch());
            let new = w.epoch.clone();
            n += 1;
            for (pos, _) in inner.idempotent.values_mut() {
                if let Some(p) = pos
                    && p.epoch == old
                {
                    p.epoch = new.clone();
                }
            }
        }
    }
    n
}

/// Writes a complete log file (header, `records`, one commit with `seq`) and syncs it; returns
/// its length.
fn write_log_file(
    path: &Path,
    records: &[Record],
    seq: u64,
    durability: Durability,
) -> std::io::Result<u64> {
    let mut buf = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(log::HEADER);
    let mut f = File::create(path)?;
    for r in records {
        r.encode(&mut buf);
        if buf.len() > 8 << 20 {
            f.write_all(&buf)?;
            buf.clear();
        }
    }
    log::encode_commit(&mut buf, seq);
    f.write_all(&buf)?;
    if durability == Durability::Fsync {
        f.sync_all()?;
    }
    f.metadata().map(|m| m.len())
}

fn apply_replayed(state: &State, r: Record, now: Instant, now_ms: i64) {
    match r {
        Record::Stream {
            channel,
            epoch,
            meta_expire_ms,
        } => {
            let chan = state.chan(&channel);
            let mut inner = chan.inner.lock();
            let keep = inner.stream.as_ref().is_some_and(|s| *s.epoch == *epoch);
            if !keep {
                let mut w = StreamWindow::new(epoch.into(), now, Duration::ZERO);
                w.meta_expire = from_wall(meta_expire_ms, now, now_ms);
                inner.stream = Some(w);
                inner.reserved = 0;
            }
        }
        Record::State {
            channel,
            epoch,
            top,
            items_expire_ms,
            meta_expire_ms,
        } => {
            let chan = state.chan(&channel);
            let mut inner = chan.inner.lock();
            let mut w = StreamWindow::new(epoch.into(), now, Duration::ZERO);
            w.top = top;
            w.items_expire = from_wall(items_expire_ms, now, now_ms);
            w.meta_expire = from_wall(meta_expire_ms, now, now_ms);
            inner.reserved = top;
            inner.stream = Some(w);
        }
        Record::Pub {
            channel,
            epoch,
            size,
            items_expire_ms,
            meta_expire_ms,
            idempotency,
            publication,
        } => {
            let chan = state.chan(&channel);
            let mut inner = chan.inner.lock();
            if publication.offset > 0 {
                let w = inner.stream.get_or_insert_with(|| {
                    StreamWindow::new(epoch.clone().into(), now, Duration::ZERO)
                });
                if *w.epoch != *epoch {
                    *w = StreamWindow::new(epoch.clone().into(), now, Duration::ZERO);
                }
                // Windows hold contiguous offsets: a publication that does not follow (items
                // expired or removed before it) starts the window afresh.
                if publication.offset != w.top + 1 {
                    w.items.clear();
                }
                w.top = publication.offset;
                w.items.push_back(publication.clone());
                while w.items.len() > size.max(1) as usize {
                    w.items.pop_front();
                }
                w.items_expire = from_wall(items_expire_ms, now, now_ms);
                w.meta_expire = w.meta_expire.max(from_wall(meta_expire_ms, now, now_ms));
                inner.reserved = w.top;
            }
            if let Some((key, exp)) = idempotency {
                let pos = (publication.offset > 0).then(|| StreamTop {
                    offset: publication.offset,
                    epoch: epoch.into(),
                });
                inner
                    .idempotent
                    .insert(key, (pos, from_wall(exp, now, now_ms)));
            }
        }
        Record::RemoveHistory { channel } => {
            if let Some(chan) = state.existing(&channel)
                && let Some(w) = &mut chan.inner.lock().stream
            {
                w.items.clear();
            }
        }
        Record::Cursor {
            user,
            channel,
            offset,
            epoch,
            expire_ms,
        } => {
            let pos = StreamTop {
                offset,
                epoch: epoch.into(),
            };
            save_cursor(
                state,
                user.into(),
                channel.into(),
                pos,
                from_wall(expire_ms, now, now_ms),
            );
        }
        Record::Idem {
            channel,
            key,
            position,
            expire_ms,
        } => {
            let chan = state.chan(&channel);
            let pos = position.map(|(offset, epoch)| StreamTop {
                offset,
                epoch: epoch.into(),
            });
            chan.inner
                .lock()
                .idempotent
                .insert(key, (pos, from_wall(expire_ms, now, now_ms)));
        }
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

/// The writer thread: batches, appends, syncs, applies, acknowledges; compacts.
struct Writer {
    state: Arc<State>,
    file: File,
    paths: Paths,
    dir: PathBuf,
    durability: Durability,
    min_compact: u64,
    last_snapshot: u64,
    compaction: Option<Compaction>,
    /// Sequence number of the last commit in the log.
    seq: u64,
    /// The high-water record, written after every commit, before it is acknowledged.
    high_water: hwm::HighWater,
    /// When the record was last synced (at most [`HIGH_WATER_SYNC`] ago while commits come).
    high_water_synced: std::time::Instant,
    /// The directory lock, released when the writer (the last user of the files) ends.
    _lock: File,
}

struct Compaction {
    /// Log length when the snapshot was taken: what follows is copied after it.
    from: u64,
    thread: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Req>) {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            if matches!(first, Req::SyncHighWater) {
                self.sync_high_water();
                continue;
            }
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if self.state.poisoned.load(Ordering::Acquire) {
                fail_all(
                    &mut batch,
                    "the disk engine could not repair its log after a failed write; restart it",
                );
                continue;
            }
            buf.clear();
            let now = Instant::now();
            let now_ms = unix_ms();
            for r in &mut batch {
                self.assign(r, now);
            }
            for r in &batch {
                encode(r, &mut buf, now, now_ms);
            }
            log::encode_commit(&mut buf, self.seq + 1);
            let started = std::time::Instant::now();
            let res = self
                .file
                .write_all(&buf)
                .and_then(|()| match self.durability {
                    Durability::Fsync => self.file.sync_data(),
                    Durability::Os => Ok(()),
                });
            metrics::histogram!("holdfast_disk_commit_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("holdfast_disk_batch_size").record(batch.len() as f64);
            if let Err(e) = res {
                self.write_failed(&e, &mut batch);
                continue;
            }
            self.seq += 1;
            self.record_high_water(0);
            if self.state.degraded.lock().take().is_some() {
                tracing::warn!(path = %self.paths.log.display(), "disk writes succeed again: publishing resumed");
            }
            let len = self
                .state
                .log_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed)
                + buf.len() as u64;
            for r in batch.drain(..) {
                self.apply(r, now);
            }
            if self.durability == Durability::Fsync
                && self.high_water_synced.elapsed() >= HIGH_WATER_SYNC
            {
                self.sync_high_water();
            }
            self.maybe_compact(len);
        }
        // Every sender is gone (shutdown): the record goes to disk with the last commit.
        self.sync_high_water();
    }

    fn sync_high_water(&mut self) {
        if let Err(e) = self.high_water.sync() {
            metrics::counter!("holdfast_engine_write_errors_total", "engine" => "disk")
                .increment(1);
            tracing::warn!(error = %e, path = %self.paths.hwm.display(), "high-water record not synced");
        }
        self.high_water_synced = std::time::Instant::now();
        self.state.high_water_dirty.store(false, Ordering::Release);
    }

    /// Records the last commit and the log file holding it (before the commit is acknowledged).
    /// A failure is logged, not fatal: a record that lags only makes the next start more
    /// suspicious (new epochs), never less.
    fn record_high_water(&mut self, pending_ino: u64) {
        let res = self.file.metadata().and_then(|m| {
            self.high_water.write(&hwm::Mark {
                seq: self.seq,
                log: hwm::Identity::of(&m),
                pending_ino,
                len: m.len(),
            })
        });
        self.state.high_water_dirty.store(true, Ordering::Release);
        if let Err(e) = res {
            metrics::counter!("holdfast_engine_write_errors_total", "engine" => "disk")
                .increment(1);
            tracing::warn!(error = %e, path = %self.paths.hwm.display(), "high-water record not written");
        }
    }

    /// Hands out the offset of a publication with history: the next after the committed top
    /// and the ones earlier in this batch.
    fn assign(&self, r: &mut Req, now: Instant) {
        let Req::Publish {
            channel,
            epoch,
            publication,
            history: Some(h),
            ..
        } = r
        else {
            return;
        };
        let chan = self.state.chan(channel);
        let mut inner = chan.inner.lock();
        let (e, top) = {
            let w = inner
                .stream
                .get_or_insert_with(|| StreamWindow::new(new_epoch(), now, h.meta_ttl));
            (w.epoch.clone(), w.top)
        };
        let offset = inner.reserved.max(top) + 1;
        inner.reserved = offset;
        Arc::make_mut(publication).offset = offset;
        *epoch = e;
    }

    /// A write or sync failed (a full disk, an I/O error): the log is cut back to its last
    /// commit, the batch's offsets are handed back, its callers get the error, and the engine is
    /// degraded until a write succeeds again. Nothing of the batch was acknowledged.
    fn write_failed(&mut self, e: &std::io::Error, batch: &mut Vec<Req>) {
        let committed = self.state.log_bytes.load(Ordering::Relaxed);
        let why = format!("cannot write {}: {e}", self.paths.log.display());
        metrics::counter!("holdfast_engine_write_errors_total", "engine" => "disk").increment(1);
        let repaired = self
            .file
            .set_len(committed)
            .and_then(|()| self.file.seek(SeekFrom::Start(committed)).map(|_| ()));
        if let Err(cut) = repaired {
            tracing::error!(error = %e, cut_error = %cut, path = %self.paths.log.display(), "disk write failed and the log cannot be cut back to its last commit: no more publications are acknowledged; restart to recover from the log");
            self.state.poisoned.store(true, Ordering::Release);
            *self.state.degraded.lock() = Some(format!("{why}; the log could not be repaired"));
        } else {
            let first = self.state.degraded.lock().replace(why.clone()).is_none();
            if first {
                tracing::error!(error = %e, path = %self.paths.log.display(), "disk write failed: publications are refused until the disk takes writes again (retried every second)");
            } else {
                tracing::debug!(error = %e, "disk write failed again");
            }
        }
        for r in batch.iter() {
            if let Req::Publish {
                channel,
                history: Some(_),
                ..
            } = r
                && let Some(chan) = self.state.existing(channel)
            {
                let mut inner = chan.inner.lock();
                inner.reserved = inner.stream.as_ref().map_or(0, |w| w.top);
            }
        }
        fail_all(batch, &why);
    }

    fn apply(&self, r: Req, now: Instant) {
        match r {
            Req::Publish {
                channel,
                epoch,
                publication,
                history,
                idempotency,
                ack,
            } => {
                let chan = self.state.chan(&channel);
                let top = {
                    let mut inner = chan.inner.lock();
                    let top = match &history {
                        Some(h) => {
                            let w = inner.stream.get_or_insert_with(|| {
                                StreamWindow::new(epoch.clone(), now, h.meta_ttl)
                            });
                            w.push(publication.clone(), h, now);
                            Some(w.top())
                        }
                        None => None,
                    };
                    if let Some((key, ttl)) = idempotency {
                        inner.idempotent.insert(key, (top.clone(), now + ttl));
                    }
                    top
                };
                if let Some(h) = self.state.handler.get() {
                    let e: Arc<str> = if history.is_some() {
                        epoch
                    } else {
                        Arc::from("")
                    };
                    h.on_publication(&channel, &publication, &e);
                }
                let _ = ack.send(Ok(top));
            }
            Req::Stream { .. } | Req::Probe | Req::SyncHighWater => {}
            Req::Remove { channel, ack } => {
                if let Some(chan) = self.state.existing(&channel)
                    && let Some(w) = &mut chan.inner.lock().stream
                {
                    w.items.clear();
                }
                let _ = ack.send(Ok(()));
            }
            Req::Cursor {
                user,
                channel,
                pos,
                ttl,
                ack,
            } => {
                save_cursor(&self.state, user, channel, pos, now + ttl);
                let _ = ack.send(Ok(()));
            }
        }
    }

    fn maybe_compact(&mut self, len: u64) {
        if let Some(c) = &self.compaction {
            if !c.thread.is_finished() {
                return;
            }
            let Some(c) = self.compaction.take() else {
                return;
            };
            match c.thread.join() {
                Ok(Ok(snapshot_len)) => match self.finish_compaction(c.from) {
                    Ok(total) => {
                        self.last_snapshot = snapshot_len;
                        metrics::counter!("holdfast_disk_compactions_total").increment(1);
                        tracing::info!(before = len, after = total, "log compacted");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "compaction could not finish; the log is unchanged")
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "compaction snapshot failed; the log is unchanged")
                }
                Err(_) => tracing::warn!("compaction thread panicked; the log is unchanged"),
            }
            let _ = std::fs::remove_file(&self.paths.compact);
            return;
        }
        if len < self.min_compact.max(2 * self.last_snapshot) {
            return;
        }
        let records = snapshot(&self.state);
        let path = self.paths.compact.clone();
        let durability = self.durability;
        // The snapshot is the state after commit `seq`: it closes with that number, and the
        // commits copied after it keep theirs.
        let seq = self.seq;
        let thread = std::thread::Builder::new()
            .name("holdfast-disk-compact".into())
            .spawn(move || write_log_file(&path, &records, seq, durability));
        match thread {
            Ok(thread) => self.compaction = Some(Compaction { from: len, thread }),
            Err(e) => tracing::warn!(error = %e, "cannot start compaction"),
        }
    }

    /// Appends what the log got since the snapshot to the new file and swaps it in.
    fn finish_compaction(&mut self, from: u64) -> std::io::Result<u64> {
        let mut tail = Vec::new();
        let mut old = File::open(&self.paths.log)?;
        old.seek(SeekFrom::Start(from))?;
        old.read_to_end(&mut tail)?;
        let mut new = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.paths.compact)?;
        new.write_all(&tail)?;
        new.sync_all()?;
        let new_ino = std::os::unix::fs::MetadataExt::ino(&new.metadata()?);
        drop(new);
        // A crash right after the rename leaves the log with the new file's inode: the record
        // names it first, so that is not taken for a replaced log.
        self.record_high_water(new_ino);
        self.sync_high_water();
        std::fs::rename(&self.paths.compact, &self.paths.log)?;
        log::sync_dir(&self.dir)?;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.paths.log)?;
        let total = f.seek(SeekFrom::End(0))?;
        self.file = f;
        self.record_high_water(0);
        self.state.log_bytes.store(total, Ordering::Relaxed);
        Ok(total)
    }
}

fn fail_all(batch: &mut Vec<Req>, why: &str) {
    for r in batch.drain(..) {
        let e = EngineError::Unavailable(why.to_owned());
        match r {
            Req::Publish { ack, .. } => {
                let _ = ack.send(Err(e));
            }
            Req::Remove { ack, .. } | Req::Cursor { ack, .. } => {
                let _ = ack.send(Err(e));
            }
            Req::Stream { .. } | Req::Probe | Req::SyncHighWater => {}
        }
    }
}

fn encode(r: &Req, buf: &mut Vec<u8>, now: Instant, now_ms: i64) {
    let wall = |d: Duration| to_wall(now + d, now, now_ms);
    match r {
        Req::Publish {
            channel,
            epoch,
            publication,
            history,
            idempotency,
            ..
        } => {
            let (size, items, meta) = match history {
                Some(h) => (h.size as u32, wall(h.ttl), wall(h.meta_ttl)),
                None => (0, now_ms, now_ms),
            };
            Record::Pub {
                channel: channel.to_string(),
                epoch: epoch.to_string(),
                size,
                items_expire_ms: items,
                meta_expire_ms: meta,
                idempotency: idempotency.as_ref().map(|(k, ttl)| (k.clone(), wall(*ttl))),
                publication: publication.clone(),
            }
            .encode(buf);
        }
        Req::Stream {
            channel,
            epoch,
            meta_ttl,
        } => Record::Stream {
            channel: channel.to_string(),
            epoch: epoch.to_string(),
            meta_expire_ms: wall(*meta_ttl),
        }
        .encode(buf),
        Req::Remove { channel, .. } => Record::RemoveHistory {
            channel: channel.to_string(),
        }
        .encode(buf),
        Req::Cursor {
            user,
            channel,
            pos,
            ttl,
            ..
        } => Record::Cursor {
            user: user.to_string(),
            channel: channel.to_string(),
            offset: pos.offset,
            epoch: pos.epoch.to_string(),
            expire_ms: wall(*ttl),
        }
        .encode(buf),
        Req::Probe | Req::SyncHighWater => {}
    }
}

/// The live state as records (for compaction).
fn snapshot(state: &State) -> Vec<Record> {
    let now = Instant::now();
    let now_ms = unix_ms();
    let mut out = Vec::new();
    for shard in state.channels.iter() {
        let chans: Vec<(Arc<str>, Arc<Chan>)> = shard
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (channel, chan) in chans {
            let inner = chan.inner.lock();
            if let Some(w) = &inner.stream {
                let items_expire_ms = to_wall(w.items_expire, now, now_ms);
                let meta_expire_ms = to_wall(w.meta_expire, now, now_ms);
                let first = w.top + 1 - w.items.len() as u64;
                out.push(Record::State {
                    channel: channel.to_string(),
                    epoch: w.epoch.to_string(),
                    top: first - 1,
                    items_expire_ms,
                    meta_expire_ms,
                });
                for p in &w.items {
                    out.push(Record::Pub {
                        channel: channel.to_string(),
                        epoch: w.epoch.to_string(),
                        size: w.items.len() as u32,
                        items_expire_ms,
                        meta_expire_ms,
                        idempotency: None,
                        publication: p.clone(),
                    });
                }
            }
            for (key, (pos, exp)) in &inner.idempotent {
                out.push(Record::Idem {
                    channel: channel.to_string(),
                    key: key.clone(),
                    position: pos.as_ref().map(|p| (p.offset, p.epoch.to_string())),
                    expire_ms: to_wall(*exp, now, now_ms),
                });
            }
        }
    }
    for ((user, channel), (pos, exp)) in state.cursors.lock().iter() {
        out.push(Record::Cursor {
            user: user.to_string(),
            channel: channel.to_string(),
            offset: pos.offset,
            epoch: pos.epoch.to_string(),
            expire_ms: to_wall(*exp, now, now_ms),
        });
    }
    out
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
            ack,
        };
        let Some(key) = &opts.idempotency_key else {
            // The writer hands out offsets in queue order: no lock needed here.
            let position = self.submit(req, rx).await?;
            return Ok(PublishOutcome {
                position,
                suppressed: false,
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
                });
            }
        }
        let position = self.submit(req, rx).await?;
        drop(order);
        Ok(PublishOutcome {
            position,
            suppressed: false,
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
