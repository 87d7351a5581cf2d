//! The gRPC face of the relay: the `AggregatedDiscoveryService` that sidecars call, written
//! on HTTP/2 bodies so that messages keep their received bytes (see [`super::codec`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::codec::{Frame, MessageStream, Payloads, response_body};
use super::upstream::{DELTA_PATH, SOTW_PATH};
use super::{Relay, delta, sotw};
use crate::wire::{DeltaDiscoveryRequest, DiscoveryRequest};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a stream handler answers a call with: its responses to the sidecar, or its refusal.
type Handled<T> = Result<Response<ReceiverStream<Result<Frame<T>, Status>>>, Status>;

/// The ADS server that sidecars connect to.
#[derive(Debug, Clone)]
pub struct AdsServer {
    relay: Arc<Relay>,
}

impl AdsServer {
    /// A server relaying through `relay`.
    pub fn new(relay: Arc<Relay>) -> Self {
        Self { relay }
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tonic::codegen::Service<http::Request<Body>> for AdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let relay = self.relay.clone();
        match request.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let limit = relay.limits.max_message_size;
                let request = grpc_request::<DiscoveryRequest>(request, limit);
                Ok(grpc_response(sotw::serve(relay, request).await, limit))
            }),
            DELTA_PATH => Box::pin(async move {
                let limit = relay.limits.max_message_size;
                let request = grpc_request::<DeltaDiscoveryRequest>(request, limit);
                Ok(grpc_response(delta::serve(relay, request).await, limit))
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

/// A sidecar's call as the stream handlers take it: its metadata and its requests.
fn grpc_request<T: Message + Default>(
    request: http::Request<Body>,
    max_message_size: usize,
) -> Request<MessageStream<T>> {
    let (parts, body) = request.into_parts();
    Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        MessageStream::new(body, max_message_size),
    )
}

/// The HTTP response to a sidecar's call: the handler's stream of responses, or its refusal as
/// a trailers-only response.
fn grpc_response<T>(handled: Handled<T>, max_message_size: usize) -> http::Response<Body>
where
    T: Message + Default + Payloads + Send + 'static,
{
    match handled {
        Ok(response) => {
            let mut http =
                http::Response::new(response_body(response.into_inner(), max_message_size));
            http.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            http
        }
        Err(status) => status.into_http(),
    }
}
