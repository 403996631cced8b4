//! Billing semantics end to end: trial and soft limits, alerts, invoice
//! feedback, CloudEvents input and dead letters.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use test_kit::{active_subscription, Reader, TestEnv, PARTITIONS};

const WAIT: Duration = Duration::from_secs(60);

/// (id, invoiceId, invoiceItemId, updatedTime)
type StampedUsage = (String, Option<String>, Option<String>, chrono::DateTime<Utc>);

fn reader(env: &TestEnv, topic: &str) -> Reader {
    Reader::new(env.kafka.bootstrap_servers(), topic, PARTITIONS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_trial_limit_caps_usage_before_the_trial_ends_across_periods() {
    let env = TestEnv::start().await;
    let now = Utc::now();
    let mut sub = active_subscription("sub_t", Some("100"));
    sub["status"] = json!("trial");
    sub["trialEndTime"] = json!((now - chrono::Duration::hours(1)).to_rfc3339());
    sub["usageLimits"]["trialLimit"] = json!(5);
    env.subscription(sub);
    let worker = env.worker().await;
    let in_trial = (now - chrono::Duration::hours(2)).to_rfc3339();
    env.usage(json!({"id": "t1", "subscriptionId": "sub_t", "quantity": 4, "usageTime": in_trial}));
    env.usage(json!({"id": "t2", "subscriptionId": "sub_t", "quantity": 3, "usageTime": in_trial}));
    env.usage(json!({"id": "t3", "subscriptionId": "sub_t", "quantity": 3, "acceptPartialQuantity": true, "usageTime": in_trial}));
    env.flush();
    let records = env.results_reader().read(3, WAIT);
    let [t1, t2, t3] = [&records[0].value, &records[1].value, &records[2].value];
    assert_eq!(t1["limit"]["applied"], "trialLimit", "{t1}");
    assert_eq!(
        (t1["limit"]["limit"].clone(), t1["limit"]["available"].clone()),
        (json!(5), json!(1))
    );
    assert_eq!(t2["error"]["code"], "usage_limit_exceeded");
    assert_eq!(t2["error"]["limit"]["applied"], "trialLimit");
    assert_eq!(t2["error"]["available"], json!(1));
    assert_eq!(
        (t3["usage"]["quantity"].clone(), t3["partial"].clone()),
        (json!(1), json!(true))
    );
    let trial_used: rust_decimal::Decimal = sqlx::query_scalar("SELECT trial_used FROM subscriptions")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(trial_used, rust_decimal::Decimal::from(5));

    // Usage after the trial ended (the message's own time) is only held to
    // the hard limit, which counts the trial usage of the period too.
    env.usage(json!({"id": "t4", "subscriptionId": "sub_t", "quantity": 95}));
    env.usage(json!({"id": "t5", "subscriptionId": "sub_t", "quantity": 1}));
    env.flush();
    let after = env.results_reader().read(5, WAIT);
    assert_eq!(after[3].value["status"], "created", "{}", after[3].value);
    assert_eq!(after[3].value["limit"]["applied"], "hardLimit");
    assert_eq!(after[4].value["error"]["code"], "usage_limit_exceeded");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soft_steps_and_trial_alerts_fire_once_per_period_lowest_first() {
    let env = TestEnv::start().await;
    let now = Utc::now();
    let mut sub = active_subscription("sub_al", Some("10"));
    sub["usageLimits"]["softLimit"] = json!({"quantity": 6});
    sub["usageLimits"]["trialLimit"] = json!(8);
    sub["trialEndTime"] = json!((now + chrono::Duration::days(1)).to_rfc3339());
    env.subscription(sub);
    let worker = env.worker().await;
    for (id, q, partial) in [
        ("a1", "5", false),
        ("a2", "2", false),
        ("a3", "0.5", false),
        ("a4", "5", true),
        ("a5", "1", true),
    ] {
        env.usage(json!({"id": id, "subscriptionId": "sub_al", "quantity": q, "acceptPartialQuantity": partial}));
    }
    env.flush();
    let outcomes = env.results_reader().read(5, WAIT);
    let statuses: Vec<String> = outcomes
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r.value["status"].as_str().unwrap(),
                r.value["usage"]["quantity"]
            )
        })
        .collect();
    // 5, 7 (soft), 7.5, then 0.5 to fill the trial limit of 8, then nothing left.
    assert_eq!(
        statuses,
        ["created 5", "created 2", "created 0.5", "created 0.5", "rejected null"]
    );

    // The soft limit of 6 steps at 4.5 (a1), then 5.4 and 6 (a2, lowest
    // first); the trial limit fills with a4.
    let alerts = reader(&env, "usage-alerts").read(4, WAIT);
    let steps: Vec<String> = alerts
        .iter()
        .map(|a| {
            format!(
                "{} {} {}",
                a.value["type"].as_str().unwrap(),
                a.value["threshold"],
                a.value["usageId"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            "soft-usage-limit-reached 75 a1",
            "soft-usage-limit-reached 90 a2",
            "soft-usage-limit-reached 100 a2",
            "trial-usage-limit-reached 100 a4"
        ]
    );
    let soft = &alerts[2].value;
    assert_eq!((soft["limit"].clone(), soft["used"].clone()), (json!(6), json!(7)));
    assert_eq!(soft["subscriptionId"], "sub_al");
    assert!(soft["periodStartTime"].is_string() && soft["periodEndTime"].is_string());
    assert!(
        soft.get("limitAmount").is_none(),
        "a quantity limit has no amounts: {soft}"
    );
    let ids: std::collections::HashSet<&str> = alerts.iter().map(|a| a.value["alertId"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "an alert id per step");
    assert_eq!(alerts[0].key.as_deref(), Some("sub_al"));
    assert!(alerts[0].headers.contains_key("outbox-seq"));

    // More usage in the period raises nothing again.
    env.usage(json!({"id": "a6", "subscriptionId": "sub_al", "quantity": 1}));
    env.flush();
    env.results_reader().read(6, WAIT);
    assert_eq!(
        reader(&env, "usage-alerts").read_rest(Duration::from_secs(2)).len(),
        4,
        "no fifth alert"
    );
    assert_eq!(env.scalar_i64("SELECT count(*) FROM limit_alerts").await, 4);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partial_usage_that_fills_the_hard_limit_raises_the_hard_alert() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_hard", Some("3")));
    let worker = env.worker().await;
    env.usage(json!({"id": "h1", "subscriptionId": "sub_hard", "quantity": 2}));
    env.usage(json!({"id": "h2", "subscriptionId": "sub_hard", "quantity": 2, "acceptPartialQuantity": true}));
    env.flush();
    env.results_reader().read(2, WAIT);
    let alerts = reader(&env, "usage-alerts").read(1, WAIT);
    assert_eq!(alerts[0].value["type"], "hard-usage-limit-reached");
    assert_eq!(
        (alerts[0].value["used"].clone(), alerts[0].value["usageId"].clone()),
        (json!(3), json!("h2"))
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_issued_invoice_closes_its_period_and_stamps_its_usages_once() {
    let env = TestEnv::start().await;
    let sub = active_subscription("sub_i", None);
    let (start, end) = (
        sub["currentPeriodStartTime"].clone(),
        sub["currentPeriodEndTime"].clone(),
    );
    env.subscription(sub);
    let worker = env.worker().await;
    env.usage(json!({"id": "i1", "subscriptionId": "sub_i", "quantity": 1}));
    env.usage(json!({"id": "i2", "subscriptionId": "sub_i", "quantity": 2}));
    env.flush();
    let results = env.results_reader();
    results.read(2, WAIT);

    let invoice = json!({"type": "invoice-issued", "invoiceId": "inv_1", "issuedTime": Utc::now().to_rfc3339(),
        "items": [{"invoiceItemId": "ii_1", "subscriptionId": "sub_i", "periodStartTime": start, "periodEndTime": end}]});
    env.send("invoice-events", Some("sub_i"), Some(invoice.to_string().as_bytes()));
    env.flush();
    // The next usage batch waits for the invoice event already on its topic.
    env.usage(json!({"id": "i3", "subscriptionId": "sub_i", "quantity": 1}));
    env.flush();
    let closed = results.read(1, WAIT);
    assert_eq!(closed[0].value["error"]["code"], "period_closed", "{}", closed[0].value);

    let stamped: Vec<StampedUsage> =
        sqlx::query_as("SELECT id, invoice_id, invoice_item_id, updated_time FROM usages ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert!(
        stamped
            .iter()
            .all(|u| u.1.as_deref() == Some("inv_1") && u.2.as_deref() == Some("ii_1")),
        "{stamped:?}"
    );

    // The same event again changes nothing; a duplicate of i1 now shows the invoice.
    env.send("invoice-events", Some("sub_i"), Some(invoice.to_string().as_bytes()));
    env.flush();
    env.usage(json!({"id": "i1", "subscriptionId": "sub_i", "quantity": 1}));
    env.flush();
    let duplicate = results.read(1, WAIT);
    assert_eq!(duplicate[0].value["status"], "duplicate");
    assert_eq!(duplicate[0].value["usage"]["invoiceId"], "inv_1");
    let again: Vec<StampedUsage> =
        sqlx::query_as("SELECT id, invoice_id, invoice_item_id, updated_time FROM usages ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(again, stamped, "applying the invoice twice changes nothing");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invoice_items_for_unknown_subscriptions_or_periods_and_invalid_control_messages_are_dead_lettered() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_k", None));
    let worker = env.worker().await;
    // The control topics are read independently: the snapshot is applied
    // before the invoice that names its subscription is sent.
    env.wait_for_count("SELECT count(*) FROM subscriptions", 1).await;
    let unknown_sub = json!({"type": "invoice-issued", "invoiceId": "inv_2", "issuedTime": "2026-11-01T00:00:00Z",
        "items": [{"invoiceItemId": "ii_2", "subscriptionId": "sub_nobody",
                   "periodStartTime": "2026-10-01T00:00:00Z", "periodEndTime": "2026-11-01T00:00:00Z"}]});
    let unknown_period = json!({"type": "invoice-issued", "invoiceId": "inv_3", "issuedTime": "2026-11-01T00:00:00Z",
        "items": [{"invoiceItemId": "ii_3", "subscriptionId": "sub_k",
                   "periodStartTime": "2020-10-01T00:00:00Z", "periodEndTime": "2020-11-01T00:00:00Z"}]});
    env.send_at(
        "invoice-events",
        Some(1),
        Some("sub_nobody"),
        Some(unknown_sub.to_string().as_bytes()),
    );
    env.send_at(
        "invoice-events",
        Some(1),
        Some("sub_k"),
        Some(unknown_period.to_string().as_bytes()),
    );
    env.send_at(
        "invoice-events",
        Some(1),
        Some("x"),
        Some(b"{\"type\": \"invoice-issued\"}"),
    );
    env.send_at(
        "subscriptions",
        Some(2),
        Some("sub_bad"),
        Some(b"{\"id\": \"sub_bad\", \"version\": -1}"),
    );
    env.flush();
    let letters = reader(&env, "usage-events-dlq").read(4, WAIT);
    let mut reasons: Vec<(String, String, String)> = letters
        .iter()
        .map(|l| {
            (
                l.headers["dlq-reason"].clone(),
                l.headers["dlq-source-topic"].clone(),
                l.headers["dlq-source-offset"].clone(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            (
                "invalid_invoice_event".to_owned(),
                "invoice-events".to_owned(),
                "2".to_owned()
            ),
            (
                "invalid_snapshot".to_owned(),
                "subscriptions".to_owned(),
                "0".to_owned()
            ),
            ("unknown_period".to_owned(), "invoice-events".to_owned(), "1".to_owned()),
            (
                "unknown_subscription".to_owned(),
                "invoice-events".to_owned(),
                "0".to_owned()
            ),
        ]
    );
    assert!(letters.iter().all(|l| l.headers.contains_key("dlq-source-partition")));
    let snapshot = letters
        .iter()
        .find(|l| l.headers["dlq-reason"] == "invalid_snapshot")
        .unwrap();
    assert_eq!(snapshot.key.as_deref(), Some("sub_bad"), "the original key");
    assert!(
        snapshot.headers["dlq-detail"].contains("version"),
        "{:?}",
        snapshot.headers
    );

    // A second worker reading the same control topics adds no copies.
    let second = env.worker().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        reader(&env, "usage-events-dlq").read_rest(Duration::from_secs(2)).len(),
        4
    );
    worker.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_usage_messages_go_to_the_dlq_with_their_original_bytes_and_headers() {
    let env = TestEnv::start().await;
    let worker = env.worker().await;
    let record = rdkafka::producer::BaseRecord::<str, [u8]>::to("usage-events")
        .partition(3)
        .key("k1")
        .payload(b"\xff\xfe not utf-8")
        .headers(rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "trace",
            value: Some(b"\x00\x01"),
        }));
    env.producer.send(record).map_err(|(e, _)| e).unwrap();
    env.send_at("usage-events", Some(3), Some("k2"), Some(&vec![b'{'; 70_000]));
    env.send_at(
        "usage-events",
        Some(3),
        Some("k3"),
        Some(br#"{"subscriptionId": "s", "quantity": -1}"#),
    );
    env.flush();
    let outcomes = env.results_reader().read(3, WAIT);
    let codes: Vec<&str> = outcomes
        .iter()
        .map(|o| o.value["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["malformed_payload", "payload_too_large", "invalid_field"]);
    let letters = reader(&env, "usage-events-dlq").read(2, WAIT);
    assert_eq!(
        reader(&env, "usage-events-dlq").read_rest(Duration::from_secs(1)).len(),
        2,
        "a valid JSON request is not dead-lettered"
    );
    assert_eq!((letters[0].partition, letters[0].key.as_deref()), (3, Some("k1")));
    assert_eq!(letters[0].headers["trace"], "\u{0}\u{1}", "original headers kept");
    assert_eq!(letters[0].headers["dlq-reason"], "malformed_payload");
    assert_eq!(letters[0].payload, b"\xff\xfe not utf-8", "original bytes kept");
    assert_eq!(letters[1].headers["dlq-reason"], "payload_too_large");
    assert_eq!(letters[1].headers["dlq-source-offset"], "1");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudevents_in_structured_and_binary_mode_are_decided_like_plain_events() {
    let env = TestEnv::start().await;
    env.subscription(active_subscription("sub_ce", None));
    let worker = env.worker().await;
    let structured = json!({"specversion": "1.0", "id": "ce-1", "source": "/meter", "type": "com.example.usage",
        "time": Utc::now().to_rfc3339(), "data": {"subscriptionId": "sub_ce", "quantity": 2}});
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "content-type",
        value: Some("application/cloudevents+json"),
    });
    let payload = structured.to_string();
    env.producer
        .send(
            rdkafka::producer::BaseRecord::<str, str>::to("usage-events")
                .key("sub_ce")
                .payload(&payload)
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    let mut binary = rdkafka::message::OwnedHeaders::new();
    for (k, v) in [
        ("ce_specversion", "1.0"),
        ("ce_id", "ce-2"),
        ("ce_source", "/meter"),
        ("ce_type", "usage"),
    ] {
        binary = binary.insert(rdkafka::message::Header { key: k, value: Some(v) });
    }
    let body = json!({"subscriptionId": "sub_ce", "quantity": "1.5"}).to_string();
    env.producer
        .send(
            rdkafka::producer::BaseRecord::<str, str>::to("usage-events")
                .key("sub_ce")
                .payload(&body)
                .headers(binary),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    env.flush();
    let outcomes = env.results_reader().read(2, WAIT);
    let created: Vec<(String, String)> = outcomes
        .iter()
        .map(|o| {
            (
                o.value["eventId"].as_str().unwrap().to_owned(),
                o.value["usage"]["quantity"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        created,
        [
            ("ce-1".to_owned(), "2".to_owned()),
            ("ce-2".to_owned(), "1.5".to_owned())
        ]
    );
    worker.shutdown().await.unwrap();
}

/// SPEC's example pricing: 0.5 per unit up to 100, then 0.4.
fn tiered_pricing() -> serde_json::Value {
    json!({"currency": "USD", "formula": "tiered",
           "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_amount_hard_limit_fits_clamps_and_refuses_by_what_the_usage_costs() {
    let env = TestEnv::start().await;
    let mut sub = active_subscription("sub_am", None);
    sub["pricing"] = tiered_pricing();
    sub["usageLimits"] = json!({"hardLimit": {"amount": 60}, "softLimit": {"amount": 40}});
    env.subscription(sub);
    let worker = env.worker().await;
    for (id, quantity, partial) in [
        ("m1", 60, false),
        ("m2", 20, false),
        ("m3", 50, false),
        ("m4", 50, true),
        ("m5", 1, true),
    ] {
        env.usage(
            json!({"id": id, "subscriptionId": "sub_am", "quantity": quantity, "acceptPartialQuantity": partial}),
        );
    }
    env.flush();
    let outcomes = env.results_reader().read(5, WAIT);
    let [m1, m2, m3, m4, m5] = [0, 1, 2, 3, 4].map(|i| &outcomes[i].value);

    // 60 cost 30; the limit of 60 buys 125 in all: 65 more.
    assert_eq!(m1["status"], "created", "{m1}");
    assert_eq!(
        m1["limit"],
        json!({"applied": "hardLimit", "used": 60, "available": 65, "limitAmount": 60, "usedAmount": 30,
               "currency": "USD", "periodStartTime": m1["limit"]["periodStartTime"],
               "periodEndTime": m1["limit"]["periodEndTime"]})
    );
    assert_eq!(m2["limit"]["usedAmount"], json!(40));
    // 130 would cost 62: refused whole, with what fits (45) and the amounts.
    assert_eq!(m3["status"], "rejected", "{m3}");
    assert_eq!(m3["error"]["code"], "usage_limit_exceeded");
    assert_eq!(m3["error"]["available"], json!(45));
    assert_eq!(
        (
            m3["error"]["limit"]["limitAmount"].clone(),
            m3["error"]["limit"]["usedAmount"].clone(),
            m3["error"]["limit"]["currency"].clone()
        ),
        (json!(60), json!(40), json!("USD"))
    );
    assert!(m3["error"]["limit"].get("limit").is_none(), "no quantity limit: {m3}");
    // With acceptPartialQuantity, exactly the 45 that fit.
    assert_eq!(
        (m4["usage"]["quantity"].clone(), m4["partial"].clone()),
        (json!(45), json!(true))
    );
    assert_eq!(m4["requestedQuantity"], json!(50));
    assert_eq!(
        (m4["limit"]["usedAmount"].clone(), m4["limit"]["available"].clone()),
        (json!(60), json!(0))
    );
    assert_eq!(m5["error"]["code"], "usage_limit_exceeded", "{m5}");

    // Soft steps at 30, 36 and 40, then the hard limit, with the amounts.
    let alerts = reader(&env, "usage-alerts").read(4, WAIT);
    let steps: Vec<(String, u64, String)> = alerts
        .iter()
        .map(|a| {
            (
                a.value["type"].as_str().unwrap().to_owned(),
                a.value["threshold"].as_u64().unwrap(),
                a.value["usageId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let step =
        |kind: &str, threshold, usage: &str| (format!("{kind}-usage-limit-reached"), threshold, usage.to_owned());
    assert_eq!(
        steps,
        [
            step("soft", 75, "m1"),
            step("soft", 90, "m2"),
            step("soft", 100, "m2"),
            step("hard", 100, "m4")
        ]
    );
    let hard = &alerts[3].value;
    assert_eq!(
        (
            hard["limitAmount"].clone(),
            hard["usedAmount"].clone(),
            hard["currency"].clone(),
            hard["used"].clone()
        ),
        (json!(60), json!(60), json!("USD"), json!(125))
    );
    assert!(hard.get("limit").is_none(), "{hard}");
    assert_eq!(alerts[0].value["usedAmount"], json!(30));

    // The database holds the exact total, the pricing and the steps.
    let (used, pricing): (rust_decimal::Decimal, String) =
        sqlx::query_as("SELECT used, pricing::text FROM service_periods WHERE subscription_id = 'sub_am'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(used, rust_decimal::Decimal::from(125));
    assert!(pricing.contains("tiered"), "{pricing}");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM limit_alerts WHERE subscription_id = 'sub_am'")
            .await,
        4
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_pricing_or_amount_limit_is_a_dead_lettered_snapshot_that_changes_nothing() {
    let env = TestEnv::start().await;
    let mut good = active_subscription("sub_p", Some("{\"quantity\": 5}"));
    good["version"] = json!(1);
    env.subscription(good);
    let worker = env.worker().await;
    // Newer versions, each invalid: the stored limit of 5 must stay.
    let mut unpriced = active_subscription("sub_p", Some("{\"amount\": 100}"));
    unpriced["version"] = json!(2);
    let mut bad_brackets = active_subscription("sub_p", Some("{\"amount\": 100}"));
    bad_brackets["version"] = json!(3);
    bad_brackets["pricing"] = json!({"currency": "USD", "formula": "volume",
        "brackets": [{"maxQuantity": 10, "price": 1}, {"maxQuantity": 10, "price": 0.5}, {"maxQuantity": null, "price": 0.1}]});
    let mut both = active_subscription("sub_p", Some("{\"quantity\": 100, \"amount\": 100}"));
    both["version"] = json!(4);
    both["pricing"] = tiered_pricing();
    for snapshot in [unpriced, bad_brackets, both] {
        env.subscription(snapshot);
    }
    let letters = reader(&env, "usage-events-dlq").read(3, WAIT);
    let details: Vec<&str> = letters.iter().map(|l| l.headers["dlq-detail"].as_str()).collect();
    assert!(letters.iter().all(|l| l.headers["dlq-reason"] == "invalid_snapshot"));
    assert!(
        details[0].contains("usageLimits.hardLimit: is an amount, but the snapshot has no pricing"),
        "{details:?}"
    );
    assert!(details[1].contains("pricing: brackets[1].maxQuantity"), "{details:?}");
    assert!(
        details[2].contains("usageLimits.hardLimit: must have a quantity or an amount, not both"),
        "{details:?}"
    );

    // Nothing changed: the quantity limit of 5 still caps the period.
    env.usage(json!({"id": "p1", "subscriptionId": "sub_p", "quantity": 6}));
    env.flush();
    let outcome = &env.results_reader().read(1, WAIT)[0].value;
    assert_eq!(outcome["error"]["code"], "usage_limit_exceeded", "{outcome}");
    assert_eq!(outcome["error"]["limit"]["limit"], json!(5));
    let version: i64 = sqlx::query_scalar("SELECT version FROM subscriptions WHERE id = 'sub_p'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(version, 1);
    worker.shutdown().await.unwrap();
}
