//! Delivery cursors: positions confirmed by a pong or by `holdfast.ack` are saved.

use super::*;

impl Session {
    /// Saves the positions the answered ping confirmed to the delivery cursors.
    pub(super) async fn confirm_cursors(&mut self) {
        let snapshot = self.client.take_ping_snapshot();
        if snapshot.is_empty() {
            return;
        }
        let node = self.node.clone();
        let State::Connected(conn) = &mut self.state else {
            return;
        };
        let user = conn.ctx.user.clone();
        for (channel, offset, epoch) in snapshot {
            let Some(s) = conn.subs.get_mut(&channel) else {
                continue;
            };
            let Some(ttl) = s.cursor_ttl else { continue };
            if offset <= s.confirmed {
                continue;
            }
            let pos = crate::engine::StreamTop { offset, epoch };
            match node.cursors().save_cursor(&user, &channel, &pos, ttl).await {
                Ok(()) => {
                    s.confirmed = offset;
                    metrics::counter!("holdfast_cursor_saves_total", "by" => "pong").increment(1);
                }
                Err(e) => tracing::warn!(%channel, error = %e, "cursor save failed"),
            }
        }
    }

    /// `holdfast.ack`: the client confirms it processed a channel up to a position.
    pub(super) async fn ack(&mut self, data: &[u8]) -> Result<(), ErrorReply> {
        #[derive(serde::Deserialize)]
        struct Ack {
            channel: String,
            offset: u64,
            epoch: String,
        }
        let ack: Ack = serde_json::from_slice(data).map_err(|_| ErrorReply::BAD_REQUEST)?;
        let node = self.node.clone();
        let conn = self.conn_mut().map_err(|_| ErrorReply::BAD_REQUEST)?;
        let user = conn.ctx.user.clone();
        let s = conn
            .subs
            .get_mut(ack.channel.as_str())
            .ok_or(ErrorReply::PERMISSION_DENIED)?;
        let ttl = s.cursor_ttl.ok_or(ErrorReply::NOT_AVAILABLE)?;
        let (delivered, epoch) = s.sub.live_position().ok_or(ErrorReply::BAD_REQUEST)?;
        if ack.epoch != *epoch || ack.offset > delivered {
            return Err(ErrorReply::BAD_REQUEST);
        }
        if ack.offset > s.confirmed {
            let pos = crate::engine::StreamTop {
                offset: ack.offset,
                epoch,
            };
            node.cursors()
                .save_cursor(&user, &ack.channel, &pos, ttl)
                .await
                .map_err(engine_error)?;
            s.confirmed = ack.offset;
            metrics::counter!("holdfast_cursor_saves_total", "by" => "ack").increment(1);
        }
        Ok(())
    }
}
