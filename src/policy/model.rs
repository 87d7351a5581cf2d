//! The policy vocabulary: mTLS modes, references to policies, a parsed PeerAuthentication and
//! the workload it may apply to.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::time::Timestamp;

/// A PeerAuthentication mTLS mode, spelled as Istio spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the level above (the mesh level's UNSET means PERMISSIVE).
    Unset,
    /// Plaintext only.
    Disable,
    /// Plaintext and mTLS; mTLS chains are told apart by Istio's own ALPN values.
    Permissive,
    /// mTLS only.
    Strict,
}

impl MtlsMode {
    /// The mode for Istio's exact spelling (`UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`).
    /// Case matters, as it does for istiod and the CRD schema.
    pub fn from_istio(text: &str) -> Option<Self> {
        match text {
            "UNSET" => Some(Self::Unset),
            "DISABLE" => Some(Self::Disable),
            "PERMISSIVE" => Some(Self::Permissive),
            "STRICT" => Some(Self::Strict),
            _ => None,
        }
    }

    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unset => "UNSET",
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one PeerAuthentication object; displays as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyRef {
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl PolicyRef {
    /// A reference to `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One PeerAuthentication object, reduced to what mTLS and ALPN resolution reads.
///
/// Built by [`PeerAuthentication::from_object`] (one Kubernetes object) or
/// [`parse_yaml`](super::parse_yaml) (a file), which goes through `from_object` too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    /// `metadata.namespace`; `default` when the object names none.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.creationTimestamp`; `None` when absent, which orders before every real time.
    pub creation_timestamp: Option<Timestamp>,
    /// `spec.selector.matchLabels`; empty means no selector (namespace or mesh level).
    pub selector: BTreeMap<String, String>,
    /// `spec.mtls.mode`; `Unset` when `mtls` or `mode` is absent.
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`, keyed by container port.
    pub port_level: BTreeMap<u32, MtlsMode>,
    /// The raw value of the `http-alpns.aspenmesh.io` annotation, if the object has one.
    pub annotation: Option<String>,
    /// Where the object was read: a file path, or `kubernetes`.
    pub origin: String,
}

impl PeerAuthentication {
    /// A policy in `namespace` named `name` with no selector, mode UNSET and nothing else set.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, origin: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            creation_timestamp: None,
            selector: BTreeMap::new(),
            mode: MtlsMode::Unset,
            port_level: BTreeMap::new(),
            annotation: None,
            origin: origin.to_string(),
        }
    }

    /// The reference `namespace/name` of this object.
    pub fn policy_ref(&self) -> PolicyRef {
        PolicyRef::new(&self.namespace, &self.name)
    }

    /// Whether the policy has a selector (non-empty `matchLabels`).
    pub fn has_selector(&self) -> bool {
        !self.selector.is_empty()
    }

    /// Whether every selector label is among `labels` with the same value. An empty selector
    /// selects everything.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// The workload behind a connected proxy, as far as policy matching needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name (for messages; matching does not use it).
    pub name: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_istio_spelling() {
        for mode in [
            MtlsMode::Unset,
            MtlsMode::Disable,
            MtlsMode::Permissive,
            MtlsMode::Strict,
        ] {
            assert_eq!(MtlsMode::from_istio(&mode.to_string()), Some(mode));
            let json = serde_json::to_value(mode).expect("serializes");
            assert_eq!(json, serde_json::Value::String(mode.to_string()));
        }
        assert_eq!(MtlsMode::from_istio("strict"), None);
    }

    #[test]
    fn selector_is_a_subset_match() {
        let mut policy = PeerAuthentication::new("shop", "web", "test");
        let labels: BTreeMap<String, String> = [("app", "web"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(policy.selects(&labels), "no selector selects everything");
        policy.selector.insert("app".into(), "web".into());
        assert!(policy.selects(&labels));
        policy.selector.insert("version".into(), "v2".into());
        assert!(!policy.selects(&labels));
        assert_eq!(policy.policy_ref().to_string(), "shop/web");
    }
}
