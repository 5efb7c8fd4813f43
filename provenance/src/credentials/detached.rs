//! Detached signatures over bytes that are not an image: a COSE_Sign1 made
//! with the deployment's signing certificate, the same structure C2PA signs
//! its claims with (the signing chain rides in the signature, the payload
//! does not). The audit ledger's checkpoints are signed this way, so an
//! auditor checks them against the same trust anchors as the images.

use c2pa::crypto::cose::{
    CertificateTrustPolicy, CoseError, TimeStampStorage, Verifier, cert_chain_from_sign1,
    parse_cose_sign1, sign, signing_time_from_sign1,
};
use c2pa::crypto::raw_signature::{RawSigner, RawSignerError};
use c2pa::crypto::time_stamp::{TimeStampError, TimeStampProvider, verify_time_stamp};
use c2pa::status_tracker::StatusTracker;

use super::{CredentialsError, SigningIdentity};

/// What a valid detached signature says about its signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedVerdict {
    /// The signing certificate's organization.
    pub signer: String,
    /// `es256` or `ed25519`.
    pub alg: String,
    /// Whether the signing chain leads to one of the trust anchors given;
    /// `None` when none were given.
    pub trusted: Option<bool>,
    /// The signing certificate, DER.
    pub certificate: Vec<u8>,
    /// When an RFC 3161 time-stamp authority saw the signature
    /// (milliseconds since the Unix epoch; `None`: not time-stamped). The
    /// token is checked against the signature.
    pub timestamp_ms: Option<i64>,
    /// Whether the time-stamp authority's certificate chains to the trust
    /// anchors given, for a time-stamping certificate; `None` when the
    /// signature carries no time-stamp or no anchors were given.
    pub timestamp_trusted: Option<bool>,
}

/// Signs `payload` with `identity`, time-stamped by its `tsa_url` when it
/// has one (then an authority that cannot be reached fails the signature).
pub fn sign_detached(
    identity: &SigningIdentity,
    payload: &[u8],
) -> Result<Vec<u8>, CredentialsError> {
    let signer = identity.signer()?;
    sign(
        &Raw(signer.as_ref()),
        payload,
        None,
        TimeStampStorage::V2_sigTst2_CTT,
    )
    .map_err(|e| match &identity.tsa_url {
        Some(tsa) => {
            CredentialsError::Signature(format!("signing with a time-stamp from {tsa}: {e}"))
        }
        None => CredentialsError::Signature(format!("signing: {e}")),
    })
}

/// The identity's signer (with its time-stamping, which goes out over this
/// crate's own HTTP client) as the raw signer COSE signing takes.
struct Raw<'a>(&'a dyn c2pa::Signer);

impl RawSigner for Raw<'_> {
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>, RawSignerError> {
        self.0
            .sign(data)
            .map_err(|e| RawSignerError::InternalError(e.to_string()))
    }

    fn alg(&self) -> c2pa::SigningAlg {
        self.0.alg()
    }

    fn cert_chain(&self) -> Result<Vec<Vec<u8>>, RawSignerError> {
        self.0
            .certs()
            .map_err(|e| RawSignerError::InternalError(e.to_string()))
    }

    fn reserve_size(&self) -> usize {
        self.0.reserve_size()
    }
}

impl TimeStampProvider for Raw<'_> {
    fn time_stamp_service_url(&self) -> Option<String> {
        self.0.time_authority_url()
    }

    fn send_time_stamp_request(&self, message: &[u8]) -> Option<Result<Vec<u8>, TimeStampError>> {
        self.0
            .send_timestamp_request(message)
            .map(|r| r.map_err(|e| TimeStampError::InternalError(e.to_string())))
    }
}

/// Checks that `signature` signs exactly `payload`, and whether its signer
/// chains to `trust_anchors` (PEM). A signature that does not match the
/// payload (or is not a COSE_Sign1 with a certificate chain) is an error.
pub fn verify_detached(
    signature: &[u8],
    payload: &[u8],
    trust_anchors: Option<&str>,
) -> Result<DetachedVerdict, CredentialsError> {
    let broken = |e: CoseError| CredentialsError::Signature(e.to_string());
    let mut log = StatusTracker::default();
    let info = Verifier::IgnoreProfileAndTrustPolicy
        .verify_signature(signature, payload, &[], None, &mut log)
        .map_err(broken)?;
    let sign1 = parse_cose_sign1(signature, payload, &mut log).map_err(broken)?;
    let chain = cert_chain_from_sign1(&sign1).map_err(broken)?;
    let (end_entity, rest) = chain.split_first().ok_or_else(|| {
        CredentialsError::Signature("the signature carries no certificate".into())
    })?;
    let timestamp_ms =
        signing_time_from_sign1(&sign1, payload, false).map(|t| t.timestamp_millis());
    let (trusted, timestamp_trusted) = match trust_anchors {
        None => (None, None),
        Some(pem) => {
            let mut policy = CertificateTrustPolicy::new();
            policy
                .add_trust_anchors(pem.as_bytes())
                .map_err(|e| CredentialsError::Certificate(format!("trust anchors: {e}")))?;
            (
                Some(
                    policy
                        .check_certificate_trust(rest, end_entity, None)
                        .is_ok(),
                ),
                timestamp_ms.and(time_stamp_trusted(&sign1, payload, &policy)),
            )
        }
    };
    Ok(DetachedVerdict {
        signer: info.issuer_org.unwrap_or_default(),
        alg: info
            .alg
            .map(|a| a.to_string().to_ascii_lowercase())
            .unwrap_or_default(),
        trusted,
        certificate: end_entity.clone(),
        timestamp_ms,
        timestamp_trusted,
    })
}

/// Whether the RFC 3161 token in `sign1`'s unprotected header was issued,
/// for this signature, by an authority whose time-stamping certificate
/// chains to `policy`'s anchors (`None`: the signature carries no token).
/// A token in a form this cannot read counts as untrusted.
fn time_stamp_trusted(
    sign1: &coset::CoseSign1,
    payload: &[u8],
    policy: &CertificateTrustPolicy,
) -> Option<bool> {
    use coset::cbor::Value;
    let (header, countersigns_signature) =
        sign1
            .unprotected
            .rest
            .iter()
            .find_map(|(label, value)| match label {
                coset::Label::Text(t) if t == "sigTst2" => Some((value, true)),
                coset::Label::Text(t) if t == "sigTst" => Some((value, false)),
                _ => None,
            })?;
    let field = |v: &Value, name: &str| match v {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == name))
            .map(|(_, v)| v.clone()),
        _ => None,
    };
    let token = match field(header, "tstTokens") {
        Some(Value::Array(tokens)) if tokens.len() == 1 => match field(&tokens[0], "val") {
            Some(Value::Bytes(token)) => token,
            _ => return Some(false),
        },
        _ => return Some(false),
    };
    // What the authority countersigned: the payload (sigTst), or the
    // signature as a CBOR byte string (sigTst2), in a COSE countersignature
    // structure under the signature's protected header.
    let countersigned = if countersigns_signature {
        let mut cbor = Vec::new();
        if coset::cbor::into_writer(&Value::Bytes(sign1.signature.clone()), &mut cbor).is_err() {
            return Some(false);
        }
        cbor
    } else {
        payload.to_vec()
    };
    let tbs = coset::sig_structure_data(
        coset::SignatureContext::CounterSignature,
        sign1.protected.clone(),
        None,
        &[],
        &countersigned,
    );
    let mut log = StatusTracker::default();
    Some(verify_time_stamp(&token, &tbs, policy, &mut log, true).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::SigningAlgorithm;
    use crate::credentials::ca::{CaFiles, init};

    fn identity(
        dir: &std::path::Path,
        org: &str,
        alg: SigningAlgorithm,
    ) -> (SigningIdentity, String) {
        init(dir, org, alg).unwrap();
        let files = CaFiles::in_dir(dir, alg);
        (
            files.identity(None).unwrap(),
            files.trust_anchors().unwrap(),
        )
    }

    #[test]
    fn a_detached_signature_holds_its_payload_and_names_its_signer() {
        for alg in [SigningAlgorithm::Es256, SigningAlgorithm::Ed25519] {
            let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let (id, anchors) = identity(ours.path(), "Hallmark Test", alg);
            let (_, other_anchors) = identity(theirs.path(), "Someone Else", alg);
            let payload = b"hallmark-audit-checkpoint-v1\n7\nabc\n1";
            let sig = sign_detached(&id, payload).unwrap();
            let v = verify_detached(&sig, payload, Some(&anchors)).unwrap();
            assert_eq!(v.signer, "Hallmark Test");
            assert_eq!(v.alg, alg.name());
            assert_eq!(v.trusted, Some(true));
            assert_eq!(v.timestamp_trusted, None, "no time-stamp to trust");
            let unchecked = verify_detached(&sig, payload, None).unwrap();
            assert_eq!(unchecked.trusted, None);
            assert_eq!(unchecked.timestamp_ms, None, "no authority, no time-stamp");
            assert_eq!(unchecked.certificate, id.certificate_der().unwrap());
            // Another deployment's roots do not vouch for it.
            let other = verify_detached(&sig, payload, Some(&other_anchors)).unwrap();
            assert_eq!(other.trusted, Some(false));
            // One changed byte of the payload, or of the signature, breaks it.
            assert!(
                verify_detached(&sig, b"hallmark-audit-checkpoint-v1\n8\nabc\n1", None).is_err()
            );
            let mut bad = sig.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(verify_detached(&bad, payload, None).is_err());
            assert!(verify_detached(b"not cose", payload, None).is_err());
        }
    }
}
