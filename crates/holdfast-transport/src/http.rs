//! Transports over plain HTTP, for clients that cannot use WebSocket:
//!
//! - **Bidirectional emulation**, the `centrifuge` client's fallback: HTTP-streaming
//!   (`POST /connection/http_stream`, the connect command in the body, replies as a streamed
//!   response: JSON lines or varint-delimited protobuf) and SSE (`GET /connection/sse?cf_connect=…`
//!   or POST, replies as `data:` events); the client's later frames arrive through
//!   `POST /emulation` (`{session, node, data}`), forwarded to the owning node when another node
//!   gets them.
//! - **Unidirectional** `uni_sse` and `uni_http_stream`: the connect request (a JSON object) in
//!   `cf_connect` or the body; server-side subscriptions only; bare pushes.
//!
//! Every one runs the same session as WebSocket (`serve_connection`): bounded outbox with the
//! slow-client disconnect, pings, expiry, limits, recovery, delivery cursors, shutdown with a
//! `disconnect` push. Writes go into a small bounded channel that the response body reads; a
//! write that does not fit within the write timeout closes the connection (the client is slow),
//! and a response body dropped by the server (the client went away) ends the session.

use crate::Transport;
use crate::gate::{admit, origin_ok};
use crate::websocket::json_error;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use holdfast_core::node::EmulationOutcome;
use holdfast_core::transport::{
    ConnectionKind, ConnectionMeta, FrameSink, FrameSource, serve_connection,
};
use holdfast_protocol::{Disconnect, Encoding, Push};
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// `http_stream.*`, `sse.*`, `uni_sse.*`, `uni_http_stream.*`: one HTTP transport.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HttpTransportConfig {
    /// Serve the endpoint (off by default, as on Centrifugo).
    pub enabled: bool,
    /// Largest connect request body (POST) in bytes; bigger gets HTTP 413.
    pub max_request_body_size: usize,
}

impl Default for HttpTransportConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_request_body_size: 65536,
        }
    }
}

/// `emulation.*`: the `/emulation` endpoint (served when `http_stream` or `sse` is on).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EmulationConfig {
    /// Largest `/emulation` request body in bytes; bigger gets HTTP 413.
    pub max_request_body_size: usize,
}

impl Default for EmulationConfig {
    fn default() -> Self {
        Self {
            max_request_body_size: 65536,
        }
    }
}

/// Response chunks queued between the connection's writer and the response body: the writer
/// waits (up to the write timeout) when the client reads slower than this.
const BODY_CHUNKS: usize = 4;
/// Frames an emulated session may have waiting (further `/emulation` requests wait up to 1 s,
/// then get 429).
const INBOX_FRAMES: usize = 16;
/// How long reading a request body may take.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `Access-Control-Max-Age` of preflight answers, seconds.
const PREFLIGHT_MAX_AGE: &str = "300";

/// A new session id for an emulated or unidirectional connection.
pub(crate) fn new_session_id() -> Arc<str> {
    uuid::Uuid::new_v4().to_string().into()
}

/// The messages of a JSON frame (joined by `\n`; JSON messages never hold a raw newline).
pub(crate) fn json_messages(frame: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut start = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let rest = &frame[start..];
        let m = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let m = frame.slice(start..start + i);
                start += i + 1;
                m
            }
            None => {
                done = true;
                frame.slice(start..)
            }
        };
        Some(m)
    })
    .filter(|m| !m.is_empty())
}

/// Messages of a JSON frame as bare pushes joined by `\n`.
pub(crate) fn join_uni(messages: impl Iterator<Item = Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    for m in messages {
        if !out.is_empty() {
            out.extend_from_slice(b"\n");
        }
        out.extend_from_slice(&holdfast_protocol::json::unwrap_push(&m));
    }
    out.freeze()
}

/// The `disconnect` push a streaming client reads before its stream ends (bare on
/// unidirectional transports).
pub(crate) fn disconnect_push(enc: Encoding, uni: bool, code: u16, reason: &str) -> Bytes {
    let mut out = Vec::new();
    enc.encode_push(&mut out, &Push::Disconnect { code, reason });
    let out = Bytes::from(out);
    if uni {
        holdfast_protocol::json::unwrap_push(&out)
    } else {
        out
    }
}

/// The `connect` command of a unidirectional connection from its connect request (a JSON
/// object, or nothing). Re-encoded compactly, so the request cannot carry further commands.
pub(crate) fn uni_connect_frame(request: &[u8]) -> Result<Bytes, String> {
    let req: serde_json::Value = if request.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_slice(request).map_err(|e| format!("connect request: {e}"))?
    };
    if !req.is_object() {
        return Err("connect request must be a JSON object".into());
    }
    let mut frame = b"{\"id\":1,\"connect\":".to_vec();
    serde_json::to_writer(&mut frame, &req).map_err(|e| e.to_string())?;
    frame.push(b'}');
    Ok(frame.into())
}

/// How a streamed response carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// JSON lines, or varint-delimited protobuf.
    Stream,
    /// `data: <message>\n\n` events.
    Sse,
}

/// The response body: reads the chunks the writer queues. Dropping it (the response ended or
/// the client went away) tells the session through `_gone`.
struct BodyStream {
    rx: mpsc::Receiver<Bytes>,
    _gone: oneshot::Sender<()>,
}

impl futures_util::Stream for BodyStream {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// Frames into the session: the first (the connect command), then an emulated session's
/// `/emulation` frames; `None` once the response is gone.
struct StreamSource {
    first: Option<Bytes>,
    inbox: Option<mpsc::Receiver<Bytes>>,
    gone: oneshot::Receiver<()>,
    gone_seen: bool,
}

impl FrameSource for StreamSource {
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>> {
        if let Some(f) = self.first.take() {
            return Some(Ok(f));
        }
        if self.gone_seen {
            return None;
        }
        let frame = async {
            match &mut self.inbox {
                Some(rx) => match rx.recv().await {
                    Some(f) => f,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut self.gone => {
                self.gone_seen = true;
                None
            }
            f = frame => Some(Ok(f)),
        }
    }
}

/// Messages out, formatted for the response, in chunks of one batch.
struct StreamSink {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    format: Format,
    encoding: Encoding,
    uni: bool,
    write_timeout: Duration,
}

impl StreamSink {
    fn append(&mut self, frame: &Bytes) {
        if self.encoding == Encoding::Protobuf {
            // Varint-delimited messages, as the frame already holds them.
            self.buf.extend_from_slice(frame);
            return;
        }
        for m in json_messages(frame) {
            let m = if self.uni {
                holdfast_protocol::json::unwrap_push(&m)
            } else {
                m
            };
            match self.format {
                Format::Stream => {
                    self.buf.extend_from_slice(&m);
                    self.buf.extend_from_slice(b"\n");
                }
                Format::Sse => {
                    self.buf.extend_from_slice(b"data: ");
                    self.buf.extend_from_slice(&m);
                    self.buf.extend_from_slice(b"\n\n");
                }
            }
        }
    }
}

impl FrameSink for StreamSink {
    async fn send_frame(&mut self, frame: Bytes, _binary: bool) -> std::io::Result<()> {
        self.append(&frame);
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        match tokio::time::timeout(self.write_timeout, self.tx.send(chunk)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::other("response closed")),
            Err(_) => Err(std::io::Error::other("write timeout")),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        let push = disconnect_push(self.encoding, self.uni, code, reason);
        self.append(&push);
        self.flush().await
        // The body ends when the sink (the last sender) is dropped.
    }
}

/// CORS headers for a request from an allowed browser origin.
fn cors(app: &Transport, req: &HeaderMap, resp: &mut HeaderMap) {
    let (origin, ok) = origin_ok(app, req);
    if let (Some(origin), true) = (origin, ok)
        && let Ok(v) = HeaderValue::from_str(&origin)
    {
        resp.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        resp.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        resp.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Answers a CORS preflight: allowed origins get the methods, the headers they ask for and a
/// max-age; others 403.
fn preflight(app: &Transport, req: &HeaderMap, methods: &'static str) -> Response {
    let (origin, ok) = origin_ok(app, req);
    if !ok {
        tracing::info!(
            origin = origin.as_deref().unwrap_or(""),
            "CORS preflight refused: origin not allowed (client.allowed_origins)"
        );
        return json_error(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    cors(app, req, h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    if let Some(asked) = req
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| v.len() <= 1024 && v.to_str().is_ok())
    {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE),
    );
    resp
}

/// Reads a request body of at most `limit` bytes (413 beyond, 408 when too slow).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, Response> {
    let too_big = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body larger than {limit} bytes"),
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit as u64)
    {
        return Err(too_big());
    }
    let read = async {
        let mut out = BytesMut::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                json_error(StatusCode::BAD_REQUEST, "request body could not be read")
            })?;
            if out.len() + chunk.len() > limit {
                return Err(too_big());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
    }
}

fn remote(req: &Request) -> Option<std::net::SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0)
}

/// The `cf_connect` query parameter, URL-decoded.
fn cf_connect(req: &Request) -> Option<String> {
    #[derive(Deserialize)]
    struct Q {
        cf_connect: Option<String>,
    }
    axum::extract::Query::<Q>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.cf_connect)
}

/// What a streaming endpoint serves.
struct Stream {
    transport: &'static str,
    format: Format,
    uni: bool,
}

/// Starts a streamed connection with its first frame and returns the response.
fn start(
    app: &Arc<Transport>,
    req_headers: &HeaderMap,
    admitted: crate::gate::Admitted,
    what: Stream,
    encoding: Encoding,
    first: Bytes,
) -> Response {
    let (tx, rx) = mpsc::channel(BODY_CHUNKS);
    let (gone_tx, gone_rx) = oneshot::channel();
    let session = new_session_id();
    let (kind, inbox, registration) = if what.uni {
        (ConnectionKind::Unidirectional { session }, None, None)
    } else {
        let (in_tx, in_rx) = mpsc::channel(INBOX_FRAMES);
        let reg = app.node.register_emulation(session.clone(), in_tx);
        (
            ConnectionKind::Emulation { session },
            Some(in_rx),
            Some(reg),
        )
    };
    if what.format == Format::Sse {
        // As Centrifugo: a first line makes proxies and browsers treat the stream as open.
        let _ = tx.try_send(Bytes::from_static(b"\r\n"));
    }
    let meta = ConnectionMeta {
        transport: what.transport,
        kind,
        encoding,
        ip: admitted.ip,
        headers: admitted.headers,
    };
    let source = StreamSource {
        first: Some(first),
        inbox,
        gone: gone_rx,
        gone_seen: false,
    };
    let sink = StreamSink {
        tx,
        buf: BytesMut::new(),
        format: what.format,
        encoding,
        uni: what.uni,
        write_timeout: app.config.websocket.write_timeout,
    };
    let node = app.node.clone();
    let permit = admitted.permit;
    app.node.tracker().spawn(async move {
        let _permit = permit;
        let _registration = registration;
        serve_connection(node, meta, source, sink).await;
    });
    let mut resp = Response::new(Body::from_stream(BodyStream { rx, _gone: gone_tx }));
    let h = resp.headers_mut();
    let content_type = match (what.format, encoding) {
        (Format::Sse, _) => "text/event-stream; charset=utf-8",
        (Format::Stream, Encoding::Protobuf) => "application/octet-stream",
        (Format::Stream, Encoding::Json) => "application/x-ndjson",
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate, max-age=0"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("0"));
    // nginx passes the stream through as it comes instead of buffering it.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(app, req_headers, h);
    resp
}

/// `POST /connection/http_stream` (`OPTIONS`: CORS preflight).
pub async fn http_stream(State(app): State<Arc<Transport>>, req: Request) -> Response {
    if req.method() == Method::OPTIONS {
        return preflight(&app, req.headers(), "POST, OPTIONS");
    }
    let transport = "http_stream";
    let encoding = if req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/octet-stream"))
    {
        Encoding::Protobuf
    } else {
        Encoding::Json
    };
    let admitted = match admit(&app, transport, req.headers(), remote(&req)) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let (parts, body) = req.into_parts();
    let first = match read_body(
        body,
        &parts.headers,
        app.config.http_stream.max_request_body_size,
    )
    .await
    {
        Ok(b) if b.is_empty() => {
            return json_error(StatusCode::BAD_REQUEST, "no connect command in the body");
        }
        Ok(b) => b,
        Err(r) => return r,
    };
    let what = Stream {
        transport,
        format: Format::Stream,
        uni: false,
    };
    start(&app, &parts.headers, admitted, what, encoding, first)
}

/// `GET /connection/sse?cf_connect=…` or `POST /connection/sse` (JSON only).
pub async fn sse(State(app): State<Arc<Transport>>, req: Request) -> Response {
    if req.method() == Method::OPTIONS {
        return preflight(&app, req.headers(), "GET, POST, OPTIONS");
    }
    let transport = "sse";
    let admitted = match admit(&app, transport, req.headers(), remote(&req)) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let from_query = cf_connect(&req);
    let (parts, body) = req.into_parts();
    let first = if parts.method == Method::GET {
        Bytes::from(from_query.unwrap_or_default())
    } else {
        match read_body(body, &parts.headers, app.config.sse.max_request_body_size).await {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    if first.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "no connect command (cf_connect or the body)",
        );
    }
    let what = Stream {
        transport,
        format: Format::Sse,
        uni: false,
    };
    start(&app, &parts.headers, admitted, what, Encoding::Json, first)
}

/// `GET /connection/uni_sse?cf_connect=…` or `POST /connection/uni_sse`.
pub async fn uni_sse(State(app): State<Arc<Transport>>, req: Request) -> Response {
    uni(app, req, "uni_sse", Format::Sse).await
}

/// `POST /connection/uni_http_stream`.
pub async fn uni_http_stream(State(app): State<Arc<Transport>>, req: Request) -> Response {
    uni(app, req, "uni_http_stream", Format::Stream).await
}

async fn uni(
    app: Arc<Transport>,
    req: Request,
    transport: &'static str,
    format: Format,
) -> Response {
    let (methods, limit) = match format {
        Format::Sse => (
            "GET, POST, OPTIONS",
            app.config.uni_sse.max_request_body_size,
        ),
        Format::Stream => (
            "POST, OPTIONS",
            app.config.uni_http_stream.max_request_body_size,
        ),
    };
    if req.method() == Method::OPTIONS {
        return preflight(&app, req.headers(), methods);
    }
    let admitted = match admit(&app, transport, req.headers(), remote(&req)) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let from_query = cf_connect(&req);
    let (parts, body) = req.into_parts();
    let request = if parts.method == Method::GET {
        Bytes::from(from_query.unwrap_or_default())
    } else {
        match read_body(body, &parts.headers, limit).await {
            Ok(b) if b.is_empty() => {
                return json_error(StatusCode::BAD_REQUEST, "no connect request in the body");
            }
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    let first = match uni_connect_frame(&request) {
        Ok(f) => f,
        Err(e) => {
            tracing::info!(transport, error = %e, "bad connect request");
            return json_error(StatusCode::BAD_REQUEST, &e);
        }
    };
    let what = Stream {
        transport,
        format,
        uni: true,
    };
    start(&app, &parts.headers, admitted, what, Encoding::Json, first)
}

/// `POST /emulation`: a client frame for an emulated session, by session and node.
pub async fn emulation(State(app): State<Arc<Transport>>, req: Request) -> Response {
    if req.method() == Method::OPTIONS {
        return preflight(&app, req.headers(), "POST, OPTIONS");
    }
    let (origin, ok) = origin_ok(&app, req.headers());
    if !ok {
        tracing::info!(
            origin = origin.as_deref().unwrap_or(""),
            "emulation refused: origin not allowed (client.allowed_origins)"
        );
        return json_error(StatusCode::FORBIDDEN, "origin not allowed");
    }
    if !app.node.is_ready() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "node is not ready");
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(
        body,
        &parts.headers,
        app.config.emulation.max_request_body_size,
    )
    .await
    {
        Ok(b) => b,
        Err(r) => return r,
    };
    let protobuf = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/octet-stream"));
    let decoded = if protobuf {
        holdfast_protocol::proto::decode_emulation(&body).map_err(|e| e.to_string())
    } else {
        #[derive(Deserialize)]
        struct Req {
            #[serde(default)]
            node: String,
            session: String,
            data: String,
        }
        serde_json::from_slice::<Req>(&body)
            .map(|r| (r.node, r.session, Bytes::from(r.data)))
            .map_err(|e| e.to_string())
    };
    let (node, session, data) = match decoded {
        Ok(d) => d,
        Err(e) => {
            tracing::info!(error = %e, "bad emulation request");
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("bad emulation request: {e}"),
            );
        }
    };
    if session.is_empty() || session.len() > 64 || node.len() > 64 || data.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad emulation request: session, node or data",
        );
    }
    let outcome = app.node.emulate(&node, &session, data).await;
    metrics::counter!("holdfast_emulation_requests_total", "outcome" => match outcome {
        EmulationOutcome::Taken => "taken",
        EmulationOutcome::UnknownSession => "unknown_session",
        EmulationOutcome::UnknownNode => "unknown_node",
        EmulationOutcome::Busy => "busy",
    })
    .increment(1);
    let mut resp = match outcome {
        EmulationOutcome::Taken => StatusCode::NO_CONTENT.into_response(),
        EmulationOutcome::UnknownSession => {
            tracing::debug!(%session, "emulation for an unknown or closed session");
            json_error(StatusCode::NOT_FOUND, "unknown session")
        }
        EmulationOutcome::UnknownNode => {
            tracing::info!(%node, %session, "emulation for an unknown node");
            json_error(StatusCode::NOT_FOUND, "unknown node")
        }
        EmulationOutcome::Busy => {
            tracing::info!(%session, "emulation refused: the session's queue is full");
            json_error(StatusCode::TOO_MANY_REQUESTS, "session busy")
        }
    };
    cors(&app, &parts.headers, resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_frames_split_into_messages() {
        let f = Bytes::from_static(b"{\"a\":1}\n{}\n{\"b\":2}");
        let m: Vec<_> = json_messages(&f).collect();
        assert_eq!(m, vec![&b"{\"a\":1}"[..], b"{}", b"{\"b\":2}"]);
        assert_eq!(json_messages(&Bytes::from_static(b"{}")).count(), 1);
    }

    #[test]
    fn uni_connect_requests_become_one_command() {
        assert_eq!(
            &uni_connect_frame(b"").unwrap()[..],
            b"{\"id\":1,\"connect\":{}}"
        );
        let f = uni_connect_frame(b"{\"token\":\"t\",\n\"subs\":{}}").unwrap();
        assert!(!f.contains(&b'\n'), "re-encoded without raw newlines");
        assert!(uni_connect_frame(b"[1]").is_err());
        assert!(uni_connect_frame(b"{}\n{\"id\":2,\"publish\":{}}").is_err());
    }

    #[test]
    fn disconnect_pushes_are_bare_on_unidirectional_transports() {
        let d = disconnect_push(Encoding::Json, true, 3001, "shutdown");
        assert_eq!(
            &d[..],
            br#"{"disconnect":{"code":3001,"reason":"shutdown"}}"#
        );
        let d = disconnect_push(Encoding::Json, false, 3001, "shutdown");
        assert_eq!(
            &d[..],
            br#"{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}"#
        );
    }
}
