//! The configuration reference names every key the server accepts.

use holdfast_server::config::Config;
use serde_json::Value;

fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaves(
                    v,
                    &if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    },
                    out,
                );
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

/// The key paths CONFIG.md documents: each table row's key(s) under its section's path (the
/// first backticked path of the heading), e.g. `client.token.hmac_secret_key`; `a.*` rows cover
/// everything under `a`. The proxy table documents the keys every proxy has.
fn documented(doc: &str) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::new();
    let mut proxy_keys = Vec::new();
    let mut prefix = String::new();
    let mut in_proxies = false;
    for line in doc.lines() {
        if line.starts_with('#') {
            in_proxies = line.contains("Proxies");
            prefix = if line.contains("Channel options") {
                "channel.without_namespace".into()
            } else {
                let heading = line.trim_start_matches('#').trim();
                heading
                    .strip_prefix('`')
                    .and_then(|h| h.split('`').next())
                    .unwrap_or("")
                    .to_owned()
            };
            continue;
        }
        let Some(first) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        for key in first.split('`').skip(1).step_by(2) {
            if key.contains(' ') {
                continue;
            }
            if in_proxies {
                proxy_keys.push(key.to_owned());
            }
            keys.push(key.to_owned());
            if !prefix.is_empty() {
                keys.push(format!("{prefix}.{key}"));
            }
        }
    }
    (keys, proxy_keys)
}

#[test]
fn config_md_documents_every_key_by_its_full_path() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CONFIG.md"))
        .expect("docs/CONFIG.md");
    let (documented, proxy_keys) = documented(&doc);
    let mut keys = Vec::new();
    leaves(
        &serde_json::to_value(Config::default()).expect("json"),
        "",
        &mut keys,
    );
    let proxy_prefixes = [
        "client.proxy.connect.",
        "client.proxy.refresh.",
        "channel.proxy.subscribe.",
        "channel.proxy.publish.",
        "channel.proxy.sub_refresh.",
        "rpc.proxy.",
    ];
    let covered = |k: &str| {
        documented.iter().any(|d| {
            d == k
                || d.strip_suffix(".*")
                    .is_some_and(|p| k.starts_with(&format!("{p}.")))
        }) || proxy_prefixes.iter().any(|p| {
            k.strip_prefix(p)
                .is_some_and(|rest| proxy_keys.iter().any(|pk| pk == rest))
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !covered(k)).collect();
    assert!(
        missing.is_empty(),
        "undocumented keys (full paths): {missing:?}"
    );
}

#[test]
fn the_full_path_check_catches_a_key_documented_under_another_section() {
    let doc = "## `http_server`\n| Key |\n| `port` | 1 |\n## `client`\n| `enabled` | x |\n";
    let (documented, _) = documented(doc);
    assert!(documented.contains(&"http_server.port".to_owned()));
    assert!(documented.contains(&"client.enabled".to_owned()));
    assert!(
        !documented.contains(&"webhooks.enabled".to_owned()),
        "`enabled` under client does not document webhooks.enabled"
    );
}
