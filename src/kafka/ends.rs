//! Where a partition really ends. ListOffsets ("latest", what
//! `fetch_watermarks` and `offsets_for_times` ask) is trusted by Apache Kafka
//! and librdkafka's mock to be the end, but some Kafka-compatible brokers
//! answer less: tansu 0.6 answers one past the first offset of the last
//! batch it stored, while it serves the records after it (see
//! docs/brokers.md). A fetch's high watermark is right on all of them, so
//! the end is confirmed by reading forward from the reported one until the
//! broker says the partition is at its end (`enable.partition.eof`).
//!
//! Where the reported end is the real end, that is one fetch at the last
//! record and one more that comes back empty at once (`fetch.wait.max.ms`
//! is 0): no waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

/// A reader of partition ends. rdkafka hands every consumer error to the
/// client context as well as to `poll`; the default context logs them all as
/// errors, and reaching the end of a partition is what this reader is for.
pub type EndConsumer = BaseConsumer<EndsContext>;

pub struct EndsContext;

impl ClientContext for EndsContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error != KafkaError::Global(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(error = %error, reason, "reader of partition ends");
        }
    }
}

impl ConsumerContext for EndsContext {}

/// A reader of partition ends, from a reader's config.
pub fn end_reader(reader: &ClientConfig) -> anyhow::Result<EndConsumer> {
    end_reader_config(reader)
        .create_with_context(EndsContext)
        .context("creating a reader of partition ends")
}

/// The config of a reader of partition ends, made from a reader's config.
fn end_reader_config(reader: &ClientConfig) -> ClientConfig {
    let mut config = reader.clone();
    config
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        // An offset no longer on the topic (retention) is past: the end is
        // after it.
        .set("auto.offset.reset", "latest")
        // A fetch at the end is answered at once instead of after the wait.
        .set("fetch.wait.max.ms", "0");
    config
}

/// Reads the given partitions of one topic forward from `from` (each an
/// offset at or before the partition's end, where a batch starts: the end
/// ListOffsets reported, less one) until the broker reports each at its
/// end; hands every message read to `visit`. Returns each partition's end:
/// the offset after the last record, never less than `from`.
///
/// The consumer must come from [`end_reader`] and be used for one
/// topic only (an end-of-partition event names the partition, not the
/// topic). It is unassigned again before this returns.
pub fn read_to_end(
    consumer: &EndConsumer,
    topic: &str,
    from: &[(i32, i64)],
    timeout: Duration,
    mut visit: impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<HashMap<i32, i64>> {
    start(consumer, topic, from)?;
    finish(consumer, topic, from, Instant::now() + timeout, &mut visit)
}

/// Assigns the partitions at their starting offsets: the broker starts
/// fetching. Several topics' consumers can be started before any is
/// finished, so that their reads overlap.
pub fn start(consumer: &EndConsumer, topic: &str, from: &[(i32, i64)]) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in from.iter().filter(|(_, offset)| *offset >= 0) {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer
        .assign(&tpl)
        .with_context(|| format!("assigning {topic} to read its end"))
}

/// Polls a consumer [`start`]ed on these partitions until each is at its
/// end, then unassigns it.
pub fn finish(
    consumer: &EndConsumer,
    topic: &str,
    from: &[(i32, i64)],
    deadline: Instant,
    visit: &mut impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<HashMap<i32, i64>> {
    let mut ends: HashMap<i32, i64> = from.iter().map(|(p, o)| (*p, (*o).max(0))).collect();
    // A partition asked from offset -1 (an empty partition) has nothing to read.
    let mut pending: Vec<i32> = from.iter().filter(|(_, o)| *o >= 0).map(|(p, _)| *p).collect();
    let result = loop {
        if pending.is_empty() {
            break Ok(ends);
        }
        let now = Instant::now();
        if now >= deadline {
            break Err(anyhow::anyhow!(
                "timed out reading to the end of {topic} partitions {pending:?}"
            ));
        }
        match consumer.poll(deadline - now) {
            Some(Ok(message)) => {
                let end = ends.entry(message.partition()).or_default();
                *end = (*end).max(message.offset() + 1);
                visit(&message);
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => pending.retain(|p| *p != partition),
            Some(Err(e)) => tracing::warn!(topic, error = %e, "reading to the end of a partition"),
            None => {}
        }
    };
    let _ = consumer.unassign();
    result
}

/// The end of each partition of each topic: ListOffsets' answer, confirmed
/// by reading forward from it (one consumer per topic, started together so
/// that their reads overlap).
pub struct EndReader {
    config: ClientConfig,
    /// Asks ListOffsets for every partition at once.
    offsets: EndConsumer,
    readers: std::sync::Mutex<HashMap<String, EndConsumer>>,
}

impl EndReader {
    pub fn new(reader: &ClientConfig) -> anyhow::Result<Self> {
        Ok(Self {
            offsets: end_reader(reader)?,
            config: reader.clone(),
            readers: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// What ListOffsets reports as the ends (right on Apache Kafka and the
    /// mock), in one request per broker. Blocks.
    pub fn reported(&self, topics: &[(&str, i32)], timeout: Duration) -> anyhow::Result<Vec<HashMap<i32, i64>>> {
        reported_ends(&self.offsets, topics, timeout)
    }

    /// The ends of every partition of the given (topic, partition count)s,
    /// in the same order. Blocks.
    pub fn ends(&self, topics: &[(&str, i32)], timeout: Duration) -> anyhow::Result<Vec<HashMap<i32, i64>>> {
        let deadline = Instant::now() + timeout;
        let reported = reported_ends(&self.offsets, topics, timeout)?;
        let mut readers = self.readers.lock().expect("end readers lock");
        for (topic, _) in topics {
            if !readers.contains_key(*topic) {
                let consumer =
                    end_reader(&self.config).with_context(|| format!("creating a reader of the end of {topic}"))?;
                readers.insert(topic.to_string(), consumer);
            }
        }
        let from: Vec<Vec<(i32, i64)>> = reported
            .iter()
            .map(|highs| {
                let mut from: Vec<(i32, i64)> = highs.iter().map(|(p, high)| (*p, high - 1)).collect();
                from.sort_unstable();
                from
            })
            .collect();
        for ((topic, _), from) in topics.iter().zip(&from) {
            start(&readers[*topic], topic, from)?;
        }
        let mut ends = Vec::with_capacity(topics.len());
        let mut failure = None;
        for ((topic, _), from) in topics.iter().zip(&from) {
            match finish(&readers[*topic], topic, from, deadline, &mut |_| {}) {
                Ok(found) => ends.push(found),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        for (found, reported) in ends.iter_mut().zip(reported) {
            for (p, high) in reported {
                let end = found.entry(p).or_insert(high);
                *end = (*end).max(high);
            }
        }
        Ok(ends)
    }
}

/// What ListOffsets reports as the end of every partition of the topics,
/// in one request per broker.
pub fn reported_ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[(&str, i32)],
    timeout: Duration,
) -> anyhow::Result<Vec<HashMap<i32, i64>>> {
    let mut query = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for p in 0..*partitions {
            query.add_partition_offset(topic, p, Offset::End)?;
        }
    }
    let answer = consumer
        .offsets_for_times(query, timeout)
        .context("reading the ends of partitions")?;
    topics
        .iter()
        .map(|(topic, partitions)| {
            (0..*partitions)
                .map(|p| {
                    let element = answer
                        .find_partition(topic, p)
                        .with_context(|| format!("no end reported for {topic}/{p}"))?;
                    element
                        .error()
                        .with_context(|| format!("reading the end of {topic}/{p}"))?;
                    match element.offset() {
                        Offset::Offset(high) => Ok((p, high)),
                        other => bail!("unexpected end {other:?} for {topic}/{p}"),
                    }
                })
                .collect()
        })
        .collect()
}
