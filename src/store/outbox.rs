//! The transactional outbox: records stored with the decision that made them,
//! published later in sequence order per output partition.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

/// A record to publish, as the deciding transaction stores it.
#[derive(Debug, Clone)]
pub struct OutboxRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Header values are bytes: a dead letter keeps the original headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The input message this record decides, when there is one.
    pub source: Option<(String, i32, i64)>,
}

/// A stored record, with its sequence number in its output partition.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub seq: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Headers are stored as a JSON array of `[key, base64 value]` pairs.
fn encode_headers(headers: &[(String, Vec<u8>)]) -> String {
    use base64::Engine;
    let pairs: Vec<(&str, String)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), base64::engine::general_purpose::STANDARD.encode(v)))
        .collect();
    serde_json::to_string(&pairs).expect("headers serialize")
}

fn decode_headers(text: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use base64::Engine;
    let pairs: Vec<(String, String)> = serde_json::from_str(text).context("decoding stored headers")?;
    pairs
        .into_iter()
        .map(|(k, v)| {
            Ok((
                k,
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .context("decoding a stored header")?,
            ))
        })
        .collect()
}

/// Appends records, giving each the next sequence number of its output
/// partition, and returns those numbers (in the order of `records`). The
/// counter rows are locked (in (topic, partition) order, the same for every
/// caller) for the rest of the transaction, so sequence numbers follow
/// commit order within a partition. Two statements whatever the number of
/// partitions (a batch touches many: round trips were most of the cost of
/// small batches); the rows go in in key order, which the indexes take best.
pub(super) async fn append(conn: &mut PgConnection, records: &[OutboxRecord]) -> anyhow::Result<Vec<i64>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let mut counts: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for r in records {
        *counts.entry((r.topic.as_str(), r.partition)).or_default() += 1;
    }
    let counters: Vec<(String, i32, i64)> = sqlx::query_as(
        "INSERT INTO outbox_partitions (topic, partition, next_seq)
         SELECT t, p, 1 + n FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS c(t, p, n) ORDER BY t, p
         ON CONFLICT (topic, partition) DO UPDATE SET next_seq = outbox_partitions.next_seq + EXCLUDED.next_seq - 1
         RETURNING topic, partition, next_seq",
    )
    .bind(counts.keys().map(|k| k.0).collect::<Vec<_>>())
    .bind(counts.keys().map(|k| k.1).collect::<Vec<_>>())
    .bind(counts.values().copied().collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .context("allocating outbox sequence numbers")?;
    // The next number to give in each partition: its first one.
    let mut next: HashMap<(&str, i32), i64> = HashMap::with_capacity(counters.len());
    for (topic, partition, next_seq) in &counters {
        let key = counts
            .keys()
            .find(|k| k.0 == topic && k.1 == *partition)
            .context("an outbox counter nobody asked for")?;
        next.insert(*key, next_seq - counts[key]);
    }
    let mut seqs = Vec::with_capacity(records.len());
    for r in records {
        let n = next
            .get_mut(&(r.topic.as_str(), r.partition))
            .context("no sequence counter returned for an outbox partition")?;
        seqs.push(*n);
        *n += 1;
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_unstable_by_key(|&i| (records[i].topic.as_str(), records[i].partition, seqs[i]));
    let rows = || order.iter().map(|&i| (&records[i], seqs[i]));
    sqlx::query(
        "INSERT INTO outbox (topic, partition, seq, key, payload, headers,
                             source_topic, source_partition, source_offset)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bytea[], $5::bytea[], $6::text[],
                              $7::text[], $8::int[], $9::bigint[])",
    )
    .bind(rows().map(|(r, _)| r.topic.as_str()).collect::<Vec<_>>())
    .bind(rows().map(|(r, _)| r.partition).collect::<Vec<_>>())
    .bind(rows().map(|(_, seq)| seq).collect::<Vec<_>>())
    .bind(rows().map(|(r, _)| r.key.as_deref()).collect::<Vec<_>>())
    .bind(rows().map(|(r, _)| r.payload.as_slice()).collect::<Vec<_>>())
    .bind(rows().map(|(r, _)| encode_headers(&r.headers)).collect::<Vec<_>>())
    .bind(
        rows()
            .map(|(r, _)| r.source.as_ref().map(|s| s.0.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind(rows().map(|(r, _)| r.source.as_ref().map(|s| s.1)).collect::<Vec<_>>())
    .bind(rows().map(|(r, _)| r.source.as_ref().map(|s| s.2)).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await
    .context("inserting outbox records")?;
    Ok(seqs)
}

/// Appends records that decide a message of a topic every worker reads
/// (subscriptions, invoices), unless a record for the same source is already
/// there: another worker may have applied the same message first.
pub(super) async fn append_once(conn: &mut PgConnection, records: &[OutboxRecord]) -> anyhow::Result<()> {
    let mut fresh = Vec::with_capacity(records.len());
    for r in records {
        let Some((source_topic, source_partition, source_offset)) = &r.source else {
            fresh.push(r.clone());
            continue;
        };
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE topic = $1 AND source_topic = $2
                             AND source_partition = $3 AND source_offset = $4)",
        )
        .bind(&r.topic)
        .bind(source_topic)
        .bind(source_partition)
        .bind(source_offset)
        .fetch_one(&mut *conn)
        .await
        .context("checking for an earlier dead letter")?;
        if !exists {
            fresh.push(r.clone());
        }
    }
    append(conn, &fresh).await.map(drop)
}

/// Makes `owner` the publisher of an output partition. It waits for the
/// round in flight of a former owner, which holds the row until its
/// deliveries are settled; that owner's next round finds the row claimed.
pub async fn claim_partition(pool: &PgPool, topic: &str, partition: i32, owner: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO outbox_owners (topic, partition, owner) VALUES ($1, $2, $3)
         ON CONFLICT (topic, partition) DO UPDATE SET owner = EXCLUDED.owner, claimed_at = now()",
    )
    .bind(topic)
    .bind(partition)
    .bind(owner)
    .execute(pool)
    .await
    .context("claiming an output partition")?;
    Ok(())
}

/// Starts a publishing round: locks, in order, the rows of those partitions
/// that `owner` still publishes, and returns them. The transaction holds
/// them until the round ends.
pub async fn lock_claimed(
    conn: &mut PgConnection,
    owner: &str,
    partitions: &[(String, i32)],
) -> anyhow::Result<std::collections::HashSet<(String, i32)>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT o.topic, o.partition FROM outbox_owners o
         JOIN UNNEST($1::text[], $2::int[]) AS w(topic, partition) USING (topic, partition)
         WHERE o.owner = $3
         ORDER BY o.topic, o.partition
         FOR UPDATE OF o",
    )
    .bind(partitions.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
    .bind(partitions.iter().map(|p| p.1).collect::<Vec<_>>())
    .bind(owner)
    .fetch_all(conn)
    .await
    .context("locking claimed output partitions")?;
    Ok(rows.into_iter().collect())
}

/// The last sequence number known to be on the topic for a partition.
pub async fn published_seq(pool: &PgPool, topic: &str, partition: i32) -> anyhow::Result<i64> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT published_seq FROM outbox_published WHERE topic = $1 AND partition = $2")
            .bind(topic)
            .bind(partition)
            .fetch_optional(pool)
            .await
            .context("reading published outbox sequence")?;
    Ok(seq.unwrap_or(0))
}

/// Records after the given sequence of each (topic, partition), in order,
/// at most `limit` per partition: one round trip for every owned partition.
pub async fn pending_many(
    pool: &PgPool,
    after: &[(String, i32, i64)],
    limit: i64,
) -> anyhow::Result<Vec<(String, i32, StoredRecord)>> {
    type Row = (String, i32, i64, Option<Vec<u8>>, Vec<u8>, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT w.topic, w.partition, o.seq, o.key, o.payload, o.headers::text
         FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS w(topic, partition, after_seq)
         CROSS JOIN LATERAL (
             SELECT seq, key, payload, headers FROM outbox o
             WHERE o.topic = w.topic AND o.partition = w.partition AND o.seq > w.after_seq
             ORDER BY o.seq LIMIT $4
         ) o
         ORDER BY w.topic, w.partition, o.seq",
    )
    .bind(after.iter().map(|a| a.0.clone()).collect::<Vec<_>>())
    .bind(after.iter().map(|a| a.1).collect::<Vec<_>>())
    .bind(after.iter().map(|a| a.2).collect::<Vec<_>>())
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading pending outbox records")?;
    rows.into_iter()
        .map(|(topic, partition, seq, key, payload, headers)| {
            let headers = decode_headers(&headers)?;
            Ok((
                topic,
                partition,
                StoredRecord {
                    seq,
                    key,
                    payload,
                    headers,
                },
            ))
        })
        .collect()
}

/// Records, for each (topic, partition), that its sequence up to the given
/// one is on the topic.
pub async fn mark_published_many(pool: &PgPool, published: &[(String, i32, i64)]) -> anyhow::Result<()> {
    // Rows in one order, so that two relays (a rebalance) cannot deadlock.
    let mut published = published.to_vec();
    published.sort_unstable();
    sqlx::query(
        "INSERT INTO outbox_published (topic, partition, published_seq)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[])
         ON CONFLICT (topic, partition) DO UPDATE
         SET published_seq = GREATEST(outbox_published.published_seq, EXCLUDED.published_seq)",
    )
    .bind(published.iter().map(|a| a.0.clone()).collect::<Vec<_>>())
    .bind(published.iter().map(|a| a.1).collect::<Vec<_>>())
    .bind(published.iter().map(|a| a.2).collect::<Vec<_>>())
    .execute(pool)
    .await
    .context("recording published outbox sequences")?;
    Ok(())
}

/// Records that `seq` (and everything before it) is on the topic; a
/// partition with no counter yet gets one after `seq`, so that the next
/// record stored for it is never numbered as one already on the topic.
pub async fn mark_published(pool: &PgPool, topic: &str, partition: i32, seq: i64) -> anyhow::Result<()> {
    sqlx::query(
        "WITH counter AS (
             INSERT INTO outbox_partitions (topic, partition, next_seq) VALUES ($1, $2, $3 + 1)
             ON CONFLICT (topic, partition) DO NOTHING
         )
         INSERT INTO outbox_published (topic, partition, published_seq) VALUES ($1, $2, $3)
         ON CONFLICT (topic, partition) DO UPDATE
         SET published_seq = GREATEST(outbox_published.published_seq, EXCLUDED.published_seq)",
    )
    .bind(topic)
    .bind(partition)
    .bind(seq)
    .execute(pool)
    .await
    .context("recording published outbox sequence")?;
    Ok(())
}

/// Deletes published records older than the retention time.
pub async fn delete_expired(pool: &PgPool, retention_days: u32) -> anyhow::Result<u64> {
    let deleted = sqlx::query(
        "DELETE FROM outbox o USING outbox_published p
         WHERE o.topic = p.topic AND o.partition = p.partition AND o.seq <= p.published_seq
           AND o.created_time < now() - make_interval(days => $1)",
    )
    .bind(retention_days as i32)
    .execute(pool)
    .await
    .context("deleting expired outbox records")?
    .rows_affected();
    Ok(deleted)
}
