//! Faults the worker must ride out without losing, repeating or wrongly
//! rejecting anything.

use std::time::Duration;

use serde_json::json;
use test_kit::{active_subscription, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_error_about_one_message_rejects_that_message_alone() {
    let env = TestEnv::start().await;
    // The database refuses one usage with a data exception (SQLSTATE 22023).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.id = 'poison' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON usages FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    env.subscription(active_subscription("sub_p", None));
    let worker = env.worker().await;
    for id in ["before", "poison", "after"] {
        env.usage(json!({"id": id, "subscriptionId": "sub_p", "quantity": 1}));
    }
    env.flush();
    let records = env.results_reader().read(3, WAIT);
    let status: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            let code = r.value["error"]["code"].as_str().unwrap_or("-").to_owned();
            (
                r.value["eventId"].as_str().unwrap().to_owned(),
                format!("{} {code}", r.value["status"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        status,
        [
            ("before".to_owned(), "created -".to_owned()),
            ("poison".to_owned(), "rejected unprocessable".to_owned()),
            ("after".to_owned(), "created -".to_owned()),
        ]
    );
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 2);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_database_is_retried_never_turned_into_rejections() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_s", Some("100")));
    let mut settings = env.settings();
    settings.database.statement_timeout_ms = 300;
    let worker = env.worker_with(settings).await;
    env.usage(json!({"id": "s0", "subscriptionId": "sub_s", "quantity": 1}));
    env.flush();
    let reader = env.results_reader();
    reader.read(1, WAIT);

    // Hold a lock every batch needs for longer than the statement time-out:
    // each attempt times out (SQLSTATE 57014) and is retried.
    let mut blocker = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE consumer_offsets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    for i in 1..=10 {
        env.usage(json!({"id": format!("s{i}"), "subscriptionId": "sub_s", "quantity": 1}));
    }
    env.flush();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        reader.read_rest(Duration::from_millis(500)).is_empty(),
        "nothing is decided while the database stalls"
    );
    blocker.rollback().await.unwrap();

    let records = reader.read(10, WAIT);
    assert!(records.iter().all(|r| r.value["status"] == "created"), "{records:#?}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 11);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_offset_no_longer_on_the_topic_stops_only_that_partition() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_g", None));
    // Partition 0's stored offset points past anything the topic holds, as
    // after the topic lost events nobody decided.
    sqlx::query("INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ('usage-worker', 'usage-events', 0, 1000)")
        .execute(&env.pool)
        .await
        .unwrap();
    let worker = env.worker().await;
    for p in 0..2 {
        let event = json!({"id": format!("g{p}"), "subscriptionId": "sub_g", "quantity": 1});
        env.send_at(
            "usage-events",
            Some(p),
            Some("sub_g"),
            Some(event.to_string().as_bytes()),
        );
    }
    env.flush();
    let reader = env.results_reader();
    let records = reader.read(1, WAIT);
    assert_eq!(records[0].value["eventId"], "g1");
    assert!(
        reader.read_rest(Duration::from_secs(3)).is_empty(),
        "partition 0 is not read from anywhere else"
    );
    assert_eq!(
        env.scalar_i64("SELECT next_offset FROM consumer_offsets WHERE topic = 'usage-events' AND partition = 0")
            .await,
        1000
    );
    assert!(!worker.is_finished(), "the other partitions go on");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_delays_outcomes_but_loses_and_repeats_nothing() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_b", Some("1000")));
    let worker = env.worker().await;
    env.usage(json!({"id": "b0", "subscriptionId": "sub_b", "quantity": 1}));
    env.flush();
    let reader = env.results_reader();
    reader.read(1, WAIT);

    for i in 1..=20 {
        env.usage(json!({"id": format!("b{i}"), "subscriptionId": "sub_b", "quantity": 1}));
    }
    env.flush();
    // The only broker goes away while the worker decides and publishes.
    env.kafka.mock().unwrap().broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!worker.is_finished(), "an outage is waited out, not fatal");
    env.kafka.mock().unwrap().broker_up(1).unwrap();

    let mut records = reader.read(20, WAIT);
    records.extend(reader.read_rest(Duration::from_secs(2)));
    // The mock cluster may repeat a retried send (same outcome id and
    // outbox-seq); Kafka with the idempotent producer does not, and
    // consumers drop repeats by outcome id. Anything else is a real repeat.
    let mut by_outcome: std::collections::HashMap<&str, Vec<&str>> = std::collections::HashMap::new();
    for r in &records {
        assert_eq!(r.value["status"], "created", "{r:?}");
        by_outcome
            .entry(r.value["outcomeId"].as_str().unwrap())
            .or_default()
            .push(&r.headers["outbox-seq"]);
    }
    assert!(
        by_outcome.values().all(|seqs| seqs.iter().all(|s| *s == seqs[0])),
        "{by_outcome:?}"
    );
    let mut ids: Vec<&str> = records.iter().map(|r| r.value["eventId"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((by_outcome.len(), ids.len()), (20, 20), "every event once");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 21);
    worker.shutdown().await.unwrap();
}

fn outbox_record(partition: i32, payload: Vec<u8>) -> usage_worker::store::OutboxRecord {
    usage_worker::store::OutboxRecord {
        topic: "usage-results".into(),
        partition,
        key: Some(b"sub_f".to_vec()),
        payload,
        headers: [("status", "created")].into_iter().collect(),
        source: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_that_cannot_be_published_holds_back_its_own_partition_only() {
    let env = TestEnv::start().await;
    let worker = env.worker().await;
    let reader = env.results_reader();
    // Partition 0 gets a record the producer refuses (over its message
    // limit; what the worker itself stores is sized to fit, so only a
    // stored record of an older release or a changed limit can be one),
    // partition 1 a good one, in one transaction: one relay round reads
    // both.
    let mut tx = usage_worker::store::BatchTx::begin(&env.pool).await.unwrap();
    tx.append_outbox(&[
        outbox_record(0, vec![b'x'; 1_500_000]),
        outbox_record(1, br#"{"eventId": "good"}"#.to_vec()),
    ])
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let records = reader.read(1, WAIT);
    assert_eq!(records[0].partition, 1);
    assert_eq!(records[0].value["eventId"], "good");
    // The refused record stays stored, and partition 0 goes on trying it
    // (nothing after it may overtake it), while the worker runs on.
    assert!(reader.read_rest(Duration::from_secs(2)).is_empty());
    assert!(!worker.is_finished());
    // Shutdown tries it until its time-out (between rounds or within one),
    // and then says it could not publish everything committed (the record
    // stays in the outbox).
    let stopped = worker.shutdown().await;
    assert!(
        stopped.as_ref().is_err_and(|e| {
            let error = format!("{e:#}");
            error.contains("publishing committed outcomes at shutdown")
                && error.contains("time-out publishing the outbox")
        }),
        "{stopped:?}"
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE topic = 'usage-results' AND partition = 0")
            .await,
        1
    );
}

#[test]
fn records_are_sized_as_librdkafka_sizes_them() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use usage_worker::kafka::record_size::{outbox_record_size, OUTBOX_SEQ_HEADER, PRODUCER_MAX_MESSAGE_BYTES};

    // Nothing is sent: librdkafka checks the size when a record is queued.
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9")
        .set("message.max.bytes", PRODUCER_MAX_MESSAGE_BYTES.to_string())
        .create()
        .unwrap();
    // Tens of thousands of headers, some with values long enough for a
    // two-byte length.
    let headers: usage_worker::domain::headers::Headers = (0..30_000)
        .map(|i| {
            (
                format!("h{}", i % 1000),
                vec![b'v'; if i % 1000 == 0 { 200 } else { i % 20 }],
            )
        })
        .collect();
    let key = b"sub_1".to_vec();
    let queue = |payload: &[u8]| {
        let mut native = OwnedHeaders::new_with_capacity(headers.len() + 1);
        for (k, v) in &headers {
            native = native.insert(Header { key: k, value: Some(v) });
        }
        native = native.insert(Header {
            key: OUTBOX_SEQ_HEADER,
            value: Some("9".repeat(19).as_bytes()),
        });
        let record = BaseRecord::to("usage-results")
            .partition(0)
            .key(&key)
            .payload(payload)
            .headers(native);
        producer.send(record).map(drop).map_err(|(e, _)| e)
    };
    let without_payload = outbox_record_size(Some(&key), &[], &headers);
    assert!(without_payload < PRODUCER_MAX_MESSAGE_BYTES);
    let room = PRODUCER_MAX_MESSAGE_BYTES - without_payload;
    let fits = vec![b'p'; room];
    assert_eq!(
        outbox_record_size(Some(&key), &fits, &headers),
        PRODUCER_MAX_MESSAGE_BYTES
    );
    queue(&fits).expect("a record of exactly the limit is queued");
    let over = vec![b'p'; room + 1];
    let refused = queue(&over).expect_err("one byte more is refused");
    assert_eq!(
        refused.rdkafka_error_code(),
        Some(rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge)
    );
    producer.purge(rdkafka::producer::PurgeConfig::default().queue());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_position_no_longer_on_its_topic_stops_that_partition_and_never_skips() {
    let env = TestEnv::start().await;
    for (partition, id) in [(0, "sub_gone"), (1, "sub_here")] {
        let snapshot = active_subscription(id, None).to_string();
        env.send_at("subscriptions", Some(partition), Some(id), Some(snapshot.as_bytes()));
    }
    env.flush();
    // Partition 0's stored position is past anything the topic holds, as
    // after the topic lost messages nobody applied.
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ('usage-worker', 'subscriptions', 0, 1000)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let worker = env.worker().await;
    env.wait_for_count("SELECT count(*) FROM subscriptions WHERE id = 'sub_here'", 1)
        .await;
    test_kit::wait_until("the reader to stop partition 0", || async {
        worker
            .counts
            .metrics
            .render()
            .contains(r#"usage_worker_stopped_partitions_total{topic="subscriptions"} 1"#)
    })
    .await;
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM subscriptions WHERE id = 'sub_gone'")
            .await,
        0,
        "partition 0 is not read from its beginning"
    );
    assert_eq!(
        env.scalar_i64("SELECT next_offset FROM consumer_offsets WHERE topic = 'subscriptions' AND partition = 0")
            .await,
        1000
    );
    assert!(!worker.is_finished(), "the other partitions go on");
    worker.shutdown().await.unwrap();
}

/// A worker with these settings that has decided and published a first
/// event of a new subscription (its partitions are assigned), and a reader
/// of `usage-results` past that outcome.
async fn worker_past_a_first_event(
    env: &TestEnv,
    subscription: &str,
    settings: usage_worker::config::Settings,
) -> (test_kit::Worker, test_kit::Reader) {
    env.subscription(active_subscription(subscription, Some("1000")));
    let worker = env.worker_with(settings).await;
    env.usage(json!({"id": format!("{subscription}-first"), "subscriptionId": subscription, "quantity": 1}));
    env.flush();
    let reader = env.results_reader();
    reader.read(1, WAIT);
    (worker, reader)
}

/// Cuts the test's database off, from a connection to the server's
/// maintenance database (a database cannot cut itself off), which lets it
/// back with [`cut_database_off`].
async fn test_database_cut_off(env: &TestEnv) -> (sqlx::PgConnection, String) {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let server = test_kit::env::base_database_url();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
        .await
        .unwrap();
    cut_database_off(&mut admin, &database, false).await;
    (admin, database)
}

/// Cuts a database off (or lets it back): no new connection is accepted,
/// and every open one is ended.
async fn cut_database_off(admin: &mut sqlx::PgConnection, database: &str, allow: bool) {
    sqlx::query(&format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS {allow}"))
        .execute(&mut *admin)
        .await
        .unwrap();
    if !allow {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(database)
        .execute(&mut *admin)
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_longer_than_the_poll_interval_keeps_the_consumer_in_the_group() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.kafka.session_timeout_ms = 6000;
    settings.kafka.max_poll_interval_ms = 10_000;
    // Room for few messages: the outage's events fill it, and the consumer
    // thread waits for its one lane.
    settings.pipeline.batch_size = 5;
    settings.pipeline.lanes = 1;
    let (worker, reader) = worker_past_a_first_event(&env, "sub_o", settings).await;
    let metrics = worker.counts.metrics.clone();
    assert_eq!(metrics.revocations(), 0);

    let (mut admin, database) = test_database_cut_off(&env).await;
    for i in 1..=60 {
        env.usage(json!({"id": format!("o{i}"), "subscriptionId": "sub_o", "quantity": 1}));
    }
    env.flush();
    // Two and a half times max.poll.interval.ms.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(!worker.is_finished(), "an outage is waited out, not fatal");
    assert!(
        reader.read_rest(Duration::from_millis(500)).is_empty(),
        "nothing is decided while the database is down"
    );
    cut_database_off(&mut admin, &database, true).await;

    let mut records = reader.read(60, WAIT);
    records.extend(reader.read_rest(Duration::from_secs(2)));
    let mut ids: Vec<&str> = records.iter().map(|r| r.value["eventId"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((records.len(), ids.len()), (60, 60), "every event once");
    assert!(records.iter().all(|r| r.value["status"] == "created"), "{records:#?}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 61);
    assert_eq!(
        metrics.revocations(),
        0,
        "the consumer was evicted from the group during the outage"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_held_through_a_rebalance_are_read_again_after_the_outage() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.kafka.session_timeout_ms = 6000;
    settings.pipeline.batch_size = 5;
    settings.pipeline.lanes = 1;
    let (group, topic) = (settings.kafka.group_id.clone(), settings.topics.usage_events.clone());
    let (worker, reader) = worker_past_a_first_event(&env, "sub_h", settings).await;
    let metrics = worker.counts.metrics.clone();
    // Subscriptions on every partition.
    let subscriptions: Vec<String> = (0..8).map(|i| format!("sub_h{i}")).collect();
    for id in &subscriptions {
        env.subscription(active_subscription(id, Some("1000")));
    }
    env.flush();
    env.wait_for_count("SELECT count(*) FROM subscriptions", 9).await;

    let (mut admin, database) = test_database_cut_off(&env).await;
    for i in 0..80 {
        let subscription = &subscriptions[i % subscriptions.len()];
        env.usage(json!({"id": format!("h{i}"), "subscriptionId": subscription, "quantity": 1}));
    }
    env.flush();
    // Every lane waits for the database: the worker pauses its partitions.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Another member joins the group: the worker's held partitions are
    // revoked and assigned again during the outage.
    let intruder: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", env.kafka.bootstrap_servers())
        .set("group.id", &group)
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .unwrap();
    intruder.subscribe(&[&topic]).unwrap();
    let intruder = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + WAIT;
        while intruder.assignment().unwrap().count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the second member got no partition"
            );
            let _ = intruder.poll(Duration::from_millis(100));
        }
        intruder
    })
    .await
    .unwrap();
    assert!(metrics.revocations() >= 1, "the worker's partitions were not revoked");
    cut_database_off(&mut admin, &database, true).await;
    // The second member leaves: the worker gets every partition back.
    drop(intruder);

    let mut records = reader.read(80, WAIT);
    records.extend(reader.read_rest(Duration::from_secs(2)));
    let mut ids: Vec<&str> = records.iter().map(|r| r.value["eventId"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 80, "every event decided after the outage");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 81);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_transaction_stays_open_while_the_relay_waits_for_the_brokers() {
    let env = TestEnv::start().await;
    let (worker, reader) = worker_past_a_first_event(&env, "sub_f", env.settings()).await;

    env.kafka.mock().unwrap().broker_down(1).unwrap();
    // Committed while the broker is away: the relay's round waits for it.
    let mut tx = usage_worker::store::BatchTx::begin(&env.pool).await.unwrap();
    tx.append_outbox(&[outbox_record(0, br#"{"eventId": "during"}"#.to_vec())])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for _ in 0..20 {
        let open = env
            .scalar_i64(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND xact_start < now() - interval '5 seconds'",
            )
            .await;
        assert_eq!(open, 0, "a transaction stays open while the relay waits for the broker");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        env.scalar_i64("SELECT count(*) FROM outbox_published WHERE topic = 'usage-results' AND partition = 0 AND published_seq >= 2")
            .await
            == 0,
        "the record waited for the broker"
    );
    // The producer's errors are counted (a transport error: the broker is
    // unreachable).
    let transport = r#"usage_worker_kafka_errors_total{client="producer",kind="transport"} "#;
    let counted = worker.counts.metrics.render();
    let counted = counted.lines().find_map(|l| l.strip_prefix(transport)).unwrap();
    assert!(counted.parse::<u64>().unwrap() > 0, "{counted}");
    env.kafka.mock().unwrap().broker_up(1).unwrap();
    let mut records = reader.read(1, WAIT);
    records.extend(reader.read_rest(Duration::from_secs(2)));
    // The mock cluster may repeat a retried send (the same outbox-seq).
    let seqs: std::collections::BTreeSet<&str> = records.iter().map(|r| r.headers["outbox-seq"].as_str()).collect();
    assert_eq!(records[0].value["eventId"], "during");
    assert_eq!(seqs.len(), 1, "{records:?}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fatal_producer_error_stops_the_worker_and_a_restart_loses_nothing() {
    let env = TestEnv::start().await;
    let (worker, reader) = worker_past_a_first_event(&env, "sub_x", env.settings()).await;

    // The broker says it lost the producer's sequence: librdkafka's
    // idempotent producer cannot go on (a fatal error). (Only the relay
    // produces from here on: the mock fails whichever client's requests.)
    use rdkafka::types::RDKafkaRespErr;
    env.kafka
        .mock()
        .unwrap()
        .produce_errors(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER])
        .unwrap();
    let mut tx = usage_worker::store::BatchTx::begin(&env.pool).await.unwrap();
    let committed: Vec<_> = (1..=5)
        .map(|i| {
            outbox_record(
                i % 2,
                format!(r#"{{"eventId": "x{i}", "outcomeId": "o{i}"}}"#).into_bytes(),
            )
        })
        .collect();
    tx.append_outbox(&committed).await.unwrap();
    tx.commit().await.unwrap();
    test_kit::wait_until("the worker stops", || async { worker.is_finished() }).await;
    let stopped = worker.shutdown().await;
    assert!(
        stopped
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("fatal producer error")),
        "{stopped:?}"
    );

    // The next run publishes what the failed one could not.
    let worker = env.worker().await;
    let mut records = reader.read(5, WAIT);
    records.extend(reader.read_rest(Duration::from_secs(2)));
    let ids: std::collections::BTreeSet<&str> = records.iter().map(|r| r.value["eventId"].as_str().unwrap()).collect();
    let outcomes: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.value["outcomeId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["x1", "x2", "x3", "x4", "x5"].into_iter().collect(), "{records:?}");
    assert_eq!(outcomes.len(), 5);
    worker.shutdown().await.unwrap();
}
