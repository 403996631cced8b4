//! Property tests of the pure decision against a model written here: for
//! random subscriptions (quantity and amount limits under random pricing,
//! trial) and random request sequences, the accepted totals never exceed the
//! limits, a clamp takes exactly the largest quantity that fits, each alert
//! step fires once per period, lowest first, as soon as it is reached, and
//! the same sequence decided twice gives the same decisions. The pricing's
//! own arithmetic (`amount`, `largest_fitting`) is checked against a
//! brute-force walk in `domain::pricing`; here it is a trusted primitive.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::sync::Arc;

use usage_worker::domain::decision::{
    decide, max_quantity, Decision, LimitKind, PeriodState, StoredUsage, SubscriptionState,
};
use usage_worker::domain::event::UsageRequest;
use usage_worker::domain::pricing::{Bracket, Formula, Pricing};
use usage_worker::domain::subscription::Limit;
use usage_worker::domain::ReasonCode;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// Quantities in thousandths, so every value is exact.
fn milli(n: i64) -> Decimal {
    Decimal::new(n, 3)
}

#[derive(Debug, Clone)]
struct Setup {
    hard: [Option<i64>; 2],
    soft: [Option<i64>; 2],
    /// Whether each period's hard (soft) limit is an amount, in thousandths
    /// of the currency, rather than a quantity.
    hard_is_amount: [bool; 2],
    soft_is_amount: [bool; 2],
    pricing: Arc<Pricing>,
    trial_limit: Option<i64>,
    /// Trial ends this many hours into the first period (or not at all).
    trial_end_hours: Option<i64>,
}

#[derive(Debug, Clone)]
struct Request {
    id: u8,
    quantity: i64,
    partial: bool,
    /// Hours after the start of the first of two 30-day periods.
    hour: i64,
}

/// Flat, tiered, volume or stairstep pricing over small quantities.
fn pricing() -> impl Strategy<Value = Arc<Pricing>> {
    let price = (0i64..=2_000_000).prop_map(|n| Decimal::new(n, 6));
    (
        0u8..4,
        prop::collection::vec(price, 3),
        prop::collection::vec(1i64..6_000, 0..3),
    )
        .prop_map(|(kind, prices, widths)| {
            let mut end = 0;
            let mut brackets: Vec<Bracket> = widths
                .iter()
                .zip(&prices)
                .map(|(width, price)| {
                    end += width;
                    Bracket {
                        max_quantity: Some(milli(end)),
                        price: *price,
                    }
                })
                .collect();
            brackets.push(Bracket {
                max_quantity: None,
                price: prices[2],
            });
            let formula = match kind {
                0 => Formula::FlatRate { price: prices[0] },
                1 => Formula::Tiered(brackets),
                2 => Formula::Volume(brackets),
                _ => Formula::Stairstep(brackets),
            };
            Arc::new(Pricing::new("USD", formula).unwrap())
        })
}

fn setup() -> impl Strategy<Value = Setup> {
    let limit = prop::option::of(0i64..20_000);
    (
        [limit.clone(), limit.clone()],
        [limit.clone(), limit.clone()],
        [any::<bool>(), any::<bool>()],
        [any::<bool>(), any::<bool>()],
        pricing(),
        limit,
        prop::option::of(0i64..1440),
    )
        .prop_map(
            |(hard, soft, hard_is_amount, soft_is_amount, pricing, trial_limit, trial_end_hours)| Setup {
                hard,
                soft,
                hard_is_amount,
                soft_is_amount,
                pricing,
                trial_limit,
                trial_end_hours,
            },
        )
}

/// A limit of the setup as the decision takes it.
fn limit(value: Option<i64>, is_amount: bool) -> Option<Limit> {
    value.map(|v| {
        if is_amount {
            Limit::Amount(milli(v))
        } else {
            Limit::Quantity(milli(v))
        }
    })
}

fn requests() -> impl Strategy<Value = Vec<Request>> {
    prop::collection::vec(
        (0u8..40, 1i64..5_000, any::<bool>(), 0i64..1440).prop_map(|(id, quantity, partial, hour)| Request {
            id,
            quantity,
            partial,
            hour,
        }),
        1..80,
    )
}

fn state(s: &Setup) -> SubscriptionState {
    let period = |i: usize| PeriodState {
        start: t0() + Duration::days(30 * i as i64),
        end: Some(t0() + Duration::days(30 * (i as i64 + 1))),
        hard_limit: limit(s.hard[i], s.hard_is_amount[i]),
        soft_limit: limit(s.soft[i], s.soft_is_amount[i]),
        pricing: Some(s.pricing.clone()),
        used: Decimal::ZERO,
        closed_time: None,
        alerted: Vec::new(),
    };
    SubscriptionState {
        id: "sub".into(),
        status: "active".into(),
        deleted: false,
        periods: vec![period(0), period(1)],
        trial_end_time: s.trial_end_hours.map(|h| t0() + Duration::hours(h)),
        trial_limit: s.trial_limit.map(milli),
        trial_used: Decimal::ZERO,
    }
}

/// Decides the whole sequence as the pipeline does: in order, remembering
/// created ids.
fn run(s: &Setup, requests: &[Request]) -> (Vec<Decision>, SubscriptionState) {
    let mut sub = state(s);
    let mut stored: HashMap<String, StoredUsage> = HashMap::new();
    let now = t0() + Duration::days(1);
    let mut decisions = Vec::new();
    for r in requests {
        let usage_time = t0() + Duration::hours(r.hour);
        let request = UsageRequest {
            id: Some(format!("u{}", r.id)),
            subscription_id: "sub".into(),
            quantity: milli(r.quantity),
            usage_time: Some(usage_time),
            accept_partial: r.partial,
        };
        let id = request.id.clone().unwrap();
        let decision = decide(
            &request,
            usage_time,
            stored.get(&id),
            Some(&mut sub),
            now,
            Duration::hours(1),
        );
        if let Decision::Created {
            quantity,
            requested_quantity,
            ..
        } = &decision
        {
            stored.insert(
                id.clone(),
                StoredUsage {
                    id,
                    subscription_id: "sub".into(),
                    quantity: *quantity,
                    requested_quantity: *requested_quantity,
                    accept_partial: r.partial,
                    usage_time,
                    invoice_id: None,
                    invoice_item_id: None,
                    created_time: now,
                    updated_time: now,
                    period_start: now,
                    last_requested_quantity: None,
                    voided: None,
                },
            );
        }
        decisions.push(decision);
    }
    (decisions, sub)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn the_decision_agrees_with_the_model(s in setup(), requests in requests()) {
        let (decisions, final_state) = run(&s, &requests);

        // The model: what each period and the trial accepted, with every cap.
        let pricing = &s.pricing;
        let mut used = [Decimal::ZERO; 2];
        let mut trial_used = Decimal::ZERO;
        let mut alerts: HashMap<(usize, LimitKind, u8), usize> = HashMap::new();
        let mut seen_created: HashMap<u8, (i64, bool, i64)> = HashMap::new();
        for (r, decision) in requests.iter().zip(&decisions) {
            let period = if r.hour < 720 { 0 } else { 1 };
            let in_trial = s.trial_end_hours.is_some_and(|h| r.hour < h);
            let requested = milli(r.quantity);
            // What the quantity limits leave, and the amount limit.
            let mut available: Option<Decimal> = None;
            let mut cap = |left: Decimal| available = Some(available.map_or(left, |a: Decimal| a.min(left)));
            let amount_limit = s.hard[period].filter(|_| s.hard_is_amount[period]).map(milli);
            if let (Some(l), false) = (s.hard[period], s.hard_is_amount[period]) {
                cap((milli(l) - used[period]).max(Decimal::ZERO));
            }
            if in_trial {
                if let Some(l) = s.trial_limit {
                    cap((milli(l) - trial_used).max(Decimal::ZERO));
                }
            }
            let fits = available.is_none_or(|a| requested <= a)
                && amount_limit.is_none_or(|l| pricing.amount(used[period] + requested) <= l);
            let most = available.map_or(requested, |a| a.min(requested));
            let largest = amount_limit.map_or(most, |l| pricing.largest_fitting(used[period], most, l));
            match decision {
                Decision::Duplicate { original } => {
                    let first = seen_created.get(&r.id).expect("a duplicate follows a created usage");
                    prop_assert_eq!(*first, (r.quantity, r.partial, r.hour), "duplicates are the same request");
                    prop_assert_eq!(&original.id, &format!("u{}", r.id));
                }
                Decision::Rejected { rejection, .. } if rejection.code == ReasonCode::IdempotencyConflict => {
                    let first = seen_created.get(&r.id).expect("a conflict follows a created usage");
                    prop_assert_ne!(*first, (r.quantity, r.partial, r.hour));
                }
                Decision::Voided { .. } | Decision::Amended { .. } => prop_assert!(false, "a report corrects nothing"),
                _ if seen_created.contains_key(&r.id) => prop_assert!(false, "an existing id must be a duplicate or a conflict"),
                Decision::Created { quantity, partial, alerts: raised, .. } => {
                    if fits {
                        prop_assert_eq!(*quantity, requested);
                    } else {
                        prop_assert!(r.partial && largest >= milli(1), "clamped only when partial and something fits");
                        prop_assert_eq!(*quantity, largest, "a clamp takes the largest quantity that fits");
                        prop_assert!(*partial);
                    }
                    used[period] += *quantity;
                    if in_trial {
                        trial_used += *quantity;
                    }
                    let mut soft_steps = Vec::new();
                    for alert in raised {
                        *alerts.entry((period, alert.kind, alert.threshold)).or_default() += 1;
                        if alert.kind == LimitKind::Soft {
                            soft_steps.push(alert.threshold);
                        }
                    }
                    prop_assert!(soft_steps.windows(2).all(|w| w[0] < w[1]), "lowest first: {soft_steps:?}");
                    seen_created.insert(r.id, (r.quantity, r.partial, r.hour));
                }
                Decision::Rejected { rejection, .. } => {
                    prop_assert_eq!(rejection.code, ReasonCode::UsageLimitExceeded);
                    prop_assert!(!(fits || r.partial && largest >= milli(1)));
                }
            }
            // After a created usage, every step its period (and the trial)
            // has reached has been raised, now or before, and what it raised
            // is reached now (under volume or stairstep pricing a bill can
            // fall below a step raised earlier).
            if let Decision::Created { alerts: raised, .. } = decision {
                let reached = reached_steps(&s, period, used[period], in_trial.then_some(trial_used));
                for step in &reached {
                    prop_assert!(alerts.contains_key(&(period, step.0, step.1)), "{step:?} reached but not raised");
                }
                for alert in raised {
                    prop_assert!(reached.contains(&(alert.kind, alert.threshold)), "{alert:?} raised but not reached");
                }
            }
        }
        for (i, stored) in final_state.periods.iter().enumerate() {
            match (s.hard[i], s.hard_is_amount[i]) {
                (Some(l), false) => prop_assert!(used[i] <= milli(l), "a period never exceeds its hard limit"),
                (Some(l), true) => prop_assert!(pricing.amount(used[i]) <= milli(l), "a period's bill never exceeds its amount limit"),
                (None, _) => {}
            }
            prop_assert_eq!(stored.used, used[i]);
        }
        if let Some(limit) = s.trial_limit {
            prop_assert!(trial_used <= milli(limit), "the trial never exceeds its limit");
        }
        prop_assert!(alerts.values().all(|n| *n == 1), "each alert step fires at most once per period: {alerts:?}");

        // Deterministic: the same sequence decides the same way.
        let (again, _) = run(&s, &requests);
        prop_assert_eq!(again, decisions);
    }
}

/// The soft and hard alert steps that a period's usage has reached (and
/// the trial's, while `trial_used` is given).
fn reached_steps(s: &Setup, period: usize, used: Decimal, trial_used: Option<Decimal>) -> Vec<(LimitKind, u8)> {
    let pricing = &s.pricing;
    let mut steps = Vec::new();
    if let Some(l) = s.soft[period] {
        let measure = if s.soft_is_amount[period] {
            pricing.amount(used)
        } else {
            used
        };
        for threshold in [75u8, 90, 100] {
            if measure * Decimal::ONE_HUNDRED >= milli(l) * Decimal::from(threshold) {
                steps.push((LimitKind::Soft, threshold));
            }
        }
    }
    if let Some(l) = s.hard[period] {
        let full = if s.hard_is_amount[period] {
            pricing.largest_fitting(used, max_quantity(), milli(l)).is_zero()
        } else {
            used >= milli(l)
        };
        if full {
            steps.push((LimitKind::Hard, 100));
        }
    }
    if let (Some(l), Some(trial_used)) = (s.trial_limit, trial_used) {
        if trial_used >= milli(l) {
            steps.push((LimitKind::Trial, 100));
        }
    }
    steps
}
