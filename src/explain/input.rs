//! The inputs of `explain`, read from files and flags: the policies (read as `serve` reads
//! them), the listener dump, and the workload, which node metadata gives through the relay's own
//! [`ProxyIdentity`] so that `explain` and the relay cannot disagree about who a proxy is.

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as ProtoValue, value::Kind};
use serde::Serialize;
use serde_json::{Map, Value};

use super::ExplainError;
use crate::config::ExplainArgs;
use crate::dump::{self, DumpError, DumpedListener};
use crate::policy::{PolicyError, PolicySet, Workload, parse_yaml};
use crate::relay::node::ProxyIdentity;
use crate::source::{PolicySnapshot, files::FolderSource};

/// The policies `explain` resolves against, and the documents that could not be used.
#[derive(Debug)]
pub(super) struct LoadedPolicies {
    /// The indexed policies.
    pub set: PolicySet,
    /// Documents that could not be read, with their file, position and field.
    pub errors: Vec<PolicyError>,
}

/// The workload a decision is explained for, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadInfo {
    /// Namespace, pod name and labels, as policy resolution sees them.
    #[serde(flatten)]
    pub workload: Workload,
    /// Where the workload came from: `flags`, `node metadata` or `node id`.
    pub from: String,
    /// The node id, when node metadata was given and holds one.
    pub node_id: Option<String>,
    /// `ISTIO_VERSION` from the node metadata, when present.
    pub istio_version: Option<String>,
    /// The node metadata sets `HTTP10` to `1`, which makes istiod accept HTTP/1.0 for this proxy.
    pub http10_metadata: bool,
}

/// The workload from `--namespace`, `--pod` and `--labels`, or from `--node-metadata`.
pub(super) fn workload(args: &ExplainArgs) -> Result<WorkloadInfo, ExplainError> {
    if let Some(path) = &args.node_metadata {
        let text = read(path, "--node-metadata")?;
        return workload_from_node_json(&text, path);
    }
    let Some(namespace) = &args.namespace else {
        return Err(ExplainError::NoWorkloadFlags);
    };
    let mut labels = BTreeMap::new();
    for (key, value) in &args.labels {
        if let Some(first) = labels.insert(key.clone(), value.clone())
            && first != *value
        {
            return Err(ExplainError::LabelTwice {
                key: key.clone(),
                first,
                second: value.clone(),
            });
        }
    }
    Ok(WorkloadInfo {
        workload: Workload {
            namespace: namespace.clone(),
            name: args.pod.clone().unwrap_or_default(),
            labels,
        },
        from: "flags".to_string(),
        node_id: None,
        istio_version: None,
        http10_metadata: false,
    })
}

/// Reads the workload from the text of a `--node-metadata` file.
fn workload_from_node_json(text: &str, path: &Path) -> Result<WorkloadInfo, ExplainError> {
    let file = path.display().to_string();
    let document: Value =
        serde_json::from_str(text).map_err(|source| ExplainError::NodeMetadataSyntax {
            path: file.clone(),
            source,
        })?;
    let node =
        node_from_json(&document).map_err(|(field, problem)| ExplainError::NodeMetadata {
            path: file.clone(),
            field,
            problem,
        })?;

    let identity = ProxyIdentity::from_node(&node);
    let Some(workload) = identity.workload else {
        return Err(ExplainError::NodeMetadataNamesNoWorkload {
            path: file,
            node_id: node.id,
        });
    };
    let http10 = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("HTTP10"))
        .and_then(|v| v.kind.as_ref())
        .is_some_and(|kind| matches!(kind, Kind::StringValue(s) if s == "1"));
    Ok(WorkloadInfo {
        workload,
        from: identity.workload_from.to_string(),
        node_id: Some(identity.node_id).filter(|id| !id.is_empty()),
        istio_version: identity.istio_version,
        http10_metadata: http10,
    })
}

/// Finds the Envoy node in a JSON document: a config dump (its bootstrap section), a
/// `BootstrapConfigDump`, a bootstrap, a node, or the metadata object alone. On failure, the
/// field at fault and what is wrong with it.
fn node_from_json(document: &Value) -> Result<Node, (String, String)> {
    let Value::Object(top) = document else {
        return Err((
            "(top level)".into(),
            format!("expected an object, found {}", kind(document)),
        ));
    };
    if let Some(configs) = top.get("configs") {
        let Value::Array(sections) = configs else {
            return Err((
                "configs".into(),
                format!("expected an array, found {}", kind(configs)),
            ));
        };
        let bootstrap = sections.iter().enumerate().find(|(_, section)| {
            section
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("BootstrapConfigDump"))
        });
        let Some((index, section)) = bootstrap else {
            return Err((
                "configs".into(),
                "the config dump has no BootstrapConfigDump section".into(),
            ));
        };
        return bootstrap_node(section, &format!("configs[{index}]"));
    }
    if top.contains_key("bootstrap") {
        return bootstrap_node(document, "");
    }
    if top.get("node").is_some_and(Value::is_object) {
        return node(&top["node"], "node");
    }
    if top.contains_key("id") || top.contains_key("metadata") {
        return node(document, "");
    }
    Ok(Node {
        metadata: Some(metadata(top, "")?),
        ..Node::default()
    })
}

/// The node of a `BootstrapConfigDump` at `path`.
fn bootstrap_node(dump: &Value, path: &str) -> Result<Node, (String, String)> {
    let path = join(path, "bootstrap");
    let Some(bootstrap) = dump.get("bootstrap").filter(|b| b.is_object()) else {
        return Err((path, "expected the Envoy bootstrap, an object".into()));
    };
    match bootstrap.get("node") {
        Some(found) => node(found, &join(&path, "node")),
        None => Err((path, "the bootstrap has no node".into())),
    }
}

/// An Envoy node at `path`: its `id` and `metadata`; other fields are not needed.
fn node(value: &Value, path: &str) -> Result<Node, (String, String)> {
    let Value::Object(fields) = value else {
        return Err((
            or_top(path),
            format!("expected an Envoy node, found {}", kind(value)),
        ));
    };
    let id = match fields.get("id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(id)) => id.clone(),
        Some(other) => {
            return Err((
                join(path, "id"),
                format!("expected a string, found {}", kind(other)),
            ));
        }
    };
    let metadata = match fields.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => Some(metadata(map, &join(path, "metadata"))?),
        Some(other) => {
            return Err((
                join(path, "metadata"),
                format!("expected an object, found {}", kind(other)),
            ));
        }
    };
    Ok(Node {
        id,
        metadata,
        ..Node::default()
    })
}

/// Node metadata as a protobuf `Struct`, checking the fields that name the workload: a wrong
/// shape there would silently give a workload without its namespace or labels.
fn metadata(map: &Map<String, Value>, path: &str) -> Result<Struct, (String, String)> {
    for key in ["NAMESPACE", "NAME"] {
        match map.get(key) {
            None | Some(Value::String(_)) => {}
            Some(other) => {
                return Err((
                    join(path, key),
                    format!("expected a string, found {}", kind(other)),
                ));
            }
        }
    }
    match map.get("LABELS") {
        None => {}
        Some(Value::Object(labels)) => {
            if let Some((key, value)) = labels.iter().find(|(_, v)| !v.is_string()) {
                return Err((
                    join(&join(path, "LABELS"), key),
                    format!("a label value must be a string, found {}", kind(value)),
                ));
            }
        }
        Some(other) => {
            return Err((
                join(path, "LABELS"),
                format!("expected an object of labels, found {}", kind(other)),
            ));
        }
    }
    Ok(to_struct(map))
}

fn to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(value: &Value) -> ProtoValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    ProtoValue { kind: Some(kind) }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn or_top(path: &str) -> String {
    if path.is_empty() {
        "(top level)".to_string()
    } else {
        path.to_string()
    }
}

fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Reads the policies at `path`: a folder exactly as `serve --policy-dir` reads it, or one file.
pub(super) fn policies(path: &Path, root_namespace: &str) -> Result<LoadedPolicies, ExplainError> {
    if path.is_dir() {
        let mut source = FolderSource::new(path, root_namespace);
        let snapshot = source
            .read()
            .map_err(ExplainError::PolicyDir)?
            .unwrap_or_else(|| PolicySnapshot::empty(root_namespace, "explain"));
        return Ok(LoadedPolicies {
            set: snapshot.set,
            errors: snapshot.errors,
        });
    }
    let text = read(path, "--policy-dir")?;
    let outcome = parse_yaml(&text, &path.display().to_string());
    Ok(LoadedPolicies {
        set: PolicySet::new(outcome.policies, root_namespace),
        errors: outcome.errors,
    })
}

/// Reads every listener of the dump at `path`; a listener that cannot be read keeps its error.
pub(super) fn listeners(
    path: &Path,
) -> Result<Vec<Result<DumpedListener, DumpError>>, ExplainError> {
    let text = read(path, "--listeners")?;
    let file = path.display().to_string();
    let listeners = dump::read_listeners(&text).map_err(|source| ExplainError::Dump {
        path: file.clone(),
        source,
    })?;
    // A dump none of whose listeners can be read explains nothing: that is an input error.
    if listeners.iter().all(Result::is_err) {
        let count = listeners.len();
        if let Some(Err(first)) = listeners.into_iter().next() {
            return Err(ExplainError::NoListenerReadable {
                path: file,
                count,
                first,
            });
        }
        return Ok(Vec::new());
    }
    Ok(listeners)
}

fn read(path: &Path, flag: &'static str) -> Result<String, ExplainError> {
    std::fs::read_to_string(path).map_err(|source| ExplainError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workload_of(document: Value) -> Result<WorkloadInfo, ExplainError> {
        workload_from_node_json(&document.to_string(), Path::new("node.json"))
    }

    fn metadata_json() -> Value {
        json!({"NAMESPACE": "shop", "NAME": "web-1", "LABELS": {"app": "web"},
               "ISTIO_VERSION": "1.19.0", "HTTP10": "1", "CLUSTER_ID": "Kubernetes"})
    }

    #[test]
    fn every_accepted_shape_gives_the_same_workload() {
        let node = json!({"id": "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
                          "metadata": metadata_json(), "userAgentName": "envoy"});
        let shapes = [
            metadata_json(),
            node.clone(),
            json!({"node": node.clone(), "static_resources": {}}),
            json!({"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                   "bootstrap": {"node": node.clone()}}),
            json!({"configs": [
                {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                 "bootstrap": {"node": node.clone()}},
                {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"}]}),
        ];
        for shape in shapes {
            let info = workload_of(shape.clone()).unwrap_or_else(|e| panic!("{shape}: {e}"));
            assert_eq!(info.workload.namespace, "shop", "{shape}");
            assert_eq!(info.workload.name, "web-1");
            assert_eq!(info.workload.labels["app"], "web");
            assert_eq!(info.from, "metadata");
            assert_eq!(info.istio_version.as_deref(), Some("1.19.0"));
            assert!(info.http10_metadata);
        }
    }

    #[test]
    fn the_node_id_names_the_workload_when_the_metadata_does_not() {
        let info = workload_of(json!({"id": "sidecar~10.0.0.1~web-2.shop~shop.svc.cluster.local"}))
            .unwrap();
        assert_eq!(info.workload.namespace, "shop");
        assert_eq!(info.workload.name, "web-2");
        assert_eq!(info.from, "node id");
        assert!(!info.http10_metadata);
    }

    #[test]
    fn bad_node_metadata_names_the_field() {
        let cases = [
            (json!([1]), "(top level): expected an object"),
            (json!({"NAMESPACE": 3}), "NAMESPACE: expected a string"),
            (
                json!({"NAMESPACE": "a", "LABELS": "app=web"}),
                "LABELS: expected an object",
            ),
            (
                json!({"NAMESPACE": "a", "LABELS": {"n": 1}}),
                "LABELS.n: a label value",
            ),
            (json!({"id": 7}), "id: expected a string"),
            (
                json!({"node": {"metadata": []}}),
                "node.metadata: expected an object",
            ),
            (
                json!({"configs": [{"@type": "x.ListenersConfigDump"}]}),
                "no BootstrapConfigDump",
            ),
            (
                json!({"configs": [{"@type": "x.BootstrapConfigDump"}]}),
                "configs[0].bootstrap:",
            ),
            (json!({"NAME": "web"}), "names no workload"),
        ];
        for (document, expected) in cases {
            let error = workload_of(document.clone()).unwrap_err().to_string();
            assert!(error.starts_with("--node-metadata node.json"), "{error}");
            assert!(error.contains(expected), "{document}: {error}");
        }
        let error = workload_from_node_json("{", Path::new("n.json")).unwrap_err();
        assert!(
            error.to_string().contains("n.json: not valid JSON"),
            "{error}"
        );
    }
}
