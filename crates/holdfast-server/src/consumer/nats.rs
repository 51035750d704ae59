//! The NATS JetStream consumer (`type = "nats_jetstream"`): a durable pull consumer on an
//! existing stream. A message carries its method in the `method_header` header and the payload
//! in its body, or `{"method":…,"payload":…}` as its body, or (publication data mode) the
//! publication's data with the channels and options in headers. A message is acknowledged
//! (double ack: the server confirms) only after its command's publication is stored; its
//! idempotency key is `<consumer>:<stream>:<stream sequence>`.
//!
//! After a restart, messages the previous instance took without acknowledging come back after
//! `ack_wait`; the consumer waits that long before pulling when there are any, so they are not
//! overtaken by newer messages. Several nodes pulling from one durable consumer run messages
//! concurrently: order per channel then needs `max_ack_pending = 1`.
//!
//! A failing message is retried in place (the consumer keeps it with progress acks), so
//! nothing behind it overtakes it; after `max_attempts` permanent failures it is terminated
//! (`Term`: never delivered again; JetStream publishes a `MSG_TERMINATED` advisory and keeps
//! the message in the stream under its retention).

use super::{Backoff, Ctx, publication_command};
use crate::api::Applied;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures_util::StreamExt;
use std::time::Duration;

/// Messages requested per pull.
const BATCH: usize = 100;

pub(super) fn start(ctx: Ctx) {
    ctx.tasks.spawn(run(ctx.clone()));
}

type Consumer = jetstream::consumer::Consumer<pull::Config>;

async fn open(ctx: &Ctx) -> Result<Consumer, String> {
    let n = &ctx.cfg.nats_jetstream;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name(format!("holdfast-consumer-{}", ctx.cfg.name))
        .connect(n.url.as_str())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&n.stream_name)
        .await
        .map_err(|e| format!("stream {:?}: {e}", n.stream_name))?;
    let mut config = pull::Config {
        durable_name: Some(n.durable_consumer_name.clone()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        deliver_policy: if n.deliver_policy == "all" {
            jetstream::consumer::DeliverPolicy::All
        } else {
            jetstream::consumer::DeliverPolicy::New
        },
        max_ack_pending: n.max_ack_pending,
        ack_wait: n.ack_wait,
        ..Default::default()
    };
    match n.subjects.as_slice() {
        [] => {}
        [one] => config.filter_subject = one.clone(),
        many => config.filter_subjects = many.to_vec(),
    }
    stream
        .get_or_create_consumer(&n.durable_consumer_name, config)
        .await
        .map_err(|e| format!("consumer {:?}: {e}", n.durable_consumer_name))
}

async fn run(ctx: Ctx) {
    let name = ctx.cfg.name.clone();
    let mut backoff = Backoff::new();
    while !ctx.stop.is_cancelled() {
        let consumer = match open(&ctx).await {
            Ok(c) => c,
            Err(e) => {
                let wait = backoff.step();
                tracing::warn!(consumer = %name, error = %e, retry_in_ms = wait.as_millis() as u64, "nats consumer: source error");
                ctx.status.error(&e);
                ctx.pause(wait).await;
                continue;
            }
        };
        // Messages a previous instance took and did not acknowledge (it died) come back after
        // ack_wait, before new ones: wait for them, or new messages would overtake them.
        if let Ok(info) = consumer.get_info().await
            && info.num_ack_pending > 0
        {
            let wait = info.config.ack_wait + Duration::from_millis(100);
            tracing::info!(consumer = %name, unacknowledged = info.num_ack_pending, wait_ms = wait.as_millis() as u64, "nats consumer: waiting for unacknowledged messages to come back first");
            if !ctx.pause(wait).await {
                return;
            }
        }
        ctx.status.worker_up();
        tracing::info!(consumer = %name, "nats consumer connected");
        let sampler = tokio::spawn(sample_lag(ctx.clone(), consumer.clone()));
        let err = pull_loop(&ctx, &consumer, &mut backoff).await;
        sampler.abort();
        ctx.status.worker_down();
        if let Some(e) = err {
            let wait = backoff.step();
            tracing::warn!(consumer = %name, error = %e, retry_in_ms = wait.as_millis() as u64, "nats consumer: source error");
            ctx.status.error(&e);
            ctx.pause(wait).await;
        }
    }
}

/// Pulls and runs messages until stopped (`None`) or the source fails.
async fn pull_loop(ctx: &Ctx, consumer: &Consumer, backoff: &mut Backoff) -> Option<String> {
    let stream_name = &ctx.cfg.nats_jetstream.stream_name;
    while !ctx.stop.is_cancelled() {
        let batch = consumer
            .batch()
            .max_messages(BATCH)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => return Some(format!("pull: {e}")),
        };
        loop {
            let next = tokio::select! {
                m = batch.next() => m,
                _ = ctx.stop.cancelled() => return None,
            };
            let msg = match next {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => return Some(format!("pull: {e}")),
            };
            let seq = match msg.info() {
                Ok(i) => i.stream_sequence,
                Err(e) => return Some(format!("message info: {e}")),
            };
            let key = format!("{}:{stream_name}:{seq}", ctx.cfg.name);
            let mut attempts = 0;
            let ack = loop {
                match run_one(ctx, &msg, &key).await {
                    Applied::Done => break AckKind::Ack,
                    Applied::Retry(_) => {}
                    Applied::Poison(why) => {
                        attempts += 1;
                        if attempts >= ctx.cfg.max_attempts {
                            ctx.poisoned(&key, &why, "terminated");
                            break AckKind::Term;
                        }
                        tracing::warn!(consumer = %ctx.cfg.name, key, why, attempt = attempts, "nats message failed: trying again");
                        ctx.status.error(&format!("{key}: {why}"));
                    }
                }
                // Keep the message (no redelivery elsewhere) while waiting to try it again.
                let _ = msg.ack_with(AckKind::Progress).await;
                if !ctx.pause(backoff.step()).await {
                    return None;
                }
            };
            backoff.reset();
            if let Err(e) = msg.double_ack_with(ack).await {
                return Some(format!("ack {key}: {e}"));
            }
        }
    }
    None
}

async fn run_one(ctx: &Ctx, msg: &jetstream::Message, key: &str) -> Applied {
    let n = &ctx.cfg.nats_jetstream;
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let command = if n.publication_data_mode.enabled {
        let mode = &n.publication_data_mode;
        let tags = msg
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .filter_map(|(k, v)| {
                let t = AsRef::<str>::as_ref(k).strip_prefix(mode.tags_value_prefix.as_str())?;
                Some((t.to_owned(), v.first()?.as_str().to_owned()))
            })
            .collect();
        publication_command(mode, header, tags, &msg.payload).map(|(m, p)| (m.to_owned(), p))
    } else if let Some(method) = header(&n.method_header).filter(|_| !n.method_header.is_empty()) {
        Ok((method, msg.payload.to_vec()))
    } else {
        #[derive(serde::Deserialize)]
        struct Body<'a> {
            method: String,
            #[serde(borrow)]
            payload: &'a serde_json::value::RawValue,
        }
        serde_json::from_slice::<Body<'_>>(&msg.payload)
            .map(|b| (b.method, b.payload.get().as_bytes().to_vec()))
            .map_err(|e| format!("body is not {{\"method\",\"payload\"}}: {e}"))
    };
    match command {
        Ok((method, payload)) => ctx.apply(&method, &payload, key).await,
        Err(why) => Applied::Poison(why),
    }
}

/// Samples messages not yet delivered plus delivered and unacknowledged, every two seconds.
async fn sample_lag(ctx: Ctx, consumer: Consumer) {
    loop {
        if let Ok(info) = consumer.get_info().await {
            ctx.status.set_lag(
                (info.num_pending + info.num_ack_pending as u64) as i64,
                None,
            );
        }
        if !ctx.pause(Duration::from_secs(2)).await {
            return;
        }
    }
}
