//! The admin HTTP endpoints: health, readiness and what the relay is doing, as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::policy::{EffectivePolicy, Workload};
use crate::relay::Relay;
use crate::relay::listeners::RewrittenListener;
use crate::relay::registry::{AckRecord, ProxyEntry, PushOrigin, PushRecord, XdsForm};
use crate::rewrite::{AlpnSet, ChainKind, RewritePlan};

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin address could not be bound.
    #[error("cannot listen for admin requests on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the admin server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The admin endpoints over one relay.
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/proxies", get(proxies))
        .route("/debug/policies", get(policies))
        .with_state(relay)
}

/// Binds `address` and returns the listener, so that a bad address fails before serving starts.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AdminError::Bind { address, source })
}

/// Serves the admin endpoints until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    axum::serve(listener, router(relay))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

async fn metrics(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        relay
            .metrics
            .encode(relay.cache.len(), relay.upstream.connections()),
    )
}

async fn readyz(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    let snapshot = relay.policies.borrow().clone();
    if relay.draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_string(),
        )
    } else if snapshot.synced {
        (
            StatusCode::OK,
            format!("ready: policies from {}\n", snapshot.origin),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: waiting for the first read of {}\n",
                snapshot.origin
            ),
        )
    }
}

/// `/debug/proxies`: every connected proxy in brief, or with `?node=<node id>` the proxies of
/// that node in full, each listener and rewritten chain included. The full form of thousands of
/// proxies would be tens of megabytes built at once, so it is only given for one node.
async fn proxies(State(relay): State<Arc<Relay>>, RawQuery(query): RawQuery) -> Response {
    let node = query.as_deref().and_then(node_filter);
    let snapshot = relay.registry.snapshot();
    let proxies: Vec<ProxyView<'_>> = snapshot
        .iter()
        .filter(|entry| {
            node.as_deref()
                .is_none_or(|id| entry.identity.node_id == id)
        })
        .map(|entry| ProxyView::of(entry, node.is_some()))
        .collect();
    let body = ProxiesView {
        connected: snapshot.len(),
        cached_listeners: relay.cache.len(),
        proxies,
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => ([(CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The `node` parameter of a query string, decoded.
fn node_filter(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "node")
        .map(|(_, value)| value.into_owned())
}

#[derive(Serialize)]
struct ProxiesView<'a> {
    /// Every connected stream, also those the node filter left out.
    connected: usize,
    cached_listeners: usize,
    proxies: Vec<ProxyView<'a>>,
}

/// One proxy as `/debug/proxies` shows it. Its status is copied out under the lock, which is
/// held only for that copy; listeners are shared, not copied.
#[derive(Serialize)]
struct ProxyView<'a> {
    stream_id: u64,
    node_id: &'a str,
    workload: &'a Option<Workload>,
    workload_from: &'static str,
    istio_version: &'a Option<String>,
    xds: XdsForm,
    connected_at: f64,
    decision: Option<EffectivePolicy>,
    plan: RewritePlan,
    listener_count: usize,
    rewritten_chain_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    listeners: Option<Vec<Arc<RewrittenListener>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rewritten_chains: Option<Vec<RewrittenChainView>>,
    last_push: BTreeMap<String, PushView>,
    acks: BTreeMap<String, AckRecord>,
    rewrite_rejected: Option<String>,
}

impl<'a> ProxyView<'a> {
    fn of(entry: &'a ProxyEntry, detail: bool) -> Self {
        let status = entry.status();
        let rewritten = || {
            status
                .listeners
                .iter()
                .filter_map(|l| l.report.as_ref())
                .flat_map(|report| {
                    report
                        .chains
                        .iter()
                        .filter(|c| !c.added.is_empty())
                        .map(move |c| (report, c))
                })
        };
        let rewritten_chains = detail.then(|| {
            rewritten()
                .map(|(report, c)| RewrittenChainView {
                    listener: report.name.clone(),
                    chain: c.name.clone(),
                    index: c.index,
                    destination_port: c.destination_port,
                    kind: c.kind,
                    added: c.added,
                })
                .collect()
        });
        ProxyView {
            stream_id: entry.stream_id,
            node_id: &entry.identity.node_id,
            workload: &entry.identity.workload,
            workload_from: entry.identity.workload_from,
            istio_version: &entry.identity.istio_version,
            xds: entry.xds,
            connected_at: unix_seconds(entry.connected_at),
            decision: status.policy.clone(),
            plan: status.plan.clone(),
            listener_count: status.listeners.len(),
            rewritten_chain_count: rewritten().count(),
            listeners: detail.then(|| status.listeners.clone()),
            rewritten_chains,
            last_push: status
                .pushes
                .iter()
                .map(|(type_url, push)| (type_url.clone(), PushView::of(push)))
                .collect(),
            acks: status.acks.clone(),
            rewrite_rejected: status.rewrite_rejected.clone(),
        }
    }
}

#[derive(Serialize)]
struct RewrittenChainView {
    listener: String,
    chain: String,
    index: usize,
    destination_port: Option<u32>,
    kind: ChainKind,
    added: AlpnSet,
}

#[derive(Serialize)]
struct PushView {
    at: f64,
    origin: PushOrigin,
    nonce: String,
    version: String,
    resources: usize,
}

impl PushView {
    fn of(push: &PushRecord) -> Self {
        PushView {
            at: unix_seconds(push.at),
            origin: push.origin,
            nonce: push.nonce.clone(),
            version: push.version.clone(),
            resources: push.resources,
        }
    }
}

async fn policies(State(relay): State<Arc<Relay>>) -> Json<Value> {
    let snapshot = relay.policies.borrow().clone();
    Json(to_value(&*snapshot))
}

fn to_value(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests;
