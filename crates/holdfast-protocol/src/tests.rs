//! Every frame type against literal wire JSON.

use crate::code::{Disconnect, ErrorReply};
use crate::command::{Request, StreamPosition};
use crate::json::{self, DecodeError};
use crate::reply::*;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

fn one(line: &str) -> Result<crate::Command, DecodeError> {
    json::decode_command(line.as_bytes())
}

fn reply(id: u32, body: ReplyBody) -> String {
    let mut out = Vec::new();
    json::encode_reply(&mut out, id, &body);
    String::from_utf8(out).expect("utf8")
}

fn push(p: Push<'_>) -> String {
    let mut out = Vec::new();
    json::encode_push(&mut out, &p);
    String::from_utf8(out).expect("utf8")
}

#[test]
fn decode_connect() {
    let c = one(r##"{"id":1,"connect":{"token":"t.k.n","name":"js","version":"1.2.3","data":{"a": 1},"subs":{"#42":{"recover":true,"offset":5,"epoch":"xyz"}},"headers":{"x":"y"},"flag":3,"dict":"d"}}"##).expect("decode");
    assert_eq!(c.id, 1);
    let Request::Connect(r) = c.request else {
        panic!("not connect")
    };
    assert_eq!(r.token, "t.k.n");
    assert_eq!(r.name, "js");
    assert_eq!(r.version, "1.2.3");
    assert_eq!(r.data.as_deref(), Some(&b"{\"a\": 1}"[..]));
    let s = &r.subs["#42"];
    assert_eq!(
        (s.channel.as_str(), s.recover, s.offset, s.epoch.as_str()),
        ("#42", true, 5, "xyz")
    );
    assert_eq!(r.headers["x"], "y");
}

#[test]
fn map_subscribe_pages_and_writes_decode() {
    // centrifuge-js sends a stream page's position as `null` before it has one.
    let c = one(r#"{"id":3,"subscribe":{"channel":"m:a","type":1,"phase":1,"flag":1,"limit":2,"offset":null,"epoch":null,"recover":true}}"#).expect("decode");
    let Request::Subscribe(s) = c.request else {
        panic!()
    };
    assert_eq!((s.sub_type, s.phase, s.limit), (1, 1, 2));
    assert_eq!((s.offset, s.epoch.as_str()), (0, ""));
    let c = one(r#"{"id":4,"subscribe":{"channel":"m:a","type":1,"phase":2,"cursor":"k7","offset":9,"epoch":"e"}}"#).expect("decode");
    let Request::Subscribe(s) = c.request else {
        panic!()
    };
    assert_eq!((s.phase, s.cursor.as_str(), s.offset), (2, "k7", 9));
    let c = one(r#"{"id":5,"publish":{"channel":"m:a","type":1,"key":"k","removed":true}}"#)
        .expect("decode");
    let Request::Publish(p) = c.request else {
        panic!()
    };
    assert_eq!((p.pub_type, p.key.as_str(), p.removed), (1, "k", true));
    assert!(p.data.is_empty());
}

#[test]
fn map_replies_carry_state_phase_cursor_and_keys() {
    let entry = |offset, key: &str, removed| {
        Arc::new(Publication {
            offset,
            data: if removed {
                Bytes::new()
            } else {
                Bytes::from_static(b"{\"v\":1}")
            },
            key: key.into(),
            removed,
            ..Default::default()
        })
    };
    let r = SubscribeResult {
        sub_type: 1,
        phase: 2,
        cursor: "b".into(),
        state: vec![entry(1, "a", false), entry(2, "b", false)],
        offset: 2,
        epoch: "e".into(),
        ..Default::default()
    };
    assert_eq!(
        reply(6, ReplyBody::Subscribe(Box::new(r.clone()))),
        r#"{"id":6,"subscribe":{"epoch":"e","offset":2,"type":1,"phase":2,"cursor":"b","state":[{"data":{"v":1},"offset":1,"key":"a"},{"data":{"v":1},"offset":2,"key":"b"}]}}"#
    );
    let live = SubscribeResult {
        sub_type: 1,
        recoverable: true,
        publications: vec![entry(3, "a", true)],
        offset: 3,
        epoch: "e".into(),
        ..Default::default()
    };
    assert_eq!(
        reply(7, ReplyBody::Subscribe(Box::new(live.clone()))),
        r#"{"id":7,"subscribe":{"recoverable":true,"epoch":"e","publications":[{"offset":3,"key":"a","removed":true}],"offset":3,"type":1}}"#,
        "a removal has no data and phase 0 is left out"
    );
    // Protobuf: the same fields at their numbers.
    let mut out = Vec::new();
    crate::Encoding::Protobuf.encode_reply(&mut out, 6, &ReplyBody::Subscribe(Box::new(r)));
    let mut buf = &out[..];
    let len = prost::encoding::decode_varint(&mut buf).expect("len") as usize;
    let decoded = <crate::proto::pb::Reply as prost::Message>::decode(&buf[..len]).expect("reply");
    let s = decoded.subscribe.expect("subscribe");
    assert_eq!((s.r#type, s.phase, s.cursor.as_str()), (1, 2, "b"));
    assert_eq!(s.state.len(), 2);
    assert_eq!((s.state[1].key.as_str(), s.state[1].offset), ("b", 2));
}

#[test]
fn decode_subscribe_ignores_unimplemented_fields() {
    let c = one(r#"{"id":2,"subscribe":{"channel":"chat:index","flag":1,"recover":true,"epoch":"kqXb","offset":12,"positioned":true,"recoverable":true,"join_leave":true,"delta":"fossil","tf":{"op":"eq","key":"a","val":"b"},"type":0,"phase":0,"cursor":"","limit":10,"asc":true,"data":{"x":1}}}"#).expect("decode");
    let Request::Subscribe(s) = c.request else {
        panic!()
    };
    assert_eq!(s.channel, "chat:index");
    assert!(s.recover && s.positioned && s.recoverable && s.join_leave);
    assert_eq!((s.offset, s.epoch.as_str(), s.flag), (12, "kqXb", 1));
    assert_eq!(s.data.as_deref(), Some(&b"{\"x\":1}"[..]));
}

#[test]
fn decode_every_other_command() {
    let cases: Vec<(&str, Request)> = vec![
        (
            r#"{"id":3,"unsubscribe":{"channel":"a"}}"#,
            Request::Unsubscribe {
                channel: "a".into(),
            },
        ),
        (
            r#"{"id":3,"presence":{"channel":"a"}}"#,
            Request::Presence {
                channel: "a".into(),
            },
        ),
        (
            r#"{"id":3,"presence_stats":{"channel":"a"}}"#,
            Request::PresenceStats {
                channel: "a".into(),
            },
        ),
        (
            r#"{"id":3,"refresh":{"token":"tok"}}"#,
            Request::Refresh {
                token: "tok".into(),
            },
        ),
        (
            r#"{"id":3,"sub_refresh":{"channel":"$a","token":"tok","type":0}}"#,
            Request::SubRefresh {
                channel: "$a".into(),
                token: "tok".into(),
            },
        ),
        (
            r#"{"id":3,"rpc":{"method":"getPrice","data":{"object_id":12}}}"#,
            Request::Rpc {
                method: "getPrice".into(),
                data: Bytes::from_static(b"{\"object_id\":12}"),
            },
        ),
        (
            r#"{"send":{"data":{"typing":true}}}"#,
            Request::Send {
                data: Bytes::from_static(b"{\"typing\":true}"),
            },
        ),
        (r#"{}"#, Request::Pong),
        (r#"{"id":0}"#, Request::Pong),
    ];
    for (line, want) in cases {
        assert_eq!(one(line).expect(line).request, want, "{line}");
    }
}

#[test]
fn decode_publish_strips_raw_newlines_from_payload() {
    let c = one("{\"id\":4,\"publish\":{\"channel\":\"c\",\"data\":{\r\"text\":  \"a\\nb\"\r}}}")
        .expect("decode");
    let Request::Publish(p) = c.request else {
        panic!()
    };
    assert_eq!(p.channel, "c");
    assert_eq!(&p.data[..], &b"{\"text\":  \"a\\nb\"}"[..]);
}

#[test]
fn decode_history() {
    let c = one(r#"{"id":6,"history":{"channel":"chat:index","limit":2,"since":{"offset":10,"epoch":"kq"},"reverse":true}}"#).expect("decode");
    let Request::History(h) = c.request else {
        panic!()
    };
    assert_eq!(h.limit, 2);
    assert_eq!(
        h.since,
        Some(StreamPosition {
            offset: 10,
            epoch: "kq".into()
        })
    );
    assert!(h.reverse);
    let c = one(r#"{"id":7,"history":{"channel":"x","limit":-1}}"#).expect("decode");
    let Request::History(h) = c.request else {
        panic!()
    };
    assert_eq!((h.limit, h.since), (-1, None));
}

#[test]
fn decode_batched_frame() {
    let frame = b"{\"id\":12,\"subscribe\":{\"channel\":\"a\"}}\n{\"id\":13,\"subscribe\":{\"channel\":\"b\"}}\n";
    let cmds: Vec<_> = json::decode_frame(frame).expect("frame").collect();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[1].as_ref().expect("second").id, 13);
}

#[test]
fn decode_errors() {
    assert_eq!(
        json::decode_frame(b"").unwrap_err(),
        DecodeError::EmptyFrame
    );
    assert_eq!(
        json::decode_frame(b"\n").unwrap_err(),
        DecodeError::EmptyFrame
    );
    // A second trailing newline is an empty command.
    let cmds: Vec<_> = json::decode_frame(b"{}\n\n").expect("frame").collect();
    assert_eq!(cmds[1], Err(DecodeError::EmptyCommand));
    for bad in [
        r#"{"id":1,"connect":{"token":"#,        // truncated
        r#"{"id":"1","connect":{}}"#,            // wrong type
        r#"{"id":99999999999,"connect":{}}"#,    // id beyond u32
        r#"{"id":-1,"connect":{}}"#,             // negative id
        r#"{"id":1,"subscribe":{"channel":5}}"#, // wrong type in request
        r#"{"id":1,"history":{"channel":"a","since":{"offset":-3}}}"#,
        r#"[1,2,3]"#,
        r#"garbage"#,
    ] {
        assert!(matches!(one(bad), Err(DecodeError::Malformed(_))), "{bad}");
    }
    assert_eq!(one(r#"{"id":5}"#).unwrap_err(), DecodeError::UnknownCommand);
    assert_eq!(
        one(r#"{"id":5,"ping":{}}"#).unwrap_err(),
        DecodeError::UnknownCommand
    );
    assert_eq!(
        one(r#"{"id":5,"frobnicate":{}}"#).unwrap_err(),
        DecodeError::UnknownCommand
    );
    assert_eq!(
        one(r#"{"subscribe":{"channel":"a"}}"#).unwrap_err(),
        DecodeError::MissingId
    );
    assert!(one("{\"id\":1,\"connect\":{\"token\":\"\u{1}\"}}").is_err());
}

fn info(user: &str, client: &str, conn_info: Option<&'static [u8]>) -> ClientInfo {
    ClientInfo {
        user: user.into(),
        client: client.into(),
        conn_info: conn_info.map(Bytes::from_static),
        chan_info: None,
    }
}

#[test]
fn encode_connect_results() {
    let r = ConnectResult {
        client: "9336".into(),
        version: "0.1.0".into(),
        ping: 25,
        pong: true,
        ..Default::default()
    };
    assert_eq!(
        reply(1, ReplyBody::Connect(Box::new(r.clone()))),
        r#"{"id":1,"connect":{"client":"9336","version":"0.1.0","ping":25,"pong":true}}"#
    );
    let mut r2 = r;
    r2.expires = true;
    r2.ttl = 599;
    r2.data = Some(Bytes::from_static(b"{\"hello\":1}"));
    r2.subs = vec![(
        "#42".into(),
        SubscribeResult {
            recoverable: true,
            epoch: "kqXbZtPa".into(),
            offset: 3,
            positioned: true,
            ..Default::default()
        },
    )];
    assert_eq!(
        reply(1, ReplyBody::Connect(Box::new(r2))),
        r##"{"id":1,"connect":{"client":"9336","version":"0.1.0","expires":true,"ttl":599,"data":{"hello":1},"subs":{"#42":{"recoverable":true,"epoch":"kqXbZtPa","offset":3,"positioned":true}},"ping":25,"pong":true}}"##
    );
}

#[test]
fn encode_subscribe_results() {
    assert_eq!(
        reply(2, ReplyBody::Subscribe(Box::default())),
        r#"{"id":2,"subscribe":{}}"#
    );
    let pubs = vec![
        Arc::new(Publication {
            offset: 13,
            data: Bytes::from_static(b"{\"n\":13}"),
            ..Default::default()
        }),
        Arc::new(Publication {
            offset: 14,
            data: Bytes::from_static(b"{\"n\":14}"),
            ..Default::default()
        }),
    ];
    let r = SubscribeResult {
        recoverable: true,
        epoch: "kqXbZtPa".into(),
        publications: pubs,
        recovered: true,
        offset: 12,
        positioned: true,
        was_recovering: true,
        ..Default::default()
    };
    assert_eq!(
        reply(7, ReplyBody::Subscribe(Box::new(r))),
        r#"{"id":7,"subscribe":{"recoverable":true,"epoch":"kqXbZtPa","publications":[{"data":{"n":13},"offset":13},{"data":{"n":14},"offset":14}],"recovered":true,"offset":12,"positioned":true,"was_recovering":true}}"#
    );
}

#[test]
fn encode_simple_results_and_errors() {
    assert_eq!(reply(3, ReplyBody::Publish), r#"{"id":3,"publish":{}}"#);
    assert_eq!(
        reply(11, ReplyBody::Unsubscribe),
        r#"{"id":11,"unsubscribe":{}}"#
    );
    assert_eq!(
        reply(2, ReplyBody::Error(ErrorReply::PERMISSION_DENIED)),
        r#"{"id":2,"error":{"code":103,"message":"permission denied"}}"#
    );
    assert_eq!(
        reply(2, ReplyBody::Error(ErrorReply::INTERNAL)),
        r#"{"id":2,"error":{"code":100,"message":"internal server error","temporary":true}}"#
    );
    assert_eq!(
        reply(
            5,
            ReplyBody::PresenceStats {
                num_clients: 0,
                num_users: 0
            }
        ),
        r#"{"id":5,"presence_stats":{"num_clients":0,"num_users":0}}"#
    );
    assert_eq!(
        reply(4, ReplyBody::Presence(vec![])),
        r#"{"id":4,"presence":{"presence":{}}}"#
    );
    assert_eq!(
        reply(
            4,
            ReplyBody::Presence(vec![Arc::new(info(
                "42",
                "9336",
                Some(b"{\"name\":\"Alex\"}")
            ))])
        ),
        r#"{"id":4,"presence":{"presence":{"9336":{"user":"42","client":"9336","conn_info":{"name":"Alex"}}}}}"#
    );
    assert_eq!(
        reply(
            8,
            ReplyBody::Rpc(Some(Bytes::from_static(b"{\"answer\":\"2019\"}")))
        ),
        r#"{"id":8,"rpc":{"data":{"answer":"2019"}}}"#
    );
    assert_eq!(reply(8, ReplyBody::Rpc(None)), r#"{"id":8,"rpc":{}}"#);
    assert_eq!(
        reply(
            9,
            ReplyBody::Refresh(RefreshResult {
                expires: true,
                ttl: 600
            })
        ),
        r#"{"id":9,"refresh":{"expires":true,"ttl":600}}"#
    );
    assert_eq!(
        reply(
            10,
            ReplyBody::SubRefresh(RefreshResult {
                expires: true,
                ttl: 3600
            })
        ),
        r#"{"id":10,"sub_refresh":{"expires":true,"ttl":3600}}"#
    );
}

#[test]
fn encode_history() {
    let h = HistoryResult {
        publications: vec![],
        epoch: "kq".into(),
        offset: 13,
    };
    assert_eq!(
        reply(7, ReplyBody::History(Box::new(h))),
        r#"{"id":7,"history":{"publications":[],"epoch":"kq","offset":13}}"#
    );
    let mut tags = BTreeMap::new();
    tags.insert("k\"".to_string(), "v".to_string());
    let p = Publication {
        offset: 11,
        data: Bytes::from_static(b"{\"n\":11}"),
        info: Some(Arc::new(info("42", "c1", None))),
        tags: Some(Arc::new(tags)),
        time: 5,
        binary: false,
        delta: false,
        use_delta: false,
        key: String::new(),
        removed: false,
    };
    let h = HistoryResult {
        publications: vec![Arc::new(p)],
        epoch: "kq".into(),
        offset: 13,
    };
    assert_eq!(
        reply(6, ReplyBody::History(Box::new(h))),
        r#"{"id":6,"history":{"publications":[{"data":{"n":11},"info":{"user":"42","client":"c1"},"offset":11,"tags":{"k\"":"v"}}],"epoch":"kq","offset":13}}"#
    );
}

#[test]
fn encode_pushes() {
    let p = Publication {
        offset: 13,
        data: Bytes::from_static(b"{\"text\":\"hello\"}"),
        info: Some(Arc::new(info("42", "9336", None))),
        ..Default::default()
    };
    assert_eq!(
        push(Push::Pub {
            channel: "chat:index",
            publication: &p
        }),
        r#"{"push":{"channel":"chat:index","pub":{"data":{"text":"hello"},"info":{"user":"42","client":"9336"},"offset":13}}}"#
    );
    let anon = info("", "d451", Some(b"{\"name\":\"Alice\"}"));
    assert_eq!(
        push(Push::Join {
            channel: "chat",
            info: &anon
        }),
        r#"{"push":{"channel":"chat","join":{"info":{"user":"","client":"d451","conn_info":{"name":"Alice"}}}}}"#
    );
    assert_eq!(
        push(Push::Leave {
            channel: "chat",
            info: &anon
        }),
        r#"{"push":{"channel":"chat","leave":{"info":{"user":"","client":"d451","conn_info":{"name":"Alice"}}}}}"#
    );
    let r = SubscribeResult {
        recoverable: true,
        epoch: "aBcDeFgH".into(),
        offset: 5,
        positioned: true,
        ..Default::default()
    };
    assert_eq!(
        push(Push::Subscribe {
            channel: "news",
            result: &r
        }),
        r#"{"push":{"channel":"news","subscribe":{"recoverable":true,"epoch":"aBcDeFgH","offset":5,"positioned":true}}}"#
    );
    assert_eq!(
        push(Push::Unsubscribe {
            channel: "news",
            code: 2000,
            reason: "server unsubscribe"
        }),
        r#"{"push":{"channel":"news","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}"#
    );
    assert_eq!(
        push(Push::Message {
            data: b"{\"alert\":\"hi\"}"
        }),
        r#"{"push":{"message":{"data":{"alert":"hi"}}}}"#
    );
    let d = Disconnect::SHUTDOWN;
    assert_eq!(
        push(Push::Disconnect {
            code: d.code,
            reason: &d.reason
        }),
        r#"{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}"#
    );
    assert_eq!(json::PING, b"{}");
}

#[test]
fn string_escaping_round_trips() {
    let nasty = "a\"b\\c\n\r\t\u{1}\u{1f}é🙂";
    let mut out = Vec::new();
    json::write_str(&mut out, nasty);
    let back: String = serde_json::from_slice(&out).expect("valid json");
    assert_eq!(back, nasty);
    assert!(!out.contains(&b'\n'));
}

#[test]
fn every_encoded_message_is_valid_single_line_json() {
    let p = Publication {
        offset: 1,
        data: Bytes::from_static(b"[1,2]"),
        ..Default::default()
    };
    let msgs = [
        reply(
            1,
            ReplyBody::Subscribe(Box::new(SubscribeResult {
                publications: vec![Arc::new(p.clone())],
                ..Default::default()
            })),
        ),
        push(Push::Pub {
            channel: "x\ny",
            publication: &p,
        }),
    ];
    for m in msgs {
        assert!(!m.contains('\n'));
        serde_json::from_str::<serde_json::Value>(&m).expect("valid json");
    }
}

mod protobuf {
    use super::info;
    use crate::Encoding;
    use crate::command::Request;
    use crate::json::DecodeError;
    use crate::proto::{self, pb};
    use crate::reply::*;
    use bytes::Bytes;
    use prost::Message;
    use std::sync::Arc;

    fn frame(cmds: &[pb::Command]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in cmds {
            c.encode_length_delimited(&mut out).expect("encode");
        }
        out
    }

    fn decode_reply(bytes: &[u8]) -> pb::Reply {
        let mut buf = bytes;
        let r = pb::Reply::decode_length_delimited(&mut buf).expect("reply");
        assert!(buf.is_empty(), "exactly one length-prefixed message");
        r
    }

    #[test]
    fn commands_decode_with_their_field_numbers() {
        let f = frame(&[
            pb::Command {
                id: 1,
                connect: Some(pb::ConnectRequest {
                    token: "tok".into(),
                    name: "js".into(),
                    subs: [(
                        "#42".to_string(),
                        pb::SubscribeRequest {
                            recover: true,
                            offset: 5,
                            epoch: "e".into(),
                            ..Default::default()
                        },
                    )]
                    .into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 2,
                subscribe: Some(pb::SubscribeRequest {
                    channel: "c".into(),
                    positioned: true,
                    flag: 2,
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 3,
                publish: Some(pb::PublishRequest {
                    channel: "c".into(),
                    data: Bytes::from_static(&[0, 1, 2]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 4,
                history: Some(pb::HistoryRequest {
                    channel: "c".into(),
                    limit: -1,
                    since: Some(pb::StreamPosition {
                        offset: 3,
                        epoch: "e".into(),
                    }),
                    reverse: true,
                }),
                ..Default::default()
            },
            pb::Command {
                send: Some(pb::SendRequest {
                    data: Bytes::from_static(b"x"),
                }),
                ..Default::default()
            },
            pb::Command::default(),
        ]);
        let cmds: Vec<_> = Encoding::Protobuf
            .decode_frame(&f)
            .expect("frame")
            .collect::<Result<_, _>>()
            .expect("commands");
        let Request::Connect(c) = &cmds[0].request else {
            panic!()
        };
        assert_eq!((c.token.as_str(), c.name.as_str()), ("tok", "js"));
        assert_eq!(
            (c.subs["#42"].channel.as_str(), c.subs["#42"].offset),
            ("#42", 5)
        );
        let Request::Subscribe(s) = &cmds[1].request else {
            panic!()
        };
        assert!(s.positioned && s.flag == 2);
        let Request::Publish(p) = &cmds[2].request else {
            panic!()
        };
        assert_eq!(&p.data[..], &[0, 1, 2]);
        let Request::History(h) = &cmds[3].request else {
            panic!()
        };
        assert_eq!(
            (h.limit, h.since.as_ref().map(|s| s.offset), h.reverse),
            (-1, Some(3), true)
        );
        assert!(matches!(cmds[4].request, Request::Send { .. }));
        assert_eq!(cmds[5].request, Request::Pong, "an empty command is a pong");
    }

    #[test]
    fn bad_protobuf_frames() {
        assert_eq!(
            Encoding::Protobuf.decode_frame(&[]).unwrap_err(),
            DecodeError::EmptyFrame
        );
        let first = |f: &[u8]| {
            Encoding::Protobuf
                .decode_frame(f)
                .expect("frame")
                .next()
                .expect("one")
        };
        assert!(
            matches!(first(&[0x05, 1, 2]), Err(DecodeError::Malformed(_))),
            "length beyond frame"
        );
        assert!(matches!(
            first(&[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(
            matches!(first(&[0x02, 0x08]), Err(DecodeError::Malformed(_))),
            "truncated field"
        );
        let unknown = frame(&[pb::Command {
            id: 9,
            ..Default::default()
        }]);
        assert_eq!(first(&unknown), Err(DecodeError::UnknownCommand));
        let ping = frame(&[pb::Command {
            id: 9,
            ping: Some(pb::PingRequest {}),
            ..Default::default()
        }]);
        assert_eq!(first(&ping), Err(DecodeError::UnknownCommand));
        let no_id = frame(&[pb::Command {
            subscribe: Some(pb::SubscribeRequest::default()),
            ..Default::default()
        }]);
        assert_eq!(first(&no_id), Err(DecodeError::MissingId));
    }

    #[test]
    fn replies_and_pushes_encode_with_their_field_numbers() {
        let p = Publication {
            offset: 7,
            data: Bytes::from_static(&[0xde, 0xad]),
            info: Some(Arc::new(info("42", "c1", Some(b"{}")))),
            ..Default::default()
        };
        let mut out = Vec::new();
        proto::encode_reply(
            &mut out,
            5,
            &ReplyBody::Subscribe(Box::new(SubscribeResult {
                recoverable: true,
                epoch: "e".into(),
                publications: vec![Arc::new(p.clone())],
                recovered: true,
                offset: 6,
                positioned: true,
                was_recovering: true,
                ..Default::default()
            })),
        );
        let r = decode_reply(&out);
        assert_eq!(r.id, 5);
        let s = r.subscribe.expect("subscribe");
        assert!(s.recoverable && s.recovered && s.positioned && s.was_recovering);
        assert_eq!(
            (s.offset, s.epoch.as_str(), s.publications[0].offset),
            (6, "e", 7)
        );
        assert_eq!(&s.publications[0].data[..], &[0xde, 0xad]);
        assert_eq!(s.publications[0].info.as_ref().expect("info").user, "42");

        let mut out = Vec::new();
        proto::encode_push(
            &mut out,
            &Push::Pub {
                channel: "ch",
                publication: &p,
            },
        );
        let push = decode_reply(&out).push.expect("push");
        assert_eq!(push.channel, "ch");
        assert_eq!(push.r#pub.expect("pub").offset, 7);

        let mut out = Vec::new();
        proto::encode_push(
            &mut out,
            &Push::Unsubscribe {
                channel: "ch",
                code: 2500,
                reason: "insufficient state",
            },
        );
        let u = decode_reply(&out)
            .push
            .expect("push")
            .unsubscribe
            .expect("unsub");
        assert_eq!((u.code, u.reason.as_str()), (2500, "insufficient state"));

        let mut out = Vec::new();
        proto::encode_reply(&mut out, 9, &ReplyBody::Error(crate::ErrorReply::INTERNAL));
        let e = decode_reply(&out).error.expect("error");
        assert_eq!((e.code, e.temporary), (100, true));

        let mut out = Vec::new();
        proto::encode_reply(
            &mut out,
            2,
            &ReplyBody::PresenceStats {
                num_clients: 3,
                num_users: 2,
            },
        );
        let ps = decode_reply(&out).presence_stats.expect("stats");
        assert_eq!((ps.num_clients, ps.num_users), (3, 2));

        assert_eq!(
            decode_reply(proto::PING),
            pb::Reply::default(),
            "ping is an empty reply"
        );
    }
}
