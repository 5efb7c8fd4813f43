//! The blob store: uploaded images kept content-addressed by sha256 in a
//! local directory (`blob_dir/ab/abcdef…`).
//!
//! An upload streams into a temporary file beside its final place, is hashed
//! on the way, and is renamed into place only when its hash and size match
//! what the worker declared, so a reader never sees a partial file.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("upload is {got} bytes but its header says {want}")]
    SizeMismatch { got: u64, want: u64 },
    #[error("upload hashes to {got} but its header says {want}")]
    HashMismatch { got: String, want: String },
    #[error("upload is over the {0}-byte limit")]
    TooLarge(u64),
    #[error("no blob {0}")]
    Missing(String),
    #[error("{0:?} is not a sha256")]
    BadName(String),
    #[error("blob store I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A content-addressed directory of blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// A blob being written; [`BlobWriter::finish`] checks and publishes it.
pub struct BlobWriter {
    root: PathBuf,
    tmp: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl BlobStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(Self { root })
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf, BlobError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BlobError::BadName(sha256.to_string()));
        }
        Ok(self.root.join(&sha256[..2]).join(sha256))
    }

    /// Starts an upload of at most `limit` bytes.
    pub async fn writer(&self, limit: u64) -> Result<BlobWriter, BlobError> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        Ok(BlobWriter {
            root: self.root.clone(),
            tmp,
            file,
            hasher: Sha256::new(),
            size: 0,
            limit,
        })
    }

    /// Opens a stored blob for reading.
    pub async fn open_blob(&self, sha256: &str) -> Result<tokio::fs::File, BlobError> {
        let path = self.path_of(sha256)?;
        tokio::fs::File::open(&path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => BlobError::Missing(sha256.to_string()),
                _ => BlobError::Io { path, source: e },
            })
    }
}

impl BlobWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(BlobError::TooLarge(self.limit));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).await.map_err(io(&self.tmp))
    }

    /// Checks size and hash against the declared ones and moves the blob into
    /// place. On any error the temporary file is removed.
    pub async fn finish(mut self, want_sha256: &str, want_size: u64) -> Result<String, BlobError> {
        let result = self.publish(want_sha256, want_size).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        result
    }

    async fn publish(&mut self, want_sha256: &str, want_size: u64) -> Result<String, BlobError> {
        if self.size != want_size {
            return Err(BlobError::SizeMismatch {
                got: self.size,
                want: want_size,
            });
        }
        let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if !got.eq_ignore_ascii_case(want_sha256) {
            return Err(BlobError::HashMismatch {
                got,
                want: want_sha256.to_string(),
            });
        }
        self.file.flush().await.map_err(io(&self.tmp))?;
        let dir = self.root.join(&got[..2]);
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let dest = dir.join(&got);
        tokio::fs::rename(&self.tmp, &dest)
            .await
            .map_err(io(&dest))?;
        Ok(got)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // An abandoned upload (client went away) leaves no partial file.
        if self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
