-- Canvas store, Postgres backend. Same tables and columns as the SQLite backend.
--
-- Conventions: every time is a BIGINT of milliseconds since the Unix epoch (UTC) — exact,
-- identical on both backends, cheap to bind as int8[]; JSON columns are `json`, which keeps
-- exactly the text serde_json wrote (key order and number spelling survive, so templates
-- iterating `vars` see the same order as on SQLite; cast to jsonb to query). Writes are
-- set-based (`INSERT … SELECT … FROM UNNEST($1::text[], …)`), so the tables carry no
-- foreign keys. Tables live in the connection's search_path (one schema per deployment or
-- test).

-- Customer profiles and the little cross-flow state the engine keeps on them.
CREATE TABLE customers (
    id          text   NOT NULL PRIMARY KEY,  -- the CRM's customer id
    attributes  json   NOT NULL,              -- profile attributes as sent
    timezone    text,                         -- IANA zone; NULL = the engine's default
    sends       json   NOT NULL,              -- array of recent marketing sends (caps)
    cooldowns   json   NOT NULL,              -- object: cooldown key -> last pass
    unsubscribed_at bigint,                   -- ms; set while the customer has opted out
    updated_at  bigint NOT NULL               -- ms
);

-- Ingested work (events and profile updates), applied in `seq` order.
CREATE TABLE inbox (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- arrival order
    event_id    text   UNIQUE,                -- dedupe key: the event's id; `call:KEY` for a call
                                              -- result (KEY = RUN_ID/STEP); NULL for profile updates
    customer_id text   NOT NULL,
    item        json   NOT NULL,              -- InboxItem ({"kind":"event"|"profile",…})
    at          bigint NOT NULL,              -- ms: when the event occurred / the update was made
    applied_at  bigint                        -- ms (wall clock) when applied; NULL = pending
);
-- The pending tail only: `inbox_pending` never walks applied rows.
CREATE INDEX inbox_pending ON inbox (seq) WHERE applied_at IS NULL;

-- Compiled flow versions, so a run can always find the version it is pinned to.
CREATE TABLE flow_versions (
    flow        text   NOT NULL,
    version     text   NOT NULL,              -- content hash
    source      text   NOT NULL,              -- the flow file as compiled
    created_at  bigint NOT NULL,              -- ms
    PRIMARY KEY (flow, version)
);

-- One customer's journey through one version of one flow.
CREATE TABLE runs (
    id            text   NOT NULL PRIMARY KEY, -- FLOW/CUSTOMER/N
    flow          text   NOT NULL,
    version       text   NOT NULL,            -- flow version the run is pinned to
    customer_id   text   NOT NULL,
    status        text   NOT NULL CHECK (status IN ('waiting', 'ended')),
    step          text,                       -- the step it waits at; NULL once ended
    wake_at       bigint,                     -- ms: timer; NULL = waits for an event only
    waiting_for   text,                       -- event name a `wait: { event }` listens for
    vars          json   NOT NULL,            -- values the run stored
    event         json,                       -- the latest Event the run saw
    arm           text   NOT NULL CHECK (arm IN ('treated', 'control')),
    last_touch    text,                       -- last step that touched the customer
    goal_until    bigint,                     -- ms: goal conversions count until then
    converted_at  bigint,                     -- ms
    outcome       text,                       -- why it ended
    seq           bigint NOT NULL,            -- transitions so far
    entered_at    bigint NOT NULL,            -- ms
    updated_at    bigint NOT NULL,            -- ms
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
    customer_id     text    NOT NULL,
    flow            text    NOT NULL,
    entries         bigint  NOT NULL,
    last_entered_at bigint,                   -- ms
    active_run      text,                     -- the run still going, if any
    in_segment      boolean NOT NULL,         -- inside the segment when last checked
    PRIMARY KEY (customer_id, flow)
);

-- One row per executed step: the audit trail. Read in insertion (`ord`) order: the order
-- steps executed.
CREATE TABLE history (
    run_id      text   NOT NULL,
    seq         bigint NOT NULL,              -- the run's transition number
    flow        text   NOT NULL,
    customer_id text   NOT NULL,
    step        text   NOT NULL,
    at          bigint NOT NULL,              -- ms
    action      text   NOT NULL,              -- sent, skipped, waiting, branch, ended, …
    detail      json   NOT NULL,              -- the particulars
    ord         bigint GENERATED ALWAYS AS IDENTITY, -- insertion order (not indexed)
    PRIMARY KEY (run_id, seq)
);

-- The transactional outbox: deliveries written with the transition that produced them.
-- Read in insertion (`ord`) order.
CREATE TABLE outbox (
    key             text    NOT NULL PRIMARY KEY, -- RUN_ID/STEP_ID, the idempotency key
    kind            text    NOT NULL CHECK (kind IN ('message', 'call', 'task')),
    run_id          text    NOT NULL,
    flow            text    NOT NULL,
    customer_id     text    NOT NULL,
    step            text    NOT NULL,
    channel         text    NOT NULL,         -- sms, email, …; webhook name; `task`
    address         text,                     -- phone, e-mail, …
    template        text,
    payload         json    NOT NULL,         -- rendered content / request body / task
    transactional   boolean NOT NULL,         -- exempt from marketing caps
    created_at      bigint  NOT NULL,         -- ms
    ord             bigint  GENERATED ALWAYS AS IDENTITY, -- insertion order (not indexed)
    -- Dispatcher state.
    status          text    NOT NULL DEFAULT 'pending', -- pending, sent, dead
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at bigint,                   -- ms; set to created_at on insert
    last_error      text,
    sent_at         bigint                    -- ms
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_customer ON outbox (customer_id);

-- Goals reached within their window, attributed to the flow and the last touch.
CREATE TABLE conversions (
    run_id      text   NOT NULL PRIMARY KEY,  -- a run converts at most once
    flow        text   NOT NULL,
    version     text   NOT NULL,
    customer_id text   NOT NULL,
    arm         text   NOT NULL CHECK (arm IN ('treated', 'control')),
    last_touch  text,
    event_id    text   NOT NULL,              -- the goal event
    at          bigint NOT NULL               -- ms
);
