-- Version 2 limits (SPEC "Limits as the seed's billing system has them"): a
-- soft or hard limit is a quantity or an amount in the plan's currency, and
-- the plan's pricing is remembered per period with the limits. The columns
-- are new and empty, so the checks are added NOT VALID (no scan under the
-- table lock) and validated after, under a lock that lets writes through.
ALTER TABLE service_periods
    ADD COLUMN hard_limit_amount numeric,
    ADD COLUMN soft_limit_amount numeric,
    ADD COLUMN pricing jsonb,
    ADD CONSTRAINT service_periods_one_hard_limit CHECK (hard_limit IS NULL OR hard_limit_amount IS NULL) NOT VALID,
    ADD CONSTRAINT service_periods_one_soft_limit CHECK (soft_limit IS NULL OR soft_limit_amount IS NULL) NOT VALID,
    ADD CONSTRAINT service_periods_amounts_priced
        CHECK ((hard_limit_amount IS NULL AND soft_limit_amount IS NULL) OR pricing IS NOT NULL) NOT VALID;
ALTER TABLE service_periods VALIDATE CONSTRAINT service_periods_one_hard_limit;
ALTER TABLE service_periods VALIDATE CONSTRAINT service_periods_one_soft_limit;
ALTER TABLE service_periods VALIDATE CONSTRAINT service_periods_amounts_priced;

-- Soft-limit steps: alerts at 75, 90 and 100 % of the soft limit, each once
-- per period, so the key gains the threshold (hard and trial stay at 100).
-- An amount limit's alert records the amounts; its quantity limit is null.
ALTER TABLE limit_alerts
    ADD COLUMN threshold smallint NOT NULL DEFAULT 100 CHECK (threshold IN (75, 90, 100)),
    ADD COLUMN limit_amount numeric,
    ADD COLUMN used_amount numeric,
    ADD COLUMN currency text,
    ALTER COLUMN limit_quantity DROP NOT NULL,
    DROP CONSTRAINT limit_alerts_pkey,
    ADD PRIMARY KEY (subscription_id, period_start_time, kind, threshold);

-- A period's `alerted` holds each raised step as `kind` (at 100 %, as in
-- version 1) or `kind:threshold` (`soft:75`).
CREATE FUNCTION limit_alert_step(kind text, threshold smallint) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN threshold = 100 THEN kind ELSE kind || ':' || threshold END $$;

CREATE OR REPLACE FUNCTION limit_alerts_mark_period() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE service_periods SET alerted = array_remove(alerted, limit_alert_step(OLD.kind, OLD.threshold))
        WHERE subscription_id = OLD.subscription_id AND start_time = OLD.period_start_time;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE service_periods SET alerted = array_append(alerted, limit_alert_step(NEW.kind, NEW.threshold))
        WHERE subscription_id = NEW.subscription_id AND start_time = NEW.period_start_time;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER limit_alerts_mark_period ON limit_alerts;
CREATE TRIGGER limit_alerts_mark_period AFTER INSERT OR DELETE OR UPDATE OF subscription_id, period_start_time, kind, threshold
    ON limit_alerts FOR EACH ROW EXECUTE FUNCTION limit_alerts_mark_period();

-- The invoice that billed a period (the latest applied, as on its usages),
-- for the usage status.
ALTER TABLE service_periods ADD COLUMN invoice_id text;
UPDATE service_periods p SET invoice_id = u.invoice_id
FROM (SELECT DISTINCT ON (subscription_id, period_start_time) subscription_id, period_start_time, invoice_id
      FROM usages WHERE invoice_id IS NOT NULL
      ORDER BY subscription_id, period_start_time, updated_time DESC) u
WHERE u.subscription_id = p.subscription_id AND u.period_start_time = p.start_time AND p.closed_time IS NOT NULL;
