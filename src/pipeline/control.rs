//! Keeping PostgreSQL current from the control topics every worker reads in
//! full, without a group: `subscriptions` (compacted snapshots) and
//! `invoice-events`. Each message is applied once, in offset order per
//! partition, by whichever worker gets there first (the store compares with
//! the group's stored positions); each worker knows how far they are
//! applied, and waits for that before a usage batch is decided.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::dead_letter::{dead_letter_record, RawMessage};
use super::periods::PeriodOutput;
use crate::domain::invoice::{decode_invoice_event, InvoiceIssued};
use crate::domain::subscription::decode_snapshot;
use crate::retry::Backoff;
use crate::store::{self, ControlMessage, ItemResult, OutboxRecord, SnapshotChange, StoredPositions};

/// How far this worker has applied each partition of a control topic.
#[derive(Default)]
pub struct Progress {
    applied: Mutex<HashMap<i32, i64>>,
    /// Partitions stopped because their stored position is no longer on the
    /// topic: nothing waits for them any more (they would make every batch
    /// wait its whole bound); the log and the metric say so, loudly.
    stopped: Mutex<std::collections::HashSet<i32>>,
    changed: Notify,
    /// Messages that could not be applied (invalid, or naming an unknown
    /// subscription or period) and went to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

impl Progress {
    fn set(&self, partition: i32, next: i64) {
        let mut applied = self.applied.lock().expect("progress lock");
        let entry = applied.entry(partition).or_insert(next);
        *entry = (*entry).max(next);
        drop(applied);
        self.changed.notify_waiters();
    }

    fn stop(&self, partition: i32) {
        self.stopped.lock().expect("progress lock").insert(partition);
        self.changed.notify_waiters();
    }

    fn reached(&self, targets: &HashMap<i32, i64>) -> bool {
        let applied = self.applied.lock().expect("progress lock");
        let stopped = self.stopped.lock().expect("progress lock");
        targets
            .iter()
            .filter(|(p, _)| !stopped.contains(p))
            .all(|(p, high)| applied.get(p).is_some_and(|next| next >= high))
    }

    /// Waits until every partition is applied up to the given high
    /// watermarks, until `deadline`. Returns whether it got there.
    pub async fn wait_for(&self, targets: &HashMap<i32, i64>, deadline: tokio::time::Instant) -> bool {
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

/// A control topic, and how far this worker has applied it.
pub struct AppliedTopic {
    pub topic: String,
    pub partitions: i32,
    pub progress: Arc<Progress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    Subscriptions,
    Invoices,
}

pub struct ControlReader {
    pub pool: PgPool,
    pub group: String,
    pub topic: String,
    pub kind: ControlKind,
    pub partitions: i32,
    pub retry_max: Duration,
    pub dead_letter_topic: String,
    /// Partitions of the dead-letter topic (those of `usage-events`).
    pub dead_letter_partitions: i32,
    pub max_dead_letter_bytes: usize,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where the records of the periods invoices close or bill go.
    pub periods: PeriodOutput,
}

impl ControlReader {
    /// Starts the reader thread from the stored positions; it stops when
    /// `stop` is set.
    pub async fn spawn(
        self,
        config: &ClientConfig,
        progress: Arc<Progress>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let consumer: BaseConsumer = config
            .create()
            .with_context(|| format!("creating the {} reader", self.topic))?;
        let partitions: Vec<i32> = (0..self.partitions).collect();
        let stored = store::until_available("loading control topic offsets", self.retry_max, || {
            store::stored_offsets(&self.pool, &self.group, &self.topic, &partitions)
        })
        .await?;
        // Every partition is read from its beginning, and what lies below the
        // stored position is skipped here, unapplied: a broker may serve a
        // fetch from inside a record batch without that batch's earlier
        // records (tansu does: docs/brokers.md), and compaction leaves gaps.
        // A stored position that is no longer on the topic (retention
        // removed messages nobody applied, or the topic was recreated and
        // is shorter) stops that partition, loudly.
        // Brokers down at start are waited out, as the database is.
        let mut backoff = Backoff::new(Duration::from_millis(100), self.retry_max);
        let bounds = loop {
            let config = config.clone();
            let topic = self.topic.clone();
            let count = self.partitions;
            match tokio::task::spawn_blocking(move || partition_bounds(&config, &topic, count))
                .await
                .context("reading control topic bounds")?
            {
                Ok(bounds) => break bounds,
                Err(e) if stop.load(Ordering::Relaxed) => return Err(e),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = format!("{e:#}"), "reading where the control topic starts and ends failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        let mut tpl = TopicPartitionList::new();
        let mut skip_below = HashMap::new();
        for p in partitions {
            let next = stored.get(&p).copied();
            progress.set(p, next.unwrap_or(0));
            if let (Some(next), Some(&(low, end))) = (next, bounds.get(&p)) {
                if next < low || next > end {
                    self.stop_partition(&progress, p, next, low, end);
                    continue;
                }
                skip_below.insert(p, next);
            }
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning)?;
        }
        let positions = stored;
        consumer
            .assign(&tpl)
            .with_context(|| format!("assigning the {} partitions", self.topic))?;
        // The series exists from the start: a scraper sees 0, not nothing.
        self.metrics.partition_stopped(&self.topic, 0);
        let runtime = Handle::current();
        let name = format!("{}-reader", self.topic);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run(consumer, positions, skip_below, runtime, progress, stop))?;
        Ok(handle)
    }

    fn stop_partition(&self, progress: &Progress, partition: i32, next: i64, low: i64, end: i64) {
        tracing::error!(
            topic = %self.topic,
            partition,
            stored_offset = next,
            log_start_offset = low,
            end_offset = end,
            "STOPPED CONTROL PARTITION {}/{partition}: the stored position {next} is no longer on the \
             topic (it holds {low}..{end}); nothing was skipped, and usage that waits for this \
             partition waits in vain. An operator must decide how to proceed",
            self.topic,
        );
        self.metrics.partition_stopped(&self.topic, 1);
        progress.stop(partition);
    }

    /// `positions`: where the reader stands in each partition with a stored
    /// position (the next offset to apply); `skip_below`: the stored
    /// positions, below which what is read was applied before.
    fn run(
        self,
        consumer: BaseConsumer,
        mut positions: HashMap<i32, i64>,
        skip_below: HashMap<i32, i64>,
        runtime: Handle,
        progress: Arc<Progress>,
        stop: Arc<AtomicBool>,
    ) {
        // The next offset the reader reads in each partition, skipped
        // messages included.
        let mut read_to: HashMap<i32, i64> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let mut pending = Pending::default();
            let started = Instant::now();
            while pending.positions.len() < 1000 && started.elapsed() < Duration::from_millis(20) {
                match consumer.poll(Duration::from_millis(20)) {
                    Some(Ok(m)) => {
                        read_to.insert(m.partition(), m.offset() + 1);
                        if skip_below.get(&m.partition()).is_some_and(|next| m.offset() < *next) {
                            continue;
                        }
                        positions.insert(m.partition(), m.offset() + 1);
                        self.take(&m, &mut pending);
                    }
                    Some(Err(e)) => self.on_error(&consumer, &progress, &mut positions, &mut read_to, e),
                    None => break,
                }
            }
            if pending.positions.is_empty() {
                continue;
            }
            let positions: Vec<(i32, i64)> = pending.positions.iter().map(|(p, o)| (*p, *o)).collect();
            let mut backoff = Backoff::new(Duration::from_millis(100), self.retry_max);
            loop {
                match runtime.block_on(self.apply(&pending, &positions)) {
                    Ok((dead_lettered, stored)) => {
                        progress.dead_lettered.fetch_add(dead_lettered, Ordering::Relaxed);
                        // Another worker may have applied further: what is
                        // stored is applied, whoever did it.
                        for (p, next) in stored {
                            progress.set(p, next);
                        }
                        break;
                    }
                    Err(e) if stop.load(Ordering::Relaxed) => {
                        tracing::warn!(topic = %self.topic, error = format!("{e:#}"), "not applied at shutdown; read again at start");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.topic, error = format!("{e:#}"), "applying failed; retrying");
                        std::thread::sleep(backoff.next_delay());
                    }
                }
            }
            for (p, next) in positions {
                progress.set(p, next);
            }
        }
    }

    /// A consumer error. When the reader's position is no longer on the
    /// topic (retention removed messages while it read), it goes on from
    /// the stored position if that is still there (what lies below it was
    /// applied), or from the partition's start if nothing was ever applied
    /// there; a stored position no longer on the topic (retention removed
    /// messages nobody applied, or the topic was recreated) stops that
    /// partition, loudly: skipping control messages would bill against the
    /// wrong limits or leave periods open.
    fn on_error(
        &self,
        consumer: &BaseConsumer,
        progress: &Progress,
        positions: &mut HashMap<i32, i64>,
        read_to: &mut HashMap<i32, i64>,
        error: KafkaError,
    ) {
        if !crate::kafka::position_off_topic(&error) {
            tracing::warn!(topic = %self.topic, error = %error, "control topic reader error");
            return;
        }
        let mut stopped = TopicPartitionList::new();
        for partition in 0..self.partitions {
            if progress.stopped.lock().expect("progress lock").contains(&partition) {
                continue;
            }
            let (low, high) = match consumer.fetch_watermarks(&self.topic, partition, Duration::from_secs(5)) {
                Ok(bounds) => bounds,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, partition, error = %e, "reading watermarks failed");
                    continue;
                }
            };
            let reading = read_to.get(&partition).copied().unwrap_or(0);
            if (low..=high).contains(&reading) {
                continue;
            }
            let from = match positions.get(&partition).copied() {
                Some(next) if next < low || next > high => {
                    self.stop_partition(progress, partition, next, low, high);
                    stopped.add_partition(&self.topic, partition);
                    continue;
                }
                Some(next) => next,
                None => low,
            };
            tracing::warn!(topic = %self.topic, partition, reading, from, "control topic position no longer on the topic; reading on from what is still to apply");
            match consumer.seek(&self.topic, partition, Offset::Offset(from), Duration::from_secs(10)) {
                Ok(()) => {
                    read_to.insert(partition, from);
                }
                Err(e) => tracing::warn!(topic = %self.topic, partition, error = %e, "seek failed"),
            }
        }
        for element in stopped.elements() {
            positions.remove(&element.partition());
        }
        if stopped.count() > 0 {
            let _ = consumer.pause(&stopped);
        }
    }

    /// Decodes one message into the pending batch.
    fn take(&self, m: &BorrowedMessage<'_>, pending: &mut Pending) {
        pending.positions.insert(m.partition(), m.offset() + 1);
        let coordinates = (m.partition(), m.offset());
        let at = |body| ControlMessage {
            partition: m.partition(),
            offset: m.offset(),
            body,
        };
        let decoded = match self.kind {
            ControlKind::Subscriptions => {
                decode_subscription(m.key(), m.payload()).map(|c| pending.snapshots.push(at(c)))
            }
            ControlKind::Invoices => decode_invoice_event(m.payload().unwrap_or_default()).map(|invoice| {
                pending.invoices.push(ControlMessage {
                    partition: m.partition(),
                    offset: m.offset(),
                    body: invoice,
                });
                pending.raw.insert(
                    coordinates,
                    raw_message(m.key(), m.payload(), crate::kafka::headers::of_borrowed(m)),
                );
            }),
        };
        if let Err(detail) = decoded {
            tracing::warn!(topic = %self.topic, partition = m.partition(), offset = m.offset(), reason = %detail, "invalid message sent to the dead-letter topic");
            let reason = match self.kind {
                ControlKind::Subscriptions => "invalid_snapshot",
                ControlKind::Invoices => "invalid_invoice_event",
            };
            let detail: String = detail.chars().take(500).collect();
            pending.invalid.push(self.dead_letter(
                coordinates,
                &raw_message(m.key(), m.payload(), crate::kafka::headers::of_borrowed(m)),
                reason,
                &detail,
            ));
        }
    }

    /// Applies what no reader of the group applied yet; returns how many
    /// messages went to the dead-letter topic and the stored positions.
    async fn apply(&self, pending: &Pending, positions: &[(i32, i64)]) -> anyhow::Result<(u64, StoredPositions)> {
        let mut dead_lettered = pending.invalid.len() as u64;
        let stored = match self.kind {
            ControlKind::Subscriptions => {
                let outcome = store::apply_snapshots(
                    &self.pool,
                    &self.group,
                    &self.topic,
                    &pending.snapshots,
                    &pending.invalid,
                    positions,
                )
                .await?;
                tracing::debug!(?outcome, "snapshots applied");
                outcome.positions
            }
            ControlKind::Invoices => {
                let mut unmatched = 0;
                let dead_letters_for = |message: &ControlMessage<InvoiceIssued>, results: &[ItemResult]| {
                    let reason = results.iter().find_map(|r| match r {
                        ItemResult::UnknownSubscription => Some("unknown_subscription"),
                        ItemResult::UnknownPeriod => Some("unknown_period"),
                        ItemResult::AlreadyInvoiced => Some("period_already_invoiced"),
                        ItemResult::Applied(_) => None,
                    })?;
                    unmatched += 1;
                    let coordinates = (message.partition, message.offset);
                    tracing::warn!(topic = %self.topic, partition = message.partition, offset = message.offset, reason, "invoice item not applied; sent to the dead-letter topic");
                    Some(self.dead_letter(coordinates, &pending.raw[&coordinates], reason, ""))
                };
                let applied = store::apply_invoices(
                    &self.pool,
                    &self.group,
                    &self.topic,
                    &pending.invoices,
                    &self.periods.closing(),
                    dead_letters_for,
                    &pending.invalid,
                    positions,
                )
                .await?;
                dead_lettered += unmatched;
                for kind in &applied.period_records {
                    self.metrics.period_record_staged(*kind);
                }
                applied.positions
            }
        };
        Ok((dead_lettered, stored))
    }

    fn dead_letter(
        &self,
        (partition, offset): (i32, i64),
        raw: &RawMessage,
        reason: &str,
        detail: &str,
    ) -> OutboxRecord {
        dead_letter_record(
            &self.dead_letter_topic,
            partition % self.dead_letter_partitions,
            (&self.topic, partition, offset),
            raw,
            reason,
            detail,
            self.max_dead_letter_bytes,
        )
    }
}

#[derive(Default)]
struct Pending {
    positions: HashMap<i32, i64>,
    snapshots: Vec<ControlMessage<SnapshotChange>>,
    invoices: Vec<ControlMessage<InvoiceIssued>>,
    /// The original message of each invoice, for its dead-letter copy.
    raw: HashMap<(i32, i64), RawMessage>,
    invalid: Vec<OutboxRecord>,
}

fn decode_subscription(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<SnapshotChange, String> {
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

/// The original key, bytes and headers of a message.
pub fn raw_message(key: Option<&[u8]>, payload: Option<&[u8]>, headers: crate::domain::headers::Headers) -> RawMessage {
    RawMessage {
        key: key.map(<[u8]>::to_vec),
        payload: payload.map(<[u8]>::to_vec),
        headers,
    }
}

/// Where each partition of a control topic starts and really ends (the end
/// read forward from what ListOffsets reports: see `kafka::ends`).
fn partition_bounds(config: &ClientConfig, topic: &str, partitions: i32) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
    let reader: BaseConsumer = config.create().context("creating a reader of control topic bounds")?;
    let ends = crate::kafka::ends::EndReader::new(config)?
        .ends(&[(topic, partitions)], Duration::from_secs(30))?
        .pop()
        .unwrap_or_default();
    (0..partitions)
        .map(|p| {
            let (low, _) = reader
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading the start of {topic}/{p}"))?;
            Ok((p, (low, ends.get(&p).copied().unwrap_or(0))))
        })
        .collect()
}

/// Reads the high watermarks of every partition of the given topics: one
/// ListOffsets request per broker (offsets for the "latest" timestamp), so a
/// batch waits for one round trip, not one per partition, then a read
/// forward from there to the partitions' real ends, which is one more round
/// trip where ListOffsets was right and catches a broker that reports less
/// than it holds (tansu; see `kafka::ends`).
pub fn high_watermarks(
    ends: &crate::kafka::ends::EndReader,
    topics: &[(&str, i32)],
    confirm: bool,
) -> anyhow::Result<Vec<HashMap<i32, i64>>> {
    let timeout = Duration::from_secs(5);
    if confirm {
        ends.ends(topics, timeout)
    } else {
        ends.reported(topics, timeout)
    }
    .context("reading control topic watermarks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_partition_is_not_waited_for() {
        let progress = Progress::default();
        progress.set(0, 5);
        let targets: HashMap<i32, i64> = [(0, 5), (1, 10)].into_iter().collect();
        assert!(!progress.reached(&targets), "partition 1 is behind");
        progress.stop(1);
        assert!(progress.reached(&targets), "nothing waits for a stopped partition");
        progress.set(0, 3);
        assert!(progress.reached(&targets), "progress never goes back");
    }
}
