//! A TLS client without a sidecar: connects to 127.0.0.1, optionally presents a client
//! certificate, offers a given ALPN list, and sends one HTTP request over what was negotiated
//! (HTTP/2 when the server selected `h2`, HTTP/1.1 otherwise).
//!
//! A TLS 1.3 server judges the client certificate after the client has finished its side of
//! the handshake: the rejection is an alert that a client's first write can race with (a
//! connection reset then drops the alert). [`tls12_handshake`] keeps that verdict inside the
//! handshake, for tests whose point is a refused client certificate.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::certs::{Identity, SERVER_NAME, TestPki, server_name};
use super::http::{ClientError, HttpReply, REQUEST_TIMEOUT, request, tls_alert};
use super::loopback;

/// Sends `GET path` over TLS to `127.0.0.1:port`, verifying the server against `pki`,
/// presenting `identity` when given and offering `alpn`.
pub async fn tls_get(
    pki: &TestPki,
    port: u16,
    identity: Option<&Identity>,
    alpn: &[&str],
    path: &str,
) -> Result<HttpReply, ClientError> {
    let config = pki.client_config(identity, alpn);
    let attempt = async {
        let tls = handshake(config, port).await?;
        let negotiated = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        request(tls, negotiated, SERVER_NAME, path).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?
}

/// A TLS 1.2 handshake with `127.0.0.1:port` and nothing else; returns the selected ALPN.
pub async fn tls12_handshake(
    pki: &TestPki,
    port: u16,
    identity: Option<&Identity>,
    alpn: &[&str],
) -> Result<Option<String>, ClientError> {
    let config = pki.client_config_with_versions(identity, alpn, &[&rustls::version::TLS12]);
    let attempt = async {
        let tls = handshake(config, port).await?;
        let negotiated = tls.get_ref().1.alpn_protocol();
        Ok(negotiated.map(|p| String::from_utf8_lossy(p).into_owned()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?
}

async fn handshake(
    config: rustls::ClientConfig,
    port: u16,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let addr = loopback(port);
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    TlsConnector::from(Arc::new(config))
        .connect(server_name(), stream)
        .await
        .map_err(|error| match tls_alert(&error) {
            Some(alert) => ClientError::TlsAlert(alert),
            None => ClientError::Handshake(error),
        })
}
