//! PeerAuthentication from YAML text: several documents per file, `kind: List` documents, and
//! an error for each document that cannot be read, which never stops the others.

use serde::Serialize;
use serde_json::{Map, Value};
use tracing::debug;

use super::error::{FieldPath, PathSegment, PolicyError, Site};
use super::model::PeerAuthentication;
use super::object::{is_peer_authentication, read_document};
use super::yaml::{self, Document};

/// What one file gave: the policies read, and an error for each document (or list item) of kind
/// PeerAuthentication that could not be read, or that is not YAML.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ParseOutcome {
    /// The policies read, in file order.
    pub policies: Vec<PeerAuthentication>,
    /// The documents that could not be read, in file order.
    pub errors: Vec<PolicyError>,
}

/// Reads every PeerAuthentication (`security.istio.io/v1` or `v1beta1`) in `text`, a YAML file
/// of one or more documents separated by `---`; `kind: List` documents (and typed lists such
/// as `PeerAuthenticationList`) are read item by item. Documents of other kinds are skipped
/// (logged at debug level). Each object goes through [`PeerAuthentication::from_object`].
/// `origin` names the file in the result and in errors. Never panics.
pub fn parse_yaml(text: &str, origin: &str) -> ParseOutcome {
    let mut outcome = ParseOutcome::default();
    for document in yaml::split_documents(text) {
        if !document.has_content {
            continue;
        }
        match yaml::to_json(document.text) {
            Ok(value) => read_document_value(&value, &document, origin, &mut outcome),
            Err(error) => {
                let (message, position) = yaml::file_message(&error, &document);
                outcome.errors.push(PolicyError::Syntax {
                    site: site(origin, &document, None, position),
                    message,
                });
            }
        }
    }
    outcome
}

fn read_document_value(
    value: &Value,
    document: &Document<'_>,
    origin: &str,
    outcome: &mut ParseOutcome,
) {
    let Some(object) = value.as_object() else {
        debug!(
            origin,
            document = document.index,
            "skipping a document that is not a mapping"
        );
        return;
    };
    if !is_list(object) {
        read_object(value, document, None, origin, outcome);
        return;
    }
    match object.get("items") {
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                read_object(item, document, Some(index), origin, outcome);
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => {
            let field = FieldPath::fields(&["items"]);
            let position = locate(document, &field);
            outcome.errors.push(PolicyError::InvalidField {
                site: site(origin, document, None, position),
                object: None,
                field,
                message: "not a list".to_string(),
            });
        }
    }
}

/// `kind: List` as kubectl writes it, or a typed list as the API server returns it.
fn is_list(object: &Map<String, Value>) -> bool {
    object
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|kind| kind.ends_with("List"))
}

fn read_object(
    value: &Value,
    document: &Document<'_>,
    item: Option<usize>,
    origin: &str,
    outcome: &mut ParseOutcome,
) {
    let object = value.as_object();
    if !object.is_some_and(is_peer_authentication) {
        let field = |name| object.and_then(|o| o.get(name)).and_then(Value::as_str);
        debug!(
            origin,
            document = document.index,
            item = item.map(|i| i + 1),
            kind = field("kind"),
            api_version = field("apiVersion"),
            "skipping a document that is not a PeerAuthentication"
        );
        return;
    }
    match read_document(value, origin) {
        Ok(policy) => outcome.policies.push(policy),
        Err(mut error) => {
            // The error's path starts at the object; within the document, a list item's
            // object sits under `items[i]`.
            let mut path = error.field().cloned().unwrap_or_default();
            if let Some(index) = item {
                let mut segments = vec![
                    PathSegment::Field("items".to_string()),
                    PathSegment::Index(index),
                ];
                segments.append(&mut path.segments);
                path.segments = segments;
            }
            let position = locate(document, &path);
            *error.site_mut() = site(origin, document, item, position);
            outcome.errors.push(error);
        }
    }
}

/// The file position of `path` in `document`, or of the document's start if it cannot be found.
fn locate(document: &Document<'_>, path: &FieldPath) -> Option<(usize, usize)> {
    yaml::locate(document.text, path)
        .map(|(line, column)| document.file_position(line, column))
        .or(Some((document.first_line, 1)))
}

fn site(
    origin: &str,
    document: &Document<'_>,
    item: Option<usize>,
    position: Option<(usize, usize)>,
) -> Site {
    Site {
        origin: origin.to_string(),
        document: Some(document.index),
        item: item.map(|i| i + 1),
        line: position.map(|p| p.0),
        column: position.map(|p| p.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MtlsMode;

    const TWO_VERSIONS: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: web
  namespace: shop
  annotations:
    http-alpns.aspenmesh.io: \"true\"
spec:
  selector:
    matchLabels:
      app: web
  portLevelMtls:
    8080:
      mode: PERMISSIVE
";

    #[test]
    fn reads_v1_and_v1beta1_documents() {
        let outcome = parse_yaml(TWO_VERSIONS, "shop.yaml");
        assert_eq!(outcome.errors, vec![]);
        let names: Vec<_> = outcome
            .policies
            .iter()
            .map(|p| p.policy_ref().to_string())
            .collect();
        assert_eq!(names, ["shop/default", "shop/web"]);
        assert_eq!(outcome.policies[0].mode, MtlsMode::Strict);
        let web = &outcome.policies[1];
        assert_eq!(web.annotation.as_deref(), Some("true"));
        assert_eq!(web.port_level.get(&8080), Some(&MtlsMode::Permissive));
        assert_eq!(web.origin, "shop.yaml");
    }

    #[test]
    fn goes_through_from_object() {
        let outcome = parse_yaml(TWO_VERSIONS, "shop.yaml");
        let documents = yaml::split_documents(TWO_VERSIONS);
        for (document, policy) in documents.iter().zip(&outcome.policies) {
            let value = yaml::to_json(document.text).expect("valid");
            let direct = PeerAuthentication::from_object(&value, "shop.yaml").expect("valid");
            assert_eq!(&direct, policy);
        }
    }

    #[test]
    fn skips_other_kinds_silently() {
        let text = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: y}
---
just a string
---
apiVersion: other.example/v1
kind: PeerAuthentication
metadata: {name: z}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ok, namespace: shop}
";
        let outcome = parse_yaml(text, "mixed.yaml");
        assert_eq!(outcome.errors, vec![]);
        assert_eq!(outcome.policies.len(), 1);
        assert_eq!(outcome.policies[0].name, "ok");
    }

    #[test]
    fn malformed_document_is_reported_and_siblings_load() {
        let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: first, namespace: shop}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: web
  namespace: shop
spec:
  mtls:
    mode: STRICTT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: last, namespace: shop}
";
        let outcome = parse_yaml(text, "policies/shop.yaml");
        let names: Vec<_> = outcome.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["first", "last"]);
        assert_eq!(outcome.errors.len(), 1);
        let error = &outcome.errors[0];
        let site = error.site();
        assert_eq!(site.origin, "policies/shop.yaml");
        assert_eq!(site.document, Some(2));
        assert_eq!((site.line, site.column), (Some(12), Some(11)));
        assert_eq!(
            error.to_string(),
            "policies/shop.yaml, document 2, line 12 column 11: shop/web: spec.mtls.mode: \
             unknown mode \"STRICTT\" (expected UNSET, DISABLE, PERMISSIVE or STRICT)"
        );
    }

    #[test]
    fn bad_port_and_label_are_located() {
        let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector:
    matchLabels:
      app: web
  portLevelMtls:
    abc:
      mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: api, namespace: shop}
spec:
  selector:
    matchLabels:
      app: 7
";
        let outcome = parse_yaml(text, "f.yaml");
        assert_eq!(outcome.policies, vec![]);
        let texts: Vec<_> = outcome.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "f.yaml, document 1, line 9 column 5: shop/web: spec.portLevelMtls[\"abc\"]: \
                 not a port number",
                "f.yaml, document 2, line 18 column 12: shop/api: spec.selector.matchLabels.app: \
                 not a string (found a number; quote it: \"7\")",
            ]
        );
    }

    #[test]
    fn syntax_error_has_file_position_and_later_documents_load() {
        let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: shop}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: shop
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: c, namespace: shop}
";
        let outcome = parse_yaml(text, "broken.yaml");
        let names: Vec<_> = outcome.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        let [PolicyError::Syntax { site, message }] = outcome.errors.as_slice() else {
            panic!("expected one syntax error: {:?}", outcome.errors);
        };
        assert_eq!(site.document, Some(2));
        assert_eq!(
            site.line,
            Some(8),
            "the parser notices at the next line: {message}"
        );
        assert!(site.column.is_some());
        assert!(
            message.contains("at line 7"),
            "context line is a file line: {message}"
        );
    }

    #[test]
    fn reads_kind_list_items() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: a, namespace: shop}
- apiVersion: v1
  kind: Service
  metadata: {name: svc}
- apiVersion: security.istio.io/v1beta1
  kind: PeerAuthentication
  metadata: {name: b, namespace: shop}
  spec:
    mtls: {mode: Strict}
- apiVersion: security.istio.io/v1beta1
  kind: PeerAuthentication
  metadata: {name: c, namespace: shop}
  spec:
    mtls: {mode: DISABLE}
";
        let outcome = parse_yaml(text, "list.yaml");
        let names: Vec<_> = outcome.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(outcome.errors.len(), 1);
        let error = &outcome.errors[0];
        assert_eq!(error.site().item, Some(3));
        assert_eq!(error.site().line, Some(14));
        assert!(
            error
                .to_string()
                .contains("list.yaml, document 1, item 3, line 14"),
            "{error}"
        );
        assert!(
            error.to_string().contains("shop/b: spec.mtls.mode"),
            "{error}"
        );

        let typed = "apiVersion: security.istio.io/v1\nkind: PeerAuthenticationList\nitems:\n\
                     - kind: PeerAuthentication\n  apiVersion: security.istio.io/v1\n  \
                     metadata: {name: d}\n";
        assert_eq!(parse_yaml(typed, "t.yaml").policies.len(), 1);
        let bad = parse_yaml("kind: List\nitems: {a: 1}\n", "bad.yaml");
        assert!(
            bad.errors[0].to_string().contains("items: not a list"),
            "{:?}",
            bad.errors
        );
    }

    #[test]
    fn reads_kubectl_json_output() {
        let text = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {
      "apiVersion": "security.istio.io/v1",
      "kind": "PeerAuthentication",
      "metadata": {
        "name": "default",
        "namespace": "shop",
        "creationTimestamp": "2024-05-01T10:00:00Z",
        "annotations": {"http-alpns.aspenmesh.io": "true"}
      },
      "spec": {"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}
    }
  ]
}"#;
        let outcome = parse_yaml(text, "pa.json");
        assert_eq!(outcome.errors, vec![]);
        assert_eq!(outcome.policies.len(), 1);
        assert_eq!(
            outcome.policies[0].port_level.get(&8080),
            Some(&MtlsMode::Strict)
        );
    }

    #[test]
    fn missing_namespace_is_default_and_missing_name_is_reported() {
        let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {namespace: shop}
";
        let outcome = parse_yaml(text, "f.yaml");
        assert_eq!(outcome.policies[0].namespace, "default");
        assert_eq!(outcome.errors.len(), 1);
        let text = outcome.errors[0].to_string();
        assert!(text.starts_with("f.yaml, document 2, line 7"), "{text}");
        assert!(text.ends_with("metadata.name: missing"), "{text}");
    }

    #[test]
    fn duplicate_key_is_a_document_error() {
        let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: shop}
spec:
  mtls:
    mode: STRICT
    mode: DISABLE
";
        let outcome = parse_yaml(text, "dup.yaml");
        assert_eq!(outcome.policies, vec![]);
        let [PolicyError::Syntax { site, message }] = outcome.errors.as_slice() else {
            panic!("expected a syntax error: {:?}", outcome.errors);
        };
        assert_eq!((site.line, site.column), (Some(7), Some(5)));
        assert!(message.contains("duplicate key \"mode\""), "{message}");
    }

    #[test]
    fn never_panics_on_mangled_input() {
        // Every prefix of a real file and every single-byte corruption of it: whatever comes
        // out, parsing returns.
        let base = TWO_VERSIONS.as_bytes();
        let replacements = [
            b'{', b'[', b'-', b':', b'\'', b'"', b'&', b'*', b'!', b'\t', b'%',
        ];
        for cut in 0..base.len() {
            let _ = parse_yaml(&String::from_utf8_lossy(&base[..cut]), "cut.yaml");
        }
        for position in 0..base.len() {
            for replacement in replacements {
                let mut bytes = base.to_vec();
                bytes[position] = replacement;
                let _ = parse_yaml(&String::from_utf8_lossy(&bytes), "mangled.yaml");
            }
        }
        for text in [
            "&a [*a, *a]",
            "a: &a\n  b: *a\n",
            "[[[[[[[[[[[[",
            "---\n---\n...\n...",
            "? a",
        ] {
            let _ = parse_yaml(text, "odd.yaml");
        }
        let deep = "[".repeat(10_000);
        let outcome = parse_yaml(&deep, "deep.yaml");
        assert_eq!(outcome.errors.len(), 1);
    }
}
