//! The HTTP face over the same core: `POST /usages` is decided by the same
//! functions and the same transaction shape as a Kafka message, and creates
//! and deletes reach `usage-results` through the same outbox. Next to the
//! worker (`usage-worker run`) or alone (`usage-worker serve`).
//!
//! Routes ([`routes`]): `/usages`, `/usages/{id}`, `/usages/{id}/history`,
//! `/usage-batches`, `/subscriptions/{id}/usage` and
//! `/subscriptions/{id}/periods`, each behind a scope when tokens are
//! configured ([`auth`]); `/healthz` and `/readyz` open, `/metrics` open
//! unless `http.metrics_requires_token`.
//!
//! Errors are RFC 9457 problem details ([`problem`]).

mod auth;
mod batches;
mod health;
mod idempotency;
pub mod listing;
pub mod problem;
mod subscriptions;
mod transactions;
mod usages;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{Partitioner, Scope, Settings};
use crate::kafka::partition::output_partition;
use crate::metrics::Metrics;
use auth::Callers;
use problem::Problem;

/// What the API needs to know besides the database.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    /// The body limit of `POST /usage-batches`.
    pub max_batch_bytes: usize,
    /// The configured tokens (none: everyone is anonymous).
    pub callers: Arc<Callers>,
    /// `/metrics` needs the `metrics:read` scope.
    pub metrics_requires_token: bool,
    /// How far after the request a `usageTime` may lie.
    pub max_future: chrono::Duration,
    /// A period closes for new usage at its end plus this.
    pub grace: chrono::Duration,
    pub results_topic: String,
    pub alerts_topic: String,
    /// Partition count of `usage-events`, and so of every output topic.
    pub partitions: i32,
    /// How the producers of `usage-events` pick a key's partition.
    pub partitioner: Partitioner,
    pub ready_max_outbox_backlog: i64,
    /// `/readyz` also requires the consumer's assignment (`run`, not `serve`).
    pub requires_assignment: bool,
    /// The server's limits against slow and numerous clients.
    pub limits: ServerLimits,
}

/// How the server bounds what clients hold: see [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A connection whose request head (line and headers) is not complete
    /// this long after the server began reading it is closed; an idle
    /// keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// A request not answered this long after its head was read is
    /// answered 503 `request_timeout` and its work dropped.
    pub request_timeout: Duration,
    /// Connections served at once; the rest wait in the listen queue.
    pub max_connections: usize,
}

impl ServerLimits {
    /// How long a graceful shutdown waits for the requests in flight: each
    /// ends within the request timeout, and a little more lets its answer
    /// be written. Connections still open after it are dropped.
    pub fn drain(&self) -> Duration {
        self.request_timeout + Duration::from_secs(1)
    }
}

impl ApiConfig {
    pub fn from_settings(settings: &Settings, partitions: i32, requires_assignment: bool) -> Self {
        Self {
            max_body_bytes: settings.http.max_body_bytes,
            max_batch_bytes: settings.http.max_batch_bytes,
            callers: Arc::new(
                Callers::from_settings(&settings.http).expect("http.tokens are checked when settings load"),
            ),
            metrics_requires_token: settings.http.metrics_requires_token,
            max_future: settings.pipeline.max_future(),
            grace: settings.pipeline.period_grace(),
            results_topic: settings.topics.usage_results.clone(),
            alerts_topic: settings.topics.usage_alerts.clone(),
            partitions,
            partitioner: settings.kafka.partitioner,
            ready_max_outbox_backlog: settings.http.ready_max_outbox_backlog,
            requires_assignment,
            limits: ServerLimits {
                header_read_timeout: Duration::from_millis(settings.http.header_read_timeout_ms),
                request_timeout: Duration::from_millis(settings.http.request_timeout_ms),
                max_connections: settings.http.max_connections,
            },
        }
    }
}

/// The state every handler shares.
pub struct Api {
    pool: PgPool,
    config: ApiConfig,
    metrics: Arc<Metrics>,
}

impl Api {
    pub fn new(pool: PgPool, config: ApiConfig, metrics: Arc<Metrics>) -> Self {
        Self { pool, config, metrics }
    }

    /// The output partition of records about this subscription: where the
    /// producers of `usage-events` put its events.
    fn partition_of(&self, subscription_id: &str) -> i32 {
        output_partition(subscription_id, self.config.partitions, self.config.partitioner)
    }
}

/// An outcome id for an HTTP create or delete: HTTP requests have no source
/// coordinates to derive one from, and each outcome is published once.
fn new_outcome_id() -> String {
    format!("oc_{}", uuid::Uuid::new_v4().simple())
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A caller whose token has this scope, when tokens are configured.
    Scoped(Scope),
    /// `/metrics`: anyone, or with `http.metrics_requires_token` a caller
    /// with `metrics:read`.
    Metrics,
    /// Anyone: the probes.
    Open,
}

impl Access {
    /// The scope the route needs under this configuration, if any.
    pub fn scope(self, config: &ApiConfig) -> Option<Scope> {
        match self {
            Self::Scoped(scope) => Some(scope),
            Self::Metrics => config.metrics_requires_token.then_some(Scope::MetricsRead),
            Self::Open => None,
        }
    }
}

/// Which limit a route reads its request body under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// `http.max_body_bytes`: one usage body.
    Usage,
    /// `http.max_batch_bytes`: `POST /usage-batches`.
    Batch,
}

/// One route of the API: a method on a path template.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub body_limit: BodyLimit,
    handler: MethodRouter<Arc<Api>>,
}

impl Route {
    fn new<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Self
    where
        H: Handler<T, Arc<Api>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a method the router can filter on");
        Self {
            method,
            path,
            access,
            body_limit: BodyLimit::Usage,
            handler: on(filter, handler),
        }
    }

    fn with_body_limit(mut self, body_limit: BodyLimit) -> Self {
        self.body_limit = body_limit;
        self
    }
}

/// Every route the API serves; [`router`] is built from this list, so it is
/// also what the router serves.
pub fn routes() -> Vec<Route> {
    use Access::{Metrics, Open, Scoped};
    const READ: Access = Scoped(Scope::UsagesRead);
    const WRITE: Access = Scoped(Scope::UsagesWrite);
    const VOID: Access = Scoped(Scope::UsagesVoid);
    vec![
        Route::new(Method::GET, "/usages", READ, usages::list),
        Route::new(Method::POST, "/usages", WRITE, usages::create),
        Route::new(Method::GET, "/usages/{id}", READ, usages::get),
        Route::new(Method::PUT, "/usages/{id}", WRITE, usages::put),
        Route::new(Method::DELETE, "/usages/{id}", VOID, usages::delete),
        Route::new(Method::GET, "/usages/{id}/history", READ, usages::history),
        Route::new(Method::POST, "/usage-batches", WRITE, batches::create).with_body_limit(BodyLimit::Batch),
        Route::new(Method::GET, "/subscriptions/{id}/usage", READ, subscriptions::usage),
        Route::new(Method::GET, "/subscriptions/{id}/periods", READ, subscriptions::periods),
        Route::new(Method::GET, "/healthz", Open, health::healthz),
        Route::new(Method::GET, "/readyz", Open, health::readyz),
        Route::new(Method::GET, "/metrics", Metrics, health::metrics),
    ]
}

pub fn router(api: Arc<Api>) -> Router {
    let (guarded, open) = routes()
        .into_iter()
        .fold((Router::new(), Router::new()), |(guarded, open), route| {
            // A route's own limit is the inner layer, so it wins over
            // the router's default below.
            let handler = match route.body_limit {
                BodyLimit::Usage => route.handler,
                BodyLimit::Batch => route.handler.layer(DefaultBodyLimit::max(api.config.max_batch_bytes)),
            };
            match route.access.scope(&api.config) {
                Some(scope) => {
                    let guard = auth::Guard {
                        callers: api.config.callers.clone(),
                        scope,
                    };
                    let handler = handler.layer(middleware::from_fn_with_state(guard, auth::require_scope));
                    (guarded.route(route.path, handler), open)
                }
                None => (guarded, open.route(route.path, handler)),
            }
        });
    let guarded = guarded.layer(DefaultBodyLimit::max(api.config.max_body_bytes));
    Router::new()
        .merge(guarded)
        .merge(open)
        .fallback(|| async { Problem::not_found() })
        .method_not_allowed_fallback(|| async { Problem::method_not_allowed() })
        .layer(middleware::from_fn_with_state(api.clone(), deadline))
        .layer(middleware::from_fn_with_state(api.clone(), observe))
        .with_state(api)
}

/// Counts and times every request by method, route template and status,
/// each from a closed set: this runs before authentication, so nothing a
/// stranger sends may become a new series.
async fn observe(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let response = next.run(request).await;
    api.metrics
        .observe_http(method, &route, response.status().as_u16(), started.elapsed());
    response
}

/// Answers 503 `request_timeout` when the request is not answered within
/// `http.request_timeout_ms`, reading its body included. The handler's
/// future is dropped: a transaction it holds rolls back (sqlx rolls back a
/// dropped transaction before its connection is used again) and its row
/// locks go with it.
async fn deadline(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let limit = api.config.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::request_timeout(limit).into_response(),
    }
}

/// The method as a metric label: a standard method's name, or `other` for
/// any extension token.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    STANDARD
        .iter()
        .find(|standard| *standard == method)
        .map_or("other", |standard| standard.as_str())
}

/// Binds the configured address; a taken port stops start-up, naming it.
pub async fn bind(settings: &Settings) -> anyhow::Result<TcpListener> {
    let addr = settings.http.socket_addr()?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP API to {addr} (http.addr, HTTP_ADDR)"))
}

/// Serves the API on `listener` until `shutdown` resolves, then stops
/// accepting and lets the requests in flight finish.
///
/// Each connection is served on a task of its own under
/// [`ServerLimits`]: at most `max_connections` at once (the next one is
/// accepted when one closes; until then it waits in the kernel's listen
/// queue), each closed when a request head takes longer than
/// `header_read_timeout`, each request bounded by `request_timeout`. So
/// the wait for the requests in flight at shutdown is bounded by the
/// request timeout too; connections still open after it are dropped.
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("reading the HTTP listener's address")?;
    let limits = api.config.limits;
    tracing::info!(%addr, tokens = api.config.callers.count(), "HTTP API listening");
    let app = router(api);
    let mut connection = http1::Builder::new();
    connection
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // The connections' tasks, so that those left at the end are aborted.
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the connection slots are never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let served = graceful.watch(connection.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let drain = limits.drain();
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            ?drain,
            open = connections.len(),
            "HTTP connections still open at shutdown are dropped"
        );
        connections.shutdown().await;
    }
    tracing::info!("HTTP API stopped");
    Ok(())
}
