//! Provenance primitives shared by the worker, the coordinator and the client.
//!
//! - content hashing and the weights digest that ties a model id to the exact
//!   bytes a worker loads;
//! - [`watermark`]: the invisible, keyed, self-synchronising watermark that
//!   survives metadata stripping, re-encoding, resizing, cropping and small
//!   rotations (the C2PA soft binding);
//! - [`credentials`]: C2PA content credentials, signed and inspected;
//! - [`ledger`]: the audit ledger's hash chain and the auditor's check of it;
//! - [`merkle`]: the ledger's Merkle tree, its inclusion and consistency proofs.

pub mod credentials;
pub mod ledger;
pub mod merkle;
pub mod watermark;

use sha2::{Digest, Sha256};

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` looks like a sha256 digest: 64 hex digits (either case).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One digest for a model's weight files: the sha256 of the file itself when
/// there is one file registered as `*`, otherwise the sha256 of the sorted
/// `path:sha256` lines, so the digest does not depend on listing order.
pub fn weights_digest<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut files: Vec<(&str, &str)> = files.into_iter().collect();
    if let [(path, sha)] = files.as_slice()
        && *path == "*"
    {
        return sha.to_ascii_lowercase();
    }
    files.sort();
    let mut hasher = Sha256::new();
    for (path, sha) in files {
        hasher.update(path.as_bytes());
        hasher.update(b":");
        hasher.update(sha.to_ascii_lowercase().as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_digest_ignores_listing_order_but_not_content() {
        let a = weights_digest([("unet.safetensors", "aa"), ("vae.safetensors", "bb")]);
        let b = weights_digest([("vae.safetensors", "bb"), ("unet.safetensors", "aa")]);
        let c = weights_digest([("vae.safetensors", "bc"), ("unet.safetensors", "aa")]);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
