//! The gRPC services over one shared [`Coordinator`] state.

mod jobs;
mod provenance;
mod registry;
mod workers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

pub use jobs::JobsService;
pub use provenance::{ProvenanceService, Resolution};
pub use registry::RegistryService;
pub use workers::WorkersService;

use hallmark_provenance::credentials::SigningIdentity;
use hallmark_provenance::credentials::detached::{sign_detached, verify_detached};
use hallmark_provenance::ledger::{self, Anchor, ChainCheck, Checkpoint};
use hallmark_provenance::merkle;

use crate::auth::{Caller, ClientFingerprint};
use crate::blobs::{BlobError, BlobStore};
use crate::config::CoordinatorConfig;
use crate::metrics::{self as m, CensusLabels};
use crate::notify::Notifier;
use crate::stamps::StampCheck;
use crate::store::{ClientCert, LeasePolicy, Store, StoreError, WorkerCaps, now_ms};

/// State shared by all services of one coordinator replica.
pub struct Coordinator {
    pub store: Store,
    pub blobs: BlobStore,
    pub notifier: Notifier,
    pub config: CoordinatorConfig,
    pub lease_policy: LeasePolicy,
    /// The upload gate: content credentials and watermark of every artifact.
    pub stamps: Arc<StampCheck>,
    /// Tenants' submission and upload rate buckets, and the HTTP API's
    /// per-client ones (shared through Redis when set).
    pub limiter: crate::rate::RateLimiter,
    workers: Mutex<HashMap<String, (WorkerCaps, Instant)>>,
    /// Signs the audit ledger's head as it is sealed, when configured.
    ledger_signer: Option<LedgerSigner>,
    /// Where the next input retention pass goes on from.
    purge_cursor: tokio::sync::Mutex<Option<(i64, String)>>,
    /// The task label sets the metrics census has reported.
    pub(crate) census_labels: CensusLabels,
    /// When the census was last read (a scrape within
    /// `census_max_age_ms` of it serves it again); the lock makes
    /// concurrent scrapes read it once.
    pub(crate) census_read: tokio::sync::Mutex<Option<Instant>>,
    /// Turns true when the server stops: long polls and watches end early
    /// so a graceful shutdown does not wait for them.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Coordinator {
    pub fn new(
        store: Store,
        blobs: BlobStore,
        notifier: Notifier,
        config: CoordinatorConfig,
        stamps: StampCheck,
        ledger_signer: Option<SigningIdentity>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let ledger_signer = ledger_signer.map(|identity| LedgerSigner {
            identity,
            every: Duration::from_millis(config.ledger_checkpoint_interval_ms),
            last: tokio::sync::Mutex::new(None),
            resume_failed: tokio::sync::Mutex::new(None),
        });
        let lease_policy = LeasePolicy {
            base_ms: config.lease_base_ms,
            ms_per_megapixel_step: config.lease_ms_per_megapixel_step,
        };
        let limiter = match config.redis_url.as_deref() {
            Some(url) if !url.is_empty() => crate::rate::RateLimiter::with_redis(url)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "rate limits: bad Redis URL, keeping them per replica");
                    crate::rate::RateLimiter::local()
                }),
            _ => crate::rate::RateLimiter::local(),
        };
        Self {
            store,
            blobs,
            notifier,
            config,
            lease_policy,
            stamps: Arc::new(stamps),
            limiter,
            workers: Mutex::new(HashMap::new()),
            ledger_signer,
            purge_cursor: tokio::sync::Mutex::new(None),
            census_labels: CensusLabels::default(),
            census_read: tokio::sync::Mutex::new(None),
            shutdown,
        }
    }

    /// Resolves when the server is stopping.
    pub async fn stopping(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Workers seen since this time are live.
    pub fn live_since(&self, now: i64) -> i64 {
        now - self.config.worker_timeout_ms as i64
    }

    /// The worker's capabilities (cached), and its presence refreshed at most
    /// once per heartbeat interval so lease calls stay cheap. A worker the
    /// caller may not drive (registered with another token) is unknown to it.
    async fn seen_worker(
        &self,
        caller: &Caller,
        cert: &str,
        worker_id: &str,
        loaded_model: &str,
        now: i64,
    ) -> Result<WorkerCaps, Status> {
        let refresh = Duration::from_millis(self.config.heartbeat_interval_ms.max(500));
        match self.cached_worker(worker_id)? {
            Some((caps, touched)) if touched.elapsed() < refresh => {
                caller_drives(caller, cert, &caps)?;
                Ok(caps)
            }
            _ => {
                let caps = self.store.worker_caps(worker_id).await.map_err(status)?;
                caller_drives(caller, cert, &caps)?;
                self.store
                    .touch_worker(worker_id, loaded_model, now)
                    .await
                    .map_err(status)?;
                self.notifier
                    .worker_seen(worker_id, self.config.worker_timeout_ms);
                self.workers
                    .lock()
                    .map_err(|_| Status::internal("worker cache poisoned"))?
                    .insert(worker_id.to_string(), (caps.clone(), Instant::now()));
                Ok(caps)
            }
        }
    }

    fn cached_worker(&self, worker_id: &str) -> Result<Option<(WorkerCaps, Instant)>, Status> {
        Ok(self
            .workers
            .lock()
            .map_err(|_| Status::internal("worker cache poisoned"))?
            .get(worker_id)
            .cloned())
    }

    /// Refuses a call about `worker_id` (completing or failing its leases)
    /// from a caller that may not drive it (`cert`: the SHA-256 of the
    /// client certificate the call came with, '' for none). For an
    /// operator, or with authentication off and no client certificates,
    /// there is nothing to look up.
    async fn check_worker_caller(
        &self,
        caller: &Caller,
        cert: &str,
        worker_id: &str,
    ) -> Result<(), Status> {
        match caller {
            Caller::Operator(_) => return Ok(()),
            Caller::Open(_) if cert.is_empty() => return Ok(()),
            _ => {}
        }
        let caps = match self.cached_worker(worker_id)? {
            Some((caps, _)) => caps,
            None => self.store.worker_caps(worker_id).await.map_err(status)?,
        };
        caller_drives(caller, cert, &caps)
    }

    /// Refuses a job the caller may not see as if it did not exist, so a
    /// tenant cannot probe for other tenants' job ids.
    async fn check_job_owner(&self, caller: &Caller, job_id: &str) -> Result<(), Status> {
        caller.require_known("looking at a job")?;
        match self.store.job_tenant(job_id).await.map_err(status)? {
            Some(tenant) if caller.owns(&tenant) => Ok(()),
            _ => Err(Status::not_found(format!("no job with id {job_id:?}"))),
        }
    }

    /// Streams a stored blob in chunks.
    async fn stream_blob(
        &self,
        sha256: &str,
    ) -> Result<ReceiverStream<Result<hallmark_proto::v1::Chunk, Status>>, Status> {
        if !self.store.blob_known(sha256).await.map_err(status)? {
            return Err(Status::not_found(format!(
                "no artifact with sha256 {sha256}"
            )));
        }
        let mut chunks = self.blobs.read(sha256).await.map_err(blob_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(chunk) = chunks.next().await {
                let msg = chunk
                    .map(|data| hallmark_proto::v1::Chunk { data })
                    .map_err(|e| Status::internal(format!("reading blob: {e}")));
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// One pass of lease expiry and job closing, with the wake-ups it implies.
    pub async fn reap_once(&self) -> Result<(), StoreError> {
        let out = self.store.reap(now_ms()).await?;
        self.seal_ledger().await?;
        if out.expired > 0 {
            metrics::counter!(m::LEASES_EXPIRED, "outcome" => "requeued").increment(out.requeued);
            metrics::counter!(m::LEASES_EXPIRED, "outcome" => "failed")
                .increment(out.expired - out.requeued);
        }
        if out.requeued > 0 {
            tracing::info!(
                requeued = out.requeued,
                "expired leases returned to the queue"
            );
            self.notifier.tasks_ready();
        }
        for job in &out.expired_jobs {
            self.notifier.job_changed(job);
        }
        for (job, state) in &out.finished_jobs {
            self.notifier.job_changed(job);
            metrics::counter!(m::JOBS_FINISHED, "state" => state.clone()).increment(1);
            tracing::info!(job_id = %job, %state, "job finished");
        }
        if !out.finished_jobs.is_empty() {
            self.purge_deleted_inputs_after_a_job().await;
        }
        Ok(())
    }

    /// Purges the input images unused for `input_retention_ms` (a bounded
    /// number per call, each call going on from where the last left off):
    /// their rows marked, then their blobs deleted. Returns how many were
    /// purged. A blob that cannot be deleted now (an object lock), or one a
    /// purge left behind (a coordinator that died between the two steps),
    /// is deleted by a later pass.
    pub async fn purge_unused_inputs(&self) -> Result<u64, StoreError> {
        // Blobs left by purges and deletions, with or without a retention.
        for sha256 in self.store.pending_input_blobs(PURGE_BATCH).await? {
            match self
                .store
                .remove_input_blob(&sha256, || self.blobs.remove(&sha256))
                .await
            {
                Ok(removed) => {
                    tracing::info!(%sha256, removed, "a purged input image's blob removed after its purge")
                }
                Err(StoreError::Blob(e)) => {
                    tracing::warn!(%sha256, error = %e, "a purged input image's blob could not be deleted yet")
                }
                Err(e) => return Err(e),
            }
        }
        let mut purged = self.purge_deleted_inputs().await?;
        let Some(retention) = self.config.input_retention() else {
            return Ok(purged);
        };
        let cutoff = now_ms().saturating_sub(retention);
        let mut cursor = self.purge_cursor.lock().await;
        let page = self
            .store
            .unused_inputs(cutoff, PURGE_BATCH, cursor.as_ref())
            .await?;
        // A short page is the end: the next pass starts again from the
        // least recently used.
        *cursor = match page.last() {
            Some(last) if page.len() == PURGE_BATCH as usize => Some(last.clone()),
            _ => None,
        };
        drop(cursor);
        for (_, sha256) in page {
            purged += self
                .purge_input(&sha256, cutoff, "unused past its retention")
                .await?;
        }
        Ok(purged)
    }

    /// Purges the inputs their last uploader took back while another
    /// tenant's job started from them, now that no unfinished task does,
    /// whatever the retention. The sweep runs it, and so does the end of a
    /// job (closed by the reaper, or canceled): such a deletion waits for
    /// the job, not for the next sweep. Returns how many were purged.
    pub async fn purge_deleted_inputs(&self) -> Result<u64, StoreError> {
        let mut purged = 0;
        for sha256 in self.store.deleted_inputs_now_unused(PURGE_BATCH).await? {
            purged += self
                .purge_input(
                    &sha256,
                    i64::MAX,
                    "deleted by its last uploader, and no job starts from it any more",
                )
                .await?;
        }
        Ok(purged)
    }

    /// [`Self::purge_deleted_inputs`] after a job ended: a failure is
    /// logged, not the caller's, and the sweep tries again.
    pub(crate) async fn purge_deleted_inputs_after_a_job(&self) {
        if let Err(e) = self.purge_deleted_inputs().await {
            tracing::warn!(error = %e, "inputs deleted while a job started from them could not be purged yet");
        }
    }

    /// Purges the input `sha256` if unused since before `cutoff` (see
    /// [`Store::purge_input`]), counted and logged with `why`; 1 when it
    /// was purged, 0 when not.
    async fn purge_input(&self, sha256: &str, cutoff: i64, why: &str) -> Result<u64, StoreError> {
        let Some(input) = self
            .store
            .purge_input(sha256, cutoff, now_ms(), || self.blobs.remove(sha256))
            .await?
        else {
            return Ok(0);
        };
        metrics::counter!(m::INPUTS_PURGED).increment(1);
        tracing::info!(
            sha256 = %input.sha256,
            last_used_at = input.last_used_at,
            blob_kept = input.blob_kept,
            blob_pending = input.blob_pending,
            "input image purged: {why}"
        );
        Ok(1)
    }

    /// Seals the audit ledger's waiting entries into the chain, a bounded
    /// number of rounds per call so a backlog cannot stall the reaper.
    pub async fn seal_ledger(&self) -> Result<u64, StoreError> {
        // A chain sealed before the Merkle tree existed joins it first.
        for _ in 0..SEAL_ROUNDS {
            let n = self.store.grow_audit_tree(SEAL_BATCH).await?;
            if n < u64::from(SEAL_BATCH) {
                break;
            }
        }
        let mut sealed = 0;
        for _ in 0..SEAL_ROUNDS {
            let n = self.store.seal_audit(SEAL_BATCH).await?;
            metrics::counter!(m::AUDIT_SEALED).increment(n);
            sealed += n;
            if n < u64::from(SEAL_BATCH) {
                break;
            }
        }
        if let Some(signer) = &self.ledger_signer
            && let Err(e) = self.sign_checkpoint(signer).await
        {
            // The chain is sealed either way; the next pass tries again.
            metrics::counter!(m::AUDIT_CHECKPOINT_REFUSALS).increment(1);
            tracing::warn!(error = %e, "could not sign an audit ledger checkpoint");
        }
        Ok(sealed)
    }

    /// Signs the chain's head as a checkpoint when it moved past the last
    /// one and the interval has passed since — after checking that the
    /// chain still runs from the last checkpoint to the head, so a chain
    /// rewritten in the database is never signed. The Merkle root signed
    /// with it is computed here too: the stored tree's edge at the last
    /// checkpoint must lead to the root signed then, and the entries
    /// re-hashed since extend it, so no stored node above them is trusted.
    async fn sign_checkpoint(&self, signer: &LedgerSigner) -> anyhow::Result<()> {
        let mut last = signer.last.lock().await;
        let signed = match &*last {
            Some(s) => s.clone(),
            None => {
                // A replica that cannot find where to resume tries again
                // after a while, not on every sealing pass.
                let mut failed = signer.resume_failed.lock().await;
                if failed.is_some_and(|at| at.elapsed() < RESUME_RETRY.max(signer.every)) {
                    return Ok(());
                }
                let from = self.resume_point(signer).await.inspect_err(|_| {
                    *failed = Some(Instant::now());
                })?;
                let s = LastCheckpoint {
                    signed: from.anchor(),
                    root: from.root,
                    at: None,
                };
                *last = Some(s.clone());
                s
            }
        };
        if signed.at.is_some_and(|at| at.elapsed() < signer.every) {
            return Ok(());
        }
        let head = self.store.audit_head().await?;
        // The checkpoint covers what the tree holds: the whole chain, but
        // for a chain sealed before the tree that it is still catching up.
        let target = head.seq.min(self.store.audit_tree_size().await?);
        if target <= signed.signed.seq {
            return Ok(());
        }
        // An attempt that fails (a chain that does not check out) is made
        // again after the interval, not on every sealing pass.
        if let Some(l) = last.as_mut() {
            l.at = Some(Instant::now());
        }
        let mut tree = self.store.audit_frontier(signed.signed.seq).await?;
        if let Some(root) = &signed.root
            && tree.root().map(|r| merkle::to_hex(&r)).as_ref() != Some(root)
        {
            anyhow::bail!(
                "the audit ledger's Merkle tree no longer leads to the root {root} signed at entry {}; not signing",
                signed.signed.seq
            );
        }
        let mut check = ChainCheck::resume(signed.signed.clone());
        while check.head().seq < target {
            let page = self
                .store
                .audit_page(check.head().seq, SEAL_BATCH, None)
                .await?;
            if page.entries.is_empty() {
                break;
            }
            for e in page.entries.iter().take_while(|e| e.seq <= target) {
                check.push(e).map_err(|fault| {
                    anyhow::anyhow!(
                        "the audit ledger does not continue from the checkpoint signed at entry {}: {fault}; not signing it",
                        signed.signed.seq
                    )
                })?;
                tree.push(merkle::leaf_of_hex(&e.hash).map_err(anyhow::Error::msg)?);
            }
        }
        let reached = check.head();
        if reached.seq != target || (target == head.seq && reached != head) {
            anyhow::bail!(
                "the audit ledger's head {}:{} is not where its entries lead ({}:{}); not signing it",
                head.seq,
                head.hash,
                reached.seq,
                reached.hash
            );
        }
        let root = tree.root().map(|r| merkle::to_hex(&r));
        // The stored tree must agree, or the proofs it serves would not.
        let stored_root = self.store.audit_frontier(target).await?.root();
        if stored_root.map(|r| merkle::to_hex(&r)) != root {
            anyhow::bail!(
                "the audit ledger's stored Merkle tree over entries 1 to {target} does not have the root its entries lead to; not signing it"
            );
        }
        let checkpoint = Checkpoint {
            seq: target,
            hash: reached.hash,
            at_ms: now_ms(),
            root,
        };
        let signature = sign_detached(&signer.identity, &checkpoint.payload())?;
        self.store
            .record_checkpoint(&checkpoint, &signature)
            .await?;
        metrics::counter!(m::AUDIT_CHECKPOINTS).increment(1);
        *last = Some(LastCheckpoint {
            signed: checkpoint.anchor(),
            root: checkpoint.root.clone(),
            at: Some(Instant::now()),
        });
        drop(last);
        // A copy outside the database: a chain rewritten there, with its
        // checkpoints deleted, still meets this one.
        self.blobs
            .put_named(
                CHECKPOINT_DIR,
                &Checkpoint::published_name(checkpoint.seq),
                checkpoint.to_published(&signature),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "signed the audit checkpoint at entry {} but could not publish it to the blob store: {e}",
                    checkpoint.seq
                )
            })?;
        Ok(())
    }

    /// The newest signed checkpoint: the database's `stored` one, or one
    /// published to the blob store further along (the database's were
    /// deleted, or are behind). A blob store that cannot be read leaves the
    /// database's, with a warning.
    pub async fn newest_checkpoint(
        &self,
        stored: Option<(Checkpoint, Vec<u8>)>,
    ) -> Option<(Checkpoint, Vec<u8>)> {
        match self
            .published_checkpoints(stored.as_ref().map(|(c, _)| c.seq), 1)
            .await
        {
            Ok(mut newer) if !newer.is_empty() => newer.pop(),
            Ok(_) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the published audit checkpoints");
                stored
            }
        }
    }

    /// The signed checkpoint at entry `seq`: the database's, or the copy
    /// published to the blob store.
    pub async fn checkpoint_at(
        &self,
        seq: u64,
    ) -> Result<Option<(Checkpoint, Vec<u8>)>, StoreError> {
        if let Some(c) = self.store.checkpoint_at(seq).await? {
            return Ok(Some(c));
        }
        match self
            .blobs
            .get_named(CHECKPOINT_DIR, &Checkpoint::published_name(seq))
            .await
        {
            Ok(bytes) => Ok(Checkpoint::from_published(&bytes)
                .ok()
                .filter(|(c, _)| c.seq == seq)),
            Err(BlobError::Missing(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `n` checkpoints published after entry `after` (all with
    /// `None`), the newest last; files that do not parse are skipped with
    /// a warning.
    async fn published_checkpoints(
        &self,
        after: Option<u64>,
        n: usize,
    ) -> Result<Vec<(Checkpoint, Vec<u8>)>, BlobError> {
        let after = after.map(Checkpoint::published_name);
        let names = self
            .blobs
            .list_named(CHECKPOINT_DIR, after.as_deref())
            .await?;
        let newest: Vec<&String> = names
            .iter()
            .filter(|n| Checkpoint::published_seq(n).is_some())
            .rev()
            .take(n)
            .collect();
        let mut out = Vec::new();
        for name in newest.into_iter().rev() {
            let bytes = self.blobs.get_named(CHECKPOINT_DIR, name).await?;
            match Checkpoint::from_published(&bytes) {
                Ok((c, sig)) if Checkpoint::published_seq(name) == Some(c.seq) => {
                    out.push((c, sig))
                }
                Ok((c, _)) => tracing::warn!(
                    file = %name,
                    seq = c.seq,
                    "a published audit checkpoint is filed under another entry's name; skipped"
                ),
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "a published audit checkpoint does not parse; skipped")
                }
            }
        }
        Ok(out)
    }
}

/// Where the blob store keeps the published audit checkpoints.
pub const CHECKPOINT_DIR: &str = "ledger-checkpoints";

impl Coordinator {
    /// Where a replica that has signed nothing yet resumes: the latest
    /// stored checkpoint this deployment vouches for — signed with this
    /// replica's own certificate, or by one the trust anchors accept — or
    /// the genesis when none was ever made. Checkpoints that exist but none
    /// of which it vouches for (someone else's signature, or a broken one)
    /// stop it signing, loudly: resuming from the genesis then would sign
    /// whatever chain the database holds now.
    async fn resume_point(&self, signer: &LedgerSigner) -> anyhow::Result<Checkpoint> {
        let ours = signer.identity.certificate_der()?;
        let mut stored = self.store.latest_checkpoints(CHECKPOINTS_SCANNED).await?;
        // Those published beyond the database's newest (all of them when
        // the database holds none): deleting the database's checkpoints
        // does not send a replica back to the genesis.
        let newest_stored = stored.first().map(|(c, _)| c.seq);
        let published = self
            .published_checkpoints(newest_stored, CHECKPOINTS_SCANNED as usize)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "could not read the published audit checkpoints: {e}; not signing until it can"
                )
            })?;
        stored.extend(published);
        stored.sort_by_key(|c| std::cmp::Reverse(c.0.seq));
        if stored.is_empty() {
            return Ok(Checkpoint {
                seq: 0,
                hash: ledger::GENESIS.to_string(),
                at_ms: 0,
                root: None,
            });
        }
        for (c, signature) in &stored {
            match verify_detached(signature, &c.payload(), self.stamps.trust_anchors()) {
                Ok(v) if v.certificate == ours || v.trusted == Some(true) => {
                    return Ok(c.clone());
                }
                Ok(v) => tracing::warn!(
                    seq = c.seq,
                    signer = %v.signer,
                    "an audit checkpoint is signed by a certificate this deployment does not vouch for"
                ),
                Err(e) => {
                    tracing::warn!(seq = c.seq, error = %e, "an audit checkpoint does not verify")
                }
            }
        }
        anyhow::bail!(
            "none of the latest {} audit checkpoints is signed by this deployment; not signing until they are looked into (after a signing key rotation, set trust_anchors to the root that issued both certificates)",
            stored.len()
        )
    }
}

/// Stored checkpoints a replica looks through for one to resume from.
const CHECKPOINTS_SCANNED: u32 = 16;

/// What signs the audit ledger's checkpoints, and the last it signed.
struct LedgerSigner {
    identity: SigningIdentity,
    every: Duration,
    last: tokio::sync::Mutex<Option<LastCheckpoint>>,
    /// When looking for a checkpoint to resume from last failed.
    resume_failed: tokio::sync::Mutex<Option<Instant>>,
}

/// Least time between two looks for a checkpoint to resume from.
const RESUME_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct LastCheckpoint {
    /// The entry the last checkpoint vouches for.
    signed: Anchor,
    /// The Merkle root it signed (`None`: the genesis, or one signed
    /// before the tree).
    root: Option<String>,
    /// When this replica signed it (`None`: found stored).
    at: Option<Instant>,
}

/// Entries sealed per transaction, and transactions per reap pass: at the
/// default 250 ms pass, far above what the farm appends.
const SEAL_BATCH: u32 = 2000;
const SEAL_ROUNDS: usize = 8;
/// Inputs looked at per retention pass.
const PURGE_BATCH: u32 = 100;

/// Maps store errors to gRPC status codes with the store's message.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::Spec(e) => Status::invalid_argument(format!("invalid job spec: {e}")),
        StoreError::NotFound(m) => Status::not_found(m),
        StoreError::Refused(m) => Status::failed_precondition(m),
        StoreError::Db(e) => {
            tracing::error!(error = %e, "database error");
            Status::unavailable(format!("database error: {e}"))
        }
        StoreError::Migrate(e) => Status::internal(format!("migration: {e}")),
        StoreError::Blob(e) => blob_status(e),
        StoreError::Corrupt(m) => {
            tracing::error!(error = %m, "stored data does not check out");
            Status::data_loss(m)
        }
    }
}

fn blob_status(e: BlobError) -> Status {
    match e {
        BlobError::Missing(m) => {
            Status::not_found(format!("blob {m} is missing from the blob store"))
        }
        BlobError::Io { .. } | BlobError::Config(_) => Status::internal(e.to_string()),
        BlobError::Object(_) => Status::unavailable(e.to_string()),
        other => Status::invalid_argument(other.to_string()),
    }
}

/// The TLS client certificate a call came over (mutual TLS), if any: the
/// gate's fingerprint of it and its subject.
pub(crate) fn client_cert<T>(req: &tonic::Request<T>) -> Option<ClientCert> {
    let sha256 = ClientFingerprint::of(req);
    if sha256.is_empty() {
        return None;
    }
    let certs = req.peer_certs()?;
    let subject = x509_parser::parse_x509_certificate(certs.first()?.as_ref())
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_default();
    Some(ClientCert { sha256, subject })
}

/// A worker registered with another token, or with a client certificate
/// other than the one the call came with (`cert`), is unknown to the
/// caller: the same answer as for a worker that does not exist (no probing
/// for ids), and the one a worker meets by registering again. Operators
/// drive every worker.
fn caller_drives(caller: &Caller, cert: &str, caps: &WorkerCaps) -> Result<(), Status> {
    let same_cert = caps.client_cert_sha256.is_empty()
        || caps.client_cert_sha256 == cert
        || matches!(caller, Caller::Operator(_));
    if same_cert && caller.drives_worker(&caps.principal) {
        Ok(())
    } else {
        Err(Status::not_found(format!(
            "unknown worker {:?}; register again",
            caps.worker_id
        )))
    }
}
