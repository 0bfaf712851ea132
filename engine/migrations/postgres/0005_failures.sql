-- Canvas store, Postgres backend: run-time failures. Same conventions as 0001 (times are
-- BIGINT milliseconds since the Unix epoch).

-- What failed while the engine ran, where a run's history alone cannot say so (an
-- expression in a trigger's `where`, an audience, a segment, a goal or an exit rule that
-- could not be evaluated, so nobody entered or nothing happened), and every step that ended
-- a run with an error. One row per flow, step and customer: how many times, and the last
-- error. `step` is a step id, or `trigger`, `audience`, `segment`, `goal`, `exit`.
CREATE TABLE failures (
    flow        TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    customer_id TEXT    NOT NULL,
    count       BIGINT  NOT NULL,
    error       TEXT    NOT NULL,
    at          BIGINT  NOT NULL,                 -- ms: the last time
    PRIMARY KEY (flow, step, customer_id)
);
CREATE INDEX failures_customer ON failures (customer_id);
