//! `hallmark.v1.Provenance`: the manifest repository. A watermark id or an
//! image's sha256 resolves to the manifest it was signed with and its
//! lineage: training datasets → model → job → base image → upscaled image.

use std::sync::Arc;

use hallmark_proto::v1::provenance_server::Provenance;
use hallmark_proto::v1::resolve_request::Key;
use hallmark_proto::v1::{
    CheckLedgerTreeRequest, ConsistencyProof, ConsistencyRequest, EntryProof, EntryProofs,
    LedgerCheckpoint, LedgerEntry, LedgerPage, LedgerRequest, LedgerTreeCheck,
    ProveArtifactRequest, ProveEntriesRequest, ResolveRequest, ResolveResponse,
};
use hallmark_provenance::ledger::{Checkpoint, SealedEntry};
use tonic::{Request, Response, Status};

use super::{Coordinator, status};
use crate::auth::{Caller, PrivateView};
use crate::store::{ArtifactKey, StoreError, audit_kind};

pub struct ProvenanceService(pub Arc<Coordinator>);

/// Deepest ancestry followed (a job has at most a few stages).
const MAX_CHAIN: usize = 8;

/// Ledger entries per page, by default and at most.
const LEDGER_PAGE: u32 = 1000;
const LEDGER_PAGE_MAX: u32 = 10_000;
/// Entries proven per page, by default and at most (each proof is about
/// log₂ n hashes).
const PROOF_PAGE: u32 = 500;
const PROOF_PAGE_MAX: u32 = 2000;

/// Lookups shared by the gRPC service and the HTTP soft-binding API.
pub trait Resolution {
    /// The manifest and lineage of the artifact under `key`; the prompt only
    /// where `view` shows the owning tenant's private fields.
    fn resolve(
        &self,
        key: ArtifactKey<'_>,
        view: &PrivateView,
    ) -> impl Future<Output = Result<Option<ResolveResponse>, StoreError>> + Send;
}

impl Resolution for Coordinator {
    async fn resolve(
        &self,
        key: ArtifactKey<'_>,
        view: &PrivateView,
    ) -> Result<Option<ResolveResponse>, StoreError> {
        let Some(found) = self.store.find_artifact(key).await? else {
            return Ok(None);
        };
        let mut chain = vec![found.record.clone()];
        while chain.len() < MAX_CHAIN {
            let parent = &chain[chain.len() - 1].parent_sha256;
            if parent.is_empty() {
                break;
            }
            match self
                .store
                .find_artifact(ArtifactKey::Sha256(parent))
                .await?
            {
                Some(p) => chain.push(p.record),
                None => break,
            }
        }
        chain.reverse();
        for record in &mut chain {
            if !view.shows(&record.tenant) {
                record.prompt.clear();
            }
        }
        let model = self
            .store
            .list_models()
            .await?
            .into_iter()
            .find(|m| m.model_id == found.record.model_id);
        let datasets = match &model {
            Some(m) => self
                .store
                .list_datasets()
                .await?
                .into_iter()
                .filter(|d| {
                    m.training_datasets
                        .contains(&format!("{}@{}", d.name, d.version))
                })
                .collect(),
            None => Vec::new(),
        };
        let artifact = chain.last().cloned();
        Ok(Some(ResolveResponse {
            artifact,
            manifest: found.manifest,
            chain,
            model,
            datasets,
        }))
    }
}

#[tonic::async_trait]
impl Provenance for ProvenanceService {
    async fn resolve(
        &self,
        req: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let view = Caller::of(&req).private_view(&req.get_ref().tenant);
        let r = req.into_inner();
        let key = match &r.key {
            Some(Key::WatermarkId(id)) => {
                if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(Status::invalid_argument(format!(
                        "watermark_id {id:?} is not 16 hex digits"
                    )));
                }
                ArtifactKey::WatermarkId(id)
            }
            Some(Key::Sha256(sha)) => {
                if !hallmark_provenance::is_sha256_hex(sha) {
                    return Err(Status::invalid_argument(format!(
                        "sha256 {sha:?} is not 64 hex digits"
                    )));
                }
                ArtifactKey::Sha256(sha)
            }
            None => {
                return Err(Status::invalid_argument(
                    "give a watermark_id or a sha256 to resolve",
                ));
            }
        };
        match self.0.resolve(key, &view).await.map_err(status)? {
            Some(found) => Ok(Response::new(found)),
            None => Err(Status::not_found(match &r.key {
                Some(Key::WatermarkId(id)) => {
                    format!("watermark id {id} is not in this repository")
                }
                _ => "no artifact with that sha256 in this repository".to_string(),
            })),
        }
    }

    async fn ledger(&self, req: Request<LedgerRequest>) -> Result<Response<LedgerPage>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        // The whole chain is the operators' (it holds every tenant's
        // entries); a tenant reads its own job's entries, not to check the
        // chain but to see what was recorded about its job.
        match (&caller, r.job_id.as_str()) {
            (Caller::Tenant(_), job) if !job.is_empty() => {
                self.0.check_job_owner(&caller, job).await?;
            }
            _ => caller.require_operator("reading the whole audit ledger")?,
        }
        let limit = match r.limit {
            0 => LEDGER_PAGE,
            n => n.min(LEDGER_PAGE_MAX),
        };
        let job = Some(r.job_id.as_str()).filter(|j| !j.is_empty());
        let page = self
            .0
            .store
            .audit_page(r.after_seq, limit, job)
            .await
            .map_err(status)?;
        // Looking through the published copies lists a folder: done for
        // the first page, where an auditor starts, not for every page.
        let checkpoint = match r.after_seq {
            0 => self.0.newest_checkpoint(page.checkpoint).await,
            _ => page.checkpoint,
        };
        Ok(Response::new(LedgerPage {
            entries: page.entries.into_iter().map(ledger_entry).collect(),
            head_seq: page.head.seq,
            head_hash: page.head.hash,
            unsealed: page.unsealed,
            checkpoint: checkpoint.map(ledger_checkpoint),
        }))
    }

    async fn prove_entries(
        &self,
        req: Request<ProveEntriesRequest>,
    ) -> Result<Response<EntryProofs>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        if r.job_id.is_empty() {
            return Err(Status::invalid_argument(
                "name the job whose ledger entries to prove (job_id)",
            ));
        }
        // A tenant's own job only; another's is "not found".
        self.0.check_job_owner(&caller, &r.job_id).await?;
        let (checkpoint, signature) = self.rooted_checkpoint(r.checkpoint_seq).await?;
        let root_size = checkpoint.seq;
        let limit = match r.limit {
            0 => PROOF_PAGE,
            n => n.min(PROOF_PAGE_MAX),
        };
        let store = &self.0.store;
        let proofs = store
            .audit_inclusion_proofs(&r.job_id, None, r.after_seq, limit, root_size)
            .await
            .map_err(status)?;
        let unproven = match r.after_seq {
            0 => store
                .audit_entries_after(&r.job_id, root_size)
                .await
                .map_err(status)?,
            _ => 0,
        };
        Ok(Response::new(entry_proofs(
            checkpoint, signature, proofs, unproven,
        )))
    }

    async fn prove_artifact(
        &self,
        req: Request<ProveArtifactRequest>,
    ) -> Result<Response<EntryProofs>, Status> {
        // Whoever holds the image may resolve it, and so prove it.
        let sha256 = req.into_inner().sha256;
        if !hallmark_provenance::is_sha256_hex(&sha256) {
            return Err(Status::invalid_argument(format!(
                "sha256 {sha256:?} is not 64 hex digits"
            )));
        }
        let store = &self.0.store;
        let Some(found) = store
            .find_artifact(ArtifactKey::Sha256(&sha256))
            .await
            .map_err(status)?
        else {
            return Err(Status::not_found(
                "no artifact with that sha256 in this repository",
            ));
        };
        let (checkpoint, signature) = self.rooted_checkpoint(0).await?;
        let record = &found.record;
        let proofs = store
            .audit_inclusion_proofs(
                &record.job_id,
                Some((audit_kind::COMPLETE, &record.task_id)),
                0,
                1,
                checkpoint.seq,
            )
            .await
            .map_err(status)?;
        // Not under the checkpoint yet: sealed or signed after it.
        let unproven = u64::from(proofs.is_empty());
        Ok(Response::new(entry_proofs(
            checkpoint, signature, proofs, unproven,
        )))
    }

    async fn prove_consistency(
        &self,
        req: Request<ConsistencyRequest>,
    ) -> Result<Response<ConsistencyProof>, Status> {
        // Tree hashes say nothing of any entry: any caller may ask.
        let r = req.into_inner();
        let (new_size, checkpoint) = match r.new_size {
            0 => {
                let c = self.rooted_checkpoint(0).await?;
                (c.0.seq, Some(c))
            }
            n => (n, self.0.checkpoint_at(n).await.map_err(status)?),
        };
        let path = self
            .0
            .store
            .audit_consistency_proof(r.old_size, new_size)
            .await
            .map_err(status)?;
        Ok(Response::new(ConsistencyProof {
            checkpoint: checkpoint.map(ledger_checkpoint),
            old_size: r.old_size,
            new_size,
            path: path.iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn check_ledger_tree(
        &self,
        req: Request<CheckLedgerTreeRequest>,
    ) -> Result<Response<LedgerTreeCheck>, Status> {
        let caller = Caller::of(&req);
        caller.require_operator("checking the audit ledger's Merkle tree")?;
        let repair = req.into_inner().repair;
        // Held to the newest checkpoint this deployment vouches for, never
        // to one it cannot: a tree rebuilt against nothing signed would
        // serve proofs of whatever the chain now holds.
        let hold = match &self.0.ledger_signer {
            Some(signer) => Some(
                self.0
                    .resume_point(signer)
                    .await
                    .map_err(|e| Status::failed_precondition(e.to_string()))?,
            )
            .filter(|c| c.seq > 0),
            None => None,
        };
        let actor = caller.actor();
        let check = self
            .0
            .store
            .check_audit_tree(
                hold.as_slice(),
                repair.then_some(actor.as_str()),
                crate::store::now_ms(),
            )
            .await
            .map_err(status)?;
        let unheld = match &hold {
            None if self.0.ledger_signer.is_none() => "this coordinator signs no checkpoints (signing_cert_chain unset): the tree was rebuilt from the chain alone".to_string(),
            None => "no checkpoint signed yet: the tree was rebuilt from the chain alone".to_string(),
            Some(c) if check.held.is_empty() => format!(
                "the newest checkpoint this deployment signed (entry {}) is beyond the tree's {} entries: the signer holds the tree to it once it has grown",
                c.seq, check.entries
            ),
            Some(_) => String::new(),
        };
        if check.repaired {
            tracing::warn!(
                by = %actor,
                entries = check.entries,
                wrong = check.wrong,
                missing = check.missing,
                extra = check.extra,
                "the audit ledger's Merkle tree was repaired from its chain"
            );
        }
        Ok(Response::new(LedgerTreeCheck {
            entries: check.entries,
            nodes: check.nodes,
            wrong: check.wrong,
            missing: check.missing,
            extra: check.extra,
            examples: check.examples,
            root: check
                .root
                .map(|r| hallmark_provenance::merkle::to_hex(&r))
                .unwrap_or_default(),
            held_seq: check.held.last().copied().unwrap_or(0),
            unheld,
            repaired: check.repaired,
        }))
    }
}

impl ProvenanceService {
    /// The signed checkpoint at entry `seq` (0: the newest), which must
    /// carry a Merkle root for anything to be proven against it.
    async fn rooted_checkpoint(&self, seq: u64) -> Result<(Checkpoint, Vec<u8>), Status> {
        let found = match seq {
            // The database's newest: proofs are asked for per image, and
            // looking through the published copies lists a folder. Only
            // when the database holds none are those looked at.
            0 => match self.0.store.latest_checkpoint().await.map_err(status)? {
                Some(stored) => Some(stored),
                None => self.0.newest_checkpoint(None).await,
            },
            n => self.0.checkpoint_at(n).await.map_err(status)?,
        };
        match found {
            Some(c) if c.0.root.is_some() => Ok(c),
            Some((c, _)) => Err(Status::failed_precondition(format!(
                "the ledger's {} checkpoint (entry {}) was signed before the ledger had a Merkle tree; the next one carries a root (signed every ledger_checkpoint_interval_ms once new entries are sealed)",
                if seq == 0 { "latest" } else { "named" },
                c.seq
            ))),
            None if seq != 0 => Err(Status::not_found(format!(
                "no signed checkpoint at ledger entry {seq}"
            ))),
            None => Err(Status::failed_precondition(
                "the ledger has no signed checkpoint to prove against: the coordinator signs none (signing_cert_chain unset) or has sealed nothing since it started signing",
            )),
        }
    }
}

fn entry_proofs(
    checkpoint: Checkpoint,
    signature: Vec<u8>,
    proofs: Vec<(SealedEntry, Vec<hallmark_provenance::merkle::Hash>)>,
    unproven: u64,
) -> EntryProofs {
    EntryProofs {
        checkpoint: Some(ledger_checkpoint((checkpoint, signature))),
        proofs: proofs
            .into_iter()
            .map(|(e, path)| EntryProof {
                entry: Some(ledger_entry(e)),
                path: path.iter().map(|h| h.to_vec()).collect(),
            })
            .collect(),
        unproven,
    }
}

fn ledger_entry(e: SealedEntry) -> LedgerEntry {
    LedgerEntry {
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

fn ledger_checkpoint((c, signature): (Checkpoint, Vec<u8>)) -> LedgerCheckpoint {
    LedgerCheckpoint {
        seq: c.seq,
        hash: c.hash,
        at_ms: c.at_ms,
        signature,
        root: c.root.unwrap_or_default(),
    }
}
