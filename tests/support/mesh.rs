//! The world around one sidecar: a test CA, the application (backend), the inbound ports, and
//! the test upstream serving the sidecar's PERMISSIVE `virtualInbound` (the loadable flavour of
//! `testkit::istio`, current layout) and its cluster the way istiod would.

use std::net::Ipv4Addr;
use std::time::Duration;

use alpn_xds::testkit::istio::{InboundPort, Layout, LoadableSpec, Mode, PortProtocol};
use alpn_xds::testkit::istio::{PASSTHROUGH_HTTP_CHAIN, loadable_inbound};
use alpn_xds::testkit::upstream::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL, Snapshot, TestUpstream};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::util::pack_any;

use super::backend::Backend;
use super::certs::TestPki;
use super::free_ports;

/// The version of the upstream's LDS snapshot, shaped like istiod's push versions.
pub const LDS_VERSION: &str = "2025-01-01T00:00:00Z/1";
/// The version of the upstream's CDS snapshot.
pub const CDS_VERSION: &str = "2025-01-01T00:00:00Z/1";

/// How long Envoy may take to receive, warm and apply configuration.
pub const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of every backend response starts with this name.
pub const BACKEND_NAME: &str = "backend-web";

/// The cluster every chain of the listener routes to.
pub const BACKEND_CLUSTER: &str = "inbound|web||";

/// The loopback ports of the inbound listener.
#[derive(Clone, Copy, Debug)]
pub struct InboundPorts {
    /// A declared HTTP port of the workload (the container port): its own chains.
    pub http: u16,
    /// The listener's own port, on no chain's `destination_port`: the passthrough chains, as
    /// for an undeclared port behind iptables.
    pub passthrough: u16,
    /// The blackhole chain's port (istiod's 15006), which nothing binds.
    pub blackhole: u16,
}

impl InboundPorts {
    /// The chain tag (`x-alpn-xds-chain`) of the declared HTTP port's chain for `transport`.
    pub fn declared_chain(&self, transport: &str) -> String {
        format!("0.0.0.0_{} {transport}", self.http)
    }

    /// The chain tag of the passthrough HTTP chain for `transport`.
    pub fn passthrough_chain(&self, transport: &str) -> String {
        format!("{PASSTHROUGH_HTTP_CHAIN} {transport}")
    }
}

/// Everything a sidecar test needs but the sidecar itself.
pub struct Mesh {
    /// The mesh CA and its identities.
    pub pki: TestPki,
    /// The application behind the sidecar.
    pub backend: Backend,
    /// The inbound listener's ports.
    pub ports: InboundPorts,
    /// istiod's stand-in.
    pub upstream: TestUpstream,
}

impl Mesh {
    /// Starts the backend and an upstream serving the listener and its cluster.
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    /// Like [`Mesh::start`], with `edit` applied to the listener before the upstream serves it.
    pub async fn start_with(edit: impl FnOnce(&mut Listener, &InboundPorts)) -> Self {
        let pki = TestPki::new();
        let backend = Backend::start(BACKEND_NAME).await;
        let [http, passthrough, blackhole] = free_ports::<3>();
        let ports = InboundPorts {
            http,
            passthrough,
            blackhole,
        };

        let declared = [InboundPort {
            port: u32::from(http),
            protocol: PortProtocol::Http,
            mode: Mode::Permissive,
        }];
        let mut inbound = loadable_inbound(&LoadableSpec {
            layout: Layout::Current,
            workload_mode: Mode::Permissive,
            ip: Ipv4Addr::LOCALHOST,
            ports: &declared,
            passthrough_port: u32::from(passthrough),
            blackhole_port: u32::from(blackhole),
            cert_pem: &pki.server.cert_pem,
            key_pem: &pki.server.key_pem,
            ca_pem: &pki.ca_pem,
            cluster: BACKEND_CLUSTER,
            backend_port: backend.addr().port(),
        });
        edit(&mut inbound.listener, &ports);
        let snapshot = Snapshot::new()
            .with(
                CLUSTER_TYPE_URL,
                CDS_VERSION,
                vec![pack_any(inbound.cluster)],
            )
            .with(
                LISTENER_TYPE_URL,
                LDS_VERSION,
                vec![pack_any(inbound.listener)],
            );
        let upstream = TestUpstream::start(snapshot)
            .await
            .expect("start the test upstream");
        Self {
            pki,
            backend,
            ports,
            upstream,
        }
    }
}
