//! Callers: named tokens with scopes (SPEC "Security defaults"). Each
//! guarded route answers 401 without a valid token and 403 with a valid
//! token that lacks its scope; the caller's name is what voids and
//! amendments record; version 1's `http.bearer_token` keeps every scope;
//! the `production` profile refuses to serve the API to anyone.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use test_kit::{active_subscription, ApiServer, TestEnv};
use usage_worker::config::{sha256, Secret, Settings, TokenEntry};

use super::http::{problem, subscribe};

const READER: &str = "tok-reader-0c1d";
const WRITER: &str = "tok-writer-7a2b";
const VOIDER: &str = "tok-voider-93fe";
const SCRAPER: &str = "tok-scraper-51aa";

fn entry(name: &str, token: &str, scopes: &[&str]) -> TokenEntry {
    let digest: String = sha256(token).iter().map(|b| format!("{b:02x}")).collect();
    TokenEntry {
        name: name.into(),
        sha256: digest,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

/// One caller per scope, and `/metrics` behind `metrics:read`.
fn scoped(mut settings: Settings) -> Settings {
    settings.http.tokens = vec![
        entry("reader", READER, &["usages:read"]),
        entry("writer", WRITER, &["usages:write"]),
        entry("voider", VOIDER, &["usages:void"]),
        entry("scraper", SCRAPER, &["metrics:read"]),
    ];
    settings.http.metrics_requires_token = true;
    settings
}

struct TestApi {
    server: ApiServer,
    client: reqwest::Client,
}

impl TestApi {
    async fn serve(settings: &Settings) -> Self {
        Self {
            server: ApiServer::serve(settings).await,
            client: reqwest::Client::new(),
        }
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>, token: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, format!("http://{}{path}", self.server.addr));
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }
}

/// A request of each route group, with the token it needs.
fn requests() -> Vec<(Method, &'static str, Option<Value>, &'static str)> {
    let usage = json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 2});
    vec![
        (Method::POST, "/usages", Some(usage), WRITER),
        (
            Method::PUT,
            "/usages/u1",
            Some(json!({"subscriptionId": "sub_a", "quantity": 3})),
            WRITER,
        ),
        (
            Method::POST,
            "/usage-batches",
            Some(json!({"usages": [{"id": "b1", "subscriptionId": "sub_a", "quantity": 1}]})),
            WRITER,
        ),
        (Method::GET, "/usages", None, READER),
        (Method::GET, "/usages/u1", None, READER),
        (Method::GET, "/usages/u1/history", None, READER),
        (Method::GET, "/subscriptions/sub_a/usage", None, READER),
        (Method::GET, "/subscriptions/sub_a/periods", None, READER),
        (Method::GET, "/metrics", None, SCRAPER),
        (Method::DELETE, "/usages/u1", None, VOIDER),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_route_needs_its_scope() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("100"))).await;
    let api = TestApi::serve(&scoped(env.settings())).await;

    for (method, path, body, right) in requests() {
        let what = format!("{method} {path}");
        let missing = api.send(method.clone(), path, body.as_ref(), None).await;
        assert_eq!(
            missing.headers()["www-authenticate"],
            r#"Bearer realm="usage-worker""#,
            "{what}"
        );
        problem(missing, 401, "unauthorized").await;
        let wrong = api.send(method.clone(), path, body.as_ref(), Some("tok-guess")).await;
        assert_eq!(
            wrong.headers()["www-authenticate"],
            r#"Bearer realm="usage-worker", error="invalid_token""#,
            "{what}"
        );
        problem(wrong, 401, "unauthorized").await;
        // Every other caller's token is valid, and lacks this route's scope.
        for other in [READER, WRITER, VOIDER, SCRAPER].into_iter().filter(|t| *t != right) {
            let lacking = api.send(method.clone(), path, body.as_ref(), Some(other)).await;
            let challenge = lacking.headers()["www-authenticate"].to_str().unwrap().to_owned();
            assert!(
                challenge.contains(r#"error="insufficient_scope""#),
                "{what}: {challenge}"
            );
            problem(lacking, 403, "insufficient_scope").await;
        }
        let allowed = api.send(method.clone(), path, body.as_ref(), Some(right)).await;
        assert!(allowed.status().is_success(), "{what}: {allowed:?}");
    }
    // What the refused requests sent changed nothing: the one create, the
    // one batch, the one amendment and the one void are all there is.
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 2);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usage_corrections").await, 2);
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            api.send(Method::GET, probe, None, None).await.status(),
            StatusCode::OK,
            "{probe}"
        );
    }
    api.server.shutdown().await;

    // Without metrics_requires_token, /metrics stays open beside the tokens.
    let mut settings = scoped(env.settings());
    settings.http.metrics_requires_token = false;
    let api = TestApi::serve(&settings).await;
    assert_eq!(
        api.send(Method::GET, "/metrics", None, None).await.status(),
        StatusCode::OK
    );
    problem(api.send(Method::GET, "/usages", None, None).await, 401, "unauthorized").await;
    api.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn voids_and_amendments_carry_the_token_s_name() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("100"))).await;
    let mut settings = env.settings();
    settings.http.tokens = vec![
        entry("invoicing", WRITER, &["usages:read", "usages:write"]),
        entry("support-desk", VOIDER, &["usages:void"]),
    ];
    let api = TestApi::serve(&settings).await;
    let usage = json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 5});
    let created = api.send(Method::POST, "/usages", Some(&usage), Some(WRITER)).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let amended = api
        .send(
            Method::PUT,
            "/usages/u1",
            Some(&json!({"subscriptionId": "sub_a", "quantity": 4})),
            Some(WRITER),
        )
        .await;
    assert_eq!(amended.status(), StatusCode::OK);
    let voided = api
        .send(Method::DELETE, "/usages/u1?reason=duplicate", None, Some(VOIDER))
        .await;
    assert_eq!(voided.status(), StatusCode::NO_CONTENT);

    let history: Value = api
        .send(Method::GET, "/usages/u1/history", None, Some(WRITER))
        .await
        .json()
        .await
        .unwrap();
    let by: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["http", "invoicing", "support-desk"], "{history}");
    let voided_by: String = sqlx::query_scalar("SELECT voided_by FROM usages WHERE id = 'u1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(voided_by, "support-desk");
    api.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_version_1_bearer_token_keeps_every_scope() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("100"))).await;
    let mut settings = scoped(env.settings());
    settings.http.bearer_token = Some(Secret::new("tok-v1-legacy"));
    let api = TestApi::serve(&settings).await;
    for (method, path, body, _) in requests() {
        let allowed = api
            .send(method.clone(), path, body.as_ref(), Some("tok-v1-legacy"))
            .await;
        assert!(allowed.status().is_success(), "{method} {path}: {allowed:?}");
    }
    let voided_by: String = sqlx::query_scalar("SELECT voided_by FROM usages WHERE id = 'u1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(voided_by, "bearer_token");
    let amended_by: String =
        sqlx::query_scalar("SELECT by FROM usage_corrections WHERE usage_id = 'u1' AND action = 'amended'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(amended_by, "bearer_token");
    api.server.shutdown().await;
}

/// `usage-worker <command>` under the production profile, on a free port,
/// against the test's database.
fn production(env: &TestEnv, command: &str, extra: &[(&str, &str)]) -> (Command, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_usage-worker"));
    cmd.arg(command)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.env_vars(test_kit::env::CONFIG_DIR))
        .env("USAGE_WORKER_ENV", "production")
        .env("HTTP_ADDR", addr.to_string())
        .envs(extra.iter().copied())
        .stdin(Stdio::null());
    (cmd, format!("http://{addr}"))
}

/// Starts the command, waits for `/readyz`, stops it with SIGTERM; then
/// checks that `GET /usages` needed `token` (open when `None`).
async fn serves(mut cmd: Command, base: &str, token: Option<&str>) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await {
            if response.status() == StatusCode::OK {
                break;
            }
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("usage-worker did not start serving");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let anonymous = client.get(format!("{base}/usages")).send().await.unwrap().status();
    let with_token = match token {
        Some(token) => client
            .get(format!("{base}/usages"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status(),
        None => anonymous,
    };
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    match token {
        Some(_) => {
            assert_eq!(anonymous, StatusCode::UNAUTHORIZED);
            assert_eq!(with_token, StatusCode::OK);
        }
        None => assert_eq!(anonymous, StatusCode::OK),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_production_profile_refuses_an_api_open_to_anyone() {
    let env = TestEnv::start().await;
    for command in ["serve", "run"] {
        let (mut cmd, _) = production(&env, command, &[]);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("http.tokens"), "{command}: {stderr}");
    }
    // `migrate` serves nothing: it needs no token.
    let (mut cmd, _) = production(&env, "migrate", &[]);
    assert_eq!(cmd.output().unwrap().status.code(), Some(0));

    let (cmd, base) = production(&env, "serve", &[("USAGE_WORKER__HTTP__ALLOW_ANONYMOUS", "true")]);
    serves(cmd, &base, None).await;
    let tokens = serde_json::to_string(&json!([{
        "name": "invoicing",
        "sha256": entry("invoicing", READER, &[]).sha256,
        "scopes": ["usages:read"],
    }]))
    .unwrap();
    let (cmd, base) = production(&env, "serve", &[("USAGE_WORKER__HTTP__TOKENS", &tokens)]);
    serves(cmd, &base, Some(READER)).await;
    let (cmd, base) = production(&env, "serve", &[("HTTP_BEARER_TOKEN", "tok-v1-legacy")]);
    serves(cmd, &base, Some("tok-v1-legacy")).await;
}

#[test]
fn docker_compose_gives_its_workers_a_token_and_hides_the_database() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap();
    let compose: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = &compose["services"];
    assert!(
        services["postgres"].get("ports").is_none(),
        "the database publishes no port"
    );
    // The worker's settings, as compose gives them, start under the
    // production profile.
    let mut vars: Vec<(String, String)> = services["worker"]["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned()))
        .collect();
    assert!(vars.contains(&("USAGE_WORKER_ENV".into(), "production".into())));
    vars.push(("USAGE_WORKER_CONFIG_DIR".into(), test_kit::env::CONFIG_DIR.into()));
    let http = Settings::load_from(&vars).unwrap().http;
    http.check_callers_required().unwrap();
    // The token the comment hands out is the one whose digest is configured.
    let token = text
        .lines()
        .skip_while(|line| !line.contains("its token is"))
        .nth(1)
        .unwrap()
        .trim_start_matches([' ', '#'])
        .trim();
    let callers = http.callers().unwrap();
    assert_eq!(callers.len(), 1);
    assert_eq!(callers[0].digest, sha256(token));
    assert_eq!(callers[0].scopes.len(), 4, "every scope, metrics:read included");
}
