//! Connecting: tokens, first-frame rules, stale connections, ping/pong, expiry and refresh.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::json;

#[tokio::test]
async fn connect_with_valid_token() {
    let srv = TestServer::start(base_config()).await;
    let mut c = srv.client().await;
    let r = c.connect_token(&token("42", Some(600), json!({}))).await;
    let res = &r["connect"];
    assert_eq!(
        res["client"].as_str().map(str::len),
        Some(36),
        "client id is a UUID: {r}"
    );
    assert_eq!(res["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(res["ping"], 25);
    assert_eq!(res["pong"], true);
    assert_eq!(res["expires"], true);
    let ttl = res["ttl"].as_u64().unwrap();
    assert!((598..=600).contains(&ttl), "ttl {ttl}");
    srv.stop().await;
}

#[tokio::test]
async fn invalid_token_closes_with_3500() {
    let srv = TestServer::start(base_config()).await;
    let mut c = srv.client().await;
    let bad = holdfast_server::jwt::sign_hs256("wrong-secret", &json!({"sub":"42"})).unwrap();
    c.send("connect", json!({ "token": bad })).await;
    assert_eq!(c.closed().await, Closed::Code(3500, "invalid token".into()));
    srv.stop().await;
}

#[tokio::test]
async fn expired_token_gets_109_and_connection_is_unusable() {
    let srv = TestServer::start(base_config()).await;
    let mut c = srv.client().await;
    let r = c.connect_token(&token("42", Some(-10), json!({}))).await;
    assert_eq!(r["error"]["code"], 109, "{r}");
    assert_eq!(r["error"]["message"], "token expired");
    // Any further command on the unusable connection closes it with 3501.
    c.send("presence", json!({"channel": "x"})).await;
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn no_token_without_insecure_is_bad_request() {
    let srv = TestServer::start(base_config()).await;
    let mut c = srv.client().await;
    c.send("connect", json!({})).await;
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn anonymous_connect_in_insecure_mode() {
    let mut cfg = base_config();
    cfg.client.insecure = true;
    let srv = TestServer::start(cfg).await;
    let mut c = srv.client().await;
    let r = c.call("connect", json!({})).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn first_command_must_be_connect() {
    let srv = TestServer::start(base_config()).await;
    let mut c = srv.client().await;
    c.send("subscribe", json!({"channel": "news"})).await;
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn second_connect_is_bad_request() {
    let srv = TestServer::start(base_config()).await;
    let (mut c, _) = srv.connected("42").await;
    c.send("connect", json!({"token": token("42", None, json!({}))}))
        .await;
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn stale_connection_is_closed_with_3502() {
    let cfg = config_from("[client]\nstale_close_delay = \"300ms\"\n");
    let srv = TestServer::start(cfg).await;
    let mut c = srv.client().await;
    assert_eq!(c.closed().await, Closed::Code(3502, "stale".into()));
    srv.stop().await;
}

#[tokio::test]
async fn pings_arrive_and_pongs_keep_the_connection() {
    let cfg = config_from("[client]\nping_interval = \"1s\"\npong_timeout = \"500ms\"\n");
    let srv = TestServer::start(cfg).await;
    let (mut c, r) = srv.connected("42").await;
    assert_eq!(r["connect"]["ping"], 1);
    c.auto_pong = false;
    for _ in 0..3 {
        let ping = c.next().await;
        assert_eq!(ping, json!({}), "server ping is an empty object");
        c.send_raw("{}").await;
    }
    // Still usable after three ping/pong rounds.
    let r = c.call("presence_stats", json!({"channel": "x"})).await;
    assert_eq!(
        r["error"]["code"], 108,
        "presence is off in the default namespace: {r}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn missing_pong_closes_with_3012() {
    let cfg = config_from("[client]\nping_interval = \"1s\"\npong_timeout = \"300ms\"\n");
    let srv = TestServer::start(cfg).await;
    let (mut c, _) = srv.connected("42").await;
    c.auto_pong = false;
    assert_eq!(c.next().await, json!({}));
    assert_eq!(c.closed().await, Closed::Code(3012, "no pong".into()));
    srv.stop().await;
}

#[tokio::test]
async fn unnecessary_pong_is_bad_request() {
    let srv = TestServer::start(base_config()).await;
    let (mut c, _) = srv.connected("42").await;
    c.send_raw("{}").await;
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn expired_connection_closes_with_3005_unless_refreshed() {
    let cfg = config_from("[client]\nexpired_close_delay = \"300ms\"\n");
    let srv = TestServer::start(cfg).await;
    // Refreshed before expiry: stays open past the original expiry.
    let (mut a, r) = srv.connected_with(&token("7", Some(2), json!({}))).await;
    assert_eq!(r["connect"]["expires"], true);
    let r = a
        .call(
            "refresh",
            json!({"token": token("7", Some(600), json!({}))}),
        )
        .await;
    assert_eq!(r["refresh"]["expires"], true, "{r}");
    assert!(r["refresh"]["ttl"].as_u64().unwrap() > 500);
    // Not refreshed: closed after expiry + grace.
    let (mut b, _) = srv.connected_with(&token("8", Some(1), json!({}))).await;
    assert_eq!(
        b.closed().await,
        Closed::Code(3005, "connection expired".into())
    );
    // `a` outlived b's expiry and is still usable.
    let r = a.call("presence_stats", json!({"channel": "x"})).await;
    assert_eq!(r["error"]["code"], 108);
    srv.stop().await;
}

#[tokio::test]
async fn refresh_with_another_users_token_is_invalid() {
    let srv = TestServer::start(base_config()).await;
    let (mut c, _) = srv.connected("1").await;
    c.send(
        "refresh",
        json!({"token": token("2", Some(600), json!({}))}),
    )
    .await;
    assert_eq!(c.closed().await, Closed::Code(3500, "invalid token".into()));
    srv.stop().await;
}

#[tokio::test]
async fn user_connection_limit() {
    let cfg = config_from("[client]\nuser_connection_limit = 2\n");
    let srv = TestServer::start(cfg).await;
    let (_a, _) = srv.connected("u").await;
    let (_b, _) = srv.connected("u").await;
    let mut c = srv.client().await;
    c.send("connect", json!({"token": token("u", None, json!({}))}))
        .await;
    assert_eq!(
        c.closed().await,
        Closed::Code(3504, "connection limit".into())
    );
    let (_other, r) = srv.connected("v").await;
    assert!(r["connect"].is_object(), "other users are unaffected");
    srv.stop().await;
}

#[tokio::test]
async fn no_upgrade_before_the_node_is_ready() {
    let state = holdfast_server::server::build(base_config()).await.unwrap();
    let (srv, ready) = TestServer::start_unready(state).await;
    let r = reqwest::get(srv.http("/ready")).await.unwrap();
    assert_eq!(r.status(), 503);
    let attempt = tokio_tungstenite::connect_async(srv.ws_url()).await;
    match attempt {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("upgrade before ready must be refused with 503, got {other:?}"),
    }
    ready.send(()).unwrap();
    eventually("node ready", || srv.state.node.is_ready()).await;
    assert_eq!(
        reqwest::get(srv.http("/ready")).await.unwrap().status(),
        200
    );
    let (_c, r) = srv.connected("u").await;
    assert!(r["connect"].is_object());
    srv.stop().await;
}

#[tokio::test]
async fn too_many_server_side_channels_is_3505() {
    let cfg = config_from("[client]\nchannel_limit = 2\n");
    let srv = TestServer::start(cfg).await;
    let mut c = srv.client().await;
    c.send(
        "connect",
        json!({"token": token("u", None, json!({"channels": ["a", "b", "c"]}))}),
    )
    .await;
    assert_eq!(c.closed().await, Closed::Code(3505, "channel limit".into()));
    srv.stop().await;
}

#[tokio::test]
async fn single_connection_mode_closes_older_connections() {
    let cfg = config_from(
        "[client.subscribe_to_user_personal_channel]\nenabled = true\nsingle_connection = true\n",
    );
    let srv = TestServer::start(cfg).await;
    let (mut first, _) = srv.connected("u").await;
    let (mut second, _) = srv.connected("u").await;
    assert_eq!(
        first.closed().await,
        Closed::Code(3504, "connection limit".into())
    );
    assert!(second.call("unsubscribe", json!({"channel": "#u"})).await["unsubscribe"].is_object());
    srv.stop().await;
}

#[tokio::test]
async fn subscription_token_refresh_and_expiry() {
    let cfg = config_from(
        "[client]\nexpired_sub_close_delay = \"200ms\"\n[[channel.namespaces]]\nname = \"pp\"\n",
    );
    let srv = TestServer::start(cfg).await;
    let (mut c, _) = srv.connected("u").await;
    let short = token("u", Some(1), json!({"channel": "$pp:a"}));
    let r = c
        .call("subscribe", json!({"channel": "$pp:a", "token": short}))
        .await;
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    let long = token("u", Some(600), json!({"channel": "$pp:a"}));
    let r = c
        .call("sub_refresh", json!({"channel": "$pp:a", "token": long}))
        .await;
    assert_eq!(r["sub_refresh"]["expires"], true, "{r}");
    assert!(r["sub_refresh"]["ttl"].as_u64().unwrap() > 500);
    let short_b = token("u", Some(1), json!({"channel": "$pp:b"}));
    c.call("subscribe", json!({"channel": "$pp:b", "token": short_b}))
        .await;
    let p = c.push().await;
    assert_eq!(
        p,
        json!({"channel": "$pp:b", "unsubscribe": {"code": 2501, "reason": "subscription expired"}})
    );
    // `$pp:a` was refreshed and is still subscribed.
    let r = c.call("subscribe", json!({"channel": "$pp:a", "token": token("u", Some(600), json!({"channel": "$pp:a"}))})).await;
    assert_eq!(r["error"]["code"], 105, "{r}");
    srv.stop().await;
}
