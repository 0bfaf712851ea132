-- Canvas store, Postgres backend: what the daemon (`canvas serve`) keeps. Same tables and
-- columns as the SQLite backend; same conventions as 0001 (times are bigint milliseconds).

-- Dispatcher leases. A dispatcher claims due pending rows by setting `lease_until`
-- (`FOR UPDATE SKIP LOCKED`, so daemons claiming at the same moment never take the same
-- row); until then no other dispatcher takes them. A dispatcher that dies leaves its lease
-- to run out, and the rows are claimed again: delivery is at least once, and `key` is the
-- idempotency key receivers dedupe on. Claims walk `outbox_pending` (0001), which holds
-- every pending row; leased rows are filtered there, not indexed. Adding nullable columns
-- without a default rewrites nothing.
ALTER TABLE outbox ADD COLUMN lease_until bigint; -- ms; NULL = not leased
ALTER TABLE outbox ADD COLUMN claimed_by text;    -- the dispatcher holding (or last holding) it
ALTER TABLE outbox ADD COLUMN dead_at bigint;     -- ms: when the row was given up on
-- The dead letters, for the metrics and for operators looking for them.
CREATE INDEX outbox_dead ON outbox (dead_at) WHERE status = 'dead';

-- Flows paused by an operator, through the daemon's API (what a pause holds back is the
-- daemon's business). A flow without a row is not paused; unpausing keeps the row.
CREATE TABLE flow_state (
    flow        text    NOT NULL PRIMARY KEY,
    paused      boolean NOT NULL,
    updated_at  bigint  NOT NULL                  -- ms
);

-- Schedule ticks already fired. Several daemons may compute the same tick: the one whose
-- insert lands fires it, the others see the key taken.
CREATE TABLE schedule_fires (
    flow        text    NOT NULL,
    fire_at     bigint  NOT NULL,                 -- ms: the tick (the schedule's instant)
    fired_at    bigint  NOT NULL,                 -- ms (wall clock): when it was claimed
    PRIMARY KEY (flow, fire_at)
);
