//! State-of-the-world ADS streams, answered by istiod's rules, and the handler behind both ADS
//! methods.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::delta::DeltaStream;
use super::service::RawRequests;
use super::{
    AdsForm, HEALTH_INFO_TYPE_URL, RESPONSE_QUEUE, RecordedRequest, RecordedResponse, RequestKind,
    Shared, TypeSnapshot,
};

/// What one stream sent last for one type URL, for classifying the next request.
#[derive(Debug, Default)]
struct TypeState {
    nonce: String,
    version: Option<String>,
    names: Vec<String>,
}

/// One `StreamAggregatedResources` call, run by its own task.
struct SotwStream {
    shared: Arc<Shared>,
    id: u64,
    metadata: MetadataMap,
    types: BTreeMap<String, TypeState>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl SotwStream {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>, raw: RawRequests) {
        let mut changes = self.shared.snapshot.subscribe();
        let mut closer = self.shared.closer.subscribe();
        let mut error = None;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        let bytes = raw.pop().unwrap_or_else(|| request.encode_to_vec().into());
                        if !self.on_request(request, bytes).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        error = Some(status.to_string());
                        break;
                    }
                },
                Ok(()) = changes.changed() => {
                    if !self.on_snapshot_change().await {
                        break;
                    }
                }
                Ok(()) = closer.changed() => {
                    let closing = Status::unavailable("test upstream closed the stream");
                    let _ = self.out.send(Err(closing)).await;
                    break;
                }
            }
        }
        self.shared.close_stream(self.id, error);
    }

    /// Handles one request; false when the client no longer reads responses.
    async fn on_request(&mut self, request: DiscoveryRequest, raw: Bytes) -> bool {
        let state = self.types.get(&request.type_url);
        let kind = classify(&request, state);
        let answer = match kind {
            RequestKind::Initial | RequestKind::AckNamesChanged => self
                .shared
                .snapshot
                .borrow()
                .types
                .get(&request.type_url)
                .cloned(),
            RequestKind::Ack
            | RequestKind::Nack
            | RequestKind::Stale
            | RequestKind::HealthReport => None,
        };
        if matches!(
            kind,
            RequestKind::Initial | RequestKind::Ack | RequestKind::AckNamesChanged
        ) {
            let state = self.types.entry(request.type_url.clone()).or_default();
            state.names = request.resource_names.clone();
        }

        let answered = answer.is_some();
        let type_url = request.type_url.clone();
        self.shared.record_request(RecordedRequest {
            stream: self.id,
            form: AdsForm::Sotw,
            metadata: self.metadata.clone(),
            raw,
            request,
            delta: None,
            kind,
            answered,
        });
        match answer {
            Some(snapshot) => self.send(&type_url, snapshot).await,
            None => true,
        }
    }

    /// Sends every type whose snapshot moved on and that this stream asked for.
    async fn on_snapshot_change(&mut self) -> bool {
        let due: Vec<(String, TypeSnapshot)> = {
            let snapshot = self.shared.snapshot.borrow();
            self.types
                .iter()
                .filter_map(|(type_url, state)| {
                    let current = snapshot.types.get(type_url)?;
                    let moved = state.version.as_deref() != Some(current.version.as_str());
                    moved.then(|| (type_url.clone(), current.clone()))
                })
                .collect()
        };
        for (type_url, snapshot) in due {
            if !self.send(&type_url, snapshot).await {
                return false;
            }
        }
        true
    }

    async fn send(&mut self, type_url: &str, snapshot: TypeSnapshot) -> bool {
        let response = DiscoveryResponse {
            version_info: snapshot.version.clone(),
            resources: snapshot.resources,
            type_url: type_url.to_owned(),
            nonce: self.shared.nonce(),
            ..Default::default()
        };
        let state = self.types.entry(type_url.to_owned()).or_default();
        state.nonce = response.nonce.clone();
        state.version = Some(snapshot.version);

        self.shared.record_response(RecordedResponse {
            stream: self.id,
            response: response.clone(),
            delta: None,
        });
        self.out.send(Ok(response)).await.is_ok()
    }
}

/// istiod's `ShouldRespond`, minus its bookkeeping.
fn classify(request: &DiscoveryRequest, sent: Option<&TypeState>) -> RequestKind {
    if request.type_url == HEALTH_INFO_TYPE_URL {
        return RequestKind::HealthReport;
    }
    if request.error_detail.is_some() {
        return RequestKind::Nack;
    }
    let sent = match sent {
        Some(state) if !state.nonce.is_empty() && !request.response_nonce.is_empty() => state,
        _ => return RequestKind::Initial,
    };
    if request.response_nonce != sent.nonce {
        return RequestKind::Stale;
    }
    if request.resource_names != sent.names {
        return RequestKind::AckNamesChanged;
    }
    RequestKind::Ack
}

/// The ADS implementation behind both the generated server and the recording dispatch.
#[derive(Clone, Debug)]
pub(super) struct AdsHandler {
    pub(super) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsHandler {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        // Without the recording codec (only when called through the generated server) the
        // bytes are re-encoded from the decoded message.
        let raw = request
            .extensions()
            .get::<RawRequests>()
            .cloned()
            .unwrap_or_default();
        let metadata = request.metadata().clone();
        let inbound = request.into_inner();

        let id = self.shared.open_stream(AdsForm::Sotw, &metadata);

        let (out, responses) = mpsc::channel(RESPONSE_QUEUE);
        let stream = SotwStream {
            shared: Arc::clone(&self.shared),
            id,
            metadata,
            types: BTreeMap::new(),
            out,
        };
        let span = tracing::debug_span!("test_upstream_stream", stream = id);
        tokio::spawn(stream.run(inbound, raw).instrument(span));
        Ok(Response::new(ReceiverStream::new(responses)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let raw = request
            .extensions()
            .get::<RawRequests>()
            .cloned()
            .unwrap_or_default();
        let metadata = request.metadata().clone();
        let inbound = request.into_inner();
        let id = self.shared.open_stream(AdsForm::Delta, &metadata);

        let (out, responses) = mpsc::channel(RESPONSE_QUEUE);
        let stream = DeltaStream::new(Arc::clone(&self.shared), id, metadata, out);
        let span = tracing::debug_span!("test_upstream_delta_stream", stream = id);
        tokio::spawn(stream.run(inbound, raw).instrument(span));
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}
