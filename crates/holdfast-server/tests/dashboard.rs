//! The Grafana dashboard (`deploy/grafana/holdfast.json`) queries only metrics a running server
//! exports: a server with a consumer is driven through connects, subscribes, a recovery,
//! publishes, an API error, a refused oversized request, a disconnect and a consumed command,
//! then every metric name in every panel's expression must be in `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::postgres::PgServer;
use common::*;
use serde_json::{Value, json};

fn dashboard_metrics() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/holdfast.json"
    ))
    .unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut names = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("holdfast_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let names = dashboard_metrics();
    assert!(
        names.len() >= 20,
        "the dashboard queries metrics: {names:?}"
    );
    let pg = PgServer::start();
    let db = pg.client().await;
    db.batch_execute(include_str!("../../../deploy/postgresql/outbox.sql"))
        .await
        .unwrap();
    let cfg = config_from(&format!(
        r#"
[http_api]
max_body_size = 1024
[[channel.namespaces]]
name = "news"
history_size = 10
history_ttl = "60s"
force_recovery = true
allow_subscribe_for_client = true
[[consumers]]
name = "outbox"
type = "postgresql"
enabled = true
[consumers.postgresql]
dsn = "{}"
outbox_table_name = "holdfast_outbox"
partition_notification_channel = "holdfast_outbox"
"#,
        pg.dsn()
    ));
    let srv = TestServer::start(cfg).await;
    let (mut a, _) = srv.connected("alice").await;
    let sub = a.call("subscribe", json!({"channel": "news:1"})).await;
    let epoch = sub["subscribe"]["epoch"].as_str().unwrap().to_owned();
    let r = api(
        &srv,
        "publish",
        json!({"channel": "news:1", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    a.push().await;
    // A second connection recovers from offset 0: a recovery outcome.
    let (mut b, _) = srv.connected("bob").await;
    let rec = b
        .call(
            "subscribe",
            json!({"channel": "news:1", "recover": true, "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(rec["subscribe"]["recovered"], true, "{rec}");
    // An API error and a request over http_api.max_body_size.
    let r = api(&srv, "publish", json!({"channel": "nope:1", "data": {}})).await;
    assert_eq!(code(&r), 102);
    let big = reqwest::Client::new()
        .post(srv.http("/api/publish"))
        .header("X-API-Key", API_KEY)
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    // A server-side disconnect.
    api(&srv, "disconnect", json!({"user": "bob"})).await;
    b.closed().await;
    // A command through the consumer.
    db.execute(
        "INSERT INTO holdfast_outbox (method, payload) VALUES ('publish', $1::text::jsonb)",
        &[&json!({"channel": "news:2", "data": {}}).to_string()],
    )
    .await
    .unwrap();
    // The consumed command and the consumer's first lag sample (every 2 s).
    let deadline = tokio::time::Instant::now() + WAIT;
    let metrics = loop {
        let m = reqwest::get(srv.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let done = m.contains("holdfast_consumer_processed_total{consumer=\"outbox\"} 1")
            && m.contains("holdfast_consumer_lag_seconds{")
            // The server counts bob's disconnect when its connection task ends.
            && m.contains("holdfast_disconnects_total{");
        if done || tokio::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let exported = |name: &str| {
        metrics.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    };
    let missing: Vec<&String> = names.iter().filter(|n| !exported(n)).collect();
    assert!(
        missing.is_empty(),
        "queried by the dashboard, not in /metrics: {missing:?}"
    );
    srv.stop().await;
}
