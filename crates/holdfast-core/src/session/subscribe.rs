//! Client `subscribe` and `unsubscribe`, and server-side subscribe (API `subscribe`).

use super::*;
use crate::filter::{Filter, Limits as FilterLimits};

impl Session {
    pub(super) async fn subscribe(
        &mut self,
        id: u32,
        req: SubscribeRequest,
    ) -> Result<(), Disconnect> {
        if req.channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        if !req.delta.is_empty() && req.delta != crate::config::FOSSIL {
            // As Centrifugo: a delta type no server knows is a broken client.
            tracing::info!(client = %self.client.id(), delta = %req.delta, "unknown delta type in subscribe");
            return Err(Disconnect::BAD_REQUEST);
        }
        let limit = self.node.config().client.channel_limit;
        let conn = self.conn()?;
        if conn.subs.contains_key(req.channel.as_str()) {
            self.reply_error(id, ErrorReply::ALREADY_SUBSCRIBED);
            return Ok(());
        }
        if conn.subs.len() >= limit {
            self.reply_error(id, ErrorReply::LIMIT_EXCEEDED);
            return Ok(());
        }
        let resolved = match self.node.rules().resolve(&req.channel) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if self.refused_foreign(id, &resolved, &req.channel) {
            return Ok(());
        }
        let ns_type = resolved.options.subscription_type;
        if req.sub_type != ns_type.wire() {
            tracing::info!(client = %self.client.id(), channel = %req.channel, asked = req.sub_type, "subscription type does not match the namespace's");
            self.reply_error(
                id,
                ErrorReply::new(
                    ErrorReply::BAD_REQUEST.code,
                    format!(
                        "bad request: subscription type {} does not match the channel's ({:?})",
                        req.sub_type, ns_type
                    ),
                ),
            );
            return Ok(());
        }
        let conn = self.conn()?;
        let ctx = conn.ctx.clone();
        let no_compaction = conn.no_compaction;
        let client_filter = match &req.tf {
            None => None,
            Some(_) if !resolved.options.allow_tags_filter => {
                self.reply_error(
                    id,
                    ErrorReply::new(
                        ErrorReply::BAD_REQUEST.code,
                        "bad request: tags filter is not allowed in this namespace",
                    ),
                );
                return Ok(());
            }
            Some(tf) => match Filter::compile(tf, &FilterLimits::default()) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::info!(client = %self.client.id(), channel = %req.channel, error = %e, "bad tags filter");
                    self.reply_error(
                        id,
                        ErrorReply::new(ErrorReply::BAD_REQUEST.code, format!("bad request: {e}")),
                    );
                    return Ok(());
                }
            },
        };
        let ev = SubscribeEvent {
            channel: &req.channel,
            token: &req.token,
            data: req.data.as_ref(),
            options: &resolved.options,
            private: resolved.private,
        };
        let decision = match self.node.hooks().channels.on_subscribe(&ctx, &ev).await {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        if decision.expire_at.is_some_and(|e| e <= unix_secs()) {
            self.reply_error(id, ErrorReply::TOKEN_EXPIRED);
            return Ok(());
        }
        let options = decision.overrides.apply(&resolved.options);
        let server_filter = match &decision.filter {
            None => None,
            Some(tf) => match Filter::compile(tf, &FilterLimits::default()) {
                Ok(f) => Some(f),
                Err(e) => {
                    // The application's own filter is broken: refuse rather than widen.
                    tracing::warn!(channel = %req.channel, error = %e, "server-side tags filter from the token or proxy is invalid");
                    self.reply_error(id, ErrorReply::INTERNAL);
                    return Ok(());
                }
            },
        };
        let filter = match (server_filter, client_filter) {
            (Some(s), Some(c)) => Some(s.and(c)),
            (s, c) => s.or(c),
        };
        if options.subscription_type.is_map() {
            if filter.is_some() {
                // State pages are not filtered: a filtered mirror would not be the map's state.
                self.reply_error(
                    id,
                    ErrorReply::new(
                        ErrorReply::BAD_REQUEST.code,
                        "bad request: tag filters are not supported on map subscriptions",
                    ),
                );
                return Ok(());
            }
            let compact = req.flag & SubscribeRequest::FLAG_CHANNEL_COMPACTION != 0
                && options.allow_channel_compaction
                && !no_compaction;
            let ask = super::map::MapAsk {
                req,
                options,
                decision,
                filter,
                compact,
            };
            return self.map_subscribe(id, ask).await;
        }
        // As Centrifugo: delta and a filter exclude each other; delta is then not negotiated.
        let delivery = DeliveryOptions {
            delta: req.delta == crate::config::FOSSIL
                && options.allows_fossil()
                && filter.is_none(),
            compact: req.flag & SubscribeRequest::FLAG_CHANNEL_COMPACTION != 0
                && options.allow_channel_compaction
                && !no_compaction,
            filter,
        };
        let history = options.history_enabled();
        let chan_ev = ChannelEvent {
            channel: &req.channel,
            options: &options,
            subscribed: true,
        };
        let wants_history_perm = history
            && ((req.recoverable && !options.force_recovery && !options.allow_recovery)
                || (req.positioned && !options.force_positioning && !options.allow_positioning));
        let history_perm = wants_history_perm
            && self
                .node
                .hooks()
                .channels
                .on_history(&ctx, &chan_ev)
                .await
                .is_ok();
        let recoverable = history
            && (options.force_recovery
                || (req.recoverable && (options.allow_recovery || history_perm)));
        let positioned = history
            && (recoverable
                || options.force_positioning
                || (req.positioned && (options.allow_positioning || history_perm)));
        let push_join_leave = options.join_leave
            && (options.force_push_join_leave
                || (req.join_leave
                    && self
                        .node
                        .hooks()
                        .channels
                        .on_presence(&ctx, &chan_ev)
                        .await
                        .is_ok()));
        let plan = Plan {
            channel: req.channel.as_str().into(),
            server_side: false,
            positioned,
            recoverable,
            push_join_leave,
            recover: (req.recover && recoverable).then(|| (req.offset, req.epoch.clone())),
            was_recovering: req.recover,
            reject_unrecovered: req.flag & SubscribeRequest::FLAG_REJECT_UNRECOVERED != 0,
            data: decision.data,
            chan_info: decision.info,
            expire_at: decision.expire_at,
            cursor: false,
            cursor_from: 0,
            delivery,
            map: false,
            options,
        };
        let a = match self.attach(plan).await {
            Ok(a) => a,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if !sendable(self.client.encoding(), &a.result().publications) {
            a.abandon().await;
            return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
        }
        metrics::counter!("holdfast_subscriptions_accepted_total").increment(1);
        if a.result().delta {
            metrics::counter!("holdfast_delta_subscriptions_total").increment(1);
        }
        self.reply(id, ReplyBody::Subscribe(Box::new(a.result().clone())));
        self.go_live(a).await;
        Ok(())
    }

    pub(super) async fn server_subscribe(
        &mut self,
        req: ServerSubscribe,
    ) -> Result<(), Disconnect> {
        let State::Connected(conn) = &self.state else {
            return Ok(());
        };
        if conn.subs.contains_key(req.channel.as_str()) {
            return Ok(());
        }
        if conn.subs.len() >= self.node.config().client.channel_limit {
            tracing::info!(client = %self.client.id(), channel = %req.channel, "server subscribe over channel limit");
            return Ok(());
        }
        let Ok(resolved) = self.node.rules().resolve(&req.channel) else {
            return Ok(());
        };
        let options = req.overrides.apply(&resolved.options);
        let mut plan = Plan::server_side(
            &req.channel,
            options,
            req.recover_since.clone(),
            req.data,
            req.info,
        );
        // The API's `recover_since` is reported as asked, whether or not the channel has history.
        plan.was_recovering = req.recover_since.is_some();
        let a = match self.attach(plan).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(client = %self.client.id(), channel = %req.channel, code = e.code, "server subscribe failed");
                return Ok(());
            }
        };
        if !sendable(self.client.encoding(), &a.result().publications) {
            a.abandon().await;
            return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
        }
        let mut push_result = a.result().clone();
        let pubs = std::mem::take(&mut push_result.publications);
        self.client.send(push_bytes(
            self.client.encoding(),
            &Push::Subscribe {
                channel: a.channel(),
                result: &push_result,
            },
        ));
        for p in &pubs {
            self.client.send(push_bytes(
                self.client.encoding(),
                &Push::Pub {
                    channel: a.channel(),
                    publication: p,
                },
            ));
        }
        self.go_live(a).await;
        Ok(())
    }

    pub(super) async fn unsubscribe(&mut self, id: u32, channel: &str) -> Result<(), Disconnect> {
        if channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let State::Connected(conn) = &mut self.state else {
            return Err(Disconnect::BAD_REQUEST);
        };
        if let Some((ch, s)) = conn.subs.remove_entry(channel) {
            detach(&self.node, &self.client, s).await;
            emit_unsubscribed(&self.node, &self.client, &conn.ctx.user, &ch);
        }
        self.reply(id, ReplyBody::Unsubscribe);
        Ok(())
    }
}
