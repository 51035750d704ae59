//! The disk engine when the disk misbehaves: a full disk (a real, small tmpfs), a restored
//! backup, a log cut short. Publishing resumes on its own once space is back; a log that went
//! backwards gives every stream a new epoch, so clients are told, never misled.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Whether this process runs as root (mounting a tmpfs needs it; CI runs the tests as root).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "holdfast-tmpfs-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fills the filesystem of `dir` to the last byte with a file named `filler`.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0u8]).is_ok() {}
    let _ = f.sync_all();
    path
}

fn disk_config(data: &Path) -> holdfast_server::config::Config {
    config_from(&format!(
        r#"
[engine]
type = "disk"
[engine.disk]
path = "{}"
[channel.without_namespace]
history_size = 1000
history_ttl = "600s"
force_recovery = true
allow_subscribe_for_client = true
allow_history_for_subscriber = true
"#,
        data.display()
    ))
}

async fn get_json(srv: &TestServer, path: &str) -> Value {
    reqwest::get(srv.http(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Publishes `n` with a payload of about 6 KiB (each needs new pages of the filesystem).
async fn api_publish(srv: &TestServer, channel: &str, n: u64) -> Value {
    api(
        srv,
        "publish",
        json!({"channel": channel, "data": {"n": n, "pad": "x".repeat(6000)}}),
    )
    .await
}

#[tokio::test]
async fn a_full_disk_refuses_publications_and_publishing_resumes_when_space_is_back() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let fs = Tmpfs::mount("2m");
    let data = fs.dir.join("data");
    let srv = TestServer::start(disk_config(&data)).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "full"})).await;
    assert!(r["subscribe"].is_object(), "{r}");
    for n in 1..=10 {
        let r = api_publish(&srv, "full", n).await;
        assert_eq!(r["result"]["offset"], n, "{r}");
    }
    let filler = fill(&fs.dir);

    // Full: refused with a message that says why, health degraded, the error counted.
    let r = api_publish(&srv, "full", 11).await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["temporary"], true, "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("No space left on device"), "{msg}");
    let r = api_publish(&srv, "full", 11).await;
    assert_eq!(r["error"]["code"], 100, "still full: {r}");
    let h = get_json(&srv, "/health").await;
    assert_eq!(h["engine"], "degraded", "{h}");
    assert!(
        h["engine_problem"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{h}"
    );
    let metrics = reqwest::get(srv.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("holdfast_engine_write_errors_total{engine=\"disk\"}")),
        "{metrics}"
    );

    // Space is back: the engine notices on its own (no publish needed), then publishing goes on
    // at the next offset, nothing skipped.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if get_json(&srv, "/health").await["engine"] == "ok" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stays degraded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = api_publish(&srv, "full", 11).await;
    assert_eq!(r["result"]["offset"], 11, "no offset skipped: {r}");
    let mut seen = Vec::new();
    while seen.len() < 11 {
        let p = c.push().await;
        seen.push(p["pub"]["offset"].as_u64().unwrap());
    }
    assert_eq!(seen, (1..=11).collect::<Vec<_>>(), "live: in order, no gap");
    srv.stop().await;

    // After a restart every acknowledged publication is there, under the same offsets.
    let srv = TestServer::start(disk_config(&data)).await;
    let (mut c, _) = srv.connected("u").await;
    c.call("subscribe", json!({"channel": "full"})).await;
    let r = c
        .call("history", json!({"channel": "full", "limit": -1}))
        .await;
    let offsets: Vec<u64> = r["history"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (1..=11).collect::<Vec<_>>(), "{r}");
    srv.stop().await;
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "holdfast-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Receives publication pushes of `channel` up to `offset`; returns their offsets.
async fn read_until(c: &mut TestClient, channel: &str, offset: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last() != Some(&offset) {
        let p = c.push().await;
        if p["channel"] == channel {
            seen.push(p["pub"]["offset"].as_u64().unwrap());
        }
    }
    seen
}

async fn publish_range(srv: &TestServer, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        let r = api(
            srv,
            "publish",
            json!({"channel": channel, "data": {"n": n}}),
        )
        .await;
        assert!(r["result"]["offset"].as_u64().is_some(), "{r}");
    }
}

/// `holdfast disk check` on a data directory: (success, output).
fn disk_check(data: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["disk", "check", "--set"])
        .arg(format!("engine.disk.path={}", data.display()))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn a_restored_backup_tells_clients_and_never_reuses_an_offset() {
    let data = temp_dir("restore");
    let backup = temp_dir("restore-backup");
    let srv = TestServer::start(disk_config(&data)).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "r"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    publish_range(&srv, "r", 1..=25).await;
    assert_eq!(read_until(&mut c, "r", 25).await.len(), 25);
    drop(c);
    srv.stop().await;
    copy_dir(&data, &backup);

    let srv = TestServer::start(disk_config(&data)).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "r", "recover": true, "offset": 25, "epoch": epoch}),
        )
        .await;
    assert_eq!(
        r["subscribe"]["recovered"], true,
        "a restart keeps the epoch: {r}"
    );
    publish_range(&srv, "r", 26..=50).await;
    assert_eq!(
        read_until(&mut c, "r", 30).await,
        (26..=30).collect::<Vec<_>>()
    );
    drop(c);
    srv.stop().await;

    // The operator restores the backup (OPERATIONS.md's remedy for a damaged directory).
    copy_dir(&backup, &data);
    let (ok, out) = disk_check(&data);
    assert!(
        !ok && out.contains("ROLLBACK"),
        "disk check reports it: {out}"
    );
    let srv = TestServer::start(disk_config(&data)).await;
    publish_range(&srv, "r", 51..=60).await;
    // The client that had reached offset 30 is told; it is not given 31-35 as if nothing
    // happened (under the old epoch those would be other publications than the ones it missed).
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "r", "recover": true, "offset": 30, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert_eq!(s["was_recovering"], true, "{r}");
    assert!(s.get("recovered").is_none(), "told recovered: false: {r}");
    assert_ne!(s["epoch"], epoch.as_str(), "a new epoch: {r}");
    assert_eq!(s["offset"], 35, "{r}");
    assert!(s.get("publications").is_none(), "{r}");
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&backup);
}

#[tokio::test]
async fn a_log_cut_on_a_record_boundary_tells_clients() {
    let data = temp_dir("cut");
    let log = data.join("holdfast.log");
    let srv = TestServer::start(disk_config(&data)).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c.call("subscribe", json!({"channel": "t"})).await;
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    let mut lens = Vec::new();
    for n in 1..=5 {
        publish_range(&srv, "t", n..=n).await;
        lens.push(std::fs::metadata(&log).unwrap().len());
    }
    assert_eq!(read_until(&mut c, "t", 5).await, [1, 2, 3, 4, 5]);
    drop(c);
    srv.stop().await;
    // The last two acknowledged publications' records are gone; what is left is a valid log.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(lens[2])
        .unwrap();
    let (ok, out) = disk_check(&data);
    assert!(!ok && out.contains("ROLLBACK"), "{out}");
    let srv = TestServer::start(disk_config(&data)).await;
    publish_range(&srv, "t", 6..=7).await;
    let (mut c, _) = srv.connected("u").await;
    let r = c
        .call(
            "subscribe",
            json!({"channel": "t", "recover": true, "offset": 5, "epoch": epoch}),
        )
        .await;
    let s = &r["subscribe"];
    assert!(s.get("recovered").is_none(), "told: {r}");
    assert_ne!(s["epoch"], epoch.as_str(), "{r}");
    assert_eq!(s["offset"], 5, "3 kept + 2 new under the new epoch: {r}");
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}
