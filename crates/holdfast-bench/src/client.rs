//! A lean Centrifugo-protocol client (JSON): enough to connect, subscribe with recovery and read
//! publications, without an SDK's overhead. Connections can start from a chosen source address
//! so one process can hold many sockets to one server port.

use anyhow::{Context, bail};
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

/// An open WebSocket to the server.
pub type Ws = WebSocketStream<TcpStream>;

/// Connects to `url` (ws://host:port/path) from `source` (any port), with the JSON subprotocol.
pub async fn open(url: &str, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request().context("url")?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "centrifuge-json".parse()?);
    let host = req.uri().host().context("url host")?.to_owned();
    let port = req.uri().port_u16().unwrap_or(80);
    let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .context("no address")?;
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let cfg = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let (ws, _) = client_async_with_config(req, stream, Some(cfg)).await?;
    Ok(ws)
}

/// Sends one text frame.
pub async fn send(ws: &mut Ws, text: String) -> anyhow::Result<()> {
    ws.send(Message::Text(text.into())).await?;
    Ok(())
}

/// One server message, parsed only as far as the verifier needs.
#[derive(Debug, Deserialize)]
pub struct ServerMsg<'a> {
    /// Reply id (0 for pushes and pings).
    #[serde(default)]
    pub id: u32,
    /// Error reply.
    #[serde(default)]
    pub error: Option<ErrorMsg>,
    /// Push.
    #[serde(default, borrow)]
    pub push: Option<PushMsg<'a>>,
    /// Subscribe result.
    #[serde(default, borrow)]
    pub subscribe: Option<SubscribeMsg<'a>>,
    /// Publish result.
    #[serde(default, borrow)]
    pub publish: Option<&'a RawValue>,
}

/// An error reply.
#[derive(Debug, Deserialize)]
pub struct ErrorMsg {
    /// Error code.
    pub code: u32,
    /// Message.
    #[serde(default)]
    pub message: String,
}

/// A push.
#[derive(Debug, Deserialize)]
pub struct PushMsg<'a> {
    /// Channel.
    #[serde(default)]
    pub channel: String,
    /// Publication.
    #[serde(default, borrow, rename = "pub")]
    pub publication: Option<PubMsg<'a>>,
    /// Server unsubscribe.
    #[serde(default)]
    pub unsubscribe: Option<UnsubMsg>,
}

/// A publication.
#[derive(Debug, Deserialize)]
pub struct PubMsg<'a> {
    /// Offset in the stream.
    #[serde(default)]
    pub offset: u64,
    /// Raw payload (borrowed; only the publish time is read from it).
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

impl PubMsg<'_> {
    /// The publish time (`t`, microseconds since the Unix epoch) the verifier puts in payloads.
    pub fn sent_at_us(&self) -> Option<u64> {
        #[derive(Deserialize)]
        struct T {
            t: u64,
        }
        serde_json::from_str::<T>(self.data?.get())
            .ok()
            .map(|x| x.t)
    }
}

/// An unsubscribe push.
#[derive(Debug, Deserialize)]
pub struct UnsubMsg {
    /// Code (2500 = resubscribe and recover).
    #[serde(default)]
    pub code: u32,
}

/// A subscribe result.
#[derive(Debug, Deserialize)]
pub struct SubscribeMsg<'a> {
    /// Stream epoch.
    #[serde(default)]
    pub epoch: String,
    /// Stream offset (the requested one on successful recovery).
    #[serde(default)]
    pub offset: u64,
    /// Recovery succeeded.
    #[serde(default)]
    pub recovered: bool,
    /// Recovered publications.
    #[serde(default, borrow)]
    pub publications: Vec<PubMsg<'a>>,
}

/// Parses one line of a frame.
pub fn parse(line: &str) -> anyhow::Result<ServerMsg<'_>> {
    if line.is_empty() {
        bail!("empty message");
    }
    Ok(serde_json::from_str(line)?)
}

/// Mints an HS256 connection token for `user`.
pub fn token(secret: &str, user: &str) -> anyhow::Result<String> {
    token_with_channels(secret, user, &[])
}

/// A connection token whose `channels` claim subscribes the connection to `channels` on the
/// server side (what a unidirectional connection needs).
pub fn token_with_channels(
    secret: &str,
    user: &str,
    channels: &[String],
) -> anyhow::Result<String> {
    let mut claims = serde_json::json!({ "sub": user });
    if !channels.is_empty() {
        claims["channels"] = serde_json::json!(channels);
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The transport a subscriber connects over.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// WebSocket.
    #[default]
    Websocket,
    /// HTTP-streaming, commands through `/emulation` (the centrifuge client's fallback).
    HttpStream,
    /// SSE, commands through `/emulation`.
    Sse,
}

/// What a connection yields.
#[derive(Debug)]
pub enum Incoming {
    /// One frame of messages (JSON, `\n`-separated).
    Text(String),
    /// The server closed, with its disconnect code when it gave one.
    Close(Option<u16>),
}

/// A bidirectional connection over any transport.
#[derive(Debug)]
pub enum Conn {
    /// WebSocket.
    Ws(Box<Ws>),
    /// A streamed HTTP response for server → client, `/emulation` requests for client → server.
    Emulated(Box<Emulated>),
}

/// An emulated connection (HTTP-streaming or SSE).
#[derive(Debug)]
pub struct Emulated {
    resp: reqwest::Response,
    buf: Vec<u8>,
    sse: bool,
    http: reqwest::Client,
    emulation: String,
    session: String,
    node: String,
}

impl Conn {
    /// Opens a connection to `ws_url` (`ws://host:port/connection/websocket`; the emulated
    /// transports use the same host) whose first frame is `connect` (a JSON connect command);
    /// returns it with the connect reply's frame.
    pub async fn open(
        transport: Transport,
        ws_url: &str,
        source: Option<IpAddr>,
        connect: String,
    ) -> anyhow::Result<Conn> {
        if transport == Transport::Websocket {
            let mut ws = open(ws_url, source).await?;
            send(&mut ws, connect).await?;
            return Ok(Conn::Ws(Box::new(ws)));
        }
        let base = ws_url
            .replacen("ws://", "http://", 1)
            .replace("/connection/websocket", "");
        let mut builder = reqwest::Client::builder().pool_max_idle_per_host(0);
        if let Some(ip) = source {
            builder = builder.local_address(ip);
        }
        let http = builder.build()?;
        let sse = transport == Transport::Sse;
        let resp = if sse {
            let mut url = reqwest::Url::parse(&format!("{base}/connection/sse"))?;
            url.query_pairs_mut().append_pair("cf_connect", &connect);
            http.get(url).send().await?
        } else {
            http.post(format!("{base}/connection/http_stream"))
                .header("content-type", "application/json")
                .body(connect)
                .send()
                .await?
        };
        if !resp.status().is_success() {
            bail!("stream refused: {}", resp.status());
        }
        Ok(Conn::Emulated(Box::new(Emulated {
            resp,
            buf: Vec::new(),
            sse,
            http,
            emulation: format!("{base}/emulation"),
            session: String::new(),
            node: String::new(),
        })))
    }

    /// Sends one frame (commands, or `{}` as a pong).
    pub async fn send(&mut self, text: String) -> anyhow::Result<()> {
        match self {
            Conn::Ws(ws) => send(ws, text).await,
            Conn::Emulated(e) => {
                let body = serde_json::json!({"session": e.session, "node": e.node, "data": text});
                let r = e
                    .http
                    .post(&e.emulation)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("emulation refused: {}", r.status());
                }
                Ok(())
            }
        }
    }

    /// The next frame; `None` when the connection ended without a word. Cancel-safe.
    pub async fn next(&mut self) -> Option<anyhow::Result<Incoming>> {
        use futures_util::StreamExt;
        match self {
            Conn::Ws(ws) => match ws.next().await? {
                Ok(Message::Text(t)) => Some(Ok(Incoming::Text(t.as_str().to_owned()))),
                Ok(Message::Close(f)) => Some(Ok(Incoming::Close(f.map(|f| f.code.into())))),
                Ok(_) => Some(Ok(Incoming::Text(String::new()))),
                Err(e) => Some(Err(e.into())),
            },
            Conn::Emulated(e) => e.next().await,
        }
    }
}

impl Emulated {
    async fn next(&mut self) -> Option<anyhow::Result<Incoming>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line[..i]);
                let line = line.trim_end_matches('\r');
                let msg = if self.sse {
                    match line.strip_prefix("data: ") {
                        Some(m) => m,
                        None => continue,
                    }
                } else {
                    line
                };
                if msg.is_empty() {
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(msg) {
                    let d = &v["push"]["disconnect"];
                    if d.is_object() {
                        return Some(Ok(Incoming::Close(
                            d["code"].as_u64().and_then(|c| u16::try_from(c).ok()),
                        )));
                    }
                    let c = &v["connect"];
                    if c.is_object() {
                        self.session = c["session"].as_str().unwrap_or_default().to_owned();
                        self.node = c["node"].as_str().unwrap_or_default().to_owned();
                    }
                }
                return Some(Ok(Incoming::Text(msg.to_owned())));
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                Ok(None) => return None,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}
