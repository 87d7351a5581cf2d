//! The gRPC service: a recording codec in front of the generated ADS server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

use super::sotw::AdsHandler;
use super::{MAX_MESSAGE_SIZE, SOTW_PATH};

/// Request bytes of one stream, in arrival order, between the codec and the stream's task.
#[derive(Clone, Debug, Default)]
pub(super) struct RawRequests(Arc<Mutex<VecDeque<Bytes>>>);

impl RawRequests {
    pub(super) fn push(&self, bytes: Bytes) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(bytes);
    }

    pub(super) fn pop(&self) -> Option<Bytes> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// A protobuf codec that also keeps every request's bytes as they came off the wire.
struct RecordingCodec {
    raw: RawRequests,
}

impl Codec for RecordingCodec {
    type Encode = DiscoveryResponse;
    type Decode = DiscoveryRequest;
    type Encoder = ResponseEncoder;
    type Decoder = RecordingDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RecordingDecoder {
            raw: self.raw.clone(),
        }
    }
}

struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = DiscoveryResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|error| Status::internal(format!("encoding DiscoveryResponse: {error}")))
    }
}

struct RecordingDecoder {
    raw: RawRequests,
}

impl Decoder for RecordingDecoder {
    type Item = DiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        let request = DiscoveryRequest::decode(bytes.clone()).map_err(|error| {
            Status::invalid_argument(format!("decoding DiscoveryRequest: {error}"))
        })?;
        self.raw.push(bytes);
        Ok(Some(request))
    }
}

/// Routes `StreamAggregatedResources` through the recording codec and everything else to the
/// generated server.
#[derive(Clone)]
pub(super) struct AdsService {
    pub(super) handler: Arc<AdsHandler>,
    pub(super) generated: AggregatedDiscoveryServiceServer<AdsHandler>,
}

impl NamedService for AdsService {
    const NAME: &'static str = <AggregatedDiscoveryServiceServer<AdsHandler> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != SOTW_PATH {
            return self.generated.call(request);
        }
        let handler = Arc::clone(&self.handler);
        Box::pin(async move {
            let raw = RawRequests::default();
            request.extensions_mut().insert(raw.clone());
            let mut grpc = Grpc::new(RecordingCodec { raw })
                .apply_max_message_size_config(Some(MAX_MESSAGE_SIZE), Some(MAX_MESSAGE_SIZE));
            Ok(grpc.streaming(SotwCall(handler), request).await)
        })
    }
}

/// Adapts the handler's trait method to tonic's streaming service shape.
struct SotwCall(Arc<AdsHandler>);

impl tonic::server::StreamingService<DiscoveryRequest> for SotwCall {
    type Response = DiscoveryResponse;
    type ResponseStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let handler = Arc::clone(&self.0);
        Box::pin(async move { handler.stream_aggregated_resources(request).await })
    }
}
