-- Version 27 of the PostgreSQL schema: notifications on a channel of the schema's own.
-- NOTIFY's channels are one name space per database, so while every store notified
-- 'cantata_changes', each listening process woke for the commits of every other store
-- in the database (another environment's schema, the tests beside it) and polled for
-- nothing. Now the channel is 'cantata_changes.<schema>' ('cantata_changes.' and the
-- schema's md5 where that would pass PostgreSQL's 63 bytes), named by cantata_channel():
-- the functions below, the Python side's pg_notify and its LISTEN all ask it, so the
-- name is written in one place. Every function of the schema that notified the old
-- channel is restated as it is, with cantata_channel() for the literal; a function
-- written later calls pg_notify(cantata_channel(), ...) itself.

DO $do$
DECLARE
    channel text := 'cantata_changes.' || current_schema();
    f record;
BEGIN
    IF octet_length(channel) > 63 THEN
        channel := 'cantata_changes.' || md5(current_schema());
    END IF;
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION cantata_channel() RETURNS text '
        'LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
        format('SELECT %L::text', channel)
    );
    FOR f IN
        SELECT p.oid FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND strpos(p.prosrc, 'pg_notify(''cantata_changes''') > 0
    LOOP
        EXECUTE replace(pg_get_functiondef(f.oid), 'pg_notify(''cantata_changes''',
                        'pg_notify(cantata_channel()');
    END LOOP;
END
$do$;
