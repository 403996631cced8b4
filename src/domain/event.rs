//! The usage event: bytes from `usage-events` (or an HTTP body, or a
//! CloudEvent's `data`) decoded and validated into a [`UsageRequest`], or
//! the [`Rejection`] that says why not.
//!
//! It also owns [`JsonObject`], the strict reading of a JSON object that
//! every input format here shares: valid UTF-8 JSON, an object at the top,
//! no key repeated at any depth, nesting bounded.
//!
//! Repeated keys are found by a linear, iterative scan of the text that
//! serde_json has already validated, not by a serde `Visitor` over a
//! `deserialize_any` walk: `deserialize_any` reads every number through
//! `f64` and fails on valid JSON such as `1e400`, which would turn an out of
//! range quantity (an `invalid_field`) or an ignored unknown field into a
//! `malformed_payload`; and it recurses, so depth would have to be trusted to
//! serde_json's limit instead of being checked here.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::ids::{check_id, DERIVED_ID_PREFIX};
use super::quantity::{json_kind, parse_quantity};
use super::reason::{InvalidField, ReasonCode, Rejection};

/// Deepest nesting accepted anywhere in an input document; the same as
/// serde_json's own recursion limit, so nothing it would refuse gets in.
pub const MAX_NESTING_DEPTH: usize = 128;

/// Repeated keys longer than this are shortened in messages, so an outcome
/// never echoes a large part of a payload.
const MAX_KEY_IN_MESSAGE: usize = 50;

/// Why bytes are not a usable JSON object; each becomes `malformed_payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MalformedJson {
    NotUtf8,
    /// serde_json's description, with line and column.
    NotJson(String),
    NotAnObject,
    DuplicateKey(String),
    TooDeep,
}

impl fmt::Display for MalformedJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("payload is not valid UTF-8"),
            Self::NotJson(e) => write!(f, "payload is not valid JSON: {e}"),
            Self::NotAnObject => f.write_str("payload must be a JSON object"),
            Self::DuplicateKey(key) => {
                let shown: String = key.chars().take(MAX_KEY_IN_MESSAGE).collect();
                let more = if shown.len() < key.len() { "…" } else { "" };
                write!(f, "payload repeats the key \"{}{more}\"", shown.escape_debug())
            }
            Self::TooDeep => write!(f, "payload nests deeper than {MAX_NESTING_DEPTH} levels"),
        }
    }
}

impl std::error::Error for MalformedJson {}

impl From<MalformedJson> for Rejection {
    fn from(e: MalformedJson) -> Self {
        Rejection::new(ReasonCode::MalformedPayload, e.to_string())
    }
}

/// A JSON object read strictly, with its members kept as raw JSON so each
/// field can be validated exactly (numbers never pass through `f64`).
#[derive(Debug, Clone, Default)]
pub struct JsonObject<'a> {
    /// Keys are unique by construction (a repeat is an error), so a map
    /// loses nothing.
    members: BTreeMap<String, &'a RawValue>,
}

impl<'a> JsonObject<'a> {
    /// Reads bytes that must be UTF-8 JSON holding one object.
    pub fn from_slice(bytes: &'a [u8]) -> Result<Self, MalformedJson> {
        let text = std::str::from_utf8(bytes).map_err(|_| MalformedJson::NotUtf8)?;
        Self::parse(text)
    }

    /// Reads text that must be JSON holding one object, with no key repeated
    /// in it or in anything nested in it.
    pub fn parse(text: &'a str) -> Result<Self, MalformedJson> {
        Self::parse_checking(text, KeyCheck::EveryObject)
    }

    /// Reads text that must be JSON holding one object whose own keys are
    /// unique; a key repeated deeper is left to whoever reads that member on
    /// its own. `POST /usage-batches` reads its body so: a usage body that
    /// repeats a key is that body's `malformed_payload`, not the batch's.
    pub fn parse_outer(text: &'a str) -> Result<Self, MalformedJson> {
        Self::parse_checking(text, KeyCheck::OuterObject)
    }

    fn parse_checking(text: &'a str, check: KeyCheck) -> Result<Self, MalformedJson> {
        // Capturing members as `RawValue` validates the whole document
        // without recursion and without interpreting numbers.
        let members = match serde_json::from_str::<BTreeMap<String, &'a RawValue>>(text) {
            Ok(members) => members,
            Err(e) => {
                return Err(match serde_json::from_str::<&RawValue>(text) {
                    Ok(_) => MalformedJson::NotAnObject,
                    Err(_) => MalformedJson::NotJson(e.to_string()),
                })
            }
        };
        check_unique_keys(text, check)?;
        Ok(Self { members })
    }

    /// The member's raw JSON, including a literal `null`.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.members.get(name).copied()
    }

    /// The member's raw JSON when it is present and not `null`: SPEC treats
    /// an absent field and a null one alike.
    pub fn given(&self, name: &str) -> Option<&'a RawValue> {
        self.get(name).filter(|raw| !is_null(raw))
    }

    /// Sets `name` to `value` unless it is already given (present and not
    /// null). CloudEvents use this: `data.id` wins, else the CloudEvent `id`.
    pub fn set_default(&mut self, name: &str, value: &'a RawValue) {
        if self.given(name).is_none() {
            self.members.insert(name.to_owned(), value);
        }
    }

    /// All members, by key.
    pub fn members(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.members.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// The JSON string in `raw`, decoded; the error is the outcome's message.
pub(crate) fn json_string(raw: &RawValue) -> Result<String, String> {
    if !raw.get().starts_with('"') {
        return Err(format!("must be a string, got {}", json_kind(raw)));
    }
    // The document is valid JSON already, so only an escape that does not
    // decode to a character (an unpaired surrogate) can fail here.
    serde_json::from_str(raw.get()).map_err(|_| "must not contain an unpaired surrogate escape".to_owned())
}

/// Which objects of a document [`check_unique_keys`] holds to unique keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyCheck {
    EveryObject,
    /// The outermost object only.
    OuterObject,
}

/// What one open bracket of [`check_unique_keys`] has seen so far.
enum Frame {
    Object { keys: HashSet<String> },
    Array,
}

/// Finds a key repeated within any one object (at any depth, or in the
/// outermost object only), and nesting deeper than [`MAX_NESTING_DEPTH`].
///
/// `text` must already be valid JSON: then every `"` outside a string opens
/// one, a string ends at the first unescaped `"`, and a string is a key
/// exactly when it follows `{` or a `,` inside an object.
fn check_unique_keys(text: &str, check: KeyCheck) -> Result<(), MalformedJson> {
    let bytes = text.as_bytes();
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            open @ (b'{' | b'[') => {
                if stack.len() == MAX_NESTING_DEPTH {
                    return Err(MalformedJson::TooDeep);
                }
                expect_key = open == b'{';
                stack.push(if expect_key {
                    Frame::Object { keys: HashSet::new() }
                } else {
                    Frame::Array
                });
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
            }
            b',' => expect_key = matches!(stack.last(), Some(Frame::Object { .. })),
            b'"' => {
                let end = string_end(bytes, i);
                if expect_key {
                    expect_key = false;
                    if check == KeyCheck::EveryObject || stack.len() == 1 {
                        let token = &text[i..end];
                        let key: String =
                            serde_json::from_str(token).map_err(|e| MalformedJson::NotJson(e.to_string()))?;
                        if let Some(Frame::Object { keys }) = stack.last_mut() {
                            if let Some(key) = keys.replace(key) {
                                return Err(MalformedJson::DuplicateKey(key));
                            }
                        }
                    }
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Index just past the string token starting at `start` (a `"`). Bytes of
/// multi-byte UTF-8 characters are never `"` or `\`, so scanning bytes is
/// enough.
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Parses an RFC 3339 date-time that carries an offset (`Z` or `±hh:mm`, in
/// either letter case as RFC 3339 allows, leap second `:60` as chrono reads
/// it) and converts it to UTC. The error is the outcome's message.
///
/// The `T` separator is required: the space RFC 3339 lets applications use
/// "for readability" is not part of its grammar, and one spelling keeps
/// producers honest.
pub(crate) fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    let shaped = text.is_ascii() && matches!(text.as_bytes().get(10), Some(b'T' | b't'));
    if shaped {
        if let Ok(time) = DateTime::parse_from_rfc3339(text) {
            return normalize(time.with_timezone(&Utc));
        }
    }
    let without_offset = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dt%H:%M:%S%.f"]
        .iter()
        .any(|format| NaiveDateTime::parse_from_str(text, format).is_ok());
    if without_offset {
        Err("must include an offset (Z or ±hh:mm): a date-time without one is ambiguous".into())
    } else {
        Err("must be an RFC 3339 date-time with an offset, such as \"2026-11-27T10:00:00Z\"".into())
    }
}

/// Keeps an instant to PostgreSQL's precision, so that what is stored and
/// what a re-sent request says compare equal: microseconds, and a leap
/// second as the first instant of the next second (how PostgreSQL stores
/// it). Second 60 is only a leap second at 23:59:60 UTC on a month's last
/// day (RFC 3339, 5.7); anywhere else it is an error.
///
/// The instant must also lie in the years 0000–9999 in UTC: every time the
/// worker writes (outcomes, alerts, the API) is RFC 3339 in UTC, which has
/// four-digit years only, so `0000-01-01T00:00:00+01:00` (in year -1 once in
/// UTC) would be stored but written back as `-0001-12-31T23:00:00.000Z`,
/// which no RFC 3339 reader, this one included, accepts.
fn normalize(time: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    use chrono::{Datelike, Timelike};
    if time.nanosecond() >= 1_000_000_000 {
        let next_day = time.date_naive().succ_opt().map(|d| d.day());
        if (time.hour(), time.minute(), next_day) != (23, 59, Some(1)) {
            return Err("has second 60 where no leap second can be (only 23:59:60 UTC on a month's last day)".into());
        }
    }
    DateTime::from_timestamp_micros(time.timestamp_micros())
        .filter(|t| (0..=9999).contains(&t.year()))
        .ok_or_else(|| "is out of range: it must fall in the years 0000 to 9999 once converted to UTC".to_owned())
}

/// What decoding needs to know about the request around the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeContext {
    /// The time of the request: the Kafka message's timestamp, else the
    /// processing time. Both the default `usageTime` and the future bound.
    pub request_time: DateTime<Utc>,
    /// How far after `request_time` a `usageTime` may lie (SPEC: 5 minutes).
    pub max_future: Duration,
    /// Larger payloads are rejected unread (SPEC: 64 KiB).
    pub max_payload_bytes: usize,
}

/// A validated `POST /usages` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRequest {
    /// The idempotency key; `None` when the event had none (the pipeline
    /// derives one from the message's coordinates).
    pub id: Option<String>,
    pub subscription_id: String,
    /// Normalized: no trailing zeros.
    pub quantity: Decimal,
    /// `Some` only when the request gave one, because "the same request"
    /// compares `usageTime` only then.
    pub usage_time: Option<DateTime<Utc>>,
    pub accept_partial: bool,
}

impl UsageRequest {
    /// The instant the usage counts at: the given `usageTime`, else the time
    /// of the request.
    pub fn effective_usage_time(&self, request_time: DateTime<Utc>) -> DateTime<Utc> {
        self.usage_time.unwrap_or(request_time)
    }
}

/// The JSON names of the request fields, in SPEC's table order.
pub mod fields {
    pub const ID: &str = "id";
    pub const SUBSCRIPTION_ID: &str = "subscriptionId";
    pub const QUANTITY: &str = "quantity";
    pub const USAGE_TIME: &str = "usageTime";
    pub const ACCEPT_PARTIAL_QUANTITY: &str = "acceptPartialQuantity";
}

/// Decodes and validates a usage event's bytes.
pub fn decode_usage_event(bytes: &[u8], ctx: &DecodeContext) -> Result<UsageRequest, Rejection> {
    if bytes.len() > ctx.max_payload_bytes {
        return Err(Rejection::new(
            ReasonCode::PayloadTooLarge,
            format!(
                "payload is {} bytes, over the limit of {} bytes",
                bytes.len(),
                ctx.max_payload_bytes
            ),
        ));
    }
    let object = JsonObject::from_slice(bytes)?;
    decode_usage_object(&object, ctx)
}

/// The valid `id` and `subscriptionId` a rejected event still has, where it
/// has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub id: Option<String>,
    pub subscription_id: Option<String>,
}

/// The identity of an event that was rejected, so that its outcome names its
/// own id and is keyed by its subscription. Only ever called on the (rare)
/// rejection path.
pub fn identify(bytes: &[u8], max_payload_bytes: usize) -> Identity {
    if bytes.len() > max_payload_bytes {
        return Identity::default();
    }
    let Ok(object) = JsonObject::from_slice(bytes) else {
        return Identity::default();
    };
    Identity {
        id: decode_id(object.given(fields::ID)).ok().flatten(),
        subscription_id: decode_subscription_id(object.given(fields::SUBSCRIPTION_ID)).ok(),
    }
}

/// Validates a request body already read as a [`JsonObject`] (an event, a
/// CloudEvent's `data`, an HTTP body). Every wrong field is reported, in
/// SPEC's table order; read-only and unknown fields are ignored.
pub fn decode_usage_object(object: &JsonObject<'_>, ctx: &DecodeContext) -> Result<UsageRequest, Rejection> {
    let id = decode_id(object.given(fields::ID));
    let subscription_id = decode_subscription_id(object.given(fields::SUBSCRIPTION_ID));
    let quantity = decode_quantity(object.given(fields::QUANTITY));
    let usage_time = decode_usage_time(object.given(fields::USAGE_TIME), ctx);
    let accept_partial = decode_accept_partial(object.given(fields::ACCEPT_PARTIAL_QUANTITY));

    match (id, subscription_id, quantity, usage_time, accept_partial) {
        (Ok(id), Ok(subscription_id), Ok(quantity), Ok(usage_time), Ok(accept_partial)) => Ok(UsageRequest {
            id,
            subscription_id,
            quantity,
            usage_time,
            accept_partial,
        }),
        (id, subscription_id, quantity, usage_time, accept_partial) => {
            let problems = [
                id.err(),
                subscription_id.err(),
                quantity.err(),
                usage_time.err(),
                accept_partial.err(),
            ]
            .into_iter()
            .flatten()
            .collect();
            Err(Rejection::from_fields(problems).expect("a field failed, or the first arm would have matched"))
        }
    }
}

pub(super) fn problem(field: &'static str, code: ReasonCode, message: impl fmt::Display) -> InvalidField {
    InvalidField {
        field,
        code,
        message: format!("{field} {message}"),
    }
}

pub(super) fn invalid(field: &'static str, message: impl fmt::Display) -> InvalidField {
    problem(field, ReasonCode::InvalidField, message)
}

pub(super) fn missing(field: &'static str) -> InvalidField {
    problem(field, ReasonCode::MissingField, "is required")
}

/// A string field held to the shared id rules.
pub(super) fn decode_id_string(field: &'static str, raw: &RawValue) -> Result<String, InvalidField> {
    let value = json_string(raw).map_err(|message| invalid(field, message))?;
    check_id(&value).map_err(|message| invalid(field, message))?;
    Ok(value)
}

pub(super) fn decode_id(raw: Option<&RawValue>) -> Result<Option<String>, InvalidField> {
    let Some(raw) = raw else { return Ok(None) };
    let id = decode_id_string(fields::ID, raw)?;
    check_new_id_prefix(&id)?;
    Ok(Some(id))
}

/// The id of a new usage given apart from a body (`PUT /usages/{id}`'s
/// path): the id rules and the reserved prefix, as for a body's `id`.
pub fn check_new_usage_id(id: &str) -> Result<(), Rejection> {
    check_id(id)
        .map_err(|message| invalid(fields::ID, message))
        .and_then(|()| check_new_id_prefix(id))
        .map_err(|problem| Rejection::from_fields(vec![problem]).expect("one problem"))
}

fn check_new_id_prefix(id: &str) -> Result<(), InvalidField> {
    if id.starts_with(DERIVED_ID_PREFIX) {
        return Err(invalid(
            fields::ID,
            format_args!("must not start with \"{DERIVED_ID_PREFIX}\" (reserved for ids the worker derives)"),
        ));
    }
    Ok(())
}

pub(super) fn decode_subscription_id(raw: Option<&RawValue>) -> Result<String, InvalidField> {
    let raw = raw.ok_or_else(|| missing(fields::SUBSCRIPTION_ID))?;
    decode_id_string(fields::SUBSCRIPTION_ID, raw)
}

pub(super) fn decode_quantity(raw: Option<&RawValue>) -> Result<Decimal, InvalidField> {
    let raw = raw.ok_or_else(|| missing(fields::QUANTITY))?;
    parse_quantity(raw).map_err(|message| invalid(fields::QUANTITY, message))
}

fn decode_usage_time(raw: Option<&RawValue>, ctx: &DecodeContext) -> Result<Option<DateTime<Utc>>, InvalidField> {
    let field = fields::USAGE_TIME;
    let Some(raw) = raw else { return Ok(None) };
    let text = json_string(raw).map_err(|message| invalid(field, message))?;
    if text.is_empty() {
        return Ok(None);
    }
    let time = parse_timestamp(&text).map_err(|message| invalid(field, message))?;
    // An unrepresentable bound is later than any time there is.
    let latest = ctx.request_time.checked_add_signed(ctx.max_future);
    if latest.is_some_and(|latest| time > latest) {
        return Err(problem(
            field,
            ReasonCode::UsageTimeInFuture,
            format_args!(
                "must be at most {} seconds after the time of the request",
                ctx.max_future.num_seconds()
            ),
        ));
    }
    Ok(Some(time))
}

pub(super) fn decode_accept_partial(raw: Option<&RawValue>) -> Result<bool, InvalidField> {
    let field = fields::ACCEPT_PARTIAL_QUANTITY;
    let Some(raw) = raw else { return Ok(false) };
    match raw.get() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(
            field,
            format_args!("must be a boolean, got {}", json_kind(raw)),
        )),
    }
}

#[cfg(test)]
mod normalize_tests {
    use super::parse_timestamp;
    use crate::domain::outcome::format_time;

    #[test]
    fn times_are_kept_to_microseconds() {
        let t = parse_timestamp("2026-11-27T10:00:00.123456789Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-27T10:00:00.123456+00:00");
    }

    #[test]
    fn a_real_leap_second_is_the_next_second() {
        let t = parse_timestamp("2016-12-31T23:59:60Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2017-01-01T00:00:00+00:00");
        assert!(parse_timestamp("2016-12-31T23:59:60.5Z").is_ok());
    }

    #[test]
    fn times_outside_the_four_digit_utc_years_are_rejected() {
        // The round trip of fuzz/fuzz_targets/decode_event.rs: accepted, then written
        // back as "-0001-12-31T23:00:00.000Z", which is not RFC 3339.
        for bad in [
            "0000-01-01T00:00:00+01:00",
            "9999-12-31T23:00:00-05:00",
            "9999-12-31T23:59:60Z",
        ] {
            assert!(parse_timestamp(bad).unwrap_err().contains("0000 to 9999"), "{bad}");
        }
        for good in [
            "0000-01-01T00:00:00Z",
            "0000-01-01T01:00:00+01:00",
            "9999-12-31T23:59:59.999999Z",
        ] {
            let written = format_time(parse_timestamp(good).unwrap());
            assert!(parse_timestamp(&written).is_ok(), "{good} is written back as {written}");
        }
    }

    #[test]
    fn second_60_elsewhere_is_rejected() {
        for bad in [
            "2026-11-27T09:59:60Z",
            "2016-12-31T23:59:60+01:00",
            "2026-11-15T23:59:60Z",
        ] {
            assert!(parse_timestamp(bad).unwrap_err().contains("second 60"), "{bad}");
        }
    }
}

#[cfg(test)]
mod identify_tests {
    use super::{identify, Identity};

    #[test]
    fn a_rejected_event_keeps_its_valid_ids() {
        let identity = identify(br#"{"id": "usg_1", "subscriptionId": "sub_1", "quantity": -1}"#, 1000);
        assert_eq!(
            identity,
            Identity {
                id: Some("usg_1".to_owned()),
                subscription_id: Some("sub_1".to_owned()),
            }
        );
    }

    #[test]
    fn invalid_ids_are_not_used() {
        assert_eq!(
            identify(br#"{"id": "msg_1", "subscriptionId": "a b"}"#, 1000),
            Identity::default()
        );
        assert_eq!(identify(b"not json", 1000), Identity::default());
        assert_eq!(identify(br#"{"id": "usg_1"}"#, 5), Identity::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn request_time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap()
    }

    fn ctx() -> DecodeContext {
        DecodeContext {
            request_time: request_time(),
            max_future: Duration::minutes(5),
            max_payload_bytes: 64 * 1024,
        }
    }

    fn decode(json: &str) -> Result<UsageRequest, Rejection> {
        decode_usage_event(json.as_bytes(), &ctx())
    }

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// A valid event with `field` replaced by the JSON `value` (or removed
    /// when `value` is `None`).
    fn event_with(field: &str, value: Option<&str>) -> String {
        let mut members = vec![
            ("id", "\"usg_1\""),
            ("subscriptionId", "\"sub_42\""),
            ("quantity", "12.5"),
            ("usageTime", "\"2026-11-27T09:00:00Z\""),
            ("acceptPartialQuantity", "false"),
        ];
        members.retain(|(name, _)| *name != field);
        if let Some(value) = value {
            members.push((field, value));
        }
        let body: Vec<String> = members
            .iter()
            .map(|(name, value)| format!("\"{name}\": {value}"))
            .collect();
        format!("{{{}}}", body.join(", "))
    }

    fn rejection(json: &str) -> Rejection {
        decode(json).expect_err("should be rejected")
    }

    fn field_rejection(field: &str, value: Option<&str>) -> Rejection {
        rejection(&event_with(field, value))
    }

    fn assert_rejected(rej: &Rejection, code: ReasonCode, field: &str) {
        assert_eq!(rej.code, code, "{rej:?}");
        assert_eq!(rej.field, Some(field), "{rej:?}");
    }

    // --- the whole request ---

    #[test]
    fn decodes_a_complete_request() {
        let request = decode(&event_with("acceptPartialQuantity", Some("true"))).unwrap();
        assert_eq!(
            request,
            UsageRequest {
                id: Some("usg_1".into()),
                subscription_id: "sub_42".into(),
                quantity: dec("12.5"),
                usage_time: Some(Utc.with_ymd_and_hms(2026, 11, 27, 9, 0, 0).unwrap()),
                accept_partial: true,
            }
        );
    }

    #[test]
    fn decodes_a_minimal_request_with_defaults() {
        let request = decode(r#"{"subscriptionId": "sub_42", "quantity": 1}"#).unwrap();
        assert_eq!(request.id, None);
        assert_eq!(request.usage_time, None);
        assert!(!request.accept_partial);
        assert_eq!(request.effective_usage_time(request_time()), request_time());
    }

    #[test]
    fn effective_usage_time_prefers_the_given_time() {
        let request = decode(&event_with("id", None)).unwrap();
        assert_eq!(
            request.effective_usage_time(request_time()),
            Utc.with_ymd_and_hms(2026, 11, 27, 9, 0, 0).unwrap()
        );
    }

    #[test]
    fn ignores_read_only_and_unknown_fields() {
        let json = r#"{"subscriptionId": "sub_42", "quantity": 1,
            "invoiceId": 5, "invoiceItemId": null, "createdTime": "whenever",
            "updatedTime": [], "_links": [{"href": "/usages/x", "rel": "self"}],
            "somethingElse": {"deep": [1e400, -0.5]}}"#;
        assert!(decode(json).is_ok());
    }

    #[test]
    fn names_every_wrong_field_in_table_order() {
        // Written in reverse order: the outcome still follows SPEC's table.
        let json = r#"{"acceptPartialQuantity": "yes", "usageTime": "yesterday",
            "quantity": 0, "subscriptionId": "", "id": "msg_1"}"#;
        let rej = rejection(json);
        assert_rejected(&rej, ReasonCode::InvalidField, "id");
        let named: Vec<_> = rej.invalid_fields.iter().map(|f| f.field).collect();
        assert_eq!(
            named,
            ["id", "subscriptionId", "quantity", "usageTime", "acceptPartialQuantity"]
        );
        assert_eq!(rej.message, rej.invalid_fields[0].message);
    }

    #[test]
    fn reports_the_first_field_code_when_codes_differ() {
        let rej = rejection(r#"{"quantity": "abc", "usageTime": "2030-01-01T00:00:00Z"}"#);
        assert_rejected(&rej, ReasonCode::MissingField, "subscriptionId");
        let codes: Vec<_> = rej.invalid_fields.iter().map(|f| (f.field, f.code)).collect();
        assert_eq!(
            codes,
            [
                ("subscriptionId", ReasonCode::MissingField),
                ("quantity", ReasonCode::InvalidField),
                ("usageTime", ReasonCode::UsageTimeInFuture),
            ]
        );
    }

    // --- payload ---

    #[test]
    fn rejects_an_oversize_payload_unread() {
        let ctx = DecodeContext {
            max_payload_bytes: 10,
            ..ctx()
        };
        // Not even JSON: the size is checked before anything is parsed.
        let rej = decode_usage_event(&[b'x'; 11], &ctx).unwrap_err();
        assert_eq!(rej.code, ReasonCode::PayloadTooLarge);
        assert_eq!(rej.field, None);
        assert!(rej.message.contains("11 bytes"), "{}", rej.message);
    }

    #[test]
    fn accepts_a_payload_of_exactly_the_limit() {
        let json = r#"{"subscriptionId":"s","quantity":1}"#;
        let ctx = DecodeContext {
            max_payload_bytes: json.len(),
            ..ctx()
        };
        assert!(decode_usage_event(json.as_bytes(), &ctx).is_ok());
    }

    #[test]
    fn rejects_invalid_utf8_as_malformed() {
        let rej = decode_usage_event(b"{\"subscriptionId\": \"s\xff\", \"quantity\": 1}", &ctx()).unwrap_err();
        assert_eq!(rej.code, ReasonCode::MalformedPayload);
        assert_eq!(rej.message, "payload is not valid UTF-8");
    }

    #[test]
    fn rejects_non_objects_as_malformed() {
        for json in ["[]", "1", "null", "\"x\"", "true", "[{\"subscriptionId\": \"s\"}]"] {
            let rej = rejection(json);
            assert_eq!(rej.code, ReasonCode::MalformedPayload, "{json}");
            assert_eq!(rej.message, "payload must be a JSON object", "{json}");
        }
    }

    #[test]
    fn rejects_text_that_is_not_json_as_malformed() {
        for json in [
            "",
            " ",
            "{",
            "{\"a\": 1,}",
            "{} {}",
            "{'a': 1}",
            "\u{feff}{}",
            "{\"a\": NaN}",
        ] {
            let rej = rejection(json);
            assert_eq!(rej.code, ReasonCode::MalformedPayload, "{json:?}");
            assert!(
                rej.message.starts_with("payload is not valid JSON"),
                "{json:?}: {}",
                rej.message
            );
            assert_eq!(rej.field, None);
        }
    }

    #[test]
    fn rejects_a_repeated_top_level_key() {
        let rej = rejection(r#"{"subscriptionId": "a", "quantity": 1, "subscriptionId": "b"}"#);
        assert_eq!(rej.code, ReasonCode::MalformedPayload);
        assert_eq!(rej.message, "payload repeats the key \"subscriptionId\"");
    }

    #[test]
    fn rejects_a_key_repeated_under_another_spelling() {
        let rej = rejection(r#"{"subscriptionId": "a", "quantity": 1, "quantit\u0079": 2}"#);
        assert_eq!(rej.code, ReasonCode::MalformedPayload);
    }

    #[test]
    fn rejects_a_repeated_key_in_a_nested_object() {
        let rej = rejection(
            r#"{"subscriptionId": "a", "quantity": 1,
                "_links": [{"href": "/x", "rel": "self", "href": "/y"}]}"#,
        );
        assert_eq!(rej.code, ReasonCode::MalformedPayload);
        assert!(rej.message.contains("\"href\""), "{}", rej.message);
    }

    #[test]
    fn an_outer_reading_checks_only_the_outermost_keys() {
        let inner_repeat =
            r#"{"usages": [{"quantity": 1, "quantity": 2}, {"a": {"b": 1, "b": 2}}], "x": "\"usages\""}"#;
        let outer = JsonObject::parse_outer(inner_repeat).unwrap();
        assert!(outer.get("usages").is_some());
        assert!(matches!(
            JsonObject::parse(inner_repeat),
            Err(MalformedJson::DuplicateKey(key)) if key == "quantity"
        ));
        let outer_repeat = r#"{"usages": [], "z": {"usages": 1}, "usages": []}"#;
        assert!(matches!(
            JsonObject::parse_outer(outer_repeat),
            Err(MalformedJson::DuplicateKey(key)) if key == "usages"
        ));
        let deep = format!(r#"{{"usages": {}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(JsonObject::parse_outer(&deep).unwrap_err(), MalformedJson::TooDeep);
        assert_eq!(JsonObject::parse_outer("[1]").unwrap_err(), MalformedJson::NotAnObject);
    }

    #[test]
    fn allows_the_same_key_in_sibling_and_nested_objects() {
        let json = r#"{"subscriptionId": "a", "quantity": 1,
            "x": {"id": 1, "y": {"id": 2}}, "z": [{"id": 3}, {"id": 4}], "w": "\"id\", \"id\""}"#;
        assert!(decode(json).is_ok());
    }

    #[test]
    fn rejects_10000_deep_nesting_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let json = format!(r#"{{"subscriptionId": "a", "quantity": 1, "x": {deep}}}"#);
        let rej = rejection(&json);
        assert_eq!(rej.code, ReasonCode::MalformedPayload);
        assert_eq!(rej.message, "payload nests deeper than 128 levels");

        let deep_objects = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        assert_eq!(rejection(&deep_objects).code, ReasonCode::MalformedPayload);
        let deep_arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(rejection(&deep_arrays).code, ReasonCode::MalformedPayload);
    }

    #[test]
    fn accepts_nesting_up_to_the_limit() {
        // The event object is level 1.
        let inner = MAX_NESTING_DEPTH - 1;
        let nested = format!("{}{}", "[".repeat(inner), "]".repeat(inner));
        let json = format!(r#"{{"subscriptionId": "a", "quantity": 1, "x": {nested}}}"#);
        assert!(decode(&json).is_ok());
        let nested = format!("[{nested}]");
        let json = format!(r#"{{"subscriptionId": "a", "quantity": 1, "x": {nested}}}"#);
        assert_eq!(rejection(&json).code, ReasonCode::MalformedPayload);
    }

    // --- id ---

    #[test]
    fn treats_a_null_id_as_absent() {
        assert_eq!(decode(&event_with("id", Some("null"))).unwrap().id, None);
    }

    #[test]
    fn accepts_a_50_character_id() {
        let id = format!("\"{}\"", "a".repeat(50));
        assert_eq!(decode(&event_with("id", Some(&id))).unwrap().id, Some("a".repeat(50)));
    }

    #[test]
    fn rejects_a_51_character_id() {
        let id = format!("\"{}\"", "a".repeat(51));
        let rej = field_rejection("id", Some(&id));
        assert_rejected(&rej, ReasonCode::InvalidField, "id");
        assert!(rej.message.contains("51"), "{}", rej.message);
    }

    #[test]
    fn rejects_ids_with_whitespace_zero_width_or_control_characters() {
        for id in [
            r#""a b""#,
            r#""a\tb""#,
            r#""a\u200bb""#,
            r#""a\u0000b""#,
            "\"\u{feff}a\"",
        ] {
            assert_rejected(&field_rejection("id", Some(id)), ReasonCode::InvalidField, "id");
        }
    }

    #[test]
    fn rejects_an_empty_id() {
        assert_rejected(&field_rejection("id", Some("\"\"")), ReasonCode::InvalidField, "id");
    }

    #[test]
    fn rejects_an_id_with_the_derived_prefix() {
        let rej = field_rejection("id", Some("\"msg_x\""));
        assert_rejected(&rej, ReasonCode::InvalidField, "id");
        assert!(rej.message.contains("msg_"), "{}", rej.message);
    }

    #[test]
    fn rejects_an_id_that_is_not_a_string() {
        for id in ["1", "true", "{}", "[\"a\"]"] {
            assert_rejected(&field_rejection("id", Some(id)), ReasonCode::InvalidField, "id");
        }
    }

    #[test]
    fn rejects_an_id_with_an_unpaired_surrogate_escape() {
        let rej = field_rejection("id", Some(r#""usg_\ud800""#));
        assert_rejected(&rej, ReasonCode::InvalidField, "id");
        assert!(rej.message.contains("surrogate"), "{}", rej.message);
    }

    // --- subscriptionId ---

    #[test]
    fn requires_a_subscription_id() {
        for value in [None, Some("null")] {
            let rej = field_rejection("subscriptionId", value);
            assert_rejected(&rej, ReasonCode::MissingField, "subscriptionId");
            assert_eq!(rej.message, "subscriptionId is required");
        }
    }

    #[test]
    fn rejects_an_empty_subscription_id_as_invalid() {
        let rej = field_rejection("subscriptionId", Some("\"\""));
        assert_rejected(&rej, ReasonCode::InvalidField, "subscriptionId");
    }

    #[test]
    fn rejects_a_subscription_id_that_breaks_the_id_rules() {
        let long = format!("\"{}\"", "s".repeat(51));
        for value in [long.as_str(), "42", r#""sub 42""#, r#""sub\u0000""#] {
            let rej = field_rejection("subscriptionId", Some(value));
            assert_rejected(&rej, ReasonCode::InvalidField, "subscriptionId");
        }
    }

    #[test]
    fn allows_the_derived_prefix_in_a_subscription_id() {
        let request = decode(&event_with("subscriptionId", Some("\"msg_sub\""))).unwrap();
        assert_eq!(request.subscription_id, "msg_sub");
    }

    // --- quantity ---

    #[test]
    fn requires_a_quantity() {
        for value in [None, Some("null")] {
            let rej = field_rejection("quantity", value);
            assert_rejected(&rej, ReasonCode::MissingField, "quantity");
        }
    }

    #[test]
    fn accepts_a_quantity_with_an_exponent() {
        let request = decode(&event_with("quantity", Some("1.5E+2"))).unwrap();
        assert_eq!(request.quantity, dec("150"));
    }

    #[test]
    fn accepts_a_quantity_as_a_decimal_string() {
        let request = decode(&event_with("quantity", Some("\"1.2300\""))).unwrap();
        assert_eq!(request.quantity, dec("1.23"));
        assert_eq!(request.quantity.to_string(), "1.23");
    }

    #[test]
    fn rejects_quantities_outside_the_rules() {
        for (value, message) in [
            ("0.0005", "quantity must be at least 0.001"),
            ("1.2345", "quantity must have at most 3 decimal places"),
            ("1e12", "quantity must be below 1000000000000"),
            ("1e400", "quantity must be below 1000000000000"),
            ("true", "quantity must be a number or a decimal string, got a boolean"),
            (
                "\"\"",
                "quantity must be a number or a decimal string, got an empty string",
            ),
        ] {
            let rej = field_rejection("quantity", Some(value));
            assert_rejected(&rej, ReasonCode::InvalidField, "quantity");
            assert_eq!(rej.message, message);
        }
    }

    // --- usageTime ---

    #[test]
    fn treats_null_or_empty_usage_time_as_absent() {
        for value in [None, Some("null"), Some("\"\"")] {
            let request = decode(&event_with("usageTime", value)).unwrap();
            assert_eq!(request.usage_time, None, "{value:?}");
        }
    }

    #[test]
    fn converts_an_offset_usage_time_to_utc() {
        let request = decode(&event_with("usageTime", Some("\"2026-11-27T10:00:00+05:30\""))).unwrap();
        assert_eq!(
            request.usage_time,
            Some(Utc.with_ymd_and_hms(2026, 11, 27, 4, 30, 0).unwrap())
        );
    }

    #[test]
    fn accepts_rfc3339_variants() {
        for (text, want) in [
            ("2026-11-27t09:00:00z", "2026-11-27T09:00:00Z"),
            ("2026-11-27T09:00:00.123456789Z", "2026-11-27T09:00:00.123456Z"),
            ("2026-11-27T09:00:00-00:00", "2026-11-27T09:00:00Z"),
            ("2026-11-27T11:00:00+02:00", "2026-11-27T09:00:00Z"),
        ] {
            let value = format!("\"{text}\"");
            let request = decode(&event_with("usageTime", Some(&value))).unwrap();
            let want = DateTime::parse_from_rfc3339(want).unwrap().with_timezone(&Utc);
            assert_eq!(request.usage_time, Some(want), "{text}");
        }
    }

    #[test]
    fn accepts_a_leap_second() {
        let request = decode(&event_with("usageTime", Some("\"2016-12-31T23:59:60Z\""))).unwrap();
        // Stored as PostgreSQL stores it: the first instant of the next second.
        assert_eq!(
            request.usage_time,
            Some(Utc.with_ymd_and_hms(2017, 1, 1, 0, 0, 0).unwrap())
        );
    }

    #[test]
    fn rejects_a_usage_time_without_an_offset() {
        for text in ["2026-11-27T10:00:00", "2026-11-27T10:00:00.5"] {
            let rej = field_rejection("usageTime", Some(&format!("\"{text}\"")));
            assert_rejected(&rej, ReasonCode::InvalidField, "usageTime");
            assert!(rej.message.contains("offset"), "{}", rej.message);
            assert!(rej.message.contains("ambiguous"), "{}", rej.message);
        }
    }

    #[test]
    fn rejects_usage_times_in_other_formats() {
        for text in [
            "yesterday",
            "2026-11-27",
            "2026-11-27 10:00:00Z",
            "27/11/2026 10:00",
            "2026-11-27T10:00:00+0530",
            "2026-11-27T10:00:00\u{2212}05:00",
            "2026-11-27T25:00:00Z",
            "2026-02-30T10:00:00Z",
            " 2026-11-27T10:00:00Z",
            "2026-11-27T10:00:00Z ",
            "1764237600",
        ] {
            let rej = field_rejection("usageTime", Some(&format!("\"{text}\"")));
            assert_rejected(&rej, ReasonCode::InvalidField, "usageTime");
            assert!(rej.message.contains("RFC 3339"), "{text}: {}", rej.message);
        }
    }

    #[test]
    fn rejects_a_usage_time_that_is_not_a_string() {
        for value in ["1764237600", "true", "{}"] {
            let rej = field_rejection("usageTime", Some(value));
            assert_rejected(&rej, ReasonCode::InvalidField, "usageTime");
        }
    }

    #[test]
    fn accepts_a_usage_time_exactly_five_minutes_ahead() {
        let request = decode(&event_with("usageTime", Some("\"2026-11-27T10:05:00Z\""))).unwrap();
        assert_eq!(request.usage_time, Some(request_time() + Duration::minutes(5)));
    }

    #[test]
    fn rejects_a_usage_time_five_minutes_and_a_second_ahead() {
        let rej = field_rejection("usageTime", Some("\"2026-11-27T10:05:01Z\""));
        assert_rejected(&rej, ReasonCode::UsageTimeInFuture, "usageTime");
        assert_eq!(
            rej.message,
            "usageTime must be at most 300 seconds after the time of the request"
        );
    }

    #[test]
    fn compares_the_future_bound_as_an_instant() {
        // 15:35 at +05:30 is 10:05 UTC: exactly on the bound.
        assert!(decode(&event_with("usageTime", Some("\"2026-11-27T15:35:00+05:30\""))).is_ok());
        // Times are kept to microseconds, so the first instant past the bound is 1 µs after it.
        let rej = field_rejection("usageTime", Some("\"2026-11-27T10:05:00.000001Z\""));
        assert_eq!(rej.code, ReasonCode::UsageTimeInFuture);
    }

    #[test]
    fn accepts_past_usage_times() {
        assert!(decode(&event_with("usageTime", Some("\"2001-01-01T00:00:00Z\""))).is_ok());
    }

    #[test]
    fn survives_a_future_bound_beyond_the_calendar() {
        let ctx = DecodeContext {
            max_future: Duration::MAX,
            ..ctx()
        };
        let json = event_with("usageTime", Some("\"9999-12-31T23:59:59Z\""));
        assert!(decode_usage_event(json.as_bytes(), &ctx).is_ok());
    }

    // --- acceptPartialQuantity ---

    #[test]
    fn reads_accept_partial_quantity_as_a_boolean() {
        for (value, want) in [
            (None, false),
            (Some("null"), false),
            (Some("false"), false),
            (Some("true"), true),
        ] {
            let request = decode(&event_with("acceptPartialQuantity", value)).unwrap();
            assert_eq!(request.accept_partial, want, "{value:?}");
        }
    }

    #[test]
    fn rejects_accept_partial_quantity_that_is_not_a_boolean() {
        for value in ["\"true\"", "1", "0", "{}", "[]"] {
            let rej = field_rejection("acceptPartialQuantity", Some(value));
            assert_rejected(&rej, ReasonCode::InvalidField, "acceptPartialQuantity");
        }
    }

    // --- JsonObject ---

    #[test]
    fn set_default_fills_only_absent_or_null_members() {
        let fallback = RawValue::from_string("\"ce_1\"".into()).unwrap();
        let mut object = JsonObject::parse(r#"{"id": null}"#).unwrap();
        object.set_default("id", &fallback);
        assert_eq!(object.given("id").map(RawValue::get), Some("\"ce_1\""));

        let mut object = JsonObject::parse(r#"{"id": "usg_1"}"#).unwrap();
        object.set_default("id", &fallback);
        assert_eq!(object.given("id").map(RawValue::get), Some("\"usg_1\""));
    }

    #[test]
    fn keeps_members_as_raw_json() {
        let object = JsonObject::parse(r#"{ "a" : 1.50 , "b": null }"#).unwrap();
        assert_eq!(object.get("a").map(RawValue::get), Some("1.50"));
        assert_eq!(object.get("b").map(RawValue::get), Some("null"));
        assert!(object.given("b").is_none());
        assert_eq!(object.members().count(), 2);
    }

    #[test]
    fn finds_keys_after_strings_with_escaped_quotes() {
        let json = r#"{"a": "x\"}, \"a\": \\", "b": {"c": "\\"}, "a": 2}"#;
        assert_eq!(
            JsonObject::parse(json).unwrap_err(),
            MalformedJson::DuplicateKey("a".into())
        );
        assert!(JsonObject::parse(r#"{"a": "x\"}, \"a\": \\", "b": 1}"#).is_ok());
    }

    #[test]
    fn shortens_long_repeated_keys_in_messages() {
        let key = "k".repeat(1000);
        let json = format!(r#"{{"{key}": 1, "{key}": 2}}"#);
        let message = JsonObject::parse(&json).unwrap_err().to_string();
        assert!(message.len() < 100, "{message}");
        assert!(message.ends_with("…\""), "{message}");
    }
}
