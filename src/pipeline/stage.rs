//! Deciding usage reports and corrections and staging what they write: the
//! one path a Kafka batch (`decide.rs`) and an HTTP request
//! (`src/http/transactions.rs`) take. Given the locked subscriptions and the
//! usages stored under the reports' ids, each report is decided in order
//! (each decision sees the ones before it), and its usage or correction,
//! `used`, `trial_used`, alerts and outcome record are added to one
//! [`StagedWrites`], which the store then writes in the same transaction.
//! Nothing here touches the database.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use crate::domain::correction::{Correction, CorrectionAction};
use crate::domain::decision::{decide, decide_correction, Decision, LimitReached, StoredUsage, SubscriptionState};
use crate::domain::event::UsageRequest;
use crate::domain::outcome::{Alert, Outcome, Source};
use crate::domain::Rejection;
use crate::kafka::record_size::outbox_record_size;
use crate::store::{CorrectionKind, NewAlert, NewUsage, OutboxRecord, SourcePosition, StagedWrites, UsageCorrection};

/// What stays fixed while staging.
#[derive(Debug, Clone, Copy)]
pub struct StageContext<'a> {
    pub results_topic: &'a str,
    pub alerts_topic: &'a str,
    pub grace: Duration,
    /// Largest record the producer can send: an outcome keyed by a key too
    /// large to publish beside it goes without it.
    pub max_record_bytes: usize,
}

/// What the reports are decided against: the locked subscriptions, the
/// usages stored under the reports' ids and the database's clock (read
/// after the locks were granted).
#[derive(Debug)]
pub struct LockedState {
    pub subscriptions: HashMap<String, SubscriptionState>,
    pub usages: HashMap<String, StoredUsage>,
    pub database_now: DateTime<Utc>,
}

/// One report to decide and stage.
#[derive(Debug)]
pub struct Report<'a> {
    /// The idempotency key: the usage id.
    pub event_id: String,
    pub outcome_id: String,
    pub request: ReportRequest<'a>,
    /// Where the report came from, as its outcome says.
    pub source: Source,
    /// The input message the report was read from: stored with its usage
    /// and its outcome record.
    pub input: Option<SourcePosition>,
    /// The output partition of its outcome and alerts.
    pub partition: i32,
    /// The key of an outcome that names no subscription (the message's own).
    pub key: Option<Vec<u8>>,
    /// A copy of the input for the dead-letter topic, staged before the
    /// outcome.
    pub dead_letter: Option<OutboxRecord>,
}

/// What a report asks for.
#[derive(Debug)]
pub enum ReportRequest<'a> {
    /// A usage, decided against its subscription's limits at `usage_time`.
    Usage {
        request: &'a UsageRequest,
        usage_time: DateTime<Utc>,
    },
    /// A void or an amendment of the stored usage the correction names, by
    /// `by` (the HTTP caller's name, or `kafka`).
    Correction { correction: &'a Correction, by: &'a str },
    /// A report rejected without deciding: it could not be decoded, or the
    /// database refused its batch.
    Rejected {
        subscription_id: Option<String>,
        rejection: Rejection,
    },
}

/// What one report came to.
#[derive(Debug)]
pub struct Decided {
    /// The decision, for a usage that was decided.
    pub decision: Option<Decision>,
    pub outcome: Outcome,
}

/// The reports decided so far and what they write.
#[derive(Debug, Default)]
pub struct Staged {
    pub writes: StagedWrites,
    /// In report order.
    pub decided: Vec<Decided>,
    pub dead_letters: usize,
}

/// Decides the reports in order against `state` (which it updates as it
/// goes) and stages what each writes.
pub fn decide_and_stage<'a>(
    ctx: &StageContext<'_>,
    state: &mut LockedState,
    reports: impl IntoIterator<Item = Report<'a>>,
    now: DateTime<Utc>,
) -> anyhow::Result<Staged> {
    let reports = reports.into_iter();
    // A decided report is over a KiB: growing the vectors one report at a
    // time copied the batch's outcomes over and over (the worker's profile).
    let count = reports.size_hint().0;
    let mut staged = Staged {
        writes: StagedWrites {
            usages: Vec::with_capacity(count),
            outbox: Vec::with_capacity(count),
            ..StagedWrites::default()
        },
        decided: Vec::with_capacity(count),
        dead_letters: 0,
    };
    for report in reports {
        staged.stage(ctx, state, report, now)?;
    }
    Ok(staged)
}

/// An outcome as JSON, written into a buffer that holds a typical one
/// whole (serde_json starts at 128 bytes and grows three times to get there).
fn outcome_payload(outcome: &Outcome) -> serde_json::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(1024);
    serde_json::to_writer(&mut payload, outcome)?;
    Ok(payload)
}

impl Staged {
    fn stage(
        &mut self,
        ctx: &StageContext<'_>,
        state: &mut LockedState,
        report: Report<'_>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let Report {
            event_id,
            outcome_id,
            request,
            source,
            input,
            partition,
            key,
            dead_letter,
        } = report;
        let (decision, outcome) = match request {
            ReportRequest::Usage { request, usage_time } => {
                let decision = decide(
                    request,
                    usage_time,
                    state.usages.get(&event_id),
                    state.subscriptions.get_mut(&request.subscription_id),
                    state.database_now,
                    ctx.grace,
                );
                if let Decision::Created { .. } = &decision {
                    self.stage_created(
                        ctx,
                        state,
                        &event_id,
                        request,
                        &decision,
                        partition,
                        input.as_ref(),
                        now,
                    )?;
                }
                let outcome =
                    Outcome::from_decision(outcome_id, event_id, &request.subscription_id, &decision, source, now);
                (Some(decision), outcome)
            }
            ReportRequest::Correction { correction, by } => {
                let decision = decide_correction(
                    correction,
                    by,
                    state.usages.get(&correction.id),
                    state.subscriptions.get_mut(&correction.subscription_id),
                    state.database_now,
                    ctx.grace,
                    now,
                );
                self.stage_correction(ctx, state, correction, by, &decision, partition, now)?;
                let outcome = Outcome::from_decision(
                    outcome_id,
                    correction.id.clone(),
                    &correction.subscription_id,
                    &decision,
                    source,
                    now,
                );
                (Some(decision), outcome)
            }
            ReportRequest::Rejected {
                subscription_id,
                rejection,
            } => (
                None,
                Outcome::rejected(outcome_id, event_id, subscription_id, rejection, source, now),
            ),
        };
        if let Some(record) = dead_letter {
            self.writes.outbox.push(record);
            self.dead_letters += 1;
        }
        let key = outcome.subscription_id.clone().map(String::into_bytes).or(key);
        let mut record = OutboxRecord {
            topic: ctx.results_topic.to_owned(),
            partition,
            key,
            payload: outcome_payload(&outcome)?,
            headers: outcome.headers(),
            source: input,
        };
        // An outcome without a subscription id carries the message's own
        // key; one too large to publish beside the outcome goes, or the
        // record could never be published (nor anything after it).
        if outbox_record_size(record.key.as_deref(), &record.payload, &record.headers) > ctx.max_record_bytes {
            record.key = None;
        }
        self.writes.outbox.push(record);
        self.decided.push(Decided { decision, outcome });
        Ok(())
    }

    /// Stages the usage a created decision stores, the new `used` (and
    /// `trial_used`) of its subscription, and the alerts it raised.
    #[allow(clippy::too_many_arguments)]
    fn stage_created(
        &mut self,
        ctx: &StageContext<'_>,
        state: &mut LockedState,
        event_id: &str,
        request: &UsageRequest,
        decision: &Decision,
        partition: i32,
        input: Option<&SourcePosition>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let Decision::Created {
            quantity,
            requested_quantity,
            usage_time,
            period_start,
            period_end,
            alerts,
            ..
        } = decision
        else {
            unreachable!("only a created decision writes");
        };
        let sub = &state.subscriptions[&request.subscription_id];
        let period = sub
            .periods
            .iter()
            .find(|p| p.start == *period_start)
            .expect("the decided period is one of the subscription's");
        self.writes.used.insert((sub.id.clone(), *period_start), period.used);
        if sub.trial_end_time.is_some() {
            self.writes.trial_used.insert(sub.id.clone(), sub.trial_used);
        }
        let usage = NewUsage {
            id: event_id.to_owned(),
            subscription_id: sub.id.clone(),
            quantity: *quantity,
            requested_quantity: *requested_quantity,
            accept_partial: request.accept_partial,
            usage_time: *usage_time,
            period_start: *period_start,
            created_time: now,
            source_partition: input.map(|i| i.partition),
            source_offset: input.map(|i| i.offset),
        };
        // A later report with the same id is a duplicate of this one.
        state.usages.insert(event_id.to_owned(), usage.as_stored());
        self.writes.usages.push(usage);
        self.stage_alerts(ctx, sub, (*period_start, *period_end), alerts, event_id, partition, now)
    }

    /// Stages what a void or an amendment changes: the usage and its
    /// history, `used` (and `trial_used`), and the alerts a raise reached.
    #[allow(clippy::too_many_arguments)]
    fn stage_correction(
        &mut self,
        ctx: &StageContext<'_>,
        state: &mut LockedState,
        correction: &Correction,
        by: &str,
        decision: &Decision,
        partition: i32,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let (usage, kind, previous_quantity, requested_quantity, alerts) = match decision {
            Decision::Voided { usage } => (usage, CorrectionKind::Voided, usage.quantity, None, &[][..]),
            Decision::Amended {
                usage,
                previous_quantity,
                requested_quantity,
                alerts,
                ..
            } => (
                usage,
                CorrectionKind::Amended,
                *previous_quantity,
                Some(*requested_quantity),
                &alerts[..],
            ),
            _ => return Ok(()),
        };
        let sub = &state.subscriptions[&correction.subscription_id];
        let period = sub
            .periods
            .iter()
            .find(|p| p.start == usage.period_start)
            .expect("a correction is decided in its usage's period");
        self.writes.used.insert((sub.id.clone(), period.start), period.used);
        if sub.trial_end_time.is_some() {
            self.writes.trial_used.insert(sub.id.clone(), sub.trial_used);
        }
        let reason = match &correction.action {
            CorrectionAction::Void { reason } => reason.clone(),
            CorrectionAction::Amend(_) => None,
        };
        self.writes.corrections.push(UsageCorrection {
            usage: usage.clone(),
            action: kind,
            previous_quantity,
            requested_quantity,
            by: by.to_owned(),
            reason,
            time: now,
        });
        let span = (period.start, period.end);
        state.usages.insert(usage.id.clone(), usage.clone());
        let sub = &state.subscriptions[&correction.subscription_id];
        self.stage_alerts(ctx, sub, span, alerts, &correction.id, partition, now)
    }

    /// Stages the alert records and rows of the steps a usage reached.
    #[allow(clippy::too_many_arguments)]
    fn stage_alerts(
        &mut self,
        ctx: &StageContext<'_>,
        sub: &SubscriptionState,
        (period_start, period_end): (DateTime<Utc>, Option<DateTime<Utc>>),
        alerts: &[LimitReached],
        usage_id: &str,
        partition: i32,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        for reached in alerts {
            let alert = Alert::new(&sub.id, period_start, period_end, reached, usage_id, now);
            self.writes.outbox.push(OutboxRecord {
                topic: ctx.alerts_topic.to_owned(),
                partition,
                key: Some(sub.id.clone().into_bytes()),
                payload: serde_json::to_vec(&alert)?,
                headers: alert.headers(),
                // At most one per period and kind: limit_alerts' key.
                source: None,
            });
            self.writes.alerts.push(NewAlert {
                subscription_id: sub.id.clone(),
                period_start,
                usage_id: usage_id.to_owned(),
                reached: reached.clone(),
            });
        }
        Ok(())
    }
}
