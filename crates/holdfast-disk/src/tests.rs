use super::*;
use holdfast_core::engine::Engine;
use holdfast_core::engine::conformance::{self, Event, Recorder};

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "holdfast-disk-{}-{name}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn open(dir: &Path) -> Arc<DiskEngine> {
    DiskEngine::open(DiskConfig::new(dir, Durability::Fsync))
        .expect("open")
        .0
}

fn hist() -> PublishOptions {
    PublishOptions {
        history: Some(HistoryOptions {
            size: 100,
            ttl: Duration::from_secs(300),
            meta_ttl: Duration::from_secs(3600),
        }),
        ..Default::default()
    }
}

fn all() -> HistoryQuery {
    HistoryQuery {
        since: None,
        limit: None,
        reverse: false,
        meta_ttl: Duration::from_secs(3600),
    }
}

fn data(n: u64) -> Publication {
    Publication {
        data: bytes::Bytes::from(format!("{{\"n\":{n}}}")),
        ..Default::default()
    }
}

#[tokio::test]
async fn conformance_suite() {
    let root = tempdir("conformance");
    conformance::run_all(|| {
        let dir = root.join(rand_suffix().to_string());
        async move { Engine::from_one(open(&dir)) }
    })
    .await;
}

#[tokio::test]
async fn epochs_offsets_windows_idempotency_and_cursors_survive_a_restart() {
    let dir = tempdir("restart");
    let (epoch, cursor_epoch) = {
        let e = open(&dir);
        let rec = Arc::new(Recorder::default());
        e.set_handler(rec.clone());
        let mut opts = hist();
        for n in 1..=5 {
            opts.idempotency_key = Some(format!("k{n}"));
            opts.idempotency_ttl = Duration::from_secs(300);
            e.publish("c", data(n), &opts).await.expect("publish");
        }
        let page = e.history("c", &all()).await.expect("history");
        e.save_cursor(
            "u",
            "#u",
            &StreamTop {
                offset: 3,
                epoch: "cursorEp".into(),
            },
            Duration::from_secs(60),
        )
        .await
        .expect("cursor");
        let delivered = rec
            .events
            .lock()
            .iter()
            .filter(|e| matches!(e, Event::Pub(..)))
            .count();
        assert_eq!(delivered, 5, "delivered after each commit");
        (page.top.epoch.to_string(), "cursorEp")
    };
    // The writer thread and the lock outlive the engine until the process ends in production;
    // here, wait until the directory lock is free before reopening.
    let e = loop {
        match DiskEngine::open(DiskConfig::new(&dir, Durability::Fsync)) {
            Ok((e, report)) => {
                assert_eq!(report.torn_bytes, 0);
                break e;
            }
            Err(OpenError::Locked(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(other) => panic!("reopen: {other}"),
        }
    };
    let page = e.history("c", &all()).await.expect("history");
    assert_eq!(&*page.top.epoch, epoch, "same epoch after the restart");
    assert_eq!(
        page.publications
            .iter()
            .map(|p| p.offset)
            .collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(&page.publications[4].data[..], b"{\"n\":5}");
    let mut opts = hist();
    opts.idempotency_key = Some("k2".into());
    opts.idempotency_ttl = Duration::from_secs(300);
    let again = e.publish("c", data(2), &opts).await.expect("publish");
    assert!(again.suppressed, "idempotency results survive restarts");
    assert_eq!(again.position.map(|p| p.offset), Some(2));
    let next = e.publish("c", data(6), &hist()).await.expect("publish");
    assert_eq!(next.position.map(|p| p.offset), Some(6), "offsets continue");
    let c = e.load_cursor("u", "#u").await.expect("cursor");
    assert_eq!(
        c.map(|c| (c.offset, c.epoch.to_string())),
        Some((3, cursor_epoch.to_string()))
    );
}

#[tokio::test]
async fn a_latest_state_version_survives_a_restart() {
    let dir = tempdir("version");
    let e = open(&dir);
    let mut o = hist();
    o.version = 3;
    assert!(
        !e.publish("s", data(1), &o)
            .await
            .expect("publish")
            .suppressed
    );
    drop(e);
    let (e, _) = reopen(&dir).await;
    let stale = e.publish("s", data(2), &o).await.expect("publish");
    assert!(stale.suppressed, "version 3 is not newer after the restart");
    assert_eq!(stale.position.map(|p| p.offset), Some(1));
    o.version = 4;
    assert!(
        !e.publish("s", data(3), &o)
            .await
            .expect("publish")
            .suppressed
    );
}

#[tokio::test]
async fn torn_tail_is_cut_and_corruption_refuses_to_start() {
    let dir = tempdir("torn");
    let paths = Paths::new(&dir);
    {
        let e = open(&dir);
        for n in 1..=3 {
            e.publish("c", data(n), &hist()).await.expect("publish");
        }
    }
    // A crash in the middle of a write: half a record after the last commit.
    let good = std::fs::read(&paths.log).expect("read");
    let mut torn = good.clone();
    let mut extra = Vec::new();
    Record::RemoveHistory {
        channel: "c".into(),
    }
    .encode(&mut extra);
    torn.extend_from_slice(&extra[..extra.len() / 2]);
    std::fs::write(&paths.log, &torn).expect("write");
    let r = check(&dir).expect("a torn tail is not corruption");
    assert_eq!(r.torn_bytes as usize, extra.len() / 2);
    assert_eq!(
        r.rollback, None,
        "a write cut short after the last commit is no rollback"
    );
    // Damage inside committed data: the engine refuses to start, naming the place.
    let mut bad = good.clone();
    bad[HEADER_LEN + 12] ^= 0xff;
    std::fs::write(&paths.log, &bad).expect("write");
    match check(&dir) {
        Err(OpenError::Corrupted { at, .. }) => assert_eq!(at as usize, HEADER_LEN),
        other => panic!("expected corruption, got {other:?}"),
    }
    std::fs::write(&paths.log, b"not a log at all").expect("write");
    assert!(matches!(check(&dir), Err(OpenError::NotALog(_))));
}

const HEADER_LEN: usize = 16;

#[tokio::test]
async fn compaction_keeps_the_live_state_and_bounds_the_log() {
    let dir = tempdir("compact");
    let mut cfg = DiskConfig::new(&dir, Durability::Os);
    cfg.min_compact_bytes = 64 * 1024;
    let (e, _) = DiskEngine::open(cfg.clone()).expect("open");
    let small = PublishOptions {
        history: Some(HistoryOptions {
            size: 10,
            ttl: Duration::from_secs(300),
            meta_ttl: Duration::from_secs(3600),
        }),
        ..Default::default()
    };
    let mut versioned = small.clone();
    versioned.version = 7;
    versioned.version_epoch = "ve".into();
    e.publish("v", data(1), &versioned).await.expect("publish");
    let payload = "x".repeat(500);
    for n in 1..=2000u64 {
        let p = Publication {
            data: bytes::Bytes::from(format!("{{\"n\":{n},\"p\":\"{payload}\"}}")),
            ..Default::default()
        };
        e.publish(&format!("c{}", n % 4), p, &small)
            .await
            .expect("publish");
    }
    let bound = 64 * 1024 * 3;
    let mut waited = 0;
    while e.log_bytes() > bound && waited < 500 {
        e.publish("c0", data(0), &small).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert!(
        e.log_bytes() <= bound,
        "log bounded by compaction: {} bytes",
        e.log_bytes()
    );
    let before = e.history("c1", &all()).await.expect("history");
    drop(e);
    let e2 = loop {
        match DiskEngine::open(cfg.clone()) {
            Ok((e, _)) => break e,
            Err(OpenError::Locked(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(other) => panic!("reopen: {other}"),
        }
    };
    let after = e2.history("c1", &all()).await.expect("history");
    assert_eq!(
        after.top, before.top,
        "position survives compaction and restart"
    );
    // The latest-state version was rewritten into the compacted log's snapshot.
    versioned.version = 7;
    let again = e2.publish("v", data(2), &versioned).await.expect("publish");
    assert!(
        again.suppressed,
        "a version survives compaction and restart"
    );
    versioned.version = 8;
    let newer = e2.publish("v", data(3), &versioned).await.expect("publish");
    assert!(!newer.suppressed);
    assert_eq!(
        after
            .publications
            .iter()
            .map(|p| p.offset)
            .collect::<Vec<_>>(),
        before
            .publications
            .iter()
            .map(|p| p.offset)
            .collect::<Vec<_>>()
    );
}

use log::HEADER;
const _: () = assert!(HEADER.len() == HEADER_LEN);

/// Opens `dir`, waiting while a dropped engine's writer still holds the lock.
async fn reopen(dir: &Path) -> (Arc<DiskEngine>, OpenReport) {
    loop {
        match DiskEngine::open(DiskConfig::new(dir, Durability::Fsync)) {
            Ok(x) => return x,
            Err(OpenError::Locked(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(other) => panic!("open: {other}"),
        }
    }
}

async fn publish_n(e: &DiskEngine, range: std::ops::RangeInclusive<u64>) -> StreamTop {
    let mut top = StreamTop::default();
    for n in range {
        top = e
            .publish("c", data(n), &hist())
            .await
            .expect("publish")
            .position
            .expect("position");
    }
    top
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[tokio::test]
async fn a_restored_backup_gives_every_stream_a_new_epoch() {
    let dir = tempdir("restore");
    let backup = tempdir("restore-backup");
    let (e, r) = reopen(&dir).await;
    assert_eq!(r.rollback, None);
    let first = publish_n(&e, 1..=25).await;
    drop(e);
    let (e, r) = reopen(&dir).await;
    assert_eq!(r.rollback, None, "a clean restart keeps everything");
    drop(e);
    copy_dir(&dir, &backup);
    let (e, r) = reopen(&dir).await;
    assert_eq!(r.rollback, None);
    let later = publish_n(&e, 26..=50).await;
    assert_eq!((later.offset, &later.epoch), (50, &first.epoch));
    drop(e);
    // The backup goes back in place of the newer directory.
    copy_dir(&backup, &dir);
    assert!(
        check(&dir).expect("check").rollback.is_some(),
        "check reports it"
    );
    let (e, r) = reopen(&dir).await;
    assert!(r.rollback.is_some(), "{r:?}");
    assert_eq!(r.new_epochs, 1);
    let top = publish_n(&e, 51..=60).await;
    assert_ne!(
        top.epoch, first.epoch,
        "new epoch: offsets 26-35 are not reused under it"
    );
    assert_eq!(top.offset, 35);
    // A client that had reached 30 under the old epoch is told, never given 31-35.
    let q = HistoryQuery {
        since: Some((30, first.epoch.to_string())),
        ..all()
    };
    assert_eq!(
        e.history("c", &q).await,
        Err(EngineError::UnrecoverablePosition)
    );
    let page = e.history("c", &all()).await.expect("history");
    assert_eq!(page.publications.len(), 35, "history itself is kept");
    drop(e);
    let (_e, r) = reopen(&dir).await;
    assert_eq!(
        r.rollback, None,
        "after the rollback the directory is consistent again"
    );
}

#[tokio::test]
async fn a_log_cut_at_a_commit_boundary_gives_a_new_epoch_and_check_reports_it() {
    let dir = tempdir("cut");
    let paths = Paths::new(&dir);
    let (e, _) = reopen(&dir).await;
    let mut lens = Vec::new();
    let mut top = StreamTop::default();
    for n in 1..=5 {
        top = publish_n(&e, n..=n).await;
        lens.push(e.log_bytes());
    }
    drop(e);
    let (e, _) = reopen(&dir).await;
    drop(e);
    // Cut after the third publication's commit: a valid log that ends too early.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths.log)
        .expect("open log");
    f.set_len(lens[2]).expect("truncate");
    drop(f);
    let r = check(&dir).expect("check");
    assert_eq!(r.torn_bytes, 0, "cut on a record boundary: nothing torn");
    let why = r.rollback.expect("check reports the rollback");
    assert!(why.contains("acknowledged"), "{why}");
    let (e, r) = reopen(&dir).await;
    assert!(r.rollback.is_some());
    let page = e.history("c", &all()).await.expect("history");
    assert_ne!(page.top.epoch, top.epoch, "new epoch");
    assert_eq!(page.top.offset, 3);
    let next = publish_n(&e, 6..=6).await;
    assert_eq!(next.offset, 4);
    drop(e);

    // Cut to half its length (inside a record): reported too, not "ok".
    let (e, _) = reopen(&dir).await;
    publish_n(&e, 7..=20).await;
    drop(e);
    let (e, _) = reopen(&dir).await;
    drop(e);
    let len = std::fs::metadata(&paths.log).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths.log)
        .expect("open log");
    f.set_len(len / 2).expect("truncate");
    drop(f);
    let r = check(&dir).expect("check");
    assert!(r.rollback.is_some(), "{r:?}");
}

#[tokio::test]
async fn new_epochs_on_request_keep_history() {
    let dir = tempdir("request");
    let (e, _) = reopen(&dir).await;
    let top = publish_n(&e, 1..=3).await;
    drop(e);
    loop {
        match request_new_epochs(&dir) {
            Ok(()) => break,
            Err(OpenError::Locked(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(other) => panic!("{other}"),
        }
    }
    assert!(check(&dir).expect("check").rollback.is_some());
    let (e, r) = reopen(&dir).await;
    assert_eq!(r.new_epochs, 1, "{r:?}");
    let page = e.history("c", &all()).await.expect("history");
    assert_ne!(page.top.epoch, top.epoch);
    assert_eq!(page.publications.len(), 3);
    drop(e);
    let (_e, r) = reopen(&dir).await;
    assert_eq!(r.rollback, None, "asked once, done once");
}
