//! Resolution for one workload: its mTLS mode per port, exactly as istiod computes it, and
//! whether the ALPN annotation asks for the standard ALPNs, with reasons a human can follow.

use std::collections::BTreeMap;

use serde::Serialize;

use super::ALPN_ANNOTATION;
use super::model::{MtlsMode, PeerAuthentication, PolicyRef, Workload};
use super::set::{
    AlpnAnnotation, PolicyLevel, PolicyReport, PolicyReportKind, PolicySet, why_first,
};

/// The policy of one workload: resolved modes and the ALPN decision, with reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectivePolicy {
    /// The workload's mode: used by chains without a destination port and by ports that
    /// `portLevelMtls` does not name. Never UNSET.
    pub workload_mode: MtlsMode,
    /// The mode of each port named by the winning workload policy's `portLevelMtls`. Never UNSET.
    pub port_modes: BTreeMap<u32, MtlsMode>,
    /// The policy that decided `workload_mode`; `None` for the built-in default.
    pub mode_source: Option<PolicyRef>,
    /// Why `workload_mode` is what it is.
    pub mode_reason: String,
    /// Why each port of `port_modes` has its mode.
    pub port_reasons: BTreeMap<u32, String>,
    /// The policy that counts at each level (losers and ignored policies are not here).
    pub selected: SelectedPolicies,
    /// What the annotation asks for, before looking at modes.
    pub alpn: AlpnDecision,
    /// Problems worth showing for this workload: reports about the policies it was resolved
    /// from, shadowed workload policies, and annotations that meet a STRICT or DISABLE mode.
    pub reports: Vec<PolicyReport>,
}

/// The policy chosen at each level for one workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SelectedPolicies {
    /// The oldest selector policy of the workload's namespace that selects it.
    pub workload: Option<PolicyRef>,
    /// The selector-less policy of the workload's namespace (none in the root namespace, whose
    /// selector-less policy is the mesh policy).
    pub namespace: Option<PolicyRef>,
    /// The selector-less policy of the root namespace.
    pub mesh: Option<PolicyRef>,
}

/// Whether the `http-alpns.aspenmesh.io` annotation asks for the standard ALPNs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlpnDecision {
    /// The annotation asks for them.
    pub enabled: bool,
    /// The policy whose annotation decided; `None` when none did (off).
    pub source: Option<PolicyRef>,
    /// A sentence naming the deciding policy and its level.
    pub reason: String,
}

/// Whether chains of one port get the standard ALPNs, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortVerdict {
    /// Append `http/1.0`, `http/1.1` and `h2`.
    pub add: bool,
    /// A sentence naming the deciding policies.
    pub reason: String,
}

impl EffectivePolicy {
    /// The mode of chains with destination port `port`; `None` (no destination port) or a port
    /// that `portLevelMtls` does not name gets the workload's mode.
    pub fn mode_for_port(&self, port: Option<u32>) -> MtlsMode {
        port.and_then(|p| self.port_modes.get(&p).copied())
            .unwrap_or(self.workload_mode)
    }

    /// Whether chains of `port` get the standard ALPNs: the annotation asks for them and the
    /// port's mode is PERMISSIVE.
    pub fn adds_standard_alpns(&self, port: Option<u32>) -> bool {
        self.alpn.enabled && self.mode_for_port(port) == MtlsMode::Permissive
    }

    /// [`adds_standard_alpns`](Self::adds_standard_alpns) with its reason.
    pub fn port_verdict(&self, port: Option<u32>) -> PortVerdict {
        if !self.alpn.enabled {
            return PortVerdict {
                add: false,
                reason: self.alpn.reason.clone(),
            };
        }
        let mode = self.mode_for_port(port);
        let (subject, why) = self.describe_port(port);
        let reason = match mode {
            MtlsMode::Permissive => format!("{}, and {subject} is PERMISSIVE", self.alpn.reason),
            other => format!(
                "{}, but {subject} is {other} ({why}): {}",
                self.alpn.reason,
                not_permissive_effect(other)
            ),
        };
        PortVerdict {
            add: mode == MtlsMode::Permissive,
            reason,
        }
    }

    /// What `port` is called in a sentence, and why it has its mode.
    fn describe_port(&self, port: Option<u32>) -> (String, &str) {
        match port {
            Some(p) => match self.port_reasons.get(&p) {
                Some(reason) => (format!("port {p}"), reason),
                None => (format!("port {p} (workload mode)"), &self.mode_reason),
            },
            None => ("the workload mode".to_string(), &self.mode_reason),
        }
    }
}

fn not_permissive_effect(mode: MtlsMode) -> &'static str {
    match mode {
        MtlsMode::Strict => "STRICT already accepts any ALPN on declared ports",
        MtlsMode::Disable => "DISABLE has no mTLS",
        MtlsMode::Permissive | MtlsMode::Unset => "only PERMISSIVE chains are changed",
    }
}

impl PolicySet {
    /// Resolves the policy of `workload`: levels workload > namespace > mesh > PERMISSIVE,
    /// oldest policy per level, UNSET inherits, `portLevelMtls` from the workload policy only;
    /// then the annotation of the workload policy, else of the namespace policy, else off.
    pub fn resolve(&self, workload: &Workload) -> EffectivePolicy {
        let root = self.root_namespace();
        let in_root = workload.namespace == root;
        let mesh = self.namespace_level.get(root).copied();
        let namespace = if in_root {
            None
        } else {
            self.namespace_level.get(&workload.namespace).copied()
        };
        // Selector policies of the root namespace were never indexed: istiod ignores them.
        let matching: Vec<usize> = self
            .workload_level
            .get(&workload.namespace)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&i| self.policies[i].selects(&workload.labels))
            .collect();
        let chosen = Chosen {
            workload: matching.first().copied(),
            namespace,
            mesh,
        };

        let (workload_mode, mode_source, mode_reason) = self.workload_mode(&chosen);
        let (port_modes, port_reasons) = self.port_modes(&chosen, workload_mode);
        let alpn = self.alpn_decision(&chosen);

        let mut reports = self.reports_about(&workload.namespace, |p| {
            !p.has_selector() || p.selects(&workload.labels)
        });
        if let Some((&winner, losers)) = matching.split_first() {
            reports.extend(losers.iter().map(|&loser| self.shadowed(winner, loser)));
        }

        let mut effective = EffectivePolicy {
            workload_mode,
            port_modes,
            mode_source,
            mode_reason,
            port_reasons,
            selected: SelectedPolicies {
                workload: chosen.workload.map(|i| self.policies[i].policy_ref()),
                namespace: chosen.namespace.map(|i| self.policies[i].policy_ref()),
                mesh: chosen.mesh.map(|i| self.policies[i].policy_ref()),
            },
            alpn,
            reports,
        };
        effective.reports.extend(mode_not_permissive(&effective));
        effective
    }

    /// The workload mode, the policy that set it, and why.
    fn workload_mode(&self, chosen: &Chosen) -> (MtlsMode, Option<PolicyRef>, String) {
        let mut decided: Option<(PolicyLevel, &PeerAuthentication)> = None;
        let mut unset_below: Vec<String> = Vec::new();
        for (level, policy) in chosen.widest_first(self) {
            if policy.mode == MtlsMode::Unset {
                unset_below.push(format!("{level} policy {} is UNSET", policy.policy_ref()));
            } else {
                decided = Some((level, policy));
                unset_below.clear();
            }
        }
        match decided {
            Some((level, policy)) => {
                let mut reason = format!(
                    "{level} policy {} sets {}",
                    policy.policy_ref(),
                    policy.mode
                );
                if !unset_below.is_empty() {
                    reason.push_str(&format!("; {} and inherits it", unset_below.join(", ")));
                }
                (policy.mode, Some(policy.policy_ref()), reason)
            }
            None if unset_below.is_empty() => (
                MtlsMode::Permissive,
                None,
                "no PeerAuthentication applies: built-in default PERMISSIVE".to_string(),
            ),
            None => (
                MtlsMode::Permissive,
                None,
                format!("{}: built-in default PERMISSIVE", unset_below.join(", ")),
            ),
        }
    }

    /// The winning workload policy's `portLevelMtls`; a port-level UNSET takes the workload mode.
    fn port_modes(
        &self,
        chosen: &Chosen,
        workload_mode: MtlsMode,
    ) -> (BTreeMap<u32, MtlsMode>, BTreeMap<u32, String>) {
        let mut modes = BTreeMap::new();
        let mut reasons = BTreeMap::new();
        let Some(policy) = chosen.workload.map(|i| &self.policies[i]) else {
            return (modes, reasons);
        };
        for (&port, &mode) in &policy.port_level {
            let policy_ref = policy.policy_ref();
            let (mode, reason) = if mode == MtlsMode::Unset {
                (
                    workload_mode,
                    format!(
                        "portLevelMtls of workload policy {policy_ref} leaves port {port} UNSET: \
                         it takes the workload mode {workload_mode}"
                    ),
                )
            } else {
                (
                    mode,
                    format!(
                        "portLevelMtls of workload policy {policy_ref} sets port {port} to {mode}"
                    ),
                )
            };
            modes.insert(port, mode);
            reasons.insert(port, reason);
        }
        (modes, reasons)
    }

    /// The winning workload policy's annotation when it has a valid one, else the winning
    /// namespace policy's, else off.
    fn alpn_decision(&self, chosen: &Chosen) -> AlpnDecision {
        let candidates = [
            (PolicyLevel::Workload, chosen.workload),
            (PolicyLevel::Namespace, chosen.namespace),
        ];
        let mut passed_over: Vec<String> = Vec::new();
        for (level, index) in candidates {
            let Some(index) = index else { continue };
            let policy_ref = self.policies[index].policy_ref();
            match self.annotations[index] {
                AlpnAnnotation::Value(enabled) => {
                    let mut reason = format!("{level} policy {policy_ref} says \"{enabled}\"");
                    if !passed_over.is_empty() {
                        reason.push_str(&format!(" ({})", passed_over.join("; ")));
                    }
                    return AlpnDecision {
                        enabled,
                        source: Some(policy_ref),
                        reason,
                    };
                }
                state => passed_over.push(annotation_note(level, &policy_ref, state)),
            }
        }
        if let Some(mesh) = chosen.mesh
            && self.annotations[mesh] == AlpnAnnotation::Ignored
        {
            let policy_ref = self.policies[mesh].policy_ref();
            passed_over.push(annotation_note(
                PolicyLevel::Mesh,
                &policy_ref,
                AlpnAnnotation::Ignored,
            ));
        }
        let mut reason = format!("no workload or namespace policy sets {ALPN_ANNOTATION}: off");
        if !passed_over.is_empty() {
            reason.push_str(&format!(" ({})", passed_over.join("; ")));
        }
        AlpnDecision {
            enabled: false,
            source: None,
            reason,
        }
    }

    fn shadowed(&self, winner: usize, loser: usize) -> PolicyReport {
        let (winner, loser) = (&self.policies[winner], &self.policies[loser]);
        PolicyReport {
            policy: loser.policy_ref(),
            kind: PolicyReportKind::Shadowed,
            message: format!(
                "workload policy {} also selects this workload but is ignored: workload policy {} \
                 {}, and only one policy per level counts",
                loser.policy_ref(),
                winner.policy_ref(),
                why_first(winner, loser)
            ),
        }
    }
}

/// Indexes (into the set's policies) of the policy chosen at each level.
struct Chosen {
    workload: Option<usize>,
    namespace: Option<usize>,
    mesh: Option<usize>,
}

impl Chosen {
    /// The chosen policies from the least to the most specific level.
    fn widest_first<'s>(
        &self,
        set: &'s PolicySet,
    ) -> impl Iterator<Item = (PolicyLevel, &'s PeerAuthentication)> + use<'s> {
        [
            (PolicyLevel::Mesh, self.mesh),
            (PolicyLevel::Namespace, self.namespace),
            (PolicyLevel::Workload, self.workload),
        ]
        .into_iter()
        .filter_map(move |(level, index)| index.map(|i| (level, &set.policies[i])))
    }
}

fn annotation_note(level: PolicyLevel, policy_ref: &PolicyRef, state: AlpnAnnotation) -> String {
    match state {
        AlpnAnnotation::Absent => format!("{level} policy {policy_ref} has no such annotation"),
        AlpnAnnotation::Bad => {
            format!("the value on {level} policy {policy_ref} is neither \"true\" nor \"false\"")
        }
        AlpnAnnotation::Ignored | AlpnAnnotation::Value(_) => format!(
            "the annotation on {level} policy {policy_ref} is ignored: not supported in that \
             namespace"
        ),
    }
}

/// A report for the workload mode and each port whose mode keeps the annotation from acting.
fn mode_not_permissive(effective: &EffectivePolicy) -> Vec<PolicyReport> {
    let Some(source) = effective
        .alpn
        .source
        .as_ref()
        .filter(|_| effective.alpn.enabled)
    else {
        return Vec::new();
    };
    let ports = std::iter::once(None).chain(effective.port_modes.keys().map(|&p| Some(p)));
    ports
        .filter(|&port| effective.mode_for_port(port) != MtlsMode::Permissive)
        .map(|port| {
            let mode = effective.mode_for_port(port);
            let (subject, why) = effective.describe_port(port);
            PolicyReport {
                policy: source.clone(),
                kind: PolicyReportKind::ModeNotPermissive,
                message: format!(
                    "{ALPN_ANNOTATION} on {source} asks for the standard ALPNs, but {subject} is \
                     {mode} ({why}): nothing changes there, {}",
                    not_permissive_effect(mode)
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_yaml;
    use crate::policy::testutil::{policy_set, workload};

    const ROOT: &str = "istio-system";

    fn web() -> Workload {
        workload("shop/web-1", "app:web,version:v1")
    }

    fn source(effective: &EffectivePolicy) -> Option<String> {
        effective.mode_source.as_ref().map(ToString::to_string)
    }

    fn report_kinds(effective: &EffectivePolicy) -> Vec<(String, PolicyReportKind)> {
        effective
            .reports
            .iter()
            .map(|r| (r.policy.to_string(), r.kind))
            .collect()
    }

    #[test]
    fn built_in_default_is_permissive() {
        let effective = policy_set(ROOT, &[]).resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Permissive);
        assert_eq!(effective.mode_source, None);
        assert!(
            effective
                .mode_reason
                .contains("built-in default PERMISSIVE")
        );
        assert!(!effective.alpn.enabled);
        assert_eq!(effective.selected, SelectedPolicies::default());
    }

    #[test]
    fn workload_beats_namespace_beats_mesh() {
        let mesh = "istio-system/default mode=STRICT";
        let namespace = "shop/default mode=DISABLE";
        let selector = "shop/web sel=app:web mode=PERMISSIVE";

        let effective = policy_set(ROOT, &[mesh]).resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Strict);
        assert_eq!(source(&effective).as_deref(), Some("istio-system/default"));
        assert_eq!(
            effective.mode_reason,
            "mesh policy istio-system/default sets STRICT"
        );

        let effective = policy_set(ROOT, &[mesh, namespace]).resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Disable);
        assert_eq!(
            effective.mode_reason,
            "namespace policy shop/default sets DISABLE"
        );

        let effective = policy_set(ROOT, &[mesh, namespace, selector]).resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Permissive);
        assert_eq!(
            effective.mode_reason,
            "workload policy shop/web sets PERMISSIVE"
        );
        assert_eq!(
            effective.selected,
            SelectedPolicies {
                workload: Some(PolicyRef::new("shop", "web")),
                namespace: Some(PolicyRef::new("shop", "default")),
                mesh: Some(PolicyRef::new("istio-system", "default")),
            }
        );

        // Another namespace sees only the mesh policy; another workload no selector policy.
        let other = policy_set(ROOT, &[mesh, namespace, selector]);
        assert_eq!(
            other.resolve(&workload("pay/p", "app:web")).workload_mode,
            MtlsMode::Strict
        );
        assert_eq!(
            other.resolve(&workload("shop/db", "app:db")).workload_mode,
            MtlsMode::Disable
        );
    }

    #[test]
    fn selector_must_be_a_subset_of_the_labels() {
        let set = policy_set(ROOT, &["shop/web sel=app:web,version:v2 mode=STRICT"]);
        assert_eq!(set.resolve(&web()).workload_mode, MtlsMode::Permissive);
        let set = policy_set(ROOT, &["shop/web sel=app:web,version:v1 mode=STRICT"]);
        assert_eq!(set.resolve(&web()).workload_mode, MtlsMode::Strict);
    }

    #[test]
    fn oldest_workload_policy_wins_and_losers_are_reported() {
        let set = policy_set(
            ROOT,
            &[
                "shop/b-new sel=app:web mode=DISABLE ts=300",
                "shop/a-old sel=version:v1 mode=STRICT ts=100 port=8080:DISABLE",
                "shop/c sel=app:web mode=PERMISSIVE ts=200 alpn=true port=9090:STRICT",
            ],
        );
        let effective = set.resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Strict);
        assert_eq!(source(&effective).as_deref(), Some("shop/a-old"));
        // Never merged: the ports and the annotation of the losers do not count.
        assert_eq!(
            effective.port_modes,
            BTreeMap::from([(8080, MtlsMode::Disable)])
        );
        assert!(!effective.alpn.enabled);
        assert_eq!(
            report_kinds(&effective),
            [
                ("shop/c".to_string(), PolicyReportKind::Shadowed),
                ("shop/b-new".to_string(), PolicyReportKind::Shadowed),
            ]
        );
        assert!(
            effective.reports[0]
                .message
                .contains("workload policy shop/a-old is older")
        );
    }

    #[test]
    fn same_age_goes_to_the_smaller_name() {
        let set = policy_set(
            ROOT,
            &[
                "shop/zeta sel=app:web mode=DISABLE ts=100",
                "shop/alpha sel=app:web mode=STRICT ts=100",
                "shop/ns-b mode=DISABLE ts=100",
                "shop/ns-a mode=STRICT ts=100",
            ],
        );
        let effective = set.resolve(&web());
        assert_eq!(source(&effective).as_deref(), Some("shop/alpha"));
        assert_eq!(
            effective.selected.namespace,
            Some(PolicyRef::new("shop", "ns-a"))
        );
        let shadowed = effective
            .reports
            .iter()
            .find(|r| r.policy.name == "zeta")
            .expect("zeta is reported");
        assert!(
            shadowed
                .message
                .contains("same time and its name sorts first")
        );
    }

    #[test]
    fn missing_creation_timestamp_counts_as_oldest() {
        let set = policy_set(
            ROOT,
            &[
                "shop/dated sel=app:web mode=STRICT ts=0",
                "shop/undated sel=app:web mode=DISABLE",
            ],
        );
        let effective = set.resolve(&web());
        assert_eq!(source(&effective).as_deref(), Some("shop/undated"));
        assert!(
            effective.reports[0]
                .message
                .contains("no creationTimestamp")
        );
    }

    #[test]
    fn unset_inherits_at_every_level() {
        // Workload UNSET takes the namespace's mode.
        let set = policy_set(ROOT, &["shop/default mode=STRICT", "shop/web sel=app:web"]);
        let effective = set.resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Strict);
        assert_eq!(source(&effective).as_deref(), Some("shop/default"));
        assert_eq!(
            effective.mode_reason,
            "namespace policy shop/default sets STRICT; workload policy shop/web is UNSET and \
             inherits it"
        );

        // Namespace and workload UNSET take the mesh's mode.
        let set = policy_set(
            ROOT,
            &[
                "istio-system/default mode=DISABLE",
                "shop/default",
                "shop/web sel=app:web mode=UNSET",
            ],
        );
        let effective = set.resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Disable);
        assert_eq!(source(&effective).as_deref(), Some("istio-system/default"));

        // Mesh UNSET is PERMISSIVE, even below a namespace UNSET.
        let set = policy_set(ROOT, &["istio-system/default", "shop/default"]);
        let effective = set.resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Permissive);
        assert_eq!(effective.mode_source, None);
        assert_eq!(
            effective.mode_reason,
            "mesh policy istio-system/default is UNSET, namespace policy shop/default is UNSET: \
             built-in default PERMISSIVE"
        );
    }

    #[test]
    fn port_level_is_keyed_by_container_port_and_unset_takes_the_workload_mode() {
        let set = policy_set(
            ROOT,
            &[
                "shop/default mode=STRICT",
                "shop/web sel=app:web port=8080:PERMISSIVE port=9090:UNSET port=7070:DISABLE",
            ],
        );
        let effective = set.resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Strict);
        assert_eq!(effective.mode_for_port(Some(8080)), MtlsMode::Permissive);
        assert_eq!(effective.mode_for_port(Some(9090)), MtlsMode::Strict);
        assert_eq!(effective.mode_for_port(Some(7070)), MtlsMode::Disable);
        assert_eq!(effective.mode_for_port(Some(1234)), MtlsMode::Strict);
        assert_eq!(effective.mode_for_port(None), MtlsMode::Strict);
        assert!(effective.port_reasons[&9090].contains("UNSET"));
        assert!(effective.port_modes.values().all(|&m| m != MtlsMode::Unset));
    }

    #[test]
    fn port_level_on_a_namespace_policy_is_ignored() {
        let set = policy_set(ROOT, &["shop/default mode=PERMISSIVE port=8080:STRICT"]);
        let effective = set.resolve(&web());
        assert!(effective.port_modes.is_empty());
        assert_eq!(effective.mode_for_port(Some(8080)), MtlsMode::Permissive);
        assert_eq!(
            report_kinds(&effective),
            [(
                "shop/default".to_string(),
                PolicyReportKind::PortLevelWithoutSelector
            )]
        );
    }

    #[test]
    fn selector_policy_in_root_namespace_is_ignored_everywhere() {
        let set = policy_set(
            ROOT,
            &[
                "istio-system/web sel=app:web mode=STRICT alpn=true",
                "istio-system/default mode=DISABLE",
            ],
        );
        let effective = set.resolve(&web());
        assert_eq!(effective.workload_mode, MtlsMode::Disable);
        assert_eq!(effective.selected.workload, None);
        assert!(!effective.alpn.enabled);
        assert_eq!(
            report_kinds(&effective),
            [(
                "istio-system/web".to_string(),
                PolicyReportKind::SelectorInRootNamespace
            )]
        );

        // A workload of the root namespace itself: still ignored; the mesh policy decides.
        let effective = set.resolve(&workload("istio-system/gw", "app:web"));
        assert_eq!(effective.workload_mode, MtlsMode::Disable);
        assert_eq!(effective.selected.workload, None);
        assert_eq!(effective.selected.namespace, None);
        assert_eq!(
            effective.selected.mesh,
            Some(PolicyRef::new(ROOT, "default"))
        );

        // Not reported to workloads it would not select anyway.
        let effective = set.resolve(&workload("shop/db", "app:db"));
        assert!(effective.reports.is_empty(), "{:?}", effective.reports);
    }

    #[test]
    fn workload_false_beats_namespace_true() {
        let set = policy_set(
            ROOT,
            &[
                "shop/default alpn=true",
                "shop/web-alpn sel=app:web alpn=false",
            ],
        );
        let effective = set.resolve(&web());
        assert!(!effective.alpn.enabled);
        assert_eq!(
            effective.alpn.source,
            Some(PolicyRef::new("shop", "web-alpn"))
        );
        assert_eq!(
            effective.alpn.reason,
            "workload policy shop/web-alpn says \"false\""
        );
        let verdict = effective.port_verdict(Some(8080));
        assert!(!verdict.add);
        assert_eq!(
            verdict.reason,
            "workload policy shop/web-alpn says \"false\""
        );

        // Another workload of the namespace gets the namespace's "true".
        let effective = set.resolve(&workload("shop/db", "app:db"));
        assert!(effective.alpn.enabled);
        assert!(effective.adds_standard_alpns(None));
    }

    #[test]
    fn workload_without_annotation_inherits_the_namespace_one() {
        let set = policy_set(
            ROOT,
            &[
                "shop/default alpn=true",
                "shop/web sel=app:web mode=PERMISSIVE",
            ],
        );
        let effective = set.resolve(&web());
        assert!(effective.alpn.enabled);
        assert_eq!(
            effective.alpn.source,
            Some(PolicyRef::new("shop", "default"))
        );
        assert_eq!(
            effective.alpn.reason,
            "namespace policy shop/default says \"true\" (workload policy shop/web has no such \
             annotation)"
        );
        let verdict = effective.port_verdict(Some(8080));
        assert!(verdict.add);
        assert!(
            verdict
                .reason
                .contains("port 8080 (workload mode) is PERMISSIVE"),
            "{verdict:?}"
        );
    }

    #[test]
    fn bad_workload_value_falls_back_to_namespace_and_is_reported() {
        let set = policy_set(
            ROOT,
            &["shop/default alpn=false", "shop/web sel=app:web alpn=yes"],
        );
        let effective = set.resolve(&web());
        assert!(!effective.alpn.enabled);
        assert_eq!(
            effective.alpn.source,
            Some(PolicyRef::new("shop", "default"))
        );
        assert!(
            effective
                .alpn
                .reason
                .contains("neither \"true\" nor \"false\"")
        );
        assert_eq!(
            report_kinds(&effective),
            [("shop/web".to_string(), PolicyReportKind::BadAnnotationValue)]
        );

        // Case and whitespace variants are accepted.
        let set = policy_set(ROOT, &["shop/web sel=app:web alpn=_True__"]);
        assert!(set.resolve(&web()).alpn.enabled);
        assert!(set.reports().is_empty());
    }

    #[test]
    fn annotation_in_root_namespace_is_ignored_but_its_mode_counts() {
        let set = policy_set(ROOT, &["istio-system/default mode=STRICT alpn=true"]);
        let effective = set.resolve(&web());
        assert!(!effective.alpn.enabled);
        assert_eq!(effective.workload_mode, MtlsMode::Strict);
        assert!(
            effective
                .alpn
                .reason
                .contains("mesh policy istio-system/default is ignored")
        );
        assert_eq!(
            report_kinds(&effective),
            [(
                "istio-system/default".to_string(),
                PolicyReportKind::IgnoredPlacement
            )]
        );
    }

    #[test]
    fn annotation_in_istio_system_is_ignored_with_another_root_namespace() {
        let set = policy_set(
            "mesh-root",
            &[
                "mesh-root/default alpn=true",
                "istio-system/default mode=DISABLE alpn=true",
                "istio-system/gw sel=app:gw alpn=true",
            ],
        );
        // The istio-system policies act as usual for istio-system workloads, minus annotation.
        let gateway = set.resolve(&workload("istio-system/gw-1", "app:gw"));
        assert_eq!(gateway.workload_mode, MtlsMode::Disable);
        assert_eq!(
            gateway.selected.workload,
            Some(PolicyRef::new("istio-system", "gw"))
        );
        assert!(!gateway.alpn.enabled);
        assert!(
            gateway
                .alpn
                .reason
                .contains("workload policy istio-system/gw is ignored")
        );
        // The mesh policy of the other root does not switch it on elsewhere either.
        let effective = set.resolve(&web());
        assert!(!effective.alpn.enabled);
        assert_eq!(
            effective.selected.mesh,
            Some(PolicyRef::new("mesh-root", "default"))
        );
        assert!(report_kinds(&effective).iter().all(|(p, k)| {
            p == "mesh-root/default" && *k == PolicyReportKind::IgnoredPlacement
        }));
    }

    #[test]
    fn strict_and_disable_are_left_alone_with_reasons() {
        let set = policy_set(
            ROOT,
            &[
                "shop/default mode=STRICT alpn=true",
                "shop/web sel=app:web port=8080:PERMISSIVE port=9090:DISABLE",
            ],
        );
        let effective = set.resolve(&web());
        assert!(effective.alpn.enabled);

        let strict = effective.port_verdict(None);
        assert!(!strict.add);
        assert!(!effective.adds_standard_alpns(None));
        assert!(
            strict
                .reason
                .contains("STRICT already accepts any ALPN on declared ports"),
            "{strict:?}"
        );
        assert!(
            strict.reason.contains("namespace policy shop/default"),
            "{strict:?}"
        );

        let disabled = effective.port_verdict(Some(9090));
        assert!(!disabled.add);
        assert!(
            disabled.reason.contains("DISABLE has no mTLS"),
            "{disabled:?}"
        );
        assert!(
            disabled
                .reason
                .contains("portLevelMtls of workload policy shop/web")
        );

        let permissive = effective.port_verdict(Some(8080));
        assert!(permissive.add, "{permissive:?}");
        assert!(effective.adds_standard_alpns(Some(8080)));

        let not_permissive: Vec<_> = effective
            .reports
            .iter()
            .filter(|r| r.kind == PolicyReportKind::ModeNotPermissive)
            .collect();
        assert_eq!(not_permissive.len(), 2, "workload mode and port 9090");
        assert!(
            not_permissive
                .iter()
                .all(|r| r.policy == PolicyRef::new("shop", "default"))
        );
    }

    #[test]
    fn no_mode_reports_when_the_annotation_is_off() {
        let set = policy_set(ROOT, &["shop/default mode=STRICT alpn=false"]);
        let effective = set.resolve(&web());
        assert!(effective.reports.is_empty());
        assert_eq!(
            effective.port_verdict(None).reason,
            "namespace policy shop/default says \"false\""
        );
    }

    #[test]
    fn losing_namespace_policy_annotation_does_not_count() {
        let set = policy_set(ROOT, &["shop/old ts=1", "shop/new ts=2 alpn=true"]);
        let effective = set.resolve(&web());
        assert!(!effective.alpn.enabled);
        assert_eq!(
            report_kinds(&effective),
            [("shop/new".to_string(), PolicyReportKind::Shadowed)]
        );
        assert!(
            effective.reports[0]
                .message
                .contains("annotation is ignored too")
        );
    }

    #[test]
    fn reports_about_other_namespaces_stay_out() {
        let set = policy_set(ROOT, &["pay/default alpn=maybe", "shop/default alpn=true"]);
        assert_eq!(set.reports().len(), 1);
        assert!(set.resolve(&web()).reports.is_empty());
    }

    #[test]
    fn resolves_from_yaml_end_to_end() {
        let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: web-alpn
  namespace: shop
  creationTimestamp: \"2024-05-01T10:00:00Z\"
  annotations: {http-alpns.aspenmesh.io: \"TRUE\"}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    \"15090\": {mode: STRICT}
";
        let outcome = parse_yaml(text, "policies.yaml");
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        let set = PolicySet::new(outcome.policies, ROOT);
        let effective = set.resolve(&web());
        assert!(effective.adds_standard_alpns(Some(8080)));
        assert!(!effective.adds_standard_alpns(Some(15090)));
        assert_eq!(
            effective.alpn.reason,
            "workload policy shop/web-alpn says \"true\""
        );

        let json = serde_json::to_value(&effective).expect("serializes");
        assert_eq!(json["workload_mode"], "PERMISSIVE");
        assert_eq!(json["port_modes"]["15090"], "STRICT");
        assert_eq!(json["alpn"]["source"]["name"], "web-alpn");
        assert_eq!(json["reports"][0]["kind"], "mode_not_permissive");
        let verdict = serde_json::to_value(effective.port_verdict(None)).expect("serializes");
        assert_eq!(verdict["add"], true);
    }
}
