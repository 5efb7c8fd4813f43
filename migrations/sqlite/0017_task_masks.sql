-- Inpainting: the mask (an uploaded input's sha256) a generate task
-- repaints its init image (parent_sha256) through; NULL for none. Like the
-- init image, an input named here is not purged while the task is open.
ALTER TABLE tasks ADD COLUMN mask_sha256 TEXT;
