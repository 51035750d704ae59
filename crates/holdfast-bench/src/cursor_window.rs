//! `holdfast-bench cursor-window`: how soon a delivery counts as delivered for a user's next
//! device. Device A of a user receives a publication on the user's personal channel (delivery
//! cursor on), keeps its socket open for N ms answering pings like an SDK, then drops it without
//! a close frame; device B of the same user connects without a position. B gets the publication
//! again when A's confirmation had not reached the cursor yet: a duplicate. The report gives, for
//! each N, the share of rounds with a duplicate.

use crate::client::{self, Ws};
use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Options of a cursor-window run.
#[derive(Args, Debug, Clone)]
pub struct CursorWindowArgs {
    /// Server WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8000/connection/websocket")]
    pub url: String,
    /// Server HTTP base (for /api/publish).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub api: String,
    /// Server API key.
    #[arg(long, env = "VERIFY_API_KEY", default_value = "")]
    pub api_key: String,
    /// HMAC secret to mint connection tokens.
    #[arg(long, env = "VERIFY_SECRET", default_value = "")]
    pub secret: String,
    /// Namespace of the personal channels (`personal` → `personal:#<user>`; empty → `#<user>`).
    #[arg(long, default_value = "personal")]
    pub namespace: String,
    /// How long device A stays connected after the delivery, milliseconds (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,100,250,400,500,600,750,1000,1500"
    )]
    pub after_ms: Vec<u64>,
    /// Rounds per delay (each with its own user, run concurrently).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// Result for one delay.
#[derive(Debug, Clone, Serialize)]
pub struct WindowRow {
    /// Device A stayed this long after the delivery, ms.
    pub after_ms: u64,
    /// Rounds.
    pub rounds: usize,
    /// Rounds in which device B received the publication again.
    pub duplicates: usize,
}

/// Runs every delay and prints a table; returns the rows.
pub async fn run(args: CursorWindowArgs) -> anyhow::Result<Vec<WindowRow>> {
    let http = reqwest::Client::new();
    let run: u32 = rand::random();
    let mut rows = Vec::new();
    println!("| Device A disconnects after the delivery | Rounds | Next device got it again |");
    println!("|---|---|---|");
    for &after in &args.after_ms {
        let rounds = (0..args.rounds).map(|r| {
            let user = format!("cw{run:08x}-{after}-{r}");
            round(&args, &http, user, Duration::from_millis(after))
        });
        let results = futures_util::future::join_all(rounds).await;
        let mut duplicates = 0;
        for r in results {
            if r.context("a round failed")? {
                duplicates += 1;
            }
        }
        println!(
            "| {after} ms | {} | {duplicates} ({:.0} %) |",
            args.rounds,
            100.0 * duplicates as f64 / args.rounds.max(1) as f64
        );
        rows.push(WindowRow {
            after_ms: after,
            rounds: args.rounds,
            duplicates,
        });
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(rows)
}

fn channel(args: &CursorWindowArgs, user: &str) -> String {
    if args.namespace.is_empty() {
        format!("#{user}")
    } else {
        format!("{}:#{user}", args.namespace)
    }
}

async fn connect(args: &CursorWindowArgs, user: &str) -> anyhow::Result<(Ws, serde_json::Value)> {
    let mut ws = client::open(&args.url, None).await?;
    let token = client::token(&args.secret, user)?;
    client::send(
        &mut ws,
        serde_json::json!({"id": 1, "connect": {"token": token, "name": "cursor-window"}})
            .to_string(),
    )
    .await?;
    loop {
        for msg in next_messages(&mut ws).await? {
            if msg.get("id").and_then(serde_json::Value::as_u64) == Some(1) {
                if msg.get("error").is_some() {
                    bail!("connect refused: {msg}");
                }
                return Ok((ws, msg));
            }
        }
    }
}

/// The messages of the next text frame (pings answered with a pong, as an SDK does).
async fn next_messages(ws: &mut Ws) -> anyhow::Result<Vec<serde_json::Value>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no message within 10 s")?
            .context("connection closed")??;
        let Message::Text(text) = frame else { continue };
        let mut out = Vec::new();
        for line in text.as_str().split('\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if v == serde_json::json!({}) {
                client::send(ws, "{}".into()).await?;
            } else {
                out.push(v);
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
    }
}

/// One round; true when device B received the publication again.
async fn round(
    args: &CursorWindowArgs,
    http: &reqwest::Client,
    user: String,
    after: Duration,
) -> anyhow::Result<bool> {
    let ch = channel(args, &user);
    let (mut a, _) = connect(args, &user).await?;
    let resp = http
        .post(format!("{}/api/publish", args.api))
        .header("X-API-Key", &args.api_key)
        .json(&serde_json::json!({"channel": ch, "data": {"round": user}}))
        .send()
        .await?
        .text()
        .await?;
    if !resp.contains("\"result\"") {
        bail!("publish failed: {resp}");
    }
    'delivered: loop {
        for m in next_messages(&mut a).await? {
            if m["push"]["channel"] == ch.as_str() && m["push"]["pub"].is_object() {
                break 'delivered;
            }
        }
    }
    // Stay connected (answering pings) for `after`, then drop the socket without a close frame.
    let until = Instant::now() + after;
    while let Ok(r) = tokio::time::timeout_at(until.into(), next_messages(&mut a)).await {
        r?;
    }
    drop(a);
    let (_b, reply) = connect(args, &user).await?;
    let sub = &reply["connect"]["subs"][ch.as_str()];
    if !sub.is_object() {
        bail!("device B has no subscription to {ch}: {reply}");
    }
    Ok(sub["publications"]
        .as_array()
        .is_some_and(|p| !p.is_empty()))
}
