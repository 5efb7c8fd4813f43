-- The open tasks that inpaint through a mask, for the purge's check (as
-- tasks_open_inputs for init images).
CREATE INDEX IF NOT EXISTS tasks_open_masks ON tasks (mask_sha256)
    WHERE stage_rank = 0 AND mask_sha256 IS NOT NULL
      AND state IN ('waiting', 'ready', 'held', 'leased');
