//! The admin web UI under `/admin`: embedded pages, a password login with signed session tokens
//! (`admin.password`, `admin.secret`), the server API for the pages, the configuration with its
//! secrets redacted and live tracing of one channel or one user.
//!
//! Also the development first page at `/` (only with `client.insecure`).

use crate::server::AppState;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use holdfast_core::trace::{TraceEvent, TraceStream, TraceTarget};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const INDEX: &str = include_str!("../assets/admin/index.html");
const APP_JS: &str = include_str!("../assets/admin/app.js");
const APP_CSS: &str = include_str!("../assets/admin/app.css");
const FIRST_HTML: &str = include_str!("../assets/first/index.html");
const FIRST_JS: &str = include_str!("../assets/first/first.js");
/// The npm `centrifuge` package's `dist/centrifuge.js` (MIT), checked against the installed
/// package by the test command.
const CENTRIFUGE_JS: &str = include_str!("../assets/vendor/centrifuge.js");

/// Content security policy of every page: nothing from elsewhere, no inline code.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// How long a session token is valid.
const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Failed logins from one address within [`LOGIN_WINDOW`] before it is refused for the rest
/// of the window.
const LOGIN_FAILURES: u32 = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered for the login limit at most (the oldest windows are forgotten first).
const LOGIN_TRACKED: usize = 10_000;
/// Traces running at once on this node.
const MAX_TRACES: usize = 8;
/// Bytes of a publication's payload shown in a trace.
const TRACE_DATA: usize = 1024;
/// A trace ends after this (a forgotten tab does not hold a place for ever).
const TRACE_MAX: Duration = Duration::from_secs(3600);

/// The admin UI's state: the login limiter.
#[derive(Debug, Default)]
pub struct AdminState {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AdminState {
    /// Reserves a login attempt for `ip` (counted before the password is compared, so parallel
    /// attempts cannot pass together), or the seconds until it may try again.
    fn attempt(&self, ip: IpAddr) -> Result<(), u64> {
        let key = limit_key(ip);
        let mut f = self.failures.lock();
        let now = Instant::now();
        if let Some((n, since)) = f.get(&key)
            && let Some(left) = LOGIN_WINDOW.checked_sub(now.duration_since(*since))
            && *n >= LOGIN_FAILURES
        {
            return Err(left.as_secs().max(1));
        }
        if f.len() >= LOGIN_TRACKED && !f.contains_key(&key) {
            f.retain(|_, (_, since)| now.duration_since(*since) < LOGIN_WINDOW);
            if f.len() >= LOGIN_TRACKED {
                // Still full: every entry is recent. Forget the oldest half.
                let mut ages: Vec<Instant> = f.values().map(|(_, s)| *s).collect();
                ages.sort();
                let cut = ages[ages.len() / 2];
                f.retain(|_, (_, since)| *since > cut);
            }
        }
        let e = f.entry(key).or_insert((0, now));
        if now.duration_since(e.1) >= LOGIN_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
        Ok(())
    }

    /// A successful login clears its address's count.
    fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().remove(&limit_key(ip));
    }
}

/// The login limit's key: the address, or its /64 for IPv6 (one host owns a whole /64).
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// The admin routes, when `admin` is active.
pub fn router(state: &Arc<AppState>) -> Option<Router> {
    if !state.config.admin.active() {
        return None;
    }
    let r = Router::new()
        .route("/admin", get(|| async { Redirect::permanent("/admin/") }))
        .route("/admin/", asset(INDEX, "text/html; charset=utf-8"))
        .route(
            "/admin/app.js",
            asset(APP_JS, "text/javascript; charset=utf-8"),
        )
        .route("/admin/app.css", asset(APP_CSS, "text/css; charset=utf-8"))
        .route("/admin/settings", get(settings))
        .route("/admin/auth", post(auth))
        .route("/admin/api/{method}", post(api))
        .route("/admin/trace", post(trace))
        .with_state(state.clone());
    Some(r)
}

/// The development first page at `/`, when `client.insecure` is on.
pub fn first_page(state: &AppState) -> Option<Router> {
    if !state.config.client.insecure {
        return None;
    }
    Some(
        Router::new()
            .route("/", asset(FIRST_HTML, "text/html; charset=utf-8"))
            .route(
                "/first.js",
                asset(FIRST_JS, "text/javascript; charset=utf-8"),
            )
            .route(
                "/centrifuge.js",
                asset(CENTRIFUGE_JS, "text/javascript; charset=utf-8"),
            ),
    )
}

/// A GET route answering one embedded file.
fn asset<S: Clone + Send + Sync + 'static>(
    body: &'static str,
    content_type: &'static str,
) -> axum::routing::MethodRouter<S> {
    get(move || async move { page(body, content_type) })
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    secure_headers(r.headers_mut());
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response();
    secure_headers(r.headers_mut());
    r
}

async fn settings(State(app): State<Arc<AppState>>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "insecure": app.config.admin.insecure,
            "version": app.node.version(),
            "node": app.node.name(),
        }),
    )
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    /// Always [`AUDIENCE`]: a connection token signed with the same secret is not a session.
    aud: String,
    exp: u64,
}

const AUDIENCE: &str = "holdfast-admin";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn issue(secret: &str) -> Option<String> {
    let claims = Claims {
        sub: "admin".into(),
        aud: AUDIENCE.into(),
        exp: now_secs() + SESSION_TTL.as_secs(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .ok()
}

/// Whether the request carries a valid session (`Authorization: token <t>`), or the UI is
/// insecure.
fn session_ok(app: &AppState, headers: &HeaderMap) -> bool {
    let cfg = &app.config.admin;
    if cfg.insecure {
        return true;
    }
    let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("token"))
        .map(|(_, t)| t.trim())
    else {
        return false;
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    v.set_audience(&[AUDIENCE]);
    v.leeway = 0;
    jsonwebtoken::decode::<Claims>(
        t,
        &jsonwebtoken::DecodingKey::from_secret(cfg.secret.as_bytes()),
        &v,
    )
    .is_ok_and(|d| d.claims.sub == "admin")
}

fn unauthorized() -> Response {
    metrics::counter!("holdfast_admin_unauthorized_total").increment(1);
    json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({ "error": "unauthorized" }),
    )
}

fn peer_ip(app: &AppState, req: &Request) -> IpAddr {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    app.transport.trusted_proxies.client_ip(peer, req.headers())
}

/// Reads a small JSON body (the API's size limit and read timeout).
async fn read_body(app: &AppState, req: Request) -> Result<Bytes, Response> {
    let limit = app.config.http_api.max_body_size;
    let timeout = app.config.http_api.body_read_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(req.into_body(), limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(json(
            StatusCode::PAYLOAD_TOO_LARGE,
            &serde_json::json!({ "error": "request body too large (http_api.max_body_size)" }),
        )),
        Err(_) => Err(json(
            StatusCode::REQUEST_TIMEOUT,
            &serde_json::json!({ "error": "request body not received in time (http_api.body_read_timeout)" }),
        )),
    }
}

/// Refuses what a page on another site could send without a preflight: admin requests are
/// JSON (`application/json` needs CORS, which is never granted) and not marked cross-site.
fn cross_site(req: &Request) -> Option<Response> {
    let h = req.headers();
    let json_body = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json_body {
        return Some(json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &serde_json::json!({ "error": "admin requests are application/json" }),
        ));
    }
    if h.get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"))
    {
        return Some(json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({ "error": "cross-site admin request refused" }),
        ));
    }
    None
}

/// Compares two secrets in time that depends on neither their content nor their length.
fn same_secret(given: &str, want: &str) -> bool {
    let digest = |s: &str| {
        jsonwebtoken::crypto::sign(
            s.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(b"holdfast-admin-password"),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap_or_default()
    };
    let (a, b) = (digest(given), digest(want));
    !a.is_empty() && crate::api::constant_time_eq(a.as_bytes(), b.as_bytes())
}

async fn auth(State(app): State<Arc<AppState>>, req: Request) -> Response {
    #[derive(Deserialize)]
    struct Login {
        password: String,
    }
    let cfg = &app.config.admin;
    if let Some(r) = cross_site(&req) {
        return r;
    }
    let ip = peer_ip(&app, &req);
    if let Err(wait) = app.admin.attempt(ip) {
        metrics::counter!("holdfast_admin_logins_total", "result" => "limited").increment(1);
        tracing::warn!(%ip, "admin login refused: too many failed attempts");
        let mut r = json(
            StatusCode::TOO_MANY_REQUESTS,
            &serde_json::json!({ "error": format!("too many attempts, retry in {wait} s") }),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return r;
    }
    let body = match read_body(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(login) = serde_json::from_slice::<Login>(&body) else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "expected {\"password\": \"…\"}" }),
        );
    };
    if cfg.insecure {
        return json(StatusCode::OK, &serde_json::json!({ "token": "" }));
    }
    if !same_secret(&login.password, &cfg.password) {
        metrics::counter!("holdfast_admin_logins_total", "result" => "refused").increment(1);
        tracing::warn!(%ip, "admin login refused: bad password");
        return json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({ "error": "bad password" }),
        );
    }
    app.admin.succeeded(ip);
    metrics::counter!("holdfast_admin_logins_total", "result" => "ok").increment(1);
    tracing::info!(%ip, "admin login");
    match issue(&cfg.secret) {
        Some(t) => json(StatusCode::OK, &serde_json::json!({ "token": t })),
        None => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": "cannot sign the session" }),
        ),
    }
}

async fn api(
    State(app): State<Arc<AppState>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    if !session_ok(&app, req.headers()) {
        return unauthorized();
    }
    if let Some(r) = cross_site(&req) {
        return r;
    }
    let body = match read_body(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut r = match method.as_str() {
        "health" => {
            let h = crate::server::health_json(&app);
            json(StatusCode::OK, &serde_json::json!({ "result": h }))
        }
        "config" => json(
            StatusCode::OK,
            &serde_json::json!({ "result": redacted_config(&app.config) }),
        ),
        m => {
            tracing::debug!(method = m, "admin API call");
            crate::api::admin_call(&app, m, &body).await
        }
    };
    secure_headers(r.headers_mut());
    r
}

/// The configuration as JSON with every secret replaced by `********`.
pub fn redacted_config(config: &crate::config::Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).unwrap_or(serde_json::Value::Null);
    redact(&mut v);
    v
}

const HIDDEN: &str = "********";

fn secret_key(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("secret")
        || n.contains("password")
        || n == "key"
        || n == "key_pem"
        || n == "token"
        || (n.ends_with("_key") && !n.contains("public"))
}

/// Maps whose values are credentials whatever their names (header maps: `Authorization`,
/// `X-Api-Key`…), and the free-form sections kept from Centrifugo configs for consumer types
/// Holdfast does not run (their connection strings and key files are not known field by field).
fn secret_map(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    (n.ends_with("headers") && n != "http_headers")
        || matches!(
            n.as_str(),
            "kafka" | "google_pub_sub" | "aws_sqs" | "azure_service_bus"
        )
}

fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if secret_map(k) {
                    hide_all(child);
                } else if secret_key(k) && !matches!(child, serde_json::Value::Object(_)) {
                    if !is_empty(child) {
                        *child = serde_json::Value::String(HIDDEN.into());
                    }
                } else {
                    redact(child);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        serde_json::Value::String(s) => *s = redact_text(s),
        _ => {}
    }
}

/// Every non-empty leaf value of `v` replaced (names kept).
fn hide_all(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => m.values_mut().for_each(hide_all),
        serde_json::Value::Array(a) => a.iter_mut().for_each(hide_all),
        other if !is_empty(other) => *other = serde_json::Value::String(HIDDEN.into()),
        _ => {}
    }
}

fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

/// Query parameters whose values are credentials.
fn secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "token",
        "key",
        "secret",
        "pass",
        "sig",
        "auth",
        "credential",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// Credentials inside addresses and connection strings: the whole userinfo of
/// `scheme://userinfo@host` (a NATS token is the user part), query parameters named like
/// credentials, and libpq's `password=…` (quoted or not).
pub(crate) fn redact_text(s: &str) -> String {
    let mut out = s.to_owned();
    if let Some(scheme) = out.find("://") {
        let rest = scheme + 3;
        let end = out[rest..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..end].rfind('@') {
            out.replace_range(rest..rest + at, HIDDEN);
        }
        if let Some(q) = out.find('?') {
            let query_end = out[q..].find('#').map_or(out.len(), |i| q + i);
            let redacted: Vec<String> = out[q + 1..query_end]
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) if secret_param(k) && !v.is_empty() => format!("{k}={HIDDEN}"),
                    _ => kv.to_owned(),
                })
                .collect();
            out.replace_range(q + 1..query_end, &redacted.join("&"));
        }
        return out;
    }
    // libpq key/value form.
    let lower = out.to_ascii_lowercase();
    if let Some(i) = lower.find("password=") {
        let start = i + "password=".len();
        let end = if out[start..].starts_with('\'') {
            // Quoted: up to the closing quote not escaped by a backslash.
            let b = out.as_bytes();
            let mut j = start + 1;
            while j < b.len() && !(b[j] == b'\'' && b[j - 1] != b'\\') {
                j += 1;
            }
            (j + 1).min(out.len())
        } else {
            out[start..].find(' ').map_or(out.len(), |j| start + j)
        };
        out.replace_range(start..end, HIDDEN);
    }
    out
}

#[derive(Deserialize)]
struct TraceReq {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    user: String,
}

async fn trace(State(app): State<Arc<AppState>>, req: Request) -> Response {
    if !session_ok(&app, req.headers()) {
        return unauthorized();
    }
    if let Some(r) = cross_site(&req) {
        return r;
    }
    let body = match read_body(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let target = match serde_json::from_slice::<TraceReq>(&body) {
        Ok(t) if !t.channel.is_empty() && t.user.is_empty() && t.channel.len() <= 1024 => {
            TraceTarget::Channel(t.channel.into())
        }
        Ok(t) if t.channel.is_empty() && !t.user.is_empty() && t.user.len() <= 1024 => {
            TraceTarget::User(t.user.into())
        }
        _ => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": "expected {\"channel\": \"…\"} or {\"user\": \"…\"}" }),
            );
        }
    };
    let Ok(stream) = app.node.hub().tracer.follow(target, MAX_TRACES) else {
        return json(
            StatusCode::TOO_MANY_REQUESTS,
            &serde_json::json!({ "error": format!("{MAX_TRACES} traces already run on this node") }),
        );
    };
    tracing::info!(target = ?stream.target(), "admin trace started");
    let started = match stream.target() {
        TraceTarget::Channel(c) => {
            serde_json::json!({ "type": "started", "target": { "channel": &**c } })
        }
        TraceTarget::User(u) => {
            serde_json::json!({ "type": "started", "target": { "user": &**u } })
        }
    };
    metrics::gauge!("holdfast_admin_traces").increment(1.0);
    let state = TraceState {
        stream,
        app: app.clone(),
        tick: tokio::time::interval(Duration::from_secs(1)),
        ticks: 0,
        until: Instant::now() + TRACE_MAX,
        first: Some(started),
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        let line = s.next().await?;
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(bytes)), s))
    });
    let mut r = (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response();
    secure_headers(r.headers_mut());
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

struct TraceState {
    stream: TraceStream,
    app: Arc<AppState>,
    tick: tokio::time::Interval,
    ticks: u64,
    until: Instant,
    first: Option<serde_json::Value>,
}

impl Drop for TraceState {
    fn drop(&mut self) {
        metrics::gauge!("holdfast_admin_traces").decrement(1.0);
        tracing::info!(target = ?self.stream.target(), "admin trace ended");
    }
}

impl TraceState {
    /// The next line, or None when the trace ends (node draining).
    async fn next(&mut self) -> Option<serde_json::Value> {
        if let Some(f) = self.first.take() {
            return Some(f);
        }
        loop {
            tokio::select! {
                e = self.stream.recv() => return e.map(|e| event_json(&e)),
                _ = self.tick.tick() => {
                    if self.app.node.is_draining() || Instant::now() >= self.until {
                        return None;
                    }
                    self.ticks += 1;
                    let dropped = self.stream.take_dropped();
                    if dropped > 0 {
                        return Some(serde_json::json!({ "type": "dropped", "count": dropped }));
                    }
                    if self.ticks.is_multiple_of(15) {
                        return Some(serde_json::json!({ "type": "ping" }));
                    }
                }
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn event_json(e: &TraceEvent) -> serde_json::Value {
    use serde_json::json;
    let mut v = match e {
        TraceEvent::Publication {
            channel,
            offset,
            data,
            binary,
        } => {
            let cut = &data[..data.len().min(TRACE_DATA)];
            let text = if *binary {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(cut)
            } else {
                String::from_utf8_lossy(cut).into_owned()
            };
            json!({
                "type": "publication", "channel": &**channel, "offset": offset,
                "data": text, "binary": binary, "truncated": data.len() > TRACE_DATA,
            })
        }
        TraceEvent::Join {
            channel,
            user,
            client,
        } => json!({ "type": "join", "channel": &**channel, "user": &**user, "client": &**client }),
        TraceEvent::Leave {
            channel,
            user,
            client,
        } => {
            json!({ "type": "leave", "channel": &**channel, "user": &**user, "client": &**client })
        }
        TraceEvent::Subscribe {
            channel,
            user,
            client,
        } => {
            json!({ "type": "subscribe", "channel": &**channel, "user": &**user, "client": &**client })
        }
        TraceEvent::Unsubscribe {
            channel,
            user,
            client,
        } => {
            json!({ "type": "unsubscribe", "channel": &**channel, "user": &**user, "client": &**client })
        }
        TraceEvent::Connect {
            user,
            client,
            transport,
            name,
        } => json!({
            "type": "connect", "user": &**user, "client": &**client,
            "transport": transport, "name": name,
        }),
        TraceEvent::Disconnect {
            user,
            client,
            code,
            reason,
        } => json!({
            "type": "disconnect", "user": &**user, "client": &**client,
            "code": code, "reason": reason,
        }),
    };
    v["time"] = now_ms().into();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let mut c = crate::config::Config::default();
        c.client.token.hmac_secret_key = "topsecret".into();
        c.client.token.jwks_public_endpoint = "https://idp/jwks?access_token=jwkstok".into();
        c.http_api.key = "apikey123".into();
        c.admin.password = "pw".into();
        c.admin.secret = "adminsecret".into();
        c.engine.redis.addresses = vec![
            "redis://user:hunter2@redis:6379/0".into(),
            "redis+sentinel://h:26379?sentinel_master_name=m&sentinel_password=sentpw".into(),
        ];
        c.opentelemetry
            .headers
            .insert("Authorization".into(), "Bearer oteltok".into());
        c.webhooks
            .static_headers
            .insert("X-Webhook-Token".into(), "hooktok".into());
        let v = redacted_config(&c);
        let text = v.to_string();
        for s in [
            "topsecret",
            "apikey123",
            "adminsecret",
            "hunter2",
            "\"pw\"",
            "jwkstok",
            "oteltok",
            "hooktok",
            "sentpw",
        ] {
            assert!(!text.contains(s), "{s} leaked: {text}");
        }
        assert_eq!(v["client"]["token"]["hmac_secret_key"], HIDDEN);
        assert_eq!(v["opentelemetry"]["headers"]["Authorization"], HIDDEN);
        assert!(text.contains("redis://********@redis:6379/0"), "{text}");
        assert!(text.contains("sentinel_master_name=m&"), "{text}");
        assert_eq!(
            redact_text("host=db user=app password=s3cret dbname=x"),
            "host=db user=app password=******** dbname=x"
        );
        assert_eq!(
            redact_text("host=db password='a b\\' c' dbname=x"),
            "host=db password=******** dbname=x"
        );
        assert_eq!(
            redact_text("nats://s3cr3ttoken@nats:4222"),
            "nats://********@nats:4222"
        );
        assert_eq!(
            redact_text("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn logins_are_limited_per_address_and_counted_before_the_check() {
        let s = AdminState::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        // Attempts are reserved up front: the sixth is refused even if none has finished.
        for _ in 0..LOGIN_FAILURES {
            assert!(s.attempt(ip).is_ok());
        }
        assert!(s.attempt(ip).is_err());
        assert!(
            s.attempt([10, 0, 0, 2].into()).is_ok(),
            "others are not locked out"
        );
        // One IPv6 host is its /64.
        let a: IpAddr = "2001:db8::1".parse().unwrap_or(ip);
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap_or(ip);
        for _ in 0..LOGIN_FAILURES {
            assert!(s.attempt(a).is_ok());
        }
        assert!(s.attempt(b).is_err(), "the same /64");
        s.succeeded([10, 0, 0, 2].into());
    }
}
