//! Lossless rewrite of a sidecar's inbound Listener: the standard ALPNs (`http/1.0`, `http/1.1`,
//! `h2`) are appended to the `application_protocols` of its mTLS HTTP filter chains, so that a
//! client with a mesh certificate but without a sidecar matches them.
//!
//! The listener is never decoded and re-encoded: the rewrite walks its wire bytes, appends the
//! new strings at the end of each chosen `filter_chain_match`, fixes the two enclosing length
//! prefixes and copies every other byte unchanged. Before anything is added, the listener is
//! checked the way Envoy will check it, so that no value makes two chains claim the same match.
//!
//! - `wire`: schema-free reading of protobuf fields, and the one-pass splice.
//! - `classify`: the listener's chains, read and recognised by structure.
//! - `matching`: a chain's `filter_chain_match`, read and validated.
//! - `collision`: Envoy's duplicate filter-chain-match rule.

mod classify;
mod collision;
mod matching;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::Serialize;

use self::classify::{ChainScan, Depth, Malformed};
use self::collision::PortIndex;
use self::matching::{AlpnFlags, CidrList};
use self::wire::{Patch, Replacement, SpliceProblem};
pub use self::wire::{WireProblem, WireType};

/// The ALPN values a rewrite adds, in the order it appends them. Never `h2c`: that is the
/// plaintext HTTP/2 value and has no place on a TLS chain.
pub const STANDARD_ALPNS: [&str; 3] = ["http/1.0", "http/1.1", "h2"];

/// Which mTLS HTTP chains get the standard ALPNs, by the chain's `destination_port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize)]
pub struct RewritePlan {
    /// Applies to chains without `destination_port` and to ports missing from `ports`.
    pub default: bool,
    /// Per destination port (the container port), overriding `default`.
    pub ports: BTreeMap<u32, bool>,
}

impl RewritePlan {
    /// Whether chains with this destination port get the standard ALPNs.
    pub fn adds(&self, port: Option<u32>) -> bool {
        port.and_then(|port| self.ports.get(&port).copied())
            .unwrap_or(self.default)
    }

    /// Whether the plan adds nothing to any chain.
    pub fn is_noop(&self) -> bool {
        !self.default && !self.ports.values().any(|adds| *adds)
    }
}

/// The result of [`rewrite_listener`]: the new bytes, if anything changed, and what was done to
/// each mTLS HTTP chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerRewrite {
    /// The listener's `name` (empty if it has none).
    pub name: String,
    /// The rewritten listener; `None` when no byte changed (the input is to be used as it is).
    #[serde(skip)]
    pub output: Option<Bytes>,
    /// Why the listener was not looked at, if it was not.
    pub skipped: Option<SkipReason>,
    /// Every mTLS HTTP chain of the listener, changed or not.
    pub chains: Vec<ChainChange>,
}

impl ListenerRewrite {
    /// Whether the rewrite changed the listener.
    pub fn changed(&self) -> bool {
        self.output.is_some()
    }

    fn skipped(name: String, reason: SkipReason) -> Self {
        ListenerRewrite {
            name,
            output: None,
            skipped: Some(reason),
            chains: Vec::new(),
        }
    }
}

/// Why a listener was left exactly as it is without looking at its chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum SkipReason {
    /// `traffic_direction` is not `INBOUND`.
    NotInbound,
    /// The listener selects chains with `filter_chain_matcher`, which this rewrite does not edit.
    UsesFilterChainMatcher,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::NotInbound => "traffic_direction is not INBOUND",
            SkipReason::UsesFilterChainMatcher => "the listener uses filter_chain_matcher",
        })
    }
}

/// Which of Istio's mTLS HTTP chain layouts a chain has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ChainKind {
    /// A declared HTTP port: `destination_port` set, ALPNs include `istio` (`allIstioMtlsALPNs`).
    DeclaredHttp,
    /// An undeclared port whose protocol Envoy sniffs: `destination_port` set, ALPNs
    /// `istio-http/1.0`, `istio-http/1.1`, `istio-h2` without `istio` (`mtlsHTTPALPNs`).
    Sniffed,
    /// A passthrough chain: no `destination_port`.
    Passthrough,
}

impl fmt::Display for ChainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainKind::DeclaredHttp => "declared HTTP port",
            ChainKind::Sniffed => "sniffed port",
            ChainKind::Passthrough => "passthrough",
        })
    }
}

/// What the rewrite did, or did not do, to one mTLS HTTP chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainChange {
    /// Position in the listener's `filter_chains`, from 0.
    pub index: usize,
    /// The chain's `name` (empty if it has none).
    pub name: String,
    /// The chain's `filter_chain_match.destination_port`.
    pub destination_port: Option<u32>,
    /// Which layout the chain has.
    pub kind: ChainKind,
    /// Whether the plan asked for standard ALPNs on this chain's port.
    pub planned: bool,
    /// The values appended, in order.
    pub added: AlpnSet,
    /// Standard values the chain already listed, so not added again.
    pub already_present: AlpnSet,
    /// Planned values left out because another chain claims them on the same match path.
    pub collisions: Vec<Collision>,
    /// Why the chain was left untouched although it looks like an mTLS HTTP chain: a field that
    /// should appear once appears several times, so its meaning is not certain.
    pub not_understood: Option<String>,
    /// The chain's match does not require `transport_protocol: tls` (listeners of the Istio 1.6
    /// era and before), so with an HTTP inspector on its port the added `http/1.0`/`http/1.1`
    /// also catch plaintext HTTP/1 connections that used to go to the plaintext chain.
    pub may_capture_plaintext: bool,
}

/// Some of the [`STANDARD_ALPNS`], always listed in that order (the order the rewrite appends
/// them in). Serialized as the list of the values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AlpnSet(u8);

impl AlpnSet {
    /// No value.
    pub const EMPTY: AlpnSet = AlpnSet(0);

    /// Every standard value.
    pub const ALL: AlpnSet = AlpnSet((1 << STANDARD_ALPNS.len()) - 1);

    /// The values, in the order of [`STANDARD_ALPNS`].
    pub fn iter(self) -> impl Iterator<Item = &'static str> + Clone {
        STANDARD_ALPNS
            .into_iter()
            .enumerate()
            .filter(move |(position, _)| self.0 & (1 << position) != 0)
            .map(|(_, value)| value)
    }

    /// Number of values.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether there is no value.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `value` is one of the values.
    pub fn contains(self, value: &str) -> bool {
        self.iter().any(|known| known == value)
    }

    /// Adds `STANDARD_ALPNS[position]`.
    fn insert(&mut self, position: usize) {
        self.0 |= 1 << position;
    }
}

/// The values separated by `", "`.
impl fmt::Display for AlpnSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, value) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(value)?;
        }
        Ok(())
    }
}

impl Serialize for AlpnSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// A planned ALPN value that was not added because of another chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Collision {
    /// The value left out.
    pub alpn: String,
    /// The chain that already claims it (as listed, or as added earlier by this rewrite).
    pub other_index: usize,
    /// That chain's name.
    pub other_name: String,
}

/// What a chain is, decided by its structure (transport socket, filters, match), never its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ChainClass {
    /// TLS transport socket, HTTP connection manager and an Istio mTLS HTTP ALPN: the chains
    /// the rewrite adds to.
    MtlsHttp(ChainKind),
    /// TLS transport socket and an Istio ALPN, without an HTTP connection manager.
    MtlsTcp,
    /// TLS transport socket without Istio ALPNs (STRICT chains, for instance).
    OtherTls,
    /// No TLS transport socket but `transport_protocol: tls`: the application's own TLS,
    /// passed through.
    TlsPassthrough,
    /// No TLS transport socket.
    Plaintext,
    /// A field that should appear once appears several times; see [`ChainInfo::repeated_field`].
    NotUnderstood,
}

/// One filter chain as [`inspect_listener`] sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainInfo {
    /// Position in the listener's `filter_chains`, from 0.
    pub index: usize,
    /// The chain's `name` (empty if it has none).
    pub name: String,
    /// `filter_chain_match.destination_port`.
    pub destination_port: Option<u32>,
    /// `filter_chain_match.transport_protocol` (empty if unset).
    pub transport_protocol: String,
    /// `filter_chain_match.application_protocols`, in order.
    pub alpns: Vec<String>,
    /// `filter_chain_match.prefix_ranges`, normalised as Envoy keys them (`10.0.0.0/8`).
    pub prefix_ranges: Vec<String>,
    /// `filter_chain_match.server_names`.
    pub server_names: Vec<String>,
    /// The chain terminates TLS (a `DownstreamTlsContext` transport socket).
    pub has_tls: bool,
    /// The chain runs an HTTP connection manager.
    pub has_hcm: bool,
    /// What the chain is.
    pub kind: ChainClass,
    /// The first field found more than once although it should appear once, if any.
    pub repeated_field: Option<String>,
}

/// Why a listener could not be rewritten or inspected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The listener bytes are not valid protobuf where the rewrite reads them.
    #[error("malformed listener {}: {field}: {problem}", place(.listener, .chain))]
    Malformed {
        /// The listener's name, if it could be read before the problem.
        listener: Option<String>,
        /// The index of the filter chain holding the problem, if it is inside one.
        chain: Option<usize>,
        /// The field at fault, as a path (`filter_chain_match.destination_port`).
        field: &'static str,
        /// What is wrong with its bytes.
        problem: WireProblem,
    },
    /// The rewritten listener could not be assembled.
    #[error("listener {listener:?}: cannot assemble the rewritten listener: {reason}")]
    Assembly {
        /// The listener's name.
        listener: String,
        /// What went wrong.
        reason: &'static str,
    },
}

fn place(listener: &Option<String>, chain: &Option<usize>) -> String {
    let listener = match listener {
        Some(name) => format!("{name:?}"),
        None => "(name not read)".to_string(),
    };
    match chain {
        Some(index) => format!("{listener}, filter chain {index}"),
        None => listener,
    }
}

impl RewriteError {
    fn malformed(listener: Option<&str>, at: Malformed) -> Self {
        RewriteError::Malformed {
            listener: listener.map(str::to_owned),
            chain: at.chain,
            field: at.field,
            problem: at.problem,
        }
    }
}

/// Appends the standard ALPNs to the mTLS HTTP chains of `listener` (the wire bytes of an
/// `envoy.config.listener.v3.Listener`) whose port the plan selects.
///
/// Only `INBOUND` listeners without `filter_chain_matcher` are looked at. The output differs
/// from the input only in the appended strings and the length prefixes of the edited
/// `filter_chain_match` and `FilterChain` fields. The same input and plan always give the same
/// bytes, and rewriting an output again changes nothing.
pub fn rewrite_listener(
    listener: &[u8],
    plan: &RewritePlan,
) -> Result<ListenerRewrite, RewriteError> {
    let scan = classify::scan_listener(listener)
        .map_err(|(name, at)| RewriteError::malformed(name, at))?;
    let name = scan.name.unwrap_or_default().to_owned();
    if !scan.inbound {
        return Ok(ListenerRewrite::skipped(name, SkipReason::NotInbound));
    }
    if scan.has_matcher {
        return Ok(ListenerRewrite::skipped(
            name,
            SkipReason::UsesFilterChainMatcher,
        ));
    }
    let chains = scan_chains(&scan, Depth::Candidates)?;

    // Decide chain by chain, in listener order: a value added to an earlier chain counts
    // against later ones, which keeps the outcome independent of anything but the bytes.
    let index = PortIndex::new(&chains);
    let mut adding = vec![AlpnFlags::NONE; chains.len()];
    let reported = chains.iter().filter(|c| c.mtls_http_kind().is_some());
    let mut reports = Vec::with_capacity(reported.count());
    for chain in &chains {
        if let Some(report) = plan_chain(chain, plan, &chains, &index, &mut adding) {
            reports.push(report);
        }
    }

    let output = splice_additions(listener, &chains, &adding).map_err(|problem| {
        let reason = match problem {
            SpliceProblem::BadPatch => "edits out of order",
            SpliceProblem::TooLarge => "the result does not fit in memory",
        };
        RewriteError::Assembly {
            listener: name.clone(),
            reason,
        }
    })?;
    Ok(ListenerRewrite {
        name,
        output,
        skipped: None,
        chains: reports,
    })
}

/// Classifies every filter chain of `listener`, whatever its traffic direction, for `explain`
/// and the debug endpoints.
pub fn inspect_listener(listener: &[u8]) -> Result<Vec<ChainInfo>, RewriteError> {
    let scan = classify::scan_listener(listener)
        .map_err(|(name, at)| RewriteError::malformed(name, at))?;
    let chains = scan_chains(&scan, Depth::Full)?;
    Ok(chains.iter().map(chain_info).collect())
}

fn scan_chains<'a>(
    scan: &classify::ListenerScan<'a>,
    depth: Depth,
) -> Result<Vec<ChainScan<'a>>, RewriteError> {
    let mut chains: Vec<ChainScan<'a>> = Vec::with_capacity(scan.chains.len());
    for (index, chain) in scan.chains.iter().enumerate() {
        chains.push(ChainScan::new(index, *chain));
        if let Some(slot) = chains.last_mut() {
            classify::read_chain(slot, depth)
                .map_err(|at| RewriteError::malformed(scan.name, at))?;
        }
    }
    Ok(chains)
}

/// Decides which standard values an mTLS HTTP chain gets, recording them in `adding`.
/// Returns `None` for chains of any other class.
fn plan_chain(
    chain: &ChainScan<'_>,
    plan: &RewritePlan,
    chains: &[ChainScan<'_>],
    index: &PortIndex,
    adding: &mut [AlpnFlags],
) -> Option<ChainChange> {
    let kind = chain.mtls_http_kind()?;
    let mut report = ChainChange {
        index: chain.index,
        name: chain.name.to_owned(),
        destination_port: chain.matches.summary.destination_port,
        kind,
        planned: plan.adds(chain.matches.summary.destination_port),
        added: AlpnSet::EMPTY,
        already_present: AlpnSet::EMPTY,
        collisions: Vec::new(),
        not_understood: chain
            .repeated_singular
            .map(|field| format!("{field} appears more than once")),
        may_capture_plaintext: false,
    };

    for (position, value) in STANDARD_ALPNS.into_iter().enumerate() {
        let flag = AlpnFlags::standard(position);
        if chain.matches.summary.alpns.contains(flag) {
            report.already_present.insert(position);
            continue;
        }
        if !report.planned || report.not_understood.is_some() {
            continue;
        }
        match collision::first_collision(chains, index, adding, chain.index, flag) {
            Some(other) => report.collisions.push(Collision {
                alpn: value.to_owned(),
                other_index: other,
                other_name: chains.get(other).map_or("", |c| c.name).to_owned(),
            }),
            None => {
                if let Some(slot) = adding.get_mut(chain.index) {
                    slot.insert(flag);
                }
                report.added.insert(position);
            }
        }
    }

    let adds_http1 = report.added.iter().any(|value| value.starts_with("http/1"));
    report.may_capture_plaintext = adds_http1 && chain.matches.summary.transport_protocol != "tls";
    Some(report)
}

/// Builds the output in one buffer: for each chain that gains values, the chain's and its
/// match's length prefixes are replaced and the new strings are inserted at the end of the
/// match. `None` when nothing is added.
fn splice_additions(
    listener: &[u8],
    chains: &[ChainScan<'_>],
    adding: &[AlpnFlags],
) -> Result<Option<Bytes>, SpliceProblem> {
    let changed = adding.iter().filter(|flags| !flags.is_empty()).count();
    if changed == 0 {
        return Ok(None);
    }

    let mut patches = Vec::with_capacity(changed * (2 + STANDARD_ALPNS.len()));
    for (chain, add) in chains.iter().zip(adding) {
        if add.is_empty() {
            continue;
        }
        // Chains gain values only when they were understood, so they have exactly one match.
        let Some(fcm) = chain.matches.first else {
            continue;
        };
        let values = STANDARD_ALPNS
            .into_iter()
            .enumerate()
            .filter(|(position, _)| add.contains(AlpnFlags::standard(*position)))
            .map(|(_, value)| value);
        let inserted: usize = values
            .clone()
            .map(|value| wire::string_field_len(matching::tag::APPLICATION_PROTOCOLS, value))
            .sum();

        let match_len = fcm.bytes.len().checked_add(inserted);
        let match_len = match_len.ok_or(SpliceProblem::TooLarge)?;
        let chain_len = chain
            .chain
            .bytes
            .len()
            .checked_sub(fcm.prefix().len())
            .and_then(|len| len.checked_add(wire::varint_len(match_len as u64)))
            .and_then(|len| len.checked_add(inserted))
            .ok_or(SpliceProblem::TooLarge)?;

        patches.push(Patch {
            start: chain.chain.prefix_start,
            end: chain.chain.payload_start,
            with: Replacement::Varint(chain_len as u64),
        });
        patches.push(Patch {
            start: fcm.prefix_start,
            end: fcm.payload_start,
            with: Replacement::Varint(match_len as u64),
        });
        let end = fcm.payload().end;
        for value in values {
            patches.push(Patch {
                start: end,
                end,
                with: Replacement::StringField {
                    number: matching::tag::APPLICATION_PROTOCOLS,
                    value,
                },
            });
        }
    }
    wire::splice(listener, &patches).map(|bytes| Some(Bytes::from(bytes)))
}

fn chain_info(chain: &ChainScan<'_>) -> ChainInfo {
    ChainInfo {
        index: chain.index,
        name: chain.name.to_owned(),
        destination_port: chain.matches.summary.destination_port,
        transport_protocol: chain.matches.summary.transport_protocol.to_owned(),
        alpns: chain.matches.alpns().map(str::to_owned).collect(),
        prefix_ranges: chain
            .matches
            .cidr_ranges(CidrList::Destination)
            .map(collision::cidr_text)
            .collect(),
        server_names: chain.matches.server_names().map(str::to_owned).collect(),
        has_tls: chain.has_tls,
        has_hcm: chain.has_hcm,
        kind: chain.class(),
        repeated_field: chain.repeated_singular.map(str::to_owned),
    }
}
