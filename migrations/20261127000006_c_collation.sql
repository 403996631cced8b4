-- Byte order for the text keys of the tables every decided event writes or
-- probes. Under the database's default collation each comparison goes
-- through the locale (copying both strings to compare them); with "C" it
-- is a memcmp. Profiled with `usage-worker bench` and perf: text
-- comparisons in btree inserts and lookups were about a tenth of
-- PostgreSQL's time. Ids are compared for equality and ordered only to
-- lock in a fixed order, so byte order serves them as well as any.
ALTER TABLE subscriptions ALTER COLUMN id TYPE text COLLATE "C";
ALTER TABLE service_periods ALTER COLUMN subscription_id TYPE text COLLATE "C";
ALTER TABLE usages
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN subscription_id TYPE text COLLATE "C";
ALTER TABLE limit_alerts ALTER COLUMN subscription_id TYPE text COLLATE "C";
ALTER TABLE outbox
    ALTER COLUMN topic TYPE text COLLATE "C",
    ALTER COLUMN source_topic TYPE text COLLATE "C";
