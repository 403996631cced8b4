//! Fuzzes the limit decision: a subscription (status, periods with hard and
//! soft limits, each a quantity or an amount under the period's pricing, a
//! trial with its cap, what is already used and alerted) and a sequence of
//! requests (with or without acceptPartialQuantity, repeats and altered
//! repeats of earlier ids) decided in order, each created usage stored as
//! the pipeline stores it.
//!
//! Every step is checked against SPEC's "Decision" section and version 2's
//! "Limits and amounts", computed here from the state before the step: the
//! reason of a rejection, the quantity of a creation (a clamp only with
//! acceptPartialQuantity, and exactly to the largest multiple of 0.001 that
//! every limit lets through), the limit the outcome reports, the alerts
//! (the soft limit at 75, 90 and 100 %, each step once per period, lowest
//! first), and the state after it (only the chosen period and the trial
//! count grow, by what was accepted; a duplicate or a rejection changes
//! nothing). Amounts are computed here exactly, in integers, from the words
//! of SPEC, not with the code's arithmetic. Over the run: no quantity hard
//! limit or trial cap is exceeded that was not exceeded before, no created
//! usage leaves a period's amount over an amount hard limit, and no alert
//! step is raised twice in a period. And `decide` is deterministic: the
//! same step on a copy of the state gives the same decision and state.

#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use arbitrary::Arbitrary;
use chrono::{DateTime, Duration, Utc};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use usage_worker::domain::decision::{
    decide, max_quantity, open_period_start, AlertStep, Decision, LimitKind, LimitReached, LimitReport, PeriodState,
    StoredUsage, SubscriptionState,
};
use usage_worker::domain::event::UsageRequest;
use usage_worker::domain::pricing::{Bracket, Formula, Pricing};
use usage_worker::domain::subscription::Limit;
use usage_worker::domain::ReasonCode;

const SUBSCRIPTION: &str = "sub_fuzz";
const MAX_PERIODS: usize = 4;
const MAX_REQUESTS: usize = 64;
/// Brackets with an end; the last, open-ended one comes on top.
const MAX_ENDED_BRACKETS: usize = 4;

/// A quantity in thousandths: mostly small, so limits are reached often,
/// sometimes anywhere below 10^12.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Milli {
    Small(u16),
    Any(u64),
}

impl Milli {
    fn decimal(self) -> Decimal {
        let n = match self {
            Self::Small(n) => u64::from(n),
            Self::Any(n) => n % 1_000_000_000_000_000,
        };
        Decimal::new(n as i64, 3)
    }

    /// A valid request quantity: at least 0.001.
    fn quantity(self) -> Decimal {
        self.decimal().max(Decimal::new(1, 3))
    }
}

/// A price: at least 0, below 10^9, at most 6 decimal places.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum PriceSpec {
    /// Whole cents, up to 655.35: the usual plan.
    Cents(u16),
    /// Millionths, below 4295.
    Micro(u32),
    /// Anywhere below 10^9.
    Any(u64),
}

impl PriceSpec {
    fn decimal(self) -> Decimal {
        match self {
            Self::Cents(n) => Decimal::new(i64::from(n), 2),
            Self::Micro(n) => Decimal::new(i64::from(n), 6),
            Self::Any(n) => Decimal::new((n % 1_000_000_000_000_000) as i64, 6),
        }
    }
}

/// How far a bracket's end is above the previous end: more than 0, at most
/// 6 decimal places; often off the 0.001 grid of quantities.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum WidthSpec {
    /// Whole thousandths: on the grid.
    Milli(u16),
    /// Thousandths and a half: half-way between two billable steps.
    Half(u16),
    /// Millionths.
    Micro(u32),
    /// Anywhere (ends stop below 10^12).
    Any(u64),
}

impl WidthSpec {
    fn decimal(self) -> Decimal {
        match self {
            Self::Milli(n) => Decimal::new(i64::from(n.max(1)), 3),
            Self::Half(n) => Decimal::new(i64::from(n) * 10 + 5, 4),
            Self::Micro(n) => Decimal::new(i64::from(n.max(1)), 6),
            Self::Any(n) => Decimal::new((n % 1_000_000_000_000_000_000).max(1) as i64, 6),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FormulaKind {
    FlatRate,
    Tiered,
    Volume,
    Stairstep,
}

#[derive(Arbitrary, Debug)]
struct PricingSpec {
    kind: FormulaKind,
    currency: u8,
    /// The flat rate's price, or the open-ended last bracket's.
    price: PriceSpec,
    /// The brackets before the last: how far each ends above the one
    /// before, and its price.
    brackets: Vec<(WidthSpec, PriceSpec)>,
}

impl PricingSpec {
    fn pricing(&self) -> Pricing {
        let currency = ["USD", "EUR", "JPY"][usize::from(self.currency) % 3];
        let mut brackets = Vec::new();
        let mut end = Decimal::ZERO;
        for (width, price) in self.brackets.iter().take(MAX_ENDED_BRACKETS) {
            end += width.decimal();
            // Bracket ends are quantities: below 10^12.
            if end >= Decimal::from(1_000_000_000_000_i64) {
                break;
            }
            brackets.push(Bracket {
                max_quantity: Some(end),
                price: price.decimal(),
            });
        }
        brackets.push(Bracket {
            max_quantity: None,
            price: self.price.decimal(),
        });
        let formula = match self.kind {
            FormulaKind::FlatRate => Formula::FlatRate {
                price: self.price.decimal(),
            },
            FormulaKind::Tiered => Formula::Tiered(brackets),
            FormulaKind::Volume => Formula::Volume(brackets),
            FormulaKind::Stairstep => Formula::Stairstep(brackets),
        };
        Pricing::new(currency, formula).expect("the fuzzer builds valid pricing")
    }
}

/// An amount limit: at least 0, below 10^15, at most 6 decimal places.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum AmountSpec {
    Cents(u16),
    Micro(u32),
    Any(u64),
}

impl AmountSpec {
    fn decimal(self) -> Decimal {
        match self {
            Self::Cents(n) => Decimal::new(i64::from(n), 2),
            Self::Micro(n) => Decimal::new(i64::from(n), 6),
            // u64 millionths stay below 1.9 × 10^13.
            Self::Any(n) => Decimal::from_i128_with_scale(i128::from(n), 6),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum LimitSpec {
    Quantity(Milli),
    Amount(AmountSpec),
}

impl LimitSpec {
    /// An amount limit needs pricing (a snapshot with one and none is
    /// invalid, and never stored): without, it is no cap.
    fn limit(self, priced: bool) -> Option<Limit> {
        match self {
            Self::Quantity(q) => Some(Limit::Quantity(q.decimal())),
            Self::Amount(a) => priced.then(|| Limit::Amount(a.decimal())),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Status {
    Active,
    Trial,
    Paused,
    Cancelled,
}

#[derive(Arbitrary, Debug)]
struct PeriodSpec {
    /// Hours between the previous period's end and this one's start.
    gap_hours: u8,
    length_hours: u16,
    hard: Option<LimitSpec>,
    soft: Option<LimitSpec>,
    pricing: Option<PricingSpec>,
    used: Milli,
    /// Closed early (an invoice) this many hours after its start.
    closed_after_hours: Option<u16>,
    /// Steps already raised: soft at 75, 90 and 100 %, hard, trial. Any
    /// set: version 1 raised the soft limit at 100 % only.
    alerted: [bool; 5],
}

#[derive(Arbitrary, Debug)]
enum RequestSpec {
    New {
        id: u8,
        other_subscription: bool,
        quantity: Milli,
        partial: bool,
        /// Hours into the timeline; `None`: the time of the request.
        hour: Option<u16>,
    },
    /// An earlier request again, unchanged.
    Repeat(u8),
    /// An earlier request's id with one thing changed.
    Altered(u8, Change),
}

#[derive(Arbitrary, Debug)]
enum Change {
    Quantity,
    Partial,
    Time,
    DropTime,
    Subscription,
    QuantityTrailingZeros,
}

#[derive(Arbitrary, Debug)]
struct Input {
    status: Status,
    deleted: bool,
    /// The implicit open-ended period before the first real one.
    open_period: bool,
    periods: Vec<PeriodSpec>,
    trial_end_hour: Option<u16>,
    trial_limit: Option<Milli>,
    trial_used: Milli,
    now_hour: u16,
    grace_hours: u8,
    requests: Vec<RequestSpec>,
}

fn origin() -> DateTime<Utc> {
    DateTime::from_timestamp(1_793_491_200, 0).expect("2026-11-01T00:00:00Z")
}

fn at(hour: u16) -> DateTime<Utc> {
    origin() + Duration::hours(i64::from(hour))
}

const STEPS: [AlertStep; 5] = [
    AlertStep {
        kind: LimitKind::Soft,
        threshold: 75,
    },
    AlertStep {
        kind: LimitKind::Soft,
        threshold: 90,
    },
    AlertStep {
        kind: LimitKind::Soft,
        threshold: 100,
    },
    AlertStep {
        kind: LimitKind::Hard,
        threshold: 100,
    },
    AlertStep {
        kind: LimitKind::Trial,
        threshold: 100,
    },
];

fn subscription(input: &Input) -> SubscriptionState {
    let mut periods = Vec::new();
    // Real periods start 100 hours into the timeline, so usage can fall
    // before them (the open-ended period, or none).
    let mut start = at(100);
    for spec in input.periods.iter().take(MAX_PERIODS) {
        start += Duration::hours(i64::from(spec.gap_hours));
        let end = start + Duration::hours(i64::from(spec.length_hours.max(1)));
        let pricing = spec.pricing.as_ref().map(|p| Arc::new(p.pricing()));
        let priced = pricing.is_some();
        periods.push(PeriodState {
            start,
            end: Some(end),
            hard_limit: spec.hard.and_then(|l| l.limit(priced)),
            soft_limit: spec.soft.and_then(|l| l.limit(priced)),
            pricing,
            used: spec.used.decimal(),
            closed_time: spec.closed_after_hours.map(|h| start + Duration::hours(i64::from(h))),
            alerted: STEPS
                .into_iter()
                .zip(spec.alerted)
                .filter(|(_, a)| *a)
                .map(|(step, _)| step)
                .collect(),
        });
        start = end;
    }
    if input.open_period {
        let end = periods.first().map(|p| p.start);
        periods.insert(0, PeriodState::new(open_period_start(), end));
    }
    SubscriptionState {
        id: SUBSCRIPTION.into(),
        status: match input.status {
            Status::Active => "active",
            Status::Trial => "trial",
            Status::Paused => "paused",
            Status::Cancelled => "cancelled",
        }
        .into(),
        deleted: input.deleted,
        periods,
        trial_end_time: input.trial_end_hour.map(at),
        trial_limit: input.trial_limit.map(Milli::decimal),
        trial_used: input.trial_used.decimal(),
    }
}

fn request(spec: &RequestSpec, earlier: &[UsageRequest]) -> Option<UsageRequest> {
    let earlier_one = |i: u8| earlier.get(usize::from(i) % earlier.len().max(1)).cloned();
    match spec {
        RequestSpec::New {
            id,
            other_subscription,
            quantity,
            partial,
            hour,
        } => Some(UsageRequest {
            id: Some(format!("usg_{}", id % 16)),
            subscription_id: if *other_subscription { "sub_other" } else { SUBSCRIPTION }.into(),
            quantity: quantity.quantity(),
            usage_time: hour.map(at),
            accept_partial: *partial,
        }),
        RequestSpec::Repeat(i) => earlier_one(*i),
        RequestSpec::Altered(i, change) => {
            let mut r = earlier_one(*i)?;
            match change {
                Change::Quantity => r.quantity += Decimal::new(1, 3),
                Change::Partial => r.accept_partial = !r.accept_partial,
                Change::Time => r.usage_time = Some(r.usage_time.unwrap_or(at(0)) + Duration::microseconds(1)),
                Change::DropTime => r.usage_time = None,
                Change::Subscription => r.subscription_id.push('x'),
                // The same value written differently is the same quantity.
                Change::QuantityTrailingZeros => r.quantity *= Decimal::new(1000, 3),
            }
            Some(r)
        }
    }
}

fn milli(n: i64) -> Decimal {
    Decimal::new(n, 3)
}

// ---- Exact money, independent of the code's arithmetic --------------------

/// Quantities and prices in millionths, amounts in 10^-12, as `i128`:
/// quantities below 10^12 and prices below 10^9 keep every product below
/// 10^33, so nothing is ever rounded.
fn micros(d: Decimal) -> i128 {
    let d = d.normalize();
    assert!(d.scale() <= 6, "{d}: more places than the fuzzer makes");
    d.mantissa() * 10_i128.pow(6 - d.scale())
}

fn from_micros(m: i128) -> Decimal {
    Decimal::from_i128_with_scale(m, 6).normalize()
}

/// An amount limit in 10^-12.
fn amount_units(limit: Decimal) -> i128 {
    micros(limit) * 1_000_000
}

/// An amount as the code wrote it, in 10^-12; `None` when it is not a whole
/// number of them.
fn written_amount(d: Decimal) -> Option<i128> {
    let d = d.normalize();
    let scale = d.scale();
    (scale <= 12)
        .then(|| d.mantissa().checked_mul(10_i128.pow(12 - scale)))
        .flatten()
}

/// Whether an amount of `units` × 10^-12 is within what `pricing.rs`
/// promises to compute exactly: at most 28 significant digits. (A `Decimal`
/// can hold some 29-digit values, but its arithmetic rounds products to
/// fit, so a 29-digit amount may come out rounded in its last place.)
fn representable(units: i128) -> bool {
    let mut mantissa = units;
    let mut scale = 12;
    while scale > 0 && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    mantissa.unsigned_abs() < 10_u128.pow(28)
}

/// An amount in an outcome or alert: as the code wrote it, or as SPEC
/// computes it. They are equal when the code wrote the exact amount; where
/// the exact amount has more significant digits than a `Decimal` holds
/// (prices and quantities with many digits each, amounts far above any
/// amount limit), the code's is rounded, and equal when within 10^-26 of
/// it.
#[derive(Debug, Clone, Copy)]
enum Amount {
    Written(Decimal),
    Exact(i128),
}

impl PartialEq for Amount {
    fn eq(&self, other: &Self) -> bool {
        match (*self, *other) {
            (Self::Written(a), Self::Written(b)) => a == b,
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Written(w), Self::Exact(e)) | (Self::Exact(e), Self::Written(w)) => match written_amount(w) {
                Some(w) if w == e => true,
                _ if representable(e) => false,
                Some(w) => (w - e).abs() <= e.abs() / 10_i128.pow(26),
                None => false,
            },
        }
    }
}

impl Eq for Amount {}

/// One bracket: up to and including `end` (millionths; `None`: no end), at
/// `price` (millionths).
struct RefBracket {
    end: Option<i128>,
    price: i128,
}

enum RefFormula {
    Flat(i128),
    Tiered(Vec<RefBracket>),
    Volume(Vec<RefBracket>),
    Stairstep(Vec<RefBracket>),
}

/// SPEC's pricing, read from the words: "Bracket i covers quantities above
/// the previous bracket's maxQuantity up to and including its own."
struct RefPricing {
    formula: RefFormula,
    currency: String,
}

impl RefPricing {
    fn of(pricing: &Pricing) -> Self {
        let brackets = |b: &[Bracket]| {
            b.iter()
                .map(|b| RefBracket {
                    end: b.max_quantity.map(micros),
                    price: micros(b.price),
                })
                .collect()
        };
        let formula = match pricing.formula() {
            Formula::FlatRate { price } => RefFormula::Flat(micros(*price)),
            Formula::Tiered(b) => RefFormula::Tiered(brackets(b)),
            Formula::Volume(b) => RefFormula::Volume(brackets(b)),
            Formula::Stairstep(b) => RefFormula::Stairstep(brackets(b)),
        };
        Self {
            formula,
            currency: pricing.currency().to_owned(),
        }
    }

    fn brackets(&self) -> Option<&[RefBracket]> {
        match &self.formula {
            RefFormula::Flat(_) => None,
            RefFormula::Tiered(b) | RefFormula::Volume(b) | RefFormula::Stairstep(b) => Some(b),
        }
    }

    /// The bracket holding a total of `q` (> 0).
    fn holding(brackets: &[RefBracket], q: i128) -> &RefBracket {
        brackets
            .iter()
            .find(|b| b.end.is_none_or(|end| q <= end))
            .expect("the last bracket has no end")
    }

    /// What a total quantity `q` (millionths) costs, in 10^-12.
    fn amount(&self, q: i128) -> i128 {
        if q <= 0 {
            return 0;
        }
        match &self.formula {
            RefFormula::Flat(price) => q * price,
            RefFormula::Volume(b) => q * Self::holding(b, q).price,
            RefFormula::Stairstep(b) => Self::holding(b, q).price * 1_000_000,
            RefFormula::Tiered(b) => {
                // Each bracket's units times its price.
                let mut total = 0;
                let mut previous = 0;
                for bracket in b {
                    let top = bracket.end.map_or(q, |end| end.min(q));
                    if top > previous {
                        total += (top - previous) * bracket.price;
                    }
                    match bracket.end {
                        Some(end) if end < q => previous = end,
                        _ => break,
                    }
                }
                total
            }
        }
    }

    /// The largest multiple of 0.001 (millionths, multiple of 1000), at
    /// most `most`, whose addition to `used` costs at most `limit`; 0 when
    /// none does. Inside one bracket the amount never falls as the total
    /// grows (prices are not negative), so per bracket, from the highest,
    /// the steps that fit are the bracket's lowest ones: a bisection finds
    /// the last. No division, nothing shared with the code's solution.
    fn largest_fitting(&self, used: i128, most: i128, limit: i128) -> i128 {
        let steps = most.div_euclid(1000);
        let at = |k: i128| self.amount(used + k * 1000);
        let ranges: Vec<(i128, Option<i128>)> = match self.brackets() {
            None => vec![(0, None)],
            Some(brackets) => {
                let mut previous = 0;
                brackets
                    .iter()
                    .map(|b| {
                        let range = (previous, b.end);
                        previous = b.end.unwrap_or(previous);
                        range
                    })
                    .collect()
            }
        };
        for (above, up_to) in ranges.into_iter().rev() {
            // The steps k ≥ 1 with above < used + 1000 k ≤ up_to, k ≤ steps.
            let first = if above < used {
                1
            } else {
                (above - used).div_euclid(1000) + 1
            };
            let last = match up_to {
                None => steps,
                Some(end) if end < used => continue,
                Some(end) => ((end - used).div_euclid(1000)).min(steps),
            };
            if first > last || at(first) > limit {
                continue;
            }
            let (mut fits, mut over) = (first, last + 1);
            while over - fits > 1 {
                let mid = fits + (over - fits) / 2;
                if at(mid) <= limit {
                    fits = mid;
                } else {
                    over = mid;
                }
            }
            return fits * 1000;
        }
        0
    }

    /// The same by trying every step, to check the bisection on small
    /// ranges.
    fn largest_fitting_by_trial(&self, used: i128, most: i128, limit: i128) -> i128 {
        (1..=most.div_euclid(1000))
            .rev()
            .find(|k| self.amount(used + k * 1000) <= limit)
            .map_or(0, |k| k * 1000)
    }

    fn checked_largest_fitting(&self, used: i128, most: i128, limit: i128) -> i128 {
        let found = self.largest_fitting(used, most, limit);
        if most <= 200_000 {
            assert_eq!(
                found,
                self.largest_fitting_by_trial(used, most, limit),
                "the fuzzer's own bisection"
            );
        }
        found
    }
}

// ---- SPEC's step 5, computed from the state before the step ---------------

/// A limit that caps a usage: the hard limit of the period, or (in the
/// trial) the trial limit.
#[derive(Debug, Clone, Copy)]
struct Cap {
    kind: LimitKind,
    limit: Limit,
}

fn caps(sub: &SubscriptionState, index: usize, in_trial: bool) -> Vec<Cap> {
    let period = &sub.periods[index];
    let hard = period.hard_limit.map(|limit| Cap {
        kind: LimitKind::Hard,
        limit,
    });
    let trial = sub.trial_limit.filter(|_| in_trial).map(|limit| Cap {
        kind: LimitKind::Trial,
        limit: Limit::Quantity(limit),
    });
    hard.into_iter().chain(trial).collect()
}

fn ref_pricing(period: &PeriodState) -> RefPricing {
    RefPricing::of(period.pricing.as_deref().expect("an amount limit comes with pricing"))
}

fn cap_used(cap: &Cap, sub: &SubscriptionState, index: usize) -> Decimal {
    match cap.kind {
        LimitKind::Trial => sub.trial_used,
        _ => sub.periods[index].used,
    }
}

/// What the cap leaves available: `max(0, limit − used)` for a quantity;
/// for an amount, the largest quantity (at most the largest a usage can
/// carry) whose total still fits.
fn available(cap: &Cap, sub: &SubscriptionState, index: usize) -> Decimal {
    let used = cap_used(cap, sub, index);
    match cap.limit {
        Limit::Quantity(limit) => (limit - used).max(Decimal::ZERO),
        Limit::Amount(limit) => from_micros(ref_pricing(&sub.periods[index]).checked_largest_fitting(
            micros(used),
            micros(max_quantity()),
            amount_units(limit),
        )),
    }
}

/// Whether a usage of `quantity` fits under the cap: within what is
/// available for a quantity, `amount(used + quantity) ≤ limit` for an
/// amount.
fn fits(cap: &Cap, sub: &SubscriptionState, index: usize, quantity: Decimal) -> bool {
    match cap.limit {
        Limit::Quantity(_) => quantity <= available(cap, sub, index),
        Limit::Amount(limit) => {
            let pricing = ref_pricing(&sub.periods[index]);
            pricing.amount(micros(sub.periods[index].used + quantity)) <= amount_units(limit)
        }
    }
}

/// A limit report in comparable form: the amount written by the code is
/// read exactly (`None` where it is not a whole number of 10^-12).
#[derive(Debug, PartialEq, Eq)]
struct Figures {
    applied: LimitKind,
    limit: Option<Decimal>,
    used: Decimal,
    available: Decimal,
    /// Limit amount, used amount, currency.
    amount: Option<(Decimal, Amount, String)>,
    period: (DateTime<Utc>, Option<DateTime<Utc>>),
}

impl Figures {
    fn of(r: &LimitReport) -> Self {
        Self {
            applied: r.applied,
            limit: r.limit,
            used: r.used,
            available: r.available,
            amount: r
                .amount
                .as_ref()
                .map(|a| (a.limit_amount, Amount::Written(a.used_amount), a.currency.clone())),
            period: (r.period_start, r.period_end),
        }
    }

    /// What SPEC says the outcome reports for `cap` in state `sub`.
    fn expected(cap: &Cap, sub: &SubscriptionState, index: usize) -> Self {
        let period = &sub.periods[index];
        let amount = cap.limit.amount().map(|limit| {
            let pricing = ref_pricing(period);
            (
                limit,
                Amount::Exact(pricing.amount(micros(period.used))),
                pricing.currency,
            )
        });
        Self {
            applied: cap.kind,
            limit: cap.limit.quantity(),
            used: cap_used(cap, sub, index),
            available: available(cap, sub, index),
            amount,
            period: (period.start, period.end),
        }
    }
}

/// What step 5 decides.
#[derive(Debug)]
enum Step5 {
    /// Created with this quantity (the request's, or a clamp).
    Created(Decimal),
    Refused,
}

/// SPEC version 2, "several limits at once": a report of x fits when x is
/// within every quantity cap and amount(used + x) within every amount cap;
/// else, with acceptPartialQuantity, the largest multiple of 0.001 that
/// fits every cap, if at least 0.001. With the binding cap: of those that
/// refuse the request, the one that leaves least; when all let it through,
/// the one that leaves least (the hard limit on a tie).
fn step5(req: &UsageRequest, sub: &SubscriptionState, index: usize, in_trial: bool) -> (Step5, Option<Cap>) {
    let caps = caps(sub, index, in_trial);
    let least = |candidates: Vec<Cap>| {
        let mut best: Option<(Cap, Decimal)> = None;
        for cap in candidates {
            let a = available(&cap, sub, index);
            if best.is_none_or(|(_, b)| a < b) {
                best = Some((cap, a));
            }
        }
        best.map(|(cap, _)| cap)
    };
    let refusing: Vec<Cap> = caps
        .iter()
        .copied()
        .filter(|cap| !fits(cap, sub, index, req.quantity))
        .collect();
    if refusing.is_empty() {
        return (Step5::Created(req.quantity), least(caps));
    }
    let binding = least(refusing);
    if !req.accept_partial {
        return (Step5::Refused, binding);
    }
    let mut most = micros(req.quantity);
    for cap in &caps {
        if let Limit::Quantity(_) = cap.limit {
            most = most.min(micros(available(cap, sub, index)));
        }
    }
    let period = &sub.periods[index];
    for cap in &caps {
        if let Limit::Amount(limit) = cap.limit {
            most = ref_pricing(period).checked_largest_fitting(micros(period.used), most, amount_units(limit));
        }
    }
    // Thousandths: the quantity caps' availabilities have 3 places at most.
    let most = most - most.rem_euclid(1000);
    if most >= 1000 {
        (Step5::Created(from_micros(most)), binding)
    } else {
        (Step5::Refused, binding)
    }
}

/// Whether the period already raised the step or a higher one of its kind
/// (each step once per period, lowest first; a period whose soft limit was
/// alerted at 100 % by version 1 raises no lower step after).
fn raised(period: &PeriodState, step: AlertStep) -> bool {
    period
        .alerted
        .iter()
        .any(|a| a.kind == step.kind && a.threshold >= step.threshold)
}

/// An alert in comparable form, like [`Figures`].
#[derive(Debug, PartialEq, Eq)]
struct AlertFigures {
    kind: LimitKind,
    threshold: u8,
    limit: Option<Decimal>,
    used: Decimal,
    amount: Option<(Decimal, Amount, String)>,
}

impl AlertFigures {
    fn of(a: &LimitReached) -> Self {
        Self {
            kind: a.kind,
            threshold: a.threshold,
            limit: a.limit,
            used: a.used,
            amount: a
                .amount
                .as_ref()
                .map(|f| (f.limit_amount, Amount::Written(f.used_amount), f.currency.clone())),
        }
    }
}

/// Step 6 after a creation: the steps reached in `after` (period `index`)
/// that `before` had not raised, soft 75, 90, 100 %, hard, trial.
fn expected_alerts(
    before: &SubscriptionState,
    after: &SubscriptionState,
    index: usize,
    in_trial: bool,
) -> Vec<AlertFigures> {
    let period = &after.periods[index];
    let used = period.used;
    let used_amount = period
        .pricing
        .as_ref()
        .map(|_| ref_pricing(period).amount(micros(used)));
    let mut want = Vec::new();
    let mut raise = |kind, threshold, limit: Limit, used: Decimal| {
        let step = AlertStep { kind, threshold };
        if raised(&before.periods[index], step) {
            return;
        }
        want.push(AlertFigures {
            kind,
            threshold,
            limit: limit.quantity(),
            used,
            amount: limit.amount().map(|l| {
                (
                    l,
                    Amount::Exact(used_amount.expect("an amount limit comes with pricing")),
                    ref_pricing(period).currency,
                )
            }),
        });
    };
    if let Some(limit) = period.soft_limit {
        for threshold in AlertStep::SOFT_THRESHOLDS {
            let percent = i128::from(threshold);
            // used ≥ limit × threshold / 100, compared exactly.
            let reached = match limit {
                Limit::Quantity(l) => micros(used) * 100 >= micros(l) * percent,
                Limit::Amount(l) => used_amount.expect("priced") * 100 >= amount_units(l) * percent,
            };
            if reached {
                raise(LimitKind::Soft, threshold, limit, used);
            }
        }
    }
    if let Some(limit) = period.hard_limit {
        let reached = match limit {
            Limit::Quantity(l) => used >= l,
            // Reached when not even 0.001 more fits.
            Limit::Amount(l) => {
                ref_pricing(period).checked_largest_fitting(micros(used), micros(max_quantity()), amount_units(l)) == 0
            }
        };
        if reached {
            raise(LimitKind::Hard, 100, limit, used);
        }
    }
    if let (true, Some(limit)) = (in_trial, after.trial_limit) {
        if after.trial_used >= limit {
            raise(LimitKind::Trial, 100, Limit::Quantity(limit), after.trial_used);
        }
    }
    want
}

/// Alerted steps in one order, so states compare whatever order they were
/// raised in.
fn sorted_alerts(mut sub: SubscriptionState) -> SubscriptionState {
    for p in &mut sub.periods {
        p.alerted.sort();
    }
    sub
}

fuzz_target!(|input: Input| {
    let initial = subscription(&input);
    if std::env::var_os("FUZZ_DECIDE_PRINT").is_some() {
        // To read a failing input: the subscription it builds, then the
        // request specs.
        eprintln!("{initial:#?}\n{:#?}", input.requests);
    }
    let mut sub = initial.clone();
    let now = at(input.now_hour);
    let grace = Duration::hours(i64::from(input.grace_hours));
    let mut stored: HashMap<String, StoredUsage> = HashMap::new();
    let mut earlier: Vec<UsageRequest> = Vec::new();
    // Every alert step raised during the run, per period start.
    let mut raised_in_run: Vec<(DateTime<Utc>, AlertStep)> = Vec::new();

    for spec in input.requests.iter().take(MAX_REQUESTS) {
        let Some(req) = request(spec, &earlier) else { continue };
        earlier.push(req.clone());
        let id = req.id.clone().expect("the pipeline always has an id");
        let usage_time = req.effective_usage_time(now);
        let existing = stored.get(&id).cloned();
        let known = req.subscription_id == SUBSCRIPTION;

        let before = sub.clone();
        let decision = decide(
            &req,
            usage_time,
            existing.as_ref(),
            known.then_some(&mut sub),
            now,
            grace,
        );

        let mut copy = before.clone();
        let again = decide(
            &req,
            usage_time,
            existing.as_ref(),
            known.then_some(&mut copy),
            now,
            grace,
        );
        assert_eq!(again, decision, "deterministic decision");
        assert_eq!(copy, sub, "deterministic state");

        let expected = expected_rejection(&req, usage_time, existing.as_ref(), known, &before, now, grace);
        match (&decision, expected) {
            (Decision::Duplicate { original }, Expected::Duplicate) => {
                assert_eq!(Some(original), existing.as_ref());
                assert_eq!(sub, before, "a duplicate changes nothing");
            }
            (Decision::Rejected { rejection, limit }, Expected::Rejected(code)) => {
                assert_eq!(rejection.code, code, "{req:?} {decision:?}");
                assert_eq!(sub, before, "a rejection changes nothing");
                assert_eq!(limit.is_some(), code == ReasonCode::UsageLimitExceeded);
            }
            (_, Expected::Decide(index)) => {
                let in_trial = before.trial_end_time.is_some_and(|end| usage_time < end);
                let (step, binding) = step5(&req, &before, index, in_trial);
                match (&decision, step) {
                    (Decision::Created { quantity, alerts, .. }, Step5::Created(want)) => {
                        check_created(
                            &req, usage_time, &decision, want, binding, index, in_trial, &before, &sub,
                        );
                        let period_start = before.periods[index].start;
                        raised_in_run.extend(alerts.iter().map(|a| (period_start, a.step())));
                        stored.insert(
                            id.clone(),
                            StoredUsage {
                                id,
                                subscription_id: req.subscription_id.clone(),
                                quantity: *quantity,
                                requested_quantity: req.quantity,
                                accept_partial: req.accept_partial,
                                usage_time,
                                invoice_id: None,
                                invoice_item_id: None,
                                created_time: now,
                                updated_time: now,
                            },
                        );
                    }
                    (Decision::Rejected { rejection, limit }, Step5::Refused) => {
                        assert_eq!(rejection.code, ReasonCode::UsageLimitExceeded, "{req:?} {decision:?}");
                        assert_eq!(rejection.field, Some("quantity"));
                        assert_eq!(sub, before, "a rejection changes nothing");
                        let binding = binding.expect("a limit refused it");
                        let limit = limit.as_ref().expect("the outcome says which limit");
                        assert_eq!(
                            Figures::of(limit),
                            Figures::expected(&binding, &before, index),
                            "a refusal reports the binding limit: {req:?} in {:?}",
                            before.periods[index]
                        );
                    }
                    (decision, step) => panic!("{req:?}: decided {decision:?}, SPEC says {step:?} under {binding:?}"),
                }
            }
            (decision, expected) => panic!("{req:?}: decided {decision:?}, SPEC says {expected:?}"),
        }
    }

    // Over the whole run.
    for (first, last) in initial.periods.iter().zip(&sub.periods) {
        if let Some(Limit::Quantity(hard)) = last.hard_limit {
            if first.used <= hard {
                assert!(last.used <= hard, "a period never exceeds its hard limit: {last:?}");
            }
        }
        assert!(last.used >= first.used);
        let mut steps = last.alerted.clone();
        steps.sort();
        steps.dedup();
        assert_eq!(
            steps.len(),
            last.alerted.len(),
            "each alert step at most once per period: {last:?}"
        );
        let mut in_run: Vec<AlertStep> = raised_in_run
            .iter()
            .filter(|(start, _)| *start == first.start)
            .map(|(_, step)| *step)
            .collect();
        let count = in_run.len();
        in_run.sort();
        in_run.dedup();
        assert_eq!(in_run.len(), count, "a step raised twice in one period: {in_run:?}");
        for step in in_run {
            assert!(!raised(first, step), "{step:?} raised again in {first:?}");
        }
    }
    if let Some(limit) = sub.trial_limit {
        if initial.trial_used <= limit {
            assert!(sub.trial_used <= limit, "the trial never exceeds its cap");
        }
    }
});

#[derive(Debug)]
enum Expected {
    Duplicate,
    Rejected(ReasonCode),
    /// Steps 1–4 pass: step 5 decides, in this period.
    Decide(usize),
}

/// SPEC's steps 2–4, from the state before the request.
fn expected_rejection(
    req: &UsageRequest,
    usage_time: DateTime<Utc>,
    existing: Option<&StoredUsage>,
    known: bool,
    sub: &SubscriptionState,
    now: DateTime<Utc>,
    grace: Duration,
) -> Expected {
    if let Some(original) = existing {
        let same = original.subscription_id == req.subscription_id
            && original.requested_quantity == req.quantity
            && original.accept_partial == req.accept_partial
            && req.usage_time.is_none_or(|t| t == original.usage_time);
        return if same {
            Expected::Duplicate
        } else {
            Expected::Rejected(ReasonCode::IdempotencyConflict)
        };
    }
    if !known {
        return Expected::Rejected(ReasonCode::SubscriptionNotFound);
    }
    if sub.deleted || !matches!(sub.status.as_str(), "active" | "trial") {
        return Expected::Rejected(ReasonCode::SubscriptionNotActive);
    }
    // Half-open periods; they do not overlap here, so at most one contains it.
    let containing: Vec<usize> = (0..sub.periods.len())
        .filter(|&i| {
            let p = &sub.periods[i];
            p.start <= usage_time && p.end.is_none_or(|end| usage_time < end)
        })
        .collect();
    assert!(containing.len() <= 1, "the fuzzer builds periods that do not overlap");
    let Some(&index) = containing.first() else {
        return Expected::Rejected(ReasonCode::NoServicePeriod);
    };
    let p = &sub.periods[index];
    if p.closed_time.is_some_and(|c| c <= now) || p.end.is_some_and(|end| end + grace <= now) {
        return Expected::Rejected(ReasonCode::PeriodClosed);
    }
    Expected::Decide(index)
}

/// Step 5's creation and step 6's alerts, and the state they leave.
#[allow(clippy::too_many_arguments)]
fn check_created(
    req: &UsageRequest,
    usage_time: DateTime<Utc>,
    decision: &Decision,
    want_quantity: Decimal,
    binding: Option<Cap>,
    index: usize,
    in_trial: bool,
    before: &SubscriptionState,
    after: &SubscriptionState,
) {
    let Decision::Created {
        quantity,
        requested_quantity,
        partial,
        usage_time: decided_time,
        period_start,
        period_end,
        limit,
        alerts,
    } = decision
    else {
        unreachable!()
    };
    assert_eq!(*requested_quantity, req.quantity);
    assert_eq!(
        *quantity, want_quantity,
        "created in full when it fits, else the largest fitting multiple of 0.001: {req:?}"
    );
    assert!(*quantity <= req.quantity, "a partial never exceeds the request");
    assert_eq!(*partial, *quantity != req.quantity);
    assert!(!*partial || req.accept_partial, "clamped only when allowed");
    assert!(*quantity >= milli(1));
    assert!(quantity.normalize().scale() <= 3, "whole thousandths");
    assert_eq!(*decided_time, usage_time);
    let period = &before.periods[index];
    assert_eq!((*period_start, *period_end), (period.start, period.end));

    // The state after: the period and (in the trial) the trial count grow
    // by what was accepted, alerted steps grow by the alerts; nothing else.
    let mut expected = before.clone();
    expected.periods[index].used += *quantity;
    if in_trial {
        expected.trial_used += *quantity;
    }

    let want_alerts = expected_alerts(before, &expected, index, in_trial);
    let soft: Vec<u8> = alerts
        .iter()
        .filter(|a| a.kind == LimitKind::Soft)
        .map(|a| a.threshold)
        .collect();
    assert!(soft.is_sorted(), "soft steps lowest first: {soft:?}");
    let mut got: Vec<AlertFigures> = alerts.iter().map(AlertFigures::of).collect();
    got.sort_by_key(|a| (a.kind, a.threshold));
    let mut want = want_alerts;
    want.sort_by_key(|a| (a.kind, a.threshold));
    assert_eq!(got, want, "alerts once per period and step, when reached");
    expected.periods[index]
        .alerted
        .extend(alerts.iter().map(LimitReached::step));
    assert_eq!(
        sorted_alerts(after.clone()),
        sorted_alerts(expected.clone()),
        "only what was accepted is counted"
    );

    // No cap is passed by a creation.
    let used_after = expected.periods[index].used;
    match period.hard_limit {
        Some(Limit::Quantity(cap)) => assert!(used_after <= cap, "past the hard limit: {used_after} > {cap}"),
        Some(Limit::Amount(cap)) => {
            let spent = ref_pricing(period).amount(micros(used_after));
            assert!(
                spent <= amount_units(cap),
                "a created usage never takes the amount past the hard limit: {spent}e-12 > {cap}"
            );
        }
        None => {}
    }
    if let (true, Some(cap)) = (in_trial, before.trial_limit) {
        assert!(expected.trial_used <= cap, "past the trial limit");
    }
    assert_eq!(
        limit.as_ref().map(Figures::of),
        binding.map(|cap| Figures::expected(&cap, &expected, index)),
        "the outcome reports the cap that applied, after the usage: {req:?} in {:?}",
        after.periods[index]
    );
}
