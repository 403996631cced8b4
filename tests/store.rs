//! The store's rules, against a real PostgreSQL database: snapshots, and the
//! fence between relays.

mod common;

use chrono::{DateTime, Utc};
use common::TestEnv;
use rust_decimal::Decimal;
use usage_worker::domain::subscription::decode_snapshot;
use usage_worker::store::{apply_snapshots, claim_partition, lock_claimed, SnapshotChange};

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

async fn apply(env: &TestEnv, changes: &[SnapshotChange]) {
    apply_snapshots(&env.pool, "g", "subscriptions", changes, &[], &[(0, 1)])
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
        &[snapshot(5, nov, "50")],
        &[],
        &[(0, 10)],
    )
    .await
    .unwrap();
    assert_eq!(out.applied, 1);
    let out = apply_snapshots(
        &env.pool,
        "g",
        "subscriptions",
        &[snapshot(4, nov, "1"), snapshot(5, nov, "2")],
        &[],
        &[(0, 3)],
    )
    .await
    .unwrap();
    assert_eq!((out.applied, out.stale), (0, 2));
    assert_eq!(periods(&env).await[0].2, Some(Decimal::from(50)));
    assert_eq!(
        env.scalar_i64("SELECT next_offset FROM consumer_offsets WHERE group_id = 'g'")
            .await,
        10
    );
}

/// Two relays and one output partition: taking it over waits for the former
/// owner's round in flight, and the former owner's next round finds it gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_the_former_owners_round_and_ends_its_publishing() {
    let env = TestEnv::start().await;
    let partition = vec![("usage-results".to_owned(), 3)];
    claim_partition(&env.pool, "usage-results", 3, "old").await.unwrap();

    // The old owner's round is in flight: it holds the row.
    let mut round = env.pool.begin().await.unwrap();
    assert_eq!(
        lock_claimed(&mut round, "old", &partition).await.unwrap(),
        partition.iter().cloned().collect()
    );
    let claim = tokio::spawn({
        let pool = env.pool.clone();
        async move { claim_partition(&pool, "usage-results", 3, "new").await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting = env
            .scalar_i64(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO outbox_owners%'",
            )
            .await;
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the claim never waited for the round"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!claim.is_finished());
    round.commit().await.unwrap();
    claim.await.unwrap().unwrap();

    let mut old_next = env.pool.begin().await.unwrap();
    assert!(lock_claimed(&mut old_next, "old", &partition).await.unwrap().is_empty());
    old_next.commit().await.unwrap();
    let mut new_round = env.pool.begin().await.unwrap();
    assert_eq!(lock_claimed(&mut new_round, "new", &partition).await.unwrap().len(), 1);
    new_round.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_not_cut_short_by_the_statement_time_out() {
    let env = TestEnv::start().await;
    let mut url = url::Url::parse(&env.database_url).unwrap();
    url.set_path(&format!("{}_timeout", url.path().trim_start_matches('/')));
    usage_worker::store::create_database(url.as_str()).await.unwrap();
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
