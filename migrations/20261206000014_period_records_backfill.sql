-- Periods an invoice billed before closing records existed get none: the
-- invoicing that billed them needs no record to bill them again (a consumer
-- that bills on `usage-period-closed` would bill them twice). They are
-- marked as recorded, closed by their invoice at the time it closed them
-- (else at their end). Periods closed by time and not yet invoiced are left
-- to the sweep: their records are what invoicing waits for.
--
-- Apart from 013, so that these row updates do not run under the table lock
-- that 013's ALTER TABLE holds until its transaction ends.
UPDATE service_periods
SET closed_by = 'invoice',
    record_closed_time = coalesce(closed_time, end_time, now()),
    recorded_time = now()
WHERE invoice_id IS NOT NULL AND closed_by IS NULL;
