//! PostgreSQL: connections, migrations, queries and transactions. Nothing
//! here knows about Kafka; message coordinates arrive as plain numbers.

mod batch;
mod control;
mod errors;
mod invoices;
mod outbox;
mod periods;
mod snapshots;
mod subscriptions;
mod usages;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use batch::{BatchTx, CorrectionKind, NewAlert, NewUsage, OffsetClaim, Savepoint, StagedWrites, UsageCorrection};
pub use control::{ControlMessage, StoredPositions};
pub use errors::{classify, is_unavailable, until_available, FailureKind};
pub use invoices::{apply_invoices, InvoicesApplied, ItemResult};
pub use outbox::{
    claim_partition, delete_expired, delete_expired_chunk, mark_published, mark_published_many, pending_many,
    published_seq, release_fences, still_claimed, take_fences, OutboxRecord, SourcePosition, StoredRecord,
};
pub use periods::{close_due_periods, read_periods, PeriodClosing, SweepRound};
pub use snapshots::{apply_snapshots, SnapshotChange, SnapshotOutcome};
pub use subscriptions::{read_subscription, SubscriptionRead};
pub use usages::{
    get_usage, list_usages, outbox_backlog, ping, usage_history, usage_subscription, CorrectionRecord, PageStart,
    StatusFilter, UsageFilter, UsageHistory,
};

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// [`MIGRATOR`], tolerating migrations applied that this release does not
/// know: those of a later release. During a rolling deploy, and after a
/// rollback, this release runs on the schema a later one migrated (the
/// migration rules of docs/operations.md keep that schema readable and
/// writable by it); sqlx's default would refuse to start. A migration of
/// its own that differs from the applied one (checksum) still fails.
fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate::Migrator {
        migrations: MIGRATOR.migrations.clone(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    migrator.set_ignore_missing(true);
    migrator
}

/// Opens a pool. Every connection gets the statement time-out, so that a slow
/// database cannot hang a batch forever; `synchronous_commit` is left on.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&settings.url)
        .map_err(|e| anyhow::anyhow!("invalid setting database.url (DATABASE_URL): {e}"))?
        .options([
            ("statement_timeout", settings.statement_timeout_ms.to_string()),
            ("synchronous_commit", "on".to_owned()),
        ]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// Applies pending migrations on a connection of their own without the
/// statement time-out: a migration may rewrite a large table, and cutting it
/// short would only start it again (start-up retries a time-out as an
/// unavailable database). The connection is closed afterwards rather than
/// returned to the pool without its time-out.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("applying migrations: connecting to the database")?;
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await
        .context("applying migrations: lifting the statement time-out")?;
    let applied = migrate_on(&mut conn).await;
    let _ = conn.close().await;
    applied
}

/// Indexes that migrations build `CONCURRENTLY` (and `IF NOT EXISTS`).
const CONCURRENT_INDEXES: [&str; 1] = ["usages_in_list_order"];

/// Drops what an interrupted concurrent build left behind, then applies
/// the migrations, all under the migrator's lock (a session lock that the
/// migrator takes again), so that no other instance's build in progress
/// is taken for a leftover.
async fn migrate_on(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    use sqlx::migrate::Migrate;
    wait_for_migration_lock(conn).await?;
    let outcome = async {
        for name in CONCURRENT_INDEXES {
            let invalid: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace AND NOT i.indisvalid)",
            )
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .context("applying migrations: looking for invalid indexes")?;
            if invalid {
                tracing::warn!(index = name, "dropping an index an interrupted build left invalid");
                sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                    .execute(&mut *conn)
                    .await
                    .with_context(|| format!("applying migrations: dropping the invalid index {name}"))?;
            }
        }
        migrator().run(&mut *conn).await.context("applying migrations")
    }
    .await;
    let unlocked = conn
        .unlock()
        .await
        .context("applying migrations: releasing the migration lock");
    outcome.and(unlocked)
}

/// Takes the migrator's lock (the key sqlx's own `lock` takes, which the
/// migrator then takes again on this session) by polling it, never by
/// waiting in `pg_advisory_lock`: a waiting statement holds a snapshot,
/// and a concurrent index build of the instance that migrates waits for
/// every older snapshot, so two replicas starting together would deadlock.
async fn wait_for_migration_lock(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await
        .context("applying migrations: reading the database's name")?;
    let key = migration_lock_id(&database);
    let mut logged = false;
    loop {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .context("applying migrations: taking the migration lock")?;
        if taken {
            return Ok(());
        }
        if !logged {
            tracing::info!("waiting for another instance's migrations");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The advisory lock key of sqlx's migrator for a database (sqlx-postgres's
/// `generate_lock_id`).
pub fn migration_lock_id(database: &str) -> i64 {
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32ad9e * i64::from(CRC_IEEE.checksum(database.as_bytes()))
}

/// Stored next offsets of a group on a topic, for the given partitions.
/// Partitions with no row yet get one at `initial(partition)`, so that the
/// compare-and-set always has a row to compare against.
pub async fn load_offsets(
    pool: &PgPool,
    group: &str,
    topic: &str,
    initial: &HashMap<i32, i64>,
) -> anyhow::Result<HashMap<i32, i64>> {
    let partitions: Vec<i32> = initial.keys().copied().collect();
    let starts: Vec<i64> = partitions.iter().map(|p| initial[p]).collect();
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
         SELECT $1, $2, p, o FROM UNNEST($3::int[], $4::bigint[]) AS t(p, o)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&starts)
    .execute(pool)
    .await
    .context("initialising consumer offsets")?;
    stored_offsets(pool, group, topic, &partitions).await
}

/// Stored next offsets, without creating rows.
pub async fn stored_offsets(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> anyhow::Result<HashMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets
         WHERE group_id = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await
    .context("reading consumer offsets")?;
    Ok(rows.into_iter().collect())
}
