//! The blob store: uploaded images kept content-addressed by sha256, in a
//! local directory (`blob_dir/ab/abcdef…`) or, through the `object_store`
//! crate, in an S3-compatible bucket (`s3://bucket/prefix/ab/abcdef…`).
//!
//! An upload is hashed as it arrives and published only when its hash and
//! size match what the worker declared, so a reader never sees a partial or
//! wrong blob. Identical content is stored once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::ObjectStore;
use sha2::{Digest, Sha256};

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
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    #[error("blob store configuration: {0}")]
    Config(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Uploads larger than this go to a temporary file instead of memory.
pub const SPILL_BYTES: usize = 16 * 1024 * 1024;
const READ_CHUNK: usize = 256 * 1024;

/// A content-addressed store of blobs.
#[derive(Clone)]
pub struct BlobStore {
    backend: Backend,
    /// Where large uploads spill while they arrive (local disk in both modes).
    spill_dir: PathBuf,
}

#[derive(Clone)]
enum Backend {
    Local(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: object_store::path::Path,
    },
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Local(root) => write!(f, "BlobStore(local {})", root.display()),
            Backend::Object { store, prefix } => write!(f, "BlobStore({store} /{prefix})"),
        }
    }
}

impl BlobStore {
    /// A store in a local directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        let spill_dir = root.join("tmp");
        std::fs::create_dir_all(&spill_dir).map_err(io(&spill_dir))?;
        Ok(Self {
            backend: Backend::Local(root),
            spill_dir,
        })
    }

    /// A store at an object-store URL (`s3://bucket/prefix`, `memory://`, …).
    /// `options` are `object_store` settings (`aws_endpoint`,
    /// `aws_allow_http`, `aws_region`, …); `AWS_*` environment variables
    /// fill in what they leave out. `spill_dir` holds large uploads in flight.
    pub fn open_url(
        url: &str,
        options: &BTreeMap<String, String>,
        spill_dir: PathBuf,
    ) -> Result<Self, BlobError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| BlobError::Config(format!("blob_url {url:?}: {e}")))?;
        let mut opts: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        opts.extend(
            options
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        let (store, prefix) = object_store::parse_url_opts(&parsed, opts)
            .map_err(|e| BlobError::Config(format!("blob_url {url:?}: {e}")))?;
        std::fs::create_dir_all(&spill_dir).map_err(io(&spill_dir))?;
        Ok(Self {
            backend: Backend::Object {
                store: Arc::from(store),
                prefix,
            },
            spill_dir,
        })
    }

    fn check_name(sha256: &str) -> Result<(), BlobError> {
        if !hallmark_provenance::is_sha256_hex(sha256) {
            return Err(BlobError::BadName(sha256.to_string()));
        }
        Ok(())
    }

    fn object_path(prefix: &object_store::path::Path, sha256: &str) -> object_store::path::Path {
        prefix.child(&sha256[..2]).child(sha256)
    }

    /// Starts an upload of at most `limit` bytes.
    pub fn writer(&self, limit: u64) -> BlobWriter {
        BlobWriter {
            store: self.clone(),
            buf: Vec::new(),
            spill: None,
            hasher: Sha256::new(),
            size: 0,
            limit,
        }
    }

    /// Reads a stored blob as a stream of chunks.
    pub async fn read(
        &self,
        sha256: &str,
    ) -> Result<BoxStream<'static, Result<Vec<u8>, BlobError>>, BlobError> {
        Self::check_name(sha256)?;
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(&sha256[..2]).join(sha256);
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => BlobError::Missing(sha256.to_string()),
                        _ => BlobError::Io {
                            path: path.clone(),
                            source: e,
                        },
                    })?;
                let stream = futures::stream::unfold((file, path), |(mut file, path)| async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; READ_CHUNK];
                    match file.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(buf), (file, path)))
                        }
                        Err(e) => Some((
                            Err(BlobError::Io {
                                path: path.clone(),
                                source: e,
                            }),
                            (file, path),
                        )),
                    }
                });
                Ok(stream.boxed())
            }
            Backend::Object { store, prefix } => {
                let got = store
                    .get(&Self::object_path(prefix, sha256))
                    .await
                    .map_err(|e| match e {
                        object_store::Error::NotFound { .. } => {
                            BlobError::Missing(sha256.to_string())
                        }
                        other => BlobError::Object(other),
                    })?;
                Ok(got
                    .into_stream()
                    .map(|r| r.map(|b| b.to_vec()).map_err(BlobError::Object))
                    .boxed())
            }
        }
    }
}

impl BlobStore {
    /// Deletes the blob `sha256`; one that is not there is no error. In a
    /// bucket under object lock the deletion fails until its retention ends.
    pub async fn remove(&self, sha256: &str) -> Result<(), BlobError> {
        Self::check_name(sha256)?;
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(&sha256[..2]).join(sha256);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Backend::Object { store, prefix } => {
                match store.delete(&Self::object_path(prefix, sha256)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    fn check_named(dir: &str, name: &str) -> Result<(), BlobError> {
        let plain = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        // Two-character folders are the blobs' shards.
        if !plain(dir) || dir.len() <= 2 || dir == "tmp" || !plain(name) {
            return Err(BlobError::BadName(format!("{dir}/{name}")));
        }
        Ok(())
    }

    /// Keeps `bytes` under `dir/name`, beside the blobs (named, not
    /// content-addressed: the audit ledger's published checkpoints). In a
    /// local directory the first file written under a name stays; in a
    /// bucket a second write replaces it unless the bucket forbids that
    /// (object lock).
    pub async fn put_named(&self, dir: &str, name: &str, bytes: Vec<u8>) -> Result<(), BlobError> {
        Self::check_named(dir, name)?;
        match &self.backend {
            Backend::Local(root) => {
                let folder = root.join(dir);
                let dest = folder.join(name);
                let tmp = folder.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
                blocking(move || {
                    std::fs::create_dir_all(&folder).map_err(io(&folder))?;
                    std::fs::write(&tmp, &bytes).map_err(io(&tmp))?;
                    // A hard link fails where the name exists: write-once.
                    let linked = std::fs::hard_link(&tmp, &dest);
                    let _ = std::fs::remove_file(&tmp);
                    match linked {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                        Err(e) => Err(io(&dest)(e)),
                    }
                })
                .await
            }
            Backend::Object { store, prefix } => {
                store
                    .put(&prefix.child(dir).child(name), bytes.into())
                    .await?;
                Ok(())
            }
        }
    }

    /// The bytes kept under `dir/name`.
    pub async fn get_named(&self, dir: &str, name: &str) -> Result<Vec<u8>, BlobError> {
        Self::check_named(dir, name)?;
        match &self.backend {
            Backend::Local(root) => {
                let path = root.join(dir).join(name);
                tokio::fs::read(&path).await.map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => BlobError::Missing(format!("{dir}/{name}")),
                    _ => io(&path)(e),
                })
            }
            Backend::Object { store, prefix } => {
                let got = store
                    .get(&prefix.child(dir).child(name))
                    .await
                    .map_err(|e| match e {
                        object_store::Error::NotFound { .. } => {
                            BlobError::Missing(format!("{dir}/{name}"))
                        }
                        other => BlobError::Object(other),
                    })?;
                Ok(got.bytes().await?.to_vec())
            }
        }
    }

    /// The names kept in `dir` that sort after `after` (all with `None`),
    /// in order.
    pub async fn list_named(
        &self,
        dir: &str,
        after: Option<&str>,
    ) -> Result<Vec<String>, BlobError> {
        Self::check_named(dir, after.unwrap_or("x"))?;
        let mut names = match &self.backend {
            Backend::Local(root) => {
                let folder = root.join(dir);
                blocking(move || {
                    let entries = match std::fs::read_dir(&folder) {
                        Ok(entries) => entries,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                        Err(e) => return Err(io(&folder)(e)),
                    };
                    let mut names = Vec::new();
                    for entry in entries {
                        let entry = entry.map_err(io(&folder))?;
                        if let Some(name) = entry.file_name().to_str()
                            && !name.starts_with('.')
                        {
                            names.push(name.to_string());
                        }
                    }
                    Ok(names)
                })
                .await?
            }
            Backend::Object { store, prefix } => {
                let folder = prefix.child(dir);
                let listing = match after {
                    Some(a) => store.list_with_offset(Some(&folder), &folder.child(a)),
                    None => store.list(Some(&folder)),
                };
                let metas: Vec<object_store::ObjectMeta> = listing.try_collect().await?;
                metas
                    .iter()
                    .filter_map(|m| m.location.filename().map(str::to_string))
                    .collect()
            }
        };
        names.retain(|n| after.is_none_or(|a| n.as_str() > a));
        names.sort();
        Ok(names)
    }
}

/// A blob being written; [`BlobWriter::finish`] checks and publishes it.
///
/// Uploads are held in memory up to [`SPILL_BYTES`] (an image is usually far
/// smaller) and published in one go; larger ones spill to a temporary file
/// as they arrive.
pub struct BlobWriter {
    store: BlobStore,
    buf: Vec<u8>,
    spill: Option<(PathBuf, std::fs::File)>,
    hasher: Sha256,
    size: u64,
    limit: u64,
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
                let path = self.store.spill_dir.join(uuid::Uuid::new_v4().to_string());
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

    /// The sha256 and size of what was written so far.
    pub fn digest(&self) -> (String, u64) {
        (hex::encode(self.hasher.clone().finalize()), self.size)
    }

    /// Checks size and hash against the declared ones and publishes the blob
    /// (a blob already stored is kept as it is). On any error nothing is left
    /// behind.
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
        let buf = std::mem::take(&mut self.buf);
        let spill = self.spill.take();
        match self.store.backend.clone() {
            Backend::Local(root) => publish_local(&root, &got, buf, spill).await?,
            Backend::Object { store, prefix } => {
                let path = BlobStore::object_path(&prefix, &got);
                let exists = match store.head(&path).await {
                    Ok(_) => true,
                    Err(object_store::Error::NotFound { .. }) => false,
                    Err(e) => return Err(e.into()),
                };
                let bytes = match spill {
                    Some((spilled, _)) => {
                        let data = tokio::fs::read(&spilled).await.map_err(io(&spilled));
                        let _ = tokio::fs::remove_file(&spilled).await;
                        data?
                    }
                    None => buf,
                };
                if !exists {
                    store.put(&path, bytes.into()).await?;
                }
            }
        }
        Ok(got)
    }
}

/// Writes the blob beside its final name and renames it into place.
async fn publish_local(
    root: &Path,
    sha256: &str,
    buf: Vec<u8>,
    spill: Option<(PathBuf, std::fs::File)>,
) -> Result<(), BlobError> {
    let dest = root.join(&sha256[..2]).join(sha256);
    // The temporary name sits beside its final one: 256 shard folders
    // spread the directory locking that one shared temp folder serialises on.
    let tmp = root
        .join(&sha256[..2])
        .join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
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
    .await
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
