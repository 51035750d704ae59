//! `holdfast genconfig`'s configuration, and the warnings `checkconfig` and `serve` give about
//! valid combinations that expose data.

use super::*;

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
        if self.admin.enabled && self.admin.insecure {
            w(
                "admin.insecure".into(),
                "the admin UI answers without a password: anyone who reaches it can read the \
                 configuration, publish and disconnect users"
                    .into(),
            );
        } else if self.admin.active()
            && [
                &self.client.token.hmac_secret_key,
                &self.client.subscription_token.hmac_secret_key,
            ]
            .iter()
            .any(|k| !k.is_empty() && **k == self.admin.secret)
        {
            w(
                "admin.secret".into(),
                "equals a token HMAC key: use a secret of its own for admin sessions".into(),
            );
        } else if self.admin.enabled && !self.admin.active() {
            w(
                "admin.enabled".into(),
                "the admin UI stays off: set admin.password and admin.secret (or admin.insecure \
                 for development)"
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
