//! What usage-worker's integration tests and its lab (`usage-lab bench`,
//! `usage-lab chaos`) run on:
//!
//! - [`cluster`]: a Kafka cluster of the test's own, librdkafka's embedded
//!   mock or a [`tansu`] broker process;
//! - [`env`]: one test's world (its cluster, its database, dropped when the
//!   test ends, and the worker in-process);
//! - [`topics`]: a whole topic read back and decoded;
//! - [`process`]: the worker as a child process, to be killed;
//! - [`postgres`]: a private PostgreSQL server, to be crashed;
//! - [`rng`]: seeded numbers that replay a run.

pub mod cluster;
pub mod env;
pub mod postgres;
pub mod process;
pub mod rng;
pub mod tansu;
pub mod topics;

pub use cluster::{BrokerKind, Cluster};
pub use env::{active_subscription, period_closing, wait_until, ApiServer, TestEnv, Worker, PARTITIONS, TOPICS};
pub use rng::Rng;
pub use topics::{Reader, Record};
