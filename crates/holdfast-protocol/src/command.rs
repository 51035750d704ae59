//! Client → server commands, as decoded from the wire.
//!
//! Payloads (`data`) stay raw bytes: they are validated once at decode time and never parsed
//! again. Fields that Holdfast does not implement (map subscriptions, shared polls) are accepted
//! and ignored so that newer clients keep working.

use bytes::Bytes;
use std::collections::BTreeMap;

/// A stream position: the offset of the last publication seen, within an epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPosition {
    /// Offset of the last publication (0 = before the first).
    pub offset: u64,
    /// Epoch of the stream the offset belongs to.
    pub epoch: String,
}

/// One decoded command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Request id echoed in the reply; 0 only for `send` and pongs.
    pub id: u32,
    /// The request.
    pub request: Request,
}

/// The request carried by a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// First command of every connection.
    Connect(ConnectRequest),
    /// Subscribe to a channel.
    Subscribe(SubscribeRequest),
    /// Leave a channel.
    Unsubscribe {
        /// Channel name.
        channel: String,
    },
    /// Publish into a channel.
    Publish(PublishRequest),
    /// Who is in a channel.
    Presence {
        /// Channel name.
        channel: String,
    },
    /// How many are in a channel.
    PresenceStats {
        /// Channel name.
        channel: String,
    },
    /// Read a channel's history.
    History(HistoryRequest),
    /// Fire-and-forget message to the server.
    Send {
        /// Raw payload.
        data: Bytes,
    },
    /// Request/response call to the server.
    Rpc {
        /// Method name (may be empty).
        method: String,
        /// Raw payload.
        data: Bytes,
    },
    /// New connection token.
    Refresh {
        /// The token.
        token: String,
    },
    /// New subscription token.
    SubRefresh {
        /// Channel name.
        channel: String,
        /// The token.
        token: String,
    },
    /// Answer to a server ping (`{}`).
    Pong,
}

impl Request {
    /// The method name used in logs and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Connect(_) => "connect",
            Request::Subscribe(_) => "subscribe",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::Publish(_) => "publish",
            Request::Presence { .. } => "presence",
            Request::PresenceStats { .. } => "presence_stats",
            Request::History(_) => "history",
            Request::Send { .. } => "send",
            Request::Rpc { .. } => "rpc",
            Request::Refresh { .. } => "refresh",
            Request::SubRefresh { .. } => "sub_refresh",
            Request::Pong => "pong",
        }
    }
}

/// `connect` request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectRequest {
    /// Connection JWT (empty without one).
    pub token: String,
    /// Raw custom data for a connect hook.
    pub data: Option<Bytes>,
    /// Positions of server-side subscriptions the client held before reconnecting.
    pub subs: BTreeMap<String, SubscribeRequest>,
    /// Client name (SDK), ≤ 16 chars.
    pub name: String,
    /// Client version, ≤ 64 chars.
    pub version: String,
    /// Emulated headers.
    pub headers: BTreeMap<String, String>,
}

/// `subscribe` request (also the value type of `connect.subs`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeRequest {
    /// Channel name.
    pub channel: String,
    /// Subscription JWT for private channels.
    pub token: String,
    /// The client asks to recover from `offset`/`epoch`.
    pub recover: bool,
    /// Epoch of the recovery position.
    pub epoch: String,
    /// Offset of the recovery position.
    pub offset: u64,
    /// Raw custom data.
    pub data: Option<Bytes>,
    /// The client asks for positioning.
    pub positioned: bool,
    /// The client asks for recovery support.
    pub recoverable: bool,
    /// The client asks for join/leave pushes.
    pub join_leave: bool,
    /// Subscribe flags (bit 1: channel compaction; bit 2: reject unrecovered with 112).
    pub flag: i64,
    /// Delta compression asked for (`"fossil"`; empty = none).
    pub delta: String,
    /// Tag filter for the publications this subscription receives.
    pub tf: Option<FilterNode>,
}

impl SubscribeRequest {
    /// Flag bit asking for channel compaction: pushes carry a numeric id instead of the channel.
    pub const FLAG_CHANNEL_COMPACTION: i64 = 1;
    /// Flag bit asking the server to answer 112 instead of `recovered:false`.
    pub const FLAG_REJECT_UNRECOVERED: i64 = 2;
}

/// A publication tag filter as sent by clients (`tf`): a leaf when `op` is empty (`key`, `cmp`
/// and `val` or `vals`), else `and`, `or` or `not` over `nodes`. Validated by the server before
/// use; decoding only bounds what serde and prost bound (the frame size).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct FilterNode {
    /// `""` (leaf), `and`, `or`, `not`.
    #[serde(default)]
    pub op: String,
    /// Tag name (leaf).
    #[serde(default)]
    pub key: String,
    /// Comparison (leaf): eq, neq, in, nin, ex, nex, sw, ew, ct, lt, lte, gt, gte.
    #[serde(default)]
    pub cmp: String,
    /// Operand of single-value comparisons.
    #[serde(default)]
    pub val: String,
    /// Operands of `in` / `nin`.
    #[serde(default)]
    pub vals: Vec<String>,
    /// Children of a logical node.
    #[serde(default)]
    pub nodes: Vec<FilterNode>,
}

/// `publish` request.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRequest {
    /// Channel name.
    pub channel: String,
    /// Raw payload.
    pub data: Bytes,
}

/// `history` request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryRequest {
    /// Channel name.
    pub channel: String,
    /// 0 = position only, −1 = all (capped), n = at most n.
    pub limit: i32,
    /// Return publications after (or before, with `reverse`) this position.
    pub since: Option<StreamPosition>,
    /// Newest first.
    pub reverse: bool,
}
