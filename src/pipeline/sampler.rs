//! Gauges that are read rather than counted: the group's consumer lag per
//! partition of `usage-events` (Kafka's high watermark minus the offset
//! stored in PostgreSQL), the outbox backlog per output topic, and the
//! database pools' connections. Sampled every few seconds, so that a scrape
//! of `/metrics` never waits on Kafka or the database.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::store;

/// How often the gauges are refreshed.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Sampler {
    pub metrics: Arc<Metrics>,
    /// Pools by the name of their `pool` label; the first one is queried.
    pub pools: Vec<(&'static str, PgPool)>,
    pub group: String,
    pub topic: String,
    pub partitions: i32,
    /// A client outside the group, for watermarks.
    pub metadata: Arc<BaseConsumer>,
}

impl Sampler {
    /// Samples now and then every [`SAMPLE_INTERVAL`] until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.sample().await,
                _ = &mut stop => return,
            }
        }
    }

    async fn sample(&self) {
        for (name, pool) in &self.pools {
            self.metrics
                .set_pool(name, pool.size(), pool.num_idle(), pool.options().get_max_connections());
        }
        let Some((_, pool)) = self.pools.first() else { return };
        if let Err(e) = self.sample_backlog(pool).await {
            tracing::debug!(error = format!("{e:#}"), "sampling the outbox backlog failed");
        }
        if let Err(e) = self.sample_lag(pool).await {
            tracing::debug!(error = format!("{e:#}"), "sampling the consumer lag failed");
        }
    }

    async fn sample_backlog(&self, pool: &PgPool) -> anyhow::Result<()> {
        for (topic, records) in store::outbox_backlog(pool).await? {
            self.metrics.set_outbox_backlog(&topic, records);
        }
        Ok(())
    }

    /// Lag of the partitions the group has stored offsets for; one the group
    /// never started has no lag to report yet.
    async fn sample_lag(&self, pool: &PgPool) -> anyhow::Result<()> {
        let partitions: Vec<i32> = (0..self.partitions).collect();
        let stored = store::stored_offsets(pool, &self.group, &self.topic, &partitions).await?;
        let metadata = self.metadata.clone();
        let topic = self.topic.clone();
        let highs = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|p| Ok((p, metadata.fetch_watermarks(&topic, p, WATERMARK_TIMEOUT)?.1)))
                .collect::<Result<Vec<(i32, i64)>, rdkafka::error::KafkaError>>()
        })
        .await??;
        for (partition, high) in highs {
            if let Some(next) = stored.get(&partition) {
                self.metrics.set_consumer_lag(partition, high - next);
            }
        }
        Ok(())
    }
}
