//! Reading a configuration: the file (TOML, or a Centrifugo `config.json`), then `HOLDFAST_*`
//! environment variables, then `key=value` overrides; errors name the key, unknown keys are
//! reported by name.

use super::*;
use anyhow::{Context, bail};
use serde_json::{Map, Value};
use std::path::Path;

/// A loaded configuration and the keys it did not understand.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Keys present in the file, environment or flags that Holdfast does not support.
    pub unknown: Vec<String>,
}

/// Reads the file (TOML, or JSON for `.json`), applies `HOLDFAST_*` variables from `env` and the
/// `key=value` overrides, and deserialises.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> anyhow::Result<Loaded> {
    let mut tree = match path {
        Some(p) => read_file(p)?,
        None => Value::Object(Map::new()),
    };
    if !tree.is_object() {
        bail!("the configuration must be a table of settings");
    }
    let defaults = serde_json::to_value(Config::default()).context("default config")?;
    let mut leaves = Vec::new();
    collect_leaves(&defaults, String::new(), &mut leaves);
    let sections: Vec<String> = defaults
        .as_object()
        .map(|m| m.keys().map(|k| k.to_uppercase()).collect())
        .unwrap_or_default();
    let mut unknown = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if matches!(rest, "CONFIG") {
            continue;
        }
        match leaves.iter().find(|(p, _)| env_name(p) == name) {
            Some((path, default)) => set_path(&mut tree, path, parse_like(default, &value))?,
            // Only names inside a known section are reported (likely typos); other HOLDFAST_*
            // variables belong to scripts and tools.
            None if sections.iter().any(|s| rest.starts_with(&format!("{s}_"))) => {
                unknown.push(format!("environment variable {name}"));
            }
            None => {}
        }
    }
    for (key, value) in overrides {
        let default = leaves.iter().find(|(p, _)| p == key).map(|(_, d)| d);
        let v = match default {
            Some(d) => parse_like(d, value),
            None => serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.clone())),
        };
        set_path(&mut tree, key, v)?;
    }
    let config: Config = serde_path_to_error::deserialize(tree.clone()).map_err(|e| {
        let key = e.path().to_string();
        anyhow::anyhow!("invalid configuration: {key}: {}", e.inner())
    })?;
    // A key is known when the configuration, written back out, has it: this sees through the
    // sections that embed the node's own settings (`client`, `channel`).
    let known = serde_json::to_value(&config).context("config conversion")?;
    unknown_keys(&tree, &known, "", &mut unknown);
    Ok(Loaded { config, unknown })
}

/// The keys of `input` that `known` (the configuration as understood, written back out) lacks.
fn unknown_keys(input: &Value, known: &Value, prefix: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, v) in i {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_keys(v, kv, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (v, kv)) in i.iter().zip(k).enumerate() {
                unknown_keys(v, kv, &format!("{prefix}[{n}]"), out);
            }
        }
        _ => {}
    }
}

fn read_file(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    } else {
        let t: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(t).context("config conversion")
    }
}

/// The environment variable of a dotted key path.
pub fn env_name(path: &str) -> String {
    format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase())
}

fn collect_leaves(v: &Value, prefix: String, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_leaves(v, p, out);
            }
        }
        _ => out.push((prefix, v.clone())),
    }
}

fn parse_like(default: &Value, raw: &str) -> Value {
    match default {
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Value::Bool(true),
            "0" | "false" | "no" | "off" | "" => Value::Bool(false),
            _ => Value::String(raw.into()),
        },
        Value::Number(_) => serde_json::from_str::<serde_json::Number>(raw.trim())
            .map_or_else(|_| Value::String(raw.into()), Value::Number),
        Value::String(_) => Value::String(raw.into()),
        _ => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into())),
    }
}

fn set_path(tree: &mut Value, path: &str, v: Value) -> anyhow::Result<()> {
    let mut cur = tree;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(m) = cur else {
            bail!("{path}: {part} is not a table")
        };
        if i + 1 == parts.len() {
            m.insert((*part).into(), v);
            return Ok(());
        }
        cur = m.entry(*part).or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::generate;
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("holdfast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn toml_env_and_flags_layer_in_order() {
        let p = write(
            "a.toml",
            "[http_server]\nport = 9000\n[client]\ninsecure = false\nping_interval = \"20s\"\n\
             [[channel.namespaces]]\nname = \"chat\"\nhistory_size = 10\nhistory_ttl = \"60s\"\n",
        );
        let env = vec![
            ("HOLDFAST_CLIENT_INSECURE".to_string(), "true".to_string()),
            (
                "HOLDFAST_CLIENT_TOKEN_HMAC_SECRET_KEY".to_string(),
                "s3cret".to_string(),
            ),
            ("HOLDFAST_CLIENT_BOGUS_KEY".to_string(), "1".to_string()),
            ("HOLDFAST_BINARY_PATH".to_string(), "/x".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let l = load(Some(&p), env, &[("http_server.port".into(), "9100".into())]).expect("load");
        let c = l.config;
        assert_eq!(c.http_server.port, 9100, "flags override the file");
        assert!(c.client.insecure, "environment overrides the file");
        assert_eq!(c.client.token.hmac_secret_key, "s3cret");
        assert_eq!(c.client.ping_interval, Duration::from_secs(20));
        assert_eq!(c.channel.namespaces[0].history_size, 10);
        assert_eq!(
            l.unknown,
            vec!["environment variable HOLDFAST_CLIENT_BOGUS_KEY".to_string()]
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn centrifugo_json_is_accepted_and_unsupported_keys_are_named() {
        let p = write(
            "config.json",
            r#"{"client":{"token":{"hmac_secret_key":"secret"},"insecure":true,"allowed_origins":["*"]},
               "http_api":{"key":"k"},"admin":{"enabled":true},"uni_websocket":{"enabled":true},"uni_grpc":{"enabled":true},
               "channel":{"without_namespace":{"presence":true,"history_size":100,"history_ttl":"300s","force_recovery":true,"delta_publish":true,"channel_regex":"^[a-z]+$"}}}"#,
        );
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        assert_eq!(l.config.client.token.hmac_secret_key, "secret");
        assert!(l.config.channel.without_namespace.force_recovery);
        assert!(l.config.channel.without_namespace.delta_publish);
        assert_eq!(l.config.client.allowed_origins, ["*"]);
        let mut unknown = l.unknown.clone();
        unknown.sort();
        assert_eq!(
            unknown,
            ["channel.without_namespace.channel_regex", "uni_grpc"]
        );
    }

    #[test]
    fn unknown_values_and_keys_are_named() {
        let p = write("enum.toml", "[engine]\ntype = \"mongo\"\n");
        let err = load(Some(&p), Vec::new(), &[]).unwrap_err().to_string();
        assert!(
            err.contains("engine.type") && err.contains("mongo"),
            "{err}"
        );
        let p = write("fmt.toml", "[log]\nformat = \"xml\"\n");
        let err = load(Some(&p), Vec::new(), &[]).unwrap_err().to_string();
        assert!(err.contains("log.format"), "{err}");
        let env = vec![(
            "HOLDFAST_ENGINE_DISK_DURABILITY".to_string(),
            "sometimes".to_string(),
        )];
        let err = load(None, env, &[]).unwrap_err().to_string();
        assert!(err.contains("engine.disk.durability"), "{err}");
        // Unknown keys inside the sections that embed the node's settings are still found.
        let p = write(
            "keys.toml",
            "[client]\nping_interval = \"20s\"\nbogus = 1\n[client.token]\nhmac_secret_key = \"x\"\n\
             [[channel.namespaces]]\nname = \"ab\"\nnot_an_option = true\n\
             [engine.redis]\naddress = \"redis://h:1\"\nnope = 2\n",
        );
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        let mut unknown = l.unknown.clone();
        unknown.sort();
        assert_eq!(
            unknown,
            [
                "channel.namespaces[0].not_an_option",
                "client.bogus",
                "engine.redis.nope"
            ]
        );
        assert_eq!(l.config.client.ping_interval, Duration::from_secs(20));
        assert_eq!(l.config.engine.redis.addresses, ["redis://h:1"]);
    }

    #[test]
    fn the_map_broker_follows_the_engine_unless_told() {
        use crate::config::MapBrokerKind;
        // Centrifugo's JSON shape; HOLDFAST_MAP_BROKER_TYPE reaches it too.
        let p = write(
            "mb.json",
            r#"{"engine": {"type": "memory"}, "map_broker": {"type": "redis", "redis": {"address": "redis://maps:6379"}}}"#,
        );
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        assert!(l.unknown.is_empty(), "{:?}", l.unknown);
        let own = l
            .config
            .map_broker
            .own_redis(&l.config.engine)
            .expect("own redis");
        assert_eq!(own.addresses, ["redis://maps:6379"]);
        let env = vec![("HOLDFAST_MAP_BROKER_TYPE".to_string(), "memory".to_string())];
        let l = load(None, env, &[]).expect("load");
        assert_eq!(l.config.map_broker.kind, MapBrokerKind::Memory);
        // The Redis engine with map_broker left alone: the engine's connections, no other.
        let env = vec![("HOLDFAST_ENGINE_TYPE".to_string(), "redis".to_string())];
        let l = load(None, env, &[]).expect("load");
        assert_eq!(l.config.map_broker.kind, MapBrokerKind::Engine);
        assert!(l.config.map_broker.own_redis(&l.config.engine).is_none());
        // A bad address of the map broker's own Redis is named by its own path.
        let p = write(
            "mb-bad.toml",
            "[map_broker]\ntype = \"redis\"\n[map_broker.redis]\naddress = \"mongodb://x\"\n",
        );
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        let errs = l.config.validate().unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.key.starts_with("map_broker.redis.address")),
            "{errs:?}"
        );
        let p = write("mb-type.toml", "[map_broker]\ntype = \"postgres\"\n");
        let err = load(Some(&p), Vec::new(), &[]).unwrap_err().to_string();
        assert!(err.contains("map_broker.type"), "{err}");
    }

    #[test]
    fn validation_names_history_without_ttl() {
        let p = write("b.toml", "[channel.without_namespace]\nhistory_size = 10\n");
        let c = load(Some(&p), Vec::new(), &[]).expect("load").config;
        let errs = c.validate().unwrap_err();
        assert_eq!(errs[0].key, "channel.without_namespace.history_ttl");
    }

    #[test]
    fn generated_config_loads_and_validates() {
        let p = write("gen.toml", &generate("abc", "def"));
        let l = load(Some(&p), Vec::new(), &[]).expect("load");
        assert!(l.unknown.is_empty(), "{:?}", l.unknown);
        assert_eq!(l.config.client.token.hmac_secret_key, "abc");
        assert!(l.config.validate().is_ok());
        assert!(l.config.warnings().is_empty(), "{:?}", l.config.warnings());
    }

    #[test]
    fn warnings_name_the_keys_that_expose_user_bound_channels() {
        let p = write(
            "w.toml",
            "[client.subscribe_to_user_personal_channel]\nenabled = true\n\
             [channel.without_namespace]\nallow_subscribe_for_client = true\n\
             [[channel.namespaces]]\nname = \"chat\"\nallow_subscribe_for_client = true\n\
             allow_history_for_client = true\n\
             [[channel.namespaces]]\nname = \"dm\"\nallow_subscribe_for_client = true\n\
             allow_user_limited_channels = true\n",
        );
        let c = load(Some(&p), Vec::new(), &[]).expect("load").config;
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].key, "channel.namespaces[0].allow_subscribe_for_client");
        assert!(
            w[0].problem
                .contains("channel.namespaces[0].allow_history_for_client")
        );
        assert!(w[0].problem.contains("allow_user_limited_channels"));
        let mut c = c;
        c.client.subscribe_to_user_personal_channel.enabled = false;
        let keys: Vec<String> = c.warnings().into_iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [
                "channel.without_namespace.allow_subscribe_for_client",
                "channel.namespaces[0].allow_subscribe_for_client"
            ],
            "without personal channels the root namespace is not user-limited"
        );
    }
}
