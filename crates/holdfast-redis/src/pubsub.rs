//! Pub/sub shards: each owns one RESP3 connection (a cluster connection in cluster mode) that
//! carries the subscriptions of the channels hashed to it, in order.
//!
//! A shard subscribes a channel before the node reads its history (so nothing published after
//! the read can be missed), batches subscribe requests, probes its connection with a command on
//! the same socket every `ping_interval` and rebuilds it when the probe fails, the server closes
//! it, or a subscribe fails. After a rebuild every channel is subscribed again and then its
//! stream position is compared with what the node's subscribers hold, so a subscriber that
//! missed deliveries while the connection was down is told to recover; never silently skipped.

use crate::codec::{self, Wire};
use crate::{Shared, Target};
use holdfast_core::engine::{EngineError, StreamTop};
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests to a shard.
#[derive(Debug)]
pub(crate) enum ShardCmd {
    Subscribe(String, oneshot::Sender<Result<(), EngineError>>),
    Unsubscribe(String),
}

/// A running shard.
#[derive(Debug)]
pub(crate) struct ShardHandle {
    pub(crate) tx: mpsc::UnboundedSender<ShardCmd>,
    pub(crate) connected: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ShardHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The last position this node saw delivered per channel, to notice a stream that went back.
type Seen = Arc<Mutex<HashMap<Arc<str>, (Arc<str>, u64)>>>;

enum Link {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Link {
    async fn open(
        target: &Target,
        push: mpsc::UnboundedSender<PushInfo>,
        shared: &Shared,
    ) -> redis::RedisResult<Self> {
        let t = shared.cfg.connect_timeout;
        let located;
        let target = match target {
            Target::Sentinel(s) => {
                located = Target::Single(s.master(t).await?);
                &located
            }
            other => other,
        };
        match target {
            Target::Sentinel(_) => unreachable!("located above"),
            Target::Single(client) => {
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(t))
                    .set_response_timeout(Some(shared.cfg.command_timeout))
                    .set_push_sender(push);
                Ok(Self::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
            Target::Cluster(client) => {
                let cfg = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(t)
                    .set_response_timeout(shared.cfg.command_timeout)
                    .set_push_sender(push);
                Ok(Self::Cluster(
                    client.get_async_connection_with_config(cfg).await?,
                ))
            }
        }
    }

    /// Subscribes (`on`) or unsubscribes `names` (Redis channel names), grouped by hash slot
    /// in cluster mode.
    async fn set(&mut self, names: &[String], on: bool) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => {
                for chunk in names.chunks(512) {
                    if on {
                        c.subscribe(chunk).await?;
                    } else {
                        c.unsubscribe(chunk).await?;
                    }
                }
            }
            Self::Cluster(c) => {
                for group in by_tag(names) {
                    for chunk in group.chunks(512) {
                        if on {
                            c.ssubscribe(chunk).await?;
                        } else {
                            c.sunsubscribe(chunk).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A round trip over the connection(s) carrying the subscriptions.
    async fn probe(&mut self, names: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => redis::cmd("PING").query_async::<()>(c).await,
            Self::Cluster(c) => {
                // One keyed command per hash tag routes over the node connection that holds
                // that tag's shard subscriptions.
                let mut tags: Vec<&str> = names.iter().filter_map(|n| tag(n)).collect();
                tags.sort_unstable();
                tags.dedup();
                for t in tags {
                    redis::cmd("EXISTS")
                        .arg(format!("{{{t}}}:probe"))
                        .query_async::<()>(c)
                        .await?;
                }
                Ok(())
            }
        }
    }
}

/// The `{tag}` of a Redis key or channel name.
fn tag(name: &str) -> Option<&str> {
    let open = name.find('{')?;
    let close = name[open + 1..].find('}')? + open + 1;
    Some(&name[open + 1..close])
}

fn by_tag(names: &[String]) -> Vec<Vec<String>> {
    let mut groups: HashMap<&str, Vec<String>> = HashMap::new();
    for n in names {
        groups
            .entry(tag(n).unwrap_or(""))
            .or_default()
            .push(n.clone());
    }
    groups.into_values().collect()
}

/// Starts a shard over `target`. `instance` indexes the engine's command connections (for the
/// position reads after a rebuild); `control` makes this shard carry the control channel.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    target: Target,
    instance: usize,
    control: bool,
) -> ShardHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let connected = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(run(
        shared,
        target,
        instance,
        control,
        rx,
        connected.clone(),
    ));
    ShardHandle {
        tx,
        connected,
        task,
    }
}

async fn run(
    shared: Arc<Shared>,
    target: Target,
    instance: usize,
    control: bool,
    mut rx: mpsc::UnboundedReceiver<ShardCmd>,
    connected: Arc<AtomicBool>,
) {
    // Node channels this shard is subscribed to (the wanted set survives rebuilds).
    let mut channels: HashSet<Arc<str>> = HashSet::new();
    let seen: Seen = Arc::default();
    let mut backoff = Duration::from_millis(50);
    let mut connects = 0u64;
    loop {
        let (push_tx, mut push_rx) = mpsc::unbounded_channel();
        let mut link = match Link::open(&target, push_tx, &shared).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(instance, error = %e, "redis pub/sub connect failed");
                metrics::counter!("holdfast_redis_reconnects_total").increment(1);
                if !wait_refusing(&mut rx, &mut channels, &seen, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut names: Vec<String> = channels.iter().map(|c| shared.keys.pubsub(c)).collect();
        if control {
            names.push(shared.keys.control().to_owned());
        }
        if let Err(e) = link.set(&names, true).await {
            tracing::warn!(instance, error = %e, "redis resubscribe failed");
            if !wait_refusing(&mut rx, &mut channels, &seen, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        }
        backoff = Duration::from_millis(50);
        connected.store(true, Ordering::Release);
        shared.connected.notify_waiters();
        connects += 1;
        if connects > 1 {
            tracing::info!(
                instance,
                channels = channels.len(),
                "redis pub/sub reconnected"
            );
            // Deliveries between the old connection's end and the resubscribe are lost on
            // the wire: compare positions now that new ones flow again.
            let list: Vec<Arc<str>> = channels.iter().cloned().collect();
            tokio::spawn(check_positions(
                shared.clone(),
                instance,
                list,
                seen.clone(),
            ));
        }
        let reason = serve(
            &shared,
            &mut link,
            &mut rx,
            &mut push_rx,
            &mut channels,
            &seen,
            control,
        )
        .await;
        connected.store(false, Ordering::Release);
        // Whatever arrived before the end is still in order: deliver it.
        while let Ok(p) = push_rx.try_recv() {
            dispatch(&shared, p, &seen);
        }
        match reason {
            End::Closed => return,
            End::Broken(why) => {
                metrics::counter!("holdfast_redis_reconnects_total").increment(1);
                tracing::warn!(instance, reason = %why, "redis pub/sub connection lost; rebuilding");
            }
        }
    }
}

enum End {
    Closed,
    Broken(String),
}

async fn serve(
    shared: &Shared,
    link: &mut Link,
    rx: &mut mpsc::UnboundedReceiver<ShardCmd>,
    push_rx: &mut mpsc::UnboundedReceiver<PushInfo>,
    channels: &mut HashSet<Arc<str>>,
    seen: &Seen,
    control: bool,
) -> End {
    let mut tick = tokio::time::interval(shared.cfg.ping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tokio::select! {
            biased;
            p = push_rx.recv() => match p {
                Some(p) if p.kind == PushKind::Disconnection => {
                    return End::Broken("server closed the connection".into());
                }
                Some(p) => dispatch(shared, p, seen),
                None => return End::Broken("push channel closed".into()),
            },
            cmd = rx.recv() => {
                let Some(first) = cmd else { return End::Closed };
                let mut batch = vec![first];
                while batch.len() < 1024 {
                    match rx.try_recv() {
                        Ok(c) => batch.push(c),
                        Err(_) => break,
                    }
                }
                // A (un)subscribe that hangs (a cluster shard whose master just died) must not
                // hold every later one: past the timeout the link is rebuilt, and the
                // subscribes whose replies were dropped fail (the sessions answer an error).
                let limit = shared.cfg.ping_timeout() + shared.cfg.command_timeout;
                match tokio::time::timeout(limit, apply(shared, link, batch, channels, seen)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Broken(format!("subscribe failed: {e}")),
                    Err(_) => return End::Broken("subscribe timed out".into()),
                }
            }
            _ = tick.tick() => {
                let mut names: Vec<String> = Vec::new();
                if matches!(link, Link::Cluster(_)) {
                    names = channels.iter().map(|c| shared.keys.pubsub(c)).collect();
                    if control {
                        names.push(shared.keys.control().to_owned());
                    }
                }
                let probe = tokio::time::timeout(shared.cfg.ping_timeout(), link.probe(&names)).await;
                match probe {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Broken(format!("probe failed: {e}")),
                    Err(_) => return End::Broken("probe timed out".into()),
                }
            }
        }
    }
}

/// Runs a batch in order: consecutive subscribes become one command, likewise unsubscribes.
async fn apply(
    shared: &Shared,
    link: &mut Link,
    batch: Vec<ShardCmd>,
    channels: &mut HashSet<Arc<str>>,
    seen: &Seen,
) -> redis::RedisResult<()> {
    let mut iter = batch.into_iter().peekable();
    while let Some(cmd) = iter.next() {
        match cmd {
            ShardCmd::Subscribe(ch, reply) => {
                let mut run = vec![(ch, reply)];
                while let Some(ShardCmd::Subscribe(..)) = iter.peek() {
                    if let Some(ShardCmd::Subscribe(c, r)) = iter.next() {
                        run.push((c, r));
                    }
                }
                let names: Vec<String> = run.iter().map(|(c, _)| shared.keys.pubsub(c)).collect();
                match link.set(&names, true).await {
                    Ok(()) => {
                        for (c, r) in run {
                            channels.insert(c.into());
                            let _ = r.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        for (_, r) in run {
                            let _ = r.send(Err(EngineError::Unavailable(e.to_string())));
                        }
                        // Refuse the rest of the batch too; the connection is rebuilt.
                        refuse(iter, channels, seen);
                        return Err(e);
                    }
                }
            }
            ShardCmd::Unsubscribe(ch) => {
                let mut run = vec![ch];
                while let Some(ShardCmd::Unsubscribe(..)) = iter.peek() {
                    if let Some(ShardCmd::Unsubscribe(c)) = iter.next() {
                        run.push(c);
                    }
                }
                {
                    let mut s = seen.lock();
                    for c in &run {
                        channels.remove(c.as_str());
                        s.remove(c.as_str());
                    }
                }
                let names: Vec<String> = run.iter().map(|c| shared.keys.pubsub(c)).collect();
                if let Err(e) = link.set(&names, false).await {
                    refuse(iter, channels, seen);
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn refuse(rest: impl Iterator<Item = ShardCmd>, channels: &mut HashSet<Arc<str>>, seen: &Seen) {
    for cmd in rest {
        match cmd {
            ShardCmd::Subscribe(_, r) => {
                let _ = r.send(Err(EngineError::Unavailable(
                    "redis pub/sub is reconnecting".into(),
                )));
            }
            ShardCmd::Unsubscribe(c) => {
                channels.remove(c.as_str());
                seen.lock().remove(c.as_str());
            }
        }
    }
}

/// While disconnected: subscribes fail at once, unsubscribes just leave the wanted set.
/// Returns false when the engine is gone.
async fn wait_refusing(
    rx: &mut mpsc::UnboundedReceiver<ShardCmd>,
    channels: &mut HashSet<Arc<str>>,
    seen: &Seen,
    delay: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + delay;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            cmd = rx.recv() => match cmd {
                Some(c) => refuse(std::iter::once(c), channels, seen),
                None => return false,
            },
        }
    }
}

/// Delivers one push to the node, in arrival order.
fn dispatch(shared: &Shared, p: PushInfo, seen: &Seen) {
    if !matches!(p.kind, PushKind::Message | PushKind::SMessage) {
        return;
    }
    let mut it = p.data.into_iter();
    let (Some(Value::BulkString(name)), Some(Value::BulkString(msg))) = (it.next(), it.next())
    else {
        return;
    };
    let Some(handler) = shared.handler() else {
        return;
    };
    if name == shared.keys.control().as_bytes() {
        handler.on_control(&msg);
        return;
    }
    let Some(channel) = shared.keys.channel_of(&name) else {
        tracing::warn!("message on an unknown redis channel");
        return;
    };
    match codec::parse_wire(&msg) {
        Some(Wire::Pub(offset, epoch, payload)) => {
            let publication = match codec::decode_pub(payload, offset) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(channel, error = %e, "undecodable publication from redis");
                    return;
                }
            };
            let epoch: Arc<str> = if offset == 0 {
                Arc::from("")
            } else {
                let mut s = seen.lock();
                match s.get_mut(channel) {
                    Some((e, last)) if &**e == epoch => {
                        if offset <= *last {
                            // The stream went back (Redis lost its newest writes): these
                            // offsets now name other publications.
                            tracing::warn!(channel, offset, last = *last, "stream rewound");
                            metrics::counter!("holdfast_redis_rewinds_total").increment(1);
                            handler.on_rewind(
                                channel,
                                &StreamTop {
                                    offset: offset - 1,
                                    epoch: e.clone(),
                                },
                            );
                        }
                        *last = offset;
                        e.clone()
                    }
                    _ => {
                        let e: Arc<str> = Arc::from(epoch);
                        s.insert(Arc::from(channel), (e.clone(), offset));
                        e
                    }
                }
            };
            handler.on_publication(channel, &publication, &epoch);
        }
        Some(Wire::Check(offset, epoch)) => {
            let top = StreamTop {
                offset,
                epoch: Arc::from(epoch),
            };
            seen.lock().remove(channel);
            handler.check_position(channel, &top);
        }
        Some(Wire::Join(info)) | Some(Wire::Leave(info)) => {
            let join = msg.first() == Some(&b'j');
            match codec::decode_info(info) {
                Ok(i) => {
                    let i = Arc::new(i);
                    if join {
                        handler.on_join(channel, &i);
                    } else {
                        handler.on_leave(channel, &i);
                    }
                }
                Err(e) => tracing::warn!(channel, error = %e, "undecodable join/leave from redis"),
            }
        }
        None => tracing::warn!(channel, "undecodable message from redis"),
    }
}

/// After a rebuild: reads each channel's position and tells subscribers that are behind it
/// (or past it, when the stream went back) to recover.
async fn check_positions(shared: Arc<Shared>, instance: usize, list: Vec<Arc<str>>, seen: Seen) {
    use futures_util::StreamExt;
    let Some(handler) = shared.handler() else {
        return;
    };
    let mut told = 0usize;
    let mut reads = futures_util::stream::iter(list.into_iter().map(|ch| {
        let shared = shared.clone();
        async move {
            let top = shared.stream_top(instance, &ch).await;
            (ch, top)
        }
    }))
    .buffer_unordered(32);
    while let Some((ch, top)) = reads.next().await {
        let top = match top {
            Ok(t) => t,
            Err(e) => {
                // Without a position every positioned subscriber must recover.
                tracing::warn!(channel = %ch, error = %e, "position read failed after reconnect");
                StreamTop {
                    offset: u64::MAX,
                    epoch: Arc::from(""),
                }
            }
        };
        let rewound = {
            let s = seen.lock();
            s.get(&ch)
                .is_some_and(|(e, last)| **e == *top.epoch && top.offset < *last)
        };
        if rewound {
            handler.on_rewind(&ch, &top);
            told += 1;
        }
        handler.check_position(&ch, &top);
    }
    tracing::info!(rewound = told, "positions checked after reconnect");
}
