//! The disk engine under `kill -9`: every acknowledged publication is in history after the
//! restart, under the same epoch and offsets, and a client recovering from before the crash gets
//! each exactly once, in order.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Proc {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[client.token]
hmac_secret_key = "{SECRET}"
[http_api]
key = "{API_KEY}"
[engine]
type = "disk"
[engine.disk]
path = "{}"
durability = "fsync"
[log]
level = "warn"
[channel.without_namespace]
history_size = 100000
history_ttl = "600s"
force_recovery = true
allow_subscribe_for_client = true
"#,
            dir.join("data").display()
        ),
    )
    .unwrap();
    p
}

/// Starts the server with its log appended to `server.log` beside the config (shown when an
/// assertion about what the restart found fails).
async fn start(cfg: &std::path::Path, port: u16) -> Proc {
    Proc {
        child: spawn_holdfast_logged(cfg, port, WAIT, &server_log(cfg)).await,
        port,
    }
}

fn server_log(cfg: &std::path::Path) -> std::path::PathBuf {
    cfg.with_file_name("server.log")
}

/// The servers' warnings and errors so far.
fn log_problems(cfg: &std::path::Path) -> String {
    std::fs::read_to_string(server_log(cfg))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn api_at(port: u16, method: &str, body: Value) -> anyhow::Result<Value> {
    let r: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/{method}"))
        .header("X-API-Key", API_KEY)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(r.get("error").is_none(), "{r}");
    Ok(r["result"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publications_survive_kill_9() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("holdfast-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir);
    let port = free_port();
    let mut epoch: Option<String> = None;
    // (offset, publisher, seq) of every acknowledged publication, across all runs.
    let acked: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::default();
    for (round, kill_after) in [25usize, 250, 700].into_iter().enumerate() {
        let mut p = start(&cfg, port).await;
        let before = acked.lock().unwrap().len();
        // Four concurrent publishers; kill -9 once enough are acknowledged, mid-stream.
        let mut tasks = Vec::new();
        for publisher in 0..4u64 {
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                for seq in 0.. {
                    let body =
                        json!({"channel": "crash", "data": {"p": publisher, "s": seq, "r": round}});
                    match api_at(port, "publish", body).await {
                        Ok(r) => acked.lock().unwrap().push((
                            r["offset"].as_u64().unwrap(),
                            publisher,
                            seq,
                        )),
                        Err(_) => return,
                    }
                }
            }));
        }
        while acked.lock().unwrap().len() < before + kill_after {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        // Restart and check every acknowledged publication.
        let mut p = start(&cfg, port).await;
        let h = api_at(p.port, "history", json!({"channel": "crash", "limit": -1}))
            .await
            .unwrap();
        let e = h["epoch"].as_str().unwrap().to_owned();
        assert_eq!(
            epoch.get_or_insert(e.clone()),
            &e,
            "round {round}: the epoch survives kill -9; the servers said:\n{}",
            log_problems(&cfg)
        );
        let stored: std::collections::HashMap<u64, (u64, u64)> = h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["offset"].as_u64().unwrap(),
                    (
                        p["data"]["p"].as_u64().unwrap(),
                        p["data"]["s"].as_u64().unwrap(),
                    ),
                )
            })
            .collect();
        let offsets: Vec<u64> = {
            let mut o: Vec<u64> = stored.keys().copied().collect();
            o.sort();
            o
        };
        assert_eq!(
            offsets,
            (1..=offsets.len() as u64).collect::<Vec<_>>(),
            "round {round}: offsets are gapless"
        );
        for (offset, publisher, seq) in acked.lock().unwrap().iter() {
            assert_eq!(
                stored.get(offset),
                Some(&(*publisher, *seq)),
                "round {round}: acknowledged offset {offset} is stored with its data"
            );
        }
        // A client that was 200 behind recovers everything after its position, once, in order
        // (within the 300-publication recovery limit).
        let from = (offsets.len() as u64).saturating_sub(200);
        let mut c =
            TestClient::connect(&format!("ws://127.0.0.1:{}/connection/websocket", p.port)).await;
        c.connect_token(&token("reader", None, json!({}))).await;
        let r = c
            .call(
                "subscribe",
                json!({"channel": "crash", "recover": true, "offset": from, "epoch": e}),
            )
            .await;
        assert_eq!(r["subscribe"]["recovered"], true, "{}", r);
        let got: Vec<u64> = r["subscribe"]["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(
            got,
            (from + 1..=offsets.len() as u64).collect::<Vec<_>>(),
            "round {round}: recovery is exact"
        );
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
