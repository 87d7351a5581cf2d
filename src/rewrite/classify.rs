//! Reading a listener's filter chains from the wire and recognising them by structure.
//!
//! A chain is described by what it does: the transport socket it terminates TLS with, the
//! network filters it runs and the `filter_chain_match` it is selected by. Chain names are only
//! carried along for reports; Istio's names differ between versions and prove nothing.
//!
//! Only the fields needed for that are walked; everything else, the `typed_config` payloads
//! included, is skipped by its length. The rewrite reads the filters and transport socket only
//! of chains whose match could make them mTLS HTTP chains (see [`Depth`]), in the same walk as
//! the match whenever the match comes first, as Envoy's encoders write it.
//!
//! Known shortcoming: this walk is most of a rewrite's cost, which comes to 5 to 10 times a
//! plain copy of the listener (`BENCHMARKS.md`), where 3 times was the aim. Each candidate chain
//! costs some 30 field reads; getting well below that needs a reader of another design. The
//! relay's cache pays it once per workload and policy.

use super::matching::{AlpnFlags, Matches};
use super::wire::{FieldReader, LenValue, Value, WireProblem};
use super::{ChainClass, ChainKind};

/// `envoy.config.core.v3.TrafficDirection.INBOUND`.
const INBOUND: i32 = 1;

/// Field numbers of the messages the scan reads (envoy.config.listener.v3 and friends).
mod tag {
    pub const LISTENER_NAME: u32 = 1;
    pub const LISTENER_FILTER_CHAINS: u32 = 3;
    pub const LISTENER_TRAFFIC_DIRECTION: u32 = 16;
    pub const LISTENER_FILTER_CHAIN_MATCHER: u32 = 32;

    pub const CHAIN_MATCH: u32 = 1;
    pub const CHAIN_FILTERS: u32 = 3;
    pub const CHAIN_TRANSPORT_SOCKET: u32 = 6;
    pub const CHAIN_NAME: u32 = 7;

    pub const SOCKET_NAME: u32 = 1;
    pub const SOCKET_TYPED_CONFIG: u32 = 3;

    pub const FILTER_NAME: u32 = 1;
    pub const FILTER_TYPED_CONFIG: u32 = 4;

    pub const ANY_TYPE_URL: u32 = 1;
    pub const ANY_VALUE: u32 = 2;

    /// `type_url` of `xds.type.v3.TypedStruct` and `udpa.type.v1.TypedStruct`.
    pub const TYPED_STRUCT_TYPE_URL: u32 = 1;
}

/// Type names (the part of a type URL after the last `/`) and extension names recognised.
mod names {
    pub const DOWNSTREAM_TLS: [&str; 2] = [
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "envoy.api.v2.auth.DownstreamTlsContext",
    ];
    pub const TLS_SOCKET: [&str; 2] = ["envoy.transport_sockets.tls", "tls"];
    pub const HCM: [&str; 2] = [
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager",
    ];
    pub const HCM_FILTER: [&str; 2] = [
        "envoy.filters.network.http_connection_manager",
        "envoy.http_connection_manager",
    ];
    pub const TYPED_STRUCT: [&str; 2] = ["xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"];
}

/// A problem in the listener bytes: the chain it is in (if any), the field, and what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Malformed {
    pub chain: Option<usize>,
    pub field: &'static str,
    pub problem: WireProblem,
}

/// The top level of a listener: what decides whether it is looked at, and its chains.
#[derive(Debug)]
pub(crate) struct ListenerScan<'a> {
    pub name: Option<&'a str>,
    pub inbound: bool,
    pub has_matcher: bool,
    pub chains: Vec<LenValue<'a>>,
}

/// Walks the top-level fields of a Listener. On failure, also returns the name if it was read
/// before the problem.
pub(crate) fn scan_listener(bytes: &[u8]) -> Result<ListenerScan<'_>, (Option<&str>, Malformed)> {
    let mut scan = ListenerScan {
        name: None,
        inbound: false,
        has_matcher: false,
        // Sidecar inbound listeners have tens of chains: this spares the first regrowths.
        chains: Vec::with_capacity(64),
    };
    match read_listener(bytes, &mut scan) {
        Ok(()) => Ok(scan),
        Err(at) => Err((scan.name, at)),
    }
}

fn read_listener<'a>(bytes: &'a [u8], scan: &mut ListenerScan<'a>) -> Result<(), Malformed> {
    let at = |field: &'static str| {
        move |problem| Malformed {
            chain: None,
            field,
            problem,
        }
    };
    let mut fields = FieldReader::new(bytes, 0);
    while let Some(field) = fields.next() {
        let field = field.map_err(|problem| match fields.failed_field() {
            // Name the chain whose bytes are cut short, not just the listener.
            Some(tag::LISTENER_FILTER_CHAINS) => Malformed {
                chain: Some(scan.chains.len()),
                field: "filter chain",
                problem,
            },
            _ => at("listener")(problem),
        })?;
        // A repeated singular field follows protobuf's rule, last one wins, as Envoy reads it.
        match field.number {
            tag::LISTENER_NAME => scan.name = Some(field.str().map_err(at("name"))?),
            tag::LISTENER_FILTER_CHAINS => {
                scan.chains.push(field.len().map_err(at("filter_chains"))?)
            }
            tag::LISTENER_TRAFFIC_DIRECTION => {
                let direction = field.enumeration().map_err(at("traffic_direction"))?;
                scan.inbound = direction == INBOUND;
            }
            tag::LISTENER_FILTER_CHAIN_MATCHER => {
                field.len().map_err(at("filter_chain_matcher"))?;
                scan.has_matcher = true;
            }
            _ => {}
        }
    }
    Ok(())
}

/// One filter chain as read from the wire.
#[derive(Clone, Debug)]
pub(crate) struct ChainScan<'a> {
    pub index: usize,
    /// The chain field itself, within the listener.
    pub chain: LenValue<'a>,
    pub name: &'a str,
    pub matches: Matches<'a>,
    pub has_tls: bool,
    pub has_hcm: bool,
    /// A singular field seen more than once: the chain is reported but never edited.
    pub repeated_singular: Option<&'static str>,
}

impl ChainScan<'_> {
    /// The class of the chain, decided by its structure alone.
    pub fn class(&self) -> ChainClass {
        if self.repeated_singular.is_some() {
            return ChainClass::NotUnderstood;
        }
        match self.mtls_http_kind() {
            Some(kind) => ChainClass::MtlsHttp(kind),
            None if !self.has_tls && self.matches.summary.transport_protocol == "tls" => {
                ChainClass::TlsPassthrough
            }
            None if !self.has_tls => ChainClass::Plaintext,
            None if self.istio_alpn() && !self.has_hcm => ChainClass::MtlsTcp,
            None => ChainClass::OtherTls,
        }
    }

    /// The kind of mTLS HTTP chain this is, if it is one: TLS transport socket, HTTP connection
    /// manager, and an Istio mTLS HTTP ALPN in its match. Ignores `repeated_singular`.
    pub fn mtls_http_kind(&self) -> Option<ChainKind> {
        if !(self.has_tls
            && self.has_hcm
            && self.matches.summary.alpns.intersects(AlpnFlags::ISTIO_HTTP))
        {
            return None;
        }
        Some(match self.matches.summary.destination_port {
            None => ChainKind::Passthrough,
            Some(_) if self.matches.summary.alpns.contains(AlpnFlags::ISTIO) => {
                ChainKind::DeclaredHttp
            }
            Some(_) => ChainKind::Sniffed,
        })
    }

    fn istio_alpn(&self) -> bool {
        self.matches.summary.alpns.intersects(AlpnFlags::ANY_ISTIO)
    }
}

/// Accumulates one chain while its fields are walked.
struct ChainReader<'s, 'a> {
    scan: &'s mut ChainScan<'a>,
    /// Read the filters and transport socket of every chain, not only of candidates.
    full: bool,
    seen_socket: bool,
    seen_name: bool,
    /// The first singular field repeated inside the filters or the transport socket. Kept
    /// apart from the chain's own fields, which are reported first.
    inner_repeated: Option<&'static str>,
    /// The first problem inside the filters or the transport socket. Reported only once the
    /// whole chain is known to be well framed, as a problem in its own fields comes first.
    inner_problem: Option<(&'static str, WireProblem)>,
    /// A filter or transport socket came before the chain was known to be a candidate.
    deferred: bool,
}

/// The two parts of a chain that are read only for candidates.
#[derive(Clone, Copy)]
enum Inner {
    Filter,
    Socket,
}

impl<'a> ChainReader<'_, 'a> {
    fn repeated(&mut self, field: &'static str) {
        self.inner_repeated.get_or_insert(field);
    }

    /// Whether the filters and transport socket are to be read. The ALPN flags only grow as
    /// the chain is walked, so a chain that is a candidate stays one.
    fn reads_inner(&self) -> bool {
        self.full
            || self
                .scan
                .matches
                .summary
                .alpns
                .intersects(AlpnFlags::ISTIO_HTTP)
    }

    /// Reads a filter or the transport socket as its field is met in the chain's walk, when the
    /// chain is already known to need it; otherwise leaves it for [`ChainReader::read_inner`].
    fn inline(&mut self, part: Inner, bytes: &[u8]) {
        if self.inner_problem.is_some() || self.deferred {
            return;
        }
        if !self.reads_inner() {
            self.deferred = true;
            return;
        }
        if let Err(problem) = self.read_part(part, bytes) {
            self.inner_problem = Some(problem);
        }
    }

    fn read_part(&mut self, part: Inner, bytes: &[u8]) -> Result<(), (&'static str, WireProblem)> {
        match part {
            Inner::Filter => self.scan.has_hcm |= self.read_filter(bytes)?,
            Inner::Socket => self.scan.has_tls = self.read_socket(bytes)?,
        }
        Ok(())
    }

    /// Reads the filters and transport socket in wire order, from scratch. Only for chains
    /// whose match came after one of them, which Envoy's own encoders never write.
    fn read_inner(&mut self, chain: LenValue<'a>) -> Result<(), (&'static str, WireProblem)> {
        self.scan.has_tls = false;
        self.scan.has_hcm = false;
        self.inner_repeated = None;
        // The chain's walk checked the framing and wire types of these fields.
        for field in chain.fields().filter_map(Result::ok) {
            let Value::Len(value) = field.value else {
                continue;
            };
            match field.number {
                tag::CHAIN_FILTERS => self.read_part(Inner::Filter, value.bytes)?,
                tag::CHAIN_TRANSPORT_SOCKET => self.read_part(Inner::Socket, value.bytes)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn read_socket(&mut self, socket: &[u8]) -> Result<bool, (&'static str, WireProblem)> {
        let mut name: &[u8] = &[];
        let mut type_url = None;
        let mut seen = (false, false);
        for field in FieldReader::new(socket, 0) {
            let field = field.map_err(|p| ("transport_socket", p))?;
            match field.number {
                tag::SOCKET_NAME => {
                    name = field.len().map_err(|p| ("transport_socket.name", p))?.bytes;
                    if std::mem::replace(&mut seen.0, true) {
                        self.repeated("transport_socket.name");
                    }
                }
                tag::SOCKET_TYPED_CONFIG => {
                    let at = |p| ("transport_socket.typed_config", p);
                    let any = field.len().map_err(at)?;
                    type_url = Some(self.any_type_url(any.bytes).map_err(at)?);
                    if std::mem::replace(&mut seen.1, true) {
                        self.repeated("transport_socket.typed_config");
                    }
                }
                _ => {}
            }
        }
        Ok(is_extension(
            type_url,
            name,
            &names::DOWNSTREAM_TLS,
            &names::TLS_SOCKET,
        ))
    }

    fn read_filter(&mut self, filter: &[u8]) -> Result<bool, (&'static str, WireProblem)> {
        let mut name: &[u8] = &[];
        let mut type_url = None;
        let mut seen = (false, false);
        for field in FieldReader::new(filter, 0) {
            let field = field.map_err(|p| ("filters", p))?;
            match field.number {
                tag::FILTER_NAME => {
                    name = field.len().map_err(|p| ("filters.name", p))?.bytes;
                    if std::mem::replace(&mut seen.0, true) {
                        self.repeated("filters.name");
                    }
                }
                tag::FILTER_TYPED_CONFIG => {
                    let at = |p| ("filters.typed_config", p);
                    let any = field.len().map_err(at)?;
                    type_url = Some(self.any_type_url(any.bytes).map_err(at)?);
                    if std::mem::replace(&mut seen.1, true) {
                        self.repeated("filters.typed_config");
                    }
                }
                _ => {}
            }
        }
        Ok(is_extension(
            type_url,
            name,
            &names::HCM,
            &names::HCM_FILTER,
        ))
    }

    /// The type URL an `Any` configures: its own, or for a `TypedStruct` the one inside.
    /// Left as bytes: it is only compared with ASCII names, which invalid UTF-8 never equals.
    fn any_type_url<'b>(&mut self, any: &'b [u8]) -> Result<&'b [u8], WireProblem> {
        let mut type_url: &[u8] = &[];
        let mut value: &[u8] = &[];
        let mut seen = false;
        for field in FieldReader::new(any, 0) {
            let field = field?;
            match field.number {
                tag::ANY_TYPE_URL => {
                    type_url = field.len()?.bytes;
                    if std::mem::replace(&mut seen, true) {
                        self.repeated("typed_config.type_url");
                    }
                }
                tag::ANY_VALUE => value = field.len()?.bytes,
                _ => {}
            }
        }
        if !names_type(type_url, &names::TYPED_STRUCT) {
            return Ok(type_url);
        }
        let mut inner: &[u8] = &[];
        for field in FieldReader::new(value, 0) {
            let field = field?;
            if field.number == tag::TYPED_STRUCT_TYPE_URL {
                inner = field.len()?.bytes;
            }
        }
        Ok(inner)
    }
}

/// Whether a type URL names one of `types`: the part after its last `/` is one of them.
fn names_type(type_url: &[u8], types: &[&str]) -> bool {
    types.iter().any(|name| {
        type_url
            .strip_suffix(name.as_bytes())
            .is_some_and(|host| host.is_empty() || host.ends_with(b"/"))
    })
}

/// Whether an extension is one of `types` by the type URL of its typed config or, without a
/// typed config (or with an empty type URL), one of `names` by its name. This is the order in
/// which Envoy looks up the factory.
fn is_extension(type_url: Option<&[u8]>, name: &[u8], types: &[&str], names: &[&str]) -> bool {
    match type_url {
        Some(type_url) if !type_url.is_empty() => names_type(type_url, types),
        _ => names.iter().any(|known| known.as_bytes() == name),
    }
}

/// How much of each chain to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Depth {
    /// Filters and transport socket of every chain, for a full classification.
    Full,
    /// Filters and transport socket only of chains whose match lists an Istio mTLS HTTP ALPN,
    /// the only ones that can be mTLS HTTP chains; for the others the match is enough.
    Candidates,
}

impl<'a> ChainScan<'a> {
    /// A chain not read yet.
    pub fn new(index: usize, chain: LenValue<'a>) -> Self {
        ChainScan {
            index,
            chain,
            name: "",
            matches: Matches::default(),
            has_tls: false,
            has_hcm: false,
            repeated_singular: None,
        }
    }
}

/// Reads one filter chain: its match and, as `depth` asks, its TLS socket and its HTTP
/// connection manager.
#[cfg(test)]
pub(crate) fn scan_chain(
    index: usize,
    chain: LenValue<'_>,
    depth: Depth,
) -> Result<ChainScan<'_>, Malformed> {
    let mut scan = ChainScan::new(index, chain);
    read_chain(&mut scan, depth)?;
    Ok(scan)
}

/// Reads the chain of a [`ChainScan::new`] in one walk, filling it in where it lies (a
/// `ChainScan` is large, and chains are many).
pub(crate) fn read_chain(scan: &mut ChainScan<'_>, depth: Depth) -> Result<(), Malformed> {
    let (index, chain) = (scan.index, scan.chain);
    let mut reader = ChainReader {
        scan,
        full: depth == Depth::Full,
        seen_socket: false,
        seen_name: false,
        inner_repeated: None,
        inner_problem: None,
        deferred: false,
    };
    let at = |(field, problem)| Malformed {
        chain: Some(index),
        field,
        problem,
    };
    for field in chain.fields() {
        let field = field.map_err(|p| at(("filter chain", p)))?;
        match field.number {
            tag::CHAIN_MATCH => {
                let fcm = field.len().map_err(|p| at(("filter_chain_match", p)))?;
                reader.scan.matches.read(fcm).map_err(at)?;
            }
            tag::CHAIN_FILTERS => {
                let filter = field.len().map_err(|p| at(("filters", p)))?;
                reader.inline(Inner::Filter, filter.bytes);
            }
            tag::CHAIN_TRANSPORT_SOCKET => {
                let socket = field.len().map_err(|p| at(("transport_socket", p)))?;
                if std::mem::replace(&mut reader.seen_socket, true) {
                    reader
                        .scan
                        .repeated_singular
                        .get_or_insert("transport_socket");
                }
                reader.inline(Inner::Socket, socket.bytes);
            }
            tag::CHAIN_NAME => {
                reader.scan.name = field.str().map_err(|p| at(("name", p)))?;
                if std::mem::replace(&mut reader.seen_name, true) {
                    reader.scan.repeated_singular.get_or_insert("name");
                }
            }
            _ => {}
        }
    }

    if let Some(problem) = reader.inner_problem {
        return Err(at(problem));
    }
    if reader.deferred && reader.reads_inner() {
        reader.read_inner(chain).map_err(at)?;
    }

    let scan = reader.scan;
    scan.repeated_singular = scan
        .repeated_singular
        .or(reader.inner_repeated)
        .or(scan.matches.repeated);
    Ok(())
}
