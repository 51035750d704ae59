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
