//! `consumers`: asynchronous sources of server API commands (a PostgreSQL outbox table, Redis
//! Streams, NATS JetStream), with Centrifugo's names and shapes so its configs carry over.

use holdfast_core::config::duration;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// One element of the `consumers` list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ConsumerConfig {
    /// Unique name (`^[a-zA-Z0-9_]{2,}$`): metric label, lock and idempotency-key prefix.
    pub name: String,
    /// `postgresql`, `redis_stream` or `nats_jetstream` (Centrifugo's other types are refused
    /// when enabled).
    #[serde(rename = "type")]
    pub kind: String,
    /// Off unless set (as Centrifugo).
    pub enabled: bool,
    /// How often a command failing with a non-temporary error is tried before it is set aside
    /// (a Holdfast addition; Centrifugo skips it at once).
    pub max_attempts: u32,
    /// `type = "postgresql"`.
    pub postgresql: PostgresConsumerConfig,
    /// `type = "redis_stream"`.
    pub redis_stream: RedisStreamConsumerConfig,
    /// `type = "nats_jetstream"`.
    pub nats_jetstream: NatsConsumerConfig,
    /// Sections of types Holdfast does not run (kept so such configs load and say why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<Value>,
    /// See `kafka`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub google_pub_sub: Option<Value>,
    /// See `kafka`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_sqs: Option<Value>,
    /// See `kafka`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure_service_bus: Option<Value>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: String::new(),
            enabled: false,
            max_attempts: 3,
            postgresql: PostgresConsumerConfig::default(),
            redis_stream: RedisStreamConsumerConfig::default(),
            nats_jetstream: NatsConsumerConfig::default(),
            kafka: None,
            google_pub_sub: None,
            aws_sqs: None,
            azure_service_bus: None,
        }
    }
}

/// `consumers[].postgresql`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PostgresConsumerConfig {
    /// `postgresql://user:password@host:port/db?...` (or the key=value form).
    pub dsn: String,
    /// The outbox table (optionally `schema.table`).
    pub outbox_table_name: String,
    /// Partitions, each processed under its own advisory lock by one node at a time.
    pub num_partitions: u32,
    /// Rows read per partition per pass.
    pub partition_select_limit: u32,
    /// Poll interval of a partition (also the fallback when notifications are on).
    #[serde(with = "duration")]
    pub partition_poll_interval: Duration,
    /// `LISTEN` channel whose notifications (payload: the partition) wake a partition at once.
    pub partition_notification_channel: String,
    /// Skip a partition another node holds instead of waiting for its lock.
    pub use_try_lock: bool,
    /// TLS to PostgreSQL.
    pub tls: PgTlsConfig,
}

/// `consumers[].postgresql.tls`: TLS to the database, verified against the given CA.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PgTlsConfig {
    /// Connect with TLS (required: no fallback to plain text).
    pub enabled: bool,
    /// CA certificates (PEM) the server's certificate must chain to; for a publicly signed
    /// server, the system bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub server_ca_pem_file: String,
    /// The same, inline.
    pub server_ca_pem: String,
    /// Client certificate chain (PEM) for certificate authentication.
    pub cert_pem_file: String,
    /// Its private key (PEM).
    pub key_pem_file: String,
}

impl Default for PostgresConsumerConfig {
    fn default() -> Self {
        Self {
            dsn: String::new(),
            outbox_table_name: String::new(),
            num_partitions: 1,
            partition_select_limit: 100,
            partition_poll_interval: Duration::from_millis(300),
            partition_notification_channel: String::new(),
            use_try_lock: false,
            tls: PgTlsConfig::default(),
        }
    }
}

/// `consumers[].redis_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RedisStreamConsumerConfig {
    /// Redis addresses (`redis://host:port/db`); the first is used.
    pub address: Vec<String>,
    /// Streams to read.
    pub streams: Vec<String>,
    /// The consumer group (created at the stream's start when missing).
    pub consumer_group: String,
    /// A message pending longer than this on a consumer that went away is claimed.
    #[serde(with = "duration")]
    pub visibility_timeout: Duration,
    /// Concurrent readers per stream.
    pub num_workers: u32,
    /// Field holding the method.
    pub method_value: String,
    /// Field holding the payload.
    pub payload_value: String,
    /// Messages carry just the publication (data in `payload_value`, the rest in fields).
    pub publication_data_mode: PublicationDataMode,
}

impl Default for RedisStreamConsumerConfig {
    fn default() -> Self {
        Self {
            address: Vec::new(),
            streams: Vec::new(),
            consumer_group: String::new(),
            visibility_timeout: Duration::from_secs(30),
            num_workers: 1,
            method_value: "method".into(),
            payload_value: "payload".into(),
            publication_data_mode: PublicationDataMode::default(),
        }
    }
}

/// `consumers[].nats_jetstream`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NatsConsumerConfig {
    /// `nats://host:port`.
    pub url: String,
    /// Subjects the consumer filters on.
    pub subjects: Vec<String>,
    /// The JetStream stream (it must exist).
    pub stream_name: String,
    /// The durable pull consumer (created when missing).
    pub durable_consumer_name: String,
    /// `new` or `all` (when the durable consumer is created).
    pub deliver_policy: String,
    /// Messages unacknowledged at most.
    pub max_ack_pending: i64,
    /// An unacknowledged message is delivered again after this (when the durable consumer is
    /// created; a Holdfast addition).
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Header holding the method; without it the body is `{"method":…,"payload":…}`.
    pub method_header: String,
    /// Messages carry just the publication (the body is the data, the rest in headers).
    pub publication_data_mode: PublicationDataMode,
}

impl Default for NatsConsumerConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            subjects: Vec::new(),
            stream_name: String::new(),
            durable_consumer_name: String::new(),
            deliver_policy: "new".into(),
            max_ack_pending: 100,
            ack_wait: Duration::from_secs(30),
            method_header: "centrifugo-method".into(),
            publication_data_mode: PublicationDataMode::default(),
        }
    }
}

/// Publication data mode: where a message's channels, idempotency key, delta flag, version
/// and tags are found (stream fields or NATS headers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PublicationDataMode {
    /// On: the payload is the publication's data.
    pub enabled: bool,
    /// Comma-separated channels (Redis: `channels_value`, NATS: `channels_header`).
    #[serde(alias = "channels_header")]
    pub channels_value: String,
    /// Idempotency key.
    #[serde(alias = "idempotency_key_header")]
    pub idempotency_key_value: String,
    /// `true` for a delta publication.
    #[serde(alias = "delta_header")]
    pub delta_value: String,
    /// Version (latest-state publishing).
    #[serde(alias = "version_header")]
    pub version_value: String,
    /// Version epoch.
    #[serde(alias = "version_epoch_header")]
    pub version_epoch_value: String,
    /// Prefix of fields that become tags.
    #[serde(alias = "tags_header_prefix")]
    pub tags_value_prefix: String,
}

impl Default for PublicationDataMode {
    fn default() -> Self {
        Self {
            enabled: false,
            channels_value: "centrifugo-channels".into(),
            idempotency_key_value: "centrifugo-idempotency-key".into(),
            delta_value: "centrifugo-delta".into(),
            version_value: "centrifugo-version".into(),
            version_epoch_value: "centrifugo-version-epoch".into(),
            tags_value_prefix: "centrifugo-tag-".into(),
        }
    }
}

/// Types Holdfast runs.
pub const SUPPORTED: &[&str] = &["postgresql", "redis_stream", "nats_jetstream"];
/// Centrifugo's types Holdfast does not run (no broker to test against here).
pub const UNSUPPORTED: &[&str] = &["kafka", "google_pub_sub", "aws_sqs", "azure_service_bus"];

/// A plain or schema-qualified SQL identifier: letters, digits, `_`, at most 63 bytes a part.
pub fn valid_table_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && !p.as_bytes()[0].is_ascii_digit()
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// Problems of the `consumers` list as `(key, problem)`.
pub fn validate(consumers: &[ConsumerConfig]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, c) in consumers.iter().enumerate() {
        let key = |k: &str| format!("consumers[{i}].{k}");
        let mut e = |k: &str, p: &str| out.push((key(k), p.to_owned()));
        if c.name.len() < 2
            || c.name.len() > 64
            || !c
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            e("name", "must match ^[a-zA-Z0-9_]{2,64}$");
        } else if !names.insert(c.name.clone()) {
            e("name", "must be unique");
        }
        if !c.enabled {
            continue;
        }
        if c.max_attempts == 0 || c.max_attempts > 100 {
            e("max_attempts", "must be in 1..100");
        }
        match c.kind.as_str() {
            "postgresql" => {
                let p = &c.postgresql;
                if p.dsn.is_empty() {
                    e("postgresql.dsn", "required");
                } else if p.dsn.parse::<tokio_postgres::Config>().is_err() {
                    e("postgresql.dsn", "not a PostgreSQL connection string");
                }
                if !valid_table_name(&p.outbox_table_name) {
                    e(
                        "postgresql.outbox_table_name",
                        "must be a table name (letters, digits, _; optionally schema.table)",
                    );
                }
                if p.num_partitions == 0 || p.num_partitions > 1024 {
                    e("postgresql.num_partitions", "must be in 1..1024");
                }
                if p.partition_select_limit == 0 || p.partition_select_limit > 10_000 {
                    e("postgresql.partition_select_limit", "must be in 1..10000");
                }
                if p.partition_poll_interval.is_zero() {
                    e("postgresql.partition_poll_interval", "must be positive");
                }
                if p.tls.enabled
                    && p.tls.server_ca_pem_file.is_empty()
                    && p.tls.server_ca_pem.is_empty()
                {
                    e(
                        "postgresql.tls",
                        "enabled TLS needs server_ca_pem_file or server_ca_pem (for a publicly signed server: /etc/ssl/certs/ca-certificates.crt)",
                    );
                }
                if p.tls.cert_pem_file.is_empty() != p.tls.key_pem_file.is_empty() {
                    e(
                        "postgresql.tls",
                        "cert_pem_file and key_pem_file go together",
                    );
                }
                let ch = &p.partition_notification_channel;
                if !ch.is_empty() && !valid_table_name(ch) || ch.contains('.') {
                    e(
                        "postgresql.partition_notification_channel",
                        "must be a channel name (letters, digits, _)",
                    );
                }
            }
            "redis_stream" => {
                let r = &c.redis_stream;
                if r.address.is_empty() {
                    e("redis_stream.address", "required");
                }
                if r.streams.is_empty() || r.streams.iter().any(String::is_empty) {
                    e("redis_stream.streams", "name at least one stream");
                }
                if r.consumer_group.is_empty() {
                    e("redis_stream.consumer_group", "required");
                }
                if r.num_workers == 0 || r.num_workers > 64 {
                    e("redis_stream.num_workers", "must be in 1..64");
                }
                if r.visibility_timeout < Duration::from_millis(100) {
                    e("redis_stream.visibility_timeout", "must be at least 100ms");
                }
            }
            "nats_jetstream" => {
                let n = &c.nats_jetstream;
                if n.url.is_empty() {
                    e("nats_jetstream.url", "required");
                }
                if n.stream_name.is_empty() {
                    e("nats_jetstream.stream_name", "required");
                }
                if n.durable_consumer_name.is_empty() {
                    e("nats_jetstream.durable_consumer_name", "required");
                }
                if !matches!(n.deliver_policy.as_str(), "new" | "all") {
                    e("nats_jetstream.deliver_policy", "must be new or all");
                }
                if n.max_ack_pending <= 0 {
                    e("nats_jetstream.max_ack_pending", "must be positive");
                }
                if n.ack_wait < Duration::from_millis(100) {
                    e("nats_jetstream.ack_wait", "must be at least 100ms");
                }
            }
            t if UNSUPPORTED.contains(&t) => e(
                "type",
                &format!(
                    "{t} consumers are not supported by Holdfast (supported: {}); disable this consumer or move its producer to one of those",
                    SUPPORTED.join(", ")
                ),
            ),
            "" => e("type", "required"),
            t => e(
                "type",
                &format!(
                    "unknown consumer type {t:?} (supported: {})",
                    SUPPORTED.join(", ")
                ),
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(name: &str) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            kind: "postgresql".into(),
            enabled: true,
            postgresql: PostgresConsumerConfig {
                dsn: "postgresql://u@localhost:5432/db".into(),
                outbox_table_name: "outbox".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn names_types_and_tables_are_checked() {
        assert!(validate(&[pg("ok_1")]).is_empty());
        let bad_table = ConsumerConfig {
            postgresql: PostgresConsumerConfig {
                outbox_table_name: "outbox; drop table x".into(),
                ..pg("a1").postgresql
            },
            ..pg("a1")
        };
        let kafka = ConsumerConfig {
            kind: "kafka".into(),
            ..pg("k1")
        };
        let errs = validate(&[pg("x"), pg("dup"), pg("dup"), bad_table, kafka]);
        let keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "consumers[0].name",
                "consumers[2].name",
                "consumers[3].postgresql.outbox_table_name",
                "consumers[4].type"
            ]
        );
        assert!(errs[3].1.contains("not supported"));
        assert!(valid_table_name("app.outbox_2"));
        assert!(!valid_table_name("a.b.c") && !valid_table_name("1x") && !valid_table_name(""));
    }
}
