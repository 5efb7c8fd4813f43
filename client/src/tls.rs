//! TLS for the embedded farm (`hallmark up --tls`): a certificate authority
//! of the farm's own in `STATE/tls/`, made on first use, which issues the
//! farm its server certificate at every start and issues client
//! certificates to the machines that join it (`hallmark tls client-cert`).
//!
//! This CA is for the farm's connections only: it signs no content, and the
//! roots that verify content credentials never include it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long the farm's TLS root is valid.
const ROOT_DAYS: i64 = 365 * 10;
/// How long an issued server or client certificate is valid. The server's
/// is issued afresh at every start.
const LEAF_DAYS: i64 = 365;

/// A certificate issued by the farm's CA: where its chain and key were
/// written.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain: PathBuf,
    pub key: PathBuf,
}

/// The farm's TLS certificate authority in a directory: `ca.pem` (give it
/// to the machines that join: they verify the farm against it) and
/// `ca.key`.
#[derive(Debug, Clone)]
pub struct FarmTlsCa {
    dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

impl FarmTlsCa {
    /// The CA kept in `dir` (the state directory's `tls/`).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
        }
    }

    /// Whether the CA has been made.
    pub fn exists(&self) -> bool {
        self.cert.is_file() && self.key.is_file()
    }

    /// The CA, made now when `dir` holds none. Half a CA (one file of the
    /// two) is refused rather than replaced: certificates it issued may
    /// still be in use.
    pub fn open_or_init(dir: &Path) -> anyhow::Result<Self> {
        let ca = Self::in_dir(dir);
        match (ca.cert.is_file(), ca.key.is_file()) {
            (true, true) => return Ok(ca),
            (false, false) => {}
            _ => anyhow::bail!(
                "{} holds half a TLS CA (ca.pem and ca.key go together); restore the missing file or remove the folder",
                dir.display()
            ),
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the TLS folder {}", dir.display()))?;
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Hallmark farm TLS CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(ROOT_DAYS);
        let cert = params.self_signed(&key).map_err(cert_error)?;
        write_file(&ca.key, &key.serialize_pem(), true)?;
        write_file(&ca.cert, &cert.pem(), false)?;
        Ok(ca)
    }

    fn issuer(&self) -> anyhow::Result<Issuer<'static, KeyPair>> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let key = KeyPair::from_pem(&read(&self.key)?)
            .map_err(|e| anyhow::anyhow!("the TLS CA key {}: {e}", self.key.display()))?;
        Issuer::from_ca_cert_pem(&read(&self.cert)?, key)
            .map_err(|e| anyhow::anyhow!("the TLS CA certificate {}: {e}", self.cert.display()))
    }

    /// Issues the farm's server certificate for `names` (DNS names or IP
    /// addresses, each checked), written as `server.pem` and `server.key`
    /// beside the CA, replacing the last one.
    pub fn issue_server(&self, names: &[String]) -> anyhow::Result<Issued> {
        for name in names {
            check_name(name)?;
        }
        let mut params = CertificateParams::new(names.to_vec()).map_err(cert_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Hallmark farm");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, "server")
    }

    /// Issues a client certificate for `name` (the subject's common name:
    /// which machine holds it), written as `NAME.pem` and `NAME.key` in
    /// `out`, which must not hold them already.
    pub fn issue_client(&self, name: &str, out: &Path) -> anyhow::Result<Issued> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || name.starts_with('.')
        {
            anyhow::bail!(
                "client certificate name {name:?}: use letters, digits, '-', '_' and '.' (it names the files too)"
            );
        }
        let issued = Issued {
            chain: out.join(format!("{name}.pem")),
            key: out.join(format!("{name}.key")),
        };
        for p in [&issued.chain, &issued.key] {
            if p.exists() {
                anyhow::bail!(
                    "{} exists already; pick another name or folder",
                    p.display()
                );
            }
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let sha256 = self.write_leaf(client_params(name), &issued)?;
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        append_line(&self.issued_log(), &format!("{sha256} {name} {at}"))?;
        Ok(issued)
    }

    /// The log of client certificates this CA issued: fingerprint, name
    /// and time, one per line.
    pub fn issued_log(&self) -> PathBuf {
        self.dir.join("issued.txt")
    }

    /// The farm's list of revoked client certificates (the coordinator's
    /// `tls_revoked_certs`), made empty when there is none.
    pub fn revoked_list(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("revoked.txt");
        if !path.exists() {
            write_file(
                &path,
                "# SHA-256 fingerprints of revoked client certificates (hallmark tls revoke)\n",
                false,
            )?;
        }
        Ok(path)
    }

    /// Revokes every client certificate issued under `name`, or the one
    /// whose fingerprint `name` is: their fingerprints are added to the
    /// revoked list, which a running farm reads again within seconds.
    /// Returns the fingerprints revoked.
    pub fn revoke(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let log = std::fs::read_to_string(self.issued_log()).unwrap_or_default();
        let wanted = name.to_ascii_lowercase();
        let found: Vec<String> = log
            .lines()
            .filter_map(|l| {
                let mut fields = l.split_whitespace();
                let (sha, who) = (fields.next()?, fields.next()?);
                (who == name || sha == wanted).then(|| sha.to_string())
            })
            .collect();
        if found.is_empty() {
            anyhow::bail!(
                "no client certificate named or fingerprinted {name:?} was issued by this farm's CA ({})",
                self.issued_log().display()
            );
        }
        let list = self.revoked_list()?;
        let already = std::fs::read_to_string(&list).unwrap_or_default();
        if already.contains("-----BEGIN X509 CRL-----") {
            anyhow::bail!(
                "{} holds a certificate revocation list: revoke {name:?} in the CRL that replaces it (a fingerprint added beside a CRL would not be read)",
                list.display()
            );
        }
        for sha in &found {
            if !already.lines().any(|l| l.starts_with(sha.as_str())) {
                append_line(&list, &format!("{sha} # {name}"))?;
            }
        }
        Ok(found)
    }

    /// Issues the farm's own client certificate (its local workers and
    /// calls, when the farm requires client certificates), written as
    /// `local-client.pem` and `local-client.key` beside the CA, replacing
    /// the last one.
    pub fn issue_own_client(&self) -> anyhow::Result<Issued> {
        self.issue(client_params("local"), "local-client")
    }

    fn issue(&self, params: CertificateParams, stem: &str) -> anyhow::Result<Issued> {
        let issued = Issued {
            chain: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        self.write_leaf(params, &issued)?;
        Ok(issued)
    }

    /// Signs and writes a leaf certificate; its SHA-256 fingerprint (hex).
    fn write_leaf(&self, mut params: CertificateParams, to: &Issued) -> anyhow::Result<String> {
        let issuer = self.issuer()?;
        let now = time::OffsetDateTime::now_utc();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_DAYS);
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
        write_file(&to.key, &key.serialize_pem(), true)?;
        write_file(&to.chain, &cert.pem(), false)?;
        Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            cert.der().as_ref(),
        )))
    }
}

/// Appends one line to `path` (made if missing).
fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn client_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn cert_error(e: rcgen::Error) -> anyhow::Error {
    anyhow::anyhow!("making a TLS certificate: {e}")
}

/// Writes `text` to `path` whole or not at all, readable by the owner
/// only when `private`.
fn write_file(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    let mode = if private { 0o600 } else { 0o644 };
    crate::remote::write_atomic_with(path, text.as_bytes(), Some(mode))
}

/// Refuses a name a server certificate cannot hold: not an IP address and
/// not a DNS name (labels of letters, digits and inner hyphens; a leading
/// `*.` wildcard allowed).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        anyhow::bail!(
            "--tls-name {name:?} is neither an IP address nor a DNS name the certificate can hold"
        );
    }
    Ok(())
}

/// The names the farm's server certificate holds: the loopback names its
/// own workers use, the address it listens on (unless that is every
/// address), this machine's host name, and `extra` (`--tls-name`).
pub fn server_names(listen_ip: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !listen_ip.is_unspecified() {
        names.push(listen_ip.to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim().to_string();
        if check_name(&host).is_ok() {
            names.push(host);
        }
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_certificate_cannot_hold_are_refused() {
        for ok in [
            "farm.example.com",
            "gpu-1",
            "*.farm.internal",
            "10.0.0.7",
            "fe80::1",
        ] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            "-gpu",
            "gpu_1",
            "a..b",
            "http://farm",
            "farm.example.com/",
            "*",
        ] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("--tls-name"), "{bad:?}: {e}");
        }
        let names = server_names(
            "10.1.2.3".parse().unwrap(),
            &["farm.lan".into(), "localhost".into()],
        );
        assert_eq!(&names[..4], ["localhost", "127.0.0.1", "::1", "10.1.2.3"]);
        assert_eq!(names.last().unwrap(), "farm.lan");
        assert_eq!(names.iter().filter(|n| *n == "localhost").count(), 1);
        assert!(!server_names("0.0.0.0".parse().unwrap(), &[]).contains(&"0.0.0.0".to_string()));
    }

    #[test]
    fn the_ca_is_made_once_and_half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let ca = FarmTlsCa::open_or_init(&tls).unwrap();
        let root = std::fs::read_to_string(&ca.cert).unwrap();
        // Opened again, it is the same CA.
        FarmTlsCa::open_or_init(&tls).unwrap();
        assert_eq!(std::fs::read_to_string(&ca.cert).unwrap(), root);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&ca.key), 0o600);
            assert_eq!(mode(&ca.cert), 0o644);
        }
        let client = ca.issue_client("gpu-1", &dir.path().join("out")).unwrap();
        assert!(
            std::fs::read_to_string(&client.chain)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let again = ca
            .issue_client("gpu-1", &dir.path().join("out"))
            .unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        let bad = ca
            .issue_client("../x", &dir.path().join("out"))
            .unwrap_err();
        assert!(bad.to_string().contains("client certificate name"), "{bad}");

        // Revoked by name: its fingerprint, as the coordinator reads it.
        let revoked = ca.revoke("gpu-1").unwrap();
        let list = std::fs::read_to_string(ca.revoked_list().unwrap()).unwrap();
        let parsed = hallmark_coordinator::auth::parse_revoked(&list).unwrap();
        assert_eq!(parsed.into_iter().collect::<Vec<_>>(), revoked);
        ca.revoke("gpu-1").unwrap();
        let again = std::fs::read_to_string(ca.revoked_list().unwrap()).unwrap();
        assert_eq!(again, list, "revoking twice lists it once");
        let unknown = ca.revoke("gpu-2").unwrap_err().to_string();
        assert!(unknown.contains("no client certificate named"), "{unknown}");
        // A list replaced by a CRL is not added to.
        let crl = "-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n";
        std::fs::write(ca.revoked_list().unwrap(), crl).unwrap();
        let beside = ca.revoke("gpu-1").unwrap_err().to_string();
        assert!(
            beside.contains("holds a certificate revocation list"),
            "{beside}"
        );
        assert_eq!(
            std::fs::read_to_string(ca.revoked_list().unwrap()).unwrap(),
            crl
        );

        std::fs::remove_file(&ca.key).unwrap();
        let half = FarmTlsCa::open_or_init(&tls).unwrap_err();
        assert!(half.to_string().contains("half a TLS CA"), "{half}");
        assert_eq!(std::fs::read_to_string(&ca.cert).unwrap(), root);
    }
}
