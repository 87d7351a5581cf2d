//! Reading a filter chain's `filter_chain_match` from the wire.
//!
//! The first walk validates every field the rewrite reads again later (ALPN values, prefix
//! ranges, server names, source ports) and sums up the rest, so the later walks cannot meet
//! malformed bytes. Several occurrences of the match are read the way protobuf merges a
//! repeated singular message: scalars from the last one, lists concatenated.

use super::wire::{Field, FieldReader, LenValue, PackedVarints, Value, WireProblem};

/// Field numbers of `FilterChainMatch`, `CidrRange` and `UInt32Value`.
pub(crate) mod tag {
    pub const PREFIX_RANGES: u32 = 3;
    pub const ADDRESS_SUFFIX: u32 = 4;
    pub const SUFFIX_LEN: u32 = 5;
    pub const SOURCE_PREFIX_RANGES: u32 = 6;
    pub const SOURCE_PORTS: u32 = 7;
    pub const DESTINATION_PORT: u32 = 8;
    pub const TRANSPORT_PROTOCOL: u32 = 9;
    pub const APPLICATION_PROTOCOLS: u32 = 10;
    pub const SERVER_NAMES: u32 = 11;
    pub const SOURCE_TYPE: u32 = 12;
    pub const DIRECT_SOURCE_PREFIX_RANGES: u32 = 13;

    pub const CIDR_ADDRESS_PREFIX: u32 = 1;
    pub const CIDR_PREFIX_LEN: u32 = 2;

    /// `google.protobuf.UInt32Value.value`.
    pub const WRAPPER_VALUE: u32 = 1;
}

/// The ALPN values of a match that the rewrite cares about, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AlpnFlags(u16);

impl AlpnFlags {
    pub const NONE: AlpnFlags = AlpnFlags(0);
    pub const ISTIO: AlpnFlags = AlpnFlags(1 << 0);
    pub const ISTIO_HTTP10: AlpnFlags = AlpnFlags(1 << 1);
    pub const ISTIO_HTTP11: AlpnFlags = AlpnFlags(1 << 2);
    pub const ISTIO_H2: AlpnFlags = AlpnFlags(1 << 3);
    pub const ISTIO_PEER_EXCHANGE: AlpnFlags = AlpnFlags(1 << 4);
    /// The values that mark an Istio mTLS chain for HTTP (`mtlsHTTPALPNs` plus `istio`).
    pub const ISTIO_HTTP: AlpnFlags = AlpnFlags(0b1111);
    /// Every Istio value, HTTP or TCP.
    pub const ANY_ISTIO: AlpnFlags = AlpnFlags(0b1_1111);
    /// First of the three bits that follow [`super::STANDARD_ALPNS`] in order.
    const STANDARD_SHIFT: u16 = 5;

    /// The bit of `STANDARD_ALPNS[index]`.
    pub const fn standard(index: usize) -> AlpnFlags {
        AlpnFlags(1 << (Self::STANDARD_SHIFT + index as u16))
    }

    /// The flag of a value as found on the wire; [`AlpnFlags::NONE`] for values the rewrite
    /// does not care about (which are then still to be checked for UTF-8).
    fn of(value: &[u8]) -> AlpnFlags {
        match value {
            b"istio" => Self::ISTIO,
            b"istio-http/1.0" => Self::ISTIO_HTTP10,
            b"istio-http/1.1" => Self::ISTIO_HTTP11,
            b"istio-h2" => Self::ISTIO_H2,
            b"istio-peer-exchange" => Self::ISTIO_PEER_EXCHANGE,
            _ => match super::STANDARD_ALPNS
                .iter()
                .position(|s| s.as_bytes() == value)
            {
                Some(index) => Self::standard(index),
                None => Self::NONE,
            },
        }
    }

    pub const fn contains(self, other: AlpnFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersects(self, other: AlpnFlags) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn insert(&mut self, other: AlpnFlags) {
        self.0 |= other.0;
    }
}

/// The scalar parts of the match, and its ALPN values as flags.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MatchSummary<'a> {
    pub destination_port: Option<u32>,
    pub transport_protocol: &'a str,
    /// The enum's value as protobuf reads it (low 32 bits), which is what Envoy keys on.
    pub source_type: i32,
    pub alpns: AlpnFlags,
}

/// The three `CidrRange` lists of a `FilterChainMatch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CidrList {
    Destination,
    Source,
    DirectSource,
}

impl CidrList {
    fn tag(self) -> u32 {
        match self {
            CidrList::Destination => tag::PREFIX_RANGES,
            CidrList::Source => tag::SOURCE_PREFIX_RANGES,
            CidrList::DirectSource => tag::DIRECT_SOURCE_PREFIX_RANGES,
        }
    }
}

/// Every `filter_chain_match` of one chain (normally one), with what was learnt from them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Matches<'a> {
    /// The first occurrence, the one a rewrite edits.
    pub first: Option<LenValue<'a>>,
    /// Further occurrences; empty unless the chain repeats its match.
    pub extra: Vec<&'a [u8]>,
    pub summary: MatchSummary<'a>,
    /// The first singular field found more than once, the match itself included.
    pub repeated: Option<&'static str>,
    seen_port: bool,
    seen_transport: bool,
    seen_source_type: bool,
}

impl<'a> Matches<'a> {
    fn repeated(&mut self, field: &'static str) {
        self.repeated.get_or_insert(field);
    }

    /// Reads one occurrence of the match. The error names the field at fault.
    pub fn read(&mut self, fcm: LenValue<'a>) -> Result<(), (&'static str, WireProblem)> {
        if self.first.is_none() {
            self.first = Some(fcm);
        } else {
            self.repeated("filter_chain_match");
            self.extra.push(fcm.bytes);
        }
        for field in FieldReader::new(fcm.bytes, 0) {
            let field = field.map_err(|p| ("filter_chain_match", p))?;
            self.read_field(field)?;
        }
        Ok(())
    }

    fn read_field(&mut self, field: Field<'a>) -> Result<(), (&'static str, WireProblem)> {
        let summary = &mut self.summary;
        match field.number {
            tag::DESTINATION_PORT => {
                let at = |p| ("filter_chain_match.destination_port", p);
                let wrapper = field.len().map_err(at)?;
                let previous = summary.destination_port.unwrap_or(0);
                let port = read_u32_wrapper(wrapper.bytes, previous).map_err(at)?;
                summary.destination_port = Some(port);
                if std::mem::replace(&mut self.seen_port, true) {
                    self.repeated("filter_chain_match.destination_port");
                }
            }
            tag::TRANSPORT_PROTOCOL => {
                let at = |p| ("filter_chain_match.transport_protocol", p);
                let value = field.len().map_err(at)?;
                // The two values Envoy knows need no UTF-8 check.
                summary.transport_protocol = match value.bytes {
                    b"tls" => "tls",
                    b"raw_buffer" => "raw_buffer",
                    _ => value.as_str().map_err(at)?,
                };
                if std::mem::replace(&mut self.seen_transport, true) {
                    self.repeated("filter_chain_match.transport_protocol");
                }
            }
            tag::APPLICATION_PROTOCOLS => {
                let at = |p| ("filter_chain_match.application_protocols", p);
                let value = field.len().map_err(at)?;
                let flag = AlpnFlags::of(value.bytes);
                if flag.is_empty() {
                    value.as_str().map_err(at)?;
                }
                summary.alpns.insert(flag);
            }
            tag::SOURCE_TYPE => {
                let at = |p| ("filter_chain_match.source_type", p);
                summary.source_type = field.enumeration().map_err(at)?;
                if std::mem::replace(&mut self.seen_source_type, true) {
                    self.repeated("filter_chain_match.source_type");
                }
            }
            tag::SERVER_NAMES => {
                let at = |p| ("filter_chain_match.server_names", p);
                field.str().map_err(at)?;
            }
            tag::SOURCE_PORTS => {
                let at = |p| ("filter_chain_match.source_ports", p);
                match field.value {
                    Value::Len(run) => PackedVarints::validate(run.bytes).map_err(at)?,
                    _ => {
                        field.varint().map_err(at)?;
                    }
                }
            }
            tag::PREFIX_RANGES => {
                let at = |p| ("filter_chain_match.prefix_ranges", p);
                validate_cidr(field.len().map_err(at)?.bytes).map_err(at)?;
            }
            tag::SOURCE_PREFIX_RANGES => {
                let at = |p| ("filter_chain_match.source_prefix_ranges", p);
                validate_cidr(field.len().map_err(at)?.bytes).map_err(at)?;
            }
            tag::DIRECT_SOURCE_PREFIX_RANGES => {
                let at = |p| ("filter_chain_match.direct_source_prefix_ranges", p);
                validate_cidr(field.len().map_err(at)?.bytes).map_err(at)?;
            }
            // Envoy refuses these (unimplemented); here they only need to be well-formed.
            tag::ADDRESS_SUFFIX => {
                let at = |p| ("filter_chain_match.address_suffix", p);
                field.str().map_err(at)?;
            }
            tag::SUFFIX_LEN => {
                let at = |p| ("filter_chain_match.suffix_len", p);
                field.len().map_err(at)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Every match payload, in wire order.
    fn payloads(&self) -> impl Iterator<Item = &'a [u8]> + Clone + '_ {
        let first = self.first.map(|m| m.bytes);
        first.into_iter().chain(self.extra.iter().copied())
    }

    /// Every occurrence of field `number`, already validated by [`Matches::read`].
    fn fields(&self, number: u32) -> impl Iterator<Item = Field<'a>> + Clone + '_ {
        self.payloads()
            .flat_map(|payload| FieldReader::new(payload, 0).filter_map(Result::ok))
            .filter(move |field| field.number == number)
    }

    /// The `application_protocols` values, in order.
    pub fn alpns(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.fields(tag::APPLICATION_PROTOCOLS)
            .filter_map(|field| field.str().ok())
    }

    /// The `server_names` values, in order.
    pub fn server_names(&self) -> impl Iterator<Item = &'a str> + Clone + '_ {
        self.fields(tag::SERVER_NAMES)
            .filter_map(|field| field.str().ok())
    }

    /// The payloads of one of the `CidrRange` lists.
    pub fn cidr_ranges(&self, list: CidrList) -> impl Iterator<Item = &'a [u8]> + Clone + '_ {
        self.fields(list.tag())
            .filter_map(|field| field.len().ok().map(|value| value.bytes))
    }

    /// The `source_ports` values, packed or not.
    pub fn source_ports(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.fields(tag::SOURCE_PORTS)
            .flat_map(|field| {
                let (single, packed) = match field.value {
                    Value::Varint(port) => (Some(port), &[][..]),
                    Value::Len(run) => (None, run.bytes),
                    _ => (None, &[][..]),
                };
                single.into_iter().chain(PackedVarints::new(packed))
            })
            // A uint32 keeps the low 32 bits of a longer varint, as protobuf parsers do.
            .map(|port| port as u32)
    }
}

/// Reads the fields of a `CidrRange`: address prefix and prefix length (0 when unset).
pub(crate) fn read_cidr(range: &[u8]) -> (&str, u32) {
    let mut address = "";
    let mut length = 0;
    for field in FieldReader::new(range, 0).filter_map(Result::ok) {
        match field.number {
            tag::CIDR_ADDRESS_PREFIX => address = field.str().unwrap_or(address),
            tag::CIDR_PREFIX_LEN => {
                if let Ok(wrapper) = field.len() {
                    length = read_u32_wrapper(wrapper.bytes, length).unwrap_or(length);
                }
            }
            _ => {}
        }
    }
    (address, length)
}

/// Reads a `google.protobuf.UInt32Value`, merging into `previous` as protobuf does (an empty
/// wrapper keeps the earlier value).
fn read_u32_wrapper(wrapper: &[u8], previous: u32) -> Result<u32, WireProblem> {
    let mut value = previous;
    for field in FieldReader::new(wrapper, 0) {
        let field = field?;
        if field.number == tag::WRAPPER_VALUE {
            // A uint32 keeps the low 32 bits of a longer varint, as protobuf parsers do.
            value = field.varint()? as u32;
        }
    }
    Ok(value)
}

fn validate_cidr(range: &[u8]) -> Result<(), WireProblem> {
    for field in FieldReader::new(range, 0) {
        let field = field?;
        match field.number {
            tag::CIDR_ADDRESS_PREFIX => {
                field.str()?;
            }
            tag::CIDR_PREFIX_LEN => {
                read_u32_wrapper(field.len()?.bytes, 0)?;
            }
            _ => {}
        }
    }
    Ok(())
}
