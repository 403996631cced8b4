//! usage-worker: usage events from Kafka, decided against subscription limits
//! in PostgreSQL, with exactly one outcome per event.

pub mod app;
pub mod config;
pub mod demo;
pub mod domain;
pub mod embedded;
pub mod healthcheck;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod retry;
pub mod store;
pub mod telemetry;
