//! The queries behind the HTTP API: read one usage, list usages, delete one
//! (giving its quantity back to its period), and the figures `/readyz` and
//! the metrics read. Creating a usage goes through [`super::BatchTx`], the
//! same transaction the Kafka path uses.

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};

use super::outbox::{append, OutboxRecord};
use crate::domain::decision::{PeriodState, StoredUsage};

pub(super) const USAGE_COLUMNS: &str = "id, subscription_id, quantity, requested_quantity, accept_partial, usage_time,
     invoice_id, invoice_item_id, created_time, updated_time";

/// A `usages` row as read by `USAGE_COLUMNS`.
#[derive(sqlx::FromRow)]
pub(super) struct UsageRow {
    id: String,
    subscription_id: String,
    quantity: Decimal,
    requested_quantity: Decimal,
    accept_partial: bool,
    usage_time: DateTime<Utc>,
    invoice_id: Option<String>,
    invoice_item_id: Option<String>,
    created_time: DateTime<Utc>,
    updated_time: DateTime<Utc>,
}

pub(super) fn stored(r: UsageRow) -> StoredUsage {
    StoredUsage {
        id: r.id,
        subscription_id: r.subscription_id,
        quantity: r.quantity,
        requested_quantity: r.requested_quantity,
        accept_partial: r.accept_partial,
        usage_time: r.usage_time,
        invoice_id: r.invoice_id,
        invoice_item_id: r.invoice_item_id,
        created_time: r.created_time,
        updated_time: r.updated_time,
    }
}

pub async fn get_usage(pool: &PgPool, id: &str) -> anyhow::Result<Option<StoredUsage>> {
    let row: Option<UsageRow> = sqlx::query_as(&format!("SELECT {USAGE_COLUMNS} FROM usages WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("reading a usage")?;
    Ok(row.map(stored))
}

/// Which usages a listing returns; every condition is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    pub subscription_id: Option<String>,
    /// Inclusive.
    pub usage_time_from: Option<DateTime<Utc>>,
    /// Exclusive, like a period's end.
    pub usage_time_to: Option<DateTime<Utc>>,
}

impl UsageFilter {
    /// Appends the `WHERE` clause. Built per request rather than written as
    /// `($1 IS NULL OR ...)`, so PostgreSQL can use the subscription index.
    fn push_where(&self, query: &mut QueryBuilder<'_, Postgres>) {
        query.push(" WHERE true");
        if let Some(id) = &self.subscription_id {
            query.push(" AND subscription_id = ").push_bind(id.clone());
        }
        if let Some(from) = self.usage_time_from {
            query.push(" AND usage_time >= ").push_bind(from);
        }
        if let Some(to) = self.usage_time_to {
            query.push(" AND usage_time < ").push_bind(to);
        }
    }
}

/// One page of usages in `usageTime` order (then id, so that pages never
/// overlap), and how many match in all.
pub async fn list_usages(
    pool: &PgPool,
    filter: &UsageFilter,
    limit: i64,
    offset: i64,
) -> anyhow::Result<(Vec<StoredUsage>, i64)> {
    let mut count = QueryBuilder::new("SELECT count(*) FROM usages");
    filter.push_where(&mut count);
    let total: i64 = count
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .context("counting usages")?;
    let mut page = QueryBuilder::new(format!("SELECT {USAGE_COLUMNS} FROM usages"));
    filter.push_where(&mut page);
    page.push(" ORDER BY usage_time, id LIMIT ")
        .push_bind(limit)
        .push(" OFFSET ")
        .push_bind(offset);
    let rows: Vec<UsageRow> = page.build_query_as().fetch_all(pool).await.context("listing usages")?;
    Ok((rows.into_iter().map(stored).collect(), total))
}

/// What became of a delete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    NotFound,
    /// An invoice counted it: it stays.
    Invoiced(StoredUsage),
    /// Its period is closed (by the database's clock, or by an invoice not
    /// yet applied to it): what the period billed must not change.
    PeriodClosed(StoredUsage),
    Deleted(StoredUsage),
}

/// Deletes a usage that no invoice has stamped, gives its quantity back to
/// its period (and to the trial, when it counted there), and stores the
/// outbox records `records_for` makes for it, in one transaction.
///
/// The subscription's row is locked first, as every transaction that
/// changes `used` or stamps invoices does: so a concurrent create sees the
/// freed quantity only once the delete committed, and an invoice cannot
/// stamp the usage halfway through.
pub async fn delete_usage(
    pool: &PgPool,
    id: &str,
    grace: chrono::Duration,
    records_for: impl Fn(&StoredUsage) -> anyhow::Result<Vec<OutboxRecord>>,
) -> anyhow::Result<Deletion> {
    // The usage's subscription is read before its lock is taken; should the
    // id be deleted and created again for another subscription in between,
    // the next round locks the right one.
    for _ in 0..3 {
        let mut tx = pool.begin().await.context("beginning delete transaction")?;
        let Some(subscription_id) = usage_subscription(&mut tx, id).await? else {
            return Ok(Deletion::NotFound);
        };
        let trial_end = lock_subscription(&mut tx, &subscription_id).await?;
        let Some((usage, period_start)) = lock_usage(&mut tx, id).await? else {
            return Ok(Deletion::NotFound);
        };
        if usage.subscription_id != subscription_id {
            continue;
        }
        if usage.invoice_id.is_some() {
            return Ok(Deletion::Invoiced(usage));
        }
        if period_closed(&mut tx, &usage.subscription_id, period_start, grace).await? {
            return Ok(Deletion::PeriodClosed(usage));
        }
        remove(&mut tx, &usage, period_start, trial_end).await?;
        append(&mut tx, &records_for(&usage)?).await?;
        tx.commit().await.context("committing a usage deletion")?;
        return Ok(Deletion::Deleted(usage));
    }
    anyhow::bail!("usage {id:?} kept changing subscription while being deleted")
}

async fn usage_subscription(conn: &mut PgConnection, id: &str) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar("SELECT subscription_id FROM usages WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
        .context("finding the usage's subscription")
}

/// Locks the subscription row and returns its trial end.
async fn lock_subscription(conn: &mut PgConnection, id: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let trial_end: Option<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT trial_end_time FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(conn)
            .await
            .context("locking the usage's subscription")?;
    Ok(trial_end.flatten())
}

async fn lock_usage(conn: &mut PgConnection, id: &str) -> anyhow::Result<Option<(StoredUsage, DateTime<Utc>)>> {
    #[derive(sqlx::FromRow)]
    struct LockedRow {
        #[sqlx(flatten)]
        usage: UsageRow,
        period_start_time: DateTime<Utc>,
    }
    let row: Option<LockedRow> = sqlx::query_as(&format!(
        "SELECT {USAGE_COLUMNS}, period_start_time FROM usages WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
    .context("locking the usage")?;
    Ok(row.map(|r| (stored(r.usage), r.period_start_time)))
}

/// Whether the period is closed by PostgreSQL's clock, read under the
/// subscription's lock (the same rule a decision applies).
async fn period_closed(
    conn: &mut PgConnection,
    subscription_id: &str,
    start: DateTime<Utc>,
    grace: chrono::Duration,
) -> anyhow::Result<bool> {
    let (end, closed_time, database_now): (Option<DateTime<Utc>>, Option<DateTime<Utc>>, DateTime<Utc>) =
        sqlx::query_as(
            "SELECT end_time, coalesce(closed_time, record_closed_time), clock_timestamp() FROM service_periods
             WHERE subscription_id = $1 AND start_time = $2",
        )
        .bind(subscription_id)
        .bind(start)
        .fetch_one(&mut *conn)
        .await
        .context("reading the usage's period")?;
    let period = PeriodState {
        closed_time,
        ..PeriodState::new(start, end)
    };
    Ok(period.is_closed(database_now, grace))
}

/// Deletes the row and subtracts its quantity where it was counted. Trial
/// usage is re-derived from the usages whenever the trial end moves, so
/// "counted in the trial" is `usageTime` before the trial end as it is now.
async fn remove(
    conn: &mut PgConnection,
    usage: &StoredUsage,
    period_start: DateTime<Utc>,
    trial_end: Option<DateTime<Utc>>,
) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM usages WHERE id = $1")
        .bind(&usage.id)
        .execute(&mut *conn)
        .await
        .context("deleting the usage")?;
    sqlx::query("UPDATE service_periods SET used = used - $3 WHERE subscription_id = $1 AND start_time = $2")
        .bind(&usage.subscription_id)
        .bind(period_start)
        .bind(usage.quantity)
        .execute(&mut *conn)
        .await
        .context("giving the quantity back to its period")?;
    if trial_end.is_some_and(|end| usage.usage_time < end) {
        sqlx::query("UPDATE subscriptions SET trial_used = trial_used - $2 WHERE id = $1")
            .bind(&usage.subscription_id)
            .bind(usage.quantity)
            .execute(&mut *conn)
            .await
            .context("giving the quantity back to the trial")?;
    }
    Ok(())
}

/// Whether the database answers at all.
pub async fn ping(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT 1")
        .execute(pool)
        .await
        .context("pinging the database")?;
    Ok(())
}

/// Outbox records stored but not yet published, per output topic.
pub async fn outbox_backlog(pool: &PgPool) -> anyhow::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT c.topic, coalesce(sum(c.next_seq - 1 - coalesce(p.published_seq, 0)), 0)::bigint
         FROM outbox_partitions c LEFT JOIN outbox_published p USING (topic, partition)
         GROUP BY c.topic ORDER BY c.topic",
    )
    .fetch_all(pool)
    .await
    .context("reading the outbox backlog")
}
