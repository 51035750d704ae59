//! The subscription lifecycle: plan → attach → go live | abandon → detach.

use super::*;

impl Session {
    /// Registers the subscription (buffering deliveries) and reads the position or the
    /// publications to recover.
    pub(super) async fn attach(&mut self, plan: Plan) -> Result<Attached, ErrorReply> {
        let sub = Subscription::new(
            self.client.clone(),
            plan.channel.clone(),
            plan.server_side,
            plan.push_join_leave,
            self.node.config().client.queue_max_size,
        );
        self.node.add_subscription(sub.clone()).await.map_err(|e| {
            tracing::warn!(channel = %plan.channel, error = %e, "broker subscribe failed");
            ErrorReply::INTERNAL
        })?;
        let mut result = SubscribeResult {
            recoverable: plan.recoverable,
            positioned: plan.positioned,
            was_recovering: plan.was_recovering,
            data: plan.data.clone(),
            ..Default::default()
        };
        if let Some(exp) = plan.expire_at {
            result.expires = true;
            result.ttl = (exp - unix_secs()).clamp(0, i64::from(u32::MAX)) as u32;
        }
        let mut live_offset = 0;
        let mut live_epoch: Arc<str> = Arc::from("");
        if plan.options.history_enabled() && (plan.positioned || plan.recoverable) {
            let max = self.node.config().client.recovery_max_publication_limit;
            let meta_ttl = self.node.rules().meta_ttl(&plan.options);
            let read = match &plan.recover {
                Some((offset, epoch)) => {
                    let q = HistoryQuery {
                        since: Some((*offset, epoch.clone())),
                        limit: Some(max + 1),
                        reverse: false,
                        meta_ttl,
                    };
                    match self.node.broker().history(&plan.channel, &q).await {
                        Ok(page) => {
                            let pubs = &page.publications;
                            let top = page.top.offset;
                            let recovered = if pubs.is_empty() {
                                top == *offset
                            } else {
                                pubs.len() <= max
                                    && pubs[0].offset == offset + 1
                                    && pubs.last().is_some_and(|p| p.offset == top)
                            };
                            Ok(Some((page, recovered)))
                        }
                        Err(crate::engine::EngineError::UnrecoverablePosition) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
                None => Ok(None),
            };
            let read = match read {
                Ok(r) => r,
                Err(e) => {
                    self.node
                        .remove_subscription(&plan.channel, self.client.seq)
                        .await;
                    return Err(engine_error(e));
                }
            };
            match read {
                Some((page, true)) => {
                    metrics::counter!("holdfast_recover_total", "outcome" => "recovered")
                        .increment(1);
                    metrics::counter!("holdfast_recovered_publications_total")
                        .increment(page.publications.len() as u64);
                    result.recovered = true;
                    result.offset = plan.recover.as_ref().map_or(0, |r| r.0);
                    result.epoch = page.top.epoch.to_string();
                    live_offset = page.top.offset;
                    live_epoch = page.top.epoch;
                    result.publications = page.publications;
                }
                other => {
                    let top = match other {
                        Some((page, false)) => page.top,
                        _ => {
                            let q = HistoryQuery {
                                since: None,
                                limit: Some(0),
                                reverse: false,
                                meta_ttl,
                            };
                            match self.node.broker().history(&plan.channel, &q).await {
                                Ok(p) => p.top,
                                Err(e) => {
                                    self.node
                                        .remove_subscription(&plan.channel, self.client.seq)
                                        .await;
                                    return Err(engine_error(e));
                                }
                            }
                        }
                    };
                    if plan.recover.is_some() {
                        metrics::counter!("holdfast_recover_total", "outcome" => "not_recovered")
                            .increment(1);
                        if plan.reject_unrecovered {
                            self.node
                                .remove_subscription(&plan.channel, self.client.seq)
                                .await;
                            return Err(ErrorReply::UNRECOVERABLE_POSITION);
                        }
                    }
                    result.offset = top.offset;
                    result.epoch = top.epoch.to_string();
                    live_offset = top.offset;
                    live_epoch = top.epoch;
                }
            }
        }
        Ok(Attached {
            sub,
            result,
            live_offset,
            live_epoch,
            plan,
        })
    }

    /// After the reply is queued: buffered deliveries follow it, presence and join are
    /// published, and the subscription is recorded.
    pub(super) async fn go_live(&mut self, a: Attached) {
        let Attached {
            sub,
            live_offset,
            live_epoch,
            plan,
            ..
        } = a;
        match sub.go_live(plan.positioned, live_offset, &live_epoch) {
            GoLive::Ok => {}
            GoLive::Dead => {
                self.node
                    .remove_subscription(&plan.channel, self.client.seq)
                    .await;
                return;
            }
            GoLive::Binary => {
                self.node
                    .remove_subscription(&plan.channel, self.client.seq)
                    .await;
                self.client.close(Disconnect::INAPPROPRIATE_PROTOCOL);
                return;
            }
            GoLive::Gap => {
                metrics::counter!("holdfast_insufficient_state_total").increment(1);
                self.node
                    .remove_subscription(&plan.channel, self.client.seq)
                    .await;
                if plan.server_side {
                    self.client.close(Disconnect::INSUFFICIENT_STATE);
                } else {
                    let (code, reason) = unsubscribe::INSUFFICIENT_STATE;
                    self.client.send(push_bytes(
                        self.client.encoding(),
                        &Push::Unsubscribe {
                            channel: &plan.channel,
                            code,
                            reason,
                        },
                    ));
                }
                return;
            }
        }
        if plan.cursor {
            sub.set_cursor();
            self.client.track_cursor(&sub);
            // What the reply (or the buffer after it) delivered is confirmed promptly too.
            if sub
                .live_position()
                .is_some_and(|(o, _)| o != plan.cursor_from)
            {
                self.client.note_cursor_delivery();
            }
        }
        let cursor_ttl = plan
            .cursor
            .then(|| self.node.rules().meta_ttl(&plan.options));
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let info = if plan.chan_info.is_some() {
            Arc::new(ClientInfo {
                chan_info: plan.chan_info.clone(),
                ..(*conn.info).clone()
            })
        } else {
            conn.info.clone()
        };
        let s = SessionSub {
            sub,
            info: info.clone(),
            presence: plan.options.presence,
            join_leave: plan.options.join_leave,
            expire_at: plan.expire_at,
            cursor_ttl,
            confirmed: 0,
            server_refresh: plan.expire_at.is_some()
                && !plan.server_side
                && self.node.handler().refreshes_subscriptions(&plan.options),
        };
        conn.subs.insert(plan.channel.clone(), s);
        self.node
            .handler()
            .on_lifecycle(crate::handler::LifecycleEvent::Subscribed {
                client: self.client.id.clone(),
                user: conn.ctx.user.clone(),
                channel: plan.channel.clone(),
            });
        if plan.options.presence
            && let Err(e) = self
                .node
                .presence_store()
                .add_presence(&plan.channel, info.clone())
                .await
        {
            tracing::warn!(channel = %plan.channel, error = %e, "presence add failed");
        }
        if plan.options.join_leave
            && let Err(e) = self.node.broker().publish_join(&plan.channel, info).await
        {
            tracing::warn!(channel = %plan.channel, error = %e, "join publish failed");
        }
    }
}
