//! Holdfast's client transports as a library: an axum router serving a node's connection
//! endpoints (`/connection/websocket`), with the admission every transport shares (ready node,
//! browser origins, connection limits per node and per IP, client addresses behind trusted
//! proxies). An application embedding a [`Node`] mounts [`Transport::router`] in its own axum
//! router; it needs neither the server's engines nor its HTTP clients.
//!
//! ```no_run
//! # async fn run(node: holdfast_core::Node) {
//! use holdfast_transport::{Transport, TransportConfig};
//! let transport = Transport::new(node.clone(), TransportConfig::default());
//! let app = axum::Router::new().merge(transport.router());
//! # let _ = app;
//! # }
//! ```

pub mod admission;
pub mod frame;
mod gate;
pub mod http;
pub mod websocket;

use admission::{ConnectionLimits, TrustedProxies};
use holdfast_core::Node;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub use http::{EmulationConfig, HttpTransportConfig};
pub use websocket::json_error;

/// `uni_websocket.*`: unidirectional WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UniWebsocketConfig {
    /// Serve `/connection/uni_websocket` (off by default, as on Centrifugo).
    pub enabled: bool,
    /// Largest incoming message (the connect request) in bytes; bigger closes with 1009.
    pub message_size_limit: usize,
    /// Several pushes per WebSocket message, joined by `\n` (default: one per message).
    pub join_push_messages: bool,
}

impl Default for UniWebsocketConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            message_size_limit: 65536,
            join_push_messages: false,
        }
    }
}

/// `websocket.*`: the WebSocket transport's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WebsocketConfig {
    /// Largest incoming message in bytes; bigger closes with 1009.
    pub message_size_limit: usize,
    /// A write that takes longer closes the connection.
    #[serde(with = "holdfast_core::config::duration")]
    pub write_timeout: Duration,
    /// Bytes asked of the socket per read. The buffer is one per worker thread, so an idle
    /// connection holds none; only a message arriving in several reads is buffered per
    /// connection, until complete.
    pub read_buffer_size: usize,
    /// Write buffer target before bytes go to the socket (flushes always write through).
    pub write_buffer_size: usize,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        Self {
            message_size_limit: 65536,
            write_timeout: Duration::from_secs(1),
            read_buffer_size: 16 * 1024,
            write_buffer_size: 16 * 1024,
        }
    }
}

/// What the transports need to know.
#[derive(Debug, Clone, Default)]
pub struct TransportConfig {
    /// The WebSocket transport (its `write_timeout` applies to every transport).
    pub websocket: WebsocketConfig,
    /// HTTP-streaming with bidirectional emulation.
    pub http_stream: HttpTransportConfig,
    /// SSE with bidirectional emulation.
    pub sse: HttpTransportConfig,
    /// The `/emulation` endpoint of `http_stream` and `sse`.
    pub emulation: EmulationConfig,
    /// Unidirectional WebSocket.
    pub uni_websocket: UniWebsocketConfig,
    /// Unidirectional SSE.
    pub uni_sse: HttpTransportConfig,
    /// Unidirectional HTTP-streaming.
    pub uni_http_stream: HttpTransportConfig,
    /// Browser origins allowed to connect (`client.allowed_origins`; empty = same host only).
    pub allowed_origins: Vec<String>,
    /// Connections on this node at most (0 = unlimited).
    pub connection_limit: usize,
    /// Connections from one address at most (0 = unlimited).
    pub connection_limit_per_ip: usize,
    /// Upgrade attempts per address per second (0 = unlimited).
    pub connection_rate_limit_per_ip: u32,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` name the client's address.
    pub trusted_proxies: TrustedProxies,
    /// Lower-case names of the upgrade-request headers the node's hooks may see (forwarded to
    /// proxies); the others are not kept with the connection.
    pub forwarded_headers: Vec<String>,
}

/// A node's transports, with their shared admission state.
#[derive(Debug)]
pub struct Transport {
    /// The node connections belong to.
    pub node: Node,
    /// Settings.
    pub config: TransportConfig,
    /// Connections per node and per IP, upgrade attempts per IP.
    pub limits: Arc<ConnectionLimits>,
    /// Client addresses behind trusted proxies.
    pub trusted_proxies: TrustedProxies,
}

impl Transport {
    /// The transports of `node`.
    pub fn new(node: Node, config: TransportConfig) -> Arc<Self> {
        Arc::new(Self {
            limits: ConnectionLimits::new(
                config.connection_limit,
                config.connection_limit_per_ip,
                config.connection_rate_limit_per_ip,
            ),
            trusted_proxies: config.trusted_proxies.clone(),
            node,
            config,
        })
    }

    /// The connection endpoints: `/connection/websocket`, and those enabled of
    /// `/connection/http_stream`, `/connection/sse` (with `/emulation`),
    /// `/connection/uni_websocket`, `/connection/uni_sse`, `/connection/uni_http_stream`.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        use axum::routing::{get, post};
        let c = &self.config;
        // CONNECT: WebSocket over HTTP/2 (RFC 8441 extended CONNECT).
        let connect = axum::routing::MethodFilter::CONNECT;
        let mut r = axum::Router::new().route(
            "/connection/websocket",
            get(websocket::upgrade).on(connect, websocket::upgrade),
        );
        if c.http_stream.enabled {
            r = r.route(
                "/connection/http_stream",
                post(http::http_stream).options(http::http_stream),
            );
        }
        if c.sse.enabled {
            r = r.route(
                "/connection/sse",
                get(http::sse).post(http::sse).options(http::sse),
            );
        }
        if c.http_stream.enabled || c.sse.enabled {
            r = r.route("/emulation", post(http::emulation).options(http::emulation));
        }
        if c.uni_websocket.enabled {
            r = r.route(
                "/connection/uni_websocket",
                get(websocket::upgrade_uni).on(connect, websocket::upgrade_uni),
            );
        }
        if c.uni_sse.enabled {
            r = r.route(
                "/connection/uni_sse",
                get(http::uni_sse)
                    .post(http::uni_sse)
                    .options(http::uni_sse),
            );
        }
        if c.uni_http_stream.enabled {
            r = r.route(
                "/connection/uni_http_stream",
                post(http::uni_http_stream).options(http::uni_http_stream),
            );
        }
        r.with_state(self.clone())
    }

    /// Forgets idle per-IP rate state (call periodically so it stays bounded).
    pub fn upkeep(&self) {
        self.limits.upkeep();
    }
}
