//! Building the explanation: the workload's policy resolved as the relay resolves it, the
//! relay's own rewrite of every listener of the dump under the same plan, and the warnings a
//! reader must see.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use prost::{Message, Name};

use super::input::WorkloadInfo;
use super::model::{
    ChainClassCounts, Decision, DumpSummary, ExplainedChain, Explanation, FORMAT_VERSION,
    Http10Note, Http10State, ListenerExplanation, PoliciesRead, PortExplanation, Warning,
    WarningKind,
};
use crate::dump::{DumpError, DumpedListener};
use crate::policy::{EffectivePolicy, MtlsMode, PolicySet};
use crate::relay::plan_for;
use crate::rewrite::{
    ChainChange, ChainClass, ChainKind, RewritePlan, SkipReason, inspect_listener, rewrite_listener,
};

/// Explains the decision for `workload` under the policies of `set` on every listener.
pub(super) fn build(
    workload: WorkloadInfo,
    set: &PolicySet,
    policies: PoliciesRead,
    dump_path: String,
    listeners: Vec<Result<DumpedListener, DumpError>>,
) -> Explanation {
    let policy = set.resolve(&workload.workload);
    let mut builder = Builder {
        plan: plan_for(&policy),
        policy: &policy,
        warnings: Vec::new(),
        http10: Vec::new(),
    };
    for error in &policies.errors {
        builder.warn(
            WarningKind::PolicyNotLoaded,
            None,
            None,
            format!("a policy document was not loaded, and the relay skips it too: {error}"),
        );
    }

    let total = listeners.len();
    let explained: Vec<ListenerExplanation> = listeners
        .into_iter()
        .map(|item| match item {
            Ok(listener) => builder.listener(listener),
            Err(error) => builder.unreadable(listener_name(&error), error.to_string()),
        })
        .collect();

    let dump = DumpSummary {
        path: dump_path,
        listeners: total,
        inbound: explained
            .iter()
            .filter(|l| l.error.is_none() && l.skipped != Some(SkipReason::NotInbound))
            .count(),
        not_inbound: explained
            .iter()
            .filter(|l| l.skipped == Some(SkipReason::NotInbound))
            .count(),
        unreadable: explained.iter().filter(|l| l.error.is_some()).count(),
    };
    if dump.inbound == 0 {
        builder.warn(
            WarningKind::NoInboundListener,
            None,
            None,
            "the dump has no readable INBOUND listener, and the relay rewrites only those: is it \
             the sidecar's (istioctl proxy-config listener POD -o json, or its /config_dump)?"
                .to_string(),
        );
    }

    let http10 = builder.http10_note(workload.http10_metadata);
    let ports = ports(&policy, &explained);
    let decision = decide(&policy, &builder.plan, &explained, &dump);
    let warnings = builder.warnings;
    Explanation {
        format_version: FORMAT_VERSION,
        decision,
        workload,
        policies,
        policy,
        ports,
        dump,
        listeners: explained,
        http10,
        warnings,
    }
}

fn listener_name(error: &DumpError) -> String {
    match error {
        DumpError::Invalid {
            listener: Some(name),
            ..
        } => name.clone(),
        _ => String::new(),
    }
}

/// Evidence about HTTP/1.0 from one chain that gains `http/1.0`.
struct Http10Evidence {
    listener: String,
    chain: usize,
    /// `accept_http_10` of the chain's HTTP connection manager; `None` when the dump does not
    /// carry its settings.
    accepts: Option<bool>,
}

struct Builder<'p> {
    policy: &'p EffectivePolicy,
    plan: RewritePlan,
    warnings: Vec<Warning>,
    http10: Vec<Http10Evidence>,
}

impl Builder<'_> {
    fn warn(
        &mut self,
        kind: WarningKind,
        listener: Option<&str>,
        chain: Option<usize>,
        message: String,
    ) {
        self.warnings.push(Warning {
            kind,
            listener: listener.map(str::to_owned),
            chain,
            message,
        });
    }

    fn unreadable(&mut self, name: String, error: String) -> ListenerExplanation {
        let shown = if name.is_empty() {
            "a listener".to_string()
        } else {
            format!("listener {name:?}")
        };
        let listener = Some(name.as_str()).filter(|n| !n.is_empty());
        self.warn(
            WarningKind::UnreadableListener,
            listener,
            None,
            format!("{shown} could not be read and is not explained: {error}"),
        );
        ListenerExplanation {
            name,
            version_info: None,
            error: Some(error),
            skipped: None,
            filter_chains: 0,
            chain_classes: ChainClassCounts::default(),
            chains: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn listener(&mut self, dumped: DumpedListener) -> ListenerExplanation {
        let rewrite = match rewrite_listener(&dumped.bytes, &self.plan) {
            Ok(rewrite) => rewrite,
            Err(error) => return self.unreadable(dumped.name, error.to_string()),
        };
        let infos = inspect_listener(&dumped.bytes).unwrap_or_default();
        let mut classes = ChainClassCounts::default();
        for info in &infos {
            *classes.slot(info.kind) += 1;
        }
        let mut explained = ListenerExplanation {
            name: dumped.name,
            version_info: dumped.version_info,
            error: None,
            skipped: rewrite.skipped,
            filter_chains: infos.len(),
            chain_classes: classes,
            chains: Vec::new(),
            notes: Vec::new(),
        };
        match rewrite.skipped {
            Some(SkipReason::NotInbound) => return explained,
            Some(SkipReason::UsesFilterChainMatcher) => {
                self.warn(
                    WarningKind::FilterChainMatcher,
                    Some(&explained.name),
                    None,
                    format!(
                        "listener {:?} uses filter_chain_matcher: the relay leaves it as it is",
                        explained.name
                    ),
                );
            }
            None => {}
        }
        explained.notes = dumped.notes;
        for change in rewrite.chains {
            let chain = self.chain(&explained.name, change);
            if chain.change.added.iter().any(|value| value == "http/1.0") {
                self.http10.push(Http10Evidence {
                    listener: explained.name.clone(),
                    chain: chain.change.index,
                    accepts: accepts_http10(&dumped.bytes, chain.change.index),
                });
            }
            explained.chains.push(chain);
        }
        explained
    }

    /// One mTLS HTTP chain: its reason, and the warnings its change calls for.
    fn chain(&mut self, listener: &str, change: ChainChange) -> ExplainedChain {
        let port = change.destination_port;
        let verdict = self.policy.port_verdict(port);
        let label = chain_label(listener, &change);
        let changed = !change.added.is_empty();
        let reason = if let Some(why) = &change.not_understood {
            format!("left untouched: {why}")
        } else if !verdict.add || changed {
            verdict.reason
        } else if change.collisions.is_empty() {
            "it already lists http/1.0, http/1.1 and h2".to_string()
        } else {
            "every value it lacks is claimed by another chain on the same match".to_string()
        };

        if let Some(why) = &change.not_understood {
            let message =
                format!("{label} looks like an mTLS HTTP chain but is left untouched: {why}");
            self.warn(
                WarningKind::NotUnderstood,
                Some(listener),
                Some(change.index),
                message,
            );
        }
        for collision in &change.collisions {
            let message = format!(
                "{label}: {} is not added: chain {} {:?} already claims it on the same match",
                collision.alpn, collision.other_index, collision.other_name
            );
            self.warn(
                WarningKind::Collision,
                Some(listener),
                Some(change.index),
                message,
            );
        }
        if changed && change.kind != ChainKind::DeclaredHttp {
            let place = match port {
                Some(port) => format!("on port {port}"),
                None => "on a port no Service declares".to_string(),
            };
            let message = format!(
                "{label} gains {}: an application that terminates its own TLS {place}, reached by \
                 a client offering h2 or http/1.1, now meets the sidecar's TLS (which asks for a \
                 mesh client certificate) instead of its own",
                change.added
            );
            self.warn(
                WarningKind::ApplicationTls,
                Some(listener),
                Some(change.index),
                message,
            );
        }
        if change.may_capture_plaintext {
            let message = format!(
                "{label}: its match does not require transport_protocol tls (a listener of Istio \
                 1.6 or before), so with an HTTP inspector on its port the added http/1.x values \
                 may also catch plaintext HTTP/1 connections that reached the plaintext chain \
                 before"
            );
            self.warn(
                WarningKind::MayCapturePlaintext,
                Some(listener),
                Some(change.index),
                message,
            );
        }
        ExplainedChain {
            mode: self.policy.mode_for_port(port),
            change,
            changed,
            reason,
        }
    }

    fn http10_note(&self, metadata_http10: bool) -> Option<Http10Note> {
        const ALPN_FACT: &str = "the sidecar's TLS context offers only h2 and http/1.1, so an \
                                 HTTP/1.0 client that matches the added http/1.0 negotiates no ALPN";
        const SETTING: &str = "Istio's HTTP/1.0 support (PILOT_HTTP10=1 on istiod, or node \
                               metadata HTTP10=1)";
        if self.http10.is_empty() {
            return None;
        }
        let refusing: Vec<String> = self
            .http10
            .iter()
            .filter(|e| e.accepts == Some(false))
            .map(|e| format!("{} chain {}", e.listener, e.chain))
            .collect();
        let all_accept = self.http10.iter().all(|e| e.accepts == Some(true));
        let note = if all_accept {
            Http10Note {
                state: Http10State::On,
                message: format!(
                    "{ALPN_FACT}; the dump's HTTP connection managers of those chains accept \
                     HTTP/1.0 ({SETTING} is on), so such a client is served"
                ),
            }
        } else if !refusing.is_empty() {
            Http10Note {
                state: Http10State::Off,
                message: format!(
                    "{ALPN_FACT}, and the dump's HTTP connection manager does not accept HTTP/1.0 \
                     on {}, so such a client gets 426 Upgrade Required until {SETTING} is turned \
                     on",
                    refusing.join(", ")
                ),
            }
        } else if metadata_http10 {
            Http10Note {
                state: Http10State::On,
                message: format!(
                    "{ALPN_FACT}; the node metadata sets HTTP10=1, so istiod makes the HTTP \
                     connection managers accept HTTP/1.0 and such a client is served"
                ),
            }
        } else {
            Http10Note {
                state: Http10State::Unknown,
                message: format!(
                    "{ALPN_FACT}; whether it is served or gets 426 Upgrade Required depends on \
                     {SETTING}, which this dump does not show"
                ),
            }
        };
        Some(note)
    }
}

impl ChainClassCounts {
    fn slot(&mut self, class: ChainClass) -> &mut usize {
        match class {
            ChainClass::MtlsHttp(_) => &mut self.mtls_http,
            ChainClass::MtlsTcp => &mut self.mtls_tcp,
            ChainClass::OtherTls => &mut self.other_tls,
            ChainClass::TlsPassthrough => &mut self.tls_passthrough,
            ChainClass::Plaintext => &mut self.plaintext,
            ChainClass::NotUnderstood => &mut self.not_understood,
        }
    }
}

/// `listener "virtualInbound" chain 3 "name" (passthrough)`, for warnings.
fn chain_label(listener: &str, change: &ChainChange) -> String {
    let port = match change.destination_port {
        Some(port) => format!(", port {port}"),
        None => String::new(),
    };
    let name = if change.name.is_empty() {
        String::new()
    } else {
        format!(" {:?}", change.name)
    };
    format!(
        "listener {listener:?} chain {}{name} ({}{port})",
        change.index, change.kind
    )
}

/// `accept_http_10` of the HTTP connection manager of chain `index`, when the dump carried the
/// manager's settings.
fn accepts_http10(listener: &[u8], index: usize) -> Option<bool> {
    let listener = Listener::decode(listener).ok()?;
    let chain = listener.filter_chains.get(index)?;
    let hcm_type = HttpConnectionManager::full_name();
    chain.filters.iter().find_map(|f| match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any))
            if any.type_url.rsplit('/').next() == Some(hcm_type.as_str())
                && !any.value.is_empty() =>
        {
            let hcm = HttpConnectionManager::decode(any.value.as_slice()).ok()?;
            Some(hcm.http_protocol_options.is_some_and(|o| o.accept_http_10))
        }
        _ => None,
    })
}

/// The ports a reader needs: chains without a destination port, every port `portLevelMtls`
/// names, and every destination port of an mTLS HTTP chain of a listener looked at.
fn ports(policy: &EffectivePolicy, listeners: &[ListenerExplanation]) -> Vec<PortExplanation> {
    let mut ports: BTreeSet<Option<u32>> = BTreeSet::from([None]);
    ports.extend(policy.port_modes.keys().copied().map(Some));
    ports.extend(
        listeners
            .iter()
            .flat_map(|l| &l.chains)
            .map(|c| c.change.destination_port),
    );
    ports
        .into_iter()
        .map(|port| {
            let verdict = policy.port_verdict(port);
            let port_reason = port.and_then(|p| policy.port_reasons.get(&p));
            PortExplanation {
                port,
                mode: policy.mode_for_port(port),
                port_level: port_reason.is_some(),
                mode_reason: port_reason.unwrap_or(&policy.mode_reason).clone(),
                add: verdict.add,
                reason: verdict.reason,
            }
        })
        .collect()
}

fn decide(
    policy: &EffectivePolicy,
    plan: &RewritePlan,
    listeners: &[ListenerExplanation],
    dump: &DumpSummary,
) -> Decision {
    let chains_changed: usize = listeners
        .iter()
        .map(|l| l.chains.iter().filter(|c| c.changed).count())
        .sum();
    if chains_changed > 0 {
        // A config dump may hold a listener twice, active and warming.
        let mut names: Vec<String> = Vec::new();
        for listener in listeners
            .iter()
            .filter(|l| l.chains.iter().any(|c| c.changed))
        {
            let name = format!("{:?}", listener.name);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let plural = if chains_changed == 1 { "" } else { "s" };
        return Decision {
            rewrites: true,
            chains_changed,
            summary: format!(
                "the relay adds standard ALPNs to {chains_changed} filter chain{plural} of \
                 listener {}",
                names.join(", ")
            ),
        };
    }

    let mtls_http: Vec<&ExplainedChain> = listeners.iter().flat_map(|l| &l.chains).collect();
    let why = if !policy.alpn.enabled {
        policy.alpn.reason.clone()
    } else if dump.inbound == 0 {
        "the dump has no readable INBOUND listener".to_string()
    } else if mtls_http.is_empty() {
        let mut why = "no INBOUND listener has an mTLS HTTP chain (TLS transport socket, HTTP \
                       connection manager and an Istio mTLS ALPN)"
            .to_string();
        let other_tls = listeners.iter().any(|l| l.chain_classes.other_tls > 0);
        if other_tls {
            why.push_str(
                "; its TLS chains carry no Istio mTLS ALPN, as istiod builds them for STRICT",
            );
        }
        if plan.is_noop() {
            why = format!("{}; and {why}", policy.port_verdict(None).reason);
        }
        why
    } else if mtls_http.iter().all(|c| !c.change.planned) {
        not_permissive(policy, &mtls_http)
    } else {
        let mut reasons: Vec<&str> = Vec::new();
        for chain in &mtls_http {
            if !reasons.contains(&chain.reason.as_str()) {
                reasons.push(&chain.reason);
            }
        }
        reasons.join("; ")
    };
    Decision {
        rewrites: false,
        chains_changed: 0,
        summary: format!("nothing changes: {why}"),
    }
}

/// Why nothing changes when the annotation asks for the standard ALPNs but no mTLS HTTP chain's
/// port is PERMISSIVE: the modes found, each with the policy that set it.
fn not_permissive(policy: &EffectivePolicy, chains: &[&ExplainedChain]) -> String {
    let mut modes: Vec<(MtlsMode, &str)> = Vec::new();
    for chain in chains {
        let port = chain.change.destination_port;
        let why = port
            .and_then(|p| policy.port_reasons.get(&p))
            .unwrap_or(&policy.mode_reason);
        let mode = policy.mode_for_port(port);
        if !modes.contains(&(mode, why.as_str())) {
            modes.push((mode, why));
        }
    }
    let listed: Vec<String> = modes
        .iter()
        .map(|(mode, why)| format!("{mode} ({why})"))
        .collect();
    let mut effects = Vec::new();
    if modes.iter().any(|(mode, _)| *mode == MtlsMode::Strict) {
        effects.push("STRICT already accepts any ALPN on declared ports");
    }
    if modes.iter().any(|(mode, _)| *mode == MtlsMode::Disable) {
        effects.push("DISABLE has no mTLS");
    }
    format!(
        "{}, but every mTLS HTTP chain's port is {}: only PERMISSIVE chains change ({})",
        policy.alpn.reason,
        listed.join(" or "),
        effects.join("; ")
    )
}
