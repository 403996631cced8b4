//! What a stream of outcomes says became of each usage, read in the order
//! its partition holds them (a subscription's messages share a partition,
//! and each output partition holds its input partition's outcomes in input
//! order): the usages created, their latest quantity (as created, then as
//! amended), whether voided. From it, two checks that need no database:
//! - the running total of each (subscription, period) never goes over the
//!   subscription's hard limit where an outcome raised it (a void or a
//!   lowering amendment only ever lowers it, so an outcome that lowers a
//!   total is not held to the limit);
//! - a closed period's totals and digest, recomputed from the usages whose
//!   `usageTime` falls in it, to hold `usage-periods` records against.
//!
//! Each outcome is also held against what the ledger knows: an amendment's
//! `previousQuantity`, a void's and a duplicate's usage quantity must be
//! the usage's latest quantity; nothing is created twice, nothing unknown
//! is corrected. A break of these is counted as `inconsistent`.
//!
//! Pure: no Kafka, no database. The digest is computed here apart from the
//! worker's own code (SPEC "Closed periods, for invoicing").

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

/// An outcome's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Created,
    Duplicate,
    Rejected,
    Voided,
    Amended,
}

impl Status {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "created" => Self::Created,
            "duplicate" => Self::Duplicate,
            "rejected" => Self::Rejected,
            "voided" => Self::Voided,
            "amended" => Self::Amended,
            _ => return None,
        })
    }
}

/// One outcome, as the ledger reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub status: Status,
    /// The rejection's code.
    pub code: Option<String>,
    pub usage: Option<SeenUsage>,
    /// An amendment's quantity before it.
    pub previous_quantity: Option<Decimal>,
    /// The period the worker counted the usage in (`limit.periodStartTime`),
    /// where the outcome says.
    pub period_start: Option<DateTime<Utc>>,
}

/// The usage an outcome carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenUsage {
    pub id: String,
    pub subscription_id: String,
    pub quantity: Decimal,
    pub usage_time: DateTime<Utc>,
}

/// A usage as the outcomes so far leave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerUsage {
    pub subscription_id: String,
    pub usage_time: DateTime<Utc>,
    pub period_start: Option<DateTime<Utc>>,
    /// The latest quantity: as created, or as last amended.
    pub quantity: Decimal,
    pub voided: bool,
}

/// A period's totals as its `usage-periods` record states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    pub usage_count: u64,
    pub quantity: Decimal,
    pub voided_count: u64,
    pub digest: String,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Hard limits as quantities, by subscription id.
    hard_limits: Arc<HashMap<String, Decimal>>,
    usages: HashMap<String, LedgerUsage>,
    by_subscription: HashMap<String, Vec<String>>,
    /// Running totals by (subscription, period start).
    totals: HashMap<(String, Option<DateTime<Utc>>), Decimal>,
    /// Outcomes that raised a total over its hard limit.
    pub over_limit: u64,
    /// Outcomes at odds with what came before them (see the module doc).
    pub inconsistent: u64,
    /// Outcomes by status, rejections by `rejected <code>`.
    pub counts: BTreeMap<String, u64>,
    pub examples: Vec<String>,
}

impl Ledger {
    pub fn new(hard_limits: Arc<HashMap<String, Decimal>>) -> Self {
        Self {
            hard_limits,
            ..Self::default()
        }
    }

    /// The next outcome of its partition.
    pub fn apply(&mut self, seen: &Seen) {
        let counted = match (&seen.status, &seen.code) {
            (Status::Rejected, Some(code)) => format!("rejected {code}"),
            (status, _) => format!("{status:?}").to_lowercase(),
        };
        *self.counts.entry(counted).or_default() += 1;
        let Some(usage) = &seen.usage else {
            if seen.status != Status::Rejected {
                self.odd(format!("{:?} outcome without a usage", seen.status));
            }
            return;
        };
        match seen.status {
            Status::Created => {
                if self.usages.contains_key(&usage.id) {
                    return self.odd(format!("usage {} created twice", usage.id));
                }
                self.usages.insert(
                    usage.id.clone(),
                    LedgerUsage {
                        subscription_id: usage.subscription_id.clone(),
                        usage_time: usage.usage_time,
                        period_start: seen.period_start,
                        quantity: usage.quantity,
                        voided: false,
                    },
                );
                self.by_subscription
                    .entry(usage.subscription_id.clone())
                    .or_default()
                    .push(usage.id.clone());
                let key = (usage.subscription_id.clone(), seen.period_start);
                self.add(key, usage.quantity, &usage.id);
            }
            Status::Amended => {
                let Some(known) = self.usages.get_mut(&usage.id) else {
                    return self.odd(format!("usage {} amended, never created", usage.id));
                };
                if known.voided {
                    return self.odd(format!("usage {} amended after its void", usage.id));
                }
                let before = known.quantity;
                known.quantity = usage.quantity;
                let key = (known.subscription_id.clone(), known.period_start);
                if seen.previous_quantity != Some(before) {
                    self.odd(format!(
                        "usage {} amended from {:?}, its quantity was {before}",
                        usage.id, seen.previous_quantity
                    ));
                }
                self.add(key, usage.quantity - before, &usage.id);
            }
            Status::Voided => {
                let Some(known) = self.usages.get_mut(&usage.id) else {
                    return self.odd(format!("usage {} voided, never created", usage.id));
                };
                if known.voided {
                    return self.odd(format!("usage {} voided twice", usage.id));
                }
                known.voided = true;
                let (before, key) = (known.quantity, (known.subscription_id.clone(), known.period_start));
                if usage.quantity != before {
                    self.odd(format!(
                        "usage {} voided with quantity {}, its quantity was {before}",
                        usage.id, usage.quantity
                    ));
                }
                self.add(key, -before, &usage.id);
            }
            Status::Duplicate => match self.usages.get(&usage.id) {
                None => self.odd(format!("duplicate of usage {}, never created", usage.id)),
                Some(known) if known.quantity != usage.quantity => {
                    let what = format!(
                        "duplicate of usage {} with quantity {}, its quantity is {}",
                        usage.id, usage.quantity, known.quantity
                    );
                    self.odd(what);
                }
                Some(_) => {}
            },
            Status::Rejected => {}
        }
    }

    /// Moves a period's total by `delta`; a raise is held to the hard limit.
    fn add(&mut self, key: (String, Option<DateTime<Utc>>), delta: Decimal, id: &str) {
        let limit = self.hard_limits.get(&key.0).copied();
        let total = self.totals.entry(key.clone()).or_default();
        *total += delta;
        let total = *total;
        if delta > Decimal::ZERO && limit.is_some_and(|limit| total > limit) {
            self.over_limit += 1;
            let what = format!(
                "{} period {:?}: {total} over the hard limit {limit:?} after usage {id}",
                key.0, key.1
            );
            self.example(what);
        }
    }

    fn odd(&mut self, what: String) {
        self.inconsistent += 1;
        self.example(what);
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }

    pub fn usage(&self, id: &str) -> Option<&LedgerUsage> {
        self.usages.get(id)
    }

    pub fn usage_ids(&self) -> impl Iterator<Item = &String> {
        self.usages.keys()
    }

    /// The totals of the subscription's usages whose `usageTime` is in
    /// [start, end) (no start: from the beginning), and how many of them
    /// the worker counted in a period that starts elsewhere.
    pub fn period_totals(
        &self,
        subscription_id: &str,
        start: Option<DateTime<Utc>>,
        end: DateTime<Utc>,
    ) -> (Totals, u64) {
        let mut counting = Vec::new();
        let (mut voided_count, mut elsewhere) = (0, 0);
        let ids = self
            .by_subscription
            .get(subscription_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for id in ids {
            let usage = &self.usages[id];
            if start.is_some_and(|s| usage.usage_time < s) || usage.usage_time >= end {
                continue;
            }
            if usage.period_start.is_some() && usage.period_start != start {
                elsewhere += 1;
            }
            if usage.voided {
                voided_count += 1;
            } else {
                counting.push((id.as_str(), usage.quantity));
            }
        }
        let totals = Totals {
            usage_count: counting.len() as u64,
            quantity: counting.iter().map(|(_, q)| *q).sum(),
            voided_count,
            digest: digest(counting),
        };
        (totals, elsewhere)
    }
}

/// `sha256:` + hex SHA-256 over the lines `<id>:<quantity>\n`, sorted by id
/// in byte order, quantities in plain decimal without trailing zeros.
pub fn digest<'a>(usages: impl IntoIterator<Item = (&'a str, Decimal)>) -> String {
    let mut lines: Vec<(&str, Decimal)> = usages.into_iter().collect();
    lines.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut hash = Sha256::new();
    for (id, quantity) in lines {
        hash.update(format!("{id}:{}\n", quantity.normalize()).as_bytes());
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn start() -> DateTime<Utc> {
        t("2026-12-01T00:00:00Z")
    }

    fn seen(status: Status, id: &str, quantity: &str) -> Seen {
        Seen {
            status,
            code: None,
            usage: Some(SeenUsage {
                id: id.into(),
                subscription_id: "sub_1".into(),
                quantity: d(quantity),
                usage_time: t("2026-12-02T00:00:00Z"),
            }),
            previous_quantity: None,
            period_start: (status == Status::Created).then(start),
        }
    }

    fn amended(id: &str, from: &str, to: &str) -> Seen {
        Seen {
            previous_quantity: Some(d(from)),
            ..seen(Status::Amended, id, to)
        }
    }

    fn ledger(limit: &str) -> Ledger {
        Ledger::new(Arc::new([("sub_1".to_owned(), d(limit))].into_iter().collect()))
    }

    #[test]
    fn a_period_counts_the_latest_quantity_of_each_usage_and_not_the_voided() {
        let mut l = ledger("100");
        for s in [
            seen(Status::Created, "a", "10"),
            seen(Status::Created, "b", "20"),
            seen(Status::Created, "c", "30"),
            amended("a", "10", "15.500"),
            seen(Status::Voided, "b", "20"),
            seen(Status::Duplicate, "a", "15.5"),
            seen(Status::Duplicate, "b", "20"),
        ] {
            l.apply(&s);
        }
        assert_eq!((l.over_limit, l.inconsistent), (0, 0), "{:?}", l.examples);
        let (totals, elsewhere) = l.period_totals("sub_1", Some(start()), t("2027-01-01T00:00:00Z"));
        assert_eq!(elsewhere, 0);
        assert_eq!(
            totals,
            Totals {
                usage_count: 2,
                quantity: d("45.5"),
                voided_count: 1,
                digest: digest([("a", d("15.5")), ("c", d("30"))]),
            }
        );
        assert_eq!(l.counts["amended"], 1);
        assert_eq!(l.counts["voided"], 1);
        assert_eq!(l.counts["duplicate"], 2);
    }

    #[test]
    fn a_raise_over_the_hard_limit_is_caught_whenever_it_happens() {
        let mut l = ledger("100");
        l.apply(&seen(Status::Created, "a", "60"));
        l.apply(&seen(Status::Created, "b", "30"));
        // 60 + 30 + 20 = 110: over, even though a void brings it back.
        l.apply(&amended("b", "30", "50"));
        l.apply(&seen(Status::Voided, "a", "60"));
        assert_eq!(l.over_limit, 1, "{:?}", l.examples);
        let (totals, _) = l.period_totals("sub_1", Some(start()), t("2027-01-01T00:00:00Z"));
        assert_eq!(totals.quantity, d("50"));
    }

    #[test]
    fn a_lowering_is_not_held_to_the_limit_of_an_already_full_period() {
        // A period over its limit (say the limit was lowered): a lowering
        // amendment and a void are fine, a raise is not.
        let mut l = ledger("50");
        l.apply(&seen(Status::Created, "a", "40"));
        l.apply(&seen(Status::Created, "b", "10"));
        l.hard_limits = Arc::new([("sub_1".to_owned(), d("30"))].into_iter().collect());
        l.apply(&amended("a", "40", "35"));
        l.apply(&seen(Status::Voided, "b", "10"));
        assert_eq!(l.over_limit, 0);
        l.apply(&amended("a", "35", "36"));
        assert_eq!(l.over_limit, 1);
    }

    #[test]
    fn outcomes_at_odds_with_the_usage_are_counted() {
        let mut l = ledger("1000");
        l.apply(&seen(Status::Created, "a", "10"));
        l.apply(&seen(Status::Created, "a", "10"));
        l.apply(&amended("a", "9", "12"));
        l.apply(&seen(Status::Voided, "a", "11"));
        l.apply(&seen(Status::Voided, "a", "12"));
        l.apply(&seen(Status::Voided, "zz", "1"));
        l.apply(&amended("zz", "1", "2"));
        l.apply(&seen(Status::Duplicate, "a", "10"));
        assert_eq!(l.inconsistent, 7, "{:?}", l.examples);
    }

    #[test]
    fn a_period_takes_the_usages_of_its_time_span_and_says_which_the_worker_put_elsewhere() {
        let mut l = ledger("1000");
        let at = |id: &str, time: &str, period: DateTime<Utc>| Seen {
            usage: Some(SeenUsage {
                id: id.into(),
                subscription_id: "sub_1".into(),
                quantity: d("1"),
                usage_time: t(time),
            }),
            period_start: Some(period),
            ..seen(Status::Created, id, "1")
        };
        let next = t("2026-12-10T00:00:00Z");
        l.apply(&at("a", "2026-12-09T23:59:59.999Z", start()));
        l.apply(&at("b", "2026-12-10T00:00:00Z", next));
        l.apply(&at("c", "2026-12-10T00:00:01Z", start()));
        let (first, elsewhere) = l.period_totals("sub_1", Some(start()), next);
        assert_eq!((first.usage_count, elsewhere), (1, 0));
        let (second, elsewhere) = l.period_totals("sub_1", Some(next), t("2027-01-01T00:00:00Z"));
        assert_eq!((second.usage_count, elsewhere), (2, 1));
        assert_eq!(l.period_totals("sub_2", None, next).0.usage_count, 0);
    }

    /// The worker's digest test's example, computed apart with Python's
    /// hashlib over "usg_B:10\nusg_a:0.001\nusg_b:2.5\nusg_é:1000\n".
    #[test]
    fn the_digest_is_the_contracts() {
        let usages = [
            ("usg_b", d("2.500")),
            ("usg_é", d("1E+3")),
            ("usg_a", d("0.001")),
            ("usg_B", d("10.0")),
        ];
        assert_eq!(
            digest(usages),
            "sha256:417c8a99c52523887064c6144ff39ab6bbc9e395dc2ed0e4d3ca508df8377fd4"
        );
        assert_eq!(
            digest([]),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Sorted by the id, not by the line ("a!:1" sorts before "a:2").
        let by_id = Sha256::digest(b"a:2\na!:1\n");
        let hex: String = by_id.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest([("a!", d("1")), ("a", d("2"))]), format!("sha256:{hex}"));
    }
}
