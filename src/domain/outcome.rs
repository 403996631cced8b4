//! The outcome published on `usage-results`: one per decided message.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use rust_decimal::Decimal;
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::decision::{open_period_start, AmountFigures, Decision, LimitReport, StoredUsage};
use super::headers::Headers;
use super::{InvalidField, Rejection};

/// Writes a decimal as a JSON number with exactly its digits (no float).
pub fn serialize_decimal<S: Serializer>(value: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    let text = value.normalize().to_string();
    let raw = serde_json::value::RawValue::from_string(text).map_err(serde::ser::Error::custom)?;
    raw.serialize(s)
}

/// A decimal written as an exact JSON number, where a value (not a field)
/// is serialized.
pub struct Exact(pub Decimal);

impl Serialize for Exact {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_decimal(&self.0, s)
    }
}

pub(crate) fn serialize_opt_decimal<S: Serializer>(value: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => serialize_decimal(v, s),
        None => s.serialize_none(),
    }
}

/// RFC 3339 in UTC with milliseconds: one spelling for every time we write.
pub fn format_time(t: DateTime<Utc>) -> String {
    with_time_text(t, str::to_owned)
}

/// [`format_time`]'s text, lent to `f` from the stack. An outcome carries
/// up to seven times, and chrono's general formatter (a `String` and a
/// format-spec walk each) showed in the worker's profile; four-digit years
/// without a leap second are written here digit by digit, anything else by
/// chrono.
fn with_time_text<R>(t: DateTime<Utc>, f: impl FnOnce(&str) -> R) -> R {
    let nanos = t.nanosecond();
    let (Ok(year @ 0..=9999), 0..=999_999_999) = (u32::try_from(t.year()), nanos) else {
        return f(&t.to_rfc3339_opts(SecondsFormat::Millis, true));
    };
    let mut text = *b"0000-00-00T00:00:00.000Z";
    // (end of the field in `text`, width, value)
    for (end, width, value) in [
        (4, 4, year),
        (7, 2, t.month()),
        (10, 2, t.day()),
        (13, 2, t.hour()),
        (16, 2, t.minute()),
        (19, 2, t.second()),
        (23, 3, nanos / 1_000_000),
    ] {
        let mut rest = value;
        for digit in text[end - width..end].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    }
    f(std::str::from_utf8(&text).expect("ASCII digits and separators"))
}

pub(crate) fn serialize_time<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    with_time_text(*t, |text| s.serialize_str(text))
}

pub(crate) fn serialize_opt_time<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize_time(t, s),
        None => s.serialize_none(),
    }
}

/// A period start written for readers: the open-ended period has none.
pub(crate) fn period_start_of(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (t != open_period_start()).then_some(t)
}

/// Where the decided message came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Source {
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
        #[serde(serialize_with = "serialize_opt_time")]
        timestamp: Option<DateTime<Utc>>,
    },
    Http {
        http: bool,
    },
}

impl Source {
    /// A stable digest of the source coordinates; outcome and derived event
    /// ids are built from it so that a re-decision after a crash names the
    /// same things.
    fn digest(&self) -> String {
        let text = match self {
            Source::Kafka {
                topic,
                partition,
                offset,
                ..
            } => format!("{topic}\u{0}{partition}\u{0}{offset}"),
            Source::Http { .. } => unreachable!("HTTP outcomes carry their own ids"),
        };
        let hash = Sha256::digest(text.as_bytes());
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(32);
        for b in &hash[..16] {
            hex.push(HEX[usize::from(b >> 4)] as char);
            hex.push(HEX[usize::from(b & 0xf)] as char);
        }
        hex
    }
}

/// The id used for an event that carries none: `msg_` + a hash of the
/// message's topic, partition and offset.
pub fn derived_event_id(topic: &str, partition: i32, offset: i64) -> String {
    let source = Source::Kafka {
        topic: topic.into(),
        partition,
        offset,
        timestamp: None,
    };
    format!("{}{}", super::ids::DERIVED_ID_PREFIX, source.digest())
}

/// The outcome id of the decision about one Kafka message.
pub fn kafka_outcome_id(topic: &str, partition: i32, offset: i64) -> String {
    let source = Source::Kafka {
        topic: topic.into(),
        partition,
        offset,
        timestamp: None,
    };
    format!("oc_{}", source.digest())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeStatus {
    Created,
    Duplicate,
    Rejected,
    /// A correction voided the usage (version 1's `deleted` is gone: a
    /// usage is never deleted).
    Voided,
    Amended,
}

impl OutcomeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
            Self::Voided => "voided",
            Self::Amended => "amended",
        }
    }
}

/// The path of a usage resource, `/usages/{id}`, with the id
/// percent-encoded: ids may hold `/`, `?`, `#` or non-ASCII characters, and
/// the link must still name exactly this usage.
pub fn usage_path(id: &str) -> String {
    let mut path = String::with_capacity(8 + id.len());
    path.push_str("/usages/");
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            path.push(byte as char);
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    path
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub href: String,
    pub rel: &'static str,
}

/// The usage resource, as `POST /usages` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageBody {
    pub id: String,
    pub subscription_id: String,
    #[serde(serialize_with = "serialize_decimal")]
    pub quantity: Decimal,
    #[serde(serialize_with = "serialize_time")]
    pub usage_time: DateTime<Utc>,
    pub invoice_id: Option<String>,
    pub invoice_item_id: Option<String>,
    #[serde(serialize_with = "serialize_time")]
    pub created_time: DateTime<Utc>,
    #[serde(serialize_with = "serialize_time")]
    pub updated_time: DateTime<Utc>,
    /// Present on a voided usage only, with `voidReason` and `voidedBy`.
    #[serde(serialize_with = "serialize_opt_time", skip_serializing_if = "Option::is_none")]
    pub voided_time: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub void_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_by: Option<String>,
    #[serde(rename = "_links")]
    pub links: Vec<Link>,
}

impl UsageBody {
    pub fn new(
        id: String,
        subscription_id: String,
        quantity: Decimal,
        usage_time: DateTime<Utc>,
        created: DateTime<Utc>,
    ) -> Self {
        let links = vec![Link {
            href: usage_path(&id),
            rel: "self",
        }];
        Self {
            id,
            subscription_id,
            quantity,
            usage_time,
            invoice_id: None,
            invoice_item_id: None,
            created_time: created,
            updated_time: created,
            voided_time: None,
            void_reason: None,
            voided_by: None,
            links,
        }
    }
}

/// A stored usage as the API shows it, invoice stamps included.
impl From<&StoredUsage> for UsageBody {
    fn from(usage: &StoredUsage) -> Self {
        Self {
            invoice_id: usage.invoice_id.clone(),
            invoice_item_id: usage.invoice_item_id.clone(),
            updated_time: usage.updated_time,
            voided_time: usage.voided.as_ref().map(|v| v.time),
            void_reason: usage.voided.as_ref().and_then(|v| v.reason.clone()),
            voided_by: usage.voided.as_ref().map(|v| v.by.clone()),
            ..UsageBody::new(
                usage.id.clone(),
                usage.subscription_id.clone(),
                usage.quantity,
                usage.usage_time,
                usage.created_time,
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitBlock {
    pub applied: &'static str,
    /// The quantity limit; absent for an amount limit (`limitAmount`).
    #[serde(serialize_with = "serialize_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub limit: Option<Decimal>,
    #[serde(serialize_with = "serialize_decimal")]
    pub used: Decimal,
    #[serde(serialize_with = "serialize_decimal")]
    pub available: Decimal,
    #[serde(flatten)]
    pub amount: AmountBlock,
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_start_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_end_time: Option<DateTime<Utc>>,
}

/// `limitAmount`, `usedAmount` and `currency`, present together where an
/// amount limit applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AmountBlock {
    #[serde(serialize_with = "serialize_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub limit_amount: Option<Decimal>,
    #[serde(serialize_with = "serialize_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub used_amount: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

impl From<Option<&AmountFigures>> for AmountBlock {
    fn from(figures: Option<&AmountFigures>) -> Self {
        figures.map_or_else(Self::default, |f| Self {
            limit_amount: Some(f.limit_amount),
            used_amount: Some(f.used_amount),
            currency: Some(f.currency.clone()),
        })
    }
}

impl From<&LimitReport> for LimitBlock {
    fn from(r: &LimitReport) -> Self {
        Self {
            applied: r.applied.field(),
            limit: r.limit,
            used: r.used,
            available: r.available,
            amount: r.amount.as_ref().into(),
            period_start_time: period_start_of(r.period_start),
            period_end_time: r.period_end,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBlock {
    pub code: super::ReasonCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid_fields: Vec<InvalidField>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_opt_decimal")]
    pub available: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub outcome_id: String,
    pub event_id: String,
    pub status: OutcomeStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_opt_decimal")]
    pub requested_quantity: Option<Decimal>,
    /// An amendment's: the usage's quantity before it.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "serialize_opt_decimal")]
    pub previous_quantity: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitBlock>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBlock>,
    pub source: Source,
    #[serde(serialize_with = "serialize_time")]
    pub processed_time: DateTime<Utc>,
}

impl Outcome {
    /// The rejected outcome of a message that never became a request.
    pub fn rejected(
        outcome_id: String,
        event_id: String,
        subscription_id: Option<String>,
        rejection: Rejection,
        source: Source,
        now: DateTime<Utc>,
    ) -> Self {
        Self::from_rejection(outcome_id, event_id, subscription_id, rejection, None, source, now)
    }

    fn from_rejection(
        outcome_id: String,
        event_id: String,
        subscription_id: Option<String>,
        rejection: Rejection,
        limit: Option<&LimitReport>,
        source: Source,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            outcome_id,
            event_id,
            status: OutcomeStatus::Rejected,
            partial: None,
            requested_quantity: None,
            previous_quantity: None,
            subscription_id,
            usage: None,
            limit: None,
            error: Some(ErrorBlock {
                code: rejection.code,
                message: rejection.message,
                field: rejection.field,
                invalid_fields: rejection.invalid_fields,
                available: limit.map(|l| l.available),
                limit: limit.map(LimitBlock::from),
            }),
            source,
            processed_time: now,
        }
    }

    /// The outcome of a decision about a valid request.
    pub fn from_decision(
        outcome_id: String,
        event_id: String,
        subscription_id: &str,
        decision: &Decision,
        source: Source,
        now: DateTime<Utc>,
    ) -> Self {
        match decision {
            Decision::Created {
                quantity,
                requested_quantity,
                partial,
                usage_time,
                limit,
                ..
            } => Self {
                outcome_id,
                event_id: event_id.clone(),
                status: OutcomeStatus::Created,
                partial: Some(*partial),
                requested_quantity: Some(*requested_quantity),
                previous_quantity: None,
                subscription_id: Some(subscription_id.to_owned()),
                usage: Some(UsageBody::new(
                    event_id,
                    subscription_id.to_owned(),
                    *quantity,
                    *usage_time,
                    now,
                )),
                limit: limit.as_ref().map(LimitBlock::from),
                error: None,
                source,
                processed_time: now,
            },
            Decision::Duplicate { original } => Self::duplicate(outcome_id, original, source, now),
            Decision::Voided { usage } => Self::voided(outcome_id, usage, source, now),
            Decision::Amended {
                previous_quantity,
                requested_quantity,
                partial,
                usage,
                limit,
                ..
            } => Self {
                outcome_id,
                event_id: usage.id.clone(),
                status: OutcomeStatus::Amended,
                partial: Some(*partial),
                requested_quantity: Some(*requested_quantity),
                previous_quantity: Some(*previous_quantity),
                subscription_id: Some(usage.subscription_id.clone()),
                usage: Some(UsageBody::from(usage)),
                limit: limit.as_ref().map(LimitBlock::from),
                error: None,
                source,
                processed_time: now,
            },
            Decision::Rejected { rejection, limit } => Self::from_rejection(
                outcome_id,
                event_id,
                Some(subscription_id.to_owned()),
                rejection.clone(),
                limit.as_ref(),
                source,
                now,
            ),
        }
    }

    fn duplicate(outcome_id: String, original: &StoredUsage, source: Source, now: DateTime<Utc>) -> Self {
        Self {
            outcome_id,
            event_id: original.id.clone(),
            status: OutcomeStatus::Duplicate,
            // Whether the usage holds less than it was last asked for (by
            // its report, or by its last amendment).
            partial: Some(original.quantity != original.last_requested_quantity.unwrap_or(original.requested_quantity)),
            requested_quantity: Some(original.requested_quantity),
            previous_quantity: None,
            subscription_id: Some(original.subscription_id.clone()),
            usage: Some(UsageBody::from(original)),
            limit: None,
            error: None,
            source,
            processed_time: now,
        }
    }

    /// The outcome of a void: it carries the usage with the quantity it
    /// had, so invoicing can take that back out.
    pub fn voided(outcome_id: String, usage: &StoredUsage, source: Source, now: DateTime<Utc>) -> Self {
        Self {
            outcome_id,
            event_id: usage.id.clone(),
            status: OutcomeStatus::Voided,
            partial: None,
            requested_quantity: None,
            previous_quantity: None,
            subscription_id: Some(usage.subscription_id.clone()),
            usage: Some(UsageBody::from(usage)),
            limit: None,
            error: None,
            source,
            processed_time: now,
        }
    }

    /// Headers every outcome record carries, besides `outbox-seq` (added
    /// when it is published).
    pub fn headers(&self) -> Headers {
        [
            ("outcome-id", self.outcome_id.as_str()),
            ("event-id", self.event_id.as_str()),
            ("status", self.status.as_str()),
        ]
        .into_iter()
        .collect()
    }
}

/// A limit-reached alert on `usage-alerts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Stable per subscription, period, kind and threshold: consumers drop
    /// repeats by it.
    pub alert_id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub subscription_id: String,
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_start_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "serialize_opt_time")]
    pub period_end_time: Option<DateTime<Utc>>,
    /// 75, 90 or 100: the percentage of the limit reached.
    pub threshold: u8,
    /// The quantity limit; absent for an amount limit (`limitAmount`).
    #[serde(serialize_with = "serialize_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub limit: Option<Decimal>,
    #[serde(serialize_with = "serialize_decimal")]
    pub used: Decimal,
    #[serde(flatten)]
    pub amount: AmountBlock,
    pub usage_id: String,
    #[serde(serialize_with = "serialize_time")]
    pub time: DateTime<Utc>,
}

impl Alert {
    pub fn new(
        subscription_id: &str,
        period_start: DateTime<Utc>,
        period_end: Option<DateTime<Utc>>,
        reached: &super::decision::LimitReached,
        usage_id: &str,
        now: DateTime<Utc>,
    ) -> Self {
        // At 100 % the key is version 1's, so that its alerts keep their ids.
        let key = format!(
            "{subscription_id}\u{0}{}\u{0}{}",
            period_start.timestamp_micros(),
            reached.step().stored()
        );
        let hash = Sha256::digest(key.as_bytes());
        let alert_id = format!(
            "al_{}",
            hash.iter().take(16).map(|b| format!("{b:02x}")).collect::<String>()
        );
        Self {
            alert_id,
            kind: reached.kind.alert_type(),
            subscription_id: subscription_id.to_owned(),
            period_start_time: period_start_of(period_start),
            period_end_time: period_end,
            threshold: reached.threshold,
            limit: reached.limit,
            used: reached.used,
            amount: reached.amount.as_ref().into(),
            usage_id: usage_id.to_owned(),
            time: now,
        }
    }

    pub fn headers(&self) -> Headers {
        [("alert-id", self.alert_id.as_str()), ("type", self.kind)]
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn chrono_text(t: DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    proptest! {
        /// From year -300 to 10300, at any nanosecond.
        #[test]
        fn times_are_written_as_chrono_writes_them(
            seconds in -71_640_000_000i64..262_880_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let t = DateTime::from_timestamp(seconds, nanos).unwrap();
            prop_assert_eq!(format_time(t), chrono_text(t));
        }
    }

    #[test]
    fn times_at_the_edges_are_written_as_chrono_writes_them() {
        let leap_second = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        for t in [
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2026-11-27T10:00:00.000999Z",
            "1970-01-01T00:00:00.001Z",
        ]
        .map(|text| text.parse::<DateTime<Utc>>().unwrap())
        .into_iter()
        .chain([
            leap_second,
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            DateTime::from_timestamp(-62_167_219_201, 0).unwrap(),
            DateTime::from_timestamp(253_402_300_800, 0).unwrap(),
        ]) {
            assert_eq!(format_time(t), chrono_text(t), "{t:?}");
        }
        assert_eq!(format_time(leap_second), "2016-12-31T23:59:60.500Z");
        assert_eq!(
            format_time("2026-11-27T10:00:00.123999Z".parse().unwrap()),
            "2026-11-27T10:00:00.123Z"
        );
    }

    #[test]
    fn decimals_are_json_numbers_with_exact_digits() {
        #[derive(Serialize)]
        struct Q {
            #[serde(serialize_with = "serialize_decimal")]
            q: Decimal,
        }
        for (input, written) in [
            ("12.500", "12.5"),
            ("1000", "1000"),
            ("0.001", "0.001"),
            ("999999999999.999", "999999999999.999"),
        ] {
            let json = serde_json::to_string(&Q {
                q: Decimal::from_str(input).unwrap(),
            })
            .unwrap();
            assert_eq!(json, format!("{{\"q\":{written}}}"));
        }
    }

    #[test]
    fn usage_links_percent_encode_the_id() {
        assert_eq!(usage_path("usg_1-a.b~c"), "/usages/usg_1-a.b~c");
        assert_eq!(usage_path("a/b?c#d%"), "/usages/a%2Fb%3Fc%23d%25");
        assert_eq!(usage_path("ü"), "/usages/%C3%BC");
    }

    #[test]
    fn a_voided_outcome_carries_the_usage_with_the_quantity_it_had() {
        let t = DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let usage = StoredUsage {
            id: "usg_1".into(),
            subscription_id: "sub_1".into(),
            quantity: Decimal::from(3),
            requested_quantity: Decimal::from(5),
            accept_partial: true,
            usage_time: t,
            invoice_id: None,
            invoice_item_id: None,
            created_time: t,
            updated_time: t,
            period_start: t,
            last_requested_quantity: None,
            voided: Some(crate::domain::decision::Voided {
                time: t,
                reason: Some("meter fault".into()),
                by: "ops".into(),
            }),
        };
        let outcome = Outcome::voided("oc_x".into(), &usage, Source::Http { http: true }, t);
        let json: serde_json::Value = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["status"], "voided");
        assert_eq!(json["usage"]["voidedTime"], "2026-11-27T10:00:00.000Z");
        assert_eq!(json["usage"]["voidReason"], "meter fault");
        assert_eq!(json["usage"]["voidedBy"], "ops");
        assert_eq!(json["eventId"], "usg_1");
        assert_eq!(json["usage"]["quantity"], 3);
        assert_eq!(json["source"], serde_json::json!({"http": true}));
        assert!(json.get("error").is_none());
    }

    #[test]
    fn ids_are_stable_and_distinct_per_message() {
        assert_eq!(kafka_outcome_id("t", 1, 2), kafka_outcome_id("t", 1, 2));
        assert_ne!(kafka_outcome_id("t", 1, 2), kafka_outcome_id("t", 1, 3));
        assert_ne!(kafka_outcome_id("t", 1, 23), kafka_outcome_id("t", 12, 3));
        let id = derived_event_id("usage-events", 3, 1234);
        assert!(id.starts_with("msg_"));
        assert!(crate::domain::ids::check_id(&id).is_ok());
    }

    #[test]
    fn ids_keep_their_spelling_across_releases() {
        // Derived ids are stored as usage ids: a new spelling would let a
        // redelivered event count again. The first 16 bytes of
        // SHA-256("usage-events\0" "3\0" "42"), in lower-case hex.
        assert_eq!(
            derived_event_id("usage-events", 3, 42),
            "msg_fc2dfe4e24ae97a653faa223e9aff514"
        );
        assert_eq!(
            kafka_outcome_id("usage-events", 3, 42),
            "oc_fc2dfe4e24ae97a653faa223e9aff514"
        );
    }

    #[test]
    fn rejected_outcome_names_code_and_fields() {
        let rejection = Rejection::on_field(crate::domain::ReasonCode::MissingField, "quantity", "required");
        let source = Source::Kafka {
            topic: "usage-events".into(),
            partition: 0,
            offset: 7,
            timestamp: None,
        };
        let now = DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let outcome = Outcome::rejected("oc_1".into(), "usg_1".into(), None, rejection, source, now);
        let json: serde_json::Value = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["status"], "rejected");
        assert_eq!(json["error"]["code"], "missing_field");
        assert_eq!(json["error"]["field"], "quantity");
        assert_eq!(json["source"]["offset"], 7);
        assert_eq!(json["processedTime"], "2026-11-27T10:00:00.000Z");
    }
}
