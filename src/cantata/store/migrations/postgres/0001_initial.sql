-- Cantata store, PostgreSQL schema version 1.
-- Applied by PostgresStore inside the store's own schema (search_path), in one
-- transaction holding a pg_advisory_xact_lock, then recorded in schema_version.
-- JSON values are kept as text: exactly the bytes the codec wrote come back.

CREATE TABLE runs (
    app text NOT NULL,
    run_id text NOT NULL,
    workflow text NOT NULL,
    status text NOT NULL,
    args text NOT NULL,
    result text,
    error text,
    idempotency_key text,
    args_hash text,
    correlation_id text NOT NULL,
    causation_id text,
    parent_run_id text,
    service text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    deadline_at double precision,
    cancel_requested boolean NOT NULL DEFAULT false,
    owner text,
    fence bigint NOT NULL DEFAULT 0,
    flagged boolean NOT NULL DEFAULT false,
    PRIMARY KEY (app, run_id)
);
CREATE UNIQUE INDEX runs_idempotency ON runs (app, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_live ON runs (app, workflow, created_at)
    WHERE status IN ('pending', 'running', 'compensating');
CREATE INDEX runs_correlation ON runs (app, correlation_id);
CREATE INDEX runs_created ON runs (app, created_at);
CREATE INDEX runs_parent ON runs (app, parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_owner ON runs (app, owner) WHERE owner IS NOT NULL;

CREATE TABLE history (
    app text NOT NULL,
    run_id text NOT NULL,
    key text NOT NULL,
    seq integer NOT NULL,
    kind text NOT NULL,
    name text NOT NULL,
    status text NOT NULL,
    result text,
    error text,
    error_type text,
    attempts integer NOT NULL DEFAULT 0,
    started_at double precision,
    ended_at double precision,
    wake_at double precision,
    detail text,
    PRIMARY KEY (app, run_id, key)
);

CREATE TABLE attempts (
    app text NOT NULL,
    run_id text NOT NULL,
    key text NOT NULL,
    attempt integer NOT NULL,
    started_at double precision NOT NULL,
    ended_at double precision,
    error_type text,
    error text,
    PRIMARY KEY (app, run_id, key, attempt)
);

CREATE TABLE events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app text NOT NULL,
    id text NOT NULL,
    type text NOT NULL,
    source text NOT NULL,
    subject text,
    time text NOT NULL,
    data text,
    correlation_id text,
    causation_id text,
    traceparent text,
    signature text,
    stored_at double precision NOT NULL,
    published boolean NOT NULL DEFAULT false,
    UNIQUE (app, id)
);
CREATE INDEX events_type ON events (app, type, stored_at);
CREATE INDEX events_correlation ON events (app, correlation_id);
CREATE INDEX events_outbox ON events (app, seq) WHERE NOT published;

CREATE TABLE deliveries (
    app text NOT NULL,
    grp text NOT NULL,
    event_id text NOT NULL,
    status text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_at double precision NOT NULL DEFAULT 0,
    owner text,
    fence bigint NOT NULL DEFAULT 0,
    error text,
    updated_at double precision NOT NULL,
    PRIMARY KEY (app, grp, event_id)
);
CREATE INDEX deliveries_due ON deliveries (app, grp, next_at) WHERE status = 'pending';
CREATE INDEX deliveries_event ON deliveries (app, event_id);
CREATE INDEX deliveries_owner ON deliveries (app, owner) WHERE owner IS NOT NULL;

CREATE TABLE dead_letters (
    app text NOT NULL,
    id text NOT NULL,
    grp text NOT NULL,
    event_id text NOT NULL,
    error text NOT NULL,
    attempts integer NOT NULL,
    failed_at double precision NOT NULL,
    PRIMARY KEY (app, id)
);
CREATE INDEX dead_letters_event ON dead_letters (app, event_id);
CREATE INDEX dead_letters_failed ON dead_letters (app, failed_at);

CREATE TABLE declarations (
    app text NOT NULL,
    kind text NOT NULL,
    name text NOT NULL,
    pattern text NOT NULL,
    service text,
    detail text,
    PRIMARY KEY (app, kind, name, pattern)
);

CREATE TABLE workers (
    app text NOT NULL,
    worker_id text NOT NULL,
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    info text,
    PRIMARY KEY (app, worker_id)
);
