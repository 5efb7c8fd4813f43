-- An input's purge (retention or deletion) commits first — the row marked
-- purged, the blob marked for removal — and the blob is removed afterwards,
-- under the row's lock and only while the input is still purged (an upload
-- meanwhile restores it and clears the mark). A coordinator that dies
-- between the two leaves a blob to remove, which the retention sweep
-- removes later, never an input row without its blob. 1 or 0.
ALTER TABLE inputs ADD COLUMN blob_pending BIGINT NOT NULL DEFAULT 0;
CREATE INDEX inputs_blob_pending ON inputs (sha256) WHERE blob_pending = 1;

-- An input whose last uploader took it back while another tenant's job (one
-- an operator submitted) still started from it: purged by the sweep once
-- no unfinished task starts from it, whatever the retention. A new upload
-- clears it. 1 or 0.
ALTER TABLE inputs ADD COLUMN delete_requested BIGINT NOT NULL DEFAULT 0;
CREATE INDEX inputs_delete_requested ON inputs (sha256)
    WHERE delete_requested = 1 AND purged_at IS NULL;
