-- Cantata store, PostgreSQL schema version 5: operating and evolving runs
-- (docs/operating.md).

-- The code version a run is pinned to (NULL: any worker may take it) and how many
-- times an operator retried it (the generation of its live history).
ALTER TABLE runs ADD COLUMN version text;
ALTER TABLE runs ADD COLUMN epoch integer NOT NULL DEFAULT 0;
CREATE INDEX runs_prefix ON runs (app, run_id text_pattern_ops);

-- Search attributes (ctx.set_attributes), one row per (run, name). The values are the
-- indexed text form; the history entry of kind 'attrs' that set them is the record,
-- and the trigger below keeps this index in the same transaction as that entry.
CREATE TABLE run_attributes (
    app text NOT NULL,
    run_id text NOT NULL,
    name text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (app, run_id, name)
);
CREATE INDEX run_attributes_value ON run_attributes (app, name, value);

CREATE FUNCTION cantata_index_attributes() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO run_attributes (app, run_id, name, value)
    SELECT NEW.app, NEW.run_id, j.key, j.value FROM jsonb_each_text(NEW.detail::jsonb) j
    ON CONFLICT (app, run_id, name) DO UPDATE SET value = excluded.value;
    RETURN NULL;
END
$$;
CREATE TRIGGER history_attrs AFTER INSERT OR UPDATE ON history
FOR EACH ROW WHEN (NEW.kind = 'attrs' AND NEW.detail IS NOT NULL)
EXECUTE FUNCTION cantata_index_attributes();

-- History entries and attempts an operator's retry superseded (the failed step and
-- what came after it), kept with the epoch that superseded them: the live history
-- replays without them, and nothing recorded is lost.
CREATE TABLE history_superseded (
    app text NOT NULL,
    run_id text NOT NULL,
    epoch integer NOT NULL,
    key text NOT NULL,
    seq integer NOT NULL,
    kind text NOT NULL,
    name text NOT NULL,
    status text NOT NULL,
    result text,
    error text,
    error_type text,
    attempts integer NOT NULL DEFAULT 0,
    started_at double precision,
    ended_at double precision,
    wake_at double precision,
    detail text,
    PRIMARY KEY (app, run_id, epoch, key)
);

CREATE TABLE attempts_superseded (
    app text NOT NULL,
    run_id text NOT NULL,
    epoch integer NOT NULL,
    key text NOT NULL,
    attempt integer NOT NULL,
    started_at double precision NOT NULL,
    ended_at double precision,
    error_type text,
    error text,
    PRIMARY KEY (app, run_id, epoch, key, attempt)
);
