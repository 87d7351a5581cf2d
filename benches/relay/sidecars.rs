//! Simulated sidecars: ADS clients that subscribe to CDS, EDS and LDS as Envoy does, ACK every
//! response, and note when each response was sent (from its nonce) and received.
//!
//! Real sidecars each have a connection of their own. By default up to
//! [`DEFAULT_STREAMS_PER_CONNECTION`] streams share one HTTP/2 connection here, the same way on
//! the direct path and through the relay, so that the driver does not need a socket per
//! sidecar; `--sidecars-per-connection 1` gives each its own. The relay shares its connections
//! to istiod as it does for real sidecars.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};

use crate::grpc::{self, Messages};
use crate::mesh::{Form, SIDECARS_PER_WORKLOAD, XdsType};
use crate::run::RunSpec;
use crate::upstream::stamp;
use alpn_xds::relay::upstream::{DELTA_PATH, SOTW_PATH};
use alpn_xds::relay::versions::NONCE_PREFIX;
use alpn_xds::wire;

/// Streams that share one connection of the simulated sidecars, unless told otherwise.
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 100;

/// Requests waiting to be sent, per stream.
const REQUEST_QUEUE: usize = 8;

/// The way a sidecar reaches istiod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Straight to the upstream.
    Direct,
    /// Through the relay.
    Relay,
}

impl Route {
    fn tag(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Relay => "relay",
        }
    }
}

/// Names one simulated sidecar; carried in its node id, so the upstream knows it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SidecarId {
    /// Its route.
    pub route: Route,
    /// Its number on that route.
    pub index: usize,
}

impl SidecarId {
    fn pod(self) -> String {
        format!("bench-{}-{}", self.route.tag(), self.index)
    }

    /// The Istio node id of the sidecar.
    fn node_id(self) -> String {
        format!(
            "sidecar~127.0.0.1~{}.bench~bench.svc.cluster.local",
            self.pod()
        )
    }

    /// Reads a node id made by [`SidecarId::node_id`].
    pub fn from_node_id(id: &str) -> Option<Self> {
        let pod = id.split('~').nth(2)?.strip_suffix(".bench")?;
        let mut parts = pod.strip_prefix("bench-")?.split('-');
        let route = match parts.next()? {
            "direct" => Route::Direct,
            "relay" => Route::Relay,
            _ => return None,
        };
        let index = parts.next()?.parse().ok()?;
        Some(Self { route, index })
    }

    /// The node as pilot-agent sends it: id, cluster and the metadata the relay reads.
    fn node(self) -> Bytes {
        let string = |s: String| Value {
            kind: Some(Kind::StringValue(s)),
        };
        let mut labels = Struct::default();
        let workload = self.index / SIDECARS_PER_WORKLOAD;
        labels
            .fields
            .insert("app".into(), string(format!("workload-{workload}")));
        let mut metadata = Struct::default();
        metadata
            .fields
            .insert("NAMESPACE".into(), string("bench".into()));
        metadata.fields.insert("NAME".into(), string(self.pod()));
        metadata
            .fields
            .insert("ISTIO_VERSION".into(), string("1.24.0".into()));
        metadata.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        let node = Node {
            id: self.node_id(),
            cluster: format!("workload-{workload}.bench"),
            metadata: Some(metadata),
            ..Default::default()
        };
        Bytes::from(node.encode_to_vec())
    }
}

/// One measured push as a sidecar received it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Its type.
    pub xds: XdsType,
    /// From the upstream handing it to HTTP/2 until the sidecar decoded it.
    pub latency_ns: u64,
}

/// One LDS response that the relay made itself (a policy change), as a sidecar received it.
#[derive(Clone, Debug)]
pub struct RelayPush {
    /// The sidecar's number.
    pub index: usize,
    /// When it was received, in nanoseconds since the epoch.
    pub at_ns: u64,
    /// Its first resource, wrapped: the `virtualInbound` in this mesh.
    pub inbound: Bytes,
}

/// What the sidecars of one route saw.
#[derive(Default)]
pub struct RouteStats {
    /// Sidecars that received all three types at least once.
    pub synced: AtomicUsize,
    /// Measured pushes received, by type.
    pub received: [AtomicU64; 3],
    /// Measured pushes received, with their latency.
    pub samples: Mutex<Vec<Sample>>,
    /// LDS responses of the relay's own making.
    pub relay_pushes: Mutex<Vec<RelayPush>>,
    /// Streams that ended with an error, and why.
    pub failures: Mutex<Vec<String>>,
}

impl RouteStats {
    /// Takes the samples collected so far.
    pub fn take_samples(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The relay's own LDS pushes received at or after `since_ns`.
    pub fn relay_pushes_since(&self, since_ns: u64) -> Vec<RelayPush> {
        let pushes = self.relay_pushes.lock().unwrap_or_else(|e| e.into_inner());
        pushes
            .iter()
            .filter(|p| p.at_ns >= since_ns)
            .cloned()
            .collect()
    }

    /// The failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The sidecars of one route: their connections and their stream tasks.
pub struct Fleet {
    route: Route,
    form: Form,
    per_connection: usize,
    target: SocketAddr,
    epoch: Instant,
    /// What they saw.
    pub stats: Arc<RouteStats>,
    channels: Vec<Channel>,
    tasks: JoinSet<()>,
    next: usize,
}

impl Fleet {
    /// No sidecars yet; they will connect to `target` as `spec` says.
    pub fn new(route: Route, spec: &RunSpec, target: SocketAddr, epoch: Instant) -> Self {
        Self {
            route,
            form: spec.form,
            per_connection: spec.sidecars_per_connection.max(1),
            target,
            epoch,
            stats: Arc::default(),
            channels: Vec::new(),
            tasks: JoinSet::new(),
            next: 0,
        }
    }

    /// How many sidecars were started.
    pub fn len(&self) -> usize {
        self.next
    }

    /// Starts `count` more sidecars, opening connections as needed.
    pub async fn add(&mut self, count: usize) -> anyhow::Result<()> {
        for _ in 0..count {
            let index = self.next;
            if index / self.per_connection >= self.channels.len() {
                let channel = Endpoint::from_shared(format!("http://{}", self.target))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {}", self.target))?;
                self.channels.push(channel);
            }
            let channel = self.channels[index / self.per_connection].clone();
            let sidecar = Sidecar {
                id: SidecarId {
                    route: self.route,
                    index,
                },
                form: self.form,
                epoch: self.epoch,
                stats: self.stats.clone(),
            };
            self.tasks.spawn(sidecar.run(channel));
            self.next += 1;
        }
        Ok(())
    }

    /// Ends every stream and closes the connections.
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Sidecar {
    id: SidecarId,
    form: Form,
    epoch: Instant,
    stats: Arc<RouteStats>,
}

/// What a sidecar reads of a response.
struct Response {
    type_url: String,
    version: String,
    nonce: String,
    resources: Vec<Bytes>,
}

impl Sidecar {
    async fn run(self, channel: Channel) {
        if let Err(e) = self.stream(channel).await {
            let mut failures = self
                .stats
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            failures.push(format!("{}: {e:#}", self.id.pod()));
        }
    }

    async fn stream(&self, mut channel: Channel) -> anyhow::Result<()> {
        let (requests, queued) = mpsc::channel(REQUEST_QUEUE);
        for (i, xds) in XdsType::ALL.into_iter().enumerate() {
            // Envoy sends its node on the first request only.
            let node = if i == 0 { self.id.node() } else { Bytes::new() };
            requests.send(vec![self.request(xds, node, "", "")]).await?;
        }
        let path = match self.form {
            Form::Sotw => SOTW_PATH,
            Form::Delta => DELTA_PATH,
        };
        let request = grpc::request(path, grpc::message_body(queued, false))?;
        poll_fn(|cx| channel.poll_ready(cx)).await?;
        let response = channel.call(request).await?;
        grpc::check_status(response.headers())?;

        let mut messages = Messages::new(response.into_body());
        let mut seen = [false; 3];
        while let Some(raw) = messages.next().await? {
            let at_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let response = self.decode(raw)?;
            let Some(xds) = XdsType::of(&response.type_url) else {
                bail!("unexpected type {}", response.type_url);
            };
            self.note(xds, &response, at_ns);
            if !std::mem::replace(&mut seen[xds.index()], true) && seen.iter().all(|s| *s) {
                self.stats.synced.fetch_add(1, Ordering::Relaxed);
            }
            let ack = self.request(xds, Bytes::new(), &response.version, &response.nonce);
            requests.send(vec![ack]).await?;
        }
        bail!("the stream ended")
    }

    fn note(&self, xds: XdsType, response: &Response, at_ns: u64) {
        if let Some((true, sent_ns)) = stamp(&response.nonce) {
            let sample = Sample {
                xds,
                latency_ns: at_ns.saturating_sub(sent_ns),
            };
            let mut samples = self.stats.samples.lock().unwrap_or_else(|e| e.into_inner());
            samples.push(sample);
            drop(samples);
            self.stats.received[xds.index()].fetch_add(1, Ordering::Relaxed);
        }
        if xds == XdsType::Lds && response.nonce.starts_with(NONCE_PREFIX) {
            let push = RelayPush {
                index: self.id.index,
                at_ns,
                inbound: response.resources.first().cloned().unwrap_or_default(),
            };
            let mut pushes = self
                .stats
                .relay_pushes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            pushes.push(push);
        }
    }

    fn decode(&self, raw: Bytes) -> anyhow::Result<Response> {
        Ok(match self.form {
            Form::Sotw => {
                let r = wire::DiscoveryResponse::decode(raw)?;
                Response {
                    type_url: r.type_url,
                    version: r.version_info,
                    nonce: r.nonce,
                    resources: r.resources,
                }
            }
            Form::Delta => {
                let r = wire::DeltaDiscoveryResponse::decode(raw)?;
                Response {
                    type_url: r.type_url,
                    version: r.system_version_info,
                    nonce: r.nonce,
                    resources: r.resources,
                }
            }
        })
    }

    /// A request for `xds`: the first of the type when `nonce` is empty, an ACK otherwise.
    fn request(&self, xds: XdsType, node: Bytes, version: &str, nonce: &str) -> Bytes {
        let encoded = match self.form {
            Form::Sotw => wire::DiscoveryRequest {
                version_info: version.to_string(),
                node,
                type_url: xds.url().to_string(),
                response_nonce: nonce.to_string(),
                ..Default::default()
            }
            .encode_to_vec(),
            Form::Delta => wire::DeltaDiscoveryRequest {
                node,
                type_url: xds.url().to_string(),
                response_nonce: nonce.to_string(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        Bytes::from(encoded)
    }
}
