//! Reading a subscription as committed, for the usage status
//! (`GET /subscriptions/{id}/usage`): no lock, one consistent snapshot.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::batch::{load_periods, SubscriptionRow, SUBSCRIPTION_COLUMNS};
use crate::domain::decision::SubscriptionState;

/// A subscription with its periods, read in one snapshot.
#[derive(Debug, Clone)]
pub struct SubscriptionRead {
    pub state: SubscriptionState,
    /// The invoice that billed each invoiced period, by period start.
    pub invoices: HashMap<DateTime<Utc>, String>,
    /// The database's clock at the read: it decides whether a period is
    /// closed, as for a decision.
    pub database_now: DateTime<Utc>,
}

/// The subscription `id` as committed, or `None` when it is not known.
pub async fn read_subscription(pool: &PgPool, id: &str) -> anyhow::Result<Option<SubscriptionRead>> {
    let mut tx = pool.begin().await.context("beginning the subscription read")?;
    // One snapshot for the three statements: the periods' `used` and the
    // trial's agree with each other.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("beginning the subscription read")?;
    let row: Option<SubscriptionRow> = sqlx::query_as(&format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .context("reading the subscription")?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut state = SubscriptionState::from(row);
    let (periods, database_now) = load_periods(&mut tx, &[id.to_owned()]).await?;
    state.periods = periods.into_iter().map(|(_, period)| period).collect();
    let invoices: Vec<(DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT start_time, invoice_id FROM service_periods WHERE subscription_id = $1 AND invoice_id IS NOT NULL",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .context("reading the invoiced periods")?;
    tx.commit().await.context("ending the subscription read")?;
    Ok(Some(SubscriptionRead {
        state,
        invoices: invoices.into_iter().collect(),
        database_now,
    }))
}
