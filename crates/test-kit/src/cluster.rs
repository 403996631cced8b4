//! A Kafka cluster of a test's or a run's own.

use usage_worker::embedded::EmbeddedKafka;

use crate::tansu::TansuBroker;

/// Which Kafka to run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// librdkafka's mock cluster, in this process.
    Mock,
    /// A tansu broker process with in-memory storage (`TANSU_BIN`). Fails
    /// when tansu is not installed.
    Tansu,
}

/// A running cluster: the mock (which can take its brokers down and up) or
/// a tansu broker process (stopped when dropped).
pub enum Cluster {
    Mock(EmbeddedKafka),
    Tansu(TansuBroker),
}

impl Cluster {
    /// Starts one, with `brokers` brokers for the mock (tansu runs one).
    pub fn start(kind: BrokerKind, brokers: i32) -> anyhow::Result<Self> {
        Ok(match kind {
            BrokerKind::Mock => Cluster::Mock(EmbeddedKafka::start(brokers)?),
            BrokerKind::Tansu => Cluster::Tansu(TansuBroker::start_temporary()?),
        })
    }

    pub fn kind(&self) -> BrokerKind {
        match self {
            Cluster::Mock(_) => BrokerKind::Mock,
            Cluster::Tansu(_) => BrokerKind::Tansu,
        }
    }

    pub fn bootstrap_servers(&self) -> &str {
        match self {
            Cluster::Mock(kafka) => kafka.bootstrap_servers(),
            Cluster::Tansu(broker) => broker.bootstrap_servers(),
        }
    }

    /// Creates these topics, each with `partitions` partitions.
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
        match self {
            Cluster::Mock(kafka) => topics.iter().try_for_each(|t| kafka.create_topic(t, partitions)),
            Cluster::Tansu(broker) => broker.create_topics(topics, partitions).await,
        }
    }

    /// The mock cluster, for what only it can do (brokers down and up).
    pub fn mock(&self) -> anyhow::Result<&EmbeddedKafka> {
        match self {
            Cluster::Mock(kafka) => Ok(kafka),
            Cluster::Tansu(_) => anyhow::bail!("only librdkafka's mock cluster can do this"),
        }
    }
}
