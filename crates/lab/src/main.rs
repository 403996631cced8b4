//! `usage-lab`: the worker measured and attacked, always as the real
//! `usage-worker` binary in child processes.
//!
//! - `bench`: throughput, latency and memory, with every guarantee on;
//! - `chaos`: kill -9, PostgreSQL crashes, broker outages, rebalances and a
//!   slow database, checked against a clean run over the same input;
//! - `kafka`: a mock cluster with the service's topics, for scripts that
//!   run worker processes (scripts/schemathesis, scripts/rolling-deploy).
//!
//! It runs the `usage-worker` binary beside its own (`cargo build --release
//! --workspace` builds both), or the one `USAGE_WORKER_BIN` names.

mod bench;
mod chaos;
mod kafka;
mod ledger;
mod load;
mod local;
mod progress;
mod results;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use usage_worker::config::Settings;
use usage_worker::telemetry;

#[derive(Parser)]
#[command(name = "usage-lab", version, about = "usage-worker's bench and chaos runs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure throughput, latency and memory of the real pipeline on an
    /// embedded Kafka mock cluster and a fresh local database.
    Bench(bench::BenchArgs),
    /// Prove the guarantees under kill -9, PostgreSQL crashes, broker
    /// outages, rebalances and a slow database, against a clean run.
    Chaos(chaos::ChaosArgs),
    /// Host a Kafka mock cluster with the service's topics: its bootstrap
    /// servers go to stdout; it stops on SIGTERM, or SIGINT.
    Kafka(kafka::KafkaArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The same settings as the worker's (database URL, topic names): the
    // lab passes them on to the workers it starts.
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("usage-lab: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("usage-lab: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Bench(args) => bench::run(settings, args).await,
            Command::Chaos(args) => chaos::run(settings, args).await,
            Command::Kafka(args) => kafka::run(settings, args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usage-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
