//! `hallmark audit`: reads the coordinator's audit ledger and checks it here.
//!
//! `verify` walks the whole chain from its first entry and re-hashes every
//! entry on this machine ([`hallmark_provenance::ledger::ChainCheck`]), so
//! a coordinator — or anyone with write access to its database — cannot
//! vouch for itself. Anchors (`SEQ:HASH` pairs printed by an earlier run)
//! catch a chain recomputed from scratch. With `--job`, the job's artifact
//! rows are also held against the completions the ledger recorded.

use std::collections::HashMap;

use anyhow::Context;
use hallmark_proto::v1::{LedgerEntry, LedgerRequest};
use hallmark_provenance::ledger::{Anchor, ChainCheck, SealedEntry};
use serde_json::json;

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
}

/// A job's records held against its ledger entries.
#[derive(Debug, Clone, Default)]
pub struct JobAudit {
    pub job_id: String,
    pub submitted: bool,
    pub dispatches: u64,
    pub completions: u64,
    pub artifacts: u64,
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
            "job": self.job.as_ref().map(|j| json!({
                "job_id": j.job_id,
                "submitted": j.submitted,
                "dispatches": j.dispatches,
                "completions": j.completions,
                "artifacts": j.artifacts,
            })),
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
        if self.unsealed > 0 {
            s.push_str(&format!(
                "{} newer entries wait to be sealed (the coordinator seals every reap interval)\n",
                self.unsealed
            ));
        }
        if let Some(j) = &self.job {
            s.push_str(&format!(
                "job {}: submission {}, {} dispatches, {} completions, {} artifacts\n",
                j.job_id,
                if j.submitted { "recorded" } else { "MISSING" },
                j.dispatches,
                j.completions,
                j.artifacts
            ));
        }
        s
    }
}

fn sealed(e: LedgerEntry) -> SealedEntry {
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

/// Walks and checks the whole chain; with `job`, also checks that job's
/// artifacts against the completions recorded for it.
pub async fn verify(
    remote: &Remote,
    anchors: Vec<Anchor>,
    job: Option<&str>,
) -> anyhow::Result<LedgerReport> {
    let mut check = ChainCheck::new(anchors);
    let mut problems = Vec::new();
    let mut after = 0;
    let mut entries = 0;
    let mut unsealed;
    let mut audit = job.map(|j| JobAudit {
        job_id: j.to_string(),
        ..Default::default()
    });
    // task id -> sha256 its completion recorded.
    let mut completed: HashMap<String, String> = HashMap::new();
    'pages: loop {
        let page = remote
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
            .into_inner();
        unsealed = page.unsealed;
        if page.entries.is_empty() {
            break;
        }
        for e in page.entries {
            let e = sealed(e);
            after = e.seq;
            if let Err(fault) = check.push(&e) {
                problems.push(fault.to_string());
                break 'pages;
            }
            entries += 1;
            if let Some(a) = audit.as_mut().filter(|a| a.job_id == e.job_id) {
                match e.kind.as_str() {
                    "submit" => a.submitted = true,
                    "dispatch" => a.dispatches += 1,
                    "complete" => {
                        a.completions += 1;
                        let sha = serde_json::from_str::<serde_json::Value>(&e.body)
                            .ok()
                            .and_then(|b| b["sha256"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        completed.insert(e.subject.clone(), sha);
                    }
                    _ => {}
                }
            }
        }
    }
    if problems.is_empty()
        && let Err(fault) = check.finish()
    {
        problems.push(fault.to_string());
    }
    if let Some(a) = audit.as_mut() {
        if !a.submitted {
            problems.push(format!(
                "job {}: the ledger has no submission for it",
                a.job_id
            ));
        }
        let artifacts = remote.artifacts(&a.job_id).await?;
        a.artifacts = artifacts.len() as u64;
        for art in &artifacts {
            match completed.remove(&art.task_id) {
                Some(sha) if sha == art.sha256 => {}
                Some(sha) => problems.push(format!(
                    "task {}: its artifact is {}, but the ledger recorded the completion of {sha}",
                    art.task_id, art.sha256
                )),
                None => problems.push(format!(
                    "task {}: artifact {} has no completion in the ledger",
                    art.task_id, art.sha256
                )),
            }
        }
        let mut orphans: Vec<_> = completed.into_iter().collect();
        orphans.sort();
        for (task, sha) in orphans {
            problems.push(format!(
                "task {task}: the ledger recorded its completion with {sha}, but the job has no such artifact"
            ));
        }
    }
    Ok(LedgerReport {
        entries,
        head: check.head(),
        unsealed,
        problems,
        job: audit,
    })
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
