-- Version 43 of the PostgreSQL schema: less server work per write of a saga (issue 19;
-- docs/performance.md, "Round twenty-eight (saga, PostgreSQL checkpoint)").
--
-- cantata_checkpoint_plain and cantata_create_plain are cantata_checkpoint_rows and
-- cantata_create_rows (0037) for the common case of a write with few history entries
-- (a checkpoint: at most two, a step's end and the next one's start; a creation: at
-- most one, its first step's start), each entry as scalar parameters instead of the
-- text of a cantata_history_row: the same rows, records (hash for hash), notices,
-- results and errors. What changes is how they write:
--
-- * The entries are inserted by their VALUES, not by unnest of the texts cast to an
--   array of the row type: no array to build from the texts (record_in of each), no
--   set-returning function scan with its tuple store and projection set up at every
--   execution. An absent second entry (first) is a NULL key.
-- * A checkpoint that sets the status or releases the run updates the row its
--   SELECT ... FOR UPDATE locked by its address (ctid: a TID scan) instead of a second
--   descent of the primary key's index; the row is locked by this transaction from the
--   SELECT on, so no other version of it can appear in between (as 0042 for the
--   settled delivery).
--
-- cantata_checkpoint_rows is restated with the same locked-row update (same
-- parameters and everything it writes): this release's workers still call it for a
-- checkpoint with more entries, and an older worker during an upgrade calls it for
-- all of them. cantata_create_rows and every older function stay as they were.

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
    row_id tid;  -- the run's row, locked (the status or the owner changes)
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
        -- function's FOR UPDATE CTE); its address kept for the update below
        SELECT r.ctid, r.owner, r.status INTO row_id, o_owner, o_status FROM runs r
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
            WHERE r.ctid = row_id;
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

CREATE OR REPLACE FUNCTION cantata_checkpoint_plain(
    k_app text, k_run_id text, k_fence int8, k_status text, k_result text, k_error text,
    k_flagged bool, k_release bool, k_now float8,
    h1_key text, h1_kind text, h1_name text, h1_status text, h1_seq int4,
    h1_result text, h1_error text, h1_error_type text, h1_attempts int4,
    h1_started_at float8, h1_ended_at float8, h1_wake_at float8, h1_detail text,
    h2_key text, h2_kind text, h2_name text, h2_status text, h2_seq int4,
    h2_result text, h2_error text, h2_error_type text, h2_attempts int4,
    h2_started_at float8, h2_ended_at float8, h2_wake_at float8, h2_detail text,
    a_rows text[],
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
    row_id tid;  -- the run's row, locked (the status or the owner changes)
    chg bool;
    rest text;
    actor text;
    tail text;  -- the record's canonical text after its sequence number
BEGIN
    IF k_status IS NULL AND k_release IS NOT TRUE THEN
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
        -- the fence checked on the newest version of the row, locked; then the row
        -- written by its address
        SELECT r.ctid, r.owner, r.status INTO row_id, o_owner, o_status FROM runs r
            WHERE r.app = k_app AND r.run_id = k_run_id AND r.fence = k_fence FOR UPDATE;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        chg := k_status IS NOT NULL AND k_status <> o_status;
        rest := CASE WHEN chg THEN k_chg_rest ELSE k_same_rest END;
        UPDATE runs r SET updated_at = k_now, status = coalesce(k_status, r.status),
            result = coalesce(k_result, r.result), error = coalesce(k_error, r.error),
            flagged = coalesce(k_flagged, r.flagged),
            owner = CASE WHEN k_release THEN NULL ELSE r.owner END
            WHERE r.ctid = row_id;
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
    IF h2_key IS NOT NULL THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            VALUES (k_app, k_run_id, h1_key, h1_kind, h1_name, h1_status, h1_seq,
                h1_result, h1_error, h1_error_type, h1_attempts, h1_started_at,
                h1_ended_at, h1_wake_at, h1_detail),
            (k_app, k_run_id, h2_key, h2_kind, h2_name, h2_status, h2_seq, h2_result,
                h2_error, h2_error_type, h2_attempts, h2_started_at, h2_ended_at,
                h2_wake_at, h2_detail)
            ON CONFLICT (app, run_id, key) DO UPDATE SET
            status=excluded.status, result=excluded.result, error=excluded.error,
            error_type=excluded.error_type, attempts=excluded.attempts,
            started_at=excluded.started_at, ended_at=excluded.ended_at,
            wake_at=excluded.wake_at, detail=excluded.detail;
    ELSIF h1_key IS NOT NULL THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            VALUES (k_app, k_run_id, h1_key, h1_kind, h1_name, h1_status, h1_seq,
                h1_result, h1_error, h1_error_type, h1_attempts, h1_started_at,
                h1_ended_at, h1_wake_at, h1_detail)
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

CREATE OR REPLACE FUNCTION cantata_create_plain(
    n_run_id text, n_app text, n_workflow text, n_status text, n_args text,
    n_created_at float8, n_updated_at float8, n_correlation_id text,
    n_causation_id text, n_idempotency_key text, n_args_hash text,
    n_parent_run_id text, n_deadline_at float8, n_result text, n_error text,
    n_cancel_requested bool, n_owner text, n_fence int8, n_flagged bool,
    n_service text, n_version text, n_epoch int4,
    n_time float8, n_tail text, n_action text, n_data text, n_notice text,
    h1_key text, h1_kind text, h1_name text, h1_status text, h1_seq int4,
    h1_result text, h1_error text, h1_error_type text, h1_attempts int4,
    h1_started_at float8, h1_ended_at float8, h1_wake_at float8, h1_detail text,
    a_rows text[],
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
    IF h1_key IS NOT NULL THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            VALUES (n_app, n_run_id, h1_key, h1_kind, h1_name, h1_status, h1_seq,
                h1_result, h1_error, h1_error_type, h1_attempts, h1_started_at,
                h1_ended_at, h1_wake_at, h1_detail)
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
