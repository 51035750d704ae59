//! Protocol adapters: how one generator connects, subscribes, answers application pings and
//! publishes on every server it compares. Deliveries are counted protocol-blind: every payload
//! carries `@@<publish time in µs>` and the reader counts markers in whatever frames arrive.

use crate::wire::{self, Conn, Op};
use anyhow::{Context, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// The wire protocol a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Centrifugo protocol, JSON (Holdfast).
    HoldfastJson,
    /// Centrifugo protocol, length-prefixed protobuf (Holdfast).
    HoldfastProtobuf,
    /// Holdfast's unidirectional SSE (`uni_sse`): server-side subscriptions from the token.
    HoldfastSse,
    /// Socket.IO v5 over Engine.IO v4, WebSocket transport.
    SocketIo,
    /// Pusher protocol 7 (Sockudo).
    Pusher,
    /// Plain text frames: subscribe with `/ws?channels=a,b`, the server answers `ready`.
    Text,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A payload of about `size` bytes: `{"m":"@@<t µs>;xxx…"}`.
pub fn payload(t: u64, size: usize) -> String {
    let mut s = format!("{{\"m\":\"@@{t};");
    while s.len() + 2 < size {
        s.push('x');
    }
    s.push_str("\"}");
    s
}

/// Everything a connection needs to subscribe.
#[derive(Debug, Clone)]
pub struct Target {
    /// Protocol.
    pub protocol: Protocol,
    /// `host:port`.
    pub host: String,
    /// HMAC secret for Holdfast connection tokens.
    pub secret: String,
    /// Pusher app key.
    pub app_key: String,
}

impl Protocol {
    /// The channel name this server uses for `base` (Holdfast puts it in the `bench` namespace,
    /// which has history and recovery on).
    pub fn channel(self, base: &str) -> String {
        match self {
            Protocol::HoldfastJson | Protocol::HoldfastProtobuf | Protocol::HoldfastSse => {
                format!("bench:{base}")
            }
            _ => base.to_owned(),
        }
    }

    fn path(self, t: &Target, channels: &[String]) -> String {
        match self {
            Protocol::HoldfastJson | Protocol::HoldfastProtobuf | Protocol::HoldfastSse => {
                "/connection/websocket".to_owned()
            }
            Protocol::SocketIo => "/socket.io/?EIO=4&transport=websocket".to_owned(),
            Protocol::Pusher => format!(
                "/app/{}?protocol=7&client=holdfast-bench&version=1.0",
                t.app_key
            ),
            Protocol::Text => format!("/ws?channels={}", channels.join(",")),
        }
    }

    fn subprotocol(self) -> Option<&'static str> {
        match self {
            Protocol::HoldfastJson => Some("centrifuge-json"),
            Protocol::HoldfastProtobuf => Some("centrifuge-protobuf"),
            _ => None,
        }
    }

    /// Opens a connection and subscribes it to `channels` (already named with
    /// [`Protocol::channel`]); returns once every subscription is confirmed.
    pub async fn connect(
        self,
        t: &Target,
        stream: tokio::net::TcpStream,
        user: &str,
        channels: &[String],
    ) -> anyhow::Result<Conn> {
        if self == Protocol::HoldfastSse {
            let token = crate::client::token_with_channels(&t.secret, user, channels)?;
            let connect = format!("{{\"token\":\"{token}\",\"name\":\"bench\"}}");
            let mut query = String::new();
            for b in connect.bytes() {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    query.push(b as char);
                } else {
                    let _ = write!(query, "%{b:02X}");
                }
            }
            let path = format!("/connection/uni_sse?cf_connect={query}");
            let mut c = Conn::event_stream(stream, &t.host, &path).await?;
            // The connect push lists the server-side subscriptions.
            let (_, p) = c.next().await?.context("closed before connect")?;
            if !contains(p, b"{\"connect\"") {
                bail!("refused: {}", String::from_utf8_lossy(p));
            }
            return Ok(c);
        }
        let mut c =
            Conn::upgrade(stream, &t.host, &self.path(t, channels), self.subprotocol()).await?;
        match self {
            Protocol::HoldfastSse => unreachable!("handled above"),
            Protocol::HoldfastJson => {
                let mut frame = format!(
                    "{{\"id\":1,\"connect\":{{\"token\":\"{}\",\"name\":\"bench\"}}}}",
                    crate::client::token(&t.secret, user)?
                );
                for (i, ch) in channels.iter().enumerate() {
                    let _ = write!(
                        frame,
                        "\n{{\"id\":{},\"subscribe\":{{\"channel\":\"{ch}\"}}}}",
                        i + 2
                    );
                }
                c.send(Op::Text, frame.as_bytes()).await?;
                let mut want = channels.len() + 1;
                while want > 0 {
                    let (_, p) = c.next().await?.context("closed while subscribing")?;
                    for line in p.split(|&b| b == b'\n') {
                        if line.starts_with(b"{\"id\":") {
                            if contains(line, b"\"error\"") {
                                bail!("refused: {}", String::from_utf8_lossy(line));
                            }
                            want -= 1;
                        }
                    }
                }
            }
            Protocol::HoldfastProtobuf => {
                let mut frame = Vec::new();
                let mut connect = Vec::new();
                pb_bytes(
                    &mut connect,
                    1,
                    crate::client::token(&t.secret, user)?.as_bytes(),
                );
                let mut cmd = Vec::new();
                pb_varint_field(&mut cmd, 1, 1);
                pb_bytes(&mut cmd, 4, &connect);
                pb_delimited(&mut frame, &cmd);
                for (i, ch) in channels.iter().enumerate() {
                    let mut sub = Vec::new();
                    pb_bytes(&mut sub, 1, ch.as_bytes());
                    let mut cmd = Vec::new();
                    pb_varint_field(&mut cmd, 1, i as u64 + 2);
                    pb_bytes(&mut cmd, 5, &sub);
                    pb_delimited(&mut frame, &cmd);
                }
                c.send(Op::Binary, &frame).await?;
                let mut want = channels.len() + 1;
                while want > 0 {
                    let (_, p) = c.next().await?.context("closed while subscribing")?;
                    for msg in pb_messages(p)? {
                        let (id, error) = pb_reply_head(msg)?;
                        if error {
                            bail!("refused (protobuf reply {id} has an error)");
                        }
                        if id > 0 {
                            want -= 1;
                        }
                    }
                }
            }
            Protocol::SocketIo => {
                let (_, p) = c.next().await?.context("closed before open")?;
                if !p.starts_with(b"0") {
                    bail!("expected an Engine.IO open packet");
                }
                c.send(Op::Text, b"40").await?;
                loop {
                    let (_, p) = c.next().await?.context("closed before connect")?;
                    if p.starts_with(b"40") {
                        break;
                    }
                    if p.starts_with(b"44") {
                        bail!("connect refused: {}", String::from_utf8_lossy(p));
                    }
                    // socketioxide pings right after the open packet.
                    if p == b"2" {
                        c.send(Op::Text, b"3").await?;
                    }
                }
                let list = serde_json::to_string(channels)?;
                c.send(Op::Text, format!("420[\"join\",{list}]").as_bytes())
                    .await?;
                // socketioxide runs the connect handler as a task: an event that arrives before
                // it registered `join` is dropped (about 1 in 2,000 under a connect storm), so
                // an unanswered join is sent again (joining twice is harmless).
                let mut tries = 1;
                loop {
                    let next = tokio::time::timeout(std::time::Duration::from_secs(2), c.next());
                    let Ok(frame) = next.await else {
                        if tries == 5 {
                            bail!("join not acknowledged");
                        }
                        c.send(Op::Text, format!("42{tries}[\"join\",{list}]").as_bytes())
                            .await?;
                        tries += 1;
                        continue;
                    };
                    let (_, p) = frame?.context("closed while joining")?;
                    if p.starts_with(b"43") {
                        break;
                    }
                    if p == b"2" {
                        c.send(Op::Text, b"3").await?;
                    }
                }
            }
            Protocol::Pusher => {
                let (_, p) = c.next().await?.context("closed before established")?;
                if !contains(p, b"pusher:connection_established") {
                    bail!(
                        "expected connection_established: {}",
                        String::from_utf8_lossy(p)
                    );
                }
                for ch in channels {
                    let m = format!(
                        "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{ch}\"}}}}"
                    );
                    c.send(Op::Text, m.as_bytes()).await?;
                }
                let mut want = channels.len();
                while want > 0 {
                    let (_, p) = c.next().await?.context("closed while subscribing")?;
                    if contains(p, b"subscription_succeeded") {
                        want -= 1;
                    } else if contains(p, b"pusher:error") {
                        bail!("refused: {}", String::from_utf8_lossy(p));
                    }
                }
            }
            Protocol::Text => {
                let (_, p) = c.next().await?.context("closed before ready")?;
                if p != b"ready" {
                    bail!("expected ready: {}", String::from_utf8_lossy(p));
                }
            }
        }
        Ok(c)
    }

    /// The answer to an application-level ping, if `payload` is one.
    pub fn pong(self, op: Op, payload: &[u8]) -> Option<(Op, &'static [u8])> {
        match self {
            Protocol::HoldfastJson if payload.split(|&b| b == b'\n').any(|l| l == b"{}") => {
                Some((Op::Text, b"{}"))
            }
            Protocol::HoldfastProtobuf
                if op == Op::Binary
                    && pb_messages(payload).is_ok_and(|m| m.iter().any(|m| m.is_empty())) =>
            {
                Some((Op::Binary, &[0]))
            }
            Protocol::SocketIo if payload == b"2" => Some((Op::Text, b"3")),
            Protocol::Pusher if contains(payload, b"\"pusher:ping\"") => Some((
                Op::Text,
                b"{\"event\":\"pusher:pong\",\"data\":{}}" as &[u8],
            )),
            _ => None,
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn pb_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn pb_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    pb_varint(out, u64::from(field) << 3);
    pb_varint(out, v);
}

fn pb_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    pb_varint(out, (u64::from(field) << 3) | 2);
    pb_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn pb_delimited(out: &mut Vec<u8>, msg: &[u8]) {
    pb_varint(out, msg.len() as u64);
    out.extend_from_slice(msg);
}

fn read_varint(b: &[u8], i: &mut usize) -> anyhow::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).context("truncated varint")?;
        *i += 1;
        v |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

/// Splits a frame of length-prefixed messages.
fn pb_messages(frame: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < frame.len() {
        let len = usize::try_from(read_varint(frame, &mut i)?)?;
        let end = i.checked_add(len).context("length")?;
        out.push(frame.get(i..end).context("truncated message")?);
        i = end;
    }
    Ok(out)
}

/// A reply's id and whether it carries an error.
fn pb_reply_head(msg: &[u8]) -> anyhow::Result<(u64, bool)> {
    let (mut id, mut error, mut i) = (0, false, 0);
    while i < msg.len() {
        let key = read_varint(msg, &mut i)?;
        match key & 7 {
            0 => {
                let v = read_varint(msg, &mut i)?;
                if key >> 3 == 1 {
                    id = v;
                }
            }
            2 => {
                let len = usize::try_from(read_varint(msg, &mut i)?)?;
                if key >> 3 == 2 {
                    error = true;
                }
                i += len;
            }
            1 => i += 8,
            5 => i += 4,
            w => bail!("wire type {w}"),
        }
    }
    Ok((id, error))
}

/// How publications reach a server.
#[derive(Debug)]
pub enum Publisher {
    /// Holdfast's HTTP API (`/api/batch`, parallel).
    HoldfastApi {
        /// Client.
        http: reqwest::Client,
        /// `http://host:port`.
        base: String,
        /// API key.
        key: String,
    },
    /// Pusher's HTTP events API (one event to up to 100 channels per request).
    PusherApi {
        /// Client.
        http: reqwest::Client,
        /// `http://host:port`.
        base: String,
        /// App id.
        app_id: String,
        /// App key.
        key: String,
        /// App secret.
        secret: String,
    },
    /// A publisher WebSocket.
    Ws(Conn, WsStyle),
}

/// What a publisher connection sends per publication.
#[derive(Debug, Clone, Copy)]
pub enum WsStyle {
    /// Text frames `<channel>\n<payload>` (raw and FastAPI baselines).
    Text,
    /// Socket.IO events `publish(channel, data)`.
    SocketIo,
}

impl Publisher {
    /// Publishes one `payload(t, size)` to each channel in `channels` (already named for the
    /// server), stamped `t`. Returns the number of publications the server accepted.
    pub async fn publish(
        &mut self,
        channels: &[String],
        size: usize,
        t: u64,
    ) -> anyhow::Result<u64> {
        match self {
            Publisher::HoldfastApi { http, base, key } => {
                let mut accepted = 0;
                for chunk in channels.chunks(1000) {
                    let commands: Vec<serde_json::Value> = chunk
                        .iter()
                        .map(|ch| {
                            let data: serde_json::Value =
                                serde_json::from_str(&payload(t, size)).unwrap_or_default();
                            serde_json::json!({"publish": {"channel": ch, "data": data}})
                        })
                        .collect();
                    let body = serde_json::json!({"commands": commands, "parallel": true});
                    let r: serde_json::Value = http
                        .post(format!("{base}/api/batch"))
                        .header("X-API-Key", key.as_str())
                        .json(&body)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let replies = if r["result"].is_object() {
                        &r["result"]["replies"]
                    } else {
                        &r["replies"]
                    };
                    accepted += replies
                        .as_array()
                        .map(|a| a.iter().filter(|x| x.get("error").is_none()).count())
                        .unwrap_or(0) as u64;
                }
                Ok(accepted)
            }
            Publisher::PusherApi {
                http,
                base,
                app_id,
                key,
                secret,
            } => {
                let mut accepted = 0;
                for chunk in channels.chunks(100) {
                    let body = serde_json::json!({
                        "name": "m",
                        "channels": chunk,
                        "data": payload(t, size),
                    })
                    .to_string();
                    let path = format!("/apps/{app_id}/events");
                    let query = pusher_query(&path, key, secret, &body)?;
                    let r = http
                        .post(format!("{base}{path}?{query}"))
                        .header("Content-Type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    if r.status().is_success() {
                        accepted += chunk.len() as u64;
                    } else {
                        let status = r.status();
                        bail!(
                            "pusher publish: {status}: {}",
                            r.text().await.unwrap_or_default()
                        );
                    }
                }
                Ok(accepted)
            }
            Publisher::Ws(c, style) => {
                let mut out = Vec::new();
                for ch in channels {
                    let data = payload(t, size);
                    let msg = match style {
                        WsStyle::Text => format!("{ch}\n{data}"),
                        WsStyle::SocketIo => format!("42[\"publish\",\"{ch}\",{data}]"),
                    };
                    wire::frame_into(&mut out, Op::Text, msg.as_bytes());
                }
                c.send_raw(&out).await?;
                Ok(channels.len() as u64)
            }
        }
    }
}

/// The signed query string of a Pusher HTTP API request.
fn pusher_query(path: &str, key: &str, secret: &str, body: &str) -> anyhow::Result<String> {
    use hmac::{Hmac, Mac};
    use md5::Digest;
    let body_md5 = hex(&md5::Md5::digest(body.as_bytes()));
    let ts = now_us() / 1_000_000;
    let query = format!("auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={body_md5}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let sig = hex(&mac.finalize().into_bytes());
    Ok(format!("{query}&auth_signature={sig}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_carry_one_marker_and_have_the_size() {
        let p = payload(now_us(), 100);
        assert_eq!(p.len(), 100);
        let mut n = 0;
        wire::markers(p.as_bytes(), |_| n += 1);
        assert_eq!(n, 1);
        assert!(serde_json::from_str::<serde_json::Value>(&p).is_ok());
    }

    #[test]
    fn protobuf_reply_heads() {
        // Reply { id: 3, error: { code: 103 } }
        let msg = [0x08, 3, 0x12, 2, 0x08, 103];
        assert_eq!(pb_reply_head(&msg).unwrap(), (3, true));
        let mut frame = Vec::new();
        pb_delimited(&mut frame, &[0x08, 2]);
        pb_delimited(&mut frame, &[]);
        let msgs = pb_messages(&frame).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(pb_reply_head(msgs[0]).unwrap(), (2, false));
    }

    #[test]
    fn pusher_signature_is_hex_sha256() {
        let q = pusher_query("/apps/1/events", "k", "s", "{}").unwrap();
        let sig = q.rsplit("auth_signature=").next().unwrap();
        assert_eq!(sig.len(), 64);
        assert!(q.contains("body_md5=99914b932bd37a50b983c5e7c90ae93b"));
    }
}
