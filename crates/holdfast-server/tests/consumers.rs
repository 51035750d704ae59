//! Asynchronous consumers against real sources started by the tests: PostgreSQL (an outbox
//! table with the shipped DDL), `redis-server` (streams). Commands in, publications out, in
//! order; rolled-back rows never published; poison set aside; a source restart; a kill -9
//! between storing and acknowledging (fault hook) publishes nothing twice; two nodes sharing
//! one outbox table over Redis run each row once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::nats::NatsServer;
use common::postgres::PgServer;
use common::redis::{RedisServer, free_port};
use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const DDL: &str = include_str!("../../../deploy/postgresql/outbox.sql");

/// Data of a channel's history, oldest first (as `n` values when the data is `{"n": …}`).
async fn history(srv: &TestServer, ch: &str) -> Vec<Value> {
    let r = api(srv, "history", json!({"channel": ch, "limit": -1})).await;
    r["result"]["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("history of {ch}: {r}"))
        .iter()
        .map(|p| p["data"].get("n").cloned().unwrap_or(p["data"].clone()))
        .collect()
}

async fn history_at(port: u16, ch: &str) -> Vec<Value> {
    let r: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/history"))
        .header("X-API-Key", API_KEY)
        .json(&json!({"channel": ch, "limit": -1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["result"]["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("history of {ch}: {r}"))
        .iter()
        .map(|p| p["data"]["n"].clone())
        .collect()
}

/// Waits (up to 30 s) until `f` returns `Some`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ns(values: impl IntoIterator<Item = i64>) -> Vec<Value> {
    values.into_iter().map(Value::from).collect()
}

async fn rows(pg: &tokio_postgres::Client, table: &str) -> i64 {
    pg.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn insert(pg: &tokio_postgres::Client, method: &str, payload: Value, partition: i32) {
    pg.execute(
        "INSERT INTO holdfast_outbox (method, payload, partition) VALUES ($1, $2::text::jsonb, $3)",
        &[&method, &payload.to_string(), &partition],
    )
    .await
    .unwrap();
}

fn pg_consumer(dsn: &str, extra: &str) -> String {
    format!(
        r#"
[channel.without_namespace]
history_size = 10000
history_ttl = "600s"
allow_subscribe_for_client = true

[[consumers]]
name = "outbox"
type = "postgresql"
enabled = true
max_attempts = 2
[consumers.postgresql]
dsn = "{dsn}"
outbox_table_name = "holdfast_outbox"
{extra}
"#,
        extra = if extra.contains("partition_poll_interval") {
            extra.to_owned()
        } else {
            format!("partition_poll_interval = \"100ms\"\n{extra}")
        }
    )
}

async fn health(srv: &TestServer) -> Value {
    reqwest::get(srv.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn outbox_rows_become_publications_in_order_and_rolled_back_rows_never_do() {
    let pg = PgServer::start();
    let mut db = pg.client().await;
    db.batch_execute(DDL).await.unwrap();
    let cfg = config_from(&pg_consumer(
        &pg.dsn(),
        "num_partitions = 2\npartition_notification_channel = \"holdfast_outbox\"\n\
         # a minute: only a notification can wake a partition in time\npartition_poll_interval = \"60s\"",
    ));
    let srv = TestServer::start(cfg).await;
    let (mut sub, _) = srv.connected("u1").await;
    sub.call("subscribe", json!({"channel": "ch0"})).await;
    // Each channel's rows in one partition; every fifth transaction rolls back.
    for i in 0..60i64 {
        let tx = db.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO holdfast_outbox (method, payload, partition) VALUES ('publish', $1::text::jsonb, $2)",
            &[&json!({"channel": format!("ch{}", i % 2), "data": {"n": i}}).to_string(), &((i % 2) as i32)],
        )
        .await
        .unwrap();
        if i % 5 == 4 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
    let committed = |p: i64| ns((0..60).filter(move |i| i % 2 == p && i % 5 != 4));
    for p in 0..2 {
        let ch = format!("ch{p}");
        let want = committed(p);
        let got = until(&format!("{ch} complete"), || async {
            let h = history(&srv, &ch).await;
            (h.len() >= want.len()).then_some(h)
        })
        .await;
        assert_eq!(
            got, want,
            "{ch}: every committed row once, in order, no rolled-back row"
        );
    }
    // The live subscriber saw the same, in order.
    let mut live = Vec::new();
    while live.len() < committed(0).len() {
        let p = sub.push().await;
        live.push(p["pub"]["data"]["n"].clone());
    }
    assert_eq!(live, committed(0));
    assert_eq!(
        rows(&db, "holdfast_outbox").await,
        0,
        "run rows are deleted"
    );
    let h = until("lag sampled at 0", || async {
        let h = health(&srv).await;
        (h["consumers"][0]["lag"] == 0).then_some(h)
    })
    .await;
    let c = &h["consumers"][0];
    assert_eq!(c["name"], "outbox");
    assert_eq!(c["type"], "postgresql");
    assert_eq!(c["status"], "ok", "{c}");
    assert_eq!(c["workers_up"], 2);
    assert_eq!(c["processed"], 48);
    assert_eq!(c["poison"], 0);
    let ready: Value = reqwest::get(srv.http("/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["consumers"]["outbox"], "ok");
    let metrics = reqwest::get(srv.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [
        "holdfast_consumer_processed_total{consumer=\"outbox\"}",
        "holdfast_consumer_lag{consumer=\"outbox\"}",
        "holdfast_consumer_lag_seconds{consumer=\"outbox\"}",
        "holdfast_consumer_up{consumer=\"outbox\"}",
    ] {
        assert!(metrics.contains(m), "{m} in /metrics");
    }
    srv.stop().await;
}

#[tokio::test]
async fn poison_rows_are_set_aside_without_blocking_the_partition() {
    let pg = PgServer::start();
    let db = pg.client().await;
    db.batch_execute(DDL).await.unwrap();
    let srv = TestServer::start(config_from(&pg_consumer(&pg.dsn(), ""))).await;
    insert(&db, "publish", json!({"channel": "c", "data": {"n": 1}}), 0).await;
    insert(&db, "no_such_method", json!({}), 0).await;
    insert(
        &db,
        "publish",
        json!({"channel": "nons:c", "data": {"n": 0}}),
        0,
    )
    .await;
    insert(&db, "publish", json!("not an object"), 0).await;
    insert(
        &db,
        "batch",
        json!({"commands": [{"publish": {"channel": "c", "data": {"n": 2}}}]}),
        0,
    )
    .await;
    insert(&db, "publish", json!({"channel": "c", "data": {"n": 3}}), 0).await;
    let got = until("the good rows", || async {
        let h = history(&srv, "c").await;
        (h.len() >= 3).then_some(h)
    })
    .await;
    assert_eq!(
        got,
        ns([1, 2, 3]),
        "poison rows do not block the rows behind them"
    );
    let dead = until("three rows set aside", || async {
        let r = db
            .query(
                "SELECT method, error FROM holdfast_outbox_dead_letter ORDER BY id",
                &[],
            )
            .await
            .ok()?;
        (r.len() == 3 && rows(&db, "holdfast_outbox").await == 0).then_some(r)
    })
    .await;
    let dead: Vec<(String, String)> = dead.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(dead[0].0, "no_such_method");
    assert!(dead[0].1.contains("unknown method"), "{dead:?}");
    assert!(dead[1].1.contains("102"), "unknown namespace: {dead:?}");
    assert!(dead[2].1.contains("107"), "not an object: {dead:?}");
    let h = health(&srv).await;
    assert_eq!(h["consumers"][0]["poison"], 3);
    assert_eq!(h["consumers"][0]["processed"], 3);
    let metrics = reqwest::get(srv.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("holdfast_consumer_poison_total{consumer=\"outbox\"}"));
    srv.stop().await;
}

#[tokio::test]
async fn postgres_restart_resumes_without_loss_or_duplicates() {
    let mut pg = PgServer::start();
    let db = pg.client().await;
    db.batch_execute(DDL).await.unwrap();
    let srv = TestServer::start(config_from(&pg_consumer(&pg.dsn(), ""))).await;
    for i in 0..20 {
        insert(&db, "publish", json!({"channel": "r", "data": {"n": i}}), 0).await;
    }
    until("first rows", || async {
        (history(&srv, "r").await.len() >= 20).then_some(())
    })
    .await;
    drop(db);
    pg.kill();
    until("consumer down", || async {
        (health(&srv).await["consumers"][0]["status"] == "down").then_some(())
    })
    .await;
    pg.restart();
    let db = pg.client().await;
    for i in 20..40 {
        insert(&db, "publish", json!({"channel": "r", "data": {"n": i}}), 0).await;
    }
    let got = until("rows after the restart", || async {
        let h = history(&srv, "r").await;
        (h.len() >= 40).then_some(h)
    })
    .await;
    assert_eq!(got, ns(0..40));
    let h = until("consumer back", || async {
        let h = health(&srv).await;
        (h["consumers"][0]["status"] == "ok").then_some(h)
    })
    .await;
    assert!(h["consumers"][0]["errors"].as_u64().unwrap() >= 1, "{h}");
    assert!(h["consumers"][0]["last_error"].is_string());
    srv.stop().await;
}

#[tokio::test]
async fn a_missing_outbox_table_is_reported_then_used_once_created() {
    let pg = PgServer::start();
    let db = pg.client().await;
    let cfg = pg_consumer(
        &pg.dsn(),
        "partition_notification_channel = \"holdfast_outbox\"\npartition_poll_interval = \"60s\"",
    );
    let srv = TestServer::start(config_from(&cfg)).await;
    let h = until("the missing table in /health", || async {
        let h = health(&srv).await;
        let c = &h["consumers"][0];
        (c["status"] == "down"
            && c["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("does not exist")))
        .then_some(h)
    })
    .await;
    assert!(h["consumers"][0]["errors"].as_u64().unwrap() >= 1);
    // The table appears: its first row's notification ends the consumer's backoff.
    db.batch_execute(DDL).await.unwrap();
    insert(&db, "publish", json!({"channel": "m", "data": {"n": 1}}), 0).await;
    until("the first row", || async {
        (history(&srv, "m").await == ns([1])).then_some(())
    })
    .await;
    let h = until("ok, with the age of the oldest row sampled", || async {
        let h = health(&srv).await;
        let c = &h["consumers"][0];
        (c["status"] == "ok" && c["lag_seconds"].is_number()).then_some(h)
    })
    .await;
    assert_eq!(h["consumers"][0]["lag"], 0, "{h}");
    srv.stop().await;
}

#[tokio::test]
async fn outbox_over_tls_verifies_the_server_certificate() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let pg = PgServer::start_tls(&server.cert.pem(), &server.signing_key.serialize_pem());
    let db = pg.client().await;
    db.batch_execute(DDL).await.unwrap();
    let tls = |ca: &str| {
        format!("[consumers.postgresql.tls]\nenabled = true\nserver_ca_pem = \"\"\"\n{ca}\"\"\"\n")
    };
    let srv = TestServer::start(config_from(&pg_consumer(
        &pg.dsn(),
        &tls(&server.cert.pem()),
    )))
    .await;
    insert(&db, "publish", json!({"channel": "t", "data": {"n": 1}}), 0).await;
    until("published over TLS", || async {
        (history(&srv, "t").await == ns([1])).then_some(())
    })
    .await;
    let r = db
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'holdfast-consumer-outbox'",
            &[],
        )
        .await
        .unwrap();
    let (sessions, all_tls): (i64, Option<bool>) = (r.get(0), r.get(1));
    assert!(
        sessions >= 1 && all_tls == Some(true),
        "{sessions} sessions, all TLS: {all_tls:?}"
    );
    srv.stop().await;
    // Another CA: the consumer refuses the server (no fallback to plain text) and says why.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let srv = TestServer::start(config_from(&pg_consumer(
        &pg.dsn(),
        &tls(&other.cert.pem()),
    )))
    .await;
    let h = until("the consumer reports the certificate error", || async {
        let h = health(&srv).await;
        h["consumers"][0]["last_error"].is_string().then_some(h)
    })
    .await;
    let c = &h["consumers"][0];
    assert_eq!(c["status"], "down", "{c}");
    assert!(
        c["last_error"].as_str().unwrap().contains("certificate"),
        "{c}"
    );
    insert(&db, "publish", json!({"channel": "t", "data": {"n": 2}}), 0).await;
    assert_eq!(
        rows(&db, "holdfast_outbox").await,
        1,
        "nothing consumed without a verified server"
    );
    srv.stop().await;
}

fn disk_config(dir: &std::path::Path, consumer: &str) -> std::path::PathBuf {
    let p = dir.join("holdfast.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[client.token]
hmac_secret_key = "{SECRET}"
[http_api]
key = "{API_KEY}"
[engine]
type = "disk"
[engine.disk]
path = "{}"
durability = "fsync"
[log]
level = "warn"
[channel.without_namespace]
history_size = 10000
history_ttl = "600s"
{consumer}
"#,
            dir.join("data").display()
        ),
    )
    .unwrap();
    p
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "holdfast-consumers-{name}-{}-{}",
        std::process::id(),
        common::redis::rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Waits for a child that is expected to abort (the fault hook).
async fn aborted(child: &mut std::process::Child) {
    until("holdfast aborted by the fault hook", || {
        let r = child.try_wait().unwrap();
        async move { r }
    })
    .await;
}

#[tokio::test]
async fn outbox_kill_between_store_and_delete_publishes_each_row_once() {
    let pg = PgServer::start();
    let db = pg.client().await;
    db.batch_execute(DDL).await.unwrap();
    let dir = temp_dir("pg-kill");
    let consumer = pg_consumer(&pg.dsn(), "partition_select_limit = 100");
    let consumer = consumer.split("[[consumers]]").nth(1).unwrap();
    let cfg = disk_config(&dir, &format!("[[consumers]]{consumer}"));
    let port = free_port();
    // The process aborts right after storing the 5th publication, before the transaction that
    // deletes the rows commits: 5 stored, 20 rows still in the table.
    let mut child = spawn_holdfast_env(
        &cfg,
        port,
        WAIT,
        &[("HOLDFAST_FAULT_ABORT_AFTER_STORE", "5")],
    )
    .await;
    // One transaction, so the first pass holds all 20 rows.
    let values: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "('publish', '{}')",
                json!({"channel": "k", "data": {"n": i}})
            )
        })
        .collect();
    db.batch_execute(&format!(
        "INSERT INTO holdfast_outbox (method, payload) VALUES {}",
        values.join(",")
    ))
    .await
    .unwrap();
    aborted(&mut child).await;
    assert_eq!(rows(&db, "holdfast_outbox").await, 20, "nothing deleted");
    let mut child = spawn_holdfast(&cfg, port, WAIT).await;
    until("table drained", || async {
        (rows(&db, "holdfast_outbox").await == 0).then_some(())
    })
    .await;
    let got = history_at(port, "k").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        got,
        ns(0..20),
        "the 5 stored before the kill are not published again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn two_nodes_share_one_outbox_and_run_each_row_once() {
    let pg = PgServer::start();
    let db = pg.client().await;
    db.batch_execute(DDL).await.unwrap();
    let redis = RedisServer::start();
    let node = |try_lock: bool| {
        config_from(&format!(
            "{}\n[engine]\ntype = \"redis\"\n[engine.redis]\naddress = [\"{}\"]\n",
            pg_consumer(
                &pg.dsn(),
                &format!(
                    "num_partitions = 4\npartition_select_limit = 10\nuse_try_lock = {try_lock}"
                )
            ),
            redis.url()
        ))
    };
    let a = TestServer::start(node(false)).await;
    let b = TestServer::start(node(true)).await;
    // Four writers, one per partition and channel, 50 rows each.
    let writers = (0..4).map(|p| {
        let dsn = pg.dsn();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            for i in 0..50i64 {
                c.execute(
                    "INSERT INTO holdfast_outbox (method, payload, partition) VALUES ('publish', $1::text::jsonb, $2)",
                    &[&json!({"channel": format!("s{p}"), "data": {"n": i}}).to_string(), &p],
                )
                .await
                .unwrap();
            }
        })
    });
    for w in writers {
        w.await.unwrap();
    }
    until("table drained", || async {
        (rows(&db, "holdfast_outbox").await == 0).then_some(())
    })
    .await;
    for p in 0..4 {
        assert_eq!(
            history(&a, &format!("s{p}")).await,
            ns(0..50),
            "s{p}: each row once, in order"
        );
    }
    let processed = |h: &Value| h["consumers"][0]["processed"].as_u64().unwrap();
    let (ha, hb) = (health(&a).await, health(&b).await);
    assert_eq!(processed(&ha) + processed(&hb), 200, "{ha} {hb}");
    a.stop().await;
    b.stop().await;
}

fn stream_consumer(url: &str) -> String {
    format!(
        r#"
[channel.without_namespace]
history_size = 10000
history_ttl = "600s"

[[consumers]]
name = "stream"
type = "redis_stream"
enabled = true
max_attempts = 2
[consumers.redis_stream]
address = ["{url}"]
streams = ["commands"]
consumer_group = "holdfast"
visibility_timeout = "1s"

[[consumers]]
name = "data_mode"
type = "redis_stream"
enabled = true
[consumers.redis_stream]
address = ["{url}"]
streams = ["publications"]
consumer_group = "holdfast"
[consumers.redis_stream.publication_data_mode]
enabled = true
"#
    )
}

async fn redis_conn(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn xadd(
    c: &mut ::redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, String)],
) {
    let mut cmd = ::redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
    let _: String = cmd.query_async(c).await.unwrap();
}

async fn xlen(c: &mut ::redis::aio::MultiplexedConnection, stream: &str) -> i64 {
    ::redis::cmd("XLEN")
        .arg(stream)
        .query_async(c)
        .await
        .unwrap()
}

async fn pending(c: &mut ::redis::aio::MultiplexedConnection, stream: &str) -> i64 {
    let v: Vec<::redis::Value> = ::redis::cmd("XPENDING")
        .arg(stream)
        .arg("holdfast")
        .query_async(c)
        .await
        .unwrap();
    match v.first() {
        Some(::redis::Value::Int(n)) => *n,
        other => panic!("XPENDING: {other:?}"),
    }
}

#[tokio::test]
async fn redis_stream_entries_become_publications_poison_goes_to_a_dead_letter_stream() {
    let redis = RedisServer::start();
    let mut c = redis_conn(&redis.url()).await;
    // Entries added before Holdfast first starts are not lost (the group starts at 0).
    xadd(
        &mut c,
        "commands",
        &[
            ("method", "publish".into()),
            (
                "payload",
                json!({"channel": "x", "data": {"n": 0}}).to_string(),
            ),
        ],
    )
    .await;
    let srv = TestServer::start(config_from(&stream_consumer(&redis.url()))).await;
    for i in 1..10 {
        xadd(
            &mut c,
            "commands",
            &[
                ("method", "publish".into()),
                (
                    "payload",
                    json!({"channel": "x", "data": {"n": i}}).to_string(),
                ),
            ],
        )
        .await;
        if i == 5 {
            xadd(
                &mut c,
                "commands",
                &[("method", "publish".into()), ("payload", "{bad".into())],
            )
            .await;
        }
    }
    xadd(
        &mut c,
        "publications",
        &[
            ("payload", json!({"n": 100}).to_string()),
            ("centrifugo-channels", "y1,y2".into()),
            ("centrifugo-tag-kind", "t".into()),
        ],
    )
    .await;
    let got = until("stream commands", || async {
        let h = history(&srv, "x").await;
        (h.len() >= 10).then_some(h)
    })
    .await;
    assert_eq!(got, ns(0..10));
    for ch in ["y1", "y2"] {
        let got = until("data mode publication", || async {
            let h = history(&srv, ch).await;
            (!h.is_empty()).then_some(h)
        })
        .await;
        assert_eq!(got, ns([100]), "{ch}");
    }
    let r = api(&srv, "history", json!({"channel": "y1", "limit": 1})).await;
    assert_eq!(r["result"]["publications"][0]["tags"]["kind"], "t", "{r}");
    until("poison in the dead-letter stream", || {
        let mut c = c.clone();
        async move { (xlen(&mut c, "commands:dead_letter").await == 1).then_some(()) }
    })
    .await;
    let dead: ::redis::Value = ::redis::cmd("XRANGE")
        .arg("commands:dead_letter")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(format!("{dead:?}").contains("107"), "{dead:?}");
    until("nothing pending", || {
        let mut c = c.clone();
        async move { (pending(&mut c, "commands").await == 0).then_some(()) }
    })
    .await;
    let h = health(&srv).await;
    assert_eq!(h["consumers"][0]["processed"], 10, "{h}");
    assert_eq!(h["consumers"][0]["poison"], 1);
    assert_eq!(h["consumers"][1]["processed"], 1);
    srv.stop().await;
}

#[tokio::test]
async fn redis_stream_consumer_resumes_after_a_redis_restart() {
    // The stream and its group survive the restart (append-only file, fsync on every write).
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut c = redis_conn(&redis.url()).await;
    let srv = TestServer::start(config_from(&stream_consumer(&redis.url()))).await;
    xadd_many(&mut c, "r", 0..10).await;
    until("first entries", || async {
        (history(&srv, "r").await.len() >= 10).then_some(())
    })
    .await;
    redis.restart();
    until("the consumer notices", || async {
        let h = health(&srv).await;
        (h["consumers"][0]["errors"].as_u64().unwrap_or(0) >= 1).then_some(())
    })
    .await;
    let mut c = redis_conn(&redis.url()).await;
    xadd_many(&mut c, "r", 10..20).await;
    let got = until("entries after the restart", || async {
        let h = history(&srv, "r").await;
        (h.len() >= 20).then_some(h)
    })
    .await;
    assert_eq!(got, ns(0..20), "each entry once, in order");
    until("consumer back", || async {
        (health(&srv).await["consumers"][0]["status"] == "ok").then_some(())
    })
    .await;
    srv.stop().await;
}

async fn xadd_many(c: &mut ::redis::aio::MultiplexedConnection, ch: &str, n: std::ops::Range<i64>) {
    for i in n {
        xadd(
            c,
            "commands",
            &[
                ("method", "publish".into()),
                (
                    "payload",
                    json!({"channel": ch, "data": {"n": i}}).to_string(),
                ),
            ],
        )
        .await;
    }
}

#[tokio::test]
async fn redis_stream_kill_between_store_and_ack_publishes_each_entry_once() {
    let redis = RedisServer::start();
    let mut c = redis_conn(&redis.url()).await;
    let dir = temp_dir("stream-kill");
    let consumer = stream_consumer(&redis.url());
    let consumer = consumer.split("[[consumers]]").nth(1).unwrap();
    let cfg = disk_config(&dir, &format!("[[consumers]]{consumer}"));
    let port = free_port();
    let fault = ("HOLDFAST_FAULT_ABORT_AFTER_STORE", "4");
    // 1. The node restarts under its own name: its pending entries run first, in order.
    let mut child = spawn_holdfast_env(&cfg, port, WAIT, &[fault, ("HOSTNAME", "first")]).await;
    xadd_many(&mut c, "k", 0..12).await;
    aborted(&mut child).await;
    assert!(
        pending(&mut c, "commands").await > 0,
        "the aborted node left entries pending"
    );
    let mut child = spawn_holdfast_env(&cfg, port, WAIT, &[("HOSTNAME", "first")]).await;
    let got = until("all entries", || async {
        let h = history_at(port, "k").await;
        (h.len() >= 12).then_some(h)
    })
    .await;
    assert_eq!(got, ns(0..12), "each entry once, in order");
    let _ = child.kill();
    let _ = child.wait();
    // 2. The node is gone for good: another node claims its pending entries after the
    // visibility timeout. Each is published once (newer entries may come first: see
    // docs/INTEGRATION.md).
    let mut child = spawn_holdfast_env(&cfg, port, WAIT, &[fault, ("HOSTNAME", "first")]).await;
    xadd_many(&mut c, "j", 0..12).await;
    aborted(&mut child).await;
    let mut child = spawn_holdfast_env(&cfg, port, WAIT, &[("HOSTNAME", "second")]).await;
    until("nothing pending", || {
        let mut c = c.clone();
        async move { (pending(&mut c, "commands").await == 0).then_some(()) }
    })
    .await;
    let mut got = history_at(port, "j").await;
    let _ = child.kill();
    let _ = child.wait();
    got.sort_by_key(|v| v.as_i64());
    assert_eq!(got, ns(0..12), "claimed entries were not published twice");
    let _ = std::fs::remove_dir_all(&dir);
}

fn nats_consumer(url: &str, extra: &str) -> String {
    format!(
        r#"
[channel.without_namespace]
history_size = 10000
history_ttl = "600s"

[[consumers]]
name = "jet"
type = "nats_jetstream"
enabled = true
max_attempts = 2
[consumers.nats_jetstream]
url = "{url}"
stream_name = "CMDS"
subjects = ["cmds.>"]
durable_consumer_name = "holdfast"
deliver_policy = "all"
ack_wait = "1s"
{extra}
"#
    )
}

/// A JetStream context, with the streams the tests publish to.
async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    for (name, subject) in [("CMDS", "cmds.>"), ("PUBS", "pubs.>")] {
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    js
}

async fn js_publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    headers: &[(&str, &str)],
    body: String,
) {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(subject.to_owned(), h, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn nats_messages_become_publications_in_order_across_a_nats_restart() {
    let mut nats = NatsServer::start();
    let js = jetstream(&nats.url()).await;
    let data_mode = format!(
        r#"
[[consumers]]
name = "jet_data"
type = "nats_jetstream"
enabled = true
[consumers.nats_jetstream]
url = "{}"
stream_name = "PUBS"
durable_consumer_name = "holdfast"
deliver_policy = "all"
[consumers.nats_jetstream.publication_data_mode]
enabled = true
"#,
        nats.url()
    );
    let srv = TestServer::start(config_from(&nats_consumer(&nats.url(), &data_mode))).await;
    let body = |i: i64| json!({"channel": "n", "data": {"n": i}}).to_string();
    for i in 0..10 {
        if i % 2 == 0 {
            // The method in a header, the payload as the body.
            js_publish(&js, "cmds.a", &[("centrifugo-method", "publish")], body(i)).await;
        } else {
            let b = json!({"method": "publish", "payload": {"channel": "n", "data": {"n": i}}});
            js_publish(&js, "cmds.b", &[], b.to_string()).await;
        }
        if i == 4 {
            js_publish(&js, "cmds.a", &[], "not json".into()).await;
        }
    }
    js_publish(
        &js,
        "pubs.x",
        &[("centrifugo-channels", "p1,p2"), ("centrifugo-tag-k", "v")],
        json!({"n": 7}).to_string(),
    )
    .await;
    let got = until("first messages", || async {
        let h = history(&srv, "n").await;
        (h.len() >= 10).then_some(h)
    })
    .await;
    assert_eq!(got, ns(0..10), "in order, the poison message skipped");
    for ch in ["p1", "p2"] {
        let h = until("data mode", || async {
            let h = history(&srv, ch).await;
            (!h.is_empty()).then_some(h)
        })
        .await;
        assert_eq!(h, ns([7]));
    }
    nats.restart();
    let js = jetstream(&nats.url()).await;
    for i in 10..20 {
        js_publish(&js, "cmds.a", &[("centrifugo-method", "publish")], body(i)).await;
    }
    let got = until("messages after the restart", || async {
        let h = history(&srv, "n").await;
        (h.len() >= 20).then_some(h)
    })
    .await;
    assert_eq!(got, ns(0..20));
    let h = until("lag sampled at 0", || async {
        let h = health(&srv).await;
        (h["consumers"][0]["lag"] == 0 && h["consumers"][0]["status"] == "ok").then_some(h)
    })
    .await;
    // A kill -9 of nats-server can lose acknowledgements it had not written yet: those
    // messages run again (counted again) and publish nothing twice (the history above).
    assert!(
        h["consumers"][0]["processed"].as_u64().unwrap() >= 20,
        "{h}"
    );
    assert!(h["consumers"][0]["poison"].as_u64().unwrap() >= 1, "{h}");
    assert_eq!(h["consumers"][1]["processed"], 1);
    srv.stop().await;
}

#[tokio::test]
async fn nats_kill_between_store_and_ack_publishes_each_message_once() {
    let nats = NatsServer::start();
    let js = jetstream(&nats.url()).await;
    let dir = temp_dir("nats-kill");
    let consumer = nats_consumer(&nats.url(), "");
    let consumer = consumer.split("[[consumers]]").nth(1).unwrap();
    let cfg = disk_config(&dir, &format!("[[consumers]]{consumer}"));
    let port = free_port();
    let mut child = spawn_holdfast_env(
        &cfg,
        port,
        WAIT,
        &[("HOLDFAST_FAULT_ABORT_AFTER_STORE", "4")],
    )
    .await;
    for i in 0..12 {
        let b = json!({"channel": "k", "data": {"n": i}}).to_string();
        js_publish(&js, "cmds.a", &[("centrifugo-method", "publish")], b).await;
    }
    aborted(&mut child).await;
    let mut child = spawn_holdfast(&cfg, port, WAIT).await;
    // Newer messages published right after the restart do not overtake the unacknowledged ones.
    for i in 12..16 {
        let b = json!({"channel": "k", "data": {"n": i}}).to_string();
        js_publish(&js, "cmds.a", &[("centrifugo-method", "publish")], b).await;
    }
    let got = until("all messages", || async {
        let h = history_at(port, "k").await;
        (h.len() >= 16).then_some(h)
    })
    .await;
    // Count again after another ack_wait: nothing comes back a second time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = history_at(port, "k").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, ns(0..16), "each message once, in order");
    assert_eq!(
        again,
        ns(0..16),
        "redelivered messages were not published twice"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_centrifugo_consumers_config_loads_from_toml_and_environment() {
    let c = config_from(
        r#"
[[consumers]]
name = "pg"
type = "postgresql"
enabled = true
[consumers.postgresql]
dsn = "postgresql://u:p@db:5432/app"
outbox_table_name = "centrifugo_outbox"
num_partitions = 4
partition_select_limit = 50
partition_poll_interval = "1s"
partition_notification_channel = "centrifugo_partition_change"
use_try_lock = true

[[consumers]]
name = "kafka_one"
type = "kafka"
[consumers.kafka]
brokers = ["localhost:9092"]
topics = ["t"]
consumer_group = "g"
"#,
    );
    assert!(c.validate().is_ok(), "{:?}", c.validate());
    let pg = &c.consumers[0].postgresql;
    assert_eq!(pg.num_partitions, 4);
    assert_eq!(pg.partition_poll_interval, Duration::from_secs(1));
    assert!(pg.use_try_lock);
    let mut enabled_kafka = c.clone();
    enabled_kafka.consumers[1].enabled = true;
    let errs = enabled_kafka.validate().unwrap_err();
    assert!(
        errs.iter().any(|e| e.to_string().contains("not supported")),
        "{errs:?}"
    );
    // The whole list as JSON in one environment variable, as Centrifugo takes it.
    let env = vec![(
        "HOLDFAST_CONSUMERS".to_owned(),
        r#"[{"name":"st","type":"redis_stream","enabled":true,"redis_stream":{"address":["redis://127.0.0.1:6379"],"streams":["a"],"consumer_group":"g"}}]"#.to_owned(),
    )];
    let l = holdfast_server::config::load(None, env, &[]).unwrap();
    assert!(l.unknown.is_empty(), "{:?}", l.unknown);
    assert_eq!(l.config.consumers[0].redis_stream.streams, ["a"]);
    assert_eq!(l.config.consumers[0].redis_stream.method_value, "method");
    assert!(holdfast_server::config::consumers::validate(&l.config.consumers).is_empty());
}
