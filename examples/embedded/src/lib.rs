//! An application that embeds Holdfast instead of running the `holdfast` binary.
//!
//! Run with: `cargo run -p holdfast-example-embedded` (listens on 127.0.0.1:3000; `PORT` changes
//! it), then connect any Centrifugo client to `ws://127.0.0.1:3000/connection/websocket` and call
//! the RPC methods `echo`, `whoami` or `add` (`{"a":1,"b":2}`), or
//! `curl -X POST localhost:3000/announce -d 'hello'` to publish into `chat:lobby`.
//!
//! The RPC methods are registered once, on the node: a connection holds no handlers, so nothing
//! accumulates however many connect and leave (see `tests/churn.rs`).

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use bytes::Bytes;
use holdfast_core::Node;
use holdfast_core::engine::{Engine, MemoryEngine};
use holdfast_core::handler::{HandlerError, Hooks, RpcMethods, StandardHandler};
use holdfast_core::node::PublishRequest;
use holdfast_protocol::ErrorReply;
use holdfast_transport::{Transport, TransportConfig};
use std::sync::Arc;

fn bad_request() -> HandlerError {
    HandlerError::Reply(ErrorReply::BAD_REQUEST)
}

/// The RPC methods of this application.
pub fn methods() -> RpcMethods {
    RpcMethods::new()
        .on("echo", |_client, data| async move { Ok(Some(data)) })
        .on("whoami", |client, _data| async move {
            let v = serde_json::json!({"user": &*client.user, "client": &*client.client});
            Ok(Some(Bytes::from(v.to_string())))
        })
        .on("add", |_client, data| async move {
            let v: serde_json::Value = serde_json::from_slice(&data).map_err(|_| bad_request())?;
            let (Some(a), Some(b)) = (v["a"].as_f64(), v["b"].as_f64()) else {
                return Err::<Option<Bytes>, HandlerError>(bad_request());
            };
            Ok(Some(Bytes::from(
                serde_json::json!({"sum": a + b}).to_string(),
            )))
        })
}

/// The application: its own routes plus Holdfast's WebSocket endpoint, the node and its RPC
/// methods.
pub fn build() -> anyhow::Result<(Router, Node, Arc<RpcMethods>)> {
    let mut config = holdfast_core::NodeConfig::default();
    // A demo: anonymous connections may do everything. A real application sets token keys.
    config.client.insecure = true;
    config
        .channel
        .namespaces
        .push(holdfast_core::config::ChannelOptions {
            name: "chat".into(),
            history_size: 100,
            history_ttl: std::time::Duration::from_secs(300),
            force_recovery: true,
            ..Default::default()
        });
    // The standard hooks (namespace permissions) with this application's RPC methods in the RPC
    // slot.
    let methods = Arc::new(methods());
    let hooks =
        Hooks::standard(StandardHandler::new(&config.client, None)).with_rpc(methods.clone());
    let node = Node::new(config, Engine::from_one(MemoryEngine::new()), hooks)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The transports alone: no server crate, no engines or HTTP clients it would bring.
    let transport = Transport::new(node.clone(), TransportConfig::default());
    node.start();
    let app = Router::new()
        .route(
            "/",
            get(|| async { "embedded Holdfast: ws://…/connection/websocket, POST /announce\n" }),
        )
        .route("/announce", post(announce))
        .with_state(node.clone())
        .merge(transport.router());
    Ok((app, node, methods))
}

/// Publishes the request body (as a JSON string) into `chat:lobby`.
async fn announce(State(node): State<Node>, body: String) -> String {
    let data = Bytes::from(serde_json::json!({"announcement": body}).to_string());
    match node
        .publish(
            "chat:lobby",
            PublishRequest {
                data,
                ..Default::default()
            },
        )
        .await
    {
        Ok(out) => format!(
            "published at offset {}\n",
            out.position.map_or(0, |p| p.offset)
        ),
        Err(e) => format!("error {e}\n"),
    }
}
