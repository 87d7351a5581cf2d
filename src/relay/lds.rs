//! What a stream remembers of its listeners between responses: istiod's latest listeners with
//! their rewrites, which rewrites Envoy rejected, and the rejection held back from istiod while
//! the relay tries istiod's own listeners instead.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use super::listeners::{Envelope, ListenerCache, RewrittenListener};
use crate::rewrite::RewritePlan;

/// Rewrites that Envoy rejected, by listener name: a listener is not rewritten again under the
/// same plan while istiod's bytes for it stay the same.
#[derive(Debug, Default)]
pub struct Rejections {
    by_name: HashMap<String, (RewritePlan, Bytes)>,
    /// Envoy's error for the last rejection.
    pub last_error: Option<String>,
}

impl Rejections {
    /// Rewrites `input` under `plan`, unless Envoy rejected exactly this rewrite before.
    pub fn rewrite(
        &self,
        cache: &ListenerCache,
        envelope: Envelope,
        plan: &RewritePlan,
        input: &Bytes,
    ) -> Arc<RewrittenListener> {
        let entry = cache.rewrite(envelope, plan, input);
        let rejected = entry.changed()
            && self
                .by_name
                .get(&entry.name)
                .is_some_and(|(p, i)| p == plan && i == &entry.input);
        if rejected {
            cache.rewrite(envelope, &RewritePlan::default(), input)
        } else {
            entry
        }
    }

    /// Records that Envoy rejected the rewrites of `listeners` under `plan`.
    pub fn reject<'a>(
        &mut self,
        listeners: impl IntoIterator<Item = &'a Arc<RewrittenListener>>,
        plan: &RewritePlan,
        error: String,
    ) {
        for listener in listeners.into_iter().filter(|l| l.changed()) {
            warn!(listener = %listener.name, %error, "Envoy rejected the rewritten listener; sending istiod's instead");
            self.by_name.insert(
                listener.name.clone(),
                (plan.clone(), listener.input.clone()),
            );
        }
        self.last_error = Some(error);
    }

    /// Whether any rejection is in force.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The answer to istiod's response that the relay holds back while Envoy tries istiod's
/// unchanged listeners in place of the rejected rewrite.
#[derive(Debug)]
pub struct Held<Req> {
    /// istiod's nonce that Envoy rejected.
    pub upstream_nonce: String,
    /// istiod's version of that response.
    pub upstream_version: String,
    /// Envoy's rejection, forwarded only if Envoy rejects istiod's listeners too.
    pub nack: Req,
    /// The nonce of the relay's response carrying istiod's unchanged listeners, once sent.
    pub fallback_nonce: Option<String>,
}
