//! Fuzzes the limit decision: a subscription (status, periods with hard and
//! soft limits, a trial with its cap, what is already used and alerted) and
//! a sequence of requests (with or without acceptPartialQuantity, repeats
//! and altered repeats of earlier ids) decided in order, each created usage
//! stored as the pipeline stores it.
//!
//! Every step is checked against SPEC's "Decision" section, computed here
//! from the state before the step: the reason of a rejection, the quantity
//! of a creation (a clamp only with acceptPartialQuantity and exactly to
//! what is available), the alerts (each kind once per period, when reached),
//! and the state after it (only the chosen period and the trial count grow,
//! by what was accepted; a duplicate or a rejection changes nothing). Over
//! the run: no hard limit or trial cap is exceeded that was not exceeded
//! before. And `decide` is deterministic: the same step on a copy of the
//! state gives the same decision and the same state.

#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use chrono::{DateTime, Duration, Utc};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use usage_worker::domain::decision::{
    decide, open_period_start, Decision, LimitKind, LimitReached, LimitReport, PeriodState, StoredUsage,
    SubscriptionState,
};
use usage_worker::domain::event::UsageRequest;
use usage_worker::domain::ReasonCode;

const SUBSCRIPTION: &str = "sub_fuzz";
const MAX_PERIODS: usize = 4;
const MAX_REQUESTS: usize = 64;

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

#[derive(Arbitrary, Debug)]
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
    hard: Option<Milli>,
    soft: Option<Milli>,
    used: Milli,
    /// Closed early (an invoice) this many hours after its start.
    closed_after_hours: Option<u16>,
    alerted: [bool; 3],
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

fn subscription(input: &Input) -> SubscriptionState {
    let mut periods = Vec::new();
    // Real periods start 100 hours into the timeline, so usage can fall
    // before them (the open-ended period, or none).
    let mut start = at(100);
    for spec in input.periods.iter().take(MAX_PERIODS) {
        start += Duration::hours(i64::from(spec.gap_hours));
        let end = start + Duration::hours(i64::from(spec.length_hours.max(1)));
        let kinds = [LimitKind::Soft, LimitKind::Hard, LimitKind::Trial];
        periods.push(PeriodState {
            start,
            end: Some(end),
            hard_limit: spec.hard.map(Milli::decimal),
            soft_limit: spec.soft.map(Milli::decimal),
            used: spec.used.decimal(),
            closed_time: spec.closed_after_hours.map(|h| start + Duration::hours(i64::from(h))),
            alerted: kinds
                .into_iter()
                .zip(spec.alerted)
                .filter(|(_, a)| *a)
                .map(|(k, _)| k)
                .collect(),
        });
        start = end;
    }
    if input.open_period {
        let end = periods.first().map(|p| p.start);
        periods.insert(
            0,
            PeriodState {
                start: open_period_start(),
                end,
                hard_limit: None,
                soft_limit: None,
                used: Decimal::ZERO,
                closed_time: None,
                alerted: Vec::new(),
            },
        );
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

/// What SPEC's step 5 says about a request at `usage_time` in period
/// `index`: the cap that binds (the smallest availability; the hard limit
/// on a tie), with the figures before the request.
fn binding_cap(
    sub: &SubscriptionState,
    index: usize,
    usage_time: DateTime<Utc>,
) -> Option<(LimitKind, Decimal, Decimal)> {
    let period = &sub.periods[index];
    let hard = period.hard_limit.map(|l| (LimitKind::Hard, l, period.used));
    let in_trial = sub.trial_end_time.is_some_and(|end| usage_time < end);
    let trial = sub
        .trial_limit
        .filter(|_| in_trial)
        .map(|l| (LimitKind::Trial, l, sub.trial_used));
    let available = |(_, limit, used): &(LimitKind, Decimal, Decimal)| (*limit - *used).max(Decimal::ZERO);
    match (hard, trial) {
        (Some(h), Some(t)) => Some(if available(&t) < available(&h) { t } else { h }),
        (h, t) => h.or(t),
    }
}

/// Alerted kinds in one order, so states compare whatever order they were raised in.
fn sorted_alerts(mut sub: SubscriptionState) -> SubscriptionState {
    for p in &mut sub.periods {
        p.alerted.sort();
    }
    sub
}

fuzz_target!(|input: Input| {
    let initial = subscription(&input);
    let mut sub = initial.clone();
    let now = at(input.now_hour);
    let grace = Duration::hours(i64::from(input.grace_hours));
    let mut stored: HashMap<String, StoredUsage> = HashMap::new();
    let mut earlier: Vec<UsageRequest> = Vec::new();

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

        let expected_rejection = expected_rejection(&req, usage_time, existing.as_ref(), known, &before, now, grace);
        match (&decision, expected_rejection) {
            (Decision::Duplicate { original }, Expected::Duplicate) => {
                assert_eq!(Some(original), existing.as_ref());
                assert_eq!(sub, before, "a duplicate changes nothing");
            }
            (Decision::Rejected { rejection, limit }, Expected::Rejected(code)) => {
                assert_eq!(rejection.code, code, "{req:?} {decision:?}");
                assert_eq!(sub, before, "a rejection changes nothing");
                assert_eq!(limit.is_some(), code == ReasonCode::UsageLimitExceeded);
            }
            (Decision::Created { .. }, Expected::Decide(index)) => {
                check_created(&req, usage_time, &decision, index, &before, &sub);
                let Decision::Created { quantity, .. } = decision else {
                    unreachable!()
                };
                stored.insert(
                    id.clone(),
                    StoredUsage {
                        id,
                        subscription_id: req.subscription_id.clone(),
                        quantity,
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
            (Decision::Rejected { rejection, limit }, Expected::Decide(index)) => {
                assert_eq!(rejection.code, ReasonCode::UsageLimitExceeded, "{req:?} {decision:?}");
                assert_eq!(rejection.field, Some("quantity"));
                assert_eq!(sub, before, "a rejection changes nothing");
                let (kind, cap, used) = binding_cap(&before, index, usage_time).expect("a limit rejected it");
                let available = (cap - used).max(Decimal::ZERO);
                assert!(
                    req.quantity > available && !(req.accept_partial && available >= milli(1)),
                    "rejected only when over what is available and no clamp is allowed: {req:?} {decision:?}"
                );
                let limit = limit.as_ref().expect("the outcome says which limit");
                assert_eq!(
                    (limit.applied, limit.limit, limit.used, limit.available),
                    (kind, cap, used, available)
                );
            }
            (decision, expected) => panic!("{req:?}: decided {decision:?}, SPEC says {expected:?}"),
        }
    }

    // Over the whole run.
    for (first, last) in initial.periods.iter().zip(&sub.periods) {
        if let Some(hard) = last.hard_limit {
            if first.used <= hard {
                assert!(last.used <= hard, "a period never exceeds its hard limit: {last:?}");
            }
        }
        assert!(last.used >= first.used);
        let mut kinds = last.alerted.clone();
        kinds.sort();
        kinds.dedup();
        assert_eq!(
            kinds.len(),
            last.alerted.len(),
            "each alert at most once per period: {last:?}"
        );
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
fn check_created(
    req: &UsageRequest,
    usage_time: DateTime<Utc>,
    decision: &Decision,
    index: usize,
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
    let binding = binding_cap(before, index, usage_time);
    let available = binding.map(|(_, cap, used)| (cap - used).max(Decimal::ZERO));

    assert_eq!(*requested_quantity, req.quantity);
    assert!(*quantity <= req.quantity, "accepted quantity <= requested");
    match available {
        Some(a) if req.quantity > a => {
            assert!(
                req.accept_partial && a >= milli(1),
                "clamped only when allowed: {decision:?}"
            );
            assert_eq!(*quantity, a, "a clamp takes exactly what is available");
            assert!(*partial);
        }
        _ => {
            assert_eq!(*quantity, req.quantity, "created in full when it fits");
            assert!(!partial);
        }
    }
    assert!(*quantity >= milli(1));
    assert_eq!(*decided_time, usage_time);
    let period = &before.periods[index];
    assert_eq!((*period_start, *period_end), (period.start, period.end));

    // The state after: the period and (in the trial) the trial count grow
    // by what was accepted, alerted kinds grow by the alerts; nothing else.
    let in_trial = before.trial_end_time.is_some_and(|end| usage_time < end);
    let mut expected = before.clone();
    expected.periods[index].used += *quantity;
    if in_trial {
        expected.trial_used += *quantity;
    }
    let used = expected.periods[index].used;
    let trial_used = expected.trial_used;

    let mut want_alerts = Vec::new();
    for (kind, limit, total, applies) in [
        (LimitKind::Soft, period.soft_limit, used, true),
        (LimitKind::Hard, period.hard_limit, used, true),
        (LimitKind::Trial, before.trial_limit, trial_used, in_trial),
    ] {
        if let Some(limit) = limit.filter(|l| applies && total >= *l && !period.alerted.contains(&kind)) {
            want_alerts.push(LimitReached {
                kind,
                limit,
                used: total,
            });
            expected.periods[index].alerted.push(kind);
        }
    }
    let mut got_alerts = alerts.clone();
    got_alerts.sort_by_key(|a| a.kind);
    want_alerts.sort_by_key(|a| a.kind);
    assert_eq!(got_alerts, want_alerts, "alerts once per period and kind, when reached");
    assert_eq!(
        sorted_alerts(after.clone()),
        sorted_alerts(expected),
        "only what was accepted is counted"
    );

    for (cap, total) in [
        (period.hard_limit, used),
        (before.trial_limit.filter(|_| in_trial), trial_used),
    ] {
        if let Some(cap) = cap {
            assert!(total <= cap, "a creation never passes a cap: {total} > {cap}");
        }
    }
    let want = binding.map(|(kind, cap, _)| {
        let total = if kind == LimitKind::Trial { trial_used } else { used };
        LimitReport {
            applied: kind,
            limit: cap,
            used: total,
            available: (cap - total).max(Decimal::ZERO),
            period_start: period.start,
            period_end: period.end,
        }
    });
    assert_eq!(
        *limit, want,
        "the outcome reports the cap that applied, after the usage"
    );
}
