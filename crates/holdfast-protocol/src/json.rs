//! JSON encoding of the client protocol.
//!
//! Decoding borrows payloads from the frame and copies each once into [`Bytes`]; encoding writes
//! straight into a byte buffer with the protocol's omission rules (zero values are not written,
//! except the fields the reference encoder always writes). Payloads are embedded as raw JSON.

use crate::code::ErrorReply;
use crate::command::{
    Command, ConnectRequest, FilterNode, HistoryRequest, PublishRequest, Request, StreamPosition,
    SubscribeRequest,
};
use crate::reply::{ClientInfo, ConnectResult, Publication, Push, ReplyBody, SubscribeResult};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Why a frame or command could not be decoded. Every variant closes the connection with 3501.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame held no command.
    #[error("empty frame")]
    EmptyFrame,
    /// An empty line between commands.
    #[error("empty command")]
    EmptyCommand,
    /// Not JSON, or a field of the wrong type.
    #[error("malformed command: {0}")]
    Malformed(String),
    /// A command with an id but no request field, or an unsupported request.
    #[error("unknown command")]
    UnknownCommand,
    /// `id` missing for a command that needs one.
    #[error("command id required")]
    MissingId,
    /// Binary data where JSON is required.
    #[error("frame is not valid UTF-8 JSON")]
    NotUtf8,
}

/// Splits a JSON frame into commands (one per line; one trailing newline allowed).
pub fn decode_frame(frame: &[u8]) -> Result<CommandIter<'_>, DecodeError> {
    let body = frame.strip_suffix(b"\n").unwrap_or(frame);
    if body.is_empty() {
        return Err(DecodeError::EmptyFrame);
    }
    Ok(CommandIter { rest: Some(body) })
}

/// Iterator over the commands of one frame, decoded lazily so that earlier commands are
/// processed before a later one fails.
#[derive(Debug)]
pub struct CommandIter<'a> {
    rest: Option<&'a [u8]>,
}

impl Iterator for CommandIter<'_> {
    type Item = Result<Command, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest?;
        let line = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.rest = Some(&rest[i + 1..]);
                &rest[..i]
            }
            None => {
                self.rest = None;
                rest
            }
        };
        Some(decode_command(line))
    }
}

/// Decodes one command (one line).
pub fn decode_command(line: &[u8]) -> Result<Command, DecodeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::EmptyCommand);
    }
    let wire: WireCommand<'_> =
        serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    wire.into_command()
}

/// Copies a raw JSON value into owned bytes, dropping raw CR/LF (only possible as whitespace in
/// valid JSON) so the value can never break the newline framing.
pub fn raw_to_bytes(raw: &RawValue) -> Bytes {
    let s = raw.get().as_bytes();
    if s.iter().any(|&b| b == b'\n' || b == b'\r') {
        Bytes::from(
            s.iter()
                .copied()
                .filter(|&b| b != b'\n' && b != b'\r')
                .collect::<Vec<u8>>(),
        )
    } else {
        Bytes::copy_from_slice(s)
    }
}

fn opt_raw(raw: Option<&RawValue>) -> Option<Bytes> {
    raw.filter(|r| r.get() != "null").map(raw_to_bytes)
}

fn raw_or_empty(raw: Option<&RawValue>) -> Bytes {
    opt_raw(raw).unwrap_or_default()
}

#[derive(Deserialize)]
struct WireCommand<'a> {
    #[serde(default)]
    id: u32,
    #[serde(borrow, default)]
    connect: Option<WireConnect<'a>>,
    #[serde(borrow, default)]
    subscribe: Option<WireSubscribe<'a>>,
    #[serde(default)]
    unsubscribe: Option<WireChannel>,
    #[serde(borrow, default)]
    publish: Option<WirePublish<'a>>,
    #[serde(default)]
    presence: Option<WireChannel>,
    #[serde(default)]
    presence_stats: Option<WireChannel>,
    #[serde(default)]
    history: Option<WireHistory>,
    #[serde(default)]
    ping: Option<IgnoredAny>,
    #[serde(borrow, default)]
    send: Option<WireData<'a>>,
    #[serde(borrow, default)]
    rpc: Option<WireRpc<'a>>,
    #[serde(default)]
    refresh: Option<WireToken>,
    #[serde(default)]
    sub_refresh: Option<WireSubRefresh>,
}

impl WireCommand<'_> {
    fn into_command(self) -> Result<Command, DecodeError> {
        let id = self.id;
        let request = if let Some(c) = self.connect {
            Request::Connect(c.into_request())
        } else if let Some(s) = self.subscribe {
            Request::Subscribe(s.into_request())
        } else if let Some(u) = self.unsubscribe {
            Request::Unsubscribe { channel: u.channel }
        } else if let Some(p) = self.publish {
            Request::Publish(PublishRequest {
                channel: p.channel,
                data: raw_or_empty(p.data),
                pub_type: p.r#type,
                key: p.key,
                removed: p.removed,
            })
        } else if let Some(p) = self.presence {
            Request::Presence { channel: p.channel }
        } else if let Some(p) = self.presence_stats {
            Request::PresenceStats { channel: p.channel }
        } else if let Some(h) = self.history {
            Request::History(HistoryRequest {
                channel: h.channel,
                limit: h.limit,
                since: h.since.map(|s| StreamPosition {
                    offset: s.offset,
                    epoch: s.epoch,
                }),
                reverse: h.reverse,
            })
        } else if self.ping.is_some() {
            // Clients never send `ping`; the reference server closes with bad request.
            return Err(DecodeError::UnknownCommand);
        } else if let Some(s) = self.send {
            return Ok(Command {
                id,
                request: Request::Send {
                    data: raw_or_empty(s.data),
                },
            });
        } else if let Some(r) = self.rpc {
            Request::Rpc {
                method: r.method,
                data: raw_or_empty(r.data),
            }
        } else if let Some(r) = self.refresh {
            Request::Refresh { token: r.token }
        } else if let Some(r) = self.sub_refresh {
            Request::SubRefresh {
                channel: r.channel,
                token: r.token,
            }
        } else if id == 0 {
            return Ok(Command {
                id,
                request: Request::Pong,
            });
        } else {
            return Err(DecodeError::UnknownCommand);
        };
        if id == 0 {
            return Err(DecodeError::MissingId);
        }
        Ok(Command { id, request })
    }
}

#[derive(Deserialize)]
struct WireConnect<'a> {
    #[serde(default)]
    token: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subs: BTreeMap<String, WireSubscribe<'a>>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

impl WireConnect<'_> {
    fn into_request(self) -> ConnectRequest {
        ConnectRequest {
            token: self.token,
            data: opt_raw(self.data),
            subs: self
                .subs
                .into_iter()
                .map(|(ch, s)| {
                    let mut r = s.into_request();
                    if r.channel.is_empty() {
                        r.channel.clone_from(&ch);
                    }
                    (ch, r)
                })
                .collect(),
            name: self.name,
            version: self.version,
            headers: self.headers,
        }
    }
}

/// A field that may also be `null` (centrifuge-js sends `"offset":null` in map stream pages).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct WireSubscribe<'a> {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    recover: bool,
    #[serde(default, deserialize_with = "nullable")]
    epoch: String,
    #[serde(default, deserialize_with = "nullable")]
    offset: u64,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    positioned: bool,
    #[serde(default)]
    recoverable: bool,
    #[serde(default)]
    join_leave: bool,
    #[serde(default)]
    flag: i64,
    #[serde(default)]
    delta: String,
    #[serde(default)]
    tf: Option<FilterNode>,
    #[serde(default)]
    r#type: i32,
    #[serde(default)]
    phase: i32,
    #[serde(default, deserialize_with = "nullable")]
    cursor: String,
    #[serde(default)]
    limit: i32,
}

impl WireSubscribe<'_> {
    fn into_request(self) -> SubscribeRequest {
        SubscribeRequest {
            channel: self.channel,
            token: self.token,
            recover: self.recover,
            epoch: self.epoch,
            offset: self.offset,
            data: opt_raw(self.data),
            positioned: self.positioned,
            recoverable: self.recoverable,
            join_leave: self.join_leave,
            flag: self.flag,
            delta: self.delta,
            tf: self.tf,
            sub_type: self.r#type,
            phase: self.phase,
            cursor: self.cursor,
            limit: self.limit,
        }
    }
}

#[derive(Deserialize)]
struct WireChannel {
    #[serde(default)]
    channel: String,
}

#[derive(Deserialize)]
struct WirePublish<'a> {
    #[serde(default)]
    channel: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    r#type: i32,
    #[serde(default)]
    key: String,
    #[serde(default)]
    removed: bool,
}

#[derive(Deserialize)]
struct WirePosition {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize)]
struct WireHistory {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    limit: i32,
    #[serde(default)]
    since: Option<WirePosition>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
struct WireData<'a> {
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireRpc<'a> {
    #[serde(default)]
    method: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireToken {
    #[serde(default)]
    token: String,
}

#[derive(Deserialize)]
struct WireSubRefresh {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    token: String,
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends a raw JSON value, dropping raw CR/LF (whitespace in valid JSON) so it cannot break
/// the newline framing. Values from JSON ingress have none; protobuf ingress may.
fn write_raw(out: &mut Vec<u8>, v: &[u8]) {
    if v.iter().any(|&b| b == b'\n' || b == b'\r') {
        out.extend(v.iter().copied().filter(|&b| b != b'\n' && b != b'\r'));
    } else {
        out.extend_from_slice(v);
    }
}

/// The server ping, an empty reply.
pub const PING: &[u8] = b"{}";

/// Appends a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes the fields of one JSON object, placing commas.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    fn key(&mut self, k: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// A key that needs escaping (channel names, client ids, tag names).
    fn dyn_key(&mut self, k: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_str(self.out, k);
        self.out.push(b':');
        self.out
    }

    fn str(&mut self, k: &str, v: &str) {
        if !v.is_empty() {
            let out = self.key(k);
            write_str(out, v);
        }
    }

    fn str_always(&mut self, k: &str, v: &str) {
        let out = self.key(k);
        write_str(out, v);
    }

    fn u64(&mut self, k: &str, v: u64) {
        if v != 0 {
            self.u64_always(k, v);
        }
    }

    fn u64_always(&mut self, k: &str, v: u64) {
        let out = self.key(k);
        out.extend_from_slice(v.to_string().as_bytes());
    }

    fn i64(&mut self, k: &str, v: i64) {
        if v != 0 {
            let out = self.key(k);
            out.extend_from_slice(v.to_string().as_bytes());
        }
    }

    fn bool(&mut self, k: &str, v: bool) {
        if v {
            self.key(k).extend_from_slice(b"true");
        }
    }

    fn raw(&mut self, k: &str, v: Option<&[u8]>) {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            write_raw(self.key(k), v);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Appends a client info object.
pub fn write_client_info(out: &mut Vec<u8>, info: &ClientInfo) {
    let mut o = Obj::new(out);
    o.str_always("user", &info.user);
    o.str_always("client", &info.client);
    o.raw("conn_info", info.conn_info.as_deref());
    o.raw("chan_info", info.chan_info.as_deref());
    o.end();
}

/// Appends a publication object.
pub fn write_publication(out: &mut Vec<u8>, p: &Publication) {
    let mut o = Obj::new(out);
    o.raw("data", Some(&p.data));
    if let Some(info) = &p.info {
        write_client_info(o.key("info"), info);
    }
    o.u64("offset", p.offset);
    o.bool("delta", p.delta);
    if let Some(tags) = p.tags.as_ref().filter(|t| !t.is_empty()) {
        let out = o.key("tags");
        let mut t = Obj::new(out);
        for (k, v) in tags.iter() {
            write_str(t.dyn_key(k), v);
        }
        t.end();
    }
    o.str("key", &p.key);
    o.bool("removed", p.removed);
    o.end();
}

fn write_publications(out: &mut Vec<u8>, pubs: &[std::sync::Arc<Publication>]) {
    out.push(b'[');
    for (i, p) in pubs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_publication(out, p);
    }
    out.push(b']');
}

fn write_subscribe_result(out: &mut Vec<u8>, r: &SubscribeResult) {
    let mut o = Obj::new(out);
    o.bool("expires", r.expires);
    o.u64("ttl", u64::from(r.ttl));
    o.bool("recoverable", r.recoverable);
    o.str("epoch", &r.epoch);
    if !r.publications.is_empty() {
        write_publications(o.key("publications"), &r.publications);
    }
    o.bool("recovered", r.recovered);
    o.u64("offset", r.offset);
    o.bool("positioned", r.positioned);
    o.raw("data", r.data.as_deref());
    o.bool("was_recovering", r.was_recovering);
    o.bool("delta", r.delta);
    o.i64("id", r.id);
    o.i64("type", i64::from(r.sub_type));
    o.i64("phase", i64::from(r.phase));
    o.str("cursor", &r.cursor);
    if !r.state.is_empty() {
        write_publications(o.key("state"), &r.state);
    }
    o.u64("publish_debounce", u64::from(r.publish_debounce));
    o.end();
}

fn write_connect_result(out: &mut Vec<u8>, r: &ConnectResult) {
    let mut o = Obj::new(out);
    o.str("client", &r.client);
    o.str("version", &r.version);
    o.bool("expires", r.expires);
    o.u64("ttl", u64::from(r.ttl));
    o.raw("data", r.data.as_deref());
    if !r.subs.is_empty() {
        let mut subs = Obj::new(o.key("subs"));
        for (ch, s) in &r.subs {
            write_subscribe_result(subs.dyn_key(ch), s);
        }
        subs.end();
    }
    o.u64("ping", u64::from(r.ping));
    o.bool("pong", r.pong);
    o.str("session", &r.session);
    o.str("node", &r.node);
    o.i64("time", r.time);
    o.end();
}

/// Appends the JSON error object.
pub fn write_error(out: &mut Vec<u8>, e: &ErrorReply) {
    let mut o = Obj::new(out);
    o.u64_always("code", u64::from(e.code));
    o.str("message", &e.message);
    o.bool("temporary", e.temporary);
    o.end();
}

/// Appends one reply: `{"id":N,"<method>":{...}}` or `{"id":N,"error":{...}}`.
pub fn encode_reply(out: &mut Vec<u8>, id: u32, body: &ReplyBody) {
    let mut o = Obj::new(out);
    o.u64("id", u64::from(id));
    match body {
        ReplyBody::Error(e) => write_error(o.key("error"), e),
        ReplyBody::Connect(r) => write_connect_result(o.key("connect"), r),
        ReplyBody::Subscribe(r) => write_subscribe_result(o.key("subscribe"), r),
        ReplyBody::Unsubscribe => o.key("unsubscribe").extend_from_slice(b"{}"),
        ReplyBody::Publish => o.key("publish").extend_from_slice(b"{}"),
        ReplyBody::Presence(clients) => {
            let out = o.key("presence");
            out.extend_from_slice(b"{\"presence\":");
            let mut p = Obj::new(out);
            for c in clients {
                write_client_info(p.dyn_key(&c.client), c);
            }
            p.end();
            out.push(b'}');
        }
        ReplyBody::PresenceStats {
            num_clients,
            num_users,
        } => {
            let mut r = Obj::new(o.key("presence_stats"));
            r.u64_always("num_clients", u64::from(*num_clients));
            r.u64_always("num_users", u64::from(*num_users));
            r.end();
        }
        ReplyBody::History(h) => {
            let out = o.key("history");
            out.extend_from_slice(b"{\"publications\":");
            write_publications(out, &h.publications);
            if !h.epoch.is_empty() {
                out.extend_from_slice(b",\"epoch\":");
                write_str(out, &h.epoch);
            }
            if h.offset != 0 {
                out.extend_from_slice(b",\"offset\":");
                out.extend_from_slice(h.offset.to_string().as_bytes());
            }
            out.push(b'}');
        }
        ReplyBody::Rpc(data) => {
            let mut r = Obj::new(o.key("rpc"));
            r.raw("data", data.as_deref());
            r.end();
        }
        ReplyBody::Refresh(r) | ReplyBody::SubRefresh(r) => {
            let key = if matches!(body, ReplyBody::Refresh(_)) {
                "refresh"
            } else {
                "sub_refresh"
            };
            let mut x = Obj::new(o.key(key));
            x.bool("expires", r.expires);
            x.u64("ttl", u64::from(r.ttl));
            x.end();
        }
    }
    o.end();
}

/// Appends one push: `{"push":{"channel":"c","pub":{...}}}`.
pub fn encode_push(out: &mut Vec<u8>, push: &Push<'_>) {
    encode_push_id(out, push, 0);
}

/// Appends one push; with `id` > 0 (channel compaction) a publication, join or leave names its
/// subscription by `id` instead of `channel`. Other pushes always carry the channel (clients look
/// them up by name).
pub fn encode_push_id(out: &mut Vec<u8>, push: &Push<'_>, id: i64) {
    out.extend_from_slice(b"{\"push\":");
    let mut o = Obj::new(out);
    let target = |o: &mut Obj<'_>, channel: &str| {
        if id > 0 {
            o.i64("id", id);
        } else {
            o.str("channel", channel);
        }
    };
    match push {
        Push::Pub {
            channel,
            publication,
        } => {
            target(&mut o, channel);
            write_publication(o.key("pub"), publication);
        }
        Push::Join { channel, info } => {
            target(&mut o, channel);
            let out = o.key("join");
            out.extend_from_slice(b"{\"info\":");
            write_client_info(out, info);
            out.push(b'}');
        }
        Push::Leave { channel, info } => {
            target(&mut o, channel);
            let out = o.key("leave");
            out.extend_from_slice(b"{\"info\":");
            write_client_info(out, info);
            out.push(b'}');
        }
        Push::Unsubscribe {
            channel,
            code,
            reason,
        } => {
            o.str("channel", channel);
            let mut u = Obj::new(o.key("unsubscribe"));
            u.u64("code", u64::from(*code));
            u.str("reason", reason);
            u.end();
        }
        Push::Subscribe { channel, result } => {
            o.str("channel", channel);
            let mut s = Obj::new(o.key("subscribe"));
            s.bool("recoverable", result.recoverable);
            s.str("epoch", &result.epoch);
            s.u64("offset", result.offset);
            s.bool("positioned", result.positioned);
            s.raw("data", result.data.as_deref());
            s.end();
        }
        Push::Message { data } => {
            let mut m = Obj::new(o.key("message"));
            m.raw("data", Some(data));
            m.end();
        }
        Push::Disconnect { code, reason } => {
            let mut d = Obj::new(o.key("disconnect"));
            d.u64("code", u64::from(*code));
            d.str("reason", reason);
            d.end();
        }
    }
    o.end();
    out.push(b'}');
}

/// A push as unidirectional transports send it: without the `{"push":…}` envelope
/// (`{"channel":"c","pub":{…}}`). Anything else (a reply, the `{}` ping) is returned as it is.
/// No copy: the result shares the message's buffer.
pub fn unwrap_push(msg: &Bytes) -> Bytes {
    const PREFIX: &[u8] = b"{\"push\":";
    if msg.len() > PREFIX.len() && msg.starts_with(PREFIX) && msg.ends_with(b"}") {
        msg.slice(PREFIX.len()..msg.len() - 1)
    } else {
        msg.clone()
    }
}

/// Checks that a payload is one valid JSON value (what a JSON subscriber can receive).
pub fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<IgnoredAny>(data).is_ok()
}
