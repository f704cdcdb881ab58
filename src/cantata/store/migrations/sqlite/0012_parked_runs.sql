-- Parked runs (docs/architecture.md, parking): a run waiting in ctx.sleep,
-- ctx.wait_for_event or ctx.call is released with what wakes it. wake_at: when it
-- is due (NULL: not parked); waits_for: '<event type> <match keys>' of a parked
-- event wait; wait_match: the values it waits for (canonical JSON).
ALTER TABLE runs ADD COLUMN wake_at REAL;
ALTER TABLE runs ADD COLUMN waits_for TEXT;
ALTER TABLE runs ADD COLUMN wait_match TEXT;
-- Due parked runs, and the next wake-up, by an index range (no scan of parked runs).
CREATE INDEX IF NOT EXISTS runs_parked ON runs (app, wake_at) WHERE wake_at IS NOT NULL;
-- The parked waits an event wakes: (type and keys, values).
CREATE INDEX IF NOT EXISTS runs_waiting ON runs (app, waits_for, wait_match)
    WHERE waits_for IS NOT NULL;
-- Claims look at live runs that are not parked.
CREATE INDEX IF NOT EXISTS runs_claimable ON runs (app, workflow)
    WHERE status IN ('pending', 'running', 'compensating') AND wake_at IS NULL;
