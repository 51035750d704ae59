//! `holdfast-bench fanout`: what one fan-out costs the node itself, without sockets.
//!
//! A real node (memory engine, history and recovery on) serves N connections over in-memory
//! transports: each connects and subscribes to one channel with real protocol frames, then its
//! sink only counts the messages in the frames it is given. The publisher publishes through
//! [`Node::publish`] and waits until every subscriber got every publication of the round, so a
//! round is exactly the node's work for it: encoding, the hub's fan-out, the outbox, waking the
//! connection task and framing. Kernel time (the socket writes the S2 scenario pays) is left
//! out, which makes this the measure for changes to that path: it varies far less between runs
//! than a loopback benchmark on a shared machine.
//!
//! `--answer` shapes the publications like an AI answer streamed whole (each the previous plus a
//! few words, 2–4 KiB); with `--delta` the subscribers negotiate fossil delta compression and the
//! publisher allows deltas, so the bytes per delivery and the CPU per delivery compare side by
//! side with and without it (`scripts/bench-delta.sh`). `--tags-filter` gives every subscriber a
//! tag filter the publications pass: the cost of filtering.

use bytes::Bytes;
use clap::Args;
use holdfast_core::config::{ChannelOptions, NodeConfig};
use holdfast_core::engine::Engine;
use holdfast_core::engine::memory::MemoryEngine;
use holdfast_core::handler::{Hooks, StandardHandler};
use holdfast_core::node::{Node, PublishRequest};
use holdfast_core::testing::{CallbackSink, ScriptSource};
use holdfast_core::transport::{ConnectionMeta, serve_connection};
use holdfast_protocol::Encoding;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const CHANNEL: &str = "fanout";

/// Options of `holdfast-bench fanout`.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribers of the channel.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Publications per measured run.
    #[arg(long, default_value_t = 500)]
    pub publications: usize,
    /// Publications per round: the publisher waits for every delivery of a round before the
    /// next (1: each connection task is woken once per delivery, as under a steady rate).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Measured runs (the first, a warm-up, is not counted).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Print one JSON object per run instead of a line.
    #[arg(long)]
    pub json: bool,
    /// Publications carry a growing answer (2–4 KiB, a few words more each time) instead of a
    /// fixed payload.
    #[arg(long)]
    pub answer: bool,
    /// Subscribers negotiate fossil delta compression and publications allow deltas.
    #[arg(long)]
    pub delta: bool,
    /// Every subscriber has a tag filter (`kind eq token`) that every publication passes.
    #[arg(long)]
    pub tags_filter: bool,
    /// Worker threads of the node's runtime (the scaling measure: 1 and 2 on this machine).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Channels the subscribers are spread over; each round publishes to every channel at once
    /// (concurrent publications, as many publishers would make).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
}

/// Messages the sinks were given, and a wake-up when they reach the target.
#[derive(Default)]
struct Progress {
    /// Bytes of the frames given to the sinks (what sockets would carry).
    bytes: AtomicU64,
    messages: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl Progress {
    fn add(&self, n: u64) {
        let now = self.messages.fetch_add(n, Ordering::AcqRel) + n;
        if now >= self.target.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    /// Waits until `target` messages were counted.
    async fn wait_for(&self, target: u64) {
        self.target.store(target, Ordering::Release);
        loop {
            let notified = self.reached.notified();
            if self.messages.load(Ordering::Acquire) >= target {
                return;
            }
            notified.await;
        }
    }
}

fn node_config() -> NodeConfig {
    let mut cfg = NodeConfig::default();
    cfg.client.insecure = true;
    // No pings during a run: every counted message is a publication.
    cfg.client.ping_interval = Duration::from_secs(24 * 3600);
    cfg.client.queue_max_size = 64 << 20;
    cfg.channel.without_namespace = ChannelOptions {
        history_size: 10_000,
        history_ttl: Duration::from_secs(600),
        force_recovery: true,
        allowed_delta_types: vec!["fossil".into()],
        allow_tags_filter: true,
        ..Default::default()
    };
    cfg
}

/// The answers of a run: each the previous plus one to four words, starting over at 2 KiB when
/// it passes 4 KiB (a new answer).
fn answers(count: usize) -> Vec<Bytes> {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "writes",
        "its",
        "answer",
        "token",
        "by",
        "token,",
        "and",
        "every",
        "publication",
        "carries",
        "all",
        "of",
        "it",
        "so",
        "far.",
    ];
    let mut out = Vec::with_capacity(count);
    let seed = "Here is a longer answer, as a model would stream it. ".repeat(40);
    let mut text = seed.clone();
    let mut w = 0usize;
    for _ in 0..count {
        for _ in 0..1 + w % 4 {
            text.push(' ');
            text.push_str(WORDS[w % WORDS.len()]);
            w += 1;
        }
        if text.len() > 4096 {
            text.clone_from(&seed);
        }
        let mut json = String::with_capacity(text.len() + 16);
        json.push_str(r#"{"answer":""#);
        json.push_str(&text);
        json.push_str(r#""}"#);
        out.push(Bytes::from(json));
    }
    out
}

/// One measured run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FanoutRun {
    /// Deliveries counted.
    pub deliveries: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Deliveries per second.
    pub per_s: f64,
    /// Nanoseconds per delivery.
    pub ns_per_delivery: f64,
    /// Bytes the sinks were given per delivery (frames as a socket would carry them).
    pub bytes_per_delivery: f64,
    /// CPU time of the process (every thread) per delivery, nanoseconds (10 ms resolution).
    pub cpu_ns_per_delivery: f64,
    /// CPU seconds per wall-clock second (1.0 = one core busy).
    pub cores_busy: f64,
}

/// Runs the benchmark on a runtime of `--threads` workers (one: the server's shape when pinned
/// to one core).
pub fn run(args: &FanoutArgs) -> anyhow::Result<Vec<FanoutRun>> {
    anyhow::ensure!(args.subscribers > 0 && args.publications > 0 && args.batch > 0);
    anyhow::ensure!(
        (1..=256).contains(&args.threads) && (1..=args.subscribers).contains(&args.channels),
        "--threads 1..=256, --channels 1..=subscribers"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    rt.block_on(measure(args))
}

async fn measure(args: &FanoutArgs) -> anyhow::Result<Vec<FanoutRun>> {
    let handler_cfg = node_config();
    let hooks = Hooks::standard(StandardHandler::new(&handler_cfg.client, None));
    let node = Node::new(node_config(), Engine::from_one(MemoryEngine::new()), hooks)
        .map_err(|e| anyhow::anyhow!("fanout node config: {e:?}"))?;
    node.start();
    let progress = Arc::new(Progress::default());
    let mut extra = String::new();
    if args.delta {
        extra.push_str(r#","delta":"fossil""#);
    }
    if args.tags_filter {
        extra.push_str(r#","tf":{"key":"kind","cmp":"eq","val":"token"}"#);
    }
    let channels: Vec<String> = (0..args.channels)
        .map(|k| {
            if args.channels == 1 {
                CHANNEL.to_owned()
            } else {
                format!("{CHANNEL}-{k}")
            }
        })
        .collect();
    let mut future_bytes = 0;
    for i in 0..args.subscribers {
        let channel = &channels[i % channels.len()];
        let subscribe = format!(r#"{{"id":2,"subscribe":{{"channel":"{channel}"{extra}}}}}"#);
        // The connection's commands, then silence until the node shuts down.
        let commands = ScriptSource::new([
            Bytes::from_static(br#"{"id":1,"connect":{}}"#),
            Bytes::from(subscribe.clone()),
        ])
        .then_wait();
        // Counts the newline-separated JSON messages of each frame.
        let counted = progress.clone();
        let sink = CallbackSink(move |frame: Bytes| {
            counted
                .bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            counted.add(1 + frame.iter().filter(|b| **b == b'\n').count() as u64);
        });
        let meta = ConnectionMeta {
            transport: "fanout",
            kind: holdfast_core::transport::ConnectionKind::Bidirectional,
            encoding: Encoding::Json,
            ip: None,
            headers: Vec::new().into(),
        };
        let connection = serve_connection(node.clone(), meta, commands, sink);
        future_bytes = std::mem::size_of_val(&connection);
        node.tracker().spawn(connection);
    }
    // What every idle connection's task holds inline (its allocation adds tokio's task header).
    eprintln!("fanout: one connection's future is {future_bytes} bytes");
    let subs = args.subscribers as u64;
    // The connect and subscribe replies.
    progress.wait_for(2 * subs).await;
    let mut payload = String::from(r#"{"d":""#);
    payload.extend(std::iter::repeat_n('x', args.payload.saturating_sub(8)));
    payload.push_str(r#""}"#);
    let payload = Bytes::from(payload);
    let answers = if args.answer {
        answers(args.publications)
    } else {
        Vec::new()
    };
    let tags = args.tags_filter.then(|| {
        Arc::new(std::collections::BTreeMap::from([(
            "kind".into(),
            "token".into(),
        )]))
    });
    let mut out = Vec::new();
    let cpu = || crate::peers::sample(std::process::id()).map_or(0.0, |s| s.cpu_s);
    for run in 0..=args.runs {
        let start_count = progress.messages.load(Ordering::Acquire);
        let start_bytes = progress.bytes.load(Ordering::Acquire);
        let start_cpu = cpu();
        let started = Instant::now();
        let mut published = 0u64;
        while published < args.publications as u64 {
            let round = (args.batch as u64).min(args.publications as u64 - published);
            for _ in 0..round {
                let data = answers
                    .get(published as usize)
                    .cloned()
                    .unwrap_or_else(|| payload.clone());
                // One publication to every channel at once (each fans out to its share).
                let all = channels.iter().map(|ch| {
                    let req = PublishRequest {
                        data: data.clone(),
                        delta: args.delta,
                        tags: tags.clone(),
                        ..Default::default()
                    };
                    let node = node.clone();
                    let ch = ch.clone();
                    tokio::spawn(async move { node.publish(&ch, req).await })
                });
                for r in futures_util::future::join_all(all).await {
                    r.map_err(|e| anyhow::anyhow!("publish task: {e}"))?
                        .map_err(|e| anyhow::anyhow!("publish: {e:?}"))?;
                }
            }
            published += round;
            progress.wait_for(start_count + published * subs).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu_s = cpu() - start_cpu;
        let deliveries = progress.messages.load(Ordering::Acquire) - start_count;
        let bytes = progress.bytes.load(Ordering::Acquire) - start_bytes;
        let r = FanoutRun {
            deliveries,
            seconds,
            per_s: deliveries as f64 / seconds,
            ns_per_delivery: seconds * 1e9 / deliveries as f64,
            bytes_per_delivery: bytes as f64 / deliveries as f64,
            cpu_ns_per_delivery: cpu_s * 1e9 / deliveries as f64,
            cores_busy: cpu_s / seconds,
        };
        if run == 0 {
            continue; // warm-up
        }
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "run {run}: {deliveries} deliveries in {seconds:.3} s: {:.0} deliveries/s, {:.0} ns and {:.0} bytes each; CPU {:.0} ns each, {:.2} cores busy",
                r.per_s,
                r.ns_per_delivery,
                r.bytes_per_delivery,
                r.cpu_ns_per_delivery,
                r.cores_busy
            );
        }
        out.push(r);
    }
    node.shutdown(Duration::from_secs(5)).await;
    let mut per_s: Vec<f64> = out.iter().map(|r| r.per_s).collect();
    per_s.sort_by(f64::total_cmp);
    let mut cpu_ns: Vec<f64> = out.iter().map(|r| r.cpu_ns_per_delivery).collect();
    cpu_ns.sort_by(f64::total_cmp);
    if let (Some(m), Some(c)) = (per_s.get(per_s.len() / 2), cpu_ns.get(cpu_ns.len() / 2)) {
        eprintln!(
            "fanout: {} subscribers on {} channel(s), {} thread(s), {} publication(s) per channel per round: median {m:.0} deliveries/s ({:.0} ns each), CPU {c:.0} ns per delivery",
            args.subscribers,
            args.channels,
            args.threads,
            args.batch,
            1e9 / m
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_delivery_is_counted() {
        let args = FanoutArgs {
            subscribers: 50,
            publications: 20,
            batch: 3,
            runs: 2,
            payload: 100,
            json: true,
            answer: false,
            delta: false,
            tags_filter: false,
            threads: 1,
            channels: 1,
        };
        let runs = run(&args).unwrap();
        assert_eq!(runs.len(), 2);
        for r in runs {
            assert_eq!(
                r.deliveries,
                50 * 20,
                "each subscriber got each publication once"
            );
        }
    }

    #[test]
    fn several_threads_and_channels_deliver_everything() {
        let args = FanoutArgs {
            subscribers: 60,
            publications: 10,
            batch: 2,
            runs: 1,
            payload: 100,
            json: true,
            answer: false,
            delta: false,
            tags_filter: false,
            threads: 2,
            channels: 4,
        };
        let runs = run(&args).unwrap();
        assert_eq!(
            runs[0].deliveries,
            60 * 10,
            "each subscriber once per round"
        );
        assert!(runs[0].cpu_ns_per_delivery >= 0.0);
    }

    #[test]
    fn deltas_carry_fewer_bytes_for_growing_answers() {
        let base = FanoutArgs {
            subscribers: 20,
            publications: 60,
            batch: 1,
            runs: 1,
            payload: 100,
            json: true,
            answer: true,
            delta: false,
            tags_filter: true,
            threads: 1,
            channels: 1,
        };
        let full = run(&base).unwrap();
        let delta = run(&FanoutArgs {
            delta: true,
            tags_filter: false,
            ..base
        })
        .unwrap();
        assert_eq!(full[0].deliveries, 20 * 60);
        assert_eq!(
            delta[0].deliveries,
            20 * 60,
            "every delta subscriber got every publication"
        );
        assert!(
            delta[0].bytes_per_delivery < full[0].bytes_per_delivery / 5.0,
            "deltas: {} bytes per delivery, full: {}",
            delta[0].bytes_per_delivery,
            full[0].bytes_per_delivery
        );
    }
}
