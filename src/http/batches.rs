//! `POST /usage-batches`: up to [`MAX_USAGES`] usage bodies decided in
//! order, in one transaction, each answered as `POST /usages` would have
//! answered it at that point.
//!
//! The request body is `{"usages": [...]}`, read under its own limit
//! (`http.max_batch_bytes`). Each usage body is then read on its own, as
//! `POST /usages` reads its body (under `http.max_body_bytes`, with its ids
//! from the body, from `Idempotency-Key` as `<key>:<index>`, or random), so
//! a body that fails validation gets its own 4xx result and the others
//! still go.
//!
//! The transaction locks every subscription the bodies name, in id order,
//! then decides the bodies in order through the path `POST /usages` takes
//! (`src/pipeline/stage.rs`), each decision seeing the ones before it: the
//! same id twice is decided as a repeat, and two bodies that together pass
//! a limit are not both accepted. Created usages and their outcomes and
//! alerts are written together; duplicates and rejections write nothing.
//! When the database refuses that write for its data (SQLSTATE class 22 or
//! 54), the bodies are decided again, each written under its own savepoint,
//! so that only the bodies it refuses are answered 422 `unprocessable`.
//! Anything else that fails answers 503 for the whole request: nothing was
//! committed.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

use super::auth::Caller;
use super::idempotency::IdempotencyKey;
use super::problem::Problem;
use super::transactions::{retrying_races, CreateAnswer, CreateFailure, IdTaken};
use super::usages::{is_json, new_usage_id, request_time};
use super::{new_outcome_id, Api};
use crate::domain::correction::decode_report_body;
use crate::domain::decision::Decision;
use crate::domain::event::{DecodeContext, JsonObject, MalformedJson, UsageRequest};
use crate::domain::outcome::{OutcomeStatus, Source, UsageBody};
use crate::domain::quantity::json_kind;
use crate::domain::{ReasonCode, Rejection};
use crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;
use crate::metrics::{DecisionSource, TransactionKind};
use crate::pipeline::stage::{decide_and_stage, Decided, LockedState, Report, ReportRequest, StageContext};
use crate::store::{self, BatchTx, FailureKind, Savepoint, StagedWrites};

/// Most usage bodies in one batch.
pub const MAX_USAGES: usize = 1000;

/// The member of the request body that holds the usage bodies.
const USAGES: &str = "usages";

/// Before the batch's writes: where a refused write goes back to.
const BATCH_WRITES: Savepoint = Savepoint("batch_writes");

/// Before one body's writes, when the bodies are written one by one.
const BODY_WRITES: Savepoint = Savepoint("batch_body_writes");

/// `POST /usage-batches`: 200 with one result per usage body, in order.
pub async fn create(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    // Unlike `POST /usages` (which reads a body without a Content-Type as
    // JSON), a batch needs the header: SPEC's rule for request bodies.
    if !is_json(&headers) {
        return Err(Problem::unsupported_media_type());
    }
    let body = body.map_err(|rejection| body_problem(&api, rejection))?;
    let now = request_time();
    let usages = read_usages(&body).map_err(|rejection| Problem::rejection(&rejection, None))?;
    let ctx = DecodeContext {
        request_time: now,
        max_future: api.config.max_future,
        max_payload_bytes: api.config.max_body_bytes,
    };
    let key = IdempotencyKey::from_headers(&headers);
    let bodies: Vec<BatchBody> = usages
        .iter()
        .enumerate()
        .map(|(index, raw)| BatchBody::read(index, raw, &ctx, &key, &caller))
        .collect();
    let valid: Vec<ValidBody<'_>> = bodies
        .iter()
        .filter_map(|body| match &body.read {
            Ok((request, id)) => Some(ValidBody { request, id }),
            Err(_) => None,
        })
        .collect();
    let mut answers = match create_usages(&api, &valid, now).await {
        Ok(answers) => answers.into_iter(),
        Err(CreateFailure::Refused(e)) => {
            // Refused outside any one body's writes: nothing says whose data
            // it was.
            tracing::warn!(error = format!("{e:#}"), "the database refused a usage batch");
            let rejection = Rejection::new(ReasonCode::Unprocessable, "the database refused this batch's data");
            return Err(Problem::rejection(&rejection, None));
        }
        Err(CreateFailure::Unavailable(e)) => {
            let retry_finds_them = bodies.iter().all(|body| body.retry_finds_it);
            return Err(Problem::create_unavailable(&e, retry_finds_them));
        }
    };
    let results: Vec<BatchResult> = bodies
        .into_iter()
        .enumerate()
        .map(|(index, body)| {
            let answer = match body.read {
                Ok(_) => answers.next().expect("one answer per valid body"),
                Err(rejection) => CreateAnswer::Rejected { rejection, limit: None },
            };
            BatchResult::new(&api, index, answer)
        })
        .collect();
    Ok(Json(BatchAnswer { results }).into_response())
}

/// The usage bodies of a request body `{"usages": [...]}`: 1 to
/// [`MAX_USAGES`] of them, each still raw JSON (read one by one later, so
/// that one malformed body is that body's problem alone).
fn read_usages(body: &[u8]) -> Result<Vec<&RawValue>, Rejection> {
    let text = std::str::from_utf8(body).map_err(|_| MalformedJson::NotUtf8)?;
    let object = JsonObject::parse_outer(text)?;
    let Some(raw) = object.given(USAGES) else {
        return Err(Rejection::on_field(
            ReasonCode::MissingField,
            USAGES,
            format!("{USAGES} is required: an array of 1 to {MAX_USAGES} usage bodies"),
        ));
    };
    let usages: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| {
        invalid_usages(format!(
            "{USAGES} must be an array of usage bodies, got {}",
            json_kind(raw)
        ))
    })?;
    if usages.is_empty() || usages.len() > MAX_USAGES {
        return Err(invalid_usages(format!(
            "{USAGES} must hold 1 to {MAX_USAGES} usage bodies, got {}",
            usages.len()
        )));
    }
    Ok(usages)
}

fn invalid_usages(message: String) -> Rejection {
    Rejection::on_field(ReasonCode::InvalidField, USAGES, message)
}

/// A request body that could not be read: over `http.max_batch_bytes`
/// (413), or cut short.
fn body_problem(api: &Api, rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::payload_too_large(api.config.max_batch_bytes)
    } else {
        Problem::bad_request(rejection.body_text())
    }
}

/// One usage body of a batch, read as `POST /usages` reads its body.
struct BatchBody {
    /// The request and its usage id, or why it cannot be decided.
    read: Result<(UsageRequest, String), Rejection>,
    /// Whether a retry of the batch finds what this body stored: it has an
    /// id (its own or from the key), or stored nothing.
    retry_finds_it: bool,
}

impl BatchBody {
    fn read(
        index: usize,
        raw: &RawValue,
        ctx: &DecodeContext,
        key: &Result<Option<IdempotencyKey>, Rejection>,
        caller: &Caller,
    ) -> Self {
        let request = match decode_report_body(raw.get().as_bytes(), ctx) {
            Ok(request) => request,
            Err(rejection) => return Self::invalid(rejection),
        };
        let (id, retry_finds_it) = match (&request.id, key) {
            (Some(id), _) => (id.clone(), true),
            (None, Ok(Some(key))) => (key.for_index(index).usage_id(caller), true),
            (None, Ok(None)) => (new_usage_id(), false),
            (None, Err(rejection)) => return Self::invalid(rejection.clone()),
        };
        Self {
            read: Ok((request, id)),
            retry_finds_it,
        }
    }

    fn invalid(rejection: Rejection) -> Self {
        Self {
            read: Err(rejection),
            retry_finds_it: true,
        }
    }
}

/// A body that passed validation, to decide.
struct ValidBody<'a> {
    request: &'a UsageRequest,
    id: &'a str,
}

/// The response body.
#[derive(Debug, Serialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

/// What `POST /usages` would have answered for one body: its status, and
/// the usage (201, 200) or the problem.
#[derive(Debug, Serialize)]
struct BatchResult {
    index: usize,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

impl BatchResult {
    /// The result of one body; its decision is counted as `POST /usages`
    /// counts it.
    fn new(api: &Api, index: usize, answer: CreateAnswer) -> Self {
        let (status, usage, problem) = match answer {
            CreateAnswer::Created(usage) => {
                api.metrics
                    .record_decision(DecisionSource::Http, OutcomeStatus::Created, None);
                (StatusCode::CREATED, Some(usage), None)
            }
            CreateAnswer::Duplicate(usage) => {
                api.metrics
                    .record_decision(DecisionSource::Http, OutcomeStatus::Duplicate, None);
                (StatusCode::OK, Some(usage), None)
            }
            CreateAnswer::Rejected { rejection, limit } => {
                api.metrics
                    .record_decision(DecisionSource::Http, OutcomeStatus::Rejected, Some(rejection.code));
                let problem = match rejection.code {
                    // What `POST /usages` answers a body over the limit.
                    ReasonCode::PayloadTooLarge => Problem::payload_too_large(api.config.max_body_bytes),
                    _ => Problem::rejection(&rejection, limit.as_ref()),
                };
                (problem.status(), None, Some(problem))
            }
        };
        Self {
            index,
            status: status.as_u16(),
            usage,
            problem,
        }
    }
}

/// Decides and stores the valid bodies, in order, in one transaction: one
/// answer per body. A transaction that lost a race (a usage id inserted
/// concurrently, a deadlock) is tried again, as a create is.
async fn create_usages(
    api: &Api,
    bodies: &[ValidBody<'_>],
    now: DateTime<Utc>,
) -> Result<Vec<CreateAnswer>, CreateFailure> {
    if bodies.is_empty() {
        return Ok(Vec::new());
    }
    retrying_races("usage batch", || try_create_usages(api, bodies, now)).await
}

async fn try_create_usages(
    api: &Api,
    bodies: &[ValidBody<'_>],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<CreateAnswer>> {
    let started = Instant::now();
    let mut tx = BatchTx::begin(&api.pool).await?;
    let mut state = lock_and_load(&mut tx, bodies).await?;
    let mut writes = StagedWrites::default();
    let mut answers = Vec::with_capacity(bodies.len());
    for body in bodies {
        let (answer, staged) = decide(api, &mut state, body, now)?;
        writes.append(staged);
        answers.push(answer);
    }
    if writes.usages.is_empty() {
        // Duplicates and rejections only: nothing to write. Dropping the
        // transaction rolls it back and releases the locks.
        return Ok(answers);
    }
    tx.savepoint(BATCH_WRITES).await?;
    match write(&mut tx, &writes).await {
        Ok(()) => {}
        Err(e) if store::classify(&e) == FailureKind::Permanent => {
            tracing::warn!(
                error = format!("{e:#}"),
                "the database refused a usage batch's writes; writing its bodies one by one"
            );
            tx.rollback_to(BATCH_WRITES).await?;
            let state = lock_and_load(&mut tx, bodies).await?;
            answers = create_one_by_one(api, &mut tx, state, bodies, now).await?;
        }
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    api.metrics
        .observe_transaction(TransactionKind::HttpBatch, started.elapsed());
    Ok(answers)
}

/// Locks the bodies' subscriptions (in id order: see
/// [`BatchTx::lock_subscriptions_at`]) and loads them with the usages stored
/// under the bodies' ids.
async fn lock_and_load(tx: &mut BatchTx, bodies: &[ValidBody<'_>]) -> anyhow::Result<LockedState> {
    let subscription_ids: Vec<String> = bodies.iter().map(|body| body.request.subscription_id.clone()).collect();
    let (subscriptions, database_now) = tx.lock_subscriptions_at(&subscription_ids).await?;
    let ids: Vec<String> = bodies.iter().map(|body| body.id.to_owned()).collect();
    let usages = tx.stored_usages(&ids).await?;
    Ok(LockedState {
        subscriptions,
        usages,
        database_now,
    })
}

/// After a refused write: each body decided and written under its own
/// savepoint, so that a body the database refuses is taken back alone, and
/// the bodies after it are decided without it.
async fn create_one_by_one(
    api: &Api,
    tx: &mut BatchTx,
    mut state: LockedState,
    bodies: &[ValidBody<'_>],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<CreateAnswer>> {
    let mut answers = Vec::with_capacity(bodies.len());
    for body in bodies {
        let subscription_before = state.subscriptions.get(&body.request.subscription_id).cloned();
        let usage_before = state.usages.get(body.id).cloned();
        let (answer, writes) = decide(api, &mut state, body, now)?;
        if writes.usages.is_empty() {
            answers.push(answer);
            continue;
        }
        tx.savepoint(BODY_WRITES).await?;
        match write(tx, &writes).await {
            Ok(()) => {
                tx.release(BODY_WRITES).await?;
                answers.push(answer);
            }
            Err(e) if store::classify(&e) == FailureKind::Permanent => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    id = body.id,
                    "the database refused a usage of a batch"
                );
                tx.rollback_to(BODY_WRITES).await?;
                tx.release(BODY_WRITES).await?;
                // What deciding it changed, taken back too.
                if let Some(subscription) = subscription_before {
                    state
                        .subscriptions
                        .insert(body.request.subscription_id.clone(), subscription);
                }
                match usage_before {
                    Some(usage) => state.usages.insert(body.id.to_owned(), usage),
                    None => state.usages.remove(body.id),
                };
                answers.push(CreateAnswer::Rejected {
                    rejection: Rejection::new(ReasonCode::Unprocessable, "the database refused this request's data"),
                    limit: None,
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(answers)
}

/// Decides one body against `state` (which it updates) and stages what it
/// writes: nothing unless it is created, as for `POST /usages`.
fn decide(
    api: &Api,
    state: &mut LockedState,
    body: &ValidBody<'_>,
    now: DateTime<Utc>,
) -> anyhow::Result<(CreateAnswer, StagedWrites)> {
    let request = body.request;
    let report = Report {
        event_id: body.id.to_owned(),
        outcome_id: new_outcome_id(),
        request: ReportRequest::Usage {
            request,
            usage_time: request.effective_usage_time(now),
        },
        source: Source::Http { http: true },
        input: None,
        partition: api.partition_of(&request.subscription_id),
        key: None,
        dead_letter: None,
    };
    let ctx = StageContext {
        results_topic: &api.config.results_topic,
        alerts_topic: &api.config.alerts_topic,
        grace: api.config.grace,
        max_record_bytes: PRODUCER_MAX_MESSAGE_BYTES,
    };
    let staged = decide_and_stage(&ctx, state, [report], now)?;
    let mut decided = staged.decided.into_iter();
    let (Some(Decided { decision, outcome }), None) = (decided.next(), decided.next()) else {
        unreachable!("one report, one decision");
    };
    Ok(match decision {
        Some(Decision::Created { .. }) => {
            let usage = outcome.usage.expect("a created outcome carries its usage");
            (CreateAnswer::Created(usage), staged.writes)
        }
        Some(Decision::Duplicate { original }) => (
            CreateAnswer::Duplicate(UsageBody::from(&original)),
            StagedWrites::default(),
        ),
        Some(Decision::Rejected { rejection, limit }) => {
            (CreateAnswer::Rejected { rejection, limit }, StagedWrites::default())
        }
        Some(Decision::Voided { .. } | Decision::Amended { .. }) => unreachable!("a report corrects nothing"),
        None => unreachable!("a usage report is decided"),
    })
}

/// Writes what created bodies staged: the usages, then `used`, alerts and
/// outbox records. A usage id a concurrent transaction inserted meanwhile
/// is a lost race: the batch is decided again.
async fn write(tx: &mut BatchTx, writes: &StagedWrites) -> anyhow::Result<()> {
    let collided = tx.insert_usages(&writes.usages).await?;
    if let Some(id) = collided.into_iter().next() {
        return Err(anyhow::Error::new(IdTaken(id)));
    }
    tx.write_staged(writes).await?;
    Ok(())
}
