//! The engine's settings (`engine.redis.*`) and where its instances are.

use super::*;

/// Redis engine settings (`engine.redis.*`, deserialised from the server's configuration as
/// they are).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` (`rediss://` for TLS), one per
    /// independent instance (channels are spread over them), or a single
    /// `redis+cluster://host:port[,host:port…]` naming seed nodes of a Redis Cluster. In the
    /// configuration `address`: one string or a list.
    #[serde(rename = "address", deserialize_with = "one_or_many")]
    pub addresses: Vec<String>,
    /// Prefix of every key and pub/sub channel (several Holdfast clusters can share a Redis).
    pub prefix: String,
    /// Hash-tag partitions channels are spread over (keys of one channel share one).
    /// Changing it changes key names: streams start over with new epochs.
    pub partitions: u32,
    /// Pub/sub connections per instance (channels hashed over them).
    pub pubsub_shards: usize,
    /// Connect timeout.
    #[serde(with = "holdfast_core::config::duration")]
    pub connect_timeout: Duration,
    /// Command timeout: a publish against an unreachable Redis fails after at most this.
    #[serde(with = "holdfast_core::config::duration")]
    pub command_timeout: Duration,
    /// How often each pub/sub connection is probed.
    #[serde(with = "holdfast_core::config::duration")]
    pub ping_interval: Duration,
    /// Presence entries expire this long after their node last refreshed them.
    #[serde(with = "holdfast_core::config::duration")]
    pub presence_ttl: Duration,
    /// TLS to Redis (also on for `rediss://` addresses; to the masters of `redis+sentinel://`
    /// addresses).
    pub tls: RedisTlsConfig,
    /// TLS to the sentinels of `redis+sentinel://` addresses.
    pub sentinel_tls: RedisTlsConfig,
}

/// `engine.redis.tls`, Centrifugo's key names.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RedisTlsConfig {
    /// TLS to every address (`redis://` addresses are then connected with TLS too).
    pub enabled: bool,
    /// CA certificates (PEM) the server's certificate must chain to; empty: the system's.
    pub server_ca_pem_file: String,
    /// The same, inline.
    pub server_ca_pem: String,
    /// Client certificate chain (PEM), for servers that require one (`tls-auth-clients yes`).
    pub cert_pem_file: String,
    /// Its private key (PEM).
    pub key_pem_file: String,
}

impl RedisTlsConfig {
    /// The certificates for the client, reading the files.
    pub(crate) fn certificates(&self) -> Result<redis::TlsCertificates, String> {
        let read = |path: &str| std::fs::read(path).map_err(|e| format!("{path}: {e}"));
        let root_cert = if !self.server_ca_pem_file.is_empty() {
            Some(read(&self.server_ca_pem_file)?)
        } else if !self.server_ca_pem.is_empty() {
            Some(self.server_ca_pem.clone().into_bytes())
        } else {
            None
        };
        let client_tls = if self.cert_pem_file.is_empty() {
            None
        } else {
            Some(redis::ClientTlsConfig {
                client_cert: read(&self.cert_pem_file)?,
                client_key: read(&self.key_pem_file)?,
            })
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self::new(vec!["redis://127.0.0.1:6379".into()])
    }
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl RedisConfig {
    /// Defaults for `addresses`.
    pub fn new(addresses: Vec<String>) -> Self {
        Self {
            addresses,
            prefix: "holdfast".into(),
            partitions: 64,
            pubsub_shards: 2,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            presence_ttl: Duration::from_secs(60),
            tls: RedisTlsConfig::default(),
            sentinel_tls: RedisTlsConfig::default(),
        }
    }

    pub(crate) fn ping_timeout(&self) -> Duration {
        self.command_timeout.max(self.ping_interval)
    }

    /// Checks the settings; each problem as (field, message).
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        if self.addresses.is_empty() {
            errs.push(("engine.redis.address", "needs at least one address".into()));
        }
        for a in &self.addresses {
            if let Err(e) = parse_address(a, &self.tls, &self.sentinel_tls) {
                errs.push(("engine.redis.address", e));
            }
        }
        if self.tls.cert_pem_file.is_empty() != self.tls.key_pem_file.is_empty() {
            errs.push((
                "engine.redis.tls",
                "cert_pem_file and key_pem_file go together".into(),
            ));
        }
        if self.addresses.len() > 1 && self.addresses.iter().any(|a| a.contains("+cluster://")) {
            errs.push((
                "engine.redis.address",
                "a redis+cluster:// address must be the only address".into(),
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            errs.push((
                "engine.redis.prefix",
                "must be non-empty without { or }".into(),
            ));
        }
        if !(1..=16384).contains(&self.partitions) {
            errs.push(("engine.redis.partitions", "must be 1..=16384".into()));
        }
        if !(1..=64).contains(&self.pubsub_shards) {
            errs.push(("engine.redis.pubsub_shards", "must be 1..=64".into()));
        }
        if self.presence_ttl < Duration::from_secs(3) {
            errs.push(("engine.redis.presence_ttl", "must be at least 3s".into()));
        }
        if self.ping_interval.is_zero() || self.command_timeout.is_zero() {
            errs.push((
                "engine.redis",
                "ping_interval and command_timeout must be positive".into(),
            ));
        }
        errs
    }
}

/// Where one instance (or the cluster) is.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per Redis instance, built once at start
pub(crate) enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
    Sentinel(Arc<crate::sentinel::Sentinel>),
}

pub(crate) fn resp3(url: &str) -> Result<redis::ConnectionInfo, String> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|e| format!("{url}: {e}"))?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(settings))
}

/// Parses one `engine.redis.address` entry. TLS applies to `rediss://` addresses, and to every
/// address when `tls.enabled`.
pub(crate) fn parse_address(
    a: &str,
    tls: &RedisTlsConfig,
    sentinel_tls: &RedisTlsConfig,
) -> Result<Target, String> {
    if a.starts_with("redis+sentinel://") {
        return crate::sentinel::Sentinel::parse(a, tls, sentinel_tls)
            .map(|s| Target::Sentinel(Arc::new(s)));
    }
    if a.starts_with("rediss+sentinel://") {
        return Err(format!(
            "{a}: write redis+sentinel:// and set engine.redis.tls (masters) and \
             engine.redis.sentinel_tls (sentinels)"
        ));
    }
    let secure = tls.enabled || a.starts_with("rediss");
    let certs = |a: &str| tls.certificates().map_err(|e| format!("{a}: TLS: {e}"));
    let cluster = a
        .strip_prefix("redis+cluster://")
        .or_else(|| a.strip_prefix("rediss+cluster://"));
    if let Some(rest) = cluster {
        let (cred, hosts) = match rest.rsplit_once('@') {
            Some((c, h)) => (format!("{c}@"), h),
            None => (String::new(), rest),
        };
        let hosts = hosts.split('/').next().unwrap_or_default();
        let scheme = if secure { "rediss" } else { "redis" };
        let seeds: Result<Vec<_>, String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| resp3(&format!("{scheme}://{cred}{h}")))
            .collect();
        let seeds = seeds?;
        if seeds.is_empty() {
            return Err(format!("{a}: names no seed node"));
        }
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500);
        if secure {
            builder = builder.certs(certs(a)?);
        }
        let client = builder.build().map_err(|e| format!("{a}: {e}"))?;
        return Ok(Target::Cluster(Box::new(client)));
    }
    let plain = a.starts_with("redis://");
    if !(plain
        || a.starts_with("rediss://")
        || a.starts_with("unix://")
        || a.starts_with("redis+unix://"))
    {
        return Err(format!(
            "{a}: expected redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://"
        ));
    }
    if secure {
        if !(plain || a.starts_with("rediss://")) {
            return Err(format!("{a}: TLS needs a TCP address (rediss://)"));
        }
        let url = if plain {
            a.replacen("redis://", "rediss://", 1)
        } else {
            a.to_owned()
        };
        return redis::Client::build_with_tls(resp3(&url)?, certs(a)?)
            .map(Target::Single)
            .map_err(|e| format!("{a}: {e}"));
    }
    redis::Client::open(resp3(a)?)
        .map(Target::Single)
        .map_err(|e| format!("{a}: {e}"))
}
