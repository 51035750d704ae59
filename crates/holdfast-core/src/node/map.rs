//! Map channels through the node: the settings a namespace gives its channels, and the writes
//! and reads the server API and sessions make.

use super::{IDEMPOTENCY_TTL, Node};
use crate::channel::ResolvedChannel;
use crate::config::MapMode;
use crate::engine::map::{MapOutcome, MapSettings, MapWrite, StatePage, StateQuery};
use crate::engine::{HistoryOptions, HistoryPage, HistoryQuery, engine_error};
use holdfast_protocol::ErrorReply;
use std::time::Duration;

/// Change stream defaults (Centrifugo's): 100 entries kept a minute.
const STREAM_SIZE: usize = 100;
const STREAM_TTL: Duration = Duration::from_secs(60);

fn not_a_map() -> ErrorReply {
    ErrorReply::new(
        ErrorReply::BAD_REQUEST.code,
        "bad request: not a map channel (the namespace's subscription_type is not map)",
    )
}

impl Node {
    /// The map settings of a channel's namespace; `None` when its subscribers get streams.
    pub fn map_settings(&self, resolved: &ResolvedChannel) -> Option<MapSettings> {
        self.map_settings_of(&resolved.options)
    }

    /// The map settings of a namespace's options; `None` when its subscribers get streams.
    pub fn map_settings_of(&self, o: &crate::config::ChannelOptions) -> Option<MapSettings> {
        if !o.subscription_type.is_map() {
            return None;
        }
        let m = &o.map;
        let mode = m.mode.unwrap_or(MapMode::Persistent);
        let (size, ttl) = match mode {
            // No catch-up for clients, but a window so a subscriber paging through the state
            // can still take the changes made meanwhile from the stream.
            MapMode::Ephemeral => (m.max_page_size.max(STREAM_SIZE), STREAM_TTL),
            MapMode::Recoverable | MapMode::Persistent => (
                if m.stream_size == 0 {
                    STREAM_SIZE
                } else {
                    m.stream_size
                },
                if m.stream_ttl.is_zero() {
                    STREAM_TTL
                } else {
                    m.stream_ttl
                },
            ),
        };
        let meta_ttl = if m.meta_ttl.is_zero() {
            self.inner.rules.meta_ttl(o)
        } else {
            m.meta_ttl
        };
        Some(MapSettings {
            key_ttl: (mode != MapMode::Persistent && !m.key_ttl.is_zero()).then_some(m.key_ttl),
            stream: HistoryOptions {
                size,
                ttl,
                meta_ttl: meta_ttl.max(ttl),
            },
            max_keys: m.max_keys,
        })
    }

    fn resolve_map(&self, channel: &str) -> Result<(ResolvedChannel, MapSettings), ErrorReply> {
        let resolved = self.inner.rules.resolve(channel)?;
        let settings = self.map_settings(&resolved).ok_or_else(not_a_map)?;
        Ok((resolved, settings))
    }

    /// Writes or removes one key of a map channel (server API and client writes after their
    /// permission checks). The key is checked against the namespace's bounds.
    pub async fn map_publish(
        &self,
        channel: &str,
        mut write: MapWrite,
    ) -> Result<MapOutcome, ErrorReply> {
        let (resolved, settings) = self.resolve_map(channel)?;
        if write.key.is_empty() {
            return Err(ErrorReply::new(
                ErrorReply::BAD_REQUEST.code,
                "bad request: key is required",
            ));
        }
        if write.key.len() > resolved.options.map.max_key_length {
            return Err(ErrorReply::new(
                ErrorReply::BAD_REQUEST.code,
                format!(
                    "bad request: key longer than map.max_key_length ({} bytes)",
                    resolved.options.map.max_key_length
                ),
            ));
        }
        if write.idempotency_key.is_some() && write.idempotency_ttl.is_zero() {
            write.idempotency_ttl = IDEMPOTENCY_TTL;
        }
        let removed = write.removed;
        let out = self
            .inner
            .maps
            .publish(channel, write, &settings)
            .await
            .map_err(|e| {
                tracing::warn!(channel, error = %e, "map publish failed");
                engine_error(e)
            })?;
        let op = if removed { "remove" } else { "publish" };
        match out.suppressed {
            Some(s) => {
                metrics::counter!("holdfast_map_writes_suppressed_total", "reason" => s.reason())
                    .increment(1)
            }
            None => metrics::counter!("holdfast_map_writes_total", "op" => op).increment(1),
        }
        Ok(out)
    }

    /// Reads a page of a map channel's state (server API). `limit` is capped by the
    /// namespace's `map.max_page_size`.
    pub async fn map_read_state(
        &self,
        channel: &str,
        mut query: StateQuery,
    ) -> Result<StatePage, ErrorReply> {
        let (resolved, settings) = self.resolve_map(channel)?;
        query.limit = match query.limit {
            0 => resolved.options.map.default_page_size,
            n => n,
        }
        .min(resolved.options.map.max_page_size);
        self.inner
            .maps
            .read_state(channel, &query, &settings)
            .await
            .map_err(engine_error)
    }

    /// Reads a map channel's change stream (server API).
    pub async fn map_read_stream(
        &self,
        channel: &str,
        since: Option<(u64, String)>,
        limit: Option<usize>,
        reverse: bool,
    ) -> Result<HistoryPage, ErrorReply> {
        let (resolved, settings) = self.resolve_map(channel)?;
        let cap = resolved.options.map.max_page_size;
        let query = HistoryQuery {
            since,
            limit: Some(limit.unwrap_or(cap).min(cap)),
            reverse,
            meta_ttl: settings.stream.meta_ttl,
        };
        self.inner
            .maps
            .read_stream(channel, &query)
            .await
            .map_err(engine_error)
    }

    /// Number of keys in a map channel.
    pub async fn map_num_keys(&self, channel: &str) -> Result<usize, ErrorReply> {
        self.resolve_map(channel)?;
        self.inner
            .maps
            .num_keys(channel)
            .await
            .map_err(engine_error)
    }

    /// Removes every key of a map channel; its subscribers start over under a new epoch.
    pub async fn map_clear(&self, channel: &str) -> Result<(), ErrorReply> {
        self.resolve_map(channel)?;
        self.inner.maps.clear(channel).await.map_err(engine_error)
    }
}
