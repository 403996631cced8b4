-- Closed periods, for invoicing (SPEC version 2): when a period closes, by
-- its end plus grace or by an invoice, exactly one `usage-period-closed`
-- record goes to `usage-periods`. The period remembers that it was written:
-- `closed_by` and `record_closed_time` are set, once, in the transaction
-- that appends the record to the outbox, and only where still unset (the
-- conditional update that lets one worker of many close each period). They
-- say how and when the period closed for new usage (the record's `closedBy`
-- and `closedTime`). `closed_time` keeps its meaning: when an invoice closed
-- the period, if one did.
--
-- The columns are nullable without defaults (no rewrite); the checks are
-- added NOT VALID and validated after, under a lock that lets writes through.
ALTER TABLE service_periods
    ADD COLUMN closed_by text,
    ADD COLUMN record_closed_time timestamptz,
    -- The database's clock when the closing record was staged (for audit;
    -- not part of the record).
    ADD COLUMN recorded_time timestamptz,
    ADD CONSTRAINT service_periods_closed_by CHECK (closed_by IN ('grace', 'invoice')) NOT VALID,
    ADD CONSTRAINT service_periods_recorded_together
        CHECK ((closed_by IS NULL) = (record_closed_time IS NULL)
               AND (closed_by IS NULL) = (recorded_time IS NULL)) NOT VALID;
ALTER TABLE service_periods VALIDATE CONSTRAINT service_periods_closed_by;
ALTER TABLE service_periods VALIDATE CONSTRAINT service_periods_recorded_together;

-- What the sweep looks for: periods without their record whose end plus
-- grace has passed (by end time, oldest first), and the few closed by an
-- invoice without a record (an open-ended period an invoice closed before a
-- snapshot gave it an end, or periods invoiced before this migration).
CREATE INDEX service_periods_unrecorded_by_end ON service_periods (end_time)
    WHERE closed_by IS NULL AND end_time IS NOT NULL;
CREATE INDEX service_periods_unrecorded_invoiced ON service_periods (subscription_id, start_time)
    WHERE closed_by IS NULL AND closed_time IS NOT NULL;
