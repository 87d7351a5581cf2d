//! Why a document or object could not be read as a PeerAuthentication, and where exactly.

use std::fmt;

use serde::{Serialize, Serializer};

/// Where a problem was found: the origin (file path or `kubernetes`) and, for files, the
/// document (1-based, counted by `---`), the item of a `kind: List` (1-based), and the line and
/// column in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Site {
    /// File path, or `kubernetes`.
    pub origin: String,
    /// 1-based document index within the file.
    pub document: Option<usize>,
    /// 1-based index in the `items` of a `kind: List` document.
    pub item: Option<usize>,
    /// 1-based line in the file.
    pub line: Option<usize>,
    /// 1-based column in the file.
    pub column: Option<usize>,
}

impl Site {
    /// A site naming only the origin.
    pub fn origin(origin: &str) -> Self {
        Self {
            origin: origin.to_string(),
            ..Self::default()
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(document) = self.document {
            write!(f, ", document {document}")?;
        }
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, ", line {line} column {column}"),
            (Some(line), None) => write!(f, ", line {line}"),
            _ => Ok(()),
        }
    }
}

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// A field or simple map key, shown as `.name`.
    Field(String),
    /// A map key chosen by the user, shown as `["key"]`.
    Key(String),
    /// A list element, shown as `[index]` (0-based, as in the document).
    Index(usize),
}

/// The field at fault inside one object, e.g. `spec.portLevelMtls["8080"].mode`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath {
    /// The steps from the object's root.
    pub segments: Vec<PathSegment>,
    /// The last step's *key* is at fault, not its value (e.g. a port key that is no number).
    pub key_at_fault: bool,
}

impl FieldPath {
    /// The path of a field below the object's root, e.g. `["spec", "mtls", "mode"]`.
    pub fn fields(names: &[&str]) -> Self {
        Self {
            segments: names
                .iter()
                .map(|n| PathSegment::Field(n.to_string()))
                .collect(),
            key_at_fault: false,
        }
    }

    /// This path extended by a field.
    pub fn field(&self, name: &str) -> Self {
        self.push(PathSegment::Field(name.to_string()))
    }

    /// This path extended by a map key: dotted when it reads as a plain name, else bracketed.
    pub fn entry(&self, key: &str) -> Self {
        let plain = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if plain {
            self.field(key)
        } else {
            self.push(PathSegment::Key(key.to_string()))
        }
    }

    /// This path extended by a bracketed map key, whatever it looks like.
    pub fn key(&self, key: &str) -> Self {
        self.push(PathSegment::Key(key.to_string()))
    }

    /// The same path, marking its last key (rather than the value) as the fault.
    pub fn at_key(mut self) -> Self {
        self.key_at_fault = true;
        self
    }

    /// Whether the path is the object itself.
    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    fn push(&self, segment: PathSegment) -> Self {
        let mut segments = self.segments.clone();
        segments.push(segment);
        Self {
            segments,
            key_at_fault: false,
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                PathSegment::Field(name) if i == 0 => f.write_str(name)?,
                PathSegment::Field(name) => write!(f, ".{name}")?,
                PathSegment::Key(key) => write!(f, "[{key:?}]")?,
                PathSegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

impl Serialize for FieldPath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A document or object that could not be read as a PeerAuthentication. It names where
/// ([`Site`]), which object when that is readable (`namespace/name`), and which field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicyError {
    /// The text is not YAML, or holds something JSON cannot (tags, huge numbers, a key used
    /// twice in one mapping).
    #[error("{site}: invalid YAML: {message}")]
    Syntax {
        /// Where.
        site: Site,
        /// What the YAML parser said.
        message: String,
    },
    /// An object of kind PeerAuthentication whose field has the wrong shape or value.
    #[error("{site}: {}{}{message}", object_prefix(.object), field_prefix(.field))]
    InvalidField {
        /// Where.
        site: Site,
        /// `namespace/name` of the object, when readable.
        object: Option<String>,
        /// The field at fault.
        field: FieldPath,
        /// What is wrong with it.
        message: String,
    },
}

impl PolicyError {
    /// Where the problem was found.
    pub fn site(&self) -> &Site {
        match self {
            Self::Syntax { site, .. } | Self::InvalidField { site, .. } => site,
        }
    }

    /// The field at fault, for field errors.
    pub fn field(&self) -> Option<&FieldPath> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            Self::Syntax { .. } => None,
        }
    }

    pub(crate) fn site_mut(&mut self) -> &mut Site {
        match self {
            Self::Syntax { site, .. } | Self::InvalidField { site, .. } => site,
        }
    }
}

fn object_prefix(object: &Option<String>) -> String {
    object
        .as_ref()
        .map(|o| format!("{o}: "))
        .unwrap_or_default()
}

fn field_prefix(field: &FieldPath) -> String {
    if field.is_root() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_the_document() {
        let spec = FieldPath::fields(&["spec"]);
        assert_eq!(
            spec.field("mtls").field("mode").to_string(),
            "spec.mtls.mode"
        );
        let port = spec.field("portLevelMtls").key("abc");
        assert_eq!(port.to_string(), r#"spec.portLevelMtls["abc"]"#);
        let labels = spec.field("selector").field("matchLabels");
        assert_eq!(
            labels.entry("app").to_string(),
            "spec.selector.matchLabels.app"
        );
        assert_eq!(
            labels.entry("app.kubernetes.io/name").to_string(),
            r#"spec.selector.matchLabels["app.kubernetes.io/name"]"#
        );
        assert_eq!(
            labels.entry("8080").to_string(),
            r#"spec.selector.matchLabels["8080"]"#
        );
    }

    #[test]
    fn error_names_file_document_line_object_and_field() {
        let error = PolicyError::InvalidField {
            site: Site {
                origin: "policies/shop.yaml".into(),
                document: Some(2),
                item: None,
                line: Some(14),
                column: Some(11),
            },
            object: Some("shop/web".into()),
            field: FieldPath::fields(&["spec", "mtls", "mode"]),
            message: r#"unknown mode "STRICTT""#.into(),
        };
        assert_eq!(
            error.to_string(),
            r#"policies/shop.yaml, document 2, line 14 column 11: shop/web: spec.mtls.mode: unknown mode "STRICTT""#
        );
        let json = serde_json::to_value(&error).expect("serializes");
        assert_eq!(json["field"], "spec.mtls.mode");
        assert_eq!(json["kind"], "invalid_field");
        assert_eq!(json["site"]["document"], 2);
    }
}
