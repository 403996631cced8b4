//! Applying issued invoices: close the billed periods and stamp their usages.
//! Idempotent, like snapshots: every worker may apply every invoice.

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

use super::outbox::{append_once, OutboxRecord};
use super::snapshots::advance_positions;
use crate::domain::invoice::{InvoiceIssued, InvoiceItem};

/// What became of one invoice item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemResult {
    /// The period is closed and its usages carry the invoice ids; the number
    /// is how many usages this application stamped (0 on a replay).
    Applied(u64),
    UnknownSubscription,
    UnknownPeriod,
}

/// Applies the invoices in order, stores the dead letters produced for them
/// (once), and moves the stored positions forward, in one transaction.
/// `dead_letters_for` is asked for the copies to store given each invoice's
/// item results.
pub async fn apply_invoices(
    pool: &PgPool,
    group: &str,
    topic: &str,
    invoices: &[(usize, InvoiceIssued)],
    mut dead_letters_for: impl FnMut(usize, &[ItemResult]) -> Option<OutboxRecord>,
    invalid: &[OutboxRecord],
    positions: &[(i32, i64)],
) -> anyhow::Result<Vec<Vec<ItemResult>>> {
    let mut tx = pool.begin().await.context("beginning invoice transaction")?;
    let mut results = Vec::with_capacity(invoices.len());
    let mut dead_letters = invalid.to_vec();
    for (index, invoice) in invoices {
        let mut item_results = Vec::with_capacity(invoice.items.len());
        for item in &invoice.items {
            item_results.push(apply_item(&mut tx, invoice, item).await?);
        }
        dead_letters.extend(dead_letters_for(*index, &item_results));
        results.push(item_results);
    }
    append_once(&mut tx, &dead_letters).await?;
    advance_positions(&mut tx, group, topic, positions).await?;
    tx.commit().await.context("committing invoices")?;
    Ok(results)
}

async fn apply_item(
    conn: &mut PgConnection,
    invoice: &InvoiceIssued,
    item: &InvoiceItem,
) -> anyhow::Result<ItemResult> {
    // The subscription's lock orders this against batches deciding its usage:
    // no usage lands in the period after it closed.
    let known: Option<String> = sqlx::query_scalar("SELECT id FROM subscriptions WHERE id = $1 FOR UPDATE")
        .bind(&item.subscription_id)
        .fetch_optional(&mut *conn)
        .await
        .context("locking the invoiced subscription")?;
    if known.is_none() {
        return Ok(ItemResult::UnknownSubscription);
    }
    let period = sqlx::query(
        "UPDATE service_periods SET closed_time = coalesce(closed_time, now())
         WHERE subscription_id = $1 AND start_time = $2",
    )
    .bind(&item.subscription_id)
    .bind(item.period_start)
    .execute(&mut *conn)
    .await
    .context("closing the invoiced period")?;
    if period.rows_affected() == 0 {
        return Ok(ItemResult::UnknownPeriod);
    }
    let stamped = sqlx::query(
        "UPDATE usages SET invoice_id = $3, invoice_item_id = $4, updated_time = now()
         WHERE subscription_id = $1 AND period_start_time = $2
           AND (invoice_id IS DISTINCT FROM $3 OR invoice_item_id IS DISTINCT FROM $4)",
    )
    .bind(&item.subscription_id)
    .bind(item.period_start)
    .bind(&invoice.invoice_id)
    .bind(&item.invoice_item_id)
    .execute(&mut *conn)
    .await
    .context("stamping invoiced usages")?
    .rows_affected();
    Ok(ItemResult::Applied(stamped))
}
