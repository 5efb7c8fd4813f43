//! The upload gate of invariant 4 ("nothing leaves unstamped"): an artifact
//! is recorded only when its content credentials validate, name the task it
//! completes, and carry a soft binding whose id is the watermark in its
//! pixels.

use hallmark_provenance::credentials::{self, Verdict};
use hallmark_provenance::watermark::{self, WatermarkKey};

/// What a stamped upload adds to its artifact row.
#[derive(Debug, Clone)]
pub struct CheckedStamp {
    /// 16 hex digits.
    pub watermark_id: String,
    /// The C2PA manifest store (JUMBF) as embedded in the file.
    pub manifest: Vec<u8>,
    pub manifest_label: String,
}

/// Checks uploads against the deployment's trust anchors and watermark key.
pub struct StampCheck {
    trust_anchors: Option<String>,
    key: WatermarkKey,
    check_pixels: bool,
}

impl StampCheck {
    /// With `trust_anchors` the signer must chain to one of them; without,
    /// any intact signature is accepted (trust is then the verifier's call).
    pub fn new(trust_anchors: Option<String>, key: WatermarkKey, check_pixels: bool) -> Self {
        Self {
            trust_anchors,
            key,
            check_pixels,
        }
    }

    pub fn key(&self) -> &WatermarkKey {
        &self.key
    }

    pub fn trust_anchors(&self) -> Option<&str> {
        self.trust_anchors.as_deref()
    }

    /// Why `bytes` may not be recorded as the output of `task_id`, or what
    /// to record with it.
    pub fn check(
        &self,
        bytes: &[u8],
        task_id: &str,
        declared_watermark: &str,
    ) -> Result<CheckedStamp, String> {
        let report = credentials::inspect(bytes, self.trust_anchors.as_deref())
            .map_err(|e| format!("unstamped upload: {e}"))?;
        match report.verdict {
            Verdict::Verified => {}
            Verdict::UntrustedSigner if self.trust_anchors.is_none() => {}
            Verdict::UntrustedSigner => {
                return Err(format!(
                    "upload signed by {:?}, which is not among the trust anchors",
                    report.signer.unwrap_or_default()
                ));
            }
            Verdict::NoCredentials => {
                return Err("unstamped upload: the image carries no content credentials".into());
            }
            Verdict::Invalid => {
                return Err(format!(
                    "the upload's content credentials do not validate: {}",
                    report.failures.join("; ")
                ));
            }
        }
        let generation = report
            .generation
            .ok_or("the manifest has no generation assertion")?;
        if generation.task_id != task_id {
            return Err(format!(
                "the manifest was made for task {:?}, not {task_id:?}",
                generation.task_id
            ));
        }
        let watermark_id = report
            .watermark_id
            .ok_or("the manifest has no Hallmark soft binding")?;
        if !watermark_id.eq_ignore_ascii_case(declared_watermark) {
            return Err(format!(
                "the soft binding names watermark {watermark_id}, the upload declared {declared_watermark:?}"
            ));
        }
        if self.check_pixels {
            let pixels = credentials::decode_image(bytes).map_err(|e| e.to_string())?;
            let key = self.key.for_stage(&generation.stage);
            let found = watermark::detect(&pixels, &key).map(|d| format!("{:016x}", d.payload));
            if found.as_deref() != Some(watermark_id.as_str()) {
                return Err(format!(
                    "the pixels do not carry watermark {watermark_id} (found {})",
                    found.as_deref().unwrap_or("none")
                ));
            }
        }
        let manifest = credentials::inspect::manifest_store(bytes).map_err(|e| e.to_string())?;
        Ok(CheckedStamp {
            watermark_id,
            manifest,
            manifest_label: report.manifest_label.unwrap_or_default(),
        })
    }
}
