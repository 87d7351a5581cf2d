//! The istiod side: how the relay reaches the upstream and what it tells it about the proxy.
//!
//! Every sidecar stream gets a stream of its own to istiod (never shared, never re-sequenced),
//! but up to `streams_per_connection` of these streams share one HTTP/2 connection, as any gRPC
//! client multiplexes its calls. A connection of its own per sidecar costs about 50 KiB of
//! HTTP/2 buffers in the relay; shared by 16 streams it costs about 3 KiB a stream.

use std::sync::{Arc, Mutex};
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

/// Receive window of one stream from istiod: as much of a response as may wait in the relay
/// while the sidecar is slow to read it.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// Streams per connection when none is configured.
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 16;

/// Where istiod is and how to connect to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    endpoint: Endpoint,
    address: String,
    pacer: Option<Arc<ConnectPacer>>,
    pool: Arc<Pool>,
}

/// The connections to istiod and how many streams each carries.
#[derive(Debug)]
struct Pool {
    per_connection: usize,
    connections: Mutex<Vec<Pooled>>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Pooled {
    id: u64,
    channel: Channel,
    streams: usize,
    /// istiod is closing it (a GOAWAY): its streams carry on, new ones go elsewhere.
    retired: bool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        // Only counts are updated under the lock; they stay consistent after a panic.
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream's share of a connection to istiod; the connection is closed when the last of its
/// streams lets go.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    id: u64,
    channel: Channel,
}

impl Lease {
    /// The connection, to open the stream on.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Takes this lease's connection out of use for new streams, because it refused one
    /// without sending it: istiod is closing it. Streams already on it are left alone.
    pub fn retire(&self) {
        let mut connections = self.pool.lock();
        if let Some(pooled) = connections.iter_mut().find(|c| c.id == self.id) {
            pooled.retired = true;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut connections = self.pool.lock();
        if let Some(at) = connections.iter().position(|c| c.id == self.id) {
            let pooled = &mut connections[at];
            pooled.streams = pooled.streams.saturating_sub(1);
            if pooled.streams == 0 {
                connections.swap_remove(at);
            }
        }
    }
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
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW);
        Ok(Self {
            endpoint,
            address: address.to_string(),
            pacer: None,
            pool: Arc::new(Pool {
                per_connection: 1,
                connections: Mutex::default(),
                next_id: Default::default(),
            }),
        }
        .with_streams_per_connection(DEFAULT_STREAMS_PER_CONNECTION))
    }

    /// The same upstream, opening at most `rate` new streams a second after a burst of as
    /// many; 0 sets no limit.
    pub fn with_connect_rate(mut self, rate: u32) -> Self {
        self.pacer = (rate > 0).then(|| Arc::new(ConnectPacer::new(rate)));
        self
    }

    /// The same upstream, carrying up to `streams` sidecar streams on one connection (at least
    /// one). The connection's receive window is as large as all its streams' windows together,
    /// so that a sidecar that stops reading holds up only its own stream.
    pub fn with_streams_per_connection(mut self, streams: usize) -> Self {
        let streams = streams.max(1);
        let window = u64::from(STREAM_WINDOW) * streams as u64;
        // HTTP/2 windows are at most 2^31 - 1.
        let window = u32::try_from(window.min((1 << 31) - 1)).unwrap_or(u32::MAX >> 1);
        self.endpoint = self.endpoint.initial_connection_window_size(window);
        self.pool = Arc::new(Pool {
            per_connection: streams,
            connections: Mutex::default(),
            next_id: Default::default(),
        });
        self
    }

    /// Connections to istiod open now.
    pub fn connections(&self) -> usize {
        self.pool.lock().len()
    }

    /// The address as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A share of a connection for one proxy stream: a connection with room for another
    /// stream, or a new one. New connections are opened lazily: the first stream on it waits
    /// for the handshake, and a failure reaches it as the stream's error.
    ///
    /// Streams are paced, not connections: after a relay restart every sidecar reconnects at
    /// once, and istiod, which sets up a proxy's state per stream, then sees a steady trickle.
    pub async fn connect(&self) -> Lease {
        if let Some(pacer) = &self.pacer {
            pacer.wait().await;
        }
        let mut connections = self.pool.lock();
        let per_connection = self.pool.per_connection;
        if let Some(pooled) = connections
            .iter_mut()
            .filter(|c| !c.retired && c.streams < per_connection)
            .max_by_key(|c| c.streams)
        {
            // The fullest connection with room: connections fill up and empty ones close.
            pooled.streams += 1;
            return self.lease(pooled.id, pooled.channel.clone());
        }
        let id = self
            .pool
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let channel = self.endpoint.connect_lazy();
        connections.push(Pooled {
            id,
            channel: channel.clone(),
            streams: 1,
            retired: false,
        });
        self.lease(id, channel)
    }

    fn lease(&self, id: u64, channel: Channel) -> Lease {
        Lease {
            pool: self.pool.clone(),
            id,
            channel,
        }
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

    /// Streams fill a connection before another opens, an emptied connection closes, and a
    /// freed place is taken before a new connection is opened.
    #[tokio::test]
    async fn streams_share_connections_up_to_the_limit() {
        let upstream = Upstream::new("http://127.0.0.1:1", None)
            .unwrap()
            .with_streams_per_connection(3);
        let mut leases = Vec::new();
        for _ in 0..7 {
            leases.push(upstream.connect().await);
        }
        assert_eq!(upstream.connections(), 3);
        let ids = |leases: &[Lease]| leases.iter().map(|l| l.id).collect::<Vec<_>>();
        let first = ids(&leases);
        assert_eq!(
            &first[..3],
            &[first[0]; 3],
            "the first three share one connection"
        );
        assert_eq!(&first[3..6], &[first[3]; 3]);
        assert_ne!(first[0], first[3]);

        // The seventh stream's connection closes with it.
        leases.pop();
        assert_eq!(upstream.connections(), 2);

        // A place freed on the first connection is taken before a new one opens.
        leases.remove(0);
        let again = upstream.connect().await;
        assert_eq!(again.id, first[0]);
        assert_eq!(upstream.connections(), 2);

        drop(leases);
        drop(again);
        assert_eq!(upstream.connections(), 0);

        // A retired connection takes no new stream but lives on with its streams.
        let kept = upstream.connect().await;
        kept.retire();
        let next = upstream.connect().await;
        assert_ne!(next.id, kept.id);
        assert_eq!(upstream.connections(), 2);
        drop(kept);
        assert_eq!(upstream.connections(), 1);
        drop(next);

        let own = Upstream::new("http://127.0.0.1:1", None)
            .unwrap()
            .with_streams_per_connection(1);
        let (a, b) = (own.connect().await, own.connect().await);
        assert_ne!(a.id, b.id);
        assert_eq!(own.connections(), 2);
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
