//! Readers of the output topics, each in its own thread, from the first
//! record. They check what a consumer of the topic would rely on:
//! - one outcome per input offset (or one alert per alert id, one period
//!   record per period and type); a correction's outcome is one like any
//!   other: it names its input offset in `source`, and its `eventId` (the
//!   corrected usage) plays no part in telling outcomes apart;
//! - a record that comes again with the same id, `outbox-seq` and
//!   CreateTime is the broker's repeat of a retried send (librdkafka's mock
//!   cluster, unlike Kafka, keeps an idempotent producer's retries): counted
//!   apart, never as a duplicate; with anything else different it is a real
//!   duplicate;
//! - per output partition, first copies carry `outbox-seq` 1, 2, 3, ... with
//!   no gap and no step back;
//! - with a [`Ledger`], outcomes in partition order against the usages they
//!   created, amended and voided (see `ledger.rs`). The ledger is brought
//!   up to date when it is asked for ([`ResultReader::with_ledger`]): until
//!   then what it reads of each first copy waits as text in one buffer
//!   ([`Unapplied`]), so that a timed run's reader does little more work
//!   while the clock runs than one without a ledger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use usage_worker::embedded::TopicReader;

use crate::ledger::{Ledger, Seen, SeenUsage, Status};

/// What a reader reads.
#[derive(Debug, Clone)]
pub enum Records {
    /// Outcomes, keyed by their input offset; `keep_decisions` keeps a
    /// summary of each decision for comparison with another run; `ledger`
    /// (the subscriptions' hard limits as quantities) keeps a [`Ledger`].
    Outcomes {
        keep_decisions: bool,
        ledger: Option<Arc<HashMap<String, Decimal>>>,
    },
    /// Limit alerts, keyed by alert id, summaries always kept.
    Alerts,
    /// `usage-periods` records, keyed by type, subscription and period
    /// start (so a second record of a period counts as a duplicate, whatever
    /// its record id), kept whole.
    Periods,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Source(i32, i64),
    Alert(String),
    /// Type, subscription, period start ("" for none).
    Period(String, String, String),
}

/// The first copy of a record.
struct First {
    /// Id, outbox-seq and CreateTime: a broker's repeat has all three.
    identity: (String, i64, Option<i64>),
    /// What was decided, in a form that compares across runs.
    summary: Option<String>,
}

#[derive(Default)]
struct State {
    first: HashMap<Key, First>,
    broker_repeats: u64,
    duplicated: u64,
    seq_breaks: u64,
    last_seq: HashMap<i32, i64>,
    examples: Vec<String>,
    latencies_ms: Vec<f64>,
    error: Option<String>,
    ledger: Option<Ledger>,
    /// First copies of outcomes not yet applied to the ledger, in the order
    /// read (each partition's in its order).
    unapplied: Unapplied,
    periods: HashMap<Key, PeriodRecord>,
}

impl State {
    /// Applies the outcomes read since the last call to the ledger.
    fn bring_ledger_up_to_date(&mut self) {
        let Some(ledger) = self.ledger.as_mut() else {
            return;
        };
        let unapplied = std::mem::take(&mut self.unapplied);
        for text in unapplied.iter() {
            match text.seen() {
                Ok(seen) => ledger.apply(&seen),
                Err(e) => {
                    let (partition, offset) = text.at;
                    self.error
                        .get_or_insert(format!("the outcome of input {partition}/{offset}: {e}"));
                }
            }
        }
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

pub struct ResultReader {
    topic: String,
    received: Arc<AtomicU64>,
    /// Every record read, repeats included.
    consumed: Arc<AtomicU64>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a reader found against the input's high watermarks.
#[derive(Debug, Default, Clone)]
pub struct Check {
    pub inputs: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub broker_repeats: u64,
    /// Records whose outbox-seq did not follow the previous one.
    pub seq_breaks: u64,
    pub examples: Vec<String>,
    pub error: Option<String>,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.seq_breaks == 0 && self.error.is_none()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Outcome {
    status: String,
    event_id: Option<String>,
    source: Source,
    error: Option<ErrorCode>,
    usage: Option<Usage>,
    partial: Option<bool>,
    previous_quantity: Option<Box<RawValue>>,
    requested_quantity: Option<Box<RawValue>>,
    limit: Option<LimitBlock>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LimitBlock {
    period_start_time: Option<String>,
}

#[derive(Deserialize)]
struct Source {
    partition: i32,
    offset: i64,
    timestamp: Option<String>,
}

#[derive(Deserialize)]
struct ErrorCode {
    code: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Usage {
    id: String,
    subscription_id: String,
    quantity: Box<RawValue>,
    usage_time: String,
}

/// A JSON number read exactly, from its text.
fn exact(text: &str) -> Result<Decimal, String> {
    text.parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(text))
        .map_err(|e| format!("{text} is not an exact decimal: {e}"))
}

fn time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{text}: {e}"))
}

/// What the ledger reads of an outcome, as the outcome spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LedgerText<'a> {
    /// The input partition and offset (`source`).
    at: (i32, i64),
    status: &'a str,
    code: Option<&'a str>,
    usage: Option<UsageText<'a>>,
    previous_quantity: Option<&'a str>,
    period_start: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UsageText<'a> {
    id: &'a str,
    subscription_id: &'a str,
    quantity: &'a str,
    usage_time: &'a str,
}

impl LedgerText<'_> {
    /// What the ledger reads of it.
    fn seen(&self) -> Result<Seen, String> {
        let status = Status::parse(self.status).ok_or_else(|| format!("unknown status {}", self.status))?;
        let usage = match &self.usage {
            Some(u) => Some(SeenUsage {
                id: u.id.to_owned(),
                subscription_id: u.subscription_id.to_owned(),
                quantity: exact(u.quantity)?,
                usage_time: time(u.usage_time)?,
            }),
            None => None,
        };
        Ok(Seen {
            status,
            code: self.code.map(str::to_owned),
            usage,
            previous_quantity: self.previous_quantity.map(exact).transpose()?,
            period_start: self.period_start.map(time).transpose()?,
        })
    }
}

/// Outcomes waiting for the ledger: what it reads of each ([`LedgerText`]),
/// one after the other in one buffer, every text as its length (`u32::MAX`
/// for none) and its bytes. Keeping an outcome costs a copy of about a
/// hundred bytes and no allocation of its own; keeping the decoded
/// outcomes cost eight allocations each, and the page faults of the memory
/// they held, on the bench's clock.
#[derive(Debug, Default)]
struct Unapplied {
    bytes: Vec<u8>,
}

/// The length that stands for no text.
const NO_TEXT: u32 = u32::MAX;

impl Unapplied {
    fn push(&mut self, text: &LedgerText<'_>) {
        self.bytes.extend_from_slice(&text.at.0.to_le_bytes());
        self.bytes.extend_from_slice(&text.at.1.to_le_bytes());
        let usage = text.usage.as_ref();
        for field in [
            Some(text.status),
            text.code,
            usage.map(|u| u.id),
            usage.map(|u| u.subscription_id),
            usage.map(|u| u.quantity),
            usage.map(|u| u.usage_time),
            text.previous_quantity,
            text.period_start,
        ] {
            match field {
                Some(field) => {
                    let len = u32::try_from(field.len()).ok().filter(|&l| l != NO_TEXT);
                    self.bytes
                        .extend_from_slice(&len.expect("a field under 4 GiB").to_le_bytes());
                    self.bytes.extend_from_slice(field.as_bytes());
                }
                None => self.bytes.extend_from_slice(&NO_TEXT.to_le_bytes()),
            }
        }
    }

    /// The outcomes, in the order they were kept.
    fn iter(&self) -> impl Iterator<Item = LedgerText<'_>> {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let partition = i32::from_le_bytes(take(&mut rest, 4).try_into().expect("4 bytes"));
            let offset = i64::from_le_bytes(take(&mut rest, 8).try_into().expect("8 bytes"));
            let mut text = || {
                let len = u32::from_le_bytes(take(&mut rest, 4).try_into().expect("4 bytes"));
                (len != NO_TEXT).then(|| std::str::from_utf8(take(&mut rest, len as usize)).expect("kept from a str"))
            };
            let status = text().expect("a status is always kept");
            let code = text();
            let usage = match (text(), text(), text(), text()) {
                (Some(id), Some(subscription_id), Some(quantity), Some(usage_time)) => Some(UsageText {
                    id,
                    subscription_id,
                    quantity,
                    usage_time,
                }),
                _ => None,
            };
            Some(LedgerText {
                at: (partition, offset),
                status,
                code,
                usage,
                previous_quantity: text(),
                period_start: text(),
            })
        })
    }
}

/// The first `n` bytes of `rest`, which moves past them.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    head
}

impl Outcome {
    /// What the ledger reads of it.
    fn ledger_text(&self) -> LedgerText<'_> {
        LedgerText {
            at: (self.source.partition, self.source.offset),
            status: &self.status,
            code: self.error.as_ref().map(|e| e.code.as_str()),
            usage: self.usage.as_ref().map(|u| UsageText {
                id: &u.id,
                subscription_id: &u.subscription_id,
                quantity: u.quantity.get(),
                usage_time: &u.usage_time,
            }),
            previous_quantity: self.previous_quantity.as_deref().map(RawValue::get),
            period_start: self.limit.as_ref().and_then(|l| l.period_start_time.as_deref()),
        }
    }

    /// What was decided, in a form that compares across runs: the status,
    /// the code, the usage named and its quantity, and for corrections the
    /// quantities before and asked.
    fn summary(&self) -> String {
        let event = self
            .event_id
            .as_deref()
            .map(|e| format!(" event {e}"))
            .unwrap_or_default();
        let usage = self
            .usage
            .as_ref()
            .map(|u| format!(" usage {} quantity {}", u.id, u.quantity.get()))
            .unwrap_or_default();
        let code = self.error.as_ref().map(|e| format!(" {}", e.code)).unwrap_or_default();
        let partial = if self.partial == Some(true) { " partial" } else { "" };
        let previous = self
            .previous_quantity
            .as_ref()
            .map(|q| format!(" previous {}", q.get()))
            .unwrap_or_default();
        let requested = self
            .requested_quantity
            .as_ref()
            .map(|q| format!(" requested {}", q.get()))
            .unwrap_or_default();
        format!("{}{code}{event}{usage}{partial}{previous}{requested}", self.status)
    }
}

/// A `usage-periods` record, every field of it (an unknown field fails the
/// read: the body is exactly the contract's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodRecord {
    pub kind: String,
    pub subscription_id: String,
    pub period_start_time: Option<String>,
    pub period_end_time: String,
    pub closed_time: String,
    pub closed_by: String,
    pub invoice_id: Option<String>,
    pub usage_count: u64,
    pub quantity: Decimal,
    pub amount: Option<Decimal>,
    pub currency: Option<String>,
    pub voided_count: u64,
    pub digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeriodBody {
    #[serde(rename = "type")]
    kind: String,
    subscription_id: String,
    period_start_time: Option<String>,
    period_end_time: String,
    closed_time: String,
    closed_by: String,
    invoice_id: Option<String>,
    usage_count: u64,
    quantity: Box<RawValue>,
    amount: Option<Box<RawValue>>,
    currency: Option<String>,
    voided_count: u64,
    digest: String,
}

impl PeriodRecord {
    fn parse(payload: &[u8]) -> Result<Self, String> {
        let b: PeriodBody = serde_json::from_slice(payload).map_err(|e| format!("unreadable period record: {e}"))?;
        Ok(Self {
            quantity: exact(b.quantity.get())?,
            amount: b.amount.as_deref().map(|a| exact(a.get())).transpose()?,
            kind: b.kind,
            subscription_id: b.subscription_id,
            period_start_time: b.period_start_time,
            period_end_time: b.period_end_time,
            closed_time: b.closed_time,
            closed_by: b.closed_by,
            invoice_id: b.invoice_id,
            usage_count: b.usage_count,
            currency: b.currency,
            voided_count: b.voided_count,
            digest: b.digest,
        })
    }

    pub fn start(&self) -> Result<Option<DateTime<Utc>>, String> {
        self.period_start_time.as_deref().map(time).transpose()
    }

    pub fn end(&self) -> Result<DateTime<Utc>, String> {
        time(&self.period_end_time)
    }

    pub fn closed(&self) -> Result<DateTime<Utc>, String> {
        time(&self.closed_time)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alert {
    alert_id: String,
    #[serde(rename = "type")]
    kind: String,
    subscription_id: String,
    threshold: u8,
    /// Absent for an amount limit, whose amounts the summary then carries.
    #[serde(default)]
    limit: serde_json::Value,
    used: serde_json::Value,
    #[serde(default)]
    limit_amount: serde_json::Value,
    #[serde(default)]
    used_amount: serde_json::Value,
    usage_id: String,
}

impl ResultReader {
    pub fn start(bootstrap: &str, topic: &str, partitions: i32, records: Records) -> anyhow::Result<Self> {
        let reader = TopicReader::open(bootstrap, topic, partitions)?;
        let received = Arc::new(AtomicU64::new(0));
        let consumed = Arc::new(AtomicU64::new(0));
        let ledger = match &records {
            Records::Outcomes {
                ledger: Some(limits), ..
            } => Some(Ledger::new(limits.clone())),
            _ => None,
        };
        let state = Arc::new(Mutex::new(State {
            ledger,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, consumed, state, stop) = (received.clone(), consumed.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match reader.poll(Duration::from_millis(50)) {
                        Ok(Some(m)) => {
                            consumed.fetch_add(1, Ordering::Relaxed);
                            let mut st = state.lock().unwrap();
                            match read(&m, &records, &mut st) {
                                Ok(true) => {
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    let e = format!("{}/{}: {e}", m.partition(), m.offset());
                                    st.error.get_or_insert(e);
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            state.lock().unwrap().error.get_or_insert(format!("{e:#}"));
                        }
                    }
                }
            })
        };
        Ok(Self {
            topic: topic.to_owned(),
            received,
            consumed,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// First copies read so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until it has read every record now on its topic (`highs`, the
    /// topic's high watermarks, read once its writers have stopped).
    pub fn wait_for(&self, highs: &[i64], limit: Duration) -> anyhow::Result<()> {
        let total = highs.iter().sum::<i64>() as u64;
        let start = std::time::Instant::now();
        while self.consumed.load(Ordering::Relaxed) < total {
            anyhow::ensure!(
                start.elapsed() < limit,
                "{}: read {} of its {total} records",
                self.topic,
                self.consumed.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn start_latency_window(&self) {
        self.state.lock().unwrap().latencies_ms.clear();
    }

    pub fn take_latencies(&self) -> Vec<f64> {
        std::mem::take(&mut self.state.lock().unwrap().latencies_ms)
    }

    /// Runs `f` on the ledger, if the reader keeps one, once it has applied
    /// every outcome read so far.
    pub fn with_ledger<R>(&self, f: impl FnOnce(&Ledger) -> R) -> Option<R> {
        let mut state = self.state.lock().unwrap();
        state.bring_ledger_up_to_date();
        state.ledger.as_ref().map(f)
    }

    /// The period records read (first copies), by type, subscription and
    /// period start.
    pub fn period_records(&self) -> HashMap<Key, PeriodRecord> {
        self.state.lock().unwrap().periods.clone()
    }

    /// The summaries of the first copies (with `keep_decisions`, or alerts).
    pub fn summaries(&self) -> HashMap<Key, String> {
        let state = self.state.lock().unwrap();
        state
            .first
            .iter()
            .filter_map(|(k, f)| f.summary.clone().map(|s| (k.clone(), s)))
            .collect()
    }

    /// Outcomes: exactly one per offset below each input partition's high
    /// watermark. Alerts: pass the input watermarks as empty.
    pub fn check(&self, input_highs: &[i64]) -> Check {
        let mut state = self.state.lock().unwrap();
        // An outcome the ledger cannot read is an error of the read.
        state.bring_ledger_up_to_date();
        let mut check = Check {
            inputs: input_highs.iter().sum::<i64>() as u64,
            duplicated: state.duplicated,
            broker_repeats: state.broker_repeats,
            seq_breaks: state.seq_breaks,
            examples: state.examples.clone(),
            error: state.error.clone().map(|e| format!("{}: {e}", self.topic)),
            ..Check::default()
        };
        for (p, high) in input_highs.iter().enumerate() {
            for offset in 0..*high {
                if !state.first.contains_key(&Key::Source(p as i32, offset)) {
                    check.missing += 1;
                    if check.examples.len() < 10 {
                        check.examples.push(format!("no outcome for input {p}/{offset}"));
                    }
                }
            }
        }
        let beyond = state
            .first
            .keys()
            .filter(|k| matches!(k, Key::Source(p, o) if input_highs.get(*p as usize).is_none_or(|h| o >= h)))
            .count();
        if beyond > 0 {
            check.error.get_or_insert(format!(
                "{}: {beyond} outcomes for offsets not on the input",
                self.topic
            ));
        }
        check
    }
}

/// Reads one record into the state; true for a first copy.
fn read(m: &BorrowedMessage<'_>, records: &Records, st: &mut State) -> Result<bool, String> {
    let headers = usage_worker::kafka::headers::of_borrowed(m);
    let header = |name: &str| headers.text(name).map(str::to_owned);
    let seq: i64 = header("outbox-seq")
        .and_then(|s| s.parse().ok())
        .ok_or("no outbox-seq header")?;
    let payload = m.payload().ok_or("no payload")?;
    // What a first copy adds to the ledger or the period records.
    let mut outcome = None;
    let mut period = None;
    let (key, id, summary) = match records {
        Records::Outcomes { keep_decisions, ledger } => {
            let o: Outcome = serde_json::from_slice(payload).map_err(|e| format!("unreadable outcome: {e}"))?;
            if let Some(sent) = o.source.timestamp.as_deref() {
                let sent = chrono::DateTime::parse_from_rfc3339(sent).map_err(|e| format!("source.timestamp: {e}"))?;
                let ms = (Utc::now() - sent.with_timezone(&Utc)).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                st.latencies_ms.push(ms);
            }
            let summary = keep_decisions.then(|| o.summary());
            if o.source.partition != m.partition() {
                return Err(format!(
                    "the outcome of input partition {} is on partition {}",
                    o.source.partition,
                    m.partition()
                ));
            }
            let id = header("outcome-id").ok_or("no outcome-id header")?;
            let key = Key::Source(o.source.partition, o.source.offset);
            if ledger.is_some() {
                outcome = Some(o);
            }
            (key, id, summary)
        }
        Records::Alerts => {
            let a: Alert = serde_json::from_slice(payload).map_err(|e| format!("unreadable alert: {e}"))?;
            let summary = format!(
                "{} {} at {} limit {} used {} amounts {}/{} by {}",
                a.kind, a.subscription_id, a.threshold, a.limit, a.used, a.used_amount, a.limit_amount, a.usage_id
            );
            (Key::Alert(a.alert_id.clone()), a.alert_id, Some(summary))
        }
        Records::Periods => {
            let r = PeriodRecord::parse(payload)?;
            let id = header("record-id").ok_or("no record-id header")?;
            let key = Key::Period(
                r.kind.clone(),
                r.subscription_id.clone(),
                r.period_start_time.clone().unwrap_or_default(),
            );
            let summary = format!("{r:?}");
            period = Some(r);
            (key, id, Some(summary))
        }
    };
    let identity = (id, seq, m.timestamp().to_millis());
    if let Some(first) = st.first.get(&key) {
        if first.identity == identity {
            st.broker_repeats += 1;
        } else {
            st.duplicated += 1;
            let what = format!(
                "{key:?} again at {}/{} ({identity:?}, first {:?})",
                m.partition(),
                m.offset(),
                first.identity
            );
            st.example(what);
        }
        return Ok(false);
    }
    let last = st.last_seq.entry(m.partition()).or_insert(0);
    if seq != *last + 1 {
        let what = format!("outbox-seq {seq} after {last} at {}/{}", m.partition(), m.offset());
        *last = seq;
        st.seq_breaks += 1;
        st.example(what);
    } else {
        *last = seq;
    }
    if let Some(outcome) = outcome {
        st.unapplied.push(&outcome.ledger_text());
    }
    if let Some(record) = period {
        st.periods.insert(key.clone(), record);
    }
    st.first.insert(key, First { identity, summary });
    Ok(true)
}

impl Drop for ResultReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// High watermarks of every partition of a topic: where each really ends
/// (read to the end, as some brokers' ListOffsets reports less).
pub fn high_watermarks(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "usage-worker-ends")
        .set("log_level", "3");
    let ends = usage_worker::kafka::ends::EndReader::new(&config)?;
    let ends = ends.ends(&[(topic, partitions)], Duration::from_secs(60))?;
    Ok((0..partitions).map(|p| ends[0][&p]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// An amendment's outcome as the worker writes it (SPEC: a
    /// correction's eventId is the usage's; previousQuantity on top).
    const AMENDED: &str = r#"{"outcomeId": "oc_1", "eventId": "b7", "status": "amended", "partial": false,
        "requestedQuantity": 999999999999.999, "previousQuantity": 0.1,
        "subscriptionId": "sub_1",
        "usage": {"id": "b7", "subscriptionId": "sub_1", "quantity": 999999999999.999,
                  "usageTime": "2026-12-06T10:00:00.123Z", "invoiceId": null, "invoiceItemId": null,
                  "createdTime": "2026-12-06T10:00:00.200Z", "updatedTime": "2026-12-06T10:01:00.000Z",
                  "_links": [{"href": "/usages/b7", "rel": "self"}]},
        "limit": {"applied": "hardLimit", "limit": 1000000000000, "used": 999999999999.999, "available": 0.001,
                  "periodStartTime": "2026-12-01T00:00:00.000Z", "periodEndTime": null},
        "source": {"topic": "usage-events", "partition": 3, "offset": 17, "timestamp": "2026-12-06T10:01:00.000Z"},
        "processedTime": "2026-12-06T10:01:00.010Z"}"#;

    #[test]
    fn a_correction_is_read_exactly_and_summarised_with_its_quantities() {
        let o: Outcome = serde_json::from_str(AMENDED).unwrap();
        assert_eq!((o.source.partition, o.source.offset), (3, 17));
        let seen = o.ledger_text().seen().unwrap();
        assert_eq!(seen.status, Status::Amended);
        // Beyond what a double holds: read from the text.
        assert_eq!(seen.usage.as_ref().unwrap().quantity, d("999999999999.999"));
        assert_eq!(seen.previous_quantity, Some(d("0.1")));
        assert_eq!(
            seen.period_start,
            Some(
                DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
        assert_eq!(
            o.summary(),
            "amended event b7 usage b7 quantity 999999999999.999 previous 0.1 requested 999999999999.999"
        );
    }

    #[test]
    fn outcomes_kept_for_the_ledger_come_back_as_they_were_read() {
        let amended: Outcome = serde_json::from_str(AMENDED).unwrap();
        let rejected: Outcome = serde_json::from_str(
            r#"{"status": "rejected", "error": {"code": "usage_not_found"},
                "source": {"partition": 11, "offset": 9000000000}}"#,
        )
        .unwrap();
        let odd = LedgerText {
            at: (-1, -1),
            status: "",
            code: Some(""),
            usage: Some(UsageText {
                id: "ü",
                subscription_id: "",
                quantity: "1e3",
                usage_time: "",
            }),
            previous_quantity: None,
            period_start: Some(""),
        };
        let texts = [
            amended.ledger_text(),
            rejected.ledger_text(),
            odd,
            amended.ledger_text(),
        ];
        let mut kept = Unapplied::default();
        for text in &texts {
            kept.push(text);
        }
        assert_eq!(kept.iter().collect::<Vec<_>>(), texts);
        assert_eq!(texts[1].usage, None);
        assert_eq!(texts[1].code, Some("usage_not_found"));
        assert_eq!(texts[1].at, (11, 9_000_000_000));
        assert_eq!(Unapplied::default().iter().count(), 0);
    }

    #[test]
    fn a_period_record_is_read_whole_and_nothing_else_is_taken_for_one() {
        let body = r#"{"type": "usage-period-closed", "subscriptionId": "sub_1",
            "periodStartTime": "2026-12-01T00:00:00.000Z", "periodEndTime": "2026-12-06T10:00:00.000Z",
            "closedTime": "2026-12-06T10:00:01.000Z", "closedBy": "grace", "invoiceId": null,
            "usageCount": 2, "quantity": 12.5, "amount": null, "currency": null, "voidedCount": 1,
            "digest": "sha256:00"}"#;
        let r = PeriodRecord::parse(body.as_bytes()).unwrap();
        assert_eq!((r.usage_count, r.quantity, r.voided_count), (2, d("12.5"), 1));
        assert_eq!(r.closed().unwrap() - r.end().unwrap(), chrono::Duration::seconds(1));
        let extra = body.replace(r#""digest""#, r#""note": 1, "digest""#);
        assert!(PeriodRecord::parse(extra.as_bytes()).is_err());
    }
}
