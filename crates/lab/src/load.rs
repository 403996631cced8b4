//! A deterministic load: subscription snapshots with hard and soft limits
//! (quantities, or for half of them amounts under a tiered pricing), and a
//! stream of usage events keyed by subscription.

use std::time::Duration;

use chrono::Utc;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use usage_worker::config::Partitioner;
use usage_worker::domain::subscription::decode_pricing;
use usage_worker::kafka::producer::send_with_retry;

pub type LoadProducer = ThreadedProducer<DefaultProducerContext>;

/// A producer for the load (batches of up to 5 ms, a deep queue), with
/// these further settings.
pub fn producer(bootstrap: &str, settings: &[(&str, &str)]) -> anyhow::Result<LoadProducer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000");
    for (key, value) in settings {
        config.set(*key, *value);
    }
    Ok(config.create()?)
}

/// Sends one record, waiting while the producer's queue is full.
pub fn send(
    producer: &LoadProducer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &str,
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    send_with_retry(producer, record, || std::thread::sleep(Duration::from_millis(1)))?;
    Ok(())
}

/// How the subscriptions' limits are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// Every hard and soft limit a quantity (the default load).
    Quantity,
    /// Half the subscriptions priced (see [`PRICING`]), with amount hard and
    /// soft limits that cost exactly what their quantity limits would.
    Amount,
}

impl LimitMode {
    /// The name in the bench's report and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quantity => "quantity",
            Self::Amount => "amount",
        }
    }
}

/// The priced subscriptions' plan: tiered, 0.5 USD each for the first 100,
/// then 0.4 USD each. Every price is above 0, so the amount rises with the
/// total: an amount limit set to the amount of a quantity limit lets
/// through exactly what that quantity limit does.
pub const PRICING: &str = r#"{"currency": "USD", "formula": "tiered", "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]}"#;

/// What a total quantity costs under [`PRICING`], computed by the worker's
/// own pricing module.
pub fn priced_amount(quantity: Decimal) -> Decimal {
    let raw = RawValue::from_string(PRICING.to_owned()).expect("PRICING is JSON");
    decode_pricing(&raw).expect("PRICING is valid").amount(quantity)
}

/// Active subscriptions `sub_0`.., as (key, snapshot): one in
/// `small_every` has a hard limit of 200, small enough to be reached; the
/// others 1,000,000. Each has a soft limit at three quarters of its hard
/// limit. With [`LimitMode::Amount`], the subscriptions in every other block
/// of `small_every` (so half the small ones and half the large ones) are
/// priced and have those limits as amounts: the amount of 200 (90 USD) or of
/// 1,000,000, and of three quarters of it. The decisions are the same as
/// with quantity limits; only how they are computed differs.
pub fn subscription_snapshots(count: u64, small_every: u64, mode: LimitMode) -> Vec<(String, String)> {
    let now = Utc::now();
    let start = (now - chrono::Duration::days(10)).to_rfc3339();
    let end = (now + chrono::Duration::days(20)).to_rfc3339();
    (0..count)
        .map(|i| {
            let hard: u64 = if i % small_every == 0 { 200 } else { 1_000_000 };
            let soft = hard * 3 / 4;
            let priced = mode == LimitMode::Amount && (i / small_every) % 2 == 1;
            let (limits, pricing) = if priced {
                let amount = |q: u64| priced_amount(Decimal::from(q)).normalize();
                (
                    format!(
                        r#"{{"hardLimit": {{"amount": {}}}, "softLimit": {{"amount": {}}}}}"#,
                        amount(hard),
                        amount(soft)
                    ),
                    format!(r#", "pricing": {PRICING}"#),
                )
            } else {
                (format!(r#"{{"hardLimit": {hard}, "softLimit": {soft}}}"#), String::new())
            };
            let snapshot = format!(
                r#"{{"id": "sub_{i}", "status": "active", "version": 1, "currentPeriodStartTime": "{start}", "currentPeriodEndTime": "{end}", "usageLimits": {limits}{pricing}}}"#
            );
            (format!("sub_{i}"), snapshot)
        })
        .collect()
}

/// Publishes [`subscription_snapshots`].
pub fn publish_subscriptions(
    producer: &LoadProducer,
    topic: &str,
    count: u64,
    small_every: u64,
    mode: LimitMode,
) -> anyhow::Result<()> {
    for (key, snapshot) in subscription_snapshots(count, small_every, mode) {
        send(producer, topic, None, &key, &snapshot)?;
    }
    Ok(())
}

/// A deterministic stream: about 30 % partial, 2 % exact re-sends, 1 %
/// invalid, keyed by subscription.
pub struct Generator {
    state: u64,
    subscriptions: u64,
    sequence: u64,
    recent: Vec<(String, String)>,
}

impl Generator {
    pub fn new(subscriptions: u64, seed: u64) -> Self {
        Self {
            // xorshift must not start at zero.
            state: seed.max(1),
            subscriptions,
            sequence: 0,
            recent: Vec::new(),
        }
    }

    fn random(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// The next (key, payload).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> (String, String) {
        let r = self.random();
        self.sequence += 1;
        let i = self.sequence;
        let sub = format!("sub_{}", r % self.subscriptions);
        let quantity = format!("{}.{:03}", 1 + (r >> 20) % 9, (r >> 30) % 1000);
        let event = match (r >> 40) % 100 {
            0..=1 if !self.recent.is_empty() => {
                let n = self.recent.len();
                return self.recent[(r >> 50) as usize % n].clone();
            }
            2 => (
                sub.clone(),
                format!(r#"{{"id": "b{i}", "subscriptionId": "{sub}", "quantity": -1}}"#),
            ),
            3..=32 => (
                sub.clone(),
                format!(
                    r#"{{"id": "b{i}", "subscriptionId": "{sub}", "quantity": {quantity}, "acceptPartialQuantity": true}}"#
                ),
            ),
            _ => (
                sub.clone(),
                format!(r#"{{"id": "b{i}", "subscriptionId": "{sub}", "quantity": {quantity}}}"#),
            ),
        };
        if self.recent.len() < 1000 {
            self.recent.push(event.clone());
        } else {
            let slot = (r >> 16) as usize % 1000;
            self.recent[slot] = event.clone();
        }
        event
    }
}

/// Sends the generator's next event to its partition of `topic`.
pub fn send_next(
    producer: &LoadProducer,
    topic: &str,
    partitions: i32,
    generator: &mut Generator,
) -> anyhow::Result<()> {
    let (key, payload) = generator.next();
    send(producer, topic, Some(partition_of(&key, partitions)), &key, &payload)
}

/// Keyed by subscription, placed as Kafka's default partitioner places the
/// key (murmur2, as the Java client and librdkafka's `murmur2_random` do).
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    usage_worker::kafka::partition::output_partition(key, partitions, Partitioner::Murmur2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use usage_worker::domain::subscription::{decode_snapshot, Limit};

    #[test]
    fn the_stream_is_deterministic_and_mixed() {
        let take = |seed| {
            let mut g = Generator::new(100, seed);
            (0..5000).map(|_| g.next()).collect::<Vec<_>>()
        };
        let events = take(7);
        assert_eq!(events, take(7));
        assert_ne!(events, take(8));
        let partial = events
            .iter()
            .filter(|(_, p)| p.contains("acceptPartialQuantity"))
            .count();
        let invalid = events.iter().filter(|(_, p)| p.contains("-1}")).count();
        let distinct: std::collections::HashSet<_> = events.iter().collect();
        assert!((1200..1800).contains(&partial), "{partial} partial");
        assert!((20..100).contains(&invalid), "{invalid} invalid");
        assert!(events.len() - distinct.len() > 40, "exact re-sends");
        assert!(events
            .iter()
            .all(|(key, payload)| payload.contains(&format!(r#""subscriptionId": "{key}""#))));
    }

    #[test]
    fn the_quantity_mode_keeps_the_default_load() {
        let snapshots = subscription_snapshots(20, 10, LimitMode::Quantity);
        assert_eq!(snapshots.len(), 20);
        for (i, (key, json)) in snapshots.iter().enumerate() {
            let snapshot = decode_snapshot(json.as_bytes()).unwrap();
            assert_eq!(
                (key.as_str(), snapshot.id.as_str()),
                (format!("sub_{i}").as_str(), key.as_str())
            );
            let hard = if i % 10 == 0 { 200 } else { 1_000_000 };
            assert_eq!(snapshot.limits.hard, Some(Limit::Quantity(Decimal::from(hard))));
            assert_eq!(snapshot.limits.soft, Some(Limit::Quantity(Decimal::from(hard * 3 / 4))));
            assert_eq!(snapshot.pricing, None);
        }
    }

    #[test]
    fn the_amount_mode_prices_half_the_small_and_half_the_large_subscriptions() {
        let snapshots = subscription_snapshots(40, 10, LimitMode::Amount);
        let mut priced = [0, 0];
        for (i, (_, json)) in snapshots.iter().enumerate() {
            let snapshot = decode_snapshot(json.as_bytes()).expect("a valid snapshot");
            let small = i % 10 == 0;
            let hard = if small { 200 } else { 1_000_000 };
            match snapshot.limits.hard {
                Some(Limit::Amount(amount)) => {
                    priced[usize::from(small)] += 1;
                    assert!(snapshot.pricing.is_some());
                    assert_eq!(amount, priced_amount(Decimal::from(hard)));
                    assert_eq!(
                        snapshot.limits.soft,
                        Some(Limit::Amount(priced_amount(Decimal::from(hard * 3 / 4))))
                    );
                }
                other => {
                    assert_eq!(other, Some(Limit::Quantity(Decimal::from(hard))));
                    assert_eq!(snapshot.pricing, None);
                }
            }
        }
        assert_eq!(priced, [18, 2], "half the large ones and half the small ones");
        // 100 at 0.5, then 100 at 0.4.
        assert_eq!(priced_amount(Decimal::from(200)), Decimal::from(90));
    }

    /// Why the two modes' figures compare: under the bench's pricing an
    /// amount limit set to amount(Q) accepts, clamps and refuses exactly as
    /// a quantity limit of Q does.
    #[test]
    fn an_amount_limit_of_amount_q_decides_as_a_quantity_limit_of_q() {
        let raw = RawValue::from_string(PRICING.to_owned()).unwrap();
        let pricing = decode_pricing(&raw).unwrap();
        let milli = |n: i64| Decimal::new(n, 3);
        for q in [200, 1_000_000] {
            let q = Decimal::from(q);
            let limit = pricing.amount(q);
            for used in [
                0,
                1,
                99_999,
                100_000,
                100_001,
                150_000,
                199_999,
                200_000,
                999_999_999,
                1_000_000_000,
            ] {
                let used = milli(used);
                for x in [1, 500, 1_000, 9_999, 100_001, 1_000_000_000] {
                    let x = milli(x);
                    let available = (q - used).max(Decimal::ZERO);
                    assert_eq!(
                        pricing.amount(used + x) <= limit,
                        x <= available,
                        "fits: used {used}, x {x}, Q {q}"
                    );
                    assert_eq!(
                        pricing.largest_fitting(used, x, limit),
                        x.min(available),
                        "clamp: used {used}, x {x}, Q {q}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_key_keeps_its_partition() {
        assert_eq!(partition_of("sub_1", 12), partition_of("sub_1", 12));
        let used: std::collections::HashSet<i32> = (0..200).map(|i| partition_of(&format!("sub_{i}"), 12)).collect();
        assert_eq!(used.len(), 12);
    }
}
