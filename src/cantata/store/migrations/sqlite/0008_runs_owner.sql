-- A worker checks which live runs it owns (docs/leases.md): index runs by owner.
CREATE INDEX IF NOT EXISTS runs_owner ON runs (app, owner) WHERE owner IS NOT NULL;
