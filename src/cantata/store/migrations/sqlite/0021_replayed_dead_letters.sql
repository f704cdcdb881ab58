-- Version 21 of the SQLite schema: a replayed dead letter is kept for the trace.
-- A replay takes the letter off the dead letter queue and puts its delivery back to
-- pending with its attempts reset. The letter used to be deleted, so once the replay
-- succeeded `cantata trace` showed a handler that had run once: the failed attempts,
-- their error and the dead-lettering were gone. The replay now moves the letter here
-- with the time it was replayed; the trace shows it (status `replayed`) under its
-- handler. The queue (dead_letters: `cantata dlq list`, replay, discard) and the
-- settlements never read this table; a settlement writes nothing more.
CREATE TABLE IF NOT EXISTS replayed_dead_letters (
    app TEXT NOT NULL,
    id TEXT NOT NULL,
    grp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    replayed_at REAL NOT NULL,
    PRIMARY KEY (app, id)
);
CREATE INDEX IF NOT EXISTS replayed_dead_letters_event
    ON replayed_dead_letters (app, event_id);
