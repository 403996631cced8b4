//! The `usage-worker` command line: run, serve, migrate, demo, bench.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use usage_worker::config::Settings;
use usage_worker::{app, bench, demo, store, telemetry};

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
    /// Run the worker, and the HTTP API beside it (unless http.enabled is
    /// false), until SIGTERM or SIGINT.
    Run {
        /// Do not apply pending migrations at start (overrides database.migrate_on_start).
        #[arg(long)]
        no_migrate: bool,
    },
    /// Serve the HTTP API alone, without consuming usage-events, until
    /// SIGTERM or SIGINT. Its outcomes are published by the running workers.
    Serve {
        /// Do not apply pending migrations at start (overrides database.migrate_on_start).
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run the whole pipeline on an embedded Kafka mock cluster and a fresh
    /// local database, with generated data, and print a summary.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency and memory of the real pipeline on an
    /// embedded Kafka mock cluster and a fresh local database.
    Bench(bench::BenchArgs),
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
            Command::Serve { no_migrate } => serve(settings, no_migrate).await,
            Command::Migrate => {
                let pool = store::connect(&settings.database).await?;
                store::migrate(&pool).await?;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::Demo(args) => demo::run(settings, args).await,
            Command::Bench(args) => bench::run(settings, args).await,
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
    let pool = database(&settings, no_migrate).await?;
    app::run(settings, pool, shutdown_signal()).await
}

async fn serve(settings: Settings, no_migrate: bool) -> anyhow::Result<()> {
    tracing::info!(?settings, "starting the HTTP API alone");
    let pool = database(&settings, no_migrate).await?;
    app::serve(settings, pool, shutdown_signal()).await
}

/// Connects, and applies pending migrations unless told not to.
async fn database(settings: &Settings, no_migrate: bool) -> anyhow::Result<sqlx::PgPool> {
    let pool = store::connect(&settings.database).await?;
    if settings.database.migrate_on_start && !no_migrate {
        store::migrate(&pool).await?;
    }
    Ok(pool)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
