//! Application hooks: how a node decides who connects and what they may do.
//!
//! The node's [`Hooks`] have one slot per role: connect, channel policy, RPC, refresh and
//! lifecycle, each set on its own. [`StandardHandler`] (JWT through a [`TokenVerifier`],
//! namespace permissions, §7.2 of the protocol reference) fills the connect, channel and
//! refresh slots of the standalone server; an embedding application sets what it needs, e.g.
//! [`RpcMethods`] in the RPC slot. Hooks are owned by the node, not by connections, so nothing
//! accumulates per connection.

use crate::channel::user_limited_allows;
use crate::config::{ChannelOptions, ClientConfig};
use async_trait::async_trait;
use bytes::Bytes;
use holdfast_protocol::{Disconnect, Encoding, ErrorReply};
use std::collections::BTreeMap;
use std::sync::Arc;

mod rpc;
mod standard;

pub use rpc::{RpcFn, RpcMethods};
pub use standard::{ConnectClaims, StandardHandler, SubscribeClaims, TokenError, TokenVerifier};

/// A hook's refusal: an error reply for the command, or closing the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Reply with this error; the connection stays.
    Reply(ErrorReply),
    /// Close the connection.
    Disconnect(Disconnect),
}

impl From<ErrorReply> for HandlerError {
    fn from(e: ErrorReply) -> Self {
        HandlerError::Reply(e)
    }
}

impl From<Disconnect> for HandlerError {
    fn from(d: Disconnect) -> Self {
        HandlerError::Disconnect(d)
    }
}

/// The connection a hook is called for.
#[derive(Debug, Clone)]
pub struct ClientContext {
    /// Connection id.
    pub client: Arc<str>,
    /// User id (`""` = anonymous).
    pub user: Arc<str>,
    /// Transport name (`websocket`).
    pub transport: &'static str,
    /// Frame encoding.
    pub encoding: Encoding,
    /// Connection info (token `info`).
    pub conn_info: Option<Bytes>,
    /// Server-side metadata (token `meta`), never sent to clients.
    pub meta: Option<Bytes>,
    /// Forwardable HTTP headers of the connection's upgrade request.
    pub headers: crate::transport::Headers,
}

/// Per-channel option overrides from a token or hook (`{"presence":{"value":true}}` in JWTs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ChannelOverride {
    /// Override `presence`.
    pub presence: Option<bool>,
    /// Override `join_leave`.
    pub join_leave: Option<bool>,
    /// Override `force_push_join_leave`.
    pub force_push_join_leave: Option<bool>,
    /// Override `force_recovery`.
    pub force_recovery: Option<bool>,
    /// Override `force_positioning`.
    pub force_positioning: Option<bool>,
}

impl ChannelOverride {
    /// Applies the overrides to a copy of the namespace options.
    pub fn apply(&self, o: &ChannelOptions) -> ChannelOptions {
        let mut o = o.clone();
        if let Some(v) = self.presence {
            o.presence = v;
        }
        if let Some(v) = self.join_leave {
            o.join_leave = v;
        }
        if let Some(v) = self.force_push_join_leave {
            o.force_push_join_leave = v;
        }
        if let Some(v) = self.force_recovery {
            o.force_recovery = v && o.history_enabled();
        }
        if let Some(v) = self.force_positioning {
            o.force_positioning = v;
        }
        o
    }

    /// Whether any override is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Options of a server-side subscription given at connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSubOptions {
    /// Channel info (`chan_info`).
    pub info: Option<Bytes>,
    /// Data returned to the client in the subscription result.
    pub data: Option<Bytes>,
    /// Option overrides.
    pub overrides: ChannelOverride,
}

/// A connect attempt.
#[derive(Debug, Clone)]
pub struct ConnectEvent {
    /// The id the connection will have.
    pub client: Arc<str>,
    /// Transport name.
    pub transport: &'static str,
    /// Frame encoding.
    pub encoding: Encoding,
    /// Connection token (empty without one).
    pub token: String,
    /// Custom data.
    pub data: Option<Bytes>,
    /// Client SDK name.
    pub name: String,
    /// Client SDK version.
    pub version: String,
    /// Emulated headers (sent by the client in `connect`).
    pub headers: BTreeMap<String, String>,
    /// Forwardable HTTP headers of the upgrade request.
    pub http_headers: crate::transport::Headers,
}

/// Who connected and with what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectDecision {
    /// User id (`""` = anonymous).
    pub user: String,
    /// Connection info shown in presence, join/leave and publications.
    pub info: Option<Bytes>,
    /// Unix seconds when the connection expires (None = never).
    pub expire_at: Option<i64>,
    /// Server-side subscriptions.
    pub subs: BTreeMap<String, ServerSubOptions>,
    /// Data returned in the connect result.
    pub data: Option<Bytes>,
    /// Server-side metadata.
    pub meta: Option<Bytes>,
}

/// A client-side subscribe attempt.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeEvent<'a> {
    /// Channel name.
    pub channel: &'a str,
    /// Subscription token (may be empty).
    pub token: &'a str,
    /// Custom data.
    pub data: Option<&'a Bytes>,
    /// The channel's namespace options.
    pub options: &'a ChannelOptions,
    /// The channel starts with `$`.
    pub private: bool,
}

/// A granted subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeDecision {
    /// Channel info (`chan_info`).
    pub info: Option<Bytes>,
    /// Data returned in the subscribe result.
    pub data: Option<Bytes>,
    /// Unix seconds when the subscription expires (None = never).
    pub expire_at: Option<i64>,
    /// Option overrides.
    pub overrides: ChannelOverride,
    /// Holdfast extension: a tag filter the server applies to this subscriber's publications
    /// (token claim or proxy result `tf`), and-ed with the client's own so the client cannot
    /// widen it.
    pub filter: Option<holdfast_protocol::FilterNode>,
}

/// A client publish, presence or history call.
#[derive(Debug, Clone, Copy)]
pub struct ChannelEvent<'a> {
    /// Channel name.
    pub channel: &'a str,
    /// The channel's namespace options.
    pub options: &'a ChannelOptions,
    /// The client is subscribed to the channel.
    pub subscribed: bool,
}

/// What to publish after the publish hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishDecision {
    /// Replacement payload.
    pub data: Option<Bytes>,
    /// Do not append to history.
    pub skip_history: bool,
}

/// A refreshed connection or subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshDecision {
    /// Unix seconds of the new expiry (None = never).
    pub expire_at: Option<i64>,
    /// New info, when it changes.
    pub info: Option<Bytes>,
}

/// A connection's life, reported to the lifecycle hook ([`LifecycleHook`], e.g. webhooks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// A connect succeeded.
    Connected {
        /// Connection id.
        client: Arc<str>,
        /// User id.
        user: Arc<str>,
        /// Transport name.
        transport: &'static str,
    },
    /// A connected connection closed.
    Disconnected {
        /// Connection id.
        client: Arc<str>,
        /// User id.
        user: Arc<str>,
        /// Disconnect code (3000 when the socket just closed).
        code: u16,
        /// Reason text.
        reason: String,
    },
    /// A subscription (client- or server-side) became live.
    Subscribed {
        /// Connection id.
        client: Arc<str>,
        /// User id.
        user: Arc<str>,
        /// Channel.
        channel: Arc<str>,
    },
    /// A subscription ended while the connection stayed (a disconnect reports only
    /// `Disconnected`).
    Unsubscribed {
        /// Connection id.
        client: Arc<str>,
        /// User id.
        user: Arc<str>,
        /// Channel.
        channel: Arc<str>,
    },
}

/// Result of a server-side refresh of a connection or subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerRefresh {
    /// The credentials are no longer valid: close (3005) or unsubscribe (2501).
    pub expired: bool,
    /// New expiry, unix seconds (None = never).
    pub expire_at: Option<i64>,
    /// New info.
    pub info: Option<Bytes>,
}

/// Decides who connects (the connect slot of [`Hooks`]).
#[async_trait]
pub trait ConnectHook: Send + Sync + std::fmt::Debug + 'static {
    /// Decides who is connecting.
    async fn on_connecting(&self, ev: &ConnectEvent) -> Result<ConnectDecision, HandlerError>;
}

/// What a connection may do in channels (the channel slot of [`Hooks`]): subscribe, publish,
/// presence, history, and renewing expiring subscriptions.
#[async_trait]
pub trait ChannelPolicy: Send + Sync + std::fmt::Debug + 'static {
    /// Decides a client-side subscription (after the namespace is known).
    async fn on_subscribe(
        &self,
        client: &ClientContext,
        ev: &SubscribeEvent<'_>,
    ) -> Result<SubscribeDecision, HandlerError>;

    /// Decides a client publish.
    async fn on_publish(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
        data: &Bytes,
    ) -> Result<PublishDecision, HandlerError>;

    /// Permission for a presence or presence_stats call (the feature is already known to be on).
    async fn on_presence(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
    ) -> Result<(), HandlerError>;

    /// Permission for a history call, and for recovery/positioning asked by the client.
    async fn on_history(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
    ) -> Result<(), HandlerError>;

    /// Refreshes a subscription with a new token. Default: 108.
    async fn on_sub_refresh(
        &self,
        _client: &ClientContext,
        _channel: &str,
        _token: &str,
    ) -> Result<RefreshDecision, HandlerError> {
        Err(ErrorReply::NOT_AVAILABLE.into())
    }

    /// Whether expiring subscriptions of this namespace are refreshed by the server.
    fn refreshes_subscriptions(&self, _options: &ChannelOptions) -> bool {
        false
    }

    /// Refreshes an expiring subscription on the server side. Errors are retried later.
    async fn on_server_sub_refresh(
        &self,
        _client: &ClientContext,
        _channel: &str,
    ) -> Result<ServerRefresh, HandlerError> {
        Err(ErrorReply::NOT_AVAILABLE.into())
    }
}

/// Answers `rpc` and `send` (the RPC slot of [`Hooks`]).
#[async_trait]
pub trait RpcHook: Send + Sync + std::fmt::Debug + 'static {
    /// Answers an RPC.
    async fn on_rpc(
        &self,
        client: &ClientContext,
        method: &str,
        data: &Bytes,
    ) -> Result<Option<Bytes>, HandlerError>;

    /// Handles a `send`. Default: close with 3508 (no message handler).
    async fn on_send(&self, _client: &ClientContext, _data: &Bytes) -> Result<(), HandlerError> {
        Err(Disconnect::NOT_AVAILABLE.into())
    }
}

/// Renews a connection's credentials (the refresh slot of [`Hooks`]).
#[async_trait]
pub trait RefreshHook: Send + Sync + std::fmt::Debug + 'static {
    /// Refreshes the connection with a new token (the client's `refresh`).
    async fn on_refresh(
        &self,
        client: &ClientContext,
        token: &str,
    ) -> Result<RefreshDecision, HandlerError>;

    /// Whether expiring connections are refreshed by the server ([`RefreshHook::on_server_refresh`])
    /// instead of by the client sending `refresh`.
    fn refreshes_connections(&self) -> bool {
        false
    }

    /// Refreshes an expiring connection on the server side. Errors are retried later.
    async fn on_server_refresh(
        &self,
        _client: &ClientContext,
    ) -> Result<ServerRefresh, HandlerError> {
        Err(ErrorReply::NOT_AVAILABLE.into())
    }
}

/// Hears about connections' lives (the lifecycle slot of [`Hooks`], e.g. webhooks). Called on
/// the connection's task: must not block (queue the event).
pub trait LifecycleHook: Send + Sync + std::fmt::Debug + 'static {
    /// Reports a lifecycle event.
    fn on_lifecycle(&self, event: LifecycleEvent);
}

/// No RPC handler: `rpc` answers 108, `send` closes with 3508.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRpc;

#[async_trait]
impl RpcHook for NoRpc {
    async fn on_rpc(
        &self,
        _client: &ClientContext,
        _method: &str,
        _data: &Bytes,
    ) -> Result<Option<Bytes>, HandlerError> {
        Err(ErrorReply::NOT_AVAILABLE.into())
    }
}

/// The application hooks of a node: one slot per role, each set on its own (as centrifuge's
/// `OnConnecting`, `OnSubscribe`… are). The standalone server fills them with JWT checks,
/// namespace permissions and HTTP proxies; an embedding application with its own code.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// Who connects.
    pub connect: Arc<dyn ConnectHook>,
    /// What a connection may do in channels.
    pub channels: Arc<dyn ChannelPolicy>,
    /// `rpc` and `send`.
    pub rpc: Arc<dyn RpcHook>,
    /// Connection refresh.
    pub refresh: Arc<dyn RefreshHook>,
    /// Lifecycle events (none by default).
    pub lifecycle: Option<Arc<dyn LifecycleHook>>,
}

impl Hooks {
    /// Token checks and namespace permissions ([`StandardHandler`]) in the connect, channel and
    /// refresh slots; no RPC handler ([`NoRpc`]); no lifecycle hook.
    pub fn standard(standard: StandardHandler) -> Self {
        let s = Arc::new(standard);
        Self {
            connect: s.clone(),
            channels: s.clone(),
            rpc: Arc::new(NoRpc),
            refresh: s,
            lifecycle: None,
        }
    }

    /// Sets the connect slot.
    #[must_use]
    pub fn with_connect(mut self, hook: Arc<dyn ConnectHook>) -> Self {
        self.connect = hook;
        self
    }

    /// Sets the channel slot.
    #[must_use]
    pub fn with_channels(mut self, hook: Arc<dyn ChannelPolicy>) -> Self {
        self.channels = hook;
        self
    }

    /// Sets the RPC slot.
    #[must_use]
    pub fn with_rpc(mut self, hook: Arc<dyn RpcHook>) -> Self {
        self.rpc = hook;
        self
    }

    /// Sets the refresh slot.
    #[must_use]
    pub fn with_refresh(mut self, hook: Arc<dyn RefreshHook>) -> Self {
        self.refresh = hook;
        self
    }

    /// Sets the lifecycle slot.
    #[must_use]
    pub fn with_lifecycle(mut self, hook: Arc<dyn LifecycleHook>) -> Self {
        self.lifecycle = Some(hook);
        self
    }

    /// Reports a lifecycle event to the lifecycle hook, if there is one.
    pub fn lifecycle(&self, event: LifecycleEvent) {
        if let Some(h) = &self.lifecycle {
            h.on_lifecycle(event);
        }
    }
}
