-- The outbox stores a batch's records for one output partition as one row:
-- the records' keys, payloads and headers as arrays, numbered first_seq to
-- last_seq. One row per record cost a heap tuple and two index entries per
-- decided event; measured in psql on 2,000 outcome records of about 1 KB,
-- the per-record insert took 51-80 ms and the same records as twelve rows
-- 13-24 ms. The arrays are stored out of line uncompressed (STORAGE
-- EXTERNAL): compressing a batch of outcomes costs more CPU than its bytes
-- cost to write.
--
-- The decision record's database-level guarantee stays: a row of records
-- decided from a source partition covers the source offsets from
-- first_source_offset to last_source_offset, and no two rows of one output
-- topic cover the same source offset, as the former unique index said per
-- record. A unique index refuses a second row starting at the same offset
-- (the same batch decided twice); a trigger refuses any other overlap. (An
-- exclusion constraint over offset ranges says the same in one line, but
-- its GiST index, offsets of every partition overlapping in it, was
-- measured reading about 75 pages per check at 16,000 rows, growing with
-- the rows kept.)

-- Its name goes to the index that replaces it.
DROP INDEX outbox_one_decision_per_message;

CREATE TABLE outbox_batches (
    topic               text COLLATE "C" NOT NULL,
    partition           integer NOT NULL,
    first_seq           bigint NOT NULL,
    last_seq            bigint NOT NULL,
    keys                bytea[] NOT NULL,
    payloads            bytea[] NOT NULL,
    headers             text[] NOT NULL,
    source_topic        text COLLATE "C",
    source_partition    integer,
    source_offsets      bigint[],
    first_source_offset bigint,
    last_source_offset  bigint,
    created_time        timestamptz NOT NULL DEFAULT now(),
    CHECK (first_seq >= 1 AND last_seq >= first_seq),
    CHECK (cardinality(payloads) = last_seq - first_seq + 1
           AND cardinality(keys) = cardinality(payloads)
           AND cardinality(headers) = cardinality(payloads)),
    CHECK ((source_topic IS NULL AND source_partition IS NULL AND source_offsets IS NULL
            AND first_source_offset IS NULL AND last_source_offset IS NULL)
        OR (source_topic IS NOT NULL AND source_partition IS NOT NULL
            AND cardinality(source_offsets) = cardinality(payloads)
            AND first_source_offset <= last_source_offset)),
    PRIMARY KEY (topic, partition, last_seq)
);
CREATE UNIQUE INDEX outbox_one_decision_per_message
    ON outbox_batches (topic, source_topic, source_partition, first_source_offset)
    WHERE source_topic IS NOT NULL;

-- Rows are disjoint, so only the row starting last at or before the new
-- row's end can overlap it. Deciders of one source partition are serialised
-- on its consumer_offsets row; the unique index covers the rest.
CREATE FUNCTION outbox_batches_disjoint() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.source_topic IS NOT NULL AND EXISTS (
        SELECT 1 FROM (
            SELECT last_source_offset FROM outbox_batches
            WHERE topic = NEW.topic AND source_topic = NEW.source_topic
              AND source_partition = NEW.source_partition
              AND first_source_offset <= NEW.last_source_offset
            ORDER BY first_source_offset DESC LIMIT 1
        ) previous WHERE previous.last_source_offset >= NEW.first_source_offset
    ) THEN
        RAISE EXCEPTION 'offsets % to % of %/% already have a record in %', NEW.first_source_offset,
            NEW.last_source_offset, NEW.source_topic, NEW.source_partition, NEW.topic
            USING ERRCODE = 'exclusion_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER outbox_batches_disjoint BEFORE INSERT ON outbox_batches
    FOR EACH ROW EXECUTE FUNCTION outbox_batches_disjoint();
ALTER TABLE outbox_batches
    ALTER COLUMN keys SET STORAGE EXTERNAL,
    ALTER COLUMN payloads SET STORAGE EXTERNAL,
    ALTER COLUMN headers SET STORAGE EXTERNAL,
    ALTER COLUMN source_offsets SET STORAGE EXTERNAL;

-- Records stored before this migration, each as a row of its own.
INSERT INTO outbox_batches (topic, partition, first_seq, last_seq, keys, payloads, headers,
                            source_topic, source_partition, source_offsets,
                            first_source_offset, last_source_offset, created_time)
SELECT topic, partition, seq, seq, ARRAY[key], ARRAY[payload], ARRAY[headers],
       source_topic, source_partition,
       CASE WHEN source_topic IS NULL THEN NULL ELSE ARRAY[source_offset] END,
       CASE WHEN source_topic IS NULL THEN NULL ELSE source_offset END,
       CASE WHEN source_topic IS NULL THEN NULL ELSE source_offset END,
       created_time
FROM outbox;
DROP TABLE outbox;

-- One row per record, as the outbox was: for operators and reports. The
-- worker reads and writes outbox_batches.
CREATE VIEW outbox AS
SELECT b.topic, b.partition, b.first_seq + r.n - 1 AS seq, r.key, r.payload, r.headers,
       b.source_topic, b.source_partition, r.source_offset, b.created_time
FROM outbox_batches b
CROSS JOIN LATERAL unnest(b.keys, b.payloads, b.headers, b.source_offsets)
    WITH ORDINALITY AS r(key, payload, headers, source_offset, n);
