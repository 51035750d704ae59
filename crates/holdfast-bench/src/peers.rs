//! The servers under test: how each is started (pinned to the server core), where it listens,
//! how it takes publications, and sampling of its CPU time and memory from `/proc`.

use crate::adapter::{Protocol, Publisher, Target, WsStyle};
use anyhow::{Context, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A server the bench can start.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Server {
    /// Holdfast, JSON protocol (memory engine with history and recovery on).
    Holdfast,
    /// Holdfast, protobuf protocol.
    HoldfastProtobuf,
    /// Holdfast, unidirectional SSE subscribers (same server and configuration).
    HoldfastSse,
    /// The raw tokio-tungstenite broadcast baseline (`holdfast-bench baseline`).
    Raw,
    /// Socket.IO 4.8 on Node (`bench/peers/socketio`).
    Socketio,
    /// socketioxide 0.18 (`bench/peers/socketioxide`).
    Socketioxide,
    /// A FastAPI/uvicorn connection manager (`bench/peers/fastapi`).
    Fastapi,
    /// Sockudo 5.2 (`scripts/bench-peers.sh` installs it).
    Sockudo,
}

impl Server {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Server::Holdfast => "holdfast",
            Server::HoldfastProtobuf => "holdfast-protobuf",
            Server::HoldfastSse => "holdfast-sse",
            Server::Raw => "raw",
            Server::Socketio => "socketio",
            Server::Socketioxide => "socketioxide",
            Server::Fastapi => "fastapi",
            Server::Sockudo => "sockudo",
        }
    }

    /// What it is, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Server::Holdfast => "Holdfast, JSON, memory engine, history + recovery on, JWT auth",
            Server::HoldfastProtobuf => "Holdfast, protobuf, same configuration",
            Server::HoldfastSse => {
                "Holdfast, unidirectional SSE subscribers (uni_sse), same configuration"
            }
            Server::Raw => {
                "raw tokio-tungstenite broadcast (encode once, batched flush, no features)"
            }
            Server::Socketio => "Socket.IO 4.8.4 on Node 20, websocket transport",
            Server::Socketioxide => "socketioxide 0.18 on axum, websocket transport",
            Server::Fastapi => "FastAPI + uvicorn connection manager (the seeds' stack)",
            Server::Sockudo => "Sockudo 5.2.0 (Pusher protocol), memory adapter",
        }
    }

    /// The wire protocol.
    pub fn protocol(self) -> Protocol {
        match self {
            Server::Holdfast => Protocol::HoldfastJson,
            Server::HoldfastProtobuf => Protocol::HoldfastProtobuf,
            Server::HoldfastSse => Protocol::HoldfastSse,
            Server::Raw | Server::Fastapi => Protocol::Text,
            Server::Socketio | Server::Socketioxide => Protocol::SocketIo,
            Server::Sockudo => Protocol::Pusher,
        }
    }
}

/// Where programs and scratch files are.
#[derive(Debug, Clone)]
pub struct Env {
    /// Repository root.
    pub root: PathBuf,
    /// Directory of the `holdfast` binary.
    pub bin_dir: PathBuf,
    /// Scratch directory (configs, data).
    pub work: PathBuf,
    /// Core the server runs on.
    pub server_core: usize,
}

/// HMAC secret of the Holdfast bench config.
pub const SECRET: &str = "bench-secret";
/// API key of the Holdfast bench config.
pub const API_KEY: &str = "bench-api-key";
/// Pusher app credentials of the Sockudo bench config.
pub const APP: (&str, &str, &str) = ("bench-app", "bench-key", "bench-app-secret");

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Which.
    pub server: Server,
    /// Listening address.
    pub addr: SocketAddr,
    /// Process id (the server itself: `taskset` execs it).
    pub pid: u32,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn holdfast_config(env: &Env, extra: &str) -> anyhow::Result<PathBuf> {
    let path = env.work.join(format!("holdfast-{}.toml", free_port()?));
    let text = format!(
        r#"# written by holdfast-bench
[client]
# S5 drops every subscriber at 1,000 publications/s: a few seconds of gap must stay recoverable.
recovery_max_publication_limit = 10000

[client.token]
hmac_secret_key = "{SECRET}"

[http_api]
key = "{API_KEY}"

[log]
level = "warn"

[uni_sse]
enabled = true

{extra}

[[channel.namespaces]]
name = "bench"
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "verify"
history_size = 20000
history_ttl = "600s"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_client = true
"#
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

fn sockudo_config(env: &Env, port: u16) -> anyhow::Result<PathBuf> {
    let path = env.work.join(format!("sockudo-{port}.toml"));
    let (id, key, secret) = APP;
    let text = format!(
        r#"# written by holdfast-bench
port = {port}
host = "127.0.0.1"
debug = false

[app_manager]
driver = "memory"

[app_manager.array]
[[app_manager.array.apps]]
id = "{id}"
key = "{key}"
secret = "{secret}"
enabled = true
enable_client_messages = false
max_connections = 100000
max_client_events_per_second = 100000

[rate_limiter]
enabled = false

[metrics]
enabled = false
"#
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts `server` pinned to the server core; `engine` is the Holdfast `[engine]` section.
pub async fn start(env: &Env, server: Server, holdfast_engine: &str) -> anyhow::Result<Running> {
    let port = free_port()?;
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(env.server_core.to_string());
    let root = &env.root;
    match server {
        Server::Holdfast | Server::HoldfastProtobuf | Server::HoldfastSse => {
            let cfg = holdfast_config(env, holdfast_engine)?;
            cmd.arg(env.bin_dir.join("holdfast"))
                .args(["serve", "--config"])
                .arg(cfg)
                .args(["--address", "127.0.0.1", "--port"])
                .arg(port.to_string());
        }
        Server::Raw => {
            cmd.arg(std::env::current_exe()?)
                .args(["baseline", "--port"])
                .arg(port.to_string());
        }
        Server::Socketio => {
            cmd.arg("node")
                .arg(root.join("bench/peers/socketio/server.js"))
                .arg(port.to_string());
        }
        Server::Socketioxide => {
            cmd.arg(root.join("bench/peers/socketioxide/target/release/socketioxide-peer"))
                .arg(port.to_string());
        }
        Server::Fastapi => {
            cmd.arg(root.join("tests/compat/.venv/bin/python"))
                .arg(root.join("bench/peers/fastapi/server.py"))
                .arg(port.to_string());
        }
        Server::Sockudo => {
            let cfg = sockudo_config(env, port)?;
            cmd.arg(root.join("target/peers/bin/sockudo"))
                .arg("--config")
                .arg(cfg);
        }
    }
    let log = std::fs::File::create(env.work.join(format!("{}-{port}.log", server.name())))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", server.name()))?;
    let pid = child.id().context("server pid")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let running = Running {
        server,
        addr,
        pid,
        child,
    };
    wait_listening(addr, Duration::from_secs(60))
        .await
        .with_context(|| {
            format!(
                "{} did not start (log in {})",
                server.name(),
                env.work.display()
            )
        })?;
    Ok(running)
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Running {
    /// The target description for workers.
    pub fn target(&self) -> Target {
        Target {
            protocol: self.server.protocol(),
            host: self.addr.to_string(),
            secret: SECRET.to_owned(),
            app_key: APP.1.to_owned(),
        }
    }

    /// A publisher for this server.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        let base = format!("http://{}", self.addr);
        let http = || {
            reqwest::Client::builder()
                .pool_max_idle_per_host(4)
                .timeout(Duration::from_secs(10))
                .build()
                .context("http client")
        };
        Ok(match self.server {
            Server::Holdfast | Server::HoldfastProtobuf | Server::HoldfastSse => {
                Publisher::HoldfastApi {
                    http: http()?,
                    base,
                    key: API_KEY.to_owned(),
                }
            }
            Server::Sockudo => Publisher::PusherApi {
                http: http()?,
                base,
                app_id: APP.0.to_owned(),
                key: APP.1.to_owned(),
                secret: APP.2.to_owned(),
            },
            Server::Raw | Server::Fastapi => {
                let tcp = crate::wire::tcp(self.addr, None).await?;
                Publisher::Ws(
                    crate::wire::Conn::upgrade(tcp, &self.addr.to_string(), "/pub", None).await?,
                    WsStyle::Text,
                )
            }
            Server::Socketio | Server::Socketioxide => {
                let tcp = crate::wire::tcp(self.addr, None).await?;
                let t = self.target();
                let conn = Protocol::SocketIo
                    .connect(&t, tcp, "publisher", &["publisher".to_owned()])
                    .await?;
                Publisher::Ws(conn, WsStyle::SocketIo)
            }
        })
    }
}

/// CPU time (user + system) and memory of a process.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Sample {
    /// CPU seconds used so far.
    pub cpu_s: f64,
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Peak resident set, KiB.
    pub hwm_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn sample(pid: u32) -> anyhow::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let utime: f64 = f.get(11).context("utime")?.parse()?;
    let stime: f64 = f.get(12).context("stime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        cpu_s: (utime + stime) / ticks,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Kernel slab memory of the whole machine, KiB (`/proc/meminfo` Slab).
pub fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether the program a server needs is present (peers are installed by
/// `scripts/bench-peers.sh`).
pub fn available(root: &Path, bin_dir: &Path, server: Server) -> Result<(), String> {
    let need = match server {
        Server::Holdfast | Server::HoldfastProtobuf | Server::HoldfastSse => {
            bin_dir.join("holdfast")
        }
        Server::Raw => return Ok(()),
        Server::Socketio => root.join("bench/peers/socketio/node_modules/socket.io"),
        Server::Socketioxide => {
            root.join("bench/peers/socketioxide/target/release/socketioxide-peer")
        }
        Server::Fastapi => root.join("tests/compat/.venv/bin/python"),
        Server::Sockudo => root.join("target/peers/bin/sockudo"),
    };
    if need.exists() {
        Ok(())
    } else {
        Err(format!(
            "{} needs {} (run scripts/bench-peers.sh)",
            server.name(),
            need.display()
        ))
    }
}
