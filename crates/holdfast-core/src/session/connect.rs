//! `connect`: the first command. Authenticates, registers the connection, attaches the
//! server-side subscriptions (the personal channel, token `channels`), replies, goes live.

use super::*;

/// Characters of a client's SDK name and version kept for operators.
const MAX_CLIENT_NAME: usize = 64;

impl Session {
    pub(super) async fn connect(&mut self, id: u32, req: ConnectRequest) -> Result<(), Disconnect> {
        if !self.node.is_ready() {
            return Err(Disconnect::SHUTDOWN);
        }
        if req.name.len() > 64 || req.version.len() > 64 || req.subs.len() > 1024 {
            tracing::info!(client = %self.client.id(), "connect name, version or subs too long");
            return Err(Disconnect::BAD_REQUEST);
        }
        // The node (a cheap handle) lends its configuration: no copy per connect.
        let node = self.node.clone();
        let cfg = node.config();
        let ev = ConnectEvent {
            client: self.client.id.clone(),
            transport: self.transport,
            encoding: self.client.encoding(),
            token: req.token.clone(),
            data: req.data.clone(),
            name: req.name.clone(),
            version: req.version.clone(),
            headers: req.headers.clone(),
            http_headers: self.headers.clone(),
        };
        let decision = match self.node.hooks().connect.on_connecting(&ev).await {
            Ok(d) => d,
            Err(HandlerError::Reply(e)) => {
                self.reply_error(id, e);
                self.state = State::Unusable;
                return Ok(());
            }
            Err(HandlerError::Disconnect(d)) => return Err(d),
        };
        if decision.expire_at.is_some_and(|e| e <= unix_secs()) {
            self.reply_error(id, ErrorReply::EXPIRED);
            self.state = State::Unusable;
            return Ok(());
        }
        let user: Arc<str> = decision.user.as_str().into();
        let mut subs = decision.subs;
        let personal = &cfg.client.subscribe_to_user_personal_channel;
        if personal.enabled && !user.is_empty() {
            subs.entry(ChannelRules::personal_channel(
                &personal.personal_channel_namespace,
                &user,
            ))
            .or_default();
        }
        if subs.len() > cfg.client.channel_limit {
            return Err(Disconnect::CHANNEL_LIMIT);
        }
        // Resolve every server-side channel before registering anything.
        let mut resolved = Vec::with_capacity(subs.len());
        for (ch, opts) in subs {
            match self.node.rules().resolve(&ch) {
                Ok(r) => resolved.push((ch, opts, r)),
                Err(e) => {
                    tracing::info!(client = %self.client.id(), channel = %ch, code = e.code, "bad server-side channel");
                    self.reply_error(id, e);
                    self.state = State::Unusable;
                    return Ok(());
                }
            }
        }
        self.client.set_user(user.clone());
        let others = self
            .node
            .hub()
            .add_client(&self.client, &user, cfg.client.user_connection_limit)
            .map_err(|_| Disconnect::CONNECTION_LIMIT)?;
        if personal.single_connection && !user.is_empty() {
            for o in others {
                o.close(Disconnect::CONNECTION_LIMIT);
            }
        }
        let info = Arc::new(ClientInfo {
            user: user.clone(),
            client: self.client.id.clone(),
            conn_info: decision.info.clone(),
            chan_info: None,
        });
        self.state = State::Connected(Box::new(Connected {
            ctx: ClientContext {
                client: self.client.id.clone(),
                user: user.clone(),
                transport: self.transport,
                encoding: self.client.encoding(),
                conn_info: decision.info,
                meta: decision.meta,
                headers: self.headers.clone(),
            },
            info,
            subs: HashMap::new(),
            refresh_at: None,
            // centrifuge-js decodes protobuf int64 as objects and compares them by identity,
            // so it drops every push named by a compaction id: it never gets one.
            no_compaction: self.client.encoding() == Encoding::Protobuf && req.name == "js",
        }));
        if req.name == "js" {
            // centrifuge-js can reorder the messages of a joined frame (see the handle's note).
            self.client.set_single_message_frames();
        }
        self.client.set_details(crate::client::ConnectionDetails {
            transport: self.transport,
            name: req.name.chars().take(MAX_CLIENT_NAME).collect(),
            version: req.version.chars().take(MAX_CLIENT_NAME).collect(),
            ip: self.ip,
            connected_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        tracing::debug!(client = %self.client.id(), user = %user, "connected");
        self.node
            .hub()
            .tracer
            .offer(None, Some(&user), || crate::trace::TraceEvent::Connect {
                user: user.clone(),
                client: self.client.id.clone(),
                transport: self.transport,
                name: req.name.chars().take(MAX_CLIENT_NAME).collect(),
            });

        let mut attached = Vec::new();
        for (ch, opts, r) in resolved {
            let options = opts.overrides.apply(&r.options);
            let history = options.history_enabled();
            let presented = req.subs.get(&ch).filter(|p| p.recover);
            let cursor = options.delivery_cursor && history && !user.is_empty();
            // Recoverable server-side subscriptions recover from the position the client
            // presents. A client that presents none starts at the current top, as on Centrifugo,
            // unless the namespace keeps delivery cursors: then it recovers from the user's
            // cursor (what reached the user on any device) or else from the stream start, so
            // what was published to a user before (or between) their connections is delivered.
            let saved = match (presented, cursor) {
                (None, true) => self.node.cursors().load_cursor(&user, &ch).await.unwrap_or_else(|e| {
                    tracing::warn!(channel = %ch, error = %e, "cursor load failed; recovering from the stream start");
                    None
                }),
                _ => None,
            };
            let cursor_from = saved.as_ref().map_or(0, |c| c.offset);
            let recover = match (presented, saved) {
                (Some(p), _) => Some((p.offset, p.epoch.clone())),
                (None, Some(c)) => Some((c.offset, c.epoch.to_string())),
                (None, None) => cursor.then(|| (0, String::new())),
            }
            .filter(|_| history && options.force_recovery);
            let mut plan = Plan::server_side(&ch, options, recover, opts.data, opts.info);
            plan.cursor = cursor;
            plan.cursor_from = cursor_from;
            match self.attach(plan).await {
                Ok(a) => attached.push(a),
                Err(e) => {
                    for a in attached {
                        a.abandon().await;
                    }
                    self.node.hub().remove_client(&self.client, &user);
                    self.state = State::Unusable;
                    self.reply_error(id, e);
                    return Ok(());
                }
            }
        }
        let (ping, pong) = (
            cfg.client.ping_interval.as_secs() as u32,
            !cfg.client.pong_timeout.is_zero() && !self.kind.is_unidirectional(),
        );
        let mut result = ConnectResult {
            client: self.client.id.to_string(),
            version: self.node.version().to_string(),
            data: decision.data,
            ping,
            pong,
            session: self
                .kind
                .session()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            node: match self.kind {
                crate::transport::ConnectionKind::Emulation { .. } => self.node.id().to_owned(),
                _ => String::new(),
            },
            time: if cfg.client.connect_include_server_time {
                crate::time::unix_ms()
            } else {
                0
            },
            ..Default::default()
        };
        // With server-side refresh the client is not told about expiry: the server renews it.
        let server_refresh =
            decision.expire_at.is_some() && self.node.hooks().refresh.refreshes_connections();
        if let Some(exp) = decision.expire_at.filter(|_| !server_refresh) {
            result.expires = true;
            result.ttl = (exp - unix_secs()).clamp(0, i64::from(u32::MAX)) as u32;
        }
        result.subs = attached
            .iter()
            .map(|a| (a.channel().to_string(), a.result().clone()))
            .collect();
        if !attached
            .iter()
            .all(|a| sendable(self.client.encoding(), &a.result().publications))
        {
            for a in attached {
                a.abandon().await;
            }
            return Err(Disconnect::INAPPROPRIATE_PROTOCOL);
        }
        // A unidirectional client gets its result as a `connect` push (no id).
        let reply_id = if self.kind.is_unidirectional() { 0 } else { id };
        self.reply(reply_id, ReplyBody::Connect(Box::new(result)));
        if server_refresh {
            if let Ok(conn) = self.conn_mut() {
                conn.refresh_at = decision.expire_at.map(at_unix);
            }
        } else {
            self.set_expiry(decision.expire_at);
        }
        self.client.set_connected();
        self.node
            .hooks()
            .lifecycle(crate::handler::LifecycleEvent::Connected {
                client: self.client.id.clone(),
                user: user.clone(),
                transport: self.transport,
            });
        for a in attached {
            self.go_live(a).await;
        }
        Ok(())
    }
}
