-- Version 30 of the SQLite schema: fewer pages written by a saga's commits, each one a
-- WAL frame of its COMMIT (docs/performance.md, "Round twenty-four (saga, SQLite)").
--
-- The audit chain's head moves into the `audit` b-tree, as the row keyed
-- (app || char(1), 0) right after the app's last record ((app, seq), seq >= 1): an
-- append's record and the head it moves then sit on one leaf, where the `audit_head`
-- table was one more b-tree, one more page, in every commit that appended a record.
-- The head row holds the head's seq in `data` (as text), its `prev_hash` and `hash`;
-- every read of an app's records (`WHERE app=?`) leaves it out by its key. It is what
-- the head was: moved by every append in the append's transaction, read by `verify`,
-- `cantata audit head` and the append that follows. The `audit_head` table is emptied
-- and refuses new rows: a Cantata older than schema 30 still open on the file then
-- fails its audited writes (with the message below) instead of moving a head nobody
-- reads. (Every statement here can run again on a schema 30 file: a no-op.)
--
-- `runs_live` (app, workflow) over the live runs is dropped: no statement reads it
-- (the claims and the reads of the live work name `runs_claimable`, the parked ones
-- `runs_parked` and `runs_waiting`, a worker's runs `runs_owner`, the oldest live run
-- `runs_status_newest`), and a run's creation and its end each wrote a page of it.
-- PostgreSQL dropped its own at schema 34.

DROP INDEX IF EXISTS runs_live;

INSERT OR IGNORE INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash)
SELECT app || char(1), 0, 0, 'cantata', 'audit.head', '', CAST(seq AS TEXT), prev_hash, hash
FROM audit_head;
DELETE FROM audit_head;
CREATE TRIGGER IF NOT EXISTS audit_head_moved BEFORE INSERT ON audit_head
BEGIN
    SELECT RAISE(ABORT, 'the audit chain''s head is a row of the audit table since SQLite schema 30: this process runs a Cantata older than its store; restart it with the Cantata release that upgraded the store');
END;

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
