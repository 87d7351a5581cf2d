//! The single writer of the Kubernetes source's policy channel. The PeerAuthentication watch
//! and the pod label watches both report here; every change becomes one new
//! [`PolicySnapshot`], and every change of the policies also a new list of problems for the
//! Event recorder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::ResourceExt;
use kube::api::DynamicObject;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::events::{self, Problem};
use crate::policy::{PeerAuthentication, PolicyError, PolicySet};
use crate::source::{PodLabels, PolicySnapshot};

/// The origin of every policy read from the API, in snapshots and errors.
pub const ORIGIN: &str = "kubernetes";

/// (namespace, name) of one object.
pub type ObjectKey = (String, String);

/// The version of an object a policy was read from: what an Event names as its subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectVersion {
    /// `security.istio.io/v1` or `security.istio.io/v1beta1`.
    pub api_version: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion`.
    pub resource_version: String,
}

/// One object as last seen.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) object: ObjectVersion,
    /// The policy of the latest version that could be read; an edit that cannot be read keeps
    /// the version before it in force, as the folder source does.
    pub(super) policy: Option<PeerAuthentication>,
    /// Why the latest version could not be read.
    pub(super) error: Option<PolicyError>,
}

/// Builds snapshots from what the watches report and publishes them.
#[derive(Debug)]
pub(super) struct Publisher {
    inner: Mutex<Inner>,
    writer: watch::Sender<Arc<PolicySnapshot>>,
    problems: watch::Sender<Arc<Vec<Problem>>>,
}

#[derive(Debug)]
struct Inner {
    root_namespace: String,
    origin: String,
    api_version: String,
    entries: BTreeMap<ObjectKey, Entry>,
    synced: bool,
    generation: u64,
    pods: Arc<PodLabels>,
    /// The set built from `entries`, reused while only pods change.
    set: Option<PolicySet>,
}

impl Publisher {
    pub(super) fn new(
        root_namespace: &str,
        writer: watch::Sender<Arc<PolicySnapshot>>,
        problems: watch::Sender<Arc<Vec<Problem>>>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                root_namespace: root_namespace.to_string(),
                origin: "kubernetes (not listed yet)".to_string(),
                api_version: String::new(),
                entries: BTreeMap::new(),
                synced: false,
                generation: 0,
                pods: Arc::default(),
                set: None,
            }),
            writer,
            problems,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records which version of the resource the objects come from.
    pub(super) fn set_api_version(&self, api_version: &str) {
        let mut inner = self.lock();
        inner.api_version = api_version.to_string();
        inner.origin = format!("kubernetes {api_version} PeerAuthentication, all namespaces");
    }

    /// A complete list: it replaces every object known before. The first one makes the
    /// source synced.
    pub(super) fn replace(&self, objects: Vec<DynamicObject>) {
        let mut inner = self.lock();
        let mut entries = BTreeMap::new();
        for object in objects {
            let key = key_of(&object);
            let entry = read(&inner.api_version, &object, inner.entries.get(&key));
            entries.insert(key, entry);
        }
        let unchanged = inner.synced
            && entries.len() == inner.entries.len()
            && entries
                .iter()
                .zip(&inner.entries)
                .all(|((k1, e1), (k2, e2))| k1 == k2 && e1.object == e2.object);
        if unchanged {
            debug!(policies = entries.len(), "relisted; nothing changed");
            return;
        }
        inner.entries = entries;
        inner.synced = true;
        self.publish(&mut inner, true, "listed");
    }

    /// An object was added or changed.
    pub(super) fn apply(&self, object: &DynamicObject) {
        let mut inner = self.lock();
        let key = key_of(object);
        let entry = read(&inner.api_version, object, inner.entries.get(&key));
        if inner
            .entries
            .get(&key)
            .is_some_and(|e| e.object == entry.object)
        {
            return;
        }
        inner.entries.insert(key, entry);
        self.publish(&mut inner, true, "changed");
    }

    /// An object was deleted.
    pub(super) fn delete(&self, object: &DynamicObject) {
        let mut inner = self.lock();
        if inner.entries.remove(&key_of(object)).is_some() {
            self.publish(&mut inner, true, "deleted");
        }
    }

    /// The live labels of the tracked pods changed. Before the first list they wait for it.
    pub(super) fn set_pods(&self, pods: PodLabels) {
        let mut inner = self.lock();
        if *inner.pods == pods {
            return;
        }
        inner.pods = Arc::new(pods);
        if inner.synced {
            self.publish(&mut inner, false, "pod labels");
        }
    }

    fn publish(&self, inner: &mut Inner, policies_changed: bool, why: &str) {
        if policies_changed || inner.set.is_none() {
            let policies: Vec<PeerAuthentication> = inner
                .entries
                .values()
                .filter_map(|e| e.policy.clone())
                .collect();
            let set = PolicySet::new(policies, &inner.root_namespace);
            let problems = events::problems(&set, &inner.entries);
            self.problems.send_replace(Arc::new(problems));
            inner.set = Some(set);
        }
        let Some(set) = inner.set.clone() else {
            return;
        };
        inner.generation += 1;
        let errors: Vec<PolicyError> = inner
            .entries
            .values()
            .filter_map(|e| e.error.clone())
            .collect();
        if policies_changed {
            info!(
                why,
                policies = set.len(),
                errors = errors.len(),
                generation = inner.generation,
                "policies updated"
            );
        } else {
            debug!(
                why,
                pods = inner.pods.len(),
                generation = inner.generation,
                "pod labels updated"
            );
        }
        self.writer.send_replace(Arc::new(PolicySnapshot {
            set,
            generation: inner.generation,
            synced: inner.synced,
            errors,
            origin: inner.origin.clone(),
            pods: inner.pods.clone(),
        }));
    }
}

fn key_of(object: &DynamicObject) -> ObjectKey {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// Reads one object; a version that cannot be read keeps the previous good policy.
fn read(api_version: &str, object: &DynamicObject, previous: Option<&Entry>) -> Entry {
    let version = ObjectVersion {
        api_version: object
            .types
            .as_ref()
            .map(|t| t.api_version.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| api_version.to_string()),
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
        uid: object.uid().unwrap_or_default(),
        resource_version: object.resource_version().unwrap_or_default(),
    };
    let value = serde_json::to_value(object).unwrap_or_default();
    match PeerAuthentication::from_object(&value, ORIGIN) {
        Ok(policy) => Entry {
            object: version,
            policy: Some(policy),
            error: None,
        },
        Err(error) => {
            let kept = previous.and_then(|p| p.policy.clone());
            warn!(
                object = %format!("{}/{}", version.namespace, version.name),
                resource_version = %version.resource_version,
                kept_previous = kept.is_some(),
                %error,
                "a PeerAuthentication cannot be read"
            );
            Entry {
                object: version,
                policy: kept,
                error: Some(error),
            }
        }
    }
}
