//! Wire types and codecs of the Centrifugo client protocol v2, as spoken by Holdfast.
//!
//! This crate knows bytes and frames only: no I/O, no runtime. [`command`] holds what clients
//! send, [`reply`] what the server sends, [`code`] the error and disconnect codes, and [`json`]
//! the JSON codec (newline-delimited batches, payloads carried as raw JSON).

pub mod code;
pub mod command;
pub mod json;
pub mod proto;
pub mod reply;

pub use code::{Disconnect, ErrorReply};
pub use command::{Command, FilterNode, Request, StreamPosition};
pub use reply::{ClientInfo, Publication, Push, ReplyBody};

/// How a connection encodes its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// Text frames, messages separated by `\n`.
    #[default]
    Json,
    /// Binary frames, each message prefixed by its varint length.
    Protobuf,
}

impl Encoding {
    /// Name used in logs, metrics and proxy requests.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Protobuf => "protobuf",
        }
    }

    /// Splits a frame into commands.
    pub fn decode_frame(self, frame: &[u8]) -> Result<Commands<'_>, json::DecodeError> {
        Ok(match self {
            Encoding::Json => Commands::Json(json::decode_frame(frame)?),
            Encoding::Protobuf => Commands::Protobuf(proto::decode_frame(frame)?),
        })
    }

    /// Appends one encoded reply (JSON: bare; protobuf: length-prefixed).
    pub fn encode_reply(self, out: &mut Vec<u8>, id: u32, body: &ReplyBody) {
        match self {
            Encoding::Json => json::encode_reply(out, id, body),
            Encoding::Protobuf => proto::encode_reply(out, id, body),
        }
    }

    /// Appends one encoded push (JSON: bare; protobuf: length-prefixed).
    pub fn encode_push(self, out: &mut Vec<u8>, push: &Push<'_>) {
        match self {
            Encoding::Json => json::encode_push(out, push),
            Encoding::Protobuf => proto::encode_push(out, push),
        }
    }

    /// Appends one encoded push naming its subscription by a compaction `id` (> 0) instead of
    /// the channel where the push kind allows it (publication, join, leave).
    pub fn encode_push_id(self, out: &mut Vec<u8>, push: &Push<'_>, id: i64) {
        match self {
            Encoding::Json => json::encode_push_id(out, push, id),
            Encoding::Protobuf => proto::encode_push_id(out, push, id),
        }
    }

    /// The encoded server ping.
    pub fn ping(self) -> &'static [u8] {
        match self {
            Encoding::Json => json::PING,
            Encoding::Protobuf => proto::PING,
        }
    }

    /// Whether frames are text (JSON) or binary (protobuf).
    pub fn is_binary(self) -> bool {
        self == Encoding::Protobuf
    }

    /// Joins encoded messages into one frame: `\n` between JSON messages, plain concatenation
    /// for (already length-prefixed) protobuf messages.
    pub fn separator(self) -> &'static [u8] {
        match self {
            Encoding::Json => b"\n",
            Encoding::Protobuf => b"",
        }
    }
}

/// Commands of one frame, in either encoding.
#[derive(Debug)]
pub enum Commands<'a> {
    /// From a JSON frame.
    Json(json::CommandIter<'a>),
    /// From a protobuf frame.
    Protobuf(proto::ProtoCommandIter<'a>),
}

impl Iterator for Commands<'_> {
    type Item = Result<Command, json::DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Commands::Json(i) => i.next(),
            Commands::Protobuf(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests;
