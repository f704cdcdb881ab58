-- Cantata store, PostgreSQL schema version 3: the console's API tokens and runs-list indexes.

-- API tokens of `cantata serve` (docs/console.md). Store-wide: a token opens every app
-- of the store. Only the SHA-256 of a token is kept; a revoked token keeps its row.
CREATE TABLE tokens (
    name text PRIMARY KEY,
    role text NOT NULL,
    token_hash text NOT NULL,
    created_at double precision NOT NULL,
    revoked_at double precision
);
CREATE UNIQUE INDEX tokens_hash ON tokens (token_hash);

-- Pages of runs, newest first, by keyset (created_at, run_id): one index per filter a
-- page is commonly cut by. runs_newest supersedes runs_created (its prefix). run_id is
-- ordered by bytes (COLLATE "C"), as the queries order it.
DROP INDEX IF EXISTS runs_created;
CREATE INDEX runs_newest ON runs (app, created_at, run_id COLLATE "C");
CREATE INDEX runs_workflow_newest ON runs (app, workflow, created_at, run_id COLLATE "C");
CREATE INDEX runs_status_newest ON runs (app, status, created_at, run_id COLLATE "C");
