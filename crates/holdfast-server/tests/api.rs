//! The server HTTP API, health, readiness and metrics.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};

const CFG: &str = r#"
[client.subscribe_to_user_personal_channel]
enabled = true
[channel.without_namespace]
presence = true
history_size = 10
history_ttl = "60s"
force_recovery = true
delivery_cursor = true
allow_subscribe_for_client = true
[[channel.namespaces]]
name = "nohist"
allow_subscribe_for_client = true
"#;

async fn post(srv: &TestServer, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(srv.http(path))
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn api_key_forms_and_401() {
    let srv = TestServer::start(config_from(CFG)).await;
    let body = r#"{"channel":"news","data":{"a":1}}"#;
    let ok = [
        vec![("X-API-Key", API_KEY)],
        vec![("Authorization", "apikey test-api-key")],
        vec![("Authorization", "APIKEY test-api-key")],
    ];
    for h in &ok {
        let (s, v) = post(&srv, "/api/publish", body, h).await;
        assert_eq!(s, 200, "{h:?}");
        assert!(v["result"]["offset"].as_u64().is_some(), "{v}");
    }
    let (s, _) = post(&srv, &format!("/api/publish?api_key={API_KEY}"), body, &[]).await;
    assert_eq!(s, 200, "query key");
    for h in [
        vec![],
        vec![("X-API-Key", "wrong")],
        vec![("Authorization", "bearer test-api-key")],
    ] {
        let (s, v) = post(&srv, "/api/publish", body, &h).await;
        assert_eq!(s, 401, "{h:?}");
        assert_eq!(v["error"], "unauthorized");
    }
    let r = reqwest::get(srv.http("/api/publish")).await.unwrap();
    assert_eq!(r.status(), 405, "GET is not allowed");
    srv.stop().await;
}

#[tokio::test]
async fn publish_results_and_errors() {
    let srv = TestServer::start(config_from(CFG)).await;
    let k = [("X-API-Key", API_KEY)];
    let (_, v) = post(
        &srv,
        "/api/publish",
        r#"{"channel":"news","data":{"n":1}}"#,
        &k,
    )
    .await;
    assert_eq!(v["result"]["offset"], 1);
    assert_eq!(v["result"]["epoch"].as_str().unwrap().len(), 8);
    let (_, v) = post(
        &srv,
        "/api/publish",
        r#"{"channel":"nohist:x","data":{"n":1}}"#,
        &k,
    )
    .await;
    assert_eq!(v, json!({"result": {}}), "no history: empty result");
    let (s, v) = post(
        &srv,
        "/api/publish",
        r#"{"channel":"nope:x","data":{}}"#,
        &k,
    )
    .await;
    assert_eq!(
        (s, v),
        (
            200,
            json!({"error": {"code": 102, "message": "unknown channel"}})
        )
    );
    let (_, v) = post(&srv, "/api/publish", r#"{"channel":"news"}"#, &k).await;
    assert_eq!(v["error"]["code"], 107, "data required: {v}");
    let (_, v) = post(&srv, "/api/publish", r#"{"data":{}}"#, &k).await;
    assert_eq!(v["error"]["code"], 107, "channel required");
    let (s, v) = post(&srv, "/api/publish", r#"{"channel":"news","data":"#, &k).await;
    assert_eq!(s, 400, "undecodable body");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot decode request"),
        "{v}"
    );
    let (s, v) = post(
        &srv,
        "/api/publish",
        r#"{"channel":"nope:x","data":{}}"#,
        &[k[0], ("X-Centrifugo-Error-Mode", "transport")],
    )
    .await;
    assert_eq!(
        (s, v),
        (404, json!({"code": 102, "message": "unknown channel"})),
        "transport error mode"
    );
    let (_, v) = post(
        &srv,
        "/api/publish",
        r#"{"channel":"news","b64data":"eyJiIjoyfQ=="}"#,
        &k,
    )
    .await;
    assert_eq!(v["result"]["offset"], 2, "b64data with a JSON payload: {v}");
    let (_, v) = post(&srv, "/api/history", r#"{"channel":"news","limit":-1}"#, &k).await;
    assert_eq!(v["result"]["publications"][1]["data"], json!({"b": 2}));
    // Idempotency and tags.
    let body = r#"{"channel":"news","data":{"once":1},"idempotency_key":"k1","tags":{"t":"v"}}"#;
    let (_, a) = post(&srv, "/api/publish", body, &k).await;
    let (_, b) = post(&srv, "/api/publish", body, &k).await;
    assert_eq!(a, b, "same key, same result");
    let (_, h) = post(&srv, "/api/history", r#"{"channel":"news","limit":-1}"#, &k).await;
    let pubs = h["result"]["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 3, "one publication for the repeated key");
    assert_eq!(pubs[2]["tags"], json!({"t": "v"}));
    let (_, v) = post(&srv, "/api/frobnicate", "{}", &k).await;
    assert_eq!(v["error"]["code"], 104);
    let big = format!(r#"{{"channel":"news","data":"{}"}}"#, "x".repeat(2 << 20));
    let (s, _) = post(&srv, "/api/publish", &big, &k).await;
    assert_eq!(s, 413, "body limit");
    srv.stop().await;
}

#[tokio::test]
async fn transport_error_mode_from_config() {
    let mut cfg = config_from(CFG);
    cfg.http_api.error_mode = holdfast_server::config::ErrorMode::Transport;
    let srv = TestServer::start(cfg).await;
    let (s, v) = post(
        &srv,
        "/api/history",
        r#"{"channel":"nohist:x"}"#,
        &[("X-API-Key", API_KEY)],
    )
    .await;
    assert_eq!((s, v["code"].clone()), (400, json!(108)));
    let (s, _) = post(
        &srv,
        "/api/history",
        r#"{"channel":"news","since":{"offset":1,"epoch":"zzzzzzzz"},"limit":1}"#,
        &[("X-API-Key", API_KEY)],
    )
    .await;
    assert_eq!(s, 416, "unrecoverable position");
    srv.stop().await;
}

#[tokio::test]
async fn read_methods() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (mut c, r) = srv.connected("u1").await;
    let client_id = r["connect"]["client"].clone();
    c.call("subscribe", json!({"channel": "room"})).await;
    for n in 1..=3 {
        api(
            &srv,
            "publish",
            json!({"channel": "room", "data": {"n": n}}),
        )
        .await;
    }
    let h = api(
        &srv,
        "history",
        json!({"channel": "room", "limit": 2, "reverse": true}),
    )
    .await;
    let offs: Vec<u64> = h["result"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offs, [3, 2]);
    assert_eq!(h["result"]["offset"], 3);
    let h = api(&srv, "history", json!({"channel": "room"})).await;
    assert_eq!(
        h["result"]["publications"],
        json!([]),
        "limit 0 gives the position only"
    );
    let p = api(&srv, "presence", json!({"channel": "room"})).await;
    assert_eq!(
        p["result"]["presence"][client_id.as_str().unwrap()]["user"],
        "u1"
    );
    let p = api(&srv, "presence_stats", json!({"channel": "room"})).await;
    assert_eq!(p["result"], json!({"num_clients": 1, "num_users": 1}));
    let ch = api(&srv, "channels", json!({"pattern": "ro*"})).await;
    assert_eq!(
        ch["result"]["channels"],
        json!({"room": {"num_clients": 1}})
    );
    let ch = api(&srv, "channels", json!({})).await;
    assert!(
        ch["result"]["channels"]["#u1"].is_object(),
        "personal channel listed: {ch}"
    );
    let info = api(&srv, "info", json!({})).await;
    let n = &info["result"]["nodes"][0];
    assert_eq!(
        (
            n["num_clients"].clone(),
            n["num_users"].clone(),
            n["num_subs"].clone()
        ),
        (json!(1), json!(1), json!(2))
    );
    assert_eq!(n["uid"], srv.state.node.id());
    assert_eq!(
        api(&srv, "history_remove", json!({"channel": "room"})).await,
        json!({"result": {}})
    );
    let h = api(&srv, "history", json!({"channel": "room", "limit": -1})).await;
    assert_eq!(
        (
            h["result"]["publications"].clone(),
            h["result"]["offset"].clone()
        ),
        (json!([]), json!(3))
    );
    srv.stop().await;
}

#[tokio::test]
async fn broadcast_and_batch() {
    let srv = TestServer::start(config_from(CFG)).await;
    let b = api(
        &srv,
        "broadcast",
        json!({"channels": ["a", "nope:b", "nohist:c"], "data": {"x": 1}}),
    )
    .await;
    assert_eq!(b["result"]["responses"][0]["result"]["offset"], 1);
    assert_eq!(b["result"]["responses"][1]["error"]["code"], 102);
    assert_eq!(b["result"]["responses"][2], json!({"result": {}}));
    for parallel in [false, true] {
        let r = api(
            &srv,
            "batch",
            json!({"parallel": parallel, "commands": [
                {"publish": {"channel": "b1", "data": {"n": 1}}},
                {"publish": {"channel": "nope:x", "data": {}}},
                {"presence_stats": {"channel": "b1"}},
                {"bogus": {}},
            ]}),
        )
        .await;
        let replies = r["result"]["replies"].as_array().unwrap();
        assert!(replies[0]["publish"]["offset"].is_u64(), "{r}");
        assert_eq!(replies[1]["error"]["code"], 102);
        assert_eq!(
            replies[2]["presence_stats"],
            json!({"num_clients": 0, "num_users": 0})
        );
        assert_eq!(replies[3]["error"]["code"], 104);
    }
    srv.stop().await;
}

#[tokio::test]
async fn subscribe_unsubscribe_disconnect_refresh_live_connections() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (mut a, _) = srv.connected("u").await;
    let (mut b, rb) = srv.connected("u").await;
    let b_id = rb["connect"]["client"].as_str().unwrap().to_owned();
    api(
        &srv,
        "publish",
        json!({"channel": "news", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(
        api(
            &srv,
            "subscribe",
            json!({"user": "u", "channel": "news", "data": {"why": "api"}})
        )
        .await,
        json!({"result": {}})
    );
    for c in [&mut a, &mut b] {
        let p = c.push().await;
        assert_eq!(p["channel"], "news");
        assert_eq!(p["subscribe"]["recoverable"], true, "{p}");
        assert_eq!(p["subscribe"]["offset"], 1);
        assert_eq!(p["subscribe"]["data"], json!({"why": "api"}));
    }
    api(
        &srv,
        "publish",
        json!({"channel": "news", "data": {"n": 2}}),
    )
    .await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.push().await["pub"]["offset"], 2);
    }
    api(
        &srv,
        "unsubscribe",
        json!({"user": "u", "channel": "news", "client": b_id}),
    )
    .await;
    assert_eq!(
        b.push().await,
        json!({"channel": "news", "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}})
    );
    api(
        &srv,
        "publish",
        json!({"channel": "news", "data": {"n": 3}}),
    )
    .await;
    assert_eq!(
        a.push().await["pub"]["offset"],
        3,
        "only b was unsubscribed"
    );
    api(
        &srv,
        "disconnect",
        json!({"user": "u", "whitelist": [b_id]}),
    )
    .await;
    assert_eq!(
        a.closed().await,
        Closed::Code(3503, "force disconnect".into())
    );
    api(
        &srv,
        "disconnect",
        json!({"user": "u", "disconnect": {"code": 4001, "reason": "bye"}}),
    )
    .await;
    assert_eq!(b.closed().await, Closed::Code(4001, "bye".into()));
    let (mut c, _) = srv.connected("v").await;
    api(&srv, "refresh", json!({"user": "v", "expired": true})).await;
    assert_eq!(
        c.closed().await,
        Closed::Code(3005, "connection expired".into())
    );
    let r = api(
        &srv,
        "disconnect",
        json!({"user": "v", "disconnect": {"code": 1000, "reason": "x"}}),
    )
    .await;
    assert_eq!(r["error"]["code"], 107, "disconnect codes are 3000..4999");
    srv.stop().await;
}

#[tokio::test]
async fn positionless_connect_starts_at_the_top_without_delivery_cursor() {
    // A Centrifugo configuration (no delivery_cursor): a server-side subscription of a client
    // that presents no position starts at the current top, as on Centrifugo.
    let srv = TestServer::start(config_from(&CFG.replace("delivery_cursor = true\n", ""))).await;
    for n in 1..=3 {
        api(
            &srv,
            "publish",
            json!({"channel": "#42", "data": {"msg": n}}),
        )
        .await;
    }
    let (mut c, r) = srv.connected("42").await;
    let sub = &r["connect"]["subs"]["#42"];
    assert_eq!(sub["offset"], 3, "{r}");
    assert!(
        sub.get("recovered").is_none() && sub.get("was_recovering").is_none(),
        "{r}"
    );
    assert!(
        sub.get("publications").is_none(),
        "no old publication on connect: {r}"
    );
    api(
        &srv,
        "publish",
        json!({"channel": "#42", "data": {"msg": 4}}),
    )
    .await;
    let p = c.push().await;
    assert_eq!(
        p["pub"]["data"]["msg"], 4,
        "the first publication is the next one: {p}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn send_to_user_before_the_user_connects() {
    let srv = TestServer::start(config_from(CFG)).await;
    for n in 1..=3 {
        let r = api(
            &srv,
            "publish",
            json!({"channel": "#42", "data": {"msg": n}}),
        )
        .await;
        assert_eq!(
            r["result"]["offset"], n,
            "publishing to a user with no connection succeeds"
        );
    }
    let (mut c, r) = srv.connected("42").await;
    let sub = &r["connect"]["subs"]["#42"];
    assert_eq!(sub["recovered"], true, "{r}");
    let data: Vec<Value> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["msg"].clone())
        .collect();
    assert_eq!(
        data,
        [json!(1), json!(2), json!(3)],
        "delivered on connect, in order"
    );
    // Reconnecting with the position it reached: nothing twice.
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    drop(c);
    api(
        &srv,
        "publish",
        json!({"channel": "#42", "data": {"msg": 4}}),
    )
    .await;
    c = srv.client().await;
    let r = c
        .call("connect", json!({"token": token("42", None, json!({})), "subs": {"#42": {"recover": true, "offset": 3, "epoch": epoch}}}))
        .await;
    let sub = &r["connect"]["subs"]["#42"];
    assert_eq!(sub["recovered"], true);
    assert_eq!(sub["publications"].as_array().unwrap().len(), 1);
    assert_eq!(sub["publications"][0]["data"]["msg"], 4);
    srv.stop().await;
}

#[tokio::test]
async fn health_ready_and_drain() {
    let srv = TestServer::start(config_from(CFG)).await;
    let (_c, _) = srv.connected("h").await;
    let h: Value = reqwest::get(srv.http("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["connections"], 1);
    assert_eq!(h["users"], 1);
    assert_eq!(h["subscriptions"], 1, "the personal channel");
    assert_eq!(h["node"], srv.state.node.id());
    for k in [
        "uptime_seconds",
        "channels",
        "connections_total",
        "messages_received",
        "messages_sent",
        "errors",
        "slow_disconnects",
        "version",
    ] {
        assert!(h.get(k).is_some(), "health has {k}");
    }
    assert_eq!(
        reqwest::get(srv.http("/ready")).await.unwrap().status(),
        200
    );
    // Drain the node while the listener still runs: not ready, no new upgrades.
    let node = srv.state.node.clone();
    let drain = tokio::spawn(async move { node.shutdown(std::time::Duration::from_secs(5)).await });
    eventually("draining", || srv.state.node.is_draining()).await;
    let r = reqwest::get(srv.http("/ready")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "draining");
    match tokio_tungstenite::connect_async(srv.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("no upgrade while draining, got {other:?}"),
    }
    drain.await.unwrap();
    srv.stop().await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_after_traffic() {
    let srv = TestServer::start(config_from(CFG)).await;
    let get = || async {
        reqwest::get(srv.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = get().await;
    let (mut c, _) = srv.connected("m").await;
    c.call("subscribe", json!({"channel": "mx"})).await;
    api(&srv, "publish", json!({"channel": "mx", "data": {}})).await;
    c.push().await;
    c.call("subscribe", json!({"channel": "nope:x"})).await;
    let after = get().await;
    for name in [
        "holdfast_connections_accepted_total",
        "holdfast_publications_total",
        "holdfast_api_requests_total",
        "holdfast_transport_messages_sent_total",
        "holdfast_transport_messages_received_total",
        "holdfast_command_duration_seconds_count",
        "holdfast_connect_duration_seconds_count",
        "holdfast_reply_errors_total",
    ] {
        assert!(
            metric(&after, name) > metric(&before, name),
            "{name} moved:\n{after}"
        );
    }
    assert!(
        after.contains("holdfast_command_duration_seconds_bucket"),
        "histograms have buckets"
    );
    assert!(after.contains("holdfast_node_clients"));
    srv.stop().await;
}

#[tokio::test]
async fn internal_port_keeps_api_and_metrics_off_the_public_listener() {
    let mut cfg = config_from(CFG);
    cfg.http_server.internal_port = 1; // any non-zero: the listener is passed in below
    let state = holdfast_server::server::build(cfg).await.unwrap();
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pa, ia) = (public.local_addr().unwrap(), internal.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(holdfast_server::server::run(
        state.clone(),
        public,
        Some(internal),
        async {
            let _ = rx.await;
        },
    ));
    eventually("ready", || state.node.is_ready()).await;
    let client = reqwest::Client::new();
    let publish = |addr: std::net::SocketAddr| {
        client
            .post(format!("http://{addr}/api/publish"))
            .header("X-API-Key", API_KEY)
            .body(r#"{"channel":"news","data":{}}"#)
            .send()
    };
    assert_eq!(
        publish(pa).await.unwrap().status(),
        404,
        "no API on the public port"
    );
    assert_eq!(
        publish(ia).await.unwrap().status(),
        200,
        "API on the internal port"
    );
    for path in ["/metrics", "/health", "/ready"] {
        assert_eq!(
            reqwest::get(format!("http://{ia}{path}"))
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
        assert_eq!(
            reqwest::get(format!("http://{pa}{path}"))
                .await
                .unwrap()
                .status(),
            404,
            "{path}"
        );
    }
    let mut c = TestClient::connect(&format!("ws://{pa}/connection/websocket")).await;
    assert!(
        c.connect_token(&token("u", None, json!({}))).await["connect"].is_object(),
        "WebSocket stays public"
    );
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}
