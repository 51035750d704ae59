//! Client `history`.

use super::*;

impl Session {
    pub(super) async fn history(&mut self, id: u32, req: HistoryRequest) -> Result<(), Disconnect> {
        if req.channel.is_empty() {
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
        if !resolved.options.history_enabled() {
            self.reply_error(id, ErrorReply::NOT_AVAILABLE);
            return Ok(());
        }
        let conn = self.conn()?;
        let ev = ChannelEvent {
            channel: &req.channel,
            options: &resolved.options,
            subscribed: conn.subs.contains_key(req.channel.as_str()),
        };
        let ctx = conn.ctx.clone();
        if let Err(e) = self.node.hooks().channels.on_history(&ctx, &ev).await {
            return self.refuse(id, e);
        }
        let max = self.node.config().client.history_max_publication_limit;
        let limit = match req.limit {
            0 => Some(0),
            l if l < 0 => Some(max),
            l => Some((l as usize).min(max)),
        };
        let since = req.since.map(|s| (s.offset, s.epoch));
        match self
            .node
            .history(&req.channel, since, limit, req.reverse)
            .await
        {
            Ok(page) if !sendable(self.client.encoding(), &page.publications) => {
                return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
            }
            Ok(page) => self.reply(
                id,
                ReplyBody::History(Box::new(HistoryResult {
                    publications: page.publications,
                    epoch: page.top.epoch.to_string(),
                    offset: page.top.offset,
                })),
            ),
            Err(e) => self.reply_error(id, e),
        }
        Ok(())
    }
}
