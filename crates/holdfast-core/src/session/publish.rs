//! Client `publish`.

use super::*;

impl Session {
    pub(super) async fn publish(
        &mut self,
        id: u32,
        channel: &str,
        data: Bytes,
    ) -> Result<(), Disconnect> {
        if channel.is_empty() || data.is_empty() {
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
        if resolved.options.subscription_type.is_map() {
            self.reply_error(
                id,
                ErrorReply::new(
                    ErrorReply::BAD_REQUEST.code,
                    "bad request: a map channel takes map writes (publish with type 1 and a key)",
                ),
            );
            return Ok(());
        }
        let conn = self.conn()?;
        let sub = conn.subs.get(channel);
        let ev = ChannelEvent {
            channel,
            options: &resolved.options,
            subscribed: sub.is_some(),
        };
        let info = sub.map_or_else(|| conn.info.clone(), |s| s.info.clone());
        let ctx = conn.ctx.clone();
        let decision = match self
            .node
            .hooks()
            .channels
            .on_publish(&ctx, &ev, &data)
            .await
        {
            Ok(d) => d,
            Err(e) => return self.refuse(id, e),
        };
        let data = decision.data.unwrap_or(data);
        // JSON ingress is validated JSON; protobuf payloads are checked once here so JSON
        // subscribers know whether they can receive them.
        let binary = self.client.encoding() == Encoding::Protobuf && !json::is_json(&data);
        let req = PublishRequest {
            data,
            binary,
            info: Some(info),
            skip_history: decision.skip_history,
            tags: None,
            ..Default::default()
        };
        match self.node.publish(channel, req).await {
            Ok(_) => self.reply(id, ReplyBody::Publish),
            Err(e) => self.reply_error(id, e),
        }
        Ok(())
    }
}
