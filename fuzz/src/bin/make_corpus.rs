//! Writes the seed corpus (fuzz/corpus/<target>/) from the protocol crate's wire-format tests:
//! every JSON command literal there, and the same kinds of commands in protobuf.
//!
//!   cargo +nightly run --manifest-path fuzz/Cargo.toml --bin make_corpus

use holdfast_protocol::proto::pb;
use prost::Message;
use std::path::Path;

fn json_literals(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("r#\"") {
        rest = &rest[i + 3..];
        let Some(end) = rest.find("\"#") else { break };
        let lit = &rest[..end];
        if lit.starts_with('{') && lit.contains("\"id\"") {
            out.push(lit.to_owned());
        }
        rest = &rest[end + 2..];
    }
    out
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    std::fs::write(dir.join(name), data).expect("write seed");
}

fn cmd(id: u32, f: impl FnOnce(&mut pb::Command)) -> pb::Command {
    let mut c = pb::Command {
        id,
        ..Default::default()
    };
    f(&mut c);
    c
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = std::fs::read_to_string(root.join("../crates/holdfast-protocol/src/tests.rs"))
        .expect("protocol tests");
    let json = json_literals(&tests);
    for (i, lit) in json.iter().enumerate() {
        write(
            &root.join("corpus/json_frame"),
            &format!("test-{i:02}"),
            lit.as_bytes(),
        );
        // session_frame: an even first byte selects JSON.
        let mut s = vec![0u8];
        s.extend_from_slice(lit.as_bytes());
        write(
            &root.join("corpus/session_frame"),
            &format!("json-{i:02}"),
            &s,
        );
    }
    let batch = json.iter().take(6).cloned().collect::<Vec<_>>().join("\n");
    write(&root.join("corpus/json_frame"), "batch", batch.as_bytes());

    let cmds = vec![
        cmd(2, |c| {
            c.subscribe = Some(pb::SubscribeRequest {
                channel: "a".into(),
                recover: true,
                epoch: "e".into(),
                offset: 3,
                ..Default::default()
            })
        }),
        cmd(3, |c| {
            c.publish = Some(pb::PublishRequest {
                channel: "a".into(),
                data: bytes::Bytes::from_static(b"{\"x\":1}"),
                ..Default::default()
            })
        }),
        cmd(12, |c| {
            c.publish = Some(pb::PublishRequest {
                channel: "m:a".into(),
                data: bytes::Bytes::from_static(b"{\"x\":1}"),
                r#type: 1,
                key: "k".into(),
                removed: false,
            })
        }),
        cmd(13, |c| {
            c.subscribe = Some(pb::SubscribeRequest {
                channel: "m:a".into(),
                r#type: 1,
                phase: 2,
                cursor: "k".into(),
                limit: 2,
                offset: 3,
                epoch: "e".into(),
                ..Default::default()
            })
        }),
        cmd(4, |c| {
            c.history = Some(pb::HistoryRequest {
                channel: "a".into(),
                limit: 5,
                ..Default::default()
            })
        }),
        cmd(5, |c| {
            c.presence = Some(pb::PresenceRequest {
                channel: "a".into(),
            })
        }),
        cmd(6, |c| {
            c.presence_stats = Some(pb::PresenceStatsRequest {
                channel: "a".into(),
            })
        }),
        cmd(7, |c| {
            c.unsubscribe = Some(pb::UnsubscribeRequest {
                channel: "a".into(),
            })
        }),
        cmd(8, |c| {
            c.refresh = Some(pb::RefreshRequest { token: "t".into() })
        }),
    ];
    let mut all = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        let mut one = Vec::new();
        c.encode_length_delimited(&mut one).expect("encode");
        write(
            &root.join("corpus/protobuf_frame"),
            &format!("cmd-{i:02}"),
            &one,
        );
        let mut s = vec![1u8];
        s.extend_from_slice(&one);
        write(
            &root.join("corpus/session_frame"),
            &format!("proto-{i:02}"),
            &s,
        );
        all.extend_from_slice(&one);
    }
    write(&root.join("corpus/protobuf_frame"), "batch", &all);
    println!("{} JSON and {} protobuf seeds", json.len(), cmds.len());
}
