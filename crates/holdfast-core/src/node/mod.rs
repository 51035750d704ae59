//! The node: configuration, hub, engine and hooks, and the operations the server API needs.
//! What travels between nodes (API commands for users on other nodes, heartbeats, surveys) is
//! in [`control`].

mod control;
mod emulation;
pub(crate) mod map;

pub use control::NodeInfo;
use control::{HEARTBEAT, NodeCommand, SurveyReplies};
pub use emulation::{EmulationInbox, EmulationOutcome, EmulationRegistration};

use crate::channel::{ChannelRules, ResolvedChannel};
use crate::client::{ClientHandle, Control, ServerSubscribe};
use crate::config::{ConfigError, NodeConfig};
use crate::engine::engine_error;
use crate::engine::{
    Broker, CursorStore, Engine, EngineError, HistoryOptions, HistoryPage, HistoryQuery,
    PresenceStore, PublishOptions, PublishOutcome,
};
use crate::handler::Hooks;
use crate::hub::{Hub, Subscription};
use crate::shard::Sharded;
use crate::time::unix_ms;
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

/// Handles of the counters every frame updates.
#[derive(Debug)]
pub(crate) struct TransportMetrics {
    pub(crate) messages_sent: metrics::Counter,
    pub(crate) bytes_sent: metrics::Counter,
    pub(crate) messages_received: metrics::Counter,
    pub(crate) bytes_received: metrics::Counter,
}

impl TransportMetrics {
    fn register(transport: &'static str) -> Self {
        Self {
            messages_sent: metrics::counter!("holdfast_transport_messages_sent_total", "transport" => transport),
            bytes_sent: metrics::counter!("holdfast_transport_bytes_sent_total", "transport" => transport),
            messages_received: metrics::counter!("holdfast_transport_messages_received_total", "transport" => transport),
            bytes_received: metrics::counter!("holdfast_transport_bytes_received_total", "transport" => transport),
        }
    }
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
    /// Subscribers that negotiated delta compression may get it as a delta (namespace
    /// `delta_publish` sets it for every publish).
    pub delta: bool,
    /// Latest-state publishing: suppressed unless newer than the channel's latest version
    /// (channels with history; 0 = no check).
    pub version: u64,
    /// Epoch of `version`.
    pub version_epoch: String,
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
    maps: Arc<dyn crate::engine::MapBroker>,
    /// The application hooks, one slot per role.
    hooks: Hooks,
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
    /// Transport counters by transport name, looked up in the metrics recorder once per
    /// transport (on first use, after the embedding program installed its recorder), not on
    /// every frame.
    transport_metrics: parking_lot::Mutex<Vec<(&'static str, Arc<TransportMetrics>)>>,
    /// Emulated connections of this node (HTTP-streaming, SSE) by session: where their
    /// `/emulation` frames go.
    emulation: parking_lot::Mutex<std::collections::HashMap<Arc<str>, EmulationInbox>>,
    /// `/emulation` requests forwarded to other nodes, waiting for their answer.
    emulation_acks: parking_lot::Mutex<
        std::collections::HashMap<u64, tokio::sync::oneshot::Sender<EmulationOutcome>>,
    >,
    /// Serialise hub-first/last transitions with broker subscribe/unsubscribe per channel.
    sub_locks: Sharded<tokio::sync::Mutex<()>>,
    /// Other nodes heard from (distributed engines), with when.
    peers: parking_lot::Mutex<std::collections::HashMap<String, (NodeInfo, std::time::Instant)>>,
    /// `channels` surveys waiting for replies from other nodes.
    surveys: parking_lot::Mutex<std::collections::HashMap<u64, SurveyReplies>>,
    /// Interval of this node's announcements to its peers, in milliseconds.
    heartbeat_ms: AtomicU64,
    /// Presence map entries this node keeps alive: (presence channel, key) → local
    /// subscriptions holding it and the entry's client info.
    presence_keys: map::PresenceKeys,
}

impl Node {
    /// Builds a node over an engine and hooks. The node is not ready until [`Node::start`].
    pub fn new(config: NodeConfig, engine: Engine, hooks: Hooks) -> Result<Self, Vec<ConfigError>> {
        let Engine {
            broker,
            presence,
            cursors,
            maps,
        } = engine;
        config.validate()?;
        let hub = Arc::new(Hub::new());
        let rules = ChannelRules::for_node(&config);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<NodeInner>| {
            let events = Arc::new(NodeEvents {
                hub: hub.clone(),
                node: weak.clone(),
            });
            broker.set_handler(events.clone());
            maps.set_handler(events);
            NodeInner {
                id: uuid::Uuid::new_v4().to_string().into(),
                name: std::env::var("HOSTNAME").unwrap_or_else(|_| "holdfast".into()),
                version: env!("CARGO_PKG_VERSION").to_string(),
                config,
                rules,
                hub,
                broker,
                presence,
                cursors,
                maps,
                hooks,
                ready: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                seq: AtomicU64::new(1),
                started: std::time::Instant::now(),
                stats: NodeStats::default(),
                transport_metrics: Default::default(),
                emulation: Default::default(),
                emulation_acks: Default::default(),
                sub_locks: Sharded::new(SUB_LOCKS, || tokio::sync::Mutex::new(())),
                peers: Default::default(),
                surveys: Default::default(),
                heartbeat_ms: AtomicU64::new(HEARTBEAT.as_millis() as u64),
                presence_keys: Default::default(),
            }
        });
        Ok(Self { inner })
    }

    /// Marks the node ready: call once the engine is connected. With a distributed engine this
    /// also starts the heartbeat that tells other nodes this one is alive.
    pub fn start(&self) {
        if self.inner.draining.load(Ordering::Acquire) {
            return;
        }
        let was = self.inner.ready.swap(true, Ordering::AcqRel);
        if !was {
            self.start_presence_map_refresh();
        }
        if !was && self.inner.broker.distributed() {
            let weak = Arc::downgrade(&self.inner);
            let stop = self.inner.shutdown.clone();
            let every = Duration::from_millis(self.inner.heartbeat_ms.load(Ordering::Relaxed));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut first = true;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    let node = Node { inner };
                    if let Err(e) = node.control(NodeCommand::Node(node.info())).await {
                        tracing::debug!(error = ?e, "heartbeat not sent");
                    }
                    if std::mem::take(&mut first) {
                        // A node that has just started asks the others to announce themselves,
                        // so `info` and `channels` asked of it include them at once instead of
                        // after their next heartbeat.
                        let hello = NodeCommand::Hello {
                            origin: node.inner.id.to_string(),
                        };
                        if let Err(e) = node.control(hello).await {
                            tracing::debug!(error = ?e, "hello not sent");
                        }
                    }
                }
            });
        }
    }

    /// How often this node announces itself to the others (default 3 s; with a distributed
    /// engine only). Call before [`Node::start`]. Peers forget a node 7 s after its last
    /// announcement, so an interval above that makes it come and go in `info`.
    pub fn set_heartbeat(&self, every: Duration) {
        self.inner
            .heartbeat_ms
            .store(every.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Whether the engine can serve now.
    pub fn engine_healthy(&self) -> bool {
        self.inner.broker.healthy()
    }

    /// Why the engine is degraded (it serves, but some operations fail), if it is.
    pub fn engine_problem(&self) -> Option<String> {
        self.inner.broker.problem()
    }

    /// Resolves once the engine is connected.
    pub async fn engine_ready(&self) {
        self.inner.broker.ready().await;
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
        if self.inner.broker.distributed() && !self.inner.draining.load(Ordering::Acquire) {
            let gone = NodeCommand::Gone {
                uid: self.inner.id.to_string(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), self.control(gone)).await;
        }
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

    /// The transport counters (registered with the metrics recorder on first use).
    pub(crate) fn transport_metrics(&self, transport: &'static str) -> Arc<TransportMetrics> {
        let mut all = self.inner.transport_metrics.lock();
        if let Some((_, m)) = all.iter().find(|(t, _)| *t == transport) {
            return m.clone();
        }
        let m = Arc::new(TransportMetrics::register(transport));
        all.push((transport, m.clone()));
        m
    }

    /// The application hooks.
    pub fn hooks(&self) -> &Hooks {
        &self.inner.hooks
    }

    pub(crate) fn broker(&self) -> &dyn Broker {
        &*self.inner.broker
    }

    /// The map broker (map subscriptions' state and change streams).
    pub fn maps(&self) -> &dyn crate::engine::MapBroker {
        &*self.inner.maps
    }

    pub(crate) fn presence_store(&self) -> &dyn PresenceStore {
        &*self.inner.presence
    }

    pub(crate) fn cursors(&self) -> &dyn CursorStore {
        &*self.inner.cursors
    }

    pub(crate) fn new_client(&self, encoding: Encoding, unidirectional: bool) -> Arc<ClientHandle> {
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
            unidirectional,
            self.inner.config.client.queue_max_size,
        )
    }

    fn sub_lock(&self, channel: &str) -> &tokio::sync::Mutex<()> {
        self.inner.sub_locks.get(channel)
    }

    /// Whether a channel's publications come from the map broker (map channels) rather than
    /// the engine's broker; the node subscribes to each channel at the one that carries it.
    fn is_map_channel(&self, channel: &str) -> bool {
        self.inner
            .rules
            .resolve(channel)
            .is_ok_and(|r| r.options.subscription_type.is_map())
    }

    async fn broker_subscribe(&self, channel: &str) -> Result<(), EngineError> {
        if self.is_map_channel(channel) {
            self.inner.maps.subscribe(channel).await
        } else {
            self.inner.broker.subscribe(channel).await
        }
    }

    async fn broker_unsubscribe(&self, channel: &str) -> Result<(), EngineError> {
        if self.is_map_channel(channel) {
            self.inner.maps.unsubscribe(channel).await
        } else {
            self.inner.broker.unsubscribe(channel).await
        }
    }

    /// Registers a subscription in the hub; the first local subscriber of a channel subscribes
    /// the node at the broker.
    pub(crate) async fn add_subscription(&self, sub: Arc<Subscription>) -> Result<(), EngineError> {
        let channel = sub.channel.clone();
        let seq = sub.client.seq;
        let _g = self.sub_lock(&channel).lock().await;
        if self.inner.hub.add_subscription(sub)
            && let Err(e) = self.broker_subscribe(&channel).await
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
            && let Err(e) = self.broker_unsubscribe(channel).await
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
        if resolved.options.subscription_type.is_map() {
            return Err(ErrorReply::new(
                ErrorReply::BAD_REQUEST.code,
                "bad request: a map channel takes map_publish and map_remove",
            ));
        }
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
            delta: false,
            use_delta: req.delta || resolved.options.delta_publish,
            key: String::new(),
            removed: false,
        };
        let versioned = history.is_some();
        let opts = PublishOptions {
            history,
            idempotency_key: req.idempotency_key,
            idempotency_ttl: IDEMPOTENCY_TTL,
            version: if versioned { req.version } else { 0 },
            version_epoch: req.version_epoch,
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
        if out.suppressed {
            metrics::counter!("holdfast_publications_suppressed_total").increment(1);
        } else {
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
        // A map channel's change stream is read with map_read_stream (with the Redis map
        // broker it lives in the keys a stream's history would: never touched from here).
        if !resolved.options.history_enabled() || resolved.options.subscription_type.is_map() {
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
        if !resolved.options.history_enabled() || resolved.options.subscription_type.is_map() {
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
}

/// What the engine delivers to this node: deliveries go to the hub, control to the node.
#[derive(Debug)]
struct NodeEvents {
    hub: Arc<Hub>,
    node: std::sync::Weak<NodeInner>,
}

impl crate::engine::BrokerHandler for NodeEvents {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        self.hub.on_publication(channel, p, epoch);
    }
    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.hub.on_join(channel, info);
    }
    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.hub.on_leave(channel, info);
    }
    fn check_position(&self, channel: &str, top: &crate::engine::StreamTop) {
        self.hub.check_position(channel, top);
    }
    fn on_rewind(&self, channel: &str, top: &crate::engine::StreamTop) {
        self.hub.on_rewind(channel, top);
    }
    fn on_control(&self, data: &[u8]) {
        if let Some(inner) = self.node.upgrade() {
            Node { inner }.apply_control(data);
        }
    }
}
