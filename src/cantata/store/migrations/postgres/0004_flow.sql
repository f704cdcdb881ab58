-- Cantata store, PostgreSQL schema version 4: flow control (docs/flow-control.md).

-- Queues as declared by the apps' processes (the limits the store enforces).
CREATE TABLE queues (
    app text NOT NULL,
    name text NOT NULL,
    concurrency bigint,
    per_worker bigint,
    rate_limit bigint,
    rate_per double precision,
    priorities boolean NOT NULL DEFAULT false,
    declared_by text,
    PRIMARY KEY (app, name)
);

-- One row per run started in a queue: waiting until began_at is set, in
-- progress until done (its run ended); began_at is also the rate log. A row whose
-- run ended without beginning (cancelled) gets began_at 0 and done when a claim meets it.
CREATE TABLE queue_runs (
    app text NOT NULL,
    run_id text NOT NULL,
    queue text NOT NULL,
    workflow text NOT NULL,
    partition_key text NOT NULL DEFAULT '',
    priority bigint NOT NULL DEFAULT 0,
    seq bigint NOT NULL,
    began_at double precision,
    done boolean NOT NULL DEFAULT false,
    PRIMARY KEY (app, run_id)
);
CREATE INDEX queue_runs_waiting ON queue_runs (app, queue, priority, seq)
    WHERE began_at IS NULL;
CREATE INDEX queue_runs_active ON queue_runs (app, queue, partition_key)
    WHERE began_at IS NOT NULL AND NOT done;
CREATE INDEX queue_runs_began ON queue_runs (app, queue, began_at)
    WHERE began_at IS NOT NULL;

-- Cluster-wide slots of limited steps and handler groups, held by a worker
-- (lost with its lease), and the begin times that rate limits count.
CREATE TABLE flow_slots (
    app text NOT NULL,
    scope text NOT NULL,
    holder text NOT NULL,
    worker_id text NOT NULL,
    acquired_at double precision NOT NULL,
    PRIMARY KEY (app, scope, holder)
);
CREATE TABLE flow_begins (
    app text NOT NULL,
    scope text NOT NULL,
    at double precision NOT NULL,
    holder text NOT NULL
);
CREATE INDEX flow_begins_at ON flow_begins (app, scope, at);

-- Durable schedules and the state that makes each tick start exactly one run.
CREATE TABLE schedules (
    app text NOT NULL,
    name text NOT NULL,
    spec text NOT NULL,
    source text NOT NULL,
    paused boolean NOT NULL DEFAULT false,
    state text NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (app, name)
);
