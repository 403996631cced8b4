//! Deciding a correction (SPEC "Corrections: void and amend"): under the
//! subscription's lock, like a report, and by the same limit code.
//!
//! The checks run in SPEC's order: `usage_not_found`,
//! `subscription_mismatch`, `usage_voided` (a void of a voided usage is a
//! duplicate instead), `usage_invoiced`, `period_closed`, `amend_conflict`,
//! then the limits; an amendment that changes nothing is a duplicate
//! before any of the checks after `usage_voided`. A void gives its quantity back to its period (and to
//! the trial, when it counted there). An amendment gives the usage's own
//! quantity back first and is then decided like a report of the new
//! quantity at the usage's time.
//!
//! Decisions of this build where SPEC leaves a choice:
//! - A lowering amendment is never refused by a limit, quantity or amount:
//!   limits gate what usage adds, and a lower quantity adds nothing (SPEC
//!   says so for amounts; a quantity limit lowered below what is used
//!   would otherwise keep the usage from coming down).
//! - A raise that does not fit, with `acceptPartialQuantity`, is clamped to
//!   the largest quantity that fits, but never below the usage's quantity:
//!   when not even 0.001 more fits, it is rejected `usage_limit_exceeded`.
//! - An amendment that asks for the usage's quantity, or for the quantity
//!   it was last asked for (by its last amendment, else by its report),
//!   changes nothing: `duplicate`, carrying the usage. That comes right
//!   after `usage_voided`, before `usage_invoiced`, `period_closed` and
//!   `amend_conflict`: what changes nothing is never refused, so a re-sent
//!   amendment or a retried PUT is a duplicate rather than a conflict.
//! - Only a raise raises alerts. Each step stays raised for its period, so
//!   a correction that lowers and then raises usage never raises one twice.

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;

use super::{
    largest_fitting, limit_caps, min_quantity, reached, refusal, refuses, Decision, LimitReached, StoredUsage,
    SubscriptionState, Voided,
};
use crate::domain::correction::{Amendment, Correction, CorrectionAction};
use crate::domain::{ReasonCode, Rejection};

/// Decides a correction. `by` is who asks (the HTTP caller's name, or
/// `kafka`); `now` is the time the correction is recorded at. On `Voided`
/// and `Amended`, the period's `used` (and the trial's) change in
/// `subscription`, so the next decision of the same batch sees them.
pub fn decide_correction(
    correction: &Correction,
    by: &str,
    existing: Option<&StoredUsage>,
    subscription: Option<&mut SubscriptionState>,
    database_now: DateTime<Utc>,
    grace: Duration,
    now: DateTime<Utc>,
) -> Decision {
    let reject = |code, field: &'static str, message: String| Decision::Rejected {
        rejection: Rejection::on_field(code, field, message),
        limit: None,
    };
    let Some(usage) = existing else {
        return reject(
            ReasonCode::UsageNotFound,
            "id",
            format!("no usage has the id {:?}", correction.id),
        );
    };
    if usage.subscription_id != correction.subscription_id {
        return reject(
            ReasonCode::SubscriptionMismatch,
            "subscriptionId",
            format!(
                "usage {:?} belongs to another subscription than {:?}",
                usage.id, correction.subscription_id
            ),
        );
    }
    if usage.voided.is_some() {
        return match correction.action {
            CorrectionAction::Void { .. } => Decision::Duplicate {
                original: usage.clone(),
            },
            CorrectionAction::Amend(_) => reject(
                ReasonCode::UsageVoided,
                "id",
                format!("usage {:?} was voided and cannot be amended", usage.id),
            ),
        };
    }
    if let CorrectionAction::Amend(amendment) = &correction.action {
        if unchanged(usage, amendment) {
            return Decision::Duplicate {
                original: usage.clone(),
            };
        }
    }
    if let Some(invoice) = &usage.invoice_id {
        return reject(
            ReasonCode::UsageInvoiced,
            "id",
            format!(
                "usage {:?} was billed on invoice {invoice:?} and can no longer be corrected",
                usage.id
            ),
        );
    }
    let period = subscription.and_then(|sub| {
        let index = sub.periods.iter().position(|p| p.start == usage.period_start)?;
        (!sub.periods[index].is_closed(database_now, grace)).then_some((sub, index))
    });
    let Some((sub, index)) = period else {
        return reject(
            ReasonCode::PeriodClosed,
            "id",
            format!(
                "the service period of usage {:?} is closed: what it billed can no longer change",
                usage.id
            ),
        );
    };
    match &correction.action {
        CorrectionAction::Void { reason } => {
            give_back(sub, index, usage, usage.quantity);
            let voided = StoredUsage {
                voided: Some(Voided {
                    time: now,
                    reason: reason.clone(),
                    by: by.to_owned(),
                }),
                updated_time: now,
                ..usage.clone()
            };
            Decision::Voided { usage: voided }
        }
        CorrectionAction::Amend(amendment) => amend(sub, index, usage, amendment, now),
    }
}

/// "Nothing differs": the amendment asks for the quantity the usage has, or
/// for the one it was last asked for (by its last amendment, else by its
/// report), so that a re-sent amendment, or a retried PUT of a clamped
/// create, changes nothing.
fn unchanged(usage: &StoredUsage, amendment: &Amendment) -> bool {
    let last_asked = usage.last_requested_quantity.unwrap_or(usage.requested_quantity);
    amendment.quantity == usage.quantity || amendment.quantity == last_asked
}

/// Takes `quantity` of `usage` out of its period's count (and the trial's).
fn give_back(sub: &mut SubscriptionState, index: usize, usage: &StoredUsage, quantity: Decimal) {
    sub.periods[index].used -= quantity;
    if sub.in_trial(usage.usage_time) {
        sub.trial_used -= quantity;
    }
}

fn count(sub: &mut SubscriptionState, index: usize, usage: &StoredUsage, quantity: Decimal) {
    give_back(sub, index, usage, -quantity);
}

fn amend(
    sub: &mut SubscriptionState,
    index: usize,
    usage: &StoredUsage,
    amendment: &Amendment,
    now: DateTime<Utc>,
) -> Decision {
    let current = usage.quantity;
    let requested = amendment.quantity;
    if let Some(previous) = amendment.previous_quantity.filter(|p| *p != current) {
        return Decision::Rejected {
            rejection: Rejection::on_field(
                ReasonCode::AmendConflict,
                "previousQuantity",
                format!(
                    "usage {:?} has quantity {current}, not the previousQuantity {previous} the amendment expects",
                    usage.id
                ),
            ),
            limit: None,
        };
    }
    let in_trial = sub.in_trial(usage.usage_time);
    give_back(sub, index, usage, current);
    let caps = limit_caps(sub, index, in_trial);
    let period = &sub.periods[index];
    let (quantity, binding) = if requested < current {
        (requested, caps.iter().min_by_key(|cap| cap.available).cloned())
    } else {
        match caps
            .iter()
            .filter(|cap| refuses(cap, period, requested))
            .min_by_key(|cap| cap.available)
        {
            None => (requested, caps.iter().min_by_key(|cap| cap.available).cloned()),
            Some(cap) => {
                let fitting = if amendment.accept_partial {
                    largest_fitting(&caps, period, requested)
                } else {
                    Decimal::ZERO
                };
                if fitting < current + min_quantity() {
                    let rejection = Rejection::on_field(
                        ReasonCode::UsageLimitExceeded,
                        "quantity",
                        refusal(cap, period, requested),
                    );
                    let limit = Some(cap.clone());
                    count(sub, index, usage, current);
                    return Decision::Rejected { rejection, limit };
                }
                (fitting, Some(cap.clone()))
            }
        }
    };
    count(sub, index, usage, quantity);
    let after = limit_caps(sub, index, in_trial);
    let alerts: Vec<LimitReached> = if quantity > current {
        reached(sub, index, in_trial, &after)
    } else {
        Vec::new()
    };
    sub.periods[index].alerted.extend(alerts.iter().map(LimitReached::step));
    let limit = binding.and_then(|cap| after.into_iter().find(|c| c.applied == cap.applied));
    Decision::Amended {
        previous_quantity: current,
        requested_quantity: requested,
        partial: quantity != requested,
        usage: StoredUsage {
            quantity,
            last_requested_quantity: Some(requested),
            updated_time: now,
            ..usage.clone()
        },
        limit,
        alerts,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::domain::decision::{AlertStep, LimitKind, PeriodState};
    use crate::domain::subscription::Limit;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn now() -> DateTime<Utc> {
        t("2026-11-27T12:00:00Z")
    }

    fn start() -> DateTime<Utc> {
        t("2026-11-01T00:00:00Z")
    }

    /// A subscription whose period holds `used`, all of it the usage
    /// `usage(used)` unless the test adds more.
    fn sub(hard: Option<&str>, used: &str) -> SubscriptionState {
        SubscriptionState {
            id: "sub_1".into(),
            status: "active".into(),
            deleted: false,
            periods: vec![PeriodState {
                hard_limit: hard.map(|h| Limit::Quantity(d(h))),
                used: d(used),
                ..PeriodState::new(start(), Some(t("2026-12-01T00:00:00Z")))
            }],
            trial_end_time: None,
            trial_limit: None,
            trial_used: Decimal::ZERO,
        }
    }

    fn usage(quantity: &str) -> StoredUsage {
        StoredUsage {
            id: "usg_1".into(),
            subscription_id: "sub_1".into(),
            quantity: d(quantity),
            requested_quantity: d(quantity),
            accept_partial: false,
            usage_time: t("2026-11-10T00:00:00Z"),
            invoice_id: None,
            invoice_item_id: None,
            created_time: t("2026-11-10T00:00:00Z"),
            updated_time: t("2026-11-10T00:00:00Z"),
            period_start: start(),
            last_requested_quantity: None,
            voided: None,
        }
    }

    fn void() -> Correction {
        Correction {
            id: "usg_1".into(),
            subscription_id: "sub_1".into(),
            action: CorrectionAction::Void {
                reason: Some("meter fault".into()),
            },
        }
    }

    fn amend_to(quantity: &str, partial: bool, previous: Option<&str>) -> Correction {
        Correction {
            id: "usg_1".into(),
            subscription_id: "sub_1".into(),
            action: CorrectionAction::Amend(Amendment {
                quantity: d(quantity),
                accept_partial: partial,
                previous_quantity: previous.map(d),
            }),
        }
    }

    fn decide(c: &Correction, u: Option<&StoredUsage>, s: &mut SubscriptionState) -> Decision {
        decide_correction(c, "kafka", u, Some(s), now(), Duration::hours(1), now())
    }

    fn code(decision: &Decision) -> Option<ReasonCode> {
        match decision {
            Decision::Rejected { rejection, .. } => Some(rejection.code),
            _ => None,
        }
    }

    #[test]
    fn a_void_gives_the_quantity_back_and_records_who_and_why() {
        let mut s = sub(Some("10"), "10");
        let decision = decide(&void(), Some(&usage("4")), &mut s);
        let Decision::Voided { usage: voided } = &decision else {
            panic!("{decision:?}")
        };
        assert_eq!(voided.quantity, d("4"), "the usage as it was");
        let how = voided.voided.as_ref().unwrap();
        assert_eq!(
            (how.by.as_str(), how.reason.as_deref(), how.time),
            ("kafka", Some("meter fault"), now())
        );
        assert_eq!(s.periods[0].used, d("6"));
    }

    #[test]
    fn a_void_in_the_trial_gives_back_to_the_trial_too() {
        let mut s = sub(None, "5");
        s.trial_end_time = Some(t("2026-11-15T00:00:00Z"));
        s.trial_limit = Some(d("10"));
        s.trial_used = d("5");
        decide(&void(), Some(&usage("5")), &mut s);
        assert_eq!((s.periods[0].used, s.trial_used), (d("0"), d("0")));
    }

    #[test]
    fn rejections_come_in_spec_order() {
        let mut s = sub(None, "4");
        assert_eq!(code(&decide(&void(), None, &mut s)), Some(ReasonCode::UsageNotFound));
        let other = StoredUsage {
            subscription_id: "sub_2".into(),
            invoice_id: Some("inv_1".into()),
            ..usage("4")
        };
        assert_eq!(
            code(&decide(&void(), Some(&other), &mut s)),
            Some(ReasonCode::SubscriptionMismatch),
            "before usage_invoiced"
        );
        let voided_and_invoiced = StoredUsage {
            voided: Some(Voided {
                time: now(),
                reason: None,
                by: "kafka".into(),
            }),
            invoice_id: Some("inv_1".into()),
            ..usage("4")
        };
        assert!(matches!(
            decide(&void(), Some(&voided_and_invoiced), &mut s),
            Decision::Duplicate { .. }
        ));
        assert_eq!(
            code(&decide(&amend_to("2", false, None), Some(&voided_and_invoiced), &mut s)),
            Some(ReasonCode::UsageVoided)
        );
        let invoiced = StoredUsage {
            invoice_id: Some("inv_1".into()),
            ..usage("4")
        };
        s.periods[0].closed_time = Some(t("2026-11-20T00:00:00Z"));
        assert_eq!(
            code(&decide(&void(), Some(&invoiced), &mut s)),
            Some(ReasonCode::UsageInvoiced),
            "before period_closed"
        );
        assert_eq!(
            code(&decide(&amend_to("2", false, Some("9")), Some(&usage("4")), &mut s)),
            Some(ReasonCode::PeriodClosed),
            "before amend_conflict"
        );
        assert_eq!(s.periods[0].used, d("4"), "no rejection changes the count");
    }

    #[test]
    fn a_period_closed_by_time_refuses_corrections() {
        let mut s = sub(None, "4");
        let late = t("2026-12-01T01:00:00Z");
        let decision = decide_correction(
            &void(),
            "kafka",
            Some(&usage("4")),
            Some(&mut s),
            late,
            Duration::hours(1),
            late,
        );
        assert_eq!(code(&decision), Some(ReasonCode::PeriodClosed));
        let decision = decide_correction(
            &void(),
            "kafka",
            Some(&usage("4")),
            None,
            now(),
            Duration::hours(1),
            now(),
        );
        assert_eq!(code(&decision), Some(ReasonCode::PeriodClosed), "no period known");
    }

    #[test]
    fn an_amendment_is_decided_with_its_own_quantity_given_back() {
        let mut s = sub(Some("10"), "9");
        let decision = decide(&amend_to("7", false, Some("6")), Some(&usage("6")), &mut s);
        let Decision::Amended {
            previous_quantity,
            usage: amended,
            partial,
            limit: Some(limit),
            ..
        } = &decision
        else {
            panic!("{decision:?}")
        };
        assert_eq!(
            (*previous_quantity, amended.quantity, *partial),
            (d("6"), d("7"), false)
        );
        assert_eq!(amended.last_requested_quantity, Some(d("7")));
        assert_eq!((limit.used, limit.available), (d("10"), d("0")));
        // With 4 of the 10 someone else's, the usage can be 6 at most.
        let mut s = sub(Some("10"), "10");
        let decision = decide(&amend_to("7", false, None), Some(&usage("6")), &mut s);
        assert_eq!(code(&decision), Some(ReasonCode::UsageLimitExceeded));
        let Decision::Rejected { limit: Some(limit), .. } = &decision else {
            panic!()
        };
        assert_eq!(limit.available, d("6"), "what the usage could be amended to");
        assert_eq!(s.periods[0].used, d("10"), "a rejection restores the count");
    }

    #[test]
    fn a_raise_with_partial_is_clamped_but_never_below_the_usage() {
        let mut s = sub(Some("10"), "8");
        let decision = decide(&amend_to("9", true, None), Some(&usage("6")), &mut s);
        let Decision::Amended {
            usage: amended,
            partial: true,
            requested_quantity,
            ..
        } = &decision
        else {
            panic!("{decision:?}")
        };
        assert_eq!((amended.quantity, *requested_quantity), (d("8"), d("9")));
        assert_eq!(s.periods[0].used, d("10"));
        let mut s = sub(Some("10"), "10");
        let decision = decide(&amend_to("9", true, None), Some(&usage("6")), &mut s);
        assert_eq!(
            code(&decision),
            Some(ReasonCode::UsageLimitExceeded),
            "not even 0.001 more"
        );
        assert_eq!(s.periods[0].used, d("10"));
    }

    #[test]
    fn a_lowering_is_never_refused_by_a_limit() {
        // The hard limit was lowered below what is used.
        let mut s = sub(Some("3"), "10");
        let decision = decide(&amend_to("5", false, None), Some(&usage("10")), &mut s);
        assert!(matches!(decision, Decision::Amended { .. }), "{decision:?}");
        assert_eq!(s.periods[0].used, d("5"));
    }

    #[test]
    fn asking_again_for_what_is_there_changes_nothing() {
        let mut s = sub(None, "8");
        let amended = StoredUsage {
            quantity: d("8"),
            last_requested_quantity: Some(d("9")),
            ..usage("10")
        };
        for again in [amend_to("8", false, Some("10")), amend_to("9", true, Some("10"))] {
            assert!(matches!(
                decide(&again, Some(&amended), &mut s),
                Decision::Duplicate { .. }
            ));
        }
        assert_eq!(
            code(&decide(&amend_to("7", false, Some("10")), Some(&amended), &mut s)),
            Some(ReasonCode::AmendConflict)
        );
        assert_eq!(s.periods[0].used, d("8"));
    }

    #[test]
    fn a_retried_put_of_a_clamped_create_changes_nothing_even_once_billed() {
        let mut s = sub(Some("5"), "5");
        let clamped = StoredUsage {
            requested_quantity: d("10"),
            accept_partial: true,
            ..usage("5")
        };
        assert!(matches!(
            decide(&amend_to("10", true, None), Some(&clamped), &mut s),
            Decision::Duplicate { .. }
        ));
        let billed = StoredUsage {
            invoice_id: Some("inv_1".into()),
            ..clamped
        };
        assert!(matches!(
            decide(&amend_to("5", false, None), Some(&billed), &mut s),
            Decision::Duplicate { .. }
        ));
        assert_eq!(
            code(&decide(&amend_to("4", false, None), Some(&billed), &mut s)),
            Some(ReasonCode::UsageInvoiced)
        );
        assert_eq!(s.periods[0].used, d("5"));
    }

    #[test]
    fn only_a_raise_raises_alerts_and_each_step_once() {
        let mut s = sub(None, "8");
        s.periods[0].soft_limit = Some(Limit::Quantity(d("10")));
        s.periods[0].alerted = vec![AlertStep {
            kind: LimitKind::Soft,
            threshold: 75,
        }];
        let Decision::Amended { alerts, .. } = decide(&amend_to("2", false, None), Some(&usage("8")), &mut s) else {
            panic!()
        };
        assert!(alerts.is_empty(), "a lowering raises nothing");
        let lowered = StoredUsage {
            quantity: d("2"),
            last_requested_quantity: Some(d("2")),
            ..usage("8")
        };
        let Decision::Amended { alerts, .. } = decide(&amend_to("9.5", false, None), Some(&lowered), &mut s) else {
            panic!()
        };
        let steps: Vec<u8> = alerts.iter().map(|a| a.threshold).collect();
        assert_eq!(steps, [90], "75 was raised before the lowering");
    }
}
