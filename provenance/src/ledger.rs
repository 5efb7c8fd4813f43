//! The audit ledger's hash chain: how an entry is hashed and how an auditor
//! checks a chain, shared by the coordinator (which seals entries) and the
//! client (which re-checks them without trusting the coordinator).
//!
//! Entry `n` is hashed over its own fields and entry `n − 1`'s hash, so
//! changing, removing or reordering any entry breaks every link after it.
//! A whole chain recomputed by someone with write access to the database
//! is caught by an anchor: a `(seq, hash)` pair an auditor recorded earlier.

use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation: a ledger hash is never the hash of anything else.
const DOMAIN: &[u8] = b"hallmark-audit-ledger-v1";

/// What happened, as the coordinator recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryFields<'a> {
    /// Milliseconds since the Unix epoch, by the coordinator's clock.
    pub at_ms: i64,
    /// `submit`, `dispatch`, `complete`, `fail`, … (see the coordinator's `audit::kind`).
    pub kind: &'a str,
    /// The job it belongs to; empty for registrations.
    pub job_id: &'a str,
    /// What it is about: a job, task, worker, model, dataset or input id.
    pub subject: &'a str,
    /// Who did it: a worker id, a tenant; empty where the farm cannot tell.
    pub actor: &'a str,
    /// The facts, as JSON text (hashed as stored).
    pub body: &'a str,
}

/// The hash of entry `seq` whose predecessor hashed to `prev_hash`: sha256
/// over the domain tag and every field, each prefixed with its length so no
/// two different entries encode alike.
pub fn entry_hash(seq: u64, prev_hash: &str, e: &EntryFields<'_>) -> String {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    let seq = seq.to_string();
    let at = e.at_ms.to_string();
    for field in [
        seq.as_str(),
        prev_hash,
        at.as_str(),
        e.kind,
        e.job_id,
        e.subject,
        e.actor,
        e.body,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// A sealed entry as read back from the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SealedEntry {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub job_id: String,
    pub subject: String,
    pub actor: String,
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

impl SealedEntry {
    pub fn fields(&self) -> EntryFields<'_> {
        EntryFields {
            at_ms: self.at_ms,
            kind: &self.kind,
            job_id: &self.job_id,
            subject: &self.subject,
            actor: &self.actor,
            body: &self.body,
        }
    }
}

/// Why a chain does not check out. Each names the entry where it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerFault {
    #[error("ledger entry {found} follows entry {}: entries are missing or out of order", .expected - 1)]
    Gap { expected: u64, found: u64 },
    #[error(
        "ledger entry {seq} names {named} as the previous entry's hash, but entry {} hashes to {actual}: the chain was broken before it",
        .seq - 1
    )]
    BrokenLink {
        seq: u64,
        named: String,
        actual: String,
    },
    #[error(
        "ledger entry {seq} ({kind} of {subject}) does not hash to its recorded {recorded}: its contents were changed after it was sealed"
    )]
    Altered {
        seq: u64,
        kind: String,
        subject: String,
        recorded: String,
    },
    #[error(
        "anchor {seq}:{expected} does not match: entry {seq} now hashes to {actual}; the ledger was rewritten since the anchor was taken"
    )]
    AnchorMismatch {
        seq: u64,
        expected: String,
        actual: String,
    },
    #[error(
        "anchor {seq}:{expected} names an entry past the ledger's end ({head}): entries were removed since the anchor was taken"
    )]
    AnchorMissing {
        seq: u64,
        expected: String,
        head: u64,
    },
}

/// A point of the chain an auditor recorded: entry `seq` hashed to `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HASH`, as `hallmark audit verify` prints the head.
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or_else(|| format!("anchor {s:?} is not SEQ:HASH"))?;
        let seq: u64 = seq
            .parse()
            .map_err(|_| format!("anchor {s:?}: {seq:?} is not an entry number"))?;
        if seq == 0 || !crate::is_sha256_hex(hash) {
            return Err(format!(
                "anchor {s:?}: needs an entry number from 1 and a 64-hex-digit hash"
            ));
        }
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// The coordinator's signed statement that the chain's entry `seq` hashed
/// to `hash` at `at_ms` and, from the ledger's Merkle tree onward, that the
/// tree of entries 1 to `seq` has the root `root`: what it signs (detached,
/// with the deployment's certificate: [`crate::credentials::detached`]) as
/// it seals. A chain rewritten after a checkpoint no longer passes through
/// it, and rewriting the checkpoint too takes the signing key. The root
/// lets one entry be proven in it without the rest ([`crate::merkle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub at_ms: i64,
    /// The Merkle root of entries 1 to `seq`, hex; `None` in checkpoints
    /// signed before the ledger had a tree.
    pub root: Option<String>,
}

impl Checkpoint {
    /// The bytes signed: a domain tag and the fields, one per line (the
    /// v2 tag and the root when there is one).
    pub fn payload(&self) -> Vec<u8> {
        match &self.root {
            None => format!(
                "hallmark-audit-checkpoint-v1\n{}\n{}\n{}",
                self.seq, self.hash, self.at_ms
            ),
            Some(root) => format!(
                "hallmark-audit-checkpoint-v2\n{}\n{}\n{}\n{root}",
                self.seq, self.hash, self.at_ms
            ),
        }
        .into_bytes()
    }

    /// The point of the chain it vouches for.
    pub fn anchor(&self) -> Anchor {
        Anchor {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }

    /// The checkpoint and its `signature` as published outside the
    /// database: a small JSON document an auditor can read and check alone.
    pub fn to_published(&self, signature: &[u8]) -> Vec<u8> {
        let doc = PublishedCheckpoint {
            format: match self.root {
                None => PUBLISHED_FORMAT_V1,
                Some(_) => PUBLISHED_FORMAT,
            }
            .into(),
            seq: self.seq,
            hash: self.hash.clone(),
            at_ms: self.at_ms,
            root: self.root.clone(),
            signature: hex::encode(signature),
        };
        let mut text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        text.push(b'\n');
        text
    }

    /// Reads a published checkpoint: the checkpoint and its signature (not
    /// yet verified: see `credentials::detached::verify_detached`).
    pub fn from_published(bytes: &[u8]) -> Result<(Checkpoint, Vec<u8>), String> {
        let doc: PublishedCheckpoint = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a published audit checkpoint: {e}"))?;
        match (doc.format.as_str(), &doc.root) {
            (PUBLISHED_FORMAT_V1, None) => {}
            (PUBLISHED_FORMAT, Some(root)) if crate::is_sha256_hex(root) => {}
            (PUBLISHED_FORMAT, _) => {
                return Err(format!(
                    "format {PUBLISHED_FORMAT:?} needs a 64-hex-digit root"
                ));
            }
            (format, _) => {
                return Err(format!(
                    "format {format:?}, not {PUBLISHED_FORMAT:?} or {PUBLISHED_FORMAT_V1:?} (without a root)"
                ));
            }
        }
        let signature =
            hex::decode(&doc.signature).map_err(|e| format!("signature is not hex: {e}"))?;
        Ok((
            Checkpoint {
                seq: doc.seq,
                hash: doc.hash,
                at_ms: doc.at_ms,
                root: doc.root.map(|r| r.to_ascii_lowercase()),
            },
            signature,
        ))
    }

    /// Whether the time a time-stamp authority saw this checkpoint's
    /// signature (`stamped_ms`) agrees with the time the checkpoint states,
    /// within [`TIMESTAMP_SKEW_MS`]: a checkpoint dated earlier or later
    /// than it was signed (by someone holding the key) does not.
    pub fn agrees_with_timestamp(&self, stamped_ms: i64) -> bool {
        (stamped_ms - self.at_ms).abs() <= TIMESTAMP_SKEW_MS
    }

    /// The file name a checkpoint at entry `seq` is published under; names
    /// sort as their entries do.
    pub fn published_name(seq: u64) -> String {
        format!("{seq:020}.json")
    }

    /// The entry a published file name stands for.
    pub fn published_seq(name: &str) -> Option<u64> {
        let digits = name.strip_suffix(".json")?;
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }
}

/// The published form of a checkpoint with a Merkle root.
const PUBLISHED_FORMAT: &str = "hallmark-audit-checkpoint-v2";
/// The published form of one signed before the ledger had a tree.
const PUBLISHED_FORMAT_V1: &str = "hallmark-audit-checkpoint-v1";

/// How far a checkpoint's own time may be from its time-stamp authority's.
pub const TIMESTAMP_SKEW_MS: i64 = 10 * 60 * 1000;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishedCheckpoint {
    format: String,
    seq: u64,
    hash: String,
    at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root: Option<String>,
    /// The detached COSE_Sign1 over [`Checkpoint::payload`], hex.
    signature: String,
}

/// Checks a chain entry by entry, from the first, so an auditor can walk a
/// ledger of any length page by page.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    next_seq: u64,
    head_hash: String,
    anchors: Vec<Anchor>,
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl ChainCheck {
    /// A check from the genesis, holding the chain to `anchors` as it passes them.
    pub fn new(anchors: Vec<Anchor>) -> Self {
        Self {
            next_seq: 1,
            head_hash: GENESIS.to_string(),
            anchors,
        }
    }

    /// A check that starts after `from`, an entry already known good (a
    /// signed checkpoint): the next entry must be `from.seq + 1` and link
    /// to `from.hash`.
    pub fn resume(from: Anchor) -> Self {
        Self {
            next_seq: from.seq + 1,
            head_hash: from.hash,
            anchors: Vec::new(),
        }
    }

    /// Checks the next entry: its number, its link to the previous one,
    /// its own hash, and any anchor at its number.
    pub fn push(&mut self, e: &SealedEntry) -> Result<(), LedgerFault> {
        if e.seq != self.next_seq {
            return Err(LedgerFault::Gap {
                expected: self.next_seq,
                found: e.seq,
            });
        }
        if e.prev_hash != self.head_hash {
            return Err(LedgerFault::BrokenLink {
                seq: e.seq,
                named: e.prev_hash.clone(),
                actual: self.head_hash.clone(),
            });
        }
        let actual = entry_hash(e.seq, &e.prev_hash, &e.fields());
        if actual != e.hash {
            return Err(LedgerFault::Altered {
                seq: e.seq,
                kind: e.kind.clone(),
                subject: e.subject.clone(),
                recorded: e.hash.clone(),
            });
        }
        if let Some(a) = self.anchors.iter().find(|a| a.seq == e.seq)
            && a.hash != actual
        {
            return Err(LedgerFault::AnchorMismatch {
                seq: e.seq,
                expected: a.hash.clone(),
                actual,
            });
        }
        self.next_seq += 1;
        self.head_hash = actual;
        Ok(())
    }

    /// Ends the walk: every anchor must have been passed.
    pub fn finish(&self) -> Result<Anchor, LedgerFault> {
        let head = self.head();
        if let Some(a) = self.anchors.iter().find(|a| a.seq > head.seq) {
            return Err(LedgerFault::AnchorMissing {
                seq: a.seq,
                expected: a.hash.clone(),
                head: head.seq,
            });
        }
        Ok(head)
    }

    /// The last entry checked (entry 0 with the genesis hash before any).
    pub fn head(&self) -> Anchor {
        Anchor {
            seq: self.next_seq - 1,
            hash: self.head_hash.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<SealedEntry> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut e = SealedEntry {
                    seq,
                    at_ms: 1_700_000_000_000 + seq as i64,
                    kind: "complete".into(),
                    job_id: "job-1".into(),
                    subject: format!("job-1-g-{seq}"),
                    actor: "worker-a".into(),
                    body: format!(r#"{{"sha256":"{seq:064x}"}}"#),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                e.hash = entry_hash(seq, &prev, &e.fields());
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn check(entries: &[SealedEntry], anchors: Vec<Anchor>) -> Result<Anchor, LedgerFault> {
        let mut c = ChainCheck::new(anchors);
        for e in entries {
            c.push(e)?;
        }
        c.finish()
    }

    #[test]
    fn an_untouched_chain_checks_out_to_its_head() {
        let entries = chain(5);
        let head = check(&entries, Vec::new()).unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(head.hash, entries[4].hash);
        assert_eq!(check(&[], Vec::new()).unwrap().hash, GENESIS);
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = chain(1).remove(0);
        let edits: [fn(&mut SealedEntry); 6] = [
            |e| e.at_ms += 1,
            |e| e.kind = "fail".into(),
            |e| e.job_id = "job-2".into(),
            |e| e.subject.push('x'),
            |e| e.actor = "worker-b".into(),
            |e| e.body = e.body.replace('1', "2"),
        ];
        for edit in edits {
            let mut e = base.clone();
            edit(&mut e);
            assert!(
                matches!(
                    check(&[e], Vec::new()),
                    Err(LedgerFault::Altered { seq: 1, .. })
                ),
                "an edit went unnoticed"
            );
        }
        // Moving bytes between fields changes the hash too (length prefixes).
        let mut e = base.clone();
        e.actor = format!("{}{}", e.subject, e.actor);
        e.subject.clear();
        assert!(matches!(
            check(&[e], Vec::new()),
            Err(LedgerFault::Altered { .. })
        ));
    }

    #[test]
    fn a_removed_entry_is_a_gap_and_a_resealed_one_a_broken_link() {
        let mut entries = chain(4);
        let mut removed = entries.clone();
        removed.remove(1);
        assert_eq!(
            check(&removed, Vec::new()),
            Err(LedgerFault::Gap {
                expected: 2,
                found: 3
            })
        );
        // Altering entry 2 and re-hashing it alone breaks entry 3's link.
        entries[1].body = "{}".into();
        entries[1].hash = entry_hash(2, &entries[1].prev_hash, &entries[1].fields());
        assert!(matches!(
            check(&entries, Vec::new()),
            Err(LedgerFault::BrokenLink { seq: 3, .. })
        ));
    }

    #[test]
    fn anchors_catch_a_rewritten_or_truncated_chain() {
        let entries = chain(4);
        let anchor = Anchor {
            seq: 3,
            hash: entries[2].hash.clone(),
        };
        assert!(check(&entries, vec![anchor.clone()]).is_ok());
        // The whole chain recomputed with one entry changed: consistent in
        // itself, but not with what the auditor recorded.
        let mut rewritten = entries.clone();
        rewritten[0].actor = "someone-else".into();
        let mut prev = GENESIS.to_string();
        for e in &mut rewritten {
            e.prev_hash = prev.clone();
            e.hash = entry_hash(e.seq, &prev, &e.fields());
            prev = e.hash.clone();
        }
        assert!(check(&rewritten, Vec::new()).is_ok());
        assert!(matches!(
            check(&rewritten, vec![anchor.clone()]),
            Err(LedgerFault::AnchorMismatch { seq: 3, .. })
        ));
        assert!(matches!(
            check(&entries[..2], vec![anchor]),
            Err(LedgerFault::AnchorMissing {
                seq: 3,
                head: 2,
                ..
            })
        ));
    }

    #[test]
    fn anchors_parse_as_printed() {
        let hash = chain(1)[0].hash.clone();
        let a: Anchor = format!("7:{}", hash.to_uppercase()).parse().unwrap();
        assert_eq!((a.seq, a.hash), (7, hash.clone()));
        for bad in ["7", "x:ab", &format!("0:{hash}"), "3:abc"] {
            assert!(bad.parse::<Anchor>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_check_resumed_at_a_checkpoint_needs_the_chain_to_continue_from_it() {
        let entries = chain(5);
        let at = Checkpoint {
            seq: 2,
            hash: entries[1].hash.clone(),
            at_ms: 9,
            root: None,
        };
        assert_eq!(
            String::from_utf8(at.payload()).unwrap(),
            format!("hallmark-audit-checkpoint-v1\n2\n{}\n9", entries[1].hash)
        );
        // With a root, the root is signed too, under another tag.
        let rooted = Checkpoint {
            root: Some("cd".repeat(32)),
            ..at.clone()
        };
        assert_eq!(
            String::from_utf8(rooted.payload()).unwrap(),
            format!(
                "hallmark-audit-checkpoint-v2\n2\n{}\n9\n{}",
                entries[1].hash,
                "cd".repeat(32)
            )
        );
        let mut resumed = ChainCheck::resume(at.anchor());
        for e in &entries[2..] {
            resumed.push(e).unwrap();
        }
        assert_eq!(
            resumed.head(),
            Anchor {
                seq: 5,
                hash: entries[4].hash.clone()
            }
        );
        // Starting anywhere but right after it is a gap; a checkpoint the
        // chain no longer passes through is a broken link.
        let mut skipped = ChainCheck::resume(at.anchor());
        assert!(matches!(
            skipped.push(&entries[3]),
            Err(LedgerFault::Gap { .. })
        ));
        let forged = Anchor {
            seq: 2,
            hash: "ab".repeat(32),
        };
        let mut rewritten = ChainCheck::resume(forged);
        assert!(matches!(
            rewritten.push(&entries[2]),
            Err(LedgerFault::BrokenLink { seq: 3, .. })
        ));
    }

    #[test]
    fn a_published_checkpoint_reads_back_and_names_sort_by_entry() {
        let c = Checkpoint {
            seq: 42,
            hash: "ab".repeat(32),
            at_ms: 1_796_558_400_000,
            root: Some("cd".repeat(32)),
        };
        let text = c.to_published(&[1, 2, 0xfe]);
        assert_eq!(
            Checkpoint::from_published(&text),
            Ok((c.clone(), vec![1, 2, 0xfe]))
        );
        // One signed before the tree reads back without a root.
        let v1 = Checkpoint { root: None, ..c };
        let v1_text = v1.to_published(&[3]);
        assert!(!String::from_utf8_lossy(&v1_text).contains("root"));
        assert_eq!(Checkpoint::from_published(&v1_text), Ok((v1, vec![3])));
        let v1_doc = String::from_utf8(v1_text).unwrap();
        let e = Checkpoint::from_published(v1_doc.replace("-v1", "-v2").as_bytes()).unwrap_err();
        assert!(e.contains("needs a 64-hex-digit root"), "{e}");
        let doc = String::from_utf8(text).unwrap();
        let root = "cd".repeat(32);
        for (from, to, says) in [
            (
                "\"seq\": 42",
                "\"seq\": \"x\"",
                "not a published audit checkpoint",
            ),
            ("checkpoint-v2", "checkpoint-v1", "format"),
            ("checkpoint-v2", "checkpoint-v3", "format"),
            (root.as_str(), "cd", "root"),
            ("0102fe", "0g02fe", "not hex"),
            ("\"seq\"", "\"extra\": 1, \"seq\"", "unknown field"),
        ] {
            let bad = doc.replace(from, to);
            assert_ne!(bad, doc, "{from}");
            let e = Checkpoint::from_published(bad.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert!(Checkpoint::published_name(9) < Checkpoint::published_name(10));
        assert_eq!(
            Checkpoint::published_seq(&Checkpoint::published_name(10)),
            Some(10)
        );
        assert_eq!(Checkpoint::published_seq("10.json"), None);
        assert_eq!(
            Checkpoint::published_seq(".tmp-00000000000000000010.json"),
            None
        );
    }

    #[test]
    fn a_checkpoint_agrees_with_a_time_stamp_only_near_its_own_time() {
        let c = Checkpoint {
            seq: 1,
            hash: "ab".repeat(32),
            at_ms: 1_796_558_400_000,
            root: None,
        };
        assert!(c.agrees_with_timestamp(c.at_ms + 1500));
        assert!(c.agrees_with_timestamp(c.at_ms - TIMESTAMP_SKEW_MS));
        assert!(!c.agrees_with_timestamp(c.at_ms + TIMESTAMP_SKEW_MS + 1));
        assert!(!c.agrees_with_timestamp(c.at_ms - 86_400_000));
    }
}
