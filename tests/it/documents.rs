//! Documents that cannot drift: docs/openapi.yaml, docs/asyncapi.yaml and the
//! JSON Schemas under docs/schemas/ are held to what the code really does,
//! and the dashboards to the metrics it really exports.
//!
//! - Statically: the documents parse; every `$ref` resolves; every schema
//!   compiles and means the same under draft-07 (AsyncAPI's schema dialect)
//!   as under 2020-12; output schemas are closed (`additionalProperties:
//!   false`); every example in the documents matches its schema, and its
//!   amounts and alert ids are what the worker computes; the routes
//!   the router is built from are the documented paths and methods; every
//!   metric the registry exports is charted in the Grafana dashboard and the dashboard
//!   names no other; the monitoring services of docker-compose.yml, the
//!   Prometheus config and the Grafana provisioning agree with each other.
//! - Live: a real worker with the HTTP API beside it (and an API whose
//!   database does not answer) gets traffic that produces every documented
//!   status of every operation, every outcome status and reason code, every
//!   alert type and soft-limit step (with outcomes and alerts under an amount
//!   limit) and every dead-letter reason. Each response is validated
//!   against the operation's documented status, media type, headers and
//!   schema; each record on usage-results, usage-alerts and
//!   usage-events-dlq against its channel's key, headers and payload
//!   schemas; each input the test sends against the input schemas. The
//!   router is probed for the method set of every documented path, and the
//!   dashboard's label matchers against the labels on the live /metrics.

use test_kit::wait_until;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use jsonschema::{Draft, Validator};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use serde_json::{json, Value};
use test_kit::{active_subscription, ApiServer, Reader, Record, TestEnv, PARTITIONS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use usage_worker::config::Secret;
use usage_worker::http::ApiConfig;
use usage_worker::metrics::Metrics;
use usage_worker::pipeline::sampler::Sampler;
use usage_worker::store;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "documents-test-token";
/// A token with the `metrics:read` scope alone.
const SCRAPER_TOKEN: &str = "documents-test-scraper";

/// Reason codes no test traffic can produce: `unprocessable` needs the
/// database to refuse data that validation let through, which validation
/// is built to prevent.
const UNPRODUCIBLE_CODES: [&str; 1] = ["unprocessable"];

// ---------------------------------------------------------------------------
// Files

fn path_of(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read_text(relative: &str) -> String {
    std::fs::read_to_string(path_of(relative)).unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

fn read_json(relative: &str) -> Value {
    serde_json::from_str(&read_text(relative)).unwrap_or_else(|e| panic!("{relative} is not JSON: {e}"))
}

fn read_yaml(relative: &str) -> Value {
    serde_yaml::from_str(&read_text(relative)).unwrap_or_else(|e| panic!("{relative} is not YAML: {e}"))
}

/// A JSON or YAML file of the repository, by its extension.
fn read_document(relative: &str) -> Value {
    if relative.ends_with(".json") {
        read_json(relative)
    } else {
        read_yaml(relative)
    }
}

/// The file a relative reference names, seen from the file `from`; both
/// relative to the repository.
fn joined(from: &str, reference: &str) -> String {
    let mut parts: Vec<&str> = from.split('/').collect();
    parts.pop();
    for part in reference.split('/') {
        match part {
            "." | "" => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

fn schema_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(path_of("docs/schemas"))
        .expect("docs/schemas")
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".json"))
        .map(|name| format!("docs/schemas/{name}"))
        .collect();
    files.sort();
    files
}

/// Every string value under `key` anywhere in `value`, with its JSON pointer.
fn strings_under(value: &Value, key: &str, pointer: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{pointer}/{}", k.replace('~', "~0").replace('/', "~1"));
                match v {
                    Value::String(s) if k == key => found.push((here, s.clone())),
                    _ => strings_under(v, key, &here, found),
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings_under(v, key, &format!("{pointer}/{i}"), found);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Schemas

/// Loads the files that schemas refer to by relative path. Nothing is
/// fetched from the network: a schema that needs to is a failure.
struct RepositoryFiles;

impl jsonschema::Retrieve for RepositoryFiles {
    fn retrieve(&self, uri: &jsonschema::Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let path = url::Url::parse(uri.as_str())?
            .to_file_path()
            .map_err(|()| format!("{uri} is not a file of the repository"))?;
        Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
    }
}

/// Compiles `schema`, found in the file `base` (relative to the repository),
/// whose relative references are resolved against that file.
fn compile(schema: &Value, base: &str) -> Validator {
    let base_url = url::Url::from_file_path(path_of(base)).expect("an absolute path");
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .with_retriever(RepositoryFiles)
        .with_base_uri(base_url.to_string())
        .build(schema)
        .unwrap_or_else(|e| panic!("a schema in {base} does not compile: {e}\n{schema:#}"))
}

/// The schema file `name` of docs/schemas, with an optional `#` pointer.
fn schema(name: &str) -> Validator {
    compile(&json!({ "$ref": name }), "docs/schemas/index")
}

fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("  at {:?}: {e}", e.instance_path().to_string()))
        .collect()
}

fn assert_valid(validator: &Validator, instance: &Value, what: &str) {
    let errors = errors(validator, instance);
    assert!(
        errors.is_empty(),
        "{what} does not match its schema:\n{}\n{instance:#}",
        errors.join("\n")
    );
}

/// The `enum` at `pointer` of a schema file.
fn schema_enum(file: &str, pointer: &str) -> BTreeSet<String> {
    read_json(&format!("docs/schemas/{file}"))
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no enum at {file}#{pointer}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn strings(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------
// The OpenAPI document and real HTTP responses

/// A response as it came over the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lowercase names.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    async fn of(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let body = response.bytes().await.expect("a response body").to_vec();
        Self { status, headers, body }
    }

    /// Reads a raw HTTP/1.1 response with a Content-Length.
    fn parse(raw: &[u8]) -> Self {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: HashMap<String, String> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers["content-length"].parse().unwrap();
        let body = raw[split + 4..split + 4 + length].to_vec();
        Self { status, headers, body }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

struct OpenApi {
    doc: Value,
    /// (method, path template, status) of every checked response.
    seen: Mutex<BTreeSet<(String, String, u16)>>,
    /// `code` of every problem checked.
    codes: Mutex<BTreeSet<String>>,
}

impl OpenApi {
    const FILE: &'static str = "docs/openapi.yaml";

    fn load() -> Self {
        Self {
            doc: read_yaml(Self::FILE),
            seen: Mutex::default(),
            codes: Mutex::default(),
        }
    }

    /// Follows a local `$ref`.
    fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) if reference.starts_with('#') => self
                .doc
                .pointer(&reference[1..])
                .unwrap_or_else(|| panic!("{reference} is not in {}", Self::FILE)),
            _ => value,
        }
    }

    fn paths(&self) -> &serde_json::Map<String, Value> {
        self.doc["paths"].as_object().expect("paths")
    }

    /// (method, path) of every operation, the method in uppercase.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut operations = BTreeSet::new();
        for (path, item) in self.paths() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "options", "head", "patch", "trace"].contains(&method.as_str()) {
                    operations.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        operations
    }

    /// Every (method, path, status) the document lists.
    fn documented(&self) -> BTreeSet<(String, String, u16)> {
        let mut documented = BTreeSet::new();
        for (method, path) in self.operations() {
            let responses = self.doc["paths"][&path][method.to_lowercase()]["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} has no responses"));
            for status in responses.keys() {
                documented.insert((method.clone(), path.clone(), status.parse().expect("a numeric status")));
            }
        }
        documented
    }

    /// Checks a response to `method` on the path `template` against the
    /// document: its status is listed, with this media type, the required
    /// headers are there and match, and the body matches the schema.
    /// Returns the body (JSON, or a string for text).
    fn check(&self, method: &str, template: &str, reply: &Reply) -> Value {
        let what = format!("{method} {template} {}", reply.status);
        let operation = self
            .doc
            .pointer(&format!(
                "/paths/{}/{}",
                template.replace('~', "~0").replace('/', "~1"),
                method.to_lowercase()
            ))
            .unwrap_or_else(|| panic!("{method} {template} is not documented"));
        let documented = operation["responses"]
            .get(reply.status.to_string())
            .unwrap_or_else(|| panic!("{what} is not documented: {}", String::from_utf8_lossy(&reply.body)));
        let response = self.resolve(documented);
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in headers {
                let header = self.resolve(header);
                match reply.header(&name.to_ascii_lowercase()) {
                    None => assert!(header["required"] != true, "{what}: header {name} is missing"),
                    Some(value) => {
                        let value = match header["schema"]["type"].as_str() {
                            Some("integer") => json!(value
                                .parse::<i64>()
                                .unwrap_or_else(|_| panic!("{what}: header {name} is not an integer: {value}"))),
                            _ => json!(value),
                        };
                        assert_valid(
                            &compile(&header["schema"], Self::FILE),
                            &value,
                            &format!("{what}: header {name}"),
                        );
                    }
                }
            }
        }
        let body = match response.get("content").and_then(Value::as_object) {
            None => {
                assert!(reply.body.is_empty(), "{what} documents no content but has a body");
                Value::Null
            }
            Some(content) => {
                let content_type = reply
                    .header("content-type")
                    .unwrap_or_else(|| panic!("{what}: no Content-Type"));
                let essence = content_type.split(';').next().unwrap().trim().to_ascii_lowercase();
                let media = content
                    .get(&essence)
                    .unwrap_or_else(|| panic!("{what}: {essence} is not a documented media type"));
                let body = if essence.ends_with("json") {
                    reply.json()
                } else {
                    Value::String(String::from_utf8(reply.body.clone()).expect("a text body is UTF-8"))
                };
                assert_valid(&compile(&media["schema"], Self::FILE), &body, &what);
                if essence == "application/problem+json" {
                    self.check_problem(&body, reply.status, &what);
                }
                body
            }
        };
        self.seen
            .lock()
            .unwrap()
            .insert((method.to_owned(), template.to_owned(), reply.status));
        body
    }

    /// What a schema cannot say about a problem: its `type` ends with its
    /// `code`, and its `status` is the response's.
    fn check_problem(&self, body: &Value, status: u16, what: &str) {
        let code = body["code"].as_str().unwrap();
        assert_eq!(
            body["type"],
            format!("https://usage-worker.dev/problems/{code}"),
            "{what}"
        );
        assert_eq!(body["status"], status, "{what}");
        self.codes.lock().unwrap().insert(code.to_owned());
    }

    /// A response of no documented operation (an unknown path, a method a
    /// path does not have): a problem, by problem.json.
    fn check_fallback(&self, reply: &Reply, status: u16, code: &str) -> Value {
        assert_eq!(reply.status, status, "{:?}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.header("content-type"), Some("application/problem+json"));
        let body = reply.json();
        assert_valid(&schema("problem.json"), &body, &format!("a {status} fallback"));
        self.check_problem(&body, status, "fallback");
        assert_eq!(body["code"], code);
        body
    }
}

/// An HTTP API served in-process on a free local port (as tests/it/http.rs).
struct TestApi {
    addr: String,
    client: reqwest::Client,
    token: Option<&'static str>,
    /// None for a second client of another's server.
    server: Option<ApiServer>,
}

impl TestApi {
    async fn start(pool: sqlx::PgPool, config: ApiConfig, metrics: Arc<Metrics>, token: Option<&'static str>) -> Self {
        let server = ApiServer::start(pool, config, metrics).await;
        Self {
            addr: server.addr.clone(),
            client: reqwest::Client::new(),
            token,
            server: Some(server),
        }
    }

    fn request(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let request = self.client.request(method, format!("http://{}{path}", self.addr));
        match self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Reply::of(request.send().await.expect("the API answers")).await
    }

    async fn call(&self, method: &str, path: &str) -> Reply {
        self.send(self.request(method, path)).await
    }

    async fn post(&self, body: &Value) -> Reply {
        self.send(self.request("POST", "/usages").json(body)).await
    }

    async fn post_raw(&self, content_type: &str, body: Vec<u8>) -> Reply {
        self.send_raw("POST", "/usages", content_type, body).await
    }

    async fn send_raw(&self, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        self.send(
            self.request(method, path)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    async fn put(&self, id: &str, body: &Value) -> Reply {
        self.send(self.request("PUT", &format!("/usages/{id}")).json(body))
            .await
    }

    /// A batch of usage bodies.
    async fn post_batch(&self, usages: &[Value]) -> Reply {
        self.send(
            self.request("POST", "/usage-batches")
                .json(&json!({ "usages": usages })),
        )
        .await
    }

    /// A POST to `path` whose connection ends before the announced body did.
    async fn post_cut_short(&self, path: &str) -> Reply {
        self.cut_short("POST", path).await
    }

    /// A request whose connection ends before the announced body did.
    async fn cut_short(&self, method: &str, path: &str) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{{\"subscri",
            self.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        Reply::parse(&raw)
    }

    async fn shutdown(self) {
        self.server.expect("its own server").shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// The AsyncAPI document and real Kafka records

struct AsyncApi {
    doc: Value,
}

/// What a record or a message carries, for validation.
struct Wire<'a> {
    key: Option<&'a str>,
    headers: Value,
    payload: Value,
}

impl AsyncApi {
    const FILE: &'static str = "docs/asyncapi.yaml";

    fn load() -> Self {
        Self {
            doc: read_yaml(Self::FILE),
        }
    }

    fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) if reference.starts_with('#') => self
                .doc
                .pointer(&reference[1..])
                .unwrap_or_else(|| panic!("{reference} is not in {}", Self::FILE)),
            _ => value,
        }
    }

    /// The channel whose address is `topic`.
    fn channel(&self, topic: &str) -> &Value {
        self.doc["channels"]
            .as_object()
            .unwrap()
            .values()
            .find(|c| c["address"] == topic)
            .unwrap_or_else(|| panic!("no channel for {topic}"))
    }

    /// The message `name` of the channel of `topic`.
    fn message(&self, topic: &str, name: &str) -> &Value {
        let message = self.channel(topic)["messages"]
            .get(name)
            .unwrap_or_else(|| panic!("{topic} has no message {name}"));
        self.resolve(message)
    }

    /// What `wire` breaks of message `name` of `topic`: the key schema of its
    /// Kafka binding, the headers schema and the payload schema.
    fn problems(&self, topic: &str, name: &str, wire: &Wire<'_>) -> Vec<String> {
        let message = self.message(topic, name);
        let mut problems = Vec::new();
        if let (Some(key), Some(schema)) = (wire.key, message.pointer("/bindings/kafka/key")) {
            problems.extend(
                errors(&compile(schema, Self::FILE), &json!(key))
                    .into_iter()
                    .map(|e| format!("key{e}")),
            );
        }
        if let Some(schema) = message.get("headers") {
            let found = errors(&compile(schema, Self::FILE), &wire.headers);
            problems.extend(found.into_iter().map(|e| format!("headers{e}")));
        }
        let schema = message
            .get("payload")
            .unwrap_or_else(|| panic!("{name} has no payload"));
        if schema.get("$ref").is_some() || schema.get("type").is_some() {
            let found = errors(&compile(schema, Self::FILE), &wire.payload);
            problems.extend(found.into_iter().map(|e| format!("payload{e}")));
        }
        problems
    }

    fn assert_matches(&self, topic: &str, name: &str, wire: &Wire<'_>) {
        let problems = self.problems(topic, name, wire);
        assert!(
            problems.is_empty(),
            "a {name} on {topic} does not match docs/asyncapi.yaml:\n{}\nheaders: {}\npayload: {:#}",
            problems.join("\n"),
            wire.headers,
            wire.payload
        );
    }

    /// A record the worker published: it must match the one message its
    /// channel documents.
    fn check_record(&self, topic: &str, record: &Record) {
        let messages = self.channel(topic)["messages"].as_object().unwrap();
        assert_eq!(messages.len(), 1, "{topic} documents one message");
        let name = messages.keys().next().unwrap();
        let payload = if self.message(topic, name)["contentType"] == "application/json" {
            assert!(
                !record.value.is_null(),
                "{topic}: a record that is not JSON: {record:?}"
            );
            record.value.clone()
        } else {
            Value::Null
        };
        let wire = Wire {
            key: record.key.as_deref(),
            headers: json!(record.headers),
            payload,
        };
        self.assert_matches(topic, name, &wire);
    }
}

/// Produces one record with headers, as an upstream system would.
fn produce(env: &TestEnv, topic: &str, key: Option<&str>, payload: &[u8], headers: &[(&str, &str)]) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(payload).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    loop {
        match env.producer.send(record) {
            Ok(()) => return,
            Err((_, r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The router and the metrics, from their source

/// (method, path) of every route the router serves, methods in uppercase.
fn served_routes() -> BTreeSet<(String, String)> {
    let routes: BTreeSet<(String, String)> = usage_worker::http::routes()
        .into_iter()
        .map(|route| (route.method.to_string(), route.path.to_owned()))
        .collect();
    assert!(!routes.is_empty(), "the router serves no route");
    routes
}

/// The full name of every metric the service's registry exports.
fn registered_metrics() -> BTreeSet<String> {
    let names: BTreeSet<String> = Metrics::new().unwrap().names().iter().cloned().collect();
    assert!(names.len() >= 10, "too few metrics registered: {names:?}");
    names
}

// ---------------------------------------------------------------------------
// The dashboard

const DASHBOARD: &str = "dashboards/grafana/usage-worker.json";

/// Every PromQL expression of the dashboard: panel targets and variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    strings_under(dashboard, "expr", "", &mut found);
    strings_under(dashboard, "definition", "", &mut found);
    found.into_iter().map(|(_, expr)| expr).collect()
}

/// Names of the series an expression selects (those of this service).
fn series_in(expr: &str) -> Vec<String> {
    let mut series = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("usage_worker_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        series.push(name);
    }
    series
}

/// The metric a series belongs to: histograms expose `_bucket`, `_sum` and
/// `_count` series.
fn metric_of<'a>(series: &str, metrics: &'a BTreeSet<String>) -> Option<&'a String> {
    metrics.get(series).or_else(|| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| series.strip_suffix(suffix).and_then(|m| metrics.get(m)))
    })
}

/// Label names of a `{...}` matcher list (values may hold braces and commas).
fn matcher_labels(inside: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let (mut name, mut in_value, mut escaped) = (String::new(), false, false);
    for c in inside.chars() {
        if in_value {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_value = false,
                _ => escaped = false,
            }
        } else if c == '"' {
            in_value = true;
        } else if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
        } else if !name.is_empty() {
            labels.push(std::mem::take(&mut name));
        }
    }
    labels
}

/// The text between `open` at `start` and its matching close, quotes aware.
fn enclosed(text: &str, start: usize, open: char, close: char) -> &str {
    let (mut depth, mut in_string) = (0, false);
    for (i, c) in text[start..].char_indices() {
        match c {
            '"' => in_string = !in_string,
            c if c == open && !in_string => depth += 1,
            c if c == close && !in_string => {
                depth -= 1;
                if depth == 0 {
                    return &text[start + 1..start + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced {open} in {text}")
}

/// (series, labels it matches on) and the labels of `by (...)`/`without`
/// clauses of an expression.
fn labels_in(expr: &str) -> (Vec<(String, Vec<String>)>, Vec<String>) {
    let mut selectors = Vec::new();
    for name in series_in(expr) {
        for (i, _) in expr.match_indices(&name) {
            let after = i + name.len();
            let next = expr[after..].chars().next();
            if next == Some('{') {
                selectors.push((name.clone(), matcher_labels(enclosed(expr, after, '{', '}'))));
            } else if !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                selectors.push((name.clone(), Vec::new()));
            }
        }
    }
    let mut grouping = Vec::new();
    for keyword in ["by (", "without ("] {
        for (i, _) in expr.match_indices(keyword) {
            let inside = enclosed(expr, i + keyword.len() - 1, '(', ')');
            grouping.extend(inside.split(',').map(|l| l.trim().to_owned()));
        }
    }
    (selectors, grouping)
}

/// Series name -> label names, from a Prometheus text page.
fn labels_on_page(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in page.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let entry = labels.entry(name.clone()).or_default();
        if line[name.len()..].starts_with('{') {
            entry.extend(matcher_labels(enclosed(line, name.len(), '{', '}')));
        }
    }
    labels
}

// ---------------------------------------------------------------------------
// Static checks

#[test]
fn the_documents_parse_and_every_reference_resolves() {
    let openapi = read_yaml(OpenApi::FILE);
    assert!(
        openapi["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")),
        "OpenAPI 3.1"
    );
    let asyncapi = read_yaml(AsyncApi::FILE);
    assert_eq!(asyncapi["asyncapi"], "3.0.0");

    let mut files = vec![OpenApi::FILE.to_owned(), AsyncApi::FILE.to_owned()];
    files.extend(schema_files());
    let mut cache: HashMap<String, Value> = HashMap::new();
    for file in &files {
        let document = read_document(file);
        let mut references = Vec::new();
        strings_under(&document, "$ref", "", &mut references);
        for (at, reference) in references {
            let (target, pointer) = reference.split_once('#').unwrap_or((&reference, ""));
            let target = if target.is_empty() {
                file.clone()
            } else {
                assert!(
                    !target.contains(':'),
                    "{file}#{at}: {reference} is not a relative reference"
                );
                let target = joined(file, target);
                assert!(
                    target.starts_with("docs/") && path_of(&target).is_file(),
                    "{file}#{at}: {reference} names no file under docs/"
                );
                target
            };
            let resolved = cache.entry(target.clone()).or_insert_with(|| read_document(&target));
            assert!(
                resolved.pointer(pointer).is_some(),
                "{file}#{at}: {reference} points at nothing"
            );
        }
    }
}

#[test]
fn the_schemas_compile_are_portable_and_output_objects_are_closed() {
    // Keywords whose meaning differs between draft-07 (the base of AsyncAPI's
    // schema dialect) and 2020-12, or that draft-07 lacks.
    const DIVERGENT: [&str; 9] = [
        "prefixItems",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$anchor",
    ];
    const ANNOTATIONS: [&str; 5] = ["$ref", "description", "title", "$comment", "examples"];

    fn walk(value: &Value, at: &str, visit: &mut dyn FnMut(&serde_json::Map<String, Value>, &str)) {
        match value {
            Value::Object(map) => {
                visit(map, at);
                for (k, v) in map {
                    walk(v, &format!("{at}/{k}"), visit);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{at}/{i}"), visit);
                }
            }
            _ => {}
        }
    }

    for file in schema_files() {
        let document = read_json(&file);
        assert_eq!(
            document["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{file}"
        );
        assert!(
            document.get("$id").is_none(),
            "{file}: schemas refer to each other by relative path"
        );
        compile(&document, &file);
        walk(&document, "", &mut |map, at| {
            for keyword in DIVERGENT {
                assert!(
                    !map.contains_key(keyword),
                    "{file}#{at}: {keyword} means something else in draft-07"
                );
            }
            if map.get("$ref").is_some_and(Value::is_string) {
                let siblings: Vec<&String> = map.keys().filter(|k| !ANNOTATIONS.contains(&k.as_str())).collect();
                assert!(
                    siblings.is_empty(),
                    "{file}#{at}: draft-07 ignores {siblings:?} beside $ref; use allOf"
                );
            }
            let object = map.get("type").is_some_and(|t| t == "object");
            if let (true, Some(required), Some(properties)) = (object, map.get("required"), map.get("properties")) {
                for name in required.as_array().unwrap() {
                    assert!(
                        properties.get(name.as_str().unwrap()).is_some(),
                        "{file}#{at}: required {name} is not among the properties"
                    );
                }
            }
        });
    }

    // What the service writes is closed: a member added or renamed in the
    // code fails validation. Dead-letter headers stay open on purpose: they
    // keep the original message's headers.
    let openapi = read_yaml(OpenApi::FILE);
    let asyncapi = read_yaml(AsyncApi::FILE);
    let mut references = Vec::new();
    for item in openapi["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            if let Some(responses) = operation.get("responses") {
                strings_under(responses, "$ref", "", &mut references);
            }
        }
    }
    strings_under(&openapi["components"]["responses"], "$ref", "", &mut references);
    for operation in asyncapi["operations"].as_object().unwrap().values() {
        if operation["action"] == "send" {
            let channel = operation["channel"]["$ref"].as_str().unwrap();
            let channel = asyncapi.pointer(&channel[1..]).unwrap();
            for message in channel["messages"].as_object().unwrap().values() {
                let message = asyncapi.pointer(&message["$ref"].as_str().unwrap()[1..]).unwrap();
                strings_under(message, "$ref", "", &mut references);
            }
        }
    }
    let mut pending: Vec<String> = references
        .into_iter()
        .filter_map(|(_, reference)| reference.strip_prefix("./schemas/").map(str::to_owned))
        .collect();
    let mut written = BTreeSet::new();
    while let Some(reference) = pending.pop() {
        let file = reference.split('#').next().unwrap().to_owned();
        if file.is_empty() || file == "dead-letter-headers.json" || !written.insert(file.clone()) {
            continue;
        }
        let mut inner = Vec::new();
        strings_under(&read_json(&format!("docs/schemas/{file}")), "$ref", "", &mut inner);
        pending.extend(inner.into_iter().map(|(_, r)| r));
    }
    assert!(
        written.contains("outcome.json") && written.contains("problem.json"),
        "{written:?}"
    );
    for file in &written {
        let document = read_json(&format!("docs/schemas/{file}"));
        walk(&document, "", &mut |map, at| {
            if map.get("type").is_some_and(|t| t == "object") && map.contains_key("properties") {
                assert_eq!(
                    map.get("additionalProperties"),
                    Some(&json!(false)),
                    "{file}#{at}: an object the service writes must be closed"
                );
            }
        });
    }
}

/// Every `pattern` of the documents (JSON Schemas, OpenAPI, AsyncAPI), with
/// where it is.
fn document_patterns() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut files = schema_files();
    files.extend([OpenApi::FILE.to_owned(), AsyncApi::FILE.to_owned()]);
    for file in files {
        let mut here = Vec::new();
        strings_under(&read_document(&file), "pattern", "", &mut here);
        found.extend(here.into_iter().map(|(at, pattern)| (format!("{file}#{at}"), pattern)));
    }
    found
}

/// What keeps `pattern` out of the regular-expression subset that JSON
/// Schema and OpenAPI recommend (ECMA-262, and what Python's `re`, Go's
/// RE2, Java and the regex crate all read alike), if anything: escapes
/// other than `\uXXXX`, the control escapes and escaped syntax characters
/// (so no `\p{..}`, `\x{..}`, `\A`, nor the shorthand classes `\s` `\d` `\w`,
/// whose sets differ from engine to engine); groups other than `(...)`,
/// `(?:`, `(?=` and `(?!` (so no lookbehind, named groups or inline flags);
/// POSIX classes; possessive quantifiers.
fn unportable(pattern: &str) -> Option<String> {
    const SYNTAX: &str = "^$\\.*+?()[]{}|/-";
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    let mut after_quantifier = false;
    while i < chars.len() {
        let c = chars[i];
        let quantifier = match c {
            '\\' => {
                let next = chars.get(i + 1).copied().unwrap_or(' ');
                if next == 'u' {
                    let hex: String = chars.iter().skip(i + 2).take(4).collect();
                    if hex.len() != 4 || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
                        return Some(format!("\\u needs four hex digits at {i}"));
                    }
                    i += 6;
                    after_quantifier = false;
                    continue;
                }
                if !"tnrfv".contains(next) && !SYNTAX.contains(next) {
                    return Some(format!("the escape \\{next} at {i}"));
                }
                i += 2;
                after_quantifier = false;
                continue;
            }
            '(' if chars.get(i + 1) == Some(&'?') => {
                let kind = chars.get(i + 2).copied().unwrap_or(' ');
                if !":=!".contains(kind) {
                    return Some(format!("the group (?{kind} at {i}"));
                }
                false
            }
            '[' if chars.get(i + 1) == Some(&'[') || chars.get(i + 1) == Some(&':') => {
                return Some(format!("a POSIX or nested class at {i}"));
            }
            '+' if after_quantifier => return Some(format!("a possessive quantifier at {i}")),
            '*' | '+' | '?' | '}' => true,
            _ => false,
        };
        after_quantifier = quantifier;
        i += 1;
    }
    None
}

/// The pattern of a document, compiled by the regex crate (which reads
/// `\uXXXX` as ECMA-262 does): the test of what it accepts.
fn pattern_at(file: &str, pointer: &str) -> regex::Regex {
    let document = read_document(file);
    let pattern = document
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{file}#{pointer}: no pattern"));
    regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{file}#{pointer}: {e}"))
}

/// Every Unicode scalar value, as a one-character string.
fn every_character() -> impl Iterator<Item = (char, String)> {
    (0..=0x10FFFF_u32)
        .filter_map(char::from_u32)
        .map(|c| (c, c.to_string()))
}

#[test]
fn every_pattern_is_portable_and_accepts_what_the_service_accepts() {
    let patterns = document_patterns();
    assert!(patterns.len() >= 20, "too few patterns found: {patterns:?}");
    for (at, pattern) in &patterns {
        if let Some(problem) = unportable(pattern) {
            panic!("{at}: {problem} is not in the portable ECMA-262 subset: {pattern}");
        }
        regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{at}: {e}"));
    }
    // The checker itself: what it must refuse.
    for bad in [
        r"^\p{Cc}$",
        r"^[^\s]$",
        r"(?<=a)b",
        r"(?i)abc",
        r"\x{7F}",
        r"[[:alpha:]]",
        r"a++",
        r"\d",
    ] {
        assert!(unportable(bad).is_some(), "{bad} passed as portable");
    }

    // Spelled out, the patterns accept exactly the characters the service
    // accepts: ids (src/domain/ids.rs), void reasons (correction.rs) and the
    // whitespace before a CloudEvents content type (cloudevents.rs).
    let id = pattern_at("docs/schemas/common.json", "/$defs/id/pattern");
    let reason = pattern_at("docs/schemas/common.json", "/$defs/voidReason/pattern");
    let content_type = pattern_at(
        "docs/schemas/usage-cloudevent-structured-headers.json",
        "/properties/content-type/pattern",
    );
    let structured = |value: &str| {
        let mut headers = usage_worker::domain::headers::Headers::new();
        headers.push("content-type", value);
        usage_worker::domain::cloudevents::framing(&headers) == usage_worker::domain::cloudevents::Framing::Structured
    };
    let (mut ids_refused, mut reasons_refused) = (0, 0);
    for (c, text) in every_character() {
        let in_id = format!("a{text}b");
        let id_ok = usage_worker::domain::ids::check_id(&in_id).is_ok();
        assert_eq!(id.is_match(&in_id), id_ok, "U+{:04X} in an id", c as u32);
        ids_refused += usize::from(!id_ok);
        let reason_ok = usage_worker::domain::correction::check_reason(&text).is_ok();
        assert_eq!(reason.is_match(&text), reason_ok, "U+{:04X} in a void reason", c as u32);
        reasons_refused += usize::from(!reason_ok);
        let typed = format!("{text}application/cloudevents+json");
        assert_eq!(
            content_type.is_match(&typed),
            structured(&typed),
            "U+{:04X} before a content type",
            c as u32
        );
    }
    // Not vacuous: both rules refuse characters, astral ones included.
    assert!(
        ids_refused > 300 && reasons_refused == 65,
        "{ids_refused} {reasons_refused}"
    );
    assert!(!id.is_match("a\u{E0001}b") && id.is_match("a\u{1F600}b"));
    for good in ["usg_1", "ü_ok-ids.too", "order/7781", "ünïcödé"] {
        assert!(id.is_match(good), "{good}");
    }
}

#[test]
fn a_created_usage_links_to_the_operations_on_it() {
    let openapi = OpenApi::load();
    let mut operations: HashMap<String, &Value> = HashMap::new();
    for item in openapi.paths().values() {
        for operation in item.as_object().unwrap().values() {
            if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                operations.insert(id.to_owned(), operation);
            }
        }
    }
    let paths = openapi.paths();
    let by_id = &paths["/usages/{id}"];
    // The path parameters of an operation: what a link must fill in.
    let path_parameters = |operation_id: &str| -> BTreeSet<String> {
        let template = if operation_id == "getUsageHistory" {
            "/usages/{id}/history"
        } else {
            "/usages/{id}"
        };
        let mut names = BTreeSet::new();
        let shared = paths[template]["parameters"].as_array().into_iter().flatten();
        let own = operations[operation_id]["parameters"].as_array().into_iter().flatten();
        for parameter in shared.chain(own).map(|p| openapi.resolve(p)) {
            if parameter["in"] == "path" {
                names.insert(parameter["name"].as_str().unwrap().to_owned());
            }
        }
        names
    };
    assert!(by_id.get("get").is_some());
    let wanted = strings(&["getUsage", "putUsage", "voidUsage", "getUsageHistory"]);
    for (method, path, status) in [
        ("post", "/usages", "201"),
        ("post", "/usages", "200"),
        ("put", "/usages/{id}", "201"),
    ] {
        let response = openapi.resolve(&paths[path][method]["responses"][status]);
        let links = response["links"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} {status} has no links"));
        let mut targets = BTreeSet::new();
        for link in links.values() {
            let link = openapi.resolve(link);
            let target = link["operationId"].as_str().unwrap();
            assert!(operations.contains_key(target), "no operation {target}");
            let parameters: BTreeSet<String> = link["parameters"].as_object().unwrap().keys().cloned().collect();
            assert_eq!(
                parameters,
                path_parameters(target),
                "the parameters of the link to {target}"
            );
            assert_eq!(link["parameters"]["id"], "$response.body#/id");
            targets.insert(target.to_owned());
        }
        assert_eq!(targets, wanted, "{method} {path} {status}");
    }
    // The usage's `id` is where the links say: in the schema of the body.
    let usage = read_json("docs/schemas/usage.json");
    assert!(usage["required"].as_array().unwrap().contains(&json!("id")));
}

#[test]
fn every_example_in_the_documents_matches_its_schema() {
    let openapi = OpenApi::load();
    let mut examples = 0;
    // Every example of a media type: `example`, and each `examples` entry's `value`.
    let media_examples = |media: &Value| -> Vec<(String, Value)> {
        let mut found: Vec<(String, Value)> = media
            .get("example")
            .map(|example| ("example".to_owned(), example.clone()))
            .into_iter()
            .collect();
        for (name, example) in media.get("examples").and_then(Value::as_object).into_iter().flatten() {
            let value = openapi.resolve(example).get("value");
            found.push((
                name.clone(),
                value.unwrap_or_else(|| panic!("example {name} has no value")).clone(),
            ));
        }
        found
    };
    for (method, path) in openapi.operations() {
        let item = &openapi.doc["paths"][&path];
        let operation = &item[method.to_lowercase()];
        let what = format!("{method} {path}");
        let parameters = [&item["parameters"], &operation["parameters"]];
        for parameter in parameters.into_iter().filter_map(Value::as_array).flatten() {
            let parameter = openapi.resolve(parameter);
            if let Some(example) = parameter.get("example") {
                assert_valid(
                    &compile(&parameter["schema"], OpenApi::FILE),
                    example,
                    &format!("the example of parameter {} of {what}", parameter["name"]),
                );
                examples += 1;
            }
        }
        if let Some(content) = operation.pointer("/requestBody/content").and_then(Value::as_object) {
            for media in content.values() {
                for (name, example) in media_examples(media) {
                    assert_valid(
                        &compile(&media["schema"], OpenApi::FILE),
                        &example,
                        &format!("the request {name} of {what}"),
                    );
                    examples += 1;
                }
            }
        }
        for (status, response) in operation["responses"].as_object().unwrap() {
            let response = openapi.resolve(response);
            for (media_type, media) in response.get("content").and_then(Value::as_object).into_iter().flatten() {
                for (name, example) in media_examples(media) {
                    let what = format!("the {status} {name} of {what}");
                    assert_valid(&compile(&media["schema"], OpenApi::FILE), &example, &what);
                    if media_type == "application/problem+json" {
                        openapi.check_problem(&example, status.parse().unwrap(), &what);
                    }
                    examples += 1;
                }
            }
        }
    }
    let asyncapi = AsyncApi::load();
    for (topic_key, channel) in asyncapi.doc["channels"].as_object().unwrap() {
        let topic = channel["address"].as_str().unwrap();
        for name in channel["messages"].as_object().unwrap().keys() {
            let message = asyncapi.message(topic, name);
            for example in message["examples"].as_array().into_iter().flatten() {
                let wire = Wire {
                    key: None,
                    headers: example.get("headers").cloned().unwrap_or(json!({})),
                    payload: example["payload"].clone(),
                };
                if example.get("headers").is_none() && message.get("headers").is_some() {
                    panic!("{topic_key}/{name}: an example without the message's headers");
                }
                asyncapi.assert_matches(topic, name, &wire);
                examples += 1;
            }
        }
    }
    assert!(examples >= 25, "only {examples} examples");
}

/// The examples' money is the worker's arithmetic: every snapshot example
/// decodes; an outcome, alert or usage status example that carries amounts
/// names a subscription whose snapshot example has that pricing and those
/// limits, and its amounts are what the pricing says the quantities cost;
/// alert ids are the ones the worker derives.
#[test]
fn the_examples_amounts_and_alert_ids_are_what_the_worker_computes() {
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use usage_worker::domain::decision::{open_period_start, LimitKind, LimitReached};
    use usage_worker::domain::outcome::Alert;
    use usage_worker::domain::subscription::{decode_snapshot, Limit, SubscriptionSnapshot};

    let asyncapi = AsyncApi::load();
    let examples = |name: &str| -> Vec<Value> {
        let message = &asyncapi.doc["components"]["messages"][name];
        message["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no examples"))
            .iter()
            .map(|e| e["payload"].clone())
            .collect()
    };
    let snapshots: HashMap<String, SubscriptionSnapshot> = examples("subscriptionSnapshot")
        .iter()
        .map(|payload| {
            let snapshot = decode_snapshot(payload.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("the worker refuses the snapshot example {payload}: {e}"));
            (snapshot.id.clone(), snapshot)
        })
        .collect();
    assert!(
        snapshots
            .values()
            .any(|s| s.pricing.is_some() && s.limits.hard.is_some_and(|l| l.amount().is_some())),
        "a snapshot example with pricing and an amount hard limit"
    );
    let number =
        |value: &Value| Decimal::from_str(&value.to_string()).unwrap_or_else(|_| panic!("not a number: {value}"));
    let limit_of = |snapshot: &SubscriptionSnapshot, kind: &str| match kind {
        "hardLimit" => snapshot.limits.hard,
        "softLimit" => snapshot.limits.soft,
        other => panic!("{other} is never an amount"),
    };
    // `block` carries usedAmount, limitAmount and currency for the `used`
    // quantity under the `kind` limit of `subscription`'s snapshot example.
    let mut checked = 0;
    let mut amounts = |what: &str, subscription: &Value, kind: &str, used: &Value, block: &Value| {
        let snapshot = &snapshots[subscription.as_str().unwrap()];
        let pricing = snapshot
            .pricing
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: its snapshot has no pricing"));
        assert_eq!(block["currency"], pricing.currency(), "{what}");
        assert_eq!(
            number(&block["usedAmount"]),
            pricing.amount(number(used)),
            "{what}: usedAmount"
        );
        assert_eq!(
            Some(Limit::Amount(number(&block["limitAmount"]))),
            limit_of(snapshot, kind),
            "{what}: limitAmount"
        );
        checked += 1;
    };

    for outcome in examples("outcome") {
        for block in [&outcome["limit"], &outcome["error"]["limit"]] {
            if block.get("currency").is_some() {
                let what = format!("outcome {}", outcome["outcomeId"]);
                amounts(
                    &what,
                    &outcome["subscriptionId"],
                    block["applied"].as_str().unwrap(),
                    &block["used"],
                    block,
                );
            }
        }
    }
    let mut thresholds = BTreeSet::new();
    for alert in examples("alert") {
        let kind = LimitKind::ALL
            .into_iter()
            .find(|k| k.alert_type() == alert["type"])
            .unwrap_or_else(|| panic!("an alert type of no limit: {alert}"));
        let what = format!("alert {}", alert["alertId"]);
        if alert.get("currency").is_some() {
            amounts(&what, &alert["subscriptionId"], kind.field(), &alert["used"], &alert);
        }
        let period_start = match alert["periodStartTime"].as_str() {
            Some(start) => chrono::DateTime::parse_from_rfc3339(start).unwrap().to_utc(),
            None => open_period_start(),
        };
        let reached = LimitReached {
            kind,
            threshold: u8::try_from(alert["threshold"].as_u64().unwrap()).unwrap(),
            limit: None,
            used: Decimal::ZERO,
            amount: None,
        };
        let subscription = alert["subscriptionId"].as_str().unwrap();
        let derived = Alert::new(subscription, period_start, None, &reached, "u", Utc::now()).alert_id;
        assert_eq!(alert["alertId"], derived, "{what}: not the id the worker derives");
        thresholds.insert((kind.field(), reached.threshold));
    }
    assert!(thresholds.contains(&("softLimit", 75)), "{thresholds:?}");

    // Period records: the amount is what the quantity costs under the
    // snapshot example's pricing; the record id is the one the worker derives.
    use usage_worker::domain::period_record::{period_record_id, PeriodRecordKind};
    for example in asyncapi.doc["components"]["messages"]["usagePeriod"]["examples"]
        .as_array()
        .expect("usagePeriod examples")
    {
        let record = &example["payload"];
        let subscription = record["subscriptionId"].as_str().unwrap();
        let what = format!("period record {} of {subscription}", record["type"]);
        match &snapshots[subscription].pricing {
            Some(pricing) => {
                assert_eq!(record["currency"], pricing.currency(), "{what}");
                assert_eq!(
                    number(&record["amount"]),
                    pricing.amount(number(&record["quantity"])),
                    "{what}: amount"
                );
                checked += 1;
            }
            None => assert_eq!((&record["amount"], &record["currency"]), (&Value::Null, &Value::Null)),
        }
        let kind = PeriodRecordKind::ALL
            .into_iter()
            .find(|k| k.as_str() == record["type"])
            .unwrap_or_else(|| panic!("{what}: no such type"));
        let start = chrono::DateTime::parse_from_rfc3339(record["periodStartTime"].as_str().unwrap())
            .unwrap()
            .to_utc();
        assert_eq!(
            example["headers"]["record-id"],
            period_record_id(subscription, start, kind),
            "{what}: not the id the worker derives"
        );
    }

    // The usage status examples of openapi.yaml.
    let openapi = OpenApi::load();
    let status = openapi
        .doc
        .pointer("/paths/~1subscriptions~1{id}~1usage/get/responses/200/content/application~1json/examples")
        .and_then(Value::as_object)
        .expect("usage status examples");
    for (name, example) in status {
        let body = &example["value"];
        let Some(snapshot) = snapshots.get(body["subscriptionId"].as_str().unwrap()) else {
            continue;
        };
        let what = format!("the usage status example {name}");
        let shown = |limit: Option<Limit>| match limit {
            None => Value::Null,
            Some(Limit::Quantity(q)) => json!({ "quantity": serde_json::from_str::<Value>(&q.to_string()).unwrap() }),
            Some(Limit::Amount(a)) => json!({ "amount": serde_json::from_str::<Value>(&a.to_string()).unwrap() }),
        };
        assert_eq!(body["limits"]["hardLimit"], shown(snapshot.limits.hard), "{what}");
        assert_eq!(body["limits"]["softLimit"], shown(snapshot.limits.soft), "{what}");
        match &snapshot.pricing {
            Some(pricing) => {
                assert_eq!(body["currency"], pricing.currency(), "{what}");
                assert_eq!(
                    number(&body["usedAmount"]),
                    pricing.amount(number(&body["usedQuantity"])),
                    "{what}"
                );
                if let Some(Limit::Amount(limit)) = snapshot.limits.hard {
                    let used = number(&body["usedQuantity"]);
                    let left = pricing.largest_fitting(used, Decimal::new(999_999_999_999_999, 3), limit);
                    assert_eq!(
                        number(&body["available"]["quantity"]),
                        left,
                        "{what}: available.quantity"
                    );
                    let amount = (limit - pricing.amount(used)).max(Decimal::ZERO);
                    assert_eq!(number(&body["available"]["amount"]), amount, "{what}: available.amount");
                }
                checked += 1;
            }
            None => assert_eq!(body["currency"], Value::Null, "{what}"),
        }
    }
    assert!(checked >= 8, "only {checked} examples with amounts");
}

/// Input schemas against the decoders the worker runs: where a schema can
/// say a rule, it says it as the code does (`agree`); where it cannot, it is
/// looser, as its description says, and only there (`looser`).
#[test]
fn the_input_schemas_accept_and_refuse_what_the_decoders_do() {
    use usage_worker::domain::cloudevents::decode_usage_message;
    use usage_worker::domain::event::DecodeContext;
    use usage_worker::domain::headers::Headers;
    use usage_worker::domain::invoice::decode_invoice_event;
    use usage_worker::domain::subscription::decode_snapshot;

    let ctx = DecodeContext {
        request_time: chrono::DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
            .unwrap()
            .into(),
        max_future: chrono::Duration::minutes(5),
        max_payload_bytes: 64 * 1024,
    };
    let usage = |body: &str| decode_usage_message(&Headers::new(), body.as_bytes(), &ctx).is_ok();
    let structured = |body: &str| {
        let headers: Headers = [("content-type", "application/cloudevents+json")].into_iter().collect();
        decode_usage_message(&headers, body.as_bytes(), &ctx).is_ok()
    };
    let snapshot = |body: &str| decode_snapshot(body.as_bytes()).is_ok();
    let invoice = |body: &str| decode_invoice_event(body.as_bytes()).is_ok();

    let long = "a".repeat(51);
    let fifty = "é".repeat(50);
    let event = |member: &str| format!(r#"{{"subscriptionId": "sub_1", "quantity": 1{member}}}"#);
    let usage_cases: Vec<(String, bool)> = [
        (event(""), true),
        (
            r#"{"id": "usg_1", "subscriptionId": "sub_42", "quantity": 12.5, "usageTime": "2026-11-27T10:00:00Z", "acceptPartialQuantity": false}"#.into(),
            true,
        ),
        (event(r#", "id": null, "acceptPartialQuantity": null, "usageTime": null"#), true),
        (event(r#", "usageTime": """#), true),
        (event(r#", "usageTime": "2026-11-27T10:00:00+01:00""#), true),
        (event(r#", "usageTime": "2026-11-27t10:00:00z""#), true),
        (event(r#", "usageTime": "2026-11-27T02:00:00.123456-08:00""#), true),
        (event(r#", "id": "ü_ok-ids.too", "invoiceId": 5, "_links": [], "other": {"a": 1}"#), true),
        (event(&format!(r#", "id": "{fifty}""#)), true),
        (r#"{"subscriptionId": "s", "quantity": "12.500"}"#.into(), true),
        (r#"{"subscriptionId": "s", "quantity": 1e3}"#.into(), true),
        (r#"{"subscriptionId": "s", "quantity": 0.001}"#.into(), true),
        (r#"{"subscriptionId": "s", "quantity": 999999999999.999}"#.into(), true),
        (r#"{"quantity": 1}"#.into(), false),
        (r#"{"subscriptionId": null, "quantity": 1}"#.into(), false),
        (r#"{"subscriptionId": "", "quantity": 1}"#.into(), false),
        (r#"{"subscriptionId": "a b", "quantity": 1}"#.into(), false),
        (r#"{"subscriptionId": "a\u200bb", "quantity": 1}"#.into(), false),
        (r#"{"subscriptionId": "a\u0000b", "quantity": 1}"#.into(), false),
        (format!(r#"{{"subscriptionId": "{long}", "quantity": 1}}"#), false),
        (r#"{"subscriptionId": 5, "quantity": 1}"#.into(), false),
        (event(r#", "id": "msg_1""#), false),
        (event(r#", "id": """#), false),
        (event(r#", "id": 5"#), false),
        (r#"{"subscriptionId": "s"}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": 0}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": -1}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": 0.0009}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": 1e12}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": "abc"}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": "+1"}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": " 1"}"#.into(), false),
        (r#"{"subscriptionId": "s", "quantity": true}"#.into(), false),
        (event(r#", "usageTime": "2026-11-27T10:00:00""#), false),
        (event(r#", "usageTime": "2026-11-27 10:00:00Z""#), false),
        (event(r#", "usageTime": "yesterday""#), false),
        (event(r#", "usageTime": 5"#), false),
        (event(r#", "acceptPartialQuantity": "yes""#), false),
        (event(r#", "acceptPartialQuantity": 1"#), false),
        ("[]".into(), false),
        ("\"x\"".into(), false),
    ]
    .into_iter()
    .collect();
    let usage_looser = [
        // More than 3 decimal places once trailing zeros are removed.
        r#"{"subscriptionId": "s", "quantity": 0.0015}"#.to_owned(),
        // A decimal string's value is not range-checked by the schema.
        r#"{"subscriptionId": "s", "quantity": "0"}"#.to_owned(),
        r#"{"subscriptionId": "s", "quantity": "1e12"}"#.to_owned(),
        // Relative to the time of the request.
        event(r#", "usageTime": "2026-11-28T12:00:00Z""#),
        // JSON Schema sees parsed JSON: repeated keys are gone by then.
        r#"{"subscriptionId": "s", "quantity": 1, "quantity": 1}"#.to_owned(),
    ];
    let ce = |members: &str| {
        format!(
            r#"{{"specversion": "1.0", "id": "ce-1", "source": "/m", "type": "t", "time": "2026-11-27T10:00:00Z"{members}}}"#
        )
    };
    let cloudevent_cases = [
        (ce(r#", "data": {"subscriptionId": "s", "quantity": 1}"#), true),
        (
            ce(r#", "data": {"subscriptionId": "s", "quantity": 1}, "datacontenttype": "application/json", "ext": 1"#),
            true,
        ),
        (ce(r#", "data": "x""#), false),
        (ce(""), false),
        (ce(r#", "data": {"quantity": 1}"#), false),
        (
            ce(r#", "data": {"subscriptionId": "s", "quantity": 1}"#).replace("\"1.0\"", "\"0.3\""),
            false,
        ),
        (
            ce(r#", "data": {"subscriptionId": "s", "quantity": 1}"#).replace(r#""source": "/m", "#, ""),
            false,
        ),
    ];
    let snapshot_example = r#"{"id": "sub_42", "status": "active", "version": 7,
        "currentPeriodStartTime": "2026-11-01T00:00:00Z", "currentPeriodEndTime": "2026-12-01T00:00:00Z",
        "trialEndTime": null,
        "usageLimits": {"hardLimit": {"quantity": 1000}, "softLimit": {"quantity": 750}, "trialLimit": 100}}"#;
    let snapshot_cases = [
        (snapshot_example.to_owned(), true),
        (r#"{"id": "s", "status": "trial", "version": 0}"#.into(), true),
        (r#"{"id": "s", "status": "Suspended", "version": 1, "usageLimits": null, "plan": {}}"#.into(), true),
        (r#"{"id": "s", "status": "active", "version": 1, "usageLimits": {"hardLimit": "5.5", "softLimit": null, "trialLimit": {"quantity": "0"}}}"#.into(), true),
        (r#"{"status": "active", "version": 1}"#.into(), false),
        (r#"{"id": "s", "version": 1}"#.into(), false),
        (r#"{"id": "s", "status": "", "version": 1}"#.into(), false),
        (r#"{"id": "s", "status": "active"}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": -1}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": "7"}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": 7.5}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": 1, "usageLimits": []}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": 1, "usageLimits": {"hardLimit": -1}}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": 1, "usageLimits": {"hardLimit": {"q": 1}}}"#.into(), false),
        (r#"{"id": "s", "status": "active", "version": 1, "trialEndTime": "soon"}"#.into(), false),
    ];
    // Limits in their three forms, and the pricing an amount needs.
    let priced = |limits: &str, pricing: &str| {
        format!(r#"{{"id": "s", "status": "active", "version": 1, "usageLimits": {{{limits}}}, "pricing": {pricing}}}"#)
    };
    let flat = r#"{"currency": "USD", "formula": "flat-rate", "price": 0.25}"#;
    let tiered = r#"{"currency": "EUR", "formula": "tiered", "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]}"#;
    let with_brackets = |formula: &str, brackets: &str| {
        priced(
            "",
            &format!(r#"{{"currency": "USD", "formula": "{formula}", "brackets": {brackets}}}"#),
        )
    };
    let pricing_cases = [
        (priced(r#""hardLimit": {"amount": 12.5}"#, flat), true),
        (
            priced(r#""hardLimit": {"amount": "60"}, "softLimit": {"amount": 0}"#, tiered),
            true,
        ),
        (priced(r#""hardLimit": {"amount": 99999999999999.5}"#, flat), true),
        (
            priced(
                r#""hardLimit": 10, "softLimit": {"quantity": 7.5}, "trialLimit": {"quantity": 3}"#,
                flat,
            ),
            true,
        ),
        (priced(r#""hardLimit": {"quantity": 5, "amount": null}"#, "null"), true),
        (
            priced(r#""hardLimit": {"amount": 5, "quantity": null, "note": 1}"#, tiered),
            true,
        ),
        (priced(r#""trialLimit": {"quantity": 3, "amount": null}"#, "null"), true),
        (
            priced(
                "",
                r#"{"currency": "USD", "formula": "flat-rate", "price": "0.000001", "brackets": "ignored"}"#,
            ),
            true,
        ),
        (
            with_brackets("volume", r#"[{"maxQuantity": 2.0005, "price": 3}, {"price": 1}]"#),
            true,
        ),
        (
            with_brackets(
                "stairstep",
                r#"[{"maxQuantity": "10", "price": 0, "x": 1}, {"price": 999999999.999999}]"#,
            ),
            true,
        ),
        (
            priced(
                "",
                r#"{"currency": "JPY", "formula": "tiered", "price": "ignored", "brackets": [{"price": 1}], "x": 1}"#,
            ),
            true,
        ),
        (priced(r#""hardLimit": {"amount": 5}"#, "null"), false),
        (
            r#"{"id": "s", "status": "active", "version": 1, "usageLimits": {"softLimit": {"amount": 5}}}"#.into(),
            false,
        ),
        (priced(r#""hardLimit": {"quantity": 1, "amount": 1}"#, flat), false),
        (priced(r#""hardLimit": {"quantity": null}"#, flat), false),
        (priced(r#""hardLimit": {}"#, flat), false),
        (priced(r#""trialLimit": {"amount": 5}"#, flat), false),
        (priced(r#""hardLimit": {"amount": -1}"#, flat), false),
        (priced(r#""hardLimit": {"amount": 1e15}"#, flat), false),
        (priced(r#""hardLimit": {"amount": "lots"}"#, flat), false),
        (priced("", r#""flat-rate""#), false),
        (priced("", r#"{"formula": "flat-rate", "price": 1}"#), false),
        (
            priced("", r#"{"currency": "usd", "formula": "flat-rate", "price": 1}"#),
            false,
        ),
        (
            priced("", r#"{"currency": "USDX", "formula": "flat-rate", "price": 1}"#),
            false,
        ),
        (priced("", r#"{"currency": "USD", "price": 1}"#), false),
        (
            priced("", r#"{"currency": "USD", "formula": "linear", "price": 1}"#),
            false,
        ),
        (priced("", r#"{"currency": "USD", "formula": "flat-rate"}"#), false),
        (
            priced("", r#"{"currency": "USD", "formula": "flat-rate", "price": null}"#),
            false,
        ),
        (
            priced("", r#"{"currency": "USD", "formula": "flat-rate", "price": -0.5}"#),
            false,
        ),
        (
            priced("", r#"{"currency": "USD", "formula": "flat-rate", "price": 1e9}"#),
            false,
        ),
        (
            priced("", r#"{"currency": "USD", "formula": "tiered", "price": 1}"#),
            false,
        ),
        (with_brackets("tiered", "null"), false),
        (with_brackets("tiered", "[]"), false),
        (with_brackets("volume", "[1]"), false),
        (with_brackets("volume", r#"[{"maxQuantity": 5}, {"price": 1}]"#), false),
        (
            with_brackets("stairstep", r#"[{"maxQuantity": -5, "price": 1}, {"price": 1}]"#),
            false,
        ),
        (
            with_brackets("stairstep", r#"[{"maxQuantity": 1e12, "price": 1}, {"price": 1}]"#),
            false,
        ),
    ];
    let snapshot_cases: Vec<(String, bool)> = snapshot_cases.into_iter().chain(pricing_cases).collect();
    let snapshot_looser = [
        // An integer written with a fraction.
        r#"{"id": "s", "status": "active", "version": 7.0}"#.to_owned(),
        // Both period ends or neither, and start before end.
        r#"{"id": "s", "status": "active", "version": 1, "currentPeriodStartTime": "2026-11-01T00:00:00Z"}"#.to_owned(),
        r#"{"id": "s", "status": "active", "version": 1, "currentPeriodStartTime": "2026-12-01T00:00:00Z", "currentPeriodEndTime": "2026-11-01T00:00:00Z"}"#.to_owned(),
        r#"{"id": "s", "status": "active", "version": 1, "usageLimits": {"hardLimit": 0.0001}}"#.to_owned(),
        // Decimal places of amounts, prices and bracket ends; a decimal
        // string's value.
        priced(r#""hardLimit": {"amount": 0.0000001}"#, flat),
        priced(r#""hardLimit": {"amount": "-1"}"#, flat),
        priced("", r#"{"currency": "USD", "formula": "flat-rate", "price": 0.0000001}"#),
        with_brackets("tiered", r#"[{"maxQuantity": 1.0000001, "price": 1}, {"price": 1}]"#),
        // Bracket ends rise from above 0, and only the last has none.
        with_brackets("tiered", r#"[{"maxQuantity": 10, "price": 1}, {"maxQuantity": 5, "price": 1}, {"price": 1}]"#),
        with_brackets("volume", r#"[{"maxQuantity": 0, "price": 1}, {"price": 1}]"#),
        with_brackets("volume", r#"[{"maxQuantity": 10, "price": 1}]"#),
        with_brackets("stairstep", r#"[{"price": 1}, {"price": 2}]"#),
    ];
    let item = |members: &str| {
        format!(
            r#"{{"type": "invoice-issued", "invoiceId": "inv_1", "issuedTime": "2026-12-01T02:00:00Z", "items": [{{"invoiceItemId": "ii_1", "subscriptionId": "sub_42"{members}}}]}}"#
        )
    };
    let period = r#", "periodStartTime": "2026-11-01T00:00:00Z", "periodEndTime": "2026-12-01T00:00:00Z""#;
    let invoice_cases = [
        (item(period), true),
        (item(&format!("{period}, \"note\": 1")), true),
        (item(period).replace("invoice-issued", "invoice-voided"), false),
        (item(period).replace(r#""inv_1""#, r#""inv 1""#), false),
        (
            item(period).replace("2026-12-01T02:00:00Z", "2026-12-01T02:00:00"),
            false,
        ),
        (item(r#", "periodStartTime": "2026-11-01T00:00:00Z""#), false),
        (
            r#"{"type": "invoice-issued", "invoiceId": "inv_1", "issuedTime": "2026-12-01T02:00:00Z", "items": []}"#
                .into(),
            false,
        ),
        (
            r#"{"type": "invoice-issued", "invoiceId": "inv_1", "issuedTime": "2026-12-01T02:00:00Z"}"#.into(),
            false,
        ),
    ];
    let invoice_looser = [item(
        r#", "periodStartTime": "2026-12-01T00:00:00Z", "periodEndTime": "2026-11-01T00:00:00Z""#,
    )];

    let mut mismatches = Vec::new();
    let mut compare =
        |schema_file: &str, decoder: &dyn Fn(&str) -> bool, cases: &[(String, bool)], looser: &[String]| {
            let validator = schema(schema_file);
            for (body, expected) in cases {
                let value: Value = serde_json::from_str(body).unwrap();
                let (by_schema, by_code) = (validator.is_valid(&value), decoder(body));
                assert_eq!(
                    by_code, *expected,
                    "the decoder's verdict on {body} is not what the test expects"
                );
                if by_schema != by_code {
                    mismatches.push(format!("{schema_file}: schema {by_schema}, worker {by_code}: {body}"));
                }
            }
            for body in looser {
                let value: Value = serde_json::from_str(body).unwrap();
                let looser_here = validator.is_valid(&value) && !decoder(body);
                if !looser_here {
                    mismatches.push(format!("{schema_file}: expected looser than the worker on {body}"));
                }
            }
        };
    compare("usage-event.json", &usage, &usage_cases, &usage_looser);
    compare("usage-cloudevent.json", &structured, &cloudevent_cases, &[]);
    let owned = |cases: &[(String, bool)]| cases.to_vec();
    compare(
        "subscription-snapshot.json",
        &snapshot,
        &snapshot_cases,
        &snapshot_looser,
    );
    compare("invoice-event.json", &invoice, &owned(&invoice_cases), &invoice_looser);
    assert!(
        mismatches.is_empty(),
        "input schemas and decoders disagree:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn the_router_serves_exactly_the_documented_paths_and_methods() {
    let documented = OpenApi::load().operations();
    let routes = served_routes();
    assert_eq!(
        routes, documented,
        "routes of the router (left) and operations of docs/openapi.yaml (right) differ"
    );
}

#[test]
fn the_dashboard_charts_every_metric_and_no_other() {
    let metrics = registered_metrics();
    let dashboard = read_json(DASHBOARD);
    let queries = dashboard_queries(&dashboard);
    assert!(!queries.is_empty());
    let mut charted = BTreeSet::new();
    for expr in &queries {
        for series in series_in(expr) {
            let metric = metric_of(&series, &metrics)
                .unwrap_or_else(|| panic!("the dashboard queries {series}, which the service does not export"));
            charted.insert(metric.clone());
        }
    }
    let missing: Vec<&String> = metrics.difference(&charted).collect();
    assert!(missing.is_empty(), "metrics not on the dashboard: {missing:?}");

    // Panels query the data source the provisioning defines.
    let mut datasources = Vec::new();
    strings_under(&dashboard["panels"], "uid", "", &mut datasources);
    assert!(
        datasources.iter().all(|(_, uid)| uid == "${datasource}"),
        "{datasources:?}"
    );
    let variable = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(variable["query"], "prometheus");
    let provisioned = read_yaml("dashboards/grafana/provisioning/datasources/prometheus.yml");
    let source = &provisioned["datasources"][0];
    assert_eq!(source["type"], "prometheus");
    assert_eq!(
        source["uid"], variable["current"]["value"],
        "the variable defaults to it"
    );
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            let targets = panel["targets"].as_array().map_or(0, Vec::len);
            assert!(targets > 0, "panel {} has no query", panel["title"]);
        }
    }
}

#[test]
fn compose_prometheus_and_grafana_agree_on_names_ports_and_paths() {
    let compose = read_yaml("docker-compose.yml");
    let services = &compose["services"];
    for name in ["prometheus", "grafana"] {
        assert_eq!(services[name]["profiles"], json!(["monitoring"]), "{name}");
    }
    for (name, service) in services.as_object().unwrap() {
        if !["prometheus", "grafana"].contains(&name.as_str()) {
            assert!(
                service.get("profiles").is_none(),
                "{name} must stay in the default profile"
            );
        }
    }
    // Every file or folder mounted exists, and the mounts are where the
    // configs say.
    let mut mounts: HashMap<String, String> = HashMap::new();
    for name in ["prometheus", "grafana"] {
        for volume in services[name]["volumes"].as_array().unwrap() {
            let mut parts = volume.as_str().unwrap().split(':');
            let (host, container) = (parts.next().unwrap(), parts.next().unwrap());
            let host = host.trim_start_matches("./");
            assert!(path_of(host).exists(), "{name} mounts {host}, which does not exist");
            mounts.insert(host.to_owned(), container.to_owned());
        }
    }
    let provider = read_yaml("dashboards/grafana/provisioning/dashboards/usage-worker.yml");
    let folder = provider["providers"][0]["options"]["path"].as_str().unwrap();
    assert_eq!(
        mounts[DASHBOARD],
        format!("{folder}/usage-worker.json"),
        "Grafana loads the dashboard from where compose mounts it"
    );
    assert_eq!(mounts["dashboards/grafana/provisioning"], "/etc/grafana/provisioning");
    let prometheus_config = mounts["dashboards/prometheus.yml"].clone();
    let command: Vec<&str> = services["prometheus"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(command.contains(&format!("--config.file={prometheus_config}").as_str()));

    // Prometheus scrapes the worker service on the port of its HTTP_ADDR.
    let http_addr = services["worker"]["environment"]["HTTP_ADDR"].as_str().unwrap();
    let port: u64 = http_addr.rsplit(':').next().unwrap().parse().unwrap();
    let prometheus = read_yaml("dashboards/prometheus.yml");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/metrics");
    let discovery = &job["dns_sd_configs"][0];
    assert_eq!(discovery["names"], json!(["worker"]));
    assert_eq!(discovery["port"], port);
    // Grafana reaches Prometheus by its service name and port.
    let datasource = read_yaml("dashboards/grafana/provisioning/datasources/prometheus.yml");
    let url = url::Url::parse(datasource["datasources"][0]["url"].as_str().unwrap()).unwrap();
    assert_eq!(url.host_str(), Some("prometheus"));
    let published = services["prometheus"]["ports"][0].as_str().unwrap();
    assert_eq!(
        published.rsplit(':').next().unwrap(),
        url.port().unwrap().to_string(),
        "Prometheus listens where Grafana looks"
    );
    assert_eq!(
        datasource["datasources"][0]["jsonData"]["timeInterval"], prometheus["global"]["scrape_interval"],
        "$__rate_interval needs the scrape interval"
    );
}

const ALERTS: &str = "dashboards/alerts.yml";

/// The anchors GitHub makes of a Markdown page's headings.
fn anchors_of(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_alerting_rules_use_only_exported_metrics_and_are_loaded() {
    let metrics = registered_metrics();
    let rules = read_yaml(ALERTS);
    let operations = anchors_of(&read_text("docs/operations.md"));
    let mut used = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert").to_owned();
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name} has no expr"));
            for series in series_in(expr) {
                let metric = metric_of(&series, &metrics)
                    .unwrap_or_else(|| panic!("{name} queries {series}, which the service does not export"));
                used.insert(metric.clone());
            }
            assert!(
                ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or_default()),
                "{name}: severity"
            );
            assert!(rule["annotations"]["summary"].is_string(), "{name}: summary");
            let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
            let anchor = runbook
                .strip_prefix("docs/operations.md#")
                .unwrap_or_else(|| panic!("{name}: the runbook is a section of docs/operations.md"));
            assert!(
                operations.contains(anchor),
                "{name}: docs/operations.md has no #{anchor}"
            );
            assert!(alerts.insert(name.clone()), "{name} twice");
        }
    }
    // Lag, backlog, dead letters, readiness and errors are all watched.
    for metric in [
        "usage_worker_consumer_lag",
        "usage_worker_outbox_backlog",
        "usage_worker_messages_decided_total",
        "usage_worker_assigned_partitions",
        "usage_worker_http_requests_total",
        "usage_worker_period_sweep_errors_total",
        "usage_worker_stopped_partitions_total",
    ] {
        assert!(used.contains(metric), "no alert on {metric}");
    }
    // The readiness alert reads the gauge that /readyz's checks set.
    let not_ready = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "UsageWorkerNotReady")
        .expect("a not-ready alert");
    assert_eq!(not_ready["expr"], "usage_worker_ready == 0");
    // The monitoring Prometheus of docker-compose.yml loads them.
    let compose = read_yaml("docker-compose.yml");
    let mounted = compose["services"]["prometheus"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str()?.strip_prefix(&format!("./{ALERTS}:")))
        .map(|rest| rest.trim_end_matches(":ro").to_owned())
        .next()
        .expect("compose mounts the rules into Prometheus");
    let prometheus = read_yaml("dashboards/prometheus.yml");
    assert_eq!(prometheus["rule_files"], json!([mounted]));
}

// ---------------------------------------------------------------------------
// Live checks

fn days(n: i64) -> String {
    (Utc::now() + chrono::Duration::days(n)).to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_responses_and_records_match_the_documents() {
    let started = Instant::now();
    let openapi = OpenApi::load();
    let asyncapi = AsyncApi::load();
    let env = TestEnv::start().await;

    // --- Subscriptions, through the worker; each checked against its schema.
    let mut sub_a = active_subscription("sub_a", Some("10"));
    sub_a["usageLimits"]["softLimit"] = json!({"quantity": 4});
    let mut sub_trial = active_subscription("sub_trial", None);
    sub_trial["status"] = json!("trial");
    sub_trial["trialEndTime"] = json!(days(5));
    sub_trial["usageLimits"]["trialLimit"] = json!("3");
    let sub_inv = active_subscription("sub_inv", None);
    // Ended a month ago: the sweep closes it, and an invoice bills it after.
    let old_period = (days(-60), days(-30));
    // Tiered pricing (0.5 up to 100, then 0.4) with limits in money: the
    // soft limit of 40 steps at 30, 36 and 40 (60, 72 and 80 units), the
    // hard limit of 60 fills at 125 units.
    let mut sub_amount = active_subscription("sub_amount", Some(r#"{"amount": 60}"#));
    sub_amount["usageLimits"]["softLimit"] = json!({"amount": "40"});
    sub_amount["pricing"] = json!({"currency": "EUR", "formula": "tiered",
        "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]});
    let snapshots = [
        sub_a,
        sub_amount,
        sub_trial,
        sub_inv.clone(),
        active_subscription("sub_http", Some("10")),
        active_subscription("sub_batch", Some("10")),
        json!({"id": "sub_open", "status": "active", "version": 1, "usageLimits": {"hardLimit": 5}}),
        json!({"id": "sub_paused", "status": "paused", "version": 1,
               "currentPeriodStartTime": days(-1), "currentPeriodEndTime": days(1)}),
        json!({"id": "sub_old", "status": "active", "version": 1, "trialEndTime": null, "usageLimits": null,
               "currentPeriodStartTime": old_period.0, "currentPeriodEndTime": old_period.1}),
    ];
    for snapshot in &snapshots {
        let wire = Wire {
            key: snapshot["id"].as_str(),
            headers: json!({}),
            payload: snapshot.clone(),
        };
        asyncapi.assert_matches("subscriptions", "subscriptionSnapshot", &wire);
        env.subscription(snapshot.clone());
    }
    let invalid_snapshot = json!({"id": "sub_bad", "version": -1});
    let wire = Wire {
        key: Some("sub_bad"),
        headers: json!({}),
        payload: invalid_snapshot.clone(),
    };
    assert!(
        !asyncapi
            .problems("subscriptions", "subscriptionSnapshot", &wire)
            .is_empty(),
        "the schema takes a snapshot the worker refuses"
    );
    env.send(
        "subscriptions",
        Some("sub_bad"),
        Some(invalid_snapshot.to_string().as_bytes()),
    );

    // --- The worker, the API beside it (with a token), an API whose
    //     database does not answer, and the gauge sampler.
    let mut settings = env.settings();
    settings.http.bearer_token = Some(Secret::new(TOKEN));
    // A caller whose token has no usages scope, for the 403s.
    settings.http.tokens = vec![usage_worker::config::TokenEntry {
        name: "scraper".into(),
        sha256: usage_worker::config::sha256(SCRAPER_TOKEN)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        scopes: vec!["metrics:read".into()],
    }];
    let worker = env.worker_with(settings.clone()).await;
    let metrics = worker.counts.metrics.clone();
    let api = TestApi::start(
        store::connect(&settings.database).await.unwrap(),
        ApiConfig::from_settings(&settings, PARTITIONS, true),
        metrics.clone(),
        Some(TOKEN),
    )
    .await;
    let dead_pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let dead = TestApi::start(
        dead_pool,
        ApiConfig::from_settings(&env.settings(), PARTITIONS, false),
        Arc::new(Metrics::default()),
        None,
    )
    .await;
    let (stop_sampler, sampler_stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = Sampler {
        metrics: metrics.clone(),
        pools: vec![("worker", store::connect(&settings.database).await.unwrap())],
        group: settings.kafka.group_id.clone(),
        topic: settings.topics.usage_events.clone(),
        partitions: PARTITIONS,
        metadata: Arc::new(
            usage_worker::kafka::reader_config(&settings.kafka, "metadata")
                .create()
                .unwrap(),
        ),
    };
    let sampler = tokio::spawn(sampler.run(async {
        let _ = sampler_stopped.await;
    }));

    // --- Usage events: every outcome status and reason code.
    let mut outcomes = 0;
    let plain = [
        json!({"id": "k1", "subscriptionId": "sub_a", "quantity": 3}),
        json!({"id": "k2", "subscriptionId": "sub_a", "quantity": "2.000",
               "usageTime": (Utc::now() - chrono::Duration::hours(1)).to_rfc3339()}),
        json!({"id": "k1", "subscriptionId": "sub_a", "quantity": 3}),
        json!({"id": "k4", "subscriptionId": "sub_a", "quantity": 9, "acceptPartialQuantity": true}),
        json!({"id": "k5", "subscriptionId": "sub_a", "quantity": 1, "acceptPartialQuantity": null}),
        json!({"subscriptionId": "sub_nobody", "quantity": 1}),
        json!({"id": "k7", "subscriptionId": "sub_paused", "quantity": 1}),
        json!({"id": "k8", "subscriptionId": "sub_old", "quantity": 1, "usageTime": days(-45)}),
        json!({"id": "k9", "subscriptionId": "sub_a", "quantity": 1, "usageTime": days(-90)}),
        json!({"id": "k1", "subscriptionId": "sub_a", "quantity": 4}),
        json!({"id": "k11", "subscriptionId": "sub_open", "quantity": 5, "usageTime": ""}),
        json!({"id": "inv-u1", "subscriptionId": "sub_inv", "quantity": 1, "invoiceId": "ignored"}),
        // 64 units cost 32: the soft limit's 75 % step; 110 cost 54: its 90
        // and 100 % steps; of 20 more, 15 fit (125 cost 60), the hard limit
        // is reached, and 1 more is refused under it.
        json!({"id": "m1", "subscriptionId": "sub_amount", "quantity": 64}),
        json!({"id": "m2", "subscriptionId": "sub_amount", "quantity": 46}),
        json!({"id": "m3", "subscriptionId": "sub_amount", "quantity": 20, "acceptPartialQuantity": true}),
        json!({"id": "m4", "subscriptionId": "sub_amount", "quantity": 1}),
        // Corrections, in sub_a's partition after the reports they correct:
        // a conflict, an amendment, a void, a repeated void (duplicate),
        // an amendment of the voided usage, a void of an unknown id.
        json!({"action": "amend", "id": "k1", "subscriptionId": "sub_a", "quantity": 2, "previousQuantity": 7}),
        json!({"action": "amend", "id": "k2", "subscriptionId": "sub_a", "quantity": 1, "previousQuantity": 2}),
        json!({"action": "void", "id": "k2", "subscriptionId": "sub_a", "reason": "duplicate meter"}),
        json!({"action": "void", "id": "k2", "subscriptionId": "sub_a"}),
        json!({"action": "amend", "id": "k2", "subscriptionId": "sub_a", "quantity": 5}),
        json!({"action": "void", "id": "nobody", "subscriptionId": "sub_a"}),
    ];
    for event in &plain {
        let wire = Wire {
            key: event["subscriptionId"].as_str(),
            headers: json!({}),
            payload: event.clone(),
        };
        asyncapi.assert_matches("usage-events", "usageEvent", &wire);
        env.usage(event.clone());
        outcomes += 1;
    }
    // Events the schema refuses, as the worker does.
    let refused = [
        json!({"id": "msg_bad", "quantity": -1, "usageTime": "yesterday", "acceptPartialQuantity": "yes"}),
        json!({"quantity": 1}),
        json!({"subscriptionId": "sub_a", "quantity": 0.0001}),
    ];
    for event in refused {
        let wire = Wire {
            key: None,
            headers: json!({}),
            payload: event.clone(),
        };
        assert!(
            !asyncapi.problems("usage-events", "usageEvent", &wire).is_empty(),
            "the schema takes {event}, which the worker rejects"
        );
        produce(&env, "usage-events", None, event.to_string().as_bytes(), &[]);
        outcomes += 1;
    }
    // Valid by the schema, rejected for a time the schema cannot know.
    let future = json!({"id": "k15", "subscriptionId": "sub_a", "quantity": 1, "usageTime": days(1)});
    env.usage(future);
    outcomes += 1;
    // Not JSON, and too large: rejected and dead-lettered, original headers kept.
    produce(&env, "usage-events", Some("junk"), b"{{ not json", &[("trace", "t-1")]);
    produce(&env, "usage-events", Some("big"), &vec![b' '; 70_000], &[]);
    outcomes += 2;
    // CloudEvents, structured and binary.
    let structured = json!({"specversion": "1.0", "id": "ce-1", "source": "/meter", "type": "com.example.usage",
        "time": Utc::now().to_rfc3339(), "data": {"subscriptionId": "sub_trial", "quantity": 2}});
    let structured_headers = [("content-type", "application/cloudevents+json")];
    let wire = Wire {
        key: Some("sub_trial"),
        headers: json!({"content-type": "application/cloudevents+json"}),
        payload: structured.clone(),
    };
    asyncapi.assert_matches("usage-events", "usageCloudEventStructured", &wire);
    produce(
        &env,
        "usage-events",
        Some("sub_trial"),
        structured.to_string().as_bytes(),
        &structured_headers,
    );
    let binary_headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", "ce-2"),
        ("ce_source", "/meter"),
        ("ce_type", "com.example.usage"),
    ];
    let binary = json!({"subscriptionId": "sub_trial", "quantity": "1"});
    let wire = Wire {
        key: Some("sub_trial"),
        headers: json!(binary_headers.iter().copied().collect::<HashMap<_, _>>()),
        payload: binary.clone(),
    };
    asyncapi.assert_matches("usage-events", "usageCloudEventBinary", &wire);
    produce(
        &env,
        "usage-events",
        Some("sub_trial"),
        binary.to_string().as_bytes(),
        &binary_headers,
    );
    outcomes += 2;
    env.flush();

    // --- Invoice events: an invalid one, one for an unknown subscription,
    //     one for an unknown period, once the snapshots are in.
    env.wait_for_count("SELECT count(*) FROM subscriptions", snapshots.len() as i64)
        .await;
    let (start, end) = (
        sub_inv["currentPeriodStartTime"].clone(),
        sub_inv["currentPeriodEndTime"].clone(),
    );
    let invoice = |id: &str, sub: &str, start: &Value, end: &Value| {
        json!({"type": "invoice-issued", "invoiceId": id, "issuedTime": Utc::now().to_rfc3339(),
            "items": [{"invoiceItemId": format!("{id}-1"), "subscriptionId": sub,
                       "periodStartTime": start, "periodEndTime": end}]})
    };
    let past = (json!("2020-10-01T00:00:00Z"), json!("2020-11-01T00:00:00Z"));
    for event in [
        invoice("inv_nobody", "sub_nobody", &past.0, &past.1),
        invoice("inv_past", "sub_inv", &past.0, &past.1),
    ] {
        let wire = Wire {
            key: None,
            headers: json!({}),
            payload: event.clone(),
        };
        asyncapi.assert_matches("invoice-events", "invoiceIssued", &wire);
        env.send("invoice-events", None, Some(event.to_string().as_bytes()));
    }
    let invalid_invoice = json!({"type": "invoice-issued"});
    let wire = Wire {
        key: None,
        headers: json!({}),
        payload: invalid_invoice.clone(),
    };
    assert!(!asyncapi.problems("invoice-events", "invoiceIssued", &wire).is_empty());
    env.send("invoice-events", None, Some(invalid_invoice.to_string().as_bytes()));
    env.flush();

    // --- HTTP: every documented status of every operation.
    let check = |method: &str, template: &str, reply: &Reply| openapi.check(method, template, reply);
    wait_until("ready", || async { api.call("GET", "/readyz").await.status == 200 }).await;
    let ready = check("GET", "/readyz", &api.call("GET", "/readyz").await);
    assert!(ready["checks"]["consumer"]["partitions"].is_array(), "{ready}");
    check("GET", "/healthz", &api.call("GET", "/healthz").await);

    let created = api
        .post(&json!({"id": "h1", "subscriptionId": "sub_http", "quantity": 2}))
        .await;
    check("POST", "/usages", &created);
    assert_eq!(created.status, 201);
    let again = api
        .post(&json!({"id": "h1", "subscriptionId": "sub_http", "quantity": 2.0}))
        .await;
    assert_eq!(check("POST", "/usages", &again), created.json());
    assert_eq!(again.status, 200);
    let made = api.post(&json!({"subscriptionId": "sub_http", "quantity": "1"})).await;
    let made_id = check("POST", "/usages", &made)["id"].as_str().unwrap().to_owned();
    outcomes += 2;
    check("GET", "/usages/{id}", &api.call("GET", "/usages/h1").await);
    let page = api.call("GET", "/usages?subscriptionId=sub_http&limit=1").await;
    assert!(page.header("link").is_some());
    check("GET", "/usages", &page);
    let voided = api
        .call("DELETE", &format!("/usages/{made_id}?reason=meter%20fault"))
        .await;
    check("DELETE", "/usages/{id}", &voided);
    assert_eq!(voided.status, 204);
    outcomes += 1;
    let listed = check("GET", "/usages", &api.call("GET", "/usages?status=voided").await);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["voidReason"] == "meter fault"),
        "{listed}"
    );
    check(
        "GET",
        "/usages/{id}",
        &api.call("GET", &format!("/usages/{made_id}")).await,
    );
    check(
        "DELETE",
        "/usages/{id}",
        &api.call("DELETE", &format!("/usages/{made_id}")).await,
    );
    let long_reason = format!("/usages/h1?reason={}", "x".repeat(501));
    assert_eq!(
        check("DELETE", "/usages/{id}", &api.call("DELETE", &long_reason).await)["invalidFields"][0]["field"],
        "reason"
    );

    // PUT: a free id is created, a stored usage amended, or left as it is.
    const USAGE: &str = "/usages/{id}";
    let put = api
        .put("p1", &json!({"subscriptionId": "sub_http", "quantity": 1}))
        .await;
    assert_eq!(
        (check("PUT", USAGE, &put)["id"].clone(), put.status),
        (json!("p1"), 201)
    );
    let put = api
        .put("p1", &json!({"subscriptionId": "sub_http", "quantity": 2}))
        .await;
    assert_eq!(
        (check("PUT", USAGE, &put)["quantity"].clone(), put.status),
        (json!(2), 200)
    );
    let put = api
        .put("p1", &json!({"subscriptionId": "sub_http", "quantity": 2}))
        .await;
    assert_eq!(put.status, 200, "unchanged");
    check("PUT", USAGE, &put);
    outcomes += 2;
    for (id, body, code) in [
        (
            "p1",
            json!({"subscriptionId": "sub_a", "quantity": 1}),
            "subscription_mismatch",
        ),
        (
            "p1",
            json!({"subscriptionId": "sub_http", "quantity": 50}),
            "usage_limit_exceeded",
        ),
        (
            made_id.as_str(),
            json!({"subscriptionId": "sub_http", "quantity": 1}),
            "usage_voided",
        ),
        (
            "p1",
            json!({"id": "p2", "subscriptionId": "sub_http", "quantity": 1}),
            "invalid_field",
        ),
        (
            "p1",
            json!({"action": "void", "id": "p1", "subscriptionId": "sub_http"}),
            "invalid_field",
        ),
    ] {
        let reply = api.put(id, &body).await;
        assert_eq!(check("PUT", USAGE, &reply)["code"], code, "{body}");
    }
    check(
        "PUT",
        USAGE,
        &api.send_raw("PUT", "/usages/p1", "text/plain", b"{}".to_vec()).await,
    );
    check(
        "PUT",
        USAGE,
        &api.send_raw("PUT", "/usages/p1", "application/json", vec![b' '; 70_000])
            .await,
    );
    let cut = api.cut_short("PUT", "/usages/p1").await;
    assert_eq!(cut.status, 400, "{cut:?}");
    check("PUT", USAGE, &cut);
    const HISTORY: &str = "/usages/{id}/history";
    let history = check("GET", HISTORY, &api.call("GET", "/usages/p1/history").await);
    assert_eq!(history.as_array().unwrap().len(), 2, "{history}");
    let history = check(
        "GET",
        HISTORY,
        &api.call("GET", &format!("/usages/{made_id}/history")).await,
    );
    assert_eq!(history[1]["reason"], "meter fault", "{history}");
    check("GET", HISTORY, &api.call("GET", "/usages/nope/history").await);

    let posts = [
        json!({"id": "h3", "subscriptionId": "sub_http", "quantity": 20}),
        json!({"id": "h1", "subscriptionId": "sub_http", "quantity": 3}),
        json!({"subscriptionId": "sub_paused", "quantity": 1}),
        json!({"subscriptionId": "sub_old", "quantity": 1, "usageTime": days(-45)}),
        json!({"subscriptionId": "sub_http", "quantity": 1, "usageTime": days(-90)}),
        json!({"id": "msg_1", "quantity": "x", "usageTime": "2026-11-27T10:00:00", "acceptPartialQuantity": 1}),
        json!({"quantity": 1}),
        json!({"subscriptionId": "sub_nobody", "quantity": 1}),
        json!({"subscriptionId": "sub_http", "quantity": 1, "usageTime": days(1)}),
    ];
    for body in &posts {
        let reply = api.post(body).await;
        assert!([409, 422].contains(&reply.status), "{body}: {reply:?}");
        check("POST", "/usages", &reply);
    }
    check(
        "POST",
        "/usages",
        &api.post_raw("application/json", b"[1]".to_vec()).await,
    );
    check(
        "POST",
        "/usages",
        &api.post_raw("application/json", vec![b' '; 70_000]).await,
    );
    check("POST", "/usages", &api.post_raw("text/plain", b"{}".to_vec()).await);
    let keyed = api
        .send(
            api.request("POST", "/usages")
                .header("idempotency-key", "k".repeat(256))
                .json(&json!({"subscriptionId": "sub_http", "quantity": 1})),
        )
        .await;
    assert_eq!(check("POST", "/usages", &keyed)["field"], "Idempotency-Key");
    let cut = api.post_cut_short("/usages").await;
    assert_eq!(cut.status, 400, "{cut:?}");
    check("POST", "/usages", &cut);

    // A batch: every result of POST /usages in one answer, and the batch's
    // own refusals.
    let batch = api
        .post_batch(&[
            json!({"id": "b1", "subscriptionId": "sub_batch", "quantity": 2}),
            json!({"id": "b1", "subscriptionId": "sub_batch", "quantity": "2.0"}),
            json!({"id": "b2", "subscriptionId": "sub_batch", "quantity": 20}),
            json!({"id": "b3", "subscriptionId": "sub_nobody", "quantity": 1}),
            json!({"quantity": 1}),
            json!([1]),
            json!({"subscriptionId": "sub_batch", "quantity": 1, "x": "a".repeat(70_000)}),
        ])
        .await;
    let answered = check("POST", "/usage-batches", &batch);
    let statuses: Vec<u64> = answered["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 200, 409, 422, 422, 422, 413]);
    outcomes += 1;
    let empty = api.post_batch(&[]).await;
    assert_eq!(check("POST", "/usage-batches", &empty)["field"], "usages");
    check(
        "POST",
        "/usage-batches",
        &api.send(
            api.request("POST", "/usage-batches")
                .header("content-type", "application/json")
                .body(vec![b' '; 4 * 1024 * 1024 + 1]),
        )
        .await,
    );
    check(
        "POST",
        "/usage-batches",
        &api.send(
            api.request("POST", "/usage-batches")
                .header("content-type", "text/plain")
                .body("{}"),
        )
        .await,
    );
    let cut = api.post_cut_short("/usage-batches").await;
    assert_eq!(cut.status, 400, "{cut:?}");
    check("POST", "/usage-batches", &cut);
    let query = api
        .call("GET", "/usages?limit=5000&offset=-1&usageTimeFrom=yesterday")
        .await;
    check("GET", "/usages", &query);
    check("GET", "/usages/{id}", &api.call("GET", "/usages/nope").await);
    check("DELETE", "/usages/{id}", &api.call("DELETE", "/usages/nope").await);

    // The usage status: amounts and a reached amount limit, the open-ended
    // period, a trial, an instant with an offset; then every error.
    const STATUS: &str = "/subscriptions/{id}/usage";
    env.wait_for_count("SELECT count(*) FROM usages WHERE subscription_id = 'sub_amount'", 3)
        .await;
    let amount = check("GET", STATUS, &api.call("GET", "/subscriptions/sub_amount/usage").await);
    assert_eq!(
        (&amount["usedQuantity"], &amount["usedAmount"], &amount["currency"]),
        (&json!(125), &json!(60), &json!("EUR")),
        "{amount}"
    );
    assert_eq!(amount["limits"]["hardLimit"], json!({"amount": 60}), "{amount}");
    assert_eq!(amount["available"], json!({"quantity": 0, "amount": 0}), "{amount}");
    assert_eq!(
        (&amount["isSoftLimitReached"], &amount["isHardLimitReached"]),
        (&json!(true), &json!(true)),
        "{amount}"
    );
    let open = check("GET", STATUS, &api.call("GET", "/subscriptions/sub_open/usage").await);
    assert_eq!(
        (&open["period"]["startTime"], &open["period"]["endTime"]),
        (&Value::Null, &Value::Null)
    );
    let trial = check("GET", STATUS, &api.call("GET", "/subscriptions/sub_trial/usage").await);
    assert!(trial["trial"]["endTime"].is_string(), "{trial}");
    let later = (Utc::now() + chrono::Duration::hours(1))
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339()
        .replace('+', "%2B");
    let at = check(
        "GET",
        STATUS,
        &api.call("GET", &format!("/subscriptions/sub_http/usage?at={later}"))
            .await,
    );
    assert_eq!(at["usedAmount"], Value::Null, "no pricing: {at}");
    let unknown = api.call("GET", "/subscriptions/sub_nobody/usage").await;
    assert_eq!(check("GET", STATUS, &unknown)["code"], "subscription_not_found");
    let outside = api
        .call("GET", "/subscriptions/sub_a/usage?at=2020-01-01T00:00:00Z")
        .await;
    assert_eq!(check("GET", STATUS, &outside)["code"], "no_service_period");
    for query in [
        "at=yesterday",
        "at=2026-11-27T10:00:00",
        "at=2026-11-27T10:00:00Z&at=2026-11-27T10:00:00Z",
    ] {
        let reply = api.call("GET", &format!("/subscriptions/sub_a/usage?{query}")).await;
        assert_eq!(
            check("GET", STATUS, &reply)["invalidFields"][0]["field"],
            "at",
            "{query}"
        );
    }

    // Without the token (and with a wrong one), and with a valid token
    // that lacks the scope.
    for (token, code) in [(None, "unauthorized"), (Some(SCRAPER_TOKEN), "insufficient_scope")] {
        let caller = TestApi {
            addr: api.addr.clone(),
            client: reqwest::Client::new(),
            token,
            server: None,
        };
        let replies = [
            ("POST", "/usages", caller.post(&json!({})).await),
            ("POST", "/usage-batches", caller.post_batch(&[json!({})]).await),
            ("GET", "/usages", caller.call("GET", "/usages").await),
            ("GET", "/usages/{id}", caller.call("GET", "/usages/h1").await),
            ("DELETE", "/usages/{id}", caller.call("DELETE", "/usages/h1").await),
            ("PUT", "/usages/{id}", caller.put("h1", &json!({})).await),
            (
                "GET",
                "/usages/{id}/history",
                caller.call("GET", "/usages/h1/history").await,
            ),
            (
                "GET",
                "/subscriptions/{id}/usage",
                caller.call("GET", "/subscriptions/sub_a/usage").await,
            ),
            (
                "GET",
                "/subscriptions/{id}/periods",
                caller.call("GET", "/subscriptions/sub_a/periods").await,
            ),
        ];
        for (method, template, reply) in &replies {
            assert_eq!(check(method, template, reply)["code"], code, "{method} {template}");
        }
        if token.is_some() {
            let challenge = replies[0].2.header("www-authenticate").unwrap();
            assert!(challenge.contains(r#"error="insufficient_scope""#), "{challenge}");
            continue;
        }
        let wrong = caller.send(caller.request("GET", "/usages").bearer_auth("guess")).await;
        assert!(check("GET", "/usages", &wrong)["detail"].is_string());
        assert!(wrong.header("www-authenticate").unwrap().contains("invalid_token"));
    }

    // The router: each documented path answers exactly its documented
    // methods (405 with Allow for the others); an unknown path is 404.
    for (path, item) in openapi.paths() {
        let path_now = path.replace("{id}", "h1");
        let reply = api.call("PATCH", &path_now).await;
        let body = openapi.check_fallback(&reply, 405, "method_not_allowed");
        let allowed: BTreeSet<String> = reply
            .header("allow")
            .unwrap_or_else(|| panic!("no Allow on {path}: {body}"))
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| m != "HEAD")
            .collect();
        let documented: BTreeSet<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.as_str() != "parameters")
            .map(|k| k.to_uppercase())
            .collect();
        assert_eq!(allowed, documented, "methods of {path}");
    }
    openapi.check_fallback(&api.call("GET", "/nothing/here").await, 404, "not_found");

    // The database does not answer: 503 everywhere it is asked.
    let body = json!({"subscriptionId": "sub_http", "quantity": 1});
    let (a, b, c, d, e, f, g, periods) = tokio::join!(
        dead.post(&body),
        dead.call("GET", "/usages"),
        dead.call("GET", "/usages/h1"),
        dead.call("DELETE", "/usages/h1"),
        dead.call("GET", "/readyz"),
        dead.call("GET", "/subscriptions/sub_http/usage"),
        dead.post_batch(std::slice::from_ref(&body)),
        dead.call("GET", "/subscriptions/sub_http/periods"),
    );
    let (put, history) = tokio::join!(dead.put("h1", &body), dead.call("GET", "/usages/h1/history"));
    check("PUT", "/usages/{id}", &put);
    check("GET", "/usages/{id}/history", &history);
    check("POST", "/usages", &a);
    check("POST", "/usage-batches", &g);
    check("GET", "/usages", &b);
    check("GET", "/usages/{id}", &c);
    check("DELETE", "/usages/{id}", &d);
    check("GET", "/subscriptions/{id}/usage", &f);
    check("GET", "/subscriptions/{id}/periods", &periods);
    let not_ready = check("GET", "/readyz", &e);
    assert_eq!(not_ready["code"], "not_ready");

    // A database that takes connections and never answers: the request
    // timeout answers instead.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("postgres://postgres@{}/silent", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let mut config = ApiConfig::from_settings(&env.settings(), PARTITIONS, false);
    config.limits.request_timeout = Duration::from_millis(300);
    let stalled = TestApi::start(
        sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(60))
            .connect_lazy(&silent_url)
            .unwrap(),
        config,
        Arc::new(Metrics::default()),
        None,
    )
    .await;
    let timed_out = check("GET", "/usages", &stalled.call("GET", "/usages").await);
    assert_eq!(timed_out["code"], "request_timeout");
    stalled.shutdown().await;
    holder.abort();

    // --- The invoice: stamps inv-u1 and closes its period.
    env.wait_for_count("SELECT count(*) FROM usages WHERE id = 'inv-u1'", 1)
        .await;
    let issued = invoice("inv_1", "sub_inv", &start, &end);
    let wire = Wire {
        key: Some("sub_inv"),
        headers: json!({}),
        payload: issued.clone(),
    };
    asyncapi.assert_matches("invoice-events", "invoiceIssued", &wire);
    env.send("invoice-events", Some("sub_inv"), Some(issued.to_string().as_bytes()));
    env.flush();
    env.wait_for_count("SELECT count(*) FROM usages WHERE invoice_id IS NOT NULL", 1)
        .await;
    let stamped = check("GET", "/usages/{id}", &api.call("GET", "/usages/inv-u1").await);
    assert_eq!(stamped["invoiceId"], "inv_1");
    let invoiced = api.call("DELETE", "/usages/inv-u1").await;
    assert_eq!(check("DELETE", "/usages/{id}", &invoiced)["code"], "usage_invoiced");
    let closed = api.post(&json!({"subscriptionId": "sub_inv", "quantity": 1})).await;
    assert_eq!(check("POST", "/usages", &closed)["code"], "period_closed");
    let billed = check(
        "GET",
        "/subscriptions/{id}/usage",
        &api.call("GET", "/subscriptions/sub_inv/usage").await,
    );
    assert_eq!(
        billed["period"],
        json!({"startTime": billed["period"]["startTime"], "endTime": billed["period"]["endTime"], "closed": true, "invoiceId": "inv_1"})
    );
    env.usage(plain.iter().find(|e| e["id"] == "inv-u1").unwrap().clone());
    // Corrections that need what came before on other partitions: an
    // invoiced usage, and a usage of another subscription.
    for correction in [
        json!({"action": "void", "id": "inv-u1", "subscriptionId": "sub_inv"}),
        json!({"action": "void", "id": "k1", "subscriptionId": "sub_inv"}),
    ] {
        let wire = Wire {
            key: Some("sub_inv"),
            headers: json!({}),
            payload: correction.clone(),
        };
        asyncapi.assert_matches("usage-events", "usageEvent", &wire);
        env.usage(correction);
    }
    env.flush();
    outcomes += 3;

    // --- Periods: sub_inv's closed by its invoice; a second invoice for it
    //     is refused; sub_old's closed by time, then billed.
    let second = invoice("inv_2", "sub_inv", &start, &end);
    asyncapi.assert_matches(
        "invoice-events",
        "invoiceIssued",
        &Wire {
            key: Some("sub_inv"),
            headers: json!({}),
            payload: second.clone(),
        },
    );
    env.send("invoice-events", Some("sub_inv"), Some(second.to_string().as_bytes()));
    let old_invoice = invoice("inv_old", "sub_old", &json!(old_period.0), &json!(old_period.1));
    env.send(
        "invoice-events",
        Some("sub_old"),
        Some(old_invoice.to_string().as_bytes()),
    );
    env.flush();
    const PERIODS: &str = "/subscriptions/{id}/periods";
    let listed = check("GET", PERIODS, &api.call("GET", "/subscriptions/sub_inv/periods").await);
    assert_eq!(
        (&listed["periods"][0]["state"], &listed["periods"][0]["closedBy"]),
        (&json!("invoiced"), &json!("invoice")),
        "{listed}"
    );
    let open_periods = check(
        "GET",
        PERIODS,
        &api.call("GET", "/subscriptions/sub_amount/periods").await,
    );
    assert_eq!(
        (
            &open_periods["periods"][0]["state"],
            &open_periods["periods"][0]["amount"]
        ),
        (&json!("open"), &json!(60)),
        "{open_periods}"
    );
    let unknown = api.call("GET", "/subscriptions/sub_nobody/periods").await;
    assert_eq!(check("GET", PERIODS, &unknown)["code"], "subscription_not_found");

    // --- Records: every one on the output topics matches its channel.
    let bootstrap = env.kafka.bootstrap_servers();
    let results = Reader::new(bootstrap, "usage-results", PARTITIONS).read(outcomes, WAIT);
    let mut statuses = BTreeSet::new();
    let mut reasons = BTreeSet::new();
    let mut applied = BTreeSet::new();
    for record in &results {
        asyncapi.check_record("usage-results", record);
        let outcome = &record.value;
        assert_eq!(record.headers["outcome-id"], outcome["outcomeId"].as_str().unwrap());
        assert_eq!(record.headers["event-id"], outcome["eventId"].as_str().unwrap());
        assert_eq!(record.headers["status"], outcome["status"].as_str().unwrap());
        if let Some(subscription) = outcome["subscriptionId"].as_str() {
            assert_eq!(record.key.as_deref(), Some(subscription), "keyed by subscription");
        }
        statuses.insert(outcome["status"].as_str().unwrap().to_owned());
        if let Some(code) = outcome["error"]["code"].as_str() {
            reasons.insert(code.to_owned());
        }
        for limit in [&outcome["limit"], &outcome["error"]["limit"]] {
            if let Some(kind) = limit["applied"].as_str() {
                applied.insert(kind.to_owned());
            }
        }
    }
    assert_eq!(statuses, schema_enum("outcome.json", "/properties/status/enum"));
    assert_eq!(
        reasons,
        &schema_enum("common.json", "/$defs/reasonCode/enum") - &strings(&UNPRODUCIBLE_CODES)
    );
    assert_eq!(applied, schema_enum("limit-report.json", "/properties/applied/enum"));
    let duplicate = results
        .iter()
        .find(|r| r.value["eventId"] == "inv-u1" && r.value["status"] == "duplicate")
        .expect("the duplicate of an invoiced usage");
    assert_eq!(duplicate.value["usage"]["invoiceId"], "inv_1");
    assert!(
        results
            .iter()
            .any(|r| r.value["limit"]["periodStartTime"].is_null() && r.value["limit"].is_object()),
        "an open-ended period's limit"
    );
    // Under the amount limit: the partial create that filled it, and the
    // rejection after it, carry the money and no quantity limit.
    let outcome_of = |id: &str| {
        &results
            .iter()
            .find(|r| r.value["eventId"] == id)
            .unwrap_or_else(|| panic!("no outcome for {id}"))
            .value
    };
    let filled = outcome_of("m3");
    assert_eq!(
        (&filled["partial"], &filled["usage"]["quantity"]),
        (&json!(true), &json!(15)),
        "{filled}"
    );
    let refused = &outcome_of("m4")["error"]["limit"];
    for block in [&filled["limit"], refused] {
        assert_eq!(
            (
                &block["limitAmount"],
                &block["usedAmount"],
                &block["currency"],
                &block["available"]
            ),
            (&json!(60), &json!(60), &json!("EUR"), &json!(0)),
            "{block}"
        );
        assert!(block.get("limit").is_none(), "{block}");
    }

    // Alerts: sub_a's soft steps and hard limit, sub_trial's trial limit,
    // sub_open's hard limit, sub_amount's soft steps and amount hard limit.
    let alert_reader = Reader::new(bootstrap, "usage-alerts", PARTITIONS);
    let alerts = alert_reader.read(10, WAIT);
    assert_eq!(
        alert_reader.read_rest(Duration::from_secs(1)).len(),
        0,
        "more alerts than the steps reached"
    );
    let mut types = BTreeSet::new();
    let mut steps = BTreeSet::new();
    for record in &alerts {
        asyncapi.check_record("usage-alerts", record);
        assert_eq!(record.headers["alert-id"], record.value["alertId"].as_str().unwrap());
        assert_eq!(record.headers["type"], record.value["type"].as_str().unwrap());
        assert_eq!(record.key.as_deref(), record.value["subscriptionId"].as_str());
        types.insert(record.value["type"].as_str().unwrap().to_owned());
        steps.insert(record.value["threshold"].as_u64().unwrap());
    }
    assert_eq!(types, schema_enum("alert.json", "/properties/type/enum"));
    assert_eq!(steps, BTreeSet::from([75, 90, 100]));
    let in_money: Vec<String> = alerts
        .iter()
        .filter(|r| r.value["subscriptionId"] == "sub_amount")
        .map(|r| {
            let a = &r.value;
            format!("{} {} {} {}", a["type"], a["threshold"], a["usedAmount"], a["usageId"])
        })
        .collect();
    assert_eq!(
        in_money,
        [
            r#""soft-usage-limit-reached" 75 32 "m1""#,
            r#""soft-usage-limit-reached" 90 54 "m2""#,
            r#""soft-usage-limit-reached" 100 54 "m2""#,
            r#""hard-usage-limit-reached" 100 60 "m3""#,
        ]
    );

    let letters = Reader::new(bootstrap, "usage-events-dlq", PARTITIONS).read(7, WAIT);
    let mut dlq_reasons = BTreeSet::new();
    for record in &letters {
        asyncapi.check_record("usage-events-dlq", record);
        dlq_reasons.insert(record.headers["dlq-reason"].clone());
    }
    assert_eq!(
        dlq_reasons,
        schema_enum("dead-letter-headers.json", "/properties/dlq-reason/enum")
    );
    let junk = letters.iter().find(|r| r.key.as_deref() == Some("junk")).unwrap();

    // sub_old: closed by time, then invoiced; sub_inv: closed by its invoice.
    let period_reader = Reader::new(bootstrap, "usage-periods", PARTITIONS);
    let period_records = period_reader.read(3, WAIT);
    assert_eq!(
        period_reader.read_rest(Duration::from_secs(1)).len(),
        0,
        "one record per period and event"
    );
    let mut kinds = BTreeSet::new();
    let mut seen_periods = BTreeSet::new();
    for record in &period_records {
        asyncapi.check_record("usage-periods", record);
        let body = &record.value;
        assert_eq!(record.headers["type"], body["type"].as_str().unwrap());
        assert_eq!(record.key.as_deref(), body["subscriptionId"].as_str());
        kinds.insert(body["type"].as_str().unwrap().to_owned());
        seen_periods.insert(format!(
            "{} {} {} {}",
            body["subscriptionId"].as_str().unwrap(),
            body["type"].as_str().unwrap(),
            body["closedBy"].as_str().unwrap(),
            body["invoiceId"]
        ));
    }
    assert_eq!(kinds, schema_enum("usage-period.json", "/properties/type/enum"));
    assert_eq!(
        seen_periods,
        strings(&[
            "sub_inv usage-period-closed invoice \"inv_1\"",
            "sub_old usage-period-closed grace null",
            "sub_old usage-period-invoiced grace \"inv_old\"",
        ])
    );
    assert_eq!(
        (junk.headers["trace"].as_str(), junk.payload.as_slice()),
        ("t-1", &b"{{ not json"[..])
    );

    // --- Metrics: the live page has exactly the registered metrics,
    //     and every series and label the dashboard queries exists on it.
    let page = wait_for_metrics(
        &api,
        &[
            "usage_worker_consumer_lag{",
            "usage_worker_outbox_backlog{",
            "usage_worker_db_pool_connections{",
            "usage_worker_transaction_duration_seconds_count{kind=\"http_correct\"}",
        ],
    )
    .await;
    let page = check("GET", "/metrics", &page);
    let live = labels_on_page(page.as_str().unwrap());
    let registered = registered_metrics();
    let families: BTreeSet<String> = page
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        families, registered,
        "metrics on /metrics (left) and registered (right)"
    );
    // Labels Prometheus adds to every series it scrapes.
    let target_labels = strings(&["instance", "job"]);
    for expr in dashboard_queries(&read_json(DASHBOARD)) {
        let (selectors, grouping) = labels_in(&expr);
        let mut available = target_labels.clone();
        for (series, labels) in &selectors {
            let on_page = live
                .get(series)
                .unwrap_or_else(|| panic!("the dashboard queries {series}, which /metrics does not have"));
            for label in labels {
                assert!(
                    on_page.contains(label) || target_labels.contains(label),
                    "{series} has no label {label} ({expr})"
                );
            }
            available.extend(on_page.iter().cloned());
        }
        for label in grouping {
            assert!(
                available.contains(&label),
                "grouping by {label}, which no series of {expr} has"
            );
        }
    }

    // Every documented status was produced, and every problem code but
    // those no request can produce.
    let seen = openapi.seen.lock().unwrap().clone();
    let documented = openapi.documented();
    let unproduced: Vec<_> = documented.difference(&seen).collect();
    assert!(unproduced.is_empty(), "documented but never produced: {unproduced:?}");
    let codes = openapi.codes.lock().unwrap().clone();
    let expected = &schema_enum("problem.json", "/properties/code/enum") - &strings(&UNPRODUCIBLE_CODES);
    assert_eq!(codes, expected, "problem codes produced (left) and documented (right)");

    let _ = stop_sampler.send(());
    sampler.await.unwrap();
    dead.shutdown().await;
    api.shutdown().await;
    worker.shutdown().await.unwrap();
    eprintln!(
        "documents checked against the running worker in {:?}",
        started.elapsed()
    );
}

/// /metrics once every one of `needles` is on it.
async fn wait_for_metrics(api: &TestApi, needles: &[&str]) -> Reply {
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = api.call("GET", "/metrics").await;
        let page = String::from_utf8_lossy(&reply.body);
        if needles.iter().all(|n| page.contains(n)) {
            return reply;
        }
        assert!(Instant::now() < deadline, "{needles:?} never all appeared:\n{page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
