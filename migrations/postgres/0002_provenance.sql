-- Provenance: every artifact carries its watermark id and the C2PA manifest
-- store it was signed with (the manifest repository), recorded in the same
-- transaction as the artifact itself.
ALTER TABLE artifacts ADD COLUMN watermark_id TEXT;
ALTER TABLE artifacts ADD COLUMN manifest BYTEA;
ALTER TABLE artifacts ADD COLUMN manifest_label TEXT;
CREATE UNIQUE INDEX artifacts_watermark ON artifacts (watermark_id);
CREATE INDEX artifacts_manifest_label ON artifacts (manifest_label);
