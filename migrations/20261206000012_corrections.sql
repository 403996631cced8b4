-- Corrections (SPEC "Corrections: void and amend"): a usage is never
-- deleted. A void marks its row; an amendment replaces its quantity. Every
-- correction is kept in `usage_corrections`, so a usage's history is its
-- report (the row's creation) followed by its corrections in order.
--
-- The new columns are nullable without defaults: adding them rewrites
-- nothing and holds the table's lock only for the catalog change.
ALTER TABLE usages
    -- Set once, by the void; the row stays and its id stays taken.
    ADD COLUMN voided_time timestamptz,
    ADD COLUMN void_reason text,
    ADD COLUMN voided_by text,
    -- The quantity the latest amendment asked for (null until amended): a
    -- repeated amendment is recognised by it. `requested_quantity` stays the
    -- original report's, which is what a re-sent report is compared with.
    ADD COLUMN last_requested_quantity numeric;

CREATE TABLE usage_corrections (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    usage_id          text COLLATE "C" NOT NULL,
    time              timestamptz NOT NULL,
    action            text NOT NULL CHECK (action IN ('amended', 'voided')),
    -- The usage's quantity after the correction (a void leaves it as it was).
    quantity          numeric NOT NULL,
    previous_quantity numeric NOT NULL,
    requested_quantity numeric,
    -- The HTTP caller's name, or `kafka`.
    by                text NOT NULL,
    reason            text
);
CREATE INDEX usage_corrections_by_usage ON usage_corrections (usage_id, seq);
