-- Version 21 of the PostgreSQL schema: room on each page of runs, history and
-- attempts for HOT updates (issue 19, the saga's batch path).
--
-- A checkpoint updates its run (updated_at; most of the time nothing indexed) and
-- upserts its history entry and attempt. With pages filled to 100 % a row's new
-- version rarely fits on its page, so the update is not HOT: it adds an entry to
-- every index of its table, thirteen for runs (a saga throughput run: 317 of 5,695 run
-- updates HOT). Those index entries were most of the server's time in
-- cantata_write_runs' checkpoint statement, which updates every row of a page in one
-- batch. Pages left half empty take their rows' next versions (pruning reclaims the
-- dead ones): only an update that changes an indexed column (a status, an owner)
-- still touches the indexes (tests/store/test_postgres.py: 100 % of such updates
-- HOT for runs, ~95 % for history and attempts; at 70, ~45 % for those two). The
-- rows, their values and every query are unchanged; the tables take up to twice the
-- pages. Pages already full keep their rows until rewritten (VACUUM FULL, CLUSTER);
-- new pages are filled to the new factor.
ALTER TABLE runs SET (fillfactor = 50);
ALTER TABLE history SET (fillfactor = 50);
ALTER TABLE attempts SET (fillfactor = 50);
