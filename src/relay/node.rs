//! Who is on the other end of a stream: the node id and workload of an Istio proxy, read from the
//! `Node` of its first request.

use std::collections::BTreeMap;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use serde::Serialize;

use crate::policy::Workload;

/// The proxy behind one ADS stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProxyIdentity {
    /// The Envoy node id, e.g. `sidecar~10.1.2.3~web-1.shop~shop.svc.cluster.local`.
    pub node_id: String,
    /// The workload the policy is resolved for; `None` when neither the metadata nor the node id
    /// names a namespace.
    pub workload: Option<Workload>,
    /// Where the workload came from: `metadata` or `node id`.
    pub workload_from: &'static str,
    /// `ISTIO_VERSION` from the node metadata, when present.
    pub istio_version: Option<String>,
}

impl ProxyIdentity {
    /// Reads the identity from the bytes of an `envoy.config.core.v3.Node`.
    pub fn from_node_bytes(node: &Bytes) -> Result<Self, prost::DecodeError> {
        let node = Node::decode(node.clone())?;
        Ok(Self::from_node(&node))
    }

    /// Reads the identity from a decoded node: metadata `NAMESPACE`, `NAME` and `LABELS` as
    /// pilot-agent sets them, the node id as a fallback for the namespace and pod name.
    pub fn from_node(node: &Node) -> Self {
        let metadata = node.metadata.as_ref();
        let field = |key: &str| metadata.and_then(|m| string_field(m, key));

        let from_id = parse_sidecar_id(&node.id);
        let namespace = field("NAMESPACE").or_else(|| from_id.as_ref().map(|id| id.1.clone()));
        let name = field("NAME").or_else(|| from_id.as_ref().map(|id| id.0.clone()));
        let labels = metadata
            .and_then(|m| m.fields.get("LABELS"))
            .and_then(struct_of_strings)
            .unwrap_or_default();

        let workload_from = if field("NAMESPACE").is_some() {
            "metadata"
        } else {
            "node id"
        };
        let workload = namespace.map(|namespace| Workload {
            namespace,
            name: name.unwrap_or_default(),
            labels,
        });

        Self {
            node_id: node.id.clone(),
            workload,
            workload_from,
            istio_version: field("ISTIO_VERSION"),
        }
    }
}

fn string_field(metadata: &Struct, key: &str) -> Option<String> {
    match metadata.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn struct_of_strings(value: &Value) -> Option<BTreeMap<String, String>> {
    let Some(Kind::StructValue(s)) = value.kind.as_ref() else {
        return None;
    };
    let labels = s
        .fields
        .iter()
        .filter_map(|(k, v)| match v.kind.as_ref()? {
            Kind::StringValue(s) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect();
    Some(labels)
}

/// Splits `sidecar~IP~POD.NS~NS.svc.cluster.local` into (pod, namespace).
fn parse_sidecar_id(id: &str) -> Option<(String, String)> {
    let mut parts = id.split('~');
    let _kind = parts.next()?;
    let _ip = parts.next()?;
    let pod_dot_ns = parts.next()?;
    let domain = parts.next()?;

    // The domain starts with the namespace; the pod part ends with it. Prefer the domain, which
    // cannot be confused by dots in pod names.
    let namespace = domain.split('.').next().filter(|ns| !ns.is_empty())?;
    let pod = pod_dot_ns
        .strip_suffix(namespace)
        .and_then(|p| p.strip_suffix('.'))
        .unwrap_or(pod_dot_ns);
    Some((pod.to_string(), namespace.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    #[test]
    fn metadata_names_the_workload() {
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), string("web"));
        let mut md = Struct::default();
        md.fields.insert("NAMESPACE".into(), string("shop"));
        md.fields.insert("NAME".into(), string("web-1"));
        md.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        let node = Node {
            id: "sidecar~10.0.0.1~other.ns~ns.svc.cluster.local".into(),
            metadata: Some(md),
            ..Default::default()
        };

        let identity = ProxyIdentity::from_node(&node);
        let workload = identity.workload.unwrap();
        assert_eq!(workload.namespace, "shop");
        assert_eq!(workload.name, "web-1");
        assert_eq!(workload.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(identity.workload_from, "metadata");
    }

    #[test]
    fn node_id_is_the_fallback() {
        let node = Node {
            id: "sidecar~10.0.0.1~web-5d8f.x.shop~shop.svc.cluster.local".into(),
            ..Default::default()
        };
        let identity = ProxyIdentity::from_node(&node);
        let workload = identity.workload.unwrap();
        assert_eq!(workload.namespace, "shop");
        assert_eq!(workload.name, "web-5d8f.x");
        assert!(workload.labels.is_empty());
        assert_eq!(identity.workload_from, "node id");
    }

    #[test]
    fn unknown_node_has_no_workload() {
        let node = Node {
            id: "test-node".into(),
            ..Default::default()
        };
        assert!(ProxyIdentity::from_node(&node).workload.is_none());
    }
}
