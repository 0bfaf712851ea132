-- The web UI's "customers waiting at this node": one index range per page, longest waiting
-- first, however many runs the database keeps (`Store::waiting_at`). It also serves the
-- per-step waiting counts (`node_counts`) of one flow.
CREATE INDEX runs_waiting_at ON runs (flow, step, entered_at, id) WHERE status = 'waiting';
