//! `usage-worker bench`: throughput, latency and memory of the real pipeline,
//! with every guarantee on, on this machine.
//!
//! The bench owns an embedded Kafka mock cluster and a fresh database; the
//! worker under test runs as its own process (so its resident memory is its
//! own), one or more of them in one consumer group. Three phases:
//! 1. throughput: N events as fast as the worker takes them (production is
//!    paced by the outcomes read back, because the mock cluster keeps only
//!    about 5 MiB per partition), from the first event produced to the last
//!    outcome read;
//! 2. latency: a fixed offered load, event-to-outcome times;
//! 3. baseline: the same pipeline forced to one event per transaction.
//!
//! Every input offset must have exactly one outcome, or the run fails.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use serde::Deserialize;

use crate::config::Settings;
use crate::kafka::mock::EmbeddedKafka;
use crate::store;

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
}

/// How many events may be ahead of their outcomes.
const MAX_IN_FLIGHT: u64 = 60_000;

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    let kafka = EmbeddedKafka::start(1)?;
    let t = settings.topics.clone();
    kafka.create_worker_topics(&t, args.partitions)?;
    let mut url = url::Url::parse(&store::scratch_database(&settings.database.url, "usage_worker_bench").await?)?;
    // The database is on this host: measure the pipeline, not TLS (unless
    // the URL asks for a mode itself).
    if !url.query_pairs().any(|(k, _)| k == "sslmode") {
        url.query_pairs_mut().append_pair("sslmode", "disable");
    }
    let database_url = url.to_string();
    let database = url.path().trim_start_matches('/').to_owned();
    let pool = sqlx::PgPool::connect(&database_url).await?;
    store::migrate(&pool).await?;
    eprintln!(
        "bench: mock Kafka at {}, database {database}",
        kafka.bootstrap_servers()
    );

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    publish_subscriptions(&producer, &t.subscriptions, args.subscriptions)?;
    producer.flush(Duration::from_secs(30))?;

    let bench = Bench {
        exe: std::env::current_exe().context("locating the usage-worker binary")?,
        bootstrap: kafka.bootstrap_servers().to_owned(),
        database_url: database_url.clone(),
        args: args.clone(),
        topic: t.usage_events.clone(),
        log_dir: std::env::temp_dir(),
    };
    let reader = OutcomeReader::start(&bench.bootstrap, &t.usage_results, args.partitions)?;
    let mut generator = Generator::new(args.subscriptions);

    // Phase 1: throughput, then 2: latency, with the same worker processes.
    let mut workers = bench.spawn_workers(&[], "main")?;
    bench.wait_until_ready(&pool, &mut workers).await?;
    eprintln!(
        "bench: {} worker(s) ready; throughput phase, {} events",
        args.workers, args.events
    );
    let throughput = bench.drive(&producer, &reader, &mut generator, args.events, None, &mut workers)?;
    eprintln!(
        "bench: latency phase, {} events/s for {} s",
        args.rate, args.latency_secs
    );
    let latency = bench.drive(
        &producer,
        &reader,
        &mut generator,
        args.rate * args.latency_secs,
        Some(args.rate),
        &mut workers,
    )?;
    let rss_mib: Vec<f64> = workers
        .iter()
        .map(|w| peak_rss_mib(w.child.id()))
        .collect::<anyhow::Result<_>>()?;
    let assignments: Vec<String> = workers.iter().map(|w| w.assignment()).collect();
    bench.stop_workers(&mut workers)?;

    // Phase 3: the baseline, one event per transaction.
    let mut baseline_workers = bench.spawn_workers(&["USAGE_WORKER__PIPELINE__BATCH_SIZE=1"], "baseline")?;
    bench.wait_until_ready(&pool, &mut baseline_workers).await?;
    eprintln!(
        "bench: baseline phase (one event per transaction), {} events",
        args.baseline_events
    );
    let baseline = bench.drive(
        &producer,
        &reader,
        &mut generator,
        args.baseline_events,
        None,
        &mut baseline_workers,
    )?;
    bench.stop_workers(&mut baseline_workers)?;

    let check = reader.check(&bench.bootstrap, &t.usage_events, args.partitions)?;
    let decided: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = $1")
        .bind(&t.usage_results)
        .fetch_one(&pool)
        .await?;
    let over_limit: i64 = sqlx::query_scalar("SELECT count(*) FROM service_periods WHERE used > hard_limit")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    store::drop_database(&database_url).await?;

    let report = Report {
        events: args.events,
        events_per_sec: throughput.events_per_sec,
        baseline_events_per_sec: baseline.events_per_sec,
        speedup: throughput.events_per_sec / baseline.events_per_sec,
        p50_ms: latency.percentile(50.0),
        p99_ms: latency.percentile(99.0),
        rss_mib: rss_mib.iter().copied().fold(0.0, f64::max),
    };
    print_report(
        &report,
        &args,
        &throughput,
        &latency,
        &check,
        decided,
        over_limit,
        &assignments,
        &rss_mib,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !check.ok() || over_limit > 0 || decided as u64 != check.inputs {
        bail!(
            "the run broke a guarantee: {check:?}, {decided} decisions stored, {over_limit} periods over their limit"
        );
    }
    Ok(())
}

struct Bench {
    exe: PathBuf,
    bootstrap: String,
    database_url: String,
    args: BenchArgs,
    topic: String,
    log_dir: PathBuf,
}

struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    /// The partitions of its last assignment, from its log.
    fn assignment(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rev()
            .find(|l| l.contains("partitions assigned"))
            .and_then(|l| l.split("partitions=").nth(1))
            .map(|rest| rest.split(']').next().unwrap_or_default().to_owned() + "]")
            .unwrap_or_else(|| "?".into())
    }
}

impl Bench {
    fn spawn_workers(&self, extra: &[&str], phase: &str) -> anyhow::Result<Vec<WorkerProcess>> {
        (0..self.args.workers)
            .map(|i| {
                let log = self
                    .log_dir
                    .join(format!("usage-worker-bench-{}-{phase}-{i}.log", std::process::id()));
                let file = std::fs::File::create(&log)?;
                let mut cmd = Command::new(&self.exe);
                cmd.arg("run")
                    .env("DATABASE_URL", &self.database_url)
                    .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
                    .env("USAGE_WORKER__LOG__LEVEL", "warn,usage_worker::kafka::consumer=info")
                    .env("USAGE_WORKER__KAFKA__SESSION_TIMEOUT_MS", "6000")
                    .env("USAGE_WORKER__KAFKA__HEARTBEAT_INTERVAL_MS", "500")
                    // The API is not under test, and several workers share the host.
                    .env("USAGE_WORKER__HTTP__ENABLED", "false")
                    .env_remove("RUST_LOG")
                    .stdout(Stdio::null())
                    .stderr(file);
                for setting in self
                    .args
                    .worker_env
                    .iter()
                    .map(String::as_str)
                    .chain(extra.iter().copied())
                {
                    let (k, v) = setting
                        .split_once('=')
                        .with_context(|| format!("--worker-env {setting}: want KEY=VALUE"))?;
                    cmd.env(k, v);
                }
                let child = cmd.spawn().context("starting a worker process")?;
                Ok(WorkerProcess { child, log })
            })
            .collect()
    }

    /// Waits until the workers have applied the snapshots and every
    /// partition is assigned.
    async fn wait_until_ready(&self, pool: &sqlx::PgPool, workers: &mut [WorkerProcess]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for w in workers.iter_mut() {
                if let Some(status) = w.child.try_wait()? {
                    bail!("a worker exited during start-up ({status}); see {}", w.log.display());
                }
            }
            let subscriptions: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions")
                .fetch_one(pool)
                .await?;
            let assigned: usize = workers
                .iter()
                .map(|w| w.assignment())
                .filter(|a| a != "?")
                .map(|a| a.matches(',').count() + 1)
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
        for w in workers.iter() {
            Command::new("kill")
                .arg("-TERM")
                .arg(w.child.id().to_string())
                .status()?;
        }
        for w in workers.iter_mut() {
            let status = w.child.wait()?;
            if !status.success() {
                bail!("a worker exited with {status} at shutdown; see {}", w.log.display());
            }
        }
        Ok(())
    }

    /// Produces `count` events (at `rate` per second, or as fast as the
    /// in-flight cap allows) and waits for all their outcomes.
    fn drive(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        reader: &OutcomeReader,
        generator: &mut Generator,
        count: u64,
        rate: Option<u64>,
        workers: &mut [WorkerProcess],
    ) -> anyhow::Result<Phase> {
        let received_before = reader.received();
        reader.start_latency_window();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut last_print = Instant::now();
        loop {
            let received = reader.received() - received_before;
            if received >= count {
                break;
            }
            if last_print.elapsed() > Duration::from_secs(1) {
                last_print = Instant::now();
                for w in workers.iter_mut() {
                    if let Some(status) = w.child.try_wait()? {
                        bail!("a worker exited ({status}); see {}", w.log.display());
                    }
                }
                let rate_now = received as f64 / started.elapsed().as_secs_f64();
                eprint!("\rbench: {sent} sent, {received}/{count} outcomes ({rate_now:.0}/s)   ");
                let _ = std::io::stderr().flush();
            }
            let allowed = match rate {
                Some(r) => (started.elapsed().as_secs_f64() * r as f64) as u64,
                None => received + MAX_IN_FLIGHT,
            }
            .min(count);
            if sent < allowed {
                while sent < allowed {
                    let (key, payload) = generator.next();
                    let partition = generator.partition_of(&key, self.args.partitions);
                    send(producer, &self.topic, partition, &key, &payload)?;
                    sent += 1;
                }
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let elapsed = started.elapsed();
        eprintln!();
        Ok(Phase {
            events: count,
            seconds: elapsed.as_secs_f64(),
            events_per_sec: count as f64 / elapsed.as_secs_f64(),
            latencies_ms: reader.take_latencies(),
        })
    }
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &str,
) -> anyhow::Result<()> {
    loop {
        match producer.send(BaseRecord::to(topic).partition(partition).key(key).payload(payload)) {
            Ok(()) => return Ok(()),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Hard limit of each subscription: one in ten is small enough to be reached
/// during the run.
fn publish_subscriptions(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    count: u64,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let start = (now - chrono::Duration::days(10)).to_rfc3339();
    let end = (now + chrono::Duration::days(20)).to_rfc3339();
    for i in 0..count {
        let limit = if i % 10 == 0 { 200 } else { 1_000_000 };
        let snapshot = format!(
            r#"{{"id": "sub_{i}", "status": "active", "version": 1, "currentPeriodStartTime": "{start}", "currentPeriodEndTime": "{end}", "usageLimits": {{"hardLimit": {limit}, "softLimit": {}}}}}"#,
            limit * 3 / 4
        );
        loop {
            match producer.send(BaseRecord::to(topic).key(&format!("sub_{i}")).payload(&snapshot)) {
                Ok(()) => break,
                Err((_, _)) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
    Ok(())
}

/// A deterministic stream: about 30 % partial, 2 % exact re-sends, 1 %
/// invalid, keyed by subscription.
struct Generator {
    state: u64,
    subscriptions: u64,
    sequence: u64,
    recent: Vec<(String, String)>,
}

impl Generator {
    fn new(subscriptions: u64) -> Self {
        Self {
            state: 0x2545_F491_4F6C_DD1D,
            subscriptions,
            sequence: 0,
            recent: Vec::new(),
        }
    }

    fn random(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn next(&mut self) -> (String, String) {
        let r = self.random();
        self.sequence += 1;
        let i = self.sequence;
        let sub = format!("sub_{}", r % self.subscriptions);
        let quantity = format!("{}.{:03}", 1 + (r >> 20) % 9, (r >> 30) % 1000);
        let event = match (r >> 40) % 100 {
            0..=1 if !self.recent.is_empty() => {
                let n = self.recent.len();
                return self.recent[(r >> 50) as usize % n].clone();
            }
            2 => (
                sub.clone(),
                format!(r#"{{"id": "b{i}", "subscriptionId": "{sub}", "quantity": -1}}"#),
            ),
            3..=32 => (
                sub.clone(),
                format!(
                    r#"{{"id": "b{i}", "subscriptionId": "{sub}", "quantity": {quantity}, "acceptPartialQuantity": true}}"#
                ),
            ),
            _ => (
                sub.clone(),
                format!(r#"{{"id": "b{i}", "subscriptionId": "{sub}", "quantity": {quantity}}}"#),
            ),
        };
        if self.recent.len() < 1000 {
            self.recent.push(event.clone());
        } else {
            let slot = (r >> 16) as usize % 1000;
            self.recent[slot] = event.clone();
        }
        event
    }

    /// Keyed by subscription: a stable partition per key.
    fn partition_of(&self, key: &str, partitions: i32) -> i32 {
        let mut hash: u32 = 2_166_136_261;
        for b in key.bytes() {
            hash = (hash ^ b as u32).wrapping_mul(16_777_619);
        }
        (hash % partitions as u32) as i32
    }
}

#[derive(Deserialize)]
struct OutcomeSource {
    source: SourceFields,
}

#[derive(Deserialize)]
struct SourceFields {
    partition: i32,
    offset: i64,
    timestamp: Option<String>,
}

/// Reads `usage-results` in its own thread: counts outcomes per input
/// offset, and event-to-outcome latencies for the current window.
struct OutcomeReader {
    received: Arc<AtomicU64>,
    state: Arc<Mutex<ReaderState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ReaderState {
    /// Per input partition: outcomes per offset.
    counts: HashMap<i32, Vec<u8>>,
    /// Repeats carrying the same outcome-id and outbox-seq as an earlier
    /// record (the mock cluster repeats a retried send).
    broker_repeats: u64,
    latencies_ms: Vec<f64>,
    seen: HashMap<(i32, i64), (String, String)>,
    error: Option<String>,
}

impl OutcomeReader {
    fn start(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer = crate::kafka::topic_reader(bootstrap, topic, partitions)?;
        let received = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new(ReaderState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, state, stop) = (received.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(50)) {
                        Some(Ok(m)) => {
                            let now = Utc::now();
                            let headers = crate::kafka::headers::of_borrowed(&m);
                            let header = |name: &str| {
                                crate::kafka::headers::text(&headers, name)
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            let Some(outcome) = m
                                .payload()
                                .and_then(|p| serde_json::from_slice::<OutcomeSource>(p).ok())
                            else {
                                state.lock().unwrap().error =
                                    Some(format!("unreadable outcome at {}/{}", m.partition(), m.offset()));
                                continue;
                            };
                            let s = outcome.source;
                            let mut st = state.lock().unwrap();
                            let identity = (header("outcome-id"), header("outbox-seq"));
                            if st.seen.get(&(s.partition, s.offset)) == Some(&identity) {
                                st.broker_repeats += 1;
                                continue;
                            }
                            st.seen.insert((s.partition, s.offset), identity);
                            let counts = st.counts.entry(s.partition).or_default();
                            let index = s.offset as usize;
                            if counts.len() <= index {
                                counts.resize(index + 1, 0);
                            }
                            counts[index] = counts[index].saturating_add(1);
                            if let Some(sent) = s.timestamp.and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                            {
                                let ms =
                                    (now - sent.with_timezone(&Utc)).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                                st.latencies_ms.push(ms);
                            }
                            drop(st);
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Err(e)) => state.lock().unwrap().error = Some(format!("reading outcomes: {e}")),
                        None => {}
                    }
                }
            })
        };
        Ok(Self {
            received,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn start_latency_window(&self) {
        self.state.lock().unwrap().latencies_ms.clear();
    }

    fn take_latencies(&self) -> Vec<f64> {
        std::mem::take(&mut self.state.lock().unwrap().latencies_ms)
    }

    /// Every input offset has exactly one outcome.
    fn check(&self, bootstrap: &str, input: &str, partitions: i32) -> anyhow::Result<Check> {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
        let state = self.state.lock().unwrap();
        let mut check = Check {
            broker_repeats: state.broker_repeats,
            error: state.error.clone(),
            ..Check::default()
        };
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(input, p, Duration::from_secs(10))?;
            check.inputs += high as u64;
            let counts = state.counts.get(&p).map(Vec::as_slice).unwrap_or_default();
            for offset in 0..high as usize {
                match counts.get(offset).copied().unwrap_or(0) {
                    0 => check.missing += 1,
                    1 => {}
                    _ => check.duplicated += 1,
                }
            }
        }
        Ok(check)
    }
}

impl Drop for OutcomeReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug, Default)]
struct Check {
    inputs: u64,
    missing: u64,
    duplicated: u64,
    broker_repeats: u64,
    error: Option<String>,
}

impl Check {
    fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.error.is_none()
    }
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

struct Report {
    events: u64,
    events_per_sec: f64,
    baseline_events_per_sec: f64,
    speedup: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
}

impl Report {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
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

#[allow(clippy::too_many_arguments)]
fn print_report(
    report: &Report,
    args: &BenchArgs,
    throughput: &Phase,
    latency: &Phase,
    check: &Check,
    decided: i64,
    over_limit: i64,
    assignments: &[String],
    rss: &[f64],
) {
    println!("\n== usage-worker bench ==");
    println!(
        "machine              {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("partitions           {}", args.partitions);
    println!("subscriptions        {}", args.subscriptions);
    for (i, (partitions, rss)) in assignments.iter().zip(rss).enumerate() {
        println!("worker {i}             partitions {partitions}, peak RSS {rss:.1} MiB");
    }
    println!(
        "throughput           {:.0} events/s ({} events in {:.2} s, first produced to last outcome read)",
        report.events_per_sec, throughput.events, throughput.seconds
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
}

/// Peak resident set size of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc status")?;
    Ok(kib / 1024.0)
}
