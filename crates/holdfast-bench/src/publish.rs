//! `holdfast-bench publish`: acknowledged publishes per second and publish latency through the
//! server API, with a fixed number of concurrent publishers.

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Options of a publish benchmark.
#[derive(Args, Debug, Clone, Serialize)]
pub struct PublishArgs {
    /// Server HTTP base.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub api: String,
    /// API key.
    #[arg(long, default_value = "")]
    pub api_key: String,
    /// Channel namespace (with history, so every publish is stored).
    #[arg(long, default_value = "verify")]
    pub namespace: String,
    /// Concurrent publishers (each waits for its answer before the next publish).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Channels published to (round robin).
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Publications per request: 1 posts to `/api/publish`, more send that many `publish`
    /// commands in one `/api/batch` request (acknowledged publications are counted).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Write the JSON result here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// The result.
#[derive(Debug, Serialize)]
pub struct PublishReport {
    /// Options.
    pub scenario: PublishArgs,
    /// Acknowledged publishes.
    pub acked: u64,
    /// Failed publishes.
    pub failed: u64,
    /// Acknowledged per second.
    pub per_second: f64,
    /// Latency percentiles of a request (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Maximum (ms).
    pub max_ms: f64,
}

/// Runs the benchmark.
pub async fn run(args: PublishArgs) -> anyhow::Result<PublishReport> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let payload = "x".repeat(args.payload.saturating_sub(12));
    let run = format!("{:x}", rand::random::<u32>());
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (http, stop, args, payload, run) = (
            http.clone(),
            stop.clone(),
            args.clone(),
            payload.clone(),
            run.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("valid histogram");
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                n += args.concurrency;
                let publish = |i: usize| {
                    serde_json::json!({
                        "channel": format!("{}:pub-{run}-{}", args.namespace, i % args.channels),
                        "data": {"p": payload},
                    })
                };
                let batch = args.batch as usize;
                let (url, body) = if batch == 1 {
                    (format!("{}/api/publish", args.api), publish(n))
                } else {
                    let commands: Vec<serde_json::Value> = (0..batch)
                        .map(|i| serde_json::json!({"publish": publish(n * batch + i)}))
                        .collect();
                    (
                        format!("{}/api/batch", args.api),
                        serde_json::json!({"commands": commands}),
                    )
                };
                let t = Instant::now();
                let r = http
                    .post(url)
                    .header("X-API-Key", &args.api_key)
                    .json(&body)
                    .send()
                    .await;
                let acked = match r {
                    Ok(resp) => resp.json::<serde_json::Value>().await.map_or(0, |v| {
                        if batch == 1 {
                            u64::from(v["result"]["offset"].is_u64())
                        } else {
                            let replies = if v["result"].is_object() {
                                &v["result"]["replies"]
                            } else {
                                &v["replies"]
                            };
                            replies.as_array().map_or(0, |a| {
                                a.iter().filter(|x| x["publish"]["offset"].is_u64()).count() as u64
                            })
                        }
                    }),
                    Err(_) => 0,
                };
                ok += acked;
                failed += batch as u64 - acked;
                if acked > 0 {
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                }
            }
            (hist, ok, failed)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut acked, mut failed) = (0, 0);
    for t in tasks {
        let (h, ok, f) = t.await?;
        hist.add(h)?;
        acked += ok;
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    let report = PublishReport {
        acked,
        failed,
        per_second: acked as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
        scenario: args,
    };
    if let Some(p) = &report.scenario.report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    println!(
        "acked {} ({:.0}/s), failed {}, latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        report.acked, report.per_second, report.failed, report.p50_ms, report.p99_ms, report.max_ms
    );
    Ok(report)
}
