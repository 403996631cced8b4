//! Kafka adapters: the one place that builds client configs, the usage
//! consumer and its protocol with the worker, the snapshot reader, sending
//! to a producer, and topic checks. Nothing here knows SQL.

pub mod consumer;
pub mod ends;
pub mod headers;
pub mod partition;
pub mod producer;
pub mod record_size;
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
        .set("log_level", "4")
        .set("socket.timeout.ms", settings.socket_timeout_ms.to_string())
        .set("security.protocol", settings.security_protocol.as_str());
    if let Some(mechanism) = settings.sasl_mechanism {
        config.set("sasl.mechanism", mechanism.as_str());
    }
    if let Some(username) = &settings.sasl_username {
        config.set("sasl.username", username);
    }
    // A `ClientConfig` prints its values when debug-formatted: never log one.
    if let Some(password) = &settings.sasl_password {
        config.set("sasl.password", password.expose());
    }
    if let Some(ca) = &settings.ssl_ca_location {
        config.set("ssl.ca.location", ca);
    }
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
        .set("max.poll.interval.ms", settings.max_poll_interval_ms.to_string())
        .set("enable.partition.eof", "false")
        // Latency: a fetch that finds nothing new is answered after at most
        // this long (some brokers, librdkafka's mock among them, hold it the
        // whole time even when data arrives meanwhile).
        .set("fetch.wait.max.ms", "10")
        // Read-ahead: by default librdkafka prefetches up to 64 MiB of a
        // backlog (more with its per-message overhead) and then pauses the
        // partition for a second. 4 MiB is about half a second of events at
        // full speed; a paused partition is fetched again 10 ms later.
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.queue.backoff.ms", "10");
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

/// A reader of a control topic (`subscriptions`, `invoice-events`): every
/// worker reads it in full from the group's stored positions, and a position
/// that is no longer on the topic is an error, never a silent reset.
pub fn control_reader_config(settings: &KafkaSettings, topic: &str) -> ClientConfig {
    let mut config = reader_config(settings, topic);
    config.set("auto.offset.reset", "error");
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
        // What the outbox stores is sized for this limit (`record_size`).
        .set("message.max.bytes", record_size::PRODUCER_MAX_MESSAGE_BYTES.to_string())
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000");
    config
}

/// Whether a consumer error says that its position is no longer on the
/// topic (retention removed it, or the topic was recreated): with
/// `auto.offset.reset = error`, the consumer stops there instead of skipping.
pub fn position_off_topic(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    matches!(
        error,
        KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange)
            | KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)
    )
}

/// The `auto.offset.reset` choice for a new group, resolved by the pipeline
/// against the partition's watermarks.
pub fn initial_offset(reset: OffsetReset, low: i64, high: i64) -> i64 {
    match reset {
        OffsetReset::Earliest => low,
        OffsetReset::Latest => high,
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::BaseProducer;

    use super::*;
    use crate::config::Settings;

    fn settings(pairs: &[(&str, &str)]) -> KafkaSettings {
        let vars: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::load_from(&vars).unwrap().kafka
    }

    #[test]
    fn clients_are_built_with_tls_and_scram() {
        // librdkafka refuses at creation a protocol or mechanism it was
        // built without.
        let settings = settings(&[
            ("USAGE_WORKER__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("USAGE_WORKER__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("USAGE_WORKER__KAFKA__SASL_USERNAME", "billing"),
            ("USAGE_WORKER__KAFKA__SASL_PASSWORD", "secret"),
        ]);
        let config = producer_config(&settings);
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        let producer: Result<BaseProducer, _> = config.create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn plaintext_sets_no_credentials() {
        let config = reader_config(&settings(&[]), "test");
        assert_eq!(config.get("security.protocol"), Some("plaintext"));
        assert_eq!(config.get("sasl.password"), None);
    }

    #[test]
    fn only_an_offset_off_the_topic_means_a_position_is_lost() {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let consumption = KafkaError::MessageConsumption;
        assert!(position_off_topic(&consumption(RDKafkaErrorCode::AutoOffsetReset)));
        assert!(position_off_topic(&consumption(RDKafkaErrorCode::OffsetOutOfRange)));
        assert!(!position_off_topic(&consumption(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!position_off_topic(&consumption(RDKafkaErrorCode::AllBrokersDown)));
    }
}
