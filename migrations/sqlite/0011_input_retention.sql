-- Input images (img2img) are not kept forever: an input unused for
-- `input_retention_ms` is purged — its blob deleted (unless an artifact
-- shares it), its row kept with `purged_at` so lineage still names it.
-- `last_used_at` is its last upload, or the last submission or retry of a
-- job that starts from it; updating it locks the row, which is what keeps a
-- submission and a purge of the same input from both going through. An
-- input an unfinished task starts from is never purged.
ALTER TABLE inputs ADD COLUMN last_used_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE inputs ADD COLUMN purged_at BIGINT;
-- Each input's last use so far: its upload, or the newest job starting
-- from it (one grouped pass over the tasks, not one scan per input).
UPDATE inputs SET last_used_at = created_at;
UPDATE inputs SET last_used_at = MAX(inputs.created_at, used.newest_job)
FROM (
    SELECT t.parent_sha256 AS sha256, MAX(j.created_at) AS newest_job
    FROM tasks t JOIN jobs j ON j.id = t.job_id
    WHERE t.stage_rank = 0 AND t.parent_sha256 IS NOT NULL
    GROUP BY t.parent_sha256
) AS used
WHERE used.sha256 = inputs.sha256;
CREATE INDEX inputs_unpurged ON inputs (last_used_at) WHERE purged_at IS NULL;
-- The open tasks that start from an input, for the purge's check.
CREATE INDEX tasks_open_inputs ON tasks (parent_sha256)
    WHERE stage_rank = 0 AND parent_sha256 IS NOT NULL
      AND state IN ('waiting', 'ready', 'held', 'leased');
