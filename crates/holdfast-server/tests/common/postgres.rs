//! Real PostgreSQL clusters for tests: `initdb` once per test binary into a template, each
//! server a copy of it in its own temporary directory on a free port, started and stopped with
//! `pg_ctl` (as the `postgres` user when the tests run as root).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn bin(name: &str) -> PathBuf {
    for v in ["17", "16", "15", "14", "13"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}"));
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Runs a PostgreSQL program, as `postgres` when root (the server refuses to run as root).
fn run(program: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} (is postgresql installed?): {e}", program.display()))
}

fn chown(dir: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown {}", dir.display());
    }
}

/// A cluster created by `initdb` once per process, copied for each server.
fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("holdfast-pg-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir);
        let data = dir.join("data");
        let out = run(
            &bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        data
    })
}

/// One PostgreSQL server, stopped (immediate) and removed on drop.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    running: bool,
    tls: bool,
}

impl PgServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that also accepts TLS, with this certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        let port = super::redis::free_port();
        let dir = std::env::temp_dir().join(format!(
            "holdfast-pg-{}-{port}-{}",
            std::process::id(),
            super::redis::rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(dir.join("data"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "copying the template cluster");
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(dir.join("server.crt"), cert).unwrap();
            std::fs::write(dir.join("server.key"), key).unwrap();
            std::fs::set_permissions(
                dir.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        chown(&dir);
        let mut s = Self {
            port,
            dir,
            running: false,
            tls: tls.is_some(),
        };
        // The free port can be taken by another test's socket before the server binds it:
        // try a few others then.
        for _ in 0..5 {
            match s.try_spawn() {
                Ok(()) => return s,
                Err(log) if log.contains("Address already in use") => {
                    s.port = super::redis::free_port();
                }
                Err(log) => panic!("pg_ctl start: {log}"),
            }
        }
        panic!("pg_ctl start: no free port after 5 attempts");
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        if self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                self.dir.display()
            ));
        }
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let _ = std::fs::remove_file(&log);
        let out = run(
            &bin("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        if !out.status.success() {
            return Err(format!(
                "{} {}",
                String::from_utf8_lossy(&out.stdout),
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        self.running = true;
        Ok(())
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("pg_ctl start: {log}");
        }
    }

    /// `postgresql://postgres@127.0.0.1:<port>/postgres`.
    pub fn dsn(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server the hard way (`-m immediate`: no shutdown checkpoint, as a crash).
    pub fn kill(&mut self) {
        if self.running {
            let _ = run(
                &bin("pg_ctl"),
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            );
            self.running = false;
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A client connection (its connection task spawned on the current runtime).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.dsn(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
