//! Property tests of corrections against a model written here: random
//! sequences of reports, voids and amendments (of known, unknown and voided
//! ids, with and without `previousQuantity`, with and without partial
//! acceptance) on one subscription with a quantity hard limit. After every
//! step the period's `used` is the sum of the latest quantities of the
//! usages that are not voided, a step that raised `used` left it within the
//! hard limit, and each decision is the model's.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;

use usage_worker::domain::correction::{Amendment, Correction, CorrectionAction};
use usage_worker::domain::decision::{
    decide, decide_correction, Decision, PeriodState, StoredUsage, SubscriptionState,
};
use usage_worker::domain::event::UsageRequest;
use usage_worker::domain::subscription::Limit;
use usage_worker::domain::ReasonCode;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn now() -> DateTime<Utc> {
    t0() + Duration::days(10)
}

/// Quantities in thousandths, so every value is exact.
fn milli(n: i64) -> Decimal {
    Decimal::new(n, 3)
}

#[derive(Debug, Clone)]
enum Step {
    Report {
        id: u8,
        quantity: i64,
        partial: bool,
    },
    Void {
        id: u8,
    },
    Amend {
        id: u8,
        quantity: i64,
        partial: bool,
        previous: Option<i64>,
    },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let id = 0u8..6;
    let quantity = prop_oneof![1i64..=3_000, Just(1_000), Just(5_000)];
    let step = prop_oneof![
        4 => (id.clone(), quantity.clone(), any::<bool>())
            .prop_map(|(id, quantity, partial)| Step::Report { id, quantity, partial }),
        2 => id.clone().prop_map(|id| Step::Void { id }),
        4 => (id, quantity.clone(), any::<bool>(), proptest::option::of(quantity))
            .prop_map(|(id, quantity, partial, previous)| Step::Amend { id, quantity, partial, previous }),
    ];
    proptest::collection::vec(step, 1..40)
}

/// What the model keeps of a usage.
#[derive(Debug, Clone, Copy)]
struct ModelUsage {
    quantity: i64,
    requested: i64,
    partial: bool,
    last_requested: Option<i64>,
    voided: bool,
}

/// What the model expects of a step: a status, and the quantity the usage
/// ends up with where that changes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Created(i64),
    Duplicate,
    Voided,
    Amended(i64),
    Rejected(ReasonCode),
}

struct Model {
    hard: Option<i64>,
    usages: BTreeMap<u8, ModelUsage>,
}

impl Model {
    fn used(&self) -> i64 {
        self.usages.values().filter(|u| !u.voided).map(|u| u.quantity).sum()
    }

    /// What a limit leaves for a usage whose own quantity is `own`.
    fn room(&self, own: i64) -> Option<i64> {
        self.hard.map(|hard| hard - (self.used() - own))
    }

    fn step(&mut self, step: &Step) -> Expected {
        match *step {
            Step::Report { id, quantity, partial } => {
                if let Some(u) = self.usages.get(&id) {
                    return if u.voided {
                        Expected::Rejected(ReasonCode::UsageVoided)
                    } else if u.requested == quantity && u.partial == partial {
                        Expected::Duplicate
                    } else {
                        Expected::Rejected(ReasonCode::IdempotencyConflict)
                    };
                }
                let accepted = match self.room(0) {
                    Some(room) if quantity > room => {
                        if partial && room >= 1 {
                            room
                        } else {
                            return Expected::Rejected(ReasonCode::UsageLimitExceeded);
                        }
                    }
                    _ => quantity,
                };
                self.usages.insert(
                    id,
                    ModelUsage {
                        quantity: accepted,
                        requested: quantity,
                        partial,
                        last_requested: None,
                        voided: false,
                    },
                );
                Expected::Created(accepted)
            }
            Step::Void { id } => match self.usages.get_mut(&id) {
                None => Expected::Rejected(ReasonCode::UsageNotFound),
                Some(u) if u.voided => Expected::Duplicate,
                Some(u) => {
                    u.voided = true;
                    Expected::Voided
                }
            },
            Step::Amend {
                id,
                quantity,
                partial,
                previous,
            } => {
                let Some(u) = self.usages.get(&id).copied() else {
                    return Expected::Rejected(ReasonCode::UsageNotFound);
                };
                if u.voided {
                    return Expected::Rejected(ReasonCode::UsageVoided);
                }
                if quantity == u.quantity || u.last_requested.unwrap_or(u.requested) == quantity {
                    return Expected::Duplicate;
                }
                if previous.is_some_and(|p| p != u.quantity) {
                    return Expected::Rejected(ReasonCode::AmendConflict);
                }
                let accepted = match self.room(u.quantity) {
                    Some(room) if quantity > u.quantity && quantity > room => {
                        if partial && room > u.quantity {
                            room
                        } else {
                            return Expected::Rejected(ReasonCode::UsageLimitExceeded);
                        }
                    }
                    _ => quantity,
                };
                let u = self.usages.get_mut(&id).expect("found above");
                u.quantity = accepted;
                u.last_requested = Some(quantity);
                Expected::Amended(accepted)
            }
        }
    }
}

fn subscription(hard: Option<i64>) -> SubscriptionState {
    SubscriptionState {
        id: "sub".into(),
        status: "active".into(),
        deleted: false,
        periods: vec![PeriodState {
            hard_limit: hard.map(|h| Limit::Quantity(milli(h))),
            ..PeriodState::new(t0(), Some(t0() + Duration::days(30)))
        }],
        trial_end_time: None,
        trial_limit: None,
        trial_used: Decimal::ZERO,
    }
}

/// The decision's result in the model's terms, and the stored usage after
/// it, where it stores one.
fn observed(decision: &Decision) -> (Expected, Option<StoredUsage>) {
    let quantity = |q: Decimal| (q * Decimal::from(1000)).try_into().expect("thousandths");
    match decision {
        Decision::Created { quantity: q, .. } => (Expected::Created(quantity(*q)), None),
        Decision::Duplicate { .. } => (Expected::Duplicate, None),
        Decision::Voided { usage } => (Expected::Voided, Some(usage.clone())),
        Decision::Amended { usage, .. } => (Expected::Amended(quantity(usage.quantity)), Some(usage.clone())),
        Decision::Rejected { rejection, .. } => (Expected::Rejected(rejection.code), None),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn corrections_agree_with_the_model(hard in proptest::option::of(1_000i64..=8_000), steps in steps()) {
        let mut sub = subscription(hard);
        let mut stored: BTreeMap<String, StoredUsage> = BTreeMap::new();
        let mut model = Model { hard, usages: BTreeMap::new() };
        for (n, step) in steps.iter().enumerate() {
            let before = sub.periods[0].used;
            let decision = match *step {
                Step::Report { id, quantity, partial } => {
                    let request = UsageRequest {
                        id: Some(format!("u{id}")),
                        subscription_id: "sub".into(),
                        quantity: milli(quantity),
                        usage_time: None,
                        accept_partial: partial,
                    };
                    let decision = decide(
                        &request,
                        now(),
                        stored.get(&format!("u{id}")),
                        Some(&mut sub),
                        now(),
                        Duration::hours(1),
                    );
                    if let Decision::Created { quantity, .. } = &decision {
                        stored.insert(format!("u{id}"), StoredUsage {
                            id: format!("u{id}"),
                            subscription_id: "sub".into(),
                            quantity: *quantity,
                            requested_quantity: milli(request_quantity(step)),
                            accept_partial: partial,
                            usage_time: now(),
                            invoice_id: None,
                            invoice_item_id: None,
                            created_time: now(),
                            updated_time: now(),
                            period_start: t0(),
                            last_requested_quantity: None,
                            voided: None,
                        });
                    }
                    decision
                }
                Step::Void { id } => correct(&mut sub, &stored, id, CorrectionAction::Void { reason: None }),
                Step::Amend { id, quantity, partial, previous } => correct(
                    &mut sub,
                    &stored,
                    id,
                    CorrectionAction::Amend(Amendment {
                        quantity: milli(quantity),
                        accept_partial: partial,
                        previous_quantity: previous.map(milli),
                    }),
                ),
            };
            let (got, usage) = observed(&decision);
            if let Some(usage) = usage {
                stored.insert(usage.id.clone(), usage);
            }
            let want = model.step(step);
            prop_assert_eq!(&got, &want, "step {} {:?}", n, step);
            let used = sub.periods[0].used;
            prop_assert_eq!(used, milli(model.used()), "used after step {} {:?}", n, step);
            let counted: Decimal = stored.values().filter(|u| u.voided.is_none()).map(|u| u.quantity).sum();
            prop_assert_eq!(used, counted, "used is the sum of what the usages count");
            if let (Some(hard), true) = (hard, used > before) {
                prop_assert!(used <= milli(hard), "a raise went past the hard limit at step {}", n);
            }
        }
    }
}

fn request_quantity(step: &Step) -> i64 {
    match step {
        Step::Report { quantity, .. } => *quantity,
        _ => unreachable!("only reports are stored by decide"),
    }
}

fn correct(
    sub: &mut SubscriptionState,
    stored: &BTreeMap<String, StoredUsage>,
    id: u8,
    action: CorrectionAction,
) -> Decision {
    let correction = Correction {
        id: format!("u{id}"),
        subscription_id: "sub".into(),
        action,
    };
    decide_correction(
        &correction,
        "kafka",
        stored.get(&correction.id),
        Some(sub),
        now(),
        Duration::hours(1),
        now(),
    )
}
