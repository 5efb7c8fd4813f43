-- The audit ledger's Merkle tree (RFC 6962's shape; provenance/src/merkle.rs):
-- the sealed entries are its leaves, in chain order. Each perfect subtree is
-- kept once completed (level 0: the leaves; leaf idx is entry idx + 1), so
-- an inclusion or consistency proof reads about log2(n) rows. Written by
-- the sealer under the audit_head row lock, never changed after.
CREATE TABLE audit_tree (
    level  BIGINT NOT NULL,
    idx    BIGINT NOT NULL,
    hash   TEXT NOT NULL,
    PRIMARY KEY (level, idx)
);

-- How many sealed entries the tree holds: it catches up with a chain sealed
-- before it existed a batch at a time, then grows as entries are sealed.
ALTER TABLE audit_head ADD COLUMN tree_size BIGINT NOT NULL DEFAULT 0;

-- A checkpoint's Merkle root over entries 1 to seq, signed with it; NULL in
-- checkpoints signed before the tree existed.
ALTER TABLE audit_checkpoints ADD COLUMN root TEXT;
