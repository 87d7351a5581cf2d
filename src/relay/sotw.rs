//! One state-of-the-world ADS stream: a sidecar's `StreamAggregatedResources` call carried to
//! istiod on a stream of its own, in order both ways, with the Listener responses rewritten for
//! the sidecar's workload.

use std::sync::Arc;
use std::time::SystemTime;

use futures::{Stream, StreamExt, stream};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::codec::{Frame, FrameCodec};
use super::listeners::{LISTENER_TYPE, rewrite_lds};
use super::node::ProxyIdentity;
use super::registry::{AckRecord, ProxyEntry, PushOrigin, PushRecord, Registration, XdsForm};
use super::upstream::{error_chain, forwarded_metadata, sotw_path};
use super::{HEALTH_INFO_TYPE, Relay, plan_for, workload_for};
use crate::wire::{DiscoveryRequest, DiscoveryResponse};

/// Responses waiting for the sidecar beyond the one being written: a slow sidecar holds back its
/// own istiod stream instead of filling the relay's memory.
const RESPONSE_QUEUE: usize = 1;

/// The stream of responses that goes back to the sidecar.
pub type ResponseStream = ReceiverStream<Result<Frame<DiscoveryResponse>, Status>>;

/// Serves one `StreamAggregatedResources` call.
pub async fn serve(
    relay: Arc<Relay>,
    request: Request<Streaming<Frame<DiscoveryRequest>>>,
) -> Result<Response<ResponseStream>, Status> {
    let (metadata, _, mut downstream) = request.into_parts();

    // Envoy sends its node only on the first request; nothing can be decided before it.
    let first = downstream
        .message()
        .await?
        .ok_or_else(|| Status::cancelled("the stream closed before its first request"))?;
    let identity = ProxyIdentity::from_node_bytes(&first.msg().node).map_err(|e| {
        Status::invalid_argument(format!("the first request's node cannot be read: {e}"))
    })?;

    let registration = relay.registry.register(identity, XdsForm::StateOfTheWorld);
    let entry = registration.entry().clone();
    let span = info_span!(
        "sotw",
        node.id = %entry.identity.node_id,
        stream = entry.stream_id
    );
    debug!(parent: &span, workload = ?entry.identity.workload, "sidecar connected");

    let channel = relay
        .upstream
        .connect()
        .instrument(span.clone())
        .await
        .map_err(|e| {
            warn!(parent: &span, error = %e, "cannot reach istiod");
            Status::unavailable(e.to_string())
        })?;
    let mut client = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(relay.limits.max_message_size)
        .max_encoding_message_size(relay.limits.max_message_size);

    let requests = stream::once(async { first })
        .chain(downstream_requests(downstream))
        .map({
            let entry = entry.clone();
            move |frame| {
                observe_request(&entry, frame.msg());
                frame
            }
        });
    let mut upstream_request = Request::new(requests);
    *upstream_request.metadata_mut() = forwarded_metadata(&metadata);

    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("istiod is not ready: {}", error_chain(&e))))?;
    let upstream = client
        .streaming(
            upstream_request,
            sotw_path(),
            FrameCodec::<DiscoveryRequest, DiscoveryResponse>::default(),
        )
        .instrument(span.clone())
        .await
        .inspect_err(|status| {
            info!(parent: &span, code = ?status.code(), message = status.message(), "istiod refused the stream");
        })?
        .into_inner();

    let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
    tokio::spawn(forward_responses(relay, registration, upstream, tx).instrument(span));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// The sidecar's requests after the first, ending at its half-close or its first error.
fn downstream_requests(
    downstream: Streaming<Frame<DiscoveryRequest>>,
) -> impl Stream<Item = Frame<DiscoveryRequest>> + Send {
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
}

/// Carries istiod's responses to the sidecar until either side ends.
async fn forward_responses(
    relay: Arc<Relay>,
    registration: Registration,
    mut upstream: Streaming<Frame<DiscoveryResponse>>,
    tx: mpsc::Sender<Result<Frame<DiscoveryResponse>, Status>>,
) {
    let entry = registration.entry().clone();
    // Followed for as long as this stream lives.
    let _pod = relay.pod_tracker.as_ref().and_then(|tracker| {
        let workload = entry.identity.workload.as_ref()?;
        Some(tracker.track(&workload.namespace, &workload.name))
    });
    loop {
        let next = tokio::select! {
            biased;
            _ = tx.closed() => {
                debug!("the sidecar went away; closing its istiod stream");
                return;
            }
            next = upstream.message() => next,
        };

        match next {
            Ok(Some(mut frame)) => {
                if frame.msg().type_url == LISTENER_TYPE {
                    rewrite_response(&relay, &entry, &mut frame);
                }
                record_push(&entry, frame.msg());
                if tx.send(Ok(frame)).await.is_err() {
                    debug!("the sidecar went away; closing its istiod stream");
                    return;
                }
            }
            Ok(None) => {
                debug!("istiod ended the stream");
                return;
            }
            Err(status) => {
                info!(code = ?status.code(), message = status.message(), "istiod's stream failed; ending the sidecar's");
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}

/// Rewrites the Listeners of one LDS response for the proxy's current policy.
fn rewrite_response(relay: &Relay, entry: &ProxyEntry, frame: &mut Frame<DiscoveryResponse>) {
    let snapshot = relay.policies.borrow().clone();
    let policy = workload_for(&entry.identity, &snapshot).map(|w| snapshot.set.resolve(&w));
    let plan = policy.as_ref().map(plan_for).unwrap_or_default();

    let mut listeners = Vec::new();
    if !plan.is_noop() {
        let lds = rewrite_lds(&relay.cache, &plan, &frame.msg().resources);
        listeners = lds.listeners;
        if let Some(resources) = lds.resources {
            if frame.has_unknown_fields() {
                warn!(
                    nonce = %frame.msg().nonce,
                    "istiod's LDS response has fields this build does not know; they are lost in the rewritten response"
                );
            }
            frame.msg_mut().resources = resources;
        }
    }

    let changed: Vec<&str> = listeners
        .iter()
        .filter(|l| l.changed())
        .map(|l| l.name.as_str())
        .collect();
    info!(
        nonce = %frame.msg().nonce,
        version = %frame.msg().version_info,
        listeners = frame.msg().resources.len(),
        rewritten = ?changed,
        "relaying LDS"
    );

    let mut status = entry.status();
    status.policy = policy;
    status.plan = plan;
    status.listeners = listeners;
}

fn record_push(entry: &ProxyEntry, response: &DiscoveryResponse) {
    debug!(
        type_url = %response.type_url,
        nonce = %response.nonce,
        version = %response.version_info,
        resources = response.resources.len(),
        "relaying a response"
    );
    entry.status().pushes.insert(
        response.type_url.clone(),
        PushRecord {
            at: SystemTime::now(),
            origin: PushOrigin::Istiod,
            nonce: response.nonce.clone(),
            version: response.version_info.clone(),
            resources: response.resources.len(),
        },
    );
}

/// Notes the sidecar's ACKs and NACKs. Istio's health reports carry `error_detail` without being
/// rejections, so they are not counted as NACKs.
fn observe_request(entry: &ProxyEntry, request: &DiscoveryRequest) {
    if request.response_nonce.is_empty() || request.type_url == HEALTH_INFO_TYPE {
        debug!(type_url = %request.type_url, names = request.resource_names.len(), "relaying a request");
        return;
    }

    let nack = (!request.error_detail.is_empty()).then(|| rejection_message(&request.error_detail));
    match &nack {
        Some(message) => error!(
            type_url = %request.type_url,
            nonce = %request.response_nonce,
            version = %request.version_info,
            error = %message,
            "the sidecar rejected a response"
        ),
        None => debug!(
            type_url = %request.type_url,
            nonce = %request.response_nonce,
            version = %request.version_info,
            "the sidecar accepted a response"
        ),
    }
    entry.status().acks.insert(
        request.type_url.clone(),
        AckRecord {
            nonce: request.response_nonce.clone(),
            version: request.version_info.clone(),
            nack,
        },
    );
}

/// The message of a `google.rpc.Status`, or a note that it could not be read.
fn rejection_message(error_detail: &bytes::Bytes) -> String {
    match envoy_types::pb::google::rpc::Status::decode(error_detail.clone()) {
        Ok(status) => status.message,
        Err(_) => "(unreadable error_detail)".to_string(),
    }
}
