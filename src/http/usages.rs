//! The `/usages` handlers: read the request, call the transaction, map the
//! result to a status code and a body.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::auth::Caller;
use super::idempotency::IdempotencyKey;
use super::listing::invalid;
use super::listing::{Cursor, ListQuery, TOTAL_CAP};
use super::problem::FieldProblem;
use super::problem::Problem;
use super::transactions::{correct_usage, create_usage, CorrectAnswer, CreateAnswer, CreateFailure};
use super::Api;
use crate::domain::correction::{check_reason, decode_report_body, Amendment, Correction, CorrectionAction};
use crate::domain::decision::{LimitReport, StoredUsage};
use crate::domain::event::{check_new_usage_id, DecodeContext, UsageRequest};
use crate::domain::ids::check_id;
use crate::domain::outcome::{
    format_time, serialize_decimal, serialize_opt_decimal, serialize_time, usage_path, OutcomeStatus, UsageBody,
};
use crate::domain::{ReasonCode, Rejection};
use crate::metrics::DecisionSource;
use crate::pipeline::decide::KAFKA_CALLER;
use crate::store::{self, UsageHistory};

/// `POST /usages`: 201 with `Location` when stored, 200 with the stored
/// usage when the same request was stored before. The id is the body's, or
/// derived from the `Idempotency-Key` header, or else a random one.
pub async fn create(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let (request, now) = read_report(&api, &headers, body)?;
    let (id, retry_finds_it) = match &request.id {
        Some(id) => (id.clone(), true),
        None => match IdempotencyKey::from_headers(&headers).map_err(|rejection| rejected(&api, &rejection, None))? {
            Some(key) => (key.usage_id(&caller), true),
            None => (new_usage_id(), false),
        },
    };
    create_answer(&api, &request, &id, now, retry_finds_it).await
}

/// Creates the usage and answers as `POST /usages` does.
async fn create_answer(
    api: &Api,
    request: &UsageRequest,
    id: &str,
    now: DateTime<Utc>,
    retry_finds_it: bool,
) -> Result<Response, Problem> {
    let answer = create_usage(api, request, id, now)
        .await
        .map_err(|failure| match failure {
            CreateFailure::Refused(e) => {
                tracing::warn!(error = format!("{e:#}"), "the database refused an HTTP usage");
                let rejection = Rejection::new(ReasonCode::Unprocessable, "the database refused this request's data");
                rejected(api, &rejection, None)
            }
            CreateFailure::Unavailable(e) => Problem::create_unavailable(&e, retry_finds_it),
        })?;
    let metrics = &api.metrics;
    match answer {
        CreateAnswer::Created(usage) => {
            metrics.record_decision(DecisionSource::Http, OutcomeStatus::Created, None);
            Ok(usage_response(StatusCode::CREATED, usage))
        }
        CreateAnswer::Duplicate(usage) => {
            metrics.record_decision(DecisionSource::Http, OutcomeStatus::Duplicate, None);
            Ok(usage_response(StatusCode::OK, usage))
        }
        CreateAnswer::Rejected { rejection, limit } => Err(rejected(api, &rejection, limit.as_ref())),
    }
}

/// `GET /usages/{id}`: a voided usage is not shown (404); its history is.
pub async fn get(State(api): State<Arc<Api>>, id: Result<Path<String>, PathRejection>) -> Result<Response, Problem> {
    let id = usage_id(id)?;
    match store::get_usage(&api.pool, &id).await {
        Ok(Some(usage)) if usage.voided.is_none() => Ok(Json(UsageBody::from(&usage)).into_response()),
        Ok(_) => Err(Problem::usage_not_found(&id)),
        Err(e) => Err(Problem::unavailable(&e)),
    }
}

/// `GET /usages/{id}/history`: the report, then every correction in the
/// order it was made; for voided usages too.
pub async fn history(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = usage_id(id)?;
    match store::usage_history(&api.pool, &id).await {
        Ok(Some(history)) => Ok(Json(history_entries(&history)).into_response()),
        Ok(None) => Err(Problem::usage_not_found(&id)),
        Err(e) => Err(Problem::unavailable(&e)),
    }
}

/// `GET /usages`, filtered and paginated (see [`super::listing`]).
pub async fn list(State(api): State<Arc<Api>>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    let query = ListQuery::parse(query.as_deref()).map_err(Problem::invalid_query)?;
    // One usage more than the page tells whether a next page exists.
    let (mut usages, total) = store::list_usages(&api.pool, &query.filter, &query.start(), query.limit + 1, TOTAL_CAP)
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let more = usages.len() as i64 > query.limit;
    usages.truncate(query.limit as usize);
    let next = match usages.last() {
        Some(last) if more => Some(Cursor {
            usage_time: last.usage_time,
            id: last.id.clone(),
        }),
        _ => None,
    };
    let body: Vec<UsageBody> = usages.iter().map(UsageBody::from).collect();
    Ok((query.headers(total, next.as_ref()), Json(body)).into_response())
}

/// `DELETE /usages/{id}[?reason=]`: voids the usage (204). Its quantity is
/// given back to its period, its row stays with who voided it and why, and
/// its id stays taken. A voided usage is 404; an invoiced one, or one whose
/// period is closed, is 409.
pub async fn delete(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let id = usage_id(id)?;
    let reason = void_reason(query.as_deref()).map_err(Problem::invalid_query)?;
    let subscription_id = match store::usage_subscription(&api.pool, &id).await {
        Ok(Some(subscription_id)) => subscription_id,
        Ok(None) => return Err(Problem::usage_not_found(&id)),
        Err(e) => return Err(Problem::unavailable(&e)),
    };
    let correction = Correction {
        id: id.clone(),
        subscription_id,
        action: CorrectionAction::Void { reason },
    };
    match correct(&api, &correction, &caller).await? {
        CorrectAnswer::Voided => {
            api.metrics
                .record_decision(DecisionSource::Http, OutcomeStatus::Voided, None);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        CorrectAnswer::Unchanged(_) => Err(Problem::usage_not_found(&id)),
        CorrectAnswer::Amended(_) => unreachable!("a void amends nothing"),
        CorrectAnswer::Rejected {
            rejection,
            limit,
            usage,
        } => Err(correction_problem(&api, &rejection, limit, usage)),
    }
}

/// `PUT /usages/{id}`: upserts as the seed's API does. A free id is created
/// (201) exactly as `POST /usages` with that id would; a stored usage is
/// amended to the body's `quantity` (200, the amended usage), or answered
/// 200 unchanged when nothing differs. `subscriptionId` must be the
/// usage's, `usageTime` cannot change, and the body's `id`, if any, must be
/// the path's.
pub async fn put(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let id = usage_id(id)?;
    let (request, now) = read_report(&api, &headers, body)?;
    if let Err(message) = check_id(&id) {
        let rejection = Rejection::on_field(ReasonCode::InvalidField, "id", format!("id {message}"));
        return Err(rejected(&api, &rejection, None));
    }
    if request.id.as_ref().is_some_and(|given| *given != id) {
        let rejection = Rejection::on_field(
            ReasonCode::InvalidField,
            "id",
            format!("id must be the path's {id:?} when given"),
        );
        return Err(rejected(&api, &rejection, None));
    }
    // A usage's subscription and time never change, and its row is never
    // deleted: what this read finds stays true under the lock.
    let stored = store::get_usage(&api.pool, &id)
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let Some(stored) = stored else {
        // A new usage: msg_ is the worker's own prefix, for Kafka events
        // without an id (an existing msg_ usage can be amended).
        check_new_usage_id(&id).map_err(|rejection| rejected(&api, &rejection, None))?;
        let request = UsageRequest {
            id: Some(id.clone()),
            ..request
        };
        return create_answer(&api, &request, &id, now, true).await;
    };
    // Times are written with milliseconds: the usage's time as the API
    // showed it is its time too.
    let unchanged = |t: &DateTime<Utc>| *t == stored.usage_time || *t == stored.usage_time.trunc_subsecs(3);
    if let Some(time) = request.usage_time.filter(|t| !unchanged(t)) {
        let rejection = Rejection::on_field(
            ReasonCode::InvalidField,
            "usageTime",
            format!(
                "usageTime cannot change: usage {id:?} is at {}, not {}",
                format_time(stored.usage_time),
                format_time(time)
            ),
        );
        return Err(rejected(&api, &rejection, None));
    }
    let correction = Correction {
        id: id.clone(),
        subscription_id: request.subscription_id.clone(),
        action: CorrectionAction::Amend(Amendment {
            quantity: request.quantity,
            accept_partial: request.accept_partial,
            previous_quantity: None,
        }),
    };
    match correct(&api, &correction, &caller).await? {
        CorrectAnswer::Amended(usage) => {
            api.metrics
                .record_decision(DecisionSource::Http, OutcomeStatus::Amended, None);
            Ok(usage_response(StatusCode::OK, usage))
        }
        CorrectAnswer::Unchanged(usage) => {
            api.metrics
                .record_decision(DecisionSource::Http, OutcomeStatus::Duplicate, None);
            Ok(usage_response(StatusCode::OK, usage))
        }
        CorrectAnswer::Voided => unreachable!("an amendment voids nothing"),
        CorrectAnswer::Rejected {
            rejection,
            limit,
            usage,
        } => Err(correction_problem(&api, &rejection, limit, usage)),
    }
}

async fn correct(api: &Api, correction: &Correction, caller: &Caller) -> Result<CorrectAnswer, Problem> {
    correct_usage(api, correction, caller.name(), request_time())
        .await
        .map_err(|failure| match failure {
            CreateFailure::Refused(e) => {
                tracing::warn!(error = format!("{e:#}"), "the database refused an HTTP correction");
                let rejection = Rejection::new(ReasonCode::Unprocessable, "the database refused this request's data");
                rejected(api, &rejection, None)
            }
            CreateFailure::Unavailable(e) => Problem::unavailable(&e),
        })
}

/// A refused correction; an invoiced usage's problem names the invoice.
fn correction_problem(
    api: &Api,
    rejection: &Rejection,
    limit: Option<LimitReport>,
    usage: Option<Box<StoredUsage>>,
) -> Problem {
    let problem = rejected(api, rejection, limit.as_ref());
    match usage
        .and_then(|u| u.invoice_id)
        .filter(|_| rejection.code == ReasonCode::UsageInvoiced)
    {
        Some(invoice_id) => problem.with("invoiceId", invoice_id),
        None => problem,
    }
}

/// The optional `?reason=` of a void.
fn void_reason(query: Option<&str>) -> Result<Option<String>, Vec<FieldProblem>> {
    let reasons: Vec<String> = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == "reason")
        .map(|(_, value)| value.into_owned())
        .collect();
    match reasons.as_slice() {
        [] => Ok(None),
        [reason] => match check_reason(reason) {
            Ok(()) => Ok(Some(reason.clone()).filter(|r| !r.is_empty())),
            Err(message) => Err(vec![invalid("reason", &message)]),
        },
        _ => Err(vec![invalid("reason", "must be given at most once")]),
    }
}

/// One entry of a usage's history.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HistoryEntry<'a> {
    #[serde(serialize_with = "serialize_time")]
    time: DateTime<Utc>,
    action: &'a str,
    #[serde(serialize_with = "serialize_decimal")]
    quantity: Decimal,
    #[serde(serialize_with = "serialize_opt_decimal")]
    previous_quantity: Option<Decimal>,
    by: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// The report (with the quantity it was counted at: the first correction's
/// previous quantity, else the usage's), then the corrections. The report
/// is by `kafka` or `http`, where it came from.
fn history_entries(history: &UsageHistory) -> Vec<HistoryEntry<'_>> {
    let UsageHistory {
        usage,
        reported_over_kafka,
        corrections,
    } = history;
    let reported = HistoryEntry {
        time: usage.created_time,
        action: "reported",
        quantity: corrections.first().map_or(usage.quantity, |c| c.previous_quantity),
        previous_quantity: None,
        by: if *reported_over_kafka { KAFKA_CALLER } else { "http" },
        reason: None,
    };
    std::iter::once(reported)
        .chain(corrections.iter().map(|c| HistoryEntry {
            time: c.time,
            action: &c.action,
            quantity: c.quantity,
            previous_quantity: Some(c.previous_quantity),
            by: &c.by,
            reason: c.reason.as_deref(),
        }))
        .collect()
}

/// A request body that must be a usage report (`POST`, `PUT`): JSON, read
/// whole, decoded and validated; with the time of the request.
fn read_report(
    api: &Api,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(UsageRequest, DateTime<Utc>), Problem> {
    if !is_json(headers) {
        return Err(Problem::unsupported_media_type());
    }
    let body = body.map_err(|rejection| body_problem(api, rejection))?;
    let now = request_time();
    let ctx = DecodeContext {
        request_time: now,
        max_future: api.config.max_future,
        max_payload_bytes: api.config.max_body_bytes,
    };
    let request = decode_report_body(&body, &ctx).map_err(|rejection| rejected(api, &rejection, None))?;
    Ok((request, now))
}

/// The time of the request, at the precision PostgreSQL stores, so that
/// what a create returns and what a later read returns are the same.
pub(super) fn request_time() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

pub(super) fn new_usage_id() -> String {
    format!("usg_{}", uuid::Uuid::new_v4().simple())
}

/// `application/json` bodies only (parameters such as `charset` aside); a
/// request without a `Content-Type` is refused too (SPEC: 415 also when the
/// header is missing).
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(value) = value.to_str() else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// A body that could not be read: over the limit (413), or cut short.
fn body_problem(api: &Api, rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        api.metrics.record_decision(
            DecisionSource::Http,
            OutcomeStatus::Rejected,
            Some(ReasonCode::PayloadTooLarge),
        );
        Problem::payload_too_large(api.config.max_body_bytes)
    } else {
        Problem::bad_request(rejection.body_text())
    }
}

fn rejected(api: &Api, rejection: &Rejection, limit: Option<&LimitReport>) -> Problem {
    api.metrics
        .record_decision(DecisionSource::Http, OutcomeStatus::Rejected, Some(rejection.code));
    Problem::rejection(rejection, limit)
}

/// An id that cannot even be decoded from the path (not UTF-8) names no
/// usage.
fn usage_id(id: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    id.map(|Path(id)| id).map_err(|_| Problem::not_found())
}

fn usage_response(status: StatusCode, usage: UsageBody) -> Response {
    let location = HeaderValue::from_str(&usage_path(&usage.id)).expect("a percent-encoded path is ASCII");
    (status, [(header::LOCATION, location)], Json(usage)).into_response()
}
