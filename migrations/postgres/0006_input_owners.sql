-- Who uploaded each input image. With authentication on, a tenant's job may
-- start only from inputs that tenant uploaded: an input's sha256 is named in
-- the credentials of every output made from it, so knowing the hash must not
-- be enough to render from (or download) someone else's picture.
CREATE TABLE input_owners (
    sha256  TEXT NOT NULL REFERENCES inputs(sha256),
    tenant  TEXT NOT NULL,
    PRIMARY KEY (sha256, tenant)
);
