-- Which worker's relay publishes each output partition. A relay holds the
-- rows of its partitions locked (FOR UPDATE) for the whole of a publishing
-- round, and a worker taking a partition over claims its row before it reads
-- the partition's last record: the claim waits for a former owner's round in
-- flight, and the former owner's next round finds the row claimed and stops.
-- So two relays never publish one partition at once, even when a worker that
-- was evicted from the group has not noticed it yet.
CREATE TABLE outbox_owners (
    topic      text NOT NULL,
    partition  integer NOT NULL,
    owner      text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
