-- Signed checkpoints of the audit ledger: as it seals, a coordinator with a
-- signing identity signs "entry seq hashed to hash at at" (a detached COSE
-- signature with the deployment's certificate, the one its images carry),
-- at most once per ledger_checkpoint_interval_ms. An auditor holds the
-- chain to the latest one: rewriting the chain after it needs the key.
CREATE TABLE audit_checkpoints (
    seq        BIGINT PRIMARY KEY,
    hash       TEXT NOT NULL,
    at         BIGINT NOT NULL,
    signature  BLOB NOT NULL
);
