//! Applying issued invoices: close the billed periods, stamp their usages,
//! and stage the period records that says (see `periods`). Each message
//! once, in offset order per partition (see `control`).

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

use super::control::{advance_positions, fresh_dead_letters, lock_positions, lock_subscription_rows, not_yet_applied};
use super::control::{ControlMessage, StoredPositions};
use super::outbox::{append, OutboxRecord};
use super::periods::{invoice_period, InvoicedPeriod, PeriodClosing};
use crate::domain::invoice::{InvoiceIssued, InvoiceItem};
use crate::domain::period_record::PeriodRecordKind;

/// What became of one invoice item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemResult {
    /// The period is closed and its usages carry the invoice ids; the number
    /// is how many usages this application stamped (0 on a replay).
    Applied(u64),
    UnknownSubscription,
    UnknownPeriod,
    /// Another invoice billed the period already: nothing changed.
    AlreadyInvoiced,
}

/// What an application of invoice messages did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoicesApplied {
    /// The item results of each invoice applied now, by its message offset.
    pub results: Vec<(i64, Vec<ItemResult>)>,
    /// Messages another reader of the group applied first.
    pub already_applied: usize,
    /// The stored positions after this application.
    pub positions: StoredPositions,
    /// The period records staged, by type.
    pub period_records: Vec<PeriodRecordKind>,
}

/// Applies the invoices no reader of the group applied yet, in order, stores
/// the dead letters produced for them, and moves the stored positions
/// forward, in one transaction. `dead_letters_for` is asked for the copy to
/// store given an invoice's item results; `closing` makes the period records.
#[allow(clippy::too_many_arguments)]
pub async fn apply_invoices(
    pool: &PgPool,
    group: &str,
    topic: &str,
    invoices: &[ControlMessage<InvoiceIssued>],
    closing: &PeriodClosing,
    mut dead_letters_for: impl FnMut(&ControlMessage<InvoiceIssued>, &[ItemResult]) -> Option<OutboxRecord>,
    invalid: &[OutboxRecord],
    positions: &[(i32, i64)],
) -> anyhow::Result<InvoicesApplied> {
    let mut tx = pool.begin().await.context("beginning invoice transaction")?;
    let partitions: Vec<i32> = positions.iter().map(|p| p.0).collect();
    let stored = lock_positions(&mut tx, group, topic, &partitions).await?;
    let todo: Vec<&ControlMessage<InvoiceIssued>> = invoices
        .iter()
        .filter(|m| not_yet_applied(&stored, m.partition, m.offset))
        .collect();
    let mut applied = InvoicesApplied {
        already_applied: invoices.len() - todo.len(),
        ..InvoicesApplied::default()
    };
    // The subscriptions' locks order this against decisions: no usage lands
    // in a period after it closed. All of them first, in id order.
    let ids: Vec<String> = todo
        .iter()
        .flat_map(|m| m.body.items.iter().map(|i| i.subscription_id.clone()))
        .collect();
    let known = lock_subscription_rows(&mut tx, &ids).await?;
    let mut dead_letters = fresh_dead_letters(invalid, topic, &stored);
    let mut period_records = Vec::new();
    for message in todo {
        let mut item_results = Vec::with_capacity(message.body.items.len());
        for item in &message.body.items {
            let result = if known.contains_key(&item.subscription_id) {
                apply_item(&mut tx, closing, &message.body, item, &mut period_records).await?
            } else {
                ItemResult::UnknownSubscription
            };
            item_results.push(result);
        }
        dead_letters.extend(dead_letters_for(message, &item_results));
        applied.results.push((message.offset, item_results));
    }
    // In source order: the invalid messages' copies and the unmatched
    // invoices' were gathered apart, and the stored batches of one source
    // partition must not overlap.
    dead_letters.sort_by_key(|r| r.source.as_ref().map(|s| (s.partition, s.offset)));
    // One append for all: it locks the outbox partitions in one order,
    // whatever order the items named them in.
    applied.period_records = period_records.iter().map(|r| r.0).collect();
    dead_letters.extend(period_records.into_iter().map(|r| r.1));
    append(&mut tx, &dead_letters).await?;
    applied.positions = advance_positions(&mut tx, group, topic, positions).await?;
    tx.commit().await.context("committing invoices")?;
    Ok(applied)
}

async fn apply_item(
    conn: &mut PgConnection,
    closing: &PeriodClosing,
    invoice: &InvoiceIssued,
    item: &InvoiceItem,
    period_records: &mut Vec<(PeriodRecordKind, OutboxRecord)>,
) -> anyhow::Result<ItemResult> {
    let records = match invoice_period(
        conn,
        closing,
        &item.subscription_id,
        item.period_start,
        &invoice.invoice_id,
    )
    .await?
    {
        InvoicedPeriod::Unknown => return Ok(ItemResult::UnknownPeriod),
        InvoicedPeriod::BilledByAnother => return Ok(ItemResult::AlreadyInvoiced),
        InvoicedPeriod::Billed(records) => records,
    };
    period_records.extend(records);
    let stamped = sqlx::query(
        "UPDATE usages SET invoice_id = $3, invoice_item_id = $4, updated_time = now()
         WHERE subscription_id = $1 AND period_start_time = $2 AND voided_time IS NULL
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
