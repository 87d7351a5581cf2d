//! Walking protojson: every value carries the path it was read from, object keys are looked up
//! in both spellings protojson allows (`filter_chain_match` and `filterChainMatch`), and scalars
//! are read the way protojson writes them (64-bit and wrapped integers may be strings, durations
//! are `"1.5s"`, enums are names or numbers).

use std::collections::BTreeSet;
use std::fmt;

use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};
use serde_json::{Map, Value};

use super::DumpError;

/// Where a value sits in the document, as a reader would write it:
/// `configs[1].dynamic_listeners[0].active_state.listener.filter_chains[4]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct JsonPath(String);

impl JsonPath {
    /// The path of `key` inside the object at this path.
    pub(super) fn field(&self, key: &str) -> JsonPath {
        if self.0.is_empty() {
            JsonPath(key.to_owned())
        } else {
            JsonPath(format!("{}.{key}", self.0))
        }
    }

    /// The path of element `index` of the array at this path.
    pub(super) fn index(&self, index: usize) -> JsonPath {
        JsonPath(format!("{}[{index}]", self.0))
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(top level)")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// What a conversion learned on the way that a reader of the result should know: renamed v2
/// names, payloads kept without their content, fields left out.
#[derive(Debug, Default)]
pub(super) struct Notes {
    notes: Vec<String>,
    ignored: BTreeSet<String>,
}

impl Notes {
    /// Records `note` once, however often a listener triggers it.
    pub(super) fn add(&mut self, note: impl Into<String>) {
        let note = note.into();
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    /// Records a field of message `message` that the conversion does not carry over.
    pub(super) fn ignore(&mut self, message: &str, field: &str) {
        self.ignored.insert(format!("{message}.{field}"));
    }

    /// The notes, with one closing note listing the fields left out.
    pub(super) fn finish(mut self) -> Vec<String> {
        if !self.ignored.is_empty() {
            let fields: Vec<&str> = self.ignored.iter().map(String::as_str).collect();
            self.notes.push(format!(
                "fields not converted (not needed to classify or rewrite chains): {}",
                fields.join(", ")
            ));
        }
        self.notes
    }
}

/// A JSON value and the path it was read from.
#[derive(Clone, Debug)]
pub(super) struct Node<'a> {
    pub(super) value: &'a Value,
    pub(super) path: JsonPath,
}

impl<'a> Node<'a> {
    /// The whole document.
    pub(super) fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: JsonPath::default(),
        }
    }

    /// An error about this value.
    pub(super) fn error(&self, problem: impl Into<String>) -> DumpError {
        DumpError::Invalid {
            listener: None,
            path: self.path.to_string(),
            problem: problem.into(),
        }
    }

    fn expected(&self, what: &str) -> DumpError {
        self.error(format!("expected {what}, found {}", describe(self.value)))
    }

    /// This value as an object of protobuf message `message` (the name is used in notes).
    pub(super) fn object(&self, message: &str) -> Result<Fields<'a>, DumpError> {
        match self.value {
            Value::Object(map) => Ok(Fields {
                map,
                path: self.path.clone(),
                message: message.to_owned(),
                used: vec![],
            }),
            _ => Err(self.expected("an object")),
        }
    }

    /// This value as an array, each element with its own path.
    pub(super) fn array(&self) -> Result<Vec<Node<'a>>, DumpError> {
        match self.value {
            Value::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, value)| Node {
                    value,
                    path: self.path.index(i),
                })
                .collect()),
            _ => Err(self.expected("an array")),
        }
    }

    pub(super) fn str(&self) -> Result<&'a str, DumpError> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    pub(super) fn string(&self) -> Result<String, DumpError> {
        self.str().map(str::to_owned)
    }

    pub(super) fn strings(&self) -> Result<Vec<String>, DumpError> {
        self.array()?.iter().map(Node::string).collect()
    }

    pub(super) fn bool(&self) -> Result<bool, DumpError> {
        self.value
            .as_bool()
            .ok_or_else(|| self.expected("true or false"))
    }

    pub(super) fn bool_value(&self) -> Result<BoolValue, DumpError> {
        Ok(BoolValue {
            value: self.bool()?,
        })
    }

    /// An integer, written as a JSON number or, as protojson may, a string of digits.
    pub(super) fn i64(&self) -> Result<i64, DumpError> {
        let parsed = match self.value {
            Value::Number(n) => n.as_i64().or_else(|| {
                // 9080.0 is an integer too; 9080.5 is not.
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            }),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        parsed.ok_or_else(|| self.expected("an integer"))
    }

    pub(super) fn u32(&self) -> Result<u32, DumpError> {
        let n = self.i64()?;
        u32::try_from(n).map_err(|_| self.error(format!("{n} is out of range for uint32")))
    }

    pub(super) fn i32(&self) -> Result<i32, DumpError> {
        let n = self.i64()?;
        i32::try_from(n).map_err(|_| self.error(format!("{n} is out of range for int32")))
    }

    pub(super) fn u32_value(&self) -> Result<UInt32Value, DumpError> {
        Ok(UInt32Value { value: self.u32()? })
    }

    /// A `google.protobuf.Duration` as protojson writes it: `"0s"`, `"0.080s"`, `"-1.5s"`.
    pub(super) fn duration(&self) -> Result<Duration, DumpError> {
        let text = self.str()?;
        parse_duration(text).ok_or_else(|| {
            self.error(format!(
                "expected a duration such as \"1.5s\", found {text:?}"
            ))
        })
    }

    /// A protobuf enum, by value name or number; `from_name` is the generated `from_str_name`.
    pub(super) fn enumeration<E: Into<i32>>(
        &self,
        enum_name: &str,
        from_name: fn(&str) -> Option<E>,
    ) -> Result<i32, DumpError> {
        match self.value {
            Value::String(name) => from_name(name)
                .map(Into::into)
                .ok_or_else(|| self.error(format!("{name:?} is not a value of {enum_name}"))),
            Value::Number(_) => self.i32(),
            _ => Err(self.expected(&format!("a {enum_name} name"))),
        }
    }
}

/// The fields of one JSON object read as protobuf message `message`. Reading a field marks it
/// used; [`Fields::finish`] reports the rest.
#[derive(Debug)]
pub(super) struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: JsonPath,
    message: String,
    used: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    /// Names the message these fields belong to, once an `Any`'s `@type` has told.
    pub(super) fn set_message(&mut self, message: &str) {
        self.message = message.to_owned();
    }

    /// The value of field `name` (snake_case as in the .proto), found under that name or its
    /// lowerCamelCase JSON name. A JSON `null` counts as absent, as in protojson.
    pub(super) fn get(&mut self, name: &str) -> Result<Option<Node<'a>>, DumpError> {
        let camel = snake_to_camel(name);
        let snake_hit = self.map.get_key_value(name);
        let camel_hit = if camel == name {
            None
        } else {
            self.map.get_key_value(camel.as_str())
        };
        let (key, value) = match (snake_hit, camel_hit) {
            (Some(_), Some(_)) => {
                return Err(DumpError::Invalid {
                    listener: None,
                    path: self.path.to_string(),
                    problem: format!("field {name} is given twice, as {name} and as {camel}"),
                });
            }
            (Some(hit), None) | (None, Some(hit)) => hit,
            (None, None) => return Ok(None),
        };
        self.used.push(key.as_str());
        if value.is_null() {
            return Ok(None);
        }
        Ok(Some(Node {
            value,
            path: self.path.field(key),
        }))
    }

    /// Like [`Fields::get`] for a field that must be there.
    pub(super) fn require(&mut self, name: &str) -> Result<Node<'a>, DumpError> {
        self.get(name)?.ok_or_else(|| DumpError::Invalid {
            listener: None,
            path: self.path.to_string(),
            problem: format!("{} without {name}", self.message),
        })
    }

    /// The `@type` of an `Any` or of a config dump section.
    pub(super) fn type_url(&mut self) -> Result<Option<String>, DumpError> {
        match self.map.get_key_value("@type") {
            Some((key, value)) => {
                self.used.push(key.as_str());
                let node = Node {
                    value,
                    path: self.path.field(key),
                };
                node.string().map(Some)
            }
            None => Ok(None),
        }
    }

    /// Whether the object has key `name` in either spelling, without marking it used.
    pub(super) fn has(&self, name: &str) -> bool {
        self.map.contains_key(name) || self.map.contains_key(snake_to_camel(name).as_str())
    }

    /// The keys nobody read, skipping `@type`.
    pub(super) fn unread(&self) -> Vec<&'a str> {
        self.map
            .keys()
            .map(String::as_str)
            .filter(|key| *key != "@type" && !self.used.contains(key))
            .collect()
    }

    /// Reports every key nobody read as a field not converted.
    pub(super) fn finish(self, notes: &mut Notes) {
        for key in self.unread() {
            notes.ignore(&self.message, &camel_to_snake(key));
        }
    }
}

/// `filter_chain_match` → `filterChainMatch`, as protoc derives JSON names.
pub(super) fn snake_to_camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// `filterChainMatch` → `filter_chain_match`, so that notes name fields one way.
pub(super) fn camel_to_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_duration(text: &str) -> Option<Duration> {
    let body = text.strip_suffix('s')?;
    let (negative, body) = match body.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let (whole, fraction) = body.split_once('.').unwrap_or((body, ""));
    if whole.is_empty() || fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let nanos: i32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().ok()?
    };
    Some(if negative {
        Duration {
            seconds: -seconds,
            nanos: -nanos,
        }
    } else {
        Duration { seconds, nanos }
    })
}

/// A short description of a value for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 40 => {
            format!("the string {:?}…", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(a) => format!("an array of {} elements", a.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_protojson_writes_them() {
        let read = |s| parse_duration(s).map(|d| (d.seconds, d.nanos));
        assert_eq!(read("0s"), Some((0, 0)));
        assert_eq!(read("1s"), Some((1, 0)));
        assert_eq!(read("0.080s"), Some((0, 80_000_000)));
        assert_eq!(read("-1.5s"), Some((-1, -500_000_000)));
        assert_eq!(read("3.000000001s"), Some((3, 1)));
        assert_eq!(read("1"), None);
        assert_eq!(read("1.5ms"), None);
        assert_eq!(read("s"), None);
        assert_eq!(read("1.0000000001s"), None);
    }

    #[test]
    fn names_convert_both_ways() {
        assert_eq!(snake_to_camel("filter_chain_match"), "filterChainMatch");
        assert_eq!(snake_to_camel("ipv4_compat"), "ipv4Compat");
        assert_eq!(snake_to_camel("name"), "name");
        assert_eq!(
            camel_to_snake("listenerFiltersTimeout"),
            "listener_filters_timeout"
        );
    }

    #[test]
    fn integers_may_be_strings_and_errors_name_the_path() {
        let doc: Value = serde_json::json!({"a": {"portValue": "9080", "bad": "x9", "big": -1}});
        let mut a = Node::root(&doc)
            .object("X")
            .unwrap()
            .require("a")
            .unwrap()
            .object("A")
            .unwrap();
        assert_eq!(a.require("port_value").unwrap().u32().unwrap(), 9080);
        let err = a.require("bad").unwrap().u32().unwrap_err().to_string();
        assert!(
            err.contains("a.bad") && err.contains("expected an integer"),
            "{err}"
        );
        let err = a.require("big").unwrap().u32().unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn a_field_given_in_both_spellings_is_an_error() {
        let doc: Value = serde_json::json!({"port_value": 1, "portValue": 2});
        let err = Node::root(&doc)
            .object("X")
            .unwrap()
            .get("port_value")
            .unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn unread_fields_are_noted_once_in_snake_case() {
        let doc: Value = serde_json::json!({"name": "l", "perConnectionBufferLimitBytes": 1});
        let mut fields = Node::root(&doc).object("Listener").unwrap();
        fields.get("name").unwrap();
        let mut notes = Notes::default();
        fields.finish(&mut notes);
        let notes = notes.finish();
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("Listener.per_connection_buffer_limit_bytes"),
            "{notes:?}"
        );
    }
}
