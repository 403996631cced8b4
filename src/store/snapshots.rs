//! Applying subscription snapshots from the compacted `subscriptions` topic,
//! each message once, in offset order per partition (see `control`).

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::control::{advance_positions, fresh_dead_letters, lock_positions, lock_subscription_rows, not_yet_applied};
use super::control::{ControlMessage, StoredPositions};
use super::outbox::{append, OutboxRecord};
use crate::domain::decision::open_period_start;
use crate::domain::subscription::{Limit, SubscriptionSnapshot};

/// One message of the subscriptions topic, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotChange {
    Upsert(SubscriptionSnapshot),
    /// A null value: the subscription (the message key) is deleted.
    Tombstone(String),
}

impl SnapshotChange {
    fn subscription_id(&self) -> &str {
        match self {
            Self::Upsert(snapshot) => &snapshot.id,
            Self::Tombstone(id) => id,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOutcome {
    pub applied: usize,
    pub stale: usize,
    pub deleted: usize,
    /// Messages another reader of the group applied first.
    pub already_applied: usize,
    /// The stored positions after this application.
    pub positions: StoredPositions,
}

/// Applies the changes that no reader of the group applied yet, in order,
/// stores the dead letters of those still to apply, and moves the stored
/// positions of the subscriptions topic forward, in one transaction.
/// `positions` are the reader's next offsets after the messages it read.
pub async fn apply_snapshots(
    pool: &PgPool,
    group: &str,
    topic: &str,
    changes: &[ControlMessage<SnapshotChange>],
    dead_letters: &[OutboxRecord],
    positions: &[(i32, i64)],
) -> anyhow::Result<SnapshotOutcome> {
    let mut tx = pool.begin().await.context("beginning snapshot transaction")?;
    let partitions: Vec<i32> = positions.iter().map(|p| p.0).collect();
    let stored = lock_positions(&mut tx, group, topic, &partitions).await?;
    let todo: Vec<&SnapshotChange> = changes
        .iter()
        .filter(|m| not_yet_applied(&stored, m.partition, m.offset))
        .map(|m| &m.body)
        .collect();
    let mut outcome = SnapshotOutcome {
        already_applied: changes.len() - todo.len(),
        ..SnapshotOutcome::default()
    };
    // Take every subscription's lock before reading anything under it: a
    // statement's snapshot is taken when it starts, so a value computed by
    // the statement that waited for the lock would miss what the holder
    // committed meanwhile.
    let ids: Vec<String> = todo.iter().map(|c| c.subscription_id().to_owned()).collect();
    let mut trial_ends = lock_subscription_rows(&mut tx, &ids).await?;
    for change in todo {
        match change {
            SnapshotChange::Upsert(snapshot) => {
                if upsert(&mut tx, snapshot, &mut trial_ends).await? {
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
    append(&mut tx, &fresh_dead_letters(dead_letters, topic, &stored)).await?;
    outcome.positions = advance_positions(&mut tx, group, topic, positions).await?;
    tx.commit().await.context("committing snapshots")?;
    Ok(outcome)
}

/// Returns false when the stored version is the same or newer. After a
/// tombstone, the next snapshot re-creates the subscription whatever its
/// version. `trial_ends` holds the trial end of each locked subscription.
async fn upsert(
    conn: &mut PgConnection,
    s: &SubscriptionSnapshot,
    trial_ends: &mut HashMap<String, Option<DateTime<Utc>>>,
) -> anyhow::Result<bool> {
    let changed = sqlx::query(
        "INSERT INTO subscriptions (id, version, status, trial_end_time, trial_limit, deleted)
         VALUES ($1, $2, $3, $4, $5, false)
         ON CONFLICT (id) DO UPDATE
         SET version = EXCLUDED.version, status = EXCLUDED.status,
             trial_end_time = EXCLUDED.trial_end_time, trial_limit = EXCLUDED.trial_limit,
             deleted = false, updated_time = now()
         WHERE subscriptions.version < EXCLUDED.version OR subscriptions.deleted",
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
    // A moved trial end changes which usage counts against the trial. The
    // row is locked (or new), so this statement sees every usage committed.
    if let Some(previous) = trial_ends.insert(s.id.clone(), s.trial_end_time) {
        if previous != s.trial_end_time {
            sqlx::query(
                "UPDATE subscriptions SET trial_used = (
                     SELECT coalesce(sum(u.quantity), 0) FROM usages u
                     WHERE u.subscription_id = $1 AND u.usage_time < $2 AND u.voided_time IS NULL)
                 WHERE id = $1",
            )
            .bind(&s.id)
            .bind(s.trial_end_time)
            .execute(&mut *conn)
            .await
            .context("recomputing trial usage")?;
        }
    }
    let limits = &s.limits;
    let pricing = s.pricing.as_ref().map(|p| p.to_json());
    let quantity = |limit: Option<Limit>| limit.and_then(Limit::quantity);
    let amount = |limit: Option<Limit>| limit.and_then(Limit::amount);
    let (start, end) = match &s.period {
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
            (period.start, Some(period.end))
        }
        None => (open_period_start(), None),
    };
    // The open-ended period (no end given) ends where the first real
    // period starts.
    sqlx::query(
        "INSERT INTO service_periods (subscription_id, start_time, end_time, hard_limit, soft_limit, trial_limit,
                                      hard_limit_amount, soft_limit_amount, pricing)
         VALUES ($1, $2, coalesce($3, (SELECT min(start_time) FROM service_periods
                                       WHERE subscription_id = $1 AND start_time > $2)),
                 $4, $5, $6, $7, $8, $9::jsonb)
         ON CONFLICT (subscription_id, start_time) DO UPDATE
         SET end_time = EXCLUDED.end_time, hard_limit = EXCLUDED.hard_limit,
             soft_limit = EXCLUDED.soft_limit, trial_limit = EXCLUDED.trial_limit,
             hard_limit_amount = EXCLUDED.hard_limit_amount, soft_limit_amount = EXCLUDED.soft_limit_amount,
             pricing = EXCLUDED.pricing",
    )
    .bind(&s.id)
    .bind(start)
    .bind(end)
    .bind(quantity(limits.hard))
    .bind(quantity(limits.soft))
    .bind(limits.trial)
    .bind(amount(limits.hard))
    .bind(amount(limits.soft))
    .bind(pricing)
    .execute(&mut *conn)
    .await
    .context("storing service period")?;
    Ok(true)
}
