-- The arrays of cantata_write_runs (0011) as one JSON document: for a batch of 8
-- shares or more the writer sends json_populate_record(NULL::cantata_write_args,
-- $1::json) instead of 69 array parameters. Encoding a Python list as a PostgreSQL
-- array costs the driver about a microsecond per element (a few hundred thousand
-- elements in 2,000 sagas); orjson writes the document in a small part of that, and
-- the server turns each field into its array in C. Values arrive exactly: text as
-- written, float8 from the shortest round-trip text, NULL from null (NaN and
-- infinities, which JSON cannot carry, go as arrays: postgres_onetrip._document).
CREATE TYPE cantata_write_args AS (
    n_run_id text[], n_app text[], n_workflow text[], n_status text[], n_args text[],
    n_created_at float8[], n_updated_at float8[], n_correlation_id text[],
    n_causation_id text[], n_idempotency_key text[], n_args_hash text[],
    n_parent_run_id text[], n_deadline_at float8[], n_result text[], n_error text[],
    n_cancel_requested bool[], n_owner text[], n_fence int8[], n_flagged bool[],
    n_service text[], n_version text[], n_epoch int4[],
    n_time float8[], n_tail text[], n_action text[], n_data text[], n_notice text[],
    k_app text[], k_run_id text[], k_fence int8[], k_status text[], k_result text[],
    k_error text[], k_flagged bool[], k_release bool[], k_i int4[], k_now float8,
    h_app text[], h_run_id text[], h_key text[], h_kind text[], h_name text[],
    h_status text[], h_seq int4[], h_result text[], h_error text[], h_error_type text[],
    h_attempts int4[], h_started_at float8[], h_ended_at float8[], h_wake_at float8[],
    h_detail text[],
    a_app text[], a_run_id text[], a_key text[], a_attempt int4[], a_started_at float8[],
    a_ended_at float8[], a_error_type text[], a_error text[],
    k_time float8[], k_time_json text[], k_same_action text[], k_same_data text[],
    k_same_rest text[], k_chg_action text[], k_chg_data text[], k_chg_rest text[],
    k_notice text[]
);

-- cantata_write_runs as in 0011 but for its checkpoint statement: each run's new
-- values are carried by the row locked in "old" instead of joined from the calls a
-- second time in "upd" (a nested loop of 256 x 256 rows for a full batch, about half
-- the function's time). The same results, row for row.
CREATE OR REPLACE FUNCTION cantata_write_runs(
    n_run_id text[], n_app text[], n_workflow text[], n_status text[], n_args text[],
    n_created_at float8[], n_updated_at float8[], n_correlation_id text[],
    n_causation_id text[], n_idempotency_key text[], n_args_hash text[],
    n_parent_run_id text[], n_deadline_at float8[], n_result text[], n_error text[],
    n_cancel_requested bool[], n_owner text[], n_fence int8[], n_flagged bool[],
    n_service text[], n_version text[], n_epoch int4[],
    -- each new run's run.created record (time, canonical tail, action, data) and notice
    n_time float8[], n_tail text[], n_action text[], n_data text[], n_notice text[],
    -- the checkpoints: runs, history, attempts (as postgres_writes._COMMIT_ALL)
    k_app text[], k_run_id text[], k_fence int8[], k_status text[], k_result text[],
    k_error text[], k_flagged bool[], k_release bool[], k_i int4[], k_now float8,
    h_app text[], h_run_id text[], h_key text[], h_kind text[], h_name text[],
    h_status text[], h_seq int4[], h_result text[], h_error text[], h_error_type text[],
    h_attempts int4[], h_started_at float8[], h_ended_at float8[], h_wake_at float8[],
    h_detail text[],
    a_app text[], a_run_id text[], a_key text[], a_attempt int4[], a_started_at float8[],
    a_ended_at float8[], a_error_type text[], a_error text[],
    -- each checkpoint's record: time, its JSON, and action, data and the tail after the
    -- actor if the status changes (chg) or not (same; NULL: no record); its notice
    k_time float8[], k_time_json text[], k_same_action text[], k_same_data text[],
    k_same_rest text[], k_chg_action text[], k_chg_data text[], k_chg_rest text[],
    k_notice text[],
    -- the audit keys (HMAC pads, never stored) of keyed apps, and the genesis hash
    key_app text[], key_inner bytea[], key_outer bytea[], genesis text
) RETURNS TABLE (out_kind text, out_i int4, out_owner text, out_status text,
                 out_correlation_id text)
LANGUAGE plpgsql
-- generic plans: planning these statements anew each call costs about as much as
-- running them (as postgres_batch's BEGIN says for the transactional path)
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
DECLARE
    rec record;
    j int4;
    x int4;
    chg bool;
    actor text;
    au_app text[] := '{}';
    au_time float8[] := '{}';
    au_tail text[] := '{}';
    au_actor text[] := '{}';
    au_action text[] := '{}';
    au_target text[] := '{}';
    au_data text[] := '{}';
    notices text[] := '{}';
    kin bytea;
    kout bytea;
    s int8;
    p text;
    hh text;
    ap text;
    r_j int4[];
    r_seq int8[];
    r_prev text[];
    r_hash text[];
BEGIN
    IF cardinality(n_run_id) > 0 THEN
        FOR rec IN
            INSERT INTO runs (run_id, app, workflow, status, args, created_at, updated_at,
                correlation_id, causation_id, idempotency_key, args_hash, parent_run_id,
                deadline_at, result, error, cancel_requested, owner, fence, flagged,
                service, version, epoch)
            SELECT u.run_id, u.app, u.workflow, u.status, u.args, u.created_at,
                u.updated_at, u.correlation_id, u.causation_id, u.idempotency_key,
                u.args_hash, u.parent_run_id, u.deadline_at, u.result, u.error,
                u.cancel_requested, u.owner, u.fence, u.flagged, u.service, u.version,
                u.epoch
            FROM unnest(n_run_id, n_app, n_workflow, n_status, n_args, n_created_at,
                n_updated_at, n_correlation_id, n_causation_id, n_idempotency_key,
                n_args_hash, n_parent_run_id, n_deadline_at, n_result, n_error,
                n_cancel_requested, n_owner, n_fence, n_flagged, n_service, n_version,
                n_epoch) WITH ORDINALITY AS u(run_id, app, workflow, status, args,
                created_at, updated_at, correlation_id, causation_id, idempotency_key,
                args_hash, parent_run_id, deadline_at, result, error, cancel_requested,
                owner, fence, flagged, service, version, epoch, ord)
            ORDER BY u.ord
            ON CONFLICT (app, idempotency_key) WHERE idempotency_key IS NOT NULL
            DO NOTHING RETURNING runs.app, runs.run_id
        LOOP
            x := array_position(n_run_id, rec.run_id);
            WHILE n_app[x] <> rec.app LOOP  -- one run id in two apps
                x := array_position(n_run_id, rec.run_id, x + 1);
            END LOOP;
            au_app := au_app || n_app[x];
            au_time := au_time || n_time[x];
            au_tail := au_tail || n_tail[x];
            au_actor := au_actor || 'system'::text;
            au_action := au_action || n_action[x];
            au_target := au_target || n_run_id[x];
            au_data := au_data || n_data[x];
            IF n_notice[x] IS NOT NULL THEN
                notices := notices || n_notice[x];
            END IF;
            out_kind := 'n'; out_i := x - 1; out_owner := NULL;
            out_status := NULL; out_correlation_id := NULL;
            RETURN NEXT;
        END LOOP;
    END IF;

    IF cardinality(k_run_id) > 0 THEN
        FOR rec IN
            WITH c AS (SELECT * FROM unnest(k_app, k_run_id, k_fence, k_status, k_result,
                k_error, k_flagged, k_release, k_i)
                AS c(app, run_id, fence, status, result, error, flagged, release, i)),
            -- the new values ride along with the locked row: joining the calls again
            -- in upd made a nested loop over them per run (the generic plan expects
            -- few), quadratic in a batch of 256
            old AS MATERIALIZED (SELECT r.app, r.run_id, r.owner, r.status, c.i,
                    c.status AS new_status, c.result AS new_result, c.error AS new_error,
                    c.flagged AS new_flagged, c.release AS new_release FROM runs r
                JOIN c ON r.app=c.app AND r.run_id=c.run_id AND r.fence=c.fence
                ORDER BY r.app, r.run_id FOR UPDATE OF r),
            upd AS (UPDATE runs r SET updated_at=k_now,
                status=coalesce(old.new_status, r.status),
                result=coalesce(old.new_result, r.result),
                error=coalesce(old.new_error, r.error),
                flagged=coalesce(old.new_flagged, r.flagged),
                owner=CASE WHEN old.new_release THEN NULL ELSE r.owner END
                FROM old
                WHERE r.app=old.app AND r.run_id=old.run_id
                RETURNING old.i AS i, old.owner AS owner, old.status AS status,
                    r.correlation_id AS correlation_id),
            h AS (INSERT INTO history (app, run_id, key, kind, name, status, seq, result,
                    error, error_type, attempts, started_at, ended_at, wake_at, detail)
                SELECT u.* FROM unnest(h_app, h_run_id, h_key, h_kind, h_name, h_status,
                    h_seq, h_result, h_error, h_error_type, h_attempts, h_started_at,
                    h_ended_at, h_wake_at, h_detail) AS u(app, run_id, key, kind, name,
                    status, seq, result, error, error_type, attempts, started_at,
                    ended_at, wake_at, detail)
                WHERE (u.app, u.run_id) IN (SELECT app, run_id FROM old)
                ON CONFLICT (app, run_id, key) DO UPDATE SET
                status=excluded.status, result=excluded.result, error=excluded.error,
                error_type=excluded.error_type, attempts=excluded.attempts,
                started_at=excluded.started_at, ended_at=excluded.ended_at,
                wake_at=excluded.wake_at, detail=excluded.detail),
            a AS (INSERT INTO attempts (app, run_id, key, attempt, started_at, ended_at,
                    error_type, error)
                SELECT u.* FROM unnest(a_app, a_run_id, a_key, a_attempt, a_started_at,
                    a_ended_at, a_error_type, a_error) AS u(app, run_id, key, attempt,
                    started_at, ended_at, error_type, error)
                WHERE (u.app, u.run_id) IN (SELECT app, run_id FROM old)
                ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET
                ended_at=excluded.ended_at, error_type=excluded.error_type,
                error=excluded.error
                -- an attempt its worker excused (Paused) stays excused when the new
                -- owner's WorkerLost write for it arrives later (postgres_ops.KEEP_EXCUSED)
                WHERE NOT (COALESCE(attempts.error_type, '') = 'Paused'
                    AND COALESCE(excluded.error_type, '') = 'WorkerLost'
                    AND attempts.started_at = excluded.started_at))
            SELECT * FROM upd ORDER BY i
        LOOP
            j := rec.i + 1;
            chg := k_status[j] IS NOT NULL AND k_status[j] <> rec.status;
            IF (CASE WHEN chg THEN k_chg_rest[j] ELSE k_same_rest[j] END) IS NOT NULL THEN
                IF rec.owner IS NULL THEN
                    actor := 'system';
                ELSIF rec.owner ~ '^[ -~]*$' THEN
                    actor := 'worker:' || rec.owner;
                ELSE
                    RAISE EXCEPTION 'the owner of run % is not printable ASCII', k_run_id[j]
                        USING ERRCODE = 'CN001';
                END IF;
                au_app := au_app || k_app[j];
                au_time := au_time || k_time[j];
                au_tail := au_tail || (k_time_json[j] || ',' || to_json(actor)::text
                    || CASE WHEN chg THEN k_chg_rest[j] ELSE k_same_rest[j] END);
                au_actor := au_actor || actor;
                au_action := au_action
                    || CASE WHEN chg THEN k_chg_action[j] ELSE k_same_action[j] END;
                au_target := au_target || k_run_id[j];
                au_data := au_data || CASE WHEN chg THEN k_chg_data[j] ELSE k_same_data[j] END;
            END IF;
            IF k_notice[j] IS NOT NULL THEN
                notices := notices || k_notice[j];
            END IF;
            out_kind := 'k'; out_i := rec.i; out_owner := rec.owner; out_status := rec.status;
            out_correlation_id := rec.correlation_id;
            RETURN NEXT;
        END LOOP;
    END IF;

    -- the records, apps in name order (every writer locks chain heads in one order):
    -- per app, its head locked once, the hashes chained here, the records inserted in
    -- one statement and the head moved once
    FOR ap IN SELECT DISTINCT t.app FROM unnest(au_app) AS t(app) ORDER BY 1 LOOP
        x := array_position(key_app, ap);
        kin := CASE WHEN x IS NULL THEN NULL ELSE key_inner[x] END;
        kout := CASE WHEN x IS NULL THEN NULL ELSE key_outer[x] END;
        SELECT h.seq, h.hash INTO s, hh FROM audit_head h WHERE h.app = ap FOR UPDATE;
        IF NOT FOUND THEN  -- the app's first record: a head to lock, moved below
            INSERT INTO audit_head (app, seq, prev_hash, hash) VALUES (ap, 0, genesis, genesis)
                ON CONFLICT (app) DO NOTHING;
            SELECT h.seq, h.hash INTO s, hh FROM audit_head h WHERE h.app = ap FOR UPDATE;
        END IF;
        r_j := '{}'; r_seq := '{}'; r_prev := '{}'; r_hash := '{}';
        FOR j IN SELECT t.ord FROM unnest(au_app) WITH ORDINALITY AS t(app, ord)
                WHERE t.app = ap ORDER BY t.ord LOOP
            s := s + 1;
            p := hh;
            IF kin IS NULL THEN
                hh := encode(sha256(convert_to(p || '[' || s || ',' || au_tail[j], 'UTF8')),
                    'hex');
            ELSE  -- HMAC-SHA256 as sha256(outer || sha256(inner || message))
                hh := encode(sha256(kout || sha256(kin || convert_to(
                    p || '[' || s || ',' || au_tail[j], 'UTF8'))), 'hex');
            END IF;
            r_j := r_j || j;
            r_seq := r_seq || s;
            r_prev := r_prev || p;
            r_hash := r_hash || hh;
        END LOOP;
        INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        SELECT ap, u.seq, au_time[u.j], au_actor[u.j], au_action[u.j], au_target[u.j],
            au_data[u.j], u.prev, u.hash
        FROM unnest(r_j, r_seq, r_prev, r_hash) AS u(j, seq, prev, hash);
        UPDATE audit_head h SET seq = s, prev_hash = p, hash = hh WHERE h.app = ap;
    END LOOP;

    PERFORM pg_notify('cantata_changes', t.n)
        FROM (SELECT DISTINCT n FROM unnest(notices) AS u(n) ORDER BY n) AS t;
END
$fn$;
