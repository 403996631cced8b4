//! The outbox relay: publishes what the deciding transactions stored, in
//! sequence order, to the output partition with the source's number, for the
//! partitions this worker owns. Before it publishes a partition it has just
//! taken over, it reads the partition's last record on the topic and skips
//! every record up to that record's `outbox-seq`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::store;

/// How many records one round reads from the outbox per partition.
const ROUND_LIMIT: i64 = 5000;

pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    reader_config: ClientConfig,
    topics: Vec<String>,
    /// (topic, partition) -> last sequence known to be on the topic; `None`
    /// until read back from the topic after an assignment or a failure.
    owned: Mutex<HashMap<(String, i32), Option<i64>>>,
    /// Held for the length of a publishing round; a revocation waits for it,
    /// so that a partition's next owner never publishes alongside us.
    round: tokio::sync::Mutex<()>,
    wake: Notify,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer_config: &ClientConfig,
        reader_config: ClientConfig,
        topics: Vec<String>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            producer: producer_config.create().context("creating the producer")?,
            reader_config,
            topics,
            owned: Mutex::new(HashMap::new()),
            round: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        })
    }

    pub fn assign(&self, partitions: &[i32]) {
        let mut owned = self.owned.lock().expect("relay lock");
        for topic in &self.topics {
            for p in partitions {
                owned.insert((topic.clone(), *p), None);
            }
        }
        self.wake.notify_one();
    }

    /// Stops publishing the partitions and waits for a round in flight to
    /// finish. Call from a thread that may block (the consumer thread).
    pub fn revoke(&self, partitions: &[i32]) {
        self.owned
            .lock()
            .expect("relay lock")
            .retain(|(_, p), _| !partitions.contains(p));
        drop(self.round.blocking_lock());
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes until nothing is pending or `deadline` passes.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        loop {
            let published = tokio::time::timeout_at(deadline, self.round_once())
                .await
                .context("time-out publishing the outbox")??;
            if published == 0 {
                return Ok(());
            }
        }
    }

    /// Runs rounds until `stop` resolves.
    pub async fn run(&self, retry_max: Duration, retention_days: u32, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(50);
        let mut last_cleanup = tokio::time::Instant::now();
        loop {
            if *stop.borrow() {
                return;
            }
            match self.round_once().await {
                Ok(published) => {
                    backoff = Duration::from_millis(50);
                    if published > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        backoff_ms = backoff.as_millis() as u64,
                        "publishing the outbox failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(retry_max);
                    continue;
                }
            }
            if last_cleanup.elapsed() > Duration::from_secs(3600) {
                last_cleanup = tokio::time::Instant::now();
                match store::delete_expired(&self.pool, retention_days).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(deleted = n, "deleted expired outcome records")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "deleting expired outcome records failed"),
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One pass over the owned partitions; returns how many records went out.
    async fn round_once(&self) -> anyhow::Result<usize> {
        let _round = self.round.lock().await;
        let work: Vec<((String, i32), Option<i64>)> = self
            .owned
            .lock()
            .expect("relay lock")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut after = Vec::with_capacity(work.len());
        for ((topic, partition), known) in work {
            let published = match known {
                Some(seq) => seq,
                None => {
                    let seq = self.resync(&topic, partition).await?;
                    self.set_published(&topic, partition, seq);
                    seq
                }
            };
            after.push((topic, partition, published));
        }
        if after.is_empty() {
            return Ok(0);
        }
        let clock = std::time::Instant::now();
        let records = store::pending_many(&self.pool, &after, ROUND_LIMIT).await?;
        let read = clock.elapsed();
        let mut deliveries = Vec::with_capacity(records.len());
        for (topic, partition, record) in &records {
            deliveries.push(self.send(topic, *partition, record).await?);
        }
        let mut last: HashMap<(String, i32), i64> = HashMap::new();
        for ((topic, partition, record), delivery) in records.iter().zip(deliveries) {
            let result = delivery
                .await
                .map_err(|_| anyhow::anyhow!("producer dropped a delivery"));
            if let Err(e) = result.and_then(|r| r.map_err(|(e, _)| anyhow::Error::from(e))) {
                // Where the topic stands is unknown now: read it back before
                // publishing this partition again. What was confirmed before
                // the failure is recorded below on the next round.
                self.mark_unknown(topic, *partition);
                return Err(e).with_context(|| format!("delivering to {topic}/{partition}"));
            }
            last.insert((topic.clone(), *partition), record.seq);
        }
        let delivered = clock.elapsed();
        let published: Vec<(String, i32, i64)> = last.into_iter().map(|((t, p), seq)| (t, p, seq)).collect();
        store::mark_published_many(&self.pool, &published).await?;
        for (topic, partition, seq) in &published {
            self.set_published(topic, *partition, *seq);
        }
        if !records.is_empty() {
            tracing::debug!(
                records = records.len(),
                read_ms = read.as_secs_f64() * 1e3,
                deliver_ms = (delivered - read).as_secs_f64() * 1e3,
                mark_ms = (clock.elapsed() - delivered).as_secs_f64() * 1e3,
                "relay round"
            );
        }
        Ok(records.len())
    }

    async fn send(
        &self,
        topic: &str,
        partition: i32,
        record: &store::StoredRecord,
    ) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
        let seq = record.seq.to_string();
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 1);
            for (k, v) in &record.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            headers = headers.insert(Header {
                key: "outbox-seq",
                value: Some(seq.as_bytes()),
            });
            let mut future = FutureRecord::to(topic)
                .partition(partition)
                .payload(&record.payload)
                .headers(headers);
            if let Some(key) = &record.key {
                future = future.key(key);
            }
            match self.producer.send_result(future) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e).context("enqueueing an outbox record"),
            }
        }
    }

    fn set_published(&self, topic: &str, partition: i32, seq: i64) {
        if let Some(known) = self
            .owned
            .lock()
            .expect("relay lock")
            .get_mut(&(topic.to_owned(), partition))
        {
            *known = Some(seq);
        }
    }

    fn mark_unknown(&self, topic: &str, partition: i32) {
        if let Some(known) = self
            .owned
            .lock()
            .expect("relay lock")
            .get_mut(&(topic.to_owned(), partition))
        {
            *known = None;
        }
    }

    /// The last sequence on the topic or in the database, whichever is
    /// further: the database may lag the topic after a crash between the
    /// delivery and its record.
    async fn resync(&self, topic: &str, partition: i32) -> anyhow::Result<i64> {
        let stored = store::published_seq(&self.pool, topic, partition).await?;
        let config = self.reader_config.clone();
        let topic_owned = topic.to_owned();
        let on_topic = tokio::task::spawn_blocking(move || last_outbox_seq(&config, &topic_owned, partition))
            .await
            .context("reading the last record")??;
        let seq = stored.max(on_topic.unwrap_or(0));
        if on_topic.is_some_and(|s| s > stored) {
            store::mark_published(&self.pool, topic, partition, seq).await?;
        }
        tracing::info!(
            topic,
            partition,
            stored,
            on_topic,
            resume_after = seq,
            "outbox partition resynchronised"
        );
        Ok(seq)
    }
}

/// The `outbox-seq` header of the last record of a partition, if any.
fn last_outbox_seq(config: &ClientConfig, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
    let consumer: BaseConsumer = config.create().context("creating a reader")?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| format!("reading watermarks of {topic}/{partition}"))?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(high - 1))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.offset() >= high - 1 => {
                let headers = crate::kafka::headers::of_borrowed(&message);
                let seq = crate::kafka::headers::text(&headers, "outbox-seq").and_then(|v| v.parse::<i64>().ok());
                if seq.is_none() {
                    tracing::warn!(topic, partition, "the last record has no outbox-seq header (not ours?)");
                }
                return Ok(seq);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!(topic, partition, error = %e, "reading the last record"),
            None => {}
        }
    }
    anyhow::bail!("timed out reading the last record of {topic}/{partition}")
}
