-- Version 27 of the SQLite schema: fewer pages written by a handler's settlement (a
-- choreographed hop), each one a WAL frame of its commit (docs/performance.md, "Round
-- twenty-two (chain)"). Both tables are rebuilt with every row; their rows, columns,
-- and what each reader finds are unchanged.
--
-- `events`: `seq` stays the rowid, without AUTOINCREMENT, whose `sqlite_sequence` row
-- was one more page in every commit that stored an event. Positions are still never
-- reused: no event is ever deleted, so a new row takes one more than the largest seq,
-- as AUTOINCREMENT gave it (a rolled-back insert's seq is taken again either way).
--
-- `deliveries`: keyed (app, event_id, grp) instead of (app, grp, event_id). Event ids
-- grow with time (UUID version 7), so a hop's settled delivery (of the event it
-- handled) and the one it holds (of the event it emits) sit on the last leaf together,
-- not on the last leaf of two groups' ranges; and the key now serves the lookups by
-- event that `deliveries_event` (app, event_id) served, one more b-tree a hop wrote.
-- The group's reads (its claims, its pending deliveries, its counts) go by
-- `deliveries_due`, as before; a group's deliveries of some events by the key.

CREATE TABLE events_new (
    seq INTEGER PRIMARY KEY,
    app TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    subject TEXT,
    time TEXT NOT NULL,
    data TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    traceparent TEXT,
    signature TEXT,
    stored_at REAL NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    external INTEGER NOT NULL DEFAULT 0
);
INSERT INTO events_new (seq, app, id, type, source, subject, time, data, correlation_id,
    causation_id, traceparent, signature, stored_at, published, external)
SELECT seq, app, id, type, source, subject, time, data, correlation_id, causation_id,
    traceparent, signature, stored_at, published, external FROM events ORDER BY seq;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
CREATE UNIQUE INDEX events_id ON events (app, id);
CREATE INDEX events_type ON events (app, type, stored_at);
CREATE INDEX events_correlation ON events (app, correlation_id);
CREATE INDEX events_outbox ON events (app, seq) WHERE published = 0;

CREATE TABLE deliveries_new (
    app TEXT NOT NULL,
    grp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    owner TEXT,
    fence INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (app, event_id, grp)
) WITHOUT ROWID;
INSERT INTO deliveries_new (app, grp, event_id, status, attempts, next_at, owner, fence,
    error, updated_at)
SELECT app, grp, event_id, status, attempts, next_at, owner, fence, error, updated_at
FROM deliveries ORDER BY app, event_id, grp;
DROP TABLE deliveries;
ALTER TABLE deliveries_new RENAME TO deliveries;
CREATE INDEX deliveries_due ON deliveries (app, grp, next_at)
    WHERE status = 'pending';

-- (dropped with the old table: migration 0019's trigger, as it was)
CREATE TRIGGER deliveries_handled_drop_dead_letters
AFTER UPDATE OF status ON deliveries
WHEN OLD.status = 'dead' AND NEW.status = 'done'
BEGIN
    DELETE FROM dead_letters
    WHERE app = NEW.app AND event_id = NEW.event_id AND grp = NEW.grp;
END;
