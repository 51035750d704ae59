//! RPC methods registered by name on the node, with a fallback for the others.

use super::*;

/// An RPC method's implementation.
pub type RpcFn = Arc<
    dyn Fn(
            ClientContext,
            Bytes,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<Bytes>, HandlerError>> + Send>,
        > + Send
        + Sync,
>;

/// RPC methods by name, owned by the node (not by connections, so nothing accumulates per
/// connection): the "message router" applications otherwise write by hand. Methods not
/// registered go to the fallback (an RPC proxy, say) when there is one; otherwise 104, or 108
/// when no method is registered at all.
#[derive(Clone, Default)]
pub struct RpcMethods {
    methods: std::collections::HashMap<String, RpcFn>,
    fallback: Option<Arc<dyn RpcHook>>,
}

impl std::fmt::Debug for RpcMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMethods")
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl RpcMethods {
    /// No methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `method`.
    #[must_use]
    pub fn on<F, Fut>(mut self, method: &str, f: F) -> Self
    where
        F: Fn(ClientContext, Bytes) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Option<Bytes>, HandlerError>> + Send + 'static,
    {
        self.methods
            .insert(method.to_owned(), Arc::new(move |c, d| Box::pin(f(c, d))));
        self
    }

    /// Sends methods that are not registered here to `fallback` (and `send` too).
    #[must_use]
    pub fn or_else(mut self, fallback: Arc<dyn RpcHook>) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// Number of registered methods.
    pub fn len(&self) -> usize {
        self.methods.len()
    }

    /// Whether no method is registered.
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    /// Calls `method`; `None` when it is not registered.
    pub async fn call(
        &self,
        client: &ClientContext,
        method: &str,
        data: &Bytes,
    ) -> Option<Result<Option<Bytes>, HandlerError>> {
        let f = self.methods.get(method)?.clone();
        Some(f(client.clone(), data.clone()).await)
    }
}

#[async_trait]
impl RpcHook for RpcMethods {
    async fn on_rpc(
        &self,
        client: &ClientContext,
        method: &str,
        data: &Bytes,
    ) -> Result<Option<Bytes>, HandlerError> {
        if let Some(r) = self.call(client, method, data).await {
            return r;
        }
        match &self.fallback {
            Some(f) => f.on_rpc(client, method, data).await,
            None if self.methods.is_empty() => Err(ErrorReply::NOT_AVAILABLE.into()),
            None => Err(ErrorReply::METHOD_NOT_FOUND.into()),
        }
    }

    async fn on_send(&self, client: &ClientContext, data: &Bytes) -> Result<(), HandlerError> {
        match &self.fallback {
            Some(f) => f.on_send(client, data).await,
            None => Err(Disconnect::NOT_AVAILABLE.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::ClientContext;

    fn ctx() -> ClientContext {
        ClientContext {
            client: "c".into(),
            user: "u".into(),
            transport: "test",
            encoding: Encoding::Json,
            conn_info: None,
            meta: None,
            headers: Vec::new().into(),
        }
    }

    /// An RPC hook that answers every method with its name (an RPC proxy, say).
    #[derive(Debug)]
    struct Echo;

    #[async_trait]
    impl RpcHook for Echo {
        async fn on_rpc(
            &self,
            _client: &ClientContext,
            method: &str,
            _data: &Bytes,
        ) -> Result<Option<Bytes>, HandlerError> {
            Ok(Some(Bytes::from(format!("proxy:{method}"))))
        }
    }

    #[tokio::test]
    async fn local_methods_and_a_fallback_combine() {
        let local = |_c: ClientContext, _d: Bytes| async { Ok(Some(Bytes::from_static(b"local"))) };
        let data = Bytes::new();
        let alone = RpcMethods::new().on("mine", local);
        assert_eq!(
            alone.on_rpc(&ctx(), "mine", &data).await,
            Ok(Some(Bytes::from_static(b"local")))
        );
        assert_eq!(
            alone.on_rpc(&ctx(), "other", &data).await,
            Err(ErrorReply::METHOD_NOT_FOUND.into()),
            "an unknown method without a fallback"
        );
        assert_eq!(
            RpcMethods::new().on_rpc(&ctx(), "x", &data).await,
            Err(ErrorReply::NOT_AVAILABLE.into()),
            "no method at all"
        );
        let both = RpcMethods::new().on("mine", local).or_else(Arc::new(Echo));
        assert_eq!(
            both.on_rpc(&ctx(), "mine", &data).await,
            Ok(Some(Bytes::from_static(b"local")))
        );
        assert_eq!(
            both.on_rpc(&ctx(), "other", &data).await,
            Ok(Some(Bytes::from_static(b"proxy:other"))),
            "the proxy answers what is not local"
        );
    }
}
