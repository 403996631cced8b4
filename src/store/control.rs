//! What the control topics (`subscriptions`, `invoice-events`) share: every
//! worker reads them in full, and their messages are applied once, in offset
//! order per partition, however many workers read them.
//!
//! The group's stored position of each control partition is the line between
//! applied and not applied. A transaction that applies control messages
//! first locks the rows of the partitions it touches, applies only the
//! messages at or after the stored positions, and moves them on. A worker
//! whose reader is behind another's finds its messages below the line and
//! skips them: it never re-applies an older message over a newer one (a
//! tombstone carries no version; only its offset can order it).
//!
//! Lock order, the same in every transaction of the service: stored
//! positions (by partition), then subscriptions (by id), then usages, then
//! outbox partitions. So no two transactions ever wait on each other in a
//! cycle.

use std::collections::HashMap;

use anyhow::Context;
use sqlx::PgConnection;

/// A message of a control topic with where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlMessage<T> {
    pub partition: i32,
    pub offset: i64,
    pub body: T,
}

/// Where a control topic's partitions stand after an application: the
/// group's stored next offset of each partition the messages came from.
pub type StoredPositions = HashMap<i32, i64>;

/// Locks the group's stored positions of these partitions (in partition
/// order) and returns them. A partition nobody applied yet gets a row at 0.
pub(super) async fn lock_positions(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<StoredPositions> {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
         SELECT $1, $2, p, 0 FROM UNNEST($3::int[]) AS t(p)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(topic)
    .bind(&sorted)
    .execute(&mut *conn)
    .await
    .with_context(|| format!("initialising the stored positions of {topic}"))?;
    lock_offset_rows(conn, group, topic, &sorted).await
}

/// Locks the stored offset rows of a group's partitions of a topic, in
/// partition order (`partitions` sorted), and returns them: the first lock
/// every transaction that moves positions takes.
pub(super) async fn lock_offset_rows(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<StoredPositions> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets
         WHERE group_id = $1 AND topic = $2 AND partition = ANY($3)
         ORDER BY partition FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("locking the stored positions of {topic}"))?;
    Ok(rows.into_iter().collect())
}

/// Locks the stored subscriptions among `ids`, in id order (the second lock
/// of every transaction that takes one), and returns each one's trial end.
pub(super) async fn lock_subscription_rows(
    conn: &mut PgConnection,
    ids: &[String],
) -> anyhow::Result<HashMap<String, Option<chrono::DateTime<chrono::Utc>>>> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let rows: Vec<(String, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT id, trial_end_time FROM subscriptions WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&sorted)
            .fetch_all(&mut *conn)
            .await
            .context("locking subscriptions")?;
    Ok(rows.into_iter().collect())
}

/// Whether a message is still to be applied: at or after its partition's
/// stored position.
pub(super) fn not_yet_applied(stored: &StoredPositions, partition: i32, offset: i64) -> bool {
    stored.get(&partition).is_none_or(|next| offset >= *next)
}

/// Moves the stored positions of a topic every worker reads forward, never
/// back, and returns them as they now are.
pub(super) async fn advance_positions(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    positions: &[(i32, i64)],
) -> anyhow::Result<StoredPositions> {
    let partitions: Vec<i32> = positions.iter().map(|p| p.0).collect();
    let offsets: Vec<i64> = positions.iter().map(|p| p.1).collect();
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
         SELECT $1, $2, p, o FROM UNNEST($3::int[], $4::bigint[]) AS t(p, o)
         ON CONFLICT (group_id, topic, partition) DO UPDATE
         SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset), updated_time = now()
         RETURNING partition, next_offset",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("advancing the stored positions of {topic}"))?;
    Ok(rows.into_iter().collect())
}

/// Dead-letter copies of control messages that are still to be applied.
pub(super) fn fresh_dead_letters(
    records: &[super::OutboxRecord],
    topic: &str,
    stored: &StoredPositions,
) -> Vec<super::OutboxRecord> {
    records
        .iter()
        .filter(|r| match &r.source {
            Some(source) if source.topic == topic => not_yet_applied(stored, source.partition, source.offset),
            _ => true,
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_below_the_stored_position_was_applied_before() {
        let stored: StoredPositions = [(0, 10), (1, 0)].into_iter().collect();
        assert!(!not_yet_applied(&stored, 0, 9));
        assert!(not_yet_applied(&stored, 0, 10));
        assert!(not_yet_applied(&stored, 1, 0));
        assert!(
            not_yet_applied(&stored, 2, 0),
            "a partition with no row: nothing applied"
        );
    }
}
