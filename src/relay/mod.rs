//! The relay: an ADS server for sidecars that carries every stream to istiod on a stream of its
//! own and rewrites the inbound Listener of workloads whose policy asks for it.
//!
//! Each sidecar stream gets one upstream stream, messages go both ways in arrival order, and
//! every type but Listener passes through as the bytes istiod sent.

pub mod codec;
pub mod delta;
pub mod lds;
pub mod lifecycle;
pub mod listeners;
pub mod node;
pub mod registry;
pub mod server;
pub mod sotw;
pub mod stream;
pub mod upstream;
pub mod versions;

use std::sync::Arc;

use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::policy::{EffectivePolicy, Workload};
use crate::rewrite::RewritePlan;
use crate::source::{PodTracker, PolicySnapshot};
use node::ProxyIdentity;

pub use listeners::ListenerCache;
pub use registry::ProxyRegistry;
pub use server::AdsServer;
pub use upstream::Upstream;

/// Type URL of Istio's health reports, which pilot-agent sends on the ADS stream.
pub const HEALTH_INFO_TYPE: &str = "type.googleapis.com/istio.v1.HealthInformation";

/// Default limit on one ADS message, each way: far above the largest LDS and CDS responses seen
/// in real meshes (a few MB), and well below what would exhaust memory.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The `--upstream` address is not a URI.
    #[error("upstream address {address:?} is not valid: {reason}")]
    UpstreamAddress {
        /// The address as given.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// istiod could not be reached.
    #[error("cannot connect to istiod at {address}: {reason}")]
    UpstreamConnect {
        /// The address dialled.
        address: String,
        /// The transport's error.
        reason: String,
    },
}

/// Limits that apply to every stream.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest ADS message accepted or sent, in bytes.
    pub max_message_size: usize,
    /// Streams older than this (±10%) are ended so that the sidecar reconnects, possibly to
    /// another replica; `None` keeps them.
    pub max_stream_age: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_stream_age: None,
        }
    }
}

/// What every stream of the relay shares.
#[derive(Debug)]
pub struct Relay {
    /// Where istiod is.
    pub upstream: Upstream,
    /// The latest policies.
    pub policies: watch::Receiver<Arc<PolicySnapshot>>,
    /// Rewritten listeners shared between streams.
    pub cache: ListenerCache,
    /// Connected proxies.
    pub registry: Arc<ProxyRegistry>,
    /// Message limits.
    pub limits: Limits,
    /// Follows the live labels of connected proxies' pods, when the source can.
    pub pod_tracker: Option<Arc<dyn PodTracker>>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Serving or draining.
    pub lifecycle: watch::Sender<lifecycle::Lifecycle>,
}

impl Relay {
    /// A relay to `upstream` following `policies`.
    pub fn new(
        upstream: Upstream,
        policies: watch::Receiver<Arc<PolicySnapshot>>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            upstream,
            policies,
            cache: ListenerCache::new(metrics.clone()),
            registry: Arc::default(),
            limits,
            pod_tracker: None,
            metrics,
            lifecycle: watch::Sender::new(lifecycle::Lifecycle::Serving),
        }
    }

    /// Ends every stream within `window`, each at its own moment.
    pub fn drain(&self, window: Duration) {
        let until = tokio::time::Instant::now() + window;
        self.lifecycle
            .send_replace(lifecycle::Lifecycle::Draining { until });
    }

    /// Whether the relay is shutting down.
    pub fn draining(&self) -> bool {
        matches!(
            *self.lifecycle.borrow(),
            lifecycle::Lifecycle::Draining { .. }
        )
    }

    /// The clock that ends stream `stream_id` at its maximum age or during a drain.
    pub fn stream_clock(&self, stream_id: u64) -> lifecycle::StreamClock {
        lifecycle::StreamClock::new(
            self.lifecycle.subscribe(),
            self.limits.max_stream_age,
            stream_id,
        )
    }

    /// The same relay, following pod labels through `tracker`.
    pub fn with_pod_tracker(mut self, tracker: Arc<dyn PodTracker>) -> Self {
        self.pod_tracker = Some(tracker);
        self
    }
}

/// The workload a policy is resolved for: the proxy's namespace and pod name, with the pod's
/// live labels when the source follows them and the node metadata's labels otherwise.
pub fn workload_for(identity: &ProxyIdentity, snapshot: &PolicySnapshot) -> Option<Workload> {
    let mut workload = identity.workload.clone()?;
    let key = (workload.namespace.clone(), workload.name.clone());
    if let Some(labels) = snapshot.pods.get(&key) {
        workload.labels = labels.clone();
    }
    Some(workload)
}

/// The rewrite plan for a resolved policy: which chain ports get the standard ALPNs.
pub fn plan_for(policy: &EffectivePolicy) -> RewritePlan {
    RewritePlan {
        default: policy.adds_standard_alpns(None),
        ports: policy
            .port_modes
            .keys()
            .map(|&port| (port, policy.adds_standard_alpns(Some(port))))
            .collect(),
    }
}
