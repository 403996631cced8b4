//! The command line as operators meet it.

use std::process::Command;

fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_usage-worker"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

#[test]
fn a_bad_setting_stops_start_up_naming_it() {
    let out = worker()
        .arg("run")
        .env("USAGE_WORKER__PIPELINE__BATCH_SIZE", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("batch_size"), "{stderr}");

    let out = worker()
        .arg("migrate")
        .env("DATABASE_URL", "mysql://nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

#[test]
fn an_unreachable_database_fails_with_a_message_and_non_zero_exit() {
    let out = worker()
        .arg("migrate")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("applying migrations"));
}

/// `usage-worker healthcheck` (the image's HEALTHCHECK) against a live API:
/// a 200 passes, any other answer and no answer fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_passes_on_a_live_api_and_fails_otherwise() {
    use std::sync::Arc;
    use test_kit::{ApiServer, TestEnv, PARTITIONS};
    use usage_worker::http::ApiConfig;
    use usage_worker::metrics::Metrics;

    let env = TestEnv::start().await;
    let config = ApiConfig::from_settings(&env.settings(), PARTITIONS, false);
    let api = ApiServer::start(env.pool.clone(), config, Arc::new(Metrics::default())).await;
    let check = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            worker()
                .args(["healthcheck", "--timeout", "5", "--url", &url])
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    // HTTP_ADDR's port, probed on loopback: the default URL.
    let port = api.addr.rsplit(':').next().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        worker()
            .arg("healthcheck")
            .env("HTTP_ADDR", format!("0.0.0.0:{port}"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("/healthz: 200"));

    let out = check(format!("http://{}/no-such-path", api.addr)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("answered 404"));

    let addr = api.addr.clone();
    api.shutdown().await;
    let out = check(format!("http://{addr}/healthz")).await;
    assert_eq!(out.status.code(), Some(1), "nothing listens any more");
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to"));
}
