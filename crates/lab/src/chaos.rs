//! `usage-lab chaos`: a long stream through several worker processes
//! while workers are killed, PostgreSQL crashes and restarts, brokers go down,
//! workers join and leave, and the database stalls; then a check, from the
//! output topics and the database, that every guarantee held.
//!
//! - The chaos workers share a private PostgreSQL server (initdb into a
//!   temporary folder, its own port), so that its crashes disturb nothing
//!   else.
//! - A clean worker, never disturbed, reads the same input in a consumer
//!   group of its own, into its own database on the configured server and
//!   its own output topics. Events of one subscription are ordered on one
//!   partition, so its decisions are the ones the chaos workers must make.
//! - The mock cluster (three brokers) lives in this process; production is
//!   paced by the outcomes read back, because the mock keeps only about
//!   5 MiB a partition. `--broker tansu` runs the same against a tansu
//!   broker process instead (one broker, which cannot be taken down and up
//!   again: no broker outages there).
//! - Injections happen at random points of progress (seeded: `--seed`
//!   replays a plan), one at a time.
//! - The stream holds about 2 % corrections (voids and amendments, some
//!   right after the report they correct, some of ids never sent, some
//!   sent again): their outcomes are compared with the clean run's like
//!   every other, and both runs' outcomes are followed in order by a
//!   ledger (latest quantity of each usage; no raise over a hard limit).
//! - Periods close by time during the run: `--period-closes` times, the
//!   stream pauses until both runs have decided all of it, a new period
//!   starts for one subscription in seven (a new snapshot), and the old one
//!   closes once its end plus a grace of [`PERIOD_GRACE_SECS`] has passed,
//!   while a worker is killed; the stream goes on after that instant, so
//!   every decision and every record is the same in both runs whatever the
//!   disturbance. Both runs' `usage-periods` must hold exactly one record
//!   per closed period, equal in every field, with totals and digests that
//!   the outcomes read back recompute.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use rdkafka::producer::Producer;
use rust_decimal::Decimal;
use sqlx::{Connection, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use test_kit::postgres::{free_port, PrivatePostgres};
use test_kit::process::{WorkerProcess, WorkerSpec};
use test_kit::tansu::TansuBroker;
use test_kit::{BrokerKind, Cluster, Rng};
use usage_worker::config::{Settings, TopicSettings};
use usage_worker::embedded::ScratchDatabase;
use usage_worker::store;

use crate::load::{self, Generator, LimitMode, LoadProducer};
use crate::local;
use crate::progress::Progress;
use crate::results::{self, Check, Key, PeriodRecord, Records, ResultReader};

/// The Kafka the chaos run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerChoice {
    /// librdkafka's mock cluster of three brokers, in this process.
    Mock,
    /// A tansu broker process (`TANSU_BIN`), in-memory storage.
    Tansu,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Usage events in the stream.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    #[arg(long, default_value_t = 3_000)]
    pub subscriptions: u64,
    /// Chaos workers in the consumer group (one more joins and leaves
    /// `--joins` times).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// kill -9 of a worker, which is restarted (one of them as each round
    /// of periods ends, the others at random points).
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Crashes (pg_ctl -m immediate) and restarts of the private PostgreSQL.
    #[arg(long, default_value_t = 3)]
    pub pg_restarts: u32,
    /// One or all mock brokers down for a few seconds.
    #[arg(long, default_value_t = 3)]
    pub broker_outages: u32,
    /// A table locked for up to twice the workers' statement timeout.
    #[arg(long, default_value_t = 3)]
    pub slow_db: u32,
    /// A further worker joins the group, and later leaves it (SIGTERM).
    #[arg(long, default_value_t = 2)]
    pub joins: u32,
    /// Replays a plan (events and injections); random when unset.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Gives up, failing, after this long.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the private server's folder and the workers' logs.
    #[arg(long)]
    pub keep: bool,
    /// Extra settings for the chaos workers, KEY=VALUE.
    #[arg(long = "worker-env")]
    pub worker_env: Vec<String>,
    /// The Kafka to run on. On tansu no broker outages are injected.
    #[arg(long, value_enum, default_value_t = BrokerChoice::Mock)]
    pub broker: BrokerChoice,
    /// Corrections (voids and amendments) per 1,000 messages of the stream.
    #[arg(long, default_value_t = 20)]
    pub corrections_per_mille: u64,
    /// Times during the run that the current periods of one subscription
    /// in seven end and close by time (each with one of the kills).
    #[arg(long, default_value_t = 2)]
    pub period_closes: u32,
}

/// Events produced ahead of the slower of the two runs.
const MAX_IN_FLIGHT: u64 = 24_000;
/// The chaos workers' statement timeout: a slow-database injection holds its
/// lock for up to twice as long.
const STATEMENT_TIMEOUT_MS: u64 = 3_000;
const BROKERS: i32 = 3;
/// One subscription in this many has a hard limit small enough to reach.
const SMALL_EVERY: u64 = 5;
/// One subscription in this many has its periods closed during the run.
const CLOSING_EVERY: u64 = 7;
/// The grace after a period's end before it closes, for every worker of
/// the run (the clean one's included): short, so periods close while the
/// run goes on.
const PERIOD_GRACE_SECS: i64 = 1;
/// How long the chaos run may go without an outcome before the next planned
/// injection comes early (or, with none left, a kill more).
const STALLED: Duration = Duration::from_secs(20);

/// Of `--kills`, those made as a round of periods ends: one a round.
fn kills_at_closes(args: &ChaosArgs) -> u32 {
    args.kills.min(args.period_closes)
}

/// Whether subscription `i` has its periods closed during the run: one in
/// [`CLOSING_EVERY`], small and large hard limits alike.
fn closes_periods(i: u64) -> bool {
    i % CLOSING_EVERY == 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injection {
    Kill,
    PgRestart,
    BrokerOutage,
    SlowDb,
    Join,
    Leave,
}

/// Each injection at a point of progress (the chaos run's share of outcomes
/// read back). Joins and leaves pair up in disjoint stretches, so that at
/// most one extra worker runs.
fn plan(args: &ChaosArgs, rng: &mut Rng) -> Vec<(f64, Injection)> {
    // The kills at closes are some of `--kills`, not more: the run's
    // disturbance stays what its options say.
    let mut plan = Vec::new();
    for (count, injection) in [
        (args.kills - kills_at_closes(args), Injection::Kill),
        (args.pg_restarts, Injection::PgRestart),
        (args.broker_outages, Injection::BrokerOutage),
        (args.slow_db, Injection::SlowDb),
    ] {
        for _ in 0..count {
            plan.push((rng.fraction(0.02, 0.95), injection));
        }
    }
    let stretch = 0.85 / args.joins.max(1) as f64;
    for j in 0..args.joins {
        let start = 0.05 + stretch * j as f64;
        plan.push((rng.fraction(start, start + stretch / 2.0), Injection::Join));
        plan.push((rng.fraction(start + stretch / 2.0, start + stretch), Injection::Leave));
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    plan
}

#[derive(Debug, Default)]
struct Tally {
    kills: u32,
    pg_restarts: u32,
    broker_outages: u32,
    slow_db: u32,
    joins: u32,
    leaves: u32,
    /// Of `kills`, those right after a round of periods ended.
    kills_at_closes: u32,
    /// Planned injections made early, the run having stalled, and kills
    /// made when it stalled with none left (counted in `kills` too).
    early_injections: u32,
    /// A worker that exited on its own, or not with 0 on SIGTERM.
    unexpected_exits: Vec<String>,
    /// Per PostgreSQL outage: not ready seen, ready again, CPU of the
    /// workers while it was down (percent of one core, the busiest).
    outages: Vec<PgOutage>,
    /// What was injected when (UTC), to read beside the workers' logs.
    timeline: Vec<String>,
}

impl Tally {
    fn note(&mut self, what: String) {
        self.timeline
            .push(format!("{} {what}", chrono::Utc::now().format("%H:%M:%S%.3f")));
    }
}

#[derive(Debug)]
struct PgOutage {
    /// The worker whose readiness was watched; None when none was ready.
    watched: Option<usize>,
    down: Duration,
    not_ready_after: Option<Duration>,
    ready_again_after: Option<Duration>,
    max_cpu_percent: f64,
}

impl PgOutage {
    fn describe(&self) -> String {
        let readiness = match self.watched {
            Some(slot) => format!(
                "worker {slot} not ready after {}, ready again {} after the restart",
                seconds(self.not_ready_after),
                seconds(self.ready_again_after)
            ),
            None => "no worker was ready to watch".into(),
        };
        format!(
            "down {:.1} s: {readiness}, busiest worker at {:.0}% CPU while down",
            self.down.as_secs_f64(),
            self.max_cpu_percent
        )
    }

    /// Reported not ready while down, ready again by itself, no spinning.
    fn ok(&self) -> bool {
        let readiness = self.watched.is_none() || (self.not_ready_after.is_some() && self.ready_again_after.is_some());
        readiness && self.max_cpu_percent < 50.0
    }
}

/// The chaos workers, by slot; the slot after `--workers` is the one that
/// joins and leaves.
struct Pool {
    specs: Vec<WorkerSpec>,
    ports: Vec<u16>,
    running: Vec<Option<WorkerProcess>>,
}

impl Pool {
    /// A slot per chaos worker and one for the worker that joins and
    /// leaves, each with an HTTP port of its own; the first `--workers`
    /// started.
    fn start(args: &ChaosArgs, bootstrap: &str, chaos_url: &str, work_dir: &Path) -> anyhow::Result<Self> {
        let slots = args.workers + 1;
        let mut pool = Pool {
            specs: Vec::new(),
            ports: Vec::new(),
            running: (0..slots).map(|_| None).collect(),
        };
        for slot in 0..slots {
            let port = free_port()?;
            pool.ports.push(port);
            pool.specs.push(
                worker_spec(args, bootstrap, chaos_url, work_dir.join(format!("worker-{slot}.log")))?
                    .set(
                        "USAGE_WORKER__DATABASE__STATEMENT_TIMEOUT_MS",
                        STATEMENT_TIMEOUT_MS.to_string(),
                    )
                    .set("USAGE_WORKER__PIPELINE__RETRY_MAX_BACKOFF_MS", "2000")
                    .set("USAGE_WORKER__PIPELINE__SHUTDOWN_TIMEOUT_MS", "20000")
                    .set("HTTP_ADDR", format!("127.0.0.1:{port}"))
                    .set_all(&args.worker_env)?,
            );
        }
        for slot in 0..args.workers {
            pool.spawn(slot)?;
        }
        Ok(pool)
    }

    fn live(&self) -> Vec<usize> {
        (0..self.running.len()).filter(|i| self.running[*i].is_some()).collect()
    }

    fn spawn(&mut self, slot: usize) -> anyhow::Result<()> {
        self.running[slot] = Some(self.specs[slot].spawn()?);
        Ok(())
    }

    /// A worker that exited on its own is noted and started again.
    fn restart_exited(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        for slot in self.live() {
            let w = self.running[slot].as_mut().expect("live");
            if let Some(status) = w.child.try_wait()? {
                tally.unexpected_exits.push(format!(
                    "worker {slot} exited on its own ({status}); see {}",
                    w.log.display()
                ));
                self.spawn(slot)?;
            }
        }
        Ok(())
    }
}

/// The settings every worker of the run gets, the clean one's included.
fn worker_spec(args: &ChaosArgs, bootstrap: &str, database: &str, log: PathBuf) -> anyhow::Result<WorkerSpec> {
    Ok(WorkerSpec::new(database, bootstrap, log)?
        .set("USAGE_WORKER__LOG__LEVEL", "info")
        .set("USAGE_WORKER__KAFKA__SESSION_TIMEOUT_MS", "4000")
        .set("USAGE_WORKER__KAFKA__HEARTBEAT_INTERVAL_MS", "500")
        // The mock's brokers go down without closing connections: give
        // up on an unanswered request after 10 s instead of 60.
        .set("USAGE_WORKER__KAFKA__SOCKET_TIMEOUT_MS", "10000")
        .set(
            "USAGE_WORKER__KAFKA__CONFIRM_PARTITION_ENDS",
            // tansu under-reports where a partition ends (docs/brokers.md).
            (args.broker == BrokerChoice::Tansu).to_string(),
        )
        .set("USAGE_WORKER__DATABASE__MIGRATE_ON_START", "false")
        .set(
            "USAGE_WORKER__PIPELINE__PERIOD_GRACE_SECS",
            PERIOD_GRACE_SECS.to_string(),
        )
        .set("USAGE_WORKER__PIPELINE__PERIOD_SWEEP_SECS", "1"))
}

/// The clean worker: a consumer group, output topics and a database of its
/// own; never disturbed.
fn start_clean_worker(
    args: &ChaosArgs,
    bootstrap: &str,
    databases: &Databases,
    clean_topics: &TopicSettings,
    work_dir: &Path,
) -> anyhow::Result<WorkerProcess> {
    worker_spec(args, bootstrap, &databases.clean_url, work_dir.join("clean.log"))?
        .set("USAGE_WORKER__KAFKA__GROUP_ID", "usage-worker-clean")
        .set("USAGE_WORKER__TOPICS__USAGE_RESULTS", &clean_topics.usage_results)
        .set("USAGE_WORKER__TOPICS__USAGE_ALERTS", &clean_topics.usage_alerts)
        .set("USAGE_WORKER__TOPICS__DEAD_LETTERS", &clean_topics.dead_letters)
        .set("USAGE_WORKER__TOPICS__USAGE_PERIODS", &clean_topics.usage_periods)
        .set("USAGE_WORKER__HTTP__ENABLED", "false")
        .spawn()
}

/// SIGTERM, and up to 40 s to exit: what went wrong, unless it exited
/// with 0.
fn stop(w: &mut WorkerProcess, who: &str) -> anyhow::Result<Option<String>> {
    let status = w.terminate(Duration::from_secs(40))?;
    Ok(
        (!status.is_some_and(|s| s.success()))
            .then(|| format!("{who}: {status:?} on SIGTERM; see {}", w.log.display())),
    )
}

/// The chaos run's database on a private server, the clean run's on the
/// configured one.
struct Databases {
    clean_pool: PgPool,
    clean: ScratchDatabase,
    clean_url: String,
    chaos_url: String,
    pg: PrivatePostgres,
}

impl Databases {
    async fn set_up(settings: &Settings, keep: bool) -> anyhow::Result<Self> {
        let pg = PrivatePostgres::start(keep)?;
        let chaos_url = pg.url("usage_worker_chaos");
        ScratchDatabase::create_named(&chaos_url, "usage_worker_chaos").await?;
        // Connected again for the checks at the end: its connections would
        // only see the crashes.
        let chaos_pool = PgPool::connect(&chaos_url).await?;
        store::migrate(&chaos_pool).await?;
        chaos_pool.close().await;
        let clean = ScratchDatabase::create(&settings.database.url, "usage_worker_chaos").await?;
        let clean_url = local::without_tls(clean.url())?.to_string();
        let clean_pool = PgPool::connect(&clean_url).await?;
        store::migrate(&clean_pool).await?;
        Ok(Self {
            clean_pool,
            clean,
            clean_url,
            chaos_url,
            pg,
        })
    }
}

/// Readers of both runs' outputs: `[chaos, clean]`.
struct Readers {
    outcomes: [Arc<ResultReader>; 2],
    alerts: [ResultReader; 2],
    periods: [ResultReader; 2],
}

impl Readers {
    fn start(
        bootstrap: &str,
        topics: &[TopicSettings; 2],
        partitions: i32,
        hard_limits: Arc<HashMap<String, Decimal>>,
    ) -> anyhow::Result<Self> {
        let outcomes = |topic: &str| {
            let records = Records::Outcomes {
                keep_decisions: true,
                ledger: Some(hard_limits.clone()),
            };
            ResultReader::start(bootstrap, topic, partitions, records).map(Arc::new)
        };
        let alerts = |topic: &str| ResultReader::start(bootstrap, topic, partitions, Records::Alerts);
        let periods = |topic: &str| ResultReader::start(bootstrap, topic, partitions, Records::Periods);
        Ok(Self {
            outcomes: [outcomes(&topics[0].usage_results)?, outcomes(&topics[1].usage_results)?],
            alerts: [alerts(&topics[0].usage_alerts)?, alerts(&topics[1].usage_alerts)?],
            periods: [periods(&topics[0].usage_periods)?, periods(&topics[1].usage_periods)?],
        })
    }

    /// Waits up to `limit` until both runs have published `expected` period
    /// records: the last closes may still be in the sweep when the last
    /// outcome is read. What is missing then is the verdict's to say.
    async fn wait_for_periods(&self, expected: u64, limit: Duration) {
        let start = Instant::now();
        while self.periods.iter().any(|r| r.received() < expected) && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until each has read the last records on its topic, once the
    /// workers have stopped.
    fn catch_up(&self, bootstrap: &str, topics: &[TopicSettings; 2], partitions: i32) -> anyhow::Result<()> {
        for (reader, topic) in [
            (&*self.outcomes[0], &topics[0].usage_results),
            (&*self.outcomes[1], &topics[1].usage_results),
            (&self.alerts[0], &topics[0].usage_alerts),
            (&self.alerts[1], &topics[1].usage_alerts),
            (&self.periods[0], &topics[0].usage_periods),
            (&self.periods[1], &topics[1].usage_periods),
        ] {
            let highs = results::high_watermarks(bootstrap, topic, partitions)?;
            tokio::task::block_in_place(|| reader.wait_for(&highs, Duration::from_secs(60)))?;
        }
        Ok(())
    }
}

/// The run's world: the cluster and the topics of both runs, the two
/// databases, the readers and the workers. Fields drop in order: the
/// workers first, the cluster last.
struct World {
    pool: Pool,
    clean: WorkerProcess,
    readers: Readers,
    databases: Databases,
    kafka: Cluster,
    /// The chaos run's topics, then the clean run's (its own outputs).
    topics: [TopicSettings; 2],
}

impl World {
    /// The cluster, its topics and the databases; the subscriptions
    /// published, the readers and the workers started. The producer goes on
    /// to carry the load.
    async fn set_up(settings: &Settings, args: &ChaosArgs, work_dir: &Path) -> anyhow::Result<(Self, LoadProducer)> {
        let (kafka, topics) = start_cluster(settings, args, work_dir).await?;
        let databases = Databases::set_up(settings, args.keep).await?;
        announce(&kafka, &databases.pg);
        let bootstrap = kafka.bootstrap_servers();
        let producer = load::producer(
            bootstrap,
            &[
                ("enable.idempotence", "true"),
                ("socket.timeout.ms", "10000"),
                ("log_level", "3"),
            ],
        )?;
        load::publish_subscriptions(
            &producer,
            &topics[0].subscriptions,
            args.subscriptions,
            SMALL_EVERY,
            LimitMode::Quantity,
        )?;
        producer.flush(Duration::from_secs(30))?;
        let hard_limits = Arc::new(load::hard_limits(args.subscriptions, SMALL_EVERY));
        let readers = Readers::start(bootstrap, &topics, args.partitions, hard_limits)?;
        let clean = start_clean_worker(args, bootstrap, &databases, &topics[1], work_dir)?;
        let pool = Pool::start(args, bootstrap, &databases.chaos_url, work_dir)?;
        let world = Self {
            pool,
            clean,
            readers,
            databases,
            kafka,
            topics,
        };
        Ok((world, producer))
    }

    fn bootstrap(&self) -> &str {
        self.kafka.bootstrap_servers()
    }

    /// Fails when the clean worker has exited; a chaos worker that exited
    /// on its own is noted and started again.
    fn check_workers(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        if let Some(status) = self.clean.child.try_wait()? {
            bail!("the clean worker exited ({status}); see {}", self.clean.log.display());
        }
        self.pool.restart_exited(tally)
    }

    /// Everyone stops cleanly. A worker restarted a moment ago may not have
    /// installed its SIGTERM handler yet (a run on a fast broker can end
    /// right after the last kill): it is stopped once it answers over HTTP,
    /// which it does only after.
    async fn stop_workers(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        for slot in self.pool.live() {
            wait_for_answer(self.pool.ports[slot], Duration::from_secs(60), |answer| {
                answer.is_some()
            })
            .await;
            let w = self.pool.running[slot].as_mut().expect("live");
            if let Some(failure) = stop(w, &format!("worker {slot}"))? {
                tally.unexpected_exits.push(failure);
            }
        }
        if let Some(failure) = stop(&mut self.clean, "the clean worker")? {
            bail!("{failure}");
        }
        Ok(())
    }

    /// What the outputs and both databases say; the clean run's database is
    /// dropped after.
    async fn verdict(&self, input_highs: &[i64], expected: &ExpectedPeriods) -> anyhow::Result<Verdict> {
        let chaos_pool = PgPool::connect(&self.databases.chaos_url).await?;
        let clean_pool = &self.databases.clean_pool;
        let pools = [&chaos_pool, clean_pool];
        let verdict = Verdict::gather(input_highs, &self.readers, pools, &self.topics, expected).await?;
        chaos_pool.close().await;
        clean_pool.close().await;
        self.databases.clean.clone().drop_now().await?;
        Ok(verdict)
    }
}

/// The brokers, and the topics of both runs: the clean run's outputs have
/// names of their own.
async fn start_cluster(
    settings: &Settings,
    args: &ChaosArgs,
    work_dir: &Path,
) -> anyhow::Result<(Cluster, [TopicSettings; 2])> {
    let kafka = match args.broker {
        BrokerChoice::Mock => Cluster::start(BrokerKind::Mock, BROKERS)?,
        // Its log kept with the workers' logs.
        BrokerChoice::Tansu => Cluster::Tansu(TansuBroker::start(&work_dir.join("tansu.log"))?),
    };
    let topics = settings.topics.clone();
    kafka.create_topics(&topics.all(), args.partitions).await?;
    let clean_topics = TopicSettings {
        usage_results: format!("clean-{}", topics.usage_results),
        usage_alerts: format!("clean-{}", topics.usage_alerts),
        dead_letters: format!("clean-{}", topics.dead_letters),
        usage_periods: format!("clean-{}", topics.usage_periods),
        ..topics.clone()
    };
    kafka.create_topics(&clean_topics.outputs(), args.partitions).await?;
    Ok((kafka, [topics, clean_topics]))
}

fn announce(kafka: &Cluster, pg: &PrivatePostgres) {
    let bootstrap = kafka.bootstrap_servers();
    match kafka {
        Cluster::Mock(_) => eprintln!(
            "chaos: mock Kafka at {bootstrap} ({BROKERS} brokers), private PostgreSQL on port {}",
            pg.port()
        ),
        Cluster::Tansu(broker) => eprintln!(
            "chaos: tansu {} at {bootstrap} (pid {}, log {}), private PostgreSQL on port {}",
            test_kit::tansu::VERSION,
            broker.pid(),
            broker.log().display(),
            pg.port()
        ),
    }
}

/// The load, in its own thread, paced by the slower run.
struct Load {
    sent: Arc<AtomicU64>,
    producing: Arc<AtomicBool>,
    /// Where each round of closing periods ended them (see [`PeriodCloser`]).
    closes: Arc<Mutex<Vec<DateTime<Utc>>>>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Load {
    fn start(producer: LoadProducer, world: &World, args: &ChaosArgs, seed: u64) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let producing = Arc::new(AtomicBool::new(true));
        let closes = Arc::new(Mutex::new(Vec::new()));
        let closer = PeriodCloser {
            bootstrap: world.bootstrap().to_owned(),
            topics: world.topics[0].clone(),
            partitions: args.partitions,
            database_urls: [world.databases.chaos_url.clone(), world.databases.clean_url.clone()],
            subscriptions: (0..args.subscriptions).filter(|i| closes_periods(*i)).collect(),
            results: world.readers.outcomes.clone(),
            closes: closes.clone(),
            producing: producing.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let thread = {
            let (sent, producing) = (sent.clone(), producing.clone());
            let [chaos_results, clean_results] = world.readers.outcomes.clone();
            let (topic, partitions, events) = (world.topics[0].usage_events.clone(), args.partitions, args.events);
            let mut generator = Generator::new(args.subscriptions, seed).with_corrections(args.corrections_per_mille);
            // Where the stream pauses for a round of closes.
            let rounds = args.period_closes as u64;
            let mut pauses: Vec<u64> = (1..=rounds).map(|r| events * r / (rounds + 1)).collect();
            pauses.reverse();
            std::thread::spawn(move || -> anyhow::Result<()> {
                while sent.load(Ordering::Relaxed) < events && producing.load(Ordering::Relaxed) {
                    let n = sent.load(Ordering::Relaxed);
                    if pauses.last() == Some(&n) {
                        pauses.pop();
                        closer.close_round(&producer)?;
                        continue;
                    }
                    let done = chaos_results.received().min(clean_results.received());
                    if n.saturating_sub(done) >= MAX_IN_FLIGHT {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let until = pauses.last().copied().unwrap_or(events);
                    for _ in 0..(MAX_IN_FLIGHT - n.saturating_sub(done)).min(until - n).min(500) {
                        load::send_next(&producer, &topic, partitions, &mut generator)?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                producer.flush(Duration::from_secs(120))?;
                Ok(())
            })
        };
        Self {
            sent,
            producing,
            closes,
            thread,
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Where the rounds of closes so far ended the periods.
    fn closes(&self) -> Vec<DateTime<Utc>> {
        self.closes.lock().unwrap().clone()
    }

    fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops producing and waits for the thread: an error if it panicked,
    /// else what it returned.
    fn stop(self) -> anyhow::Result<anyhow::Result<()>> {
        self.producing.store(false, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))
    }
}

/// Ends the current periods of the closing subscriptions at an instant
/// that no decision of either run can straddle, so that both runs decide
/// the same and close the same:
/// 1. the stream pauses until both runs have decided every message on it
///    (so what was sent before counts in the old periods, in both runs);
/// 2. T = now: a new snapshot of each closing subscription names a new
///    period from T, which cuts the old one short at T; the stream waits
///    until both databases have applied it (a worker decides a batch
///    after a bounded wait for snapshots, and the wait is not what this
///    run is about);
/// 3. the stream goes on once T + grace has passed: from then on every
///    report has a time after T (the new period) and every correction of
///    an old period's usage is `period_closed`, in both runs. The sweeps
///    close the old periods meanwhile, at T + grace by the database's
///    clock, and the driver kills a worker right then.
struct PeriodCloser {
    bootstrap: String,
    /// The chaos run's topics: the input and the subscriptions.
    topics: TopicSettings,
    partitions: i32,
    /// The chaos run's database, then the clean run's.
    database_urls: [String; 2],
    subscriptions: Vec<u64>,
    results: [Arc<ResultReader>; 2],
    closes: Arc<Mutex<Vec<DateTime<Utc>>>>,
    producing: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
}

impl PeriodCloser {
    fn close_round(&self, producer: &LoadProducer) -> anyhow::Result<()> {
        producer.flush(Duration::from_secs(120))?;
        let highs = results::high_watermarks(&self.bootstrap, &self.topics.usage_events, self.partitions)?;
        let inputs = highs.iter().sum::<i64>() as u64;
        while self.results.iter().any(|r| r.received() < inputs) {
            if !self.producing.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let round = self.closes.lock().unwrap().len() as u64;
        // Whole milliseconds: message timestamps are, so every message sent
        // from now on has a time at or after T.
        let now = Utc::now();
        let at = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        let version = round + 2;
        for i in &self.subscriptions {
            let (key, snapshot) = load::subscription_snapshot(
                *i,
                SMALL_EVERY,
                LimitMode::Quantity,
                version,
                at,
                at + chrono::Duration::days(30),
            );
            load::send(producer, &self.topics.subscriptions, None, &key, &snapshot)?;
        }
        producer.flush(Duration::from_secs(60))?;
        for url in &self.database_urls {
            self.runtime.block_on(self.wait_until_applied(url, version))?;
        }
        self.closes.lock().unwrap().push(at);
        let open_again = at + chrono::Duration::seconds(PERIOD_GRACE_SECS) + chrono::Duration::milliseconds(100);
        if let Ok(wait) = (open_again - Utc::now()).to_std() {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    /// Until the database holds `version` of every closing subscription,
    /// across the chaos run's database crashes; up to 5 minutes.
    async fn wait_until_applied(&self, url: &str, version: u64) -> anyhow::Result<()> {
        let ids: Vec<String> = self.subscriptions.iter().map(|i| format!("sub_{i}")).collect();
        let started = Instant::now();
        loop {
            let applied = async {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE id = ANY($1) AND version >= $2")
                        .bind(&ids)
                        .bind(version as i64)
                        .fetch_one(&mut conn)
                        .await?;
                conn.close().await?;
                anyhow::Ok(n as usize)
            };
            if let Ok(n) = applied.await {
                if n == ids.len() {
                    return Ok(());
                }
            }
            if !self.producing.load(Ordering::Relaxed) {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "the snapshots of closes round {version} were not applied within 5 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn run(settings: Settings, args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut rng = Rng(seed);
    let args = fit_to_broker(args);
    let plan = plan(&args, &mut rng);
    let started = Instant::now();
    let work_dir = std::env::temp_dir().join(format!("usage-worker-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    eprintln!(
        "chaos: seed {seed} (--seed {seed} replays this plan); logs in {}",
        work_dir.display()
    );

    let (mut world, producer) = World::set_up(&settings, &args, &work_dir).await?;
    let load = Load::start(producer, &world, &args, seed);
    let mut tally = Tally::default();
    let rngs = Rngs {
        plan: rng,
        // The kills at closes draw from a stream of their own, so that the
        // planned injections draw what they would without them.
        closes: Rng((seed ^ 0x9E37_79B9_7F4A_7C15).max(1)),
    };
    let driven = drive(&mut world, &args, &load, plan, rngs, &mut tally, started).await;
    let closes = load.closes();
    let produced = load.stop()?;
    let input_highs = match (driven, produced) {
        (Ok(input_highs), Ok(())) => input_highs,
        (Err(e), _) | (Ok(_), Err(e)) => {
            logs_kept(&work_dir);
            return Err(e);
        }
    };
    let closed_periods = (closes.len() * closing_subscriptions(&args).len()) as u64;
    world
        .readers
        .wait_for_periods(closed_periods, Duration::from_secs(60))
        .await;
    world.stop_workers(&mut tally).await?;
    world
        .readers
        .catch_up(world.bootstrap(), &world.topics, args.partitions)?;

    let statement_timeouts = statement_timeouts(&work_dir, args.workers + 1);
    let expected = ExpectedPeriods {
        subscriptions: closing_subscriptions(&args),
        closes,
    };
    let verdict = world.verdict(&input_highs, &expected).await?;
    let report = Report {
        seed,
        period_closes: args.period_closes,
        events: args.events,
        inputs: input_highs.iter().sum::<i64>() as u64,
        seconds: started.elapsed().as_secs_f64(),
        workers: args.workers,
        tally,
        verdict,
        statement_timeouts,
    };
    report.finish(&args, &work_dir)
}

/// The subscriptions whose periods close during the run.
fn closing_subscriptions(args: &ChaosArgs) -> Vec<String> {
    (0..args.subscriptions)
        .filter(|i| closes_periods(*i))
        .map(|i| format!("sub_{i}"))
        .collect()
}

/// On tansu no broker outages: only the mock cluster can take its brokers
/// down and up again.
fn fit_to_broker(mut args: ChaosArgs) -> ChaosArgs {
    if args.broker == BrokerChoice::Tansu && args.broker_outages > 0 {
        eprintln!(
            "chaos: on tansu, broker outages are not injected (--broker-outages {} skipped): \
             only the mock cluster can take its brokers down and up again",
            args.broker_outages
        );
        args.broker_outages = 0;
    }
    args
}

fn logs_kept(work_dir: &Path) {
    eprintln!("chaos: logs kept in {}", work_dir.display());
}

/// "statement timeout" in the chaos workers' logs.
fn statement_timeouts(work_dir: &Path, slots: usize) -> usize {
    (0..slots)
        .map(|slot| {
            std::fs::read_to_string(work_dir.join(format!("worker-{slot}.log")))
                .map(|log| log.matches("statement timeout").count())
                .unwrap_or(0)
        })
        .sum()
}

/// Drives the run until both runs have an outcome for every input,
/// injecting each planned fault at its point of progress, one at a time:
/// the input's high watermarks, read once the load has finished.
/// The planned injections' random draws, and the kills at closes'.
struct Rngs {
    plan: Rng,
    closes: Rng,
}

async fn drive(
    world: &mut World,
    args: &ChaosArgs,
    load: &Load,
    plan: Vec<(f64, Injection)>,
    rngs: Rngs,
    tally: &mut Tally,
    started: Instant,
) -> anyhow::Result<Vec<i64>> {
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut pending = plan.into_iter().peekable();
    let mut input_highs: Option<Vec<i64>> = None;
    let mut progress = Progress::every(Duration::from_secs(2));
    let mut closes_seen = 0;
    let (mut last_received, mut last_progress) = (0, Instant::now());
    let Rngs {
        plan: mut rng,
        closes: mut close_rng,
    } = rngs;
    let rng = &mut rng;
    let driven = async {
        loop {
            anyhow::ensure!(Instant::now() < deadline, "gave up after {} s", args.timeout_secs);
            world.check_workers(tally)?;
            // A round of periods just ended: they close at its end plus the
            // grace, while a worker is down.
            if let Some(at) = load.closes().get(closes_seen) {
                closes_seen += 1;
                tally.note(format!(
                    "periods of round {closes_seen} ended at {}",
                    at.format("%H:%M:%S%.3f")
                ));
            }
            if tally.kills_at_closes < closes_seen.min(kills_at_closes(args) as usize) as u32 {
                kill(&mut world.pool, &mut close_rng, tally).await?;
                tally.kills_at_closes += 1;
                // The planned injections go on once the workers are ready
                // again: this kill is placed by the closes, not by the plan,
                // and is not meant to stack with the next planned injection
                // (a kill whose restarted worker rejoins during a broker
                // outage, say) in a way the plan alone would not.
                for slot in world.pool.live() {
                    wait_for_readiness(Some(world.pool.ports[slot]), true, Duration::from_secs(30)).await;
                }
            }
            let received = world.readers.outcomes[0].received();
            if received != last_received {
                (last_received, last_progress) = (received, Instant::now());
            }
            let share = received as f64 / args.events as f64;
            // Stalled: no outcome for a while although messages wait for one.
            let stalled = last_progress.elapsed() >= STALLED && received < load.sent();
            if let Some(&(at, injection)) = pending.peek() {
                // The plan goes by progress, which stops while the load
                // waits for both runs before a close: a chaos run stuck
                // then (on tansu, partitions left with a killed member
                // until a membership change, docs/brokers.md) would never
                // reach its next point. After STALLED without an outcome,
                // the next injection comes at once.
                if share >= at || stalled {
                    pending.next();
                    if stalled && share < at {
                        tally.note(format!("no outcome for {} s: the next injection now", STALLED.as_secs()));
                        tally.early_injections += 1;
                    }
                    inject(injection, rng, world, tally, args.workers).await?;
                    last_progress = Instant::now();
                }
            } else if stalled {
                // Stalled with no injection left to come: a kill is the
                // membership change that frees what a dead member holds.
                tally.note(format!("no outcome for {} s and nothing planned: a kill", STALLED.as_secs()));
                tally.early_injections += 1;
                kill(&mut world.pool, &mut close_rng, tally).await?;
                last_progress = Instant::now();
            }
            let [chaos_results, clean_results] = &world.readers.outcomes;
            if input_highs.is_none() && load.finished() {
                input_highs = Some(results::high_watermarks(
                    world.bootstrap(),
                    &world.topics[0].usage_events,
                    args.partitions,
                )?);
            }
            if let Some(highs) = &input_highs {
                let inputs = highs.iter().sum::<i64>() as u64;
                if pending.peek().is_none() && chaos_results.received() >= inputs && clean_results.received() >= inputs
                {
                    return Ok(highs.clone());
                }
            }
            if progress.due() {
                progress.show(&format!(
                    "chaos: {:>4.0}s {} sent, {} decided, {} clean; {} kills, {} PostgreSQL restarts, {} broker outages, {} slow, {} joins",
                    started.elapsed().as_secs_f64(),
                    load.sent(),
                    chaos_results.received(),
                    clean_results.received(),
                    tally.kills,
                    tally.pg_restarts,
                    tally.broker_outages,
                    tally.slow_db,
                    tally.joins
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    .await;
    progress.end();
    driven
}

/// One injection, by its kind.
async fn inject(
    injection: Injection,
    rng: &mut Rng,
    world: &mut World,
    tally: &mut Tally,
    workers: usize,
) -> anyhow::Result<()> {
    match injection {
        Injection::Kill => kill(&mut world.pool, rng, tally).await,
        Injection::Join => join(&mut world.pool, workers, tally),
        Injection::Leave => leave(&mut world.pool, workers, tally),
        Injection::BrokerOutage => broker_outage(&world.kafka, rng, tally).await,
        Injection::SlowDb => slow_database(&world.databases.chaos_url, rng, tally).await,
        Injection::PgRestart => pg_restart(&world.pool, &world.databases.pg, rng, tally).await,
    }
}

/// kill -9 of a live worker, started again after up to 1.5 s.
async fn kill(pool: &mut Pool, rng: &mut Rng, tally: &mut Tally) -> anyhow::Result<()> {
    let live = pool.live();
    let slot = live[rng.below(live.len() as u64) as usize];
    pool.running[slot].take().expect("live").kill()?;
    tally.kills += 1;
    tally.note(format!("kill -9 worker {slot}"));
    tokio::time::sleep(rng.millis(0, 1500)).await;
    pool.spawn(slot)
}

/// The extra worker joins the group.
fn join(pool: &mut Pool, slot: usize, tally: &mut Tally) -> anyhow::Result<()> {
    pool.spawn(slot)?;
    tally.joins += 1;
    tally.note(format!("worker {slot} joins"));
    Ok(())
}

/// The extra worker leaves the group (SIGTERM), if it runs.
fn leave(pool: &mut Pool, slot: usize, tally: &mut Tally) -> anyhow::Result<()> {
    if let Some(mut w) = pool.running[slot].take() {
        tally.note(format!("worker {slot} leaves (SIGTERM)"));
        if let Some(failure) = stop(&mut w, "leaving worker")? {
            tally.unexpected_exits.push(failure);
        }
        tally.leaves += 1;
    }
    Ok(())
}

/// One or all of the mock's brokers down for 1 to 5 s.
async fn broker_outage(kafka: &Cluster, rng: &mut Rng, tally: &mut Tally) -> anyhow::Result<()> {
    let Cluster::Mock(kafka) = kafka else {
        bail!("broker outages need the mock cluster");
    };
    let brokers: Vec<i32> = if rng.below(2) == 0 {
        (1..=BROKERS).collect()
    } else {
        vec![1 + rng.below(BROKERS as u64) as i32]
    };
    for b in &brokers {
        kafka.broker_down(*b)?;
    }
    tally.note(format!("brokers {brokers:?} down"));
    tokio::time::sleep(rng.millis(1000, 5000)).await;
    for b in &brokers {
        kafka.broker_up(*b)?;
    }
    tally.note(format!("brokers {brokers:?} up"));
    tally.broker_outages += 1;
    Ok(())
}

/// A table of the chaos run's database locked for up to twice the
/// workers' statement timeout.
async fn slow_database(chaos_url: &str, rng: &mut Rng, tally: &mut Tally) -> anyhow::Result<()> {
    let table = ["consumer_offsets", "service_periods", "usages", "outbox"][rng.below(4) as usize];
    let hold = rng.millis(STATEMENT_TIMEOUT_MS / 3, STATEMENT_TIMEOUT_MS * 2);
    tally.note(format!("{table} locked for {} ms", hold.as_millis()));
    let mut conn = sqlx::PgConnection::connect(chaos_url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *tx)
        .await?;
    tokio::time::sleep(hold).await;
    tx.commit().await?;
    conn.close().await?;
    tally.slow_db += 1;
    Ok(())
}

/// The private PostgreSQL crashes and, 2 to 6 s later, starts again; a
/// ready worker's readiness and the workers' CPU are watched meanwhile.
async fn pg_restart(pool: &Pool, pg: &PrivatePostgres, rng: &mut Rng, tally: &mut Tally) -> anyhow::Result<()> {
    let live = pool.live();
    let watched = watch_a_ready_worker(pool, &live, rng).await;
    let pids: Vec<&WorkerProcess> = live.iter().filter_map(|s| pool.running[*s].as_ref()).collect();
    let cpu_before: Vec<Duration> = pids.iter().map(|w| w.cpu_time()).collect::<anyhow::Result<_>>()?;
    let down = rng.millis(2000, 6000);
    pg.crash()?;
    tally.note("PostgreSQL crashed".into());
    let crashed = Instant::now();
    let watched_port = watched.map(|slot| pool.ports[slot]);
    let not_ready_after = wait_for_readiness(watched_port, false, Duration::from_secs(10)).await;
    let rest = down.saturating_sub(crashed.elapsed());
    tokio::time::sleep(rest).await;
    let max_cpu_percent = busiest_cpu_percent(&pids, &cpu_before, crashed.elapsed());
    let down = crashed.elapsed();
    pg.start_server()?;
    tally.note("PostgreSQL restarted".into());
    let restarted = Instant::now();
    let ready_again_after = wait_for_readiness(watched_port, true, Duration::from_secs(60)).await;
    tally.pg_restarts += 1;
    tally.outages.push(PgOutage {
        watched,
        down,
        not_ready_after,
        ready_again_after: ready_again_after.map(|_| restarted.elapsed()),
        max_cpu_percent,
    });
    Ok(())
}

/// A worker that is ready now, picked at random, to be watched: it must
/// report not ready while the database is down and ready again after, by
/// itself. (One still joining the group, say after a broker outage, is not
/// ready for reasons of its own.) None when none is ready within 30 s.
async fn watch_a_ready_worker(pool: &Pool, live: &[usize], rng: &mut Rng) -> Option<usize> {
    let mut ready = Vec::new();
    let asked = Instant::now();
    while ready.is_empty() && asked.elapsed() < Duration::from_secs(30) {
        for slot in live {
            if readyz(pool.ports[*slot]).await == Some(true) {
                ready.push(*slot);
            }
        }
        if ready.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (!ready.is_empty()).then(|| ready[rng.below(ready.len() as u64) as usize])
}

/// The CPU the busiest of these workers used over `elapsed`, in percent of
/// one core.
fn busiest_cpu_percent(workers: &[&WorkerProcess], cpu_before: &[Duration], elapsed: Duration) -> f64 {
    workers
        .iter()
        .zip(cpu_before)
        .map(|(w, before)| {
            let used = w.cpu_time().unwrap_or(*before).saturating_sub(*before);
            100.0 * used.as_secs_f64() / elapsed.as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// How long until the watched worker's `/readyz` answers ready (or not),
/// if within `limit`; None when no worker is watched.
async fn wait_for_readiness(port: Option<u16>, ready: bool, limit: Duration) -> Option<Duration> {
    let port = port?;
    wait_for_answer(port, limit, |answer| answer == Some(ready)).await
}

/// How long until `/readyz` gives an answer that `wanted` accepts (None:
/// none given), if within `limit`.
async fn wait_for_answer(port: u16, limit: Duration, wanted: impl Fn(Option<bool>) -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if wanted(readyz(port).await) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// True on 200, false on 503, None when it does not answer.
async fn readyz(port: u16) -> Option<bool> {
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let status_line = String::from_utf8_lossy(&response).lines().next()?.to_owned();
        match status_line.split_whitespace().nth(1)? {
            "200" => Some(true),
            "503" => Some(false),
            _ => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.ok().flatten()
}

/// The periods that must have closed: per round, the current period of
/// each closing subscription, ended at that round's instant.
struct ExpectedPeriods {
    subscriptions: Vec<String>,
    /// Where each round ended the periods, in order.
    closes: Vec<DateTime<Utc>>,
}

/// A period that must have closed.
struct ExpectedPeriod {
    subscription: String,
    /// None for the first round's periods, which started with the run's
    /// first snapshot (not checked).
    start: Option<DateTime<Utc>>,
    end: DateTime<Utc>,
}

impl ExpectedPeriods {
    /// Each period that must have closed: the first round's started with
    /// the run's first snapshot, later ones at the round before.
    fn periods(&self) -> Vec<ExpectedPeriod> {
        let mut periods = Vec::new();
        for (round, end) in self.closes.iter().enumerate() {
            let start = round.checked_sub(1).map(|r| self.closes[r]);
            for sub in &self.subscriptions {
                periods.push(ExpectedPeriod {
                    subscription: sub.clone(),
                    start,
                    end: *end,
                });
            }
        }
        periods
    }
}

/// What the ledgers of one run's outcomes found (see `ledger.rs`).
#[derive(Debug, Default, Clone)]
struct LedgerFindings {
    /// Outcomes that raised a period over its hard limit.
    over_limit: u64,
    /// Outcomes at odds with the usage they name.
    inconsistent: u64,
    /// Outcomes by status, rejections by code.
    counts: std::collections::BTreeMap<String, u64>,
}

/// What one run's `usage-periods` held against the periods that closed.
#[derive(Debug, Default, Clone)]
struct PeriodFindings {
    /// Records read (first copies).
    records: u64,
    /// Closed periods without a record.
    missing: u64,
    /// Records of periods that did not close.
    unexpected: u64,
    /// Records whose closing (grace, end + grace, no invoice, no price)
    /// or totals (recomputed from the run's outcomes) are wrong.
    wrong: u64,
}

/// What the output topics and the databases say, chaos run against clean.
#[derive(Debug, Default)]
struct Verdict {
    outcomes: [Check; 2],
    alerts: [Check; 2],
    period_checks: [Check; 2],
    /// Decisions stored, and distinct input offsets among them.
    decisions: [(i64, i64); 2],
    /// A created outcome whose usage is not stored.
    usages_lost: u64,
    /// A stored usage without a created outcome, or a period whose `used`
    /// is not the sum of its usages that count.
    counted_twice: u64,
    over_limit: i64,
    /// Alerts on the topic against the alerts table.
    alerts_on_topic: [i64; 2],
    alerts_stored: [i64; 2],
    ledgers: [LedgerFindings; 2],
    periods_expected: u64,
    periods: [PeriodFindings; 2],
    decisions_mismatched: u64,
    alerts_mismatched: u64,
    periods_mismatched: u64,
    period_records_mismatched: u64,
    examples: Vec<String>,
}

impl Verdict {
    async fn gather(
        input_highs: &[i64],
        readers: &Readers,
        pools: [&PgPool; 2],
        topics: &[TopicSettings; 2],
        expected: &ExpectedPeriods,
    ) -> anyhow::Result<Self> {
        let (outcomes, alerts) = (&readers.outcomes, &readers.alerts);
        let mut v = Verdict {
            outcomes: [outcomes[0].check(input_highs), outcomes[1].check(input_highs)],
            alerts: [alerts[0].check(&[]), alerts[1].check(&[])],
            period_checks: [readers.periods[0].check(&[]), readers.periods[1].check(&[])],
            ..Verdict::default()
        };
        let decided = [outcomes[0].summaries(), outcomes[1].summaries()];
        let alerted = [alerts[0].summaries(), alerts[1].summaries()];
        v.alerts_on_topic = [alerted[0].len() as i64, alerted[1].len() as i64];
        let mut periods: [HashMap<String, Decimal>; 2] = Default::default();
        let records = [readers.periods[0].period_records(), readers.periods[1].period_records()];
        for run in 0..2 {
            periods[run] = v.read_database(run, pools[run], &topics[run], &outcomes[run]).await?;
            v.read_ledger(run, &outcomes[run], &records[run], expected);
        }
        v.compare(&decided, &alerted, &periods);
        for (key, chaos, clean) in differing(&records) {
            v.period_records_mismatched += 1;
            v.example(format!(
                "period record {key:?}: chaos run {chaos:?}, clean run {clean:?}"
            ));
        }
        Ok(v)
    }

    /// One run's database: its decisions and alerts stored, its periods
    /// and its usages against the created outcomes on its topic. Each
    /// period's `used`, for comparison.
    async fn read_database(
        &mut self,
        run: usize,
        pool: &PgPool,
        topics: &TopicSettings,
        outcomes: &ResultReader,
    ) -> anyhow::Result<HashMap<String, Decimal>> {
        self.decisions[run] = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (b.source_partition, o.offset_)) FROM outbox_batches b
             CROSS JOIN LATERAL unnest(b.source_offsets) AS o(offset_)
             WHERE b.topic = $1 AND b.source_topic = $2",
        )
        .bind(&topics.usage_results)
        .bind(&topics.usage_events)
        .fetch_one(pool)
        .await?;
        self.alerts_stored[run] = sqlx::query_scalar("SELECT count(*) FROM limit_alerts")
            .fetch_one(pool)
            .await?;
        let periods = self.check_periods(run, pool).await?;
        self.check_usages(run, pool, outcomes).await?;
        Ok(periods)
    }

    /// Each period's `used` is the sum of its usages that count (not
    /// voided, at their latest quantity), and within its hard limit. Each
    /// period's `used`.
    async fn check_periods(&mut self, run: usize, pool: &PgPool) -> anyhow::Result<HashMap<String, Decimal>> {
        let rows: Vec<(String, Option<Decimal>, Decimal, Decimal)> = sqlx::query_as(
            "SELECT p.subscription_id || ' ' || p.start_time, p.hard_limit, p.used,
                    coalesce(sum(u.quantity) FILTER (WHERE u.voided_time IS NULL), 0)
             FROM service_periods p LEFT JOIN usages u
               ON u.subscription_id = p.subscription_id AND u.period_start_time = p.start_time
             GROUP BY p.subscription_id, p.start_time, p.hard_limit, p.used",
        )
        .fetch_all(pool)
        .await?;
        let mut periods = HashMap::new();
        for (period, limit, used, sum) in rows {
            if used != sum {
                self.counted_twice += 1;
                self.example(format!("run {run}: {period}: used {used}, its usages sum to {sum}"));
            }
            if limit.is_some_and(|l| used > l) {
                self.over_limit += 1;
                self.example(format!(
                    "run {run}: {period}: used {used} over the hard limit {limit:?}"
                ));
            }
            periods.insert(period, used);
        }
        Ok(periods)
    }

    /// Created outcomes on the topic (the ledger's usages) against usages
    /// in the table, and each stored quantity and void against the
    /// outcomes' latest.
    async fn check_usages(&mut self, run: usize, pool: &PgPool, outcomes: &ResultReader) -> anyhow::Result<()> {
        let stored: Vec<(String, Decimal, bool)> =
            sqlx::query_as("SELECT id, quantity, voided_time IS NOT NULL FROM usages")
                .fetch_all(pool)
                .await?;
        let stored: HashMap<String, (Decimal, bool)> = stored.into_iter().map(|(id, q, v)| (id, (q, v))).collect();
        let (lost, differ, extra) = outcomes
            .with_ledger(|ledger| {
                let lost: Vec<String> = ledger
                    .usage_ids()
                    .filter(|id| !stored.contains_key(*id))
                    .cloned()
                    .collect();
                let differ: Vec<String> = stored
                    .iter()
                    .filter_map(|(id, (quantity, voided))| {
                        let usage = ledger.usage(id)?;
                        (usage.quantity != *quantity || usage.voided != *voided).then(|| {
                            format!(
                                "{id}: stored {quantity} voided {voided}, the outcomes say {} voided {}",
                                usage.quantity, usage.voided
                            )
                        })
                    })
                    .collect();
                let extra: Vec<String> = stored.keys().filter(|id| ledger.usage(id).is_none()).cloned().collect();
                (lost, differ, extra)
            })
            .context("the outcome reader keeps no ledger")?;
        for id in lost {
            self.usages_lost += 1;
            self.example(format!("run {run}: usage {id} created on the topic, not stored"));
        }
        for id in extra {
            self.counted_twice += 1;
            self.example(format!("run {run}: usage {id} stored without a created outcome"));
        }
        for what in differ {
            self.ledgers[run].inconsistent += 1;
            self.example(format!("run {run}: usage {what}"));
        }
        Ok(())
    }

    /// The run's ledger of its outcomes, and its period records against
    /// the periods that closed and the totals the ledger recomputes.
    fn read_ledger(
        &mut self,
        run: usize,
        outcomes: &ResultReader,
        records: &HashMap<Key, PeriodRecord>,
        expected: &ExpectedPeriods,
    ) {
        let expected_periods = expected.periods();
        self.periods_expected = expected_periods.len() as u64;
        let found = outcomes.with_ledger(|ledger| {
            let findings = LedgerFindings {
                over_limit: ledger.over_limit,
                inconsistent: ledger.inconsistent,
                counts: ledger.counts.clone(),
            };
            let mut examples = ledger.examples.clone();
            let periods = check_period_records(records, &expected_periods, ledger, &mut examples);
            (findings, periods, examples)
        });
        let Some((findings, periods, examples)) = found else {
            self.example(format!("run {run}: the outcome reader keeps no ledger"));
            self.ledgers[run].inconsistent += 1;
            return;
        };
        self.ledgers[run].over_limit += findings.over_limit;
        self.ledgers[run].inconsistent += findings.inconsistent;
        self.ledgers[run].counts = findings.counts;
        self.periods[run] = periods;
        for e in examples {
            self.example(format!("run {run}: {e}"));
        }
    }

    /// The chaos run against the clean one: the same decision for each
    /// input both decided, the same alerts, the same `used` in each period.
    fn compare(
        &mut self,
        decided: &[HashMap<Key, String>; 2],
        alerted: &[HashMap<Key, String>; 2],
        periods: &[HashMap<String, Decimal>; 2],
    ) {
        for (key, chaos) in &decided[0] {
            if let Some(clean) = decided[1].get(key) {
                if chaos != clean {
                    self.decisions_mismatched += 1;
                    self.example(format!("{key:?}: chaos run {chaos:?}, clean run {clean:?}"));
                }
            }
        }
        for (key, chaos, clean) in differing(alerted) {
            self.alerts_mismatched += 1;
            self.example(format!("alert {key:?}: chaos run {chaos:?}, clean run {clean:?}"));
        }
        for (key, chaos, clean) in differing(periods) {
            self.periods_mismatched += 1;
            self.example(format!(
                "period {key}: used {chaos:?} in the chaos run, {clean:?} clean"
            ));
        }
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }

    fn lost(&self) -> u64 {
        self.outcomes[0].missing + self.usages_lost + self.periods[0].missing
    }

    fn duplicated(&self) -> u64 {
        self.outcomes[0].duplicated + self.counted_twice + self.period_checks[0].duplicated
    }

    fn mismatched(&self) -> u64 {
        self.decisions_mismatched + self.alerts_mismatched + self.periods_mismatched + self.period_records_mismatched
    }

    /// What the ledgers and the period records found wrong, both runs.
    fn ledger_and_period_faults(&self) -> u64 {
        self.ledgers
            .iter()
            .map(|l| l.over_limit + l.inconsistent)
            .chain(self.periods.iter().map(|p| p.missing + p.unexpected + p.wrong))
            .sum()
    }
}

/// One run's period records against the periods that must have closed
/// (exactly one `usage-period-closed` each: a second one is a duplicate in
/// the reader's check, whatever its record id) and against the ledger:
/// closed by grace at end + grace, no invoice, no price, and the totals and
/// digest of the usages whose time falls in the period, at their latest
/// quantity, voided ones apart.
fn check_period_records(
    records: &HashMap<Key, PeriodRecord>,
    expected: &[ExpectedPeriod],
    ledger: &crate::ledger::Ledger,
    examples: &mut Vec<String>,
) -> PeriodFindings {
    let mut findings = PeriodFindings {
        records: records.len() as u64,
        ..PeriodFindings::default()
    };
    let mut note = |what: String| {
        if examples.len() < 10 {
            examples.push(what);
        }
    };
    let mut by_end: HashMap<(&str, DateTime<Utc>), &PeriodRecord> = HashMap::new();
    for record in records.values() {
        match record.end() {
            Ok(end) => {
                by_end.insert((record.subscription_id.as_str(), end), record);
            }
            Err(e) => note(format!("period record of {}: {e}", record.subscription_id)),
        }
    }
    let mut matched = 0;
    for ExpectedPeriod {
        subscription: sub,
        start,
        end,
    } in expected
    {
        let end_text = end.to_rfc3339();
        let Some(record) = by_end.get(&(sub.as_str(), *end)) else {
            findings.missing += 1;
            note(format!("no record of the period of {sub} ending {end_text}"));
            continue;
        };
        matched += 1;
        let mut faults = Vec::new();
        let record_start = record.start();
        if start.is_some() && record_start != Ok(*start) {
            faults.push(format!("starts {:?}, not {start:?}", record.period_start_time));
        }
        if record.kind != "usage-period-closed" || record.closed_by != "grace" {
            faults.push(format!("{} by {}", record.kind, record.closed_by));
        }
        if record.closed() != Ok(*end + chrono::Duration::seconds(PERIOD_GRACE_SECS)) {
            faults.push(format!("closed {}, its end plus the grace is not", record.closed_time));
        }
        if record.invoice_id.is_some() || record.amount.is_some() || record.currency.is_some() {
            faults.push("an invoice or a price where there is none".into());
        }
        match record_start {
            Ok(record_start) => {
                let (totals, elsewhere) = ledger.period_totals(sub, record_start, *end);
                let stated = crate::ledger::Totals {
                    usage_count: record.usage_count,
                    quantity: record.quantity,
                    voided_count: record.voided_count,
                    digest: record.digest.clone(),
                };
                if stated != totals {
                    faults.push(format!("states {stated:?}, the outcomes make {totals:?}"));
                }
                if elsewhere > 0 {
                    faults.push(format!("{elsewhere} of its usages counted in another period"));
                }
            }
            Err(e) => faults.push(e),
        }
        if !faults.is_empty() {
            findings.wrong += 1;
            note(format!(
                "period record of {sub} ending {end_text}: {}",
                faults.join("; ")
            ));
        }
    }
    findings.unexpected = findings.records - matched;
    if findings.unexpected > 0 {
        note(format!("{} records of periods that did not close", findings.unexpected));
    }
    findings
}

/// The keys of either map whose values differ between the two (one
/// missing counts), with both values.
fn differing<K: Eq + Hash, V: PartialEq>(maps: &[HashMap<K, V>; 2]) -> Vec<(&K, Option<&V>, Option<&V>)> {
    let keys: HashSet<&K> = maps[0].keys().chain(maps[1].keys()).collect();
    keys.into_iter()
        .map(|key| (key, maps[0].get(key), maps[1].get(key)))
        .filter(|(_, chaos, clean)| chaos != clean)
        .collect()
}

struct Report {
    seed: u64,
    /// Rounds of closes asked for.
    period_closes: u32,
    events: u64,
    inputs: u64,
    seconds: f64,
    workers: usize,
    tally: Tally,
    verdict: Verdict,
    statement_timeouts: usize,
}

impl Report {
    fn passed(&self) -> bool {
        let v = &self.verdict;
        let inputs = self.inputs as i64;
        v.lost() == 0
            && v.duplicated() == 0
            && v.over_limit == 0
            && v.mismatched() == 0
            && v.outcomes.iter().chain(&v.alerts).chain(&v.period_checks).all(Check::ok)
            && v.ledger_and_period_faults() == 0
            // Closes are compared only if some happened.
            && (self.period_closes == 0 || v.periods_expected > 0)
            && v.decisions.iter().all(|d| *d == (inputs, inputs))
            && v.alerts_stored == v.alerts_on_topic
            // Alerts are compared only if some were raised.
            && v.alerts_on_topic[1] > 0
            && self.tally.unexpected_exits.is_empty()
            && self.tally.outages.iter().all(PgOutage::ok)
            && (self.tally.outages.is_empty() || self.tally.outages.iter().any(|o| o.watched.is_some()))
    }

    fn print(&self) {
        println!("\n== usage-lab chaos ==");
        println!("seed                 {}", self.seed);
        println!(
            "events               {} produced, {} input messages (broker repeats of the load included), {:.0} s",
            self.events, self.inputs, self.seconds
        );
        self.print_injections();
        self.print_outputs();
        self.print_failures();
        println!(
            "result               {}",
            if self.passed() { "PASSED" } else { "FAILED" }
        );
    }

    /// What was done to the chaos run.
    fn print_injections(&self) {
        let t = &self.tally;
        println!(
            "workers              {} in the group, {} joined and {} left",
            self.workers, t.joins, t.leaves
        );
        println!(
            "kills (SIGKILL)      {} ({} of them as periods closed)",
            t.kills, t.kills_at_closes
        );
        if t.early_injections > 0 {
            println!(
                "early injections     {} (the run went {} s without an outcome)",
                t.early_injections,
                STALLED.as_secs()
            );
        }
        println!("PostgreSQL restarts  {}", t.pg_restarts);
        for o in &t.outages {
            println!("  {}", o.describe());
        }
        println!("broker outages       {}", t.broker_outages);
        println!(
            "slow database        {} table locks, {} statement timeouts in the logs",
            t.slow_db, self.statement_timeouts
        );
    }

    /// What both runs produced, and what the checks found.
    fn print_outputs(&self) {
        let v = &self.verdict;
        println!(
            "outcomes             {} chaos, {} clean, decisions stored {} / {}",
            v.outcomes[0].inputs - v.outcomes[0].missing,
            v.outcomes[1].inputs - v.outcomes[1].missing,
            v.decisions[0].0,
            v.decisions[1].0
        );
        println!(
            "broker repeats       {} outcomes, {} alerts (the mock keeps retried sends; not duplicates)",
            v.outcomes[0].broker_repeats, v.alerts[0].broker_repeats
        );
        println!(
            "alerts               {} chaos ({} stored), {} clean ({} stored)",
            v.alerts_on_topic[0], v.alerts_stored[0], v.alerts_on_topic[1], v.alerts_stored[1]
        );
        let chaos = &v.ledgers[0];
        let count = |what: &str| chaos.counts.get(what).copied().unwrap_or(0);
        let rejected: Vec<String> = chaos
            .counts
            .iter()
            .filter_map(|(k, n)| k.strip_prefix("rejected ").map(|code| format!("{code} {n}")))
            .collect();
        println!(
            "corrections          {} voided, {} amended, {} duplicates (reports' and corrections'); rejected: {}",
            count("voided"),
            count("amended"),
            count("duplicate"),
            rejected.join(", ")
        );
        println!(
            "ledger               chaos {} raised over a hard limit, {} at odds with their usage; clean {}, {}",
            v.ledgers[0].over_limit, v.ledgers[0].inconsistent, v.ledgers[1].over_limit, v.ledgers[1].inconsistent
        );
        let [pc, pk] = &v.periods;
        println!(
            "periods closed       {} expected; records {} chaos, {} clean; missing {}/{}, duplicated {}/{}, \
             unexpected {}/{}, wrong closing or totals {}/{}, broker repeats {}",
            v.periods_expected,
            pc.records,
            pk.records,
            pc.missing,
            pk.missing,
            v.period_checks[0].duplicated,
            v.period_checks[1].duplicated,
            pc.unexpected,
            pk.unexpected,
            pc.wrong,
            pk.wrong,
            v.period_checks[0].broker_repeats
        );
        println!("lost                 {}", v.lost());
        println!("duplicated           {}", v.duplicated() + v.alerts[0].duplicated);
        println!("over limit           {}", v.over_limit);
        println!(
            "mismatched           {} ({} decisions, {} alerts, {} periods, {} period records)",
            v.mismatched(),
            v.decisions_mismatched,
            v.alerts_mismatched,
            v.periods_mismatched,
            v.period_records_mismatched
        );
    }

    /// The failed checks, unexpected exits and examples; the timeline when
    /// the run failed.
    fn print_failures(&self) {
        let (t, v) = (&self.tally, &self.verdict);
        let checks = v.outcomes.iter().chain(&v.alerts).chain(&v.period_checks);
        let names = [
            "chaos outcomes",
            "clean outcomes",
            "chaos alerts",
            "clean alerts",
            "chaos period records",
            "clean period records",
        ];
        for (name, c) in names.iter().zip(checks) {
            if !c.ok() {
                println!("{name}: {c:?}");
            }
        }
        for e in t.unexpected_exits.iter().chain(&v.examples) {
            println!("  {e}");
        }
        if !self.passed() {
            println!("timeline (UTC):");
            for line in &t.timeline {
                println!("  {line}");
            }
        }
    }

    /// Prints the report, keeps the timeline beside the logs, writes the
    /// JSON, and fails unless every guarantee held.
    fn finish(&self, args: &ChaosArgs, work_dir: &Path) -> anyhow::Result<()> {
        self.print();
        std::fs::write(work_dir.join("timeline.txt"), self.tally.timeline.join("\n") + "\n")?;
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&self.json())?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if !self.passed() {
            logs_kept(work_dir);
            bail!("the chaos run broke a guarantee (seed {})", self.seed);
        }
        if !args.keep {
            let _ = std::fs::remove_dir_all(work_dir);
        }
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        let (t, v) = (&self.tally, &self.verdict);
        serde_json::json!({
            "seed": self.seed,
            "events": self.events,
            "inputs": self.inputs,
            "seconds": self.seconds.round(),
            "kills": t.kills,
            "kills_at_closes": t.kills_at_closes,
            "early_injections": t.early_injections,
            "pg_restarts": t.pg_restarts,
            "broker_outages": t.broker_outages,
            "slow_db": t.slow_db,
            "joins": t.joins,
            "leaves": t.leaves,
            "statement_timeouts": self.statement_timeouts,
            "lost": v.lost(),
            "duplicated": v.duplicated() + v.alerts[0].duplicated,
            "broker_repeats": v.outcomes[0].broker_repeats + v.alerts[0].broker_repeats,
            "over_limit": v.over_limit,
            "mismatched": v.mismatched(),
            "alerts": v.alerts_on_topic[0],
            "outcomes_by_status": v.ledgers[0].counts,
            "ledger_over_limit": v.ledgers[0].over_limit + v.ledgers[1].over_limit,
            "ledger_inconsistent": v.ledgers[0].inconsistent + v.ledgers[1].inconsistent,
            "periods_closed": v.periods_expected,
            "period_records": [v.periods[0].records, v.periods[1].records],
            "period_records_missing": v.periods[0].missing + v.periods[1].missing,
            "period_records_duplicated": v.period_checks[0].duplicated + v.period_checks[1].duplicated,
            "period_records_unexpected": v.periods[0].unexpected + v.periods[1].unexpected,
            "period_records_wrong": v.periods[0].wrong + v.periods[1].wrong,
            "period_records_mismatched": v.period_records_mismatched,
            "unexpected_exits": t.unexpected_exits.len(),
            "passed": self.passed(),
        })
    }
}

fn seconds(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| "never".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{digest, Ledger, Seen, SeenUsage, Status};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    const START: &str = "2026-11-26T00:00:00.000Z";
    const CLOSE: &str = "2026-12-06T10:00:00.000Z";

    /// sub_1's old period: a (2, then amended to 2.5) and b (3, voided);
    /// its new one: c (5).
    fn ledger() -> Ledger {
        let mut l = Ledger::new(Arc::new(HashMap::new()));
        let created = |id: &str, quantity: &str, time: &str, period: &str| Seen {
            status: Status::Created,
            code: None,
            usage: Some(SeenUsage {
                id: id.into(),
                subscription_id: "sub_1".into(),
                quantity: d(quantity),
                usage_time: t(time),
            }),
            previous_quantity: None,
            period_start: Some(t(period)),
        };
        l.apply(&created("a", "2", "2026-12-06T09:00:00Z", START));
        l.apply(&created("b", "3", "2026-12-06T09:59:59.999Z", START));
        l.apply(&created("c", "5", CLOSE, CLOSE));
        let mut amended = created("a", "2.5", "2026-12-06T09:00:00Z", START);
        amended.status = Status::Amended;
        amended.previous_quantity = Some(d("2"));
        l.apply(&amended);
        let mut voided = created("b", "3", "2026-12-06T09:59:59.999Z", START);
        voided.status = Status::Voided;
        l.apply(&voided);
        l
    }

    fn record(sub: &str) -> PeriodRecord {
        PeriodRecord {
            kind: "usage-period-closed".into(),
            subscription_id: sub.into(),
            period_start_time: Some(START.into()),
            period_end_time: CLOSE.into(),
            closed_time: "2026-12-06T10:00:01.000Z".into(),
            closed_by: "grace".into(),
            invoice_id: None,
            usage_count: 1,
            quantity: d("2.5"),
            amount: None,
            currency: None,
            voided_count: 1,
            digest: digest([("a", d("2.5"))]),
        }
    }

    fn keyed(records: Vec<PeriodRecord>) -> HashMap<Key, PeriodRecord> {
        records
            .into_iter()
            .map(|r| {
                let key = Key::Period(
                    r.kind.clone(),
                    r.subscription_id.clone(),
                    r.period_start_time.clone().unwrap(),
                );
                (key, r)
            })
            .collect()
    }

    fn expected() -> Vec<ExpectedPeriod> {
        ["sub_1", "sub_2"]
            .iter()
            .map(|sub| ExpectedPeriod {
                subscription: sub.to_string(),
                start: None,
                end: t(CLOSE),
            })
            .collect()
    }

    #[test]
    fn each_closed_period_needs_one_record_whose_totals_its_outcomes_recompute() {
        let mut examples = Vec::new();
        let mut other = record("sub_3");
        other.period_end_time = "2026-12-07T10:00:00.000Z".into();
        let found = check_period_records(
            &keyed(vec![record("sub_1"), other]),
            &expected(),
            &ledger(),
            &mut examples,
        );
        assert_eq!(
            (found.records, found.missing, found.unexpected, found.wrong),
            (2, 1, 1, 0),
            "{examples:?}"
        );
    }

    #[test]
    fn a_record_with_other_totals_or_another_closing_is_wrong() {
        let wrong: [fn(&mut PeriodRecord); 7] = [
            |r| r.quantity = d("5.5"),
            |r| r.usage_count = 2,
            |r| r.voided_count = 0,
            |r| r.digest = digest([("a", d("2"))]),
            |r| r.closed_time = CLOSE.into(),
            |r| r.closed_by = "invoice".into(),
            |r| r.invoice_id = Some("inv_1".into()),
        ];
        for change in wrong {
            let mut r = record("sub_1");
            change(&mut r);
            let mut examples = Vec::new();
            let found = check_period_records(&keyed(vec![r]), &expected()[..1], &ledger(), &mut examples);
            assert_eq!((found.wrong, found.missing), (1, 0), "{examples:?}");
        }
    }
}
