//! Fuzzes the usage-event decoder: arbitrary bytes as a plain event, and,
//! when the input has a header block (`name:value` lines, then `\r\n\r\n`,
//! then the body), as a message with those headers, which reaches the
//! CloudEvents structured and binary modes.
//!
//! What it asserts, from SPEC's "Usage event (input)":
//! - no panic, whatever the bytes;
//! - an accepted event obeys every field rule (ids, quantity, usageTime);
//! - an accepted event was at most `max_payload_bytes` and had no top-level
//!   key twice;
//! - decoding is deterministic, and a plain message decodes as the plain
//!   event does;
//! - an accepted request, written back the way the worker writes a usage
//!   (`UsageBody`, exact decimals, times to milliseconds), decodes to the
//!   same request.

#![no_main]

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Duration, Timelike};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use usage_worker::domain::cloudevents::decode_usage_message;
use usage_worker::domain::correction::UsageCommand;
use usage_worker::domain::event::{decode_usage_event, DecodeContext, JsonObject, UsageRequest};
use usage_worker::domain::headers::Headers;
use usage_worker::domain::outcome::UsageBody;
use usage_worker::domain::{ReasonCode, Rejection};

/// Small enough that the fuzzer reaches it; the real default is 64 KiB.
const MAX_PAYLOAD_BYTES: usize = 4096;

fn ctx() -> DecodeContext {
    DecodeContext {
        request_time: DateTime::from_timestamp(1_795_780_800, 0).expect("2026-11-27T12:00:00Z"),
        max_future: Duration::minutes(5),
        max_payload_bytes: MAX_PAYLOAD_BYTES,
    }
}

fuzz_target!(|data: &[u8]| {
    let ctx = ctx();

    let plain = decode_usage_event(data, &ctx);
    assert_eq!(plain, decode_usage_event(data, &ctx), "decoding is deterministic");
    let command = decode_usage_message(&Headers::new(), data, &ctx);
    if !names_an_action(data) {
        assert_eq!(
            as_report(command),
            Some(plain.clone()),
            "a message without headers or action is a plain event"
        );
    }
    check_result(data, &plain, &ctx);
    if top_level_keys_repeat(data) == Some(true) {
        let code = plain.as_ref().err().map(|r| r.code);
        assert!(
            matches!(code, Some(ReasonCode::MalformedPayload | ReasonCode::PayloadTooLarge)),
            "a repeated key is malformed: {plain:?}"
        );
    }
    if let Ok(request) = &plain {
        assert!(data.len() <= MAX_PAYLOAD_BYTES);
        assert_eq!(
            top_level_keys_repeat(data),
            Some(false),
            "accepted JSON with unique keys"
        );
        round_trip(request, &ctx);
    }

    if let Some((headers, body)) = split_headers(data) {
        let headers: Headers = headers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let framed = decode_usage_message(&headers, body, &ctx);
        assert_eq!(
            framed,
            decode_usage_message(&headers, body, &ctx),
            "decoding is deterministic"
        );
        let Some(framed) = as_report(framed) else { return };
        check_result(body, &framed, &ctx);
        if let Ok(request) = &framed {
            round_trip(request, &ctx);
        }
    }
});

/// Whether the body is an object with an `action` member (a report, a
/// correction or an invalid action: the report decoder ignores it).
fn names_an_action(data: &[u8]) -> bool {
    JsonObject::from_slice(data).is_ok_and(|object| object.get("action").is_some())
}

/// The report a message decoded to; a correction is checked here and gives
/// `None`.
fn as_report(result: Result<UsageCommand, Rejection>) -> Option<Result<UsageRequest, Rejection>> {
    match result {
        Ok(UsageCommand::Report(request)) => Some(Ok(request)),
        Ok(UsageCommand::Correct(correction)) => {
            check_id_rules(&correction.id);
            check_id_rules(&correction.subscription_id);
            None
        }
        Err(rejection) => Some(Err(rejection)),
    }
}

/// What SPEC requires of any decoding result.
fn check_result(body: &[u8], result: &Result<UsageRequest, Rejection>, ctx: &DecodeContext) {
    match result {
        Ok(request) => check_request(request, ctx),
        Err(rejection) => {
            if body.len() > ctx.max_payload_bytes {
                assert_eq!(rejection.code, ReasonCode::PayloadTooLarge, "{rejection:?}");
            }
            assert!(!rejection.message.is_empty());
            // `field` is the first of `invalidFields`, with its code.
            if let Some(first) = rejection.invalid_fields.first() {
                assert_eq!(rejection.field, Some(first.field));
                assert_eq!(rejection.code, first.code);
                let order = [
                    "action",
                    "id",
                    "subscriptionId",
                    "quantity",
                    "usageTime",
                    "acceptPartialQuantity",
                    "previousQuantity",
                    "reason",
                ];
                let positions: Vec<usize> = rejection
                    .invalid_fields
                    .iter()
                    .map(|f| order.iter().position(|o| *o == f.field).expect("a request field"))
                    .collect();
                assert!(
                    positions.windows(2).all(|w| w[0] < w[1]),
                    "SPEC's table order: {rejection:?}"
                );
            }
        }
    }
}

/// SPEC's field rules, written out here rather than borrowed from the code.
fn check_request(request: &UsageRequest, ctx: &DecodeContext) {
    if let Some(id) = &request.id {
        check_id_rules(id);
        assert!(!id.starts_with("msg_"), "msg_ is reserved: {id:?}");
    }
    check_id_rules(&request.subscription_id);

    let q = request.quantity;
    assert!(q >= Decimal::new(1, 3), "at least 0.001: {q}");
    assert!(q < Decimal::from(1_000_000_000_000u64), "below 10^12: {q}");
    assert!(q.normalize().scale() <= 3, "at most 3 decimal places: {q}");
    assert_eq!(q.scale(), q.normalize().scale(), "normalized: {q:?}");

    if let Some(t) = request.usage_time {
        assert!(t <= ctx.request_time + ctx.max_future, "not in the future: {t}");
        assert_eq!(t.nanosecond() % 1000, 0, "kept to microseconds: {t:?}");
        assert!(t.nanosecond() < 1_000_000_000, "no leap second left: {t:?}");
    }
}

fn check_id_rules(id: &str) {
    let chars = id.chars().count();
    assert!((1..=50).contains(&chars), "1..50 characters: {id:?}");
    for c in id.chars() {
        let zero_width = matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}');
        assert!(
            !c.is_whitespace() && !c.is_control() && !zero_width,
            "no whitespace, control or zero-width characters: {id:?}"
        );
    }
}

/// Writes the request as the worker writes a usage (the resource body of an
/// outcome or of `POST /usages`) plus `acceptPartialQuantity`, and decodes
/// that: the same request comes back, its time to the millisecond.
fn round_trip(request: &UsageRequest, ctx: &DecodeContext) {
    let id = request.id.clone().unwrap_or_else(|| "usg_round_trip".to_owned());
    let usage_time = request.effective_usage_time(ctx.request_time);
    let body = UsageBody::new(
        id.clone(),
        request.subscription_id.clone(),
        request.quantity,
        usage_time,
        ctx.request_time,
    );
    let mut json = serde_json::to_string(&body).expect("a usage body serializes");
    json.pop();
    json.push_str(&format!(",\"acceptPartialQuantity\":{}}}", request.accept_partial));

    let again = decode_usage_event(json.as_bytes(), ctx).unwrap_or_else(|e| panic!("{json} is rejected: {e:?}"));
    let millis = DateTime::from_timestamp_millis(usage_time.timestamp_millis()).expect("in range");
    assert_eq!(
        again,
        UsageRequest {
            id: Some(id),
            usage_time: Some(millis),
            ..request.clone()
        },
        "{json}"
    );
}

/// `Some(true)` when the bytes are one JSON object that repeats a top-level
/// key, `Some(false)` when one that does not, `None` when not an object.
fn top_level_keys_repeat(data: &[u8]) -> Option<bool> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut seen = HashSet::new();
            let mut repeated = false;
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                repeated |= !seen.insert(key);
            }
            Ok(repeated)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(data);
    let repeated = (&mut de).deserialize_map(Keys).ok()?;
    de.end().ok()?;
    Some(repeated)
}

/// Splits `name:value` header lines from the body at the first `\r\n\r\n`.
fn split_headers(data: &[u8]) -> Option<(Vec<(String, &[u8])>, &[u8])> {
    let at = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let (head, body) = (&data[..at], &data[at + 4..]);
    let headers = head
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|b| *b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).into_owned();
            Some((name, &line[colon + 1..]))
        })
        .collect();
    Some((headers, body))
}
