//! The blob store: uploaded images kept content-addressed by sha256 in a
//! local directory (`blob_dir/ab/abcdef…`).
//!
//! An upload streams into a temporary file beside its final place, is hashed
//! on the way, and is renamed into place only when its hash and size match
//! what the worker declared, so a reader never sees a partial file.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use std::io::Write;

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
///
/// Uploads are held in memory up to [`SPILL_BYTES`] (an image is usually far
/// smaller) and published with one blocking call; larger ones spill to a
/// temporary file as they arrive.
pub struct BlobWriter {
    root: PathBuf,
    buf: Vec<u8>,
    spill: Option<(PathBuf, std::fs::File)>,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

/// Uploads larger than this go to a temporary file instead of memory.
pub const SPILL_BYTES: usize = 16 * 1024 * 1024;

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
    pub fn writer(&self, limit: u64) -> BlobWriter {
        BlobWriter {
            root: self.root.clone(),
            buf: Vec::new(),
            spill: None,
            hasher: Sha256::new(),
            size: 0,
            limit,
        }
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
        if self.spill.is_none() && self.buf.len() + chunk.len() <= SPILL_BYTES {
            self.buf.extend_from_slice(chunk);
            return Ok(());
        }
        let (path, file) = match self.spill.take() {
            Some(s) => s,
            None => {
                let path = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
                let p = path.clone();
                let file = blocking(move || std::fs::File::create(&p).map_err(io(&p))).await?;
                (path, file)
            }
        };
        let mut data = std::mem::take(&mut self.buf);
        data.extend_from_slice(chunk);
        let (file, result) = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let r = file.write_all(&data);
            (file, r)
        })
        .await
        .map_err(|e| BlobError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        result.map_err(io(&path))?;
        self.spill = Some((path, file));
        Ok(())
    }

    /// Checks size and hash against the declared ones and moves the blob into
    /// place (a blob already stored is kept as it is). On any error nothing
    /// is left behind.
    pub async fn finish(mut self, want_sha256: &str, want_size: u64) -> Result<String, BlobError> {
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
        let dest = self.root.join(&got[..2]).join(&got);
        // The temporary name sits beside its final one: 256 shard folders
        // spread the directory locking that one shared temp folder serialises on.
        let tmp = self
            .root
            .join(&got[..2])
            .join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let buf = std::mem::take(&mut self.buf);
        let spill = self.spill.take();
        blocking(move || {
            if dest.exists() {
                if let Some((path, _)) = spill {
                    let _ = std::fs::remove_file(path);
                }
                return Ok(());
            }
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            let from = match spill {
                Some((path, _)) => path,
                None => {
                    std::fs::write(&tmp, &buf).map_err(io(&tmp))?;
                    tmp
                }
            };
            std::fs::rename(&from, &dest).map_err(|e| {
                let _ = std::fs::remove_file(&from);
                BlobError::Io {
                    path: dest.clone(),
                    source: e,
                }
            })
        })
        .await?;
        Ok(got)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // An abandoned or refused upload leaves no partial file.
        if let Some((path, _)) = self.spill.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BlobError::Io {
            path: PathBuf::from("<blocking task>"),
            source: std::io::Error::other(e),
        })?
}
