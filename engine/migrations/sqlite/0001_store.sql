-- Canvas store, SQLite backend.
--
-- Conventions: every time is an INTEGER of milliseconds since the Unix epoch (UTC) — exact,
-- compact, and the fastest to compare and index; JSON columns are TEXT holding exactly what
-- serde_json wrote (key order and number spelling survive the round trip). Writes are
-- set-based (`INSERT … SELECT … FROM json_each(?)`), so the tables carry no foreign keys.

-- Customer profiles and the little cross-flow state the engine keeps on them.
CREATE TABLE customers (
    id          TEXT    NOT NULL PRIMARY KEY, -- the CRM's customer id
    attributes  TEXT    NOT NULL,             -- JSON object: profile attributes as sent
    timezone    TEXT,                         -- IANA zone; NULL = the engine's default
    sends       TEXT    NOT NULL,             -- JSON array of recent marketing sends (caps)
    cooldowns   TEXT    NOT NULL,             -- JSON object: cooldown key -> last pass
    unsubscribed_at INTEGER,                  -- ms; set while the customer has opted out
    updated_at  INTEGER NOT NULL              -- ms
);

-- Ingested work (events and profile updates), applied in `seq` order.
CREATE TABLE inbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT, -- arrival order, never reused
    event_id    TEXT UNIQUE,                  -- dedupe key: the event's id; `call:KEY` for a call
                                              -- result (KEY = RUN_ID/STEP); NULL for profile updates
    customer_id TEXT    NOT NULL,
    item        TEXT    NOT NULL,             -- JSON InboxItem ({"kind":"event"|"profile",…})
    at          INTEGER NOT NULL,             -- ms: when the event occurred / the update was made
    applied_at  INTEGER                       -- ms (wall clock) when applied; NULL = pending
);
-- The pending tail only: `inbox_pending` never walks applied rows.
CREATE INDEX inbox_pending ON inbox (seq) WHERE applied_at IS NULL;

-- Compiled flow versions, so a run can always find the version it is pinned to.
CREATE TABLE flow_versions (
    flow        TEXT    NOT NULL,
    version     TEXT    NOT NULL,             -- content hash
    source      TEXT    NOT NULL,             -- the flow file as compiled
    created_at  INTEGER NOT NULL,             -- ms
    PRIMARY KEY (flow, version)
);

-- One customer's journey through one version of one flow.
CREATE TABLE runs (
    id            TEXT    NOT NULL PRIMARY KEY, -- FLOW/CUSTOMER/N
    flow          TEXT    NOT NULL,
    version       TEXT    NOT NULL,           -- flow version the run is pinned to
    customer_id   TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('waiting', 'ended')),
    step          TEXT,                       -- the step it waits at; NULL once ended
    wake_at       INTEGER,                    -- ms: timer; NULL = waits for an event only
    waiting_for   TEXT,                       -- event name a `wait: { event }` listens for
    vars          TEXT    NOT NULL,           -- JSON object: values the run stored
    event         TEXT,                       -- JSON Event: the latest the run saw
    arm           TEXT    NOT NULL CHECK (arm IN ('treated', 'control')),
    last_touch    TEXT,                       -- last step that touched the customer
    goal_until    INTEGER,                    -- ms: goal conversions count until then
    converted_at  INTEGER,                    -- ms
    outcome       TEXT,                       -- why it ended
    seq           INTEGER NOT NULL,           -- transitions so far
    entered_at    INTEGER NOT NULL,           -- ms
    updated_at    INTEGER NOT NULL,           -- ms
    -- A waiting run always waits *somewhere*.
    CHECK (status <> 'waiting' OR step IS NOT NULL)
);
-- `due` / `next_wake`: only waiting runs are indexed (status is the partial predicate);
-- `id` breaks ties, so `due` reads in a deterministic order without a sort.
CREATE INDEX runs_due ON runs (wake_at, id) WHERE status = 'waiting';
-- `load` and a customer's journey.
CREATE INDEX runs_customer ON runs (customer_id);

-- A customer's entries into a flow (entry rules, segment edges). Keyed customer first so
-- `load` finds a customer's rows without a second index.
CREATE TABLE enrolments (
    customer_id     TEXT    NOT NULL,
    flow            TEXT    NOT NULL,
    entries         INTEGER NOT NULL,
    last_entered_at INTEGER,                  -- ms
    active_run      TEXT,                     -- the run still going, if any
    in_segment      INTEGER NOT NULL,         -- bool: inside the segment when last checked
    PRIMARY KEY (customer_id, flow)
) WITHOUT ROWID;

-- One row per executed step: the audit trail. Read in insertion (rowid) order: the order
-- steps executed.
CREATE TABLE history (
    run_id      TEXT    NOT NULL,
    seq         INTEGER NOT NULL,             -- the run's transition number
    flow        TEXT    NOT NULL,
    customer_id TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    at          INTEGER NOT NULL,             -- ms
    action      TEXT    NOT NULL,             -- sent, skipped, waiting, branch, ended, …
    detail      TEXT    NOT NULL,             -- JSON: the particulars
    PRIMARY KEY (run_id, seq)
);

-- The transactional outbox: deliveries written with the transition that produced them.
-- Read in insertion (rowid) order.
CREATE TABLE outbox (
    key             TEXT    NOT NULL PRIMARY KEY, -- RUN_ID/STEP_ID, the idempotency key
    kind            TEXT    NOT NULL CHECK (kind IN ('message', 'call', 'task')),
    run_id          TEXT    NOT NULL,
    flow            TEXT    NOT NULL,
    customer_id     TEXT    NOT NULL,
    step            TEXT    NOT NULL,
    channel         TEXT    NOT NULL,         -- sms, email, …; webhook name; `task`
    address         TEXT,                     -- phone, e-mail, …
    template        TEXT,
    payload         TEXT    NOT NULL,         -- JSON: rendered content / request body / task
    transactional   INTEGER NOT NULL,         -- bool: exempt from marketing caps
    created_at      INTEGER NOT NULL,         -- ms
    -- Dispatcher state.
    status          TEXT    NOT NULL DEFAULT 'pending', -- pending, sent, dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,                  -- ms; set to created_at on insert
    last_error      TEXT,
    sent_at         INTEGER                   -- ms
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_customer ON outbox (customer_id);

-- Goals reached within their window, attributed to the flow and the last touch.
CREATE TABLE conversions (
    run_id      TEXT    NOT NULL PRIMARY KEY, -- a run converts at most once
    flow        TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    customer_id TEXT    NOT NULL,
    arm         TEXT    NOT NULL CHECK (arm IN ('treated', 'control')),
    last_touch  TEXT,
    event_id    TEXT    NOT NULL,             -- the goal event
    at          INTEGER NOT NULL              -- ms
);
