//! `hallmark audit`: reads the coordinator's audit ledger and checks it here.
//!
//! `verify` walks the whole chain from its first entry and re-hashes every
//! entry on this machine ([`hallmark_provenance::ledger::ChainCheck`]), so
//! a coordinator — or anyone with write access to its database — cannot
//! vouch for itself. Anchors (`SEQ:HASH` pairs printed by an earlier run)
//! catch a chain recomputed from scratch. With `--job`, the job's artifact
//! rows are also held against the completions the ledger recorded.

mod prove;

use std::collections::HashMap;

use anyhow::Context;
use hallmark_proto::v1::{
    CheckLedgerTreeRequest, LedgerCheckpoint, LedgerEntry, LedgerPage, LedgerRequest,
    LedgerTreeCheck,
};
use hallmark_provenance::credentials::detached::verify_detached;
use hallmark_provenance::ledger::{Anchor, ChainCheck, Checkpoint, LedgerFault, SealedEntry};
use hallmark_provenance::merkle::{self, Frontier};
use serde_json::json;

pub(crate) use prove::check_entry;
pub use prove::{ProofReport, ProveOptions, prove};

use crate::remote::{Remote, rpc};

/// Entries fetched per call.
const PAGE: u32 = 5000;

/// What `hallmark audit verify` found.
#[derive(Debug, Clone)]
pub struct LedgerReport {
    /// Entries checked.
    pub entries: u64,
    /// The last entry checked: record it as an anchor for later runs.
    pub head: Anchor,
    /// Entries recorded but not yet sealed into the chain.
    pub unsealed: u64,
    /// Where the chain or the job's records do not check out (empty: intact).
    pub problems: Vec<String>,
    /// The `--job` cross-check, when asked for.
    pub job: Option<JobAudit>,
    /// The coordinator's latest signed checkpoint, its signature checked here.
    pub checkpoint: Option<SignedCheckpoint>,
    /// The auditor's own copies of published checkpoints (`--checkpoint`)
    /// whose signatures verified: the chain was held to each.
    pub own_checkpoints: Vec<SignedCheckpoint>,
}

/// A checkpoint whose signature verified: the chain was held to it.
#[derive(Debug, Clone)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    /// The signing certificate's organization.
    pub signer: String,
    /// Whether the signer chains to the trust anchors (`None`: none given).
    pub trusted: Option<bool>,
    /// When a time-stamp authority saw the signature (ms), if one did.
    pub timestamp_ms: Option<i64>,
    /// Whether that authority chains to the trust anchors (`None`: no
    /// time-stamp, or no anchors given).
    pub timestamp_trusted: Option<bool>,
}

impl SignedCheckpoint {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "seq": self.checkpoint.seq,
            "hash": self.checkpoint.hash,
            "at_ms": self.checkpoint.at_ms,
            "root": self.checkpoint.root,
            "signer": self.signer,
            "trusted": self.trusted,
            "timestamp": self.timestamp_ms.map(hallmark_coordinator::auth::format_time_ms),
            "timestamp_trusted": self.timestamp_trusted,
        })
    }

    /// What the report says of the signer's standing.
    fn trust_label(&self) -> &'static str {
        match self.trusted {
            Some(true) => "trusted",
            Some(false) => "NOT under the trust anchors",
            None => "signer not checked: no trust anchors",
        }
    }
}

/// A job's records held against its ledger entries.
#[derive(Debug, Clone, Default)]
pub struct JobAudit {
    pub job_id: String,
    pub submitted: bool,
    pub dispatches: u64,
    pub completions: u64,
    pub artifacts: u64,
    /// Artifacts whose completion is not among the entries checked yet
    /// (sealed after the checkpoint proven against); not a fault.
    pub awaiting: u64,
}

impl JobAudit {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "job_id": self.job_id,
            "submitted": self.submitted,
            "dispatches": self.dispatches,
            "completions": self.completions,
            "artifacts": self.artifacts,
            "awaiting": self.awaiting,
        })
    }

    fn to_text(&self) -> String {
        let mut s = format!(
            "job {}: submission {}, {} dispatches, {} completions, {} artifacts\n",
            self.job_id,
            if self.submitted {
                "recorded"
            } else {
                "MISSING"
            },
            self.dispatches,
            self.completions,
            self.artifacts
        );
        if self.awaiting > 0 {
            s.push_str(&format!(
                "  {} artifacts' completions are newer than the checkpoint: run again after the next one\n",
                self.awaiting
            ));
        }
        s
    }
}

/// A job's ledger entries, counted as they are checked, then held against
/// the job's artifacts: each must have the completion that recorded its
/// sha256, and each recorded completion its artifact.
struct JobTally {
    audit: JobAudit,
    /// task id -> the sha256 its completion recorded.
    completed: HashMap<String, String>,
}

impl JobTally {
    fn new(job_id: &str) -> Self {
        Self {
            audit: JobAudit {
                job_id: job_id.to_string(),
                ..Default::default()
            },
            completed: HashMap::new(),
        }
    }

    /// Counts `e` if it is the job's.
    fn push(&mut self, e: &SealedEntry) {
        if e.job_id != self.audit.job_id {
            return;
        }
        match e.kind.as_str() {
            "submit" => self.audit.submitted = true,
            "dispatch" => self.audit.dispatches += 1,
            "complete" => {
                self.audit.completions += 1;
                let sha = serde_json::from_str::<serde_json::Value>(&e.body)
                    .ok()
                    .and_then(|b| b["sha256"].as_str().map(str::to_string))
                    .unwrap_or_default();
                self.completed.insert(e.subject.clone(), sha);
            }
            _ => {}
        }
    }

    /// Holds the job's artifacts against the completions counted. With
    /// `newer_entries`, some of the job's entries were not checked (newer
    /// than the checkpoint): an artifact without a checked completion is
    /// then awaited, not a fault.
    async fn finish(
        mut self,
        remote: &Remote,
        newer_entries: bool,
        problems: &mut Vec<String>,
    ) -> anyhow::Result<JobAudit> {
        let a = &mut self.audit;
        if !a.submitted {
            problems.push(format!(
                "job {}: the ledger has no submission for it",
                a.job_id
            ));
        }
        let artifacts = remote.artifacts(&a.job_id).await?;
        a.artifacts = artifacts.len() as u64;
        for art in &artifacts {
            match self.completed.remove(&art.task_id) {
                Some(sha) if sha == art.sha256 => {}
                Some(sha) => problems.push(format!(
                    "task {}: its artifact is {}, but the ledger recorded the completion of {sha}",
                    art.task_id, art.sha256
                )),
                None if newer_entries => a.awaiting += 1,
                None => problems.push(format!(
                    "task {}: artifact {} has no completion in the ledger",
                    art.task_id, art.sha256
                )),
            }
        }
        let mut orphans: Vec<_> = self.completed.into_iter().collect();
        orphans.sort();
        for (task, sha) in orphans {
            problems.push(format!(
                "task {task}: the ledger recorded its completion with {sha}, but the job has no such artifact"
            ));
        }
        Ok(self.audit)
    }
}

impl LedgerReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "ok": self.ok(),
            "entries": self.entries,
            "head": format!("{}:{}", self.head.seq, self.head.hash),
            "unsealed": self.unsealed,
            "problems": self.problems,
            "checkpoint": self.checkpoint.as_ref().map(SignedCheckpoint::to_json),
            "own_checkpoints": self.own_checkpoints.iter().map(SignedCheckpoint::to_json).collect::<Vec<_>>(),
            "job": self.job.as_ref().map(JobAudit::to_json),
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if self.ok() {
            s.push_str(&format!(
                "audit ledger intact: {} entries, every hash and link recomputed here\n",
                self.entries
            ));
        } else {
            s.push_str("AUDIT LEDGER DOES NOT CHECK OUT\n");
            for p in &self.problems {
                s.push_str(&format!("  {p}\n"));
            }
        }
        s.push_str(&format!(
            "head: {}:{}\n  (keep it; `hallmark audit verify --anchor {}:{}` later proves the chain was not rewritten)\n",
            self.head.seq, self.head.hash, self.head.seq, self.head.hash
        ));
        match &self.checkpoint {
            Some(c) => {
                s.push_str(&format!(
                    "signed checkpoint: entry {} at {} by {:?} ({}); the chain passes through it\n",
                    c.checkpoint.seq,
                    hallmark_coordinator::auth::format_time_ms(c.checkpoint.at_ms),
                    c.signer,
                    c.trust_label()
                ));
                if let Some(at) = c.timestamp_ms {
                    s.push_str(&format!(
                        "  time-stamped by its authority at {} ({})\n",
                        hallmark_coordinator::auth::format_time_ms(at),
                        match c.timestamp_trusted {
                            Some(true) => "authority trusted",
                            Some(false) => "authority NOT under the trust anchors",
                            None => "authority not checked: no trust anchors",
                        }
                    ));
                }
                if self.head.seq > c.checkpoint.seq {
                    s.push_str(&format!(
                        "{} entries after it are hash-chained, not yet signed\n",
                        self.head.seq - c.checkpoint.seq
                    ));
                }
            }
            None => s.push_str(
                "no signed checkpoint: the coordinator signs none (signing_cert_chain unset) or has not yet\n",
            ),
        }
        for c in &self.own_checkpoints {
            s.push_str(&format!(
                "your checkpoint copy: entry {} signed by {:?} ({}); held to it\n",
                c.checkpoint.seq,
                c.signer,
                c.trust_label()
            ));
        }
        if self.unsealed > 0 {
            s.push_str(&format!(
                "{} newer entries wait to be sealed (the coordinator seals every reap interval)\n",
                self.unsealed
            ));
        }
        if let Some(j) = &self.job {
            s.push_str(&j.to_text());
        }
        s
    }
}

/// A checkpoint as the coordinator sent it, and its signature.
pub(crate) fn checkpoint_of(c: LedgerCheckpoint) -> (Checkpoint, Vec<u8>) {
    (
        Checkpoint {
            seq: c.seq,
            hash: c.hash,
            at_ms: c.at_ms,
            root: Some(c.root).filter(|r| !r.is_empty()),
        },
        c.signature,
    )
}

pub(crate) fn sealed(e: LedgerEntry) -> SealedEntry {
    SealedEntry {
        seq: e.seq,
        at_ms: e.at_ms,
        kind: e.kind,
        job_id: e.job_id,
        subject: e.subject,
        actor: e.actor,
        body: e.body,
        prev_hash: e.prev_hash,
        hash: e.hash,
    }
}

/// What `hallmark audit verify` holds the chain to.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// `SEQ:HASH` points recorded earlier.
    pub anchors: Vec<Anchor>,
    /// Also check this job's artifacts against its recorded completions.
    pub job: Option<String>,
    pub hold: CheckpointHold,
}

/// What `verify` and `prove` hold the ledger's signed checkpoints to.
#[derive(Debug, Clone, Default)]
pub struct CheckpointHold {
    /// PEM roots the checkpoint's signer must chain to.
    pub trust_anchors: Option<String>,
    /// A trusted signed checkpoint is required.
    pub require_signed: bool,
    /// Published checkpoints the auditor holds (copies of the blob store's
    /// `ledger-checkpoints/`, or ones `prove --save-checkpoint` kept), each
    /// with the file it came from.
    pub own_checkpoints: Vec<(String, Checkpoint, Vec<u8>)>,
}

/// Checks the checkpoint's signature; a valid one becomes an anchor the
/// chain must pass through.
pub(crate) fn check_checkpoint(
    checkpoint: Checkpoint,
    signature: &[u8],
    trust_anchors: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<SignedCheckpoint> {
    match verify_detached(signature, &checkpoint.payload(), trust_anchors) {
        Ok(v) => {
            if v.trusted == Some(false) {
                problems.push(format!(
                    "the checkpoint at entry {} is signed by {:?}, whose certificate does not chain to the trust anchors",
                    checkpoint.seq, v.signer
                ));
            }
            if v.timestamp_trusted == Some(false) {
                problems.push(format!(
                    "the checkpoint at entry {} carries a time-stamp from an authority whose certificate does not chain to the trust anchors (add the authority's root to them if you trust it)",
                    checkpoint.seq
                ));
            }
            if let Some(at) = v.timestamp_ms
                && !checkpoint.agrees_with_timestamp(at)
            {
                problems.push(format!(
                    "the checkpoint at entry {} says it was signed at {}, but its time-stamp authority saw the signature at {}",
                    checkpoint.seq,
                    hallmark_coordinator::auth::format_time_ms(checkpoint.at_ms),
                    hallmark_coordinator::auth::format_time_ms(at)
                ));
            }
            Some(SignedCheckpoint {
                checkpoint,
                signer: v.signer,
                trusted: v.trusted,
                timestamp_ms: v.timestamp_ms,
                timestamp_trusted: v.timestamp_trusted,
            })
        }
        Err(e) => {
            problems.push(format!(
                "the checkpoint at entry {} ({}) does not verify: {e}",
                checkpoint.seq, checkpoint.hash
            ));
            None
        }
    }
}

/// Reads published checkpoint files (`--checkpoint`); one that cannot be
/// read or parsed is an error naming it.
pub fn read_checkpoints(
    files: &[std::path::PathBuf],
) -> anyhow::Result<Vec<(String, Checkpoint, Vec<u8>)>> {
    files
        .iter()
        .map(|f| {
            let shown = f.display().to_string();
            let bytes = std::fs::read(f).with_context(|| format!("--checkpoint {shown}"))?;
            let (c, signature) = Checkpoint::from_published(&bytes)
                .map_err(|e| anyhow::anyhow!("--checkpoint {shown}: {e}"))?;
            Ok((shown, c, signature))
        })
        .collect()
}

/// Walks and checks the whole chain, held to the anchors and the latest
/// signed checkpoint; with a job, also checks that job's artifacts against
/// the completions recorded for it.
pub async fn verify(remote: &Remote, options: VerifyOptions) -> anyhow::Result<LedgerReport> {
    let VerifyOptions {
        mut anchors,
        job,
        hold:
            CheckpointHold {
                trust_anchors,
                require_signed,
                own_checkpoints,
            },
    } = options;
    let job = job.as_deref();
    let mut problems = Vec::new();
    // Every page names the latest checkpoint; the first one's is held to.
    let mut page = chain_page(remote, 0).await?;
    let checkpoint = page.checkpoint.take().and_then(|c| {
        let (checkpoint, signature) = checkpoint_of(c);
        check_checkpoint(
            checkpoint,
            &signature,
            trust_anchors.as_deref(),
            &mut problems,
        )
    });
    let mut own = Vec::new();
    for (file, c, signature) in own_checkpoints {
        let before = problems.len();
        if let Some(c) = check_checkpoint(c, &signature, trust_anchors.as_deref(), &mut problems) {
            own.push(c);
        }
        prove::prefix(&mut problems[before..], &file);
    }
    let signed: Vec<&SignedCheckpoint> = checkpoint.iter().chain(&own).collect();
    anchors.extend(signed.iter().map(|c| c.checkpoint.anchor()));
    if require_signed && !signed.iter().any(|c| c.trusted == Some(true)) {
        problems.push(
            "--require-signed: the ledger has no checkpoint signed by a trusted certificate".into(),
        );
    }
    let mut check = ChainCheck::new(anchors);
    let mut broken = false;
    let mut after = 0;
    let mut entries = 0;
    let mut unsealed;
    let mut tally = job.map(JobTally::new);
    // The Merkle roots the signed checkpoints vouch for, held to the tree
    // the entries build as they are walked.
    let roots: HashMap<u64, &str> = signed
        .iter()
        .filter_map(|c| Some((c.checkpoint.seq, c.checkpoint.root.as_deref()?)))
        .collect();
    let mut tree = Frontier::default();
    'pages: loop {
        unsealed = page.unsealed;
        if page.entries.is_empty() {
            break;
        }
        for e in page.entries {
            let e = sealed(e);
            after = e.seq;
            if let Err(fault) = check.push(&e) {
                problems.push(explain(&fault, &signed));
                broken = true;
                break 'pages;
            }
            entries += 1;
            match merkle::leaf_of_hex(&e.hash) {
                Ok(leaf) => {
                    tree.push(leaf);
                }
                Err(err) => problems.push(format!("ledger entry {}: {err}", e.seq)),
            }
            if let Some(root) = roots.get(&e.seq)
                && tree.root().map(|r| merkle::to_hex(&r)).as_deref() != Some(*root)
            {
                problems.push(format!(
                    "the checkpoint at entry {} signs the Merkle root {root}, but the entries up to it lead to another: the proofs it serves would not hold",
                    e.seq
                ));
            }
            if let Some(t) = tally.as_mut() {
                t.push(&e);
            }
        }
        page = chain_page(remote, after).await?;
    }
    if !broken && let Err(fault) = check.finish() {
        problems.push(explain(&fault, &signed));
    }
    let audit = match tally {
        Some(t) => Some(t.finish(remote, false, &mut problems).await?),
        None => None,
    };
    Ok(LedgerReport {
        entries,
        head: check.head(),
        unsealed,
        problems,
        job: audit,
        checkpoint,
        own_checkpoints: own,
    })
}

/// The page of the whole chain after entry `after`.
async fn chain_page(remote: &Remote, after: u64) -> anyhow::Result<LedgerPage> {
    Ok(remote
        .provenance
        .clone()
        .ledger(LedgerRequest {
            after_seq: after,
            limit: PAGE,
            job_id: String::new(),
        })
        .await
        .map_err(rpc)
        .context("reading the audit ledger")?
        .into_inner())
}

/// A chain fault, said in terms of the signed checkpoint when it is the
/// anchor that broke.
fn explain(fault: &LedgerFault, signed: &[&SignedCheckpoint]) -> String {
    let signed_at = |seq: u64| signed.iter().map(|c| &c.checkpoint).find(|c| c.seq == seq);
    match fault {
        LedgerFault::AnchorMismatch { seq, actual, .. } if let Some(c) = signed_at(*seq) => {
            format!(
                "ledger entry {seq} now hashes to {actual}, but the coordinator signed {} for it at {}: the ledger was rewritten after it was signed",
                c.hash,
                hallmark_coordinator::auth::format_time_ms(c.at_ms)
            )
        }
        LedgerFault::AnchorMissing { seq, head, .. } if signed_at(*seq).is_some() => format!(
            "the coordinator signed a checkpoint at entry {seq}, but the chain ends at {head}: entries were removed after it was signed"
        ),
        other => other.to_string(),
    }
}

/// Prints ledger entries after `after`, `job`'s only when given.
pub async fn log(
    remote: &Remote,
    job: Option<&str>,
    after: u64,
    limit: u32,
    json_out: bool,
) -> anyhow::Result<()> {
    let page = remote
        .provenance
        .clone()
        .ledger(LedgerRequest {
            after_seq: after,
            limit,
            job_id: job.unwrap_or_default().to_string(),
        })
        .await
        .map_err(rpc)
        .context("reading the audit ledger")?
        .into_inner();
    for e in page.entries {
        if json_out {
            println!(
                "{}",
                json!({
                    "seq": e.seq,
                    "at_ms": e.at_ms,
                    "kind": e.kind,
                    "job_id": e.job_id,
                    "subject": e.subject,
                    "actor": e.actor,
                    "body": serde_json::from_str::<serde_json::Value>(&e.body)
                        .unwrap_or(serde_json::Value::String(e.body.clone())),
                    "hash": e.hash,
                })
            );
        } else {
            println!(
                "{:>7} {} {:<16} {:<28} {:<20} {}",
                e.seq,
                crate::output::utc(e.at_ms),
                e.kind,
                e.subject,
                e.actor,
                e.body
            );
        }
    }
    if !json_out && page.unsealed > 0 {
        println!("({} newer entries not sealed yet)", page.unsealed);
    }
    Ok(())
}

/// What `hallmark audit check-tree` found: the coordinator's stored Merkle
/// tree held to the one its chain leads to.
#[derive(Debug, Clone)]
pub struct TreeReport(pub LedgerTreeCheck);

impl TreeReport {
    /// The stored tree is the rebuilt one, or was made so.
    pub fn ok(&self) -> bool {
        self.differing() == 0 || self.0.repaired
    }

    fn differing(&self) -> u64 {
        self.0.wrong + self.0.missing + self.0.extra
    }

    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.0;
        json!({
            "ok": self.ok(),
            "entries": c.entries,
            "nodes": c.nodes,
            "wrong": c.wrong,
            "missing": c.missing,
            "extra": c.extra,
            "examples": c.examples,
            "root": c.root,
            "held_seq": c.held_seq,
            "unheld": c.unheld,
            "repaired": c.repaired,
        })
    }

    pub fn to_text(&self) -> String {
        let c = &self.0;
        let mut out = format!(
            "ledger tree: {} entries, {} nodes rebuilt from the chain; {} wrong, {} missing, {} beyond the tree\n",
            c.entries, c.nodes, c.wrong, c.missing, c.extra
        );
        for e in &c.examples {
            out.push_str(&format!("  {e}\n"));
        }
        if self.differing() > c.examples.len() as u64 {
            out.push_str(&format!(
                "  … and {} more\n",
                self.differing() - c.examples.len() as u64
            ));
        }
        if !c.root.is_empty() {
            out.push_str(&format!("root: {}\n", c.root));
        }
        if c.held_seq > 0 {
            out.push_str(&format!(
                "held to the checkpoint signed at entry {}: the chain leads to its hash and root\n",
                c.held_seq
            ));
        } else if !c.unheld.is_empty() {
            out.push_str(&format!("note: {}\n", c.unheld));
        }
        out.push_str(match (self.differing(), c.repaired) {
            (0, _) => "intact: the stored tree is the one the chain leads to\n",
            (_, true) => "repaired: the stored tree is now the one the chain leads to\n",
            _ => "NOT INTACT: proofs served from the stored tree may not check out; `--repair` rewrites it from the chain\n",
        });
        out
    }
}

/// Asks the coordinator to hold its stored Merkle tree to the one its
/// chain leads to (and, with `repair`, to rewrite what differs).
pub async fn check_tree(remote: &Remote, repair: bool) -> anyhow::Result<TreeReport> {
    let check = remote
        .provenance
        .clone()
        .check_ledger_tree(CheckLedgerTreeRequest { repair })
        .await
        .map_err(rpc)
        .context("checking the audit ledger's Merkle tree")?
        .into_inner();
    Ok(TreeReport(check))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hallmark_provenance::credentials::ca;
    use hallmark_provenance::credentials::detached::sign_detached;
    use hallmark_provenance::credentials::{SigningAlgorithm, local_tsa};

    #[test]
    fn a_checkpoint_time_stamped_by_an_untrusted_authority_does_not_check_out() {
        let dir = tempfile::tempdir().unwrap();
        let ours = ca::init(&dir.path().join("ours"), "Ours", SigningAlgorithm::Es256).unwrap();
        let theirs = ca::init(
            &dir.path().join("theirs"),
            "Theirs",
            SigningAlgorithm::Es256,
        )
        .unwrap();
        let tsa = local_tsa::start(&theirs, "Theirs", &dir.path().join("tsa")).unwrap();
        let identity = ours.identity(Some(tsa)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let checkpoint = Checkpoint {
            seq: 9,
            hash: "ab".repeat(32),
            at_ms: now,
            root: None,
        };
        let signature = sign_detached(&identity, &checkpoint.payload()).unwrap();
        let anchors = |cas: &[&ca::CaFiles]| {
            cas.iter()
                .map(|c| c.trust_anchors().unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        };

        let mut problems = Vec::new();
        let signed = check_checkpoint(
            checkpoint.clone(),
            &signature,
            Some(&anchors(&[&ours])),
            &mut problems,
        )
        .unwrap();
        assert_eq!(signed.trusted, Some(true));
        assert_eq!(signed.timestamp_trusted, Some(false));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("entry 9 carries a time-stamp from an authority"),
            "{problems:?}"
        );

        let mut problems = Vec::new();
        let signed = check_checkpoint(
            checkpoint,
            &signature,
            Some(&anchors(&[&ours, &theirs])),
            &mut problems,
        )
        .unwrap();
        assert_eq!(signed.timestamp_trusted, Some(true));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(signed.to_json()["timestamp_trusted"], true);
    }
}
