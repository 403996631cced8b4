//! Corrections end to end: voids and amendments read from `usage-events`,
//! decided under the subscription's lock in input order, one outcome each,
//! and an audit trail in the database.

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};
use test_kit::{active_subscription, Reader, TestEnv, PARTITIONS};

const WAIT: Duration = Duration::from_secs(60);

/// (id, quantity, last_requested_quantity, voided, voided_by)
type StoredRow = (String, Decimal, Option<Decimal>, bool, Option<String>);

fn status_and_code(outcome: &Value) -> (String, String) {
    (
        outcome["status"].as_str().unwrap_or_default().to_owned(),
        outcome["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn voids_and_amendments_over_kafka_are_decided_in_order_with_every_rejection() {
    let env = TestEnv::start().await;
    let mut sub = active_subscription("sub_c", Some("10"));
    sub["usageLimits"]["softLimit"] = json!({"quantity": 8});
    env.subscription(sub);
    env.subscription(active_subscription("sub_other", None));
    let worker = env.worker().await;
    let amend = |id: &str, quantity: u32, partial: bool, previous: Option<u32>| {
        let mut event = json!({"action": "amend", "id": id, "subscriptionId": "sub_c", "quantity": quantity,
                               "acceptPartialQuantity": partial});
        if let Some(previous) = previous {
            event["previousQuantity"] = json!(previous);
        }
        event
    };
    let events = [
        json!({"id": "c1", "subscriptionId": "sub_c", "quantity": 4}),
        // 7 of the soft limit's 8: the 75 % step.
        json!({"id": "c2", "subscriptionId": "sub_c", "quantity": 3}),
        amend("c1", 2, false, Some(4)),
        // Back up to 7: the 75 % step is not raised again.
        amend("c1", 4, false, Some(2)),
        amend("c1", 10, false, None),
        // Clamped to what fits under the hard limit: 7, a total of 10.
        amend("c1", 10, true, None),
        json!({"action": "void", "id": "c2", "subscriptionId": "sub_c", "reason": "meter fault"}),
        json!({"action": "void", "id": "c2", "subscriptionId": "sub_c"}),
        amend("c2", 1, false, None),
        json!({"id": "c2", "subscriptionId": "sub_c", "quantity": 3}),
        json!({"action": "void", "id": "nope", "subscriptionId": "sub_c"}),
        amend("c1", 5, false, Some(99)),
    ];
    for event in events {
        env.usage(event);
    }
    env.flush();
    let results = env.results_reader();
    let records = results.read(12, WAIT);
    let outcomes: Vec<&Value> = records.iter().map(|r| &r.value).collect();
    // Another subscription's partition: sent once c1 surely exists.
    env.usage(json!({"action": "void", "id": "c1", "subscriptionId": "sub_other"}));
    env.flush();
    let other = results.read(1, WAIT);
    assert_eq!(other[0].value["error"]["code"], "subscription_mismatch");
    assert_eq!(other[0].value["eventId"], "c1");
    assert_eq!(other[0].value["subscriptionId"], "sub_other");
    let got: Vec<(String, String)> = outcomes.iter().map(|v| status_and_code(v)).collect();
    let want: Vec<(String, String)> = [
        ("created", ""),
        ("created", ""),
        ("amended", ""),
        ("amended", ""),
        ("rejected", "usage_limit_exceeded"),
        ("amended", ""),
        ("voided", ""),
        ("duplicate", ""),
        ("rejected", "usage_voided"),
        ("rejected", "usage_voided"),
        ("rejected", "usage_not_found"),
        ("rejected", "amend_conflict"),
    ]
    .iter()
    .map(|(s, c)| (s.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want, "{outcomes:#?}");

    let lowered = outcomes[2];
    assert_eq!(lowered["previousQuantity"], 4);
    assert_eq!(lowered["usage"]["quantity"], 2);
    assert_eq!(lowered["eventId"], "c1");
    let refused = outcomes[4];
    assert_eq!(refused["error"]["limit"]["applied"], "hardLimit");
    assert_eq!(refused["error"]["available"], 7, "what c1 could be amended to");
    let clamped = outcomes[5];
    assert_eq!(
        (
            &clamped["usage"]["quantity"],
            &clamped["partial"],
            &clamped["requestedQuantity"]
        ),
        (&json!(7), &json!(true), &json!(10))
    );
    assert_eq!(clamped["previousQuantity"], 4);
    let voided = outcomes[6];
    assert_eq!(voided["usage"]["quantity"], 3, "the usage with the quantity it had");
    assert_eq!(voided["usage"]["voidReason"], "meter fault");
    assert_eq!(voided["usage"]["voidedBy"], "kafka");
    assert_eq!(outcomes[7]["usage"]["id"], "c2");
    assert_eq!(outcomes[11]["error"]["field"], "previousQuantity");

    // The soft steps: 75 % once (lowering and raising again raised nothing),
    // then 90 and 100 % and the hard limit with the clamped amendment.
    let alert_reader = Reader::new(env.kafka.bootstrap_servers(), "usage-alerts", PARTITIONS);
    let alerts = alert_reader.read(4, WAIT);
    let steps: Vec<(String, i64, String)> = alerts
        .iter()
        .map(|a| {
            (
                a.value["type"].as_str().unwrap().to_owned(),
                a.value["threshold"].as_i64().unwrap(),
                a.value["usageId"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let soft = "soft-usage-limit-reached".to_owned();
    assert_eq!(
        steps,
        [
            (soft.clone(), 75, "c2".to_owned()),
            (soft.clone(), 90, "c1".to_owned()),
            (soft, 100, "c1".to_owned()),
            ("hard-usage-limit-reached".to_owned(), 100, "c1".to_owned()),
        ]
    );
    assert!(alert_reader.read_rest(Duration::from_secs(1)).is_empty());

    // The audit trail: both rows stay, c2 voided; every correction kept.
    let used: Decimal = sqlx::query_scalar("SELECT used FROM service_periods WHERE subscription_id = 'sub_c'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(used, Decimal::from(7));
    let rows: Vec<StoredRow> = sqlx::query_as(
        "SELECT id, quantity, last_requested_quantity, voided_time IS NOT NULL, voided_by FROM usages ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("c1".to_owned(), Decimal::from(7), Some(Decimal::from(10)), false, None),
            ("c2".to_owned(), Decimal::from(3), None, true, Some("kafka".to_owned())),
        ]
    );
    let history: Vec<(String, String, Decimal, Decimal)> =
        sqlx::query_as("SELECT usage_id, action, quantity, previous_quantity FROM usage_corrections ORDER BY seq")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let d = Decimal::from;
    assert_eq!(
        history,
        [
            ("c1".to_owned(), "amended".to_owned(), d(2), d(4)),
            ("c1".to_owned(), "amended".to_owned(), d(4), d(2)),
            ("c1".to_owned(), "amended".to_owned(), d(7), d(4)),
            ("c2".to_owned(), "voided".to_owned(), d(3), d(3)),
        ]
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_correction_in_the_same_batch_as_its_usage_corrects_it() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_b", Some("100")));
    // Produced before the worker starts, so that they are read (and
    // decided) together.
    env.usage(json!({"id": "b1", "subscriptionId": "sub_b", "quantity": 5}));
    env.usage(json!({"action": "amend", "id": "b1", "subscriptionId": "sub_b", "quantity": 6}));
    env.usage(json!({"id": "b2", "subscriptionId": "sub_b", "quantity": 1}));
    env.usage(json!({"action": "void", "id": "b2", "subscriptionId": "sub_b"}));
    env.usage(json!({"id": "b2", "subscriptionId": "sub_b", "quantity": 1}));
    env.flush();
    let worker = env.worker().await;
    let records = env.results_reader().read(5, WAIT);
    let got: Vec<(String, String)> = records.iter().map(|r| status_and_code(&r.value)).collect();
    assert_eq!(
        got.iter().map(|(s, c)| format!("{s}{c}")).collect::<Vec<_>>(),
        ["created", "amended", "created", "voided", "rejectedusage_voided"]
    );
    let used: Decimal = sqlx::query_scalar("SELECT used FROM service_periods WHERE subscription_id = 'sub_b'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(used, Decimal::from(6));
    let b1: Decimal = sqlx::query_scalar("SELECT quantity FROM usages WHERE id = 'b1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(b1, Decimal::from(6));
    worker.shutdown().await.unwrap();
}

/// A correction that names another subscription than its usage's is
/// decided without locking the subscription it names. That subscription is
/// usually on another partition, so in the worker its lock is held by the
/// lane deciding that partition's batch: waiting for it would stall this
/// batch until that whole transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_correction_naming_another_subscription_waits_for_no_lock_of_it() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_own", None));
    env.subscription(active_subscription("sub_held", None));
    let worker = env.worker().await;
    env.usage(json!({"id": "o1", "subscriptionId": "sub_own", "quantity": 1}));
    env.flush();
    let results = env.results_reader();
    assert_eq!(results.read(1, WAIT)[0].value["status"], "created");
    env.wait_for_count("SELECT count(*) FROM subscriptions WHERE id = 'sub_held'", 1)
        .await;
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM subscriptions WHERE id = 'sub_held' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    env.usage(json!({"action": "void", "id": "o1", "subscriptionId": "sub_held"}));
    env.flush();
    // Read while the lock is held (a worker waiting for it would decide
    // nothing until the statement time-out, and then retry).
    let outcome = results.read(1, Duration::from_secs(20));
    holder.rollback().await.unwrap();
    assert_eq!(outcome[0].value["error"]["code"], "subscription_mismatch");
    assert_eq!(outcome[0].value["subscriptionId"], "sub_held");
    let voided: bool = sqlx::query_scalar("SELECT voided_time IS NOT NULL FROM usages WHERE id = 'o1'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(!voided, "a mismatching void changes nothing");
    worker.shutdown().await.unwrap();
}
