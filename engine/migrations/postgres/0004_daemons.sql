-- Canvas store, Postgres backend: the daemons sharing this database. Same conventions as 0001
-- (times are bigint milliseconds since the Unix epoch).

-- Each daemon beats here every second or so under the name its outbox claims
-- (`outbox.claimed_by`) and customer leases (`customer_leases.owner`) carry. A daemon
-- whose beat stopped is dead: the others free its claims at once instead of waiting for
-- them to run out, and forget it (a daemon that stopped cleanly holds no claims, and is
-- forgotten the same way).
CREATE TABLE daemons (
    owner        text   NOT NULL PRIMARY KEY,
    started_at   bigint NOT NULL,              -- ms
    heartbeat_at bigint NOT NULL               -- ms: the last beat
);
