//! 10,000 connect → rpc → disconnect cycles leave the node's handlers, tasks and memory flat.

#![allow(clippy::unwrap_used)]

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

async fn cycle(url: &str, i: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text("{\"id\":1,\"connect\":{}}".into()))
        .await
        .unwrap();
    let rpc = format!("{{\"id\":2,\"rpc\":{{\"method\":\"echo\",\"data\":{{\"i\":{i}}}}}}}");
    ws.send(Message::Text(rpc.into())).await.unwrap();
    let want = format!("{{\"id\":2,\"rpc\":{{\"data\":{{\"i\":{i}}}}}}}");
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("connection lost in cycle {i}")
        };
        if t.as_str().split('\n').any(|l| l == want) {
            break;
        }
    }
    ws.close(None).await.unwrap();
}

async fn settle(node: &holdfast_core::Node) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.tracker().is_empty()
        || node
            .hub()
            .counts
            .clients
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    {
        assert!(
            Instant::now() < deadline,
            "connections did not end: {} tasks",
            node.tracker().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_keeps_handlers_tasks_and_memory_flat() {
    let (app, node, handler) = holdfast_example_embedded::build().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "ws://{}/connection/websocket",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let methods = handler.len();
    // Warm up (allocator pools, first-use tables), then measure.
    for i in 0..500 {
        cycle(&url, i).await;
    }
    settle(&node).await;
    let before = rss_kib();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..500 {
                cycle(&url, w * 1000 + i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    settle(&node).await;
    let after = rss_kib();
    let total = node
        .stats()
        .connections_total
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "churn: 10000 cycles in {:.1}s; connections total {total}; tasks {}; clients {}; subscriptions {}; rss {before} KiB -> {after} KiB ({:+} KiB); rpc methods {methods}",
        started.elapsed().as_secs_f64(),
        node.tracker().len(),
        node.hub()
            .counts
            .clients
            .load(std::sync::atomic::Ordering::Relaxed),
        node.hub()
            .counts
            .subscriptions
            .load(std::sync::atomic::Ordering::Relaxed),
        after as i64 - before as i64
    );
    assert_eq!(total, 10_500);
    assert_eq!(node.tracker().len(), 0, "no connection task left");
    assert_eq!(
        handler.len(),
        methods,
        "handlers are per node, not per connection"
    );
    assert!(
        after < before + 16 * 1024,
        "memory flat: {before} KiB -> {after} KiB"
    );
}
