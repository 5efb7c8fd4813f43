//! Who is calling: bearer tokens mapped to a tenant, a worker or an operator.
//!
//! With `auth = "tokens"` every gRPC call carries `authorization: Bearer
//! TOKEN`, and the coordinator knows each token only by its SHA-256 digest
//! (`auth_tokens` in the configuration), so the file that configures it
//! holds nothing a caller could present. What each role may do:
//!
//! | role | may |
//! |---|---|
//! | `tenant:NAME` | submit as `NAME`; see, watch, control and download `NAME`'s jobs only; upload inputs; list models and datasets; resolve provenance, with the prompt of its own images |
//! | `worker[:NAME]` | the `Workers` service (register, lease, complete, fail, fetch a base image); list models and datasets |
//! | `operator[:NAME]` | everything, for any tenant: registering models and datasets, listing workers, reading the audit ledger |
//! | no token | resolve provenance (public fields only), as the HTTP soft-binding API does; health and reflection |
//!
//! A token that is presented and unknown is refused on every call, public
//! ones included, so a misconfigured client learns at once. With `auth =
//! "off"` (the default: one machine, or a network where every caller is
//! trusted) every call is allowed and the request's own `tenant` fields are
//! believed, as before tokens existed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::Status;
use tonic::service::Interceptor;

/// The identity a call was made with, put in its extensions by [`Gate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: every call is allowed.
    Open,
    /// No token (only public calls).
    Anonymous,
    Tenant(String),
    Worker(String),
    Operator(String),
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
            Caller::Open => String::new(),
            Caller::Anonymous => "anonymous".into(),
            Caller::Tenant(t) => format!("tenant:{t}"),
            Caller::Worker(w) if w.is_empty() => "worker".into(),
            Caller::Worker(w) => format!("worker:{w}"),
            Caller::Operator(o) if o.is_empty() => "operator".into(),
            Caller::Operator(o) => format!("operator:{o}"),
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
            Caller::Open | Caller::Operator(_) => Ok(()),
            other => Err(other.refuse(what)),
        }
    }

    /// The `Workers` service's calls.
    pub fn require_worker(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Open | Caller::Operator(_) | Caller::Worker(_) => Ok(()),
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
            Caller::Open | Caller::Operator(_) => Ok(requested.to_string()),
            Caller::Tenant(t) if requested.is_empty() || requested == t => Ok(t.clone()),
            Caller::Tenant(t) => Err(Status::permission_denied(format!(
                "{what} as tenant {requested:?} is not allowed with tenant {t:?}'s token"
            ))),
            other => Err(other.refuse(what)),
        }
    }

    /// Whether the caller may see and act on a job of `tenant`.
    pub fn owns(&self, tenant: &str) -> bool {
        match self {
            Caller::Open | Caller::Operator(_) => true,
            Caller::Tenant(t) => t == tenant,
            Caller::Worker(_) | Caller::Anonymous => false,
        }
    }

    /// Whose private fields (the prompt) a provenance lookup shows.
    pub fn private_view(&self, requested: &str) -> PrivateView {
        match self {
            Caller::Open if !requested.is_empty() => PrivateView::Of(requested.to_string()),
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

/// The tokens a coordinator accepts, by SHA-256 digest (lowercase hex).
#[derive(Debug, Clone)]
pub struct Tokens(HashMap<String, Caller>);

impl Tokens {
    /// Reads `auth` and `auth_tokens`: `None` when authentication is off.
    pub fn from_config(
        mode: &str,
        entries: &BTreeMap<String, String>,
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
        for (digest, role) in entries {
            if !hallmark_provenance::is_sha256_hex(digest) {
                return Err(AuthConfigError(format!(
                    "auth_tokens: {digest:?} is not a SHA-256 digest (64 hex digits); `hallmark token new` prints one"
                )));
            }
            let caller = parse_role(role).ok_or_else(|| {
                AuthConfigError(format!(
                    "auth_tokens.{digest}: role {role:?} is not tenant:NAME, worker[:NAME] or operator[:NAME]"
                ))
            })?;
            tokens.insert(digest.to_ascii_lowercase(), caller);
        }
        if tokens.is_empty() {
            return Err(AuthConfigError(
                "auth = \"tokens\" with no auth_tokens: no call could be made; add tokens (`hallmark token new`) or set auth = \"off\"".into(),
            ));
        }
        Ok(Some(Self(tokens)))
    }

    /// The caller a request's metadata names.
    pub fn identify(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Status> {
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
        self.0
            .get(&token_digest(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the token is not known to this coordinator"))
    }

    /// Roles that hold at least one token, for the start-up log.
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.0.values().map(Caller::name).collect();
        roles.sort();
        roles.dedup();
        roles
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
pub struct Gate(Arc<RwLock<Option<Arc<Tokens>>>>);

impl Gate {
    pub fn new(tokens: Option<Tokens>) -> Self {
        Self(Arc::new(RwLock::new(tokens.map(Arc::new))))
    }

    fn tokens(&self) -> Option<Arc<Tokens>> {
        match self.0.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads `file` (the coordinator's configuration) every `every` and,
    /// when it changed, takes its `auth_tokens`: added tokens work and
    /// removed ones stop working on the next call. A file that no longer
    /// parses, or turns `auth` off, keeps the tokens in force (with a
    /// warning): a bad edit must not lock everyone out or open the API.
    pub fn reload_from(&self, file: PathBuf, every: Duration) -> tokio::task::JoinHandle<()> {
        let gate = self.clone();
        tokio::spawn(async move {
            let mut last = tokio::fs::read(&file).await.ok();
            loop {
                tokio::time::sleep(every).await;
                let Ok(now) = tokio::fs::read(&file).await else {
                    continue;
                };
                if last.as_ref() == Some(&now) {
                    continue;
                }
                last = Some(now);
                match gate.reload(&file) {
                    Ok(n) => {
                        tracing::info!(file = %file.display(), tokens = n, "auth_tokens reloaded")
                    }
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "auth_tokens not reloaded; the tokens in force stay")
                    }
                }
            }
        })
    }

    fn reload(&self, file: &std::path::Path) -> anyhow::Result<usize> {
        let cfg = crate::CoordinatorConfig::load(Some(file), &[])?;
        // Only a gate that started with tokens reloads them (`server.rs`).
        let tokens = Tokens::from_config(&cfg.auth, &cfg.auth_tokens)?
            .ok_or_else(|| anyhow::anyhow!("auth = \"off\" takes a restart"))?;
        let n = tokens.0.len();
        match self.0.write() {
            Ok(mut t) => *t = Some(Arc::new(tokens)),
            Err(poisoned) => *poisoned.into_inner() = Some(Arc::new(tokens)),
        }
        Ok(n)
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let caller = match self.tokens() {
            None => Caller::Open,
            Some(tokens) => tokens.identify(req.metadata())?,
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(entries: &[(&str, &str)]) -> Result<Option<Tokens>, AuthConfigError> {
        let map = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Tokens::from_config("tokens", &map)
    }

    fn bearer(token: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
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
            t.identify(&bearer(&acme)).unwrap(),
            Caller::Tenant("acme".into())
        );
        assert_eq!(
            t.identify(&bearer(&ops)).unwrap(),
            Caller::Operator(String::new())
        );
        let unknown = t.identify(&bearer("hmk_guess")).unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
        // The digest itself is not a token.
        let digest = token_digest(&acme);
        assert!(t.identify(&bearer(&digest)).is_err());
        let mut basic = tonic::metadata::MetadataMap::new();
        basic.insert("authorization", "Basic YTpi".parse().unwrap());
        assert_eq!(
            t.identify(&basic).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            t.identify(&tonic::metadata::MetadataMap::new()).unwrap(),
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
            upper.identify(&bearer("x")).unwrap(),
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
        assert_eq!(Caller::Open.acting_tenant("x", "submit").unwrap(), "x");
        assert!(!Caller::Anonymous.private_view("acme").shows("acme"));
        let view = acme.private_view("globex");
        assert!(view.shows("acme") && !view.shows("globex"));
        assert!(ops.private_view("").shows("globex"));
        assert!(Caller::Open.private_view("globex").shows("globex"));
        assert!(!Caller::Open.private_view("").shows(""));
    }
}
