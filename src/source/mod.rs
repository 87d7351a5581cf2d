//! Where PeerAuthentication objects come from, and the snapshot of them that the relay reads.
//!
//! A source is the single writer of a `watch` channel of [`PolicySnapshot`]s; every stream reads
//! the latest snapshot when it needs a decision.

pub mod files;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::policy::{PolicyError, PolicySet};

/// Errors of the policy sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The policy folder could not be listed.
    #[error("cannot read the policy folder {path}: {source}")]
    ReadDir {
        /// The folder.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A policy file could not be read.
    #[error("cannot read the policy file {path}: {source}")]
    ReadFile {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No Kubernetes client configuration could be loaded.
    #[error("cannot load the Kubernetes client configuration from {origin}: {reason}")]
    KubeConfig {
        /// Where it was looked for: a kubeconfig path, or the places tried.
        origin: String,
        /// Why it failed.
        reason: String,
    },
    /// A request to the Kubernetes API failed.
    #[error("Kubernetes API request failed ({what}): {source}")]
    KubeRequest {
        /// What was asked.
        what: String,
        /// The client's error.
        #[source]
        source: Box<::kube::Error>,
    },
    /// The API server does not serve a resource the source needs.
    #[error("the Kubernetes API does not serve {resource}: {reason}")]
    NotServed {
        /// The resource, `plural.group`.
        resource: String,
        /// What discovery found instead.
        reason: String,
    },
}

/// All PeerAuthentication objects known at one moment, indexed for resolution.
#[derive(Debug, Serialize)]
pub struct PolicySnapshot {
    /// The policies, indexed.
    pub set: PolicySet,
    /// Counts up with every change, starting at 1 for the first complete read.
    pub generation: u64,
    /// Whether the source has completed its first full read.
    pub synced: bool,
    /// Documents that could not be used, with their file, position and field.
    pub errors: Vec<PolicyError>,
    /// Where the policies come from, for humans.
    pub origin: String,
    /// Live labels of the pods of connected proxies, when the source follows them; a pod not
    /// in here is judged by the labels in its node metadata.
    #[serde(skip)]
    pub pods: Arc<PodLabels>,
}

/// Pod labels keyed by (namespace, pod name).
pub type PodLabels = BTreeMap<(String, String), BTreeMap<String, String>>;

/// A source that can follow the labels of the pods whose proxies are connected.
pub trait PodTracker: Send + Sync + std::fmt::Debug {
    /// Follows the labels of pod `namespace/name` until the returned guard is dropped; changes
    /// arrive as new snapshots with [`PolicySnapshot::pods`] updated.
    fn track(&self, namespace: &str, name: &str) -> Box<dyn std::any::Any + Send + Sync>;
}

impl PolicySnapshot {
    /// The snapshot before anything was read: no policies, not synced.
    pub fn empty(root_namespace: &str, origin: &str) -> Self {
        Self {
            set: PolicySet::new(Vec::new(), root_namespace),
            generation: 0,
            synced: false,
            errors: Vec::new(),
            origin: origin.to_string(),
            pods: Arc::default(),
        }
    }
}

/// The receiving end that streams and the admin endpoints read.
pub type PolicyWatch = watch::Receiver<Arc<PolicySnapshot>>;
