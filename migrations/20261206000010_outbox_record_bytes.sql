-- The bytes of each stored batch's records (keys, payloads and headers), so
-- that a publishing round can bound what it reads by bytes as well as by
-- records: a few records of nearly a megabyte each (dead-letter copies) must
-- not make a round hold gigabytes. Adding a column with a constant default
-- changes only the catalogue, not the table's rows; rows stored before count
-- as 0 bytes and are bounded by their record count alone, as before.
ALTER TABLE outbox_batches ADD COLUMN record_bytes bigint NOT NULL DEFAULT 0;
