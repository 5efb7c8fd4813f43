//! A local RFC 3161 time-stamp authority for tests and single-machine
//! demonstrations: `openssl ts -reply` (the `openssl` command must be on
//! the PATH) behind a one-request-per-connection HTTP server on loopback,
//! with a time-stamping certificate issued by a [`CaFiles`] root. It is not
//! an authority anyone else trusts.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, CustomExtension, Issuer, KeyPair, KeyUsagePurpose};

use super::ca::CaFiles;
use super::{CredentialsError, io_error as io};

/// Starts an authority whose files live in `dir`, with a certificate from
/// the root of `ca` (made by `ca::init` for `organization`); its URL. It
/// serves until the process ends.
pub fn start(ca: &CaFiles, organization: &str, dir: &Path) -> Result<String, CredentialsError> {
    let cert_err = |e: rcgen::Error| CredentialsError::Certificate(format!("local TSA: {e}"));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let root_key_pem = std::fs::read_to_string(&ca.root_key).map_err(io(&ca.root_key))?;
    let root_key = KeyPair::from_pem(&root_key_pem).map_err(cert_err)?;
    // The root's subject as `ca::init` writes it, with the root's key.
    let mut root = CertificateParams::default();
    root.distinguished_name = super::ca::root_subject(organization);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name =
        super::ca::subject(&format!("{organization} local TSA"), organization);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // extKeyUsage = critical, timeStamping (RFC 3161 requires it critical).
    let mut eku = CustomExtension::from_oid_content(
        &[2, 5, 29, 37],
        vec![
            0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08,
        ],
    );
    eku.set_criticality(true);
    params.custom_extensions = vec![eku];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    let path = |n: &str| dir.join(n);
    let write = |n: &str, text: String| std::fs::write(path(n), text).map_err(io(&path(n)));
    write("tsa.pem", cert.pem())?;
    write("tsa.key", key.serialize_pem())?;
    write("serial", "01\n".into())?;
    write(
        "ts.cnf",
        format!(
            "[ tsa ]\ndefault_tsa = t\n[ t ]\nserial = {}\ncrypto_device = builtin\nsigner_digest = sha256\n\
             default_policy = 1.2.3.4.1\ndigests = sha256, sha384, sha512\naccuracy = secs:1\n\
             ordering = yes\ntsa_name = no\ness_cert_id_chain = no\ness_cert_id_alg = sha256\n",
            path("serial").display()
        ),
    )?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io(dir))?;
    let url = format!("http://{}/tsa", listener.local_addr().map_err(io(dir))?);
    let root: PathBuf = dir.to_path_buf();
    std::thread::spawn(move || serve(listener, &root));
    Ok(url)
}

/// Answers each connection's time-stamp query with `openssl ts -reply`.
fn serve(listener: std::net::TcpListener, root: &Path) {
    use std::io::{BufRead, Read, Write};
    for stream in listener.incoming().flatten() {
        let mut reader = std::io::BufReader::new(stream);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut query = vec![0u8; len.min(1 << 20)];
        if reader.read_exact(&mut query).is_err()
            || std::fs::write(root.join("q.tsq"), &query).is_err()
        {
            continue;
        }
        let ok = std::process::Command::new("openssl")
            .args(["ts", "-reply", "-config"])
            .arg(root.join("ts.cnf"))
            .arg("-queryfile")
            .arg(root.join("q.tsq"))
            .arg("-signer")
            .arg(root.join("tsa.pem"))
            .arg("-inkey")
            .arg(root.join("tsa.key"))
            .arg("-out")
            .arg(root.join("r.tsr"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        let body = if ok {
            std::fs::read(root.join("r.tsr")).unwrap_or_default()
        } else {
            Vec::new()
        };
        let status = if ok && !body.is_empty() {
            "200 OK"
        } else {
            "500 Internal Server Error"
        };
        let mut stream = reader.into_inner();
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/timestamp-reply\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(&body);
    }
}
