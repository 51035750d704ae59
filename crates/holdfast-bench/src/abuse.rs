//! Abusive clients for soak runs: garbage frames, slowloris upgrades, subscribers that never
//! read, and reconnect loops. Each kind runs as N tasks in a loop until the duration ends; the
//! summary counts attempts and how the server ended them (run it next to `verify` to show the
//! good clients are not disturbed).

use crate::client;
use clap::Args;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// `holdfast-bench abuse`.
#[derive(Args, Debug, Clone)]
pub struct AbuseArgs {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8000/connection/websocket")]
    pub url: String,
    /// HMAC secret for connection tokens (the never-reading subscribers connect properly).
    #[arg(long, env = "VERIFY_SECRET", default_value = "")]
    pub secret: String,
    /// Channel the never-reading subscribers join (a busy one makes their queues grow).
    #[arg(long, default_value = "")]
    pub channel: String,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Tasks sending garbage frames after connecting.
    #[arg(long, default_value_t = 20)]
    pub garbage: usize,
    /// Tasks holding half-sent upgrade requests (slowloris).
    #[arg(long, default_value_t = 50)]
    pub slowloris: usize,
    /// Subscribers that never read their socket.
    #[arg(long, default_value_t = 20)]
    pub never_read: usize,
    /// Tasks connecting and disconnecting as fast as they can.
    #[arg(long, default_value_t = 10)]
    pub reconnect_loop: usize,
    /// Server API base URL, to flood `--channel` with large publications (with `--flood-rate`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub api: String,
    /// API key for the flood.
    #[arg(long, env = "VERIFY_API_KEY", default_value = "")]
    pub api_key: String,
    /// Publications per second of 4 KiB into `--channel` (0 = none): fills never-readers' queues.
    #[arg(long, default_value_t = 0.0)]
    pub flood_rate: f64,
    /// Source address of the abusive sockets (a per-IP limit then only hits them).
    #[arg(long, default_value = "127.0.0.250")]
    pub source: std::net::IpAddr,
}

#[derive(Default)]
struct Tally {
    counts: std::sync::Mutex<BTreeMap<String, u64>>,
    attempts: AtomicU64,
}

impl Tally {
    fn add(&self, what: impl Into<String>) {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *c.entry(what.into()).or_default() += 1;
    }
}

async fn ended(ws: &mut client::Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return format!("close {}", u16::from(f.code)),
            Ok(Some(Ok(Message::Close(None))) | None) => return "closed".into(),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) => return "reset".into(),
            Err(_) => return "still open after 30 s".into(),
        }
    }
}

/// Runs every kind of abuse until the duration ends; prints a summary to stderr.
pub async fn run(args: AbuseArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Arc::new(args);
    let until = Instant::now() + Duration::from_secs_f64(args.duration);
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    let kinds: [(usize, &str); 4] = [
        (args.garbage, "garbage"),
        (args.slowloris, "slowloris"),
        (args.never_read, "never-read"),
        (args.reconnect_loop, "reconnect-loop"),
    ];
    for (n, kind) in kinds {
        for i in 0..n {
            let (args, tally) = (args.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    tally.attempts.fetch_add(1, Ordering::Relaxed);
                    let r = match kind {
                        "garbage" => garbage(&args, i).await,
                        "slowloris" => slowloris(&args, until).await,
                        "never-read" => never_read(&args, i, until).await,
                        _ => reconnect(&args, i).await,
                    };
                    match r {
                        Ok(how) => tally.add(format!("{kind}: {how}")),
                        Err(e) => {
                            tally.add(format!("{kind}: error {e}"));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
    }
    if args.flood_rate > 0.0 && !args.channel.is_empty() {
        let (args, tally) = (args.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let payload =
                serde_json::json!({"channel": args.channel, "data": {"pad": "x".repeat(4096)}});
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.flood_rate));
            while Instant::now() < until {
                tick.tick().await;
                let r = http
                    .post(format!("{}/api/publish", args.api))
                    .header("X-API-Key", &args.api_key)
                    .json(&payload)
                    .send()
                    .await;
                tally.add(match r {
                    Ok(r) if r.status().is_success() => "flood: published".to_owned(),
                    Ok(r) => format!("flood: HTTP {}", r.status().as_u16()),
                    Err(_) => "flood: request failed".to_owned(),
                });
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    eprintln!(
        "abuse: {} attempts in {:.0} s",
        tally.attempts.load(Ordering::Relaxed),
        args.duration
    );
    let counts = tally
        .counts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (what, n) in counts.iter() {
        eprintln!("  {what:<48} {n:>8}");
    }
    Ok(())
}

/// Connects, then sends a frame of random bytes; the server must close with 3501.
async fn garbage(args: &AbuseArgs, i: usize) -> anyhow::Result<String> {
    let mut ws = client::open(&args.url, Some(args.source)).await?;
    let tok = client::token(&args.secret, &format!("abuser-g{i}"))?;
    client::send(
        &mut ws,
        format!(r#"{{"id":1,"connect":{{"token":"{tok}"}}}}"#),
    )
    .await?;
    let junk: Vec<u8> = (0..256).map(|_| rand::random::<u8>()).collect();
    let text = String::from_utf8_lossy(&junk).into_owned();
    client::send(&mut ws, text).await?;
    Ok(ended(&mut ws).await)
}

/// Sends an upgrade request one header line per second and never finishes it.
async fn slowloris(args: &AbuseArgs, until: Instant) -> anyhow::Result<String> {
    let url: tokio_tungstenite::tungstenite::http::Uri = args.url.parse()?;
    let host = url.host().unwrap_or("127.0.0.1").to_owned();
    let port = url.port_u16().unwrap_or(80);
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind((args.source, 0).into())?;
    let mut s: TcpStream = sock.connect(format!("{host}:{port}").parse()?).await?;
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {host}\r\n", url.path()).as_bytes())
        .await?;
    let mut buf = [0u8; 512];
    let mut n = 0u32;
    loop {
        if Instant::now() >= until {
            return Ok("held to the end".into());
        }
        tokio::select! {
            r = s.read(&mut buf) => {
                return Ok(match r {
                    Ok(0) | Err(_) => "cut off by the server".into(),
                    Ok(_) => "answered".into(),
                });
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                n += 1;
                if s.write_all(format!("X-Slow-{n}: 1\r\n").as_bytes()).await.is_err() {
                    return Ok("cut off by the server".into());
                }
            }
        }
    }
}

/// Connects and subscribes, then never reads: the server must drop it (3008) without
/// slowing anyone else. Reconnects after 60 s (or at the end).
async fn never_read(args: &AbuseArgs, i: usize, until: Instant) -> anyhow::Result<String> {
    let mut ws = client::open(&args.url, Some(args.source)).await?;
    let tok = client::token(&args.secret, &format!("abuser-n{i}"))?;
    client::send(
        &mut ws,
        format!(r#"{{"id":1,"connect":{{"token":"{tok}"}}}}"#),
    )
    .await?;
    if !args.channel.is_empty() {
        client::send(
            &mut ws,
            format!(r#"{{"id":2,"subscribe":{{"channel":"{}"}}}}"#, args.channel),
        )
        .await?;
    }
    let hold = Duration::from_secs(60).min(until.saturating_duration_since(Instant::now()));
    tokio::time::sleep(hold).await;
    drop(ws);
    Ok("held without reading".into())
}

/// Connect, connect command, close; as fast as possible.
async fn reconnect(args: &AbuseArgs, i: usize) -> anyhow::Result<String> {
    let mut ws = client::open(&args.url, Some(args.source)).await?;
    let tok = client::token(&args.secret, &format!("abuser-r{i}"))?;
    client::send(
        &mut ws,
        format!(r#"{{"id":1,"connect":{{"token":"{tok}"}}}}"#),
    )
    .await?;
    let _ = ws.next().await;
    ws.close(None).await?;
    Ok("cycled".into())
}
