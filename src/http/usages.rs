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

use super::auth::Caller;
use super::idempotency::IdempotencyKey;
use super::listing::ListQuery;
use super::problem::Problem;
use super::transactions::{create_usage, delete_usage, CreateAnswer, CreateFailure};
use super::Api;
use crate::domain::decision::LimitReport;
use crate::domain::event::{decode_usage_event, DecodeContext};
use crate::domain::outcome::{usage_path, OutcomeStatus, UsageBody};
use crate::domain::{ReasonCode, Rejection};
use crate::metrics::DecisionSource;
use crate::store::{self, Deletion};

/// `POST /usages`: 201 with `Location` when stored, 200 with the stored
/// usage when the same request was stored before. The id is the body's, or
/// derived from the `Idempotency-Key` header, or else a random one.
pub async fn create(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    if !is_json(&headers) {
        return Err(Problem::unsupported_media_type());
    }
    let body = body.map_err(|rejection| body_problem(&api, rejection))?;
    let now = request_time();
    let ctx = DecodeContext {
        request_time: now,
        max_future: api.config.max_future,
        max_payload_bytes: api.config.max_body_bytes,
    };
    let request = decode_usage_event(&body, &ctx).map_err(|rejection| rejected(&api, &rejection, None))?;
    let (id, retry_finds_it) = match &request.id {
        Some(id) => (id.clone(), true),
        None => match IdempotencyKey::from_headers(&headers).map_err(|rejection| rejected(&api, &rejection, None))? {
            Some(key) => (key.usage_id(&caller), true),
            None => (new_usage_id(), false),
        },
    };
    let answer = create_usage(&api, &request, &id, now)
        .await
        .map_err(|failure| match failure {
            CreateFailure::Refused(e) => {
                tracing::warn!(error = format!("{e:#}"), "the database refused an HTTP usage");
                let rejection = Rejection::new(ReasonCode::Unprocessable, "the database refused this request's data");
                rejected(&api, &rejection, None)
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
        CreateAnswer::Rejected { rejection, limit } => Err(rejected(&api, &rejection, limit.as_ref())),
    }
}

/// `GET /usages/{id}`.
pub async fn get(State(api): State<Arc<Api>>, id: Result<Path<String>, PathRejection>) -> Result<Response, Problem> {
    let id = usage_id(id)?;
    match store::get_usage(&api.pool, &id).await {
        Ok(Some(usage)) => Ok(Json(UsageBody::from(&usage)).into_response()),
        Ok(None) => Err(Problem::usage_not_found(&id)),
        Err(e) => Err(Problem::unavailable(&e)),
    }
}

/// `GET /usages`, filtered and paginated (see [`super::listing`]).
pub async fn list(State(api): State<Arc<Api>>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    let query = ListQuery::parse(query.as_deref()).map_err(Problem::invalid_query)?;
    let (usages, total) = store::list_usages(&api.pool, &query.filter, query.limit, query.offset)
        .await
        .map_err(|e| Problem::unavailable(&e))?;
    let body: Vec<UsageBody> = usages.iter().map(UsageBody::from).collect();
    Ok((query.headers(total), Json(body)).into_response())
}

/// `DELETE /usages/{id}`: 204, and the quantity is free again. A usage an
/// invoice counted, or whose period is closed, stays (409): the invoice is
/// computed from the closed period. The id is free again too: a later create
/// with it is a new usage, not a duplicate.
pub async fn delete(State(api): State<Arc<Api>>, id: Result<Path<String>, PathRejection>) -> Result<Response, Problem> {
    let id = usage_id(id)?;
    match delete_usage(&api, &id, request_time()).await {
        Ok(Deletion::Deleted(_)) => {
            api.metrics
                .record_decision(DecisionSource::Http, OutcomeStatus::Deleted, None);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Ok(Deletion::NotFound) => Err(Problem::usage_not_found(&id)),
        Ok(Deletion::Invoiced(usage)) => Err(Problem::usage_invoiced(
            &id,
            usage.invoice_id.as_deref().unwrap_or_default(),
        )),
        Ok(Deletion::PeriodClosed(_)) => Err(Problem::period_closed_for_delete(&id)),
        Err(e) => Err(Problem::unavailable(&e)),
    }
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
/// request without a `Content-Type` is read as JSON.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
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
