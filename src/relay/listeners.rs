//! The Listener side of the relay: rewriting the Listener resources of LDS responses for one
//! proxy's plan, through a cache shared by every stream.
//!
//! The cache holds istiod's bytes (copied out of the receive buffer) and the rewritten bytes, so
//! that a thousand sidecars of one workload hold one copy of their listeners between them, and
//! each stream keeps only references to the entries it last received and sent.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use prost::Message;
use serde::Serialize;
use tracing::{debug, warn};

use super::versions;
use crate::metrics::Metrics;
use crate::rewrite::{self, ListenerRewrite, RewritePlan};
use crate::wire;

/// Type URL of `envoy.config.listener.v3.Listener`.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// How a Listener resource is wrapped on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Envelope {
    /// A `google.protobuf.Any`, as in state-of-the-world responses.
    Any,
    /// An `envoy.service.discovery.v3.Resource`, as in Delta responses.
    Resource,
}

/// What became of one Listener resource under one plan.
#[derive(Debug, Serialize)]
pub struct RewrittenListener {
    /// The listener's name; in Delta responses, the resource's name.
    pub name: String,
    /// istiod's resource, as received.
    #[serde(skip)]
    pub input: Bytes,
    /// The Listener inside `input` (a view of it), empty when it could not be read. Envoy's
    /// rejections are remembered against these bytes, which stay the same when only the Delta
    /// envelope's version changes.
    #[serde(skip)]
    pub listener: Bytes,
    /// The resource to send instead, when the rewrite changed it.
    #[serde(skip)]
    pub output: Option<Bytes>,
    /// The rewrite's report; `None` when the listener was passed through unread.
    pub report: Option<ListenerRewrite>,
    /// Why the listener was passed through unread, when it was.
    pub error: Option<String>,
}

impl RewrittenListener {
    /// Whether the rewrite changed this listener.
    pub fn changed(&self) -> bool {
        self.output.is_some()
    }

    /// The bytes that go to the sidecar.
    pub fn sent(&self) -> &Bytes {
        self.output.as_ref().unwrap_or(&self.input)
    }

    /// Whether any plan gives this same result: the listener was skipped (not inbound, say) or
    /// could not be read. A policy change then need not look it up again.
    pub fn plan_independent(&self) -> bool {
        self.output.is_none() && self.report.as_ref().is_none_or(|r| r.skipped.is_some())
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    envelope: Envelope,
    plan: RewritePlan,
    input: Bytes,
}

/// Rewritten listeners keyed by (envelope, plan, istiod's bytes), shared by all streams.
///
/// Entries that no stream refers to any more are swept whenever the cache has doubled since the
/// last sweep, so its size follows the listeners in use rather than every listener ever seen.
///
/// Every listener of every LDS response is looked up, so the key's hash reads every byte istiod
/// sent: it is foldhash, several times faster than the standard SipHash on long inputs. Its
/// seed is random; the keys come from istiod, which the relay trusts.
#[derive(Debug, Default)]
pub struct ListenerCache {
    entries: DashMap<CacheKey, Arc<RewrittenListener>, foldhash::fast::RandomState>,
    sweep_at: AtomicUsize,
    /// Bytes of istiod's listeners and their rewrites held by the entries.
    bytes: AtomicUsize,
    /// `bytes` at which the next sweep runs.
    sweep_at_bytes: AtomicUsize,
    metrics: Arc<Metrics>,
}

const MIN_SWEEP: usize = 1024;

/// The cache is also swept when it holds this many bytes (or twice what the live entries
/// hold, if more). Counting entries alone let 1024 stale listeners of a big mesh (300 KiB to
/// MiBs each, one per istiod push) stay in memory: found by `tests/faults.rs`, where the
/// relay's RSS grew by the size of every version istiod pushed.
const MIN_SWEEP_BYTES: usize = 8 * 1024 * 1024;

impl ListenerCache {
    /// An empty cache that reports rewrite times to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    /// Rewrites one Listener resource, wrapped as `envelope`, under `plan`.
    pub fn rewrite(
        &self,
        envelope: Envelope,
        plan: &RewritePlan,
        resource: &Bytes,
    ) -> Arc<RewrittenListener> {
        let key = CacheKey {
            envelope,
            plan: plan.clone(),
            input: resource.clone(),
        };
        if let Some(hit) = self.entries.get(&key) {
            return hit.clone();
        }

        // The cache keeps a copy of its own: `resource` is a view of a whole receive buffer.
        let input = Bytes::copy_from_slice(resource);
        let started = Instant::now();
        let result = Arc::new(match envelope {
            Envelope::Any => rewrite_any(plan, input.clone()),
            Envelope::Resource => rewrite_resource(plan, input.clone()),
        });
        self.metrics.rewrite_took(started.elapsed());
        let key = CacheKey {
            envelope,
            plan: plan.clone(),
            input,
        };
        let result = match self.entries.entry(key) {
            dashmap::Entry::Occupied(hit) => hit.get().clone(),
            dashmap::Entry::Vacant(slot) => {
                self.bytes
                    .fetch_add(entry_bytes(&result), Ordering::Relaxed);
                slot.insert(result).clone()
            }
        };
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

    /// Drops the entries that no stream uses.
    pub fn sweep(&self) {
        self.entries.retain(|_, v| Arc::strong_count(v) > 1);
        let live = self.entries.len();
        self.sweep_at
            .store((live * 2).max(MIN_SWEEP), Ordering::Relaxed);
        let live_bytes: usize = self.entries.iter().map(|e| entry_bytes(e.value())).sum();
        self.bytes.store(live_bytes, Ordering::Relaxed);
        self.sweep_at_bytes
            .store((live_bytes * 2).max(MIN_SWEEP_BYTES), Ordering::Relaxed);
        debug!(live, "swept the listener cache");
    }

    fn maybe_sweep(&self) {
        let threshold = self.sweep_at.load(Ordering::Relaxed).max(MIN_SWEEP);
        let threshold_bytes = self
            .sweep_at_bytes
            .load(Ordering::Relaxed)
            .max(MIN_SWEEP_BYTES);
        if self.entries.len() >= threshold || self.bytes.load(Ordering::Relaxed) >= threshold_bytes
        {
            self.sweep();
        }
    }
}

/// What an entry holds: istiod's bytes (shared by the key and the entry) and the rewrite.
fn entry_bytes(listener: &RewrittenListener) -> usize {
    listener.input.len() + listener.output.as_ref().map_or(0, Bytes::len)
}

/// A state-of-the-world LDS resource: a `google.protobuf.Any` holding a Listener.
fn rewrite_any(plan: &RewritePlan, input: Bytes) -> RewrittenListener {
    let any = match wire::Any::decode(input.clone()) {
        Ok(any) => any,
        Err(e) => {
            return unread(
                input,
                String::new(),
                format!("not a google.protobuf.Any: {e}"),
            );
        }
    };
    if any.type_url != LISTENER_TYPE {
        return unread(input, String::new(), format!("holds {}", any.type_url));
    }

    match rewrite::rewrite_listener(&any.value, plan) {
        Ok(report) => {
            let output = report.output.as_ref().map(|listener| {
                let any = wire::Any {
                    type_url: any.type_url.clone(),
                    value: listener.clone(),
                };
                Bytes::from(any.encode_to_vec())
            });
            RewrittenListener {
                name: report.name.clone(),
                input,
                listener: any.value.clone(),
                output,
                report: Some(report),
                error: None,
            }
        }
        Err(e) => unreadable(input, String::new(), e),
    }
}

/// A Delta LDS resource: an `envoy.service.discovery.v3.Resource` holding a Listener. A changed
/// resource gets a version of the relay's making, derived from istiod's and the new bytes.
fn rewrite_resource(plan: &RewritePlan, input: Bytes) -> RewrittenListener {
    let resource = match wire::Resource::decode(input.clone()) {
        Ok(resource) => resource,
        Err(e) => {
            let problem = format!("not an envoy.service.discovery.v3.Resource: {e}");
            return unread(input, String::new(), problem);
        }
    };
    let name = resource.name.clone();
    let Some(any) = resource.resource.as_ref() else {
        // A resource without a payload is how Delta says "this name has no content".
        return unread(input, name, "carries no listener".to_string());
    };
    if any.type_url != LISTENER_TYPE {
        return unread(input, name, format!("holds {}", any.type_url));
    }
    if resource.encoded_len() != input.len() {
        // Fields this build does not know would be lost by re-encoding the envelope.
        let problem = "the Resource envelope has fields this build does not know".to_string();
        return unread(input, name, problem);
    }

    match rewrite::rewrite_listener(&any.value, plan) {
        Ok(report) => {
            let output = report.output.as_ref().map(|listener| {
                let mut hasher = DefaultHasher::new();
                listener.hash(&mut hasher);
                let mut changed = resource.clone();
                changed.version = versions::relay_version(
                    &resource.version,
                    &format!("{:016x}", hasher.finish()),
                );
                changed.resource = Some(wire::Any {
                    type_url: any.type_url.clone(),
                    value: listener.clone(),
                });
                Bytes::from(changed.encode_to_vec())
            });
            RewrittenListener {
                // Delta streams know their resources by the resource name.
                name,
                input,
                listener: any.value.clone(),
                output,
                report: Some(report),
                error: None,
            }
        }
        Err(e) => unreadable(input, name, e),
    }
}

fn unreadable(input: Bytes, name: String, error: rewrite::RewriteError) -> RewrittenListener {
    warn!(listener = %name, error = %error, "passing a listener through unchanged: it could not be read");
    unread(input, name, error.to_string())
}

fn unread(input: Bytes, name: String, error: String) -> RewrittenListener {
    RewrittenListener {
        name,
        input,
        listener: Bytes::new(),
        output: None,
        report: None,
        error: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::util::pack_any;

    /// A 1 MiB listener, distinct per `version`, as an encoded `Any`.
    fn big(version: usize) -> Bytes {
        let listener = Listener {
            name: "virtualInbound".to_string(),
            stat_prefix: format!("v{version}-{}", "p".repeat(1024 * 1024)),
            ..Default::default()
        };
        Bytes::from(pack_any(listener).encode_to_vec())
    }

    #[test]
    fn stale_big_listeners_are_swept_by_bytes_not_only_by_count() {
        let cache = ListenerCache::new(Arc::new(Metrics::new()));
        let plan = RewritePlan::default();
        // One listener a stream still holds, then 40 versions nobody keeps.
        let live = cache.rewrite(Envelope::Any, &plan, &big(0));
        for version in 1..=40 {
            cache.rewrite(Envelope::Any, &plan, &big(version));
        }
        let held = cache.bytes.load(Ordering::Relaxed);
        assert!(cache.len() <= 9, "{} entries cached", cache.len());
        assert!(held <= MIN_SWEEP_BYTES + 1024 * 1024 + 4096, "{held} bytes");
        cache.sweep();
        assert_eq!(cache.len(), 1, "only the live listener stays");
        assert!(Arc::ptr_eq(
            &live,
            &cache.rewrite(Envelope::Any, &plan, &big(0))
        ));
    }

    use crate::testkit::istio::{Layout, Mode, benchmark_ports, virtual_inbound};
    use envoy_types::pb::envoy::config::core::v3::TrafficDirection;

    fn any(listener: &envoy_types::pb::envoy::config::listener::v3::Listener) -> Bytes {
        let any = wire::Any {
            type_url: LISTENER_TYPE.to_string(),
            value: listener.encode_to_vec().into(),
        };
        any.encode_to_vec().into()
    }

    #[test]
    fn only_rewritable_listeners_depend_on_the_plan() {
        let cache = ListenerCache::default();
        let on = RewritePlan {
            default: true,
            ports: Default::default(),
        };
        let inbound = virtual_inbound(Layout::Current, Mode::Permissive, &benchmark_ports(3));
        let outbound = envoy_types::pb::envoy::config::listener::v3::Listener {
            traffic_direction: TrafficDirection::Outbound as i32,
            ..inbound.clone()
        };

        let rewritten = cache.rewrite(Envelope::Any, &on, &any(&inbound));
        assert!(rewritten.changed());
        assert!(!rewritten.plan_independent());
        let untouched = cache.rewrite(Envelope::Any, &RewritePlan::default(), &any(&inbound));
        assert!(!untouched.plan_independent());

        let skipped = cache.rewrite(Envelope::Any, &on, &any(&outbound));
        assert!(skipped.plan_independent());
        let garbage = cache.rewrite(Envelope::Any, &on, &Bytes::from_static(b"\xff"));
        assert!(garbage.plan_independent());

        // Identical inputs share one entry.
        let again = cache.rewrite(Envelope::Any, &on, &any(&inbound));
        assert!(Arc::ptr_eq(&rewritten, &again));
    }
}
