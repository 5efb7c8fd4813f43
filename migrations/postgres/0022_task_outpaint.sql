-- Outpainting: the new canvas an init image is extended by, in pixels, as
-- 'left,top,right,bottom'; NULL for none. The worker makes its mask.
ALTER TABLE tasks ADD COLUMN outpaint TEXT;
