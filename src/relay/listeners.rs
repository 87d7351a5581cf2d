//! The Listener side of the relay: rewriting the Listener resources of LDS responses for one
//! proxy's plan, through a cache shared by every stream.
//!
//! The cache holds istiod's bytes (copied out of the receive buffer) and the rewritten bytes, so
//! that a thousand sidecars of one workload hold one copy of their listeners between them, and
//! each stream keeps only references to the entries it last received and sent.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use prost::Message;
use serde::Serialize;
use tracing::{debug, warn};

use super::versions;
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
}

const MIN_SWEEP: usize = 1024;

impl ListenerCache {
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
        let result = Arc::new(match envelope {
            Envelope::Any => rewrite_any(plan, input.clone()),
            Envelope::Resource => rewrite_resource(plan, input.clone()),
        });
        let key = CacheKey {
            envelope,
            plan: plan.clone(),
            input,
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

    /// Drops the entries that no stream uses.
    pub fn sweep(&self) {
        self.entries.retain(|_, v| Arc::strong_count(v) > 1);
        let live = self.entries.len();
        self.sweep_at
            .store((live * 2).max(MIN_SWEEP), Ordering::Relaxed);
        debug!(live, "swept the listener cache");
    }

    fn maybe_sweep(&self) {
        let threshold = self.sweep_at.load(Ordering::Relaxed).max(MIN_SWEEP);
        if self.entries.len() >= threshold {
            self.sweep();
        }
    }
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
        output: None,
        report: None,
        error: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
