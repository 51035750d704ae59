//! `holdfast-bench`: the load generator, the side-by-side benchmark with peers, the delivery
//! verifier and the abuse generator.
//!
//! Run with: `cargo run --release -p holdfast-bench -- --help`

use clap::{Parser, Subcommand};
use holdfast_bench::{
    abuse, baseline, cursor_window, fanout, load, map, publish, report, scenario, verify,
};

#[derive(Parser, Debug)]
#[command(
    name = "holdfast-bench",
    version,
    about = "Holdfast load generator, peer benchmarks and delivery verifier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Scenarios S1–S6 against Holdfast and its peers, side by side; one JSON result per run.
    Bench(Box<scenario::BenchArgs>),
    /// Writes docs/BENCHMARKS.md tables and PNG plots from `bench` results.
    Report(report::ReportArgs),
    /// Subscribers, publishers and faults against a server; reports every lost, duplicated or
    /// out-of-order delivery.
    Verify(Box<verify::VerifyArgs>),
    /// How long after a delivery a user's device may disconnect before the user's next device
    /// gets that delivery again (delivery cursor confirmation window).
    CursorWindow(cursor_window::CursorWindowArgs),
    /// Acknowledged publishes per second and publish latency through the server API.
    Publish(publish::PublishArgs),
    /// A map channel under load: fill, a subscribe storm through the paged state, then
    /// updates; snapshot time, update latency and memory per key.
    Map(Box<map::MapArgs>),
    /// Abusive clients (garbage frames, slowloris, never-reading subscribers, reconnect loops)
    /// for soak runs next to `verify`.
    Abuse(abuse::AbuseArgs),
    /// The node's own cost of a fan-out (in-memory transports, no sockets): deliveries/s on
    /// one worker thread. Run pinned: `taskset -c 0 holdfast-bench fanout`.
    Fanout(fanout::FanoutArgs),
    /// The raw tokio-tungstenite broadcast baseline server.
    Baseline {
        /// Port on 127.0.0.1.
        #[arg(long)]
        port: u16,
    },
    /// Internal: one load worker process, steered by `bench` over stdin.
    #[command(hide = true)]
    LoadWorker(load::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::LoadWorker(args) => return load::run(args),
        Command::Baseline { port } => return baseline::run(port),
        Command::Report(args) => return report::run(&args),
        Command::Fanout(args) => return fanout::run(&args).map(|_| ()),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Bench(args) => {
            let files = rt.block_on(scenario::run(*args))?;
            eprintln!("{} result files written", files.len());
        }
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
        Command::Map(args) => {
            rt.block_on(map::run(*args))?;
        }
        Command::CursorWindow(args) => {
            rt.block_on(cursor_window::run(args))?;
        }
        Command::Abuse(args) => {
            rt.block_on(abuse::run(args))?;
        }
        Command::LoadWorker(_)
        | Command::Baseline { .. }
        | Command::Report(_)
        | Command::Fanout(_) => {}
    }
    Ok(())
}
