//! The transaction that decides a batch: claim the offsets, lock and load the
//! subscriptions, store usages, `used` and outbox records, commit. All of it
//! or none of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::outbox::{append, OutboxRecord};
use super::usages::{stored, UsageRow, USAGE_COLUMNS};
use crate::domain::decision::{
    AlertStep, AmountFigures, LimitReached, PeriodState, StoredUsage, SubscriptionState, Voided,
};
use crate::domain::pricing::Pricing;
use crate::domain::subscription::{decode_pricing, Limit};

/// The part of a partition a batch wants to decide: messages from
/// `from_offset` (the consumer's position before the first one) up to
/// `to_offset` (the position after the last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetClaim {
    pub partition: i32,
    pub from_offset: i64,
    pub to_offset: i64,
}

/// A usage to insert.
#[derive(Debug, Clone)]
pub struct NewUsage {
    pub id: String,
    pub subscription_id: String,
    pub quantity: Decimal,
    pub requested_quantity: Decimal,
    pub accept_partial: bool,
    pub usage_time: DateTime<Utc>,
    pub period_start: DateTime<Utc>,
    pub created_time: DateTime<Utc>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
}

/// A limit alert to record: `reached` by the usage `usage_id` in the
/// period of `subscription_id` that starts at `period_start`.
#[derive(Debug, Clone)]
pub struct NewAlert {
    pub subscription_id: String,
    pub period_start: DateTime<Utc>,
    pub usage_id: String,
    pub reached: LimitReached,
}

/// A correction to record: the usage as it is after it, and the history
/// entry.
#[derive(Debug, Clone)]
pub struct UsageCorrection {
    pub usage: StoredUsage,
    pub action: CorrectionKind,
    pub previous_quantity: Decimal,
    /// What an amendment asked for.
    pub requested_quantity: Option<Decimal>,
    pub by: String,
    pub reason: Option<String>,
    pub time: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorrectionKind {
    Amended,
    Voided,
}

impl CorrectionKind {
    /// The stored spelling, which is also the history's `action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Amended => "amended",
            Self::Voided => "voided",
        }
    }
}

/// What deciding stages for one transaction: the usages created, the new
/// `used` of each touched period (by subscription id and period start) and
/// `trial_used` of each touched subscription in a trial, the alerts raised
/// and the outbox records, in the order they were decided.
#[derive(Debug, Default)]
pub struct StagedWrites {
    pub usages: Vec<NewUsage>,
    /// Corrections of stored usages (or of usages created earlier in the
    /// same transaction), in the order they were decided.
    pub corrections: Vec<UsageCorrection>,
    pub used: HashMap<(String, DateTime<Utc>), Decimal>,
    pub trial_used: HashMap<String, Decimal>,
    pub alerts: Vec<NewAlert>,
    pub outbox: Vec<OutboxRecord>,
}

impl StagedWrites {
    /// Adds what `later` staged, decided after what is here: its `used` and
    /// `trial_used` (running totals) replace the ones here.
    pub fn append(&mut self, later: StagedWrites) {
        self.usages.extend(later.usages);
        self.corrections.extend(later.corrections);
        self.used.extend(later.used);
        self.trial_used.extend(later.trial_used);
        self.alerts.extend(later.alerts);
        self.outbox.extend(later.outbox);
    }
}

impl NewUsage {
    /// The usage as it reads once stored, before any invoice counts it.
    pub fn as_stored(&self) -> StoredUsage {
        StoredUsage {
            id: self.id.clone(),
            subscription_id: self.subscription_id.clone(),
            quantity: self.quantity,
            requested_quantity: self.requested_quantity,
            accept_partial: self.accept_partial,
            usage_time: self.usage_time,
            invoice_id: None,
            invoice_item_id: None,
            created_time: self.created_time,
            updated_time: self.created_time,
            period_start: self.period_start,
            last_requested_quantity: None,
            voided: None,
        }
    }
}

pub struct BatchTx {
    tx: Transaction<'static, Postgres>,
}

/// The name of a savepoint: an SQL identifier fixed in the code, never
/// built from input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Savepoint(pub &'static str);

/// The unique violation of a usage id another transaction inserted.
fn is_usage_id_taken(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") && db.constraint() == Some("usages_pkey"))
}

impl BatchTx {
    pub async fn begin(pool: &PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            tx: pool.begin().await.context("beginning batch transaction")?,
        })
    }

    /// Locks the offset rows of the claimed partitions (in partition order,
    /// so that two workers never deadlock on them) and returns what is
    /// stored. The caller compares: only messages at or after the stored
    /// offset may be decided, and only when the claim starts at or before it.
    pub async fn lock_offsets(
        &mut self,
        group: &str,
        topic: &str,
        partitions: &[i32],
    ) -> anyhow::Result<HashMap<i32, i64>> {
        let mut sorted = partitions.to_vec();
        sorted.sort_unstable();
        super::control::lock_offset_rows(&mut self.tx, group, topic, &sorted).await
    }

    /// Advances the offsets, compare-and-set: each claim moves its partition
    /// from exactly `from_offset` to `to_offset`. Fails when any row moved.
    pub async fn advance_offsets(&mut self, group: &str, topic: &str, claims: &[OffsetClaim]) -> anyhow::Result<()> {
        let partitions: Vec<i32> = claims.iter().map(|c| c.partition).collect();
        let from: Vec<i64> = claims.iter().map(|c| c.from_offset).collect();
        let to: Vec<i64> = claims.iter().map(|c| c.to_offset).collect();
        let updated = sqlx::query(
            "UPDATE consumer_offsets o SET next_offset = c.to_offset, updated_time = now()
             FROM UNNEST($3::int[], $4::bigint[], $5::bigint[]) AS c(partition, from_offset, to_offset)
             WHERE o.group_id = $1 AND o.topic = $2 AND o.partition = c.partition
               AND o.next_offset = c.from_offset",
        )
        .bind(group)
        .bind(topic)
        .bind(&partitions)
        .bind(&from)
        .bind(&to)
        .execute(&mut *self.tx)
        .await
        .context("advancing consumer offsets")?
        .rows_affected();
        anyhow::ensure!(
            updated == claims.len() as u64,
            "offset compare-and-set moved {updated} of {} partitions",
            claims.len()
        );
        Ok(())
    }

    /// Locks the subscriptions in id order (a fixed order, so concurrent
    /// batches cannot deadlock) and loads them with their periods. Unknown
    /// ids are absent from the result.
    pub async fn lock_subscriptions(&mut self, ids: &[String]) -> anyhow::Result<HashMap<String, SubscriptionState>> {
        Ok(self.lock_subscriptions_at(ids).await?.0)
    }

    /// [`Self::lock_subscriptions`], and PostgreSQL's clock read after the
    /// locks were granted (by the statement that loads the periods, which
    /// starts after them): the time that decides whether a period is closed,
    /// the same for every worker and for the invoices that close periods.
    pub async fn lock_subscriptions_at(
        &mut self,
        ids: &[String],
    ) -> anyhow::Result<(HashMap<String, SubscriptionState>, DateTime<Utc>)> {
        self.lock_subscriptions_for(ids, &[]).await
    }

    /// [`Self::lock_subscriptions_at`] for reports and corrections: the
    /// subscriptions `reports` names, and for each correction (the usage id
    /// and the subscription it names) that subscription, unless the usage
    /// is stored under another one. Such a correction is
    /// `subscription_mismatch` whatever any subscription holds, and locking
    /// the one it names would make the batch wait for whichever transaction
    /// holds it (`decide.rs`). A usage's subscription never changes and its
    /// row is never deleted, so the statement's snapshot can tell; reading
    /// it there saves a batch with corrections a round trip of its own.
    pub async fn lock_subscriptions_for(
        &mut self,
        reports: &[String],
        corrections: &[(String, String)],
    ) -> anyhow::Result<(HashMap<String, SubscriptionState>, DateTime<Utc>)> {
        let mut sorted = reports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // `= ANY` of one array, whatever the corrections add to it: the
        // subscriptions are found through their primary key.
        let subs: Vec<SubscriptionRow> = sqlx::query_as(&format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions
             WHERE id = ANY($1::text[] || ARRAY(
                 SELECT c.subscription_id
                 FROM UNNEST($2::text[], $3::text[]) AS c(usage_id, subscription_id)
                 WHERE NOT EXISTS (SELECT 1 FROM usages u
                                   WHERE u.id = c.usage_id AND u.subscription_id <> c.subscription_id)))
             ORDER BY id FOR UPDATE"
        ))
        .bind(&sorted)
        .bind(corrections.iter().map(|(usage, _)| usage.as_str()).collect::<Vec<_>>())
        .bind(corrections.iter().map(|(_, sub)| sub.as_str()).collect::<Vec<_>>())
        .fetch_all(&mut *self.tx)
        .await
        .context("locking subscriptions")?;
        let locked: Vec<String> = subs.iter().map(|row| row.id.clone()).collect();
        let mut states: HashMap<String, SubscriptionState> = subs
            .into_iter()
            .map(|row| (row.id.clone(), SubscriptionState::from(row)))
            .collect();
        let (periods, database_now) = load_periods(&mut self.tx, &locked).await?;
        for (sub, period) in periods {
            if let Some(state) = states.get_mut(&sub) {
                state.periods.push(period);
            }
        }
        Ok((states, database_now))
    }

    /// Usages already stored under any of these ids.
    pub async fn stored_usages(&mut self, ids: &[String]) -> anyhow::Result<HashMap<String, StoredUsage>> {
        let rows: Vec<UsageRow> = sqlx::query_as(&format!("SELECT {USAGE_COLUMNS} FROM usages WHERE id = ANY($1)"))
            .bind(ids)
            .fetch_all(&mut *self.tx)
            .await
            .context("loading stored usages")?;
        Ok(rows.into_iter().map(stored).map(|u| (u.id.clone(), u)).collect())
    }

    /// Inserts in id order: two batches in flight at once that insert some of
    /// the same new ids then wait on each other in one order, never in a
    /// cycle (a deadlock PostgreSQL would break only after its time-out).
    /// Returns the ids that a concurrent transaction inserted first (it
    /// committed: a fresh read sees them); the others are inserted.
    ///
    /// A plain insert under a savepoint first: `ON CONFLICT DO NOTHING` costs
    /// a speculative insertion per row (measured with pgbench, 500 rows:
    /// 4.5 against 6.8 ms), and a collision is rare. Only when the plain
    /// insert meets one does the savepoint take it back, and the insert that
    /// skips collisions says which ids they were.
    pub async fn insert_usages(&mut self, usages: &[NewUsage]) -> anyhow::Result<Vec<String>> {
        if usages.is_empty() {
            return Ok(Vec::new());
        }
        let mut sorted: Vec<&NewUsage> = usages.iter().collect();
        sorted.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        sqlx::query("SAVEPOINT insert_usages")
            .execute(&mut *self.tx)
            .await
            .context("inserting usages")?;
        match self.insert_sorted(&sorted, false).await {
            Ok(_) => return Ok(Vec::new()),
            Err(e) if !is_usage_id_taken(&e) => return Err(e).context("inserting usages"),
            Err(_) => {}
        }
        sqlx::query("ROLLBACK TO SAVEPOINT insert_usages")
            .execute(&mut *self.tx)
            .await
            .context("inserting usages")?;
        let inserted: std::collections::HashSet<String> = self
            .insert_sorted(&sorted, true)
            .await
            .context("inserting usages, skipping ids taken meanwhile")?
            .into_iter()
            .collect();
        Ok(sorted
            .iter()
            .filter(|u| !inserted.contains(&u.id))
            .map(|u| u.id.clone())
            .collect())
    }

    /// One insert statement; with `skip_taken`, ids already stored are
    /// skipped and the inserted ones returned.
    async fn insert_sorted(&mut self, usages: &[&NewUsage], skip_taken: bool) -> Result<Vec<String>, sqlx::Error> {
        let col = |f: fn(&NewUsage) -> String| usages.iter().map(|u| f(u)).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO usages (id, subscription_id, quantity, requested_quantity, accept_partial,
                                 usage_time, period_start_time, created_time, updated_time,
                                 source_partition, source_offset)
             SELECT id, sub, q, rq, ap, ut, ps, ct, ct, sp, so
             FROM UNNEST($1::text[], $2::text[], $3::numeric[], $4::numeric[], $5::bool[],
                         $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::int[], $10::bigint[])
                  AS u(id, sub, q, rq, ap, ut, ps, ct, sp, so){}",
            if skip_taken {
                " ON CONFLICT (id) DO NOTHING RETURNING id"
            } else {
                ""
            }
        );
        let rows: Vec<(String,)> = sqlx::query_as(&sql)
            .bind(col(|u| u.id.clone()))
            .bind(col(|u| u.subscription_id.clone()))
            .bind(usages.iter().map(|u| u.quantity).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.requested_quantity).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.accept_partial).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.usage_time).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.period_start).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.created_time).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.source_partition).collect::<Vec<_>>())
            .bind(usages.iter().map(|u| u.source_offset).collect::<Vec<_>>())
            .fetch_all(&mut *self.tx)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Takes back the usages this transaction inserted, all but `collided`
    /// (which a concurrent transaction inserted), so that the batch can be
    /// decided again.
    pub async fn delete_usages(&mut self, usages: &[NewUsage], collided: &[String]) -> anyhow::Result<()> {
        let ours: Vec<&str> = usages
            .iter()
            .map(|u| u.id.as_str())
            .filter(|id| !collided.iter().any(|c| c == id))
            .collect();
        sqlx::query("DELETE FROM usages WHERE id = ANY($1)")
            .bind(&ours)
            .execute(&mut *self.tx)
            .await
            .context("taking back usages to decide again")?;
        Ok(())
    }

    /// Writes what deciding staged besides the usages (inserted first, by
    /// [`Self::insert_usages`]): `used`, `trial_used`, alerts, then the
    /// outbox records. Returns the records' sequence numbers, in order.
    pub async fn write_staged(&mut self, writes: &StagedWrites) -> anyhow::Result<Vec<i64>> {
        self.write_corrections(&writes.corrections).await?;
        self.update_used(&writes.used).await?;
        self.update_trial_used(&writes.trial_used).await?;
        self.insert_alerts(&writes.alerts).await?;
        self.append_outbox(&writes.outbox).await
    }

    /// Brings each corrected usage to its state after its last correction,
    /// and appends every correction to the usage's history, in order.
    async fn write_corrections(&mut self, corrections: &[UsageCorrection]) -> anyhow::Result<()> {
        if corrections.is_empty() {
            return Ok(());
        }
        // One row per usage (an UPDATE … FROM with two rows for one target
        // would apply either): the state after its last correction.
        let mut last: HashMap<&str, &StoredUsage> = HashMap::new();
        for correction in corrections {
            last.insert(&correction.usage.id, &correction.usage);
        }
        let mut usages: Vec<&StoredUsage> = last.into_values().collect();
        usages.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let voided =
            |f: fn(&Voided) -> Option<String>| usages.iter().map(|u| u.voided.as_ref().and_then(f)).collect::<Vec<_>>();
        // One statement, one round trip: the update runs to completion
        // whether or not the insert reads it.
        sqlx::query(
            "WITH corrected AS (
                 UPDATE usages u SET quantity = c.quantity, last_requested_quantity = c.last_requested,
                        voided_time = c.voided_time, void_reason = c.void_reason, voided_by = c.voided_by,
                        updated_time = c.updated_time
                 FROM UNNEST($1::text[], $2::numeric[], $3::numeric[], $4::timestamptz[], $5::text[], $6::text[],
                             $7::timestamptz[])
                      AS c(id, quantity, last_requested, voided_time, void_reason, voided_by, updated_time)
                 WHERE u.id = c.id
             )
             INSERT INTO usage_corrections (usage_id, time, action, quantity, previous_quantity,
                                            requested_quantity, by, reason)
             SELECT usage_id, time, action, quantity, previous_quantity, requested_quantity, by, reason
             FROM UNNEST($8::text[], $9::timestamptz[], $10::text[], $11::numeric[], $12::numeric[],
                         $13::numeric[], $14::text[], $15::text[])
                  WITH ORDINALITY AS c(usage_id, time, action, quantity, previous_quantity, requested_quantity,
                                       by, reason, n)
             ORDER BY n",
        )
        .bind(usages.iter().map(|u| u.id.as_str()).collect::<Vec<_>>())
        .bind(usages.iter().map(|u| u.quantity).collect::<Vec<_>>())
        .bind(usages.iter().map(|u| u.last_requested_quantity).collect::<Vec<_>>())
        .bind(
            usages
                .iter()
                .map(|u| u.voided.as_ref().map(|v| v.time))
                .collect::<Vec<_>>(),
        )
        .bind(voided(|v| v.reason.clone()))
        .bind(voided(|v| Some(v.by.clone())))
        .bind(usages.iter().map(|u| u.updated_time).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.usage.id.as_str()).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.time).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.action.as_str()).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.usage.quantity).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.previous_quantity).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.requested_quantity).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.by.as_str()).collect::<Vec<_>>())
        .bind(corrections.iter().map(|c| c.reason.as_deref()).collect::<Vec<_>>())
        .execute(&mut *self.tx)
        .await
        .context("correcting usages and recording their corrections")?;
        Ok(())
    }

    /// Writes the new `used` of each touched period.
    async fn update_used(&mut self, used: &HashMap<(String, DateTime<Utc>), Decimal>) -> anyhow::Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        let periods: Vec<_> = used.iter().collect();
        sqlx::query(
            "UPDATE service_periods p SET used = c.used
             FROM UNNEST($1::text[], $2::timestamptz[], $3::numeric[]) AS c(sub, start_time, used)
             WHERE p.subscription_id = c.sub AND p.start_time = c.start_time",
        )
        .bind(periods.iter().map(|((sub, _), _)| sub.as_str()).collect::<Vec<_>>())
        .bind(periods.iter().map(|((_, start), _)| *start).collect::<Vec<_>>())
        .bind(periods.iter().map(|(_, used)| **used).collect::<Vec<_>>())
        .execute(&mut *self.tx)
        .await
        .context("updating used quantities")?;
        Ok(())
    }

    /// Writes the new `trial_used` of each touched subscription.
    async fn update_trial_used(&mut self, trial_used: &HashMap<String, Decimal>) -> anyhow::Result<()> {
        if trial_used.is_empty() {
            return Ok(());
        }
        let subscriptions: Vec<_> = trial_used.iter().collect();
        sqlx::query(
            "UPDATE subscriptions s SET trial_used = c.used
             FROM UNNEST($1::text[], $2::numeric[]) AS c(id, used) WHERE s.id = c.id",
        )
        .bind(subscriptions.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
        .bind(subscriptions.iter().map(|(_, used)| **used).collect::<Vec<_>>())
        .execute(&mut *self.tx)
        .await
        .context("updating trial usage")?;
        Ok(())
    }

    /// Records raised alerts. The primary key makes a second alert of the
    /// same period and kind fail the batch rather than go out twice.
    pub async fn insert_alerts(&mut self, alerts: &[NewAlert]) -> anyhow::Result<()> {
        if alerts.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO limit_alerts (subscription_id, period_start_time, kind, threshold, usage_id,
                                       limit_quantity, used, limit_amount, used_amount, currency)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::smallint[], $5::text[],
                                  $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::text[])",
        )
        .bind(alerts.iter().map(|a| a.subscription_id.as_str()).collect::<Vec<_>>())
        .bind(alerts.iter().map(|a| a.period_start).collect::<Vec<_>>())
        .bind(alerts.iter().map(|a| a.reached.kind.as_str()).collect::<Vec<_>>())
        .bind(
            alerts
                .iter()
                .map(|a| i16::from(a.reached.threshold))
                .collect::<Vec<_>>(),
        )
        .bind(alerts.iter().map(|a| a.usage_id.as_str()).collect::<Vec<_>>())
        .bind(alerts.iter().map(|a| a.reached.limit).collect::<Vec<_>>())
        .bind(alerts.iter().map(|a| a.reached.used).collect::<Vec<_>>())
        .bind(amounts(alerts, |f| Some(f.limit_amount)))
        .bind(amounts(alerts, |f| Some(f.used_amount)))
        .bind(
            alerts
                .iter()
                .map(|a| a.reached.amount.as_ref().map(|f| f.currency.clone()))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *self.tx)
        .await
        .context("recording limit alerts")?;
        Ok(())
    }

    /// Stores the records; returns their sequence numbers, in order.
    pub async fn append_outbox(&mut self, records: &[OutboxRecord]) -> anyhow::Result<Vec<i64>> {
        append(&mut self.tx, records).await
    }

    /// Marks a point the transaction can go back to ([`Self::rollback_to`])
    /// without losing the locks taken before it.
    pub async fn savepoint(&mut self, name: Savepoint) -> anyhow::Result<()> {
        sqlx::query(&format!("SAVEPOINT {}", name.0))
            .execute(&mut *self.tx)
            .await
            .with_context(|| format!("setting savepoint {}", name.0))?;
        Ok(())
    }

    /// Takes back what was written since the savepoint (which stays set).
    pub async fn rollback_to(&mut self, name: Savepoint) -> anyhow::Result<()> {
        sqlx::query(&format!("ROLLBACK TO SAVEPOINT {}", name.0))
            .execute(&mut *self.tx)
            .await
            .with_context(|| format!("rolling back to savepoint {}", name.0))?;
        Ok(())
    }

    /// Keeps what was written since the savepoint, and forgets it.
    pub async fn release(&mut self, name: Savepoint) -> anyhow::Result<()> {
        sqlx::query(&format!("RELEASE SAVEPOINT {}", name.0))
            .execute(&mut *self.tx)
            .await
            .with_context(|| format!("releasing savepoint {}", name.0))?;
        Ok(())
    }

    pub async fn commit(self) -> anyhow::Result<()> {
        self.tx.commit().await.context("committing batch")
    }
}

/// What a decision reads of a subscription's row.
pub(super) const SUBSCRIPTION_COLUMNS: &str = "id, status, deleted, trial_end_time, trial_limit, trial_used";

#[derive(sqlx::FromRow)]
pub(super) struct SubscriptionRow {
    id: String,
    status: String,
    deleted: bool,
    trial_end_time: Option<DateTime<Utc>>,
    trial_limit: Option<Decimal>,
    trial_used: Decimal,
}

/// The subscription without its periods (see [`load_periods`]).
impl From<SubscriptionRow> for SubscriptionState {
    fn from(row: SubscriptionRow) -> Self {
        Self {
            id: row.id,
            status: row.status,
            deleted: row.deleted,
            periods: Vec::new(),
            trial_end_time: row.trial_end_time,
            trial_limit: row.trial_limit,
            trial_used: row.trial_used,
        }
    }
}

/// The periods of these subscriptions, in start order per subscription,
/// and the database's clock when the statement ran.
pub(super) async fn load_periods(
    conn: &mut PgConnection,
    ids: &[String],
) -> anyhow::Result<(Vec<(String, PeriodState)>, DateTime<Utc>)> {
    // One row at least (the clock), whether or not there are periods. A
    // period with its closing record stays closed whatever a later snapshot
    // says of its end: the record summed it.
    let rows: Vec<PeriodRow> = sqlx::query_as(
        "SELECT p.subscription_id, p.start_time, p.end_time, p.hard_limit, p.soft_limit,
                p.hard_limit_amount, p.soft_limit_amount, p.pricing::text, p.used,
                coalesce(p.closed_time, p.record_closed_time) AS closed_time, p.alerted, clock.now
         FROM (SELECT clock_timestamp() AS now) clock
         LEFT JOIN service_periods p ON p.subscription_id = ANY($1)
         ORDER BY p.subscription_id, p.start_time",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .context("loading service periods")?;
    let database_now = rows
        .first()
        .map(|row| row.now)
        .context("the periods statement returned no clock")?;
    let mut periods = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(period) = period_state(row)? {
            periods.push(period);
        }
    }
    Ok((periods, database_now))
}

/// A row of the periods statement: a subscription's period, or none (the
/// left join's row that only carries the clock).
#[derive(sqlx::FromRow)]
struct PeriodRow {
    subscription_id: Option<String>,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    hard_limit: Option<Decimal>,
    soft_limit: Option<Decimal>,
    hard_limit_amount: Option<Decimal>,
    soft_limit_amount: Option<Decimal>,
    pricing: Option<String>,
    used: Option<Decimal>,
    closed_time: Option<DateTime<Utc>>,
    alerted: Option<Vec<String>>,
    now: DateTime<Utc>,
}

/// The period a row holds, with its subscription's id.
fn period_state(row: PeriodRow) -> anyhow::Result<Option<(String, PeriodState)>> {
    let (Some(sub), Some(start), Some(used)) = (row.subscription_id, row.start_time, row.used) else {
        return Ok(None);
    };
    let limit = |quantity: Option<Decimal>, amount: Option<Decimal>| {
        quantity.map(Limit::Quantity).or(amount.map(Limit::Amount))
    };
    let pricing = row
        .pricing
        .map(|text| stored_pricing(&text))
        .transpose()
        .with_context(|| format!("reading the pricing of {sub}'s period starting {start:?}"))?;
    let period = PeriodState {
        start,
        end: row.end_time,
        hard_limit: limit(row.hard_limit, row.hard_limit_amount),
        soft_limit: limit(row.soft_limit, row.soft_limit_amount),
        pricing,
        used,
        closed_time: row.closed_time,
        alerted: row
            .alerted
            .unwrap_or_default()
            .iter()
            .filter_map(|step| AlertStep::parse(step))
            .collect(),
    };
    Ok(Some((sub, period)))
}

/// A period's pricing as stored: the JSON that the snapshot was checked in.
/// Every batch loads the pricing of each period it touches, and a plan's
/// pricing is shared by many subscriptions, so decoded pricings are kept by
/// their text (a few thousand plans at most; the cache starts over when it
/// holds more).
pub(super) fn stored_pricing(text: &str) -> anyhow::Result<Arc<Pricing>> {
    const MOST: usize = 4096;
    static DECODED: Mutex<Option<HashMap<String, Arc<Pricing>>>> = Mutex::new(None);
    let cached = DECODED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|decoded| decoded.get(text).cloned());
    if let Some(pricing) = cached {
        return Ok(pricing);
    }
    let raw = RawValue::from_string(text.to_owned()).context("stored pricing is not JSON")?;
    let pricing = Arc::new(decode_pricing(&raw).map_err(|e| anyhow::anyhow!("stored pricing is invalid: {e}"))?);
    let mut decoded = DECODED.lock().unwrap_or_else(PoisonError::into_inner);
    let map = decoded.get_or_insert_with(HashMap::new);
    if map.len() >= MOST {
        map.clear();
    }
    map.insert(text.to_owned(), pricing.clone());
    Ok(pricing)
}

/// One amount figure of each alert (null where no amount limit applied).
fn amounts(alerts: &[NewAlert], figure: fn(&AmountFigures) -> Option<Decimal>) -> Vec<Option<Decimal>> {
    alerts
        .iter()
        .map(|a| a.reached.amount.as_ref().and_then(figure))
        .collect()
}
