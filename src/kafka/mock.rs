//! An embedded Kafka: librdkafka's mock cluster, which speaks the Kafka
//! protocol on localhost ports. Used by `demo`, `bench` and the tests.

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;

pub struct EmbeddedKafka {
    // The cluster lives as long as the client that created it.
    owner: BaseProducer,
    bootstrap: String,
}

impl EmbeddedKafka {
    /// Starts a cluster of `brokers` brokers. Group joins are made quick (the
    /// mock's default initial rebalance delay is 3 s).
    pub fn start(brokers: i32) -> anyhow::Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("log_level", "3")
            .create()
            .context("starting the mock Kafka cluster")?;
        let cluster = owner
            .client()
            .mock_cluster()
            .context("the mock cluster did not start")?;
        let bootstrap = cluster.bootstrap_servers();
        drop(cluster);
        // SAFETY: the pointer comes from a live client that owns the cluster.
        unsafe {
            let handle = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(handle, 0);
        }
        Ok(Self { owner, bootstrap })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.owner
            .client()
            .mock_cluster()
            .context("mock cluster gone")?
            .create_topic(name, partitions, 1)
            .with_context(|| format!("creating topic {name}"))
    }

    /// Creates every topic the worker uses (the mock cluster does not
    /// implement CreateTopics, so the worker cannot create its outputs).
    pub fn create_worker_topics(&self, topics: &crate::config::TopicSettings, partitions: i32) -> anyhow::Result<()> {
        topics
            .all()
            .into_iter()
            .try_for_each(|topic| self.create_topic(topic, partitions))
    }

    pub fn broker_down(&self, broker: i32) -> anyhow::Result<()> {
        Ok(self
            .owner
            .client()
            .mock_cluster()
            .context("mock cluster gone")?
            .broker_down(broker)?)
    }

    pub fn broker_up(&self, broker: i32) -> anyhow::Result<()> {
        Ok(self
            .owner
            .client()
            .mock_cluster()
            .context("mock cluster gone")?
            .broker_up(broker)?)
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        let _ = self.owner.flush(Duration::from_millis(100));
    }
}
