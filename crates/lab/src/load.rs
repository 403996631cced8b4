//! A deterministic load: subscription snapshots with hard and soft limits
//! (quantities, or for half of them amounts under a tiered pricing), and a
//! stream of usage events keyed by subscription.

use std::time::Duration;

use chrono::{DateTime, Utc};
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

/// The hard limit of subscription `i`: 200 for one in `small_every`
/// (small enough to be reached), 1,000,000 for the others. As a quantity;
/// with [`LimitMode::Amount`] the priced ones have the amount of it, which
/// decides exactly as this quantity does (see the tests).
pub fn hard_limit(i: u64, small_every: u64) -> u64 {
    if i.is_multiple_of(small_every) {
        200
    } else {
        1_000_000
    }
}

/// Every subscription's hard limit as a quantity, by id, for the checks
/// of the outcomes.
pub fn hard_limits(count: u64, small_every: u64) -> std::collections::HashMap<String, Decimal> {
    (0..count)
        .map(|i| (format!("sub_{i}"), Decimal::from(hard_limit(i, small_every))))
        .collect()
}

/// Active subscriptions `sub_0`.., as (key, snapshot): one in
/// `small_every` has a hard limit of 200, small enough to be reached; the
/// others 1,000,000. Each has a soft limit at three quarters of its hard
/// limit. With [`LimitMode::Amount`], the subscriptions in every other block
/// of `small_every` (so half the small ones and half the large ones) are
/// priced and have those limits as amounts: the amount of 200 (90 USD) or of
/// 1,000,000, and of three quarters of it. The decisions are the same as
/// with quantity limits; only how they are computed differs. Their period
/// started 10 days ago and ends in 20 days.
pub fn subscription_snapshots(count: u64, small_every: u64, mode: LimitMode) -> Vec<(String, String)> {
    let now = Utc::now();
    let (start, end) = (now - chrono::Duration::days(10), now + chrono::Duration::days(20));
    (0..count)
        .map(|i| subscription_snapshot(i, small_every, mode, 1, start, end))
        .collect()
}

/// Subscription `i`'s snapshot (see [`subscription_snapshots`]), of this
/// version, naming the period [start, end): a later version that names a
/// later period cuts the earlier one short at its start.
pub fn subscription_snapshot(
    i: u64,
    small_every: u64,
    mode: LimitMode,
    version: u64,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> (String, String) {
    let hard = hard_limit(i, small_every);
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
        (
            format!(r#"{{"hardLimit": {hard}, "softLimit": {soft}}}"#),
            String::new(),
        )
    };
    let (start, end) = (start.to_rfc3339(), end.to_rfc3339());
    let snapshot = format!(
        r#"{{"id": "sub_{i}", "status": "active", "version": {version}, "currentPeriodStartTime": "{start}", "currentPeriodEndTime": "{end}", "usageLimits": {limits}{pricing}}}"#
    );
    (format!("sub_{i}"), snapshot)
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
/// invalid, keyed by subscription. With corrections (see
/// [`Generator::with_corrections`]) a share of the messages are voids and
/// amendments instead.
pub struct Generator {
    state: u64,
    subscriptions: u64,
    sequence: u64,
    recent: Vec<(String, String)>,
    /// Corrections per 1,000 messages; 0 leaves the stream as it always was.
    corrections_per_mille: u64,
    /// Per subscription (by index), reports sent (up to [`IDS_KEPT`] each),
    /// as the sequence number and the draw that made them: what corrections
    /// name. Their id and quantity are written out only for a correction,
    /// so that remembering costs a report no allocation.
    sent: Vec<Vec<(u64, u64)>>,
    /// Corrections sent, to be sent again.
    recent_corrections: Vec<(String, String)>,
    /// A correction to send right after the report it corrects.
    follow_up: Option<(String, String)>,
}

/// Report ids kept per subscription for corrections to name.
const IDS_KEPT: usize = 8;

impl Generator {
    pub fn new(subscriptions: u64, seed: u64) -> Self {
        Self {
            // xorshift must not start at zero.
            state: seed.max(1),
            subscriptions,
            sequence: 0,
            recent: Vec::new(),
            corrections_per_mille: 0,
            sent: Vec::new(),
            recent_corrections: Vec::new(),
            follow_up: None,
        }
    }

    /// About `per_mille` of every 1,000 messages become corrections, keyed
    /// by the subscription like its reports (so each is ordered after the
    /// report it names): of them about 30 % voids and 30 % amendments of
    /// reports sent earlier for that subscription (half the amendments
    /// with `previousQuantity`, mostly the quantity that report asked for,
    /// some stale, a third with `acceptPartialQuantity`, some large enough to meet a small
    /// limit), 10 % naming an id never sent (`usage_not_found`), 5 %
    /// naming another subscription's usage while keyed by that usage's
    /// own subscription (`subscription_mismatch`, after the usage on its
    /// partition), 10 % corrections sent again, and 15 % a new report
    /// followed at once by a correction of it (the two race across a
    /// crash). Where a subscription has no report yet, a report is sent
    /// instead.
    pub fn with_corrections(mut self, per_mille: u64) -> Self {
        self.corrections_per_mille = per_mille.min(1000);
        self
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
        if let Some(correction) = self.follow_up.take() {
            return correction;
        }
        if self.corrections_per_mille > 0 {
            let c = self.random();
            if c % 1000 < self.corrections_per_mille {
                if let Some(correction) = self.correction(c) {
                    return correction;
                }
            }
        }
        self.report()
    }

    /// A usage report (or an exact re-send of a recent message).
    fn report(&mut self) -> (String, String) {
        let r = self.random();
        self.sequence += 1;
        let i = self.sequence;
        let n = r % self.subscriptions;
        let sub = format!("sub_{n}");
        let quantity = quantity_of(r);
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
        if self.corrections_per_mille > 0 && (r >> 40) % 100 != 2 {
            if self.sent.is_empty() {
                self.sent = vec![Vec::new(); self.subscriptions as usize];
            }
            let ids = &mut self.sent[n as usize];
            let sent = (i, r);
            if ids.len() < IDS_KEPT {
                ids.push(sent);
            } else {
                ids[(r >> 8) as usize % IDS_KEPT] = sent;
            }
        }
        event
    }

    /// A correction drawn from `c`; None where it needs a report that the
    /// subscription drawn has not had yet.
    fn correction(&mut self, c: u64) -> Option<(String, String)> {
        let kind = (c >> 10) % 100;
        if (85..100).contains(&kind) {
            // A report, and a correction of it right after.
            let report = self.report();
            let (key, payload) = &report;
            let n: u64 = key.trim_start_matches("sub_").parse().ok()?;
            let id = self.sent.get(n as usize).and_then(|ids| {
                ids.iter()
                    .find(|(i, _)| payload.contains(&format!(r#""id": "b{i}""#)))
                    .map(|&(i, r)| (format!("b{i}"), quantity_of(r)))
            });
            if let Some((id, quantity)) = id {
                let correction = if c & (1 << 40) == 0 {
                    void(&id, key, key, c)
                } else {
                    amend(&id, key, &quantity, c)
                };
                self.remember(correction.clone(), c);
                self.follow_up = Some(correction);
            }
            return Some(report);
        }
        if (75..85).contains(&kind) {
            if self.recent_corrections.is_empty() {
                return None;
            }
            let n = self.recent_corrections.len();
            return Some(self.recent_corrections[(c >> 20) as usize % n].clone());
        }
        self.sequence += 1;
        let n = (c >> 20) % self.subscriptions;
        let sub = format!("sub_{n}");
        let correction = if (60..70).contains(&kind) {
            let id = format!("nx{}", self.sequence);
            if kind < 65 {
                void(&id, &sub, &sub, c)
            } else {
                amend(&id, &sub, "1", c)
            }
        } else {
            let ids = self.sent.get(n as usize).filter(|ids| !ids.is_empty())?;
            let (i, r) = ids[(c >> 32) as usize % ids.len()];
            let (id, quantity) = (format!("b{i}"), quantity_of(r));
            match kind {
                0..=29 => void(&id, &sub, &sub, c),
                30..=59 => amend(&id, &sub, &quantity, c),
                _ => {
                    // Named under another subscription, keyed by the
                    // usage's own: decided after the usage.
                    let other = format!("sub_{}", (n + 1) % self.subscriptions);
                    void(&id, &sub, &other, c)
                }
            }
        };
        self.remember(correction.clone(), c);
        Some(correction)
    }

    fn remember(&mut self, correction: (String, String), c: u64) {
        if self.recent_corrections.len() < 200 {
            self.recent_corrections.push(correction);
        } else {
            self.recent_corrections[(c >> 44) as usize % 200] = correction;
        }
    }
}

/// The quantity a report drawn from `r` asks for.
fn quantity_of(r: u64) -> String {
    format!("{}.{:03}", 1 + (r >> 20) % 9, (r >> 30) % 1000)
}

/// A void of `id`, keyed by `key`, naming `sub`; some with a reason.
fn void(id: &str, key: &str, sub: &str, c: u64) -> (String, String) {
    let reason = if c & (1 << 50) == 0 {
        r#", "reason": "meter reset""#
    } else {
        ""
    };
    (
        key.to_owned(),
        format!(r#"{{"action": "void", "id": "{id}", "subscriptionId": "{sub}"{reason}}}"#),
    )
}

/// An amendment of `id` (reported with `asked`) to a new quantity: mostly
/// a few units, one in eight large enough (50 to 150) to meet a small hard
/// limit; half with `previousQuantity` (`asked`, or for a quarter of them
/// `asked` + 1, which is stale), a third with `acceptPartialQuantity`.
fn amend(id: &str, sub: &str, asked: &str, c: u64) -> (String, String) {
    let quantity = if (c >> 52).is_multiple_of(8) {
        format!("{}.{:03}", 50 + (c >> 24) % 101, (c >> 34) % 1000)
    } else {
        format!("{}.{:03}", 1 + (c >> 24) % 9, (c >> 34) % 1000)
    };
    let previous = if !(c >> 56).is_multiple_of(2) {
        String::new()
    } else if (c >> 60).is_multiple_of(4) {
        // A stale previousQuantity: amend_conflict, unless the usage got
        // there by an earlier amendment.
        let stale = asked.parse::<Decimal>().unwrap_or_default() + Decimal::ONE;
        format!(r#", "previousQuantity": {stale}"#)
    } else {
        format!(r#", "previousQuantity": {asked}"#)
    };
    let partial = if (c >> 58).is_multiple_of(3) {
        r#", "acceptPartialQuantity": true"#
    } else {
        ""
    };
    (
        sub.to_owned(),
        format!(
            r#"{{"action": "amend", "id": "{id}", "subscriptionId": "{sub}", "quantity": {quantity}{previous}{partial}}}"#
        ),
    )
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
    use std::collections::{HashMap, HashSet};

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

    /// Without corrections the stream is the one the bench's earlier
    /// figures were measured on (its first messages for seed 7, computed
    /// apart from this code).
    #[test]
    fn without_corrections_the_stream_is_what_it_was() {
        let mut g = Generator::new(100, 7).with_corrections(0);
        let first: Vec<_> = (0..5).map(|_| g.next()).collect();
        let expected = [
            (
                "sub_27",
                r#"{"id": "b1", "subscriptionId": "sub_27", "quantity": 7.007}"#,
            ),
            (
                "sub_52",
                r#"{"id": "b2", "subscriptionId": "sub_52", "quantity": 7.760}"#,
            ),
            (
                "sub_43",
                r#"{"id": "b3", "subscriptionId": "sub_43", "quantity": 3.936, "acceptPartialQuantity": true}"#,
            ),
            (
                "sub_7",
                r#"{"id": "b4", "subscriptionId": "sub_7", "quantity": 3.003, "acceptPartialQuantity": true}"#,
            ),
            (
                "sub_50",
                r#"{"id": "b5", "subscriptionId": "sub_50", "quantity": 2.857, "acceptPartialQuantity": true}"#,
            ),
        ];
        let expected: Vec<(String, String)> = expected.iter().map(|(k, p)| (k.to_string(), p.to_string())).collect();
        assert_eq!(first, expected);
        let mut plain = Generator::new(100, 7);
        let mut zero = Generator::new(100, 7).with_corrections(0);
        assert!((0..5000).all(|_| plain.next() == zero.next()));
    }

    fn field<'a>(payload: &'a str, name: &str) -> Option<&'a str> {
        let at = payload.find(&format!(r#""{name}": "#))? + name.len() + 4;
        let rest = &payload[at..];
        let rest = rest.strip_prefix('"').unwrap_or(rest);
        let end = rest.find(['"', ',', '}']).unwrap_or(rest.len());
        Some(&rest[..end])
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum MessageKind {
        Report,
        Void,
        Amend,
    }

    fn kind_of(payload: &str) -> MessageKind {
        if payload.contains(r#""action": "void""#) {
            MessageKind::Void
        } else if payload.contains(r#""action": "amend""#) {
            MessageKind::Amend
        } else {
            MessageKind::Report
        }
    }

    #[test]
    fn corrections_are_about_two_percent_and_name_earlier_reports_of_their_key() {
        let take = |seed| {
            let mut g = Generator::new(200, seed).with_corrections(20);
            (0..50_000).map(|_| g.next()).collect::<Vec<_>>()
        };
        let events = take(11);
        assert_eq!(events, take(11), "deterministic from the seed");
        assert_ne!(events, take(12));
        // Reports sent so far: id -> (key, quantity asked).
        let mut reported: HashMap<String, (String, String)> = HashMap::new();
        let mut seen_corrections: HashSet<&(String, String)> = HashSet::new();
        let (mut voids, mut amends, mut unknown, mut mismatched, mut resent, mut right_after) = (0, 0, 0, 0, 0, 0);
        let (mut with_previous, mut stale, mut with_partial, mut large) = (0, 0, 0, 0);
        for (n, event) in events.iter().enumerate() {
            let (key, payload) = event;
            let id = field(payload, "id").unwrap().to_owned();
            let sub = field(payload, "subscriptionId").unwrap();
            let kind = kind_of(payload);
            if kind == MessageKind::Report {
                assert_eq!(key, sub);
                if !payload.contains("-1}") {
                    reported
                        .entry(id)
                        .or_insert((key.clone(), field(payload, "quantity").unwrap().to_owned()));
                }
                continue;
            }
            match kind {
                MessageKind::Void => voids += 1,
                _ => amends += 1,
            }
            if !seen_corrections.insert(event) {
                resent += 1;
                continue;
            }
            match reported.get(&id) {
                None => {
                    assert!(id.starts_with("nx"), "{payload} names a report never sent");
                    unknown += 1;
                }
                Some((report_key, asked)) => {
                    // Keyed as the report was: on its partition, after it.
                    assert_eq!(key, report_key, "{payload}");
                    if sub != key {
                        mismatched += 1;
                    }
                    if let Some(previous) = field(payload, "previousQuantity") {
                        let asked: Decimal = asked.parse().unwrap();
                        let previous: Decimal = previous.parse().unwrap();
                        if previous == asked {
                            with_previous += 1;
                        } else {
                            assert_eq!(previous, asked + Decimal::ONE);
                            stale += 1;
                        }
                    }
                    if n > 0 && field(&events[n - 1].1, "id") == Some(id.as_str()) {
                        right_after += 1;
                    }
                }
            }
            if payload.contains("acceptPartialQuantity") {
                with_partial += 1;
            }
            if kind == MessageKind::Amend {
                let quantity: Decimal = field(payload, "quantity").unwrap().parse().unwrap();
                if quantity >= Decimal::from(50) {
                    large += 1;
                }
            }
        }
        let corrections = voids + amends;
        assert!(
            (800..1300).contains(&corrections),
            "{corrections} corrections in 50,000"
        );
        for (what, n, range) in [
            ("voids", voids, 400..700),
            ("amendments", amends, 400..700),
            ("of unknown ids", unknown, 50..160),
            ("of another subscription", mismatched, 20..90),
            ("sent again", resent, 50..170),
            ("right after their report", right_after, 100..250),
            ("with previousQuantity", with_previous, 80..250),
            ("with a stale previousQuantity", stale, 15..90),
            ("accepting partial", with_partial, 80..300),
            ("large amendments", large, 20..120),
        ] {
            assert!(range.contains(&n), "{n} corrections {what}");
        }
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
