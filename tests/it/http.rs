//! The HTTP API end to end, against a real PostgreSQL database: every status
//! code and problem body, idempotent creates, concurrent creates against one
//! limit, deletes, authentication, outcomes on `usage-results` with the
//! worker running, probes and metrics, and the `serve` and `run` commands.

use test_kit::wait_until;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use test_kit::{active_subscription, ApiServer, Reader, TestEnv, PARTITIONS};
use usage_worker::config::{Partitioner, Secret, Settings};
use usage_worker::domain::subscription::decode_snapshot;
use usage_worker::http::ApiConfig;
use usage_worker::kafka::partition::output_partition;
use usage_worker::metrics::Metrics;
use usage_worker::pipeline::sampler::Sampler;
use usage_worker::store::{self, apply_snapshots, ControlMessage, SnapshotChange};

const WAIT: Duration = Duration::from_secs(60);

/// An HTTP API served in-process on a free local port.
struct TestApi {
    server: ApiServer,
    client: reqwest::Client,
}

impl TestApi {
    async fn start(pool: sqlx::PgPool, config: ApiConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            server: ApiServer::start(pool, config, metrics).await,
            client: reqwest::Client::new(),
        }
    }

    /// The API alone (`serve`), with these settings.
    async fn serve(settings: &Settings) -> Self {
        let pool = store::connect(&settings.database).await.unwrap();
        let config = ApiConfig::from_settings(settings, PARTITIONS, false);
        Self::start(pool, config, Arc::new(Metrics::default())).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    async fn post(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/usages")).json(body).send().await.unwrap()
    }

    async fn post_raw(&self, content_type: &str, body: Vec<u8>) -> reqwest::Response {
        self.client
            .post(self.url("/usages"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /usages` with an `Idempotency-Key` header (any bytes) and
    /// optionally a bearer token.
    async fn post_keyed(&self, body: &Value, key: &[u8], token: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/usages"))
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(key).unwrap(),
            )
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    async fn delete(&self, id: &str) -> reqwest::Response {
        self.delete_with(id, "").await
    }

    async fn delete_with(&self, id: &str, query: &str) -> reqwest::Response {
        self.client
            .delete(self.url(&format!("/usages/{id}{query}")))
            .send()
            .await
            .unwrap()
    }

    async fn put(&self, id: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/usages/{id}")))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Stores a subscription snapshot directly, as the worker would.
pub(crate) async fn subscribe(env: &TestEnv, snapshot: Value) {
    let snapshot = decode_snapshot(snapshot.to_string().as_bytes()).unwrap();
    apply_snapshots(
        &env.pool,
        "test",
        "subscriptions",
        &[ControlMessage {
            partition: 0,
            offset: 0,
            body: SnapshotChange::Upsert(snapshot),
        }],
        &[],
        &[],
    )
    .await
    .unwrap();
}

fn days(n: i64) -> String {
    (Utc::now() + chrono::Duration::days(n)).to_rfc3339()
}

/// Checks the RFC 9457 members of a problem response and returns its body.
pub(crate) async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{:?}", response);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["type"],
        format!("https://usage-worker.dev/problems/{code}"),
        "{body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    body
}

fn invalid_fields(body: &Value) -> Vec<&str> {
    body["invalidFields"]
        .as_array()
        .unwrap_or_else(|| panic!("no invalidFields in {body}"))
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect()
}

async fn used(env: &TestEnv, subscription: &str) -> Decimal {
    sqlx::query_scalar("SELECT sum(used) FROM service_periods WHERE subscription_id = $1")
        .bind(subscription)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The outbox records stored for a topic: (partition, key, payload, headers).
async fn outbox(env: &TestEnv, topic: &str) -> Vec<(i32, String, Value, Value)> {
    let rows: Vec<(i32, Vec<u8>, Vec<u8>, String)> = sqlx::query_as(
        "SELECT partition, key, payload, headers::text FROM outbox WHERE topic = $1 ORDER BY created_time, seq",
    )
    .bind(topic)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(p, k, v, h)| {
            (
                p,
                String::from_utf8(k).unwrap(),
                serde_json::from_slice(&v).unwrap(),
                serde_json::from_str(&h).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_is_201_and_the_same_request_again_is_200_with_the_stored_usage() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let api = TestApi::serve(&env.settings()).await;

    let first = api
        .post(&json!({"id": "usg_1", "subscriptionId": "sub_a", "quantity": "2.500", "usageTime": days(-1)}))
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.headers()["location"], "/usages/usg_1");
    assert_eq!(first.headers()["content-type"], "application/json");
    let created: Value = first.json().await.unwrap();
    assert_eq!(created["id"], "usg_1");
    assert_eq!(created["quantity"], json!(2.5));
    assert_eq!(created["invoiceId"], Value::Null);
    assert_eq!(created["_links"], json!([{"href": "/usages/usg_1", "rel": "self"}]));

    // The same request (the quantity by value, usageTime left out): the
    // stored usage, nothing counted again.
    let again = api
        .post(&json!({"id": "usg_1", "subscriptionId": "sub_a", "quantity": 2.5}))
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["location"], "/usages/usg_1");
    assert_eq!(again.json::<Value>().await.unwrap(), created);
    let read = api.get("/usages/usg_1").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.json::<Value>().await.unwrap(), created);

    let conflict = api
        .post(&json!({"id": "usg_1", "subscriptionId": "sub_a", "quantity": 3}))
        .await;
    let body = problem(conflict, 409, "idempotency_conflict").await;
    assert_eq!(body["field"], "id");

    // Without an id the API makes one; an id needing escapes is escaped.
    let made = api.post(&json!({"subscriptionId": "sub_a", "quantity": 1})).await;
    assert_eq!(made.status(), StatusCode::CREATED);
    let location = made.headers()["location"].to_str().unwrap().to_owned();
    let made: Value = made.json().await.unwrap();
    let id = made["id"].as_str().unwrap();
    assert!(id.starts_with("usg_") && id.len() <= 50, "{id}");
    assert_eq!(location, format!("/usages/{id}"));
    let odd = api
        .post(&json!({"id": "a/b?c", "subscriptionId": "sub_a", "quantity": 1}))
        .await;
    assert_eq!(odd.headers()["location"], "/usages/a%2Fb%3Fc");
    assert_eq!(api.get("/usages/a%2Fb%3Fc").await.status(), StatusCode::OK);

    assert_eq!(used(&env, "sub_a").await, Decimal::new(45, 1));
    // One `created` outcome per create, keyed and partitioned by the
    // subscription, marked as coming from HTTP; nothing for the rest.
    let records = outbox(&env, "usage-results").await;
    assert_eq!(records.len(), 3, "{records:#?}");
    for (partition, key, outcome, headers) in &records {
        assert_eq!(*partition, output_partition("sub_a", PARTITIONS, Partitioner::Murmur2));
        assert_eq!(key, "sub_a");
        assert_eq!(outcome["status"], "created");
        assert_eq!(outcome["source"], json!({"http": true}));
        assert!(outcome["outcomeId"].as_str().unwrap().starts_with("oc_"));
        assert!(headers.to_string().contains("outcome-id"), "{headers}");
    }
    assert_eq!(records[0].2["usage"], created);
    api.shutdown().await;
}

/// `usg_` + the first 24 lowercase hex digits of SHA-256 of `text`.
fn derived_id(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("usg_{}", &hex[..24])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_retried_with_the_same_idempotency_key_counts_once() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let api = TestApi::serve(&env.settings()).await;
    let body = json!({"subscriptionId": "sub_a", "quantity": "1.5"});

    let first = api.post_keyed(&body, b"order-7781/line-2", None).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let expected = derived_id("order-7781/line-2");
    assert_eq!(expected.len(), 28);
    assert_eq!(first.headers()["location"], format!("/usages/{expected}"));
    let created: Value = first.json().await.unwrap();
    assert_eq!(created["id"], expected.as_str());

    // The retry after a lost answer finds the stored usage.
    let retry = api.post_keyed(&body, b"order-7781/line-2", None).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.json::<Value>().await.unwrap(), created);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 1);
    assert_eq!(used(&env, "sub_a").await, Decimal::new(15, 1));
    assert_eq!(outbox(&env, "usage-results").await.len(), 1);

    // The same key for a different request is a conflict, not a new usage.
    let other = api
        .post_keyed(
            &json!({"subscriptionId": "sub_a", "quantity": 2}),
            b"order-7781/line-2",
            None,
        )
        .await;
    let conflict = problem(other, 409, "idempotency_conflict").await;
    assert_eq!(conflict["field"], "id");

    // Another key is another usage; no key at all, a random id each time.
    let second = api.post_keyed(&body, b"order-7781/line-3", None).await;
    assert_eq!(second.status(), StatusCode::CREATED);
    assert_eq!(
        second.json::<Value>().await.unwrap()["id"],
        derived_id("order-7781/line-3").as_str()
    );
    let unkeyed: Vec<String> = [api.post(&body).await, api.post(&body).await]
        .into_iter()
        .map(|r| {
            assert_eq!(r.status(), StatusCode::CREATED);
            r.headers()["location"].to_str().unwrap().to_owned()
        })
        .collect();
    assert_ne!(unkeyed[0], unkeyed[1]);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 4);
    assert_eq!(used(&env, "sub_a").await, Decimal::new(60, 1));
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authenticated_callers_idempotency_key_is_scoped_to_its_name() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", None)).await;
    let mut settings = env.settings();
    settings.http.bearer_token = Some(Secret::new("s3cret"));
    let api = TestApi::serve(&settings).await;
    let body = json!({"subscriptionId": "sub_a", "quantity": 1});

    let first = api.post_keyed(&body, b"k-1", Some("s3cret")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let expected = derived_id("bearer_token:k-1");
    assert_eq!(first.json::<Value>().await.unwrap()["id"], expected.as_str());
    let retry = api.post_keyed(&body, b"k-1", Some("s3cret")).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], expected.as_str());
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 1);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_idempotency_key_is_422_naming_the_header() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", None)).await;
    let api = TestApi::serve(&env.settings()).await;
    let body = json!({"subscriptionId": "sub_a", "quantity": 1});

    let too_long = "k".repeat(256);
    for key in [&b""[..], too_long.as_bytes(), b"tab\there", b"caf\xc3\xa9"] {
        let response = api.post_keyed(&body, key, None).await;
        let body = problem(response, 422, "invalid_field").await;
        assert_eq!(body["field"], "Idempotency-Key", "{body}");
        assert_eq!(invalid_fields(&body), ["Idempotency-Key"], "{body}");
    }
    // Two keys for one request: which one would the retry send?
    let twice = api
        .client
        .post(api.url("/usages"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .json(&body)
        .send()
        .await
        .unwrap();
    let twice = problem(twice, 422, "invalid_field").await;
    assert_eq!(twice["field"], "Idempotency-Key", "{twice}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 0);

    // 1 and 255 printable characters (spaces included) are keys.
    let longest = "~".repeat(255);
    for key in ["x", longest.as_str(), "a key with spaces"] {
        let response = api.post_keyed(&body, key.as_bytes(), None).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{key}");
        assert_eq!(response.json::<Value>().await.unwrap()["id"], derived_id(key).as_str());
    }
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_idempotency_key_is_ignored_when_the_body_has_an_id() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", None)).await;
    let api = TestApi::serve(&env.settings()).await;

    let body = json!({"id": "usg_own", "subscriptionId": "sub_a", "quantity": 1});
    let created = api.post_keyed(&body, b"k-1", None).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["location"], "/usages/usg_own");
    // The body's id decides, whatever key comes with it (a malformed one too).
    let again = api.post_keyed(&body, b"another key", None).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], "usg_own");
    assert_eq!(api.post_keyed(&body, b"", None).await.status(), StatusCode::OK);
    problem(
        api.get(&format!("/usages/{}", derived_id("k-1"))).await,
        404,
        "usage_not_found",
    )
    .await;
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 1);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rejection_has_its_status_and_problem_body() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    subscribe(
        &env,
        json!({"id": "sub_paused", "status": "paused", "version": 1,
               "currentPeriodStartTime": days(-1), "currentPeriodEndTime": days(1)}),
    )
    .await;
    subscribe(
        &env,
        json!({"id": "sub_old", "status": "active", "version": 1,
               "currentPeriodStartTime": days(-60), "currentPeriodEndTime": days(-30)}),
    )
    .await;
    let api = TestApi::serve(&env.settings()).await;

    let cases: Vec<(Value, u16, &str, Option<Vec<&str>>)> = vec![
        (
            json!({"acceptPartialQuantity": "yes"}),
            422,
            "missing_field",
            Some(vec!["subscriptionId", "quantity", "acceptPartialQuantity"]),
        ),
        (
            json!({"subscriptionId": "sub_a", "quantity": -1}),
            422,
            "invalid_field",
            Some(vec!["quantity"]),
        ),
        (
            json!({"id": "msg_1", "subscriptionId": "sub_a", "quantity": 1}),
            422,
            "invalid_field",
            Some(vec!["id"]),
        ),
        (
            json!({"subscriptionId": "sub_a", "quantity": 1, "usageTime": days(1)}),
            422,
            "usage_time_in_future",
            Some(vec!["usageTime"]),
        ),
        (
            json!({"subscriptionId": "sub_nobody", "quantity": 1}),
            422,
            "subscription_not_found",
            Some(vec!["subscriptionId"]),
        ),
        (
            json!({"subscriptionId": "sub_paused", "quantity": 1}),
            409,
            "subscription_not_active",
            None,
        ),
        (
            json!({"subscriptionId": "sub_old", "quantity": 1, "usageTime": days(-45)}),
            409,
            "period_closed",
            None,
        ),
        (
            json!({"subscriptionId": "sub_a", "quantity": 1, "usageTime": days(-90)}),
            409,
            "no_service_period",
            None,
        ),
    ];
    for (body, status, code, fields) in cases {
        let response = api.post(&body).await;
        let problem = problem(response, status, code).await;
        match fields {
            Some(fields) => assert_eq!(invalid_fields(&problem), fields, "{problem}"),
            None => assert!(problem.get("invalidFields").is_none(), "{problem}"),
        }
    }

    let over = api
        .post(&json!({"id": "big", "subscriptionId": "sub_a", "quantity": 11}))
        .await;
    let body = problem(over, 409, "usage_limit_exceeded").await;
    assert_eq!(body["available"], json!(10));
    assert_eq!(body["limit"]["applied"], "hardLimit");
    assert_eq!(body["field"], "quantity");

    for raw in [&b"not json"[..], b"[1]", b"{\"quantity\": 1, \"quantity\": 2}", b"\xff"] {
        let body = problem(
            api.post_raw("application/json", raw.to_vec()).await,
            422,
            "malformed_payload",
        )
        .await;
        assert_eq!(body["invalidFields"], json!([]));
    }
    let huge = format!(
        r#"{{"subscriptionId": "sub_a", "quantity": 1, "x": "{}"}}"#,
        "a".repeat(70_000)
    );
    problem(
        api.post_raw("application/json", huge.into_bytes()).await,
        413,
        "payload_too_large",
    )
    .await;
    let text = api.post_raw("text/plain", b"{}".to_vec()).await;
    problem(text, 415, "unsupported_media_type").await;
    // A body without a Content-Type is refused too, whatever it holds.
    for (method, path) in [(reqwest::Method::POST, "/usages"), (reqwest::Method::PUT, "/usages/u9")] {
        let untyped = api
            .client
            .request(method, api.url(path))
            .body(r#"{"subscriptionId": "sub_a", "quantity": 1}"#)
            .send()
            .await
            .unwrap();
        problem(untyped, 415, "unsupported_media_type").await;
    }
    let charset = api
        .post_raw(
            "Application/JSON; charset=utf-8",
            br#"{"subscriptionId": "sub_a", "quantity": 1}"#.to_vec(),
        )
        .await;
    assert_eq!(charset.status(), StatusCode::CREATED);

    problem(api.get("/usages/nope").await, 404, "usage_not_found").await;
    problem(api.delete("nope").await, 404, "usage_not_found").await;
    problem(api.get("/nothing/here").await, 404, "not_found").await;
    let put = api.client.put(api.url("/usages")).send().await.unwrap();
    assert_eq!(put.headers()["allow"], "GET,HEAD,POST");
    problem(put, 405, "method_not_allowed").await;
    let list = problem(api.get("/usages?limit=5000&offset=x").await, 422, "invalid_field").await;
    assert_eq!(invalid_fields(&list), ["limit", "offset"]);

    // Only the one valid create changed anything.
    assert_eq!(used(&env, "sub_a").await, Decimal::ONE);
    assert_eq!(outbox(&env, "usage-results").await.len(), 1);
    let metrics = api.metrics().await;
    assert!(
        metrics.contains(
            r#"usage_worker_messages_decided_total{reason="usage_limit_exceeded",source="http",status="rejected"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"usage_worker_http_requests_total{method="POST",route="/usages",status="413"} 1"#),
        "{metrics}"
    );
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_exceed_the_limit() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_hot", Some("10"))).await;
    let api = Arc::new(TestApi::serve(&env.settings()).await);

    let requests = (0..50).map(|i| {
        let api = api.clone();
        tokio::spawn(async move {
            api.post(&json!({"id": format!("hot_{i}"), "subscriptionId": "sub_hot", "quantity": 1}))
                .await
        })
    });
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for request in requests.collect::<Vec<_>>() {
        let response = request.await.unwrap();
        let status = response.status().as_u16();
        if status == 409 {
            problem(response, 409, "usage_limit_exceeded").await;
        }
        *by_status.entry(status).or_default() += 1;
    }
    assert_eq!(by_status, HashMap::from([(201, 10), (409, 40)]));
    assert_eq!(used(&env, "sub_hot").await, Decimal::TEN);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 10);
    assert_eq!(outbox(&env, "usage-results").await.len(), 10);

    // The same new id sent 20 times at once is created once.
    subscribe(&env, active_subscription("sub_same", None)).await;
    let requests = (0..20).map(|_| {
        let api = api.clone();
        tokio::spawn(async move {
            api.post(&json!({"id": "once", "subscriptionId": "sub_same", "quantity": 2}))
                .await
                .status()
                .as_u16()
        })
    });
    let mut statuses = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        statuses.push(request.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [vec![200; 19], vec![201]].concat());
    assert_eq!(used(&env, "sub_same").await, Decimal::TWO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_voids_the_usage_frees_its_quantity_and_keeps_its_id() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    subscribe(
        &env,
        json!({"id": "sub_trial", "status": "trial", "version": 1,
               "currentPeriodStartTime": days(-1), "currentPeriodEndTime": days(29),
               "trialEndTime": days(5), "usageLimits": {"trialLimit": 4}}),
    )
    .await;
    let api = TestApi::serve(&env.settings()).await;

    let full = api
        .post(&json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 10}))
        .await;
    assert_eq!(full.status(), StatusCode::CREATED);
    let created: Value = full.json().await.unwrap();
    problem(
        api.post(&json!({"id": "u2", "subscriptionId": "sub_a", "quantity": 1}))
            .await,
        409,
        "usage_limit_exceeded",
    )
    .await;

    let voided = api.delete_with("u1", "?reason=meter%20fault").await;
    assert_eq!(voided.status(), StatusCode::NO_CONTENT);
    assert!(voided.bytes().await.unwrap().is_empty());
    assert_eq!(used(&env, "sub_a").await, Decimal::ZERO);
    problem(api.delete("u1").await, 404, "usage_not_found").await;
    problem(api.get("/usages/u1").await, 404, "usage_not_found").await;

    // The quantity is free again; the id is not: it stays taken by the
    // voided usage, whose row keeps who voided it and why.
    let u2 = api
        .post(&json!({"id": "u2", "subscriptionId": "sub_a", "quantity": 1}))
        .await;
    assert_eq!(u2.status(), StatusCode::CREATED);
    let again = api
        .post(&json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 9}))
        .await;
    let body = problem(again, 409, "usage_voided").await;
    assert_eq!(body["field"], "id");
    assert_eq!(used(&env, "sub_a").await, Decimal::ONE);
    let listed: Vec<Value> = api.get("/usages?status=voided").await.json().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (&listed[0]["id"], &listed[0]["voidReason"], &listed[0]["voidedBy"]),
        (&json!("u1"), &json!("meter fault"), &json!("anonymous"))
    );
    assert!(listed[0]["voidedTime"].is_string());
    let active: Vec<Value> = api.get("/usages").await.json().await.unwrap();
    assert_eq!(
        active.iter().map(|u| u["id"].clone()).collect::<Vec<_>>(),
        [json!("u2")]
    );
    let all: Vec<Value> = api.get("/usages?status=all").await.json().await.unwrap();
    assert_eq!(all.len(), 2);
    let history: Value = api.get("/usages/u1/history").await.json().await.unwrap();
    assert_eq!(history[0]["action"], "reported");
    assert_eq!(history[0]["quantity"], 10);
    assert_eq!(history[0]["by"], "http");
    assert_eq!(history[1]["action"], "voided");
    assert_eq!(history[1]["by"], "anonymous");
    assert_eq!(history[1]["reason"], "meter fault");
    assert_eq!(history.as_array().unwrap().len(), 2);

    // The voided outcome carries the usage with the quantity it had.
    let records = outbox(&env, "usage-results").await;
    let statuses: Vec<&str> = records.iter().map(|r| r.2["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["created", "voided", "created"]);
    assert_eq!(records[1].2["usage"]["quantity"], created["quantity"]);
    assert_eq!(records[1].2["usage"]["voidReason"], "meter fault");
    assert_eq!(records[1].2["eventId"], "u1");
    assert_ne!(records[0].2["outcomeId"], records[1].2["outcomeId"]);

    // Usage counted against a trial is given back to the trial too.
    let trial = api
        .post(&json!({"id": "t1", "subscriptionId": "sub_trial", "quantity": 4}))
        .await;
    assert_eq!(trial.status(), StatusCode::CREATED);
    problem(
        api.post(&json!({"id": "t2", "subscriptionId": "sub_trial", "quantity": 1}))
            .await,
        409,
        "usage_limit_exceeded",
    )
    .await;
    assert_eq!(api.delete("t1").await.status(), StatusCode::NO_CONTENT);
    let trial_used: Decimal = sqlx::query_scalar("SELECT trial_used FROM subscriptions WHERE id = 'sub_trial'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(trial_used, Decimal::ZERO);
    let t2 = api
        .post(&json!({"id": "t2", "subscriptionId": "sub_trial", "quantity": 1}))
        .await;
    assert_eq!(t2.status(), StatusCode::CREATED);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_creates_a_free_id_and_amends_a_stored_usage_against_the_limits() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    subscribe(&env, active_subscription("sub_b", None)).await;
    let api = TestApi::serve(&env.settings()).await;

    // A free id: created exactly as POST would (201, Location).
    let created = api.put("p1", &json!({"subscriptionId": "sub_a", "quantity": 4})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["location"], "/usages/p1");
    let created: Value = created.json().await.unwrap();
    let usage_time = created["usageTime"].clone();
    assert_eq!(
        api.post(&json!({"id": "p2", "subscriptionId": "sub_a", "quantity": 3}))
            .await
            .status(),
        StatusCode::CREATED
    );

    // A stored usage: the body's quantity replaces the stored one.
    let amended = api.put("p1", &json!({"subscriptionId": "sub_a", "quantity": 6})).await;
    assert_eq!(amended.status(), StatusCode::OK);
    let amended: Value = amended.json().await.unwrap();
    assert_eq!(
        (amended["id"].clone(), amended["quantity"].clone()),
        (json!("p1"), json!(6))
    );
    assert_eq!(amended["usageTime"], usage_time);
    assert_eq!(used(&env, "sub_a").await, Decimal::from(9));
    // Nothing differs: 200, unchanged, nothing published.
    let same = api
        .put(
            "p1",
            &json!({"id": "p1", "subscriptionId": "sub_a", "quantity": 6, "usageTime": usage_time}),
        )
        .await;
    assert_eq!(same.status(), StatusCode::OK);
    assert_eq!(same.json::<Value>().await.unwrap()["quantity"], 6);

    // Over the hard limit: refused, or clamped with acceptPartialQuantity.
    let body = problem(
        api.put("p1", &json!({"subscriptionId": "sub_a", "quantity": 8})).await,
        409,
        "usage_limit_exceeded",
    )
    .await;
    assert_eq!(body["available"], 7, "what p1 can be amended to");
    let clamped = api
        .put(
            "p1",
            &json!({"subscriptionId": "sub_a", "quantity": 8, "acceptPartialQuantity": true}),
        )
        .await;
    assert_eq!(clamped.status(), StatusCode::OK);
    assert_eq!(clamped.json::<Value>().await.unwrap()["quantity"], 7);
    assert_eq!(used(&env, "sub_a").await, Decimal::TEN);
    // The quantity it was last asked for is "nothing differs" too.
    assert_eq!(
        api.put(
            "p1",
            &json!({"subscriptionId": "sub_a", "quantity": 8, "acceptPartialQuantity": true})
        )
        .await
        .status(),
        StatusCode::OK
    );

    // What cannot change, and what must match.
    let body = problem(
        api.put("p1", &json!({"id": "other", "subscriptionId": "sub_a", "quantity": 1}))
            .await,
        422,
        "invalid_field",
    )
    .await;
    assert_eq!(body["field"], "id");
    let body = problem(
        api.put(
            "p1",
            &json!({"subscriptionId": "sub_a", "quantity": 1, "usageTime": days(-1)}),
        )
        .await,
        422,
        "invalid_field",
    )
    .await;
    assert_eq!(body["field"], "usageTime");
    problem(
        api.put("p1", &json!({"subscriptionId": "sub_b", "quantity": 1})).await,
        409,
        "subscription_mismatch",
    )
    .await;
    let wrong_type = api
        .client
        .put(api.url("/usages/p1"))
        .header("content-type", "text/plain")
        .body(r#"{"subscriptionId": "sub_a", "quantity": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // The path's id is held to the id rules; msg_ is the worker's own.
    for id in ["msg_1", &"x".repeat(51)] {
        let body = problem(
            api.put(id, &json!({"subscriptionId": "sub_b", "quantity": 1})).await,
            422,
            "invalid_field",
        )
        .await;
        assert_eq!(body["field"], "id", "{id}");
    }
    // The usage status follows every correction at once.
    let used_now = || async {
        let status: Value = api.get("/subscriptions/sub_a/usage").await.json().await.unwrap();
        status["usedQuantity"].clone()
    };
    assert_eq!(used_now().await, json!(10));

    // A voided id cannot be amended or created again.
    assert_eq!(api.delete("p2").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(used_now().await, json!(7));
    problem(
        api.put("p2", &json!({"subscriptionId": "sub_a", "quantity": 1})).await,
        409,
        "usage_voided",
    )
    .await;
    // A PUT that created a clamped usage, sent again: unchanged, although
    // the quantity it asked for is more than the usage holds.
    let clamp = json!({"subscriptionId": "sub_a", "quantity": 5, "acceptPartialQuantity": true});
    let clamped = api.put("p3", &clamp).await;
    assert_eq!(clamped.status(), StatusCode::CREATED);
    assert_eq!(clamped.json::<Value>().await.unwrap()["quantity"], 3);
    let again = api.put("p3", &clamp).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap()["quantity"], 3);
    assert_eq!(used(&env, "sub_a").await, Decimal::TEN);

    // One outcome per change, in order; the history has every amendment.
    let records = outbox(&env, "usage-results").await;
    let statuses: Vec<&str> = records.iter().map(|r| r.2["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["created", "created", "amended", "amended", "voided", "created"]
    );
    assert_eq!(records[2].2["previousQuantity"], 4);
    assert_eq!(records[3].2["previousQuantity"], 6);
    assert_eq!(records[3].2["partial"], true);
    let history: Value = api.get("/usages/p1/history").await.json().await.unwrap();
    let entries: Vec<(Value, Value, Value)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].clone(),
                e["quantity"].clone(),
                e["previousQuantity"].clone(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (json!("reported"), json!(4), Value::Null),
            (json!("amended"), json!(6), json!(4)),
            (json!("amended"), json!(7), json!(6)),
        ]
    );
    assert_eq!(history[1]["by"], "anonymous");
    problem(api.get("/usages/nope/history").await, 404, "usage_not_found").await;
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invoiced_usage_cannot_be_deleted() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let api = TestApi::serve(&env.settings()).await;
    let created = api
        .post(&json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 3}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    sqlx::query("UPDATE usages SET invoice_id = 'inv_1', invoice_item_id = 'ii_1', updated_time = now()")
        .execute(&env.pool)
        .await
        .unwrap();

    let body = problem(api.delete("u1").await, 409, "usage_invoiced").await;
    assert_eq!(body["invoiceId"], "inv_1");
    let read: Value = api.get("/usages/u1").await.json().await.unwrap();
    assert_eq!(
        (read["invoiceId"].as_str(), read["invoiceItemId"].as_str()),
        (Some("inv_1"), Some("ii_1"))
    );
    assert_eq!(used(&env, "sub_a").await, Decimal::new(3, 0));
    assert_eq!(outbox(&env, "usage-results").await.len(), 1, "no deleted outcome");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_usage_in_a_closed_period_cannot_be_deleted_before_its_invoice_arrives() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let api = TestApi::serve(&env.settings()).await;
    let created = api
        .post(&json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 3}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    // The period ended two hours ago by the database's clock: past its end
    // plus the hour of grace, closed, and no invoice has stamped it yet.
    sqlx::raw_sql(
        "UPDATE service_periods SET start_time = now() - interval '30 days', end_time = now() - interval '2 hours';
         UPDATE usages SET period_start_time = now() - interval '30 days', usage_time = now() - interval '3 hours'",
    )
    .execute(&env.pool)
    .await
    .unwrap();

    problem(api.delete("u1").await, 409, "period_closed").await;
    assert_eq!(api.get("/usages/u1").await.status(), StatusCode::OK, "the usage stays");
    assert_eq!(
        used(&env, "sub_a").await,
        Decimal::new(3, 0),
        "its quantity stays counted"
    );
    assert_eq!(outbox(&env, "usage-results").await.len(), 1, "no deleted outcome");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_filters_by_subscription_and_time_and_paginates() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", None)).await;
    subscribe(&env, active_subscription("sub_b", None)).await;
    let api = TestApi::serve(&env.settings()).await;
    let base = Utc::now() - chrono::Duration::days(5);
    let at = |hours: i64| (base + chrono::Duration::hours(hours)).to_rfc3339();
    for i in 0..5 {
        let body = json!({"id": format!("a{i}"), "subscriptionId": "sub_a", "quantity": 1, "usageTime": at(i)});
        assert_eq!(api.post(&body).await.status(), StatusCode::CREATED);
    }
    let body = json!({"id": "b0", "subscriptionId": "sub_b", "quantity": 1, "usageTime": at(2)});
    assert_eq!(api.post(&body).await.status(), StatusCode::CREATED);

    let ids = |page: &Value| -> Vec<String> {
        page.as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = api.get("/usages?subscriptionId=sub_a&limit=2").await;
    assert_eq!(first.status(), StatusCode::OK);
    let headers = first.headers().clone();
    assert_eq!(headers["pagination-total"], "5");
    assert_eq!(headers["pagination-limit"], "2");
    assert_eq!(headers["pagination-offset"], "0");
    // The next page is by cursor, with the same filters.
    let link = headers["link"].to_str().unwrap();
    assert!(
        link.starts_with("</usages?subscriptionId=sub_a&limit=2&cursor=") && link.ends_with(">; rel=\"next\""),
        "{link}"
    );
    assert_eq!(ids(&first.json().await.unwrap()), ["a0", "a1"]);
    let second = api.get(&link[1..link.find('>').unwrap()]).await;
    assert_eq!(second.headers()["pagination-total"], "5");
    assert_eq!(ids(&second.json().await.unwrap()), ["a2", "a3"]);

    let last = api.get("/usages?subscriptionId=sub_a&limit=2&offset=4").await;
    assert_eq!(
        last.headers()["link"],
        "</usages?subscriptionId=sub_a&limit=2&offset=2>; rel=\"prev\""
    );
    assert_eq!(ids(&last.json().await.unwrap()), ["a4"]);

    let range = format!(
        "/usages?subscriptionId=sub_a&usageTimeFrom={}&usageTimeTo={}",
        url_encode(&at(1)),
        url_encode(&at(3))
    );
    let in_range = api.get(&range).await;
    assert_eq!(in_range.headers()["pagination-total"], "2");
    assert_eq!(ids(&in_range.json().await.unwrap()), ["a1", "a2"]);

    let all: Value = api.get("/usages").await.json().await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 6);
    let none = api.get("/usages?subscriptionId=sub_nobody").await;
    assert_eq!(none.headers()["pagination-total"], "0");
    assert_eq!(none.json::<Value>().await.unwrap(), json!([]));
    api.shutdown().await;
}

fn url_encode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bearer_token_guards_usages_but_not_probes() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", None)).await;
    let mut settings = env.settings();
    settings.http.bearer_token = Some(Secret::new("s3cret"));
    let api = TestApi::serve(&settings).await;
    let body = json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 1});

    let anonymous = api.post(&body).await;
    assert_eq!(
        anonymous.headers()["www-authenticate"],
        r#"Bearer realm="usage-worker""#
    );
    problem(anonymous, 401, "unauthorized").await;
    let wrong = api
        .client
        .post(api.url("/usages"))
        .bearer_auth("guess")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        wrong.headers()["www-authenticate"],
        r#"Bearer realm="usage-worker", error="invalid_token""#
    );
    problem(wrong, 401, "unauthorized").await;
    problem(api.get("/usages/u1").await, 401, "unauthorized").await;
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 0);

    let allowed = api
        .client
        .post(api.url("/usages"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::CREATED);
    let read = api
        .client
        .get(api.url("/usages/u1"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(api.get(open).await.status(), StatusCode::OK, "{open}");
    }
    api.shutdown().await;

    // Without a token, the same request needs no header.
    let open = TestApi::serve(&env.settings()).await;
    let body = json!({"id": "u2", "subscriptionId": "sub_a", "quantity": 1});
    assert_eq!(open.post(&body).await.status(), StatusCode::CREATED);
    open.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_database_is_503_with_retry_after_and_not_ready() {
    let env = TestEnv::start().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let config = ApiConfig::from_settings(&env.settings(), PARTITIONS, false);
    let api = TestApi::start(pool, config, Arc::new(Metrics::default())).await;

    // Did the create commit before the answer was lost? A retry finds out
    // only through the id: without one, or a key, it may count twice.
    let create = api.post(&json!({"subscriptionId": "sub_a", "quantity": 1})).await;
    assert_eq!(create.headers()["retry-after"], "1");
    let unkeyed = problem(create, 503, "service_unavailable").await;
    let detail = unkeyed["detail"].as_str().unwrap();
    assert!(
        detail.contains("may count twice") && detail.contains("Idempotency-Key"),
        "{detail}"
    );
    for keyed in [
        api.post(&json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 1}))
            .await,
        api.post_keyed(&json!({"subscriptionId": "sub_a", "quantity": 1}), b"k-1", None)
            .await,
    ] {
        let body = problem(keyed, 503, "service_unavailable").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(!detail.contains("count twice"), "{detail}");
        assert!(detail.contains("retry"), "{detail}");
    }
    let read = api.get("/usages/u1").await;
    assert_eq!(read.headers()["retry-after"], "1");
    problem(read, 503, "service_unavailable").await;
    problem(api.get("/usages").await, 503, "service_unavailable").await;
    problem(api.delete("u1").await, 503, "service_unavailable").await;
    // A request that is wrong whatever the database says is still told so.
    problem(api.post(&json!({"quantity": 1})).await, 422, "missing_field").await;

    let ready = problem(api.get("/readyz").await, 503, "not_ready").await;
    assert_eq!(ready["checks"]["database"]["ok"], false, "{ready}");
    // A scrape runs the same checks.
    let scraped = api.get("/metrics").await.text().await.unwrap();
    assert!(scraped.lines().any(|l| l == "usage_worker_ready 0"), "{scraped}");
    let health = api.get("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_creates_and_deletes_reach_usage_results_beside_the_worker() {
    let env = TestEnv::start().await;
    let mut sub = active_subscription("sub_a", Some("100"));
    sub["usageLimits"]["softLimit"] = json!(5);
    env.subscription(sub);
    let settings = env.settings();
    let worker = env.worker_with(settings.clone()).await;
    let metrics = worker.counts.metrics.clone();
    let pool = store::connect(&settings.database).await.unwrap();
    let config = ApiConfig::from_settings(&settings, PARTITIONS, true);
    let api = TestApi::start(pool, config, metrics.clone()).await;
    let metadata = usage_worker::kafka::reader_config(&settings.kafka, "metadata")
        .create()
        .unwrap();
    let (stop_sampler, sampler_stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = Sampler {
        metrics: metrics.clone(),
        pools: vec![("worker", store::connect(&settings.database).await.unwrap())],
        group: settings.kafka.group_id.clone(),
        topic: settings.topics.usage_events.clone(),
        partitions: PARTITIONS,
        metadata: Arc::new(metadata),
    };
    let sampler = tokio::spawn(sampler.run(async {
        let _ = sampler_stopped.await;
    }));

    // Ready once the consumer holds its partitions and the snapshot is in.
    wait_until("ready", || async {
        api.get("/readyz").await.status() == StatusCode::OK
    })
    .await;
    let ready: Value = api.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        ready["checks"]["consumer"]["partitions"].as_array().unwrap().len(),
        4,
        "{ready}"
    );
    let scraped = api.get("/metrics").await.text().await.unwrap();
    assert!(scraped.lines().any(|l| l == "usage_worker_ready 1"), "{scraped}");
    env.wait_for_count("SELECT count(*) FROM subscriptions", 1).await;
    let before = api.metrics().await;

    env.usage(json!({"id": "k1", "subscriptionId": "sub_a", "quantity": 2}));
    env.flush();
    let created = api
        .post(&json!({"id": "h1", "subscriptionId": "sub_a", "quantity": 4}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    env.wait_for_count("SELECT count(*) FROM usages", 2).await;
    assert_eq!(api.delete("h1").await.status(), StatusCode::NO_CONTENT);

    let reader = env.results_reader();
    let records = reader.read(3, WAIT);
    assert!(reader.read_rest(Duration::from_secs(1)).is_empty());
    let http: Vec<_> = records.iter().filter(|r| r.value["source"]["http"] == true).collect();
    assert_eq!(http.len(), 2, "{records:#?}");
    let statuses: Vec<&str> = http.iter().map(|r| r.value["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["created", "voided"]);
    for record in &http {
        assert_eq!(
            record.partition,
            output_partition("sub_a", PARTITIONS, Partitioner::Murmur2)
        );
        assert_eq!(record.key.as_deref(), Some("sub_a"));
        assert_eq!(record.value["eventId"], "h1");
        assert_eq!(record.headers["event-id"], "h1");
        assert_eq!(record.headers["status"], record.value["status"].as_str().unwrap());
        assert_eq!(
            record.headers["outcome-id"],
            record.value["outcomeId"].as_str().unwrap()
        );
        assert!(record.headers.contains_key("outbox-seq"));
    }
    // The soft limit (5) was reached by whichever came second: one alert.
    let alerts = Reader::new(env.kafka.bootstrap_servers(), "usage-alerts", PARTITIONS).read(1, WAIT);
    assert_eq!(alerts[0].value["type"], "soft-usage-limit-reached");

    // Metrics moved with the traffic, and the sampled gauges are there.
    let sampled = [
        r#"usage_worker_outbox_backlog{topic="usage-results"}"#,
        r#"usage_worker_consumer_lag{partition="0"}"#,
        r#"usage_worker_db_pool_connections{pool="worker",state="in_use"}"#,
        r#"usage_worker_db_pool_max_connections{pool="worker"}"#,
    ];
    let after = wait_for_metrics(&api, &sampled).await;
    for name in [
        "usage_worker_messages_consumed_total",
        "usage_worker_batch_size_count",
        "usage_worker_event_to_outcome_seconds_count",
        r#"usage_worker_transaction_duration_seconds_count{kind="batch"}"#,
        r#"usage_worker_transaction_duration_seconds_count{kind="http_create"}"#,
        r#"usage_worker_transaction_duration_seconds_count{kind="http_correct"}"#,
        r#"usage_worker_messages_decided_total{reason="",source="kafka",status="created"}"#,
        r#"usage_worker_messages_decided_total{reason="",source="http",status="created"}"#,
        r#"usage_worker_messages_decided_total{reason="",source="http",status="voided"}"#,
        r#"usage_worker_http_requests_total{method="POST",route="/usages",status="201"}"#,
        r#"usage_worker_http_requests_total{method="DELETE",route="/usages/{id}",status="204"}"#,
    ] {
        let (was, now) = (metric(&before, name), metric(&after, name));
        assert!(now >= 1.0 && now > was, "{name} did not move: {was} -> {now}\n{after}");
    }
    assert_eq!(metric(&after, "usage_worker_assigned_partitions"), 4.0);
    assert_eq!(
        metric(&after, r#"usage_worker_db_pool_max_connections{pool="worker"}"#),
        8.0
    );

    let _ = stop_sampler.send(());
    sampler.await.unwrap();
    api.shutdown().await;
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_crc32_partitioner_an_http_outcome_shares_the_partition_of_librdkafka_keyed_events() {
    let env = TestEnv::start().await;
    // A subscription the two hashes put on different partitions.
    let sub = (0..100)
        .map(|i| format!("sub_{i}"))
        .find(|s| {
            output_partition(s, PARTITIONS, Partitioner::Crc32) != output_partition(s, PARTITIONS, Partitioner::Murmur2)
        })
        .unwrap();
    let expected = output_partition(&sub, PARTITIONS, Partitioner::Crc32);
    env.subscription(active_subscription(&sub, None));
    let mut vars = env.env_vars(test_kit::env::CONFIG_DIR);
    vars.push(("USAGE_WORKER__KAFKA__PARTITIONER".into(), "crc32".into()));
    let settings = Settings::load_from(&vars).unwrap();
    assert_eq!(settings.kafka.partitioner, Partitioner::Crc32);
    let worker = env.worker_with(settings.clone()).await;
    let pool = store::connect(&settings.database).await.unwrap();
    let config = ApiConfig::from_settings(&settings, PARTITIONS, true);
    let api = TestApi::start(pool, config, worker.counts.metrics.clone()).await;
    wait_until("ready", || async {
        api.get("/readyz").await.status() == StatusCode::OK
    })
    .await;
    env.wait_for_count("SELECT count(*) FROM subscriptions", 1).await;

    // The harness's producer is librdkafka with its default partitioner.
    env.usage(json!({"id": "k1", "subscriptionId": sub, "quantity": 1}));
    env.flush();
    let created = api
        .post(&json!({"id": "h1", "subscriptionId": sub, "quantity": 2}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);

    let reader = env.results_reader();
    let records = reader.read(2, WAIT);
    assert!(reader.read_rest(Duration::from_secs(1)).is_empty());
    let partition_of = |event_id: &str| {
        let record = records
            .iter()
            .find(|r| r.value["eventId"] == event_id)
            .unwrap_or_else(|| panic!("no outcome for {event_id}: {records:#?}"));
        assert_eq!(record.value["status"], "created");
        assert_eq!(record.key.as_deref(), Some(sub.as_str()));
        record.partition
    };
    assert_eq!(partition_of("k1"), expected, "librdkafka put the event elsewhere");
    assert_eq!(partition_of("h1"), expected);
    api.shutdown().await;
    worker.shutdown().await.unwrap();
}

/// The partition librdkafka itself picks for each key, producing to a new
/// topic of `partitions` partitions with `partitioner` (None: its default).
async fn librdkafka_partitions(partitioner: Option<&str>, keys: &[String], partitions: i32) -> Vec<i32> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let kafka = usage_worker::embedded::EmbeddedKafka::start(1).unwrap();
    let topic = format!("keyed-{}", partitioner.unwrap_or("default"));
    kafka.create_topic(&topic, partitions).unwrap();
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("log_level", "3");
    if let Some(partitioner) = partitioner {
        config.set("partitioner", partitioner);
    }
    let producer: FutureProducer = config.create().unwrap();
    let mut delivered = Vec::with_capacity(keys.len());
    for key in keys {
        let record = FutureRecord::to(&topic).key(key.as_str()).payload("x");
        let (partition, _offset) = producer.send(record, Duration::from_secs(30)).await.unwrap();
        delivered.push(partition);
    }
    delivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_partitions_are_where_librdkafkas_own_partitioners_put_the_key() {
    let mut keys: Vec<String> = (0..300).map(|i| format!("sub_{i}")).collect();
    keys.extend(
        [
            "a",
            "sub_ü",
            "sub_0f8e4c2a-9b1d-4e7a-8c3f-2d5b6a7e9f01",
            "x y",
            &"s".repeat(50),
        ]
        .map(String::from),
    );
    // librdkafka's `partitioner` setting (None: its default,
    // consistent_random), and the `kafka.partitioner` that matches it.
    let pairs = [
        (Some("consistent"), Partitioner::Crc32),
        (None, Partitioner::Crc32),
        (Some("murmur2_random"), Partitioner::Murmur2),
        (Some("murmur2"), Partitioner::Murmur2),
    ];
    for partitions in [4, 7] {
        for (partitioner, ours) in pairs {
            let delivered = librdkafka_partitions(partitioner, &keys, partitions).await;
            let computed: Vec<i32> = keys.iter().map(|k| output_partition(k, partitions, ours)).collect();
            let differing: Vec<_> = keys
                .iter()
                .zip(delivered.iter().zip(&computed))
                .filter(|(_, (d, c))| d != c)
                .collect();
            assert!(
                differing.is_empty(),
                "{partitioner:?} over {partitions} partitions: {} of {} keys elsewhere, e.g. {:?}",
                differing.len(),
                keys.len(),
                &differing[..differing.len().min(5)]
            );
            // The keys spread: every partition is used.
            assert_eq!(
                delivered.iter().collect::<std::collections::HashSet<_>>().len(),
                partitions as usize
            );
        }
    }
}

/// The value of one sample line of a Prometheus text page (0 when absent).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// The metrics page once every one of `names` is on it.
async fn wait_for_metrics(api: &TestApi, names: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let page = api.metrics().await;
        if names.iter().all(|name| page.contains(name)) {
            return page;
        }
        assert!(Instant::now() < deadline, "{names:?} never all appeared:\n{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `usage-worker` child process with its HTTP API on a free port.
struct Process {
    child: Child,
    base: String,
}

impl Process {
    fn start(env: &TestEnv, command: &str) -> Self {
        let port = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().port()
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(env!("CARGO_BIN_EXE_usage-worker"))
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.env_vars(test_kit::env::CONFIG_DIR))
            .env("HTTP_ADDR", addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting usage-worker");
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    async fn wait_ready(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(response) = client.get(format!("{}/readyz", self.base)).send().await {
                if response.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(self.child.try_wait().unwrap().is_none(), "usage-worker exited");
            assert!(Instant::now() < deadline, "usage-worker never got ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit code.
    fn terminate(mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "usage-worker did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_serve_and_run_commands_serve_the_api_and_stop_cleanly_on_sigterm() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_a", Some("10")));
    let client = reqwest::Client::new();

    // `run`: the worker applies the snapshot and publishes the API's outcome.
    let mut run = Process::start(&env, "run");
    run.wait_ready(&client).await;
    env.wait_for_count("SELECT count(*) FROM subscriptions", 1).await;
    let created = client
        .post(format!("{}/usages", run.base))
        .json(&json!({"id": "r1", "subscriptionId": "sub_a", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let records = env.results_reader().read(1, WAIT);
    assert_eq!(records[0].value["eventId"], "r1");
    assert_eq!(run.terminate(), Some(0));

    // `serve`: the API alone, against the same database.
    let mut serve = Process::start(&env, "serve");
    serve.wait_ready(&client).await;
    let repeat = client
        .post(format!("{}/usages", serve.base))
        .json(&json!({"id": "r1", "subscriptionId": "sub_a", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(repeat.status(), StatusCode::OK);
    let unknown = client
        .post(format!("{}/usages", serve.base))
        .json(&json!({"subscriptionId": "sub_nobody", "quantity": 1}))
        .send()
        .await
        .unwrap();
    problem(unknown, 422, "subscription_not_found").await;
    assert_eq!(serve.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_usage_status_reads_its_callers_writes_with_amounts_and_limits() {
    let env = TestEnv::start().await;
    let mut priced = active_subscription("sub_st", None);
    priced["pricing"] = json!({"currency": "EUR", "formula": "tiered",
        "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]});
    priced["usageLimits"] = json!({"hardLimit": {"amount": 60}, "softLimit": {"quantity": 100}, "trialLimit": 1000});
    priced["trialEndTime"] = json!(days(-3));
    // Whole seconds, so the invoice below can name the period by the times
    // the status gives (written with milliseconds).
    let whole = |days: i64| {
        (Utc::now() + chrono::Duration::days(days))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    priced["currentPeriodStartTime"] = json!(whole(-10));
    priced["currentPeriodEndTime"] = json!(whole(20));
    subscribe(&env, priced).await;
    let api = TestApi::serve(&env.settings()).await;
    let status = |path: &'static str| {
        let api = &api;
        async move {
            let response = api.get(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            response.json::<Value>().await.unwrap()
        }
    };

    let fresh = status("/subscriptions/sub_st/usage").await;
    assert_eq!(fresh["subscriptionId"], "sub_st");
    assert_eq!(
        (
            fresh["usedQuantity"].clone(),
            fresh["usedAmount"].clone(),
            fresh["currency"].clone()
        ),
        (json!(0), json!(0), json!("EUR"))
    );
    assert_eq!(fresh["available"], json!({"quantity": 125, "amount": 60}));
    assert_eq!(
        fresh["limits"],
        json!({"hardLimit": {"amount": 60}, "softLimit": {"quantity": 100}, "trialLimit": 1000})
    );
    assert_eq!(fresh["period"]["closed"], json!(false));
    assert_eq!(fresh["period"]["invoiceId"], Value::Null);
    assert_eq!(fresh["trial"]["used"], json!(0), "{fresh}");

    // What the caller just created is in the next read.
    let created = api
        .post(&json!({"id": "s1", "subscriptionId": "sub_st", "quantity": 110}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let after = status("/subscriptions/sub_st/usage").await;
    assert_eq!(
        (after["usedQuantity"].clone(), after["usedAmount"].clone()),
        (json!(110), json!(54))
    );
    assert_eq!(after["available"], json!({"quantity": 15, "amount": 6}));
    assert_eq!(
        [
            &after["isSoftLimitReached"],
            &after["isHardLimitReached"],
            &after["isTrialLimitReached"]
        ],
        [&json!(true), &json!(false), &json!(false)]
    );

    // An amount refusal over HTTP carries the amounts; a partial takes what fits.
    let refused = problem(
        api.post(&json!({"id": "s2", "subscriptionId": "sub_st", "quantity": 20}))
            .await,
        409,
        "usage_limit_exceeded",
    )
    .await;
    assert_eq!(refused["available"], json!(15));
    assert_eq!(
        (
            refused["limit"]["limitAmount"].clone(),
            refused["limit"]["usedAmount"].clone()
        ),
        (json!(60), json!(54))
    );
    let partial = api
        .post(&json!({"id": "s3", "subscriptionId": "sub_st", "quantity": 20, "acceptPartialQuantity": true}))
        .await;
    assert_eq!(partial.status(), StatusCode::CREATED);
    assert_eq!(partial.json::<Value>().await.unwrap()["quantity"], json!(15));
    let full = status("/subscriptions/sub_st/usage").await;
    assert_eq!(full["isHardLimitReached"], json!(true));
    assert_eq!(full["available"], json!({"quantity": 0, "amount": 0}));

    // An invoiced period is closed and names its invoice.
    let invoice = json!({"type": "invoice-issued", "invoiceId": "inv_9", "issuedTime": Utc::now().to_rfc3339(),
        "items": [{"invoiceItemId": "ii_9", "subscriptionId": "sub_st",
                   "periodStartTime": full["period"]["startTime"], "periodEndTime": full["period"]["endTime"]}]});
    let invoice = usage_worker::domain::invoice::decode_invoice_event(invoice.to_string().as_bytes()).unwrap();
    store::apply_invoices(
        &env.pool,
        "test",
        "invoice-events",
        &[ControlMessage {
            partition: 0,
            offset: 0,
            body: invoice,
        }],
        &test_kit::period_closing(),
        |_, _| None,
        &[],
        &[],
    )
    .await
    .unwrap();
    let invoiced = status("/subscriptions/sub_st/usage").await;
    assert_eq!(
        (
            invoiced["period"]["closed"].clone(),
            invoiced["period"]["invoiceId"].clone()
        ),
        (json!(true), json!("inv_9"))
    );

    // The errors: unknown subscription, no period at the instant, bad `at`.
    problem(
        api.get("/subscriptions/sub_nobody/usage").await,
        404,
        "subscription_not_found",
    )
    .await;
    let before = url_encode(&days(-400));
    let outside = api.get(&format!("/subscriptions/sub_st/usage?at={before}")).await;
    problem(outside, 409, "no_service_period").await;
    let bad = problem(
        api.get("/subscriptions/sub_st/usage?at=yesterday").await,
        422,
        "invalid_field",
    )
    .await;
    assert_eq!(invalid_fields(&bad), ["at"]);
    let twice = format!("/subscriptions/sub_st/usage?at={before}&at={before}");
    let repeated = problem(api.get(&twice).await, 422, "invalid_field").await;
    assert_eq!(invalid_fields(&repeated), ["at"]);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_usage_status_is_behind_the_bearer_token() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let mut settings = env.settings();
    settings.http.bearer_token = Some(Secret::new("s3cret"));
    let api = TestApi::serve(&settings).await;
    problem(api.get("/subscriptions/sub_a/usage").await, 401, "unauthorized").await;
    let allowed = api
        .client
        .get(api.url("/subscriptions/sub_a/usage"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_metrics_label_only_known_methods_and_routes() {
    let env = TestEnv::start().await;
    let api = TestApi::serve(&env.settings()).await;
    for (method, path) in [
        ("FOOBAR", "/usages"),
        ("X-SCAN-1", "/nowhere"),
        ("X-SCAN-2", "/healthz"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = api.client.request(method, api.url(path)).send().await.unwrap();
        assert!(response.status().is_client_error(), "{path}: {}", response.status());
    }
    let page = api.metrics().await;
    let requests: Vec<&str> = page
        .lines()
        .filter(|line| line.starts_with("usage_worker_http_requests_total{"))
        .collect();
    assert!(!requests.is_empty(), "{page}");
    for line in &requests {
        assert!(!line.contains("FOOBAR") && !line.contains("X-SCAN"), "{line}");
    }
    assert!(
        requests.iter().any(|line| line.contains(r#"method="other""#)),
        "{requests:?}"
    );
    assert!(!page.contains("/nowhere"), "an unknown path is not a label");
    api.shutdown().await;
}
