//! Server configuration: TOML (or a Centrifugo `config.json`), then `HOLDFAST_*` environment
//! variables, then command-line overrides. Key names follow Centrifugo v6.

use anyhow::{Context, bail};
use holdfast_core::config::{ConfigError, NodeConfig, duration};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Duration;

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "HOLDFAST_";

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
    /// Server HTTP API.
    pub http_api: HttpApiConfig,
    /// Engine selection.
    pub engine: EngineConfig,
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
    /// A TLS handshake must finish within this time.
    #[serde(with = "duration")]
    pub tls_handshake_timeout: Duration,
    /// Reverse proxies (addresses or CIDR blocks) whose `Forwarded` / `X-Forwarded-For`
    /// headers name the client's address for per-IP limits and logs. Empty: every request is
    /// taken at its TCP address, and the headers are ignored.
    pub trusted_proxies: Vec<String>,
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
            tls_handshake_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
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
        if self.http_server.max_header_size < 8192 {
            e("http_server.max_header_size", "must be at least 8192 bytes");
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
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

impl Config {
    /// Combinations that are valid but expose data: each names the keys at fault.
    /// `holdfast checkconfig` prints them and `holdfast serve` logs them.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        let mut w = |key: String, problem: String| out.push(ConfigError { key, problem });
        if self.client.insecure {
            w(
                "client.insecure".into(),
                "every connection may subscribe, publish and read history in every channel \
                 without a token (only personal channels stay their owner's): development only"
                    .into(),
            );
        }
        if self.http_api.insecure {
            w(
                "http_api.insecure".into(),
                "the server API answers without an API key: anyone who reaches it can publish \
                 and disconnect users"
                    .into(),
            );
        }
        let personal = &self.client.subscribe_to_user_personal_channel;
        let personal_ns = personal
            .enabled
            .then_some(personal.personal_channel_namespace.as_str());
        let namespaces = std::iter::once((
            "channel.without_namespace".to_string(),
            "",
            &self.channel.without_namespace,
        ))
        .chain(
            self.channel
                .namespaces
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("channel.namespaces[{i}]"), n.name.as_str(), n)),
        );
        for (prefix, name, o) in namespaces {
            // The personal channel's namespace is user-limited whatever it says.
            if o.allow_user_limited_channels || personal_ns == Some(name) {
                continue;
            }
            let open: Vec<&str> = [
                ("allow_subscribe_for_client", o.allow_subscribe_for_client),
                ("allow_history_for_client", o.allow_history_for_client),
                ("allow_presence_for_client", o.allow_presence_for_client),
                ("allow_publish_for_client", o.allow_publish_for_client),
            ]
            .into_iter()
            .filter_map(|(k, on)| on.then_some(k))
            .collect();
            if open.is_empty() {
                continue;
            }
            let example = if name.is_empty() {
                "#42 or dialog#42,43".to_string()
            } else {
                format!("{name}:#42 or {name}:dialog#42,43")
            };
            w(
                format!("{prefix}.{}", open[0]),
                format!(
                    "{} let any user reach user-bound channels of this namespace ({example}); \
                     set {prefix}.allow_user_limited_channels = true so that only the users a \
                     channel names can use it",
                    open.iter()
                        .map(|k| format!("{prefix}.{k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        out
    }
}

fn errs_push(e: &mut impl FnMut(&str, &str), key: &str, problem: &str) {
    e(key, problem);
}

/// A loaded configuration and the keys it did not understand.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Keys present in the file, environment or flags that Holdfast does not support.
    pub unknown: Vec<String>,
}

/// Reads the file (TOML, or JSON for `.json`), applies `HOLDFAST_*` variables from `env` and the
/// `key=value` overrides, and deserialises.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> anyhow::Result<Loaded> {
    let mut tree = match path {
        Some(p) => read_file(p)?,
        None => Value::Object(Map::new()),
    };
    if !tree.is_object() {
        bail!("the configuration must be a table of settings");
    }
    let defaults = serde_json::to_value(Config::default()).context("default config")?;
    let mut leaves = Vec::new();
    collect_leaves(&defaults, String::new(), &mut leaves);
    let sections: Vec<String> = defaults
        .as_object()
        .map(|m| m.keys().map(|k| k.to_uppercase()).collect())
        .unwrap_or_default();
    let mut unknown = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if matches!(rest, "CONFIG") {
            continue;
        }
        match leaves.iter().find(|(p, _)| env_name(p) == name) {
            Some((path, default)) => set_path(&mut tree, path, parse_like(default, &value))?,
            // Only names inside a known section are reported (likely typos); other HOLDFAST_*
            // variables belong to scripts and tools.
            None if sections.iter().any(|s| rest.starts_with(&format!("{s}_"))) => {
                unknown.push(format!("environment variable {name}"));
            }
            None => {}
        }
    }
    for (key, value) in overrides {
        let default = leaves.iter().find(|(p, _)| p == key).map(|(_, d)| d);
        let v = match default {
            Some(d) => parse_like(d, value),
            None => serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.clone())),
        };
        set_path(&mut tree, key, v)?;
    }
    let config: Config = serde_path_to_error::deserialize(tree.clone()).map_err(|e| {
        let key = e.path().to_string();
        anyhow::anyhow!("invalid configuration: {key}: {}", e.inner())
    })?;
    // A key is known when the configuration, written back out, has it: this sees through the
    // sections that embed the node's own settings (`client`, `channel`).
    let known = serde_json::to_value(&config).context("config conversion")?;
    unknown_keys(&tree, &known, "", &mut unknown);
    Ok(Loaded { config, unknown })
}

/// The keys of `input` that `known` (the configuration as understood, written back out) lacks.
fn unknown_keys(input: &Value, known: &Value, prefix: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, v) in i {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_keys(v, kv, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (v, kv)) in i.iter().zip(k).enumerate() {
                unknown_keys(v, kv, &format!("{prefix}[{n}]"), out);
            }
        }
        _ => {}
    }
}

fn read_file(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    } else {
        let t: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(t).context("config conversion")
    }
}

/// The environment variable of a dotted key path.
pub fn env_name(path: &str) -> String {
    format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase())
}

fn collect_leaves(v: &Value, prefix: String, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_leaves(v, p, out);
            }
        }
        _ => out.push((prefix, v.clone())),
    }
}

fn parse_like(default: &Value, raw: &str) -> Value {
    match default {
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Value::Bool(true),
            "0" | "false" | "no" | "off" | "" => Value::Bool(false),
            _ => Value::String(raw.into()),
        },
        Value::Number(_) => serde_json::from_str::<serde_json::Number>(raw.trim())
            .map_or_else(|_| Value::String(raw.into()), Value::Number),
        Value::String(_) => Value::String(raw.into()),
        _ => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into())),
    }
}

fn set_path(tree: &mut Value, path: &str, v: Value) -> anyhow::Result<()> {
    let mut cur = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(m) = cur else {
            bail!("{path}: {part} is not a table")
        };
        if i + 1 == parts.len() {
            m.insert((*part).into(), v);
            return Ok(());
        }
        cur = m.entry(*part).or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

/// A commented configuration with fresh secrets, for `holdfast genconfig`.
pub fn generate(hmac_secret: &str, api_key: &str) -> String {
    format!(
        r#"# Holdfast configuration. Every key can also be set through the environment:
# the dotted path upper-cased with HOLDFAST_ in front, e.g. HOLDFAST_HTTP_SERVER_PORT=9000.
# Durations are strings: "300ms", "25s", "5m", "720h".

[http_server]
port = 8000
# internal_port = 9000        # serve /api, /metrics, /health, /ready on a separate port

[client]
# insecure = true             # development only: anonymous connects, every permission
ping_interval = "25s"
pong_timeout = "8s"
channel_limit = 128
queue_max_size = 1048576      # bytes per connection before closing it with 3008 (slow)

[client.token]
hmac_secret_key = "{hmac_secret}"
# rsa_public_key = "-----BEGIN PUBLIC KEY-----..."
# jwks_public_endpoint = "https://example.com/.well-known/jwks.json"

[client.subscribe_to_user_personal_channel]
enabled = true

[http_api]
key = "{api_key}"

[channel.without_namespace]
presence = true
join_leave = true
force_push_join_leave = true
history_size = 100
history_ttl = "300s"
force_recovery = true
# Personal channels (#<user>) live here: a publication sent to a user who is offline is
# delivered when they connect, from the last position any of their devices confirmed.
delivery_cursor = true
# Channels with a # are limited to the users they name (#42, dialog#42,43).
allow_user_limited_channels = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true

[[channel.namespaces]]
name = "chat"
presence = true
join_leave = true
force_push_join_leave = true
history_size = 1000
history_ttl = "24h"
force_recovery = true
allow_user_limited_channels = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true

[engine]
type = "disk"                 # durable: history survives restarts ("memory" keeps it in the process)

[engine.disk]
path = "./holdfast-data"
durability = "fsync"          # or "os": survives a crash of the process, not of the machine

[log]
level = "info"
format = "text"               # or "json"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("holdfast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn toml_env_and_flags_layer_in_order() {
        let p = write(
            "a.toml",
            "[http_server]\nport = 9000\n[client]\ninsecure = false\nping_interval = \"20s\"\n\
             [[channel.namespaces]]\nname = \"chat\"\nhistory_size = 10\nhistory_ttl = \"60s\"\n",
        );
        let env = vec![
            ("HOLDFAST_CLIENT_INSECURE".to_string(), "true".to_string()),
            (
                "HOLDFAST_CLIENT_TOKEN_HMAC_SECRET_KEY".to_string(),
                "s3cret".to_string(),
            ),
            ("HOLDFAST_CLIENT_BOGUS_KEY".to_string(), "1".to_string()),
            ("HOLDFAST_BINARY_PATH".to_string(), "/x".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let l = load(Some(&p), env, &[("http_server.port".into(), "9100".into())]).expect("load");
        let c = l.config;
        assert_eq!(c.http_server.port, 9100, "flags override the file");
        assert!(c.client.insecure, "environment overrides the file");
        assert_eq!(c.client.token.hmac_secret_key, "s3cret");
        assert_eq!(c.client.ping_interval, Duration::from_secs(20));
        assert_eq!(c.channel.namespaces[0].history_size, 10);
        assert_eq!(
            l.unknown,
            vec!["environment variable HOLDFAST_CLIENT_BOGUS_KEY".to_string()]
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn centrifugo_json_is_accepted_and_unsupported_keys_are_named() {
        let p = write(
            "config.json",
            r#"{"client":{"token":{"hmac_secret_key":"secret"},"insecure":true,"allowed_origins":["*"]},
               "http_api":{"key":"k"},"admin":{"enabled":true},"uni_websocket":{"enabled":true},
               "channel":{"without_namespace":{"presence":true,"history_size":100,"history_ttl":"300s","force_recovery":true,"delta_publish":true}}}"#,
        );
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        assert_eq!(l.config.client.token.hmac_secret_key, "secret");
        assert!(l.config.channel.without_namespace.force_recovery);
        assert_eq!(l.config.client.allowed_origins, ["*"]);
        let mut unknown = l.unknown.clone();
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "admin",
                "channel.without_namespace.delta_publish",
                "uni_websocket"
            ]
        );
    }

    #[test]
    fn unknown_values_and_keys_are_named() {
        let p = write("enum.toml", "[engine]\ntype = \"mongo\"\n");
        let err = load(Some(&p), Vec::new(), &[]).unwrap_err().to_string();
        assert!(
            err.contains("engine.type") && err.contains("mongo"),
            "{err}"
        );
        let p = write("fmt.toml", "[log]\nformat = \"xml\"\n");
        let err = load(Some(&p), Vec::new(), &[]).unwrap_err().to_string();
        assert!(err.contains("log.format"), "{err}");
        let env = vec![(
            "HOLDFAST_ENGINE_DISK_DURABILITY".to_string(),
            "sometimes".to_string(),
        )];
        let err = load(None, env, &[]).unwrap_err().to_string();
        assert!(err.contains("engine.disk.durability"), "{err}");
        // Unknown keys inside the sections that embed the node's settings are still found.
        let p = write(
            "keys.toml",
            "[client]\nping_interval = \"20s\"\nbogus = 1\n[client.token]\nhmac_secret_key = \"x\"\n\
             [[channel.namespaces]]\nname = \"ab\"\nnot_an_option = true\n\
             [engine.redis]\naddress = \"redis://h:1\"\nnope = 2\n",
        );
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        let mut unknown = l.unknown.clone();
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "channel.namespaces[0].not_an_option",
                "client.bogus",
                "engine.redis.nope"
            ]
        );
        assert_eq!(l.config.client.ping_interval, Duration::from_secs(20));
        assert_eq!(l.config.engine.redis.addresses, ["redis://h:1"]);
    }

    #[test]
    fn validation_names_history_without_ttl() {
        let p = write("b.toml", "[channel.without_namespace]\nhistory_size = 10\n");
        let c = load(Some(&p), Vec::new(), &[]).expect("load").config;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs[0].key, "channel.without_namespace.history_ttl");
    }

    #[test]
    fn generated_config_loads_and_validates() {
        let p = write("gen.toml", &generate("abc", "def"));
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        assert!(l.unknown.is_empty(), "{:?}", l.unknown);
        assert_eq!(l.config.client.token.hmac_secret_key, "abc");
        assert!(l.config.validate().is_ok());
        assert!(l.config.warnings().is_empty(), "{:?}", l.config.warnings());
    }

    #[test]
    fn warnings_name_the_keys_that_expose_user_bound_channels() {
        let p = write(
            "w.toml",
            "[client.subscribe_to_user_personal_channel]\nenabled = true\n\
             [channel.without_namespace]\nallow_subscribe_for_client = true\n\
             [[channel.namespaces]]\nname = \"chat\"\nallow_subscribe_for_client = true\n\
             allow_history_for_client = true\n\
             [[channel.namespaces]]\nname = \"dm\"\nallow_subscribe_for_client = true\n\
             allow_user_limited_channels = true\n",
        );
        let c = load(Some(&p), Vec::new(), &[]).expect("load").config;
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].key, "channel.namespaces[0].allow_subscribe_for_client");
        assert!(
            w[0].problem
                .contains("channel.namespaces[0].allow_history_for_client")
        );
        assert!(w[0].problem.contains("allow_user_limited_channels"));
        let mut c = c;
        c.client.subscribe_to_user_personal_channel.enabled = false;
        let keys: Vec<String> = c.warnings().into_iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [
                "channel.without_namespace.allow_subscribe_for_client",
                "channel.namespaces[0].allow_subscribe_for_client"
            ],
            "without personal channels the root namespace is not user-limited"
        );
    }
}
