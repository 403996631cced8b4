//! The worker: consume -> decide -> store -> publish. Wires the Kafka
//! adapters to the store around the pure decision, and owns the retry and
//! shutdown behaviour.

pub mod control;
pub mod decide;
pub mod relay;
pub mod sampler;

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
use tokio::runtime::Handle;

use crate::config::Settings;
use crate::domain::cloudevents::decode_usage_message;
use crate::domain::event::{identify, DecodeContext};
use crate::domain::{ReasonCode, Rejection};
use crate::kafka::{self, consumer};
use crate::retry::Backoff;
use crate::store::{self, FailureKind};
use control::{ControlKind, ControlReader, Progress};
use decide::{decide_batch, BatchReport, DecideContext, DecodedMessage};
use relay::Relay;

/// Largest dead-letter record, as librdkafka counts it: the producer's
/// `message.max.bytes`.
pub const MAX_DEAD_LETTER_BYTES: usize = crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;

/// Counts of what the worker decided, for logs, the demo and the tests.
#[derive(Default)]
pub struct Stats {
    by_outcome: Mutex<BTreeMap<(String, Option<String>), u64>>,
    pub decided: AtomicU64,
    pub batches: AtomicU64,
    /// Prometheus metrics, shared with the HTTP API's `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Stats {
    fn record(&self, report: &BatchReport, elapsed: Duration) {
        self.metrics
            .record_decisions(crate::metrics::DecisionSource::Kafka, &report.decided);
        self.metrics
            .observe_transaction(crate::metrics::TransactionKind::Batch, elapsed);
        let mut by = self.by_outcome.lock().expect("stats lock");
        for (status, code) in &report.decided {
            *by.entry((status.as_str().to_owned(), code.map(|c| c.as_str().to_owned())))
                .or_default() += 1;
        }
        self.decided.fetch_add(report.decided.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// (status, reason code) -> count.
    pub fn snapshot(&self) -> BTreeMap<(String, Option<String>), u64> {
        self.by_outcome.lock().expect("stats lock").clone()
    }
}

/// Runs the worker until `shutdown` resolves, then stops consuming, finishes
/// the batch in flight, publishes what was committed and returns.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let k = &settings.kafka;
    let t = &settings.topics;
    let p = &settings.pipeline;
    let metadata_config = kafka::reader_config(k, "metadata");
    let partitions = kafka::topics::ensure_outputs(&metadata_config, &t.usage_events, &t.outputs()).await?;
    let metadata: BaseConsumer = metadata_config.create()?;
    let control_partitions = |topic: &str| {
        tokio::task::block_in_place(|| kafka::topics::partition_count(&metadata, topic))?
            .with_context(|| format!("input topic {topic} does not exist"))
    };
    let controls = [
        (
            t.subscriptions.clone(),
            ControlKind::Subscriptions,
            control_partitions(&t.subscriptions)?,
        ),
        (
            t.invoice_events.clone(),
            ControlKind::Invoices,
            control_partitions(&t.invoice_events)?,
        ),
    ];
    tracing::info!(partitions, ?controls, "topics checked");

    let relay = Arc::new(Relay::new(
        pool.clone(),
        &kafka::producer_config(k),
        kafka::reader_config(k, "relay"),
        t.outputs().iter().map(|t| t.to_string()).collect(),
        Duration::from_millis(p.retry_max_backoff_ms),
    )?);
    let (relay_stop_tx, relay_stop_rx) = tokio::sync::watch::channel(false);
    let relay_task = {
        let relay = relay.clone();
        let retry_max = Duration::from_millis(p.retry_max_backoff_ms);
        let retention = p.outcome_retention_days;
        tokio::spawn(async move { relay.run(retry_max, retention, relay_stop_rx).await })
    };

    let stop_threads = Arc::new(AtomicBool::new(false));
    let mut control_threads = Vec::new();
    let mut progress = Vec::new();
    for (topic, kind, count) in &controls {
        let topic_progress = Arc::new(Progress::default());
        let reader = ControlReader {
            pool: pool.clone(),
            group: k.group_id.clone(),
            topic: topic.clone(),
            kind: *kind,
            partitions: *count,
            retry_max: Duration::from_millis(p.retry_max_backoff_ms),
            dead_letter_topic: t.dead_letters.clone(),
            dead_letter_partitions: partitions,
            max_dead_letter_bytes: MAX_DEAD_LETTER_BYTES,
            metrics: stats.metrics.clone(),
        };
        let config = kafka::control_reader_config(k, topic);
        control_threads.push(
            reader
                .spawn(&config, topic_progress.clone(), stop_threads.clone())
                .await?,
        );
        progress.push((topic.clone(), *count, topic_progress));
    }

    let hooks = Arc::new(PartitionHooks {
        pool: pool.clone(),
        runtime: Handle::current(),
        group: k.group_id.clone(),
        topic: t.usage_events.clone(),
        reset: k.auto_offset_reset,
        metadata: kafka::reader_config(k, "metadata").create()?,
        relay: relay.clone(),
        metrics: stats.metrics.clone(),
    });
    let (batch_tx, mut batch_rx) = tokio::sync::mpsc::channel(p.lanes);
    let (command_tx, command_rx) = std::sync::mpsc::channel();
    let consumer_thread = consumer::spawn(
        &kafka::usage_consumer_config(k),
        consumer::ConsumerSettings {
            topic: t.usage_events.clone(),
            batch_size: p.batch_size,
            max_batch_bytes: p.max_batch_bytes,
            linger: p.linger(),
            lanes: p.lanes,
        },
        hooks,
        batch_tx,
        command_rx,
        stop_threads.clone(),
    )?;

    let worker = Arc::new(Worker {
        pool,
        ctx: DecideContext {
            group: k.group_id.clone(),
            input_topic: t.usage_events.clone(),
            results_topic: t.usage_results.clone(),
            alerts_topic: t.usage_alerts.clone(),
            dead_letter_topic: t.dead_letters.clone(),
            grace: p.period_grace(),
            max_dead_letter_bytes: MAX_DEAD_LETTER_BYTES,
        },
        settings: settings.clone(),
        stats,
        progress,
        control_ends: kafka::ends::EndReader::new(&metadata_config)?,
        relay: relay.clone(),
        commands: command_tx,
        shutting_down: AtomicBool::new(false),
    });

    // Up to `lanes` batches at once, on disjoint partitions (the consumer
    // never puts a partition in flight into another batch).
    let mut lanes = tokio::task::JoinSet::new();
    let mut requested = 0;
    tokio::pin!(shutdown);
    loop {
        while lanes.len() + requested < p.lanes {
            // Fails only when the consumer thread is gone; `recv` says so below.
            let _ = worker.commands.send(consumer::Command::NextBatch);
            requested += 1;
        }
        tokio::select! {
            batch = batch_rx.recv() => {
                let Some(batch) = batch else {
                    anyhow::bail!("the usage consumer stopped");
                };
                requested -= 1;
                let worker = worker.clone();
                lanes.spawn(async move {
                    let partitions = batch.partitions();
                    worker.process(batch).await.map(|()| partitions)
                });
            }
            Some(done) = lanes.join_next() => {
                match done.context("a batch task failed").and_then(|r| r) {
                    Ok(partitions) => {
                        let _ = worker.commands.send(consumer::Command::Done { partitions });
                    }
                    Err(e) => {
                        // The other lanes finish their batches (commit or
                        // roll back) before the worker stops.
                        worker.shutting_down.store(true, Ordering::Relaxed);
                        let _ = finish_lanes(&mut lanes).await;
                        return Err(e);
                    }
                }
            }
            _ = &mut shutdown => {
                // The batches in flight run to their end (commit or roll
                // back); the shutdown only cuts transient retries short.
                worker.shutting_down.store(true, Ordering::Relaxed);
                finish_lanes(&mut lanes).await?;
                break;
            }
        }
    }

    tracing::info!("shutting down: publishing what was committed");
    let deadline = tokio::time::Instant::now() + settings.pipeline.shutdown_timeout();
    let drained = relay.drain(deadline).await;
    stop_threads.store(true, Ordering::Relaxed);
    drop(batch_rx);
    let _ = relay_stop_tx.send(true);
    let joined = tokio::task::spawn_blocking(move || {
        let _ = consumer_thread.join();
        for thread in control_threads {
            let _ = thread.join();
        }
    });
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(5), joined).await;
    let _ = relay_task.await;
    drained.context("publishing committed outcomes at shutdown")?;
    tracing::info!("stopped");
    Ok(())
}

/// Waits for every batch in flight; the first failure, if any.
async fn finish_lanes(lanes: &mut tokio::task::JoinSet<anyhow::Result<Vec<i32>>>) -> anyhow::Result<()> {
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

struct Worker {
    pool: PgPool,
    ctx: DecideContext,
    settings: Settings,
    stats: Arc<Stats>,
    /// (topic, partitions, progress) of each control topic.
    progress: Vec<(String, i32, Arc<Progress>)>,
    /// Reads where the control topics end before a batch is decided.
    control_ends: kafka::ends::EndReader,
    relay: Arc<Relay>,
    commands: std::sync::mpsc::Sender<consumer::Command>,
    shutting_down: AtomicBool,
}

impl Worker {
    async fn process(&self, batch: consumer::UsageBatch) -> anyhow::Result<()> {
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
        match self.decide_with_retry(&batch.ranges, &messages, None).await? {
            Some(()) => {}
            None => self.decide_one_by_one(&batch.ranges, &messages).await?,
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
        self.stats.metrics.observe_batch(messages.len(), timestamps, Utc::now());
        Ok(())
    }

    /// Snapshots and invoice events already on their topics when the batch
    /// was read are applied before it is decided (bounded wait).
    async fn wait_for_control_topics(&self) {
        let deadline = tokio::time::Instant::now() + self.settings.pipeline.snapshot_wait();
        let topics: Vec<(&str, i32)> = self.progress.iter().map(|(t, n, _)| (t.as_str(), *n)).collect();
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
        for ((topic, _, progress), highs) in self.progress.iter().zip(highs) {
            if !progress.wait_for(&highs, deadline).await {
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
        let headers: Vec<(&str, &[u8])> = header_list.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        let request = decode_usage_message(&headers, payload, &ctx);
        let (identity, dead_letter) = match &request {
            Ok(_) => ((None, None), None),
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
    /// `Ok(None)` means the database refused the data (a permanent failure):
    /// the caller splits the batch.
    async fn decide_with_retry(
        &self,
        ranges: &[(i32, i64, i64)],
        messages: &[DecodedMessage],
        forced: Option<&Rejection>,
    ) -> anyhow::Result<Option<()>> {
        let p = &self.settings.pipeline;
        let mut backoff = Backoff::new(
            Duration::from_millis(p.retry_initial_backoff_ms),
            Duration::from_millis(p.retry_max_backoff_ms),
        );
        loop {
            let started = std::time::Instant::now();
            match decide_batch(&self.pool, &self.ctx, ranges, messages, forced, Utc::now()).await {
                Ok(report) => {
                    self.stats.record(&report, started.elapsed());
                    self.relay.offer(report.outbox);
                    for (partition, offset) in &report.reread {
                        let _ = self.commands.send(consumer::Command::Seek {
                            partition: *partition,
                            offset: *offset,
                        });
                    }
                    return Ok(Some(()));
                }
                Err(e) => match store::classify(&e) {
                    FailureKind::Permanent => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            messages = messages.len(),
                            "the database refused a message"
                        );
                        return Ok(None);
                    }
                    FailureKind::Transient => {
                        if self.shutting_down.load(Ordering::Relaxed) {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                "batch rolled back at shutdown; it is decided after restart"
                            );
                            return Ok(Some(()));
                        }
                        let wait = backoff.next_delay();
                        tracing::warn!(
                            error = format!("{e:#}"),
                            backoff_ms = wait.as_millis() as u64,
                            "deciding the batch failed; retrying"
                        );
                        tokio::time::sleep(wait).await;
                    }
                },
            }
        }
    }

    /// After a permanent failure: one message per transaction, and the one
    /// the database refuses is rejected alone.
    async fn decide_one_by_one(&self, ranges: &[(i32, i64, i64)], messages: &[DecodedMessage]) -> anyhow::Result<()> {
        let mut position: HashMap<i32, i64> = ranges.iter().map(|r| (r.0, r.1)).collect();
        for message in messages {
            let Some(from) = position.get(&message.partition).copied() else {
                continue;
            };
            let range = [(message.partition, from, message.offset + 1)];
            position.insert(message.partition, message.offset + 1);
            let one = std::slice::from_ref(message);
            if self.decide_with_retry(&range, one, None).await?.is_none() {
                let rejection = Rejection::new(ReasonCode::Unprocessable, "the database refused this message's data");
                if self.decide_with_retry(&range, one, Some(&rejection)).await?.is_none() {
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

/// Assignment hooks: resume from PostgreSQL's offsets, and hand the output
/// partitions to the relay (or take them back).
struct PartitionHooks {
    pool: PgPool,
    runtime: Handle,
    group: String,
    topic: String,
    reset: crate::config::OffsetReset,
    metadata: BaseConsumer,
    relay: Arc<Relay>,
    /// Tells `/readyz` whether an assignment is held.
    metrics: Arc<crate::metrics::Metrics>,
}

impl consumer::Assignments for PartitionHooks {
    fn assigned(&self, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        let stored = self
            .runtime
            .block_on(store::stored_offsets(&self.pool, &self.group, &self.topic, partitions))?;
        let mut initial = HashMap::new();
        for p in partitions.iter().filter(|p| !stored.contains_key(p)) {
            let (low, high) = self
                .metadata
                .fetch_watermarks(&self.topic, *p, Duration::from_secs(10))
                .with_context(|| format!("reading watermarks of {}/{p}", self.topic))?;
            initial.insert(*p, kafka::initial_offset(self.reset, low, high));
        }
        let mut offsets = stored;
        if !initial.is_empty() {
            offsets.extend(self.runtime.block_on(store::load_offsets(
                &self.pool,
                &self.group,
                &self.topic,
                &initial,
            ))?);
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
