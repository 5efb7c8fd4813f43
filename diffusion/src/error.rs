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
}
