//! The per-connection state machine: connect first, then commands in order.
//!
//! A [`Session`] is owned by its connection's reader; it holds no lock across an await. What
//! other parts of the node must tell it (server unsubscribe, a gap found by fan-out) arrives as
//! control messages on its [`ClientHandle`], handled before the next command.

mod attach;
mod connect;
mod cursor;
mod history;
mod map;
mod presence;
mod publish;
mod refresh;
mod rpc;
mod subscribe;

use crate::channel::{ChannelRules, ResolvedChannel};
use crate::client::{ClientHandle, Control};
use crate::config::ChannelOptions;
use crate::engine::HistoryQuery;
use crate::engine::engine_error;
use crate::handler::{ChannelEvent, ClientContext, ConnectEvent, HandlerError, SubscribeEvent};
use crate::hub::{DeliveryOptions, GoLive, Subscription};
use crate::node::{Node, PublishRequest};
use crate::time::unix_secs;
use attach::Plan;
use bytes::Bytes;
use holdfast_protocol::code::unsubscribe;
use holdfast_protocol::command::{ConnectRequest, HistoryRequest, SubscribeRequest};
use holdfast_protocol::reply::{ConnectResult, HistoryResult, RefreshResult, SubscribeResult};
use holdfast_protocol::{
    ClientInfo, Command, Disconnect, Encoding, ErrorReply, Push, ReplyBody, Request, json,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// RPC method a client calls to confirm delivery: `{"channel":…,"offset":…,"epoch":…}`.
pub const ACK_METHOD: &str = "holdfast.ack";

pub use crate::client::ServerSubscribe;

#[derive(Debug)]
enum State {
    /// Waiting for `connect`.
    New,
    /// Connected.
    Connected(Box<Connected>),
    /// Connect failed with an error reply: every further command closes with 3501.
    Unusable,
}

#[derive(Debug)]
struct Connected {
    ctx: ClientContext,
    /// Publisher/presence identity of this connection.
    info: Arc<ClientInfo>,
    subs: HashMap<Arc<str>, SessionSub>,
    /// When the server refreshes this connection's credentials (server-side refresh).
    refresh_at: Option<tokio::time::Instant>,
    /// Channel compaction is never negotiated (a client known to mishandle it).
    no_compaction: bool,
}

impl Connected {
    /// New connection info (refresh): used by later publications, presence and joins.
    fn set_conn_info(&mut self, info: Bytes) {
        self.ctx.conn_info = Some(info.clone());
        self.info = Arc::new(ClientInfo {
            conn_info: Some(info),
            ..(*self.info).clone()
        });
    }
}

#[derive(Debug)]
struct SessionSub {
    sub: Arc<Subscription>,
    /// Identity with this channel's `chan_info`.
    info: Arc<ClientInfo>,
    presence: bool,
    join_leave: bool,
    /// When the subscription token expires (client-side subscriptions with an expiring token),
    /// on the session's one clock (tokio time).
    expire_at: Option<tokio::time::Instant>,
    /// Lifetime of this channel's delivery cursor, when it has one.
    cursor_ttl: Option<Duration>,
    /// Offset last saved to the cursor (saves only move it forward).
    confirmed: u64,
    /// The server refreshes this subscription at expiry (instead of the client's sub_refresh).
    server_refresh: bool,
    /// The subscription entered presence maps (left at detach).
    presence_maps: bool,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    node: Node,
    client: Arc<ClientHandle>,
    transport: &'static str,
    /// Bidirectional, emulated or unidirectional.
    kind: crate::transport::ConnectionKind,
    /// Forwardable HTTP headers of the upgrade request.
    headers: crate::transport::Headers,
    /// The client's address, when the transport knows it.
    ip: Option<std::net::IpAddr>,
    /// On a unidirectional connection, the error code that refused its connect (the client
    /// gets a disconnect instead of an error reply); 0 = none.
    uni_refusal: std::sync::atomic::AtomicU32,
    state: State,
    bucket: crate::limit::TokenBucket,
}

fn reply_bytes(enc: Encoding, id: u32, body: &ReplyBody) -> Bytes {
    let mut out = Vec::with_capacity(64);
    enc.encode_reply(&mut out, id, body);
    out.into()
}

fn push_bytes(enc: Encoding, p: &Push<'_>) -> Bytes {
    let mut out = Vec::with_capacity(64);
    enc.encode_push(&mut out, p);
    out.into()
}

/// Whether a reply carrying these publications can go to a connection of this encoding.
fn sendable(enc: Encoding, pubs: &[Arc<holdfast_protocol::Publication>]) -> bool {
    enc != Encoding::Json || !pubs.iter().any(|p| p.binary)
}

impl Session {
    /// A session for a newly accepted connection.
    pub fn new(
        node: Node,
        client: Arc<ClientHandle>,
        meta: crate::transport::ConnectionMeta,
    ) -> Self {
        Self {
            client,
            transport: meta.transport,
            kind: meta.kind,
            bucket: crate::limit::TokenBucket::new(node.config().client.command_burst),
            headers: meta.headers,
            ip: meta.ip,
            uni_refusal: std::sync::atomic::AtomicU32::new(0),
            state: State::New,
            node,
        }
    }

    /// The transport's name.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// The node this session belongs to.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The connection's shared handle.
    pub fn client(&self) -> &Arc<ClientHandle> {
        &self.client
    }

    /// Handles one transport frame (one or more commands). An `Err` closes the connection.
    pub async fn handle_frame(&mut self, frame: &[u8]) -> Result<(), Disconnect> {
        let commands = self.client.encoding().decode_frame(frame).map_err(|e| {
            tracing::info!(client = %self.client.id(), error = %e, "bad frame");
            Disconnect::BAD_REQUEST
        })?;
        for cmd in commands {
            let cmd = cmd.map_err(|e| {
                tracing::info!(client = %self.client.id(), user = self.client.user(), error = %e, "bad command");
                Disconnect::BAD_REQUEST
            })?;
            self.node
                .stats()
                .messages_received
                .fetch_add(1, Ordering::Relaxed);
            self.handle_control().await?;
            if self.client.is_closing() {
                return Ok(());
            }
            let method = cmd.request.method();
            let limits = &self.node.config().client;
            if limits.command_rate_limit > 0
                && !self.bucket.take(
                    limits.command_rate_limit,
                    limits.command_burst,
                    tokio::time::Instant::now(),
                )
            {
                metrics::counter!("holdfast_limit_rejections_total", "limit" => "command_rate")
                    .increment(1);
                if self.bucket.refused_in_a_row() >= limits.command_excess_disconnect {
                    tracing::warn!(client = %self.client.id(), user = self.client.user(), "command rate exceeded persistently: closing with 3013");
                    return Err(Disconnect::TOO_MANY_REQUESTS);
                }
                tracing::debug!(client = %self.client.id(), user = self.client.user(), method, "command rate exceeded");
                if cmd.id != 0 {
                    self.reply_error(cmd.id, ErrorReply::TOO_MANY_REQUESTS);
                }
                continue;
            }
            let started = Instant::now();
            let res = self.handle_command(cmd).await;
            let elapsed = started.elapsed().as_secs_f64();
            metrics::histogram!("holdfast_command_duration_seconds", "method" => method)
                .record(elapsed);
            if method == "connect" {
                metrics::histogram!("holdfast_connect_duration_seconds").record(elapsed);
            }
            res?;
        }
        Ok(())
    }

    /// Applies pending control messages (server unsubscribe, lost subscriptions, API subscribe).
    pub async fn handle_control(&mut self) -> Result<(), Disconnect> {
        while let Some(c) = self.client.take_control() {
            let State::Connected(conn) = &mut self.state else {
                continue;
            };
            match c {
                Control::SubscriptionLost { channel } => {
                    if let Some(s) = conn.subs.get(&channel) {
                        if s.sub.server_side {
                            continue;
                        }
                        if let Some(s) = conn.subs.remove(&channel) {
                            detach(&self.node, &self.client, s).await;
                            emit_unsubscribed(&self.node, &self.client, &conn.ctx.user, &channel);
                        }
                    }
                }
                Control::Unsubscribe {
                    channel,
                    code,
                    reason,
                } => {
                    if let Some((ch, s)) = conn.subs.remove_entry(channel.as_str()) {
                        detach(&self.node, &self.client, s).await;
                        emit_unsubscribed(&self.node, &self.client, &conn.ctx.user, &ch);
                        self.client.send(push_bytes(
                            self.client.encoding(),
                            &Push::Unsubscribe {
                                channel: &channel,
                                code,
                                reason: &reason,
                            },
                        ));
                    }
                }
                Control::Subscribe(req) => self.server_subscribe(*req).await?,
                Control::Refresh { expire_at, info } => {
                    if let Some(info) = info {
                        conn.set_conn_info(info);
                    }
                    self.set_expiry(expire_at);
                }
            }
        }
        Ok(())
    }

    /// Earliest instant at which [`Session::on_timer`] has work (subscription expiry).
    pub fn next_deadline(&self) -> Option<tokio::time::Instant> {
        let State::Connected(conn) = &self.state else {
            return None;
        };
        let grace = self.node.config().client.expired_sub_close_delay;
        // Server-refreshed subscriptions are refreshed at expiry; client ones get a grace.
        let subs = conn
            .subs
            .values()
            .filter_map(|s| {
                Some(
                    s.expire_at?
                        + if s.server_refresh {
                            Duration::ZERO
                        } else {
                            grace
                        },
                )
            })
            .min();
        [subs, conn.refresh_at].into_iter().flatten().min()
    }

    fn reply(&self, id: u32, body: ReplyBody) {
        self.client
            .send(reply_bytes(self.client.encoding(), id, &body));
    }

    fn reply_error(&self, id: u32, e: ErrorReply) {
        self.node.stats().errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("holdfast_reply_errors_total", "code" => e.code.to_string()).increment(1);
        tracing::debug!(client = %self.client.id(), user = self.client.user(), code = e.code, "error reply");
        if self.kind.is_unidirectional() {
            // A unidirectional client reads no replies: its refused connect becomes a
            // disconnect (see `connect_code_to_unidirectional_disconnect`).
            self.uni_refusal.store(e.code.max(1), Ordering::Relaxed);
            return;
        }
        self.reply(id, ReplyBody::Error(e));
    }

    /// Replies with the hook's error, or closes for its disconnect.
    fn refuse(&self, id: u32, e: HandlerError) -> Result<(), Disconnect> {
        match e {
            HandlerError::Reply(e) => {
                self.reply_error(id, e);
                Ok(())
            }
            HandlerError::Disconnect(d) => Err(d),
        }
    }

    /// Refuses (103) a client command on a user-limited channel that does not name this
    /// connection's user: another user's personal channel is never reachable, whatever the
    /// namespace's `allow_*` options, a token or a proxy say. Returns true when refused.
    fn refused_foreign(&self, id: u32, resolved: &ResolvedChannel, channel: &str) -> bool {
        let user = self.client.user();
        if !resolved.refuses_user(channel, user) {
            return false;
        }
        tracing::info!(client = %self.client.id(), user, channel, "refused: a channel limited to other users");
        metrics::counter!("holdfast_foreign_channel_refusals_total").increment(1);
        self.reply_error(id, ErrorReply::PERMISSION_DENIED);
        true
    }

    async fn handle_command(&mut self, cmd: Command) -> Result<(), Disconnect> {
        let id = cmd.id;
        match (&self.state, cmd.request) {
            (State::New, Request::Connect(req)) => {
                self.connect(id, req).await?;
                match self.uni_refusal.load(Ordering::Relaxed) {
                    0 => Ok(()),
                    code => Err(self
                        .node
                        .config()
                        .client
                        .connect_code_to_unidirectional_disconnect
                        .disconnect_for(code)),
                }
            }
            (State::New, _) => {
                tracing::info!(client = %self.client.id(), "first command is not connect");
                Err(Disconnect::BAD_REQUEST)
            }
            (State::Unusable, _) => Err(Disconnect::BAD_REQUEST),
            (State::Connected(_), Request::Connect(_)) => {
                tracing::info!(client = %self.client.id(), "client already authenticated");
                Err(Disconnect::BAD_REQUEST)
            }
            (State::Connected(_), Request::Pong) => {
                if self.client.pong_received() {
                    self.confirm_cursors().await;
                    if self.client.cursor_pending() {
                        // Deliveries after the answered ping's snapshot: schedule the next one.
                        self.client.wake_writer();
                    }
                    Ok(())
                } else {
                    tracing::info!(client = %self.client.id(), "unnecessary pong");
                    Err(Disconnect::BAD_REQUEST)
                }
            }
            (State::Connected(_), Request::Subscribe(req)) => self.subscribe(id, req).await,
            (State::Connected(_), Request::Unsubscribe { channel }) => {
                self.unsubscribe(id, &channel).await
            }
            (State::Connected(_), Request::Publish(req)) if req.pub_type == 1 => {
                self.map_write(id, req).await
            }
            (State::Connected(_), Request::Publish(req)) => {
                self.publish(id, &req.channel, req.data).await
            }
            (State::Connected(_), Request::Presence { channel }) => {
                self.presence(id, &channel, false).await
            }
            (State::Connected(_), Request::PresenceStats { channel }) => {
                self.presence(id, &channel, true).await
            }
            (State::Connected(_), Request::History(req)) => self.history(id, req).await,
            (State::Connected(_), Request::Send { data }) => self.send(data).await,
            (State::Connected(_), Request::Rpc { method, data }) => {
                self.rpc(id, &method, data).await
            }
            (State::Connected(_), Request::Refresh { token }) => self.refresh(id, &token).await,
            (State::Connected(_), Request::SubRefresh { channel, token }) => {
                self.sub_refresh(id, &channel, &token).await
            }
        }
    }

    fn conn(&self) -> Result<&Connected, Disconnect> {
        match &self.state {
            State::Connected(c) => Ok(c),
            _ => Err(Disconnect::BAD_REQUEST),
        }
    }

    fn conn_mut(&mut self) -> Result<&mut Connected, Disconnect> {
        match &mut self.state {
            State::Connected(c) => Ok(c),
            _ => Err(Disconnect::BAD_REQUEST),
        }
    }

    fn set_expiry(&self, expire_at: Option<i64>) {
        self.client.set_expires_at(expire_at.map(at_unix));
    }

    /// Ends the session: every subscription is detached and the connection unregistered.
    pub async fn close(mut self) {
        let state = std::mem::replace(&mut self.state, State::Unusable);
        if let State::Connected(mut conn) = state {
            for (_, s) in conn.subs.drain() {
                detach(&self.node, &self.client, s).await;
            }
            self.node.hub().remove_client(&self.client, &conn.ctx.user);
            let d = self
                .client
                .closing_reason()
                .unwrap_or(Disconnect::CONNECTION_CLOSED);
            self.node
                .hooks()
                .lifecycle(crate::handler::LifecycleEvent::Disconnected {
                    client: self.client.id.clone(),
                    user: conn.ctx.user.clone(),
                    code: d.code,
                    reason: d.reason.into_owned(),
                });
        }
    }
}

/// The session's clock (tokio time) at a unix time in seconds, as tokens give expiries: the
/// wall clock is read once, here, and everything after runs on tokio time, so tests under
/// paused time can run hours of protocol in milliseconds.
fn at_unix(secs: i64) -> tokio::time::Instant {
    tokio::time::Instant::now()
        + Duration::from_secs(secs.saturating_sub(unix_secs()).max(0) as u64)
}

/// Reports an unsubscribe (the connection stays) to the lifecycle hook.
fn emit_unsubscribed(node: &Node, client: &ClientHandle, user: &Arc<str>, channel: &Arc<str>) {
    node.hooks()
        .lifecycle(crate::handler::LifecycleEvent::Unsubscribed {
            client: client.id.clone(),
            user: user.clone(),
            channel: channel.clone(),
        });
}

/// Ends a subscription: no more deliveries, presence and leave.
async fn detach(node: &Node, client: &Arc<ClientHandle>, s: SessionSub) {
    s.sub.kill();
    node.remove_subscription(&s.sub.channel, client.seq).await;
    if s.presence_maps {
        node.presence_maps_leave(&s.sub.channel, &s.info).await;
    }
    if s.presence
        && let Err(e) = node
            .presence_store()
            .remove_presence(&s.sub.channel, client.id())
            .await
    {
        tracing::warn!(channel = %s.sub.channel, error = %e, "presence remove failed");
    }
    if s.join_leave
        && let Err(e) = node
            .broker()
            .publish_leave(&s.sub.channel, s.info.clone())
            .await
    {
        tracing::warn!(channel = %s.sub.channel, error = %e, "leave publish failed");
    }
}
