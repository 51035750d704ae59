//! Engines for tests: the real memory engine with a fault injected.
#![allow(dead_code, unreachable_pub)]

use async_trait::async_trait;
use holdfast_core::engine::*;
use holdfast_protocol::{ClientInfo, Publication};
use std::sync::{Arc, Mutex, OnceLock};

/// When the hook runs relative to the history read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Before,
    After,
}

pub type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
type HistoryHook = Box<dyn Fn(&str, Stage) -> Option<Fut> + Send + Sync>;

/// The memory engine, but publications on channels starting with `drop_prefix` whose offset is
/// in `drop_offsets` are not delivered (as if the pub/sub message were lost); and a hook can run
/// code right before or after a history read (to interleave publications with a subscribe).
pub struct FaultyEngine {
    pub inner: Arc<MemoryEngine>,
    pub drop_prefix: String,
    pub drop_offsets: Vec<u64>,
    /// Called with the channel before and after a history read; the future it returns runs there.
    pub history_hook: Mutex<Option<HistoryHook>>,
    /// Broker subscribe and history reads of channels starting with this fail (engine down).
    pub fail_prefix: Mutex<Option<String>>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
}

impl std::fmt::Debug for FaultyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultyEngine")
    }
}

#[derive(Debug)]
struct Filter {
    prefix: String,
    offsets: Vec<u64>,
    next: Arc<dyn BrokerHandler>,
}

impl BrokerHandler for Filter {
    fn on_publication(&self, channel: &str, p: &Arc<Publication>, epoch: &Arc<str>) {
        if channel.starts_with(&self.prefix) && self.offsets.contains(&p.offset) {
            return;
        }
        self.next.on_publication(channel, p, epoch);
    }
    fn on_join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.next.on_join(channel, info);
    }
    fn on_leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.next.on_leave(channel, info);
    }
    fn on_control(&self, data: &[u8]) {
        self.next.on_control(data);
    }
}

impl FaultyEngine {
    pub fn set_hook(&self, hook: impl Fn(&str, Stage) -> Option<Fut> + Send + Sync + 'static) {
        *self.history_hook.lock().unwrap() = Some(Box::new(hook));
    }

    fn failing(&self, channel: &str) -> Result<(), EngineError> {
        match &*self.fail_prefix.lock().unwrap() {
            Some(p) if channel.starts_with(p.as_str()) => {
                Err(EngineError::Unavailable("injected failure".into()))
            }
            _ => Ok(()),
        }
    }

    pub fn new(drop_prefix: &str, drop_offsets: Vec<u64>) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryEngine::new(),
            drop_prefix: drop_prefix.into(),
            drop_offsets,
            history_hook: Mutex::new(None),
            fail_prefix: Mutex::new(None),
            handler: OnceLock::new(),
        })
    }
}

#[async_trait]
impl Broker for FaultyEngine {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler.clone());
        self.inner.set_handler(Arc::new(Filter {
            prefix: self.drop_prefix.clone(),
            offsets: self.drop_offsets.clone(),
            next: handler,
        }));
    }
    async fn publish(
        &self,
        ch: &str,
        p: Publication,
        o: &PublishOptions,
    ) -> Result<PublishOutcome, EngineError> {
        self.inner.publish(ch, p, o).await
    }
    async fn publish_join(&self, ch: &str, i: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.inner.publish_join(ch, i).await
    }
    async fn publish_leave(&self, ch: &str, i: Arc<ClientInfo>) -> Result<(), EngineError> {
        self.inner.publish_leave(ch, i).await
    }
    async fn subscribe(&self, ch: &str) -> Result<(), EngineError> {
        self.failing(ch)?;
        self.inner.subscribe(ch).await
    }
    async fn unsubscribe(&self, ch: &str) -> Result<(), EngineError> {
        self.inner.unsubscribe(ch).await
    }
    async fn history(&self, ch: &str, q: &HistoryQuery) -> Result<HistoryPage, EngineError> {
        self.failing(ch)?;
        let before = self
            .history_hook
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|h| h(ch, Stage::Before));
        if let Some(f) = before {
            f.await;
        }
        let page = self.inner.history(ch, q).await;
        let after = self
            .history_hook
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|h| h(ch, Stage::After));
        if let Some(f) = after {
            f.await;
        }
        page
    }
    async fn publish_control(&self, data: bytes::Bytes) -> Result<(), EngineError> {
        self.inner.publish_control(data).await
    }
    async fn remove_history(&self, ch: &str) -> Result<(), EngineError> {
        self.inner.remove_history(ch).await
    }
}
