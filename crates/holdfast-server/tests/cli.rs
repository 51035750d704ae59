//! The `holdfast` command line: gentoken, checkconfig, genconfig, version.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::process::Command;

fn holdfast(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(args)
        .env_remove("HOLDFAST_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("holdfast-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn gentoken_output_is_accepted_by_the_server() {
    let cfg = write_config(
        "gentoken.toml",
        &format!("[client.token]\nhmac_secret_key = \"{SECRET}\"\n"),
    );
    let (ok, out, err) = holdfast(&[
        "gentoken", "--config", &cfg, "--user", "42", "--ttl", "3600",
    ]);
    assert!(ok, "{err}");
    let token = out.trim();
    let srv = TestServer::start(base_config()).await;
    let (_c, r) = srv.connected_with(token).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    assert_eq!(r["connect"]["expires"], true);
    srv.stop().await;
}

#[test]
fn checkconfig_names_the_offending_keys() {
    let cfg = write_config(
        "bad.toml",
        "[channel.without_namespace]\nhistory_size = 10\n[client]\nfrobnicate = true\n",
    );
    let (ok, _, err) = holdfast(&["checkconfig", "--config", &cfg]);
    assert!(!ok);
    assert!(
        err.contains("channel.without_namespace.history_ttl"),
        "{err}"
    );
    assert!(err.contains("client.frobnicate: unknown key"), "{err}");
    let good = write_config(
        "good.toml",
        "[channel.without_namespace]\nhistory_size = 10\nhistory_ttl = \"30s\"\n",
    );
    let (ok, out, err) = holdfast(&["checkconfig", "--config", &good]);
    assert!(ok, "{err}");
    assert!(out.contains("valid"));
}

#[test]
fn genconfig_writes_a_valid_config_with_fresh_secrets() {
    let dir = std::env::temp_dir().join(format!("holdfast-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    assert!(holdfast(&["genconfig", "--config", a.to_str().unwrap()]).0);
    assert!(holdfast(&["genconfig", "--config", b.to_str().unwrap()]).0);
    assert!(
        !holdfast(&["genconfig", "--config", a.to_str().unwrap()]).0,
        "refuses to overwrite"
    );
    let (ok, _, err) = holdfast(&["checkconfig", "--config", a.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_ne!(
        std::fs::read_to_string(&a).unwrap(),
        std::fs::read_to_string(&b).unwrap(),
        "secrets differ"
    );
    let (ok, out, _) = holdfast(&["version"]);
    assert!(ok && out.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn the_deployment_examples_pass_checkconfig_without_warnings() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, _, err) = holdfast(&["checkconfig", "--config", path.to_str().unwrap()]);
            assert!(ok, "{}: {err}", path.display());
            assert!(!err.contains("warning"), "{}: {err}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 2, "deploy/config has the example configurations");
    // The unit runs checkconfig before serving, on the path the examples use.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/systemd/holdfast.service"
    ))
    .unwrap();
    assert!(unit.contains(
        "ExecStartPre=/usr/local/bin/holdfast checkconfig --config /etc/holdfast/config.toml"
    ));
    assert!(unit.contains("LimitNOFILE="));
}
