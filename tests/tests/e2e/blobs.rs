//! The blob store's behaviour on both backends: a local directory, and an
//! S3-compatible server (moto, started here) through `object_store`.
//!
//! See [`hallmark_e2e::Moto`] for where the moto server comes from.

use futures::StreamExt;
use hallmark_coordinator::blobs::{BlobError, BlobStore, SPILL_BYTES};
use hallmark_e2e::Moto;

fn s3_store(m: &Moto, spill: &std::path::Path) -> BlobStore {
    BlobStore::open_url(&m.bucket_url(), &m.options(), spill.to_path_buf()).expect("open s3 store")
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn read_all(store: &BlobStore, sha256: &str) -> Result<Vec<u8>, BlobError> {
    let mut stream = store.read(sha256).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend(chunk?);
    }
    Ok(out)
}

async fn upload(
    store: &BlobStore,
    chunks: &[&[u8]],
    sha256: &str,
    size: u64,
) -> Result<String, BlobError> {
    let mut w = store.writer(64 * 1024 * 1024);
    for c in chunks {
        w.write(c).await?;
    }
    w.finish(sha256, size).await
}

async fn behaves_as_a_content_addressed_store(store: &BlobStore) {
    let data = b"\x89PNG pretend image bytes".repeat(100);
    let (a, b) = data.split_at(700);
    let digest = sha(&data);
    // A wrong hash or size is refused and nothing is stored.
    let err = upload(store, &[a, b], &sha(b"other"), data.len() as u64)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::HashMismatch { .. }), "{err}");
    let err = upload(store, &[a], &digest, data.len() as u64)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
    assert!(matches!(
        read_all(store, &digest).await,
        Err(BlobError::Missing(_))
    ));
    // A good upload round-trips, and a second copy is accepted once stored.
    assert_eq!(
        upload(store, &[a, b], &digest, data.len() as u64)
            .await
            .unwrap(),
        digest
    );
    assert_eq!(
        upload(store, &[&data], &digest, data.len() as u64)
            .await
            .unwrap(),
        digest
    );
    assert_eq!(read_all(store, &digest).await.unwrap(), data);
    // Uploads bigger than the in-memory limit spill to disk and still arrive whole.
    let big: Vec<u8> = (0..SPILL_BYTES + 300_000)
        .map(|i| (i % 251) as u8)
        .collect();
    let parts: Vec<&[u8]> = big.chunks(1 << 20).collect();
    let big_sha = sha(&big);
    assert_eq!(
        upload(store, &parts, &big_sha, big.len() as u64)
            .await
            .unwrap(),
        big_sha
    );
    assert_eq!(read_all(store, &big_sha).await.unwrap(), big);
    assert!(matches!(
        store.read("../etc/passwd").await,
        Err(BlobError::BadName(_))
    ));
}

/// Named files beside the blobs (the published audit checkpoints): kept,
/// read back, listed in order after a given name; names that could reach
/// outside their folder or into the blobs' shards are refused.
async fn keeps_named_files(store: &BlobStore) {
    let dir = "ledger-checkpoints";
    assert_eq!(
        store.list_named(dir, None).await.unwrap(),
        Vec::<String>::new()
    );
    for n in [3u8, 1, 2, 10] {
        let name = format!("{n:020}.json");
        store.put_named(dir, &name, vec![n; 5]).await.unwrap();
    }
    assert_eq!(
        store
            .get_named(dir, &format!("{:020}.json", 10))
            .await
            .unwrap(),
        vec![10; 5]
    );
    let all = store.list_named(dir, None).await.unwrap();
    let want: Vec<String> = [1, 2, 3, 10]
        .iter()
        .map(|n| format!("{n:020}.json"))
        .collect();
    assert_eq!(all, want);
    assert_eq!(
        store.list_named(dir, Some(&want[1])).await.unwrap(),
        want[2..].to_vec()
    );
    assert_eq!(
        store.list_named(dir, Some(&want[3])).await.unwrap(),
        Vec::<String>::new()
    );
    assert!(matches!(
        store.get_named(dir, "missing.json").await,
        Err(BlobError::Missing(_))
    ));
    for (d, n) in [
        (dir, "../escape"),
        (dir, ".hidden"),
        ("ab", "x.json"),
        ("tmp", "x.json"),
        ("a/b", "x.json"),
    ] {
        assert!(
            matches!(
                store.put_named(d, n, vec![1]).await,
                Err(BlobError::BadName(_))
            ),
            "{d}/{n} was accepted"
        );
    }
}

#[tokio::test]
async fn local_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    behaves_as_a_content_addressed_store(&store).await;
    keeps_named_files(&store).await;
    // Locally the first file written under a name stays.
    let first = format!("{:020}.json", 1);
    store
        .put_named("ledger-checkpoints", &first, b"second".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.get_named("ledger-checkpoints", &first).await.unwrap(),
        vec![1; 5]
    );
    let stray = std::fs::read_dir(dir.path().join("ledger-checkpoints"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(
        stray, 0,
        "no temporary files are left beside the named ones"
    );
    let leftovers = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "no temporary files are left behind");
}

#[tokio::test]
async fn s3_compatible_store() {
    let m = Moto::start();
    let spill = tempfile::tempdir().unwrap();
    let store = s3_store(&m, spill.path());
    behaves_as_a_content_addressed_store(&store).await;
    keeps_named_files(&store).await;
    assert_eq!(
        std::fs::read_dir(spill.path()).unwrap().count(),
        0,
        "spilled uploads are cleaned up"
    );
}
