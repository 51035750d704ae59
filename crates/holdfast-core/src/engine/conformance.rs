//! The conformance suite every engine passes. Engines call [`run_all`] from a test with a
//! factory that builds a fresh engine (fresh state, or a unique key prefix).
//!
//! Checks panic with a message naming the broken contract.

use super::{
    Broker, BrokerHandler, CursorStore, EngineError, HistoryOptions, HistoryQuery, PresenceStore,
    PublishOptions, StreamTop,
};
use bytes::Bytes;
use holdfast_protocol::{ClientInfo, Publication};
use parking_lot::Mutex;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What the recording handler saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// channel, offset, epoch, data
    Pub(String, u64, String, Bytes),
    /// channel, client
    Join(String, String),
    /// channel, client
    Leave(String, String),
    /// control message
    Control(Bytes),
    /// channel, epoch: subscribers must be at this position (`check_position`)
    Check(String, String),
}

/// A [`BrokerHandler`] that records deliveries.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Deliveries in arrival order.
    pub events: Mutex<Vec<Event>>,
}

impl BrokerHandler for Recorder {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        self.events.lock().push(Event::Pub(
            channel.into(),
            p.offset,
            epoch.to_string(),
            p.data.clone(),
        ));
    }
    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.events
            .lock()
            .push(Event::Join(channel.into(), info.client.to_string()));
    }
    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.events
            .lock()
            .push(Event::Leave(channel.into(), info.client.to_string()));
    }
    fn on_control(&self, data: &[u8]) {
        self.events
            .lock()
            .push(Event::Control(Bytes::copy_from_slice(data)));
    }
    fn check_position(&self, channel: &str, top: &StreamTop) {
        self.events
            .lock()
            .push(Event::Check(channel.into(), top.epoch.to_string()));
    }
}

impl Recorder {
    /// Waits (up to 10 s) until `done` holds for the recorded events. Distributed engines
    /// deliver asynchronously; local ones have delivered by the time publish returns.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Event]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if done(&self.events.lock()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; saw {:?}",
                self.events.lock()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn hist(size: usize, ttl_secs: u64) -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size,
            ttl: Duration::from_secs(ttl_secs),
            meta_ttl: Duration::from_secs(3600),
        }),
        ..Default::default()
    }
}

fn data(n: u64) -> Publication {
    Publication {
        data: Bytes::from(format!("{{\"n\":{n}}}")),
        ..Default::default()
    }
}

fn query(since: Option<(u64, &str)>, limit: Option<usize>, reverse: bool) -> HistoryQuery {
    HistoryQuery {
        since: since.map(|(o, e)| (o, e.to_owned())),
        limit,
        reverse,
        meta_ttl: Duration::from_secs(3600),
    }
}

fn offsets(page: &super::HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset).collect()
}

/// Runs every check, each on a fresh engine from `factory`.
pub async fn run_all<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = super::Engine>,
{
    let fresh = || async {
        let e = factory().await;
        let rec = Arc::new(Recorder::default());
        e.broker.set_handler(rec.clone());
        (e.broker, e.presence, rec)
    };
    cursors(&*factory().await.cursors).await;
    let (b, _, rec) = fresh().await;
    offsets_start_at_one_and_deliver_in_order(&*b, &rec).await;
    let (b, _, _) = fresh().await;
    history_reads(&*b).await;
    let (b, _, _) = fresh().await;
    trimming_and_ttl(&*b).await;
    let (b, _, rec) = fresh().await;
    idempotent_publish(&*b, &rec).await;
    let (b, _, rec) = fresh().await;
    versioned_publish(&*b, &rec).await;
    let (b, _, rec) = fresh().await;
    publish_without_history(&*b, &rec).await;
    let (b, p, rec) = fresh().await;
    presence(&*b, &*p, &rec).await;
    let (b, _, rec) = fresh().await;
    control(&*b, &rec).await;
}

async fn control(b: &dyn Broker, rec: &Recorder) {
    b.publish_control(Bytes::from_static(b"{\"t\":\"x\"}"))
        .await
        .expect("control");
    rec.wait_for("the control message", |ev| {
        ev.contains(&Event::Control(Bytes::from_static(b"{\"t\":\"x\"}")))
    })
    .await;
}

async fn offsets_start_at_one_and_deliver_in_order(b: &dyn Broker, rec: &Recorder) {
    b.subscribe("c1").await.expect("subscribe");
    let empty = b
        .history("c1", &query(None, Some(0), false))
        .await
        .expect("history");
    assert_eq!(empty.top.offset, 0, "a new stream starts at offset 0");
    assert_eq!(empty.top.epoch.len(), 8, "epoch is 8 letters");
    for n in 1..=5 {
        let out = b
            .publish("c1", data(n), &hist(100, 60))
            .await
            .expect("publish");
        let pos = out.position.expect("history publish returns a position");
        assert_eq!(
            pos,
            StreamTop {
                offset: n,
                epoch: empty.top.epoch.clone()
            },
            "offsets grow by one within the epoch given out before the first publish"
        );
        assert!(!out.suppressed);
    }
    let is_c1 = |e: &Event| matches!(e, Event::Pub(ch, ..) if ch == "c1");
    rec.wait_for("5 deliveries", |ev| {
        ev.iter().filter(|e| is_c1(e)).count() >= 5
    })
    .await;
    let ev = rec.events.lock().clone();
    let got: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Pub(ch, o, ep, _) if ch == "c1" => {
                assert_eq!(ep, &*empty.top.epoch);
                Some(*o)
            }
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5], "deliveries come in offset order");
}

async fn history_reads(b: &dyn Broker) {
    for n in 1..=10 {
        b.publish("h", data(n), &hist(100, 60))
            .await
            .expect("publish");
    }
    let all = b
        .history("h", &query(None, None, false))
        .await
        .expect("all");
    assert_eq!(offsets(&all), (1..=10).collect::<Vec<_>>());
    assert_eq!(all.top.offset, 10);
    assert_eq!(&all.publications[2].data[..], b"{\"n\":3}");
    let epoch = all.top.epoch.to_string();
    let page = b
        .history("h", &query(Some((3, &epoch)), Some(2), false))
        .await
        .expect("since");
    assert_eq!(
        offsets(&page),
        vec![4, 5],
        "since is exclusive, limit applies"
    );
    let page = b
        .history("h", &query(Some((10, &epoch)), None, false))
        .await
        .expect("at top");
    assert!(page.publications.is_empty(), "nothing after the top");
    let rev = b
        .history("h", &query(None, Some(3), true))
        .await
        .expect("reverse");
    assert_eq!(offsets(&rev), vec![10, 9, 8], "reverse gives newest first");
    let rev = b
        .history("h", &query(Some((4, &epoch)), None, true))
        .await
        .expect("reverse since");
    assert_eq!(
        offsets(&rev),
        vec![3, 2, 1],
        "reverse since gives offsets below since"
    );
    let pos = b
        .history("h", &query(None, Some(0), false))
        .await
        .expect("position");
    assert!(
        pos.publications.is_empty() && pos.top.offset == 10,
        "limit 0 gives the position only"
    );
    let err = b
        .history("h", &query(Some((3, "otherepo")), None, false))
        .await;
    assert_eq!(
        err,
        Err(EngineError::UnrecoverablePosition),
        "a foreign epoch is refused"
    );
    b.remove_history("h").await.expect("remove");
    let after = b
        .history("h", &query(None, None, false))
        .await
        .expect("after remove");
    assert!(
        after.publications.is_empty(),
        "remove_history drops publications"
    );
    assert_eq!(
        (after.top.offset, &*after.top.epoch),
        (10, &*epoch),
        "but keeps the position"
    );
    let out = b
        .publish("h", data(11), &hist(100, 60))
        .await
        .expect("publish");
    assert_eq!(
        out.position.map(|p| p.offset),
        Some(11),
        "offsets continue after remove"
    );
}

async fn trimming_and_ttl(b: &dyn Broker) {
    for n in 1..=5 {
        b.publish("t", data(n), &hist(3, 2)).await.expect("publish");
    }
    let all = b
        .history("t", &query(None, None, false))
        .await
        .expect("history");
    assert_eq!(
        offsets(&all),
        vec![3, 4, 5],
        "history keeps the newest history_size"
    );
    let trimmed = b
        .history("t", &query(Some((1, &all.top.epoch)), None, false))
        .await
        .expect("trimmed");
    assert_eq!(
        offsets(&trimmed),
        vec![3, 4, 5],
        "since before the window reads from the oldest kept"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let expired = b
        .history("t", &query(None, None, false))
        .await
        .expect("expired");
    assert!(
        expired.publications.is_empty(),
        "items expire history_ttl after the last publish"
    );
    assert_eq!(expired.top, all.top, "expiry keeps epoch and top offset");
    let out = b.publish("t", data(6), &hist(3, 2)).await.expect("publish");
    assert_eq!(out.position.map(|p| p.offset), Some(6));
}

async fn idempotent_publish(b: &dyn Broker, rec: &Recorder) {
    b.subscribe("i").await.expect("subscribe");
    let mut opts = hist(10, 60);
    opts.idempotency_key = Some("k1".into());
    opts.idempotency_ttl = Duration::from_secs(300);
    let first = b.publish("i", data(1), &opts).await.expect("first");
    let second = b.publish("i", data(1), &opts).await.expect("second");
    assert!(
        !first.suppressed && second.suppressed,
        "the repeat is suppressed"
    );
    assert_eq!(
        first.position, second.position,
        "the repeat gets the same result"
    );
    opts.idempotency_key = Some("k2".into());
    let third = b.publish("i", data(2), &opts).await.expect("third");
    assert_eq!(third.position.map(|p| p.offset), Some(2));
    // Deliveries of one channel are ordered: once offset 2 is in, a delivery of the
    // suppressed repeat would be too.
    rec.wait_for("offset 2", |ev| {
        ev.iter()
            .any(|e| matches!(e, Event::Pub(c, 2, ..) if c == "i"))
    })
    .await;
    let delivered = rec
        .events
        .lock()
        .iter()
        .filter(|e| matches!(e, Event::Pub(c, ..) if c == "i"))
        .count();
    assert_eq!(delivered, 2, "a suppressed publish is not delivered");
    let h = b
        .history("i", &query(None, None, false))
        .await
        .expect("history");
    assert_eq!(
        offsets(&h),
        vec![1, 2],
        "a suppressed publish is not stored"
    );
}

/// Latest-state publishing: a version not newer than the channel's (same or empty version
/// epoch) is suppressed with the current position; another epoch starts versions over; version
/// 0 is never checked. `use_delta` travels to the handler.
async fn versioned_publish(b: &dyn Broker, rec: &Recorder) {
    b.subscribe("v").await.expect("subscribe");
    let at = |version: u64, epoch: &str| {
        let mut o = hist(10, 60);
        o.version = version;
        o.version_epoch = epoch.into();
        o
    };
    let publish = |n: u64, o: PublishOptions| async move {
        let mut p = data(n);
        p.use_delta = true;
        b.publish("v", p, &o).await.expect("publish")
    };
    let first = publish(1, at(5, "")).await;
    assert!(!first.suppressed);
    let stale = publish(2, at(4, "")).await;
    assert!(
        stale.suppressed && stale.stale,
        "an older version is suppressed"
    );
    assert_eq!(stale.position, first.position, "with the current position");
    assert!(
        publish(3, at(5, "")).await.suppressed,
        "an equal version too"
    );
    assert!(
        !publish(4, at(5, "e1")).await.suppressed,
        "a version epoch other than the stored one starts over"
    );
    let newer = publish(5, at(6, "")).await;
    assert_eq!(newer.position.map(|p| p.offset), Some(3));
    let other = publish(6, at(1, "e2")).await;
    assert!(!other.suppressed, "another epoch starts over");
    assert!(publish(7, at(1, "e2")).await.suppressed);
    assert!(
        publish(8, at(1, "")).await.suppressed,
        "an empty epoch compares versions"
    );
    assert!(
        !publish(9, at(0, "")).await.suppressed,
        "version 0 is not checked"
    );
    rec.wait_for("offset 5", |ev| {
        ev.iter()
            .any(|e| matches!(e, Event::Pub(c, 5, ..) if c == "v"))
    })
    .await;
    let h = b
        .history("v", &query(None, None, false))
        .await
        .expect("history");
    let ns: Vec<String> = h
        .publications
        .iter()
        .map(|p| String::from_utf8_lossy(&p.data).into_owned())
        .collect();
    assert_eq!(
        ns,
        [
            "{\"n\":1}",
            "{\"n\":4}",
            "{\"n\":5}",
            "{\"n\":6}",
            "{\"n\":9}"
        ]
    );
    assert!(h.publications.iter().all(|p| p.offset > 0));
}

async fn publish_without_history(b: &dyn Broker, rec: &Recorder) {
    b.subscribe("n").await.expect("subscribe");
    let out = b
        .publish("n", data(1), &PublishOptions::default())
        .await
        .expect("publish");
    assert_eq!(out.position, None, "no history, no position");
    rec.wait_for("a delivery with offset 0", |ev| {
        ev.iter()
            .any(|e| matches!(e, Event::Pub(c, 0, ..) if c == "n"))
    })
    .await;
}

async fn presence(b: &dyn Broker, p: &dyn PresenceStore, rec: &Recorder) {
    let info = |u: &str, c: &str| {
        Arc::new(ClientInfo {
            user: u.into(),
            client: c.into(),
            conn_info: None,
            chan_info: None,
        })
    };
    b.subscribe("p").await.expect("subscribe");
    p.add_presence("p", info("u1", "c1")).await.expect("add");
    p.add_presence("p", info("u1", "c2")).await.expect("add");
    p.add_presence("p", info("u2", "c3")).await.expect("add");
    p.add_presence("p", info("u2", "c3"))
        .await
        .expect("refresh is idempotent");
    assert_eq!(p.presence_stats("p").await.expect("stats"), (3, 2));
    let mut clients: Vec<String> = p
        .presence("p")
        .await
        .expect("presence")
        .iter()
        .map(|i| i.client.to_string())
        .collect();
    clients.sort();
    assert_eq!(clients, ["c1", "c2", "c3"]);
    p.remove_presence("p", "c1").await.expect("remove");
    assert_eq!(p.presence_stats("p").await.expect("stats"), (2, 2));
    assert_eq!(p.presence_stats("empty").await.expect("stats"), (0, 0));
    b.publish_join("p", info("u1", "c9")).await.expect("join");
    b.publish_leave("p", info("u1", "c9")).await.expect("leave");
    rec.wait_for("join and leave", |ev| {
        ev.contains(&Event::Join("p".into(), "c9".into()))
            && ev.contains(&Event::Leave("p".into(), "c9".into()))
    })
    .await;
}

async fn cursors(c: &dyn CursorStore) {
    let ttl = Duration::from_secs(2);
    let pos = |offset: u64, epoch: &str| StreamTop {
        offset,
        epoch: epoch.into(),
    };
    assert_eq!(
        c.load_cursor("u", "#u").await.expect("load"),
        None,
        "no cursor yet"
    );
    c.save_cursor("u", "#u", &pos(5, "epochAAA"), ttl)
        .await
        .expect("save");
    assert_eq!(
        c.load_cursor("u", "#u").await.expect("load"),
        Some(pos(5, "epochAAA"))
    );
    c.save_cursor("u", "#u", &pos(3, "epochAAA"), ttl)
        .await
        .expect("save");
    assert_eq!(
        c.load_cursor("u", "#u").await.expect("load"),
        Some(pos(5, "epochAAA")),
        "a cursor never moves back within an epoch"
    );
    c.save_cursor("u", "#u", &pos(2, "epochBBB"), ttl)
        .await
        .expect("save");
    assert_eq!(
        c.load_cursor("u", "#u").await.expect("load"),
        Some(pos(2, "epochBBB")),
        "a new epoch replaces the cursor"
    );
    assert_eq!(
        c.load_cursor("v", "#u").await.expect("load"),
        None,
        "cursors are per user"
    );
    assert_eq!(
        c.load_cursor("u", "other").await.expect("load"),
        None,
        "and per channel"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        c.load_cursor("u", "#u").await.expect("load"),
        None,
        "cursors expire"
    );
}

/// Map settings for the suite: a 100-entry stream kept a minute, `key_ttl` as given, at most
/// 1,000 keys.
pub fn map_settings(key_ttl: Option<Duration>) -> super::map::MapSettings {
    super::map::MapSettings {
        key_ttl,
        stream: HistoryOptions {
            size: 100,
            ttl: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(300),
        },
        max_keys: 1000,
    }
}

fn put(key: &str, v: &str) -> super::map::MapWrite {
    super::map::MapWrite {
        key: key.into(),
        data: Bytes::from(v.to_owned()),
        ..Default::default()
    }
}

fn del(key: &str) -> super::map::MapWrite {
    super::map::MapWrite {
        key: key.into(),
        removed: true,
        ..Default::default()
    }
}

/// Runs every map broker check, each on a fresh broker from `factory`.
pub async fn run_map<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn super::map::MapBroker>>,
{
    let fresh = || async {
        let b = factory().await;
        let rec = Arc::new(Recorder::default());
        b.set_handler(rec.clone());
        b.subscribe("m").await.expect("subscribe");
        (b, rec)
    };
    let (b, rec) = fresh().await;
    map_writes_state_and_stream(&*b, &rec).await;
    let (b, _) = fresh().await;
    map_paging_at_a_revision(&*b).await;
    let (b, rec) = fresh().await;
    map_versions_idempotency_and_key_modes(&*b, &rec).await;
    let (b, rec) = fresh().await;
    map_key_ttl(&*b, &rec).await;
    let (b, rec) = fresh().await;
    map_limits_and_clear(&*b, &rec).await;
}

async fn map_writes_state_and_stream(b: &dyn super::map::MapBroker, rec: &Recorder) {
    use super::map::StateQuery;
    let s = map_settings(None);
    let first = b.publish("m", put("a", "1"), &s).await.expect("publish");
    assert_eq!(first.position.offset, 1, "the first write is offset 1");
    assert!(first.suppressed.is_none());
    b.publish("m", put("b", "2"), &s).await.expect("publish");
    b.publish("m", put("a", "3"), &s).await.expect("publish");
    let removed = b.publish("m", del("b"), &s).await.expect("remove");
    assert_eq!(removed.position.offset, 4, "a removal is a stream entry");
    rec.wait_for("four deliveries in offset order", |ev| {
        ev.iter()
            .filter_map(|e| match e {
                Event::Pub(ch, o, ..) if ch == "m" => Some(*o),
                _ => None,
            })
            .eq([1, 2, 3, 4])
    })
    .await;
    let page = b
        .read_state(
            "m",
            &StateQuery {
                limit: 10,
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("state");
    assert_eq!(page.top, removed.position, "a state read names the top");
    let got: Vec<(&str, u64, &[u8])> = page
        .entries
        .iter()
        .map(|p| (p.key.as_str(), p.offset, &p.data[..]))
        .collect();
    assert_eq!(
        got,
        vec![("a", 3, &b"3"[..])],
        "state = the newest write per key"
    );
    let stream = b
        .read_stream("m", &query(Some((1, &page.top.epoch)), None, false))
        .await
        .expect("stream");
    let keys: Vec<(u64, &str, bool)> = stream
        .publications
        .iter()
        .map(|p| (p.offset, p.key.as_str(), p.removed))
        .collect();
    assert_eq!(keys, vec![(2, "b", false), (3, "a", false), (4, "b", true)]);
    assert_eq!(b.num_keys("m").await.expect("stats"), 1);
    assert_eq!(
        b.read_stream("m", &query(Some((1, "other")), None, false))
            .await,
        Err(EngineError::UnrecoverablePosition),
        "a stream read in another epoch is refused"
    );
}

async fn map_paging_at_a_revision(b: &dyn super::map::MapBroker) {
    use super::map::StateQuery;
    let s = map_settings(None);
    for k in ["a", "b", "c", "d", "e"] {
        b.publish("m", put(k, k), &s).await.expect("publish");
    }
    let p1 = b
        .read_state(
            "m",
            &StateQuery {
                limit: 2,
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("page 1");
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.cursor.is_empty(), "more pages follow");
    // Writes while paging: an update of a key not yet read and of one already read.
    b.publish("m", put("d", "d2"), &s).await.expect("publish");
    b.publish("m", put("a", "a2"), &s).await.expect("publish");
    let revision = Some((p1.top.offset, p1.top.epoch.to_string()));
    let mut keys: Vec<String> = p1.entries.iter().map(|p| p.key.clone()).collect();
    let mut cursor = p1.cursor.clone();
    while !cursor.is_empty() {
        let p = b
            .read_state(
                "m",
                &StateQuery {
                    cursor: cursor.clone(),
                    limit: 2,
                    revision: revision.clone(),
                    key: None,
                },
                &s,
            )
            .await
            .expect("next page");
        assert_eq!(p.top, p1.top, "later pages keep the first page's position");
        assert!(
            p.entries.iter().all(|e| e.offset <= p1.top.offset),
            "entries written after the revision are left to the stream"
        );
        keys.extend(p.entries.iter().map(|p| p.key.clone()));
        cursor = p.cursor;
    }
    assert_eq!(keys, ["a", "b", "c", "e"], "d changed after the revision");
    // A page covers `limit` keys, visible or not: at a revision before every write it is empty
    // but goes on (no read walks the whole map).
    let early = b
        .read_state(
            "m",
            &StateQuery {
                limit: 2,
                revision: Some((0, p1.top.epoch.to_string())),
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("early page");
    assert!(early.entries.is_empty());
    assert_eq!(early.cursor, "b", "the cursor is the last key covered");
    let rest = b
        .read_stream(
            "m",
            &query(Some((p1.top.offset, &p1.top.epoch)), None, false),
        )
        .await
        .expect("stream");
    let keys: Vec<&str> = rest.publications.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["d", "a"],
        "the stream after the revision has both updates"
    );
    let one = b
        .read_state(
            "m",
            &StateQuery {
                key: Some("c".into()),
                limit: 1,
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("one key");
    assert_eq!(one.entries.len(), 1);
    assert_eq!(
        b.read_state(
            "m",
            &StateQuery {
                limit: 2,
                revision: Some((1, "nope".into())),
                ..Default::default()
            },
            &s
        )
        .await,
        Err(EngineError::UnrecoverablePosition),
        "a revision in another epoch is refused"
    );
}

async fn map_versions_idempotency_and_key_modes(b: &dyn super::map::MapBroker, rec: &Recorder) {
    use super::map::{KeyMode, MapWrite, Suppressed};
    let s = map_settings(None);
    let v = |n: u64, data: &str| MapWrite {
        version: n,
        ..put("k", data)
    };
    b.publish("m", v(2, "two"), &s).await.expect("publish");
    let stale = b.publish("m", v(1, "one"), &s).await.expect("publish");
    assert_eq!(
        stale.suppressed,
        Some(Suppressed::Version),
        "an older version never overwrites"
    );
    let same = b
        .publish("m", v(2, "two again"), &s)
        .await
        .expect("publish");
    assert_eq!(same.suppressed, Some(Suppressed::Version));
    b.publish("m", v(3, "three"), &s).await.expect("publish");
    let idem = || MapWrite {
        idempotency_key: Some("x".into()),
        idempotency_ttl: Duration::from_secs(60),
        ..put("i", "once")
    };
    let first = b.publish("m", idem(), &s).await.expect("publish");
    let again = b.publish("m", idem(), &s).await.expect("publish");
    assert_eq!(again.suppressed, Some(Suppressed::Idempotent));
    assert_eq!(
        again.position, first.position,
        "a repeat answers as the first write"
    );
    let if_new = MapWrite {
        key_mode: KeyMode::IfNew,
        ..put("k", "new?")
    };
    assert_eq!(
        b.publish("m", if_new, &s)
            .await
            .expect("publish")
            .suppressed,
        Some(Suppressed::KeyMode)
    );
    let if_exists = MapWrite {
        key_mode: KeyMode::IfExists,
        ..put("absent", "x")
    };
    assert_eq!(
        b.publish("m", if_exists, &s)
            .await
            .expect("publish")
            .suppressed,
        Some(Suppressed::KeyMode)
    );
    assert_eq!(
        b.publish("m", del("absent"), &s)
            .await
            .expect("remove")
            .suppressed,
        Some(Suppressed::KeyMode),
        "removing an absent key writes nothing"
    );
    rec.wait_for("three writes delivered", |ev| {
        ev.iter().filter(|e| matches!(e, Event::Pub(..))).count() == 3
    })
    .await;
    let st = b
        .read_state(
            "m",
            &super::map::StateQuery {
                key: Some("k".into()),
                limit: 1,
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("state");
    assert_eq!(&st.entries[0].data[..], b"three");
}

async fn map_key_ttl(b: &dyn super::map::MapBroker, rec: &Recorder) {
    let s = map_settings(Some(Duration::from_secs(5)));
    b.publish("m", put("gone", "1"), &s).await.expect("publish");
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.publish("m", put("kept", "1"), &s).await.expect("publish");
    tokio::time::sleep(Duration::from_secs(3)).await;
    rec.wait_for("the expired key's removal delivered", |ev| {
        ev.iter()
            .filter(|e| matches!(e, Event::Pub(_, 3, ..)))
            .count()
            == 1
    })
    .await;
    assert_eq!(
        b.num_keys("m").await.expect("stats"),
        1,
        "only the fresh key is left"
    );
    let stream = b
        .read_stream("m", &query(Some((2, "")), None, false))
        .await
        .expect("stream");
    assert_eq!(stream.publications.len(), 1);
    assert!(stream.publications[0].removed && stream.publications[0].key == "gone");
    // A touch keeps a key past its TTL without a stream entry, and names the missing ones.
    let missing = b
        .touch("m", &["kept".into(), "gone".into()], &s)
        .await
        .expect("touch");
    assert_eq!(missing, vec!["gone".to_owned()]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        b.num_keys("m").await.expect("stats"),
        1,
        "a touched key outlives its first TTL"
    );
    let top = b
        .read_stream("m", &query(None, Some(0), false))
        .await
        .expect("top")
        .top;
    assert_eq!(top.offset, 3, "a touch appends nothing");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        b.num_keys("m").await.expect("stats"),
        0,
        "every key expires"
    );
}

async fn map_limits_and_clear(b: &dyn super::map::MapBroker, rec: &Recorder) {
    use super::map::{MapWrite, StateQuery};
    let mut s = map_settings(None);
    s.max_keys = 2;
    b.publish("m", put("a", "1"), &s).await.expect("publish");
    b.publish("m", put("b", "1"), &s).await.expect("publish");
    assert!(
        matches!(
            b.publish("m", put("c", "1"), &s).await,
            Err(EngineError::Limit(_))
        ),
        "a new key beyond max_keys is refused"
    );
    b.publish("m", put("a", "2"), &s)
        .await
        .expect("an existing key may still change");
    let once = || MapWrite {
        key: "a".into(),
        data: Bytes::from_static(b"3"),
        idempotency_key: Some("once".into()),
        idempotency_ttl: Duration::from_secs(60),
        ..Default::default()
    };
    b.publish("m", once(), &s).await.expect("publish");
    let before = b
        .read_state(
            "m",
            &StateQuery {
                limit: 10,
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("state");
    b.clear("m").await.expect("clear");
    let after = b
        .read_state(
            "m",
            &StateQuery {
                limit: 10,
                ..Default::default()
            },
            &s,
        )
        .await
        .expect("state");
    assert!(after.entries.is_empty());
    assert_ne!(
        after.top.epoch, before.top.epoch,
        "a cleared map starts a new epoch"
    );
    let epoch = after.top.epoch.to_string();
    rec.wait_for("subscribers told of the new epoch", |ev| {
        ev.iter()
            .any(|e| matches!(e, Event::Check(ch, ep) if ch == "m" && *ep == epoch))
    })
    .await;
    // An idempotency result of the cleared epoch does not answer in the new one.
    let again = b.publish("m", once(), &s).await.expect("publish");
    assert_eq!(again.suppressed, None, "written again after the clear");
    assert_eq!(
        (again.position.offset, &*again.position.epoch),
        (1, &*epoch)
    );
    // A key named like nothing special, at a page's end, pages like any other.
    s.max_keys = 3;
    for k in ["position", "q"] {
        b.publish("m", put(k, "1"), &s).await.expect("publish");
    }
    let page = |cursor: String| StateQuery {
        cursor,
        limit: 2,
        ..Default::default()
    };
    let first = b
        .read_state("m", &page(String::new()), &s)
        .await
        .expect("page");
    assert_eq!(first.cursor, "position", "a, position | q");
    let second = b
        .read_state("m", &page(first.cursor), &s)
        .await
        .expect("page");
    let keys: Vec<&str> = second.entries.iter().map(|e| &*e.key).collect();
    assert_eq!((keys, second.cursor.as_str()), (vec!["q"], ""));
}
