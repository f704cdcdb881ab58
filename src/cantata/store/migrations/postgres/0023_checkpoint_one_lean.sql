-- Version 23 of the PostgreSQL schema: the lean checkpoint (cantata_checkpoint_one,
-- 0017) and the record of the lean creations (cantata_audit_one, called by
-- cantata_create_one and cantata_create_first) with less server work (issue 19;
-- docs/performance.md), as 0022 did for a hop. The same parameters, results, rows,
-- records (hash for hash), notices and errors:
--
-- * cantata_audit_one moves the head by an UPDATE that returns the record's place in
--   the chain and inserts the record from it: one statement where there were three
--   (the head locked by SELECT ... FOR UPDATE, the record, the head moved). The head
--   is locked by the update as it was by the SELECT (chain heads serialize appends
--   per app). Only an app's first record, with no head yet, takes the upsert that
--   inserts it (a concurrent first record turns it into the update).
-- * cantata_checkpoint_one writes its record the same way in its own body instead of
--   calling cantata_audit_one (a statement and a function call less), and falls back
--   to cantata_audit_one for an app's first record.
-- * One attempt (a step's, the usual checkpoint) is upserted from its values: no
--   unnest to set up. Several take 0017's statement.
--
-- Measured (the statements of 600 checkpoints, a step's end and the next one's start
-- with one attempt, replayed in a single-user backend under callgrind): 1.23 M ->
-- 1.17 M instructions per checkpoint (parse and commit included), the record
-- 0.19 M -> 0.13 M of it.

CREATE OR REPLACE FUNCTION cantata_audit_one(
    ap text, a_time float8, a_actor text, a_action text, a_target text, a_data text,
    a_tail text, kin bytea, kout bytea, genesis text
) RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    WITH h AS (
        UPDATE audit_head h SET seq = h.seq + 1, prev_hash = h.hash,
            hash = CASE WHEN kin IS NULL
            THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                || a_tail, 'UTF8')), 'hex')
            ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                || (h.seq + 1)::text || ',' || a_tail, 'UTF8'))), 'hex') END
        WHERE h.app = ap
        RETURNING h.seq, h.prev_hash, h.hash)
    INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
    SELECT ap, h.seq, a_time, a_actor, a_action, a_target, a_data, h.prev_hash, h.hash
    FROM h;
    IF NOT FOUND THEN
        WITH h AS (
            INSERT INTO audit_head AS h (app, seq, prev_hash, hash)
            VALUES (ap, 1, genesis, CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(genesis || '[1,' || a_tail, 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(
                    genesis || '[1,' || a_tail, 'UTF8'))), 'hex') END)
            ON CONFLICT (app) DO UPDATE SET seq = h.seq + 1, prev_hash = h.hash,
                hash = CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                    || a_tail, 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                    || (h.seq + 1)::text || ',' || a_tail, 'UTF8'))), 'hex') END
            RETURNING h.seq, h.prev_hash, h.hash)
        INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        SELECT ap, h.seq, a_time, a_actor, a_action, a_target, a_data, h.prev_hash, h.hash
        FROM h;
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION cantata_checkpoint_one(
    k_app text, k_run_id text, k_fence int8, k_status text, k_result text, k_error text,
    k_flagged bool, k_release bool, k_now float8,
    h_key text[], h_kind text[], h_name text[], h_status text[], h_seq int4[],
    h_result text[], h_error text[], h_error_type text[], h_attempts int4[],
    h_started_at float8[], h_ended_at float8[], h_wake_at float8[], h_detail text[],
    a_key text[], a_attempt int4[], a_started_at float8[], a_ended_at float8[],
    a_error_type text[], a_error text[],
    k_time_json text, k_same_action text, k_same_data text, k_same_rest text,
    k_chg_action text, k_chg_data text, k_chg_rest text, k_notice text,
    kin bytea, kout bytea, genesis text
) RETURNS bool
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    o_owner text;
    o_status text;
    chg bool;
    rest text;
    actor text;
    tail text;  -- the record's canonical text after its sequence number
BEGIN
    -- the fence checked on the newest version of the row, locked (as the big
    -- function's FOR UPDATE CTE)
    SELECT r.owner, r.status INTO o_owner, o_status FROM runs r
        WHERE r.app = k_app AND r.run_id = k_run_id AND r.fence = k_fence FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    chg := k_status IS NOT NULL AND k_status <> o_status;
    rest := CASE WHEN chg THEN k_chg_rest ELSE k_same_rest END;
    IF rest IS NOT NULL THEN
        IF o_owner IS NULL THEN
            actor := 'system';
        ELSIF o_owner ~ '^[ -~]*$' THEN
            actor := 'worker:' || o_owner;
        ELSE
            RAISE EXCEPTION 'the owner of run % is not printable ASCII', k_run_id
                USING ERRCODE = 'CN001';
        END IF;
    END IF;
    UPDATE runs r SET updated_at = k_now, status = coalesce(k_status, r.status),
        result = coalesce(k_result, r.result), error = coalesce(k_error, r.error),
        flagged = coalesce(k_flagged, r.flagged),
        owner = CASE WHEN k_release THEN NULL ELSE r.owner END
        WHERE r.app = k_app AND r.run_id = k_run_id;
    IF cardinality(h_key) > 0 THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            SELECT k_app, k_run_id, u.* FROM unnest(h_key, h_kind, h_name, h_status, h_seq,
                h_result, h_error, h_error_type, h_attempts, h_started_at, h_ended_at,
                h_wake_at, h_detail) AS u
            ON CONFLICT (app, run_id, key) DO UPDATE SET
            status=excluded.status, result=excluded.result, error=excluded.error,
            error_type=excluded.error_type, attempts=excluded.attempts,
            started_at=excluded.started_at, ended_at=excluded.ended_at,
            wake_at=excluded.wake_at, detail=excluded.detail;
    END IF;
    IF cardinality(a_key) = 1 THEN  -- one attempt (a step's): its row as values
        INSERT INTO attempts AS t (app, run_id, key, attempt, started_at, ended_at,
                error_type, error)
            VALUES (k_app, k_run_id, a_key[1], a_attempt[1], a_started_at[1],
                a_ended_at[1], a_error_type[1], a_error[1])
            ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET
            ended_at=excluded.ended_at, error_type=excluded.error_type,
            error=excluded.error
            WHERE NOT (COALESCE(t.error_type, '') = 'Paused'
                AND COALESCE(excluded.error_type, '') = 'WorkerLost'
                AND t.started_at = excluded.started_at);
    ELSIF cardinality(a_key) > 1 THEN
        INSERT INTO attempts (app, run_id, key, attempt, started_at, ended_at,
                error_type, error)
            SELECT k_app, k_run_id, u.* FROM unnest(a_key, a_attempt, a_started_at,
                a_ended_at, a_error_type, a_error) AS u
            ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET
            ended_at=excluded.ended_at, error_type=excluded.error_type,
            error=excluded.error
            -- an attempt its worker excused (Paused) stays excused when the new
            -- owner's WorkerLost write for it arrives later (postgres_ops.KEEP_EXCUSED)
            WHERE NOT (COALESCE(attempts.error_type, '') = 'Paused'
                AND COALESCE(excluded.error_type, '') = 'WorkerLost'
                AND attempts.started_at = excluded.started_at);
    END IF;
    IF rest IS NOT NULL THEN
        -- the record (as cantata_audit_one): the head moved by an update, the record
        -- inserted from it; an app's first record (no head yet) by cantata_audit_one
        tail := k_time_json || ',' || to_json(actor)::text || rest;
        WITH h AS (
            UPDATE audit_head h SET seq = h.seq + 1, prev_hash = h.hash,
                hash = CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                    || tail, 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                    || (h.seq + 1)::text || ',' || tail, 'UTF8'))), 'hex') END
            WHERE h.app = k_app
            RETURNING h.seq, h.prev_hash, h.hash)
        INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        SELECT k_app, h.seq, k_now, actor,
            CASE WHEN chg THEN k_chg_action ELSE k_same_action END, k_run_id,
            CASE WHEN chg THEN k_chg_data ELSE k_same_data END, h.prev_hash, h.hash
        FROM h;
        IF NOT FOUND THEN
            PERFORM cantata_audit_one(k_app, k_now, actor,
                CASE WHEN chg THEN k_chg_action ELSE k_same_action END, k_run_id,
                CASE WHEN chg THEN k_chg_data ELSE k_same_data END, tail, kin, kout,
                genesis);
        END IF;
    END IF;
    IF k_notice IS NOT NULL THEN
        PERFORM pg_notify('cantata_changes', k_notice);
    END IF;
    RETURN true;
END
$fn$;

