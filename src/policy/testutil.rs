//! Compact builders of policies and workloads for the unit tests of this module.

use std::collections::BTreeMap;

use super::time::Timestamp;
use super::{MtlsMode, PeerAuthentication, PolicySet, Workload};

/// A policy from one line of words: `ns/name` first, then any of `sel=app:web,tier:x`,
/// `mode=STRICT`, `ts=SECONDS`, `alpn=VALUE` (`_` stands for a space), `port=8080:STRICT`
/// (repeatable), `origin=FILE`.
pub(crate) fn policy(spec: &str) -> PeerAuthentication {
    let mut words = spec.split_whitespace();
    let (namespace, name) = words
        .next()
        .and_then(|w| w.split_once('/'))
        .expect("ns/name first");
    let mut policy = PeerAuthentication::new(namespace, name, "test.yaml");
    for word in words {
        let (key, value) = word.split_once('=').expect("key=value");
        match key {
            "sel" => {
                for pair in value.split(',') {
                    let (k, v) = pair.split_once(':').expect("label k:v");
                    policy.selector.insert(k.into(), v.into());
                }
            }
            "mode" => policy.mode = MtlsMode::from_istio(value).expect("mode"),
            "ts" => {
                let seconds = value.parse().expect("seconds");
                policy.creation_timestamp = Some(Timestamp::from_unix(seconds));
            }
            "alpn" => policy.annotation = Some(value.replace('_', " ")),
            "port" => {
                let (port, mode) = value.split_once(':').expect("port:MODE");
                policy.port_level.insert(
                    port.parse().expect("port"),
                    MtlsMode::from_istio(mode).expect("mode"),
                );
            }
            "origin" => policy.origin = value.into(),
            other => panic!("unknown key {other}"),
        }
    }
    policy
}

/// A set of [`policy`] lines indexed with root namespace `root`.
pub(crate) fn policy_set(root: &str, specs: &[&str]) -> PolicySet {
    PolicySet::new(specs.iter().map(|s| policy(s)).collect(), root)
}

/// A workload `ns/name` with labels `k:v,k:v` (empty for none).
pub(crate) fn workload(id: &str, labels: &str) -> Workload {
    let (namespace, name) = id.split_once('/').expect("ns/name");
    let labels: BTreeMap<String, String> = labels
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once(':').expect("label k:v");
            (k.to_string(), v.to_string())
        })
        .collect();
    Workload {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels,
    }
}
