//! HTTP proxies: the application backend decides connects, subscriptions, publications and RPCs,
//! and renews credentials, through JSON POSTs (Centrifugo's proxy protocol). A slow or failing
//! backend fails only the command that needed it (error 100, temporary); in-flight requests per
//! proxy are bounded (error 111 beyond).

use crate::config::ProxyConfig;
use crate::config::{Config, RpcConfig};
use crate::jwt::overrides;
use crate::webhook::Webhooks;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use holdfast_core::channel::{ChannelRules, USER_BOUNDARY, user_limited_allows};
use holdfast_core::config::ChannelOptions;
use holdfast_core::handler::{
    ChannelEvent, ChannelPolicy, ClientContext, ConnectDecision, ConnectEvent, ConnectHook,
    HandlerError, Hooks, PublishDecision, RefreshDecision, RefreshHook, RpcHook, ServerRefresh,
    ServerSubOptions, StandardHandler, SubscribeDecision, SubscribeEvent,
};
use holdfast_protocol::{Disconnect, Encoding, ErrorReply};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// One configured proxy endpoint.
#[derive(Debug)]
pub struct Proxy {
    name: String,
    endpoint: String,
    timeout: std::time::Duration,
    /// Lower-case names of the client headers to forward.
    forward: Vec<String>,
    include_meta: bool,
    static_headers: Vec<(String, String)>,
    in_flight: Arc<tokio::sync::Semaphore>,
    http: reqwest::Client,
    /// Spans for proxy requests (`opentelemetry.proxy`).
    otel: Option<Arc<crate::otel::Otel>>,
}

impl Proxy {
    fn new(
        name: &str,
        cfg: &ProxyConfig,
        http: &reqwest::Client,
        otel: &Option<Arc<crate::otel::Otel>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            otel: otel.clone(),
            name: name.to_owned(),
            endpoint: cfg.endpoint.clone(),
            timeout: cfg.timeout,
            forward: cfg
                .http_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            include_meta: cfg.include_connection_meta,
            static_headers: cfg
                .http
                .static_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight.max(1))),
            http: http.clone(),
        })
    }

    /// POSTs `body`; returns the `result` object, or the backend's error or disconnect. With
    /// OpenTelemetry, the request is a client span whose `traceparent` the backend receives.
    async fn call(
        &self,
        kind: &'static str,
        body: Map<String, Value>,
        ctx_headers: &[(String, String)],
        meta: Option<&Bytes>,
        with_cookie: bool,
    ) -> Result<Map<String, Value>, HandlerError> {
        let Some(otel) = &self.otel else {
            return self
                .request(kind, body, ctx_headers, meta, with_cookie, None)
                .await;
        };
        let mut span = otel.span(
            &format!("holdfast.proxy.{kind}"),
            crate::otel::Kind::Client,
            None,
        );
        span.attr("holdfast.proxy", self.name.clone());
        span.attr("http.request.method", "POST");
        span.attr("url.full", crate::admin::redact_text(&self.endpoint));
        let ctx = span.context;
        let r = self
            .request(kind, body, ctx_headers, meta, with_cookie, Some(ctx))
            .await;
        let error = match &r {
            Ok(_) => None,
            Err(HandlerError::Reply(e)) => {
                span.attr_int("holdfast.error_code", i64::from(e.code));
                Some(e.message.to_string())
            }
            Err(HandlerError::Disconnect(d)) => {
                span.attr_int("holdfast.disconnect_code", i64::from(d.code));
                None
            }
        };
        span.end(otel, error);
        r
    }

    async fn request(
        &self,
        kind: &'static str,
        mut body: Map<String, Value>,
        ctx_headers: &[(String, String)],
        meta: Option<&Bytes>,
        with_cookie: bool,
        trace: Option<crate::otel::Context>,
    ) -> Result<Map<String, Value>, HandlerError> {
        let labels = [("proxy", self.name.clone()), ("kind", kind.to_owned())];
        let Ok(_permit) = self.in_flight.try_acquire() else {
            metrics::counter!(
                "holdfast_proxy_errors_total",
                &[
                    ("proxy", self.name.clone()),
                    ("kind", kind.to_owned()),
                    ("reason", "overloaded".to_owned())
                ]
            )
            .increment(1);
            tracing::warn!(proxy = %self.name, kind, "proxy overloaded: too many requests in flight");
            return Err(ErrorReply::TOO_MANY_REQUESTS.into());
        };
        if self.include_meta
            && let Some(m) = meta
            && let Ok(v) = serde_json::from_slice::<Value>(m)
        {
            body.insert("meta".into(), v);
        }
        let mut req = self
            .http
            .post(&self.endpoint)
            .timeout(self.timeout)
            .json(&body);
        // With a span of its own, the request's trace context is that span's, not a forwarded one.
        let own_trace = |k: &str| trace.is_some() && k.eq_ignore_ascii_case("traceparent");
        for (k, v) in ctx_headers {
            if (self.forward.iter().any(|f| f == k) || (with_cookie && k == "cookie"))
                && !own_trace(k)
            {
                req = req.header(k.as_str(), v.as_str());
            }
        }
        for (k, v) in &self.static_headers {
            if !own_trace(k) {
                req = req.header(k.as_str(), v.as_str());
            }
        }
        if let Some(t) = trace {
            req = req.header("traceparent", t.header());
        }
        let started = Instant::now();
        metrics::gauge!("holdfast_proxy_in_flight", &labels).increment(1.0);
        let res = req.send().await;
        metrics::gauge!("holdfast_proxy_in_flight", &labels).decrement(1.0);
        metrics::histogram!("holdfast_proxy_duration_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("holdfast_proxy_requests_total", &labels).increment(1);
        let fail = |reason: &str| {
            metrics::counter!(
                "holdfast_proxy_errors_total",
                &[
                    ("proxy", self.name.clone()),
                    ("kind", kind.to_owned()),
                    ("reason", reason.to_owned())
                ]
            )
            .increment(1);
            HandlerError::Reply(ErrorReply::INTERNAL)
        };
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                };
                tracing::warn!(proxy = %self.name, kind, endpoint = %self.endpoint, error = %e, "proxy request failed");
                return Err(fail(reason));
            }
        };
        if resp.status() != reqwest::StatusCode::OK {
            tracing::warn!(proxy = %self.name, kind, status = resp.status().as_u16(), "proxy answered with a non-200 status");
            return Err(fail("status"));
        }
        let v: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(proxy = %self.name, kind, error = %e, "proxy answer is not JSON");
                return Err(fail("decode"));
            }
        };
        if let Some(d) = v.get("disconnect") {
            let code = d["code"].as_u64().unwrap_or(0);
            if !(3000..=4999).contains(&code) {
                tracing::warn!(proxy = %self.name, kind, code, "proxy disconnect code outside 3000..4999");
                return Err(fail("decode"));
            }
            let reason = d["reason"].as_str().unwrap_or("").to_owned();
            return Err(Disconnect::new(code as u16, reason).into());
        }
        if let Some(e) = v.get("error") {
            let code = e["code"].as_u64().unwrap_or(0);
            if !(100..=1999).contains(&code) {
                tracing::warn!(proxy = %self.name, kind, code, "proxy error code outside 100..1999");
                return Err(fail("decode"));
            }
            let mut err =
                ErrorReply::new(code as u32, e["message"].as_str().unwrap_or("").to_owned());
            err.temporary = e["temporary"].as_bool().unwrap_or(false);
            return Err(err.into());
        }
        match v.get("result") {
            Some(Value::Object(m)) => Ok(m.clone()),
            None | Some(Value::Null) => Ok(Map::new()),
            Some(_) => Err(fail("decode")),
        }
    }
}

fn base(client: &str, transport: &str, encoding: Encoding) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("client".into(), json!(client));
    m.insert("transport".into(), json!(transport));
    m.insert("protocol".into(), json!(encoding.as_str()));
    m.insert("encoding".into(), json!("json"));
    m
}

fn ctx_base(ctx: &ClientContext) -> Map<String, Value> {
    let mut m = base(&ctx.client, ctx.transport, ctx.encoding);
    m.insert("user".into(), json!(&*ctx.user));
    m
}

/// Puts a payload in a request: JSON as `data`, anything else as `b64data`.
fn put_data(m: &mut Map<String, Value>, data: Option<&Bytes>) {
    let Some(d) = data.filter(|d| !d.is_empty()) else {
        return;
    };
    match serde_json::from_slice::<Value>(d) {
        Ok(v) => {
            m.insert("data".into(), v);
        }
        Err(_) => {
            m.insert(
                "b64data".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(d)),
            );
        }
    }
}

/// Reads `key` (raw JSON) or `b64key` from a result.
fn get_raw(m: &Map<String, Value>, key: &str, b64key: &str) -> Result<Option<Bytes>, HandlerError> {
    if let Some(v) = m.get(key).filter(|v| !v.is_null()) {
        return Ok(serde_json::to_vec(v).ok().map(Bytes::from));
    }
    match m.get(b64key).and_then(Value::as_str) {
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(|b| Some(Bytes::from(b)))
            .map_err(|_| HandlerError::Reply(ErrorReply::INTERNAL)),
        None => Ok(None),
    }
}

fn get_expire_at(m: &Map<String, Value>) -> Option<i64> {
    m.get("expire_at")
        .and_then(Value::as_i64)
        .filter(|&t| t > 0)
}

#[derive(Debug)]
struct RpcRouter {
    routes: Vec<(String, Arc<Proxy>)>,
    without_namespace: Option<Arc<Proxy>>,
    namespaces: HashMap<String, Option<Arc<Proxy>>>,
}

impl RpcRouter {
    /// The proxy for a method: routes first, then the method's RPC namespace.
    fn route(&self, method: &str) -> Option<&Arc<Proxy>> {
        for (pattern, proxy) in &self.routes {
            let hit = match pattern.strip_suffix('*') {
                Some(prefix) => method.starts_with(prefix),
                None => method == pattern,
            };
            if hit {
                return Some(proxy);
            }
        }
        match method.split_once(':') {
            Some((ns, _)) => self.namespaces.get(ns).and_then(Option::as_ref),
            None => self.without_namespace.as_ref(),
        }
    }
}

/// The standalone server's hooks: tokens and namespace rules, with proxies where configured,
/// and lifecycle webhooks.
#[derive(Debug)]
pub struct ProxyHandler {
    standard: StandardHandler,
    connect: Option<Arc<Proxy>>,
    refresh: Option<Arc<Proxy>>,
    subscribe: Option<Arc<Proxy>>,
    publish: Option<Arc<Proxy>>,
    sub_refresh: Option<Arc<Proxy>>,
    named: HashMap<String, Arc<Proxy>>,
    rpc: RpcRouter,
    /// Namespace options, to find a channel's sub_refresh proxy.
    rules: ChannelRules,
}

impl ProxyHandler {
    /// Builds the hooks from configuration.
    pub fn new(
        cfg: &Config,
        standard: StandardHandler,
        otel: Option<Arc<crate::otel::Otel>>,
    ) -> Self {
        let otel = otel.filter(|o| o.proxy);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_default();
        let mk = |name: &str, p: &ProxyConfig| {
            (!p.endpoint.is_empty()).then(|| Proxy::new(name, p, &http, &otel))
        };
        let named: HashMap<String, Arc<Proxy>> = cfg
            .proxies
            .iter()
            .map(|p| (p.name.clone(), Proxy::new(&p.name, p, &http, &otel)))
            .collect();
        let cp = &cfg.client.proxy;
        let chp = &cfg.channel.proxy;
        let RpcConfig {
            proxy,
            without_namespace,
            namespaces,
            routes,
        } = &cfg.rpc;
        let rpc_default = mk("rpc", proxy);
        let pick = |enabled: bool, name: &str| -> Option<Arc<Proxy>> {
            if !enabled {
                None
            } else if name.is_empty() {
                rpc_default.clone()
            } else {
                named.get(name).cloned()
            }
        };
        let rpc = RpcRouter {
            routes: routes
                .iter()
                .filter_map(|r| named.get(&r.proxy).map(|p| (r.method.clone(), p.clone())))
                .collect(),
            without_namespace: pick(
                without_namespace.proxy_enabled,
                &without_namespace.proxy_name,
            ),
            namespaces: namespaces
                .iter()
                .map(|n| (n.name.clone(), pick(n.proxy_enabled, &n.proxy_name)))
                .collect(),
        };
        Self {
            standard,
            connect: mk("connect", &cp.connect).filter(|_| cp.connect.enabled),
            refresh: mk("refresh", &cp.refresh).filter(|_| cp.refresh.enabled),
            subscribe: mk("subscribe", &chp.subscribe),
            publish: mk("publish", &chp.publish),
            sub_refresh: mk("sub_refresh", &chp.sub_refresh),
            named,
            rpc,
            rules: ChannelRules::for_node(&cfg.node_config()),
        }
    }

    /// The lower-case names of the upgrade-request headers some proxy forwards.
    pub fn forwarded_headers(cfg: &Config) -> Vec<String> {
        let mut names: Vec<String> = std::iter::once(&cfg.client.proxy.connect)
            .chain([
                &cfg.client.proxy.refresh,
                &cfg.channel.proxy.subscribe,
                &cfg.channel.proxy.publish,
                &cfg.channel.proxy.sub_refresh,
                &cfg.rpc.proxy,
            ])
            .chain(cfg.proxies.iter())
            .flat_map(|p| p.http_headers.iter().map(|h| h.to_ascii_lowercase()))
            .collect();
        if cfg.client.proxy.connect.enabled {
            names.push("cookie".into());
        }
        names.sort();
        names.dedup();
        names
    }

    fn channel_proxy(
        &self,
        enabled: bool,
        name: &str,
        default: &Option<Arc<Proxy>>,
    ) -> Option<Arc<Proxy>> {
        if !enabled {
            return None;
        }
        if name.is_empty() {
            default.clone()
        } else {
            self.named.get(name).cloned()
        }
    }
}

fn server_refresh(r: &Map<String, Value>) -> Result<ServerRefresh, HandlerError> {
    Ok(ServerRefresh {
        expired: r.get("expired").and_then(Value::as_bool).unwrap_or(false),
        expire_at: get_expire_at(r),
        info: get_raw(r, "info", "b64info")?,
    })
}

#[async_trait]
impl ConnectHook for ProxyHandler {
    async fn on_connecting(&self, ev: &ConnectEvent) -> Result<ConnectDecision, HandlerError> {
        let Some(proxy) = self.connect.as_ref().filter(|_| ev.token.is_empty()) else {
            return self.standard.on_connecting(ev).await;
        };
        let mut body = base(&ev.client, ev.transport, ev.encoding);
        if !ev.name.is_empty() {
            body.insert("name".into(), json!(ev.name));
        }
        if !ev.version.is_empty() {
            body.insert("version".into(), json!(ev.version));
        }
        put_data(&mut body, ev.data.as_ref());
        let r = proxy
            .call("connect", body, &ev.http_headers, None, true)
            .await?;
        let user = match r.get("user") {
            Some(Value::String(u)) => u.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        let mut subs = BTreeMap::new();
        if let Some(Value::Array(chs)) = r.get("channels") {
            for ch in chs.iter().filter_map(Value::as_str) {
                subs.insert(ch.to_owned(), ServerSubOptions::default());
            }
        }
        if let Some(Value::Object(s)) = r.get("subs") {
            for (ch, o) in s {
                let Value::Object(o) = o else { continue };
                subs.insert(
                    ch.clone(),
                    ServerSubOptions {
                        info: get_raw(o, "info", "b64info")?,
                        data: get_raw(o, "data", "b64data")?,
                        overrides: overrides(o.get("override")),
                    },
                );
            }
        }
        Ok(ConnectDecision {
            user,
            info: get_raw(&r, "info", "b64info")?,
            expire_at: get_expire_at(&r),
            subs,
            data: get_raw(&r, "data", "b64data")?,
            meta: r
                .get("meta")
                .filter(|v| !v.is_null())
                .and_then(|v| serde_json::to_vec(v).ok())
                .map(Bytes::from),
        })
    }
}

#[async_trait]
impl ChannelPolicy for ProxyHandler {
    async fn on_subscribe(
        &self,
        client: &ClientContext,
        ev: &SubscribeEvent<'_>,
    ) -> Result<SubscribeDecision, HandlerError> {
        let o = ev.options;
        let user_limited = o.allow_user_limited_channels
            && ev.channel.contains(USER_BOUNDARY)
            && user_limited_allows(ev.channel, &client.user).is_some();
        let proxy = self.channel_proxy(
            o.subscribe_proxy_enabled,
            &o.subscribe_proxy_name,
            &self.subscribe,
        );
        let Some(proxy) = proxy.filter(|_| ev.token.is_empty() && !ev.private && !user_limited)
        else {
            return self.standard.on_subscribe(client, ev).await;
        };
        let mut body = ctx_base(client);
        body.insert("channel".into(), json!(ev.channel));
        put_data(&mut body, ev.data);
        let r = proxy
            .call(
                "subscribe",
                body,
                &client.headers,
                client.meta.as_ref(),
                false,
            )
            .await?;
        Ok(SubscribeDecision {
            info: get_raw(&r, "info", "b64info")?,
            data: get_raw(&r, "data", "b64data")?,
            expire_at: get_expire_at(&r),
            overrides: overrides(r.get("override")),
            filter: match r.get("tf").filter(|v| !v.is_null()) {
                Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                    tracing::warn!(error = %e, "subscribe proxy answered a malformed tf");
                    HandlerError::Reply(ErrorReply::INTERNAL)
                })?),
                None => None,
            },
        })
    }

    async fn on_publish(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
        data: &Bytes,
    ) -> Result<PublishDecision, HandlerError> {
        let o = ev.options;
        let Some(proxy) = self.channel_proxy(
            o.publish_proxy_enabled,
            &o.publish_proxy_name,
            &self.publish,
        ) else {
            return self.standard.on_publish(client, ev, data).await;
        };
        let mut body = ctx_base(client);
        body.insert("channel".into(), json!(ev.channel));
        put_data(&mut body, Some(data));
        let r = proxy
            .call(
                "publish",
                body,
                &client.headers,
                client.meta.as_ref(),
                false,
            )
            .await?;
        Ok(PublishDecision {
            data: get_raw(&r, "data", "b64data")?,
            skip_history: r
                .get("skip_history")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    async fn on_presence(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
    ) -> Result<(), HandlerError> {
        self.standard.on_presence(client, ev).await
    }

    async fn on_history(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
    ) -> Result<(), HandlerError> {
        self.standard.on_history(client, ev).await
    }

    async fn on_sub_refresh(
        &self,
        client: &ClientContext,
        channel: &str,
        token: &str,
    ) -> Result<RefreshDecision, HandlerError> {
        self.standard.on_sub_refresh(client, channel, token).await
    }

    fn refreshes_subscriptions(&self, options: &ChannelOptions) -> bool {
        self.channel_proxy(
            options.sub_refresh_proxy_enabled,
            &options.sub_refresh_proxy_name,
            &self.sub_refresh,
        )
        .is_some()
    }

    async fn on_server_sub_refresh(
        &self,
        client: &ClientContext,
        channel: &str,
    ) -> Result<ServerRefresh, HandlerError> {
        let options = self
            .rules
            .resolve(channel)
            .map_err(HandlerError::Reply)?
            .options;
        let Some(proxy) = self.channel_proxy(
            options.sub_refresh_proxy_enabled,
            &options.sub_refresh_proxy_name,
            &self.sub_refresh,
        ) else {
            return Err(ErrorReply::NOT_AVAILABLE.into());
        };
        let mut body = ctx_base(client);
        body.insert("channel".into(), json!(channel));
        let r = proxy
            .call(
                "sub_refresh",
                body,
                &client.headers,
                client.meta.as_ref(),
                false,
            )
            .await?;
        server_refresh(&r)
    }
}

#[async_trait]
impl RpcHook for ProxyHandler {
    async fn on_rpc(
        &self,
        client: &ClientContext,
        method: &str,
        data: &Bytes,
    ) -> Result<Option<Bytes>, HandlerError> {
        let Some(proxy) = self.rpc.route(method) else {
            return Err(ErrorReply::NOT_AVAILABLE.into());
        };
        let mut body = ctx_base(client);
        body.insert("method".into(), json!(method));
        put_data(&mut body, Some(data));
        let r = proxy
            .call("rpc", body, &client.headers, client.meta.as_ref(), false)
            .await?;
        get_raw(&r, "data", "b64data")
    }
}

#[async_trait]
impl RefreshHook for ProxyHandler {
    async fn on_refresh(
        &self,
        client: &ClientContext,
        token: &str,
    ) -> Result<RefreshDecision, HandlerError> {
        self.standard.on_refresh(client, token).await
    }

    fn refreshes_connections(&self) -> bool {
        self.refresh.is_some()
    }

    async fn on_server_refresh(
        &self,
        client: &ClientContext,
    ) -> Result<ServerRefresh, HandlerError> {
        let Some(proxy) = &self.refresh else {
            return Err(ErrorReply::NOT_AVAILABLE.into());
        };
        let r = proxy
            .call(
                "refresh",
                ctx_base(client),
                &client.headers,
                client.meta.as_ref(),
                false,
            )
            .await?;
        server_refresh(&r)
    }
}

/// The standalone server's hooks: tokens, namespace permissions and proxies in the connect,
/// channel, RPC and refresh slots; lifecycle webhooks when configured.
pub fn hooks(
    cfg: &Config,
    standard: StandardHandler,
    webhooks: Option<Webhooks>,
    otel: Option<Arc<crate::otel::Otel>>,
) -> Hooks {
    let p = Arc::new(ProxyHandler::new(cfg, standard, otel));
    Hooks {
        connect: p.clone(),
        channels: p.clone(),
        rpc: p.clone(),
        refresh: p,
        lifecycle: webhooks.map(|w| Arc::new(w) as Arc<dyn holdfast_core::handler::LifecycleHook>),
    }
}
