//! The explanation as data, and the format of `--output json`: [`Explanation`] is printed as it
//! is, so its fields, their names and their meaning are the documented interface.

use serde::Serialize;

use super::input::WorkloadInfo;
use crate::policy::{EffectivePolicy, MtlsMode, PolicyError};
use crate::rewrite::{ChainChange, SkipReason};

/// The version of the JSON format; it changes only when a field is removed or changes meaning.
pub const FORMAT_VERSION: u32 = 1;

/// Everything `explain` found, in the order a reader needs it.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// What the relay would do, in one sentence.
    pub decision: Decision,
    /// The workload the policy was resolved for.
    pub workload: WorkloadInfo,
    /// Where the policies came from, and the documents that could not be used.
    pub policies: PoliciesRead,
    /// The resolved policy: modes with the policies that decided them, the annotation decision
    /// with its reason, and every report about the policies involved.
    pub policy: EffectivePolicy,
    /// Mode and verdict for chains without a destination port (`port: null`), for every port
    /// `portLevelMtls` names, and for every destination port of an mTLS HTTP chain in the dump.
    pub ports: Vec<PortExplanation>,
    /// The dump and how many of its listeners were looked at.
    pub dump: DumpSummary,
    /// Every listener of the dump, in document order.
    pub listeners: Vec<ListenerExplanation>,
    /// What an HTTP/1.0 client gets; present when some chain gains `http/1.0`.
    pub http10: Option<Http10Note>,
    /// What a reader must not miss.
    pub warnings: Vec<Warning>,
}

impl Explanation {
    /// The explanation as pretty-printed JSON, with a final newline.
    pub fn to_json(&self) -> String {
        // Only strings, numbers, booleans and maps with string or integer keys: cannot fail.
        let mut json = serde_json::to_string_pretty(self).unwrap_or_default();
        json.push('\n');
        json
    }
}

/// What the relay would do for this workload and dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The relay would change at least one listener.
    pub rewrites: bool,
    /// How many filter chains would gain standard ALPNs.
    pub chains_changed: usize,
    /// The decision and its main reason, in one sentence.
    pub summary: String,
}

/// The policy input.
#[derive(Debug, Clone, Serialize)]
pub struct PoliciesRead {
    /// `--policy-dir` as given.
    pub path: String,
    /// Istio's root namespace used for resolution.
    pub root_namespace: String,
    /// How many PeerAuthentication objects were loaded.
    pub loaded: usize,
    /// Documents that could not be read; the relay skips them too.
    pub errors: Vec<PolicyError>,
}

/// The mode of one port and whether its mTLS HTTP chains get the standard ALPNs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortExplanation {
    /// The destination port; `null` for chains without one and for any port not listed.
    pub port: Option<u32>,
    /// Its mTLS mode, never UNSET.
    pub mode: MtlsMode,
    /// `portLevelMtls` of the workload policy names this port.
    pub port_level: bool,
    /// Which policy decided the mode, and how.
    pub mode_reason: String,
    /// Its mTLS HTTP chains get `http/1.0`, `http/1.1` and `h2`.
    pub add: bool,
    /// Why, naming the deciding policies.
    pub reason: String,
}

/// The dump input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DumpSummary {
    /// `--listeners` as given.
    pub path: String,
    /// Listeners in the dump, readable or not.
    pub listeners: usize,
    /// Listeners looked at (`traffic_direction: INBOUND`).
    pub inbound: usize,
    /// Listeners skipped because they are not inbound.
    pub not_inbound: usize,
    /// Listeners that could not be read.
    pub unreadable: usize,
}

/// One listener of the dump.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerExplanation {
    /// The listener's name (empty when it could not be read).
    pub name: String,
    /// The version Envoy recorded for it (config dumps only).
    pub version_info: Option<String>,
    /// Why it could not be read, when it could not; nothing else is filled in then.
    pub error: Option<String>,
    /// Why the relay leaves it as it is without looking at its chains, if it does:
    /// `NotInbound` or `UsesFilterChainMatcher`.
    pub skipped: Option<SkipReason>,
    /// How many filter chains it has.
    pub filter_chains: usize,
    /// Its chains by what they are.
    pub chain_classes: ChainClassCounts,
    /// Every mTLS HTTP chain, changed or not, in listener order.
    pub chains: Vec<ExplainedChain>,
    /// What the dump conversion could not carry (Istio-only payloads kept opaque, v2 names
    /// mapped, fields left out); empty for listeners that are not inbound.
    pub notes: Vec<String>,
}

/// How many chains of a listener are of each class (see [`ChainClass`](crate::rewrite::ChainClass)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChainClassCounts {
    /// TLS, HTTP connection manager and an Istio mTLS ALPN: the chains the relay adds to.
    pub mtls_http: usize,
    /// TLS and an Istio ALPN without an HTTP connection manager.
    pub mtls_tcp: usize,
    /// TLS without Istio ALPNs (STRICT chains, for instance).
    pub other_tls: usize,
    /// The application's own TLS, passed through.
    pub tls_passthrough: usize,
    /// No TLS.
    pub plaintext: usize,
    /// A field that should appear once appears several times.
    pub not_understood: usize,
}

/// One mTLS HTTP chain: what the rewrite does to it (the fields of [`ChainChange`]) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExplainedChain {
    /// The rewrite's report on the chain.
    #[serde(flatten)]
    pub change: ChainChange,
    /// It gains at least one value.
    pub changed: bool,
    /// The mTLS mode of its port.
    pub mode: MtlsMode,
    /// Why it changes or does not.
    pub reason: String,
}

/// What an HTTP/1.0 client meets on a chain that gained `http/1.0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Http10Note {
    /// Whether the chains' HTTP connection managers accept HTTP/1.0.
    pub state: Http10State,
    /// The explanation.
    pub message: String,
}

/// Whether HTTP/1.0 is served on the chains that gained `http/1.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Http10State {
    /// The dump's HTTP connection managers accept HTTP/1.0, or the node metadata sets `HTTP10=1`.
    On,
    /// The dump's HTTP connection managers do not accept HTTP/1.0: such clients get 426.
    Off,
    /// The dump does not show it: it depends on Istio's setting.
    Unknown,
}

/// Something a reader must not miss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// What kind of warning.
    pub kind: WarningKind,
    /// The listener it is about, if any.
    pub listener: Option<String>,
    /// The chain it is about (index in `filter_chains`), if any.
    pub chain: Option<usize>,
    /// A sentence for people.
    pub message: String,
}

/// The kinds of [`Warning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// A sniffed-port or passthrough chain gains values: an application's own TLS on that port,
    /// reached by a client offering `h2` or `http/1.1`, now meets the sidecar's TLS.
    ApplicationTls,
    /// A chain whose match does not require `transport_protocol: tls` gains `http/1.x`, which may
    /// catch plaintext HTTP/1 connections.
    MayCapturePlaintext,
    /// A planned value is not added because another chain claims it on the same match.
    Collision,
    /// An mTLS HTTP chain is left untouched because a field appears more than once.
    NotUnderstood,
    /// A listener of the dump could not be read.
    UnreadableListener,
    /// An inbound listener uses `filter_chain_matcher` and is left as it is.
    FilterChainMatcher,
    /// The dump has no inbound listener.
    NoInboundListener,
    /// A policy document could not be read.
    PolicyNotLoaded,
}
