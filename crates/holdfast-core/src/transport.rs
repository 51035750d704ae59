//! Runs one connection over any frame transport: a reader that feeds the session and a writer
//! that drains the outbox, batching many messages per frame and many frames per flush, and that
//! owns the connection's timers (stale, ping/pong, expiry).

use crate::client::ClientHandle;
use crate::node::Node;
use crate::session::Session;
use bytes::{Bytes, BytesMut};
use holdfast_protocol::{Disconnect, Encoding};
use rand::Rng;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

/// Messages joined into one frame at most.
pub(crate) const MAX_MESSAGES_PER_FRAME: usize = 64;
/// Bytes joined into one frame at most (a single larger message still goes alone).
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// After the server closed a connection (its close frame queued), how long the reader keeps
/// reading and discarding what the client still sends, so the client reads the close frame
/// instead of a TCP reset (closing a socket with unread input resets it).
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// Errors in a row after which draining stops (a garbled stream may yield errors without
/// consuming input).
const CLOSE_DRAIN_ERRORS: usize = 100;

/// Incoming side of a transport. Implement it with `async fn`: the future is not boxed.
pub trait FrameSource: Send {
    /// The next data frame; `None` when the peer closed, `Err` for a transport-level violation
    /// (e.g. 1009 message too big). Must be cancel-safe.
    fn next_frame(&mut self) -> impl Future<Output = Option<Result<Bytes, Disconnect>>> + Send;
}

/// Outgoing side of a transport. Implement it with `async fn`s: the futures are not boxed.
pub trait FrameSink: Send {
    /// Queues one frame (text, or binary for protobuf) without flushing.
    fn send_frame(
        &mut self,
        frame: Bytes,
        binary: bool,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Writes out everything queued.
    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Sends a close frame and shuts the stream down.
    fn close(
        &mut self,
        code: u16,
        reason: &str,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// How a connection's client talks to the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConnectionKind {
    /// Both ways over one connection (WebSocket): disconnects travel in the transport's own
    /// close (the WebSocket close frame).
    #[default]
    Bidirectional,
    /// Server to client over a stream (HTTP-streaming, SSE), client to server through
    /// `/emulation` requests naming `session`; the connect result names the session and the
    /// node, and a disconnect is a `disconnect` push at the end of the stream.
    Emulation {
        /// The session id `/emulation` requests name.
        session: Arc<str>,
    },
    /// Pushes only (uni_websocket, uni_sse, uni_http_stream): the connect request came with
    /// the connection; the connect result is a `connect` push; a refused connect is a
    /// disconnect; there are no pongs.
    Unidirectional {
        /// Session id reported in the connect push.
        session: Arc<str>,
    },
}

impl ConnectionKind {
    /// Whether the client sends nothing after its connect request.
    pub fn is_unidirectional(&self) -> bool {
        matches!(self, ConnectionKind::Unidirectional { .. })
    }

    /// The session id of an emulated or unidirectional connection.
    pub fn session(&self) -> Option<&Arc<str>> {
        match self {
            ConnectionKind::Bidirectional => None,
            ConnectionKind::Emulation { session } | ConnectionKind::Unidirectional { session } => {
                Some(session)
            }
        }
    }
}

/// What the server knows about a connection before it speaks.
#[derive(Debug, Clone)]
pub struct ConnectionMeta {
    /// Transport name (`websocket`, `http_stream`, `sse`, `uni_websocket`, `uni_sse`,
    /// `uni_http_stream`): the `transport` label of metrics, told to hooks and proxies.
    pub transport: &'static str,
    /// How the client talks to the server.
    pub kind: ConnectionKind,
    /// Frame encoding.
    pub encoding: Encoding,
    /// The client's address (behind trusted proxies, the forwarded one), when known.
    pub ip: Option<std::net::IpAddr>,
    /// HTTP headers of the upgrade request that hooks may forward (lower-case names; only
    /// those the configuration asks for are kept).
    pub headers: Headers,
}

/// Forwardable request headers: (lower-case name, value).
pub type Headers = Arc<[(String, String)]>;

/// Serves one connection until it closes. Call inside a task tracked by
/// [`Node::tracker`] so shutdown waits for it.
pub async fn serve_connection<S, K>(node: Node, meta: ConnectionMeta, source: S, sink: K)
where
    S: FrameSource,
    K: FrameSink,
{
    let client = node.new_client(meta.encoding, meta.kind.is_unidirectional());
    let transport = meta.transport;
    let session = Session::new(node.clone(), client.clone(), meta);
    let active = metrics::gauge!("holdfast_connections_active", "transport" => transport);
    active.increment(1.0);
    // Pinned here and lent to `run_halves`: an async fn that took them by value would hold
    // each twice in the connection's future (the argument and its pinned copy).
    let reader = std::pin::pin!(read_loop(session, source));
    let writer = std::pin::pin!(write_loop(node.clone(), client.clone(), sink, transport));
    crate::wake::run_halves(&client, reader, writer).await;
    active.decrement(1.0);
    let reason = client
        .closing_reason()
        .unwrap_or(Disconnect::CONNECTION_CLOSED);
    metrics::counter!("holdfast_disconnects_total", "code" => reason.code.to_string()).increment(1);
    if reason == Disconnect::SLOW {
        node.stats()
            .slow_disconnects
            .fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(client = %client.id(), user = client.user(), code = reason.code, reason = %reason.reason, "connection closed");
    if client.details().is_some() {
        let user = client.user();
        node.hub()
            .tracer
            .offer(None, Some(user), || crate::trace::TraceEvent::Disconnect {
                user: user.into(),
                client: client.id.clone(),
                code: reason.code.into(),
                reason: reason.reason.to_string(),
            });
    }
}

async fn read_loop<S: FrameSource>(mut session: Session, mut source: S) {
    let client = session.client().clone();
    let shutdown = session.node().shutdown_token();
    let metrics = session.node().transport_metrics(session.transport());
    // Until the connect succeeds the reader watches the node's shutdown token (boxed, and
    // registered once, not per frame); from then on the hub holds the client and shutdown
    // closes it there like any other close, so an idle connection's task keeps no waiter.
    let mut until_connected = Some(Box::pin(shutdown.clone().cancelled_owned()));
    // The session's timer work (subscription expiry, connection refresh) runs when the writer,
    // which keeps the connection's one timer, says it is due.
    let mut session_at = None;
    let mut peer_gone = false;
    loop {
        if until_connected.is_some() && client.is_connected() {
            until_connected = None;
            // Either shutdown's walk over the hub found this client, or it started after the
            // connect put the client in the hub, which this sees.
            if shutdown.is_cancelled() {
                client.close(Disconnect::SHUTDOWN);
                break;
            }
        }
        let next = session.next_deadline();
        if next != session_at {
            session_at = next;
            client.set_session_at(next);
        }
        let frame = tokio::select! {
            biased;
            () = cancelled_opt(&mut until_connected) => {
                client.close(Disconnect::SHUTDOWN);
                break;
            }
            () = client.reader_notified() => {
                if client.is_closing() {
                    break;
                }
                if client.take_session_due() {
                    session_at = None;
                    // Boxed, like every rarely running step below: the connection's task then
                    // holds only its small idle state, not the largest command future.
                    Box::pin(session.on_timer()).await;
                }
                if let Err(d) = Box::pin(session.handle_control()).await {
                    client.close(d);
                    break;
                }
                continue;
            }
            f = source.next_frame() => f,
        };
        match frame {
            None => {
                peer_gone = true;
                client.close(Disconnect::CONNECTION_CLOSED);
                break;
            }
            Some(Err(d)) => {
                tracing::info!(client = %client.id(), code = d.code, "transport error");
                client.close(d);
                break;
            }
            Some(Ok(data)) => {
                metrics.messages_received.increment(1);
                metrics.bytes_received.increment(data.len() as u64);
                if let Err(d) = Box::pin(session.handle_frame(&data)).await {
                    client.close(d);
                    break;
                }
                if client.is_closing() {
                    break;
                }
            }
        }
    }
    drop(until_connected);
    Box::pin(session.close()).await;
    if !peer_gone {
        // Boxed: it runs once, at the end, and would otherwise size every idle connection.
        Box::pin(drain_input(&mut source)).await;
    }
}

/// Resolves when the token is cancelled; never when there is no token to watch.
async fn cancelled_opt(f: &mut Option<std::pin::Pin<Box<WaitForCancellationFutureOwned>>>) {
    match f {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// After the server closed a connection (its close frame goes out from the writer): reads and
/// drops what the client still sends until it answers, leaves or the time is up, so the client
/// reads the close frame rather than a reset.
async fn drain_input<S: FrameSource>(source: &mut S) {
    let deadline = Instant::now() + CLOSE_DRAIN;
    let mut errors = 0;
    while errors < CLOSE_DRAIN_ERRORS {
        match tokio::time::timeout_at(deadline, source.next_frame()).await {
            Ok(Some(Ok(_))) => errors = 0,
            Ok(None) | Err(_) => break,
            Ok(Some(Err(_))) => {
                errors += 1;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Timers of one connection, all driven by the writer.
struct Timers {
    stale_at: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
}

/// Joins queued messages into frames: up to [`MAX_MESSAGES_PER_FRAME`] messages and
/// [`MAX_FRAME_BYTES`] bytes per frame, separated by the encoding's separator. A message that
/// ends up alone in its frame is passed on as it is, without a copy.
struct FrameBuilder<'a> {
    sep: &'a [u8],
    /// Messages per frame at most.
    max: usize,
    /// The frame's only message so far.
    single: Option<Bytes>,
    /// The joined frame once it holds two or more messages.
    joined: BytesMut,
    count: usize,
}

impl<'a> FrameBuilder<'a> {
    fn new(sep: &'a [u8], max: usize) -> Self {
        Self {
            sep,
            max,
            single: None,
            joined: BytesMut::new(),
            count: 0,
        }
    }

    fn len(&self) -> usize {
        match &self.single {
            Some(b) => b.len(),
            None => self.joined.len(),
        }
    }

    /// Adds a message; returns the finished frame when the message did not fit into it (the
    /// message then starts the next frame).
    fn push(&mut self, msg: Bytes) -> Option<Bytes> {
        let full = self.count > 0
            && (self.count >= self.max
                || self.len() + self.sep.len() + msg.len() > MAX_FRAME_BYTES);
        let done = if full { self.finish() } else { None };
        match self.count {
            0 => self.single = Some(msg),
            _ => {
                if let Some(first) = self.single.take() {
                    self.joined.extend_from_slice(&first);
                }
                self.joined.extend_from_slice(self.sep);
                self.joined.extend_from_slice(&msg);
            }
        }
        self.count += 1;
        done
    }

    /// The frame being built, if any.
    fn finish(&mut self) -> Option<Bytes> {
        self.count = 0;
        match self.single.take() {
            Some(b) => Some(b),
            None if self.joined.is_empty() => None,
            None => Some(self.joined.split().freeze()),
        }
    }
}

/// Writes the drained messages as frames and flushes them; returns the bytes written.
async fn write_batch<K: FrameSink>(
    sink: &mut K,
    messages: impl Iterator<Item = Bytes>,
    sep: &[u8],
    binary: bool,
    max_messages: usize,
) -> std::io::Result<u64> {
    let mut frames = FrameBuilder::new(sep, max_messages);
    let mut bytes = 0u64;
    for msg in messages {
        if let Some(frame) = frames.push(msg) {
            bytes += frame.len() as u64;
            sink.send_frame(frame, binary).await?;
        }
    }
    if let Some(frame) = frames.finish() {
        bytes += frame.len() as u64;
        sink.send_frame(frame, binary).await?;
    }
    sink.flush().await?;
    Ok(bytes)
}

async fn write_loop<K: FrameSink>(
    node: Node,
    client: Arc<ClientHandle>,
    mut sink: K,
    transport: &'static str,
) {
    let cfg = &node.config().client;
    let metrics = node.transport_metrics(transport);
    // A unidirectional client cannot answer pings: its pings only keep proxies and the
    // client's own liveness check happy. With no pong, nothing it received is confirmed to the
    // delivery cursors (a duplicate on the user's next positionless connect, never a loss).
    let uni = client.is_unidirectional();
    let mut timers = Timers {
        stale_at: Instant::now() + cfg.stale_close_delay,
        next_ping: None,
        pong_deadline: None,
    };
    let enc = client.encoding();
    let (sep, binary) = (enc.separator(), enc.is_binary());
    // One timer for the connection's life, moved only when the next deadline changes: a timer
    // made and dropped on every wake-up would cost two timer-wheel updates per delivery.
    let never = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let sleep = tokio::time::sleep_until(never);
    tokio::pin!(sleep);
    let mut timers_due = true;
    loop {
        let mut drained = client.drain();
        if !drained.is_empty() {
            let n = drained.len() as u64;
            // Boxed: the sink's write futures (a socket write with its timeout) would otherwise
            // size every idle connection's task; one allocation per batch, not per frame.
            let max = if client.single_message_frames() {
                1
            } else if cfg.max_messages_in_frame == 0 {
                usize::MAX
            } else {
                cfg.max_messages_in_frame
            };
            let written = Box::pin(write_batch(
                &mut sink,
                drained.take_messages(),
                sep,
                binary,
                max,
            ));
            let Ok(bytes) = written.await else {
                client.close(Disconnect::WRITE_ERROR);
                return;
            };
            node.stats().messages_sent.fetch_add(n, Ordering::Relaxed);
            client.sent.fetch_add(n, Ordering::Relaxed);
            metrics.messages_sent.increment(n);
            metrics.bytes_sent.increment(bytes);
        }
        if let Some(d) = drained.close {
            if d.code == Disconnect::CONNECTION_CLOSED.code {
                // The peer closed: the transport may owe it an answer (a WebSocket close reply).
                let _ = Box::pin(sink.flush()).await;
            } else if d.code != Disconnect::WRITE_ERROR.code {
                let _ = Box::pin(sink.close(d.code, &d.reason)).await;
            }
            return;
        }
        // The timers are looked at when one fired or something they depend on changed, not
        // on every delivery. A writer that goes from one write straight to the next (a client
        // reading about as fast as messages come) does not reach the select below, so the
        // fired timer is also looked for here.
        timers_due |= sleep.is_elapsed();
        if timers_due {
            let now = Instant::now();
            if !client.is_connected() {
                if now >= timers.stale_at {
                    tracing::info!(client = %client.id(), "no connect within the stale delay");
                    client.close(Disconnect::STALE);
                    continue;
                }
            } else {
                if timers.next_ping.is_none() {
                    let interval = cfg.ping_interval;
                    let first = rand::rng()
                        .random_range(interval / 2..interval.max(Duration::from_millis(2)));
                    timers.next_ping = Some(now + first);
                }
                // The reader runs the session's timer work and sets the next instant.
                client.fire_session_timer(now);
                if let Some(deadline) = timers.pong_deadline {
                    if !client.ping_outstanding() {
                        timers.pong_deadline = None;
                    } else if now >= deadline {
                        tracing::info!(client = %client.id(), user = client.user(), "no pong");
                        client.close(Disconnect::NO_PONG);
                        continue;
                    }
                }
                // A cursor delivery waits for confirmation: ask for a pong soon, not at the
                // next regular ping (a pong proves every frame before its ping was read).
                let confirm = cfg.delivery_cursor_confirm_delay;
                if !confirm.is_zero()
                    && !uni
                    && !cfg.pong_timeout.is_zero()
                    && client.cursor_pending()
                    && !client.ping_outstanding()
                {
                    let soon = now + confirm;
                    if timers.next_ping.is_none_or(|p| p > soon) {
                        timers.next_ping = Some(soon);
                    }
                }
                if timers.next_ping.is_some_and(|p| now >= p) {
                    if !uni {
                        // Before the ping is queued: the snapshot claims only what precedes it.
                        client.snapshot_cursors();
                        client.ping_sent();
                        if !cfg.pong_timeout.is_zero() {
                            timers.pong_deadline = Some(now + cfg.pong_timeout);
                        }
                    }
                    client.send(Bytes::from_static(client.encoding().ping()));
                    timers.next_ping = Some(now + cfg.ping_interval);
                    continue;
                }
                if let Some(exp) = client.expires_at()
                    && now >= exp + cfg.expired_close_delay
                {
                    tracing::info!(client = %client.id(), user = client.user(), "connection expired");
                    client.close(Disconnect::EXPIRED);
                    continue;
                }
            }
            let deadline = if client.is_connected() {
                [
                    timers.next_ping,
                    timers.pong_deadline,
                    client.expires_at().map(|e| e + cfg.expired_close_delay),
                    client.session_at(),
                ]
                .into_iter()
                .flatten()
                .min()
            } else {
                Some(timers.stale_at)
            };
            let deadline = deadline.unwrap_or(never);
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
        }
        timers_due = tokio::select! {
            biased;
            _ = client.writer_notified() => {
                if !cfg.write_delay.is_zero() && !client.is_closing() {
                    // Let more messages join this write (boxed: off by default, it would
                    // otherwise size every connection's task).
                    Box::pin(tokio::time::sleep(cfg.write_delay)).await;
                }
                client.take_timers_changed()
            }
            () = &mut sleep => true,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(msgs: &[&'static [u8]]) -> Vec<Bytes> {
        frames_of(msgs, MAX_MESSAGES_PER_FRAME)
    }

    fn frames_of(msgs: &[&'static [u8]], max: usize) -> Vec<Bytes> {
        let mut b = FrameBuilder::new(b"\n", max);
        let mut out: Vec<Bytes> = msgs
            .iter()
            .filter_map(|m| b.push(Bytes::from_static(m)))
            .collect();
        out.extend(b.finish());
        out
    }

    #[test]
    fn single_message_is_passed_without_copy() {
        let msg = Bytes::from_static(b"{\"push\":{}}");
        let mut b = FrameBuilder::new(b"\n", MAX_MESSAGES_PER_FRAME);
        assert!(b.push(msg.clone()).is_none());
        let frame = b.finish().unwrap();
        assert_eq!(frame.as_ptr(), msg.as_ptr(), "same buffer, not a copy");
        assert!(b.finish().is_none(), "nothing left after finish");
    }

    #[test]
    fn messages_are_joined_with_the_separator() {
        assert_eq!(
            frames(&[b"a", b"b", b"c"]),
            vec![Bytes::from_static(b"a\nb\nc")]
        );
        assert!(frames(&[]).is_empty());
    }

    #[test]
    fn single_message_frames_carry_one_message_each() {
        assert_eq!(
            frames_of(&[b"a", b"b", b"c"], 1),
            vec![
                Bytes::from_static(b"a"),
                Bytes::from_static(b"b"),
                Bytes::from_static(b"c")
            ]
        );
    }

    #[test]
    fn frames_are_split_at_the_message_limit() {
        let msgs = vec![&b"x"[..]; MAX_MESSAGES_PER_FRAME + 1];
        let out = frames(&msgs);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), MAX_MESSAGES_PER_FRAME * 2 - 1);
        assert_eq!(out[1], Bytes::from_static(b"x"));
    }

    #[test]
    fn frames_are_split_at_the_byte_limit() {
        static BIG: [u8; MAX_FRAME_BYTES / 2] = [b'y'; MAX_FRAME_BYTES / 2];
        let out = frames(&[&BIG, &BIG, b"z"]);
        assert_eq!(out.len(), 2, "two halves plus a separator exceed the limit");
        assert_eq!(out[0].len(), BIG.len());
        assert_eq!(out[1].len(), BIG.len() + 2);
        let big: &'static [u8] = Box::leak(vec![0u8; MAX_FRAME_BYTES * 2].into_boxed_slice());
        let out = frames(&[b"a", big]);
        assert_eq!(out.len(), 2, "a message larger than the limit goes alone");
        assert_eq!(out[1].len(), MAX_FRAME_BYTES * 2);
    }
}
