//! Map subscriptions and client map writes.
//!
//! A map subscription is a sequence of `subscribe` commands for one channel. A state page
//! (phase 2) reads the keys after the cursor as of the first page's position (later pages name
//! it): entries written after it are left to the stream. A stream page (phase 1) reads the
//! changes after the client's position. Once what is left to read fits in one page, the server
//! answers live (phase 0): the subscription is attached (deliveries buffered from then on), the
//! rest of the stream is read after the attach and sent with the reply, and buffered deliveries
//! follow it, so the client's mirror misses nothing between its last page and the live
//! deliveries. Every page runs the subscribe checks (token, proxy, namespace rules) again.

use super::*;
use crate::engine::EngineError;
use crate::engine::map::{MapSettings, MapWrite, StateQuery};
use crate::filter::Filter;
use crate::handler::SubscribeDecision;
use holdfast_protocol::command::PublishRequest as ClientPublish;

/// What a map subscribe needs from the checks `subscribe` ran.
pub(super) struct MapAsk {
    pub(super) req: SubscribeRequest,
    pub(super) options: ChannelOptions,
    pub(super) decision: SubscribeDecision,
    pub(super) filter: Option<Filter>,
    pub(super) compact: bool,
}

fn bad_request(why: &str) -> ErrorReply {
    ErrorReply::new(ErrorReply::BAD_REQUEST.code, format!("bad request: {why}"))
}

fn binary_for_json() -> ErrorReply {
    bad_request("the map holds binary values a JSON connection cannot receive")
}

impl Session {
    pub(super) async fn map_subscribe(&mut self, id: u32, ask: MapAsk) -> Result<(), Disconnect> {
        let Some(settings) = self.node.map_settings_of(&ask.options) else {
            self.reply_error(id, bad_request("not a map channel"));
            return Ok(());
        };
        let limit = ask.options.map.page_size(ask.req.limit);
        // The live step reads the rest of the stream through the recovery read, which takes at
        // most `client.recovery_max_publication_limit`: more than that left goes in stream pages.
        let live_limit = limit.min(self.node.config().client.recovery_max_publication_limit) as u64;
        if ask.req.cursor.len() > ask.options.map.max_key_length {
            self.reply_error(id, bad_request("cursor too long"));
            return Ok(());
        }
        let reply = match ask.req.phase {
            SubscribeRequest::PHASE_STATE | SubscribeRequest::PHASE_LIVE => {
                self.map_state_page(id, ask, &settings, limit, live_limit)
                    .await
            }
            SubscribeRequest::PHASE_STREAM => {
                self.map_stream_page(id, ask, &settings, limit, live_limit)
                    .await
            }
            _ => Err(bad_request("unknown map phase")),
        };
        match reply {
            Ok(Some(result)) => {
                self.reply(id, ReplyBody::Subscribe(Box::new(result)));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) if e.code == ErrorReply::UNRECOVERABLE_POSITION.code => {
                metrics::counter!("holdfast_map_resyncs_total").increment(1);
                self.reply_error(id, e);
                Ok(())
            }
            Err(e) => {
                self.reply_error(id, e);
                Ok(())
            }
        }
    }

    /// A state page: the next one (phase 2 with a cursor), the last one before stream pages
    /// (phase 2 without), or the last one with the subscription live (`None`: replied).
    async fn map_state_page(
        &mut self,
        id: u32,
        ask: MapAsk,
        settings: &MapSettings,
        limit: usize,
        live_limit: u64,
    ) -> Result<Option<SubscribeResult>, ErrorReply> {
        let req = &ask.req;
        let revision = (!req.epoch.is_empty()).then(|| (req.offset, req.epoch.clone()));
        if !req.cursor.is_empty() && revision.is_none() {
            return Err(bad_request(
                "a state page after the first names its position",
            ));
        }
        let query = StateQuery {
            cursor: req.cursor.clone(),
            limit,
            revision,
            key: None,
        };
        let page = self
            .node
            .maps()
            .read_state(&req.channel, &query, settings)
            .await
            .map_err(engine_error)?;
        if !sendable(self.client.encoding(), &page.entries) {
            return Err(binary_for_json());
        }
        metrics::counter!("holdfast_map_state_pages_total").increment(1);
        let state_page = |cursor: String, state| SubscribeResult {
            sub_type: ask.options.subscription_type.wire(),
            phase: SubscribeRequest::PHASE_STATE,
            cursor,
            state,
            offset: page.top.offset,
            epoch: page.top.epoch.to_string(),
            ..Default::default()
        };
        if !page.cursor.is_empty() {
            return Ok(Some(state_page(page.cursor.clone(), page.entries.clone())));
        }
        let top = self.map_top(&req.channel, settings).await?;
        if top.epoch != page.top.epoch {
            return Err(ErrorReply::UNRECOVERABLE_POSITION);
        }
        if top.offset.saturating_sub(page.top.offset) > live_limit {
            // Too much changed while paging: the client reads the stream in pages first.
            return Ok(Some(state_page(String::new(), page.entries.clone())));
        }
        let from = (page.top.offset, page.top.epoch.to_string());
        self.map_go_live(id, ask, from, page.entries).await?;
        Ok(None)
    }

    /// A stream page after the client's position, or the subscription live (`None`: replied)
    /// once the rest fits in one page.
    async fn map_stream_page(
        &mut self,
        id: u32,
        ask: MapAsk,
        settings: &MapSettings,
        limit: usize,
        live_limit: u64,
    ) -> Result<Option<SubscribeResult>, ErrorReply> {
        let req = &ask.req;
        if req.epoch.is_empty() {
            // No position (or a position from an ephemeral map): start over from the state.
            return Err(ErrorReply::UNRECOVERABLE_POSITION);
        }
        let top = self.map_top(&req.channel, settings).await?;
        if *top.epoch != *req.epoch || req.offset > top.offset {
            return Err(ErrorReply::UNRECOVERABLE_POSITION);
        }
        if top.offset - req.offset <= live_limit {
            let from = (req.offset, req.epoch.clone());
            self.map_go_live(id, ask, from, Vec::new()).await?;
            return Ok(None);
        }
        let q = HistoryQuery {
            since: Some((req.offset, req.epoch.clone())),
            limit: Some(limit),
            reverse: false,
            meta_ttl: settings.stream.meta_ttl,
        };
        let page = self
            .node
            .maps()
            .read_stream(&req.channel, &q)
            .await
            .map_err(engine_error)?;
        let Some(last) = page.publications.last() else {
            return Err(ErrorReply::UNRECOVERABLE_POSITION);
        };
        if page.publications[0].offset != req.offset + 1 {
            // The stream no longer reaches back to the client's position.
            return Err(ErrorReply::UNRECOVERABLE_POSITION);
        }
        if !sendable(self.client.encoding(), &page.publications) {
            return Err(binary_for_json());
        }
        metrics::counter!("holdfast_map_stream_pages_total").increment(1);
        Ok(Some(SubscribeResult {
            sub_type: ask.options.subscription_type.wire(),
            phase: SubscribeRequest::PHASE_STREAM,
            offset: last.offset,
            epoch: page.top.epoch.to_string(),
            publications: page.publications,
            ..Default::default()
        }))
    }

    async fn map_top(
        &self,
        channel: &str,
        settings: &MapSettings,
    ) -> Result<crate::engine::StreamTop, ErrorReply> {
        let q = HistoryQuery {
            since: None,
            limit: Some(0),
            reverse: false,
            meta_ttl: settings.stream.meta_ttl,
        };
        match self.node.maps().read_stream(channel, &q).await {
            Ok(p) => Ok(p.top),
            Err(EngineError::UnrecoverablePosition) => Err(ErrorReply::UNRECOVERABLE_POSITION),
            Err(e) => Err(engine_error(e)),
        }
    }

    /// Attaches the subscription from `from`, reads the rest of the stream after the attach
    /// and replies live with `state` (the last state page, if any) and that rest.
    async fn map_go_live(
        &mut self,
        id: u32,
        ask: MapAsk,
        from: (u64, String),
        state: Vec<Arc<holdfast_protocol::Publication>>,
    ) -> Result<(), ErrorReply> {
        let MapAsk {
            req,
            options,
            decision,
            filter,
            compact,
        } = ask;
        let recoverable = options.map.recoverable();
        let sub_type = options.subscription_type.wire();
        let plan = Plan {
            channel: req.channel.as_str().into(),
            server_side: false,
            positioned: true,
            recoverable: true,
            push_join_leave: false,
            recover: Some(from),
            was_recovering: req.recover,
            // The stream must reach back to the position, else the client starts over.
            reject_unrecovered: true,
            data: decision.data,
            chan_info: decision.info,
            expire_at: decision.expire_at,
            cursor: false,
            cursor_from: 0,
            delivery: DeliveryOptions {
                delta: false,
                compact,
                filter,
            },
            map: true,
            options,
        };
        let mut a = self.attach(plan).await?;
        if !sendable(self.client.encoding(), &a.result().publications)
            || !sendable(self.client.encoding(), &state)
        {
            a.abandon().await;
            return Err(binary_for_json());
        }
        a.shape_map(sub_type, state, recoverable, req.recover);
        metrics::counter!("holdfast_subscriptions_accepted_total").increment(1);
        metrics::counter!("holdfast_map_subscriptions_total").increment(1);
        self.reply(id, ReplyBody::Subscribe(Box::new(a.result().clone())));
        self.go_live(a).await;
        Ok(())
    }

    /// A client's write to a map channel (`publish` with `type` 1): allowed by the namespace's
    /// `map.allow_publish_for_*` (or `allow_remove_for_*`) through the channel hooks.
    pub(super) async fn map_write(
        &mut self,
        id: u32,
        req: ClientPublish,
    ) -> Result<(), Disconnect> {
        if req.channel.is_empty() || (!req.removed && req.data.is_empty()) {
            return Err(Disconnect::BAD_REQUEST);
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
        if resolved.options.subscription_type != crate::config::SubscriptionType::Map {
            // Presence maps (map_clients, map_users) are written by the server only.
            self.reply_error(id, bad_request("not a map channel clients write to"));
            return Ok(());
        }
        let conn = self.conn()?;
        let sub = conn.subs.get(req.channel.as_str());
        // The channel hooks decide with the map's write permissions in place of the stream's
        // (map writes do not go to the publish proxy).
        let mut options = (*resolved.options).clone();
        let m = &resolved.options.map;
        (
            options.allow_publish_for_client,
            options.allow_publish_for_subscriber,
            options.allow_publish_for_anonymous,
        ) = if req.removed {
            (
                m.allow_remove_for_client,
                m.allow_remove_for_subscriber,
                m.allow_remove_for_anonymous,
            )
        } else {
            (
                m.allow_publish_for_client,
                m.allow_publish_for_subscriber,
                m.allow_publish_for_anonymous,
            )
        };
        options.publish_proxy_enabled = false;
        let ev = ChannelEvent {
            channel: &req.channel,
            options: &options,
            subscribed: sub.is_some(),
        };
        let info = sub.map_or_else(|| conn.info.clone(), |s| s.info.clone());
        let ctx = conn.ctx.clone();
        let key = match m.client_key.as_str() {
            "client_id" => self.client.id().to_string(),
            "user_id" => ctx.user.to_string(),
            _ => req.key,
        };
        let decision = match self
            .node
            .hooks()
            .channels
            .on_publish(&ctx, &ev, &req.data)
            .await
        {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let data = if req.removed {
            Bytes::new()
        } else {
            decision.data.unwrap_or(req.data)
        };
        let binary = self.client.encoding() == Encoding::Protobuf && !json::is_json(&data);
        let write = MapWrite {
            key,
            data,
            removed: req.removed,
            info: Some(info),
            binary,
            ..Default::default()
        };
        match self.node.map_publish(&req.channel, write).await {
            Ok(_) => self.reply(id, ReplyBody::Publish),
            Err(e) => self.reply_error(id, e),
        }
        Ok(())
    }
}
