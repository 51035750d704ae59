//! Error, unsubscribe and disconnect codes of the client protocol.
//!
//! Codes are protocol data: the same numbers travel in reply errors, `unsubscribe` pushes and
//! WebSocket close frames. Disconnect codes 3000–3499 and 4000–4499 tell a client to reconnect;
//! 3500–3999 and 4500–4999 are terminal.

use std::borrow::Cow;
use std::fmt;

/// The numbers of the error codes, by name (the [`ErrorReply`] constants carry them with their
/// messages).
pub mod error_code {
    /// 100: the server failed; temporary.
    pub const INTERNAL: u32 = 100;
    /// 101
    pub const UNAUTHORIZED: u32 = 101;
    /// 102: the channel's namespace is not configured.
    pub const UNKNOWN_CHANNEL: u32 = 102;
    /// 103
    pub const PERMISSION_DENIED: u32 = 103;
    /// 104
    pub const METHOD_NOT_FOUND: u32 = 104;
    /// 105
    pub const ALREADY_SUBSCRIBED: u32 = 105;
    /// 106
    pub const LIMIT_EXCEEDED: u32 = 106;
    /// 107
    pub const BAD_REQUEST: u32 = 107;
    /// 108: the feature is off.
    pub const NOT_AVAILABLE: u32 = 108;
    /// 109
    pub const TOKEN_EXPIRED: u32 = 109;
    /// 110
    pub const EXPIRED: u32 = 110;
    /// 111: temporary.
    pub const TOO_MANY_REQUESTS: u32 = 111;
    /// 112
    pub const UNRECOVERABLE_POSITION: u32 = 112;
    /// 113: map subscriptions (temporary).
    pub const CONCURRENT_PAGINATION: u32 = 113;
}

use error_code as c;

/// An error in a command reply: `{"code":103,"message":"permission denied"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// Numeric code; 0–399 reserved by the protocol, 400–1999 for applications.
    pub code: u32,
    /// Short human text sent to the client.
    pub message: Cow<'static, str>,
    /// A temporary error may be retried by the client.
    pub temporary: bool,
}

impl ErrorReply {
    /// A custom error (application codes 400–1999).
    pub fn new(code: u32, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            temporary: false,
        }
    }

    /// The same code with another message (`bad request: channel too long`).
    #[must_use]
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    /// The same error marked temporary.
    #[must_use]
    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    const fn fixed(code: u32, message: &'static str, temporary: bool) -> Self {
        Self {
            code,
            message: Cow::Borrowed(message),
            temporary,
        }
    }

    /// 100: the server failed; the client may retry.
    pub const INTERNAL: Self = Self::fixed(c::INTERNAL, "internal server error", true);
    /// 101
    pub const UNAUTHORIZED: Self = Self::fixed(c::UNAUTHORIZED, "unauthorized", false);
    /// 102: the channel's namespace is not configured.
    pub const UNKNOWN_CHANNEL: Self = Self::fixed(c::UNKNOWN_CHANNEL, "unknown channel", false);
    /// 103
    pub const PERMISSION_DENIED: Self =
        Self::fixed(c::PERMISSION_DENIED, "permission denied", false);
    /// 104
    pub const METHOD_NOT_FOUND: Self = Self::fixed(c::METHOD_NOT_FOUND, "method not found", false);
    /// 105
    pub const ALREADY_SUBSCRIBED: Self =
        Self::fixed(c::ALREADY_SUBSCRIBED, "already subscribed", false);
    /// 106
    pub const LIMIT_EXCEEDED: Self = Self::fixed(c::LIMIT_EXCEEDED, "limit exceeded", false);
    /// 107
    pub const BAD_REQUEST: Self = Self::fixed(c::BAD_REQUEST, "bad request", false);
    /// 108: the feature is off (no presence, no history, no RPC handler).
    pub const NOT_AVAILABLE: Self = Self::fixed(c::NOT_AVAILABLE, "not available", false);
    /// 109: the token's `exp` has passed; the client fetches a new token.
    pub const TOKEN_EXPIRED: Self = Self::fixed(c::TOKEN_EXPIRED, "token expired", false);
    /// 110
    pub const EXPIRED: Self = Self::fixed(c::EXPIRED, "expired", false);
    /// 111
    pub const TOO_MANY_REQUESTS: Self =
        Self::fixed(c::TOO_MANY_REQUESTS, "too many requests", true);
    /// 112
    pub const UNRECOVERABLE_POSITION: Self =
        Self::fixed(c::UNRECOVERABLE_POSITION, "unrecoverable position", false);
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// Why a connection is closed: the WebSocket close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Close code (3000–4999 for protocol and application disconnects).
    pub code: u16,
    /// Short ASCII reason, kept under the 123-byte close-frame limit.
    pub reason: Cow<'static, str>,
}

impl Disconnect {
    /// A custom disconnect (applications use 4000–4999).
    pub fn new(code: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        let mut reason: Cow<'static, str> = reason.into();
        if reason.len() > 123 {
            let mut cut = 123;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason = Cow::Owned(reason[..cut].to_owned());
        }
        Self { code, reason }
    }

    const fn fixed(code: u16, reason: &'static str) -> Self {
        Self {
            code,
            reason: Cow::Borrowed(reason),
        }
    }

    /// Whether a client should reconnect after this disconnect.
    pub fn reconnect(&self) -> bool {
        !matches!(self.code, 3500..=3999 | 4500..=4999)
    }

    /// 3000: the socket closed (internal marker, never sent).
    pub const CONNECTION_CLOSED: Self = Self::fixed(3000, "connection closed");
    /// 3001: the node is shutting down; reconnect elsewhere.
    pub const SHUTDOWN: Self = Self::fixed(3001, "shutdown");
    /// 3004
    pub const SERVER_ERROR: Self = Self::fixed(3004, "internal server error");
    /// 3005: the connection token expired and was not refreshed in time.
    pub const EXPIRED: Self = Self::fixed(3005, "connection expired");
    /// 3006
    pub const SUBSCRIPTION_EXPIRED: Self = Self::fixed(3006, "subscription expired");
    /// 3008: the outbound queue overflowed.
    pub const SLOW: Self = Self::fixed(3008, "slow");
    /// 3009
    pub const WRITE_ERROR: Self = Self::fixed(3009, "write error");
    /// 3010: a gap in a server-side subscription's stream.
    pub const INSUFFICIENT_STATE: Self = Self::fixed(3010, "insufficient state");
    /// 3011
    pub const FORCE_RECONNECT: Self = Self::fixed(3011, "force reconnect");
    /// 3012
    pub const NO_PONG: Self = Self::fixed(3012, "no pong");
    /// 3013
    pub const TOO_MANY_REQUESTS: Self = Self::fixed(3013, "too many requests");
    /// 3014
    pub const STATE_INVALIDATED: Self = Self::fixed(3014, "state invalidated");
    /// 3500
    pub const INVALID_TOKEN: Self = Self::fixed(3500, "invalid token");
    /// 3501: malformed frame, non-connect first command, unnecessary pong.
    pub const BAD_REQUEST: Self = Self::fixed(3501, "bad request");
    /// 3502: no connect within the stale delay.
    pub const STALE: Self = Self::fixed(3502, "stale");
    /// 3503: API `disconnect` default.
    pub const FORCE_DISCONNECT: Self = Self::fixed(3503, "force disconnect");
    /// 3504
    pub const CONNECTION_LIMIT: Self = Self::fixed(3504, "connection limit");
    /// 3505
    pub const CHANNEL_LIMIT: Self = Self::fixed(3505, "channel limit");
    /// 3506: binary data for a JSON client.
    pub const INAPPROPRIATE_PROTOCOL: Self = Self::fixed(3506, "inappropriate protocol");
    /// 3507
    pub const PERMISSION_DENIED: Self = Self::fixed(3507, "permission denied");
    /// 3508: `send` without a message handler.
    pub const NOT_AVAILABLE: Self = Self::fixed(3508, "not available");
    /// 3509
    pub const TOO_MANY_ERRORS: Self = Self::fixed(3509, "too many errors");
    /// 1009: WebSocket message too big (transport level).
    pub const MESSAGE_TOO_BIG: Self = Self::fixed(1009, "message too big");
    /// 1002: a WebSocket protocol violation (transport level): a continuation without a start,
    /// an unmasked client frame, a reserved opcode, an oversized control frame.
    pub const PROTOCOL_ERROR: Self = Self::fixed(1002, "protocol error");
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.reason)
    }
}

impl std::error::Error for Disconnect {}

/// Codes carried in `unsubscribe` pushes.
pub mod unsubscribe {
    /// The server unsubscribed the client (API): the client stays unsubscribed.
    pub const SERVER: (u32, &str) = (2000, "server unsubscribe");
    /// A gap was detected: the client resubscribes and recovers.
    pub const INSUFFICIENT_STATE: (u32, &str) = (2500, "insufficient state");
    /// The subscription token expired.
    pub const EXPIRED: (u32, &str) = (2501, "subscription expired");
    /// The client must drop cached state and resubscribe.
    pub const STATE_INVALIDATED: (u32, &str) = (2502, "state invalidated");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_ranges() {
        assert!(Disconnect::SHUTDOWN.reconnect());
        assert!(Disconnect::SLOW.reconnect());
        assert!(!Disconnect::INVALID_TOKEN.reconnect());
        assert!(!Disconnect::new(4501, "app").reconnect());
        assert!(Disconnect::new(4000, "app").reconnect());
        assert!(Disconnect::new(5000, "x").reconnect());
    }

    #[test]
    fn long_reason_is_cut_on_char_boundary() {
        let d = Disconnect::new(4000, "é".repeat(100));
        assert!(d.reason.len() <= 123);
        assert!(d.reason.chars().all(|c| c == 'é'));
    }
}
