-- Version 31 of the PostgreSQL schema: the waiters of cluster-wide slots, first come
-- first served (docs/flow-control.md, "Step and handler limits").
-- A request for a slot of a limited step or handler group that cannot be granted
-- registers here (or keeps its row, asking again); a request is granted only if the
-- free slots outnumber the live waiters that registered before it, and a grant
-- removes its row. `seq` orders the waiters (rows are added under the scope's
-- advisory lock, so a later row has a larger number); `since` is when it began
-- waiting, `asked_at` when it last asked. A row whose worker's lease lapsed, or that
-- has not asked for a while (its waiter gave up), blocks no one and is removed.
CREATE TABLE IF NOT EXISTS flow_waiters (
    app text NOT NULL,
    scope text NOT NULL,
    holder text NOT NULL,
    worker_id text NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    since double precision NOT NULL,
    asked_at double precision NOT NULL,
    PRIMARY KEY (app, scope, holder)
);
