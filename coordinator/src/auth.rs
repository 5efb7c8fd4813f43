//! Who is calling: bearer tokens mapped to a tenant, a worker or an operator.
//!
//! With `auth = "tokens"` every gRPC call carries `authorization: Bearer
//! TOKEN`, and the coordinator knows each token only by its SHA-256 digest
//! (`auth_tokens` in the configuration), so the file that configures it
//! holds nothing a caller could present. What each role may do:
//!
//! | role | may |
//! |---|---|
//! | `tenant:NAME` | submit as `NAME`; see, watch, control and download `NAME`'s jobs only; upload inputs; list models and datasets; resolve provenance, with the prompt of its own images; read its own jobs' audit ledger entries |
//! | `worker[:NAME]` | the `Workers` service (register, lease, complete, fail, fetch a base image) for the workers it registered; list models and datasets |
//! | `operator[:NAME]` | everything, for any tenant: registering models and datasets, listing workers, reading the audit ledger |
//! | no token | resolve provenance (public fields only), as the HTTP soft-binding API does; health and reflection |
//!
//! A token that is presented and unknown is refused on every call, public
//! ones included, so a misconfigured client learns at once. With `auth =
//! "off"` (the default: one machine, or a network where every caller is
//! trusted) every call is allowed and the request's own `tenant` fields are
//! believed, as before tokens existed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use hallmark_proto::client::{CLAIMED_USER_HEADER, sanitize_claim};
use tonic::Status;
use tonic::service::Interceptor;

use crate::config::TokenEntry;

/// The identity a call was made with, put in its extensions by [`Gate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: every call is allowed. It holds who the
    /// caller says it is (the CLI sends `USER@HOST`), which nothing checks;
    /// '' when it said nothing.
    Open(String),
    /// No token (only public calls).
    Anonymous,
    Tenant(String),
    Worker(String),
    Operator(String),
}

/// The SHA-256 (hex) of the TLS client certificate a call came over
/// (mutual TLS): computed once, by the gate, and put in the request's
/// extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFingerprint(pub String);

impl ClientFingerprint {
    /// The fingerprint of the certificate `req` came over; '' for none.
    pub fn of<T>(req: &tonic::Request<T>) -> String {
        req.extensions()
            .get::<ClientFingerprint>()
            .map(|f| f.0.clone())
            .unwrap_or_default()
    }

    fn of_der(der: &[u8]) -> Self {
        Self(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(der)))
    }
}

/// Prefix of the tokens `hallmark token new` makes (any string is accepted).
pub const TOKEN_PREFIX: &str = "hmk_";

impl Caller {
    /// The caller of a request that went through the gate; a request that
    /// did not (a bug) is anonymous, so it fails closed.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous)
    }

    /// Who the audit ledger and logs name for this caller.
    pub fn name(&self) -> String {
        match self {
            Caller::Open(_) => String::new(),
            Caller::Anonymous => "anonymous".into(),
            Caller::Tenant(t) => format!("tenant:{t}"),
            Caller::Worker(w) if w.is_empty() => "worker".into(),
            Caller::Worker(w) => format!("worker:{w}"),
            Caller::Operator(o) if o.is_empty() => "operator".into(),
            Caller::Operator(o) => format!("operator:{o}"),
        }
    }

    /// Who the audit ledger names for this caller's acts: its role, or
    /// with authentication off who it says it is, marked `unverified:`
    /// ('' when it said nothing).
    pub fn actor(&self) -> String {
        match self {
            Caller::Open(claim) if !claim.is_empty() => format!("unverified:{claim}"),
            other => other.name(),
        }
    }

    fn refuse(&self, what: &str) -> Status {
        match self {
            Caller::Anonymous => Status::unauthenticated(format!(
                "{what} needs a token (HALLMARK_TOKEN; `hallmark token new` makes one)"
            )),
            other => {
                Status::permission_denied(format!("{what} is not allowed for {}", other.name()))
            }
        }
    }

    /// Operators' calls (and every call with authentication off).
    pub fn require_operator(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Open(_) | Caller::Operator(_) => Ok(()),
            other => Err(other.refuse(what)),
        }
    }

    /// The `Workers` service's calls.
    pub fn require_worker(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Open(_) | Caller::Operator(_) | Caller::Worker(_) => Ok(()),
            other => Err(other.refuse(what)),
        }
    }

    /// Calls any authenticated caller may make.
    pub fn require_known(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Anonymous => Err(self.refuse(what)),
            _ => Ok(()),
        }
    }

    /// The tenant a call acts for: a tenant's token acts for its own tenant
    /// (naming another is refused; naming none means its own), an operator
    /// (or anyone with authentication off) for the one the request names.
    pub fn acting_tenant(&self, requested: &str, what: &str) -> Result<String, Status> {
        match self {
            Caller::Open(_) | Caller::Operator(_) => Ok(requested.to_string()),
            Caller::Tenant(t) if requested.is_empty() || requested == t => Ok(t.clone()),
            Caller::Tenant(t) => Err(Status::permission_denied(format!(
                "{what} as tenant {requested:?} is not allowed with tenant {t:?}'s token"
            ))),
            other => Err(other.refuse(what)),
        }
    }

    /// Whether the caller may renew, complete and fail the leases of a
    /// worker registered by `principal` (the `name` of the caller that
    /// registered it): the same worker token, an operator, or anyone with
    /// authentication off.
    pub fn drives_worker(&self, principal: &str) -> bool {
        match self {
            Caller::Open(_) | Caller::Operator(_) => true,
            Caller::Worker(_) => self.name() == principal,
            Caller::Tenant(_) | Caller::Anonymous => false,
        }
    }

    /// Whether the caller may see and act on a job of `tenant`.
    pub fn owns(&self, tenant: &str) -> bool {
        match self {
            Caller::Open(_) | Caller::Operator(_) => true,
            Caller::Tenant(t) => t == tenant,
            Caller::Worker(_) | Caller::Anonymous => false,
        }
    }

    /// Whose private fields (the prompt) a provenance lookup shows.
    pub fn private_view(&self, requested: &str) -> PrivateView {
        match self {
            Caller::Open(_) if !requested.is_empty() => PrivateView::Of(requested.to_string()),
            Caller::Operator(_) => PrivateView::All,
            Caller::Tenant(t) => PrivateView::Of(t.clone()),
            _ => PrivateView::None,
        }
    }
}

/// Whose private fields (the prompt) a provenance lookup may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivateView {
    None,
    /// Those of one tenant's images.
    Of(String),
    /// Everyone's (operators).
    All,
}

impl PrivateView {
    pub fn shows(&self, tenant: &str) -> bool {
        match self {
            PrivateView::None => false,
            PrivateView::Of(t) => t == tenant,
            PrivateView::All => true,
        }
    }
}

/// A bad `auth` or `auth_tokens` setting, naming the entry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthConfigError(String);

/// A token's role, and until when it is accepted.
#[derive(Debug, Clone)]
struct Grant {
    caller: Caller,
    /// Milliseconds since the Unix epoch; `None`: no expiry.
    expires_ms: Option<i64>,
}

/// The tokens a coordinator accepts, by SHA-256 digest (lowercase hex).
#[derive(Debug, Clone)]
pub struct Tokens(HashMap<String, Grant>);

impl Tokens {
    /// Reads `auth` and `auth_tokens`: `None` when authentication is off.
    pub fn from_config(
        mode: &str,
        entries: &BTreeMap<String, TokenEntry>,
    ) -> Result<Option<Self>, AuthConfigError> {
        match mode {
            "off" | "" => {
                return Ok(None);
            }
            "tokens" => {}
            other => {
                return Err(AuthConfigError(format!(
                    "auth = {other:?}: use \"off\" or \"tokens\""
                )));
            }
        }
        let mut tokens = HashMap::new();
        for (digest, entry) in entries {
            if !hallmark_provenance::is_sha256_hex(digest) {
                return Err(AuthConfigError(format!(
                    "auth_tokens: {digest:?} is not a SHA-256 digest (64 hex digits); `hallmark token new` prints one"
                )));
            }
            let role = entry.role();
            let caller = parse_role(role).ok_or_else(|| {
                AuthConfigError(format!(
                    "auth_tokens.{digest}: role {role:?} is not tenant:NAME, worker[:NAME] or operator[:NAME]"
                ))
            })?;
            let expires_ms = entry
                .expires()
                .map(|e| {
                    parse_time_ms(e).ok_or_else(|| {
                        AuthConfigError(format!(
                            "auth_tokens.{digest}: expires = {e:?} is not an RFC 3339 time such as \"2027-01-31T00:00:00Z\""
                        ))
                    })
                })
                .transpose()?;
            tokens.insert(digest.to_ascii_lowercase(), Grant { caller, expires_ms });
        }
        if tokens.is_empty() {
            return Err(AuthConfigError(
                "auth = \"tokens\" with no auth_tokens: no call could be made; add tokens (`hallmark token new`) or set auth = \"off\"".into(),
            ));
        }
        Ok(Some(Self(tokens)))
    }

    /// The caller a request's metadata names, at `now_ms` (milliseconds
    /// since the Unix epoch; an expired token is refused).
    pub fn identify(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        now_ms: i64,
    ) -> Result<Caller, Status> {
        let Some(value) = metadata.get("authorization") else {
            return Ok(Caller::Anonymous);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header is not `Bearer TOKEN`")
            })?;
        let grant = self
            .0
            .get(&token_digest(token))
            .ok_or_else(|| Status::unauthenticated("the token is not known to this coordinator"))?;
        match grant.expires_ms {
            Some(at) if now_ms >= at => Err(Status::unauthenticated(format!(
                "the token expired at {}; ask for a new one (`hallmark token new`)",
                format_time_ms(at)
            ))),
            _ => Ok(grant.caller.clone()),
        }
    }

    /// Roles that hold at least one token, for the start-up log.
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.0.values().map(|g| g.caller.name()).collect();
        roles.sort();
        roles.dedup();
        roles
    }

    /// How many of the tokens have expired at `now_ms` (still listed in
    /// the configuration, refused on every call).
    pub fn expired(&self, now_ms: i64) -> usize {
        self.0
            .values()
            .filter(|g| g.expires_ms.is_some_and(|at| now_ms >= at))
            .count()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// The earliest expiry (ms) of each role that holds an expiring token.
    fn earliest_expiries(&self) -> BTreeMap<String, i64> {
        let mut out: BTreeMap<String, i64> = BTreeMap::new();
        for g in self.0.values() {
            if let Some(at) = g.expires_ms {
                let e = out.entry(g.caller.name()).or_insert(at);
                *e = (*e).min(at);
            }
        }
        out
    }
}

/// An RFC 3339 time (`2027-01-31T00:00:00Z`, or with an offset) as
/// milliseconds since the Unix epoch.
pub fn parse_time_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    // humantime reads UTC times; a `±HH:MM` offset is taken off here.
    let (utc, offset_s) = match text.len().checked_sub(6).map(|i| text.split_at(i)) {
        Some((time, offset))
            if offset.len() == 6
                && (offset.starts_with('+') || offset.starts_with('-'))
                && offset.as_bytes()[3] == b':' =>
        {
            let hours: i64 = offset[1..3].parse().ok()?;
            let minutes: i64 = offset[4..6].parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            (format!("{time}Z"), sign * (hours * 3600 + minutes * 60))
        }
        _ => (text.to_string(), 0),
    };
    epoch_ms(humantime::parse_rfc3339_weak(&utc).ok()?)?.checked_sub(offset_s * 1000)
}

/// A time as milliseconds since the Unix epoch; `None` before it or past
/// what an `i64` holds.
fn epoch_ms(t: SystemTime) -> Option<i64> {
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time (seconds).
pub fn format_time_ms(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The expiry `hallmark token new` writes: `--expires-in` (a duration such
/// as `30d` or `12h`, from `now`) or `--expires` (an RFC 3339 time), as an
/// RFC 3339 UTC time; `None` for a token that does not expire.
pub fn expiry(
    expires_in: Option<&str>,
    expires: Option<&str>,
    now: SystemTime,
) -> Result<Option<String>, String> {
    let at_ms = match (expires_in, expires) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err("give --expires-in or --expires, not both".into()),
        (Some(d), None) => {
            let d = humantime::parse_duration(d.trim()).map_err(|e| {
                format!("--expires-in {d:?} is not a duration such as 30d or 12h: {e}")
            })?;
            if d.is_zero() {
                return Err("--expires-in must be longer than zero".into());
            }
            let at = now
                .checked_add(d)
                .and_then(epoch_ms)
                .ok_or_else(|| format!("--expires-in {d:?} is too far ahead"))?;
            // Rounded up to a whole second, so the printed time is not earlier.
            (at + 999) / 1000 * 1000
        }
        (None, Some(t)) => parse_time_ms(t).ok_or_else(|| {
            format!("--expires {t:?} is not an RFC 3339 time such as 2027-01-31T00:00:00Z")
        })?,
    };
    if at_ms <= epoch_ms(now).unwrap_or(0) {
        return Err(format!(
            "the expiry {} is not in the future",
            format_time_ms(at_ms)
        ));
    }
    Ok(Some(format_time_ms(at_ms)))
}

/// The `auth_tokens` line admitting a token (TOML).
pub fn token_line(digest: &str, role: &str, expires: Option<&str>) -> String {
    match expires {
        None => format!("\"{digest}\" = \"{role}\""),
        Some(at) => format!("\"{digest}\" = {{ role = \"{role}\", expires = \"{at}\" }}"),
    }
}

/// The caller a configured role names: `tenant:NAME`, `worker[:NAME]` or
/// `operator[:NAME]`.
pub fn parse_role(role: &str) -> Option<Caller> {
    let (kind, name) = match role.split_once(':') {
        Some((k, n)) => (k, Some(n)),
        None => (role, None),
    };
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= 128
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    };
    match (kind, name) {
        ("tenant", Some(n)) if valid(n) => Some(Caller::Tenant(n.into())),
        ("worker", None) => Some(Caller::Worker(String::new())),
        ("worker", Some(n)) if valid(n) => Some(Caller::Worker(n.into())),
        ("operator", None) => Some(Caller::Operator(String::new())),
        ("operator", Some(n)) if valid(n) => Some(Caller::Operator(n.into())),
        _ => None,
    }
}

/// SHA-256 of a token (lowercase hex), as configured in `auth_tokens`.
pub fn token_digest(token: &str) -> String {
    hallmark_provenance::sha256_hex(token.as_bytes())
}

/// A new token: 32 bytes from the operating system's generator.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// The interceptor in front of every service: it identifies the caller and
/// puts a [`Caller`] in the request's extensions for the handlers to check.
/// Clones share one token list, which [`Gate::reload_from`] replaces.
#[derive(Clone)]
pub struct Gate {
    tokens: Arc<RwLock<Option<Arc<Tokens>>>>,
    /// Tokens set in code (`CoordinatorConfig::pinned_tokens`), kept
    /// beside whatever a reload of the file brings.
    pinned: Arc<BTreeMap<String, TokenEntry>>,
    /// Roles whose expiry this process has published (a role whose last
    /// expiring token is removed is set to +Inf, not left stale).
    reported: Arc<Mutex<BTreeSet<String>>>,
    /// The revoked client certificates (`tls_revoked_certs`).
    revoked: Arc<RwLock<Arc<Revocations>>>,
}

/// Client certificates to refuse: by SHA-256 fingerprint (a list), or by
/// issuer and serial number (certificate revocation lists).
#[derive(Debug, Default)]
pub struct Revocations {
    fingerprints: BTreeSet<String>,
    /// (issuer's DER name, serial number's DER bytes) of each certificate
    /// a CRL revokes.
    serials: BTreeSet<(Vec<u8>, Vec<u8>)>,
    /// Each certificate's verdict against the CRLs, by fingerprint, so a
    /// client's calls parse its certificate once, not on every call. A
    /// reload replaces the whole set, so no verdict outlives its lists.
    verdicts: Mutex<HashMap<String, bool>>,
}

/// Verdicts kept before the cache starts over (a bound on its memory:
/// far more client certificates than a farm has).
const VERDICTS_KEPT: usize = 10_000;

impl Revocations {
    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.fingerprints.len() + self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the certificate `der`, of SHA-256 `fingerprint` (hex), is
    /// revoked. One that does not parse, while CRLs are in force, is.
    pub fn revokes(&self, fingerprint: &str, der: &[u8]) -> bool {
        if self.fingerprints.contains(fingerprint) {
            return true;
        }
        if self.serials.is_empty() {
            return false;
        }
        let mut verdicts = match self.verdicts.lock() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(known) = verdicts.get(fingerprint) {
            return *known;
        }
        let revoked = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => self
                .serials
                .contains(&(cert.issuer().as_raw().to_vec(), cert.raw_serial().to_vec())),
            Err(_) => true,
        };
        if verdicts.len() >= VERDICTS_KEPT {
            verdicts.clear();
        }
        verdicts.insert(fingerprint.to_string(), revoked);
        revoked
    }
}

/// Whether `bytes` are text: UTF-8 without control characters other than
/// whitespace (a DER structure is neither).
fn is_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes)
        .is_ok_and(|t| t.chars().all(|c| !c.is_control() || c.is_whitespace()))
}

/// Reads `tls_revoked_certs`: one or more certificate revocation lists
/// (PEM `X509 CRL` blocks, or one DER CRL), each of which must be signed by
/// a certificate among `client_ca` (PEM, `tls_client_ca`); or else a list
/// of fingerprints ([`parse_revoked`]). Returns the revocations and a
/// warning for each CRL past its next update (still enforced: a stale list
/// revokes no less).
pub fn parse_revocations(
    bytes: &[u8],
    client_ca: &[u8],
    now: SystemTime,
) -> Result<(Revocations, Vec<String>), String> {
    use x509_parser::pem::Pem;
    let text = String::from_utf8_lossy(bytes);
    let ders: Vec<Vec<u8>> = if text.contains("-----BEGIN X509 CRL-----") {
        let mut ders = Vec::new();
        for (i, pem) in Pem::iter_from_buffer(bytes).enumerate() {
            let pem = pem.map_err(|e| format!("PEM block {}: {e}", i + 1))?;
            if pem.label != "X509 CRL" {
                return Err(format!(
                    "PEM block {} is a {:?}, not an X509 CRL",
                    i + 1,
                    pem.label
                ));
            }
            ders.push(pem.contents);
        }
        ders
    } else if bytes.first() == Some(&0x30) && !is_text(bytes) {
        // A DER CRL (a SEQUENCE) holds binary bytes — its signature at
        // least; a fingerprint list whose first digit is "0" (0x30 too)
        // is all text.
        vec![bytes.to_vec()]
    } else {
        let fingerprints = parse_revoked(&text)?;
        return Ok((
            Revocations {
                fingerprints,
                ..Revocations::default()
            },
            Vec::new(),
        ));
    };
    let mut issuers = Vec::new();
    for pem in Pem::iter_from_buffer(client_ca) {
        let pem = pem.map_err(|e| format!("tls_client_ca: {e}"))?;
        if pem.label == "CERTIFICATE" {
            issuers.push(pem.contents);
        }
    }
    let issuers: Vec<_> = issuers
        .iter()
        .filter_map(|der| {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .map(|(_, c)| c)
        })
        .collect();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut revocations = Revocations::default();
    let mut warnings = Vec::new();
    for (i, der) in ders.iter().enumerate() {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| format!("CRL {}: not a certificate revocation list: {e}", i + 1))?;
        let issuer = crl.issuer();
        let signed = issuers.iter().any(|ca| {
            ca.subject().as_raw() == issuer.as_raw()
                && crl.verify_signature(ca.public_key()).is_ok()
        });
        if !signed {
            return Err(format!(
                "CRL {} (issuer {issuer}) is not signed by any tls_client_ca certificate",
                i + 1
            ));
        }
        if let Some(next) = crl.next_update()
            && next.timestamp() < now_s
        {
            warnings.push(format!(
                "CRL {} (issuer {issuer}) is past its next update ({next}); fetch a fresh one",
                i + 1
            ));
        }
        for revoked in crl.iter_revoked_certificates() {
            revocations
                .serials
                .insert((issuer.as_raw().to_vec(), revoked.raw_serial().to_vec()));
        }
    }
    Ok((revocations, warnings))
}

/// Reads a list of revoked client certificates: one SHA-256 fingerprint
/// per line, hex with or without colons, any case; `#` starts a comment.
/// A line that is not a fingerprint is an error naming it.
pub fn parse_revoked(text: &str) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let hex: String = line.chars().filter(|c| *c != ':').collect();
        let hex = hex.to_ascii_lowercase();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "line {}: {line:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)",
                i + 1
            ));
        }
        out.insert(hex);
    }
    Ok(out)
}

impl Gate {
    /// A gate for `auth` with the file's `auth_tokens` and the `pinned`
    /// tokens set in code; `None` when authentication is off.
    pub fn from_config(
        mode: &str,
        entries: &BTreeMap<String, TokenEntry>,
        pinned: &BTreeMap<String, TokenEntry>,
    ) -> Result<Self, AuthConfigError> {
        let tokens = Tokens::from_config(mode, &with_pinned(entries, pinned))?;
        Ok(Self {
            tokens: Arc::new(RwLock::new(tokens.map(Arc::new))),
            pinned: Arc::new(pinned.clone()),
            reported: Arc::default(),
            revoked: Arc::default(),
        })
    }

    /// Reads the revoked client certificates from `file` now (an error
    /// names the file), then again every `every` when it changes; a
    /// version that does not parse keeps the list in force, with a warning.
    /// CRLs in it must be signed by a certificate of `client_ca` (PEM).
    pub fn revoke_from(
        &self,
        file: PathBuf,
        every: Duration,
        client_ca: Vec<u8>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let parse = move |file: &std::path::Path, bytes: &[u8]| {
            let (revocations, warnings) =
                parse_revocations(bytes, &client_ca, SystemTime::now())
                    .map_err(|e| anyhow::anyhow!("tls_revoked_certs {}: {e}", file.display()))?;
            for warning in warnings {
                tracing::warn!(file = %file.display(), "tls_revoked_certs: {warning}");
            }
            Ok::<_, anyhow::Error>(revocations)
        };
        let bytes = std::fs::read(&file)
            .map_err(|e| anyhow::anyhow!("tls_revoked_certs: reading {}: {e}", file.display()))?;
        self.set_revoked(parse(&file, &bytes)?);
        let gate = self.clone();
        Ok(watch_file(
            file,
            every,
            Some(bytes),
            move |file, bytes| match parse(file, bytes) {
                Ok(revocations) => {
                    tracing::info!(file = %file.display(), revoked = revocations.len(), "revoked client certificates reloaded");
                    gate.set_revoked(revocations);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revoked client certificates not reloaded; the list in force stays")
                }
            },
        ))
    }

    fn set_revoked(&self, revocations: Revocations) {
        match self.revoked.write() {
            Ok(mut r) => *r = Arc::new(revocations),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(revocations),
        }
    }

    fn is_revoked(&self, fingerprint: &ClientFingerprint, der: &[u8]) -> bool {
        match self.revoked.read() {
            Ok(r) => r.revokes(&fingerprint.0, der),
            Err(poisoned) => poisoned.into_inner().revokes(&fingerprint.0, der),
        }
    }

    /// The tokens in force (`None`: authentication is off).
    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        match self.tokens.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Publishes when each role's first token expires,
    /// `hallmark_auth_token_expiry_timestamp_seconds{role}` (Unix seconds),
    /// for an alert ahead of it; a role with no expiring token left reads
    /// +Inf. Called at start (once metrics are on) and on every reload.
    pub fn report_expiries(&self) {
        let earliest = self
            .tokens()
            .map(|t| t.earliest_expiries())
            .unwrap_or_default();
        let mut reported = match self.reported.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        for role in reported.iter().filter(|r| !earliest.contains_key(*r)) {
            metrics::gauge!(crate::metrics::TOKEN_EXPIRY, "role" => role.clone())
                .set(f64::INFINITY);
        }
        for (role, at_ms) in &earliest {
            metrics::gauge!(crate::metrics::TOKEN_EXPIRY, "role" => role.clone())
                .set(*at_ms as f64 / 1000.0);
            reported.insert(role.clone());
        }
    }

    /// Reads `file` (the coordinator's configuration) every `every` and,
    /// when it changed, takes its `auth_tokens`: added tokens work and
    /// removed ones stop working on the next call. A file that no longer
    /// parses, or turns `auth` off, keeps the tokens in force (with a
    /// warning): a bad edit must not lock everyone out or open the API.
    pub fn reload_from(&self, file: PathBuf, every: Duration) -> tokio::task::JoinHandle<()> {
        let gate = self.clone();
        let seen = std::fs::read(&file).ok();
        watch_file(file, every, seen, move |file, _| match gate.reload(file) {
            Ok(n) => {
                tracing::info!(file = %file.display(), tokens = n, "auth_tokens reloaded")
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "auth_tokens not reloaded; the tokens in force stay")
            }
        })
    }

    fn reload(&self, file: &std::path::Path) -> anyhow::Result<usize> {
        let cfg = crate::CoordinatorConfig::load(Some(file), &[])?;
        // Only a gate that started with tokens reloads them (`server.rs`).
        let tokens = Tokens::from_config(&cfg.auth, &with_pinned(&cfg.auth_tokens, &self.pinned))?
            .ok_or_else(|| anyhow::anyhow!("auth = \"off\" takes a restart"))?;
        let n = tokens.len();
        log_expired(&tokens);
        match self.tokens.write() {
            Ok(mut t) => *t = Some(Arc::new(tokens)),
            Err(poisoned) => *poisoned.into_inner() = Some(Arc::new(tokens)),
        }
        self.report_expiries();
        Ok(n)
    }
}

/// Reads `file` every `every` and calls `changed` with its bytes whenever
/// they differ from the last read (`seen`: what was read before). A file
/// that cannot be read is skipped until it can.
fn watch_file(
    file: PathBuf,
    every: Duration,
    mut seen: Option<Vec<u8>>,
    changed: impl Fn(&std::path::Path, &[u8]) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Ok(now) = tokio::fs::read(&file).await else {
                continue;
            };
            if seen.as_ref() == Some(&now) {
                continue;
            }
            changed(&file, &now);
            seen = Some(now);
        }
    })
}

/// `entries` with the `pinned` tokens added (pinned ones win a clash).
fn with_pinned(
    entries: &BTreeMap<String, TokenEntry>,
    pinned: &BTreeMap<String, TokenEntry>,
) -> BTreeMap<String, TokenEntry> {
    let mut all = entries.clone();
    all.extend(pinned.iter().map(|(k, v)| (k.clone(), v.clone())));
    all
}

/// Warns about tokens that have expired but are still configured.
pub fn log_expired(tokens: &Tokens) {
    let expired = tokens.expired(crate::store::now_ms());
    if expired > 0 {
        tracing::warn!(
            expired,
            "auth_tokens lists expired tokens (refused on every call); remove them"
        );
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let peer_certs = req.peer_certs();
        if let Some(der) = peer_certs.as_ref().and_then(|certs| certs.first()) {
            let der: &[u8] = der.as_ref();
            let fingerprint = ClientFingerprint::of_der(der);
            if self.is_revoked(&fingerprint, der) {
                return Err(Status::unauthenticated(
                    "this client certificate has been revoked",
                ));
            }
            req.extensions_mut().insert(fingerprint);
        }
        let caller = match self.tokens() {
            None => Caller::Open(
                req.metadata()
                    .get(CLAIMED_USER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(sanitize_claim)
                    .unwrap_or_default(),
            ),
            Some(tokens) => tokens.identify(req.metadata(), crate::store::now_ms())?,
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client CA that may sign CRLs, and client certificates it issues.
    struct ClientCa {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        pem: String,
    }

    impl ClientCa {
        fn new(name: &str) -> Self {
            use rcgen::{
                BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
            };
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let pem = params.self_signed(&key).unwrap().pem();
            Self { params, key, pem }
        }

        fn issuer(&self) -> rcgen::Issuer<'_, &rcgen::KeyPair> {
            rcgen::Issuer::from_params(&self.params, &self.key)
        }

        fn client(&self, serial: u64) -> Vec<u8> {
            let mut params = rcgen::CertificateParams::new(vec!["worker".into()]).unwrap();
            params.serial_number = Some(serial.into());
            let key = rcgen::KeyPair::generate().unwrap();
            params
                .signed_by(&key, &self.issuer())
                .unwrap()
                .der()
                .to_vec()
        }

        fn crl(&self, serials: &[u64]) -> rcgen::CertificateRevocationList {
            let now = time::OffsetDateTime::now_utc();
            rcgen::CertificateRevocationListParams {
                this_update: now - time::Duration::hours(1),
                next_update: now + time::Duration::days(1),
                crl_number: 1u64.into(),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|&serial| rcgen::RevokedCertParams {
                        serial_number: serial.into(),
                        revocation_time: now,
                        reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&self.issuer())
            .unwrap()
        }
    }

    fn revoked(r: &Revocations, der: &[u8]) -> bool {
        r.revokes(&ClientFingerprint::of_der(der).0, der)
    }

    #[test]
    fn a_crl_of_the_client_ca_revokes_by_issuer_and_serial_number() {
        let ca = ClientCa::new("client CA");
        let other = ClientCa::new("another CA");
        let (seven, eight) = (ca.client(7), ca.client(8));
        let crl = ca.crl(&[7, 99]);
        let now = SystemTime::now();
        for bytes in [crl.pem().unwrap().into_bytes(), crl.der().to_vec()] {
            let (r, warnings) = parse_revocations(&bytes, ca.pem.as_bytes(), now).unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
            assert_eq!(r.len(), 2);
            assert!(revoked(&r, &seven));
            assert!(!revoked(&r, &eight));
            // The same serial number from another issuer is another certificate.
            assert!(!revoked(&r, &other.client(7)));
        }
        // Two CRLs in one file, both counted; the roots may hold several CAs.
        let both = format!("{}{}", crl.pem().unwrap(), other.crl(&[8]).pem().unwrap());
        let roots = format!("{}{}", ca.pem, other.pem);
        let (r, _) = parse_revocations(both.as_bytes(), roots.as_bytes(), now).unwrap();
        assert!(revoked(&r, &seven) && revoked(&r, &other.client(8)) && !revoked(&r, &eight));
        // Another CA's CRL is refused, naming it.
        let e = parse_revocations(
            other.crl(&[8]).pem().unwrap().as_bytes(),
            ca.pem.as_bytes(),
            now,
        )
        .unwrap_err();
        assert!(
            e.contains(
                "CRL 1 (issuer CN=another CA) is not signed by any tls_client_ca certificate"
            ),
            "{e}"
        );
        // So is one that names the CA but was signed by another key.
        let impostor = ClientCa::new("client CA");
        let e = parse_revocations(
            impostor.crl(&[8]).pem().unwrap().as_bytes(),
            ca.pem.as_bytes(),
            now,
        )
        .unwrap_err();
        assert!(e.contains("(issuer CN=client CA) is not signed"), "{e}");
        // A CRL past its next update still revokes, with a warning.
        let later = now + Duration::from_secs(2 * 86_400);
        let (r, warnings) =
            parse_revocations(crl.pem().unwrap().as_bytes(), ca.pem.as_bytes(), later).unwrap();
        assert!(revoked(&r, &seven));
        assert!(
            warnings[0].contains("is past its next update"),
            "{warnings:?}"
        );
        // A verdict is kept by fingerprint: the certificate is not parsed
        // again (these bytes would not parse, and would be refused).
        assert!(revoked(&r, &seven) && !revoked(&r, &eight));
        let (seven_fp, eight_fp) = (
            ClientFingerprint::of_der(&seven),
            ClientFingerprint::of_der(&eight),
        );
        assert!(r.revokes(&seven_fp.0, b"not a certificate"));
        assert!(!r.revokes(&eight_fp.0, b"not a certificate"));
        assert!(
            r.revokes(&"00".repeat(32), b"not a certificate"),
            "unparsed, unknown: refused"
        );
        // A fingerprint list reads as before.
        let list = format!("{}\n", ClientFingerprint::of_der(&eight).0);
        let (r, _) = parse_revocations(list.as_bytes(), ca.pem.as_bytes(), now).unwrap();
        assert!(revoked(&r, &eight) && !revoked(&r, &seven));
        // Even one whose first fingerprint starts with "0", the byte a DER
        // CRL starts with.
        let zero = format!(
            "{}\n{}\n",
            "0a".repeat(32),
            ClientFingerprint::of_der(&eight).0
        );
        let (r, _) = parse_revocations(zero.as_bytes(), ca.pem.as_bytes(), now).unwrap();
        assert!(revoked(&r, &eight) && r.len() == 2);
        // Something else in PEM is refused.
        let e = parse_revocations(
            format!("{}{}", crl.pem().unwrap(), ca.pem).as_bytes(),
            ca.pem.as_bytes(),
            now,
        )
        .unwrap_err();
        assert!(
            e.contains("PEM block 2 is a \"CERTIFICATE\", not an X509 CRL"),
            "{e}"
        );
    }

    fn tokens(entries: &[(&str, &str)]) -> Result<Option<Tokens>, AuthConfigError> {
        let map = entries
            .iter()
            .map(|(k, v)| (k.to_string(), TokenEntry::Role(v.to_string())))
            .collect();
        Tokens::from_config("tokens", &map)
    }

    /// 2026-12-06T12:00:00Z.
    const NOW: i64 = 1_796_558_400_000;

    fn bearer(token: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn revoked_fingerprints_read_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let colons = "CD:".repeat(31) + "CD";
        let set =
            parse_revoked(&format!("# revoked\n\n{hex}  # gpu-1\n  {colons}\n{hex}\n")).unwrap();
        assert_eq!(
            set.into_iter().collect::<Vec<_>>(),
            [hex.clone(), "cd".repeat(32)]
        );
        for bad in [&hex[..62], "zz".repeat(32).as_str(), "gpu-1"] {
            let e = parse_revoked(&format!("{hex}\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad}: {e}");
        }
        assert!(parse_revoked("").unwrap().is_empty());
    }

    #[test]
    fn a_token_is_known_by_its_digest_and_maps_to_its_role() {
        let (acme, ops) = (new_token().unwrap(), new_token().unwrap());
        assert!(acme.starts_with(TOKEN_PREFIX) && acme.len() == 4 + 64 && acme != ops);
        let t = tokens(&[
            (&token_digest(&acme), "tenant:acme"),
            (&token_digest(&ops), "operator"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            t.identify(&bearer(&acme), NOW).unwrap(),
            Caller::Tenant("acme".into())
        );
        assert_eq!(
            t.identify(&bearer(&ops), NOW).unwrap(),
            Caller::Operator(String::new())
        );
        let unknown = t.identify(&bearer("hmk_guess"), NOW).unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
        // The digest itself is not a token.
        let digest = token_digest(&acme);
        assert!(t.identify(&bearer(&digest), NOW).is_err());
        let mut basic = tonic::metadata::MetadataMap::new();
        basic.insert("authorization", "Basic YTpi".parse().unwrap());
        assert_eq!(
            t.identify(&basic, NOW).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            t.identify(&tonic::metadata::MetadataMap::new(), NOW)
                .unwrap(),
            Caller::Anonymous
        );
    }

    #[test]
    fn bad_auth_settings_are_refused_naming_the_entry() {
        let digest = token_digest("x");
        let upper = tokens(&[(&digest.to_ascii_uppercase(), "operator")])
            .unwrap()
            .unwrap();
        assert_eq!(
            upper.identify(&bearer("x"), NOW).unwrap(),
            Caller::Operator(String::new())
        );
        let e = tokens(&[("abc", "operator")]).unwrap_err().to_string();
        assert!(e.contains("\"abc\" is not a SHA-256 digest"), "{e}");
        let e = tokens(&[(&digest, "tenant")]).unwrap_err().to_string();
        assert!(e.contains("role \"tenant\""), "{e}");
        let e = tokens(&[(&digest, "admin")]).unwrap_err().to_string();
        assert!(e.contains("role \"admin\""), "{e}");
        let e = tokens(&[]).unwrap_err().to_string();
        assert!(e.contains("no auth_tokens"), "{e}");
        let e = Tokens::from_config("yes", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth = \"yes\""), "{e}");
        assert!(
            Tokens::from_config("off", &BTreeMap::new())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_tenant_acts_for_itself_only() {
        let acme = Caller::Tenant("acme".into());
        assert_eq!(acme.acting_tenant("", "submit").unwrap(), "acme");
        assert_eq!(acme.acting_tenant("acme", "submit").unwrap(), "acme");
        let e = acme.acting_tenant("globex", "submit").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(acme.owns("acme") && !acme.owns("globex"));
        assert!(acme.require_operator("registering a model").is_err());
        assert!(acme.require_worker("leasing").is_err());
        let ops = Caller::Operator(String::new());
        assert_eq!(
            (ops.name(), acme.name()),
            ("operator".into(), "tenant:acme".to_string())
        );
        assert_eq!(ops.acting_tenant("globex", "submit").unwrap(), "globex");
        assert!(ops.owns("globex") && ops.require_worker("leasing").is_ok());
        let worker = Caller::Worker("gpu".into());
        assert!(worker.require_worker("leasing").is_ok() && !worker.owns("acme"));
        assert_eq!(
            worker.acting_tenant("", "submit").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            Caller::Anonymous
                .require_known("listing models")
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            Caller::Open(String::new())
                .acting_tenant("x", "submit")
                .unwrap(),
            "x"
        );
        assert!(!Caller::Anonymous.private_view("acme").shows("acme"));
        let view = acme.private_view("globex");
        assert!(view.shows("acme") && !view.shows("globex"));
        assert!(ops.private_view("").shows("globex"));
        assert!(
            Caller::Open(String::new())
                .private_view("globex")
                .shows("globex")
        );
        assert!(!Caller::Open(String::new()).private_view("").shows(""));
    }

    #[test]
    fn an_expired_token_is_refused_saying_when_it_expired() {
        let (fresh, old) = (new_token().unwrap(), new_token().unwrap());
        let grant = |at: &str| TokenEntry::Grant {
            role: "tenant:acme".into(),
            expires: Some(at.into()),
        };
        let map = BTreeMap::from([
            (token_digest(&fresh), grant("2026-12-06T13:00:00Z")),
            (token_digest(&old), grant("2026-12-06T12:00:00+01:00")),
        ]);
        let t = Tokens::from_config("tokens", &map).unwrap().unwrap();
        assert_eq!(
            t.identify(&bearer(&fresh), NOW).unwrap(),
            Caller::Tenant("acme".into())
        );
        let e = t.identify(&bearer(&old), NOW).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("expired at 2026-12-06T11:00:00Z"),
            "{e:?}"
        );
        assert_eq!(t.expired(NOW), 1);
        // At its expiry to the millisecond, the fresh one is refused too.
        let at = parse_time_ms("2026-12-06T13:00:00Z").unwrap();
        assert!(t.identify(&bearer(&fresh), at - 1).is_ok());
        assert!(t.identify(&bearer(&fresh), at).is_err());
        assert_eq!(t.expired(at), 2);

        let bad = BTreeMap::from([(token_digest(&old), grant("next tuesday"))]);
        let e = Tokens::from_config("tokens", &bad).unwrap_err().to_string();
        assert!(
            e.contains("expires = \"next tuesday\" is not an RFC 3339 time"),
            "{e}"
        );
    }

    #[test]
    fn token_new_writes_an_expiry_the_coordinator_reads_back() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(NOW as u64 + 400);
        assert_eq!(expiry(None, None, now).unwrap(), None);
        let in_a_day = expiry(Some("1day"), None, now).unwrap().unwrap();
        assert_eq!(in_a_day, "2026-12-07T12:00:01Z");
        assert_eq!(parse_time_ms(&in_a_day), Some(NOW + 86_400_000 + 1_000));
        assert_eq!(
            expiry(None, Some("2027-01-31T00:00:00Z"), now)
                .unwrap()
                .as_deref(),
            Some("2027-01-31T00:00:00Z")
        );
        for (expires_in, expires, says) in [
            (Some("soon"), None, "not a duration"),
            (Some("0s"), None, "longer than zero"),
            (None, Some("2026-12-01T00:00:00Z"), "not in the future"),
            (None, Some("31/01/2027"), "not an RFC 3339 time"),
            (Some("1d"), Some("2027-01-31T00:00:00Z"), "not both"),
        ] {
            let e = expiry(expires_in, expires, now).unwrap_err();
            assert!(e.contains(says), "{expires_in:?} {expires:?}: {e}");
        }
        // The line `token new` prints is the entry the configuration reads.
        let line = token_line(&token_digest("t"), "worker:a", Some(&in_a_day));
        let parsed: BTreeMap<String, TokenEntry> = toml_entry(&line);
        let entry = &parsed[&token_digest("t")];
        assert_eq!(
            (entry.role(), entry.expires()),
            ("worker:a", Some(in_a_day.as_str()))
        );
        let plain: BTreeMap<String, TokenEntry> =
            toml_entry(&token_line(&token_digest("t"), "operator", None));
        assert_eq!(
            plain[&token_digest("t")],
            TokenEntry::Role("operator".into())
        );
    }

    /// An `[auth_tokens]` table read the way the coordinator reads its file.
    fn toml_entry(line: &str) -> BTreeMap<String, TokenEntry> {
        let cfg = config::Config::builder()
            .add_source(config::File::from_str(
                &format!("[auth_tokens]\n{line}\n"),
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap();
        cfg.get("auth_tokens").unwrap()
    }
}
