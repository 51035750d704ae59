//! `holdfast-bench map`: a map channel under load. Fills a map with `keys` keys through the
//! server API, opens `subscribers` WebSocket connections that each page through the whole
//! state to the live phase (as centrifuge-js does), then writes `rate` updates per second to
//! random keys for `duration` seconds and measures how long each update takes to reach each
//! subscriber. Reports the fill rate, memory per key (from the server's RSS when `--server-pid`
//! is given), snapshot time for a lone subscriber and under the subscribe storm, and update
//! latency. `scripts/bench-map.sh` runs it against a release server pinned to its own core.

use crate::adapter::now_us;
use crate::client::{self, Ws};
use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Options of a map benchmark.
#[derive(Args, Debug, Clone, Serialize)]
pub struct MapArgs {
    /// Server HTTP base.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub api: String,
    /// WebSocket endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8000/connection/websocket")]
    pub ws: String,
    /// API key.
    #[arg(long, default_value = "")]
    pub api_key: String,
    /// HMAC secret of connection tokens.
    #[arg(long, default_value = "")]
    pub secret: String,
    /// The map channel (its namespace must be a `map` namespace).
    #[arg(long, default_value = "bench-map:board")]
    pub channel: String,
    /// Keys written before subscribers come.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Subscribers.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Subscribes in flight at once during the storm.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Page size subscribers ask for (the namespace's max_page_size caps it).
    #[arg(long, default_value_t = 1000)]
    pub page: u32,
    /// Updates per second once everyone is live.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of updates.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// The server's process id (memory per key from its RSS).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the JSON result here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Serialize, Default)]
pub struct Millis {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

impl Millis {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99: h.value_at_quantile(0.99) as f64 / 1000.0,
            max: h.max() as f64 / 1000.0,
            count: h.len(),
        }
    }
}

/// The result.
#[derive(Debug, Serialize)]
pub struct MapReport {
    /// Options.
    pub scenario: MapArgs,
    /// Keys written per second while filling (`map_publish` in batches of 500).
    pub fill_per_second: f64,
    /// Server RSS growth per key while filling (bytes), with `--server-pid`.
    pub memory_per_key: Option<f64>,
    /// A lone subscriber's time from its first page request to the live reply (ms), median of 5.
    pub snapshot_alone_ms: f64,
    /// Pages a snapshot took.
    pub pages: u64,
    /// Snapshot time of each subscriber during the storm.
    pub snapshot_storm: Millis,
    /// Subscribers that did not reach the live phase.
    pub failed_subscribers: u64,
    /// Subscribers whose connection ended before the run did.
    pub disconnected_subscribers: u64,
    /// Update latency: from the write's send to its arrival at a subscriber (deliveries that
    /// arrived within 10 s after the last update only: compare `deliveries_received`).
    pub update_latency: Millis,
    /// Updates written.
    pub updates: u64,
    /// Deliveries expected (updates × live subscribers) and received.
    pub deliveries_expected: u64,
    /// Deliveries received.
    pub deliveries_received: u64,
    /// Deliveries per second received while the updates were written.
    pub deliveries_per_second: f64,
    /// Share of a core the server used while the updates were written (with `--server-pid`).
    pub server_cpu: Option<f64>,
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn api(
    http: &reqwest::Client,
    args: &MapArgs,
    method: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let v: Value = http
        .post(format!("{}/api/{method}", args.api))
        .header("X-API-Key", &args.api_key)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    if let Some(e) = v.get("error") {
        bail!("{method}: {e}");
    }
    Ok(v)
}

fn value(t: u64, size: usize) -> Value {
    json!({"t": t, "p": "x".repeat(size.saturating_sub(30))})
}

/// Messages of one frame (newline-separated JSON).
fn messages(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').filter(|l| !l.is_empty())
}

/// Connects and pages through the map to the live phase; returns the socket, the time it took
/// and the pages it read.
async fn subscribe(args: &MapArgs, user: &str) -> anyhow::Result<(Ws, Duration, u64)> {
    let mut ws = client::open(&args.ws, None).await?;
    let token = client::token(&args.secret, user)?;
    client::send(
        &mut ws,
        json!({"id": 1, "connect": {"token": token}}).to_string(),
    )
    .await?;
    read_reply(&mut ws, 1).await?;
    let started = Instant::now();
    let mut req = json!({"channel": args.channel, "type": 1, "phase": 2, "limit": args.page});
    let mut pages = 0;
    for id in 2u32.. {
        client::send(&mut ws, json!({"id": id, "subscribe": req}).to_string()).await?;
        let r = read_reply(&mut ws, id).await?;
        let s = &r["subscribe"];
        pages += 1;
        match s["phase"].as_i64().unwrap_or(0) {
            0 => return Ok((ws, started.elapsed(), pages)),
            2 => {
                let (offset, epoch) = (&s["offset"], &s["epoch"]);
                req = match s["cursor"].as_str() {
                    Some(c) => json!({"channel": args.channel, "type": 1, "phase": 2,
                        "limit": args.page, "cursor": c, "offset": offset, "epoch": epoch}),
                    None => json!({"channel": args.channel, "type": 1, "phase": 1,
                        "limit": args.page, "offset": offset, "epoch": epoch}),
                };
            }
            1 => req["offset"] = s["offset"].clone(),
            p => bail!("unexpected phase {p}"),
        }
    }
    unreachable!("the page loop returns")
}

async fn read_reply(ws: &mut Ws, id: u32) -> anyhow::Result<Value> {
    loop {
        let msg = ws.next().await.context("closed")??;
        let Message::Text(text) = msg else { continue };
        for line in messages(&text) {
            let v: Value = serde_json::from_str(line)?;
            if v["id"].as_u64() == Some(u64::from(id)) {
                if let Some(e) = v.get("error") {
                    bail!("error reply: {e}");
                }
                return Ok(v);
            }
        }
    }
}

/// Reads pushes (answering pings) until `stop`, recording each update's latency; the flag says
/// whether the connection ended before.
async fn follow(
    mut ws: Ws,
    mut stop: tokio::sync::watch::Receiver<bool>,
    received: Arc<AtomicU64>,
) -> (Histogram<u64>, bool) {
    let mut hist = Histogram::<u64>::new(3).expect("valid histogram");
    loop {
        let next = tokio::select! {
            m = ws.next() => m,
            _ = stop.changed() => return (hist, false),
        };
        let Some(Ok(Message::Text(text))) = next else {
            if matches!(next, None | Some(Err(_))) {
                return (hist, true);
            }
            continue;
        };
        for line in messages(&text) {
            if line == "{}" {
                // A ping: answer it.
                let _ = client::send(&mut ws, "{}".into()).await;
                continue;
            }
            let Ok(msg) = client::parse(line) else {
                continue;
            };
            if let Some(p) = msg.push.and_then(|p| p.publication)
                && let Some(t) = p.sent_at_us()
            {
                let _ = hist.record(now_us().saturating_sub(t));
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: MapArgs) -> anyhow::Result<MapReport> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    // Fill.
    let before = args.server_pid.and_then(rss);
    let fill_started = Instant::now();
    for chunk in (0..args.keys).collect::<Vec<_>>().chunks(500) {
        let commands: Vec<Value> = chunk
            .iter()
            .map(|k| {
                json!({"map_publish": {"channel": args.channel, "key": format!("key-{k:06}"),
                    "data": value(0, args.payload)}})
            })
            .collect();
        api(&http, &args, "batch", json!({"commands": commands})).await?;
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let after = args.server_pid.and_then(rss);
    let memory_per_key = match (before, after) {
        (Some(b), Some(a)) if args.keys > 0 => Some(a.saturating_sub(b) as f64 / args.keys as f64),
        _ => None,
    };
    eprintln!("filled {} keys in {fill_secs:.2} s", args.keys);
    // A lone subscriber, five times.
    let mut alone = Vec::new();
    let mut pages = 0;
    for i in 0..5 {
        let (_, took, p) = subscribe(&args, &format!("alone-{i}")).await?;
        alone.push(took);
        pages = p;
    }
    alone.sort();
    let snapshot_alone_ms = alone[2].as_secs_f64() * 1000.0;
    eprintln!("lone snapshot {snapshot_alone_ms:.1} ms in {pages} pages");
    // The storm. Each subscriber follows its pushes (and answers pings) as soon as it is live.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(args.subscribers as u64);
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut joins = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let (args, sem, bar) = (args.clone(), sem.clone(), bar.clone());
        let (stop, received) = (stop_rx.clone(), received.clone());
        joins.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.ok()?;
            let r = subscribe(&args, &format!("sub-{i}")).await;
            drop(permit);
            bar.inc(1);
            let (ws, took, _) = r.ok()?;
            Some((took, tokio::spawn(follow(ws, stop, received))))
        }));
    }
    let mut storm = Histogram::<u64>::new(3).expect("valid histogram");
    let mut followers = Vec::new();
    let mut failed = 0u64;
    for j in joins {
        match j.await.ok().flatten() {
            Some((took, follower)) => {
                let _ = storm.record(took.as_micros() as u64);
                followers.push(follower);
            }
            None => failed += 1,
        }
    }
    bar.finish_and_clear();
    let n_live = followers.iter().filter(|f| !f.is_finished()).count() as u64;
    eprintln!("{n_live} subscribers live ({failed} failed)");
    // Updates.
    // One batch every 10 ms (or every 1/rate s below 100 updates/s).
    let every = Duration::from_secs_f64((1.0 / args.rate.max(1) as f64).max(0.01));
    let per_tick = ((args.rate as f64 * every.as_secs_f64()).round() as u64).max(1);
    let mut tick = tokio::time::interval(every);
    let started = Instant::now();
    let cpu_before = args.server_pid.and_then(cpu_secs);
    let mut updates = 0u64;
    let mut rng = rand::rng();
    while started.elapsed().as_secs_f64() < args.duration {
        tick.tick().await;
        let commands: Vec<Value> = (0..per_tick)
            .map(|_| {
                let k = rand::Rng::random_range(&mut rng, 0..args.keys.max(1));
                json!({"map_publish": {"channel": args.channel, "key": format!("key-{k:06}"),
                    "data": value(now_us(), args.payload)}})
            })
            .collect();
        api(&http, &args, "batch", json!({"commands": commands})).await?;
        updates += per_tick;
    }
    let expected = updates * n_live;
    let in_window = received.load(Ordering::Relaxed);
    let window = started.elapsed().as_secs_f64();
    let server_cpu = match (cpu_before, args.server_pid.and_then(cpu_secs)) {
        (Some(a), Some(b)) => Some((b - a) / window),
        _ => None,
    };
    // Let the last updates arrive (at most 10 s).
    let drain = Instant::now();
    while received.load(Ordering::Relaxed) < expected && drain.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    let mut latency = Histogram::<u64>::new(3).expect("valid histogram");
    let mut disconnected = 0u64;
    for f in followers {
        if let Ok((h, closed)) = f.await {
            let _ = latency.add(&h);
            disconnected += u64::from(closed);
        }
    }
    let got = received.load(Ordering::Relaxed);
    let report = MapReport {
        fill_per_second: args.keys as f64 / fill_secs.max(1e-9),
        memory_per_key,
        snapshot_alone_ms,
        pages,
        snapshot_storm: Millis::of(&storm),
        failed_subscribers: failed,
        disconnected_subscribers: disconnected,
        update_latency: Millis::of(&latency),
        updates,
        deliveries_expected: expected,
        deliveries_received: got,
        deliveries_per_second: in_window as f64 / window,
        server_cpu,
        scenario: args,
    };
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &report.scenario.report {
        std::fs::write(path, &text)?;
    }
    println!("{text}");
    Ok(report)
}
