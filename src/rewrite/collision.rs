//! The duplicate-match check Envoy runs when it loads a listener, applied to planned ALPNs.
//!
//! Envoy (`FilterChainManagerImpl::addFilterChainForDestinationPorts` and the functions it
//! calls, `source/common/listener_manager/filter_chain_manager_impl.cc`) files every chain into
//! a tree of maps keyed, level by level, by destination port, destination CIDR, server name,
//! transport protocol, application protocol, direct source CIDR, source type, source CIDR and
//! source port. A repeated field puts the chain under every one of its values; an empty one
//! under a single "unset" key (`""`, or port 0). When two chains reach the same leaf, Envoy
//! rejects the whole listener ("multiple filter chains with overlapping matching rules"). So
//! two chains collide on an ALPN value when they share a key at every level and both list it.

use std::net::IpAddr;

use super::classify::ChainScan;
use super::matching::{AlpnFlags, CidrList, read_cidr};

/// Chain indexes grouped by the destination-port key Envoy files them under.
pub(crate) struct PortIndex {
    /// The port key in the top 16 bits, the chain index below: sorted, they group the chains
    /// by port in listener order. An index fits, as no listener in memory has 2^48 chains.
    entries: Vec<u64>,
}

const INDEX_BITS: u32 = 48;

impl PortIndex {
    pub fn new(chains: &[ChainScan<'_>]) -> Self {
        let mut entries: Vec<u64> = chains
            .iter()
            .map(|chain| {
                let key = port_key(chain.matches.summary.destination_port);
                (u64::from(key) << INDEX_BITS) | chain.index as u64
            })
            .collect();
        entries.sort_unstable();
        PortIndex { entries }
    }

    /// Indexes of the chains filed under the same port as `chain`, in listener order.
    fn same_port(&self, chain: &ChainScan<'_>) -> impl Iterator<Item = usize> + '_ {
        let key = u64::from(port_key(chain.matches.summary.destination_port));
        let start = self
            .entries
            .partition_point(|entry| entry >> INDEX_BITS < key);
        self.entries[start..]
            .iter()
            .take_while(move |entry| *entry >> INDEX_BITS == key)
            .map(|entry| (entry & ((1 << INDEX_BITS) - 1)) as usize)
    }
}

/// Envoy reads `destination_port` with a default of 0 into a 16-bit key, so an unset port and
/// port 0 share a key, and a value above 65535 (which validation rejects) would wrap.
fn port_key(port: Option<u32>) -> u32 {
    port.map_or(0, |port| port & 0xffff)
}

/// The first chain (in listener order) that would share a match path and the ALPN `value` with
/// chain `index`, counting both the values chains list and those already planned (`adding`).
pub(crate) fn first_collision(
    chains: &[ChainScan<'_>],
    index: &PortIndex,
    adding: &[AlpnFlags],
    chain: usize,
    value: AlpnFlags,
) -> Option<usize> {
    let this = chains.get(chain)?;
    index.same_port(this).find(|&other| {
        let Some(that) = chains.get(other) else {
            return false;
        };
        let planned = adding.get(other).copied().unwrap_or_default();
        other != chain
            && (that.matches.summary.alpns.contains(value) || planned.contains(value))
            && same_match_path(this, that)
    })
}

/// Whether Envoy would file both chains under one key at every level above (and below) the
/// application protocol, given that their destination-port keys are equal.
fn same_match_path(a: &ChainScan<'_>, b: &ChainScan<'_>) -> bool {
    a.matches.summary.transport_protocol == b.matches.summary.transport_protocol
        && a.matches.summary.source_type == b.matches.summary.source_type
        && cidrs_intersect(a, b, CidrList::Destination)
        && intersects(
            a.matches.server_names().map(ServerName),
            b.matches.server_names().map(ServerName),
            ServerName(""),
        )
        && cidrs_intersect(a, b, CidrList::DirectSource)
        && cidrs_intersect(a, b, CidrList::Source)
        && intersects(a.matches.source_ports(), b.matches.source_ports(), 0)
}

fn cidrs_intersect(a: &ChainScan<'_>, b: &ChainScan<'_>, list: CidrList) -> bool {
    intersects(
        a.matches.cidr_ranges(list).map(CidrKey::of),
        b.matches.cidr_ranges(list).map(CidrKey::of),
        CidrKey::Unset,
    )
}

/// Whether two key lists share a key, an empty list standing for the single key `unset`.
fn intersects<K, A, B>(a: A, b: B, unset: K) -> bool
where
    K: PartialEq + Copy,
    A: Iterator<Item = K> + Clone,
    B: Iterator<Item = K> + Clone,
{
    let a_empty = a.clone().next().is_none();
    let b_empty = b.clone().next().is_none();
    match (a_empty, b_empty) {
        (true, true) => true,
        (true, false) => b.clone().any(|key| key == unset),
        (false, true) => a.clone().any(|key| key == unset),
        (false, false) => a.clone().any(|x| b.clone().any(|y| x == y)),
    }
}

/// A server name as Envoy keys it: lower-cased, with `*.example.com` filed as `.example.com`.
#[derive(Clone, Copy, Debug)]
struct ServerName<'a>(&'a str);

impl ServerName<'_> {
    fn key(&self) -> &str {
        match self.0.strip_prefix('*') {
            Some(rest) if rest.starts_with('.') => rest,
            _ => self.0,
        }
    }
}

impl PartialEq for ServerName<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key().eq_ignore_ascii_case(other.key())
    }
}

/// A CIDR range as Envoy keys it: the address with its host bits cleared and the length capped
/// at the address width (Envoy's `CidrRange::create(...).asString()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CidrKey<'a> {
    Unset,
    Range(IpAddr, u32),
    /// An address Envoy would refuse (and the listener with it); compared as written.
    Unparsed(&'a str, u32),
}

impl<'a> CidrKey<'a> {
    fn of(range: &'a [u8]) -> Self {
        let (address, length) = read_cidr(range);
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                let length = length.min(32);
                let mask = u32::MAX.checked_shl(32 - length).unwrap_or(0);
                CidrKey::Range(IpAddr::V4((u32::from(ip) & mask).into()), length)
            }
            Ok(IpAddr::V6(ip)) => {
                let length = length.min(128);
                let mask = u128::MAX.checked_shl(128 - length).unwrap_or(0);
                CidrKey::Range(IpAddr::V6((u128::from(ip) & mask).into()), length)
            }
            Err(_) => CidrKey::Unparsed(address, length),
        }
    }
}

/// The normalised text of a `CidrRange`, as Envoy prints it (`10.0.0.0/8`), for reports.
pub(crate) fn cidr_text(range: &[u8]) -> String {
    match CidrKey::of(range) {
        CidrKey::Range(ip, length) => format!("{ip}/{length}"),
        CidrKey::Unparsed(address, length) => format!("{address}/{length}"),
        CidrKey::Unset => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use prost::Message;

    use super::super::classify::{Depth, scan_chain};
    use super::super::wire::LenValue;
    use super::*;

    fn cidr(address: &str, length: u32) -> CidrRange {
        CidrRange {
            address_prefix: address.to_string(),
            prefix_len: Some(UInt32Value { value: length }),
        }
    }

    /// A chain holding only `fcm`, encoded as a FilterChain payload.
    fn chain_bytes(fcm: &FilterChainMatch) -> Vec<u8> {
        envoy_types::pb::envoy::config::listener::v3::FilterChain {
            filter_chain_match: Some(fcm.clone()),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn scan(index: usize, bytes: &[u8]) -> ChainScan<'_> {
        let value = LenValue {
            bytes,
            prefix_start: 0,
            payload_start: 0,
        };
        scan_chain(index, value, Depth::Full).unwrap()
    }

    fn overlap(a: &FilterChainMatch, b: &FilterChainMatch) -> bool {
        let (a, b) = (chain_bytes(a), chain_bytes(b));
        let (a, b) = (scan(0, &a), scan(1, &b));
        port_key(a.matches.summary.destination_port) == port_key(b.matches.summary.destination_port)
            && same_match_path(&a, &b)
    }

    fn tls_on(port: Option<u32>) -> FilterChainMatch {
        FilterChainMatch {
            destination_port: port.map(|value| UInt32Value { value }),
            transport_protocol: "tls".to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn port_and_transport_must_be_equal() {
        assert!(overlap(&tls_on(Some(80)), &tls_on(Some(80))));
        assert!(!overlap(&tls_on(Some(80)), &tls_on(Some(81))));
        assert!(!overlap(&tls_on(Some(80)), &tls_on(None)));
        // Envoy files an unset port under 0.
        assert!(overlap(&tls_on(Some(0)), &tls_on(None)));
        let raw = FilterChainMatch {
            transport_protocol: String::new(),
            ..tls_on(Some(80))
        };
        assert!(!overlap(&tls_on(Some(80)), &raw));
    }

    #[test]
    fn prefix_ranges_compare_normalised_and_unset_is_its_own_key() {
        let with = |ranges: Vec<CidrRange>| FilterChainMatch {
            prefix_ranges: ranges,
            ..tls_on(None)
        };
        assert!(overlap(
            &with(vec![cidr("10.1.2.3", 8)]),
            &with(vec![cidr("10.0.0.0", 8)])
        ));
        assert!(overlap(
            &with(vec![cidr("::0", 0)]),
            &with(vec![cidr("2001:db8::1", 0)])
        ));
        assert!(overlap(
            &with(vec![cidr("192.0.2.10", 40)]),
            &with(vec![cidr("192.0.2.10", 32)])
        ));
        assert!(!overlap(
            &with(vec![cidr("0.0.0.0", 0)]),
            &with(vec![cidr("::", 0)])
        ));
        assert!(!overlap(&with(vec![cidr("0.0.0.0", 0)]), &with(vec![])));
        assert!(overlap(
            &with(vec![cidr("10.0.0.0", 8), cidr("::", 0)]),
            &with(vec![cidr("::", 0)])
        ));
    }

    #[test]
    fn server_names_ignore_case_and_key_wildcards_by_suffix() {
        let with = |names: &[&str]| FilterChainMatch {
            server_names: names.iter().map(|s| s.to_string()).collect(),
            ..tls_on(Some(443))
        };
        assert!(overlap(&with(&["Example.COM"]), &with(&["example.com"])));
        assert!(overlap(&with(&["*.example.com"]), &with(&[".example.com"])));
        assert!(!overlap(
            &with(&["*.example.com"]),
            &with(&["a.example.com"])
        ));
        assert!(!overlap(&with(&["example.com"]), &with(&[])));
        assert!(overlap(&with(&[""]), &with(&[])));
    }

    #[test]
    fn source_fields_split_match_paths() {
        let ports = |ports: Vec<u32>| FilterChainMatch {
            source_ports: ports,
            ..tls_on(Some(80))
        };
        assert!(overlap(&ports(vec![1, 2]), &ports(vec![2, 3])));
        assert!(!overlap(&ports(vec![1]), &ports(vec![2])));
        assert!(!overlap(&ports(vec![1]), &ports(vec![])));
        assert!(overlap(&ports(vec![0]), &ports(vec![])));

        let source = |ranges: Vec<CidrRange>| FilterChainMatch {
            source_prefix_ranges: ranges,
            ..tls_on(Some(80))
        };
        assert!(!overlap(
            &source(vec![cidr("10.0.0.0", 8)]),
            &source(vec![cidr("10.0.0.0", 16)])
        ));
        let direct = FilterChainMatch {
            direct_source_prefix_ranges: vec![cidr("127.0.0.1", 32)],
            ..tls_on(Some(80))
        };
        assert!(!overlap(&direct, &tls_on(Some(80))));
        let local = FilterChainMatch {
            source_type: 1,
            ..tls_on(Some(80))
        };
        assert!(!overlap(&local, &tls_on(Some(80))));
    }

    #[test]
    fn source_type_is_compared_as_protobuf_reads_it() {
        // source_type (field 12) ANY written as 5 * 2^32: protobuf parsers, Envoy's too, keep
        // the low 32 bits, so Envoy files this chain under ANY beside the plain one, and a value
        // added to either would collide. Found by tests/prop_rewrite.rs.
        let mut fcm = tls_on(Some(80)).encode_to_vec();
        fcm.extend_from_slice(&[0x60, 0x80, 0x80, 0x80, 0x80, 0x50]);
        assert_eq!(FilterChainMatch::decode(&fcm[..]).unwrap().source_type, 0);
        let mut wide = vec![0x0a, fcm.len() as u8];
        wide.extend_from_slice(&fcm);
        let plain = chain_bytes(&tls_on(Some(80)));
        let (wide, plain) = (scan(0, &wide), scan(1, &plain));
        assert_eq!(wide.matches.summary.source_type, 0);
        assert!(same_match_path(&wide, &plain));
    }

    #[test]
    fn packed_source_ports_are_read() {
        // source_ports (field 7) packed: tag 0x3a, length 2, ports 5 and 6.
        let mut fcm = tls_on(Some(80)).encode_to_vec();
        fcm.extend_from_slice(&[0x3a, 0x02, 0x05, 0x06]);
        let mut chain = vec![0x0a, fcm.len() as u8];
        chain.extend_from_slice(&fcm);
        let chain = scan(0, &chain);
        assert_eq!(chain.matches.source_ports().collect::<Vec<_>>(), vec![5, 6]);
    }

    #[test]
    fn cidr_text_is_normalised() {
        let text = |range: CidrRange| cidr_text(&range.encode_to_vec());
        assert_eq!(text(cidr("10.1.2.3", 8)), "10.0.0.0/8");
        assert_eq!(text(cidr("::0", 0)), "::/0");
        assert_eq!(text(cidr("not-an-ip", 3)), "not-an-ip/3");
    }
}
