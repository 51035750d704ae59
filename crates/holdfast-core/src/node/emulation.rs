//! Bidirectional emulation: an HTTP-streaming or SSE connection receives its client's frames
//! through separate `/emulation` requests naming the connection's session and node. A request
//! that reaches another node (a load balancer without stickiness) is forwarded to the owning
//! node over the control plane, which answers whether the frame was taken.

use super::*;
use control::B64;

/// Where an emulated connection's incoming frames go: a bounded queue read by its session.
pub type EmulationInbox = tokio::sync::mpsc::Sender<Bytes>;

/// How long an `/emulation` frame may wait for room in a session's queue (a client sending
/// faster than its session handles commands) before it is refused.
const INBOX_WAIT: Duration = Duration::from_secs(1);
/// How long a node waits for the owning node's answer to a forwarded frame.
const FORWARD_WAIT: Duration = Duration::from_secs(2);

/// What became of an `/emulation` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmulationOutcome {
    /// Queued for the session.
    Taken,
    /// No such session on the owning node (closed, or never existed).
    UnknownSession,
    /// The owning node is not known, or did not answer.
    UnknownNode,
    /// The session's queue stayed full: the client sends faster than its commands are handled.
    Busy,
}

/// Keeps an emulated session reachable; dropping it (the connection ended) removes it.
#[derive(Debug)]
pub struct EmulationRegistration {
    node: Node,
    session: Arc<str>,
}

impl Drop for EmulationRegistration {
    fn drop(&mut self) {
        self.node.inner.emulation.lock().remove(&self.session);
    }
}

impl Node {
    /// Makes an emulated connection's session reachable by `/emulation` requests, on this node
    /// and (forwarded) from others, while the returned registration lives.
    pub fn register_emulation(
        &self,
        session: Arc<str>,
        inbox: EmulationInbox,
    ) -> EmulationRegistration {
        self.inner.emulation.lock().insert(session.clone(), inbox);
        EmulationRegistration {
            node: self.clone(),
            session,
        }
    }

    /// Emulated sessions open on this node.
    pub fn emulation_sessions(&self) -> usize {
        self.inner.emulation.lock().len()
    }

    /// Delivers an `/emulation` frame to session `session` of node `node` (this node, or
    /// another one over the control plane).
    pub async fn emulate(&self, node: &str, session: &str, data: Bytes) -> EmulationOutcome {
        if node.is_empty() || node == self.id() {
            return self.emulate_here(session, data).await;
        }
        if !self.inner.broker.distributed() {
            return EmulationOutcome::UnknownNode;
        }
        let id: u64 = rand::random();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.emulation_acks.lock().insert(id, tx);
        let sent = self
            .control(NodeCommand::Emulation {
                id,
                origin: self.id().to_owned(),
                target: node.to_owned(),
                session: session.to_owned(),
                data: B64(data),
            })
            .await;
        let outcome = match sent {
            Ok(()) => tokio::time::timeout(FORWARD_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(EmulationOutcome::UnknownNode),
            Err(e) => {
                tracing::warn!(error = ?e, "emulation frame not forwarded");
                EmulationOutcome::UnknownNode
            }
        };
        self.inner.emulation_acks.lock().remove(&id);
        metrics::counter!("holdfast_emulation_forwarded_total").increment(1);
        outcome
    }

    async fn emulate_here(&self, session: &str, data: Bytes) -> EmulationOutcome {
        let Some(inbox) = self.inner.emulation.lock().get(session).cloned() else {
            return EmulationOutcome::UnknownSession;
        };
        match inbox.send_timeout(data, INBOX_WAIT).await {
            Ok(()) => EmulationOutcome::Taken,
            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => {
                EmulationOutcome::UnknownSession
            }
            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => EmulationOutcome::Busy,
        }
    }

    /// A forwarded frame for one of this node's sessions: deliver it and answer the origin.
    pub(super) fn emulation_forwarded(
        &self,
        id: u64,
        origin: String,
        target: &str,
        session: String,
        data: Bytes,
    ) {
        if target != self.id() {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let outcome = node.emulate_here(&session, data).await;
            if let Err(e) = node
                .control(NodeCommand::EmulationReply {
                    id,
                    target: origin,
                    outcome,
                })
                .await
            {
                tracing::debug!(error = ?e, "emulation answer not sent");
            }
        });
    }

    /// The owning node's answer to a frame this node forwarded.
    pub(super) fn emulation_answered(&self, id: u64, target: &str, outcome: EmulationOutcome) {
        if target == self.id()
            && let Some(tx) = self.inner.emulation_acks.lock().remove(&id)
        {
            let _ = tx.send(outcome);
        }
    }
}
