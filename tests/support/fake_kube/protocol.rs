//! The fake API server's side of the protocol: discovery documents, lists, watch streams,
//! Event creation and Status errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{BOOKMARK_EVERY, Body, Change, SECURITY_GROUP, SeenRequest, Shared, Signal};

pub(super) fn served(versions: &[String], version: &str) -> bool {
    versions.iter().any(|v| v == version)
}

pub(super) fn resource(name: &str, kind: &str, namespaced: bool) -> Value {
    json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
}

pub(super) fn security_group(versions: &[String]) -> Value {
    let list: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{SECURITY_GROUP}/{v}"), "version": v}))
        .collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": SECURITY_GROUP,
           "versions": list, "preferredVersion": list[0]})
}

pub(super) fn events_group() -> Value {
    let v1 = json!({"groupVersion": "events.k8s.io/v1", "version": "v1"});
    json!({"name": "events.k8s.io", "versions": [v1], "preferredVersion": v1})
}

/// The object as the client asked for it: whole with this version's `apiVersion`, or
/// metadata only.
fn present(object: &Value, api_version: &str, kind: &str, metadata_only: bool) -> Value {
    if metadata_only {
        return json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                      "metadata": object["metadata"]});
    }
    let mut object = object.clone();
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    object
}

pub(super) fn list_or_watch(
    shared: &Arc<Shared>,
    seen: &SeenRequest,
    resource: &'static str,
    namespace: Option<&str>,
    api_version: &str,
    kind: &str,
) -> Response<Body> {
    let metadata_only = seen.accept.contains("as=PartialObjectMetadata");
    let in_scope = move |ns: &str| namespace.is_none_or(|n| n == ns);
    if seen.is_watch() {
        return watch(
            shared,
            seen,
            resource,
            namespace.map(str::to_string),
            api_version,
            kind,
            metadata_only,
        );
    }
    let store = shared.store.lock().expect("fake store");
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((r, ns, _), _)| *r == resource && in_scope(ns))
        .map(|(_, object)| present(object, api_version, kind, metadata_only))
        .collect();
    let (list_version, list_kind) = if metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (api_version.to_string(), format!("{kind}List"))
    };
    json_response(
        200,
        json!({"apiVersion": list_version, "kind": list_kind,
               "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

#[allow(clippy::too_many_arguments)]
fn watch(
    shared: &Arc<Shared>,
    seen: &SeenRequest,
    resource: &'static str,
    namespace: Option<String>,
    api_version: &str,
    kind: &str,
    metadata_only: bool,
) -> Response<Body> {
    let from: u64 = seen
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = seen.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = seen
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    let in_scope = move |change: &Change| {
        change.resource == resource && namespace.as_deref().is_none_or(|n| n == change.namespace)
    };
    // Subscribe before reading the history, under the lock, so that no change falls between.
    let (mut signals, backlog, expired, mut last_rv) = {
        let mut store = shared.store.lock().expect("fake store");
        let signals = shared.signals.subscribe();
        let expired = from < store.compacted;
        let backlog: Vec<Change> = store
            .history
            .iter()
            .filter(|c| c.rv > from && in_scope(c))
            .cloned()
            .collect();
        store.open_watches += 1;
        (signals, backlog, expired, from.max(store.rv))
    };
    let api_version = api_version.to_string();
    let kind = kind.to_string();
    let shared = shared.clone();
    tokio::spawn(async move {
        let line = |value: Value| Ok(Frame::data(Bytes::from(format!("{value}\n"))));
        let event = |change: &Change| {
            line(json!({"type": change.kind,
                        "object": present(&change.object, &api_version, &kind, metadata_only)}))
        };
        let gone = || {
            line(
                json!({"type": "ERROR", "object": status_json(410, "Expired",
                "too old resource version")}),
            )
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        'stream: {
            if expired {
                let _ = tx.send(gone()).await;
                break 'stream;
            }
            for change in &backlog {
                if tx.send(event(change)).await.is_err() {
                    break 'stream;
                }
            }
            let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
            bookmark.tick().await;
            loop {
                let ended = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let frame = tokio::select! {
                    () = ended => break 'stream,
                    () = tx.closed() => break 'stream,
                    _ = bookmark.tick(), if bookmarks => {
                        let rv = shared.store.lock().expect("fake store").rv.max(last_rv);
                        line(json!({"type": "BOOKMARK", "object": {
                            "apiVersion": api_version, "kind": kind,
                            "metadata": {"resourceVersion": rv.to_string()}}}))
                    }
                    signal = signals.recv() => match signal {
                        Ok(Signal::Change(change)) if change.rv > last_rv && in_scope(&change) => {
                            last_rv = change.rv;
                            event(&change)
                        }
                        Ok(Signal::Change(_)) => continue,
                        Ok(Signal::Expire) => {
                            let _ = tx.send(gone()).await;
                            break 'stream;
                        }
                        Ok(Signal::Drop) => {
                            let _ = tx.send(Err(std::io::Error::other("connection dropped"))).await;
                            break 'stream;
                        }
                        Err(_) => break 'stream,
                    },
                };
                if tx.send(frame).await.is_err() {
                    break 'stream;
                }
            }
        }
        shared.store.lock().expect("fake store").open_watches -= 1;
    });

    let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

pub(super) fn create_event(shared: &Arc<Shared>, namespace: &str, body: &Bytes) -> Response<Body> {
    let Ok(mut event) = serde_json::from_slice::<Value>(body) else {
        return status_response(400, "the body is not JSON");
    };
    let Some(name) = event["metadata"]["name"].as_str().map(str::to_string) else {
        return status_response(422, "metadata.name: Required value");
    };
    for field in [
        "eventTime",
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
        "regarding",
        "type",
    ] {
        if event.get(field).is_none_or(Value::is_null) {
            return status_response(422, &format!("{field}: Required value"));
        }
    }
    if event["note"].as_str().is_some_and(|n| n.len() > 1024) {
        return status_response(422, "note: Too long: may not be longer than 1024");
    }
    let mut store = shared.store.lock().expect("fake store");
    let key = ("events", namespace.to_string(), name.clone());
    if store.objects.contains_key(&key) {
        return json_response(
            409,
            status_json(
                409,
                "AlreadyExists",
                &format!("events.events.k8s.io \"{name}\" already exists"),
            ),
        );
    }
    store.rv += 1;
    event["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    event["metadata"]["namespace"] = json!(namespace);
    store.objects.insert(key, event.clone());
    json_response(201, event)
}

pub(super) fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub(super) fn status_response(code: u16, message: &str) -> Response<Body> {
    let reason = match code {
        404 => "NotFound",
        409 => "AlreadyExists",
        410 => "Expired",
        403 => "Forbidden",
        _ => "InternalError",
    };
    json_response(code, status_json(code, reason, message))
}

pub(super) fn json_response(code: u16, value: Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    Response::builder()
        .status(StatusCode::from_u16(code).expect("status"))
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

pub(super) fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .map(|(k, v)| (k.to_string(), v.replace("%2C", ",").replace("%3D", "=")))
        .collect()
}
