//! `holdfast`: the command line. Parses arguments and calls into the library.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use holdfast_server::config::{self, Config};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "holdfast",
    version,
    about = "Real-time messaging server speaking the Centrifugo protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Check a configuration file: unknown keys and invalid values are errors.
    Checkconfig(ConfigArgs),
    /// Write a commented configuration with fresh secrets.
    Genconfig {
        /// Where to write it.
        #[arg(short, long, default_value = "config.toml")]
        config: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print a connection (or, with --channel, subscription) token signed with the configured HMAC key.
    Gentoken {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// User id (`sub`).
        #[arg(short, long, default_value = "")]
        user: String,
        /// Lifetime in seconds (0 = no expiry).
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Make a subscription token for this channel.
        #[arg(long)]
        channel: Option<String>,
    },
    /// Check a running server's /health (exit status 0 when healthy), for container health checks.
    Health {
        /// Health URL.
        #[arg(long, default_value = "http://127.0.0.1:8000/health")]
        url: String,
    },
    /// Check or reset the disk engine's data directory.
    Disk {
        #[command(subcommand)]
        action: DiskAction,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand, Debug)]
enum DiskAction {
    /// Read the whole log: report records and streams, a torn tail, corruption (exit 1), or a
    /// log that went backwards against its high-water record (restored backup, truncation;
    /// exit 1: the next start gives every stream a new epoch).
    Check,
    /// Give every stream a new epoch at the next start, keeping history: after restoring a
    /// filesystem snapshot that Holdfast cannot tell from the original (clients are then told
    /// `recovered: false` instead of recovering across the restore).
    NewEpochs,
    /// Move the data directory aside (to <path>.reset-<unix time>) so the next start is empty.
    /// Clients recovering afterwards are told `recovered: false`.
    Reset,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML, or Centrifugo JSON with a .json name).
    // Global: `holdfast disk check --config FILE` as well as `holdfast disk --config FILE check`.
    #[arg(short, long, env = "HOLDFAST_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Override any key: --set client.insecure=true (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Public port (http_server.port).
    #[arg(short, long)]
    port: Option<u16>,
    /// Public address (http_server.address).
    #[arg(long)]
    address: Option<String>,
    /// Internal port for API/metrics/health (http_server.internal_port).
    #[arg(long)]
    internal_port: Option<u16>,
    /// Development mode: anonymous connects and every permission (client.insecure).
    #[arg(long)]
    insecure: bool,
    /// Log level (log.level).
    #[arg(long)]
    log_level: Option<String>,
}

fn load(args: &ConfigArgs, extra: Vec<(String, String)>) -> anyhow::Result<config::Loaded> {
    let mut overrides = Vec::new();
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        overrides.push((k.trim().to_owned(), v.to_owned()));
    }
    overrides.extend(extra);
    config::load(args.config.as_deref(), std::env::vars(), &overrides)
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cfg.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if cfg.log.format == holdfast_server::config::LogFormat::Json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn random_secret() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..40)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    if let Some(p) = args.port {
        extra.push(("http_server.port".into(), p.to_string()));
    }
    if let Some(a) = &args.address {
        extra.push(("http_server.address".into(), a.clone()));
    }
    if let Some(p) = args.internal_port {
        extra.push(("http_server.internal_port".into(), p.to_string()));
    }
    if args.insecure {
        extra.push(("client.insecure".into(), "true".into()));
    }
    if let Some(l) = &args.log_level {
        extra.push(("log.level".into(), l.clone()));
    }
    let loaded = load(&args.cfg, extra)?;
    init_logging(&loaded.config);
    for k in &loaded.unknown {
        tracing::warn!(key = %k, "unsupported configuration key ignored");
    }
    let cfg = loaded.config;
    for w in cfg.warnings() {
        tracing::warn!(key = %w.key, "{}", w.problem);
    }
    // Open the engine first (the disk engine replays its log): nothing listens until it is ready.
    let state = holdfast_server::server::build(cfg.clone()).await?;
    let backlog = cfg.http_server.listen_backlog;
    let public =
        holdfast_server::listen::bind(&cfg.http_server.address, cfg.http_server.port, backlog)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{}",
                    cfg.http_server.address, cfg.http_server.port
                )
            })?;
    let internal = if cfg.http_server.internal_port != 0 {
        Some(
            holdfast_server::listen::bind(
                &cfg.http_server.internal_address,
                cfg.http_server.internal_port,
                backlog,
            )
            .await
            .with_context(|| {
                format!(
                    "cannot listen on internal port {}",
                    cfg.http_server.internal_port
                )
            })?,
        )
    } else {
        None
    };
    holdfast_server::server::run(state, public, internal, shutdown_signal()).await
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs {
        cfg: ConfigArgs {
            config: None,
            set: Vec::new(),
        },
        port: None,
        address: None,
        internal_port: None,
        insecure: false,
        log_level: None,
    })) {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(args)),
        Command::Checkconfig(args) => {
            let loaded = load(&args, Vec::new())?;
            let mut problems: Vec<String> = loaded
                .unknown
                .iter()
                .map(|k| format!("{k}: unknown key"))
                .collect();
            if let Err(errs) = loaded.config.validate() {
                problems.extend(errs.iter().map(ToString::to_string));
            }
            for w in loaded.config.warnings() {
                eprintln!("warning: {w}");
            }
            if problems.is_empty() {
                println!("configuration is valid");
                Ok(())
            } else {
                for p in &problems {
                    eprintln!("{p}");
                }
                anyhow::bail!("{} problem(s) in the configuration", problems.len())
            }
        }
        Command::Genconfig { config, force } => {
            if config.exists() && !force {
                anyhow::bail!("{} exists (use --force to overwrite)", config.display());
            }
            std::fs::write(
                &config,
                config::generate(&random_secret(), &random_secret()),
            )
            .with_context(|| format!("cannot write {}", config.display()))?;
            println!("wrote {}", config.display());
            Ok(())
        }
        Command::Gentoken {
            cfg,
            user,
            ttl,
            channel,
        } => {
            let loaded = load(&cfg, Vec::new())?;
            let c = &loaded.config.client;
            let (secret, key) = if channel.is_some() && c.subscription_token.enabled {
                (
                    &c.subscription_token.hmac_secret_key,
                    "client.subscription_token.hmac_secret_key",
                )
            } else {
                (&c.token.hmac_secret_key, "client.token.hmac_secret_key")
            };
            if secret.is_empty() {
                anyhow::bail!("{key} is not set");
            }
            let mut claims = serde_json::json!({ "sub": user });
            if ttl > 0 {
                claims["exp"] = serde_json::json!(holdfast_core::time::unix_secs() + ttl);
            }
            if let Some(ch) = channel {
                claims["channel"] = serde_json::json!(ch);
            }
            println!("{}", holdfast_server::jwt::sign_hs256(secret, &claims)?);
            Ok(())
        }
        Command::Health { url } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let resp = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(3))
                    .build()?
                    .get(&url)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {url}"))?;
                anyhow::ensure!(
                    resp.status().is_success(),
                    "{url} answered {}",
                    resp.status()
                );
                println!("{}", resp.text().await.unwrap_or_default());
                Ok(())
            }),
        Command::Disk { action, cfg } => {
            let loaded = load(&cfg, Vec::new())?;
            let path = std::path::PathBuf::from(&loaded.config.engine.disk.path);
            match action {
                DiskAction::Check => match holdfast_disk::check(&path) {
                    Ok(r) if r.rollback.is_some() => {
                        let why = r.rollback.unwrap_or_default();
                        println!(
                            "{}: ROLLBACK — {why}. {} records, {} streams. The next start gives \
                             every stream a new epoch (clients are told recovered: false, never \
                             given an offset twice).",
                            path.display(),
                            r.records,
                            r.streams
                        );
                        anyhow::bail!("the log went backwards")
                    }
                    Ok(r) => {
                        println!(
                            "{}: ok — {} records, {} streams{}",
                            path.display(),
                            r.records,
                            r.streams,
                            if r.torn_bytes > 0 {
                                format!(
                                    ", {} bytes of a torn last write (cut on the next start)",
                                    r.torn_bytes
                                )
                            } else {
                                String::new()
                            }
                        );
                        Ok(())
                    }
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                },
                DiskAction::NewEpochs => {
                    holdfast_disk::request_new_epochs(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!(
                        "{}: the next start gives every stream a new epoch (history kept)",
                        path.display()
                    );
                    Ok(())
                }
                DiskAction::Reset => {
                    if !path.exists() {
                        println!("{} does not exist: nothing to reset", path.display());
                        return Ok(());
                    }
                    let aside = std::path::PathBuf::from(format!(
                        "{}.reset-{}",
                        path.display(),
                        holdfast_core::time::unix_secs()
                    ));
                    std::fs::rename(&path, &aside)
                        .with_context(|| format!("moving {} aside", path.display()))?;
                    println!(
                        "moved {} to {}; the next start begins empty",
                        path.display(),
                        aside.display()
                    );
                    Ok(())
                }
            }
        }
        Command::Version => {
            println!("holdfast {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
