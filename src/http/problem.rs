//! Errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Every problem carries `type`, `title`, `status` and `detail`, plus `code`:
//! the reason code of SPEC (`usage_limit_exceeded`, ...) or one of the API's
//! own (`usage_not_found`, `unauthorized`, ...). Clients switch on `code`.
//! `type` is [`PROBLEM_TYPE_BASE`] followed by the code: an identifier, not
//! a page to fetch (RFC 9457 §3.1.1 allows that).
//!
//! Status codes: field and body errors and an unknown subscription are 422
//! with `invalidFields`; limit, period, status and idempotency conflicts are
//! 409; a body over the limit is 413; a database that does not answer is 503
//! with `Retry-After`, never a rejection.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::domain::decision::LimitReport;
use crate::domain::outcome::{Exact, LimitBlock};
use crate::domain::{ReasonCode, Rejection};

/// Prefix of every problem `type`.
pub const PROBLEM_TYPE_BASE: &str = "https://usage-worker.dev/problems/";

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

/// One problem response.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    /// Kept as JSON text, so that quantities stay exact decimals.
    extensions: Vec<(String, Box<RawValue>)>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// One wrong field or query parameter, as `invalidFields` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldProblem {
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            title,
            detail: detail.into(),
            extensions: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Adds an extension member.
    pub fn with(mut self, name: &str, value: impl Serialize) -> Self {
        let value = serde_json::value::to_raw_value(&value).expect("problem extensions serialize");
        self.extensions.push((name.to_owned(), value));
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    /// A rejected usage request: the reason code decides the status.
    pub fn rejection(rejection: &Rejection, limit: Option<&LimitReport>) -> Self {
        let code = rejection.code;
        let status = status_of(code);
        let mut problem = Self::new(status, code.as_str(), title_of(code), rejection.message.clone());
        if let Some(field) = rejection.field {
            problem = problem.with("field", field);
        }
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            problem = problem.with("invalidFields", invalid_fields(rejection));
        }
        if let Some(limit) = limit {
            problem = problem
                .with("available", Exact(limit.available))
                .with("limit", LimitBlock::from(limit));
        }
        problem
    }

    /// Query parameters that cannot be used.
    pub fn invalid_query(fields: Vec<FieldProblem>) -> Self {
        let detail = fields.first().map(|f| f.message.clone()).unwrap_or_default();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ReasonCode::InvalidField.as_str(),
            title_of(ReasonCode::InvalidField),
            detail,
        )
        .with("invalidFields", fields)
    }

    pub fn usage_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "usage_not_found",
            "Usage not found",
            format!("no usage has the id {id:?}"),
        )
    }

    /// A subscription path that names no known subscription (a usage body
    /// naming one is a 422, see [`status_of`]).
    pub fn subscription_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ReasonCode::SubscriptionNotFound.as_str(),
            title_of(ReasonCode::SubscriptionNotFound),
            format!("no subscription has the id {id:?}"),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ReasonCode::PayloadTooLarge.as_str(),
            title_of(ReasonCode::PayloadTooLarge),
            format!("the body is over the limit of {limit} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Unsupported media type",
            "the body must be JSON (Content-Type: application/json)",
        )
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", "Bad request", detail)
    }

    /// No credentials, or the wrong ones. `challenge` is the
    /// `WWW-Authenticate` value (RFC 6750).
    pub fn unauthorized(detail: &str, challenge: &'static str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
            detail,
        )
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge))
    }

    /// A valid token that lacks the route's scope (RFC 6750
    /// `insufficient_scope`).
    pub fn insufficient_scope(caller: &str, scope: &str) -> Self {
        let challenge = format!(r#"Bearer realm="usage-worker", error="insufficient_scope", scope="{scope}""#);
        Self::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "Insufficient scope",
            format!("the token of {caller:?} lacks the scope {scope}"),
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&challenge).expect("a scope is a header-safe token"),
        )
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            "no resource at this path",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
            "this resource does not support the method",
        )
    }

    /// A request not answered within `http.request_timeout_ms`. Its work
    /// was dropped: an open transaction rolled back, unless the timeout
    /// came while its commit was on the way, so a create may be stored.
    pub fn request_timeout(limit: std::time::Duration) -> Self {
        tracing::warn!(timeout_ms = limit.as_millis(), "HTTP request timed out");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            "Request timed out",
            format!(
                "the request was not answered within {} ms; its transaction was rolled back unless it was \
                 already committing, so a usage may have been stored: retry the same request with the same id \
                 or Idempotency-Key (a usage stored meanwhile is answered 200 and not counted again); a usage \
                 sent with neither may count twice if sent again",
                limit.as_millis()
            ),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS))
    }

    /// The database did not answer (or not in time): the request changed
    /// nothing and may be sent again. The cause is logged, not returned.
    pub fn unavailable(error: &anyhow::Error) -> Self {
        tracing::warn!(error = format!("{error:#}"), "HTTP request failed on the database");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "Service unavailable",
            "the database is not available; nothing was changed, retry later",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS))
    }

    /// A create whose transaction failed or whose commit was not confirmed:
    /// the usage may or may not be stored. A retry under the same id finds
    /// it (200) and counts nothing twice; `retry_finds_it` says whether the
    /// request had such an id (its own, or one from `Idempotency-Key`).
    pub fn create_unavailable(error: &anyhow::Error, retry_finds_it: bool) -> Self {
        let detail = if retry_finds_it {
            "the database is not available or did not confirm the write; retry the same request \
             (same id or Idempotency-Key): a usage stored meanwhile is answered 200 and not counted again"
        } else {
            "the database is not available or did not confirm the write, so the usage may have been \
             stored; this request had neither an id nor an Idempotency-Key, so a retry may count twice: \
             send one of them to retry safely"
        };
        let mut problem = Self::unavailable(error);
        problem.detail = detail.into();
        problem
    }
}

/// The problem document: the RFC 9457 members, then the extensions.
impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(5 + self.extensions.len()))?;
        map.serialize_entry("type", &format!("{PROBLEM_TYPE_BASE}{}", self.code))?;
        map.serialize_entry("title", self.title)?;
        map.serialize_entry("status", &self.status.as_u16())?;
        map.serialize_entry("detail", &self.detail)?;
        map.serialize_entry("code", self.code)?;
        for (name, value) in &self.extensions {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).expect("a problem serializes");
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body,
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().append(name, value);
        }
        response
    }
}

/// SPEC's mapping: what the client must fix is 422, what conflicts with the
/// state of the subscription or of the id is 409.
fn status_of(code: ReasonCode) -> StatusCode {
    match code {
        ReasonCode::MissingField
        | ReasonCode::InvalidField
        | ReasonCode::MalformedPayload
        | ReasonCode::UsageTimeInFuture
        | ReasonCode::SubscriptionNotFound
        | ReasonCode::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        ReasonCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ReasonCode::UsageNotFound => StatusCode::NOT_FOUND,
        ReasonCode::SubscriptionMismatch
        | ReasonCode::UsageVoided
        | ReasonCode::UsageInvoiced
        | ReasonCode::AmendConflict
        | ReasonCode::IdempotencyConflict
        | ReasonCode::SubscriptionNotActive
        | ReasonCode::NoServicePeriod
        | ReasonCode::PeriodClosed
        | ReasonCode::UsageLimitExceeded => StatusCode::CONFLICT,
    }
}

fn title_of(code: ReasonCode) -> &'static str {
    match code {
        ReasonCode::MissingField => "A required field is missing",
        ReasonCode::InvalidField => "A field is invalid",
        ReasonCode::MalformedPayload => "The body is not a usable JSON object",
        ReasonCode::PayloadTooLarge => "The body is too large",
        ReasonCode::UsageTimeInFuture => "The usage time is too far in the future",
        ReasonCode::IdempotencyConflict => "The id belongs to a different request",
        ReasonCode::SubscriptionNotFound => "Unknown subscription",
        ReasonCode::SubscriptionNotActive => "The subscription is not active",
        ReasonCode::NoServicePeriod => "No service period contains the usage time",
        ReasonCode::PeriodClosed => "The service period is closed",
        ReasonCode::UsageLimitExceeded => "Usage limit exceeded",
        ReasonCode::Unprocessable => "The database refused the request's data",
        ReasonCode::UsageNotFound => "Usage not found",
        ReasonCode::SubscriptionMismatch => "The usage belongs to another subscription",
        ReasonCode::UsageVoided => "The usage is voided",
        ReasonCode::UsageInvoiced => "The usage is invoiced",
        ReasonCode::AmendConflict => "The usage's quantity is not the one the amendment expects",
    }
}

/// Every wrong field; a rejection about one field that does not list any
/// (an unknown subscription) names that field; a malformed body names none.
fn invalid_fields(rejection: &Rejection) -> Vec<FieldProblem> {
    if !rejection.invalid_fields.is_empty() {
        return rejection
            .invalid_fields
            .iter()
            .map(|f| FieldProblem {
                field: f.field.to_owned(),
                code: f.code.as_str(),
                message: f.message.clone(),
            })
            .collect();
    }
    rejection
        .field
        .map(|field| FieldProblem {
            field: field.to_owned(),
            code: rejection.code.as_str(),
            message: rejection.message.clone(),
        })
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn body_of(problem: &Problem) -> serde_json::Value {
        serde_json::to_value(problem).unwrap()
    }

    #[test]
    fn an_unknown_subscription_is_422_on_subscription_id() {
        let rejection = Rejection::on_field(ReasonCode::SubscriptionNotFound, "subscriptionId", "unknown");
        let problem = Problem::rejection(&rejection, None);
        assert_eq!(problem.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = body_of(&problem);
        assert_eq!(body["invalidFields"][0]["field"], "subscriptionId");
        assert_eq!(body["code"], "subscription_not_found");
        assert_eq!(body["type"], "https://usage-worker.dev/problems/subscription_not_found");
    }

    #[test]
    fn conflicts_are_409_without_invalid_fields() {
        for code in [
            ReasonCode::IdempotencyConflict,
            ReasonCode::SubscriptionNotActive,
            ReasonCode::NoServicePeriod,
            ReasonCode::PeriodClosed,
            ReasonCode::UsageLimitExceeded,
        ] {
            let problem = Problem::rejection(&Rejection::new(code, "no"), None);
            assert_eq!(problem.status(), StatusCode::CONFLICT, "{code}");
            assert!(body_of(&problem).get("invalidFields").is_none());
        }
    }

    #[test]
    fn a_limit_problem_says_what_was_available_exactly() {
        let t = chrono::Utc::now();
        let limit = LimitReport {
            applied: crate::domain::decision::LimitKind::Hard,
            limit: Some(Decimal::new(10, 0)),
            used: Decimal::new(7500, 3),
            available: Decimal::new(2500, 3),
            amount: None,
            period_start: t,
            period_end: None,
        };
        let rejection = Rejection::on_field(ReasonCode::UsageLimitExceeded, "quantity", "too much");
        let text = serde_json::to_string(&Problem::rejection(&rejection, Some(&limit))).unwrap();
        assert!(text.contains(r#""available":2.5"#), "{text}");
        assert!(text.contains(r#""applied":"hardLimit""#), "{text}");
        assert!(
            !text.contains("Amount"),
            "no amount figures for a quantity limit: {text}"
        );

        let amount_limit = LimitReport {
            limit: None,
            amount: Some(crate::domain::decision::AmountFigures {
                limit_amount: Decimal::new(5, 0),
                used_amount: Decimal::new(375, 2),
                currency: "EUR".to_owned(),
            }),
            ..limit
        };
        let body = body_of(&Problem::rejection(&rejection, Some(&amount_limit)));
        let block = &body["limit"];
        assert_eq!(block["limitAmount"], serde_json::json!(5));
        assert_eq!(block["usedAmount"], serde_json::json!(3.75));
        assert_eq!(block["currency"], "EUR");
        assert!(
            block.get("limit").is_none(),
            "an amount limit has no quantity limit: {block}"
        );
    }

    #[test]
    fn a_malformed_body_lists_no_field() {
        let problem = Problem::rejection(&Rejection::new(ReasonCode::MalformedPayload, "not JSON"), None);
        assert_eq!(problem.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body_of(&problem)["invalidFields"], serde_json::json!([]));
    }
}
