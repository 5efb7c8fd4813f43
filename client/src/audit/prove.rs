//! `hallmark audit prove`: a tenant's check of its own job's ledger
//! entries, without reading anyone else's.
//!
//! The coordinator sends each of the job's sealed entries with its Merkle
//! inclusion proof and the signed checkpoint whose root the proofs lead to.
//! Here each entry is re-hashed from its fields, its proof walked to the
//! root, the checkpoint's signature checked against the trust anchors, and
//! the job's artifacts held against the completions proven. Checkpoints the
//! caller kept from earlier runs (`--checkpoint`, or `--save-checkpoint`
//! then) are held to the served one by a consistency proof: the ledger
//! between them only grew.

use std::path::PathBuf;

use anyhow::Context;
use hallmark_proto::v1::{ConsistencyRequest, EntryProofs, ProveEntriesRequest};
use hallmark_provenance::ledger::{Checkpoint, SealedEntry, entry_hash};
use hallmark_provenance::merkle::{self, Hash};
use serde_json::json;

use super::{
    CheckpointHold, JobAudit, JobTally, SignedCheckpoint, check_checkpoint, checkpoint_of, sealed,
};
use crate::remote::{Remote, rpc};

/// What `hallmark audit prove` checks.
#[derive(Debug, Clone, Default)]
pub struct ProveOptions {
    pub job: String,
    pub hold: CheckpointHold,
    /// Where to keep the served checkpoint once it checks out.
    pub save_checkpoint: Option<PathBuf>,
}

/// What `hallmark audit prove` found.
#[derive(Debug, Clone)]
pub struct ProofReport {
    /// The job's entries proven in the signed tree.
    pub proven: u64,
    /// The job's entries newer than the checkpoint (not proven yet).
    pub unproven: u64,
    /// The checkpoint proven against, its signature checked here.
    pub checkpoint: Option<SignedCheckpoint>,
    /// The caller's own checkpoints the served one was held to.
    pub own_checkpoints: Vec<SignedCheckpoint>,
    pub job: JobAudit,
    pub problems: Vec<String>,
}

impl ProofReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "ok": self.ok(),
            "proven": self.proven,
            "unproven": self.unproven,
            "checkpoint": self.checkpoint.as_ref().map(SignedCheckpoint::to_json),
            "own_checkpoints": self.own_checkpoints.iter().map(SignedCheckpoint::to_json).collect::<Vec<_>>(),
            "job": self.job.to_json(),
            "problems": self.problems,
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        match (&self.checkpoint, self.ok()) {
            (Some(c), true) => s.push_str(&format!(
                "job {}: {} ledger entries proven in the audit ledger of {} entries, each re-hashed and its Merkle path walked here\n\
                 signed checkpoint: entry {}, root {}, at {} by {:?} ({})\n",
                self.job.job_id,
                self.proven,
                c.checkpoint.seq,
                c.checkpoint.seq,
                c.checkpoint.root.as_deref().unwrap_or("-"),
                hallmark_coordinator::auth::format_time_ms(c.checkpoint.at_ms),
                c.signer,
                c.trust_label()
            )),
            _ => {
                s.push_str(&format!(
                    "JOB {}'S LEDGER ENTRIES DO NOT CHECK OUT\n",
                    self.job.job_id
                ));
                for p in &self.problems {
                    s.push_str(&format!("  {p}\n"));
                }
            }
        }
        for c in &self.own_checkpoints {
            s.push_str(&format!(
                "your checkpoint at entry {} (signed by {:?}, {}): the ledger since only grew (consistency proven)\n",
                c.checkpoint.seq,
                c.signer,
                c.trust_label()
            ));
        }
        if self.unproven > 0 {
            s.push_str(&format!(
                "{} newer entries of the job are not under a signed checkpoint yet: run again after the next one\n",
                self.unproven
            ));
        }
        s.push_str(&self.job.to_text());
        s
    }
}

/// Entries proven per call.
const PAGE: u32 = 500;

/// Proves `options.job`'s ledger entries against the latest signed
/// checkpoint, and that checkpoint against the caller's own.
pub async fn prove(remote: &Remote, options: ProveOptions) -> anyhow::Result<ProofReport> {
    let ProveOptions {
        job,
        hold:
            CheckpointHold {
                trust_anchors,
                require_signed,
                own_checkpoints,
            },
        save_checkpoint,
    } = options;
    let mut problems = Vec::new();
    let mut page = proofs_page(remote, &job, 0, 0).await?;
    let unproven = page.unproven;
    let Some(served) = page.checkpoint.take() else {
        anyhow::bail!("the coordinator sent no checkpoint with the proofs");
    };
    let (served, signature) = checkpoint_of(served);
    let root = match served.root.as_deref().map(merkle::from_hex) {
        Some(Ok(root)) => Some(root),
        Some(Err(e)) => {
            problems.push(format!("the checkpoint's root: {e}"));
            None
        }
        None => {
            problems.push(format!(
                "the checkpoint at entry {} has no Merkle root to prove against",
                served.seq
            ));
            None
        }
    };
    let checkpoint = check_checkpoint(
        served.clone(),
        &signature,
        trust_anchors.as_deref(),
        &mut problems,
    );
    if require_signed && checkpoint.as_ref().and_then(|c| c.trusted) != Some(true) {
        problems.push(
            "--require-signed: the checkpoint is not signed by a certificate under the trust anchors"
                .into(),
        );
    }
    let mut tally = JobTally::new(&job);
    let mut proven = 0;
    while let Some(last) = page.proofs.last().and_then(|p| p.entry.as_ref()) {
        let after = last.seq;
        for p in std::mem::take(&mut page.proofs) {
            let Some(e) = p.entry.map(sealed) else {
                continue;
            };
            if e.job_id != job {
                problems.push(format!(
                    "ledger entry {} ({} of {}) belongs to job {:?}, not {job}",
                    e.seq, e.kind, e.subject, e.job_id
                ));
                continue;
            }
            if let Some(root) = &root
                && let Err(problem) = check_entry(&e, &p.path, served.seq, root)
            {
                problems.push(problem);
                continue;
            }
            tally.push(&e);
            proven += 1;
        }
        page = proofs_page(remote, &job, after, served.seq).await?;
    }
    let own = hold_to_own_checkpoints(
        remote,
        &served,
        own_checkpoints,
        trust_anchors.as_deref(),
        &mut problems,
    )
    .await?;
    let job_audit = tally.finish(remote, unproven > 0, &mut problems).await?;
    if let (Some(file), Some(_), true) = (&save_checkpoint, &checkpoint, problems.is_empty()) {
        save(file, &served, &signature)?;
    }
    Ok(ProofReport {
        proven,
        unproven,
        checkpoint,
        own_checkpoints: own,
        job: job_audit,
        problems,
    })
}

/// Checks one proven entry here: it hashes to its recorded hash from its
/// own fields, and its Merkle `path` leads from its leaf to `root`, the
/// signed root of the ledger's first `size` entries. The problem, naming
/// the entry, when not.
pub(crate) fn check_entry(
    e: &SealedEntry,
    path: &[Vec<u8>],
    size: u64,
    root: &Hash,
) -> Result<(), String> {
    let says = format!("ledger entry {} ({} of {})", e.seq, e.kind, e.subject);
    if entry_hash(e.seq, &e.prev_hash, &e.fields()) != e.hash {
        return Err(format!(
            "{says} does not hash to its recorded {}: its contents were changed after it was sealed",
            e.hash
        ));
    }
    let path: Result<Vec<Hash>, _> = path.iter().map(|h| Hash::try_from(h.as_slice())).collect();
    let leads_to = match (merkle::leaf_of_hex(&e.hash), path) {
        (Ok(leaf), Ok(path)) if e.seq >= 1 => {
            merkle::root_from_inclusion(e.seq - 1, size, &leaf, &path)
        }
        _ => None,
    };
    if leads_to.as_ref() != Some(root) {
        return Err(format!(
            "{says} is not in the ledger the checkpoint at entry {size} signs: its Merkle path leads elsewhere"
        ));
    }
    Ok(())
}

/// Holds the served checkpoint to each the caller kept: whichever is
/// older must be a prefix of the other (a consistency proof from the
/// coordinator, checked here against the two signed roots).
async fn hold_to_own_checkpoints(
    remote: &Remote,
    served: &Checkpoint,
    own: Vec<(String, Checkpoint, Vec<u8>)>,
    trust_anchors: Option<&str>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Vec<SignedCheckpoint>> {
    let mut held = Vec::new();
    for (file, kept, signature) in own {
        let before = problems.len();
        let Some(signed) = check_checkpoint(kept.clone(), &signature, trust_anchors, problems)
        else {
            prefix(&mut problems[before..], &file);
            continue;
        };
        let (Some(kept_root), Some(served_root)) = (&kept.root, &served.root) else {
            problems.push(format!(
                "{file}: the checkpoint at entry {} was signed before the ledger had a Merkle tree; `hallmark audit verify --checkpoint` holds the whole chain to it instead",
                kept.seq
            ));
            continue;
        };
        let ((old, old_root), (new, new_root)) = if kept.seq <= served.seq {
            ((&kept, kept_root), (served, served_root))
        } else {
            ((served, served_root), (&kept, kept_root))
        };
        let consistent = if old.seq == new.seq {
            old_root == new_root
        } else {
            let proof = remote
                .provenance
                .clone()
                .prove_consistency(ConsistencyRequest {
                    old_size: old.seq,
                    new_size: new.seq,
                })
                .await
                .map_err(rpc)
                .with_context(|| {
                    format!(
                        "asking for the proof that the ledger at entry {} is a prefix of the one at {}",
                        old.seq, new.seq
                    )
                })?
                .into_inner();
            let path: Option<Vec<Hash>> = proof
                .path
                .iter()
                .map(|h| Hash::try_from(h.as_slice()).ok())
                .collect();
            match (merkle::from_hex(old_root), merkle::from_hex(new_root), path) {
                (Ok(o), Ok(n), Some(path)) => {
                    merkle::verify_consistency(old.seq, new.seq, &o, &n, &path)
                }
                _ => false,
            }
        };
        if consistent {
            held.push(signed);
        } else {
            problems.push(format!(
                "{file}: the ledger signed at entry {} is not a prefix of the one signed at entry {}: entries up to {} were changed or removed between them",
                old.seq, new.seq, old.seq
            ));
        }
    }
    Ok(held)
}

/// Names `file` in each of `problems` (those about a checkpoint copy).
pub(super) fn prefix(problems: &mut [String], file: &str) {
    for p in problems {
        *p = format!("{file}: {p}");
    }
}

/// Writes the checkpoint as the blob store publishes it, whole or not at all.
fn save(file: &std::path::Path, c: &Checkpoint, signature: &[u8]) -> anyhow::Result<()> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("--save-checkpoint {}", file.display()))?;
    std::io::Write::write_all(&mut tmp, &c.to_published(signature))?;
    tmp.persist(file)
        .with_context(|| format!("--save-checkpoint {}", file.display()))?;
    Ok(())
}

/// One page of the job's proofs after entry `after`, against the
/// checkpoint at `checkpoint_seq` (0: the latest).
async fn proofs_page(
    remote: &Remote,
    job: &str,
    after: u64,
    checkpoint_seq: u64,
) -> anyhow::Result<EntryProofs> {
    Ok(remote
        .provenance
        .clone()
        .prove_entries(ProveEntriesRequest {
            job_id: job.to_string(),
            after_seq: after,
            limit: PAGE,
            checkpoint_seq,
        })
        .await
        .map_err(rpc)
        .with_context(|| format!("asking for the proofs of job {job}'s ledger entries"))?
        .into_inner())
}
