//! Property tests of the pure decision against a model written here: for
//! random subscriptions (limits, trial) and random request sequences, the
//! accepted totals never exceed the limits, a clamp takes exactly what is
//! left, each alert kind fires at most once per period, and the same
//! sequence decided twice gives the same decisions.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use usage_worker::domain::decision::{decide, Decision, LimitKind, PeriodState, StoredUsage, SubscriptionState};
use usage_worker::domain::event::UsageRequest;
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

fn setup() -> impl Strategy<Value = Setup> {
    let limit = prop::option::of(0i64..20_000);
    (
        [limit.clone(), limit.clone()],
        [limit.clone(), limit.clone()],
        limit,
        prop::option::of(0i64..1440),
    )
        .prop_map(|(hard, soft, trial_limit, trial_end_hours)| Setup {
            hard,
            soft,
            trial_limit,
            trial_end_hours,
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
        hard_limit: s.hard[i].map(milli),
        soft_limit: s.soft[i].map(milli),
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
        let mut used = [Decimal::ZERO; 2];
        let mut trial_used = Decimal::ZERO;
        let mut alerts: HashMap<(usize, LimitKind), usize> = HashMap::new();
        let mut seen_created: HashMap<u8, (i64, bool, i64)> = HashMap::new();
        for (r, decision) in requests.iter().zip(&decisions) {
            let period = if r.hour < 720 { 0 } else { 1 };
            let in_trial = s.trial_end_hours.is_some_and(|h| r.hour < h);
            let mut available: Option<Decimal> = s.hard[period].map(|l| (milli(l) - used[period]).max(Decimal::ZERO));
            if in_trial {
                if let Some(l) = s.trial_limit {
                    let left = (milli(l) - trial_used).max(Decimal::ZERO);
                    available = Some(available.map_or(left, |a| a.min(left)));
                }
            }
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
                _ if seen_created.contains_key(&r.id) => prop_assert!(false, "an existing id must be a duplicate or a conflict"),
                Decision::Created { quantity, partial, alerts: raised, .. } => {
                    let requested = milli(r.quantity);
                    match available {
                        Some(a) if requested > a => {
                            prop_assert!(r.partial && a >= milli(1), "clamped only when partial and something is left");
                            prop_assert_eq!(*quantity, a, "a clamp takes exactly what is left");
                            prop_assert!(*partial);
                        }
                        _ => prop_assert_eq!(*quantity, requested),
                    }
                    used[period] += *quantity;
                    if in_trial {
                        trial_used += *quantity;
                    }
                    for alert in raised {
                        *alerts.entry((period, alert.kind)).or_default() += 1;
                        let (limit, total) = match alert.kind {
                            LimitKind::Hard => (s.hard[period], used[period]),
                            LimitKind::Soft => (s.soft[period], used[period]),
                            LimitKind::Trial => (s.trial_limit, trial_used),
                        };
                        prop_assert!(total >= milli(limit.expect("an alert needs a limit")), "an alert fires only once reached");
                    }
                    seen_created.insert(r.id, (r.quantity, r.partial, r.hour));
                }
                Decision::Rejected { rejection, .. } => {
                    prop_assert_eq!(rejection.code, ReasonCode::UsageLimitExceeded);
                    let a = available.expect("a limit rejected it");
                    prop_assert!(milli(r.quantity) > a && !(r.partial && a >= milli(1)));
                }
            }
        }
        for ((used, hard), stored) in used.iter().zip(s.hard).zip(&final_state.periods) {
            if let Some(limit) = hard {
                prop_assert!(*used <= milli(limit), "a period never exceeds its hard limit");
            }
            prop_assert_eq!(stored.used, *used);
        }
        if let Some(limit) = s.trial_limit {
            prop_assert!(trial_used <= milli(limit), "the trial never exceeds its limit");
        }
        prop_assert!(alerts.values().all(|n| *n == 1), "each alert kind fires at most once per period: {alerts:?}");

        // Deterministic: the same sequence decides the same way.
        let (again, _) = run(&s, &requests);
        prop_assert_eq!(again, decisions);
    }
}
