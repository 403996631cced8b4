-- Subscriptions as the latest snapshot left them.
CREATE TABLE subscriptions (
    id            text PRIMARY KEY,
    version       bigint NOT NULL,
    status        text NOT NULL,
    deleted       boolean NOT NULL DEFAULT false,
    trial_end_time timestamptz,
    updated_time  timestamptz NOT NULL DEFAULT now()
);

-- Service periods, half-open [start_time, end_time). The open-ended period of
-- a subscription that never named one starts at the earliest timestamp and
-- has no end until a real period cuts it. `used` is the accepted quantity.
CREATE TABLE service_periods (
    subscription_id text NOT NULL REFERENCES subscriptions (id),
    start_time      timestamptz NOT NULL,
    end_time        timestamptz,
    hard_limit      numeric,
    soft_limit      numeric,
    trial_limit     numeric,
    used            numeric NOT NULL DEFAULT 0,
    closed_time     timestamptz,
    PRIMARY KEY (subscription_id, start_time),
    CHECK (end_time IS NULL OR end_time > start_time),
    CHECK (used >= 0)
);

-- Accepted usages. Their ids are the idempotency keys and are kept.
CREATE TABLE usages (
    id                 text PRIMARY KEY,
    subscription_id    text NOT NULL,
    quantity           numeric NOT NULL CHECK (quantity > 0),
    requested_quantity numeric NOT NULL,
    accept_partial     boolean NOT NULL,
    usage_time         timestamptz NOT NULL,
    period_start_time  timestamptz NOT NULL,
    invoice_id         text,
    invoice_item_id    text,
    created_time       timestamptz NOT NULL,
    updated_time       timestamptz NOT NULL,
    source_partition   integer,
    source_offset      bigint
);
CREATE INDEX usages_by_subscription_period ON usages (subscription_id, period_start_time);

-- Where each consumer group is, per topic partition: the next offset to
-- decide. Advanced only in the transaction that decided the messages before
-- it, by compare-and-set.
CREATE TABLE consumer_offsets (
    group_id     text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint NOT NULL,
    updated_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Per output partition: the next outbox sequence number to hand out and the
-- last one known to be on the topic.
CREATE TABLE outbox_partitions (
    topic         text NOT NULL,
    partition     integer NOT NULL,
    next_seq      bigint NOT NULL DEFAULT 1,
    published_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, partition)
);

-- The transactional outbox: every record the worker publishes, written in the
-- transaction that decided it. For usage outcomes it is also the decision
-- record: one row per source message (see the unique index).
CREATE TABLE outbox (
    topic            text NOT NULL,
    partition        integer NOT NULL,
    seq              bigint NOT NULL,
    key              bytea,
    payload          bytea NOT NULL,
    headers          jsonb NOT NULL,
    source_topic     text,
    source_partition integer,
    source_offset    bigint,
    created_time     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, seq)
);
CREATE UNIQUE INDEX outbox_one_decision_per_message
    ON outbox (topic, source_topic, source_partition, source_offset)
    WHERE source_topic IS NOT NULL;
