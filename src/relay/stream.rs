//! What both ADS forms share: accepting a sidecar's stream, opening its own stream to istiod,
//! reading the sidecar's requests, and the per-stream view of the policy.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use http::uri::PathAndQuery;
use prost::Message;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::codec::{Frame, MessageStream, Payloads, error_status, request_body};
use super::node::ProxyIdentity;
use super::registry::{ProxyEntry, Registration, XdsForm};
use super::upstream::{Lease, error_chain, forwarded_metadata};
use super::{Relay, RelayError, plan_for, workload_for};
use crate::metrics::StreamGauge;
use crate::policy::EffectivePolicy;
use crate::rewrite::RewritePlan;

/// A sidecar stream whose first request has arrived.
pub struct Accepted<Req> {
    /// The stream's place in the registry, held for as long as the stream lives.
    pub registration: Registration,
    /// The stream's span, carrying the node id.
    pub span: Span,
    /// The first request, which carries the node.
    pub first: Frame<Req>,
    /// The rest of the sidecar's requests.
    pub downstream: MessageStream<Req>,
    /// The sidecar's request metadata.
    pub metadata: MetadataMap,
    /// Counts the stream in the metrics while it lives.
    pub gauge: StreamGauge,
}

/// Waits for the first request of a sidecar stream, reads who is calling and registers it.
pub async fn accept<Req: Message + Default>(
    relay: &Relay,
    request: Request<MessageStream<Req>>,
    form: XdsForm,
    node_of: fn(&Req) -> &Bytes,
) -> Result<Accepted<Req>, Status> {
    let (metadata, _, mut downstream) = request.into_parts();

    // Envoy sends its node only on the first request; nothing can be decided before it.
    let first = downstream
        .message()
        .await?
        .ok_or_else(|| Status::cancelled("the stream closed before its first request"))?;
    let identity = ProxyIdentity::from_node_bytes(node_of(first.msg())).map_err(|e| {
        Status::invalid_argument(format!("the first request's node cannot be read: {e}"))
    })?;

    let mut registration = relay.registry.register(identity, form);
    // The pod's live labels are followed for as long as its stream lives.
    registration.pod_guard = relay.pod_tracker.as_ref().and_then(|tracker| {
        let workload = registration.entry().identity.workload.as_ref()?;
        Some(tracker.track(&workload.namespace, &workload.name))
    });
    let gauge = relay.metrics.stream_opened(form);
    let entry = registration.entry();
    let span = info_span!(
        "stream",
        node.id = %entry.identity.node_id,
        xds = ?form,
        stream = entry.stream_id
    );
    debug!(parent: &span, workload = ?entry.identity.workload, "sidecar connected");
    Ok(Accepted {
        registration,
        span,
        first,
        downstream,
        metadata,
        gauge,
    })
}

/// Opens the sidecar's own stream to istiod, carrying `requests` and the sidecar's metadata.
/// The lease returned with it is the stream's share of its connection, to be held as long as
/// the stream lives.
pub async fn open_upstream<Req, Resp>(
    relay: &Relay,
    span: &Span,
    metadata: &MetadataMap,
    requests: impl Stream<Item = Frame<Req>> + Send + 'static,
    path: PathAndQuery,
) -> Result<(MessageStream<Resp>, Lease), Status>
where
    Req: Message + Default + Payloads + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let unreachable = |e: &dyn std::error::Error| {
        relay.metrics.upstream_error();
        let e = RelayError::UpstreamConnect {
            address: relay.upstream.address().to_string(),
            reason: error_chain(e),
        };
        warn!(parent: span, error = %e, "cannot reach istiod");
        Status::unavailable(e.to_string())
    };
    let limit = relay.limits.max_message_size;
    let requests = Unsent::new(requests);

    // A second attempt only when the first connection refused the stream before reading any of
    // it, which is what a connection istiod is closing (a GOAWAY) does.
    let mut attempts = 0;
    let (response, lease) = loop {
        attempts += 1;
        let lease = relay.upstream.connect().instrument(span.clone()).await;
        let mut channel = lease.channel();
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .map_err(|e| unreachable(&e))?;
        let body = request_body(requests.clone(), limit);
        match channel
            .call(grpc_request(body, &path, metadata))
            .instrument(span.clone())
            .await
        {
            Ok(response) => break (response, lease),
            Err(e) if attempts == 1 && requests.untouched() => {
                lease.retire();
                debug!(parent: span, error = %error_chain(&e), "istiod's connection refused a new stream; opening it on another");
            }
            // A transport error: the connection could not be made or was lost before istiod
            // answered.
            Err(e) => return Err(unreachable(&e)),
        }
    };

    let refused = |status: Status| {
        info!(parent: span, code = ?status.code(), message = status.message(), "istiod refused the stream");
        status
    };
    if let Some(status) = error_status(response.headers()) {
        return Err(refused(status));
    }
    if response.status() != http::StatusCode::OK {
        let status = Status::unknown(format!("istiod answered HTTP {}", response.status()));
        return Err(refused(status));
    }
    Ok((MessageStream::new(response.into_body(), limit), lease))
}

/// A gRPC call on `path` carrying `body` and the sidecar's metadata.
fn grpc_request(
    body: tonic::body::Body,
    path: &PathAndQuery,
    metadata: &MetadataMap,
) -> http::Request<tonic::body::Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from(path.clone());
    *request.headers_mut() = forwarded_metadata(metadata).into_headers();
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    request
}

/// The sidecar's requests, handed to whichever request body reads them first. A body that a
/// connection dropped unread leaves them for the next attempt.
struct Unsent<T> {
    slot: Arc<std::sync::Mutex<Option<futures::stream::BoxStream<'static, T>>>>,
    taken: Option<futures::stream::BoxStream<'static, T>>,
}

impl<T> Unsent<T> {
    fn new(requests: impl Stream<Item = T> + Send + 'static) -> Self {
        Self {
            slot: Arc::new(std::sync::Mutex::new(Some(requests.boxed()))),
            taken: None,
        }
    }

    /// Whether no body has read the requests yet.
    fn untouched(&self) -> bool {
        self.slot.lock().is_ok_and(|slot| slot.is_some())
    }
}

impl<T> Clone for Unsent<T> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
            taken: None,
        }
    }
}

impl<T> Stream for Unsent<T> {
    type Item = T;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        if self.taken.is_none() {
            let taken = self.slot.lock().ok().and_then(|mut slot| slot.take());
            match taken {
                Some(requests) => self.taken = Some(requests),
                None => return std::task::Poll::Ready(None),
            }
        }
        match self.taken.as_mut() {
            Some(requests) => requests.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

/// The sidecar's requests after the first, ending at its half-close or its first error.
pub fn downstream_requests<Req: Message + Default + Send + 'static>(
    downstream: MessageStream<Req>,
) -> impl Stream<Item = Frame<Req>> + Send {
    stream::unfold(downstream, |mut downstream| async move {
        match downstream.message().await {
            Ok(Some(frame)) => Some((frame, downstream)),
            Ok(None) => {
                debug!("the sidecar closed its side of the stream");
                None
            }
            Err(status) => {
                debug!(code = ?status.code(), message = status.message(), "the sidecar's stream failed");
                None
            }
        }
    })
    .fuse()
}

/// The policy resolved for a proxy from the relay's latest snapshot, with the plan it gives.
pub struct Decision {
    /// The resolved policy; `None` when the proxy names no workload.
    pub policy: Option<EffectivePolicy>,
    /// Which chain ports get the standard ALPNs.
    pub plan: RewritePlan,
    /// The generation of the snapshot decided on.
    pub generation: u64,
}

/// Decides for `entry` with the relay's latest policies, marking them seen on `policies`.
pub fn decide(
    entry: &ProxyEntry,
    policies: &mut tokio::sync::watch::Receiver<Arc<crate::source::PolicySnapshot>>,
) -> Decision {
    let snapshot = policies.borrow_and_update().clone();
    let policy = workload_for(&entry.identity, &snapshot).map(|w| snapshot.set.resolve(&w));
    let plan = policy.as_ref().map(plan_for).unwrap_or_default();
    Decision {
        policy,
        plan,
        generation: snapshot.generation,
    }
}

/// The message of a `google.rpc.Status`, or a note that it could not be read.
pub fn rejection_message(error_detail: &Bytes) -> String {
    match envoy_types::pb::google::rpc::Status::decode(error_detail.clone()) {
        Ok(status) if !status.message.is_empty() => status.message,
        Ok(status) => format!("code {}", status.code),
        Err(_) => "(unreadable error_detail)".to_string(),
    }
}
