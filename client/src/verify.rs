//! `hallmark verify FILE|DIR...`: is this image what its credentials say,
//! and where did it come from?
//!
//! Offline it checks the C2PA manifest (signature, hash binding, the
//! ingredients' recorded validation, trust anchors) and reads the watermark.
//! Online (`--coordinator`) it resolves the watermark id in the manifest
//! repository when the manifest is missing or no longer matches the pixels,
//! and shows the original manifest and lineage — saying plainly that this
//! file's content differs from the signed bytes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hallmark_proto::v1::resolve_request::Key;
use hallmark_proto::v1::{ArtifactRecord, ProveArtifactRequest, ResolveRequest, ResolveResponse};
use hallmark_provenance::credentials::{self, CredentialsReport, Verdict};
use hallmark_provenance::merkle;
use hallmark_provenance::watermark::{self, WatermarkKey};
use serde::Serialize;
use serde_json::json;

use crate::audit;
use crate::remote::Remote;

/// The one-word outcome for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Credentials intact and signed by a trusted signer.
    Verified,
    /// Credentials intact, signer not trusted here.
    Untrusted,
    /// Credentials present but broken: the file was altered after signing.
    Tampered,
    /// No valid credentials in the file, but the watermark led to the
    /// original manifest in the repository: the content was altered.
    Recovered,
    /// The repository knows the image, but the proof that the farm's
    /// signed audit ledger recorded making it does not check out.
    LedgerMismatch,
    /// A watermark id, nothing to resolve it with (offline) or unknown to
    /// the repository.
    WatermarkOnly,
    /// No credentials and no watermark.
    NoProvenance,
    /// Not an image this build reads.
    Error,
}

impl Status {
    /// 0 verified, 1 invalid or tampered, 2 no provenance found.
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Verified => 0,
            Status::Untrusted
            | Status::Tampered
            | Status::Recovered
            | Status::LedgerMismatch
            | Status::Error => 1,
            Status::WatermarkOnly | Status::NoProvenance => 2,
        }
    }
}

/// The watermark read from the pixels.
#[derive(Debug, Clone, Serialize)]
pub struct WatermarkFinding {
    pub id: String,
    /// The stage whose key found it (`upscale` or `generate`).
    pub stage: &'static str,
    pub confidence: f32,
}

/// What the repository said about the watermark id.
#[derive(Debug, Clone, Serialize)]
pub struct RepositoryFinding {
    pub watermark_id: String,
    pub found: bool,
    pub manifest_label: Option<String>,
    /// The stored original, checked with the same trust anchors.
    pub original: Option<CredentialsReport>,
    pub original_sha256: Option<String>,
    pub file_sha256: String,
    /// The lineage, base image first.
    pub chain: Vec<serde_json::Value>,
    pub model: Option<serde_json::Value>,
    pub datasets: Vec<serde_json::Value>,
    /// The signed audit ledger's proof of the original's completion.
    pub ledger: Option<LedgerFinding>,
}

/// The proof that the farm's signed audit ledger recorded the completion
/// that made the image, checked here (`Provenance.ProveArtifact`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LedgerFinding {
    /// The completion's entry re-hashed and its Merkle path walked to the
    /// signed root: the farm recorded making exactly these bytes.
    pub proven: bool,
    pub entry_seq: Option<u64>,
    pub checkpoint_seq: Option<u64>,
    pub root: Option<String>,
    pub signer: Option<String>,
    /// Whether the checkpoint's signer chains to the trust anchors.
    pub trusted: Option<bool>,
    /// Where the proof does not check out (empty: it does, or none was given).
    pub problems: Vec<String>,
    /// Why there is no proof yet, when there is none.
    pub note: Option<String>,
}

/// Everything `verify` found about one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    pub status: Status,
    pub summary: String,
    pub credentials: Option<CredentialsReport>,
    pub watermark: Option<WatermarkFinding>,
    pub repository: Option<RepositoryFinding>,
}

/// Verification settings.
pub struct Verifier {
    pub trust_anchors: Option<String>,
    pub key: WatermarkKey,
    pub remote: Option<Remote>,
    pub tenant: String,
}

impl Verifier {
    pub async fn verify(&self, path: &Path) -> FileReport {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return error_report(path, format!("cannot read: {e}")),
        };
        let anchors = self.trust_anchors.clone();
        let key = self.key.clone();
        let offline = tokio::task::spawn_blocking(move || {
            let creds = credentials::inspect(&bytes, anchors.as_deref());
            let mark = credentials::decode_image(&bytes)
                .ok()
                .and_then(|px| read_watermark(&px, &key));
            (bytes, creds, mark)
        })
        .await;
        let (bytes, creds, mark) = match offline {
            Ok(r) => r,
            Err(e) => return error_report(path, format!("verification panicked: {e}")),
        };
        let creds = match creds {
            Ok(c) => c,
            Err(e) => return error_report(path, e.to_string()),
        };
        let mut report = FileReport {
            path: path.to_path_buf(),
            status: Status::NoProvenance,
            summary: String::new(),
            credentials: Some(creds.clone()),
            watermark: mark.clone(),
            repository: None,
        };
        match creds.verdict {
            Verdict::Verified => {
                report.status = Status::Verified;
                report.summary = format!(
                    "verified: signed by {}",
                    creds.signer.as_deref().unwrap_or("?")
                );
            }
            Verdict::UntrustedSigner => {
                report.status = Status::Untrusted;
                report.summary = format!(
                    "intact but signed by {:?}, which is not a trusted signer here (add its root with --trust-anchors)",
                    creds.signer.as_deref().unwrap_or("?")
                );
            }
            Verdict::Invalid => {
                report.status = Status::Tampered;
                report.summary = format!(
                    "tampered: the content credentials do not match this file ({})",
                    creds.failures.join("; ")
                );
            }
            Verdict::NoCredentials => {}
        }
        // The repository: for the lineage of a good file, and to recover the
        // original of one whose credentials are gone or broken.
        let id = mark
            .as_ref()
            .map(|m| m.id.clone())
            .or_else(|| creds.watermark_id.clone());
        if let (Some(remote), Some(id)) = (&self.remote, id) {
            let finding = self.resolve(remote, &id, &bytes).await;
            if !matches!(report.status, Status::Verified | Status::Untrusted) {
                report.status = if finding.found {
                    Status::Recovered
                } else if report.status == Status::Tampered {
                    Status::Tampered
                } else {
                    Status::WatermarkOnly
                };
                let recovered = if finding.found {
                    format!(
                        "watermark {id} resolves to manifest {} (original sha256 {}); this file's content differs from the signed bytes",
                        finding.manifest_label.as_deref().unwrap_or("?"),
                        finding.original_sha256.as_deref().unwrap_or("?")
                    )
                } else {
                    format!("watermark {id} is unknown to the repository")
                };
                report.summary = match report.status {
                    Status::Recovered if creds.verdict == Verdict::Invalid => {
                        format!("{}; {recovered}", report.summary)
                    }
                    _ => recovered,
                };
            }
            if let Some(problem) = finding.ledger.as_ref().and_then(|l| l.problems.first()) {
                report.status = Status::LedgerMismatch;
                report.summary = format!(
                    "{}; but the signed audit ledger does not vouch for it: {problem}",
                    report.summary
                );
            }
            report.repository = Some(finding);
        } else if report.status == Status::NoProvenance {
            if let Some(m) = &mark {
                report.status = Status::WatermarkOnly;
                report.summary = format!(
                    "no content credentials; watermark {} found (resolve it with --coordinator)",
                    m.id
                );
            } else {
                report.summary = "no content credentials and no watermark".into();
            }
        }
        report
    }

    async fn resolve(&self, remote: &Remote, id: &str, bytes: &[u8]) -> RepositoryFinding {
        let file_sha256 = hallmark_provenance::sha256_hex(bytes);
        let mut finding = RepositoryFinding {
            watermark_id: id.to_string(),
            found: false,
            manifest_label: None,
            original: None,
            original_sha256: None,
            file_sha256,
            chain: Vec::new(),
            model: None,
            datasets: Vec::new(),
            ledger: None,
        };
        let resolved = remote
            .provenance
            .clone()
            .resolve(ResolveRequest {
                key: Some(Key::WatermarkId(id.to_string())),
                tenant: self.tenant.clone(),
            })
            .await;
        let Ok(resolved) = resolved else {
            return finding;
        };
        let ResolveResponse {
            artifact,
            chain,
            model,
            datasets,
            ..
        } = resolved.into_inner();
        finding.found = true;
        if let Some(a) = &artifact {
            finding.manifest_label = Some(a.manifest_label.clone());
            finding.original_sha256 = Some(a.sha256.clone());
            // The stored original, checked here: the recovered manifest is
            // only as good as its signature over the original bytes.
            if let Ok(original) = remote.fetch(&a.sha256).await {
                let anchors = self.trust_anchors.clone();
                finding.original = tokio::task::spawn_blocking(move || {
                    credentials::inspect(&original, anchors.as_deref()).ok()
                })
                .await
                .ok()
                .flatten();
            }
        }
        if let Some(a) = &artifact {
            finding.ledger = Some(self.prove_in_ledger(remote, a).await);
        }
        finding.chain = chain.iter().map(record_json).collect();
        finding.model = model.map(|m| {
            json!({"model_id": m.model_id, "family": m.family, "license": m.license,
                   "training_datasets": m.training_datasets})
        });
        finding.datasets = datasets
            .iter()
            .map(|d| {
                json!({"name": d.name, "version": d.version, "uri": d.uri,
                       "content_sha256": d.content_sha256, "license": d.license})
            })
            .collect();
        finding
    }
}

impl Verifier {
    /// Asks for the proof that the ledger recorded `artifact`'s completion
    /// and checks it here: the checkpoint's signature, the entry's hash
    /// from its fields, its Merkle path to the signed root, and that it is
    /// this artifact's completion.
    async fn prove_in_ledger(&self, remote: &Remote, artifact: &ArtifactRecord) -> LedgerFinding {
        let mut finding = LedgerFinding::default();
        let reply = remote
            .provenance
            .clone()
            .prove_artifact(ProveArtifactRequest {
                sha256: artifact.sha256.clone(),
            })
            .await;
        let proofs = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                // No checkpoint with a root yet, or a coordinator from
                // before the tree: nothing to hold the image to, not a fault.
                finding.note = Some(format!("no ledger proof: {}", status.message()));
                return finding;
            }
        };
        let Some(served) = proofs.checkpoint else {
            finding.note = Some("no ledger proof: the coordinator sent no checkpoint".into());
            return finding;
        };
        let (checkpoint, signature) = audit::checkpoint_of(served);
        finding.checkpoint_seq = Some(checkpoint.seq);
        finding.root = checkpoint.root.clone();
        let root = checkpoint.root.as_deref().map(merkle::from_hex);
        let signed = audit::check_checkpoint(
            checkpoint.clone(),
            &signature,
            self.trust_anchors.as_deref(),
            &mut finding.problems,
        );
        if let Some(c) = &signed {
            finding.signer = Some(c.signer.clone());
            finding.trusted = c.trusted;
        }
        let Some(proof) = proofs.proofs.into_iter().next() else {
            finding.note = Some(format!(
                "its completion is newer than the latest signed checkpoint (entry {}): ask again after the next one",
                checkpoint.seq
            ));
            return finding;
        };
        let Some(entry) = proof.entry.map(audit::sealed) else {
            finding
                .problems
                .push("the proof names no ledger entry".into());
            return finding;
        };
        finding.entry_seq = Some(entry.seq);
        let recorded = serde_json::from_str::<serde_json::Value>(&entry.body)
            .ok()
            .and_then(|b| b["sha256"].as_str().map(str::to_string));
        if entry.kind != "complete"
            || entry.subject != artifact.task_id
            || recorded.as_deref() != Some(artifact.sha256.as_str())
        {
            finding.problems.push(format!(
                "ledger entry {} ({} of {}) is not the completion of task {} with {}",
                entry.seq, entry.kind, entry.subject, artifact.task_id, artifact.sha256
            ));
        }
        match root {
            Some(Ok(root)) => {
                if let Err(problem) = audit::check_entry(&entry, &proof.path, checkpoint.seq, &root)
                {
                    finding.problems.push(problem);
                }
            }
            _ => finding.problems.push(format!(
                "the checkpoint at entry {} has no usable Merkle root",
                checkpoint.seq
            )),
        }
        finding.proven = finding.problems.is_empty() && signed.is_some();
        finding
    }
}

/// The newest stage's mark (an upscale also carries its base image's).
fn read_watermark(px: &image::RgbImage, key: &WatermarkKey) -> Option<WatermarkFinding> {
    watermark::detect_stages(px, key)
        .next()
        .map(|(stage, d)| WatermarkFinding {
            id: format!("{:016x}", d.payload),
            stage,
            confidence: d.sync_z,
        })
}

fn record_json(r: &ArtifactRecord) -> serde_json::Value {
    let mut v = json!({
        "sha256": r.sha256, "job_id": r.job_id, "task_id": r.task_id,
        "item_index": r.item_index, "stage": r.stage, "model_id": r.model_id,
        "worker_id": r.worker_id, "watermark_id": r.watermark_id,
        "width": r.width, "height": r.height, "seed": r.seed,
        "manifest_label": r.manifest_label, "tenant": r.tenant,
        "parent_sha256": r.parent_sha256,
    });
    if !r.mask_sha256.is_empty() {
        v["mask_sha256"] = json!(r.mask_sha256);
    }
    if !r.prompt.is_empty() {
        v["prompt"] = json!(r.prompt);
    }
    v
}

fn error_report(path: &Path, message: String) -> FileReport {
    FileReport {
        path: path.to_path_buf(),
        status: Status::Error,
        summary: message,
        credentials: None,
        watermark: None,
        repository: None,
    }
}

/// The image files named: files as given, folders searched recursively
/// for .png/.jpg/.jpeg/.webp.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            matches!(
                e.to_ascii_lowercase().as_str(),
                "png" | "jpg" | "jpeg" | "webp"
            )
        }) {
            out.push(p);
        }
    }
    Ok(())
}

/// The human report of one file.
pub fn print_report(r: &FileReport) {
    println!("{}: {}", r.path.display(), r.summary);
    if let Some(c) = &r.credentials
        && c.verdict != Verdict::NoCredentials
    {
        if let Some(label) = &c.manifest_label {
            println!("  manifest     {label}");
        }
        if let Some(cn) = &c.signer_common_name {
            println!(
                "  signer       {} ({cn}){}",
                c.signer.as_deref().unwrap_or("?"),
                c.signed_at
                    .as_deref()
                    .map(|t| format!(", signed {t}"))
                    .unwrap_or_default()
            );
        }
        if !c.actions.is_empty() {
            println!("  actions      {}", c.actions.join(", "));
        }
        if let Some(g) = &c.generation {
            println!(
                "  generation   {} stage, model {} (weights {}), seed {}, {} steps, guidance {}, {}",
                g.stage,
                g.model_id,
                short(&g.weights_sha256),
                g.seed,
                g.steps,
                g.guidance,
                g.scheduler
            );
            println!(
                "               job {} task {} worker {}",
                g.job_id, g.task_id, g.worker_id
            );
            if let Some(u) = &g.upscale {
                let mut how = format!("{} ×{}", u.method, u.factor);
                if let Some(w) = &u.weights_sha256 {
                    how += &format!(", weights {}", short(w));
                }
                if let (Some(strength), Some(steps)) = (u.strength, u.steps) {
                    how += &format!(", strength {strength}, {steps} steps");
                }
                println!("  upscale      {how}");
            }
            if let (Some(sha), Some(strength)) = (&g.init_image_sha256, g.strength) {
                println!(
                    "  img2img      init image {}, strength {strength}",
                    short(sha)
                );
            }
            if let Some(sha) = &g.mask_sha256 {
                let mut how = format!("mask {}", short(sha));
                if let Some(blur) = g.mask_blur {
                    how += &format!(", blurred {blur} px");
                }
                if let Some(pad) = g.mask_crop {
                    how +=
                        &format!(", a crop around it ({pad} px of context) rendered at full size");
                }
                println!("  inpainting   {how}");
            }
            if let Some(o) = &g.outpaint {
                let mut how = format!(
                    "new canvas left {}, top {}, right {}, bottom {} px",
                    o.left, o.top, o.right, o.bottom
                );
                if let Some(blur) = g.mask_blur {
                    how += &format!(", mask blurred {blur} px");
                }
                println!("  outpainting  {how}");
            }
            if !g.datasets.is_empty() {
                println!("  datasets     {}", g.datasets.join(", "));
            }
        }
        if let Some(i) = &c.input {
            println!(
                "  init image   {}{}",
                i.title.as_deref().unwrap_or("?"),
                match &i.manifest_label {
                    Some(l) => format!(" (with its own credentials, {l})"),
                    None => " (no credentials of its own)".into(),
                }
            );
        }
        if let Some(m) = &c.mask {
            println!("  mask         {}", m.title.as_deref().unwrap_or("?"));
        }
        if let Some(p) = &c.parent {
            println!(
                "  base image   {}{}",
                p.manifest_label.as_deref().unwrap_or("?"),
                p.watermark_id
                    .as_deref()
                    .map(|w| format!(" (watermark {w})"))
                    .unwrap_or_default()
            );
        }
        for f in &c.failures {
            println!("  failure      {f}");
        }
    }
    match &r.watermark {
        Some(w) => println!(
            "  watermark    {} ({} stage key, confidence {:.1}σ)",
            w.id, w.stage, w.confidence
        ),
        None => println!("  watermark    none found"),
    }
    if let Some(repo) = &r.repository {
        if !repo.found {
            println!(
                "  repository   watermark {} is unknown to the repository",
                repo.watermark_id
            );
            return;
        }
        if let Some(o) = &repo.original {
            println!(
                "  repository   original {} — {:?}, signed by {}",
                repo.original_sha256.as_deref().map(short).unwrap_or("?"),
                o.verdict,
                o.signer.as_deref().unwrap_or("?")
            );
            if repo.original_sha256.as_deref() != Some(repo.file_sha256.as_str()) {
                println!(
                    "               this file ({}) is not the signed original: its content differs",
                    short(&repo.file_sha256)
                );
            }
        }
        if let Some(l) = &repo.ledger {
            print_ledger(l);
        }
        if let Some(m) = &repo.model {
            println!(
                "  lineage      model {} ({}, license {})",
                m["model_id"].as_str().unwrap_or("?"),
                m["family"].as_str().unwrap_or("?"),
                m["license"].as_str().unwrap_or("?")
            );
        }
        for d in &repo.datasets {
            println!(
                "               dataset {}@{} {}",
                d["name"].as_str().unwrap_or("?"),
                d["version"].as_str().unwrap_or("?"),
                d["uri"].as_str().unwrap_or("")
            );
        }
        if let Some(first) = repo.chain.first()
            && first["stage"] == "generate"
            && let Some(init) = first["parent_sha256"].as_str().filter(|p| !p.is_empty())
        {
            println!("               uploaded init image {}", short(init));
            if let Some(mask) = first["mask_sha256"].as_str() {
                println!("               uploaded mask {}", short(mask));
            }
        }
        for a in &repo.chain {
            println!(
                "               {} job {} item {} → {} ({}×{}, watermark {}){}",
                a["stage"].as_str().unwrap_or("?"),
                a["job_id"].as_str().unwrap_or("?"),
                a["item_index"],
                short(a["sha256"].as_str().unwrap_or("?")),
                a["width"],
                a["height"],
                a["watermark_id"].as_str().unwrap_or("?"),
                a["prompt"]
                    .as_str()
                    .map(|p| format!(" prompt {p:?}"))
                    .unwrap_or_default()
            );
        }
    }
}

fn print_ledger(l: &LedgerFinding) {
    if l.proven {
        println!(
            "  ledger       completion recorded in entry {}, proven under the checkpoint at entry {} signed by {:?} ({})",
            l.entry_seq.unwrap_or(0),
            l.checkpoint_seq.unwrap_or(0),
            l.signer.as_deref().unwrap_or("?"),
            match l.trusted {
                Some(true) => "trusted",
                Some(false) => "NOT under the trust anchors",
                None => "signer not checked: no trust anchors",
            }
        );
    }
    if let Some(note) = &l.note {
        println!("  ledger       {note}");
    }
    for p in &l.problems {
        println!("  ledger       DOES NOT CHECK OUT: {p}");
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// The table printed for several files.
pub fn print_table(reports: &[FileReport]) {
    println!("{:<40} {:<14} {:<18} SIGNER", "FILE", "STATUS", "WATERMARK");
    for r in reports {
        let status = serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "{:<40} {:<14} {:<18} {}",
            r.path.display(),
            status,
            r.watermark.as_ref().map(|w| w.id.as_str()).unwrap_or("-"),
            r.credentials
                .as_ref()
                .and_then(|c| c.signer.as_deref())
                .unwrap_or("-")
        );
    }
    let count = |s: Status| reports.iter().filter(|r| r.status == s).count();
    println!(
        "{} files: {} verified, {} untrusted, {} tampered, {} recovered, {} watermark only, {} without provenance, {} unreadable",
        reports.len(),
        count(Status::Verified),
        count(Status::Untrusted),
        count(Status::Tampered),
        count(Status::Recovered),
        count(Status::WatermarkOnly),
        count(Status::NoProvenance),
        count(Status::Error)
    );
}

/// The process exit code for a set of reports: the worst one wins (1 over 2
/// over 0).
pub fn exit_code(reports: &[FileReport]) -> i32 {
    let codes: Vec<i32> = reports.iter().map(|r| r.status.exit_code()).collect();
    if codes.contains(&1) {
        1
    } else if codes.contains(&2) {
        2
    } else {
        0
    }
}
