//! The HTTP server against slow and numerous clients, and the bounded cost
//! of `GET /usages`: the header-read timeout, the connection limit, the
//! request timeout (and that a timed-out create stores nothing), paging by
//! cursor, the capped offset, and the index the list's order uses.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use test_kit::{active_subscription, wait_until, ApiServer, TestEnv, PARTITIONS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use usage_worker::http::ApiConfig;
use usage_worker::metrics::Metrics;
use usage_worker::store;

use crate::http::subscribe;

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

/// The API alone on a free port, with the test's settings changed by `edit`.
async fn serve(env: &TestEnv, edit: impl FnOnce(&mut ApiConfig)) -> ApiServer {
    let settings = env.settings();
    let pool = store::connect(&settings.database).await.unwrap();
    let mut config = ApiConfig::from_settings(&settings, PARTITIONS, false);
    edit(&mut config);
    ApiServer::start(pool, config, Arc::new(Metrics::default())).await
}

async fn post(api: &ApiServer, body: &Value) -> reqwest::Response {
    post_to(&api.addr, body).await
}

async fn post_to(addr: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/usages"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads one HTTP/1.1 answer to a body-less request (as far as its head and
/// a small body), or nothing when `patience` runs out first.
async fn answer_within(stream: &mut TcpStream, patience: Duration) -> Option<String> {
    let mut buffer = vec![0; 4096];
    match tokio::time::timeout(patience, stream.read(&mut buffer)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buffer[..n]).into_owned()),
        Ok(_) => panic!("the connection was closed instead of answered"),
        Err(_) => None,
    }
}

/// Waits (up to `patience`) for the server to close the connection; true
/// when it did.
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    let mut buffer = vec![0; 4096];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_sends_half_a_request_head_is_disconnected_while_others_are_served() {
    let env = TestEnv::start().await;
    // The default (10 s) would outlast the patience below.
    let api = serve(&env, |c| c.limits.header_read_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(&api.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(&api.addr).await.unwrap();

    // No pooled connection: the server closes an idle one after the same
    // time-out, and a request sent on it as it closes would fail.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let served = client.get(format!("http://{}/healthz", api.addr)).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);

    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "a client with half a request head kept its connection"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a client that sent nothing kept its connection"
    );
    let served = client.get(format!("http://{}/healthz", api.addr)).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_limit_are_served_only_when_one_closes() {
    let env = TestEnv::start().await;
    let api = serve(&env, |c| {
        c.limits.max_connections = 2;
        // Idle keep-alive connections are closed after it: keep them.
        c.limits.header_read_timeout = Duration::from_secs(120);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&api.addr).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        let answer = answer_within(&mut stream, Duration::from_secs(30)).await;
        assert!(answer.is_some_and(|a| a.starts_with("HTTP/1.1 200")));
        held.push(stream);
    }
    // The kernel completes the handshake; the server does not take it up.
    let mut third = TcpStream::connect(&api.addr).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    assert_eq!(
        answer_within(&mut third, Duration::from_secs(1)).await,
        None,
        "a connection beyond the limit was served"
    );
    drop(held.pop());
    let answer = answer_within(&mut third, Duration::from_secs(30)).await;
    assert!(
        answer.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "{answer:?}"
    );
    drop(held);
    drop(third);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_past_its_timeout_is_503_and_its_transaction_stores_nothing() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let api = serve(&env, |c| c.limits.request_timeout = Duration::from_millis(500)).await;
    let body = json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 4});

    // The create waits for the subscription's row lock, held here.
    let lock = lock_subscription(&env, "sub_a").await;
    let timed_out = post(&api, &body).await;
    assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(timed_out.headers()["retry-after"], "1");
    assert_eq!(timed_out.headers()["content-type"], "application/problem+json");
    let problem: Value = timed_out.json().await.unwrap();
    assert_eq!(problem["code"], "request_timeout", "{problem}");
    lock.commit().await.unwrap();

    // Whatever the dropped request had begun ends once the lock is free;
    // had it gone on, it would have stored the usage by then.
    wait_until("every other session of the database to be idle", || async {
        env.scalar_i64(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'",
        )
        .await
            == 0
    })
    .await;
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 0);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        env.scalar_i64("SELECT coalesce(sum(used), 0)::bigint FROM service_periods")
            .await,
        0
    );
    // So the retry creates it, once.
    let retried = post(&api, &body).await;
    assert_eq!(retried.status(), StatusCode::CREATED);
    assert_eq!(env.scalar_i64("SELECT sum(used)::bigint FROM service_periods").await, 4);
    api.shutdown().await;
}

/// Holds the subscription's row lock until committed, so that a create
/// for it waits.
async fn lock_subscription(env: &TestEnv, id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM subscriptions WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_shutdown_the_server_stops_accepting_and_lets_the_request_in_flight_finish() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", Some("10"))).await;
    let api = serve(&env, |_| {}).await;
    let addr = api.addr.clone();
    let lock = lock_subscription(&env, "sub_a").await;
    let in_flight = tokio::spawn({
        let addr = addr.clone();
        async move { post_to(&addr, &json!({"id": "u1", "subscriptionId": "sub_a", "quantity": 4})).await }
    });
    wait_until("the create to wait for the lock", || async {
        env.scalar_i64(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;
    let stopping = tokio::spawn(api.shutdown());
    wait_until("the listener to close", || async {
        TcpStream::connect(&addr).await.is_err()
    })
    .await;
    assert!(!stopping.is_finished(), "the server stopped with a request in flight");
    lock.commit().await.unwrap();
    assert_eq!(in_flight.await.unwrap().status(), StatusCode::CREATED);
    stopping.await.unwrap();
    assert_eq!(env.scalar_i64("SELECT count(*) FROM usages").await, 1);
}

/// One page: its usages' ids and the path of the next page, if any.
async fn page(api: &ApiServer, path: &str) -> (Vec<String>, Option<String>) {
    let page = reqwest::get(format!("http://{}{path}", api.addr)).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK, "{path}");
    let next = page.headers().get("link").and_then(|link| {
        link.to_str()
            .unwrap()
            .split(", ")
            .find(|l| l.ends_with("rel=\"next\""))
            .map(|l| l[1..l.find('>').unwrap()].to_owned())
    });
    if let Some(next) = &next {
        assert!(next.contains("cursor=") && !next.contains("offset="), "{next}");
    }
    let body: Value = page.json().await.unwrap();
    let ids = body
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned());
    (ids.collect(), next)
}

/// Follows `rel="next"` from `first` to the end; the ids in the order read.
async fn page_through(api: &ApiServer, first: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut next = Some(first.to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let (page_ids, page_next) = page(api, &path).await;
        ids.extend(page_ids);
        next = page_next;
        pages += 1;
        assert!(pages < 100, "no end to the pages");
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_by_cursor_returns_each_usage_once_in_order_even_with_equal_times() {
    let env = TestEnv::start().await;
    subscribe(&env, active_subscription("sub_a", None)).await;
    subscribe(&env, active_subscription("sub_b", None)).await;
    let api = serve(&env, |_| {}).await;
    let base = chrono::Utc::now() - chrono::Duration::days(3);
    let at = |hours: i64| (base + chrono::Duration::hours(hours)).to_rfc3339();
    // Three share one time, across subscriptions; ids out of insertion order.
    let usages = [
        ("u5", "sub_a", 1),
        ("u2", "sub_b", 1),
        ("u9", "sub_a", 1),
        ("u1", "sub_a", 0),
        ("u7", "sub_b", 2),
        ("u3", "sub_a", 2),
        ("u4", "sub_b", 3),
    ];
    for (id, subscription, hours) in usages {
        let body = json!({"id": id, "subscriptionId": subscription, "quantity": 1, "usageTime": at(hours)});
        assert_eq!(post(&api, &body).await.status(), StatusCode::CREATED);
    }
    let in_order = ["u1", "u2", "u5", "u9", "u3", "u7", "u4"];
    assert_eq!(page_through(&api, "/usages?limit=2").await, in_order);
    assert_eq!(page_through(&api, "/usages?limit=3").await, in_order);
    assert_eq!(
        page_through(&api, "/usages?subscriptionId=sub_a&limit=1").await,
        ["u1", "u5", "u9", "u3"]
    );

    // A usage stored meanwhile before the reader's position shifts no
    // page: nothing is read twice (as it would be by offset).
    let (mut ids, next) = page(&api, "/usages?limit=2").await;
    let late = json!({"id": "u0", "subscriptionId": "sub_b", "quantity": 1, "usageTime": at(-1)});
    assert_eq!(post(&api, &late).await.status(), StatusCode::CREATED);
    ids.extend(page_through(&api, &next.unwrap()).await);
    assert_eq!(ids, in_order);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_offset_is_capped_and_a_forged_cursor_is_422_on_cursor() {
    let env = TestEnv::start().await;
    let api = serve(&env, |_| {}).await;
    let client = reqwest::Client::new();
    let get = |query: &'static str| client.get(format!("http://{}/usages?{query}", api.addr)).send();

    let deepest = get("offset=10000").await.unwrap();
    assert_eq!(deepest.status(), StatusCode::OK);
    assert_eq!(deepest.headers()["pagination-offset"], "10000");
    for (query, field) in [
        ("offset=10001", "offset"),
        ("offset=9223372036854775807", "offset"),
        ("cursor=djE6MDp1MQ&offset=0", "cursor"),
        ("cursor=not-a-cursor", "cursor"),
        // base64url of "v1:soon:u1"
        ("cursor=djE6c29vbjp1MQ", "cursor"),
    ] {
        let refused = get(query).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "invalid_field", "{body}");
        let fields: Vec<&str> = body["invalidFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{query}: {body}");
    }
    // base64url of "v1:0:u1": a cursor this API could have made.
    let made = get("cursor=djE6MDp1MQ").await.unwrap();
    assert_eq!(made.status(), StatusCode::OK);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_total_is_counted_up_to_its_cap_and_the_deepest_offset_still_links_on() {
    let env = TestEnv::start().await;
    // More usages than the count reads, stored directly (the count and the
    // pages do not care how they came).
    sqlx::query(
        "INSERT INTO usages (id, subscription_id, quantity, requested_quantity, accept_partial, usage_time,
                             period_start_time, created_time, updated_time)
         SELECT 'u' || lpad(n::text, 5, '0'), 'sub_a', 1, 1, false, timestamptz '2026-11-01' + n * interval '1 s',
                timestamptz '2026-11-01', now(), now()
         FROM generate_series(1, 10005) AS n",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let api = serve(&env, |_| {}).await;
    let deepest = reqwest::get(format!("http://{}/usages?limit=3&offset=10000", api.addr))
        .await
        .unwrap();
    assert_eq!(deepest.status(), StatusCode::OK);
    assert_eq!(deepest.headers()["pagination-total"], "10001");
    let link = deepest.headers()["link"].to_str().unwrap().to_owned();
    let body: Value = deepest.json().await.unwrap();
    let ids: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["u10001", "u10002", "u10003"]);
    // Past the offset cap the cursor goes on, to the end.
    let next = link.split(", ").find(|l| l.ends_with("rel=\"next\"")).unwrap();
    assert_eq!(
        page_through(&api, &next[1..next.find('>').unwrap()]).await,
        ["u10004", "u10005"]
    );
    // Under the cap the total is exact.
    let few = reqwest::get(format!("http://{}/usages?usageTimeTo=2026-11-01T00:00:10Z", api.addr))
        .await
        .unwrap();
    assert_eq!(few.headers()["pagination-total"], "9");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_list_order_has_an_index_that_an_interrupted_build_gets_back() {
    let env = TestEnv::start().await;
    let plan = || async {
        let mut tx = env.pool.begin().await.unwrap();
        // On a small table a sort would win; the question is whether the
        // index can serve the order and the cursor's seek at all.
        sqlx::query("SET LOCAL enable_sort = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        let lines: Vec<String> = sqlx::query_scalar(
            "EXPLAIN SELECT id FROM usages WHERE voided_time IS NULL
             AND (usage_time, id) > (now(), 'u1') ORDER BY usage_time, id LIMIT 101",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        lines.join("\n")
    };
    let explained = plan().await;
    assert!(explained.contains("usages_in_list_order"), "{explained}");

    // What a build cut short leaves: an invalid index, and the migration
    // not recorded. Migrating again builds it anew.
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'usages_in_list_order'::regclass")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE description = 'usages list order'")
        .execute(&env.pool)
        .await
        .unwrap();
    store::migrate(&env.pool).await.unwrap();
    let valid = env
        .scalar_i64("SELECT count(*) FROM pg_index WHERE indexrelid = 'usages_in_list_order'::regclass AND indisvalid")
        .await;
    assert_eq!(valid, 1);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM _sqlx_migrations WHERE description = 'usages list order'")
            .await,
        1
    );
}
