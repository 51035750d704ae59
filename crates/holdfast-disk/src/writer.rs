//! The writer thread: takes every request queued while the previous write was in progress,
//! hands out offsets, appends the batch with one commit marker and one sync, records the
//! high-water mark, then applies and acknowledges; compacts the log in the background.

use super::*;

/// The writer thread: batches, appends, syncs, applies, acknowledges; compacts.
pub(crate) struct Writer {
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
    /// A writer over the opened log (`files`: the log, its paths, the directory lock) whose last
    /// commit is `seq`.
    pub(crate) fn new(
        state: Arc<State>,
        files: (File, Paths, File),
        cfg: &DiskConfig,
        seq: u64,
        high_water: hwm::HighWater,
    ) -> Self {
        let (file, paths, lock) = files;
        Self {
            last_snapshot: state.log_bytes.load(Ordering::Relaxed),
            state,
            file,
            paths,
            dir: cfg.path.clone(),
            durability: cfg.durability,
            min_compact: cfg.min_compact_bytes,
            compaction: None,
            seq,
            high_water,
            high_water_synced: std::time::Instant::now(),
            _lock: lock,
        }
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Req>) {
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
                version,
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
                            if let Some((v, ve)) = &version {
                                w.set_version(*v, ve);
                            }
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
            version,
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
                version: version.as_ref().map(|(v, ve)| (*v, ve.to_string())),
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
pub(crate) fn snapshot(state: &State) -> Vec<Record> {
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
                    version: (w.version > 0).then(|| (w.version, w.version_epoch.to_string())),
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
                        version: None,
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
