//! The bench upstream: an ADS server playing istiod for thousands of streams, in both forms.
//!
//! It answers each stream's first request of a type with the whole type, ignores ACKs, and
//! sends a push to one stream when the driver asks for it. Every response carries the moment it
//! was handed to the HTTP/2 layer in its nonce (`i<ns>-<seq>` for first responses, `m<ns>-<seq>`
//! for measured pushes, nanoseconds since the driver's epoch), so the simulated sidecar that
//! receives it knows how long it took, whichever way it came. The relay passes istiod's nonces
//! through unchanged.
//!
//! The testkit's `TestUpstream` records every message for assertions, which at this scale would
//! be the benchmark's biggest cost; this one keeps nothing and sends pre-encoded resources
//! without copying them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;

use crate::grpc::{self, Messages};
use crate::mesh::{Form, Mesh, SIDECARS_PER_WORKLOAD, XdsType};
use crate::sidecars::SidecarId;
use alpn_xds::relay::upstream::{DELTA_PATH, SOTW_PATH};
use alpn_xds::wire;

/// Pushes waiting for one stream; the driver spreads pushes so that this is never full.
const PUSH_QUEUE: usize = 8;
/// Responses waiting for the HTTP/2 layer, per stream.
const RESPONSE_QUEUE: usize = 2;

/// The running upstream. Stops serving when dropped.
pub struct BenchUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    _stop: oneshot::Sender<()>,
}

struct Shared {
    mesh: Arc<Mesh>,
    /// istiod names itself in every response.
    control_plane: Bytes,
    epoch: Instant,
    streams: Mutex<HashMap<SidecarId, mpsc::Sender<XdsType>>>,
    seq: AtomicU64,
}

impl BenchUpstream {
    /// Serves `mesh` on a free port of 127.0.0.1; nonces count time from `epoch`.
    pub async fn start(mesh: Arc<Mesh>, epoch: Instant) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the bench upstream")?;
        let addr = listener.local_addr()?;
        let identifier = r#"{"Component":"istiod","ID":"istiod-5d8f9c7b6-x2x4q","Info":{"version":"1.24.0","revision":"default","golang_version":"go1.23.2","status":"Clean","tag":"1.24.0"}}"#;
        let control_plane = ControlPlane {
            identifier: identifier.to_string(),
        };
        let shared = Arc::new(Shared {
            mesh,
            control_plane: Bytes::from(control_plane.encode_to_vec()),
            epoch,
            streams: Mutex::default(),
            seq: AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let service = AdsService(shared.clone());
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                // istiod is written in Go, whose sockets have Nagle's algorithm off.
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("bench upstream stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            shared,
            server,
            _stop: stop,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks the stream of `sidecar` to send a measured push of `xds`. False when that stream is
    /// not connected or its queue is full.
    pub fn push(&self, sidecar: SidecarId, xds: XdsType) -> bool {
        let streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        streams
            .get(&sidecar)
            .is_some_and(|stream| stream.try_send(xds).is_ok())
    }
}

impl Drop for BenchUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone)]
struct AdsService(Arc<Shared>);

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let form = match request.uri().path() {
            SOTW_PATH => Form::Sotw,
            DELTA_PATH => Form::Delta,
            _ => {
                let mut response = grpc::response(tonic::body::Body::empty());
                let status = http::HeaderValue::from_static("12");
                response.headers_mut().insert("grpc-status", status);
                return std::future::ready(Ok(response));
            }
        };
        let (out, responses) = mpsc::channel(RESPONSE_QUEUE);
        let stream = UpstreamStream {
            shared: self.0.clone(),
            form,
            out,
            sidecar: None,
            workload: 0,
        };
        tokio::spawn(stream.run(request.into_body()));
        std::future::ready(Ok(grpc::response(grpc::message_body(responses, true))))
    }
}

/// One ADS stream, served by its own task.
struct UpstreamStream {
    shared: Arc<Shared>,
    form: Form,
    out: mpsc::Sender<Vec<Bytes>>,
    sidecar: Option<SidecarId>,
    workload: usize,
}

/// What the upstream reads of a request.
struct Request {
    node: Bytes,
    type_url: String,
    nonce: String,
}

impl UpstreamStream {
    async fn run(mut self, body: tonic::body::Body) {
        let mut requests = Messages::new(body);
        let (pushes, mut pushed) = mpsc::channel(PUSH_QUEUE);
        loop {
            let sent = tokio::select! {
                request = requests.next() => match request {
                    Ok(Some(raw)) => self.on_request(raw, &pushes).await,
                    Ok(None) | Err(_) => break,
                },
                Some(xds) = pushed.recv() => self.send(xds, true).await,
            };
            if !sent {
                break;
            }
        }
        if let Some(sidecar) = self.sidecar {
            let mut streams = self
                .shared
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if streams
                .get(&sidecar)
                .is_some_and(|s| s.same_channel(&pushes))
            {
                streams.remove(&sidecar);
            }
        }
    }

    /// Answers a first request of a type with the whole type; ACKs get nothing.
    async fn on_request(&mut self, raw: Bytes, pushes: &mpsc::Sender<XdsType>) -> bool {
        let Some(request) = self.decode(raw) else {
            return false;
        };
        if self.sidecar.is_none() {
            let Some(sidecar) = Node::decode(request.node)
                .ok()
                .and_then(|node| SidecarId::from_node_id(&node.id))
            else {
                return false;
            };
            self.workload = sidecar.index / SIDECARS_PER_WORKLOAD;
            self.sidecar = Some(sidecar);
            let mut streams = self
                .shared
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            streams.insert(sidecar, pushes.clone());
        }
        match XdsType::of(&request.type_url) {
            Some(xds) if request.nonce.is_empty() => self.send(xds, false).await,
            _ => true,
        }
    }

    fn decode(&self, raw: Bytes) -> Option<Request> {
        match self.form {
            Form::Sotw => wire::DiscoveryRequest::decode(raw).ok().map(|r| Request {
                node: r.node,
                type_url: r.type_url,
                nonce: r.response_nonce,
            }),
            Form::Delta => wire::DeltaDiscoveryRequest::decode(raw)
                .ok()
                .map(|r| Request {
                    node: r.node,
                    type_url: r.type_url,
                    nonce: r.response_nonce,
                }),
        }
    }

    /// Sends `xds`, stamped with the time it leaves. False when the stream is gone.
    async fn send(&mut self, xds: XdsType, measured: bool) -> bool {
        let body = self
            .shared
            .mesh
            .body(self.form, xds, self.workload, !measured);
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        let version = format!("v{seq}");
        let tag = if measured { 'm' } else { 'i' };
        let sent = u64::try_from(self.shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let nonce = format!("{tag}{sent}-{seq}");
        let head = match self.form {
            Form::Sotw => wire::DiscoveryResponse {
                version_info: version,
                type_url: xds.url().to_string(),
                nonce,
                control_plane: self.shared.control_plane.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
            Form::Delta => wire::DeltaDiscoveryResponse {
                system_version_info: version,
                type_url: xds.url().to_string(),
                nonce,
                control_plane: self.shared.control_plane.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let mut pieces = Vec::with_capacity(1 + body.len());
        pieces.push(Bytes::from(head));
        pieces.extend(body);
        self.out.send(pieces).await.is_ok()
    }
}

/// When a nonce made here says its response was sent, and whether it was a measured push.
pub fn stamp(nonce: &str) -> Option<(bool, u64)> {
    let measured = match nonce.as_bytes().first()? {
        b'm' => true,
        b'i' => false,
        _ => return None,
    };
    let (sent, _) = nonce[1..].split_once('-')?;
    Some((measured, sent.parse().ok()?))
}
