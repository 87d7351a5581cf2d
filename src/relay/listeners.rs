//! The Listener side of the relay: rewriting the Listener resources of LDS responses for one
//! proxy's plan, with a cache shared by every stream so that identical workloads share one
//! rewritten copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use prost::Message;
use serde::Serialize;
use tracing::{debug, warn};

use crate::rewrite::{self, ListenerRewrite, RewritePlan};
use crate::wire;

/// Type URL of `envoy.config.listener.v3.Listener`.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// What became of one Listener resource under one plan.
#[derive(Debug, Serialize)]
pub struct RewrittenListener {
    /// The listener's name, or the reason it could not be read.
    pub name: String,
    /// The resource (a `google.protobuf.Any`) to send instead of istiod's; `None` when istiod's
    /// bytes go out unchanged.
    #[serde(skip)]
    pub resource: Option<Bytes>,
    /// The rewrite's report; `None` when the listener could not be read and was passed through.
    pub report: Option<ListenerRewrite>,
    /// Why the listener was passed through unread, when it was.
    pub error: Option<String>,
}

impl RewrittenListener {
    /// Whether the rewrite changed this listener.
    pub fn changed(&self) -> bool {
        self.resource.is_some()
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    plan: RewritePlan,
    resource: Bytes,
}

/// Rewritten listeners keyed by (plan, istiod's resource bytes), shared by all streams.
///
/// Entries that no stream refers to any more are swept when the cache has doubled since the last
/// sweep, so its size follows the listeners in use rather than every listener ever seen.
#[derive(Debug, Default)]
pub struct ListenerCache {
    entries: DashMap<CacheKey, Arc<RewrittenListener>>,
    sweep_at: AtomicUsize,
}

const MIN_SWEEP: usize = 1024;

impl ListenerCache {
    /// Rewrites one LDS resource (a `google.protobuf.Any` holding a Listener) under `plan`.
    pub fn rewrite(&self, plan: &RewritePlan, resource: &Bytes) -> Arc<RewrittenListener> {
        let key = CacheKey {
            plan: plan.clone(),
            resource: resource.clone(),
        };
        if let Some(hit) = self.entries.get(&key) {
            return hit.clone();
        }

        let result = Arc::new(rewrite_resource(plan, resource));

        // The key must not pin the whole receive buffer the resource is a view of.
        let key = CacheKey {
            plan: plan.clone(),
            resource: Bytes::copy_from_slice(resource),
        };
        let result = self.entries.entry(key).or_insert(result).clone();
        self.maybe_sweep();
        result
    }

    /// How many rewritten listeners the cache holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn maybe_sweep(&self) {
        let threshold = self.sweep_at.load(Ordering::Relaxed).max(MIN_SWEEP);
        if self.entries.len() < threshold {
            return;
        }
        self.entries.retain(|_, v| Arc::strong_count(v) > 1);
        let live = self.entries.len();
        self.sweep_at
            .store((live * 2).max(MIN_SWEEP), Ordering::Relaxed);
        debug!(live, "swept the listener cache");
    }
}

fn rewrite_resource(plan: &RewritePlan, resource: &Bytes) -> RewrittenListener {
    let any = match wire::Any::decode(resource.clone()) {
        Ok(any) => any,
        Err(e) => {
            return unread(format!(
                "the LDS resource is not a google.protobuf.Any: {e}"
            ));
        }
    };
    if any.type_url != LISTENER_TYPE {
        return unread(format!("the LDS resource holds {}", any.type_url));
    }

    match rewrite::rewrite_listener(&any.value, plan) {
        Ok(report) => {
            let resource = report.output.as_ref().map(|listener| {
                wire::Any {
                    type_url: any.type_url.clone(),
                    value: listener.clone(),
                }
                .encode_to_vec()
                .into()
            });
            RewrittenListener {
                name: report.name.clone(),
                resource,
                report: Some(report),
                error: None,
            }
        }
        Err(e) => {
            warn!(error = %e, "passing a listener through unchanged: it could not be read");
            unread(e.to_string())
        }
    }
}

fn unread(error: String) -> RewrittenListener {
    RewrittenListener {
        name: String::new(),
        resource: None,
        report: None,
        error: Some(error),
    }
}

/// The outcome of rewriting every Listener of one LDS response.
#[derive(Debug, Default)]
pub struct LdsRewrite {
    /// The resources to send, in istiod's order; `None` when nothing changed.
    pub resources: Option<Vec<Bytes>>,
    /// One entry per Listener resource, in istiod's order.
    pub listeners: Vec<Arc<RewrittenListener>>,
}

/// Rewrites the Listener resources of one LDS response under `plan`.
pub fn rewrite_lds(cache: &ListenerCache, plan: &RewritePlan, resources: &[Bytes]) -> LdsRewrite {
    let mut out = LdsRewrite::default();
    let mut changed = false;
    let mut rewritten = Vec::with_capacity(resources.len());

    for resource in resources {
        let result = cache.rewrite(plan, resource);
        match &result.resource {
            Some(new) => {
                changed = true;
                rewritten.push(new.clone());
            }
            None => rewritten.push(resource.clone()),
        }
        out.listeners.push(result);
    }

    if changed {
        out.resources = Some(rewritten);
    }
    out
}
