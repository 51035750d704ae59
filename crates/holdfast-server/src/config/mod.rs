//! Server configuration: TOML (or a Centrifugo `config.json`), then `HOLDFAST_*` environment
//! variables, then command-line overrides. Key names follow Centrifugo v6.

use holdfast_core::config::{ConfigError, NodeConfig, duration};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "HOLDFAST_";

pub mod consumers;
mod generate;
mod load;

pub use generate::generate;
pub use load::{Loaded, env_name, load};

/// The whole configuration of `holdfast serve`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// Listeners.
    pub http_server: HttpServerConfig,
    /// Client connections.
    pub client: ClientConfig,
    /// Channels and namespaces.
    pub channel: ChannelConfig,
    /// WebSocket transport.
    pub websocket: holdfast_transport::WebsocketConfig,
    /// HTTP-streaming transport with bidirectional emulation (off by default).
    pub http_stream: holdfast_transport::HttpTransportConfig,
    /// SSE transport with bidirectional emulation (off by default).
    pub sse: holdfast_transport::HttpTransportConfig,
    /// The `/emulation` endpoint (served when `http_stream` or `sse` is on).
    pub emulation: holdfast_transport::EmulationConfig,
    /// Unidirectional WebSocket (off by default).
    pub uni_websocket: holdfast_transport::UniWebsocketConfig,
    /// Unidirectional SSE (off by default).
    pub uni_sse: holdfast_transport::HttpTransportConfig,
    /// Unidirectional HTTP-streaming (off by default).
    pub uni_http_stream: holdfast_transport::HttpTransportConfig,
    /// Server HTTP API.
    pub http_api: HttpApiConfig,
    /// Engine selection.
    pub engine: EngineConfig,
    /// Where map channels keep their state (Centrifugo's `map_broker`).
    pub map_broker: MapBrokerConfig,
    /// Logging.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Kept for Centrifugo configs: `/health` is always served.
    pub health: Toggle,
    /// Kept for Centrifugo configs: `/metrics` is always served.
    pub prometheus: Toggle,
    /// RPC routing to proxies.
    pub rpc: RpcConfig,
    /// Named proxies, referenced by `*_proxy_name` and `rpc.routes`.
    pub proxies: Vec<ProxyConfig>,
    /// Lifecycle webhooks (a Holdfast extension).
    pub webhooks: WebhookConfig,
    /// Asynchronous consumers of server API commands (PostgreSQL outbox, Redis Streams, NATS
    /// JetStream).
    pub consumers: Vec<consumers::ConsumerConfig>,
    /// The admin web UI (off by default).
    pub admin: AdminConfig,
    /// OpenTelemetry traces over OTLP/HTTP (off by default).
    pub opentelemetry: OpenTelemetryConfig,
}

/// `opentelemetry.*`: spans for server API calls and proxy requests, exported over OTLP/HTTP
/// (protobuf).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct OpenTelemetryConfig {
    /// Export spans.
    pub enabled: bool,
    /// A span per server API call, continuing the caller's `traceparent`.
    pub api: bool,
    /// A span per proxy request, its `traceparent` sent to the backend (a Holdfast extension).
    pub proxy: bool,
    /// Where spans go (the full `/v1/traces` URL). Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, else `http://localhost:4318/v1/traces`.
    pub endpoint: String,
    /// `service.name` of the spans. Empty: `OTEL_SERVICE_NAME`, else `holdfast`.
    pub service_name: String,
    /// Extra headers of export requests (a collector's credentials).
    pub headers: std::collections::BTreeMap<String, String>,
}

/// `%XX` sequences decoded (as `OTEL_EXPORTER_OTLP_HEADERS` values are written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Ok(x) = u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16)
        {
            out.push(x);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl OpenTelemetryConfig {
    /// The traces URL, from the configuration or the standard environment variables.
    pub fn traces_endpoint(&self) -> String {
        if !self.endpoint.is_empty() {
            return self.endpoint.clone();
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(e) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return e;
        }
        match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(base) => format!("{}/v1/traces", base.trim_end_matches('/')),
            None => "http://localhost:4318/v1/traces".into(),
        }
    }

    /// Headers of export requests: `OTEL_EXPORTER_OTLP_HEADERS` (`k=v,k2=v2`, values
    /// percent-decoded), then `headers` (which wins for the same name). Names that cannot be
    /// HTTP header names, or values that cannot be header values, are left out with a warning.
    pub fn export_headers(&self) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let env = std::env::var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
            .unwrap_or_default();
        for kv in env.split(',').filter(|kv| !kv.trim().is_empty()) {
            if let Some((k, v)) = kv.split_once('=') {
                out.insert(k.trim().to_owned(), percent_decode(v.trim()));
            }
        }
        for (k, v) in &self.headers {
            out.insert(k.clone(), v.clone());
        }
        out.retain(|k, v| {
            let ok = axum::http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && axum::http::HeaderValue::from_str(v).is_ok();
            if !ok {
                tracing::warn!(header = %k, "OpenTelemetry export header left out: not a valid HTTP header");
            }
            ok
        });
        out
    }

    /// `service.name`.
    pub fn service_name(&self) -> String {
        if !self.service_name.is_empty() {
            return self.service_name.clone();
        }
        std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "holdfast".into())
    }
}

/// `admin.*`: the embedded admin web UI under `/admin`, on the internal port when there is one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AdminConfig {
    /// Serve the admin UI. Stays off (with a log line) without `password` and `secret`, unless
    /// `insecure`.
    pub enabled: bool,
    /// The password that opens a session.
    pub password: String,
    /// Signs the session tokens (changing it ends every session).
    pub secret: String,
    /// No login at all (development only).
    pub insecure: bool,
    /// Serve it on the public port even when an internal port is configured.
    pub external: bool,
}

impl AdminConfig {
    /// Whether the admin UI is served: enabled, and protected or explicitly insecure.
    pub fn active(&self) -> bool {
        self.enabled && (self.insecure || (!self.password.is_empty() && !self.secret.is_empty()))
    }
}

/// `client.*`: the node's settings (session timers, limits, personal channel: reached through
/// `Deref`, as `config.client.ping_interval`) and the server's (token keys, proxy endpoints,
/// browser origins, per-node and per-IP connection limits), in one table as Centrifugo has it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClientConfig {
    /// The node's part.
    #[serde(flatten)]
    pub node: holdfast_core::config::ClientConfig,
    /// Maximum connections on this node (0 = unlimited); upgrades beyond it get HTTP 503.
    pub connection_limit: usize,
    /// Maximum concurrent connections from one IP address (0 = unlimited); HTTP 429 beyond.
    pub connection_limit_per_ip: usize,
    /// WebSocket upgrade attempts per second from one IP address (0 = unlimited); HTTP 429.
    pub connection_rate_limit_per_ip: u32,
    /// Browser origins allowed to open connections: exact origins or `*` patterns such as
    /// `https://*.example.com`. Empty = same host only (the `Origin` host must equal `Host`).
    /// Requests without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// JWT verification settings.
    pub token: TokenConfig,
    /// Separate keys for subscription tokens.
    pub subscription_token: SubscriptionTokenConfig,
    /// Connect and refresh proxies (HTTP hooks to the application backend).
    pub proxy: ClientProxyConfig,
}

impl std::ops::Deref for ClientConfig {
    type Target = holdfast_core::config::ClientConfig;
    fn deref(&self) -> &Self::Target {
        &self.node
    }
}

impl std::ops::DerefMut for ClientConfig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.node
    }
}

/// `channel.*`: the node's namespaces and options (through `Deref`) and the default channel
/// proxy endpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ChannelConfig {
    /// The node's part.
    #[serde(flatten)]
    pub node: holdfast_core::config::ChannelConfig,
    /// Default channel proxies.
    pub proxy: ChannelProxyConfig,
}

impl std::ops::Deref for ChannelConfig {
    type Target = holdfast_core::config::ChannelConfig;
    fn deref(&self) -> &Self::Target {
        &self.node
    }
}

impl std::ops::DerefMut for ChannelConfig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.node
    }
}

/// `client.proxy.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClientProxyConfig {
    /// Decides connections that come without a token.
    pub connect: ProxyConfig,
    /// Renews expiring connections on the server side.
    pub refresh: ProxyConfig,
}

/// One HTTP proxy endpoint (also the element type of the top-level `proxies` list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ProxyConfig {
    /// Name (for the `proxies` list and `*_proxy_name` options).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Used (for `client.proxy.*`; channel and RPC proxies are enabled per namespace).
    pub enabled: bool,
    /// URL the JSON request is POSTed to.
    pub endpoint: String,
    /// Longest wait for the answer.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Headers of the client's upgrade request to forward (names, any case).
    pub http_headers: Vec<String>,
    /// Include the connection's token `meta` in requests.
    pub include_connection_meta: bool,
    /// Requests in flight at most; beyond, commands get error 111 (too many requests).
    pub max_in_flight: usize,
    /// HTTP options.
    pub http: ProxyHttpConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            enabled: false,
            endpoint: String::new(),
            timeout: Duration::from_secs(1),
            http_headers: Vec::new(),
            include_connection_meta: false,
            max_in_flight: 1000,
            http: ProxyHttpConfig::default(),
        }
    }
}

/// `*.http.*` of a proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ProxyHttpConfig {
    /// Headers added to every request (e.g. a shared secret).
    pub static_headers: std::collections::BTreeMap<String, String>,
}

/// `channel.proxy.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ChannelProxyConfig {
    /// Decides subscriptions in namespaces with `subscribe_proxy_enabled`.
    pub subscribe: ProxyConfig,
    /// Decides (and may rewrite) publications in namespaces with `publish_proxy_enabled`.
    pub publish: ProxyConfig,
    /// Renews expiring subscriptions in namespaces with `sub_refresh_proxy_enabled`.
    pub sub_refresh: ProxyConfig,
}

/// `client.token.*`: how connection (and, by default, subscription) tokens are verified.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct TokenConfig {
    /// HMAC secret for HS256/384/512.
    pub hmac_secret_key: String,
    /// Previous HMAC secret, accepted during key rotation.
    pub hmac_previous_secret_key: String,
    /// Unix time after which the previous secret is no longer accepted (0 = forever).
    pub hmac_previous_secret_key_valid_until: i64,
    /// PEM public key for RS256/384/512.
    pub rsa_public_key: String,
    /// PEM public key for ES256/384.
    pub ecdsa_public_key: String,
    /// JWKS endpoint; when set, all tokens are verified through it.
    pub jwks_public_endpoint: String,
    /// Required `aud` claim (empty = not checked).
    pub audience: String,
    /// Required `iss` claim (empty = not checked).
    pub issuer: String,
    /// Claim holding the user id instead of `sub`.
    pub user_id_claim: String,
}

/// `client.subscription_token.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SubscriptionTokenConfig {
    /// Use the keys below for subscription tokens instead of `client.token`.
    pub enabled: bool,
    /// HMAC secret for subscription tokens.
    pub hmac_secret_key: String,
    /// Previous HMAC secret for subscription tokens, accepted during key rotation.
    pub hmac_previous_secret_key: String,
    /// Unix time after which the previous subscription secret is refused (0 = no limit).
    pub hmac_previous_secret_key_valid_until: i64,
    /// PEM RSA public key for subscription tokens.
    pub rsa_public_key: String,
    /// PEM ECDSA public key for subscription tokens.
    pub ecdsa_public_key: String,
    /// JWKS endpoint for subscription tokens.
    pub jwks_public_endpoint: String,
    /// Required `aud` claim.
    pub audience: String,
    /// Required `iss` claim.
    pub issuer: String,
    /// Claim holding the user id instead of `sub`.
    pub user_id_claim: String,
}

impl SubscriptionTokenConfig {
    /// The settings as a [`TokenConfig`].
    pub fn as_token_config(&self) -> TokenConfig {
        TokenConfig {
            hmac_secret_key: self.hmac_secret_key.clone(),
            hmac_previous_secret_key: self.hmac_previous_secret_key.clone(),
            hmac_previous_secret_key_valid_until: self.hmac_previous_secret_key_valid_until,
            rsa_public_key: self.rsa_public_key.clone(),
            ecdsa_public_key: self.ecdsa_public_key.clone(),
            jwks_public_endpoint: self.jwks_public_endpoint.clone(),
            audience: self.audience.clone(),
            issuer: self.issuer.clone(),
            user_id_claim: self.user_id_claim.clone(),
        }
    }
}

/// `rpc.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RpcConfig {
    /// Default RPC proxy.
    pub proxy: ProxyConfig,
    /// Methods without a namespace.
    pub without_namespace: RpcNamespace,
    /// RPC namespaces: a method `ns:rest` uses namespace `ns`.
    pub namespaces: Vec<RpcNamespace>,
    /// Routes by method, checked first, in order: exact names, or prefixes ending in `*`
    /// (`agents.*`), each to a named proxy (a Holdfast extension).
    pub routes: Vec<RpcRoute>,
}

/// An RPC namespace's options.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RpcNamespace {
    /// Namespace name (namespaces only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Calls go to a proxy.
    pub proxy_enabled: bool,
    /// Named proxy (empty = `rpc.proxy`).
    pub proxy_name: String,
}

/// An RPC route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RpcRoute {
    /// Method name, or prefix ending in `*`.
    pub method: String,
    /// Named proxy.
    pub proxy: String,
}

/// `webhooks.*`: connection lifecycle events POSTed to the application, batched, at least once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WebhookConfig {
    /// Send lifecycle webhooks.
    pub enabled: bool,
    /// URL the batches are POSTed to.
    pub endpoint: String,
    /// Events to send: `connected`, `disconnected`, `subscribed`, `unsubscribed`.
    pub events: Vec<String>,
    /// Longest wait for one delivery attempt.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Most events per request.
    pub batch_size: usize,
    /// Longest an event waits for its batch to fill.
    #[serde(with = "duration")]
    pub batch_max_wait: Duration,
    /// Events queued at most; beyond, new events are dropped (and counted).
    pub queue_size: usize,
    /// Longest pause between retries of a failed batch.
    #[serde(with = "duration")]
    pub max_retry_delay: Duration,
    /// Headers added to every request.
    pub static_headers: std::collections::BTreeMap<String, String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: String::new(),
            events: vec![
                "connected".into(),
                "disconnected".into(),
                "subscribed".into(),
                "unsubscribed".into(),
            ],
            timeout: Duration::from_secs(5),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(100),
            queue_size: 10_000,
            max_retry_delay: Duration::from_secs(30),
            static_headers: Default::default(),
        }
    }
}

/// `http_server.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HttpServerConfig {
    /// Address of the public listener.
    pub address: String,
    /// Port of the public listener (WebSocket, API, health, metrics).
    pub port: u16,
    /// Address of the internal listener.
    pub internal_address: String,
    /// Port of the internal listener (API, health, metrics, ready); 0 = everything on `port`.
    pub internal_port: u16,
    /// TLS on the public listener.
    pub tls: TlsConfig,
    /// TLS on the internal listener.
    pub internal_tls: TlsConfig,
    /// A client must send a request's headers within this time (slowloris defence); also
    /// bounds how long an idle keep-alive connection waits for its next request.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; bigger gets 431.
    pub max_header_size: usize,
    /// HTTP/1.1 keep-alive (several requests per connection).
    pub keep_alive: bool,
    /// Streams one HTTP/2 connection may have open at once (SSE, HTTP-streaming, WebSocket
    /// over HTTP/2 and ordinary requests); more are refused by the HTTP/2 layer.
    pub http2_max_concurrent_streams: u32,
    /// A TLS handshake must finish within this time.
    #[serde(with = "duration")]
    pub tls_handshake_timeout: Duration,
    /// Reverse proxies (addresses or CIDR blocks) whose `Forwarded` / `X-Forwarded-For`
    /// headers name the client's address for per-IP limits and logs. Empty: every request is
    /// taken at its TCP address, and the headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// Length of each listener's accept queue (connections the kernel has completed and the
    /// server has not accepted yet). 0 = the kernel's maximum (`net.core.somaxconn`), as Go
    /// servers do; a longer queue rides out a connect storm instead of dropping SYNs (each
    /// dropped SYN costs the client a 1 s retransmission).
    pub listen_backlog: u32,
}

/// `http_server.tls.*` / `http_server.internal_tls.*`: certificate and key files (PEM),
/// re-read on SIGHUP without dropping connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct TlsConfig {
    /// Serve HTTPS/WSS.
    pub enabled: bool,
    /// Certificate chain, leaf first.
    pub server_cert_pem_file: String,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub server_key_pem_file: String,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            address: "0.0.0.0".into(),
            port: 8000,
            internal_address: "127.0.0.1".into(),
            internal_port: 0,
            tls: TlsConfig::default(),
            internal_tls: TlsConfig::default(),
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            keep_alive: true,
            http2_max_concurrent_streams: 250,
            tls_handshake_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
            listen_backlog: 0,
        }
    }
}

/// `http_api.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HttpApiConfig {
    /// API key (`X-API-Key`, `Authorization: apikey`, `?api_key=`). Empty = every call is 401.
    pub key: String,
    /// No key check (development only).
    pub insecure: bool,
    /// `"transport"` maps API errors to HTTP statuses; default answers 200 with `{"error"}`.
    pub error_mode: ErrorMode,
    /// Largest request body in bytes.
    pub max_body_size: usize,
    /// Authorized API requests per second (0 = unlimited); excess gets HTTP 429.
    pub rate_limit: u32,
    /// Requests allowed at once above the rate (0 = same as `rate_limit`).
    pub rate_burst: u32,
    /// The whole request body must arrive within this time (a body that trickles in is cut
    /// with HTTP 408).
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
}

impl Default for HttpApiConfig {
    fn default() -> Self {
        Self {
            key: String::new(),
            insecure: false,
            error_mode: ErrorMode::Envelope,
            max_body_size: 1 << 20,
            rate_limit: 0,
            rate_burst: 0,
            body_read_timeout: Duration::from_secs(10),
        }
    }
}

/// `http_api.error_mode`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorMode {
    /// HTTP 200 with `{"error":…}` (`""`, Centrifugo's default).
    #[default]
    #[serde(rename = "")]
    Envelope,
    /// Errors as HTTP statuses (`"transport"`).
    #[serde(rename = "transport")]
    Transport,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// `engine.type`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The embedded durable engine (single node).
    #[default]
    Disk,
    /// Everything in this process.
    Memory,
    /// Many nodes through Redis.
    Redis,
}

/// `engine.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EngineConfig {
    /// `disk` (durable, the default), `memory`, or `redis` (many nodes).
    #[serde(rename = "type")]
    pub kind: EngineKind,
    /// The disk engine.
    pub disk: DiskEngineConfig,
    /// The Redis engine (deserialised into the engine's own settings).
    pub redis: holdfast_redis::RedisConfig,
}

/// `map_broker.type`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MapBrokerKind {
    /// Follow the engine: Redis with the Redis engine (every node sees one state), memory
    /// otherwise.
    #[default]
    Engine,
    /// In this process (one node; lost on restart: clients re-sync under a new epoch).
    Memory,
    /// In Redis: shared by every node, kept across restarts of Holdfast.
    Redis,
}

/// `map_broker.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MapBrokerConfig {
    /// `engine` (the default), `memory` or `redis`.
    #[serde(rename = "type")]
    pub kind: MapBrokerKind,
    /// The Redis map broker's own connection. Left at its defaults with the Redis engine, the
    /// map broker shares the engine's connections.
    pub redis: holdfast_redis::RedisConfig,
}

impl MapBrokerConfig {
    /// The Redis settings the map broker connects with, when it does not share the engine's.
    pub fn own_redis(&self, engine: &EngineConfig) -> Option<&holdfast_redis::RedisConfig> {
        let redis = match self.kind {
            MapBrokerKind::Redis => true,
            MapBrokerKind::Engine => engine.kind == EngineKind::Redis,
            MapBrokerKind::Memory => false,
        };
        let shares = engine.kind == EngineKind::Redis
            && self.redis == holdfast_redis::RedisConfig::default();
        (redis && !shares).then_some(&self.redis)
    }
}

/// `engine.disk.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DiskEngineConfig {
    /// Data directory.
    pub path: String,
    /// `fsync` (acknowledged publications survive power loss) or `os` (they survive a crash of
    /// the process, not of the machine).
    pub durability: DiskDurability,
}

/// `engine.disk.durability`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskDurability {
    /// Acknowledged after fsync.
    #[default]
    Fsync,
    /// Acknowledged once the write reached the operating system.
    Os,
}

impl Default for DiskEngineConfig {
    fn default() -> Self {
        Self {
            path: "./holdfast-data".into(),
            durability: DiskDurability::Fsync,
        }
    }
}

/// `log.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LogConfig {
    /// `trace`, `debug`, `info`, `warn`, `error`, or a tracing filter (`holdfast_core=debug`).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `shutdown.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ShutdownConfig {
    /// Longest wait for connections to close on shutdown.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
        }
    }
}

/// A section with only `enabled`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Toggle {
    /// Accepted for compatibility.
    pub enabled: bool,
}

impl Config {
    /// The node's part.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            client: self.client.node.clone(),
            channel: self.channel.node.clone(),
        }
    }

    /// Every rule, naming the offending key.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errs = self.node_config().validate().err().unwrap_or_default();
        let mut e = |key: &str, problem: &str| {
            errs.push(ConfigError {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if self.engine.kind == EngineKind::Redis {
            for (key, problem) in self.engine.redis.validate() {
                e(key, &problem);
            }
        }
        if let Some(redis) = self.map_broker.own_redis(&self.engine) {
            for (key, problem) in redis.validate() {
                e(
                    &key.replacen("engine.redis", "map_broker.redis", 1),
                    &problem,
                );
            }
        }
        if self.engine.kind == EngineKind::Disk && self.engine.disk.path.is_empty() {
            e("engine.disk.path", "must name a directory");
        }
        for (i, o) in self.client.allowed_origins.iter().enumerate() {
            if o.is_empty() || o.len() > 512 || o.chars().any(|ch| ch.is_whitespace()) {
                e(
                    &format!("client.allowed_origins[{i}]"),
                    "must be an origin such as https://app.example.com, a pattern such as https://*.example.com, or *",
                );
            }
        }
        for (key, tls) in [
            ("http_server.tls", &self.http_server.tls),
            ("http_server.internal_tls", &self.http_server.internal_tls),
        ] {
            if tls.enabled
                && (tls.server_cert_pem_file.is_empty() || tls.server_key_pem_file.is_empty())
            {
                e(
                    key,
                    "enabled TLS needs server_cert_pem_file and server_key_pem_file",
                );
            }
        }
        if self.opentelemetry.enabled {
            let url = self.opentelemetry.traces_endpoint();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                e(
                    "opentelemetry.endpoint",
                    "must be an http:// or https:// URL (OTLP over HTTP)",
                );
            }
            if std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
                .is_ok_and(|p| !p.is_empty() && p != "http/protobuf")
            {
                e(
                    "opentelemetry",
                    "only OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf is supported",
                );
            }
        }
        if self.http_server.max_header_size < 8192 {
            e("http_server.max_header_size", "must be at least 8192 bytes");
        }
        if self.http_server.http2_max_concurrent_streams == 0 {
            e(
                "http_server.http2_max_concurrent_streams",
                "must be positive",
            );
        }
        if self.http_server.header_read_timeout.is_zero() {
            e("http_server.header_read_timeout", "must be positive");
        }
        if self.http_server.internal_port != 0
            && self.http_server.internal_port == self.http_server.port
        {
            e(
                "http_server.internal_port",
                "must differ from http_server.port",
            );
        }
        if self.websocket.message_size_limit < 1024 {
            e(
                "websocket.message_size_limit",
                "must be at least 1024 bytes",
            );
        }
        for (key, size) in [
            (
                "http_stream.max_request_body_size",
                self.http_stream.max_request_body_size,
            ),
            ("sse.max_request_body_size", self.sse.max_request_body_size),
            (
                "emulation.max_request_body_size",
                self.emulation.max_request_body_size,
            ),
            (
                "uni_sse.max_request_body_size",
                self.uni_sse.max_request_body_size,
            ),
            (
                "uni_http_stream.max_request_body_size",
                self.uni_http_stream.max_request_body_size,
            ),
            (
                "uni_websocket.message_size_limit",
                self.uni_websocket.message_size_limit,
            ),
        ] {
            if size < 1024 {
                e(key, "must be at least 1024 bytes");
            }
        }
        if self.websocket.read_buffer_size < 512 {
            e("websocket.read_buffer_size", "must be at least 512 bytes");
        }
        if self.http_api.max_body_size < 1024 {
            e("http_api.max_body_size", "must be at least 1024 bytes");
        }
        if self.http_api.body_read_timeout.is_zero() {
            e("http_api.body_read_timeout", "must be positive");
        }
        if let Err(why) =
            holdfast_transport::admission::TrustedProxies::parse(&self.http_server.trusted_proxies)
        {
            e("http_server.trusted_proxies", &why);
        }
        for (key, p) in [
            ("client.proxy.connect", &self.client.proxy.connect),
            ("client.proxy.refresh", &self.client.proxy.refresh),
        ] {
            if p.enabled && p.endpoint.is_empty() {
                e(
                    &format!("{key}.endpoint"),
                    "an enabled proxy needs an endpoint",
                );
            }
        }
        let names: std::collections::HashSet<&str> =
            self.proxies.iter().map(|p| p.name.as_str()).collect();
        for (i, p) in self.proxies.iter().enumerate() {
            if p.name.is_empty() {
                e(&format!("proxies[{i}].name"), "a named proxy needs a name");
            }
            if p.endpoint.is_empty() {
                e(
                    &format!("proxies[{i}].endpoint"),
                    "a named proxy needs an endpoint",
                );
            }
        }
        let mut check_proxy = |key: String, enabled: bool, name: &str, default: &ProxyConfig| {
            if !enabled {
                return;
            }
            if name.is_empty() {
                if default.endpoint.is_empty() {
                    errs_push(
                        &mut e,
                        &key,
                        "the proxy is enabled but its default endpoint is not set",
                    );
                }
            } else if !names.contains(name) {
                errs_push(&mut e, &key, &format!("names an undefined proxy {name:?}"));
            }
        };
        let chp = &self.channel.proxy;
        let namespaces = std::iter::once((
            "channel.without_namespace".to_string(),
            &self.channel.without_namespace,
        ))
        .chain(
            self.channel
                .namespaces
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("channel.namespaces[{i}]"), n)),
        );
        for (prefix, o) in namespaces {
            check_proxy(
                format!("{prefix}.subscribe_proxy_enabled"),
                o.subscribe_proxy_enabled,
                &o.subscribe_proxy_name,
                &chp.subscribe,
            );
            check_proxy(
                format!("{prefix}.publish_proxy_enabled"),
                o.publish_proxy_enabled,
                &o.publish_proxy_name,
                &chp.publish,
            );
            check_proxy(
                format!("{prefix}.sub_refresh_proxy_enabled"),
                o.sub_refresh_proxy_enabled,
                &o.sub_refresh_proxy_name,
                &chp.sub_refresh,
            );
        }
        let rpc = &self.rpc;
        check_proxy(
            "rpc.without_namespace.proxy_enabled".into(),
            rpc.without_namespace.proxy_enabled,
            &rpc.without_namespace.proxy_name,
            &rpc.proxy,
        );
        for (i, n) in rpc.namespaces.iter().enumerate() {
            check_proxy(
                format!("rpc.namespaces[{i}].proxy_enabled"),
                n.proxy_enabled,
                &n.proxy_name,
                &rpc.proxy,
            );
        }
        for (i, r) in rpc.routes.iter().enumerate() {
            if r.method.is_empty() {
                e(
                    &format!("rpc.routes[{i}].method"),
                    "a route needs a method or prefix",
                );
            }
            if !names.contains(r.proxy.as_str()) {
                e(
                    &format!("rpc.routes[{i}].proxy"),
                    &format!("names an undefined proxy {:?}", r.proxy),
                );
            }
        }
        let w = &self.webhooks;
        if w.enabled {
            if w.endpoint.is_empty() {
                e(
                    "webhooks.endpoint",
                    "webhooks are enabled but have no endpoint",
                );
            }
            for ev in &w.events {
                if !matches!(
                    ev.as_str(),
                    "connected" | "disconnected" | "subscribed" | "unsubscribed"
                ) {
                    e("webhooks.events", &format!("unknown event {ev:?}"));
                }
            }
            if w.batch_size == 0 || w.queue_size == 0 {
                e(
                    "webhooks.batch_size",
                    "batch_size and queue_size must be at least 1",
                );
            }
        }
        for (key, problem) in consumers::validate(&self.consumers) {
            e(&key, &problem);
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

fn errs_push(e: &mut impl FnMut(&str, &str), key: &str, problem: &str) {
    e(key, problem);
}
