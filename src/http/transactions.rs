//! The transactions behind `POST /usages`, `PUT /usages/{id}` and
//! `DELETE /usages/{id}`.
//!
//! A create gets the same decision as a Kafka message, in one PostgreSQL
//! transaction, through the same path as the pipeline
//! (`src/pipeline/stage.rs`): lock the subscription row, load the usage
//! stored under the id, decide and stage, then store the usage, `used`,
//! alerts and the outcome record together. The subscription's row lock is
//! what keeps concurrent requests, and the Kafka path deciding the same
//! subscription at the same time, under the limit: whoever holds it sees
//! every usage committed before it.
//!
//! Only creates, voids and amendments publish outcomes: a duplicate, an
//! unchanged correction or a rejected request changes nothing, and its
//! answer goes back to the caller alone.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{new_outcome_id, Api};
use crate::domain::correction::Correction;
use crate::domain::decision::{Decision, LimitReport, StoredUsage};
use crate::domain::event::UsageRequest;
use crate::domain::outcome::{Source, UsageBody};
use crate::domain::Rejection;
use crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;
use crate::metrics::TransactionKind;
use crate::pipeline::stage::{decide_and_stage, Decided, LockedState, Report, ReportRequest, StageContext};
use crate::store::{self, BatchTx};

/// How often a create that lost a race (the same new id inserted
/// concurrently for another subscription, a deadlock) is tried again.
const RACE_ATTEMPTS: u32 = 3;

/// What a decided create request is answered.
#[derive(Debug)]
pub enum CreateAnswer {
    /// Stored now; the outcome is in the outbox.
    Created(UsageBody),
    /// The same request was stored before: nothing changed.
    Duplicate(UsageBody),
    /// Refused by the limit decision: nothing changed, nothing published.
    Rejected {
        rejection: Rejection,
        limit: Option<LimitReport>,
    },
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
) -> Result<CreateAnswer, CreateFailure> {
    retrying_races("create", || try_create(api, request, id, now)).await
}

/// Runs a transaction, and runs it again (up to [`RACE_ATTEMPTS`] in all)
/// when it lost a race to a concurrent one; tells a refusal of the data
/// from an outage.
pub(super) async fn retrying_races<T, F, Fut>(what: &str, mut transaction: F) -> Result<T, CreateFailure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Ok(answer) => return Ok(answer),
            Err(e) if store::classify(&e) == store::FailureKind::Permanent => return Err(CreateFailure::Refused(e)),
            Err(e) if attempt < RACE_ATTEMPTS && lost_a_race(&e) => {
                tracing::debug!(error = format!("{e:#}"), attempt, "{what} lost a race; trying again");
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
pub(super) struct IdTaken(pub(super) String);

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

async fn try_create(api: &Api, request: &UsageRequest, id: &str, now: DateTime<Utc>) -> anyhow::Result<CreateAnswer> {
    let started = Instant::now();
    let sub_id = &request.subscription_id;
    let mut tx = BatchTx::begin(&api.pool).await?;
    let (subscriptions, database_now) = tx.lock_subscriptions_at(std::slice::from_ref(sub_id)).await?;
    let usages = tx.stored_usages(&[id.to_owned()]).await?;
    let mut state = LockedState {
        subscriptions,
        usages,
        database_now,
    };
    let report = Report {
        event_id: id.to_owned(),
        outcome_id: new_outcome_id(),
        request: ReportRequest::Usage {
            request,
            usage_time: request.effective_usage_time(now),
        },
        source: Source::Http { http: true },
        input: None,
        partition: api.partition_of(sub_id),
        key: None,
        dead_letter: None,
    };
    let staged = decide_and_stage(&stage_context(api), &mut state, [report], now)?;
    let Some(Decided { decision, outcome }) = staged.decided.into_iter().next() else {
        unreachable!("one report, one decision");
    };
    // A duplicate or a rejection writes nothing: dropping the transaction
    // rolls it back and releases the lock.
    match decision {
        Some(Decision::Duplicate { original }) => return Ok(CreateAnswer::Duplicate(UsageBody::from(&original))),
        Some(Decision::Rejected { rejection, limit }) => return Ok(CreateAnswer::Rejected { rejection, limit }),
        Some(Decision::Created { .. }) | None => {}
        Some(Decision::Voided { .. } | Decision::Amended { .. }) => unreachable!("a report corrects nothing"),
    }
    let collided = tx.insert_usages(&staged.writes.usages).await?;
    if !collided.is_empty() {
        return Err(anyhow::Error::new(IdTaken(id.to_owned())));
    }
    tx.write_staged(&staged.writes).await?;
    tx.commit().await?;
    api.metrics
        .observe_transaction(TransactionKind::HttpCreate, started.elapsed());
    let usage = outcome.usage.expect("a created outcome carries its usage");
    Ok(CreateAnswer::Created(usage))
}

/// What a decided correction is answered.
#[derive(Debug)]
pub enum CorrectAnswer {
    /// Voided now; the outcome is in the outbox.
    Voided,
    /// Amended now; the outcome is in the outbox.
    Amended(UsageBody),
    /// Nothing to change (a void of a voided usage, an amendment to the
    /// quantity it has or last asked for): nothing published.
    Unchanged(UsageBody),
    /// Refused: nothing changed, nothing published. `usage` is the usage as
    /// it was read, when there is one.
    Rejected {
        rejection: Rejection,
        limit: Option<LimitReport>,
        usage: Option<Box<StoredUsage>>,
    },
}

/// Decides and stores a void or an amendment by `caller` under the
/// subscription's lock, through the same path as a correction read from
/// Kafka, with its outcome in the outbox.
pub async fn correct_usage(
    api: &Api,
    correction: &Correction,
    caller: &str,
    now: DateTime<Utc>,
) -> Result<CorrectAnswer, CreateFailure> {
    retrying_races("correction", || try_correct(api, correction, caller, now)).await
}

async fn try_correct(
    api: &Api,
    correction: &Correction,
    caller: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<CorrectAnswer> {
    let started = Instant::now();
    let sub_id = &correction.subscription_id;
    let mut tx = BatchTx::begin(&api.pool).await?;
    let (subscriptions, database_now) = tx.lock_subscriptions_at(std::slice::from_ref(sub_id)).await?;
    let usages = tx.stored_usages(std::slice::from_ref(&correction.id)).await?;
    let before = usages.get(&correction.id).cloned();
    let mut state = LockedState {
        subscriptions,
        usages,
        database_now,
    };
    let report = Report {
        event_id: correction.id.clone(),
        outcome_id: new_outcome_id(),
        request: ReportRequest::Correction { correction, by: caller },
        source: Source::Http { http: true },
        input: None,
        partition: api.partition_of(sub_id),
        key: None,
        dead_letter: None,
    };
    let staged = decide_and_stage(&stage_context(api), &mut state, [report], now)?;
    let Some(Decided { decision, .. }) = staged.decided.first() else {
        unreachable!("one correction, one decision");
    };
    let answer = match decision {
        Some(Decision::Voided { .. }) => CorrectAnswer::Voided,
        Some(Decision::Amended { usage, .. }) => CorrectAnswer::Amended(UsageBody::from(usage)),
        Some(Decision::Duplicate { original }) => return Ok(CorrectAnswer::Unchanged(UsageBody::from(original))),
        Some(Decision::Rejected { rejection, limit }) => {
            return Ok(CorrectAnswer::Rejected {
                rejection: rejection.clone(),
                limit: limit.clone(),
                usage: before.map(Box::new),
            })
        }
        Some(Decision::Created { .. }) | None => unreachable!("a correction creates nothing"),
    };
    tx.write_staged(&staged.writes).await?;
    tx.commit().await?;
    api.metrics
        .observe_transaction(TransactionKind::HttpCorrect, started.elapsed());
    Ok(answer)
}

fn stage_context(api: &Api) -> StageContext<'_> {
    StageContext {
        results_topic: &api.config.results_topic,
        alerts_topic: &api.config.alerts_topic,
        grace: api.config.grace,
        max_record_bytes: PRODUCER_MAX_MESSAGE_BYTES,
    }
}
