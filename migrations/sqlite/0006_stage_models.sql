-- A job's stages may name different models (a refine stage runs on its
-- refiner): workers find the ready tasks of the models they serve through
-- this index, not by scanning a job's other stages.
CREATE INDEX tasks_ready_model ON tasks (job_id, model_id) WHERE state = 'ready';
