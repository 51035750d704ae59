//! The registry of this node's connections: by client id, by user, and by channel, and the
//! fan-out of deliveries to them.
//!
//! Fan-out encodes a publication once and pushes the same bytes into each subscriber's outbox
//! with a non-blocking call; it never waits on a client.
//!
//! Lock order (every lock is a short, synchronous critical section; none is held across an
//! await): a channel shard of the hub (`channels`, read for fan-out, written to add or remove a
//! subscriber) → one subscription's state (`Subscription::state`) → that client's outbox
//! (`ClientHandle::send`) → that client's control queue (`ClientHandle::push_control`, when a
//! gap ends a subscription). The user and client maps (`users`, `clients`) are taken alone,
//! never while any of the above is held.

use crate::client::{ClientHandle, Control};
use crate::engine::BrokerHandler;
use crate::shard::Sharded;
use bytes::Bytes;
use holdfast_protocol::code::unsubscribe;
use holdfast_protocol::{ClientInfo, Disconnect, Encoding, Publication, Push};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 64;

/// Where a subscription is in its life.
#[derive(Debug)]
enum Phase {
    /// Subscribe in progress: deliveries are buffered until the reply is queued, then merged.
    Subscribing {
        buffer: Vec<(Arc<Publication>, Arc<str>)>,
        bytes: usize,
    },
    /// Deliveries go straight to the outbox.
    Live,
    /// Ended by fan-out (gap) or by the session: deliveries are ignored.
    Dead,
}

#[derive(Debug)]
struct SubState {
    phase: Phase,
    /// Deliveries are checked for gaps against `offset`/`epoch`.
    positioned: bool,
    /// Offset of the last publication delivered (or the subscribe position).
    offset: u64,
    epoch: Arc<str>,
}

/// One connection's subscription to one channel, shared between the session and the hub.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) client: Arc<ClientHandle>,
    pub(crate) channel: Arc<str>,
    /// The client's encoding, copied here: fan-out reads it for every delivery, and the
    /// subscription's line is already in cache then while the client's is not.
    encoding: Encoding,
    /// Made by the server (token `channels`, personal channel, API): a gap closes the
    /// connection with 3010 instead of unsubscribing with 2500.
    pub(crate) server_side: bool,
    /// Push join/leave events to this subscriber.
    pub(crate) push_join_leave: bool,
    /// Buffer limit while subscribing (the client's queue limit).
    max_buffer: usize,
    /// The user's delivery cursor follows this subscription: each delivery asks for a prompt
    /// confirmation ([`ClientHandle::note_cursor_delivery`]).
    cursor: std::sync::atomic::AtomicBool,
    state: Mutex<SubState>,
}

/// What `Subscription::go_live` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum GoLive {
    /// Live; the buffered publications past the reply were queued.
    Ok,
    /// A gap between the reply and the buffered publications.
    Gap,
    /// The subscription ended meanwhile.
    Dead,
    /// A buffered publication is binary and the connection speaks JSON.
    Binary,
}

impl Subscription {
    pub(crate) fn new(
        client: Arc<ClientHandle>,
        channel: Arc<str>,
        server_side: bool,
        push_join_leave: bool,
        max_buffer: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            encoding: client.encoding(),
            client,
            channel,
            server_side,
            push_join_leave,
            max_buffer,
            cursor: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(SubState {
                phase: Phase::Subscribing {
                    buffer: Vec::new(),
                    bytes: 0,
                },
                positioned: false,
                offset: 0,
                epoch: Arc::from(""),
            }),
        })
    }

    /// Ends buffering: publications buffered during subscribe with offsets past `offset` (the
    /// last one the reply gave) are queued after the reply, in order. With `positioned`, later
    /// deliveries are checked for gaps.
    pub(crate) fn go_live(&self, positioned: bool, offset: u64, epoch: &Arc<str>) -> GoLive {
        let mut st = self.state.lock();
        let buffer = match std::mem::replace(&mut st.phase, Phase::Live) {
            Phase::Subscribing { buffer, .. } => buffer,
            Phase::Dead => {
                st.phase = Phase::Dead;
                return GoLive::Dead;
            }
            Phase::Live => Vec::new(),
        };
        st.positioned = positioned;
        st.offset = offset;
        st.epoch = epoch.clone();
        for (p, p_epoch) in buffer {
            if positioned && p.offset > 0 {
                if !epoch.is_empty() && *p_epoch != **epoch {
                    st.phase = Phase::Dead;
                    return GoLive::Gap;
                }
                if p.offset <= st.offset {
                    continue; // already in the reply
                }
                if p.offset != st.offset + 1 {
                    st.phase = Phase::Dead;
                    return GoLive::Gap;
                }
                st.offset = p.offset;
            }
            match encode_pub(self.client.encoding(), &self.channel, &p) {
                Some(b) => {
                    self.client.send(b);
                }
                None => {
                    st.phase = Phase::Dead;
                    return GoLive::Binary;
                }
            }
        }
        GoLive::Ok
    }

    /// Marks the subscription as followed by a delivery cursor.
    pub(crate) fn set_cursor(&self) {
        self.cursor.store(true, Ordering::Release);
    }

    /// Position of the last publication queued to the client, while the subscription is live and
    /// positioned.
    pub(crate) fn live_position(&self) -> Option<(u64, Arc<str>)> {
        let st = self.state.lock();
        (matches!(st.phase, Phase::Live) && st.positioned && st.offset > 0)
            .then(|| (st.offset, st.epoch.clone()))
    }

    /// Tells the client when its position is behind `top` (deliveries may have been missed) or,
    /// with `rewound`, past `top` in the same epoch (its newest offsets will be reused).
    fn check_behind(&self, top: &crate::engine::StreamTop, rewound: bool) {
        let mut st = self.state.lock();
        let live = matches!(st.phase, Phase::Live) && st.positioned;
        let stale = if rewound {
            *st.epoch == *top.epoch && st.offset > top.offset
        } else {
            (!st.epoch.is_empty() && *st.epoch != *top.epoch) || st.offset < top.offset
        };
        if live && stale {
            st.phase = Phase::Dead;
            drop(st);
            self.lost();
        }
    }

    /// Stops deliveries; returns false when it was already dead.
    pub(crate) fn kill(&self) -> bool {
        let mut st = self.state.lock();
        !matches!(std::mem::replace(&mut st.phase, Phase::Dead), Phase::Dead)
    }

    fn deliver(&self, p: &Arc<Publication>, epoch: &Arc<str>, encoded: &mut EncodedPush<'_>) {
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Dead => return,
            Phase::Subscribing { buffer, bytes } => {
                *bytes += p.data.len() + 64;
                buffer.push((p.clone(), epoch.clone()));
                if *bytes > self.max_buffer {
                    st.phase = Phase::Dead;
                    drop(st);
                    self.client.close(Disconnect::SLOW);
                }
                return;
            }
            Phase::Live => {}
        }
        if st.positioned && p.offset > 0 {
            if st.epoch.is_empty() {
                st.epoch = epoch.clone();
            } else if *st.epoch != **epoch {
                st.phase = Phase::Dead;
                drop(st);
                self.lost();
                return;
            }
            if p.offset <= st.offset {
                return; // late duplicate
            }
            if p.offset != st.offset + 1 {
                st.phase = Phase::Dead;
                drop(st);
                self.lost();
                return;
            }
            st.offset = p.offset;
        }
        match encoded.bytes(self.encoding) {
            Some(bytes) => {
                if self.client.send(bytes) && self.cursor.load(Ordering::Relaxed) {
                    self.client.note_cursor_delivery();
                }
            }
            None => {
                st.phase = Phase::Dead;
                drop(st);
                self.client.close(Disconnect::INAPPROPRIATE_PROTOCOL);
            }
        }
    }

    /// A gap: the client is told, never silently skipped past.
    fn lost(&self) {
        metrics::counter!("holdfast_insufficient_state_total").increment(1);
        if self.server_side {
            self.client.close(Disconnect::INSUFFICIENT_STATE);
        } else {
            let (code, reason) = unsubscribe::INSUFFICIENT_STATE;
            let mut out = Vec::with_capacity(96);
            self.client.encoding().encode_push(
                &mut out,
                &Push::Unsubscribe {
                    channel: &self.channel,
                    code,
                    reason,
                },
            );
            self.client.send(out.into());
            self.client.push_control(Control::SubscriptionLost {
                channel: self.channel.clone(),
            });
        }
    }

    fn deliver_event(&self, encoded: &mut EncodedPush<'_>) {
        let st = self.state.lock();
        if matches!(st.phase, Phase::Live)
            && let Some(b) = encoded.bytes(self.encoding)
        {
            self.client.send(b);
        }
    }
}

/// A publication push for one connection's encoding; `None` when the data is binary and the
/// connection speaks JSON (it must be closed with 3506).
pub(crate) fn encode_pub(enc: Encoding, channel: &str, p: &Publication) -> Option<Bytes> {
    EncodedPush::new(
        Push::Pub {
            channel,
            publication: p,
        },
        p.binary,
    )
    .bytes(enc)
}

/// A push encoded at most once per encoding, shared by every receiver of that encoding.
pub(crate) struct EncodedPush<'a> {
    push: Push<'a>,
    /// The payload cannot be sent as JSON.
    binary: bool,
    json: Option<Bytes>,
    protobuf: Option<Bytes>,
}

impl<'a> EncodedPush<'a> {
    pub(crate) fn new(push: Push<'a>, binary: bool) -> Self {
        Self {
            push,
            binary,
            json: None,
            protobuf: None,
        }
    }

    /// The encoded bytes (`None`: binary payload for a JSON connection).
    pub(crate) fn bytes(&mut self, enc: Encoding) -> Option<Bytes> {
        if enc == Encoding::Json && self.binary {
            return None;
        }
        let slot = match enc {
            Encoding::Json => &mut self.json,
            Encoding::Protobuf => &mut self.protobuf,
        };
        let push = &self.push;
        Some(
            slot.get_or_insert_with(|| {
                let mut out = Vec::with_capacity(128);
                enc.encode_push(&mut out, push);
                out.into()
            })
            .clone(),
        )
    }
}

type ChannelSubs = HashMap<u64, Arc<Subscription>>;
type UserClients = Vec<Arc<ClientHandle>>;

/// Live counters of the hub.
#[derive(Debug, Default)]
pub struct HubCounts {
    /// Connections registered (connected).
    pub clients: AtomicU64,
    /// Distinct users with connections.
    pub users: AtomicU64,
    /// Channels with at least one local subscriber.
    pub channels: AtomicU64,
    /// Subscriptions.
    pub subscriptions: AtomicU64,
}

/// Sessions of this node by id, user and channel.
#[derive(Debug)]
pub struct Hub {
    /// channel → subscribers, sharded by channel hash. Read-locked during fan-out.
    channels: Sharded<RwLock<HashMap<Arc<str>, ChannelSubs>>>,
    /// client id → handle, for API calls that target one connection.
    clients: Sharded<Mutex<HashMap<Arc<str>, Arc<ClientHandle>>>>,
    /// user → that user's connections, for per-user limits and API calls.
    users: Sharded<Mutex<HashMap<Arc<str>, UserClients>>>,
    /// Gauges for `/health` and metrics.
    pub counts: HubCounts,
}

/// The user already has the maximum number of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimitReached;

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            channels: Sharded::new(SHARDS, || RwLock::new(HashMap::new())),
            clients: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
            users: Sharded::new(SHARDS, || Mutex::new(HashMap::new())),
            counts: HubCounts::default(),
        }
    }

    /// Registers a connected client; refuses when the user is at `limit` connections
    /// (0 = unlimited). Check and insert are one step, so concurrent connects cannot both pass.
    pub(crate) fn add_client(
        &self,
        client: &Arc<ClientHandle>,
        user: &Arc<str>,
        limit: usize,
    ) -> Result<Vec<Arc<ClientHandle>>, UserLimitReached> {
        {
            let mut users = self.users.get(user).lock();
            let list = users.entry(user.clone()).or_default();
            if limit > 0 && !user.is_empty() && list.len() >= limit {
                if list.is_empty() {
                    users.remove(user);
                }
                return Err(UserLimitReached);
            }
            if list.is_empty() {
                self.counts.users.fetch_add(1, Ordering::Relaxed);
            }
            list.push(client.clone());
        }
        self.clients
            .get(&client.id)
            .lock()
            .insert(client.id.clone(), client.clone());
        self.counts.clients.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .user_clients(user)
            .into_iter()
            .filter(|c| c.seq != client.seq)
            .collect())
    }

    pub(crate) fn remove_client(&self, client: &Arc<ClientHandle>, user: &str) {
        if self
            .clients
            .get(&client.id)
            .lock()
            .remove(&*client.id)
            .is_none()
        {
            return;
        }
        self.counts.clients.fetch_sub(1, Ordering::Relaxed);
        let mut users = self.users.get(user).lock();
        if let Some(list) = users.get_mut(user) {
            list.retain(|c| c.seq != client.seq);
            if list.is_empty() {
                users.remove(user);
                self.counts.users.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Connections of a user on this node.
    pub fn user_clients(&self, user: &str) -> Vec<Arc<ClientHandle>> {
        self.users
            .get(user)
            .lock()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// One connection by id.
    pub fn client(&self, id: &str) -> Option<Arc<ClientHandle>> {
        self.clients.get(id).lock().get(id).cloned()
    }

    /// Every connection (for shutdown).
    pub fn all_clients(&self) -> Vec<Arc<ClientHandle>> {
        self.clients
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Adds a subscription; true when it is the channel's first local subscriber.
    pub(crate) fn add_subscription(&self, sub: Arc<Subscription>) -> bool {
        let mut shard = self.channels.get(&sub.channel).write();
        let first = !shard.contains_key(&*sub.channel);
        let subs = shard.entry(sub.channel.clone()).or_default();
        if subs.insert(sub.client.seq, sub).is_none() {
            self.counts.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        if first {
            self.counts.channels.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Removes a subscription; true when the channel has no local subscriber left.
    pub(crate) fn remove_subscription(&self, channel: &str, client_seq: u64) -> bool {
        let mut shard = self.channels.get(channel).write();
        let Some(subs) = shard.get_mut(channel) else {
            return false;
        };
        if subs.remove(&client_seq).is_some() {
            self.counts.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        if subs.is_empty() {
            shard.remove(channel);
            self.counts.channels.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether a channel has local subscribers.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.get(channel).read().contains_key(channel)
    }

    /// Channels with local subscribers and their counts, filtered by `filter`.
    pub fn channels(&self, filter: impl Fn(&str) -> bool) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for shard in self.channels.iter() {
            for (ch, subs) in shard.read().iter() {
                if filter(ch) {
                    out.push((ch.to_string(), subs.len()));
                }
            }
        }
        out
    }

    fn broadcast_event(&self, channel: &str, push: Push<'_>) {
        let shard = self.channels.get(channel).read();
        if let Some(subs) = shard.get(channel) {
            let mut encoded = EncodedPush::new(push, false);
            for sub in subs.values().filter(|s| s.push_join_leave) {
                sub.deliver_event(&mut encoded);
            }
        }
    }
}

impl BrokerHandler for Hub {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        let shard = self.channels.get(channel).read();
        if let Some(subs) = shard.get(channel) {
            let mut encoded = EncodedPush::new(
                Push::Pub {
                    channel,
                    publication: p,
                },
                p.binary,
            );
            for sub in subs.values() {
                sub.deliver(p, epoch, &mut encoded);
            }
        }
    }

    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.broadcast_event(channel, Push::Join { channel, info });
    }

    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.broadcast_event(channel, Push::Leave { channel, info });
    }

    fn check_position(&self, channel: &str, top: &crate::engine::StreamTop) {
        let shard = self.channels.get(channel).read();
        if let Some(subs) = shard.get(channel) {
            for sub in subs.values() {
                sub.check_behind(top, false);
            }
        }
    }

    fn on_rewind(&self, channel: &str, top: &crate::engine::StreamTop) {
        let shard = self.channels.get(channel).read();
        if let Some(subs) = shard.get(channel) {
            for sub in subs.values() {
                sub.check_behind(top, true);
            }
        }
    }
}
