//! Wire types and codecs of the Centrifugo client protocol v2, as spoken by Holdfast.
//!
//! This crate knows bytes and frames only: no I/O, no runtime. [`command`] holds what clients
//! send, [`reply`] what the server sends, [`code`] the error and disconnect codes, and [`json`]
//! the JSON codec (newline-delimited batches, payloads carried as raw JSON).

pub mod code;
pub mod command;
pub mod json;
pub mod reply;

pub use code::{Disconnect, ErrorReply};
pub use command::{Command, Request, StreamPosition};
pub use reply::{ClientInfo, Publication, Push, ReplyBody};

/// How a connection encodes its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// Text frames, messages separated by `\n`.
    #[default]
    Json,
}

impl Encoding {
    /// Name used in logs, metrics and proxy requests.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
        }
    }
}

#[cfg(test)]
mod tests;
