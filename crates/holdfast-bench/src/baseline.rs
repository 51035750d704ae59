//! The raw baseline: the least a broadcast server on this stack (tokio + tokio-tungstenite) can
//! do. Subscribers connect to `/ws?channels=a,b` and get `ready`; a publisher connects to `/pub`
//! and sends text frames `<channel>\n<payload>`. Each payload is turned into one shared buffer
//! and queued to every subscriber; a subscriber's writer drains its queue and flushes once per
//! batch. No auth, history, recovery, acknowledgements or metrics: the practical ceiling that
//! Holdfast's features are measured against.

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Messages queued per subscriber before it is dropped as too slow.
const QUEUE: usize = 4096;
/// Messages written per flush at most.
const BATCH: usize = 256;

type Subscribers = Arc<RwLock<HashMap<String, Vec<(u64, mpsc::Sender<Utf8Bytes>)>>>>;

/// Serves on 127.0.0.1:`port` until killed.
pub fn run(port: u16) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The kernel's maximum accept queue, as Holdfast takes (`http_server.listen_backlog`):
        // the baseline is the limit of this stack, not a default a connect storm overflows.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(([127, 0, 0, 1], port).into())?;
        let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let listener = socket.listen(backlog)?;
        let subs: Subscribers = Arc::default();
        let mut next_id = 0u64;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            next_id += 1;
            tokio::spawn(connection(stream, subs.clone(), next_id));
        }
    })
}

#[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
async fn connection(stream: tokio::net::TcpStream, subs: Subscribers, id: u64) {
    let mut path = String::new();
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(64 * 1024);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| {
            path = req.uri().to_string();
            Ok(resp)
        },
        Some(cfg),
    )
    .await;
    let Ok(ws) = ws else { return };
    let (mut sink, mut source) = ws.split();
    if path.starts_with("/pub") {
        while let Some(Ok(msg)) = source.next().await {
            let Message::Text(t) = msg else { continue };
            let Some((channel, payload)) = t.as_str().split_once('\n') else {
                continue;
            };
            let frame = Utf8Bytes::from(payload.to_owned());
            let map = subs.read().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = map.get(channel) {
                for (_, tx) in list {
                    let _ = tx.try_send(frame.clone());
                }
            }
        }
        return;
    }
    let channels: Vec<String> = path
        .split_once("channels=")
        .map(|(_, c)| c.split('&').next().unwrap_or(""))
        .unwrap_or("")
        .split(',')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(QUEUE);
    {
        let mut map = subs.write().unwrap_or_else(|e| e.into_inner());
        for c in &channels {
            map.entry(c.clone()).or_default().push((id, tx.clone()));
        }
    }
    drop(tx);
    let writer = async {
        if sink.send(Message::Text("ready".into())).await.is_err() {
            return;
        }
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            for m in batch.drain(..) {
                if sink.feed(Message::Text(m)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    };
    let reader = async { while let Some(Ok(_)) = source.next().await {} };
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
    let mut map = subs.write().unwrap_or_else(|e| e.into_inner());
    for c in &channels {
        if let Some(list) = map.get_mut(c) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                map.remove(c);
            }
        }
    }
}
