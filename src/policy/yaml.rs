//! YAML plumbing for [`parse_yaml`](super::parse_yaml): splitting a file into documents, reading
//! one document into JSON, and finding the line of a field named by a [`FieldPath`].
//!
//! Documents are split here rather than by the YAML library so that a syntax error in one
//! document does not hide the documents after it. A line starting with `---` or `...` (followed
//! by a space or the line's end) is a document marker in YAML wherever it stands, even inside a
//! block scalar, so splitting on those lines agrees with the parser.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::error::{FieldPath, PathSegment};

/// One document of a multi-document file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Document<'a> {
    /// 1-based index in the file.
    pub index: usize,
    /// 1-based line of the file where the document's text starts.
    pub first_line: usize,
    /// The document's text, its `---` marker included.
    pub text: &'a str,
    /// Whether the text holds anything but markers, comments, directives and blank lines.
    pub has_content: bool,
}

impl Document<'_> {
    /// A position inside the document's text, as a position in the file.
    pub fn file_position(&self, line: usize, column: usize) -> (usize, usize) {
        (self.first_line + line.saturating_sub(1), column)
    }
}

/// Splits a file into its documents. A part before the first `---` that holds only comments
/// or directives belongs to the first document; empty documents between two markers are
/// counted, as the YAML parser counts them.
pub(crate) fn split_documents(text: &str) -> Vec<Document<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut documents = Vec::new();
    let mut current = Pending::new(0, 1);
    let mut offset = 0;

    for (line_number, line) in (1..).zip(lines(text)) {
        let bare = line.trim_end_matches(LINE_BREAKS);
        if let Some(rest) = marker(bare, "---") {
            if current.has_content || current.has_marker {
                current.finish(text, offset, &mut documents);
                current = Pending::new(offset, line_number);
            }
            current.has_marker = true;
            current.has_content |= is_content(rest.trim_start(), true);
        } else if marker(bare, "...").is_some() {
            current.finish(text, offset + line.len(), &mut documents);
            current = Pending::new(offset + line.len(), line_number + 1);
        } else {
            current.has_content |= is_content(bare, current.has_marker);
        }
        offset += line.len();
    }
    current.finish(text, text.len(), &mut documents);
    documents
}

/// What the YAML library takes for a line break: `\n`, `\r` (and `\r\n` as one break), and,
/// following YAML 1.1, NEL, LS and PS. A `---` after any of them starts a document for the
/// parser, and each of them counts as a line in the positions it reports.
const LINE_BREAKS: [char; 5] = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];

/// The lines of `text`, each with its line break, split where the YAML library splits them.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .char_indices()
            .find_map(|(i, c)| match c {
                '\r' if rest[i + 1..].starts_with('\n') => Some(i + 2),
                c if LINE_BREAKS.contains(&c) => Some(i + c.len_utf8()),
                _ => None,
            })
            .unwrap_or(rest.len());
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some(line)
    })
}

/// A document being collected by [`split_documents`].
struct Pending {
    start: usize,
    first_line: usize,
    has_marker: bool,
    has_content: bool,
}

impl Pending {
    fn new(start: usize, first_line: usize) -> Self {
        Self {
            start,
            first_line,
            has_marker: false,
            has_content: false,
        }
    }

    fn finish<'a>(&self, text: &'a str, end: usize, documents: &mut Vec<Document<'a>>) {
        if !(self.has_marker || self.has_content) {
            return;
        }
        documents.push(Document {
            index: documents.len() + 1,
            first_line: self.first_line,
            text: text.get(self.start..end).unwrap_or_default(),
            has_content: self.has_content,
        });
    }
}

/// The rest of the line after a document marker (`---` or `...`), if the line is one.
fn marker<'l>(line: &'l str, marker: &str) -> Option<&'l str> {
    let rest = line.strip_prefix(marker)?;
    (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some(rest)
}

/// Whether a line carries YAML content. Directives (`%YAML`) only count before a document's
/// `---`; after it a `%` line is content (and the parser will say what it thinks of it).
fn is_content(line: &str, after_marker: bool) -> bool {
    let trimmed = line.trim();
    !trimmed.is_empty() && !trimmed.starts_with('#') && (after_marker || !line.starts_with('%'))
}

/// Reads one document's text into JSON. Fails, with the position, on YAML errors, on values
/// JSON cannot hold (tags, integers beyond 64 bits) and on a key repeated in one mapping,
/// which the API server rejects too. Non-finite floats become `null`.
pub(crate) fn to_json(text: &str) -> Result<Value, serde_yaml_ng::Error> {
    // The YAML library reads `text` as a stream. Text left over after the root node (`'x' y`, or
    // a line less indented than a nested mapping it cannot continue) is where the parser wants
    // the next document's `---`; read as a single document, such text fails with "more than one
    // document is not supported" and no position. Read document by document, the second
    // "document" is the parser's own error, which has the position.
    let mut stream = serde_yaml_ng::Deserializer::from_str(text);
    let Some(first) = stream.next() else {
        return Ok(Value::Null);
    };
    let value = JsonValue.deserialize(first)?;
    match stream.next().map(IgnoredAny::deserialize) {
        None => Ok(value),
        Some(Err(error)) => Err(error),
        // A second document that parses: `split_documents` cuts at every marker, so only an
        // odd stream gets here; the library says what it makes of it.
        Some(Ok(_)) => JsonValue.deserialize(serde_yaml_ng::Deserializer::from_str(text)),
    }
}

/// Seed and visitor building a [`Value`] from any YAML value.
struct JsonValue;

impl<'de> DeserializeSeed<'de> for JsonValue {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value that JSON can hold")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        match (i64::try_from(v), u64::try_from(v)) {
            (Ok(v), _) => self.visit_i64(v),
            (_, Ok(v)) => self.visit_u64(v),
            _ => Err(E::custom(format!("number {v} is out of range"))),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v)
            .map(Value::from)
            .map_err(|_| E::custom(format!("number {v} is out of range")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(JsonValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut seen = HashSet::new();
        let mut object = Map::new();
        while let Some(key) = map.next_key_seed(UniqueKey { seen: &mut seen })? {
            let value = map.next_value_seed(JsonValue)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// A mapping key read as text (`8080:` gives `"8080"`), failing at the key's position when the
/// mapping already has it.
struct UniqueKey<'s> {
    seen: &'s mut HashSet<String>,
}

impl<'de> DeserializeSeed<'de> for UniqueKey<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for UniqueKey<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if self.seen.insert(v.to_string()) {
            Ok(v.to_string())
        } else {
            Err(E::custom(format!("duplicate key {v:?}")))
        }
    }
}

/// The 1-based line and column, in `text`, of the node that `path` names: the key itself when
/// the path says its key is at fault, else the value. When a step of the path is missing, the
/// position of the deepest node that exists.
pub(crate) fn locate(text: &str, path: &FieldPath) -> Option<(usize, usize)> {
    let seed = Locate {
        path: &path.segments,
        key_at_fault: path.key_at_fault,
    };
    let error = seed
        .deserialize(serde_yaml_ng::Deserializer::from_str(text))
        .err()?;
    // The YAML deserializer stamps an error raised inside a visitor with the position of the
    // node being visited: failing on purpose at the target is how its position is learnt.
    error.location().map(|l| (l.line(), l.column()))
}

/// Walks `path` and fails at its end. Every visitor method it does not define fails by default,
/// which is what a scalar at the end of the path should do.
struct Locate<'p> {
    path: &'p [PathSegment],
    key_at_fault: bool,
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the node being located")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((PathSegment::Field(want) | PathSegment::Key(want), rest)) =
            self.path.split_first()
        else {
            return Err(de::Error::custom("located"));
        };
        let key = KeyIs {
            want,
            fail_on_match: rest.is_empty() && self.key_at_fault,
        };
        while let Some(found) = map.next_key_seed(key.clone())? {
            if found {
                return map.next_value_seed(Locate {
                    path: rest,
                    key_at_fault: self.key_at_fault,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom("located"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((PathSegment::Index(index), rest)) = self.path.split_first() else {
            return Err(de::Error::custom("located"));
        };
        for _ in 0..*index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom("located"));
            }
        }
        seq.next_element_seed(Locate {
            path: rest,
            key_at_fault: self.key_at_fault,
        })?;
        Err(de::Error::custom("located"))
    }
}

/// Reads a key and says whether it is `want`; fails (at the key) on a match when asked to.
#[derive(Clone)]
struct KeyIs<'w> {
    want: &'w str,
    fail_on_match: bool,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match (v == self.want, self.fail_on_match) {
            (true, true) => Err(E::custom("located")),
            (matched, _) => Ok(matched),
        }
    }
}

/// The YAML library's message for an error in `document`, with its positions made file
/// positions, and the file position of the error itself, which the message then leaves out.
pub(crate) fn file_message(
    error: &serde_yaml_ng::Error,
    document: &Document<'_>,
) -> (String, Option<(usize, usize)>) {
    let offset = document.first_line - 1;
    let message = error.to_string();
    let mut shifted = String::with_capacity(message.len() + 8);
    let mut rest = message.as_str();
    while let Some(at) = rest.find("at line ") {
        let (before, after) = rest.split_at(at + "at line ".len());
        shifted.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(line) if after[digits..].starts_with(" column ") => {
                shifted.push_str(&(line + offset).to_string());
            }
            _ => shifted.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    shifted.push_str(rest);

    let position = error
        .location()
        .map(|l| document.file_position(l.line(), l.column()));
    if let Some((line, column)) = position {
        shifted = shifted.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    (shifted, position)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(text: &str) -> Vec<(usize, usize, &str, bool)> {
        split_documents(text)
            .into_iter()
            .map(|d| (d.index, d.first_line, d.text, d.has_content))
            .collect()
    }

    #[test]
    fn splits_at_markers_and_keeps_lines() {
        let text = "# header\n---\na: 1\n---\nb: 2\n--- # c\n---\nc: 3\n...\n# tail\n";
        assert_eq!(
            texts(text),
            vec![
                (1, 1, "# header\n---\na: 1\n", true),
                (2, 4, "---\nb: 2\n", true),
                (3, 6, "--- # c\n", false),
                (4, 7, "---\nc: 3\n...\n", true),
            ]
        );
    }

    #[test]
    fn splits_without_leading_marker_and_with_crlf() {
        assert_eq!(
            texts("a: 1\r\n---\r\nb: 2"),
            vec![(1, 1, "a: 1\r\n", true), (2, 2, "---\r\nb: 2", true)]
        );
        assert_eq!(texts(""), vec![]);
        assert_eq!(texts("# nothing\n\n"), vec![]);
        assert_eq!(
            texts("\u{feff}---\na: 1\n"),
            vec![(1, 1, "---\na: 1\n", true)]
        );
        // `---x` and indented `---` are no markers; a directive travels with its document.
        assert_eq!(texts("a: |\n  ---\n---x: 1\n").len(), 1);
        assert_eq!(texts("%YAML 1.2\n---\na: 1\n").len(), 1);
        assert_eq!(texts("--- {a: 1}\n--- {b: 2}\n").len(), 2);
    }

    #[test]
    fn splits_at_every_line_break_the_parser_knows() {
        // A lone `\r`, NEL, LS and PS end a line for the YAML library, so the `---` after them
        // starts a document; splitting only at `\n` left both in one text, which the library
        // then refused as "more than one document". Found by tests/prop_policy.rs.
        for br in ["\r", "\u{85}", "\u{2028}", "\u{2029}", "\r\n", "\n"] {
            let text = format!("a: 1{br}---{br}b: 2{br}");
            let documents = split_documents(&text);
            let got: Vec<_> = documents.iter().map(|d| (d.index, d.first_line)).collect();
            assert_eq!(got, vec![(1, 1), (2, 2)], "break {br:?}");
            for document in &documents {
                assert!(to_json(document.text).is_ok(), "{:?}", document.text);
            }
            // Lines are counted as the parser counts them.
            let broken = format!("a: 1{br}---{br}b: [1{br}c: 2{br}");
            let second = &split_documents(&broken)[1];
            let error = to_json(second.text).expect_err("unclosed flow sequence");
            let location = error.location().expect("has a position");
            assert_eq!(
                second.file_position(location.line(), location.column()).0,
                4,
                "break {br:?}: {error}"
            );
        }
        assert_eq!(texts("|\u{85}---\n~").len(), 2);
    }

    #[test]
    fn yaml_becomes_json_with_text_keys() {
        let value = to_json("a: {8080: {mode: STRICT}, true: x}\nb: [1, 2.5, null, .inf]\n")
            .expect("valid");
        assert_eq!(
            value,
            serde_json::json!({"a": {"8080": {"mode": "STRICT"}, "true": "x"},
                               "b": [1, 2.5, null, null]})
        );
        assert_eq!(to_json("").expect("empty is null"), Value::Null);
    }

    #[test]
    fn duplicate_keys_and_tags_fail_with_position() {
        let error = to_json("a: 1\nb:\n  c: 1\n  c: 2\n").expect_err("duplicate");
        assert!(error.to_string().contains("duplicate key \"c\""), "{error}");
        let location = error.location().expect("has a position");
        assert_eq!((location.line(), location.column()), (4, 3));
        assert!(to_json("a: !Custom x\n").is_err());
        assert!(to_json("a: 123456789012345678901234567890\n").is_err());
    }

    #[test]
    fn text_after_the_root_node_fails_with_its_position() {
        // The parser wants a `---` where the leftover text starts; read as one document this
        // used to fail as "more than one document" without a position. Found by
        // tests/prop_policy.rs.
        for (text, position) in [
            ("''ᾶ", (1, 3)),
            ("'x' y\n", (1, 5)),
            ("  portLevelMtls:\n,\n", (2, 1)),
            ("metadata:\n    name: a\n  namespace: b\n", (3, 3)),
        ] {
            let error = to_json(text).expect_err(text);
            assert!(
                !error.to_string().contains("more than one document"),
                "{text:?}: {error}"
            );
            let location = error.location().expect("has a position");
            assert_eq!((location.line(), location.column()), position, "{text:?}");
        }
        assert_eq!(to_json("'x'\n").expect("one scalar"), Value::from("x"));
    }

    #[test]
    fn locates_values_keys_items_and_missing_fields() {
        let text = "---\nmetadata:\n  name: web\nspec:\n  portLevelMtls:\n    abc:\n      mode: X\n\
                    items:\n- a: 1\n- b:\n    c: 2\n";
        let spec = FieldPath::fields(&["spec", "portLevelMtls"]).key("abc");
        assert_eq!(locate(text, &spec.field("mode")), Some((7, 13)));
        assert_eq!(locate(text, &spec.clone().at_key()), Some((6, 5)));
        let item = FieldPath {
            segments: vec![
                PathSegment::Field("items".into()),
                PathSegment::Index(1),
                PathSegment::Field("b".into()),
                PathSegment::Field("c".into()),
            ],
            key_at_fault: false,
        };
        assert_eq!(locate(text, &item), Some((11, 8)));
        // `metadata.namespace` is missing: the position of `metadata`'s mapping.
        assert_eq!(
            locate(text, &FieldPath::fields(&["metadata", "namespace"])),
            Some((3, 3))
        );
        assert_eq!(locate(text, &FieldPath::default()), Some((2, 1)));
    }

    #[test]
    fn messages_get_file_lines() {
        let text = "a: 1\n---\nb: [1\nc: 2\n";
        let documents = split_documents(text);
        let error = to_json(documents[1].text).expect_err("syntax");
        let (message, position) = file_message(&error, &documents[1]);
        assert_eq!(position, Some((4, 2)));
        assert!(!message.contains("at line 4 column 2"), "{message}");
        assert!(
            message.contains("at line 3 column"),
            "context is shifted too: {message}"
        );
    }
}
