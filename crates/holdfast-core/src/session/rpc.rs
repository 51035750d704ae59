//! `rpc` (with `holdfast.ack`) and `send`.

use super::*;

impl Session {
    pub(super) async fn send(&mut self, data: Bytes) -> Result<(), Disconnect> {
        let ctx = self.conn()?.ctx.clone();
        match self.node.hooks().rpc.on_send(&ctx, &data).await {
            Ok(()) => Ok(()),
            Err(HandlerError::Disconnect(d)) => Err(d),
            Err(HandlerError::Reply(e)) => {
                tracing::debug!(client = %self.client.id(), code = e.code, "send refused");
                Ok(())
            }
        }
    }

    pub(super) async fn rpc(
        &mut self,
        id: u32,
        method: &str,
        data: Bytes,
    ) -> Result<(), Disconnect> {
        if method == ACK_METHOD {
            match self.ack(&data).await {
                Ok(()) => self.reply(id, ReplyBody::Rpc(Some(Bytes::from_static(b"{}")))),
                Err(e) => self.reply_error(id, e),
            }
            return Ok(());
        }
        let ctx = self.conn()?.ctx.clone();
        match self.node.hooks().rpc.on_rpc(&ctx, method, &data).await {
            Ok(data) => {
                self.reply(id, ReplyBody::Rpc(data));
                Ok(())
            }
            Err(e) => self.refuse(id, e),
        }
    }
}
