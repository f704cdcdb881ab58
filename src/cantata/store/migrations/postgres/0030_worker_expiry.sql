-- Version 30 of the PostgreSQL schema: each worker is judged by its own lease.
-- A worker was taken for dead once its heartbeat was older than the lease of the
-- worker looking at it; workers of one app with different leases (a rolling change of
-- App(lease=...)) then took a live long-lease worker's runs, slots, deliveries and
-- tasks while it still ran them. Each heartbeat now records its worker's own lease,
-- and `expires_at` (heartbeat_at + lease) is when that worker may be taken for dead:
-- the stores compare it with the current time. Rows written before this version have
-- the default lease, 10 s. A generated column: it cannot disagree with the heartbeat
-- it comes from, and a worker of an older Cantata still running beside upgraded ones
-- (its heartbeat writes heartbeat_at alone) keeps a moving expiry, with that lease.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS lease double precision NOT NULL DEFAULT 10;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS expires_at double precision
    GENERATED ALWAYS AS (heartbeat_at + lease) STORED;

-- cantata_settle (0026, its channel from 0027) restated as it is but for the claims'
-- liveness test: c_stale is now the claimer's current time, compared with the
-- holder's expiry (w.expires_at >= c_stale[j]) instead of its heartbeat. The same
-- signature, statements and round trips. Rewritten from the stored definition, as
-- 0027 did, so nothing else of it can drift; refused if that test is not found once
-- (left as it is when this script is applied again).
DO $do$
DECLARE
    old_test constant text := 'w.heartbeat_at >= c_stale[j]';
    new_test constant text := 'w.expires_at >= c_stale[j]';
    fn oid;
    def text;
BEGIN
    SELECT p.oid INTO STRICT fn FROM pg_proc p
    WHERE p.pronamespace = current_schema()::regnamespace AND p.proname = 'cantata_settle';
    def := pg_get_functiondef(fn);
    IF strpos(def, old_test) = 0 AND strpos(def, new_test) > 0 THEN
        RETURN;  -- restated already (this script applied again)
    END IF;
    IF (length(def) - length(replace(def, old_test, ''))) / length(old_test) <> 1 THEN
        RAISE EXCEPTION 'cantata_settle does not compare % exactly once: its definition is not the one of migration 0026', old_test;
    END IF;
    EXECUTE replace(def, old_test, new_test);
END
$do$;
