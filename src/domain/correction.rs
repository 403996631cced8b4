//! Corrections (SPEC "Corrections: void and amend"): what a message on
//! `usage-events` asks for once its `action` is read, and the decoding of
//! the two corrections. A correction names a stored usage by its `id` and
//! the subscription it belongs to; it is ordered after that usage because
//! both are keyed by the subscription.
//!
//! `action` absent, null or `"report"` is the usage report of version 1,
//! decoded by [`super::event::decode_usage_object`].

use std::fmt;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::event::{
    decode_accept_partial, decode_id_string, decode_quantity, decode_subscription_id, decode_usage_object, invalid,
    json_string, missing, DecodeContext, JsonObject, UsageRequest,
};
use super::quantity::parse_quantity;
use super::reason::{InvalidField, Rejection};

/// The JSON names of the correction fields, in the order problems are
/// listed.
pub mod fields {
    pub const ACTION: &str = "action";
    pub const ID: &str = "id";
    pub const SUBSCRIPTION_ID: &str = "subscriptionId";
    pub const QUANTITY: &str = "quantity";
    pub const ACCEPT_PARTIAL_QUANTITY: &str = "acceptPartialQuantity";
    pub const PREVIOUS_QUANTITY: &str = "previousQuantity";
    pub const REASON: &str = "reason";
}

/// Longest void reason kept, in characters: it is stored on the usage and
/// shown in its history, so it is a note, not a document.
pub const MAX_REASON_CHARS: usize = 500;

/// What one usage message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageCommand {
    Report(UsageRequest),
    Correct(Correction),
}

impl UsageCommand {
    pub fn subscription_id(&self) -> &str {
        match self {
            Self::Report(request) => &request.subscription_id,
            Self::Correct(correction) => &correction.subscription_id,
        }
    }

    /// The usage id the command names: a correction always names one; a
    /// report may leave it to the worker.
    pub fn usage_id(&self) -> Option<&str> {
        match self {
            Self::Report(request) => request.id.as_deref(),
            Self::Correct(correction) => Some(&correction.id),
        }
    }
}

/// A void or an amendment of the usage `id` of `subscription_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub id: String,
    pub subscription_id: String,
    pub action: CorrectionAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorrectionAction {
    /// Takes the usage out of its period's count; the row and its id stay.
    Void {
        reason: Option<String>,
    },
    Amend(Amendment),
}

/// A new quantity for a stored usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amendment {
    /// Normalized, like a report's.
    pub quantity: Decimal,
    pub accept_partial: bool,
    /// When given, the amendment applies only to a usage of exactly this
    /// quantity (`amend_conflict` otherwise): a re-sent amendment is safe.
    pub previous_quantity: Option<Decimal>,
}

/// The three values of `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Report,
    Void,
    Amend,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Report => "report",
            Self::Void => "void",
            Self::Amend => "amend",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The message's `action`: absent or null is a report.
pub fn read_action(object: &JsonObject<'_>) -> Result<Action, InvalidField> {
    let Some(raw) = object.given(fields::ACTION) else {
        return Ok(Action::Report);
    };
    let text = json_string(raw).map_err(|message| invalid(fields::ACTION, message))?;
    match text.as_str() {
        "report" => Ok(Action::Report),
        "void" => Ok(Action::Void),
        "amend" => Ok(Action::Amend),
        _ => Err(invalid(
            fields::ACTION,
            format_args!("must be \"report\", \"void\" or \"amend\", got {:?}", shorten(&text)),
        )),
    }
}

/// Decodes a usage message's object, whatever its action. A correction's
/// fields are all checked and every problem reported, as for a report.
pub fn decode_command(object: &JsonObject<'_>, ctx: &DecodeContext) -> Result<UsageCommand, Rejection> {
    match read_action(object) {
        Ok(Action::Report) => decode_usage_object(object, ctx).map(UsageCommand::Report),
        Ok(Action::Void) => decode_void(object).map(UsageCommand::Correct),
        Ok(Action::Amend) => decode_amend(object).map(UsageCommand::Correct),
        Err(problem) => Err(Rejection::from_fields(vec![problem]).expect("one problem")),
    }
}

/// An HTTP body that must be a report (`POST /usages`, `PUT
/// /usages/{id}`): over HTTP a void is `DELETE` and an amendment `PUT`, so
/// an `action` other than `report` is an invalid field.
pub fn decode_report_body(bytes: &[u8], ctx: &DecodeContext) -> Result<UsageRequest, Rejection> {
    if bytes.len() > ctx.max_payload_bytes {
        return Err(super::cloudevents::too_large(bytes.len(), ctx));
    }
    let object = JsonObject::from_slice(bytes)?;
    match read_action(&object) {
        Ok(Action::Report) => decode_usage_object(&object, ctx),
        Ok(action) => Err(rejection([Some(invalid(
            fields::ACTION,
            format_args!(
                "must be \"report\" in a request body, got \"{action}\": over HTTP a usage is voided with \
                 DELETE /usages/{{id}} and amended with PUT /usages/{{id}}"
            ),
        ))])),
        Err(problem) => Err(rejection([Some(problem)])),
    }
}

/// `{"action": "void", "id", "subscriptionId", "reason"?}`.
pub fn decode_void(object: &JsonObject<'_>) -> Result<Correction, Rejection> {
    let id = decode_corrected_id(object.given(fields::ID));
    let subscription_id = decode_subscription_id(object.given(fields::SUBSCRIPTION_ID));
    let reason = decode_reason(object.given(fields::REASON));
    match (id, subscription_id, reason) {
        (Ok(id), Ok(subscription_id), Ok(reason)) => Ok(Correction {
            id,
            subscription_id,
            action: CorrectionAction::Void { reason },
        }),
        (id, subscription_id, reason) => Err(rejection([id.err(), subscription_id.err(), reason.err()])),
    }
}

/// `{"action": "amend", "id", "subscriptionId", "quantity",
/// "acceptPartialQuantity"?, "previousQuantity"?}`.
pub fn decode_amend(object: &JsonObject<'_>) -> Result<Correction, Rejection> {
    let id = decode_corrected_id(object.given(fields::ID));
    let subscription_id = decode_subscription_id(object.given(fields::SUBSCRIPTION_ID));
    let quantity = decode_quantity(object.given(fields::QUANTITY));
    let accept_partial = decode_accept_partial(object.given(fields::ACCEPT_PARTIAL_QUANTITY));
    let previous = decode_previous_quantity(object.given(fields::PREVIOUS_QUANTITY));
    match (id, subscription_id, quantity, accept_partial, previous) {
        (Ok(id), Ok(subscription_id), Ok(quantity), Ok(accept_partial), Ok(previous_quantity)) => Ok(Correction {
            id,
            subscription_id,
            action: CorrectionAction::Amend(Amendment {
                quantity,
                accept_partial,
                previous_quantity,
            }),
        }),
        (id, subscription_id, quantity, accept_partial, previous) => Err(rejection([
            id.err(),
            subscription_id.err(),
            quantity.err(),
            accept_partial.err(),
            previous.err(),
        ])),
    }
}

fn rejection<const N: usize>(problems: [Option<InvalidField>; N]) -> Rejection {
    Rejection::from_fields(problems.into_iter().flatten().collect()).expect("a field failed")
}

/// The usage a correction names: required, and held to the id rules. A
/// `msg_…` id (one the worker derived) can be corrected: the prefix rule is
/// for new reports.
fn decode_corrected_id(raw: Option<&RawValue>) -> Result<String, InvalidField> {
    let raw = raw.ok_or_else(|| missing(fields::ID))?;
    decode_id_string(fields::ID, raw)
}

fn decode_previous_quantity(raw: Option<&RawValue>) -> Result<Option<Decimal>, InvalidField> {
    raw.map(|raw| parse_quantity(raw).map_err(|message| invalid(fields::PREVIOUS_QUANTITY, message)))
        .transpose()
}

/// An optional note of at most [`MAX_REASON_CHARS`] characters, without
/// control characters (it is shown in logs and lists).
pub fn decode_reason(raw: Option<&RawValue>) -> Result<Option<String>, InvalidField> {
    let Some(raw) = raw else { return Ok(None) };
    let text = json_string(raw).map_err(|message| invalid(fields::REASON, message))?;
    check_reason(&text).map_err(|message| invalid(fields::REASON, message))?;
    Ok(Some(text).filter(|t| !t.is_empty()))
}

/// The rules of a void reason, wherever it comes from (a message, a query
/// parameter).
pub fn check_reason(text: &str) -> Result<(), String> {
    let chars = text.chars().count();
    if chars > MAX_REASON_CHARS {
        return Err(format!("must be at most {MAX_REASON_CHARS} characters, got {chars}"));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!(
            "must not contain control characters (found U+{:04X})",
            c as u32
        ));
    }
    Ok(())
}

fn shorten(text: &str) -> String {
    text.chars().take(20).collect()
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    use super::*;
    use crate::domain::ReasonCode;

    fn ctx() -> DecodeContext {
        DecodeContext {
            request_time: Utc::now(),
            max_future: Duration::minutes(5),
            max_payload_bytes: 65_536,
        }
    }

    fn decode(json: &str) -> Result<UsageCommand, Rejection> {
        decode_command(&JsonObject::parse(json).unwrap(), &ctx())
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn no_action_and_report_are_reports() {
        for json in [
            r#"{"subscriptionId": "sub_1", "quantity": 2}"#,
            r#"{"action": null, "subscriptionId": "sub_1", "quantity": 2}"#,
            r#"{"action": "report", "subscriptionId": "sub_1", "quantity": 2}"#,
        ] {
            let Ok(UsageCommand::Report(request)) = decode(json) else {
                panic!("{json}")
            };
            assert_eq!(request.quantity, d("2"));
        }
    }

    #[test]
    fn a_void_names_the_usage_and_may_give_a_reason() {
        let command =
            decode(r#"{"action": "void", "id": "usg_1", "subscriptionId": "sub_42", "reason": "duplicate meter"}"#);
        assert_eq!(
            command,
            Ok(UsageCommand::Correct(Correction {
                id: "usg_1".into(),
                subscription_id: "sub_42".into(),
                action: CorrectionAction::Void {
                    reason: Some("duplicate meter".into())
                },
            }))
        );
        let Ok(UsageCommand::Correct(Correction {
            action: CorrectionAction::Void { reason },
            ..
        })) = decode(r#"{"action": "void", "id": "usg_1", "subscriptionId": "sub_42", "reason": ""}"#)
        else {
            panic!()
        };
        assert_eq!(reason, None, "an empty reason is no reason");
    }

    #[test]
    fn an_amendment_reads_its_quantity_partial_flag_and_previous_quantity() {
        let command = decode(
            r#"{"action": "amend", "id": "usg_1", "subscriptionId": "sub_42", "quantity": 8.50,
                "acceptPartialQuantity": true, "previousQuantity": 10}"#,
        );
        let Ok(UsageCommand::Correct(Correction {
            action: CorrectionAction::Amend(amendment),
            ..
        })) = command
        else {
            panic!("{command:?}")
        };
        assert_eq!(amendment.quantity.to_string(), "8.5");
        assert!(amendment.accept_partial);
        assert_eq!(amendment.previous_quantity, Some(d("10")));
    }

    #[test]
    fn a_request_body_is_a_report() {
        let body = |json: &str| decode_report_body(json.as_bytes(), &ctx());
        assert!(body(r#"{"action": "report", "subscriptionId": "sub_1", "quantity": 1}"#).is_ok());
        for json in [
            r#"{"action": "void", "id": "usg_1", "subscriptionId": "sub_1"}"#,
            r#"{"action": "amend", "id": "usg_1", "subscriptionId": "sub_1", "quantity": 1}"#,
            r#"{"action": "nope", "subscriptionId": "sub_1", "quantity": 1}"#,
        ] {
            let rejection = body(json).unwrap_err();
            assert_eq!(
                (rejection.code, rejection.field),
                (ReasonCode::InvalidField, Some("action")),
                "{json}"
            );
        }
        assert_eq!(body(&" ".repeat(70_000)).unwrap_err().code, ReasonCode::PayloadTooLarge);
    }

    #[test]
    fn a_derived_id_can_be_corrected() {
        let command = decode(r#"{"action": "void", "id": "msg_abc", "subscriptionId": "sub_1"}"#);
        assert!(matches!(command, Ok(UsageCommand::Correct(c)) if c.id == "msg_abc"));
    }

    #[test]
    fn every_wrong_field_of_a_correction_is_reported_in_order() {
        let rejection = decode(r#"{"action": "amend", "subscriptionId": " ", "quantity": 0, "previousQuantity": "x"}"#)
            .unwrap_err();
        assert_eq!(rejection.code, ReasonCode::MissingField);
        assert_eq!(rejection.field, Some("id"));
        let named: Vec<_> = rejection.invalid_fields.iter().map(|f| f.field).collect();
        assert_eq!(named, ["id", "subscriptionId", "quantity", "previousQuantity"]);
    }

    #[test]
    fn an_unknown_action_is_an_invalid_field() {
        for json in [
            r#"{"action": "delete", "id": "usg_1", "subscriptionId": "sub_1"}"#,
            r#"{"action": 1, "id": "usg_1", "subscriptionId": "sub_1"}"#,
        ] {
            let rejection = decode(json).unwrap_err();
            assert_eq!(
                (rejection.code, rejection.field),
                (ReasonCode::InvalidField, Some("action"))
            );
        }
    }

    #[test]
    fn a_reason_is_a_short_line_of_text() {
        let long = "x".repeat(MAX_REASON_CHARS + 1);
        for reason in [format!("\"{long}\""), "\"a\\nb\"".to_owned(), "3".to_owned()] {
            let json = format!(r#"{{"action": "void", "id": "usg_1", "subscriptionId": "sub_1", "reason": {reason}}}"#);
            let rejection = decode(&json).unwrap_err();
            assert_eq!(rejection.field, Some("reason"), "{reason}");
        }
        assert!(check_reason(&"x".repeat(MAX_REASON_CHARS)).is_ok());
    }
}
