//! `holdfast-bench verify`: subscribers, publishers and faults against a running server, then an
//! account of every publication each subscriber should have received.
//!
//! Model. A subscriber's deliveries are checked against stream offsets: in a segment (one epoch,
//! starting after the position the server gave) every offset must arrive once, in order. A
//! subscribe answered `recovered: false` (or a new epoch) closes the segment as *told*: what it
//! misses is "lost, told". Anything else missing is "lost silently". Offsets that arrive twice
//! are duplicates; offsets that skip ahead without the server saying so are out of order.
//!
//! Long (≈1,200 lines) on purpose: the verifier's model, its worker processes, fault injection and
//! report are one program a reader follows top to bottom; the accounting it must get right is
//! unit-tested at the end.

use crate::client;
use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Sockets one worker process opens at most (the machine allows 20,000 files per process).
const MAX_PER_WORKER: usize = 15_000;

/// Options of a verify run.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct VerifyArgs {
    /// Server WebSocket URL; several nodes comma-separated (subscribers spread over them and
    /// move to the next one on every reconnect, as behind a load balancer).
    #[arg(long, default_value = "ws://127.0.0.1:8000/connection/websocket")]
    pub url: String,
    /// Transport of the subscribers: `websocket`, or the emulated `http-stream` / `sse` (their
    /// commands and pongs go through `/emulation`; streams on the same hosts as `--url`).
    #[arg(long, value_enum, default_value_t = client::Transport::Websocket)]
    pub transport: client::Transport,
    /// Server HTTP base (for /api); several comma-separated (requests rotate over them).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub api: String,
    /// Server API key.
    #[arg(long, env = "VERIFY_API_KEY", default_value = "")]
    pub api_key: String,
    /// HMAC secret to mint connection tokens (empty: connect without a token).
    #[arg(long, env = "VERIFY_SECRET", default_value = "")]
    pub secret: String,
    /// Namespace of the verify channels (needs history, force_recovery, and
    /// allow_subscribe_for_client / allow_publish_for_client).
    #[arg(long, default_value = "verify")]
    pub namespace: String,
    /// Subscribers.
    #[arg(long, default_value_t = 300)]
    pub subscribers: usize,
    /// Channels the subscribers are spread over.
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Length of the publishing phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Publications per second through the server API.
    #[arg(long, default_value_t = 50.0)]
    pub api_rate: f64,
    /// Publications per second through a client connection (`publish` command).
    #[arg(long, default_value_t = 10.0)]
    pub client_rate: f64,
    /// Mean seconds between server-side disconnects (API `disconnect`, code 3011) of each
    /// subscriber; 0 = none. The jitter scenario uses 15.
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// Mean seconds between client-side socket drops (no close frame) per subscriber; 0 = none.
    #[arg(long, default_value_t = 0.0)]
    pub drop_every: f64,
    /// Fraction of subscribers that stop reading once for `slow_for` seconds.
    #[arg(long, default_value_t = 0.0)]
    pub slow_fraction: f64,
    /// How long a slow subscriber stops reading, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub slow_for: f64,
    /// Seconds from the start at which every subscriber drops at once (repeatable).
    #[arg(long = "storm-at")]
    pub storm_at: Vec<f64>,
    /// Shell command that restarts a server, run at the matching `--restart-at` (repeatable:
    /// a rolling restart gives one per node).
    #[arg(long = "restart-cmd")]
    pub restart_cmd: Vec<String>,
    /// Seconds from the start at which the matching `--restart-cmd` runs (default 5).
    #[arg(long = "restart-at")]
    pub restart_at: Vec<f64>,
    /// Longest wait for subscribers to catch up after publishing stops, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub drain: f64,
    /// Spread client sockets over this many source addresses 127.0.0.2, 127.0.0.3, …
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Worker processes (0 = one per 15,000 subscribers; 1 = this process).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Exit with an error unless 0 silently lost, 0 duplicated, 0 out of order.
    #[arg(long)]
    pub check: bool,
    /// Also fail the check when any publication was lost even though the client was told.
    #[arg(long)]
    pub check_none_lost: bool,
    /// Fail the check when the p99 catch-up exceeds this many milliseconds.
    #[arg(long)]
    pub max_p99_catch_up_ms: Option<u64>,
    /// Publish through a consumer's source instead of the HTTP API (`--api-rate` writes per
    /// second): PostgreSQL outbox rows, Redis stream entries or JetStream messages. The report
    /// gains a source account (each committed write stored once, in order; no rolled-back write).
    #[arg(long, value_enum)]
    pub source: Option<crate::source::Source>,
    /// The source: a PostgreSQL DSN, a Redis URL or a NATS URL.
    #[arg(long, default_value = "")]
    pub source_url: String,
    /// Fraction of source writes rolled back (PostgreSQL transactions, Redis MULTI/DISCARD).
    #[arg(long, default_value_t = 0.1)]
    pub rollback_fraction: f64,
    /// Outbox partitions the channels are spread over (the consumer's `num_partitions`).
    #[arg(long, default_value_t = 1)]
    pub source_partitions: usize,
    /// Internal: this process is worker `i` of `n` ("i/n").
    #[arg(long, hide = true)]
    pub worker: Option<String>,
    /// Internal: run id shared with the workers.
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

/// One subscriber's account.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Account {
    /// Closed segments: (channel epoch, base, end (None = resolve at the end), received, told).
    segments: Vec<Segment>,
    duplicated: u64,
    out_of_order: u64,
    told: u64,
    reconnects: u64,
    /// Close codes seen.
    closes: BTreeMap<u16, u64>,
    /// Milliseconds from socket open to the subscribe reply, for every re-subscribe.
    catch_up_ms: Vec<f64>,
    /// Highest offset seen per epoch.
    max_seen: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Segment {
    epoch: String,
    base: u64,
    end: Option<u64>,
    received: u64,
    told: bool,
}

/// What a worker reports.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    /// channel → accounts.
    accounts: Vec<(String, Account)>,
    /// Live deliveries' publish → receive latency: (microseconds, count).
    #[serde(default)]
    latency_us: Vec<(u64, u64)>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Options.
    pub scenario: VerifyArgs,
    /// Publications acknowledged through the API.
    pub api_publications: u64,
    /// API publishes that failed (not acknowledged, so not expected).
    pub api_failures: u64,
    /// Publications acknowledged through the client protocol.
    pub client_publications: u64,
    /// Deliveries every subscriber should have received.
    pub expected: u64,
    /// Deliveries received (once, in order).
    pub delivered: u64,
    /// Missing without the client being told.
    pub lost_silently: u64,
    /// Missing after the client was told (recovered:false, 2500, 3010).
    pub lost_told: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Skipped ahead without being told.
    pub out_of_order: u64,
    /// Times a subscriber was told it could not recover.
    pub told_events: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Close codes the subscribers saw.
    pub close_codes: BTreeMap<u16, u64>,
    /// delivered / expected, percent.
    pub delivered_pct: f64,
    /// Publish → receive latency of live (not recovered) deliveries (ms).
    pub delivery_ms: Percentiles,
    /// Catch-up latency, socket open → subscribe reply (ms).
    pub catch_up_ms: Percentiles,
    /// Wall time of the run, seconds.
    pub wall_seconds: f64,
    /// With `--source`: the source account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::source::SourceReport>,
}

/// Latency summary.
#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// Shared counters for the progress bar.
#[derive(Debug, Default)]
struct Live {
    delivered: AtomicU64,
    reconnects: AtomicU64,
    published: AtomicU64,
    /// Publish → receive latency of live deliveries, microseconds.
    latency: std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl Live {
    fn record_latency(&self, us: u64) {
        let mut h = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let h = h.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("histogram bounds")
        });
        h.saturating_record(us.max(1));
    }

    fn latency_samples(&self) -> Vec<(u64, u64)> {
        let h = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.as_ref()
            .map(|h| {
                h.iter_recorded()
                    .map(|v| (v.value_iterated_to(), v.count_at_value()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Microseconds since the Unix epoch (the publish time carried in payloads).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn channel_name(args: &VerifyArgs, run: &str, k: usize) -> String {
    format!("{}:{}-{}", args.namespace, run, k)
}

fn source_ip(args: &VerifyArgs, i: usize) -> Option<IpAddr> {
    if args.source_ips <= 1 {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % usize::from(args.source_ips)) as u8,
    )))
}

/// Runs a verify (the parent, or a worker when `args.worker` is set).
pub async fn run(mut args: VerifyArgs) -> anyhow::Result<bool> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(w) = args.worker.clone() {
        let (i, n) = w.split_once('/').context("--worker i/n")?;
        let result = run_subscribers(&args, i.parse()?, n.parse()?, None).await?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(true);
    }
    let run_id = format!("{:x}", rand::rng().random::<u32>());
    args.run_id = Some(run_id.clone());
    let workers = if args.workers == 0 {
        args.subscribers.div_ceil(MAX_PER_WORKER).max(1)
    } else {
        args.workers
    };
    let started = Instant::now();
    let live = Arc::new(Live::default());
    let stop_pub = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Acks::default()));
    let written = Arc::new(Mutex::new(crate::source::Written::default()));
    // Subscribers first (in-process, or in worker processes), then publishers.
    let subs = {
        let args = args.clone();
        let live = live.clone();
        tokio::spawn(async move {
            if workers <= 1 {
                run_subscribers(&args, 0, 1, Some(live)).await
            } else {
                run_workers(&args, workers).await
            }
        })
    };
    // Give subscribers a moment to connect before the first publication counts: every segment
    // starts at the position the subscribe reply gives, so early publications are simply
    // outside it, never miscounted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut pubs = spawn_publishers(&args, &run_id, acks.clone(), stop_pub.clone(), live.clone());
    if let Some(src) = args.source {
        pubs.extend(spawn_source_writers(
            &args,
            src,
            &run_id,
            written.clone(),
            stop_pub.clone(),
            live.clone(),
        ));
    }
    let restarts: Vec<_> = args
        .restart_cmd
        .iter()
        .enumerate()
        .map(|(i, cmd)| {
            let at = Duration::from_secs_f64(args.restart_at.get(i).copied().unwrap_or(5.0));
            let cmd = cmd.clone();
            tokio::spawn(async move {
                tokio::time::sleep(at).await;
                let out = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .status()
                    .await;
                eprintln!("restart command ({cmd}): {out:?}");
            })
        })
        .collect();
    let bar = (!args.quiet).then(|| {
        let b = indicatif::ProgressBar::new((args.duration + args.drain) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let total = Duration::from_secs_f64(args.duration);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(b) = &bar {
            b.set_position(started.elapsed().as_secs());
            b.set_message(format!(
                "published {} delivered {} reconnects {}",
                live.published.load(Ordering::Relaxed),
                live.delivered.load(Ordering::Relaxed),
                live.reconnects.load(Ordering::Relaxed)
            ));
        }
    }
    stop_pub.store(true, Ordering::Release);
    for p in pubs {
        let _ = p.await;
    }
    for r in restarts {
        let _ = r.await;
    }
    // Through a source, publications are still on their way: wait until every committed write
    // is stored (or the drain time passes) before reading where the streams end.
    let source_report = match args.source {
        Some(_) => {
            let written = written.lock().await;
            let http = reqwest::Client::new();
            let drain = Duration::from_secs_f64(args.drain);
            Some(
                crate::source::account(&written, drain, |ch| {
                    let (http, args) = (http.clone(), args.clone());
                    async move {
                        let r = api(
                            &http,
                            &args,
                            "history",
                            serde_json::json!({"channel": ch, "limit": -1}),
                        )
                        .await?;
                        Ok(r["publications"]
                            .as_array()
                            .map(|a| a.iter().map(|p| p["data"].clone()).collect())
                            .unwrap_or_default())
                    }
                })
                .await,
            )
        }
        None => None,
    };
    // Tell the subscribers where the streams end; they drain up to it.
    let tops = final_tops(&args, &run_id).await?;
    write_tops(&run_id, &tops)?;
    let result = subs.await.context("subscribers")??;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let acks = acks.lock().await;
    let mut report = account(&args, &result, &tops, &acks, started.elapsed());
    report.source = source_report;
    print_summary(&report);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("report written to {}", path.display());
    }
    let mut ok = report.lost_silently == 0 && report.duplicated == 0 && report.out_of_order == 0;
    if args.check_none_lost {
        ok &= report.lost_told == 0;
    }
    if let Some(max) = args.max_p99_catch_up_ms {
        ok &= report.catch_up_ms.p99 <= max as f64;
    }
    if let Some(s) = &report.source {
        ok &= s.ok();
    }
    Ok(!args.check || ok)
}

/// Where the streams ended: channel → (epoch, top offset).
type Tops = BTreeMap<String, (String, u64)>;

fn tops_path(run: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("holdfast-verify-{run}.tops.json"))
}

fn write_tops(run: &str, tops: &Tops) -> anyhow::Result<()> {
    std::fs::write(tops_path(run), serde_json::to_vec(tops)?)?;
    Ok(())
}

async fn read_tops(run: &str, stop_after: Duration) -> Option<Tops> {
    let deadline = Instant::now() + stop_after;
    loop {
        if let Ok(b) = std::fs::read(tops_path(run))
            && let Ok(t) = serde_json::from_slice(&b)
        {
            return Some(t);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn final_tops(args: &VerifyArgs, run: &str) -> anyhow::Result<Tops> {
    let http = reqwest::Client::new();
    let mut tops = Tops::new();
    for k in 0..args.channels {
        let ch = channel_name(args, run, k);
        let mut last_err = None;
        // Bounded by time, not attempts: after a Redis Cluster failover a node may refuse or
        // time out reads for tens of seconds while it finds the new master, and quick
        // refusals would use up a count of attempts.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            match api(&http, args, "history", serde_json::json!({"channel": ch})).await {
                Ok(v) => {
                    let epoch = v["epoch"].as_str().unwrap_or("").to_owned();
                    let top = v["offset"].as_u64().unwrap_or(0);
                    tops.insert(ch.clone(), (epoch, top));
                    last_err = None;
                    break;
                }
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e.context(format!("reading the final position of {ch}")));
        }
    }
    Ok(tops)
}

/// Rotates API requests over the `--api` bases.
static API_TURN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn api(
    http: &reqwest::Client,
    args: &VerifyArgs,
    method: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let bases: Vec<&str> = args.api.split(',').collect();
    let base = bases[API_TURN.fetch_add(1, Ordering::Relaxed) % bases.len()];
    let r: serde_json::Value = http
        .post(format!("{base}/api/{method}"))
        .header("X-API-Key", &args.api_key)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .json()
        .await?;
    if let Some(e) = r.get("error") {
        anyhow::bail!("API {method}: {e}");
    }
    Ok(r["result"].clone())
}

/// Publications acknowledged per (channel, epoch): highest offset.
#[derive(Debug, Default)]
struct Acks {
    api_ok: u64,
    api_failed: u64,
    client_ok: u64,
    max: BTreeMap<(String, String), u64>,
}

/// One writer per channel (so a channel's writes commit in order), `--api-rate` in total.
fn spawn_source_writers(
    args: &VerifyArgs,
    src: crate::source::Source,
    run: &str,
    written: Arc<Mutex<crate::source::Written>>,
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..args.channels)
        .map(|k| {
            let (args, run, written, stop, live) = (
                args.clone(),
                run.to_owned(),
                written.clone(),
                stop.clone(),
                live.clone(),
            );
            tokio::spawn(async move {
                let ch = channel_name(&args, &run, k);
                let period = Duration::from_secs_f64(args.channels as f64 / args.api_rate.max(0.01));
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut writer = None;
                let mut seq = 0u64;
                while !stop.load(Ordering::Acquire) {
                    tick.tick().await;
                    if writer.is_none() {
                        match crate::source::Writer::connect(src, &args.source_url).await {
                            Ok(w) => writer = Some(w),
                            Err(e) => {
                                eprintln!("source writer {k}: {e:#}");
                                continue;
                            }
                        }
                    }
                    let Some(w) = writer.as_mut() else { continue };
                    seq += 1;
                    let rollback = src != crate::source::Source::Nats
                        && rand::rng().random_bool(args.rollback_fraction.clamp(0.0, 1.0));
                    let cmd = serde_json::json!({"channel": ch, "data": {"p": "src", "s": seq, "rb": rollback, "t": unix_us()}});
                    let r = w.write(k, args.source_partitions, &cmd, rollback).await;
                    let mut wr = written.lock().await;
                    match r {
                        Ok(true) => {
                            wr.committed.entry(ch.clone()).or_default().push(seq);
                            live.published.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => wr.rolled_back += 1,
                        Err(_) => {
                            wr.uncertain.entry(ch.clone()).or_default().insert(seq);
                            writer = None;
                        }
                    }
                }
            })
        })
        .collect()
}

fn spawn_publishers(
    args: &VerifyArgs,
    run: &str,
    acks: Arc<Mutex<Acks>>,
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    if args.api_rate > 0.0 && args.source.is_none() {
        let (args, run, acks, stop, live) = (
            args.clone(),
            run.to_owned(),
            acks.clone(),
            stop.clone(),
            live.clone(),
        );
        handles.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let period = Duration::from_secs_f64(1.0 / args.api_rate);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut seq = 0u64;
            let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
            let mut tasks = Vec::new();
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                seq += 1;
                let ch = channel_name(&args, &run, (seq as usize) % args.channels);
                let body = serde_json::json!({"channel": ch, "data": {"p": "api", "s": seq, "t": unix_us()}});
                // Publishes run concurrently (bounded) so the rate holds while the server is busy.
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (http, args, acks, live) =
                    (http.clone(), args.clone(), acks.clone(), live.clone());
                tasks.push(tokio::spawn(async move {
                    match api(&http, &args, "publish", body).await {
                        Ok(r) => {
                            let mut a = acks.lock().await;
                            a.api_ok += 1;
                            let e = r["epoch"].as_str().unwrap_or("").to_owned();
                            let o = r["offset"].as_u64().unwrap_or(0);
                            let m = a.max.entry((ch, e)).or_default();
                            *m = (*m).max(o);
                            live.published.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => acks.lock().await.api_failed += 1,
                    }
                    drop(permit);
                }));
                tasks.retain(|t| !t.is_finished());
            }
            for t in tasks {
                let _ = t.await;
            }
        }));
    }
    if args.client_rate > 0.0 {
        let (args, run, acks, stop, live) = (args.clone(), run.to_owned(), acks, stop, live);
        handles.push(tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / args.client_rate);
            let mut seq = 0u64;
            'outer: while !stop.load(Ordering::Acquire) {
                let Ok(mut ws) = connect(&args, "verify-publisher", None, seq as usize).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut id = 1u32;
                while !stop.load(Ordering::Acquire) {
                    tokio::select! {
                        _ = tick.tick() => {
                            seq += 1;
                            id += 1;
                            let ch = channel_name(&args, &run, (seq as usize) % args.channels);
                            let cmd = serde_json::json!({"id": id, "publish": {"channel": ch, "data": {"p": "client", "s": seq, "t": unix_us()}}});
                            if ws.send(cmd.to_string()).await.is_err() {
                                continue 'outer;
                            }
                        }
                        msg = ws.next() => match msg {
                            Some(Ok(client::Incoming::Text(t))) => {
                                for line in t.split('\n') {
                                    if line == "{}" {
                                        let _ = ws.send("{}".into()).await;
                                    } else if let Ok(m) = client::parse(line)
                                        && m.publish.is_some() {
                                            acks.lock().await.client_ok += 1;
                                            live.published.fetch_add(1, Ordering::Relaxed);
                                        }
                                }
                            }
                            _ => continue 'outer,
                        }
                    }
                }
            }
        }));
    }
    handles
}

/// Connects (to the `turn`-th of the `--url` nodes) and completes `connect`.
async fn connect(
    args: &VerifyArgs,
    user: &str,
    source: Option<IpAddr>,
    turn: usize,
) -> anyhow::Result<client::Conn> {
    let urls: Vec<&str> = args.url.split(',').collect();
    let connect = if args.secret.is_empty() {
        serde_json::json!({"id": 1, "connect": {"name": "holdfast-bench"}})
    } else {
        serde_json::json!({"id": 1, "connect": {"token": client::token(&args.secret, user)?, "name": "holdfast-bench"}})
    };
    let mut conn = client::Conn::open(
        args.transport,
        urls[turn % urls.len()],
        source,
        connect.to_string(),
    )
    .await?;
    // Wait for the connect reply.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
            Ok(Some(Ok(client::Incoming::Text(t)))) => {
                for line in t.split('\n').filter(|l| !l.is_empty()) {
                    let m = client::parse(line)?;
                    if m.id == 1 {
                        if let Some(e) = m.error {
                            anyhow::bail!("connect error {} {}", e.code, e.message);
                        }
                        return Ok(conn);
                    }
                }
            }
            Ok(Some(Ok(client::Incoming::Close(c)))) => anyhow::bail!("closed on connect: {c:?}"),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => anyhow::bail!("closed on connect"),
            Err(_) => anyhow::bail!("connect timed out"),
        }
    }
}

async fn run_workers(args: &VerifyArgs, n: usize) -> anyhow::Result<WorkerResult> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..n {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("verify")
            .args(worker_args(args))
            .arg("--worker")
            .arg(format!("{i}/{n}"));
        cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true);
        children.push(cmd.spawn().context("spawning a worker")?);
    }
    let mut all = WorkerResult::default();
    for c in children {
        let out = c.wait_with_output().await?;
        anyhow::ensure!(out.status.success(), "a worker failed: {:?}", out.status);
        let r: WorkerResult = serde_json::from_slice(&out.stdout).context("worker output")?;
        all.accounts.extend(r.accounts);
        all.latency_us.extend(r.latency_us);
    }
    Ok(all)
}

fn worker_args(args: &VerifyArgs) -> Vec<String> {
    let mut v = vec![
        "--url".into(),
        args.url.clone(),
        "--api".into(),
        args.api.clone(),
        "--api-key".into(),
        args.api_key.clone(),
        "--secret".into(),
        args.secret.clone(),
        "--namespace".into(),
        args.namespace.clone(),
        "--subscribers".into(),
        args.subscribers.to_string(),
        "--channels".into(),
        args.channels.to_string(),
        "--duration".into(),
        args.duration.to_string(),
        "--jitter".into(),
        args.jitter.to_string(),
        "--drop-every".into(),
        args.drop_every.to_string(),
        "--slow-fraction".into(),
        args.slow_fraction.to_string(),
        "--slow-for".into(),
        args.slow_for.to_string(),
        "--drain".into(),
        args.drain.to_string(),
        "--source-ips".into(),
        args.source_ips.to_string(),
        "--run-id".into(),
        args.run_id.clone().unwrap_or_default(),
        "--transport".into(),
        match args.transport {
            client::Transport::Websocket => "websocket",
            client::Transport::HttpStream => "http-stream",
            client::Transport::Sse => "sse",
        }
        .into(),
        "--quiet".into(),
    ];
    for s in &args.storm_at {
        v.push("--storm-at".into());
        v.push(s.to_string());
    }
    v
}

/// Runs the subscribers with index ≡ `index` (mod `count`).
async fn run_subscribers(
    args: &VerifyArgs,
    index: usize,
    count: usize,
    live: Option<Arc<Live>>,
) -> anyhow::Result<WorkerResult> {
    let run = args.run_id.clone().context("run id")?;
    let live = live.unwrap_or_default();
    let started = Instant::now();
    let storms: Arc<Vec<Duration>> = Arc::new(
        args.storm_at
            .iter()
            .map(|s| Duration::from_secs_f64(*s))
            .collect(),
    );
    let mut tasks = Vec::new();
    for i in (index..args.subscribers).step_by(count) {
        let ch = channel_name(args, &run, i % args.channels);
        let user = format!("verify-{run}-{i}");
        let args = args.clone();
        let (live, storms, run) = (live.clone(), storms.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let acc = subscriber(
                &args,
                &run,
                &ch,
                &user,
                source_ip(&args, i),
                started,
                &storms,
                &live,
            )
            .await;
            (ch, acc)
        }));
        // Connect gradually: a burst of thousands of handshakes is a storm of its own.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if args.jitter > 0.0 {
        tokio::spawn(jitter(args.clone(), run.clone(), index, count, started));
    }
    let mut result = WorkerResult::default();
    for t in tasks {
        result.accounts.push(t.await?);
    }
    result.latency_us = live.latency_samples();
    Ok(result)
}

/// Server-side disconnects of each subscriber at random times, ~`jitter` seconds apart.
async fn jitter(args: VerifyArgs, run: String, index: usize, count: usize, started: Instant) {
    let http = reqwest::Client::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
    let end = Duration::from_secs_f64(args.duration);
    let mut next: Vec<(Duration, usize)> = (index..args.subscribers)
        .step_by(count)
        .map(|i| {
            (
                Duration::from_secs_f64(rand::rng().random_range(0.0..args.jitter * 2.0)),
                i,
            )
        })
        .collect();
    loop {
        next.sort();
        let Some(&(at, i)) = next.first() else { return };
        if at >= end {
            return;
        }
        tokio::time::sleep_until((started + at).into()).await;
        let user = format!("verify-{run}-{i}");
        let body = serde_json::json!({"user": user, "disconnect": {"code": 3011, "reason": "verify jitter"}});
        // Fire and go on: a busy server must not slow the schedule down (bounded in flight).
        if let Ok(permit) = in_flight.clone().try_acquire_owned() {
            let (http, args) = (http.clone(), args.clone());
            tokio::spawn(async move {
                let _ = api(&http, &args, "disconnect", body).await;
                drop(permit);
            });
        }
        next[0].0 = at
            + Duration::from_secs_f64(
                rand::rng().random_range(args.jitter * 0.5..args.jitter * 1.5),
            );
    }
}

enum Exit {
    /// Reconnect.
    Reconnect(Option<u16>),
    /// The run is over.
    Done,
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    args: &VerifyArgs,
    run: &str,
    channel: &str,
    user: &str,
    source: Option<IpAddr>,
    started: Instant,
    storms: &[Duration],
    live: &Live,
) -> Account {
    let mut acc = Account::default();
    // Current segment and position.
    let mut seg: Option<Segment> = None;
    let mut next = 0u64;
    let mut slow_done = rand::rng().random::<f64>() >= args.slow_fraction;
    let publishing_end = started + Duration::from_secs_f64(args.duration);
    let mut tops: Option<Tops> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut storm_idx = 0usize;
    let mut backoff = Duration::from_millis(20);
    // Which node the next (re)connect goes to: spread by user, then rotate.
    let mut turn = user.bytes().map(usize::from).sum::<usize>();
    loop {
        // After publishing: finish once caught up with the final top, or at the deadline.
        if Instant::now() >= publishing_end {
            if tops.is_none() {
                tops = read_tops(run, Duration::from_secs_f64(args.drain + 30.0)).await;
                drain_deadline = Some(Instant::now() + Duration::from_secs_f64(args.drain));
            }
            if caught_up(&seg, next, channel, tops.as_ref())
                || drain_deadline.is_some_and(|d| Instant::now() > d)
            {
                break;
            }
        }
        turn += 1;
        let mut ws = match connect(args, user, source, turn).await {
            Ok(ws) => ws,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        let opened = Instant::now();
        let sub = match &seg {
            Some(s) => {
                serde_json::json!({"id": 2, "subscribe": {"channel": channel, "recover": true, "offset": next.saturating_sub(1), "epoch": s.epoch}})
            }
            None => serde_json::json!({"id": 2, "subscribe": {"channel": channel}}),
        };
        if ws.send(sub.to_string()).await.is_err() {
            continue;
        }
        let resubscribing = seg.is_some();
        let mut waiting_reply = true;
        // Per-connection fault timers.
        let drop_at = (args.drop_every > 0.0).then(|| {
            Instant::now()
                + Duration::from_secs_f64(rand::rng().random_range(0.0..args.drop_every * 2.0))
        });
        let exit = loop {
            let storm = storms.get(storm_idx).map(|s| started + *s);
            let stop_check = Instant::now() + Duration::from_millis(200);
            let wake = [drop_at, storm, Some(stop_check)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(stop_check);
            // A slow subscriber stops reading for a while, once.
            if !slow_done && started.elapsed() > Duration::from_secs_f64(args.duration / 3.0) {
                slow_done = true;
                tokio::time::sleep(Duration::from_secs_f64(args.slow_for)).await;
            }
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = tokio::time::sleep_until(wake.into()) => {
                    if storm.is_some_and(|s| Instant::now() >= s) {
                        storm_idx += 1;
                        break Exit::Reconnect(None);
                    }
                    if drop_at.is_some_and(|d| Instant::now() >= d) {
                        break Exit::Reconnect(None);
                    }
                    if Instant::now() >= publishing_end {
                        if tops.is_none() {
                            tops = read_tops(run, Duration::from_secs_f64(args.drain + 30.0)).await;
                            drain_deadline = Some(Instant::now() + Duration::from_secs_f64(args.drain));
                        }
                        if caught_up(&seg, next, channel, tops.as_ref()) || drain_deadline.is_some_and(|d| Instant::now() > d) {
                            break Exit::Done;
                        }
                    }
                    continue;
                }
            };
            let text = match msg {
                Some(Ok(client::Incoming::Text(t))) => t,
                Some(Ok(client::Incoming::Close(code))) => break Exit::Reconnect(code),
                Some(Err(_)) | None => break Exit::Reconnect(None),
            };
            let mut resubscribe = false;
            for line in text.split('\n').filter(|l| !l.is_empty()) {
                if line == "{}" {
                    let _ = ws.send("{}".into()).await;
                    continue;
                }
                let Ok(m) = client::parse(line) else { continue };
                if m.id == 2 {
                    if let Some(r) = m.subscribe {
                        waiting_reply = false;
                        if resubscribing {
                            acc.catch_up_ms
                                .push(opened.elapsed().as_secs_f64() * 1000.0);
                        }
                        match seg.is_some() && r.recovered {
                            true => {
                                for p in &r.publications {
                                    accept(&mut acc, &mut seg, &mut next, p.offset, live);
                                }
                            }
                            false => {
                                // First subscribe, or not recovered: a new segment from here.
                                if let Some(mut old) = seg.take() {
                                    old.told = true;
                                    old.end = (old.epoch == r.epoch).then_some(r.offset);
                                    acc.told += 1;
                                    acc.segments.push(old);
                                }
                                seg = Some(Segment {
                                    epoch: r.epoch.clone(),
                                    base: r.offset,
                                    end: None,
                                    received: 0,
                                    told: false,
                                });
                                next = r.offset + 1;
                            }
                        }
                    } else if m.error.is_some() {
                        resubscribe = true;
                    }
                    continue;
                }
                if let Some(p) = m.push {
                    if let Some(publication) = p.publication {
                        if p.channel == channel {
                            if waiting_reply {
                                // The subscribe reply must come before any publication.
                                acc.out_of_order += 1;
                            } else {
                                if let Some(t) = publication.sent_at_us() {
                                    live.record_latency(unix_us().saturating_sub(t));
                                }
                                accept(&mut acc, &mut seg, &mut next, publication.offset, live);
                            }
                        }
                    } else if let Some(u) = p.unsubscribe
                        && u.code >= 2500
                    {
                        resubscribe = true;
                    }
                }
            }
            if resubscribe {
                break Exit::Reconnect(Some(2500));
            }
        };
        if let Exit::Reconnect(code) = &exit {
            acc.reconnects += 1;
            live.reconnects.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = code {
                *acc.closes.entry(*c).or_default() += 1;
            }
        }
        drop(ws);
        if matches!(exit, Exit::Done) {
            break;
        }
    }
    if let Some(s) = seg.take() {
        acc.segments.push(s);
    }
    acc
}

fn caught_up(seg: &Option<Segment>, next: u64, channel: &str, tops: Option<&Tops>) -> bool {
    match (seg, tops.and_then(|t| t.get(channel))) {
        (Some(s), Some((epoch, top))) => s.epoch == *epoch && next > *top,
        _ => false,
    }
}

fn accept(acc: &mut Account, seg: &mut Option<Segment>, next: &mut u64, offset: u64, live: &Live) {
    let Some(s) = seg else { return };
    let m = acc.max_seen.entry(s.epoch.clone()).or_default();
    *m = (*m).max(offset);
    if offset < *next {
        acc.duplicated += 1;
        return;
    }
    if offset > *next {
        acc.out_of_order += 1;
    }
    s.received += 1;
    *next = offset + 1;
    live.delivered.fetch_add(1, Ordering::Relaxed);
}

fn account(
    args: &VerifyArgs,
    result: &WorkerResult,
    tops: &Tops,
    acks: &Acks,
    wall: Duration,
) -> Report {
    // Highest offset per epoch anyone saw or the API acknowledged: where old segments end.
    let mut epoch_max: BTreeMap<String, u64> = BTreeMap::new();
    for (_, a) in &result.accounts {
        for (e, o) in &a.max_seen {
            let m = epoch_max.entry(e.clone()).or_default();
            *m = (*m).max(*o);
        }
    }
    for ((_, e), o) in &acks.max {
        let m = epoch_max.entry(e.clone()).or_default();
        *m = (*m).max(*o);
    }
    let mut r = Report {
        scenario: args.clone(),
        api_publications: acks.api_ok,
        api_failures: acks.api_failed,
        client_publications: acks.client_ok,
        expected: 0,
        delivered: 0,
        lost_silently: 0,
        lost_told: 0,
        duplicated: 0,
        out_of_order: 0,
        told_events: 0,
        reconnects: 0,
        close_codes: BTreeMap::new(),
        delivered_pct: 100.0,
        delivery_ms: Percentiles::default(),
        catch_up_ms: Percentiles::default(),
        wall_seconds: wall.as_secs_f64(),
        source: None,
    };
    let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is a valid histogram");
    for (ch, a) in &result.accounts {
        for s in &a.segments {
            let end = match s.end {
                Some(e) => e,
                None => match tops.get(ch) {
                    Some((epoch, top)) if *epoch == s.epoch => *top,
                    _ => epoch_max.get(&s.epoch).copied().unwrap_or(s.base),
                },
            };
            let expected = end.saturating_sub(s.base);
            let got = s.received.min(expected);
            r.expected += expected;
            r.delivered += got;
            if s.told {
                r.lost_told += expected - got;
            } else {
                r.lost_silently += expected - got;
            }
        }
        r.duplicated += a.duplicated;
        r.out_of_order += a.out_of_order;
        r.told_events += a.told;
        r.reconnects += a.reconnects;
        for (c, n) in &a.closes {
            *r.close_codes.entry(*c).or_default() += n;
        }
        for ms in &a.catch_up_ms {
            let _ = hist.record((ms * 1000.0) as u64);
        }
    }
    if r.expected > 0 {
        r.delivered_pct = 100.0 * r.delivered as f64 / r.expected as f64;
    }
    let mut lat = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)
        .expect("histogram bounds");
    for &(us, n) in &result.latency_us {
        let _ = lat.record_n(us.clamp(1, 600_000_000), n);
    }
    if !lat.is_empty() {
        r.delivery_ms = Percentiles {
            count: lat.len(),
            p50: lat.value_at_quantile(0.5) as f64 / 1000.0,
            p99: lat.value_at_quantile(0.99) as f64 / 1000.0,
            max: lat.max() as f64 / 1000.0,
        };
    }
    if !hist.is_empty() {
        r.catch_up_ms = Percentiles {
            count: hist.len(),
            p50: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
            max: hist.max() as f64 / 1000.0,
        };
    }
    r
}

fn print_summary(r: &Report) {
    let s = &r.scenario;
    eprintln!();
    eprintln!(
        "holdfast-bench verify — {} subscribers on {} channels, {:.0}s, {:.0}+{:.0} pub/s (API+client)",
        s.subscribers, s.channels, s.duration, s.api_rate, s.client_rate
    );
    eprintln!(
        "faults: jitter {}s, drops every {}s, slow {:.0}%, storms {:?}, restart {}",
        s.jitter,
        s.drop_every,
        s.slow_fraction * 100.0,
        s.storm_at,
        if s.restart_cmd.is_empty() {
            "none".to_string()
        } else {
            format!("{} at {:?}s", s.restart_cmd.len(), s.restart_at)
        }
    );
    eprintln!(
        "publications acknowledged: {} API + {} client ({} API failures)",
        r.api_publications, r.client_publications, r.api_failures
    );
    eprintln!("deliveries expected        {:>10}", r.expected);
    eprintln!(
        "delivered                  {:>10}  ({:.4}%)",
        r.delivered, r.delivered_pct
    );
    eprintln!("lost silently              {:>10}", r.lost_silently);
    eprintln!(
        "lost, client told          {:>10}  ({} told events)",
        r.lost_told, r.told_events
    );
    eprintln!("duplicated                 {:>10}", r.duplicated);
    eprintln!("out of order               {:>10}", r.out_of_order);
    eprintln!(
        "reconnects                 {:>10}  close codes {:?}",
        r.reconnects, r.close_codes
    );
    eprintln!(
        "delivery (publish → live)  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples)",
        r.delivery_ms.p50, r.delivery_ms.p99, r.delivery_ms.max, r.delivery_ms.count
    );
    eprintln!(
        "catch-up (open → recovered) p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples)",
        r.catch_up_ms.p50, r.catch_up_ms.p99, r.catch_up_ms.max, r.catch_up_ms.count
    );
    if let Some(src) = &r.source {
        eprintln!(
            "source: {} committed, {} rolled back, {} uncertain; stored {}, lost {}, duplicated {}, out of order {}, rolled back delivered {} (drained in {} ms)",
            src.committed,
            src.rolled_back,
            src.uncertain,
            src.stored,
            src.lost,
            src.duplicated,
            src.out_of_order,
            src.rolled_back_delivered,
            src.drain_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> VerifyArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            v: VerifyArgs,
        }
        Cli::parse_from(["x"]).v
    }

    fn seg(epoch: &str, base: u64) -> Option<Segment> {
        Some(Segment {
            epoch: epoch.into(),
            base,
            end: None,
            received: 0,
            told: false,
        })
    }

    fn report(accounts: Vec<Account>, top: u64) -> Report {
        let result = WorkerResult {
            accounts: accounts.into_iter().map(|a| ("c".to_string(), a)).collect(),
            latency_us: Vec::new(),
        };
        let tops: Tops = [("c".to_string(), ("E".to_string(), top))].into();
        account(&args(), &result, &tops, &Acks::default(), Duration::ZERO)
    }

    fn deliver(offsets: &[u64], base: u64) -> Account {
        let mut acc = Account::default();
        let mut s = seg("E", base);
        let mut next = base + 1;
        for o in offsets {
            accept(&mut acc, &mut s, &mut next, *o, &Live::default());
        }
        acc.segments.extend(s);
        acc
    }

    #[test]
    fn everything_delivered() {
        let r = report(vec![deliver(&[3, 4, 5], 2)], 5);
        assert_eq!((r.expected, r.delivered, r.lost_silently), (3, 3, 0));
    }

    #[test]
    fn a_missing_tail_is_lost_silently() {
        let r = report(vec![deliver(&[3, 4], 2)], 6);
        assert_eq!((r.expected, r.delivered, r.lost_silently), (4, 2, 2));
    }

    #[test]
    fn a_gap_is_out_of_order_and_lost() {
        let r = report(vec![deliver(&[3, 5, 6], 2)], 6);
        assert_eq!((r.out_of_order, r.lost_silently), (1, 1));
    }

    #[test]
    fn duplicates_are_counted() {
        let r = report(vec![deliver(&[3, 4, 4, 3, 5], 2)], 5);
        assert_eq!((r.duplicated, r.delivered, r.lost_silently), (2, 3, 0));
    }

    #[test]
    fn told_segments_count_as_told() {
        let mut a = deliver(&[1], 0);
        a.segments[0].told = true;
        a.segments[0].end = Some(4);
        a.segments.push(Segment {
            epoch: "E".into(),
            base: 4,
            end: None,
            received: 2,
            told: false,
        });
        let r = report(vec![a], 6);
        assert_eq!(
            (r.expected, r.delivered, r.lost_told, r.lost_silently),
            (6, 3, 3, 0)
        );
    }
}
