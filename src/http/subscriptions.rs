//! `GET /subscriptions/{id}/usage`: the usage status of a subscription's
//! period (SPEC version 2), read as committed, so a caller of `POST
//! /usages` reads its own writes. `GET /subscriptions/{id}/periods`: its
//! periods with their state and totals.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};

use super::listing::invalid;
use super::problem::Problem;
use super::Api;
use crate::domain::event::parse_timestamp;
use crate::domain::status::usage_status;
use crate::domain::{ReasonCode, Rejection};
use crate::store::{read_periods, read_subscription};

/// The instant whose period is asked for: `?at=`, RFC 3339 with an offset.
const AT: &str = "at";

/// `GET /subscriptions/{id}/usage[?at=]`: 200 with the status; 404
/// `subscription_not_found`; 409 `no_service_period` when no period holds
/// the instant; 422 for an unusable `at`.
pub async fn usage(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let Path(id) = id.map_err(|_| Problem::not_found())?;
    let at = instant(query.as_deref())?.unwrap_or_else(Utc::now);
    let read = read_subscription(&api.pool, &id)
        .await
        .map_err(|e| Problem::unavailable(&e))?
        .ok_or_else(|| Problem::subscription_not_found(&id))?;
    let status = usage_status(&read.state, at, read.database_now, api.config.grace, |period| {
        read.invoices.get(&period.start).cloned()
    })
    .map_err(|_| {
        let rejection = Rejection::new(
            ReasonCode::NoServicePeriod,
            format!("no service period of subscription {id} contains {}", at.to_rfc3339()),
        );
        Problem::rejection(&rejection, None)
    })?;
    Ok(Json(status).into_response())
}

/// `GET /subscriptions/{id}/periods`: 200 with every period of the
/// subscription in start order, each with its state (`open`, `closed`,
/// `invoiced`, by the database's clock as for a decision), how and when it
/// closed, and its totals and digest as committed (for an open period, so
/// far); 404 `subscription_not_found`.
pub async fn periods(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let Path(id) = id.map_err(|_| Problem::not_found())?;
    let list = read_periods(&api.pool, &id, api.config.grace)
        .await
        .map_err(|e| Problem::unavailable(&e))?
        .ok_or_else(|| Problem::subscription_not_found(&id))?;
    Ok(Json(list).into_response())
}

/// The `at` parameter, if given once and valid.
fn instant(query: Option<&str>) -> Result<Option<DateTime<Utc>>, Problem> {
    let values: Vec<String> = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == AT)
        .map(|(_, value)| value.into_owned())
        .collect();
    match values.as_slice() {
        [] => Ok(None),
        [text] => parse_timestamp(text)
            .map(Some)
            .map_err(|message| Problem::invalid_query(vec![invalid(AT, &message)])),
        _ => Err(Problem::invalid_query(vec![invalid(AT, "must be given at most once")])),
    }
}
