//! Probes and metrics: `GET /healthz` (the process answers), `GET /readyz`
//! (it can do its work), `GET /metrics` (Prometheus text format).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::problem::Problem;
use super::Api;
use crate::store;

/// A readiness check that takes longer than this has failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Alive: the process runs and its HTTP server answers. Nothing else is
/// checked, so that a database outage never gets the process restarted.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// What one readiness check found.
#[derive(Debug, Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(flatten)]
    figures: serde_json::Map<String, serde_json::Value>,
}

impl Check {
    fn pass() -> Self {
        Self {
            ok: true,
            detail: None,
            figures: Default::default(),
        }
    }

    fn fail(detail: impl Into<String>) -> Self {
        Self {
            ok: false,
            detail: Some(detail.into()),
            figures: Default::default(),
        }
    }

    fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        self.figures.insert(name.to_owned(), value);
        self
    }
}

/// Ready: the database answers, the outbox is being published (its backlog
/// is under `http.ready_max_outbox_backlog`), and, next to the worker, the
/// consumer holds an assignment (possibly empty: a standby replica still
/// serves the API). 200 with the checks, or a 503 problem that lists them.
pub async fn readyz(State(api): State<Arc<Api>>) -> Response {
    let (failing, checks) = readiness(&api).await;
    if failing.is_empty() {
        return Json(json!({"status": "ready", "checks": checks})).into_response();
    }
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "Not ready",
        format!("failing checks: {}", failing.join(", ")),
    )
    .with("checks", checks)
    .into_response()
}

/// Runs the readiness checks and sets the `ready` gauge: the names of the
/// checks that failed, and every check's findings.
async fn readiness(api: &Api) -> (Vec<&'static str>, serde_json::Map<String, serde_json::Value>) {
    let mut checks = serde_json::Map::new();
    let database = database_check(api).await;
    let outbox = if database.ok {
        outbox_check(api).await
    } else {
        Check::fail("not checked: the database does not answer")
    };
    let mut failing = Vec::new();
    for (name, check) in [("database", database), ("outbox", outbox)].into_iter().chain(
        api.config
            .requires_assignment
            .then(|| ("consumer", consumer_check(api))),
    ) {
        if !check.ok {
            failing.push(name);
        }
        checks.insert(name.to_owned(), serde_json::to_value(check).expect("checks serialize"));
    }
    api.metrics.set_ready(failing.is_empty());
    (failing, checks)
}

async fn database_check(api: &Api) -> Check {
    match tokio::time::timeout(CHECK_TIMEOUT, store::ping(&api.pool)).await {
        Ok(Ok(())) => Check::pass(),
        Ok(Err(e)) => {
            tracing::debug!(error = format!("{e:#}"), "readiness: the database does not answer");
            Check::fail("the database does not answer")
        }
        Err(_) => Check::fail(format!("the database did not answer within {CHECK_TIMEOUT:?}")),
    }
}

async fn outbox_check(api: &Api) -> Check {
    let max = api.config.ready_max_outbox_backlog;
    match tokio::time::timeout(CHECK_TIMEOUT, store::outbox_backlog(&api.pool)).await {
        Ok(Ok(per_topic)) => {
            let backlog: i64 = per_topic.iter().map(|(_, n)| n).sum();
            let check = if backlog < max {
                Check::pass()
            } else {
                Check::fail(format!("{backlog} outbox records wait to be published"))
            };
            check.with("backlog", backlog.into()).with("max", max.into())
        }
        Ok(Err(e)) => {
            tracing::debug!(error = format!("{e:#}"), "readiness: cannot read the outbox backlog");
            Check::fail("cannot read the outbox backlog")
        }
        Err(_) => Check::fail(format!("the outbox backlog was not read within {CHECK_TIMEOUT:?}")),
    }
}

fn consumer_check(api: &Api) -> Check {
    match api.metrics.assignment() {
        Some(partitions) => Check::pass().with("partitions", json!(partitions)),
        None => Check::fail("the consumer holds no assignment (starting, or rebalancing)"),
    }
}

/// Every metric, in the Prometheus text exposition format. Readiness is
/// checked first, so that `ready` is current on every scrape whether or
/// not anything probes `/readyz`.
pub async fn metrics(State(api): State<Arc<Api>>) -> Response {
    readiness(&api).await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        api.metrics.render(),
    )
        .into_response()
}
