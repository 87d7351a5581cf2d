//! Listener dumps as people have them at hand, turned into the v3 `Listener` protobuf bytes that
//! the rewrite reads from istiod: `istioctl proxy-config listener -o json` (an array), one
//! Listener object, an Envoy `/config_dump` or just its `ListenersConfigDump`, in snake_case or
//! camelCase, from Envoy's v2 era or v3.
//!
//! The conversion keeps everything that decides which filter chain a connection lands on and
//! what the chain does with TLS: addresses, listener filters, every `filter_chain_match` field,
//! filter names and payload types, the `DownstreamTlsContext`, and whether an HTTP connection
//! manager accepts HTTP/1.0. It does not claim more: payloads of other types (Istio's own
//! extensions among them) keep their type URL and lose their content, and every such loss is
//! listed in the listener's notes.

mod json;
mod listener;
mod tls;
mod typed;

use bytes::Bytes;
use prost::Message;
use serde_json::Value;

use json::{Fields, Node, Notes};

/// One listener read from a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedListener {
    /// The listener's name.
    pub name: String,
    /// The version Envoy recorded for this listener (config dumps only).
    pub version_info: Option<String>,
    /// The listener as v3 `envoy.config.listener.v3.Listener` protobuf bytes.
    pub bytes: Bytes,
    /// What the reader should know about the conversion: v2 names mapped, payloads kept
    /// without content, fields left out, the listener state in a config dump.
    pub notes: Vec<String>,
}

/// Why a dump could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The text is not JSON.
    #[error("the listener dump is not valid JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    /// A value is not what its field needs.
    #[error("{}{path}: {problem}", listener_prefix(.listener))]
    Invalid {
        /// The listener being read, when its name is known.
        listener: Option<String>,
        /// The JSON path of the value at fault.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The document is none of the accepted shapes.
    #[error(
        "the document is neither a Listener, a list of Listeners, a ListenersConfigDump nor an \
         Envoy config dump (top-level keys: {keys})"
    )]
    UnknownDocument {
        /// The document's top-level keys, or its JSON kind.
        keys: String,
    },
    /// A config dump without a listener section.
    #[error("the config dump has no ListenersConfigDump (its sections: {sections})")]
    NoListenerSection {
        /// The `@type` of each section found.
        sections: String,
    },
}

fn listener_prefix(listener: &Option<String>) -> String {
    match listener {
        Some(name) => format!("listener {name:?} at "),
        None => String::new(),
    }
}

impl DumpError {
    fn in_listener(self, name: &str) -> Self {
        match self {
            DumpError::Invalid {
                listener: None,
                path,
                problem,
            } if !name.is_empty() => DumpError::Invalid {
                listener: Some(name.to_owned()),
                path,
                problem,
            },
            other => other,
        }
    }
}

/// Reads every listener of a dump. Accepted shapes: one Listener object; an array of them
/// (`istioctl proxy-config listener -o json`); an Envoy config dump (`{"configs": [...]}`,
/// whose `ListenersConfigDump` section is read, or the per-listener sections that
/// `/config_dump?resource=dynamic_listeners` returns); a bare `ListenersConfigDump`.
/// Config dumps give each listener's active state and, as separate entries with a note, any
/// warming state; draining listeners are skipped. A listener Envoy rejected carries a note with
/// Envoy's error, and when it has no active state its rejected configuration is given instead.
/// Listeners come out in document order; an empty array or dump section gives none.
///
/// The first listener that cannot be read fails the whole dump; [`read_listeners`] keeps going.
pub fn listeners_from_json(text: &str) -> Result<Vec<DumpedListener>, DumpError> {
    read_listeners(text)?.into_iter().collect()
}

/// Like [`listeners_from_json`], but a listener that cannot be read gives its own error, in its
/// place in document order, and the others are still read. The outer error is for a document
/// that is not JSON, is none of the accepted shapes, or whose enclosing structure (the config
/// dump's sections, its listener lists) is malformed.
pub fn read_listeners(text: &str) -> Result<Vec<Result<DumpedListener, DumpError>>, DumpError> {
    let document: Value = serde_json::from_str(text).map_err(DumpError::Syntax)?;
    let root = Node::root(&document);
    let mut out = Vec::new();
    match &document {
        Value::Array(_) => {
            for node in root.array()? {
                out.push(convert(&node, None, vec![]));
            }
        }
        Value::Object(map) if map.contains_key("configs") => config_dump(&root, &mut out)?,
        Value::Object(_) => {
            let mut fields = root.object("document")?;
            let type_name = fields.type_url()?.unwrap_or_default();
            if type_name.ends_with("ListenersConfigDump") || is_listeners_config_dump(&fields) {
                listeners_config_dump(&root, &mut out)?;
            } else if type_name.ends_with(".Listener") || is_listener(&fields) {
                out.push(convert(&root, None, vec![]));
            } else {
                return Err(DumpError::UnknownDocument {
                    keys: fields.unread().join(", "),
                });
            }
        }
        other => {
            return Err(DumpError::UnknownDocument {
                keys: format!("none, it is {}", kind(other)),
            });
        }
    }
    Ok(out)
}

/// What [`read_listeners`] collects: each listener, or why it could not be read.
type Collected = Vec<Result<DumpedListener, DumpError>>;

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_listener(fields: &Fields<'_>) -> bool {
    ["name", "address", "filter_chains", "listener_filters"]
        .iter()
        .any(|f| fields.has(f))
}

fn is_listeners_config_dump(fields: &Fields<'_>) -> bool {
    [
        "static_listeners",
        "dynamic_listeners",
        "dynamic_active_listeners",
    ]
    .iter()
    .any(|f| fields.has(f))
}

/// Converts the Listener at `node`; its name, when readable, goes into errors.
fn convert(
    node: &Node<'_>,
    version_info: Option<String>,
    state_notes: Vec<String>,
) -> Result<DumpedListener, DumpError> {
    let name = node
        .value
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut notes = Notes::default();
    for note in state_notes {
        notes.add(note);
    }
    let listener = listener::listener(node, &mut notes).map_err(|e| e.in_listener(&name))?;
    Ok(DumpedListener {
        name: listener.name.clone(),
        version_info,
        bytes: Bytes::from(listener.encode_to_vec()),
        notes: notes.finish(),
    })
}

fn config_dump(root: &Node<'_>, out: &mut Collected) -> Result<(), DumpError> {
    let mut fields = root.object("ConfigDump")?;
    let configs = fields.require("configs")?;
    let mut sections = Vec::new();
    let mut found = false;
    for section in configs.array()? {
        let type_url = section.object("Any")?.type_url()?.unwrap_or_default();
        if type_url.ends_with("ListenersConfigDump") {
            found = true;
            listeners_config_dump(&section, out)?;
        } else if type_url.ends_with("ListenersConfigDump.DynamicListener") {
            found = true;
            entry(&section, out, dynamic_listener);
        } else if type_url.ends_with("ListenersConfigDump.StaticListener") {
            found = true;
            entry(&section, out, static_listener);
        } else {
            sections.push(type_url.rsplit('/').next().unwrap_or_default().to_owned());
        }
    }
    if !found {
        return Err(DumpError::NoListenerSection {
            sections: sections.join(", "),
        });
    }
    Ok(())
}

/// Reads one entry of a listener list with `read`; an error stays with the entry, named by the
/// entry's `name` when the listener's own name was not read.
fn entry(
    node: &Node<'_>,
    out: &mut Collected,
    read: fn(&Node<'_>) -> Result<Vec<DumpedListener>, DumpError>,
) {
    match read(node) {
        Ok(listeners) => out.extend(listeners.into_iter().map(Ok)),
        Err(error) => {
            let name = node.value.get("name").and_then(Value::as_str);
            out.push(Err(error.in_listener(name.unwrap_or_default())));
        }
    }
}

fn listeners_config_dump(node: &Node<'_>, out: &mut Collected) -> Result<(), DumpError> {
    let mut fields = node.object("ListenersConfigDump")?;
    if let Some(node) = fields.get("static_listeners")? {
        for item in node.array()? {
            entry(&item, out, static_listener);
        }
    }
    if let Some(node) = fields.get("dynamic_listeners")? {
        for item in node.array()? {
            entry(&item, out, dynamic_listener);
        }
    }
    // The v2alpha dump kept one list per state.
    for (name, state) in [
        ("dynamic_active_listeners", None),
        ("dynamic_warming_listeners", Some("warming")),
    ] {
        if let Some(node) = fields.get(name)? {
            for item in node.array()? {
                match listener_state(&item, state) {
                    Ok(listener) => out.extend(listener.map(Ok)),
                    Err(error) => out.push(Err(error)),
                }
            }
        }
    }
    Ok(())
}

fn static_listener(node: &Node<'_>) -> Result<Vec<DumpedListener>, DumpError> {
    let mut fields = node.object("StaticListener")?;
    match fields.get("listener")? {
        Some(listener) => {
            convert(&listener, None, vec!["static listener".to_owned()]).map(|l| vec![l])
        }
        None => Ok(vec![]),
    }
}

fn dynamic_listener(node: &Node<'_>) -> Result<Vec<DumpedListener>, DumpError> {
    let mut fields = node.object("DynamicListener")?;
    let mut listeners = Vec::new();
    if let Some(state) = fields.get("active_state")? {
        listeners.extend(listener_state(&state, None)?);
    }
    if let Some(state) = fields.get("warming_state")? {
        listeners.extend(listener_state(&state, Some("warming"))?);
    }
    // Envoy rejected the last update of this listener. It serves the active state, if any;
    // with none, the rejected listener is all there is to look at.
    if let Some(error) = fields.get("error_state")? {
        let mut error_fields = error.object("UpdateFailureState")?;
        let details = match error_fields.get("details")? {
            Some(node) => node.string()?,
            None => "no details given".to_owned(),
        };
        let note = format!("Envoy rejected the last update of this listener: {details}");
        match (
            listeners.first_mut(),
            error_fields.get("failed_configuration")?,
        ) {
            (Some(listener), _) => listener.notes.push(note),
            (None, Some(failed)) => {
                let note = format!("this is the rejected update, not served: {details}");
                listeners.push(convert(&failed, None, vec![note])?);
            }
            (None, None) => {}
        }
    }
    Ok(listeners)
}

fn listener_state(
    node: &Node<'_>,
    state: Option<&str>,
) -> Result<Option<DumpedListener>, DumpError> {
    let mut fields = node.object("DynamicListenerState")?;
    let version_info = match fields.get("version_info")? {
        Some(node) => Some(node.string()?),
        None => None,
    };
    let state_notes = match state {
        Some(state) => vec![format!(
            "{state} state: Envoy is not serving this version yet"
        )],
        None => vec![],
    };
    match fields.get("listener")? {
        Some(listener) => convert(&listener, version_info, state_notes).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests;
