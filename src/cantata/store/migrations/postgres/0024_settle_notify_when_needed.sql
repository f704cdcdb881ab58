-- Version 24 of the PostgreSQL schema: cantata_settle_one (0022) notifies only when
-- another process may need to hear of the commit (issue 19; docs/performance.md, round
-- nine). The same parameters, rows, records and errors.
--
-- The notice (cantata_changes, '<app>:events') makes every listening process wake its
-- relay, its runs waiting for events and its consumers' claims. The process that
-- commits a settlement or an append learns of its own events in process (the
-- choreography's emitted: the waits, the hand-off, the relay's offer), so the notice
-- is for the others, and it is left out when none of them can need it:
--
-- * a settlement done that stores no event, and
-- * one event stored by a settlement done (a hop; the last hop's event, for no group),
--   or by an append that holds a delivery of it for the appending worker
--   (app.publish), with every delivery it made held for that worker (none pending
--   for a consumer anywhere to claim, none that was there before) and no wait
--   declared for its type (a run of another process in wait_for_event). An append
--   that holds nothing still notifies: its own process's listeners hear of their
--   writes by the notice (the store contract).
--
-- Everything else notifies as before: a retry (a delivery pending again) or a dead
-- letter, an event with a delivery pending or a waited type, several events or holds
-- (the general statement). A process that misses a notice still finds the change at
-- its next poll: the notice is a wake-up, not the data.
--
-- The one-event path gathers what it stored with SELECT ... INTO (one statement, as
-- RETURN QUERY was) and returns the same rows from it.
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
        -- the delivery, locked and changed unless it is done; its owner from before
        -- (read as it locks the row: the update finds the row it locked)
        FOR x IN 1 .. 2 LOOP
            SELECT d.owner INTO own FROM deliveries d
                WHERE d.app = s_app AND d.grp = s_grp AND d.event_id = s_event_id
                AND d.status <> 'done' FOR UPDATE;
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
            -- no such delivery (create it, pending, and settle it) or it is done
            INSERT INTO deliveries (app, grp, event_id, status, updated_at)
                VALUES (s_app, s_grp, s_event_id, 'pending', s_now)
                ON CONFLICT DO NOTHING;
        END LOOP;
        IF NOT settled THEN
            RETURN;  -- done already: nothing written
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
