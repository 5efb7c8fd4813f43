-- Inpainting: how the job's mask is used by each of its masked generate
-- tasks: blurred by mask_blur pixels (0: not), and, where mask_crop is set,
-- only a crop around it grown by that many pixels rendered at full size and
-- pasted back (NULL: the whole image).
ALTER TABLE tasks ADD COLUMN mask_blur BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN mask_crop BIGINT;
