-- Version 37 of the PostgreSQL schema: the lean checkpoint and the lean creation with
-- its first checkpoint take a write's history entries and attempts as rows, each the
-- text of a cantata_history_row or a cantata_attempt_row (record_in's literal), instead
-- of one array per column (docs/performance.md, "Round twenty-two"):
-- cantata_checkpoint_rows and cantata_create_rows are cantata_checkpoint_one and
-- cantata_create_first (0032) with two text arrays in place of the 19 arrays; the same
-- rows, records (hash for hash), notices, results and errors.
--
-- Each execution of a statement builds its expressions anew: a row read from 13
-- arrays by subscript (h_key[i], ...) is 13 subscripting expressions, each set up with
-- a catalog lookup of its array type's subscript routines (~31,000 instructions for
-- the history rows' projection alone); unnest(h_rows::cantata_history_row[]) is one
-- set-returning function whose columns the INSERT takes as they are. One attempt goes
-- the same way (0032 wrote it as a row of VALUES, subscripts again). A saga's calls
-- replayed under callgrind: 846,000 instructions a call before, 742,000 after
-- (-12 %). The client encodes two text arrays instead of 19 arrays. (Not arrays of the
-- composite types themselves: asyncpg would look such a parameter's type up in the
-- catalog on each connection's first call, 35-280 ms here; JSON through
-- json_populate_recordset saved half as much: 802,000 instructions.)
--
-- The functions of 0032 stay, unchanged, for workers of an older release still
-- running while this one migrates the store (docs/deploy.md).

-- (A script may run again on a schema it already migrated: the types are made once.)
DO $types$
BEGIN
    CREATE TYPE cantata_history_row AS (
        key text, kind text, name text, status text, seq int4, result text, error text,
        error_type text, attempts int4, started_at float8, ended_at float8,
        wake_at float8, detail text
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END
$types$;
DO $types$
BEGIN
    CREATE TYPE cantata_attempt_row AS (
        key text, attempt int4, started_at float8, ended_at float8, error_type text,
        error text
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END
$types$;

CREATE OR REPLACE FUNCTION cantata_checkpoint_rows(
    k_app text, k_run_id text, k_fence int8, k_status text, k_result text, k_error text,
    k_flagged bool, k_release bool, k_now float8,
    h_rows text[], a_rows text[],
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
    written bool := k_status IS NULL AND k_release IS NOT TRUE;
BEGIN
    IF written THEN
        -- neither the status nor the owner changes: the fence checked, the row locked
        -- and written by one statement; the owner it returns is the one before
        UPDATE runs r SET updated_at = k_now, result = coalesce(k_result, r.result),
            error = coalesce(k_error, r.error), flagged = coalesce(k_flagged, r.flagged)
            WHERE r.app = k_app AND r.run_id = k_run_id AND r.fence = k_fence
            RETURNING r.owner INTO o_owner;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        chg := false;
        rest := k_same_rest;
    ELSE
        -- the fence checked on the newest version of the row, locked (as the big
        -- function's FOR UPDATE CTE)
        SELECT r.owner, r.status INTO o_owner, o_status FROM runs r
            WHERE r.app = k_app AND r.run_id = k_run_id AND r.fence = k_fence FOR UPDATE;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        chg := k_status IS NOT NULL AND k_status <> o_status;
        rest := CASE WHEN chg THEN k_chg_rest ELSE k_same_rest END;
    END IF;
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
    IF NOT written THEN  -- the row locked above, not yet written
        UPDATE runs r SET updated_at = k_now, status = coalesce(k_status, r.status),
            result = coalesce(k_result, r.result), error = coalesce(k_error, r.error),
            flagged = coalesce(k_flagged, r.flagged),
            owner = CASE WHEN k_release THEN NULL ELSE r.owner END
            WHERE r.app = k_app AND r.run_id = k_run_id;
    END IF;
    IF cardinality(h_rows) > 0 THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            SELECT k_app, k_run_id, r.* FROM unnest(h_rows::cantata_history_row[]) AS r
            ON CONFLICT (app, run_id, key) DO UPDATE SET
            status=excluded.status, result=excluded.result, error=excluded.error,
            error_type=excluded.error_type, attempts=excluded.attempts,
            started_at=excluded.started_at, ended_at=excluded.ended_at,
            wake_at=excluded.wake_at, detail=excluded.detail;
    END IF;
    IF cardinality(a_rows) > 0 THEN
        INSERT INTO attempts AS t (app, run_id, key, attempt, started_at, ended_at,
                error_type, error)
            SELECT k_app, k_run_id, r.* FROM unnest(a_rows::cantata_attempt_row[]) AS r
            ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET
            ended_at=excluded.ended_at, error_type=excluded.error_type,
            error=excluded.error
            -- an attempt its worker excused (Paused) stays excused when the new
            -- owner's WorkerLost write for it arrives later (postgres_ops.KEEP_EXCUSED)
            WHERE NOT (COALESCE(t.error_type, '') = 'Paused'
                AND COALESCE(excluded.error_type, '') = 'WorkerLost'
                AND t.started_at = excluded.started_at);
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
        PERFORM pg_notify(cantata_channel(), k_notice);
    END IF;
    RETURN true;
END
$fn$;

CREATE OR REPLACE FUNCTION cantata_create_rows(
    n_run_id text, n_app text, n_workflow text, n_status text, n_args text,
    n_created_at float8, n_updated_at float8, n_correlation_id text,
    n_causation_id text, n_idempotency_key text, n_args_hash text,
    n_parent_run_id text, n_deadline_at float8, n_result text, n_error text,
    n_cancel_requested bool, n_owner text, n_fence int8, n_flagged bool,
    n_service text, n_version text, n_epoch int4,
    n_time float8, n_tail text, n_action text, n_data text, n_notice text,
    h_rows text[], a_rows text[],
    k_actor text, k_action text, k_data text, k_tail text, k_notice text,
    kin bytea, kout bytea, genesis text
) RETURNS bool
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF n_idempotency_key IS NULL THEN
        INSERT INTO runs (run_id, app, workflow, status, args, created_at, updated_at,
            correlation_id, causation_id, idempotency_key, args_hash, parent_run_id,
            deadline_at, result, error, cancel_requested, owner, fence, flagged,
            service, version, epoch)
        VALUES (n_run_id, n_app, n_workflow, n_status, n_args, n_created_at,
            n_updated_at, n_correlation_id, n_causation_id, n_idempotency_key,
            n_args_hash, n_parent_run_id, n_deadline_at, n_result, n_error,
            n_cancel_requested, n_owner, n_fence, n_flagged, n_service, n_version,
            n_epoch);
    ELSE
        INSERT INTO runs (run_id, app, workflow, status, args, created_at, updated_at,
            correlation_id, causation_id, idempotency_key, args_hash, parent_run_id,
            deadline_at, result, error, cancel_requested, owner, fence, flagged,
            service, version, epoch)
        VALUES (n_run_id, n_app, n_workflow, n_status, n_args, n_created_at,
            n_updated_at, n_correlation_id, n_causation_id, n_idempotency_key,
            n_args_hash, n_parent_run_id, n_deadline_at, n_result, n_error,
            n_cancel_requested, n_owner, n_fence, n_flagged, n_service, n_version,
            n_epoch)
        ON CONFLICT (app, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
    END IF;
    -- run.created (as cantata_audit_one; an app's first record by it)
    WITH h AS (
        UPDATE audit_head h SET seq = h.seq + 1, prev_hash = h.hash,
            hash = CASE WHEN kin IS NULL
            THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                || n_tail, 'UTF8')), 'hex')
            ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                || (h.seq + 1)::text || ',' || n_tail, 'UTF8'))), 'hex') END
        WHERE h.app = n_app
        RETURNING h.seq, h.prev_hash, h.hash)
    INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
    SELECT n_app, h.seq, n_time, 'system', n_action, n_run_id, n_data, h.prev_hash,
        h.hash
    FROM h;
    IF NOT FOUND THEN
        PERFORM cantata_audit_one(n_app, n_time, 'system', n_action, n_run_id, n_data,
            n_tail, kin, kout, genesis);
    END IF;
    IF cardinality(h_rows) > 0 THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            SELECT n_app, n_run_id, r.* FROM unnest(h_rows::cantata_history_row[]) AS r
            ON CONFLICT (app, run_id, key) DO UPDATE SET
            status=excluded.status, result=excluded.result, error=excluded.error,
            error_type=excluded.error_type, attempts=excluded.attempts,
            started_at=excluded.started_at, ended_at=excluded.ended_at,
            wake_at=excluded.wake_at, detail=excluded.detail;
    END IF;
    IF cardinality(a_rows) > 0 THEN
        INSERT INTO attempts AS t (app, run_id, key, attempt, started_at, ended_at,
                error_type, error)
            SELECT n_app, n_run_id, r.* FROM unnest(a_rows::cantata_attempt_row[]) AS r
            ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET
            ended_at=excluded.ended_at, error_type=excluded.error_type,
            error=excluded.error
            -- an attempt its worker excused (Paused) stays excused when the new
            -- owner's WorkerLost write for it arrives later (postgres_ops.KEEP_EXCUSED)
            WHERE NOT (COALESCE(t.error_type, '') = 'Paused'
                AND COALESCE(excluded.error_type, '') = 'WorkerLost'
                AND t.started_at = excluded.started_at);
    END IF;
    IF k_tail IS NOT NULL THEN
        -- the first checkpoint's record, chained after run.created
        WITH h AS (
            UPDATE audit_head h SET seq = h.seq + 1, prev_hash = h.hash,
                hash = CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                    || k_tail, 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                    || (h.seq + 1)::text || ',' || k_tail, 'UTF8'))), 'hex') END
            WHERE h.app = n_app
            RETURNING h.seq, h.prev_hash, h.hash)
        INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        SELECT n_app, h.seq, n_time, k_actor, k_action, n_run_id, k_data, h.prev_hash,
            h.hash
        FROM h;
    END IF;
    IF n_notice IS NOT NULL THEN
        PERFORM pg_notify(cantata_channel(), n_notice);
    END IF;
    IF k_notice IS NOT NULL AND k_notice IS DISTINCT FROM n_notice THEN
        PERFORM pg_notify(cantata_channel(), k_notice);
    END IF;
    RETURN true;
END
$fn$;
