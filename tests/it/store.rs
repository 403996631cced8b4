//! The store's rules, against a real PostgreSQL database: snapshots, the
//! outbox, and the fence between relays.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use test_kit::TestEnv;
use usage_worker::domain::decision::{AlertStep, LimitKind, LimitReached, SubscriptionState};
use usage_worker::domain::headers::Headers;
use usage_worker::domain::subscription::decode_snapshot;
use usage_worker::store::{
    apply_snapshots, claim_partition, delete_expired, mark_published_many, pending_many, release_fences, still_claimed,
    take_fences, BatchTx, ControlMessage, CorrectionKind, NewAlert, NewUsage, OutboxRecord, SnapshotChange,
    SourcePosition, StagedWrites, UsageCorrection,
};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn snapshot(version: i64, period: Option<(&str, &str)>, hard: &str) -> SnapshotChange {
    let period = period
        .map(|(s, e)| format!(r#""currentPeriodStartTime": "{s}", "currentPeriodEndTime": "{e}","#))
        .unwrap_or_default();
    let text = format!(
        r#"{{"id": "sub_1", "status": "active", "version": {version}, {period} "usageLimits": {{"hardLimit": {hard}}}}}"#
    );
    SnapshotChange::Upsert(decode_snapshot(text.as_bytes()).unwrap())
}

type Period = (DateTime<Utc>, Option<DateTime<Utc>>, Option<Decimal>);

async fn periods(env: &TestEnv) -> Vec<Period> {
    sqlx::query_as("SELECT start_time, end_time, hard_limit FROM service_periods ORDER BY start_time")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

/// The changes as the messages of partition 0 from `first`, in order.
fn at(first: i64, changes: &[SnapshotChange]) -> Vec<ControlMessage<SnapshotChange>> {
    changes
        .iter()
        .enumerate()
        .map(|(n, body)| ControlMessage {
            partition: 0,
            offset: first + n as i64,
            body: body.clone(),
        })
        .collect()
}

/// Applies the changes as the next messages of partition 0.
async fn apply(env: &TestEnv, changes: &[SnapshotChange]) {
    let next: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets WHERE group_id = 'g' AND topic = 'subscriptions' AND partition = 0",
    )
    .fetch_optional(&env.pool)
    .await
    .unwrap();
    let first = next.unwrap_or(0);
    let end = first + changes.len() as i64;
    apply_snapshots(&env.pool, "g", "subscriptions", &at(first, changes), &[], &[(0, end)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_ended_period_ends_where_the_first_real_period_starts() {
    let env = TestEnv::start().await;
    apply(&env, &[snapshot(1, None, "5")]).await;
    let open = periods(&env).await;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].1, None, "open-ended");

    apply(
        &env,
        &[snapshot(
            2,
            Some(("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")),
            "10",
        )],
    )
    .await;
    let after = periods(&env).await;
    assert_eq!(
        after[0].1,
        Some(t("2026-11-01T00:00:00Z")),
        "cut at the first real start"
    );
    assert_eq!(after[0].2, Some(Decimal::from(5)), "keeps the limits it had");
    assert_eq!(
        after[1],
        (
            t("2026-11-01T00:00:00Z"),
            Some(t("2026-12-01T00:00:00Z")),
            Some(Decimal::from(10))
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_period_keeps_the_limits_of_the_latest_snapshot_that_named_it() {
    let env = TestEnv::start().await;
    let nov = Some(("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"));
    let dec = Some(("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"));
    apply(
        &env,
        &[snapshot(1, nov, "10"), snapshot(2, nov, "20"), snapshot(3, dec, "30")],
    )
    .await;
    let limits: Vec<Option<Decimal>> = periods(&env).await.into_iter().map(|p| p.2).collect();
    assert_eq!(
        limits,
        [Some(Decimal::from(20)), Some(Decimal::from(30))],
        "a new period starts fresh; November keeps 20"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_overlapping_period_cuts_the_older_one_short() {
    let env = TestEnv::start().await;
    apply(
        &env,
        &[snapshot(
            1,
            Some(("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")),
            "10",
        )],
    )
    .await;
    apply(
        &env,
        &[snapshot(
            2,
            Some(("2026-11-15T00:00:00Z", "2026-12-15T00:00:00Z")),
            "10",
        )],
    )
    .await;
    let p = periods(&env).await;
    assert_eq!(p[0].1, Some(t("2026-11-15T00:00:00Z")));
    assert_eq!(p[1].0, t("2026-11-15T00:00:00Z"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_and_replays_change_nothing_and_offsets_never_move_back() {
    let env = TestEnv::start().await;
    let nov = Some(("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"));
    let out = apply_snapshots(
        &env.pool,
        "g",
        "subscriptions",
        &at(9, &[snapshot(5, nov, "50")]),
        &[],
        &[(0, 10)],
    )
    .await
    .unwrap();
    assert_eq!(out.applied, 1);
    // Read again from offset 1 (a reader behind): below the stored
    // position, nothing is applied a second time.
    let out = apply_snapshots(
        &env.pool,
        "g",
        "subscriptions",
        &at(1, &[snapshot(6, nov, "1"), snapshot(7, nov, "2")]),
        &[],
        &[(0, 3)],
    )
    .await
    .unwrap();
    assert_eq!((out.applied, out.stale, out.already_applied), (0, 0, 2));
    assert_eq!(out.positions.get(&0), Some(&10), "the stored position never moves back");
    // Later messages with older versions are stale.
    let out = apply_snapshots(
        &env.pool,
        "g",
        "subscriptions",
        &at(10, &[snapshot(4, nov, "1"), snapshot(5, nov, "2")]),
        &[],
        &[(0, 12)],
    )
    .await
    .unwrap();
    assert_eq!((out.applied, out.stale, out.already_applied), (0, 2, 0));
    assert_eq!(periods(&env).await[0].2, Some(Decimal::from(50)));
    assert_eq!(
        env.scalar_i64("SELECT next_offset FROM consumer_offsets WHERE group_id = 'g'")
            .await,
        12
    );
}

fn snapshot_of(value: serde_json::Value) -> SnapshotChange {
    SnapshotChange::Upsert(decode_snapshot(value.to_string().as_bytes()).unwrap())
}

async fn subscription_state(env: &TestEnv, id: &str) -> (i64, bool) {
    sqlx::query_as("SELECT version, deleted FROM subscriptions WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_behind_another_never_applies_an_old_tombstone_over_a_newer_snapshot() {
    let env = TestEnv::start().await;
    let v = |version: i64| snapshot_of(serde_json::json!({"id": "sub_1", "status": "active", "version": version}));
    let tombstone = SnapshotChange::Tombstone("sub_1".into());
    // One worker applies a snapshot, a tombstone and the re-creating
    // snapshot at version 8.
    apply_snapshots(
        &env.pool,
        "g",
        "subscriptions",
        &at(0, &[v(7), tombstone.clone(), v(8)]),
        &[],
        &[(0, 3)],
    )
    .await
    .unwrap();
    assert_eq!(subscription_state(&env, "sub_1").await, (8, false));
    // Another worker's reader, behind, reads the tombstone and the
    // snapshot again, one poll each.
    let behind = apply_snapshots(&env.pool, "g", "subscriptions", &at(1, &[tombstone]), &[], &[(0, 2)])
        .await
        .unwrap();
    assert_eq!((behind.deleted, behind.already_applied), (0, 1));
    apply_snapshots(&env.pool, "g", "subscriptions", &at(2, &[v(8)]), &[], &[(0, 3)])
        .await
        .unwrap();
    assert_eq!(
        subscription_state(&env, "sub_1").await,
        (8, false),
        "the subscription stays as the last message left it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_tombstone_the_next_snapshot_recreates_the_subscription_whatever_its_version() {
    let env = TestEnv::start().await;
    let v = |version: i64| snapshot_of(serde_json::json!({"id": "sub_1", "status": "active", "version": version}));
    apply(&env, &[v(5), SnapshotChange::Tombstone("sub_1".into())]).await;
    assert_eq!(subscription_state(&env, "sub_1").await, (5, true));
    apply(&env, &[v(2)]).await;
    assert_eq!(subscription_state(&env, "sub_1").await, (2, false));
}

/// Waits until some transaction waits for a lock another one holds.
async fn until_a_transaction_waits_for_a_lock(env: &TestEnv) {
    test_kit::wait_until("a transaction waiting for a lock", || async {
        env.scalar_i64(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            > 0
    })
    .await;
}

fn trial_snapshot(version: i64, trial_end: &str) -> SnapshotChange {
    snapshot_of(serde_json::json!({
        "id": "sub_1", "status": "trial", "version": version,
        "currentPeriodStartTime": "2026-11-01T00:00:00Z", "currentPeriodEndTime": "2026-12-01T00:00:00Z",
        "trialEndTime": trial_end,
        "usageLimits": {"trialLimit": 10}
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_trial_end_counts_usage_committed_while_the_snapshot_waited_for_the_lock() {
    let env = TestEnv::start().await;
    apply(&env, &[trial_snapshot(1, "2026-11-05T00:00:00Z")]).await;
    // A batch holds the subscription's lock and stores 4 units at a time
    // after the trial's end as it stands.
    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    batch.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    let collided = batch.insert_usages(&[usage_in_november("u1", 4)]).await.unwrap();
    assert!(collided.is_empty());
    // A snapshot moves the trial end past that usage while the batch holds
    // the lock; the batch commits while the snapshot waits.
    let pool = env.pool.clone();
    let moved = tokio::spawn(async move {
        let change = at(1, &[trial_snapshot(2, "2026-11-20T00:00:00Z")]);
        apply_snapshots(&pool, "g", "subscriptions", &change, &[], &[(0, 2)]).await
    });
    until_a_transaction_waits_for_a_lock(&env).await;
    batch.commit().await.unwrap();
    moved.await.unwrap().unwrap();
    let trial_used: Decimal = sqlx::query_scalar("SELECT trial_used FROM subscriptions WHERE id = 'sub_1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        trial_used,
        Decimal::from(4),
        "the usage now before the trial's end counts against it"
    );
}

/// A batch locks the subscription of each report, and the one each
/// correction names unless its usage is stored under another: that
/// correction is a mismatch, and its lock would only make the batch wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_of_another_subscriptions_usage_locks_nothing() {
    let env = TestEnv::start().await;
    let subscription = |id: &str| {
        snapshot_of(serde_json::json!({
            "id": id, "status": "active", "version": 1,
            "currentPeriodStartTime": "2026-11-01T00:00:00Z", "currentPeriodEndTime": "2026-12-01T00:00:00Z",
            "usageLimits": {"hardLimit": 100}
        }))
    };
    apply(&env, &["sub_a", "sub_b", "sub_c", "sub_d"].map(subscription)).await;
    let stored_under = |id: &str, sub: &str| NewUsage {
        subscription_id: sub.into(),
        ..usage_in_november(id, 1)
    };
    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    batch
        .lock_subscriptions(&["sub_a".to_owned(), "sub_b".to_owned()])
        .await
        .unwrap();
    let collided = batch
        .insert_usages(&[stored_under("u1", "sub_b"), stored_under("u2", "sub_a")])
        .await
        .unwrap();
    assert!(collided.is_empty());
    batch.commit().await.unwrap();

    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    let corrections = [
        // Its own subscription's usage.
        ("u1".to_owned(), "sub_b".to_owned()),
        // Stored under sub_a: naming sub_c is a mismatch.
        ("u2".to_owned(), "sub_c".to_owned()),
        // Not stored (yet): it may be created before the correction is
        // decided, so its subscription is locked.
        ("u3".to_owned(), "sub_d".to_owned()),
    ];
    let (locked, _) = batch
        .lock_subscriptions_for(&["sub_a".to_owned(), "sub_a".to_owned()], &corrections)
        .await
        .unwrap();
    let mut names: Vec<&str> = locked.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["sub_a", "sub_b", "sub_d"]);
    assert!(locked.values().all(|s| s.periods.len() == 1), "{locked:?}");
    // Held until the batch ends: another transaction can lock sub_c only.
    let mut other = env.pool.begin().await.unwrap();
    let free: Vec<String> = sqlx::query_scalar("SELECT id FROM subscriptions ORDER BY id FOR UPDATE SKIP LOCKED")
        .fetch_all(&mut *other)
        .await
        .unwrap();
    assert_eq!(free, ["sub_c"]);
    other.rollback().await.unwrap();
    batch.commit().await.unwrap();
}

/// A usage of `sub_1` on 10 November, in the period from 1 November.
fn usage_in_november(id: &str, quantity: i64) -> NewUsage {
    NewUsage {
        id: id.into(),
        subscription_id: "sub_1".into(),
        quantity: Decimal::from(quantity),
        requested_quantity: Decimal::from(quantity),
        accept_partial: false,
        usage_time: t("2026-11-10T00:00:00Z"),
        period_start: t("2026-11-01T00:00:00Z"),
        created_time: t("2026-11-10T00:00:00Z"),
        source_partition: None,
        source_offset: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_trial_end_does_not_count_voided_usage_again() {
    let env = TestEnv::start().await;
    apply(&env, &[trial_snapshot(1, "2026-11-20T00:00:00Z")]).await;
    let usage = usage_in_november;
    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    batch.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    assert!(batch
        .insert_usages(&[usage("u1", 6), usage("u2", 3)])
        .await
        .unwrap()
        .is_empty());
    batch.commit().await.unwrap();
    sqlx::query("UPDATE usages SET voided_time = now(), voided_by = 'kafka' WHERE id = 'u1'")
        .execute(&env.pool)
        .await
        .unwrap();
    apply(&env, &[trial_snapshot(2, "2026-11-25T00:00:00Z")]).await;
    let trial_used: Decimal = sqlx::query_scalar("SELECT trial_used FROM subscriptions WHERE id = 'sub_1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(trial_used, Decimal::from(3), "the voided usage counts nowhere");
}

/// The heap page of a usage's current row version.
async fn page_of(env: &TestEnv, id: &str) -> i64 {
    sqlx::query_scalar("SELECT (ctid::text::point)[0]::bigint FROM usages WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_rewrites_its_usage_on_the_page_it_is_on() {
    let env = TestEnv::start().await;
    apply(
        &env,
        &[snapshot(
            1,
            Some(("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")),
            "1000000",
        )],
    )
    .await;
    // Enough usages for several pages, inserted as a batch inserts them.
    let usages: Vec<NewUsage> = (0..400).map(|i| usage_in_november(&format!("u{i:03}"), 1)).collect();
    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    assert!(batch.insert_usages(&usages).await.unwrap().is_empty());
    batch.commit().await.unwrap();
    let last_page: i64 = sqlx::query_scalar("SELECT max((ctid::text::point)[0])::bigint FROM usages")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(last_page >= 2, "the usages fill several pages ({last_page})");
    let first = &usages[0];
    let page = page_of(&env, &first.id).await;
    assert!(page < last_page, "a page that inserts filled");

    let mut amended = first.as_stored();
    amended.quantity = Decimal::from(2);
    amended.last_requested_quantity = Some(Decimal::from(2));
    let correction = UsageCorrection {
        usage: amended,
        action: CorrectionKind::Amended,
        previous_quantity: Decimal::ONE,
        requested_quantity: Some(Decimal::from(2)),
        by: "kafka".into(),
        reason: None,
        time: t("2026-11-11T00:00:00Z"),
    };
    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    batch.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    let writes = StagedWrites {
        corrections: vec![correction],
        ..StagedWrites::default()
    };
    batch.write_staged(&writes).await.unwrap();
    batch.commit().await.unwrap();

    let quantity: Decimal = sqlx::query_scalar("SELECT quantity FROM usages WHERE id = $1")
        .bind(&first.id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(quantity, Decimal::from(2));
    // Room was left on the page: the new version stays beside the old one,
    // and no index gets a new entry for it.
    assert_eq!(page_of(&env, &first.id).await, page);
}

fn dead_letter(source: (&str, i32, i64)) -> OutboxRecord {
    OutboxRecord {
        topic: "usage-events-dlq".into(),
        partition: 0,
        key: None,
        payload: b"not json".to_vec(),
        headers: Headers::new(),
        source: Some(SourcePosition {
            topic: source.0.to_owned(),
            partition: source.1,
            offset: source.2,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_with_a_dead_letter_and_a_batch_take_their_locks_in_one_order() {
    let env = TestEnv::start().await;
    let v = |version: i64| snapshot_of(serde_json::json!({"id": "sub_1", "status": "active", "version": version}));
    apply(&env, &[v(1)]).await;
    // A batch locks the subscription...
    let mut batch = BatchTx::begin(&env.pool).await.unwrap();
    batch.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    // ...while the snapshot reader applies an invalid message (a dead
    // letter on partition 0 of the dead-letter topic) and a snapshot of it.
    let pool = env.pool.clone();
    let snapshot = tokio::spawn(async move {
        let changes = vec![ControlMessage {
            partition: 0,
            offset: 2,
            body: v(2),
        }];
        let dead = [dead_letter(("subscriptions", 0, 1))];
        apply_snapshots(&pool, "g", "subscriptions", &changes, &dead, &[(0, 3)]).await
    });
    until_a_transaction_waits_for_a_lock(&env).await;
    // The batch then stores a dead letter on the same partition.
    batch
        .append_outbox(&[dead_letter(("usage-events", 0, 5))])
        .await
        .expect("no deadlock: the batch holds what it needs");
    batch.commit().await.unwrap();
    snapshot.await.unwrap().expect("the snapshot applies after the batch");
    assert_eq!(subscription_state(&env, "sub_1").await, (2, false));
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE topic = 'usage-events-dlq'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_is_marked_on_its_period_and_stored_once() {
    let env = TestEnv::start().await;
    let start = "2026-11-01T00:00:00Z";
    apply(&env, &[snapshot(1, Some((start, "2026-12-01T00:00:00Z")), "10")]).await;
    let reached = |kind| LimitReached {
        kind,
        threshold: 100,
        limit: Some(Decimal::from(10)),
        used: Decimal::from(10),
        amount: None,
    };
    let alert = |kind| NewAlert {
        subscription_id: "sub_1".to_owned(),
        period_start: t(start),
        usage_id: "u1".to_owned(),
        reached: reached(kind),
    };
    let alerted = |states: &std::collections::HashMap<String, SubscriptionState>| {
        let period = states["sub_1"].periods.iter().find(|p| p.start == t(start)).unwrap();
        period.alerted.clone()
    };

    let mut tx = BatchTx::begin(&env.pool).await.unwrap();
    tx.insert_alerts(&[alert(LimitKind::Soft), alert(LimitKind::Hard)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = BatchTx::begin(&env.pool).await.unwrap();
    let states = tx.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    assert_eq!(
        alerted(&states),
        [LimitKind::Soft, LimitKind::Hard].map(AlertStep::full)
    );
    let again = tx.insert_alerts(&[alert(LimitKind::Soft)]).await;
    assert!(again.is_err(), "a second soft alert of the period is refused");
    drop(tx);

    // The soft limit's lower steps are alerts of their own, once each.
    let step = |threshold| NewAlert {
        reached: LimitReached {
            threshold,
            ..reached(LimitKind::Soft)
        },
        ..alert(LimitKind::Soft)
    };
    let mut tx = BatchTx::begin(&env.pool).await.unwrap();
    tx.insert_alerts(&[step(75), step(90)]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = BatchTx::begin(&env.pool).await.unwrap();
    let states = tx.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    let soft = |threshold| AlertStep {
        kind: LimitKind::Soft,
        threshold,
    };
    assert_eq!(
        alerted(&states),
        [soft(100), AlertStep::full(LimitKind::Hard), soft(75), soft(90)]
    );
    assert!(
        tx.insert_alerts(&[step(75)]).await.is_err(),
        "a second 75 % step is refused"
    );
    drop(tx);

    // An alert taken away by hand is taken off its period too.
    sqlx::query("DELETE FROM limit_alerts WHERE kind = 'soft'")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut tx = BatchTx::begin(&env.pool).await.unwrap();
    let states = tx.lock_subscriptions(&["sub_1".to_owned()]).await.unwrap();
    assert_eq!(alerted(&states), [AlertStep::full(LimitKind::Hard)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_stored_before_migration_9_are_marked_on_their_periods() {
    let env = TestEnv::start().await;
    let (pool, _url) = database_migrated_before(&env, 20261128000009, "alerted").await;
    sqlx::raw_sql(
        "INSERT INTO subscriptions (id, version, status) VALUES ('sub_1', 1, 'active');
         INSERT INTO service_periods (subscription_id, start_time, end_time, hard_limit)
         VALUES ('sub_1', '2026-10-01Z', '2026-11-01Z', 10), ('sub_1', '2026-11-01Z', '2026-12-01Z', 10);
         INSERT INTO limit_alerts (subscription_id, period_start_time, kind, usage_id, limit_quantity, used)
         VALUES ('sub_1', '2026-10-01Z', 'soft', 'u1', 8, 8), ('sub_1', '2026-10-01Z', 'hard', 'u2', 10, 10);",
    )
    .execute(&pool)
    .await
    .unwrap();

    usage_worker::store::migrate(&pool).await.unwrap();
    let mut kinds: Vec<(DateTime<Utc>, Vec<String>)> =
        sqlx::query_as("SELECT start_time, alerted FROM service_periods ORDER BY start_time")
            .fetch_all(&pool)
            .await
            .unwrap();
    kinds.iter_mut().for_each(|(_, k)| k.sort());
    assert_eq!(
        kinds,
        vec![
            (t("2026-10-01T00:00:00Z"), vec!["hard".to_owned(), "soft".to_owned()]),
            (t("2026-11-01T00:00:00Z"), vec![]),
        ]
    );
    pool.close().await;
}

/// A database of its own (beside the test's), migrated up to, not
/// including, `version`.
async fn database_migrated_before(env: &TestEnv, version: i64, name: &str) -> (sqlx::PgPool, String) {
    let url = env.database_beside(name).await;
    let pool = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: usage_worker::store::MIGRATOR
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    (pool, url.to_string())
}

/// Two relays and one output partition: taking it over waits for the former
/// owner's round in flight, and the former owner's next round finds it gone.
/// No transaction is open meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_the_former_owners_round_and_ends_its_publishing() {
    let env = TestEnv::start().await;
    let partition = vec![("usage-results".to_owned(), 3)];
    claim_partition(&env.pool, "usage-results", 3, "old").await.unwrap();

    // The old owner's round is in flight: it holds the fence.
    let mut old = env.pool.acquire().await.unwrap().detach();
    assert_eq!(take_fences(&mut old, &partition).await.unwrap().len(), 1);
    assert_eq!(still_claimed(&mut old, "old", &partition).await.unwrap().len(), 1);
    let claim = tokio::spawn({
        let pool = env.pool.clone();
        async move { claim_partition(&pool, "usage-results", 3, "new").await }
    });
    // The claim is committed, and waits.
    env.wait_for_count("SELECT count(*) FROM outbox_owners WHERE owner = 'new'", 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!claim.is_finished(), "the claim did not wait for the round");
    let open = env
        .scalar_i64("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid()")
        .await;
    assert_eq!(open, 0, "a transaction is open while the claim waits");
    // A second session cannot take the fence meanwhile.
    let mut other = env.pool.acquire().await.unwrap().detach();
    assert!(take_fences(&mut other, &partition).await.unwrap().is_empty());
    release_fences(&mut old).await.unwrap();
    claim.await.unwrap().unwrap();

    // The old owner's next round takes the fence and finds the claim.
    assert_eq!(take_fences(&mut old, &partition).await.unwrap().len(), 1);
    assert!(still_claimed(&mut old, "old", &partition).await.unwrap().is_empty());
    release_fences(&mut old).await.unwrap();
    assert_eq!(take_fences(&mut other, &partition).await.unwrap().len(), 1);
    assert_eq!(still_claimed(&mut other, "new", &partition).await.unwrap().len(), 1);
    // A relay's connection that ends lets go of its fences.
    drop(other);
    claim_partition(&env.pool, "usage-results", 3, "third").await.unwrap();
    // A round that never ends (brokers unreachable) holds up a claim for
    // a bounded time only; the claim is made and the next round waits again.
    assert_eq!(take_fences(&mut old, &partition).await.unwrap().len(), 1);
    let err = claim_partition(&env.pool, "usage-results", 3, "fourth")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("still in flight"), "{err:#}");
    env.wait_for_count("SELECT count(*) FROM outbox_owners WHERE owner = 'fourth'", 1)
        .await;
    release_fences(&mut old).await.unwrap();
    claim_partition(&env.pool, "usage-results", 3, "fourth").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_lock_polled_is_the_one_sqlx_takes() {
    use sqlx::migrate::Migrate;
    let env = TestEnv::start().await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let key = usage_worker::store::migration_lock_id(&database);
    let mut migrator = env.pool.acquire().await.unwrap().detach();
    migrator.lock().await.unwrap();
    let try_lock = |pool: sqlx::PgPool| async move {
        let mut conn = pool.acquire().await.unwrap().detach();
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        taken
    };
    assert!(
        !try_lock(env.pool.clone()).await,
        "sqlx's migration lock is another key"
    );
    migrator.unlock().await.unwrap();
    assert!(try_lock(env.pool.clone()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_not_cut_short_by_the_statement_time_out() {
    let env = TestEnv::start().await;
    let url = env.database_beside("timeout").await;
    let mut settings = env.settings().database;
    settings.url = url.to_string();
    // Far shorter than creating the schema takes.
    settings.statement_timeout_ms = 1;
    let pool = usage_worker::store::connect(&settings).await.unwrap();
    usage_worker::store::migrate(&pool).await.unwrap();
    let plain = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'outbox_owners'")
        .fetch_one(&plain)
        .await
        .unwrap();
    assert_eq!(tables, 1);
    // The pool's connections still have the time-out.
    let err = sqlx::query("SELECT pg_sleep(0.2)").execute(&pool).await.unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("57014"), "{err}");
}

fn outbox_record(topic: &str, partition: i32, source_offset: Option<i64>) -> OutboxRecord {
    OutboxRecord {
        topic: topic.to_owned(),
        partition,
        key: source_offset.map(|o| format!("key-{o}").into_bytes()),
        payload: format!("payload-{source_offset:?}").into_bytes(),
        headers: status_created(),
        source: source_offset.map(|offset| SourcePosition {
            topic: "events".to_owned(),
            partition,
            offset,
        }),
    }
}

fn status_created() -> Headers {
    [("status", "created")].into_iter().collect()
}

async fn append(env: &TestEnv, records: &[OutboxRecord]) -> anyhow::Result<Vec<i64>> {
    let mut tx = BatchTx::begin(&env.pool).await?;
    let seqs = tx.append_outbox(records).await?;
    tx.commit().await?;
    Ok(seqs)
}

async fn pending(env: &TestEnv, after: i64, limit: i64) -> Vec<(i64, Option<Vec<u8>>, Vec<u8>)> {
    pending_many(&env.pool, &[("results".to_owned(), 0, after)], limit, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(topic, partition, r)| {
            assert_eq!((topic.as_str(), partition), ("results", 0));
            assert_eq!(r.headers, status_created());
            (r.seq, r.key, r.payload)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_records_are_read_back_from_any_point_of_a_stored_batch() {
    let env = TestEnv::start().await;
    let first = [10, 11, 12].map(|o| outbox_record("results", 0, Some(o)));
    assert_eq!(append(&env, &first).await.unwrap(), vec![1, 2, 3]);
    let second = [outbox_record("results", 0, Some(13)), outbox_record("results", 0, None)];
    assert_eq!(append(&env, &second).await.unwrap(), vec![4, 5]);

    let seqs = |records: Vec<(i64, Option<Vec<u8>>, Vec<u8>)>| records.into_iter().map(|r| r.0).collect::<Vec<_>>();
    assert_eq!(seqs(pending(&env, 0, 100).await), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        pending(&env, 1, 100).await[0],
        (2, Some(b"key-11".to_vec()), b"payload-Some(11)".to_vec()),
        "the rest of a row after a record already on the topic"
    );
    assert_eq!(pending(&env, 4, 100).await, vec![(5, None, b"payload-None".to_vec())]);
    // The limit counts records, in whole rows: the row that reaches it is
    // read whole, the next is not. (Rows: 1-3; 4; 5, which has no source.)
    assert_eq!(seqs(pending(&env, 1, 1).await), vec![2, 3]);
    assert_eq!(seqs(pending(&env, 2, 2).await), vec![3, 4]);
    assert_eq!(seqs(pending(&env, 2, 3).await), vec![3, 4, 5]);
    assert!(pending(&env, 5, 100).await.is_empty());

    let by_record: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT seq, source_offset FROM outbox WHERE topic = 'results' ORDER BY seq")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        by_record,
        vec![(1, Some(10)), (2, Some(11)), (3, Some(12)), (4, Some(13)), (5, None)],
        "the outbox view shows one row per record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_reads_rows_up_to_a_byte_bound_and_always_the_first() {
    let env = TestEnv::start().await;
    // Three stored batches of one large record each (dead-letter copies of
    // about 950 KB), then a small one.
    for o in 0..3 {
        let large = OutboxRecord {
            payload: vec![b'x'; 950_000],
            ..outbox_record("results", 0, Some(o))
        };
        append(&env, &[large]).await.unwrap();
    }
    append(&env, &[outbox_record("results", 0, Some(3))]).await.unwrap();
    let read = |byte_limit: i64| {
        let pool = env.pool.clone();
        async move {
            pending_many(&pool, &[("results".to_owned(), 0, 0)], 1000, byte_limit)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, _, r)| r.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read(1).await, vec![1], "the first row whatever its size");
    assert_eq!(
        read(1_000_000).await,
        vec![1, 2],
        "the row that reaches the bound is read whole"
    );
    assert_eq!(read(2_000_000).await, vec![1, 2, 3]);
    assert_eq!(read(i64::MAX).await, vec![1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_records_are_stored_compressed_and_read_back_intact() {
    let env = TestEnv::start().await;
    // Large enough to be compressed: 300 outcome-like payloads.
    let records: Vec<OutboxRecord> = (0..300)
        .map(|o| OutboxRecord {
            payload: format!(r#"{{"outcomeId": "oc_{o:032}", "status": "created", "quantity": {o}.5}}"#).into_bytes(),
            ..outbox_record("results", 0, Some(o))
        })
        .collect();
    append(&env, &records).await.unwrap();
    let (method, stored, raw): (Option<String>, i32, i64) = sqlx::query_as(
        "SELECT pg_column_compression(payloads), pg_column_size(payloads),
                (SELECT sum(octet_length(p))::bigint FROM unnest(payloads) p)
         FROM outbox_batches WHERE topic = 'results'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    // A server built without lz4 keeps them as they are (migration 8).
    let lz4: bool =
        sqlx::query_scalar("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    if lz4 {
        assert_eq!(method.as_deref(), Some("lz4"));
        assert!(i64::from(stored) * 3 < raw, "{stored} bytes stored for {raw}");
    } else {
        assert_eq!(method, None);
    }
    let back = pending(&env, 0, 1000).await;
    assert_eq!(back.len(), 300);
    for (record, (seq, key, payload)) in records.iter().zip(back) {
        assert_eq!(
            (Some(payload), key),
            (Some(record.payload.clone()), record.key.clone()),
            "seq {seq}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_message_is_decided_into_a_topic_once() {
    let env = TestEnv::start().await;
    append(&env, &[10, 11, 12].map(|o| outbox_record("results", 0, Some(o))))
        .await
        .unwrap();
    // Inside the row, at its start, and a row reaching into it from below.
    for offsets in [&[11][..], &[10], &[8, 9, 10]] {
        let records: Vec<OutboxRecord> = offsets.iter().map(|&o| outbox_record("results", 0, Some(o))).collect();
        let again = append(&env, &records).await.unwrap_err();
        let code = again.chain().find_map(|c| match c.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        });
        assert_eq!(code.as_deref(), Some("23P01"), "{offsets:?}: {again:#}");
    }
    append(&env, &[outbox_record("results", 0, Some(9))]).await.unwrap();
    // The same message may have a record in another topic, and the next
    // message one in this topic.
    append(&env, &[outbox_record("alerts", 0, Some(11))]).await.unwrap();
    append(&env, &[outbox_record("results", 0, Some(13))]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_outbox_rows_go_once_every_record_in_them_is_published() {
    let env = TestEnv::start().await;
    append(&env, &[10, 11, 12].map(|o| outbox_record("results", 0, Some(o))))
        .await
        .unwrap();
    append(&env, &[13, 14].map(|o| outbox_record("results", 0, Some(o))))
        .await
        .unwrap();
    mark_published_many(&env.pool, &[("results".to_owned(), 0, 4)])
        .await
        .unwrap();
    assert_eq!(
        delete_expired(&env.pool, 0, 10_000, Duration::ZERO).await.unwrap(),
        (3, 1),
        "the first row's records"
    );
    let left = env.scalar_i64("SELECT count(*) FROM outbox").await;
    assert_eq!(left, 2, "a row with a record not yet published stays whole");
    assert_eq!(
        delete_expired(&env.pool, 30, 10_000, Duration::ZERO).await.unwrap(),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_deletes_in_chunks_of_bounded_rows() {
    let env = TestEnv::start().await;
    for partition in 0..2 {
        for offset in 0..7 {
            append(&env, &[outbox_record("results", partition, Some(offset))])
                .await
                .unwrap();
        }
    }
    // Partition 0 is published up to its sixth record, partition 1 whole.
    mark_published_many(&env.pool, &[("results".to_owned(), 0, 6), ("results".to_owned(), 1, 7)])
        .await
        .unwrap();
    sqlx::query(
        "UPDATE outbox_batches SET created_time = now() - interval '40 days' WHERE (partition, last_seq) <> (0, 5)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    // 12 expired published rows (not partition 0's fifth, too recent, nor
    // its seventh, unpublished), 5 a statement: three statements.
    let (deleted, statements) = delete_expired(&env.pool, 30, 5, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!((deleted, statements), (12, 3));
    let left: Vec<(i32, i64)> = sqlx::query_as("SELECT partition, last_seq FROM outbox_batches ORDER BY 1, 2")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, [(0, 5), (0, 7)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stored_one_per_row_before_the_batched_outbox_are_kept() {
    let env = TestEnv::start().await;
    let (pool, _url) = database_migrated_before(&env, 20261128000007, "upgrade").await;
    sqlx::query(
        "INSERT INTO outbox (topic, partition, seq, key, payload, headers, source_topic, source_partition, source_offset)
         VALUES ('results', 0, 1, 'k', 'decided', '[]', 'events', 0, 40),
                ('results', 0, 2, NULL, 'from http', '[]', NULL, NULL, NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();

    usage_worker::store::migrate(&pool).await.unwrap();
    type Record = (i64, Option<Vec<u8>>, Vec<u8>, Option<String>, Option<i64>);
    let records: Vec<Record> = sqlx::query_as(
        "SELECT seq, key, payload, source_topic, source_offset FROM outbox WHERE topic = 'results' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        records,
        vec![
            (
                1,
                Some(b"k".to_vec()),
                b"decided".to_vec(),
                Some("events".to_owned()),
                Some(40)
            ),
            (2, None, b"from http".to_vec(), None, None),
        ]
    );
    let pending = pending_many(&pool, &[("results".to_owned(), 0, 1)], 10, i64::MAX)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].2.payload, b"from http");
    pool.close().await;
}
