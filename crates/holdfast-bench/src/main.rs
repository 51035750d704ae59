//! `holdfast-bench`: the delivery verifier (and, later, the load generator).
//!
//! Run with: `cargo run --release -p holdfast-bench -- verify --help`

use clap::{Parser, Subcommand};
use holdfast_bench::{abuse, publish, verify};

#[derive(Parser, Debug)]
#[command(
    name = "holdfast-bench",
    version,
    about = "Holdfast load generator and delivery verifier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Subscribers, publishers and faults against a server; reports every lost, duplicated or
    /// out-of-order delivery.
    Verify(Box<verify::VerifyArgs>),
    /// Acknowledged publishes per second and publish latency through the server API.
    Publish(publish::PublishArgs),
    /// Abusive clients (garbage frames, slowloris, never-reading subscribers, reconnect loops)
    /// for soak runs next to `verify`.
    Abuse(abuse::AbuseArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Verify(args) => {
            let ok = rt.block_on(verify::run(*args))?;
            if !ok {
                eprintln!("verify: the guarantees were not met");
                std::process::exit(1);
            }
        }
        Command::Publish(args) => {
            rt.block_on(publish::run(args))?;
        }
        Command::Abuse(args) => {
            rt.block_on(abuse::run(args))?;
        }
    }
    Ok(())
}
