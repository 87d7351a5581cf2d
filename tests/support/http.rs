//! One HTTP request over a given connection, and plaintext `GET` on loopback.
//!
//! Errors say where a request stopped: before a connection, in the TLS handshake, on a TLS alert
//! after it, on a connection closed before any response, or with an HTTP status. A refused
//! client and a broken backend look different in a failing test.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Longest time any one request may take, connection and handshake included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP response, with how the connection was negotiated.
#[derive(Clone, Debug)]
pub struct HttpReply {
    /// The ALPN value the server selected (TLS only), `None` when none was selected.
    pub alpn: Option<String>,
    /// The HTTP version the response came with.
    pub version: http::Version,
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: http::HeaderMap,
    /// The body, as text.
    pub body: String,
}

/// Why a request got no HTTP response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where to.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed without an alert from the server: the server closed or reset
    /// the connection (Envoy found no filter chain), or answered with something not TLS.
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    /// The server sent a fatal TLS alert, during the handshake or right after it (a TLS 1.3
    /// server rejects a client certificate after the client's side is done).
    #[error("TLS alert from the server: {0}")]
    TlsAlert(String),
    /// The connection ended before any HTTP response.
    #[error("connection closed before a response: {0}")]
    Closed(String),
    /// Nothing happened in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

impl HttpReply {
    /// The `x-alpn-xds-chain` header the loadable listener adds: which chain served the request.
    pub fn chain(&self) -> Option<&str> {
        let chain = self.headers.get(alpn_xds::testkit::istio::CHAIN_HEADER)?;
        chain.to_str().ok()
    }
}

/// `GET path` on `addr` over plaintext HTTP/1.1.
pub async fn get(addr: SocketAddr, path: &str) -> Result<HttpReply, ClientError> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        request(stream, None, "localhost", path).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?
}

/// Sends `GET path` with `Host: host` over `io`: HTTP/2 when `alpn` is `h2`, else HTTP/1.1.
pub async fn request<IO>(
    io: IO,
    alpn: Option<String>,
    host: &str,
    path: &str,
) -> Result<HttpReply, ClientError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    let (response, connection) = if alpn.as_deref() == Some("h2") {
        let uri = format!("https://{host}{path}");
        let request = http::Request::get(uri)
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(classify)?;
        let connection = tokio::spawn(connection);
        (sender.send_request(request).await, connection)
    } else {
        let request = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        let (mut sender, connection) = http1::handshake(io).await.map_err(classify)?;
        let connection = tokio::spawn(connection);
        (sender.send_request(request).await, connection)
    };
    let response = match response {
        Ok(response) => response,
        // The request only learns that the connection is gone; the connection task knows why
        // (a TLS alert, say).
        Err(error) => {
            let ended = tokio::time::timeout(Duration::from_secs(1), connection).await;
            return Err(match ended {
                Ok(Ok(Err(cause))) => classify(cause),
                _ => classify(error),
            });
        }
    };

    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(classify)?.to_bytes();
    Ok(HttpReply {
        alpn,
        version: parts.version,
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sorts a hyper error into a TLS alert or a closed connection.
fn classify(error: hyper::Error) -> ClientError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&error);
    while let Some(current) = source {
        if let Some(alert) = tls_alert(current) {
            return ClientError::TlsAlert(alert);
        }
        source = current.source();
    }
    ClientError::Closed(error_chain(&error))
}

/// The fatal alert `error` reports, if it is (or wraps in an `io::Error`) a received TLS alert.
pub fn tls_alert(error: &(dyn StdError + 'static)) -> Option<String> {
    // io::Error::source skips its inner error, so look inside it explicitly.
    let inner = error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .map(|inner| inner as &(dyn StdError + 'static));
    [Some(error), inner]
        .into_iter()
        .flatten()
        .find_map(
            |candidate| match candidate.downcast_ref::<rustls::Error>() {
                Some(alert @ rustls::Error::AlertReceived(_)) => Some(alert.to_string()),
                _ => None,
            },
        )
}

/// An error and its sources on one line.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(current) = source {
        text.push_str(": ");
        text.push_str(&current.to_string());
        source = current.source();
    }
    text
}
