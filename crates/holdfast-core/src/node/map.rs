//! Map channels through the node: the settings a namespace gives its channels, and the writes
//! and reads the server API and sessions make.

use super::{IDEMPOTENCY_TTL, Node};
use crate::channel::ResolvedChannel;
use crate::config::{ChannelOptions, MapMode, SubscriptionType};
use crate::engine::map::{KeyMode, MapOutcome, MapSettings, MapWrite, StatePage, StateQuery};
use crate::engine::{HistoryOptions, HistoryPage, HistoryQuery, engine_error};
use holdfast_protocol::{ClientInfo, ErrorReply};
use std::sync::Arc;
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

/// Presence map entries a node keeps alive: (presence channel, key) → how many local
/// subscriptions hold it, and the entry's client info (`map_clients`).
pub(super) type PresenceKeys = parking_lot::Mutex<
    std::collections::HashMap<(Arc<str>, Arc<str>), (u32, Option<Arc<ClientInfo>>)>,
>;

/// (presence channel, key, the client info of a `map_clients` entry).
type PresenceEntry = (Arc<str>, Arc<str>, Option<Arc<ClientInfo>>);

/// Whether subscriptions of a namespace enter presence maps.
pub(crate) fn has_presence_maps(o: &ChannelOptions) -> bool {
    !o.map_clients_presence_channel_prefix.is_empty()
        || !o.map_users_presence_channel_prefix.is_empty()
}

/// The presence maps a subscription of `channel` (by `info`) enters: (presence channel, key,
/// client info for `map_clients`).
fn presence_entries(
    channel: &str,
    o: &ChannelOptions,
    info: &Arc<ClientInfo>,
) -> Vec<PresenceEntry> {
    let mut out = Vec::with_capacity(2);
    if !o.map_clients_presence_channel_prefix.is_empty() {
        out.push((
            format!("{}{channel}", o.map_clients_presence_channel_prefix).into(),
            info.client.clone(),
            Some(info.clone()),
        ));
    }
    if !o.map_users_presence_channel_prefix.is_empty() && !info.user.is_empty() {
        out.push((
            format!("{}{channel}", o.map_users_presence_channel_prefix).into(),
            info.user.clone(),
            None,
        ));
    }
    out
}

impl Node {
    /// A subscription to `channel` went live: its connection and user enter the channel's
    /// presence maps (the first local holder of a key writes it).
    pub(crate) async fn presence_maps_join(
        &self,
        channel: &str,
        o: &ChannelOptions,
        info: &Arc<ClientInfo>,
    ) {
        for (pch, key, entry_info) in presence_entries(channel, o, info) {
            let first = {
                let mut keys = self.inner.presence_keys.lock();
                let slot = keys
                    .entry((pch.clone(), key.clone()))
                    .or_insert((0, entry_info.clone()));
                slot.0 += 1;
                slot.0 == 1
            };
            if first {
                self.write_presence_entry(&pch, &key, entry_info).await;
            }
        }
        metrics::gauge!("holdfast_map_presence_entries")
            .set(self.inner.presence_keys.lock().len() as f64);
    }

    /// A subscription to `channel` ended: a connection's entry is removed at once; a user's
    /// stays until its `key_ttl` passes without another subscription of the user refreshing it.
    pub(crate) async fn presence_maps_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        let Ok(resolved) = self.inner.rules.resolve(channel) else {
            return;
        };
        for (pch, key, entry_info) in presence_entries(channel, &resolved.options, info) {
            let last = {
                let mut keys = self.inner.presence_keys.lock();
                let k = (pch.clone(), key.clone());
                match keys.get_mut(&k) {
                    Some(slot) if slot.0 > 1 => {
                        slot.0 -= 1;
                        false
                    }
                    Some(_) => {
                        keys.remove(&k);
                        true
                    }
                    None => false,
                }
            };
            if last && entry_info.is_some() {
                let w = MapWrite {
                    key: key.to_string(),
                    removed: true,
                    ..Default::default()
                };
                if let Err(e) = self.map_publish(&pch, w).await {
                    tracing::warn!(channel = %pch, code = e.code, "presence map remove failed");
                }
            }
        }
        metrics::gauge!("holdfast_map_presence_entries")
            .set(self.inner.presence_keys.lock().len() as f64);
    }

    async fn write_presence_entry(&self, pch: &str, key: &str, info: Option<Arc<ClientInfo>>) {
        let w = MapWrite {
            key: key.to_owned(),
            // A user's entry is written once; later subscribers of the user only keep it alive.
            key_mode: if info.is_some() {
                KeyMode::Any
            } else {
                KeyMode::IfNew
            },
            info,
            ..Default::default()
        };
        match self.map_publish(pch, w).await {
            // Another subscription of the user (here or on another node) wrote it: keep it for a
            // whole key_ttl from now, or it could expire before the next refresh touches it.
            Ok(out) if out.suppressed.is_some() => {
                if let Ok((_, settings)) = self.resolve_map(pch)
                    && let Err(e) = self
                        .inner
                        .maps
                        .touch(pch, &[key.to_owned()], &settings)
                        .await
                {
                    tracing::warn!(channel = %pch, error = %e, "presence map touch failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(channel = %pch, code = e.code, "presence map write failed"),
        }
    }

    /// Keeps this node's presence map entries alive: every third of the shortest presence
    /// `key_ttl`, each entry's expiry is pushed back (no stream entry), and an entry found
    /// missing (removed through the API, or expired while the node stalled) is written again.
    pub(super) fn start_presence_map_refresh(&self) {
        let cfg = &self.inner.config.channel;
        let ttl = std::iter::once(&cfg.without_namespace)
            .chain(cfg.namespaces.iter())
            .filter(|o| {
                matches!(
                    o.subscription_type,
                    SubscriptionType::MapClients | SubscriptionType::MapUsers
                )
            })
            .map(|o| o.map.key_ttl)
            .filter(|t| !t.is_zero())
            .min();
        let Some(ttl) = ttl else { return };
        let every = (ttl / 3).max(Duration::from_secs(1));
        let weak = Arc::downgrade(&self.inner);
        let stop = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                Node { inner }.refresh_presence_maps().await;
            }
        });
    }

    async fn refresh_presence_maps(&self) {
        let mut by_channel: std::collections::HashMap<Arc<str>, Vec<String>> =
            std::collections::HashMap::new();
        for (pch, key) in self.inner.presence_keys.lock().keys() {
            by_channel
                .entry(pch.clone())
                .or_default()
                .push(key.to_string());
        }
        for (pch, keys) in by_channel {
            let Ok((_, settings)) = self.resolve_map(&pch) else {
                continue;
            };
            let missing = match self.inner.maps.touch(&pch, &keys, &settings).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(channel = %pch, error = %e, "presence map refresh failed");
                    continue;
                }
            };
            for key in missing {
                let held = self
                    .inner
                    .presence_keys
                    .lock()
                    .get(&(pch.clone(), Arc::from(key.as_str())))
                    .map(|(_, info)| info.clone());
                if let Some(info) = held {
                    self.write_presence_entry(&pch, &key, info).await;
                }
            }
        }
    }
}
