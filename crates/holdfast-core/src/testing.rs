//! Test support, shared by the core's state-machine tests, the fuzz targets and
//! `holdfast-bench fanout`: in-memory frame transports, a JSON client for them, an engine that
//! records what the node asked of it (and can be told to fail), and unsigned test tokens.
//!
//! Every timer of a session (stale close, pings and pongs, connection and subscription expiry,
//! the command rate limit, prompt cursor confirmation) reads tokio time, so tests run under
//! `#[tokio::test(start_paused = true)]` and cover hours of protocol in milliseconds. Waits in
//! [`TestClient`] give up after an hour of (virtual) time, so a test that waits for something that
//! never comes fails instead of hanging.

use crate::config::NodeConfig;
use crate::engine::{
    Broker, BrokerHandler, CursorStore, Engine, EngineError, HistoryPage, HistoryQuery,
    MemoryEngine, PresenceStore, PublishOptions, PublishOutcome, StreamTop,
};
use crate::handler::{
    ConnectClaims, ServerSubOptions, StandardHandler, SubscribeClaims, TokenError, TokenVerifier,
};
use crate::node::Node;
use crate::transport::{ConnectionMeta, FrameSink, FrameSource, serve_connection};
use async_trait::async_trait;
use bytes::Bytes;
use holdfast_protocol::{ClientInfo, Disconnect, Encoding, Publication};
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a [`TestClient`] waits for anything (virtual time under a paused clock).
pub const PATIENCE: Duration = Duration::from_secs(3600);

/// Frames a test feeds a connection, in order; then the end of the stream (the peer left), or
/// with [`ScriptSource::then_wait`] silence until the node closes the connection.
#[derive(Debug, Default)]
pub struct ScriptSource {
    frames: VecDeque<Bytes>,
    wait_at_end: bool,
}

impl ScriptSource {
    /// These frames, then the end of the stream.
    pub fn new(frames: impl IntoIterator<Item = Bytes>) -> Self {
        Self {
            frames: frames.into_iter().collect(),
            wait_at_end: false,
        }
    }

    /// Silence instead of the end of the stream once the frames are read.
    #[must_use]
    pub fn then_wait(mut self) -> Self {
        self.wait_at_end = true;
        self
    }
}

impl FrameSource for ScriptSource {
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>> {
        match self.frames.pop_front() {
            Some(f) => Some(Ok(f)),
            None if self.wait_at_end => std::future::pending().await,
            None => None,
        }
    }
}

/// Hands every frame a connection writes to a closure (and drops close frames).
pub struct CallbackSink<F>(pub F);

impl<F> std::fmt::Debug for CallbackSink<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackSink")
    }
}

impl<F: FnMut(Bytes) + Send> FrameSink for CallbackSink<F> {
    async fn send_frame(&mut self, frame: Bytes, _binary: bool) -> std::io::Result<()> {
        (self.0)(frame);
        Ok(())
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    async fn close(&mut self, _code: u16, _reason: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the server side of an in-memory connection wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOut {
    /// A data frame.
    Frame(Bytes),
    /// A close frame: code and reason.
    Close(u16, String),
}

/// The server's end of an in-memory connection: frames from the [`TestClient`].
#[derive(Debug)]
pub struct ChannelSource(mpsc::Receiver<Bytes>);

impl FrameSource for ChannelSource {
    async fn next_frame(&mut self) -> Option<Result<Bytes, Disconnect>> {
        self.0.recv().await.map(Ok)
    }
}

/// The server's end of an in-memory connection: frames to the [`TestClient`], bounded like a
/// socket (a client that does not read makes the writer wait).
#[derive(Debug)]
pub struct ChannelSink(mpsc::Sender<ServerOut>);

impl FrameSink for ChannelSink {
    async fn send_frame(&mut self, frame: Bytes, _binary: bool) -> std::io::Result<()> {
        self.0
            .send(ServerOut::Frame(frame))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        let _ = self.0.send(ServerOut::Close(code, reason.to_owned())).await;
        Ok(())
    }
}

/// The client end of an in-memory JSON connection to a node.
#[derive(Debug)]
pub struct TestClient {
    tx: Option<mpsc::Sender<Bytes>>,
    rx: mpsc::Receiver<ServerOut>,
    /// Messages of frames already received, not yet consumed.
    pending: VecDeque<Value>,
    next_id: u32,
    /// The close frame, once received.
    pub closed_with: Option<(u16, String)>,
    /// Answer pings (`{}`) with a pong and hide them (what SDKs do).
    pub auto_pong: bool,
    /// Frames received so far (several messages may share one).
    pub frames: u64,
}

impl TestClient {
    /// Opens a connection to `node` (served on its tracker, as a real transport would be). The
    /// server's outgoing frames wait in a channel of `capacity` frames: a client that does not
    /// read fills it, then the node's outbox, as a socket would.
    pub fn connect_with(node: &Node, capacity: usize) -> Self {
        let (to_server, from_client) = mpsc::channel(64);
        let (to_client, from_server) = mpsc::channel(capacity.max(1));
        let meta = ConnectionMeta {
            transport: "test",
            kind: crate::transport::ConnectionKind::Bidirectional,
            encoding: Encoding::Json,
            ip: None,
            headers: Vec::new().into(),
        };
        node.tracker().spawn(serve_connection(
            node.clone(),
            meta,
            ChannelSource(from_client),
            ChannelSink(to_client),
        ));
        Self {
            tx: Some(to_server),
            rx: from_server,
            pending: VecDeque::new(),
            next_id: 0,
            closed_with: None,
            auto_pong: true,
            frames: 0,
        }
    }

    /// [`TestClient::connect_with`] a roomy channel.
    pub fn connect(node: &Node) -> Self {
        Self::connect_with(node, 1024)
    }

    /// Sends one frame as it is.
    pub async fn send_raw(&mut self, text: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Bytes::copy_from_slice(text.as_bytes())).await;
        }
    }

    /// Sends `{"id":…, method: params}`; returns the id.
    pub async fn send(&mut self, method: &str, params: Value) -> u32 {
        self.next_id += 1;
        let id = self.next_id;
        self.send_raw(&json!({ "id": id, method: params }).to_string())
            .await;
        id
    }

    /// The peer goes away (end of stream for the server).
    pub fn hang_up(&mut self) {
        self.tx = None;
    }

    /// The next message (reply, push, or a ping when `auto_pong` is off); `None` once the
    /// connection ended (see [`TestClient::closed_with`]).
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                if self.auto_pong && v == json!({}) {
                    self.send_raw("{}").await;
                    continue;
                }
                return Some(v);
            }
            if self.closed_with.is_some() {
                return None;
            }
            let out = tokio::time::timeout(PATIENCE, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing from the server for {PATIENCE:?}"))?;
            match out {
                ServerOut::Frame(f) => {
                    self.frames += 1;
                    for line in f.split(|b| *b == b'\n') {
                        let v = serde_json::from_slice(line).unwrap_or_else(|e| {
                            panic!(
                                "bad JSON from the server {:?}: {e}",
                                String::from_utf8_lossy(line)
                            )
                        });
                        self.pending.push_back(v);
                    }
                }
                ServerOut::Close(code, reason) => self.closed_with = Some((code, reason)),
            }
        }
    }

    /// The next message; panics when the connection ended.
    pub async fn next(&mut self) -> Value {
        match self.recv().await {
            Some(v) => v,
            None => panic!("connection ended: {:?}", self.closed_with),
        }
    }

    /// The reply to `id` (pushes that come first are kept for later).
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

    /// Sends a command and waits for its reply.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params).await;
        self.reply(id).await
    }

    /// The next push (panics on anything else).
    pub async fn push(&mut self) -> Value {
        let v = self.next().await;
        match v.get("push") {
            Some(p) => p.clone(),
            None => panic!("expected a push, got {v}"),
        }
    }

    /// Waits until the connection ends; its close code and reason (`None`: no close frame).
    pub async fn closed(&mut self) -> Option<(u16, String)> {
        while self.recv().await.is_some() {}
        self.closed_with.clone()
    }
}

/// What a node asked of a [`RecordingEngine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineCall {
    /// A publish (offset 0 without history).
    Publish { channel: String, offset: u64 },
    /// The node's first local subscriber of a channel.
    Subscribe(String),
    /// The node's last local subscriber of a channel left.
    Unsubscribe(String),
    /// A history read.
    History(String),
}

/// When a [`RecordingEngine`] hook runs relative to a history read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the read.
    Before,
    /// After the read.
    After,
}

type HistoryHook =
    Arc<dyn Fn(&str, Stage) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> + Send + Sync>;

/// The memory engine, recording the node's calls, with faults a test can switch on: broker
/// subscribes and history reads of a channel prefix fail, deliveries of chosen offsets are lost
/// (as a lost pub/sub message), and a hook runs around history reads (to land publications in
/// the middle of a subscribe).
pub struct RecordingEngine {
    /// The engine doing the work.
    pub inner: Arc<MemoryEngine>,
    calls: Mutex<Vec<EngineCall>>,
    fail_prefix: Mutex<Option<String>>,
    lost: Arc<Mutex<Vec<(String, u64)>>>,
    history_hook: Mutex<Option<HistoryHook>>,
    handler: Mutex<Option<Arc<dyn BrokerHandler>>>,
}

impl std::fmt::Debug for RecordingEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingEngine")
            .field("calls", &self.calls.lock().len())
            .finish_non_exhaustive()
    }
}

impl RecordingEngine {
    /// A fresh engine (inside a tokio runtime).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryEngine::new(),
            calls: Mutex::new(Vec::new()),
            fail_prefix: Mutex::new(None),
            lost: Arc::new(Mutex::new(Vec::new())),
            history_hook: Mutex::new(None),
            handler: Mutex::new(None),
        })
    }

    /// Tells the node its broker vouches for `top` in `channel` (as a broker does after a
    /// reconnect, or when a map channel is cleared).
    pub fn check_position(&self, channel: &str, top: &StreamTop) {
        let h = self.handler.lock().clone();
        if let Some(h) = h {
            h.check_position(channel, top);
        }
    }

    /// The engine as a node takes it.
    pub fn engine(self: &Arc<Self>) -> Engine {
        Engine {
            broker: self.clone(),
            presence: self.clone(),
            cursors: self.clone(),
            maps: crate::engine::MemoryMapBroker::new(),
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<EngineCall> {
        self.calls.lock().clone()
    }

    /// Channels the node is subscribed to at the broker now.
    pub fn subscribed(&self) -> Vec<String> {
        let mut subs: Vec<String> = Vec::new();
        for c in self.calls.lock().iter() {
            match c {
                EngineCall::Subscribe(ch) => subs.push(ch.clone()),
                EngineCall::Unsubscribe(ch) => subs.retain(|s| s != ch),
                _ => {}
            }
        }
        subs
    }

    /// Broker subscribes and history reads of channels starting with `prefix` fail (`None`:
    /// none fail).
    pub fn fail(&self, prefix: Option<&str>) {
        *self.fail_prefix.lock() = prefix.map(str::to_owned);
    }

    /// The delivery of `offset` in `channel` is lost on its way to the node.
    pub fn lose(&self, channel: &str, offset: u64) {
        self.lost.lock().push((channel.to_owned(), offset));
    }

    /// Runs `hook` before and after every history read (its future is awaited there).
    pub fn on_history(
        &self,
        hook: impl Fn(&str, Stage) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>>
        + Send
        + Sync
        + 'static,
    ) {
        *self.history_hook.lock() = Some(Arc::new(hook));
    }

    fn failing(&self, channel: &str) -> Result<(), EngineError> {
        match &*self.fail_prefix.lock() {
            Some(p) if channel.starts_with(p.as_str()) => {
                Err(EngineError::Unavailable("injected failure".into()))
            }
            _ => Ok(()),
        }
    }

    fn record(&self, c: EngineCall) {
        self.calls.lock().push(c);
    }

    async fn hook(&self, channel: &str, stage: Stage) {
        let hook = self.history_hook.lock().clone();
        if let Some(f) = hook.and_then(|h| h(channel, stage)) {
            f.await;
        }
    }
}

/// Passes deliveries on, except the ones a test marked lost.
#[derive(Debug)]
struct Lossy {
    lost: Arc<Mutex<Vec<(String, u64)>>>,
    next: Arc<dyn BrokerHandler>,
}

impl BrokerHandler for Lossy {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        let lost = self
            .lost
            .lock()
            .iter()
            .any(|(c, o)| c == channel && *o == p.offset);
        if !lost {
            self.next.on_publication(channel, p, epoch);
        }
    }
    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.next.on_join(channel, info);
    }
    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.next.on_leave(channel, info);
    }
    fn check_position(&self, channel: &str, top: &StreamTop) {
        self.next.check_position(channel, top);
    }
    fn on_rewind(&self, channel: &str, top: &StreamTop) {
        self.next.on_rewind(channel, top);
    }
    fn on_control(&self, data: &[u8]) {
        self.next.on_control(data);
    }
}

#[async_trait]
impl Broker for RecordingEngine {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        *self.handler.lock() = Some(handler.clone());
        self.inner.set_handler(Arc::new(Lossy {
            lost: self.lost.clone(),
            next: handler,
        }));
    }
    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: &PublishOptions,
    ) -> Result<PublishOutcome, EngineError> {
        let out = self.inner.publish(channel, publication, opts).await?;
        self.record(EngineCall::Publish {
            channel: channel.to_owned(),
            offset: out.position.as_ref().map_or(0, |p| p.offset),
        });
        Ok(out)
    }
    async fn publish_join(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.inner.publish_join(channel, info).await
    }
    async fn publish_leave(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.inner.publish_leave(channel, info).await
    }
    async fn subscribe(&self, channel: &str) -> Result<(), EngineError> {
        self.failing(channel)?;
        self.record(EngineCall::Subscribe(channel.to_owned()));
        self.inner.subscribe(channel).await
    }
    async fn unsubscribe(&self, channel: &str) -> Result<(), EngineError> {
        self.record(EngineCall::Unsubscribe(channel.to_owned()));
        self.inner.unsubscribe(channel).await
    }
    async fn history(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError> {
        self.failing(channel)?;
        self.record(EngineCall::History(channel.to_owned()));
        self.hook(channel, Stage::Before).await;
        let page = self.inner.history(channel, query).await;
        self.hook(channel, Stage::After).await;
        page
    }
    async fn remove_history(&self, channel: &str) -> Result<(), EngineError> {
        self.inner.remove_history(channel).await
    }
    async fn publish_control(&self, data: Bytes) -> Result<(), EngineError> {
        self.inner.publish_control(data).await
    }
}

#[async_trait]
impl PresenceStore for RecordingEngine {
    async fn add_presence(&self, channel: &str, info: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.inner.add_presence(channel, info).await
    }
    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), EngineError> {
        self.inner.remove_presence(channel, client).await
    }
    async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, EngineError> {
        self.inner.presence(channel).await
    }
    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), EngineError> {
        self.inner.presence_stats(channel).await
    }
}

#[async_trait]
impl CursorStore for RecordingEngine {
    async fn save_cursor(
        &self,
        user: &str,
        channel: &str,
        pos: &StreamTop,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        self.inner.save_cursor(user, channel, pos, ttl).await
    }
    async fn load_cursor(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<Option<StreamTop>, EngineError> {
        self.inner.load_cursor(user, channel).await
    }
}

/// Unsigned test tokens: the token is its claims as JSON (`{"sub":"42","exp":…,"channels":[…]}`
/// for connections, `{"sub":"42","channel":"c",…}` for subscriptions). Never use outside tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonTokens;

fn claims(token: &str) -> Result<serde_json::Map<String, Value>, TokenError> {
    match serde_json::from_str(token) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(TokenError::Invalid("not a JSON test token".into())),
    }
}

fn exp_of(c: &serde_json::Map<String, Value>) -> Result<(Option<i64>, Option<i64>), TokenError> {
    let exp = c.get("exp").and_then(Value::as_i64);
    if exp.is_some_and(|e| e <= crate::time::unix_secs()) {
        return Err(TokenError::Expired);
    }
    Ok((exp, c.get("expire_at").and_then(Value::as_i64)))
}

fn string(c: &serde_json::Map<String, Value>, key: &str) -> String {
    c.get(key).and_then(Value::as_str).unwrap_or("").to_owned()
}

#[async_trait]
impl TokenVerifier for JsonTokens {
    async fn verify_connect(&self, token: &str) -> Result<ConnectClaims, TokenError> {
        let c = claims(token)?;
        let (exp, expire_at) = exp_of(&c)?;
        let subs: BTreeMap<String, ServerSubOptions> = c
            .get("channels")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|ch| (ch.to_owned(), ServerSubOptions::default()))
            .collect();
        Ok(ConnectClaims {
            user: string(&c, "sub"),
            exp,
            expire_at,
            subs,
            ..Default::default()
        })
    }

    async fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError> {
        let c = claims(token)?;
        let (exp, expire_at) = exp_of(&c)?;
        Ok(SubscribeClaims {
            user: string(&c, "sub"),
            channel: string(&c, "channel"),
            exp,
            expire_at,
            ..Default::default()
        })
    }
}

/// A connection token for `user` (optionally expiring `ttl` seconds from now, wall clock).
pub fn token(user: &str, ttl: Option<i64>) -> String {
    let mut c = json!({ "sub": user });
    if let Some(ttl) = ttl {
        c["exp"] = json!(crate::time::unix_secs() + ttl);
    }
    c.to_string()
}

/// A node over a [`RecordingEngine`], with the standard hooks and [`JsonTokens`], started.
pub fn node(config: NodeConfig) -> (Node, Arc<RecordingEngine>) {
    let engine = RecordingEngine::new();
    let handler = StandardHandler::new(&config.client, Some(Arc::new(JsonTokens)));
    let node = match Node::new(
        config,
        engine.engine(),
        crate::handler::Hooks::standard(handler),
    ) {
        Ok(n) => n,
        Err(errs) => panic!("invalid test configuration: {errs:?}"),
    };
    node.start();
    (node, engine)
}
