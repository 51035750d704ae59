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

#[test]
fn config_md_documents_every_key() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CONFIG.md"))
        .expect("docs/CONFIG.md");
    let mut keys = Vec::new();
    leaves(
        &serde_json::to_value(Config::default()).expect("json"),
        "",
        &mut keys,
    );
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let last = k.rsplit('.').next().unwrap_or(k);
            !doc.contains(&format!("`{k}`")) && !doc.contains(&format!("`{last}`"))
        })
        .collect();
    assert!(missing.is_empty(), "undocumented keys: {missing:?}");
}
