//! Closed periods, for invoicing: the sweep that closes periods whose end
//! plus grace has passed, the records an invoice adds when it closes or
//! bills a period, and the listing of a subscription's periods.
//!
//! Exactly one closing record per period: it is appended to the outbox in
//! the transaction that marks the period recorded (`closed_by`), and the mark
//! is a conditional update (only where still unset) made under the
//! subscription's row lock, which every writer of a period's usage takes
//! first. So however many workers sweep, and whatever crashes or rolls back
//! in between, one transaction commits the mark and its record, or none
//! does and a later sweep tries again. Whether a period is closed is decided
//! by PostgreSQL's clock read under that lock (`clock_timestamp()`), as for
//! a decision: no decision commits into a period after its record summed it.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};

use super::batch::stored_pricing;
use super::control::lock_subscription_rows;
use super::outbox::{append, OutboxRecord};
use crate::domain::period_record::{
    ClosedBy, Closing, PeriodList, PeriodRecord, PeriodRecordKind, PeriodSummary, PeriodTotals, StoredPeriod,
};

/// What closing a period needs besides the database.
#[derive(Clone)]
pub struct PeriodClosing {
    /// A period closes for new usage at its end plus this.
    pub grace: chrono::Duration,
    /// The outbox record that publishes a period record (the pipeline knows
    /// the topic and its partitions).
    pub outbox_record: Arc<dyn Fn(&PeriodRecord) -> OutboxRecord + Send + Sync>,
}

/// What one sweep round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepRound {
    /// Periods found due (at most the round's limit): as many as the limit
    /// means more may wait.
    pub due: usize,
    /// The records staged, by type.
    pub staged: Vec<PeriodRecordKind>,
}

/// The columns of a period that its records and its listing need.
const PERIOD_COLUMNS: &str = "subscription_id, start_time, end_time, closed_time, invoice_id, closed_by,
     record_closed_time, pricing::text AS pricing";

#[derive(sqlx::FromRow)]
struct PeriodRow {
    subscription_id: String,
    start_time: DateTime<Utc>,
    end_time: Option<DateTime<Utc>>,
    closed_time: Option<DateTime<Utc>>,
    invoice_id: Option<String>,
    closed_by: Option<String>,
    record_closed_time: Option<DateTime<Utc>>,
    pricing: Option<String>,
}

impl PeriodRow {
    fn stored(self) -> anyhow::Result<StoredPeriod> {
        let recorded = match (self.closed_by.as_deref(), self.record_closed_time) {
            (Some(by), Some(time)) => Some(Closing {
                by: ClosedBy::parse(by).with_context(|| format!("a period closed by {by:?}"))?,
                time,
            }),
            _ => None,
        };
        let pricing = self
            .pricing
            .as_deref()
            .map(stored_pricing)
            .transpose()
            .with_context(|| {
                format!(
                    "reading the pricing of {}'s period starting {:?}",
                    self.subscription_id, self.start_time
                )
            })?;
        Ok(StoredPeriod {
            subscription_id: self.subscription_id,
            start: self.start_time,
            end: self.end_time,
            invoice_closed: self.closed_time,
            invoice_id: self.invoice_id,
            recorded,
            pricing,
        })
    }
}

/// A period to write records of: the closing record (`close`: it has none
/// yet) and an invoiced record (`invoiced_by`: the invoice that billed it
/// after it closed).
struct ToRecord {
    period: StoredPeriod,
    closing: Closing,
    close: bool,
    invoiced_by: Option<String>,
}

/// One sweep round: closes, each in this one transaction, up to `limit`
/// periods whose end plus grace has passed (or that an invoice closed) and
/// that have no closing record yet, oldest end first, and stages their
/// records.
pub async fn close_due_periods(pool: &PgPool, closing: &PeriodClosing, limit: i64) -> anyhow::Result<SweepRound> {
    let mut tx = pool.begin().await.context("beginning a period sweep")?;
    let grace_micros = closing.grace.num_microseconds().context("the grace time is too long")?;
    // Candidates by the statement's clock (an index can use it); whether
    // each is really due is decided again under the lock.
    let due: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT subscription_id, start_time FROM (
             (SELECT subscription_id, start_time, end_time FROM service_periods
              WHERE closed_by IS NULL AND end_time IS NOT NULL
                AND end_time <= statement_timestamp() - $1 * interval '1 microsecond'
              ORDER BY end_time LIMIT $2)
             UNION
             (SELECT subscription_id, start_time, end_time FROM service_periods
              WHERE closed_by IS NULL AND closed_time IS NOT NULL AND end_time IS NOT NULL
              ORDER BY subscription_id, start_time LIMIT $2)
         ) due
         ORDER BY end_time, subscription_id, start_time LIMIT $2",
    )
    .bind(grace_micros)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .context("finding periods due to close")?;
    let mut round = SweepRound {
        due: due.len(),
        staged: Vec::new(),
    };
    if due.is_empty() {
        return Ok(round);
    }
    // The subscriptions' locks (in id order), then the clock: a decision
    // that commits after this reads a later clock and finds the period
    // closed; one that committed before is in the totals.
    let ids: Vec<String> = due.iter().map(|(id, _)| id.clone()).collect();
    lock_subscription_rows(&mut tx, &ids).await?;
    let now = database_clock(&mut tx).await?;
    let rows: Vec<PeriodRow> = sqlx::query_as(&format!(
        "SELECT {PERIOD_COLUMNS} FROM service_periods p
         JOIN UNNEST($1::text[], $2::timestamptz[]) AS d(sub, start) ON p.subscription_id = d.sub AND p.start_time = d.start
         WHERE p.closed_by IS NULL
         ORDER BY p.subscription_id, p.start_time"
    ))
    .bind(&ids)
    .bind(due.iter().map(|(_, start)| *start).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await
    .context("reading periods due to close")?;
    let mut periods = Vec::with_capacity(rows.len());
    for row in rows {
        let period = row.stored()?;
        let Some(closed) = period.closing(closing.grace, now).filter(|_| period.end.is_some()) else {
            continue;
        };
        // A period invoiced after it closed by grace (before this release)
        // gets its invoiced record with its closing one.
        let invoiced_by = match closed.by {
            ClosedBy::Grace => period.invoice_id.clone(),
            ClosedBy::Invoice => None,
        };
        periods.push(ToRecord {
            period,
            closing: closed,
            close: true,
            invoiced_by,
        });
    }
    let records = write_records(&mut tx, closing, periods, now).await?;
    round.staged = records.iter().map(|r| r.0).collect();
    append(&mut tx, &records.into_iter().map(|r| r.1).collect::<Vec<_>>()).await?;
    tx.commit().await.context("committing a period sweep")?;
    Ok(round)
}

/// PostgreSQL's clock now (not the transaction's start).
async fn database_clock(conn: &mut PgConnection) -> anyhow::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(conn)
        .await
        .context("reading the database's clock")
}

/// Marks the periods to close as recorded (where still unmarked), and
/// makes the records of those marked and of those invoiced, each with the
/// period's totals: `(type, outbox record)`, in the order given.
async fn write_records(
    conn: &mut PgConnection,
    closing: &PeriodClosing,
    mut periods: Vec<ToRecord>,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<(PeriodRecordKind, OutboxRecord)>> {
    let to_close: Vec<&ToRecord> = periods.iter().filter(|p| p.close).collect();
    if !to_close.is_empty() {
        let marked: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE service_periods p SET closed_by = c.closed_by, record_closed_time = c.closed_at, recorded_time = $5
             FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::timestamptz[]) AS c(sub, start_time, closed_by, closed_at)
             WHERE p.subscription_id = c.sub AND p.start_time = c.start_time AND p.closed_by IS NULL
             RETURNING p.subscription_id, p.start_time",
        )
        .bind(to_close.iter().map(|p| p.period.subscription_id.as_str()).collect::<Vec<_>>())
        .bind(to_close.iter().map(|p| p.period.start).collect::<Vec<_>>())
        .bind(to_close.iter().map(|p| p.closing.by.as_str()).collect::<Vec<_>>())
        .bind(to_close.iter().map(|p| p.closing.time).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&mut *conn)
        .await
        .context("marking periods closed")?;
        // Under the subscription's lock every period is still unmarked; one
        // that is not was recorded by someone else, and keeps that record.
        periods.retain(|p| {
            !p.close
                || marked
                    .iter()
                    .any(|(sub, start)| *sub == p.period.subscription_id && *start == p.period.start)
        });
    }
    if periods.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<(String, DateTime<Utc>)> = periods
        .iter()
        .map(|p| (p.period.subscription_id.clone(), p.period.start))
        .collect();
    let mut totals = period_totals(conn, &keys).await?;
    let mut records = Vec::new();
    for p in &periods {
        let Some(closed) = p.period.closed(p.closing) else {
            continue;
        };
        let totals = totals
            .remove(&(p.period.subscription_id.clone(), p.period.start))
            .unwrap_or_else(|| PeriodTotals::of([]));
        if p.close {
            let record = PeriodRecord::closed(&closed, &totals, p.period.invoice_id.as_deref());
            records.push((record.kind, (closing.outbox_record)(&record)));
        }
        if let Some(invoice_id) = &p.invoiced_by {
            let record = PeriodRecord::invoiced(&closed, &totals, invoice_id);
            records.push((record.kind, (closing.outbox_record)(&record)));
        }
    }
    Ok(records)
}

/// The totals of these periods (by subscription and start) from their
/// usages as committed; a period without usage is absent.
async fn period_totals(
    conn: &mut PgConnection,
    periods: &[PeriodKey],
) -> anyhow::Result<HashMap<PeriodKey, PeriodTotals>> {
    let rows: Vec<(String, DateTime<Utc>, String, Decimal, bool)> = sqlx::query_as(
        "SELECT u.subscription_id, u.period_start_time, u.id, u.quantity, u.voided_time IS NOT NULL
         FROM usages u
         JOIN UNNEST($1::text[], $2::timestamptz[]) AS p(sub, start)
           ON u.subscription_id = p.sub AND u.period_start_time = p.start",
    )
    .bind(periods.iter().map(|p| p.0.as_str()).collect::<Vec<_>>())
    .bind(periods.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .context("summing the periods' usages")?;
    Ok(totals_by_period(rows))
}

/// A usage as the totals read it: its period (subscription, start), id,
/// quantity and whether it is voided.
type UsageLine = (String, DateTime<Utc>, String, Decimal, bool);

/// A period: its subscription and start.
type PeriodKey = (String, DateTime<Utc>);

fn totals_by_period(rows: Vec<UsageLine>) -> HashMap<PeriodKey, PeriodTotals> {
    let mut grouped: HashMap<PeriodKey, Vec<(String, Decimal, bool)>> = HashMap::new();
    for (sub, start, id, quantity, voided) in rows {
        grouped.entry((sub, start)).or_default().push((id, quantity, voided));
    }
    grouped
        .into_iter()
        .map(|(key, usages)| {
            let totals = PeriodTotals::of(usages.iter().map(|(id, q, v)| (id.as_str(), *q, *v)));
            (key, totals)
        })
        .collect()
}

/// What an invoice item did to its period.
pub(super) enum InvoicedPeriod {
    /// No such period.
    Unknown,
    /// Another invoice billed it already: nothing changes.
    BilledByAnother,
    /// This invoice billed it (now or before); its records, if this is the
    /// first time.
    Billed(Vec<(PeriodRecordKind, OutboxRecord)>),
}

/// Closes the period (if still open) and names the invoice that billed it,
/// and makes the records that says: when the invoice closes a period without
/// a closing record, that record (closed by the invoice, or by grace when
/// its end plus grace had passed first, then an invoiced record); when the
/// period had its closing record, an invoiced record. Applying the same
/// invoice again makes none. The caller holds the subscription's lock.
pub(super) async fn invoice_period(
    conn: &mut PgConnection,
    closing: &PeriodClosing,
    subscription_id: &str,
    start: DateTime<Utc>,
    invoice_id: &str,
) -> anyhow::Result<InvoicedPeriod> {
    let now = database_clock(conn).await?;
    let row: Option<PeriodRow> = sqlx::query_as(&format!(
        "SELECT {PERIOD_COLUMNS} FROM service_periods WHERE subscription_id = $1 AND start_time = $2"
    ))
    .bind(subscription_id)
    .bind(start)
    .fetch_optional(&mut *conn)
    .await
    .context("reading the invoiced period")?;
    let Some(row) = row else {
        return Ok(InvoicedPeriod::Unknown);
    };
    let mut period = row.stored()?;
    match period.invoice_id.as_deref() {
        Some(billed) if billed != invoice_id => return Ok(InvoicedPeriod::BilledByAnother),
        Some(_) => return Ok(InvoicedPeriod::Billed(Vec::new())),
        None => {}
    }
    sqlx::query(
        "UPDATE service_periods SET closed_time = coalesce(closed_time, $3), invoice_id = $4
         WHERE subscription_id = $1 AND start_time = $2",
    )
    .bind(subscription_id)
    .bind(start)
    .bind(now)
    .bind(invoice_id)
    .execute(&mut *conn)
    .await
    .context("closing the invoiced period")?;
    period.invoice_closed = period.invoice_closed.or(Some(now));
    period.invoice_id = Some(invoice_id.to_owned());
    let to_record = match period.recorded {
        Some(recorded) => ToRecord {
            period,
            closing: recorded,
            close: false,
            invoiced_by: Some(invoice_id.to_owned()),
        },
        None => {
            let Some(closed) = period.closing(closing.grace, now) else {
                return Ok(InvoicedPeriod::Billed(Vec::new()));
            };
            if period.end.is_none() {
                // The open-ended period: its record waits for an end.
                return Ok(InvoicedPeriod::Billed(Vec::new()));
            }
            ToRecord {
                invoiced_by: (closed.by == ClosedBy::Grace).then(|| invoice_id.to_owned()),
                period,
                closing: closed,
                close: true,
            }
        }
    };
    let records = write_records(conn, closing, vec![to_record], now).await?;
    Ok(InvoicedPeriod::Billed(records))
}

/// The periods of subscription `id` with their totals, in start order, read
/// in one snapshot; `None` when the subscription is not known.
pub async fn read_periods(pool: &PgPool, id: &str, grace: chrono::Duration) -> anyhow::Result<Option<PeriodList>> {
    let mut tx = pool.begin().await.context("beginning the periods read")?;
    // One snapshot: the periods and their usages agree.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("beginning the periods read")?;
    let known: Option<String> = sqlx::query_scalar("SELECT id FROM subscriptions WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .context("reading the subscription")?;
    if known.is_none() {
        return Ok(None);
    }
    let now = database_clock(&mut tx).await?;
    let rows: Vec<PeriodRow> = sqlx::query_as(&format!(
        "SELECT {PERIOD_COLUMNS} FROM service_periods WHERE subscription_id = $1 ORDER BY start_time"
    ))
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .context("reading the periods")?;
    let usages: Vec<UsageLine> = sqlx::query_as(
        "SELECT subscription_id, period_start_time, id, quantity, voided_time IS NOT NULL
         FROM usages WHERE subscription_id = $1",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .context("reading the periods' usages")?;
    tx.commit().await.context("ending the periods read")?;
    let mut totals = totals_by_period(usages);
    let mut periods = Vec::with_capacity(rows.len());
    for row in rows {
        let period = row.stored()?;
        let period_totals = totals
            .remove(&(period.subscription_id.clone(), period.start))
            .unwrap_or_else(|| PeriodTotals::of([]));
        periods.push(PeriodSummary::of(&period, period_totals, grace, now));
    }
    Ok(Some(PeriodList {
        subscription_id: id.to_owned(),
        periods,
    }))
}
