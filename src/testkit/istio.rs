//! Builds Istio-shaped `virtualInbound` listeners for tests, examples and benchmarks, following
//! how istiod constructs them (reference `istio-internals.md` §1.2-§1.5): per port and mTLS
//! mode the filter-chain table of `getFilterChainMatchOptions`, the blackhole and passthrough
//! chains, the listener filters and the `DownstreamTlsContext`, in the Istio 1.11 layout and in
//! the current (1.23+) one.
//!
//! Two flavours share that structure:
//! - "istio" ([`virtual_inbound`]): what istiod sends, with SDS secret names, Istio's own
//!   filters and `original_dst`. Istio-only filters carry their type URL and an empty or
//!   minimal payload; which of them a chain has varies between Istio minor versions, the chain
//!   table and the TLS context do not.
//! - "loadable" ([`loadable_inbound`]): what stock Envoy accepts. Inline certificates, an HTTP
//!   connection manager with an inline route, `tcp_proxy`, no `original_dst`: with no iptables
//!   the listener binds loopback and lists one extra address per port, so a connection's local
//!   port selects that port's chains, and a connection to the passthrough port reaches the
//!   passthrough chains.

use std::net::Ipv4Addr;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster,
    cluster::{ClusterDiscoveryType, DiscoveryType},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, SocketAddress, TrafficDirection, address, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::listener::v3::{
    AdditionalAddress, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};

mod filters;

use filters::{
    istio_hcm, istio_stats, listener_filters, loadable_hcm, metadata_exchange, strings, tcp_proxy,
    tls_socket,
};

/// The name of the sidecar's inbound listener.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
/// The port iptables redirects inbound traffic to; also the blackhole chain's port.
pub const INBOUND_CAPTURE_PORT: u32 = 15006;
/// Name of the chain that drops connections addressed to the capture port itself.
pub const BLACKHOLE_CHAIN: &str = "virtualInbound-blackhole";
/// Name of the passthrough chains that speak HTTP.
pub const PASSTHROUGH_HTTP_CHAIN: &str = "virtualInbound-catchall-http";
/// Name of the passthrough chains that proxy TCP.
pub const PASSTHROUGH_TCP_CHAIN: &str = "virtualInbound";
/// The cluster of the blackhole chain.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// `plaintextHTTPALPNs` in Istio 1.11 (and later with `PILOT_HTTP10`).
pub const PLAINTEXT_HTTP_ALPNS_1_11: &[&str] = &["http/1.0", "http/1.1", "h2c"];
/// `plaintextHTTPALPNs` since Istio 1.13.
pub const PLAINTEXT_HTTP_ALPNS: &[&str] = &["http/1.1", "h2c"];
/// `mtlsHTTPALPNs`: what sidecar clients offer for HTTP.
pub const MTLS_HTTP_ALPNS: &[&str] = &["istio-http/1.0", "istio-http/1.1", "istio-h2"];
/// `allIstioMtlsALPNs`: every ALPN a sidecar client may offer.
pub const ALL_ISTIO_MTLS_ALPNS: &[&str] = &[
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];
/// `mtlsTCPWithMxcALPNs`: what sidecar clients offer for TCP.
pub const MTLS_TCP_WITH_MXC_ALPNS: &[&str] = &["istio-peer-exchange", "istio"];
/// The server TLS context's `alpn_protocols` on HTTP chains.
pub const SERVER_HTTP_ALPNS: &[&str] = &["h2", "http/1.1"];
/// The server TLS context's `alpn_protocols` on TCP chains.
pub const SERVER_TCP_ALPNS: &[&str] = &["istio-peer-exchange", "h2", "http/1.1"];
/// The URI SAN prefix a client certificate must carry (trust domain `cluster.local`).
pub const SPIFFE_PREFIX: &str = "spiffe://cluster.local/";
/// The response header the loadable flavour adds on HTTP chains: `<chain name> <transport>`.
pub const CHAIN_HEADER: &str = "x-alpn-xds-chain";

const CIPHER_SUITES: &[&str] = &[
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
];

/// How a port is declared in its Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortProtocol {
    /// `http`, `http2`, `grpc`…: HTTP chains only.
    Http,
    /// `tcp` and other opaque protocols: TCP chains only.
    Tcp,
    /// Undeclared: istiod sniffs, with HTTP and TCP chains.
    Auto,
}

/// The effective PeerAuthentication mTLS mode of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
    /// Plaintext only.
    Disable,
}

/// One inbound port of the workload: the container port that chains match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundPort {
    /// The target (container) port, the chains' `destination_port`.
    pub port: u32,
    /// How the Service declares it.
    pub protocol: PortProtocol,
    /// Its effective mTLS mode.
    pub mode: Mode,
}

/// Which istiod generation shapes the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Istio 1.11: passthrough chains per IP family with `prefix_ranges` and clusters
    /// `InboundPassthroughClusterIpv4`/`Ipv6`, per-port chains sorted by name.
    Istio111,
    /// Istio 1.23 and later: one passthrough set without `prefix_ranges`, cluster
    /// `InboundPassthroughCluster`, per-port chains sorted by port.
    Current,
}

impl Layout {
    /// `plaintextHTTPALPNs` of this generation.
    pub fn plaintext_http_alpns(self) -> &'static [&'static str] {
        match self {
            Layout::Istio111 => PLAINTEXT_HTTP_ALPNS_1_11,
            Layout::Current => PLAINTEXT_HTTP_ALPNS,
        }
    }

    /// The passthrough chain sets: `(prefix range, cluster)` each.
    fn passthrough_sets(self) -> Vec<(Option<CidrRange>, &'static str)> {
        let any = |prefix: &str| {
            Some(CidrRange {
                address_prefix: prefix.to_owned(),
                prefix_len: Some(UInt32Value { value: 0 }),
            })
        };
        match self {
            Layout::Istio111 => vec![
                (any("0.0.0.0"), "InboundPassthroughClusterIpv4"),
                (any("::0"), "InboundPassthroughClusterIpv6"),
            ],
            Layout::Current => vec![(None, "InboundPassthroughCluster")],
        }
    }
}

/// The transport a chain matches (`filter_chain_match.transport_protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `tls`: the TLS inspector saw a ClientHello.
    Tls,
    /// `raw_buffer`: anything else.
    RawBuffer,
}

impl Transport {
    /// The value Envoy matches on.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::RawBuffer => "raw_buffer",
        }
    }
}

/// One row of istiod's filter-chain table (`getFilterChainMatchOptions`, §1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChainOption {
    /// The transport the chain matches.
    pub transport: Transport,
    /// The chain's `application_protocols` match (empty: any).
    pub application_protocols: &'static [&'static str],
    /// An HTTP connection manager (`true`) or a TCP proxy.
    pub http: bool,
    /// Whether the chain terminates mTLS with a `DownstreamTlsContext`.
    pub mtls: bool,
}

/// The chains istiod builds for one port, in istiod's order.
pub fn chain_options(layout: Layout, mode: Mode, protocol: PortProtocol) -> Vec<ChainOption> {
    use PortProtocol::{Auto, Http, Tcp};
    use Transport::{RawBuffer as Raw, Tls};
    let row = |transport, application_protocols, http, mtls| ChainOption {
        transport,
        application_protocols,
        http,
        mtls,
    };
    let plaintext = layout.plaintext_http_alpns();
    match (mode, protocol) {
        (Mode::Permissive, Http) => {
            vec![
                row(Tls, ALL_ISTIO_MTLS_ALPNS, true, true),
                row(Raw, &[], true, false),
            ]
        }
        (Mode::Permissive, Tcp) => vec![
            row(Tls, ALL_ISTIO_MTLS_ALPNS, false, true),
            row(Tls, &[], false, false),
            row(Raw, &[], false, false),
        ],
        (Mode::Permissive, Auto) => vec![
            row(Tls, MTLS_HTTP_ALPNS, true, true),
            row(Raw, plaintext, true, false),
            row(Tls, MTLS_TCP_WITH_MXC_ALPNS, false, true),
            row(Raw, &[], false, false),
            row(Tls, &[], false, false),
        ],
        (Mode::Strict, Http) => vec![row(Tls, &[], true, true)],
        (Mode::Strict, Tcp) => vec![row(Tls, &[], false, true)],
        (Mode::Strict, Auto) => {
            vec![
                row(Tls, MTLS_HTTP_ALPNS, true, true),
                row(Tls, &[], false, true),
            ]
        }
        (Mode::Disable, Http) => vec![row(Raw, &[], true, false)],
        (Mode::Disable, Tcp) => vec![row(Raw, &[], false, false)],
        (Mode::Disable, Auto) => vec![
            row(Raw, plaintext, true, false),
            row(Raw, &[], false, false),
        ],
    }
}

/// istiod's `virtualInbound` (on 0.0.0.0:15006) for a workload whose own (workload-level) mode
/// is `workload_mode`, which the passthrough chains use, with `ports` as its inbound ports
/// (distinct, and not 15006). The 1.11 layout gets both IP families' passthrough sets, as
/// istiod of that era wrote them. Extra passthrough sets for `portLevelMtls` ports outside the
/// Service are not built.
pub fn virtual_inbound(layout: Layout, workload_mode: Mode, ports: &[InboundPort]) -> Listener {
    build(
        &Flavour::Istio,
        layout,
        workload_mode,
        ports,
        INBOUND_CAPTURE_PORT,
    )
}

/// `count` ports for benchmark listeners: from 8000 up, mostly HTTP with every third TCP and
/// every fifth undeclared, all PERMISSIVE (the mode the rewrite works on).
pub fn benchmark_ports(count: usize) -> Vec<InboundPort> {
    (0..count)
        .map(|i| {
            let protocol = match i {
                _ if i % 5 == 4 => PortProtocol::Auto,
                _ if i % 3 == 2 => PortProtocol::Tcp,
                _ => PortProtocol::Http,
            };
            let port = 8000 + u32::try_from(i).unwrap_or(u32::MAX - 8000);
            InboundPort {
                port,
                protocol,
                mode: Mode::Permissive,
            }
        })
        .collect()
}

/// What the loadable flavour needs to know beyond the ports.
#[derive(Clone, Debug)]
pub struct LoadableSpec<'a> {
    /// Which istiod generation to mimic.
    pub layout: Layout,
    /// Mode of the passthrough chains.
    pub workload_mode: Mode,
    /// The loopback address every port is bound on (use 127.0.0.1).
    pub ip: Ipv4Addr,
    /// The ports; each is bound as an additional address and matched by `destination_port`.
    pub ports: &'a [InboundPort],
    /// The listener's main port, on no chain's `destination_port`: passthrough chains.
    pub passthrough_port: u32,
    /// The blackhole chain's port, which nothing binds.
    pub blackhole_port: u32,
    /// Server certificate chain (PEM), presented on mTLS chains.
    pub cert_pem: &'a str,
    /// Its private key (PEM).
    pub key_pem: &'a str,
    /// The CA (PEM) client certificates must chain to.
    pub ca_pem: &'a str,
    /// The cluster every HTTP route and TCP proxy goes to.
    pub cluster: &'a str,
    /// The backend port of that cluster on `ip`.
    pub backend_port: u16,
}

/// A loadable listener and the cluster its chains route to.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadableInbound {
    /// The `virtualInbound` listener.
    pub listener: Listener,
    /// The STATIC cluster named `spec.cluster`, to be served over CDS or put in a bootstrap.
    pub cluster: Cluster,
}

/// The loadable flavour: same chains and matches as [`virtual_inbound`], for stock Envoy.
pub fn loadable_inbound(spec: &LoadableSpec<'_>) -> LoadableInbound {
    let mut listener = build(
        &Flavour::Loadable(spec),
        spec.layout,
        spec.workload_mode,
        spec.ports,
        spec.blackhole_port,
    );
    listener.address = Some(socket_address(spec.ip, spec.passthrough_port));
    listener.additional_addresses = spec
        .ports
        .iter()
        .map(|p| AdditionalAddress {
            address: Some(socket_address(spec.ip, p.port)),
            ..Default::default()
        })
        .collect();
    LoadableInbound {
        listener,
        cluster: static_cluster(spec.cluster, spec.ip, spec.backend_port),
    }
}

/// A STATIC cluster with one endpoint.
pub fn static_cluster(name: &str, ip: Ipv4Addr, port: u16) -> Cluster {
    let endpoint = LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(ip, u32::from(port))),
            ..Default::default()
        })),
        ..Default::default()
    };
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn socket_address(ip: Ipv4Addr, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

enum Flavour<'a> {
    Istio,
    Loadable(&'a LoadableSpec<'a>),
}

/// Where a chain's traffic goes and the names istiod derives from it.
struct Upstream {
    cluster: String,
    http_stat_prefix: String,
    route_name: String,
    virtual_host: String,
    operation: String,
}

impl Upstream {
    fn port(port: u32) -> Self {
        let cluster = format!("inbound|{port}||");
        Upstream {
            http_stat_prefix: format!("inbound_0.0.0.0_{port}"),
            route_name: cluster.clone(),
            virtual_host: format!("inbound|http|{port}"),
            operation: format!(":{port}/*"),
            cluster,
        }
    }

    fn passthrough(cluster: &str) -> Self {
        Upstream {
            cluster: cluster.to_owned(),
            http_stat_prefix: cluster.to_owned(),
            route_name: cluster.to_owned(),
            virtual_host: "inbound|http|0".to_owned(),
            operation: ":0/*".to_owned(),
        }
    }
}

fn build(
    flavour: &Flavour<'_>,
    layout: Layout,
    workload_mode: Mode,
    ports: &[InboundPort],
    blackhole_port: u32,
) -> Listener {
    let mut chains = vec![blackhole_chain(flavour, layout, blackhole_port)];
    for (prefix, cluster) in layout.passthrough_sets() {
        for option in chain_options(layout, workload_mode, PortProtocol::Auto) {
            let name = if option.http {
                PASSTHROUGH_HTTP_CHAIN
            } else {
                PASSTHROUGH_TCP_CHAIN
            };
            let upstream = Upstream::passthrough(cluster);
            chains.push(chain(
                flavour,
                layout,
                name,
                None,
                prefix.clone(),
                &option,
                &upstream,
            ));
        }
    }

    let mut sorted: Vec<&InboundPort> = ports.iter().collect();
    match layout {
        Layout::Istio111 => sorted.sort_by_key(|p| port_chain_name(p.port)),
        Layout::Current => sorted.sort_by_key(|p| p.port),
    }
    for port in sorted {
        let name = port_chain_name(port.port);
        let upstream = Upstream::port(port.port);
        for option in chain_options(layout, port.mode, port.protocol) {
            chains.push(chain(
                flavour,
                layout,
                &name,
                Some(port.port),
                None,
                &option,
                &upstream,
            ));
        }
    }

    Listener {
        name: VIRTUAL_INBOUND.to_owned(),
        address: Some(socket_address(Ipv4Addr::UNSPECIFIED, INBOUND_CAPTURE_PORT)),
        filter_chains: chains,
        listener_filters: listener_filters(flavour, layout, workload_mode, ports, blackhole_port),
        listener_filters_timeout: Some(Duration::default()),
        continue_on_listener_filters_timeout: true,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// The per-port chain name, istiod's per-port listener name `<bind>_<port>`.
fn port_chain_name(port: u32) -> String {
    format!("0.0.0.0_{port}")
}

fn blackhole_chain(flavour: &Flavour<'_>, layout: Layout, port: u32) -> FilterChain {
    let mut filters = Vec::new();
    if matches!(flavour, Flavour::Istio) && layout == Layout::Current {
        filters.extend([metadata_exchange(), istio_stats()]);
    }
    // In the loadable flavour too the cluster does not exist: the connection is closed.
    filters.push(tcp_proxy(BLACKHOLE_CLUSTER));
    FilterChain {
        name: BLACKHOLE_CHAIN.to_owned(),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: Some(UInt32Value { value: port }),
            ..Default::default()
        }),
        filters,
        ..Default::default()
    }
}

fn chain(
    flavour: &Flavour<'_>,
    layout: Layout,
    name: &str,
    port: Option<u32>,
    prefix: Option<CidrRange>,
    option: &ChainOption,
    upstream: &Upstream,
) -> FilterChain {
    let cluster = match flavour {
        Flavour::Istio => upstream.cluster.as_str(),
        Flavour::Loadable(spec) => spec.cluster,
    };
    let filters = match (flavour, option.http) {
        (Flavour::Istio, true) => vec![metadata_exchange(), istio_hcm(layout, upstream)],
        (Flavour::Istio, false) => vec![metadata_exchange(), istio_stats(), tcp_proxy(cluster)],
        (Flavour::Loadable(_), true) => {
            let tag = format!("{name} {}", option.transport.as_str());
            vec![loadable_hcm(upstream, cluster, &tag)]
        }
        (Flavour::Loadable(_), false) => vec![tcp_proxy(cluster)],
    };
    let alpns = if option.http {
        SERVER_HTTP_ALPNS
    } else {
        SERVER_TCP_ALPNS
    };
    FilterChain {
        name: name.to_owned(),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: port.map(|value| UInt32Value { value }),
            prefix_ranges: prefix.into_iter().collect(),
            transport_protocol: option.transport.as_str().to_owned(),
            application_protocols: strings(option.application_protocols),
            ..Default::default()
        }),
        filters,
        transport_socket: option.mtls.then(|| tls_socket(flavour, layout, alpns)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{
        config_source::ConfigSourceSpecifier, grpc_service::TargetSpecifier, transport_socket,
    };
    use envoy_types::pb::envoy::config::listener::v3::{
        ListenerFilter, ListenerFilterChainMatchPredicate, filter, listener_filter,
        listener_filter_chain_match_predicate::Rule,
    };
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        DownstreamTlsContext, common_tls_context::ValidationContextType,
        tls_parameters::TlsProtocol,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    use prost::{Message, Name};

    use super::*;

    fn port(port: u32, protocol: PortProtocol, mode: Mode) -> InboundPort {
        InboundPort {
            port,
            protocol,
            mode,
        }
    }

    fn tls(chain: &FilterChain) -> Option<DownstreamTlsContext> {
        let socket = chain.transport_socket.as_ref()?;
        assert_eq!(socket.name, "envoy.transport_sockets.tls");
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
            panic!("TLS socket without typed_config");
        };
        assert_eq!(any.type_url, DownstreamTlsContext::type_url());
        Some(DownstreamTlsContext::decode(any.value.as_slice()).expect("DownstreamTlsContext"))
    }

    fn type_urls(chain: &FilterChain) -> Vec<String> {
        let url = |f: &envoy_types::pb::envoy::config::listener::v3::Filter| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => any.type_url.clone(),
            _ => panic!("filter {} without typed_config", f.name),
        };
        chain.filters.iter().map(url).collect()
    }

    /// A chain in the notation of the reference tables: transport, match ALPN set, HCM or TCP,
    /// and the server ALPN of its TLS context.
    fn describe(chain: &FilterChain) -> String {
        let matched = chain.filter_chain_match.clone().unwrap_or_default();
        let alpn: Vec<&str> = matched
            .application_protocols
            .iter()
            .map(String::as_str)
            .collect();
        let set = match alpn.as_slice() {
            [] => "-",
            a if a == ALL_ISTIO_MTLS_ALPNS => "allIstioMtls",
            a if a == MTLS_HTTP_ALPNS => "mtlsHTTP",
            a if a == MTLS_TCP_WITH_MXC_ALPNS => "mtlsTCPWithMxc",
            a if a == PLAINTEXT_HTTP_ALPNS || a == PLAINTEXT_HTTP_ALPNS_1_11 => "plaintextHTTP",
            other => panic!("unexpected ALPN set {other:?}"),
        };
        let urls = type_urls(chain);
        let proto = if urls.contains(&HttpConnectionManager::type_url()) {
            "HTTP"
        } else {
            assert!(urls.contains(&TcpProxy::type_url()), "{urls:?}");
            "TCP"
        };
        let server = match tls(chain) {
            Some(context) => context
                .common_tls_context
                .expect("common")
                .alpn_protocols
                .join(","),
            None => "no TLS".to_owned(),
        };
        format!("{} {set} {proto} {server}", matched.transport_protocol)
    }

    const HTTP_TLS: &str = "h2,http/1.1";
    const TCP_TLS: &str = "istio-peer-exchange,h2,http/1.1";

    /// §1.3, written out per mode and protocol.
    fn reference_table(mode: Mode, protocol: PortProtocol) -> Vec<String> {
        let rows: &[(&str, &str, &str, Option<&str>)] = match (mode, protocol) {
            (Mode::Permissive, PortProtocol::Http) => &[
                ("tls", "allIstioMtls", "HTTP", Some(HTTP_TLS)),
                ("raw_buffer", "-", "HTTP", None),
            ],
            (Mode::Permissive, PortProtocol::Tcp) => &[
                ("tls", "allIstioMtls", "TCP", Some(TCP_TLS)),
                ("tls", "-", "TCP", None),
                ("raw_buffer", "-", "TCP", None),
            ],
            (Mode::Permissive, PortProtocol::Auto) => &[
                ("tls", "mtlsHTTP", "HTTP", Some(HTTP_TLS)),
                ("raw_buffer", "plaintextHTTP", "HTTP", None),
                ("tls", "mtlsTCPWithMxc", "TCP", Some(TCP_TLS)),
                ("raw_buffer", "-", "TCP", None),
                ("tls", "-", "TCP", None),
            ],
            (Mode::Strict, PortProtocol::Http) => &[("tls", "-", "HTTP", Some(HTTP_TLS))],
            (Mode::Strict, PortProtocol::Tcp) => &[("tls", "-", "TCP", Some(TCP_TLS))],
            (Mode::Strict, PortProtocol::Auto) => &[
                ("tls", "mtlsHTTP", "HTTP", Some(HTTP_TLS)),
                ("tls", "-", "TCP", Some(TCP_TLS)),
            ],
            (Mode::Disable, PortProtocol::Http) => &[("raw_buffer", "-", "HTTP", None)],
            (Mode::Disable, PortProtocol::Tcp) => &[("raw_buffer", "-", "TCP", None)],
            (Mode::Disable, PortProtocol::Auto) => &[
                ("raw_buffer", "plaintextHTTP", "HTTP", None),
                ("raw_buffer", "-", "TCP", None),
            ],
        };
        rows.iter()
            .map(|(t, set, proto, tls)| format!("{t} {set} {proto} {}", tls.unwrap_or("no TLS")))
            .collect()
    }

    const MODES: [Mode; 3] = [Mode::Permissive, Mode::Strict, Mode::Disable];
    const PROTOCOLS: [PortProtocol; 3] =
        [PortProtocol::Http, PortProtocol::Tcp, PortProtocol::Auto];
    const LAYOUTS: [Layout; 2] = [Layout::Istio111, Layout::Current];

    #[test]
    fn per_port_chains_follow_the_reference_table() {
        for layout in LAYOUTS {
            for mode in MODES {
                for protocol in PROTOCOLS {
                    let listener = virtual_inbound(layout, mode, &[port(9080, protocol, mode)]);
                    let port_chains: Vec<String> = listener
                        .filter_chains
                        .iter()
                        .filter(|c| c.name == "0.0.0.0_9080")
                        .inspect(|c| {
                            let matched = c.filter_chain_match.clone().unwrap_or_default();
                            assert_eq!(matched.destination_port.map(|p| p.value), Some(9080));
                            assert!(matched.prefix_ranges.is_empty());
                        })
                        .map(describe)
                        .collect();
                    let at = format!("{layout:?} {mode:?} {protocol:?}");
                    assert_eq!(port_chains, reference_table(mode, protocol), "{at}");
                }
            }
        }
    }

    #[test]
    fn plaintext_alpns_depend_on_the_istio_generation() {
        let plaintext = |layout| {
            let listener = virtual_inbound(layout, Mode::Permissive, &[]);
            let chain = listener
                .filter_chains
                .iter()
                .find(|c| c.name == PASSTHROUGH_HTTP_CHAIN && c.transport_socket.is_none())
                .cloned()
                .expect("plaintext passthrough HTTP chain");
            chain
                .filter_chain_match
                .expect("match")
                .application_protocols
        };
        assert_eq!(plaintext(Layout::Istio111), ["http/1.0", "http/1.1", "h2c"]);
        assert_eq!(plaintext(Layout::Current), ["http/1.1", "h2c"]);
    }

    #[test]
    fn passthrough_chains_follow_the_layout_and_the_workload_mode() {
        for mode in MODES {
            let expected = reference_table(mode, PortProtocol::Auto);

            let current = virtual_inbound(Layout::Current, mode, &[]);
            assert_eq!(current.filter_chains.len(), 1 + expected.len());
            for chain in &current.filter_chains[1..] {
                let matched = chain.filter_chain_match.clone().expect("match");
                assert!(matched.destination_port.is_none() && matched.prefix_ranges.is_empty());
                let urls = type_urls(chain);
                let http = urls.contains(&HttpConnectionManager::type_url());
                let name = if http {
                    PASSTHROUGH_HTTP_CHAIN
                } else {
                    PASSTHROUGH_TCP_CHAIN
                };
                assert_eq!(chain.name, name);
                assert_eq!(upstream_cluster(chain), "InboundPassthroughCluster");
            }
            let described: Vec<String> = current.filter_chains[1..].iter().map(describe).collect();
            assert_eq!(described, expected, "{mode:?}");

            let old = virtual_inbound(Layout::Istio111, mode, &[]);
            assert_eq!(old.filter_chains.len(), 1 + 2 * expected.len());
            let families = old.filter_chains[1..].chunks(expected.len());
            for (set, (prefix, cluster)) in families.zip([
                ("0.0.0.0", "InboundPassthroughClusterIpv4"),
                ("::0", "InboundPassthroughClusterIpv6"),
            ]) {
                for chain in set {
                    let ranges = chain
                        .filter_chain_match
                        .clone()
                        .expect("match")
                        .prefix_ranges;
                    assert_eq!(ranges.len(), 1);
                    assert_eq!(ranges[0].address_prefix, prefix);
                    assert_eq!(ranges[0].prefix_len.map(|l| l.value), Some(0));
                    assert_eq!(upstream_cluster(chain), cluster);
                }
                assert_eq!(set.iter().map(describe).collect::<Vec<_>>(), expected);
            }
        }
    }

    /// The cluster a chain's tcp_proxy or route sends to.
    fn upstream_cluster(chain: &FilterChain) -> String {
        use envoy_types::pb::envoy::config::route::v3::{route, route_action};
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
        use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
        for filter in &chain.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                continue;
            };
            if any.type_url == TcpProxy::type_url() {
                let proxy = TcpProxy::decode(any.value.as_slice()).expect("TcpProxy");
                let Some(ClusterSpecifier::Cluster(cluster)) = proxy.cluster_specifier else {
                    panic!("tcp_proxy without cluster");
                };
                return cluster;
            }
            if any.type_url == HttpConnectionManager::type_url() {
                let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("HCM");
                let Some(RouteSpecifier::RouteConfig(routes)) = hcm.route_specifier else {
                    panic!("HCM without inline route");
                };
                let action = routes.virtual_hosts[0].routes[0].action.clone();
                let Some(route::Action::Route(action)) = action else {
                    panic!("no route action")
                };
                let Some(route_action::ClusterSpecifier::Cluster(cluster)) =
                    action.cluster_specifier
                else {
                    panic!("route without cluster");
                };
                return cluster;
            }
        }
        panic!("chain {} has no upstream", chain.name)
    }

    #[test]
    fn chains_are_ordered_as_istiod_orders_them() {
        let ports = [
            port(80, PortProtocol::Http, Mode::Permissive),
            port(15021, PortProtocol::Tcp, Mode::Strict),
            port(9080, PortProtocol::Auto, Mode::Disable),
        ];
        let order = |layout| {
            let listener = virtual_inbound(layout, Mode::Permissive, &ports);
            let blackhole = &listener.filter_chains[0];
            assert_eq!(blackhole.name, BLACKHOLE_CHAIN);
            let matched = blackhole.filter_chain_match.clone().expect("match");
            assert_eq!(
                matched.destination_port.map(|p| p.value),
                Some(INBOUND_CAPTURE_PORT)
            );
            assert_eq!(upstream_cluster(blackhole), BLACKHOLE_CLUSTER);
            let mut names: Vec<String> = listener
                .filter_chains
                .iter()
                .filter(|c| c.name.starts_with("0.0.0.0_"))
                .map(|c| c.name.clone())
                .collect();
            names.dedup();
            names
        };
        assert_eq!(
            order(Layout::Istio111),
            ["0.0.0.0_15021", "0.0.0.0_80", "0.0.0.0_9080"]
        );
        assert_eq!(
            order(Layout::Current),
            ["0.0.0.0_80", "0.0.0.0_9080", "0.0.0.0_15021"]
        );
    }

    #[test]
    fn tls_contexts_are_istiods() {
        for layout in LAYOUTS {
            let listener = virtual_inbound(
                layout,
                Mode::Permissive,
                &[port(80, PortProtocol::Http, Mode::Permissive)],
            );
            let contexts: Vec<DownstreamTlsContext> =
                listener.filter_chains.iter().filter_map(tls).collect();
            // Two mTLS chains per passthrough set, one on the HTTP port.
            assert_eq!(contexts.len(), 2 * layout.passthrough_sets().len() + 1);
            for context in contexts {
                assert_eq!(
                    context.require_client_certificate.map(|b| b.value),
                    Some(true)
                );
                let common = context.common_tls_context.expect("common");
                let params = common.tls_params.expect("tls_params");
                assert_eq!(
                    params.tls_minimum_protocol_version,
                    TlsProtocol::TlSv12 as i32
                );
                let max = if layout == Layout::Current {
                    TlsProtocol::TlSv13
                } else {
                    TlsProtocol::TlsAuto
                };
                assert_eq!(params.tls_maximum_protocol_version, max as i32);
                assert_eq!(params.cipher_suites.len(), 6);
                let secrets = &common.tls_certificate_sds_secret_configs;
                assert_eq!(secrets.len(), 1);
                assert_eq!(secrets[0].name, "default");
                assert_eq!(sds_cluster(&secrets[0]), "sds-grpc");
                let Some(ValidationContextType::CombinedValidationContext(combined)) =
                    common.validation_context_type
                else {
                    panic!("no combined validation context");
                };
                let root = combined
                    .validation_context_sds_secret_config
                    .expect("ROOTCA");
                assert_eq!(root.name, "ROOTCA");
                assert_eq!(sds_cluster(&root), "sds-grpc");
                #[allow(deprecated)]
                let sans = combined
                    .default_validation_context
                    .expect("default")
                    .match_subject_alt_names;
                assert_eq!(sans.len(), 1);
                assert_eq!(
                    sans[0].match_pattern,
                    Some(MatchPattern::Prefix(SPIFFE_PREFIX.into()))
                );
            }
        }
    }

    fn sds_cluster(
        secret: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig,
    ) -> String {
        let source = secret.sds_config.clone().expect("sds_config");
        let Some(ConfigSourceSpecifier::ApiConfigSource(api)) = source.config_source_specifier
        else {
            panic!("SDS without api_config_source");
        };
        assert!(api.set_node_on_first_message_only);
        let Some(TargetSpecifier::EnvoyGrpc(grpc)) = api.grpc_services[0].target_specifier.clone()
        else {
            panic!("SDS without envoy_grpc");
        };
        grpc.cluster_name
    }

    #[test]
    fn current_layout_matches_the_istio_1_19_dump() {
        let text = crate::dump::tests::fixture("istio-1.19-permissive-istio-authz-testdata.json");
        let dumped = crate::dump::listeners_from_json(&text).expect("1.19 dump");
        let dump = Listener::decode(dumped[0].bytes.as_ref()).expect("listener");
        let built = virtual_inbound(
            Layout::Current,
            Mode::Permissive,
            &[port(80, PortProtocol::Http, Mode::Permissive)],
        );

        // Listener filters, with their per-port predicates, are identical.
        assert_eq!(built.listener_filters, dump.listener_filters);
        assert_eq!(built.traffic_direction, dump.traffic_direction);
        assert_eq!(
            built.listener_filters_timeout,
            dump.listener_filters_timeout
        );
        assert_eq!(
            built.continue_on_listener_filters_timeout,
            dump.continue_on_listener_filters_timeout
        );
        assert_eq!(built.address, dump.address);

        // Same chains in the same order; 1.19 still put prefix ranges on the passthrough.
        assert_eq!(built.filter_chains.len(), dump.filter_chains.len());
        for (ours, theirs) in built.filter_chains.iter().zip(&dump.filter_chains) {
            assert_eq!(ours.name, theirs.name);
            let mut theirs_match = theirs.filter_chain_match.clone().expect("match");
            if theirs_match.destination_port.is_none() {
                assert_eq!(theirs_match.prefix_ranges[0].address_prefix, "0.0.0.0");
                theirs_match.prefix_ranges.clear();
            }
            assert_eq!(
                ours.filter_chain_match.as_ref(),
                Some(&theirs_match),
                "{}",
                ours.name
            );
            assert_eq!(tls(ours), tls(theirs), "{}", ours.name);
        }
    }

    #[test]
    fn inspectors_are_disabled_where_no_chain_needs_them() {
        let filter = |listener: &Listener, name: &str| {
            listener
                .listener_filters
                .iter()
                .find(|f| f.name == name)
                .cloned()
        };
        let ranges = |predicate: &ListenerFilterChainMatchPredicate| -> Vec<i32> {
            match &predicate.rule {
                Some(Rule::DestinationPortRange(r)) => vec![r.start],
                Some(Rule::OrMatch(set)) => set.rules.iter().flat_map(ranges_of).collect(),
                other => panic!("unexpected rule {other:?}"),
            }
        };
        fn ranges_of(predicate: &ListenerFilterChainMatchPredicate) -> Vec<i32> {
            match &predicate.rule {
                Some(Rule::DestinationPortRange(r)) => {
                    assert_eq!(r.end, r.start + 1);
                    vec![r.start]
                }
                other => panic!("unexpected rule {other:?}"),
            }
        }

        // PERMISSIVE workload: TLS inspected everywhere but the DISABLE port and 15006.
        let ports = [
            port(8080, PortProtocol::Auto, Mode::Permissive),
            port(9090, PortProtocol::Tcp, Mode::Disable),
        ];
        let listener = virtual_inbound(Layout::Current, Mode::Permissive, &ports);
        let names: Vec<&str> = listener
            .listener_filters
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "envoy.filters.listener.original_dst",
                "envoy.filters.listener.tls_inspector",
                "envoy.filters.listener.http_inspector"
            ]
        );
        let tls_off = filter(&listener, "envoy.filters.listener.tls_inspector").expect("tls");
        assert_eq!(
            ranges(&tls_off.filter_disabled.expect("predicate")),
            [9090, 15006]
        );
        let http_off = filter(&listener, "envoy.filters.listener.http_inspector").expect("http");
        assert_eq!(
            ranges(&http_off.filter_disabled.expect("predicate")),
            [9090, 15006]
        );

        // STRICT workload: the passthrough needs no HTTP sniffing, so only the port that does.
        let listener = virtual_inbound(Layout::Current, Mode::Strict, &ports);
        let http_on = filter(&listener, "envoy.filters.listener.http_inspector").expect("http");
        let Some(Rule::NotMatch(inner)) = http_on.filter_disabled.expect("predicate").rule else {
            panic!("expected not_match");
        };
        assert_eq!(ranges(&inner), [8080]);

        // Nothing speaks TLS: no TLS inspector at all.
        let listener = virtual_inbound(Layout::Current, Mode::Disable, &ports[1..]);
        assert!(filter(&listener, "envoy.filters.listener.tls_inspector").is_none());
        let typed = |f: ListenerFilter| {
            matches!(
                f.config_type,
                Some(listener_filter::ConfigType::TypedConfig(_))
            )
        };
        assert!(listener.listener_filters.into_iter().all(typed));
    }

    #[test]
    fn benchmark_listeners_grow_with_their_ports() {
        let mut last_size = 0;
        for count in [10, 100, 500] {
            let ports = benchmark_ports(count);
            let mut numbers: Vec<u32> = ports.iter().map(|p| p.port).collect();
            numbers.sort_unstable();
            numbers.dedup();
            assert_eq!(numbers.len(), count);
            assert!(ports.iter().all(|p| p.mode == Mode::Permissive));
            for protocol in PROTOCOLS {
                assert!(
                    ports.iter().any(|p| p.protocol == protocol),
                    "{protocol:?} missing"
                );
            }
            let listener = virtual_inbound(Layout::Current, Mode::Permissive, &ports);
            let per_port: usize = ports
                .iter()
                .map(|p| chain_options(Layout::Current, p.mode, p.protocol).len())
                .sum();
            assert_eq!(listener.filter_chains.len(), 1 + 5 + per_port);
            let size = listener.encoded_len();
            assert!(size > last_size);
            last_size = size;
        }
    }

    const STOCK_TYPES: &[&str] = &[
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    ];

    fn loadable_spec(ports: &[InboundPort], layout: Layout) -> LoadableSpec<'_> {
        LoadableSpec {
            layout,
            workload_mode: Mode::Permissive,
            ip: Ipv4Addr::LOCALHOST,
            ports,
            passthrough_port: 40000,
            blackhole_port: 40001,
            cert_pem: "CERT",
            key_pem: "KEY",
            ca_pem: "CA",
            cluster: "backend",
            backend_port: 40002,
        }
    }

    #[test]
    fn the_loadable_flavour_keeps_the_chain_structure() {
        let ports = [
            port(41000, PortProtocol::Http, Mode::Permissive),
            port(41001, PortProtocol::Tcp, Mode::Strict),
            port(41002, PortProtocol::Auto, Mode::Permissive),
        ];
        for layout in LAYOUTS {
            let spec = loadable_spec(&ports, layout);
            let LoadableInbound { listener, cluster } = loadable_inbound(&spec);
            let istio = virtual_inbound(layout, Mode::Permissive, &ports);

            // Same chains and matches, the blackhole moved to a port nothing binds.
            assert_eq!(listener.filter_chains.len(), istio.filter_chains.len());
            for (ours, theirs) in listener.filter_chains.iter().zip(&istio.filter_chains) {
                assert_eq!(ours.name, theirs.name);
                let mut expected = theirs.filter_chain_match.clone().expect("match");
                if ours.name == BLACKHOLE_CHAIN {
                    expected.destination_port = Some(UInt32Value { value: 40001 });
                }
                assert_eq!(ours.filter_chain_match, Some(expected));
                assert_eq!(describe(ours), describe(theirs));
                for url in type_urls(ours) {
                    let name = url.trim_start_matches("type.googleapis.com/");
                    assert!(
                        STOCK_TYPES.contains(&name),
                        "{name} is not a stock Envoy filter"
                    );
                }
                if ours.name != BLACKHOLE_CHAIN {
                    assert_eq!(upstream_cluster(ours), "backend");
                }
            }

            // Loopback addresses instead of original_dst.
            assert_eq!(
                listener.address,
                Some(socket_address(Ipv4Addr::LOCALHOST, 40000))
            );
            let additional: Vec<Option<Address>> = listener
                .additional_addresses
                .iter()
                .map(|a| a.address.clone())
                .collect();
            let expected: Vec<Option<Address>> = ports
                .iter()
                .map(|p| Some(socket_address(Ipv4Addr::LOCALHOST, p.port)))
                .collect();
            assert_eq!(additional, expected);
            assert_eq!(listener.traffic_direction, TrafficDirection::Inbound as i32);
            let names: Vec<&str> = listener
                .listener_filters
                .iter()
                .map(|f| f.name.as_str())
                .collect();
            assert_eq!(
                names,
                [
                    "envoy.filters.listener.tls_inspector",
                    "envoy.filters.listener.http_inspector"
                ]
            );

            // Inline certificates, the CA and the SPIFFE URI SAN requirement.
            for context in listener.filter_chains.iter().filter_map(tls) {
                assert_eq!(
                    context.require_client_certificate.map(|b| b.value),
                    Some(true)
                );
                let common = context.common_tls_context.expect("common");
                assert!(common.tls_certificate_sds_secret_configs.is_empty());
                let certificate = &common.tls_certificates[0];
                let inline = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| {
                    match d.clone().and_then(|d| d.specifier) {
                        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => s,
                        other => panic!("expected an inline string, found {other:?}"),
                    }
                };
                assert_eq!(inline(&certificate.certificate_chain), "CERT");
                assert_eq!(inline(&certificate.private_key), "KEY");
                let Some(ValidationContextType::ValidationContext(validation)) =
                    common.validation_context_type
                else {
                    panic!("no validation context");
                };
                assert_eq!(inline(&validation.trusted_ca), "CA");
                let san = &validation.match_typed_subject_alt_names[0];
                assert_eq!(san.san_type, envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType::Uri as i32);
                assert_eq!(
                    san.matcher.clone().and_then(|m| m.match_pattern),
                    Some(MatchPattern::Prefix(SPIFFE_PREFIX.into()))
                );
            }

            // The backend cluster.
            assert_eq!(cluster.name, "backend");
            let endpoint =
                cluster.load_assignment.expect("endpoints").endpoints[0].lb_endpoints[0].clone();
            let Some(
                envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint,
                ),
            ) = endpoint.host_identifier
            else {
                panic!("no endpoint");
            };
            assert_eq!(
                endpoint.address,
                Some(socket_address(Ipv4Addr::LOCALHOST, 40002))
            );
        }
    }

    #[test]
    fn loadable_http_chains_name_themselves_in_a_response_header() {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
        let ports = [port(41000, PortProtocol::Http, Mode::Permissive)];
        let spec = loadable_spec(&ports, Layout::Current);
        let listener = loadable_inbound(&spec).listener;
        let mut tags = Vec::new();
        for chain in &listener.filter_chains {
            for filter in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
                    continue;
                };
                if any.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("HCM");
                let Some(RouteSpecifier::RouteConfig(routes)) = hcm.route_specifier else {
                    panic!()
                };
                let header = routes.virtual_hosts[0].response_headers_to_add[0]
                    .header
                    .clone()
                    .expect("header");
                assert_eq!(header.key, CHAIN_HEADER);
                tags.push(header.value);
            }
        }
        assert_eq!(
            tags,
            [
                "virtualInbound-catchall-http tls",
                "virtualInbound-catchall-http raw_buffer",
                "0.0.0.0_41000 tls",
                "0.0.0.0_41000 raw_buffer",
            ]
        );
    }

    #[test]
    fn builds_are_deterministic() {
        let ports = benchmark_ports(50);
        let a = virtual_inbound(Layout::Istio111, Mode::Permissive, &ports).encode_to_vec();
        let b = virtual_inbound(Layout::Istio111, Mode::Permissive, &ports).encode_to_vec();
        assert_eq!(a, b);
    }
}
