//! PeerAuthentication from the Kubernetes API, the source used when `--policy-dir` is not
//! given, and the live labels of the pods of connected proxies.
//!
//! - [`discovery`] picks `security.istio.io/v1` where the API server serves it, `v1beta1`
//!   otherwise.
//! - `policies` watches PeerAuthentication in all namespaces with kube-runtime's watcher:
//!   list, watch from the list's resourceVersion, relist after `410 Gone`, backoff on errors.
//!   The first complete list makes the source synced (`/readyz`); while the API server cannot
//!   be reached the policies known last stay in force.
//! - [`pods`] follows the labels of the pods whose proxies are connected, one metadata-only
//!   watch per namespace that has such pods.
//! - [`events`] posts a Kubernetes Event on a PeerAuthentication whose annotation is ignored,
//!   once per object version and problem.
//! - `state` is the one writer of the snapshot channel that all of them feed.

pub mod backoff;
pub mod discovery;
pub mod events;
pub mod pods;
mod policies;
mod state;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span};

pub use backoff::BackoffPolicy;
pub use pods::PodWatcher;

use super::{PodTracker, PolicySnapshot, PolicyWatch, SourceError};
use crate::metrics::Metrics;
use state::Publisher;

/// How the Kubernetes source behaves.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// Istio's root namespace.
    pub root_namespace: String,
    /// This replica's name, as Events name their reporter (`reportingInstance`).
    pub instance: String,
    /// Delays between retries against the API server.
    pub backoff: BackoffPolicy,
    /// Follow the live labels of connected proxies' pods; without it the node metadata's
    /// labels decide, as in Istio 1.11.
    pub pod_labels: bool,
    /// How long a namespace's pod watch stays after its last proxy left.
    pub pod_linger: Duration,
    /// Post Kubernetes Events about ignored annotations.
    pub events: bool,
}

impl KubeOptions {
    /// The defaults for `root_namespace` and `instance`.
    pub fn new(root_namespace: &str, instance: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_string(),
            instance: instance.to_string(),
            backoff: BackoffPolicy::default(),
            pod_labels: true,
            pod_linger: Duration::from_secs(30),
            events: true,
        }
    }
}

/// A client for the API server: from the kubeconfig file `kubeconfig` when given, otherwise
/// as `kubectl` finds one (`KUBECONFIG`, `~/.kube/config`), then the in-cluster service
/// account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let origin = path.display().to_string();
            let file = Kubeconfig::read_from(path).map_err(|e| SourceError::KubeConfig {
                origin: origin.clone(),
                reason: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| SourceError::KubeConfig {
                    origin,
                    reason: e.to_string(),
                })?
        }
        None => Config::infer().await.map_err(|e| SourceError::KubeConfig {
            origin: "KUBECONFIG, ~/.kube/config or the in-cluster service account".into(),
            reason: e.to_string(),
        })?,
    };
    info!(api_server = %config.cluster_url, "Kubernetes API configured");
    Client::try_from(config).map_err(|source| SourceError::KubeRequest {
        what: "building the client".into(),
        source: Box::new(source),
    })
}

/// The running Kubernetes source. Its tasks stop when it is dropped.
#[derive(Debug)]
pub struct KubeSource {
    /// The snapshots; not synced until the first complete list.
    pub policies: PolicyWatch,
    /// The sending end of `policies`.
    pub writer: watch::Sender<Arc<PolicySnapshot>>,
    /// Follows pod labels for the relay, when `pod_labels` is on.
    pub pods: Option<PodWatcher>,
    _tasks: Vec<AbortOnDrop>,
}

impl KubeSource {
    /// Starts watching through `client`; returns at once, unsynced. Complete lists and
    /// failed requests count in `metrics` as policy reads. Must run inside a Tokio runtime.
    pub fn start(client: Client, options: &KubeOptions, metrics: Arc<Metrics>) -> Self {
        let (writer, policies) = watch::channel(Arc::new(PolicySnapshot::empty(
            &options.root_namespace,
            "kubernetes (not listed yet)",
        )));
        let (problems_writer, problems) = watch::channel(Arc::default());
        let publisher = Arc::new(Publisher::new(
            &options.root_namespace,
            writer.clone(),
            problems_writer,
        ));

        let mut tasks = vec![AbortOnDrop(tokio::spawn(
            policies::follow(client.clone(), publisher.clone(), options.backoff, metrics)
                .instrument(info_span!("peer_authentication")),
        ))];
        if options.events {
            tasks.push(AbortOnDrop(tokio::spawn(
                events::record(
                    client.clone(),
                    options.instance.clone(),
                    problems,
                    options.backoff,
                )
                .instrument(info_span!("events")),
            )));
        }
        let pods = options.pod_labels.then(|| {
            let watcher = PodWatcher::new(publisher);
            tasks.push(AbortOnDrop(tokio::spawn(
                watcher
                    .clone()
                    .run(client, options.pod_linger, options.backoff)
                    .instrument(info_span!("pods")),
            )));
            watcher
        });
        Self {
            policies,
            writer,
            pods,
            _tasks: tasks,
        }
    }

    /// The pod tracker for [`Relay::with_pod_tracker`](crate::relay::Relay::with_pod_tracker).
    pub fn tracker(&self) -> Option<Arc<dyn PodTracker>> {
        self.pods
            .clone()
            .map(|pods| Arc::new(pods) as Arc<dyn PodTracker>)
    }
}

/// A task that is aborted when its handle is dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
