//! The queries behind the HTTP API: read one usage, its history, list
//! usages, and the figures `/readyz` and the metrics read. Creating and
//! correcting a usage go through [`super::BatchTx`], the same transaction
//! the Kafka path uses.

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::domain::decision::{StoredUsage, Voided};

pub(super) const USAGE_COLUMNS: &str = "id, subscription_id, quantity, requested_quantity, accept_partial, usage_time,
     invoice_id, invoice_item_id, created_time, updated_time, period_start_time, last_requested_quantity,
     voided_time, void_reason, voided_by";

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
    period_start_time: DateTime<Utc>,
    last_requested_quantity: Option<Decimal>,
    voided_time: Option<DateTime<Utc>>,
    void_reason: Option<String>,
    voided_by: Option<String>,
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
        period_start: r.period_start_time,
        last_requested_quantity: r.last_requested_quantity,
        voided: r.voided_time.map(|time| Voided {
            time,
            reason: r.void_reason,
            by: r.voided_by.unwrap_or_else(|| "unknown".to_owned()),
        }),
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
    pub status: StatusFilter,
}

/// `?status=`: which usages a listing shows by whether they were voided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatusFilter {
    /// Those that count (not voided): the default.
    #[default]
    Active,
    Voided,
    All,
}

impl StatusFilter {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "voided" => Some(Self::Voided),
            "all" => Some(Self::All),
            _ => None,
        }
    }
}

impl UsageFilter {
    /// Appends the `WHERE` clause. Built per request rather than written as
    /// `($1 IS NULL OR ...)`, so PostgreSQL can use the subscription index.
    fn push_where(&self, query: &mut QueryBuilder<'_, Postgres>) {
        query.push(match self.status {
            StatusFilter::Active => " WHERE voided_time IS NULL",
            StatusFilter::Voided => " WHERE voided_time IS NOT NULL",
            StatusFilter::All => " WHERE true",
        });
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

/// Where a page of a listing starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStart {
    /// After skipping this many usages (the caller caps it: PostgreSQL
    /// still reads every skipped row).
    Offset(i64),
    /// Right after this usage in list order: a keyset seek on the
    /// `usages_in_list_order` index, as cheap on the last page as on the
    /// first.
    After { usage_time: DateTime<Utc>, id: String },
}

/// One page of at most `limit` usages in `usageTime` order (then id, so
/// that pages never overlap), and how many match in all, counted up to
/// `count_cap` so that the count's cost is bounded too.
pub async fn list_usages(
    pool: &PgPool,
    filter: &UsageFilter,
    start: &PageStart,
    limit: i64,
    count_cap: i64,
) -> anyhow::Result<(Vec<StoredUsage>, i64)> {
    let mut count = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM usages");
    filter.push_where(&mut count);
    count.push(" LIMIT ").push_bind(count_cap).push(") AS matching");
    let total: i64 = count
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .context("counting usages")?;
    let mut page = QueryBuilder::new(format!("SELECT {USAGE_COLUMNS} FROM usages"));
    filter.push_where(&mut page);
    if let PageStart::After { usage_time, id } = start {
        page.push(" AND (usage_time, id) > (")
            .push_bind(*usage_time)
            .push(", ")
            .push_bind(id.clone())
            .push(")");
    }
    page.push(" ORDER BY usage_time, id LIMIT ").push_bind(limit);
    if let PageStart::Offset(offset) = start {
        page.push(" OFFSET ").push_bind(*offset);
    }
    let rows: Vec<UsageRow> = page.build_query_as().fetch_all(pool).await.context("listing usages")?;
    Ok((rows.into_iter().map(stored).collect(), total))
}

/// The subscription a usage belongs to, voided or not: what a correction
/// that names only the usage (`DELETE /usages/{id}`) must lock. A usage's
/// subscription never changes and its row is never deleted, so this can be
/// read before the lock is taken.
pub async fn usage_subscription(pool: &PgPool, id: &str) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar("SELECT subscription_id FROM usages WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("finding the usage's subscription")
}

/// One correction of a usage, as `usage_corrections` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CorrectionRecord {
    pub time: DateTime<Utc>,
    /// `amended` or `voided`.
    pub action: String,
    pub quantity: Decimal,
    pub previous_quantity: Decimal,
    pub by: String,
    pub reason: Option<String>,
}

/// A usage, voided or not, with its corrections in the order they were
/// made.
#[derive(Debug, Clone)]
pub struct UsageHistory {
    pub usage: StoredUsage,
    /// Read from `usage-events` (else created through the HTTP API).
    pub reported_over_kafka: bool,
    pub corrections: Vec<CorrectionRecord>,
}

/// A usage's history, read in one snapshot.
pub async fn usage_history(pool: &PgPool, id: &str) -> anyhow::Result<Option<UsageHistory>> {
    let mut tx = pool.begin().await.context("beginning a history read")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("beginning a history read")?;
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        usage: UsageRow,
        over_kafka: bool,
    }
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {USAGE_COLUMNS}, source_partition IS NOT NULL AS over_kafka FROM usages WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .context("reading a usage")?;
    let Some(row) = row else { return Ok(None) };
    let corrections: Vec<CorrectionRecord> = sqlx::query_as(
        "SELECT time, action, quantity, previous_quantity, by, reason FROM usage_corrections
         WHERE usage_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .context("reading a usage's corrections")?;
    tx.commit().await.context("ending a history read")?;
    Ok(Some(UsageHistory {
        usage: stored(row.usage),
        reported_over_kafka: row.over_kafka,
        corrections,
    }))
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
