//! The proxies connected right now, and what the relay did for each: the source of
//! `/debug/proxies`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;
use tracing::{debug, error};

use dashmap::DashMap;
use serde::Serialize;

use super::listeners::RewrittenListener;
use super::node::ProxyIdentity;
use crate::policy::EffectivePolicy;
use crate::rewrite::RewritePlan;

/// Which ADS form a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XdsForm {
    /// `StreamAggregatedResources`.
    StateOfTheWorld,
    /// `DeltaAggregatedResources`.
    Delta,
}

/// Who made a response that went to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOrigin {
    /// istiod's response, relayed (rewritten or not).
    Istiod,
    /// A response the relay made itself.
    Relay,
}

/// The last response of one type sent to a proxy.
#[derive(Debug, Clone, Serialize)]
pub struct PushRecord {
    /// When it was sent.
    pub at: SystemTime,
    /// Its origin.
    pub origin: PushOrigin,
    /// Its nonce.
    pub nonce: String,
    /// Its version (SotW `version_info`, Delta `system_version_info`).
    pub version: String,
    /// How many resources it carried.
    pub resources: usize,
}

/// The proxy's answer to the last response of one type.
#[derive(Debug, Clone, Serialize)]
pub struct AckRecord {
    /// The nonce answered.
    pub nonce: String,
    /// The version the proxy reports holding.
    pub version: String,
    /// Envoy's error, when the answer was a rejection.
    pub nack: Option<String>,
}

/// What the relay knows about one proxy's stream; updated by the stream, read by `/debug`.
#[derive(Debug, Default, Serialize)]
pub struct ProxyStatus {
    /// The policy resolved for the workload at the last LDS response.
    pub policy: Option<EffectivePolicy>,
    /// The rewrite plan derived from it.
    pub plan: RewritePlan,
    /// Every Listener of the last LDS response and what the rewrite did to it.
    pub listeners: Vec<Arc<RewrittenListener>>,
    /// The last response per type URL.
    pub pushes: BTreeMap<String, PushRecord>,
    /// The last ACK or NACK per type URL.
    pub acks: BTreeMap<String, AckRecord>,
    /// Envoy's error when it rejected a rewritten listener; the proxy then gets istiod's
    /// listeners unchanged until its policy or istiod's listeners change.
    pub rewrite_rejected: Option<String>,
}

/// One connected proxy.
#[derive(Debug, Serialize)]
pub struct ProxyEntry {
    /// A number unique to the stream within this process.
    pub stream_id: u64,
    /// Who is connected.
    pub identity: ProxyIdentity,
    /// The ADS form.
    pub xds: XdsForm,
    /// When the stream opened.
    pub connected_at: SystemTime,
    status: Mutex<ProxyStatus>,
    #[serde(skip)]
    seq: AtomicU64,
}

impl ProxyEntry {
    /// The stream's status, for a short read or update.
    pub fn status(&self) -> MutexGuard<'_, ProxyStatus> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next number for a response of the relay's own on this stream.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Notes a response sent to the proxy.
    pub fn record_push(
        &self,
        type_url: &str,
        origin: PushOrigin,
        nonce: &str,
        version: &str,
        resources: usize,
    ) {
        debug!(
            type_url,
            ?origin,
            nonce,
            version,
            resources,
            "sending a response"
        );
        self.status().pushes.insert(
            type_url.to_string(),
            PushRecord {
                at: SystemTime::now(),
                origin,
                nonce: nonce.to_string(),
                version: version.to_string(),
                resources,
            },
        );
    }

    /// Notes the proxy's answer to a response: an ACK, or a NACK with Envoy's error. A request
    /// without a nonce answers nothing and is not noted.
    pub fn record_answer(&self, type_url: &str, nonce: &str, version: &str, error_detail: &Bytes) {
        if nonce.is_empty() {
            debug!(type_url, version, "the proxy asks for a type");
            return;
        }
        let nack =
            (!error_detail.is_empty()).then(|| super::stream::rejection_message(error_detail));
        match &nack {
            Some(message) => {
                error!(type_url, nonce, version, error = %message, "the proxy rejected a response")
            }
            None => debug!(type_url, nonce, version, "the proxy accepted a response"),
        }
        self.status().acks.insert(
            type_url.to_string(),
            AckRecord {
                nonce: nonce.to_string(),
                version: version.to_string(),
                nack,
            },
        );
    }
}

/// Every connected proxy, by stream id.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    streams: DashMap<u64, Arc<ProxyEntry>>,
    next_id: AtomicU64,
}

impl ProxyRegistry {
    /// Adds a stream; it is removed when the returned guard is dropped.
    pub fn register(self: &Arc<Self>, identity: ProxyIdentity, xds: XdsForm) -> Registration {
        let stream_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(ProxyEntry {
            stream_id,
            identity,
            xds,
            connected_at: SystemTime::now(),
            status: Mutex::default(),
            seq: AtomicU64::new(0),
        });
        self.streams.insert(stream_id, entry.clone());
        Registration {
            registry: self.clone(),
            entry,
            pod_guard: None,
        }
    }

    /// A snapshot of the connected proxies, ordered by stream id.
    pub fn snapshot(&self) -> Vec<Arc<ProxyEntry>> {
        let mut all: Vec<_> = self.streams.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|e| e.stream_id);
        all
    }

    /// How many streams are connected.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no stream is connected.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// Keeps a stream in the registry, and its pod's labels followed, for as long as it lives.
pub struct Registration {
    registry: Arc<ProxyRegistry>,
    entry: Arc<ProxyEntry>,
    /// The policy source's guard for following this proxy's pod, when it follows pods.
    pub pod_guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("entry", &self.entry.stream_id)
            .field("pod_followed", &self.pod_guard.is_some())
            .finish()
    }
}

impl Registration {
    /// The registered entry.
    pub fn entry(&self) -> &Arc<ProxyEntry> {
        &self.entry
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.streams.remove(&self.entry.stream_id);
    }
}
