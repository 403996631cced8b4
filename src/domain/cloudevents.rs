//! Usage events wrapped as CloudEvents 1.0 (Kafka protocol binding), besides
//! the plain JSON default:
//! - structured mode: header `content-type: application/cloudevents+json`,
//!   the body is the CloudEvent with the usage event as `data`;
//! - binary mode: `ce_*` headers carry the attributes, the body is the usage
//!   event.
//!
//! `data.id` wins, else the CloudEvent `id` is the idempotency key;
//! `data.usageTime` wins, else the CloudEvent `time`.

use serde_json::value::RawValue;

use super::correction::{decode_command, read_action, Action, UsageCommand};
use super::event::{json_string, DecodeContext, JsonObject};
use super::headers::Headers;
use super::{ReasonCode, Rejection};

pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How a message is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Plain,
    Structured,
    Binary,
}

/// Tells the framing from the message headers.
pub fn framing(headers: &Headers) -> Framing {
    let header = |name: &str| header(headers, name);
    let structured = header("content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with(STRUCTURED_CONTENT_TYPE));
    if structured {
        Framing::Structured
    } else if header("ce_specversion").is_some() {
        Framing::Binary
    } else {
        Framing::Plain
    }
}

/// Decodes a usage message (a report or a correction) in any of the three
/// framings.
pub fn decode_usage_message(headers: &Headers, body: &[u8], ctx: &DecodeContext) -> Result<UsageCommand, Rejection> {
    if body.len() > ctx.max_payload_bytes {
        return Err(too_large(body.len(), ctx));
    }
    match framing(headers) {
        Framing::Plain => decode_command(&JsonObject::from_slice(body)?, ctx),
        Framing::Structured => decode_structured(body, ctx),
        Framing::Binary => decode_binary(headers, body, ctx),
    }
}

/// Too large to read, in any framing.
pub fn too_large(bytes: usize, ctx: &DecodeContext) -> Rejection {
    Rejection::new(
        ReasonCode::PayloadTooLarge,
        format!(
            "payload is {bytes} bytes, over the limit of {} bytes",
            ctx.max_payload_bytes
        ),
    )
}

/// A CloudEvent's `id` and `time` stand in for a report's missing `id` and
/// `usageTime`. A correction names the usage it corrects in its own `id`,
/// never the event's.
fn is_report(object: &JsonObject<'_>) -> bool {
    read_action(object) == Ok(Action::Report)
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::new(ReasonCode::MalformedPayload, message)
}

fn decode_structured(body: &[u8], ctx: &DecodeContext) -> Result<UsageCommand, Rejection> {
    let envelope = JsonObject::from_slice(body)?;
    let attribute = |name: &str| -> Result<Option<String>, Rejection> {
        envelope
            .given(name)
            .map(|raw| json_string(raw).map_err(|m| malformed(format!("CloudEvent attribute {name} {m}"))))
            .transpose()
    };
    check_attributes(
        attribute("specversion")?,
        attribute("id")?,
        attribute("source")?,
        attribute("type")?,
    )?;
    let data = envelope
        .given("data")
        .ok_or_else(|| malformed("CloudEvent has no data"))?;
    let mut object = JsonObject::parse(data.get()).map_err(|e| malformed(format!("CloudEvent data: {e}")))?;
    if is_report(&object) {
        if let Some(id) = envelope.given("id") {
            object.set_default("id", id);
        }
        if let Some(time) = envelope.given("time") {
            object.set_default("usageTime", time);
        }
    }
    decode_command(&object, ctx)
}

/// The value of the first header named `name`, in any case: CloudEvents
/// attribute headers are matched ignoring case.
fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn decode_binary(headers: &Headers, body: &[u8], ctx: &DecodeContext) -> Result<UsageCommand, Rejection> {
    let attribute = |name: &str| -> Result<Option<String>, Rejection> {
        header(headers, name)
            .map(|v| {
                std::str::from_utf8(v)
                    .map(str::to_owned)
                    .map_err(|_| malformed(format!("header {name} is not UTF-8")))
            })
            .transpose()
    };
    let id = attribute("ce_id")?;
    check_attributes(
        attribute("ce_specversion")?,
        id.clone(),
        attribute("ce_source")?,
        attribute("ce_type")?,
    )?;
    let time = attribute("ce_time")?;
    // The attributes become raw JSON strings, so that they go through the
    // same field rules as the body's own fields.
    let id_raw = id.map(|v| RawValue::from_string(serde_json::to_string(&v).expect("string")).expect("JSON string"));
    let time_raw =
        time.map(|v| RawValue::from_string(serde_json::to_string(&v).expect("string")).expect("JSON string"));
    let mut object = JsonObject::from_slice(body)?;
    if is_report(&object) {
        if let Some(id) = &id_raw {
            object.set_default("id", id);
        }
        if let Some(time) = &time_raw {
            object.set_default("usageTime", time);
        }
    }
    decode_command(&object, ctx)
}

fn check_attributes(
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    kind: Option<String>,
) -> Result<(), Rejection> {
    match specversion.as_deref() {
        Some("1.0") => {}
        Some(other) => {
            return Err(malformed(format!(
                "CloudEvent specversion {other:?} is not supported (1.0 is)"
            )))
        }
        None => return Err(malformed("CloudEvent has no specversion")),
    }
    for (name, value) in [("id", id), ("source", source), ("type", kind)] {
        if value.is_none_or(|v| v.is_empty()) {
            return Err(malformed(format!("CloudEvent has no {name}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::UsageRequest;
    use chrono::{DateTime, Utc};

    fn ctx() -> DecodeContext {
        DecodeContext {
            request_time: DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            max_future: chrono::Duration::minutes(5),
            max_payload_bytes: 65536,
        }
    }

    const CT: (&str, &[u8]) = ("content-type", b"application/cloudevents+json; charset=utf-8");

    fn structured(json: &str) -> Result<UsageRequest, Rejection> {
        report(decode_usage_message(
            &[CT].into_iter().collect(),
            json.as_bytes(),
            &ctx(),
        ))
    }

    fn report(command: Result<UsageCommand, Rejection>) -> Result<UsageRequest, Rejection> {
        command.map(|command| match command {
            UsageCommand::Report(request) => request,
            UsageCommand::Correct(correction) => panic!("a correction: {correction:?}"),
        })
    }

    #[test]
    fn a_correction_names_its_usage_in_data_never_by_the_event_id() {
        let correction = |json: &str| decode_usage_message(&[CT].into_iter().collect(), json.as_bytes(), &ctx());
        let voided = correction(
            r#"{"specversion": "1.0", "id": "ce-1", "source": "/meter", "type": "usage",
            "data": {"action": "void", "id": "usg_1", "subscriptionId": "sub_1"}}"#,
        );
        assert!(matches!(voided, Ok(UsageCommand::Correct(c)) if c.id == "usg_1"));
        let err = correction(
            r#"{"specversion": "1.0", "id": "ce-1", "source": "/meter", "type": "usage",
            "data": {"action": "void", "subscriptionId": "sub_1"}}"#,
        )
        .unwrap_err();
        assert_eq!((err.code, err.field), (ReasonCode::MissingField, Some("id")));
    }

    #[test]
    fn structured_mode_takes_the_cloudevent_id_and_time_when_data_has_none() {
        let r = structured(
            r#"{"specversion": "1.0", "id": "ce-1", "source": "/meter", "type": "usage",
            "time": "2026-11-27T11:00:00Z", "data": {"subscriptionId": "sub_1", "quantity": 2}}"#,
        )
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("ce-1"));
        assert_eq!(r.usage_time.unwrap().to_rfc3339(), "2026-11-27T11:00:00+00:00");
    }

    #[test]
    fn data_id_and_usage_time_win_over_the_attributes() {
        let r = structured(
            r#"{"specversion": "1.0", "id": "ce-1", "source": "/m", "type": "t", "time": "2026-11-27T11:00:00Z",
            "data": {"id": "usg_9", "usageTime": "2026-11-27T10:00:00Z", "subscriptionId": "sub_1", "quantity": 2}}"#,
        )
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("usg_9"));
        assert_eq!(r.usage_time.unwrap().to_rfc3339(), "2026-11-27T10:00:00+00:00");
    }

    #[test]
    fn structured_envelopes_missing_attributes_or_data_are_malformed() {
        for json in [
            r#"{"id": "x", "source": "s", "type": "t", "data": {"subscriptionId": "s", "quantity": 1}}"#,
            r#"{"specversion": "0.3", "id": "x", "source": "s", "type": "t", "data": {}}"#,
            r#"{"specversion": "1.0", "source": "s", "type": "t", "data": {}}"#,
            r#"{"specversion": "1.0", "id": "x", "source": "s", "type": "t"}"#,
            r#"{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data": [1]}"#,
            r#"{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data": {"a": 1, "a": 2}}"#,
        ] {
            assert_eq!(
                structured(json).unwrap_err().code,
                ReasonCode::MalformedPayload,
                "{json}"
            );
        }
    }

    #[test]
    fn the_data_is_validated_like_a_plain_event() {
        let err = structured(
            r#"{"specversion": "1.0", "id": "ce-1", "source": "s", "type": "t", "data": {"subscriptionId": "sub_1"}}"#,
        )
        .unwrap_err();
        assert_eq!((err.code, err.field), (ReasonCode::MissingField, Some("quantity")));
        let err = structured(r#"{"specversion": "1.0", "id": "msg_1", "source": "s", "type": "t", "data": {"subscriptionId": "sub_1", "quantity": 1}}"#)
            .unwrap_err();
        assert_eq!(err.field, Some("id"), "a CloudEvent id is held to the id rules");
    }

    #[test]
    fn binary_mode_reads_ce_headers() {
        let all = [
            ("ce_specversion", "1.0"),
            ("ce_id", "ce-7"),
            ("ce_source", "/meter"),
            ("ce_type", "usage"),
            ("ce_time", "2026-11-27T11:30:00+01:00"),
        ];
        let headers: Headers = all.into_iter().collect();
        let r = report(decode_usage_message(
            &headers,
            br#"{"subscriptionId": "sub_1", "quantity": "1.5"}"#,
            &ctx(),
        ))
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("ce-7"));
        assert_eq!(r.usage_time.unwrap().to_rfc3339(), "2026-11-27T10:30:00+00:00");
        let first_three: Headers = all[..3].iter().copied().collect();
        let err =
            decode_usage_message(&first_three, br#"{"subscriptionId": "sub_1", "quantity": 1}"#, &ctx()).unwrap_err();
        assert_eq!(err.code, ReasonCode::MalformedPayload, "no ce_type");
    }

    #[test]
    fn plain_json_stays_the_default() {
        let json: Headers = [("content-type", "application/json")].into_iter().collect();
        assert_eq!(framing(&json), Framing::Plain);
        assert_eq!(framing(&Headers::new()), Framing::Plain);
        let r = report(decode_usage_message(
            &Headers::new(),
            br#"{"subscriptionId": "sub_1", "quantity": 1}"#,
            &ctx(),
        ))
        .unwrap();
        assert_eq!(r.id, None);
    }
}
