//! A load worker process: holds a slice of the scenario's connections and counts deliveries.
//! The coordinator ([`crate::scenario`]) starts several (one per ≤15,000 sockets, each from its
//! own source address) and steers them over stdin/stdout, one JSON line per answer:
//!
//! - `connect N` — open connections until N are open (bounded concurrency), answer
//!   `{"open", "failed", "connect_us"}`;
//! - `window T0 T1` — from now on count only publications stamped in [T0, T1) µs;
//! - `reset` — zero the delivery counters and latency histogram;
//! - `report` — answer `{"delivered", "latency_us", "open", "closed"}`;
//! - end of input — exit.

use crate::adapter::{Protocol, Target, now_us};
use crate::wire;
use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Longest wait for one connection to be open and subscribed.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Which channels connection `i` joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// Everyone in channel `c0`.
    One,
    /// A personal channel `p<i>` and a group channel `g<i / size>`.
    Groups(usize),
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "one" => Ok(Layout::One),
            Some(("groups", n)) => n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .map(Layout::Groups)
                .ok_or_else(|| format!("bad group size in {s}")),
            _ => Err(format!("unknown layout {s} (one | groups:N)")),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::One => write!(f, "one"),
            Layout::Groups(n) => write!(f, "groups:{n}"),
        }
    }
}

impl Layout {
    /// Base channel names of connection `i`.
    pub fn channels(self, i: usize) -> Vec<String> {
        match self {
            Layout::One => vec!["c0".to_owned()],
            Layout::Groups(n) => vec![format!("p{i}"), format!("g{}", i / n)],
        }
    }
}

/// Options of one worker process.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Protocol.
    #[arg(long, value_enum)]
    pub protocol: Protocol,
    /// Server `host:port`.
    #[arg(long)]
    pub addr: SocketAddr,
    /// HMAC secret for Holdfast tokens.
    #[arg(long, default_value = "bench-secret")]
    pub secret: String,
    /// Pusher app key.
    #[arg(long, default_value = "bench-key")]
    pub app_key: String,
    /// Channel layout.
    #[arg(long, default_value = "one")]
    pub layout: Layout,
    /// First global connection index of this worker.
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    /// Source address of this worker's sockets.
    #[arg(long)]
    pub source_ip: Option<IpAddr>,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

#[derive(Default)]
struct Counters {
    window: std::cell::Cell<(u64, u64)>,
    delivered: AtomicU64,
    closed: AtomicU64,
    open: AtomicU64,
}

/// A worker's answer to `report`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Deliveries since the last reset.
    pub delivered: u64,
    /// Publish → receive latency, (µs, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
    /// Connections open.
    pub open: u64,
    /// Connections the server closed since the start.
    pub closed: u64,
}

/// A worker's answer to `connect`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Connected {
    /// Connections open.
    pub open: u64,
    /// Attempts that failed in this round.
    pub failed: u64,
    /// Socket open → all subscriptions confirmed, (µs, count) pairs.
    pub connect_us: Vec<(u64, u64)>,
    /// First few failure messages.
    pub errors: Vec<String>,
}

/// A new latency histogram (1 µs .. 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// (value, count) pairs of a histogram.
pub fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds (value, count) pairs to a histogram.
pub fn merge(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, c) in pairs {
        let _ = h.record_n(v.max(1), c);
    }
}

/// Runs the worker until stdin closes.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let target = Rc::new(Target {
        protocol: args.protocol,
        host: args.addr.to_string(),
        secret: args.secret.clone(),
        app_key: args.app_key.clone(),
    });
    let counters = Rc::new(Counters::default());
    counters.window.set((0, u64::MAX));
    let latency = Rc::new(RefCell::new(histogram()));
    // One cursor for the worker's life: every `connect` round takes ports after the last one.
    let cursor = args
        .source_ip
        .map(|ip| Rc::new(wire::PortCursor::new(ip, 1024)));
    let mut next = args.first;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("connect ") {
            let want: u64 = n.parse().context("connect count")?;
            let opened = counters.open.load(Ordering::Relaxed);
            let todo = want.saturating_sub(opened) as usize;
            let res = connect_many(
                &args,
                cursor.as_ref(),
                &target,
                &counters,
                &latency,
                next..next + todo,
            )
            .await;
            next += todo;
            println!("{}", serde_json::to_string(&res)?);
        } else if let Some(w) = line.strip_prefix("window ") {
            let (a, b) = w.split_once(' ').context("window T0 T1")?;
            counters.window.set((a.parse()?, b.parse()?));
        } else if line == "reset" {
            counters.delivered.store(0, Ordering::Relaxed);
            latency.borrow_mut().reset();
        } else if line == "report" {
            let r = WorkerReport {
                delivered: counters.delivered.load(Ordering::Relaxed),
                latency_us: pairs(&latency.borrow()),
                open: counters.open.load(Ordering::Relaxed),
                closed: counters.closed.load(Ordering::Relaxed),
            };
            println!("{}", serde_json::to_string(&r)?);
        } else if !line.is_empty() {
            anyhow::bail!("unknown worker command {line:?}");
        }
    }
    Ok(())
}

async fn connect_many(
    args: &WorkerArgs,
    cursor: Option<&Rc<wire::PortCursor>>,
    target: &Rc<Target>,
    counters: &Rc<Counters>,
    latency: &Rc<RefCell<Histogram<u64>>>,
    range: std::ops::Range<usize>,
) -> Connected {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let times = Rc::new(RefCell::new(histogram()));
    let failed = Rc::new(RefCell::new((0u64, Vec::<String>::new())));
    let mut joins = Vec::new();
    for i in range {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (target, counters, latency) = (target.clone(), counters.clone(), latency.clone());
        let (times, failed) = (times.clone(), failed.clone());
        let (addr, cursor, layout) = (args.addr, cursor.cloned(), args.layout);
        joins.push(tokio::task::spawn_local(async move {
            let channels: Vec<String> = layout
                .channels(i)
                .iter()
                .map(|c| target.protocol.channel(c))
                .collect();
            let started = std::time::Instant::now();
            let attempt = async {
                let tcp = match &cursor {
                    Some(c) => wire::tcp_cursor(addr, c).await?,
                    None => wire::tcp(addr, None).await?,
                };
                target
                    .protocol
                    .connect(&target, tcp, &format!("bench-{i}"), &channels)
                    .await
            };
            let res = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!(
                    "no subscription confirmed within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )),
            };
            drop(permit);
            match res {
                Ok(conn) => {
                    let _ = times
                        .borrow_mut()
                        .record((started.elapsed().as_micros() as u64).max(1));
                    counters.open.fetch_add(1, Ordering::Relaxed);
                    tokio::task::spawn_local(read_loop(conn, target, counters, latency));
                }
                Err(e) => {
                    let mut f = failed.borrow_mut();
                    f.0 += 1;
                    if f.1.len() < 5 {
                        f.1.push(format!("{e:#}"));
                    }
                }
            }
        }));
    }
    for j in joins {
        let _ = j.await;
    }
    let (n_failed, errors) = failed.take();
    Connected {
        open: counters.open.load(Ordering::Relaxed),
        failed: n_failed,
        connect_us: pairs(&times.borrow()),
        errors,
    }
}

async fn read_loop(
    mut conn: wire::Conn,
    target: Rc<Target>,
    counters: Rc<Counters>,
    latency: Rc<RefCell<Histogram<u64>>>,
) {
    let protocol = target.protocol;
    loop {
        let mut pong = None;
        match conn.next().await {
            Ok(Some((op, payload))) => {
                let now = now_us();
                let (mut n, mut counted) = (0u64, 0u64);
                let (from, to) = counters.window.get();
                {
                    let mut h = latency.borrow_mut();
                    wire::markers(payload, |t| {
                        n += 1;
                        if (from..to).contains(&t) {
                            counted += 1;
                            let _ = h.record(now.saturating_sub(t).max(1));
                        }
                    });
                }
                counters.delivered.fetch_add(counted, Ordering::Relaxed);
                // Holdfast batches pings with publications; the others send them alone.
                let batched = matches!(
                    protocol,
                    Protocol::HoldfastJson | Protocol::HoldfastProtobuf | Protocol::HoldfastSse
                );
                if n == 0 || batched {
                    pong = protocol.pong(op, payload);
                }
            }
            Ok(None) | Err(_) => break,
        }
        if let Some((op, p)) = pong
            && conn.send(op, p).await.is_err()
        {
            break;
        }
    }
    counters.open.fetch_sub(1, Ordering::Relaxed);
    counters.closed.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!("one".parse::<Layout>().unwrap().channels(7), vec!["c0"]);
        let g: Layout = "groups:10".parse().unwrap();
        assert_eq!(g.channels(25), vec!["p25", "g2"]);
        assert_eq!(g.to_string(), "groups:10");
        assert!("groups:0".parse::<Layout>().is_err());
    }

    #[test]
    fn histograms_round_trip_through_pairs() {
        let mut h = histogram();
        h.record(100).unwrap();
        h.record_n(5000, 3).unwrap();
        let mut g = histogram();
        merge(&mut g, &pairs(&h));
        assert_eq!(g.len(), 4);
        assert_eq!(g.value_at_quantile(0.5), h.value_at_quantile(0.5));
    }
}
