//! The integration tests: one binary, a module per area. Each test runs on
//! a world of its own (`test_kit::TestEnv`: a database and a Kafka cluster,
//! both gone when it ends).

mod batches;
mod billing;
mod callers;
mod cli;
mod concurrency;
mod control_plane;
mod correction_properties;
mod corrections;
mod crash;
mod decision_properties;
mod documents;
mod faults;
mod hostile;
mod http;
mod http_limits;
mod periods;
mod pipeline;
mod store;
mod tls;
mod upgrades;
