-- Trial limit: caps all usage with a usageTime before trial_end_time, across
-- periods. trial_used is that accepted quantity.
ALTER TABLE subscriptions
    ADD COLUMN trial_limit numeric,
    ADD COLUMN trial_used  numeric NOT NULL DEFAULT 0 CHECK (trial_used >= 0);

-- One alert per period and kind, ever: the primary key is the guarantee.
CREATE TABLE limit_alerts (
    subscription_id   text NOT NULL,
    period_start_time timestamptz NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('soft', 'hard', 'trial')),
    usage_id          text NOT NULL,
    limit_quantity    numeric NOT NULL,
    used              numeric NOT NULL,
    created_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, period_start_time, kind)
);

CREATE INDEX usages_by_subscription_time ON usages (subscription_id, usage_time);
