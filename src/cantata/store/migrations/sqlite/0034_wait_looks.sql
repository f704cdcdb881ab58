-- Version 34 of the SQLite schema: where the looks for parked waits' events have got to
-- in the log, one row per app (engine/parking.py, wake_for_events). A worker's first
-- look begins there, not a second before its own start: an event stored while no
-- worker looked (all stopped, or another process's event in a new worker's first poll
-- interval) woke no parked wait before, and a wait with no timeout never woke.
CREATE TABLE IF NOT EXISTS wait_looks (
    app TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    looked_at REAL NOT NULL
);
