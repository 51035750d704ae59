//! What is stored in Redis and sent over its pub/sub: publications and client infos as protobuf
//! (prost), pub/sub messages as `<kind><offset>:<epoch>:<payload>`.

use bytes::Bytes;
use holdfast_protocol::{ClientInfo, Publication};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, PartialEq, Message)]
struct StoredInfo {
    #[prost(string, tag = "1")]
    user: String,
    #[prost(string, tag = "2")]
    client: String,
    #[prost(bytes = "bytes", optional, tag = "3")]
    conn_info: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "4")]
    chan_info: Option<Bytes>,
}

#[derive(Clone, PartialEq, Message)]
struct StoredPub {
    #[prost(bytes = "bytes", tag = "1")]
    data: Bytes,
    #[prost(message, optional, tag = "2")]
    info: Option<StoredInfo>,
    #[prost(btree_map = "string, string", tag = "3")]
    tags: BTreeMap<String, String>,
    #[prost(int64, tag = "4")]
    time: i64,
    #[prost(bool, tag = "5")]
    binary: bool,
    /// The publisher allows a delta (other nodes' fan-out needs it too).
    #[prost(bool, tag = "6")]
    use_delta: bool,
    /// A map write's key (map channels only).
    #[prost(string, tag = "7")]
    key: String,
    /// A map write removed its key (the map scripts build removals with tags 4, 7 and 8).
    #[prost(bool, tag = "8")]
    removed: bool,
}

fn stored_info(i: &ClientInfo) -> StoredInfo {
    StoredInfo {
        user: i.user.to_string(),
        client: i.client.to_string(),
        conn_info: i.conn_info.clone(),
        chan_info: i.chan_info.clone(),
    }
}

fn client_info(s: StoredInfo) -> ClientInfo {
    ClientInfo {
        user: s.user.into(),
        client: s.client.into(),
        conn_info: s.conn_info,
        chan_info: s.chan_info,
    }
}

/// Encodes a publication without its offset (Redis assigns it).
pub(crate) fn encode_pub(p: &Publication) -> Vec<u8> {
    StoredPub {
        data: p.data.clone(),
        info: p.info.as_deref().map(stored_info),
        tags: p.tags.as_deref().cloned().unwrap_or_default(),
        time: p.time,
        binary: p.binary,
        use_delta: p.use_delta,
        key: p.key.clone(),
        removed: p.removed,
    }
    .encode_to_vec()
}

/// Decodes a stored publication and gives it `offset`.
pub(crate) fn decode_pub(buf: &[u8], offset: u64) -> Result<Publication, prost::DecodeError> {
    let s = StoredPub::decode(buf)?;
    Ok(Publication {
        offset,
        data: s.data,
        info: s.info.map(|i| Arc::new(client_info(i))),
        tags: (!s.tags.is_empty()).then(|| Arc::new(s.tags)),
        time: s.time,
        binary: s.binary,
        delta: false,
        use_delta: s.use_delta,
        key: s.key,
        removed: s.removed,
    })
}

/// Encodes a client info (presence, join/leave).
pub(crate) fn encode_info(i: &ClientInfo) -> Vec<u8> {
    stored_info(i).encode_to_vec()
}

/// Decodes a client info.
pub(crate) fn decode_info(buf: &[u8]) -> Result<ClientInfo, prost::DecodeError> {
    StoredInfo::decode(buf).map(client_info)
}

/// A message read from a channel's pub/sub.
#[derive(Debug, PartialEq)]
pub(crate) enum Wire<'a> {
    /// offset (0 = no history), epoch, encoded publication
    Pub(u64, &'a str, &'a [u8]),
    Join(&'a [u8]),
    Leave(&'a [u8]),
    /// The channel's stream is now at (offset, epoch): subscribers elsewhere must recover
    /// (a map channel was cleared).
    Check(u64, &'a str),
}

/// Parses `p<offset>:<epoch>:<payload>`, `c<offset>:<epoch>`, `j<info>` or `l<info>`.
pub(crate) fn parse_wire(msg: &[u8]) -> Option<Wire<'_>> {
    let (&kind, rest) = msg.split_first()?;
    match kind {
        b'p' => {
            let c1 = rest.iter().position(|&b| b == b':')?;
            let offset: u64 = std::str::from_utf8(&rest[..c1]).ok()?.parse().ok()?;
            let rest = &rest[c1 + 1..];
            let c2 = rest.iter().position(|&b| b == b':')?;
            let epoch = std::str::from_utf8(&rest[..c2]).ok()?;
            Some(Wire::Pub(offset, epoch, &rest[c2 + 1..]))
        }
        b'c' => {
            let c1 = rest.iter().position(|&b| b == b':')?;
            let offset: u64 = std::str::from_utf8(&rest[..c1]).ok()?.parse().ok()?;
            let epoch = std::str::from_utf8(&rest[c1 + 1..]).ok()?;
            Some(Wire::Check(offset, epoch))
        }
        b'j' => Some(Wire::Join(rest)),
        b'l' => Some(Wire::Leave(rest)),
        _ => None,
    }
}

/// The pub/sub message for a publication published without history (offset 0), as the
/// publish script builds it.
#[cfg(test)]
fn wire_pub_no_history(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 3);
    v.extend_from_slice(b"p0::");
    v.extend_from_slice(payload);
    v
}

/// The pub/sub message for a join (`j`) or leave (`l`).
pub(crate) fn wire_event(kind: u8, info: &ClientInfo) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&encode_info(info));
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn publications_round_trip_without_loss() {
        let p = Publication {
            offset: 9,
            data: Bytes::from_static(b"{\"a\":1}"),
            info: Some(Arc::new(ClientInfo {
                user: "u".into(),
                client: "c".into(),
                conn_info: Some(Bytes::from_static(b"{}")),
                chan_info: None,
            })),
            tags: Some(Arc::new(BTreeMap::from([("k".into(), "v".into())]))),
            time: 1234,
            binary: true,
            delta: false,
            use_delta: false,
            key: String::new(),
            removed: false,
        };
        let enc = encode_pub(&p);
        assert_eq!(decode_pub(&enc, 9).unwrap(), p);
        let entry = Publication {
            key: "k\u{e9}y".into(),
            data: Bytes::from_static(b"1"),
            ..p.clone()
        };
        assert_eq!(decode_pub(&encode_pub(&entry), 9).unwrap(), entry);
    }

    #[test]
    fn wire_messages_parse_and_garbage_is_refused() {
        assert_eq!(
            parse_wire(b"p12:abcdEFGH:xyz"),
            Some(Wire::Pub(12, "abcdEFGH", b"xyz"))
        );
        assert_eq!(parse_wire(b"p0::"), Some(Wire::Pub(0, "", b"")));
        assert_eq!(
            parse_wire(&wire_pub_no_history(b"a:b")),
            Some(Wire::Pub(0, "", b"a:b"))
        );
        assert_eq!(parse_wire(b"jabc"), Some(Wire::Join(b"abc")));
        assert_eq!(parse_wire(b"c0:xyz"), Some(Wire::Check(0, "xyz")));
        assert_eq!(parse_wire(b"cx:xyz"), None);
        assert_eq!(parse_wire(b"lx"), Some(Wire::Leave(b"x")));
        assert_eq!(parse_wire(b""), None);
        assert_eq!(parse_wire(b"px:e:"), None);
        assert_eq!(parse_wire(b"p1"), None);
        assert_eq!(parse_wire(b"p1:e"), None);
        assert_eq!(parse_wire(b"zz"), None);
    }
}
