//! Asynchronous consumers: server API commands read from a PostgreSQL outbox table, Redis
//! Streams or NATS JetStream and run through the API's path.
//!
//! Exactly once into the channel: a source position is acknowledged (row deleted, entry
//! XACKed, message acked) only after the command ran and its publication was stored, and each
//! publication's idempotency key is derived from the source position, so running a command
//! again after a crash between storing and acknowledging stores nothing twice (within the
//! engine's idempotency window, 5 minutes). Commands that can never succeed are tried
//! `max_attempts` times and then set aside (a dead-letter table or stream) with a log line and
//! a metric; temporary failures (engine unavailable) are retried with backoff and never skip.
//!
//! Each source type is a module with one `run` function; a new type (Kafka) is one more module
//! and one more arm in [`Consumers::start`].

mod nats;
mod postgres;
mod redis_stream;

use crate::api::Applied;
use crate::config::consumers::ConsumerConfig;
use crate::server::AppState;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The live state of one consumer, for `/health`, `/ready` and metrics.
#[derive(Debug)]
pub struct Status {
    /// `consumers[].name`.
    pub name: String,
    /// `consumers[].type`.
    pub kind: String,
    /// Workers (partitions, stream readers) expected to be connected.
    pub workers: u32,
    /// Workers connected to the source now.
    pub up: AtomicU32,
    /// Commands run and acknowledged.
    pub processed: AtomicU64,
    /// Source and temporary failures (each retried).
    pub errors: AtomicU64,
    /// Commands set aside after `max_attempts`.
    pub poison: AtomicU64,
    /// Commands waiting at the source (last sample; -1 before the first).
    pub lag: AtomicI64,
    /// Age of the oldest waiting command in milliseconds (last sample; PostgreSQL only).
    pub lag_ms: AtomicI64,
    /// The last error and when (unix ms).
    pub last_error: Mutex<Option<(String, u64)>>,
    /// Set once the consumer was stopped.
    pub stopped: std::sync::atomic::AtomicBool,
}

impl Status {
    fn new(c: &ConsumerConfig) -> Self {
        let workers = match c.kind.as_str() {
            "postgresql" => c.postgresql.num_partitions,
            "redis_stream" => c.redis_stream.num_workers * c.redis_stream.streams.len() as u32,
            _ => 1,
        };
        Self {
            name: c.name.clone(),
            kind: c.kind.clone(),
            workers,
            up: AtomicU32::new(0),
            processed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            poison: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
            lag_ms: AtomicI64::new(-1),
            last_error: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `ok` (every worker connected), `degraded`, `down`, `stopped`.
    pub fn state(&self) -> &'static str {
        let up = self.up.load(Ordering::Relaxed);
        if self.stopped.load(Ordering::Relaxed) {
            "stopped"
        } else if up >= self.workers {
            "ok"
        } else if up > 0 {
            "degraded"
        } else {
            "down"
        }
    }

    /// The `/health` entry.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "type": self.kind,
            "status": self.state(),
            "workers": self.workers,
            "workers_up": self.up.load(Ordering::Relaxed),
            "processed": self.processed.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "poison": self.poison.load(Ordering::Relaxed),
        });
        let lag = self.lag.load(Ordering::Relaxed);
        if lag >= 0 {
            v["lag"] = lag.into();
        }
        let lag_ms = self.lag_ms.load(Ordering::Relaxed);
        if lag_ms >= 0 {
            v["lag_seconds"] = (lag_ms as f64 / 1000.0).into();
        }
        if let Some((e, at)) = &*self.last_error.lock() {
            v["last_error"] = e.clone().into();
            v["last_error_at_ms"] = (*at).into();
        }
        v
    }

    /// Records a source or temporary failure.
    fn error(&self, what: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("holdfast_consumer_errors_total", "consumer" => self.name.clone())
            .increment(1);
        *self.last_error.lock() = Some((what.to_owned(), unix_ms()));
    }

    fn worker_up(&self) {
        self.up.fetch_add(1, Ordering::Relaxed);
        self.publish_up();
    }

    fn worker_down(&self) {
        let _ = self
            .up
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| u.checked_sub(1));
        self.publish_up();
    }

    fn publish_up(&self) {
        let ok = self.up.load(Ordering::Relaxed) >= self.workers;
        metrics::gauge!("holdfast_consumer_up", "consumer" => self.name.clone()).set(if ok {
            1.0
        } else {
            0.0
        });
    }

    fn set_lag(&self, waiting: i64, oldest: Option<Duration>) {
        self.lag.store(waiting, Ordering::Relaxed);
        metrics::gauge!("holdfast_consumer_lag", "consumer" => self.name.clone())
            .set(waiting as f64);
        if let Some(age) = oldest {
            self.lag_ms.store(age.as_millis() as i64, Ordering::Relaxed);
            metrics::gauge!("holdfast_consumer_lag_seconds", "consumer" => self.name.clone())
                .set(age.as_secs_f64());
        }
    }
}

/// An error with its causes (`error performing TLS handshake: invalid peer certificate: …`).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The running consumers of a server.
#[derive(Debug)]
pub struct Consumers {
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The statuses of the enabled consumers (created with the server's state).
pub fn statuses(consumers: &[ConsumerConfig]) -> Vec<Arc<Status>> {
    consumers
        .iter()
        .filter(|c| c.enabled)
        .map(|c| Arc::new(Status::new(c)))
        .collect()
}

impl Consumers {
    /// Starts every enabled consumer (the node is ready).
    pub fn start(state: &Arc<AppState>) -> Self {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let enabled = state.config.consumers.iter().filter(|c| c.enabled);
        for (cfg, status) in enabled.zip(state.consumers.iter()) {
            tracing::info!(consumer = %cfg.name, r#type = %cfg.kind, workers = status.workers, "consumer starting");
            status.publish_up();
            for name in [
                "holdfast_consumer_processed_total",
                "holdfast_consumer_errors_total",
                "holdfast_consumer_poison_total",
            ] {
                metrics::counter!(name, "consumer" => cfg.name.clone()).increment(0);
            }
            let ctx = Ctx {
                state: state.clone(),
                cfg: Arc::new(cfg.clone()),
                status: status.clone(),
                stop: stop.clone(),
                tasks: tasks.clone(),
            };
            match cfg.kind.as_str() {
                "postgresql" => postgres::start(ctx),
                "redis_stream" => redis_stream::start(ctx),
                "nats_jetstream" => nats::start(ctx),
                other => {
                    tracing::error!(consumer = %cfg.name, r#type = other, "consumer type not supported: not started")
                }
            }
        }
        tasks.close();
        Self { stop, tasks }
    }

    /// Stops reading; a command running finishes and is acknowledged. Waits at most `timeout`.
    pub async fn stop(self, statuses: &[Arc<Status>], timeout: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "consumers did not stop in time; unacknowledged commands run again on the next start"
            );
        }
        for s in statuses {
            s.stopped.store(true, Ordering::Relaxed);
        }
    }
}

/// What a consumer's tasks share.
#[derive(Clone)]
struct Ctx {
    state: Arc<AppState>,
    cfg: Arc<ConsumerConfig>,
    status: Arc<Status>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Ctx {
    /// Runs one command and counts it. `Done` means stored: the caller acknowledges next.
    async fn apply(&self, method: &str, payload: &[u8], key: &str) -> Applied {
        let r = if payload.len() > self.state.config.http_api.max_body_size {
            Applied::Poison(format!(
                "payload of {} bytes is over http_api.max_body_size",
                payload.len()
            ))
        } else {
            crate::api::apply(&self.state, method, payload, key).await
        };
        match &r {
            Applied::Done => {
                self.status.processed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("holdfast_consumer_processed_total", "consumer" => self.cfg.name.clone())
                    .increment(1);
                fault_after_store();
            }
            Applied::Retry(why) => {
                tracing::warn!(consumer = %self.cfg.name, key, why, "command failed temporarily: retrying");
                self.status.error(why);
            }
            Applied::Poison(_) => {}
        }
        r
    }

    /// Counts a command set aside.
    fn poisoned(&self, key: &str, why: &str, moved_to: &str) {
        self.status.poison.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("holdfast_consumer_poison_total", "consumer" => self.cfg.name.clone())
            .increment(1);
        *self.status.last_error.lock() = Some((format!("{key}: {why}"), unix_ms()));
        tracing::error!(consumer = %self.cfg.name, key, why, moved_to, "command can never succeed: set aside");
    }

    /// Sleeps `d` unless stopped first; `false` when stopped.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.stop.cancelled() => false,
        }
    }
}

/// A command built from a message in publication data mode: the message's payload is the
/// publication's data, `field` finds the channels (comma-separated), idempotency key, delta
/// flag, version and version epoch, `tags` the fields under the tags prefix. One channel makes
/// a `publish`, several a `broadcast`.
fn publication_command(
    mode: &crate::config::consumers::PublicationDataMode,
    field: impl Fn(&str) -> Option<String>,
    tags: Vec<(String, String)>,
    data: &[u8],
) -> Result<(&'static str, Vec<u8>), String> {
    use serde_json::{Map, Value};
    let channels: Vec<String> = field(&mode.channels_value)
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    let mut cmd = Map::new();
    let method = match channels.len() {
        0 => return Err(format!("no channels in {:?}", mode.channels_value)),
        1 => {
            cmd.insert("channel".into(), Value::String(channels[0].clone()));
            "publish"
        }
        _ => {
            cmd.insert("channels".into(), channels.into());
            "broadcast"
        }
    };
    match serde_json::from_slice::<Value>(data) {
        Ok(v) => cmd.insert("data".into(), v),
        Err(_) => {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD.encode(data);
            cmd.insert("b64data".into(), Value::String(b))
        }
    };
    if let Some(k) = field(&mode.idempotency_key_value).filter(|k| !k.is_empty()) {
        cmd.insert("idempotency_key".into(), Value::String(k));
    }
    if let Some(d) = field(&mode.delta_value) {
        cmd.insert("delta".into(), Value::Bool(d.trim() == "true"));
    }
    if let Some(v) = field(&mode.version_value).filter(|v| !v.is_empty()) {
        let v: u64 = v
            .trim()
            .parse()
            .map_err(|_| format!("version {v:?} is not a number"))?;
        cmd.insert("version".into(), v.into());
    }
    if let Some(e) = field(&mode.version_epoch_value).filter(|e| !e.is_empty()) {
        cmd.insert("version_epoch".into(), Value::String(e));
    }
    if !tags.is_empty() {
        let t: Map<String, Value> = tags
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        cmd.insert("tags".into(), Value::Object(t));
    }
    serde_json::to_vec(&Value::Object(cmd))
        .map(|b| (method, b))
        .map_err(|e| e.to_string())
}

/// Exponential backoff with jitter between `MIN` and `MAX`.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Self { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The next wait (grows up to `MAX`), with up to 25 % jitter so nodes do not retry in step.
    fn step(&mut self) -> Duration {
        use rand::Rng;
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter = rand::rng().random_range(0..=d.as_millis() as u64 / 4);
        d + Duration::from_millis(jitter)
    }
}

/// Test fault hook: `HOLDFAST_FAULT_ABORT_AFTER_STORE=N` aborts the process right after the
/// N-th command a consumer stored, before it is acknowledged (a kill -9 at the worst moment).
fn fault_after_store() {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static STORED: AtomicU64 = AtomicU64::new(0);
    let limit = *LIMIT.get_or_init(|| {
        std::env::var("HOLDFAST_FAULT_ABORT_AFTER_STORE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if limit > 0 && STORED.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
        eprintln!("HOLDFAST_FAULT_ABORT_AFTER_STORE: aborting after {limit} stored commands");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_data_mode_builds_publish_and_broadcast() {
        let mode = crate::config::consumers::PublicationDataMode::default();
        let fields = |m: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                m.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let (m, body) = publication_command(
            &mode,
            fields(&[("centrifugo-channels", "a"), ("centrifugo-version", "7")]),
            vec![("t".into(), "v".into())],
            br#"{"x":1}"#,
        )
        .unwrap();
        assert_eq!(m, "publish");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"a","data":{"x":1},"version":7,"tags":{"t":"v"}})
        );
        let (m, body) = publication_command(
            &mode,
            fields(&[
                ("centrifugo-channels", "a, b"),
                ("centrifugo-delta", "true"),
            ]),
            vec![],
            b"\xff binary",
        )
        .unwrap();
        assert_eq!(m, "broadcast");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["channels"], serde_json::json!(["a", "b"]));
        assert_eq!(v["delta"], true);
        assert!(v["b64data"].is_string());
        assert!(publication_command(&mode, fields(&[]), vec![], b"{}").is_err());
        let bad_version = fields(&[("centrifugo-channels", "a"), ("centrifugo-version", "x")]);
        assert!(publication_command(&mode, bad_version, vec![], b"{}").is_err());
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(first >= Backoff::MIN && first <= Backoff::MIN * 5 / 4);
        for _ in 0..20 {
            b.step();
        }
        let d = b.step();
        assert!(d >= Backoff::MAX && d <= Backoff::MAX * 5 / 4);
        b.reset();
        assert!(b.step() <= Backoff::MIN * 5 / 4);
    }
}
