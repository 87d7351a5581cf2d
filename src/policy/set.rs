//! An immutable, indexed snapshot of all PeerAuthentication objects, and the problems found
//! while indexing them.
//!
//! Indexing follows istiod: policies are ordered oldest first (ties: name, then namespace);
//! per namespace only the first selector-less policy counts (in the root namespace it is the
//! mesh policy); selector policies in the root namespace are ignored.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Serialize;

use super::model::{PeerAuthentication, PolicyRef};
use super::{ALPN_ANNOTATION, ISTIO_SYSTEM_NAMESPACE};

/// The level a policy acts at for a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLevel {
    /// A selector policy in the workload's namespace that selects it.
    Workload,
    /// The selector-less policy of the workload's namespace.
    Namespace,
    /// The selector-less policy of the root namespace.
    Mesh,
}

impl fmt::Display for PolicyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Workload => "workload",
            Self::Namespace => "namespace",
            Self::Mesh => "mesh",
        })
    }
}

/// What kind of problem a [`PolicyReport`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyReportKind {
    /// The ALPN annotation's value is neither `true` nor `false`; it counts as absent.
    BadAnnotationValue,
    /// The ALPN annotation sits on a policy in the root namespace or `istio-system`, where it
    /// is not supported; the policy's mode still counts.
    IgnoredPlacement,
    /// A selector policy in the root namespace, which istiod ignores.
    SelectorInRootNamespace,
    /// Another policy at the same level won; this one counts for nothing.
    Shadowed,
    /// The annotation asks for standard ALPNs where the mode is STRICT or DISABLE.
    ModeNotPermissive,
    /// `portLevelMtls` on a policy without a selector, which istiod ignores.
    PortLevelWithoutSelector,
    /// Two objects with the same namespace and name (from different files); one is used.
    DuplicateName,
}

/// A problem with one policy, worth a log line, a metric and a `/debug` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    /// The policy the problem is about.
    pub policy: PolicyRef,
    /// What kind of problem.
    pub kind: PolicyReportKind,
    /// A sentence for humans.
    pub message: String,
}

/// The ALPN annotation of one policy, as resolution reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AlpnAnnotation {
    /// The policy has no annotation.
    Absent,
    /// `true` or `false`.
    Value(bool),
    /// A value that is neither; counts as absent.
    Bad,
    /// Present where it is not supported; counts as absent.
    Ignored,
}

/// Reads the annotation's value: `true` or `false` in any case, surrounding whitespace ignored.
pub fn parse_annotation_value(raw: &str) -> Option<bool> {
    let value = raw.trim();
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// All PeerAuthentication objects at one moment, indexed for [`PolicySet::resolve`]. Immutable:
/// a change builds a new set.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySet {
    root_namespace: String,
    /// Oldest first; the order in which winners are chosen.
    pub(super) policies: Vec<PeerAuthentication>,
    reports: Vec<PolicyReport>,
    /// Per policy (same index), its annotation as resolution reads it.
    #[serde(skip)]
    pub(super) annotations: Vec<AlpnAnnotation>,
    /// Per namespace, the selector-less policy that counts (in the root namespace: the mesh
    /// policy).
    #[serde(skip)]
    pub(super) namespace_level: HashMap<String, usize>,
    /// Per namespace other than the root, its selector policies, oldest first.
    #[serde(skip)]
    pub(super) workload_level: HashMap<String, Vec<usize>>,
}

impl PolicySet {
    /// Indexes `policies`; `root_namespace` is Istio's root namespace (meshConfig
    /// `rootNamespace`, usually [`DEFAULT_ROOT_NAMESPACE`](super::DEFAULT_ROOT_NAMESPACE)).
    pub fn new(mut policies: Vec<PeerAuthentication>, root_namespace: &str) -> Self {
        // istiod's order (`sortConfigByCreationTime`): creation time, then name, then namespace.
        // Istio 1.11 broke ties on the string `name.namespace` instead; within one namespace,
        // where every choice is made, that differs only for names extending another name with
        // a character that sorts before '.', such as `web` and `web-2`. The origin comes last
        // only to make the choice between duplicates deterministic.
        policies.sort_by(|a, b| {
            (&a.creation_timestamp, &a.name, &a.namespace, &a.origin).cmp(&(
                &b.creation_timestamp,
                &b.name,
                &b.namespace,
                &b.origin,
            ))
        });
        let mut set = Self {
            root_namespace: root_namespace.to_string(),
            policies: Vec::with_capacity(policies.len()),
            reports: Vec::new(),
            annotations: Vec::with_capacity(policies.len()),
            namespace_level: HashMap::new(),
            workload_level: HashMap::new(),
        };

        let mut seen: HashMap<PolicyRef, String> = HashMap::new();
        for policy in policies {
            let policy_ref = policy.policy_ref();
            if let Some(first_origin) = seen.get(&policy_ref) {
                let message = format!(
                    "policy {policy_ref} is defined more than once: the copy from {} is ignored, \
                     the one from {first_origin} is used (it is older, or sorts first)",
                    policy.origin
                );
                set.report(&policy_ref, PolicyReportKind::DuplicateName, message);
                continue;
            }
            seen.insert(policy_ref, policy.origin.clone());
            set.add(policy);
        }
        set
    }

    fn add(&mut self, policy: PeerAuthentication) {
        let index = self.policies.len();
        let policy_ref = policy.policy_ref();
        let in_root = policy.namespace == self.root_namespace;
        let annotation = self.judge_annotation(&policy);
        self.annotations.push(annotation);

        if policy.has_selector() && in_root {
            let message = format!(
                "policy {policy_ref} has a selector but lives in the root namespace {}: istiod \
                 ignores it, for every workload, including those in the root namespace",
                self.root_namespace
            );
            self.report(
                &policy_ref,
                PolicyReportKind::SelectorInRootNamespace,
                message,
            );
        } else if policy.has_selector() {
            self.workload_level
                .entry(policy.namespace.clone())
                .or_default()
                .push(index);
        } else {
            let level = if in_root {
                PolicyLevel::Mesh
            } else {
                PolicyLevel::Namespace
            };
            if !policy.port_level.is_empty() {
                let message = format!(
                    "portLevelMtls on {level} policy {policy_ref} is ignored: only a policy with \
                     a selector may set it"
                );
                self.report(
                    &policy_ref,
                    PolicyReportKind::PortLevelWithoutSelector,
                    message,
                );
            }
            match self.namespace_level.get(&policy.namespace) {
                Some(&winner) => {
                    let winner = &self.policies[winner];
                    let message = format!(
                        "{level} policy {policy_ref} is ignored: {level} policy {} {}, and only \
                         one policy per level counts{}",
                        winner.policy_ref(),
                        why_first(winner, &policy),
                        annotation_also_ignored(annotation),
                    );
                    self.report(&policy_ref, PolicyReportKind::Shadowed, message);
                }
                None => {
                    self.namespace_level.insert(policy.namespace.clone(), index);
                }
            }
        }
        self.policies.push(policy);
    }

    /// Reads the policy's annotation, reporting a bad value or a placement that is ignored.
    fn judge_annotation(&mut self, policy: &PeerAuthentication) -> AlpnAnnotation {
        let Some(raw) = &policy.annotation else {
            return AlpnAnnotation::Absent;
        };
        let policy_ref = policy.policy_ref();
        let in_root = policy.namespace == self.root_namespace;
        if policy.has_selector() && in_root {
            // Reported as a whole as SelectorInRootNamespace.
            return AlpnAnnotation::Ignored;
        }
        if in_root || policy.namespace == ISTIO_SYSTEM_NAMESPACE {
            let place = if in_root {
                format!("the root namespace {}", policy.namespace)
            } else {
                ISTIO_SYSTEM_NAMESPACE.to_string()
            };
            let message = format!(
                "annotation {ALPN_ANNOTATION}={raw:?} on {policy_ref} is ignored: it is not \
                 supported on policies in {place}; the policy's mTLS mode still counts"
            );
            self.report(&policy_ref, PolicyReportKind::IgnoredPlacement, message);
            return AlpnAnnotation::Ignored;
        }
        match parse_annotation_value(raw) {
            Some(value) => AlpnAnnotation::Value(value),
            None => {
                let message = format!(
                    "annotation {ALPN_ANNOTATION} on {policy_ref} has the value {raw:?}; only \
                     \"true\" or \"false\" count, so it is treated as absent"
                );
                self.report(&policy_ref, PolicyReportKind::BadAnnotationValue, message);
                AlpnAnnotation::Bad
            }
        }
    }

    fn report(&mut self, policy: &PolicyRef, kind: PolicyReportKind, message: String) {
        self.reports.push(PolicyReport {
            policy: policy.clone(),
            kind,
            message,
        });
    }

    /// The root namespace this set was indexed for.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Problems found while indexing: bad annotation values, annotations in the root namespace
    /// or `istio-system`, selector policies in the root namespace, shadowed namespace and mesh
    /// policies, ignored `portLevelMtls`, duplicate names. Not logged here: the caller does.
    pub fn reports(&self) -> &[PolicyReport] {
        &self.reports
    }

    /// Every policy (duplicates dropped), oldest first.
    pub fn policies(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.policies.iter()
    }

    /// The number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether the set holds no policy.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The reports about policies in `namespace` or the root namespace that `keep` accepts.
    pub(super) fn reports_about(
        &self,
        namespace: &str,
        keep: impl Fn(&PeerAuthentication) -> bool,
    ) -> Vec<PolicyReport> {
        let relevant: BTreeSet<PolicyRef> = self
            .policies
            .iter()
            .filter(|p| p.namespace == namespace || p.namespace == self.root_namespace)
            .filter(|p| keep(p))
            .map(PeerAuthentication::policy_ref)
            .collect();
        self.reports
            .iter()
            .filter(|r| relevant.contains(&r.policy))
            .cloned()
            .collect()
    }
}

/// Why `winner` comes before `loser` in istiod's order.
pub(super) fn why_first(winner: &PeerAuthentication, loser: &PeerAuthentication) -> &'static str {
    match (&winner.creation_timestamp, &loser.creation_timestamp) {
        (a, b) if a == b => "was created at the same time and its name sorts first",
        (None, _) => "has no creationTimestamp, which counts as oldest",
        _ => "is older",
    }
}

fn annotation_also_ignored(annotation: AlpnAnnotation) -> String {
    match annotation {
        AlpnAnnotation::Value(_) => format!("; its {ALPN_ANNOTATION} annotation is ignored too"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::policy_set;
    use crate::policy::{MtlsMode, parse_yaml};

    fn kinds(set: &PolicySet) -> Vec<(String, PolicyReportKind)> {
        set.reports()
            .iter()
            .map(|r| (r.policy.to_string(), r.kind))
            .collect()
    }

    #[test]
    fn annotation_values_are_case_and_space_insensitive() {
        for raw in ["true", "TRUE", "True", " true", "true\n", "\ttRuE  "] {
            assert_eq!(parse_annotation_value(raw), Some(true), "{raw:?}");
        }
        for raw in ["false", "FALSE", " False "] {
            assert_eq!(parse_annotation_value(raw), Some(false), "{raw:?}");
        }
        for raw in ["", "yes", "1", "on", "t", "true false", "\"true\""] {
            assert_eq!(parse_annotation_value(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn bad_values_are_reported_with_object_and_value() {
        let set = policy_set(
            "istio-system",
            &["shop/web sel=app:web alpn=yes", "shop/ok alpn=_TRUE_"],
        );
        assert_eq!(
            kinds(&set),
            [("shop/web".into(), PolicyReportKind::BadAnnotationValue)]
        );
        let message = &set.reports()[0].message;
        assert!(
            message.contains("shop/web") && message.contains("\"yes\""),
            "{message}"
        );
    }

    #[test]
    fn annotations_in_root_namespace_and_istio_system_are_ignored() {
        let set = policy_set(
            "istio-system",
            &["istio-system/default alpn=true", "shop/default alpn=true"],
        );
        assert_eq!(
            kinds(&set),
            [(
                "istio-system/default".into(),
                PolicyReportKind::IgnoredPlacement
            )]
        );
        assert!(set.reports()[0].message.contains("root namespace"));

        // With another root namespace, both the root and istio-system are unsupported places.
        let set = policy_set(
            "mesh-root",
            &[
                "mesh-root/default alpn=true",
                "istio-system/default alpn=false",
                "istio-system/gw sel=app:gw alpn=true",
                "shop/default alpn=true",
            ],
        );
        let mut found = kinds(&set);
        found.sort();
        assert_eq!(
            found,
            [
                (
                    "istio-system/default".into(),
                    PolicyReportKind::IgnoredPlacement
                ),
                ("istio-system/gw".into(), PolicyReportKind::IgnoredPlacement),
                (
                    "mesh-root/default".into(),
                    PolicyReportKind::IgnoredPlacement
                ),
            ]
        );
    }

    #[test]
    fn namespace_and_mesh_duplicates_are_shadowed_oldest_wins() {
        let set = policy_set(
            "istio-system",
            &[
                "shop/newer ts=200 mode=STRICT",
                "shop/older ts=100 mode=DISABLE alpn=true",
                "istio-system/b ts=50",
                "istio-system/a ts=50",
            ],
        );
        assert_eq!(
            kinds(&set),
            [
                ("istio-system/b".into(), PolicyReportKind::Shadowed),
                ("shop/newer".into(), PolicyReportKind::Shadowed),
            ]
        );
        assert!(
            set.reports()[0]
                .message
                .contains("mesh policy istio-system/a")
        );
        assert!(set.reports()[0].message.contains("name sorts first"));
        assert!(
            set.reports()[1]
                .message
                .contains("namespace policy shop/older is older")
        );
        let winner = set
            .namespace_level
            .get("shop")
            .map(|&i| set.policies[i].name.as_str());
        assert_eq!(winner, Some("older"));
    }

    #[test]
    fn selector_in_root_namespace_and_port_level_without_selector_are_reported() {
        let set = policy_set(
            "istio-system",
            &[
                "istio-system/web sel=app:web mode=STRICT",
                "shop/default port=8080:STRICT",
            ],
        );
        assert_eq!(
            kinds(&set),
            [
                (
                    "shop/default".into(),
                    PolicyReportKind::PortLevelWithoutSelector
                ),
                (
                    "istio-system/web".into(),
                    PolicyReportKind::SelectorInRootNamespace
                ),
            ]
        );
        assert!(set.workload_level.is_empty());
    }

    #[test]
    fn duplicate_names_keep_the_first_in_order() {
        let set = policy_set(
            "istio-system",
            &[
                "shop/a ts=20 mode=STRICT origin=b.yaml",
                "shop/a ts=10 mode=DISABLE origin=a.yaml",
            ],
        );
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.policies().next().map(|p| p.mode),
            Some(MtlsMode::Disable)
        );
        assert_eq!(
            kinds(&set),
            [("shop/a".into(), PolicyReportKind::DuplicateName)]
        );
        assert!(set.reports()[0].message.contains("from b.yaml is ignored"));
    }

    #[test]
    fn serializes_policies_and_reports() {
        let outcome = parse_yaml(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: a, namespace: shop, annotations: {http-alpns.aspenmesh.io: maybe}}\n",
            "f.yaml",
        );
        let set = PolicySet::new(outcome.policies, "istio-system");
        let json = serde_json::to_value(&set).expect("serializes");
        assert_eq!(json["root_namespace"], "istio-system");
        assert_eq!(json["policies"][0]["name"], "a");
        assert_eq!(json["policies"][0]["mode"], "UNSET");
        assert_eq!(json["reports"][0]["kind"], "bad_annotation_value");
    }
}
