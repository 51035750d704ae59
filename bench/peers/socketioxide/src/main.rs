//! socketioxide peer for holdfast-bench.
//!
//! Usage: `socketioxide-peer <port>` — listens on 127.0.0.1:<port>, path `/socket.io/`.
//!
//! Events on the default namespace:
//! * `join` (rooms: string[], ack) — joins the rooms, acks `"ok"`.
//! * `publish` (channel: string, data: object) — emits `m` with `data` to every socket in the room.

use serde_json::Value;
use socketioxide::{
    SocketIo, TransportType,
    extract::{AckSender, Data, SocketRef},
};

async fn on_join(socket: SocketRef, Data(rooms): Data<Vec<String>>, ack: AckSender) {
    socket.join(rooms);
    let _ = ack.send("ok");
}

async fn on_publish(io: SocketIo, Data((channel, data)): Data<(String, Value)>) {
    // Like `io.to(channel).emit(...)` in Socket.IO: every member of the room, sender included.
    let _ = io.to(channel).emit("m", &data).await;
}

async fn on_connect(socket: SocketRef) {
    socket.on("join", on_join);
    socket.on("publish", on_publish);
}

#[tokio::main]
async fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(port)) => port,
        _ => {
            eprintln!("usage: socketioxide-peer <port>");
            std::process::exit(2);
        }
    };

    let (layer, io) = SocketIo::builder()
        .transports([TransportType::Websocket])
        .build_layer();
    io.ns("/", on_connect);

    let app = axum::Router::new().layer(layer);
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("socketioxide peer: cannot bind 127.0.0.1:{port}: {err}");
            std::process::exit(1);
        }
    };
    eprintln!("socketioxide peer listening on 127.0.0.1:{port}");
    if let Err(err) = axum::serve(listener, app).await {
        eprintln!("socketioxide peer: server error: {err}");
        std::process::exit(1);
    }
}
