//! Signing and trust for the CLI: the configured certificate, or in
//! single-node mode a local test CA made in the state directory on first use
//! (so `hallmark render` output verifies out of the box on this machine).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hallmark_provenance::credentials::{SigningAlgorithm, SigningIdentity, ca};
use hallmark_worker::stamp::StampSettings;
use hallmark_worker::{StampConfig, Stamping};

use crate::config::ClientConfig;

/// The local test CA of single-node mode.
pub fn local_ca(cfg: &ClientConfig) -> ca::CaFiles {
    ca::CaFiles::in_dir(&cfg.state_dir.join("ca"), SigningAlgorithm::Es256)
}

/// What the embedded farm signs with, and the root its coordinator checks.
pub struct FarmSigning {
    pub identity: SigningIdentity,
    /// PEM file of the root the signature chains to, when it is known.
    pub anchors_path: Option<PathBuf>,
}

/// The configured identity, or the local test CA's (made now if missing,
/// which is said once on stderr).
pub fn farm_signing(cfg: &ClientConfig) -> anyhow::Result<FarmSigning> {
    let alg = SigningAlgorithm::parse(&cfg.signing_alg)?;
    match (&cfg.signing_cert_chain, &cfg.signing_private_key) {
        (Some(chain), Some(key)) => Ok(FarmSigning {
            identity: SigningIdentity::load(chain, key, alg, cfg.tsa_url.clone())
                .context("loading the configured signing certificate")?,
            anchors_path: cfg.trust_anchors.clone(),
        }),
        (Some(_), None) | (None, Some(_)) => anyhow::bail!(
            "set both signing_cert_chain and signing_private_key, or neither (for a local test CA)"
        ),
        (None, None) => {
            let files = local_ca(cfg);
            if !files.exist() {
                let dir = cfg.state_dir.join("ca");
                ca::init(&dir, "Hallmark local", SigningAlgorithm::Es256)
                    .with_context(|| format!("making a local test CA in {}", dir.display()))?;
                eprintln!(
                    "no signing certificate configured: made a local test CA in {} \
                     (outputs are signed with it; `hallmark verify` on this machine trusts it; \
                     set signing_cert_chain/signing_private_key for real credentials)",
                    dir.display()
                );
            }
            Ok(FarmSigning {
                identity: files.identity(cfg.tsa_url.clone())?,
                anchors_path: Some(files.root_cert.clone()),
            })
        }
    }
}

/// The roots `verify` trusts: the configured anchors and the local test
/// CA's root when there is one. `extra` (a `--trust-anchors` flag) replaces
/// both.
pub fn trust_anchors(
    cfg: &ClientConfig,
    extra: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading trust anchors {}", p.display()))
    };
    if let Some(p) = extra {
        return Ok(Some(read(p)?));
    }
    let mut pem = String::new();
    if let Some(p) = &cfg.trust_anchors {
        pem.push_str(&read(p)?);
        pem.push('\n');
    }
    let local = local_ca(cfg);
    if local.root_cert.is_file() {
        pem.push_str(&read(&local.root_cert)?);
    }
    Ok((!pem.trim().is_empty()).then_some(pem))
}

/// The stamping stage of the embedded farm's workers.
pub fn stamping(cfg: &ClientConfig, signing: &FarmSigning) -> anyhow::Result<Arc<Stamping>> {
    Ok(Stamping::new(StampConfig::from_settings(StampSettings {
        identity: signing.identity.clone(),
        trust_anchors: signing.anchors_path.as_deref(),
        watermark_key: &cfg.watermark_key,
        prompt_policy: &cfg.prompt_policy,
        training_mining: &cfg.training_mining,
        output_format: &cfg.output_format,
    })?)?)
}
