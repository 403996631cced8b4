//! The services of a worker process, and `run`, which wires them: the
//! worker (usage events -> decide -> commit: [`worker`]), the outbox relay
//! that publishes what was committed ([`relay`]), the readers of the control
//! topics ([`control`]), the sweep that closes periods ([`periods`]), and
//! the gauges' sampler ([`sampler`]).

pub mod control;
pub mod dead_letter;
pub mod decide;
pub mod periods;
pub mod relay;
pub mod sampler;
pub mod stage;
mod worker;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::BaseConsumer;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle as TaskHandle;

use crate::config::Settings;
use crate::kafka::{self, consumer};
use control::{AppliedTopic, ControlKind, ControlReader, Progress};
use decide::DecideContext;
use periods::{PeriodOutput, PeriodSweep};
use relay::Relay;
pub use worker::DecisionCounts;
use worker::{Ownership, UsageInput, Worker};

/// Largest dead-letter record, as librdkafka counts it: the producer's
/// `message.max.bytes`.
pub const MAX_DEAD_LETTER_BYTES: usize = crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;

/// Runs the worker until `shutdown` resolves, then stops consuming, finishes
/// the batch in flight, publishes what was committed and returns.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    counts: Arc<DecisionCounts>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let topics = check_topics(&settings).await?;
    let relay = RelayService::start(&settings, &pool, &counts.metrics)?;
    let sweep = SweepService::start(&settings, &pool, &topics, &relay.relay, &counts);
    let stop_threads = Arc::new(AtomicBool::new(false));
    let controls = start_control_readers(&settings, &pool, &topics, &counts, &stop_threads).await?;
    let worker = Arc::new(Worker {
        pool,
        ctx: decide_context(&settings),
        settings: settings.clone(),
        counts,
        control_topics: controls.applied,
        control_ends: kafka::ends::EndReader::new(&kafka::reader_config(&settings.kafka, "metadata"))?,
        relay: relay.relay.clone(),
        shutting_down: AtomicBool::new(false),
    });
    let mut input = start_usage_input(&settings, &worker.pool, &relay.relay, &worker.counts)?;
    let decided = tokio::select! {
        decided = worker.decide_until(&mut input, shutdown) => decided,
        // The producer cannot deliver anything more: the worker exits
        // (non-zero), loudly, for the orchestrator to restart it. The
        // batches in flight are cut short (their transactions roll back);
        // everything committed stays in the outbox for the next run.
        fatal = relay.relay.fatal() => {
            tracing::error!(error = fatal, "the producer failed fatally; exiting so that the worker is restarted");
            Err(anyhow::anyhow!("{fatal}; the worker must be restarted"))
        }
    };
    if let Err(e) = decided {
        // The relay and the control readers stop (what was committed stays
        // in the outbox); the consumer leaves the group, and its revocation
        // is still answered, after the worker has returned.
        stop_threads.store(true, Ordering::Relaxed);
        let _ = sweep.stop.send(true);
        let _ = relay.stop.send(true);
        tokio::spawn(async move { input.leave().await });
        return Err(e);
    }
    let deadline = tokio::time::Instant::now() + settings.pipeline.shutdown_timeout();
    // The sweep stops first: what its last round committed goes out with
    // the rest.
    sweep.finish(deadline).await;
    shut_down(input, relay, controls.threads, &stop_threads, deadline).await
}

/// After the last batch: publishes what was committed (until `deadline`),
/// then leaves the group and stops the threads and the relay.
async fn shut_down(
    mut input: UsageInput,
    relay: RelayService,
    control_threads: Vec<JoinHandle<()>>,
    stop_threads: &AtomicBool,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    tracing::info!("shutting down: publishing what was committed");
    let drained = input.answering(relay.relay.drain(deadline)).await;
    stop_threads.store(true, Ordering::Relaxed);
    let _ = relay.stop.send(true);
    let consumer_thread = input.consumer.thread();
    let left = async {
        input.leave().await;
        let threads = consumer_thread.into_iter().chain(control_threads);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = joined.await;
    };
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(5), left).await;
    let _ = relay.task.await;
    drained.context("publishing committed outcomes at shutdown")?;
    tracing::info!("stopped");
    Ok(())
}

/// The partition count of the outputs (created as needed, as many as
/// `usage-events` has) and of each control topic.
struct Topics {
    output_partitions: i32,
    controls: Vec<(String, ControlKind, i32)>,
}

async fn check_topics(settings: &Settings) -> anyhow::Result<Topics> {
    let t = &settings.topics;
    let metadata_config = kafka::reader_config(&settings.kafka, "metadata");
    let output_partitions = kafka::topics::ensure_outputs(&metadata_config, &t.usage_events, &t.outputs()).await?;
    let metadata: BaseConsumer = metadata_config.create()?;
    let mut controls = Vec::new();
    for (topic, kind) in [
        (&t.subscriptions, ControlKind::Subscriptions),
        (&t.invoice_events, ControlKind::Invoices),
    ] {
        let count = tokio::task::block_in_place(|| kafka::topics::partition_count(&metadata, topic))?
            .with_context(|| format!("input topic {topic} does not exist"))?;
        controls.push((topic.clone(), kind, count));
    }
    tracing::info!(partitions = output_partitions, ?controls, "topics checked");
    Ok(Topics {
        output_partitions,
        controls,
    })
}

/// The outbox relay and its publishing task.
struct RelayService {
    relay: Arc<Relay>,
    stop: watch::Sender<bool>,
    task: TaskHandle<()>,
}

impl RelayService {
    fn start(settings: &Settings, pool: &PgPool, metrics: &Arc<crate::metrics::Metrics>) -> anyhow::Result<Self> {
        let (k, p) = (&settings.kafka, &settings.pipeline);
        let retry_max = Duration::from_millis(p.retry_max_backoff_ms);
        let relay = Arc::new(Relay::new(
            pool.clone(),
            &kafka::producer_config(k),
            kafka::reader_config(k, "relay"),
            settings.topics.outputs().iter().map(|t| t.to_string()).collect(),
            retry_max,
            metrics.clone(),
        )?);
        let (stop, stopped) = watch::channel(false);
        let task = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.run(retry_max, stopped).await })
        };
        // The purge runs beside the relay, on a task of its own: a long
        // purge never holds back publishing.
        tokio::spawn(purge_expired(pool.clone(), p.outcome_retention_days, stop.subscribe()));
        Ok(Self { relay, stop, task })
    }
}

/// Rows a purge statement deletes at most, and the pause between two.
const PURGE_CHUNK_ROWS: i64 = 10_000;
const PURGE_PAUSE: Duration = Duration::from_millis(100);
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Deletes published outcome records older than the retention time, every
/// hour, in bounded chunks, until `stop` is set.
async fn purge_expired(pool: PgPool, retention_days: u32, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PURGE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let purge = crate::store::delete_expired(&pool, retention_days, PURGE_CHUNK_ROWS, PURGE_PAUSE);
        tokio::select! {
            purged = purge => match purged {
                Ok((records, _)) if records > 0 => tracing::info!(deleted = records, "deleted expired outcome records"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = format!("{e:#}"), "deleting expired outcome records failed"),
            },
            // A chunk in flight is rolled back; the next purge goes on.
            _ = stop.changed() => return,
        }
    }
}

/// Where period records go.
fn period_output(settings: &Settings, partitions: i32) -> PeriodOutput {
    PeriodOutput {
        topic: settings.topics.usage_periods.clone(),
        partitions,
        partitioner: settings.kafka.partitioner,
        grace: settings.pipeline.period_grace(),
    }
}

/// The period sweep's task.
struct SweepService {
    stop: watch::Sender<bool>,
    task: TaskHandle<()>,
}

impl SweepService {
    fn start(settings: &Settings, pool: &PgPool, topics: &Topics, relay: &Arc<Relay>, counts: &DecisionCounts) -> Self {
        let sweep = PeriodSweep {
            pool: pool.clone(),
            closing: period_output(settings, topics.output_partitions).closing(),
            interval: settings.pipeline.period_sweep(),
            retry_max: Duration::from_millis(settings.pipeline.retry_max_backoff_ms),
            metrics: counts.metrics.clone(),
            relay: relay.clone(),
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(sweep.run(stopped));
        Self { stop, task }
    }

    /// Stops the sweep and waits for a round in flight (until `deadline`).
    async fn finish(self, deadline: tokio::time::Instant) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            // Dropping its transaction rolls the round back; a later sweep
            // closes those periods.
            task.abort();
            tracing::warn!("the period sweep did not stop in time; its round was rolled back");
        }
    }
}

/// The control topics' reader threads, and how far each topic is applied.
struct ControlReaders {
    threads: Vec<JoinHandle<()>>,
    applied: Vec<AppliedTopic>,
}

async fn start_control_readers(
    settings: &Settings,
    pool: &PgPool,
    topics: &Topics,
    counts: &DecisionCounts,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<ControlReaders> {
    let k = &settings.kafka;
    let mut readers = ControlReaders {
        threads: Vec::new(),
        applied: Vec::new(),
    };
    for (topic, kind, count) in &topics.controls {
        let topic_progress = Arc::new(Progress::default());
        let reader = ControlReader {
            pool: pool.clone(),
            group: k.group_id.clone(),
            topic: topic.clone(),
            kind: *kind,
            partitions: *count,
            retry_max: Duration::from_millis(settings.pipeline.retry_max_backoff_ms),
            dead_letter_topic: settings.topics.dead_letters.clone(),
            dead_letter_partitions: topics.output_partitions,
            max_dead_letter_bytes: MAX_DEAD_LETTER_BYTES,
            metrics: counts.metrics.clone(),
            periods: period_output(settings, topics.output_partitions),
        };
        let config = kafka::control_reader_config(k, topic);
        readers
            .threads
            .push(reader.spawn(&config, topic_progress.clone(), stop.clone()).await?);
        readers.applied.push(AppliedTopic {
            topic: topic.clone(),
            partitions: *count,
            progress: topic_progress,
        });
    }
    Ok(readers)
}

/// The usage consumer, and the answers to its rebalances.
fn start_usage_input(
    settings: &Settings,
    pool: &PgPool,
    relay: &Arc<Relay>,
    counts: &DecisionCounts,
) -> anyhow::Result<UsageInput> {
    let (k, p) = (&settings.kafka, &settings.pipeline);
    let ownership = Arc::new(Ownership {
        pool: pool.clone(),
        group: k.group_id.clone(),
        topic: settings.topics.usage_events.clone(),
        reset: k.auto_offset_reset,
        metadata: kafka::reader_config(k, "metadata").create()?,
        relay: relay.clone(),
        metrics: counts.metrics.clone(),
    });
    let consumer = consumer::spawn(
        &kafka::usage_consumer_config(k),
        consumer::ConsumerSettings {
            topic: settings.topics.usage_events.clone(),
            batch_size: p.batch_size,
            max_batch_bytes: p.max_batch_bytes,
            linger: p.linger(),
            lanes: p.lanes,
            metrics: counts.metrics.clone(),
        },
    )?;
    Ok(UsageInput { consumer, ownership })
}

fn decide_context(settings: &Settings) -> DecideContext {
    let t = &settings.topics;
    DecideContext {
        group: settings.kafka.group_id.clone(),
        input_topic: t.usage_events.clone(),
        results_topic: t.usage_results.clone(),
        alerts_topic: t.usage_alerts.clone(),
        dead_letter_topic: t.dead_letters.clone(),
        grace: settings.pipeline.period_grace(),
        max_record_bytes: crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES,
    }
}
