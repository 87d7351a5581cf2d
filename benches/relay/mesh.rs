//! What the bench upstream serves: an LDS of about 300 kB, a CDS of about 120 kB and an EDS of
//! about 20 kB, in the proportions of the small Istio test mesh in istio #31943 (LDS 467 kB, CDS
//! 117 kB, EDS 19 kB).
//!
//! LDS is one Istio-shaped `virtualInbound` per workload (10 ports, from the testkit) and a set of
//! outbound listeners shared by every workload. The outbound listeners are stand-ins of realistic
//! size: `virtualInbound`-shaped listeners of two ports, renamed and marked `OUTBOUND`. The relay
//! looks only at their top-level fields, so their insides matter only by their size. Clusters and
//! load assignments pass the relay as bytes; they are shaped like istiod's EDS clusters.
//!
//! Each workload's `virtualInbound` carries a generation in its metadata: bumping it gives every
//! workload a new listener, as a change in istiod would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster, circuit_breakers};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, Metadata, SocketAddress, TrafficDirection,
    TransportSocket, address, config_source, socket_address::PortSpecifier, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::{Any, Duration, Struct, UInt32Value, Value, value::Kind};
use prost::Message;

use alpn_xds::relay::listeners::LISTENER_TYPE;
use alpn_xds::testkit::istio::{InboundPort, Layout, Mode, benchmark_ports, virtual_inbound};
use alpn_xds::wire;

/// Type URL of `envoy.config.cluster.v3.Cluster`.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The three types a simulated sidecar subscribes to, in the order Envoy asks for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdsType {
    /// Clusters.
    Cds,
    /// Load assignments.
    Eds,
    /// Listeners.
    Lds,
}

impl XdsType {
    /// All three, in subscription order.
    pub const ALL: [XdsType; 3] = [XdsType::Cds, XdsType::Eds, XdsType::Lds];

    /// The type URL.
    pub fn url(self) -> &'static str {
        match self {
            XdsType::Cds => CLUSTER_TYPE,
            XdsType::Eds => ENDPOINT_TYPE,
            XdsType::Lds => LISTENER_TYPE,
        }
    }

    /// The type of a type URL, if it is one of the three.
    pub fn of(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.url() == url)
    }

    /// Position in [`XdsType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The short name.
    pub fn name(self) -> &'static str {
        match self {
            XdsType::Cds => "CDS",
            XdsType::Eds => "EDS",
            XdsType::Lds => "LDS",
        }
    }
}

/// Which ADS method the sidecars use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// `StreamAggregatedResources`.
    Sotw,
    /// `DeltaAggregatedResources`.
    Delta,
}

impl Form {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Form::Sotw => "SotW",
            Form::Delta => "Delta",
        }
    }
}

/// Ports of each workload's `virtualInbound`.
const INBOUND_PORTS: usize = 10;
/// Outbound listeners in every LDS response.
const OUTBOUND_LISTENERS: usize = 25;
/// Clusters in CDS and load assignments in EDS.
const SERVICES: usize = 100;
/// Resources of CDS and EDS that a Delta push carries: only what changed.
const DELTA_PUSH_RESOURCES: usize = 10;
/// Sidecars per workload: they share one `virtualInbound`, and its rewrite.
pub const SIDECARS_PER_WORKLOAD: usize = 10;

/// The resources, pre-encoded as the `resources` entries of responses of both forms.
pub struct Mesh {
    generation: AtomicU64,
    /// Encoded `resources` entries by form: the shared outbound listeners, all clusters, all
    /// load assignments, and the few of them a Delta push carries.
    entries: HashMap<Form, SharedEntries>,
    /// Each workload's wrapped `virtualInbound` by (form, workload, generation).
    inbound: Mutex<HashMap<(Form, usize, u64), Bytes>>,
}

struct SharedEntries {
    /// The outbound listeners, each wrapped as the form wraps a resource.
    outbound_resources: Vec<Bytes>,
    outbound: Bytes,
    clusters: Bytes,
    assignments: Bytes,
    clusters_push: Bytes,
    assignments_push: Bytes,
}

impl Mesh {
    /// Builds the shared resources.
    pub fn new() -> Self {
        let outbound: Vec<(String, Bytes)> =
            (0..OUTBOUND_LISTENERS).map(outbound_listener).collect();
        let clusters: Vec<(String, Bytes)> = (0..SERVICES).map(cluster).collect();
        let assignments: Vec<(String, Bytes)> = (0..SERVICES).map(assignment).collect();

        let mut entries = HashMap::new();
        for form in [Form::Sotw, Form::Delta] {
            let wrap_all = |type_url: &str, resources: &[(String, Bytes)], version: &str| {
                resources
                    .iter()
                    .map(|(name, value)| wrap(form, type_url, name, value, version))
                    .collect::<Vec<_>>()
            };
            let outbound_resources = wrap_all(LISTENER_TYPE, &outbound, "1");
            let clusters_push = wrap_all(CLUSTER_TYPE, &clusters[..DELTA_PUSH_RESOURCES], "2");
            let assignments_push =
                wrap_all(ENDPOINT_TYPE, &assignments[..DELTA_PUSH_RESOURCES], "2");
            let shared = SharedEntries {
                outbound: entries_of(&outbound_resources),
                clusters: entries_of(&wrap_all(CLUSTER_TYPE, &clusters, "1")),
                assignments: entries_of(&wrap_all(ENDPOINT_TYPE, &assignments, "1")),
                clusters_push: entries_of(&clusters_push),
                assignments_push: entries_of(&assignments_push),
                outbound_resources,
            };
            entries.insert(form, shared);
        }
        Self {
            generation: AtomicU64::new(0),
            entries,
            inbound: Mutex::new(HashMap::new()),
        }
    }

    /// The current generation of the `virtualInbound` listeners.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Gives every workload a new `virtualInbound`.
    pub fn bump_generation(&self) {
        let next = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // Older generations are no longer sent.
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        inbound.retain(|(_, _, generation), _| *generation + 1 >= next);
    }

    /// The `resources` entries of a response of `xds` to a sidecar of `workload`: everything
    /// for the first response of a stream and for every state-of-the-world response, only what
    /// changed for a Delta push.
    pub fn body(&self, form: Form, xds: XdsType, workload: usize, first: bool) -> Vec<Bytes> {
        let shared = &self.entries[&form];
        let delta_push = form == Form::Delta && !first;
        match xds {
            XdsType::Lds if delta_push => vec![entries_of(&[self.inbound(form, workload)])],
            XdsType::Lds => vec![
                entries_of(&[self.inbound(form, workload)]),
                shared.outbound.clone(),
            ],
            XdsType::Cds if delta_push => vec![shared.clusters_push.clone()],
            XdsType::Cds => vec![shared.clusters.clone()],
            XdsType::Eds if delta_push => vec![shared.assignments_push.clone()],
            XdsType::Eds => vec![shared.assignments.clone()],
        }
    }

    /// Workload `workload`'s `virtualInbound` at the current generation, wrapped for `form`.
    pub fn inbound(&self, form: Form, workload: usize) -> Bytes {
        let generation = self.generation();
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        inbound
            .entry((form, workload, generation))
            .or_insert_with(|| {
                let listener = inbound_listener(workload, generation);
                let version = format!("g{generation}");
                wrap(form, LISTENER_TYPE, "virtualInbound", &listener, &version)
            })
            .clone()
    }

    /// The outbound listeners, wrapped for `form`.
    pub fn outbound(&self, form: Form) -> &[Bytes] {
        &self.entries[&form].outbound_resources
    }

    /// Sizes of one full state-of-the-world response of each type: (LDS, CDS, EDS) bytes.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let size = |xds| -> usize {
            self.body(Form::Sotw, xds, 0, true)
                .iter()
                .map(Bytes::len)
                .sum()
        };
        (size(XdsType::Lds), size(XdsType::Cds), size(XdsType::Eds))
    }

    /// Resources in one full response of each type: (LDS, CDS, EDS).
    pub fn counts(&self) -> (usize, usize, usize) {
        (OUTBOUND_LISTENERS + 1, SERVICES, SERVICES)
    }
}

/// One resource as `form` wraps it: an `Any` for state of the world, a `Resource` for Delta.
fn wrap(form: Form, type_url: &str, name: &str, value: &Bytes, version: &str) -> Bytes {
    let any = wire::Any {
        type_url: type_url.to_string(),
        value: value.clone(),
    };
    match form {
        Form::Sotw => Bytes::from(any.encode_to_vec()),
        Form::Delta => Bytes::from(
            wire::Resource {
                version: version.to_string(),
                resource: Some(any),
                name: name.to_string(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    }
}

/// `resources` encoded as the `resources` entries of a response: field 2 in both forms.
fn entries_of(resources: &[Bytes]) -> Bytes {
    let entries = wire::DiscoveryResponse {
        resources: resources.to_vec(),
        ..Default::default()
    };
    Bytes::from(entries.encode_to_vec())
}

/// Workload `workload`'s `virtualInbound` at `generation`: 10 PERMISSIVE ports, numbered apart
/// from other workloads'.
pub fn inbound_listener(workload: usize, generation: u64) -> Bytes {
    let offset = u32::try_from(workload * INBOUND_PORTS).unwrap_or(0) % 6000;
    let ports: Vec<InboundPort> = benchmark_ports(INBOUND_PORTS)
        .into_iter()
        .map(|p| InboundPort {
            port: p.port + offset,
            ..p
        })
        .collect();
    let mut listener = virtual_inbound(Layout::Current, Mode::Permissive, &ports);
    listener.metadata = Some(generation_metadata(generation));
    Bytes::from(listener.encode_to_vec())
}

fn generation_metadata(generation: u64) -> Metadata {
    let mut fields = Struct::default();
    fields.fields.insert(
        "generation".to_string(),
        Value {
            kind: Some(Kind::StringValue(generation.to_string())),
        },
    );
    Metadata {
        filter_metadata: [("alpn-xds-bench".to_string(), fields)]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn outbound_listener(index: usize) -> (String, Bytes) {
    let port = 9000 + u32::try_from(index).unwrap_or(0) * 2;
    let ports: Vec<InboundPort> = benchmark_ports(2)
        .into_iter()
        .enumerate()
        .map(|(i, p)| InboundPort {
            port: port + u32::try_from(i).unwrap_or(0),
            ..p
        })
        .collect();
    let name = format!("0.0.0.0_{port}");
    let listener = Listener {
        name: name.clone(),
        traffic_direction: TrafficDirection::Outbound as i32,
        ..virtual_inbound(Layout::Current, Mode::Permissive, &ports)
    };
    (name, Bytes::from(listener.encode_to_vec()))
}

fn service_host(index: usize) -> String {
    format!("svc-{index}.bench.svc.cluster.local")
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource::default(),
        )),
        resource_api_version: 2,
        ..Default::default()
    }
}

/// An EDS cluster as istiod writes one for a service port: circuit breakers, metadata, and an
/// mTLS transport socket whose config is carried as opaque bytes of a realistic size.
fn cluster(index: usize) -> (String, Bytes) {
    let name = format!("outbound|8080||{}", service_host(index));
    let mut metadata = Struct::default();
    metadata.fields.insert(
        "services".to_string(),
        Value {
            kind: Some(Kind::StringValue(format!(
                "host={};name=svc-{index};namespace=bench",
                service_host(index)
            ))),
        },
    );
    let tls_config = Any {
        type_url:
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
                .to_string(),
        // SDS names, the root CA reference, SAN matchers and ALPNs come to about this size.
        value: vec![0x0a; 560],
    };
    let cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.clone(),
        }),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        lb_policy: LbPolicy::LeastRequest as i32,
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value: 4294967295 }),
                max_pending_requests: Some(UInt32Value { value: 4294967295 }),
                max_requests: Some(UInt32Value { value: 4294967295 }),
                max_retries: Some(UInt32Value { value: 4294967295 }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        metadata: Some(Metadata {
            filter_metadata: [("istio".to_string(), metadata)].into_iter().collect(),
            ..Default::default()
        }),
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".to_string(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(tls_config)),
        }),
        ..Default::default()
    };
    (name, Bytes::from(cluster.encode_to_vec()))
}

/// Two endpoints of a service, with Istio's workload metadata.
fn assignment(index: usize) -> (String, Bytes) {
    let name = format!("outbound|8080||{}", service_host(index));
    let endpoint = |host: u8| {
        let mut istio = Struct::default();
        istio.fields.insert(
            "workload".to_string(),
            Value {
                kind: Some(Kind::StringValue(format!(
                    "svc-{index};bench;svc-{index};v1;Kubernetes"
                ))),
            },
        );
        LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: format!("10.1.{}.{host}", index % 250),
                        port_specifier: Some(PortSpecifier::PortValue(8080)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            metadata: Some(Metadata {
                filter_metadata: [("istio".to_string(), istio)].into_iter().collect(),
                ..Default::default()
            }),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }
    };
    let assignment = ClusterLoadAssignment {
        cluster_name: name.clone(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![endpoint(1), endpoint(2)],
            load_balancing_weight: Some(UInt32Value { value: 2 }),
            ..Default::default()
        }],
        ..Default::default()
    };
    (name, Bytes::from(assignment.encode_to_vec()))
}
