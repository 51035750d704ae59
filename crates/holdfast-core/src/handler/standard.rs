//! The standard hooks: tokens (through a [`TokenVerifier`]) and namespace permissions, in the
//! order of the protocol reference §7.2.

use super::*;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Bad signature, format or claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
}

/// Claims of a connection token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectClaims {
    /// `sub`
    pub user: String,
    /// `exp` (unix seconds)
    pub exp: Option<i64>,
    /// `expire_at`: connection expiry apart from `exp` (`Some(0)` = never).
    pub expire_at: Option<i64>,
    /// `info`
    pub info: Option<Bytes>,
    /// `channels` and `subs`: server-side subscriptions.
    pub subs: BTreeMap<String, ServerSubOptions>,
    /// `meta`
    pub meta: Option<Bytes>,
}

/// Claims of a subscription token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeClaims {
    /// `sub`: must be the connection's user.
    pub user: String,
    /// `channel`: must be the subscribed channel.
    pub channel: String,
    /// `client`: when set, must be the connection's id.
    pub client: Option<String>,
    /// `exp`
    pub exp: Option<i64>,
    /// `expire_at` (`Some(0)` = never).
    pub expire_at: Option<i64>,
    /// `info`
    pub info: Option<Bytes>,
    /// `data`
    pub data: Option<Bytes>,
    /// `override`
    pub overrides: ChannelOverride,
    /// `tf` (Holdfast extension): a tag filter applied to this subscriber, and-ed with the
    /// client's own.
    pub filter: Option<holdfast_protocol::FilterNode>,
}

impl SubscribeClaims {
    /// Expiry of the subscription: `expire_at` if present (0 = never), else `exp`.
    pub fn expiry(&self) -> Option<i64> {
        expiry(self.exp, self.expire_at)
    }
}

impl ConnectClaims {
    /// Expiry of the connection: `expire_at` if present (0 = never), else `exp`.
    pub fn expiry(&self) -> Option<i64> {
        expiry(self.exp, self.expire_at)
    }
}

fn expiry(exp: Option<i64>, expire_at: Option<i64>) -> Option<i64> {
    match expire_at {
        Some(0) => None,
        Some(t) => Some(t),
        None => exp.filter(|&e| e > 0),
    }
}

/// Verifies connection and subscription tokens.
#[async_trait]
pub trait TokenVerifier: Send + Sync + std::fmt::Debug {
    /// Verifies a connection token.
    async fn verify_connect(&self, token: &str) -> Result<ConnectClaims, TokenError>;
    /// Verifies a subscription token.
    async fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError>;
}

/// Tokens plus namespace permissions, in the order of the protocol reference §7.2.
#[derive(Debug, Clone)]
pub struct StandardHandler {
    verifier: Option<Arc<dyn TokenVerifier>>,
    insecure: bool,
    allow_anonymous_connect_without_token: bool,
    disallow_anonymous_connection_tokens: bool,
}

impl StandardHandler {
    /// Builds the handler from client configuration and a token verifier (None = tokens are
    /// refused as invalid).
    pub fn new(cfg: &ClientConfig, verifier: Option<Arc<dyn TokenVerifier>>) -> Self {
        Self {
            verifier,
            insecure: cfg.insecure,
            allow_anonymous_connect_without_token: cfg.allow_anonymous_connect_without_token,
            disallow_anonymous_connection_tokens: cfg.disallow_anonymous_connection_tokens,
        }
    }

    fn verifier(&self) -> Result<&Arc<dyn TokenVerifier>, TokenError> {
        self.verifier
            .as_ref()
            .ok_or_else(|| TokenError::Invalid("no token keys configured".into()))
    }

    fn permitted(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
        for_client: bool,
        for_subscriber: bool,
        for_anonymous: bool,
    ) -> bool {
        if self.insecure {
            return true;
        }
        let anon_ok = !client.user.is_empty() || for_anonymous;
        (for_client || (for_subscriber && ev.subscribed)) && anon_ok
    }
}

#[async_trait]
impl ConnectHook for StandardHandler {
    async fn on_connecting(&self, ev: &ConnectEvent) -> Result<ConnectDecision, HandlerError> {
        if ev.token.is_empty() {
            if self.insecure || self.allow_anonymous_connect_without_token {
                return Ok(ConnectDecision::default());
            }
            return Err(Disconnect::BAD_REQUEST.into());
        }
        let claims = match self.verifier()?.verify_connect(&ev.token).await {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(ErrorReply::TOKEN_EXPIRED.into()),
            Err(TokenError::Invalid(why)) => {
                tracing::info!(client = %ev.client, %why, "invalid connection token");
                return Err(Disconnect::INVALID_TOKEN.into());
            }
        };
        if claims.user.is_empty() && self.disallow_anonymous_connection_tokens {
            return Err(Disconnect::PERMISSION_DENIED.into());
        }
        let expire_at = if self.insecure { None } else { claims.expiry() };
        Ok(ConnectDecision {
            user: claims.user,
            info: claims.info,
            expire_at,
            subs: claims.subs,
            data: None,
            meta: claims.meta,
        })
    }
}

#[async_trait]
impl ChannelPolicy for StandardHandler {
    async fn on_subscribe(
        &self,
        client: &ClientContext,
        ev: &SubscribeEvent<'_>,
    ) -> Result<SubscribeDecision, HandlerError> {
        if !ev.token.is_empty() {
            let claims = match self.verifier()?.verify_subscribe(ev.token).await {
                Ok(c) => c,
                Err(TokenError::Expired) => return Err(ErrorReply::TOKEN_EXPIRED.into()),
                Err(TokenError::Invalid(why)) => {
                    tracing::info!(client = %client.client, channel = ev.channel, %why, "invalid subscription token");
                    return Err(ErrorReply::PERMISSION_DENIED.into());
                }
            };
            if claims.user != *client.user
                || claims.channel != ev.channel
                || claims
                    .client
                    .as_deref()
                    .is_some_and(|c| c != &*client.client)
            {
                tracing::info!(client = %client.client, channel = ev.channel, "subscription token for another user, channel or client");
                return Err(Disconnect::INVALID_TOKEN.into());
            }
            return Ok(SubscribeDecision {
                expire_at: claims.expiry(),
                info: claims.info,
                data: claims.data,
                overrides: claims.overrides,
                filter: claims.filter,
            });
        }
        if ev.private {
            return Err(ErrorReply::PERMISSION_DENIED.into());
        }
        if ev.options.allow_user_limited_channels
            && let Some(allowed) = user_limited_allows(ev.channel, &client.user)
        {
            return if allowed {
                Ok(SubscribeDecision::default())
            } else {
                Err(ErrorReply::PERMISSION_DENIED.into())
            };
        }
        let o = ev.options;
        let anon_ok = !client.user.is_empty() || o.allow_subscribe_for_anonymous;
        if (o.allow_subscribe_for_client && anon_ok) || self.insecure {
            return Ok(SubscribeDecision::default());
        }
        Err(ErrorReply::PERMISSION_DENIED.into())
    }

    async fn on_publish(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
        _data: &Bytes,
    ) -> Result<PublishDecision, HandlerError> {
        let o = ev.options;
        if self.permitted(
            client,
            ev,
            o.allow_publish_for_client,
            o.allow_publish_for_subscriber,
            o.allow_publish_for_anonymous,
        ) {
            Ok(PublishDecision::default())
        } else {
            Err(ErrorReply::PERMISSION_DENIED.into())
        }
    }

    async fn on_presence(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
    ) -> Result<(), HandlerError> {
        let o = ev.options;
        if self.permitted(
            client,
            ev,
            o.allow_presence_for_client,
            o.allow_presence_for_subscriber,
            o.allow_presence_for_anonymous,
        ) {
            Ok(())
        } else {
            Err(ErrorReply::PERMISSION_DENIED.into())
        }
    }

    async fn on_history(
        &self,
        client: &ClientContext,
        ev: &ChannelEvent<'_>,
    ) -> Result<(), HandlerError> {
        let o = ev.options;
        if self.permitted(
            client,
            ev,
            o.allow_history_for_client,
            o.allow_history_for_subscriber,
            o.allow_history_for_anonymous,
        ) {
            Ok(())
        } else {
            Err(ErrorReply::PERMISSION_DENIED.into())
        }
    }

    async fn on_sub_refresh(
        &self,
        client: &ClientContext,
        channel: &str,
        token: &str,
    ) -> Result<RefreshDecision, HandlerError> {
        let claims = match self.verifier()?.verify_subscribe(token).await {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(ErrorReply::TOKEN_EXPIRED.into()),
            Err(TokenError::Invalid(_)) => return Err(Disconnect::INVALID_TOKEN.into()),
        };
        if claims.user != *client.user
            || claims.channel != channel
            || claims
                .client
                .as_deref()
                .is_some_and(|c| c != &*client.client)
        {
            return Err(Disconnect::INVALID_TOKEN.into());
        }
        Ok(RefreshDecision {
            expire_at: claims.expiry(),
            info: claims.info,
        })
    }
}

#[async_trait]
impl RefreshHook for StandardHandler {
    async fn on_refresh(
        &self,
        client: &ClientContext,
        token: &str,
    ) -> Result<RefreshDecision, HandlerError> {
        let claims = match self.verifier()?.verify_connect(token).await {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(Disconnect::EXPIRED.into()),
            Err(TokenError::Invalid(_)) => return Err(Disconnect::INVALID_TOKEN.into()),
        };
        if claims.user != *client.user {
            return Err(Disconnect::INVALID_TOKEN.into());
        }
        Ok(RefreshDecision {
            expire_at: if self.insecure { None } else { claims.expiry() },
            info: claims.info,
        })
    }
}

impl From<TokenError> for HandlerError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => HandlerError::Reply(ErrorReply::TOKEN_EXPIRED),
            TokenError::Invalid(_) => HandlerError::Disconnect(Disconnect::INVALID_TOKEN),
        }
    }
}
