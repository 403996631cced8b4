//! Closed periods, for invoicing (SPEC version 2): when a period closes,
//! exactly one `usage-period-closed` record goes to `usage-periods` with the
//! period's totals and digest; an invoice that bills a period closed before
//! it adds one `usage-period-invoiced` record with the same totals.
//!
//! Pure: how a period closed (by its end plus grace, or by an invoice,
//! whichever came first), its totals from its usages, the records and their
//! wire format. The store decides when, under the subscription's lock.

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::decision::open_period_start;
use super::digest::period_digest;
use super::headers::Headers;
use super::outcome::{period_start_of, serialize_decimal, serialize_opt_decimal, serialize_opt_time, serialize_time};
use super::pricing::Pricing;

/// The two records of `usage-periods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PeriodRecordKind {
    #[serde(rename = "usage-period-closed")]
    Closed,
    #[serde(rename = "usage-period-invoiced")]
    Invoiced,
}

impl PeriodRecordKind {
    pub const ALL: [Self; 2] = [Self::Closed, Self::Invoiced];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "usage-period-closed",
            Self::Invoiced => "usage-period-invoiced",
        }
    }
}

/// What closed a period first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    /// Its end plus the grace time passed.
    Grace,
    /// An invoice was issued for it before that.
    Invoice,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grace => "grace",
            Self::Invoice => "invoice",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "grace" => Some(Self::Grace),
            "invoice" => Some(Self::Invoice),
            _ => None,
        }
    }
}

/// How and when a period closed for new usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    pub by: ClosedBy,
    pub time: DateTime<Utc>,
}

/// How a period closed by `now`, if it did: at its end plus `grace` (once
/// that has passed by the database's clock), or when an invoice closed it
/// (`invoice_closed`), whichever came first; a tie goes to the grace time.
/// The same rule a decision applies ([`super::decision::PeriodState::is_closed`]),
/// so the record, the HTTP API and the decisions agree on the instant, and
/// the record does not depend on whether the sweep or the invoice got to
/// the period first. The open-ended period (no `end`) closes only by an
/// invoice.
pub fn closing(
    end: Option<DateTime<Utc>>,
    grace: Duration,
    invoice_closed: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Closing> {
    let by_grace = end.map(|end| end + grace).filter(|at| *at <= now);
    match (by_grace, invoice_closed) {
        (Some(grace_at), Some(invoice_at)) if invoice_at < grace_at => Some(Closing {
            by: ClosedBy::Invoice,
            time: invoice_at,
        }),
        (Some(grace_at), _) => Some(Closing {
            by: ClosedBy::Grace,
            time: grace_at,
        }),
        (None, Some(invoice_at)) => Some(Closing {
            by: ClosedBy::Invoice,
            time: invoice_at,
        }),
        (None, None) => None,
    }
}

/// A period's totals: what counts (usages not voided) and the digest of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodTotals {
    pub usage_count: u64,
    pub quantity: Decimal,
    pub voided_count: u64,
    /// `sha256:<hex>` over the counting usages (see [`period_digest`]).
    pub digest: String,
}

impl PeriodTotals {
    /// The totals of a period's usages, given in any order as `(id,
    /// quantity, voided)`.
    pub fn of<'a>(usages: impl IntoIterator<Item = (&'a str, Decimal, bool)>) -> Self {
        let mut counting = Vec::new();
        let mut voided_count = 0;
        for (id, quantity, voided) in usages {
            if voided {
                voided_count += 1;
            } else {
                counting.push((id, quantity));
            }
        }
        Self {
            usage_count: counting.len() as u64,
            quantity: counting.iter().map(|(_, q)| *q).sum(),
            voided_count,
            digest: period_digest(counting),
        }
    }
}

/// A record on `usage-periods`. Its body is exactly SPEC's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeriodRecord {
    #[serde(rename = "type")]
    pub kind: PeriodRecordKind,
    pub subscription_id: String,
    /// `None` for the open-ended period of a subscription that never named
    /// one (a later period's start gave it its end).
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_start_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "serialize_time")]
    pub period_end_time: DateTime<Utc>,
    #[serde(serialize_with = "serialize_time")]
    pub closed_time: DateTime<Utc>,
    pub closed_by: ClosedBy,
    pub invoice_id: Option<String>,
    pub usage_count: u64,
    #[serde(serialize_with = "serialize_decimal")]
    pub quantity: Decimal,
    /// What `quantity` costs under the period's pricing; `None` without.
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    pub voided_count: u64,
    pub digest: String,
}

/// `pr_` + a hash of the subscription, the period's stored start and the
/// record's type: at most one record of each is ever made, so consumers
/// drop a broker's repeat by it.
pub fn period_record_id(subscription_id: &str, period_start: DateTime<Utc>, kind: PeriodRecordKind) -> String {
    let key = format!(
        "{subscription_id}\u{0}{}\u{0}{}",
        period_start.timestamp_micros(),
        kind.as_str()
    );
    let hash = Sha256::digest(key.as_bytes());
    format!(
        "pr_{}",
        hash.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// A period as the store knows it when a record is made of it.
#[derive(Debug, Clone)]
pub struct ClosedPeriod<'a> {
    pub subscription_id: &'a str,
    /// The stored start (`open_period_start()` for the open-ended period).
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub closing: Closing,
    pub pricing: Option<&'a Pricing>,
}

impl PeriodRecord {
    /// The record that a period closed: `invoice_id` is the invoice that
    /// closed it (only with [`ClosedBy::Invoice`]).
    pub fn closed(period: &ClosedPeriod<'_>, totals: &PeriodTotals, invoice_id: Option<&str>) -> Self {
        let invoice_id = match period.closing.by {
            ClosedBy::Invoice => invoice_id.map(str::to_owned),
            ClosedBy::Grace => None,
        };
        Self::new(PeriodRecordKind::Closed, period, totals, invoice_id)
    }

    /// The record that an invoice billed a period closed before it.
    pub fn invoiced(period: &ClosedPeriod<'_>, totals: &PeriodTotals, invoice_id: &str) -> Self {
        Self::new(PeriodRecordKind::Invoiced, period, totals, Some(invoice_id.to_owned()))
    }

    fn new(
        kind: PeriodRecordKind,
        period: &ClosedPeriod<'_>,
        totals: &PeriodTotals,
        invoice_id: Option<String>,
    ) -> Self {
        Self {
            kind,
            subscription_id: period.subscription_id.to_owned(),
            period_start_time: period_start_of(period.start),
            period_end_time: period.end,
            closed_time: period.closing.time,
            closed_by: period.closing.by,
            invoice_id,
            usage_count: totals.usage_count,
            quantity: totals.quantity,
            amount: period.pricing.map(|p| p.amount(totals.quantity)),
            currency: period.pricing.map(|p| p.currency().to_owned()),
            voided_count: totals.voided_count,
            digest: totals.digest.clone(),
        }
    }

    /// Stable per subscription, period and type: see [`period_record_id`].
    pub fn record_id(&self) -> String {
        let start = self.period_start_time.unwrap_or_else(open_period_start);
        period_record_id(&self.subscription_id, start, self.kind)
    }

    /// Headers besides `outbox-seq` (added when it is published).
    pub fn headers(&self) -> Headers {
        [("record-id", self.record_id()), ("type", self.kind.as_str().to_owned())]
            .into_iter()
            .collect()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a period record serializes")
    }
}

/// A period as stored, for the records and the listing.
#[derive(Debug, Clone)]
pub struct StoredPeriod {
    pub subscription_id: String,
    /// `open_period_start()` for the open-ended period.
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
    /// When an invoice closed it, if one did.
    pub invoice_closed: Option<DateTime<Utc>>,
    /// The invoice that billed it.
    pub invoice_id: Option<String>,
    /// How it closed, as its closing record says; `None` until that record
    /// is written.
    pub recorded: Option<Closing>,
    pub pricing: Option<std::sync::Arc<Pricing>>,
}

impl StoredPeriod {
    /// How it closed: as recorded, else by the rule at `now` (what its
    /// record will say).
    pub fn closing(&self, grace: Duration, now: DateTime<Utc>) -> Option<Closing> {
        self.recorded
            .or_else(|| closing(self.end, grace, self.invoice_closed, now))
    }

    /// The period for a record, closed as `closing` says; `None` for the
    /// open-ended period, which gets no record until it has an end.
    pub fn closed(&self, closing: Closing) -> Option<ClosedPeriod<'_>> {
        Some(ClosedPeriod {
            subscription_id: &self.subscription_id,
            start: self.start,
            end: self.end?,
            closing,
            pricing: self.pricing.as_deref(),
        })
    }
}

/// Where a period stands, for `GET /subscriptions/{id}/periods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodStanding {
    /// Takes usage.
    Open,
    /// Closed for new usage (by its end plus grace, or by an invoice), not
    /// yet billed by an invoice.
    Closed,
    /// An invoice billed it (it is closed too).
    Invoiced,
}

/// One period of `GET /subscriptions/{id}/periods`: where it stands and
/// its totals as committed (for an open period, so far).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeriodSummary {
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_start_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_end_time: Option<DateTime<Utc>>,
    pub state: PeriodStanding,
    #[serde(serialize_with = "serialize_opt_time")]
    pub closed_time: Option<DateTime<Utc>>,
    pub closed_by: Option<ClosedBy>,
    pub invoice_id: Option<String>,
    pub usage_count: u64,
    #[serde(serialize_with = "serialize_decimal")]
    pub quantity: Decimal,
    #[serde(serialize_with = "serialize_opt_decimal")]
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    pub voided_count: u64,
    pub digest: String,
}

impl PeriodSummary {
    /// The period at `now` (the database's clock), with its totals.
    pub fn of(period: &StoredPeriod, totals: PeriodTotals, grace: Duration, now: DateTime<Utc>) -> Self {
        let closing = period.closing(grace, now);
        let state = match (&period.invoice_id, closing) {
            (Some(_), _) => PeriodStanding::Invoiced,
            (None, Some(_)) => PeriodStanding::Closed,
            (None, None) => PeriodStanding::Open,
        };
        let pricing = period.pricing.as_deref();
        Self {
            period_start_time: period_start_of(period.start),
            period_end_time: period.end,
            state,
            closed_time: closing.map(|c| c.time),
            closed_by: closing.map(|c| c.by),
            invoice_id: period.invoice_id.clone(),
            usage_count: totals.usage_count,
            quantity: totals.quantity,
            amount: pricing.map(|p| p.amount(totals.quantity)),
            currency: pricing.map(|p| p.currency().to_owned()),
            voided_count: totals.voided_count,
            digest: totals.digest,
        }
    }
}

/// The answer of `GET /subscriptions/{id}/periods`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeriodList {
    pub subscription_id: String,
    /// In start order.
    pub periods: Vec<PeriodSummary>,
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use serde_json::json;

    use super::*;
    use crate::domain::pricing::{Bracket, Formula};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    const END: &str = "2026-12-01T00:00:00Z";

    fn hour() -> Duration {
        Duration::hours(1)
    }

    #[test]
    fn a_period_closes_by_grace_once_its_end_plus_grace_has_passed() {
        let end = Some(t(END));
        assert_eq!(closing(end, hour(), None, t("2026-12-01T00:59:59Z")), None);
        assert_eq!(
            closing(end, hour(), None, t("2026-12-01T01:00:00Z")),
            Some(Closing {
                by: ClosedBy::Grace,
                time: t("2026-12-01T01:00:00Z")
            }),
            "closed at its end plus grace, not when someone noticed"
        );
        assert_eq!(
            closing(end, hour(), None, t("2026-12-09T00:00:00Z")).map(|c| c.time),
            Some(t("2026-12-01T01:00:00Z"))
        );
    }

    #[test]
    fn an_invoice_closes_a_period_only_before_its_grace_ends() {
        let end = Some(t(END));
        let early = t("2026-11-30T12:00:00Z");
        assert_eq!(
            closing(end, hour(), Some(early), t("2026-11-30T12:00:00Z")),
            Some(Closing {
                by: ClosedBy::Invoice,
                time: early
            })
        );
        assert_eq!(
            closing(end, hour(), Some(early), t("2026-12-05T00:00:00Z")).map(|c| c.by),
            Some(ClosedBy::Invoice),
            "what closed it first stays so"
        );
        // An invoice applied after the grace time ended bills a period that
        // was already closed.
        let late = t("2026-12-01T03:00:00Z");
        assert_eq!(
            closing(end, hour(), Some(late), late),
            Some(Closing {
                by: ClosedBy::Grace,
                time: t("2026-12-01T01:00:00Z")
            })
        );
        let tie = t("2026-12-01T01:00:00Z");
        assert_eq!(
            closing(end, hour(), Some(tie), tie).map(|c| c.by),
            Some(ClosedBy::Grace)
        );
    }

    #[test]
    fn the_open_ended_period_closes_only_by_an_invoice() {
        let now = t("2030-01-01T00:00:00Z");
        assert_eq!(closing(None, hour(), None, now), None);
        assert_eq!(
            closing(None, hour(), Some(now), now).map(|c| c.by),
            Some(ClosedBy::Invoice)
        );
    }

    #[test]
    fn totals_count_what_is_not_voided_and_digest_it() {
        let totals = PeriodTotals::of([
            ("usg_b", d("2.500"), false),
            ("usg_x", d("7"), true),
            ("usg_a", d("0.001"), false),
            ("usg_y", d("1"), true),
        ]);
        assert_eq!(totals.usage_count, 2);
        assert_eq!(totals.quantity, d("2.501"));
        assert_eq!(totals.voided_count, 2);
        assert_eq!(
            totals.digest,
            period_digest([("usg_a", d("0.001")), ("usg_b", d("2.5"))]),
            "voided usages are not in the digest"
        );
        let empty = PeriodTotals::of([]);
        assert_eq!(
            (empty.usage_count, empty.quantity, empty.voided_count),
            (0, Decimal::ZERO, 0)
        );
    }

    fn tiered() -> Pricing {
        Pricing::new(
            "USD",
            Formula::Tiered(vec![
                Bracket {
                    max_quantity: Some(d("100")),
                    price: d("0.5"),
                },
                Bracket {
                    max_quantity: None,
                    price: d("0.4"),
                },
            ]),
        )
        .unwrap()
    }

    #[test]
    fn a_closed_record_is_spec_s_body_with_exact_numbers() {
        let pricing = tiered();
        let period = ClosedPeriod {
            subscription_id: "sub_42",
            start: t("2026-11-01T00:00:00Z"),
            end: t(END),
            closing: Closing {
                by: ClosedBy::Grace,
                time: t("2026-12-01T01:00:00Z"),
            },
            pricing: Some(&pricing),
        };
        let totals = PeriodTotals::of([
            ("u1", d("100.5"), false),
            ("u2", d("20.000"), false),
            ("u3", d("3"), true),
        ]);
        let record = PeriodRecord::closed(&period, &totals, Some("inv_ignored"));
        let body: serde_json::Value = serde_json::from_slice(&record.to_json()).unwrap();
        assert_eq!(
            body,
            json!({
                "type": "usage-period-closed", "subscriptionId": "sub_42",
                "periodStartTime": "2026-11-01T00:00:00.000Z", "periodEndTime": "2026-12-01T00:00:00.000Z",
                "closedTime": "2026-12-01T01:00:00.000Z", "closedBy": "grace", "invoiceId": null,
                "usageCount": 2, "quantity": 120.5, "amount": 58.2, "currency": "USD", "voidedCount": 1,
                "digest": period_digest([("u1", d("100.5")), ("u2", d("20"))]),
            })
        );
        // Written from the exact decimal, never through a float.
        let text = String::from_utf8(record.to_json()).unwrap();
        assert!(text.contains(r#""quantity":120.5,"amount":58.2,"#), "{text}");
    }

    #[test]
    fn an_invoice_close_names_its_invoice_and_an_unpriced_period_has_no_amount() {
        let period = ClosedPeriod {
            subscription_id: "sub_1",
            start: open_period_start(),
            end: t(END),
            closing: Closing {
                by: ClosedBy::Invoice,
                time: t("2026-11-30T00:00:00Z"),
            },
            pricing: None,
        };
        let totals = PeriodTotals::of([("u1", d("1"), false)]);
        let closed = serde_json::to_value(PeriodRecord::closed(&period, &totals, Some("inv_1"))).unwrap();
        assert_eq!(closed["closedBy"], "invoice");
        assert_eq!(closed["invoiceId"], "inv_1");
        assert_eq!((&closed["amount"], &closed["currency"]), (&json!(null), &json!(null)));
        assert_eq!(
            closed["periodStartTime"],
            json!(null),
            "the open-ended period has no start"
        );
        let invoiced = serde_json::to_value(PeriodRecord::invoiced(&period, &totals, "inv_2")).unwrap();
        assert_eq!(invoiced["type"], "usage-period-invoiced");
        assert_eq!(invoiced["invoiceId"], "inv_2");
        assert_eq!(invoiced["digest"], closed["digest"], "the same totals");
    }

    #[test]
    fn record_ids_are_stable_per_subscription_period_and_type() {
        let period = ClosedPeriod {
            subscription_id: "sub_1",
            start: t("2026-11-01T00:00:00Z"),
            end: t(END),
            closing: Closing {
                by: ClosedBy::Grace,
                time: t("2026-12-01T01:00:00Z"),
            },
            pricing: None,
        };
        let totals = PeriodTotals::of([]);
        let closed = PeriodRecord::closed(&period, &totals, None);
        let invoiced = PeriodRecord::invoiced(&period, &totals, "inv_1");
        assert_eq!(closed.record_id(), closed.clone().record_id());
        assert_ne!(closed.record_id(), invoiced.record_id());
        let other = ClosedPeriod {
            start: t("2026-10-01T00:00:00Z"),
            ..period.clone()
        };
        assert_ne!(
            closed.record_id(),
            PeriodRecord::closed(&other, &totals, None).record_id()
        );
        let headers = invoiced.headers();
        assert_eq!(headers.text("type"), Some("usage-period-invoiced"));
        assert!(headers.text("record-id").is_some_and(|id| id.starts_with("pr_")));
    }

    fn stored(end: Option<&str>) -> StoredPeriod {
        StoredPeriod {
            subscription_id: "sub_1".into(),
            start: t("2026-11-01T00:00:00Z"),
            end: end.map(t),
            invoice_closed: None,
            invoice_id: None,
            recorded: None,
            pricing: None,
        }
    }

    #[test]
    fn a_listed_period_is_open_closed_or_invoiced_as_decisions_see_it() {
        let totals = || PeriodTotals::of([("u1", d("2"), false)]);
        let mut period = stored(Some(END));
        let open = PeriodSummary::of(&period, totals(), hour(), t("2026-12-01T00:30:00Z"));
        assert_eq!(
            (open.state, open.closed_time, open.closed_by),
            (PeriodStanding::Open, None, None)
        );
        assert_eq!(
            open.digest,
            period_digest([("u1", d("2"))]),
            "an open period's digest so far"
        );
        // Past its grace, before any sweep: closed, as its record will say.
        let closed = PeriodSummary::of(&period, totals(), hour(), t("2026-12-02T00:00:00Z"));
        assert_eq!(closed.state, PeriodStanding::Closed);
        assert_eq!(
            (closed.closed_time, closed.closed_by),
            (Some(t("2026-12-01T01:00:00Z")), Some(ClosedBy::Grace))
        );
        // What the record said stands, whatever the grace time is now.
        period.recorded = Some(Closing {
            by: ClosedBy::Grace,
            time: t("2026-12-01T02:00:00Z"),
        });
        let recorded = PeriodSummary::of(&period, totals(), hour(), t("2026-12-02T00:00:00Z"));
        assert_eq!(recorded.closed_time, Some(t("2026-12-01T02:00:00Z")));
        period.invoice_id = Some("inv_1".into());
        let invoiced = PeriodSummary::of(&period, totals(), hour(), t("2026-12-02T00:00:00Z"));
        assert_eq!(invoiced.state, PeriodStanding::Invoiced);
        assert_eq!(invoiced.invoice_id.as_deref(), Some("inv_1"));
        let json = serde_json::to_value(&invoiced).unwrap();
        assert_eq!(json["state"], "invoiced");
        assert_eq!(json["closedBy"], "grace");
    }

    #[test]
    fn the_open_ended_period_has_no_record_until_it_has_an_end() {
        let mut period = stored(None);
        period.start = open_period_start();
        period.invoice_closed = Some(t("2026-11-20T00:00:00Z"));
        let closing = period.closing(hour(), t("2026-12-01T00:00:00Z")).unwrap();
        assert_eq!(closing.by, ClosedBy::Invoice);
        assert!(period.closed(closing).is_none());
        period.end = Some(t(END));
        let closed = period.closed(closing).unwrap();
        let record = PeriodRecord::closed(&closed, &PeriodTotals::of([]), Some("inv_1"));
        assert_eq!(record.period_start_time, None);
        assert_eq!(record.period_end_time, t(END));
    }
}
