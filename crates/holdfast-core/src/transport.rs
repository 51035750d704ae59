//! Runs one connection over any frame transport: a reader that feeds the session and a writer
//! that drains the outbox, batching many messages per frame and many frames per flush, and that
//! owns the connection's timers (stale, ping/pong, expiry).

use crate::client::ClientHandle;
use crate::node::Node;
use crate::session::Session;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use holdfast_protocol::{Disconnect, Encoding};
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Messages joined into one frame at most.
const MAX_MESSAGES_PER_FRAME: usize = 64;
/// Bytes joined into one frame at most (a single larger message still goes alone).
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Incoming side of a transport.
#[async_trait]
pub trait FrameSource: Send {
    /// The next data frame; `None` when the peer closed, `Err` for a transport-level violation
    /// (e.g. 1009 message too big). Must be cancel-safe.
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>>;
}

/// Outgoing side of a transport.
#[async_trait]
pub trait FrameSink: Send {
    /// Queues one frame (text, or binary for protobuf) without flushing.
    async fn send_frame(&mut self, frame: Bytes, binary: bool) -> std::io::Result<()>;
    /// Writes out everything queued.
    async fn flush(&mut self) -> std::io::Result<()>;
    /// Sends a close frame and shuts the stream down.
    async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()>;
}

/// What the server knows about a connection before it speaks.
#[derive(Debug, Clone)]
pub struct ConnectionMeta {
    /// Transport name (`websocket`).
    pub transport: &'static str,
    /// Frame encoding.
    pub encoding: Encoding,
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
    let client = node.new_client(meta.encoding);
    let session = Session::new(node.clone(), client.clone(), meta.transport, meta.headers);
    metrics::gauge!("holdfast_connections_active").increment(1.0);
    tokio::join!(
        read_loop(session, source),
        write_loop(node.clone(), client.clone(), sink)
    );
    metrics::gauge!("holdfast_connections_active").decrement(1.0);
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
}

async fn read_loop<S: FrameSource>(mut session: Session, mut source: S) {
    let client = session.client().clone();
    let shutdown = session.node().shutdown_token();
    loop {
        let deadline = session.next_deadline();
        let frame = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                client.close(Disconnect::SHUTDOWN);
                break;
            }
            _ = client.reader_notified() => {
                if client.is_closing() {
                    break;
                }
                // Boxed, like every rarely running step below: the connection's task then holds
                // only its small idle state, not the largest command future.
                if let Err(d) = Box::pin(session.handle_control()).await {
                    client.close(d);
                    break;
                }
                continue;
            }
            _ = sleep_until_opt(deadline) => {
                Box::pin(session.on_timer()).await;
                continue;
            }
            f = source.next_frame() => f,
        };
        match frame {
            None => {
                client.close(Disconnect::CONNECTION_CLOSED);
                break;
            }
            Some(Err(d)) => {
                tracing::info!(client = %client.id(), code = d.code, "transport error");
                client.close(d);
                break;
            }
            Some(Ok(data)) => {
                metrics::counter!("holdfast_transport_messages_received_total").increment(1);
                metrics::counter!("holdfast_transport_bytes_received_total")
                    .increment(data.len() as u64);
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
    Box::pin(session.close()).await;
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Timers of one connection, all driven by the writer.
struct Timers {
    stale_at: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
}

async fn write_loop<K: FrameSink>(node: Node, client: Arc<ClientHandle>, mut sink: K) {
    let cfg = &node.config().client;
    let mut timers = Timers {
        stale_at: Instant::now() + cfg.stale_close_delay,
        next_ping: None,
        pong_deadline: None,
    };
    let mut frame = BytesMut::new();
    let enc = client.encoding();
    let (sep, binary) = (enc.separator(), enc.is_binary());
    loop {
        let drained = client.drain();
        if !drained.messages.is_empty() {
            let n = drained.messages.len() as u64;
            let mut bytes = 0u64;
            let mut in_frame = 0usize;
            let mut failed = false;
            for msg in drained.messages {
                if in_frame > 0
                    && (in_frame >= MAX_MESSAGES_PER_FRAME
                        || frame.len() + msg.len() > MAX_FRAME_BYTES)
                {
                    bytes += frame.len() as u64;
                    if sink
                        .send_frame(frame.split().freeze(), binary)
                        .await
                        .is_err()
                    {
                        failed = true;
                        break;
                    }
                    in_frame = 0;
                }
                if in_frame > 0 {
                    frame.extend_from_slice(sep);
                }
                frame.extend_from_slice(&msg);
                in_frame += 1;
            }
            if !failed && in_frame > 0 {
                bytes += frame.len() as u64;
                failed = sink
                    .send_frame(frame.split().freeze(), binary)
                    .await
                    .is_err();
            }
            frame.clear();
            if failed || sink.flush().await.is_err() {
                client.close(Disconnect::WRITE_ERROR);
                return;
            }
            node.stats().messages_sent.fetch_add(n, Ordering::Relaxed);
            client.sent.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("holdfast_transport_messages_sent_total").increment(n);
            metrics::counter!("holdfast_transport_bytes_sent_total").increment(bytes);
            // Keep a big frame buffer only while it is in use.
            if frame.capacity() > MAX_FRAME_BYTES * 2 {
                frame = BytesMut::new();
            }
        }
        if let Some(d) = drained.close {
            if d.code != Disconnect::CONNECTION_CLOSED.code
                && d.code != Disconnect::WRITE_ERROR.code
            {
                let _ = sink.close(d.code, &d.reason).await;
            }
            return;
        }
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
                let first =
                    rand::rng().random_range(interval / 2..interval.max(Duration::from_millis(2)));
                timers.next_ping = Some(now + first);
            }
            if let Some(deadline) = timers.pong_deadline {
                if !client.ping_outstanding() {
                    timers.pong_deadline = None;
                } else if now >= deadline {
                    tracing::info!(client = %client.id(), user = client.user(), "no pong");
                    client.close(Disconnect::NO_PONG);
                    continue;
                }
            }
            if timers.next_ping.is_some_and(|p| now >= p) {
                client.snapshot_cursors();
                client.ping_sent();
                client.send(Bytes::from_static(client.encoding().ping()));
                if !cfg.pong_timeout.is_zero() {
                    timers.pong_deadline = Some(now + cfg.pong_timeout);
                }
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
            ]
            .into_iter()
            .flatten()
            .min()
        } else {
            Some(timers.stale_at)
        };
        tokio::select! {
            _ = client.writer_notified() => {}
            _ = sleep_until_opt(deadline) => {}
        }
    }
}
