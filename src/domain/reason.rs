//! Reason codes and the rejection they travel in.

use serde::Serialize;

/// Why a request was rejected. The serialized names are part of the public
/// contract (`error.code` on `usage-results`): never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    MissingField,
    InvalidField,
    MalformedPayload,
    PayloadTooLarge,
    UsageTimeInFuture,
    IdempotencyConflict,
    SubscriptionNotFound,
    SubscriptionNotActive,
    NoServicePeriod,
    PeriodClosed,
    UsageLimitExceeded,
    /// A correction names a usage that was never stored.
    UsageNotFound,
    /// A correction names a usage of another subscription.
    SubscriptionMismatch,
    /// The usage was voided: it cannot be amended, and its id is never
    /// reported again.
    UsageVoided,
    /// An invoice counted the usage: it cannot be corrected.
    UsageInvoiced,
    /// An amendment's `previousQuantity` is not the usage's quantity.
    AmendConflict,
    /// The database refused the message itself (a data error about this one
    /// message, by SQLSTATE), after validation let it through.
    Unprocessable,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::MalformedPayload => "malformed_payload",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UsageTimeInFuture => "usage_time_in_future",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::SubscriptionNotFound => "subscription_not_found",
            Self::SubscriptionNotActive => "subscription_not_active",
            Self::NoServicePeriod => "no_service_period",
            Self::PeriodClosed => "period_closed",
            Self::UsageLimitExceeded => "usage_limit_exceeded",
            Self::UsageNotFound => "usage_not_found",
            Self::SubscriptionMismatch => "subscription_mismatch",
            Self::UsageVoided => "usage_voided",
            Self::UsageInvoiced => "usage_invoiced",
            Self::AmendConflict => "amend_conflict",
            Self::Unprocessable => "unprocessable",
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One wrong field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidField {
    pub field: &'static str,
    pub code: ReasonCode,
    pub message: String,
}

/// A request that will not be counted, with everything the outcome says
/// about why. `field` is the first wrong field in SPEC's table order and
/// `code` is its code; `invalid_fields` names all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ReasonCode,
    pub message: String,
    pub field: Option<&'static str>,
    pub invalid_fields: Vec<InvalidField>,
}

impl Rejection {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            invalid_fields: Vec::new(),
        }
    }

    pub fn on_field(code: ReasonCode, field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field),
            ..Self::new(code, message)
        }
    }

    /// Builds the rejection for a set of field problems, already in table order.
    /// Returns `None` when there are none.
    pub fn from_fields(fields: Vec<InvalidField>) -> Option<Self> {
        let first = fields.first()?;
        Some(Self {
            code: first.code,
            message: first.message.clone(),
            field: Some(first.field),
            invalid_fields: fields,
        })
    }
}
