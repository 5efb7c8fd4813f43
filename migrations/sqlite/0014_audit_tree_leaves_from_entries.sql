-- The Merkle tree's leaves are read from the sealed entries themselves
-- (leaf idx is the hash of entry idx + 1, RFC 6962's leaf prefix added on
-- reading), so the tree stores only the nodes above them: half the rows a
-- seal writes. The level-0 rows stored until now go.
DELETE FROM audit_tree WHERE level = 0;
