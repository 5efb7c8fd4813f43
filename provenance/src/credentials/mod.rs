//! C2PA content credentials: the hard binding of every Hallmark output.
//!
//! - [`ca`]: a test certificate authority (`hallmark ca init`) whose signing
//!   certificates every C2PA reader accepts;
//! - [`stamp`]: builds the manifest (actions, generation record, soft
//!   binding, training-and-mining preferences, the parent image as an
//!   ingredient) and signs it into PNG, JPEG or WebP bytes;
//! - [`inspect`]: reads and validates a file's credentials against trust
//!   anchors, including the ingredients' own validation results;
//! - `timestamp`: RFC 3161 timestamps from a configured authority;
//! - [`detached`]: COSE signatures over other bytes (the audit ledger's
//!   checkpoints), with the same certificate and trust anchors.
//!
//! The `c2pa` crate does the JUMBF/COSE work; this module decides what
//! Hallmark asserts and how a verdict is phrased.

pub mod ca;
pub mod detached;
pub mod inspect;
pub mod local_tsa;
pub mod stamp;
mod timestamp;

use std::path::{Path, PathBuf};

pub use inspect::{CredentialsReport, InputSummary, Verdict, inspect};
pub use stamp::{
    GenerationRecord, OutpaintRecord, PromptPolicy, Stamp, TrainingMining, UpscaleRecord,
    sign_image,
};

/// Label of Hallmark's generation assertion (vendor namespace, per C2PA).
pub const GENERATION_LABEL: &str = "com.hallmark.generation";
/// The soft-binding algorithm name for Hallmark's watermark.
pub const SOFT_BINDING_ALG: &str = "com.hallmark.watermark.1";
/// Digital source type of everything the farm renders.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// Why credentials could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unsupported signing algorithm {0:?}: use es256 or ed25519")]
    UnknownAlgorithm(String),
    #[error("certificate authority: {0}")]
    Certificate(String),
    #[error("unsupported image format: {0} (PNG, JPEG and WebP are supported)")]
    UnsupportedFormat(String),
    #[error("C2PA: {0}")]
    C2pa(#[from] c2pa::Error),
    #[error("image: {0}")]
    Image(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("signature: {0}")]
    Signature(String),
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The signature algorithms Hallmark signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    Es256,
    Ed25519,
}

impl SigningAlgorithm {
    pub fn parse(name: &str) -> Result<Self, CredentialsError> {
        match name.to_ascii_lowercase().as_str() {
            "es256" => Ok(Self::Es256),
            "ed25519" => Ok(Self::Ed25519),
            _ => Err(CredentialsError::UnknownAlgorithm(name.into())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "es256",
            Self::Ed25519 => "ed25519",
        }
    }

    fn c2pa(self) -> c2pa::SigningAlg {
        match self {
            Self::Es256 => c2pa::SigningAlg::Es256,
            Self::Ed25519 => c2pa::SigningAlg::Ed25519,
        }
    }
}

/// A certificate chain (signing certificate first, PEM) and its private key
/// (PKCS#8 PEM): what a deployment signs with.
#[derive(Clone)]
pub struct SigningIdentity {
    pub cert_chain_pem: Vec<u8>,
    pub private_key_pem: Vec<u8>,
    pub alg: SigningAlgorithm,
    /// RFC 3161 timestamp authority; without one a manifest stops validating
    /// once the signing certificate expires.
    pub tsa_url: Option<String>,
}

impl SigningIdentity {
    pub fn load(
        cert_chain: &Path,
        private_key: &Path,
        alg: SigningAlgorithm,
        tsa_url: Option<String>,
    ) -> Result<Self, CredentialsError> {
        Ok(Self {
            cert_chain_pem: std::fs::read(cert_chain).map_err(io_error(cert_chain))?,
            private_key_pem: std::fs::read(private_key).map_err(io_error(private_key))?,
            alg,
            tsa_url,
        })
    }

    /// The signing (end-entity) certificate, DER: the first of the chain.
    pub fn certificate_der(&self) -> Result<Vec<u8>, CredentialsError> {
        pem::parse_many(&self.cert_chain_pem)
            .map_err(|e| CredentialsError::Certificate(format!("signing chain: {e}")))?
            .into_iter()
            .find(|p| p.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .ok_or_else(|| {
                CredentialsError::Certificate("the signing chain holds no certificate".into())
            })
    }

    /// Whether a signer can be made of this identity (its key and its
    /// time-stamp authority URL), without signing or asking the authority.
    pub fn check(&self) -> Result<(), CredentialsError> {
        self.signer().map(|_| ())
    }

    pub(crate) fn signer(&self) -> Result<c2pa::BoxedSigner, CredentialsError> {
        let signer = c2pa::create_signer::from_keys(
            &self.cert_chain_pem,
            &self.private_key_pem,
            self.alg.c2pa(),
            None,
        )?;
        match &self.tsa_url {
            None => Ok(signer),
            Some(url) => Ok(Box::new(
                timestamp::TimestampingSigner::new(signer, url.clone())
                    .map_err(CredentialsError::Unsupported)?,
            )),
        }
    }
}

impl std::fmt::Debug for SigningIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningIdentity")
            .field("alg", &self.alg)
            .field("tsa_url", &self.tsa_url)
            .finish_non_exhaustive()
    }
}

/// The image containers Hallmark stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }

    /// From a name such as `png`, `jpeg`, `jpg`, `webp` or a MIME type.
    pub fn parse(name: &str) -> Result<Self, CredentialsError> {
        match name.to_ascii_lowercase().trim_start_matches("image/") {
            "png" => Ok(Self::Png),
            "jpg" | "jpeg" => Ok(Self::Jpeg),
            "webp" => Ok(Self::Webp),
            other => Err(CredentialsError::UnsupportedFormat(other.into())),
        }
    }

    /// From the file's leading bytes (the extension may lie).
    pub fn sniff(bytes: &[u8]) -> Result<Self, CredentialsError> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Ok(Self::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Ok(Self::Jpeg)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Ok(Self::Webp)
        } else {
            Err(CredentialsError::UnsupportedFormat(
                "not a PNG, JPEG or WebP file".into(),
            ))
        }
    }

    pub(crate) fn image_format(self) -> image::ImageFormat {
        match self {
            Self::Png => image::ImageFormat::Png,
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Webp => image::ImageFormat::WebP,
        }
    }
}

/// Encodes pixels in `format` (JPEG at quality 95, WebP lossless).
pub fn encode_image(
    img: &image::RgbImage,
    format: ImageFormat,
) -> Result<Vec<u8>, CredentialsError> {
    let mut out = std::io::Cursor::new(Vec::new());
    let result = match format {
        ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(img)
        }
        other => img.write_to(&mut out, other.image_format()),
    };
    result.map_err(|e| CredentialsError::Image(e.to_string()))?;
    Ok(out.into_inner())
}

/// Decodes a PNG, JPEG or WebP file to RGB, refusing absurd dimensions
/// before allocating for them.
pub fn decode_image(bytes: &[u8]) -> Result<image::RgbImage, CredentialsError> {
    const MAX_PIXELS: u64 = 100_000_000;
    let format = ImageFormat::sniff(bytes)?;
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), format.image_format());
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| CredentialsError::Image(e.to_string()))?;
    Ok(img.to_rgb8())
}
