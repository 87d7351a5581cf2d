//! A fake Kubernetes API server that speaks the real HTTP protocol on 127.0.0.1, for the
//! objects alpn-xds reads: discovery (`/api`, `/apis`, `/apis/security.istio.io[/VERSION]`),
//! PeerAuthentication and Pod lists and watches, and `events.k8s.io/v1` Event creation.
//!
//! Lists are JSON with the store's `resourceVersion`; `?watch=true&resourceVersion=N` streams
//! chunked JSON lines (ADDED, MODIFIED, DELETED, and BOOKMARK when `allowWatchBookmarks` is
//! set) of everything after N, then live changes. A watch from a resourceVersion older than
//! the last compaction gets an ERROR event with a `410 Gone` Status, as from the API server's
//! watch cache. `Accept: ...;as=PartialObjectMetadata[List]` gets metadata-only objects.
//! Tests can inject failures: an HTTP status for the next matching requests, a `410` ERROR
//! event on every open watch, dropped connections, and the whole server going away and
//! coming back on the same port with its store intact.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, std::io::Error>;

/// Istio's security group.
pub const SECURITY_GROUP: &str = "security.istio.io";

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// GET, POST, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Query parameters.
    pub query: BTreeMap<String, String>,
    /// The `Accept` header.
    pub accept: String,
    /// The `Authorization` header.
    pub authorization: String,
}

impl SeenRequest {
    /// Whether this is a watch.
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
}

/// Which requests a [`Fault`] hits.
#[derive(Clone, Debug)]
pub struct Match {
    /// A substring of the path.
    pub path: String,
    /// `Some(true)`: watches only; `Some(false)`: everything but watches.
    pub watch: Option<bool>,
}

#[derive(Clone, Debug)]
struct Fault {
    matches: Match,
    status: u16,
    remaining: usize,
}

/// One change in the store, as watches replay it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Clone, Debug)]
enum Signal {
    Change(Change),
    /// Send a `410 Gone` ERROR event and end the watch.
    Expire,
    /// Break the connection in the middle of the stream.
    Drop,
}

#[derive(Debug)]
struct Store {
    rv: u64,
    uid: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted: u64,
    faults: VecDeque<Fault>,
    requests: Vec<SeenRequest>,
    open_watches: usize,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    signals: broadcast::Sender<Signal>,
    /// The PeerAuthentication versions served, preferred first.
    versions: Vec<String>,
}

/// The fake API server. Stops when dropped.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeKube {
    /// Serves PeerAuthentication in `versions` (e.g. `["v1", "v1beta1"]`, or `["v1beta1"]`
    /// as Istio 1.11 to 1.21 do) on a free loopback port.
    pub async fn start(versions: &[&str]) -> Self {
        let (signals, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 100,
                uid: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                faults: VecDeque::new(),
                requests: Vec::new(),
                open_watches: 0,
            }),
            signals,
            versions: versions.iter().map(|v| v.to_string()).collect(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, shared.clone()));
        Self {
            shared,
            addr,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().expect("fake store")
    }

    /// Creates or replaces a PeerAuthentication (`metadata.namespace` and `metadata.name`
    /// required); returns its new resourceVersion.
    pub fn apply_policy(&self, object: Value) -> u64 {
        self.apply("peerauthentications", object)
    }

    /// Deletes a PeerAuthentication.
    pub fn delete_policy(&self, namespace: &str, name: &str) {
        self.delete("peerauthentications", namespace, name);
    }

    /// Creates or relabels a pod.
    pub fn apply_pod(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running"},
        });
        self.apply("pods", pod)
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete("pods", namespace, name);
    }

    fn apply(&self, resource: &'static str, mut object: Value) -> u64 {
        let mut store = self.store();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let key = (resource, namespace.clone(), name);
        store.rv += 1;
        let rv = store.rv;
        let previous = store.objects.get(&key).cloned();
        let metadata = object["metadata"].as_object_mut().expect("metadata");
        let (uid, created) = match &previous {
            Some(p) => (
                p["metadata"]["uid"].clone(),
                p["metadata"]["creationTimestamp"].clone(),
            ),
            None => {
                store.uid += 1;
                let created = metadata
                    .get("creationTimestamp")
                    .cloned()
                    .unwrap_or_else(|| json!(format!("2025-01-01T00:{:02}:00Z", store.uid % 60)));
                (json!(format!("uid-{}", store.uid)), created)
            }
        };
        metadata.insert("uid".into(), uid);
        metadata.insert("creationTimestamp".into(), created);
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key, object.clone());
        record(&self.shared, &mut store, resource, namespace, kind, object);
        rv
    }

    fn delete(&self, resource: &'static str, namespace: &str, name: &str) {
        let mut store = self.store();
        let key = (resource, namespace.to_string(), name.to_string());
        let Some(mut object) = store.objects.remove(&key) else {
            panic!("no {resource} {namespace}/{name} to delete");
        };
        store.rv += 1;
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        record(
            &self.shared,
            &mut store,
            resource,
            namespace.to_string(),
            "DELETED",
            object,
        );
    }

    /// The Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.store()
            .objects
            .iter()
            .filter(|((resource, _, _), _)| *resource == "events")
            .map(|(_, event)| event.clone())
            .collect()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.store().requests.clone()
    }

    /// Watches open right now.
    pub fn open_watches(&self) -> usize {
        self.store().open_watches
    }

    /// The next `count` requests matching `matches` get `status` with a Status body.
    pub fn fail_next(&self, matches: Match, status: u16, count: usize) {
        self.store().faults.push_back(Fault {
            matches,
            status,
            remaining: count,
        });
    }

    /// Forgets the history: resuming a watch from any resourceVersion older than the current
    /// one gets `410 Gone`; a fresh list's resourceVersion is still good.
    pub fn compact(&self) {
        let mut store = self.store();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// Compacts, and ends every open watch with a `410 Gone` ERROR event.
    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.shared.signals.send(Signal::Expire);
    }

    /// Breaks the connection of every open watch in the middle of its stream.
    pub fn drop_watches(&self) {
        let _ = self.shared.signals.send(Signal::Drop);
    }

    /// Stops listening and closes every connection; the store stays.
    pub async fn stop(&self) {
        let server = self.server.lock().expect("server").take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await.expect("bind again");
        let server = tokio::spawn(serve(listener, self.shared.clone()));
        *self.server.lock().expect("server") = Some(server);
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().ok().and_then(|mut s| s.take()) {
            server.abort();
        }
    }
}

fn record(
    shared: &Shared,
    store: &mut Store,
    resource: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
) {
    let change = Change {
        rv: store.rv,
        resource,
        namespace,
        kind,
        object,
    };
    store.history.push(change.clone());
    let _ = shared.signals.send(Signal::Change(change));
}

/// Accepts connections until aborted; aborting closes every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let seen = SeenRequest {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        query: request.uri().query().map(parse_query).unwrap_or_default(),
        accept: header("accept"),
        authorization: header("authorization"),
    };
    let fault = {
        let mut store = shared.store.lock().expect("fake store");
        store.requests.push(seen.clone());
        take_fault(&mut store, &seen)
    };
    if let Some(status) = fault {
        return status_response(status, "injected failure");
    }

    let method = request.method().clone();
    let body = if method == Method::POST {
        request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    } else {
        Bytes::new()
    };
    route(shared, &method, &seen, &body)
}

fn take_fault(store: &mut Store, seen: &SeenRequest) -> Option<u16> {
    let index = store.faults.iter().position(|f| {
        seen.path.contains(&f.matches.path) && f.matches.watch.is_none_or(|w| w == seen.is_watch())
    })?;
    let fault = &mut store.faults[index];
    fault.remaining -= 1;
    let status = fault.status;
    if fault.remaining == 0 {
        store.faults.remove(index);
    }
    Some(status)
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    seen: &SeenRequest,
    body: &Bytes,
) -> Response<Body> {
    let parts: Vec<&str> = seen.path.trim_matches('/').split('/').collect();
    let versions = &shared.versions;
    match (method, parts.as_slice()) {
        (&Method::GET, ["api"]) => json_response(
            200,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        (&Method::GET, ["api", "v1"]) => json_response(
            200,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                   "resources": [resource("pods", "Pod", true)]}),
        ),
        (&Method::GET, ["apis"]) => {
            // A cluster without Istio has no security.istio.io group at all.
            let mut groups = vec![events_group()];
            if !versions.is_empty() {
                groups.insert(0, security_group(versions));
            }
            json_response(
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        (&Method::GET, ["apis", SECURITY_GROUP]) if !versions.is_empty() => {
            json_response(200, security_group(versions))
        }
        (&Method::GET, ["apis", SECURITY_GROUP, version]) if served(versions, version) => {
            json_response(
                200,
                json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": format!("{SECURITY_GROUP}/{version}"),
                "resources": [
                    resource("peerauthentications", "PeerAuthentication", true),
                    resource("authorizationpolicies", "AuthorizationPolicy", true),
                ]}),
            )
        }
        (&Method::GET, ["apis", SECURITY_GROUP, version, "peerauthentications"])
            if served(versions, version) =>
        {
            let api_version = format!("{SECURITY_GROUP}/{version}");
            list_or_watch(
                shared,
                seen,
                "peerauthentications",
                None,
                &api_version,
                "PeerAuthentication",
            )
        }
        (
            &Method::GET,
            [
                "apis",
                SECURITY_GROUP,
                version,
                "namespaces",
                ns,
                "peerauthentications",
            ],
        ) if served(versions, version) => {
            let api_version = format!("{SECURITY_GROUP}/{version}");
            list_or_watch(
                shared,
                seen,
                "peerauthentications",
                Some(ns),
                &api_version,
                "PeerAuthentication",
            )
        }
        (&Method::GET, ["api", "v1", "pods"]) => {
            list_or_watch(shared, seen, "pods", None, "v1", "Pod")
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            list_or_watch(shared, seen, "pods", Some(ns), "v1", "Pod")
        }
        (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            create_event(shared, ns, body)
        }
        _ => status_response(404, "the server could not find the requested resource"),
    }
}

fn served(versions: &[String], version: &str) -> bool {
    versions.iter().any(|v| v == version)
}

fn resource(name: &str, kind: &str, namespaced: bool) -> Value {
    json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
}

fn security_group(versions: &[String]) -> Value {
    let list: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{SECURITY_GROUP}/{v}"), "version": v}))
        .collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": SECURITY_GROUP,
           "versions": list, "preferredVersion": list[0]})
}

fn events_group() -> Value {
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

fn list_or_watch(
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

fn create_event(shared: &Arc<Shared>, namespace: &str, body: &Bytes) -> Response<Body> {
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

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn status_response(code: u16, message: &str) -> Response<Body> {
    let reason = match code {
        404 => "NotFound",
        409 => "AlreadyExists",
        410 => "Expired",
        403 => "Forbidden",
        _ => "InternalError",
    };
    json_response(code, status_json(code, reason, message))
}

fn json_response(code: u16, value: Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    Response::builder()
        .status(StatusCode::from_u16(code).expect("status"))
        .header("content-type", "application/json")
        .body(body)
        .expect("response")
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .map(|(k, v)| (k.to_string(), v.replace("%2C", ",").replace("%3D", "=")))
        .collect()
}
