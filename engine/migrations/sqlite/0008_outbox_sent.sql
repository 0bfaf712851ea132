-- The sandbox inbox (`GET /v1/sandbox`, the web UI's Sandbox page) lists the newest sent
-- rows first: one index range per page, however large the outbox grows. (`rowid`, the
-- tie-break, is in every SQLite index.)
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE status = 'sent';
