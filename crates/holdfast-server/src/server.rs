//! Building the node from configuration and serving it.

use crate::config::Config;
use crate::jwt::JwtVerifier;
use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use holdfast_core::Node;
use holdfast_core::engine::{Engine, MemoryEngine};
use holdfast_core::handler::{StandardHandler, TokenVerifier};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Shared state of the HTTP handlers.
#[derive(Debug)]
pub struct AppState {
    /// The node.
    pub node: Node,
    /// Configuration as loaded.
    pub config: Arc<Config>,
    /// Prometheus renderer.
    pub metrics: PrometheusHandle,
    /// The client transports (WebSocket) and their admission state.
    pub transport: Arc<holdfast_transport::Transport>,
    /// `http_api.rate_limit`, per API key.
    pub api_rate: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// The enabled consumers' live state (they run once the node is ready).
    pub consumers: Vec<Arc<crate::consumer::Status>>,
    /// The admin UI's login limiter.
    pub admin: crate::admin::AdminState,
    /// The OpenTelemetry exporter, when `opentelemetry.enabled`.
    pub otel: Option<Arc<crate::otel::Otel>>,
}

/// What the transports take from the server's configuration.
pub fn transport_config(config: &Config) -> holdfast_transport::TransportConfig {
    holdfast_transport::TransportConfig {
        websocket: config.websocket.clone(),
        http_stream: config.http_stream.clone(),
        sse: config.sse.clone(),
        emulation: config.emulation.clone(),
        uni_websocket: config.uni_websocket.clone(),
        uni_sse: config.uni_sse.clone(),
        uni_http_stream: config.uni_http_stream.clone(),
        allowed_origins: config.client.allowed_origins.clone(),
        connection_limit: config.client.connection_limit,
        connection_limit_per_ip: config.client.connection_limit_per_ip,
        connection_rate_limit_per_ip: config.client.connection_rate_limit_per_ip,
        trusted_proxies: holdfast_transport::admission::TrustedProxies::parse(
            &config.http_server.trusted_proxies,
        )
        .unwrap_or_default(),
        forwarded_headers: crate::proxy::ProxyHandler::forwarded_headers(config),
    }
}

impl AppState {
    fn new(
        node: Node,
        config: Config,
        metrics: PrometheusHandle,
        otel: Option<Arc<crate::otel::Otel>>,
    ) -> Arc<Self> {
        // Series a dashboard shows from the start: 0 until something happens, never "no data".
        for name in [
            "holdfast_publications_total",
            "holdfast_queue_overflow_disconnects_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        Arc::new(Self {
            transport: holdfast_transport::Transport::new(node.clone(), transport_config(&config)),
            api_rate: holdfast_transport::admission::api_rate_limiter(
                config.http_api.rate_limit,
                config.http_api.rate_burst,
            ),
            consumers: crate::consumer::statuses(&config.consumers),
            admin: Default::default(),
            otel,
            node,
            config: Arc::new(config),
            metrics,
        })
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// Builds the engine, the token verifier and the node. The node becomes ready in [`run`].
pub async fn build(config: Config) -> anyhow::Result<Arc<AppState>> {
    if let Err(errs) = config.validate() {
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::bail!("invalid configuration:\n  {}", lines.join("\n  "));
    }
    // A data directory still locked by an engine that is shutting down (a restart within this
    // process, or the previous process still exiting) is waited for, briefly.
    let deadline = tokio::time::Instant::now() + ENGINE_LOCK_WAIT;
    let engine = loop {
        match open_engine(&config) {
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<holdfast_disk::OpenError>(),
                            Some(holdfast_disk::OpenError::Locked(_))
                        )
                    }) =>
            {
                tracing::info!(path = %config.engine.disk.path, "data directory still locked by an engine shutting down: waiting");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            r => break r?,
        }
    };
    build_with_engine(config, engine).await
}

/// How long [`build`] waits for a data directory locked by an engine that is shutting down.
const ENGINE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the configured engine (replaying the disk engine's log).
pub fn open_engine(config: &Config) -> anyhow::Result<Engine> {
    let mut engine = open_stream_engine(config)?;
    if let Some(cfg) = config.map_broker.own_redis(&config.engine) {
        tracing::info!(addresses = ?cfg.addresses, prefix = %cfg.prefix, "redis map broker");
        let redis =
            holdfast_redis::RedisEngine::for_maps(cfg.clone()).map_err(anyhow::Error::msg)?;
        engine.maps = holdfast_redis::RedisMapBroker::new(redis);
    }
    Ok(engine)
}

fn open_stream_engine(config: &Config) -> anyhow::Result<Engine> {
    use crate::config::{DiskDurability, EngineKind, MapBrokerKind};
    match config.engine.kind {
        EngineKind::Memory => Ok(Engine::from_one(MemoryEngine::new())),
        EngineKind::Redis => {
            let cfg = config.engine.redis.clone();
            tracing::info!(addresses = ?cfg.addresses, prefix = %cfg.prefix, "redis engine");
            let engine = holdfast_redis::RedisEngine::new(cfg).map_err(anyhow::Error::msg)?;
            let mut e = Engine::from_one(engine.clone());
            if config.map_broker.kind != MapBrokerKind::Memory
                && config.map_broker.own_redis(&config.engine).is_none()
            {
                tracing::info!("redis map broker over the engine's connections");
                e.maps = holdfast_redis::RedisMapBroker::new(engine);
            }
            Ok(e)
        }
        EngineKind::Disk => {
            let d = &config.engine.disk;
            let durability = match d.durability {
                DiskDurability::Os => holdfast_disk::Durability::Os,
                DiskDurability::Fsync => holdfast_disk::Durability::Fsync,
            };
            let started = std::time::Instant::now();
            let (engine, report) = holdfast_disk::DiskEngine::open(holdfast_disk::DiskConfig::new(
                &d.path, durability,
            ))
            .with_context(|| format!("opening the disk engine in {}", d.path))?;
            tracing::info!(
                path = %d.path,
                durability = ?d.durability,
                records = report.records,
                streams = report.streams,
                torn_bytes = report.torn_bytes,
                new_epochs = report.new_epochs,
                took_ms = started.elapsed().as_millis() as u64,
                "disk engine open"
            );
            if let Some(why) = &report.rollback {
                metrics::counter!("holdfast_disk_rollbacks_total").increment(1);
                tracing::warn!(path = %d.path, streams = report.new_epochs, "the data directory went backwards ({why}): every stream started a new epoch, so recovering clients are told recovered: false");
            }
            Ok(Engine::from_one(engine))
        }
    }
}

/// [`build`] with a given engine (tests, embedding).
pub async fn build_with_engine(config: Config, engine: Engine) -> anyhow::Result<Arc<AppState>> {
    if let Err(errs) = config.validate() {
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::bail!("invalid configuration:\n  {}", lines.join("\n  "));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = metrics_handle();
    let sub_tokens = config
        .client
        .subscription_token
        .enabled
        .then(|| config.client.subscription_token.as_token_config());
    let verifier = JwtVerifier::new(&config.client.token, sub_tokens.as_ref())
        .context("token keys")?
        .map(|v| Arc::new(v) as Arc<dyn TokenVerifier>);
    if verifier.is_none() && !config.client.insecure {
        tracing::warn!(
            "no token keys configured (client.token.*): only anonymous connects can succeed"
        );
    }
    let standard = StandardHandler::new(&config.client, verifier);
    let webhooks = config
        .webhooks
        .enabled
        .then(|| crate::webhook::Webhooks::start(&config.webhooks, &uuid_like()));
    let otel = crate::otel::Otel::start(&config.opentelemetry, &uuid_like());
    let hooks = crate::proxy::hooks(&config, standard, webhooks, otel.clone());
    let node = Node::new(config.node_config(), engine, hooks).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid configuration:\n  {}", lines.join("\n  "))
    })?;
    Ok(AppState::new(node, config, metrics, otel))
}

fn uuid_like() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// State for embedding: a node the application built itself (with its own hooks), and the
/// server's configuration for the transport. The application calls `node.start()` once ready
/// and `node.shutdown(..)` on exit.
pub fn embed(node: Node, config: Config) -> Arc<AppState> {
    AppState::new(node, config, metrics_handle(), None)
}

/// The WebSocket endpoint alone (`/connection/websocket`), to merge into an application's router
/// (`holdfast_transport::Transport::router` does the same without the server crate).
pub fn websocket_routes(state: Arc<AppState>) -> Router {
    state.transport.router()
}

/// The server API, health, readiness and metrics, to merge into an application's router.
pub fn operator_routes(state: Arc<AppState>) -> Router {
    internal_router().with_state(state)
}

/// Public routes (WebSocket) plus, when there is no internal port, the operator routes.
pub fn router(state: Arc<AppState>, with_internal: bool) -> Router {
    let transports = state.transport.router();
    if with_internal {
        transports.merge(internal_router().with_state(state))
    } else {
        transports
    }
}

fn internal_router() -> Router<Arc<AppState>> {
    Router::new()
        .merge(crate::api::router())
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_route))
}

/// Serves until `shutdown` resolves, then drains: stop accepting, close every session with
/// 3001, wait up to `shutdown.timeout`. The node is ready (upgrades accepted, `/ready` 200) as
/// soon as the listeners run.
pub async fn run(
    state: Arc<AppState>,
    public: TcpListener,
    internal: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = state.node.clone();
    let engine_ready = async move { node.engine_ready().await };
    run_with_readiness(state, public, internal, engine_ready, shutdown).await
}

/// [`run`], with the node becoming ready only when `ready` resolves (an engine still
/// connecting): until then `/ready` and WebSocket upgrades answer 503.
pub async fn run_with_readiness(
    state: Arc<AppState>,
    public: TcpListener,
    internal: Option<TcpListener>,
    ready: impl Future<Output = ()> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let http = &state.config.http_server;
    let open = |t: &crate::config::TlsConfig, which: &str| {
        t.enabled
            .then(|| crate::listen::CertStore::open(t).with_context(|| format!("{which} TLS")))
            .transpose()
    };
    let public_tls = open(&http.tls, "public listener")?;
    let internal_tls = open(&http.internal_tls, "internal listener")?;
    let stop = CancellationToken::new();
    crate::listen::reload_on_sighup(
        public_tls
            .iter()
            .chain(internal_tls.iter())
            .cloned()
            .collect(),
        stop.clone(),
    );
    let stop2 = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop2.cancel();
    });
    let upkeep_handle = state.metrics.clone();
    let upkeep_stop = stop.clone();
    let upkeep_transport = state.transport.clone();
    let upkeep_state = state.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = t.tick() => {
                    upkeep_handle.run_upkeep();
                    upkeep_transport.upkeep();
                    if let Some(rl) = &upkeep_state.api_rate {
                        rl.retain_recent();
                        rl.shrink_to_fit();
                    }
                }
                _ = upkeep_stop.cancelled() => return,
            }
        }
    });
    let public_addr = public.local_addr()?;
    let mut public_app = router(state.clone(), internal.is_none());
    if let Some(first) = crate::admin::first_page(&state) {
        tracing::info!("development first page at / (client.insecure)");
        public_app = public_app.merge(first);
    }
    let admin = crate::admin::router(&state);
    let admin_public = internal.is_none() || state.config.admin.external;
    if admin.is_some() {
        tracing::info!(
            listener = if admin_public { "public" } else { "internal" },
            insecure = state.config.admin.insecure,
            "admin web UI at /admin/"
        );
    }
    let (admin_on_public, admin_on_internal) = if admin_public {
        (admin, None)
    } else {
        (None, admin)
    };
    if let Some(a) = admin_on_public {
        public_app = public_app.merge(a);
    }
    let drain = state.config.shutdown.timeout;
    let public_how = crate::listen::Listener {
        tls: public_tls,
        http: http.clone(),
    };
    let public_srv = tokio::spawn(crate::listen::serve(
        public,
        public_app,
        public_how,
        stop.clone(),
        drain,
    ));
    let internal_srv = internal.map(|l| {
        let mut app = internal_router().with_state(state.clone());
        if let Some(a) = admin_on_internal {
            app = app.merge(a);
        }
        if let Ok(a) = l.local_addr() {
            tracing::info!(address = %a, "internal listener (health, ready, metrics)");
        }
        let how = crate::listen::Listener {
            tls: internal_tls,
            http: http.clone(),
        };
        tokio::spawn(crate::listen::serve(l, app, how, stop.clone(), drain))
    });
    tracing::info!(address = %public_addr, node = state.node.id(), version = state.node.version(), "holdfast listening");
    let ready_state = state.clone();
    let ready_stop = stop.clone();
    let consumers = Arc::new(parking_lot::Mutex::new(None));
    let ready_consumers = consumers.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = ready => {
                ready_state.node.start();
                tracing::info!("node ready");
                if !ready_state.consumers.is_empty() && !ready_stop.is_cancelled() {
                    *ready_consumers.lock() = Some(crate::consumer::Consumers::start(&ready_state));
                }
            }
            _ = ready_stop.cancelled() => {}
        }
    });
    stop.cancelled().await;
    tracing::info!("shutdown requested");
    // Consumers first: a command they are running finishes and is acknowledged while the
    // engine is still there.
    let running = consumers.lock().take();
    if let Some(c) = running {
        c.stop(&state.consumers, state.config.shutdown.timeout)
            .await;
    }
    state.node.shutdown(state.config.shutdown.timeout).await;
    public_srv.await.context("public listener task")?;
    if let Some(h) = internal_srv {
        h.await.context("internal listener task")?;
    }
    tracing::info!("shutdown complete");
    Ok(())
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        health_json(&app).to_string(),
    )
        .into_response()
}

/// What `/health` answers.
pub fn health_json(app: &AppState) -> serde_json::Value {
    let node = &app.node;
    let hub = node.hub();
    let s = node.stats();
    let problem = node.engine_problem();
    let engine = match (node.engine_healthy(), &problem) {
        (false, _) => "unavailable",
        (true, Some(_)) => "degraded",
        (true, None) => "ok",
    };
    let mut body = serde_json::json!({
        "status": if node.is_draining() { "draining" } else { "ok" },
        "engine": engine,
        "node": node.id(),
        "name": node.name(),
        "version": node.version(),
        "uptime_seconds": node.uptime().as_secs(),
        "connections": hub.counts.clients.load(Ordering::Relaxed),
        "users": hub.counts.users.load(Ordering::Relaxed),
        "channels": hub.counts.channels.load(Ordering::Relaxed),
        "subscriptions": hub.counts.subscriptions.load(Ordering::Relaxed),
        "connections_total": s.connections_total.load(Ordering::Relaxed),
        "messages_received": s.messages_received.load(Ordering::Relaxed),
        "messages_sent": s.messages_sent.load(Ordering::Relaxed),
        "publications": s.publications.load(Ordering::Relaxed),
        "errors": s.errors.load(Ordering::Relaxed),
        "slow_disconnects": s.slow_disconnects.load(Ordering::Relaxed),
    });
    if let Some(p) = problem {
        body["engine_problem"] = serde_json::Value::String(p);
    }
    if !app.consumers.is_empty() {
        body["consumers"] = app.consumers.iter().map(|c| c.to_json()).collect();
    }
    body
}

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    if app.node.is_ready() && !app.node.engine_healthy() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"engine unavailable"}"#,
        )
            .into_response()
    } else if app.node.is_ready() {
        // Consumers are reported, not gating: a node whose outbox database is down still
        // serves its clients.
        let mut body = serde_json::json!({ "status": "ready" });
        if !app.consumers.is_empty() {
            body["consumers"] = app
                .consumers
                .iter()
                .map(|c| (c.name.clone(), c.state().into()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    } else {
        let status = if app.node.is_draining() {
            "draining"
        } else {
            "starting"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "status": status }).to_string(),
        )
            .into_response()
    }
}

async fn metrics_route(State(app): State<Arc<AppState>>) -> Response {
    let hub = app.node.hub();
    metrics::gauge!("holdfast_node_clients").set(hub.counts.clients.load(Ordering::Relaxed) as f64);
    metrics::gauge!("holdfast_node_users").set(hub.counts.users.load(Ordering::Relaxed) as f64);
    metrics::gauge!("holdfast_node_channels")
        .set(hub.counts.channels.load(Ordering::Relaxed) as f64);
    metrics::gauge!("holdfast_node_subscriptions")
        .set(hub.counts.subscriptions.load(Ordering::Relaxed) as f64);
    metrics::gauge!("holdfast_engine_healthy").set(if app.node.engine_healthy() {
        1.0
    } else {
        0.0
    });
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}
