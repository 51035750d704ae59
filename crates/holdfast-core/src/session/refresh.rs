//! Credentials over time: client `refresh` / `sub_refresh`, server-side refresh of the
//! connection and of subscriptions, and unsubscribing subscriptions whose token expired.

use super::*;

impl Session {
    pub(super) async fn refresh(&mut self, id: u32, token: &str) -> Result<(), Disconnect> {
        if token.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let ctx = self.conn()?.ctx.clone();
        let decision = match self.node.hooks().refresh.on_refresh(&ctx, token).await {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let mut result = RefreshResult::default();
        if let Some(exp) = decision.expire_at {
            let ttl = exp - unix_secs();
            if ttl <= 0 {
                return Err(Disconnect::EXPIRED);
            }
            result.expires = true;
            result.ttl = ttl.min(i64::from(u32::MAX)) as u32;
        }
        if let Some(info) = decision.info {
            self.conn_mut()?.set_conn_info(info);
        }
        self.set_expiry(decision.expire_at);
        self.reply(id, ReplyBody::Refresh(result));
        Ok(())
    }

    pub(super) async fn sub_refresh(
        &mut self,
        id: u32,
        channel: &str,
        token: &str,
    ) -> Result<(), Disconnect> {
        if channel.is_empty() || token.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        if !self.conn()?.subs.contains_key(channel) {
            self.reply_error(id, ErrorReply::PERMISSION_DENIED);
            return Ok(());
        }
        let ctx = self.conn()?.ctx.clone();
        let decision = match self
            .node
            .hooks()
            .channels
            .on_sub_refresh(&ctx, channel, token)
            .await
        {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let mut result = RefreshResult::default();
        if let Some(exp) = decision.expire_at {
            let ttl = exp - unix_secs();
            if ttl <= 0 {
                self.reply_error(id, ErrorReply::TOKEN_EXPIRED);
                return Ok(());
            }
            result.expires = true;
            result.ttl = ttl.min(i64::from(u32::MAX)) as u32;
        }
        if let Some(s) = self.conn_mut()?.subs.get_mut(channel) {
            s.expire_at = decision.expire_at.map(at_unix);
        }
        self.reply(id, ReplyBody::SubRefresh(result));
        Ok(())
    }

    /// Timed work: server-side refreshes of the connection and of subscriptions, and
    /// unsubscribing subscriptions whose token expired without a `sub_refresh` (push 2501).
    pub async fn on_timer(&mut self) {
        self.refresh_connection().await;
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let grace = self.node.config().client.expired_sub_close_delay;
        let now = tokio::time::Instant::now();
        let due: Vec<(Arc<str>, bool)> = conn
            .subs
            .iter()
            .filter(|(_, s)| {
                s.expire_at.is_some_and(|e| {
                    e + if s.server_refresh {
                        Duration::ZERO
                    } else {
                        grace
                    } <= now
                })
            })
            .map(|(ch, s)| (ch.clone(), s.server_refresh))
            .collect();
        let ctx = conn.ctx.clone();
        let mut expired = Vec::new();
        for (ch, server) in due {
            if !server {
                expired.push(ch);
                continue;
            }
            match self
                .node
                .hooks()
                .channels
                .on_server_sub_refresh(&ctx, &ch)
                .await
            {
                Ok(r) if r.expired => expired.push(ch),
                Ok(r) => {
                    if let Ok(conn) = self.conn_mut()
                        && let Some(s) = conn.subs.get_mut(&ch)
                    {
                        s.expire_at = r.expire_at.map(at_unix);
                    }
                }
                Err(e) => {
                    tracing::warn!(client = %self.client.id(), channel = %ch, error = ?e, "subscription refresh failed; retrying in 10s");
                    if let Ok(conn) = self.conn_mut()
                        && let Some(s) = conn.subs.get_mut(&ch)
                    {
                        s.expire_at = Some(tokio::time::Instant::now() + Duration::from_secs(10));
                    }
                }
            }
        }
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let user = conn.ctx.user.clone();
        for ch in expired {
            if let Some(s) = conn.subs.remove(&ch) {
                detach(&self.node, &self.client, s).await;
                emit_unsubscribed(&self.node, &self.client, &user, &ch);
                let (code, reason) = unsubscribe::EXPIRED;
                self.client.send(push_bytes(
                    self.client.encoding(),
                    &Push::Unsubscribe {
                        channel: &ch,
                        code,
                        reason,
                    },
                ));
            }
        }
    }

    /// Refreshes the connection's credentials on the server side when due.
    pub(super) async fn refresh_connection(&mut self) {
        let Ok(conn) = self.conn() else { return };
        if conn
            .refresh_at
            .is_none_or(|at| at > tokio::time::Instant::now())
        {
            return;
        }
        let ctx = conn.ctx.clone();
        let res = self.node.hooks().refresh.on_server_refresh(&ctx).await;
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        match res {
            Ok(r) if r.expired => {
                conn.refresh_at = None;
                tracing::info!(client = %self.client.id(), user = %ctx.user, "connection refresh: expired");
                self.client.close(Disconnect::EXPIRED);
            }
            Ok(r) => {
                conn.refresh_at = r.expire_at.map(at_unix);
                if let Some(info) = r.info {
                    conn.set_conn_info(info);
                }
            }
            Err(e) => {
                tracing::warn!(client = %self.client.id(), error = ?e, "connection refresh failed; retrying in 10s");
                conn.refresh_at = Some(tokio::time::Instant::now() + Duration::from_secs(10));
            }
        }
    }
}
