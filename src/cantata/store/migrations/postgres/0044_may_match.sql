-- Version 44 of the PostgreSQL schema: a wait's match compared in the server
-- (find_events(match=...), the look of ctx.wait_for_event; docs/guarantees.md, "Parked
-- runs"). Before, every event of the awaited type since the run began came back to the
-- worker to be matched in Python: 200 runs resumed behind 10,000 events of their type
-- read them all, again at each of the runs' looks.
--
-- cantata_may_match(data, paths, wants) is false only for an event whose data cannot
-- match, as Python compares (cantata.model.event.match_data); the caller checks every
-- event it returns. ``paths`` holds each compared key's parts joined by U+001F (keys
-- holding it are not sent), ``wants`` the values, a JSON array of strings and integers
-- (integers only below 2**53 in size, where a float equal to one is that integer).
--
-- * Data that is not a JSON object (NULL, a list, a string, bytes): no match.
-- * Data whose text is not jsonb (a string holding \u0000, which jsonb refuses; a row
--   not written by Cantata): left to the caller, never an error for the whole query.
-- * A string wanted: the value there must be that string.
-- * An integer wanted: a number there written as an integer must equal it; one written
--   otherwise (1.0, 1e0: Python reads a float, whose equality to an integer is its
--   own) is left to the caller; a bool there must be true for 1, false for 0 (Python's
--   True == 1); any other value: no match.
CREATE OR REPLACE FUNCTION cantata_may_match(data text, paths text[], wants jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    doc jsonb;
    got jsonb;
    want jsonb;
BEGIN
    IF data IS NULL OR left(ltrim(data, E' \t\n\r'), 1) <> '{' THEN
        RETURN false;
    END IF;
    BEGIN
        doc := data::jsonb;
    EXCEPTION WHEN others THEN
        RETURN true;
    END;
    FOR i IN 1 .. coalesce(array_length(paths, 1), 0) LOOP
        got := doc #> string_to_array(paths[i], E'\x1f');
        want := wants -> (i - 1);
        IF got IS NULL THEN
            RETURN false;
        ELSIF jsonb_typeof(want) = 'string' THEN
            IF got <> want THEN
                RETURN false;
            END IF;
        ELSIF jsonb_typeof(got) = 'number' THEN
            IF got <> want AND (got #>> '{}') ~ '^-?[0-9]+$' THEN
                RETURN false;
            END IF;
        ELSIF jsonb_typeof(got) = 'boolean' THEN
            IF want NOT IN ('0', '1') OR (got = 'true') <> (want = '1') THEN
                RETURN false;
            END IF;
        ELSE
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END $$;
