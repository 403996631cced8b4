//! PostgreSQL: connections, migrations, queries and transactions. Nothing
//! here knows about Kafka; message coordinates arrive as plain numbers.

mod batch;
mod control;
mod errors;
mod invoices;
mod outbox;
mod snapshots;
mod usages;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use batch::{BatchTx, NewAlert, NewUsage, OffsetClaim, StagedWrites};
pub use control::{ControlMessage, StoredPositions};
pub use errors::{classify, is_unavailable, until_available, FailureKind};
pub use invoices::{apply_invoices, InvoicesApplied, ItemResult};
pub use outbox::{
    claim_partition, delete_expired, lock_claimed, mark_published, mark_published_many, pending_many, published_seq,
    OutboxRecord, SourcePosition, StoredRecord,
};
pub use snapshots::{apply_snapshots, SnapshotChange, SnapshotOutcome};
pub use usages::{delete_usage, get_usage, list_usages, outbox_backlog, ping, Deletion, UsageFilter};

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
    let applied = MIGRATOR.run(&mut *conn).await.context("applying migrations");
    let _ = conn.close().await;
    applied
}

/// Creates the database named in `url` when it does not exist (demo, bench
/// and tests use databases of their own).
pub async fn create_database(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let options = PgConnectOptions::from_str(url)?;
    let name = options
        .get_database()
        .context("database URL names no database")?
        .to_owned();
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE \"{}\"", name.replace('"', "")))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}

/// Creates a fresh database named `<prefix>_<timestamp>` on the server of
/// `base_url`, and returns its URL (demo and bench use databases of their own).
pub async fn scratch_database(base_url: &str, prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}_{}", chrono::Utc::now().format("%Y%m%d%H%M%S%3f"));
    let mut url = url::Url::parse(base_url).context("invalid setting database.url (DATABASE_URL)")?;
    url.set_path(&name);
    create_database(url.as_str()).await?;
    Ok(url.to_string())
}

/// Drops the database named in `url`, closing its connections.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let mut admin = url::Url::parse(url).context("invalid database URL")?;
    let name = admin.path().trim_start_matches('/').replace('"', "");
    admin.set_path("postgres");
    let pool = sqlx::PgPool::connect(admin.as_str()).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&pool)
        .await?;
    Ok(())
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
