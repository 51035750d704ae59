//! Channel names: namespaces, private and user-limited channels.

use crate::config::{ChannelConfig, ChannelOptions, NodeConfig};
use holdfast_protocol::ErrorReply;
use std::collections::HashMap;
use std::sync::Arc;

/// Namespace boundary: `ns:rest`.
pub const NAMESPACE_BOUNDARY: char = ':';
/// User boundary: `dialog#42,43`.
pub const USER_BOUNDARY: char = '#';
/// Separates users in a user-limited channel.
pub const USER_SEPARATOR: char = ',';
/// Prefix of private channels, which need a subscription token.
pub const PRIVATE_PREFIX: char = '$';

/// Resolves channel names to their namespace options.
#[derive(Debug, Clone)]
pub struct ChannelRules {
    without_namespace: Arc<ChannelOptions>,
    namespaces: HashMap<String, Arc<ChannelOptions>>,
    max_length: usize,
    meta_ttl_default: std::time::Duration,
}

/// What the rules say about one channel.
#[derive(Debug, Clone)]
pub struct ResolvedChannel {
    /// Options of the channel's namespace.
    pub options: Arc<ChannelOptions>,
    /// The name starts with `$`.
    pub private: bool,
}

impl ChannelRules {
    /// Builds the lookup from configuration.
    pub fn new(cfg: &ChannelConfig) -> Self {
        Self {
            without_namespace: Arc::new(cfg.without_namespace.clone()),
            namespaces: cfg
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), Arc::new(n.clone())))
                .collect(),
            max_length: cfg.max_length,
            meta_ttl_default: cfg.history_meta_ttl,
        }
    }

    /// Namespace options of `channel`: 107 for an empty, too long, or control-character name;
    /// 102 for an unknown namespace.
    pub fn resolve(&self, channel: &str) -> Result<ResolvedChannel, ErrorReply> {
        if channel.is_empty() || channel.len() > self.max_length {
            return Err(ErrorReply::BAD_REQUEST);
        }
        if channel.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(ErrorReply::BAD_REQUEST);
        }
        let private = channel.starts_with(PRIVATE_PREFIX);
        let rest = channel.strip_prefix(PRIVATE_PREFIX).unwrap_or(channel);
        let options = match rest.split_once(NAMESPACE_BOUNDARY) {
            Some((ns, _)) => self
                .namespaces
                .get(ns)
                .cloned()
                .ok_or(ErrorReply::UNKNOWN_CHANNEL)?,
            None => self.without_namespace.clone(),
        };
        Ok(ResolvedChannel { options, private })
    }

    /// The rules a node applies: those of [`ChannelRules::new`], and in the namespace that holds
    /// personal channels (`client.subscribe_to_user_personal_channel`), every channel with a
    /// `#` is user-limited whatever the namespace says, so `#43` is user 43's alone.
    pub fn for_node(cfg: &NodeConfig) -> Self {
        let mut rules = Self::new(&cfg.channel);
        let personal = &cfg.client.subscribe_to_user_personal_channel;
        if personal.enabled {
            let ns = &personal.personal_channel_namespace;
            let slot = if ns.is_empty() {
                Some(&mut rules.without_namespace)
            } else {
                rules.namespaces.get_mut(ns.as_str())
            };
            if let Some(options) = slot {
                Arc::make_mut(options).allow_user_limited_channels = true;
            }
        }
        rules
    }

    /// Lifetime of a stream's meta for channels of these options.
    pub fn meta_ttl(&self, options: &ChannelOptions) -> std::time::Duration {
        options
            .history_meta_ttl
            .unwrap_or(self.meta_ttl_default)
            .max(options.history_ttl)
    }

    /// The personal channel of `user` (`[ns:]#user`).
    pub fn personal_channel(namespace: &str, user: &str) -> String {
        if namespace.is_empty() {
            format!("{USER_BOUNDARY}{user}")
        } else {
            format!("{namespace}{NAMESPACE_BOUNDARY}{USER_BOUNDARY}{user}")
        }
    }
}

impl ResolvedChannel {
    /// Whether `user` must be refused any client access to `channel` (subscribe, publish,
    /// history, presence): the channel is user-limited in its namespace (always so for personal
    /// channels) and does not name `user`. Anonymous users are refused every such channel.
    pub fn refuses_user(&self, channel: &str, user: &str) -> bool {
        self.options.allow_user_limited_channels
            && user_limited_allows(channel, user) == Some(false)
    }
}

/// Whether `user` is one of the users a user-limited channel names (`chat:dialog#42,43`).
/// `None` when the channel is not user-limited.
pub fn user_limited_allows(channel: &str, user: &str) -> Option<bool> {
    let (_, users) = channel.rsplit_once(USER_BOUNDARY)?;
    Some(!user.is_empty() && users.split(USER_SEPARATOR).any(|u| u == user))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ChannelRules {
        let mut cfg = ChannelConfig::default();
        cfg.without_namespace.presence = true;
        cfg.namespaces.push(ChannelOptions {
            name: "chat".into(),
            join_leave: true,
            ..Default::default()
        });
        ChannelRules::new(&cfg)
    }

    #[test]
    fn namespaces() {
        let r = rules();
        assert!(r.resolve("news").expect("no ns").options.presence);
        assert!(r.resolve("chat:index").expect("chat").options.join_leave);
        assert!(r.resolve("$chat:secret").expect("private").private);
        assert_eq!(
            r.resolve("nope:x").unwrap_err(),
            ErrorReply::UNKNOWN_CHANNEL
        );
        assert_eq!(r.resolve("").unwrap_err(), ErrorReply::BAD_REQUEST);
        assert_eq!(
            r.resolve(&"a".repeat(256)).unwrap_err(),
            ErrorReply::BAD_REQUEST
        );
        assert_eq!(r.resolve("a\nb").unwrap_err(), ErrorReply::BAD_REQUEST);
    }

    #[test]
    fn personal_namespace_is_always_user_limited() {
        let mut cfg = NodeConfig::default();
        cfg.channel.without_namespace.allow_subscribe_for_client = true;
        cfg.channel.namespaces.push(ChannelOptions {
            name: "chat".into(),
            allow_subscribe_for_client: true,
            ..Default::default()
        });
        let open = ChannelRules::for_node(&cfg);
        let r = open.resolve("#43").expect("resolves");
        assert!(!r.refuses_user("#43", "42"), "personal channels are off");
        cfg.client.subscribe_to_user_personal_channel.enabled = true;
        let rules = ChannelRules::for_node(&cfg);
        let r = rules.resolve("#43").expect("resolves");
        assert!(r.refuses_user("#43", "42"));
        assert!(r.refuses_user("#43", ""), "anonymous");
        assert!(!r.refuses_user("#43", "43"));
        assert!(!r.refuses_user("news", "42"), "no # boundary");
        let p = rules.resolve("$#43").expect("private");
        assert!(p.refuses_user("$#43", "42"));
        let chat = rules.resolve("chat:#43").expect("chat");
        assert!(
            !chat.refuses_user("chat:#43", "42"),
            "other namespaces keep their option"
        );
        cfg.client
            .subscribe_to_user_personal_channel
            .personal_channel_namespace = "chat".into();
        let rules = ChannelRules::for_node(&cfg);
        assert!(
            rules
                .resolve("chat:#43")
                .expect("chat")
                .refuses_user("chat:#43", "42")
        );
        assert!(
            !rules
                .resolve("#43")
                .expect("no ns")
                .refuses_user("#43", "42")
        );
    }

    #[test]
    fn user_limited() {
        assert_eq!(user_limited_allows("dialog#42,43", "42"), Some(true));
        assert_eq!(user_limited_allows("dialog#42,43", "4"), Some(false));
        assert_eq!(user_limited_allows("#42", ""), Some(false));
        assert_eq!(user_limited_allows("news", "42"), None);
        assert_eq!(ChannelRules::personal_channel("", "42"), "#42");
        assert_eq!(
            ChannelRules::personal_channel("personal", "42"),
            "personal:#42"
        );
    }
}
