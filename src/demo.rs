//! `usage-worker demo`: the real pipeline on an embedded Kafka mock cluster
//! and a fresh local database, fed with generated subscriptions and a mixed
//! stream of events, ending with a summary read back from `usage-results`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{Duration as Span, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::config::{LogSettings, Settings};
use crate::embedded::{json_payload, EmbeddedKafka, ScratchDatabase, TopicReader};
use crate::{pipeline, store, telemetry};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How many generated usage events to publish (the priced
    /// subscription's short script comes on top).
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Keep the demo database instead of dropping it at the end.
    #[arg(long)]
    pub keep_database: bool,
    /// Where the worker's logs go (the terminal shows the progress and the
    /// summary only).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("usage-worker-demo.log"))]
    pub log_file: PathBuf,
}

/// The worker's logs go to `--log-file`, not over the progress bar.
pub fn init_logging(settings: &LogSettings, args: &DemoArgs) -> anyhow::Result<()> {
    let file = std::fs::File::create(&args.log_file)
        .with_context(|| format!("creating the demo's log file {}", args.log_file.display()))?;
    telemetry::init_to(settings, std::sync::Mutex::new(file), false);
    Ok(())
}

const SUBSCRIPTIONS: usize = 12;

/// A subscription with a price and amount limits (SPEC version 2), fed a
/// short script of its own beside the generated stream.
const PRICED: &str = "sub_priced";
/// Tiered: 0.5 each for the first 100, then 0.4 each.
const PRICED_PRICING: &str = r#"{"currency": "USD", "formula": "tiered", "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]}"#;
/// A hard limit of 60 USD (125 units) and a soft limit of 40 USD, whose
/// 75, 90 and 100 % steps are 30, 36 and 40 USD (60, 72 and 80 units).
const PRICED_LIMITS: &str = r#"{"hardLimit": {"amount": 60}, "softLimit": {"amount": 40}}"#;
const PRICED_SUMMARY: &str = "tiered, 0.5 USD each up to 100, then 0.4; hard limit 60 USD, soft limit 40 USD";

/// The priced subscription's events, in order: quantity and
/// acceptPartialQuantity.
const PRICED_SCRIPT: [(&str, bool); 7] = [
    // 50 units cost 25 USD.
    ("50", false),
    // 62 cost 31 USD: the soft limit's 75 % step.
    ("12", false),
    // 74 cost 37 USD: its 90 % step.
    ("12", false),
    // 84 cost 42 USD: its 100 % step.
    ("10", false),
    // 129 would cost 61.6 USD: rejected, 41 available.
    ("45", false),
    // The same, accepting part: 41 accepted, 125 cost 60 USD, the hard
    // limit is reached.
    ("45", true),
    // Nothing more fits.
    ("1", false),
];

pub async fn run(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    let kafka = EmbeddedKafka::start(1)?;
    let t = settings.topics.clone();
    kafka.create_worker_topics(&t, args.partitions)?;
    settings.kafka.bootstrap_servers = kafka.bootstrap_servers().to_owned();
    settings.kafka.session_timeout_ms = 6000;
    settings.kafka.heartbeat_interval_ms = 500;

    let scratch = ScratchDatabase::create(&settings.database.url, "usage_worker_demo").await?;
    settings.database.url = scratch.url().to_owned();
    let database = scratch.name();
    let shown = show(&settings, &args, &kafka, database).await;
    println!("\nworker logs: {}", args.log_file.display());
    if args.keep_database {
        println!("database kept: {database}");
        return shown;
    }
    // Dropped whatever happened: a demo that fails half-way leaves nothing.
    let dropped = scratch
        .drop_now()
        .await
        .with_context(|| format!("dropping the demo database {database}"));
    if let (Err(_), Err(e)) = (&shown, &dropped) {
        eprintln!("demo: {e:#}");
    }
    shown.and(dropped)
}

/// Publishes the subscriptions and events, runs the pipeline and prints
/// what came out, on a fresh database.
async fn show(settings: &Settings, args: &DemoArgs, kafka: &EmbeddedKafka, database: &str) -> anyhow::Result<()> {
    let t = settings.topics.clone();
    let pool = store::connect(&settings.database).await?;
    store::migrate(&pool).await?;
    println!("demo: mock Kafka at {}, database {database}", kafka.bootstrap_servers());

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("linger.ms", "5")
        .create()?;
    let now = Utc::now();
    let period = ((now - Span::days(10)).to_rfc3339(), (now + Span::days(20)).to_rfc3339());
    for (id, snapshot) in subscriptions(&period) {
        send(&producer, &t.subscriptions, &id, &snapshot)?;
    }

    let counts = Arc::new(pipeline::DecisionCounts::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(pipeline::run(settings.clone(), pool.clone(), counts.clone(), async {
        let _ = stop_rx.await;
    }));

    let events = events(args.events);
    let started = Instant::now();
    let outcomes = match exchange(settings, &producer, &events, args.partitions, &worker).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            // The pipeline stops before its database is dropped.
            let _ = stop_tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
            return Err(e);
        }
    };
    let elapsed = started.elapsed();
    // An invoice closes INVOICED's period once its usage is decided; the
    // sweep closes sub_1's, which ended a month ago.
    let records = close_periods(settings, &producer, &period, args.partitions).await;
    let _ = stop_tx.send(());
    worker.await.context("worker task")??;
    let records = records?;

    print_summary(&outcomes, events.len(), elapsed);
    let alerts = tokio::task::block_in_place(|| read_all(settings, &t.usage_alerts, args.partitions))?;
    let dead_letters = tokio::task::block_in_place(|| read_all(settings, &t.dead_letters, args.partitions))?;
    println!("\nalerts on {}: {}", t.usage_alerts, alerts.len());
    if let Some(alert) = alerts.first() {
        println!("{}", serde_json::to_string_pretty(alert).unwrap_or_default());
    }
    println!("dead letters on {}: {}", t.dead_letters, dead_letters.len());
    print_priced(&outcomes, &alerts);
    print_periods(&records, &outcomes);
    pool.close().await;
    Ok(())
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &str,
) -> anyhow::Result<()> {
    let record = BaseRecord::to(topic).key(key).payload(payload);
    crate::kafka::producer::send_with_retry(producer, record, || std::thread::sleep(Duration::from_millis(5)))?;
    Ok(())
}

/// The subscription whose current period an invoice closes at the end.
const INVOICED: &str = "sub_4";

/// Publishes an invoice for INVOICED's current `period` and reads
/// `usage-periods` until both closed periods have their record: INVOICED's
/// (closed by the invoice) and sub_1's (closed by the sweep: it ended a
/// month ago).
async fn close_periods(
    settings: &Settings,
    producer: &ThreadedProducer<DefaultProducerContext>,
    (start, end): &(String, String),
    partitions: i32,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let invoice = serde_json::json!({
        "type": "invoice-issued", "invoiceId": "inv_demo", "issuedTime": Utc::now().to_rfc3339(),
        "items": [{"invoiceItemId": "inv_demo-1", "subscriptionId": INVOICED,
                   "periodStartTime": start, "periodEndTime": end}]
    });
    send(
        producer,
        &settings.topics.invoice_events,
        INVOICED,
        &invoice.to_string(),
    )?;
    let reader = TopicReader::open(
        &settings.kafka.bootstrap_servers,
        &settings.topics.usage_periods,
        partitions,
    )?;
    let started = Instant::now();
    let mut records = Vec::new();
    while records.len() < 2 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for the closed periods' records ({} of 2)",
            records.len()
        );
        let polled =
            tokio::task::block_in_place(|| reader.next(Duration::from_millis(100))).context("reading usage-periods")?;
        if let Some(message) = polled {
            records.push(json_payload(&message));
        }
    }
    Ok(records)
}

/// The closed periods' records, each digest recomputed from the outcomes
/// read back: the latest quantity of every usage of the period that was
/// not voided.
fn print_periods(records: &[serde_json::Value], outcomes: &[serde_json::Value]) {
    use rust_decimal::Decimal;
    println!(
        "
closed periods on usage-periods: {}",
        records.len()
    );
    println!(
        "{:<12} {:<10} {:<9} {:>6} {:>10} {:>6}  digest (checked against the outcomes)",
        "subscription", "closed by", "invoice", "usages", "quantity", "voided"
    );
    for record in records {
        let sub = record["subscriptionId"].as_str().unwrap_or_default();
        let start = record["periodStartTime"].as_str().unwrap_or_default();
        let mut latest: BTreeMap<&str, Option<Decimal>> = BTreeMap::new();
        for outcome in outcomes.iter().filter(|o| o["subscriptionId"] == sub) {
            let in_period = outcome["usage"]["usageTime"]
                .as_str()
                .is_some_and(|t| t >= start && record["periodEndTime"].as_str().is_none_or(|end| t < end));
            let (Some(id), true) = (outcome["usage"]["id"].as_str(), in_period) else {
                continue;
            };
            let quantity = outcome["usage"]["quantity"].to_string().parse::<Decimal>().ok();
            match outcome["status"].as_str() {
                Some("created" | "amended") => {
                    latest.insert(id, quantity);
                }
                Some("voided") => {
                    latest.insert(id, None);
                }
                _ => {}
            }
        }
        let counted = latest.iter().filter_map(|(id, q)| q.map(|q| (*id, q)));
        let digest = crate::domain::digest::period_digest(counted);
        let checked = if record["digest"] == digest.as_str() {
            "matches"
        } else {
            "DIFFERS"
        };
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        println!(
            "{:<12} {:<10} {:<9} {:>6} {:>10} {:>6}  {} ({checked})",
            sub,
            text(&record["closedBy"]),
            text(&record["invoiceId"]),
            text(&record["usageCount"]),
            text(&record["quantity"]),
            text(&record["voidedCount"]),
            text(&record["digest"]),
        );
    }
}

/// A handful of subscriptions that exercise every rule: generous and tight
/// hard limits, no limit, a paused one, one whose period closed long ago,
/// one that never named a period, and one priced with amount limits. All
/// but those share `period`.
fn subscriptions((start, end): &(String, String)) -> Vec<(String, String)> {
    let now = Utc::now();
    let mut subs = Vec::new();
    for i in 0..SUBSCRIPTIONS {
        let id = format!("sub_{i}");
        let (status, limits, period) = match i {
            0 => (
                "paused",
                r#"{"hardLimit": 100}"#.to_owned(),
                Some((start.clone(), end.clone())),
            ),
            1 => (
                "active",
                r#"{"hardLimit": 50}"#.to_owned(),
                Some(((now - Span::days(60)).to_rfc3339(), (now - Span::days(30)).to_rfc3339())),
            ),
            2 => ("active", r#"{"hardLimit": {"quantity": 500}}"#.to_owned(), None),
            3 => ("trial", "null".to_owned(), Some((start.clone(), end.clone()))),
            _ => {
                let hard = 400 + 150 * i;
                let limits = format!(
                    r#"{{"hardLimit": {{"quantity": {hard}}}, "softLimit": {}}}"#,
                    hard * 3 / 4
                );
                ("active", limits, Some((start.clone(), end.clone())))
            }
        };
        let period = match period {
            Some((s, e)) => {
                format!(r#""currentPeriodStartTime": "{s}", "currentPeriodEndTime": "{e}","#)
            }
            None => String::new(),
        };
        let snapshot =
            format!(r#"{{"id": "{id}", "status": "{status}", "version": 1, {period} "usageLimits": {limits}}}"#);
        subs.push((id, snapshot));
    }
    let snapshot = format!(
        r#"{{"id": "{PRICED}", "status": "active", "version": 1, "currentPeriodStartTime": "{start}", "currentPeriodEndTime": "{end}", "usageLimits": {PRICED_LIMITS}, "pricing": {PRICED_PRICING}}}"#
    );
    subs.push((PRICED.to_owned(), snapshot));
    subs
}

/// A deterministic mix of `count` events: mostly valid, some partial, some
/// over the limit, some invalid, some re-sent (duplicates), some for unknown
/// subscriptions; and the priced subscription's script, spread through
/// them in its order.
fn events(count: usize) -> Vec<(String, String)> {
    let mut events = generated_events(count);
    let spacing = count / PRICED_SCRIPT.len() + 1;
    // From the last, so that each insertion leaves the earlier places be.
    for (k, (quantity, partial)) in PRICED_SCRIPT.iter().enumerate().rev() {
        let payload = format!(
            r#"{{"id": "{}", "subscriptionId": "{PRICED}", "quantity": {quantity}, "acceptPartialQuantity": {partial}}}"#,
            priced_event_id(k)
        );
        events.insert((k * spacing).min(events.len()), (PRICED.to_owned(), payload));
    }
    events
}

fn priced_event_id(k: usize) -> String {
    format!("priced_{}", k + 1)
}

fn generated_events(count: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(count);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..count {
        let r = next();
        let sub = format!("sub_{}", r % SUBSCRIPTIONS as u64);
        let quantity = format!("{}.{:03}", 1 + r % 9, (r >> 8) % 1000);
        let payload = match (r >> 20) % 100 {
            0..=59 => {
                format!(r#"{{"id": "evt_{i}", "subscriptionId": "{sub}", "quantity": {quantity}}}"#)
            }
            60..=79 => format!(
                r#"{{"id": "evt_{i}", "subscriptionId": "{sub}", "quantity": "{quantity}", "acceptPartialQuantity": true}}"#
            ),
            80..=83 if i > 0 => {
                // An earlier event sent again, unchanged: a duplicate (or the
                // same rejection again, when the first was rejected).
                let (key, payload) = out[(r >> 32) as usize % i].clone();
                out.push((key, payload));
                continue;
            }
            84 if i > 0 => {
                // An earlier id with a different quantity: a conflict.
                let j = (r >> 32) as usize % i;
                format!(r#"{{"id": "evt_{j}", "subscriptionId": "{sub}", "quantity": 0.001}}"#)
            }
            96 | 97 if i > 0 => {
                // A correction of an earlier event, keyed like it so that it
                // comes after it: voided or amended, or rejected when that
                // event was not stored (usage_not_found) or was voided.
                let j = (r >> 32) as usize % i;
                let (key, _) = out[j].clone();
                let payload = if (r >> 20) % 100 == 96 {
                    format!(r#"{{"action": "void", "id": "evt_{j}", "subscriptionId": "{key}", "reason": "demo"}}"#)
                } else {
                    format!(
                        r#"{{"action": "amend", "id": "evt_{j}", "subscriptionId": "{key}", "quantity": {}, "acceptPartialQuantity": true}}"#,
                        1 + (r >> 40) % 4
                    )
                };
                out.push((key, payload));
                continue;
            }
            95 => {
                // Usage inside sub_1's period that closed a month ago.
                let when = (Utc::now() - Span::days(45)).to_rfc3339();
                let payload =
                    format!(r#"{{"id": "evt_{i}", "subscriptionId": "sub_1", "quantity": 1, "usageTime": "{when}"}}"#);
                out.push(("sub_1".to_owned(), payload));
                continue;
            }
            85..=87 => {
                format!(r#"{{"id": "evt_{i}", "subscriptionId": "sub_unknown", "quantity": 1}}"#)
            }
            88..=89 => {
                format!(r#"{{"id": "evt_{i}", "subscriptionId": "{sub}", "quantity": 0.0005}}"#)
            }
            90..=91 => format!(r#"{{"id": "evt_{i}", "subscriptionId": "{sub}"}}"#),
            92 => "not json at all".to_owned(),
            93 => format!(
                r#"{{"id": "evt_{i}", "subscriptionId": "{sub}", "quantity": 1, "usageTime": "2026-01-01T00:00:00"}}"#
            ),
            _ => format!(r#"{{"subscriptionId": "{sub}", "quantity": 1e0}}"#),
        };
        out.push((sub, payload));
    }
    out
}

/// How many events may be ahead of their outcomes. The mock cluster keeps
/// only about 5 MiB per partition, so producing far ahead of the worker
/// would let it drop unread events.
const MAX_IN_FLIGHT: usize = 5000;

/// Publishes the events while reading `usage-results` from the start, until
/// every event has its outcome, with a progress line.
async fn exchange(
    settings: &Settings,
    producer: &ThreadedProducer<DefaultProducerContext>,
    events: &[(String, String)],
    partitions: i32,
    worker: &tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let reader = TopicReader::open(
        &settings.kafka.bootstrap_servers,
        &settings.topics.usage_results,
        partitions,
    )?;
    let progress = ProgressBar::new(events.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} outcomes, {per_sec}, {elapsed}")
            .context("the progress bar's template")?,
    );
    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut sent = 0;
    while outcomes.len() < events.len() {
        anyhow::ensure!(!worker.is_finished(), "the worker stopped early");
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "timed out waiting for outcomes"
        );
        while sent < events.len() && sent < outcomes.len() + MAX_IN_FLIGHT {
            let (key, payload) = &events[sent];
            send(producer, &settings.topics.usage_events, key, payload)?;
            sent += 1;
        }
        let polled =
            tokio::task::block_in_place(|| reader.next(Duration::from_millis(100))).context("reading usage-results")?;
        if let Some(message) = polled {
            outcomes.push(json_payload(&message));
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    Ok(outcomes)
}

/// Everything on a topic, read until it has been quiet for a second.
fn read_all(settings: &Settings, topic: &str, partitions: i32) -> anyhow::Result<Vec<serde_json::Value>> {
    let reader = TopicReader::open(&settings.kafka.bootstrap_servers, topic, partitions)?;
    let records = reader.until_quiet(Duration::from_secs(1))?;
    Ok(records.iter().map(json_payload).collect())
}

fn print_summary(outcomes: &[serde_json::Value], events: usize, elapsed: Duration) {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut samples: HashMap<(String, String), &serde_json::Value> = HashMap::new();
    let mut per_source: HashMap<(i64, i64), usize> = HashMap::new();
    for outcome in outcomes {
        let mut status = outcome["status"].as_str().unwrap_or("?").to_owned();
        if outcome["partial"] == serde_json::Value::Bool(true) {
            status.push_str(" (partial)");
        }
        let code = outcome["error"]["code"].as_str().unwrap_or("").to_owned();
        *counts.entry((status.clone(), code.clone())).or_default() += 1;
        samples.entry((status, code)).or_insert(outcome);
        let source = (
            outcome["source"]["partition"].as_i64().unwrap_or(-1),
            outcome["source"]["offset"].as_i64().unwrap_or(-1),
        );
        *per_source.entry(source).or_default() += 1;
    }
    let repeated = per_source.values().filter(|n| **n > 1).count();
    println!("\n== usage-worker demo ==");
    println!("events published     {events}");
    println!(
        "outcomes read back   {} ({} events with more than one outcome)",
        outcomes.len(),
        repeated
    );
    println!(
        "elapsed              {:.2} s ({:.0} events/s end to end)",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    println!("\n{:<18} {:<26} {:>7}", "status", "reason", "count");
    for ((status, code), count) in &counts {
        println!(
            "{:<18} {:<26} {:>7}",
            status,
            if code.is_empty() { "-" } else { code },
            count
        );
    }
    println!("\nsample outcomes:");
    for key in [
        ("created".to_owned(), String::new()),
        ("created (partial)".to_owned(), String::new()),
        ("duplicate".to_owned(), String::new()),
        ("rejected".to_owned(), "usage_limit_exceeded".to_owned()),
        ("rejected".to_owned(), "invalid_field".to_owned()),
        ("voided".to_owned(), String::new()),
        ("amended".to_owned(), String::new()),
    ] {
        if let Some(sample) = samples.get(&key) {
            println!("{}", serde_json::to_string_pretty(sample).unwrap_or_default());
        }
    }
}

/// The priced subscription's script, event by event, as its outcomes and
/// alerts came back: quantities, and amounts in the plan's currency.
fn print_priced(outcomes: &[serde_json::Value], alerts: &[serde_json::Value]) {
    use serde_json::Value;
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let money = |amount: &Value, currency: &Value| match (amount, currency) {
        (Value::Null, _) => "-".to_owned(),
        (amount, Value::String(currency)) => format!("{amount} {currency}"),
        (amount, _) => amount.to_string(),
    };
    println!("\npriced subscription {PRICED} ({PRICED_SUMMARY}):");
    println!(
        "{:<10} {:>5} {:<7} {:<30} {:>8} {:>5} {:>11} {:>9}",
        "event", "asked", "part ok", "outcome", "accepted", "used", "used amount", "available"
    );
    let mut partial_limit = None;
    for (k, (quantity, partial)) in PRICED_SCRIPT.iter().enumerate() {
        let id = priced_event_id(k);
        // A re-sent event would come back as a duplicate; the first
        // outcome is the decision.
        let Some(outcome) = outcomes
            .iter()
            .find(|o| o["eventId"] == id.as_str() && o["status"] != "duplicate")
        else {
            println!("{id:<10} {quantity:>5}  no outcome read back");
            continue;
        };
        let mut status = text(&outcome["status"]);
        if outcome["partial"] == Value::Bool(true) {
            status.push_str(" (partial)");
            partial_limit = Some((id.clone(), &outcome["limit"]));
        }
        if let Value::String(code) = &outcome["error"]["code"] {
            status = format!("{status} {code}");
        }
        // A creation reports the binding limit after it, a rejection the
        // limit that refused it.
        let limit = if outcome["limit"].is_null() {
            &outcome["error"]["limit"]
        } else {
            &outcome["limit"]
        };
        println!(
            "{:<10} {:>5} {:<7} {:<30} {:>8} {:>5} {:>11} {:>9}",
            id,
            quantity,
            if *partial { "yes" } else { "no" },
            status,
            text(&outcome["usage"]["quantity"]),
            text(&limit["used"]),
            money(&limit["usedAmount"], &limit["currency"]),
            text(&limit["available"]),
        );
    }
    if let Some((id, limit)) = partial_limit {
        println!("limit of {id}'s outcome: {limit}");
    }
    let mut raised: Vec<&Value> = alerts.iter().filter(|a| a["subscriptionId"] == PRICED).collect();
    raised.sort_by_key(|a| (a["type"] != "soft-usage-limit-reached", a["threshold"].as_u64()));
    println!("alerts of {PRICED}: {}", raised.len());
    for alert in raised {
        println!(
            "  {:<25} {:>3} %  used {} of {} ({} units), by {}",
            text(&alert["type"]),
            text(&alert["threshold"]),
            money(&alert["usedAmount"], &alert["currency"]),
            money(&alert["limitAmount"], &alert["currency"]),
            text(&alert["used"]),
            text(&alert["usageId"]),
        );
    }
}
