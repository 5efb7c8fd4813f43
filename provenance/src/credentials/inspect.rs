//! Reads a file's content credentials and says whether they hold.
//!
//! The `c2pa` crate validates the signature, the hash binding and the chain
//! against the trust anchors. Two things it leaves to the caller are done
//! here: an ingredient's *recorded* validation results (a child signed over a
//! tampered parent otherwise reads valid) and Hallmark's own assertions.

use std::io::Cursor;
use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use super::stamp::SoftBindingAssertion;
use super::{CredentialsError, GENERATION_LABEL, GenerationRecord, ImageFormat, SOFT_BINDING_ALG};

/// The validation status code of a signer outside the trust anchors.
const UNTRUSTED: &str = "signingCredential.untrusted";

/// How the title of an inpainting render's mask ingredient begins (then the task id).
pub(crate) const MASK_TITLE_PREFIX: &str = "inpainting mask of";

/// A `c2pa` context that validates against `trust_anchors` (PEM), or
/// against nothing (every signer untrusted) when there are none.
pub(crate) fn context(trust_anchors: Option<&str>) -> Result<Arc<c2pa::Context>, CredentialsError> {
    let mut settings = json!({
        // Thumbnails need the c2pa `add_thumbnails` feature, which is off.
        "builder": { "thumbnail": { "enabled": false } },
        "verify": {
            "verify_trust": true,
            "verify_after_reading": true,
            "remote_manifest_fetch": false,
            "ocsp_fetch": false,
        },
    });
    if let Some(anchors) = trust_anchors {
        settings["trust"] = json!({ "trust_anchors": anchors });
    }
    Ok(c2pa::Context::new().with_settings(settings)?.into_shared())
}

/// The outcome of checking a file's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Signature, hash binding, ingredients and chain all hold.
    Verified,
    /// Intact, but the signer does not chain to a trust anchor.
    UntrustedSigner,
    /// The manifest does not match the file or does not validate.
    Invalid,
    /// The file carries no content credentials.
    NoCredentials,
}

/// The parent (base image) named by an upscale's manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ParentSummary {
    pub title: Option<String>,
    pub manifest_label: Option<String>,
    pub generation: Option<GenerationRecord>,
    pub watermark_id: Option<String>,
}

/// The init image an img2img render names as its `inputTo` ingredient.
#[derive(Debug, Clone, Serialize)]
pub struct InputSummary {
    pub title: Option<String>,
    /// The input's own manifest, when it came with content credentials.
    pub manifest_label: Option<String>,
    pub generation: Option<GenerationRecord>,
}

/// What a file's credentials say and whether they hold.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialsReport {
    pub verdict: Verdict,
    pub format: Option<&'static str>,
    pub manifest_label: Option<String>,
    /// Issuer (organisation) of the signing certificate.
    pub signer: Option<String>,
    pub signer_common_name: Option<String>,
    pub signed_at: Option<String>,
    /// `code: explanation` for every failure, the ingredients' included.
    pub failures: Vec<String>,
    pub actions: Vec<String>,
    pub digital_source_type: Option<String>,
    pub generation: Option<GenerationRecord>,
    /// Hex watermark id from the soft binding.
    pub watermark_id: Option<String>,
    pub parent: Option<ParentSummary>,
    /// img2img: the init image ingredient.
    pub input: Option<InputSummary>,
    /// Inpainting: the mask ingredient (an `inputTo` one too).
    pub mask: Option<InputSummary>,
}

impl CredentialsReport {
    fn empty(verdict: Verdict, format: Option<ImageFormat>) -> Self {
        Self {
            verdict,
            format: format.map(ImageFormat::mime),
            manifest_label: None,
            signer: None,
            signer_common_name: None,
            signed_at: None,
            failures: Vec::new(),
            actions: Vec::new(),
            digital_source_type: None,
            generation: None,
            watermark_id: None,
            parent: None,
            input: None,
            mask: None,
        }
    }

    /// True when the signer is not trusted but nothing else is wrong.
    pub fn only_untrusted(&self) -> bool {
        self.verdict == Verdict::UntrustedSigner
    }
}

/// Reads and validates `bytes`. A file that is not PNG, JPEG or WebP is an
/// error; a readable image without credentials is `NoCredentials`; damaged
/// credentials are `Invalid` with the reason.
pub fn inspect(
    bytes: &[u8],
    trust_anchors: Option<&str>,
) -> Result<CredentialsReport, CredentialsError> {
    let format = ImageFormat::sniff(bytes)?;
    let context = context(trust_anchors)?;
    let reader = match c2pa::Reader::from_shared_context(&context)
        .with_stream(format.mime(), Cursor::new(bytes))
    {
        Ok(reader) => reader,
        Err(c2pa::Error::JumbfNotFound | c2pa::Error::ProvenanceMissing) => {
            return Ok(CredentialsReport::empty(
                Verdict::NoCredentials,
                Some(format),
            ));
        }
        Err(e) => {
            let mut report = CredentialsReport::empty(Verdict::Invalid, Some(format));
            report.failures.push(format!("manifest unreadable: {e}"));
            return Ok(report);
        }
    };
    Ok(report_from(&reader, format))
}

/// Reads `manifest` (a detached C2PA manifest store, as the repository keeps
/// it) against `bytes`: the credentials an altered copy of a file would have
/// had. Hash mismatches then say how the content differs from what was signed.
pub fn inspect_detached(
    manifest: &[u8],
    bytes: &[u8],
    trust_anchors: Option<&str>,
) -> Result<CredentialsReport, CredentialsError> {
    let format = ImageFormat::sniff(bytes)?;
    let context = context(trust_anchors)?;
    let reader = c2pa::Reader::from_shared_context(&context).with_manifest_data_and_stream(
        manifest,
        format.mime(),
        Cursor::new(bytes),
    )?;
    Ok(report_from(&reader, format))
}

/// The manifest store embedded in `bytes`, as raw JUMBF.
pub fn manifest_store(bytes: &[u8]) -> Result<Vec<u8>, CredentialsError> {
    let format = ImageFormat::sniff(bytes)?;
    Ok(c2pa::jumbf_io::load_jumbf_from_stream(
        format.mime(),
        &mut Cursor::new(bytes),
    )?)
}

fn report_from(reader: &c2pa::Reader, format: ImageFormat) -> CredentialsReport {
    let mut report = CredentialsReport::empty(Verdict::Invalid, Some(format));
    let Some(manifest) = reader.active_manifest() else {
        report.failures.push("no active manifest".into());
        return report;
    };
    report.manifest_label = manifest.label().map(str::to_string);
    if let Some(sig) = manifest.signature_info() {
        report.signer = sig.issuer.clone();
        report.signer_common_name = sig.common_name.clone();
        report.signed_at = sig.time.clone();
    }
    let (generation, watermark_id) = hallmark_assertions(manifest);
    report.generation = generation;
    report.watermark_id = watermark_id;
    if let Ok(actions) = manifest.find_assertion::<serde_json::Value>("c2pa.actions.v2") {
        for action in actions["actions"].as_array().into_iter().flatten() {
            if let Some(name) = action["action"].as_str() {
                report.actions.push(name.to_string());
            }
            if let Some(dst) = action["digitalSourceType"].as_str()
                && report.digital_source_type.is_none()
            {
                report.digital_source_type = Some(dst.to_string());
            }
        }
    }

    let mut untrusted = false;
    if let Some(results) = reader.validation_results() {
        let active = results.active_manifest().into_iter();
        let deltas = results
            .ingredient_deltas()
            .into_iter()
            .flatten()
            .map(|d| d.validation_deltas());
        for status in active.chain(deltas).flat_map(|codes| codes.failure()) {
            if status.code() == UNTRUSTED {
                untrusted = true;
            } else {
                report.failures.push(describe(status));
            }
        }
    }
    // What the signer saw when it took the parent in: a child signed over a
    // tampered parent is not verified, whatever its own signature says.
    for ingredient in manifest.ingredients() {
        let recorded = ingredient
            .validation_results()
            .and_then(|r| r.active_manifest())
            .map(|codes| codes.failure().as_slice())
            .unwrap_or_default();
        for status in recorded {
            if status.code() != UNTRUSTED {
                report.failures.push(format!(
                    "ingredient {:?}: {}",
                    ingredient.title().unwrap_or("?"),
                    describe(status)
                ));
            }
        }
        if ingredient.is_parent() {
            let parent_manifest = ingredient
                .active_manifest()
                .and_then(|label| reader.get_manifest(label));
            let (generation, watermark_id) =
                parent_manifest.map(hallmark_assertions).unwrap_or_default();
            report.parent = Some(ParentSummary {
                title: ingredient.title().map(str::to_string),
                manifest_label: ingredient.active_manifest().map(str::to_string),
                generation,
                watermark_id,
            });
        } else if *ingredient.relationship() == c2pa::Relationship::InputTo {
            let label = ingredient.active_manifest();
            let summary = InputSummary {
                title: ingredient.title().map(str::to_string),
                manifest_label: label.map(str::to_string),
                generation: label
                    .and_then(|l| reader.get_manifest(l))
                    .and_then(|m| hallmark_assertions(m).0),
            };
            // The stamp names the mask's ingredient "mask" (its label) and
            // titles it so; the init image is the other input.
            let is_mask = ingredient.label() == Some("mask")
                || ingredient
                    .title()
                    .is_some_and(|t| t.starts_with(MASK_TITLE_PREFIX));
            if is_mask {
                report.mask = Some(summary);
            } else {
                report.input = Some(summary);
            }
        }
    }
    report.verdict = if !report.failures.is_empty() {
        Verdict::Invalid
    } else if untrusted || reader.validation_state() != c2pa::ValidationState::Trusted {
        Verdict::UntrustedSigner
    } else {
        Verdict::Verified
    };
    report
}

fn describe(status: &c2pa::validation_status::ValidationStatus) -> String {
    match status.explanation() {
        Some(why) => format!("{}: {why}", status.code()),
        None => status.code().to_string(),
    }
}

/// The generation record and the watermark id, where the manifest has them.
fn hallmark_assertions(manifest: &c2pa::Manifest) -> (Option<GenerationRecord>, Option<String>) {
    let generation = manifest.find_assertion(GENERATION_LABEL).ok();
    let watermark_id = manifest
        .find_assertion::<SoftBindingAssertion>(c2pa::assertions::labels::SOFT_BINDING)
        .ok()
        .filter(|sb| sb.alg == SOFT_BINDING_ALG)
        .and_then(|sb| sb.blocks.into_iter().next())
        .and_then(|block| <[u8; 8]>::try_from(block.value.as_slice()).ok())
        .map(hex::encode);
    (generation, watermark_id)
}
