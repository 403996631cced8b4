//! The usage status of a subscription (SPEC version 2, `GET
//! /subscriptions/{id}/usage`): for the period holding an instant, what is
//! used, what the limits are, what is still available and which limits are
//! reached. Pure: the store loads the subscription as committed.

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::decision::{max_quantity, PeriodState, SubscriptionState};
use super::outcome::{period_start_of, serialize_decimal, serialize_opt_decimal, serialize_opt_time, Exact};
use super::subscription::Limit;

/// The answer of `GET /subscriptions/{id}/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    pub subscription_id: String,
    pub period: PeriodStatus,
    #[serde(serialize_with = "serialize_decimal")]
    pub used_quantity: Decimal,
    /// What the period's total costs; `None` without pricing.
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub used_amount: Option<Decimal>,
    pub currency: Option<String>,
    pub limits: LimitsView,
    pub available: Available,
    pub is_soft_limit_reached: bool,
    pub is_hard_limit_reached: bool,
    pub is_trial_limit_reached: bool,
    pub trial: Option<TrialStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeriodStatus {
    /// `None` for the open-ended period of a subscription that never named one.
    #[serde(serialize_with = "serialize_opt_time")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "serialize_opt_time")]
    pub end_time: Option<DateTime<Utc>>,
    /// Closed for new usage: past its end plus the grace time, or invoiced.
    pub closed: bool,
    pub invoice_id: Option<String>,
}

/// The limits as the snapshot gave them: `{"quantity": n}` or
/// `{"amount": n}`, the trial limit a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitsView {
    #[serde(serialize_with = "serialize_limit")]
    pub hard_limit: Option<Limit>,
    #[serde(serialize_with = "serialize_limit")]
    pub soft_limit: Option<Limit>,
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub trial_limit: Option<Decimal>,
}

/// What more the period takes: `quantity` under every limit that caps it
/// (`None`: no cap), `amount` under the hard amount limit (`None`: none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Available {
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub quantity: Option<Decimal>,
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub amount: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrialStatus {
    #[serde(serialize_with = "super::outcome::serialize_time")]
    pub end_time: DateTime<Utc>,
    #[serde(serialize_with = "serialize_decimal")]
    pub used: Decimal,
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub limit: Option<Decimal>,
}

fn serialize_limit<S: Serializer>(limit: &Option<Limit>, s: S) -> Result<S::Ok, S::Error> {
    let Some(limit) = limit else {
        return s.serialize_none();
    };
    let mut map = s.serialize_map(Some(1))?;
    match limit {
        Limit::Quantity(quantity) => map.serialize_entry("quantity", &Exact(*quantity))?,
        Limit::Amount(amount) => map.serialize_entry("amount", &Exact(*amount))?,
    }
    map.end()
}

/// No known period of the subscription holds the instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoServicePeriod;

/// The status at `at` of a subscription as loaded; `database_now` decides
/// whether the period is closed, as it does for a decision. `invoice_id` is
/// the invoice that billed the period, if any.
pub fn usage_status(
    sub: &SubscriptionState,
    at: DateTime<Utc>,
    database_now: DateTime<Utc>,
    grace: Duration,
    invoice_id: impl FnOnce(&PeriodState) -> Option<String>,
) -> Result<UsageStatus, NoServicePeriod> {
    let index = sub.period_index_at(at).ok_or(NoServicePeriod)?;
    let period = &sub.periods[index];
    let pricing = period.pricing.as_deref();
    let used_amount = pricing.map(|p| p.amount(period.used));

    let mut quantity: Option<Decimal> = None;
    let mut cap = |left: Decimal| quantity = Some(quantity.map_or(left, |q: Decimal| q.min(left)));
    let mut amount = None;
    let mut hard_reached = false;
    match period.hard_limit {
        Some(Limit::Quantity(limit)) => {
            cap((limit - period.used).max(Decimal::ZERO));
            hard_reached = period.used >= limit;
        }
        Some(Limit::Amount(limit)) => {
            // Stored only with pricing; without it nothing fits.
            let fitting = pricing.map_or(Decimal::ZERO, |p| p.largest_fitting(period.used, max_quantity(), limit));
            cap(fitting);
            amount = Some((limit - used_amount.unwrap_or_default()).max(Decimal::ZERO));
            hard_reached = fitting.is_zero();
        }
        None => {}
    }
    let in_trial = sub.trial_end_time.is_some_and(|end| at < end);
    let trial_reached = sub.trial_limit.is_some_and(|limit| sub.trial_used >= limit);
    if let (true, Some(limit)) = (in_trial, sub.trial_limit) {
        cap((limit - sub.trial_used).max(Decimal::ZERO));
    }
    let soft_reached = match period.soft_limit {
        Some(Limit::Quantity(limit)) => period.used >= limit,
        Some(Limit::Amount(limit)) => used_amount.is_some_and(|used| used >= limit),
        None => false,
    };

    Ok(UsageStatus {
        subscription_id: sub.id.clone(),
        period: PeriodStatus {
            start_time: period_start_of(period.start),
            end_time: period.end,
            closed: period.is_closed(database_now, grace),
            invoice_id: invoice_id(period),
        },
        used_quantity: period.used,
        used_amount,
        currency: pricing.map(|p| p.currency().to_owned()),
        limits: LimitsView {
            hard_limit: period.hard_limit,
            soft_limit: period.soft_limit,
            trial_limit: sub.trial_limit,
        },
        available: Available { quantity, amount },
        is_soft_limit_reached: soft_reached,
        is_hard_limit_reached: hard_reached,
        is_trial_limit_reached: trial_reached,
        trial: sub.trial_end_time.map(|end_time| TrialStatus {
            end_time,
            used: sub.trial_used,
            limit: sub.trial_limit,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Arc;

    use super::*;
    use crate::domain::decision::open_period_start;
    use crate::domain::pricing::{Formula, Pricing};

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn tiered() -> Arc<Pricing> {
        Arc::new(crate::domain::pricing::tests::example(Formula::Tiered))
    }

    fn subscription() -> SubscriptionState {
        let mut period = PeriodState::new(t("2026-11-01T00:00:00Z"), Some(t("2026-12-01T00:00:00Z")));
        period.hard_limit = Some(Limit::Amount(d("60")));
        period.soft_limit = Some(Limit::Quantity(d("100")));
        period.pricing = Some(tiered());
        period.used = d("110");
        SubscriptionState {
            id: "sub_1".into(),
            status: "active".into(),
            deleted: false,
            periods: vec![period],
            trial_end_time: Some(t("2026-11-10T00:00:00Z")),
            trial_limit: Some(d("200")),
            trial_used: d("195"),
        }
    }

    fn status_at(sub: &SubscriptionState, at: &str) -> Result<UsageStatus, NoServicePeriod> {
        usage_status(sub, t(at), t("2026-11-20T00:00:00Z"), Duration::hours(1), |_| None)
    }

    #[test]
    fn reports_amounts_what_is_left_and_which_limits_are_reached() {
        let status = status_at(&subscription(), "2026-11-20T00:00:00Z").unwrap();
        assert_eq!(status.used_quantity, d("110"));
        assert_eq!(status.used_amount, Some(d("54")), "100 × 0.5 + 10 × 0.4");
        assert_eq!(status.currency.as_deref(), Some("USD"));
        assert_eq!(status.available.amount, Some(d("6")));
        assert_eq!(status.available.quantity, Some(d("15")), "6 more buys 15 at 0.4");
        assert!(status.is_soft_limit_reached);
        assert!(!status.is_hard_limit_reached);
        assert!(!status.is_trial_limit_reached);
        assert!(!status.period.closed);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["limits"]["hardLimit"], serde_json::json!({"amount": 60}));
        assert_eq!(json["limits"]["softLimit"], serde_json::json!({"quantity": 100}));
        assert_eq!(json["limits"]["trialLimit"], serde_json::json!(200));
        assert_eq!(json["trial"]["used"], serde_json::json!(195));
        assert_eq!(json["period"]["startTime"], "2026-11-01T00:00:00.000Z");
    }

    #[test]
    fn inside_the_trial_its_limit_caps_what_is_available_too() {
        let status = status_at(&subscription(), "2026-11-05T00:00:00Z").unwrap();
        assert_eq!(status.available.quantity, Some(d("5")));
    }

    #[test]
    fn a_hard_amount_limit_is_reached_when_not_even_a_thousandth_fits() {
        let mut sub = subscription();
        sub.periods[0].used = d("125");
        let status = status_at(&sub, "2026-11-20T00:00:00Z").unwrap();
        assert_eq!(
            status.available,
            Available {
                quantity: Some(Decimal::ZERO),
                amount: Some(Decimal::ZERO),
            }
        );
        assert!(status.is_hard_limit_reached);
    }

    #[test]
    fn without_limits_nothing_is_capped_or_reached() {
        let mut sub = subscription();
        sub.trial_end_time = None;
        sub.trial_limit = None;
        sub.periods = vec![PeriodState::new(open_period_start(), None)];
        let status = status_at(&sub, "2030-01-01T00:00:00Z").unwrap();
        assert_eq!((status.available.quantity, status.available.amount), (None, None));
        assert_eq!((status.used_amount, status.currency.as_deref()), (None, None));
        assert!(!status.is_soft_limit_reached && !status.is_hard_limit_reached && !status.is_trial_limit_reached);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["period"]["startTime"],
            serde_json::Value::Null,
            "the open-ended period"
        );
        assert_eq!(json["trial"], serde_json::Value::Null);
    }

    #[test]
    fn a_closed_period_says_so_and_an_instant_outside_every_period_is_an_error() {
        let sub = subscription();
        assert_eq!(status_at(&sub, "2026-12-01T00:00:00Z"), Err(NoServicePeriod));
        let closed = usage_status(
            &sub,
            t("2026-11-20T00:00:00Z"),
            t("2026-12-01T01:00:00Z"),
            Duration::hours(1),
            |_| Some("inv_1".into()),
        )
        .unwrap();
        assert!(closed.period.closed);
        assert_eq!(closed.period.invoice_id.as_deref(), Some("inv_1"));
    }
}
