//! The checks every connection request passes before a session starts, whatever its transport:
//! the node is ready, the browser origin is allowed, the connection and rate limits admit the
//! client's address. Refusals are HTTP errors with a JSON body, counted and logged.

use crate::Transport;
use crate::admission::{ConnectionPermit, Refusal};
use crate::websocket::json_error;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use std::net::SocketAddr;

/// A request that may open a connection.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// Its place under the connection limits, held for the connection's life.
    pub(crate) permit: ConnectionPermit,
    /// The request headers the node's hooks may see.
    pub(crate) headers: holdfast_core::transport::Headers,
    /// The client's address (the forwarded one behind trusted proxies).
    pub(crate) ip: Option<std::net::IpAddr>,
}

/// The `Origin` of a request and whether it may connect (`client.allowed_origins`; without
/// patterns, same host only; no `Origin` = not a browser, allowed).
pub(crate) fn origin_ok(app: &Transport, headers: &HeaderMap) -> (Option<String>, bool) {
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let ok = crate::admission::origin_allowed(&app.config.allowed_origins, origin.as_deref(), host);
    (origin, ok)
}

/// Admits a connection request on `transport`, or the response refusing it.
pub(crate) fn admit(
    app: &Transport,
    transport: &'static str,
    headers: &HeaderMap,
    remote: Option<SocketAddr>,
) -> Result<Admitted, Box<Response>> {
    if !app.node.is_ready() {
        return Err(Box::new(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "node is not ready",
        )));
    }
    let peer = remote.map(|r| app.trusted_proxies.client_ip(r.ip(), headers));
    let (origin, ok) = origin_ok(app, headers);
    if !ok {
        metrics::counter!("holdfast_upgrades_refused_total", "reason" => "origin", "transport" => transport)
            .increment(1);
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        tracing::warn!(transport, origin = origin.as_deref().unwrap_or(""), host = host.unwrap_or(""), peer = ?peer, "connection refused: origin not allowed (client.allowed_origins)");
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "origin not allowed",
        )));
    }
    let permit = match app.limits.admit(peer) {
        Ok(p) => p,
        Err(r) => {
            metrics::counter!("holdfast_upgrades_refused_total", "reason" => r.label(), "transport" => transport)
                .increment(1);
            tracing::warn!(transport, peer = ?peer, limit = r.label(), "connection refused: limit reached");
            let status = match r {
                Refusal::Node => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::TOO_MANY_REQUESTS,
            };
            return Err(Box::new(json_error(
                status,
                &format!("connection limit reached ({})", r.label()),
            )));
        }
    };
    // Only the headers some proxy forwards are kept with the connection.
    let kept: holdfast_core::transport::Headers = app
        .config
        .forwarded_headers
        .iter()
        .filter_map(|name| {
            let v = headers.get(name.as_str())?.to_str().ok()?;
            Some((name.clone(), v.to_owned()))
        })
        .collect::<Vec<_>>()
        .into();
    Ok(Admitted {
        permit,
        headers: kept,
        ip: peer,
    })
}
