//! Two workers in one consumer group, one subscription's events spread over
//! every partition: the hard limit holds, every event is decided once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{active_subscription, TestEnv, PARTITIONS};
use rust_decimal::Decimal;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_never_exceed_a_limit_shared_across_partitions() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_hot", Some("500")));
    let first = env.worker().await;
    let second = env.worker().await;
    // Both members are in the group before the load starts.
    tokio::time::sleep(Duration::from_secs(4)).await;

    const EVENTS: usize = 2000;
    for i in 0..EVENTS {
        let event = json!({
            "id": format!("hot_{i}"),
            "subscriptionId": "sub_hot",
            "quantity": "0.7",
            "acceptPartialQuantity": i % 2 == 0,
        });
        env.send_at(
            "usage-events",
            Some(i as i32 % PARTITIONS),
            Some("sub_hot"),
            Some(event.to_string().as_bytes()),
        );
    }
    env.flush();
    let reader = env.results_reader();
    let records = reader.read(EVENTS, Duration::from_secs(120));
    assert!(reader.read_rest(Duration::from_secs(1)).is_empty());

    let mut per_event: HashMap<&str, usize> = HashMap::new();
    let mut accepted = Decimal::ZERO;
    for r in &records {
        *per_event.entry(r.value["eventId"].as_str().unwrap()).or_default() += 1;
        if r.value["status"] == "created" {
            accepted += r.value["usage"]["quantity"].to_string().parse::<Decimal>().unwrap();
        } else {
            assert_eq!(r.value["error"]["code"], "usage_limit_exceeded", "{}", r.value);
        }
    }
    assert_eq!(per_event.len(), EVENTS);
    assert!(per_event.values().all(|n| *n == 1));
    assert_eq!(
        accepted,
        Decimal::from(500),
        "the limit is filled exactly, never exceeded"
    );

    let (used, stored): (Decimal, Decimal) = sqlx::query_as(
        "SELECT p.used, (SELECT sum(quantity) FROM usages) FROM service_periods p WHERE subscription_id = 'sub_hot'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((used, stored), (Decimal::from(500), Decimal::from(500)));

    let (a, b) = (
        first.stats.decided.load(Ordering::Relaxed),
        second.stats.decided.load(Ordering::Relaxed),
    );
    assert!(a > 0 && b > 0, "both workers decided part of the stream ({a} and {b})");
    assert_eq!(a + b, EVENTS as u64);
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}
