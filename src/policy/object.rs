//! Reads one PeerAuthentication object (JSON, as the Kubernetes API or a parsed YAML document
//! gives it) into a [`PeerAuthentication`], naming the field at fault when it cannot.

// The value read, a PeerAuthentication, is as large as the error; boxing the error would buy
// nothing on either path.
#![expect(clippy::result_large_err)]

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tracing::warn;

use super::ALPN_ANNOTATION;
use super::error::{FieldPath, PolicyError, Site};
use super::model::{MtlsMode, PeerAuthentication};
use super::time::Timestamp;

/// The API group of PeerAuthentication.
pub(crate) const GROUP: &str = "security.istio.io";

/// The versions read; their spec is the same message (`istio.security.v1beta1`).
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// The namespace of an object whose metadata names none. kubectl puts such an object in the
/// namespace of the current context, `default` unless configured; a file has no context, so
/// we take kubectl's default.
const DEFAULT_NAMESPACE: &str = "default";

impl PeerAuthentication {
    /// Reads one Kubernetes object of kind PeerAuthentication (`security.istio.io/v1` or
    /// `v1beta1`). `origin` says where it came from (a file path, or `kubernetes`) and is kept
    /// in the result and in errors.
    ///
    /// `apiVersion` and `kind` may be absent (list items of some clients omit them); when present
    /// they must name PeerAuthentication. Unknown `spec` fields are ignored with a warning, so
    /// that fields of newer Istio releases do not stop a policy from loading.
    pub fn from_object(object: &Value, origin: &str) -> Result<Self, PolicyError> {
        Reader::new(object, origin).read(object)
    }
}

/// Whether a document is meant as a PeerAuthentication: kind PeerAuthentication, and an
/// `apiVersion` in `security.istio.io` (or none, which [`read_document`] then reports).
pub(crate) fn is_peer_authentication(object: &Map<String, Value>) -> bool {
    let kind = object.get("kind").and_then(Value::as_str);
    let group = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(|v| v.split_once('/').map_or(v, |(group, _)| group));
    kind == Some("PeerAuthentication") && group.is_none_or(|g| g == GROUP)
}

/// [`PeerAuthentication::from_object`] for a document of a file, where `apiVersion` is
/// required as `kubectl apply` requires it.
pub(crate) fn read_document(
    object: &Value,
    origin: &str,
) -> Result<PeerAuthentication, PolicyError> {
    let reader = Reader::new(object, origin);
    if object.get("apiVersion").is_none_or(Value::is_null) {
        return Err(reader.fail(
            FieldPath::fields(&["apiVersion"]),
            format!("missing (expected {})", API_VERSIONS.join(" or ")),
        ));
    }
    reader.read(object)
}

/// Reads one object; knows its origin and, once readable, its `namespace/name` for errors.
struct Reader<'a> {
    origin: &'a str,
    object: Option<String>,
}

impl<'a> Reader<'a> {
    fn new(object: &Value, origin: &'a str) -> Self {
        let metadata = object.get("metadata");
        let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        Self {
            origin,
            object: name.map(|name| format!("{namespace}/{name}")),
        }
    }

    fn fail(&self, field: FieldPath, message: impl Into<String>) -> PolicyError {
        PolicyError::InvalidField {
            site: Site::origin(self.origin),
            object: self.object.clone(),
            field,
            message: message.into(),
        }
    }

    fn read(&self, object: &Value) -> Result<PeerAuthentication, PolicyError> {
        let Some(root) = object.as_object() else {
            return Err(self.fail(
                FieldPath::default(),
                format!("not an object (found {})", describe(object)),
            ));
        };
        self.check_type(root)?;

        let metadata_path = FieldPath::fields(&["metadata"]);
        let metadata = match root.get("metadata") {
            Some(Value::Object(metadata)) => metadata,
            None | Some(Value::Null) => return Err(self.fail(metadata_path, "missing")),
            Some(other) => return Err(self.not_a(metadata_path, "mapping", other)),
        };
        let mut policy = PeerAuthentication::new(
            self.optional_str(metadata, &metadata_path, "namespace")?
                .filter(|ns| !ns.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE),
            self.name(metadata, &metadata_path)?,
            self.origin,
        );
        policy.creation_timestamp = self.creation_timestamp(metadata, &metadata_path)?;
        policy.annotation = self.alpn_annotation(metadata, &metadata_path)?;

        let spec_path = FieldPath::fields(&["spec"]);
        let spec = match root.get("spec") {
            None | Some(Value::Null) => return Ok(policy),
            Some(Value::Object(spec)) => spec,
            Some(other) => return Err(self.not_a(spec_path, "mapping", other)),
        };
        for (field, value) in spec {
            let path = spec_path.field(field);
            match field.as_str() {
                "selector" => policy.selector = self.selector(value, &path)?,
                "mtls" => policy.mode = self.mode(value, &path)?,
                "portLevelMtls" => policy.port_level = self.port_level(value, &path)?,
                _ => self.ignore_unknown(&path),
            }
        }
        Ok(policy)
    }

    fn check_type(&self, root: &Map<String, Value>) -> Result<(), PolicyError> {
        match root.get("kind") {
            None | Some(Value::Null) => {}
            Some(Value::String(kind)) if kind == "PeerAuthentication" => {}
            Some(other) => {
                return Err(self.fail(
                    FieldPath::fields(&["kind"]),
                    format!("expected PeerAuthentication, found {}", quoted(other)),
                ));
            }
        }
        match root.get("apiVersion") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(version)) if API_VERSIONS.contains(&version.as_str()) => Ok(()),
            Some(other) => Err(self.fail(
                FieldPath::fields(&["apiVersion"]),
                format!(
                    "unsupported version {} (expected {})",
                    quoted(other),
                    API_VERSIONS.join(" or ")
                ),
            )),
        }
    }

    fn name(&self, metadata: &Map<String, Value>, path: &FieldPath) -> Result<String, PolicyError> {
        match self.optional_str(metadata, path, "name")? {
            Some(name) if !name.is_empty() => Ok(name.to_string()),
            Some(_) => Err(self.fail(path.field("name"), "empty")),
            None => Err(self.fail(path.field("name"), "missing")),
        }
    }

    /// istiod keeps the creation time as a Go `time.Time`; an object without one carries the
    /// zero time (year 1), which sorts before every real time, so it counts as the *oldest* and
    /// wins its level. `None` orders before every `Some` and gives the same result.
    fn creation_timestamp(
        &self,
        metadata: &Map<String, Value>,
        path: &FieldPath,
    ) -> Result<Option<Timestamp>, PolicyError> {
        let Some(text) = self.optional_str(metadata, path, "creationTimestamp")? else {
            return Ok(None);
        };
        Timestamp::parse_rfc3339(text).map(Some).ok_or_else(|| {
            self.fail(
                path.field("creationTimestamp"),
                format!("not an RFC 3339 time: {text:?}"),
            )
        })
    }

    /// Annotation values must be strings, as the API server requires; the ALPN annotation's raw
    /// value is kept and judged later, when policies are indexed.
    fn alpn_annotation(
        &self,
        metadata: &Map<String, Value>,
        path: &FieldPath,
    ) -> Result<Option<String>, PolicyError> {
        let path = path.field("annotations");
        let annotations = match metadata.get("annotations") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(annotations)) => annotations,
            Some(other) => return Err(self.not_a(path, "mapping", other)),
        };
        let mut found = None;
        for (key, value) in annotations {
            let Value::String(value) = value else {
                return Err(self.not_a(path.entry(key), "string", value));
            };
            if key == ALPN_ANNOTATION {
                found = Some(value.clone());
            }
        }
        Ok(found)
    }

    fn selector(
        &self,
        value: &Value,
        path: &FieldPath,
    ) -> Result<BTreeMap<String, String>, PolicyError> {
        let selector = match value {
            Value::Null => return Ok(BTreeMap::new()),
            Value::Object(selector) => selector,
            other => return Err(self.not_a(path.clone(), "mapping", other)),
        };
        let mut labels = BTreeMap::new();
        for (field, value) in selector {
            let path = path.field(field);
            if field != "matchLabels" {
                self.ignore_unknown(&path);
                continue;
            }
            let match_labels = match value {
                Value::Null => continue,
                Value::Object(match_labels) => match_labels,
                other => return Err(self.not_a(path, "mapping", other)),
            };
            for (key, value) in match_labels {
                let Value::String(value) = value else {
                    return Err(self.not_a(path.entry(key), "string", value));
                };
                labels.insert(key.clone(), value.clone());
            }
        }
        Ok(labels)
    }

    /// The mode of an `mtls` object (`spec.mtls` or a `portLevelMtls` value); absent is UNSET.
    fn mode(&self, mtls: &Value, path: &FieldPath) -> Result<MtlsMode, PolicyError> {
        let mtls = match mtls {
            Value::Null => return Ok(MtlsMode::Unset),
            Value::Object(mtls) => mtls,
            other => return Err(self.not_a(path.clone(), "mapping", other)),
        };
        let mut mode = MtlsMode::Unset;
        for (field, value) in mtls {
            let path = path.field(field);
            if field != "mode" {
                self.ignore_unknown(&path);
                continue;
            }
            mode = match value {
                Value::Null => MtlsMode::Unset,
                Value::String(text) => {
                    MtlsMode::from_istio(text).ok_or_else(|| self.fail(path, unknown_mode(text)))?
                }
                other => return Err(self.not_a(path, "string", other)),
            };
        }
        Ok(mode)
    }

    fn port_level(
        &self,
        value: &Value,
        path: &FieldPath,
    ) -> Result<BTreeMap<u32, MtlsMode>, PolicyError> {
        let ports = match value {
            Value::Null => return Ok(BTreeMap::new()),
            Value::Object(ports) => ports,
            other => return Err(self.not_a(path.clone(), "mapping", other)),
        };
        let mut modes = BTreeMap::new();
        for (key, mtls) in ports {
            let path = path.key(key);
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
                return Err(self.fail(path.at_key(), "not a port number"));
            }
            let port = key
                .parse::<u32>()
                .ok()
                .filter(|port| (1..=65_535).contains(port))
                .ok_or_else(|| self.fail(path.clone().at_key(), "port out of range 1-65535"))?;
            modes.insert(port, self.mode(mtls, &path)?);
        }
        Ok(modes)
    }

    fn optional_str<'v>(
        &self,
        map: &'v Map<String, Value>,
        path: &FieldPath,
        field: &str,
    ) -> Result<Option<&'v str>, PolicyError> {
        match map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(self.not_a(path.field(field), "string", other)),
        }
    }

    fn not_a(&self, path: FieldPath, wanted: &str, found: &Value) -> PolicyError {
        let hint = match found {
            Value::Bool(_) | Value::Number(_) if wanted == "string" => {
                format!("; quote it: \"{found}\"")
            }
            _ => String::new(),
        };
        self.fail(
            path,
            format!("not a {wanted} (found {}{hint})", describe(found)),
        )
    }

    fn ignore_unknown(&self, path: &FieldPath) {
        warn!(
            origin = self.origin,
            object = self.object.as_deref().unwrap_or("?"),
            field = %path,
            "unknown PeerAuthentication field ignored"
        );
    }
}

fn unknown_mode(text: &str) -> String {
    match MtlsMode::from_istio(&text.to_ascii_uppercase()) {
        Some(mode) => format!("unknown mode {text:?} (modes are upper case: {mode})"),
        None => format!("unknown mode {text:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn quoted(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        other => describe(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(spec: Value) -> Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        })
    }

    fn error(object: &Value) -> PolicyError {
        PeerAuthentication::from_object(object, "kubernetes").expect_err("should be rejected")
    }

    #[test]
    fn reads_every_field() {
        let object = json!({
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "creationTimestamp": "2024-05-01T10:00:00Z",
                "annotations": {"http-alpns.aspenmesh.io": " True ", "other": "x"},
            },
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "mtls": {"mode": "STRICT"},
                "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9090": {}},
            },
        });
        let policy = PeerAuthentication::from_object(&object, "kubernetes").expect("valid");
        assert_eq!(policy.policy_ref().to_string(), "shop/web");
        assert_eq!(
            policy.creation_timestamp,
            Timestamp::parse_rfc3339("2024-05-01T10:00:00Z")
        );
        assert_eq!(policy.annotation.as_deref(), Some(" True "));
        assert_eq!(policy.selector.get("app").map(String::as_str), Some("web"));
        assert_eq!(policy.mode, MtlsMode::Strict);
        assert_eq!(policy.port_level.get(&8080), Some(&MtlsMode::Permissive));
        assert_eq!(policy.port_level.get(&9090), Some(&MtlsMode::Unset));
        assert_eq!(policy.origin, "kubernetes");
    }

    #[test]
    fn absent_parts_take_their_defaults() {
        let object = json!({"metadata": {"name": "bare"}});
        let policy = PeerAuthentication::from_object(&object, "kubernetes").expect("valid");
        assert_eq!(policy.namespace, "default");
        assert_eq!(policy.mode, MtlsMode::Unset);
        assert!(policy.selector.is_empty() && policy.port_level.is_empty());
        assert_eq!(policy.creation_timestamp, None);
        assert_eq!(policy.annotation, None);

        // Nulls, as `kubectl --dry-run -o yaml` writes them, mean the same.
        let object = object_with_nulls();
        let policy = PeerAuthentication::from_object(&object, "kubernetes").expect("valid");
        assert_eq!(policy.mode, MtlsMode::Unset);
        assert!(!policy.has_selector());
    }

    fn object_with_nulls() -> Value {
        json!({
            "metadata": {"name": "n", "namespace": null, "creationTimestamp": null,
                         "annotations": null},
            "spec": {"selector": {"matchLabels": {}}, "mtls": {"mode": null},
                     "portLevelMtls": null},
        })
    }

    #[test]
    fn unknown_mode_names_the_field_and_value() {
        let error = error(&object(json!({"mtls": {"mode": "STRICTT"}})));
        assert_eq!(
            error.field().map(ToString::to_string).as_deref(),
            Some("spec.mtls.mode")
        );
        let text = error.to_string();
        assert!(text.starts_with("kubernetes: shop/web: spec.mtls.mode: unknown mode \"STRICTT\""));

        let error = error_text(json!({"mtls": {"mode": "strict"}}));
        assert!(error.contains("upper case: STRICT"), "{error}");
    }

    fn error_text(spec: Value) -> String {
        error(&object(spec)).to_string()
    }

    #[test]
    fn port_keys_must_be_port_numbers() {
        let text = error_text(json!({"selector": {"matchLabels": {"app": "web"}},
                                     "portLevelMtls": {"abc": {"mode": "STRICT"}}}));
        assert!(
            text.contains(r#"spec.portLevelMtls["abc"]: not a port number"#),
            "{text}"
        );
        for key in ["0", "65536", "99999999999"] {
            let text = error_text(json!({"portLevelMtls": {key: {"mode": "STRICT"}}}));
            assert!(text.contains("out of range"), "{key}: {text}");
        }
        let text = error_text(json!({"portLevelMtls": {"8080": {"mode": "OFF"}}}));
        assert!(
            text.contains(r#"spec.portLevelMtls["8080"].mode: unknown mode"#),
            "{text}"
        );
    }

    #[test]
    fn labels_and_annotations_must_be_strings() {
        let text = error_text(json!({"selector": {"matchLabels": {"app": 1}}}));
        assert!(
            text.contains("spec.selector.matchLabels.app: not a string"),
            "{text}"
        );

        let mut object = object(json!({}));
        object["metadata"]["annotations"] = json!({"http-alpns.aspenmesh.io": true});
        let text = error(&object).to_string();
        assert!(
            text.contains(r#"metadata.annotations["http-alpns.aspenmesh.io"]: not a string"#),
            "{text}"
        );
        assert!(text.contains(r#"quote it: "true""#), "{text}");
    }

    #[test]
    fn wrong_shapes_are_named() {
        let cases = [
            (
                json!({"metadata": {"namespace": "shop"}}),
                "metadata.name: missing",
            ),
            (json!({"metadata": {"name": ""}}), "metadata.name: empty"),
            (
                json!({"metadata": ["x"]}),
                "metadata: not a mapping (found a list)",
            ),
            (
                json!({"metadata": {"name": "a"}, "spec": "x"}),
                "spec: not a mapping",
            ),
            (
                json!({"metadata": {"name": "a", "creationTimestamp": "yesterday"}}),
                "metadata.creationTimestamp: not an RFC 3339 time",
            ),
            (
                json!({"kind": "AuthorizationPolicy", "metadata": {"name": "a"}}),
                "kind: expected PeerAuthentication",
            ),
            (
                json!({"apiVersion": "security.istio.io/v1alpha1", "metadata": {"name": "a"}}),
                "apiVersion: unsupported version \"security.istio.io/v1alpha1\"",
            ),
            (json!("text"), "not an object (found a string)"),
            (
                json!({"metadata": {"name": "a"}, "spec": {"mtls": "STRICT"}}),
                "spec.mtls: not a mapping",
            ),
        ];
        for (object, expected) in cases {
            let text = error(&object).to_string();
            assert!(text.contains(expected), "{text} should contain {expected}");
        }
    }

    #[test]
    fn errors_name_the_object_with_default_namespace() {
        let text = error(&json!({"metadata": {"name": "a"}, "spec": {"mtls": 3}})).to_string();
        assert!(
            text.starts_with("kubernetes: default/a: spec.mtls:"),
            "{text}"
        );
    }

    #[test]
    fn unknown_spec_fields_are_ignored() {
        let policy = PeerAuthentication::from_object(
            &object(json!({"mtls": {"mode": "DISABLE", "future": 1}, "future": {}})),
            "kubernetes",
        )
        .expect("valid");
        assert_eq!(policy.mode, MtlsMode::Disable);
    }

    #[test]
    fn recognises_peer_authentication_documents() {
        let is_pa = |value: Value| is_peer_authentication(value.as_object().expect("object"));
        assert!(is_pa(
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication"})
        ));
        assert!(is_pa(
            json!({"apiVersion": "security.istio.io/v9", "kind": "PeerAuthentication"})
        ));
        assert!(is_pa(json!({"kind": "PeerAuthentication"})));
        assert!(!is_pa(
            json!({"apiVersion": "other.io/v1", "kind": "PeerAuthentication"})
        ));
        assert!(!is_pa(
            json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication"})
        ));

        let missing = read_document(
            &json!({"kind": "PeerAuthentication", "metadata": {"name": "a"}}),
            "f.yaml",
        )
        .expect_err("apiVersion is required in files");
        assert!(
            missing.to_string().contains("apiVersion: missing"),
            "{missing}"
        );
    }
}
