//! The audit ledger: every submission, dispatch, completion, failure,
//! control and registration, appended in the transaction that does it, then
//! sealed into a hash chain an auditor can check (`hallmark audit verify`).
//!
//! Appending is a plain insert, so concurrent leases and completions never
//! queue on the chain. Sealing gives unsealed entries, in insertion order,
//! the next chain positions and their hashes
//! ([`hallmark_provenance::ledger::entry_hash`]); one sealer at a time holds
//! the head row, and a replica that finds it held skips its turn.
//!
//! The sealer also grows the ledger's Merkle tree
//! ([`hallmark_provenance::merkle`]) in the same transaction: it stores each
//! perfect subtree above the leaves that the new entries complete (a leaf is
//! read from its entry's hash), so a proof that an entry is in the tree, or
//! that one tree is a prefix of another, reads about log₂ n rows. A chain
//! sealed before the tree existed is caught up with a batch at a time
//! ([`Store::grow_audit_tree`]).

use std::collections::{BTreeMap, HashMap};

use hallmark_provenance::ledger::{self, Anchor, ChainCheck, Checkpoint, EntryFields, SealedEntry};
use hallmark_provenance::merkle::{self, Frontier, Hash, NodeId};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{Result, Store, StoreError, param, row_placeholders};

/// What an entry records.
pub mod kind {
    pub const SUBMIT: &str = "submit";
    pub const DISPATCH: &str = "dispatch";
    pub const COMPLETE: &str = "complete";
    pub const FAIL: &str = "fail";
    pub const HAND_BACK: &str = "hand_back";
    pub const EXPIRE: &str = "expire";
    pub const FINISH: &str = "finish";
    pub const REGISTER_WORKER: &str = "register_worker";
    pub const REGISTER_MODEL: &str = "register_model";
    pub const REGISTER_DATASET: &str = "register_dataset";
    pub const UPLOAD_INPUT: &str = "upload_input";
    pub const PURGE_INPUT: &str = "purge_input";
    pub const DELETE_INPUT: &str = "delete_input";
    pub const REPAIR_TREE: &str = "repair_tree";
}

/// An entry about to be appended.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub kind: &'static str,
    pub job_id: String,
    pub subject: String,
    pub actor: String,
    /// The facts as a JSON object (stored as text; hashed as stored).
    pub body: serde_json::Value,
}

impl AuditEvent {
    pub fn new(kind: &'static str, subject: impl Into<String>, body: serde_json::Value) -> Self {
        Self {
            kind,
            job_id: String::new(),
            subject: subject.into(),
            actor: String::new(),
            body,
        }
    }

    pub fn job(mut self, job_id: impl Into<String>) -> Self {
        self.job_id = job_id.into();
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }
}

/// Rows per multi-row statement (4–7 parameters each: far below both
/// dialects' limits).
const ROWS_PER_STATEMENT: usize = 500;

/// Appends `events` on `conn`, inside the caller's transaction.
pub(super) async fn append(conn: &mut AnyConnection, at: i64, events: &[AuditEvent]) -> Result<()> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO audit_events (at, kind, job_id, subject, actor, body) VALUES ",
        );
        sql.push_str(&row_placeholders(conn, chunk.len(), 6));
        let mut q = sqlx::query(&sql);
        for e in chunk {
            q = q
                .bind(at)
                .bind(e.kind)
                .bind(&e.job_id)
                .bind(&e.subject)
                .bind(&e.actor)
                .bind(e.body.to_string());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// What holding the stored Merkle tree to one rebuilt from the chain
/// found ([`Store::check_audit_tree`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeCheck {
    /// Entries the tree holds: its leaves, each re-hashed from its fields.
    pub entries: u64,
    /// Nodes a tree of that many leaves stores.
    pub nodes: u64,
    /// Stored nodes that differ from the rebuilt ones (or are not hashes).
    pub wrong: u64,
    /// Nodes of the rebuilt tree that are not stored.
    pub missing: u64,
    /// Stored rows that are not the tree's: beyond its leaves, or leaves
    /// (which are read from the entries).
    pub extra: u64,
    /// The first nodes that differ, each described.
    pub examples: Vec<String>,
    /// The rebuilt tree's root (`None`: it holds no entries).
    pub root: Option<Hash>,
    /// The checkpoints (their entries) the rebuilt tree agrees with.
    pub held: Vec<u64>,
    /// Whether the stored tree was rewritten to the rebuilt one.
    pub repaired: bool,
}

impl TreeCheck {
    /// Whether the stored tree is the one its entries lead to.
    pub fn intact(&self) -> bool {
        self.wrong + self.missing + self.extra == 0
    }

    fn differs(&mut self, what: String) {
        if self.examples.len() < TREE_EXAMPLES {
            self.examples.push(what);
        }
    }
}

/// Differing nodes a [`TreeCheck`] describes; the rest are counted.
const TREE_EXAMPLES: usize = 10;
/// Entries read per statement while the tree is rebuilt.
const TREE_CHECK_PAGE: i64 = 5000;

/// A page of the sealed chain, with where it stands.
#[derive(Debug, Clone)]
pub struct LedgerPage {
    pub entries: Vec<SealedEntry>,
    /// The last sealed entry (entry 0 with the genesis hash before any).
    pub head: Anchor,
    /// Entries appended but not sealed yet.
    pub unsealed: u64,
    /// The latest signed checkpoint and its signature, if any.
    pub checkpoint: Option<(Checkpoint, Vec<u8>)>,
}

impl Store {
    /// Seals up to `limit` unsealed entries, oldest first. Returns how many;
    /// 0 also when another replica is sealing right now.
    pub async fn seal_audit(&self, limit: u32) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let lock = self.skip_locked();
        let Some(head) = sqlx::query(&format!(
            "SELECT seq, hash, tree_size FROM audit_head WHERE id = 1{lock}"
        ))
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(0);
        };
        let mut seq = head.try_get::<i64, _>("seq")? as u64;
        let mut prev: String = head.try_get("hash")?;
        // The tree takes the new entries now if it holds every earlier one;
        // otherwise `grow_audit_tree` reaches them in order.
        let tree_size = head.try_get::<i64, _>("tree_size")? as u64;
        let tree_follows = tree_size == seq;
        let rows = sqlx::query(
            "SELECT id, at, kind, job_id, subject, actor, body FROM audit_events \
             WHERE seq IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut sealed = Vec::with_capacity(rows.len());
        for r in &rows {
            seq += 1;
            let (kind, job_id, subject, actor, body): (String, String, String, String, String) = (
                r.try_get("kind")?,
                r.try_get("job_id")?,
                r.try_get("subject")?,
                r.try_get("actor")?,
                r.try_get("body")?,
            );
            let hash = ledger::entry_hash(
                seq,
                &prev,
                &EntryFields {
                    at_ms: r.try_get("at")?,
                    kind: &kind,
                    job_id: &job_id,
                    subject: &subject,
                    actor: &actor,
                    body: &body,
                },
            );
            sealed.push((r.try_get::<i64, _>("id")?, seq, prev, hash.clone()));
            prev = hash;
        }
        for chunk in sealed.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from("WITH v (id, seq, prev_hash, hash) AS (VALUES ");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let p = |k| param(&tx, i * 4 + k);
                sql.push_str(&format!(
                    "(CAST({} AS BIGINT), CAST({} AS BIGINT), {}, {})",
                    p(1),
                    p(2),
                    p(3),
                    p(4)
                ));
            }
            sql.push_str(
                ") UPDATE audit_events SET seq = v.seq, prev_hash = v.prev_hash, hash = v.hash \
                 FROM v WHERE audit_events.id = v.id",
            );
            let mut q = sqlx::query(&sql);
            for (id, seq, prev, hash) in chunk {
                q = q.bind(*id).bind(*seq as i64).bind(prev).bind(hash);
            }
            q.execute(&mut *tx).await?;
        }
        let tree_size = if tree_follows {
            let leaves = sealed.iter().map(|(_, _, _, hash)| hash.as_str());
            grow_tree(&mut tx, tree_size, leaves).await?
        } else {
            tree_size
        };
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2, tree_size = $3 WHERE id = 1")
            .bind(seq as i64)
            .bind(&prev)
            .bind(tree_size as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(sealed.len() as u64)
    }

    /// Adds up to `limit` sealed entries the Merkle tree does not hold yet
    /// (a chain sealed before it existed) as its next leaves. Returns how
    /// many; 0 also when another replica holds the head.
    pub async fn grow_audit_tree(&self, limit: u32) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let lock = self.skip_locked();
        let Some(head) = sqlx::query(&format!(
            "SELECT seq, tree_size FROM audit_head WHERE id = 1{lock}"
        ))
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(0);
        };
        let seq = head.try_get::<i64, _>("seq")?;
        let tree_size = head.try_get::<i64, _>("tree_size")?;
        if tree_size >= seq {
            return Ok(0);
        }
        let rows = sqlx::query(
            "SELECT seq, hash FROM audit_events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        )
        .bind(tree_size)
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut hashes = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let at = r.try_get::<i64, _>("seq")?;
            let expected = tree_size + 1 + i as i64;
            if at != expected {
                return Err(StoreError::Corrupt(format!(
                    "the audit ledger's sealed entry {expected} is missing (the next is {at}): its Merkle tree cannot grow past it"
                )));
            }
            hashes.push(r.try_get::<Option<String>, _>("hash")?.unwrap_or_default());
        }
        let grown = grow_tree(&mut tx, tree_size as u64, hashes.iter().map(String::as_str)).await?;
        sqlx::query("UPDATE audit_head SET tree_size = $1 WHERE id = 1")
            .bind(grown as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(grown - tree_size as u64)
    }

    /// Rebuilds the Merkle tree from the chain and holds the stored one to
    /// it, node by node. Every entry the tree holds is re-hashed from its
    /// fields and linked to the one before ([`ChainCheck`]), and the rebuilt
    /// tree must agree with each of `hold` (signed checkpoints the caller
    /// verified) that it reaches: a chain that does not check out, or that
    /// leads elsewhere than a signed root, is an error — its entries were
    /// changed, not only the tree, and rebuilding would serve proofs of the
    /// changed chain.
    ///
    /// With `repair` (the operator's name, recorded in the ledger), the
    /// stored nodes that differ are rewritten, the missing ones stored and
    /// those beyond the tree deleted, in one transaction that holds the
    /// head, so no seal grows the tree meanwhile. Without it, nothing is
    /// written and nothing is locked.
    pub async fn check_audit_tree(
        &self,
        hold: &[Checkpoint],
        repair: Option<&str>,
        now: i64,
    ) -> Result<TreeCheck> {
        let mut tx = self.pool.begin().await?;
        if repair.is_some() {
            // A write first: it waits for a seal in progress and holds the
            // next ones off (and makes SQLite's transaction a writer).
            sqlx::query("UPDATE audit_head SET tree_size = tree_size WHERE id = 1")
                .execute(&mut *tx)
                .await?;
        }
        let size = tree_size(&mut tx).await?;
        let mut hold: Vec<&Checkpoint> =
            hold.iter().filter(|c| c.seq > 0 && c.seq <= size).collect();
        hold.sort_by_key(|c| c.seq);
        let mut hold = hold.into_iter().peekable();
        let mut check = TreeCheck::default();
        let mut chain = ChainCheck::default();
        let mut frontier = Frontier::default();
        while frontier.size() < size {
            let rows = sqlx::query(&format!(
                "SELECT {ENTRY_COLUMNS} FROM audit_events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
            ))
            .bind(frontier.size() as i64)
            .bind(size as i64)
            .bind(TREE_CHECK_PAGE)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                return Err(StoreError::Corrupt(format!(
                    "the audit ledger's Merkle tree holds {size} entries, but its sealed entries end at {}",
                    frontier.size()
                )));
            }
            let mut built = Vec::new();
            for r in &rows {
                let e = sealed_entry(r)?;
                chain.push(&e).map_err(|fault| {
                    StoreError::Corrupt(format!(
                        "the audit ledger's chain does not check out: {fault}; its Merkle tree cannot be rebuilt from it"
                    ))
                })?;
                let leaf = merkle::leaf_of_hex(&e.hash).map_err(|err| {
                    StoreError::Corrupt(format!("audit ledger entry {}: {err}", e.seq))
                })?;
                built.extend(frontier.push(leaf));
                while let Some(c) = hold.next_if(|c| c.seq == e.seq) {
                    let root = frontier.root().map(|r| merkle::to_hex(&r));
                    if c.hash != e.hash || (c.root.is_some() && c.root != root) {
                        return Err(StoreError::Corrupt(format!(
                            "the audit ledger's entries 1 to {} lead to hash {} and root {}, not to those signed at entry {} ({}, {}): the entries were changed, not only the tree; not rebuilding it from them",
                            e.seq,
                            e.hash,
                            root.unwrap_or_default(),
                            c.seq,
                            c.hash,
                            c.root.as_deref().unwrap_or("no root")
                        )));
                    }
                    check.held.push(c.seq);
                }
            }
            // The leaves are the entries just checked; the nodes above
            // them are what is stored.
            built.retain(|(id, _)| id.level > 0);
            let ids: Vec<NodeId> = built.iter().map(|(id, _)| *id).collect();
            let stored = fetch_stored_nodes(&mut tx, &ids).await?;
            let mut fixes = Vec::new();
            for (id, hash) in built {
                check.nodes += 1;
                let want = merkle::to_hex(&hash);
                match stored.get(&id) {
                    Some(have) if *have == want => continue,
                    Some(have) => {
                        check.wrong += 1;
                        check.differs(format!(
                            "{} is stored as {have}, not {want}",
                            node_span(&id)
                        ));
                    }
                    None => {
                        check.missing += 1;
                        check.differs(format!("{} is missing", node_span(&id)));
                    }
                }
                fixes.push((id, hash));
            }
            if repair.is_some() {
                store_nodes(&mut tx, &fixes, true).await?;
            }
        }
        // Rows that are not the tree's: leaves (read from the entries), and
        // nodes past the leaves it holds — one at level L covers leaves from
        // idx · 2^L, so idx must stay below size / 2^L.
        let beyond = "FROM audit_tree WHERE level < 1 OR level > 62 OR idx < 0 \
                      OR idx >= ($1 >> CAST(level AS INTEGER))";
        let extra: i64 = sqlx::query(&format!("SELECT COUNT(*) AS n {beyond}"))
            .bind(size as i64)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        check.extra = extra as u64;
        if extra > 0 {
            check.differs(format!(
                "{extra} stored row(s) are not nodes of the tree of {size} entries (beyond it, or leaves, which are read from the entries)"
            ));
        }
        check.entries = size;
        check.root = frontier.root();
        if let Some(actor) = repair
            && !check.intact()
        {
            sqlx::query(&format!("DELETE {beyond}"))
                .bind(size as i64)
                .execute(&mut *tx)
                .await?;
            let event = AuditEvent::new(
                kind::REPAIR_TREE,
                "audit_tree",
                serde_json::json!({
                    "entries": size,
                    "wrong": check.wrong,
                    "missing": check.missing,
                    "extra": check.extra,
                    "root": check.root.map(|r| merkle::to_hex(&r)),
                    "held": check.held.last(),
                }),
            )
            .actor(actor);
            append(&mut tx, now, &[event]).await?;
            tx.commit().await?;
            check.repaired = true;
        }
        Ok(check)
    }

    /// How many entries the Merkle tree holds, and its root (`None` while
    /// it holds none).
    pub async fn audit_tree_head(&self) -> Result<(u64, Option<Hash>)> {
        let mut conn = self.pool.acquire().await?;
        let size = tree_size(&mut conn).await?;
        let frontier = load_frontier(&mut conn, size).await?;
        Ok((size, frontier.root()))
    }

    /// How many entries the Merkle tree holds.
    pub async fn audit_tree_size(&self) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        tree_size(&mut conn).await
    }

    /// The right edge of the tree of entries 1 to `size`, as stored: what a
    /// signer checks against the root it signed last, then extends with
    /// the entries it re-hashed itself.
    pub async fn audit_frontier(&self, size: u64) -> Result<Frontier> {
        let mut conn = self.pool.acquire().await?;
        load_frontier(&mut conn, size).await
    }

    /// `job_id`'s sealed entries after `after_seq` and up to entry `size`
    /// (at most `limit`; only those of `only`'s kind and subject when
    /// given), each with the proof that it is leaf `seq − 1` of the tree of
    /// entries 1 to `size`.
    pub async fn audit_inclusion_proofs(
        &self,
        job_id: &str,
        only: Option<(&str, &str)>,
        after_seq: u64,
        limit: u32,
        size: u64,
    ) -> Result<Vec<(SealedEntry, Vec<Hash>)>> {
        let mut conn = self.pool.acquire().await?;
        self.check_tree_holds(&mut conn, size).await?;
        let filter = match only {
            Some(_) => " AND kind = $5 AND subject = $6",
            None => "",
        };
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_events \
             WHERE job_id = $1 AND seq > $2 AND seq <= $3{filter} ORDER BY seq LIMIT $4"
        );
        let mut q = sqlx::query(&sql)
            .bind(job_id)
            .bind(after_seq as i64)
            .bind(size as i64)
            .bind(i64::from(limit));
        if let Some((kind, subject)) = only {
            q = q.bind(kind).bind(subject);
        }
        let rows = q.fetch_all(&mut *conn).await?;
        let entries = rows.iter().map(sealed_entry).collect::<Result<Vec<_>>>()?;
        let needed = merkle::nodes_needed(|node| {
            for e in &entries {
                merkle::inclusion_proof(e.seq - 1, size, node);
            }
        });
        let nodes = fetch_nodes(&mut conn, &needed).await?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let proof = merkle::inclusion_proof(e.seq - 1, size, &mut |id| nodes[&id]);
                (e, proof)
            })
            .collect())
    }

    /// The proof that the tree of entries 1 to `old` is a prefix of the
    /// tree of entries 1 to `new` (0 < old ≤ new ≤ the tree's size).
    pub async fn audit_consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>> {
        if old == 0 || old > new {
            return Err(StoreError::Refused(format!(
                "no consistency proof from a ledger of {old} entries to one of {new}: the old one must have at least one entry and no more than the new one"
            )));
        }
        let mut conn = self.pool.acquire().await?;
        self.check_tree_holds(&mut conn, new).await?;
        let needed = merkle::nodes_needed(|node| {
            merkle::consistency_proof(old, new, node);
        });
        let nodes = fetch_nodes(&mut conn, &needed).await?;
        Ok(merkle::consistency_proof(old, new, &mut |id| nodes[&id]))
    }

    /// Refuses a proof about a tree larger than the one stored.
    async fn check_tree_holds(&self, conn: &mut AnyConnection, size: u64) -> Result<()> {
        let held = tree_size(conn).await?;
        if size > held {
            return Err(StoreError::Refused(format!(
                "the audit ledger's Merkle tree holds {held} entries, not {size} yet"
            )));
        }
        Ok(())
    }

    /// How many of `job_id`'s entries are not in the tree of entries 1 to
    /// `size`: sealed after it, or not sealed yet.
    pub async fn audit_entries_after(&self, job_id: &str, size: u64) -> Result<u64> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM audit_events WHERE job_id = $1 AND (seq IS NULL OR seq > $2)",
        )
        .bind(job_id)
        .bind(size as i64)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok(n as u64)
    }

    /// Up to `limit` sealed entries after `after_seq`, in chain order; only
    /// `job_id`'s when one is given (such a page is for reading, not for
    /// checking the chain, which needs every entry).
    pub async fn audit_page(
        &self,
        after_seq: u64,
        limit: u32,
        job_id: Option<&str>,
    ) -> Result<LedgerPage> {
        let filter = if job_id.is_some() {
            " AND job_id = $3"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_events WHERE seq > $1{filter} ORDER BY seq LIMIT $2"
        );
        let mut q = sqlx::query(&sql)
            .bind(after_seq as i64)
            .bind(i64::from(limit));
        if let Some(job) = job_id {
            q = q.bind(job);
        }
        let entries = q
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(sealed_entry)
            .collect::<Result<Vec<_>>>()?;
        let head = self.audit_head().await?;
        let checkpoint = self.latest_checkpoint().await?;
        let unsealed: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE seq IS NULL")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(LedgerPage {
            entries,
            head,
            unsealed: unsealed as u64,
            checkpoint,
        })
    }

    /// The chain's last sealed entry (entry 0 with the genesis hash before any).
    pub async fn audit_head(&self) -> Result<Anchor> {
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(Anchor {
            seq: head.try_get::<i64, _>("seq")? as u64,
            hash: head.try_get("hash")?,
        })
    }

    /// Keeps a signed checkpoint; one already kept for the same entry (by
    /// another replica) stays.
    pub async fn record_checkpoint(&self, c: &Checkpoint, signature: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, at, root, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(c.seq as i64)
        .bind(&c.hash)
        .bind(c.at_ms)
        .bind(c.root.as_deref())
        .bind(signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The signed checkpoint furthest along the chain, with its signature.
    pub async fn latest_checkpoint(&self) -> Result<Option<(Checkpoint, Vec<u8>)>> {
        Ok(self.latest_checkpoints(1).await?.into_iter().next())
    }

    /// Up to `n` signed checkpoints, furthest along the chain first.
    pub async fn latest_checkpoints(&self, n: u32) -> Result<Vec<(Checkpoint, Vec<u8>)>> {
        let rows = sqlx::query(
            "SELECT seq, hash, at, root, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(n))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(checkpoint_row).collect()
    }

    /// The signed checkpoint at entry `seq`, if the database holds one.
    pub async fn checkpoint_at(&self, seq: u64) -> Result<Option<(Checkpoint, Vec<u8>)>> {
        sqlx::query("SELECT seq, hash, at, root, signature FROM audit_checkpoints WHERE seq = $1")
            .bind(seq as i64)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(checkpoint_row)
            .transpose()
    }
}

fn checkpoint_row(r: &AnyRow) -> Result<(Checkpoint, Vec<u8>)> {
    Ok((
        Checkpoint {
            seq: r.try_get::<i64, _>("seq")? as u64,
            hash: r.try_get("hash")?,
            at_ms: r.try_get("at")?,
            root: r.try_get("root")?,
        },
        r.try_get("signature")?,
    ))
}

/// The columns [`sealed_entry`] reads.
const ENTRY_COLUMNS: &str = "seq, at, kind, job_id, subject, actor, body, prev_hash, hash";

fn sealed_entry(r: &AnyRow) -> Result<SealedEntry> {
    Ok(SealedEntry {
        seq: r.try_get::<i64, _>("seq")? as u64,
        at_ms: r.try_get("at")?,
        kind: r.try_get("kind")?,
        job_id: r.try_get("job_id")?,
        subject: r.try_get("subject")?,
        actor: r.try_get("actor")?,
        body: r.try_get("body")?,
        prev_hash: r
            .try_get::<Option<String>, _>("prev_hash")?
            .unwrap_or_default(),
        hash: r.try_get::<Option<String>, _>("hash")?.unwrap_or_default(),
    })
}

/// Appends the entries hashed `entry_hashes` (in chain order) to the tree
/// of `size` leaves, storing every node they complete; returns the new size.
async fn grow_tree<'a>(
    conn: &mut AnyConnection,
    size: u64,
    entry_hashes: impl Iterator<Item = &'a str>,
) -> Result<u64> {
    let mut frontier = load_frontier(conn, size).await?;
    let mut done = Vec::new();
    for hash in entry_hashes {
        let leaf = merkle::leaf_of_hex(hash).map_err(|e| {
            StoreError::Corrupt(format!("audit ledger entry {}: {e}", frontier.size() + 1))
        })?;
        // The leaf itself is read from its entry; the nodes above it are stored.
        done.extend(
            frontier
                .push(leaf)
                .into_iter()
                .filter(|(id, _)| id.level > 0),
        );
    }
    store_nodes(conn, &done, false).await?;
    Ok(frontier.size())
}

/// Stores tree nodes (above the leaves); with `replace`, over any stored
/// under the same position.
async fn store_nodes(
    conn: &mut AnyConnection,
    nodes: &[(NodeId, Hash)],
    replace: bool,
) -> Result<()> {
    for chunk in nodes.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from("INSERT INTO audit_tree (level, idx, hash) VALUES ");
        sql.push_str(&row_placeholders(conn, chunk.len(), 3));
        if replace {
            sql.push_str(" ON CONFLICT (level, idx) DO UPDATE SET hash = excluded.hash");
        }
        let mut q = sqlx::query(&sql);
        for (id, hash) in chunk {
            q = q
                .bind(i64::from(id.level))
                .bind(id.index as i64)
                .bind(merkle::to_hex(hash));
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// "node L/I (entries A to B)": a tree node and the entries under it.
fn node_span(id: &NodeId) -> String {
    format!(
        "node {}/{} (entries {} to {})",
        id.level,
        id.index,
        (id.index << id.level) + 1,
        (id.index + 1) << id.level
    )
}

/// How many entries the Merkle tree holds.
async fn tree_size(conn: &mut AnyConnection) -> Result<u64> {
    let size: i64 = sqlx::query("SELECT tree_size FROM audit_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?
        .try_get("tree_size")?;
    Ok(size as u64)
}

/// The stored right edge of the tree of `size` leaves.
async fn load_frontier(conn: &mut AnyConnection, size: u64) -> Result<Frontier> {
    let ids = Frontier::ids(size);
    let nodes = fetch_nodes(conn, &ids).await?;
    Frontier::from_nodes(size, ids.iter().map(|id| nodes[id]).collect())
        .map_err(StoreError::Corrupt)
}

/// The tree's nodes `ids`: leaves from their sealed entries, the nodes
/// above from `audit_tree`. One missing, or not a hash, is an error.
async fn fetch_nodes(conn: &mut AnyConnection, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>> {
    let (leaves, above): (Vec<NodeId>, Vec<NodeId>) = ids.iter().partition(|id| id.level == 0);
    let mut out = fetch_leaves(conn, &leaves).await?;
    let stored = fetch_stored_nodes(conn, &above).await?;
    for id in &above {
        let Some(hash) = stored.get(id) else {
            return Err(StoreError::Corrupt(format!(
                "the audit ledger's Merkle tree lacks {}: it was deleted or never stored",
                node_span(id)
            )));
        };
        let hash = merkle::from_hex(hash).map_err(|e| {
            StoreError::Corrupt(format!(
                "the audit ledger's tree node {}/{}: {e}",
                id.level, id.index
            ))
        })?;
        out.insert(*id, hash);
    }
    Ok(out)
}

/// The leaves `ids` (level 0): leaf i is the hash of sealed entry i + 1.
async fn fetch_leaves(conn: &mut AnyConnection, ids: &[NodeId]) -> Result<HashMap<NodeId, Hash>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT seq, hash FROM audit_events WHERE seq IN ({})",
            (1..=chunk.len())
                .map(|i| param(conn, i))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in chunk {
            q = q.bind(id.index as i64 + 1);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let seq = r.try_get::<i64, _>("seq")? as u64;
            let hash: Option<String> = r.try_get("hash")?;
            let leaf = merkle::leaf_of_hex(hash.as_deref().unwrap_or_default())
                .map_err(|e| StoreError::Corrupt(format!("audit ledger entry {seq}: {e}")))?;
            out.insert(
                NodeId {
                    level: 0,
                    index: seq - 1,
                },
                leaf,
            );
        }
    }
    if let Some(missing) = ids.iter().find(|id| !out.contains_key(id)) {
        return Err(StoreError::Corrupt(format!(
            "the audit ledger's sealed entry {} is missing: the Merkle tree's leaf {} is read from it",
            missing.index + 1,
            missing.index
        )));
    }
    Ok(out)
}

/// Those of the nodes `ids` that are stored, as stored (hex text). One
/// statement asks for every level at once (a clause per level), so the
/// stored nodes of a tree's edge or of a page of proofs cost one round trip
/// however many levels (the leaves among them, read from the entries by
/// [`fetch_leaves`], one more).
async fn fetch_stored_nodes(
    conn: &mut AnyConnection,
    ids: &[NodeId],
) -> Result<HashMap<NodeId, String>> {
    let mut by_level: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for id in ids {
        by_level.entry(id.level).or_default().push(id.index);
    }
    let mut out = HashMap::with_capacity(ids.len());
    let mut clauses: Vec<(u32, &[u64])> = Vec::new();
    let mut params = 0;
    for (level, indices) in &by_level {
        for chunk in indices.chunks(ROWS_PER_STATEMENT) {
            if params + chunk.len() > ROWS_PER_STATEMENT && !clauses.is_empty() {
                fetch_levels(conn, &clauses, &mut out).await?;
                clauses.clear();
                params = 0;
            }
            params += chunk.len() + 1;
            clauses.push((*level, chunk));
        }
    }
    if !clauses.is_empty() {
        fetch_levels(conn, &clauses, &mut out).await?;
    }
    Ok(out)
}

/// Reads the nodes at each `(level, indices)` in one statement into `out`.
async fn fetch_levels(
    conn: &mut AnyConnection,
    clauses: &[(u32, &[u64])],
    out: &mut HashMap<NodeId, String>,
) -> Result<()> {
    let mut sql = String::from("SELECT level, idx, hash FROM audit_tree WHERE ");
    let mut n = 0;
    for (i, (_, indices)) in clauses.iter().enumerate() {
        if i > 0 {
            sql.push_str(" OR ");
        }
        n += 1;
        sql.push_str(&format!("(level = {} AND idx IN (", param(conn, n)));
        for j in 0..indices.len() {
            if j > 0 {
                sql.push_str(", ");
            }
            n += 1;
            sql.push_str(&param(conn, n));
        }
        sql.push_str("))");
    }
    let mut q = sqlx::query(&sql);
    for (level, indices) in clauses {
        q = q.bind(i64::from(*level));
        for i in *indices {
            q = q.bind(*i as i64);
        }
    }
    for r in q.fetch_all(&mut *conn).await? {
        let level = r.try_get::<i64, _>("level")? as u32;
        let index = r.try_get::<i64, _>("idx")? as u64;
        out.insert(NodeId { level, index }, r.try_get("hash")?);
    }
    Ok(())
}
