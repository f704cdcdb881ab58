-- Version 29 of the PostgreSQL schema: which runs predate the audit log, recorded once.
-- `cantata audit verify` reports a run with no `run.created` record (a run inserted
-- behind the log's back). It used to excuse every run older than the app's first audit
-- record, as runs of a schema written before the log existed (version 1); so a forged
-- run with a back-dated `created_at` passed. The apps that have such runs now, when
-- this version is applied, are listed here with the time their log began (or this
-- upgrade's time, for a log still empty); the excuse holds only before it, and an app
-- not listed has none.
CREATE TABLE IF NOT EXISTS audit_legacy (
    app text PRIMARY KEY,
    before double precision NOT NULL
);
INSERT INTO audit_legacy (app, before)
SELECT app, first FROM (
    SELECT r.app, min(r.created_at) AS oldest,
        coalesce((SELECT min(a.time) FROM audit a WHERE a.app = r.app),
                 extract(epoch FROM clock_timestamp())::double precision) AS first
    FROM runs r GROUP BY r.app
) AS t WHERE oldest < first
ON CONFLICT (app) DO NOTHING;
