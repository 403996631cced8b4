//! The `usage-worker` command line: run, migrate, demo.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use usage_worker::config::Settings;
use usage_worker::{demo, pipeline, store, telemetry};

#[derive(Parser)]
#[command(
    name = "usage-worker",
    version,
    about = "Usage events from Kafka, limits in PostgreSQL, exactly one outcome each"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGTERM or SIGINT.
    Run {
        /// Do not apply pending migrations at start (overrides database.migrate_on_start).
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run the whole pipeline on an embedded Kafka mock cluster and a fresh
    /// local database, with generated data, and print a summary.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("usage-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("usage-worker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { no_migrate } => run(settings, no_migrate).await,
            Command::Migrate => {
                let pool = store::connect(&settings.database).await?;
                store::migrate(&pool).await?;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::Demo(args) => demo::run(settings, args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "usage-worker failed");
            eprintln!("usage-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings, no_migrate: bool) -> anyhow::Result<()> {
    tracing::info!(?settings, "starting");
    let pool = store::connect(&settings.database).await?;
    if settings.database.migrate_on_start && !no_migrate {
        store::migrate(&pool).await?;
    }
    let stats = Arc::new(pipeline::Stats::default());
    pipeline::run(settings, pool, stats, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
