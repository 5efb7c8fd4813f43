//! RFC 3161 timestamps for signatures, so a manifest keeps validating after
//! its signing certificate expires.
//!
//! The pinned `c2pa` build has no HTTP client, so the request goes out over
//! plain HTTP/1.1 here. Plain HTTP is what timestamp authorities commonly
//! serve and is enough: the reply is itself signed, and `c2pa` checks it
//! against the request before it is embedded (and verifiers check the
//! authority's certificate against their trust anchors).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use c2pa::http::http::{Request, Response};
use c2pa::http::{HttpResolverError, SyncHttpResolver};

/// Room for the timestamp token in the signature box.
const TOKEN_RESERVE: usize = 16 * 1024;
const TIMEOUT: Duration = Duration::from_secs(20);
/// Largest reply accepted from an authority.
const MAX_REPLY: u64 = 1024 * 1024;

/// A signer that timestamps its signatures at `url`.
pub(crate) struct TimestampingSigner {
    inner: c2pa::BoxedSigner,
    url: String,
    context: c2pa::Context,
}

impl TimestampingSigner {
    pub(crate) fn new(inner: c2pa::BoxedSigner, url: String) -> Result<Self, String> {
        if !url.starts_with("http://") {
            return Err(format!(
                "timestamp authority {url}: only http:// URLs are supported (RFC 3161 replies are signed, so TLS adds no integrity)"
            ));
        }
        Ok(Self {
            inner,
            url,
            context: c2pa::Context::new().with_resolver(PlainHttp),
        })
    }
}

impl c2pa::Signer for TimestampingSigner {
    fn sign(&self, data: &[u8]) -> c2pa::Result<Vec<u8>> {
        self.inner.sign(data)
    }

    fn alg(&self) -> c2pa::SigningAlg {
        self.inner.alg()
    }

    fn certs(&self) -> c2pa::Result<Vec<Vec<u8>>> {
        self.inner.certs()
    }

    fn reserve_size(&self) -> usize {
        self.inner.reserve_size() + TOKEN_RESERVE
    }

    fn time_authority_url(&self) -> Option<String> {
        Some(self.url.clone())
    }

    fn send_timestamp_request(&self, message: &[u8]) -> Option<c2pa::Result<Vec<u8>>> {
        let reply = c2pa::crypto::time_stamp::default_rfc3161_message(message).and_then(|body| {
            c2pa::crypto::time_stamp::default_rfc3161_request(
                &self.url,
                None,
                &body,
                message,
                &self.context,
            )
        });
        Some(reply.map_err(Into::into))
    }
}

/// HTTP/1.1 over a TCP stream, one request per connection.
struct PlainHttp;

impl SyncHttpResolver for PlainHttp {
    fn http_resolve(
        &self,
        request: Request<Vec<u8>>,
    ) -> Result<Response<Box<dyn Read>>, HttpResolverError> {
        let fail = |e: String| HttpResolverError::Other(e.into());
        let uri = request.uri().clone();
        let host = uri.host().ok_or_else(|| fail(format!("{uri}: no host")))?;
        let port = uri.port_u16().unwrap_or(80);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut stream =
            TcpStream::connect((host, port)).map_err(|e| fail(format!("{uri}: {e}")))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| fail(e.to_string()))?;
        let mut head = format!(
            "{} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
            request.method(),
            request.body().len()
        );
        for (name, value) in request.headers() {
            head.push_str(&format!(
                "{name}: {}\r\n",
                value.to_str().map_err(|e| fail(e.to_string()))?
            ));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(request.body()))
            .map_err(|e| fail(format!("{uri}: {e}")))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_REPLY)
            .read_to_end(&mut raw)
            .map_err(|e| fail(format!("{uri}: {e}")))?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| fail(format!("{uri}: malformed HTTP reply")))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| fail(format!("{uri}: malformed status line")))?;
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Err(fail(format!("{uri}: chunked replies are not supported")));
        }
        let mut response = Response::builder().status(status);
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                response = response.header(name.trim(), value.trim());
            }
        }
        let body: Box<dyn Read> = Box::new(std::io::Cursor::new(raw[split + 4..].to_vec()));
        response.body(body).map_err(|e| fail(e.to_string()))
    }
}
