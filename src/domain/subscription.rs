//! Subscription snapshots from the compacted `subscriptions` topic, decoded
//! and validated. What a snapshot does to stored periods and limits is the
//! store's business; this module only says what a snapshot says, or why it
//! is invalid (an invalid snapshot is logged, counted and dead-lettered, and
//! changes nothing).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::event::{json_string, parse_timestamp, JsonObject};
use super::ids::check_id;
use super::pricing::{Bracket, Formula, Pricing};
use super::quantity::{json_kind, parse_bracket_end, parse_limit, parse_price, parse_quantity_limit};

/// A soft or hard limit: a quantity, or an amount in the plan's currency
/// (what the period's total quantity costs under its pricing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Quantity(Decimal),
    Amount(Decimal),
}

impl Limit {
    pub fn quantity(self) -> Option<Decimal> {
        match self {
            Self::Quantity(quantity) => Some(quantity),
            Self::Amount(_) => None,
        }
    }

    pub fn amount(self) -> Option<Decimal> {
        match self {
            Self::Quantity(_) => None,
            Self::Amount(amount) => Some(amount),
        }
    }
}

/// A subscription's usage limits; `None` means no cap of that kind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    /// Caps what a period accepts.
    pub hard: Option<Limit>,
    /// Only raises alerts, at 75, 90 and 100 %.
    pub soft: Option<Limit>,
    /// Caps all usage before `trialEndTime`, across periods: a quantity.
    pub trial: Option<Decimal>,
}

/// A service period, half-open: `[start, end)`, with `start < end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePeriodSpan {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl ServicePeriodSpan {
    /// Whether `time` falls in the period (the end belongs to the next one).
    pub fn contains(&self, time: DateTime<Utc>) -> bool {
        self.start <= time && time < self.end
    }
}

/// One snapshot of a subscription, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSnapshot {
    pub id: String,
    /// Kept exactly as published; see [`accepts_usage`] for how it is read.
    pub status: String,
    /// Snapshots not newer than the stored one are ignored.
    pub version: i64,
    /// `None` when the snapshot names no current period.
    pub period: Option<ServicePeriodSpan>,
    pub trial_end_time: Option<DateTime<Utc>>,
    pub limits: Limits,
    /// The plan's metered price; required by an amount limit.
    pub pricing: Option<Pricing>,
}

/// Whether a subscription in `status` may take usage: `active` or `trial`.
///
/// Compared case-sensitively, exactly as SPEC spells them: the billing
/// system publishes lowercase statuses, and folding case here would quietly
/// accept usage for a status (`Active`, say) that some producer means as
/// something else. Anything unexpected fails closed, as
/// `subscription_not_active`.
pub fn accepts_usage(status: &str) -> bool {
    matches!(status, "active" | "trial")
}

/// The JSON names of the snapshot's fields.
mod fields {
    pub const ID: &str = "id";
    pub const STATUS: &str = "status";
    pub const VERSION: &str = "version";
    pub const PERIOD_START: &str = "currentPeriodStartTime";
    pub const PERIOD_END: &str = "currentPeriodEndTime";
    pub const TRIAL_END: &str = "trialEndTime";
    pub const USAGE_LIMITS: &str = "usageLimits";
    pub const HARD_LIMIT: &str = "hardLimit";
    pub const SOFT_LIMIT: &str = "softLimit";
    pub const TRIAL_LIMIT: &str = "trialLimit";
    pub const PRICING: &str = "pricing";
}

/// Decodes a snapshot (not a tombstone: the caller handles a null value).
///
/// The error names every problem found, as `field: problem` joined by `; `,
/// for the log line and the dead letter.
pub fn decode_snapshot(bytes: &[u8]) -> Result<SubscriptionSnapshot, String> {
    let object = JsonObject::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut problems = Problems::default();

    let id = problems.check(fields::ID, decode_id(object.given(fields::ID)));
    let status = problems.check(fields::STATUS, decode_status(object.given(fields::STATUS)));
    let version = problems.check(fields::VERSION, decode_version(object.given(fields::VERSION)));
    let period = decode_period(&object, &mut problems);
    let trial_end_time = problems
        .check(fields::TRIAL_END, optional_time(object.given(fields::TRIAL_END)))
        .flatten();
    let limits = decode_limits(object.given(fields::USAGE_LIMITS), &mut problems);
    let pricing = problems.check(
        fields::PRICING,
        object.given(fields::PRICING).map(decode_pricing).transpose(),
    );
    if let (Some(limits), Some(None)) = (&limits, &pricing) {
        for (name, limit) in [(fields::HARD_LIMIT, limits.hard), (fields::SOFT_LIMIT, limits.soft)] {
            if let Some(Limit::Amount(_)) = limit {
                problems.check::<()>(
                    &format!("{}.{name}", fields::USAGE_LIMITS),
                    Err(format!("is an amount, but the snapshot has no {}", fields::PRICING)),
                );
            }
        }
    }

    match (id, status, version, period, limits, pricing, problems.into_error()) {
        (Some(id), Some(status), Some(version), Some(period), Some(limits), Some(pricing), None) => {
            Ok(SubscriptionSnapshot {
                id,
                status,
                version,
                period,
                trial_end_time,
                limits,
                pricing,
            })
        }
        (.., error) => Err(error.unwrap_or_else(|| "invalid snapshot".into())),
    }
}

/// Problems found so far, each as `field: message`.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// The value when `result` is fine; otherwise records why and gives `None`.
    fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result
            .map_err(|message| self.0.push(format!("{field}: {message}")))
            .ok()
    }

    fn into_error(self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join("; "))
    }
}

fn required(raw: Option<&RawValue>) -> Result<&RawValue, String> {
    raw.ok_or_else(|| "is required".to_owned())
}

fn decode_id(raw: Option<&RawValue>) -> Result<String, String> {
    let id = json_string(required(raw)?)?;
    check_id(&id)?;
    Ok(id)
}

fn decode_status(raw: Option<&RawValue>) -> Result<String, String> {
    let status = json_string(required(raw)?)?;
    if status.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(status)
}

/// A JSON integer literal read as text: `7.0`, `7e0`, strings and
/// out-of-range values are refused rather than converted.
fn decode_version(raw: Option<&RawValue>) -> Result<i64, String> {
    let raw = required(raw)?;
    match raw.get().parse::<i64>() {
        Ok(version) if version >= 0 => Ok(version),
        _ => Err(format!(
            "must be a non-negative 64-bit integer, got {}",
            shorten(raw.get())
        )),
    }
}

/// Quotes at most a few characters of a raw value for a message.
fn shorten(text: &str) -> String {
    const MAX: usize = 30;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// An optional RFC 3339 time with an offset; absent or null is `None`.
fn optional_time(raw: Option<&RawValue>) -> Result<Option<DateTime<Utc>>, String> {
    raw.map(|raw| parse_timestamp(&json_string(raw)?)).transpose()
}

/// Both ends or neither; `Some(None)` is a valid snapshot without a period,
/// `None` means a problem was recorded.
fn decode_period(object: &JsonObject<'_>, problems: &mut Problems) -> Option<Option<ServicePeriodSpan>> {
    let start = problems.check(fields::PERIOD_START, optional_time(object.given(fields::PERIOD_START)));
    let end = problems.check(fields::PERIOD_END, optional_time(object.given(fields::PERIOD_END)));
    let span = match (start?, end?) {
        (None, None) => return Some(None),
        (Some(start), Some(end)) if start < end => ServicePeriodSpan { start, end },
        (Some(_), Some(_)) => {
            return problems.check(
                fields::PERIOD_END,
                Err(format!("must be after {}", fields::PERIOD_START)),
            )
        }
        _ => {
            return problems.check(
                fields::PERIOD_START,
                Err(format!(
                    "and {} must both be given or both be absent",
                    fields::PERIOD_END
                )),
            )
        }
    };
    Some(Some(span))
}

/// `usageLimits` may be absent or null (no caps), and so may each limit.
fn decode_limits(raw: Option<&RawValue>, problems: &mut Problems) -> Option<Limits> {
    let Some(raw) = raw else {
        return Some(Limits::default());
    };
    let object = problems.check(
        fields::USAGE_LIMITS,
        JsonObject::parse(raw.get()).map_err(|_| format!("must be an object, got {}", json_kind(raw))),
    )?;
    let field = |name: &str| format!("{}.{name}", fields::USAGE_LIMITS);
    let limit = |name: &str| object.given(name).map(parse_limit).transpose();
    let hard = problems.check(&field(fields::HARD_LIMIT), limit(fields::HARD_LIMIT));
    let soft = problems.check(&field(fields::SOFT_LIMIT), limit(fields::SOFT_LIMIT));
    let trial = problems.check(
        &field(fields::TRIAL_LIMIT),
        object.given(fields::TRIAL_LIMIT).map(parse_quantity_limit).transpose(),
    );
    Some(Limits {
        hard: hard?,
        soft: soft?,
        trial: trial?,
    })
}

/// Decodes a plan's `pricing` (the snapshot's member, or the copy stored
/// with a period): `{"currency", "formula": "flat-rate", "price"}` or
/// `{"currency", "formula": "tiered" | "volume" | "stairstep", "brackets":
/// [{"maxQuantity", "price"}, ...]}`. The error names the field inside
/// `pricing` (`brackets[1].price: must not be negative`).
pub fn decode_pricing(raw: &RawValue) -> Result<Pricing, String> {
    let object = JsonObject::parse(raw.get()).map_err(|_| format!("must be an object, got {}", json_kind(raw)))?;
    let inside = |field: &str, message: String| format!("{field}: {message}");
    let currency = object
        .given("currency")
        .ok_or_else(|| "is required".to_owned())
        .and_then(json_string)
        .map_err(|e| inside("currency", e))?;
    let formula_name = object
        .given("formula")
        .ok_or_else(|| "is required".to_owned())
        .and_then(json_string)
        .map_err(|e| inside("formula", e))?;
    let formula = match formula_name.as_str() {
        "flat-rate" => {
            let price = object
                .given("price")
                .ok_or_else(|| "is required for flat-rate pricing".to_owned())
                .and_then(parse_price)
                .map_err(|e| inside("price", e))?;
            Formula::FlatRate { price }
        }
        "tiered" => Formula::Tiered(decode_brackets(&object)?),
        "volume" => Formula::Volume(decode_brackets(&object)?),
        "stairstep" => Formula::Stairstep(decode_brackets(&object)?),
        other => {
            return Err(inside(
                "formula",
                format!(
                    "must be flat-rate, tiered, volume or stairstep, got {:?}",
                    shorten(other)
                ),
            ))
        }
    };
    Pricing::new(&currency, formula).map_err(|e| inside(&e.field, e.message))
}

/// The brackets of a tiered, volume or stairstep pricing.
fn decode_brackets(object: &JsonObject<'_>) -> Result<Vec<Bracket>, String> {
    let raw = object
        .given("brackets")
        .ok_or_else(|| "brackets: is required for this formula".to_owned())?;
    let items: Vec<&RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| format!("brackets: must be an array, got {}", json_kind(raw)))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |field: &str, message: String| format!("brackets[{i}].{field}: {message}");
            let bracket = JsonObject::parse(item.get())
                .map_err(|_| format!("brackets[{i}]: must be an object, got {}", json_kind(item)))?;
            let price = bracket
                .given("price")
                .ok_or_else(|| "is required".to_owned())
                .and_then(parse_price)
                .map_err(|e| at("price", e))?;
            let max_quantity = bracket
                .given("maxQuantity")
                .map(parse_bracket_end)
                .transpose()
                .map_err(|e| at("maxQuantity", e))?;
            Ok(Bracket { max_quantity, price })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    const SPEC_EXAMPLE: &str = r#"{"id": "sub_42", "status": "active", "version": 7,
        "currentPeriodStartTime": "2026-11-01T00:00:00Z",
        "currentPeriodEndTime": "2026-12-01T00:00:00Z",
        "trialEndTime": null,
        "usageLimits": {"hardLimit": {"quantity": 1000}, "softLimit": {"quantity": 750}, "trialLimit": 100}}"#;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn utc(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
    }

    fn decode(json: &str) -> Result<SubscriptionSnapshot, String> {
        decode_snapshot(json.as_bytes())
    }

    /// The SPEC example with `field` replaced by the JSON `value`, or removed.
    fn snapshot_with(field: &str, value: Option<&str>) -> String {
        let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        object.remove(field);
        let mut text = serde_json::to_string(&object).unwrap();
        if let Some(value) = value {
            text.pop();
            text.push_str(&format!(", \"{field}\": {value}}}"));
        }
        text
    }

    fn error_with(field: &str, value: Option<&str>) -> String {
        decode(&snapshot_with(field, value)).expect_err("should be invalid")
    }

    #[test]
    fn decodes_the_spec_example() {
        assert_eq!(
            decode(SPEC_EXAMPLE).unwrap(),
            SubscriptionSnapshot {
                id: "sub_42".into(),
                status: "active".into(),
                version: 7,
                period: Some(ServicePeriodSpan {
                    start: utc(2026, 11, 1),
                    end: utc(2026, 12, 1),
                }),
                trial_end_time: None,
                limits: Limits {
                    hard: Some(Limit::Quantity(dec("1000"))),
                    soft: Some(Limit::Quantity(dec("750"))),
                    trial: Some(dec("100")),
                },
                pricing: None,
            }
        );
    }

    #[test]
    fn decodes_a_minimal_snapshot() {
        let snapshot = decode(r#"{"id": "sub_1", "status": "trial", "version": 0}"#).unwrap();
        assert_eq!(snapshot.period, None);
        assert_eq!(snapshot.trial_end_time, None);
        assert_eq!(snapshot.limits, Limits::default());
    }

    #[test]
    fn ignores_unknown_fields() {
        assert!(decode(&snapshot_with("plan", Some(r#"{"name": "pro", "price": 1e400}"#))).is_ok());
    }

    #[test]
    fn accepts_usage_only_while_active_or_trial() {
        assert!(accepts_usage("active"));
        assert!(accepts_usage("trial"));
        for status in ["cancelled", "paused", "Active", "TRIAL", " active", ""] {
            assert!(!accepts_usage(status), "{status:?}");
        }
    }

    #[test]
    fn keeps_the_status_as_published() {
        let snapshot = decode(&snapshot_with("status", Some("\"Suspended\""))).unwrap();
        assert_eq!(snapshot.status, "Suspended");
    }

    // --- payload ---

    #[test]
    fn rejects_a_payload_that_is_not_a_json_object() {
        for json in ["", "null", "[]", "7", "{", "{\"id\": \"sub_1\",}"] {
            assert!(decode(json).is_err(), "{json:?}");
        }
        assert!(decode_snapshot(b"{\"id\": \"\xff\"}").is_err());
    }

    #[test]
    fn rejects_repeated_keys() {
        let json = r#"{"id": "sub_1", "status": "active", "version": 1, "version": 2}"#;
        assert!(decode(json).unwrap_err().contains("repeats the key \"version\""));
        let nested = snapshot_with("usageLimits", Some(r#"{"hardLimit": 1, "hardLimit": 2}"#));
        assert!(decode(&nested).unwrap_err().contains("hardLimit"));
        let in_limit = snapshot_with("usageLimits", Some(r#"{"hardLimit": {"quantity": 1, "quantity": 1}}"#));
        assert!(decode(&in_limit).is_err());
    }

    #[test]
    fn rejects_deep_nesting() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(decode(&snapshot_with("extra", Some(&deep))).is_err());
    }

    #[test]
    fn names_every_problem() {
        let error = decode(r#"{"id": "", "status": 1, "version": -1}"#).unwrap_err();
        assert_eq!(
            error,
            "id: must not be empty; status: must be a string, got a number; \
             version: must be a non-negative 64-bit integer, got -1"
        );
    }

    // --- id ---

    #[test]
    fn requires_an_id() {
        assert_eq!(error_with("id", None), "id: is required");
        assert_eq!(error_with("id", Some("null")), "id: is required");
    }

    #[test]
    fn rejects_an_id_that_breaks_the_id_rules() {
        let long = format!("\"{}\"", "s".repeat(51));
        for value in ["\"\"", "\"sub 42\"", r#""sub\u200b""#, long.as_str(), "42"] {
            assert!(error_with("id", Some(value)).starts_with("id: "), "{value}");
        }
    }

    // --- status ---

    #[test]
    fn requires_a_non_empty_status_string() {
        assert_eq!(error_with("status", None), "status: is required");
        assert_eq!(error_with("status", Some("\"\"")), "status: must not be empty");
        assert!(error_with("status", Some("true")).starts_with("status: must be a string"));
    }

    // --- version ---

    #[test]
    fn requires_a_version() {
        assert_eq!(error_with("version", None), "version: is required");
        assert_eq!(error_with("version", Some("null")), "version: is required");
    }

    #[test]
    fn accepts_version_zero_and_the_largest_i64() {
        assert_eq!(decode(&snapshot_with("version", Some("0"))).unwrap().version, 0);
        let max = i64::MAX.to_string();
        assert_eq!(decode(&snapshot_with("version", Some(&max))).unwrap().version, i64::MAX);
    }

    #[test]
    fn rejects_a_version_that_is_not_a_non_negative_integer() {
        for value in ["-1", "7.0", "7.5", "7e0", "\"7\"", "9223372036854775808", "true", "{}"] {
            assert!(
                error_with("version", Some(value)).starts_with("version: must be a non-negative"),
                "{value}"
            );
        }
    }

    // --- period ---

    #[test]
    fn accepts_a_snapshot_without_a_period() {
        let json = snapshot_with("currentPeriodStartTime", None);
        let json = json.replace(
            r#""currentPeriodEndTime":"2026-12-01T00:00:00Z""#,
            r#""currentPeriodEndTime":null"#,
        );
        assert_eq!(decode(&json).unwrap().period, None);
    }

    #[test]
    fn rejects_a_period_with_only_one_end() {
        let error = error_with("currentPeriodStartTime", None);
        assert!(error.contains("both be given or both be absent"), "{error}");
        let error = error_with("currentPeriodEndTime", Some("null"));
        assert!(error.contains("both be given or both be absent"), "{error}");
    }

    #[test]
    fn rejects_a_period_that_does_not_move_forward() {
        for end in ["\"2026-11-01T00:00:00Z\"", "\"2026-10-01T00:00:00Z\""] {
            let error = error_with("currentPeriodEndTime", Some(end));
            assert_eq!(error, "currentPeriodEndTime: must be after currentPeriodStartTime");
        }
    }

    #[test]
    fn compares_period_ends_as_instants() {
        // 02:00+02:00 is midnight UTC, the start: an empty period.
        let error = error_with("currentPeriodEndTime", Some("\"2026-11-01T02:00:00+02:00\""));
        assert!(error.contains("must be after"), "{error}");
        let snapshot = decode(&snapshot_with(
            "currentPeriodEndTime",
            Some("\"2026-11-30T23:00:00-01:00\""),
        ))
        .unwrap();
        assert_eq!(snapshot.period.unwrap().end, utc(2026, 12, 1));
    }

    #[test]
    fn rejects_period_times_without_an_offset_or_in_other_formats() {
        for value in ["\"2026-11-01T00:00:00\"", "\"2026-11-01\"", "\"\"", "1764547200"] {
            let error = error_with("currentPeriodStartTime", Some(value));
            assert!(error.starts_with("currentPeriodStartTime: "), "{value}: {error}");
        }
    }

    #[test]
    fn periods_are_half_open() {
        let span = ServicePeriodSpan {
            start: utc(2026, 11, 1),
            end: utc(2026, 12, 1),
        };
        assert!(span.contains(utc(2026, 11, 1)));
        assert!(span.contains(utc(2026, 11, 30)));
        assert!(!span.contains(utc(2026, 12, 1)));
        assert!(!span.contains(utc(2026, 10, 31)));
    }

    // --- trialEndTime ---

    #[test]
    fn reads_an_optional_trial_end_time() {
        let snapshot = decode(&snapshot_with("trialEndTime", Some("\"2026-11-15T00:00:00Z\""))).unwrap();
        assert_eq!(snapshot.trial_end_time, Some(utc(2026, 11, 15)));
        assert_eq!(
            decode(&snapshot_with("trialEndTime", None)).unwrap().trial_end_time,
            None
        );
    }

    #[test]
    fn rejects_a_malformed_trial_end_time() {
        for value in ["\"2026-11-15\"", "\"2026-11-15T00:00:00\"", "false"] {
            assert!(error_with("trialEndTime", Some(value)).starts_with("trialEndTime: "));
        }
    }

    // --- usageLimits ---

    #[test]
    fn treats_absent_or_null_limits_as_no_cap() {
        for value in [None, Some("null"), Some("{}")] {
            let snapshot = decode(&snapshot_with("usageLimits", value)).unwrap();
            assert_eq!(snapshot.limits, Limits::default(), "{value:?}");
        }
        let snapshot = decode(&snapshot_with(
            "usageLimits",
            Some(r#"{"hardLimit": null, "softLimit": 5}"#),
        ))
        .unwrap();
        assert_eq!(
            snapshot.limits,
            Limits {
                hard: None,
                soft: Some(Limit::Quantity(dec("5"))),
                trial: None,
            }
        );
    }

    #[test]
    fn reads_limits_in_either_form_exactly() {
        let snapshot = decode(&snapshot_with(
            "usageLimits",
            Some(r#"{"hardLimit": 0.1, "softLimit": {"quantity": "1.2300"}, "trialLimit": 0}"#),
        ))
        .unwrap();
        assert_eq!(
            snapshot.limits,
            Limits {
                hard: Some(Limit::Quantity(dec("0.1"))),
                soft: Some(Limit::Quantity(dec("1.23"))),
                trial: Some(Decimal::ZERO),
            }
        );
    }

    #[test]
    fn rejects_invalid_limits_naming_each() {
        let error = decode(&snapshot_with(
            "usageLimits",
            Some(r#"{"hardLimit": 1.2345, "softLimit": -1, "trialLimit": {"quantity": 1e12}}"#),
        ))
        .unwrap_err();
        assert_eq!(
            error,
            "usageLimits.hardLimit: must have at most 3 decimal places; \
             usageLimits.softLimit: must not be negative; \
             usageLimits.trialLimit: must be below 1000000000000"
        );
    }

    #[test]
    fn rejects_usage_limits_that_are_not_an_object() {
        for value in ["[]", "5", "\"x\"", "true"] {
            let error = error_with("usageLimits", Some(value));
            assert!(error.starts_with("usageLimits: must be an object"), "{value}: {error}");
        }
    }

    #[test]
    fn rejects_a_limit_object_without_a_quantity() {
        let error = error_with("usageLimits", Some(r#"{"hardLimit": {"quantity": null}}"#));
        assert!(error.starts_with("usageLimits.hardLimit: "), "{error}");
    }

    // --- pricing and amount limits (SPEC version 2) ---

    const PRICED: &str = r#"{"id": "sub_7", "status": "active", "version": 1,
        "usageLimits": {"hardLimit": {"amount": 60}, "softLimit": {"amount": "40.5"}, "trialLimit": 5},
        "pricing": {"currency": "USD", "formula": "tiered",
                    "brackets": [{"maxQuantity": 100, "price": 0.5}, {"maxQuantity": null, "price": 0.4}]}}"#;

    #[test]
    fn decodes_amount_limits_with_their_pricing() {
        let snapshot = decode(PRICED).unwrap();
        assert_eq!(snapshot.limits.hard, Some(Limit::Amount(dec("60"))));
        assert_eq!(snapshot.limits.soft, Some(Limit::Amount(dec("40.5"))));
        assert_eq!(snapshot.limits.trial, Some(dec("5")));
        let pricing = snapshot.pricing.unwrap();
        assert_eq!(pricing.currency(), "USD");
        assert_eq!(
            pricing.formula(),
            &Formula::Tiered(vec![
                Bracket {
                    max_quantity: Some(dec("100")),
                    price: dec("0.5")
                },
                Bracket {
                    max_quantity: None,
                    price: dec("0.4")
                },
            ])
        );
    }

    #[test]
    fn decodes_each_formula_and_reads_back_what_it_stores() {
        for json in [
            r#"{"currency": "EUR", "formula": "flat-rate", "price": 0.25}"#,
            r#"{"currency": "USD", "formula": "volume", "brackets": [{"maxQuantity": 2.0005, "price": 3}, {"price": 1}]}"#,
            r#"{"currency": "JPY", "formula": "stairstep", "brackets": [{"maxQuantity": null, "price": "100"}]}"#,
        ] {
            let raw = RawValue::from_string(json.to_owned()).unwrap();
            let pricing = decode_pricing(&raw).unwrap();
            let stored = RawValue::from_string(pricing.to_json()).unwrap();
            assert_eq!(decode_pricing(&stored).unwrap(), pricing, "{json}");
        }
    }

    #[test]
    fn an_amount_limit_without_pricing_is_an_invalid_snapshot() {
        let json = snapshot_with("usageLimits", Some(r#"{"hardLimit": {"amount": 10}}"#));
        assert_eq!(
            decode(&json).unwrap_err(),
            "usageLimits.hardLimit: is an amount, but the snapshot has no pricing"
        );
    }

    #[test]
    fn the_trial_limit_cannot_be_an_amount() {
        let json = snapshot_with("usageLimits", Some(r#"{"trialLimit": {"amount": 10}}"#));
        assert_eq!(
            decode(&json).unwrap_err(),
            "usageLimits.trialLimit: must be a quantity: this limit cannot be an amount"
        );
    }

    #[test]
    fn an_invalid_pricing_is_an_invalid_snapshot_naming_the_field() {
        for (pricing, error) in [
            ("7", "pricing: must be an object, got a number"),
            (
                r#"{"formula": "flat-rate", "price": 1}"#,
                "pricing: currency: is required",
            ),
            (
                r#"{"currency": "USD", "formula": "per-seat", "price": 1}"#,
                r#"pricing: formula: must be flat-rate, tiered, volume or stairstep, got "per-seat""#,
            ),
            (
                r#"{"currency": "USD", "formula": "flat-rate"}"#,
                "pricing: price: is required for flat-rate pricing",
            ),
            (
                r#"{"currency": "USD", "formula": "flat-rate", "price": -1}"#,
                "pricing: price: must not be negative",
            ),
            (
                r#"{"currency": "USD", "formula": "tiered"}"#,
                "pricing: brackets: is required for this formula",
            ),
            (
                r#"{"currency": "USD", "formula": "tiered", "brackets": [{"maxQuantity": 10, "price": 1}, {"maxQuantity": 5, "price": 1}, {"price": 1}]}"#,
                "pricing: brackets[1].maxQuantity: must be above 10, where the bracket before ends",
            ),
            (
                r#"{"currency": "USD", "formula": "volume", "brackets": [{"maxQuantity": null, "price": 0.0000001}]}"#,
                "pricing: brackets[0].price: must have at most 6 decimal places",
            ),
            (
                r#"{"currency": "usd", "formula": "flat-rate", "price": 1}"#,
                "pricing: currency: must be an ISO 4217 code of three capital letters",
            ),
        ] {
            assert_eq!(error_with("pricing", Some(pricing)), error, "{pricing}");
        }
    }

    #[test]
    fn a_quantity_limit_needs_no_pricing_and_pricing_alone_is_fine() {
        assert!(decode(SPEC_EXAMPLE).unwrap().pricing.is_none());
        let json = snapshot_with(
            "pricing",
            Some(r#"{"currency": "USD", "formula": "flat-rate", "price": 0.25}"#),
        );
        let snapshot = decode(&json).unwrap();
        assert_eq!(snapshot.limits.hard, Some(Limit::Quantity(dec("1000"))));
        assert!(snapshot.pricing.is_some());
    }
}
