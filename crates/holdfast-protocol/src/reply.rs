//! Server → client replies and pushes.

use crate::code::ErrorReply;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Who a connection is: attached to presence, join/leave and client publications.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// User id (`""` for anonymous).
    pub user: Arc<str>,
    /// Connection id.
    pub client: Arc<str>,
    /// Connection info from the token (`info` claim), raw JSON.
    pub conn_info: Option<Bytes>,
    /// Channel info from a subscription token, raw JSON.
    pub chan_info: Option<Bytes>,
}

/// A message in a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publication {
    /// Offset in the channel's stream; 0 in channels without history.
    pub offset: u64,
    /// Raw payload.
    pub data: Bytes,
    /// The publisher when a client published.
    pub info: Option<Arc<ClientInfo>>,
    /// Publisher-supplied tags.
    pub tags: Option<Arc<BTreeMap<String, String>>>,
    /// Milliseconds since the Unix epoch when published (not sent to clients).
    pub time: i64,
    /// `data` is not known to be JSON (published by a protobuf client, or binary `b64data`):
    /// JSON connections cannot receive it and are closed with 3506 instead.
    pub binary: bool,
    /// On the wire: `data` is a fossil delta against the previous publication this subscriber
    /// received. Set only on the per-subscriber forms fan-out makes, never in an engine.
    pub delta: bool,
    /// The publisher allows sending this publication as a delta (API `delta`, namespace
    /// `delta_publish`). Travels through engines; not sent to clients.
    pub use_delta: bool,
    /// Map subscriptions: the entry's key (empty in stream channels).
    pub key: String,
    /// Map subscriptions: the entry was removed.
    pub removed: bool,
}

/// `connect` result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectResult {
    /// Connection id.
    pub client: String,
    /// Server version.
    pub version: String,
    /// The connection expires and needs a `refresh`.
    pub expires: bool,
    /// Seconds until expiry.
    pub ttl: u32,
    /// Raw data for the client.
    pub data: Option<Bytes>,
    /// Server-side subscriptions made at connect.
    pub subs: Vec<(String, SubscribeResult)>,
    /// Ping interval, seconds.
    pub ping: u32,
    /// The server expects pongs.
    pub pong: bool,
    /// Session id of an emulated (HTTP-streaming, SSE) or unidirectional connection: what the
    /// client names in `/emulation` requests.
    pub session: String,
    /// Id of the node that owns an emulated connection (`/emulation` requests are forwarded to
    /// it).
    pub node: String,
    /// Server time in ms (only when configured).
    pub time: i64,
}

/// `subscribe` result (also used for server-side subscriptions in `connect` and the `subscribe`
/// push).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeResult {
    /// The subscription expires.
    pub expires: bool,
    /// Seconds until expiry.
    pub ttl: u32,
    /// Recovery is on.
    pub recoverable: bool,
    /// Stream epoch.
    pub epoch: String,
    /// Publications recovered.
    pub publications: Vec<Arc<Publication>>,
    /// Recovery succeeded.
    pub recovered: bool,
    /// Stream offset (on successful recovery, the client's requested offset).
    pub offset: u64,
    /// Positioning is on.
    pub positioned: bool,
    /// Raw data for the client.
    pub data: Option<Bytes>,
    /// The client asked to recover.
    pub was_recovering: bool,
    /// Delta compression was negotiated: every publication of the subscription carries `data`
    /// for the delta decoder (JSON: as a string), a delta where `delta` is set.
    pub delta: bool,
    /// Channel compaction: pushes of this subscription carry this id instead of the channel
    /// (0 = not negotiated).
    pub id: i64,
    /// Subscription type echoed for map subscriptions (0 = stream).
    pub sub_type: i32,
    /// Map subscriptions: 2 = another state page follows, 1 = a stream page, 0 = live.
    pub phase: i32,
    /// Map subscriptions: the next state page's cursor (empty = last page).
    pub cursor: String,
    /// Map subscriptions: state entries (a state page, or the last one with the live reply).
    pub state: Vec<Arc<Publication>>,
    /// Map subscriptions: milliseconds the client debounces its own writes per key.
    pub publish_debounce: u32,
}

/// `history` result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryResult {
    /// Publications in the requested order.
    pub publications: Vec<Arc<Publication>>,
    /// Stream epoch.
    pub epoch: String,
    /// Current stream top offset.
    pub offset: u64,
}

/// `refresh` / `sub_refresh` result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshResult {
    /// Still expires.
    pub expires: bool,
    /// Seconds until expiry.
    pub ttl: u32,
}

/// Result of a command, or its error.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    /// The command failed.
    Error(ErrorReply),
    /// `connect`
    Connect(Box<ConnectResult>),
    /// `subscribe`
    Subscribe(Box<SubscribeResult>),
    /// `unsubscribe`
    Unsubscribe,
    /// `publish`
    Publish,
    /// `presence`: client id → info.
    Presence(Vec<Arc<ClientInfo>>),
    /// `presence_stats`
    PresenceStats {
        /// Connections.
        num_clients: u32,
        /// Distinct users.
        num_users: u32,
    },
    /// `history`
    History(Box<HistoryResult>),
    /// `rpc`
    Rpc(Option<Bytes>),
    /// `refresh`
    Refresh(RefreshResult),
    /// `sub_refresh`
    SubRefresh(RefreshResult),
}

/// A message the server sends without a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Push<'a> {
    /// A publication in a channel.
    Pub {
        /// Channel name.
        channel: &'a str,
        /// The publication.
        publication: &'a Publication,
    },
    /// Someone joined a channel.
    Join {
        /// Channel name.
        channel: &'a str,
        /// Who.
        info: &'a ClientInfo,
    },
    /// Someone left a channel.
    Leave {
        /// Channel name.
        channel: &'a str,
        /// Who.
        info: &'a ClientInfo,
    },
    /// The server unsubscribed the client.
    Unsubscribe {
        /// Channel name.
        channel: &'a str,
        /// Unsubscribe code (2000–2999).
        code: u32,
        /// Reason text.
        reason: &'a str,
    },
    /// The server subscribed the client.
    Subscribe {
        /// Channel name.
        channel: &'a str,
        /// Position data (no publications).
        result: &'a SubscribeResult,
    },
    /// Asynchronous message to the client.
    Message {
        /// Raw payload.
        data: &'a [u8],
    },
    /// Disconnect notice (not used on WebSocket, where the close frame carries it).
    Disconnect {
        /// Disconnect code.
        code: u16,
        /// Reason text.
        reason: &'a str,
    },
}
