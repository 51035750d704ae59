//! The engine's settings (`engine.redis.*`) and where its instances are.

use super::*;

/// Redis engine settings (`engine.redis.*`, deserialised from the server's configuration as
/// they are).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` (`rediss://` for TLS is not built in), one per
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
            if let Err(e) = parse_address(a) {
                errs.push(("engine.redis.address", e));
            }
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
pub(crate) enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

fn resp3(url: &str) -> Result<redis::ConnectionInfo, String> {
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

/// Parses one `engine.redis.address` entry.
pub(crate) fn parse_address(a: &str) -> Result<Target, String> {
    if a.starts_with("redis+sentinel://") || a.starts_with("rediss+sentinel://") {
        return Err(format!(
            "{a}: Sentinel is not supported yet; point Holdfast at the master through a \
             proxy, or use Redis Cluster"
        ));
    }
    if a.starts_with("rediss") {
        return Err(format!("{a}: TLS to Redis is not built in"));
    }
    if let Some(rest) = a.strip_prefix("redis+cluster://") {
        let (cred, hosts) = match rest.rsplit_once('@') {
            Some((c, h)) => (format!("{c}@"), h),
            None => (String::new(), rest),
        };
        let hosts = hosts.split('/').next().unwrap_or_default();
        let seeds: Result<Vec<_>, String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| resp3(&format!("redis://{cred}{h}")))
            .collect();
        let seeds = seeds?;
        if seeds.is_empty() {
            return Err(format!("{a}: names no seed node"));
        }
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(|e| format!("{a}: {e}"))?;
        return Ok(Target::Cluster(Box::new(client)));
    }
    if !(a.starts_with("redis://") || a.starts_with("unix://") || a.starts_with("redis+unix://")) {
        return Err(format!(
            "{a}: expected redis://, unix:// or redis+cluster://"
        ));
    }
    redis::Client::open(resp3(a)?)
        .map(Target::Single)
        .map_err(|e| format!("{a}: {e}"))
}
