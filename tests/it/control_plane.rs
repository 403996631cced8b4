//! The control plane under concurrency, seeded and replayable: several
//! worker processes (one started late, one restarted mid-run, one frozen now
//! and then with SIGSTOP so that its control readers fall behind the others)
//! read random interleavings of snapshots (versions rising and arriving out
//! of order, period, trial and status changes, tombstones and
//! re-creations), invoice events, usage streams and HTTP creates and
//! deletes. Every decision and the final state are compared with a
//! sequential reference model that applies each control message once, in
//! order.
//!
//! `CONTROL_PLANE_SEEDS` (comma-separated, default `1,2`) and
//! `CONTROL_PLANE_ROUNDS` (default 14) choose the runs;
//! `scripts/control-plane` runs many more. A failure names its seed and
//! round; the same seed replays the same run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use test_kit::{ApiServer, Reader, Record, TestEnv, PARTITIONS};
use usage_worker::http::ApiConfig;
use usage_worker::metrics::Metrics;

const SUBSCRIPTIONS: usize = 6;
/// Statuses a snapshot carries, active the most often.
const STATUSES: [&str; 6] = ["active", "active", "active", "trial", "paused", "canceled"];
const GRACE_HOURS: i64 = 1;
const WAIT: Duration = Duration::from_secs(90);

/// A small seeded generator (xorshift): the same seed, the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn sub_id(i: usize) -> String {
    format!("sub_{i}")
}

/// Every subscription's messages go to the partition of its index, on every
/// topic, so that each subscription's messages keep their order.
fn partition_of(sub: &str) -> i32 {
    sub.trim_start_matches("sub_").parse::<i32>().unwrap() % PARTITIONS
}

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// Two service periods: `past` ended ten days ago (closed by time), and
/// `current` holds now.
#[derive(Clone, Copy)]
struct Periods {
    past: (DateTime<Utc>, DateTime<Utc>),
    current: (DateTime<Utc>, DateTime<Utc>),
}

impl Periods {
    fn new() -> Self {
        // Whole seconds: the model compares instants with what is stored.
        let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
        let day = chrono::Duration::days(1);
        Self {
            past: (now - day * 40, now - day * 10),
            current: (now - day * 10, now + day * 20),
        }
    }
}

// The reference model: the state of applying each message once, in order.

#[derive(Debug, Clone)]
struct ModelPeriod {
    end: DateTime<Utc>,
    hard: Option<Decimal>,
    used: Decimal,
    invoiced: bool,
}

#[derive(Debug, Clone)]
struct ModelSub {
    version: i64,
    status: String,
    deleted: bool,
    trial_end: Option<DateTime<Utc>>,
    trial_limit: Option<Decimal>,
    trial_used: Decimal,
    periods: BTreeMap<DateTime<Utc>, ModelPeriod>,
}

#[derive(Debug, Clone)]
struct ModelUsage {
    sub: String,
    quantity: Decimal,
    requested: Decimal,
    partial: bool,
    usage_time: DateTime<Utc>,
    period_start: DateTime<Utc>,
    invoiced: bool,
    /// Voided through `DELETE`: the row and the id stay.
    voided: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Expected {
    Created(Decimal),
    Duplicate,
    Rejected(&'static str),
}

#[derive(Default)]
struct Model {
    subs: HashMap<String, ModelSub>,
    usages: HashMap<String, ModelUsage>,
}

#[derive(Debug, Clone)]
struct Snapshot {
    id: String,
    version: i64,
    status: &'static str,
    period: (DateTime<Utc>, DateTime<Utc>),
    hard: Option<Decimal>,
    trial_end: Option<DateTime<Utc>>,
    trial_limit: Option<Decimal>,
}

impl Snapshot {
    fn json(&self) -> Value {
        // Limits as JSON numbers written from the exact decimal.
        let number = |value: Decimal| serde_json::from_str::<Value>(&value.to_string()).unwrap();
        let mut limits = serde_json::Map::new();
        if let Some(h) = self.hard {
            limits.insert("hardLimit".into(), json!({"quantity": number(h)}));
        }
        if let Some(t) = self.trial_limit {
            limits.insert("trialLimit".into(), number(t));
        }
        json!({
            "id": self.id, "status": self.status, "version": self.version,
            "currentPeriodStartTime": self.period.0.to_rfc3339(),
            "currentPeriodEndTime": self.period.1.to_rfc3339(),
            "trialEndTime": self.trial_end.map(|t| t.to_rfc3339()),
            "usageLimits": limits,
        })
    }
}

#[derive(Debug, Clone)]
struct Report {
    id: String,
    sub: String,
    quantity: Decimal,
    partial: bool,
    usage_time: Option<DateTime<Utc>>,
}

impl Report {
    fn json(&self) -> Value {
        let mut event = json!({
            "id": self.id, "subscriptionId": self.sub, "quantity": self.quantity.to_string(),
            "acceptPartialQuantity": self.partial,
        });
        if let Some(t) = self.usage_time {
            event["usageTime"] = json!(t.to_rfc3339());
        }
        event
    }
}

impl Model {
    fn apply_snapshot(&mut self, s: &Snapshot) {
        let usages = &self.usages;
        let trial_used_until = |end: Option<DateTime<Utc>>| -> Decimal {
            usages
                .values()
                .filter(|u| u.sub == s.id && !u.voided && end.is_some_and(|end| u.usage_time < end))
                .map(|u| u.quantity)
                .sum()
        };
        match self.subs.get_mut(&s.id) {
            Some(sub) if !sub.deleted && sub.version >= s.version => return,
            Some(sub) => {
                if sub.trial_end != s.trial_end {
                    sub.trial_used = trial_used_until(s.trial_end);
                }
                sub.version = s.version;
                sub.status = s.status.to_owned();
                sub.deleted = false;
                sub.trial_end = s.trial_end;
                sub.trial_limit = s.trial_limit;
            }
            None => {
                self.subs.insert(
                    s.id.clone(),
                    ModelSub {
                        version: s.version,
                        status: s.status.to_owned(),
                        deleted: false,
                        trial_end: s.trial_end,
                        trial_limit: s.trial_limit,
                        trial_used: Decimal::ZERO,
                        periods: BTreeMap::new(),
                    },
                );
            }
        }
        let sub = self.subs.get_mut(&s.id).unwrap();
        let period = sub.periods.entry(s.period.0).or_insert(ModelPeriod {
            end: s.period.1,
            hard: None,
            used: Decimal::ZERO,
            invoiced: false,
        });
        period.end = s.period.1;
        period.hard = s.hard;
    }

    fn apply_tombstone(&mut self, id: &str) {
        if let Some(sub) = self.subs.get_mut(id) {
            sub.deleted = true;
        }
    }

    /// Whether the invoice applied (else it is dead-lettered).
    fn apply_invoice(&mut self, sub_id: &str, period_start: DateTime<Utc>) -> bool {
        let Some(period) = self.subs.get_mut(sub_id).and_then(|s| s.periods.get_mut(&period_start)) else {
            return false;
        };
        period.invoiced = true;
        for usage in self.usages.values_mut() {
            if usage.sub == sub_id && usage.period_start == period_start && !usage.voided {
                usage.invoiced = true;
            }
        }
        true
    }

    fn closed(period: &ModelPeriod, now: DateTime<Utc>) -> bool {
        period.invoiced || period.end + chrono::Duration::hours(GRACE_HOURS) <= now
    }

    fn report(&mut self, r: &Report, request_time: DateTime<Utc>, now: DateTime<Utc>) -> Expected {
        if let Some(stored) = self.usages.get(&r.id) {
            if stored.voided {
                return Expected::Rejected("usage_voided");
            }
            let same = stored.sub == r.sub
                && stored.requested == r.quantity
                && stored.partial == r.partial
                && r.usage_time.is_none_or(|t| t == stored.usage_time);
            return if same {
                Expected::Duplicate
            } else {
                Expected::Rejected("idempotency_conflict")
            };
        }
        let Some(sub) = self.subs.get_mut(&r.sub) else {
            return Expected::Rejected("subscription_not_found");
        };
        if sub.deleted || !["active", "trial"].contains(&sub.status.as_str()) {
            return Expected::Rejected("subscription_not_active");
        }
        let usage_time = r.usage_time.unwrap_or(request_time);
        let Some((&start, _)) = sub
            .periods
            .iter()
            .filter(|(start, p)| **start <= usage_time && usage_time < p.end)
            .max_by_key(|(start, _)| **start)
        else {
            return Expected::Rejected("no_service_period");
        };
        let in_trial = sub.trial_end.is_some_and(|end| usage_time < end);
        let period = sub.periods.get_mut(&start).unwrap();
        if Self::closed(period, now) {
            return Expected::Rejected("period_closed");
        }
        let mut available: Option<Decimal> = period.hard.map(|h| (h - period.used).max(Decimal::ZERO));
        if let (true, Some(limit)) = (in_trial, sub.trial_limit) {
            let trial = (limit - sub.trial_used).max(Decimal::ZERO);
            available = Some(available.map_or(trial, |a| a.min(trial)));
        }
        let quantity = match available {
            Some(a) if r.quantity > a => {
                if r.partial && a >= d("0.001") {
                    a
                } else {
                    return Expected::Rejected("usage_limit_exceeded");
                }
            }
            _ => r.quantity,
        };
        period.used += quantity;
        if in_trial {
            sub.trial_used += quantity;
        }
        self.usages.insert(
            r.id.clone(),
            ModelUsage {
                sub: r.sub.clone(),
                quantity,
                requested: r.quantity,
                partial: r.partial,
                usage_time,
                period_start: start,
                invoiced: false,
                voided: false,
            },
        );
        Expected::Created(quantity)
    }

    /// The HTTP status a delete (a void) answers.
    fn delete(&mut self, id: &str, now: DateTime<Utc>) -> u16 {
        let Some(usage) = self.usages.get(id).filter(|u| !u.voided) else {
            return 404;
        };
        if usage.invoiced {
            return 409;
        }
        let sub = self.subs.get_mut(&usage.sub).unwrap();
        let period = sub.periods.get_mut(&usage.period_start).unwrap();
        if Self::closed(period, now) {
            return 409;
        }
        period.used -= usage.quantity;
        if sub.trial_end.is_some_and(|end| usage.usage_time < end) {
            sub.trial_used -= usage.quantity;
        }
        self.usages.get_mut(id).expect("found above").voided = true;
        204
    }
}

// Worker processes.

struct Workers {
    vars: Vec<(String, String)>,
    running: Vec<Child>,
    logs: Vec<std::path::PathBuf>,
}

impl Workers {
    fn spawn(&mut self) -> usize {
        let log = std::env::temp_dir().join(format!(
            "usage-worker-control-plane-{}-{}.log",
            std::process::id(),
            self.logs.len()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_usage-worker"));
        command
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in &self.vars {
            command.env(k, v);
        }
        self.running.push(command.spawn().expect("starting a worker"));
        self.logs.push(log);
        self.running.len() - 1
    }

    fn signal(&self, index: usize, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.running[index].id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    fn check_running(&mut self) {
        for (i, child) in self.running.iter_mut().enumerate() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "worker {i} exited on its own ({status}); its log: {}",
                    self.logs[i].display()
                );
            }
        }
    }

    /// SIGTERM and a clean exit.
    fn restart(&mut self, index: usize) {
        self.signal(index, "CONT");
        self.signal(index, "TERM");
        let status = self.running[index].wait().unwrap();
        assert!(status.success(), "worker {index} stopped cleanly: {status}");
        let replacement = self.spawn();
        self.running.swap(index, replacement);
        self.running.pop();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            for log in &self.logs {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

/// Freezes a worker with SIGSTOP for a while, from a thread of its own: its
/// control readers fall behind the others', and the group moves its
/// partitions on.
fn freeze(pid: u32, how_long: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let kill = |name: &str| {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(pid.to_string())
                .status();
        };
        kill("STOP");
        std::thread::sleep(how_long);
        kill("CONT");
    })
}

/// What the run produced and expects on one partition of `usage-results`,
/// in order.
#[derive(Default)]
struct Expectations {
    by_partition: HashMap<i32, Vec<(String, Expected)>>,
    count: usize,
}

fn outcome_of(record: &Value) -> Expected {
    match record["status"].as_str().unwrap() {
        "created" => Expected::Created(record["usage"]["quantity"].to_string().parse().unwrap()),
        "duplicate" => Expected::Duplicate,
        "rejected" => {
            let code = record["error"]["code"].as_str().unwrap().to_owned();
            Expected::Rejected(Box::leak(code.into_boxed_str()))
        }
        other => panic!("unexpected status {other}: {record}"),
    }
}

struct Run {
    seed: u64,
    rng: Rng,
    periods: Periods,
    model: Model,
    /// The next version each subscription's snapshots count from.
    versions: Vec<i64>,
    next_id: usize,
}

impl Run {
    fn snapshot(&mut self, i: usize) -> Snapshot {
        // Versions mostly rise; now and then one arrives late (lower).
        let version = if self.rng.chance(20) {
            (self.versions[i] - 1 - self.rng.below(3) as i64).max(1)
        } else {
            self.versions[i] += 1 + self.rng.below(2) as i64;
            self.versions[i]
        };
        let period = if self.rng.chance(20) {
            self.periods.past
        } else {
            self.periods.current
        };
        let trial_end = match self.rng.below(3) {
            0 => None,
            1 => Some(self.periods.current.0 + chrono::Duration::days(5)),
            _ => Some(self.periods.current.1),
        };
        Snapshot {
            id: sub_id(i),
            version,
            status: STATUSES[self.rng.below(STATUSES.len() as u64) as usize],
            period,
            hard: (!self.rng.chance(20)).then(|| Decimal::from(4 + self.rng.below(20))),
            trial_end,
            trial_limit: self.rng.chance(50).then(|| Decimal::from(2 + self.rng.below(8))),
        }
    }

    fn report(&mut self) -> Report {
        let sub = sub_id(self.rng.below(SUBSCRIPTIONS as u64 + 1) as usize % SUBSCRIPTIONS);
        // Now and then the same id again: the same request, or another.
        let earlier: Vec<(String, ModelUsage)> = self
            .model
            .usages
            .iter()
            .filter(|(_, u)| u.sub == sub)
            .map(|(id, u)| (id.clone(), u.clone()))
            .collect();
        if !earlier.is_empty() && self.rng.chance(10) {
            let (id, u) = self.rng.pick(&earlier).clone();
            let quantity = if self.rng.chance(50) {
                u.requested
            } else {
                u.requested + Decimal::ONE
            };
            return Report {
                id,
                sub,
                quantity,
                partial: u.partial,
                usage_time: None,
            };
        }
        self.next_id += 1;
        let usage_time = self
            .rng
            .chance(10)
            .then(|| self.periods.past.0 + chrono::Duration::days(5));
        Report {
            id: format!("s{}_u{}", self.seed, self.next_id),
            sub,
            quantity: Decimal::new(5 * (1 + self.rng.below(8) as i64), 1),
            partial: self.rng.chance(40),
            usage_time,
        }
    }
}

async fn check_final_state(env: &TestEnv, model: &Model, seed: u64) {
    let subs: Vec<(String, i64, String, bool, Decimal)> =
        sqlx::query_as("SELECT id, version, status, deleted, trial_used FROM subscriptions ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let expected: Vec<(String, i64, String, bool, Decimal)> = {
        let mut v: Vec<_> = model
            .subs
            .iter()
            .map(|(id, s)| (id.clone(), s.version, s.status.clone(), s.deleted, s.trial_used))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(subs, expected, "seed {seed}: subscriptions");
    type PeriodRow = (String, DateTime<Utc>, Option<Decimal>, Decimal, bool);
    let periods: Vec<PeriodRow> = sqlx::query_as(
        "SELECT subscription_id, start_time, hard_limit, used, closed_time IS NOT NULL FROM service_periods
         ORDER BY subscription_id, start_time",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut expected = Vec::new();
    for (id, s) in &model.subs {
        for (start, p) in &s.periods {
            expected.push((id.clone(), *start, p.hard, p.used, p.invoiced));
        }
    }
    expected.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(periods, expected, "seed {seed}: periods");
    let usages: Vec<(String, Decimal, bool, bool)> =
        sqlx::query_as("SELECT id, quantity, invoice_id IS NOT NULL, voided_time IS NOT NULL FROM usages ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let mut expected: Vec<(String, Decimal, bool, bool)> = model
        .usages
        .iter()
        .map(|(id, u)| (id.clone(), u.quantity, u.invoiced, u.voided))
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(usages, expected, "seed {seed}: usages");
}

async fn run_seed(seed: u64, rounds: usize) {
    let env = TestEnv::start().await;
    let started = Instant::now();
    let mut run = Run {
        seed,
        rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        periods: Periods::new(),
        model: Model::default(),
        versions: vec![0; SUBSCRIPTIONS],
        next_id: 0,
    };
    let mut vars = env.env_vars(test_kit::env::CONFIG_DIR);
    vars.extend([
        ("USAGE_WORKER__KAFKA__SESSION_TIMEOUT_MS".into(), "3000".into()),
        ("USAGE_WORKER__KAFKA__HEARTBEAT_INTERVAL_MS".into(), "300".into()),
        (
            "USAGE_WORKER__PIPELINE__PERIOD_GRACE_SECS".into(),
            (GRACE_HOURS * 3600).to_string(),
        ),
        ("USAGE_WORKER__HTTP__ENABLED".into(), "false".into()),
        ("RUST_LOG".into(), "info".into()),
        ("NO_COLOR".into(), "1".into()),
    ]);
    let mut workers = Workers {
        vars,
        running: Vec::new(),
        logs: Vec::new(),
    };
    workers.spawn();
    workers.spawn();
    let api = ApiServer::start(
        env.pool.clone(),
        ApiConfig::from_settings(&env.settings(), PARTITIONS, false),
        Arc::new(Metrics::default()),
    )
    .await;
    let client = reqwest::Client::new();
    let results = Reader::new(env.kafka.bootstrap_servers(), "usage-results", PARTITIONS);
    let mut seen: HashSet<String> = HashSet::new();
    let late_start = 1 + run.rng.below(3) as usize;
    let restart_at = rounds / 2;
    let mut frozen: Vec<std::thread::JoinHandle<()>> = Vec::new();
    // How often each outcome came: a run that never reaches a rule proves
    // nothing about it.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();

    for round in 0..rounds {
        let log = |what: &str| {
            println!(
                "[seed {seed} {:>6.2}s] round {round}: {what}",
                started.elapsed().as_secs_f64()
            );
        };
        if round == late_start {
            workers.spawn();
            log("a third worker starts");
        }
        if round == restart_at {
            let index = run.rng.below(workers.running.len() as u64) as usize;
            workers.restart(index);
            log(&format!("worker {index} restarted"));
        }
        if round > 0 && run.rng.chance(35) {
            let index = run.rng.below(workers.running.len() as u64) as usize;
            frozen.push(freeze(workers.running[index].id(), Duration::from_secs(5)));
            log(&format!("worker {index} frozen for 5 s"));
        }
        // Control messages: snapshots and tombstones, or invoices (the two
        // topics are read by separate readers; a round takes one of them so
        // that their order is the order the model applies).
        let invoices_round = round > 2 && run.rng.chance(30);
        let controls = 1 + run.rng.below(6);
        for _ in 0..controls {
            let i = run.rng.below(SUBSCRIPTIONS as u64) as usize;
            let id = sub_id(i);
            let partition = Some(partition_of(&id));
            if invoices_round {
                let period = if run.rng.chance(70) {
                    run.periods.current
                } else {
                    run.periods.past
                };
                let invoice = json!({
                    "type": "invoice-issued", "invoiceId": format!("inv_{seed}_{round}_{i}"),
                    "issuedTime": Utc::now().to_rfc3339(),
                    "items": [{"invoiceItemId": format!("ii_{round}_{i}"), "subscriptionId": id,
                               "periodStartTime": period.0.to_rfc3339(), "periodEndTime": period.1.to_rfc3339()}]
                });
                run.model.apply_invoice(&id, period.0);
                env.send_at(
                    "invoice-events",
                    partition,
                    Some(&id),
                    Some(invoice.to_string().as_bytes()),
                );
            } else if run.model.subs.contains_key(&id) && run.rng.chance(15) {
                run.model.apply_tombstone(&id);
                env.send_at("subscriptions", partition, Some(&id), None);
            } else {
                let snapshot = run.snapshot(i);
                run.model.apply_snapshot(&snapshot);
                env.send_at(
                    "subscriptions",
                    partition,
                    Some(&id),
                    Some(snapshot.json().to_string().as_bytes()),
                );
            }
        }
        env.flush();
        // Usage right after, with no wait: a worker applies what was on the
        // control topics before it decides a batch read after it.
        let mut expectations = Expectations::default();
        let reports = 4 + run.rng.below(12);
        for _ in 0..reports {
            let report = run.report();
            let now = Utc::now();
            // The message's timestamp is the request time; usage without a
            // usageTime falls in the current period whatever it is exactly.
            let expected = run.model.report(&report, now, now);
            let partition = partition_of(&report.sub);
            env.send_at(
                "usage-events",
                Some(partition),
                Some(&report.sub),
                Some(report.json().to_string().as_bytes()),
            );
            expectations
                .by_partition
                .entry(partition)
                .or_default()
                .push((report.id.clone(), expected));
            expectations.count += 1;
        }
        env.flush();
        let mut actual: HashMap<i32, Vec<(i64, Record)>> = HashMap::new();
        let mut got = 0;
        let deadline = Instant::now() + WAIT;
        while got < expectations.count {
            assert!(
                Instant::now() < deadline,
                "seed {seed} round {round}: {got} of {} outcomes arrived",
                expectations.count
            );
            for record in results.read_rest(Duration::from_millis(300)) {
                if record.value["source"]["http"] == json!(true) {
                    continue;
                }
                let outcome_id = record.value["outcomeId"].as_str().unwrap().to_owned();
                if !seen.insert(outcome_id) {
                    continue; // a broker repeat of a retried send
                }
                let source = &record.value["source"];
                let partition = source["partition"].as_i64().unwrap() as i32;
                actual
                    .entry(partition)
                    .or_default()
                    .push((source["offset"].as_i64().unwrap(), record));
                got += 1;
            }
            workers.check_running();
        }
        for (partition, expected) in &expectations.by_partition {
            let mut outcomes = actual.remove(partition).unwrap_or_default();
            outcomes.sort_by_key(|(offset, _)| *offset);
            let outcomes: Vec<(String, Expected)> = outcomes
                .iter()
                .map(|(_, r)| (r.value["eventId"].as_str().unwrap().to_owned(), outcome_of(&r.value)))
                .collect();
            assert_eq!(&outcomes, expected, "seed {seed} round {round}: partition {partition}");
            for (_, outcome) in outcomes {
                let kind = match outcome {
                    Expected::Created(_) => "created".to_owned(),
                    Expected::Duplicate => "duplicate".to_owned(),
                    Expected::Rejected(code) => code.to_owned(),
                };
                *kinds.entry(kind).or_default() += 1;
            }
        }
        assert!(
            actual.is_empty(),
            "seed {seed} round {round}: outcomes nobody sent: {actual:?}"
        );
        // HTTP creates and deletes (voids), each answered before the next.
        for _ in 0..run.rng.below(4) {
            let now = Utc::now();
            if run.rng.chance(40) && !run.model.usages.is_empty() {
                let ids: Vec<String> = run.model.usages.keys().cloned().collect();
                let id = run.rng.pick(&ids).clone();
                let expected = run.model.delete(&id, now);
                let response = client
                    .delete(format!("http://{}/usages/{id}", api.addr))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status().as_u16(),
                    expected,
                    "seed {seed} round {round}: DELETE {id}"
                );
            } else {
                let report = run.report();
                let expected = run.model.report(&report, now, now);
                let response = client
                    .post(format!("http://{}/usages", api.addr))
                    .json(&report.json())
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                let answered = match status {
                    201 => Expected::Created(body["quantity"].to_string().parse().unwrap()),
                    200 => Expected::Duplicate,
                    _ => Expected::Rejected(Box::leak(body["code"].as_str().unwrap().to_owned().into_boxed_str())),
                };
                assert_eq!(answered, expected, "seed {seed} round {round}: POST {}", report.json());
            }
        }
        log(&format!(
            "{} control messages, {} usages decided as the model did",
            controls, expectations.count
        ));
    }
    for thread in frozen {
        thread.join().unwrap();
    }
    // Every worker's readers catch up with the topics before the end state
    // is read: none of them may change it any more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    workers.check_running();
    check_final_state(&env, &run.model, seed).await;
    println!("[seed {seed}] outcomes as the model decided them: {kinds:?}");
    api.shutdown().await;
    drop(workers);
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_control_plane_equals_applying_each_message_once_in_order() {
    let seeds: Vec<u64> = std::env::var("CONTROL_PLANE_SEEDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("CONTROL_PLANE_SEEDS: numbers separated by commas")
        })
        .collect();
    let rounds = setting("CONTROL_PLANE_ROUNDS", 14);
    for seed in seeds {
        run_seed(seed, rounds).await;
    }
}
