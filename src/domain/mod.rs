//! The pure core: wire formats, parsing, validation, the limit decision and
//! the outcomes it produces. Nothing in here knows about tokio, sqlx or
//! rdkafka; every rule of SPEC that can be checked without I/O lives here and
//! is tested here.

pub mod cloudevents;
pub mod correction;
pub mod decision;
pub mod digest;
pub mod event;
pub mod headers;
pub mod ids;
pub mod invoice;
pub mod outcome;
pub mod period_record;
pub mod pricing;
pub mod quantity;
pub mod reason;
pub mod status;
pub mod subscription;

pub use reason::{InvalidField, ReasonCode, Rejection};
