-- Version 42 of the PostgreSQL schema: less server work per hop of a chain (issue 19;
-- docs/performance.md, "Round twenty-seven (chain, PostgreSQL settlement)").
--
-- cantata_settle_one (0026, its channel from 0027) restated with the same parameters,
-- rows, answers, records, notices and errors, so an older worker calling it during an
-- upgrade gets what it got before; what changes is how it writes:
--
-- * The settled delivery, once locked by the SELECT ... FOR UPDATE that reads its
--   owner, is updated by its row's address (ctid: a TID scan) instead of a second
--   descent of the key's index. The row is locked by this transaction from the SELECT
--   on, so no other version of it can appear in between.
-- * One event with at most one delivery of it to hold (0022's fast path) is no longer
--   one statement of data-modifying CTEs and five sub-selects: the event is inserted
--   by its values (ON CONFLICT as before: FOUND says it was stored now); the matching
--   declarations are read once, the groups (handlers and triggers, distinct) and the
--   waits together (0022 read them twice); the deliveries are inserted by their values
--   for one group (a hop), by unnest for more, each held for h_worker as before;
--   whether anyone else needs the notice is the same test: a delivery inserted
--   pending, one there before (a conflict), or a wait that matches.
-- * The rows it returns set only the columns that change from the row before.
--
-- And cantata_settle_hop (below), the same for at most one event with scalar
-- parameters, which this version's workers call for such a batch.
--
-- Measured on a private server (the backend under callgrind, the difference of a
-- connection's 120 and 20 hop settlements, done with one event held, keyed audit):
-- see docs/performance.md.

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
    grps text[];  -- the one event's groups (handlers and triggers), distinct
    waits bool;  -- a wait declaration matches it
    n_ins int4;  -- its deliveries inserted (not there before)
    row_id tid;  -- the settled delivery's row, locked
    quiet bool := false;  -- no other process needs to hear of this commit
BEGIN
    IF s_grp IS NOT NULL THEN
        -- the delivery, locked and changed unless it was settled for good (done, or dead
        -- for a retry or a second dead letter); its owner from before
        -- (read as it locks the row: the update takes the row it locked by its ctid)
        FOR x IN 1 .. 2 LOOP
            SELECT d.ctid, d.owner INTO row_id, own FROM deliveries d
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
                WHERE d.ctid = row_id;
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
        out_kind := 's';  -- the other columns NULL (as the OUT parameters start)
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
            INSERT INTO events (app, type, data, id, source, subject, time,
                correlation_id, causation_id, traceparent, signature, stored_at)
            VALUES (s_app, e_type[1], e_data[1], e_id[1], e_source[1], e_subject[1],
                e_time[1], e_correlation_id[1], e_causation_id[1], e_traceparent[1],
                e_signature[1], s_now)
            ON CONFLICT (app, id) DO NOTHING;
            IF FOUND THEN
                one_id := e_id[1];
                SELECT array_agg(DISTINCT dc.name) FILTER (WHERE dc.kind <> 'wait'),
                    coalesce(bool_or(dc.kind = 'wait'), false)
                INTO grps, waits
                FROM declarations dc WHERE dc.app = s_app
                    AND dc.kind IN ('handler', 'trigger', 'wait')
                    AND (dc.pattern = e_type[1] OR (strpos(dc.pattern, '*') > 0
                        AND cantata_type_matches(dc.pattern, e_type[1])));
                one_n := coalesce(cardinality(grps), 0);
                n_ins := 0;
                IF one_n = 1 THEN
                    INSERT INTO deliveries (app, grp, event_id, status, attempts, owner,
                        fence, updated_at)
                    VALUES (s_app, grps[1], e_id[1], 'pending',
                        CASE WHEN grps[1] = hold_g THEN 1 ELSE 0 END,
                        CASE WHEN grps[1] = hold_g THEN h_worker END,
                        CASE WHEN grps[1] = hold_g THEN 1 ELSE 0 END, s_now)
                    ON CONFLICT DO NOTHING RETURNING deliveries.owner INTO one_held;
                    IF FOUND THEN
                        n_ins := 1;
                        one_held := CASE WHEN one_held IS NULL THEN NULL ELSE grps[1] END;
                    END IF;
                ELSIF one_n > 1 THEN
                    WITH dl AS (
                        INSERT INTO deliveries (app, grp, event_id, status, attempts, owner,
                            fence, updated_at)
                        SELECT s_app, g.grp, e_id[1], 'pending',
                            CASE WHEN g.grp = hold_g THEN 1 ELSE 0 END,
                            CASE WHEN g.grp = hold_g THEN h_worker END,
                            CASE WHEN g.grp = hold_g THEN 1 ELSE 0 END, s_now
                        FROM unnest(grps) AS g(grp)
                        ON CONFLICT DO NOTHING RETURNING deliveries.grp, deliveries.owner)
                    SELECT count(*)::int4, max(dl.grp) FILTER (WHERE dl.owner IS NOT NULL)
                    INTO n_ins, one_held FROM dl;
                END IF;
                loud := n_ins > (CASE WHEN one_held IS NULL THEN 0 ELSE 1 END)
                    OR one_n <> n_ins OR waits;
            END IF;
            IF one_id IS NOT NULL THEN
                out_kind := 'e'; out_event_id := one_id; out_n := one_n;
                RETURN NEXT;
                IF one_held IS NOT NULL THEN
                    out_kind := 'h'; out_grp := one_held; out_n := NULL;  -- the same event
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
        PERFORM pg_notify(cantata_channel(), s_app || ':events');
    END IF;
END
$fn$;

-- cantata_settle_hop: cantata_settle_one for a settlement or append of at most one
-- event and at most one delivery of it to hold (a hop of a chain, app.publish's first
-- hop, a retry, a dead letter, a settlement done emitting nothing), with scalar
-- parameters (e_* the event's columns, NULL: no event; h_grp and h_event_id the
-- delivery to hold, NULL: none) instead of one-element arrays: no arrays to decode or
-- subscript (postgres_event_writes._write_lean calls it for such a batch; anything
-- else takes cantata_settle_one, which an older worker keeps calling). The same rows,
-- answers, records, notices and errors as cantata_settle_one for the same writes.
CREATE OR REPLACE FUNCTION cantata_settle_hop(
    s_app text, s_grp text, s_event_id text, s_outcome text, s_attempts int4,
    s_error text, s_retry_at float8, s_dead_letter_id text, s_now float8,
    s_time float8, s_time_json text, s_action text, s_data text, s_rest text,
    e_type text, e_data text, e_id text, e_source text, e_subject text,
    e_time text, e_correlation_id text, e_causation_id text,
    e_traceparent text, e_signature text,
    h_worker text, h_grp text, h_event_id text,
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
    grps text[];  -- the one event's groups (handlers and triggers), distinct
    waits bool;  -- a wait declaration matches it
    n_ins int4;  -- its deliveries inserted (not there before)
    row_id tid;  -- the settled delivery's row, locked
    quiet bool := false;  -- no other process needs to hear of this commit
BEGIN
    IF s_grp IS NOT NULL THEN
        -- the delivery, locked and changed unless it was settled for good (done, or dead
        -- for a retry or a second dead letter); its owner from before
        -- (read as it locks the row: the update takes the row it locked by its ctid)
        FOR x IN 1 .. 2 LOOP
            SELECT d.ctid, d.owner INTO row_id, own FROM deliveries d
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
                WHERE d.ctid = row_id;
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
        out_kind := 's';  -- the other columns NULL (as the OUT parameters start)
        RETURN NEXT;
    END IF;

    -- the event (of a settlement done, or appended) with a pending delivery per
    -- matching group unless it was stored before; its row with the number of groups
    -- it went to. Its delivery to h_grp, if it goes there, inserted held for h_worker
    -- (as cantata_settle_one): a delivery of another event, or one there before (a
    -- conflict), is not held.
    IF (s_grp IS NULL OR s_outcome = 'done') AND e_id IS NOT NULL THEN
        IF h_worker IS NOT NULL AND h_grp IS NOT NULL AND h_event_id = e_id THEN
            hold_g := h_grp;
        END IF;
        INSERT INTO events (app, type, data, id, source, subject, time,
            correlation_id, causation_id, traceparent, signature, stored_at)
        VALUES (s_app, e_type, e_data, e_id, e_source, e_subject,
            e_time, e_correlation_id, e_causation_id, e_traceparent,
            e_signature, s_now)
        ON CONFLICT (app, id) DO NOTHING;
        IF FOUND THEN
            one_id := e_id;
            SELECT array_agg(DISTINCT dc.name) FILTER (WHERE dc.kind <> 'wait'),
                coalesce(bool_or(dc.kind = 'wait'), false)
            INTO grps, waits
            FROM declarations dc WHERE dc.app = s_app
                AND dc.kind IN ('handler', 'trigger', 'wait')
                AND (dc.pattern = e_type OR (strpos(dc.pattern, '*') > 0
                    AND cantata_type_matches(dc.pattern, e_type)));
            one_n := coalesce(cardinality(grps), 0);
            n_ins := 0;
            IF one_n = 1 THEN
                INSERT INTO deliveries (app, grp, event_id, status, attempts, owner,
                    fence, updated_at)
                VALUES (s_app, grps[1], e_id, 'pending',
                    CASE WHEN grps[1] = hold_g THEN 1 ELSE 0 END,
                    CASE WHEN grps[1] = hold_g THEN h_worker END,
                    CASE WHEN grps[1] = hold_g THEN 1 ELSE 0 END, s_now)
                ON CONFLICT DO NOTHING RETURNING deliveries.owner INTO one_held;
                IF FOUND THEN
                    n_ins := 1;
                    one_held := CASE WHEN one_held IS NULL THEN NULL ELSE grps[1] END;
                END IF;
            ELSIF one_n > 1 THEN
                WITH dl AS (
                    INSERT INTO deliveries (app, grp, event_id, status, attempts, owner,
                        fence, updated_at)
                    SELECT s_app, g.grp, e_id, 'pending',
                        CASE WHEN g.grp = hold_g THEN 1 ELSE 0 END,
                        CASE WHEN g.grp = hold_g THEN h_worker END,
                        CASE WHEN g.grp = hold_g THEN 1 ELSE 0 END, s_now
                    FROM unnest(grps) AS g(grp)
                    ON CONFLICT DO NOTHING RETURNING deliveries.grp, deliveries.owner)
                SELECT count(*)::int4, max(dl.grp) FILTER (WHERE dl.owner IS NOT NULL)
                INTO n_ins, one_held FROM dl;
            END IF;
            loud := n_ins > (CASE WHEN one_held IS NULL THEN 0 ELSE 1 END)
                OR one_n <> n_ins OR waits;
        END IF;
        IF one_id IS NOT NULL THEN
            out_kind := 'e'; out_event_id := one_id; out_n := one_n;
            RETURN NEXT;
            IF one_held IS NOT NULL THEN
                out_kind := 'h'; out_grp := one_held; out_n := NULL;  -- the same event
                RETURN NEXT;
            END IF;
            -- an append's own process hears of it by the notice unless it held it
            quiet := NOT loud AND (s_grp IS NOT NULL OR hold_g IS NOT NULL);
        ELSE
            quiet := true;  -- stored before: nothing new
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
        PERFORM pg_notify(cantata_channel(), s_app || ':events');
    END IF;
END
$fn$;
