-- Version 26 of the PostgreSQL schema: a settlement 'retry' or 'dead' leaves a
-- dead-lettered delivery as it is. Two copies of one delivery can run at once (a
-- broker redelivers while the first still runs, or a worker's lease runs out): when
-- one dead-letters the delivery and the other then fails too, the second one's retry
-- put the delivery back to pending (it ran again while its dead letter was listed) and
-- its dead put a second dead letter on it. Now only a pending delivery takes a retry
-- or a dead; a dead one takes only 'done' (the other copy's handler succeeded: 0025
-- drops the dead letter), and a replay from the dead letter queue is what puts it
-- back. The settlement that finds its delivery settled for good writes nothing and
-- says so, as one that finds it done did (the caller acks its message).
-- cantata_settle (0015) and cantata_settle_one (0024) as they were, but for the
-- condition on the delivery they lock; the Python statement of the transactional path
-- (postgres_event_writes._settle_sql) and the SQLite store check the same.

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
        -- the delivery, locked and changed unless it was settled for good (done, or dead
        -- for a retry or a second dead letter); its owner from before
        FOR x IN 1 .. 2 LOOP
            WITH old AS MATERIALIZED (SELECT d.owner FROM deliveries d
                WHERE d.app = s_app[j] AND d.grp = s_grp[j] AND d.event_id = s_event_id[j]
                AND (d.status = 'pending' OR (d.status = 'dead' AND s_outcome[j] = 'done'))
                FOR UPDATE)
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
            -- no such delivery (create it, pending, and settle it) or settled for good
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

CREATE OR REPLACE FUNCTION cantata_settle_one(
    s_app text, s_grp text, s_event_id text, s_outcome text, s_attempts int4,
    s_error text, s_retry_at float8, s_dead_letter_id text, s_now float8,
    s_time float8, s_time_json text, s_action text, s_data text, s_rest text,
    e_type text[], e_data text[], e_id text[], e_source text[], e_subject text[],
    e_time text[], e_correlation_id text[], e_causation_id text[],
    e_traceparent text[], e_signature text[],
    h_worker text, h_grp text[], h_event_id text[],
    kin bytea, kout bytea, genesis text
) RETURNS TABLE (out_kind text, out_grp text, out_event_id text, out_n int4)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    x int4;
    own text;
    who text;  -- the record's actor
    tail text;  -- the record's canonical text after its sequence number
    settled bool := false;
    hold_g text;  -- the one event's held group (the fast path), NULL: none
    one_id text;  -- the one event, as stored (NULL: stored before)
    one_n int4;  -- its groups
    one_held text;  -- its delivery held for h_worker
    loud bool;  -- someone else may need the notice
    quiet bool := false;  -- no other process needs to hear of this commit
BEGIN
    IF s_grp IS NOT NULL THEN
        -- the delivery, locked and changed unless it was settled for good (done, or dead
        -- for a retry or a second dead letter); its owner from before
        -- (read as it locks the row: the update finds the row it locked)
        FOR x IN 1 .. 2 LOOP
            SELECT d.owner INTO own FROM deliveries d
                WHERE d.app = s_app AND d.grp = s_grp AND d.event_id = s_event_id
                AND (d.status = 'pending' OR (d.status = 'dead' AND s_outcome = 'done'))
                FOR UPDATE;
            settled := FOUND;
            IF settled THEN
                UPDATE deliveries d SET status = CASE s_outcome WHEN 'done' THEN 'done'
                        WHEN 'retry' THEN 'pending' ELSE 'dead' END,
                    attempts = s_attempts, owner = NULL,
                    error = CASE WHEN s_outcome = 'done' THEN NULL ELSE s_error END,
                    next_at = CASE WHEN s_outcome = 'retry' THEN s_retry_at ELSE d.next_at END,
                    updated_at = s_now
                WHERE d.app = s_app AND d.grp = s_grp AND d.event_id = s_event_id;
            END IF;
            EXIT WHEN settled OR x = 2;
            -- no such delivery (create it, pending, and settle it) or settled for good
            INSERT INTO deliveries (app, grp, event_id, status, updated_at)
                VALUES (s_app, s_grp, s_event_id, 'pending', s_now)
                ON CONFLICT DO NOTHING;
        END LOOP;
        IF NOT settled THEN
            RETURN;  -- settled for good already: nothing written
        END IF;
        IF s_outcome = 'dead' THEN
            INSERT INTO dead_letters (app, id, grp, event_id, error, attempts, failed_at)
                VALUES (s_app, s_dead_letter_id, s_grp, s_event_id,
                    CASE WHEN coalesce(s_error, '') = '' THEN 'unknown error'
                    ELSE s_error END, s_attempts, s_now);
        END IF;
        IF s_rest IS NOT NULL THEN
            IF own IS NULL THEN
                who := 'system';
            ELSIF own ~ '^[ -~]*$' THEN
                who := 'worker:' || own;
            ELSE
                RAISE EXCEPTION 'the owner of delivery %:% is not printable ASCII',
                    s_grp, s_event_id USING ERRCODE = 'CN001';
            END IF;
            tail := s_time_json || ',' || to_json(who)::text || s_rest;
        END IF;
        out_kind := 's'; out_grp := NULL; out_event_id := NULL; out_n := NULL;
        RETURN NEXT;
    END IF;

    -- the events (of a settlement done, or appended), each with a pending delivery per
    -- matching group unless it was stored before; each one inserted with the number of
    -- groups it went to (as cantata_settle). A delivery to hold for h_worker is
    -- inserted held (owner h_worker, fence 1, attempt 1: Settlement.hold), as 0020's
    -- update of the pending row it had just inserted left it: the deliveries this
    -- transaction created are the ones this call inserts, the call being a
    -- transaction of its own (postgres_batch's OneStatement); one inserted before (a
    -- conflict) is not held (see 0015). Its 'h' rows in the order of h_grp.
    IF (s_grp IS NULL OR s_outcome = 'done') AND cardinality(e_id) > 0 THEN
        IF h_worker IS NOT NULL AND cardinality(h_grp) = 1 THEN
            hold_g := h_grp[1];
        END IF;
        IF cardinality(e_id) = 1 AND coalesce(cardinality(h_grp), 0) <= 1
                AND (hold_g IS NULL OR h_event_id[1] = e_id[1]) THEN
            -- one event (a hop), at most one delivery of it to hold: its row as
            -- values, no unnest, sort or join with the holds
            WITH ins AS (
                INSERT INTO events (app, type, data, id, source, subject, time,
                    correlation_id, causation_id, traceparent, signature, stored_at)
                VALUES (s_app, e_type[1], e_data[1], e_id[1], e_source[1], e_subject[1],
                    e_time[1], e_correlation_id[1], e_causation_id[1], e_traceparent[1],
                    e_signature[1], s_now)
                ON CONFLICT (app, id) DO NOTHING RETURNING events.id, events.type),
            fan AS MATERIALIZED (
                SELECT DISTINCT dc.name AS grp
                FROM ins JOIN declarations dc ON dc.app = s_app
                    AND dc.kind IN ('handler', 'trigger')
                    -- an exact pattern without the call of a function (not inlined)
                    AND (dc.pattern = ins.type OR (strpos(dc.pattern, '*') > 0
                        AND cantata_type_matches(dc.pattern, ins.type)))),
            dl AS (
                INSERT INTO deliveries (app, grp, event_id, status, attempts, owner,
                    fence, updated_at)
                SELECT s_app, fan.grp, e_id[1], 'pending',
                    CASE WHEN fan.grp = hold_g THEN 1 ELSE 0 END,
                    CASE WHEN fan.grp = hold_g THEN h_worker END,
                    CASE WHEN fan.grp = hold_g THEN 1 ELSE 0 END, s_now
                FROM fan
                ON CONFLICT DO NOTHING RETURNING deliveries.grp, deliveries.owner)
            SELECT ins.id, (SELECT count(*) FROM fan)::int4,
                (SELECT dl.grp FROM dl WHERE dl.owner IS NOT NULL LIMIT 1),
                -- a delivery pending (or one there before), or a run that may wait for it
                EXISTS (SELECT 1 FROM dl WHERE dl.owner IS NULL)
                    OR (SELECT count(*) FROM fan) <> (SELECT count(*) FROM dl)
                    OR EXISTS (SELECT 1 FROM declarations dw WHERE dw.app = s_app
                        AND dw.kind = 'wait' AND (dw.pattern = ins.type
                        OR (strpos(dw.pattern, '*') > 0
                            AND cantata_type_matches(dw.pattern, ins.type))))
            INTO one_id, one_n, one_held, loud
            FROM ins;
            IF one_id IS NOT NULL THEN
                out_kind := 'e'; out_grp := NULL; out_event_id := one_id; out_n := one_n;
                RETURN NEXT;
                IF one_held IS NOT NULL THEN
                    out_kind := 'h'; out_grp := one_held; out_event_id := e_id[1];
                    out_n := NULL;
                    RETURN NEXT;
                END IF;
                -- an append's own process hears of it by the notice unless it held it
                quiet := NOT loud AND (s_grp IS NOT NULL OR hold_g IS NOT NULL);
            ELSE
                quiet := true;  -- stored before: nothing new
            END IF;
        ELSE
            RETURN QUERY
            WITH ins AS (
                INSERT INTO events (app, type, data, id, source, subject, time,
                    correlation_id, causation_id, traceparent, signature, stored_at)
                SELECT s_app, u.type, u.data, u.id, u.source, u.subject, u.time,
                    u.correlation_id, u.causation_id, u.traceparent, u.signature, s_now
                FROM unnest(e_type, e_data, e_id, e_source, e_subject, e_time,
                    e_correlation_id, e_causation_id, e_traceparent, e_signature)
                    WITH ORDINALITY AS u(type, data, id, source, subject, time,
                    correlation_id, causation_id, traceparent, signature, ord)
                ORDER BY u.ord
                ON CONFLICT (app, id) DO NOTHING RETURNING events.id, events.type),
            fan AS MATERIALIZED (
                SELECT DISTINCT dc.name AS grp, ins.id AS event_id
                FROM ins JOIN declarations dc ON dc.app = s_app
                    AND dc.kind IN ('handler', 'trigger')
                    AND (dc.pattern = ins.type OR (strpos(dc.pattern, '*') > 0
                        AND cantata_type_matches(dc.pattern, ins.type)))),
            hl AS MATERIALIZED (  -- each delivery to hold once, at its first place
                SELECT h.grp, h.event_id, min(h.ord) AS ord
                FROM unnest(h_grp, h_event_id) WITH ORDINALITY AS h(grp, event_id, ord)
                WHERE h_worker IS NOT NULL GROUP BY h.grp, h.event_id),
            dl AS (
                INSERT INTO deliveries (app, grp, event_id, status, attempts, owner,
                    fence, updated_at)
                SELECT s_app, fan.grp, fan.event_id, 'pending',
                    CASE WHEN hl.ord IS NULL THEN 0 ELSE 1 END,
                    CASE WHEN hl.ord IS NULL THEN NULL ELSE h_worker END,
                    CASE WHEN hl.ord IS NULL THEN 0 ELSE 1 END, s_now
                FROM fan LEFT JOIN hl ON hl.grp = fan.grp AND hl.event_id = fan.event_id
                ON CONFLICT DO NOTHING
                RETURNING deliveries.grp, deliveries.event_id, deliveries.owner)
            SELECT r.k, r.g, r.e, r.n FROM (
                SELECT 'e'::text AS k, NULL::text AS g, ins.id AS e,
                    (SELECT count(*) FROM fan WHERE fan.event_id = ins.id)::int4 AS n,
                    0::int8 AS o
                FROM ins
                UNION ALL
                SELECT 'h'::text, dl.grp, dl.event_id, NULL::int4, hl.ord
                FROM dl JOIN hl ON hl.grp = dl.grp AND hl.event_id = dl.event_id
                WHERE dl.owner IS NOT NULL) AS r
            ORDER BY r.o;
        END IF;
    ELSIF s_grp IS NULL THEN
        RETURN;  -- an append of no events: nothing written, no notice
    ELSE
        quiet := s_outcome = 'done';  -- settled, nothing stored for anyone
    END IF;

    -- the record: the head moved (by an upsert at the app's first record)
    IF tail IS NOT NULL THEN
        WITH h AS (
            UPDATE audit_head h SET seq = h.seq + 1, prev_hash = h.hash,
                hash = CASE WHEN kin IS NULL
                THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                    || tail, 'UTF8')), 'hex')
                ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                    || (h.seq + 1)::text || ',' || tail, 'UTF8'))), 'hex') END
            WHERE h.app = s_app
            RETURNING h.seq, h.prev_hash, h.hash)
        INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
        SELECT s_app, h.seq, s_time, who, s_action, s_grp || ':' || s_event_id, s_data,
            h.prev_hash, h.hash FROM h;
        IF NOT FOUND THEN
            WITH h AS (
                INSERT INTO audit_head AS h (app, seq, prev_hash, hash)
                VALUES (s_app, 1, genesis, CASE WHEN kin IS NULL
                    THEN encode(sha256(convert_to(genesis || '[1,' || tail, 'UTF8')), 'hex')
                    ELSE encode(sha256(kout || sha256(kin || convert_to(
                        genesis || '[1,' || tail, 'UTF8'))), 'hex') END)
                ON CONFLICT (app) DO UPDATE SET seq = h.seq + 1, prev_hash = h.hash,
                    hash = CASE WHEN kin IS NULL
                    THEN encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ','
                        || tail, 'UTF8')), 'hex')
                    ELSE encode(sha256(kout || sha256(kin || convert_to(h.hash || '['
                        || (h.seq + 1)::text || ',' || tail, 'UTF8'))), 'hex') END
                RETURNING h.seq, h.prev_hash, h.hash)
            INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
            SELECT s_app, h.seq, s_time, who, s_action, s_grp || ':' || s_event_id, s_data,
                h.prev_hash, h.hash FROM h;
        END IF;
    END IF;

    IF NOT quiet THEN
        PERFORM pg_notify('cantata_changes', s_app || ':events');
    END IF;
END
$fn$;
