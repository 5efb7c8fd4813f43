//! A test certificate authority: a root and one signing certificate that
//! C2PA validators accept.
//!
//! What a C2PA signing certificate needs, learnt the hard way: an `O=` in its
//! subject (without it readers report `claimSignature.mismatch`), an allowed
//! extended key usage (emailProtection here), the digitalSignature key usage
//! and an authority key identifier. The root goes to verifiers as a trust
//! anchor; the chain in the manifest carries the signing certificate only.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{CredentialsError, SigningAlgorithm, SigningIdentity, io_error};

/// Lifetime of the test root. Without a timestamp authority a manifest stops
/// validating when its signing certificate expires, so both are long.
const ROOT_YEARS: i64 = 20;
const SIGNER_YEARS: i64 = 10;

/// The files `init` writes in a CA directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The root certificate: give it to verifiers as a trust anchor.
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    /// The signing certificate chain for the `signing.cert_chain` setting.
    pub signer_chain: PathBuf,
    /// The signing key for the `signing.private_key` setting.
    pub signer_key: PathBuf,
    pub alg: SigningAlgorithm,
}

impl CaFiles {
    pub fn in_dir(dir: &Path, alg: SigningAlgorithm) -> Self {
        Self {
            root_cert: dir.join("root.pem"),
            root_key: dir.join("root.key"),
            signer_chain: dir.join("signer.pem"),
            signer_key: dir.join("signer.key"),
            alg,
        }
    }

    /// True when every file of the CA is there.
    pub fn exist(&self) -> bool {
        [
            &self.root_cert,
            &self.root_key,
            &self.signer_chain,
            &self.signer_key,
        ]
        .iter()
        .all(|p| p.is_file())
    }

    pub fn identity(&self, tsa_url: Option<String>) -> Result<SigningIdentity, CredentialsError> {
        SigningIdentity::load(&self.signer_chain, &self.signer_key, self.alg, tsa_url)
    }

    pub fn trust_anchors(&self) -> Result<String, CredentialsError> {
        std::fs::read_to_string(&self.root_cert).map_err(io_error(&self.root_cert))
    }
}

/// Makes a root CA and a signing certificate for `organization` in `dir`.
/// Refuses to overwrite an existing CA.
pub fn init(
    dir: &Path,
    organization: &str,
    alg: SigningAlgorithm,
) -> Result<CaFiles, CredentialsError> {
    let files = CaFiles::in_dir(dir, alg);
    if files.root_cert.exists() || files.signer_chain.exists() {
        return Err(CredentialsError::Certificate(format!(
            "{} already holds a CA; remove it or pick another directory",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let (root_pem, root_key, signer_pem, signer_key) = generate(organization, alg)?;
    write_private(&files.root_key, &root_key)?;
    write_private(&files.signer_key, &signer_key)?;
    std::fs::write(&files.root_cert, root_pem).map_err(io_error(&files.root_cert))?;
    std::fs::write(&files.signer_chain, signer_pem).map_err(io_error(&files.signer_chain))?;
    Ok(files)
}

fn write_private(path: &Path, pem: &str) -> Result<(), CredentialsError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_error(path))?;
    std::io::Write::write_all(&mut file, pem.as_bytes()).map_err(io_error(path))
}

/// A certificate subject: common name and organization.
pub(crate) fn subject(common_name: &str, organization: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    dn
}

/// The subject `init` gives the root of a CA for `organization`.
pub(crate) fn root_subject(organization: &str) -> rcgen::DistinguishedName {
    subject(&format!("{organization} test root CA"), organization)
}

/// (root cert PEM, root key PEM, signer cert PEM, signer key PEM).
fn generate(
    organization: &str,
    alg: SigningAlgorithm,
) -> Result<(String, String, String, String), CredentialsError> {
    let err = |e: rcgen::Error| CredentialsError::Certificate(e.to_string());
    let sig_alg = match alg {
        SigningAlgorithm::Es256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        SigningAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
    };
    let now = time::OffsetDateTime::now_utc();
    // Backdated a little so a verifier with a slow clock accepts it.
    let not_before = now - time::Duration::hours(1);

    let root_key = KeyPair::generate_for(sig_alg).map_err(err)?;
    let mut root = CertificateParams::default();
    root.distinguished_name = root_subject(organization);
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    root.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    root.not_before = not_before;
    root.not_after = now + time::Duration::days(365 * ROOT_YEARS);
    let root_cert = root.self_signed(&root_key).map_err(err)?;
    let issuer = Issuer::new(root, &root_key);

    let signer_key = KeyPair::generate_for(sig_alg).map_err(err)?;
    let mut signer = CertificateParams::default();
    signer.distinguished_name = subject(&format!("{organization} render farm"), organization);
    signer.is_ca = IsCa::ExplicitNoCa;
    signer.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    signer.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    signer.use_authority_key_identifier_extension = true;
    signer.not_before = not_before;
    signer.not_after = now + time::Duration::days(365 * SIGNER_YEARS);
    let signer_cert = signer.signed_by(&signer_key, &issuer).map_err(err)?;

    Ok((
        root_cert.pem(),
        root_key.serialize_pem(),
        signer_cert.pem(),
        signer_key.serialize_pem(),
    ))
}
