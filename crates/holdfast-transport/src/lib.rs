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
pub mod websocket;

use admission::{ConnectionLimits, TrustedProxies};
use holdfast_core::Node;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub use websocket::json_error;

/// `websocket.*`: the WebSocket transport's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WebsocketConfig {
    /// Largest incoming message in bytes; bigger closes with 1009.
    pub message_size_limit: usize,
    /// A write that takes longer closes the connection.
    #[serde(with = "holdfast_core::config::duration")]
    pub write_timeout: Duration,
    /// Per-connection read buffer (allocated for every connection).
    pub read_buffer_size: usize,
    /// Write buffer target before bytes go to the socket (flushes always write through).
    pub write_buffer_size: usize,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        Self {
            message_size_limit: 65536,
            write_timeout: Duration::from_secs(1),
            read_buffer_size: 1024,
            write_buffer_size: 16 * 1024,
        }
    }
}

/// What the transports need to know.
#[derive(Debug, Clone, Default)]
pub struct TransportConfig {
    /// The WebSocket transport.
    pub websocket: WebsocketConfig,
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

    /// The connection endpoints: `/connection/websocket`.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(
                "/connection/websocket",
                axum::routing::get(websocket::upgrade),
            )
            .with_state(self.clone())
    }

    /// Forgets idle per-IP rate state (call periodically so it stays bounded).
    pub fn upkeep(&self) {
        self.limits.upkeep();
    }
}
