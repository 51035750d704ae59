//! Opening a data directory: replaying the log into memory, judging it against the high-water
//! record, and what a rollback does (new epochs, the log rewritten); `holdfast disk check` and
//! `holdfast disk new-epochs`.

use super::*;

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

pub(crate) fn found(r: &log::Replayed, identity: hwm::Identity) -> hwm::Found {
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
pub(crate) fn rotate_epochs(state: &State) -> usize {
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
pub(crate) fn write_log_file(
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

pub(crate) fn apply_replayed(state: &State, r: Record, now: Instant, now_ms: i64) {
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
            version,
        } => {
            let chan = state.chan(&channel);
            let mut inner = chan.inner.lock();
            let mut w = StreamWindow::new(epoch.into(), now, Duration::ZERO);
            w.top = top;
            if let Some((v, ve)) = version {
                w.set_version(v, &ve);
            }
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
            version,
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
                if let Some((v, ve)) = &version {
                    w.set_version(*v, ve);
                }
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
