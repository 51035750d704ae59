//! JWT verification of connection and subscription tokens (HS256/384/512, RS256/384/512,
//! ES256/384, and keys from a JWKS endpoint looked up by `kid`).

use crate::config::TokenConfig;
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use holdfast_core::handler::{
    ChannelOverride, ConnectClaims, ServerSubOptions, SubscribeClaims, TokenError, TokenVerifier,
};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens longer than this are refused before any parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// JWKS are re-fetched at most this often when an unknown `kid` shows up.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(5);
/// JWKS are re-fetched in the background after this long.
const JWKS_TTL: Duration = Duration::from_secs(300);

/// Keys for one kind of token.
#[derive(Debug)]
struct KeySet {
    hmac: Vec<(DecodingKey, Option<i64>)>,
    rsa: Option<DecodingKey>,
    ecdsa: Option<DecodingKey>,
    jwks: Option<Arc<JwksCache>>,
    audience: String,
    issuer: String,
    user_claim: String,
}

/// A cached JWKS document.
#[derive(Debug)]
struct JwksCache {
    url: String,
    http: reqwest::Client,
    state: Mutex<JwksState>,
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct JwksState {
    keys: Option<Arc<JwkSet>>,
    fetched: Option<Instant>,
}

impl JwksCache {
    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        let (cached, fresh_enough) = {
            let st = self.state.lock();
            (
                st.keys.clone(),
                st.fetched.is_some_and(|t| t.elapsed() < JWKS_TTL),
            )
        };
        if let Some(set) = &cached
            && fresh_enough
            && let Some(k) = set.find(kid)
        {
            return DecodingKey::from_jwk(k).map_err(|e| TokenError::Invalid(e.to_string()));
        }
        let set = self.refetch(cached).await?;
        let k = set
            .find(kid)
            .ok_or_else(|| TokenError::Invalid(format!("unknown kid {kid:?}")))?;
        DecodingKey::from_jwk(k).map_err(|e| TokenError::Invalid(e.to_string()))
    }

    async fn refetch(&self, cached: Option<Arc<JwkSet>>) -> Result<Arc<JwkSet>, TokenError> {
        let _g = self.refresh.lock().await;
        {
            let st = self.state.lock();
            if let (Some(k), Some(t)) = (&st.keys, st.fetched)
                && t.elapsed() < JWKS_MIN_REFRESH
            {
                return Ok(k.clone());
            }
        }
        let fetched = async {
            let resp = self.http.get(&self.url).send().await?.error_for_status()?;
            resp.json::<JwkSet>().await
        };
        let fetched = match tokio::time::timeout(Duration::from_secs(2), fetched).await {
            Ok(Ok(set)) => Ok(set),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timeout".to_string()),
        };
        match fetched {
            Ok(set) => {
                let set = Arc::new(set);
                let mut st = self.state.lock();
                st.keys = Some(set.clone());
                st.fetched = Some(Instant::now());
                Ok(set)
            }
            Err(e) => {
                metrics::counter!("holdfast_jwks_fetch_errors_total").increment(1);
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; using cached keys");
                // Mark the attempt so a dead endpoint is not hammered on every token.
                self.state.lock().fetched = Some(Instant::now());
                cached.ok_or_else(|| TokenError::Invalid(format!("JWKS unavailable: {e}")))
            }
        }
    }
}

impl KeySet {
    fn new(cfg: &TokenConfig) -> anyhow::Result<Self> {
        let mut hmac = Vec::new();
        if !cfg.hmac_secret_key.is_empty() {
            hmac.push((
                DecodingKey::from_secret(cfg.hmac_secret_key.as_bytes()),
                None,
            ));
        }
        if !cfg.hmac_previous_secret_key.is_empty() {
            let until = (cfg.hmac_previous_secret_key_valid_until > 0)
                .then_some(cfg.hmac_previous_secret_key_valid_until);
            hmac.push((
                DecodingKey::from_secret(cfg.hmac_previous_secret_key.as_bytes()),
                until,
            ));
        }
        let rsa = (!cfg.rsa_public_key.is_empty())
            .then(|| DecodingKey::from_rsa_pem(cfg.rsa_public_key.as_bytes()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("client.token.rsa_public_key: {e}"))?;
        let ecdsa = (!cfg.ecdsa_public_key.is_empty())
            .then(|| DecodingKey::from_ec_pem(cfg.ecdsa_public_key.as_bytes()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("client.token.ecdsa_public_key: {e}"))?;
        let jwks = (!cfg.jwks_public_endpoint.is_empty()).then(|| {
            Arc::new(JwksCache {
                url: cfg.jwks_public_endpoint.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(1))
                    .build()
                    .unwrap_or_default(),
                state: Mutex::new(JwksState::default()),
                refresh: tokio::sync::Mutex::new(()),
            })
        });
        Ok(Self {
            hmac,
            rsa,
            ecdsa,
            jwks,
            audience: cfg.audience.clone(),
            issuer: cfg.issuer.clone(),
            user_claim: if cfg.user_id_claim.is_empty() {
                "sub".into()
            } else {
                cfg.user_id_claim.clone()
            },
        })
    }

    fn is_empty(&self) -> bool {
        self.hmac.is_empty() && self.rsa.is_none() && self.ecdsa.is_none() && self.jwks.is_none()
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = 0;
        v.required_spec_claims.clear();
        v.validate_nbf = true;
        v.validate_exp = true;
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&[&self.audience]);
            v.required_spec_claims.insert("aud".into());
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&[&self.issuer]);
            v.required_spec_claims.insert("iss".into());
        }
        v
    }

    /// Verifies the signature and standard claims; returns the claims object.
    async fn verify(&self, token: &str) -> Result<Map<String, Value>, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid("token too long".into()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("header: {e}")))?;
        let alg = header.alg;
        let keys: Vec<DecodingKey> = if let Some(jwks) = &self.jwks {
            let kid = header.kid.as_deref().unwrap_or("");
            vec![jwks.key(kid).await?]
        } else {
            match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    let now = holdfast_core::time::unix_secs();
                    self.hmac
                        .iter()
                        .filter(|(_, until)| until.is_none_or(|u| now < u))
                        .map(|(k, _)| k.clone())
                        .collect()
                }
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                    self.rsa.iter().cloned().collect()
                }
                Algorithm::ES256 | Algorithm::ES384 => self.ecdsa.iter().cloned().collect(),
                other => {
                    return Err(TokenError::Invalid(format!(
                        "unsupported algorithm {other:?}"
                    )));
                }
            }
        };
        if keys.is_empty() {
            return Err(TokenError::Invalid(format!(
                "no key configured for {alg:?}"
            )));
        }
        let validation = self.validation(alg);
        let mut last = TokenError::Invalid("no key".into());
        for key in &keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => return Err(TokenError::Expired),
                        _ => TokenError::Invalid(e.to_string()),
                    };
                }
            }
        }
        Err(last)
    }
}

/// The standalone server's [`TokenVerifier`].
#[derive(Debug)]
pub struct JwtVerifier {
    connect: KeySet,
    subscribe: KeySet,
}

impl JwtVerifier {
    /// Builds verifiers from `client.token` and (when enabled) `client.subscription_token`.
    /// Returns `None` when no key is configured at all.
    pub fn new(
        token: &TokenConfig,
        subscription: Option<&TokenConfig>,
    ) -> anyhow::Result<Option<Self>> {
        let connect = KeySet::new(token)?;
        let subscribe = KeySet::new(subscription.unwrap_or(token))?;
        if connect.is_empty() && subscribe.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self { connect, subscribe }))
    }
}

fn raw(v: &Value) -> Option<Bytes> {
    if v.is_null() {
        return None;
    }
    serde_json::to_vec(v).ok().map(Bytes::from)
}

fn b64(v: Option<&Value>) -> Result<Option<Bytes>, TokenError> {
    match v.and_then(Value::as_str) {
        None => Ok(None),
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(|b| Some(Bytes::from(b)))
            .map_err(|_| TokenError::Invalid("bad base64 claim".into())),
    }
}

fn int(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, TokenError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| TokenError::Invalid(format!("claim {k} is not a number"))),
    }
}

fn string(m: &Map<String, Value>, k: &str) -> Result<String, TokenError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(TokenError::Invalid(format!("claim {k} is not a string"))),
    }
}

fn info(m: &Map<String, Value>, key: &str, b64key: &str) -> Result<Option<Bytes>, TokenError> {
    match m.get(key).and_then(raw) {
        Some(v) => Ok(Some(v)),
        None => b64(m.get(b64key)),
    }
}

/// Channel option overrides (`{"presence": {"value": true}, …}`) from a token or a proxy answer.
pub(crate) fn overrides(v: Option<&Value>) -> ChannelOverride {
    let get = |k: &str| {
        v.and_then(|o| o.get(k))
            .and_then(|o| o.get("value"))
            .and_then(Value::as_bool)
    };
    ChannelOverride {
        presence: get("presence"),
        join_leave: get("join_leave"),
        force_push_join_leave: get("force_push_join_leave"),
        force_recovery: get("force_recovery"),
        force_positioning: get("force_positioning"),
    }
}

#[async_trait]
impl TokenVerifier for JwtVerifier {
    async fn verify_connect(&self, token: &str) -> Result<ConnectClaims, TokenError> {
        let m = self.connect.verify(token).await?;
        if m.contains_key("channel") {
            return Err(TokenError::Invalid(
                "connection token must not carry a channel".into(),
            ));
        }
        let mut subs = BTreeMap::new();
        if let Some(chs) = m.get("channels") {
            let arr = chs
                .as_array()
                .ok_or_else(|| TokenError::Invalid("channels is not a list".into()))?;
            for ch in arr {
                let ch = ch
                    .as_str()
                    .ok_or_else(|| TokenError::Invalid("channel is not a string".into()))?;
                subs.insert(ch.to_string(), ServerSubOptions::default());
            }
        }
        if let Some(Value::Object(s)) = m.get("subs") {
            for (ch, o) in s {
                let Value::Object(o) = o else {
                    return Err(TokenError::Invalid("subs entries must be objects".into()));
                };
                subs.insert(
                    ch.clone(),
                    ServerSubOptions {
                        info: info(o, "info", "b64info")?,
                        data: info(o, "data", "b64data")?,
                        overrides: overrides(o.get("override")),
                    },
                );
            }
        }
        Ok(ConnectClaims {
            user: string(&m, &self.connect.user_claim)?,
            exp: int(&m, "exp")?,
            expire_at: int(&m, "expire_at")?,
            info: info(&m, "info", "b64info")?,
            subs,
            meta: m.get("meta").and_then(raw),
        })
    }

    async fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError> {
        let m = self.subscribe.verify(token).await?;
        let channel = string(&m, "channel")?;
        if channel.is_empty() {
            return Err(TokenError::Invalid(
                "subscription token without channel".into(),
            ));
        }
        Ok(SubscribeClaims {
            user: string(&m, &self.subscribe.user_claim)?,
            channel,
            client: m.get("client").and_then(Value::as_str).map(str::to_owned),
            exp: int(&m, "exp")?,
            expire_at: int(&m, "expire_at")?,
            info: info(&m, "info", "b64info")?,
            data: info(&m, "data", "b64data")?,
            overrides: overrides(m.get("override")),
            filter: match m.get("tf").filter(|v| !v.is_null()) {
                Some(v) => Some(
                    serde_json::from_value(v.clone())
                        .map_err(|e| TokenError::Invalid(format!("tf: {e}")))?,
                ),
                None => None,
            },
        })
    }
}

/// Signs a token with the configured HMAC secret (for `holdfast gentoken` and tests).
pub fn sign_hs256(secret: &str, claims: &Value) -> anyhow::Result<String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verifier() -> JwtVerifier {
        let cfg = TokenConfig {
            hmac_secret_key: "secret".into(),
            ..Default::default()
        };
        JwtVerifier::new(&cfg, None).expect("keys").expect("some")
    }

    #[tokio::test]
    async fn connect_claims() {
        let v = verifier();
        let now = holdfast_core::time::unix_secs();
        let t = sign_hs256(
            "secret",
            &json!({"sub":"42","exp":now+60,"info":{"name":"Alex"},"channels":["news"],
                    "subs":{"chat:a":{"info":{"x":1},"override":{"presence":{"value":true}}}},"meta":{"m":1}}),
        )
        .expect("sign");
        let c = v.verify_connect(&t).await.expect("valid");
        assert_eq!(c.user, "42");
        assert_eq!(c.expiry(), Some(now + 60));
        assert_eq!(c.info.as_deref(), Some(&b"{\"name\":\"Alex\"}"[..]));
        assert!(c.subs.contains_key("news"));
        assert_eq!(c.subs["chat:a"].overrides.presence, Some(true));
    }

    #[tokio::test]
    async fn bad_tokens() {
        let v = verifier();
        let now = holdfast_core::time::unix_secs();
        let expired = sign_hs256("secret", &json!({"sub":"1","exp":now-5})).expect("sign");
        assert_eq!(
            v.verify_connect(&expired).await.unwrap_err(),
            TokenError::Expired
        );
        let wrong = sign_hs256("other", &json!({"sub":"1"})).expect("sign");
        assert!(matches!(
            v.verify_connect(&wrong).await,
            Err(TokenError::Invalid(_))
        ));
        let not_yet = sign_hs256("secret", &json!({"sub":"1","nbf":now+100})).expect("sign");
        assert!(matches!(
            v.verify_connect(&not_yet).await,
            Err(TokenError::Invalid(_))
        ));
        let with_channel = sign_hs256("secret", &json!({"sub":"1","channel":"x"})).expect("sign");
        assert!(matches!(
            v.verify_connect(&with_channel).await,
            Err(TokenError::Invalid(_))
        ));
        // alg none
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(br#"{"alg":"none","typ":"JWT"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"1"}"#)
        );
        assert!(matches!(
            v.verify_connect(&none).await,
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            v.verify_connect("garbage").await,
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            v.verify_connect(&"a".repeat(20_000)).await,
            Err(TokenError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn subscription_claims() {
        let v = verifier();
        let t = sign_hs256(
            "secret",
            &json!({"sub":"42","channel":"$x","info":{"a":1},"data":{"b":2}}),
        )
        .expect("sign");
        let c = v.verify_subscribe(&t).await.expect("valid");
        assert_eq!((c.user.as_str(), c.channel.as_str()), ("42", "$x"));
        assert_eq!(c.data.as_deref(), Some(&b"{\"b\":2}"[..]));
        let no_channel = sign_hs256("secret", &json!({"sub":"42"})).expect("sign");
        assert!(v.verify_subscribe(&no_channel).await.is_err());
    }
}
