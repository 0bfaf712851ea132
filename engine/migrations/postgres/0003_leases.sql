-- Canvas store, Postgres backend: customer leases. Same tables and columns as the SQLite
-- backend; same conventions as 0001 (times are bigint milliseconds).

-- Which daemon works on a customer. An engine round claims its customers (a row per
-- customer, `until` in the near future) before it loads them, and its commit checks, in the
-- commit's own transaction, that the round's owner still holds every one of them (`FOR
-- SHARE` on these rows, so a claim that would take one over waits for the commit): two
-- daemons never work on one customer at once, and a daemon that stalled past `until` cannot
-- write over the work of the daemon that took its customers over. A lease with
-- `until <= now` has run out and goes to the next claimer; released leases are deleted.
--
-- `customer_id` compares bytewise (`COLLATE "C"`, as Rust's `str` and SQLite's BINARY do):
-- claims send their ids in that order and the commit check and releases lock in it, so
-- daemons locking overlapping sets of rows queue behind each other instead of deadlocking.
CREATE TABLE customer_leases (
    customer_id text   COLLATE "C" NOT NULL PRIMARY KEY,
    owner       text   NOT NULL,                -- the daemon holding the lease
    until       bigint NOT NULL                 -- ms: the lease runs out at this instant
);
