-- Models that refine images and cannot draw from noise (SDXL's refiner),
-- 1 or 0: a job that would render from noise with one is refused at
-- submission. Set by a registration from the model's folder, and by any
-- worker that declares the model so.
ALTER TABLE models ADD COLUMN refines_only BIGINT NOT NULL DEFAULT 0;
