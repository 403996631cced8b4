//! Two workers in one consumer group, one subscription's events spread over
//! every partition: the hard limit holds, every event is decided once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use test_kit::{active_subscription, TestEnv, PARTITIONS};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_never_exceed_a_limit_shared_across_partitions() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_hot", Some("500")));
    let first = env.worker().await;
    let second = env.worker().await;
    // Both members are in the group before the load starts.
    tokio::time::sleep(Duration::from_secs(4)).await;

    const EVENTS: usize = 2000;
    for i in 0..EVENTS {
        let event = json!({
            "id": format!("hot_{i}"),
            "subscriptionId": "sub_hot",
            "quantity": "0.7",
            "acceptPartialQuantity": i % 2 == 0,
        });
        env.send_at(
            "usage-events",
            Some(i as i32 % PARTITIONS),
            Some("sub_hot"),
            Some(event.to_string().as_bytes()),
        );
    }
    env.flush();
    let reader = env.results_reader();
    let records = reader.read(EVENTS, Duration::from_secs(120));
    assert!(reader.read_rest(Duration::from_secs(1)).is_empty());

    let mut per_event: HashMap<&str, usize> = HashMap::new();
    let mut accepted = Decimal::ZERO;
    for r in &records {
        *per_event.entry(r.value["eventId"].as_str().unwrap()).or_default() += 1;
        if r.value["status"] == "created" {
            accepted += r.value["usage"]["quantity"].to_string().parse::<Decimal>().unwrap();
        } else {
            assert_eq!(r.value["error"]["code"], "usage_limit_exceeded", "{}", r.value);
        }
    }
    assert_eq!(per_event.len(), EVENTS);
    assert!(per_event.values().all(|n| *n == 1));
    assert_eq!(
        accepted,
        Decimal::from(500),
        "the limit is filled exactly, never exceeded"
    );

    let (used, stored): (Decimal, Decimal) = sqlx::query_as(
        "SELECT p.used, (SELECT sum(quantity) FROM usages) FROM service_periods p WHERE subscription_id = 'sub_hot'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((used, stored), (Decimal::from(500), Decimal::from(500)));

    let (a, b) = (
        first.counts.decided.load(Ordering::Relaxed),
        second.counts.decided.load(Ordering::Relaxed),
    );
    assert!(a > 0 && b > 0, "both workers decided part of the stream ({a} and {b})");
    assert_eq!(a + b, EVENTS as u64);
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

mod deciding {
    //! One batch's transaction against what concurrent transactions do.

    use chrono::{DateTime, Utc};
    use rust_decimal::Decimal;
    use test_kit::{active_subscription, wait_until, TestEnv};
    use usage_worker::domain::correction::UsageCommand;
    use usage_worker::domain::event::{Identity, UsageRequest};
    use usage_worker::domain::outcome::OutcomeStatus;
    use usage_worker::domain::subscription::decode_snapshot;
    use usage_worker::domain::ReasonCode;
    use usage_worker::kafka::consumer::OffsetRange;
    use usage_worker::pipeline::decide::{decide_batch, DecideContext, DecodedMessage};
    use usage_worker::store::{apply_snapshots, BatchTx, ControlMessage, NewUsage, SnapshotChange};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn context() -> DecideContext {
        DecideContext {
            group: "usage-worker".into(),
            input_topic: "usage-events".into(),
            results_topic: "usage-results".into(),
            alerts_topic: "usage-alerts".into(),
            dead_letter_topic: "usage-events-dlq".into(),
            grace: chrono::Duration::hours(1),
            max_record_bytes: 1_000_000,
        }
    }

    async fn subscribe(env: &TestEnv, snapshot: serde_json::Value) {
        let snapshot = decode_snapshot(snapshot.to_string().as_bytes()).unwrap();
        let change = ControlMessage {
            partition: 0,
            offset: 0,
            body: SnapshotChange::Upsert(snapshot),
        };
        apply_snapshots(&env.pool, "test", "subscriptions", &[change], &[], &[])
            .await
            .unwrap();
    }

    async fn start_offsets(env: &TestEnv, partitions: &[i32]) {
        for p in partitions {
            sqlx::query(
                "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
                 VALUES ('usage-worker', 'usage-events', $1, 0)",
            )
            .bind(p)
            .execute(&env.pool)
            .await
            .unwrap();
        }
    }

    fn message(partition: i32, offset: i64, id: &str, subscription: &str, usage_time: Option<&str>) -> DecodedMessage {
        let now = Utc::now();
        DecodedMessage {
            partition,
            offset,
            timestamp: Some(now),
            key: Some(subscription.as_bytes().to_vec()),
            request_time: now,
            request: Ok(UsageCommand::Report(UsageRequest {
                id: Some(id.into()),
                subscription_id: subscription.into(),
                quantity: Decimal::ONE,
                usage_time: usage_time.map(t),
                accept_partial: false,
            })),
            identity: Identity {
                id: Some(id.into()),
                subscription_id: Some(subscription.into()),
            },
            dead_letter: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_inserted_concurrently_from_another_partition_costs_one_decision_not_the_batch() {
        let env = TestEnv::start().await;
        subscribe(&env, active_subscription("sub_a", None)).await;
        subscribe(&env, active_subscription("sub_b", None)).await;
        start_offsets(&env, &[1]).await;
        // Another lane, deciding partition 0, has inserted usage "dup" of
        // sub_a and not committed yet.
        let mut other = BatchTx::begin(&env.pool).await.unwrap();
        other.lock_subscriptions(&["sub_a".to_owned()]).await.unwrap();
        let now = Utc::now();
        other
            .insert_usages(&[NewUsage {
                id: "dup".into(),
                subscription_id: "sub_a".into(),
                quantity: Decimal::ONE,
                requested_quantity: Decimal::ONE,
                accept_partial: false,
                usage_time: now,
                period_start: sqlx::query_scalar(
                    "SELECT start_time FROM service_periods WHERE subscription_id = 'sub_a'",
                )
                .fetch_one(&env.pool)
                .await
                .unwrap(),
                created_time: now,
                source_partition: Some(0),
                source_offset: Some(0),
            }])
            .await
            .unwrap();
        // This batch, from partition 1, reports the same id for sub_b, and
        // another usage after it.
        let pool = env.pool.clone();
        let batch = tokio::spawn(async move {
            let messages = [
                message(1, 0, "dup", "sub_b", None),
                message(1, 1, "next", "sub_b", None),
            ];
            decide_batch(
                &pool,
                &context(),
                &[OffsetRange::new(1, 0, 2)],
                &messages,
                None,
                Utc::now(),
            )
            .await
        });
        wait_until("the batch to wait for the other lane's insert", || async {
            env.scalar_i64(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                > 0
        })
        .await;
        other.commit().await.unwrap();
        let report = batch
            .await
            .unwrap()
            .expect("the batch commits, deciding the collision again");
        assert_eq!(
            report.decided,
            [
                (OutcomeStatus::Rejected, Some(ReasonCode::IdempotencyConflict)),
                (OutcomeStatus::Created, None)
            ]
        );
        let owners: Vec<(String, String)> = sqlx::query_as("SELECT id, subscription_id FROM usages ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
        assert_eq!(
            owners,
            [("dup".into(), "sub_a".into()), ("next".into(), "sub_b".into())]
        );
        assert_eq!(
            env.scalar_i64("SELECT next_offset FROM consumer_offsets WHERE partition = 1")
                .await,
            2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whether_a_period_is_closed_is_decided_by_the_database_clock_not_the_workers() {
        let env = TestEnv::start().await;
        subscribe(
            &env,
            serde_json::json!({
                "id": "sub_c", "status": "active", "version": 1,
                "currentPeriodStartTime": "2026-11-01T00:00:00Z",
                "currentPeriodEndTime": "2026-12-01T00:00:00Z",
            }),
        )
        .await;
        start_offsets(&env, &[0]).await;
        let database_now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&env.pool).await.unwrap();
        assert!(database_now > t("2026-12-01T01:00:00Z"), "the period is past its grace");
        // A worker whose clock is behind (still in November) must not
        // accept usage into the period the database has closed.
        let skewed_now = t("2026-11-20T00:00:00Z");
        let messages = [message(0, 0, "late", "sub_c", Some("2026-11-15T00:00:00Z"))];
        let report = decide_batch(
            &env.pool,
            &context(),
            &[OffsetRange::new(0, 0, 1)],
            &messages,
            None,
            skewed_now,
        )
        .await
        .unwrap();
        assert_eq!(
            report.decided,
            [(OutcomeStatus::Rejected, Some(ReasonCode::PeriodClosed))]
        );
    }
}
