//! The Redis engine over TLS (`rediss://`, `engine.redis.tls`) against Debian's redis-server
//! started with TLS only: publications, history and live delivery go through it; a server
//! certificate from another CA is refused (the engine reports unavailable, nothing falls back
//! to plain text).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::RedisServer;
use common::*;
use serde_json::json;

fn config(url: &str, ca_pem: &str) -> holdfast_server::config::Config {
    config_from(&format!(
        r#"
[engine]
type = "redis"
[engine.redis]
address = "{url}"
ping_interval = "200ms"
[engine.redis.tls]
server_ca_pem = """
{ca_pem}"""
[channel.without_namespace]
history_size = 10
history_ttl = "60s"
allow_subscribe_for_client = true
"#
    ))
}

#[tokio::test]
async fn the_redis_engine_works_over_tls_and_refuses_an_unknown_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let redis = RedisServer::start_tls(&cert.cert.pem(), &cert.signing_key.serialize_pem());
    assert!(redis.url().starts_with("rediss://"));
    let srv = TestServer::start(config(&redis.url(), &cert.cert.pem())).await;
    let (mut c, _) = srv.connected("alice").await;
    c.call("subscribe", json!({"channel": "secure"})).await;
    let r = api(
        &srv,
        "publish",
        json!({"channel": "secure", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    assert_eq!(c.push().await["pub"]["data"]["n"], 1);
    let h = api(&srv, "history", json!({"channel": "secure", "limit": 10})).await;
    assert_eq!(h["result"]["publications"][0]["data"]["n"], 1, "{h}");
    srv.stop().await;

    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let srv = TestServer::start(config(&redis.url(), &other.cert.pem())).await;
    let r = api(
        &srv,
        "publish",
        json!({"channel": "secure", "data": {"n": 2}}),
    )
    .await;
    assert_eq!(code(&r), 100, "no verified connection, no publish: {r}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = reqwest::get(srv.http("/ready")).await.unwrap().status();
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready stays {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    srv.stop().await;
}
