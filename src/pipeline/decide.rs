//! Deciding one batch of usage messages in one PostgreSQL transaction.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::domain::decision::{decide, Decision, LimitReached, StoredUsage};
use crate::domain::event::UsageRequest;
use crate::domain::outcome::{derived_event_id, kafka_outcome_id, Alert, Outcome, OutcomeStatus, Source};
use crate::domain::{ReasonCode, Rejection};
use crate::kafka::consumer::OffsetRange;
use crate::kafka::record_size::{headers_size, outbox_record_size};
use crate::store::{BatchTx, NewUsage, OffsetClaim, OutboxRecord};

/// The original bytes of a message that could not be decoded, for the DLQ.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A usage message after decoding (pure, outside the transaction).
#[derive(Debug, Clone)]
pub struct DecodedMessage {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    /// The time of the request: the message timestamp, else processing time.
    pub request_time: DateTime<Utc>,
    pub request: Result<UsageRequest, Rejection>,
    /// For a rejected message: its own valid `id` and `subscriptionId`, if any.
    pub identity: (Option<String>, Option<String>),
    /// Set for input that could not be decoded at all: it is also copied to
    /// the dead-letter topic.
    pub dead_letter: Option<RawMessage>,
}

impl DecodedMessage {
    /// The idempotency key: the request's `id`, else one derived from the
    /// message's coordinates.
    pub fn event_id(&self, topic: &str) -> String {
        match (&self.request, &self.identity.0) {
            (Ok(UsageRequest { id: Some(id), .. }), _) | (Err(_), Some(id)) => id.clone(),
            _ => derived_event_id(topic, self.partition, self.offset),
        }
    }
}

/// What stays fixed while deciding.
#[derive(Debug, Clone)]
pub struct DecideContext {
    pub group: String,
    pub input_topic: String,
    pub results_topic: String,
    pub alerts_topic: String,
    pub dead_letter_topic: String,
    pub grace: Duration,
    /// Largest record the producer can send (dead-letter copies and outcomes
    /// are sized to fit it).
    pub max_dead_letter_bytes: usize,
}

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// (status, reason code) of every decided message.
    pub decided: Vec<(OutcomeStatus, Option<ReasonCode>)>,
    pub alerts: usize,
    pub dead_letters: usize,
    /// Messages already decided by someone (a former owner, a retry).
    pub skipped: usize,
    /// Partitions whose stored offset is behind what was read: the consumer
    /// must read them again from the stored offset.
    pub reread: Vec<(i32, i64)>,
    /// The committed outbox records with their sequence numbers: the relay
    /// publishes them without reading them back.
    pub outbox: Vec<(i64, OutboxRecord)>,
}

/// Everything a batch writes besides the offsets.
#[derive(Default)]
struct Writes {
    usages: Vec<NewUsage>,
    periods: HashMap<(String, DateTime<Utc>), Decimal>,
    trial_used: HashMap<String, Decimal>,
    alerts: Vec<(String, DateTime<Utc>, String, LimitReached)>,
    outbox: Vec<OutboxRecord>,
}

/// Decides the messages (in input order) whose partitions' claims hold, and
/// commits usages, periods, alerts, outcomes and offsets together. `ranges`
/// are the consumer's positions around the batch in each partition.
/// `forced` turns every message into the given rejection (the fallback for
/// a message the database refuses).
pub async fn decide_batch(
    pool: &PgPool,
    ctx: &DecideContext,
    ranges: &[OffsetRange],
    messages: &[DecodedMessage],
    forced: Option<&Rejection>,
    now: DateTime<Utc>,
) -> anyhow::Result<BatchReport> {
    let mut report = BatchReport::default();
    let clock = std::time::Instant::now();
    let mut laps: Vec<(&str, f64)> = Vec::new();
    let mut lap = |name: &'static str| laps.push((name, clock.elapsed().as_secs_f64() * 1e3));
    let mut tx = BatchTx::begin(pool).await?;
    lap("begun");

    // 1. Claim the offsets. Only messages at or after the stored offset are
    //    still undecided; a claim that starts after it means the consumer
    //    missed some and must read again.
    let partitions: Vec<i32> = ranges.iter().map(|r| r.partition).collect();
    let stored = tx.lock_offsets(&ctx.group, &ctx.input_topic, &partitions).await?;
    let mut claims = Vec::new();
    let mut start_of: HashMap<i32, i64> = HashMap::new();
    for &OffsetRange { partition, from, to } in ranges {
        let Some(&current) = stored.get(&partition) else {
            anyhow::bail!("no stored offset for partition {partition}");
        };
        if current < from {
            report.reread.push((partition, current));
        } else if current < to {
            claims.push(OffsetClaim {
                partition,
                from_offset: current,
                to_offset: to,
            });
            start_of.insert(partition, current);
        }
    }
    let todo: Vec<&DecodedMessage> = messages
        .iter()
        .filter(|m| start_of.get(&m.partition).is_some_and(|start| m.offset >= *start))
        .collect();
    report.skipped = messages.len() - todo.len();
    if claims.is_empty() {
        return Ok(report);
    }
    lap("offsets");

    // 2. Lock and load what the decisions need, decide in input order, and
    //    store the usages. A usage id that a concurrent transaction (another
    //    lane deciding the same id from another partition, an HTTP create)
    //    inserted meanwhile is known once that transaction committed: load
    //    it and decide again, in memory, under the locks still held.
    let sub_ids: Vec<String> = todo
        .iter()
        .filter_map(|m| m.request.as_ref().ok())
        .map(|r| r.subscription_id.clone())
        .collect();
    let ids: Vec<String> = todo.iter().map(|m| m.event_id(&ctx.input_topic)).collect();
    let mut attempt = 0;
    let (writes, decided) = loop {
        attempt += 1;
        let (mut subscriptions, database_now) = if forced.is_none() {
            tx.lock_subscriptions_at(&sub_ids).await?
        } else {
            (HashMap::new(), now)
        };
        lap("locked");
        let mut usages = tx.stored_usages(&ids).await?;
        lap("loaded");
        let (writes, decided) = decide_messages(
            ctx,
            &todo,
            &ids,
            &mut subscriptions,
            &mut usages,
            forced,
            database_now,
            now,
        )?;
        lap("decided");
        let collided = tx.insert_usages(&writes.usages).await?;
        lap("usages");
        if collided.is_empty() {
            break (writes, decided);
        }
        anyhow::ensure!(
            attempt < MAX_DECIDE_ATTEMPTS,
            "usage ids {collided:?} kept colliding with concurrent inserts"
        );
        tracing::debug!(?collided, "usage ids inserted concurrently; deciding the batch again");
        tx.delete_usages(&writes.usages, &collided).await?;
    };
    report.decided = decided.statuses;
    report.alerts = decided.alerts;
    report.dead_letters = decided.dead_letters;

    // 3. Store everything else and move the offsets, together.
    let periods: Vec<(String, DateTime<Utc>, Decimal)> = writes
        .periods
        .into_iter()
        .map(|((sub, start), used)| (sub, start, used))
        .collect();
    tx.update_used(&periods).await?;
    tx.update_trial_used(&writes.trial_used.into_iter().collect::<Vec<_>>())
        .await?;
    tx.insert_alerts(&writes.alerts).await?;
    lap("periods");
    let seqs = tx.append_outbox(&writes.outbox).await?;
    lap("outbox");
    tx.advance_offsets(&ctx.group, &ctx.input_topic, &claims).await?;
    tx.commit().await?;
    lap("committed");
    report.outbox = seqs.into_iter().zip(writes.outbox).collect();
    tracing::debug!(?laps, "batch transaction");
    Ok(report)
}

/// How often a batch is decided again because usage ids it created were
/// inserted concurrently; each round learns of every id that collided.
const MAX_DECIDE_ATTEMPTS: u32 = 3;

/// What deciding the messages came to, besides the writes.
#[derive(Default)]
struct Decided {
    statuses: Vec<(OutcomeStatus, Option<ReasonCode>)>,
    alerts: usize,
    dead_letters: usize,
}

/// Decides the messages in input order against the loaded state (which it
/// updates as it goes, so that each decision sees the ones before it).
#[allow(clippy::too_many_arguments)]
fn decide_messages(
    ctx: &DecideContext,
    todo: &[&DecodedMessage],
    ids: &[String],
    subscriptions: &mut HashMap<String, crate::domain::decision::SubscriptionState>,
    usages: &mut HashMap<String, StoredUsage>,
    forced: Option<&Rejection>,
    database_now: DateTime<Utc>,
    now: DateTime<Utc>,
) -> anyhow::Result<(Writes, Decided)> {
    let mut writes = Writes::default();
    let mut decided = Decided::default();
    for (message, event_id) in todo.iter().zip(ids.iter().cloned()) {
        let source = Source::Kafka {
            topic: ctx.input_topic.clone(),
            partition: message.partition,
            offset: message.offset,
            timestamp: message.timestamp,
        };
        let outcome_id = kafka_outcome_id(&ctx.input_topic, message.partition, message.offset);
        let outcome = match (&message.request, forced) {
            (Ok(request), None) => {
                let usage_time = request.usage_time.unwrap_or(message.request_time);
                let decision = decide(
                    request,
                    usage_time,
                    usages.get(&event_id),
                    subscriptions.get_mut(&request.subscription_id),
                    database_now,
                    ctx.grace,
                );
                if let Decision::Created {
                    quantity,
                    requested_quantity,
                    period_start,
                    period_end,
                    alerts,
                    ..
                } = &decision
                {
                    let sub = &subscriptions[&request.subscription_id];
                    let period = sub
                        .periods
                        .iter()
                        .find(|p| p.start == *period_start)
                        .expect("decided period");
                    writes.periods.insert((sub.id.clone(), *period_start), period.used);
                    if sub.trial_end_time.is_some() {
                        writes.trial_used.insert(sub.id.clone(), sub.trial_used);
                    }
                    writes.usages.push(NewUsage {
                        id: event_id.clone(),
                        subscription_id: request.subscription_id.clone(),
                        quantity: *quantity,
                        requested_quantity: *requested_quantity,
                        accept_partial: request.accept_partial,
                        usage_time,
                        period_start: *period_start,
                        created_time: now,
                        source_partition: Some(message.partition),
                        source_offset: Some(message.offset),
                    });
                    // A later message of this batch with the same id is a
                    // duplicate of this one.
                    usages.insert(
                        event_id.clone(),
                        StoredUsage {
                            id: event_id.clone(),
                            subscription_id: request.subscription_id.clone(),
                            quantity: *quantity,
                            requested_quantity: *requested_quantity,
                            accept_partial: request.accept_partial,
                            usage_time,
                            invoice_id: None,
                            invoice_item_id: None,
                            created_time: now,
                            updated_time: now,
                        },
                    );
                    for reached in alerts {
                        let alert = Alert::new(&sub.id, *period_start, *period_end, reached, &event_id, now);
                        writes.outbox.push(OutboxRecord {
                            topic: ctx.alerts_topic.clone(),
                            partition: message.partition,
                            key: Some(sub.id.clone().into_bytes()),
                            payload: serde_json::to_vec(&alert)?,
                            headers: to_bytes(alert.headers()),
                            // At most one per period and kind: limit_alerts' key.
                            source: None,
                        });
                        writes
                            .alerts
                            .push((sub.id.clone(), *period_start, event_id.clone(), reached.clone()));
                        decided.alerts += 1;
                    }
                }
                Outcome::from_decision(outcome_id, event_id, &request.subscription_id, &decision, source, now)
            }
            (Ok(request), Some(rejection)) => Outcome::rejected(
                outcome_id,
                event_id,
                Some(request.subscription_id.clone()),
                rejection.clone(),
                source,
                now,
            ),
            (Err(rejection), _) => {
                if let Some(raw) = &message.dead_letter {
                    writes.outbox.push(dead_letter(ctx, message, raw, rejection.code));
                    decided.dead_letters += 1;
                }
                Outcome::rejected(
                    outcome_id,
                    event_id,
                    message.identity.1.clone(),
                    rejection.clone(),
                    source,
                    now,
                )
            }
        };
        decided
            .statuses
            .push((outcome.status, outcome.error.as_ref().map(|e| e.code)));
        let key = outcome
            .subscription_id
            .clone()
            .map(String::into_bytes)
            .or_else(|| message.key.clone());
        let mut record = OutboxRecord {
            topic: ctx.results_topic.clone(),
            partition: message.partition,
            key,
            payload: serde_json::to_vec(&outcome)?,
            headers: to_bytes(outcome.headers()),
            source: Some((ctx.input_topic.clone(), message.partition, message.offset)),
        };
        // An outcome without a subscription id carries the message's own
        // key; one too large to publish beside the outcome goes, or the
        // record could never be published (nor anything after it).
        if outbox_record_size(record.key.as_deref(), &record.payload, &record.headers) > ctx.max_dead_letter_bytes {
            record.key = None;
        }
        writes.outbox.push(record);
    }

    Ok((writes, decided))
}

fn to_bytes(headers: Vec<(&'static str, String)>) -> Vec<(String, Vec<u8>)> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
        .collect()
}

/// Names of the headers a dead letter carries besides the original ones.
pub mod dlq_headers {
    pub const REASON: &str = "dlq-reason";
    pub const SOURCE_TOPIC: &str = "dlq-source-topic";
    pub const SOURCE_PARTITION: &str = "dlq-source-partition";
    pub const SOURCE_OFFSET: &str = "dlq-source-offset";
    /// Why a control message was refused (never its payload).
    pub const DETAIL: &str = "dlq-detail";
    /// Set when the payload was cut to fit the producer's message limit:
    /// the original length in bytes.
    pub const TRUNCATED_FROM: &str = "dlq-truncated-from";
    /// Set when the original headers were too large to keep: their size as
    /// librdkafka serialises them.
    pub const HEADERS_DROPPED: &str = "dlq-headers-dropped";
}

/// The dead-letter copy of an input message: original key, bytes and
/// headers, plus headers naming the reason and where it came from. The copy
/// must fit the producer's message limit as librdkafka counts it, or the
/// relay could never publish it (nor anything after it on its partition).
/// One that does not fit whole is a stub: original headers that alone take
/// more than half the room are dropped, a key over a quarter of it too, and
/// the payload is cut to what is left (or emptied), each with a header
/// saying so; the reason, the source coordinates and `detail` (why a
/// control message was refused; empty for none) always stay.
pub fn dead_letter_record(
    topic: &str,
    partition: i32,
    source: (&str, i32, i64),
    raw: &RawMessage,
    reason: &str,
    detail: &str,
    max_bytes: usize,
) -> OutboxRecord {
    let mut own = vec![
        (dlq_headers::REASON.to_owned(), reason.as_bytes().to_vec()),
        (dlq_headers::SOURCE_TOPIC.to_owned(), source.0.as_bytes().to_vec()),
        (
            dlq_headers::SOURCE_PARTITION.to_owned(),
            source.1.to_string().into_bytes(),
        ),
        (dlq_headers::SOURCE_OFFSET.to_owned(), source.2.to_string().into_bytes()),
    ];
    if !detail.is_empty() {
        own.push((dlq_headers::DETAIL.to_owned(), detail.as_bytes().to_vec()));
    }
    let record = |key: Option<Vec<u8>>, payload: Vec<u8>, headers: Vec<(String, Vec<u8>)>| OutboxRecord {
        topic: topic.to_owned(),
        partition,
        key,
        payload,
        headers,
        source: Some((source.0.to_owned(), source.1, source.2)),
    };
    let payload = raw.payload.clone().unwrap_or_default();
    let mut headers = raw.headers.clone();
    headers.extend(own.iter().cloned());
    if outbox_record_size(raw.key.as_deref(), &payload, &headers) <= max_bytes {
        return record(raw.key.clone(), payload, headers);
    }
    let original_headers = headers_size(&raw.headers);
    if original_headers > max_bytes / 2 {
        headers = own;
        headers.push((
            dlq_headers::HEADERS_DROPPED.to_owned(),
            original_headers.to_string().into_bytes(),
        ));
    }
    let key = raw.key.clone().filter(|k| k.len() <= max_bytes / 4);
    let mut payload = payload;
    let truncated = (
        dlq_headers::TRUNCATED_FROM.to_owned(),
        payload.len().to_string().into_bytes(),
    );
    if outbox_record_size(key.as_deref(), &payload, &headers) > max_bytes {
        headers.push(truncated);
        let room = max_bytes.saturating_sub(outbox_record_size(key.as_deref(), &[], &headers));
        payload.truncate(room);
    }
    record(key, payload, headers)
}

fn dead_letter(ctx: &DecideContext, message: &DecodedMessage, raw: &RawMessage, code: ReasonCode) -> OutboxRecord {
    dead_letter_record(
        &ctx.dead_letter_topic,
        message.partition,
        (&ctx.input_topic, message.partition, message.offset),
        raw,
        code.as_str(),
        "",
        ctx.max_dead_letter_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(payload: &[u8]) -> RawMessage {
        RawMessage {
            key: Some(b"k".to_vec()),
            payload: Some(payload.to_vec()),
            headers: vec![("trace".into(), vec![0, 1])],
        }
    }

    fn header<'a>(record: &'a OutboxRecord, name: &str) -> Option<&'a [u8]> {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn a_dead_letter_keeps_key_bytes_and_headers_and_names_its_source() {
        let record = dead_letter_record(
            "dlq",
            2,
            ("usage-events", 2, 41),
            &raw(b"\xff"),
            "malformed_payload",
            "",
            4000,
        );
        assert_eq!(
            (record.key.as_deref(), record.payload.as_slice()),
            (Some(&b"k"[..]), &b"\xff"[..])
        );
        assert_eq!(header(&record, "trace"), Some(&[0u8, 1][..]));
        assert_eq!(header(&record, dlq_headers::REASON), Some(&b"malformed_payload"[..]));
        assert_eq!(header(&record, dlq_headers::SOURCE_OFFSET), Some(&b"41"[..]));
        assert_eq!(header(&record, dlq_headers::TRUNCATED_FROM), None);
    }

    fn record_size(record: &OutboxRecord) -> usize {
        outbox_record_size(record.key.as_deref(), &record.payload, &record.headers)
    }

    #[test]
    fn a_dead_letter_over_the_producer_limit_is_truncated_and_says_so() {
        let record = dead_letter_record(
            "dlq",
            0,
            ("usage-events", 0, 1),
            &raw(&[b'x'; 5000]),
            "payload_too_large",
            "",
            2000,
        );
        assert!(record.payload.len() < 2000 && !record.payload.is_empty());
        assert!(record_size(&record) <= 2000);
        assert_eq!(header(&record, dlq_headers::TRUNCATED_FROM), Some(&b"5000"[..]));
    }

    #[test]
    fn huge_original_headers_are_dropped_so_the_copy_still_fits() {
        let mut message = raw(b"not json");
        message.headers.push(("big".into(), vec![b'h'; 10_000]));
        let record = dead_letter_record(
            "dlq",
            0,
            ("usage-events", 0, 1),
            &message,
            "malformed_payload",
            "",
            4000,
        );
        assert!(record_size(&record) <= 4000);
        assert_eq!(header(&record, "big"), None);
        let dropped = headers_size(&message.headers).to_string();
        assert_eq!(header(&record, dlq_headers::HEADERS_DROPPED), Some(dropped.as_bytes()));
        assert_eq!(record.payload, b"not json");
    }

    #[test]
    fn tens_of_thousands_of_small_headers_are_counted_as_librdkafka_counts_them() {
        // Their names and values alone take 360,000 bytes, under half the
        // room; serialised with their length varints they take 480,000,
        // and beside the payload the copy would be over the producer's
        // limit, refused on every try.
        let mut message = raw(&[b'x'; 950_000]);
        message.headers = (0..60_000).map(|_| ("abc".to_owned(), b"xyz".to_vec())).collect();
        let limit = crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;
        let record = dead_letter_record(
            "dlq",
            0,
            ("usage-events", 0, 7),
            &message,
            "malformed_payload",
            "",
            limit,
        );
        assert!(record_size(&record) <= limit, "{} > {limit}", record_size(&record));
        assert_eq!(header(&record, dlq_headers::TRUNCATED_FROM), Some(&b"950000"[..]));
        assert_eq!(header(&record, dlq_headers::SOURCE_OFFSET), Some(&b"7"[..]));
        assert_eq!(header(&record, dlq_headers::REASON), Some(&b"malformed_payload"[..]));
    }

    fn rejected_with_key(key: Vec<u8>, offset: i64) -> DecodedMessage {
        DecodedMessage {
            partition: 0,
            offset,
            timestamp: None,
            key: Some(key),
            request_time: Utc::now(),
            request: Err(Rejection::on_field(
                ReasonCode::MissingField,
                "subscriptionId",
                "missing",
            )),
            identity: (None, None),
            dead_letter: None,
        }
    }

    #[test]
    fn an_outcome_keeps_the_message_key_unless_it_could_not_be_published_with_it() {
        let ctx = DecideContext {
            group: "g".into(),
            input_topic: "usage-events".into(),
            results_topic: "usage-results".into(),
            alerts_topic: "usage-alerts".into(),
            dead_letter_topic: "usage-events-dlq".into(),
            grace: Duration::hours(1),
            max_dead_letter_bytes: crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES,
        };
        let messages = [
            rejected_with_key(b"k1".to_vec(), 0),
            rejected_with_key(vec![b'k'; 999_900], 1),
        ];
        let todo: Vec<&DecodedMessage> = messages.iter().collect();
        let ids: Vec<String> = todo.iter().map(|m| m.event_id("usage-events")).collect();
        let (writes, decided) = decide_messages(
            &ctx,
            &todo,
            &ids,
            &mut HashMap::new(),
            &mut HashMap::new(),
            None,
            Utc::now(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(decided.statuses.len(), 2);
        let keys: Vec<Option<usize>> = writes.outbox.iter().map(|r| r.key.as_ref().map(Vec::len)).collect();
        assert_eq!(keys, [Some(2), None]);
        for record in &writes.outbox {
            assert!(record_size(record) <= ctx.max_dead_letter_bytes);
        }
    }

    #[test]
    fn a_control_message_copy_with_its_detail_still_fits() {
        let detail = "d".repeat(500);
        let message = raw(&[b'{'; 999_990]);
        let limit = crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;
        let record = dead_letter_record(
            "dlq",
            0,
            ("subscriptions", 0, 3),
            &message,
            "invalid_snapshot",
            &detail,
            limit,
        );
        assert!(record_size(&record) <= limit, "{} > {limit}", record_size(&record));
        assert_eq!(header(&record, dlq_headers::DETAIL), Some(detail.as_bytes()));
        assert_eq!(header(&record, dlq_headers::TRUNCATED_FROM), Some(&b"999990"[..]));
    }

    #[test]
    fn a_copy_that_fits_whole_is_kept_whole() {
        let message = raw(&[b'x'; 10_000]);
        let record = dead_letter_record(
            "dlq",
            0,
            ("usage-events", 0, 1),
            &message,
            "malformed_payload",
            "",
            20_000,
        );
        assert_eq!(record.payload.len(), 10_000);
        assert_eq!(header(&record, dlq_headers::TRUNCATED_FROM), None);
        assert_eq!(header(&record, "trace"), Some(&[0u8, 1][..]));
    }
}
