//! Engines: where publications, history and presence live.
//!
//! An engine is two small traits chosen at start-up. [`Broker`] appends to history and delivers
//! publications to every node's [`BrokerHandler`] atomically per channel: a publication is
//! delivered in offset order, and only after it is in history. [`PresenceStore`] keeps who is in
//! a channel. [`MapBroker`] keeps map subscriptions' keyed state. Every implementation runs the
//! conformance suite in [`conformance`].

use async_trait::async_trait;
use holdfast_protocol::{ClientInfo, Publication};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

pub mod conformance;
pub mod map;
pub mod map_memory;
pub mod memory;
pub mod window;

pub use map::MapBroker;
pub use map_memory::MemoryMapBroker;
pub use memory::MemoryEngine;
pub use window::StreamWindow;

/// The newest position of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamTop {
    /// Offset of the newest publication (0 = none yet).
    pub offset: u64,
    /// Epoch: changes when offsets restart (new stream, lost history, restart of a memory node).
    pub epoch: Arc<str>,
}

/// History settings for one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Publications kept.
    pub size: usize,
    /// Items expire this long after the last publish.
    pub ttl: Duration,
    /// The epoch and top offset live this long after the last access.
    pub meta_ttl: Duration,
}

/// How to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Append to history (and assign an offset) when set.
    pub history: Option<HistoryOptions>,
    /// Same key within `idempotency_ttl` → same result, one publication.
    pub idempotency_key: Option<String>,
    /// How long an idempotency result is remembered.
    pub idempotency_ttl: Duration,
    /// Latest-state publishing (with history only): a publication whose version is not newer
    /// than the channel's latest (same or empty `version_epoch`) is suppressed. 0 = no check.
    pub version: u64,
    /// Epoch of `version`: a different one is accepted whatever its version.
    pub version_epoch: String,
}

/// Result of a publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishOutcome {
    /// Offset and epoch assigned (None without history).
    pub position: Option<StreamTop>,
    /// Nothing was published: an earlier publish with the same idempotency key answered, or
    /// (`position` is then the stream's top) the version was not newer than the channel's.
    pub suppressed: bool,
    /// Suppressed for a stale version (not an idempotent repeat, which answers exactly as the
    /// first publish did).
    pub stale: bool,
}

/// A history read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only publications after (forward) or before (reverse) this offset. The epoch, when not
    /// empty, must match the stream's or the read fails with
    /// [`EngineError::UnrecoverablePosition`].
    pub since: Option<(u64, String)>,
    /// At most this many publications; `None` = all, `Some(0)` = position only.
    pub limit: Option<usize>,
    /// Newest first.
    pub reverse: bool,
    /// Refreshes (or creates) the stream meta with this lifetime.
    pub meta_ttl: Duration,
}

/// Result of a history read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryPage {
    /// Publications in the requested order.
    pub publications: Vec<Arc<Publication>>,
    /// Stream position at the time of the read.
    pub top: StreamTop,
}

/// Engine failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The `since` epoch is not the stream's epoch.
    #[error("unrecoverable position")]
    UnrecoverablePosition,
    /// A bounded structure is full.
    #[error("engine limit reached: {0}")]
    Limit(&'static str),
    /// The backend is unreachable or failed.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

/// Receives what the broker delivers to this node. Calls for one channel never overlap and come
/// in offset order. Implementations must not block.
pub trait BrokerHandler: Send + Sync + Debug {
    /// A publication (with its stream epoch; empty for channels without history).
    fn on_publication(&self, channel: &str, publication: &Arc<Publication>, epoch: &Arc<str>);
    /// A client joined a channel.
    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>);
    /// A client left a channel.
    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>);

    /// The node may have missed deliveries of `channel` (its pub/sub connection was rebuilt):
    /// every positioned subscriber behind `top` is told to recover.
    fn check_position(&self, _channel: &str, _top: &StreamTop) {}

    /// The stream of `channel` went back to `top` in the same epoch (a backend lost its newest
    /// writes): every positioned subscriber past `top` is told to recover, since offsets after
    /// `top` will be reused for different publications.
    fn on_rewind(&self, _channel: &str, _top: &StreamTop) {}

    /// A control message from a node (possibly this one): see [`Broker::publish_control`].
    fn on_control(&self, _data: &[u8]) {}
}

/// Publication transport and history.
#[async_trait]
pub trait Broker: Send + Sync + Debug {
    /// Registers the node that receives deliveries. Called once before any other method.
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>);

    /// Appends (with history) and delivers. With history, the returned offset is in history and
    /// every node's handler sees the publication after the append, in offset order.
    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: &PublishOptions,
    ) -> Result<PublishOutcome, EngineError>;

    /// Delivers a join event to every node.
    async fn publish_join(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError>;

    /// Delivers a leave event to every node.
    async fn publish_leave(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError>;

    /// This node has its first local subscriber of `channel`.
    async fn subscribe(&self, channel: &str) -> Result<(), EngineError>;

    /// This node's last local subscriber of `channel` left.
    async fn unsubscribe(&self, channel: &str) -> Result<(), EngineError>;

    /// Reads history. A missing stream is created (new epoch, offset 0) so positions given out
    /// before the first publication stay valid.
    async fn history(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError>;

    /// Drops the publications of a channel, keeping its epoch and top offset.
    async fn remove_history(&self, channel: &str) -> Result<(), EngineError>;

    /// Sends a control message to every node's handler ([`BrokerHandler::on_control`]),
    /// this node's included. Single-node engines deliver it locally.
    async fn publish_control(&self, data: bytes::Bytes) -> Result<(), EngineError>;

    /// Whether other nodes may share this engine (then node heartbeats and surveys are used).
    fn distributed(&self) -> bool {
        false
    }

    /// Whether the engine can serve now (`/ready` reports it).
    fn healthy(&self) -> bool {
        true
    }

    /// Why the engine is degraded, if it is: it serves, but some operations fail now (a full
    /// disk refuses publications). `/health` shows it.
    fn problem(&self) -> Option<String> {
        None
    }

    /// Resolves once the engine is connected (the node is marked ready after it).
    async fn ready(&self) {}
}

/// Who is in which channel.
#[async_trait]
pub trait PresenceStore: Send + Sync + Debug {
    /// Adds or refreshes a client in a channel.
    async fn add_presence(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError>;
    /// Removes a client from a channel.
    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), EngineError>;
    /// Clients in a channel.
    async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, EngineError>;
    /// Number of clients and distinct users in a channel.
    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), EngineError>;
}

/// Delivery cursors: per user and channel, the last position known to have reached the user.
#[async_trait]
pub trait CursorStore: Send + Sync + Debug {
    /// Records `pos` for (`user`, `channel`) for `ttl`. Within one epoch a cursor only moves
    /// forward (an older offset is ignored); a different epoch replaces it.
    async fn save_cursor(
        &self,
        user: &str,
        channel: &str,
        pos: &StreamTop,
        ttl: Duration,
    ) -> Result<(), EngineError>;

    /// The cursor of (`user`, `channel`), if one was saved and has not expired.
    async fn load_cursor(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<Option<StreamTop>, EngineError>;
}

/// The three parts of an engine, as the node uses them.
#[derive(Debug, Clone)]
pub struct Engine {
    /// Publications and history.
    pub broker: Arc<dyn Broker>,
    /// Presence.
    pub presence: Arc<dyn PresenceStore>,
    /// Delivery cursors.
    pub cursors: Arc<dyn CursorStore>,
    /// Map subscriptions' state and change streams.
    pub maps: Arc<dyn MapBroker>,
}

impl Engine {
    /// All three parts from one implementation, with the memory map broker. Must be called
    /// inside a Tokio runtime.
    pub fn from_one<E: Broker + PresenceStore + CursorStore + 'static>(e: Arc<E>) -> Self {
        Self {
            broker: e.clone(),
            presence: e.clone(),
            cursors: e,
            maps: MemoryMapBroker::new(),
        }
    }
}

/// A random 8-letter epoch.
pub fn new_epoch() -> Arc<str> {
    use rand::Rng;
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    let s: String = (0..8)
        .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
        .collect();
    s.into()
}

/// Maps an engine failure to the client/API error.
pub fn engine_error(e: EngineError) -> holdfast_protocol::ErrorReply {
    match e {
        EngineError::UnrecoverablePosition => holdfast_protocol::ErrorReply::UNRECOVERABLE_POSITION,
        EngineError::Limit(_) => holdfast_protocol::ErrorReply::LIMIT_EXCEEDED,
        // Code 100 as Centrifugo; the message says what failed (a full disk, Redis down).
        EngineError::Unavailable(why) => holdfast_protocol::ErrorReply::new(
            100,
            format!("internal server error: engine unavailable: {why}"),
        )
        .temporary(),
    }
}
