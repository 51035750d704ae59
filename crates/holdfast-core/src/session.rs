//! The per-connection state machine: connect first, then commands in order.
//!
//! A [`Session`] is owned by its connection's reader; it holds no lock across an await. What
//! other parts of the node must tell it (server unsubscribe, a gap found by fan-out) arrives as
//! control messages on its [`ClientHandle`], handled before the next command.

use crate::channel::{ChannelRules, ResolvedChannel};
use crate::client::{ClientHandle, Control};
use crate::config::ChannelOptions;
use crate::engine::HistoryQuery;
use crate::handler::{
    ChannelEvent, ChannelOverride, ClientContext, ConnectEvent, HandlerError, SubscribeEvent,
};
use crate::hub::{GoLive, Subscription};
use crate::node::{Node, PublishRequest, engine_error, unix_secs};
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

/// A server-side subscription requested through the server API.
#[derive(Debug, Clone, Default)]
pub struct ServerSubscribe {
    /// Channel name.
    pub channel: String,
    /// Channel info (`chan_info`).
    pub info: Option<Bytes>,
    /// Data sent with the `subscribe` push.
    pub data: Option<Bytes>,
    /// Recover from this position (offset, epoch) and deliver the missed publications.
    pub recover_since: Option<(u64, String)>,
    /// Option overrides.
    pub overrides: ChannelOverride,
}

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
    /// When the subscription token expires (client-side subscriptions with an expiring token).
    expire_at: Option<i64>,
    /// Lifetime of this channel's delivery cursor, when it has one.
    cursor_ttl: Option<Duration>,
    /// Offset last saved to the cursor (saves only move it forward).
    confirmed: u64,
    /// The server refreshes this subscription at expiry (instead of the client's sub_refresh).
    server_refresh: bool,
}

/// Everything decided about a subscription before it is attached.
#[derive(Debug)]
struct Plan {
    channel: Arc<str>,
    options: ChannelOptions,
    server_side: bool,
    positioned: bool,
    recoverable: bool,
    push_join_leave: bool,
    /// Recover from this position.
    recover: Option<(u64, String)>,
    /// The client asked to recover (reported as `was_recovering`).
    was_recovering: bool,
    reject_unrecovered: bool,
    data: Option<Bytes>,
    chan_info: Option<Bytes>,
    expire_at: Option<i64>,
    /// Keep a delivery cursor for the user.
    cursor: bool,
    /// Offset the user's cursor held when the subscription was planned (0 = none).
    cursor_from: u64,
}

/// A subscription attached to the hub, its reply not yet queued.
#[derive(Debug)]
struct Attached {
    sub: Arc<Subscription>,
    result: SubscribeResult,
    /// Position the client holds once the reply is applied.
    live_offset: u64,
    live_epoch: Arc<str>,
    plan: Plan,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    node: Node,
    client: Arc<ClientHandle>,
    transport: &'static str,
    /// Forwardable HTTP headers of the upgrade request.
    headers: crate::transport::Headers,
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
        transport: &'static str,
        headers: crate::transport::Headers,
    ) -> Self {
        Self {
            client,
            transport,
            bucket: crate::limit::TokenBucket::new(node.config().client.command_burst),
            headers,
            state: State::New,
            node,
        }
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
                    Instant::now(),
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
        let subs = conn
            .subs
            .values()
            .filter_map(|s| {
                let at = s.expire_at?;
                let wait = Duration::from_secs(at.saturating_sub(unix_secs()).max(0) as u64);
                // Server-refreshed subscriptions are refreshed at expiry; client ones get a grace.
                Some(
                    tokio::time::Instant::now()
                        + wait
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

    /// Timed work: server-side refreshes of the connection and of subscriptions, and
    /// unsubscribing subscriptions whose token expired without a `sub_refresh` (push 2501).
    pub async fn on_timer(&mut self) {
        self.refresh_connection().await;
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let grace = self.node.config().client.expired_sub_close_delay.as_secs() as i64;
        let now = unix_secs();
        let due: Vec<(Arc<str>, bool)> = conn
            .subs
            .iter()
            .filter(|(_, s)| {
                s.expire_at
                    .is_some_and(|e| e + if s.server_refresh { 0 } else { grace } <= now)
            })
            .map(|(ch, s)| (ch.clone(), s.server_refresh))
            .collect();
        let ctx = conn.ctx.clone();
        let mut expired = Vec::new();
        for (ch, server) in due {
            if !server {
                expired.push(ch);
                continue;
            }
            match self.node.handler().on_server_sub_refresh(&ctx, &ch).await {
                Ok(r) if r.expired => expired.push(ch),
                Ok(r) => {
                    if let Ok(conn) = self.conn_mut()
                        && let Some(s) = conn.subs.get_mut(&ch)
                    {
                        s.expire_at = r.expire_at;
                    }
                }
                Err(e) => {
                    tracing::warn!(client = %self.client.id(), channel = %ch, error = ?e, "subscription refresh failed; retrying in 10s");
                    if let Ok(conn) = self.conn_mut()
                        && let Some(s) = conn.subs.get_mut(&ch)
                    {
                        s.expire_at = Some(unix_secs() + 10);
                    }
                }
            }
        }
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let user = conn.ctx.user.clone();
        for ch in expired {
            if let Some(s) = conn.subs.remove(&ch) {
                detach(&self.node, &self.client, s).await;
                emit_unsubscribed(&self.node, &self.client, &user, &ch);
                let (code, reason) = unsubscribe::EXPIRED;
                self.client.send(push_bytes(
                    self.client.encoding(),
                    &Push::Unsubscribe {
                        channel: &ch,
                        code,
                        reason,
                    },
                ));
            }
        }
    }

    /// Refreshes the connection's credentials on the server side when due.
    async fn refresh_connection(&mut self) {
        let Ok(conn) = self.conn() else { return };
        if conn
            .refresh_at
            .is_none_or(|at| at > tokio::time::Instant::now())
        {
            return;
        }
        let ctx = conn.ctx.clone();
        let res = self.node.handler().on_server_refresh(&ctx).await;
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        match res {
            Ok(r) if r.expired => {
                conn.refresh_at = None;
                tracing::info!(client = %self.client.id(), user = %ctx.user, "connection refresh: expired");
                self.client.close(Disconnect::EXPIRED);
            }
            Ok(r) => {
                conn.refresh_at = r.expire_at.map(at_unix);
                if let Some(info) = r.info {
                    conn.set_conn_info(info);
                }
            }
            Err(e) => {
                tracing::warn!(client = %self.client.id(), error = ?e, "connection refresh failed; retrying in 10s");
                conn.refresh_at = Some(tokio::time::Instant::now() + Duration::from_secs(10));
            }
        }
    }

    fn reply(&self, id: u32, body: ReplyBody) {
        self.client
            .send(reply_bytes(self.client.encoding(), id, &body));
    }

    fn reply_error(&self, id: u32, e: ErrorReply) {
        self.node.stats().errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("holdfast_reply_errors_total", "code" => e.code.to_string()).increment(1);
        tracing::debug!(client = %self.client.id(), user = self.client.user(), code = e.code, "error reply");
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
            (State::New, Request::Connect(req)) => self.connect(id, req).await,
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

    async fn connect(&mut self, id: u32, req: ConnectRequest) -> Result<(), Disconnect> {
        if !self.node.is_ready() {
            return Err(Disconnect::SHUTDOWN);
        }
        if req.name.len() > 64 || req.version.len() > 64 || req.subs.len() > 1024 {
            tracing::info!(client = %self.client.id(), "connect name, version or subs too long");
            return Err(Disconnect::BAD_REQUEST);
        }
        let cfg = self.node.config().clone();
        let ev = ConnectEvent {
            client: self.client.id.clone(),
            transport: self.transport,
            encoding: self.client.encoding(),
            token: req.token.clone(),
            data: req.data.clone(),
            name: req.name.clone(),
            version: req.version.clone(),
            headers: req.headers.clone(),
            http_headers: self.headers.clone(),
        };
        let decision = match self.node.handler().on_connecting(&ev).await {
            Ok(d) => d,
            Err(HandlerError::Reply(e)) => {
                self.reply_error(id, e);
                self.state = State::Unusable;
                return Ok(());
            }
            Err(HandlerError::Disconnect(d)) => return Err(d),
        };
        if decision.expire_at.is_some_and(|e| e <= unix_secs()) {
            self.reply_error(id, ErrorReply::EXPIRED);
            self.state = State::Unusable;
            return Ok(());
        }
        let user: Arc<str> = decision.user.as_str().into();
        let mut subs = decision.subs;
        let personal = &cfg.client.subscribe_to_user_personal_channel;
        if personal.enabled && !user.is_empty() {
            subs.entry(ChannelRules::personal_channel(
                &personal.personal_channel_namespace,
                &user,
            ))
            .or_default();
        }
        if subs.len() > cfg.client.channel_limit {
            return Err(Disconnect::CHANNEL_LIMIT);
        }
        // Resolve every server-side channel before registering anything.
        let mut resolved = Vec::with_capacity(subs.len());
        for (ch, opts) in subs {
            match self.node.rules().resolve(&ch) {
                Ok(r) => resolved.push((ch, opts, r)),
                Err(e) => {
                    tracing::info!(client = %self.client.id(), channel = %ch, code = e.code, "bad server-side channel");
                    self.reply_error(id, e);
                    self.state = State::Unusable;
                    return Ok(());
                }
            }
        }
        self.client.set_user(user.clone());
        let others = self
            .node
            .hub()
            .add_client(&self.client, &user, cfg.client.user_connection_limit)
            .map_err(|_| Disconnect::CONNECTION_LIMIT)?;
        if personal.single_connection && !user.is_empty() {
            for o in others {
                o.close(Disconnect::CONNECTION_LIMIT);
            }
        }
        let info = Arc::new(ClientInfo {
            user: user.clone(),
            client: self.client.id.clone(),
            conn_info: decision.info.clone(),
            chan_info: None,
        });
        self.state = State::Connected(Box::new(Connected {
            ctx: ClientContext {
                client: self.client.id.clone(),
                user: user.clone(),
                transport: self.transport,
                encoding: self.client.encoding(),
                conn_info: decision.info,
                meta: decision.meta,
                headers: self.headers.clone(),
            },
            info,
            subs: HashMap::new(),
            refresh_at: None,
        }));
        tracing::debug!(client = %self.client.id(), user = %user, "connected");

        let mut attached = Vec::new();
        for (ch, opts, r) in resolved {
            let options = opts.overrides.apply(&r.options);
            let history = options.history_enabled();
            let presented = req.subs.get(&ch).filter(|p| p.recover);
            let cursor = options.delivery_cursor && history && !user.is_empty();
            // Recoverable server-side subscriptions recover from the position the client
            // presents. A client that presents none starts at the current top, as on Centrifugo,
            // unless the namespace keeps delivery cursors: then it recovers from the user's
            // cursor (what reached the user on any device) or else from the stream start, so
            // what was published to a user before (or between) their connections is delivered.
            let saved = match (presented, cursor) {
                (None, true) => self.node.cursors().load_cursor(&user, &ch).await.unwrap_or_else(|e| {
                    tracing::warn!(channel = %ch, error = %e, "cursor load failed; recovering from the stream start");
                    None
                }),
                _ => None,
            };
            let cursor_from = saved.as_ref().map_or(0, |c| c.offset);
            let recover = match (presented, saved) {
                (Some(p), _) => Some((p.offset, p.epoch.clone())),
                (None, Some(c)) => Some((c.offset, c.epoch.to_string())),
                (None, None) => cursor.then(|| (0, String::new())),
            }
            .filter(|_| history && options.force_recovery);
            let plan = Plan {
                channel: ch.as_str().into(),
                positioned: history && (options.force_positioning || options.force_recovery),
                recoverable: history && options.force_recovery,
                push_join_leave: options.join_leave,
                was_recovering: recover.is_some(),
                recover,
                reject_unrecovered: false,
                data: opts.data,
                chan_info: opts.info,
                expire_at: None,
                server_side: true,
                cursor,
                cursor_from,
                options,
            };
            match self.attach(plan).await {
                Ok(a) => attached.push(a),
                Err(e) => {
                    for a in attached {
                        self.node
                            .remove_subscription(&a.sub.channel, self.client.seq)
                            .await;
                    }
                    self.node.hub().remove_client(&self.client, &user);
                    self.state = State::Unusable;
                    self.reply_error(id, e);
                    return Ok(());
                }
            }
        }
        let (ping, pong) = (
            cfg.client.ping_interval.as_secs() as u32,
            !cfg.client.pong_timeout.is_zero(),
        );
        let mut result = ConnectResult {
            client: self.client.id.to_string(),
            version: self.node.version().to_string(),
            data: decision.data,
            ping,
            pong,
            time: if cfg.client.connect_include_server_time {
                crate::node::unix_ms()
            } else {
                0
            },
            ..Default::default()
        };
        // With server-side refresh the client is not told about expiry: the server renews it.
        let server_refresh =
            decision.expire_at.is_some() && self.node.handler().refreshes_connections();
        if let Some(exp) = decision.expire_at.filter(|_| !server_refresh) {
            result.expires = true;
            result.ttl = (exp - unix_secs()).clamp(0, i64::from(u32::MAX)) as u32;
        }
        result.subs = attached
            .iter()
            .map(|a| (a.sub.channel.to_string(), a.result.clone()))
            .collect();
        if !attached
            .iter()
            .all(|a| sendable(self.client.encoding(), &a.result.publications))
        {
            // Not yet in the session's subscriptions: `close` would not find them.
            for a in attached {
                self.node
                    .remove_subscription(&a.sub.channel, self.client.seq)
                    .await;
            }
            return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
        }
        self.reply(id, ReplyBody::Connect(Box::new(result)));
        if server_refresh {
            if let Ok(conn) = self.conn_mut() {
                conn.refresh_at = decision.expire_at.map(at_unix);
            }
        } else {
            self.set_expiry(decision.expire_at);
        }
        self.client.set_connected();
        self.node
            .handler()
            .on_lifecycle(crate::handler::LifecycleEvent::Connected {
                client: self.client.id.clone(),
                user: user.clone(),
                transport: self.transport,
            });
        for a in attached {
            self.go_live(a).await;
        }
        Ok(())
    }

    fn set_expiry(&self, expire_at: Option<i64>) {
        let at = expire_at.map(|e| {
            let secs = (e - unix_secs()).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_secs(secs)
        });
        self.client.set_expires_at(at);
    }

    /// Registers the subscription (buffering deliveries) and reads the position or the
    /// publications to recover.
    async fn attach(&mut self, plan: Plan) -> Result<Attached, ErrorReply> {
        let sub = Subscription::new(
            self.client.clone(),
            plan.channel.clone(),
            plan.server_side,
            plan.push_join_leave,
            self.node.config().client.queue_max_size,
        );
        self.node.add_subscription(sub.clone()).await.map_err(|e| {
            tracing::warn!(channel = %plan.channel, error = %e, "broker subscribe failed");
            ErrorReply::INTERNAL
        })?;
        let mut result = SubscribeResult {
            recoverable: plan.recoverable,
            positioned: plan.positioned,
            was_recovering: plan.was_recovering,
            data: plan.data.clone(),
            ..Default::default()
        };
        if let Some(exp) = plan.expire_at {
            result.expires = true;
            result.ttl = (exp - unix_secs()).clamp(0, i64::from(u32::MAX)) as u32;
        }
        let mut live_offset = 0;
        let mut live_epoch: Arc<str> = Arc::from("");
        if plan.options.history_enabled() && (plan.positioned || plan.recoverable) {
            let max = self.node.config().client.recovery_max_publication_limit;
            let meta_ttl = self.node.rules().meta_ttl(&plan.options);
            let read = match &plan.recover {
                Some((offset, epoch)) => {
                    let q = HistoryQuery {
                        since: Some((*offset, epoch.clone())),
                        limit: Some(max + 1),
                        reverse: false,
                        meta_ttl,
                    };
                    match self.node.broker().history(&plan.channel, &q).await {
                        Ok(page) => {
                            let pubs = &page.publications;
                            let top = page.top.offset;
                            let recovered = if pubs.is_empty() {
                                top == *offset
                            } else {
                                pubs.len() <= max
                                    && pubs[0].offset == offset + 1
                                    && pubs.last().is_some_and(|p| p.offset == top)
                            };
                            Ok(Some((page, recovered)))
                        }
                        Err(crate::engine::EngineError::UnrecoverablePosition) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
                None => Ok(None),
            };
            let read = match read {
                Ok(r) => r,
                Err(e) => {
                    self.node
                        .remove_subscription(&plan.channel, self.client.seq)
                        .await;
                    return Err(engine_error(e));
                }
            };
            match read {
                Some((page, true)) => {
                    metrics::counter!("holdfast_recover_total", "outcome" => "recovered")
                        .increment(1);
                    metrics::counter!("holdfast_recovered_publications_total")
                        .increment(page.publications.len() as u64);
                    result.recovered = true;
                    result.offset = plan.recover.as_ref().map_or(0, |r| r.0);
                    result.epoch = page.top.epoch.to_string();
                    live_offset = page.top.offset;
                    live_epoch = page.top.epoch;
                    result.publications = page.publications;
                }
                other => {
                    let top = match other {
                        Some((page, false)) => page.top,
                        _ => {
                            let q = HistoryQuery {
                                since: None,
                                limit: Some(0),
                                reverse: false,
                                meta_ttl,
                            };
                            match self.node.broker().history(&plan.channel, &q).await {
                                Ok(p) => p.top,
                                Err(e) => {
                                    self.node
                                        .remove_subscription(&plan.channel, self.client.seq)
                                        .await;
                                    return Err(engine_error(e));
                                }
                            }
                        }
                    };
                    if plan.recover.is_some() {
                        metrics::counter!("holdfast_recover_total", "outcome" => "not_recovered")
                            .increment(1);
                        if plan.reject_unrecovered {
                            self.node
                                .remove_subscription(&plan.channel, self.client.seq)
                                .await;
                            return Err(ErrorReply::UNRECOVERABLE_POSITION);
                        }
                    }
                    result.offset = top.offset;
                    result.epoch = top.epoch.to_string();
                    live_offset = top.offset;
                    live_epoch = top.epoch;
                }
            }
        }
        Ok(Attached {
            sub,
            result,
            live_offset,
            live_epoch,
            plan,
        })
    }

    /// After the reply is queued: buffered deliveries follow it, presence and join are
    /// published, and the subscription is recorded.
    async fn go_live(&mut self, a: Attached) {
        let Attached {
            sub,
            live_offset,
            live_epoch,
            plan,
            ..
        } = a;
        match sub.go_live(plan.positioned, live_offset, &live_epoch) {
            GoLive::Ok => {}
            GoLive::Dead => {
                self.node
                    .remove_subscription(&plan.channel, self.client.seq)
                    .await;
                return;
            }
            GoLive::Binary => {
                self.node
                    .remove_subscription(&plan.channel, self.client.seq)
                    .await;
                self.client.close(Disconnect::INAPPROPRIATE_PROTOCOL);
                return;
            }
            GoLive::Gap => {
                metrics::counter!("holdfast_insufficient_state_total").increment(1);
                self.node
                    .remove_subscription(&plan.channel, self.client.seq)
                    .await;
                if plan.server_side {
                    self.client.close(Disconnect::INSUFFICIENT_STATE);
                } else {
                    let (code, reason) = unsubscribe::INSUFFICIENT_STATE;
                    self.client.send(push_bytes(
                        self.client.encoding(),
                        &Push::Unsubscribe {
                            channel: &plan.channel,
                            code,
                            reason,
                        },
                    ));
                }
                return;
            }
        }
        if plan.cursor {
            sub.set_cursor();
            self.client.track_cursor(&sub);
            // What the reply (or the buffer after it) delivered is confirmed promptly too.
            if sub
                .live_position()
                .is_some_and(|(o, _)| o != plan.cursor_from)
            {
                self.client.note_cursor_delivery();
            }
        }
        let cursor_ttl = plan
            .cursor
            .then(|| self.node.rules().meta_ttl(&plan.options));
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let info = if plan.chan_info.is_some() {
            Arc::new(ClientInfo {
                chan_info: plan.chan_info.clone(),
                ..(*conn.info).clone()
            })
        } else {
            conn.info.clone()
        };
        let s = SessionSub {
            sub,
            info: info.clone(),
            presence: plan.options.presence,
            join_leave: plan.options.join_leave,
            expire_at: plan.expire_at,
            cursor_ttl,
            confirmed: 0,
            server_refresh: plan.expire_at.is_some()
                && !plan.server_side
                && self.node.handler().refreshes_subscriptions(&plan.options),
        };
        conn.subs.insert(plan.channel.clone(), s);
        self.node
            .handler()
            .on_lifecycle(crate::handler::LifecycleEvent::Subscribed {
                client: self.client.id.clone(),
                user: conn.ctx.user.clone(),
                channel: plan.channel.clone(),
            });
        if plan.options.presence
            && let Err(e) = self
                .node
                .presence_store()
                .add_presence(&plan.channel, info.clone())
                .await
        {
            tracing::warn!(channel = %plan.channel, error = %e, "presence add failed");
        }
        if plan.options.join_leave
            && let Err(e) = self.node.broker().publish_join(&plan.channel, info).await
        {
            tracing::warn!(channel = %plan.channel, error = %e, "join publish failed");
        }
    }

    async fn subscribe(&mut self, id: u32, req: SubscribeRequest) -> Result<(), Disconnect> {
        if req.channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let limit = self.node.config().client.channel_limit;
        let conn = self.conn()?;
        if conn.subs.contains_key(req.channel.as_str()) {
            self.reply_error(id, ErrorReply::ALREADY_SUBSCRIBED);
            return Ok(());
        }
        if conn.subs.len() >= limit {
            self.reply_error(id, ErrorReply::LIMIT_EXCEEDED);
            return Ok(());
        }
        let resolved = match self.node.rules().resolve(&req.channel) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if self.refused_foreign(id, &resolved, &req.channel) {
            return Ok(());
        }
        let ctx = conn.ctx.clone();
        let ev = SubscribeEvent {
            channel: &req.channel,
            token: &req.token,
            data: req.data.as_ref(),
            options: &resolved.options,
            private: resolved.private,
        };
        let decision = match self.node.handler().on_subscribe(&ctx, &ev).await {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        if decision.expire_at.is_some_and(|e| e <= unix_secs()) {
            self.reply_error(id, ErrorReply::TOKEN_EXPIRED);
            return Ok(());
        }
        let options = decision.overrides.apply(&resolved.options);
        let history = options.history_enabled();
        let chan_ev = ChannelEvent {
            channel: &req.channel,
            options: &options,
            subscribed: true,
        };
        let wants_history_perm = history
            && ((req.recoverable && !options.force_recovery && !options.allow_recovery)
                || (req.positioned && !options.force_positioning && !options.allow_positioning));
        let history_perm =
            wants_history_perm && self.node.handler().on_history(&ctx, &chan_ev).await.is_ok();
        let recoverable = history
            && (options.force_recovery
                || (req.recoverable && (options.allow_recovery || history_perm)));
        let positioned = history
            && (recoverable
                || options.force_positioning
                || (req.positioned && (options.allow_positioning || history_perm)));
        let push_join_leave = options.join_leave
            && (options.force_push_join_leave
                || (req.join_leave
                    && self
                        .node
                        .handler()
                        .on_presence(&ctx, &chan_ev)
                        .await
                        .is_ok()));
        let plan = Plan {
            channel: req.channel.as_str().into(),
            server_side: false,
            positioned,
            recoverable,
            push_join_leave,
            recover: (req.recover && recoverable).then(|| (req.offset, req.epoch.clone())),
            was_recovering: req.recover,
            reject_unrecovered: req.flag & SubscribeRequest::FLAG_REJECT_UNRECOVERED != 0,
            data: decision.data,
            chan_info: decision.info,
            expire_at: decision.expire_at,
            cursor: false,
            cursor_from: 0,
            options,
        };
        let a = match self.attach(plan).await {
            Ok(a) => a,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if !sendable(self.client.encoding(), &a.result.publications) {
            self.node
                .remove_subscription(&a.plan.channel, self.client.seq)
                .await;
            return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
        }
        metrics::counter!("holdfast_subscriptions_accepted_total").increment(1);
        self.reply(id, ReplyBody::Subscribe(Box::new(a.result.clone())));
        self.go_live(a).await;
        Ok(())
    }

    async fn server_subscribe(&mut self, req: ServerSubscribe) -> Result<(), Disconnect> {
        let State::Connected(conn) = &self.state else {
            return Ok(());
        };
        if conn.subs.contains_key(req.channel.as_str()) {
            return Ok(());
        }
        if conn.subs.len() >= self.node.config().client.channel_limit {
            tracing::info!(client = %self.client.id(), channel = %req.channel, "server subscribe over channel limit");
            return Ok(());
        }
        let Ok(resolved) = self.node.rules().resolve(&req.channel) else {
            return Ok(());
        };
        let options = req.overrides.apply(&resolved.options);
        let history = options.history_enabled();
        let plan = Plan {
            channel: req.channel.as_str().into(),
            server_side: true,
            positioned: history && (options.force_positioning || options.force_recovery),
            recoverable: history && options.force_recovery,
            push_join_leave: options.join_leave,
            recover: req.recover_since.clone().filter(|_| history),
            was_recovering: req.recover_since.is_some(),
            reject_unrecovered: false,
            data: req.data,
            chan_info: req.info,
            expire_at: None,
            cursor: false,
            cursor_from: 0,
            options,
        };
        let a = match self.attach(plan).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(client = %self.client.id(), channel = %req.channel, code = e.code, "server subscribe failed");
                return Ok(());
            }
        };
        if !sendable(self.client.encoding(), &a.result.publications) {
            self.node
                .remove_subscription(&a.plan.channel, self.client.seq)
                .await;
            return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
        }
        let mut push_result = a.result.clone();
        let pubs = std::mem::take(&mut push_result.publications);
        self.client.send(push_bytes(
            self.client.encoding(),
            &Push::Subscribe {
                channel: &a.plan.channel,
                result: &push_result,
            },
        ));
        for p in &pubs {
            self.client.send(push_bytes(
                self.client.encoding(),
                &Push::Pub {
                    channel: &a.plan.channel,
                    publication: p,
                },
            ));
        }
        self.go_live(a).await;
        Ok(())
    }

    async fn unsubscribe(&mut self, id: u32, channel: &str) -> Result<(), Disconnect> {
        if channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let State::Connected(conn) = &mut self.state else {
            return Err(Disconnect::BAD_REQUEST);
        };
        if let Some((ch, s)) = conn.subs.remove_entry(channel) {
            detach(&self.node, &self.client, s).await;
            emit_unsubscribed(&self.node, &self.client, &conn.ctx.user, &ch);
        }
        self.reply(id, ReplyBody::Unsubscribe);
        Ok(())
    }

    async fn publish(&mut self, id: u32, channel: &str, data: Bytes) -> Result<(), Disconnect> {
        if channel.is_empty() || data.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let resolved = match self.node.rules().resolve(channel) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if self.refused_foreign(id, &resolved, channel) {
            return Ok(());
        }
        let conn = self.conn()?;
        let sub = conn.subs.get(channel);
        let ev = ChannelEvent {
            channel,
            options: &resolved.options,
            subscribed: sub.is_some(),
        };
        let info = sub.map_or_else(|| conn.info.clone(), |s| s.info.clone());
        let ctx = conn.ctx.clone();
        let decision = match self.node.handler().on_publish(&ctx, &ev, &data).await {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let data = decision.data.unwrap_or(data);
        // JSON ingress is validated JSON; protobuf payloads are checked once here so JSON
        // subscribers know whether they can receive them.
        let binary = self.client.encoding() == Encoding::Protobuf && !json::is_json(&data);
        let req = PublishRequest {
            data,
            binary,
            info: Some(info),
            skip_history: decision.skip_history,
            tags: None,
            idempotency_key: None,
        };
        match self.node.publish(channel, req).await {
            Ok(_) => self.reply(id, ReplyBody::Publish),
            Err(e) => self.reply_error(id, e),
        }
        Ok(())
    }

    async fn presence(&mut self, id: u32, channel: &str, stats: bool) -> Result<(), Disconnect> {
        if channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let resolved = match self.node.rules().resolve(channel) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if self.refused_foreign(id, &resolved, channel) {
            return Ok(());
        }
        if !resolved.options.presence {
            self.reply_error(id, ErrorReply::NOT_AVAILABLE);
            return Ok(());
        }
        let conn = self.conn()?;
        let ev = ChannelEvent {
            channel,
            options: &resolved.options,
            subscribed: conn.subs.contains_key(channel),
        };
        let ctx = conn.ctx.clone();
        if let Err(e) = self.node.handler().on_presence(&ctx, &ev).await {
            return self.refuse(id, e);
        }
        let store = self.node.presence_store();
        let body = if stats {
            store
                .presence_stats(channel)
                .await
                .map(|(num_clients, num_users)| ReplyBody::PresenceStats {
                    num_clients,
                    num_users,
                })
        } else {
            store.presence(channel).await.map(ReplyBody::Presence)
        };
        match body {
            Ok(b) => self.reply(id, b),
            Err(e) => self.reply_error(id, engine_error(e)),
        }
        Ok(())
    }

    async fn history(&mut self, id: u32, req: HistoryRequest) -> Result<(), Disconnect> {
        if req.channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let resolved = match self.node.rules().resolve(&req.channel) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if self.refused_foreign(id, &resolved, &req.channel) {
            return Ok(());
        }
        if !resolved.options.history_enabled() {
            self.reply_error(id, ErrorReply::NOT_AVAILABLE);
            return Ok(());
        }
        let conn = self.conn()?;
        let ev = ChannelEvent {
            channel: &req.channel,
            options: &resolved.options,
            subscribed: conn.subs.contains_key(req.channel.as_str()),
        };
        let ctx = conn.ctx.clone();
        if let Err(e) = self.node.handler().on_history(&ctx, &ev).await {
            return self.refuse(id, e);
        }
        let max = self.node.config().client.history_max_publication_limit;
        let limit = match req.limit {
            0 => Some(0),
            l if l < 0 => Some(max),
            l => Some((l as usize).min(max)),
        };
        let since = req.since.map(|s| (s.offset, s.epoch));
        match self
            .node
            .history(&req.channel, since, limit, req.reverse)
            .await
        {
            Ok(page) if !sendable(self.client.encoding(), &page.publications) => {
                return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
            }
            Ok(page) => self.reply(
                id,
                ReplyBody::History(Box::new(HistoryResult {
                    publications: page.publications,
                    epoch: page.top.epoch.to_string(),
                    offset: page.top.offset,
                })),
            ),
            Err(e) => self.reply_error(id, e),
        }
        Ok(())
    }

    async fn send(&mut self, data: Bytes) -> Result<(), Disconnect> {
        let ctx = self.conn()?.ctx.clone();
        match self.node.handler().on_send(&ctx, &data).await {
            Ok(()) => Ok(()),
            Err(HandlerError::Disconnect(d)) => Err(d),
            Err(HandlerError::Reply(e)) => {
                tracing::debug!(client = %self.client.id(), code = e.code, "send refused");
                Ok(())
            }
        }
    }

    async fn rpc(&mut self, id: u32, method: &str, data: Bytes) -> Result<(), Disconnect> {
        if method == ACK_METHOD {
            match self.ack(&data).await {
                Ok(()) => self.reply(id, ReplyBody::Rpc(Some(Bytes::from_static(b"{}")))),
                Err(e) => self.reply_error(id, e),
            }
            return Ok(());
        }
        let ctx = self.conn()?.ctx.clone();
        match self.node.handler().on_rpc(&ctx, method, &data).await {
            Ok(data) => {
                self.reply(id, ReplyBody::Rpc(data));
                Ok(())
            }
            Err(e) => self.refuse(id, e),
        }
    }

    async fn refresh(&mut self, id: u32, token: &str) -> Result<(), Disconnect> {
        if token.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let ctx = self.conn()?.ctx.clone();
        let decision = match self.node.handler().on_refresh(&ctx, token).await {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let mut result = RefreshResult::default();
        if let Some(exp) = decision.expire_at {
            let ttl = exp - unix_secs();
            if ttl <= 0 {
                return Err(Disconnect::EXPIRED);
            }
            result.expires = true;
            result.ttl = ttl.min(i64::from(u32::MAX)) as u32;
        }
        if let Some(info) = decision.info {
            self.conn_mut()?.set_conn_info(info);
        }
        self.set_expiry(decision.expire_at);
        self.reply(id, ReplyBody::Refresh(result));
        Ok(())
    }

    async fn sub_refresh(&mut self, id: u32, channel: &str, token: &str) -> Result<(), Disconnect> {
        if channel.is_empty() || token.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        if !self.conn()?.subs.contains_key(channel) {
            self.reply_error(id, ErrorReply::PERMISSION_DENIED);
            return Ok(());
        }
        let ctx = self.conn()?.ctx.clone();
        let decision = match self
            .node
            .handler()
            .on_sub_refresh(&ctx, channel, token)
            .await
        {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let mut result = RefreshResult::default();
        if let Some(exp) = decision.expire_at {
            let ttl = exp - unix_secs();
            if ttl <= 0 {
                self.reply_error(id, ErrorReply::TOKEN_EXPIRED);
                return Ok(());
            }
            result.expires = true;
            result.ttl = ttl.min(i64::from(u32::MAX)) as u32;
        }
        if let Some(s) = self.conn_mut()?.subs.get_mut(channel) {
            s.expire_at = decision.expire_at;
        }
        self.reply(id, ReplyBody::SubRefresh(result));
        Ok(())
    }

    /// Saves the positions the answered ping confirmed to the delivery cursors.
    async fn confirm_cursors(&mut self) {
        let snapshot = self.client.take_ping_snapshot();
        if snapshot.is_empty() {
            return;
        }
        let node = self.node.clone();
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let user = conn.ctx.user.clone();
        for (channel, offset, epoch) in snapshot {
            let Some(s) = conn.subs.get_mut(&channel) else {
                continue;
            };
            let Some(ttl) = s.cursor_ttl else { continue };
            if offset <= s.confirmed {
                continue;
            }
            let pos = crate::engine::StreamTop { offset, epoch };
            match node.cursors().save_cursor(&user, &channel, &pos, ttl).await {
                Ok(()) => {
                    s.confirmed = offset;
                    metrics::counter!("holdfast_cursor_saves_total", "by" => "pong").increment(1);
                }
                Err(e) => tracing::warn!(%channel, error = %e, "cursor save failed"),
            }
        }
    }

    /// `holdfast.ack`: the client confirms it processed a channel up to a position.
    async fn ack(&mut self, data: &[u8]) -> Result<(), ErrorReply> {
        #[derive(serde::Deserialize)]
        struct Ack {
            channel: String,
            offset: u64,
            epoch: String,
        }
        let ack: Ack = serde_json::from_slice(data).map_err(|_| ErrorReply::BAD_REQUEST)?;
        let node = self.node.clone();
        let conn = self.conn_mut().map_err(|_| ErrorReply::BAD_REQUEST)?;
        let user = conn.ctx.user.clone();
        let s = conn
            .subs
            .get_mut(ack.channel.as_str())
            .ok_or(ErrorReply::PERMISSION_DENIED)?;
        let ttl = s.cursor_ttl.ok_or(ErrorReply::NOT_AVAILABLE)?;
        let (delivered, epoch) = s.sub.live_position().ok_or(ErrorReply::BAD_REQUEST)?;
        if ack.epoch != *epoch || ack.offset > delivered {
            return Err(ErrorReply::BAD_REQUEST);
        }
        if ack.offset > s.confirmed {
            let pos = crate::engine::StreamTop {
                offset: ack.offset,
                epoch,
            };
            node.cursors()
                .save_cursor(&user, &ack.channel, &pos, ttl)
                .await
                .map_err(engine_error)?;
            s.confirmed = ack.offset;
            metrics::counter!("holdfast_cursor_saves_total", "by" => "ack").increment(1);
        }
        Ok(())
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
                .handler()
                .on_lifecycle(crate::handler::LifecycleEvent::Disconnected {
                    client: self.client.id.clone(),
                    user: conn.ctx.user.clone(),
                    code: d.code,
                    reason: d.reason.into_owned(),
                });
        }
    }
}

/// A tokio instant for a unix time in seconds.
fn at_unix(secs: i64) -> tokio::time::Instant {
    tokio::time::Instant::now()
        + Duration::from_secs(secs.saturating_sub(unix_secs()).max(0) as u64)
}

/// Reports an unsubscribe (the connection stays) to the lifecycle hook.
fn emit_unsubscribed(node: &Node, client: &ClientHandle, user: &Arc<str>, channel: &Arc<str>) {
    node.handler()
        .on_lifecycle(crate::handler::LifecycleEvent::Unsubscribed {
            client: client.id.clone(),
            user: user.clone(),
            channel: channel.clone(),
        });
}

/// Ends a subscription: no more deliveries, presence and leave.
async fn detach(node: &Node, client: &Arc<ClientHandle>, s: SessionSub) {
    s.sub.kill();
    node.remove_subscription(&s.sub.channel, client.seq).await;
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
