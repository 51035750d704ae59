//! Map brokers: keyed state a channel owns (map subscriptions).
//!
//! A map channel has a state (key → its newest entry) and a change stream: every write (an
//! upsert or a removal, by a client, the API or a key's expiry) appends one publication carrying
//! the key at the next offset of the channel's epoch, updates the state and is delivered to the
//! node's [`BrokerHandler`], atomically per channel. Each state entry is the publication that
//! last wrote its key, so it carries that write's offset: a state read at position `P` plus the
//! stream after `P` is the state at any later position, which is what lets a subscriber page
//! through a large state while it keeps changing.

use super::{BrokerHandler, EngineError, HistoryOptions, HistoryPage, HistoryQuery, StreamTop};
use async_trait::async_trait;
use bytes::Bytes;
use holdfast_protocol::{ClientInfo, Publication};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// How a map channel keeps its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSettings {
    /// Keys expire this long after their last write (`None` = never).
    pub key_ttl: Option<Duration>,
    /// The change stream's retention (entries, their TTL, the epoch's lifetime).
    pub stream: HistoryOptions,
    /// Most keys a channel holds; a write of a new key beyond it is refused.
    pub max_keys: usize,
}

/// One write to a map channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapWrite {
    /// The key.
    pub key: String,
    /// The entry's value (empty for a removal).
    pub data: Bytes,
    /// A removal.
    pub removed: bool,
    /// The writer when a client wrote.
    pub info: Option<Arc<ClientInfo>>,
    /// Tags of the write.
    pub tags: Option<Arc<BTreeMap<String, String>>>,
    /// `data` is not known to be JSON.
    pub binary: bool,
    /// Same key within `idempotency_ttl` → the first write's result, one write.
    pub idempotency_key: Option<String>,
    /// How long an idempotency result is remembered.
    pub idempotency_ttl: Duration,
    /// The entry's version: a write whose version is not newer than the key's (same or empty
    /// `version_epoch`) is suppressed. 0 = no check.
    pub version: u64,
    /// Epoch of `version`.
    pub version_epoch: String,
    /// Write only if the key is absent (`if_new`) or only if present (`if_exists`).
    pub key_mode: KeyMode,
}

/// Conditional writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyMode {
    /// Always write.
    #[default]
    Any,
    /// Only when the key is absent.
    IfNew,
    /// Only when the key is present.
    IfExists,
}

/// Why a write was suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suppressed {
    /// An earlier write with the same idempotency key answered.
    Idempotent,
    /// The version was not newer than the key's.
    Version,
    /// `key_mode` did not hold (or a removal of an absent key).
    KeyMode,
}

impl Suppressed {
    /// The API's `suppress_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Suppressed::Idempotent => "idempotency",
            Suppressed::Version => "version",
            Suppressed::KeyMode => "key_mode",
        }
    }
}

/// Result of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOutcome {
    /// The write's position (or, suppressed, the stream's top or the first write's position).
    pub position: StreamTop,
    /// Nothing was written, and why.
    pub suppressed: Option<Suppressed>,
}

/// A state read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateQuery {
    /// Continue after this key (from the previous page); empty = from the start.
    pub cursor: String,
    /// At most this many entries.
    pub limit: usize,
    /// Read as of this position (offset, epoch): the epoch must be the channel's, and entries
    /// written after the offset are left out (the stream after it carries them).
    pub revision: Option<(u64, String)>,
    /// Only this key.
    pub key: Option<String>,
}

/// A page of state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatePage {
    /// Entries in key order: each the publication that last wrote its key.
    pub entries: Vec<Arc<Publication>>,
    /// Cursor of the next page; empty on the last.
    pub cursor: String,
    /// The position the page is as of (the revision asked for, else the stream's top).
    pub top: StreamTop,
}

/// Keyed state with a change stream, per channel. Every implementation runs the map
/// conformance suite ([`super::conformance::run_map`]).
#[async_trait]
pub trait MapBroker: Send + Sync + Debug {
    /// Registers the node that receives the writes. Called once before any other method.
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>);

    /// Starts delivering a channel's writes to the handler (the node's first local subscriber
    /// of it). A broker that delivers every channel's writes has nothing to do.
    async fn subscribe(&self, _channel: &str) -> Result<(), EngineError> {
        Ok(())
    }

    /// Stops delivering a channel's writes (its last local subscriber left).
    async fn unsubscribe(&self, _channel: &str) -> Result<(), EngineError> {
        Ok(())
    }

    /// Writes (or removes) one key: appends to the stream, updates the state and delivers.
    async fn publish(
        &self,
        channel: &str,
        write: MapWrite,
        settings: &MapSettings,
    ) -> Result<MapOutcome, EngineError>;

    /// Reads a page of state. A missing channel is created (new epoch, offset 0).
    async fn read_state(
        &self,
        channel: &str,
        query: &StateQuery,
        settings: &MapSettings,
    ) -> Result<StatePage, EngineError>;

    /// Reads the change stream (as [`super::Broker::history`]).
    async fn read_stream(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, EngineError>;

    /// Extends the expiry of `keys` (by `settings.key_ttl` from now) without a stream entry;
    /// returns the keys that are not there (expired or removed meanwhile), for the caller to
    /// write again.
    async fn touch(
        &self,
        channel: &str,
        keys: &[String],
        settings: &MapSettings,
    ) -> Result<Vec<String>, EngineError>;

    /// Number of keys in a channel.
    async fn num_keys(&self, channel: &str) -> Result<usize, EngineError>;

    /// Removes every key and the stream; the channel starts over under a new epoch.
    async fn clear(&self, channel: &str) -> Result<(), EngineError>;
}
