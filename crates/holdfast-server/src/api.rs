//! The server HTTP API (`POST /api/<method>`), Centrifugo-compatible so `cent` and `curl` users
//! work unchanged: `{"result":…}` or `{"error":…}` envelopes, the three API-key forms, transport
//! error mode, batches.
//!
//! Slightly over 800 lines: one handler per API method, each short, with the envelope and error
//! mapping they share.

use crate::server::AppState;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use bytes::Bytes;
use holdfast_core::handler::ChannelOverride;
use holdfast_core::node::PublishRequest;
use holdfast_core::session::ServerSubscribe;
use holdfast_protocol::json::{
    raw_to_bytes, write_client_info, write_error, write_publication, write_str,
};
use holdfast_protocol::{Disconnect, ErrorReply};
use holdfast_transport::json_error;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Most commands in one batch.
const MAX_BATCH: usize = 1000;
/// Most channels in one broadcast.
const MAX_BROADCAST: usize = 1000;
/// Longest `channels` pattern.
const MAX_PATTERN: usize = 256;

/// API routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api", post(legacy).fallback(method_not_allowed))
        .route("/api/{method}", post(call).fallback(method_not_allowed))
}

async fn method_not_allowed() -> Response {
    json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
}

/// Why an API call failed before or while running.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// A protocol error (envelope `{"error":…}`).
    Reply(ErrorReply),
    /// The body could not be decoded (HTTP 400).
    Decode(String),
}

impl From<ErrorReply> for ApiError {
    fn from(e: ErrorReply) -> Self {
        ApiError::Reply(e)
    }
}

pub(crate) type ApiResult = Result<Vec<u8>, ApiError>;

pub(crate) fn bad(msg: &str) -> ApiError {
    ApiError::Reply(ErrorReply::BAD_REQUEST.with_message(format!("bad request: {msg}")))
}

/// HTTP status of an error in transport error mode.
fn status_of(code: u32) -> StatusCode {
    use holdfast_protocol::code::error_code as c;
    match code {
        c::INTERNAL => StatusCode::INTERNAL_SERVER_ERROR,
        c::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
        c::UNKNOWN_CHANNEL | c::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        c::PERMISSION_DENIED => StatusCode::FORBIDDEN,
        c::ALREADY_SUBSCRIBED | c::CONCURRENT_PAGINATION => StatusCode::CONFLICT,
        c::LIMIT_EXCEEDED | c::TOO_MANY_REQUESTS => StatusCode::TOO_MANY_REQUESTS,
        c::UNRECOVERABLE_POSITION => StatusCode::RANGE_NOT_SATISFIABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn authorized(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let cfg = &state.config.http_api;
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, key) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("apikey")
                .then(|| key.trim().to_owned())
        })
        .or_else(|| {
            query?
                .split('&')
                .find_map(|kv| kv.strip_prefix("api_key=").map(str::to_owned))
        });
    if cfg.insecure {
        return Some(given.unwrap_or_default());
    }
    if cfg.key.is_empty() {
        return None;
    }
    given.filter(|g| constant_time_eq(g.as_bytes(), cfg.key.as_bytes()))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Reads the body within the limit and checks the key; `Err` is the HTTP answer.
async fn admit(state: &AppState, req: Request) -> Result<(Bytes, bool), Response> {
    let (parts, body) = req.into_parts();
    let Some(key) = authorized(state, &parts.headers, parts.uri.query()) else {
        metrics::counter!("holdfast_api_unauthorized_total").increment(1);
        return Err(json_error(StatusCode::UNAUTHORIZED, "unauthorized"));
    };
    if let Some(rl) = &state.api_rate
        && rl.check_key(&key).is_err()
    {
        metrics::counter!("holdfast_limit_rejections_total", "limit" => "api_rate").increment(1);
        tracing::warn!(path = %parts.uri.path(), "API request refused: http_api.rate_limit exceeded");
        return Err(json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "API rate limit exceeded (http_api.rate_limit)",
        ));
    }
    let transport_mode = state.config.http_api.error_mode == crate::config::ErrorMode::Transport
        || parts
            .headers
            .get("x-centrifugo-error-mode")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("transport"));
    let limit = state.config.http_api.max_body_size;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        metrics::counter!("holdfast_limit_rejections_total", "limit" => "api_body_size")
            .increment(1);
        tracing::info!(path = %parts.uri.path(), declared, limit, "API request refused before reading: body over http_api.max_body_size");
        return Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large (http_api.max_body_size)",
        ));
    }
    let timeout = state.config.http_api.body_read_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(Body::new(body), limit)).await {
        Ok(Ok(b)) => Ok((b, transport_mode)),
        Ok(Err(_)) => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large (http_api.max_body_size)",
        )),
        Err(_) => {
            metrics::counter!("holdfast_limit_rejections_total", "limit" => "api_body_timeout")
                .increment(1);
            tracing::info!(path = %parts.uri.path(), "API request cut: body not received within http_api.body_read_timeout");
            Err(json_error(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time (http_api.body_read_timeout)",
            ))
        }
    }
}

fn finish(method: &str, started: Instant, res: ApiResult, transport_mode: bool) -> Response {
    metrics::histogram!("holdfast_api_duration_seconds", "method" => method.to_owned())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("holdfast_api_requests_total", "method" => method.to_owned()).increment(1);
    match res {
        Ok(result) => {
            let mut out = Vec::with_capacity(result.len() + 12);
            out.extend_from_slice(b"{\"result\":");
            out.extend_from_slice(&result);
            out.push(b'}');
            json_response(StatusCode::OK, out)
        }
        Err(ApiError::Decode(msg)) => {
            metrics::counter!("holdfast_api_errors_total", "method" => method.to_owned(), "code" => "400").increment(1);
            json_error(
                StatusCode::BAD_REQUEST,
                &format!("cannot decode request: {msg}"),
            )
        }
        Err(ApiError::Reply(e)) => {
            let failure = ApiFailure {
                code: e.code,
                message: e.message.to_string(),
            };
            let mut r = finish_error(method, e, transport_mode);
            r.extensions_mut().insert(failure);
            r
        }
    }
}

fn finish_error(method: &str, e: ErrorReply, transport_mode: bool) -> Response {
    metrics::counter!("holdfast_api_errors_total", "method" => method.to_owned(), "code" => e.code.to_string()).increment(1);
    tracing::debug!(method, code = e.code, message = %e.message, "API error");
    let mut err = Vec::new();
    write_error(&mut err, &e);
    if transport_mode {
        json_response(status_of(e.code), err)
    } else {
        let mut out = b"{\"error\":".to_vec();
        out.extend_from_slice(&err);
        out.push(b'}');
        json_response(StatusCode::OK, out)
    }
}

/// A server span for an API call, continuing the caller's `traceparent` (`opentelemetry.api`).
fn api_span(state: &AppState, req: &Request) -> Option<crate::otel::SpanGuard> {
    let otel = state.otel.as_ref().filter(|o| o.api)?;
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::otel::Context::parse);
    let mut span = otel.span("holdfast.api", crate::otel::Kind::Server, parent);
    span.attr("http.request.method", req.method().as_str());
    span.attr("url.path", req.uri().path());
    Some(span)
}

/// Ends an API call's span with the method and the outcome.
fn end_span(state: &AppState, span: Option<crate::otel::SpanGuard>, method: &str, resp: &Response) {
    let (Some(mut span), Some(otel)) = (span, state.otel.as_ref()) else {
        return;
    };
    span.attr("rpc.method", method);
    span.attr_int(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    let error = resp
        .extensions()
        .get::<ApiFailure>()
        .map(|f| {
            span.attr_int("holdfast.error_code", i64::from(f.code));
            f.message.clone()
        })
        .or_else(|| (!resp.status().is_success()).then(|| resp.status().to_string()));
    span.end(otel, error);
}

/// What failed in an API call, kept on the response for its span.
#[derive(Debug, Clone)]
struct ApiFailure {
    code: u32,
    message: String,
}

async fn call(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let span = api_span(&state, &req);
    let known = if KNOWN.contains(&method.as_str()) {
        method.clone()
    } else {
        "unknown".to_owned()
    };
    let resp = call_inner(&state, method, req).await;
    end_span(&state, span, &known, &resp);
    resp
}

async fn call_inner(state: &Arc<AppState>, method: String, req: Request) -> Response {
    let state = state.clone();
    let started = Instant::now();
    let (body, transport_mode) = match admit(&state, req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let method = if KNOWN.contains(&method.as_str()) {
        method
    } else {
        "unknown".to_owned()
    };
    let res = if method == "unknown" {
        Err(ApiError::Reply(ErrorReply::METHOD_NOT_FOUND))
    } else {
        execute(&state, &method, &body, true).await
    };
    finish(&method, started, res, transport_mode)
}

/// `POST /api` with `{"method":"publish","params":{…}}` (the older form).
async fn legacy(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let span = api_span(&state, &req);
    let resp = legacy_inner(&state, req).await;
    end_span(&state, span, "legacy", &resp);
    resp
}

async fn legacy_inner(state: &Arc<AppState>, req: Request) -> Response {
    let state = state.clone();
    #[derive(Deserialize)]
    struct Legacy<'a> {
        method: String,
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    let started = Instant::now();
    let (body, transport_mode) = match admit(&state, req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let l: Legacy<'_> = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => {
            return finish(
                "legacy",
                started,
                Err(ApiError::Decode(e.to_string())),
                transport_mode,
            );
        }
    };
    let params = l.params.map_or("{}", RawValue::get);
    let method = if KNOWN.contains(&l.method.as_str()) {
        l.method
    } else {
        "unknown".to_owned()
    };
    let res = if method == "unknown" {
        Err(ApiError::Reply(ErrorReply::METHOD_NOT_FOUND))
    } else {
        execute(&state, &method, params.as_bytes(), true).await
    };
    finish(&method, started, res, transport_mode)
}

const KNOWN: &[&str] = &[
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "refresh",
    "presence",
    "presence_stats",
    "history",
    "history_remove",
    "channels",
    "info",
    "connections",
    "map_publish",
    "map_remove",
    "map_read_state",
    "map_read_stream",
    "map_stats",
    "map_clear",
    "batch",
];

/// Connections listed by one `connections` call at most.
const MAX_CONNECTIONS_LISTED: usize = 1000;
/// Channels listed per connection by `connections` at most.
const MAX_CONNECTION_CHANNELS: usize = 100;

/// Runs a server API method for the admin UI (authenticated by the admin session, not the API
/// key), with the API's metrics and answer shapes.
pub(crate) async fn admin_call(state: &AppState, method: &str, body: &[u8]) -> Response {
    let started = Instant::now();
    if !KNOWN.contains(&method) {
        return finish(
            "unknown",
            started,
            Err(ApiError::Reply(ErrorReply::METHOD_NOT_FOUND)),
            false,
        );
    }
    let res = execute(state, method, body, true).await;
    finish(method, started, res, false)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConnectionsReq {
    user: String,
    expression: String,
}

/// `connections`: this node's connections (of one user, or all up to a cap), as Centrifugo
/// PRO names them, with the address and connect time.
fn connections(state: &AppState, req: &ConnectionsReq) -> ApiResult {
    if !req.expression.is_empty() {
        return Err(bad("expression filters are not supported; filter by user"));
    }
    let hub = state.node.hub();
    let mut clients = if req.user.is_empty() {
        hub.all_clients()
    } else {
        hub.user_clients(&req.user)
    };
    clients.retain(|c| c.details().is_some());
    clients.sort_by(|a, b| a.id().cmp(b.id()));
    clients.truncate(MAX_CONNECTIONS_LISTED);
    let seqs: std::collections::HashSet<u64> = clients
        .iter()
        .map(|c| holdfast_core::hub::Hub::client_seq(c))
        .collect();
    let mut subscribed = hub.channels_of(&seqs, MAX_CONNECTION_CHANNELS);
    let mut out = serde_json::Map::new();
    for c in clients {
        let Some(d) = c.details() else { continue };
        let channels: serde_json::Map<String, serde_json::Value> = subscribed
            .remove(&holdfast_core::hub::Hub::client_seq(&c))
            .unwrap_or_default()
            .into_iter()
            .map(|ch| (ch, serde_json::json!({})))
            .collect();
        let protocol = match c.encoding() {
            holdfast_protocol::Encoding::Json => "json",
            holdfast_protocol::Encoding::Protobuf => "protobuf",
        };
        out.insert(
            c.id().to_owned(),
            serde_json::json!({
                "user": c.user(),
                "transport": d.transport,
                "protocol": protocol,
                "app_name": d.name,
                "app_version": d.version,
                "ip": d.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                "connected_at": d.connected_at,
                "state": { "channels": channels },
            }),
        );
    }
    serde_json::to_vec(&serde_json::json!({ "connections": out }))
        .map_err(|e| ApiError::Reply(ErrorReply::INTERNAL.with_message(e.to_string())))
}

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8], top_level: bool) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        if top_level {
            ApiError::Decode(e.to_string())
        } else {
            bad(&e.to_string())
        }
    })
}

/// Runs one request (a batch or a single method).
async fn execute(state: &AppState, method: &str, body: &[u8], top_level: bool) -> ApiResult {
    if method == "batch" {
        let req: BatchReq<'_> = decode(body, top_level)?;
        return batch(state, &req).await;
    }
    execute_one(state, method, body, top_level).await
}

/// Runs one method other than `batch`. `top_level` decides whether an undecodable body is HTTP
/// 400 (a request) or error 107 (a command inside a batch).
async fn execute_one(state: &AppState, method: &str, body: &[u8], top_level: bool) -> ApiResult {
    match method {
        "publish" => {
            let req: PublishCommon<'_> = decode(body, top_level)?;
            publish(state, &req.channel, &req).await
        }
        "broadcast" => {
            let req: PublishCommon<'_> = decode(body, top_level)?;
            broadcast(state, &req).await
        }
        "subscribe" => {
            let req: SubscribeReq<'_> = decode(body, top_level)?;
            subscribe(state, &req).await
        }
        "unsubscribe" => {
            let req: UserChannelReq = decode(body, top_level)?;
            required(&req.user, "user")?;
            required(&req.channel, "channel")?;
            state.node.rules().resolve(&req.channel)?;
            state
                .node
                .unsubscribe_user(&req.user, &req.channel, opt(&req.client), req.invalidate)
                .await?;
            Ok(b"{}".to_vec())
        }
        "disconnect" => {
            let req: DisconnectReq = decode(body, top_level)?;
            required(&req.user, "user")?;
            let d = match &req.disconnect {
                Some(d) if d.code != 0 => {
                    if !(3000..=4999).contains(&d.code) {
                        return Err(bad("disconnect code must be in 3000..4999"));
                    }
                    Disconnect::new(d.code, d.reason.clone())
                }
                _ => Disconnect::FORCE_DISCONNECT,
            };
            state
                .node
                .disconnect_user(&req.user, opt(&req.client), &req.whitelist, d)
                .await?;
            Ok(b"{}".to_vec())
        }
        "refresh" => {
            let req: RefreshReq<'_> = decode(body, top_level)?;
            required(&req.user, "user")?;
            let info = req.info.map(raw_to_bytes);
            let expire_at = (req.expire_at > 0).then_some(req.expire_at);
            state
                .node
                .refresh_user(&req.user, opt(&req.client), req.expired, expire_at, info)
                .await?;
            Ok(b"{}".to_vec())
        }
        "presence" => {
            let req: ChannelReq = decode(body, top_level)?;
            required(&req.channel, "channel")?;
            let clients = state.node.presence(&req.channel).await?;
            let mut out = b"{\"presence\":{".to_vec();
            for (i, c) in clients.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(&mut out, &c.client);
                out.push(b':');
                write_client_info(&mut out, c);
            }
            out.extend_from_slice(b"}}");
            Ok(out)
        }
        "presence_stats" => {
            let req: ChannelReq = decode(body, top_level)?;
            required(&req.channel, "channel")?;
            let (c, u) = state.node.presence_stats(&req.channel).await?;
            Ok(format!("{{\"num_clients\":{c},\"num_users\":{u}}}").into_bytes())
        }
        "history" => {
            let req: HistoryReq = decode(body, top_level)?;
            required(&req.channel, "channel")?;
            let limit = match req.limit {
                l if l < 0 => None,
                l => Some(l as usize),
            };
            let since = req.since.map(|s| (s.offset, s.epoch));
            let page = state
                .node
                .history(&req.channel, since, limit, req.reverse)
                .await?;
            let mut out = b"{\"publications\":[".to_vec();
            for (i, p) in page.publications.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_api_publication(&mut out, p);
            }
            out.extend_from_slice(b"],\"epoch\":");
            write_str(&mut out, &page.top.epoch);
            out.extend_from_slice(format!(",\"offset\":{}}}", page.top.offset).as_bytes());
            Ok(out)
        }
        "map_publish" | "map_remove" => {
            let req: crate::api_map::MapWriteReq<'_> = decode(body, top_level)?;
            crate::api_map::write(state, &req, method == "map_remove").await
        }
        "map_read_state" => {
            let req: crate::api_map::MapStateReq = decode(body, top_level)?;
            crate::api_map::read_state(state, &req).await
        }
        "map_read_stream" => {
            let req: crate::api_map::MapStreamReq = decode(body, top_level)?;
            crate::api_map::read_stream(state, &req).await
        }
        "map_stats" => {
            let req: crate::api_map::MapChannelReq = decode(body, top_level)?;
            crate::api_map::stats(state, &req).await
        }
        "map_clear" => {
            let req: crate::api_map::MapChannelReq = decode(body, top_level)?;
            crate::api_map::clear(state, &req).await
        }
        "history_remove" => {
            let req: ChannelReq = decode(body, top_level)?;
            required(&req.channel, "channel")?;
            state.node.remove_history(&req.channel).await?;
            Ok(b"{}".to_vec())
        }
        "channels" => {
            let req: ChannelsReq = decode(body, top_level)?;
            if req.pattern.len() > MAX_PATTERN {
                return Err(bad("pattern too long"));
            }
            let pattern = if req.pattern.is_empty() {
                "*"
            } else {
                req.pattern.as_str()
            };
            let chans = state
                .node
                .channels(pattern, |ch| glob_match(pattern.as_bytes(), ch.as_bytes()))
                .await;
            let mut out = b"{\"channels\":{".to_vec();
            for (i, (ch, n)) in chans.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(&mut out, ch);
                out.extend_from_slice(format!(":{{\"num_clients\":{n}}}").as_bytes());
            }
            out.extend_from_slice(b"}}");
            Ok(out)
        }
        "connections" => {
            let req: ConnectionsReq = decode(body, top_level)?;
            connections(state, &req)
        }
        "info" => {
            let nodes = state.node.nodes();
            let mut out = b"{\"nodes\":[".to_vec();
            for (i, n) in nodes.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"uid\":");
                write_str(&mut out, &n.uid);
                out.extend_from_slice(b",\"name\":");
                write_str(&mut out, &n.name);
                out.extend_from_slice(b",\"version\":");
                write_str(&mut out, &n.version);
                out.extend_from_slice(
                    format!(
                        ",\"num_clients\":{},\"num_users\":{},\"num_channels\":{},\"uptime\":{},\"num_subs\":{}}}",
                        n.num_clients, n.num_users, n.num_channels, n.uptime, n.num_subs,
                    )
                    .as_bytes(),
                );
            }
            out.extend_from_slice(b"]}");
            Ok(out)
        }
        _ => Err(ApiError::Reply(ErrorReply::METHOD_NOT_FOUND)),
    }
}

/// A publication in an API result; binary data goes as `b64data` (what Centrifugo API clients
/// expect), since raw bytes cannot be embedded in JSON.
pub(crate) fn write_api_publication(out: &mut Vec<u8>, p: &holdfast_protocol::Publication) {
    if !p.binary {
        write_publication(out, p);
        return;
    }
    let shown = holdfast_protocol::Publication {
        data: Bytes::new(),
        binary: false,
        ..p.clone()
    };
    let start = out.len();
    write_publication(out, &shown);
    // Reopen the object to add the field.
    if out.len() > start && out.last() == Some(&b'}') {
        out.pop();
        if out.len() > start + 1 {
            out.push(b',');
        }
        out.extend_from_slice(b"\"b64data\":");
        write_str(
            out,
            &base64::engine::general_purpose::STANDARD.encode(&p.data),
        );
        out.push(b'}');
    }
}

pub(crate) fn required(v: &str, name: &str) -> Result<(), ApiError> {
    if v.is_empty() {
        Err(bad(&format!("{name} required")))
    } else {
        Ok(())
    }
}

fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Fields of `publish` and `broadcast` (one struct: borrowed raw payloads cannot go through
/// `#[serde(flatten)]`).
#[derive(Deserialize)]
struct PublishCommon<'a> {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    b64data: String,
    #[serde(default)]
    skip_history: bool,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    delta: bool,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    version_epoch: String,
}

/// The payload and whether it is binary (not JSON).
fn payload(common: &PublishCommon<'_>) -> Result<(Bytes, bool), ApiError> {
    if let Some(d) = common.data.filter(|d| d.get() != "null") {
        return Ok((raw_to_bytes(d), false));
    }
    if !common.b64data.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&common.b64data)
            .map_err(|_| bad("b64data is not base64"))?;
        // Binary payloads reach protobuf connections; JSON ones are closed with 3506.
        let binary = !holdfast_protocol::json::is_json(&raw);
        return Ok((Bytes::from(raw), binary));
    }
    Err(bad("data required"))
}

async fn publish(state: &AppState, channel: &str, common: &PublishCommon<'_>) -> ApiResult {
    required(channel, "channel")?;
    if common.idempotency_key.len() > 256 {
        return Err(bad("idempotency_key too long"));
    }
    if common.version_epoch.len() > 64 {
        return Err(bad("version_epoch too long"));
    }
    let (data, binary) = payload(common)?;
    let req = PublishRequest {
        data,
        binary,
        info: None,
        skip_history: common.skip_history,
        tags: (!common.tags.is_empty()).then(|| Arc::new(common.tags.clone())),
        idempotency_key: opt(&common.idempotency_key).map(str::to_owned),
        delta: common.delta,
        version: common.version,
        version_epoch: common.version_epoch.clone(),
    };
    let out = state.node.publish(channel, req).await?;
    // `suppressed` (a Holdfast addition) tells a latest-state publisher its version was stale;
    // the position is then the channel's current one. An idempotent repeat answers exactly as
    // the first publish did (as Centrifugo).
    Ok(match out.position {
        Some(p) => {
            let mut o = format!("{{\"offset\":{},\"epoch\":", p.offset).into_bytes();
            write_str(&mut o, &p.epoch);
            if out.stale {
                o.extend_from_slice(b",\"suppressed\":true");
            }
            o.push(b'}');
            o
        }
        None => b"{}".to_vec(),
    })
}

/// What a broadcast must have before any channel is published to.
fn check_broadcast(req: &PublishCommon<'_>) -> Result<(), ApiError> {
    if req.channels.is_empty() {
        return Err(bad("channels required"));
    }
    if req.channels.len() > MAX_BROADCAST {
        return Err(bad("too many channels"));
    }
    payload(req).map(|_| ())
}

async fn broadcast(state: &AppState, req: &PublishCommon<'_>) -> ApiResult {
    check_broadcast(req)?;
    let mut out = b"{\"responses\":[".to_vec();
    for (i, ch) in req.channels.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        envelope(&mut out, publish(state, ch, req).await, "result");
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// Appends `{"<key>":result}` or `{"error":…}`.
fn envelope(out: &mut Vec<u8>, res: ApiResult, key: &str) {
    match res {
        Ok(r) => {
            out.push(b'{');
            write_str(out, key);
            out.push(b':');
            out.extend_from_slice(&r);
            out.push(b'}');
        }
        Err(ApiError::Reply(e)) => {
            out.extend_from_slice(b"{\"error\":");
            write_error(out, &e);
            out.push(b'}');
        }
        Err(ApiError::Decode(m)) => {
            out.extend_from_slice(b"{\"error\":");
            write_error(
                out,
                &ErrorReply::BAD_REQUEST.with_message(format!("bad request: {m}")),
            );
            out.push(b'}');
        }
    }
}

#[derive(Deserialize)]
struct Position {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize, Default)]
struct BoolValue {
    #[serde(default)]
    value: bool,
}

#[derive(Deserialize, Default)]
struct OverrideReq {
    presence: Option<BoolValue>,
    join_leave: Option<BoolValue>,
    force_push_join_leave: Option<BoolValue>,
    force_recovery: Option<BoolValue>,
    force_positioning: Option<BoolValue>,
}

#[derive(Deserialize)]
struct SubscribeReq<'a> {
    #[serde(default)]
    user: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    client: String,
    #[serde(borrow, default)]
    info: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    recover_since: Option<Position>,
    #[serde(default, rename = "override")]
    overrides: Option<OverrideReq>,
}

async fn subscribe(state: &AppState, req: &SubscribeReq<'_>) -> ApiResult {
    required(&req.user, "user")?;
    required(&req.channel, "channel")?;
    let o = req.overrides.as_ref();
    let ov =
        |f: fn(&OverrideReq) -> &Option<BoolValue>| o.and_then(|o| f(o).as_ref().map(|b| b.value));
    let sub = ServerSubscribe {
        channel: req.channel.clone(),
        info: req.info.filter(|r| r.get() != "null").map(raw_to_bytes),
        data: req.data.filter(|r| r.get() != "null").map(raw_to_bytes),
        recover_since: req
            .recover_since
            .as_ref()
            .map(|p| (p.offset, p.epoch.clone())),
        overrides: ChannelOverride {
            presence: ov(|o| &o.presence),
            join_leave: ov(|o| &o.join_leave),
            force_push_join_leave: ov(|o| &o.force_push_join_leave),
            force_recovery: ov(|o| &o.force_recovery),
            force_positioning: ov(|o| &o.force_positioning),
        },
    };
    state
        .node
        .subscribe_user(&req.user, opt(&req.client), sub)
        .await?;
    Ok(b"{}".to_vec())
}

#[derive(Deserialize)]
struct UserChannelReq {
    #[serde(default)]
    user: String,
    #[serde(default)]
    channel: String,
    #[serde(default)]
    client: String,
    /// Holdfast extension of `unsubscribe`: state invalidation (code 2502).
    #[serde(default)]
    invalidate: bool,
}

#[derive(Deserialize)]
struct DisconnectObj {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct DisconnectReq {
    #[serde(default)]
    user: String,
    #[serde(default)]
    client: String,
    #[serde(default)]
    whitelist: Vec<String>,
    #[serde(default)]
    disconnect: Option<DisconnectObj>,
}

#[derive(Deserialize)]
struct RefreshReq<'a> {
    #[serde(default)]
    user: String,
    #[serde(default)]
    client: String,
    #[serde(default)]
    expired: bool,
    #[serde(default)]
    expire_at: i64,
    #[serde(borrow, default)]
    info: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChannelReq {
    #[serde(default)]
    channel: String,
}

#[derive(Deserialize)]
struct HistoryReq {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    limit: i64,
    #[serde(default)]
    since: Option<Position>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
struct ChannelsReq {
    #[serde(default)]
    pattern: String,
}

#[derive(Deserialize)]
struct BatchReq<'a> {
    #[serde(borrow, default)]
    commands: Vec<BTreeMap<String, &'a RawValue>>,
    #[serde(default)]
    parallel: bool,
}

async fn batch(state: &AppState, req: &BatchReq<'_>) -> ApiResult {
    if req.commands.len() > MAX_BATCH {
        return Err(bad("too many commands in batch"));
    }
    let results: Vec<(String, ApiResult)> = if req.parallel {
        futures_util::future::join_all(req.commands.iter().map(|c| batch_command(state, c))).await
    } else {
        let mut v = Vec::with_capacity(req.commands.len());
        for c in &req.commands {
            v.push(batch_command(state, c).await);
        }
        v
    };
    let mut out = b"{\"replies\":[".to_vec();
    for (i, (m, r)) in results.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        envelope(&mut out, r, &m);
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// One command of a batch: `{"<method>": params}`.
async fn batch_command(state: &AppState, cmd: &BTreeMap<String, &RawValue>) -> (String, ApiResult) {
    let mut it = cmd.iter();
    match (it.next(), it.next()) {
        (Some((m, params)), None) if KNOWN.contains(&m.as_str()) && m != "batch" => (
            m.clone(),
            execute_one(state, m, params.get().as_bytes(), false).await,
        ),
        (Some((m, _)), None) => (
            m.clone(),
            Err(ApiError::Reply(ErrorReply::METHOD_NOT_FOUND)),
        ),
        _ => (String::new(), Err(bad("a command has exactly one method"))),
    }
}

/// What a consumer does with a command it ran.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Stored (or nothing to store): acknowledge the source.
    Done,
    /// A temporary failure (engine unavailable, overloaded): try again later, do not skip.
    Retry(String),
    /// The command can never succeed (undecodable, unknown method or channel, refused).
    Poison(String),
}

/// Runs one server API command from a consumer through the API's path. `key` names the
/// command's source position (`<consumer>:<partition>:<row id>`, a stream id, a JetStream
/// sequence): a publication without its own idempotency key gets it (a batch's `i`-th command
/// `key:i`), so running the command again after a crash between storing and acknowledging
/// stores nothing twice.
pub(crate) async fn apply(state: &AppState, method: &str, payload: &[u8], key: &str) -> Applied {
    if !KNOWN.contains(&method) || method == "info" {
        let shown: String = method.chars().take(64).collect();
        return Applied::Poison(format!("unknown method {shown:?}"));
    }
    let res = if method == "batch" {
        match decode::<BatchReq<'_>>(payload, false) {
            Ok(req) if req.commands.len() > MAX_BATCH => Err(bad("too many commands in batch")),
            Ok(req) => {
                let mut first_err = None;
                for (i, cmd) in req.commands.iter().enumerate() {
                    let mut it = cmd.iter();
                    let r = match (it.next(), it.next()) {
                        (Some((m, p)), None) if m != "batch" => {
                            Box::pin(apply(state, m, p.get().as_bytes(), &format!("{key}:{i}")))
                                .await
                        }
                        _ => Applied::Poison(format!("command {i}: not one method")),
                    };
                    // A retry wins over a poison: the batch is run again, its stored commands
                    // answer from their idempotency keys.
                    match r {
                        Applied::Done => {}
                        Applied::Retry(_) => return r,
                        Applied::Poison(m) => {
                            first_err.get_or_insert(format!("command {i}: {m}"));
                        }
                    }
                }
                return first_err.map_or(Applied::Done, Applied::Poison);
            }
            Err(e) => Err(e),
        }
    } else if method == "publish" || method == "broadcast" {
        match decode::<PublishCommon<'_>>(payload, false) {
            Ok(mut req) => {
                if req.idempotency_key.is_empty() {
                    req.idempotency_key = key.to_owned();
                }
                if method == "publish" {
                    publish(state, &req.channel, &req).await
                } else {
                    broadcast_checked(state, &req).await
                }
            }
            Err(e) => Err(e),
        }
    } else if method == "map_publish" || method == "map_remove" {
        match decode::<crate::api_map::MapWriteReq<'_>>(payload, false) {
            Ok(mut req) => {
                if req.idempotency_key.is_empty() {
                    req.idempotency_key = key.to_owned();
                }
                crate::api_map::write(state, &req, method == "map_remove").await
            }
            Err(e) => Err(e),
        }
    } else {
        execute_one(state, method, payload, false).await
    };
    match res {
        Ok(_) => Applied::Done,
        Err(ApiError::Reply(e)) if e.temporary => {
            Applied::Retry(format!("{} ({})", e.message, e.code))
        }
        Err(ApiError::Reply(e)) => Applied::Poison(format!("{} ({})", e.message, e.code)),
        Err(ApiError::Decode(m)) => Applied::Poison(format!("cannot decode: {m}")),
    }
}

/// A broadcast whose per-channel errors count: the first temporary one, else the first one.
async fn broadcast_checked(state: &AppState, req: &PublishCommon<'_>) -> ApiResult {
    check_broadcast(req)?;
    let mut failed = None;
    for ch in &req.channels {
        match publish(state, ch, req).await {
            Ok(_) => {}
            Err(ApiError::Reply(e)) if e.temporary => {
                return Err(ApiError::Reply(e));
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(Vec::new()), Err)
}

pub use holdfast_core::glob::glob_match;

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("*", "anything"));
        assert!(m("chat:*", "chat:room"));
        assert!(!m("chat:*", "news"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("user#[0-9]*", "user#42"));
        assert!(!m("user#[!0-9]*", "user#42"));
        assert!(m("*:*:end", "a:b:end"));
        assert!(m("\\*", "*"));
        assert!(!m("\\*", "x"));
        assert!(m("", ""));
        assert!(!m("", "x"));
    }
}
