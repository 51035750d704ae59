//! The shared half of a connection: its outbound queue and the signals between the reader, the
//! writer and the rest of the node.
//!
//! Fan-out, API calls and the session all reach a connection through [`ClientHandle`]: they push
//! encoded messages into the bounded outbox (never waiting), ask it to close, or leave a control
//! message for the session. The transport's writer drains the outbox.

use bytes::Bytes;
use holdfast_protocol::{Disconnect, Encoding};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A server-side subscription requested through the server API.
#[derive(Debug, Clone, Default)]
pub struct ServerSubscribe {
    /// Channel name.
    pub channel: String,
    /// Channel info (`chan_info`).
    pub info: Option<Bytes>,
    /// Data sent with the `subscribe` push.
    pub data: Option<Bytes>,
    /// Recover from this position (offset, epoch) and deliver the missed publications.
    pub recover_since: Option<(u64, String)>,
    /// Option overrides.
    pub overrides: crate::handler::ChannelOverride,
}

/// Control messages for the session, left by other parts of the node. Bounded by
/// [`MAX_CONTROL`]; beyond it the connection is closed to resynchronise.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// The subscription was ended by fan-out (gap detected); the unsubscribe push was sent.
    SubscriptionLost { channel: Arc<str> },
    /// Unsubscribe (server API): push `unsubscribe` with this code.
    Unsubscribe {
        channel: String,
        code: u32,
        reason: String,
    },
    /// Subscribe on behalf of the server (server API).
    Subscribe(Box<ServerSubscribe>),
    /// Refresh the connection's expiry (server API).
    Refresh {
        expire_at: Option<i64>,
        info: Option<Bytes>,
    },
}

const MAX_CONTROL: usize = 256;

/// A channel's position noted for its delivery cursor: (channel, offset, epoch).
pub(crate) type CursorPosition = (Arc<str>, u64, Arc<str>);

/// State of the outbound queue.
#[derive(Debug)]
struct Outbox {
    /// The oldest encoded message (no framing). Kept apart from `rest` so that a connection
    /// taking one message per wake-up, the usual case under fan-out, never allocates a queue.
    first: Option<Bytes>,
    /// The messages after `first`, oldest first (empty while `first` is `None`).
    rest: VecDeque<Bytes>,
    /// Bytes in `first` and `rest`.
    bytes: usize,
    /// Set once: the connection is closing with this disconnect.
    closing: Option<Disconnect>,
    /// Write what is queued before closing (false for 3008, whose queue is dropped).
    flush_on_close: bool,
}

/// What the writer takes from the outbox in one go.
#[derive(Debug, Default)]
pub struct Drained {
    first: Option<Bytes>,
    rest: VecDeque<Bytes>,
    /// Close with this after writing the messages.
    pub close: Option<Disconnect>,
}

impl Drained {
    /// Number of messages taken.
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// Whether no message was taken.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// The messages, oldest first, leaving `close` in place.
    pub fn take_messages(&mut self) -> impl Iterator<Item = Bytes> + use<> {
        self.first
            .take()
            .into_iter()
            .chain(std::mem::take(&mut self.rest))
    }
}

/// What an operator sees of a connection (the admin UI, the `connections` API method).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionDetails {
    /// Transport name.
    pub transport: &'static str,
    /// Client SDK name (`js`, `python`…).
    pub name: String,
    /// Client SDK version.
    pub version: String,
    /// The client's address (behind trusted proxies, the forwarded one).
    pub ip: Option<std::net::IpAddr>,
    /// When it connected, seconds since the Unix epoch.
    pub connected_at: u64,
}

/// One connection as seen by the rest of the node.
#[derive(Debug)]
pub struct ClientHandle {
    /// Connection id (UUID), sent in the connect result.
    pub(crate) id: Arc<str>,
    /// Small unique number used as the key in per-channel subscriber maps.
    pub(crate) seq: u64,
    /// Frame encoding of this connection.
    pub(crate) encoding: Encoding,
    /// The client sends nothing after connect (no pongs).
    unidirectional: bool,
    /// Queue limit in bytes; overflow closes the connection with 3008.
    max_queue: usize,
    outbox: Mutex<Outbox>,
    /// Wakes the writer (messages queued, close requested, timers changed) or the reader
    /// (control message, close).
    pub(crate) halves: crate::wake::Halves,
    control: Mutex<VecDeque<Control>>,
    /// The connect command succeeded.
    connected: AtomicBool,
    /// A ping was written and no pong has arrived yet.
    ping_outstanding: AtomicBool,
    /// Something the writer's timers depend on changed (see [`ClientHandle::wake_writer`]).
    timers_changed: AtomicBool,
    /// When the connection expires (None = never); the writer closes it with 3005 after the
    /// grace delay unless a refresh moves this.
    expires_at: Mutex<Option<tokio::time::Instant>>,
    /// When the session next has timer work (subscription expiry, connection refresh): the
    /// writer keeps the connection's one timer, the reader sets this and runs the work when
    /// the writer says it is due (see [`ClientHandle::take_session_due`]).
    session_at: Mutex<Option<tokio::time::Instant>>,
    /// The writer found `session_at` due and woke the reader for it.
    session_due: AtomicBool,
    /// User id, set on connect.
    user: std::sync::OnceLock<Arc<str>>,
    /// Set on connect.
    details: std::sync::OnceLock<Box<ConnectionDetails>>,
    /// Messages written to the socket (for the metrics of this connection).
    pub(crate) sent: AtomicU64,
    /// Subscriptions with a delivery cursor (weak: the hub and the session own them).
    cursor_subs: Mutex<Vec<std::sync::Weak<crate::hub::Subscription>>>,
    /// Their positions when the outstanding ping was queued: the pong confirms these.
    ping_snapshot: Mutex<Vec<CursorPosition>>,
    /// A delivery on a cursor subscription was queued after the last ping's snapshot: the
    /// writer asks for a pong soon (`client.delivery_cursor_confirm_delay`).
    cursor_pending: AtomicBool,
    /// Write one message per frame: centrifuge-js dispatches the messages of a frame on a
    /// promise chain that the next frame's chain overtakes, so a joined frame followed closely
    /// by another reaches the application out of order (and breaks its delta decoding).
    single_message_frames: AtomicBool,
}

impl ClientHandle {
    pub(crate) fn new(
        id: Arc<str>,
        seq: u64,
        encoding: Encoding,
        unidirectional: bool,
        max_queue: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            seq,
            encoding,
            unidirectional,
            max_queue,
            outbox: Mutex::new(Outbox {
                first: None,
                rest: VecDeque::new(),
                bytes: 0,
                closing: None,
                flush_on_close: true,
            }),
            halves: crate::wake::Halves::default(),
            control: Mutex::new(VecDeque::new()),
            connected: AtomicBool::new(false),
            ping_outstanding: AtomicBool::new(false),
            timers_changed: AtomicBool::new(false),
            expires_at: Mutex::new(None),
            session_at: Mutex::new(None),
            session_due: AtomicBool::new(false),
            user: std::sync::OnceLock::new(),
            details: std::sync::OnceLock::new(),
            sent: AtomicU64::new(0),
            cursor_subs: Mutex::new(Vec::new()),
            ping_snapshot: Mutex::new(Vec::new()),
            cursor_pending: AtomicBool::new(false),
            single_message_frames: AtomicBool::new(false),
        })
    }

    /// From now on every frame carries one message (see the field's note).
    pub(crate) fn set_single_message_frames(&self) {
        self.single_message_frames.store(true, Ordering::Relaxed);
    }

    /// Whether every frame carries one message.
    pub fn single_message_frames(&self) -> bool {
        self.single_message_frames.load(Ordering::Relaxed)
    }

    /// Connection id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// User id (empty before connect and for anonymous users).
    pub fn user(&self) -> &str {
        self.user.get().map_or("", |u| u)
    }

    pub(crate) fn set_user(&self, user: Arc<str>) {
        let _ = self.user.set(user);
    }

    pub(crate) fn set_details(&self, details: ConnectionDetails) {
        let _ = self.details.set(Box::new(details));
    }

    /// Transport, client name, address and connect time (None before connect).
    pub fn details(&self) -> Option<&ConnectionDetails> {
        self.details.get().map(|d| &**d)
    }

    /// Frame encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Queues one encoded message. Never waits: on overflow the connection is closed with 3008
    /// and its queue dropped. Returns false when the message was not queued.
    pub fn send(&self, msg: Bytes) -> bool {
        let mut ob = self.outbox.lock();
        if ob.closing.is_some() {
            return false;
        }
        if ob.bytes + msg.len() > self.max_queue {
            ob.first = None;
            ob.rest = VecDeque::new();
            ob.bytes = 0;
            ob.closing = Some(Disconnect::SLOW);
            ob.flush_on_close = false;
            drop(ob);
            metrics::counter!("holdfast_queue_overflow_disconnects_total").increment(1);
            tracing::info!(client = %self.id, user = self.user(), "outbound queue overflow, closing with 3008");
            self.wake_all();
            return false;
        }
        let was_empty = ob.first.is_none();
        ob.bytes += msg.len();
        if was_empty {
            ob.first = Some(msg);
        } else {
            ob.rest.push_back(msg);
        }
        drop(ob);
        if was_empty {
            self.halves.notify_writer();
        }
        true
    }

    /// Asks the connection to close: queued messages are written first, then the close frame.
    /// The first close wins.
    pub fn close(&self, d: Disconnect) {
        let mut ob = self.outbox.lock();
        if ob.closing.is_some() {
            return;
        }
        ob.closing = Some(d);
        drop(ob);
        self.wake_all();
    }

    /// Whether the connection is closing or closed.
    pub fn is_closing(&self) -> bool {
        self.outbox.lock().closing.is_some()
    }

    /// The disconnect the connection is closing with.
    pub fn closing_reason(&self) -> Option<Disconnect> {
        self.outbox.lock().closing.clone()
    }

    /// Bytes waiting in the outbox.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.lock().bytes
    }

    /// Takes everything queued (and the close request, if any) for the writer.
    pub fn drain(&self) -> Drained {
        let mut ob = self.outbox.lock();
        let close = ob.closing.clone();
        ob.bytes = 0;
        if close.is_some() && !ob.flush_on_close {
            ob.first = None;
            ob.rest = VecDeque::new();
        }
        Drained {
            first: ob.first.take(),
            rest: std::mem::take(&mut ob.rest),
            close,
        }
    }

    /// Waits until the writer has something to do (only inside the connection's task, which
    /// polls its writer when notified).
    pub(crate) async fn writer_notified(&self) {
        self.halves.writer_notified().await;
    }

    /// Wakes the writer to look at its timers again (connected, expiry moved).
    pub(crate) fn wake_writer(&self) {
        self.timers_changed.store(true, Ordering::Release);
        self.halves.notify_writer();
    }

    /// Whether the timers changed since the last call.
    pub(crate) fn take_timers_changed(&self) -> bool {
        self.timers_changed.swap(false, Ordering::AcqRel)
    }

    /// Waits until the reader has something to do (only inside the connection's task).
    pub(crate) async fn reader_notified(&self) {
        self.halves.reader_notified().await;
    }

    fn wake_all(&self) {
        self.halves.notify_writer();
        self.halves.notify_reader();
    }

    pub(crate) fn push_control(&self, c: Control) {
        let mut q = self.control.lock();
        if q.len() >= MAX_CONTROL {
            drop(q);
            tracing::warn!(client = %self.id, "control queue full, closing to resynchronise");
            self.close(Disconnect::SERVER_ERROR);
            return;
        }
        q.push_back(c);
        drop(q);
        self.halves.notify_reader();
    }

    pub(crate) fn take_control(&self) -> Option<Control> {
        self.control.lock().pop_front()
    }

    pub(crate) fn set_connected(&self) {
        self.connected.store(true, Ordering::Release);
        self.wake_writer();
    }

    /// Whether the connect command succeeded.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Tracks a subscription's position for its delivery cursor.
    pub(crate) fn track_cursor(&self, sub: &Arc<crate::hub::Subscription>) {
        let mut subs = self.cursor_subs.lock();
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(sub));
    }

    /// A delivery on a cursor subscription was queued: the first one after a ping's snapshot
    /// wakes the writer to schedule an early ping.
    pub(crate) fn note_cursor_delivery(&self) {
        if !self.cursor_pending.swap(true, Ordering::AcqRel) {
            self.wake_writer();
        }
    }

    /// Whether a cursor delivery waits for a ping to confirm it.
    pub fn cursor_pending(&self) -> bool {
        self.cursor_pending.load(Ordering::Acquire)
    }

    /// Records the positions of cursor subscriptions; call right before queueing a ping, so the
    /// snapshot never claims a publication queued after it.
    pub fn snapshot_cursors(&self) {
        // Cleared first: a delivery racing with the snapshot sets it again (one extra ping).
        self.cursor_pending.store(false, Ordering::Release);
        let snap: Vec<_> = self
            .cursor_subs
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter_map(|s| s.live_position().map(|(o, e)| (s.channel.clone(), o, e)))
            .collect();
        *self.ping_snapshot.lock() = snap;
    }

    /// The positions the last ping confirmed (taken once, on its pong).
    pub(crate) fn take_ping_snapshot(&self) -> Vec<CursorPosition> {
        std::mem::take(&mut *self.ping_snapshot.lock())
    }

    /// Whether the client sends nothing after connect (a unidirectional transport).
    pub fn is_unidirectional(&self) -> bool {
        self.unidirectional
    }

    /// Marks a ping as written; returns false when the previous one is still unanswered.
    pub fn ping_sent(&self) -> bool {
        !self.ping_outstanding.swap(true, Ordering::AcqRel)
    }

    /// Whether a ping is waiting for its pong.
    pub fn ping_outstanding(&self) -> bool {
        self.ping_outstanding.load(Ordering::Acquire)
    }

    /// Records a pong; false when no ping was outstanding (an unnecessary pong).
    pub(crate) fn pong_received(&self) -> bool {
        self.ping_outstanding.swap(false, Ordering::AcqRel)
    }

    /// When the connection expires (None = never).
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        *self.expires_at.lock()
    }

    pub(crate) fn set_expires_at(&self, at: Option<tokio::time::Instant>) {
        *self.expires_at.lock() = at;
        self.wake_writer();
    }

    /// When the session next has timer work (None = none).
    pub(crate) fn session_at(&self) -> Option<tokio::time::Instant> {
        *self.session_at.lock()
    }

    /// Tells the writer when the session next has timer work.
    pub(crate) fn set_session_at(&self, at: Option<tokio::time::Instant>) {
        *self.session_at.lock() = at;
        self.wake_writer();
    }

    /// Called by the writer with the time: when `session_at` is due, clears it and wakes the
    /// reader, which runs the session's timer work and sets the next instant.
    pub(crate) fn fire_session_timer(&self, now: tokio::time::Instant) {
        let mut at = self.session_at.lock();
        if at.is_none_or(|t| t > now) {
            return;
        }
        *at = None;
        drop(at);
        self.session_due.store(true, Ordering::Release);
        self.halves.notify_reader();
    }

    /// Whether the session's timer work is due (once per firing).
    pub(crate) fn take_session_due(&self) -> bool {
        self.session_due.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_with_slow_and_drops_queue() {
        let c = ClientHandle::new("c".into(), 1, Encoding::Json, false, 10);
        assert!(c.send(Bytes::from_static(b"12345")));
        assert!(c.send(Bytes::from_static(b"12345")));
        assert_eq!(c.queued_bytes(), 10);
        assert!(!c.send(Bytes::from_static(b"1")));
        let d = c.drain();
        assert!(d.is_empty(), "3008 drops the queue");
        assert_eq!(d.close, Some(Disconnect::SLOW));
        assert!(
            !c.send(Bytes::from_static(b"1")),
            "nothing is queued after close"
        );
    }

    #[test]
    fn close_flushes_queue_first() {
        let c = ClientHandle::new("c".into(), 1, Encoding::Json, false, 100);
        c.send(Bytes::from_static(b"a"));
        c.close(Disconnect::SHUTDOWN);
        c.close(Disconnect::FORCE_DISCONNECT);
        let d = c.drain();
        assert_eq!(d.len(), 1);
        assert_eq!(d.close, Some(Disconnect::SHUTDOWN), "the first close wins");
    }

    #[test]
    fn pong_accounting() {
        let c = ClientHandle::new("c".into(), 1, Encoding::Json, false, 100);
        assert!(!c.pong_received(), "pong without ping is unnecessary");
        assert!(c.ping_sent());
        assert!(c.pong_received());
        assert!(
            !c.pong_received(),
            "second pong for one ping is unnecessary"
        );
    }
}
