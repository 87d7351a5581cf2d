//! Live labels of the pods whose proxies are connected, as current istiod uses them: relabel
//! a pod and its policy is resolved again.
//!
//! What is watched: one metadata-only watch (`PartialObjectMetadata`: no spec, no status) per
//! namespace that has at least one tracked pod, started by the first proxy of that namespace
//! and stopped [`KubeOptions::pod_linger`](super::KubeOptions) after its last one left, so
//! that a proxy reconnecting does not cost a relist. The load on the API server is bounded
//! by the number of namespaces with connected proxies, not by the number of proxies or of
//! pods in the cluster: a per-pod watch (`fieldSelector=metadata.name=...`) would cost one
//! watch per sidecar, thousands for a large mesh, and a cluster-wide pod watch would carry
//! every pod of the cluster. The labels of every pod of a watched namespace are kept (names
//! and labels only), so that a proxy connecting there gets its pod's labels at once.
//!
//! A pod that cannot be read (not listed yet, deleted, or the watch is forbidden) is absent
//! from [`PolicySnapshot::pods`](crate::source::PolicySnapshot::pods), and the relay then uses
//! the labels of the proxy's node metadata.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Error as KubeError};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::AbortOnDrop;
use super::backoff::{Backoff, BackoffPolicy};
use super::policies::RELIST_QUIET;
use super::state::{ObjectKey, Publisher};
use crate::source::{PodLabels, PodTracker};

type Labels = BTreeMap<String, String>;

/// Follows the labels of tracked pods; the relay's [`PodTracker`].
#[derive(Debug, Clone)]
pub struct PodWatcher {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<PodState>,
    /// Wakes the manager when the set of tracked namespaces changes.
    wake: Notify,
    publisher: Arc<Publisher>,
}

#[derive(Debug, Default)]
struct PodState {
    /// Tracked pods and how many guards each has (a pod may have several proxy streams).
    tracked: HashMap<ObjectKey, usize>,
    /// Namespaces with tracked pods, or with none since `idle_since`.
    namespaces: HashMap<String, NamespacePods>,
}

#[derive(Debug, Default)]
struct NamespacePods {
    /// How many distinct tracked pods are in the namespace.
    tracked: usize,
    /// When `tracked` fell to zero.
    idle_since: Option<Instant>,
    /// Labels of every pod of the namespace, by pod name, as last listed or watched.
    pods: HashMap<String, Labels>,
}

/// Keeps one pod tracked until dropped.
struct TrackGuard {
    shared: Arc<Shared>,
    key: ObjectKey,
}

impl PodWatcher {
    /// A watcher publishing through `publisher`; nothing is watched until [`Self::run`] runs
    /// and a pod is tracked.
    pub(super) fn new(publisher: Arc<Publisher>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(PodState::default()),
                wake: Notify::new(),
                publisher,
            }),
        }
    }

    /// Starts and stops the namespace watches as pods are tracked and untracked, until the
    /// task is aborted (which stops every watch it started).
    pub(super) async fn run(self, client: Client, linger: Duration, backoff: BackoffPolicy) {
        let mut watches: HashMap<String, AbortOnDrop> = HashMap::new();
        loop {
            let next_expiry = {
                let mut state = self.shared.lock();
                let now = Instant::now();
                for (namespace, pods) in &state.namespaces {
                    if pods.tracked > 0 && !watches.contains_key(namespace) {
                        info!(%namespace, "watching pod labels");
                        let task = tokio::spawn(
                            watch_namespace(
                                self.shared.clone(),
                                client.clone(),
                                namespace.clone(),
                                backoff,
                            )
                            .instrument(info_span!("pod_labels", %namespace)),
                        );
                        watches.insert(namespace.clone(), AbortOnDrop(task));
                    }
                }
                state.namespaces.retain(|namespace, pods| {
                    let expired = pods.idle_since.is_some_and(|t| now >= t + linger);
                    if expired {
                        info!(%namespace, "no proxy of the namespace is connected; stopping its pod watch");
                        watches.remove(namespace);
                    }
                    !expired
                });
                state
                    .namespaces
                    .values()
                    .filter_map(|pods| pods.idle_since.map(|t| t + linger))
                    .min()
            };
            match next_expiry {
                Some(at) => {
                    tokio::select! {
                        () = self.shared.wake.notified() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.shared.wake.notified().await,
            }
        }
    }
}

impl PodTracker for PodWatcher {
    fn track(&self, namespace: &str, name: &str) -> Box<dyn Any + Send + Sync> {
        let key = (namespace.to_string(), name.to_string());
        {
            let mut state = self.shared.lock();
            let count = state.tracked.entry(key.clone()).or_default();
            *count += 1;
            if *count == 1 {
                let pods = state.namespaces.entry(namespace.to_string()).or_default();
                pods.tracked += 1;
                pods.idle_since = None;
                let known = pods.pods.contains_key(name);
                debug!(%namespace, pod = name, known, "tracking pod labels");
                if known {
                    self.shared.publish(&state);
                }
            }
        }
        self.shared.wake.notify_one();
        Box::new(TrackGuard {
            shared: self.shared.clone(),
            key,
        })
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            let Some(count) = state.tracked.get_mut(&self.key) else {
                return;
            };
            *count -= 1;
            if *count > 0 {
                return;
            }
            state.tracked.remove(&self.key);
            if let Some(pods) = state.namespaces.get_mut(&self.key.0) {
                pods.tracked -= 1;
                if pods.tracked == 0 {
                    pods.idle_since = Some(Instant::now());
                }
            }
            debug!(namespace = %self.key.0, pod = %self.key.1, "no longer tracking pod labels");
            self.shared.publish(&state);
        }
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PodState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the labels of every tracked pod that is known.
    fn publish(&self, state: &PodState) {
        let labels: PodLabels = state
            .tracked
            .keys()
            .filter_map(|(namespace, name)| {
                let labels = state.namespaces.get(namespace)?.pods.get(name)?;
                Some(((namespace.clone(), name.clone()), labels.clone()))
            })
            .collect();
        self.publisher.set_pods(labels);
    }

    /// A complete list of the namespace's pods.
    fn replace(&self, namespace: &str, pods: HashMap<String, Labels>) {
        let mut state = self.lock();
        let Some(entry) = state.namespaces.get_mut(namespace) else {
            return;
        };
        debug!(pods = pods.len(), "pods listed");
        entry.pods = pods;
        self.publish(&state);
    }

    /// One pod was added or changed (`Some` labels) or deleted (`None`).
    fn update(&self, namespace: &str, name: String, labels: Option<Labels>) {
        let mut state = self.lock();
        let Some(entry) = state.namespaces.get_mut(namespace) else {
            return;
        };
        let changed = match labels {
            Some(labels) => entry.pods.insert(name.clone(), labels.clone()) != Some(labels),
            None => entry.pods.remove(&name).is_some(),
        };
        let key = (namespace.to_string(), name);
        if changed && state.tracked.contains_key(&key) {
            debug!(pod = %key.1, "labels of a tracked pod changed");
            self.publish(&state);
        }
    }
}

/// Follows the pods of one namespace until aborted.
async fn watch_namespace(
    shared: Arc<Shared>,
    client: Client,
    namespace: String,
    policy: BackoffPolicy,
) {
    let mut backoff = Backoff::new(policy);
    let mut last_relist: Option<std::time::Instant> = None;
    loop {
        if last_relist.is_some_and(|t| t.elapsed() < RELIST_QUIET) {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        last_relist = Some(std::time::Instant::now());
        // `PartialObjectMeta` makes every request metadata-only.
        let api: Api<PartialObjectMeta<Pod>> = Api::namespaced(client.clone(), &namespace);
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        let mut listing: Option<HashMap<String, Labels>> = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    backoff.reset();
                    apply(&shared, &namespace, event, &mut listing);
                }
                Err(error) if is_gone(&error) => {
                    debug!(%error, "the pod watch expired; relisting");
                    break;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    warn!(
                        %error,
                        retry_in = ?delay,
                        "the pod watch failed; keeping the labels known last"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn apply(
    shared: &Shared,
    namespace: &str,
    event: Event<PartialObjectMeta<Pod>>,
    listing: &mut Option<HashMap<String, Labels>>,
) {
    let name_and_labels = |pod: PartialObjectMeta<Pod>| {
        let metadata = pod.metadata;
        (
            metadata.name.unwrap_or_default(),
            metadata.labels.unwrap_or_default(),
        )
    };
    match event {
        Event::Init => *listing = Some(HashMap::new()),
        Event::InitApply(pod) => {
            let (name, labels) = name_and_labels(pod);
            listing.get_or_insert_default().insert(name, labels);
        }
        Event::InitDone => shared.replace(namespace, listing.take().unwrap_or_default()),
        Event::Apply(pod) => {
            let (name, labels) = name_and_labels(pod);
            shared.update(namespace, name, Some(labels));
        }
        Event::Delete(pod) => {
            let (name, _) = name_and_labels(pod);
            shared.update(namespace, name, None);
        }
    }
}

/// A `410 Gone` as the status of the watch request, which the watcher would retry with the
/// same expired resourceVersion; a 410 event it handles by itself.
fn is_gone(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::WatchStartFailed(KubeError::Api(status))
            | watcher::Error::WatchFailed(KubeError::Api(status)) if status.code == 410
    )
}
