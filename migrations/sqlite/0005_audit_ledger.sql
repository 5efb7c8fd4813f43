-- The audit ledger (DESIGN: lineage and audit): submissions, dispatches,
-- completions, failures, controls and registrations, appended in the same
-- transaction as what they record. Appending takes no lock beyond the row
-- itself; a sealer (any coordinator replica, one at a time through the
-- head row's lock) later gives unsealed entries their place in the chain
-- (seq) and their hashes, so the lease hot path never waits on the chain.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    job_id      TEXT NOT NULL DEFAULT '',
    subject     TEXT NOT NULL,
    actor       TEXT NOT NULL DEFAULT '',
    body        TEXT NOT NULL,
    seq         BIGINT UNIQUE,
    prev_hash   TEXT,
    hash        TEXT
);
CREATE INDEX audit_events_unsealed ON audit_events (id) WHERE seq IS NULL;
CREATE INDEX audit_events_job ON audit_events (job_id, seq);

-- The chain's head: the last sealed entry and its hash.
CREATE TABLE audit_head (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
