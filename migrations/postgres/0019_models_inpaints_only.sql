-- Models that only inpaint (a unet that also takes a mask and the masked
-- image), 1 or 0: a job that would render with one without a mask is
-- refused at submission. Set by a registration from the model's folder, and
-- by any worker that declares the model so.
ALTER TABLE models ADD COLUMN inpaints_only BIGINT NOT NULL DEFAULT 0;
