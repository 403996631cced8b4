//! Deciding one batch of usage messages in one PostgreSQL transaction.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use crate::domain::decision::{decide, Decision, StoredUsage};
use crate::domain::event::UsageRequest;
use crate::domain::outcome::{derived_event_id, kafka_outcome_id, Outcome, OutcomeStatus, Source};
use crate::domain::{ReasonCode, Rejection};
use crate::store::{BatchTx, NewUsage, OffsetClaim, OutboxRecord};

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
    pub grace: Duration,
}

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// (status, reason code) of every decided message.
    pub decided: Vec<(OutcomeStatus, Option<ReasonCode>)>,
    /// Messages already decided by someone (a former owner, a retry).
    pub skipped: usize,
    /// Partitions whose stored offset is behind what was read: the consumer
    /// must read them again from the stored offset.
    pub reread: Vec<(i32, i64)>,
}

/// Decides the messages (in input order) whose partitions' claims hold, and
/// commits usages, periods, outcomes and offsets together. `ranges` are the
/// consumer's (partition, position before, position after) of the batch.
/// `forced` turns every message into the given rejection (the fallback for a
/// message the database refuses).
pub async fn decide_batch(
    pool: &PgPool,
    ctx: &DecideContext,
    ranges: &[(i32, i64, i64)],
    messages: &[DecodedMessage],
    forced: Option<&Rejection>,
    now: DateTime<Utc>,
) -> anyhow::Result<BatchReport> {
    let mut report = BatchReport::default();
    let mut tx = BatchTx::begin(pool).await?;

    // 1. Claim the offsets. Only messages at or after the stored offset are
    //    still undecided; a claim that starts after it means the consumer
    //    missed some and must read again.
    let partitions: Vec<i32> = ranges.iter().map(|r| r.0).collect();
    let stored = tx
        .lock_offsets(&ctx.group, &ctx.input_topic, &partitions)
        .await?;
    let mut claims = Vec::new();
    let mut start_of: HashMap<i32, i64> = HashMap::new();
    for &(partition, from, to) in ranges {
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
        .filter(|m| {
            start_of
                .get(&m.partition)
                .is_some_and(|start| m.offset >= *start)
        })
        .collect();
    report.skipped = messages.len() - todo.len();
    if claims.is_empty() {
        return Ok(report);
    }

    // 2. Lock and load what the decisions need.
    let valid: Vec<&UsageRequest> = todo
        .iter()
        .filter_map(|m| m.request.as_ref().ok())
        .collect();
    let sub_ids: Vec<String> = valid.iter().map(|r| r.subscription_id.clone()).collect();
    let mut subscriptions = if forced.is_none() {
        tx.lock_subscriptions(&sub_ids).await?
    } else {
        HashMap::new()
    };
    let ids: Vec<String> = todo.iter().map(|m| m.event_id(&ctx.input_topic)).collect();
    let mut usages = tx.stored_usages(&ids).await?;

    // 3. Decide in input order.
    let mut new_usages = Vec::new();
    let mut touched: HashMap<(String, DateTime<Utc>), Decimal> = HashMap::new();
    let mut outbox = Vec::with_capacity(todo.len());
    for (message, event_id) in todo.iter().zip(ids) {
        let source = Source::Kafka {
            topic: ctx.input_topic.clone(),
            partition: message.partition,
            offset: message.offset,
            timestamp: message.timestamp,
        };
        let outcome_id = kafka_outcome_id(&ctx.input_topic, message.partition, message.offset);
        let (outcome, key) = match (&message.request, forced) {
            (Ok(request), None) => {
                let usage_time = request.usage_time.unwrap_or(message.request_time);
                let decision = decide(
                    request,
                    usage_time,
                    usages.get(&event_id),
                    subscriptions.get_mut(&request.subscription_id),
                    now,
                    ctx.grace,
                );
                if let Decision::Created {
                    quantity,
                    requested_quantity,
                    period_start,
                    ..
                } = &decision
                {
                    let sub = &subscriptions[&request.subscription_id];
                    let period = sub
                        .periods
                        .iter()
                        .find(|p| p.start == *period_start)
                        .expect("decided period");
                    touched.insert((sub.id.clone(), *period_start), period.used);
                    new_usages.push(NewUsage {
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
                }
                let outcome = Outcome::from_decision(
                    outcome_id,
                    event_id,
                    &request.subscription_id,
                    &decision,
                    source,
                    now,
                );
                (outcome, Some(request.subscription_id.clone().into_bytes()))
            }
            (Ok(request), Some(rejection)) => (
                Outcome::rejected(
                    outcome_id,
                    event_id,
                    Some(request.subscription_id.clone()),
                    rejection.clone(),
                    source,
                    now,
                ),
                Some(request.subscription_id.clone().into_bytes()),
            ),
            (Err(rejection), _) => {
                let subscription_id = message.identity.1.clone();
                let key = subscription_id
                    .clone()
                    .map(String::into_bytes)
                    .or_else(|| message.key.clone());
                (
                    Outcome::rejected(
                        outcome_id,
                        event_id,
                        subscription_id,
                        rejection.clone(),
                        source,
                        now,
                    ),
                    key,
                )
            }
        };
        report
            .decided
            .push((outcome.status, outcome.error.as_ref().map(|e| e.code)));
        outbox.push(OutboxRecord {
            topic: ctx.results_topic.clone(),
            partition: message.partition,
            key,
            payload: serde_json::to_vec(&outcome)?,
            headers: outcome
                .headers()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            source: Some((ctx.input_topic.clone(), message.partition, message.offset)),
        });
    }

    // 4. Store everything and move the offsets, together.
    tx.insert_usages(&new_usages).await?;
    let periods: Vec<(String, DateTime<Utc>, Decimal)> = touched
        .into_iter()
        .map(|((sub, start), used)| (sub, start, used))
        .collect();
    tx.update_used(&periods).await?;
    tx.append_outbox(&outbox).await?;
    tx.advance_offsets(&ctx.group, &ctx.input_topic, &claims)
        .await?;
    tx.commit().await?;
    Ok(report)
}
