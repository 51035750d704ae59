//! The WebSocket transport: the upgrade (only when the node is ready and admission allows it) and
//! the adapters that let `holdfast_core::transport::serve_connection` drive a tungstenite stream.

use crate::Transport;
use crate::frame;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use holdfast_core::transport::{
    ConnectionKind, ConnectionMeta, FrameSink, FrameSource, serve_connection,
};
use holdfast_protocol::{Disconnect, Encoding};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Io = TokioIo<hyper::upgrade::Upgraded>;

const JSON_PROTOCOL: &str = "centrifuge-json";
const PROTOBUF_PROTOCOL: &str = "centrifuge-protobuf";

/// A JSON error response for HTTP-level refusals.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
    })
}

/// `GET /connection/websocket`.
pub async fn upgrade(State(app): State<Arc<Transport>>, req: Request) -> Response {
    upgrade_as(app, req, false).await
}

/// `GET /connection/uni_websocket`: unidirectional WebSocket (`uni_websocket.enabled`).
pub async fn upgrade_uni(State(app): State<Arc<Transport>>, req: Request) -> Response {
    upgrade_as(app, req, true).await
}

async fn upgrade_as(app: Arc<Transport>, mut req: Request, uni: bool) -> Response {
    let transport = if uni { "uni_websocket" } else { "websocket" };
    if !app.node.is_ready() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "node is not ready");
    }
    let headers = req.headers();
    // WebSocket over an HTTP/2 stream (RFC 8441): an extended CONNECT with `:protocol`
    // websocket, answered 200; over HTTP/1.1 the Upgrade handshake, answered 101.
    let h2 = req.method() == axum::http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !h2
        && (!header_has_token(headers, header::UPGRADE, "websocket")
            || !header_has_token(headers, header::CONNECTION, "upgrade"))
    {
        return json_error(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket version (need 13)",
        );
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    if key.is_none() && !h2 {
        return json_error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    }
    let remote = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let admitted = match crate::gate::admit(&app, transport, headers, remote) {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let permit = admitted.permit;
    let headers = req.headers();
    let query = req.uri().query().unwrap_or("");
    let wants_protobuf = query
        .split('&')
        .any(|kv| matches!(kv, "format=protobuf" | "cf_protocol=protobuf"));
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(|p| p.trim().to_owned()))
        .filter(|p| !p.is_empty())
        .collect();
    let offers = |p: &str| offered.iter().any(|o| o == p);
    // Unidirectional WebSocket is JSON only.
    let encoding =
        if !uni && (wants_protobuf || (offers(PROTOBUF_PROTOCOL) && !offers(JSON_PROTOCOL))) {
            Encoding::Protobuf
        } else {
            Encoding::Json
        };
    let protocol = match encoding {
        Encoding::Protobuf => offers(PROTOBUF_PROTOCOL).then_some(PROTOBUF_PROTOCOL),
        Encoding::Json => offers(JSON_PROTOCOL).then_some(JSON_PROTOCOL),
    };
    let headers = admitted.headers;
    let ip = admitted.ip;
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return json_error(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    let ws_cfg = &app.config.websocket;
    let read_limit = if uni {
        app.config.uni_websocket.message_size_limit
    } else {
        ws_cfg.message_size_limit
    };
    let read_size = ws_cfg.read_buffer_size;
    let write_buffer = ws_cfg.write_buffer_size;
    let write_timeout = ws_cfg.write_timeout;
    let join = app.config.uni_websocket.join_push_messages;
    let node = app.node.clone();
    app.node.tracker().spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let conn: Shared = Arc::new(parking_lot::Mutex::new(Conn {
            io: TokioIo::new(upgraded),
            out: Out::default(),
            close_sent: false,
            writer_waiting: false,
            pong: None,
            reader_flushing: false,
        }));
        let stream = WsSource {
            conn: conn.clone(),
            decoder: frame::Decoder::new(read_limit),
            buf: BytesMut::new(),
            read_size,
            broken: false,
        };
        let sink = WsSink {
            conn,
            write_timeout,
            write_buffer,
            uni: uni.then_some(UniFraming { join }),
        };
        if uni {
            let meta = ConnectionMeta {
                transport,
                kind: ConnectionKind::Unidirectional {
                    session: crate::http::new_session_id(),
                },
                encoding,
                ip,
                headers,
            };
            let source = UniWsSource {
                inner: stream,
                connected: false,
            };
            serve_connection(node, meta, source, sink).await;
        } else {
            let meta = ConnectionMeta {
                transport,
                kind: ConnectionKind::Bidirectional,
                encoding,
                ip,
                headers,
            };
            serve_connection(node, meta, stream, sink).await;
        }
    });
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    if let Some(key) = key.filter(|_| !h2) {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    let h = resp.headers_mut();
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    resp
}

/// The upgraded connection, shared by the reading and the writing half (both are polled by
/// the connection's one task, so the lock is never contended). It holds no read buffer and,
/// between writes, no write buffer: an idle connection costs the socket and this struct.
struct Conn {
    io: Io,
    out: Out,
    /// A close frame was queued: nothing more is written after it.
    close_sent: bool,
    /// The writer is waiting for the socket to take its bytes, flush them or shut down (the
    /// reader then leaves the socket's write readiness to it: it has one waker per direction).
    writer_waiting: bool,
    /// The answer to the latest ping, not queued yet: a client pinging faster than it reads
    /// gets one pong for the lot (RFC 6455 §5.5.3), not a queue that grows.
    pong: Option<Bytes>,
    /// The reader wrote and its flush did not finish (TLS keeps bytes until flushed).
    reader_flushing: bool,
}

type Shared = Arc<parking_lot::Mutex<Conn>>;

/// Frames queued for the socket: headers inline, payloads shared, not copied.
#[derive(Default)]
struct Out {
    chunks: VecDeque<Chunk>,
    /// Bytes of the first chunk already written.
    offset: usize,
    /// Bytes queued in all.
    bytes: usize,
}

enum Chunk {
    Head(frame::Header),
    Data(Bytes),
}

impl Chunk {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Head(h) => h.as_slice(),
            Chunk::Data(b) => b,
        }
    }
}

/// Slices handed to one vectored write.
const MAX_IOVECS: usize = 64;

impl Out {
    fn push(&mut self, opcode: u8, payload: Bytes) {
        let head = frame::header(opcode, payload.len());
        self.bytes += head.as_slice().len() + payload.len();
        self.chunks.push_back(Chunk::Head(head));
        if !payload.is_empty() {
            self.chunks.push_back(Chunk::Data(payload));
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(first) = self.chunks.front() else {
                return;
            };
            let left = first.as_slice().len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.offset = 0;
            self.chunks.pop_front();
        }
    }

    /// Writes everything queued: several frames per vectored write, or one copy into a single
    /// buffer when the stream cannot take vectors (TLS, an HTTP/2 stream).
    fn poll_write(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.chunks.is_empty() {
            if !io.is_write_vectored() && self.chunks.len() > 1 {
                let mut joined = Vec::with_capacity(self.bytes);
                for (i, c) in self.chunks.iter().enumerate() {
                    let skip = if i == 0 { self.offset } else { 0 };
                    joined.extend_from_slice(&c.as_slice()[skip..]);
                }
                self.chunks.clear();
                self.offset = 0;
                self.chunks.push_back(Chunk::Data(Bytes::from(joined)));
            }
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut k = 0;
                for (i, c) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                    let skip = if i == 0 { self.offset } else { 0 };
                    slices[k] = IoSlice::new(&c.as_slice()[skip..]);
                    k += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        // Nothing kept between writes.
        self.chunks = VecDeque::new();
        Poll::Ready(Ok(()))
    }
}

impl Conn {
    /// Queues a frame unless a close frame went before it.
    fn queue(&mut self, opcode: u8, payload: Bytes) {
        if !self.close_sent {
            self.out.push(opcode, payload);
            if opcode == frame::OP_CLOSE {
                self.close_sent = true;
            }
        }
    }

    /// Moves the pending pong behind what is queued, once the queue is empty (so at most one
    /// pong waits, however many pings arrive while the socket is full).
    fn take_pong(&mut self) {
        if self.out.chunks.is_empty()
            && let Some(p) = self.pong.take()
        {
            self.queue(frame::OP_PONG, p);
        }
    }

    /// From the reader: writes out and flushes what is queued (a pong, a close reply) unless
    /// the writer is waiting to; a socket that cannot take it now wakes the reader later.
    fn write_from_reader(&mut self, cx: &mut Context<'_>) {
        if self.writer_waiting {
            return;
        }
        self.take_pong();
        if self.out.chunks.is_empty() && !self.reader_flushing {
            return;
        }
        let Conn { io, out, .. } = self;
        let r = match out.poll_write(io, cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut *io).poll_flush(cx),
            other => other,
        };
        self.reader_flushing = r.is_pending();
        if let Poll::Ready(Err(e)) = r {
            tracing::debug!(error = %e, "websocket write (control frame) failed");
        }
    }
}

thread_local! {
    /// What one read from a socket lands in: one buffer per worker thread, not per connection.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct WsSource {
    conn: Shared,
    decoder: frame::Decoder,
    /// Bytes read and not yet decoded (empty, with no allocation, while idle).
    buf: BytesMut,
    read_size: usize,
    /// After a protocol violation nothing more is parsed: input is read and dropped.
    broken: bool,
}

impl WsSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Disconnect>>> {
        {
            let mut conn = self.conn.lock();
            conn.write_from_reader(cx);
        }
        loop {
            if !self.broken && (!self.buf.is_empty() || self.decoder.wants_more()) {
                match self.decoder.decode(&mut self.buf) {
                    Ok(Some(event)) => {
                        if self.buf.is_empty() {
                            self.buf = BytesMut::new();
                        }
                        match event {
                            frame::Event::Message { data, .. } => {
                                return Poll::Ready(Some(Ok(data)));
                            }
                            frame::Event::Ping(payload) => {
                                let mut conn = self.conn.lock();
                                if !conn.close_sent {
                                    // A copy: the payload would keep the read buffer alive.
                                    conn.pong = Some(Bytes::copy_from_slice(&payload));
                                }
                                conn.write_from_reader(cx);
                            }
                            frame::Event::Pong => {}
                            frame::Event::Close { code } => {
                                // Answer with the same code (RFC 6455 §5.5.1) unless the server
                                // closed first; the writer flushes it when it sees the close.
                                let mut conn = self.conn.lock();
                                let payload = code
                                    .map(|c| Bytes::copy_from_slice(&c.to_be_bytes()))
                                    .unwrap_or_default();
                                conn.queue(frame::OP_CLOSE, payload);
                                conn.write_from_reader(cx);
                                return Poll::Ready(None);
                            }
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Poll::Ready(Some(Err(match e {
                            frame::DecodeError::TooBig { size, max } => {
                                tracing::info!(size, max, "incoming message too big");
                                Disconnect::MESSAGE_TOO_BIG
                            }
                            // The message was consumed whole: the frames after it (the
                            // client's close) are still read.
                            frame::DecodeError::Utf8 => Disconnect::BAD_REQUEST,
                            frame::DecodeError::Protocol(what) => {
                                self.broken = true;
                                self.buf = BytesMut::new();
                                tracing::info!(
                                    error = what,
                                    "WebSocket protocol violation: closing with 1002"
                                );
                                Disconnect::PROTOCOL_ERROR
                            }
                        })));
                    }
                }
            }
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // Nothing pending (a skipped payload ended, say): hold no buffer while idle.
                self.buf = BytesMut::new();
            }
            let read = {
                let mut conn = self.conn.lock();
                let io = &mut conn.io;
                SCRATCH.with_borrow_mut(|scratch| {
                    if scratch.len() < self.read_size {
                        scratch.resize(self.read_size, 0);
                    }
                    let mut rb = ReadBuf::new(&mut scratch[..self.read_size]);
                    match Pin::new(io).poll_read(cx, &mut rb) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            if !self.broken {
                                self.buf.extend_from_slice(rb.filled());
                            }
                            Poll::Ready(Ok(n))
                        }
                    }
                })
            };
            match ready!(read) {
                // The peer ended the connection (with or without a closing handshake).
                Ok(0) => return Poll::Ready(None),
                Ok(_) if self.broken => return Poll::Ready(Some(Ok(Bytes::new()))),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "websocket read error");
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl FrameSource for WsSource {
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// A unidirectional WebSocket: the first message is the connect request (a JSON object, the
/// `connect` command's body); later messages are read and dropped.
struct UniWsSource {
    inner: WsSource,
    connected: bool,
}

impl FrameSource for UniWsSource {
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>> {
        loop {
            let frame = match self.inner.next_frame().await? {
                Ok(f) => f,
                Err(d) => return Some(Err(d)),
            };
            if self.connected {
                continue;
            }
            self.connected = true;
            return Some(crate::http::uni_connect_frame(&frame).map_err(|e| {
                tracing::info!(error = %e, "uni_websocket: bad connect request");
                Disconnect::BAD_REQUEST
            }));
        }
    }
}

/// How a unidirectional WebSocket writes: bare pushes, one per message unless
/// `uni_websocket.join_push_messages` (then newline-joined, as the frame came).
#[derive(Debug, Clone, Copy)]
struct UniFraming {
    join: bool,
}

struct WsSink {
    conn: Shared,
    write_timeout: Duration,
    /// Bytes queued after which a frame is written out before the batch's flush.
    write_buffer: usize,
    /// Unidirectional framing, or None for the bidirectional protocol.
    uni: Option<UniFraming>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Runs a write, failing it when it has not finished within `limit`. Most writes finish on
/// their first poll: the timer is only made for one that has to wait for the socket.
async fn within<F>(limit: Duration, write: F) -> std::io::Result<()>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    let mut write = std::pin::pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(r) => r,
        Poll::Pending => tokio::time::timeout(limit, write)
            .await
            .map_err(|_| io_err("write timeout"))?,
    }
}

impl WsSink {
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut conn = self.conn.lock();
        conn.take_pong();
        let Conn { io, out, .. } = &mut *conn;
        let r = match out.poll_write(io, cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut *io).poll_flush(cx),
            other => other,
        };
        // Waiting in the write or in the flush alike: the socket's write waker is ours.
        conn.writer_waiting = r.is_pending();
        if r.is_ready() {
            conn.reader_flushing = false;
        }
        r
    }

    fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut conn = self.conn.lock();
        let r = Pin::new(&mut conn.io).poll_shutdown(cx);
        conn.writer_waiting = r.is_pending();
        r
    }

    async fn queue(&mut self, opcode: u8, payload: Bytes) -> std::io::Result<()> {
        let full = {
            let mut conn = self.conn.lock();
            conn.queue(opcode, payload);
            conn.out.bytes > self.write_buffer
        };
        if full {
            return self.flush().await;
        }
        Ok(())
    }

    async fn send_text(&mut self, text: Bytes) -> std::io::Result<()> {
        if std::str::from_utf8(&text).is_err() {
            return Err(io_err("text frame is not UTF-8"));
        }
        self.queue(frame::OP_TEXT, text).await
    }
}

impl FrameSink for WsSink {
    async fn send_frame(&mut self, frame: Bytes, binary: bool) -> std::io::Result<()> {
        if let Some(uni) = self.uni {
            let messages = crate::http::json_messages(&frame);
            if uni.join {
                let joined = crate::http::join_uni(messages);
                return self.send_text(joined).await;
            }
            for m in messages {
                self.send_text(holdfast_protocol::json::unwrap_push(&m))
                    .await?;
            }
            return Ok(());
        }
        if binary {
            self.queue(frame::OP_BINARY, frame).await
        } else {
            self.send_text(frame).await
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        within(
            self.write_timeout,
            std::future::poll_fn(|cx| self.poll_flush(cx)),
        )
        .await
    }

    async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        if self.uni.is_some() {
            // A unidirectional client reads the disconnect as a message, then the close frame.
            let push =
                crate::http::disconnect_push(holdfast_protocol::Encoding::Json, true, code, reason);
            let _ = self.send_text(push).await;
        }
        self.conn
            .lock()
            .queue(frame::OP_CLOSE, frame::close_payload(code, reason));
        let send = async {
            std::future::poll_fn(|cx| self.poll_flush(cx)).await?;
            // Then the end of the stream (the reader goes on reading until the client answers).
            std::future::poll_fn(|cx| self.poll_shutdown(cx)).await
        };
        match tokio::time::timeout(self.write_timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(io_err("close timeout")),
        }
    }
}
