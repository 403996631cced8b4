//! Applying subscription snapshots from the compacted `subscriptions` topic.
//! Application is idempotent (a version not greater than the stored one
//! changes nothing), so every worker may apply every snapshot.

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

use super::outbox::{append_once, OutboxRecord};
use crate::domain::decision::open_period_start;
use crate::domain::subscription::SubscriptionSnapshot;

/// One message of the subscriptions topic, decoded.
#[derive(Debug, Clone)]
pub enum SnapshotChange {
    Upsert(SubscriptionSnapshot),
    /// A null value: the subscription (the message key) is deleted.
    Tombstone(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotOutcome {
    pub applied: usize,
    pub stale: usize,
    pub deleted: usize,
}

/// Applies the changes in order, and moves the stored positions of the
/// subscriptions topic forward (never back), in one transaction.
pub async fn apply_snapshots(
    pool: &PgPool,
    group: &str,
    topic: &str,
    changes: &[SnapshotChange],
    dead_letters: &[OutboxRecord],
    positions: &[(i32, i64)],
) -> anyhow::Result<SnapshotOutcome> {
    let mut tx = pool.begin().await.context("beginning snapshot transaction")?;
    append_once(&mut tx, dead_letters).await?;
    let mut outcome = SnapshotOutcome::default();
    for change in changes {
        match change {
            SnapshotChange::Upsert(snapshot) => {
                if upsert(&mut tx, snapshot).await? {
                    outcome.applied += 1;
                } else {
                    outcome.stale += 1;
                }
            }
            SnapshotChange::Tombstone(id) => {
                sqlx::query("UPDATE subscriptions SET deleted = true, updated_time = now() WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .context("deleting subscription")?;
                outcome.deleted += 1;
            }
        }
    }
    advance_positions(&mut tx, group, topic, positions).await?;
    tx.commit().await.context("committing snapshots")?;
    Ok(outcome)
}

/// Moves the stored positions of a topic every worker reads forward, never
/// back.
pub(super) async fn advance_positions(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    positions: &[(i32, i64)],
) -> anyhow::Result<()> {
    let partitions: Vec<i32> = positions.iter().map(|p| p.0).collect();
    let offsets: Vec<i64> = positions.iter().map(|p| p.1).collect();
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
         SELECT $1, $2, p, o FROM UNNEST($3::int[], $4::bigint[]) AS t(p, o)
         ON CONFLICT (group_id, topic, partition) DO UPDATE
         SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset), updated_time = now()",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut *conn)
    .await
    .with_context(|| format!("advancing the stored positions of {topic}"))?;
    Ok(())
}

/// Returns false when the stored version is the same or newer.
async fn upsert(conn: &mut PgConnection, s: &SubscriptionSnapshot) -> anyhow::Result<bool> {
    let changed = sqlx::query(
        "INSERT INTO subscriptions (id, version, status, trial_end_time, trial_limit, deleted)
         VALUES ($1, $2, $3, $4, $5, false)
         ON CONFLICT (id) DO UPDATE
         SET version = EXCLUDED.version, status = EXCLUDED.status,
             trial_end_time = EXCLUDED.trial_end_time, trial_limit = EXCLUDED.trial_limit,
             -- A moved trial end changes which usage counts against the trial.
             trial_used = CASE
                 WHEN subscriptions.trial_end_time IS NOT DISTINCT FROM EXCLUDED.trial_end_time
                     THEN subscriptions.trial_used
                 ELSE (SELECT coalesce(sum(u.quantity), 0) FROM usages u
                       WHERE u.subscription_id = EXCLUDED.id AND u.usage_time < EXCLUDED.trial_end_time)
             END,
             deleted = false, updated_time = now()
         WHERE subscriptions.version < EXCLUDED.version",
    )
    .bind(&s.id)
    .bind(s.version)
    .bind(&s.status)
    .bind(s.trial_end_time)
    .bind(s.limits.trial)
    .execute(&mut *conn)
    .await
    .context("storing subscription")?
    .rows_affected();
    if changed == 0 {
        return Ok(false);
    }
    let limits = &s.limits;
    match &s.period {
        Some(period) => {
            // A newer period cuts short every older one it overlaps from
            // the right, including the open-ended one.
            sqlx::query(
                "UPDATE service_periods SET end_time = $2
                 WHERE subscription_id = $1 AND start_time < $2 AND (end_time IS NULL OR end_time > $2)",
            )
            .bind(&s.id)
            .bind(period.start)
            .execute(&mut *conn)
            .await
            .context("cutting earlier periods")?;
            sqlx::query(
                "INSERT INTO service_periods (subscription_id, start_time, end_time, hard_limit, soft_limit, trial_limit)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (subscription_id, start_time) DO UPDATE
                 SET end_time = EXCLUDED.end_time, hard_limit = EXCLUDED.hard_limit,
                     soft_limit = EXCLUDED.soft_limit, trial_limit = EXCLUDED.trial_limit",
            )
            .bind(&s.id)
            .bind(period.start)
            .bind(period.end)
            .bind(limits.hard)
            .bind(limits.soft)
            .bind(limits.trial)
            .execute(&mut *conn)
            .await
            .context("storing service period")?;
        }
        None => {
            // The open-ended period ends where the first real period starts.
            sqlx::query(
                "INSERT INTO service_periods (subscription_id, start_time, end_time, hard_limit, soft_limit, trial_limit)
                 VALUES ($1, $2, (SELECT min(start_time) FROM service_periods WHERE subscription_id = $1 AND start_time > $2),
                         $3, $4, $5)
                 ON CONFLICT (subscription_id, start_time) DO UPDATE
                 SET hard_limit = EXCLUDED.hard_limit, soft_limit = EXCLUDED.soft_limit,
                     trial_limit = EXCLUDED.trial_limit, end_time = EXCLUDED.end_time",
            )
            .bind(&s.id)
            .bind(open_period_start())
            .bind(limits.hard)
            .bind(limits.soft)
            .bind(limits.trial)
            .execute(&mut *conn)
            .await
            .context("storing open-ended period")?;
        }
    }
    Ok(true)
}
