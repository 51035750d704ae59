//! The node: configuration, hub, engine and hooks, and the operations the server API needs.

use crate::channel::{ChannelRules, ResolvedChannel};
use crate::client::{ClientHandle, Control};
use crate::config::{ConfigError, NodeConfig};
use crate::engine::{
    Broker, CursorStore, Engine, EngineError, HistoryOptions, HistoryPage, HistoryQuery,
    PresenceStore, PublishOptions, PublishOutcome,
};
use crate::handler::Handler;
use crate::hub::{Hub, Subscription};
use crate::session::ServerSubscribe;
use crate::shard::Sharded;
use bytes::Bytes;
use holdfast_protocol::{ClientInfo, Disconnect, Encoding, ErrorReply, Publication};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(300);

const SUB_LOCKS: usize = 128;

/// Lifetime counters for `/health` and metrics.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Messages (commands) received.
    pub messages_received: AtomicU64,
    /// Messages (replies, pushes, pings) written.
    pub messages_sent: AtomicU64,
    /// Error replies and error disconnects.
    pub errors: AtomicU64,
    /// Connections closed with 3008.
    pub slow_disconnects: AtomicU64,
    /// Publications accepted.
    pub publications: AtomicU64,
}

/// A publish request from the server API or a session.
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    /// Payload (raw JSON unless `binary`).
    pub data: Bytes,
    /// The payload is not JSON: only protobuf connections can receive it (JSON ones get 3506).
    pub binary: bool,
    /// Publisher (client publishes).
    pub info: Option<Arc<ClientInfo>>,
    /// Do not append to history.
    pub skip_history: bool,
    /// Tags.
    pub tags: Option<Arc<BTreeMap<String, String>>>,
    /// Idempotency key (5-minute window).
    pub idempotency_key: Option<String>,
}

/// The Holdfast node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

#[derive(Debug)]
struct NodeInner {
    /// Random id of this node (UUID).
    id: Arc<str>,
    /// Name shown in `info`.
    name: String,
    /// Version sent in connect results.
    version: String,
    config: NodeConfig,
    rules: ChannelRules,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    presence: Arc<dyn PresenceStore>,
    cursors: Arc<dyn CursorStore>,
    handler: Arc<dyn Handler>,
    /// Upgrades are accepted only while set (engine connected, hooks in place, not draining).
    ready: AtomicBool,
    /// Set once shutdown starts.
    draining: AtomicBool,
    shutdown: CancellationToken,
    /// Connection tasks, awaited on shutdown.
    tracker: TaskTracker,
    /// Source of per-connection sequence numbers.
    seq: AtomicU64,
    started: std::time::Instant,
    stats: NodeStats,
    /// Serialise hub-first/last transitions with broker subscribe/unsubscribe per channel.
    sub_locks: Sharded<tokio::sync::Mutex<()>>,
}

impl Node {
    /// Builds a node over an engine and hooks. The node is not ready until [`Node::start`].
    pub fn new(
        config: NodeConfig,
        engine: Engine,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, Vec<ConfigError>> {
        let Engine {
            broker,
            presence,
            cursors,
        } = engine;
        config.validate()?;
        let hub = Arc::new(Hub::new());
        broker.set_handler(hub.clone());
        let rules = ChannelRules::new(&config.channel);
        Ok(Self {
            inner: Arc::new(NodeInner {
                id: uuid::Uuid::new_v4().to_string().into(),
                name: std::env::var("HOSTNAME").unwrap_or_else(|_| "holdfast".into()),
                version: env!("CARGO_PKG_VERSION").to_string(),
                config,
                rules,
                hub,
                broker,
                presence,
                cursors,
                handler,
                ready: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                seq: AtomicU64::new(1),
                started: std::time::Instant::now(),
                stats: NodeStats::default(),
                sub_locks: Sharded::new(SUB_LOCKS, || tokio::sync::Mutex::new(())),
            }),
        })
    }

    /// Marks the node ready: call once the engine is connected.
    pub fn start(&self) {
        if !self.inner.draining.load(Ordering::Acquire) {
            self.inner.ready.store(true, Ordering::Release);
        }
    }

    /// Whether new connections are accepted.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Whether shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stops accepting, closes every connection with 3001 and waits for the connection tasks,
    /// at most `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.ready.store(false, Ordering::Release);
        self.inner.draining.store(true, Ordering::Release);
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        let clients = self.inner.hub.all_clients();
        tracing::info!(
            connections = clients.len(),
            "shutting down: closing connections with 3001"
        );
        // Closing only queues the close frame; writers do the I/O in parallel. Yield between
        // chunks so a large node does not starve the writers it wakes.
        for chunk in clients.chunks(1024) {
            for c in chunk {
                c.close(Disconnect::SHUTDOWN);
            }
            tokio::task::yield_now().await;
        }
        if tokio::time::timeout(timeout, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.inner.tracker.len(),
                "shutdown timeout: connections still open"
            );
        }
    }

    /// Cancelled when shutdown starts.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Tracks connection tasks so shutdown can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Node id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Server version string.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// Time since the node was built.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// Channel rules.
    pub fn rules(&self) -> &ChannelRules {
        &self.inner.rules
    }

    /// The hub of local connections.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Lifetime counters.
    pub fn stats(&self) -> &NodeStats {
        &self.inner.stats
    }

    pub(crate) fn handler(&self) -> &dyn Handler {
        &*self.inner.handler
    }

    pub(crate) fn broker(&self) -> &dyn Broker {
        &*self.inner.broker
    }

    pub(crate) fn presence_store(&self) -> &dyn PresenceStore {
        &*self.inner.presence
    }

    pub(crate) fn cursors(&self) -> &dyn CursorStore {
        &*self.inner.cursors
    }

    pub(crate) fn new_client(&self, encoding: Encoding) -> Arc<ClientHandle> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("holdfast_connections_accepted_total").increment(1);
        ClientHandle::new(
            uuid::Uuid::new_v4().to_string().into(),
            seq,
            encoding,
            self.inner.config.client.queue_max_size,
        )
    }

    fn sub_lock(&self, channel: &str) -> &tokio::sync::Mutex<()> {
        self.inner.sub_locks.get(channel)
    }

    /// Registers a subscription in the hub; the first local subscriber of a channel subscribes
    /// the node at the broker.
    pub(crate) async fn add_subscription(&self, sub: Arc<Subscription>) -> Result<(), EngineError> {
        let channel = sub.channel.clone();
        let seq = sub.client.seq;
        let _g = self.sub_lock(&channel).lock().await;
        if self.inner.hub.add_subscription(sub)
            && let Err(e) = self.inner.broker.subscribe(&channel).await
        {
            self.inner.hub.remove_subscription(&channel, seq);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a subscription; the last local subscriber unsubscribes the node at the broker.
    pub(crate) async fn remove_subscription(&self, channel: &str, client_seq: u64) {
        let _g = self.sub_lock(channel).lock().await;
        if self.inner.hub.remove_subscription(channel, client_seq)
            && let Err(e) = self.inner.broker.unsubscribe(channel).await
        {
            tracing::warn!(channel, error = %e, "broker unsubscribe failed");
        }
    }

    /// History options for a channel's namespace (None when history is off).
    pub fn history_options(&self, resolved: &ResolvedChannel) -> Option<HistoryOptions> {
        let o = &resolved.options;
        o.history_enabled().then(|| HistoryOptions {
            size: o.history_size,
            ttl: o.history_ttl,
            meta_ttl: self.inner.rules.meta_ttl(o),
        })
    }

    /// Publishes into a channel (server API and client publishes after permission checks).
    pub async fn publish(
        &self,
        channel: &str,
        req: PublishRequest,
    ) -> Result<PublishOutcome, ErrorReply> {
        let resolved = self.inner.rules.resolve(channel)?;
        let history = if req.skip_history {
            None
        } else {
            self.history_options(&resolved)
        };
        let publication = Publication {
            offset: 0,
            data: req.data,
            info: req.info,
            tags: req.tags,
            time: unix_ms(),
            binary: req.binary,
        };
        let opts = PublishOptions {
            history,
            idempotency_key: req.idempotency_key,
            idempotency_ttl: IDEMPOTENCY_TTL,
        };
        let out = self
            .inner
            .broker
            .publish(channel, publication, &opts)
            .await
            .map_err(|e| {
                tracing::warn!(channel, error = %e, "publish failed");
                engine_error(e)
            })?;
        if !out.suppressed {
            self.inner
                .stats
                .publications
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("holdfast_publications_total").increment(1);
        }
        Ok(out)
    }

    /// Reads history (server API). `limit`: None = all, Some(0) = position only.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<(u64, String)>,
        limit: Option<usize>,
        reverse: bool,
    ) -> Result<HistoryPage, ErrorReply> {
        let resolved = self.inner.rules.resolve(channel)?;
        if !resolved.options.history_enabled() {
            return Err(ErrorReply::NOT_AVAILABLE);
        }
        if reverse && since.as_ref().is_some_and(|(o, _)| *o == 0) {
            return Err(ErrorReply::BAD_REQUEST);
        }
        let query = HistoryQuery {
            since,
            limit,
            reverse,
            meta_ttl: self.inner.rules.meta_ttl(&resolved.options),
        };
        self.inner
            .broker
            .history(channel, &query)
            .await
            .map_err(engine_error)
    }

    /// Drops a channel's publications, keeping its position.
    pub async fn remove_history(&self, channel: &str) -> Result<(), ErrorReply> {
        let resolved = self.inner.rules.resolve(channel)?;
        if !resolved.options.history_enabled() {
            return Err(ErrorReply::NOT_AVAILABLE);
        }
        self.inner
            .broker
            .remove_history(channel)
            .await
            .map_err(engine_error)
    }

    /// The delivery cursor of a user in a channel (what is known to have reached the user).
    pub async fn delivery_cursor(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<Option<crate::engine::StreamTop>, ErrorReply> {
        self.inner
            .cursors
            .load_cursor(user, channel)
            .await
            .map_err(engine_error)
    }

    /// Clients in a channel.
    pub async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, ErrorReply> {
        let resolved = self.inner.rules.resolve(channel)?;
        if !resolved.options.presence {
            return Err(ErrorReply::NOT_AVAILABLE);
        }
        self.inner
            .presence
            .presence(channel)
            .await
            .map_err(engine_error)
    }

    /// Clients and distinct users in a channel.
    pub async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ErrorReply> {
        let resolved = self.inner.rules.resolve(channel)?;
        if !resolved.options.presence {
            return Err(ErrorReply::NOT_AVAILABLE);
        }
        self.inner
            .presence
            .presence_stats(channel)
            .await
            .map_err(engine_error)
    }

    fn target_clients(&self, user: &str, client: Option<&str>) -> Vec<Arc<ClientHandle>> {
        match client.filter(|c| !c.is_empty()) {
            Some(id) => self
                .inner
                .hub
                .client(id)
                .into_iter()
                .filter(|c| c.user() == user)
                .collect(),
            None => self.inner.hub.user_clients(user),
        }
    }

    /// Closes a user's connections (or one of them), except those in `whitelist`.
    /// Returns how many were closed.
    pub fn disconnect_user(
        &self,
        user: &str,
        client: Option<&str>,
        whitelist: &[String],
        disconnect: Disconnect,
    ) -> usize {
        let mut n = 0;
        for c in self.target_clients(user, client) {
            if whitelist.iter().any(|w| w == c.id()) {
                continue;
            }
            c.close(disconnect.clone());
            n += 1;
        }
        n
    }

    /// Unsubscribes a user's connections (or one of them) from a channel, with an `unsubscribe`
    /// push (code 2000).
    pub fn unsubscribe_user(&self, user: &str, channel: &str, client: Option<&str>) -> usize {
        let (code, reason) = holdfast_protocol::code::unsubscribe::SERVER;
        let targets = self.target_clients(user, client);
        for c in &targets {
            c.push_control(Control::Unsubscribe {
                channel: channel.to_owned(),
                code,
                reason: reason.to_owned(),
            });
        }
        targets.len()
    }

    /// Subscribes a user's live connections (or one of them) to a channel, with a `subscribe`
    /// push.
    pub fn subscribe_user(
        &self,
        user: &str,
        client: Option<&str>,
        sub: ServerSubscribe,
    ) -> Result<usize, ErrorReply> {
        self.inner.rules.resolve(&sub.channel)?;
        let targets = self.target_clients(user, client);
        for c in &targets {
            c.push_control(Control::Subscribe(Box::new(sub.clone())));
        }
        Ok(targets.len())
    }

    /// Sets the expiry of a user's connections (or one of them). `expire_at` None = never;
    /// `expired` closes them with 3005.
    pub fn refresh_user(
        &self,
        user: &str,
        client: Option<&str>,
        expired: bool,
        expire_at: Option<i64>,
        info: Option<Bytes>,
    ) -> usize {
        let targets = self.target_clients(user, client);
        for c in &targets {
            if expired {
                c.close(Disconnect::EXPIRED);
            } else {
                c.push_control(Control::Refresh {
                    expire_at,
                    info: info.clone(),
                });
            }
        }
        targets.len()
    }
}

/// Maps an engine failure to the client/API error.
pub fn engine_error(e: EngineError) -> ErrorReply {
    match e {
        EngineError::UnrecoverablePosition => ErrorReply::UNRECOVERABLE_POSITION,
        EngineError::Limit(_) => ErrorReply::LIMIT_EXCEEDED,
        EngineError::Unavailable(_) => ErrorReply::INTERNAL,
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> i64 {
    unix_ms() / 1000
}
