-- The sandbox inbox (`GET /v1/sandbox`, the web UI's Sandbox page) lists the newest sent
-- rows first: one index range per page, however large the outbox grows.
CREATE INDEX outbox_sent ON outbox (sent_at, ord) WHERE status = 'sent';
