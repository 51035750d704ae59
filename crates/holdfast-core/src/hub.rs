//! The registry of this node's connections: by client id, by user, and by channel, and the
//! fan-out of deliveries to them.
//!
//! Fan-out encodes a publication once per form (encoding × plain, delta-full or delta-patch ×
//! channel name or compaction id) and pushes the same bytes into each subscriber's outbox with a
//! non-blocking call; it never waits on a client. A fossil delta is computed once per
//! publication against the channel's previous one on this node (its delta chain) and shared by
//! every subscriber whose base is that previous publication; a tag filter is evaluated once per
//! publication per distinct filter in the channel.
//!
//! Lock order (every lock is a short, synchronous critical section; none is held across an
//! await): a channel shard of the hub (`channels`, read for fan-out, written to add or remove a
//! subscriber) → that channel's delta chain (`ChannelEntry::chain`) → one subscription's state
//! (`Subscription::state`) → that client's outbox
//! (`ClientHandle::send`) → that client's control queue (`ClientHandle::push_control`, when a
//! gap ends a subscription). The user and client maps (`users`, `clients`) are taken alone,
//! never while any of the above is held.

use crate::client::{ClientHandle, Control};
use crate::engine::BrokerHandler;
use crate::filter::Filter;
use crate::shard::Sharded;
use crate::trace::TraceEvent;
use bytes::Bytes;
use holdfast_protocol::code::unsubscribe;
use holdfast_protocol::{ClientInfo, Disconnect, Encoding, Publication, Push};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

const SHARDS: usize = 64;

/// Where a subscription is in its life.
#[derive(Debug)]
enum Phase {
    /// Subscribe in progress: deliveries are buffered until the reply is queued, then merged.
    Subscribing {
        /// Publication, its epoch, and its number in the channel's delta chain.
        buffer: Vec<(Arc<Publication>, Arc<str>, u64)>,
        bytes: usize,
        /// Position checks that came meanwhile (a broker reconnect, a cleared map channel),
        /// with their `rewound` flag: applied once the subscription's position is known.
        checks: Vec<(crate::engine::StreamTop, bool)>,
    },
    /// Deliveries go straight to the outbox.
    Live,
    /// Ended by fan-out (gap) or by the session: deliveries are ignored.
    Dead,
}

/// Position checks kept per subscribing subscription (the newest).
const MAX_PENDING_CHECKS: usize = 8;

/// Whether a subscriber at (`offset`, `epoch`) missed something by `top` (or, `rewound`, is
/// past it in the same epoch, so its newest offsets will name other publications).
fn behind(offset: u64, epoch: &str, top: &crate::engine::StreamTop, rewound: bool) -> bool {
    if rewound {
        *epoch == *top.epoch && offset > top.offset
    } else {
        (!epoch.is_empty() && *epoch != *top.epoch) || offset < top.offset
    }
}

#[derive(Debug)]
struct SubState {
    phase: Phase,
    /// Deliveries are checked for gaps against `offset`/`epoch`.
    positioned: bool,
    /// Offset of the last publication delivered (or the subscribe position).
    offset: u64,
    epoch: Arc<str>,
    /// Delta subscriptions: the number (in the channel's delta chain) of the last publication
    /// the client holds as its delta base; 0 = none the chain knows, so the next goes in full.
    base_seq: u64,
    /// Only publications whose tags match are sent (interned per channel by the hub).
    filter: Option<Arc<Filter>>,
}

/// How one subscription receives publications, fixed at subscribe.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeliveryOptions {
    /// Fossil delta compression was negotiated.
    pub(crate) delta: bool,
    /// Channel compaction was negotiated: pushes carry the channel's id on this node.
    pub(crate) compact: bool,
    /// Tag filter (the client's, and-ed with a server-side one).
    pub(crate) filter: Option<Filter>,
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
    /// Publications go in the delta decoder's form (see [`DeliveryOptions::delta`]).
    delta: bool,
    /// Channel compaction asked for; the id is set when the hub registers the subscription.
    compact: bool,
    /// Compaction id pushes carry instead of the channel (0 = the channel's name).
    compact_id: AtomicI64,
    /// The filter until the hub interns it into the state.
    filter: Mutex<Option<Filter>>,
    state: Mutex<SubState>,
}

/// The form a publication takes for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `data` as published.
    Plain,
    /// For a delta subscriber, in full (JSON: `data` as a string), `delta` unset.
    Full,
    /// For a delta subscriber whose base is the previous publication: a fossil delta (or in
    /// full when the delta would not be smaller).
    Patch,
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
        delivery: DeliveryOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            encoding: client.encoding(),
            client,
            channel,
            server_side,
            push_join_leave,
            max_buffer,
            cursor: std::sync::atomic::AtomicBool::new(false),
            delta: delivery.delta,
            compact: delivery.compact,
            compact_id: AtomicI64::new(0),
            filter: Mutex::new(delivery.filter),
            state: Mutex::new(SubState {
                phase: Phase::Subscribing {
                    buffer: Vec::new(),
                    bytes: 0,
                    checks: Vec::new(),
                },
                positioned: false,
                offset: 0,
                epoch: Arc::from(""),
                base_seq: 0,
                filter: None,
            }),
        })
    }

    /// The compaction id of the subscription (0 = none), known once the hub registered it.
    pub(crate) fn compact_id(&self) -> i64 {
        self.compact_id.load(Ordering::Relaxed)
    }

    /// Whether a publication passes the subscription's filter.
    pub(crate) fn accepts(&self, p: &Publication) -> bool {
        self.state
            .lock()
            .filter
            .as_ref()
            .is_none_or(|f| f.matches(p.tags.as_deref()))
    }

    /// One publication encoded for this subscriber alone (replies, buffered deliveries).
    fn encode_one(&self, p: &Publication, form: Form) -> Option<Bytes> {
        Fanout::new(&self.channel, p, self.compact_id(), None, 0, 0).bytes(
            self.encoding,
            form,
            self.compact,
        )
    }

    /// Ends buffering: publications buffered during subscribe with offsets past `offset` (the
    /// last one the reply gave) are queued after the reply, in order. With `positioned`, later
    /// deliveries are checked for gaps.
    ///
    /// A delta subscription's base is then the last publication the client got (buffered, or
    /// the last of `recovered`); it joins the channel's delta chain when that is the chain's
    /// last publication, or seeds an empty chain with it.
    pub(crate) fn go_live(
        &self,
        positioned: bool,
        offset: u64,
        epoch: &Arc<str>,
        recovered: Option<&Arc<Publication>>,
        hub: &Hub,
    ) -> GoLive {
        let shard = self.delta.then(|| hub.channels.get(&self.channel).read());
        let entry = shard.as_ref().and_then(|s| s.get(&*self.channel));
        let mut chain = entry.map(|e| e.chain.lock());
        let mut st = self.state.lock();
        let (buffer, checks) = match std::mem::replace(&mut st.phase, Phase::Live) {
            Phase::Subscribing { buffer, checks, .. } => (buffer, checks),
            Phase::Dead => {
                st.phase = Phase::Dead;
                return GoLive::Dead;
            }
            Phase::Live => (Vec::new(), Vec::new()),
        };
        st.positioned = positioned;
        st.offset = offset;
        st.epoch = epoch.clone();
        let mut base = None;
        for (p, p_epoch, seq) in buffer {
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
            if st
                .filter
                .as_ref()
                .is_some_and(|f| !f.matches(p.tags.as_deref()))
            {
                continue;
            }
            let form = if self.delta { Form::Full } else { Form::Plain };
            match self.encode_one(&p, form) {
                Some(b) => {
                    self.client.send(b);
                    base = Some(seq);
                }
                None => {
                    st.phase = Phase::Dead;
                    return GoLive::Binary;
                }
            }
        }
        // Checks that came while subscribing: a top the broker vouched for that the reply and
        // the buffered deliveries do not reach, or another epoch, is a gap; a rewind judges the
        // reply's position (whether the buffered ones came before it cannot be known).
        if positioned
            && checks.iter().any(|(top, rewound)| {
                let at = if *rewound { offset } else { st.offset };
                behind(at, &st.epoch, top, *rewound)
            })
        {
            st.phase = Phase::Dead;
            return GoLive::Gap;
        }
        if base.is_none()
            && let (Some(chain), Some(r)) = (chain.as_deref_mut(), recovered)
        {
            base = Some(chain.adopt(r, epoch));
        }
        if self.delta {
            st.base_seq = base.unwrap_or(0);
        }
        drop(chain);
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
        if let Phase::Subscribing { checks, .. } = &mut st.phase {
            // Judged at go_live; a handful is plenty (each is a reconnect or a clear).
            if checks.len() == MAX_PENDING_CHECKS {
                checks.remove(0);
            }
            checks.push((top.clone(), rewound));
            return;
        }
        let live = matches!(st.phase, Phase::Live) && st.positioned;
        if live && behind(st.offset, &st.epoch, top, rewound) {
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

    fn deliver(
        &self,
        p: &Arc<Publication>,
        epoch: &Arc<str>,
        fan: &mut Fanout<'_>,
        matched: &HashMap<usize, bool>,
    ) {
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Dead => return,
            Phase::Subscribing { buffer, bytes, .. } => {
                *bytes += p.data.len() + 64;
                buffer.push((p.clone(), epoch.clone(), fan.seq));
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
        if let Some(f) = &st.filter {
            // A filtered-out publication still moved the position above; it is not sent.
            let key = Arc::as_ptr(f) as usize;
            let pass = matched
                .get(&key)
                .copied()
                .unwrap_or_else(|| f.matches(p.tags.as_deref()));
            if !pass {
                metrics::counter!("holdfast_tags_filter_dropped_total").increment(1);
                return;
            }
        }
        let form = if !self.delta {
            Form::Plain
        } else if st.base_seq != 0 && st.base_seq == fan.prev_seq {
            Form::Patch
        } else {
            Form::Full
        };
        if self.delta {
            st.base_seq = fan.seq;
        }
        match fan.bytes(self.encoding, form, self.compact) {
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
            && let Some(b) = encoded.bytes(self.encoding, self.compact)
        {
            self.client.send(b);
        }
    }
}

/// The fossil delta from `prev` to `p` when the publisher allows one and it is smaller than
/// the payload. Inserts hold whole UTF-8 characters for JSON payloads, so the delta can travel
/// in a JSON string.
pub(crate) fn patch(prev: &Publication, p: &Publication) -> Option<Bytes> {
    // The delta is computed on the fan-out path: beyond this size the payload goes in full
    // rather than holding the channel's fan-out for the encoder.
    const MAX_DELTA_INPUT: usize = 1 << 20;
    if !p.use_delta || p.data.len() > MAX_DELTA_INPUT || prev.data.len() > MAX_DELTA_INPUT {
        return None;
    }
    let d = crate::fossil::delta(&prev.data, &p.data, !p.binary);
    (d.len() < p.data.len()).then(|| Bytes::from(d))
}

/// The per-subscriber form of a publication for a delta subscriber: `patch` (a delta) or the
/// payload, as the client's delta decoder reads it (JSON: inside a string). `None` when it
/// cannot be sent to a JSON connection (binary data).
pub(crate) fn delta_form(
    enc: Encoding,
    p: &Publication,
    patch: Option<&Bytes>,
) -> Option<Publication> {
    let (data, delta) = match patch {
        Some(d) => (d.clone(), true),
        None => (p.data.clone(), false),
    };
    let data = match enc {
        Encoding::Protobuf => data,
        Encoding::Json => {
            if p.binary {
                return None;
            }
            let text = std::str::from_utf8(&data).ok()?;
            let mut out = Vec::with_capacity(text.len() + 16);
            holdfast_protocol::json::write_str(&mut out, text);
            Bytes::from(out)
        }
    };
    Some(Publication {
        data,
        delta,
        binary: false,
        ..p.clone()
    })
}

/// One publication's pushes, each form encoded at most once and shared by every receiver of
/// that form; the delta against the chain's previous publication is computed at most once.
pub(crate) struct Fanout<'a> {
    channel: &'a str,
    publication: &'a Publication,
    /// The channel's compaction id on this node.
    id: i64,
    /// The chain's previous publication (delta base of subscribers at `prev_seq`).
    prev: Option<Arc<Publication>>,
    /// Chain number of `prev` (0 = none).
    prev_seq: u64,
    /// Chain number of this publication.
    seq: u64,
    /// The delta against `prev`, once computed (`Some(None)`: none applies).
    patch: Option<Option<Bytes>>,
    /// Encoded bytes by encoding × form × compaction (`Some(None)`: cannot be sent as JSON).
    slots: [Option<Option<Bytes>>; 12],
}

impl<'a> Fanout<'a> {
    fn new(
        channel: &'a str,
        publication: &'a Publication,
        id: i64,
        prev: Option<Arc<Publication>>,
        prev_seq: u64,
        seq: u64,
    ) -> Self {
        Self {
            channel,
            publication,
            id,
            prev,
            prev_seq,
            seq,
            patch: None,
            slots: Default::default(),
        }
    }

    /// The encoded push (`None`: binary payload for a JSON connection).
    fn bytes(&mut self, enc: Encoding, form: Form, compact: bool) -> Option<Bytes> {
        let p = self.publication;
        if enc == Encoding::Json && p.binary {
            return None;
        }
        let form = if form == Form::Patch {
            let prev = self.prev.as_deref();
            let patch = self
                .patch
                .get_or_insert_with(|| prev.and_then(|prev| patch(prev, p)));
            if patch.is_some() {
                Form::Patch
            } else {
                Form::Full
            }
        } else {
            form
        };
        // Protobuf carries a full payload the same way for every subscriber.
        let form = match (enc, form) {
            (Encoding::Protobuf, Form::Full) => Form::Plain,
            _ => form,
        };
        let id = if compact { self.id } else { 0 };
        let idx = usize::from(enc == Encoding::Protobuf) * 6
            + match form {
                Form::Plain => 0,
                Form::Full => 2,
                Form::Patch => 4,
            }
            + usize::from(id > 0);
        if let Some(b) = &self.slots[idx] {
            return b.clone();
        }
        let shaped;
        let publication = match form {
            Form::Plain => p,
            Form::Full => match delta_form(enc, p, None) {
                Some(x) => {
                    shaped = x;
                    &shaped
                }
                None => {
                    self.slots[idx] = Some(None);
                    return None;
                }
            },
            Form::Patch => match delta_form(enc, p, self.patch.as_ref().and_then(Option::as_ref)) {
                Some(x) => {
                    shaped = x;
                    &shaped
                }
                None => {
                    self.slots[idx] = Some(None);
                    return None;
                }
            },
        };
        let mut out = Vec::with_capacity(128 + publication.data.len());
        enc.encode_push_id(
            &mut out,
            &Push::Pub {
                channel: self.channel,
                publication,
            },
            id,
        );
        let b = Some(Bytes::from(out));
        self.slots[idx] = Some(b.clone());
        b
    }
}

/// A push encoded at most once per encoding and naming (channel or compaction id), shared by
/// every receiver of that kind.
pub(crate) struct EncodedPush<'a> {
    push: Push<'a>,
    /// The payload cannot be sent as JSON.
    binary: bool,
    /// The channel's compaction id on this node.
    id: i64,
    slots: [Option<Bytes>; 4],
}

impl<'a> EncodedPush<'a> {
    pub(crate) fn new(push: Push<'a>, binary: bool, id: i64) -> Self {
        Self {
            push,
            binary,
            id,
            slots: Default::default(),
        }
    }

    /// The encoded bytes (`None`: binary payload for a JSON connection).
    pub(crate) fn bytes(&mut self, enc: Encoding, compact: bool) -> Option<Bytes> {
        if enc == Encoding::Json && self.binary {
            return None;
        }
        let id = if compact { self.id } else { 0 };
        let idx = usize::from(enc == Encoding::Protobuf) * 2 + usize::from(id > 0);
        let push = &self.push;
        Some(
            self.slots[idx]
                .get_or_insert_with(|| {
                    let mut out = Vec::with_capacity(128);
                    enc.encode_push_id(&mut out, push, id);
                    out.into()
                })
                .clone(),
        )
    }
}

/// The delta chain of a channel on this node: the last publication fanned out here, so the
/// next one's delta is computed once for every subscriber whose base it is.
#[derive(Debug, Default)]
struct Chain {
    /// Kept only while the channel has delta subscribers.
    last: Option<Arc<Publication>>,
    /// Epoch of `last`.
    epoch: Arc<str>,
    /// Number of `last` (every publication fanned out here gets the next number).
    seq: u64,
    /// Delta subscribers of the channel here.
    delta_subs: usize,
}

impl Chain {
    /// A subscriber's client holds `p` (the last publication it recovered, of `epoch`) as its
    /// base: the chain number of that base. When the chain's last publication is not `p`, `p`
    /// becomes it (a recovered publication is the stream's newest at subscribe time: nothing
    /// newer reached this node yet, or it would have been buffered and sent after it).
    fn adopt(&mut self, p: &Arc<Publication>, epoch: &Arc<str>) -> u64 {
        let same = self
            .last
            .as_ref()
            .is_some_and(|l| p.offset > 0 && l.offset == p.offset && *self.epoch == **epoch);
        if !same {
            self.seq += 1;
            self.last = Some(p.clone());
            self.epoch = epoch.clone();
        }
        self.seq
    }
}

/// One channel's local subscribers and fan-out state.
#[derive(Debug, Default)]
struct ChannelEntry {
    subs: HashMap<u64, Arc<Subscription>>,
    /// Compaction id of the channel on this node (> 0, unique among its channels).
    id: i64,
    chain: Mutex<Chain>,
    /// Distinct tag filters of the subscribers, with how many use each: evaluated once per
    /// publication each.
    filters: HashMap<Arc<Filter>, usize>,
}

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
    channels: Sharded<RwLock<HashMap<Arc<str>, ChannelEntry>>>,
    /// Source of channel compaction ids.
    next_channel_id: AtomicI64,
    /// client id → handle, for API calls that target one connection.
    clients: Sharded<Mutex<HashMap<Arc<str>, Arc<ClientHandle>>>>,
    /// user → that user's connections, for per-user limits and API calls.
    users: Sharded<Mutex<HashMap<Arc<str>, UserClients>>>,
    /// Gauges for `/health` and metrics.
    pub counts: HubCounts,
    /// Operators' live traces.
    pub tracer: crate::trace::Tracer,
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
            next_channel_id: AtomicI64::new(1),
            counts: HubCounts::default(),
            tracer: crate::trace::Tracer::default(),
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
        let entry = shard
            .entry(sub.channel.clone())
            .or_insert_with(|| ChannelEntry {
                id: self.next_channel_id.fetch_add(1, Ordering::Relaxed),
                ..Default::default()
            });
        if sub.compact {
            sub.compact_id.store(entry.id, Ordering::Relaxed);
        }
        if sub.delta {
            entry.chain.lock().delta_subs += 1;
        }
        if let Some(f) = sub.filter.lock().take() {
            let f = Arc::new(f);
            let f = match entry.filters.get_key_value(&f) {
                Some((k, _)) => k.clone(),
                None => f,
            };
            *entry.filters.entry(f.clone()).or_insert(0) += 1;
            sub.state.lock().filter = Some(f);
        }
        if self.tracer.active() {
            self.trace_subscription(&sub, true);
        }
        if let Some(old) = entry.subs.insert(sub.client.seq, sub) {
            Self::release(entry, &old);
        } else {
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
        let Some(entry) = shard.get_mut(channel) else {
            return false;
        };
        if let Some(old) = entry.subs.remove(&client_seq) {
            Self::release(entry, &old);
            self.counts.subscriptions.fetch_sub(1, Ordering::Relaxed);
            if self.tracer.active() {
                self.trace_subscription(&old, false);
            }
        }
        if entry.subs.is_empty() {
            shard.remove(channel);
            self.counts.channels.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// What a subscription held in its channel entry: its delta chain share and its filter.
    fn release(entry: &mut ChannelEntry, sub: &Subscription) {
        if sub.delta {
            let mut chain = entry.chain.lock();
            chain.delta_subs = chain.delta_subs.saturating_sub(1);
            if chain.delta_subs == 0 {
                chain.last = None;
            }
        }
        if let Some(f) = sub.state.lock().filter.clone()
            && let Some(n) = entry.filters.get_mut(&f)
        {
            *n -= 1;
            if *n == 0 {
                entry.filters.remove(&f);
            }
        }
    }

    fn trace_subscription(&self, sub: &Subscription, subscribed: bool) {
        let user = sub.client.user();
        self.tracer.offer(Some(&sub.channel), Some(user), || {
            let (channel, user, client) =
                (sub.channel.clone(), Arc::from(user), sub.client.id.clone());
            if subscribed {
                TraceEvent::Subscribe {
                    channel,
                    user,
                    client,
                }
            } else {
                TraceEvent::Unsubscribe {
                    channel,
                    user,
                    client,
                }
            }
        });
    }

    /// The channels each of `clients` (by `seq`) is subscribed to, at most `per_client` each,
    /// sorted: one pass over every channel of the node (for operators' tools, not hot paths).
    pub fn channels_of(
        &self,
        clients: &std::collections::HashSet<u64>,
        per_client: usize,
    ) -> HashMap<u64, Vec<String>> {
        let mut out: HashMap<u64, Vec<String>> = HashMap::new();
        for shard in self.channels.iter() {
            for (ch, entry) in shard.read().iter() {
                for seq in clients {
                    if entry.subs.contains_key(seq) {
                        let list = out.entry(*seq).or_default();
                        if list.len() < per_client {
                            list.push(ch.to_string());
                        }
                    }
                }
            }
        }
        for list in out.values_mut() {
            list.sort();
        }
        out
    }

    /// A connection's small number (the key of its subscriptions in [`Hub::channels_of`]).
    pub fn client_seq(client: &ClientHandle) -> u64 {
        client.seq
    }

    /// Whether a channel has local subscribers.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.channels.get(channel).read().contains_key(channel)
    }

    /// Channels with local subscribers and their counts, filtered by `filter`.
    pub fn channels(&self, filter: impl Fn(&str) -> bool) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for shard in self.channels.iter() {
            for (ch, entry) in shard.read().iter() {
                if filter(ch) {
                    out.push((ch.to_string(), entry.subs.len()));
                }
            }
        }
        out
    }

    fn broadcast_event(&self, channel: &str, push: Push<'_>) {
        let shard = self.channels.get(channel).read();
        if let Some(entry) = shard.get(channel) {
            let mut encoded = EncodedPush::new(push, false, entry.id);
            for sub in entry.subs.values().filter(|s| s.push_join_leave) {
                sub.deliver_event(&mut encoded);
            }
        }
    }
}

/// A publication as a trace shows it (built only when a tracer wants it).
fn trace_publication<'a>(
    channel: &'a str,
    p: &'a Arc<Publication>,
) -> impl FnOnce() -> TraceEvent + Copy + 'a {
    move || TraceEvent::Publication {
        channel: channel.into(),
        offset: p.offset,
        data: p.data.clone(),
        binary: p.binary,
    }
}

impl BrokerHandler for Hub {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        let shard = self.channels.get(channel).read();
        if let Some(entry) = shard.get(channel) {
            let mut chain = entry.chain.lock();
            let prev = chain.last.take();
            let prev_seq = if prev.is_some() { chain.seq } else { 0 };
            chain.seq += 1;
            let mut fan = Fanout::new(channel, p, entry.id, prev, prev_seq, chain.seq);
            if chain.delta_subs > 0 {
                chain.last = Some(p.clone());
                chain.epoch = epoch.clone();
            }
            // Each distinct filter once per publication, not once per subscriber.
            let matched: HashMap<usize, bool> = entry
                .filters
                .keys()
                .map(|f| (Arc::as_ptr(f) as usize, f.matches(p.tags.as_deref())))
                .collect();
            for sub in entry.subs.values() {
                sub.deliver(p, epoch, &mut fan, &matched);
            }
            if self.tracer.active() {
                // Followed users with a connection here subscribed (their few connections
                // looked up, not the channel's subscribers scanned).
                for user in self.tracer.users() {
                    if self
                        .user_clients(&user)
                        .iter()
                        .any(|c| entry.subs.contains_key(&c.seq))
                    {
                        self.tracer
                            .offer(None, Some(&user), trace_publication(channel, p));
                    }
                }
            }
        }
        // A followed channel's publications, received by this node or not.
        self.tracer
            .offer(Some(channel), None, trace_publication(channel, p));
    }

    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.broadcast_event(channel, Push::Join { channel, info });
        self.tracer.offer(Some(channel), None, || TraceEvent::Join {
            channel: channel.into(),
            user: info.user.clone(),
            client: info.client.clone(),
        });
    }

    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.broadcast_event(channel, Push::Leave { channel, info });
        self.tracer
            .offer(Some(channel), None, || TraceEvent::Leave {
                channel: channel.into(),
                user: info.user.clone(),
                client: info.client.clone(),
            });
    }

    fn check_position(&self, channel: &str, top: &crate::engine::StreamTop) {
        let shard = self.channels.get(channel).read();
        if let Some(entry) = shard.get(channel) {
            for sub in entry.subs.values() {
                sub.check_behind(top, false);
            }
        }
    }

    fn on_rewind(&self, channel: &str, top: &crate::engine::StreamTop) {
        let shard = self.channels.get(channel).read();
        if let Some(entry) = shard.get(channel) {
            for sub in entry.subs.values() {
                sub.check_behind(top, true);
            }
        }
    }
}
