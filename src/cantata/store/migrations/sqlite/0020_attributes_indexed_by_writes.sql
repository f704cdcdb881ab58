-- Version 20 of the SQLite schema: a run's attributes (run_attributes, from the history
-- entries of ctx.set_attributes) are indexed by the statements that write such an
-- entry (the checkpoint's, a fork's: store/sqlite_ops.py, index_attributes), not by
-- triggers on history. A trigger with a WHEN clause still runs a sub-program for every
-- history row inserted or updated, whatever its kind: six per saga, for nothing but
-- the few rows of kind 'attrs' (issue 19; docs/performance.md). The index holds the
-- same rows as before.
DROP TRIGGER IF EXISTS history_attrs_insert;
DROP TRIGGER IF EXISTS history_attrs_update;
