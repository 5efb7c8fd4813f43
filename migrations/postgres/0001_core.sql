-- Farm core: registry (lineage roots), jobs, items, tasks, leases, artifacts, workers.
-- Times are milliseconds since the Unix epoch (BIGINT) so both stores share one code path.

CREATE TABLE datasets (
    name            TEXT NOT NULL,
    version         TEXT NOT NULL,
    uri             TEXT NOT NULL,
    content_sha256  TEXT NOT NULL,
    license         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE models (
    id               TEXT PRIMARY KEY,
    family           TEXT NOT NULL,
    license          TEXT NOT NULL,
    parent_model_id  TEXT REFERENCES models(id),
    config_json      TEXT NOT NULL,
    created_at       BIGINT NOT NULL
);

CREATE TABLE model_weights (
    model_id  TEXT NOT NULL REFERENCES models(id),
    path      TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    size      BIGINT NOT NULL,
    PRIMARY KEY (model_id, path)
);

CREATE TABLE model_datasets (
    model_id         TEXT NOT NULL REFERENCES models(id),
    dataset_name     TEXT NOT NULL,
    dataset_version  TEXT NOT NULL,
    PRIMARY KEY (model_id, dataset_name, dataset_version),
    FOREIGN KEY (dataset_name, dataset_version) REFERENCES datasets(name, version)
);

CREATE TABLE tenants (
    name              TEXT PRIMARY KEY,
    max_running       BIGINT NOT NULL DEFAULT 0,
    last_dispatch_at  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL REFERENCES tenants(name),
    priority     BIGINT NOT NULL,
    state        TEXT NOT NULL,
    engine       TEXT NOT NULL,
    model_id     TEXT NOT NULL,
    items        BIGINT NOT NULL,
    spec_json    TEXT NOT NULL,
    labels_json  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    finished_at  BIGINT
);
CREATE INDEX jobs_running ON jobs (priority DESC, created_at) WHERE state = 'running';

CREATE TABLE items (
    job_id           TEXT NOT NULL REFERENCES jobs(id),
    item_index       BIGINT NOT NULL,
    prompt           TEXT NOT NULL,
    negative_prompt  TEXT NOT NULL,
    seed             BIGINT NOT NULL,
    width            BIGINT NOT NULL,
    height           BIGINT NOT NULL,
    steps            BIGINT NOT NULL,
    guidance         DOUBLE PRECISION NOT NULL,
    scheduler        TEXT NOT NULL,
    PRIMARY KEY (job_id, item_index)
);

-- state: waiting (on its base stage), ready, held (job paused), leased,
-- succeeded, failed, canceled.
CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    job_id            TEXT NOT NULL REFERENCES jobs(id),
    item_index        BIGINT NOT NULL,
    stage             TEXT NOT NULL,
    stage_rank        BIGINT NOT NULL,
    state             TEXT NOT NULL,
    tenant            TEXT NOT NULL,
    engine            TEXT NOT NULL,
    model_id          TEXT NOT NULL,
    pixels            BIGINT NOT NULL,
    upscale           BIGINT NOT NULL,
    batch_key         TEXT NOT NULL,
    depends_on        TEXT REFERENCES tasks(id),
    -- 1 when a later stage of the item waits on this task.
    has_next          BIGINT NOT NULL DEFAULT 0,
    parent_sha256     TEXT,
    attempts          BIGINT NOT NULL DEFAULT 0,
    max_attempts      BIGINT NOT NULL,
    worker_id         TEXT,
    lease_token       BIGINT NOT NULL DEFAULT 0,
    lease_ttl_ms      BIGINT NOT NULL,
    lease_expires_at  BIGINT,
    -- Fraction done the worker last reported for the running attempt.
    progress          DOUBLE PRECISION NOT NULL DEFAULT 0,
    started_at        BIGINT,
    finished_at       BIGINT,
    error             TEXT,
    FOREIGN KEY (job_id, item_index) REFERENCES items(job_id, item_index)
);
CREATE INDEX tasks_job_state ON tasks (job_id, state, stage_rank DESC, item_index);
CREATE INDEX tasks_depends_on ON tasks (depends_on) WHERE depends_on IS NOT NULL;
CREATE INDEX tasks_leased_expiry ON tasks (lease_expires_at) WHERE state = 'leased';
CREATE INDEX tasks_leased_worker ON tasks (worker_id) WHERE state = 'leased';
CREATE INDEX tasks_leased_tenant ON tasks (tenant) WHERE state = 'leased';

CREATE TABLE workers (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    hostname       TEXT NOT NULL,
    engines        TEXT NOT NULL,
    max_pixels     BIGINT NOT NULL,
    max_batch      BIGINT NOT NULL,
    registered_at  BIGINT NOT NULL,
    last_seen_at   BIGINT NOT NULL,
    loaded_model   TEXT NOT NULL DEFAULT ''
);

CREATE TABLE worker_models (
    worker_id       TEXT NOT NULL REFERENCES workers(id),
    engine          TEXT NOT NULL,
    model_id        TEXT NOT NULL REFERENCES models(id),
    weights_sha256  TEXT NOT NULL,
    PRIMARY KEY (worker_id, engine, model_id)
);
CREATE INDEX worker_models_model ON worker_models (engine, model_id);

-- One row per failed attempt: keeps a worker off a task it just failed.
CREATE TABLE task_failures (
    task_id    TEXT NOT NULL REFERENCES tasks(id),
    worker_id  TEXT NOT NULL,
    message    TEXT NOT NULL,
    failed_at  BIGINT NOT NULL
);
CREATE INDEX task_failures_task ON task_failures (task_id, worker_id);

-- Workers that keep failing a job's tasks stop getting them.
CREATE TABLE job_worker_failures (
    job_id     TEXT NOT NULL REFERENCES jobs(id),
    worker_id  TEXT NOT NULL,
    failures   BIGINT NOT NULL,
    PRIMARY KEY (job_id, worker_id)
);

-- At most one artifact per task (invariant 2): the primary key is the task.
CREATE TABLE artifacts (
    task_id        TEXT PRIMARY KEY REFERENCES tasks(id),
    job_id         TEXT NOT NULL REFERENCES jobs(id),
    item_index     BIGINT NOT NULL,
    stage          TEXT NOT NULL,
    model_id       TEXT NOT NULL,
    parent_sha256  TEXT,
    worker_id      TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    size           BIGINT NOT NULL,
    media_type     TEXT NOT NULL,
    width          BIGINT NOT NULL,
    height         BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE INDEX artifacts_job ON artifacts (job_id, item_index);
CREATE INDEX artifacts_sha ON artifacts (sha256);
