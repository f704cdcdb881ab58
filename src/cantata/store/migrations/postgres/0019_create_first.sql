-- Version 19 of the PostgreSQL schema: a new run and its first checkpoint in one call
-- that writes the run in its checkpointed state (as SQLite does since its 0018's
-- round): the lean path's creation (store/postgres_onetrip.py) called
-- cantata_create_one and then cantata_checkpoint_one (0017), which locked the row it
-- had just inserted, checked its fence and updated it (a second version of the row).
-- The run's values are the checkpoint's applied to the new run, and both records are
-- known in Python (the fence holds, the owner and status before the checkpoint are
-- the new run's): run.created, then the checkpoint's (a_tail NULL: none), chained in
-- that order. The same rows, records and notices as the two calls.
CREATE FUNCTION cantata_create_first(
    n_run_id text, n_app text, n_workflow text, n_status text, n_args text,
    n_created_at float8, n_updated_at float8, n_correlation_id text,
    n_causation_id text, n_idempotency_key text, n_args_hash text,
    n_parent_run_id text, n_deadline_at float8, n_result text, n_error text,
    n_cancel_requested bool, n_owner text, n_fence int8, n_flagged bool,
    n_service text, n_version text, n_epoch int4,
    n_time float8, n_tail text, n_action text, n_data text, n_notice text,
    h_key text[], h_kind text[], h_name text[], h_status text[], h_seq int4[],
    h_result text[], h_error text[], h_error_type text[], h_attempts int4[],
    h_started_at float8[], h_ended_at float8[], h_wake_at float8[], h_detail text[],
    a_key text[], a_attempt int4[], a_started_at float8[], a_ended_at float8[],
    a_error_type text[], a_error text[],
    k_actor text, k_action text, k_data text, k_tail text, k_notice text,
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
    IF cardinality(h_key) > 0 THEN
        INSERT INTO history (app, run_id, key, kind, name, status, seq, result, error,
                error_type, attempts, started_at, ended_at, wake_at, detail)
            SELECT n_app, n_run_id, u.* FROM unnest(h_key, h_kind, h_name, h_status, h_seq,
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
            SELECT n_app, n_run_id, u.* FROM unnest(a_key, a_attempt, a_started_at,
                a_ended_at, a_error_type, a_error) AS u
            ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET
            ended_at=excluded.ended_at, error_type=excluded.error_type,
            error=excluded.error
            WHERE NOT (COALESCE(attempts.error_type, '') = 'Paused'
                AND COALESCE(excluded.error_type, '') = 'WorkerLost'
                AND attempts.started_at = excluded.started_at);
    END IF;
    IF k_tail IS NOT NULL THEN
        PERFORM cantata_audit_one(n_app, n_time, k_actor, k_action, n_run_id, k_data,
            k_tail, kin, kout, genesis);
    END IF;
    IF n_notice IS NOT NULL THEN
        PERFORM pg_notify('cantata_changes', n_notice);
    END IF;
    IF k_notice IS NOT NULL AND k_notice IS DISTINCT FROM n_notice THEN
        PERFORM pg_notify('cantata_changes', k_notice);
    END IF;
    RETURN true;
END
$fn$;
