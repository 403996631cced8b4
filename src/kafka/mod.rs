//! Kafka adapters: the one place that builds client configs, the usage
//! consumer with its assignment hooks, the snapshot reader, the producer,
//! topic checks, and the embedded mock cluster. Nothing here knows SQL.

pub mod consumer;
pub mod mock;
pub mod topics;

use rdkafka::ClientConfig;

use crate::config::{KafkaSettings, OffsetReset};

/// Settings common to every client.
fn base(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("client.id", "usage-worker")
        // Let librdkafka's own log lines pass through `tracing` at warn level.
        .set("log_level", "4");
    config
}

/// The consumer of `usage-events`, a member of the group. Offsets live in
/// PostgreSQL: Kafka never commits, and a position that is no longer on the
/// topic is an error, never a silent reset.
pub fn usage_consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", settings.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", settings.heartbeat_interval_ms.to_string())
        .set("enable.partition.eof", "false");
    config
}

/// A reader outside any group (assigns partitions itself): snapshots, the
/// last record of an output partition, watermarks.
pub fn reader_config(settings: &KafkaSettings, purpose: &str) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", format!("{}-{purpose}", settings.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    config
}

/// The producer of outcomes. Idempotent, and with no delivery time-out
/// (`message.timeout.ms = 0`): a record is retried until the broker has it,
/// so a sequence of outbox records can never get a hole.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000");
    config
}

/// The `auto.offset.reset` choice for a new group, resolved by the pipeline
/// against the partition's watermarks.
pub fn initial_offset(reset: OffsetReset, low: i64, high: i64) -> i64 {
    match reset {
        OffsetReset::Earliest => low,
        OffsetReset::Latest => high,
    }
}
