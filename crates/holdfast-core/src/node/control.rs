//! The control plane between nodes: API commands aimed at users wherever they are connected
//! (disconnect, unsubscribe, subscribe, refresh), heartbeats and `Hello`, and `channels`
//! surveys. Messages are JSON in a versioned envelope (`{"v":1,"cmd":{"t":…}}`); a node ignores,
//! and logs, a message of another version (during a rolling upgrade across versions, commands
//! between old and new nodes are dropped until every node runs the same version).

use super::*;
use base64::Engine as _;

/// Version of the messages between nodes.
const CONTROL_VERSION: u32 = 1;

impl Node {
    fn target_clients(&self, user: &str, client: Option<&str>) -> Vec<Arc<ClientHandle>> {
        match client.filter(|c| !c.is_empty()) {
            Some(id) => self
                .inner
                .hub
                .client(id)
                .into_iter()
                .filter(|c| c.user() == user)
                .collect(),
            None => self.inner.hub.user_clients(user),
        }
    }

    /// Closes a user's connections (or one of them), except those in `whitelist`, on every
    /// node.
    pub async fn disconnect_user(
        &self,
        user: &str,
        client: Option<&str>,
        whitelist: &[String],
        disconnect: Disconnect,
    ) -> Result<(), ErrorReply> {
        self.control(NodeCommand::Disconnect {
            user: user.into(),
            client: client.map(Into::into),
            whitelist: whitelist.to_vec(),
            code: disconnect.code,
            reason: disconnect.reason.into_owned(),
        })
        .await
    }

    /// Unsubscribes a user's connections (or one of them) from a channel, with an `unsubscribe`
    /// push, on every node: code 2000 (the client stays unsubscribed), or with `invalidate`
    /// 2502 (state invalidated: the client drops what it kept and subscribes afresh).
    pub async fn unsubscribe_user(
        &self,
        user: &str,
        channel: &str,
        client: Option<&str>,
        invalidate: bool,
    ) -> Result<(), ErrorReply> {
        self.control(NodeCommand::Unsubscribe {
            user: user.into(),
            channel: channel.into(),
            client: client.map(Into::into),
            invalidate,
        })
        .await
    }

    /// Subscribes a user's live connections (or one of them) to a channel, with a `subscribe`
    /// push, on every node.
    pub async fn subscribe_user(
        &self,
        user: &str,
        client: Option<&str>,
        sub: ServerSubscribe,
    ) -> Result<(), ErrorReply> {
        self.inner.rules.resolve(&sub.channel)?;
        self.control(NodeCommand::Subscribe {
            user: user.into(),
            client: client.map(Into::into),
            channel: sub.channel,
            info: sub.info.map(B64),
            data: sub.data.map(B64),
            recover: sub.recover_since,
            overrides: sub.overrides,
        })
        .await
    }

    /// Sets the expiry of a user's connections (or one of them) on every node. `expire_at`
    /// None = never; `expired` closes them with 3005.
    pub async fn refresh_user(
        &self,
        user: &str,
        client: Option<&str>,
        expired: bool,
        expire_at: Option<i64>,
        info: Option<Bytes>,
    ) -> Result<(), ErrorReply> {
        self.control(NodeCommand::Refresh {
            user: user.into(),
            client: client.map(Into::into),
            expired,
            expire_at,
            info: info.map(B64),
        })
        .await
    }

    pub(super) async fn control(&self, cmd: NodeCommand) -> Result<(), ErrorReply> {
        let data = Envelope::encode(cmd).map_err(|_| ErrorReply::INTERNAL)?;
        self.inner
            .broker
            .publish_control(data.into())
            .await
            .map_err(engine_error)
    }

    /// This node's description, for `info`.
    pub fn info(&self) -> NodeInfo {
        let c = &self.inner.hub.counts;
        NodeInfo {
            uid: self.inner.id.to_string(),
            name: self.inner.name.clone(),
            version: self.inner.version.clone(),
            num_clients: c.clients.load(Ordering::Relaxed),
            num_users: c.users.load(Ordering::Relaxed),
            num_channels: c.channels.load(Ordering::Relaxed),
            num_subs: c.subscriptions.load(Ordering::Relaxed),
            uptime: self.uptime().as_secs(),
        }
    }

    /// Every live node (this one first): peers heard from in the last 7 s.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut out = vec![self.info()];
        let now = std::time::Instant::now();
        let mut peers = self.inner.peers.lock();
        peers.retain(|_, (_, seen)| now.duration_since(*seen) < PEER_TTL);
        out.extend(peers.values().map(|(i, _)| i.clone()));
        out
    }

    /// Channels with subscribers on any node, with their subscriber counts, filtered.
    pub async fn channels(
        &self,
        pattern: &str,
        filter: impl Fn(&str) -> bool,
    ) -> Vec<(String, usize)> {
        let mut all: std::collections::BTreeMap<String, usize> =
            self.inner.hub.channels(&filter).into_iter().collect();
        let peers = self.nodes().len() - 1;
        if self.inner.broker.distributed() && peers > 0 {
            let id: u64 = rand::random();
            let (tx, mut rx) = tokio::sync::mpsc::channel(peers.max(1));
            self.inner.surveys.lock().insert(id, tx);
            let asked = self
                .control(NodeCommand::Survey {
                    id,
                    origin: self.inner.id.to_string(),
                    pattern: pattern.into(),
                })
                .await;
            if asked.is_ok() {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                for _ in 0..peers {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(chans)) => {
                            for (ch, n) in chans {
                                *all.entry(ch).or_default() += n;
                            }
                        }
                        _ => break,
                    }
                }
            }
            self.inner.surveys.lock().remove(&id);
        }
        all.into_iter().collect()
    }

    pub(super) fn apply_control(&self, data: &[u8]) {
        let Some(cmd) = Envelope::decode(data) else {
            return;
        };
        match cmd {
            NodeCommand::Disconnect {
                user,
                client,
                whitelist,
                code,
                reason,
            } => {
                let d = Disconnect::new(code, reason);
                for c in self.target_clients(&user, client.as_deref()) {
                    if !whitelist.iter().any(|w| w == c.id()) {
                        c.close(d.clone());
                    }
                }
            }
            NodeCommand::Unsubscribe {
                user,
                channel,
                client,
                invalidate,
            } => {
                let (code, reason) = if invalidate {
                    holdfast_protocol::code::unsubscribe::STATE_INVALIDATED
                } else {
                    holdfast_protocol::code::unsubscribe::SERVER
                };
                for c in self.target_clients(&user, client.as_deref()) {
                    c.push_control(Control::Unsubscribe {
                        channel: channel.clone(),
                        code,
                        reason: reason.to_owned(),
                    });
                }
            }
            NodeCommand::Subscribe {
                user,
                client,
                channel,
                info,
                data,
                recover,
                overrides,
            } => {
                let sub = ServerSubscribe {
                    channel,
                    info: info.map(|b| b.0),
                    data: data.map(|b| b.0),
                    recover_since: recover,
                    overrides,
                };
                for c in self.target_clients(&user, client.as_deref()) {
                    c.push_control(Control::Subscribe(Box::new(sub.clone())));
                }
            }
            NodeCommand::Refresh {
                user,
                client,
                expired,
                expire_at,
                info,
            } => {
                for c in self.target_clients(&user, client.as_deref()) {
                    if expired {
                        c.close(Disconnect::EXPIRED);
                    } else {
                        c.push_control(Control::Refresh {
                            expire_at,
                            info: info.clone().map(|b| b.0),
                        });
                    }
                }
            }
            NodeCommand::Node(info) => {
                if info.uid != *self.inner.id {
                    self.inner
                        .peers
                        .lock()
                        .insert(info.uid.clone(), (info, std::time::Instant::now()));
                }
            }
            NodeCommand::Gone { uid } => {
                self.inner.peers.lock().remove(&uid);
            }
            NodeCommand::Hello { origin } => {
                if origin == *self.inner.id || !self.is_ready() {
                    return;
                }
                let node = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.control(NodeCommand::Node(node.info())).await {
                        tracing::debug!(error = ?e, "announcement not sent");
                    }
                });
            }
            NodeCommand::Survey {
                id,
                origin,
                pattern,
            } => {
                if origin == *self.inner.id {
                    return;
                }
                let node = self.clone();
                tokio::spawn(async move {
                    let channels = node
                        .inner
                        .hub
                        .channels(|ch| crate::glob::glob_match(pattern.as_bytes(), ch.as_bytes()));
                    let _ = node
                        .control(NodeCommand::SurveyReply {
                            id,
                            target: origin,
                            channels,
                        })
                        .await;
                });
            }
            NodeCommand::Emulation {
                id,
                origin,
                target,
                session,
                data,
            } => self.emulation_forwarded(id, origin, &target, session, data.0),
            NodeCommand::EmulationReply {
                id,
                target,
                outcome,
            } => self.emulation_answered(id, &target, outcome),
            NodeCommand::SurveyReply {
                id,
                target,
                channels,
            } => {
                if target == *self.inner.id
                    && let Some(tx) = self.inner.surveys.lock().get(&id)
                {
                    let _ = tx.try_send(channels);
                }
            }
        }
    }
}

/// Bytes as base64 in a control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct B64(pub(super) Bytes);

impl serde::Serialize for B64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for B64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(|v| B64(v.into()))
            .map_err(serde::de::Error::custom)
    }
}

/// A control message: the version and the command.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Envelope {
    v: u32,
    cmd: NodeCommand,
}

/// Just the version, read first.
#[derive(serde::Deserialize)]
struct Version {
    v: u32,
}

impl Envelope {
    pub(super) fn encode(cmd: NodeCommand) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&Envelope {
            v: CONTROL_VERSION,
            cmd,
        })
    }

    /// The command of a message of this version; `None` (logged) otherwise.
    pub(super) fn decode(data: &[u8]) -> Option<NodeCommand> {
        match serde_json::from_slice::<Version>(data) {
            Ok(Version { v }) if v == CONTROL_VERSION => {}
            Ok(Version { v }) => {
                tracing::warn!(
                    version = v,
                    ours = CONTROL_VERSION,
                    "control message of another version ignored"
                );
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable control message");
                return None;
            }
        }
        match serde_json::from_slice::<Envelope>(data) {
            Ok(e) => Some(e.cmd),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable control message");
                None
            }
        }
    }
}

/// Where replies to one `channels` survey go.
pub(super) type SurveyReplies = tokio::sync::mpsc::Sender<Vec<(String, usize)>>;

/// How long a peer counts as alive after its last heartbeat.
pub(super) const PEER_TTL: Duration = Duration::from_secs(7);
/// How often a node announces itself to its peers.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(3);

/// A node as `info` lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node id.
    pub uid: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Connections.
    pub num_clients: u64,
    /// Distinct users.
    pub num_users: u64,
    /// Channels with local subscribers.
    pub num_channels: u64,
    /// Subscriptions.
    pub num_subs: u64,
    /// Seconds since start.
    pub uptime: u64,
}

/// Commands between nodes (JSON over the engine's control channel, in an [`Envelope`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(super) enum NodeCommand {
    /// An `/emulation` frame for a session of node `target`, received by node `origin`.
    Emulation {
        id: u64,
        origin: String,
        target: String,
        session: String,
        data: B64,
    },
    /// The owning node's answer to [`NodeCommand::Emulation`].
    EmulationReply {
        id: u64,
        target: String,
        outcome: super::EmulationOutcome,
    },
    Disconnect {
        user: String,
        client: Option<String>,
        whitelist: Vec<String>,
        code: u16,
        reason: String,
    },
    Unsubscribe {
        user: String,
        channel: String,
        client: Option<String>,
        /// State invalidation: code 2502, the client drops its position, delta base and
        /// token and subscribes afresh (nodes before it read the command without it: 2000).
        #[serde(default)]
        invalidate: bool,
    },
    Subscribe {
        user: String,
        client: Option<String>,
        channel: String,
        info: Option<B64>,
        data: Option<B64>,
        recover: Option<(u64, String)>,
        overrides: crate::handler::ChannelOverride,
    },
    Refresh {
        user: String,
        client: Option<String>,
        expired: bool,
        expire_at: Option<i64>,
        info: Option<B64>,
    },
    Gone {
        uid: String,
    },
    Node(NodeInfo),
    /// A node has just started: every other node announces itself ([`NodeCommand::Node`]).
    Hello {
        origin: String,
    },
    Survey {
        id: u64,
        origin: String,
        pattern: String,
    },
    SurveyReply {
        id: u64,
        target: String,
        channels: Vec<(String, usize)>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_typed_and_versioned() {
        let cmd = NodeCommand::Subscribe {
            user: "u".into(),
            client: None,
            channel: "c".into(),
            info: Some(B64(Bytes::from_static(b"{\"a\":1}"))),
            data: None,
            recover: Some((5, "abc".into())),
            overrides: crate::handler::ChannelOverride {
                presence: Some(true),
                ..Default::default()
            },
        };
        let wire = Envelope::encode(cmd).expect("encode");
        let text = String::from_utf8_lossy(&wire).into_owned();
        assert!(text.starts_with("{\"v\":1,"), "{text}");
        assert!(
            text.contains("\"presence\":true"),
            "overrides by name: {text}"
        );
        assert!(
            text.contains("\"info\":\"eyJhIjoxfQ==\""),
            "bytes as base64: {text}"
        );
        match Envelope::decode(&wire) {
            Some(NodeCommand::Subscribe {
                info, overrides, ..
            }) => {
                assert_eq!(info.map(|b| b.0), Some(Bytes::from_static(b"{\"a\":1}")));
                assert_eq!(overrides.presence, Some(true));
                assert_eq!(overrides.join_leave, None);
            }
            other => panic!("{other:?}"),
        }
        let other = text.replacen("{\"v\":1,", "{\"v\":2,", 1);
        assert!(
            Envelope::decode(other.as_bytes()).is_none(),
            "another version is ignored"
        );
        assert!(Envelope::decode(b"garbage").is_none());
    }
}
