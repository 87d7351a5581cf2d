//! Tests of the listener rewrite on Istio-shaped listeners built with envoy-types.
//!
//! Expected bytes are assembled independently of the rewrite: each chain is encoded with prost,
//! its match followed by the expected new `application_protocols` entries, and the pieces are
//! framed with prost's own varint helpers. The builders record, from Istio's tables, what each
//! chain is for, and that record (not the code under test) decides which chains should change.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, SocketAddress, TrafficDirection, TransportSocket, address, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use envoy_types::pb::xds::r#type::matcher::v3::Matcher;
use prost::encoding::{WireType as ProstWire, encode_key, encode_varint};
use prost::{Message, Name};

use super::*;

const ALL_ISTIO: &[&str] = &[
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];
const MTLS_HTTP: &[&str] = &["istio-http/1.0", "istio-http/1.1", "istio-h2"];
const MTLS_TCP_MXC: &[&str] = &["istio-peer-exchange", "istio"];
const PLAINTEXT_HTTP: &[&str] = &["http/1.1", "h2c"];

// ---------------------------------------------------------------------------------------------
// Builders

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn port(value: u32) -> UInt32Value {
    UInt32Value { value }
}

fn cidr(address: &str, length: u32) -> CidrRange {
    CidrRange {
        address_prefix: address.to_string(),
        prefix_len: Some(port(length)),
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// The values of a report's set, as a list to compare with [`strings`].
fn listed(set: AlpnSet) -> Vec<String> {
    set.iter().map(str::to_string).collect()
}

fn fcm(dest: Option<u32>, transport: &str, alpns: &[&str]) -> FilterChainMatch {
    FilterChainMatch {
        destination_port: dest.map(port),
        transport_protocol: transport.to_string(),
        application_protocols: strings(alpns),
        ..Default::default()
    }
}

fn tls_socket(alpns: &[&str]) -> TransportSocket {
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: strings(alpns),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&context))),
    }
}

fn hcm(stat_prefix: &str) -> Filter {
    let config = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: 0,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&config))),
    }
}

fn tcp_proxy(cluster: &str) -> Filter {
    let config = TcpProxy {
        stat_prefix: cluster.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&config))),
    }
}

fn listener_filter(name: &str, type_url: &str) -> ListenerFilter {
    ListenerFilter {
        name: name.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(Any {
            type_url: type_url.to_string(),
            value: Vec::new(),
        })),
        ..Default::default()
    }
}

/// What a chain is for, according to Istio's tables (istio-internals.md §1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    MtlsHttp(ChainKind),
    MtlsTcp,
    OtherTls,
    AppTls,
    Plaintext,
}

impl Role {
    fn class(self) -> ChainClass {
        match self {
            Role::MtlsHttp(kind) => ChainClass::MtlsHttp(kind),
            Role::MtlsTcp => ChainClass::MtlsTcp,
            Role::OtherTls => ChainClass::OtherTls,
            Role::AppTls => ChainClass::TlsPassthrough,
            Role::Plaintext => ChainClass::Plaintext,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http,
    Tcp,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Permissive,
    Strict,
    Disable,
}

/// A listener under construction, with the role of each chain.
#[derive(Clone, Default)]
struct Built {
    chains: Vec<(FilterChain, Role)>,
}

impl Built {
    fn push(
        &mut self,
        name: &str,
        fcm: FilterChainMatch,
        tls: Option<&[&str]>,
        http: bool,
        role: Role,
    ) {
        let filter = if http { hcm(name) } else { tcp_proxy(name) };
        let chain = FilterChain {
            name: name.to_string(),
            filter_chain_match: Some(fcm),
            filters: vec![filter],
            transport_socket: tls.map(tls_socket),
            ..Default::default()
        };
        self.chains.push((chain, role));
    }

    /// The chains istiod builds for one port (or, with `dest` None, the passthrough set).
    fn port(
        &mut self,
        dest: Option<u32>,
        prefix: Option<CidrRange>,
        protocol: Protocol,
        mode: Mode,
    ) {
        let (http_name, tcp_name) = match dest {
            Some(p) => (format!("0.0.0.0_{p}"), format!("0.0.0.0_{p}")),
            None => (
                "virtualInbound-catchall-http".to_string(),
                "virtualInbound".to_string(),
            ),
        };
        let m = |transport: &str, alpns: &[&str]| FilterChainMatch {
            prefix_ranges: prefix.clone().into_iter().collect(),
            ..fcm(dest, transport, alpns)
        };
        let http_tls: &[&str] = &["h2", "http/1.1"];
        let tcp_tls: &[&str] = &["istio-peer-exchange", "h2", "http/1.1"];
        let sniffed = if dest.is_some() {
            ChainKind::Sniffed
        } else {
            ChainKind::Passthrough
        };
        let (h, t) = (http_name.as_str(), tcp_name.as_str());
        match (mode, protocol) {
            (Mode::Permissive, Protocol::Http) => {
                let role = Role::MtlsHttp(ChainKind::DeclaredHttp);
                self.push(h, m("tls", ALL_ISTIO), Some(http_tls), true, role);
                self.push(h, m("raw_buffer", &[]), None, true, Role::Plaintext);
            }
            (Mode::Permissive, Protocol::Tcp) => {
                self.push(t, m("tls", ALL_ISTIO), Some(tcp_tls), false, Role::MtlsTcp);
                self.push(t, m("tls", &[]), None, false, Role::AppTls);
                self.push(t, m("raw_buffer", &[]), None, false, Role::Plaintext);
            }
            (Mode::Permissive, Protocol::Auto) => {
                let role = Role::MtlsHttp(sniffed);
                self.push(h, m("tls", MTLS_HTTP), Some(http_tls), true, role);
                self.push(
                    h,
                    m("raw_buffer", PLAINTEXT_HTTP),
                    None,
                    true,
                    Role::Plaintext,
                );
                self.push(
                    t,
                    m("tls", MTLS_TCP_MXC),
                    Some(tcp_tls),
                    false,
                    Role::MtlsTcp,
                );
                self.push(t, m("raw_buffer", &[]), None, false, Role::Plaintext);
                self.push(t, m("tls", &[]), None, false, Role::AppTls);
            }
            (Mode::Strict, Protocol::Http) => {
                self.push(h, m("tls", &[]), Some(http_tls), true, Role::OtherTls);
            }
            (Mode::Strict, Protocol::Tcp) => {
                self.push(t, m("tls", &[]), Some(tcp_tls), false, Role::OtherTls);
            }
            (Mode::Strict, Protocol::Auto) => {
                let role = Role::MtlsHttp(sniffed);
                self.push(h, m("tls", MTLS_HTTP), Some(http_tls), true, role);
                self.push(t, m("tls", &[]), Some(tcp_tls), false, Role::OtherTls);
            }
            (Mode::Disable, Protocol::Http) => {
                self.push(h, m("raw_buffer", &[]), None, true, Role::Plaintext);
            }
            (Mode::Disable, Protocol::Tcp) => {
                self.push(t, m("raw_buffer", &[]), None, false, Role::Plaintext);
            }
            (Mode::Disable, Protocol::Auto) => {
                self.push(
                    h,
                    m("raw_buffer", PLAINTEXT_HTTP),
                    None,
                    true,
                    Role::Plaintext,
                );
                self.push(t, m("raw_buffer", &[]), None, false, Role::Plaintext);
            }
        }
    }

    fn blackhole(&mut self) {
        let m = fcm(Some(15006), "", &[]);
        self.push("virtualInbound-blackhole", m, None, false, Role::Plaintext);
    }

    fn listener(&self) -> Listener {
        Listener {
            name: "virtualInbound".to_string(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(15006)),
                    ..Default::default()
                })),
            }),
            filter_chains: self.chains.iter().map(|(chain, _)| chain.clone()).collect(),
            traffic_direction: TrafficDirection::Inbound as i32,
            listener_filters: vec![
                listener_filter(
                    "envoy.filters.listener.original_dst",
                    "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
                ),
                listener_filter(
                    "envoy.filters.listener.tls_inspector",
                    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
                ),
                listener_filter(
                    "envoy.filters.listener.http_inspector",
                    "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
                ),
            ],
            listener_filters_timeout: Some(Duration::default()),
            continue_on_listener_filters_timeout: true,
            ..Default::default()
        }
    }

    fn roles(&self) -> Vec<Role> {
        self.chains.iter().map(|(_, role)| *role).collect()
    }
}

type PortSpec = (u32, Protocol, Mode);

/// Ports of every protocol in every mode, side by side.
const MIXED_PORTS: &[PortSpec] = &[
    (5050, Protocol::Http, Mode::Disable),
    (6060, Protocol::Auto, Mode::Disable),
    (7070, Protocol::Http, Mode::Strict),
    (7071, Protocol::Auto, Mode::Strict),
    (7072, Protocol::Tcp, Mode::Strict),
    (8080, Protocol::Http, Mode::Permissive),
    (9000, Protocol::Tcp, Mode::Permissive),
    (9090, Protocol::Auto, Mode::Permissive),
];

/// Istio 1.23+ layout: blackhole, one passthrough set without prefix ranges, ports by number.
fn current_layout(ports: &[PortSpec], passthrough: Mode) -> Built {
    let mut built = Built::default();
    built.blackhole();
    built.port(None, None, Protocol::Auto, passthrough);
    let mut ports = ports.to_vec();
    ports.sort_by_key(|(p, _, _)| *p);
    for (p, protocol, mode) in ports {
        built.port(Some(p), None, protocol, mode);
    }
    built
}

/// Istio 1.11 layout: blackhole, passthrough sets per IP family with prefix ranges, ports by
/// chain name.
fn istio_1_11_layout(ports: &[PortSpec], passthrough: Mode) -> Built {
    let mut built = Built::default();
    built.blackhole();
    built.port(None, Some(cidr("0.0.0.0", 0)), Protocol::Auto, passthrough);
    built.port(None, Some(cidr("::0", 0)), Protocol::Auto, passthrough);
    let mut ports = ports.to_vec();
    ports.sort_by_key(|(p, _, _)| format!("0.0.0.0_{p}"));
    for (p, protocol, mode) in ports {
        built.port(Some(p), None, protocol, mode);
    }
    built
}

/// The plan a PERMISSIVE-with-annotation workload gets: add everywhere except on ports whose
/// mode is not PERMISSIVE.
fn plan_for(ports: &[PortSpec], passthrough: Mode) -> RewritePlan {
    RewritePlan {
        default: passthrough == Mode::Permissive,
        ports: ports
            .iter()
            .map(|(p, _, mode)| (*p, *mode == Mode::Permissive))
            .collect(),
    }
}

/// The values each chain should gain: all standard ALPNs it lacks, for mTLS HTTP chains whose
/// port the plan selects.
fn expected_additions(built: &Built, plan: &RewritePlan) -> Vec<Vec<&'static str>> {
    built
        .chains
        .iter()
        .map(|(chain, role)| {
            let fcm = chain.filter_chain_match.as_ref();
            let dest = fcm
                .and_then(|m| m.destination_port.as_ref())
                .map(|p| p.value);
            let present = fcm
                .map(|m| m.application_protocols.clone())
                .unwrap_or_default();
            match role {
                Role::MtlsHttp(_) if plan.adds(dest) => STANDARD_ALPNS
                    .into_iter()
                    .filter(|v| !present.iter().any(|p| p == v))
                    .collect(),
                _ => Vec::new(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Independent assembly of listener bytes

/// Unknown fields appended at each level of the assembled listener.
#[derive(Clone, Default)]
struct Unknown {
    listener: Vec<u8>,
    chain: Vec<u8>,
    fcm: Vec<u8>,
}

fn len_field(number: u32, payload: &[u8], out: &mut Vec<u8>) {
    encode_key(number, ProstWire::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Fields unknown to envoy-types: 999 (bytes) and, in the listener, also 1000 (varint) and a
/// fixed32 field 998.
fn unknown_fields(level: &str) -> Vec<u8> {
    let mut out = Vec::new();
    len_field(
        999,
        format!("{level}-from-a-newer-istiod").as_bytes(),
        &mut out,
    );
    encode_key(998, ProstWire::ThirtyTwoBit, &mut out);
    out.extend_from_slice(&[1, 2, 3, 4]);
    if level == "listener" {
        encode_key(1000, ProstWire::Varint, &mut out);
        encode_varint(300, &mut out);
    }
    out
}

fn all_unknown() -> Unknown {
    Unknown {
        listener: unknown_fields("listener"),
        chain: unknown_fields("chain"),
        fcm: unknown_fields("match"),
    }
}

/// Encodes `listener` with chains framed by hand: each match is followed by `unknown.fcm` and
/// then by the values in `additions` for that chain, as the rewrite appends them.
fn assemble(listener: &Listener, additions: &[Vec<&str>], unknown: &Unknown) -> Vec<u8> {
    let mut head = listener.clone();
    head.filter_chains.clear();
    let mut out = head.encode_to_vec();
    for (index, chain) in listener.filter_chains.iter().enumerate() {
        let mut rest = chain.clone();
        let mut payload = Vec::new();
        if let Some(fcm) = rest.filter_chain_match.take() {
            let mut m = fcm.encode_to_vec();
            m.extend_from_slice(&unknown.fcm);
            let added = FilterChainMatch {
                application_protocols: strings(additions.get(index).map_or(&[], |a| a)),
                ..Default::default()
            };
            m.extend(added.encode_to_vec());
            len_field(1, &m, &mut payload);
        }
        payload.extend(rest.encode_to_vec());
        payload.extend_from_slice(&unknown.chain);
        len_field(3, &payload, &mut out);
    }
    out.extend_from_slice(&unknown.listener);
    out
}

/// Compares byte strings, reporting the first difference rather than both strings.
fn assert_bytes_eq(actual: &[u8], expected: &[u8]) {
    if actual != expected {
        let at = actual.iter().zip(expected).position(|(a, e)| a != e);
        let at = at.unwrap_or(actual.len().min(expected.len()));
        let window = |bytes: &[u8]| bytes[at..bytes.len().min(at + 16)].to_vec();
        panic!(
            "bytes differ at offset {at} (lengths {} and {}): {:?} vs {:?}",
            actual.len(),
            expected.len(),
            window(actual),
            window(expected)
        );
    }
}

fn no_additions(listener: &Listener) -> Vec<Vec<&'static str>> {
    vec![Vec::new(); listener.filter_chains.len()]
}

/// Decodes the output, removes the expected additions from the end of each match (checking
/// they are there) and compares with the decoded input.
fn assert_same_apart_from(input: &[u8], output: &[u8], additions: &[Vec<&str>]) {
    let before = Listener::decode(input).expect("input decodes");
    let mut after = Listener::decode(output).expect("output decodes");
    for (chain, added) in after.filter_chains.iter_mut().zip(additions) {
        let Some(fcm) = chain.filter_chain_match.as_mut() else {
            assert!(added.is_empty());
            continue;
        };
        let keep = fcm.application_protocols.len() - added.len();
        assert_eq!(&fcm.application_protocols[keep..], &strings(added)[..]);
        fcm.application_protocols.truncate(keep);
    }
    assert_eq!(before, after);
}

fn rewrite(bytes: &[u8], plan: &RewritePlan) -> ListenerRewrite {
    rewrite_listener(bytes, plan).expect("rewrite succeeds")
}

fn everywhere() -> RewritePlan {
    RewritePlan {
        default: true,
        ports: BTreeMap::new(),
    }
}

/// Runs the rewrite on `built` and checks the output bytes, the decoded output and the report
/// against what Istio's tables say should change.
fn check_layout(built: &Built, plan: &RewritePlan, unknown: &Unknown) -> ListenerRewrite {
    let listener = built.listener();
    let input = assemble(&listener, &no_additions(&listener), unknown);
    let additions = expected_additions(built, plan);
    let result = rewrite(&input, plan);

    let expected = assemble(&listener, &additions, unknown);
    let changed = additions.iter().any(|a| !a.is_empty());
    match &result.output {
        Some(output) => {
            assert!(changed, "output produced although nothing should change");
            assert_bytes_eq(output, &expected);
            assert_same_apart_from(&input, output, &additions);
        }
        None => assert!(!changed, "no output although chains should change"),
    }

    // The report lists exactly the mTLS HTTP chains, each with the values expected.
    let reported: Vec<(usize, Vec<String>)> = result
        .chains
        .iter()
        .map(|c| (c.index, listed(c.added)))
        .collect();
    let wanted: Vec<(usize, Vec<String>)> = built
        .roles()
        .iter()
        .enumerate()
        .filter(|(_, role)| matches!(role, Role::MtlsHttp(_)))
        .map(|(index, _)| (index, strings(&additions[index])))
        .collect();
    assert_eq!(reported, wanted);
    for change in &result.chains {
        assert_eq!(built.roles()[change.index], Role::MtlsHttp(change.kind));
        assert!(change.collisions.is_empty(), "{change:?}");
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Layouts

#[test]
fn current_layout_changes_exactly_the_permissive_mtls_http_chains() {
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    let plan = plan_for(MIXED_PORTS, Mode::Permissive);
    let result = check_layout(&built, &plan, &Unknown::default());

    assert_eq!(result.name, "virtualInbound");
    assert_eq!(result.skipped, None);
    let changed: Vec<(Option<u32>, ChainKind)> = result
        .chains
        .iter()
        .filter(|c| !c.added.is_empty())
        .map(|c| (c.destination_port, c.kind))
        .collect();
    assert_eq!(
        changed,
        vec![
            (None, ChainKind::Passthrough),
            (Some(8080), ChainKind::DeclaredHttp),
            (Some(9090), ChainKind::Sniffed),
        ]
    );
    // The STRICT sniffed port is an mTLS HTTP chain too, but the plan leaves it alone.
    let strict = result
        .chains
        .iter()
        .find(|c| c.destination_port == Some(7071));
    let strict = strict.expect("STRICT sniffed chain reported");
    assert!(!strict.planned && strict.added.is_empty());
    assert!(result.chains.iter().all(|c| !c.may_capture_plaintext));
}

#[test]
fn istio_1_11_layout_changes_both_passthrough_families() {
    let built = istio_1_11_layout(MIXED_PORTS, Mode::Permissive);
    let plan = plan_for(MIXED_PORTS, Mode::Permissive);
    let result = check_layout(&built, &plan, &Unknown::default());
    let passthrough: Vec<usize> = result
        .chains
        .iter()
        .filter(|c| c.kind == ChainKind::Passthrough && c.added.len() == 3)
        .map(|c| c.index)
        .collect();
    assert_eq!(passthrough.len(), 2, "{result:#?}");
}

#[test]
fn strict_and_disable_passthrough_follow_the_plan() {
    for passthrough in [Mode::Strict, Mode::Disable] {
        let built = current_layout(MIXED_PORTS, passthrough);
        check_layout(
            &built,
            &plan_for(MIXED_PORTS, passthrough),
            &Unknown::default(),
        );
        let built = istio_1_11_layout(MIXED_PORTS, passthrough);
        check_layout(
            &built,
            &plan_for(MIXED_PORTS, passthrough),
            &Unknown::default(),
        );
    }
}

#[test]
fn plan_with_only_some_ports() {
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    let plan = RewritePlan {
        default: false,
        ports: BTreeMap::from([(9090, true), (8080, false)]),
    };
    let result = check_layout(&built, &plan, &Unknown::default());
    let changed: Vec<Option<u32>> = result
        .chains
        .iter()
        .filter(|c| !c.added.is_empty())
        .map(|c| c.destination_port)
        .collect();
    assert_eq!(changed, vec![Some(9090)]);
    let passthrough = &result.chains[0];
    assert_eq!(passthrough.kind, ChainKind::Passthrough);
    assert!(!passthrough.planned);
}

#[test]
fn noop_plan_returns_no_output_but_reports_every_chain() {
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    let plan = RewritePlan::default();
    assert!(plan.is_noop());
    let result = check_layout(&built, &plan, &Unknown::default());
    assert!(result.output.is_none());
    assert_eq!(result.chains.len(), 4);
    assert!(result.chains.iter().all(|c| !c.planned));
}

#[test]
fn listener_without_permissive_chains_is_not_copied() {
    let ports = [
        (8080, Protocol::Http, Mode::Strict),
        (9000, Protocol::Tcp, Mode::Permissive),
    ];
    let built = current_layout(&ports, Mode::Disable);
    let result = check_layout(&built, &everywhere(), &Unknown::default());
    assert!(result.output.is_none());
    assert!(result.chains.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Losslessness, determinism, idempotence

#[test]
fn unknown_fields_survive_byte_for_byte() {
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    let plan = plan_for(MIXED_PORTS, Mode::Permissive);
    let result = check_layout(&built, &plan, &all_unknown());
    let output = result.output.expect("changed");

    // Decoding with envoy-types loses them, which is why the rewrite must not re-encode.
    let reencoded = Listener::decode(output.as_ref()).unwrap().encode_to_vec();
    assert!(reencoded.len() < output.len());

    let marker = b"match-from-a-newer-istiod";
    let count = output.windows(marker.len()).filter(|w| w == marker).count();
    assert_eq!(count, built.chains.len());
}

#[test]
fn same_input_gives_same_bytes_and_a_second_rewrite_changes_nothing() {
    let built = istio_1_11_layout(MIXED_PORTS, Mode::Permissive);
    let listener = built.listener();
    let input = assemble(&listener, &no_additions(&listener), &all_unknown());
    let plan = plan_for(MIXED_PORTS, Mode::Permissive);

    let first = rewrite(&input, &plan);
    let second = rewrite(&input, &plan);
    assert_eq!(first, second);
    let output = first.output.expect("changed");

    let again = rewrite(&output, &plan);
    assert!(again.output.is_none());
    assert_eq!(again.chains.len(), first.chains.len());
    for (before, after) in first.chains.iter().zip(&again.chains) {
        assert!(after.added.is_empty() && after.collisions.is_empty());
        let mut present = listed(before.already_present);
        present.extend(listed(before.added));
        present.sort();
        let mut now = listed(after.already_present);
        now.sort();
        assert_eq!(now, present);
    }
}

#[test]
fn growing_length_prefixes_are_rewritten() {
    // A match just under 128 bytes and a chain just under 16384: both prefixes gain a byte.
    let inserted: usize = STANDARD_ALPNS.iter().map(|v| 2 + v.len()).sum();
    let declared = Role::MtlsHttp(ChainKind::DeclaredHttp);
    let with_name = |length: usize| FilterChainMatch {
        server_names: vec!["a".repeat(length)],
        ..fcm(Some(8443), "tls", ALL_ISTIO)
    };
    let length = (0..100)
        .find(|length| (128 - inserted..128).contains(&with_name(*length).encoded_len()))
        .expect("a server name that brings the match near 128 bytes");
    let built = (7_900..8_300)
        .map(|padding| {
            let mut built = Built::default();
            built.push(
                &"p".repeat(padding),
                with_name(length),
                Some(&["h2"]),
                true,
                declared,
            );
            built
        })
        .find(|built| {
            let len = built.chains[0].0.encoded_len();
            (16_384 - inserted - 1..16_384).contains(&len)
        })
        .expect("a padding that brings the chain near 16384 bytes");

    let result = check_layout(&built, &everywhere(), &Unknown::default());
    let output = result.output.unwrap();
    assert_eq!(output.len(), built.listener().encoded_len() + inserted + 2);
}

// ---------------------------------------------------------------------------------------------
// Collisions

/// A chain on `dest` with transport `tls`, a TLS socket and the given ALPNs and filter.
fn tls_chain(name: &str, m: FilterChainMatch, http: bool, role: Role) -> Built {
    let mut built = Built::default();
    built.push(name, m, Some(&["h2", "http/1.1"]), http, role);
    built
}

fn join(parts: &[Built]) -> Built {
    Built {
        chains: parts.iter().flat_map(|b| b.chains.clone()).collect(),
    }
}

#[test]
fn a_value_another_chain_claims_on_the_same_match_is_not_added() {
    let declared = Role::MtlsHttp(ChainKind::DeclaredHttp);
    let built = join(&[
        tls_chain("mtls", fcm(Some(8443), "tls", ALL_ISTIO), true, declared),
        tls_chain(
            "app-h2",
            fcm(Some(8443), "tls", &["h2"]),
            false,
            Role::OtherTls,
        ),
    ]);
    let listener = built.listener();
    let input = assemble(&listener, &no_additions(&listener), &Unknown::default());
    let result = rewrite(&input, &everywhere());

    let additions = vec![vec!["http/1.0", "http/1.1"], vec![]];
    let expected = assemble(&listener, &additions, &Unknown::default());
    assert_bytes_eq(result.output.as_deref().unwrap_or_default(), &expected);
    assert_same_apart_from(&input, result.output.as_ref().unwrap(), &additions);

    let change = &result.chains[0];
    assert_eq!(listed(change.added), strings(&["http/1.0", "http/1.1"]));
    assert_eq!(
        change.collisions,
        vec![Collision {
            alpn: "h2".to_string(),
            other_index: 1,
            other_name: "app-h2".to_string(),
        }]
    );
}

#[test]
fn chains_on_other_match_paths_do_not_collide() {
    let declared = Role::MtlsHttp(ChainKind::DeclaredHttp);
    let others = [
        fcm(Some(8444), "tls", &["h2"]),
        fcm(Some(8443), "", &["h2"]),
        fcm(Some(8443), "raw_buffer", &["h2"]),
        FilterChainMatch {
            server_names: strings(&["api.example.com"]),
            ..fcm(Some(8443), "tls", &["h2"])
        },
        FilterChainMatch {
            prefix_ranges: vec![cidr("192.0.2.10", 32)],
            ..fcm(Some(8443), "tls", &["h2"])
        },
        FilterChainMatch {
            source_ports: vec![443],
            ..fcm(Some(8443), "tls", &["h2"])
        },
    ];
    for other in others {
        let built = join(&[
            tls_chain("mtls", fcm(Some(8443), "tls", ALL_ISTIO), true, declared),
            tls_chain("other", other.clone(), false, Role::OtherTls),
        ]);
        let result = check_layout(&built, &everywhere(), &Unknown::default());
        assert_eq!(result.chains[0].added.len(), 3, "{other:?}");
    }
}

#[test]
fn the_earlier_of_two_overlapping_mtls_chains_wins() {
    let sniffed = Role::MtlsHttp(ChainKind::Sniffed);
    let built = join(&[
        tls_chain(
            "first",
            fcm(Some(9443), "tls", &["istio-http/1.1"]),
            true,
            sniffed,
        ),
        tls_chain(
            "second",
            fcm(Some(9443), "tls", &["istio-h2"]),
            true,
            sniffed,
        ),
    ]);
    let listener = built.listener();
    let input = assemble(&listener, &no_additions(&listener), &Unknown::default());
    let result = rewrite(&input, &everywhere());

    let additions = vec![STANDARD_ALPNS.to_vec(), vec![]];
    let expected = assemble(&listener, &additions, &Unknown::default());
    assert_bytes_eq(result.output.as_deref().unwrap_or_default(), &expected);
    let second = &result.chains[1];
    assert!(second.added.is_empty());
    let blocked: Vec<(&str, usize)> = second
        .collisions
        .iter()
        .map(|c| (c.alpn.as_str(), c.other_index))
        .collect();
    assert_eq!(blocked, vec![("http/1.0", 0), ("http/1.1", 0), ("h2", 0)]);

    // Rewriting the result again reports the same collisions and changes nothing.
    let again = rewrite(result.output.as_ref().unwrap(), &everywhere());
    assert!(again.output.is_none());
    assert_eq!(again.chains[1].collisions, second.collisions);
}

// ---------------------------------------------------------------------------------------------
// Listeners that are skipped

#[test]
fn outbound_and_unspecified_listeners_are_skipped() {
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    for direction in [TrafficDirection::Outbound, TrafficDirection::Unspecified] {
        let mut listener = built.listener();
        listener.traffic_direction = direction as i32;
        let result = rewrite(&listener.encode_to_vec(), &everywhere());
        assert_eq!(result.skipped, Some(SkipReason::NotInbound));
        assert!(result.output.is_none() && result.chains.is_empty());
        assert_eq!(result.name, "virtualInbound");
    }
}

#[test]
fn traffic_direction_is_read_as_protobuf_reads_an_enum() {
    // INBOUND (1) with junk above bit 32, and OUTBOUND (2) likewise: parsers keep the low 32
    // bits, so Envoy sees INBOUND and OUTBOUND. Found by tests/prop_rewrite.rs.
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    for (wide, skipped) in [
        (&[0x81, 0x80, 0x80, 0x80, 0x50], None),
        (
            &[0x82, 0x80, 0x80, 0x80, 0x50],
            Some(SkipReason::NotInbound),
        ),
    ] {
        let mut listener = built.listener();
        listener.traffic_direction = TrafficDirection::Unspecified as i32;
        let mut bytes = listener.encode_to_vec();
        // traffic_direction is field 16, varint: key 0x80 0x01.
        bytes.extend_from_slice(&[0x80, 0x01]);
        bytes.extend_from_slice(wide);
        let decoded = Listener::decode(&bytes[..]).expect("valid protobuf");
        assert_eq!(decoded.traffic_direction, wide[0] as i32 & 0x7f);
        let result = rewrite(&bytes, &everywhere());
        assert_eq!(result.skipped, skipped);
        assert_eq!(result.output.is_some(), skipped.is_none());
    }
}

#[test]
fn listeners_with_a_filter_chain_matcher_are_skipped() {
    let mut listener = current_layout(MIXED_PORTS, Mode::Permissive).listener();
    listener.filter_chain_matcher = Some(Matcher::default());
    let result = rewrite(&listener.encode_to_vec(), &everywhere());
    assert_eq!(result.skipped, Some(SkipReason::UsesFilterChainMatcher));
    assert!(result.output.is_none() && result.chains.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Recognition by structure

#[test]
fn chains_are_recognised_by_structure_not_by_name() {
    let mut built = Built::default();
    // Named like Istio's HTTP catch-all, but a TCP proxy: not touched.
    built.push(
        "virtualInbound-catchall-http",
        fcm(None, "tls", MTLS_HTTP),
        Some(&["h2"]),
        false,
        Role::MtlsTcp,
    );
    // Named like a TCP chain, but TLS + HCM + Istio HTTP ALPNs: rewritten.
    built.push(
        "virtualInbound",
        fcm(Some(3000), "tls", MTLS_HTTP),
        Some(&["h2"]),
        true,
        Role::MtlsHttp(ChainKind::Sniffed),
    );
    // HCM and TLS known only by their type URLs, under unusual names.
    let mut odd = built.chains[1].0.clone();
    odd.filter_chain_match = Some(fcm(Some(3001), "tls", &["istio"]));
    odd.filters[0].name = "my-http".to_string();
    odd.transport_socket.as_mut().unwrap().name = "custom-tls".to_string();
    built
        .chains
        .push((odd, Role::MtlsHttp(ChainKind::DeclaredHttp)));
    // Named HCM, but configured with another type: not an HCM.
    let mut impostor = built.chains[1].0.clone();
    impostor.filter_chain_match = Some(fcm(Some(3002), "tls", &["istio"]));
    impostor.filters[0] = Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        ..tcp_proxy("x")
    };
    built.chains.push((impostor, Role::MtlsTcp));
    // HCM and TLS, but only Istio's metadata-exchange ALPN: not an mTLS HTTP chain.
    let exchange = fcm(Some(3003), "tls", &["istio-peer-exchange"]);
    built.push("exchange", exchange, Some(&["h2"]), true, Role::OtherTls);

    // HCM wrapped in a TypedStruct (its type URL inside), under a custom type URL host.
    let mut wrapped = built.chains[1].0.clone();
    wrapped.filter_chain_match = Some(fcm(Some(3004), "tls", &["istio-h2"]));
    let mut typed_struct = Vec::new();
    let inner = format!("example.com/{}", HttpConnectionManager::full_name());
    len_field(1, inner.as_bytes(), &mut typed_struct);
    wrapped.filters[0].config_type = Some(filter::ConfigType::TypedConfig(Any {
        type_url: "type.googleapis.com/udpa.type.v1.TypedStruct".to_string(),
        value: typed_struct,
    }));
    built
        .chains
        .push((wrapped, Role::MtlsHttp(ChainKind::Sniffed)));
    // A type whose name only ends like the HCM's is another type.
    let mut lookalike = built.chains[1].0.clone();
    lookalike.filter_chain_match = Some(fcm(Some(3005), "tls", &["istio-h2"]));
    if let Some(filter::ConfigType::TypedConfig(any)) = &mut lookalike.filters[0].config_type {
        any.type_url = format!(
            "type.googleapis.com/my{}",
            HttpConnectionManager::full_name()
        );
    }
    built.chains.push((lookalike, Role::MtlsTcp));

    check_layout(&built, &everywhere(), &Unknown::default());
    let info = inspect_listener(&built.listener().encode_to_vec()).unwrap();
    let classes: Vec<ChainClass> = info.iter().map(|c| c.kind).collect();
    let roles: Vec<ChainClass> = built.roles().into_iter().map(Role::class).collect();
    assert_eq!(classes, roles);
}

#[test]
fn legacy_names_count_when_there_is_no_typed_config() {
    let mut built = Built::default();
    built.push(
        "legacy",
        fcm(Some(9080), "tls", &["istio"]),
        Some(&[]),
        true,
        Role::MtlsHttp(ChainKind::DeclaredHttp),
    );
    let chain = &mut built.chains[0].0;
    chain.filters[0] = Filter {
        name: "envoy.http_connection_manager".to_string(),
        config_type: None,
    };
    chain.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: None,
    });
    check_layout(&built, &everywhere(), &Unknown::default());
}

#[test]
fn inspect_classifies_every_chain() {
    let built = istio_1_11_layout(MIXED_PORTS, Mode::Permissive);
    let info = inspect_listener(&built.listener().encode_to_vec()).unwrap();
    assert_eq!(info.len(), built.chains.len());
    for ((chain, role), info) in built.chains.iter().zip(&info) {
        assert_eq!(info.kind, role.class(), "{}", chain.name);
        assert_eq!(info.name, chain.name);
        let fcm = chain.filter_chain_match.as_ref().unwrap();
        assert_eq!(info.destination_port, fcm.destination_port.map(|p| p.value));
        assert_eq!(info.transport_protocol, fcm.transport_protocol);
        assert_eq!(info.alpns, fcm.application_protocols);
        assert_eq!(info.has_tls, chain.transport_socket.is_some());
        assert_eq!(info.repeated_field, None);
    }
    let families: Vec<&str> = info
        .iter()
        .filter(|c| c.destination_port.is_none())
        .flat_map(|c| c.prefix_ranges.iter().map(String::as_str))
        .collect();
    assert!(families.contains(&"0.0.0.0/0") && families.contains(&"::/0"));
}

// ---------------------------------------------------------------------------------------------
// Shapes of the Istio 1.3 and 1.6 era (v2 field names converted to v3)

#[test]
fn istio_1_3_shape_with_alpn_istio_only() {
    let mut built = Built::default();
    let pod = || vec![cidr("192.0.2.10", 32)];
    for family in ["0.0.0.0", "::0"] {
        let m = FilterChainMatch {
            prefix_ranges: vec![cidr(family, 0)],
            ..Default::default()
        };
        built.push("", m, None, false, Role::Plaintext);
    }
    for family in ["0.0.0.0", "::0"] {
        let m = FilterChainMatch {
            prefix_ranges: vec![cidr(family, 0)],
            application_protocols: strings(&["http/1.1", "http/1.0"]),
            ..Default::default()
        };
        built.push("", m, None, true, Role::Plaintext);
    }
    let mtls = FilterChainMatch {
        prefix_ranges: pod(),
        ..fcm(Some(9080), "", &["istio"])
    };
    built.push(
        "",
        mtls,
        Some(&[]),
        true,
        Role::MtlsHttp(ChainKind::DeclaredHttp),
    );
    let plain = FilterChainMatch {
        prefix_ranges: pod(),
        ..fcm(Some(9080), "", &[])
    };
    built.push("", plain, None, true, Role::Plaintext);
    // 1.3 used the legacy filter name without a typed config.
    for (chain, _) in &mut built.chains {
        if chain.filters[0].name.contains("http_connection_manager") {
            chain.filters[0] = Filter {
                name: "envoy.http_connection_manager".to_string(),
                config_type: None,
            };
        }
    }

    let result = check_layout(&built, &everywhere(), &Unknown::default());
    let change = &result.chains[0];
    assert_eq!((change.index, change.kind), (4, ChainKind::DeclaredHttp));
    assert_eq!(listed(change.added), strings(&STANDARD_ALPNS));
    // No transport_protocol on the match: http/1.x sniffed on plaintext would now land here.
    assert!(change.may_capture_plaintext);
}

#[test]
fn istio_1_6_shape_with_standard_alpns_already_on_the_catch_all() {
    let mut built = Built::default();
    let any4 = || vec![cidr("0.0.0.0", 0)];
    let m = |transport: &str, alpns: &[&str], dest: Option<u32>, prefix: Vec<CidrRange>| {
        FilterChainMatch {
            prefix_ranges: prefix,
            ..fcm(dest, transport, alpns)
        }
    };
    let catch_all_mtls = m(
        "tls",
        &[
            "http/1.0",
            "http/1.1",
            "h2c",
            "istio-http/1.0",
            "istio-http/1.1",
            "istio-h2",
        ],
        None,
        any4(),
    );
    let catch_all_plain = m("", &["http/1.0", "http/1.1", "h2c"], None, any4());
    let tcp_mtls = m("tls", MTLS_TCP_MXC, None, any4());
    let pod = vec![cidr("192.0.2.10", 32)];
    let port_mtls = m(
        "",
        &["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"],
        Some(9080),
        pod.clone(),
    );
    let port_plain = m("", &[], Some(9080), pod);

    built.push(
        "virtualInbound",
        tcp_mtls,
        Some(&["istio-peer-exchange"]),
        false,
        Role::MtlsTcp,
    );
    built.push(
        "virtualInbound",
        m("", &[], None, any4()),
        None,
        false,
        Role::Plaintext,
    );
    let passthrough = Role::MtlsHttp(ChainKind::Passthrough);
    built.push(
        "virtualInbound-catchall-http",
        catch_all_mtls,
        Some(&[]),
        true,
        passthrough,
    );
    built.push(
        "virtualInbound-catchall-http",
        catch_all_plain,
        None,
        true,
        Role::Plaintext,
    );
    let declared = Role::MtlsHttp(ChainKind::DeclaredHttp);
    built.push("192.0.2.10_9080", port_mtls, Some(&[]), true, declared);
    built.push("192.0.2.10_9080", port_plain, None, true, Role::Plaintext);

    let result = check_layout(&built, &everywhere(), &Unknown::default());
    let catch_all = &result.chains[0];
    assert_eq!(listed(catch_all.added), strings(&["h2"]));
    assert_eq!(
        listed(catch_all.already_present),
        strings(&["http/1.0", "http/1.1"])
    );
    assert!(!catch_all.may_capture_plaintext);
    let port = &result.chains[1];
    assert_eq!(listed(port.added), strings(&STANDARD_ALPNS));
    assert!(port.may_capture_plaintext);
}

// ---------------------------------------------------------------------------------------------
// Malformed and odd input

/// A chain field holding a second `filter_chain_match` after the first.
fn with_second_match(chain: &FilterChain, second: &FilterChainMatch) -> Vec<u8> {
    let mut payload = chain.encode_to_vec();
    len_field(1, &second.encode_to_vec(), &mut payload);
    let mut out = Vec::new();
    len_field(3, &payload, &mut out);
    out
}

#[test]
fn a_chain_with_two_matches_is_reported_but_untouched() {
    let built = current_layout(&[(8080, Protocol::Http, Mode::Permissive)], Mode::Disable);
    let mut listener = built.listener();
    let plain = listener.filter_chains.pop().unwrap();
    let mtls = listener.filter_chains.pop().unwrap();
    let mut input = listener.encode_to_vec();
    input.extend(with_second_match(
        &mtls,
        &fcm(Some(8080), "tls", &["istio"]),
    ));
    len_field(3, &plain.encode_to_vec(), &mut input);

    let result = rewrite(&input, &everywhere());
    assert!(result.output.is_none());
    let change = result
        .chains
        .iter()
        .find(|c| c.index == 3)
        .expect("reported");
    assert_eq!(
        change.not_understood.as_deref(),
        Some("filter_chain_match appears more than once")
    );
    assert!(change.added.is_empty());

    let info = inspect_listener(&input).unwrap();
    assert_eq!(info[3].kind, ChainClass::NotUnderstood);
    assert_eq!(
        info[3].repeated_field.as_deref(),
        Some("filter_chain_match")
    );
}

#[test]
fn a_repeated_singular_field_inside_a_match_leaves_the_chain_alone() {
    let built = current_layout(&[(8080, Protocol::Http, Mode::Permissive)], Mode::Disable);
    let mut listener = built.listener();
    let mtls = listener.filter_chains.remove(3);
    let mut m = mtls.filter_chain_match.clone().unwrap().encode_to_vec();
    len_field(8, &port(8081).encode_to_vec(), &mut m);
    let mut rest = mtls.clone();
    rest.filter_chain_match = None;
    let mut payload = Vec::new();
    len_field(1, &m, &mut payload);
    payload.extend(rest.encode_to_vec());
    let mut input = listener.encode_to_vec();
    len_field(3, &payload, &mut input);

    let result = rewrite(&input, &everywhere());
    assert!(result.output.is_none());
    let change = result.chains.last().unwrap();
    // Protobuf's merge rule makes the later port the one Envoy sees.
    assert_eq!(change.destination_port, Some(8081));
    assert!(
        change
            .not_understood
            .as_deref()
            .unwrap()
            .contains("destination_port")
    );
}

#[test]
fn errors_name_the_listener_chain_and_field() {
    let built = current_layout(&[(8080, Protocol::Http, Mode::Permissive)], Mode::Disable);
    let listener = built.listener();

    // A varint where application_protocols (a string) belongs, in chain 3.
    let mut chains = listener.filter_chains.clone();
    let mut m = chains[3].filter_chain_match.take().unwrap().encode_to_vec();
    encode_key(10, ProstWire::Varint, &mut m);
    encode_varint(7, &mut m);
    let mut payload = Vec::new();
    len_field(1, &m, &mut payload);
    payload.extend(chains[3].encode_to_vec());
    let mut head = listener.clone();
    head.filter_chains.truncate(3);
    let mut input = head.encode_to_vec();
    len_field(3, &payload, &mut input);

    let error = rewrite_listener(&input, &everywhere()).unwrap_err();
    assert_eq!(
        error,
        RewriteError::Malformed {
            listener: Some("virtualInbound".to_string()),
            chain: Some(3),
            field: "filter_chain_match.application_protocols",
            problem: WireProblem::WrongWireType {
                expected: WireType::Len,
                found: WireType::Varint
            },
        }
    );
    let text = error.to_string();
    assert!(
        text.contains("\"virtualInbound\"") && text.contains("filter chain 3"),
        "{text}"
    );
    assert!(inspect_listener(&input).is_err());

    // Invalid UTF-8 in an ALPN value.
    let mut bad = listener.clone();
    bad.filter_chains[2]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .application_protocols = vec!["istio-h2".to_string()];
    let mut bytes = bad.encode_to_vec();
    let at = bytes.windows(8).position(|w| w == b"istio-h2").unwrap();
    bytes[at] = 0xff;
    match rewrite_listener(&bytes, &everywhere()) {
        Err(RewriteError::Malformed {
            chain: Some(2),
            problem: WireProblem::InvalidUtf8,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn the_rewrite_reads_filters_only_where_the_match_could_make_an_mtls_http_chain() {
    // A plaintext chain whose filter is garbage: only inspect, which reads every chain, sees it.
    let built = current_layout(&[(8080, Protocol::Http, Mode::Permissive)], Mode::Disable);
    let listener = built.listener();
    let mut input = listener.encode_to_vec();
    let mut payload = FilterChain {
        filter_chain_match: Some(fcm(Some(8081), "raw_buffer", &[])),
        ..Default::default()
    }
    .encode_to_vec();
    len_field(3, &[0x0a, 0x05, b'x'], &mut payload);
    len_field(3, &payload, &mut input);

    let result = rewrite(&input, &everywhere());
    assert_eq!(
        result.chains.iter().filter(|c| c.added.len() == 3).count(),
        1
    );
    match inspect_listener(&input) {
        Err(RewriteError::Malformed {
            chain: Some(5),
            field: "filters",
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn reports_serialise_without_the_bytes() {
    let built = current_layout(MIXED_PORTS, Mode::Permissive);
    let result = rewrite(&built.listener().encode_to_vec(), &everywhere());
    let json = serde_json::to_value(&result).unwrap();
    assert!(json.get("output").is_none());
    assert_eq!(json["name"], "virtualInbound");
    let chains = json["chains"].as_array().unwrap();
    let declared = chains
        .iter()
        .find(|c| c["destination_port"] == 8080)
        .unwrap();
    assert_eq!(declared["kind"], "DeclaredHttp");
    assert_eq!(
        declared["added"],
        serde_json::json!(["http/1.0", "http/1.1", "h2"])
    );
    let info = inspect_listener(&built.listener().encode_to_vec()).unwrap();
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json[1]["kind"]["MtlsHttp"], "Passthrough");
}

#[test]
fn a_truncated_chain_is_named() {
    let chains = current_layout(MIXED_PORTS, Mode::Permissive)
        .listener()
        .filter_chains;
    let listener = |count: usize| Listener {
        name: "virtualInbound".to_string(),
        filter_chains: chains[..count].to_vec(),
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    };
    let bytes = listener(chains.len()).encode_to_vec();
    let mut head = listener(2);
    head.traffic_direction = 0;
    let cut = head.encode_to_vec().len() + 10;
    match rewrite_listener(&bytes[..cut], &everywhere()) {
        Err(RewriteError::Malformed {
            listener: Some(name),
            chain: Some(2),
            problem: WireProblem::LengthPastEnd { .. },
            ..
        }) => assert_eq!(name, "virtualInbound"),
        other => panic!("unexpected {other:?}"),
    }
}

/// A small deterministic generator, so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs both entry points; when the rewrite succeeds with output, that output must be stable.
fn exercise(bytes: &[u8]) {
    let _ = inspect_listener(bytes);
    if let Ok(ListenerRewrite {
        output: Some(output),
        ..
    }) = rewrite_listener(bytes, &everywhere())
    {
        let again = rewrite_listener(&output, &everywhere()).expect("output parses");
        assert!(again.output.is_none(), "second rewrite changed the output");
    }
}

#[test]
fn truncated_and_corrupted_input_never_panics() {
    let listener = istio_1_11_layout(MIXED_PORTS, Mode::Permissive).listener();
    let bytes = assemble(&listener, &no_additions(&listener), &all_unknown());
    for cut in 0..bytes.len() {
        exercise(&bytes[..cut]);
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for position in 0..bytes.len() {
        let mut mutated = bytes.clone();
        mutated[position] = rng.next() as u8;
        exercise(&mutated);
    }
    for _ in 0..2_000 {
        let len = (rng.next() % 512) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        exercise(&garbage);
    }
    assert!(rewrite_listener(&[], &everywhere()).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Plan

#[test]
fn plan_ports_override_the_default() {
    let plan = RewritePlan {
        default: true,
        ports: BTreeMap::from([(80, false), (81, true)]),
    };
    assert!(!plan.adds(Some(80)));
    assert!(plan.adds(Some(81)));
    assert!(plan.adds(Some(82)));
    assert!(plan.adds(None));
    assert!(!plan.is_noop());

    let only_port = RewritePlan {
        default: false,
        ports: BTreeMap::from([(80, false), (81, true)]),
    };
    assert!(!only_port.adds(None) && only_port.adds(Some(81)));
    assert!(!only_port.is_noop());
    let nothing = RewritePlan {
        default: false,
        ports: BTreeMap::from([(80, false)]),
    };
    assert!(nothing.is_noop());
}
