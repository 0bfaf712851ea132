-- Canvas store, SQLite backend: customer leases. Same conventions as 0001 (times are
-- INTEGER milliseconds since the Unix epoch).

-- Which daemon works on a customer. An engine round claims its customers (a row per
-- customer, `until` in the near future) before it loads them, and its commit checks, in the
-- commit's own transaction, that the round's owner still holds every one of them: two
-- daemons never work on one customer at once, and a daemon that stalled past `until` cannot
-- write over the work of the daemon that took its customers over. A lease with
-- `until <= now` has run out and goes to the next claimer; released leases are deleted.
-- SQLite runs one daemon, but keeps the same table and semantics as Postgres.
CREATE TABLE customer_leases (
    customer_id TEXT    NOT NULL PRIMARY KEY,
    owner       TEXT    NOT NULL,               -- the daemon holding the lease
    until       INTEGER NOT NULL                -- ms: the lease runs out at this instant
) WITHOUT ROWID;
