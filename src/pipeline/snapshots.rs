//! Keeping PostgreSQL's subscriptions current from the compacted
//! `subscriptions` topic, and waiting for it before a usage batch is decided.
//!
//! Every worker reads every partition of the topic (no group): applying a
//! snapshot twice changes nothing, and each worker then knows for itself how
//! far the snapshots are applied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::domain::subscription::decode_snapshot;
use crate::store::{self, SnapshotChange};

/// How far this worker has applied each partition of the subscriptions topic.
#[derive(Default)]
pub struct SnapshotProgress {
    applied: Mutex<HashMap<i32, i64>>,
    changed: Notify,
    pub invalid: std::sync::atomic::AtomicU64,
}

impl SnapshotProgress {
    fn set(&self, partition: i32, next: i64) {
        self.applied
            .lock()
            .expect("progress lock")
            .insert(partition, next);
        self.changed.notify_waiters();
    }

    fn reached(&self, targets: &HashMap<i32, i64>) -> bool {
        let applied = self.applied.lock().expect("progress lock");
        targets
            .iter()
            .all(|(p, high)| applied.get(p).is_some_and(|next| next >= high))
    }

    /// Waits until every partition is applied up to the given high
    /// watermarks, at most `limit`. Returns whether it got there.
    pub async fn wait_for(&self, targets: &HashMap<i32, i64>, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if self.reached(targets) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.reached(targets);
            }
        }
    }
}

pub struct SnapshotReader {
    pub pool: PgPool,
    pub group: String,
    pub topic: String,
    pub partitions: i32,
    pub retry_max: Duration,
}

impl SnapshotReader {
    /// Starts the reader thread; it stops when `stop` is set.
    pub async fn spawn(
        self,
        config: &ClientConfig,
        progress: Arc<SnapshotProgress>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let consumer: BaseConsumer = config
            .create()
            .context("creating the subscriptions reader")?;
        let runtime = Handle::current();
        let partitions: Vec<i32> = (0..self.partitions).collect();
        let initial: HashMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
        let stored = store::load_offsets(&self.pool, &self.group, &self.topic, &initial).await?;
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(stored[p]))?;
            progress.set(*p, stored[p]);
        }
        consumer
            .assign(&tpl)
            .context("assigning the subscriptions partitions")?;
        let handle = std::thread::Builder::new()
            .name("snapshot-reader".into())
            .spawn(move || self.run(consumer, runtime, progress, stop))?;
        Ok(handle)
    }

    fn run(
        self,
        consumer: BaseConsumer,
        runtime: Handle,
        progress: Arc<SnapshotProgress>,
        stop: Arc<AtomicBool>,
    ) {
        while !stop.load(Ordering::Relaxed) {
            let mut changes = Vec::new();
            let mut positions: HashMap<i32, i64> = HashMap::new();
            let started = Instant::now();
            while changes.len() < 1000 && started.elapsed() < Duration::from_millis(20) {
                match consumer.poll(Duration::from_millis(20)) {
                    Some(Ok(m)) => {
                        positions.insert(m.partition(), m.offset() + 1);
                        match decode(m.key(), m.payload()) {
                            Ok(change) => changes.push(change),
                            Err(reason) => {
                                progress.invalid.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(
                                    topic = %self.topic,
                                    partition = m.partition(),
                                    offset = m.offset(),
                                    reason = %reason,
                                    "invalid subscription snapshot ignored"
                                );
                            }
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "subscriptions reader error"),
                    None => break,
                }
            }
            if positions.is_empty() {
                continue;
            }
            let positions: Vec<(i32, i64)> = positions.into_iter().collect();
            let mut backoff = Duration::from_millis(100);
            loop {
                let applied = runtime.block_on(store::apply_snapshots(
                    &self.pool,
                    &self.group,
                    &self.topic,
                    &changes,
                    &positions,
                ));
                match applied {
                    Ok(outcome) => {
                        tracing::debug!(?outcome, "snapshots applied");
                        break;
                    }
                    Err(e) if stop.load(Ordering::Relaxed) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "snapshots not applied at shutdown; they are read again at start"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "applying snapshots failed; retrying"
                        );
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(self.retry_max);
                    }
                }
            }
            for (p, next) in positions {
                progress.set(p, next);
            }
        }
    }
}

fn decode(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<SnapshotChange, String> {
    match payload {
        None => {
            let id = key
                .and_then(|k| std::str::from_utf8(k).ok())
                .filter(|k| crate::domain::ids::check_id(k).is_ok())
                .ok_or("a tombstone needs the subscription id as its key")?;
            Ok(SnapshotChange::Tombstone(id.to_owned()))
        }
        Some(bytes) => decode_snapshot(bytes).map(SnapshotChange::Upsert),
    }
}

/// Reads the high watermarks of the subscriptions topic.
pub fn high_watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<HashMap<i32, i64>> {
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .with_context(|| format!("reading watermarks of {topic}/{p}"))?;
            Ok((p, high))
        })
        .collect()
}
