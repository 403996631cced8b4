//! `POST /usage-batches` end to end, against a real PostgreSQL database:
//! each result is what `POST /usages` answers for the same body at that
//! point, bodies share the limits, the request as a whole is refused for
//! what is wrong with it as a whole, `Idempotency-Key` derives stable ids
//! per index, a body the database refuses is refused alone, a transient
//! failure commits nothing, concurrent batches that race for ids are tried
//! again, and created usages reach `usage-results`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use test_kit::{active_subscription, ApiServer, TestEnv, PARTITIONS};
use usage_worker::config::{Partitioner, Secret, Settings};
use usage_worker::domain::subscription::decode_snapshot;
use usage_worker::http::ApiConfig;
use usage_worker::kafka::partition::output_partition;
use usage_worker::metrics::Metrics;
use usage_worker::store::{self, apply_snapshots, ControlMessage, SnapshotChange};

const WAIT: Duration = Duration::from_secs(60);

/// An HTTP API served in-process on a free local port.
struct TestApi {
    server: ApiServer,
    client: reqwest::Client,
    token: Option<&'static str>,
}

impl TestApi {
    async fn serve(settings: &Settings) -> Self {
        let pool = store::connect(&settings.database).await.unwrap();
        let config = ApiConfig::from_settings(settings, PARTITIONS, false);
        Self {
            server: ApiServer::start(pool, config, Arc::new(Metrics::default())).await,
            client: reqwest::Client::new(),
            token: None,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, self.url(path));
        match self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `POST /usage-batches` with `body` as it is, as JSON, and an
    /// `Idempotency-Key` when given.
    async fn batch_raw(&self, body: String, key: Option<&str>) -> reqwest::Response {
        let mut request = self
            .request(reqwest::Method::POST, "/usage-batches")
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.unwrap()
    }

    /// A batch of these usage bodies (raw JSON texts): its 200 results.
    async fn batch_of(&self, usages: &[String], key: Option<&str>) -> Vec<Value> {
        let response = self.batch_raw(batch_body(usages), key).await;
        results(response).await
    }

    /// `POST /usages` with one body, as JSON.
    async fn post_raw(&self, body: &str) -> reqwest::Response {
        self.request(reqwest::Method::POST, "/usages")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// `{"usages": [...]}` around raw usage bodies.
fn batch_body(usages: &[String]) -> String {
    format!(r#"{{"usages": [{}]}}"#, usages.join(", "))
}

/// The results of a 200 answer, each checked to carry its index.
async fn results(response: reqwest::Response) -> Vec<Value> {
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap_or_else(|| panic!("{body}")).clone();
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], index, "{result}");
    }
    results
}

fn statuses(results: &[Value]) -> Vec<u64> {
    results.iter().map(|r| r["status"].as_u64().unwrap()).collect()
}

fn code(result: &Value) -> &str {
    result["problem"]["code"].as_str().unwrap_or("-")
}

/// Checks the RFC 9457 members of a problem response and returns its body.
async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{response:?}");
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["type"],
        format!("https://usage-worker.dev/problems/{code}"),
        "{body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
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

/// Stores a subscription snapshot directly, as the worker would.
async fn subscribe(env: &TestEnv, snapshot: &Value) {
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

/// The same snapshot under another id: the same period to the microsecond.
fn twin(snapshot: &Value, id: &str) -> Value {
    let mut twin = snapshot.clone();
    twin["id"] = json!(id);
    twin
}

async fn used(env: &TestEnv, subscription: &str) -> Decimal {
    sqlx::query_scalar("SELECT coalesce(sum(used), 0) FROM service_periods WHERE subscription_id = $1")
        .bind(subscription)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The outbox records stored for a topic and a subscription: payloads.
async fn outbox(env: &TestEnv, topic: &str, subscription: &str) -> Vec<Value> {
    let rows: Vec<(Vec<u8>,)> =
        sqlx::query_as("SELECT payload FROM outbox WHERE topic = $1 AND key = convert_to($2, 'UTF8') ORDER BY seq")
            .bind(topic)
            .bind(subscription)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(payload,)| serde_json::from_slice(&payload).unwrap())
        .collect()
}

/// `usg_` + the first 24 lowercase hex digits of SHA-256 of `text`.
fn derived_id(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("usg_{}", &hex[..24])
}

fn days(n: i64) -> String {
    (Utc::now() + chrono::Duration::days(n)).to_rfc3339()
}

/// A usage body for `subscription` with `id` (none for `None`) and
/// `quantity` (JSON text), plus `more` members (JSON text, with a leading
/// comma).
fn usage(id: Option<&str>, subscription: &str, quantity: &str, more: &str) -> String {
    let id = id.map(|id| format!(r#""id": "{id}", "#)).unwrap_or_default();
    format!(r#"{{{id}"subscriptionId": "{subscription}", "quantity": {quantity}{more}}}"#)
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// A result or a response body, with what differs between two identical
/// requests to two twin subscriptions taken out: the name (`batch` becomes
/// `single`), the times of creation, and the usage time that defaults to
/// them.
fn comparable(value: &Value) -> Value {
    let mut value: Value = serde_json::from_str(&value.to_string().replace("batch", "single")).unwrap();
    if let Some(object) = value.as_object_mut() {
        object.remove("createdTime");
        object.remove("updatedTime");
        object.remove("usageTime");
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_result_is_what_post_usages_answers_for_that_body_at_that_point() {
    let env = TestEnv::start().await;
    let mut sub = active_subscription("sub_batch", Some("10"));
    sub["usageLimits"]["softLimit"] = json!(5);
    subscribe(&env, &sub).await;
    subscribe(&env, &twin(&sub, "sub_single")).await;
    let api = TestApi::serve(&env.settings()).await;

    // The same bodies for both subscriptions, ids and subscription named by
    // `name`.
    let tomorrow = days(1);
    let bodies = |name: &str| -> Vec<String> {
        let sub = format!("sub_{name}");
        let id = |i: u32| format!("{name}-{i}");
        vec![
            usage(Some(id(0).as_str()), &sub, "4", ""),
            // The same request (the quantity by value): a repeat.
            usage(Some(id(0).as_str()), &sub, r#""4.000""#, ""),
            // The same id, another request.
            usage(Some(id(0).as_str()), &sub, "5", ""),
            usage(Some(id(3).as_str()), &sub, "-1", ""),
            // 6 are left: too much, then clamped, then nothing left.
            usage(Some(id(4).as_str()), &sub, "7", ""),
            usage(Some(id(5).as_str()), &sub, "7", r#", "acceptPartialQuantity": true"#),
            usage(Some(id(6).as_str()), &sub, "0.5", ""),
            usage(Some(id(7).as_str()), "sub_nobody", "1", ""),
            "[1]".to_owned(),
            usage(Some(id(9).as_str()), &sub, "1", r#", "quantity": 2"#),
            usage(
                Some(id(10).as_str()),
                &sub,
                "1",
                &format!(r#", "usageTime": "{tomorrow}""#),
            ),
            usage(
                Some(id(11).as_str()),
                &sub,
                "1",
                &format!(r#", "x": "{}""#, "a".repeat(70_000)),
            ),
            usage(None, &sub, "1", ""),
            usage(Some(id(0).as_str()), &sub, "4", r#", "acceptPartialQuantity": null"#),
        ]
    };

    let batch = api.batch_of(&bodies("batch"), None).await;
    assert_eq!(
        statuses(&batch),
        [201, 200, 409, 422, 409, 201, 409, 422, 422, 422, 422, 413, 409, 200]
    );
    let codes: Vec<&str> = batch.iter().map(code).collect();
    assert_eq!(
        codes,
        [
            "-",
            "-",
            "idempotency_conflict",
            "invalid_field",
            "usage_limit_exceeded",
            "-",
            "usage_limit_exceeded",
            "subscription_not_found",
            "malformed_payload",
            "malformed_payload",
            "usage_time_in_future",
            "payload_too_large",
            "usage_limit_exceeded",
            "-"
        ]
    );
    assert_eq!(
        batch[0]["usage"], batch[1]["usage"],
        "a repeat answers the stored usage"
    );
    assert_eq!(batch[0]["usage"], batch[13]["usage"]);
    assert_eq!(batch[4]["problem"]["available"], json!(6));
    assert_eq!(batch[5]["usage"]["quantity"], json!(6));
    assert_eq!(batch[6]["problem"]["available"], json!(0));

    // POST /usages, one body after the other, on the twin: the same answers.
    for (index, body) in bodies("single").iter().enumerate() {
        let response = api.post_raw(body).await;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        let result = &batch[index];
        assert_eq!(result["status"], status, "body {index}: {answer}");
        let member = if status < 300 { "usage" } else { "problem" };
        assert_eq!(
            comparable(&result[member]),
            comparable(&answer),
            "body {index} of the batch (left) and alone (right)"
        );
        assert!(
            result.get(if status < 300 { "problem" } else { "usage" }).is_none(),
            "{result}"
        );
    }

    // The same state came of both: the same usage, the same alerts, one
    // outcome per created body and nothing for the rest.
    assert_eq!(used(&env, "sub_batch").await, Decimal::TEN);
    assert_eq!(used(&env, "sub_single").await, Decimal::TEN);
    let created = outbox(&env, "usage-results", "sub_batch").await;
    let created_ids: Vec<&str> = created.iter().map(|o| o["eventId"].as_str().unwrap()).collect();
    assert_eq!(created_ids, ["batch-0", "batch-5"]);
    for (outcome, index) in created.iter().zip([0, 5]) {
        assert_eq!(outcome["status"], "created");
        assert_eq!(outcome["source"], json!({"http": true}));
        assert_eq!(outcome["usage"], batch[index]["usage"], "{outcome}");
    }
    assert_eq!(created[1]["partial"], true);
    assert_eq!(created[1]["requestedQuantity"], json!(7));
    let single = outbox(&env, "usage-results", "sub_single").await;
    assert_eq!(single.len(), 2);
    let alerts = |outcomes: Vec<Value>| -> Vec<String> {
        outcomes
            .iter()
            .map(|a| format!("{} {} {}", a["type"], a["threshold"], a["usageId"]))
            .collect()
    };
    let batch_alerts = alerts(outbox(&env, "usage-alerts", "sub_batch").await);
    assert_eq!(batch_alerts.len(), 4, "soft 75, 90, 100 and hard: {batch_alerts:?}");
    assert_eq!(
        batch_alerts.join("\n").replace("batch", "single"),
        alerts(outbox(&env, "usage-alerts", "sub_single").await).join("\n")
    );

    // Counted as POST /usages counts: each body's decision, and the batch's
    // transaction and request.
    let page = api.metrics().await;
    for (name, value) in [
        (
            r#"usage_worker_messages_decided_total{reason="",source="http",status="created"}"#,
            4.0,
        ),
        (
            r#"usage_worker_messages_decided_total{reason="",source="http",status="duplicate"}"#,
            4.0,
        ),
        (
            r#"usage_worker_messages_decided_total{reason="usage_limit_exceeded",source="http",status="rejected"}"#,
            6.0,
        ),
        (
            r#"usage_worker_transaction_duration_seconds_count{kind="http_batch"}"#,
            1.0,
        ),
        (
            r#"usage_worker_http_requests_total{method="POST",route="/usage-batches",status="200"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric(&page, name), value, "{name}\n{page}");
    }
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_of_one_batch_share_the_limits_of_their_subscriptions() {
    let env = TestEnv::start().await;
    let sub = active_subscription("sub_x", Some("10"));
    subscribe(&env, &sub).await;
    subscribe(&env, &twin(&sub, "sub_y")).await;
    let api = TestApi::serve(&env.settings()).await;

    // Together over the hard limit: the second is refused, or clamped.
    let results = api
        .batch_of(
            &[
                usage(Some("y-1"), "sub_y", "6", ""),
                usage(Some("x-1"), "sub_x", "6", ""),
                usage(Some("x-2"), "sub_x", "6", ""),
                usage(Some("y-2"), "sub_y", "6", r#", "acceptPartialQuantity": true"#),
            ],
            None,
        )
        .await;
    assert_eq!(statuses(&results), [201, 201, 409, 201]);
    assert_eq!(code(&results[2]), "usage_limit_exceeded");
    assert_eq!(results[2]["problem"]["available"], json!(4));
    assert_eq!(results[2]["problem"]["limit"]["used"], json!(6));
    assert_eq!(results[3]["usage"]["quantity"], json!(4));
    assert_eq!(used(&env, "sub_x").await, Decimal::new(6, 0));
    assert_eq!(used(&env, "sub_y").await, Decimal::TEN);
    // And against what is stored: nothing is left on sub_y.
    let more = api.batch_of(&[usage(Some("y-3"), "sub_y", "0.001", "")], None).await;
    assert_eq!(code(&more[0]), "usage_limit_exceeded");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM usages").await,
        3,
        "x-1, y-1 and y-2"
    );
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_refused_whole_for_what_is_wrong_with_it_as_a_whole() {
    let env = TestEnv::start().await;
    subscribe(&env, &active_subscription("sub_a", None)).await;
    let mut settings = env.settings();
    settings.http.max_batch_bytes = 100_000;
    let api = TestApi::serve(&settings).await;
    let one = usage(None, "sub_a", "1", "");

    // 0 and 1,001 bodies; no usages; usages not an array.
    let many = vec![one.clone(); 1001];
    for (body, code, fields) in [
        (batch_body(&[]), "invalid_field", vec!["usages"]),
        (batch_body(&many), "invalid_field", vec!["usages"]),
        ("{}".to_owned(), "missing_field", vec!["usages"]),
        (r#"{"usages": null}"#.to_owned(), "missing_field", vec!["usages"]),
        (format!(r#"{{"usages": {one}}}"#), "invalid_field", vec!["usages"]),
        ("not json".to_owned(), "malformed_payload", vec![]),
        (format!("[{one}]"), "malformed_payload", vec![]),
        (
            format!(r#"{{"usages": [{one}], "usages": [{one}]}}"#),
            "malformed_payload",
            vec![],
        ),
    ] {
        let response = api.batch_raw(body, None).await;
        let problem = problem(response, 422, code).await;
        assert_eq!(invalid_fields(&problem), fields, "{problem}");
        if !fields.is_empty() {
            assert_eq!(problem["field"], "usages", "{problem}");
        }
    }
    let count = api.batch_raw(batch_body(&many), None).await;
    let count = count.json::<Value>().await.unwrap();
    assert!(count["detail"].as_str().unwrap().contains("1001"), "{count}");

    // The batch's own body limit: over it, 413 unread; under it (but over
    // what one usage body may be), 1,000 bodies are decided.
    let padded = |pad: usize| usage(None, "sub_a", "1", &format!(r#", "note": "{}""#, "x".repeat(pad)));
    let over = vec![padded(60); 1000];
    assert!(batch_body(&over).len() > 100_000);
    let response = api.batch_raw(batch_body(&over), None).await;
    let too_large = problem(response, 413, "payload_too_large").await;
    assert!(too_large["detail"].as_str().unwrap().contains("100000"), "{too_large}");
    let under = vec![padded(30); 1000];
    assert!((65_536..100_000).contains(&batch_body(&under).len()));
    let decided = api.batch_of(&under, None).await;
    assert_eq!(decided.len(), 1000);
    assert!(decided.iter().all(|r| r["status"] == 201));

    // JSON only, and the header is required.
    let text = api
        .client
        .post(api.url("/usage-batches"))
        .header("content-type", "text/plain")
        .body(batch_body(std::slice::from_ref(&one)))
        .send()
        .await
        .unwrap();
    problem(text, 415, "unsupported_media_type").await;
    let bare = api
        .client
        .post(api.url("/usage-batches"))
        .body(batch_body(std::slice::from_ref(&one)))
        .send()
        .await
        .unwrap();
    problem(bare, 415, "unsupported_media_type").await;
    let charset = api
        .client
        .post(api.url("/usage-batches"))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(batch_body(std::slice::from_ref(&one)))
        .send()
        .await
        .unwrap();
    assert_eq!(results(charset).await[0]["status"], 201);
    let get = api.client.get(api.url("/usage-batches")).send().await.unwrap();
    assert_eq!(get.headers()["allow"], "POST");
    problem(get, 405, "method_not_allowed").await;

    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM usages").await,
        1001,
        "only the batch of 1,000 and the one with a charset"
    );
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_gives_each_body_the_id_of_key_and_index_so_a_retried_batch_counts_once() {
    let env = TestEnv::start().await;
    subscribe(&env, &active_subscription("sub_a", None)).await;
    let api = TestApi::serve(&env.settings()).await;
    let bodies = [
        usage(None, "sub_a", "1", ""),
        usage(Some("own"), "sub_a", "1", ""),
        usage(None, "sub_a", "2", ""),
    ];

    let first = api.batch_of(&bodies, Some("nightly-7")).await;
    assert_eq!(statuses(&first), [201, 201, 201]);
    let ids: Vec<&str> = first.iter().map(|r| r["usage"]["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            derived_id("nightly-7:0").as_str(),
            "own",
            derived_id("nightly-7:2").as_str()
        ]
    );
    // The retry after a lost answer finds every usage: 200, nothing counted again.
    let retry = api.batch_of(&bodies, Some("nightly-7")).await;
    assert_eq!(statuses(&retry), [200, 200, 200]);
    for (again, created) in retry.iter().zip(&first) {
        assert_eq!(again["usage"], created["usage"]);
    }
    assert_eq!(used(&env, "sub_a").await, Decimal::new(4, 0));
    assert_eq!(outbox(&env, "usage-results", "sub_a").await.len(), 3);
    // The same key for a different body at an index: a conflict.
    let other = api.batch_of(&[usage(None, "sub_a", "5", "")], Some("nightly-7")).await;
    assert_eq!(code(&other[0]), "idempotency_conflict");

    // Without a key, a random id each time: the same batch counts again.
    let unkeyed = [usage(None, "sub_a", "1", "")];
    let a = api.batch_of(&unkeyed, None).await;
    let b = api.batch_of(&unkeyed, None).await;
    assert_eq!(statuses(&a), [201]);
    assert_eq!(statuses(&b), [201]);
    assert_ne!(a[0]["usage"]["id"], b[0]["usage"]["id"]);
    assert!(a[0]["usage"]["id"].as_str().unwrap().starts_with("usg_"));

    // A key that breaks the rules: 422 on the header for each body that
    // needed it; a body with its own id goes.
    let invalid = api
        .batch_of(
            &[usage(None, "sub_a", "1", ""), usage(Some("own-2"), "sub_a", "1", "")],
            Some("k".repeat(256).as_str()),
        )
        .await;
    assert_eq!(statuses(&invalid), [422, 201]);
    assert_eq!(invalid[0]["problem"]["field"], "Idempotency-Key");
    assert_eq!(invalid_fields(&invalid[0]["problem"]), ["Idempotency-Key"]);
    api.shutdown().await;

    // Behind the token, as POST /usages: 401 without it, and the caller's
    // name scopes the key.
    let mut settings = env.settings();
    settings.http.bearer_token = Some(Secret::new("s3cret"));
    let mut guarded = TestApi::serve(&settings).await;
    let anonymous = guarded.batch_raw(batch_body(&bodies), Some("nightly-7")).await;
    problem(anonymous, 401, "unauthorized").await;
    guarded.token = Some("s3cret");
    let named = guarded.batch_of(&bodies, Some("nightly-7")).await;
    assert_eq!(statuses(&named), [201, 200, 201]);
    assert_eq!(named[0]["usage"]["id"], derived_id("bearer_token:nightly-7:0").as_str());
    guarded.shutdown().await;
}

/// A trigger that raises `sqlstate` when a usage with id `id` is inserted.
async fn refuse_usage_id(env: &TestEnv, id: &str, sqlstate: &str) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_{id}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.id = '{id}' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_{id} BEFORE INSERT ON usages FOR EACH ROW EXECUTE FUNCTION refuse_{id}();"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_the_database_refuses_gets_422_alone_and_the_others_commit() {
    let env = TestEnv::start().await;
    // The database refuses one usage with a data exception (SQLSTATE 22023).
    refuse_usage_id(&env, "poison", "22023").await;
    subscribe(&env, &active_subscription("sub_p", Some("2"))).await;
    let api = TestApi::serve(&env.settings()).await;

    let results = api
        .batch_of(
            &[
                usage(Some("before"), "sub_p", "1", ""),
                usage(Some("poison"), "sub_p", "1", ""),
                // Fits: the refused body's quantity is not counted.
                usage(Some("after"), "sub_p", "1", ""),
                usage(Some("before"), "sub_p", "1", ""),
                usage(Some("poison"), "sub_p", "1", ""),
            ],
            None,
        )
        .await;
    assert_eq!(statuses(&results), [201, 422, 201, 200, 409]);
    assert_eq!(code(&results[1]), "unprocessable");
    assert_eq!(results[1]["problem"]["invalidFields"], json!([]));
    // The limit is full now: the refused id is decided as a new request again.
    assert_eq!(code(&results[4]), "usage_limit_exceeded");
    assert_eq!(used(&env, "sub_p").await, Decimal::TWO);
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM usages ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(ids, ["after", "before"]);
    let outcomes = outbox(&env, "usage-results", "sub_p").await;
    let created: Vec<&str> = outcomes.iter().map(|o| o["eventId"].as_str().unwrap()).collect();
    assert_eq!(created, ["before", "after"]);

    // POST /usages answers the refused body the same (where the limit lets
    // it get as far as the database).
    subscribe(&env, &active_subscription("sub_q", None)).await;
    let alone = api.post_raw(&usage(Some("poison"), "sub_q", "1", "")).await;
    assert_eq!(problem(alone, 422, "unprocessable").await, results[1]["problem"]);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_failure_answers_503_for_the_whole_batch_and_commits_nothing() {
    let env = TestEnv::start().await;
    // Not about the data: a cancelled statement (SQLSTATE 57014).
    refuse_usage_id(&env, "stall", "57014").await;
    subscribe(&env, &active_subscription("sub_t", None)).await;
    let api = TestApi::serve(&env.settings()).await;

    let keyed = [
        usage(Some("ok-1"), "sub_t", "1", ""),
        usage(Some("stall"), "sub_t", "1", ""),
        usage(None, "sub_t", "1", ""),
    ];
    let response = api.batch_raw(batch_body(&keyed), Some("k")).await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body = problem(response, 503, "service_unavailable").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(!detail.contains("count twice") && detail.contains("retry"), "{detail}");
    // Without a key, the body without an id could count twice on a retry.
    let response = api.batch_raw(batch_body(&keyed), None).await;
    let body = problem(response, 503, "service_unavailable").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("count twice"), "{detail}");

    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 0);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(used(&env, "sub_t").await, Decimal::ZERO);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_racing_for_the_same_ids_create_each_id_once() {
    let env = TestEnv::start().await;
    let sub = active_subscription("sub_l", None);
    subscribe(&env, &sub).await;
    subscribe(&env, &twin(&sub, "sub_r")).await;
    let api = TestApi::serve(&env.settings()).await;

    // The same ids for two subscriptions: neither lock keeps the batches
    // apart, so one inserts first and the other, deciding again, finds
    // those ids taken by another request.
    for round in 0..5 {
        let bodies = |sub: &str| -> Vec<String> {
            (0..20)
                .map(|i| usage(Some(format!("c-{round}-{i}").as_str()), sub, "1", ""))
                .collect()
        };
        let (left, right) = (bodies("sub_l"), bodies("sub_r"));
        let (left, right) = tokio::join!(api.batch_of(&left, None), api.batch_of(&right, None));
        for (i, (l, r)) in left.iter().zip(&right).enumerate() {
            let mut pair = [l["status"].as_u64().unwrap(), r["status"].as_u64().unwrap()];
            pair.sort_unstable();
            assert_eq!(pair, [201, 409], "round {round}, body {i}: {l} {r}");
            let refused = if l["status"] == 409 { l } else { r };
            assert_eq!(code(refused), "idempotency_conflict");
        }
    }
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 100);
    assert_eq!(
        used(&env, "sub_l").await + used(&env, "sub_r").await,
        Decimal::new(100, 0)
    );
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn created_bodies_reach_usage_results_beside_the_worker_one_outcome_each() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_w", Some("5")));
    let settings = env.settings();
    let worker = env.worker_with(settings.clone()).await;
    env.wait_for_count("SELECT count(*) FROM subscriptions", 1).await;
    let api = TestApi::serve(&settings).await;

    let results = api
        .batch_of(
            &[
                usage(Some("w-1"), "sub_w", "2", ""),
                usage(Some("w-1"), "sub_w", "2", ""),
                usage(Some("w-2"), "sub_w", "9", ""),
                usage(Some("w-3"), "sub_w", "3", ""),
            ],
            None,
        )
        .await;
    assert_eq!(statuses(&results), [201, 200, 409, 201]);

    let reader = env.results_reader();
    let records = reader.read(2, WAIT);
    assert!(
        reader.read_rest(Duration::from_secs(1)).is_empty(),
        "duplicates and rejections publish nothing"
    );
    let partition = output_partition("sub_w", PARTITIONS, Partitioner::Murmur2);
    let mut ids = Vec::new();
    for record in &records {
        assert_eq!(record.partition, partition);
        assert_eq!(record.key.as_deref(), Some("sub_w"));
        assert_eq!(record.value["status"], "created");
        assert_eq!(record.value["source"], json!({"http": true}));
        assert_eq!(record.headers["event-id"], record.value["eventId"].as_str().unwrap());
        ids.push(record.value["eventId"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids, ["w-1", "w-3"]);
    // w-3 filled the hard limit: its alert is raised.
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM limit_alerts WHERE usage_id = 'w-3'")
            .await,
        1
    );
    api.shutdown().await;
    worker.shutdown().await.unwrap();
}
