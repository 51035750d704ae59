//! A stream's retained window: epoch, top offset and the newest publications. Shared by the
//! engines that keep history in memory (the memory engine, and the disk engine's hot copy).

use super::{EngineError, HistoryOptions, HistoryPage, HistoryQuery, StreamTop};
use holdfast_protocol::Publication;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One channel's stream in memory.
#[derive(Debug, Clone)]
pub struct StreamWindow {
    /// Epoch of the offsets.
    pub epoch: Arc<str>,
    /// Offset of the newest publication (0 = none yet).
    pub top: u64,
    /// Contiguous publications ending at `top`.
    pub items: VecDeque<Arc<Publication>>,
    /// Items are dropped at this instant unless another publish comes first.
    pub items_expire: Instant,
    /// The whole stream (epoch and top) is dropped at this instant unless accessed.
    pub meta_expire: Instant,
    /// Latest-state publishing: the newest publication version accepted (0 = none) and its
    /// version epoch. Lives and expires with the stream.
    pub version: u64,
    /// Epoch of `version` (a different one starts versions over).
    pub version_epoch: Arc<str>,
}

impl StreamWindow {
    /// An empty stream under `epoch`.
    pub fn new(epoch: Arc<str>, now: Instant, meta_ttl: Duration) -> Self {
        Self {
            epoch,
            top: 0,
            items: VecDeque::new(),
            items_expire: now,
            meta_expire: now + meta_ttl,
            version: 0,
            version_epoch: Arc::from(""),
        }
    }

    /// Whether a publication of `version` (in `version_epoch`) is newer than the stream's
    /// latest state: version 0 is never checked; an empty or equal epoch compares versions; a
    /// different epoch starts over.
    pub fn version_allows(&self, version: u64, version_epoch: &str) -> bool {
        version == 0
            || self.version == 0
            || !(version_epoch.is_empty() || version_epoch == &*self.version_epoch)
            || version > self.version
    }

    /// Records an accepted publication's version (0 leaves it unchanged).
    pub fn set_version(&mut self, version: u64, version_epoch: &str) {
        if version > 0 {
            self.version = version;
            if *self.version_epoch != *version_epoch {
                self.version_epoch = version_epoch.into();
            }
        }
    }

    /// Drops the items once their TTL has passed (epoch and top stay).
    pub fn expire(&mut self, now: Instant) {
        if now >= self.items_expire {
            self.items.clear();
        }
    }

    /// The current position.
    pub fn top(&self) -> StreamTop {
        StreamTop {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// Appends the publication at offset `top + 1` (its `offset` must already say so), trims
    /// to the history size and refreshes the expiries.
    pub fn push(&mut self, p: Arc<Publication>, h: &HistoryOptions, now: Instant) {
        self.expire(now);
        self.top = p.offset;
        self.items.push_back(p);
        while self.items.len() > h.size.max(1) {
            self.items.pop_front();
        }
        self.items_expire = now + h.ttl;
        self.meta_expire = self.meta_expire.max(now + h.meta_ttl);
    }

    /// Reads per `query` (and refreshes the meta TTL).
    pub fn read(&mut self, query: &HistoryQuery, now: Instant) -> Result<HistoryPage, EngineError> {
        self.expire(now);
        self.meta_expire = self.meta_expire.max(now + query.meta_ttl);
        let top = self.top();
        if let Some((_, epoch)) = &query.since
            && !epoch.is_empty()
            && **epoch != *self.epoch
        {
            return Err(EngineError::UnrecoverablePosition);
        }
        let limit = query.limit.unwrap_or(usize::MAX);
        if limit == 0 || self.items.is_empty() {
            return Ok(HistoryPage {
                publications: Vec::new(),
                top,
            });
        }
        let first = self.top + 1 - self.items.len() as u64;
        let publications: Vec<Arc<Publication>> = if query.reverse {
            // Offsets strictly below `since` (or everything), newest first.
            let below = match &query.since {
                Some((since, _)) => (*since).min(self.top + 1),
                None => self.top + 1,
            };
            if below <= first {
                Vec::new()
            } else {
                let end = (below - first) as usize; // exclusive index
                self.items.range(..end).rev().take(limit).cloned().collect()
            }
        } else {
            let after = query.since.as_ref().map_or(0, |(o, _)| *o);
            let start = if after < first {
                0
            } else {
                usize::try_from(after.saturating_add(1) - first).unwrap_or(usize::MAX)
            };
            self.items
                .range(start.min(self.items.len())..)
                .take(limit)
                .cloned()
                .collect()
        };
        Ok(HistoryPage { publications, top })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_after_the_largest_offset_is_empty_not_an_overflow() {
        let now = Instant::now();
        let mut w = StreamWindow::new("e".into(), now, Duration::from_secs(60));
        let h = HistoryOptions {
            size: 10,
            ttl: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(60),
        };
        w.push(
            Arc::new(Publication {
                offset: 1,
                ..Default::default()
            }),
            &h,
            now,
        );
        let q = HistoryQuery {
            since: Some((u64::MAX, String::new())),
            limit: None,
            reverse: false,
            meta_ttl: Duration::from_secs(60),
        };
        let page = w.read(&q, now).expect("read");
        assert!(page.publications.is_empty());
    }
}
