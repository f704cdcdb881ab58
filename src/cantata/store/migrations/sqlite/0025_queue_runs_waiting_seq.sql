-- Version 25 of the SQLite schema: the waiting rows of a queue in the order a queue
-- without priorities admits them (oldest first: seq, then run_id, the key's column).
-- Without it, SQLite (which keeps no table statistics) read a claim's candidates by the
-- primary key: every row the app's queues ever had, sorted at every claim.
CREATE INDEX IF NOT EXISTS queue_runs_waiting_seq ON queue_runs (app, queue, seq)
    WHERE began_at IS NULL;
