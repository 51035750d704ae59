//! Node configuration: client limits and timers, channel namespaces and their options.
//!
//! Key names and nesting follow Centrifugo v6 (`client.*`, `channel.*`) so an existing
//! configuration carries over. Durations are strings such as `"25s"`, `"720h"` or `"1m30s"`.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Everything the node needs to know; the server's file format embeds these sections.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NodeConfig {
    /// Client connection behaviour.
    pub client: ClientConfig,
    /// Channel naming and namespaces.
    pub channel: ChannelConfig,
}

/// `client.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClientConfig {
    /// Allow everything: anonymous connects, every channel operation. Development only.
    pub insecure: bool,
    /// Anonymous connections without a token are allowed.
    pub allow_anonymous_connect_without_token: bool,
    /// Tokens with an empty `sub` are refused (3507).
    pub disallow_anonymous_connection_tokens: bool,
    /// Interval between server pings.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// How long a client may take to answer a ping (3012 after that).
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    /// A connection that sends no `connect` within this delay is closed with 3502.
    #[serde(with = "duration")]
    pub stale_close_delay: Duration,
    /// Grace period after the connection token expires before closing with 3005.
    #[serde(with = "duration")]
    pub expired_close_delay: Duration,
    /// Grace period after a subscription token expires before unsubscribing with 2501.
    #[serde(with = "duration")]
    pub expired_sub_close_delay: Duration,
    /// Maximum subscriptions per connection (106; 3505 for server-side ones).
    pub channel_limit: usize,
    /// Maximum connections per user on this node (0 = unlimited; 3504).
    pub user_connection_limit: usize,
    /// Commands a connection may send per second on average (0 = unlimited); excess gets 111.
    pub command_rate_limit: u32,
    /// Commands a connection may send at once above the average rate.
    pub command_burst: u32,
    /// Commands refused in a row (111) after which the connection is closed with 3013.
    pub command_excess_disconnect: u32,
    /// Outbound queue limit per connection in bytes; overflow closes with 3008.
    pub queue_max_size: usize,
    /// Cap on publications returned by a client `history` call.
    pub history_max_publication_limit: usize,
    /// Cap on publications recovered on subscribe; beyond it the client is told recovered:false.
    pub recovery_max_publication_limit: usize,
    /// Include the server time in the connect result.
    pub connect_include_server_time: bool,
    /// Holdfast extension: after a delivery on a channel with a delivery cursor, ask for a pong
    /// within this delay (an extra ping), so the cursor is confirmed promptly instead of at the
    /// next regular ping. Connections with nothing delivered send no extra ping. 0 = regular
    /// pings only.
    #[serde(with = "duration")]
    pub delivery_cursor_confirm_delay: Duration,
    /// Centrifugo PRO's write delay: after a wake-up the connection's writer waits this long
    /// before writing, so one write carries whatever arrived meanwhile (fewer system calls per
    /// delivery, each message up to this much later). 0 = write at once.
    #[serde(with = "duration")]
    pub write_delay: Duration,
    /// Most messages joined into one transport frame (newline-separated JSON, length-delimited
    /// protobuf); 0 = no limit.
    pub max_messages_in_frame: usize,
    /// Server-side subscription to the user's personal channel.
    pub subscribe_to_user_personal_channel: PersonalChannelConfig,
    /// How a refused connect on a unidirectional transport (which reads no error replies)
    /// becomes a disconnect.
    pub connect_code_to_unidirectional_disconnect: UniDisconnectConfig,
}

/// `client.connect_code_to_unidirectional_disconnect.*`: a unidirectional client cannot read
/// an error reply, so a connect refused with an error code closes the connection with a
/// disconnect code. Built in, as on Centrifugo: 109 and 110 → 3005, 111 → 3013, 103 → 3507,
/// any other → 3004. With `enabled`, `transforms` are looked at first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UniDisconnectConfig {
    /// Use `transforms`.
    pub enabled: bool,
    /// Error code → disconnect, first match wins.
    pub transforms: Vec<UniDisconnectTransform>,
}

/// One `transforms` entry: `{code = 101, to = {code = 4501, reason = "unauthorized"}}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UniDisconnectTransform {
    /// The error code of the refused connect.
    pub code: u32,
    /// The disconnect to close with.
    pub to: DisconnectTo,
}

/// A disconnect code and reason in configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DisconnectTo {
    /// Disconnect code (3000–4999).
    pub code: u16,
    /// Reason text (at most 123 bytes, the limit of a WebSocket close reason).
    pub reason: String,
}

impl UniDisconnectConfig {
    /// The disconnect for a connect refused with error `code`.
    pub fn disconnect_for(&self, code: u32) -> holdfast_protocol::Disconnect {
        use holdfast_protocol::Disconnect;
        use holdfast_protocol::code::error_code as e;
        if self.enabled
            && let Some(t) = self.transforms.iter().find(|t| t.code == code)
        {
            return Disconnect::new(t.to.code, t.to.reason.clone());
        }
        match code {
            e::TOKEN_EXPIRED | e::EXPIRED => Disconnect::EXPIRED,
            e::TOO_MANY_REQUESTS => Disconnect::TOO_MANY_REQUESTS,
            e::PERMISSION_DENIED => Disconnect::PERMISSION_DENIED,
            _ => Disconnect::SERVER_ERROR,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            allow_anonymous_connect_without_token: false,
            disallow_anonymous_connection_tokens: false,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            stale_close_delay: Duration::from_secs(10),
            expired_close_delay: Duration::from_secs(25),
            expired_sub_close_delay: Duration::from_secs(25),
            channel_limit: 128,
            user_connection_limit: 0,
            command_rate_limit: 100,
            command_burst: 200,
            command_excess_disconnect: 50,
            queue_max_size: 1 << 20,
            history_max_publication_limit: 300,
            recovery_max_publication_limit: 300,
            connect_include_server_time: false,
            delivery_cursor_confirm_delay: Duration::from_millis(500),
            write_delay: Duration::ZERO,
            max_messages_in_frame: crate::transport::MAX_MESSAGES_PER_FRAME,
            subscribe_to_user_personal_channel: PersonalChannelConfig::default(),
            connect_code_to_unidirectional_disconnect: UniDisconnectConfig::default(),
        }
    }
}

/// `client.subscribe_to_user_personal_channel.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PersonalChannelConfig {
    /// Subscribe every authenticated connection to `[ns:]#<user>`.
    pub enabled: bool,
    /// Namespace of the personal channel (empty = no namespace).
    pub personal_channel_namespace: String,
    /// Only one connection per user: a new connection closes older ones with 3504.
    pub single_connection: bool,
}

/// `channel.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ChannelConfig {
    /// Options of channels without a namespace.
    pub without_namespace: ChannelOptions,
    /// Named namespaces: a channel `ns:rest` uses the namespace `ns`.
    pub namespaces: Vec<ChannelOptions>,
    /// Default lifetime of a stream's epoch and top offset.
    #[serde(with = "duration")]
    pub history_meta_ttl: Duration,
    /// Longest channel name accepted (107 beyond).
    pub max_length: usize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            without_namespace: ChannelOptions::default(),
            namespaces: Vec::new(),
            history_meta_ttl: Duration::from_secs(720 * 3600),
            max_length: 255,
        }
    }
}

/// The one delta compression clients speak.
pub const FOSSIL: &str = "fossil";

/// Options of one namespace (§7.2 of the protocol reference).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ChannelOptions {
    /// Namespace name (only in `channel.namespaces`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Keep presence (needed for presence calls and join/leave).
    pub presence: bool,
    /// Emit join/leave events.
    pub join_leave: bool,
    /// Push join/leave to every subscriber without opt-in.
    pub force_push_join_leave: bool,
    /// Publications kept per channel (needs `history_ttl`).
    pub history_size: usize,
    /// How long publications are kept.
    #[serde(with = "duration")]
    pub history_ttl: Duration,
    /// Lifetime of a stream's epoch and offset (defaults to `channel.history_meta_ttl`).
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub history_meta_ttl: Option<Duration>,
    /// Every subscription is positioned (loss detection).
    pub force_positioning: bool,
    /// Clients may ask for positioning.
    pub allow_positioning: bool,
    /// Every subscription is recoverable.
    pub force_recovery: bool,
    /// Clients may ask for recovery.
    pub allow_recovery: bool,
    /// Authenticated users may subscribe without a token.
    pub allow_subscribe_for_client: bool,
    /// Anonymous users may subscribe (with `allow_subscribe_for_client`).
    pub allow_subscribe_for_anonymous: bool,
    /// Authenticated users may publish.
    pub allow_publish_for_client: bool,
    /// Subscribers may publish.
    pub allow_publish_for_subscriber: bool,
    /// Anonymous users may publish (with one of the above).
    pub allow_publish_for_anonymous: bool,
    /// Authenticated users may call presence.
    pub allow_presence_for_client: bool,
    /// Subscribers may call presence.
    pub allow_presence_for_subscriber: bool,
    /// Anonymous users may call presence.
    pub allow_presence_for_anonymous: bool,
    /// Authenticated users may read history.
    pub allow_history_for_client: bool,
    /// Subscribers may read history.
    pub allow_history_for_subscriber: bool,
    /// Anonymous users may read history.
    pub allow_history_for_anonymous: bool,
    /// `chat#42,43` channels may be subscribed by the listed users only.
    pub allow_user_limited_channels: bool,
    /// Holdfast extension: keep, per user, the last position confirmed delivered on server-side
    /// subscriptions (by pong or `holdfast.ack`), and recover a connection that presents no
    /// position from it. Needs history and `force_recovery`.
    pub delivery_cursor: bool,
    /// Delta compressions subscribers may ask for (only `"fossil"` exists).
    pub allowed_delta_types: Vec<String>,
    /// Every publication in the namespace may go out as a delta (as API `delta: true`).
    pub delta_publish: bool,
    /// Subscribers may give a tag filter (`tf`).
    pub allow_tags_filter: bool,
    /// Subscribers may ask for channel compaction (pushes name the subscription by a number).
    pub allow_channel_compaction: bool,
    /// Subscriptions are decided by the subscribe proxy.
    pub subscribe_proxy_enabled: bool,
    /// Named proxy for subscriptions (empty = `channel.proxy.subscribe`).
    pub subscribe_proxy_name: String,
    /// Client publications go through the publish proxy.
    pub publish_proxy_enabled: bool,
    /// Named proxy for publications.
    pub publish_proxy_name: String,
    /// Expiring subscriptions are renewed by the sub_refresh proxy.
    pub sub_refresh_proxy_enabled: bool,
    /// Named proxy for subscription refresh.
    pub sub_refresh_proxy_name: String,
    /// What subscribers of the namespace's channels get: a stream of publications (`stream`)
    /// or keyed state kept in sync (`map`).
    pub subscription_type: SubscriptionType,
    /// Map channels' options (with a map `subscription_type`).
    pub map: MapOptions,
    /// Every subscriber of this namespace's channels is an entry (key: its connection id,
    /// `info`: its client info) of the channel named by this prefix and the channel, in a
    /// `map_clients` namespace: added on subscribe, removed on unsubscribe or disconnect.
    pub map_clients_presence_channel_prefix: String,
    /// Every subscribed user of this namespace's channels is an entry (key: the user id) of
    /// the channel named by this prefix and the channel, in a `map_users` namespace: added on
    /// subscribe, kept while the user has a subscription, removed by its `key_ttl` after the
    /// last one ends. Anonymous subscribers are not entered.
    pub map_users_presence_channel_prefix: String,
}

/// `subscription_type` of a namespace.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionType {
    /// Publications in order (the default).
    #[default]
    Stream,
    /// Keyed state: a snapshot on subscribe, then every change.
    Map,
    /// Connection presence as a map, written by the server
    /// (`map_clients_presence_channel_prefix`).
    MapClients,
    /// User presence as a map, written by the server (`map_users_presence_channel_prefix`).
    MapUsers,
    /// Shared polls (not built yet: refused at start).
    SharedPoll,
}

impl SubscriptionType {
    /// Whether subscribers get keyed state.
    pub fn is_map(self) -> bool {
        matches!(self, Self::Map | Self::MapClients | Self::MapUsers)
    }

    /// The `type` a client's subscribe request carries for it.
    pub fn wire(self) -> i32 {
        match self {
            Self::Stream => 0,
            Self::Map => 1,
            Self::MapClients => 2,
            Self::MapUsers => 3,
            Self::SharedPoll => 4,
        }
    }
}

/// `map.mode`: how long keys live and whether subscribers can catch up after a disconnect.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MapMode {
    /// Keys expire by `key_ttl`; a reconnecting subscriber gets a fresh snapshot.
    Ephemeral,
    /// Keys expire by `key_ttl`; a reconnecting subscriber catches up from the change stream.
    #[serde(alias = "durable")]
    Recoverable,
    /// Keys never expire; a reconnecting subscriber catches up from the change stream.
    Persistent,
}

/// A map namespace's `map` table (Centrifugo's names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MapOptions {
    /// Required with a map `subscription_type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<MapMode>,
    /// Keys expire this long after their last write (ephemeral and recoverable modes).
    #[serde(with = "duration")]
    pub key_ttl: Duration,
    /// Change stream entries kept (recoverable and persistent; 0 = 100).
    pub stream_size: usize,
    /// How long change stream entries are kept (0 = 1m).
    #[serde(with = "duration")]
    pub stream_ttl: Duration,
    /// Lifetime of the map's epoch after its last use (0 = `channel.history_meta_ttl`).
    #[serde(with = "duration")]
    pub meta_ttl: Duration,
    /// Authenticated users may write keys.
    pub allow_publish_for_client: bool,
    /// Subscribers may write keys.
    pub allow_publish_for_subscriber: bool,
    /// Anonymous users may write keys (with one of the above).
    pub allow_publish_for_anonymous: bool,
    /// Authenticated users may remove keys.
    pub allow_remove_for_client: bool,
    /// Subscribers may remove keys.
    pub allow_remove_for_subscriber: bool,
    /// Anonymous users may remove keys (with one of the above).
    pub allow_remove_for_anonymous: bool,
    /// A client's write goes to its own key: `client_id` or `user_id` (empty = the key the
    /// client names).
    pub client_key: String,
    /// Page size when a subscriber asks for none.
    pub default_page_size: usize,
    /// Smallest page size a subscriber gets.
    pub min_page_size: usize,
    /// Largest page size a subscriber gets.
    pub max_page_size: usize,
    /// Holdfast bound: most keys per channel (a write of a new key beyond it is refused).
    pub max_keys: usize,
    /// Holdfast bound: longest key in bytes.
    pub max_key_length: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        Self {
            mode: None,
            key_ttl: Duration::ZERO,
            stream_size: 0,
            stream_ttl: Duration::ZERO,
            meta_ttl: Duration::ZERO,
            allow_publish_for_client: false,
            allow_publish_for_subscriber: false,
            allow_publish_for_anonymous: false,
            allow_remove_for_client: false,
            allow_remove_for_subscriber: false,
            allow_remove_for_anonymous: false,
            client_key: String::new(),
            default_page_size: 100,
            min_page_size: 100,
            max_page_size: 1000,
            max_keys: 1_000_000,
            max_key_length: 256,
        }
    }
}

impl MapOptions {
    /// Whether reconnecting subscribers catch up from the change stream.
    pub fn recoverable(&self) -> bool {
        matches!(self.mode, Some(MapMode::Recoverable | MapMode::Persistent))
    }

    /// The page size for a subscriber asking for `limit` (0 = default).
    pub fn page_size(&self, limit: i32) -> usize {
        let asked = usize::try_from(limit).unwrap_or(0);
        let size = if asked == 0 {
            self.default_page_size
        } else {
            asked
        };
        size.clamp(self.min_page_size.max(1), self.max_page_size.max(1))
    }
}

impl ChannelOptions {
    /// Whether channels of this namespace keep history.
    pub fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    /// Whether subscribers may negotiate fossil delta compression.
    pub fn allows_fossil(&self) -> bool {
        self.allowed_delta_types.iter().any(|t| t == FOSSIL)
    }
}

/// The map rules of one namespace.
fn check_map(o: &ChannelOptions, e: &mut impl FnMut(&str, &str)) {
    let m = &o.map;
    match o.subscription_type {
        SubscriptionType::Stream => {
            if m.mode.is_some() {
                e(
                    "map.mode",
                    "set for a stream namespace (subscription_type = \"map\" is missing)",
                );
            }
            return;
        }
        SubscriptionType::Map => {}
        SubscriptionType::MapClients | SubscriptionType::MapUsers => {
            if m.mode == Some(MapMode::Persistent) {
                e(
                    "map.mode",
                    "presence maps need expiring keys: ephemeral or recoverable",
                );
            }
            if !m.key_ttl.is_zero() && m.key_ttl < Duration::from_secs(3) {
                // The node refreshes entries every key_ttl / 3 (at least 1 s).
                e("map.key_ttl", "at least 3s for presence maps");
            }
        }
        SubscriptionType::SharedPoll => {
            e(
                "subscription_type",
                "shared_poll is not supported yet (stream, map, map_clients and map_users are)",
            );
            return;
        }
    }
    match m.mode {
        None => e(
            "map.mode",
            "required for a map namespace: ephemeral, recoverable or persistent",
        ),
        Some(MapMode::Persistent) if !m.key_ttl.is_zero() => e(
            "map.key_ttl",
            "persistent keys never expire (leave key_ttl unset)",
        ),
        Some(MapMode::Ephemeral | MapMode::Recoverable) if m.key_ttl.is_zero() => {
            e("map.key_ttl", "required for ephemeral and recoverable maps")
        }
        Some(MapMode::Ephemeral) if m.stream_size > 0 || !m.stream_ttl.is_zero() => e(
            "map.stream_size",
            "an ephemeral map keeps no change stream for clients (use recoverable)",
        ),
        _ => {}
    }
    if o.history_enabled() || o.force_recovery || o.force_positioning || o.delivery_cursor {
        e(
            "history_size",
            "a map namespace keeps its change stream in map.stream_size and map.stream_ttl",
        );
    }
    if !matches!(m.client_key.as_str(), "" | "client_id" | "user_id") {
        e("map.client_key", "client_id, user_id or empty");
    }
    if m.min_page_size == 0 || m.min_page_size > m.max_page_size {
        e(
            "map.min_page_size",
            "must be at least 1 and at most map.max_page_size",
        );
    }
    if m.max_page_size > 10_000 {
        e("map.max_page_size", "at most 10000");
    }
    if m.max_keys == 0 || m.max_key_length == 0 {
        e(
            "map.max_keys",
            "max_keys and max_key_length must be at least 1",
        );
    }
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// Dotted path of the offending key.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl NodeConfig {
    /// Checks the rules a running node depends on.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errs = Vec::new();
        let mut err = |key: String, problem: &str| {
            errs.push(ConfigError {
                key,
                problem: problem.to_owned(),
            });
        };
        let c = &self.client;
        if c.ping_interval.is_zero() || c.ping_interval <= c.pong_timeout {
            err(
                "client.ping_interval".into(),
                "must be greater than client.pong_timeout",
            );
        }
        for (i, t) in c
            .connect_code_to_unidirectional_disconnect
            .transforms
            .iter()
            .enumerate()
        {
            if !(3000..=4999).contains(&t.to.code) || t.to.reason.len() > 123 {
                err(
                    format!("client.connect_code_to_unidirectional_disconnect.transforms[{i}].to"),
                    "code must be in 3000-4999 and reason at most 123 bytes",
                );
            }
        }
        if !c.delivery_cursor_confirm_delay.is_zero()
            && c.delivery_cursor_confirm_delay >= c.ping_interval
        {
            err(
                "client.delivery_cursor_confirm_delay".into(),
                "must be shorter than client.ping_interval (or 0 to use regular pings only)",
            );
        }
        if c.write_delay > Duration::from_secs(1) {
            err(
                "client.write_delay".into(),
                "at most 1s (it delays every message of every connection)",
            );
        }
        if c.queue_max_size < 1024 {
            err(
                "client.queue_max_size".into(),
                "must be at least 1024 bytes",
            );
        }
        if c.channel_limit == 0 {
            err("client.channel_limit".into(), "must be at least 1");
        }
        if c.command_rate_limit > 0 && c.command_burst == 0 {
            err(
                "client.command_burst".into(),
                "must be at least 1 when client.command_rate_limit is set",
            );
        }
        if c.command_rate_limit > 0 && c.command_excess_disconnect == 0 {
            err(
                "client.command_excess_disconnect".into(),
                "must be at least 1 when client.command_rate_limit is set",
            );
        }
        let check = |prefix: &str, o: &ChannelOptions, errs: &mut Vec<ConfigError>| {
            let mut e = |k: &str, p: &str| {
                errs.push(ConfigError {
                    key: format!("{prefix}.{k}"),
                    problem: p.to_owned(),
                });
            };
            if o.history_size > 0 && o.history_ttl.is_zero() {
                e(
                    "history_ttl",
                    "history_size is set but history_ttl is not (both are needed)",
                );
            }
            if o.history_size == 0 && !o.history_ttl.is_zero() {
                e(
                    "history_size",
                    "history_ttl is set but history_size is not (both are needed)",
                );
            }
            if o.force_recovery && !o.history_enabled() {
                e(
                    "force_recovery",
                    "recovery needs history_size and history_ttl",
                );
            }
            if o.delivery_cursor && !o.force_recovery {
                e(
                    "delivery_cursor",
                    "delivery cursors need history and force_recovery",
                );
            }
            for t in &o.allowed_delta_types {
                if t != FOSSIL {
                    e(
                        "allowed_delta_types",
                        &format!("unknown delta type {t:?} (only \"fossil\" exists)"),
                    );
                }
            }
            if let Some(meta) = o.history_meta_ttl
                && meta < o.history_ttl
            {
                e("history_meta_ttl", "must not be shorter than history_ttl");
            }
            check_map(o, &mut e);
        };
        check(
            "channel.without_namespace",
            &self.channel.without_namespace,
            &mut errs,
        );
        if !self.channel.without_namespace.name.is_empty() {
            errs.push(ConfigError {
                key: "channel.without_namespace.name".into(),
                problem: "only namespaces have names".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for (i, ns) in self.channel.namespaces.iter().enumerate() {
            let prefix = format!("channel.namespaces[{i}]");
            if !valid_namespace_name(&ns.name) {
                errs.push(ConfigError {
                    key: format!("{prefix}.name"),
                    problem: format!(
                        "{:?} is not a valid namespace name (two or more of a-z A-Z 0-9 - _ .)",
                        ns.name
                    ),
                });
            } else if !seen.insert(ns.name.as_str()) {
                errs.push(ConfigError {
                    key: format!("{prefix}.name"),
                    problem: format!("namespace {:?} is defined twice", ns.name),
                });
            }
            check(&prefix, ns, &mut errs);
        }
        let rules = crate::channel::ChannelRules::new(&self.channel);
        let all = std::iter::once((
            "channel.without_namespace".to_owned(),
            &self.channel.without_namespace,
        ))
        .chain(
            self.channel
                .namespaces
                .iter()
                .enumerate()
                .map(|(i, ns)| (format!("channel.namespaces[{i}]"), ns)),
        );
        for (prefix_key, ns) in all {
            for (key, prefix, want) in [
                (
                    "map_clients_presence_channel_prefix",
                    &ns.map_clients_presence_channel_prefix,
                    SubscriptionType::MapClients,
                ),
                (
                    "map_users_presence_channel_prefix",
                    &ns.map_users_presence_channel_prefix,
                    SubscriptionType::MapUsers,
                ),
            ] {
                if prefix.is_empty() {
                    continue;
                }
                let ok = rules
                    .resolve(&format!("{prefix}x"))
                    .is_ok_and(|r| r.options.subscription_type == want);
                if !ok || ns.subscription_type.is_map() {
                    errs.push(ConfigError {
                        key: format!("{prefix_key}.{key}"),
                        problem: format!(
                            "{prefix:?} must name a namespace of subscription_type {want:?} (e.g. \"clients:\"), on a stream namespace"
                        ),
                    });
                }
            }
        }
        let personal = &c.subscribe_to_user_personal_channel;
        if personal.enabled
            && !personal.personal_channel_namespace.is_empty()
            && !self
                .channel
                .namespaces
                .iter()
                .any(|n| n.name == personal.personal_channel_namespace)
        {
            errs.push(ConfigError {
                key: "client.subscribe_to_user_personal_channel.personal_channel_namespace".into(),
                problem: "names a namespace that is not defined".into(),
            });
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

fn valid_namespace_name(name: &str) -> bool {
    name.len() >= 2
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parses a duration written as `"300ms"`, `"25s"`, `"1m30s"`, `"720h"` (or a bare number of
/// seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() || s == "0" {
        return Ok(Duration::ZERO);
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return Err(format!("invalid duration {s:?}"));
        }
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let secs = match unit {
            "ns" => n / 1e9,
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => {
                return Err(format!(
                    "invalid duration unit {unit:?} in {s:?} (use ms, s, m, h)"
                ));
            }
        };
        total += Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serde helpers for `"25s"`-style durations (numbers are seconds).
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer, de};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Str(String),
        Int(u64),
        Float(f64),
    }

    /// Serialize as a string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Deserialize from a string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Str(s) => super::parse_duration(&s).map_err(de::Error::custom),
            Raw::Int(n) => Ok(Duration::from_secs(n)),
            Raw::Float(f) => Duration::try_from_secs_f64(f).map_err(de::Error::custom),
        }
    }
}

/// Serde helpers for optional durations.
pub mod opt_duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// Serialize `Some` as a string.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Deserialize a present value.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("720h"), Ok(Duration::from_secs(720 * 3600)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        for d in ["25s", "720h", "300ms", "5m"] {
            assert_eq!(format_duration(parse_duration(d).unwrap_or_default()), d);
        }
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = NodeConfig::default();
        c.channel.namespaces.push(ChannelOptions {
            name: "chat".into(),
            history_size: 10,
            ..Default::default()
        });
        c.channel.namespaces.push(ChannelOptions {
            name: "x".into(),
            ..Default::default()
        });
        let errs = c.validate().unwrap_err();
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "channel.namespaces[0].history_ttl",
                "channel.namespaces[1].name"
            ]
        );
        assert!(NodeConfig::default().validate().is_ok());
    }
}
