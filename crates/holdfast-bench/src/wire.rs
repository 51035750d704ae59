//! A minimal WebSocket client for load generation: the HTTP upgrade, masked client frames and a
//! frame reader over one large read buffer. No per-message allocation on the read path, so one
//! generator core can take in far more messages than a full client library would.

use anyhow::{Context, bail};
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest frame the reader accepts (the servers under test send far smaller ones).
const MAX_FRAME: usize = 8 << 20;
/// Initial read buffer; it grows only for a frame larger than this.
const READ_BUF: usize = 16 * 1024;

/// `HOLDFAST_BENCH_DEBUG` set: print every data and close frame (read once, not per frame).
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("HOLDFAST_BENCH_DEBUG").is_some())
}

/// Frame opcodes the reader reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Text (or a continuation of one).
    Text,
    /// Binary.
    Binary,
    /// Close.
    Close,
    /// Ping (answered by the reader).
    Ping,
    /// Pong.
    Pong,
}

/// One WebSocket connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A streamed HTTP response of SSE events instead of WebSocket frames.
    events: bool,
}

/// Opens a TCP connection to `addr` from `source` (any port).
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    tcp_from(addr, source.map(|ip| SocketAddr::new(ip, 0))).await
}

/// Opens a TCP connection to `addr` from the source address and port `source`. Binding with
/// port 0 makes the kernel search for a free port on every bind (slow with thousands bound);
/// callers holding many sockets pick ports themselves (see [`PortCursor`]).
pub async fn tcp_from(addr: SocketAddr, source: Option<SocketAddr>) -> anyhow::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source {
        sock.set_reuseaddr(true)?;
        sock.bind(src)?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Hands out source ports of one source address in turn (1024..65535), so that binding never
/// makes the kernel search.
#[derive(Debug)]
pub struct PortCursor {
    ip: IpAddr,
    next: std::cell::Cell<u16>,
}

impl PortCursor {
    /// Ports of `ip`, starting at `first`.
    pub fn new(ip: IpAddr, first: u16) -> PortCursor {
        PortCursor {
            ip,
            next: std::cell::Cell::new(first.max(1024)),
        }
    }

    /// The next source address.
    pub fn take(&self) -> SocketAddr {
        let p = self.next.get();
        self.next.set(if p == u16::MAX { 1024 } else { p + 1 });
        SocketAddr::new(self.ip, p)
    }
}

/// Connects from the cursor's address, moving on to the next port while one is in use.
pub async fn tcp_cursor(addr: SocketAddr, cursor: &PortCursor) -> anyhow::Result<TcpStream> {
    let mut last = None;
    for _ in 0..64 {
        match tcp_from(addr, Some(cursor.take())).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                let in_use = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse);
                if !in_use {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no free source port")))
}

impl Conn {
    /// Upgrades `stream` to a WebSocket at `path` (with query), offering `protocol` if given.
    pub async fn upgrade(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        protocol: Option<&str>,
    ) -> anyhow::Result<Conn> {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}\r\n"
        );
        if let Some(p) = protocol {
            req.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; READ_BUF];
        let mut end = 0;
        let head_end = loop {
            if end == buf.len() {
                bail!("upgrade response head too large");
            }
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                bail!("closed during the upgrade");
            }
            end += n;
            if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]);
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "101" {
            let line = head.lines().next().unwrap_or("").to_owned();
            bail!("upgrade refused: {line}");
        }
        Ok(Conn {
            stream,
            buf,
            start: head_end,
            end,
            events: false,
        })
    }

    /// Opens an SSE stream: `GET path` answered 200 with `text/event-stream`. [`Conn::next`] then
    /// returns the bytes of whole events as they arrive (chunked-encoding lines between events
    /// included: they hold no delivery marker).
    pub async fn event_stream(
        mut stream: TcpStream,
        host: &str,
        path: &str,
    ) -> anyhow::Result<Conn> {
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; READ_BUF];
        let mut end = 0;
        let head_end = loop {
            if end == buf.len() {
                bail!("response head too large");
            }
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                bail!("closed before the response");
            }
            end += n;
            if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]);
        if head.split_whitespace().nth(1) != Some("200") {
            let line = head.lines().next().unwrap_or("").to_owned();
            bail!("event stream refused: {line}");
        }
        Ok(Conn {
            stream,
            buf,
            start: head_end,
            end,
            events: true,
        })
    }

    /// Sends one masked frame (a zero mask: masking is required, its key is not).
    pub async fn send(&mut self, op: Op, payload: &[u8]) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        frame_into(&mut out, op, payload);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Sends already framed bytes (see [`frame_into`]) in one write.
    pub async fn send_raw(&mut self, framed: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(framed).await?;
        Ok(())
    }

    /// Reads the next data frame, answering pings on the way. `None` when the peer closed.
    /// The payload borrows the read buffer until the next call.
    pub async fn next(&mut self) -> anyhow::Result<Option<(Op, &[u8])>> {
        if self.events {
            return self.next_events().await;
        }
        loop {
            if let Some((op, fin, hlen, plen)) = parse_head(&self.buf[self.start..self.end])? {
                let total = hlen + plen;
                if self.end - self.start >= total {
                    let (ps, pe) = (self.start + hlen, self.start + total);
                    self.start += total;
                    let _ = fin; // fragmented messages are counted frame by frame
                    match op {
                        Op::Ping => {
                            let payload = self.buf[ps..pe].to_vec();
                            self.send(Op::Pong, &payload).await?;
                            continue;
                        }
                        Op::Pong => continue,
                        Op::Close => {
                            if debug() {
                                eprintln!("close {:?}", String::from_utf8_lossy(&self.buf[ps..pe]));
                            }
                            return Ok(None);
                        }
                        Op::Text | Op::Binary => {
                            if debug() {
                                eprintln!("< {:?}", String::from_utf8_lossy(&self.buf[ps..pe]));
                            }
                            return Ok(Some((op, &self.buf[ps..pe])));
                        }
                    }
                }
                if total > self.buf.len() {
                    self.buf.resize(total, 0);
                }
            }
            if self.start > 0 && (self.start == self.end || self.end == self.buf.len()) {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }
}

impl Conn {
    /// The bytes of every whole SSE event received so far (at least one).
    async fn next_events(&mut self) -> anyhow::Result<Option<(Op, &[u8])>> {
        loop {
            let have = &self.buf[self.start..self.end];
            if let Some(i) = have.windows(2).rposition(|w| w == b"\n\n") {
                let (ps, pe) = (self.start, self.start + i + 2);
                self.start = pe;
                if debug() {
                    eprintln!("< {:?}", String::from_utf8_lossy(&self.buf[ps..pe]));
                }
                return Ok(Some((Op::Text, &self.buf[ps..pe])));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                if self.buf.len() >= MAX_FRAME {
                    bail!("event larger than {MAX_FRAME} bytes");
                }
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }
}

/// Appends one masked client frame.
pub fn frame_into(out: &mut Vec<u8>, op: Op, payload: &[u8]) {
    let code = match op {
        Op::Text => 0x1,
        Op::Binary => 0x2,
        Op::Close => 0x8,
        Op::Ping => 0x9,
        Op::Pong => 0xA,
    };
    out.push(0x80 | code);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// Parses a server frame head: (opcode, fin, head length, payload length), or `None` when more
/// bytes are needed.
fn parse_head(b: &[u8]) -> anyhow::Result<Option<(Op, bool, usize, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    let op = match b[0] & 0x0F {
        0x0 | 0x1 => Op::Text,
        0x2 => Op::Binary,
        0x8 => Op::Close,
        0x9 => Op::Ping,
        0xA => Op::Pong,
        o => bail!("unknown opcode {o}"),
    };
    let masked = b[1] & 0x80 != 0;
    let (hlen, plen) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (4, usize::from(u16::from_be_bytes([b[2], b[3]])))
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (
                10,
                usize::try_from(u64::from_be_bytes(l)).context("frame length")?,
            )
        }
        l => (2, usize::from(l)),
    };
    if masked {
        bail!("server frames must not be masked");
    }
    if plen > MAX_FRAME {
        bail!("frame of {plen} bytes");
    }
    Ok(Some((op, fin, hlen, plen)))
}

/// Counts publish-time markers (`@@<microseconds>`) in a payload and calls `f` with each time.
pub fn markers(payload: &[u8], mut f: impl FnMut(u64)) {
    let mut i = 0;
    while let Some(p) = memchr2(payload, i) {
        let mut j = p + 2;
        let mut v: u64 = 0;
        while j < payload.len() && payload[j].is_ascii_digit() {
            v = v * 10 + u64::from(payload[j] - b'0');
            j += 1;
        }
        if j > p + 2 {
            f(v);
        }
        i = j;
    }
}

fn memchr2(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < b.len() {
        match b[i + 1..].iter().position(|&c| c == b'@') {
            Some(k) => {
                let at = i + 1 + k;
                if b[at - 1] == b'@' {
                    return Some(at - 1);
                }
                i = at;
            }
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn markers_are_found_in_batched_and_escaped_payloads() {
        let mut seen = Vec::new();
        markers(
            br#"{"push":{"pub":{"data":{"m":"@@123;x"}}}}
{"data":"{\"m\":\"@@456;@\"}"}@@"#,
            |t| seen.push(t),
        );
        assert_eq!(seen, vec![123, 456]);
    }

    #[test]
    fn heads_parse() {
        assert_eq!(parse_head(&[0x81]).unwrap(), None);
        assert_eq!(
            parse_head(&[0x81, 5]).unwrap(),
            Some((Op::Text, true, 2, 5))
        );
        assert_eq!(
            parse_head(&[0x82, 126, 1, 0]).unwrap(),
            Some((Op::Binary, true, 4, 256))
        );
        assert!(parse_head(&[0x81, 0x85]).is_err());
        let mut out = Vec::new();
        frame_into(&mut out, Op::Text, b"hi");
        assert_eq!(out, vec![0x81, 0x82, 0, 0, 0, 0, b'h', b'i']);
    }
}
