-- Measured with `usage-worker bench`: every index and every jsonb parse is
-- paid per decided event.
-- The trial recomputation (rare: only when a snapshot moves trialEndTime)
-- reads a subscription's usages through usages_by_subscription_period.
DROP INDEX usages_by_subscription_time;
-- Outbox headers are only ever read back whole by the relay: text, not jsonb.
ALTER TABLE outbox ALTER COLUMN headers TYPE text USING headers::text;
