//! The log's records and their binary encoding.
//!
//! Frame: `len: u32 LE` (of type + body), `crc32: u32 LE` (of type + body), `type: u8`, body.
//! Integers are little-endian; strings and byte strings are `u32` length + bytes.

use bytes::Bytes;
use holdfast_protocol::{ClientInfo, Publication};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest record accepted when reading (a corrupt length never allocates more).
pub(crate) const MAX_RECORD: usize = 64 << 20;

/// One log record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// A stream exists under this epoch.
    Stream {
        channel: String,
        epoch: String,
        meta_expire_ms: i64,
    },
    /// A stream's position and expiries (snapshots; followed by its publications).
    State {
        channel: String,
        epoch: String,
        top: u64,
        items_expire_ms: i64,
        meta_expire_ms: i64,
        /// The stream's latest-state version and its epoch (written only when set, as a
        /// trailing field older readers skip).
        version: Option<(u64, String)>,
    },
    /// An appended publication (its offset is `top + 1` of the stream).
    Pub {
        channel: String,
        epoch: String,
        size: u32,
        items_expire_ms: i64,
        meta_expire_ms: i64,
        idempotency: Option<(String, i64)>,
        publication: Arc<Publication>,
        /// The publication's latest-state version (trailing, only when set).
        version: Option<(u64, String)>,
    },
    /// History removed (position kept).
    RemoveHistory { channel: String },
    /// A delivery cursor.
    Cursor {
        user: String,
        channel: String,
        offset: u64,
        epoch: String,
        expire_ms: i64,
    },
    /// An idempotency result (snapshots).
    Idem {
        channel: String,
        key: String,
        position: Option<(u64, String)>,
        expire_ms: i64,
    },
}

const T_STREAM: u8 = 1;
const T_STATE: u8 = 2;
const T_PUB: u8 = 3;
const T_REMOVE: u8 = 4;
const T_CURSOR: u8 = 5;
const T_IDEM: u8 = 6;

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt_bytes(&mut self, b: Option<&Bytes>) {
        match b {
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
            None => self.u8(0),
        }
    }
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The data ends inside the record.
    #[error("truncated record")]
    Truncated,
    /// The record is complete but its content is wrong.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Corrupt("field beyond the record"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Corrupt("string is not UTF-8"))
    }
    fn opt_bytes(&mut self) -> Result<Option<Bytes>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?)),
            _ => Err(DecodeError::Corrupt("bad option tag")),
        }
    }
}

/// A trailing latest-state version: nothing when unset, so records without one keep the
/// format older versions write and read.
fn write_version(w: &mut W<'_>, v: Option<&(u64, String)>) {
    if let Some((version, epoch)) = v {
        w.u8(1);
        w.u64(*version);
        w.bytes(epoch.as_bytes());
    }
}

fn read_version(r: &mut R<'_>) -> Result<Option<(u64, String)>, DecodeError> {
    if r.0.is_empty() {
        return Ok(None);
    }
    match r.u8()? {
        1 => Ok(Some((r.u64()?, r.string()?))),
        _ => Err(DecodeError::Corrupt("bad version tag")),
    }
}

fn write_publication(w: &mut W<'_>, p: &Publication) {
    w.u64(p.offset);
    w.i64(p.time);
    w.u8(u8::from(p.binary));
    w.bytes(&p.data);
    match &p.info {
        Some(i) => {
            w.u8(1);
            w.bytes(i.user.as_bytes());
            w.bytes(i.client.as_bytes());
            w.opt_bytes(i.conn_info.as_ref());
            w.opt_bytes(i.chan_info.as_ref());
        }
        None => w.u8(0),
    }
    match &p.tags {
        Some(t) => {
            w.u32(t.len() as u32);
            for (k, v) in t.iter() {
                w.bytes(k.as_bytes());
                w.bytes(v.as_bytes());
            }
        }
        None => w.u32(0),
    }
}

fn read_publication(r: &mut R<'_>) -> Result<Publication, DecodeError> {
    let offset = r.u64()?;
    let time = r.i64()?;
    let binary = r.u8()? != 0;
    let data = r.bytes()?;
    let info = match r.u8()? {
        0 => None,
        1 => Some(Arc::new(ClientInfo {
            user: r.string()?.into(),
            client: r.string()?.into(),
            conn_info: r.opt_bytes()?,
            chan_info: r.opt_bytes()?,
        })),
        _ => return Err(DecodeError::Corrupt("bad info tag")),
    };
    let n = r.u32()? as usize;
    let tags = if n == 0 {
        None
    } else {
        let mut t = BTreeMap::new();
        for _ in 0..n {
            t.insert(r.string()?, r.string()?);
        }
        Some(Arc::new(t))
    };
    Ok(Publication {
        offset,
        data,
        info,
        tags,
        time,
        binary,
        delta: false,
        use_delta: false,
        // Map entries live in the map broker, not in channel history.
        key: String::new(),
        removed: false,
    })
}

impl Record {
    /// Appends the framed record to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        let mut w = W(out);
        match self {
            Record::Stream {
                channel,
                epoch,
                meta_expire_ms,
            } => {
                w.u8(T_STREAM);
                w.bytes(channel.as_bytes());
                w.bytes(epoch.as_bytes());
                w.i64(*meta_expire_ms);
            }
            Record::State {
                channel,
                epoch,
                top,
                items_expire_ms,
                meta_expire_ms,
                version,
            } => {
                w.u8(T_STATE);
                w.bytes(channel.as_bytes());
                w.bytes(epoch.as_bytes());
                w.u64(*top);
                w.i64(*items_expire_ms);
                w.i64(*meta_expire_ms);
                write_version(&mut w, version.as_ref());
            }
            Record::Pub {
                channel,
                epoch,
                size,
                items_expire_ms,
                meta_expire_ms,
                idempotency,
                publication,
                version,
            } => {
                w.u8(T_PUB);
                w.bytes(channel.as_bytes());
                w.bytes(epoch.as_bytes());
                w.u32(*size);
                w.i64(*items_expire_ms);
                w.i64(*meta_expire_ms);
                match idempotency {
                    Some((k, exp)) => {
                        w.u8(1);
                        w.bytes(k.as_bytes());
                        w.i64(*exp);
                    }
                    None => w.u8(0),
                }
                write_publication(&mut w, publication);
                write_version(&mut w, version.as_ref());
            }
            Record::RemoveHistory { channel } => {
                w.u8(T_REMOVE);
                w.bytes(channel.as_bytes());
            }
            Record::Cursor {
                user,
                channel,
                offset,
                epoch,
                expire_ms,
            } => {
                w.u8(T_CURSOR);
                w.bytes(user.as_bytes());
                w.bytes(channel.as_bytes());
                w.u64(*offset);
                w.bytes(epoch.as_bytes());
                w.i64(*expire_ms);
            }
            Record::Idem {
                channel,
                key,
                position,
                expire_ms,
            } => {
                w.u8(T_IDEM);
                w.bytes(channel.as_bytes());
                w.bytes(key.as_bytes());
                match position {
                    Some((o, e)) => {
                        w.u8(1);
                        w.u64(*o);
                        w.bytes(e.as_bytes());
                    }
                    None => w.u8(0),
                }
                w.i64(*expire_ms);
            }
        }
        let body_len = out.len() - start - 8;
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads one framed record from the front of `buf`; returns it and the bytes it used.
    pub(crate) fn decode(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
        if buf.len() < 8 {
            return Err(DecodeError::Truncated);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len == 0 || len > MAX_RECORD {
            return Err(DecodeError::Corrupt("impossible record length"));
        }
        if buf.len() < 8 + len {
            return Err(DecodeError::Truncated);
        }
        let body = &buf[8..8 + len];
        if crc32fast::hash(body) != crc {
            return Err(DecodeError::Corrupt("checksum mismatch"));
        }
        let mut r = R(body);
        let rec = match r.u8()? {
            T_STREAM => Record::Stream {
                channel: r.string()?,
                epoch: r.string()?,
                meta_expire_ms: r.i64()?,
            },
            T_STATE => Record::State {
                channel: r.string()?,
                epoch: r.string()?,
                top: r.u64()?,
                items_expire_ms: r.i64()?,
                meta_expire_ms: r.i64()?,
                version: read_version(&mut r)?,
            },
            T_PUB => Record::Pub {
                channel: r.string()?,
                epoch: r.string()?,
                size: r.u32()?,
                items_expire_ms: r.i64()?,
                meta_expire_ms: r.i64()?,
                idempotency: match r.u8()? {
                    0 => None,
                    1 => Some((r.string()?, r.i64()?)),
                    _ => return Err(DecodeError::Corrupt("bad idempotency tag")),
                },
                publication: Arc::new(read_publication(&mut r)?),
                version: read_version(&mut r)?,
            },
            T_REMOVE => Record::RemoveHistory {
                channel: r.string()?,
            },
            T_CURSOR => Record::Cursor {
                user: r.string()?,
                channel: r.string()?,
                offset: r.u64()?,
                epoch: r.string()?,
                expire_ms: r.i64()?,
            },
            T_IDEM => Record::Idem {
                channel: r.string()?,
                key: r.string()?,
                position: match r.u8()? {
                    0 => None,
                    1 => Some((r.u64()?, r.string()?)),
                    _ => return Err(DecodeError::Corrupt("bad position tag")),
                },
                expire_ms: r.i64()?,
            },
            _ => return Err(DecodeError::Corrupt("unknown record type")),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Corrupt("trailing bytes in record"));
        }
        Ok((rec, 8 + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        let mut tags = BTreeMap::new();
        tags.insert("k".to_string(), "v".to_string());
        vec![
            Record::Stream {
                channel: "c".into(),
                epoch: "abcdefgh".into(),
                meta_expire_ms: 5,
            },
            Record::Pub {
                channel: "c".into(),
                epoch: "abcdefgh".into(),
                size: 10,
                items_expire_ms: 1,
                meta_expire_ms: 2,
                idempotency: Some(("key".into(), 3)),
                publication: Arc::new(Publication {
                    offset: 1,
                    data: Bytes::from_static(b"{\"a\":1}"),
                    info: Some(Arc::new(ClientInfo {
                        user: "u".into(),
                        client: "cl".into(),
                        conn_info: Some(Bytes::from_static(b"{}")),
                        chan_info: None,
                    })),
                    tags: Some(Arc::new(tags)),
                    time: 42,
                    binary: true,
                    delta: false,
                    use_delta: false,
                    key: String::new(),
                    removed: false,
                }),
                version: Some((5, "ve".into())),
            },
            Record::RemoveHistory {
                channel: "c".into(),
            },
            Record::Cursor {
                user: "u".into(),
                channel: "#u".into(),
                offset: 9,
                epoch: "e".into(),
                expire_ms: 7,
            },
            Record::Idem {
                channel: "c".into(),
                key: "k".into(),
                position: Some((3, "e".into())),
                expire_ms: 8,
            },
            Record::Idem {
                channel: "c".into(),
                key: "k2".into(),
                position: None,
                expire_ms: 8,
            },
            Record::State {
                channel: "c".into(),
                epoch: "e".into(),
                top: 77,
                items_expire_ms: 1,
                meta_expire_ms: 2,
                version: None,
            },
            Record::State {
                channel: "c".into(),
                epoch: "e".into(),
                top: 78,
                items_expire_ms: 1,
                meta_expire_ms: 2,
                version: Some((9, String::new())),
            },
        ]
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        for r in sample() {
            r.encode(&mut buf);
        }
        let mut at = 0;
        for want in sample() {
            let (got, n) = Record::decode(&buf[at..]).expect("decode");
            assert_eq!(got, want);
            at += n;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn torn_and_corrupt_records_are_told_apart() {
        let mut buf = Vec::new();
        sample()[1].encode(&mut buf);
        for cut in 0..buf.len() {
            assert_eq!(
                Record::decode(&buf[..cut]).unwrap_err(),
                DecodeError::Truncated,
                "cut at {cut}"
            );
        }
        let mut flipped = buf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            Record::decode(&flipped),
            Err(DecodeError::Corrupt(_))
        ));
        let mut huge = buf;
        huge[3] = 0xff;
        assert!(matches!(
            Record::decode(&huge),
            Err(DecodeError::Corrupt(_))
        ));
    }
}
