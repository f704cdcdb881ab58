-- Version 43 of the PostgreSQL schema: where the looks for parked waits' events have
-- got to in the log, one row per app (engine/parking.py, wake_for_events). A worker's
-- first look begins there, not a second before its own start: an event stored while
-- no worker looked (all stopped, or stored in a new worker's first poll interval and
-- not heard) woke no parked wait before, and a wait with no timeout never woke.
CREATE TABLE IF NOT EXISTS wait_looks (
    app text PRIMARY KEY,
    position bigint NOT NULL,
    looked_at double precision NOT NULL
);
