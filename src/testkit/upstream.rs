//! A test ADS server that plays istiod for tests, examples and benchmarks.
//!
//! [`TestUpstream`] serves both ADS methods on `127.0.0.1:0`. It holds one snapshot (version
//! and resources) per type URL and answers requests the way istiod does. State of the world: a
//! first request (empty nonce, or a type this stream was never sent) gets the type's current
//! snapshot; an ACK of the latest nonce gets nothing unless the requested names changed.
//! Delta: the first request of a type (wildcard or not, `initial_resource_versions` ignored as
//! istiod does for LDS and CDS) gets every resource of the snapshot in its subscription, each as
//! a `Resource` named after the message's name and versioned with the snapshot's version; an
//! ACK gets nothing unless the subscription changed; [`TestUpstream::push`] sends the full set
//! with `removed_resources` for names that are gone. In both forms a NACK (`error_detail`) is
//! recorded and answered with nothing, a request carrying any other nonce is stale and ignored,
//! and every response carries a nonce of this server's own making.
//!
//! Everything that crosses the wire is recorded for assertions: every request with the gRPC
//! metadata of its stream and its bytes exactly as received (a small codec keeps them before
//! decoding), every response sent, every stream opened. Types without a snapshot (Istio's NDS,
//! debug types) are accepted and recorded, and answered with nothing; Istio's health reports
//! are recorded as such, never as NACKs, and never answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::google::protobuf::Any;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::Instrument;

mod delta;
mod recording;
mod service;
mod sotw;

pub use recording::{
    AdsForm, RecordedRequest, RecordedResponse, RecordedStream, Recording, RequestKind,
};

/// Type URL of `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// Type URL of Istio's NDS name tables, which pilot-agent asks for on the sidecar's stream.
pub const NAME_TABLE_TYPE_URL: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";
/// Type URL of Istio's health reports, which pilot-agent sends on the sidecar's stream.
pub const HEALTH_INFO_TYPE_URL: &str = "type.googleapis.com/istio.v1.HealthInformation";

/// Largest gRPC message accepted or sent, in bytes: big meshes send LDS responses of many MiB.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Nonces made here start with this, so that tests can tell them from anybody else's.
pub const NONCE_PREFIX: &str = "upstream-";

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Responses queued per stream before the stream's task waits for the client to read.
const RESPONSE_QUEUE: usize = 16;

/// Errors of the test upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The listening socket could not be opened.
    #[error("test upstream: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The listening socket has no readable local address.
    #[error("test upstream: cannot read the listening address: {0}")]
    LocalAddr(std::io::Error),
    /// A [`TestUpstream::wait_for`] condition did not become true in time.
    #[error("test upstream: timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// The condition, as the caller named it.
        what: String,
        /// How long was waited.
        timeout: Duration,
    },
}

/// The resources of one type URL, as the upstream currently serves them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeSnapshot {
    /// `version_info` of responses for this type.
    pub version: String,
    /// The resources, in the order they are sent.
    pub resources: Vec<Any>,
}

/// Everything the upstream serves: one [`TypeSnapshot`] per type URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Snapshots by type URL. A type without an entry is never answered.
    pub types: BTreeMap<String, TypeSnapshot>,
}

impl Snapshot {
    /// An empty snapshot: every request is recorded and none is answered.
    pub fn new() -> Self {
        Self::default()
    }

    /// This snapshot with `type_url` serving `resources` at `version`.
    pub fn with(mut self, type_url: &str, version: &str, resources: Vec<Any>) -> Self {
        let entry = TypeSnapshot {
            version: version.to_owned(),
            resources,
        };
        self.types.insert(type_url.to_owned(), entry);
        self
    }
}

/// The test ADS server. Listens until dropped.
#[derive(Debug)]
pub struct TestUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl TestUpstream {
    /// Starts serving `snapshot` on a free port of 127.0.0.1.
    pub async fn start(snapshot: Snapshot) -> Result<Self, UpstreamError> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), snapshot).await
    }

    /// Starts serving `snapshot` on `addr`, as istiod coming back on its old address. A port
    /// that a killed upstream still holds is retried for up to two seconds.
    pub async fn start_on(addr: SocketAddr, snapshot: Snapshot) -> Result<Self, UpstreamError> {
        Self::serve(addr, snapshot, None).await
    }

    /// Starts serving `snapshot` on a free port, sending a GOAWAY on each connection once it is
    /// `age` old, as istiod does with its `MaxServerConnectionAge`. Streams already open carry
    /// on; new ones must go to another connection. (istiod also cuts the connection after a
    /// grace period; that is [`TestUpstream::kill`]'s part.)
    pub async fn start_with_connection_age(
        snapshot: Snapshot,
        age: Duration,
    ) -> Result<Self, UpstreamError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::serve(addr, snapshot, Some(age)).await
    }

    async fn serve(
        addr: SocketAddr,
        snapshot: Snapshot,
        connection_age: Option<Duration>,
    ) -> Result<Self, UpstreamError> {
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => return Err(UpstreamError::Bind { addr, source }),
            }
        };
        let addr = listener.local_addr().map_err(UpstreamError::LocalAddr)?;

        let shared = Arc::new(Shared::new(snapshot));
        let handler = sotw::AdsHandler {
            shared: Arc::clone(&shared),
        };
        let service = service::AdsService {
            handler: Arc::new(handler.clone()),
            generated: AggregatedDiscoveryServiceServer::new(handler)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        };

        let (shutdown, stop) = oneshot::channel::<()>();
        // Every accepted connection is kept by a second handle, so that `kill` can cut it.
        let connections = Arc::clone(&shared.connections);
        let incoming = TcpListenerStream::new(listener).map(move |accepted| {
            let std_stream = accepted?.into_std()?;
            let kept = std_stream.try_clone()?;
            lock(&connections).push(kept);
            tokio::net::TcpStream::from_std(std_stream)
        });
        let span = tracing::debug_span!("test_upstream", %addr);
        let server = tokio::spawn(
            async move {
                let mut builder = tonic::transport::Server::builder();
                // Without a grace, tonic sends the GOAWAY at `age` and lets open streams finish.
                if let Some(age) = connection_age {
                    builder = builder.max_connection_age(age);
                }
                let served = builder
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        // A dropped sender is a shutdown too.
                        let _ = stop.await;
                    })
                    .await;
                if let Err(error) = served {
                    tracing::warn!(%error, "test upstream stopped serving");
                }
            }
            .instrument(span),
        );
        Ok(Self {
            addr,
            shared,
            shutdown: Some(shutdown),
            server,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The plaintext gRPC URL of the server, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the snapshot of `type_url` and sends it to every open stream that has asked for
    /// that type and was last sent another version: the whole set, and on Delta streams the
    /// removal of names no longer in it. Streams that have not asked for it get it with their
    /// first request.
    pub fn push(&self, type_url: &str, version: &str, resources: Vec<Any>) {
        let entry = TypeSnapshot {
            version: version.to_owned(),
            resources,
        };
        self.shared.snapshot.send_modify(|snapshot| {
            snapshot.types.insert(type_url.to_owned(), entry);
        });
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot.borrow().clone()
    }

    /// A copy of everything recorded so far.
    pub fn recording(&self) -> Recording {
        self.shared.recording().clone()
    }

    /// Number of streams opened so far, closed ones included.
    pub fn stream_count(&self) -> usize {
        self.shared.recording().streams.len()
    }

    /// Number of streams open now.
    pub fn open_streams(&self) -> usize {
        self.shared
            .recording()
            .streams
            .iter()
            .filter(|s| s.open)
            .count()
    }

    /// Ends every open stream with `UNAVAILABLE`, as an istiod restart would.
    pub fn close_streams(&self) {
        self.shared
            .closer
            .send_modify(|generation| *generation += 1);
    }

    /// Stops serving at once, as a crashed istiod: the listening socket closes and every
    /// connection is cut (shut down both ways) in the middle of whatever it was sending.
    pub fn kill(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.server.abort();
        for connection in lock(&self.shared.connections).drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until `condition` holds for the recording, checking after every recorded event.
    /// `what` names the condition in the timeout error.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Recording) -> bool,
    ) -> Result<(), UpstreamError> {
        let mut events = self.shared.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            events.borrow_and_update();
            if condition(&self.shared.recording()) {
                return Ok(());
            }
            let changed = tokio::time::timeout_at(deadline, events.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return Err(UpstreamError::Timeout {
                    what: what.to_owned(),
                    timeout,
                });
            }
        }
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        // Graceful shutdown would wait for clients to hang up; tests want the port gone now.
        self.kill();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the server handle and every stream task.
#[derive(Debug)]
struct Shared {
    snapshot: watch::Sender<Snapshot>,
    closer: watch::Sender<u64>,
    events: watch::Sender<u64>,
    recording: Mutex<Recording>,
    next_stream: AtomicU64,
    next_nonce: AtomicU64,
    /// A second handle on every accepted connection, for [`TestUpstream::kill`].
    connections: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Shared {
    fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot: watch::Sender::new(snapshot),
            closer: watch::Sender::new(0),
            events: watch::Sender::new(0),
            recording: Mutex::new(Recording::default()),
            next_stream: AtomicU64::new(1),
            next_nonce: AtomicU64::new(1),
            connections: Arc::default(),
        }
    }

    fn recording(&self) -> MutexGuard<'_, Recording> {
        // A test that panicked while holding the lock should not hide what was recorded.
        self.recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the recording and wakes every `wait_for`.
    fn record(&self, change: impl FnOnce(&mut Recording)) {
        change(&mut self.recording());
        self.events.send_modify(|count| *count += 1);
    }

    /// Notes a stream opened with `metadata`; returns its id.
    fn open_stream(&self, form: AdsForm, metadata: &tonic::metadata::MetadataMap) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let opened = RecordedStream {
            id,
            form,
            metadata: metadata.clone(),
            node: None,
            open: true,
            error: None,
            opened_at: std::time::Instant::now(),
        };
        self.record(|recording| recording.streams.push(opened));
        id
    }

    /// Notes that stream `id` ended, with the client's error if it ended with one.
    fn close_stream(&self, id: u64, error: Option<String>) {
        self.record(|recording| {
            if let Some(stream) = recording.streams.iter_mut().find(|s| s.id == id) {
                stream.open = false;
                stream.error = error;
            }
        });
    }

    /// Notes a request, and the node of its stream if this is the first to carry one.
    fn record_request(&self, request: RecordedRequest) {
        self.record(|recording| {
            let id = request.stream;
            if let Some(stream) = recording.streams.iter_mut().find(|s| s.id == id) {
                stream.node = stream.node.take().or_else(|| request.request.node.clone());
            }
            recording.requests.push(request);
        });
    }

    /// Notes a response.
    fn record_response(&self, response: RecordedResponse) {
        self.record(|recording| recording.responses.push(response));
    }

    fn nonce(&self) -> String {
        format!(
            "{NONCE_PREFIX}{}",
            self.next_nonce.fetch_add(1, Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, Bytes};
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use prost::Message;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::{Request, Status, Streaming};

    const WAIT: Duration = Duration::from_secs(5);

    fn any(type_url: &str, value: &[u8]) -> Any {
        Any {
            type_url: type_url.to_owned(),
            value: value.to_vec(),
        }
    }

    fn request(type_url: &str, version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_owned(),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    /// A client stream: a sender of requests and the stream of responses.
    struct Client {
        requests: mpsc::Sender<DiscoveryRequest>,
        responses: Streaming<DiscoveryResponse>,
    }

    impl Client {
        async fn open(upstream: &TestUpstream) -> Self {
            let mut client = AggregatedDiscoveryServiceClient::connect(upstream.url())
                .await
                .expect("connect to the test upstream");
            let (requests, rx) = mpsc::channel(8);
            let mut call = Request::new(ReceiverStream::new(rx));
            call.metadata_mut().insert(
                "authorization",
                "Bearer secret".parse().expect("header value"),
            );
            let responses = client
                .stream_aggregated_resources(call)
                .await
                .expect("open the ADS stream")
                .into_inner();
            Self {
                requests,
                responses,
            }
        }

        async fn send(&self, request: DiscoveryRequest) {
            self.requests.send(request).await.expect("stream open");
        }

        async fn next(&mut self) -> DiscoveryResponse {
            tokio::time::timeout(WAIT, self.responses.message())
                .await
                .expect("a response in time")
                .expect("no stream error")
                .expect("stream not ended")
        }

        /// Asserts nothing arrives for a moment.
        async fn silent(&mut self) {
            let next = tokio::time::timeout(Duration::from_millis(200), self.responses.message());
            assert!(next.await.is_err(), "expected no response");
        }
    }

    fn lds_snapshot() -> Snapshot {
        Snapshot::new().with(LISTENER_TYPE_URL, "v1", vec![any(LISTENER_TYPE_URL, b"l1")])
    }

    #[tokio::test]
    async fn first_request_gets_snapshot_and_ack_gets_nothing() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;

        client.send(request(LISTENER_TYPE_URL, "", "")).await;
        let first = client.next().await;
        assert_eq!(first.version_info, "v1");
        assert_eq!(first.resources.len(), 1);
        assert!(first.nonce.starts_with(NONCE_PREFIX));

        client
            .send(request(LISTENER_TYPE_URL, "v1", &first.nonce))
            .await;
        client.silent().await;

        let recording = upstream.recording();
        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RequestKind::Initial, RequestKind::Ack]);
        assert!(recording.acked(LISTENER_TYPE_URL, "v1"));
        assert_eq!(
            recording.requests[0]
                .metadata
                .get("authorization")
                .map(|v| v.as_bytes()),
            Some(&b"Bearer secret"[..])
        );
        assert!(recording.foreign_nonces().is_empty());
        assert_eq!(upstream.stream_count(), 1);
    }

    #[tokio::test]
    async fn nack_and_stale_nonce_are_recorded_but_not_answered() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        client.send(request(LISTENER_TYPE_URL, "", "")).await;
        let first = client.next().await;

        let mut nack = request(LISTENER_TYPE_URL, "", &first.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        client.send(nack).await;
        client.send(request(LISTENER_TYPE_URL, "v1", "xr-1")).await;
        client.silent().await;

        let recording = upstream.recording();
        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [RequestKind::Initial, RequestKind::Nack, RequestKind::Stale]
        );
        assert_eq!(recording.nacks().count(), 1);
        let foreign: Vec<_> = recording
            .foreign_nonces()
            .iter()
            .map(|r| r.request.response_nonce.clone())
            .collect();
        assert_eq!(foreign, ["xr-1"]);
    }

    #[tokio::test]
    async fn changed_names_on_ack_are_answered() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        client.send(request(LISTENER_TYPE_URL, "", "")).await;
        let first = client.next().await;

        let mut ack = request(LISTENER_TYPE_URL, "v1", &first.nonce);
        ack.resource_names = vec!["virtualInbound".into()];
        client.send(ack).await;
        let second = client.next().await;
        assert_ne!(second.nonce, first.nonce);
        assert_eq!(
            upstream.recording().requests[1].kind,
            RequestKind::AckNamesChanged
        );
    }

    #[tokio::test]
    async fn push_reaches_streams_that_asked_for_the_type() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut lds = Client::open(&upstream).await;
        let mut cds_only = Client::open(&upstream).await;
        lds.send(request(LISTENER_TYPE_URL, "", "")).await;
        lds.next().await;
        cds_only.send(request(CLUSTER_TYPE_URL, "", "")).await;
        upstream
            .wait_for("the CDS request", WAIT, |r| {
                r.requests_of(CLUSTER_TYPE_URL).count() == 1
            })
            .await
            .expect("CDS request recorded");

        upstream.push(LISTENER_TYPE_URL, "v2", vec![any(LISTENER_TYPE_URL, b"l2")]);
        let pushed = lds.next().await;
        assert_eq!(pushed.version_info, "v2");
        assert_eq!(pushed.resources[0].value, b"l2");
        cds_only.silent().await;
        assert_eq!(upstream.open_streams(), 2);
    }

    #[tokio::test]
    async fn unknown_types_are_recorded_byte_for_byte_and_not_answered() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        let names = request(NAME_TABLE_TYPE_URL, "", "");
        let mut probe = request(HEALTH_INFO_TYPE_URL, "", "");
        probe.resource_names = vec!["a".into()];
        probe.error_detail = Some(RpcStatus {
            code: 13,
            message: "readiness probe failed".into(),
            details: vec![],
        });
        client.send(names.clone()).await;
        client.send(probe.clone()).await;
        client.silent().await;

        let recording = upstream.recording();
        let raw: Vec<_> = recording.requests.iter().map(|r| r.raw.clone()).collect();
        assert_eq!(
            raw,
            [
                Bytes::from(names.encode_to_vec()),
                Bytes::from(probe.encode_to_vec())
            ]
        );
        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RequestKind::Initial, RequestKind::HealthReport]);
        assert_eq!(recording.nacks().count(), 0, "a health report is no NACK");
        assert!(recording.requests.iter().all(|r| !r.answered));
        assert!(recording.responses.is_empty());
    }

    #[tokio::test]
    async fn raw_bytes_keep_fields_unknown_to_this_build() {
        let upstream = TestUpstream::start(Snapshot::new()).await.expect("start");
        let channel = tonic::transport::Endpoint::from_shared(upstream.url())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");

        // type_url (field 4) followed by field 99, a varint this build does not know.
        let mut wire = Vec::new();
        let type_url = b"type.googleapis.com/x.Y";
        wire.push(0x22);
        wire.push(type_url.len() as u8);
        wire.extend_from_slice(type_url);
        wire.extend_from_slice(&[0x98, 0x06, 0x07]);
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        tx.send(Bytes::from(wire.clone())).await.expect("queue");
        let path = http::uri::PathAndQuery::from_static(SOTW_PATH);
        let _responses = grpc
            .streaming(Request::new(ReceiverStream::new(rx)), path, RawClientCodec)
            .await
            .expect("open stream");

        upstream
            .wait_for("the raw request", WAIT, |r| !r.requests.is_empty())
            .await
            .expect("request recorded");
        let recording = upstream.recording();
        assert_eq!(recording.requests[0].raw, Bytes::from(wire));
        assert_eq!(
            recording.requests[0].request.type_url,
            "type.googleapis.com/x.Y"
        );
    }

    /// Sends raw bytes and reads raw bytes: for requests this build could not encode.
    struct RawClientCodec;

    impl Codec for RawClientCodec {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> Self::Encoder {
            RawEncoder
        }
        fn decoder(&mut self) -> Self::Decoder {
            RawDecoder
        }
    }

    struct RawEncoder;
    impl Encoder for RawEncoder {
        type Item = Bytes;
        type Error = Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            bytes::BufMut::put(dst, item);
            Ok(())
        }
    }

    struct RawDecoder;
    impl Decoder for RawDecoder {
        type Item = Bytes;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }

    #[tokio::test]
    async fn close_streams_ends_them_with_unavailable() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        client.send(request(LISTENER_TYPE_URL, "", "")).await;
        client.next().await;

        upstream.close_streams();
        let ended = tokio::time::timeout(WAIT, client.responses.message())
            .await
            .expect("in time");
        assert_eq!(
            ended.expect_err("an error status").code(),
            tonic::Code::Unavailable
        );
        upstream
            .wait_for("the stream to close", WAIT, |r| {
                r.streams.iter().all(|s| !s.open)
            })
            .await
            .expect("closed");
    }
}
