-- Version 35 of the PostgreSQL schema: the deliveries keyed (app, event_id, grp), as
-- SQLite's since its migration 0027 (docs/performance.md, "Round twenty-two (chain)").
-- The key serves the lookups by event that deliveries_event (app, event_id) served, so
-- that index goes: a hop's settlement wrote an entry to it twice (the delivery it
-- holds for the next group, inserted; the one it settles, whose update is never HOT,
-- its status being in deliveries_due's predicate). Event ids grow with time (UUID
-- version 7), so both key entries of a hop land at the key's right edge, not at the
-- ends of two groups' ranges. The group's reads (its claims, its pending deliveries,
-- its counts, a retirement) go by deliveries_due and deliveries_owner as before; a
-- group's deliveries of some events by the key. The rows are not rewritten; the key's
-- index is built again, under the table's lock, as for any migration of a store in
-- use (docs/deploy.md, "Upgrading Cantata").
ALTER TABLE deliveries DROP CONSTRAINT deliveries_pkey,
    ADD CONSTRAINT deliveries_pkey PRIMARY KEY (app, event_id, grp);
DROP INDEX IF EXISTS deliveries_event;
