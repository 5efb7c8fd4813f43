//! The C2PA Soft Binding Resolution API over HTTP, so third-party verifiers
//! can resolve Hallmark watermarks without gRPC:
//!
//! - `GET  /services/supportedAlgorithms`
//! - `GET  /matches/byBinding?alg=…&value=…` (value: base64 of the 8-byte id,
//!   or its 16 hex digits)
//! - `POST /matches/byContent?alg=…` (body: the image; the watermark is read
//!   here)
//! - `GET  /manifests/{manifestId}` (the C2PA manifest store, `application/c2pa`)
//! - `GET  /lineage/{manifestId}` (Hallmark's own: the lineage as JSON,
//!   without private fields)
//!
//! The API is public, so each client address has a rate bucket
//! (`http_requests_per_minute`, shared by the replicas through Redis): a
//! request over it is answered 429 with `Retry-After`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use hallmark_proto::v1::ArtifactRecord;
use hallmark_provenance::credentials::{self, SOFT_BINDING_ALG};
use hallmark_provenance::watermark;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::PrivateView;
use crate::config::CoordinatorConfig;
use crate::metrics as m;
use crate::rate::{Quota, RateRefusal};
use crate::service::{Coordinator, Resolution};
use crate::store::{ArtifactKey, now_ms};

const MAX_CONTENT: usize = 64 * 1024 * 1024;

/// The HTTP API's TLS: the coordinator's own certificate chain and key
/// (`tls_cert`, `tls_key`), HTTP/2 or HTTP/1.1 by ALPN, no client
/// certificates (the API is public: it serves what third-party verifiers
/// may read).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("tls_cert is not a PEM certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("tls_key is not a PEM private key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("tls_cert and tls_key do not make a TLS identity")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How the API counts a client's requests.
#[derive(Debug, Clone)]
pub struct ClientRate {
    /// Requests per minute per client; 0: no limit.
    per_minute: u32,
    /// The proxy's header naming the client, when there is a proxy.
    address_header: Option<HeaderName>,
}

impl ClientRate {
    /// `http_requests_per_minute` and `http_client_address_header`.
    pub fn from_config(config: &CoordinatorConfig) -> anyhow::Result<Self> {
        let address_header = match config.http_client_address_header.as_deref() {
            None | Some("") => None,
            Some(name) => Some(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                anyhow::anyhow!(
                    "http_client_address_header {name:?} is not an HTTP header name (e.g. x-forwarded-for)"
                )
            })?),
        };
        Ok(Self {
            per_minute: config.http_requests_per_minute,
            address_header,
        })
    }

    /// Whose bucket a request from `peer` with `headers` counts in: the
    /// proxy header's last address when one is configured and readable,
    /// else the peer's.
    fn client(&self, peer: IpAddr, headers: &HeaderMap) -> String {
        let forwarded = self.address_header.as_ref().and_then(|name| {
            let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
            let last = value.rsplit(',').next()?.trim();
            last.parse::<IpAddr>()
                .ok()
                .or_else(|| last.parse::<SocketAddr>().ok().map(|a| a.ip()))
        });
        client_key(forwarded.unwrap_or(peer))
    }
}

/// The bucket of one address: IPv4 as it is, IPv6 by its /64 (one host is
/// commonly given a whole /64), an IPv4-mapped IPv6 address as the IPv4.
fn client_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Admits a request under its client's bucket, or answers 429.
async fn limit_rate(
    State((state, rate)): State<(Arc<Coordinator>, Arc<ClientRate>)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let client = rate.client(peer.ip(), request.headers());
    let limit = u64::from(rate.per_minute);
    match state
        .limiter
        .admit(Quota::ApiRequests, &client, 1, limit, now_ms())
        .await
    {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            metrics::counter!(m::API_RATE_LIMITED).increment(1);
            let retry_after = match &refusal {
                RateRefusal::Exhausted { retry_after, .. } => retry_after.as_secs().max(1),
                RateRefusal::TooLarge { .. } => 60,
            };
            let mut response = problem(StatusCode::TOO_MANY_REQUESTS, refusal.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after.into());
            response
        }
    }
}

/// Starts serving on `listener` until `shutdown` turns true: HTTPS with
/// `tls` (the gRPC server's certificate), else plain HTTP.
pub fn serve(
    listener: TcpListener,
    state: Arc<Coordinator>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<TlsAcceptor>,
    rate: ClientRate,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/services/supportedAlgorithms", get(supported_algorithms))
        .route("/matches/byBinding", get(by_binding))
        .route("/matches/byContent", post(by_content))
        .route("/manifests/{id}", get(manifest))
        .route("/lineage/{id}", get(lineage))
        .layer(DefaultBodyLimit::max(MAX_CONTENT))
        .layer(middleware::from_fn_with_state(
            (state.clone(), Arc::new(rate)),
            limit_rate,
        ))
        .with_state(state);
    if let Some(tls) = tls {
        tokio::spawn(serve_tls(listener, app, tls, shutdown));
        return Ok(addr);
    }
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "HTTP soft-binding API stopped");
        }
    });
    Ok(addr)
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections until shutdown; each is served on its own task,
/// and a failed handshake ends only that connection.
async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause, not spin.
                    tracing::warn!(error = %e, "HTTP soft-binding API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { drop(shutdown.wait_for(|s| *s).await) } => return,
        };
        let tls = tls.clone();
        let app = app.clone().layer(axum::Extension(ConnectInfo(peer)));
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP soft-binding API: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "HTTP soft-binding API: TLS handshake timed out");
                    return;
                }
            };
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP soft-binding API: connection ended");
            }
        });
    }
}

fn problem(code: StatusCode, message: impl Into<String>) -> Response {
    (code, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn supported_algorithms() -> Response {
    axum::Json(json!({
        "watermarks": [{ "alg": SOFT_BINDING_ALG }],
        "fingerprints": [],
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ByBinding {
    alg: Option<String>,
    value: Option<String>,
}

/// Why `alg` is not one this service resolves, if it is not.
fn alg_refusal(alg: Option<&str>) -> Option<Response> {
    match alg {
        Some(SOFT_BINDING_ALG) => None,
        Some(other) => Some(problem(
            StatusCode::BAD_REQUEST,
            format!("unsupported alg {other:?}: this service resolves {SOFT_BINDING_ALG}"),
        )),
        None => Some(problem(
            StatusCode::BAD_REQUEST,
            "the alg parameter is required",
        )),
    }
}

/// The 8-byte id as 16 hex digits, from base64 (the API's encoding) or hex.
fn watermark_id(value: &str) -> Option<String> {
    if value.len() == 16 && value.chars().all(|c| c.is_ascii_hexdigit()) {
        return Some(value.to_ascii_lowercase());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value))
        .ok()?;
    (bytes.len() == 8).then(|| hex::encode(bytes))
}

async fn matches_for(state: &Coordinator, id: &str) -> Response {
    match state
        .resolve(ArtifactKey::WatermarkId(id), &PrivateView::None)
        .await
    {
        Ok(Some(found)) => {
            let label = found.artifact.map(|a| a.manifest_label).unwrap_or_default();
            axum::Json(json!({ "matches": [{ "manifestId": label }] })).into_response()
        }
        Ok(None) => axum::Json(json!({ "matches": [] })).into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn by_binding(State(state): State<Arc<Coordinator>>, Query(q): Query<ByBinding>) -> Response {
    if let Some(refusal) = alg_refusal(q.alg.as_deref()) {
        return refusal;
    }
    let Some(value) = q.value.as_deref() else {
        return problem(StatusCode::BAD_REQUEST, "the value parameter is required");
    };
    let Some(id) = watermark_id(value) else {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("value {value:?} is not an 8-byte id (base64 or 16 hex digits)"),
        );
    };
    matches_for(&state, &id).await
}

async fn by_content(
    State(state): State<Arc<Coordinator>>,
    Query(q): Query<ByBinding>,
    body: Bytes,
) -> Response {
    if let Some(refusal) = alg_refusal(q.alg.as_deref()) {
        return refusal;
    }
    let stamps = state.stamps.clone();
    let found = tokio::task::spawn_blocking(move || {
        let pixels = credentials::decode_image(&body)?;
        let ids: Vec<String> = watermark::detect_stages(&pixels, stamps.key())
            .map(|(_, d)| format!("{:016x}", d.payload))
            .collect();
        Ok::<_, credentials::CredentialsError>(ids)
    })
    .await;
    let ids = match found {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut matches = Vec::new();
    for id in ids {
        match state
            .resolve(ArtifactKey::WatermarkId(&id), &PrivateView::None)
            .await
        {
            Ok(Some(found)) => {
                if let Some(a) = found.artifact {
                    matches.push(json!({ "manifestId": a.manifest_label }));
                }
            }
            Ok(None) => {}
            Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    axum::Json(json!({ "matches": matches })).into_response()
}

async fn manifest(State(state): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    match state
        .store
        .find_artifact(ArtifactKey::ManifestLabel(&id))
        .await
    {
        Ok(Some(found)) if !found.manifest.is_empty() => {
            ([(header::CONTENT_TYPE, "application/c2pa")], found.manifest).into_response()
        }
        Ok(_) => problem(StatusCode::NOT_FOUND, format!("no manifest {id:?}")),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn record_json(r: &ArtifactRecord) -> serde_json::Value {
    json!({
        "sha256": r.sha256,
        "jobId": r.job_id,
        "taskId": r.task_id,
        "itemIndex": r.item_index,
        "stage": r.stage,
        "modelId": r.model_id,
        "workerId": r.worker_id,
        "watermarkId": r.watermark_id,
        "mediaType": r.media_type,
        "width": r.width,
        "height": r.height,
        "createdAtMs": r.created_at_ms,
        "parentSha256": r.parent_sha256,
        "manifestId": r.manifest_label,
    })
}

async fn lineage(State(state): State<Arc<Coordinator>>, Path(id): Path<String>) -> Response {
    match state
        .resolve(ArtifactKey::ManifestLabel(&id), &PrivateView::None)
        .await
    {
        Ok(Some(found)) => axum::Json(json!({
            "chain": found.chain.iter().map(record_json).collect::<Vec<_>>(),
            "model": found.model.map(|m| json!({
                "modelId": m.model_id,
                "family": m.family,
                "license": m.license,
                "trainingDatasets": m.training_datasets,
            })),
            "datasets": found.datasets.iter().map(|d| json!({
                "name": d.name,
                "version": d.version,
                "uri": d.uri,
                "contentSha256": d.content_sha256,
                "license": d.license,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("no manifest {id:?}")),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(header: Option<&str>) -> ClientRate {
        let config = CoordinatorConfig {
            http_client_address_header: header.map(str::to_string),
            ..CoordinatorConfig::default()
        };
        ClientRate::from_config(&config).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn a_client_is_its_address_and_an_ipv6_client_its_slash_64() {
        let direct = rate(None);
        let none = HeaderMap::new();
        let peer = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(direct.client(peer("203.0.113.7"), &none), "203.0.113.7");
        // Two addresses of one /64 share a bucket; another /64 has its own.
        let a = direct.client(peer("2001:db8:1:2::1"), &none);
        let b = direct.client(peer("2001:db8:1:2:ffff:ee:dd:cc"), &none);
        let c = direct.client(peer("2001:db8:1:3::1"), &none);
        assert_eq!(
            (a.as_str(), a == b, a == c),
            ("2001:db8:1:2::/64", true, false)
        );
        assert_eq!(
            direct.client(peer("::ffff:198.51.100.4"), &none),
            "198.51.100.4"
        );
        // Without a configured header, a client cannot choose its bucket.
        let spoofed = headers(&[("x-forwarded-for", "192.0.2.1")]);
        assert_eq!(direct.client(peer("203.0.113.7"), &spoofed), "203.0.113.7");
    }

    #[test]
    fn behind_a_proxy_the_client_is_the_last_address_the_proxy_added() {
        let proxied = rate(Some("X-Forwarded-For"));
        let proxy = "10.0.0.2".parse::<IpAddr>().unwrap();
        // The client may send its own header; the proxy appends the
        // address it saw, last.
        let h = headers(&[("x-forwarded-for", "192.0.2.1, 198.51.100.9")]);
        assert_eq!(proxied.client(proxy, &h), "198.51.100.9");
        let h = headers(&[
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "198.51.100.10"),
        ]);
        assert_eq!(proxied.client(proxy, &h), "198.51.100.10");
        let h = headers(&[("x-forwarded-for", "[2001:db8::5]:443")]);
        assert_eq!(proxied.client(proxy, &h), "2001:db8:0:0::/64");
        // No header, or one that names no address: the peer.
        assert_eq!(proxied.client(proxy, &HeaderMap::new()), "10.0.0.2");
        let h = headers(&[("x-forwarded-for", "unknown")]);
        assert_eq!(proxied.client(proxy, &h), "10.0.0.2");
    }

    #[test]
    fn a_client_address_header_that_is_no_header_name_is_refused() {
        let config = CoordinatorConfig {
            http_client_address_header: Some("x forwarded".into()),
            ..CoordinatorConfig::default()
        };
        let err = ClientRate::from_config(&config).unwrap_err().to_string();
        assert!(
            err.contains("\"x forwarded\" is not an HTTP header name"),
            "{err}"
        );
    }
}
