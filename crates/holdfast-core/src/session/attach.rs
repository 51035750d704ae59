//! The subscription lifecycle: plan → attach → go live | abandon → detach.
//!
//! A [`Plan`] is everything decided about a subscription before the hub knows it.
//! [`Session::attach`] registers it, so deliveries are buffered from then on, and reads its
//! position or the publications to recover: an [`Attachment`]. An attachment has exactly two
//! exits: [`Session::go_live`] once its reply is queued, or [`Attachment::abandon`]. Dropping one
//! on any other path is a bug: debug builds (the tests) panic; release builds log it and remove
//! the subscription anyway, so nothing leaks either way. A live subscription ends by `detach`.

use super::*;

/// Everything decided about a subscription before it is attached.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) channel: Arc<str>,
    pub(super) options: ChannelOptions,
    pub(super) server_side: bool,
    pub(super) positioned: bool,
    pub(super) recoverable: bool,
    pub(super) push_join_leave: bool,
    /// Recover from this position.
    pub(super) recover: Option<(u64, String)>,
    /// The client asked to recover (reported as `was_recovering`).
    pub(super) was_recovering: bool,
    pub(super) reject_unrecovered: bool,
    pub(super) data: Option<Bytes>,
    pub(super) chan_info: Option<Bytes>,
    /// When the subscription token expires (unix seconds, as tokens say it).
    pub(super) expire_at: Option<i64>,
    /// Keep a delivery cursor for the user.
    pub(super) cursor: bool,
    /// Offset the user's cursor held when the subscription was planned (0 = none).
    pub(super) cursor_from: u64,
    /// Delta compression, compaction and tag filter of a client-side subscription.
    pub(super) delivery: DeliveryOptions,
    /// A map subscription: its stream is the map broker's change stream.
    pub(super) map: bool,
}

impl Plan {
    /// A server-side subscription (connect, server API): positioned and recoverable as the
    /// namespace forces; `recover` only where the channel keeps history.
    pub(super) fn server_side(
        channel: &str,
        options: ChannelOptions,
        recover: Option<(u64, String)>,
        data: Option<Bytes>,
        chan_info: Option<Bytes>,
    ) -> Self {
        let history = options.history_enabled();
        let recover = recover.filter(|_| history);
        Self {
            channel: channel.into(),
            server_side: true,
            positioned: history && (options.force_positioning || options.force_recovery),
            recoverable: history && options.force_recovery,
            push_join_leave: options.join_leave,
            was_recovering: recover.is_some(),
            recover,
            reject_unrecovered: false,
            data,
            chan_info,
            expire_at: None,
            cursor: false,
            cursor_from: 0,
            delivery: DeliveryOptions::default(),
            map: false,
            options,
        }
    }
}

/// What an attachment holds until it is settled.
#[derive(Debug)]
struct Attached {
    sub: Arc<Subscription>,
    result: SubscribeResult,
    /// Position the client holds once the reply is applied.
    live_offset: u64,
    live_epoch: Arc<str>,
    /// The last publication the reply recovers, as stored (the client's delta base after it).
    recovered_last: Option<Arc<holdfast_protocol::Publication>>,
    plan: Plan,
}

/// A subscription attached to the hub (its deliveries buffered), its reply not yet queued. Goes
/// live ([`Session::go_live`]) or is abandoned ([`Attachment::abandon`]); see the module docs.
#[derive(Debug)]
#[must_use = "an attachment must go live or be abandoned"]
pub(super) struct Attachment {
    /// `None` once settled.
    inner: Option<Attached>,
    node: Node,
}

impl Attachment {
    fn inner(&self) -> &Attached {
        // Only a settled attachment has no inner part, and settling consumes it.
        match &self.inner {
            Some(a) => a,
            None => unreachable!("a settled attachment is consumed"),
        }
    }

    /// The channel.
    pub(super) fn channel(&self) -> &Arc<str> {
        &self.inner().plan.channel
    }

    /// The reply (or `subscribe` push) for the client.
    pub(super) fn result(&self) -> &SubscribeResult {
        &self.inner().result
    }

    /// Makes the reply a map subscription's live reply: `state` (the last state page, if
    /// any), the stream read after the attach as `publications`, the position after them,
    /// `recovered` only when the client asked to recover (a client coming from state pages
    /// folds the publications into its state instead).
    pub(super) fn shape_map(
        &mut self,
        sub_type: i32,
        state: Vec<Arc<holdfast_protocol::Publication>>,
        recoverable: bool,
        recover: bool,
    ) {
        let Some(a) = self.inner.as_mut() else { return };
        let r = &mut a.result;
        r.sub_type = sub_type;
        r.phase = 0;
        r.state = state;
        r.offset = a.live_offset;
        r.epoch = a.live_epoch.to_string();
        r.recoverable = recoverable;
        r.positioned = recoverable;
        r.recovered = recover && r.recovered;
        r.was_recovering = recover;
    }

    /// Ends it before it went live: no more deliveries, out of the hub (and of the broker when
    /// it was the channel's last local subscriber).
    pub(super) async fn abandon(mut self) {
        if let Some(a) = self.inner.take() {
            a.sub.kill();
            self.node
                .remove_subscription(&a.sub.channel, a.sub.client.seq)
                .await;
        }
    }

    /// Settles it for going live.
    fn settle(mut self) -> Attached {
        match self.inner.take() {
            Some(a) => a,
            None => unreachable!("a settled attachment is consumed"),
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let Some(a) = self.inner.take() else { return };
        a.sub.kill();
        let (channel, seq) = (a.sub.channel.clone(), a.sub.client.seq);
        tracing::error!(%channel, "a subscription attachment was dropped without going live or being abandoned; removing it");
        let node = self.node.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let ch = channel.clone();
            rt.spawn(async move { node.remove_subscription(&ch, seq).await });
        }
        debug_assert!(
            std::thread::panicking(),
            "the attachment of {channel} was dropped without going live or being abandoned"
        );
    }
}

/// What the reply of a client-side subscription carries beyond its position: only the recovered
/// publications its tag filter passes, and with delta compression the recovered ones as a delta
/// chain (the first in full, each next a delta of the one before), as the client's decoder
/// reads them.
fn shape_recovered(enc: Encoding, a: &mut Attached) {
    let result = &mut a.result;
    result.id = a.sub.compact_id();
    result.delta = a.plan.delivery.delta;
    if !result.publications.is_empty() && a.plan.delivery.filter.is_some() {
        result.publications.retain(|p| a.sub.accepts(p));
    }
    // A JSON connection cannot take binary publications: left as they are, `sendable` refuses.
    if !a.plan.delivery.delta
        || (enc == Encoding::Json && result.publications.iter().any(|p| p.binary))
    {
        return;
    }
    if let Some(last) = result.publications.last() {
        a.recovered_last = Some(last.clone());
    }
    let mut prev: Option<&Arc<holdfast_protocol::Publication>> = None;
    let mut shaped = Vec::with_capacity(result.publications.len());
    for p in &result.publications {
        let patch = prev.and_then(|prev| crate::hub::patch(prev, &force_delta(p)));
        // `sendable` refused binary publications for JSON before this point.
        if let Some(x) = crate::hub::delta_form(enc, p, patch.as_ref()) {
            shaped.push(Arc::new(x));
        }
        prev = Some(p);
    }
    result.publications = shaped;
}

/// Recovered publications chain as deltas whatever their publisher asked (as Centrifugo does).
fn force_delta(p: &holdfast_protocol::Publication) -> holdfast_protocol::Publication {
    holdfast_protocol::Publication {
        use_delta: true,
        ..p.clone()
    }
}

impl Session {
    /// Registers the subscription (buffering deliveries) and reads the position or the
    /// publications to recover.
    pub(super) async fn attach(&mut self, plan: Plan) -> Result<Attachment, ErrorReply> {
        if plan.options.subscription_type.is_map() != plan.map {
            // Server-side subscriptions (connect, API) to a map channel, or a stream plan for
            // one: a map subscription is only made by its client's pages.
            return Err(ErrorReply::new(
                ErrorReply::BAD_REQUEST.code,
                "bad request: the subscription type does not match the namespace's",
            ));
        }
        let sub = Subscription::new(
            self.client.clone(),
            plan.channel.clone(),
            plan.server_side,
            plan.push_join_leave,
            self.node.config().client.queue_max_size,
            plan.delivery.clone(),
        );
        self.node.add_subscription(sub.clone()).await.map_err(|e| {
            tracing::warn!(channel = %plan.channel, error = %e, "broker subscribe failed");
            engine_error(e)
        })?;
        // From here on every exit settles it: the attachment is created at once, and the reads
        // below abandon it when they fail.
        let mut att = Attachment {
            inner: Some(Attached {
                sub,
                result: SubscribeResult::default(),
                live_offset: 0,
                live_epoch: Arc::from(""),
                recovered_last: None,
                plan,
            }),
            node: self.node.clone(),
        };
        match self.read_position(&mut att).await {
            Ok(()) => {
                if let Some(a) = att.inner.as_mut() {
                    shape_recovered(self.client.encoding(), a);
                }
                Ok(att)
            }
            Err(e) => {
                att.abandon().await;
                Err(e)
            }
        }
    }

    /// Reads the subscription's stream: the channel's history, or a map's change stream.
    async fn stream_history(
        &self,
        plan: &Plan,
        q: &HistoryQuery,
    ) -> Result<crate::engine::HistoryPage, crate::engine::EngineError> {
        if plan.map {
            self.node.maps().read_stream(&plan.channel, q).await
        } else {
            self.node.broker().history(&plan.channel, q).await
        }
    }

    /// Fills in the reply's position (and the publications to recover) of an attachment.
    async fn read_position(&mut self, att: &mut Attachment) -> Result<(), ErrorReply> {
        let Some(a) = att.inner.as_mut() else {
            return Ok(());
        };
        let plan = &a.plan;
        let result = &mut a.result;
        *result = SubscribeResult {
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
        if (plan.options.history_enabled() || plan.map) && (plan.positioned || plan.recoverable) {
            let max = self.node.config().client.recovery_max_publication_limit;
            let meta_ttl = match plan.map {
                // A map's stream lives as its map settings say.
                true => self.node.map_settings_of(&plan.options).map_or_else(
                    || self.node.rules().meta_ttl(&plan.options),
                    |s| s.stream.meta_ttl,
                ),
                false => self.node.rules().meta_ttl(&plan.options),
            };
            let read = match &plan.recover {
                Some((offset, epoch)) => {
                    let q = HistoryQuery {
                        since: Some((*offset, epoch.clone())),
                        limit: Some(max + 1),
                        reverse: false,
                        meta_ttl,
                    };
                    match self.stream_history(plan, &q).await {
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
            let read = read.map_err(engine_error)?;
            match read {
                Some((page, true)) => {
                    metrics::counter!("holdfast_recover_total", "outcome" => "recovered")
                        .increment(1);
                    metrics::counter!("holdfast_recovered_publications_total")
                        .increment(page.publications.len() as u64);
                    result.recovered = true;
                    result.offset = plan.recover.as_ref().map_or(0, |r| r.0);
                    result.epoch = page.top.epoch.to_string();
                    if page.publications.is_empty() && plan.delivery.delta && page.top.offset > 0 {
                        // Nothing to recover: the client's delta base is the publication at its
                        // position (it kept it across the reconnect), the chain's to continue.
                        let q = HistoryQuery {
                            since: Some((page.top.offset - 1, page.top.epoch.to_string())),
                            limit: Some(1),
                            reverse: false,
                            meta_ttl,
                        };
                        if let Ok(p) = self.stream_history(plan, &q).await {
                            a.recovered_last = p
                                .publications
                                .into_iter()
                                .find(|p| p.offset == page.top.offset);
                        }
                    }
                    a.live_offset = page.top.offset;
                    a.live_epoch = page.top.epoch;
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
                            self.stream_history(plan, &q)
                                .await
                                .map_err(engine_error)?
                                .top
                        }
                    };
                    if plan.recover.is_some() {
                        metrics::counter!("holdfast_recover_total", "outcome" => "not_recovered")
                            .increment(1);
                        if plan.reject_unrecovered {
                            return Err(ErrorReply::UNRECOVERABLE_POSITION);
                        }
                    }
                    result.offset = top.offset;
                    result.epoch = top.epoch.to_string();
                    a.live_offset = top.offset;
                    a.live_epoch = top.epoch;
                }
            }
        }
        Ok(())
    }

    /// After the reply is queued: buffered deliveries follow it, presence and join are
    /// published, and the subscription is recorded.
    pub(super) async fn go_live(&mut self, a: Attachment) {
        let Attached {
            sub,
            live_offset,
            live_epoch,
            recovered_last,
            plan,
            ..
        } = a.settle();
        match sub.go_live(
            plan.positioned,
            live_offset,
            &live_epoch,
            recovered_last.as_ref(),
            self.node.hub(),
        ) {
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
            expire_at: plan.expire_at.map(at_unix),
            cursor_ttl,
            confirmed: 0,
            server_refresh: plan.expire_at.is_some()
                && !plan.server_side
                && self
                    .node
                    .hooks()
                    .channels
                    .refreshes_subscriptions(&plan.options),
            presence_maps: crate::node::map::has_presence_maps(&plan.options),
        };
        conn.subs.insert(plan.channel.clone(), s);
        self.node
            .hooks()
            .lifecycle(crate::handler::LifecycleEvent::Subscribed {
                client: self.client.id.clone(),
                user: conn.ctx.user.clone(),
                channel: plan.channel.clone(),
            });
        if crate::node::map::has_presence_maps(&plan.options) {
            self.node
                .presence_maps_join(&plan.channel, &plan.options, &info)
                .await;
        }
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
