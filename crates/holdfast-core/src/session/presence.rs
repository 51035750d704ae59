//! `presence` and `presence_stats`.

use super::*;

impl Session {
    pub(super) async fn presence(
        &mut self,
        id: u32,
        channel: &str,
        stats: bool,
    ) -> Result<(), Disconnect> {
        if channel.is_empty() {
            return Err(Disconnect::BAD_REQUEST);
        }
        let resolved = match self.node.rules().resolve(channel) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(id, e);
                return Ok(());
            }
        };
        if self.refused_foreign(id, &resolved, channel) {
            return Ok(());
        }
        if !resolved.options.presence {
            self.reply_error(id, ErrorReply::NOT_AVAILABLE);
            return Ok(());
        }
        let conn = self.conn()?;
        let ev = ChannelEvent {
            channel,
            options: &resolved.options,
            subscribed: conn.subs.contains_key(channel),
        };
        let ctx = conn.ctx.clone();
        if let Err(e) = self.node.hooks().channels.on_presence(&ctx, &ev).await {
            return self.refuse(id, e);
        }
        let store = self.node.presence_store();
        let body = if stats {
            store
                .presence_stats(channel)
                .await
                .map(|(num_clients, num_users)| ReplyBody::PresenceStats {
                    num_clients,
                    num_users,
                })
        } else {
            store.presence(channel).await.map(ReplyBody::Presence)
        };
        match body {
            Ok(b) => self.reply(id, b),
            Err(e) => self.reply_error(id, engine_error(e)),
        }
        Ok(())
    }
}
