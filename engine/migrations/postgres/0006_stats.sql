-- Canvas store, Postgres backend: outcome counters. Same conventions as 0001 (times are
-- BIGINT milliseconds since the Unix epoch).

-- What happened at each step of each flow version, per day: written by the commit that
-- writes the transitions themselves, so pages read these instead of the history. `step` is
-- a step id, or '' for the flow as a whole; `metric` is named in docs/runtime.md
-- ("Outcome counters"); `day` is the local date in the engine's time zone as days since
-- 1970-01-01. Each daemon adds to its own `shard` (several daemons never wait on one
-- counter row); readers sum the shards.
CREATE TABLE step_counts (
    flow        TEXT    NOT NULL,
    day         BIGINT  NOT NULL,
    version     TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    metric      TEXT    NOT NULL,
    shard       BIGINT  NOT NULL,
    n           BIGINT  NOT NULL,
    PRIMARY KEY (flow, day, version, step, metric, shard)
);

-- Runs waiting at each step now: a gauge moved by one as runs arrive and leave (per
-- shard, like `step_counts`), so "waiting now" never counts the runs table. Started from
-- the runs already waiting when this migration runs.
CREATE TABLE step_waiting (
    flow        TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    shard       BIGINT  NOT NULL,
    n           BIGINT  NOT NULL,
    PRIMARY KEY (flow, version, step, shard)
);
INSERT INTO step_waiting (flow, version, step, shard, n)
SELECT flow, version, step, 0, count(*) FROM runs WHERE status = 'waiting'
GROUP BY flow, version, step;

-- The arm each split sent the run down (JSON object: split step id -> arm), so conversions
-- are counted per arm; NULL for a run that passed no split.
ALTER TABLE runs ADD COLUMN splits JSON;
