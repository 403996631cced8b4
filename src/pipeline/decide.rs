//! Deciding one batch of usage messages in one PostgreSQL transaction.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use super::dead_letter::{dead_letter_record, RawMessage};
use super::stage::{decide_and_stage, LockedState, Report, ReportRequest, StageContext, Staged};
use crate::domain::correction::UsageCommand;
use crate::domain::event::Identity;
use crate::domain::outcome::{derived_event_id, kafka_outcome_id, OutcomeStatus, Source};
use crate::domain::{ReasonCode, Rejection};
use crate::kafka::consumer::OffsetRange;
use crate::store::{BatchTx, OffsetClaim, OutboxRecord, SourcePosition};

/// A usage message after decoding (pure, outside the transaction).
#[derive(Debug, Clone)]
pub struct DecodedMessage {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    /// The time of the request: the message timestamp, else processing time.
    pub request_time: DateTime<Utc>,
    pub request: Result<UsageCommand, Rejection>,
    /// For a rejected message: its own valid `id` and `subscriptionId`, if any.
    pub identity: Identity,
    /// Set for input that could not be decoded at all: it is also copied to
    /// the dead-letter topic.
    pub dead_letter: Option<RawMessage>,
}

impl DecodedMessage {
    /// The usage the message is about: a report's `id` (its idempotency
    /// key), else one derived from the message's coordinates; the usage a
    /// correction names.
    pub fn event_id(&self, topic: &str) -> String {
        let named = match &self.request {
            Ok(command) => command.usage_id(),
            Err(_) => self.identity.id.as_deref(),
        };
        named.map_or_else(|| derived_event_id(topic, self.partition, self.offset), str::to_owned)
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
    pub max_record_bytes: usize,
}

impl DecideContext {
    fn stage(&self) -> StageContext<'_> {
        StageContext {
            results_topic: &self.results_topic,
            alerts_topic: &self.alerts_topic,
            grace: self.grace,
            max_record_bytes: self.max_record_bytes,
        }
    }
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
    let mut laps = Laps::start();
    let mut tx = BatchTx::begin(pool).await?;
    laps.lap("begun");
    let claimed = claim_offsets(&mut tx, ctx, ranges, messages).await?;
    let mut report = BatchReport {
        skipped: messages.len() - claimed.todo.len(),
        reread: claimed.reread,
        ..BatchReport::default()
    };
    if claimed.claims.is_empty() {
        return Ok(report);
    }
    laps.lap("offsets");
    let staged = decide_and_insert(&mut tx, ctx, &claimed.todo, forced, now, &mut laps).await?;
    let seqs = tx.write_staged(&staged.writes).await?;
    laps.lap("written");
    tx.advance_offsets(&ctx.group, &ctx.input_topic, &claimed.claims)
        .await?;
    tx.commit().await?;
    laps.lap("committed");
    report.decided = staged
        .decided
        .iter()
        .map(|d| (d.outcome.status, d.outcome.error.as_ref().map(|e| e.code)))
        .collect();
    report.alerts = staged.writes.alerts.len();
    report.dead_letters = staged.dead_letters;
    report.outbox = seqs.into_iter().zip(staged.writes.outbox).collect();
    tracing::debug!(laps = ?laps.laps, "batch transaction");
    Ok(report)
}

/// Milliseconds since the transaction began, at each named step.
struct Laps {
    clock: std::time::Instant,
    laps: Vec<(&'static str, f64)>,
}

impl Laps {
    fn start() -> Self {
        Self {
            clock: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, name: &'static str) {
        self.laps.push((name, self.clock.elapsed().as_secs_f64() * 1e3));
    }
}

/// The offsets a batch claims and the messages still to decide under them.
struct Claimed<'m> {
    claims: Vec<OffsetClaim>,
    /// The messages at or after their partition's stored offset, in input
    /// order.
    todo: Vec<&'m DecodedMessage>,
    reread: Vec<(i32, i64)>,
}

/// Claims the offsets. Only messages at or after the stored offset are still
/// undecided; a claim that starts after it means the consumer missed some
/// and must read again.
async fn claim_offsets<'m>(
    tx: &mut BatchTx,
    ctx: &DecideContext,
    ranges: &[OffsetRange],
    messages: &'m [DecodedMessage],
) -> anyhow::Result<Claimed<'m>> {
    let partitions: Vec<i32> = ranges.iter().map(|r| r.partition).collect();
    let stored = tx.lock_offsets(&ctx.group, &ctx.input_topic, &partitions).await?;
    let mut claims = Vec::new();
    let mut reread = Vec::new();
    let mut start_of: HashMap<i32, i64> = HashMap::new();
    for &OffsetRange { partition, from, to } in ranges {
        let Some(&current) = stored.get(&partition) else {
            anyhow::bail!("no stored offset for partition {partition}");
        };
        if current < from {
            reread.push((partition, current));
        } else if current < to {
            claims.push(OffsetClaim {
                partition,
                from_offset: current,
                to_offset: to,
            });
            start_of.insert(partition, current);
        }
    }
    let todo = messages
        .iter()
        .filter(|m| start_of.get(&m.partition).is_some_and(|start| m.offset >= *start))
        .collect();
    Ok(Claimed { claims, todo, reread })
}

/// How often a batch is decided again because usage ids it created were
/// inserted concurrently; each round learns of every id that collided.
const MAX_DECIDE_ATTEMPTS: u32 = 3;

/// Locks and loads what the decisions need, decides in input order, and
/// stores the usages. A usage id that a concurrent transaction (another lane
/// deciding the same id from another partition, an HTTP create) inserted
/// meanwhile is known once that transaction committed: load it and decide
/// again, in memory, under the locks still held.
async fn decide_and_insert(
    tx: &mut BatchTx,
    ctx: &DecideContext,
    todo: &[&DecodedMessage],
    forced: Option<&Rejection>,
    now: DateTime<Utc>,
    laps: &mut Laps,
) -> anyhow::Result<Staged> {
    let commands: Vec<&UsageCommand> = todo.iter().filter_map(|m| m.request.as_ref().ok()).collect();
    let (reports, corrections) = lock_request(&commands);
    let ids: Vec<String> = todo.iter().map(|m| m.event_id(&ctx.input_topic)).collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (subscriptions, database_now) = if forced.is_none() {
            tx.lock_subscriptions_for(&reports, &corrections).await?
        } else {
            (HashMap::new(), now)
        };
        laps.lap("locked");
        let usages = tx.stored_usages(&ids).await?;
        laps.lap("loaded");
        let mut state = LockedState {
            subscriptions,
            usages,
            database_now,
        };
        let reports = todo
            .iter()
            .zip(&ids)
            .map(|(message, event_id)| report(ctx, message, event_id.clone(), forced));
        let staged = decide_and_stage(&ctx.stage(), &mut state, reports, now)?;
        laps.lap("decided");
        let collided = tx.insert_usages(&staged.writes.usages).await?;
        laps.lap("usages");
        if collided.is_empty() {
            return Ok(staged);
        }
        anyhow::ensure!(
            attempt < MAX_DECIDE_ATTEMPTS,
            "usage ids {collided:?} kept colliding with concurrent inserts"
        );
        tracing::debug!(?collided, "usage ids inserted concurrently; deciding the batch again");
        tx.delete_usages(&staged.writes.usages, &collided).await?;
    }
}

/// What a batch asks to lock: the subscription of each report, and each
/// correction's usage id with the subscription it names. The store locks
/// that subscription unless the usage is stored under another one
/// ([`BatchTx::lock_subscriptions_for`]): that correction is
/// `subscription_mismatch` whatever any subscription holds, and the
/// subscription it names is usually on another partition, so locking it
/// would make this batch wait for the lane that holds that partition, until
/// its whole transaction ends.
fn lock_request(commands: &[&UsageCommand]) -> (Vec<String>, Vec<(String, String)>) {
    let mut reports = Vec::with_capacity(commands.len());
    let mut corrections = Vec::new();
    for command in commands {
        match command {
            UsageCommand::Report(report) => reports.push(report.subscription_id.clone()),
            UsageCommand::Correct(c) => corrections.push((c.id.clone(), c.subscription_id.clone())),
        }
    }
    (reports, corrections)
}

/// Who a correction read from Kafka was made by, in the usage's history.
pub const KAFKA_CALLER: &str = "kafka";

/// A message as a report to decide: its usage, or its rejection (its own,
/// or `forced`), with a dead-letter copy of input that could not be decoded.
fn report<'m>(
    ctx: &DecideContext,
    message: &'m DecodedMessage,
    event_id: String,
    forced: Option<&Rejection>,
) -> Report<'m> {
    let request = match (&message.request, forced) {
        (Ok(UsageCommand::Report(request)), None) => ReportRequest::Usage {
            request,
            usage_time: request.effective_usage_time(message.request_time),
        },
        (Ok(UsageCommand::Correct(correction)), None) => ReportRequest::Correction {
            correction,
            by: KAFKA_CALLER,
        },
        (Ok(command), Some(rejection)) => ReportRequest::Rejected {
            subscription_id: Some(command.subscription_id().to_owned()),
            rejection: rejection.clone(),
        },
        (Err(rejection), _) => ReportRequest::Rejected {
            subscription_id: message.identity.subscription_id.clone(),
            rejection: rejection.clone(),
        },
    };
    let dead_letter = match (&message.request, &message.dead_letter) {
        (Err(rejection), Some(raw)) => Some(dead_letter(ctx, message, raw, rejection.code)),
        _ => None,
    };
    Report {
        event_id,
        outcome_id: kafka_outcome_id(&ctx.input_topic, message.partition, message.offset),
        request,
        source: Source::Kafka {
            topic: ctx.input_topic.clone(),
            partition: message.partition,
            offset: message.offset,
            timestamp: message.timestamp,
        },
        input: Some(SourcePosition {
            topic: ctx.input_topic.clone(),
            partition: message.partition,
            offset: message.offset,
        }),
        partition: message.partition,
        key: message.key.clone(),
        dead_letter,
    }
}

fn dead_letter(ctx: &DecideContext, message: &DecodedMessage, raw: &RawMessage, code: ReasonCode) -> OutboxRecord {
    dead_letter_record(
        &ctx.dead_letter_topic,
        message.partition,
        (&ctx.input_topic, message.partition, message.offset),
        raw,
        code.as_str(),
        "",
        ctx.max_record_bytes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::correction::{Correction, CorrectionAction};
    use crate::domain::event::UsageRequest;
    use crate::kafka::record_size::outbox_record_size;
    use rust_decimal::Decimal;

    #[test]
    fn a_batch_asks_to_lock_each_reports_subscription_and_each_corrections_with_its_usage() {
        let report = |sub: &str| {
            UsageCommand::Report(UsageRequest {
                id: Some("u9".into()),
                subscription_id: sub.into(),
                quantity: Decimal::ONE,
                usage_time: None,
                accept_partial: false,
            })
        };
        let void = UsageCommand::Correct(Correction {
            id: "u1".into(),
            subscription_id: "sub_c".into(),
            action: CorrectionAction::Void { reason: None },
        });
        let (a, b) = (report("sub_a"), report("sub_b"));
        let (reports, corrections) = lock_request(&[&a, &void, &b]);
        assert_eq!(reports, ["sub_a", "sub_b"]);
        assert_eq!(corrections, [("u1".to_owned(), "sub_c".to_owned())]);
    }

    fn record_size(record: &OutboxRecord) -> usize {
        outbox_record_size(record.key.as_deref(), &record.payload, &record.headers)
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
            identity: Identity::default(),
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
            max_record_bytes: crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES,
        };
        let messages = [
            rejected_with_key(b"k1".to_vec(), 0),
            rejected_with_key(vec![b'k'; 999_900], 1),
        ];
        let reports = messages
            .iter()
            .map(|m| report(&ctx, m, m.event_id("usage-events"), None));
        let mut state = LockedState {
            subscriptions: HashMap::new(),
            usages: HashMap::new(),
            database_now: Utc::now(),
        };
        let staged = decide_and_stage(&ctx.stage(), &mut state, reports, Utc::now()).unwrap();
        assert_eq!(staged.decided.len(), 2);
        let keys: Vec<Option<usize>> = staged
            .writes
            .outbox
            .iter()
            .map(|r| r.key.as_ref().map(Vec::len))
            .collect();
        assert_eq!(keys, [Some(2), None]);
        for record in &staged.writes.outbox {
            assert!(record_size(record) <= ctx.max_record_bytes);
        }
    }
}
