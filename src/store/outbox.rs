//! The transactional outbox: records stored with the decision that made them,
//! published later in sequence order per output partition.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

use crate::domain::headers::Headers;

/// A record to publish, as the deciding transaction stores it.
#[derive(Debug, Clone)]
pub struct OutboxRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Header values are bytes: a dead letter keeps the original headers.
    pub headers: Headers,
    /// The input message this record decides, when there is one.
    pub source: Option<SourcePosition>,
}

/// Where an input message was read: its topic, partition and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A stored record, with its sequence number in its output partition.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub seq: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Headers,
}

/// Headers are stored as a JSON array of `[key, base64 value]` pairs.
fn encode_headers(headers: &Headers) -> String {
    use base64::Engine;
    let pairs: Vec<(&str, String)> = headers
        .iter()
        .map(|(name, value)| (name, base64::engine::general_purpose::STANDARD.encode(value)))
        .collect();
    serde_json::to_string(&pairs).expect("headers serialize")
}

fn decode_headers(text: &str) -> anyhow::Result<Headers> {
    use base64::Engine;
    let pairs: Vec<(String, String)> = serde_json::from_str(text).context("decoding stored headers")?;
    let mut headers = Headers::with_capacity(pairs.len());
    for (name, value) in pairs {
        let value = base64::engine::general_purpose::STANDARD
            .decode(value)
            .context("decoding a stored header")?;
        headers.push(name, value);
    }
    Ok(headers)
}

/// Appends records, giving each the next sequence number of its output
/// partition, and returns those numbers (in the order of `records`). The
/// counter rows are locked (in (topic, partition) order, the same for every
/// caller) for the rest of the transaction, so sequence numbers follow
/// commit order within a partition. Two statements whatever the number of
/// partitions (a batch touches many: round trips were most of the cost of
/// small batches). The records of one output partition from one source
/// partition go in as one row of `outbox_batches` (a heap tuple and two
/// index entries per record were a third of PostgreSQL's time per event).
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
    let rows = segments(records, &seqs, &order);
    let flat = || order.iter().map(|&i| &records[i]);
    // The records flat, in row order; each row takes its slice (1-based,
    // inclusive bounds) of the arrays.
    sqlx::query(
        "INSERT INTO outbox_batches (topic, partition, first_seq, last_seq, keys, payloads, headers,
                                     source_topic, source_partition, source_offsets,
                                     first_source_offset, last_source_offset, record_bytes)
         SELECT s.topic, s.partition, s.first_seq, s.first_seq + s.hi - s.lo,
                ($1::bytea[])[s.lo:s.hi], ($2::bytea[])[s.lo:s.hi], ($3::text[])[s.lo:s.hi],
                s.source_topic, s.source_partition,
                CASE WHEN s.source_topic IS NOT NULL THEN ($4::bigint[])[s.lo:s.hi] END,
                s.first_source_offset, s.last_source_offset, s.bytes
         FROM UNNEST($5::text[], $6::int[], $7::bigint[], $8::int[], $9::int[],
                     $10::text[], $11::int[], $12::bigint[], $13::bigint[], $14::bigint[])
              AS s(topic, partition, first_seq, lo, hi, source_topic, source_partition,
                   first_source_offset, last_source_offset, bytes)",
    )
    .bind(flat().map(|r| r.key.as_deref()).collect::<Vec<_>>())
    .bind(flat().map(|r| r.payload.as_slice()).collect::<Vec<_>>())
    .bind(flat().map(|r| encode_headers(&r.headers)).collect::<Vec<_>>())
    .bind(flat().map(|r| r.source.as_ref().map(|s| s.offset)).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.topic).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.partition).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.first_seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.lo).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.hi).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.source.map(|(t, _)| t)).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.source.map(|(_, p)| p)).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.source_offsets.map(|o| o.0)).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.source_offsets.map(|o| o.1)).collect::<Vec<_>>())
    .bind(rows.iter().map(|s| s.bytes).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await
    .context("inserting outbox records")?;
    Ok(seqs)
}

/// One row of `outbox_batches`: the records `lo..=hi` (1-based) of the
/// flat arrays, numbered from `first_seq`.
#[derive(Debug, PartialEq, Eq)]
struct Segment<'a> {
    topic: &'a str,
    partition: i32,
    first_seq: i64,
    lo: i32,
    hi: i32,
    source: Option<(&'a str, i32)>,
    /// The lowest and highest source offset of the records.
    source_offsets: Option<(i64, i64)>,
    /// Bytes of the records' keys, payloads and headers.
    bytes: i64,
}

/// Bytes of a record's key, payload and headers.
fn record_bytes(r: &OutboxRecord) -> i64 {
    let headers: usize = r.headers.iter().map(|(name, value)| name.len() + value.len()).sum();
    (r.key.as_ref().map_or(0, Vec::len) + r.payload.len() + headers) as i64
}

/// Cuts the records, taken in `order` (by output partition, then sequence),
/// into rows: a row holds consecutive records of one output partition with
/// one source partition (or none), so its sequence numbers are contiguous.
fn segments<'a>(records: &'a [OutboxRecord], seqs: &[i64], order: &[usize]) -> Vec<Segment<'a>> {
    let mut rows: Vec<Segment<'a>> = Vec::new();
    for (position, &i) in order.iter().enumerate() {
        let r = &records[i];
        let source = r.source.as_ref().map(|s| (s.topic.as_str(), s.partition));
        let offset = r.source.as_ref().map(|s| s.offset);
        let index = position as i32 + 1;
        match rows.last_mut() {
            Some(row)
                if row.topic == r.topic
                    && row.partition == r.partition
                    && row.source == source
                    && row.first_seq + i64::from(row.hi - row.lo) + 1 == seqs[i] =>
            {
                row.hi = index;
                row.bytes += record_bytes(r);
                if let (Some((low, high)), Some(offset)) = (row.source_offsets.as_mut(), offset) {
                    *low = (*low).min(offset);
                    *high = (*high).max(offset);
                }
            }
            _ => rows.push(Segment {
                topic: &r.topic,
                partition: r.partition,
                first_seq: seqs[i],
                lo: index,
                hi: index,
                source,
                source_offsets: offset.map(|o| (o, o)),
                bytes: record_bytes(r),
            }),
        }
    }
    rows
}

/// Makes `owner` the publisher of an output partition, and then waits until
/// no round of a former owner is in flight: until no session holds the
/// partition's fence (see [`take_fences`]), for at most [`FENCE_PATIENCE`]. The former owner's next round
/// takes the fence after the claim is committed, and so finds the partition
/// claimed. No transaction stays open while it waits (the fence is polled,
/// one short statement at a time).
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
    // Bounded: a former owner whose round hangs on unreachable brokers must
    // not stall this relay's other partitions (nor a revocation waiting for
    // the round). The claim stays; the next round waits again.
    let deadline = std::time::Instant::now() + FENCE_PATIENCE;
    loop {
        // One statement takes the fence and lets it go at once: nothing
        // can leave it held on a pooled connection.
        let free: bool = sqlx::query_scalar(
            "SELECT CASE WHEN pg_try_advisory_lock(hashtext($1), $2)
                         THEN pg_advisory_unlock(hashtext($1), $2) ELSE false END",
        )
        .bind(topic)
        .bind(partition)
        .fetch_one(pool)
        .await
        .context("waiting for a former owner's publishing round")?;
        if free {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a former owner's publishing round on {topic} partition {partition} is still in flight after {FENCE_PATIENCE:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// How long a claim waits for a former owner's round before it gives up
/// for this round.
pub const FENCE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts a publishing round on the relay's own connection: takes the
/// fences (session-level advisory locks, one per output partition) that no
/// other session holds, and returns their partitions. They are held, with
/// no transaction open, until [`release_fences`] or the connection ends (a
/// relay that dies lets go of them).
pub async fn take_fences(
    conn: &mut PgConnection,
    partitions: &[(String, i32)],
) -> anyhow::Result<std::collections::HashSet<(String, i32)>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT w.topic, w.partition FROM UNNEST($1::text[], $2::int[]) AS w(topic, partition)
         WHERE pg_try_advisory_lock(hashtext(w.topic), w.partition)",
    )
    .bind(partitions.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
    .bind(partitions.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(conn)
    .await
    .context("taking the fences of output partitions")?;
    Ok(rows.into_iter().collect())
}

/// Ends a publishing round: lets go of every fence the connection holds.
pub async fn release_fences(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(conn)
        .await
        .context("releasing the fences of output partitions")?;
    Ok(())
}

/// Which of these partitions `owner` still publishes. Read after their
/// fences are taken (a statement of its own, so that it sees every claim
/// committed before): a claim committed later waits for the round.
pub async fn still_claimed(
    conn: &mut PgConnection,
    owner: &str,
    partitions: &[(String, i32)],
) -> anyhow::Result<std::collections::HashSet<(String, i32)>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT o.topic, o.partition FROM outbox_owners o
         JOIN UNNEST($1::text[], $2::int[]) AS w(topic, partition) USING (topic, partition)
         WHERE o.owner = $3",
    )
    .bind(partitions.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
    .bind(partitions.iter().map(|p| p.1).collect::<Vec<_>>())
    .bind(owner)
    .fetch_all(conn)
    .await
    .context("reading claimed output partitions")?;
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
/// at most about `limit` records and `byte_limit` bytes per partition (whole
/// rows: a row of a batch is not cut, and the first row is always read):
/// one round trip for every owned partition. Each partition's scan reads at
/// most `limit` rows, in the primary key's order from `after` (every row
/// holds a record at least): a round costs the same whatever the backlog.
pub async fn pending_many(
    pool: &PgPool,
    after: &[(String, i32, i64)],
    limit: i64,
    byte_limit: i64,
) -> anyhow::Result<Vec<(String, i32, StoredRecord)>> {
    type Row = (String, i32, i64, i64, Vec<Option<Vec<u8>>>, Vec<Vec<u8>>, Vec<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT w.topic, w.partition, w.after_seq, o.first_seq, o.keys, o.payloads, o.headers
         FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS w(topic, partition, after_seq)
         CROSS JOIN LATERAL (
             SELECT first_seq, keys, payloads, headers FROM (
                 SELECT first_seq, last_seq, keys, payloads, headers, record_bytes,
                        sum(last_seq - GREATEST(first_seq, w.after_seq + 1) + 1)
                            OVER (ORDER BY last_seq) AS through,
                        sum(record_bytes) OVER (ORDER BY last_seq) AS through_bytes
                 FROM (
                     SELECT * FROM outbox_batches o
                     WHERE o.topic = w.topic AND o.partition = w.partition AND o.last_seq > w.after_seq
                     ORDER BY o.last_seq
                     LIMIT $4
                 ) o
             ) r
             WHERE r.through - (r.last_seq - GREATEST(r.first_seq, w.after_seq + 1) + 1) < $4
               AND r.through_bytes - r.record_bytes < $5
         ) o
         ORDER BY w.topic, w.partition, o.first_seq",
    )
    .bind(after.iter().map(|a| a.0.clone()).collect::<Vec<_>>())
    .bind(after.iter().map(|a| a.1).collect::<Vec<_>>())
    .bind(after.iter().map(|a| a.2).collect::<Vec<_>>())
    .bind(limit)
    .bind(byte_limit)
    .fetch_all(pool)
    .await
    .context("reading pending outbox records")?;
    let mut records = Vec::new();
    for (topic, partition, after_seq, first_seq, keys, payloads, headers) in rows {
        for (n, ((key, payload), headers)) in keys.into_iter().zip(payloads).zip(headers).enumerate() {
            let seq = first_seq + n as i64;
            if seq <= after_seq {
                continue;
            }
            let headers = decode_headers(&headers)?;
            records.push((
                topic.clone(),
                partition,
                StoredRecord {
                    seq,
                    key,
                    payload,
                    headers,
                },
            ));
        }
    }
    Ok(records)
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

/// Deletes up to `chunk` rows of published records older than the
/// retention time; returns how many rows and records that was. A statement
/// reads at most `chunk` rows of each output partition, the oldest first
/// (the primary key's order), and stops at `chunk` rows in all: its cost
/// does not grow with the outbox. Rows are stored in sequence order, so the
/// expired ones come first; one stored out of that order by a few moments
/// goes at a later purge. (One unbounded `DELETE` held the locks and the
/// WAL of a whole retention period's worth of rows in one transaction.)
pub async fn delete_expired_chunk(pool: &PgPool, retention_days: u32, chunk: i64) -> anyhow::Result<(u64, u64)> {
    let (rows, records): (i64, i64) = sqlx::query_as(
        "WITH doomed AS (
             SELECT d.topic, d.partition, d.last_seq
             FROM outbox_published p
             CROSS JOIN LATERAL (
                 SELECT o.topic, o.partition, o.last_seq, o.created_time FROM outbox_batches o
                 WHERE o.topic = p.topic AND o.partition = p.partition AND o.last_seq <= p.published_seq
                 ORDER BY o.last_seq
                 LIMIT $2
             ) d
             WHERE d.created_time < now() - make_interval(days => $1)
             LIMIT $2
         ), deleted AS (
             DELETE FROM outbox_batches o USING doomed d
             WHERE o.topic = d.topic AND o.partition = d.partition AND o.last_seq = d.last_seq
             RETURNING o.last_seq - o.first_seq + 1 AS records
         )
         SELECT count(*), COALESCE(sum(records), 0)::bigint FROM deleted",
    )
    .bind(retention_days as i32)
    .bind(chunk)
    .fetch_one(pool)
    .await
    .context("deleting expired outbox records")?;
    Ok((rows as u64, records as u64))
}

/// Deletes published records older than the retention time, `chunk` rows a
/// statement with `pause` between statements (each its own short
/// transaction), until a statement finds none; returns how many records,
/// and how many statements deleted some.
pub async fn delete_expired(
    pool: &PgPool,
    retention_days: u32,
    chunk: i64,
    pause: std::time::Duration,
) -> anyhow::Result<(u64, u32)> {
    let (mut records, mut statements) = (0, 0);
    loop {
        let (rows, deleted) = delete_expired_chunk(pool, retention_days, chunk).await?;
        if rows == 0 {
            return Ok((records, statements));
        }
        records += deleted;
        statements += 1;
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: i32, source: Option<(&str, i32, i64)>) -> OutboxRecord {
        OutboxRecord {
            topic: topic.to_owned(),
            partition,
            key: None,
            payload: b"{}".to_vec(),
            headers: Headers::new(),
            source: source.map(|(topic, partition, offset)| SourcePosition {
                topic: topic.to_owned(),
                partition,
                offset,
            }),
        }
    }

    /// Topic, partition, first seq, slice bounds and source offsets.
    type Row = (String, i32, i64, i32, i32, Option<(i64, i64)>);

    fn cut(records: &[OutboxRecord], seqs: &[i64]) -> Vec<Row> {
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_unstable_by_key(|&i| (records[i].topic.as_str(), records[i].partition, seqs[i]));
        segments(records, seqs, &order)
            .into_iter()
            .map(|s| {
                (
                    s.topic.to_owned(),
                    s.partition,
                    s.first_seq,
                    s.lo,
                    s.hi,
                    s.source_offsets,
                )
            })
            .collect()
    }

    #[test]
    fn stored_headers_keep_their_encoding() {
        let headers: Headers = [("status", &b"created"[..]), ("trace", &[0, 1][..])]
            .into_iter()
            .collect();
        let stored = r#"[["status","Y3JlYXRlZA=="],["trace","AAE="]]"#;
        assert_eq!(encode_headers(&headers), stored);
        assert_eq!(decode_headers(stored).unwrap(), headers);
    }

    #[test]
    fn a_batch_is_one_row_per_output_partition() {
        let records = [
            record("results", 3, Some(("events", 3, 10))),
            record("results", 1, Some(("events", 1, 7))),
            record("alerts", 3, Some(("events", 3, 10))),
            record("results", 3, Some(("events", 3, 12))),
            record("results", 1, Some(("events", 1, 8))),
        ];
        let seqs = [41, 5, 1, 42, 6];
        assert_eq!(
            cut(&records, &seqs),
            vec![
                ("alerts".to_owned(), 3, 1, 1, 1, Some((10, 10))),
                ("results".to_owned(), 1, 5, 2, 3, Some((7, 8))),
                ("results".to_owned(), 3, 41, 4, 5, Some((10, 12))),
            ]
        );
    }

    #[test]
    fn records_of_another_source_or_of_none_start_a_row_of_their_own() {
        let records = [
            record("dlq", 0, Some(("events", 0, 4))),
            record("dlq", 0, Some(("subscriptions", 0, 4))),
            record("dlq", 0, None),
            record("dlq", 0, None),
            record("dlq", 0, Some(("events", 0, 9))),
        ];
        let seqs = [1, 2, 3, 4, 5];
        assert_eq!(
            cut(&records, &seqs),
            vec![
                ("dlq".to_owned(), 0, 1, 1, 1, Some((4, 4))),
                ("dlq".to_owned(), 0, 2, 2, 2, Some((4, 4))),
                ("dlq".to_owned(), 0, 3, 3, 4, None),
                ("dlq".to_owned(), 0, 5, 5, 5, Some((9, 9))),
            ]
        );
    }

    #[test]
    fn a_row_covers_the_lowest_to_the_highest_source_offset() {
        let records = [
            record("results", 0, Some(("events", 0, 20))),
            record("results", 0, Some(("events", 0, 18))),
        ];
        assert_eq!(
            cut(&records, &[7, 8]),
            vec![("results".to_owned(), 0, 7, 1, 2, Some((18, 20)))]
        );
    }
}
