//! Prometheus metrics of one worker process: what the pipeline consumed and
//! decided, how long its transactions took, how far behind it is, what the
//! outbox still holds, how busy the database pools are, and what the HTTP
//! API served. The pipeline, the HTTP API and the sampler update one
//! [`Metrics`]; `GET /metrics` renders it in the Prometheus text format.
//!
//! Each `Metrics` has its own registry rather than the crate-global one, so
//! that several workers in one test process do not count into each other.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{
    core::Collector, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::domain::outcome::OutcomeStatus;
use crate::domain::period_record::PeriodRecordKind;
use crate::domain::ReasonCode;

/// Where a decision came from: the `source` label of `decided`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionSource {
    Kafka,
    Http,
}

impl DecisionSource {
    fn as_str(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Http => "http",
        }
    }
}

/// The kind of transaction timed by `transaction_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionKind {
    /// A batch of usage messages (the pipeline).
    Batch,
    /// `POST /usages`.
    HttpCreate,
    /// `DELETE /usages/{id}`.
    HttpCorrect,
    /// `POST /usage-batches`.
    HttpBatch,
}

impl TransactionKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::HttpCreate => "http_create",
            Self::HttpCorrect => "http_correct",
            Self::HttpBatch => "http_batch",
        }
    }
}

/// A Kafka client of the worker: the `client` label of `kafka_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaClient {
    Consumer,
    Producer,
}

impl KafkaClient {
    const ALL: [Self; 2] = [Self::Consumer, Self::Producer];

    fn as_str(self) -> &'static str {
        match self {
            Self::Consumer => "consumer",
            Self::Producer => "producer",
        }
    }
}

/// The `kind` label of `kafka_errors_total`: librdkafka's error codes
/// (dozens, and growing) mapped to a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaErrorKind {
    /// The client could not reach or talk to a broker (connection refused or
    /// lost, time-outs, name resolution, all brokers down).
    Transport,
    /// A broker answered with an error.
    Broker,
    /// The client cannot go on (librdkafka's fatal error: the idempotent
    /// producer's state is lost).
    Fatal,
    Other,
}

impl KafkaErrorKind {
    const ALL: [Self; 4] = [Self::Transport, Self::Broker, Self::Fatal, Self::Other];

    fn as_str(self) -> &'static str {
        match self {
            Self::Transport => "transport",
            Self::Broker => "broker",
            Self::Fatal => "fatal",
            Self::Other => "other",
        }
    }

    /// The kind of an rdkafka error code. Codes below zero are the client's
    /// own; codes above zero are the broker's answers.
    pub fn of(code: rdkafka::types::RDKafkaErrorCode) -> Self {
        use rdkafka::types::RDKafkaErrorCode as C;
        match code {
            C::Fatal => Self::Fatal,
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::MessageTimedOut
            | C::RequestTimedOut
            | C::OperationTimedOut
            | C::TimedOutQueue
            | C::NetworkException
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::SSL => Self::Transport,
            c if (c as i32) > 0 => Self::Broker,
            _ => Self::Other,
        }
    }
}

/// The prefix of every metric's name.
const NAMESPACE: &str = "usage_worker";

pub struct Metrics {
    registry: Registry,
    /// The full name of every registered metric family.
    names: Vec<String>,
    consumed: IntCounter,
    decided: IntCounterVec,
    batch_size: Histogram,
    transaction_seconds: HistogramVec,
    event_to_outcome_seconds: Histogram,
    consumer_lag: IntGaugeVec,
    outbox_backlog: IntGaugeVec,
    db_pool_connections: IntGaugeVec,
    db_pool_max_connections: IntGaugeVec,
    assigned_partitions: IntGauge,
    ready: IntGauge,
    stopped_partitions: IntCounterVec,
    http_requests: IntCounterVec,
    http_request_seconds: HistogramVec,
    period_records: IntCounterVec,
    period_sweep_errors: IntCounter,
    kafka_errors: IntCounterVec,
    rebalances: IntCounterVec,
    /// The partitions of `usage-events` held now; `None` before the first
    /// assignment and while a rebalance has taken them away (for `/readyz`).
    assignment: Mutex<Option<Vec<i32>>>,
}

/// Buckets for durations from a millisecond to a minute.
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Buckets for the event-to-outcome latency, which includes time spent
/// waiting in Kafka: up to an hour.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

const BATCH_SIZE_BUCKETS: [f64; 11] = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

impl Default for Metrics {
    fn default() -> Self {
        Self::new().expect("metric definitions are valid and registered once")
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some(NAMESPACE.into()), None)?;
        let consumed = IntCounter::new(
            "messages_consumed_total",
            "Usage messages read from usage-events and handed to a batch",
        )?;
        let decided = IntCounterVec::new(
            Opts::new(
                "messages_decided_total",
                "Usage requests decided, by source (kafka, http), outcome status and reason code",
            ),
            &["source", "status", "reason"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Messages per consumed batch").buckets(BATCH_SIZE_BUCKETS.to_vec()),
        )?;
        let transaction_seconds = HistogramVec::new(
            HistogramOpts::new(
                "transaction_duration_seconds",
                "Duration of committed deciding transactions, by kind (batch, http_create, http_delete, http_batch)",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let event_to_outcome_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "event_to_outcome_seconds",
                "From a usage message's Kafka timestamp to the commit of its outcome",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "consumer_lag",
                "Messages of usage-events not yet decided by the group, per partition (high watermark minus stored offset)",
            ),
            &["partition"],
        )?;
        let outbox_backlog = IntGaugeVec::new(
            Opts::new(
                "outbox_backlog",
                "Outbox records stored but not yet published, per output topic",
            ),
            &["topic"],
        )?;
        let db_pool_connections = IntGaugeVec::new(
            Opts::new(
                "db_pool_connections",
                "Open database connections by pool (worker, http) and state (idle, in_use)",
            ),
            &["pool", "state"],
        )?;
        let db_pool_max_connections = IntGaugeVec::new(
            Opts::new("db_pool_max_connections", "Most connections a database pool opens"),
            &["pool"],
        )?;
        let assigned_partitions = IntGauge::new(
            "assigned_partitions",
            "Partitions of usage-events assigned to this worker",
        )?;
        let ready = IntGauge::new(
            "ready",
            "1 when the last readiness check (GET /readyz, and each scrape of /metrics) passed, else 0",
        )?;
        let stopped_partitions = IntCounterVec::new(
            Opts::new(
                "stopped_partitions_total",
                "Partitions a reader stopped because its stored position is no longer on the topic",
            ),
            &["topic"],
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests served, by method, route and status code",
            ),
            &["method", "route", "status"],
        )?;
        let http_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request durations, by method and route",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["method", "route"],
        )?;
        let period_records = IntCounterVec::new(
            Opts::new(
                "period_records_total",
                "Period records committed to the outbox for usage-periods, by type (usage-period-closed, usage-period-invoiced)",
            ),
            &["type"],
        )?;
        // Both series from the start: a scraper sees 0, not nothing.
        for kind in PeriodRecordKind::ALL {
            period_records.with_label_values(&[kind.as_str()]);
        }
        let period_sweep_errors = IntCounter::new(
            "period_sweep_errors_total",
            "Period sweep rounds that failed (and were tried again)",
        )?;
        let kafka_errors = IntCounterVec::new(
            Opts::new(
                "kafka_errors_total",
                "Errors of the Kafka clients, by client (consumer, producer) and kind (transport, broker, fatal, other)",
            ),
            &["client", "kind"],
        )?;
        for client in KafkaClient::ALL {
            for kind in KafkaErrorKind::ALL {
                kafka_errors.with_label_values(&[client.as_str(), kind.as_str()]);
            }
        }
        let rebalances = IntCounterVec::new(
            Opts::new(
                "consumer_rebalances_total",
                "Partitions of usage-events assigned to or revoked from this worker's consumer, by event (assigned, revoked)",
            ),
            &["event"],
        )?;
        for event in ["assigned", "revoked"] {
            rebalances.with_label_values(&[event]);
        }
        let mut names = Vec::new();
        let collectors: [Box<dyn Collector>; 18] = [
            Box::new(consumed.clone()),
            Box::new(decided.clone()),
            Box::new(batch_size.clone()),
            Box::new(transaction_seconds.clone()),
            Box::new(event_to_outcome_seconds.clone()),
            Box::new(consumer_lag.clone()),
            Box::new(outbox_backlog.clone()),
            Box::new(db_pool_connections.clone()),
            Box::new(db_pool_max_connections.clone()),
            Box::new(assigned_partitions.clone()),
            Box::new(ready.clone()),
            Box::new(stopped_partitions.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_request_seconds.clone()),
            Box::new(period_records.clone()),
            Box::new(period_sweep_errors.clone()),
            Box::new(kafka_errors.clone()),
            Box::new(rebalances.clone()),
        ];
        for collector in collectors {
            names.extend(collector.desc().iter().map(|d| format!("{NAMESPACE}_{}", d.fq_name)));
            registry.register(collector)?;
        }
        Ok(Self {
            registry,
            names,
            consumed,
            decided,
            batch_size,
            transaction_seconds,
            event_to_outcome_seconds,
            consumer_lag,
            outbox_backlog,
            db_pool_connections,
            db_pool_max_connections,
            assigned_partitions,
            ready,
            stopped_partitions,
            http_requests,
            http_request_seconds,
            period_records,
            period_sweep_errors,
            kafka_errors,
            rebalances,
            assignment: Mutex::new(None),
        })
    }

    /// The full name of every metric this registry exports (a family shows
    /// on `/metrics` once it has a series).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Counts decisions; `reason` is empty for those without one.
    pub fn record_decisions(&self, source: DecisionSource, decided: &[(OutcomeStatus, Option<ReasonCode>)]) {
        for (status, reason) in decided {
            self.record_decision(source, *status, *reason);
        }
    }

    pub fn record_decision(&self, source: DecisionSource, status: OutcomeStatus, reason: Option<ReasonCode>) {
        self.decided
            .with_label_values(&[source.as_str(), status.as_str(), reason.map_or("", ReasonCode::as_str)])
            .inc();
    }

    pub fn observe_transaction(&self, kind: TransactionKind, elapsed: Duration) {
        self.transaction_seconds
            .with_label_values(&[kind.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// A consumed batch whose decisions are committed: its size, and the
    /// latency of each message that carries a timestamp.
    pub fn observe_batch(&self, size: usize, timestamps: impl Iterator<Item = DateTime<Utc>>, now: DateTime<Utc>) {
        self.consumed.inc_by(size as u64);
        self.batch_size.observe(size as f64);
        for timestamp in timestamps {
            // A producer clock ahead of ours would make it negative.
            let seconds = (now - timestamp).num_microseconds().unwrap_or(i64::MAX).max(0);
            self.event_to_outcome_seconds.observe(seconds as f64 / 1e6);
        }
    }

    pub fn set_consumer_lag(&self, partition: i32, lag: i64) {
        self.consumer_lag
            .with_label_values(&[partition.to_string().as_str()])
            .set(lag.max(0));
    }

    pub fn set_outbox_backlog(&self, topic: &str, records: i64) {
        self.outbox_backlog.with_label_values(&[topic]).set(records);
    }

    pub fn set_pool(&self, pool: &str, open: u32, idle: usize, max: u32) {
        let idle = idle as i64;
        self.db_pool_connections.with_label_values(&[pool, "idle"]).set(idle);
        self.db_pool_connections
            .with_label_values(&[pool, "in_use"])
            .set((i64::from(open) - idle).max(0));
        self.db_pool_max_connections.with_label_values(&[pool]).set(max.into());
    }

    /// A reader stopped a partition of `topic`: its stored position is no
    /// longer on the topic.
    pub fn partition_stopped(&self, topic: &str, count: u64) {
        self.stopped_partitions.with_label_values(&[topic]).inc_by(count);
    }

    /// The consumer's current assignment (`None`: none held).
    pub fn set_assignment(&self, partitions: Option<&[i32]>) {
        self.assigned_partitions.set(partitions.map_or(0, |p| p.len() as i64));
        *self.assignment.lock().expect("assignment lock") = partitions.map(<[i32]>::to_vec);
    }

    /// What the latest readiness check found.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn assignment(&self) -> Option<Vec<i32>> {
        self.assignment.lock().expect("assignment lock").clone()
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .with_label_values(&[method, route, status.to_string().as_str()])
            .inc();
        self.http_request_seconds
            .with_label_values(&[method, route])
            .observe(elapsed.as_secs_f64());
    }

    /// A period record committed to the outbox (by the sweep or an invoice).
    pub fn period_record_staged(&self, kind: PeriodRecordKind) {
        self.period_records.with_label_values(&[kind.as_str()]).inc();
    }

    /// A period sweep round failed; it is tried again.
    pub fn period_sweep_failed(&self) {
        self.period_sweep_errors.inc();
    }

    /// An error of a Kafka client (from its error callback, or a failed
    /// delivery).
    pub fn kafka_error(&self, client: KafkaClient, kind: KafkaErrorKind) {
        self.kafka_errors
            .with_label_values(&[client.as_str(), kind.as_str()])
            .inc();
    }

    /// The consumer's partitions were assigned (`true`) or revoked.
    pub fn rebalanced(&self, assigned: bool) {
        let event = if assigned { "assigned" } else { "revoked" };
        self.rebalances.with_label_values(&[event]).inc();
    }

    /// How many times the consumer's partitions were revoked.
    pub fn revocations(&self) -> u64 {
        self.rebalances.with_label_values(&["revoked"]).get()
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("the text encoder writes to memory");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_decisions_with_their_labels() {
        let metrics = Metrics::default();
        metrics.record_decisions(
            DecisionSource::Kafka,
            &[
                (OutcomeStatus::Created, None),
                (OutcomeStatus::Rejected, Some(ReasonCode::UsageLimitExceeded)),
            ],
        );
        metrics.record_decision(DecisionSource::Http, OutcomeStatus::Voided, None);
        let text = metrics.render();
        assert!(
            text.contains(r#"usage_worker_messages_decided_total{reason="",source="kafka",status="created"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"reason="usage_limit_exceeded",source="kafka",status="rejected"} 1"#));
        assert!(text.contains(r#"source="http",status="voided"} 1"#));
    }

    #[test]
    fn a_batch_moves_consumed_size_and_latency() {
        let metrics = Metrics::default();
        let now = Utc::now();
        metrics.observe_batch(3, [now - chrono::Duration::seconds(2)].into_iter(), now);
        let text = metrics.render();
        assert!(text.contains("usage_worker_messages_consumed_total 3"), "{text}");
        assert!(text.contains("usage_worker_batch_size_count 1"), "{text}");
        assert!(text.contains("usage_worker_event_to_outcome_seconds_count 1"), "{text}");
        assert!(
            text.contains(r#"usage_worker_event_to_outcome_seconds_bucket{le="2.5"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn period_records_are_counted_by_type_from_zero() {
        let metrics = Metrics::default();
        let text = metrics.render();
        assert!(
            text.contains(r#"usage_worker_period_records_total{type="usage-period-invoiced"} 0"#),
            "{text}"
        );
        metrics.period_record_staged(PeriodRecordKind::Closed);
        metrics.period_sweep_failed();
        let text = metrics.render();
        assert!(
            text.contains(r#"usage_worker_period_records_total{type="usage-period-closed"} 1"#),
            "{text}"
        );
        assert!(text.contains("usage_worker_period_sweep_errors_total 1"), "{text}");
    }

    #[test]
    fn pool_usage_is_never_negative() {
        let metrics = Metrics::default();
        metrics.set_pool("http", 1, 3, 8);
        assert!(metrics
            .render()
            .contains(r#"usage_worker_db_pool_connections{pool="http",state="in_use"} 0"#));
    }

    #[test]
    fn kafka_errors_have_a_closed_set_of_labels_counted_from_zero() {
        use rdkafka::types::RDKafkaErrorCode as C;
        let metrics = Metrics::default();
        assert!(metrics.names().iter().any(|n| n == "usage_worker_kafka_errors_total"));
        assert!(metrics
            .names()
            .iter()
            .any(|n| n == "usage_worker_consumer_rebalances_total"));
        let text = metrics.render();
        assert!(
            text.contains(r#"usage_worker_kafka_errors_total{client="producer",kind="fatal"} 0"#),
            "{text}"
        );
        assert_eq!(KafkaErrorKind::of(C::AllBrokersDown), KafkaErrorKind::Transport);
        assert_eq!(KafkaErrorKind::of(C::Fatal), KafkaErrorKind::Fatal);
        assert_eq!(KafkaErrorKind::of(C::NotLeaderForPartition), KafkaErrorKind::Broker);
        assert_eq!(KafkaErrorKind::of(C::QueueFull), KafkaErrorKind::Other);
        metrics.kafka_error(KafkaClient::Consumer, KafkaErrorKind::of(C::BrokerTransportFailure));
        metrics.rebalanced(false);
        let text = metrics.render();
        assert!(
            text.contains(r#"usage_worker_kafka_errors_total{client="consumer",kind="transport"} 1"#),
            "{text}"
        );
        assert_eq!(metrics.revocations(), 1);
    }

    #[test]
    fn assignment_is_tracked_for_readiness() {
        let metrics = Metrics::default();
        assert_eq!(metrics.assignment(), None);
        metrics.set_assignment(Some(&[0, 2]));
        assert_eq!(metrics.assignment(), Some(vec![0, 2]));
        assert!(metrics.render().contains("usage_worker_assigned_partitions 2"));
        metrics.set_assignment(None);
        assert_eq!(metrics.assignment(), None);
    }
}
