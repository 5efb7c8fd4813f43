-- Per-job super-resolution method of upscale tasks ('' = the worker's default).
ALTER TABLE tasks ADD COLUMN upscale_method TEXT NOT NULL DEFAULT '';
