//! The connection-pooled HTTP/1 client to the app, and header hygiene shared by the
//! direct proxy and the worker.

use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderMap;
use http::uri::{Authority, Scheme};
use http::Uri;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::Limited;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every request and response the sidecar handles. An enum rather than a boxed
/// trait object so the common cases (a buffered body, a streamed hyper body) cost no
/// allocation per message on the proxy path.
pub enum Body {
    /// A buffered body (sent as one frame).
    Full(Option<Bytes>),
    /// Streamed from the other side as it arrives.
    Incoming(Incoming),
    /// Streamed, with a size cap (chunked uploads).
    Limited(Limited<Incoming>),
    /// Streamed, holding a call slot until it is sent or dropped (a direct call's
    /// answer; `crate::slots::Holding` without its allocation).
    Held(Incoming, crate::slots::Slot),
    /// Anything else (server-sent events).
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Body::Incoming(b) | Body::Held(b, _) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            Body::Limited(b) => Pin::new(b).poll_frame(cx),
            Body::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Body::Incoming(b) | Body::Held(b, _) => b.is_end_stream(),
            Body::Limited(b) => b.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(b) | Body::Held(b, _) => b.size_hint(),
            Body::Limited(b) => b.size_hint(),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}

/// Where the app listens, with a pooled client to it.
#[derive(Clone)]
pub struct Upstream {
    pub client: Client<HttpConnector, Body>,
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    /// `url` is `http://HOST:PORT` (a path, if any, is ignored).
    pub fn new(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--upstream {url:?} is not a URL: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "--upstream {url:?} must be an http:// URL (the app is on the same pod or host)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("--upstream {url:?} has no host"))?;
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .build(conn);
        Ok(Upstream {
            client,
            scheme: Scheme::HTTP,
            authority,
        })
    }

    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The app's URI for a path-and-query.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// True when the app accepts TCP connections (readiness).
    pub async fn reachable(&self) -> bool {
        let port = self.authority.port_u16().unwrap_or(80);
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect((self.authority.host(), port))
            )
            .await,
            Ok(Ok(_))
        )
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Hot path: one pass over the (few) headers; most messages carry none of these.
    if !headers.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    if let Some(conn) = headers.get(http::header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            // By `&str`: a name that is not a standard header (`keep-alive`) is then
            // looked up without building a `HeaderName` (an allocation per message); an
            // invalid one matches nothing.
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                headers.remove(name);
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Error chain as one line (hyper errors hide the useful part in `source`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// True if a body length limit (`http_body_util::Limited`) caused this error.
pub fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        // Names in any case; one that is not a header name matches nothing.
        h.insert(
            "connection",
            "Keep-Alive, X-Private, bad name".parse().unwrap(),
        );
        h.insert("x-private", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upstream_urls() {
        assert!(Upstream::new("https://x:1").is_err());
        assert!(Upstream::new("nonsense url").is_err());
    }
}
