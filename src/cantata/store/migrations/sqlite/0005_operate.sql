-- Cantata store, SQLite schema version 5: operating and evolving runs (docs/operating.md).

-- The code version a run is pinned to (NULL: any worker may take it) and how many
-- times an operator retried it (the generation of its live history).
ALTER TABLE runs ADD COLUMN version TEXT;
ALTER TABLE runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;

-- Search attributes (ctx.set_attributes), one row per (run, name). The values are the
-- indexed text form; the history entry of kind 'attrs' that set them is the record,
-- and the triggers below keep this index in the same transaction as that entry.
CREATE TABLE IF NOT EXISTS run_attributes (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (app, run_id, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS run_attributes_value ON run_attributes (app, name, value);

CREATE TRIGGER IF NOT EXISTS history_attrs_insert AFTER INSERT ON history
WHEN NEW.kind = 'attrs' AND NEW.detail IS NOT NULL
BEGIN
    INSERT INTO run_attributes (app, run_id, name, value)
    SELECT NEW.app, NEW.run_id, j.key, CAST(j.value AS TEXT) FROM json_each(NEW.detail) j
    WHERE true
    ON CONFLICT (app, run_id, name) DO UPDATE SET value = excluded.value;
END;
CREATE TRIGGER IF NOT EXISTS history_attrs_update AFTER UPDATE ON history
WHEN NEW.kind = 'attrs' AND NEW.detail IS NOT NULL
BEGIN
    INSERT INTO run_attributes (app, run_id, name, value)
    SELECT NEW.app, NEW.run_id, j.key, CAST(j.value AS TEXT) FROM json_each(NEW.detail) j
    WHERE true
    ON CONFLICT (app, run_id, name) DO UPDATE SET value = excluded.value;
END;

-- History entries and attempts an operator's retry superseded (the failed step and
-- what came after it), kept with the epoch that superseded them: the live history
-- replays without them, and nothing recorded is lost.
CREATE TABLE IF NOT EXISTS history_superseded (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    error_type TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    ended_at REAL,
    wake_at REAL,
    detail TEXT,
    PRIMARY KEY (app, run_id, epoch, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS attempts_superseded (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    error_type TEXT,
    error TEXT,
    PRIMARY KEY (app, run_id, epoch, key, attempt)
) WITHOUT ROWID;
