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
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::{JoinHandle, JoinSet};

mod protocol;

use protocol::{
    create_event, events_group, json_response, list_or_watch, parse_query, resource,
    security_group, served, status_response,
};

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
    versions: Mutex<Vec<String>>,
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
            versions: Mutex::new(versions.iter().map(|v| v.to_string()).collect()),
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

    /// Serves PeerAuthentication in `versions` from now on, as after an Istio upgrade that
    /// adds or drops a version; requests to a version no longer served get `404`.
    pub fn serve_versions(&self, versions: &[&str]) {
        *self.shared.versions.lock().expect("versions") =
            versions.iter().map(|v| v.to_string()).collect();
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
    let versions = &shared.versions.lock().expect("versions").clone();
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
