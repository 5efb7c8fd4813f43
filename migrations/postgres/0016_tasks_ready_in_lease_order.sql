-- no-transaction
-- Ready tasks by job, model and stage, in the order a lease takes them. A
-- lease picks a job's next batch among the models the worker serves; with
-- only tasks_job_state (a job's ready tasks by stage, whatever their model)
-- a worker of the job's base model read past every ready task of its
-- refiner (a later stage, taken first) on each lease: an SDXL base pool
-- slowed down as its refiner pool fell behind. With this index each
-- (model, stage) a worker serves is one probe.
-- Built CONCURRENTLY (outside a transaction: the directive above), as 0015.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_ready_lease_order ON tasks (job_id, model_id, stage_rank, item_index) WHERE state = 'ready';
