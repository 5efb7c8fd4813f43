//! Why a model could not be loaded or an image not rendered.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    BadModel(String),
    #[error(
        "weights file {path} has sha256 {actual}, but the registry records {expected}: refusing to render with altered weights"
    )]
    WeightsMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("unknown scheduler {0:?} (known: {known})", known = hallmark_proto::SCHEDULERS.join(", "))]
    UnknownScheduler(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the {stage} produced non-finite values (NaN or infinity{hint}); no image was written")]
    NonFinite { stage: &'static str, hint: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl DiffusionError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// Whether the device ran out of memory — CUDA's allocator, cuBLAS or
    /// cuDNN failing to allocate (no CUDA error stays set after one) —, so
    /// a smaller batch may fit where this one did not.
    pub fn is_out_of_device_memory(&self) -> bool {
        const MARKERS: [&str; 3] = [
            "CUDA_ERROR_OUT_OF_MEMORY",
            "CUBLAS_STATUS_ALLOC_FAILED",
            "CUDNN_STATUS_ALLOC_FAILED",
        ];
        match self {
            Self::Candle(e) => {
                let message = e.to_string();
                MARKERS.iter().any(|m| message.contains(m))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_exhaustion_is_told_from_other_failures() {
        // As cudarc and candle word them (candle wraps the driver's error).
        let candle = |m: &str| DiffusionError::Candle(candle_core::Error::Cuda(m.into()));
        for m in [
            r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
            "CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
            "CUDNN_STATUS_ALLOC_FAILED",
        ] {
            assert!(candle(m).is_out_of_device_memory(), "{m}");
        }
        for e in [
            candle(r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access")"#),
            DiffusionError::Candle(candle_core::Error::Msg("shape mismatch".into())),
            DiffusionError::NonFinite {
                stage: "UNet",
                hint: String::new(),
            },
            DiffusionError::BadRequest("CUDA_ERROR_OUT_OF_MEMORY in a prompt".into()),
        ] {
            assert!(!e.is_out_of_device_memory(), "{e}");
        }
    }
}
