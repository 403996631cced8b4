//! The transactions behind `POST /usages` and `DELETE /usages/{id}`.
//!
//! A create gets the same decision as a Kafka message, in one PostgreSQL
//! transaction, with the same store calls as the pipeline
//! (`src/pipeline/decide.rs`): lock the subscription row, load the usage
//! stored under the id, `decide`, then store the usage, `used`, alerts and
//! the outcome record together. The subscription's row lock is what keeps
//! concurrent requests, and the Kafka path deciding the same subscription at
//! the same time, under the limit: whoever holds it sees every usage
//! committed before it.
//!
//! Only creates and deletes publish outcomes: a duplicate or a rejected
//! request changes nothing, and its answer goes back to the caller alone.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{new_outcome_id, Api};
use rust_decimal::Decimal;

use crate::domain::decision::{decide, Decision, LimitReached, LimitReport, StoredUsage, SubscriptionState};
use crate::domain::event::UsageRequest;
use crate::domain::outcome::{Alert, Outcome, Source, UsageBody};
use crate::domain::Rejection;
use crate::metrics::TransactionKind;
use crate::store::{self, BatchTx, Deletion, NewUsage, OutboxRecord};

/// How often a create that lost a race (the same new id inserted
/// concurrently for another subscription, a deadlock) is tried again.
const RACE_ATTEMPTS: u32 = 3;

/// What a create request came to.
#[derive(Debug)]
pub enum Created {
    /// Stored now; the outcome is in the outbox.
    New(UsageBody),
    /// The same request was stored before: nothing changed.
    Duplicate(UsageBody),
    Rejected(Rejection, Option<LimitReport>),
}

/// Why a create did not come to a decision.
#[derive(Debug)]
pub enum CreateFailure {
    /// The database refused the request's data (SQLSTATE class 22 or 54).
    Refused(anyhow::Error),
    /// The database is unavailable or slow: retryable, nothing changed.
    Unavailable(anyhow::Error),
}

/// Decides and stores a validated request. `id` is the request's id or one
/// made for it; `now` is the time of the request.
pub async fn create_usage(
    api: &Api,
    request: &UsageRequest,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Created, CreateFailure> {
    let mut attempt = 1;
    loop {
        match try_create(api, request, id, now).await {
            Ok(created) => return Ok(created),
            Err(e) if store::classify(&e) == store::FailureKind::Permanent => return Err(CreateFailure::Refused(e)),
            Err(e) if attempt < RACE_ATTEMPTS && lost_a_race(&e) => {
                tracing::debug!(error = format!("{e:#}"), attempt, "create lost a race; trying again");
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(CreateFailure::Unavailable(e)),
        }
    }
}

/// The usage id was inserted by a concurrent transaction (for another
/// subscription, or by the Kafka path) after this one looked it up.
#[derive(Debug, thiserror::Error)]
#[error("usage id {0:?} was inserted concurrently")]
struct IdTaken(String);

/// A conflict with a concurrent transaction rather than an outage: the id
/// taken meanwhile, a unique violation, a serialization failure or a
/// deadlock. The next attempt sees what the other transaction committed.
fn lost_a_race(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<IdTaken>()
            || match cause.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::Database(db)) => matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01")),
                _ => false,
            }
    })
}

async fn try_create(api: &Api, request: &UsageRequest, id: &str, now: DateTime<Utc>) -> anyhow::Result<Created> {
    let started = Instant::now();
    let sub_id = &request.subscription_id;
    let mut tx = BatchTx::begin(&api.pool).await?;
    let (mut subscriptions, database_now) = tx.lock_subscriptions_at(std::slice::from_ref(sub_id)).await?;
    let stored = tx.stored_usages(&[id.to_owned()]).await?;
    let usage_time = request.effective_usage_time(now);
    let decision = decide(
        request,
        usage_time,
        stored.get(id),
        subscriptions.get_mut(sub_id),
        database_now,
        api.config.grace,
    );
    // A duplicate or a rejection writes nothing: dropping the transaction
    // rolls it back and releases the lock.
    match &decision {
        Decision::Duplicate { original } => return Ok(Created::Duplicate(UsageBody::from(original))),
        Decision::Rejected { rejection, limit } => return Ok(Created::Rejected(rejection.clone(), limit.clone())),
        Decision::Created { .. } => {}
    }
    let subscription = &subscriptions[sub_id];
    let writes = Writes::of(api, request, id, &decision, subscription, now)?;
    let collided = tx.insert_usages(&[writes.usage]).await?;
    if !collided.is_empty() {
        return Err(anyhow::Error::new(IdTaken(id.to_owned())));
    }
    tx.update_used(&[writes.used]).await?;
    tx.update_trial_used(&[(subscription.id.clone(), subscription.trial_used)])
        .await?;
    tx.insert_alerts(&writes.alerts).await?;
    tx.append_outbox(&writes.outbox).await?;
    tx.commit().await?;
    api.metrics
        .observe_transaction(TransactionKind::HttpCreate, started.elapsed());
    let usage = writes.outcome.usage.expect("a created outcome carries its usage");
    Ok(Created::New(usage))
}

/// Everything a created usage writes.
struct Writes {
    usage: NewUsage,
    used: (String, DateTime<Utc>, Decimal),
    alerts: Vec<(String, DateTime<Utc>, String, LimitReached)>,
    outbox: Vec<OutboxRecord>,
    outcome: Outcome,
}

impl Writes {
    fn of(
        api: &Api,
        request: &UsageRequest,
        id: &str,
        decision: &Decision,
        subscription: &SubscriptionState,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Self> {
        let Decision::Created {
            quantity,
            requested_quantity,
            usage_time,
            period_start,
            period_end,
            alerts,
            ..
        } = decision
        else {
            unreachable!("only a created decision writes");
        };
        let period = subscription
            .periods
            .iter()
            .find(|p| p.start == *period_start)
            .expect("the decided period is one of the subscription's");
        let partition = api.partition_of(&subscription.id);
        let key = Some(subscription.id.clone().into_bytes());
        let mut outbox = Vec::with_capacity(1 + alerts.len());
        for reached in alerts {
            let alert = Alert::new(&subscription.id, *period_start, *period_end, reached, id, now);
            outbox.push(OutboxRecord {
                topic: api.config.alerts_topic.clone(),
                partition,
                key: key.clone(),
                payload: serde_json::to_vec(&alert)?,
                headers: alert.headers(),
                source: None,
            });
        }
        let outcome = Outcome::from_decision(
            new_outcome_id(),
            id.to_owned(),
            &subscription.id,
            decision,
            Source::Http { http: true },
            now,
        );
        outbox.push(OutboxRecord {
            topic: api.config.results_topic.clone(),
            partition,
            key,
            payload: serde_json::to_vec(&outcome)?,
            headers: outcome.headers(),
            source: None,
        });
        Ok(Self {
            usage: NewUsage {
                id: id.to_owned(),
                subscription_id: subscription.id.clone(),
                quantity: *quantity,
                requested_quantity: *requested_quantity,
                accept_partial: request.accept_partial,
                usage_time: *usage_time,
                period_start: *period_start,
                created_time: now,
                source_partition: None,
                source_offset: None,
            },
            used: (subscription.id.clone(), *period_start, period.used),
            alerts: alerts
                .iter()
                .map(|reached| (subscription.id.clone(), *period_start, id.to_owned(), reached.clone()))
                .collect(),
            outbox,
            outcome,
        })
    }
}

/// Deletes a usage no invoice counted, gives its quantity back and stores
/// its `deleted` outcome, in one transaction (see [`store::delete_usage`]).
pub async fn delete_usage(api: &Api, id: &str, now: DateTime<Utc>) -> anyhow::Result<Deletion> {
    let started = Instant::now();
    let deletion = store::delete_usage(&api.pool, id, api.config.grace, |usage| {
        Ok(vec![deleted_record(api, usage, now)?])
    })
    .await?;
    if matches!(deletion, Deletion::Deleted(_)) {
        api.metrics
            .observe_transaction(TransactionKind::HttpDelete, started.elapsed());
    }
    Ok(deletion)
}

/// The outbox record of a usage deleted through the API.
fn deleted_record(api: &Api, usage: &StoredUsage, now: DateTime<Utc>) -> anyhow::Result<OutboxRecord> {
    let outcome = Outcome::deleted(new_outcome_id(), usage, Source::Http { http: true }, now);
    Ok(OutboxRecord {
        topic: api.config.results_topic.clone(),
        partition: api.partition_of(&usage.subscription_id),
        key: Some(usage.subscription_id.clone().into_bytes()),
        payload: serde_json::to_vec(&outcome)?,
        headers: outcome.headers(),
        source: None,
    })
}
