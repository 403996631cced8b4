//! Closed periods, for invoicing (SPEC version 2): a period that closes by
//! time or by an invoice gives exactly one `usage-period-closed` record on
//! `usage-periods`, with its totals and a digest that invoicing can
//! recompute; an invoice that bills a period closed before it gives one
//! `usage-period-invoiced`; a second, different invoice is dead-lettered;
//! `GET /subscriptions/{id}/periods` lists them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use test_kit::{active_subscription, period_closing, ApiServer, Reader, Record, TestEnv, PARTITIONS};
use usage_worker::config::Partitioner;
use usage_worker::domain::invoice::decode_invoice_event;
use usage_worker::domain::subscription::decode_snapshot;
use usage_worker::http::ApiConfig;
use usage_worker::kafka::partition::output_partition;
use usage_worker::metrics::Metrics;
use usage_worker::store::{self, ControlMessage, ItemResult, SnapshotChange};

const WAIT: Duration = Duration::from_secs(60);

fn reader(env: &TestEnv, topic: &str) -> Reader {
    Reader::new(env.kafka.bootstrap_servers(), topic, PARTITIONS)
}

/// Now, to the second (what a snapshot carries is compared with what is stored).
fn now_s() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
}

/// How the worker writes a time.
fn written(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The digest as invoicing would compute it from the usages it was sent:
/// SHA-256 over `<id>:<quantity>\n`, sorted by id in byte order, each
/// quantity as the JSON number's text.
fn digest_of(usages: &[(&str, &str)]) -> String {
    let mut lines: Vec<String> = usages.iter().map(|(id, q)| format!("{id}:{q}\n")).collect();
    lines.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let hash = Sha256::digest(lines.concat().as_bytes());
    format!("sha256:{}", hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The usage id and the quantity exactly as written in a created outcome.
fn usage_line(outcome: &Record) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Usage {
        id: String,
        quantity: Box<serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Outcome {
        usage: Usage,
    }
    let outcome: Outcome = serde_json::from_slice(&outcome.payload).unwrap();
    (outcome.usage.id, outcome.usage.quantity.get().to_owned())
}

/// Applies a snapshot straight to the store (as the next message of its own
/// partition of a test group), before any worker runs.
async fn subscribe(env: &TestEnv, offset: i64, snapshot: Value) {
    let change = ControlMessage {
        partition: 0,
        offset,
        body: SnapshotChange::Upsert(decode_snapshot(snapshot.to_string().as_bytes()).unwrap()),
    };
    store::apply_snapshots(&env.pool, "setup", "subscriptions", &[change], &[], &[])
        .await
        .unwrap();
}

/// A usage accepted before the period closed (inserted as the worker would
/// have), voided when `voided`.
async fn past_usage(env: &TestEnv, id: &str, sub: &str, period_start: DateTime<Utc>, quantity: &str, voided: bool) {
    sqlx::query(
        "INSERT INTO usages (id, subscription_id, quantity, requested_quantity, accept_partial, usage_time,
                             period_start_time, created_time, updated_time, voided_time)
         VALUES ($1, $2, $3::numeric, $3::numeric, false, $4, $5, now(), now(), CASE WHEN $6 THEN now() END)",
    )
    .bind(id)
    .bind(sub)
    .bind(quantity)
    .bind(period_start + chrono::Duration::hours(1))
    .bind(period_start)
    .bind(voided)
    .execute(&env.pool)
    .await
    .unwrap();
}

fn snapshot(id: &str, version: i64, period: Option<(DateTime<Utc>, DateTime<Utc>)>) -> Value {
    let mut s = json!({"id": id, "status": "active", "version": version});
    if let Some((start, end)) = period {
        s["currentPeriodStartTime"] = json!(start.to_rfc3339());
        s["currentPeriodEndTime"] = json!(end.to_rfc3339());
    }
    s
}

fn invoice(id: &str, sub: &str, period: (DateTime<Utc>, DateTime<Utc>)) -> Value {
    json!({"type": "invoice-issued", "invoiceId": id, "issuedTime": Utc::now().to_rfc3339(),
           "items": [{"invoiceItemId": format!("{id}-1"), "subscriptionId": sub,
                      "periodStartTime": period.0.to_rfc3339(), "periodEndTime": period.1.to_rfc3339()}]})
}

fn metric(metrics: &Metrics, series: &str) -> u64 {
    let page = metrics.render();
    page.lines()
        .find_map(|line| line.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {series} on\n{page}"))
}

fn closed_series() -> &'static str {
    r#"usage_worker_period_records_total{type="usage-period-closed"}"#
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_period_that_closes_by_time_gives_one_record_with_its_totals_and_digest() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.pipeline.period_grace_secs = 10;
    let worker = env.worker_with(settings).await;
    // The worker decides before the period below is sent: its grace is short.
    env.subscription(active_subscription("sub_warm", None));
    env.usage(json!({"id": "w1", "subscriptionId": "sub_warm", "quantity": 1}));
    env.flush();
    let results = env.results_reader();
    results.read(1, WAIT);

    let end = now_s() + chrono::Duration::seconds(5);
    let start = end - chrono::Duration::days(30);
    let mut priced = snapshot("sub_p", 1, Some((start, end)));
    priced["pricing"] = json!({"currency": "USD", "formula": "flat-rate", "price": 0.25});
    env.subscription(priced);
    let usage_time = (end - chrono::Duration::hours(1)).to_rfc3339();
    for (id, quantity) in [("p1", "1.500"), ("p2", "2.25"), ("p10", "4")] {
        env.usage(json!({"id": id, "subscriptionId": "sub_p", "quantity": quantity, "usageTime": usage_time}));
    }
    env.flush();
    let outcomes = results.read(3, WAIT);
    assert!(
        outcomes.iter().all(|o| o.value["status"] == "created"),
        "decided before the period closed: {outcomes:?}"
    );
    // A void (the corrections' work; here by hand): it stays a row and
    // counts apart.
    sqlx::query("UPDATE usages SET voided_time = now() WHERE id = 'p10'")
        .execute(&env.pool)
        .await
        .unwrap();
    let counting: Vec<(String, String)> = outcomes.iter().map(usage_line).filter(|(id, _)| id != "p10").collect();
    assert_eq!(
        counting,
        [
            ("p1".to_owned(), "1.5".to_owned()),
            ("p2".to_owned(), "2.25".to_owned())
        ]
    );

    // The sweep closes it once its end plus grace has passed.
    let periods = reader(&env, "usage-periods");
    let records = periods.read(1, WAIT);
    let record = &records[0];
    let lines: Vec<(&str, &str)> = counting.iter().map(|(i, q)| (i.as_str(), q.as_str())).collect();
    assert_eq!(
        record.value,
        json!({
            "type": "usage-period-closed", "subscriptionId": "sub_p",
            "periodStartTime": written(start), "periodEndTime": written(end),
            "closedTime": written(end + chrono::Duration::seconds(10)), "closedBy": "grace", "invoiceId": null,
            "usageCount": 2, "quantity": 3.75, "amount": 0.9375, "currency": "USD", "voidedCount": 1,
            "digest": digest_of(&lines),
        })
    );
    let text = String::from_utf8(record.payload.clone()).unwrap();
    assert!(
        text.contains(r#""quantity":3.75,"amount":0.9375,"#),
        "exact numbers: {text}"
    );
    assert_eq!(record.key.as_deref(), Some("sub_p"));
    assert_eq!(
        record.partition,
        output_partition("sub_p", PARTITIONS, Partitioner::Murmur2),
        "the subscription's partition, as for HTTP outcomes"
    );
    assert_eq!(record.headers["type"], "usage-period-closed");
    assert!(record.headers["record-id"].starts_with("pr_"));
    assert!(record.headers.contains_key("outbox-seq"));
    assert!(
        periods.read_rest(Duration::from_secs(3)).is_empty(),
        "one record, and none for the open period of sub_warm"
    );
    let (closed_by, closed_at): (String, DateTime<Utc>) =
        sqlx::query_as("SELECT closed_by, record_closed_time FROM service_periods WHERE subscription_id = 'sub_p'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        (closed_by.as_str(), closed_at),
        ("grace", end + chrono::Duration::seconds(10))
    );
    assert_eq!(metric(&worker.counts.metrics, closed_series()), 1);

    // Nothing lands in it after its record summed it, not even when a later
    // snapshot moves its end into the future.
    let mut moved = snapshot("sub_p", 2, Some((start, end + chrono::Duration::days(30))));
    moved["pricing"] = json!({"currency": "USD", "formula": "flat-rate", "price": 0.25});
    env.subscription(moved);
    env.usage(json!({"id": "p4", "subscriptionId": "sub_p", "quantity": 1, "usageTime": usage_time}));
    env.flush();
    assert_eq!(results.read(1, WAIT)[0].value["error"]["code"], "period_closed");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_sweeping_one_database_give_one_record_per_period() {
    let env = TestEnv::start().await;
    let now = now_s();
    let day = chrono::Duration::days(1);
    let past = (now - day * 40, now - day * 10);
    // More than one sweep round's worth, all due at once.
    const SUBSCRIPTIONS: usize = 130;
    let mut offset = 0;
    for i in 0..SUBSCRIPTIONS {
        let id = format!("sub_{i:03}");
        subscribe(&env, offset, snapshot(&id, 1, Some(past))).await;
        offset += 1;
        past_usage(&env, &format!("u_{i:03}"), &id, past.0, &format!("{i}.5"), false).await;
    }
    // The open-ended period gets no record until a period cuts it; then it
    // does, without a start, while the new current period stays open.
    subscribe(&env, offset, snapshot("sub_open", 1, None)).await;
    subscribe(&env, offset + 1, snapshot("sub_cut", 1, None)).await;
    subscribe(
        &env,
        offset + 2,
        snapshot("sub_cut", 2, Some((now - day * 5, now + day * 20))),
    )
    .await;

    let (first, second) = tokio::join!(env.worker(), env.worker());
    let periods = reader(&env, "usage-periods");
    let mut records = periods.read(SUBSCRIPTIONS + 1, WAIT);
    records.extend(periods.read_rest(Duration::from_secs(4)));
    assert_eq!(records.len(), SUBSCRIPTIONS + 1, "one record per closed period");
    let mut by_period: BTreeMap<(String, String), &Record> = BTreeMap::new();
    for record in &records {
        let key = (
            record.value["subscriptionId"].as_str().unwrap().to_owned(),
            record.value["periodStartTime"].to_string(),
        );
        assert!(by_period.insert(key, record).is_none(), "twice: {record:?}");
        assert_eq!(record.value["type"], "usage-period-closed");
        assert_eq!(record.value["closedBy"], "grace");
    }
    let sub_7 = &by_period[&("sub_007".to_owned(), json!(written(past.0)).to_string())].value;
    assert_eq!(
        (&sub_7["usageCount"], &sub_7["quantity"], &sub_7["digest"]),
        (&json!(1), &json!(7.5), &json!(digest_of(&[("u_007", "7.5")])))
    );
    assert_eq!(
        sub_7["closedTime"],
        json!(written(past.1 + chrono::Duration::hours(1))),
        "closed at its end plus the grace time, whenever the sweep came"
    );
    let cut = by_period[&("sub_cut".to_owned(), "null".to_owned())];
    assert_eq!(cut.value["periodEndTime"], json!(written(now - day * 5)));
    assert!(!by_period.keys().any(|(sub, _)| sub == "sub_open"));
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM service_periods WHERE closed_by IS NOT NULL")
            .await,
        SUBSCRIPTIONS as i64 + 1
    );
    let staged = metric(&first.counts.metrics, closed_series()) + metric(&second.counts.metrics, closed_series());
    assert_eq!(staged, SUBSCRIPTIONS as u64 + 1, "staged once between the two workers");
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invoices_close_open_periods_bill_closed_ones_once_and_a_second_invoice_is_dead_lettered() {
    let env = TestEnv::start().await;
    let now = now_s();
    let day = chrono::Duration::days(1);
    let current = (now - day * 10, now + day * 20);
    let past = (now - day * 40, now - day * 10);
    subscribe(&env, 0, snapshot("sub_a", 1, Some(current))).await;
    subscribe(&env, 1, snapshot("sub_b", 1, Some(past))).await;
    past_usage(&env, "b1", "sub_b", past.0, "2", false).await;
    past_usage(&env, "b2", "sub_b", past.0, "3", true).await;
    let worker = env.worker().await;
    let api = ApiServer::start(
        env.pool.clone(),
        ApiConfig::from_settings(&env.settings(), PARTITIONS, false),
        Arc::new(Metrics::default()),
    )
    .await;
    let client = reqwest::Client::new();
    let get = |path: String| {
        let request = client.get(format!("http://{}{path}", api.addr));
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };

    env.usage(json!({"id": "a1", "subscriptionId": "sub_a", "quantity": "5.000"}));
    env.flush();
    let outcome = &env.results_reader().read(1, WAIT)[0];
    assert_eq!(outcome.value["status"], "created");
    // The open period lists with its totals so far.
    let (status, open) = get("/subscriptions/sub_a/periods".into()).await;
    assert_eq!(status, 200, "{open}");
    assert_eq!(open["subscriptionId"], "sub_a");
    let period = &open["periods"][0];
    assert_eq!(
        (
            &period["state"],
            &period["closedTime"],
            &period["closedBy"],
            &period["usageCount"]
        ),
        (&json!("open"), &json!(null), &json!(null), &json!(1))
    );
    let (id, quantity) = usage_line(outcome);
    assert_eq!(period["digest"], json!(digest_of(&[(&id, &quantity)])));

    // sub_b's period closed by time; the sweep writes its record.
    let periods = reader(&env, "usage-periods");
    let closed_b = periods.read(1, WAIT).remove(0);
    assert_eq!(
        (
            &closed_b.value["subscriptionId"],
            &closed_b.value["closedBy"],
            &closed_b.value["usageCount"],
            &closed_b.value["voidedCount"]
        ),
        (&json!("sub_b"), &json!("grace"), &json!(1), &json!(1))
    );
    assert_eq!(closed_b.value["digest"], json!(digest_of(&[("b1", "2")])));

    // An invoice closes sub_a's open period: closed by the invoice, named.
    env.send(
        "invoice-events",
        Some("sub_a"),
        Some(invoice("inv_a", "sub_a", current).to_string().as_bytes()),
    );
    // An invoice bills sub_b's closed period: one invoiced record, the same totals.
    env.send(
        "invoice-events",
        Some("sub_b"),
        Some(invoice("inv_b", "sub_b", past).to_string().as_bytes()),
    );
    env.flush();
    let mut two = periods.read(2, WAIT);
    two.sort_by_key(|r| r.value["subscriptionId"].as_str().unwrap().to_owned());
    let (closed_a, invoiced_b) = (&two[0].value, &two[1].value);
    assert_eq!(
        (
            &closed_a["type"],
            &closed_a["closedBy"],
            &closed_a["invoiceId"],
            &closed_a["quantity"]
        ),
        (
            &json!("usage-period-closed"),
            &json!("invoice"),
            &json!("inv_a"),
            &json!(5)
        )
    );
    assert_eq!(closed_a["digest"], period["digest"]);
    assert_eq!(invoiced_b["type"], "usage-period-invoiced");
    assert_eq!(invoiced_b["invoiceId"], "inv_b");
    for field in [
        "periodStartTime",
        "periodEndTime",
        "closedTime",
        "closedBy",
        "usageCount",
        "quantity",
        "voidedCount",
        "digest",
    ] {
        assert_eq!(invoiced_b[field], closed_b.value[field], "{field}");
    }

    // The same invoice again adds nothing; a different one is dead-lettered.
    for again in [invoice("inv_b", "sub_b", past), invoice("inv_c", "sub_b", past)] {
        env.send("invoice-events", Some("sub_b"), Some(again.to_string().as_bytes()));
    }
    env.flush();
    let letters = reader(&env, "usage-events-dlq").read(1, WAIT);
    assert_eq!(letters[0].headers["dlq-reason"], "period_already_invoiced");
    assert_eq!(letters[0].headers["dlq-source-topic"], "invoice-events");
    assert!(letters[0].value["invoiceId"] == "inv_c", "{:?}", letters[0]);
    assert!(
        periods.read_rest(Duration::from_secs(3)).is_empty(),
        "no record for a re-applied or refused invoice"
    );
    let stamped: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, invoice_id FROM usages WHERE subscription_id = 'sub_b' ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        stamped,
        [("b1".to_owned(), Some("inv_b".to_owned())), ("b2".to_owned(), None)],
        "the refused invoice stamped nothing, and no invoice stamps a voided usage"
    );

    // The listing says the same as the records.
    let (_, listed_b) = get("/subscriptions/sub_b/periods".into()).await;
    assert_eq!(
        listed_b["periods"],
        json!([{
            "periodStartTime": written(past.0), "periodEndTime": written(past.1), "state": "invoiced",
            "closedTime": closed_b.value["closedTime"], "closedBy": "grace", "invoiceId": "inv_b",
            "usageCount": 1, "quantity": 2, "amount": null, "currency": null, "voidedCount": 1,
            "digest": closed_b.value["digest"],
        }])
    );
    let (_, listed_a) = get("/subscriptions/sub_a/periods".into()).await;
    assert_eq!(
        (
            &listed_a["periods"][0]["state"],
            &listed_a["periods"][0]["closedBy"],
            &listed_a["periods"][0]["closedTime"]
        ),
        (&json!("invoiced"), &json!("invoice"), &closed_a["closedTime"])
    );
    let (status, unknown) = get("/subscriptions/sub_nobody/periods".into()).await;
    assert_eq!((status, &unknown["code"]), (404, &json!("subscription_not_found")));
    let staged: BTreeSet<u64> = [
        metric(&worker.counts.metrics, closed_series()),
        metric(
            &worker.counts.metrics,
            r#"usage_worker_period_records_total{type="usage-period-invoiced"}"#,
        ),
    ]
    .into();
    assert_eq!(staged, BTreeSet::from([2, 1]));
    api.shutdown().await;
    worker.shutdown().await.unwrap();
}

/// What the outbox holds for `usage-periods`, decoded, in order.
async fn staged_period_records(env: &TestEnv) -> Vec<Value> {
    let after: Vec<(String, i32, i64)> = (0..PARTITIONS).map(|p| ("usage-periods".to_owned(), p, 0)).collect();
    store::pending_many(&env.pool, &after, 10_000, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, r)| serde_json::from_slice(&r.payload).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invoice_for_a_period_past_its_grace_before_any_sweep_records_the_grace_close_first() {
    let env = TestEnv::start().await;
    let now = now_s();
    let past = (now - chrono::Duration::days(40), now - chrono::Duration::days(10));
    subscribe(&env, 0, snapshot("sub_x", 1, Some(past))).await;
    past_usage(&env, "x1", "sub_x", past.0, "1.25", false).await;
    let message = |offset: i64, id: &str| ControlMessage {
        partition: 0,
        offset,
        body: decode_invoice_event(invoice(id, "sub_x", past).to_string().as_bytes()).unwrap(),
    };
    let apply = |offset: i64, id: &'static str| {
        let pool = env.pool.clone();
        let message = message(offset, id);
        async move {
            store::apply_invoices(
                &pool,
                "g",
                "invoice-events",
                &[message],
                &period_closing(),
                |_, _| None,
                &[],
                &[(0, offset + 1)],
            )
            .await
            .unwrap()
        }
    };
    let first = apply(0, "inv_1").await;
    assert_eq!(first.results, [(0, vec![ItemResult::Applied(1)])]);
    let records = staged_period_records(&env).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        (&records[0]["type"], &records[0]["closedBy"], &records[0]["invoiceId"]),
        (&json!("usage-period-closed"), &json!("grace"), &json!(null)),
        "it closed by time before the invoice came"
    );
    assert_eq!(
        records[0]["closedTime"],
        json!(written(past.1 + chrono::Duration::hours(1)))
    );
    assert_eq!(
        (&records[1]["type"], &records[1]["invoiceId"], &records[1]["digest"]),
        (&json!("usage-period-invoiced"), &json!("inv_1"), &records[0]["digest"])
    );
    // Once: the same invoice again, a sweep, and a different invoice add nothing.
    assert!(apply(1, "inv_1").await.period_records.is_empty());
    let swept = store::close_due_periods(&env.pool, &period_closing(), 100)
        .await
        .unwrap();
    assert!(swept.staged.is_empty(), "{swept:?}");
    let refused = apply(2, "inv_2").await;
    assert_eq!(refused.results, [(2, vec![ItemResult::AlreadyInvoiced])]);
    assert_eq!(staged_period_records(&env).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sweeps_close_each_due_period_once_in_bounded_rounds() {
    let env = TestEnv::start().await;
    let now = now_s();
    let past = (now - chrono::Duration::days(40), now - chrono::Duration::days(10));
    const DUE: usize = 250;
    // One statement: a backlog as after a long outage.
    sqlx::query(
        "INSERT INTO subscriptions (id, version, status) SELECT 'sub_' || i, 1, 'active' FROM generate_series(1, $1) i",
    )
    .bind(DUE as i32)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO service_periods (subscription_id, start_time, end_time)
         SELECT 'sub_' || i, $2, $3 FROM generate_series(1, $1) i",
    )
    .bind(DUE as i32)
    .bind(past.0)
    .bind(past.1)
    .execute(&env.pool)
    .await
    .unwrap();
    let sweeps = (0..4).map(|_| {
        let pool = env.pool.clone();
        tokio::spawn(async move {
            let closing = period_closing();
            let mut rounds = Vec::new();
            loop {
                let round = store::close_due_periods(&pool, &closing, 100).await.unwrap();
                assert!(round.due <= 100, "a round is bounded: {}", round.due);
                if round.due == 0 {
                    return rounds;
                }
                rounds.push(round.staged.len());
            }
        })
    });
    let mut staged = 0;
    for sweep in sweeps {
        staged += sweep.await.unwrap().iter().sum::<usize>();
    }
    assert_eq!(staged, DUE, "each period closed by one sweep");
    let records = staged_period_records(&env).await;
    let distinct: BTreeSet<&str> = records.iter().map(|r| r["subscriptionId"].as_str().unwrap()).collect();
    assert_eq!((records.len(), distinct.len()), (DUE, DUE));
    assert!(records
        .iter()
        .all(|r| r["usageCount"] == json!(0) && r["quantity"] == json!(0)));
    let total: Decimal = sqlx::query_scalar("SELECT count(*)::numeric FROM service_periods WHERE closed_by = 'grace'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(total, Decimal::from(DUE as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_sweep_is_counted_and_retried_and_closes_the_period_once_it_can() {
    let env = TestEnv::start().await;
    // The database refuses to mark periods closed (a transient failure,
    // SQLSTATE 40001) while `refuse_closing` has a row.
    sqlx::raw_sql(
        "CREATE TABLE refuse_closing (since timestamptz);
         INSERT INTO refuse_closing VALUES (now());
         CREATE FUNCTION refuse_closing() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF EXISTS (SELECT 1 FROM refuse_closing) THEN
             RAISE EXCEPTION 'not now' USING ERRCODE = '40001';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_closing BEFORE UPDATE OF closed_by ON service_periods
           FOR EACH ROW WHEN (NEW.closed_by IS NOT NULL) EXECUTE FUNCTION refuse_closing();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let now = now_s();
    let past = (now - chrono::Duration::days(40), now - chrono::Duration::days(10));
    subscribe(&env, 0, snapshot("sub_f", 1, Some(past))).await;
    past_usage(&env, "f1", "sub_f", past.0, "3", false).await;
    let worker = env.worker().await;
    let errors = r#"usage_worker_period_sweep_errors_total"#;
    test_kit::wait_until("failed sweep rounds", || async {
        metric(&worker.counts.metrics, errors) >= 3
    })
    .await;
    let periods = reader(&env, "usage-periods");
    assert!(
        periods.read_rest(Duration::from_secs(1)).is_empty(),
        "nothing while it fails"
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM service_periods WHERE closed_by IS NOT NULL")
            .await,
        0
    );

    sqlx::query("DELETE FROM refuse_closing")
        .execute(&env.pool)
        .await
        .unwrap();
    let record = &periods.read(1, WAIT)[0].value;
    assert_eq!(
        (&record["subscriptionId"], &record["usageCount"], &record["quantity"]),
        (&json!("sub_f"), &json!(1), &json!(3))
    );
    assert!(periods.read_rest(Duration::from_secs(3)).is_empty(), "once");
    assert_eq!(metric(&worker.counts.metrics, closed_series()), 1);
    worker.shutdown().await.unwrap();
}
