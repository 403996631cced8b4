//! `usage-lab bench`: throughput, latency and memory of the real pipeline,
//! with every guarantee on, on this machine.
//!
//! The bench owns an embedded Kafka mock cluster and a fresh database; the
//! worker under test runs as its own process (so its resident memory is its
//! own), one or more of them in one consumer group. Three phases:
//! 1. throughput: N events as fast as the worker takes them (production is
//!    paced by the outcomes read back, because the mock cluster keeps only
//!    about 5 MiB per partition, and sent in chunks, see [`REFILL_CHUNK`]),
//!    from the first event produced to the last outcome read;
//! 2. latency: a fixed offered load, event-to-outcome times;
//! 3. baseline: the same pipeline forced to one event per transaction.
//!
//! Every input offset must have exactly one outcome, or the run fails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::producer::Producer;
use rust_decimal::Decimal;
use serde_json::value::RawValue;

use test_kit::process::{self, WorkerProcess, WorkerSpec};
use usage_worker::config::{Settings, TopicSettings};
use usage_worker::domain::subscription::decode_pricing;
use usage_worker::embedded::{EmbeddedKafka, ScratchDatabase};

use crate::load::{self, Generator, LimitMode, LoadProducer};
use crate::local;
use crate::progress::Progress;
use crate::results::{self, Check, Records, ResultReader};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Events in the throughput phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Offered load of the latency phase, events per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_secs: u64,
    /// Events in the one-event-per-transaction baseline.
    #[arg(long, default_value_t = 50_000)]
    pub baseline_events: u64,
    /// Worker processes in the consumer group.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    #[arg(long, default_value_t = 10_000)]
    pub subscriptions: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Extra settings for the workers, KEY=VALUE (environment variables such
    /// as USAGE_WORKER__PIPELINE__BATCH_SIZE=5000).
    #[arg(long = "worker-env")]
    pub worker_env: Vec<String>,
    /// Half the subscriptions get tiered pricing with amount hard and soft
    /// limits instead of quantity ones, each costing exactly what its
    /// quantity limit would, so the decisions (and the share of partials
    /// and rejections) are those of the default run.
    #[arg(long)]
    pub amount_limits: bool,
    /// About 2 % of the stream are corrections (voids and amendments of
    /// earlier reports, some of ids never sent, some sent again), and the
    /// outcomes are checked in order against the usages they correct (a
    /// ledger of them, which the bench's reader builds once the timed run
    /// is over: while it runs, the reader only keeps the outcomes it read).
    #[arg(long)]
    pub corrections: bool,
}

/// The share of corrections with `--corrections`.
pub const CORRECTIONS_PER_MILLE: u64 = 20;

impl BenchArgs {
    /// Corrections per 1,000 messages of the stream.
    fn corrections_per_mille(&self) -> u64 {
        if self.corrections {
            CORRECTIONS_PER_MILLE
        } else {
            0
        }
    }

    fn limit_mode(&self) -> LimitMode {
        if self.amount_limits {
            LimitMode::Amount
        } else {
            LimitMode::Quantity
        }
    }
}

/// One subscription in this many has a hard limit small enough to reach.
const SMALL_EVERY: u64 = 10;

/// How many events may be ahead of their outcomes.
const MAX_IN_FLIGHT: u64 = 60_000;

/// An unpaced phase sends its events in chunks of this many (about 1,000 a
/// partition at the default 12), not a few at a time as outcomes come back.
/// The mock cluster answers a fetch with one message set a partition, found
/// by walking the partition's log from its start, so its cost per event
/// grows as message sets shrink; sent as outcomes arrived, they shrank with
/// the pace, and the bench process cost more per event the slower the build
/// it measured. Chunks keep the message sets about as large at any pace.
const REFILL_CHUNK: u64 = 12_000;

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let kafka = EmbeddedKafka::start(1)?;
    let t = settings.topics.clone();
    kafka.create_worker_topics(&t, args.partitions)?;
    let scratch = ScratchDatabase::create(&settings.database.url, "usage_worker_bench").await?;
    let url = local::without_tls(scratch.url())?;
    let database_url = url.to_string();
    let database = url.path().trim_start_matches('/').to_owned();
    // The database goes whatever happens: a run that fails half-way leaves
    // nothing behind (its worker processes are stopped as they drop).
    let measured = measure(&settings, &args, &kafka, &database_url, &database).await;
    let dropped = scratch
        .drop_now()
        .await
        .with_context(|| format!("dropping the bench database {database}"));
    if let (Err(_), Err(e)) = (&measured, &dropped) {
        eprintln!("bench: {e:#}");
    }
    measured.and(dropped)
}

/// The three phases and the checks, on a fresh database.
async fn measure(
    settings: &Settings,
    args: &BenchArgs,
    kafka: &EmbeddedKafka,
    database_url: &str,
    database: &str,
) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    eprintln!(
        "bench: mock Kafka at {}, database {database}",
        kafka.bootstrap_servers()
    );
    eprintln!(
        "bench: {} limits, {} corrections per 1,000 messages",
        args.limit_mode().name(),
        args.corrections_per_mille()
    );
    let mut bench = Bench::set_up(settings, args, kafka, database_url)?;
    // The schema of the worker under test, by its own `migrate`: so this
    // bench can also measure an earlier build (USAGE_WORKER_BIN), with the
    // same load, mock cluster and reader as the build beside it.
    bench.spec.migrate()?;
    let main = bench.throughput_and_latency(&pool, database).await?;
    let baseline = bench.baseline(&pool).await?;
    let exactly_once = ExactlyOnce::check(kafka, &settings.topics, args.partitions, &bench.reader, &pool).await?;
    pool.close().await;

    let report = Report::new(args, &main, &baseline);
    print_report(&report, args, &main, &exactly_once);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    exactly_once.ensure()
}

/// The load, the workers' settings and the reader of their outcomes, for
/// every phase.
struct Bench {
    spec: WorkerSpec,
    args: BenchArgs,
    topic: String,
    producer: LoadProducer,
    reader: ResultReader,
    generator: Generator,
}

/// What the throughput and latency phases measured, on the same worker
/// processes.
struct MainPhases {
    throughput: Phase,
    latency: Phase,
    /// CPU used during the throughput phase.
    cpu: CpuUse,
    /// Per worker: its peak resident memory and its last assignment.
    rss_mib: Vec<f64>,
    assignments: Vec<String>,
}

impl Bench {
    /// Publishes the subscriptions and starts the reader of the outcomes.
    fn set_up(
        settings: &Settings,
        args: &BenchArgs,
        kafka: &EmbeddedKafka,
        database_url: &str,
    ) -> anyhow::Result<Self> {
        let t = &settings.topics;
        let producer = load::producer(kafka.bootstrap_servers(), &[])?;
        load::publish_subscriptions(
            &producer,
            &t.subscriptions,
            args.subscriptions,
            SMALL_EVERY,
            args.limit_mode(),
        )?;
        producer.flush(Duration::from_secs(30))?;

        let log = std::env::temp_dir().join("usage-worker-bench.log");
        let spec = WorkerSpec::new(database_url, kafka.bootstrap_servers(), log)?
            .set("USAGE_WORKER__LOG__LEVEL", "warn,usage_worker::kafka::consumer=info")
            .set("USAGE_WORKER__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .set("USAGE_WORKER__KAFKA__HEARTBEAT_INTERVAL_MS", "500")
            // The API is not under test, and several workers share the host.
            .set("USAGE_WORKER__HTTP__ENABLED", "false")
            .set_all(&args.worker_env)?;
        // Without corrections usage only grows, so the periods' final
        // `used` within the hard limit (ExactlyOnce) says it always was; with
        // them, the outcomes are followed in order.
        let ledger = args
            .corrections
            .then(|| std::sync::Arc::new(load::hard_limits(args.subscriptions, SMALL_EVERY)));
        let reader = ResultReader::start(
            kafka.bootstrap_servers(),
            &t.usage_results,
            args.partitions,
            Records::Outcomes {
                keep_decisions: false,
                ledger,
            },
        )?;
        Ok(Self {
            spec,
            args: args.clone(),
            topic: t.usage_events.clone(),
            producer,
            reader,
            generator: Generator::new(args.subscriptions, 0x2545_F491_4F6C_DD1D)
                .with_corrections(args.corrections_per_mille()),
        })
    }

    /// Phase 1: throughput, then 2: latency, with the same worker processes.
    async fn throughput_and_latency(&mut self, pool: &sqlx::PgPool, database: &str) -> anyhow::Result<MainPhases> {
        let mut workers = self.start_workers(pool, &[], "main").await?;
        eprintln!(
            "bench: {} worker(s) ready; throughput phase, {} events",
            self.args.workers, self.args.events
        );
        let cpu_before = CpuSnapshot::take(pool, database, &workers).await?;
        let throughput = self.drive(self.args.events, None, &mut workers)?;
        let cpu = CpuSnapshot::take(pool, database, &workers).await?.since(&cpu_before);
        let (rate, secs) = (self.args.rate, self.args.latency_secs);
        eprintln!("bench: latency phase, {rate} events/s for {secs} s");
        let latency = self.drive(rate * secs, Some(rate), &mut workers)?;
        let rss_mib: Vec<f64> = workers
            .iter()
            .map(|w| w.peak_rss_mib())
            .collect::<anyhow::Result<_>>()?;
        let assignments: Vec<String> = workers
            .iter()
            .map(|w| w.assignment().unwrap_or_else(|| "?".into()))
            .collect();
        self.stop_workers(&mut workers)?;
        Ok(MainPhases {
            throughput,
            latency,
            cpu,
            rss_mib,
            assignments,
        })
    }

    /// Phase 3: the baseline, one event per transaction.
    async fn baseline(&mut self, pool: &sqlx::PgPool) -> anyhow::Result<Phase> {
        let mut workers = self
            .start_workers(pool, &[("USAGE_WORKER__PIPELINE__BATCH_SIZE", "1")], "baseline")
            .await?;
        eprintln!(
            "bench: baseline phase (one event per transaction), {} events",
            self.args.baseline_events
        );
        let baseline = self.drive(self.args.baseline_events, None, &mut workers)?;
        self.stop_workers(&mut workers)?;
        Ok(baseline)
    }

    /// Spawns the workers of a phase and waits until they are ready.
    async fn start_workers(
        &self,
        pool: &sqlx::PgPool,
        extra: &[(&str, &str)],
        phase: &str,
    ) -> anyhow::Result<Vec<WorkerProcess>> {
        let mut workers = self.spawn_workers(extra, phase)?;
        self.wait_until_ready(pool, &mut workers).await?;
        Ok(workers)
    }

    fn spawn_workers(&self, extra: &[(&str, &str)], phase: &str) -> anyhow::Result<Vec<WorkerProcess>> {
        (0..self.args.workers)
            .map(|i| {
                let log =
                    std::env::temp_dir().join(format!("usage-worker-bench-{}-{phase}-{i}.log", std::process::id()));
                let _ = std::fs::remove_file(&log);
                let mut spec = WorkerSpec {
                    log,
                    ..self.spec.clone()
                };
                for (k, v) in extra {
                    spec = spec.set(k, *v);
                }
                spec.spawn()
            })
            .collect()
    }

    /// Waits until the workers have applied the snapshots and every
    /// partition is assigned.
    async fn wait_until_ready(&self, pool: &sqlx::PgPool, workers: &mut [WorkerProcess]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for w in workers.iter_mut() {
                w.check_running().context("during start-up")?;
            }
            let subscriptions: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions")
                .fetch_one(pool)
                .await?;
            let assigned: usize = workers
                .iter()
                .filter_map(|w| w.assignment())
                .map(|a| process::partition_count(&a))
                .sum();
            if subscriptions as u64 >= self.args.subscriptions && assigned >= self.args.partitions as usize {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("workers not ready after 120 s ({subscriptions} subscriptions applied, {assigned} partitions assigned)");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn stop_workers(&self, workers: &mut [WorkerProcess]) -> anyhow::Result<()> {
        for w in workers.iter_mut() {
            match w.terminate(Duration::from_secs(60))? {
                Some(status) if status.success() => {}
                status => bail!("a worker exited with {status:?} at shutdown; see {}", w.log.display()),
            }
        }
        Ok(())
    }

    /// Produces `count` events (at `rate` per second, or as fast as the
    /// in-flight cap allows) and waits for all their outcomes.
    fn drive(&mut self, count: u64, rate: Option<u64>, workers: &mut [WorkerProcess]) -> anyhow::Result<Phase> {
        let received_before = self.reader.received();
        self.reader.start_latency_window();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut progress = Progress::every(Duration::from_secs(1));
        loop {
            let received = self.reader.received() - received_before;
            if received >= count {
                break;
            }
            if progress.due() {
                for w in workers.iter_mut() {
                    w.check_running()?;
                }
                let rate_now = received as f64 / started.elapsed().as_secs_f64();
                progress.show(&format!(
                    "bench: {sent} sent, {received}/{count} outcomes ({rate_now:.0}/s)"
                ));
            }
            let due = match rate {
                Some(r) => due((started.elapsed().as_secs_f64() * r as f64) as u64, sent, count, 1),
                None => due(received + MAX_IN_FLIGHT, sent, count, REFILL_CHUNK),
            };
            if due == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            for _ in 0..due {
                load::send_next(&self.producer, &self.topic, self.args.partitions, &mut self.generator)?;
            }
            sent += due;
        }
        let elapsed = started.elapsed();
        progress.end();
        Ok(Phase {
            events: count,
            seconds: elapsed.as_secs_f64(),
            events_per_sec: count as f64 / elapsed.as_secs_f64(),
            latencies_ms: self.reader.take_latencies(),
        })
    }
}

/// How many of a phase's `count` events to send now, `sent` of them sent
/// and `allowed` by the pace or the in-flight cap: all that are allowed,
/// once that is a whole `chunk` or the rest of the phase; else none.
fn due(allowed: u64, sent: u64, count: u64, chunk: u64) -> u64 {
    let allowed = allowed.min(count);
    let room = allowed.saturating_sub(sent);
    if room >= chunk || (allowed == count && room > 0) {
        room
    } else {
        0
    }
}

/// Exactly one outcome per input offset, a decision stored for each, and
/// no period over its hard limit, a quantity or an amount. With
/// corrections, also the ledger's findings: no outcome that raised a
/// period over its hard limit, none at odds with the usage it names.
struct ExactlyOnce {
    check: Check,
    decided: i64,
    over_limit: i64,
    ledger: Option<LedgerFindings>,
}

/// What the ledger of the outcomes found (see `ledger.rs`).
struct LedgerFindings {
    over_limit: u64,
    inconsistent: u64,
    /// Outcomes by status, rejections by code.
    counts: std::collections::BTreeMap<String, u64>,
    examples: Vec<String>,
}

impl ExactlyOnce {
    async fn check(
        kafka: &EmbeddedKafka,
        topics: &TopicSettings,
        partitions: i32,
        reader: &ResultReader,
        pool: &sqlx::PgPool,
    ) -> anyhow::Result<Self> {
        let input_highs = results::high_watermarks(kafka.bootstrap_servers(), &topics.usage_events, partitions)?;
        let check = reader.check(&input_highs);
        let decided: i64 = sqlx::query_scalar(
            // Counted by rows: the `outbox` view would read every payload.
            "SELECT COALESCE(sum(last_seq - first_seq + 1), 0)::bigint FROM outbox_batches WHERE topic = $1",
        )
        .bind(&topics.usage_results)
        .fetch_one(pool)
        .await?;
        let over_quantity: i64 = sqlx::query_scalar("SELECT count(*) FROM service_periods WHERE used > hard_limit")
            .fetch_one(pool)
            .await?;
        let over_limit = over_quantity + over_amount_limit(pool).await?;
        let ledger = reader.with_ledger(|l| LedgerFindings {
            over_limit: l.over_limit,
            inconsistent: l.inconsistent,
            counts: l.counts.clone(),
            examples: l.examples.clone(),
        });
        Ok(Self {
            check,
            decided,
            over_limit,
            ledger,
        })
    }

    fn ensure(&self) -> anyhow::Result<()> {
        let Self {
            check,
            decided,
            over_limit,
            ledger,
        } = self;
        if !check.ok() || *over_limit > 0 || *decided as u64 != check.inputs {
            bail!(
                "the run broke a guarantee: {check:?}, {decided} decisions stored, {over_limit} periods over their limit"
            );
        }
        if let Some(l) = ledger.as_ref().filter(|l| l.over_limit > 0 || l.inconsistent > 0) {
            bail!(
                "the outcomes broke a guarantee: {} raised a period over its hard limit, {} at odds with their usage: {:?}",
                l.over_limit,
                l.inconsistent,
                l.examples
            );
        }
        Ok(())
    }
}

/// Periods whose usage costs more than their amount hard limit, under the
/// pricing stored with them, computed by the worker's pricing module.
async fn over_amount_limit(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    let rows: Vec<(Decimal, Decimal, String)> = sqlx::query_as(
        "SELECT used, hard_limit_amount, pricing::text FROM service_periods WHERE hard_limit_amount IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .context("reading the periods with an amount hard limit")?;
    let mut over = 0;
    for (used, limit, pricing) in rows {
        let raw = RawValue::from_string(pricing).context("a stored pricing is not JSON")?;
        let pricing = decode_pricing(&raw).map_err(|e| anyhow::anyhow!("a stored pricing is invalid: {e}"))?;
        if pricing.amount(used) > limit {
            over += 1;
        }
    }
    Ok(over)
}

struct Phase {
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    latencies_ms: Vec<f64>,
}

impl Phase {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[rank]
    }
}

/// CPU time used so far by the processes of the run, read from /proc.
struct CpuSnapshot {
    workers: Duration,
    bench: Duration,
    /// Per PostgreSQL process: the bench database's backends and the
    /// server's own background processes (WAL writer, checkpointer, ...).
    postgres: std::collections::HashMap<i32, Duration>,
    /// False when a PostgreSQL process could not be read (a server on
    /// another host, or one that exited).
    postgres_complete: bool,
}

/// CPU time used between two snapshots.
struct CpuUse {
    workers: Duration,
    bench: Duration,
    postgres: Duration,
    postgres_complete: bool,
}

impl CpuSnapshot {
    async fn take(pool: &sqlx::PgPool, database: &str, workers: &[WorkerProcess]) -> anyhow::Result<Self> {
        // Without pg_read_all_stats a role sees no backend_type of the
        // server's own processes: the figure is then a lower bound.
        let rows: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT pid, datname::text, backend_type FROM pg_stat_activity WHERE datname = $1 OR datname IS NULL",
        )
        .bind(database)
        .fetch_all(pool)
        .await
        .context("listing PostgreSQL processes")?;
        let mut postgres = std::collections::HashMap::new();
        let mut postgres_complete = true;
        for (pid, datname, backend_type) in rows {
            match backend_type.as_deref() {
                None => {
                    postgres_complete = false;
                    continue;
                }
                // Connected to no database yet: not this run's.
                Some("client backend") if datname.is_none() => continue,
                Some(_) => {}
            }
            // The pid is read here only if it is PostgreSQL's: a server on
            // another host (or in a container) has pids of its own.
            let local = u32::try_from(pid)
                .ok()
                .filter(|&pid| process::command_name(pid).as_deref() == Some("postgres"));
            match local.map(process::cpu_time) {
                Some(Ok(t)) => {
                    postgres.insert(pid, t);
                }
                _ => postgres_complete = false,
            }
        }
        let workers = workers.iter().map(|w| w.cpu_time()).sum::<anyhow::Result<Duration>>()?;
        Ok(Self {
            workers,
            bench: process::cpu_time(std::process::id())?,
            postgres,
            postgres_complete,
        })
    }

    /// What was used since `before`. A PostgreSQL process that started in
    /// between counts whole; one that ended in between is missing.
    fn since(&self, before: &CpuSnapshot) -> CpuUse {
        let postgres = self
            .postgres
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.postgres.get(pid).copied().unwrap_or_default()))
            .sum();
        let ended = before.postgres.keys().any(|pid| !self.postgres.contains_key(pid));
        CpuUse {
            workers: self.workers.saturating_sub(before.workers),
            bench: self.bench.saturating_sub(before.bench),
            postgres,
            postgres_complete: self.postgres_complete && before.postgres_complete && !ended,
        }
    }
}

struct Report {
    limit_mode: LimitMode,
    corrections_per_mille: u64,
    events: u64,
    events_per_sec: f64,
    baseline_events_per_sec: f64,
    speedup: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
}

impl Report {
    fn new(args: &BenchArgs, main: &MainPhases, baseline: &Phase) -> Self {
        Self {
            limit_mode: args.limit_mode(),
            corrections_per_mille: args.corrections_per_mille(),
            events: args.events,
            events_per_sec: main.throughput.events_per_sec,
            baseline_events_per_sec: baseline.events_per_sec,
            speedup: main.throughput.events_per_sec / baseline.events_per_sec,
            p50_ms: main.latency.percentile(50.0),
            p99_ms: main.latency.percentile(99.0),
            rss_mib: main.rss_mib.iter().copied().fold(0.0, f64::max),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "limit_mode": self.limit_mode.name(),
            "corrections_per_mille": self.corrections_per_mille,
            "events": self.events,
            "events_per_sec": self.events_per_sec.round(),
            "baseline_events_per_sec": self.baseline_events_per_sec.round(),
            "speedup": (self.speedup * 10.0).round() / 10.0,
            "p50_ms": (self.p50_ms * 10.0).round() / 10.0,
            "p99_ms": (self.p99_ms * 10.0).round() / 10.0,
            "rss_mib": (self.rss_mib * 10.0).round() / 10.0,
        })
    }
}

fn print_report(report: &Report, args: &BenchArgs, main: &MainPhases, exactly_once: &ExactlyOnce) {
    let MainPhases {
        throughput,
        latency,
        cpu,
        rss_mib: rss,
        assignments,
    } = main;
    let ExactlyOnce {
        check,
        decided,
        over_limit,
        ledger,
    } = exactly_once;
    println!("\n== usage-lab bench ==");
    println!(
        "machine              {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("partitions           {}", args.partitions);
    println!("subscriptions        {}", args.subscriptions);
    println!(
        "limits               {}",
        match report.limit_mode {
            LimitMode::Quantity => "quantity (hard and soft limits are quantities)",
            LimitMode::Amount =>
                "amount (half the subscriptions priced, tiered, with amount hard and soft limits; --amount-limits)",
        }
    );
    println!(
        "stream               {}",
        match report.corrections_per_mille {
            0 => "reports only".to_owned(),
            n => format!("about {n} corrections per 1,000 messages (voids and amendments; --corrections)"),
        }
    );
    for (i, (partitions, rss)) in assignments.iter().zip(rss).enumerate() {
        println!("worker {i}             partitions {partitions}, peak RSS {rss:.1} MiB");
    }
    println!(
        "throughput           {:.0} events/s ({} events in {:.2} s, first produced to last outcome read)",
        report.events_per_sec, throughput.events, throughput.seconds
    );
    let per_1000 = |d: Duration| d.as_secs_f64() * 1e3 / throughput.events as f64 * 1e3;
    println!(
        "CPU per 1000 events  {:.1} ms: worker {:.1}, PostgreSQL {:.1}, bench (load, mock cluster, reader) {:.1}{}",
        per_1000(cpu.workers + cpu.postgres + cpu.bench),
        per_1000(cpu.workers),
        per_1000(cpu.postgres),
        per_1000(cpu.bench),
        if cpu.postgres_complete {
            ""
        } else {
            " (PostgreSQL: some processes unreadable, a lower bound)"
        }
    );
    println!(
        "baseline             {:.0} events/s (one event per transaction, {} events)",
        report.baseline_events_per_sec, args.baseline_events
    );
    println!("speedup              {:.1}x", report.speedup);
    println!(
        "latency at {}/s    p50 {:.1} ms, p99 {:.1} ms ({} events)",
        args.rate, report.p50_ms, report.p99_ms, latency.events
    );
    println!("peak RSS (max)       {:.1} MiB", report.rss_mib);
    println!(
        "exactly once         {} inputs, {} decisions stored, {} missing, {} duplicated, {} broker repeats, {} periods over limit{}",
        check.inputs,
        decided,
        check.missing,
        check.duplicated,
        check.broker_repeats,
        over_limit,
        check.error.as_deref().map(|e| format!(", error: {e}")).unwrap_or_default()
    );
    if let Some(l) = ledger {
        let count = |what: &str| l.counts.get(what).copied().unwrap_or(0);
        let rejected: Vec<String> = l
            .counts
            .iter()
            .filter_map(|(k, n)| k.strip_prefix("rejected ").map(|code| format!("{code} {n}")))
            .collect();
        println!(
            "corrections          {} voided, {} amended, {} duplicates; rejected: {}",
            count("voided"),
            count("amended"),
            count("duplicate"),
            rejected.join(", ")
        );
        println!(
            "ledger               {} outcomes raised a period over its hard limit, {} at odds with their usage",
            l.over_limit, l.inconsistent
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpaced_phase_sends_whole_chunks_and_then_its_rest() {
        let chunk = REFILL_CHUNK;
        // The first fill: all the in-flight cap allows.
        assert_eq!(due(MAX_IN_FLIGHT, 0, 1_000_000, chunk), MAX_IN_FLIGHT);
        // Outcomes came back, but less than a chunk's worth: wait.
        assert_eq!(due(MAX_IN_FLIGHT + chunk - 1, MAX_IN_FLIGHT, 1_000_000, chunk), 0);
        // A whole chunk's worth, or more.
        assert_eq!(due(MAX_IN_FLIGHT + chunk, MAX_IN_FLIGHT, 1_000_000, chunk), chunk);
        assert_eq!(
            due(MAX_IN_FLIGHT + chunk + 5, MAX_IN_FLIGHT, 1_000_000, chunk),
            chunk + 5
        );
        // The last events of the phase, fewer than a chunk, go at once…
        assert_eq!(due(1_000_000 + 50_000, 996_000, 1_000_000, chunk), 4_000);
        // …and a phase smaller than a chunk is sent whole.
        assert_eq!(due(MAX_IN_FLIGHT, 0, 2_000, chunk), 2_000);
        // Nothing is sent past the phase's end.
        assert_eq!(due(1_000_000 + 50_000, 1_000_000, 1_000_000, chunk), 0);
    }

    #[test]
    fn a_paced_phase_sends_each_event_when_its_time_comes() {
        assert_eq!(due(0, 0, 25_000, 1), 0);
        assert_eq!(due(1, 0, 25_000, 1), 1);
        assert_eq!(due(7, 5, 25_000, 1), 2);
        assert_eq!(due(30_000, 24_999, 25_000, 1), 1);
    }

    fn snapshot(workers: u64, bench: u64, postgres: &[(i32, u64)]) -> CpuSnapshot {
        CpuSnapshot {
            workers: Duration::from_millis(workers),
            bench: Duration::from_millis(bench),
            postgres: postgres
                .iter()
                .map(|&(pid, ms)| (pid, Duration::from_millis(ms)))
                .collect(),
            postgres_complete: true,
        }
    }

    #[test]
    fn cpu_use_counts_what_each_process_used_in_between() {
        let before = snapshot(100, 50, &[(1, 10), (2, 20)]);
        // Process 3 started during the phase: all of its time is the phase's.
        let after = snapshot(400, 80, &[(1, 15), (2, 60), (3, 7)]);
        let used = after.since(&before);
        assert_eq!(used.workers, Duration::from_millis(300));
        assert_eq!(used.bench, Duration::from_millis(30));
        assert_eq!(used.postgres, Duration::from_millis(5 + 40 + 7));
        assert!(used.postgres_complete);
    }

    fn args(argv: &[&str]) -> BenchArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let argv = std::iter::once("bench").chain(argv.iter().copied());
        <Cli as clap::Parser>::parse_from(argv).bench
    }

    #[test]
    fn quantity_limits_are_the_default_and_amount_limits_an_option() {
        assert_eq!(args(&[]).limit_mode(), LimitMode::Quantity);
        assert_eq!(args(&["--amount-limits"]).limit_mode(), LimitMode::Amount);
    }

    #[test]
    fn reports_only_are_the_default_and_corrections_an_option() {
        assert_eq!(args(&[]).corrections_per_mille(), 0);
        assert_eq!(args(&["--corrections"]).corrections_per_mille(), 20);
        let both = args(&["--corrections", "--amount-limits"]);
        assert_eq!(
            (both.corrections_per_mille(), both.limit_mode()),
            (20, LimitMode::Amount)
        );
    }

    #[test]
    fn the_json_says_which_limits_ran_beside_the_figures() {
        let report = Report {
            limit_mode: LimitMode::Amount,
            corrections_per_mille: 0,
            events: 3000,
            events_per_sec: 1234.4,
            baseline_events_per_sec: 99.6,
            speedup: 12.34,
            p50_ms: 5.04,
            p99_ms: 20.06,
            rss_mib: 80.04,
        };
        assert_eq!(
            report.json(),
            serde_json::json!({
                "limit_mode": "amount",
                "corrections_per_mille": 0,
                "events": 3000,
                "events_per_sec": 1234.0,
                "baseline_events_per_sec": 100.0,
                "speedup": 12.3,
                "p50_ms": 5.0,
                "p99_ms": 20.1,
                "rss_mib": 80.0,
            })
        );
        let quantity = Report {
            limit_mode: LimitMode::Quantity,
            ..report
        };
        assert_eq!(quantity.json()["limit_mode"], "quantity");
        let corrections = Report {
            corrections_per_mille: CORRECTIONS_PER_MILLE,
            ..quantity
        };
        assert_eq!(corrections.json()["corrections_per_mille"], 20);
    }

    #[test]
    fn a_postgres_process_that_ended_makes_the_figure_a_lower_bound() {
        let before = snapshot(0, 0, &[(1, 10), (2, 20)]);
        let after = snapshot(0, 0, &[(1, 15)]);
        let used = after.since(&before);
        assert_eq!(used.postgres, Duration::from_millis(5));
        assert!(!used.postgres_complete);
    }
}
