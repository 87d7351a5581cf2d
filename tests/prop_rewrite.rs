//! Generated bad and odd input for the listener rewrite, with proptest.
//!
//! Three families of input: arbitrary bytes; Istio-like listeners built with envoy-types (random
//! chains, matches, sockets, filters, unknown fields at random places, and valid encodings that
//! prost never writes) with a random plan; and those listeners' bytes mutated (bits flipped,
//! bytes inserted, ranges deleted or copied, cut short).
//!
//! The oracle never asks the rewrite what a chain is. Whenever prost can read the input, the
//! skip decision, the chains that may gain values and Envoy's overlap rule (written out again
//! below) are judged on prost's decoding; for the built listeners, which chains are mTLS HTTP
//! also comes from the generator's own record of the sockets and filters it wrote. The
//! byte-for-byte checks use a schema-free reader of this file, not the rewrite's.
//!
//! Each property runs 512 cases, about a second in a debug build; `PROPTEST_CASES=20000 cargo
//! test --test prop_rewrite` searches longer. Inputs that once failed are kept twice: proptest's
//! seeds in `tests/prop_rewrite.proptest-regressions`, and each as a named test at the end of this
//! file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    Address, CidrRange, SocketAddress, TrafficDirection, TransportSocket, address, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::pb::xds::r#type::matcher::v3::Matcher;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::FileFailurePersistence;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost::{Message, Name};

use alpn_xds::rewrite::{
    ListenerRewrite, RewritePlan, STANDARD_ALPNS, SkipReason, inspect_listener, rewrite_listener,
};

// ---------------------------------------------------------------------------------------------
// Pools the generators draw from: small, so that chains often share a match path.

const ALPN_POOL: &[&str] = &[
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
    "http/1.0",
    "http/1.1",
    "h2",
    "h2c",
    "",
    "spdy/3",
];

/// Istio's own ALPN lists, as its chain tables write them.
const ISTIO_LISTS: &[&[&str]] = &[
    &[
        "istio",
        "istio-peer-exchange",
        "istio-http/1.0",
        "istio-http/1.1",
        "istio-h2",
    ],
    &["istio-http/1.0", "istio-http/1.1", "istio-h2"],
    &["istio-peer-exchange", "istio"],
    &["istio"],
    &["http/1.1", "h2c"],
    &[
        "http/1.0",
        "http/1.1",
        "h2c",
        "istio-http/1.0",
        "istio-http/1.1",
        "istio-h2",
    ],
];

/// The values that make a chain an mTLS HTTP chain, with a TLS socket and an HCM.
const ISTIO_HTTP: &[&str] = &["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"];

const PORTS: &[u32] = &[80, 8080, 9080, 15006, 0];

const CIDRS: &[(&str, Option<u32>)] = &[
    ("10.0.0.0", Some(8)),
    ("10.1.2.3", Some(8)),
    ("10.0.0.0", Some(16)),
    ("0.0.0.0", Some(0)),
    ("0.0.0.0", None),
    ("::", Some(0)),
    ("::0", Some(0)),
    ("2001:db8::1", Some(64)),
    ("192.168.1.7", Some(32)),
    ("127.0.0.1", Some(32)),
];

const SERVER_NAMES: &[&str] = &[
    "example.com",
    "EXAMPLE.com",
    "*.example.com",
    ".example.com",
    "a.example.com",
    "outbound_.8080_._.web.shop.svc.cluster.local",
    "",
];

/// Field numbers no Listener, FilterChain or FilterChainMatch defines.
const UNKNOWN_TAGS: &[u32] = &[100, 1000, 2047, 4095, 65_535, 536_870_911];

// ---------------------------------------------------------------------------------------------
// What the generator builds, and what it knows about it

/// A chain's transport socket, and whether Envoy would terminate TLS with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SocketKind {
    None,
    /// `envoy.transport_sockets.tls` with a `DownstreamTlsContext`.
    Tls,
    /// An unknown name with a `DownstreamTlsContext`: the type URL decides.
    TlsOddName,
    /// The legacy name `tls` without a typed config: the name decides.
    TlsByName,
    /// `raw_buffer` with its own type.
    RawBuffer,
    /// The TLS socket's name with a `RawBuffer` config: the type URL decides, no TLS.
    RawBufferNamedTls,
}

impl SocketKind {
    fn terminates_tls(self) -> bool {
        matches!(
            self,
            SocketKind::Tls | SocketKind::TlsOddName | SocketKind::TlsByName
        )
    }

    fn build(self) -> Option<TransportSocket> {
        let typed = |name: &str, config: Any| TransportSocket {
            name: name.to_string(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(config)),
        };
        let tls = || {
            typed_any(&DownstreamTlsContext {
                common_tls_context: Some(CommonTlsContext {
                    alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        Some(match self {
            SocketKind::None => return None,
            SocketKind::Tls => typed("envoy.transport_sockets.tls", tls()),
            SocketKind::TlsOddName => typed("istio.tls", tls()),
            SocketKind::TlsByName => TransportSocket {
                name: "tls".to_string(),
                config_type: None,
            },
            SocketKind::RawBuffer => typed(
                "envoy.transport_sockets.raw_buffer",
                typed_any(&RawBuffer {}),
            ),
            SocketKind::RawBufferNamedTls => {
                typed("envoy.transport_sockets.tls", typed_any(&RawBuffer {}))
            }
        })
    }
}

/// A network filter, and whether it is an HTTP connection manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterKind {
    Hcm,
    /// An unknown name with an HCM config: the type URL decides.
    HcmOddName,
    /// The legacy name without a typed config: the name decides.
    HcmByName,
    TcpProxy,
    /// The HCM's name with a TcpProxy config: the type URL decides, no HCM.
    TcpProxyNamedHcm,
    /// Istio's metadata exchange, with an empty config.
    MetadataExchange,
}

impl FilterKind {
    fn is_hcm(self) -> bool {
        matches!(
            self,
            FilterKind::Hcm | FilterKind::HcmOddName | FilterKind::HcmByName
        )
    }

    fn build(self) -> Filter {
        let typed = |name: &str, config: Any| Filter {
            name: name.to_string(),
            config_type: Some(filter::ConfigType::TypedConfig(config)),
        };
        let hcm = || {
            typed_any(&HttpConnectionManager {
                stat_prefix: "inbound_0.0.0.0_8080".to_string(),
                ..Default::default()
            })
        };
        let tcp = || {
            typed_any(&TcpProxy {
                stat_prefix: "InboundPassthroughCluster".to_string(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                    "InboundPassthroughCluster".to_string(),
                )),
                ..Default::default()
            })
        };
        match self {
            FilterKind::Hcm => typed("envoy.filters.network.http_connection_manager", hcm()),
            FilterKind::HcmOddName => typed("istio.hcm", hcm()),
            FilterKind::HcmByName => Filter {
                name: "envoy.http_connection_manager".to_string(),
                config_type: None,
            },
            FilterKind::TcpProxy => typed("envoy.filters.network.tcp_proxy", tcp()),
            FilterKind::TcpProxyNamedHcm => {
                typed("envoy.filters.network.http_connection_manager", tcp())
            }
            FilterKind::MetadataExchange => typed(
                "istio.metadata_exchange",
                Any {
                    type_url:
                        "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
                            .to_string(),
                    value: Vec::new(),
                },
            ),
        }
    }
}

/// A field that no schema involved defines, as raw wire bytes.
#[derive(Clone, Debug)]
enum UnknownField {
    Varint(u32, u64),
    Fixed32(u32, u32),
    Fixed64(u32, u64),
    Len(u32, Vec<u8>),
    /// A deprecated group holding one varint field.
    Group(u32, u64),
}

impl UnknownField {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            UnknownField::Varint(tag, value) => {
                encode_key(*tag, WireType::Varint, &mut out);
                encode_varint(*value, &mut out);
            }
            UnknownField::Fixed32(tag, value) => {
                encode_key(*tag, WireType::ThirtyTwoBit, &mut out);
                out.extend_from_slice(&value.to_le_bytes());
            }
            UnknownField::Fixed64(tag, value) => {
                encode_key(*tag, WireType::SixtyFourBit, &mut out);
                out.extend_from_slice(&value.to_le_bytes());
            }
            UnknownField::Len(tag, payload) => len_field(*tag, payload, &mut out),
            UnknownField::Group(tag, value) => {
                encode_key(*tag, WireType::StartGroup, &mut out);
                encode_key(1, WireType::Varint, &mut out);
                encode_varint(*value, &mut out);
                encode_key(*tag, WireType::EndGroup, &mut out);
            }
        }
        out
    }
}

/// One filter chain to build.
#[derive(Clone, Debug)]
struct ChainSpec {
    name: String,
    /// `None`: the chain has no `filter_chain_match` at all.
    matches: Option<FilterChainMatch>,
    /// A second `filter_chain_match` occurrence: protobuf merges it, the rewrite leaves the
    /// chain alone.
    second_match: Option<FilterChainMatch>,
    /// The chain's `name` written twice.
    name_twice: bool,
    socket: SocketKind,
    filters: Vec<FilterKind>,
    unknown: Vec<UnknownField>,
    match_unknown: Vec<UnknownField>,
}

impl ChainSpec {
    /// What the generator knows: a TLS socket, an HCM and an Istio HTTP ALPN (in the match as
    /// protobuf reads it).
    fn is_mtls_http(&self, decoded: &FilterChainMatch) -> bool {
        self.socket.terminates_tls()
            && self.filters.iter().any(|f| f.is_hcm())
            && decoded
                .application_protocols
                .iter()
                .any(|alpn| ISTIO_HTTP.contains(&alpn.as_str()))
    }

    /// A singular field appears twice: the chain is reported, never edited.
    fn is_ambiguous(&self) -> bool {
        // prost leaves an empty name out, so only a non-empty one ends up written twice.
        (self.name_twice && !self.name.is_empty())
            || (self.second_match.is_some() && self.matches.is_some())
    }

    fn encode(&self, seed: &mut Shuffle, quirks: Quirks) -> Vec<u8> {
        let base = FilterChain {
            name: self.name.clone(),
            filters: self.filters.iter().map(|f| f.build()).collect(),
            transport_socket: self.socket.build(),
            ..Default::default()
        };
        let mut chunks = split_fields(&base.encode_to_vec());
        if self.name_twice {
            let mut twice = Vec::new();
            len_field(7, b"second-name", &mut twice);
            chunks.push(twice);
        }
        chunks.extend(self.unknown.iter().map(UnknownField::encode));
        seed.shuffle(&mut chunks);

        // The match goes anywhere among the other fields; a second one anywhere after it.
        let mut fcms = Vec::new();
        for fcm in self.matches.iter().chain(&self.second_match) {
            let mut inner = split_fields(&fcm.encode_to_vec());
            if quirks.wide_enums {
                inner.retain(|chunk| !chunk.starts_with(SOURCE_TYPE_KEY));
                inner.push(wide_enum(12, fcm.source_type, seed.next() % 3));
            }
            if fcms.is_empty() {
                inner.extend(self.match_unknown.iter().map(UnknownField::encode));
            }
            seed.shuffle(&mut inner);
            let mut field = Vec::new();
            quirks.len_field(1, &inner.concat(), &mut field);
            fcms.push(field);
        }
        let mut at = 0;
        for field in fcms {
            at = seed.position(at, chunks.len());
            chunks.insert(at, field);
            at += 1;
        }
        chunks.concat()
    }
}

/// One listener to build, and the plan to rewrite it with.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    direction: TrafficDirection,
    with_matcher: bool,
    inspectors: Vec<&'static str>,
    chains: Vec<ChainSpec>,
    unknown: Vec<UnknownField>,
    layout_seed: u64,
    quirks: Quirks,
    plan: RewritePlan,
}

/// Encodings that are valid protobuf but that prost never writes.
#[derive(Clone, Copy, Debug, Default)]
struct Quirks {
    /// Enums (`traffic_direction`, `source_type`) written even when zero, and as varints with
    /// bits above the 32nd set (on some matches, not all), which every protobuf parser drops.
    wide_enums: bool,
    /// Length prefixes of chains and matches padded to more bytes than they need.
    padded_lengths: bool,
}

/// The keys of `FilterChainMatch.source_type` (12, varint) and `Listener.traffic_direction`
/// (16, varint).
const SOURCE_TYPE_KEY: &[u8] = &[12 << 3];
const TRAFFIC_DIRECTION_KEY: &[u8] = &[0x80, 0x01];

/// An enum field whose varint carries `value` in its low 32 bits and `junk` above them.
fn wide_enum(number: u32, value: i32, junk: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(number, WireType::Varint, &mut out);
    encode_varint(u64::from(value as u32) | junk << 32, &mut out);
    out
}

impl Quirks {
    fn len_field(self, number: u32, payload: &[u8], out: &mut Vec<u8>) {
        if !self.padded_lengths {
            return len_field(number, payload, out);
        }
        encode_key(number, WireType::LengthDelimited, out);
        // Seven bits at a time, then two more groups of nothing: the same number, longer.
        let mut len = payload.len() as u64;
        while len >= 0x80 {
            out.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        out.extend_from_slice(&[len as u8 | 0x80, 0x80, 0x00]);
        out.extend_from_slice(payload);
    }
}

impl Case {
    fn encode(&self) -> Vec<u8> {
        let mut seed = Shuffle(self.layout_seed | 1);
        let base = Listener {
            name: self.name.clone(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(15006)),
                    ..Default::default()
                })),
            }),
            traffic_direction: self.direction as i32,
            listener_filters: self
                .inspectors
                .iter()
                .map(|name| ListenerFilter {
                    name: name.to_string(),
                    config_type: Some(listener_filter::ConfigType::TypedConfig(Any {
                        type_url: format!("type.googleapis.com/{name}"),
                        value: Vec::new(),
                    })),
                    ..Default::default()
                })
                .collect(),
            filter_chain_matcher: self.with_matcher.then(Matcher::default),
            ..Default::default()
        };
        let mut others = split_fields(&base.encode_to_vec());
        if self.quirks.wide_enums {
            others.retain(|chunk| !chunk.starts_with(TRAFFIC_DIRECTION_KEY));
            others.push(wide_enum(16, self.direction as i32, 5));
        }
        others.extend(self.unknown.iter().map(UnknownField::encode));

        // Chains keep their order (it is their index); everything else lands anywhere.
        let mut chunks: Vec<Vec<u8>> = self
            .chains
            .iter()
            .map(|chain| {
                let mut field = Vec::new();
                let chain = chain.encode(&mut seed, self.quirks);
                self.quirks.len_field(3, &chain, &mut field);
                field
            })
            .collect();
        for other in others {
            let at = seed.position(0, chunks.len());
            chunks.insert(at, other);
        }
        chunks.concat()
    }
}

/// A deterministic shuffle driven by the case's layout seed (xorshift).
struct Shuffle(u64);

impl Shuffle {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A position in `from..=len`.
    fn position(&mut self, from: usize, len: usize) -> usize {
        let span = len.saturating_sub(from) as u64 + 1;
        from + (self.next() % span) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire helpers, written without the rewrite's code

fn typed_any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn len_field(number: u32, payload: &[u8], out: &mut Vec<u8>) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// One top-level field of a message: number, wire type, its whole encoding and, for
/// length-delimited fields, the payload.
#[derive(Debug)]
struct RawField<'a> {
    number: u64,
    wire: u64,
    whole: &'a [u8],
    payload: &'a [u8],
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The top-level fields of `buf`, or `None` if its framing is broken.
fn raw_fields(buf: &[u8]) -> Option<Vec<RawField<'_>>> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let (number, wire) = (key >> 3, key & 7);
        let mut payload: &[u8] = &[];
        match wire {
            0 => {
                read_varint(buf, &mut pos)?;
            }
            1 => pos = pos.checked_add(8).filter(|end| *end <= buf.len())?,
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|end| *end <= buf.len())?;
                payload = &buf[pos..end];
                pos = end;
            }
            3 => {
                // Skip to the matching end-group tag, nested groups included.
                let mut open = vec![number];
                while let Some(&top) = open.last() {
                    let key = read_varint(buf, &mut pos)?;
                    match key & 7 {
                        0 => {
                            read_varint(buf, &mut pos)?;
                        }
                        1 => pos = pos.checked_add(8).filter(|end| *end <= buf.len())?,
                        2 => {
                            let len = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                            pos = pos.checked_add(len).filter(|end| *end <= buf.len())?;
                        }
                        3 => open.push(key >> 3),
                        4 if key >> 3 == top => {
                            open.pop();
                        }
                        5 => pos = pos.checked_add(4).filter(|end| *end <= buf.len())?,
                        _ => return None,
                    }
                }
            }
            5 => pos = pos.checked_add(4).filter(|end| *end <= buf.len())?,
            _ => return None,
        }
        fields.push(RawField {
            number,
            wire,
            whole: &buf[start..pos],
            payload,
        });
    }
    Some(fields)
}

/// The fields of a prost encoding, each as its own bytes.
fn split_fields(buf: &[u8]) -> Vec<Vec<u8>> {
    raw_fields(buf)
        .expect("prost writes valid framing")
        .into_iter()
        .map(|field| field.whole.to_vec())
        .collect()
}

/// The bytes the rewrite should append to a match for `values`.
fn encoded_strings(values: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for value in values {
        len_field(10, value.as_bytes(), &mut out);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Envoy's overlap rule, written out again (FilterChainManagerImpl): two chains share a match
// path when every level's keys intersect, an empty list standing for one "unset" key.

fn port_key(fcm: &FilterChainMatch) -> u32 {
    fcm.destination_port.as_ref().map_or(0, |p| p.value)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum CidrKey {
    Unset,
    Range(IpAddr, u32),
    Text(String, u32),
}

fn cidr_key(range: &CidrRange) -> CidrKey {
    let length = range.prefix_len.as_ref().map_or(0, |l| l.value);
    match range.address_prefix.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            let length = length.min(32);
            let kept = if length == 0 {
                0
            } else {
                u32::from(ip) >> (32 - length) << (32 - length)
            };
            CidrKey::Range(IpAddr::V4(kept.into()), length)
        }
        Ok(IpAddr::V6(ip)) => {
            let length = length.min(128);
            let kept = if length == 0 {
                0
            } else {
                u128::from(ip) >> (128 - length) << (128 - length)
            };
            CidrKey::Range(IpAddr::V6(kept.into()), length)
        }
        Err(_) => CidrKey::Text(range.address_prefix.clone(), length),
    }
}

fn server_key(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    match name.strip_prefix('*') {
        Some(rest) if rest.starts_with('.') => rest.to_string(),
        _ => name,
    }
}

fn keys_meet<K: PartialEq + Clone>(a: Vec<K>, b: Vec<K>, unset: K) -> bool {
    let a = if a.is_empty() { vec![unset.clone()] } else { a };
    let b = if b.is_empty() { vec![unset] } else { b };
    a.iter().any(|x| b.contains(x))
}

fn overlap(a: &FilterChainMatch, b: &FilterChainMatch) -> bool {
    let cidrs = |ranges: &[CidrRange]| ranges.iter().map(cidr_key).collect::<Vec<_>>();
    let names = |fcm: &FilterChainMatch| {
        fcm.server_names
            .iter()
            .map(|n| server_key(n))
            .collect::<Vec<_>>()
    };
    port_key(a) == port_key(b)
        && a.transport_protocol == b.transport_protocol
        && a.source_type == b.source_type
        && keys_meet(
            cidrs(&a.prefix_ranges),
            cidrs(&b.prefix_ranges),
            CidrKey::Unset,
        )
        && keys_meet(names(a), names(b), String::new())
        && keys_meet(
            cidrs(&a.direct_source_prefix_ranges),
            cidrs(&b.direct_source_prefix_ranges),
            CidrKey::Unset,
        )
        && keys_meet(
            cidrs(&a.source_prefix_ranges),
            cidrs(&b.source_prefix_ranges),
            CidrKey::Unset,
        )
        && keys_meet(a.source_ports.clone(), b.source_ports.clone(), 0)
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn unknown_field() -> impl Strategy<Value = UnknownField> {
    let tag = select(UNKNOWN_TAGS);
    prop_oneof![
        (tag.clone(), any::<u64>()).prop_map(|(t, v)| UnknownField::Varint(t, v)),
        (tag.clone(), any::<u32>()).prop_map(|(t, v)| UnknownField::Fixed32(t, v)),
        (tag.clone(), any::<u64>()).prop_map(|(t, v)| UnknownField::Fixed64(t, v)),
        // Payloads that look like fields of the message they sit in, and plain noise.
        (
            tag.clone(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..24),
                Just(b"\x52\x02h2".to_vec()),
                Just(b"\x0a\x05istio".to_vec()),
            ]
        )
            .prop_map(|(t, v)| UnknownField::Len(t, v)),
        (tag, any::<u64>()).prop_map(|(t, v)| UnknownField::Group(t, v)),
    ]
}

/// Mostly one port, so that chains meet.
fn port() -> impl Strategy<Value = u32> {
    prop_oneof![3 => Just(8080), 1 => select(PORTS)]
}

fn cidr() -> impl Strategy<Value = CidrRange> {
    select(CIDRS).prop_map(|(address, length)| CidrRange {
        address_prefix: address.to_string(),
        prefix_len: length.map(|value| UInt32Value { value }),
    })
}

/// Mostly empty, sometimes a few: a list that usually leaves chains on one match path.
fn rare_list<S: Strategy>(element: S, max: usize) -> impl Strategy<Value = Vec<S::Value>>
where
    S::Value: Clone,
{
    prop_oneof![
        3 => Just(Vec::new()),
        1 => proptest::collection::vec(element, 1..=max),
    ]
}

fn alpns() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        2 => select(ISTIO_LISTS).prop_map(|list| list.iter().map(|s| s.to_string()).collect()),
        2 => proptest::collection::vec(select(ALPN_POOL).prop_map(str::to_string), 0..6),
    ]
}

fn filter_chain_match() -> impl Strategy<Value = FilterChainMatch> {
    (
        proptest::option::weighted(0.8, port()),
        select(&["tls", "tls", "tls", "", "raw_buffer"][..]),
        alpns(),
        rare_list(cidr(), 2),
        rare_list(select(SERVER_NAMES).prop_map(str::to_string), 2),
        prop_oneof![6 => Just(0), 1 => 1..=2i32],
        rare_list(select(&[0u32, 1234, 5678][..]), 2),
        rare_list(cidr(), 2),
        rare_list(cidr(), 1),
    )
        .prop_map(
            |(port, transport, alpns, prefixes, names, source_type, ports, source, direct)| {
                FilterChainMatch {
                    destination_port: port.map(|value| UInt32Value { value }),
                    transport_protocol: transport.to_string(),
                    application_protocols: alpns,
                    prefix_ranges: prefixes,
                    server_names: names,
                    source_type,
                    source_ports: ports,
                    source_prefix_ranges: source,
                    direct_source_prefix_ranges: direct,
                    ..Default::default()
                }
            },
        )
}

fn socket() -> impl Strategy<Value = SocketKind> {
    prop_oneof![
        4 => Just(SocketKind::Tls),
        1 => Just(SocketKind::TlsOddName),
        1 => Just(SocketKind::TlsByName),
        2 => Just(SocketKind::None),
        1 => Just(SocketKind::RawBuffer),
        1 => Just(SocketKind::RawBufferNamedTls),
    ]
}

fn filter() -> impl Strategy<Value = FilterKind> {
    prop_oneof![
        4 => Just(FilterKind::Hcm),
        1 => Just(FilterKind::HcmOddName),
        1 => Just(FilterKind::HcmByName),
        2 => Just(FilterKind::TcpProxy),
        1 => Just(FilterKind::TcpProxyNamedHcm),
        1 => Just(FilterKind::MetadataExchange),
    ]
}

fn chain() -> impl Strategy<Value = ChainSpec> {
    (
        select(&["", "virtualInbound", "0.0.0.0_8080", "inbound_0.0.0.0_9080"][..]),
        proptest::option::weighted(0.95, filter_chain_match()),
        proptest::option::weighted(0.05, filter_chain_match()),
        proptest::bool::weighted(0.05),
        socket(),
        proptest::collection::vec(filter(), 0..3),
        rare_list(unknown_field(), 2),
        rare_list(unknown_field(), 2),
    )
        .prop_map(
            |(name, matches, second_match, name_twice, socket, filters, unknown, match_unknown)| {
                ChainSpec {
                    name: name.to_string(),
                    matches,
                    second_match,
                    name_twice,
                    socket,
                    filters,
                    unknown,
                    match_unknown,
                }
            },
        )
}

fn plan() -> impl Strategy<Value = RewritePlan> {
    (
        proptest::bool::weighted(0.7),
        proptest::collection::btree_map(port(), any::<bool>(), 0..3),
    )
        .prop_map(|(default, ports)| RewritePlan { default, ports })
}

fn case() -> impl Strategy<Value = Case> {
    (
        select(&["virtualInbound", "", "0.0.0.0_15006"][..]),
        prop_oneof![
            16 => Just(TrafficDirection::Inbound),
            1 => Just(TrafficDirection::Outbound),
            1 => Just(TrafficDirection::Unspecified),
        ],
        proptest::bool::weighted(0.05),
        proptest::sample::subsequence(
            vec![
                "envoy.filters.listener.tls_inspector",
                "envoy.filters.listener.http_inspector",
                "envoy.filters.listener.original_dst",
            ],
            0..=3,
        ),
        proptest::collection::vec(
            (chain(), proptest::option::weighted(0.4, any::<Index>())),
            0..8,
        ),
        rare_list(unknown_field(), 3),
        (
            any::<u64>(),
            proptest::bool::weighted(0.1),
            proptest::bool::weighted(0.1),
        ),
        plan(),
    )
        .prop_map(
            |(name, direction, with_matcher, inspectors, chains, unknown, layout, plan)| {
                let (layout_seed, wide_enums, padded_lengths) = layout;
                Case {
                    name: name.to_string(),
                    direction,
                    with_matcher,
                    inspectors,
                    chains: with_siblings(chains),
                    unknown,
                    layout_seed,
                    quirks: Quirks {
                        wide_enums,
                        padded_lengths,
                    },
                    plan,
                }
            },
        )
}

/// Chains paired with an earlier chain take over its whole match but for the ALPN list: the
/// chains that meet on a match path, where collisions happen.
fn with_siblings(chains: Vec<(ChainSpec, Option<Index>)>) -> Vec<ChainSpec> {
    let mut done: Vec<ChainSpec> = Vec::with_capacity(chains.len());
    for (mut chain, sibling) in chains {
        let earlier = sibling
            .filter(|_| !done.is_empty())
            .and_then(|index| done[index.index(done.len())].matches.clone());
        if let (Some(earlier), Some(own)) = (earlier, chain.matches.as_mut()) {
            let alpns = std::mem::take(&mut own.application_protocols);
            *own = FilterChainMatch {
                application_protocols: alpns,
                ..earlier
            };
        }
        done.push(chain);
    }
    done
}

/// One edit of a listener's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    Overwrite(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    /// Copies a range of the input to another place, which duplicates fields.
    Duplicate(Index, usize, Index),
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let at = |index: &Index, len: usize| index.index(len + 1);
        match self {
            Mutation::FlipBit(index, bit) if !bytes.is_empty() => {
                let i = index.index(bytes.len());
                bytes[i] ^= 1 << (bit % 8);
            }
            Mutation::Overwrite(index, byte) if !bytes.is_empty() => {
                let i = index.index(bytes.len());
                bytes[i] = *byte;
            }
            Mutation::Insert(index, inserted) => {
                let i = at(index, bytes.len());
                bytes.splice(i..i, inserted.iter().copied());
            }
            Mutation::Delete(index, count) => {
                let i = at(index, bytes.len());
                let end = (i + count).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Truncate(index) => bytes.truncate(at(index, bytes.len())),
            Mutation::Duplicate(from, count, to) => {
                let i = at(from, bytes.len());
                let end = (i + count).min(bytes.len());
                let copy = bytes[i..end].to_vec();
                let j = at(to, bytes.len());
                bytes.splice(j..j, copy);
            }
            _ => {}
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Bytes that mean something on the wire: continuation bits, tags of the fields the rewrite
    // reads (filter chains, match, ALPN, port, direction), group tags, a huge varint.
    let interesting = prop_oneof![
        any::<u8>(),
        select(
            &[
                0x00u8, 0x01, 0x7f, 0x80, 0xff, 0x0a, 0x1a, 0x42, 0x52, 0x80, 0x0b, 0x0c
            ][..]
        ),
    ];
    // Edits that keep the length of the input come first: they leave most framing intact.
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        4 => (any::<Index>(), interesting.clone()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        1 => (
            any::<Index>(),
            proptest::collection::vec(interesting, 1..4)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1..8usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1..64usize, any::<Index>())
            .prop_map(|(f, n, t)| Mutation::Duplicate(f, n, t)),
    ]
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

/// The values each chain gained, by chain index.
fn additions(result: &ListenerRewrite) -> BTreeMap<usize, Vec<String>> {
    result
        .chains
        .iter()
        .filter(|chain| !chain.added.is_empty())
        .map(|chain| {
            (
                chain.index,
                chain.added.iter().map(str::to_string).collect(),
            )
        })
        .collect()
}

/// Whatever the input: no panic; a successful rewrite is stable, repeatable and adds only what
/// it reports, byte for byte. Returns the rewrite's result for further checks.
fn check_any(bytes: &[u8], plan: &RewritePlan) -> Result<Option<ListenerRewrite>, TestCaseError> {
    let _ = inspect_listener(bytes);
    let Ok(result) = rewrite_listener(bytes, plan) else {
        return Ok(None);
    };
    let repeated = rewrite_listener(bytes, plan).ok();
    prop_assert_eq!(repeated.as_ref(), Some(&result), "same input, other result");
    let added = additions(&result);
    prop_assert_eq!(result.output.is_some(), !added.is_empty());
    let decoded = Listener::decode(bytes);
    if let Ok(listener) = &decoded {
        check_decoded(listener, &result, plan)?;
    }
    for (index, values) in &added {
        let mut seen = BTreeSet::new();
        for value in values {
            prop_assert!(
                STANDARD_ALPNS.contains(&value.as_str()),
                "chain {index}: added {value:?}"
            );
            prop_assert!(seen.insert(value), "chain {index}: {value:?} added twice");
        }
    }
    let Some(output) = &result.output else {
        return Ok(Some(result));
    };

    check_only_additions(bytes, output, &added)?;

    let again = rewrite_listener(output, plan);
    prop_assert!(again.is_ok(), "output does not parse: {again:?}");
    let again = again.unwrap();
    prop_assert!(
        again.output.is_none(),
        "a second rewrite changed: {again:?}"
    );
    let _ = inspect_listener(output);

    // Where prost reads the input, it reads the output, and they differ only in the additions.
    if let Ok(before) = &decoded {
        let after = Listener::decode(&output[..]);
        prop_assert!(after.is_ok(), "output does not decode: {after:?}");
        let mut after = after.unwrap();
        for (index, values) in &added {
            let alpns = &mut after.filter_chains[*index]
                .filter_chain_match
                .as_mut()
                .expect("an edited chain has a match")
                .application_protocols;
            let kept = alpns.len().checked_sub(values.len());
            prop_assert!(kept.is_some(), "chain {index} lost values");
            let tail = alpns.split_off(kept.unwrap());
            prop_assert_eq!(&tail, values, "chain {}: appended values", index);
        }
        prop_assert_eq!(&after, before, "decoded output minus additions");
    }
    Ok(Some(result))
}

/// What the rewrite did, judged against the listener as protobuf reads it: it skips what it
/// should, adds only to chains that can be mTLS HTTP chains selected by the plan, and never
/// makes two chains on one match path share a value they did not share before.
fn check_decoded(
    listener: &Listener,
    result: &ListenerRewrite,
    plan: &RewritePlan,
) -> Result<(), TestCaseError> {
    let skipped = if listener.traffic_direction != TrafficDirection::Inbound as i32 {
        Some(SkipReason::NotInbound)
    } else if listener.filter_chain_matcher.is_some() {
        Some(SkipReason::UsesFilterChainMatcher)
    } else {
        None
    };
    prop_assert_eq!(result.skipped, skipped);

    let matches: Vec<FilterChainMatch> = listener
        .filter_chains
        .iter()
        .map(|chain| chain.filter_chain_match.clone().unwrap_or_default())
        .collect();
    let mut after: Vec<Vec<String>> = matches
        .iter()
        .map(|m| m.application_protocols.clone())
        .collect();
    for report in &result.chains {
        let i = report.index;
        prop_assert!(i < matches.len(), "report on chain {i}");
        let chain = &listener.filter_chains[i];
        let istio_http = matches[i]
            .application_protocols
            .iter()
            .any(|alpn| ISTIO_HTTP.contains(&alpn.as_str()));
        prop_assert!(
            istio_http && chain.transport_socket.is_some() && !chain.filters.is_empty(),
            "chain {i} reported as mTLS HTTP"
        );
        let port = matches[i].destination_port.as_ref().map(|p| p.value);
        prop_assert_eq!(report.destination_port, port, "chain {}", i);
        prop_assert_eq!(report.planned, plan.adds(port), "chain {}", i);
        if !report.added.is_empty() {
            prop_assert!(report.planned, "chain {i}: added without the plan");
        }
        for value in report.added.iter() {
            prop_assert!(
                !matches[i]
                    .application_protocols
                    .iter()
                    .any(|listed| listed == value),
                "chain {i}: {value:?} was there"
            );
        }
        after[i].extend(report.added.iter().map(str::to_string));
    }

    for i in 0..matches.len() {
        for j in i + 1..matches.len() {
            if !overlap(&matches[i], &matches[j]) {
                continue;
            }
            let before = |k: usize, v: &String| matches[k].application_protocols.contains(v);
            for value in after[i].iter().filter(|v| after[j].contains(v)) {
                prop_assert!(
                    before(i, value) && before(j, value),
                    "chains {i} and {j} now share {value:?} on one match path"
                );
            }
        }
    }
    Ok(())
}

/// The output is the input with the reported values appended to the first match of each edited
/// chain: every other field, unknown ones included, byte for byte.
fn check_only_additions(
    input: &[u8],
    output: &[u8],
    added: &BTreeMap<usize, Vec<String>>,
) -> Result<(), TestCaseError> {
    let (before, after) = (raw_fields(input), raw_fields(output));
    prop_assert!(before.is_some() && after.is_some(), "framing broken");
    let (before, after) = (before.unwrap(), after.unwrap());
    prop_assert_eq!(before.len(), after.len(), "listener field count");
    let mut chain_index = 0;
    for (a, b) in before.iter().zip(&after) {
        prop_assert_eq!((a.number, a.wire), (b.number, b.wire));
        let values = (a.number == 3 && a.wire == 2)
            .then(|| {
                chain_index += 1;
                added.get(&(chain_index - 1))
            })
            .flatten();
        let Some(values) = values else {
            prop_assert_eq!(a.whole, b.whole, "listener field {} changed", a.number);
            continue;
        };
        let (chain_a, chain_b) = (raw_fields(a.payload), raw_fields(b.payload));
        prop_assert!(
            chain_a.is_some() && chain_b.is_some(),
            "chain framing broken"
        );
        let (chain_a, chain_b) = (chain_a.unwrap(), chain_b.unwrap());
        prop_assert_eq!(chain_a.len(), chain_b.len(), "chain field count");
        let mut edited = false;
        for (x, y) in chain_a.iter().zip(&chain_b) {
            prop_assert_eq!((x.number, x.wire), (y.number, y.wire));
            if x.number == 1 && x.wire == 2 && !edited {
                edited = true;
                let mut expected = x.payload.to_vec();
                expected.extend(encoded_strings(values));
                prop_assert_eq!(y.payload, &expected[..], "match payload");
            } else {
                prop_assert_eq!(x.whole, y.whole, "chain field {} changed", x.number);
            }
        }
        prop_assert!(edited, "values reported on a chain without a match");
    }
    let last = added.keys().next_back();
    prop_assert!(
        last.is_none_or(|i| *i < chain_index),
        "values reported on chain {last:?}"
    );
    Ok(())
}

/// The structured case: everything [`check_any`] checks, and against the generator's record:
/// exactly the mTLS HTTP chains are reported, ambiguous ones never change, and every planned
/// value is either there already, added, or left out for a chain that really claims it on the
/// same match path.
fn check_case(case: &Case) -> Result<(), TestCaseError> {
    let bytes = case.encode();
    let decoded = Listener::decode(&bytes[..]);
    prop_assert!(decoded.is_ok(), "generator wrote bad bytes: {decoded:?}");
    let decoded = decoded.unwrap();
    prop_assert_eq!(decoded.filter_chains.len(), case.chains.len());

    let result = rewrite_listener(&bytes, &case.plan);
    prop_assert!(result.is_ok(), "a valid listener fails: {result:?}");
    let result = result.unwrap();
    prop_assert!(check_any(&bytes, &case.plan)?.is_some());
    prop_assert_eq!(&result.name, &case.name);
    prop_assert!(inspect_listener(&bytes).is_ok());

    let skipped = if case.direction != TrafficDirection::Inbound {
        Some(SkipReason::NotInbound)
    } else if case.with_matcher {
        Some(SkipReason::UsesFilterChainMatcher)
    } else {
        None
    };
    prop_assert_eq!(result.skipped, skipped);
    if skipped.is_some() {
        prop_assert!(result.output.is_none() && result.chains.is_empty());
        return Ok(());
    }

    let matches: Vec<FilterChainMatch> = decoded
        .filter_chains
        .iter()
        .map(|chain| chain.filter_chain_match.clone().unwrap_or_default())
        .collect();
    let mtls_http: BTreeSet<usize> = case
        .chains
        .iter()
        .enumerate()
        .filter(|(i, spec)| spec.is_mtls_http(&matches[*i]))
        .map(|(i, _)| i)
        .collect();
    let reported: BTreeSet<usize> = result.chains.iter().map(|c| c.index).collect();
    prop_assert_eq!(&reported, &mtls_http, "reported chains");

    let mut after: Vec<Vec<String>> = matches
        .iter()
        .map(|m| m.application_protocols.clone())
        .collect();
    // Ports, plan and values already there were checked on the decoding by `check_any`.
    for report in &result.chains {
        let i = report.index;
        prop_assert_eq!(
            report.not_understood.is_some(),
            case.chains[i].is_ambiguous()
        );
        if !report.added.is_empty() {
            prop_assert!(!case.chains[i].is_ambiguous(), "chain {i}: ambiguous");
        }
        after[i].extend(report.added.iter().map(str::to_string));
    }

    // A planned value is either added or left out for a chain that really claims it.
    for report in &result.chains {
        let i = report.index;
        if !report.planned || report.not_understood.is_some() {
            prop_assert!(report.added.is_empty() && report.collisions.is_empty());
            continue;
        }
        for value in STANDARD_ALPNS {
            let listed = matches[i].application_protocols.iter().any(|v| v == value);
            let added = report.added.iter().any(|v| v == value);
            let collision = report.collisions.iter().find(|c| c.alpn == value);
            prop_assert!(
                [listed, added, collision.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count()
                    == 1,
                "chain {i}, {value}: listed {listed}, added {added}, collision {collision:?}"
            );
            if let Some(collision) = collision {
                let j = collision.other_index;
                prop_assert!(j != i && j < matches.len(), "chain {i}: collides with {j}");
                prop_assert!(
                    overlap(&matches[i], &matches[j]),
                    "{i} and {j} do not overlap"
                );
                prop_assert!(
                    after[j].iter().any(|v| v == value),
                    "{j} does not claim {value}"
                );
            }
        }
    }

    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes: never a panic; whatever is rewritten satisfies every output property.
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), plan in plan()) {
        check_any(&bytes, &plan)?;
    }

    /// Istio-like listeners: the full oracle.
    #[test]
    fn structured_listeners(case in case()) {
        check_case(&case)?;
    }

    /// The same listeners with their bytes edited.
    #[test]
    fn mutated_listeners(
        case in case(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = case.encode();
        for mutation in &mutations {
            mutation.apply(&mut bytes);
        }
        check_any(&bytes, &case.plan)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs that once failed, kept by name

/// A listener of one mTLS HTTP chain on 8080 and, when `with_plain` is set, before it a TLS
/// chain on the same match that lists `http/1.1`, whose `source_type` ANY is written with junk
/// above bit 32.
fn listener_with_wide_enums(direction: &[u8], with_plain: bool) -> Vec<u8> {
    let mut bytes = Listener {
        name: "virtualInbound".to_string(),
        ..Default::default()
    }
    .encode_to_vec();
    // traffic_direction (16, varint) as the caller writes it.
    bytes.extend_from_slice(&[0x80, 0x01]);
    bytes.extend_from_slice(direction);

    let fcm = |alpns: &[&str]| FilterChainMatch {
        destination_port: Some(UInt32Value { value: 8080 }),
        transport_protocol: "tls".to_string(),
        application_protocols: alpns.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    if with_plain {
        let mut chain = FilterChain {
            transport_socket: SocketKind::Tls.build(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut fcm = fcm(&["http/1.1", "h2c"]).encode_to_vec();
        fcm.extend(wide_enum(12, 0, 5));
        len_field(1, &fcm, &mut chain);
        len_field(3, &chain, &mut bytes);
    }
    let chain = FilterChain {
        filter_chain_match: Some(fcm(&["istio-http/1.0", "istio-http/1.1", "istio-h2"])),
        filters: vec![FilterKind::Hcm.build()],
        transport_socket: SocketKind::Tls.build(),
        ..Default::default()
    };
    len_field(3, &chain.encode_to_vec(), &mut bytes);
    bytes
}

fn everywhere() -> RewritePlan {
    RewritePlan {
        default: true,
        ports: BTreeMap::new(),
    }
}

/// `traffic_direction` INBOUND with bits above the 32nd, which protobuf parsers (Envoy's
/// included) drop: the rewrite read it as another direction and skipped the listener.
#[test]
fn regression_inbound_written_with_high_bits_is_inbound() {
    let inbound = listener_with_wide_enums(&[0x81, 0x80, 0x80, 0x80, 0x50], false);
    let result = check_any(&inbound, &everywhere()).unwrap().unwrap();
    assert_eq!(result.skipped, None);
    assert_eq!(
        result.chains[0].added.iter().collect::<Vec<_>>(),
        STANDARD_ALPNS
    );

    let outbound = listener_with_wide_enums(&[0x82, 0x80, 0x80, 0x80, 0x50], false);
    let result = check_any(&outbound, &everywhere()).unwrap().unwrap();
    assert_eq!(result.skipped, Some(SkipReason::NotInbound));
}

/// `source_type` ANY with bits above the 32nd on one of two chains on the same match: Envoy
/// files both under ANY, so `http/1.1`, which the other chain lists, must not be added. The
/// rewrite compared the raw varints, added it, and Envoy would have refused the listener.
#[test]
fn regression_source_type_written_with_high_bits_still_collides() {
    let bytes = listener_with_wide_enums(&[0x01], true);
    let result = check_any(&bytes, &everywhere()).unwrap().unwrap();
    let [chain] = result.chains.as_slice() else {
        panic!("one mTLS HTTP chain: {result:?}");
    };
    assert_eq!(chain.added.iter().collect::<Vec<_>>(), ["http/1.0", "h2"]);
    assert_eq!(chain.collisions.len(), 1);
    assert_eq!(chain.collisions[0].alpn, "http/1.1");
    assert_eq!(chain.collisions[0].other_index, 0);
}

/// The generator's own first failure, a layout with every quirk, as a structured case.
#[test]
fn regression_structured_case_with_wide_enums_and_padded_lengths() {
    let chain = |alpns: &[&str], socket, filters: Vec<FilterKind>| ChainSpec {
        name: "virtualInbound".to_string(),
        matches: Some(FilterChainMatch {
            destination_port: Some(UInt32Value { value: 8080 }),
            transport_protocol: "tls".to_string(),
            application_protocols: alpns.iter().map(|s| s.to_string()).collect(),
            source_ports: vec![0],
            ..Default::default()
        }),
        second_match: None,
        name_twice: false,
        socket,
        filters,
        unknown: vec![UnknownField::Group(1000, 7)],
        match_unknown: vec![UnknownField::Len(100, b"\x52\x02h2".to_vec())],
    };
    for layout_seed in [0, 5_198_115_239_034_881_110] {
        let case = Case {
            name: "virtualInbound".to_string(),
            direction: TrafficDirection::Inbound,
            with_matcher: false,
            inspectors: vec![],
            chains: vec![
                chain(&["http/1.1", "h2c"], SocketKind::Tls, vec![]),
                chain(
                    &["istio-http/1.0"],
                    SocketKind::Tls,
                    vec![FilterKind::Hcm, FilterKind::Hcm],
                ),
            ],
            unknown: vec![UnknownField::Fixed64(65_535, 1)],
            layout_seed,
            quirks: Quirks {
                wide_enums: true,
                padded_lengths: true,
            },
            plan: RewritePlan {
                default: false,
                ports: BTreeMap::from([(8080, true)]),
            },
        };
        check_case(&case).unwrap();
    }
}
