//! Channels: permissions, personal channel, publish/receive, history, presence, join/leave.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};

const NAMESPACES: &str = r#"
[client]
allow_anonymous_connect_without_token = true
channel_limit = 4
[client.subscribe_to_user_personal_channel]
enabled = true
[channel.without_namespace]
allow_subscribe_for_client = true
history_size = 10
history_ttl = "60s"
force_recovery = true
[[channel.namespaces]]
name = "closed"
[[channel.namespaces]]
name = "anon"
allow_subscribe_for_client = true
allow_subscribe_for_anonymous = true
[[channel.namespaces]]
name = "dialog"
allow_user_limited_channels = true
[[channel.namespaces]]
name = "chat"
presence = true
join_leave = true
force_push_join_leave = true
history_size = 10
history_ttl = "60s"
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true
[[channel.namespaces]]
name = "plain"
allow_subscribe_for_client = true
allow_publish_for_client = true
"#;

#[tokio::test]
async fn subscribe_permissions_per_namespace() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let (mut c, _) = srv.connected("42").await;
    assert!(c.call("subscribe", json!({"channel": "news"})).await["subscribe"].is_object());
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "news"})).await),
        105,
        "already subscribed"
    );
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "closed:x"})).await),
        103
    );
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "nope:x"})).await),
        102
    );
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "$closed:x"})).await),
        103,
        "private needs a token"
    );
    assert_eq!(
        code(
            &c.call("subscribe", json!({"channel": "a".repeat(300)}))
                .await
        ),
        107
    );
    let tok = sub_token("42", "$closed:x", json!({}));
    assert!(
        c.call("subscribe", json!({"channel": "$closed:x", "token": tok}))
            .await["subscribe"]
            .is_object()
    );
    assert!(
        c.call("subscribe", json!({"channel": "dialog:#42,43"}))
            .await["subscribe"]
            .is_object()
    );
    // 4 subscriptions now (#42, news, $closed:x, dialog:#42,43): the limit is 4.
    assert_eq!(
        code(&c.call("subscribe", json!({"channel": "anon:y"})).await),
        106,
        "channel limit"
    );
    let (mut d, _) = srv.connected("44").await;
    assert_eq!(
        code(
            &d.call("subscribe", json!({"channel": "dialog:#42,43"}))
                .await
        ),
        103,
        "not one of the users"
    );
    let expired = token("44", Some(-5), json!({"channel": "$closed:y"}));
    assert_eq!(
        code(
            &d.call(
                "subscribe",
                json!({"channel": "$closed:y", "token": expired})
            )
            .await
        ),
        109
    );
    let bad = holdfast_server::jwt::sign_hs256("nope", &json!({"sub":"44","channel":"$closed:y"}))
        .unwrap();
    assert_eq!(
        code(
            &d.call("subscribe", json!({"channel": "$closed:y", "token": bad}))
                .await
        ),
        103,
        "invalid subscription token"
    );
    // Anonymous connection.
    let mut a = srv.client().await;
    assert!(a.call("connect", json!({})).await["connect"].is_object());
    assert_eq!(
        code(&a.call("subscribe", json!({"channel": "news"})).await),
        103,
        "anonymous not allowed"
    );
    assert!(a.call("subscribe", json!({"channel": "anon:y"})).await["subscribe"].is_object());
    // Empty channel is a protocol violation.
    a.send("subscribe", json!({"channel": ""})).await;
    assert_eq!(a.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn subscription_token_for_another_user_is_invalid_token() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let (mut c, _) = srv.connected("42").await;
    let tok = sub_token("43", "$closed:x", json!({}));
    c.send("subscribe", json!({"channel": "$closed:x", "token": tok}))
        .await;
    assert_eq!(c.closed().await, Closed::Code(3500, "invalid token".into()));
    let (mut c, _) = srv.connected("42").await;
    let tok = sub_token("42", "$closed:other", json!({}));
    c.send("subscribe", json!({"channel": "$closed:x", "token": tok}))
        .await;
    assert_eq!(
        c.closed().await,
        Closed::Code(3500, "invalid token".into()),
        "token for another channel"
    );
    srv.stop().await;
}

#[tokio::test]
async fn personal_channel_and_token_channels() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let mut c = srv.client().await;
    let r = c
        .connect_token(&token("42", None, json!({"channels": ["chat:lobby"]})))
        .await;
    let subs = &r["connect"]["subs"];
    assert!(subs["#42"].is_object(), "personal channel subscribed: {r}");
    assert_eq!(subs["#42"]["recoverable"], true);
    assert_eq!(subs["#42"]["positioned"], true);
    assert_eq!(subs["#42"]["epoch"].as_str().map(str::len), Some(8));
    assert!(
        subs["chat:lobby"].is_object(),
        "token channels subscribed: {r}"
    );
    let off = publish(&srv, "#42", json!({"to": "you"})).await;
    assert_eq!(off, 1);
    let mut saw = None;
    while saw.is_none() {
        let p = c.push().await;
        if p["channel"] == "#42" {
            saw = Some(p);
        }
    }
    let p = saw.unwrap();
    assert_eq!(p["pub"]["data"], json!({"to": "you"}));
    assert_eq!(p["pub"]["offset"], 1);
    // An unknown namespace in the token's channels fails the connect with 102.
    let mut d = srv.client().await;
    let r = d
        .connect_token(&token("43", None, json!({"channels": ["nope:x"]})))
        .await;
    assert_eq!(code(&r), 102);
    srv.stop().await;
}

#[tokio::test]
async fn publish_and_receive() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let (mut a, ra) = srv.connected("a").await;
    let (mut b, _) = srv.connected("b").await;
    let a_id = ra["connect"]["client"].clone();
    a.call("subscribe", json!({"channel": "plain:room"})).await;
    b.call("subscribe", json!({"channel": "plain:room"})).await;
    let r = a
        .call(
            "publish",
            json!({"channel": "plain:room", "data": {"text": "hi"}}),
        )
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    for c in [&mut a, &mut b] {
        let p = c.push().await;
        assert_eq!(p["channel"], "plain:room");
        assert_eq!(p["pub"]["data"], json!({"text": "hi"}));
        assert_eq!(p["pub"]["info"]["user"], "a");
        assert_eq!(p["pub"]["info"]["client"], a_id);
        assert!(
            p["pub"].get("offset").is_none(),
            "no offset without history"
        );
    }
    // Subscriber-only publish: c is not subscribed to chat:x.
    let (mut c, _) = srv.connected("c").await;
    assert_eq!(
        code(
            &c.call("publish", json!({"channel": "chat:x", "data": {}}))
                .await
        ),
        103
    );
    c.call("subscribe", json!({"channel": "chat:x"})).await;
    let _join = c.push().await;
    assert_eq!(
        c.call("publish", json!({"channel": "chat:x", "data": {"n": 1}}))
            .await["publish"],
        json!({})
    );
    // Missing data is a protocol violation.
    c.send("publish", json!({"channel": "chat:x"})).await;
    assert_eq!(c.closed().await, Closed::Code(3501, "bad request".into()));
    srv.stop().await;
}

#[tokio::test]
async fn history_with_since_limit_reverse() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let (mut c, _) = srv.connected("u").await;
    c.call("subscribe", json!({"channel": "chat:h"})).await;
    for n in 1..=5 {
        assert_eq!(publish(&srv, "chat:h", json!({"n": n})).await, n);
    }
    let offsets = |r: &Value| -> Vec<u64> {
        r["history"]["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect()
    };
    let all = c
        .call("history", json!({"channel": "chat:h", "limit": -1}))
        .await;
    assert_eq!(offsets(&all), [1, 2, 3, 4, 5]);
    assert_eq!(all["history"]["offset"], 5);
    let epoch = all["history"]["epoch"].clone();
    assert_eq!(all["history"]["publications"][0]["data"], json!({"n": 1}));
    let r = c
        .call("history", json!({"channel": "chat:h", "limit": 2}))
        .await;
    assert_eq!(offsets(&r), [1, 2]);
    let r = c
        .call(
            "history",
            json!({"channel": "chat:h", "limit": 2, "since": {"offset": 2, "epoch": epoch}}),
        )
        .await;
    assert_eq!(offsets(&r), [3, 4], "pages by since do not overlap");
    let r = c
        .call(
            "history",
            json!({"channel": "chat:h", "limit": 2, "reverse": true}),
        )
        .await;
    assert_eq!(offsets(&r), [5, 4]);
    let r = c.call("history", json!({"channel": "chat:h", "limit": -1, "reverse": true, "since": {"offset": 4, "epoch": epoch}})).await;
    assert_eq!(offsets(&r), [3, 2, 1]);
    let r = c.call("history", json!({"channel": "chat:h"})).await;
    assert_eq!(
        r["history"],
        json!({"publications": [], "epoch": epoch, "offset": 5}),
        "limit 0: position only"
    );
    let r = c
        .call(
            "history",
            json!({"channel": "chat:h", "limit": 1, "since": {"offset": 2, "epoch": "otherepo"}}),
        )
        .await;
    assert_eq!(code(&r), 112);
    assert_eq!(
        code(&c.call("history", json!({"channel": "plain:x"})).await),
        108,
        "no history in namespace"
    );
    assert_eq!(
        code(&c.call("history", json!({"channel": "chat:other"})).await),
        103,
        "not subscribed"
    );
    srv.stop().await;
}

#[tokio::test]
async fn presence_and_join_leave() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let (mut a, ra) = srv.connected("a").await;
    let (mut b, rb) = srv.connected("b").await;
    let (a_id, b_id) = (
        ra["connect"]["client"].clone(),
        rb["connect"]["client"].clone(),
    );
    a.call("subscribe", json!({"channel": "chat:p"})).await;
    let j = a.push().await;
    assert_eq!(
        j["join"]["info"]["client"], a_id,
        "the subscriber receives its own join"
    );
    b.call("subscribe", json!({"channel": "chat:p"})).await;
    let j = a.push().await;
    assert_eq!(
        (j["channel"].clone(), j["join"]["info"]["user"].clone()),
        (json!("chat:p"), json!("b"))
    );
    assert_eq!(b.push().await["join"]["info"]["client"], b_id);
    let r = a.call("presence", json!({"channel": "chat:p"})).await;
    let p = r["presence"]["presence"].as_object().unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[b_id.as_str().unwrap()]["user"], "b");
    let r = a.call("presence_stats", json!({"channel": "chat:p"})).await;
    assert_eq!(
        r["presence_stats"],
        json!({"num_clients": 2, "num_users": 2})
    );
    b.call("unsubscribe", json!({"channel": "chat:p"})).await;
    let l = a.push().await;
    assert_eq!(l["leave"]["info"]["client"], b_id);
    b.call("subscribe", json!({"channel": "chat:p"})).await;
    assert_eq!(a.push().await["join"]["info"]["client"], b_id);
    drop(b);
    let l = a.push().await;
    assert_eq!(
        l["leave"]["info"]["client"], b_id,
        "a disconnect is a leave"
    );
    let r = a.call("presence_stats", json!({"channel": "chat:p"})).await;
    assert_eq!(
        r["presence_stats"],
        json!({"num_clients": 1, "num_users": 1})
    );
    assert_eq!(
        code(&a.call("presence", json!({"channel": "plain:x"})).await),
        108
    );
    assert_eq!(
        code(
            &a.call("presence", json!({"channel": "chat:elsewhere"}))
                .await
        ),
        103
    );
    srv.stop().await;
}

#[tokio::test]
async fn rpc_and_send_without_handlers() {
    let srv = TestServer::start(config_from(NAMESPACES)).await;
    let (mut c, _) = srv.connected("u").await;
    assert_eq!(
        code(
            &c.call("rpc", json!({"method": "getPrice", "data": {}}))
                .await
        ),
        108
    );
    c.send_raw(r#"{"send":{"data":{"typing":true}}}"#).await;
    assert_eq!(c.closed().await, Closed::Code(3508, "not available".into()));
    srv.stop().await;
}

/// The configuration `holdfast genconfig` writes, on the memory engine.
fn genconfig() -> holdfast_server::config::Config {
    config_from(
        &holdfast_server::config::generate(SECRET, API_KEY)
            .replace("type = \"disk\"", "type = \"memory\""),
    )
}

/// The example configuration in README.md (the first TOML block after "A short example").
fn readme_config() -> holdfast_server::config::Config {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let at = readme.find("A short example").expect("README example");
    let block = readme[at..]
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let mut c = config_from(block);
    c.client.token.hmac_secret_key = SECRET.into();
    c.engine.kind = holdfast_server::config::EngineKind::Memory;
    c
}

/// The next publication pushed to `c` (join and leave pushes are skipped).
async fn next_pub(c: &mut TestClient) -> Value {
    loop {
        let p = c.push().await;
        if let Some(publication) = p.get("pub") {
            return publication.clone();
        }
    }
}

/// Subscribe, history, presence and publish on another user's personal channel are refused with
/// 103; the owner may use it; an anonymous connection is refused.
async fn personal_channel_is_its_owners_alone(cfg: holdfast_server::config::Config) {
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    let srv = TestServer::start(cfg).await;
    let (mut owner, r) = srv.connected("43").await;
    assert!(r["connect"]["subs"]["#43"].is_object(), "{r}");
    assert_eq!(publish(&srv, "#43", json!({"secret": 1})).await, 1);
    assert_eq!(next_pub(&mut owner).await["data"], json!({"secret": 1}));

    let (mut other, _) = srv.connected("42").await;
    let anonymous = token("", None, json!({}));
    let (mut anon, r) = srv.connected_with(&anonymous).await;
    assert!(r["connect"].is_object(), "{r}");
    for c in [&mut other, &mut anon] {
        for (method, params) in [
            ("subscribe", json!({"channel": "#43"})),
            ("history", json!({"channel": "#43", "limit": -1})),
            ("presence", json!({"channel": "#43"})),
            ("presence_stats", json!({"channel": "#43"})),
            ("publish", json!({"channel": "#43", "data": {"x": 1}})),
            ("subscribe", json!({"channel": "$#43"})),
        ] {
            let r = c.call(method, params).await;
            assert_eq!(code(&r), 103, "{method}: {r}");
        }
    }
    // A subscription token for the channel does not open it either.
    let tok = sub_token("42", "#43", json!({}));
    let r = other
        .call("subscribe", json!({"channel": "#43", "token": tok}))
        .await;
    assert_eq!(code(&r), 103, "{r}");

    // The owner: history, presence and publish are allowed; subscribing again after leaving too.
    let r = owner
        .call("history", json!({"channel": "#43", "limit": -1}))
        .await;
    assert_eq!(
        r["history"]["publications"][0]["data"],
        json!({"secret": 1}),
        "{r}"
    );
    let r = owner.call("presence", json!({"channel": "#43"})).await;
    assert!(r["presence"].is_object(), "{r}");
    let r = owner
        .call("publish", json!({"channel": "#43", "data": {"own": 1}}))
        .await;
    assert_eq!(r["publish"], json!({}), "{r}");
    assert_eq!(next_pub(&mut owner).await["data"], json!({"own": 1}));
    owner.call("unsubscribe", json!({"channel": "#43"})).await;
    let r = owner.call("subscribe", json!({"channel": "#43"})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn personal_channel_under_genconfig() {
    Box::pin(personal_channel_is_its_owners_alone(genconfig())).await;
}

#[tokio::test]
async fn personal_channel_under_readme_example() {
    Box::pin(personal_channel_is_its_owners_alone(readme_config())).await;
}
