//! A whole topic read back from its beginning and decoded, record by record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use serde_json::Value;
use usage_worker::embedded::{json_payload, TopicReader};

/// One published record, decoded.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    /// The payload as JSON, or `Null` when it is not JSON (dead letters).
    pub value: Value,
    pub payload: Vec<u8>,
}

impl From<&OwnedMessage> for Record {
    fn from(m: &OwnedMessage) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            value: json_payload(m),
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// Reads a topic from the beginning, all partitions; panics on a read
/// error (a test's reader).
pub struct Reader {
    topic: TopicReader,
}

impl Reader {
    pub fn new(bootstrap: &str, topic: &str, partitions: i32) -> Self {
        Self {
            topic: TopicReader::open(bootstrap, topic, partitions).expect("a topic reader"),
        }
    }

    /// Reads until `count` records arrived (panics after `timeout`).
    pub fn read(&self, count: usize, timeout: Duration) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        while records.len() < count {
            assert!(
                Instant::now() < deadline,
                "timed out: {} of {count} records read: {records:#?}",
                records.len()
            );
            if let Some(m) = self.topic.next(Duration::from_millis(100)).expect("reading a topic") {
                records.push(Record::from(&m));
            }
        }
        records
    }

    /// Whatever else arrives within `quiet`.
    pub fn read_rest(&self, quiet: Duration) -> Vec<Record> {
        let rest = self.topic.until_quiet(quiet).expect("reading a topic");
        rest.iter().map(Record::from).collect()
    }
}
