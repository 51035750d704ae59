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
