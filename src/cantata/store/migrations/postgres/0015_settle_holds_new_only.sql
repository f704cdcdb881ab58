-- cantata_settle (migration 0014) holds only the deliveries its own transaction
-- created, as SQLite does (cantata.store.sqlite_events._hold): the delivery of an
-- emitted event whose id was stored before may be in hand at another worker through a
-- NATS copy the store cannot see, and holding it would run its handler twice. And the
-- deliveries of events appended in the batch (app.publish: EventStore.append_held) are
-- held too (h_i past the settlements names an append), and the number of groups each
-- inserted event went to is returned for settlements too (Settlement.addressed: the
-- relay publishes an event every delivery of which its worker holds a little later).
-- The function is the same as 0014's but for the held row's xmin, its app taken from
-- all_app and those counts.

CREATE OR REPLACE FUNCTION cantata_settle(
    -- the settlements, in the order given: outcome 'done', 'retry' or 'dead'
    s_app text[], s_grp text[], s_event_id text[], s_outcome text[], s_attempts int4[],
    s_error text[], s_retry_at float8[], s_dead_letter_id text[], s_now float8,
    -- each one's record: time, its JSON, action, data and the tail after the actor
    s_time float8[], s_time_json text[], s_action text[], s_data text[], s_rest text[],
    -- the events emitted by each (e_i: its settlement, from 0), in order
    e_i int4[], e_type text[], e_data text[], e_id text[], e_source text[],
    e_subject text[], e_time text[], e_correlation_id text[], e_causation_id text[],
    e_traceparent text[], e_signature text[],
    -- the deliveries of those events to hold for a worker (h_i: its settlement)
    h_i int4[], h_worker text[], h_grp text[], h_event_id text[],
    -- the audit keys (HMAC pads, never stored) of keyed apps, and the genesis hash
    key_app text[], key_inner bytea[], key_outer bytea[], genesis text,
    -- claims of deliveries made in the same batch (as postgres_event_writes'
    -- _CLAIM_DELIVERIES), after the settlements; their groups flattened (cg_i: the claim)
    c_app text[], c_worker text[], c_now float8[], c_stale float8[], c_limit int4[],
    cg_i int4[], cg_grp text[],
    -- the apps of appends of events (postgres_event_writes.append_many): their events
    -- are in e_*, e_i counting on from the settlements
    p_app text[]
) RETURNS TABLE (out_kind text, out_i int4, out_grp text, out_event_id text,
    -- a claimed delivery (kind 'c'): attempts, next_at, error, fence, then its event
    out_attempts int4, out_next_at float8, out_error text, out_fence int8,
    out_type text, out_data text, out_id text, out_source text, out_subject text,
    out_time text, out_correlation_id text, out_causation_id text, out_traceparent text,
    out_signature text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
DECLARE
    j int4;
    x int4;
    this_xact xid := (txid_current() % 4294967296)::text::xid;
    own text;
    actor text;
    done_i int4[] := '{}';
    ev_apps text[];
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
    grps text[];
    all_app text[];
    settled bool;
BEGIN
    FOR j IN 1 .. coalesce(cardinality(s_app), 0) LOOP
        -- the delivery, locked and changed unless it is done; its owner from before
        FOR x IN 1 .. 2 LOOP
            WITH old AS MATERIALIZED (SELECT d.owner FROM deliveries d
                WHERE d.app = s_app[j] AND d.grp = s_grp[j] AND d.event_id = s_event_id[j]
                AND d.status <> 'done' FOR UPDATE)
            UPDATE deliveries d SET status = CASE s_outcome[j] WHEN 'done' THEN 'done'
                    WHEN 'retry' THEN 'pending' ELSE 'dead' END,
                attempts = s_attempts[j], owner = NULL,
                error = CASE WHEN s_outcome[j] = 'done' THEN NULL ELSE s_error[j] END,
                next_at = CASE WHEN s_outcome[j] = 'retry' THEN s_retry_at[j]
                    ELSE d.next_at END,
                updated_at = s_now
            FROM old WHERE d.app = s_app[j] AND d.grp = s_grp[j]
                AND d.event_id = s_event_id[j]
            RETURNING old.owner INTO own;
            settled := FOUND;
            EXIT WHEN settled OR x = 2;
            -- no such delivery (create it, pending, and settle it) or it is done
            INSERT INTO deliveries (app, grp, event_id, status, updated_at)
                VALUES (s_app[j], s_grp[j], s_event_id[j], 'pending', s_now)
                ON CONFLICT DO NOTHING;
        END LOOP;
        CONTINUE WHEN NOT settled;
        IF s_outcome[j] = 'done' THEN
            done_i := done_i || (j - 1);
        ELSIF s_outcome[j] = 'dead' THEN
            INSERT INTO dead_letters (app, id, grp, event_id, error, attempts, failed_at)
                VALUES (s_app[j], s_dead_letter_id[j], s_grp[j], s_event_id[j],
                    CASE WHEN coalesce(s_error[j], '') = '' THEN 'unknown error'
                    ELSE s_error[j] END, s_attempts[j], s_now);
        END IF;
        notices := notices || (s_app[j] || ':events');
        IF s_rest[j] IS NOT NULL THEN
            IF own IS NULL THEN
                actor := 'system';
            ELSIF own ~ '^[ -~]*$' THEN
                actor := 'worker:' || own;
            ELSE
                RAISE EXCEPTION 'the owner of delivery %:% is not printable ASCII',
                    s_grp[j], s_event_id[j] USING ERRCODE = 'CN001';
            END IF;
            au_app := au_app || s_app[j];
            au_time := au_time || s_time[j];
            au_tail := au_tail || (s_time_json[j] || ',' || to_json(actor)::text || s_rest[j]);
            au_actor := au_actor || actor;
            au_action := au_action || s_action[j];
            au_target := au_target || (s_grp[j] || ':' || s_event_id[j]);
            au_data := au_data || s_data[j];
        END IF;
        out_kind := 's'; out_i := j - 1; out_grp := NULL; out_event_id := NULL;
        RETURN NEXT;
    END LOOP;

    -- the events of the deliveries settled done and the events appended (e_i past the
    -- settlements: p_app's), per app (name order), each with a pending delivery per
    -- matching group unless it was stored before; each event inserted, with the number
    -- of groups it went to (kind 'e', out_attempts)
    all_app := coalesce(s_app, '{}') || coalesce(p_app, '{}');
    IF cardinality(p_app) > 0 THEN
        done_i := done_i || ARRAY(SELECT generate_series(cardinality(all_app)
            - cardinality(p_app), cardinality(all_app) - 1));
    END IF;
    IF cardinality(done_i) > 0 AND cardinality(e_i) > 0 THEN
        ev_apps := ARRAY(SELECT DISTINCT all_app[t.i + 1] FROM unnest(e_i) AS t(i)
            WHERE t.i = ANY(done_i) ORDER BY 1);
        FOREACH ap IN ARRAY ev_apps LOOP
            RETURN QUERY
            WITH ins AS (
                INSERT INTO events (app, type, data, id, source, subject, time,
                    correlation_id, causation_id, traceparent, signature, stored_at)
                SELECT ap, u.type, u.data, u.id, u.source, u.subject, u.time,
                    u.correlation_id, u.causation_id, u.traceparent, u.signature, s_now
                FROM unnest(e_i, e_type, e_data, e_id, e_source, e_subject, e_time,
                    e_correlation_id, e_causation_id, e_traceparent, e_signature)
                    WITH ORDINALITY AS u(i, type, data, id, source, subject, time,
                    correlation_id, causation_id, traceparent, signature, ord)
                WHERE u.i = ANY(done_i) AND all_app[u.i + 1] = ap
                ORDER BY u.ord
                ON CONFLICT (app, id) DO NOTHING RETURNING events.id, events.type),
            fan AS MATERIALIZED (
                SELECT DISTINCT dc.name AS grp, ins.id AS event_id
                FROM ins JOIN declarations dc ON dc.app = ap
                    AND dc.kind IN ('handler', 'trigger')
                    -- an exact pattern without the call of a function (not inlined)
                    AND (dc.pattern = ins.type OR (strpos(dc.pattern, '*') > 0
                        AND cantata_type_matches(dc.pattern, ins.type)))),
            dl AS (
                INSERT INTO deliveries (app, grp, event_id, status, updated_at)
                SELECT ap, fan.grp, fan.event_id, 'pending', s_now FROM fan
                ON CONFLICT DO NOTHING)
            SELECT 'e'::text, NULL::int4, NULL::text, ins.id,
                (SELECT count(*) FROM fan WHERE fan.event_id = ins.id)::int4, NULL::float8,
                NULL::text, NULL::int8, NULL::text, NULL::text, NULL::text, NULL::text,
                NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text
            FROM ins;  -- the counts appends and settlements return
            notices := notices || (ap || ':events');
        END LOOP;
    END IF;

    -- held by the worker that hands them off: a delivery this transaction created
    -- (its row's xmin is this transaction: an event stored before may have a delivery
    -- a broker copy is being handled with elsewhere right now), pending, nobody's, no
    -- attempt yet (Settlement.hold)
    -- (one by one, by key: a join would be planned from a new table's stale sizes)
    FOR x IN 1 .. coalesce(cardinality(h_i), 0) LOOP
        CONTINUE WHEN NOT (h_i[x] = ANY(done_i));
        RETURN QUERY
            UPDATE deliveries d SET owner = h_worker[x], fence = d.fence + 1, attempts = 1,
                updated_at = s_now
            WHERE d.app = all_app[h_i[x] + 1] AND d.grp = h_grp[x]
                AND d.event_id = h_event_id[x] AND d.status = 'pending' AND d.owner IS NULL
                AND d.attempts = 0 AND d.xmin = this_xact
            RETURNING 'h'::text, h_i[x], d.grp, d.event_id, NULL::int4, NULL::float8,
                NULL::text, NULL::int8, NULL::text, NULL::text, NULL::text, NULL::text,
                NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text;
    END LOOP;

    -- the claims, each as postgres_event_writes._CLAIM_DELIVERIES
    FOR j IN 1 .. coalesce(cardinality(c_app), 0) LOOP
        grps := ARRAY(SELECT g.grp FROM unnest(cg_i, cg_grp) AS g(i, grp) WHERE g.i = j - 1);
        RETURN QUERY
            WITH pick AS MATERIALIZED (
                SELECT d.grp, d.event_id FROM deliveries d WHERE d.app = c_app[j]
                    AND d.status = 'pending' AND d.grp = ANY(grps) AND d.next_at <= c_now[j]
                    AND (d.owner IS NULL OR (d.owner <> c_worker[j] AND NOT EXISTS (
                        SELECT 1 FROM workers w WHERE w.app = d.app
                        AND w.worker_id = d.owner AND w.heartbeat_at >= c_stale[j])))
                ORDER BY d.next_at LIMIT c_limit[j] FOR UPDATE SKIP LOCKED),
            upd AS (
                UPDATE deliveries d SET owner = c_worker[j], fence = d.fence + 1,
                    attempts = d.attempts + 1, updated_at = c_now[j]
                FROM pick WHERE d.app = c_app[j] AND d.grp = pick.grp
                    AND d.event_id = pick.event_id
                RETURNING d.grp, d.attempts, d.next_at, d.error, d.fence, d.event_id)
            SELECT 'c'::text, j - 1, upd.grp, upd.event_id, upd.attempts, upd.next_at,
                upd.error, upd.fence, e.type, e.data, e.id, e.source, e.subject, e.time,
                e.correlation_id, e.causation_id, e.traceparent, e.signature
            FROM upd JOIN events e ON e.app = c_app[j] AND e.id = upd.event_id
            ORDER BY upd.next_at, e.seq;
    END LOOP;

    -- the records, apps in name order (as cantata_write_runs, migration 0011); a lone
    -- record in one statement (as postgres_ops._APPEND_SQL: the head moved by an upsert)
    IF cardinality(au_app) = 1 THEN
        x := array_position(key_app, au_app[1]);
        kin := CASE WHEN x IS NULL THEN NULL ELSE key_inner[x] END;
        kout := CASE WHEN x IS NULL THEN NULL ELSE key_outer[x] END;
        WITH h AS (
            INSERT INTO audit_head AS h (app, seq, prev_hash, hash)
            VALUES (au_app[1], 1, genesis, CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(genesis || '[1,' || au_tail[1], 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(
                    genesis || '[1,' || au_tail[1], 'UTF8'))), 'hex') END)
            ON CONFLICT (app) DO UPDATE SET seq = h.seq + 1, prev_hash = h.hash,
                hash = CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                    || au_tail[1], 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                    || (h.seq + 1)::text || ',' || au_tail[1], 'UTF8'))), 'hex') END
            RETURNING h.seq, h.prev_hash, h.hash)
        INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        SELECT au_app[1], h.seq, au_time[1], au_actor[1], au_action[1], au_target[1],
            au_data[1], h.prev_hash, h.hash FROM h;
        au_app := '{}';
    END IF;
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
