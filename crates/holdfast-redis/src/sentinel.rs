//! Redis Sentinel: `redis+sentinel://` addresses (Centrifugo's form). The master is asked of
//! the sentinels when a connection opens and again after an error that a failover explains
//! (connection lost or refused, timeout, `READONLY` from a demoted master), so commands and
//! pub/sub follow a promotion without a restart.

use super::*;
use crate::config::{RedisTlsConfig, resp3};

/// One Sentinel-managed master.
pub(crate) struct Sentinel {
    /// The address as configured, for messages (without credentials).
    pub(crate) display: String,
    /// The sentinels, tried in turn starting with the last that answered.
    sentinels: Vec<redis::Client>,
    master_name: String,
    /// `user:pass@` of the master (as written in the address), or empty.
    master_auth: String,
    db: i64,
    /// TLS to the master (`engine.redis.tls`).
    master_tls: Option<RedisTlsConfig>,
    next: AtomicUsize,
    /// The master last resolved, to log changes.
    last: Mutex<String>,
}

impl fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sentinel")
            .field("address", &self.display)
            .field("master_name", &self.master_name)
            .finish_non_exhaustive()
    }
}

/// Splits `a` (after the scheme) into userinfo, hosts, path and query.
fn split(rest: &str) -> (&str, &str, &str, &str) {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (a, r),
        None => ("", rest),
    };
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    (auth, hosts, path, query)
}

impl Sentinel {
    /// Parses `redis+sentinel://[user:pass@]host:port[,host:port…][/db]?sentinel_master_name=…
    /// [&addr=host:port…][&sentinel_user=…][&sentinel_password=…][&db=N]`.
    pub(crate) fn parse(
        a: &str,
        tls: &RedisTlsConfig,
        sentinel_tls: &RedisTlsConfig,
    ) -> Result<Self, String> {
        let rest = a
            .strip_prefix("redis+sentinel://")
            .ok_or_else(|| format!("{a}: expected redis+sentinel://"))?;
        let (auth, hosts, path, query) = split(rest);
        // For messages: no credentials (the master's userinfo, the sentinels' user and password).
        let shown_query: Vec<String> = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k @ ("sentinel_password" | "sentinel_user"), _)) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        let display = format!(
            "redis+sentinel://{hosts}{}{}{}",
            if path.is_empty() { "" } else { "/" },
            path,
            if shown_query.is_empty() {
                String::new()
            } else {
                format!("?{}", shown_query.join("&"))
            }
        );
        let mut addrs: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        let (mut master_name, mut s_user, mut s_pass) = (String::new(), String::new(), None);
        let mut db: i64 = if path.is_empty() {
            0
        } else {
            path.parse()
                .map_err(|_| format!("{display}: the database must be a number"))?
        };
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "sentinel_master_name" => master_name = v.to_owned(),
                "addr" => addrs.push(v.to_owned()),
                "sentinel_user" => s_user = v.to_owned(),
                "sentinel_password" => s_pass = Some(v.to_owned()),
                "db" => {
                    db = v
                        .parse()
                        .map_err(|_| format!("{display}: db must be a number"))?;
                }
                other => {
                    return Err(format!("{display}: unknown option {other}"));
                }
            }
        }
        if master_name.is_empty() {
            return Err(format!("{display}: sentinel_master_name is required"));
        }
        if addrs.is_empty() {
            return Err(format!("{display}: names no sentinel"));
        }
        let s_auth = match (&*s_user, &s_pass) {
            ("", None) => String::new(),
            (u, Some(p)) => format!("{u}:{p}@"),
            (u, None) => format!("{u}@"),
        };
        let sentinels = addrs
            .iter()
            .map(|h| {
                if h.contains(['/', '@', '?']) || !h.contains(':') {
                    return Err(format!("{display}: {h} is not host:port"));
                }
                let url = if sentinel_tls.enabled {
                    format!("rediss://{s_auth}{h}")
                } else {
                    format!("redis://{s_auth}{h}")
                };
                let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map_err(|e| format!("{display}: {h}: {e}"))?;
                if sentinel_tls.enabled {
                    let certs = sentinel_tls
                        .certificates()
                        .map_err(|e| format!("{display}: sentinel TLS: {e}"))?;
                    redis::Client::build_with_tls(info, certs)
                } else {
                    redis::Client::open(info)
                }
                .map_err(|e| format!("{display}: {h}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            display,
            sentinels,
            master_name,
            master_auth: if auth.is_empty() {
                String::new()
            } else {
                format!("{auth}@")
            },
            db,
            master_tls: tls.enabled.then(|| tls.clone()),
            next: AtomicUsize::new(0),
            last: Mutex::new(String::new()),
        })
    }

    /// Asks the sentinels where the master is and returns a client for it.
    pub(crate) async fn master(&self, timeout: Duration) -> redis::RedisResult<redis::Client> {
        let n = self.sentinels.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match self.ask(&self.sentinels[idx], timeout).await {
                Ok(Some((host, port))) => {
                    self.next.store(idx, Ordering::Relaxed);
                    let at = if host.contains(':') && !host.starts_with('[') {
                        format!("[{host}]:{port}")
                    } else {
                        format!("{host}:{port}")
                    };
                    {
                        let mut last = self.last.lock();
                        if *last != at {
                            tracing::info!(address = %self.display, master = %self.master_name, at = %at, previous = %*last, "redis sentinel: master located");
                            *last = at.clone();
                        }
                    }
                    return self.client(&at);
                }
                Ok(None) => {
                    last_err = Some(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "sentinel does not know the master",
                        self.master_name.clone(),
                    )));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "no sentinel configured"))
        }))
    }

    async fn ask(
        &self,
        sentinel: &redis::Client,
        timeout: Duration,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut c = sentinel
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut c)
            .await
    }

    fn client(&self, at: &str) -> redis::RedisResult<redis::Client> {
        let scheme = if self.master_tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let url = format!("{scheme}://{}{at}/{}", self.master_auth, self.db);
        let info = resp3(&url).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "bad master address", e))
        })?;
        match &self.master_tls {
            Some(t) => {
                let certs = t
                    .certificates()
                    .map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "TLS", e)))?;
                redis::Client::build_with_tls(info, certs)
            }
            None => redis::Client::open(info),
        }
    }
}

/// Whether an error means the master may have moved.
pub(crate) fn moved(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

/// A command connection to a Sentinel-managed master: a reconnecting connection to the master
/// last located, replaced when an error says it may have moved.
pub(crate) struct SentinelConn {
    target: Arc<Sentinel>,
    cfg: redis::aio::ConnectionManagerConfig,
    timeout: Duration,
    /// (generation, connection); None until located (again).
    current: Mutex<Option<(u64, redis::aio::ConnectionManager)>>,
    locate: tokio::sync::Mutex<u64>,
    /// The last failed lookup: commands waiting behind it share its answer for a moment
    /// instead of asking every sentinel again, one after the other.
    failed: Mutex<Option<(tokio::time::Instant, String)>>,
    /// The longest a command may take (locating the master included).
    limit: Duration,
}

/// How long a failed lookup answers for the commands behind it.
const FAILED_LOOKUP_REUSE: Duration = Duration::from_millis(500);

impl SentinelConn {
    pub(crate) fn new(
        target: Arc<Sentinel>,
        cfg: redis::aio::ConnectionManagerConfig,
        timeout: Duration,
        limit: Duration,
    ) -> Self {
        Self {
            target,
            cfg,
            timeout,
            current: Mutex::new(None),
            locate: tokio::sync::Mutex::new(0),
            failed: Mutex::new(None),
            limit,
        }
    }

    async fn get(&self) -> redis::RedisResult<(u64, redis::aio::ConnectionManager)> {
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        let mut generation = self.locate.lock().await;
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        if let Some((at, why)) = self.failed.lock().clone()
            && at.elapsed() < FAILED_LOOKUP_REUSE
        {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "redis sentinel: master not located",
                why,
            )));
        }
        let client = match self.target.master(self.timeout).await {
            Ok(c) => c,
            Err(e) => {
                *self.failed.lock() = Some((tokio::time::Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        *self.failed.lock() = None;
        let m = redis::aio::ConnectionManager::new_lazy_with_config(client, self.cfg.clone())?;
        *generation += 1;
        *self.current.lock() = Some((*generation, m.clone()));
        Ok((*generation, m))
    }

    fn check(&self, generation: u64, e: &redis::RedisError) {
        if moved(e) {
            let mut cur = self.current.lock();
            if cur.as_ref().is_some_and(|(g, _)| *g == generation) {
                tracing::debug!(address = %self.target.display, error = %e, "redis sentinel: locating the master again");
                *cur = None;
            }
        }
    }

    pub(crate) fn db(&self) -> i64 {
        self.target.db
    }

    pub(crate) async fn command(&self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        let run = async {
            let (g, mut m) = self.get().await?;
            let r = redis::aio::ConnectionLike::req_packed_command(&mut m, cmd).await;
            if let Err(e) = &r {
                self.check(g, e);
            }
            r
        };
        tokio::time::timeout(self.limit, run)
            .await
            .unwrap_or_else(|_| Err(crate::timed_out()))
    }

    pub(crate) async fn commands(
        &self,
        pipeline: &redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let run = async {
            let (g, mut m) = self.get().await?;
            let r =
                redis::aio::ConnectionLike::req_packed_commands(&mut m, pipeline, offset, count)
                    .await;
            if let Err(e) = &r {
                self.check(g, e);
            }
            r
        };
        tokio::time::timeout(self.limit, run)
            .await
            .unwrap_or_else(|_| Err(crate::timed_out()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_centrifugo_writes_them() {
        let none = RedisTlsConfig::default();
        let s = Sentinel::parse(
            "redis+sentinel://u:p@127.0.0.1:26379,127.0.0.1:26380/2?sentinel_master_name=mymaster&addr=127.0.0.1:26381&sentinel_password=sentpw",
            &none,
            &none,
        )
        .expect("parses");
        assert_eq!(s.sentinels.len(), 3);
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(s.db, 2);
        assert_eq!(s.master_auth, "u:p@");
        assert!(!s.display.contains("u:p"), "{}", s.display);
        assert!(!s.display.contains("sentpw"), "{}", s.display);
        assert!(
            s.display.contains("sentinel_master_name=mymaster"),
            "{}",
            s.display
        );
        for bad in [
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel://?sentinel_master_name=m",
            "redis+sentinel://127.0.0.1:26379?sentinel_master_name=m&bogus=1",
            "redis+sentinel://127.0.0.1:26379/x?sentinel_master_name=m",
            "redis+sentinel://127.0.0.1?sentinel_master_name=m",
        ] {
            assert!(Sentinel::parse(bad, &none, &none).is_err(), "{bad}");
        }
    }
}
