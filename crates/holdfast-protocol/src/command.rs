//! Client → server commands, as decoded from the wire.
//!
//! Payloads (`data`) stay raw bytes: they are validated once at decode time and never parsed
//! again. Fields that Holdfast does not implement (shared polls) are accepted and ignored so
//! that newer clients keep working.

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
    /// Subscription type: [`SubscribeRequest::TYPE_STREAM`], `TYPE_MAP`, `TYPE_MAP_CLIENTS`,
    /// `TYPE_MAP_USERS`, `TYPE_SHARED_POLL`.
    pub sub_type: i32,
    /// Map subscriptions: which page is asked for ([`SubscribeRequest::PHASE_STATE`],
    /// `PHASE_STREAM`; the server decides when it is live).
    pub phase: i32,
    /// Map subscriptions: the state page to continue from (from the previous reply).
    pub cursor: String,
    /// Map subscriptions: page size asked for (0 = the server's default).
    pub limit: i32,
}

impl SubscribeRequest {
    /// Flag bit asking for channel compaction: pushes carry a numeric id instead of the channel.
    pub const FLAG_CHANNEL_COMPACTION: i64 = 1;
    /// Flag bit asking the server to answer 112 instead of `recovered:false`.
    pub const FLAG_REJECT_UNRECOVERED: i64 = 2;
    /// A plain stream subscription.
    pub const TYPE_STREAM: i32 = 0;
    /// A map subscription (keyed state).
    pub const TYPE_MAP: i32 = 1;
    /// A map of the channel's connections.
    pub const TYPE_MAP_CLIENTS: i32 = 2;
    /// A map of the channel's users.
    pub const TYPE_MAP_USERS: i32 = 3;
    /// A shared poll.
    pub const TYPE_SHARED_POLL: i32 = 4;
    /// Map phase: live (only the server answers with it).
    pub const PHASE_LIVE: i32 = 0;
    /// Map phase: a page of the change stream.
    pub const PHASE_STREAM: i32 = 1;
    /// Map phase: a page of the state.
    pub const PHASE_STATE: i32 = 2;
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishRequest {
    /// Channel name.
    pub channel: String,
    /// Raw payload.
    pub data: Bytes,
    /// 1 = a map entry write (`key`, `removed`); 0 = a stream publication.
    pub pub_type: i32,
    /// Map entry key.
    pub key: String,
    /// Map entry removal.
    pub removed: bool,
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
