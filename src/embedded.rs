//! What `usage-worker demo` runs on when there is no infrastructure: an
//! embedded Kafka (librdkafka's mock cluster, which speaks the Kafka
//! protocol on localhost ports), a scratch database on the configured
//! PostgreSQL server, and a reader of a whole topic. The test kit and the
//! lab build on the same three.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;

use crate::kafka::position_off_topic;

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

    /// The next produce requests fail with these errors, one each.
    pub fn produce_errors(&self, errors: &[rdkafka::types::RDKafkaRespErr]) -> anyhow::Result<()> {
        self.owner
            .client()
            .mock_cluster()
            .context("mock cluster gone")?
            .request_errors(rdkafka::types::RDKafkaApiKey::Produce, errors);
        Ok(())
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

/// A database of its own on the server of `base_url`, named
/// `<prefix>_<timestamp>`; dropped by [`ScratchDatabase::drop_now`].
#[derive(Debug, Clone)]
pub struct ScratchDatabase {
    url: String,
    name: String,
}

impl ScratchDatabase {
    pub async fn create(base_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}_{}", chrono::Utc::now().format("%Y%m%d%H%M%S%3f"));
        Self::create_named(base_url, &name).await
    }

    /// A database of this exact name (created when it does not exist).
    pub async fn create_named(base_url: &str, name: &str) -> anyhow::Result<Self> {
        let mut url = url::Url::parse(base_url).context("invalid setting database.url (DATABASE_URL)")?;
        url.set_path(name);
        let mut admin = admin_connection(url.as_str()).await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .with_context(|| format!("looking for the database {name}"))?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE \"{}\"", name.replace('"', "")))
                .execute(&mut admin)
                .await
                .with_context(|| format!("creating the database {name}"))?;
        }
        let _ = admin.close().await;
        Ok(Self {
            url: url.to_string(),
            name: name.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops it, closing its connections.
    pub async fn drop_now(&self) -> anyhow::Result<()> {
        drop_database(&self.url).await
    }
}

/// Drops the database named in `url`, closing its connections.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let name = url::Url::parse(url)
        .context("invalid database URL")?
        .path()
        .trim_start_matches('/')
        .replace('"', "");
    let mut admin = admin_connection(url).await?;
    let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("dropping the database {name}"));
    let _ = admin.close().await;
    dropped.map(drop)
}

/// A connection to the `postgres` database of the server in `url`.
async fn admin_connection(url: &str) -> anyhow::Result<sqlx::PgConnection> {
    let options = PgConnectOptions::from_str(url).context("invalid database URL")?;
    sqlx::PgConnection::connect_with(&options.database("postgres"))
        .await
        .context("connecting to the database server")
}

/// Every partition of a topic, read from its beginning, outside any group.
/// A gap is an error, never a skip.
pub struct TopicReader {
    consumer: BaseConsumer,
}

impl TopicReader {
    pub fn open(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "usage-worker-reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "error")
            .set("fetch.max.bytes", "52428800")
            // The mock's brokers go down without closing connections.
            .set("socket.timeout.ms", "10000")
            .set("log_level", "3")
            // librdkafka's mock cluster holds an empty fetch for the whole wait.
            .set("fetch.wait.max.ms", "10")
            .create()
            .with_context(|| format!("creating a reader of {topic}"))?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(Self { consumer })
    }

    /// The next record, or `None` when none arrived within `timeout`. Lost
    /// connections (a broker outage) are retried by the client and read as
    /// `None`; an error means records are lost to the reader (its position
    /// is no longer on the topic).
    pub fn poll(&self, timeout: Duration) -> anyhow::Result<Option<BorrowedMessage<'_>>> {
        match self.consumer.poll(timeout) {
            Some(Ok(message)) => Ok(Some(message)),
            Some(Err(e)) if position_off_topic(&e) => Err(e).context("reading a topic"),
            Some(Err(_)) | None => Ok(None),
        }
    }

    /// As [`poll`](Self::poll), the record copied out of the client.
    pub fn next(&self, timeout: Duration) -> anyhow::Result<Option<OwnedMessage>> {
        Ok(self.poll(timeout)?.map(|m| m.detach()))
    }

    /// Every record until none has arrived for `quiet`.
    pub fn until_quiet(&self, quiet: Duration) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut records = Vec::new();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < quiet {
            if let Some(record) = self.next(Duration::from_millis(100))? {
                records.push(record);
                quiet_since = Instant::now();
            }
        }
        Ok(records)
    }
}

/// A record's payload as JSON, or `Null` when it is not JSON (dead letters).
pub fn json_payload(message: &OwnedMessage) -> serde_json::Value {
    message
        .payload()
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or(serde_json::Value::Null)
}
