//! Test harness: a real server on 127.0.0.1:0 and a raw WebSocket client.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use futures_util::{SinkExt, StreamExt};
use holdfast_server::config::Config;
use holdfast_server::server::{self, AppState};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";

/// How long a test waits for an expected event before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A config most tests start from: HMAC secret, API key, a few namespaces.
pub fn base_config() -> Config {
    let mut c = Config::default();
    c.client.token.hmac_secret_key = SECRET.into();
    c.http_api.key = API_KEY.into();
    c.shutdown.timeout = Duration::from_secs(5);
    c.engine.kind = holdfast_server::config::EngineKind::Memory;
    c
}

/// Builds a config from TOML on top of [`base_config`]'s secrets.
pub fn config_from(toml_text: &str) -> Config {
    let dir = std::env::temp_dir().join(format!("holdfast-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.toml", uuid_like()));
    std::fs::write(&path, toml_text).unwrap();
    let loaded = holdfast_server::config::load(Some(&path), Vec::new(), &[]).unwrap();
    assert!(
        loaded.unknown.is_empty(),
        "unknown keys in test config: {:?}",
        loaded.unknown
    );
    let mut c = loaded.config;
    if c.client.token.hmac_secret_key.is_empty() {
        c.client.token.hmac_secret_key = SECRET.into();
    }
    if c.http_api.key.is_empty() {
        c.http_api.key = API_KEY.into();
    }
    if !toml_text.contains("[engine") {
        c.engine.kind = holdfast_server::config::EngineKind::Memory;
    }
    c.shutdown.timeout = Duration::from_secs(5);
    c
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("c{}", N.fetch_add(1, Ordering::Relaxed))
}

pub mod engines;
pub mod nats;
pub mod postgres;
pub mod redis;

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let state = server::build(config).await.unwrap();
        Self::start_state(state).await
    }

    /// Starts over a given engine.
    pub async fn start_with_engine(config: Config, engine: Arc<engines::FaultyEngine>) -> Self {
        let state = server::build_with_engine(
            config,
            holdfast_core::engine::Engine {
                broker: engine.clone(),
                presence: engine.inner.clone(),
                cursors: engine.inner.clone(),
                maps: holdfast_core::engine::MemoryMapBroker::new(),
            },
        )
        .await
        .unwrap();
        Self::start_state(state).await
    }

    async fn start_state(state: Arc<AppState>) -> Self {
        let (srv, ready) = Self::start_unready(state).await;
        let _ = ready.send(());
        eventually("node ready", || srv.state.node.is_ready()).await;
        srv
    }

    /// Starts listening without the node being ready; it becomes ready when the sender fires.
    pub async fn start_unready(state: Arc<AppState>) -> (Self, oneshot::Sender<()>) {
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = public.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            server::run_with_readiness(
                st,
                public,
                None,
                async {
                    let _ = ready_rx.await;
                },
                async {
                    let _ = rx.await;
                },
            )
            .await
        });
        (
            Self {
                addr,
                state,
                stop: Some(tx),
                task: Some(task),
            },
            ready_tx,
        )
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/connection/websocket", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn client(&self) -> TestClient {
        TestClient::connect(&self.ws_url()).await
    }

    /// Connects and completes `connect` with a token for `user`.
    pub async fn connected(&self, user: &str) -> (TestClient, Value) {
        let mut c = self.client().await;
        let res = c.connect_token(&token(user, None, json!({}))).await;
        (c, res)
    }

    /// Connects with the given token; returns the client and the connect reply.
    pub async fn connected_with(&self, token: &str) -> (TestClient, Value) {
        let mut c = self.client().await;
        let res = c.connect_token(token).await;
        (c, res)
    }

    /// Stops the server (graceful shutdown) and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    pub fn trigger_stop(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }
}

/// An HS256 connection token for `user` with extra claims merged in; `ttl` seconds (None = no exp).
pub fn token(user: &str, ttl: Option<i64>, extra: Value) -> String {
    let mut claims = json!({ "sub": user });
    if let Some(ttl) = ttl {
        claims["exp"] = json!(holdfast_core::time::unix_secs() + ttl);
    }
    if let Value::Object(m) = extra {
        for (k, v) in m {
            claims[k] = v;
        }
    }
    holdfast_server::jwt::sign_hs256(SECRET, &claims).unwrap()
}

/// A subscription token.
pub fn sub_token(user: &str, channel: &str, extra: Value) -> String {
    let mut e = json!({ "channel": channel });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            e[k] = v;
        }
    }
    token(user, None, e)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the client saw when the connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// A close frame with this code and reason.
    Code(u16, String),
    /// The stream ended without a close frame.
    NoFrame,
}

pub struct TestClient {
    pub ws: Ws,
    /// Messages of already received frames not yet consumed.
    pending: VecDeque<Value>,
    next_id: u32,
    /// Frames received (to check batching).
    pub frames: usize,
    /// Answer server pings automatically.
    pub auto_pong: bool,
}

impl TestClient {
    pub async fn connect(url: &str) -> Self {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "centrifuge-json".parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some("centrifuge-json")
        );
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 0,
            frames: 0,
            auto_pong: true,
        }
    }

    /// Wraps an already open socket.
    pub fn from_ws(ws: Ws) -> Self {
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 0,
            frames: 0,
            auto_pong: true,
        }
    }

    pub fn next_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::Binary(data.to_vec().into()))
            .await
            .unwrap();
    }

    /// Sends one command with a fresh id; returns the id.
    pub async fn send(&mut self, method: &str, params: Value) -> u32 {
        let id = self.next_id();
        let cmd = json!({ "id": id, method: params });
        self.send_raw(&cmd.to_string()).await;
        id
    }

    /// The next message (reply, push, ping), `None` when the connection closed.
    pub async fn recv(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = self.pending.pop_front() {
                if self.auto_pong && v == json!({}) {
                    let _ = self.ws.send(Message::Text("{}".into())).await;
                    continue;
                }
                return Some(v);
            }
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for a message")?;
            match msg {
                Ok(Message::Text(t)) => {
                    self.frames += 1;
                    for line in t.as_str().split('\n') {
                        self.pending.push_back(
                            serde_json::from_str(line)
                                .unwrap_or_else(|e| panic!("bad json {line:?}: {e}")),
                        );
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Next message, panicking when the connection closed.
    pub async fn next(&mut self) -> Value {
        self.recv().await.expect("connection closed unexpectedly")
    }

    /// Waits for the reply to `id`, keeping pushes that arrive first for later.
    pub async fn reply(&mut self, id: u32) -> Value {
        let mut skipped = VecDeque::new();
        loop {
            let v = self.next().await;
            if v.get("id").and_then(Value::as_u64) == Some(u64::from(id)) {
                while let Some(s) = skipped.pop_back() {
                    self.pending.push_front(s);
                }
                return v;
            }
            skipped.push_back(v);
        }
    }

    /// Sends a command and returns its reply.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params).await;
        self.reply(id).await
    }

    pub async fn connect_token(&mut self, token: &str) -> Value {
        self.call("connect", json!({ "token": token, "name": "test" }))
            .await
    }

    /// Waits for the next push (skipping nothing: replies are unexpected here).
    pub async fn push(&mut self) -> Value {
        let v = self.next().await;
        v.get("push")
            .cloned()
            .unwrap_or_else(|| panic!("expected a push, got {v}"))
    }

    /// Waits until the connection ends; returns the close code.
    pub async fn closed(&mut self) -> Closed {
        self.pending.clear();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match msg {
                None => return Closed::NoFrame,
                Some(Ok(Message::Close(Some(f)))) => {
                    return Closed::Code(f.code.into(), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return Closed::NoFrame,
                Some(Ok(_)) => continue,
                Some(Err(_)) => return Closed::NoFrame,
            }
        }
    }
}

/// Publishes through the node (what the server API does), returning the offset (0 without history).
pub async fn publish(srv: &TestServer, channel: &str, data: Value) -> u64 {
    let req = holdfast_core::node::PublishRequest {
        data: serde_json::to_vec(&data).unwrap().into(),
        ..Default::default()
    };
    let out = srv.state.node.publish(channel, req).await.unwrap();
    out.position.map_or(0, |p| p.offset)
}

/// The error code of a reply (panics when the reply is not an error).
pub fn code(r: &Value) -> u64 {
    r["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error, got {r}"))
}

/// POST to the server API.
pub async fn api(srv: &TestServer, method: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(srv.http(&format!("/api/{method}")))
        .header("X-API-Key", API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    resp.json().await.unwrap()
}

/// Polls `cond` (a state of the server, not of the clients) until it holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A raw protobuf client (`centrifuge-protobuf` subprotocol).
pub struct ProtoClient {
    pub ws: Ws,
    pending: VecDeque<holdfast_protocol::proto::pb::Reply>,
    next_id: u32,
    /// Answer server pings (empty replies) automatically and hide them.
    pub auto_pong: bool,
}

impl ProtoClient {
    pub async fn connect(url: &str, subprotocol: bool) -> Self {
        let mut req = url.into_client_request().unwrap();
        if subprotocol {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                "centrifuge-protobuf".parse().unwrap(),
            );
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        if subprotocol {
            assert_eq!(
                resp.headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap()),
                Some("centrifuge-protobuf")
            );
        }
        Self {
            ws,
            pending: VecDeque::new(),
            next_id: 0,
            auto_pong: true,
        }
    }

    pub async fn send(&mut self, mut cmd: holdfast_protocol::proto::pb::Command) -> u32 {
        use prost::Message as _;
        if cmd.id == 0 && cmd.send.is_none() && cmd != Default::default() {
            self.next_id += 1;
            cmd.id = self.next_id;
        }
        let mut buf = Vec::new();
        cmd.encode_length_delimited(&mut buf).unwrap();
        self.ws.send(Message::Binary(buf.into())).await.unwrap();
        cmd.id
    }

    pub async fn next(&mut self) -> holdfast_protocol::proto::pb::Reply {
        use prost::Message as _;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(r) = self.pending.pop_front() {
                if self.auto_pong && r == Default::default() {
                    self.send(Default::default()).await;
                    continue;
                }
                return r;
            }
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out")
                .expect("closed")
                .unwrap();
            match msg {
                Message::Binary(b) => {
                    let mut buf = &b[..];
                    while !buf.is_empty() {
                        self.pending.push_back(
                            holdfast_protocol::proto::pb::Reply::decode_length_delimited(&mut buf)
                                .unwrap(),
                        );
                    }
                }
                Message::Text(t) => panic!("protobuf connection got a text frame: {t}"),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    }

    pub async fn call(
        &mut self,
        cmd: holdfast_protocol::proto::pb::Command,
    ) -> holdfast_protocol::proto::pb::Reply {
        let id = self.send(cmd).await;
        let mut skipped = VecDeque::new();
        loop {
            let r = self.next().await;
            if r.id == id {
                while let Some(x) = skipped.pop_back() {
                    self.pending.push_front(x);
                }
                return r;
            }
            skipped.push_back(r);
        }
    }

    pub async fn closed(&mut self) -> Closed {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for close")
            {
                None => return Closed::NoFrame,
                Some(Ok(Message::Close(Some(f)))) => {
                    return Closed::Code(f.code.into(), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | Some(Err(_)) => return Closed::NoFrame,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Spawns the `holdfast` binary with `cfg` on `port` and waits (up to `wait`) until `/ready`
/// answers 200. The caller owns the child: kill and reap it.
#[allow(clippy::zombie_processes)]
pub async fn spawn_holdfast(
    cfg: &std::path::Path,
    port: u16,
    wait: Duration,
) -> std::process::Child {
    spawn_holdfast_env(cfg, port, wait, &[]).await
}

/// [`spawn_holdfast`] with extra environment variables (fault hooks).
pub async fn spawn_holdfast_env(
    cfg: &std::path::Path,
    port: u16,
    wait: Duration,
    env: &[(&str, &str)],
) -> std::process::Child {
    spawn_holdfast_with(cfg, port, wait, env, None).await
}

/// [`spawn_holdfast`] with its log appended to `log` (for a test to show when it fails).
#[allow(dead_code)]
pub async fn spawn_holdfast_logged(
    cfg: &std::path::Path,
    port: u16,
    wait: Duration,
    log: &std::path::Path,
) -> std::process::Child {
    spawn_holdfast_with(cfg, port, wait, &[], Some(log)).await
}

#[allow(clippy::zombie_processes)]
async fn spawn_holdfast_with(
    cfg: &std::path::Path,
    port: u16,
    wait: Duration,
    env: &[(&str, &str)],
    log: Option<&std::path::Path>,
) -> std::process::Child {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let stderr = match log {
        Some(p) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap(),
        ),
        None => std::process::Stdio::null(),
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["serve", "--config"])
        .arg(cfg)
        .args(["--address", "127.0.0.1", "--port", &port.to_string()])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("holdfast exited before it was ready: {status}");
        }
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/ready")).await
            && r.status() == 200
        {
            return child;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "holdfast did not become ready on {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
