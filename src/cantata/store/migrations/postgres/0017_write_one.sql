-- The lean path of cantata_write_runs (0011, 0013) for the latency case: a batch of
-- one checkpoint, or of one run creation with its first checkpoint. The same rows,
-- records and notices as the big function, with scalar parameters for the run and
-- its record (its history entries and attempts, a few, as arrays): no calls to
-- unnest, join and materialize (about two thirds of the big function's time for one
-- checkpoint). Each statement finds its row by its key.

-- One audit record appended to an app's chain: the head locked (created at the
-- app's first record), the hash chained as cantata_write_runs does, the head moved.
CREATE FUNCTION cantata_audit_one(
    ap text, a_time float8, a_actor text, a_action text, a_target text, a_data text,
    a_tail text, kin bytea, kout bytea, genesis text
) RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    s int8;
    p text;
    hh text;
BEGIN
    SELECT h.seq, h.hash INTO s, p FROM audit_head h WHERE h.app = ap FOR UPDATE;
    IF NOT FOUND THEN  -- the app's first record: a head to lock, moved below
        INSERT INTO audit_head (app, seq, prev_hash, hash) VALUES (ap, 0, genesis, genesis)
            ON CONFLICT (app) DO NOTHING;
        SELECT h.seq, h.hash INTO s, p FROM audit_head h WHERE h.app = ap FOR UPDATE;
    END IF;
    s := s + 1;
    IF kin IS NULL THEN
        hh := encode(sha256(convert_to(p || '[' || s || ',' || a_tail, 'UTF8')), 'hex');
    ELSE  -- HMAC-SHA256 as sha256(outer || sha256(inner || message))
        hh := encode(sha256(kout || sha256(kin || convert_to(
            p || '[' || s || ',' || a_tail, 'UTF8'))), 'hex');
    END IF;
    INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        VALUES (ap, s, a_time, a_actor, a_action, a_target, a_data, p, hh);
    UPDATE audit_head h SET seq = s, prev_hash = p, hash = hh WHERE h.app = ap;
END
$fn$;

-- One checkpoint of run (k_app, k_run_id) at fence k_fence: true if the fence held and
-- it was applied, false otherwise (nothing written). Its history entries and attempts
-- as arrays, one key once (merged as for cantata_write_runs). The record's variants as in cantata_write_runs (k_time_json,
-- k_same_*, k_chg_*; rest NULL: no record); k_notice NULL: no NOTIFY.
CREATE FUNCTION cantata_checkpoint_one(
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
    IF cardinality(a_key) > 0 THEN
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
        PERFORM cantata_audit_one(k_app, k_now, actor,
            CASE WHEN chg THEN k_chg_action ELSE k_same_action END, k_run_id,
            CASE WHEN chg THEN k_chg_data ELSE k_same_data END,
            k_time_json || ',' || to_json(actor)::text || rest, kin, kout, genesis);
    END IF;
    IF k_notice IS NOT NULL THEN
        PERFORM pg_notify('cantata_changes', k_notice);
    END IF;
    RETURN true;
END
$fn$;

-- One run created (its run.created record chained, its notice sent): true if it was
-- inserted, false if its idempotency key was taken (nothing written).
CREATE FUNCTION cantata_create_one(
    n_run_id text, n_app text, n_workflow text, n_status text, n_args text,
    n_created_at float8, n_updated_at float8, n_correlation_id text,
    n_causation_id text, n_idempotency_key text, n_args_hash text,
    n_parent_run_id text, n_deadline_at float8, n_result text, n_error text,
    n_cancel_requested bool, n_owner text, n_fence int8, n_flagged bool,
    n_service text, n_version text, n_epoch int4,
    n_time float8, n_tail text, n_action text, n_data text, n_notice text,
    kin bytea, kout bytea, genesis text
) RETURNS bool
LANGUAGE plpgsql
AS $fn$
BEGIN
    INSERT INTO runs (run_id, app, workflow, status, args, created_at, updated_at,
        correlation_id, causation_id, idempotency_key, args_hash, parent_run_id,
        deadline_at, result, error, cancel_requested, owner, fence, flagged,
        service, version, epoch)
    VALUES (n_run_id, n_app, n_workflow, n_status, n_args, n_created_at, n_updated_at,
        n_correlation_id, n_causation_id, n_idempotency_key, n_args_hash,
        n_parent_run_id, n_deadline_at, n_result, n_error, n_cancel_requested, n_owner,
        n_fence, n_flagged, n_service, n_version, n_epoch)
    ON CONFLICT (app, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM cantata_audit_one(n_app, n_time, 'system', n_action, n_run_id, n_data,
        n_tail, kin, kout, genesis);
    IF n_notice IS NOT NULL THEN
        PERFORM pg_notify('cantata_changes', n_notice);
    END IF;
    RETURN true;
END
$fn$;
