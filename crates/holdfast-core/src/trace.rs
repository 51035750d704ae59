//! Live tracing for operators: follow one channel or one user on this node and receive what
//! passes (publications, joins and leaves, subscriptions, connects, disconnects with their code).
//!
//! Costs nothing while nobody traces: every hook first reads one atomic. A tracer is bounded in
//! rate ([`TRACE_RATE`] events per second) and in queued events ([`TRACE_QUEUE`]); what exceeds
//! either is counted as dropped, never waited for.

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Events per second one tracer receives at most (a burst of as many).
pub const TRACE_RATE: f64 = 100.0;
/// Events queued for one tracer at most.
pub const TRACE_QUEUE: usize = 256;

/// What a tracer follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceTarget {
    /// One channel: its publications, joins, leaves, subscribes and unsubscribes.
    Channel(Arc<str>),
    /// One user: connects, disconnects, subscribes, unsubscribes and the publications its
    /// connections receive.
    User(Arc<str>),
}

/// One traced event.
#[derive(Debug, Clone)]
pub enum TraceEvent {
    /// A publication fanned out on this node.
    Publication {
        /// Channel.
        channel: Arc<str>,
        /// Offset in the stream (0 without history).
        offset: u64,
        /// Payload (shared, not copied).
        data: Bytes,
        /// The payload is not known to be JSON text.
        binary: bool,
    },
    /// Join (presence) in a channel.
    Join {
        /// Channel.
        channel: Arc<str>,
        /// User.
        user: Arc<str>,
        /// Connection.
        client: Arc<str>,
    },
    /// Leave (presence) from a channel.
    Leave {
        /// Channel.
        channel: Arc<str>,
        /// User.
        user: Arc<str>,
        /// Connection.
        client: Arc<str>,
    },
    /// A connection of this node subscribed.
    Subscribe {
        /// Channel.
        channel: Arc<str>,
        /// User.
        user: Arc<str>,
        /// Connection.
        client: Arc<str>,
    },
    /// A subscription on this node ended.
    Unsubscribe {
        /// Channel.
        channel: Arc<str>,
        /// User.
        user: Arc<str>,
        /// Connection.
        client: Arc<str>,
    },
    /// A connection authenticated.
    Connect {
        /// User.
        user: Arc<str>,
        /// Connection.
        client: Arc<str>,
        /// Transport name.
        transport: &'static str,
        /// Client SDK name.
        name: String,
    },
    /// A connection closed.
    Disconnect {
        /// User.
        user: Arc<str>,
        /// Connection.
        client: Arc<str>,
        /// Disconnect code.
        code: u32,
        /// Disconnect reason.
        reason: String,
    },
}

/// Too many tracers at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTracers;

#[derive(Debug)]
struct Tap {
    id: u64,
    target: TraceTarget,
    tx: mpsc::Sender<TraceEvent>,
    /// (tokens, last refill).
    bucket: Mutex<(f64, Instant)>,
    dropped: AtomicU64,
}

impl Tap {
    fn offer(&self, event: TraceEvent) {
        {
            let mut b = self.bucket.lock();
            let now = Instant::now();
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * TRACE_RATE).min(TRACE_RATE);
            b.1 = now;
            if b.0 < 1.0 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            b.0 -= 1.0;
        }
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Number of taps (read on every hook).
    active: AtomicUsize,
    taps: RwLock<Vec<Arc<Tap>>>,
    next: AtomicU64,
}

/// The node's tracers.
#[derive(Debug, Clone, Default)]
pub struct Tracer(Arc<Inner>);

/// One running trace: events arrive on [`TraceStream::recv`]; dropping it stops the trace.
#[derive(Debug)]
pub struct TraceStream {
    rx: mpsc::Receiver<TraceEvent>,
    tap: Arc<Tap>,
    tracer: Tracer,
}

impl TraceStream {
    /// The next event (None once the node dropped the tracer).
    pub async fn recv(&mut self) -> Option<TraceEvent> {
        self.rx.recv().await
    }

    /// Events dropped (rate or queue) since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.tap.dropped.swap(0, Ordering::Relaxed)
    }

    /// What this trace follows.
    pub fn target(&self) -> &TraceTarget {
        &self.tap.target
    }
}

impl Drop for TraceStream {
    fn drop(&mut self) {
        let inner = &self.tracer.0;
        let mut taps = inner.taps.write();
        let before = taps.len();
        taps.retain(|t| t.id != self.tap.id);
        if taps.len() < before {
            inner.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Tracer {
    /// Starts following `target`, unless `max` tracers already run.
    pub fn follow(&self, target: TraceTarget, max: usize) -> Result<TraceStream, TooManyTracers> {
        let mut taps = self.0.taps.write();
        if taps.len() >= max {
            return Err(TooManyTracers);
        }
        let (tx, rx) = mpsc::channel(TRACE_QUEUE);
        let tap = Arc::new(Tap {
            id: self.0.next.fetch_add(1, Ordering::Relaxed),
            target,
            tx,
            bucket: Mutex::new((TRACE_RATE, Instant::now())),
            dropped: AtomicU64::new(0),
        });
        taps.push(tap.clone());
        self.0.active.fetch_add(1, Ordering::Relaxed);
        Ok(TraceStream {
            rx,
            tap,
            tracer: self.clone(),
        })
    }

    /// Whether anybody traces (one relaxed load: call before building an event).
    #[inline]
    pub fn active(&self) -> bool {
        self.0.active.load(Ordering::Relaxed) > 0
    }

    /// Number of running tracers.
    pub fn count(&self) -> usize {
        self.0.active.load(Ordering::Relaxed)
    }

    /// Offers an event to the tracers following `channel` or `user` (either may be absent).
    pub(crate) fn offer(
        &self,
        channel: Option<&str>,
        user: Option<&str>,
        event: impl FnOnce() -> TraceEvent,
    ) {
        if !self.active() {
            return;
        }
        let taps = self.0.taps.read();
        let mut made: Option<TraceEvent> = None;
        let mut event = Some(event);
        for t in taps.iter() {
            let hit = match &t.target {
                TraceTarget::Channel(c) => channel == Some(&**c),
                TraceTarget::User(u) => user == Some(&**u),
            };
            if hit {
                let e = match &made {
                    Some(e) => e.clone(),
                    None => {
                        let Some(f) = event.take() else { return };
                        let e = f();
                        made = Some(e.clone());
                        e
                    }
                };
                t.offer(e);
            }
        }
    }

    /// The users followed by a tracer (for fan-out, which looks at its subscribers only then).
    pub(crate) fn users(&self) -> Vec<Arc<str>> {
        let mut users: Vec<Arc<str>> = self
            .0
            .taps
            .read()
            .iter()
            .filter_map(|t| match &t.target {
                TraceTarget::User(u) => Some(u.clone()),
                TraceTarget::Channel(_) => None,
            })
            .collect();
        // Two tracers of one user: each gets the event once (offer reaches both).
        users.sort_unstable();
        users.dedup();
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(offset: u64) -> TraceEvent {
        TraceEvent::Publication {
            channel: "news".into(),
            offset,
            data: Bytes::from_static(b"{}"),
            binary: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn follows_its_target_only_and_is_bounded_in_rate() {
        let tracer = Tracer::default();
        assert!(!tracer.active());
        let mut news = tracer
            .follow(TraceTarget::Channel("news".into()), 2)
            .expect("first");
        let alice = tracer
            .follow(TraceTarget::User("alice".into()), 2)
            .expect("second");
        assert_eq!(
            tracer
                .follow(TraceTarget::User("bob".into()), 2)
                .unwrap_err(),
            TooManyTracers
        );
        tracer.offer(Some("other"), None, || publication(1));
        tracer.offer(Some("news"), Some("bob"), || publication(2));
        match news.recv().await {
            Some(TraceEvent::Publication { offset, .. }) => assert_eq!(offset, 2),
            e => panic!("unexpected {e:?}"),
        }
        assert!(
            news.rx.try_recv().is_err(),
            "the other channel is not traced"
        );
        // A burst beyond the rate is dropped and counted (one token went on the first event);
        // time refills the bucket.
        for i in 0..150 {
            tracer.offer(Some("news"), None, || publication(i));
        }
        assert_eq!(news.take_dropped(), 51);
        assert_eq!(news.take_dropped(), 0);
        let mut got = 0;
        while news.rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 99);
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        for i in 0..20 {
            tracer.offer(Some("news"), None, || publication(i));
        }
        assert_eq!(news.take_dropped(), 10, "10 tokens refilled in 100 ms");
        drop(alice);
        assert_eq!(tracer.count(), 1);
        drop(news);
        assert!(!tracer.active());
    }
}
