-- Canvas store, SQLite backend: what the daemon (`canvas serve`) keeps. Same conventions as
-- 0001 (times are INTEGER milliseconds since the Unix epoch).

-- Dispatcher leases. A dispatcher claims due pending rows by setting `lease_until`; until
-- then no other dispatcher (in this process or another daemon) takes them. A dispatcher that
-- dies leaves its lease to run out, and the rows are claimed again: delivery is at least
-- once, and `key` is the idempotency key receivers dedupe on. Claims walk `outbox_pending`
-- (0001), which holds every pending row; leased rows are filtered there, not indexed.
ALTER TABLE outbox ADD COLUMN lease_until INTEGER; -- ms; NULL = not leased
ALTER TABLE outbox ADD COLUMN claimed_by TEXT;     -- the dispatcher holding (or last holding) it
ALTER TABLE outbox ADD COLUMN dead_at INTEGER;     -- ms: when the row was given up on
-- The dead letters, for the metrics and for operators looking for them.
CREATE INDEX outbox_dead ON outbox (dead_at) WHERE status = 'dead';

-- Flows paused by an operator, through the daemon's API (what a pause holds back is the
-- daemon's business). A flow without a row is not paused; unpausing keeps the row.
CREATE TABLE flow_state (
    flow        TEXT    NOT NULL PRIMARY KEY,
    paused      INTEGER NOT NULL,                 -- bool
    updated_at  INTEGER NOT NULL                  -- ms
) WITHOUT ROWID;

-- Schedule ticks already fired. Several daemons may compute the same tick: the one whose
-- insert lands fires it, the others see the key taken.
CREATE TABLE schedule_fires (
    flow        TEXT    NOT NULL,
    fire_at     INTEGER NOT NULL,                 -- ms: the tick (the schedule's instant)
    fired_at    INTEGER NOT NULL,                 -- ms (wall clock): when it was claimed
    PRIMARY KEY (flow, fire_at)
) WITHOUT ROWID;
