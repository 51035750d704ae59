//! The coordinator of `holdfast-bench bench`: starts each server pinned to the server core, load
//! workers on the other core (one process per ≤15,000 sockets, each from its own 127.0.0.x
//! source address), runs the scenarios S1–S6 several times and writes one JSON result per run.
//!
//! Long (≈900 lines) on purpose: the six scenarios share their server start-up, worker steering
//! and sampling, and read best side by side.

use crate::load::{self, Connected, Layout, WorkerReport};
use crate::peers::{self, Env, Running, Server};
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Sockets one worker process holds at most (20,000 files per process here).
const PER_WORKER: usize = 15_000;
/// A loopback source address not handed out before by this process (in 127.16.0.0–127.31.255.255,
/// by process id; the whole of 127.0.0.0/8 reaches the server).
fn fresh_source_ip() -> std::net::Ipv4Addr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Start from the process id so that runs of different processes differ too.
    let base = 0x7F10_0000u32 + (std::process::id() % 4096) * 256;
    std::net::Ipv4Addr::from(base + 1 + (n % 250))
}

/// A scenario.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Idle connections with auth, each in a personal and a group channel: memory per connection.
    S1,
    /// One channel with many subscribers, rising publication rate: fan-out throughput.
    S2,
    /// Personal + group-of-10 channels, rising rate: throughput in many small channels.
    S3,
    /// Everyone connects and subscribes at once: connects per second.
    S4,
    /// S2 at a steady rate while every subscriber drops at once and recovers (verifier).
    S5,
    /// S2 over two Holdfast nodes and Redis.
    S6,
}

/// Options of `holdfast-bench bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scenarios to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "s1,s2,s3,s4,s5,s6"
    )]
    pub scenarios: Vec<Scenario>,
    /// Servers to compare (S5 and S6 run Holdfast only).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "holdfast,holdfast-protobuf,holdfast-sse,raw,socketio,socketioxide,fastapi,sockudo"
    )]
    pub servers: Vec<Server>,
    /// Runs of each scenario per server (the report takes medians).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds-long smoke run with a few hundred connections (the test command runs this).
    #[arg(long)]
    pub quick: bool,
    /// Results directory (one JSON file per scenario, server and run).
    #[arg(long, default_value = "target/bench/results")]
    pub out: PathBuf,
    /// Directory of the `holdfast` binary.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Core the servers are pinned to; run the bench itself on the other one
    /// (`taskset -c 1 holdfast-bench bench …`).
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// Skip servers whose programs are not installed instead of failing.
    #[arg(long)]
    pub skip_missing: bool,
    /// Connections in S1 and S4 (default 19,000; quick 400).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Subscribers in S2, S3, S5 and S6 (default 10,000; quick 300).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Seconds measured per rate step (default 4; quick 1).
    #[arg(long)]
    pub step_seconds: Option<f64>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Publication rates of the steps (per second), instead of the scenario's own (for
    /// profiling one rate).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
}

/// One rate step of S2, S3 or S6.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Step {
    /// Publications per second offered.
    pub offered_pub_s: f64,
    /// Publications per second the server accepted.
    pub published_pub_s: f64,
    /// Deliveries per second expected from the accepted publications.
    pub expected_s: f64,
    /// Deliveries per second received.
    pub delivered_s: f64,
    /// Publish → receive latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// Server CPU, percent of one core.
    pub cpu_pct: f64,
    /// Server RSS at the end of the step, KiB.
    pub rss_kib: u64,
    /// Connections the server closed so far.
    pub closed: u64,
    /// The step could not keep up (below 90 % of expected, p99 over 1 s, or drops).
    pub overloaded: bool,
    /// Latency histogram, (µs, count).
    pub latency_us: Vec<(u64, u64)>,
}

/// One stage of S1.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stage {
    /// Connections open.
    pub connections: u64,
    /// Server RSS, KiB.
    pub rss_kib: u64,
    /// Machine slab, KiB.
    pub slab_kib: u64,
}

/// The connect storm of S4.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Storm {
    /// Connections that succeeded.
    pub connected: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Wall seconds from the start to the last subscription confirmed.
    pub seconds: f64,
    /// Connected per second.
    pub per_s: f64,
    /// Server CPU during the storm, percent of one core.
    pub cpu_pct: f64,
    /// Connect latency p50, ms.
    pub p50_ms: f64,
    /// Connect latency p99, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// First failure messages.
    pub errors: Vec<String>,
}

/// The result of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// Scenario.
    pub scenario: Option<Scenario>,
    /// Server (`holdfast-redis-2` for S6).
    pub server: String,
    /// Run number (1-based).
    pub run: usize,
    /// Quick mode.
    pub quick: bool,
    /// Unix time of the start.
    pub started: u64,
    /// Connections or subscribers.
    pub connections: usize,
    /// Rate steps (S2, S3, S6).
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Memory stages (S1).
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Connect storm (S4).
    #[serde(default)]
    pub storm: Option<Storm>,
    /// Verifier report (S5).
    #[serde(default)]
    pub verify: Option<serde_json::Value>,
    /// Why the run failed.
    #[serde(default)]
    pub error: Option<String>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    share: usize,
}

impl Worker {
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> anyhow::Result<T> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("a load worker exited")?;
        serde_json::from_str(&line).with_context(|| format!("worker said {line:?}"))
    }
}

/// The load workers of one run.
struct Pool {
    workers: Vec<Worker>,
}

impl Pool {
    /// Starts enough workers for `total` connections; worker `w` talks to `addrs[w % len]`.
    async fn start(
        addrs: &[SocketAddr],
        server: Server,
        layout: Layout,
        total: usize,
    ) -> anyhow::Result<Pool> {
        let n = total.div_ceil(PER_WORKER).max(addrs.len()).max(1);
        let exe = std::env::current_exe()?;
        let mut workers = Vec::new();
        for w in 0..n {
            let share = total / n + usize::from(w < total % n);
            let first: usize = (0..w).map(|k| total / n + usize::from(k < total % n)).sum();
            let mut cmd = Command::new(&exe);
            cmd.arg("load-worker")
                .args(["--protocol", protocol_arg(server)])
                .arg("--addr")
                .arg(addrs[w % addrs.len()].to_string())
                .arg("--layout")
                .arg(layout.to_string())
                .arg("--first")
                .arg(first.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            // Every worker connects from a source address no earlier run used, picking ports
            // itself: the kernel's own port search slows down badly with thousands of sockets
            // bound or in TIME_WAIT, and a reused address could meet its own TIME_WAIT tuples.
            cmd.arg("--source-ip").arg(fresh_source_ip().to_string());
            let mut child = cmd.spawn().context("starting a load worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            workers.push(Worker {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
                share,
            });
        }
        Ok(Pool { workers })
    }

    /// Opens connections until `fraction` of every worker's share is open.
    async fn connect(&mut self, fraction: f64) -> anyhow::Result<(Connected, Histogram<u64>)> {
        for w in &mut self.workers {
            let n = (w.share as f64 * fraction).round() as usize;
            w.send(&format!("connect {n}")).await?;
        }
        let mut all = Connected::default();
        let mut h = load::histogram();
        for w in &mut self.workers {
            let c: Connected = w.recv().await?;
            all.open += c.open;
            all.failed += c.failed;
            load::merge(&mut h, &c.connect_us);
            all.errors.extend(c.errors);
        }
        all.errors.truncate(5);
        Ok((all, h))
    }

    async fn reset(&mut self) -> anyhow::Result<()> {
        for w in &mut self.workers {
            w.send("reset").await?;
        }
        Ok(())
    }

    async fn report(&mut self) -> anyhow::Result<(WorkerReport, Histogram<u64>)> {
        for w in &mut self.workers {
            w.send("report").await?;
        }
        let mut all = WorkerReport::default();
        let mut h = load::histogram();
        for w in &mut self.workers {
            let r: WorkerReport = w.recv().await?;
            all.delivered += r.delivered;
            all.open += r.open;
            all.closed += r.closed;
            load::merge(&mut h, &r.latency_us);
        }
        Ok((all, h))
    }

    async fn stop(self) {
        for mut w in self.workers {
            drop(w.stdin);
            let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
            let _ = w.child.start_kill();
        }
    }
}

fn protocol_arg(server: Server) -> &'static str {
    match server.protocol() {
        crate::adapter::Protocol::HoldfastJson => "holdfast-json",
        crate::adapter::Protocol::HoldfastProtobuf => "holdfast-protobuf",
        crate::adapter::Protocol::HoldfastSse => "holdfast-sse",
        crate::adapter::Protocol::SocketIo => "socket-io",
        crate::adapter::Protocol::Pusher => "pusher",
        crate::adapter::Protocol::Text => "text",
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

struct Sizes {
    connections: usize,
    subscribers: usize,
    step: f64,
    warm: f64,
}

impl Sizes {
    fn of(args: &BenchArgs) -> Sizes {
        let q = args.quick;
        Sizes {
            connections: args.connections.unwrap_or(if q { 400 } else { 19_000 }),
            subscribers: args.subscribers.unwrap_or(if q { 300 } else { 10_000 }),
            step: args.step_seconds.unwrap_or(if q { 1.0 } else { 4.0 }),
            warm: if q { 0.3 } else { 1.0 },
        }
    }
}

/// Runs the benchmark; returns the result files written.
pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<PathBuf>> {
    let root = std::env::current_dir()?;
    let work = std::env::temp_dir().join(format!("holdfast-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&args.out)?;
    let env = Env {
        root: root.clone(),
        bin_dir: args.bin_dir.clone(),
        work: work.clone(),
        server_core: args.server_core,
    };
    let sizes = Sizes::of(&args);
    let mut plan: Vec<(Scenario, String, Option<Server>)> = Vec::new();
    for &sc in &args.scenarios {
        match sc {
            Scenario::S5 => plan.push((sc, "holdfast".into(), None)),
            Scenario::S6 => plan.push((sc, "holdfast-redis-2".into(), None)),
            _ => {
                for &s in &args.servers {
                    // The protocol only matters where messages flow.
                    if matches!(sc, Scenario::S1 | Scenario::S4) && s == Server::HoldfastProtobuf {
                        continue;
                    }
                    if let Err(why) = peers::available(&root, &args.bin_dir, s) {
                        if args.skip_missing {
                            eprintln!("skipping {}: {why}", s.name());
                            continue;
                        }
                        bail!(why);
                    }
                    plan.push((sc, s.name().into(), Some(s)));
                }
            }
        }
    }
    let total = plan.len() * args.runs;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut files = Vec::new();
    for run in 1..=args.runs {
        for (sc, name, server) in &plan {
            bar.set_message(format!("{sc:?} {name} run {run}"));
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut result = RunResult {
                scenario: Some(*sc),
                server: name.clone(),
                run,
                quick: args.quick,
                started,
                ..RunResult::default()
            };
            let outcome = match (sc, server) {
                (Scenario::S1, Some(s)) => s1(&env, *s, &sizes, &mut result).await,
                (Scenario::S2, Some(s)) => {
                    rate(&env, *s, &sizes, &args, Layout::One, &mut result, &bar).await
                }
                (Scenario::S3, Some(s)) => {
                    rate(
                        &env,
                        *s,
                        &sizes,
                        &args,
                        Layout::Groups(10),
                        &mut result,
                        &bar,
                    )
                    .await
                }
                (Scenario::S4, Some(s)) => s4(&env, *s, &sizes, &mut result).await,
                (Scenario::S5, _) => s5(&env, &args, &sizes, &mut result).await,
                (Scenario::S6, _) => s6(&env, &sizes, &args, &mut result, &bar).await,
                _ => Ok(()),
            };
            if let Err(e) = outcome {
                bar.suspend(|| eprintln!("{sc:?} {name} run {run}: {e:#}"));
                result.error = Some(format!("{e:#}"));
            }
            let file = args.out.join(format!(
                "{}-{}-{}.json",
                format!("{sc:?}").to_lowercase(),
                name,
                run
            ));
            std::fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
            bar.suspend(|| eprintln!("{}", summary(&result)));
            files.push(file);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&work);
    Ok(files)
}

/// One line per finished run.
fn summary(r: &RunResult) -> String {
    let head = format!(
        "{:?} {:<18} run {}",
        r.scenario.unwrap_or(Scenario::S1),
        r.server,
        r.run
    );
    if let Some(e) = &r.error {
        return format!("{head}: failed: {e}");
    }
    if let (Some(first), Some(last)) = (r.stages.first(), r.stages.last())
        && last.connections > 0
    {
        let per =
            (last.rss_kib.saturating_sub(first.rss_kib)) as f64 * 1024.0 / last.connections as f64;
        return format!(
            "{head}: {} connections, {:.1} KiB/connection",
            last.connections,
            per / 1024.0
        );
    }
    if let Some(s) = &r.storm {
        return format!(
            "{head}: {} connected in {:.2} s = {:.0}/s, p99 {:.1} ms",
            s.connected, s.seconds, s.per_s, s.p99_ms
        );
    }
    if let Some(v) = &r.verify {
        return format!(
            "{head}: delivered {} of {}, lost silently {}, catch-up p99 {} ms max {} ms",
            v["delivered"],
            v["expected"],
            v["lost_silently"],
            v["catch_up_ms"]["p99"],
            v["catch_up_ms"]["max"]
        );
    }
    let best = r
        .steps
        .iter()
        .filter(|s| !s.overloaded)
        .map(|s| s.delivered_s)
        .fold(0.0, f64::max);
    format!(
        "{head}: best {best:.0} deliveries/s over {} steps",
        r.steps.len()
    )
}

async fn s1(
    env: &Env,
    server: Server,
    sizes: &Sizes,
    result: &mut RunResult,
) -> anyhow::Result<()> {
    let running = peers::start(env, server, "[engine]\ntype = \"memory\"").await?;
    let n = sizes.connections;
    result.connections = n;
    let mut pool = Pool::start(&[running.addr], server, Layout::Groups(100), n).await?;
    let settle = Duration::from_millis(if n < 1000 { 300 } else { 2000 });
    tokio::time::sleep(settle).await;
    let s0 = peers::sample(running.pid)?;
    result.stages.push(Stage {
        connections: 0,
        rss_kib: s0.rss_kib,
        slab_kib: peers::slab_kib(),
    });
    for f in [0.25, 0.5, 0.75, 1.0] {
        let (c, _) = pool.connect(f).await?;
        if c.failed > 0 {
            bail!("{} connections failed: {:?}", c.failed, c.errors);
        }
        tokio::time::sleep(settle).await;
        let s = peers::sample(running.pid)?;
        result.stages.push(Stage {
            connections: c.open,
            rss_kib: s.rss_kib,
            slab_kib: peers::slab_kib(),
        });
    }
    pool.stop().await;
    drop(running);
    Ok(())
}

async fn s4(
    env: &Env,
    server: Server,
    sizes: &Sizes,
    result: &mut RunResult,
) -> anyhow::Result<()> {
    let running = peers::start(env, server, "[engine]\ntype = \"memory\"").await?;
    let n = sizes.connections;
    result.connections = n;
    let mut pool = Pool::start(&[running.addr], server, Layout::Groups(100), n).await?;
    // Let the worker processes start before the clock does.
    pool.reset().await?;
    let _ = pool.report().await?;
    let before = peers::sample(running.pid)?;
    let t0 = Instant::now();
    let (c, h) = pool.connect(1.0).await?;
    let secs = t0.elapsed().as_secs_f64();
    let after = peers::sample(running.pid)?;
    result.storm = Some(Storm {
        connected: c.open,
        failed: c.failed,
        seconds: secs,
        per_s: c.open as f64 / secs,
        cpu_pct: (after.cpu_s - before.cpu_s) / secs * 100.0,
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        errors: c.errors,
    });
    pool.stop().await;
    drop(running);
    Ok(())
}

/// Publication rates (per second) of the steps, and deliveries per publication.
fn steps_for(layout: Layout, quick: bool) -> Vec<f64> {
    match (layout, quick) {
        (Layout::One, false) => vec![1.0, 3.0, 10.0, 25.0, 50.0, 100.0, 150.0, 200.0, 300.0],
        (Layout::One, true) => vec![5.0, 20.0],
        (Layout::Groups(_), false) => vec![
            100.0, 300.0, 1000.0, 2500.0, 5000.0, 10_000.0, 25_000.0, 50_000.0,
        ],
        (Layout::Groups(_), true) => vec![100.0, 500.0],
    }
}

async fn rate(
    env: &Env,
    server: Server,
    sizes: &Sizes,
    args: &BenchArgs,
    layout: Layout,
    result: &mut RunResult,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let running = peers::start(env, server, "[engine]\ntype = \"memory\"").await?;
    let n = sizes.subscribers;
    result.connections = n;
    let mut pool = Pool::start(&[running.addr], server, layout, n).await?;
    let (c, _) = pool.connect(1.0).await?;
    if c.failed > 0 {
        bail!("{} connections failed: {:?}", c.failed, c.errors);
    }
    let pids = [running.pid];
    result.steps = steps(&running, &pids, &mut pool, layout, n, sizes, args, bar).await?;
    pool.stop().await;
    drop(running);
    Ok(())
}

/// Runs the rising-rate steps until one is overloaded.
#[allow(clippy::too_many_arguments)]
async fn steps(
    publish_to: &Running,
    pids: &[u32],
    pool: &mut Pool,
    layout: Layout,
    n: usize,
    sizes: &Sizes,
    args: &BenchArgs,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<Step>> {
    let protocol = publish_to.server.protocol();
    let (channels, fanout): (Vec<String>, f64) = match layout {
        Layout::One => (vec![protocol.channel("c0")], n as f64),
        Layout::Groups(g) => (
            (0..n.div_ceil(g))
                .map(|k| protocol.channel(&format!("g{k}")))
                .collect(),
            g as f64,
        ),
    };
    let mut out = Vec::new();
    let grace = if args.quick { 0.5 } else { 2.0 };
    let rates = if args.rates.is_empty() {
        steps_for(layout, args.quick)
    } else {
        args.rates.clone()
    };
    for rate in rates {
        bar.set_message(format!("{} {:.0} pub/s", publish_to.server.name(), rate));
        let publisher = publish_to.publisher().await?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
        let task = tokio::spawn(publish_loop(
            publisher,
            channels.clone(),
            rate,
            args.payload,
            stop.clone(),
            log.clone(),
        ));
        // Count only publications stamped inside [t0, t1), wherever their deliveries land.
        let t0 = crate::adapter::now_us() + (sizes.warm * 1e6) as u64;
        let t1 = t0 + (sizes.step * 1e6) as u64;
        for w in &mut pool.workers {
            w.send(&format!("window {t0} {t1}")).await?;
        }
        pool.reset().await?;
        sleep_until_us(t0).await;
        let cpu0: f64 = pids
            .iter()
            .filter_map(|p| peers::sample(*p).ok())
            .map(|s| s.cpu_s)
            .sum();
        sleep_until_us(t1).await;
        let samples: Vec<_> = pids.iter().filter_map(|p| peers::sample(*p).ok()).collect();
        let cpu1: f64 = samples.iter().map(|s| s.cpu_s).sum();
        tokio::time::sleep(Duration::from_secs_f64(grace)).await;
        let (r, h) = pool.report().await?;
        stop.store(true, Ordering::Relaxed);
        // A publisher stuck on a server that stopped reading must not stall the run.
        let abort = task.abort_handle();
        let publish_error = match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(r) => r.ok().and_then(|r| r.err()),
            Err(_) => {
                abort.abort();
                Some(anyhow::anyhow!("the publisher did not finish within 10 s"))
            }
        };
        let secs = (t1 - t0) as f64 / 1e6;
        let accepted: u64 = log
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(t, _)| (t0..t1).contains(t))
                    .map(|x| x.1)
                    .sum()
            })
            .unwrap_or(0);
        let published = accepted as f64 / secs;
        let expected = published * fanout;
        let delivered = r.delivered as f64 / secs;
        let p99 = ms(h.value_at_quantile(0.99));
        let overloaded = publish_error.is_some()
            || delivered < 0.97 * expected
            || published < 0.9 * rate
            || r.closed > 0;
        out.push(Step {
            offered_pub_s: rate,
            published_pub_s: published,
            expected_s: expected,
            delivered_s: delivered,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: p99,
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            cpu_pct: (cpu1 - cpu0) / secs * 100.0,
            rss_kib: samples.iter().map(|s| s.rss_kib).sum(),
            closed: r.closed,
            overloaded,
            latency_us: load::pairs(&h),
        });
        if let Some(e) = publish_error {
            bar.suspend(|| eprintln!("  publishing failed: {e:#}"));
        }
        if overloaded {
            break;
        }
        // Let queues drain before the next step.
        tokio::time::sleep(Duration::from_secs_f64(sizes.warm)).await;
    }
    Ok(out)
}

async fn sleep_until_us(t: u64) {
    let now = crate::adapter::now_us();
    if t > now {
        tokio::time::sleep(Duration::from_micros(t - now)).await;
    }
}

/// Publishes `rate` publications per second, spread over `channels`, in 10 ms ticks; logs
/// (stamp, accepted) per batch.
async fn publish_loop(
    mut publisher: crate::adapter::Publisher,
    channels: Vec<String>,
    rate: f64,
    size: usize,
    stop: Arc<AtomicBool>,
    log: Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
) -> anyhow::Result<()> {
    let tick = Duration::from_millis(10);
    let start = tokio::time::Instant::now();
    let mut sent = 0f64;
    let mut next = start;
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::adapter::now_us());
    while !stop.load(Ordering::Relaxed) {
        next += tick;
        tokio::time::sleep_until(next).await;
        let due = start.elapsed().as_secs_f64() * rate - sent;
        let k = due.floor().max(0.0) as usize;
        if k == 0 {
            continue;
        }
        sent += k as f64;
        let batch: Vec<String> = if channels.len() == 1 {
            vec![channels[0].clone(); k]
        } else {
            (0..k)
                .map(|_| channels[rng.random_range(0..channels.len())].clone())
                .collect()
        };
        let t = crate::adapter::now_us();
        let n = publisher.publish(&batch, size, t).await?;
        if let Ok(mut l) = log.lock() {
            l.push((t, n));
        }
    }
    Ok(())
}

async fn s5(
    env: &Env,
    args: &BenchArgs,
    sizes: &Sizes,
    result: &mut RunResult,
) -> anyhow::Result<()> {
    let running = peers::start(env, Server::Holdfast, "[engine]\ntype = \"memory\"").await?;
    let n = sizes.subscribers;
    result.connections = n;
    let (rate, duration, storm) = if args.quick {
        (100, 4, 2)
    } else {
        (1000, 12, 6)
    };
    let report = env.work.join(format!("verify-{}.json", result.run));
    let status = Command::new(std::env::current_exe()?)
        .arg("verify")
        .arg("--url")
        .arg(format!("ws://{}/connection/websocket", running.addr))
        .arg("--api")
        .arg(format!("http://{}", running.addr))
        .args(["--api-key", peers::API_KEY, "--secret", peers::SECRET])
        .args(["--subscribers", &n.to_string(), "--channels", "1"])
        .args(["--api-rate", &rate.to_string(), "--client-rate", "0"])
        .args([
            "--duration",
            &duration.to_string(),
            "--storm-at",
            &storm.to_string(),
        ])
        .args(["--drain", "20", "--source-ips", "4", "--quiet", "--report"])
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    result.verify = Some(v);
    if !status.success() {
        bail!("the verifier reported a failure");
    }
    drop(running);
    Ok(())
}

async fn s6(
    env: &Env,
    sizes: &Sizes,
    args: &BenchArgs,
    result: &mut RunResult,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let redis_port = peers::free_port()?;
    let redis_dir = env.work.join(format!("redis-{redis_port}"));
    std::fs::create_dir_all(&redis_dir)?;
    // Redis shares the load generator's core; the nodes share the server core.
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir"])
        .arg(&redis_dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting redis-server")?;
    peers::wait_listening(([127, 0, 0, 1], redis_port).into(), Duration::from_secs(10)).await?;
    let engine = format!(
        "[engine]\ntype = \"redis\"\n[engine.redis]\naddress = \"redis://127.0.0.1:{redis_port}\"\nprefix = \"bench{}\"",
        result.run
    );
    let a = peers::start(env, Server::Holdfast, &engine).await?;
    let b = peers::start(env, Server::Holdfast, &engine).await?;
    let n = sizes.subscribers;
    result.connections = n;
    let mut pool = Pool::start(&[a.addr, b.addr], Server::Holdfast, Layout::One, n).await?;
    let (c, _) = pool.connect(1.0).await?;
    if c.failed > 0 {
        bail!("{} connections failed: {:?}", c.failed, c.errors);
    }
    result.steps = steps(
        &a,
        &[a.pid, b.pid],
        &mut pool,
        Layout::One,
        n,
        sizes,
        args,
        bar,
    )
    .await?;
    pool.stop().await;
    drop((a, b));
    let _ = redis.start_kill();
    let _ = redis.wait().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_rise() {
        for layout in [Layout::One, Layout::Groups(10)] {
            for quick in [false, true] {
                let s = steps_for(layout, quick);
                assert!(s.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
}
