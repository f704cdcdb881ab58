-- Version 32 of the SQLite schema: the audit chain's head written as a row of `audit`
-- (docs/performance.md, "Round twenty-six (audit head)").
--
-- Each app's head is also kept as the row keyed (app || char(1), 0) of `audit`, right
-- after the app's last record ((app, seq), seq >= 1), so that an append's record and
-- the head it moves share a leaf: its seq as text in `data`, its `prev_hash` and
-- `hash`; every read of an app's records (`WHERE app=?`) leaves it out by its key.
-- From this release on every audited commit moves that row; it moves the `audit_head`
-- row too until no process of an older Cantata can still append to the app
-- (`StoreBase.lean_apps`, the engine's gate), and readers take whichever of the two is
-- further along (`store/sqlite_ops.py`, `audit_head`).
--
-- `audit_head` is kept as it is, rows and all: a process of an older release still
-- open on the file reads and moves it alone (round twenty-four's try emptied it and
-- made it refuse rows, and such a process ran its steps' bodies twice). The version
-- raised here refuses an older Cantata at open, and a worker of one already running
-- drains within SCHEMA_CHECK_EVERY heartbeats (docs/deploy.md, "Upgrading Cantata").
--
-- Every statement here can run again on a schema 32 file: a no-op.

-- Each chain's head as its head row, where none is there yet (a head row already there
-- is no further back than what its writer read: readers take the further one).
INSERT OR IGNORE INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
SELECT app || char(1), 0, 0, 'cantata', 'audit.head', '', CAST(seq AS TEXT), prev_hash, hash
FROM audit_head;

-- Records stay append-only; a head row (seq 0) is moved, and may be deleted, as the
-- `audit_head` row could be.
DROP TRIGGER IF EXISTS audit_no_update;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
WHEN OLD.seq <> 0 OR NEW.seq <> 0
BEGIN
    SELECT RAISE(ABORT, 'the Cantata audit log is append-only');
END;
DROP TRIGGER IF EXISTS audit_no_delete;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN OLD.seq <> 0
BEGIN
    SELECT RAISE(ABORT, 'the Cantata audit log is append-only');
END;
