//! The consumer of `usage-events`: a thread that polls, forms batches and
//! hands them to the pipeline, and the one protocol between the two. The
//! thread sends [`ConsumerEvent`]s, and each event carries the way to answer
//! it:
//!
//! - `Assigned`: the pipeline answers where each partition resumes
//!   (PostgreSQL knows); the thread seeks there.
//! - `Revoked`: the pipeline answers once it has stopped publishing the
//!   partitions; only then do they move to another worker.
//! - `Batch`: the pipeline answers once the batch is decided, with the
//!   partitions to read again; until then the batch's partitions go into no
//!   other batch, and its lane stays taken.
//!
//! The thread sends a batch only for a free lane (of `lanes`), and keeps
//! gathering (up to the batch size) until one is free, so that a busy
//! pipeline gets one fresh, full batch rather than a queue of small ones
//! that aged while they waited. Rebalances run inside the thread's poll and
//! block it until the pipeline answers, which is the point: the group waits
//! for the answer, and publishing stops before another worker starts.
//!
//! When every lane has been busy for a second with nothing more to gather
//! (a database outage holds the batches in their lanes), the thread polls
//! on with its partitions paused: a consumer that stops polling for longer than
//! `max.poll.interval.ms` is evicted from the group, and its partitions
//! move while its batches still wait to be decided. What was read stays
//! gathered in memory, in order, and the partitions resume where the
//! thread's positions stand (see [`UsageReader::hold`]).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::bindings::rd_kafka_resp_err_t as RespErr;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::producer::ErrorCounter;

/// What the consumer thread tells the pipeline; each event carries its
/// answer's way back.
pub enum ConsumerEvent {
    /// Partitions were assigned: answer where each resumes (the next offset
    /// to decide). The group waits for the answer; a failure is asked again.
    Assigned {
        partitions: Vec<i32>,
        resume_at: oneshot::Sender<anyhow::Result<HashMap<i32, i64>>>,
    },
    /// Partitions are being revoked: answer once nothing publishes them any
    /// more. The group waits for the answer.
    Revoked {
        partitions: Vec<i32>,
        stopped: oneshot::Sender<()>,
    },
    /// A batch for a free lane: answer once it is decided.
    Batch { batch: UsageBatch, reply: BatchReply },
}

/// What a batch holds of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OffsetRange {
    pub partition: i32,
    /// The consumer's position before the first message.
    pub from: i64,
    /// The consumer's position after the last message.
    pub to: i64,
}

impl OffsetRange {
    pub const fn new(partition: i32, from: i64, to: i64) -> Self {
        Self { partition, from, to }
    }
}

/// Messages of one poll window, in offset order per partition.
pub struct UsageBatch {
    pub messages: Vec<OwnedMessage>,
    pub ranges: Vec<OffsetRange>,
    pub read_at: Instant,
}

impl UsageBatch {
    pub fn partitions(&self) -> Vec<i32> {
        self.ranges.iter().map(|r| r.partition).collect()
    }
}

/// The pipeline's way to answer a batch. Dropped unanswered (the worker
/// failed, or is leaving), the batch's partitions and lane stay taken.
pub struct BatchReply {
    partitions: Vec<i32>,
    to: std_mpsc::Sender<Decided>,
}

impl BatchReply {
    /// The batch is decided (committed, or rolled back at shutdown), and
    /// these partitions are read again from these offsets: their stored
    /// offset is behind what the consumer read, so something was not
    /// decided.
    pub fn decided(self, reread: Vec<(i32, i64)>) {
        // The thread is gone only when the worker stops.
        let _ = self.to.send(Decided {
            partitions: self.partitions,
            reread,
        });
    }
}

/// A batch's answer, as the thread receives it.
struct Decided {
    partitions: Vec<i32>,
    reread: Vec<(i32, i64)>,
}

/// The usage consumer as the pipeline holds it: its events, and its way
/// out of the group. Dropped, the thread leaves the group too, without
/// being able to ask anything.
pub struct UsageConsumer {
    events: mpsc::Receiver<ConsumerEvent>,
    leave: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl UsageConsumer {
    /// The thread's next event; `None` once it has ended.
    pub async fn next_event(&mut self) -> Option<ConsumerEvent> {
        self.events.recv().await
    }

    /// Asks the thread to leave the group: it stops reading, revokes its
    /// partitions (asking through `Revoked` as usual) and ends, and then
    /// `next_event` returns `None`.
    pub fn leave(&mut self) {
        if let Some(leave) = self.leave.take() {
            let _ = leave.send(());
        }
    }

    /// The thread, to join once it has ended.
    pub fn thread(&mut self) -> Option<JoinHandle<()>> {
        self.thread.take()
    }
}

/// Answers the group's rebalances by asking the pipeline. It runs on the
/// consumer thread, inside `poll`, and leaves the new positions for the
/// thread's loop to take up after the poll.
struct RebalanceContext {
    topic: String,
    events: mpsc::Sender<ConsumerEvent>,
    /// The owned partitions and where each resumes, after a rebalance the
    /// loop has not taken up yet.
    reassigned: Mutex<Option<HashMap<i32, i64>>>,
    errors: ErrorCounter,
}

impl RebalanceContext {
    fn reassign(&self, next: HashMap<i32, i64>) {
        *self.reassigned.lock().expect("rebalance lock") = Some(next);
    }

    /// The positions after the rebalances since the last call, if any.
    fn take_reassigned(&self) -> Option<HashMap<i32, i64>> {
        self.reassigned.lock().expect("rebalance lock").take()
    }

    /// Where each partition resumes, asked until the pipeline knows
    /// (without the stored offsets nothing can be read safely, and the
    /// group waits for us); `None` when the pipeline is gone.
    fn resume_positions(&self, partitions: &[i32]) -> Option<HashMap<i32, i64>> {
        loop {
            let (resume_at, answer) = oneshot::channel();
            let asked = ConsumerEvent::Assigned {
                partitions: partitions.to_vec(),
                resume_at,
            };
            self.events.blocking_send(asked).ok()?;
            match answer.blocking_recv().ok()? {
                Ok(offsets) => return Some(offsets),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "loading stored offsets failed; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Waits until the pipeline has stopped publishing the partitions.
    fn stop_publishing(&self, partitions: &[i32]) {
        let (stopped, answer) = oneshot::channel();
        let asked = ConsumerEvent::Revoked {
            partitions: partitions.to_vec(),
            stopped,
        };
        if self.events.blocking_send(asked).is_err() || answer.blocking_recv().is_err() {
            tracing::warn!(
                ?partitions,
                "the pipeline is gone; partitions revoked without its answer"
            );
        }
    }
}

impl ClientContext for RebalanceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.count(&error);
        tracing::warn!(error = %error, reason, "consumer error");
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        match err {
            RespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some(offsets) = self.resume_positions(&partitions) else {
                    // The worker is stopping: nothing is read any more.
                    self.reassign(HashMap::new());
                    return;
                };
                let mut assignment = TopicPartitionList::new();
                let mut next = HashMap::new();
                for p in &partitions {
                    let offset = offsets[p];
                    assignment
                        .add_partition_offset(&self.topic, *p, Offset::Offset(offset))
                        .expect("valid offset");
                    next.insert(*p, offset);
                }
                self.reassign(next);
                self.errors.metrics.rebalanced(true);
                tracing::info!(?partitions, ?offsets, "partitions assigned");
                if let Err(e) = consumer.assign(&assignment) {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                // A partition paused under a former assignment (a hold that a
                // rebalance cut short, or an error) stays paused through
                // unassign and assign in librdkafka: nothing would be fetched
                // from it again, and no other member would read it.
                if let Err(e) = consumer.resume(&assignment) {
                    tracing::error!(error = %e, "resuming the assigned partitions failed");
                }
            }
            RespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                self.errors.metrics.rebalanced(false);
                self.reassign(HashMap::new());
                self.stop_publishing(&partitions);
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                self.reassign(HashMap::new());
                let _ = consumer.unassign();
            }
        }
    }
}

type UsageKafkaConsumer = BaseConsumer<RebalanceContext>;

/// Next offset per owned partition (the thread advances it as it reads).
#[derive(Default)]
struct Positions {
    next: HashMap<i32, i64>,
    /// Partitions read from a new position (an assignment or a seek) whose
    /// first record has not shown yet that the broker served that position.
    resumed: HashMap<i32, Resume>,
}

impl Positions {
    /// A new assignment: these partitions, from these positions.
    fn reassign(&mut self, next: HashMap<i32, i64>) {
        self.next.clear();
        self.resumed.clear();
        for (partition, offset) in next {
            self.resume(partition, offset);
        }
    }

    fn resume(&mut self, partition: i32, next: i64) {
        self.next.insert(partition, next);
        self.resumed.insert(partition, Resume::new(next));
    }
}

/// Checks that the broker served a partition from the position asked for.
/// Apache Kafka answers a fetch from inside a record batch with the whole
/// batch (the client drops what comes before the position); tansu answers
/// with the batches that start at or after it, silently skipping the rest
/// of the batch the position is in. A first record after the position, or
/// none while the partition holds more, sends the read back from further
/// and further before the position (1, 2, 4, ... records) until a record at
/// or before it shows the batch was served; what comes before the position
/// is dropped as usual. On Apache Kafka this costs nothing (the first record
/// is the one asked for), or a few fetches where offsets really are missing
/// (compaction, transaction markers), which are then accepted as a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resume {
    target: i64,
    /// Where the current read starts.
    from: i64,
    since: Instant,
}

/// How long a resumed partition may show nothing while the broker reports
/// records past the position before its read is sent further back.
const RESUME_QUIET: Duration = Duration::from_millis(1000);

/// How long every lane may stay busy, with nothing more to gather and no
/// batch finishing, before the consumer pauses its partitions.
const HOLD_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq, Eq)]
enum ResumeCheck {
    /// The position was served: read on.
    Served,
    /// Read again from this offset.
    ReadFrom(i64),
}

impl Resume {
    fn new(target: i64) -> Self {
        Self {
            target,
            from: target,
            since: Instant::now(),
        }
    }

    /// A record (or none, as `None`) after the read from `self.from`, with
    /// the partition's first offset.
    fn check(&mut self, offset: Option<i64>, low: i64) -> ResumeCheck {
        if offset.is_some_and(|o| o <= self.target) || self.from <= low.max(0) {
            return ResumeCheck::Served;
        }
        let back = (self.target - self.from).max(1) * 2;
        self.from = (self.target - back).max(low.max(0));
        self.since = Instant::now();
        ResumeCheck::ReadFrom(self.from)
    }
}

pub struct ConsumerSettings {
    pub topic: String,
    pub batch_size: usize,
    /// Most bytes (keys and payloads) in a batch; it takes one message
    /// whatever its size.
    pub max_batch_bytes: usize,
    pub linger: Duration,
    /// Batches the pipeline decides at once.
    pub lanes: usize,
    /// Where the consumer's errors and rebalances are counted.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Starts the consumer thread. It leaves the group (revoking its partitions
/// through `Revoked`) when asked to, or when the pipeline drops its
/// [`UsageConsumer`].
pub fn spawn(config: &ClientConfig, settings: ConsumerSettings) -> anyhow::Result<UsageConsumer> {
    let (reader, mut handle) = subscribe(config, settings)?;
    let thread = std::thread::Builder::new()
        .name("usage-consumer".into())
        .spawn(move || reader.run())
        .context("starting the consumer thread")?;
    handle.thread = Some(thread);
    Ok(handle)
}

/// The consumer, subscribed, with the thread's state and the pipeline's
/// handle (without the thread yet).
fn subscribe(config: &ClientConfig, settings: ConsumerSettings) -> anyhow::Result<(UsageReader, UsageConsumer)> {
    // Room for a batch for every lane and one rebalance question: the
    // thread never waits for room.
    let (events_tx, events) = mpsc::channel(settings.lanes.max(1) + 1);
    let context = RebalanceContext {
        topic: settings.topic.clone(),
        events: events_tx,
        reassigned: Mutex::new(None),
        errors: ErrorCounter {
            client: crate::metrics::KafkaClient::Consumer,
            metrics: settings.metrics.clone(),
        },
    };
    let consumer: UsageKafkaConsumer = config
        .create_with_context(context)
        .context("creating the usage-events consumer")?;
    consumer
        .subscribe(&[&settings.topic])
        .with_context(|| format!("subscribing to {}", settings.topic))?;
    let (leave_tx, leave) = oneshot::channel();
    let (decided_tx, decided) = std_mpsc::channel();
    let reader = UsageReader {
        consumer,
        free_lanes: settings.lanes,
        settings,
        leave,
        positions: Positions::default(),
        gathered: Gathered::default(),
        held: None,
        pressed_since: None,
        decided_tx,
        decided,
    };
    let handle = UsageConsumer {
        events,
        leave: Some(leave_tx),
        thread: None,
    };
    Ok((reader, handle))
}

/// The consumer thread's state.
struct UsageReader {
    consumer: UsageKafkaConsumer,
    settings: ConsumerSettings,
    leave: oneshot::Receiver<()>,
    positions: Positions,
    gathered: Gathered,
    /// The partitions paused while nothing more may be gathered; `None`
    /// while reading.
    held: Option<TopicPartitionList>,
    /// Since when every lane is busy and nothing more may be gathered,
    /// without a lane finishing.
    pressed_since: Option<Instant>,
    /// Lanes without a batch: a batch is sent only for one of them.
    free_lanes: usize,
    decided_tx: std_mpsc::Sender<Decided>,
    decided: std_mpsc::Receiver<Decided>,
}

impl UsageReader {
    fn run(mut self) {
        // Room for a full batch for every lane, and one more: the messages of
        // partitions whose batch is still being decided count too, and when
        // they alone fill the room nothing else is read until that batch ends.
        let room = self.settings.batch_size * (self.settings.lanes.max(1) + 1);
        let room_bytes = self
            .settings
            .max_batch_bytes
            .saturating_mul(self.settings.lanes.max(1) + 1);
        while !self.leaving() {
            while let Ok(decided) = self.decided.try_recv() {
                self.on_decided(decided);
            }
            let (ready, ready_bytes) = self.gathered.ready();
            let oldest = self.gathered.oldest_ready();
            let lingered = oldest.is_some_and(|t| t.elapsed() >= self.settings.linger);
            let full = self.gathered.len() >= room || self.gathered.bytes >= room_bytes;
            let batch_ready = ready >= self.settings.batch_size || ready_bytes >= self.settings.max_batch_bytes;
            if self.free_lanes > 0 && ready > 0 && (batch_ready || lingered || full) {
                if !self.send_batch() {
                    break;
                }
                continue;
            }
            if full || batch_ready {
                // Back-pressure: wait for a lane to finish its batch (its
                // partitions may hold what is gathered). When none has for
                // a while (the database is down), the partitions are paused
                // and polled, so that the group keeps us however long the
                // lanes take. (Not at once: a pause drops what librdkafka
                // has fetched ahead, which a busy worker would fetch again
                // after every batch.)
                let pressed = *self.pressed_since.get_or_insert_with(Instant::now);
                if pressed.elapsed() >= HOLD_AFTER {
                    self.hold();
                }
                if let Ok(decided) = self.decided.recv_timeout(Duration::from_millis(100)) {
                    self.on_decided(decided);
                }
                // (Without anything to read, the poll only serves the group;
                // should pausing have failed, nothing is polled.) Not with a
                // zero wait: librdkafka counts `max.poll.interval.ms` on
                // through a rebalance callback served by a poll that does not
                // block, and the assignment callback waits for the database.
                if self.held.is_some() || self.positions.next.is_empty() {
                    self.poll(Duration::from_millis(10));
                }
                continue;
            }
            self.pressed_since = None;
            self.release();
            let wait = match oldest {
                // Ready but every lane is busy: look for a free one often.
                Some(_) if lingered => Duration::from_millis(2),
                Some(t) => self.settings.linger.saturating_sub(t.elapsed()),
                None => Duration::from_millis(100),
            };
            self.poll(wait);
        }
        tracing::info!("usage consumer leaving the group");
        self.consumer.unsubscribe();
        // Let the revocation be answered before the consumer is dropped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
            self.consumer.poll(Duration::from_millis(50));
        }
    }

    /// Asked to leave, or the pipeline is gone.
    fn leaving(&mut self) -> bool {
        let asked = !matches!(self.leave.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        asked || self.consumer.context().events.is_closed()
    }

    /// Sends a batch for a free lane; false when the pipeline is gone.
    fn send_batch(&mut self) -> bool {
        // The partitions are shared out among the lanes.
        let share = self.positions.next.len().div_ceil(self.settings.lanes.max(1)).max(1);
        let batch = self
            .gathered
            .take(self.settings.batch_size, self.settings.max_batch_bytes, share);
        let reply = BatchReply {
            partitions: batch.partitions(),
            to: self.decided_tx.clone(),
        };
        self.free_lanes -= 1;
        let event = ConsumerEvent::Batch { batch, reply };
        self.consumer.context().events.blocking_send(event).is_ok()
    }

    /// Pauses every partition read from (once): nothing more is fetched,
    /// and polling goes on, which keeps the consumer in the group (librdkafka
    /// evicts a consumer that does not poll for `max.poll.interval.ms`).
    ///
    /// Nothing is lost or read out of order: what the thread has read is
    /// gathered in memory and stays there until a batch takes it, and
    /// librdkafka drops what it had fetched but not yet returned, and on
    /// resume fetches again from the position after the last message
    /// returned, which is where `positions` stand. (Seeking back to the
    /// batches' start instead would read again what is already gathered or
    /// in a lane.)
    fn hold(&mut self) {
        if self.held.is_some() || self.positions.next.is_empty() {
            return;
        }
        let mut held = TopicPartitionList::new();
        for partition in self.positions.next.keys() {
            held.add_partition(&self.settings.topic, *partition);
        }
        match self.consumer.pause(&held) {
            Ok(()) => {
                tracing::debug!(partitions = held.count(), "every lane is busy: reading paused");
                self.held = Some(held);
            }
            Err(e) => tracing::warn!(error = %e, "pausing the partitions failed"),
        }
    }

    /// Resumes the partitions `hold` paused (those still read from). Each
    /// is checked as after a seek: a broker that serves a position inside a
    /// record batch from the next batch (tansu) is read from further back.
    fn release(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let mut resumed = TopicPartitionList::new();
        for element in held.elements() {
            let partition = element.partition();
            if let Some(next) = self.positions.next.get(&partition).copied() {
                resumed.add_partition(&self.settings.topic, partition);
                self.positions.resume(partition, next);
            }
        }
        if let Err(e) = self.consumer.resume(&resumed) {
            tracing::error!(error = %e, "resuming the partitions failed");
        }
    }

    fn on_decided(&mut self, decided: Decided) {
        self.pressed_since = None;
        if !decided.reread.is_empty() {
            // A seek goes to a partition that is read from.
            self.release();
        }
        for (partition, offset) in decided.reread {
            seek(
                &self.consumer,
                &self.settings.topic,
                &mut self.positions,
                partition,
                offset,
            );
            self.gathered.drop_partition(partition);
        }
        self.gathered.done(&decided.partitions);
        self.free_lanes += 1;
    }

    /// Reads a message, if one comes within `wait`; rebalances run here.
    fn poll(&mut self, wait: Duration) {
        let consumer = &self.consumer;
        let topic = self.settings.topic.as_str();
        let polled = consumer.poll(wait);
        if let Some(next) = consumer.context().take_reassigned() {
            // What was gathered under the former assignment is dropped (the
            // partitions' owners read it again); batches in lanes stay so.
            // A new assignment is read from, not paused.
            self.positions.reassign(next);
            self.gathered.clear();
            self.held = None;
        }
        match polled {
            Some(Ok(message)) => {
                let partition = message.partition();
                let offset = message.offset();
                if let Some(resume) = self.positions.resumed.get_mut(&partition) {
                    let low = low_watermark(consumer, topic, partition);
                    match resume.check(Some(offset), low) {
                        ResumeCheck::Served => {
                            self.positions.resumed.remove(&partition);
                        }
                        ResumeCheck::ReadFrom(from) => {
                            read_from(consumer, topic, partition, offset, from);
                            return;
                        }
                    }
                }
                // Messages of partitions no longer ours (a revocation raced
                // the fetch) are dropped: their new owner reads them.
                if let Some(next) = self.positions.next.get_mut(&partition) {
                    if offset >= *next {
                        self.gathered.push(message.detach(), *next);
                        *next = offset + 1;
                    }
                }
            }
            Some(Err(e)) => {
                consumer.context().errors.count(&e);
                on_error(consumer, topic, &mut self.positions, e);
            }
            None => {}
        }
        if self.held.is_none() {
            check_quiet_resumes(consumer, topic, &mut self.positions);
        }
    }
}

/// Messages read and not yet handed to the pipeline, and the partitions of
/// the batches it is still deciding. A batch never takes a partition that
/// is in flight: the batches decided at once hold disjoint partitions, so
/// each partition is still decided in offset order, one batch after the
/// other, and their transactions never wait on each other's offset and
/// outbox rows.
#[derive(Default)]
struct Gathered {
    /// In read order (offset order within a partition), with when each was read.
    messages: Vec<(OwnedMessage, Instant)>,
    partitions: HashMap<i32, Slot>,
    in_flight: HashSet<i32>,
    /// Bytes of every gathered message (keys and payloads).
    bytes: usize,
}

/// Bytes a message brings into a batch: its key and payload.
fn message_bytes(message: &OwnedMessage) -> usize {
    message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len)
}

/// What is gathered of one partition.
struct Slot {
    count: usize,
    bytes: usize,
    /// The consumer's position before the first message.
    from: i64,
    /// When the oldest was read.
    since: Instant,
}

impl Gathered {
    fn len(&self) -> usize {
        self.messages.len()
    }

    /// How many messages, and bytes, a batch could take now.
    fn ready(&self) -> (usize, usize) {
        let busy = self.in_flight.iter().filter_map(|p| self.partitions.get(p));
        let (count, bytes) = busy.fold((0, 0), |(c, b), slot| (c + slot.count, b + slot.bytes));
        (self.messages.len() - count, self.bytes - bytes)
    }

    /// When the oldest message a batch could take now was read.
    fn oldest_ready(&self) -> Option<Instant> {
        self.partitions
            .iter()
            .filter(|(p, _)| !self.in_flight.contains(p))
            .map(|(_, slot)| slot.since)
            .min()
    }

    /// Adds a message read at consumer position `before`.
    fn push(&mut self, message: OwnedMessage, before: i64) {
        let now = Instant::now();
        let bytes = message_bytes(&message);
        let slot = self.partitions.entry(message.partition()).or_insert(Slot {
            count: 0,
            bytes: 0,
            from: before,
            since: now,
        });
        slot.count += 1;
        slot.bytes += bytes;
        self.bytes += bytes;
        self.messages.push((message, now));
    }

    /// Forgets a partition's messages (it is read again from elsewhere).
    fn drop_partition(&mut self, partition: i32) {
        self.messages.retain(|(m, _)| m.partition() != partition);
        if let Some(slot) = self.partitions.remove(&partition) {
            self.bytes -= slot.bytes;
        }
    }

    /// Forgets every message (a new assignment); batches in flight stay so.
    fn clear(&mut self) {
        self.messages.clear();
        self.partitions.clear();
        self.bytes = 0;
    }

    /// Up to `max` messages and `max_bytes` bytes (at least one message) of
    /// at most `max_partitions` partitions not in flight, oldest first, and
    /// marks their partitions in flight. A partition's messages that do not
    /// fit stay, to start its next batch. (Without the partition limit the
    /// first batch would take every partition, and no other batch could
    /// ever start beside it.)
    fn take(&mut self, max: usize, max_bytes: usize, max_partitions: usize) -> UsageBatch {
        let mut taken = Vec::with_capacity(max.min(self.messages.len()));
        let mut taken_bytes = 0;
        let mut closed = false;
        let mut kept = Vec::with_capacity(self.messages.len());
        let mut read_at: Option<Instant> = None;
        // Per partition taken from: (count, bytes, offset of the last, when
        // the first one left behind was read).
        let mut from: HashMap<i32, (usize, usize, i64, Option<Instant>)> = HashMap::new();
        for (m, at) in std::mem::take(&mut self.messages) {
            let p = m.partition();
            let admitted = from.contains_key(&p) || (from.len() < max_partitions && !self.in_flight.contains(&p));
            let bytes = message_bytes(&m);
            // Once full, nothing more is taken: each partition's messages
            // taken stay a prefix of what it has gathered.
            if admitted && !closed {
                closed = taken.len() >= max || (!taken.is_empty() && taken_bytes + bytes > max_bytes);
            }
            if admitted && !closed {
                taken_bytes += bytes;
                let entry = from.entry(p).or_insert((0, 0, 0, None));
                entry.0 += 1;
                entry.1 += bytes;
                entry.2 = m.offset();
                read_at = Some(read_at.map_or(at, |r| r.min(at)));
                taken.push(m);
            } else {
                if let Some(entry) = from.get_mut(&p) {
                    entry.3.get_or_insert(at);
                }
                kept.push((m, at));
            }
        }
        self.messages = kept;
        self.bytes -= taken_bytes;
        let mut ranges = Vec::with_capacity(from.len());
        for (partition, (count, bytes, last, rest_since)) in from {
            let slot = self.partitions.get_mut(&partition).expect("a gathered partition");
            ranges.push(OffsetRange::new(partition, slot.from, last + 1));
            match rest_since {
                Some(since) => {
                    slot.count -= count;
                    slot.bytes -= bytes;
                    slot.from = last + 1;
                    slot.since = since;
                }
                None => {
                    self.partitions.remove(&partition);
                }
            }
            self.in_flight.insert(partition);
        }
        ranges.sort_unstable();
        UsageBatch {
            messages: taken,
            ranges,
            read_at: read_at.unwrap_or_else(Instant::now),
        }
    }

    /// The pipeline has decided a batch of these partitions.
    fn done(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.in_flight.remove(p);
        }
    }
}

fn seek(consumer: &UsageKafkaConsumer, topic: &str, positions: &mut Positions, partition: i32, offset: i64) {
    if !positions.next.contains_key(&partition) {
        return;
    }
    tracing::warn!(partition, offset, "re-reading partition from its stored offset");
    match consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
        Ok(()) => {
            positions.resume(partition, offset);
        }
        Err(e) => tracing::error!(partition, offset, error = %e, "seek failed"),
    }
}

/// Resumed partitions that showed nothing for a while although the broker
/// reports records past their position (from its fetch answers).
fn check_quiet_resumes(consumer: &UsageKafkaConsumer, topic: &str, positions: &mut Positions) {
    let mut served = Vec::new();
    for (partition, resume) in positions.resumed.iter_mut() {
        if resume.since.elapsed() < RESUME_QUIET {
            continue;
        }
        let Some((low, high)) = cached_watermarks(consumer, topic, *partition) else {
            continue;
        };
        if high <= resume.target {
            resume.since = Instant::now();
            continue;
        }
        match resume.check(None, low) {
            ResumeCheck::ReadFrom(from) => read_from(consumer, topic, *partition, high, from),
            ResumeCheck::Served => served.push(*partition),
        }
    }
    for partition in served {
        positions.resumed.remove(&partition);
    }
}

/// The partition's first and next offsets as the client's last fetch
/// answer gave them (no request), if it had one.
fn cached_watermarks(consumer: &UsageKafkaConsumer, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client is alive for the call, the topic is a valid C
    // string, and librdkafka only writes the two integers.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RespErr::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0 && high >= 0).then_some((low, high))
}

/// The partition's first offset, from the client's last fetch answer, or
/// from the broker.
fn low_watermark(consumer: &UsageKafkaConsumer, topic: &str, partition: i32) -> i64 {
    match cached_watermarks(consumer, topic, partition) {
        Some((low, _)) => low,
        _ => consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(5))
            .map(|(low, _)| low)
            .unwrap_or(0),
    }
}

fn read_from(consumer: &UsageKafkaConsumer, topic: &str, partition: i32, seen: i64, from: i64) {
    tracing::info!(
        partition,
        seen,
        from,
        "the broker did not serve the partition from its position; reading from further back"
    );
    if let Err(e) = consumer.seek(topic, partition, Offset::Offset(from), Duration::from_secs(10)) {
        tracing::warn!(partition, from, error = %e, "seek failed");
    }
}

/// A consumer error. When a position is no longer on the topic (retention
/// removed events nobody decided), the partition stops, loudly: skipping
/// would lose billing data.
fn on_error(consumer: &UsageKafkaConsumer, topic: &str, positions: &mut Positions, error: KafkaError) {
    if !super::position_off_topic(&error) {
        tracing::warn!(error = %error, "consumer error");
        return;
    }
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
        positions.resumed.remove(&e.partition());
    }
    if stopped.count() > 0 {
        let _ = consumer.pause(&stopped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    #[test]
    fn a_resumed_partition_whose_first_record_is_its_position_was_served() {
        let mut resume = Resume::new(100);
        assert_eq!(resume.check(Some(100), 0), ResumeCheck::Served);
    }

    #[test]
    fn a_resumed_partition_that_starts_past_its_position_is_read_from_further_back() {
        let mut resume = Resume::new(100);
        assert_eq!(resume.check(Some(105), 0), ResumeCheck::ReadFrom(98));
        assert_eq!(resume.check(None, 0), ResumeCheck::ReadFrom(96));
        assert_eq!(resume.check(Some(103), 0), ResumeCheck::ReadFrom(92));
        // A record before the position: its batch was served.
        assert_eq!(resume.check(Some(90), 0), ResumeCheck::Served);
    }

    #[test]
    fn offsets_missing_down_to_the_partition_start_are_a_gap() {
        let mut resume = Resume::new(5);
        assert_eq!(resume.check(Some(9), 4), ResumeCheck::ReadFrom(4));
        assert_eq!(resume.check(Some(9), 4), ResumeCheck::Served);
    }

    fn message(partition: i32, offset: i64) -> OwnedMessage {
        with_payload(partition, offset, None)
    }

    fn sized(partition: i32, offset: i64, bytes: usize) -> OwnedMessage {
        with_payload(partition, offset, Some(vec![b'x'; bytes]))
    }

    fn with_payload(partition: i32, offset: i64, payload: Option<Vec<u8>>) -> OwnedMessage {
        OwnedMessage::new(
            payload,
            None,
            "usage-events".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    /// The thread's state and the pipeline's handle, without a thread (and
    /// without a broker: nothing here reaches one).
    fn reader(lanes: usize) -> (UsageReader, UsageConsumer) {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "usage-worker-test")
            .set("log_level", "0");
        let settings = ConsumerSettings {
            topic: "usage-events".into(),
            batch_size: 10,
            max_batch_bytes: usize::MAX,
            linger: Duration::ZERO,
            lanes,
            metrics: Default::default(),
        };
        subscribe(&config, settings).unwrap()
    }

    /// A reader that has sent a batch of partition 0 for one of its lanes.
    fn reader_with_a_batch_out(lanes: usize) -> (UsageReader, UsageConsumer, UsageBatch, BatchReply) {
        let (mut reader, mut handle) = reader(lanes);
        reader.gathered.push(message(0, 0), 0);
        assert!(reader.send_batch());
        match handle.events.try_recv() {
            Ok(ConsumerEvent::Batch { batch, reply }) => (reader, handle, batch, reply),
            _ => panic!("a batch"),
        }
    }

    #[test]
    fn a_batch_takes_a_lane_and_its_partitions_until_it_is_answered() {
        let (mut reader, _handle, batch, reply) = reader_with_a_batch_out(1);
        assert_eq!(reader.free_lanes, 0);
        assert_eq!(batch.ranges, [OffsetRange::new(0, 0, 1)]);
        reader.gathered.push(message(0, 1), 1);
        assert_eq!(reader.gathered.ready().0, 0, "partition 0 is in its lane");
        reply.decided(Vec::new());
        let decided = reader.decided.try_recv().expect("the answer");
        reader.on_decided(decided);
        assert_eq!((reader.free_lanes, reader.gathered.ready().0), (1, 1));
    }

    #[test]
    fn a_batch_dropped_unanswered_keeps_its_lane_and_partitions() {
        let (mut reader, _handle, batch, reply) = reader_with_a_batch_out(2);
        drop((batch, reply));
        assert!(reader.decided.try_recv().is_err());
        reader.gathered.push(message(0, 1), 1);
        assert_eq!((reader.free_lanes, reader.gathered.ready().0), (1, 0));
    }

    #[test]
    fn a_partition_to_read_again_loses_what_was_gathered_of_it() {
        let (mut reader, _handle, _, reply) = reader_with_a_batch_out(1);
        reader.gathered.push(message(0, 1), 1);
        reader.gathered.push(message(1, 5), 5);
        reply.decided(vec![(0, 0)]);
        reader.on_decided(reader.decided.try_recv().expect("the answer"));
        assert_eq!((reader.gathered.len(), reader.gathered.ready().0), (1, 1));
    }

    #[test]
    fn the_thread_leaves_when_asked_or_when_the_handle_is_dropped() {
        let (mut reader, mut handle) = reader(1);
        assert!(!reader.leaving());
        handle.leave();
        assert!(reader.leaving());
        let (mut reader, handle) = self::reader(1);
        drop(handle);
        assert!(reader.leaving());
    }

    #[test]
    fn a_batch_of_large_messages_stops_at_its_byte_bound_and_takes_one_at_least() {
        let mut g = Gathered::default();
        for o in 0..5 {
            g.push(sized(0, o, 950_000), o);
        }
        g.push(sized(1, 0, 10), 0);
        assert_eq!(g.ready(), (6, 5 * 950_000 + 10));
        let first = g.take(2000, 2_000_000, usize::MAX);
        assert_eq!(offsets(&first), [(0, 0), (0, 1)], "a third would pass 2,000,000 bytes");
        assert_eq!(first.ranges, [OffsetRange::new(0, 0, 2)]);
        g.done(&first.partitions());
        let second = g.take(2000, 100, usize::MAX);
        assert_eq!(
            offsets(&second),
            [(0, 2)],
            "one message over the bound still makes a batch"
        );
        g.done(&second.partitions());
        assert_eq!(g.ready(), (3, 2 * 950_000 + 10));
        assert_eq!(g.bytes, 2 * 950_000 + 10);
    }

    fn offsets(batch: &UsageBatch) -> Vec<(i32, i64)> {
        batch.messages.iter().map(|m| (m.partition(), m.offset())).collect()
    }

    #[test]
    fn a_batch_takes_the_oldest_messages_and_leaves_the_rest_to_continue_the_partition() {
        let mut g = Gathered::default();
        for (p, o) in [(0, 10), (1, 5), (0, 11), (0, 13), (1, 6)] {
            // Offset 12 of partition 0 is not there (a gap): positions move on.
            g.push(message(p, o), if (p, o) == (0, 13) { 12 } else { o });
        }
        let first = g.take(3, usize::MAX, usize::MAX);
        assert_eq!(offsets(&first), [(0, 10), (1, 5), (0, 11)]);
        assert_eq!(first.ranges, [OffsetRange::new(0, 10, 12), OffsetRange::new(1, 5, 6)]);
        assert_eq!((g.len(), g.ready().0), (2, 0), "both partitions are in flight");
        g.done(&first.partitions());
        let second = g.take(10, usize::MAX, usize::MAX);
        assert_eq!(offsets(&second), [(0, 13), (1, 6)]);
        assert_eq!(second.ranges, [OffsetRange::new(0, 12, 14), OffsetRange::new(1, 6, 7)]);
        assert_eq!(g.len(), 0);
        assert!(g.oldest_ready().is_none());
    }

    #[test]
    fn partitions_in_flight_wait_and_the_others_make_the_next_batch() {
        let mut g = Gathered::default();
        g.push(message(0, 0), 0);
        let first = g.take(10, usize::MAX, usize::MAX);
        assert_eq!(first.partitions(), [0]);
        for (p, o) in [(0, 1), (2, 7), (0, 2), (3, 1)] {
            g.push(message(p, o), o);
        }
        assert_eq!(g.ready().0, 2);
        let second = g.take(10, usize::MAX, usize::MAX);
        assert_eq!(offsets(&second), [(2, 7), (3, 1)]);
        assert_eq!(g.ready().0, 0);
        g.done(&[0]);
        assert_eq!(g.ready().0, 2);
        let third = g.take(10, usize::MAX, usize::MAX);
        assert_eq!(offsets(&third), [(0, 1), (0, 2)]);
        assert_eq!(third.ranges, [OffsetRange::new(0, 1, 3)]);
    }

    #[test]
    fn a_batch_takes_at_most_its_share_of_partitions_the_oldest_first() {
        let mut g = Gathered::default();
        for (p, o) in [(3, 0), (1, 0), (3, 1), (2, 0), (1, 1), (0, 0)] {
            g.push(message(p, o), o);
        }
        let first = g.take(100, usize::MAX, 2);
        assert_eq!(offsets(&first), [(3, 0), (1, 0), (3, 1), (1, 1)]);
        let second = g.take(100, usize::MAX, 2);
        assert_eq!(offsets(&second), [(2, 0), (0, 0)]);
    }

    #[test]
    fn a_dropped_or_cleared_partition_leaves_nothing_behind_but_in_flight_stays() {
        let mut g = Gathered::default();
        g.push(message(0, 0), 0);
        let first = g.take(1, usize::MAX, usize::MAX);
        g.push(message(1, 4), 4);
        g.push(message(0, 1), 1);
        g.drop_partition(1);
        assert_eq!((g.len(), g.ready().0), (1, 0));
        g.clear();
        g.push(message(0, 8), 8);
        assert_eq!(g.ready(), (0, 0), "partition 0 is still in flight");
        g.done(&first.partitions());
        assert_eq!(g.take(5, usize::MAX, usize::MAX).ranges, [OffsetRange::new(0, 8, 9)]);
    }
}
