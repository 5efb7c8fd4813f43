//! Talking to a coordinator: connect, submit, watch with progress bars, download.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hallmark_proto::client::{AuthChannel, BearerToken, ClientTls};
use hallmark_proto::v1::jobs_client::JobsClient;
use hallmark_proto::v1::provenance_client::ProvenanceClient;
use hallmark_proto::v1::registry_client::RegistryClient;
use hallmark_proto::v1::workers_client::WorkersClient;
use hallmark_proto::v1::{Artifact, Chunk, DownloadArtifactRequest, InputImage, Job, JobRef};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::output;

/// Clients of the coordinator's services over one connection.
#[derive(Clone)]
pub struct Remote {
    pub jobs: JobsClient<AuthChannel>,
    pub workers: WorkersClient<AuthChannel>,
    pub registry: RegistryClient<AuthChannel>,
    pub provenance: ProvenanceClient<AuthChannel>,
}

impl Remote {
    /// Uploads an input image (an img2img job's init image) in chunks.
    pub async fn upload_input(&self, bytes: &[u8]) -> anyhow::Result<InputImage> {
        const CHUNK: usize = 1024 * 1024;
        let chunks: Vec<Chunk> = bytes
            .chunks(CHUNK)
            .map(|c| Chunk { data: c.to_vec() })
            .collect();
        Ok(self
            .jobs
            .clone()
            .upload_input(tokio_stream::iter(chunks))
            .await
            .map_err(rpc)
            .context("uploading the init image")?
            .into_inner())
    }

    /// Connects to the coordinator at `url` with the configuration's token
    /// and TLS settings.
    pub async fn connect_as(url: &str, cfg: &crate::config::ClientConfig) -> anyhow::Result<Self> {
        Self::connect(url, cfg.token.as_deref(), &cfg.client_tls()?).await
    }

    /// Connects to the coordinator at `url` (`https://`: over TLS as `tls`
    /// says); every call presents `token` when one is given (a coordinator
    /// with `auth = "tokens"` needs it).
    pub async fn connect(url: &str, token: Option<&str>, tls: &ClientTls) -> anyhow::Result<Self> {
        // Without a token, the calls say who makes them, for the ledger of
        // a coordinator with authentication off (which marks it unverified).
        let bearer = BearerToken::new(token)
            .map_err(|e| anyhow::anyhow!("token (HALLMARK_TOKEN or `token` in the config): {e}"))?
            .claiming(&hallmark_proto::client::local_user());
        let channel = hallmark_proto::client::endpoint(url, tls)
            .map_err(anyhow::Error::msg)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot reach the coordinator at {url}; is it running?"))?;
        let channel = bearer.on(channel);
        if url.starts_with("https://") {
            // Under TLS 1.3 a server that turns the client's certificate
            // down (or wants one) says so only after the handshake, so the
            // first call finds out: make it here, where the cause is known.
            // Any answer of the coordinator's own (even a refusal) will do.
            let probe = JobsClient::new(channel.clone())
                .get_job(JobRef::default())
                .await;
            if let Err(status) = probe
                && std::error::Error::source(&status).is_some()
            {
                let hint = match &tls.identity {
                    None => "if it requires client certificates, set HALLMARK_TLS_CLIENT_CERT and HALLMARK_TLS_CLIENT_KEY to one its roots accept".to_string(),
                    Some((cert, _)) => format!(
                        "it may not accept the client certificate {}",
                        cert.display()
                    ),
                };
                bail!(
                    "cannot reach the coordinator at {url} over TLS: {} ({hint})",
                    rpc(status)
                );
            }
        }
        Ok(Self {
            jobs: JobsClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024),
            workers: WorkersClient::new(channel.clone()),
            registry: RegistryClient::new(channel.clone()),
            provenance: ProvenanceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        })
    }

    pub async fn job(&self, job_id: &str) -> anyhow::Result<Job> {
        Ok(self
            .jobs
            .clone()
            .get_job(JobRef {
                job_id: job_id.into(),
            })
            .await
            .map_err(rpc)?
            .into_inner())
    }

    /// Follows a job until it ends; progress bars on stderr, or one JSON line
    /// per update on stdout with `json`. Re-attaches after a dropped stream.
    pub async fn watch(&self, job_id: &str, json: bool, quiet: bool) -> anyhow::Result<Job> {
        let bars = Bars::new(quiet || json);
        let mut last: Option<Job> = None;
        let mut failures = 0;
        loop {
            let stream = self
                .jobs
                .clone()
                .watch_job(JobRef {
                    job_id: job_id.into(),
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => return Err(rpc(s)),
                Err(s) => {
                    failures += 1;
                    if failures > 30 {
                        return Err(rpc(s));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(job)) => {
                        failures = 0;
                        if json {
                            println!("{}", output::job_json(&job));
                        }
                        bars.update(&job);
                        let done =
                            matches!(job.state.as_str(), "succeeded" | "failed" | "canceled");
                        last = Some(job);
                        if done {
                            bars.finish();
                            return last.context("watch ended without a job state");
                        }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        tracing::debug!(error = %s, "watch stream dropped; re-attaching");
                        break;
                    }
                }
            }
            if let Some(j) = &last
                && matches!(j.state.as_str(), "succeeded" | "failed" | "canceled")
            {
                return Ok(j.clone());
            }
            failures += 1;
            if failures > 30 {
                bail!("lost the coordinator while watching job {job_id}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub async fn artifacts(&self, job_id: &str) -> anyhow::Result<Vec<Artifact>> {
        Ok(self
            .jobs
            .clone()
            .list_artifacts(JobRef {
                job_id: job_id.into(),
            })
            .await
            .map_err(rpc)?
            .into_inner()
            .artifacts)
    }

    /// Writes every artifact of a job into `dir` (`00012.png`, `00012-x2.png`)
    /// with `job.json` describing them. Each file is checked against its
    /// sha256 and written atomically.
    pub async fn download(
        &self,
        job_id: &str,
        dir: &Path,
    ) -> anyhow::Result<Vec<(PathBuf, Artifact)>> {
        let job = self.job(job_id).await?;
        let artifacts = self.artifacts(job_id).await?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating output directory {}", dir.display()))?;
        let widths: BTreeMap<String, u32> = artifacts
            .iter()
            .map(|a| (a.sha256.clone(), a.width))
            .collect();
        let mut written = Vec::with_capacity(artifacts.len());
        for a in artifacts {
            let ext = match a.media_type.as_str() {
                "image/jpeg" => "jpg",
                "image/webp" => "webp",
                _ => "png",
            };
            let name = match a.stage.as_str() {
                "generate" => format!("{:05}.{ext}", a.item_index),
                "upscale" => {
                    let factor = widths
                        .get(&a.parent_sha256)
                        .and_then(|w| a.width.checked_div(*w))
                        .unwrap_or(0);
                    format!("{:05}-{}x{factor}.{ext}", a.item_index, a.stage)
                }
                stage => format!("{:05}-{stage}.{ext}", a.item_index),
            };
            let path = dir.join(name);
            let bytes = self.fetch(&a.sha256).await?;
            write_atomic(&path, &bytes)?;
            written.push((path, a));
        }
        let manifest = serde_json::json!({
            "job": output::job_json(&job),
            "artifacts": written.iter().map(|(p, a)| {
                let mut v = output::artifact_json(a);
                v["file"] = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default().into();
                v
            }).collect::<Vec<_>>(),
        });
        write_atomic(
            &dir.join("job.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        Ok(written)
    }

    pub async fn fetch(&self, sha256: &str) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .jobs
            .clone()
            .download_artifact(DownloadArtifactRequest {
                sha256: sha256.into(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(rpc)? {
            bytes.extend_from_slice(&chunk.data);
        }
        let got = hallmark_provenance::sha256_hex(&bytes);
        if got != sha256 {
            bail!("downloaded artifact hashes to {got}, expected {sha256}; not writing it");
        }
        Ok(bytes)
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it, so a
/// crash never leaves a half-written image. The file gets the permissions
/// any new file gets (0666 less the umask), not a temporary file's 0600:
/// rendered images are for sharing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, bytes, None)
}

/// [`write_atomic`], the file getting exactly `mode` (on Unix, whatever
/// the umask; set before any byte is written) when one is given.
pub fn write_atomic_with(path: &Path, bytes: &[u8], mode: Option<u32>) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("writing into {}", dir.display()))?;
    #[cfg(unix)]
    if let Some(mode) = mode {
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn rpc(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::NotFound => "not found",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::PermissionDenied => "not allowed",
        tonic::Code::ResourceExhausted => "rate limited",
        _ => "coordinator error",
    };
    // A transport error's cause (a TLS alert, a reset) is in its sources.
    let mut message = s.message().to_string();
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(&format!(": {text}"));
        }
        source = e.source();
    }
    anyhow::anyhow!("{code}: {message}")
}

/// One progress bar per stage, with the queue position, waiting reason and ETA.
struct Bars {
    multi: Option<MultiProgress>,
    bars: std::sync::Mutex<BTreeMap<String, ProgressBar>>,
    status: Option<ProgressBar>,
}

impl Bars {
    fn new(hidden: bool) -> Self {
        if hidden {
            return Self {
                multi: None,
                bars: Default::default(),
                status: None,
            };
        }
        let multi = MultiProgress::new();
        let status = multi.add(ProgressBar::new_spinner());
        Self {
            multi: Some(multi),
            bars: Default::default(),
            status: Some(status),
        }
    }

    fn update(&self, job: &Job) {
        let Some(multi) = &self.multi else { return };
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        for st in &job.stages {
            let bar = bars.entry(st.stage.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(st.total));
                b.set_style(
                    ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                b.set_prefix(st.stage.clone());
                b
            });
            bar.set_length(st.total);
            bar.set_position(st.succeeded + st.failed + st.canceled);
            bar.set_message(format!("{} running, {} failed", st.leased, st.failed));
        }
        if let Some(s) = &self.status {
            let mut msg = format!("job {} {}", job.job_id, job.state);
            if job.queue_position > 0 {
                msg.push_str(&format!(" · {} tasks ahead", job.queue_position));
            }
            if job.eta_ms > 0 {
                msg.push_str(&format!(" · eta {}", output::human_ms(job.eta_ms)));
            }
            if !job.waiting_reason.is_empty() {
                msg.push_str(&format!(" · waiting: {}", job.waiting_reason));
            }
            s.set_message(msg);
            s.tick();
        }
    }

    fn finish(&self) {
        if let Ok(bars) = self.bars.lock() {
            for b in bars.values() {
                b.finish();
            }
        }
        if let Some(s) = &self.status {
            s.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_get_the_permissions_of_any_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.png");
        std::fs::write(&plain, b"x").unwrap();
        let atomic = dir.path().join("image.png");
        write_atomic(&atomic, b"image bytes").unwrap();
        assert_eq!(std::fs::read(&atomic).unwrap(), b"image bytes");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            // Both are 0666 less this process's umask (0644 under the usual
            // 022); a temporary file's own 0600 would differ from it.
            assert_eq!(mode(&atomic), mode(&plain), "{:o}", mode(&atomic));
        }
        // Writing over an existing file replaces it whole.
        write_atomic(&atomic, b"new").unwrap();
        assert_eq!(std::fs::read(&atomic).unwrap(), b"new");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 2, "no temporary file left behind");
    }
}
