//! The period sweep: every worker, every `pipeline.period_sweep_secs`,
//! closes the periods whose end plus grace has passed by PostgreSQL's clock
//! and stages their `usage-period-closed` records in the outbox, in rounds
//! of at most [`SWEEP_ROUND`] periods (a backlog goes round after round,
//! each its own short transaction). Which worker closes a period does not
//! matter: the store closes each exactly once (see `store::periods`), and
//! the relay of the worker that owns the record's partition publishes it.
//!
//! A failed round (the database down, a time-out) is logged, counted and
//! tried again after a backoff; nothing is skipped, since the periods it
//! did not close are still due in the next round.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use super::relay::Relay;
use crate::config::Partitioner;
use crate::domain::period_record::PeriodRecord;
use crate::kafka::partition::output_partition;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::{self, OutboxRecord, PeriodClosing};

/// Most periods one sweep round closes.
pub const SWEEP_ROUND: i64 = 100;

/// Where period records go: the subscription's partition of `usage-periods`,
/// as for HTTP outcomes (the producers' partitioner over the subscription id).
#[derive(Debug, Clone)]
pub struct PeriodOutput {
    pub topic: String,
    /// Partitions of the output topics (those of `usage-events`).
    pub partitions: i32,
    pub partitioner: Partitioner,
    /// A period closes for new usage at its end plus this.
    pub grace: chrono::Duration,
}

impl PeriodOutput {
    /// The outbox record that publishes `record`: keyed by the subscription
    /// id, on the subscription's partition.
    pub fn outbox_record(&self, record: &PeriodRecord) -> OutboxRecord {
        OutboxRecord {
            topic: self.topic.clone(),
            partition: output_partition(&record.subscription_id, self.partitions, self.partitioner),
            key: Some(record.subscription_id.as_bytes().to_vec()),
            payload: record.to_json(),
            headers: record.headers(),
            source: None,
        }
    }

    /// What the store needs to close periods.
    pub fn closing(&self) -> PeriodClosing {
        let output = self.clone();
        PeriodClosing {
            grace: self.grace,
            outbox_record: Arc::new(move |record: &PeriodRecord| output.outbox_record(record)),
        }
    }
}

pub struct PeriodSweep {
    pub pool: PgPool,
    pub closing: PeriodClosing,
    /// The wait between rounds that found nothing more to do.
    pub interval: Duration,
    pub retry_max: Duration,
    pub metrics: Arc<Metrics>,
    /// Woken after a round staged records, so that they go out now.
    pub relay: Arc<Relay>,
}

impl PeriodSweep {
    /// Sweeps until `stop` is set.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            self.retry_max.max(Duration::from_millis(100)),
        );
        loop {
            if *stop.borrow() {
                return;
            }
            let wait = match self.round().await {
                Ok(round) => {
                    backoff.reset();
                    if round.due as i64 >= SWEEP_ROUND {
                        // A backlog: the next round at once.
                        continue;
                    }
                    self.interval
                }
                Err(e) => {
                    self.metrics.period_sweep_failed();
                    let wait = backoff.next_delay();
                    tracing::warn!(
                        error = format!("{e:#}"),
                        backoff_ms = wait.as_millis() as u64,
                        "closing due periods failed; retrying (nothing is skipped: they stay due)"
                    );
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One round: closes up to [`SWEEP_ROUND`] due periods.
    async fn round(&self) -> anyhow::Result<store::SweepRound> {
        let round = store::close_due_periods(&self.pool, &self.closing, SWEEP_ROUND).await?;
        if !round.staged.is_empty() {
            for kind in &round.staged {
                self.metrics.period_record_staged(*kind);
            }
            tracing::info!(records = round.staged.len(), "closed periods; their records are staged");
            self.relay.wake();
        }
        Ok(round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::period_record::{ClosedBy, ClosedPeriod, Closing, PeriodTotals};

    #[test]
    fn a_period_record_goes_to_the_subscription_s_partition_keyed_by_its_id() {
        let output = PeriodOutput {
            topic: "usage-periods".into(),
            partitions: 12,
            partitioner: Partitioner::Murmur2,
            grace: chrono::Duration::hours(1),
        };
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let period = ClosedPeriod {
            subscription_id: "sub_42",
            start: at - chrono::Duration::days(30),
            end: at,
            closing: Closing {
                by: ClosedBy::Grace,
                time: at + chrono::Duration::hours(1),
            },
            pricing: None,
        };
        let record = PeriodRecord::closed(&period, &PeriodTotals::of([]), None);
        let outbox = output.outbox_record(&record);
        assert_eq!(outbox.topic, "usage-periods");
        assert_eq!(outbox.partition, output_partition("sub_42", 12, Partitioner::Murmur2));
        assert_eq!(outbox.key.as_deref(), Some(&b"sub_42"[..]));
        assert_eq!(outbox.headers.text("type"), Some("usage-period-closed"));
        assert!(outbox.source.is_none(), "no input message decided it");
        let body: serde_json::Value = serde_json::from_slice(&outbox.payload).unwrap();
        assert_eq!(body["subscriptionId"], "sub_42");
    }
}
