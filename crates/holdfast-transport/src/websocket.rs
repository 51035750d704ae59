//! The WebSocket transport: the upgrade (only when the node is ready and admission allows it) and
//! the adapters that let `holdfast_core::transport::serve_connection` drive a tungstenite stream.

use crate::Transport;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use holdfast_core::transport::{
    ConnectionKind, ConnectionMeta, FrameSink, FrameSource, serve_connection,
};
use holdfast_protocol::{Disconnect, Encoding};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

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
    let config = WebSocketConfig::default()
        .read_buffer_size(ws_cfg.read_buffer_size)
        .write_buffer_size(ws_cfg.write_buffer_size)
        .max_write_buffer_size(
            ws_cfg.write_buffer_size + 2 * ws_cfg.message_size_limit.max(1 << 20),
        )
        .max_message_size(Some(read_limit))
        .max_frame_size(Some(read_limit));
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
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let (sink, stream) = ws.split();
        let sink = WsSink {
            inner: sink,
            write_timeout,
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
                inner: WsSource(stream),
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
            serve_connection(node, meta, WsSource(stream), sink).await;
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

struct WsSource(SplitStream<Ws>);

impl FrameSource for WsSource {
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>> {
        loop {
            return match self.0.next().await? {
                Ok(Message::Text(t)) => Some(Ok(Bytes::from(t))),
                Ok(Message::Binary(b)) => Some(Ok(b)),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) => None,
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                    tracing::info!(size, max_size, "incoming message too big");
                    Some(Err(Disconnect::MESSAGE_TOO_BIG))
                }
                Err(WsError::Capacity(_)) => Some(Err(Disconnect::MESSAGE_TOO_BIG)),
                Err(WsError::Utf8(_)) => Some(Err(Disconnect::BAD_REQUEST)),
                // The peer ended the connection without a closing handshake: nothing to answer.
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => None,
                Err(WsError::Protocol(p)) => {
                    tracing::info!(error = %p, "WebSocket protocol violation: closing with 1002");
                    Some(Err(Disconnect::PROTOCOL_ERROR))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "websocket read error");
                    None
                }
            };
        }
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
    inner: SplitSink<Ws, Message>,
    write_timeout: Duration,
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
    F: std::future::Future<Output = Result<(), WsError>>,
{
    let mut write = std::pin::pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    let result = match first {
        Poll::Ready(r) => r,
        Poll::Pending => tokio::time::timeout(limit, write)
            .await
            .map_err(|_| io_err("write timeout"))?,
    };
    result.map_err(io_err)
}

impl WsSink {
    async fn send_text(&mut self, text: Bytes) -> std::io::Result<()> {
        let msg = Message::Text(Utf8Bytes::try_from(text).map_err(io_err)?);
        within(self.write_timeout, self.inner.feed(msg)).await
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
        let msg = if binary {
            Message::Binary(frame)
        } else {
            Message::Text(Utf8Bytes::try_from(frame).map_err(io_err)?)
        };
        within(self.write_timeout, self.inner.feed(msg)).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        within(self.write_timeout, self.inner.flush()).await
    }

    async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        if self.uni.is_some() {
            // A unidirectional client reads the disconnect as a message, then the close frame.
            let push =
                crate::http::disconnect_push(holdfast_protocol::Encoding::Json, true, code, reason);
            let _ = self.send_text(push).await;
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason),
        };
        let send = async {
            self.inner
                .send(Message::Close(Some(frame)))
                .await
                .map_err(io_err)?;
            self.inner.close().await.map_err(io_err)
        };
        match tokio::time::timeout(self.write_timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(io_err("close timeout")),
        }
    }
}
