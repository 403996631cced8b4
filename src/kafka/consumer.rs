//! The consumer of `usage-events`: a thread that polls, forms batches and
//! hands them to the pipeline. On assignment it asks its `Assignments` hook
//! where each partition resumes (PostgreSQL knows); on revocation it lets the
//! hook stop publishing for those partitions before the partitions move.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::bindings::rd_kafka_resp_err_t as RespErr;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

/// What the pipeline does when partitions come and go. Called on the
/// consumer thread, inside the rebalance: blocking here delays the rebalance,
/// which is the point (publishing stops before another worker starts).
pub trait Assignments: Send + Sync + 'static {
    /// Where each partition resumes: the next offset to decide.
    fn assigned(&self, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>>;
    fn revoked(&self, partitions: &[i32]);
}

/// Messages of one poll window, in offset order per partition.
pub struct UsageBatch {
    pub messages: Vec<OwnedMessage>,
    /// Per partition: the consumer's position before the first message of
    /// this batch and after the last.
    pub ranges: Vec<(i32, i64, i64)>,
    pub read_at: Instant,
}

/// Requests from the pipeline to the consumer thread.
#[derive(Debug)]
pub enum Command {
    /// Read the partition again from this offset (the stored offset is
    /// behind what the consumer read, so something was not decided).
    Seek { partition: i32, offset: i64 },
    /// The pipeline is ready for its next batch. Until it asks, the thread
    /// keeps gathering (up to the batch size), so a busy pipeline gets one
    /// fresh, full batch rather than a queue of small ones that aged while
    /// they waited.
    NextBatch,
}

struct Ctx {
    topic: String,
    hooks: Arc<dyn Assignments>,
    positions: Arc<Mutex<Positions>>,
}

/// Next offset per owned partition (the thread advances it as it reads), and
/// a generation that every rebalance bumps, so that the thread drops what it
/// gathered under the previous assignment.
#[derive(Default)]
struct Positions {
    next: HashMap<i32, i64>,
    generation: u64,
}

impl Positions {
    fn reset(&mut self) {
        self.next.clear();
        self.generation += 1;
    }
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        match err {
            RespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let offsets = loop {
                    match self.hooks.assigned(&partitions) {
                        Ok(offsets) => break offsets,
                        Err(e) => {
                            // Without the stored offsets nothing can be read
                            // safely: keep trying (the group waits for us).
                            tracing::warn!(error = format!("{e:#}"), "loading stored offsets failed; retrying");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                };
                let mut assignment = TopicPartitionList::new();
                let mut positions = self.positions.lock().expect("positions lock");
                positions.reset();
                for p in &partitions {
                    let next = offsets[p];
                    assignment
                        .add_partition_offset(&self.topic, *p, Offset::Offset(next))
                        .expect("valid offset");
                    positions.next.insert(*p, next);
                }
                tracing::info!(?partitions, ?offsets, "partitions assigned");
                if let Err(e) = consumer.assign(&assignment) {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
            }
            RespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                self.positions.lock().expect("positions lock").reset();
                self.hooks.revoked(&partitions);
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                self.positions.lock().expect("positions lock").reset();
                let _ = consumer.unassign();
            }
        }
    }
}

pub struct ConsumerSettings {
    pub topic: String,
    pub batch_size: usize,
    pub linger: Duration,
}

/// Starts the consumer thread. It stops when `stop` is set, after leaving
/// the group (which revokes its partitions through the hook).
pub fn spawn(
    config: &ClientConfig,
    settings: ConsumerSettings,
    hooks: Arc<dyn Assignments>,
    batches: mpsc::Sender<UsageBatch>,
    commands: std::sync::mpsc::Receiver<Command>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let positions = Arc::new(Mutex::new(Positions::default()));
    let ctx = Ctx {
        topic: settings.topic.clone(),
        hooks,
        positions: positions.clone(),
    };
    let consumer: BaseConsumer<Ctx> = config
        .create_with_context(ctx)
        .context("creating the usage-events consumer")?;
    consumer
        .subscribe(&[&settings.topic])
        .with_context(|| format!("subscribing to {}", settings.topic))?;
    let handle = std::thread::Builder::new()
        .name("usage-consumer".into())
        .spawn(move || run(consumer, settings, positions, batches, commands, stop))
        .context("starting the consumer thread")?;
    Ok(handle)
}

fn run(
    consumer: BaseConsumer<Ctx>,
    settings: ConsumerSettings,
    positions: Arc<Mutex<Positions>>,
    batches: mpsc::Sender<UsageBatch>,
    commands: std::sync::mpsc::Receiver<Command>,
    stop: Arc<AtomicBool>,
) {
    let mut pending: Vec<OwnedMessage> = Vec::with_capacity(settings.batch_size);
    let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut first_at: Option<Instant> = None;
    let mut generation = 0;
    let mut wanted = false;
    let command =
        |command: Command, pending: &mut Vec<OwnedMessage>, ranges: &mut HashMap<i32, (i64, i64)>| match command {
            Command::Seek { partition, offset } => {
                seek(&consumer, &settings.topic, &positions, partition, offset);
                pending.retain(|m| m.partition() != partition);
                ranges.remove(&partition);
                false
            }
            Command::NextBatch => true,
        };
    while !stop.load(Ordering::Relaxed) {
        while let Ok(c) = commands.try_recv() {
            wanted |= command(c, &mut pending, &mut ranges);
        }
        if pending.len() >= settings.batch_size && !wanted {
            // Back-pressure: the batch is full and the pipeline is busy.
            match commands.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => wanted |= command(c, &mut pending, &mut ranges),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            continue;
        }
        let lingered = first_at.is_some_and(|t| t.elapsed() >= settings.linger);
        let wait = match first_at {
            // Ready but the pipeline is busy: look for its request often.
            Some(_) if lingered => Duration::from_millis(if wanted { 0 } else { 2 }),
            Some(t) => settings.linger.saturating_sub(t.elapsed()),
            None => Duration::from_millis(100),
        };
        let polled = if lingered && wanted { None } else { consumer.poll(wait) };
        {
            let current = positions.lock().expect("positions lock").generation;
            if current != generation {
                generation = current;
                pending.clear();
                ranges.clear();
                first_at = None;
            }
        }
        match polled {
            Some(Ok(message)) => {
                let partition = message.partition();
                let offset = message.offset();
                let mut positions = positions.lock().expect("positions lock");
                // Messages of partitions no longer ours (a revocation raced
                // the fetch) are dropped: their new owner reads them.
                if let Some(next) = positions.next.get_mut(&partition) {
                    if offset >= *next {
                        let range = ranges.entry(partition).or_insert((*next, *next));
                        *next = offset + 1;
                        range.1 = offset + 1;
                        pending.push(message.detach());
                        first_at.get_or_insert_with(Instant::now);
                    }
                }
            }
            Some(Err(e)) => on_error(&consumer, &settings.topic, &positions, e),
            None => {}
        }
        let full = pending.len() >= settings.batch_size;
        let lingered = first_at.is_some_and(|t| t.elapsed() >= settings.linger);
        if wanted && !pending.is_empty() && (full || lingered) {
            let batch = UsageBatch {
                messages: std::mem::take(&mut pending),
                ranges: ranges.drain().map(|(p, (a, b))| (p, a, b)).collect(),
                read_at: first_at.take().unwrap_or_else(Instant::now),
            };
            wanted = false;
            if batches.blocking_send(batch).is_err() {
                break;
            }
        }
    }
    tracing::info!("usage consumer leaving the group");
    consumer.unsubscribe();
    // Let the revocation run its hooks before the consumer is dropped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
        consumer.poll(Duration::from_millis(50));
    }
}

fn seek(consumer: &BaseConsumer<Ctx>, topic: &str, positions: &Mutex<Positions>, partition: i32, offset: i64) {
    let mut positions = positions.lock().expect("positions lock");
    if !positions.next.contains_key(&partition) {
        return;
    }
    tracing::warn!(partition, offset, "re-reading partition from its stored offset");
    match consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
        Ok(()) => {
            positions.next.insert(partition, offset);
        }
        Err(e) => tracing::error!(partition, offset, error = %e, "seek failed"),
    }
}

/// A consumer error. When a position is no longer on the topic (retention
/// removed events nobody decided), the partition stops, loudly: skipping
/// would lose billing data.
fn on_error(consumer: &BaseConsumer<Ctx>, topic: &str, positions: &Mutex<Positions>, error: KafkaError) {
    let out_of_range = matches!(
        error,
        KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange)
            | KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset)
    );
    if !out_of_range {
        tracing::warn!(error = %error, "consumer error");
        return;
    }
    let mut positions = positions.lock().expect("positions lock");
    let mut stopped = TopicPartitionList::new();
    for (partition, next) in positions.next.iter() {
        match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5)) {
            Ok((low, high)) if *next < low || *next > high => {
                let gap = if *next < low {
                    format!("events {next}..{low} were removed before they were decided")
                } else {
                    format!("it is beyond the end of the partition ({high}): the topic was truncated or recreated")
                };
                tracing::error!(
                    topic,
                    partition,
                    stored_offset = *next,
                    log_start_offset = low,
                    high_watermark = high,
                    "STOPPED PARTITION {topic}/{partition}: the stored offset {next} is no longer on the topic; {gap}. \
                     Nothing was skipped; an operator must decide how to proceed",
                );
                stopped.add_partition(topic, *partition);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(partition, error = %e, "reading watermarks failed"),
        }
    }
    for e in stopped.elements() {
        positions.next.remove(&e.partition());
    }
    if stopped.count() > 0 {
        let _ = consumer.pause(&stopped);
    }
}
