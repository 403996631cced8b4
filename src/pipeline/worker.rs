//! The worker: usage events from the consumer -> decide -> commit, in up to
//! `lanes` batches at once, and the answers to the consumer's rebalances
//! (resume from PostgreSQL's offsets; hand the output partitions to the
//! relay, or take them back).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use sqlx::PgPool;
use tokio::task::JoinSet;

use super::control::{self, AppliedTopic};
use super::decide::{decide_batch, BatchReport, DecideContext, DecodedMessage};
use super::relay::Relay;
use crate::config::Settings;
use crate::domain::cloudevents::decode_usage_message;
use crate::domain::event::{identify, DecodeContext};
use crate::domain::{ReasonCode, Rejection};
use crate::kafka::consumer::{BatchReply, ConsumerEvent, OffsetRange, UsageBatch, UsageConsumer};
use crate::kafka::{self, ends::EndReader};
use crate::retry::Backoff;
use crate::store::{self, FailureKind};

/// Counts of what the worker decided, for logs, the demo and the tests,
/// and the Prometheus metrics it records into.
#[derive(Default)]
pub struct DecisionCounts {
    by_outcome: Mutex<BTreeMap<(String, Option<String>), u64>>,
    pub decided: AtomicU64,
    pub batches: AtomicU64,
    /// Prometheus metrics, shared with the HTTP API's `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl DecisionCounts {
    fn record(&self, report: &BatchReport, elapsed: Duration) {
        self.metrics
            .record_decisions(crate::metrics::DecisionSource::Kafka, &report.decided);
        self.metrics
            .observe_transaction(crate::metrics::TransactionKind::Batch, elapsed);
        let mut by = self.by_outcome.lock().expect("counts lock");
        for (status, code) in &report.decided {
            *by.entry((status.as_str().to_owned(), code.map(|c| c.as_str().to_owned())))
                .or_default() += 1;
        }
        self.decided.fetch_add(report.decided.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// (status, reason code) -> count.
    pub fn snapshot(&self) -> BTreeMap<(String, Option<String>), u64> {
        self.by_outcome.lock().expect("counts lock").clone()
    }
}

/// How an attempt at deciding a batch ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecideOutcome {
    Committed,
    /// A transient failure at shutdown: rolled back, decided after restart.
    RolledBackAtShutdown,
    /// The database refused the data (a permanent failure): the caller
    /// splits the batch.
    Refused,
}

pub struct Worker {
    pub pool: PgPool,
    pub ctx: DecideContext,
    pub settings: Settings,
    pub counts: Arc<DecisionCounts>,
    pub control_topics: Vec<AppliedTopic>,
    /// Reads where the control topics end before a batch is decided.
    pub control_ends: EndReader,
    pub relay: Arc<Relay>,
    /// Set at shutdown: cuts transient retries short.
    pub shutting_down: AtomicBool,
}

impl Worker {
    /// Decides batches until `shutdown` resolves or a batch fails, then
    /// lets the batches in flight run to their end (commit or roll back).
    /// Up to `lanes` batches at once, on disjoint partitions (the consumer
    /// never puts a partition in flight into another batch).
    pub async fn decide_until(
        self: &Arc<Self>,
        input: &mut UsageInput,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut lanes = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                batch = input.next_batch() => {
                    let Some((batch, reply)) = batch else {
                        anyhow::bail!("the usage consumer stopped");
                    };
                    let worker = self.clone();
                    lanes.spawn(async move {
                        let reread = worker.process(batch).await?;
                        reply.decided(reread);
                        Ok(())
                    });
                }
                Some(done) = lanes.join_next() => {
                    if let Err(e) = done.context("a batch task failed").and_then(|r| r) {
                        // The other lanes finish their batches (commit or
                        // roll back) before the worker stops.
                        self.shutting_down.store(true, Ordering::Relaxed);
                        let _ = input.answering(finish_lanes(&mut lanes)).await;
                        return Err(e);
                    }
                }
                _ = &mut shutdown => {
                    // The batches in flight run to their end (commit or roll
                    // back); the shutdown only cuts transient retries short.
                    self.shutting_down.store(true, Ordering::Relaxed);
                    return input.answering(finish_lanes(&mut lanes)).await;
                }
            }
        }
    }

    /// Decides a batch; returns the partitions to read again, and from where.
    async fn process(&self, batch: UsageBatch) -> anyhow::Result<Vec<(i32, i64)>> {
        let started = std::time::Instant::now();
        let queued = started.duration_since(batch.read_at);
        let oldest_ms = batch
            .messages
            .iter()
            .filter_map(|m| m.timestamp().to_millis())
            .min()
            .map(|t| Utc::now().timestamp_millis() - t);
        self.wait_for_control_topics().await;
        let waited = started.elapsed();
        let now = Utc::now();
        let messages: Vec<DecodedMessage> = batch.messages.iter().map(|m| self.decode(m, now)).collect();
        let decoded = started.elapsed();
        let mut reread = Vec::new();
        if self
            .decide_with_retry(&batch.ranges, &messages, None, &mut reread)
            .await?
            == DecideOutcome::Refused
        {
            self.decide_one_by_one(&batch.ranges, &messages, &mut reread).await?;
        }
        self.relay.wake();
        tracing::debug!(
            messages = messages.len(),
            queued_ms = queued.as_secs_f64() * 1e3,
            oldest_ms,
            wait_ms = waited.as_secs_f64() * 1e3,
            decode_ms = (decoded - waited).as_secs_f64() * 1e3,
            decide_ms = (started.elapsed() - decoded).as_secs_f64() * 1e3,
            "batch decided"
        );
        let timestamps = messages.iter().filter_map(|m| m.timestamp);
        self.counts
            .metrics
            .observe_batch(messages.len(), timestamps, Utc::now());
        Ok(reread)
    }

    /// Snapshots and invoice events already on their topics when the batch
    /// was read are applied before it is decided (bounded wait).
    async fn wait_for_control_topics(&self) {
        let deadline = tokio::time::Instant::now() + self.settings.pipeline.snapshot_wait();
        let topics: Vec<(&str, i32)> = self
            .control_topics
            .iter()
            .map(|c| (c.topic.as_str(), c.partitions))
            .collect();
        let highs = match tokio::task::block_in_place(|| {
            control::high_watermarks(&self.control_ends, &topics, self.settings.kafka.confirm_partition_ends)
        }) {
            Ok(highs) => highs,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot read control topic watermarks; deciding with what is applied"
                );
                return;
            }
        };
        for (control, highs) in self.control_topics.iter().zip(highs) {
            if !control.progress.wait_for(&highs, deadline).await {
                let topic = &control.topic;
                tracing::warn!(topic, ?highs, "still being applied after the wait; deciding anyway");
            }
        }
    }

    fn decode(&self, message: &OwnedMessage, now: DateTime<Utc>) -> DecodedMessage {
        let timestamp = message
            .timestamp()
            .to_millis()
            .and_then(DateTime::<Utc>::from_timestamp_millis);
        let request_time = timestamp.unwrap_or(now);
        let p = &self.settings.pipeline;
        let ctx = DecodeContext {
            request_time,
            max_future: p.max_future(),
            max_payload_bytes: p.max_payload_bytes,
        };
        let payload = message.payload().unwrap_or_default();
        let header_list = crate::kafka::headers::of_owned(message);
        let request = decode_usage_message(&header_list, payload, &ctx);
        let (identity, dead_letter) = match &request {
            Ok(_) => (Default::default(), None),
            Err(rejection) => {
                let undecodable = matches!(
                    rejection.code,
                    ReasonCode::MalformedPayload | ReasonCode::PayloadTooLarge
                );
                (
                    identify(payload, p.max_payload_bytes),
                    undecodable.then(|| control::raw_message(message.key(), Some(payload), header_list.clone())),
                )
            }
        };
        DecodedMessage {
            partition: message.partition(),
            offset: message.offset(),
            timestamp,
            key: message.key().map(<[u8]>::to_vec),
            request_time,
            request,
            identity,
            dead_letter,
        }
    }

    /// Decides a batch, retrying transient failures with capped backoff.
    /// Partitions to read again are added to `reread`.
    async fn decide_with_retry(
        &self,
        ranges: &[OffsetRange],
        messages: &[DecodedMessage],
        forced: Option<&Rejection>,
        reread: &mut Vec<(i32, i64)>,
    ) -> anyhow::Result<DecideOutcome> {
        let p = &self.settings.pipeline;
        let mut backoff = Backoff::new(
            Duration::from_millis(p.retry_initial_backoff_ms),
            Duration::from_millis(p.retry_max_backoff_ms),
        );
        loop {
            let started = std::time::Instant::now();
            let e = match decide_batch(&self.pool, &self.ctx, ranges, messages, forced, Utc::now()).await {
                Ok(report) => {
                    self.counts.record(&report, started.elapsed());
                    self.relay.offer(report.outbox);
                    reread.extend(report.reread);
                    return Ok(DecideOutcome::Committed);
                }
                Err(e) => e,
            };
            if store::classify(&e) == FailureKind::Permanent {
                tracing::warn!(
                    error = format!("{e:#}"),
                    messages = messages.len(),
                    "the database refused a message"
                );
                return Ok(DecideOutcome::Refused);
            }
            if self.shutting_down.load(Ordering::Relaxed) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "batch rolled back at shutdown; it is decided after restart"
                );
                return Ok(DecideOutcome::RolledBackAtShutdown);
            }
            backoff.wait_after("deciding the batch failed", &e).await;
        }
    }

    /// After a permanent failure: one message per transaction, and the one
    /// the database refuses is rejected alone.
    async fn decide_one_by_one(
        &self,
        ranges: &[OffsetRange],
        messages: &[DecodedMessage],
        reread: &mut Vec<(i32, i64)>,
    ) -> anyhow::Result<()> {
        let mut position: HashMap<i32, i64> = ranges.iter().map(|r| (r.partition, r.from)).collect();
        for message in messages {
            let Some(from) = position.get(&message.partition).copied() else {
                continue;
            };
            let range = [OffsetRange::new(message.partition, from, message.offset + 1)];
            position.insert(message.partition, message.offset + 1);
            let one = std::slice::from_ref(message);
            if self.decide_with_retry(&range, one, None, reread).await? == DecideOutcome::Refused {
                let rejection = Rejection::new(ReasonCode::Unprocessable, "the database refused this message's data");
                if self.decide_with_retry(&range, one, Some(&rejection), reread).await? == DecideOutcome::Refused {
                    anyhow::bail!(
                        "the database refused even the rejection of {}/{}",
                        message.partition,
                        message.offset
                    );
                }
            }
        }
        Ok(())
    }
}

/// Waits for every batch in flight; the first failure, if any.
async fn finish_lanes(lanes: &mut JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut first = Ok(());
    while let Some(done) = lanes.join_next().await {
        if let Err(e) = done.context("a batch task failed").and_then(|r| r) {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// The usage consumer, and this worker's answers to its rebalances. The
/// answers never wait for the worker's other work: the group waits for
/// them.
pub struct UsageInput {
    pub consumer: UsageConsumer,
    pub ownership: Arc<Ownership>,
}

impl UsageInput {
    /// The next batch, answering rebalances meanwhile; `None` once the
    /// consumer thread has ended.
    async fn next_batch(&mut self) -> Option<(UsageBatch, BatchReply)> {
        loop {
            let event = self.consumer.next_event().await?;
            if let Some(batch) = self.ownership.answer(event) {
                return Some(batch);
            }
        }
    }

    /// Runs `work` to its end, answering rebalances meanwhile; batches
    /// that come are not decided (the worker is stopping).
    pub async fn answering<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                Some(event) = self.consumer.next_event() => {
                    let _ = self.ownership.answer(event);
                }
            }
        }
    }

    /// Leaves the group, answering the revocation, until the consumer
    /// thread has ended.
    pub async fn leave(&mut self) {
        self.consumer.leave();
        while let Some(event) = self.consumer.next_event().await {
            let _ = self.ownership.answer(event);
        }
    }
}

/// What this worker does when usage partitions come and go: resume from
/// PostgreSQL's offsets, and hand the output partitions to the relay (or
/// take them back).
pub struct Ownership {
    pub pool: PgPool,
    pub group: String,
    pub topic: String,
    pub reset: crate::config::OffsetReset,
    pub metadata: BaseConsumer,
    pub relay: Arc<Relay>,
    /// Tells `/readyz` whether an assignment is held.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Ownership {
    /// Answers a rebalance event apart from the caller's task; a batch is
    /// handed back.
    fn answer(self: &Arc<Self>, event: ConsumerEvent) -> Option<(UsageBatch, BatchReply)> {
        match event {
            ConsumerEvent::Batch { batch, reply } => return Some((batch, reply)),
            ConsumerEvent::Assigned { partitions, resume_at } => {
                let ownership = self.clone();
                tokio::spawn(async move {
                    let _ = resume_at.send(ownership.assigned(&partitions).await);
                });
            }
            ConsumerEvent::Revoked { partitions, stopped } => {
                let ownership = self.clone();
                // Waits for the relay's round in flight: a blocking wait.
                tokio::task::spawn_blocking(move || {
                    ownership.revoked(&partitions);
                    let _ = stopped.send(());
                });
            }
        }
        None
    }

    /// Where each partition resumes: the next offset to decide.
    async fn assigned(&self, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        let stored = store::stored_offsets(&self.pool, &self.group, &self.topic, partitions).await?;
        let mut initial = HashMap::new();
        for p in partitions.iter().filter(|p| !stored.contains_key(p)) {
            let (low, high) = tokio::task::block_in_place(|| {
                self.metadata
                    .fetch_watermarks(&self.topic, *p, Duration::from_secs(10))
                    .with_context(|| format!("reading watermarks of {}/{p}", self.topic))
            })?;
            initial.insert(*p, kafka::initial_offset(self.reset, low, high));
        }
        let mut offsets = stored;
        if !initial.is_empty() {
            offsets.extend(store::load_offsets(&self.pool, &self.group, &self.topic, &initial).await?);
        }
        self.relay.assign(partitions);
        self.metrics.set_assignment(Some(partitions));
        Ok(offsets)
    }

    fn revoked(&self, partitions: &[i32]) {
        self.relay.revoke(partitions);
        self.metrics.set_assignment(None);
    }
}
