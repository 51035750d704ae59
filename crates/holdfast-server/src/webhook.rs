//! Lifecycle webhooks: `connected`, `disconnected`, `subscribed`, `unsubscribed`, POSTed to the
//! application in batches, at least once (retried with backoff until the backend accepts), from a
//! bounded queue (events beyond it are dropped and counted). Never on a connection's hot path:
//! the session only tries to queue.
//!
//! Ordering is best effort and duplicates are possible (a batch the backend stored but did not
//! acknowledge is sent again): every event carries an `id` to deduplicate with.

use crate::config::WebhookConfig;
use holdfast_core::handler::LifecycleEvent;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// The sending side: the node's lifecycle hook.
#[derive(Debug, Clone)]
pub struct Webhooks {
    tx: mpsc::Sender<Value>,
    events: Arc<[String]>,
    node: Arc<str>,
    seq: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl holdfast_core::handler::LifecycleHook for Webhooks {
    fn on_lifecycle(&self, event: LifecycleEvent) {
        self.send(event);
    }
}

impl Webhooks {
    /// Starts the delivery task.
    pub fn start(cfg: &WebhookConfig, node: &str) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let _ = rustls::crypto::ring::default_provider().install_default();
        tokio::spawn(deliver(cfg.clone(), rx));
        Self {
            tx,
            events: cfg.events.iter().cloned().collect(),
            node: node.into(),
            seq: Arc::default(),
            dropped: Arc::default(),
        }
    }

    /// Queues an event if it is one of the configured kinds; drops it when the queue is full.
    pub fn send(&self, e: LifecycleEvent) {
        let (kind, mut v) = match e {
            LifecycleEvent::Connected {
                client,
                user,
                transport,
            } => (
                "connected",
                json!({"client": &*client, "user": &*user, "transport": transport}),
            ),
            LifecycleEvent::Disconnected {
                client,
                user,
                code,
                reason,
            } => (
                "disconnected",
                json!({"client": &*client, "user": &*user, "code": code, "reason": reason}),
            ),
            LifecycleEvent::Subscribed {
                client,
                user,
                channel,
            } => (
                "subscribed",
                json!({"client": &*client, "user": &*user, "channel": &*channel}),
            ),
            LifecycleEvent::Unsubscribed {
                client,
                user,
                channel,
            } => (
                "unsubscribed",
                json!({"client": &*client, "user": &*user, "channel": &*channel}),
            ),
        };
        if !self.events.iter().any(|k| k == kind) {
            return;
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        v["type"] = json!(kind);
        v["id"] = json!(format!("{}-{n}", self.node));
        v["time"] = json!(holdfast_core::time::unix_ms());
        if self.tx.try_send(v).is_err() {
            let d = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::counter!("holdfast_webhook_dropped_total").increment(1);
            if d.is_power_of_two() {
                tracing::warn!(dropped = d, "webhook queue full: events dropped");
            }
        } else {
            metrics::gauge!("holdfast_webhook_queue").increment(1.0);
        }
    }

    /// Events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn deliver(cfg: WebhookConfig, mut rx: mpsc::Receiver<Value>) {
    let http = reqwest::Client::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + cfg.batch_max_wait;
        while batch.len() < cfg.batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        metrics::gauge!("holdfast_webhook_queue").decrement(batch.len() as f64);
        let body = json!({ "events": batch });
        let mut delay = Duration::from_millis(100);
        loop {
            let mut req = http.post(&cfg.endpoint).timeout(cfg.timeout).json(&body);
            for (k, v) in &cfg.static_headers {
                req = req.header(k.as_str(), v.as_str());
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    metrics::counter!("holdfast_webhook_events_total")
                        .increment(batch.len() as u64);
                    break;
                }
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "webhook rejected; retrying"),
                Err(e) => tracing::warn!(error = %e, "webhook failed; retrying"),
            }
            metrics::counter!("holdfast_webhook_retries_total").increment(1);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(cfg.max_retry_delay);
        }
    }
}
