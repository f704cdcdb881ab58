-- Version 20 of the PostgreSQL schema: the lean path of cantata_settle (0014, 0015) for
-- the latency case, as 0017 is cantata_write_runs': a batch of ONE settlement of a
-- delivery (a hop of a choreographed chain), or of one append of events with or
-- without holds (app.publish, the first hop: EventStore.append_held). The same rows,
-- record, notice and result rows as the big function gives that batch, with scalar
-- parameters for the settlement and its record (its events and holds, usually one,
-- as arrays): no loops over arrays of settlements, no ARRAY(SELECT ...) or DISTINCT
-- over the batch's apps, no SET clause. Each statement finds its row by its key.
--
-- s_grp NULL: an append of events to s_app (no settlement, no record). Otherwise the
-- settlement of delivery (s_app, s_grp, s_event_id) with outcome s_outcome ('done',
-- 'retry' or 'dead'), its record as cantata_settle's s_time .. s_rest (s_rest NULL: no
-- record), its events (e_*: only for 'done', stored when it settles) and the deliveries
-- of those to hold for h_worker.
-- Rows: 's' once if the settlement applied (none: the delivery was done already, and
-- nothing was written); 'e' per event inserted, out_n the number of groups it went to;
-- 'h' per delivery held (only those this transaction created: see 0015).
CREATE FUNCTION cantata_settle_one(
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
    this_xact xid;
BEGIN
    IF s_grp IS NOT NULL THEN
        -- the delivery, locked and changed unless it is done; its owner from before
        FOR x IN 1 .. 2 LOOP
            WITH old AS MATERIALIZED (SELECT d.owner FROM deliveries d
                WHERE d.app = s_app AND d.grp = s_grp AND d.event_id = s_event_id
                AND d.status <> 'done' FOR UPDATE)
            UPDATE deliveries d SET status = CASE s_outcome WHEN 'done' THEN 'done'
                    WHEN 'retry' THEN 'pending' ELSE 'dead' END,
                attempts = s_attempts, owner = NULL,
                error = CASE WHEN s_outcome = 'done' THEN NULL ELSE s_error END,
                next_at = CASE WHEN s_outcome = 'retry' THEN s_retry_at ELSE d.next_at END,
                updated_at = s_now
            FROM old WHERE d.app = s_app AND d.grp = s_grp AND d.event_id = s_event_id
            RETURNING old.owner INTO own;
            settled := FOUND;
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
    -- groups it went to (as cantata_settle)
    IF (s_grp IS NULL OR s_outcome = 'done') AND cardinality(e_id) > 0 THEN
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
                -- an exact pattern without the call of a function (not inlined)
                AND (dc.pattern = ins.type OR (strpos(dc.pattern, '*') > 0
                    AND cantata_type_matches(dc.pattern, ins.type)))),
        dl AS (
            INSERT INTO deliveries (app, grp, event_id, status, updated_at)
            SELECT s_app, fan.grp, fan.event_id, 'pending', s_now FROM fan
            ON CONFLICT DO NOTHING)
        SELECT 'e'::text, NULL::text, ins.id,
            (SELECT count(*) FROM fan WHERE fan.event_id = ins.id)::int4
        FROM ins;

        -- held by the worker that hands them off: a delivery this transaction created
        -- (its row's xmin is this transaction, see 0015), pending, nobody's, no
        -- attempt yet (Settlement.hold)
        IF h_worker IS NOT NULL THEN
            this_xact := (txid_current() % 4294967296)::text::xid;
            FOR x IN 1 .. coalesce(cardinality(h_grp), 0) LOOP
                RETURN QUERY
                    UPDATE deliveries d SET owner = h_worker, fence = d.fence + 1,
                        attempts = 1, updated_at = s_now
                    WHERE d.app = s_app AND d.grp = h_grp[x]
                        AND d.event_id = h_event_id[x] AND d.status = 'pending'
                        AND d.owner IS NULL AND d.attempts = 0 AND d.xmin = this_xact
                    RETURNING 'h'::text, d.grp, d.event_id, NULL::int4;
            END LOOP;
        END IF;
    ELSIF s_grp IS NULL THEN
        RETURN;  -- an append of no events: nothing written, no notice
    END IF;

    -- the record: the head moved by an upsert (cantata_settle's lone record)
    IF tail IS NOT NULL THEN
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

    PERFORM pg_notify('cantata_changes', s_app || ':events');
END
$fn$;
