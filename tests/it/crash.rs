//! Crash test: the worker runs as a child process while the test owns the
//! Kafka cluster (librdkafka's mock, or a tansu broker process for
//! `..._on_tansu`) and the database. It is killed with SIGKILL at several points
//! of a stream of thousands of events and restarted each time; at the end
//! every input message must have exactly one outcome on `usage-results` and
//! exactly one decision in PostgreSQL, the decisions must be those of a clean
//! run, and no limit may be exceeded.
//!
//! `CRASH_SEED=<n>` replays another pseudo-random plan (events and kill
//! times). The worker's logs go to files under the temp directory; their
//! tails are printed when the test fails.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use test_kit::process::{WorkerProcess, WorkerSpec};
use test_kit::Rng;
use test_kit::{active_subscription, Record, TestEnv, PARTITIONS};
use usage_worker::embedded::TopicReader;
use usage_worker::kafka::ends::EndReader;

const SUBSCRIPTIONS: usize = 30;
/// Subscriptions from this index on have no hard limit.
const UNLIMITED_FROM: usize = 27;
const EVENTS: usize = 5000;
/// The events are produced in this many chunks, one every `CHUNK_PAUSE`, so
/// that the stream runs across the kills and restarts.
const CHUNKS: usize = 100;
const CHUNK_PAUSE: Duration = Duration::from_millis(250);
const BATCH_SIZE: &str = "50";
/// A killed worker stays a member of the group until its session times out,
/// which delays the next assignment: a short session keeps restarts quick.
const SESSION_TIMEOUT_MS: &str = "3000";
const HEARTBEAT_INTERVAL_MS: &str = "300";

// ---------------------------------------------------------------------------
// The plan: subscriptions and events, generated from a seed.

#[derive(Debug, Clone, PartialEq, Eq)]
struct ValidEvent {
    id: String,
    subscription: String,
    quantity: Decimal,
    partial: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Valid(ValidEvent),
    /// Rejected whatever happens, with this code.
    Invalid(&'static str),
}

struct Planned {
    key: String,
    payload: Vec<u8>,
    kind: Kind,
}

fn subscription_id(i: usize) -> String {
    format!("sub_crash_{i:02}")
}

fn hard_limit(i: usize) -> Option<Decimal> {
    (i < UNLIMITED_FROM).then(|| Decimal::from(40 + 13 * i as i64))
}

fn plan_events(rng: &mut Rng) -> Vec<Planned> {
    let mut plan: Vec<Planned> = Vec::with_capacity(EVENTS);
    let mut valid: Vec<usize> = Vec::new();
    let mut next_id = 0;
    while plan.len() < EVENTS {
        let sub = rng.below(SUBSCRIPTIONS as u64) as usize;
        let subscription = subscription_id(sub);
        let roll = rng.below(1000);
        if roll < 12 {
            // Invalid: rejected whatever the state.
            let (payload, code) = match roll % 3 {
                0 => (
                    json!({"id": format!("bad_{next_id}"), "subscriptionId": subscription, "quantity": -1})
                        .to_string()
                        .into_bytes(),
                    "invalid_field",
                ),
                1 => (
                    json!({"id": format!("bad_{next_id}"), "subscriptionId": subscription})
                        .to_string()
                        .into_bytes(),
                    "missing_field",
                ),
                _ => (
                    format!("{{\"id\": \"bad_{next_id}\", not json").into_bytes(),
                    "malformed_payload",
                ),
            };
            next_id += 1;
            plan.push(Planned {
                key: subscription,
                payload,
                kind: Kind::Invalid(code),
            });
        } else if roll < 45 && !valid.is_empty() {
            // An exact re-send of an earlier event.
            let earlier = &plan[valid[rng.below(valid.len() as u64) as usize]];
            plan.push(Planned {
                key: earlier.key.clone(),
                payload: earlier.payload.clone(),
                kind: earlier.kind.clone(),
            });
        } else if roll < 52 && !valid.is_empty() {
            // The id of an earlier event with another quantity.
            let Kind::Valid(earlier) = &plan[valid[rng.below(valid.len() as u64) as usize]].kind else {
                unreachable!()
            };
            let event = ValidEvent {
                quantity: earlier.quantity + Decimal::new(125, 3),
                ..earlier.clone()
            };
            plan.push(planned_valid(event, rng));
        } else {
            let event = ValidEvent {
                id: format!("ev_{next_id}"),
                subscription,
                // 0.5 to 6, in steps of 0.125.
                quantity: Decimal::new(125 * rng.range(4, 48) as i64, 3).normalize(),
                partial: rng.below(4) == 0,
            };
            next_id += 1;
            valid.push(plan.len());
            plan.push(planned_valid(event, rng));
        }
    }
    plan
}

fn planned_valid(event: ValidEvent, rng: &mut Rng) -> Planned {
    // Quantities as JSON numbers and as decimal strings, both exact.
    let quantity = if rng.below(2) == 0 {
        json!(event.quantity.to_string())
    } else {
        serde_json::from_str::<Value>(&event.quantity.to_string()).unwrap()
    };
    let mut body = json!({"id": event.id, "subscriptionId": event.subscription, "quantity": quantity});
    if event.partial || rng.below(3) == 0 {
        body["acceptPartialQuantity"] = json!(event.partial);
    }
    Planned {
        key: event.subscription.clone(),
        payload: body.to_string().into_bytes(),
        kind: Kind::Valid(event),
    }
}

// ---------------------------------------------------------------------------
// What a clean run decides, given the order the events have on the topic.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Created { quantity: Decimal, partial: bool },
    Duplicate { quantity: Decimal },
    Rejected(&'static str),
}

fn expected_decisions(
    inputs: &BTreeMap<(i32, i64), Vec<u8>>,
    kinds: &HashMap<Vec<u8>, Kind>,
) -> (HashMap<(i32, i64), Expected>, HashMap<String, Decimal>) {
    let mut used: HashMap<String, Decimal> = HashMap::new();
    let mut created: HashMap<String, (ValidEvent, Decimal)> = HashMap::new();
    let mut expected = HashMap::new();
    // Every subscription's events are on one partition (keyed), so offset
    // order per partition is the decision order per subscription.
    for (coordinates, payload) in inputs {
        let kind = kinds
            .get(payload)
            .unwrap_or_else(|| panic!("an input message the test did not plan: {coordinates:?}"));
        let decision = match kind {
            Kind::Invalid(code) => Expected::Rejected(code),
            Kind::Valid(event) => match created.get(&event.id) {
                Some((original, quantity)) if original == event => Expected::Duplicate { quantity: *quantity },
                Some(_) => Expected::Rejected("idempotency_conflict"),
                None => {
                    let sub: usize = event.subscription["sub_crash_".len()..].parse().unwrap();
                    let used = used.entry(event.subscription.clone()).or_default();
                    let available = hard_limit(sub)
                        .map(|limit| (limit - *used).max(Decimal::ZERO))
                        .unwrap_or(Decimal::MAX);
                    let granted = if event.quantity <= available {
                        Some((event.quantity, false))
                    } else if event.partial && available >= Decimal::new(1, 3) {
                        Some((available, true))
                    } else {
                        None
                    };
                    match granted {
                        Some((quantity, partial)) => {
                            *used += quantity;
                            created.insert(event.id.clone(), (event.clone(), quantity));
                            Expected::Created { quantity, partial }
                        }
                        None => Expected::Rejected("usage_limit_exceeded"),
                    }
                }
            },
        };
        expected.insert(*coordinates, decision);
    }
    (expected, used)
}

fn decimal(value: &Value) -> Decimal {
    let text = value.to_string();
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .unwrap_or_else(|e| panic!("not a decimal: {value}: {e}"))
}

// ---------------------------------------------------------------------------
// The worker as a child process.

struct Workers {
    /// Names this test's logs apart from another's in the same process.
    tag: usize,
    vars: Vec<(String, String)>,
    worker: Option<WorkerProcess>,
    logs: Vec<PathBuf>,
    started: Instant,
    passed: bool,
}

impl Workers {
    fn new(env: &TestEnv) -> Self {
        let mut vars = env.env_vars(test_kit::env::CONFIG_DIR);
        vars.extend([
            ("USAGE_WORKER__PIPELINE__BATCH_SIZE".into(), BATCH_SIZE.into()),
            (
                "USAGE_WORKER__KAFKA__SESSION_TIMEOUT_MS".into(),
                SESSION_TIMEOUT_MS.into(),
            ),
            (
                "USAGE_WORKER__KAFKA__HEARTBEAT_INTERVAL_MS".into(),
                HEARTBEAT_INTERVAL_MS.into(),
            ),
            ("USAGE_WORKER__LOG__FORMAT".into(), "text".into()),
            ("RUST_LOG".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
        ]);
        static TAGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Self {
            tag: TAGS.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            vars,
            worker: None,
            logs: Vec::new(),
            started: Instant::now(),
            passed: false,
        }
    }

    fn spawn(&mut self) {
        assert!(self.worker.is_none());
        let log = std::env::temp_dir().join(format!(
            "usage-worker-crash-{}-{}-{}.log",
            std::process::id(),
            self.tag,
            self.logs.len()
        ));
        let _ = std::fs::remove_file(&log);
        let worker = WorkerSpec::with_env(env!("CARGO_BIN_EXE_usage-worker"), self.vars.clone(), log.clone())
            .spawn()
            .expect("starting the worker");
        println!(
            "[{:>6.2}s] worker {} started (pid {}), log {}",
            self.started.elapsed().as_secs_f64(),
            self.logs.len(),
            worker.pid(),
            log.display()
        );
        self.logs.push(log);
        self.worker = Some(worker);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.logs.last().expect("a worker")).unwrap_or_default()
    }

    /// Fails when the worker ended on its own: it must only ever be killed.
    fn assert_running(&mut self) {
        let worker = self.worker.as_mut().expect("a worker");
        if let Some(status) = worker.child.try_wait().expect("try_wait") {
            panic!("the worker exited on its own: {status}");
        }
    }

    fn kill(&mut self, why: &str) {
        self.assert_running();
        self.worker.take().unwrap().kill().expect("SIGKILL");
        println!(
            "[{:>6.2}s] worker {} killed ({why})",
            self.started.elapsed().as_secs_f64(),
            self.logs.len() - 1
        );
    }

    /// SIGTERM, then the exit status (within `timeout`).
    fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.assert_running();
        let status = self
            .worker
            .take()
            .unwrap()
            .terminate(timeout)
            .expect("SIGTERM")
            .unwrap_or_else(|| panic!("the worker did not exit within {timeout:?} of SIGTERM"));
        println!(
            "[{:>6.2}s] worker {} stopped after SIGTERM: {status}",
            self.started.elapsed().as_secs_f64(),
            self.logs.len() - 1
        );
        status
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping the process kills it.
        self.worker.take();
        if self.passed {
            if std::env::var_os("CRASH_KEEP_LOGS").is_none() {
                for log in &self.logs {
                    let _ = std::fs::remove_file(log);
                }
            }
            return;
        }
        for (n, log) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "----- worker {n}: last {} of {} log lines ({}) -----",
                tail.len(),
                lines.len(),
                log.display()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Kafka helpers (blocking).

fn watermark_reader(bootstrap: &str) -> EndReader {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "crash-test-watermarks");
    EndReader::new(&config).expect("watermark reader")
}

/// Where each partition ends (read to the end: tansu's ListOffsets reports
/// less).
fn high_watermarks(ends: &EndReader, topic: &str) -> Vec<i64> {
    let ends = ends
        .ends(&[(topic, PARTITIONS)], Duration::from_secs(30))
        .expect("watermarks");
    (0..PARTITIONS).map(|p| ends[0][&p]).collect()
}

/// Every message of the topic's partitions up to `highs`, raw.
/// Every message of the topic's partitions up to `highs`: payload and
/// CreateTime (ms).
fn read_raw(bootstrap: &str, topic: &str, highs: &[i64]) -> BTreeMap<(i32, i64), (Vec<u8>, Option<i64>)> {
    let consumer = TopicReader::open(bootstrap, topic, PARTITIONS).expect("a topic reader");
    let total: i64 = highs.iter().sum();
    let mut messages = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (messages.len() as i64) < total {
        assert!(
            Instant::now() < deadline,
            "read {} of {total} messages of {topic}",
            messages.len()
        );
        if let Some(m) = consumer.next(Duration::from_millis(100)).expect("reading a topic") {
            if m.offset() < highs[m.partition() as usize] {
                messages.insert(
                    (m.partition(), m.offset()),
                    (m.payload().unwrap_or_default().to_vec(), m.timestamp().to_millis()),
                );
            }
        }
    }
    messages
}

/// Produces the plan in chunks, from a thread of its own.
fn produce_in_background(bootstrap: String, plan: Vec<(String, Vec<u8>)>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()
            .expect("event producer");
        let chunk = plan.len().div_ceil(CHUNKS);
        for events in plan.chunks(chunk) {
            for (key, payload) in events {
                let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to("usage-events")
                    .key(key.as_str())
                    .payload(payload.as_slice());
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            record = r;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            }
            producer.flush(Duration::from_secs(30)).expect("flush");
            std::thread::sleep(CHUNK_PAUSE);
        }
    })
}

// ---------------------------------------------------------------------------

async fn decisions(env: &TestEnv) -> i64 {
    env.scalar_i64("SELECT count(*) FROM outbox WHERE topic = 'usage-results'")
        .await
}

/// When to kill a worker.
#[derive(Debug, Clone, Copy)]
enum KillAfter {
    /// This long after it was started.
    Start(Duration),
    /// This long after its log says the partitions were assigned.
    Assignment(Duration),
    /// This long after its log says an output partition was resynchronised.
    Resync(Duration),
    /// This long after it decided its first batch (after its assignment: a
    /// killed worker's last commit may still land after it died).
    Progress(Duration),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_has_exactly_one_outcome_and_decision_across_kill_9() {
    exactly_one_outcome_across_kill_9(TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_has_exactly_one_outcome_and_decision_across_kill_9_on_tansu() {
    exactly_one_outcome_across_kill_9(TestEnv::start_on_tansu().await).await;
}

async fn exactly_one_outcome_across_kill_9(env: TestEnv) {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_CAFE);
    println!("CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let bootstrap = env.kafka.bootstrap_servers().to_owned();

    for i in 0..SUBSCRIPTIONS {
        let limit = hard_limit(i).map(|l| {
            if i % 2 == 0 {
                l.to_string()
            } else {
                format!(r#"{{"quantity": {l}}}"#)
            }
        });
        env.subscription(active_subscription(&subscription_id(i), limit.as_deref()));
    }
    let plan = plan_events(&mut rng);
    let kinds: HashMap<Vec<u8>, Kind> = plan.iter().map(|p| (p.payload.clone(), p.kind.clone())).collect();
    // Until all is produced, the plan's size stands for the number of inputs.
    let mut total = plan.len() as i64;

    let kills = [
        KillAfter::Start(Duration::from_millis(rng.range(300, 1500))),
        KillAfter::Assignment(Duration::from_millis(rng.range(0, 30))),
        KillAfter::Progress(Duration::from_millis(rng.range(300, 1500))),
        KillAfter::Resync(Duration::from_millis(rng.range(0, 100))),
        KillAfter::Progress(Duration::from_millis(rng.range(300, 1500))),
        KillAfter::Start(Duration::from_millis(rng.range(300, 1500))),
    ];
    println!("kill plan: {kills:?}");

    let mut workers = Workers::new(&env);
    workers.spawn();
    let producer = produce_in_background(
        bootstrap.clone(),
        plan.iter().map(|p| (p.key.clone(), p.payload.clone())).collect(),
    );

    for trigger in kills {
        let spawned = Instant::now();
        let wait_for = |needle: &'static str| {
            let workers = &workers;
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !workers.log().contains(needle) {
                    assert!(Instant::now() < deadline, "no {needle:?} in the worker log");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let delay = match trigger {
            KillAfter::Start(d) => d,
            KillAfter::Assignment(d) => {
                wait_for("partitions assigned").await;
                d
            }
            KillAfter::Resync(d) => {
                wait_for("outbox partition resynchronised").await;
                d
            }
            KillAfter::Progress(d) => {
                wait_for("partitions assigned").await;
                let at_start = decisions(&env).await;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let decided = decisions(&env).await;
                    if decided > at_start || decided == total {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the worker decided nothing");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                d
            }
        };
        tokio::time::sleep(delay).await;
        let decided = decisions(&env).await;
        workers.kill(&format!(
            "{trigger:?}, {:.2}s after its start, {decided} of {total} decided",
            spawned.elapsed().as_secs_f64()
        ));
        workers.spawn();
    }
    tokio::task::spawn_blocking(move || producer.join().expect("producer thread"))
        .await
        .unwrap();
    println!(
        "[{:>6.2}s] all {total} events produced",
        workers.started.elapsed().as_secs_f64()
    );

    // The last worker runs to the end.
    let meta = watermark_reader(&bootstrap);
    let input_highs = tokio::task::block_in_place(|| high_watermarks(&meta, "usage-events"));
    // The mock may repeat a retried send of the test's producer too: what is
    // on the topic is the input.
    total = input_highs.iter().sum::<i64>();
    assert!(
        total >= plan.len() as i64,
        "usage-events holds less than was produced: {input_highs:?}"
    );
    if total > plan.len() as i64 {
        println!("usage-events holds {total} messages for {} sent", plan.len());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        workers.assert_running();
        let published: i64 =
            tokio::task::block_in_place(|| high_watermarks(&meta, "usage-results").iter().sum::<i64>());
        let decided = decisions(&env).await;
        if published >= total && decided == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stuck: {decided} of {total} decided, {published} records on usage-results"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "[{:>6.2}s] all decided and published",
        workers.started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = workers.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

    // ---- The topic: one outcome per input message. ----
    let output_highs = tokio::task::block_in_place(|| high_watermarks(&meta, "usage-results"));
    let on_topic: i64 = output_highs.iter().sum();
    let records: Vec<Record> = tokio::task::block_in_place(|| {
        let reader = env.results_reader();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (records.len() as i64) < on_topic && Instant::now() < deadline {
            records.extend(reader.read_rest(Duration::from_millis(500)));
        }
        records.extend(reader.read_rest(Duration::from_millis(500)));
        records
    });
    assert_eq!(
        records.len() as i64,
        on_topic,
        "read all of usage-results: {output_highs:?}"
    );
    // A broker's repeat of a retried send is the same record, CreateTime
    // included; a record published again by a worker has a time of its own.
    let create_times: HashMap<(i32, i64), Option<i64>> =
        tokio::task::block_in_place(|| read_raw(&bootstrap, "usage-results", &output_highs))
            .into_iter()
            .map(|(coordinates, (_, time))| (coordinates, time))
            .collect();
    let mut by_source: HashMap<(i32, i64), Vec<&Record>> = HashMap::new();
    let mut broker_repeats = Vec::new();
    let mut last_seq: HashMap<i32, i64> = HashMap::new();
    let mut records_sorted: Vec<&Record> = records.iter().collect();
    records_sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in &records_sorted {
        let source = &r.value["source"];
        let coordinates = (
            source["partition"].as_i64().expect("source.partition") as i32,
            source["offset"].as_i64().expect("source.offset"),
        );
        assert_eq!(source["topic"], "usage-events");
        assert_eq!(coordinates.0, r.partition, "outcome on the source's partition");
        assert_eq!(r.headers["outcome-id"], r.value["outcomeId"].as_str().unwrap());
        assert_eq!(
            r.headers["outcome-id"],
            usage_worker::domain::outcome::kafka_outcome_id("usage-events", coordinates.0, coordinates.1)
        );
        let seq: i64 = r.headers["outbox-seq"].parse().expect("outbox-seq");
        let copies = by_source.entry(coordinates).or_default();
        if let Some(first) = copies.first() {
            let first_time = create_times[&(first.partition, first.offset)];
            let time = create_times[&(r.partition, r.offset)];
            let same = first.headers["outcome-id"] == r.headers["outcome-id"]
                && first.headers["outbox-seq"] == r.headers["outbox-seq"]
                && first_time == time;
            assert!(
                same,
                "a second outcome for usage-events/{}/{} that is not a broker repeat \
                 (a broker repeat has the same outcome-id, outbox-seq and CreateTime):\n \
                 first: usage-results/{}/{} CreateTime {first_time:?} {:?} {}\n \
                 again: usage-results/{}/{} CreateTime {time:?} {:?} {}",
                coordinates.0,
                coordinates.1,
                first.partition,
                first.offset,
                first.headers,
                first.value,
                r.partition,
                r.offset,
                r.headers,
                r.value
            );
            assert_eq!(first.value, r.value, "a broker repeat carries the same outcome");
            broker_repeats.push((r.partition, r.offset, seq, first.offset));
        } else {
            let last = last_seq.entry(r.partition).or_insert(0);
            assert_eq!(
                seq,
                *last + 1,
                "usage-results/{} at offset {}: outbox-seq {seq} after {last}",
                r.partition,
                r.offset
            );
            *last = seq;
        }
        copies.push(r);
    }
    if !broker_repeats.is_empty() {
        println!(
            "{} broker repeat(s) (partition, offset, outbox-seq, offset of the first copy): {broker_repeats:?}",
            broker_repeats.len()
        );
    }
    for (p, high) in input_highs.iter().enumerate() {
        let missing: Vec<i64> = (0..*high)
            .filter(|o| !by_source.contains_key(&(p as i32, *o)))
            .collect();
        assert!(
            missing.is_empty(),
            "usage-events/{p}: {} offsets without an outcome: {:?}",
            missing.len(),
            &missing[..missing.len().min(50)]
        );
    }
    assert_eq!(by_source.len() as i64, total, "outcomes for unknown sources");

    // ---- The database: one decision per input message. ----
    assert_eq!(decisions(&env).await, total);
    let per_partition: Vec<(i32, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT partition, count(*), min(seq), max(seq),
                count(DISTINCT source_offset), max(source_offset)
         FROM outbox WHERE topic = 'usage-results' AND source_topic = 'usage-events'
         GROUP BY partition ORDER BY partition",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(per_partition.len(), PARTITIONS as usize);
    for (p, count, min_seq, max_seq, sources, max_source) in per_partition {
        let high = input_highs[p as usize];
        assert_eq!(
            (count, min_seq, max_seq),
            (high, 1, high),
            "outbox of partition {p}: gap-free 1..{high}"
        );
        assert_eq!(
            (sources, max_source),
            (high, high - 1),
            "partition {p}: one decision per offset"
        );
        assert_eq!(last_seq[&p], high, "usage-results/{p} ends at the last seq");
    }
    let outbox_partitions: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, next_seq, published_seq FROM outbox_partitions JOIN outbox_published USING (topic, partition)
         WHERE topic = 'usage-results' ORDER BY partition",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (p, next_seq, published_seq) in outbox_partitions {
        let high = input_highs[p as usize];
        assert_eq!((next_seq, published_seq), (high + 1, high), "partition {p}");
    }
    let offsets: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets
         WHERE topic = 'usage-events' ORDER BY partition",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let expected_offsets: Vec<(i32, i64)> = input_highs.iter().enumerate().map(|(p, h)| (p as i32, *h)).collect();
    assert_eq!(offsets, expected_offsets, "stored consumer offsets");
    // Topic and database agree record by record.
    let stored: Vec<(i32, i64, Vec<u8>)> =
        sqlx::query_as("SELECT partition, seq, payload FROM outbox WHERE topic = 'usage-results'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let stored: HashMap<(i32, i64), Value> = stored
        .into_iter()
        .map(|(p, seq, payload)| ((p, seq), serde_json::from_slice(&payload).expect("stored outcome")))
        .collect();
    for r in &records {
        let seq: i64 = r.headers["outbox-seq"].parse().unwrap();
        assert_eq!(
            stored.get(&(r.partition, seq)),
            Some(&r.value),
            "usage-results/{}/{} is outbox record {seq}",
            r.partition,
            r.offset
        );
    }

    // ---- Limits and counts. ----
    type PeriodRow = (String, Option<Decimal>, Decimal, Option<Decimal>, i64);
    let periods: Vec<PeriodRow> = sqlx::query_as(
        "SELECT p.subscription_id, p.hard_limit, p.used, sum(u.quantity), count(u.id)
         FROM service_periods p LEFT JOIN usages u
           ON u.subscription_id = p.subscription_id AND u.period_start_time = p.start_time
         GROUP BY p.subscription_id, p.start_time, p.hard_limit, p.used",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(periods.len(), SUBSCRIPTIONS, "one period per subscription");
    let mut limits_reached = 0;
    for (sub, limit, used, sum, _) in &periods {
        assert_eq!(*used, sum.unwrap_or_default(), "{sub}: used is the sum of its usages");
        if let Some(limit) = limit {
            assert!(used <= limit, "{sub}: used {used} over the hard limit {limit}");
            if used == limit {
                limits_reached += 1;
            }
        }
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) - count(DISTINCT id) FROM usages").await,
        0
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM usages u LEFT JOIN outbox o
               ON o.topic = 'usage-results' AND o.source_topic = 'usage-events'
              AND o.source_partition = u.source_partition AND o.source_offset = u.source_offset
             WHERE o.seq IS NULL OR convert_from(o.payload, 'UTF8')::jsonb->>'status' <> 'created'"
        )
        .await,
        0,
        "every usage has its created outcome"
    );

    // ---- The decisions are those of a clean run. ----
    let inputs: BTreeMap<(i32, i64), Vec<u8>> =
        tokio::task::block_in_place(|| read_raw(&bootstrap, "usage-events", &input_highs))
            .into_iter()
            .map(|(coordinates, (payload, _))| (coordinates, payload))
            .collect();
    let (expected, expected_used) = expected_decisions(&inputs, &kinds);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for (coordinates, want) in &expected {
        let outcome = &by_source[coordinates][0].value;
        let status = outcome["status"].as_str().unwrap();
        let code = outcome["error"]["code"].as_str().unwrap_or("");
        let ok = match want {
            Expected::Created { quantity, partial } => {
                status == "created"
                    && decimal(&outcome["usage"]["quantity"]) == *quantity
                    && outcome["partial"].as_bool() == Some(*partial)
            }
            Expected::Duplicate { quantity } => {
                status == "duplicate"
                    && outcome["usage"]["id"] == outcome["eventId"]
                    && decimal(&outcome["usage"]["quantity"]) == *quantity
            }
            Expected::Rejected(want_code) => status == "rejected" && code == *want_code,
        };
        assert!(
            ok,
            "usage-events/{}/{}: a clean run gives {want:?}, the worker said {outcome}",
            coordinates.0, coordinates.1
        );
        *tally.entry(format!("{status} {code}").trim().to_owned()).or_default() += 1;
    }
    for (sub, _, used, _, _) in &periods {
        assert_eq!(
            *used,
            expected_used.get(sub).copied().unwrap_or_default(),
            "{sub}: used after a clean run"
        );
    }
    println!("outcomes: {tally:?}; {limits_reached} hard limits reached");
    assert!(limits_reached >= 20, "the plan reaches most limits");
    assert!(tally.get("duplicate").copied().unwrap_or(0) > 50);
    println!("[{:>6.2}s] checked", workers.started.elapsed().as_secs_f64());
    workers.passed = true;
}
