//! The `usage-worker` command line: run, serve, migrate, demo.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use clap::{Parser, Subcommand};
use usage_worker::config::Settings;
use usage_worker::{app, demo, healthcheck, store, telemetry};

/// jemalloc: with glibc's per-thread arenas, memory freed by one thread
/// (tokio workers, the producer and consumer threads) was held on to, and
/// resident memory ran at about three times the live heap (measured with
/// `usage-lab bench` and heaptrack).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: give freed memory back within a
/// quarter of a second, from a background thread, rather than after its
/// default 10 s; two arenas rather than four per core (the worker's threads
/// mostly wait, and memory freed in one arena is not reused by another).
/// Against one second and eight arenas, `usage-lab bench --events 300000`
/// peaked at 135–160 MiB instead of 162–172 MiB, at the same throughput.
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: JemallocConf =
    JemallocConf(c"background_thread:true,narenas:2,dirty_decay_ms:250,muzzy_decay_ms:0".as_ptr());

#[repr(transparent)]
struct JemallocConf(*const std::ffi::c_char);
// SAFETY: a pointer to a constant string, never written.
unsafe impl Sync for JemallocConf {}

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
    /// Ask the running process's HTTP API whether it answers (GET /healthz
    /// on http.addr's port): exit 0 on a 200, 1 otherwise. The container's
    /// HEALTHCHECK.
    Healthcheck {
        /// The URL to GET instead (plain http).
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
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
    // A setting that would serve the API to anyone where that is refused
    // (the production profile) stops start-up as a bad setting does.
    let serves_http = match &cli.command {
        Command::Run { .. } => settings.http.enabled,
        Command::Serve { .. } => true,
        Command::Migrate | Command::Demo(_) | Command::Healthcheck { .. } => false,
    };
    if serves_http {
        if let Err(e) = settings.http.check_callers_required() {
            eprintln!("usage-worker: {e:#}");
            return ExitCode::from(2);
        }
    }
    match &cli.command {
        Command::Demo(args) => {
            if let Err(e) = demo::init_logging(&settings.log, args) {
                eprintln!("usage-worker: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        // A probe every few seconds: its answer is its exit status and one
        // line, not log records (nor an exporter started each time).
        Command::Healthcheck { .. } => {}
        _ => telemetry::init(&settings.log),
    }
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
            Command::Healthcheck { url, timeout } => healthcheck(&settings, url, timeout).await,
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
    let mut shutdown = Box::pin(shutdown_signal()?);
    let pool = tokio::select! {
        pool = database(&settings, no_migrate) => pool?,
        _ = &mut shutdown => return Ok(()),
    };
    app::run(settings, pool, shutdown).await
}

async fn serve(settings: Settings, no_migrate: bool) -> anyhow::Result<()> {
    tracing::info!(?settings, "starting the HTTP API alone");
    let mut shutdown = Box::pin(shutdown_signal()?);
    let pool = tokio::select! {
        pool = database(&settings, no_migrate) => pool?,
        _ = &mut shutdown => return Ok(()),
    };
    app::serve(settings, pool, shutdown).await
}

/// `usage-worker healthcheck`: fails unless the API answers 200.
async fn healthcheck(settings: &Settings, url: Option<String>, timeout: u64) -> anyhow::Result<()> {
    let url = match url {
        Some(url) => url,
        None if !settings.http.enabled => {
            // Nothing listens: a worker without its API has no probe, and
            // reporting it unhealthy would have it restarted for nothing.
            println!("http.enabled is false: no HTTP API to probe");
            return Ok(());
        }
        None => healthcheck::default_url(&settings.http.addr)?,
    };
    let status = healthcheck::probe(&url, Duration::from_secs(timeout)).await?;
    anyhow::ensure!(status == 200, "{url} answered {status}");
    println!("{url}: {status}");
    Ok(())
}

/// Connects, and applies pending migrations unless told not to; while the
/// database is unavailable, it waits.
async fn database(settings: &Settings, no_migrate: bool) -> anyhow::Result<sqlx::PgPool> {
    let pool = store::connect(&settings.database).await?;
    if settings.database.migrate_on_start && !no_migrate {
        let max_backoff = Duration::from_millis(settings.pipeline.retry_max_backoff_ms);
        store::until_available("applying migrations", max_backoff, || store::migrate(&pool)).await?;
    }
    Ok(pool)
}

/// Listens for SIGTERM and SIGINT from now on (a signal during start-up
/// stops the process cleanly too); resolves at the first.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
