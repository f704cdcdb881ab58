-- Version 39 of the PostgreSQL schema: no table changes. The version is raised so that
-- no process of an older Cantata opens the store any more (StoreUpgraded), and one
-- running on it reads the newer version within one of its leases and drains
-- (docs/deploy.md, "Upgrading Cantata"): from this release on, a worker may leave out
-- the `attempts` row of a step's first attempt in progress or succeeded, which the
-- step's `history` row says alone (its start, its end, no error, one attempt), once
-- the gate of its app is open (src/cantata/engine/gate.py; docs/leases.md, "Where an
-- attempt is recorded").
-- Every reader of this release and the one before reads such an attempt from `history`
-- (store/common.py, with_first_attempts); an older worker would not count it, and run
-- a step killed in its first attempt once more than max_attempts allows.
COMMENT ON TABLE attempts IS 'A step''s attempts. The first attempt of a step in '
    'progress or succeeded may have no row: its history row says it (schema 39).';
