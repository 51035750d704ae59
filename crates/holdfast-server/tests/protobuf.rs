//! The protobuf encoding: subprotocol and query selection, binary payloads, mixed encodings.

#![allow(clippy::unwrap_used)]

mod common;
use bytes::Bytes;
use common::*;
use holdfast_protocol::proto::pb;
use serde_json::json;

const CFG: &str = r#"
[client]
ping_interval = "1s"
pong_timeout = "500ms"
[channel.without_namespace]
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
history_size = 10
history_ttl = "60s"
force_recovery = true
allow_history_for_subscriber = true
"#;

fn connect_cmd(user: &str) -> pb::Command {
    pb::Command {
        connect: Some(pb::ConnectRequest {
            token: token(user, None, json!({})),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn subscribe_cmd(ch: &str) -> pb::Command {
    pb::Command {
        subscribe: Some(pb::SubscribeRequest {
            channel: ch.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn protobuf_session_with_binary_payloads_and_mixed_encodings() {
    let srv = TestServer::start(config_from(CFG)).await;
    let mut p = ProtoClient::connect(&srv.ws_url(), true).await;
    let r = p.call(connect_cmd("p")).await;
    let c = r.connect.expect("connect result");
    assert_eq!(c.client.len(), 36);
    assert!(c.pong);
    let r = p.call(subscribe_cmd("bin")).await;
    let s = r.subscribe.expect("subscribe result");
    assert!(s.recoverable && s.positioned);
    // A JSON client subscribes too.
    let (mut j, _) = srv.connected("j").await;
    j.call("subscribe", json!({"channel": "bin"})).await;
    // JSON publications reach protobuf subscribers as their JSON bytes.
    publish(&srv, "bin", json!({"hello": "proto"})).await;
    let push = p.next().await.push.expect("push");
    assert_eq!(&push.r#pub.expect("pub").data[..], br#"{"hello":"proto"}"#);
    assert_eq!(j.push().await["pub"]["data"], json!({"hello": "proto"}));
    // A binary publication from the protobuf client: protobuf gets the bytes, JSON gets 3506.
    let payload = Bytes::from_static(&[0, 159, 146, 150, 255]);
    let r = p
        .call(pb::Command {
            publish: Some(pb::PublishRequest {
                channel: "bin".into(),
                data: payload.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert!(r.publish.is_some(), "{r:?}");
    let pubn = p.next().await.push.expect("push").r#pub.expect("pub");
    assert_eq!((pubn.data, pubn.offset), (payload, 2));
    assert_eq!(pubn.info.expect("publisher info").user, "p");
    assert_eq!(
        j.closed().await,
        Closed::Code(3506, "inappropriate protocol".into())
    );
    // History with the binary publication: fine for protobuf.
    let r = p
        .call(pb::Command {
            history: Some(pb::HistoryRequest {
                channel: "bin".into(),
                limit: -1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.history.expect("history").publications.len(), 2);
    // The API shows the binary one as b64data.
    let h = api(&srv, "history", json!({"channel": "bin", "limit": -1})).await;
    assert_eq!(h["result"]["publications"][1]["b64data"], "AJ+Slv8=", "{h}");
    // A JSON client recovering into the binary publication is closed too.
    let (mut j2, _) = srv.connected("j2").await;
    j2.send(
        "subscribe",
        json!({"channel": "bin", "recover": true, "offset": 0, "epoch": ""}),
    )
    .await;
    assert_eq!(
        j2.closed().await,
        Closed::Code(3506, "inappropriate protocol".into())
    );
    // Ping is an empty reply; the pong is an empty command.
    p.auto_pong = false;
    loop {
        let r = p.next().await;
        if r == pb::Reply::default() {
            break;
        }
    }
    p.send(pb::Command::default()).await;
    let r = p
        .call(pb::Command {
            presence_stats: Some(pb::PresenceStatsRequest {
                channel: "bin".into(),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(
        r.error.expect("presence is off").code,
        108,
        "still connected after ping/pong"
    );
    srv.stop().await;
}

#[tokio::test]
async fn format_query_selects_protobuf() {
    let srv = TestServer::start(config_from(CFG)).await;
    let mut p = ProtoClient::connect(&format!("{}?format=protobuf", srv.ws_url()), false).await;
    assert!(p.call(connect_cmd("q")).await.connect.is_some());
    srv.stop().await;
}

#[tokio::test]
async fn malformed_protobuf_closes_with_3501() {
    let srv = TestServer::start(config_from(CFG)).await;
    for frame in [
        vec![0x05, 1, 2],
        vec![0x03, 0xff, 0xff, 0xff],
        vec![0x02, 0x08],
    ] {
        let mut p = ProtoClient::connect(&srv.ws_url(), true).await;
        use futures_util::SinkExt;
        p.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
            frame.into(),
        ))
        .await
        .unwrap();
        assert_eq!(p.closed().await, Closed::Code(3501, "bad request".into()));
    }
    srv.stop().await;
}
