//! The admin HTTP endpoints: health, readiness and what the relay is doing, as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::relay::Relay;
use crate::relay::registry::ProxyEntry;

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
        relay.metrics.encode(relay.cache.len()),
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

async fn proxies(State(relay): State<Arc<Relay>>) -> Json<Value> {
    let proxies: Vec<Value> = relay
        .registry
        .snapshot()
        .iter()
        .map(|entry| proxy_view(entry))
        .collect();
    Json(json!({
        "connected": proxies.len(),
        "cached_listeners": relay.cache.len(),
        "proxies": proxies,
    }))
}

fn proxy_view(entry: &ProxyEntry) -> Value {
    let status = entry.status();
    let rewritten_chains: Vec<Value> = status
        .listeners
        .iter()
        .filter_map(|l| l.report.as_ref())
        .flat_map(|report| {
            report
                .chains
                .iter()
                .filter(|c| !c.added.is_empty())
                .map(move |c| {
                    json!({
                        "listener": report.name,
                        "chain": c.name,
                        "index": c.index,
                        "destination_port": c.destination_port,
                        "kind": c.kind,
                        "added": c.added,
                    })
                })
        })
        .collect();

    json!({
        "stream_id": entry.stream_id,
        "node_id": entry.identity.node_id,
        "workload": entry.identity.workload,
        "workload_from": entry.identity.workload_from,
        "istio_version": entry.identity.istio_version,
        "xds": entry.xds,
        "connected_at": unix_seconds(entry.connected_at),
        "decision": status.policy,
        "plan": status.plan,
        "listeners": status.listeners,
        "rewritten_chains": rewritten_chains,
        "last_push": status.pushes.iter().map(|(t, p)| (t.clone(), json!({
            "at": unix_seconds(p.at),
            "origin": p.origin,
            "nonce": p.nonce,
            "version": p.version,
            "resources": p.resources,
        }))).collect::<serde_json::Map<_, _>>(),
        "acks": status.acks,
    })
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
