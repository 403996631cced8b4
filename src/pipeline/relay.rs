//! The outbox relay: publishes what the deciding transactions stored, in
//! sequence order, to the output partition with the source's number, for the
//! partitions this worker owns. Before it publishes a partition it has just
//! taken over, it reads the partition's last record on the topic and skips
//! every record up to that record's `outbox-seq`.
//!
//! A partition's former owner may still be alive and publishing: a worker
//! evicted from the group that has not noticed yet (it could not reach the
//! brokers, or its consumer thread was blocked). PostgreSQL fences it: a
//! round runs holding its partitions' fences (session-level advisory locks
//! on the relay's own connection, [`store::take_fences`]), and only for the
//! partitions this relay has claimed in `outbox_owners`, read after the
//! fences are taken; taking a partition over claims its row first, then
//! waits until no session holds its fence (a former owner's round in flight
//! has ended), and only then reads the topic. Either the former owner took
//! the fence before the claimant looked, and the claimant waits for its
//! round to end, or it takes the fence after, and then reads the claim and
//! drops the partition: two relays never publish a partition at once. No
//! transaction stays open for the round: a round waits on the brokers for
//! as long as an outage lasts, and an open transaction would hold back
//! vacuum all that time (a row lock held the fence before). A revocation
//! waits for the round in flight only `REVOKE_WAIT`, then purges the
//! producer's queue and in-flight requests, so that a round stuck on
//! unreachable brokers ends (its records are not retried later) and frees
//! the fences for the new owner.
//!
//! What the worker's own batches committed is handed over in memory
//! ([`Relay::offer`]), so that it is not read back: a partition's records go
//! out from memory when they continue exactly where the topic stands, and
//! are read from the outbox otherwise (records of the HTTP API or of the
//! control topics, anything after a restart, a revocation or a failure).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::ClientConfig;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::kafka::producer::{send_with_retry_async, ErrorCounter, FatalError, ProducerErrors};
use crate::retry::Backoff;
use crate::store;

/// Most records one round reads from the outbox, shared among its
/// partitions (a round holds them all in memory until they are delivered).
const ROUND_LIMIT: i64 = 20_000;
/// Fewest records a round reads of a partition.
const ROUND_MIN_PER_PARTITION: i64 = 200;
/// Most bytes one round reads from the outbox, shared among its partitions
/// the same way: dead-letter copies can be nearly a megabyte each.
const ROUND_BYTES: i64 = 64 << 20;
/// Fewest bytes a round reads of a partition (it always reads one stored
/// batch, whatever its size).
const ROUND_MIN_BYTES_PER_PARTITION: i64 = 1 << 20;
/// How long a revocation waits for the round in flight before it purges the
/// producer.
const REVOKE_WAIT: Duration = Duration::from_secs(1);

/// Most committed records, and bytes, held in memory; beyond them, offers
/// are dropped and the records are read from the outbox (the broker is slow
/// or down).
const MAX_OFFERED: usize = 20_000;
const MAX_OFFERED_BYTES: usize = 64 << 20;

pub struct Relay {
    pool: PgPool,
    producer: FutureProducer<ProducerErrors>,
    /// The producer's fatal error, once it has one (see [`Relay::fatal`]).
    fatal: FatalError,
    /// Counts failed deliveries (the producer's context counts the rest).
    errors: ErrorCounter,
    reader_config: ClientConfig,
    topics: Vec<String>,
    /// (topic, partition) -> last sequence known to be on the topic; `None`
    /// until read back from the topic after an assignment or a failure.
    owned: Mutex<HashMap<(String, i32), Option<i64>>>,
    /// This relay's name in `outbox_owners`: unique per process.
    instance: String,
    /// Owned partitions claimed since their assignment. A partition is
    /// claimed once per assignment: claiming again later (after a failed
    /// delivery, say) could take it back from a newer owner.
    claimed: Mutex<HashSet<(String, i32)>>,
    /// Held for the length of a publishing round; a revocation waits for it,
    /// so that a partition's next owner never publishes alongside us. It
    /// keeps the connection the rounds hold their fences on (none after a
    /// failure: a round that fails or is cut short drops it, and its fences
    /// go with it).
    round: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    wake: Notify,
    /// (topic, partition) -> committed records in sequence order, without
    /// gaps, handed over by the deciding transaction.
    offered: Mutex<Offered>,
    /// Partitions whose last delivery failed, and when each is tried again:
    /// a failure backs off its own partition, never the others.
    failing: Mutex<HashMap<(String, i32), FailingPartition>>,
    retry_max: Duration,
}

/// The first wait after a failure; the waits double up to `retry_max`.
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// When a failing partition is tried again, and how long it waits after
/// its next failure.
#[derive(Debug, Clone, Copy)]
struct FailingPartition {
    retry_at: Instant,
    backoff: Backoff,
}

#[derive(Default)]
struct Offered {
    records: HashMap<(String, i32), VecDeque<store::StoredRecord>>,
    count: usize,
    bytes: usize,
}

fn stored_bytes(record: &store::StoredRecord) -> usize {
    record.key.as_ref().map_or(0, Vec::len)
        + record.payload.len()
        + record.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

impl Offered {
    fn push(&mut self, seq: i64, record: store::OutboxRecord) {
        let queue = self.records.entry((record.topic, record.partition)).or_default();
        if queue.back().is_some_and(|last| last.seq + 1 != seq) {
            // A gap (another transaction's records came between): what is
            // held cannot continue the topic past it; the outbox can.
            self.count -= queue.len();
            self.bytes -= queue.iter().map(stored_bytes).sum::<usize>();
            queue.clear();
        }
        if self.count >= MAX_OFFERED || self.bytes >= MAX_OFFERED_BYTES {
            return;
        }
        let record = store::StoredRecord {
            seq,
            key: record.key,
            payload: record.payload,
            headers: record.headers,
        };
        self.count += 1;
        self.bytes += stored_bytes(&record);
        queue.push_back(record);
    }

    fn forget(&mut self, partitions: &[i32]) {
        let (count, bytes) = (&mut self.count, &mut self.bytes);
        self.records.retain(|(_, p), queue| {
            let keep = !partitions.contains(p);
            if !keep {
                *count -= queue.len();
                *bytes -= queue.iter().map(stored_bytes).sum::<usize>();
            }
            keep
        });
    }

    /// The records after `published`, when they continue it exactly.
    fn take_after(&mut self, topic: &str, partition: i32, published: i64) -> Vec<store::StoredRecord> {
        let Some(queue) = self.records.get_mut(&(topic.to_owned(), partition)) else {
            return Vec::new();
        };
        let taken: Vec<store::StoredRecord> = queue.drain(..).collect();
        self.count -= taken.len();
        self.bytes -= taken.iter().map(stored_bytes).sum::<usize>();
        if taken.first().is_some_and(|r| r.seq <= published + 1) {
            taken.into_iter().filter(|r| r.seq > published).collect()
        } else {
            Vec::new()
        }
    }
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer_config: &ClientConfig,
        reader_config: ClientConfig,
        topics: Vec<String>,
        retry_max: Duration,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let fatal: FatalError = std::sync::Arc::new(tokio::sync::watch::channel(None).0);
        let errors = ErrorCounter {
            client: crate::metrics::KafkaClient::Producer,
            metrics,
        };
        let context = ProducerErrors {
            errors: errors.clone(),
            fatal: fatal.clone(),
        };
        Ok(Self {
            pool,
            producer: producer_config
                .create_with_context(context)
                .context("creating the producer")?,
            fatal,
            errors,
            reader_config,
            topics,
            owned: Mutex::new(HashMap::new()),
            instance: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()),
            claimed: Mutex::new(HashSet::new()),
            round: tokio::sync::Mutex::new(None),
            wake: Notify::new(),
            offered: Mutex::new(Offered::default()),
            failing: Mutex::new(HashMap::new()),
            retry_max,
        })
    }

    /// Resolves with the producer's fatal error, once it has one. The
    /// producer delivers nothing more then (librdkafka's idempotent producer
    /// lost its sequence state): the worker exits, non-zero, and is
    /// restarted; what was not delivered stays in the outbox, and the next
    /// run publishes it after reading back where each partition stands.
    pub async fn fatal(&self) -> String {
        let mut fatal = self.fatal.subscribe();
        loop {
            if let Some(error) = fatal.borrow_and_update().clone() {
                return error;
            }
            if fatal.changed().await.is_err() {
                // The sender lives as long as the relay.
                std::future::pending::<()>().await;
            }
        }
    }

    /// After a failed delivery: whether the producer has a fatal error that
    /// its error callback has not raised yet.
    fn check_fatal(&self) {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            if self.fatal.borrow().is_none() {
                tracing::error!(?code, reason, "FATAL PRODUCER ERROR");
                self.fatal
                    .send_replace(Some(format!("fatal producer error: {code:?}: {reason}")));
            }
        }
    }

    /// Whether a failing partition waits still.
    fn backing_off(&self, topic: &str, partition: i32) -> bool {
        self.failing
            .lock()
            .expect("relay lock")
            .get(&(topic.to_owned(), partition))
            .is_some_and(|b| b.retry_at > Instant::now())
    }

    /// A delivery to the partition failed: it waits, longer each time up to
    /// `retry_max`, and is read back from the topic before it goes on.
    fn failed(&self, topic: &str, partition: i32, error: &anyhow::Error) {
        let mut failing = self.failing.lock().expect("relay lock");
        let failure = failing
            .entry((topic.to_owned(), partition))
            .or_insert(FailingPartition {
                retry_at: Instant::now(),
                backoff: Backoff::new(FIRST_RETRY, self.retry_max),
            });
        let wait = failure.backoff.next_delay();
        failure.retry_at = Instant::now() + wait;
        tracing::warn!(
            topic,
            partition,
            error = format!("{error:#}"),
            backoff_ms = wait.as_millis() as u64,
            "publishing to an output partition failed; retrying it (the other partitions go on)"
        );
        drop(failing);
        self.mark_unknown(topic, partition);
    }

    pub fn assign(&self, partitions: &[i32]) {
        let mut owned = self.owned.lock().expect("relay lock");
        for topic in &self.topics {
            for p in partitions {
                owned.insert((topic.clone(), *p), None);
            }
        }
        self.offered.lock().expect("relay lock").forget(partitions);
        self.claimed
            .lock()
            .expect("relay lock")
            .retain(|(_, p)| !partitions.contains(p));
        self.forget_failures(partitions);
        self.wake.notify_one();
    }

    fn forget_failures(&self, partitions: &[i32]) {
        self.failing
            .lock()
            .expect("relay lock")
            .retain(|(_, p), _| !partitions.contains(p));
    }

    /// Stops publishing the partitions and waits for a round in flight to
    /// finish; one that cannot finish in `REVOKE_WAIT` (its deliveries wait
    /// for unreachable brokers) has the producer purged, so that nothing of
    /// it is sent after the partitions have moved. It blocks: call it where
    /// blocking is allowed (the worker answers a revocation from
    /// `spawn_blocking`).
    pub fn revoke(&self, partitions: &[i32]) {
        self.owned
            .lock()
            .expect("relay lock")
            .retain(|(_, p), _| !partitions.contains(p));
        self.offered.lock().expect("relay lock").forget(partitions);
        self.claimed
            .lock()
            .expect("relay lock")
            .retain(|(_, p)| !partitions.contains(p));
        self.forget_failures(partitions);
        let deadline = Instant::now() + REVOKE_WAIT;
        let finished = loop {
            if let Ok(round) = self.round.try_lock() {
                break Some(round);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _round = match finished {
            Some(round) => round,
            None => {
                tracing::warn!(
                    ?partitions,
                    "the publishing round in flight did not finish; purging the producer's queued and in-flight records"
                );
                self.producer.purge(PurgeConfig::default().queue().inflight());
                self.round.blocking_lock()
            }
        };
        // No round runs now, so whatever the producer still holds belongs to
        // one that was abandoned (a shutdown's time-out cut it short).
        if self.producer.in_flight_count() > 0 {
            tracing::warn!(
                in_flight = self.producer.in_flight_count(),
                "records of an abandoned publishing round are still in flight; purging them"
            );
            self.producer.purge(PurgeConfig::default().queue().inflight());
        }
    }

    /// Committed records with their sequence numbers, from the deciding
    /// transaction (after its commit), for partitions this worker owns.
    pub fn offer(&self, records: Vec<(i64, store::OutboxRecord)>) {
        let owned = self.owned.lock().expect("relay lock");
        let mut offered = self.offered.lock().expect("relay lock");
        for (seq, record) in records {
            if owned.contains_key(&(record.topic.clone(), record.partition)) {
                offered.push(seq, record);
            }
        }
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes until nothing is pending or `deadline` passes; a partition
    /// whose delivery failed is tried again after its backoff until then.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        loop {
            let published = tokio::time::timeout_at(deadline, self.round_once())
                .await
                .context("time-out publishing the outbox")??;
            if published > 0 {
                continue;
            }
            let retry_at = self
                .failing
                .lock()
                .expect("relay lock")
                .values()
                .map(|b| b.retry_at)
                .min();
            let Some(retry_at) = retry_at else {
                return Ok(());
            };
            let retry_at = tokio::time::Instant::from_std(retry_at).min(deadline);
            tokio::time::sleep_until(retry_at).await;
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "time-out publishing the outbox: output partitions still failing"
            );
        }
    }

    /// Runs rounds until `stop` resolves.
    pub async fn run(&self, retry_max: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Backoff::new(FIRST_RETRY, retry_max);
        loop {
            if *stop.borrow() {
                return;
            }
            match self.round_once().await {
                Ok(published) => {
                    backoff.reset();
                    if published > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    tokio::select! {
                        _ = backoff.wait_after("publishing the outbox failed", &e) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
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
        let mut round = self.round.lock().await;
        let mut after = self.published_positions().await;
        if after.is_empty() {
            return Ok(0);
        }
        // The fence: the round holds its partitions' fences until its
        // deliveries are settled. The connection is out of `round` until the
        // round ends well: dropped (an error, a shutdown's time-out), it
        // closes, and the server lets go of its fences.
        let mut fence = match round.take() {
            Some(connection) => connection,
            None => self
                .pool
                .acquire()
                .await
                .context("connecting for a publishing round")?
                .detach(),
        };
        self.keep_claimed(&mut fence, &mut after).await?;
        let clock = std::time::Instant::now();
        let (records, from_memory) = self.pending_records(&mut after).await?;
        let read = clock.elapsed();
        let records = self.still_owned(records);
        // A record that cannot be queued or delivered stops its own
        // partition for this round (nothing after it may go out before it),
        // and only that partition backs off.
        let mut failed: HashMap<(String, i32), anyhow::Error> = HashMap::new();
        let deliveries = self.enqueue(&records, &mut failed).await;
        let mut last = settle(&records, deliveries, &mut failed, &self.errors).await;
        if !failed.is_empty() {
            self.check_fatal();
        }
        self.conclude_failures(&after, &failed, &mut last);
        // What was delivered is on the topic whatever happens next: the
        // relay goes on from there, even when recording it in the database
        // fails (the database copy is a hint; a resync takes the further of
        // it and the topic). Going back to the database's figure would
        // publish these records a second time.
        let delivered = clock.elapsed();
        let published: Vec<(String, i32, i64)> = last.into_iter().map(|((t, p), seq)| (t, p, seq)).collect();
        for (topic, partition, seq) in &published {
            self.set_published(topic, *partition, *seq);
        }
        store::release_fences(&mut fence).await?;
        *round = Some(fence);
        drop(round);
        store::mark_published_many(&self.pool, &published).await?;
        if !records.is_empty() {
            tracing::debug!(
                records = records.len(),
                from_memory,
                read_ms = read.as_secs_f64() * 1e3,
                deliver_ms = (delivered - read).as_secs_f64() * 1e3,
                mark_ms = (clock.elapsed() - delivered).as_secs_f64() * 1e3,
                "relay round"
            );
        }
        Ok(records
            .iter()
            .filter(|(topic, partition, _)| !failed.contains_key(&(topic.clone(), *partition)))
            .count())
    }

    /// (topic, partition, last sequence on the topic) of each owned
    /// partition that is not backing off, read back from the topic where it
    /// is not known.
    async fn published_positions(&self) -> Vec<(String, i32, i64)> {
        let work: Vec<((String, i32), Option<i64>)> = self
            .owned
            .lock()
            .expect("relay lock")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut after = Vec::with_capacity(work.len());
        for ((topic, partition), known) in work {
            if self.backing_off(&topic, partition) {
                continue;
            }
            let published = match known {
                Some(seq) => seq,
                None => {
                    let key = (topic.clone(), partition);
                    if !self.owned.lock().expect("relay lock").contains_key(&key) {
                        continue; // revoked since the round began
                    }
                    // A partition that cannot be claimed or read back now
                    // backs off by itself; the round goes on for the others.
                    match self.take_over(&topic, partition).await {
                        Ok(seq) => seq,
                        Err(e) => {
                            self.failed(&topic, partition, &e);
                            continue;
                        }
                    }
                }
            };
            after.push((topic, partition, published));
        }
        after
    }

    /// Takes the fences of the round's partitions, and drops from the round
    /// those whose fence another session holds (for this round), and those
    /// another worker has claimed (also from what this relay owns).
    async fn keep_claimed(
        &self,
        fence: &mut sqlx::PgConnection,
        after: &mut Vec<(String, i32, i64)>,
    ) -> anyhow::Result<()> {
        let keys: Vec<(String, i32)> = after.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        let fenced = store::take_fences(fence, &keys).await?;
        after.retain(|(t, p, _)| fenced.contains(&(t.clone(), *p)));
        let keys: Vec<(String, i32)> = after.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        let claimed = store::still_claimed(fence, &self.instance, &keys).await?;
        for (topic, partition) in keys.iter().filter(|k| !claimed.contains(*k)) {
            tracing::error!(
                topic,
                partition,
                "another worker has claimed this output partition since; no longer publishing it \
                 (normal for a worker evicted from the group; otherwise the partition waits for the next rebalance)"
            );
            self.owned
                .lock()
                .expect("relay lock")
                .remove(&(topic.clone(), *partition));
        }
        after.retain(|(t, p, _)| claimed.contains(&(t.clone(), *p)));
        Ok(())
    }

    /// The records to publish after each partition's position: offered
    /// records first, the outbox for whatever follows them (or for
    /// everything, where nothing continues the topic). Returns them, and how
    /// many came from memory.
    async fn pending_records(
        &self,
        after: &mut [(String, i32, i64)],
    ) -> anyhow::Result<(Vec<(String, i32, store::StoredRecord)>, usize)> {
        let mut records = Vec::new();
        {
            let mut offered = self.offered.lock().expect("relay lock");
            for (topic, partition, published) in after.iter_mut() {
                let taken = offered.take_after(topic, *partition, *published);
                if let Some(last) = taken.last() {
                    *published = last.seq;
                }
                records.extend(taken.into_iter().map(|r| (topic.clone(), *partition, r)));
            }
        }
        let from_memory = records.len();
        let per_partition = (ROUND_LIMIT / after.len().max(1) as i64).max(ROUND_MIN_PER_PARTITION);
        let bytes_per_partition = (ROUND_BYTES / after.len().max(1) as i64).max(ROUND_MIN_BYTES_PER_PARTITION);
        records.extend(store::pending_many(&self.pool, after, per_partition, bytes_per_partition).await?);
        Ok((records, from_memory))
    }

    /// The records of partitions still owned: a revocation during the
    /// reads takes effect now.
    fn still_owned(&self, records: Vec<(String, i32, store::StoredRecord)>) -> Vec<(String, i32, store::StoredRecord)> {
        let owned: HashSet<(String, i32)> = self.owned.lock().expect("relay lock").keys().cloned().collect();
        records
            .into_iter()
            .filter(|(topic, partition, _)| owned.contains(&(topic.clone(), *partition)))
            .collect()
    }

    /// Hands the records to the producer, in order; after a partition's
    /// first failure its later records are not sent (`None`).
    async fn enqueue(
        &self,
        records: &[(String, i32, store::StoredRecord)],
        failed: &mut HashMap<(String, i32), anyhow::Error>,
    ) -> Vec<Option<DeliveryFuture>> {
        let mut deliveries = Vec::with_capacity(records.len());
        for (topic, partition, record) in records {
            let key = (topic.clone(), *partition);
            if failed.contains_key(&key) {
                deliveries.push(None);
                continue;
            }
            match self.send(topic, *partition, record).await {
                Ok(delivery) => deliveries.push(Some(delivery)),
                Err(e) => {
                    if let Some(kafka) = e.downcast_ref::<rdkafka::error::KafkaError>() {
                        self.errors.count(kafka);
                    }
                    failed.insert(
                        key,
                        e.context(format!("publishing seq {} to {topic}/{partition}", record.seq)),
                    );
                    deliveries.push(None);
                }
            }
        }
        deliveries
    }

    /// Where a partition with a failed delivery stands is unknown: it is
    /// read back from the topic before it is published again. A partition
    /// the round went through without a failure is well again, whether or
    /// not it had anything to publish.
    fn conclude_failures(
        &self,
        after: &[(String, i32, i64)],
        failed: &HashMap<(String, i32), anyhow::Error>,
        last: &mut HashMap<(String, i32), i64>,
    ) {
        for ((topic, partition), error) in failed {
            last.remove(&(topic.clone(), *partition));
            self.failed(topic, *partition, error);
        }
        let mut failing = self.failing.lock().expect("relay lock");
        for (topic, partition, _) in after {
            let key = (topic.clone(), *partition);
            if !failed.contains_key(&key) {
                failing.remove(&key);
            }
        }
    }

    /// Claims a partition (once per assignment) and reads back where its
    /// topic stands.
    async fn take_over(&self, topic: &str, partition: i32) -> anyhow::Result<i64> {
        let key = (topic.to_owned(), partition);
        if !self.claimed.lock().expect("relay lock").contains(&key) {
            // Claimed before the topic is read: a former owner's round in
            // flight ends first, and it publishes nothing here after.
            store::claim_partition(&self.pool, topic, partition, &self.instance).await?;
            self.claimed.lock().expect("relay lock").insert(key);
        }
        let seq = self.resync(topic, partition).await?;
        self.set_published(topic, partition, seq);
        Ok(seq)
    }

    async fn send(&self, topic: &str, partition: i32, record: &store::StoredRecord) -> anyhow::Result<DeliveryFuture> {
        let seq = record.seq.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 1);
        for (k, v) in &record.headers {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        headers = headers.insert(Header {
            key: crate::kafka::record_size::OUTBOX_SEQ_HEADER,
            value: Some(seq.as_bytes()),
        });
        let mut future = FutureRecord::to(topic)
            .partition(partition)
            .payload(&record.payload)
            .headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        // The queue is full only with an abandoned round's records still in
        // it. The wait yields, so that a shutdown's deadline still cuts the
        // round short.
        send_with_retry_async(&self.producer, future, Duration::from_millis(5))
            .await
            .context("enqueueing an outbox record")
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

/// Waits for every delivery of a round before anything is concluded (a
/// record still in the producer's queue may yet reach the topic); returns
/// the last sequence delivered per partition, and adds the partitions whose
/// delivery failed to `failed`.
async fn settle(
    records: &[(String, i32, store::StoredRecord)],
    deliveries: Vec<Option<DeliveryFuture>>,
    failed: &mut HashMap<(String, i32), anyhow::Error>,
    errors: &ErrorCounter,
) -> HashMap<(String, i32), i64> {
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
    for ((topic, partition, record), delivery) in records.iter().zip(deliveries) {
        let Some(delivery) = delivery else {
            continue;
        };
        let result = delivery
            .await
            .map_err(|_| anyhow::anyhow!("producer dropped a delivery"))
            .and_then(|r| {
                r.map_err(|(e, _)| {
                    errors.count(&e);
                    anyhow::Error::from(e)
                })
            });
        let key = (topic.clone(), *partition);
        if failed.contains_key(&key) {
            continue;
        }
        match result {
            Ok(_) => {
                last.insert(key, record.seq);
            }
            Err(e) => {
                failed.insert(
                    key,
                    e.context(format!("delivering seq {} to {topic}/{partition}", record.seq)),
                );
            }
        }
    }
    last
}

/// The `outbox-seq` of the last record of a partition, if any: the highest
/// among the records from where ListOffsets says the partition ends, less
/// one, to where a fetch finds it ends. On Apache Kafka that is the last
/// record alone; a broker that reports less than it holds (tansu) yields
/// more, and taking only the first of them would publish again what is
/// already there.
fn last_outbox_seq(config: &ClientConfig, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
    let consumer = crate::kafka::ends::end_reader(config)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| format!("reading watermarks of {topic}/{partition}"))?;
    if high <= low {
        return Ok(None);
    }
    let mut last: Option<i64> = None;
    let mut unmarked = 0;
    crate::kafka::ends::read_to_end(
        &consumer,
        topic,
        &[(partition, high - 1)],
        Duration::from_secs(30),
        |message| {
            let headers = crate::kafka::headers::of_borrowed(message);
            match headers.text("outbox-seq").and_then(|v| v.parse::<i64>().ok()) {
                Some(seq) => last = Some(last.map_or(seq, |l| l.max(seq))),
                None => unmarked += 1,
            }
        },
    )
    .with_context(|| format!("reading the last record of {topic}/{partition}"))?;
    if unmarked > 0 {
        tracing::warn!(
            topic,
            partition,
            unmarked,
            "records at the end of the partition have no outbox-seq header (not ours?)"
        );
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32) -> store::OutboxRecord {
        store::OutboxRecord {
            topic: "usage-results".into(),
            partition,
            key: None,
            payload: b"{}".to_vec(),
            headers: Default::default(),
            source: None,
        }
    }

    fn seqs(records: &[store::StoredRecord]) -> Vec<i64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn offered_records_that_continue_the_topic_go_out_from_memory() {
        let mut offered = Offered::default();
        for seq in 4..=6 {
            offered.push(seq, record(0));
        }
        assert_eq!(seqs(&offered.take_after("usage-results", 0, 3)), [4, 5, 6]);
        assert_eq!(offered.count, 0);
    }

    #[test]
    fn offered_records_the_topic_already_holds_are_skipped() {
        let mut offered = Offered::default();
        for seq in 4..=6 {
            offered.push(seq, record(0));
        }
        assert_eq!(seqs(&offered.take_after("usage-results", 0, 5)), [6]);
    }

    #[test]
    fn offered_records_after_a_gap_are_left_to_the_outbox() {
        let mut offered = Offered::default();
        offered.push(8, record(0));
        assert!(offered.take_after("usage-results", 0, 6).is_empty());
        assert_eq!(offered.count, 0);
    }

    #[test]
    fn a_gap_between_offers_drops_what_came_before_it() {
        let mut offered = Offered::default();
        offered.push(4, record(0));
        offered.push(6, record(0));
        assert_eq!(offered.count, 1);
        assert!(offered.take_after("usage-results", 0, 3).is_empty());
    }

    #[test]
    fn forgetting_a_partition_keeps_the_others() {
        let mut offered = Offered::default();
        offered.push(1, record(0));
        offered.push(1, record(1));
        offered.forget(&[0]);
        assert_eq!(offered.count, 1);
        assert!(offered.take_after("usage-results", 0, 0).is_empty());
        assert_eq!(seqs(&offered.take_after("usage-results", 1, 0)), [1]);
    }
}
