-- img2img: input images users upload (stored in the blob store under their
-- sha256), and each generate task's strength when it starts from one. Such a
-- task names its init image in parent_sha256, as an upscale names its base.
CREATE TABLE inputs (
    sha256      TEXT PRIMARY KEY,
    media_type  TEXT NOT NULL,
    width       BIGINT NOT NULL,
    height      BIGINT NOT NULL,
    size        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
ALTER TABLE tasks ADD COLUMN strength DOUBLE PRECISION NOT NULL DEFAULT 0;
