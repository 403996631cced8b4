//! Faults the worker must ride out without losing, repeating or wrongly
//! rejecting anything.

mod common;

use std::time::Duration;

use common::{active_subscription, TestEnv};
use serde_json::json;

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
    env.kafka.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!worker.is_finished(), "an outage is waited out, not fatal");
    env.kafka.broker_up(1).unwrap();

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
