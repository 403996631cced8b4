//! A deterministic load: subscription snapshots with hard and soft limits,
//! and a stream of usage events keyed by subscription.

use std::time::Duration;

use chrono::Utc;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;
use usage_worker::config::Partitioner;
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

/// Active subscriptions `sub_0`..: one in `small_every` has a hard limit of
/// 200, small enough to be reached; the others 1,000,000. Each has a soft
/// limit at three quarters of its hard limit.
pub fn publish_subscriptions(producer: &LoadProducer, topic: &str, count: u64, small_every: u64) -> anyhow::Result<()> {
    let now = Utc::now();
    let start = (now - chrono::Duration::days(10)).to_rfc3339();
    let end = (now + chrono::Duration::days(20)).to_rfc3339();
    for i in 0..count {
        let limit = if i % small_every == 0 { 200 } else { 1_000_000 };
        let snapshot = format!(
            r#"{{"id": "sub_{i}", "status": "active", "version": 1, "currentPeriodStartTime": "{start}", "currentPeriodEndTime": "{end}", "usageLimits": {{"hardLimit": {limit}, "softLimit": {}}}}}"#,
            limit * 3 / 4
        );
        send(producer, topic, None, &format!("sub_{i}"), &snapshot)?;
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
    fn a_key_keeps_its_partition() {
        assert_eq!(partition_of("sub_1", 12), partition_of("sub_1", 12));
        let used: std::collections::HashSet<i32> = (0..200).map(|i| partition_of(&format!("sub_{i}"), 12)).collect();
        assert_eq!(used.len(), 12);
    }
}
