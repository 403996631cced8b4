//! The limit decision: given a validated request and what the database knows
//! about its subscription, is the usage created, clamped, a duplicate or
//! rejected, and why. Pure: the caller loads the state, applies the decisions
//! in input order (each one updates the in-memory `used`), and stores them.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;

use super::event::UsageRequest;
use super::pricing::{Pricing, STEP};

mod correction;
use super::subscription::Limit;
use super::{ReasonCode, Rejection};
pub use correction::decide_correction;

/// Start of the open-ended period of a subscription that never named one.
/// A real timestamp (0001-01-01T00:00:00Z, within PostgreSQL's range) so that
/// every period has a start and one key shape.
pub fn open_period_start() -> DateTime<Utc> {
    DateTime::from_timestamp(-62_135_596_800, 0).expect("0001-01-01 is representable")
}

/// Smallest billable quantity.
pub fn min_quantity() -> Decimal {
    STEP
}

/// The most one usage can carry (quantities are below 10^12): what an amount
/// limit reports as available when even that much fits.
pub fn max_quantity() -> Decimal {
    Decimal::new(999_999_999_999_999, 3)
}

/// The three limits of SPEC. The serialized names are the snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitKind {
    Hard,
    Soft,
    Trial,
}

impl LimitKind {
    pub const ALL: [LimitKind; 3] = [LimitKind::Soft, LimitKind::Hard, LimitKind::Trial];

    /// The name in snapshots and in an outcome's `limit.applied`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Hard => "hardLimit",
            Self::Soft => "softLimit",
            Self::Trial => "trialLimit",
        }
    }

    /// The `type` of the alert raised when the limit is reached.
    pub fn alert_type(self) -> &'static str {
        match self {
            Self::Hard => "hard-usage-limit-reached",
            Self::Soft => "soft-usage-limit-reached",
            Self::Trial => "trial-usage-limit-reached",
        }
    }

    /// The stored spelling (`limit_alerts.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
            Self::Trial => "trial",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One alert of a period: a limit reached at a percentage of it. The soft
/// limit has three (75, 90 and 100 %), the hard and trial limits one (100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlertStep {
    pub kind: LimitKind,
    pub threshold: u8,
}

impl AlertStep {
    pub const SOFT_THRESHOLDS: [u8; 3] = [75, 90, 100];

    pub fn full(kind: LimitKind) -> Self {
        Self { kind, threshold: 100 }
    }

    /// The stored spelling (`service_periods.alerted`): the kind, then
    /// `:threshold` below 100 (`soft:75`), so that version 1's entries
    /// (`soft`, `hard`, `trial`) keep their meaning.
    pub fn stored(self) -> String {
        match self.threshold {
            100 => self.kind.as_str().to_owned(),
            threshold => format!("{}:{threshold}", self.kind.as_str()),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (kind, threshold) = match text.split_once(':') {
            Some((kind, threshold)) => (kind, threshold.parse().ok()?),
            None => (text, 100),
        };
        Some(Self {
            kind: LimitKind::parse(kind)?,
            threshold,
        })
    }
}

/// One service period of a subscription and what has been accepted in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodState {
    /// Inclusive; `open_period_start()` for the implicit open-ended period.
    pub start: DateTime<Utc>,
    /// Exclusive; `None` while open-ended.
    pub end: Option<DateTime<Utc>>,
    pub hard_limit: Option<Limit>,
    pub soft_limit: Option<Limit>,
    /// The plan's metered price, remembered with the limits; an amount
    /// limit is only stored with one.
    pub pricing: Option<Arc<Pricing>>,
    pub used: Decimal,
    /// Set when the period was closed early (an invoice was issued for it),
    /// or when its closing record was written (see `period_record`).
    pub closed_time: Option<DateTime<Utc>>,
    /// Alerts this period already raised.
    pub alerted: Vec<AlertStep>,
}

impl PeriodState {
    /// A period without limits, pricing or usage.
    pub fn new(start: DateTime<Utc>, end: Option<DateTime<Utc>>) -> Self {
        Self {
            start,
            end,
            hard_limit: None,
            soft_limit: None,
            pricing: None,
            used: Decimal::ZERO,
            closed_time: None,
            alerted: Vec::new(),
        }
    }

    /// What the period's usage costs, with `extra` more; `None` without
    /// pricing.
    pub fn amount_with(&self, extra: Decimal) -> Option<Decimal> {
        self.pricing.as_ref().map(|p| p.amount(self.used + extra))
    }

    /// Whether the step, or a higher step of its kind, was raised: each step
    /// once per period, lowest first.
    fn raised(&self, step: AlertStep) -> bool {
        self.alerted
            .iter()
            .any(|a| a.kind == step.kind && a.threshold >= step.threshold)
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && self.end.is_none_or(|end| t < end)
    }

    /// A period accepts usage until its end plus the grace time, unless it was
    /// closed before that.
    pub fn is_closed(&self, now: DateTime<Utc>, grace: Duration) -> bool {
        self.closed_time.is_some_and(|c| c <= now) || self.end.is_some_and(|end| end + grace <= now)
    }
}

/// What the decision needs to know about a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionState {
    pub id: String,
    pub status: String,
    pub deleted: bool,
    pub periods: Vec<PeriodState>,
    /// Usage with a `usageTime` before this counts against `trial_limit`.
    pub trial_end_time: Option<DateTime<Utc>>,
    pub trial_limit: Option<Decimal>,
    /// Accepted quantity with a `usageTime` before `trial_end_time`.
    pub trial_used: Decimal,
}

impl SubscriptionState {
    fn in_trial(&self, usage_time: DateTime<Utc>) -> bool {
        self.trial_end_time.is_some_and(|end| usage_time < end)
    }
}

impl SubscriptionState {
    /// The period that counts a usage at `t`: the one containing it; where a
    /// correction left two overlapping, the later-starting one.
    pub fn period_index_at(&self, t: DateTime<Utc>) -> Option<usize> {
        self.periods
            .iter()
            .enumerate()
            .filter(|(_, p)| p.contains(t))
            .max_by_key(|(_, p)| p.start)
            .map(|(i, _)| i)
    }
}

/// A usage already stored under the request's id, as far as the idempotency
/// comparison needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUsage {
    pub id: String,
    pub subscription_id: String,
    pub quantity: Decimal,
    pub requested_quantity: Decimal,
    pub accept_partial: bool,
    pub usage_time: DateTime<Utc>,
    pub invoice_id: Option<String>,
    pub invoice_item_id: Option<String>,
    pub created_time: DateTime<Utc>,
    pub updated_time: DateTime<Utc>,
    /// The start of the period that counts it.
    pub period_start: DateTime<Utc>,
    /// The quantity the latest amendment asked for; `None` until amended.
    pub last_requested_quantity: Option<Decimal>,
    /// Set once it is voided: it no longer counts, and its id stays taken.
    pub voided: Option<Voided>,
}

/// How a usage was voided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voided {
    pub time: DateTime<Utc>,
    pub reason: Option<String>,
    /// The HTTP caller's name, or `kafka`.
    pub by: String,
}

impl StoredUsage {
    /// SPEC: "the same" request compares subscriptionId, the requested
    /// quantity by value, acceptPartialQuantity, and usageTime as an instant
    /// only when the request gave one.
    pub fn same_request(&self, req: &UsageRequest) -> bool {
        self.subscription_id == req.subscription_id
            && self.requested_quantity == req.quantity
            && self.accept_partial == req.accept_partial
            && req.usage_time.is_none_or(|t| t == self.usage_time)
    }
}

/// The money side of an amount limit: the limit, what the period's usage
/// costs, and in what currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmountFigures {
    pub limit_amount: Decimal,
    pub used_amount: Decimal,
    pub currency: String,
}

/// Which limit decided, with the figures the outcome reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReport {
    pub applied: LimitKind,
    /// The quantity limit; `None` for an amount limit (see `amount`).
    pub limit: Option<Decimal>,
    /// Quantity used in the period (the trial, for the trial limit) after
    /// this decision.
    pub used: Decimal,
    /// The quantity still available after this decision: for an amount
    /// limit, the largest quantity whose cost still fits.
    pub available: Decimal,
    pub amount: Option<AmountFigures>,
    pub period_start: DateTime<Utc>,
    pub period_end: Option<DateTime<Utc>>,
}

/// An alert step that a created usage reached for the first time in its
/// period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReached {
    pub kind: LimitKind,
    /// 75, 90 or 100 (percent of the limit).
    pub threshold: u8,
    /// The quantity limit; `None` for an amount limit (see `amount`).
    pub limit: Option<Decimal>,
    pub used: Decimal,
    pub amount: Option<AmountFigures>,
}

impl LimitReached {
    pub fn step(&self) -> AlertStep {
        AlertStep {
            kind: self.kind,
            threshold: self.threshold,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Counted in full, or clamped to what was available (`partial`).
    Created {
        quantity: Decimal,
        requested_quantity: Decimal,
        partial: bool,
        usage_time: DateTime<Utc>,
        period_start: DateTime<Utc>,
        period_end: Option<DateTime<Utc>>,
        limit: Option<LimitReport>,
        /// Limits this usage reached whose alert the period had not raised.
        alerts: Vec<LimitReached>,
    },
    /// The same request was already stored: nothing counted again.
    Duplicate { original: StoredUsage },
    Rejected {
        rejection: Rejection,
        /// For `usage_limit_exceeded`: what was available and which limit.
        limit: Option<LimitReport>,
    },
    /// A correction voided the usage; `usage` is the voided usage, with the
    /// quantity it had.
    Voided { usage: StoredUsage },
    /// A correction gave the usage a new quantity; `usage` is the usage as
    /// amended.
    Amended {
        previous_quantity: Decimal,
        /// What the amendment asked for (`usage.quantity` unless clamped).
        requested_quantity: Decimal,
        partial: bool,
        usage: StoredUsage,
        limit: Option<LimitReport>,
        /// Limits a raise reached whose alert the period had not raised.
        alerts: Vec<LimitReached>,
    },
}

/// Decides one request. `database_now` is PostgreSQL's clock, read under the
/// subscription's lock (whether a period is closed is decided by the
/// database's clock, never a worker's), `usage_time` the request's
/// effective usage time. On `Created`
/// the chosen period's `used` grows by the accepted quantity, so the next
/// request of the same batch sees it.
pub fn decide(
    req: &UsageRequest,
    usage_time: DateTime<Utc>,
    existing: Option<&StoredUsage>,
    subscription: Option<&mut SubscriptionState>,
    database_now: DateTime<Utc>,
    grace: Duration,
) -> Decision {
    let reject = |code, field: Option<&'static str>, message: String| Decision::Rejected {
        rejection: Rejection {
            code,
            message,
            field,
            invalid_fields: Vec::new(),
        },
        limit: None,
    };

    if let Some(original) = existing {
        if original.voided.is_some() {
            return reject(
                ReasonCode::UsageVoided,
                Some("id"),
                format!("usage {} was voided; its id is not used again", original.id),
            );
        }
        return if original.same_request(req) {
            Decision::Duplicate {
                original: original.clone(),
            }
        } else {
            reject(
                ReasonCode::IdempotencyConflict,
                Some("id"),
                format!("usage {} already exists with a different request", original.id),
            )
        };
    }

    let Some(sub) = subscription else {
        return reject(
            ReasonCode::SubscriptionNotFound,
            Some("subscriptionId"),
            format!("subscription {} is not known", req.subscription_id),
        );
    };
    if sub.deleted || !super::subscription::accepts_usage(&sub.status) {
        let status = if sub.deleted { "deleted" } else { sub.status.as_str() };
        return reject(
            ReasonCode::SubscriptionNotActive,
            Some("subscriptionId"),
            format!("subscription {} is {status}, not active or trial", sub.id),
        );
    }

    let Some(index) = sub.period_index_at(usage_time) else {
        return reject(
            ReasonCode::NoServicePeriod,
            Some("usageTime"),
            format!("no service period of subscription {} contains {usage_time:?}", sub.id),
        );
    };
    let period = &sub.periods[index];
    if period.is_closed(database_now, grace) {
        return reject(
            ReasonCode::PeriodClosed,
            Some("usageTime"),
            format!("the service period starting {:?} is closed for new usage", period.start),
        );
    }

    let requested = req.quantity;
    let in_trial = sub.in_trial(usage_time);
    let caps = limit_caps(sub, index, in_trial);
    let period = &sub.periods[index];
    let refusing = caps.iter().filter(|cap| refuses(cap, period, requested));
    // The binding limit: of those that refuse the request, the one that
    // leaves least; when all let it through, the one that leaves least (the
    // hard limit on a tie).
    let (quantity, binding) = match refusing.min_by_key(|cap| cap.available) {
        None => (requested, caps.iter().min_by_key(|cap| cap.available).cloned()),
        Some(cap) => {
            let fitting = if req.accept_partial {
                largest_fitting(&caps, period, requested)
            } else {
                Decimal::ZERO
            };
            if fitting < min_quantity() {
                return Decision::Rejected {
                    rejection: Rejection::on_field(
                        ReasonCode::UsageLimitExceeded,
                        "quantity",
                        refusal(cap, period, requested),
                    ),
                    limit: Some(cap.clone()),
                };
            }
            (fitting, Some(cap.clone()))
        }
    };

    let period = &mut sub.periods[index];
    period.used += quantity;
    if in_trial {
        sub.trial_used += quantity;
    }
    // The caps after this usage: the binding one's figures for the outcome,
    // and whether the hard limit is reached.
    let after = limit_caps(sub, index, in_trial);
    let alerts = reached(sub, index, in_trial, &after);
    let period = &mut sub.periods[index];
    period.alerted.extend(alerts.iter().map(LimitReached::step));
    let (start, end) = (period.start, period.end);
    let limit = binding.and_then(|cap| after.into_iter().find(|c| c.applied == cap.applied));
    Decision::Created {
        quantity,
        requested_quantity: requested,
        partial: quantity != requested,
        usage_time,
        period_start: start,
        period_end: end,
        limit,
        alerts,
    }
}

/// Why `cap` refused `requested`, in words.
fn refusal(cap: &LimitReport, period: &PeriodState, requested: Decimal) -> String {
    let limit = cap.applied.field();
    match (&cap.amount, period.amount_with(requested)) {
        (Some(figures), Some(total)) => format!(
            "quantity {requested} would bring the period's amount to {total} {currency}, over the {limit} of \
             {} {currency}; {} fits",
            figures.limit_amount,
            cap.available,
            currency = figures.currency,
        ),
        _ => format!(
            "quantity {requested} exceeds the {} available under {limit}",
            cap.available
        ),
    }
}

/// Every limit that caps a usage at this period (and in the trial), with
/// what it leaves available now.
fn limit_caps(sub: &SubscriptionState, index: usize, in_trial: bool) -> Vec<LimitReport> {
    let period = &sub.periods[index];
    let mut caps = Vec::with_capacity(2);
    match period.hard_limit {
        Some(Limit::Quantity(limit)) => caps.push(quantity_report(LimitKind::Hard, limit, period.used, period)),
        Some(Limit::Amount(limit)) => caps.push(amount_report(LimitKind::Hard, limit, period)),
        None => {}
    }
    if let (true, Some(limit)) = (in_trial, sub.trial_limit) {
        caps.push(quantity_report(LimitKind::Trial, limit, sub.trial_used, period));
    }
    caps
}

/// Whether `cap` refuses a usage of `quantity` added to `period` now. An
/// amount limit is checked at that exact total: under volume pricing a
/// larger total can fit where a smaller one does not.
fn refuses(cap: &LimitReport, period: &PeriodState, quantity: Decimal) -> bool {
    match (&cap.amount, &period.pricing) {
        (Some(figures), Some(pricing)) => pricing.amount(period.used + quantity) > figures.limit_amount,
        // An amount limit without pricing is never stored; fail closed.
        (Some(_), None) => true,
        (None, _) => quantity > cap.available,
    }
}

/// The largest multiple of 0.001, at most `requested` and every quantity
/// cap's available quantity, whose cost fits every amount limit. Quantities
/// and quantity limits have at most 3 decimal places, so without an amount
/// limit that is the smallest of them, as it is.
fn largest_fitting(caps: &[LimitReport], period: &PeriodState, requested: Decimal) -> Decimal {
    let most = caps
        .iter()
        .filter(|cap| cap.amount.is_none())
        .fold(requested, |most, cap| most.min(cap.available));
    caps.iter()
        .filter_map(|cap| cap.amount.as_ref())
        .fold(most, |most, figures| match &period.pricing {
            Some(pricing) => pricing
                .largest_fitting(period.used, most, figures.limit_amount)
                .normalize(),
            None => Decimal::ZERO,
        })
}

/// The alert steps that the period's usage (and the trial's) has reached
/// and not raised yet, lowest first: the soft limit's 75, 90 and 100 %,
/// the hard limit, the trial limit. `caps` are the period's caps as they
/// are now.
fn reached(sub: &SubscriptionState, index: usize, in_trial: bool, caps: &[LimitReport]) -> Vec<LimitReached> {
    let period = &sub.periods[index];
    let mut reached = Vec::new();
    let mut raise = |kind, threshold, limit: Limit, used| {
        let step = AlertStep { kind, threshold };
        if !period.raised(step) {
            reached.push(LimitReached {
                kind,
                threshold,
                limit: limit.quantity(),
                used,
                amount: limit
                    .amount()
                    .and_then(|limit_amount| amount_figures(limit_amount, period)),
            });
        }
    };
    if let Some(limit) = period.soft_limit {
        let (value, measure) = match limit {
            Limit::Quantity(value) => (value, Some(period.used)),
            Limit::Amount(value) => (value, period.amount_with(Decimal::ZERO)),
        };
        for threshold in AlertStep::SOFT_THRESHOLDS {
            let level = value * Decimal::from(threshold) / Decimal::ONE_HUNDRED;
            if measure.is_some_and(|measure| measure >= level) {
                raise(LimitKind::Soft, threshold, limit, period.used);
            }
        }
    }
    if let Some(limit) = period.hard_limit {
        let full = match limit {
            Limit::Quantity(value) => period.used >= value,
            // Reached when not even 0.001 more fits.
            Limit::Amount(_) => caps
                .iter()
                .any(|cap| cap.applied == LimitKind::Hard && cap.available.is_zero()),
        };
        if full {
            raise(LimitKind::Hard, 100, limit, period.used);
        }
    }
    if let (true, Some(limit)) = (in_trial, sub.trial_limit) {
        if sub.trial_used >= limit {
            raise(LimitKind::Trial, 100, Limit::Quantity(limit), sub.trial_used);
        }
    }
    reached
}

/// A quantity limit with what is used against it; never a negative
/// availability (a limit lowered below what is used leaves nothing).
fn quantity_report(kind: LimitKind, limit: Decimal, used: Decimal, period: &PeriodState) -> LimitReport {
    LimitReport {
        applied: kind,
        limit: Some(limit),
        used,
        available: (limit - used).max(Decimal::ZERO),
        amount: None,
        period_start: period.start,
        period_end: period.end,
    }
}

/// An amount limit on the period's usage: available is the largest
/// quantity whose cost still fits (0 when not even 0.001 does).
fn amount_report(kind: LimitKind, limit: Decimal, period: &PeriodState) -> LimitReport {
    let available = period
        .pricing
        .as_ref()
        .map_or(Decimal::ZERO, |p| p.largest_fitting(period.used, max_quantity(), limit))
        .normalize();
    LimitReport {
        applied: kind,
        limit: None,
        used: period.used,
        available,
        amount: amount_figures(limit, period),
        period_start: period.start,
        period_end: period.end,
    }
}

fn amount_figures(limit_amount: Decimal, period: &PeriodState) -> Option<AmountFigures> {
    let pricing = period.pricing.as_ref()?;
    Some(AmountFigures {
        limit_amount,
        used_amount: pricing.amount(period.used),
        currency: pricing.currency().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn now() -> DateTime<Utc> {
        t("2026-11-27T12:00:00Z")
    }

    fn grace() -> Duration {
        Duration::hours(1)
    }

    fn sub(hard: Option<&str>) -> SubscriptionState {
        SubscriptionState {
            id: "sub_1".into(),
            status: "active".into(),
            deleted: false,
            periods: vec![PeriodState {
                start: t("2026-11-01T00:00:00Z"),
                end: Some(t("2026-12-01T00:00:00Z")),
                hard_limit: hard.map(|h| Limit::Quantity(d(h))),
                soft_limit: None,
                pricing: None,
                used: Decimal::ZERO,
                closed_time: None,
                alerted: Vec::new(),
            }],
            trial_end_time: None,
            trial_limit: None,
            trial_used: Decimal::ZERO,
        }
    }

    fn req(quantity: &str, partial: bool) -> UsageRequest {
        UsageRequest {
            id: Some("usg_1".into()),
            subscription_id: "sub_1".into(),
            quantity: d(quantity),
            usage_time: None,
            accept_partial: partial,
        }
    }

    fn decide_now(r: &UsageRequest, s: &mut SubscriptionState) -> Decision {
        decide(r, now(), None, Some(s), now(), grace())
    }

    fn code(decision: &Decision) -> Option<ReasonCode> {
        match decision {
            Decision::Rejected { rejection, .. } => Some(rejection.code),
            _ => None,
        }
    }

    fn created_quantity(decision: &Decision) -> Decimal {
        match decision {
            Decision::Created { quantity, .. } => *quantity,
            other => panic!("expected created, got {other:?}"),
        }
    }

    #[test]
    fn creates_within_the_hard_limit_and_reports_what_is_left() {
        let mut s = sub(Some("1000"));
        let decision = decide_now(&req("12.5", false), &mut s);
        let Decision::Created {
            limit: Some(limit),
            partial,
            ..
        } = &decision
        else {
            panic!("{decision:?}")
        };
        assert!(!partial);
        assert_eq!(
            (limit.used, limit.available, limit.limit),
            (d("12.5"), d("987.5"), Some(d("1000")))
        );
        assert_eq!(s.periods[0].used, d("12.5"));
    }

    #[test]
    fn exact_decimals_fill_a_limit_to_the_last_unit() {
        let mut s = sub(Some("0.3"));
        assert_eq!(created_quantity(&decide_now(&req("0.1", false), &mut s)), d("0.1"));
        assert_eq!(created_quantity(&decide_now(&req("0.2", false), &mut s)), d("0.2"));
        assert_eq!(s.periods[0].used, d("0.3"));
        assert_eq!(
            code(&decide_now(&req("0.001", false), &mut s)),
            Some(ReasonCode::UsageLimitExceeded)
        );
    }

    #[test]
    fn rejects_over_the_limit_without_partial_and_says_what_was_available() {
        let mut s = sub(Some("10"));
        s.periods[0].used = d("7");
        let decision = decide_now(&req("5", false), &mut s);
        let Decision::Rejected {
            rejection,
            limit: Some(limit),
        } = &decision
        else {
            panic!("{decision:?}")
        };
        assert_eq!(rejection.code, ReasonCode::UsageLimitExceeded);
        assert_eq!(rejection.field, Some("quantity"));
        assert_eq!(limit.available, d("3"));
        assert_eq!(limit.applied, LimitKind::Hard);
        assert_eq!(s.periods[0].used, d("7"), "a rejection counts nothing");
    }

    #[test]
    fn clamps_to_available_when_partial_accepted() {
        let mut s = sub(Some("10"));
        s.periods[0].used = d("7.5");
        let decision = decide_now(&req("5", true), &mut s);
        let Decision::Created {
            quantity,
            requested_quantity,
            partial,
            limit,
            ..
        } = &decision
        else {
            panic!("{decision:?}")
        };
        assert_eq!((*quantity, *requested_quantity, *partial), (d("2.5"), d("5"), true));
        assert_eq!(limit.as_ref().unwrap().available, Decimal::ZERO);
        assert_eq!(s.periods[0].used, d("10"));
    }

    #[test]
    fn partial_with_nothing_left_is_rejected() {
        let mut s = sub(Some("10"));
        s.periods[0].used = d("10");
        assert_eq!(
            code(&decide_now(&req("1", true), &mut s)),
            Some(ReasonCode::UsageLimitExceeded)
        );
    }

    #[test]
    fn a_limit_lowered_below_usage_leaves_zero_not_negative() {
        let mut s = sub(Some("5"));
        s.periods[0].used = d("8");
        let decision = decide_now(&req("1", false), &mut s);
        let Decision::Rejected { limit: Some(limit), .. } = decision else {
            panic!()
        };
        assert_eq!(limit.available, Decimal::ZERO);
    }

    #[test]
    fn no_hard_limit_means_no_cap() {
        let mut s = sub(None);
        assert_eq!(
            created_quantity(&decide_now(&req("999999999999.999", false), &mut s)),
            d("999999999999.999")
        );
    }

    #[test]
    fn unknown_subscription_is_not_found() {
        let decision = decide(&req("1", false), now(), None, None, now(), grace());
        assert_eq!(code(&decision), Some(ReasonCode::SubscriptionNotFound));
    }

    #[test]
    fn only_active_and_trial_subscriptions_accept_usage() {
        for (status, accepted) in [
            ("active", true),
            ("trial", true),
            ("paused", false),
            ("cancelled", false),
        ] {
            let mut s = sub(None);
            s.status = status.into();
            let decision = decide_now(&req("1", false), &mut s);
            assert_eq!(code(&decision).is_none(), accepted, "{status}");
            if !accepted {
                assert_eq!(code(&decision), Some(ReasonCode::SubscriptionNotActive));
            }
        }
        let mut s = sub(None);
        s.deleted = true;
        assert_eq!(
            code(&decide_now(&req("1", false), &mut s)),
            Some(ReasonCode::SubscriptionNotActive)
        );
    }

    #[test]
    fn usage_outside_every_period_has_no_service_period() {
        let mut s = sub(None);
        let decision = decide(
            &req("1", false),
            t("2026-10-31T23:59:59Z"),
            None,
            Some(&mut s),
            now(),
            grace(),
        );
        assert_eq!(code(&decision), Some(ReasonCode::NoServicePeriod));
        let decision = decide(
            &req("1", false),
            t("2026-12-01T00:00:00Z"),
            None,
            Some(&mut s),
            now(),
            grace(),
        );
        assert_eq!(
            code(&decision),
            Some(ReasonCode::NoServicePeriod),
            "periods are half-open"
        );
    }

    #[test]
    fn a_period_closes_at_its_end_plus_grace() {
        let mut s = sub(None);
        let usage_time = t("2026-11-30T23:00:00Z");
        let within_grace = t("2026-12-01T00:59:59Z");
        let after_grace = t("2026-12-01T01:00:00Z");
        let r = req("1", false);
        assert_eq!(
            code(&decide(&r, usage_time, None, Some(&mut s), within_grace, grace())),
            None
        );
        assert_eq!(
            code(&decide(&r, usage_time, None, Some(&mut s), after_grace, grace())),
            Some(ReasonCode::PeriodClosed)
        );
    }

    #[test]
    fn a_period_closed_early_rejects_usage() {
        let mut s = sub(None);
        s.periods[0].closed_time = Some(t("2026-11-20T00:00:00Z"));
        assert_eq!(
            code(&decide_now(&req("1", false), &mut s)),
            Some(ReasonCode::PeriodClosed)
        );
    }

    #[test]
    fn the_open_ended_period_takes_any_time_before_the_first_real_one() {
        let mut s = sub(Some("100"));
        s.periods[0] = PeriodState {
            start: open_period_start(),
            end: None,
            hard_limit: Some(Limit::Quantity(d("100"))),
            soft_limit: None,
            pricing: None,
            used: Decimal::ZERO,
            closed_time: None,
            alerted: Vec::new(),
        };
        assert!(matches!(
            decide(
                &req("1", false),
                t("1999-01-01T00:00:00Z"),
                None,
                Some(&mut s),
                now(),
                grace()
            ),
            Decision::Created { .. }
        ));
    }

    #[test]
    fn usage_counts_against_the_period_containing_its_time() {
        let mut s = sub(Some("10"));
        s.periods.push(PeriodState {
            start: t("2026-12-01T00:00:00Z"),
            end: Some(t("2027-01-01T00:00:00Z")),
            hard_limit: Some(Limit::Quantity(d("10"))),
            soft_limit: None,
            pricing: None,
            used: Decimal::ZERO,
            closed_time: None,
            alerted: Vec::new(),
        });
        s.periods[0].used = d("10");
        let december = t("2026-12-02T00:00:00Z");
        let decision = decide(&req("4", false), december, None, Some(&mut s), december, grace());
        assert_eq!(created_quantity(&decision), d("4"));
        assert_eq!(s.periods[1].used, d("4"));
    }

    fn stored(r: &UsageRequest) -> StoredUsage {
        StoredUsage {
            id: r.id.clone().unwrap(),
            subscription_id: r.subscription_id.clone(),
            quantity: r.quantity,
            requested_quantity: r.quantity,
            accept_partial: r.accept_partial,
            usage_time: now(),
            invoice_id: None,
            invoice_item_id: None,
            created_time: now(),
            updated_time: now(),
            period_start: t("2026-11-01T00:00:00Z"),
            last_requested_quantity: None,
            voided: None,
        }
    }

    #[test]
    fn the_same_request_again_is_a_duplicate_and_counts_nothing() {
        let mut s = sub(Some("10"));
        let r = req("1.50", false);
        let original = stored(&req("1.5", false));
        let decision = decide(&r, now(), Some(&original), Some(&mut s), now(), grace());
        assert!(matches!(decision, Decision::Duplicate { .. }), "{decision:?}");
        assert_eq!(s.periods[0].used, Decimal::ZERO);
    }

    #[test]
    fn the_same_id_with_a_different_request_is_a_conflict() {
        let original = stored(&req("1", false));
        let mut variants = vec![req("2", false), req("1", true)];
        let mut other_sub = req("1", false);
        other_sub.subscription_id = "sub_2".into();
        variants.push(other_sub);
        let mut other_time = req("1", false);
        other_time.usage_time = Some(t("2026-11-27T11:00:00Z"));
        variants.push(other_time);
        for r in variants {
            let decision = decide(&r, now(), Some(&original), None, now(), grace());
            assert_eq!(code(&decision), Some(ReasonCode::IdempotencyConflict), "{r:?}");
        }
    }

    #[test]
    fn usage_time_is_compared_only_when_the_request_gave_one() {
        let original = stored(&req("1", false));
        let mut same_instant = req("1", false);
        same_instant.usage_time = Some(
            DateTime::parse_from_rfc3339("2026-11-27T13:00:00+01:00")
                .unwrap()
                .with_timezone(&Utc),
        );
        assert!(original.same_request(&same_instant));
        assert!(original.same_request(&req("1", false)));
    }

    fn trial_sub(trial_limit: &str, hard: Option<&str>) -> SubscriptionState {
        let mut s = sub(hard);
        s.trial_end_time = Some(t("2026-11-20T00:00:00Z"));
        s.trial_limit = Some(d(trial_limit));
        s
    }

    #[test]
    fn the_trial_limit_caps_usage_before_the_trial_end_only() {
        let mut s = trial_sub("2", Some("100"));
        let in_trial = t("2026-11-10T00:00:00Z");
        let decision = decide(&req("3", true), in_trial, None, Some(&mut s), now(), grace());
        let Decision::Created {
            quantity,
            limit: Some(limit),
            ..
        } = &decision
        else {
            panic!("{decision:?}")
        };
        assert_eq!((*quantity, limit.applied), (d("2"), LimitKind::Trial));
        assert_eq!(s.trial_used, d("2"));
        let after_trial = t("2026-11-25T00:00:00Z");
        assert_eq!(
            created_quantity(&decide(
                &req("3", false),
                after_trial,
                None,
                Some(&mut s),
                now(),
                grace()
            )),
            d("3")
        );
        assert_eq!(s.trial_used, d("2"), "usage after the trial does not count against it");
        assert_eq!(s.periods[0].used, d("5"), "both count against the period");
    }

    #[test]
    fn the_smallest_available_limit_applies() {
        let mut s = trial_sub("50", Some("10"));
        let decision = decide(
            &req("20", false),
            t("2026-11-10T00:00:00Z"),
            None,
            Some(&mut s),
            now(),
            grace(),
        );
        let Decision::Rejected { limit: Some(limit), .. } = decision else {
            panic!()
        };
        assert_eq!((limit.applied, limit.available), (LimitKind::Hard, d("10")));
    }

    #[test]
    fn jumping_past_the_soft_limit_raises_every_step_lowest_first_and_caps_nothing() {
        let mut s = sub(None);
        s.periods[0].soft_limit = Some(Limit::Quantity(d("5")));
        let first = decide_now(&req("6", false), &mut s);
        let Decision::Created { alerts, .. } = &first else {
            panic!()
        };
        assert_eq!(
            alerts,
            &[75, 90, 100].map(|threshold| LimitReached {
                kind: LimitKind::Soft,
                threshold,
                limit: Some(d("5")),
                used: d("6"),
                amount: None,
            })
        );
        let second = decide_now(&req("6", false), &mut s);
        let Decision::Created { alerts, .. } = &second else {
            panic!()
        };
        assert!(alerts.is_empty(), "once per period");
    }

    #[test]
    fn filling_the_hard_limit_exactly_raises_the_hard_alert() {
        let mut s = sub(Some("4"));
        let Decision::Created { alerts, .. } = decide_now(&req("3", false), &mut s) else {
            panic!()
        };
        assert!(alerts.is_empty());
        let Decision::Created { alerts, partial, .. } = decide_now(&req("3", true), &mut s) else {
            panic!()
        };
        assert!(partial);
        assert_eq!(alerts.iter().map(|a| a.kind).collect::<Vec<_>>(), [LimitKind::Hard]);
    }

    // ---- Amount limits and soft-limit steps (SPEC version 2) ----------------

    use crate::domain::pricing::{Bracket, Formula};

    fn priced(kind: fn(Vec<Bracket>) -> Formula) -> Arc<Pricing> {
        Arc::new(crate::domain::pricing::tests::example(kind))
    }

    /// A subscription whose hard limit is `amount` under `pricing`.
    fn amount_capped(amount: &str, pricing: Arc<Pricing>) -> SubscriptionState {
        let mut s = sub(None);
        s.periods[0].hard_limit = Some(Limit::Amount(d(amount)));
        s.periods[0].pricing = Some(pricing);
        s
    }

    fn outcome_limit(decision: &Decision) -> LimitReport {
        match decision {
            Decision::Created { limit: Some(l), .. } | Decision::Rejected { limit: Some(l), .. } => l.clone(),
            other => panic!("expected a limit report, got {other:?}"),
        }
    }

    fn alert_steps(decision: &Decision) -> Vec<(LimitKind, u8)> {
        match decision {
            Decision::Created { alerts, .. } => alerts.iter().map(|a| (a.kind, a.threshold)).collect(),
            other => panic!("expected created, got {other:?}"),
        }
    }

    #[test]
    fn an_amount_limit_lets_through_what_it_can_pay_for() {
        // Tiered: 100 cost 50, then 0.4 each; a limit of 60 buys 125.
        let mut s = amount_capped("60", priced(Formula::Tiered));
        let first = decide_now(&req("100", false), &mut s);
        assert_eq!(created_quantity(&first), d("100"));
        let report = outcome_limit(&first);
        assert_eq!((report.applied, report.limit), (LimitKind::Hard, None));
        assert_eq!(report.available, d("25"), "10 more buys 25 units at 0.4");
        assert_eq!(
            report.amount,
            Some(AmountFigures {
                limit_amount: d("60"),
                used_amount: d("50"),
                currency: "USD".into(),
            })
        );

        let refused = decide_now(&req("25.001", false), &mut s);
        assert_eq!(code(&refused), Some(ReasonCode::UsageLimitExceeded));
        let Decision::Rejected { rejection, .. } = &refused else {
            panic!()
        };
        assert_eq!(
            rejection.message,
            "quantity 25.001 would bring the period's amount to 60.0004 USD, over the hardLimit of 60 USD; 25 fits"
        );
        assert_eq!(outcome_limit(&refused).available, d("25"));
        assert_eq!(s.periods[0].used, d("100"), "a refusal counts nothing");

        let clamped = decide_now(&req("30", true), &mut s);
        assert_eq!(
            created_quantity(&clamped),
            d("25"),
            "the largest quantity that fits, exactly"
        );
        let report = outcome_limit(&clamped);
        assert_eq!(report.available, Decimal::ZERO);
        assert_eq!(report.amount.unwrap().used_amount, d("60"));
        assert_eq!(alert_steps(&clamped), [(LimitKind::Hard, 100)]);
    }

    #[test]
    fn a_partial_amount_fit_is_a_whole_number_of_thousandths() {
        // 10 / 3 = 3.333…: 3.333 fits, 3.334 would cost 10.002.
        let flat = Arc::new(Pricing::new("USD", Formula::FlatRate { price: d("3") }).unwrap());
        let mut s = amount_capped("10", flat);
        assert_eq!(created_quantity(&decide_now(&req("5", true), &mut s)), d("3.333"));
        // 0.001 more would cost 10.002: the limit is reached, nothing fits.
        assert_eq!(
            code(&decide_now(&req("0.001", true), &mut s)),
            Some(ReasonCode::UsageLimitExceeded)
        );
    }

    #[test]
    fn under_volume_pricing_a_larger_usage_can_fit_where_a_smaller_does_not() {
        // 90 used cost 45, over a limit of 42; reaching 105 (the 0.4
        // bracket) costs 42 again.
        let mut s = amount_capped("42", priced(Formula::Volume));
        s.periods[0].used = d("90");
        assert_eq!(
            code(&decide_now(&req("5", false), &mut s)),
            Some(ReasonCode::UsageLimitExceeded)
        );
        assert_eq!(created_quantity(&decide_now(&req("15", false), &mut s)), d("15"));
        assert_eq!(s.periods[0].used, d("105"));
    }

    #[test]
    fn the_smallest_of_a_quantity_and_an_amount_limit_binds() {
        // Trial quantity limit 20 beside an amount hard limit that buys 125.
        let mut s = amount_capped("60", priced(Formula::Tiered));
        s.trial_end_time = Some(t("2026-12-01T00:00:00Z"));
        s.trial_limit = Some(d("20"));
        let clamped = decide_now(&req("30", true), &mut s);
        assert_eq!(created_quantity(&clamped), d("20"));
        assert_eq!(outcome_limit(&clamped).applied, LimitKind::Trial);
        let refused = decide_now(&req("1", false), &mut s);
        assert_eq!(outcome_limit(&refused).applied, LimitKind::Trial);
    }

    #[test]
    fn an_amount_limit_reports_every_quantity_as_available_when_usage_is_free() {
        let free = Arc::new(Pricing::new("USD", Formula::FlatRate { price: Decimal::ZERO }).unwrap());
        let mut s = amount_capped("0", free);
        let decision = decide_now(&req("1000", false), &mut s);
        assert_eq!(created_quantity(&decision), d("1000"));
        assert_eq!(outcome_limit(&decision).available, max_quantity());
        assert!(
            alert_steps(&decision).is_empty(),
            "a free plan never reaches its amount"
        );
    }

    #[test]
    fn soft_steps_fire_once_each_lowest_first() {
        let mut s = sub(None);
        s.periods[0].soft_limit = Some(Limit::Quantity(d("100")));
        assert!(alert_steps(&decide_now(&req("74.999", false), &mut s)).is_empty());
        let at_75 = decide_now(&req("0.001", false), &mut s);
        assert_eq!(alert_steps(&at_75), [(LimitKind::Soft, 75)]);
        assert!(alert_steps(&decide_now(&req("1", false), &mut s)).is_empty());
        // 76 → 101: past 90 and 100 at once.
        let jump = decide_now(&req("25", false), &mut s);
        assert_eq!(alert_steps(&jump), [(LimitKind::Soft, 90), (LimitKind::Soft, 100)]);
        let Decision::Created { alerts, .. } = &jump else {
            panic!()
        };
        assert_eq!((alerts[0].limit, alerts[0].used), (Some(d("100")), d("101")));
        assert!(alert_steps(&decide_now(&req("50", false), &mut s)).is_empty());
        assert_eq!(
            s.periods[0].alerted,
            [75, 90, 100].map(|threshold| AlertStep {
                kind: LimitKind::Soft,
                threshold
            })
        );
    }

    #[test]
    fn a_soft_step_below_one_already_raised_is_not_raised_later() {
        // Version 1 raised the soft alert at 100 % only.
        let mut s = sub(None);
        s.periods[0].soft_limit = Some(Limit::Quantity(d("10")));
        s.periods[0].alerted = vec![AlertStep::full(LimitKind::Soft)];
        assert!(alert_steps(&decide_now(&req("20", false), &mut s)).is_empty());
    }

    #[test]
    fn a_soft_amount_limit_steps_on_the_amount() {
        // Tiered, soft limit 40: 75 % at 30 (60 units), 90 % at 36 (72).
        let mut s = sub(None);
        s.periods[0].soft_limit = Some(Limit::Amount(d("40")));
        s.periods[0].pricing = Some(priced(Formula::Tiered));
        assert!(alert_steps(&decide_now(&req("59.999", false), &mut s)).is_empty());
        let at_75 = decide_now(&req("0.001", false), &mut s);
        assert_eq!(alert_steps(&at_75), [(LimitKind::Soft, 75)]);
        let Decision::Created { alerts, .. } = &at_75 else {
            panic!()
        };
        assert_eq!(alerts[0].limit, None);
        assert_eq!(
            alerts[0].amount,
            Some(AmountFigures {
                limit_amount: d("40"),
                used_amount: d("30"),
                currency: "USD".into(),
            })
        );
        let Decision::Created { limit, .. } = at_75 else {
            panic!()
        };
        assert_eq!(limit, None, "a soft limit never binds");
        assert_eq!(
            alert_steps(&decide_now(&req("100", false), &mut s)),
            [(LimitKind::Soft, 90), (LimitKind::Soft, 100)]
        );
    }

    #[test]
    fn alert_steps_are_stored_as_version_1_spelled_them_at_100() {
        for (text, step) in [
            ("soft", AlertStep::full(LimitKind::Soft)),
            ("hard", AlertStep::full(LimitKind::Hard)),
            (
                "soft:75",
                AlertStep {
                    kind: LimitKind::Soft,
                    threshold: 75,
                },
            ),
        ] {
            assert_eq!(step.stored(), text);
            assert_eq!(AlertStep::parse(text), Some(step));
        }
        assert_eq!(AlertStep::parse("soft:x"), None);
        assert_eq!(AlertStep::parse("other"), None);
    }
}
