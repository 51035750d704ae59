//! Token verification with RSA, ECDSA and JWKS keys (HMAC is covered everywhere else).

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use holdfast_core::handler::{TokenError, TokenVerifier};
use holdfast_server::config::TokenConfig;
use holdfast_server::jwt::JwtVerifier;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const RSA_PRIVATE: &str = include_str!("keys/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("keys/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("keys/ec_private.pem");
const EC_PUBLIC: &str = include_str!("keys/ec_public.pem");

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap()
}

#[tokio::test]
async fn rsa_and_ecdsa_keys() {
    let cfg = TokenConfig {
        rsa_public_key: RSA_PUBLIC.into(),
        ecdsa_public_key: EC_PUBLIC.into(),
        ..Default::default()
    };
    let v = JwtVerifier::new(&cfg, None).unwrap().unwrap();
    for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
        let t = sign(alg, &rsa_key(), None, json!({"sub": "r"}));
        assert_eq!(v.verify_connect(&t).await.unwrap().user, "r", "{alg:?}");
    }
    let ec = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let t = sign(Algorithm::ES256, &ec, None, json!({"sub": "e"}));
    assert_eq!(v.verify_connect(&t).await.unwrap().user, "e");
    // HS/RS key confusion: an HS256 token "signed" with the RSA public key text is refused.
    let forged = holdfast_server::jwt::sign_hs256(RSA_PUBLIC, &json!({"sub": "attacker"})).unwrap();
    assert!(matches!(
        v.verify_connect(&forged).await,
        Err(TokenError::Invalid(_))
    ));
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let cfg = TokenConfig {
        hmac_secret_key: SECRET.into(),
        audience: "holdfast".into(),
        issuer: "auth.example".into(),
        ..Default::default()
    };
    let v = JwtVerifier::new(&cfg, None).unwrap().unwrap();
    let ok = token("u", None, json!({"aud": "holdfast", "iss": "auth.example"}));
    assert!(v.verify_connect(&ok).await.is_ok());
    for bad in [
        json!({"aud": "other", "iss": "auth.example"}),
        json!({"aud": "holdfast", "iss": "evil"}),
        json!({}),
    ] {
        let t = token("u", None, bad.clone());
        assert!(
            matches!(v.verify_connect(&t).await, Err(TokenError::Invalid(_))),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn jwks_keys_by_kid_cached_when_the_endpoint_fails() {
    let mut jwk = Jwk::from_encoding_key(&rsa_key(), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let set = Arc::new(JwkSet { keys: vec![jwk] });
    let down = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let app = {
        let (set, down, hits) = (set.clone(), down.clone(), hits.clone());
        axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (set, down, hits) = (set.clone(), down.clone(), hits.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                    } else {
                        Ok(axum::Json((*set).clone()))
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = TokenConfig {
        jwks_public_endpoint: format!("http://{addr}/jwks"),
        ..Default::default()
    };
    let v = JwtVerifier::new(&cfg, None).unwrap().unwrap();
    let t = sign(
        Algorithm::RS256,
        &rsa_key(),
        Some("k1"),
        json!({"sub": "j"}),
    );
    assert_eq!(v.verify_connect(&t).await.unwrap().user, "j");
    assert_eq!(v.verify_connect(&t).await.unwrap().user, "j");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "keys are cached");
    let unknown = sign(
        Algorithm::RS256,
        &rsa_key(),
        Some("k2"),
        json!({"sub": "j"}),
    );
    assert!(matches!(
        v.verify_connect(&unknown).await,
        Err(TokenError::Invalid(_))
    ));
    down.store(true, Ordering::SeqCst);
    assert_eq!(
        v.verify_connect(&t).await.unwrap().user,
        "j",
        "cached keys keep working"
    );
}

#[tokio::test]
async fn server_accepts_rsa_tokens_end_to_end() {
    let mut cfg = base_config();
    cfg.client.token.rsa_public_key = RSA_PUBLIC.into();
    let srv = TestServer::start(cfg).await;
    let t = sign(
        Algorithm::RS256,
        &rsa_key(),
        None,
        json!({"sub": "rsa-user"}),
    );
    let (_c, r) = srv.connected_with(&t).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn hmac_key_rotation_for_connection_and_subscription_tokens() {
    use holdfast_server::config::SubscriptionTokenConfig;
    let now = holdfast_core::time::unix_secs();
    let conn = TokenConfig {
        hmac_secret_key: "new-secret".into(),
        hmac_previous_secret_key: "old-secret".into(),
        hmac_previous_secret_key_valid_until: now + 3600,
        ..Default::default()
    };
    let subs = SubscriptionTokenConfig {
        enabled: true,
        hmac_secret_key: "sub-new".into(),
        hmac_previous_secret_key: "sub-old".into(),
        hmac_previous_secret_key_valid_until: now + 3600,
        ..Default::default()
    };
    let v = JwtVerifier::new(&conn, Some(&subs.as_token_config()))
        .unwrap()
        .unwrap();
    let hs = |secret: &str, claims: serde_json::Value| {
        holdfast_server::jwt::sign_hs256(secret, &claims).unwrap()
    };
    // Both keys are valid at once while the previous one is still in its window.
    for secret in ["new-secret", "old-secret"] {
        let t = hs(secret, json!({"sub": "u"}));
        assert_eq!(v.verify_connect(&t).await.unwrap().user, "u", "{secret}");
    }
    for secret in ["sub-new", "sub-old"] {
        let t = hs(secret, json!({"sub": "u", "channel": "c"}));
        assert_eq!(
            v.verify_subscribe(&t).await.unwrap().channel,
            "c",
            "{secret}"
        );
    }
    let t = hs("other", json!({"sub": "u"}));
    assert!(matches!(
        v.verify_connect(&t).await,
        Err(TokenError::Invalid(_))
    ));
    // Past `hmac_previous_secret_key_valid_until` the previous key is refused.
    let expired = JwtVerifier::new(
        &TokenConfig {
            hmac_previous_secret_key_valid_until: now - 1,
            ..conn.clone()
        },
        Some(
            &SubscriptionTokenConfig {
                hmac_previous_secret_key_valid_until: now - 1,
                ..subs.clone()
            }
            .as_token_config(),
        ),
    )
    .unwrap()
    .unwrap();
    let t = hs("old-secret", json!({"sub": "u"}));
    assert!(matches!(
        expired.verify_connect(&t).await,
        Err(TokenError::Invalid(_))
    ));
    let t = hs("sub-old", json!({"sub": "u", "channel": "c"}));
    assert!(matches!(
        expired.verify_subscribe(&t).await,
        Err(TokenError::Invalid(_))
    ));
    let t = hs("new-secret", json!({"sub": "u"}));
    assert!(expired.verify_connect(&t).await.is_ok());
}
