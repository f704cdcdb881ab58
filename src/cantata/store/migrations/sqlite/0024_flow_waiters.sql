-- Version 24 of the SQLite schema: the waiters of cluster-wide slots, first come first
-- served (docs/flow-control.md, "Step and handler limits").
-- A request for a slot of a limited step or handler group that cannot be granted
-- registers here (or keeps its row, asking again); a request is granted only if the
-- free slots outnumber the live waiters that registered before it, and a grant
-- removes its row. `seq` orders the waiters (a new row takes one more than the
-- largest present: rowid without AUTOINCREMENT); `since` is when it began waiting,
-- `asked_at` when it last asked. A row whose worker's lease lapsed, or that has not
-- asked for a while (its waiter gave up), blocks no one and is removed.
CREATE TABLE IF NOT EXISTS flow_waiters (
    seq INTEGER PRIMARY KEY,
    app TEXT NOT NULL,
    scope TEXT NOT NULL,
    holder TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    since REAL NOT NULL,
    asked_at REAL NOT NULL,
    UNIQUE (app, scope, holder)
);
