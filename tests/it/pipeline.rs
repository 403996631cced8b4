//! End to end: events produced to the mock cluster (and, for the tests
//! named `..._on_tansu`, to a tansu broker process), decided by the real
//! worker against a fresh PostgreSQL database, outcomes read back from
//! `usage-results`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use test_kit::{active_subscription, Record, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

fn by_event(records: &[Record]) -> HashMap<String, Vec<Value>> {
    let mut map: HashMap<String, Vec<Value>> = HashMap::new();
    for r in records {
        map.entry(r.value["eventId"].as_str().unwrap().to_owned())
            .or_default()
            .push(r.value.clone());
    }
    map
}

fn code(outcome: &Value) -> &str {
    outcome["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rule_yields_its_exact_outcome() {
    every_rule_yields_its_exact_outcome_with(TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rule_yields_its_exact_outcome_on_tansu() {
    every_rule_yields_its_exact_outcome_with(TestEnv::start_on_tansu().await).await;
}

async fn every_rule_yields_its_exact_outcome_with(env: TestEnv) {
    let now = Utc::now();
    env.subscription(active_subscription("sub_a", Some(r#"{"quantity": 10}"#)));
    env.subscription(json!({"id": "sub_paused", "status": "paused", "version": 1,
        "currentPeriodStartTime": (now - chrono::Duration::days(1)).to_rfc3339(),
        "currentPeriodEndTime": (now + chrono::Duration::days(1)).to_rfc3339()}));
    env.subscription(json!({"id": "sub_old", "status": "active", "version": 1,
        "currentPeriodStartTime": (now - chrono::Duration::days(60)).to_rfc3339(),
        "currentPeriodEndTime": (now - chrono::Duration::days(30)).to_rfc3339()}));
    let worker = env.worker().await;
    let in_old_period = (now - chrono::Duration::days(45)).to_rfc3339();

    // All of sub_a's events share a key, so they are decided in this order.
    let events = [
        json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 4}),
        json!({"id": "u2", "subscriptionId": "sub_a", "quantity": "3.500"}),
        json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 4.0}),
        json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 5}),
        json!({"id": "u3", "subscriptionId": "sub_a", "quantity": 3}),
        json!({"id": "u4", "subscriptionId": "sub_a", "quantity": 3, "acceptPartialQuantity": true}),
        json!({"id": "u5", "subscriptionId": "sub_a", "quantity": 0.001, "acceptPartialQuantity": true}),
        json!({"id": "u6", "subscriptionId": "sub_a", "quantity": 0.0005}),
        json!({"id": "u7", "subscriptionId": "sub_a"}),
        json!({"id": "u8", "subscriptionId": "sub_a", "quantity": 1, "usageTime": (now + chrono::Duration::hours(1)).to_rfc3339()}),
        json!({"id": "u9", "subscriptionId": "sub_a", "quantity": 1, "usageTime": "2026-11-27T10:00:00"}),
        json!({"id": "u10", "subscriptionId": "sub_a", "quantity": 1, "usageTime": (now - chrono::Duration::days(90)).to_rfc3339()}),
        json!({"id": "u11", "subscriptionId": "sub_nobody", "quantity": 1}),
        json!({"id": "u12", "subscriptionId": "sub_paused", "quantity": 1}),
        json!({"id": "u13", "subscriptionId": "sub_old", "quantity": 1, "usageTime": in_old_period}),
        json!({"id": "a b", "subscriptionId": "sub_a", "quantity": -1, "acceptPartialQuantity": "yes"}),
    ];
    for e in &events {
        env.usage(e.clone());
    }
    env.send(
        "usage-events",
        Some("sub_a"),
        Some(br#"{"id": "u14", "id": "u15", "subscriptionId": "sub_a", "quantity": 1}"#),
    );
    env.send("usage-events", Some("sub_a"), Some(&vec![b' '; 70_000]));
    env.flush();
    let records = env.results_reader().read(events.len() + 2, WAIT);
    let outcomes = by_event(&records);

    let u1 = &outcomes["u1"];
    assert_eq!(u1.len(), 3);
    assert_eq!(u1[0]["status"], "created");
    assert_eq!(u1[0]["usage"]["quantity"], json!(4));
    assert_eq!(
        u1[0]["limit"],
        json!({"applied": "hardLimit", "limit": 10, "used": 4, "available": 6,
        "periodStartTime": u1[0]["limit"]["periodStartTime"], "periodEndTime": u1[0]["limit"]["periodEndTime"]})
    );
    assert_eq!(u1[1]["status"], "duplicate", "same request again: {}", u1[1]);
    assert_eq!(u1[1]["usage"]["id"], "u1");
    assert_eq!(u1[2]["status"], "rejected");
    assert_eq!(code(&u1[2]), "idempotency_conflict");

    assert_eq!(outcomes["u2"][0]["usage"]["quantity"], json!(3.5));
    let u3 = &outcomes["u3"][0];
    assert_eq!(code(u3), "usage_limit_exceeded");
    assert_eq!(u3["error"]["available"], json!(2.5));
    let u4 = &outcomes["u4"][0];
    assert_eq!(
        (u4["status"].as_str(), u4["partial"].as_bool()),
        (Some("created"), Some(true))
    );
    assert_eq!(
        (u4["usage"]["quantity"].clone(), u4["requestedQuantity"].clone()),
        (json!(2.5), json!(3))
    );
    assert_eq!(
        code(&outcomes["u5"][0]),
        "usage_limit_exceeded",
        "nothing left, even for a partial"
    );
    assert_eq!(code(&outcomes["u6"][0]), "invalid_field");
    assert_eq!(outcomes["u6"][0]["error"]["field"], "quantity");
    assert_eq!(code(&outcomes["u7"][0]), "missing_field");
    assert_eq!(code(&outcomes["u8"][0]), "usage_time_in_future");
    assert_eq!(code(&outcomes["u9"][0]), "invalid_field");
    assert_eq!(code(&outcomes["u10"][0]), "no_service_period");
    assert_eq!(code(&outcomes["u11"][0]), "subscription_not_found");
    assert_eq!(code(&outcomes["u12"][0]), "subscription_not_active");
    assert_eq!(code(&outcomes["u13"][0]), "period_closed");

    let many = records
        .iter()
        .find(|r| {
            r.value["error"]["invalidFields"]
                .as_array()
                .is_some_and(|a| a.len() == 3)
        })
        .expect("the outcome naming three fields");
    assert_eq!(many.value["error"]["field"], "id", "the first field in table order");
    let fields: Vec<&str> = many.value["error"]["invalidFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["id", "quantity", "acceptPartialQuantity"]);
    assert!(many.value["eventId"].as_str().unwrap().starts_with("msg_"));

    let codes: Vec<&str> = records.iter().map(|r| code(&r.value)).collect();
    assert!(codes.contains(&"malformed_payload"), "repeated key: {codes:?}");
    assert!(codes.contains(&"payload_too_large"), "{codes:?}");

    // The database agrees: exactly the accepted quantity is stored and used.
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 3);
    let used: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT used FROM service_periods WHERE subscription_id = 'sub_a'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(used.to_string(), "10.0");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE topic = 'usage-results'")
            .await,
        records.len() as i64
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcomes_go_to_the_source_partition_with_headers_and_subscription_key() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_h", None));
    let worker = env.worker().await;
    for p in 0..test_kit::PARTITIONS {
        let event = json!({"id": format!("h{p}"), "subscriptionId": "sub_h", "quantity": 1});
        env.send_at(
            "usage-events",
            Some(p),
            Some("sub_h"),
            Some(event.to_string().as_bytes()),
        );
    }
    env.flush();
    let records = env.results_reader().read(test_kit::PARTITIONS as usize, WAIT);
    for r in &records {
        assert_eq!(r.value["source"]["partition"], json!(r.partition));
        assert_eq!(r.key.as_deref(), Some("sub_h"));
        assert_eq!(r.headers["outcome-id"], r.value["outcomeId"].as_str().unwrap());
        assert_eq!(r.headers["event-id"], r.value["eventId"].as_str().unwrap());
        assert_eq!(r.headers["status"], "created");
        assert_eq!(r.headers["outbox-seq"], "1", "first record of its partition");
        assert!(r.value["outcomeId"].as_str().unwrap().starts_with("oc_"));
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_without_id_gets_one_derived_from_its_coordinates() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_n", None));
    let worker = env.worker().await;
    env.usage(json!({"subscriptionId": "sub_n", "quantity": 1e3}));
    env.usage(json!({"subscriptionId": "sub_n", "quantity": 1e3}));
    env.flush();
    let records = env.results_reader().read(2, WAIT);
    let ids: Vec<&str> = records.iter().map(|r| r.value["eventId"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| id.starts_with("msg_")));
    assert_ne!(ids[0], ids[1], "re-sent without an id is a new event");
    assert!(records
        .iter()
        .all(|r| r.value["status"] == "created" && r.value["usage"]["quantity"] == json!(1000)));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_apply_by_version_and_tombstones_delete() {
    let env = TestEnv::start().await;
    let mut v2 = active_subscription("sub_v", Some("5"));
    v2["version"] = json!(2);
    let mut v1 = active_subscription("sub_v", Some("100"));
    v1["version"] = json!(1);
    env.subscription(v2);
    env.subscription(v1); // older: ignored
    env.send("subscriptions", Some("sub_bad"), Some(b"{\"id\": \"sub_bad\"}"));
    let worker = env.worker().await;
    env.usage(json!({"id": "v1", "subscriptionId": "sub_v", "quantity": 6}));
    env.flush();
    let first = env.results_reader().read(1, WAIT);
    assert_eq!(
        code(&first[0].value),
        "usage_limit_exceeded",
        "the limit of version 2 applies: {}",
        first[0].value
    );

    env.send("subscriptions", Some("sub_v"), None);
    env.flush();
    env.usage(json!({"id": "v2", "subscriptionId": "sub_v", "quantity": 1}));
    env.flush();
    let both = env.results_reader().read(2, WAIT);
    assert_eq!(code(&both[1].value), "subscription_not_active", "{}", both[1].value);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM subscriptions WHERE id = 'sub_bad'")
            .await,
        0
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_produced_right_after_its_snapshot_is_never_rejected_for_want_of_it() {
    let env = TestEnv::start().await;
    let worker = env.worker().await;
    // Let the worker join and go idle first, so that the snapshot and the
    // events arrive while it is running.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..20 {
        env.subscription(active_subscription(&format!("sub_late_{i}"), None));
        env.usage(json!({"id": format!("late_{i}"), "subscriptionId": format!("sub_late_{i}"), "quantity": 1}));
    }
    env.flush();
    let records = env.results_reader().read(20, WAIT);
    for r in &records {
        assert_eq!(r.value["status"], "created", "{}", r.value);
    }
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_worker_resumes_where_the_database_says_without_repeats() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_r", Some("1000")));
    let worker = env.worker().await;
    for i in 0..50 {
        env.usage(json!({"id": format!("r{i}"), "subscriptionId": "sub_r", "quantity": 1}));
    }
    env.flush();
    let reader = env.results_reader();
    reader.read(50, WAIT);
    worker.shutdown().await.unwrap();

    let worker = env.worker().await;
    for i in 50..80 {
        env.usage(json!({"id": format!("r{i}"), "subscriptionId": "sub_r", "quantity": 1}));
    }
    env.flush();
    let more = reader.read(30, WAIT);
    let rest = reader.read_rest(Duration::from_secs(2));
    assert!(rest.is_empty(), "nothing published twice: {rest:?}");
    assert!(more.iter().all(|r| r.value["status"] == "created"));
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 80);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE topic = 'usage-results'")
            .await,
        80
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_but_unpublished_outcomes_are_published_after_restart_and_published_ones_are_not_repeated() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_o", None));
    let worker = env.worker().await;
    env.usage(json!({"id": "o1", "subscriptionId": "sub_o", "quantity": 1}));
    env.flush();
    let reader = env.results_reader();
    let first = reader.read(1, WAIT);
    worker.shutdown().await.unwrap();

    // Simulate a crash after the topic got record 1 but before the database
    // recorded it, plus a decided-but-unpublished record 2 copied from it.
    let partition = first[0].partition;
    sqlx::query("UPDATE outbox_published SET published_seq = 0")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox_batches (topic, partition, first_seq, last_seq, keys, payloads, headers)
         SELECT topic, partition, 2, 2, keys[1:1], payloads[1:1], headers[1:1] FROM outbox_batches
         WHERE first_seq = 1",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE outbox_partitions SET next_seq = 3")
        .execute(&env.pool)
        .await
        .unwrap();

    let worker = env.worker().await;
    let again = reader.read(1, WAIT);
    assert_eq!(
        again[0].headers["outbox-seq"], "2",
        "record 1 was already on the topic and is skipped"
    );
    assert_eq!(again[0].partition, partition);
    assert!(reader.read_rest(Duration::from_secs(2)).is_empty());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_topics_with_another_partition_count_stop_start_up_naming_them() {
    let env = TestEnv::start_with_partitions(4).await;
    let mut settings = env.settings();
    settings.topics.usage_results = "results-two".into();
    env.kafka.mock().unwrap().create_topic("results-two", 2).unwrap();
    let worker = env.worker_with(settings).await;
    let err = worker.shutdown().await.unwrap_err();
    assert!(format!("{err:#}").contains("results-two has 2"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_input_topic_stops_start_up_naming_it() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.topics.usage_events = "no-such-events".into();
    let worker = env.worker_with(settings).await;
    let err = worker.shutdown().await.unwrap_err();
    assert!(format!("{err:#}").contains("no-such-events does not exist"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_topic_high_watermarks_are_read_for_every_partition() {
    let env = TestEnv::start().await;
    for i in 0..3 {
        env.send_at("subscriptions", Some(1), Some("k"), Some(format!("{i}").as_bytes()));
    }
    env.send_at("invoice-events", Some(3), Some("k"), Some(b"x"));
    env.flush();
    let highs = control_topic_ends(&env);
    assert_eq!(highs[0], HashMap::from([(0, 0), (1, 3), (2, 0), (3, 0)]));
    assert_eq!(highs[1], HashMap::from([(0, 0), (1, 0), (2, 0), (3, 1)]));
}

fn control_topic_ends(env: &TestEnv) -> Vec<HashMap<i32, i64>> {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", env.kafka.bootstrap_servers())
        .set("group.id", "watermarks");
    let ends = usage_worker::kafka::ends::EndReader::new(&config).unwrap();
    let topics = [
        ("subscriptions", test_kit::PARTITIONS),
        ("invoice-events", test_kit::PARTITIONS),
    ];
    // As the worker reads them (confirmed by reading forward on tansu),
    // twice: a reader is used again for every batch; and confirmed or not,
    // where the broker reports ends right.
    let confirm = env.settings().kafka.confirm_partition_ends;
    let read = |confirm| {
        tokio::task::block_in_place(|| usage_worker::pipeline::control::high_watermarks(&ends, &topics, confirm))
    };
    let first = read(confirm).unwrap();
    assert_eq!(first, read(confirm).unwrap());
    if !confirm {
        assert_eq!(first, read(true).unwrap(), "reading forward finds the same ends");
    }
    first
}

/// tansu's ListOffsets answers one past the first offset of the last batch
/// it stored, not the partition's end: the worker reads on to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_topic_high_watermarks_are_the_real_ends_on_tansu() {
    let env = TestEnv::start_on_tansu().await;
    // 50 snapshots in one batch on partition 1, then 3 more in another;
    // one invoice event on partition 3.
    for i in 0..50 {
        env.send_at("subscriptions", Some(1), Some("k"), Some(format!("{i}").as_bytes()));
    }
    env.flush();
    for i in 50..53 {
        env.send_at("subscriptions", Some(1), Some("k"), Some(format!("{i}").as_bytes()));
    }
    env.send_at("invoice-events", Some(3), Some("k"), Some(b"x"));
    env.flush();
    let listed = tokio::task::block_in_place(|| {
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", env.kafka.bootstrap_servers())
            .set("group.id", "watermarks")
            .create()
            .unwrap();
        usage_worker::kafka::ends::reported_ends(
            &consumer,
            &[("subscriptions", test_kit::PARTITIONS)],
            Duration::from_secs(5),
        )
        .unwrap()
    });
    assert!(
        listed[0][&1] < 53,
        "tansu reports the end of subscriptions/1 as {} (if it reports 53 now, docs/brokers.md is out of date)",
        listed[0][&1]
    );
    let highs = control_topic_ends(&env);
    assert_eq!(highs[0], HashMap::from([(0, 0), (1, 53), (2, 0), (3, 0)]));
    assert_eq!(highs[1], HashMap::from([(0, 0), (1, 0), (2, 0), (3, 1)]));
}

/// Publishes an active subscription's snapshot for each id on partition 0
/// of `subscriptions`, all in one record batch: a producer that waits until
/// it has them all.
fn snapshots_in_one_batch(env: &TestEnv, ids: impl Iterator<Item = String>) {
    let batching: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", env.kafka.bootstrap_servers())
        .set("linger.ms", "5000")
        .set("batch.num.messages", "100000")
        .set("batch.size", "1000000")
        .create()
        .unwrap();
    for id in ids {
        let snapshot = active_subscription(&id, None).to_string();
        batching
            .send(
                rdkafka::producer::BaseRecord::to("subscriptions")
                    .partition(0)
                    .key(&id)
                    .payload(&snapshot),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    rdkafka::producer::Producer::flush(&batching, Duration::from_secs(30)).unwrap();
}

/// Many snapshots in one batch, the events right behind them: the worker
/// must wait until all are applied, which on tansu needs the real end of
/// `subscriptions` (ListOffsets reports 1 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_right_behind_a_batch_of_snapshots_wait_for_all_of_them_on_tansu() {
    let env = TestEnv::start_on_tansu().await;
    // Applying 2,500 snapshots can take longer than the tests' usual bound
    // on a loaded machine; what this test checks is that the worker knows
    // the real end to wait for (with the reported end of 1 it would not
    // wait at all), not how fast it applies them.
    let mut settings = env.settings();
    settings.pipeline.snapshot_wait_ms = 30_000;
    let worker = env.worker_with(settings).await;
    // One assignment, so that the events come while the worker is running.
    test_kit::wait_until("the worker to be assigned its partitions", || async {
        env.scalar_i64("SELECT count(*) FROM consumer_offsets WHERE topic = 'usage-events'")
            .await
            == test_kit::PARTITIONS as i64
    })
    .await;
    const COUNT: usize = 2500;
    snapshots_in_one_batch(&env, (0..COUNT).map(|i| format!("sub_batch_{i}")));
    for i in (0..COUNT).rev().take(40) {
        env.usage(json!({"id": format!("batch_{i}"), "subscriptionId": format!("sub_batch_{i}"), "quantity": 1}));
    }
    env.flush();
    let records = env.results_reader().read(40, WAIT);
    for r in &records {
        assert_eq!(r.value["status"], "created", "{}", r.value);
    }
    worker.shutdown().await.unwrap();
}

/// A worker that starts from a stored control position inside a record
/// batch: tansu serves a fetch from there without the rest of that batch, so
/// a reader assigned at the position would never apply those snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_position_inside_a_record_batch_is_applied_from_there_on_tansu() {
    let env = TestEnv::start_on_tansu().await;
    snapshots_in_one_batch(&env, (0..10).map(|i| format!("sub_mid_{i}")));
    // The first five were applied before (by a worker that has stopped).
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ('usage-worker', 'subscriptions', 0, 5)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let worker = env.worker().await;
    env.wait_for_count("SELECT count(*) FROM subscriptions", 5).await;
    let applied: Vec<String> = sqlx::query_scalar("SELECT id FROM subscriptions ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(applied, (5..10).map(|i| format!("sub_mid_{i}")).collect::<Vec<_>>());
    worker.shutdown().await.unwrap();
}

/// A crash after records reached the topic and before the database knew:
/// on tansu the relay must find the last of them past where ListOffsets
/// says the partition ends, or it publishes them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_outcomes_are_not_repeated_after_a_restart_on_tansu() {
    let env = TestEnv::start_on_tansu().await;
    env.subscription(active_subscription("sub_t", None));
    // Everything on one partition, decided in one batch, published in one
    // produce request.
    for i in 0..60 {
        env.usage(json!({"id": format!("t{i}"), "subscriptionId": "sub_t", "quantity": 1}));
    }
    env.flush();
    let worker = env.worker().await;
    let reader = env.results_reader();
    let first = reader.read(60, WAIT);
    worker.shutdown().await.unwrap();
    let partition = first[0].partition;
    assert!(first.iter().all(|r| r.partition == partition));

    // The crash: the database never learnt that they were published.
    sqlx::query("UPDATE outbox_published SET published_seq = 0")
        .execute(&env.pool)
        .await
        .unwrap();
    let worker = env.worker().await;
    env.usage(json!({"id": "t60", "subscriptionId": "sub_t", "quantity": 1}));
    env.flush();
    let next = reader.read(1, WAIT);
    assert_eq!(next[0].value["eventId"], "t60", "published again: {:?}", next[0].value);
    assert_eq!(next[0].headers["outbox-seq"], "61");
    let rest = reader.read_rest(Duration::from_secs(2));
    assert!(rest.is_empty(), "published again: {} records", rest.len());
    worker.shutdown().await.unwrap();
}
