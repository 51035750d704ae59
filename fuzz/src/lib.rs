//! Shared code of the fuzz targets: decoding every command of a frame, and driving one
//! connection of a real node through in-memory frame transports.

use bytes::Bytes;
use holdfast_core::config::{ChannelOptions, NodeConfig};
use holdfast_core::engine::Engine;
use holdfast_core::engine::memory::MemoryEngine;
use holdfast_core::handler::{Hooks, StandardHandler};
use holdfast_core::node::Node;
use holdfast_core::testing::{CallbackSink, ScriptSource};
use holdfast_core::transport::{ConnectionMeta, serve_connection};
use holdfast_protocol::Encoding;
use std::collections::VecDeque;
use std::sync::OnceLock;

/// Decodes every command of a frame, touching each one.
pub fn decode_all(enc: Encoding, data: &[u8]) {
    if let Ok(cmds) = enc.decode_frame(data) {
        for c in cmds.flatten() {
            let _ = c.request.method();
        }
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    node: Node,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut cfg = NodeConfig::default();
        cfg.client.insecure = true;
        cfg.client.channel_limit = 16;
        cfg.channel.without_namespace = ChannelOptions {
            presence: true,
            join_leave: true,
            force_push_join_leave: true,
            history_size: 20,
            history_ttl: std::time::Duration::from_secs(60),
            force_recovery: true,
            ..Default::default()
        };
        let hooks = Hooks::standard(StandardHandler::new(&cfg.client, None));
        let node = rt.block_on(async {
            let node = Node::new(cfg, Engine::from_one(MemoryEngine::new()), hooks)
                .expect("valid fuzz node config");
            node.start();
            node
        });
        World { rt, node }
    })
}

/// A length-prefixed protobuf connect command (anonymous: the node is insecure).
fn proto_connect() -> Bytes {
    use prost::Message;
    let cmd = holdfast_protocol::proto::pb::Command {
        id: 1,
        connect: Some(Default::default()),
        ..Default::default()
    };
    let mut out = Vec::new();
    cmd.encode_length_delimited(&mut out).expect("encode");
    out.into()
}

/// Connects, then feeds `data` as frames.
pub fn run_session(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let enc = if first & 1 == 0 {
        Encoding::Json
    } else {
        Encoding::Protobuf
    };
    let connect = match enc {
        Encoding::Json => Bytes::from_static(br#"{"id":1,"connect":{}}"#),
        Encoding::Protobuf => proto_connect(),
    };
    let mut frames: VecDeque<Bytes> = rest
        .split(|b| *b == 0xff)
        .take(16)
        .map(Bytes::copy_from_slice)
        .collect();
    frames.push_front(connect);
    let w = world();
    let meta = ConnectionMeta {
        transport: "fuzz",
        kind: Default::default(),
        encoding: enc,
        ip: None,
        headers: Vec::new().into(),
    };
    w.rt.block_on(serve_connection(
        w.node.clone(),
        meta,
        ScriptSource::new(frames),
        CallbackSink(|_| {}),
    ));
}
