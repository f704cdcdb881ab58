-- A worker checks which live runs it owns (docs/leases.md). The index exists since
-- 0001 on PostgreSQL; kept here so both dialects reach the same schema version.
CREATE INDEX IF NOT EXISTS runs_owner ON runs (app, owner) WHERE owner IS NOT NULL;
