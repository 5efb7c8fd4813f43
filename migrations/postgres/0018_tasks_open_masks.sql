-- no-transaction
-- The open tasks that inpaint through a mask, for the purge's check (as
-- tasks_open_inputs for init images). Built CONCURRENTLY (outside a
-- transaction: the directive above), as 0015.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_open_masks ON tasks (mask_sha256)
    WHERE stage_rank = 0 AND mask_sha256 IS NOT NULL
      AND state IN ('waiting', 'ready', 'held', 'leased');
