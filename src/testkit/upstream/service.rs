//! The gRPC service: a recording codec in front of the ADS handler, for both ADS methods.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

use super::sotw::AdsHandler;
use super::{DELTA_PATH, MAX_MESSAGE_SIZE, SOTW_PATH};

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

/// A protobuf codec that also keeps every request's bytes as they came off the wire: `Req` is
/// received, `Resp` sent.
struct RecordingCodec<Req, Resp> {
    raw: RawRequests,
    types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> RecordingCodec<Req, Resp> {
    fn new(raw: RawRequests) -> Self {
        Self {
            raw,
            types: PhantomData,
        }
    }
}

impl<Req, Resp> Codec for RecordingCodec<Req, Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
{
    type Encode = Resp;
    type Decode = Req;
    type Encoder = ResponseEncoder<Resp>;
    type Decoder = RecordingDecoder<Req>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RecordingDecoder {
            raw: self.raw.clone(),
            types: PhantomData,
        }
    }
}

struct ResponseEncoder<Resp>(PhantomData<fn() -> Resp>);

impl<Resp: Message> Encoder for ResponseEncoder<Resp> {
    type Item = Resp;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|error| Status::internal(format!("encoding an ADS response: {error}")))
    }
}

struct RecordingDecoder<Req> {
    raw: RawRequests,
    types: PhantomData<fn() -> Req>,
}

impl<Req: Message + Default> Decoder for RecordingDecoder<Req> {
    type Item = Req;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        let request = Req::decode(bytes.clone()).map_err(|error| {
            Status::invalid_argument(format!("decoding an ADS request: {error}"))
        })?;
        self.raw.push(bytes);
        Ok(Some(request))
    }
}

/// Routes both ADS methods through the recording codec and anything else to the generated
/// server (which answers `UNIMPLEMENTED`).
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

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = Arc::clone(&self.handler);
        match request.uri().path() {
            SOTW_PATH => Box::pin(recorded_call(request, move |call| async move {
                handler.stream_aggregated_resources(call).await
            })),
            DELTA_PATH => Box::pin(recorded_call(request, move |call| async move {
                handler.delta_aggregated_resources(call).await
            })),
            _ => self.generated.call(request),
        }
    }
}

/// Serves one streaming call with the recording codec, handing the raw request bytes to the
/// handler through the request's extensions.
async fn recorded_call<Req, Resp, F, Fut>(
    mut request: http::Request<tonic::body::Body>,
    handler: F,
) -> Result<http::Response<tonic::body::Body>, Infallible>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
    F: FnOnce(Request<Streaming<Req>>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<ReceiverStream<Result<Resp, Status>>>, Status>>
        + Send
        + 'static,
{
    let raw = RawRequests::default();
    request.extensions_mut().insert(raw.clone());
    let mut grpc = Grpc::new(RecordingCodec::<Req, Resp>::new(raw))
        .apply_max_message_size_config(Some(MAX_MESSAGE_SIZE), Some(MAX_MESSAGE_SIZE));
    Ok(grpc.streaming(Call(Some(handler)), request).await)
}

/// Adapts a handler method to tonic's streaming service shape; tonic calls it once per request.
struct Call<F>(Option<F>);

impl<Req, Resp, F, Fut> tonic::server::StreamingService<Req> for Call<F>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: FnOnce(Request<Streaming<Req>>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<ReceiverStream<Result<Resp, Status>>>, Status>>
        + Send
        + 'static,
{
    type Response = Resp;
    type ResponseStream = ReceiverStream<Result<Resp, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<Req>>) -> Self::Future {
        match self.0.take() {
            Some(handler) => Box::pin(handler(request)),
            None => Box::pin(async { Err(Status::internal("the call was already served")) }),
        }
    }
}
