-- Ready tasks by job and model: a lease looks, for each running job, for a
-- ready task of a model the worker serves. Without it, a worker of a model
-- with little work read past every ready task of every job of the others
-- (tasks_job_state orders a job's tasks by state, not model) on each lease.
CREATE INDEX IF NOT EXISTS tasks_ready_model ON tasks (job_id, model_id, pixels) WHERE state = 'ready';
