-- Cantata store, SQLite schema version 3: the console's API tokens and runs-list indexes.

-- API tokens of `cantata serve` (docs/console.md). Store-wide: a token opens every app
-- of the store. Only the SHA-256 of a token is kept; a revoked token keeps its row.
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_hash ON tokens (token_hash);

-- Pages of runs, newest first, by keyset (created_at, run_id): one index per filter a
-- page is commonly cut by. runs_newest supersedes runs_created (its prefix).
DROP INDEX IF EXISTS runs_created;
CREATE INDEX IF NOT EXISTS runs_newest ON runs (app, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_workflow_newest ON runs (app, workflow, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_status_newest ON runs (app, status, created_at, run_id);
