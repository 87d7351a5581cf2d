//! The istiod side: how the relay reaches the upstream and what it tells it about the proxy.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use http::uri::PathAndQuery;
use tonic::metadata::MetadataMap;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::RelayError;

/// Path of the state-of-the-world ADS method.
pub const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
/// Path of the incremental ADS method.
pub const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Headers that belong to one HTTP/2 or gRPC hop and are never copied to the next.
const HOP_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "content-type",
    "grpc-accept-encoding",
    "grpc-encoding",
    "grpc-message",
    "grpc-message-type",
    "grpc-status",
    "grpc-timeout",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "user-agent",
];

/// Where istiod is and how to connect to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    endpoint: Endpoint,
    address: String,
    pacer: Option<std::sync::Arc<ConnectPacer>>,
}

/// Spaces out new connections to istiod: at most `rate` a second once a burst of as many is
/// spent. After a relay restart every sidecar reconnects at once; istiod then sees the same
/// steady trickle it would see from a rollout, not a thousand TLS handshakes in a second.
#[derive(Debug)]
struct ConnectPacer {
    interval: Duration,
    burst: u32,
    next: Mutex<Instant>,
}

impl ConnectPacer {
    fn new(rate: u32) -> Self {
        let interval = Duration::from_secs(1) / rate;
        // A pacer that has been idle has a whole burst to spend.
        let now = Instant::now();
        let next = now.checked_sub(interval * rate).unwrap_or(now);
        Self {
            interval,
            burst: rate,
            next: Mutex::new(next),
        }
    }

    /// Waits for this connection's turn.
    async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let earliest = now.checked_sub(self.interval * self.burst).unwrap_or(now);
            let slot = (*next).max(earliest);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// How the relay checks istiod's certificate.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The CA bundle (PEM) istiod's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// The name istiod's certificate must carry.
    pub server_name: String,
}

impl Upstream {
    /// An upstream at `address`: `http://host:port` for plaintext, `https://host:port` for TLS,
    /// which needs `tls`.
    pub fn new(address: &str, tls: Option<UpstreamTls>) -> Result<Self, RelayError> {
        let invalid = |reason: String| RelayError::UpstreamAddress {
            address: address.to_string(),
            reason,
        };
        let mut endpoint =
            Endpoint::from_shared(address.to_string()).map_err(|e| invalid(e.to_string()))?;
        match (endpoint.uri().scheme_str(), tls) {
            (Some("https"), Some(tls)) => {
                let config = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(tls.ca_pem))
                    .domain_name(tls.server_name);
                endpoint = endpoint
                    .tls_config(config)
                    .map_err(|e| invalid(error_chain(&e)))?;
            }
            (Some("https"), None) => {
                return Err(invalid(
                    "an https:// upstream needs --upstream-ca, the CA istiod's certificate chains to"
                        .to_string(),
                ));
            }
            (Some("http"), _) => {}
            (scheme, _) => {
                return Err(invalid(format!(
                    "the scheme must be http:// or https://, not {scheme:?}"
                )));
            }
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self {
            endpoint,
            address: address.to_string(),
            pacer: None,
        })
    }

    /// The same upstream, opening at most `rate` new connections a second after a burst of as
    /// many; 0 sets no limit.
    pub fn with_connect_rate(mut self, rate: u32) -> Self {
        self.pacer = (rate > 0).then(|| std::sync::Arc::new(ConnectPacer::new(rate)));
        self
    }

    /// The address as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Opens a connection of its own for one proxy stream.
    ///
    /// One connection per stream, as pilot-agent does: HTTP/2 flow control is then per proxy, so
    /// a slow sidecar throttles only its own istiod stream, and streams spread over istiod
    /// replicas the way the sidecars' own connections would.
    pub async fn connect(&self) -> Result<Channel, RelayError> {
        if let Some(pacer) = &self.pacer {
            pacer.wait().await;
        }
        self.endpoint
            .connect()
            .await
            .map_err(|e| RelayError::UpstreamConnect {
                address: self.address.clone(),
                reason: error_chain(&e),
            })
    }
}

/// The state-of-the-world method path.
pub fn sotw_path() -> PathAndQuery {
    PathAndQuery::from_static(SOTW_PATH)
}

/// The incremental method path.
pub fn delta_path() -> PathAndQuery {
    PathAndQuery::from_static(DELTA_PATH)
}

/// The sidecar's request metadata as it goes to istiod: everything but the per-hop headers, so
/// that istiod authenticates the sidecar's own token and cluster id.
pub fn forwarded_metadata(from: &MetadataMap) -> MetadataMap {
    let mut headers = from.clone().into_headers();
    for name in HOP_HEADERS {
        headers.remove(*name);
    }
    MetadataMap::from_headers(headers)
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn connections_are_paced_after_a_burst() {
        let pacer = ConnectPacer::new(10);
        let started = Instant::now();
        for _ in 0..10 {
            pacer.wait().await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(5),
            "the burst waited"
        );
        for _ in 0..20 {
            pacer.wait().await;
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "20 more took {took:?}"
        );
    }

    #[test]
    fn hop_headers_stay_behind() {
        let mut md = MetadataMap::new();
        md.insert("authorization", "Bearer secret".parse().unwrap());
        md.insert("clusterid", "Kubernetes".parse().unwrap());
        md.insert("te", "trailers".parse().unwrap());
        md.insert("grpc-timeout", "5S".parse().unwrap());
        md.insert("x-custom", "1".parse().unwrap());

        let out = forwarded_metadata(&md);
        assert_eq!(out.get("authorization").unwrap(), "Bearer secret");
        assert_eq!(out.get("clusterid").unwrap(), "Kubernetes");
        assert_eq!(out.get("x-custom").unwrap(), "1");
        assert!(out.get("te").is_none());
        assert!(out.get("grpc-timeout").is_none());
    }
}
