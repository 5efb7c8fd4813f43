-- The lineage of an inpainted image names its mask (an uploaded input)
-- beside the init image it started from (parent_sha256); NULL for none.
ALTER TABLE artifacts ADD COLUMN mask_sha256 TEXT;
