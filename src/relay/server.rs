//! The gRPC face of the relay: the `AggregatedDiscoveryService` that sidecars call, written
//! against tonic's server parts so that messages keep their received bytes (see [`super::codec`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status};

use super::codec::{Frame, FrameCodec};
use super::upstream::{DELTA_PATH, SOTW_PATH};
use super::{Relay, delta, sotw};
use crate::wire::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

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
                let mut grpc =
                    Grpc::new(FrameCodec::<DiscoveryResponse, DiscoveryRequest>::default())
                        .max_decoding_message_size(limit)
                        .max_encoding_message_size(limit);
                Ok(grpc.streaming(SotwCall(relay), request).await)
            }),
            DELTA_PATH => Box::pin(async move {
                let limit = relay.limits.max_message_size;
                let mut grpc = Grpc::new(
                    FrameCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default(),
                )
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit);
                Ok(grpc.streaming(DeltaCall(relay), request).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown method").into_http()) }),
        }
    }
}

/// The state-of-the-world method as a tower service, the shape tonic's server parts expect.
struct SotwCall(Arc<Relay>);

impl tonic::codegen::Service<Request<Streaming<Frame<DiscoveryRequest>>>> for SotwCall {
    type Response = Response<sotw::ResponseStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<Frame<DiscoveryRequest>>>) -> Self::Future {
        Box::pin(sotw::serve(self.0.clone(), request))
    }
}

/// The incremental method as a tower service.
struct DeltaCall(Arc<Relay>);

impl tonic::codegen::Service<Request<Streaming<Frame<DeltaDiscoveryRequest>>>> for DeltaCall {
    type Response = Response<delta::ResponseStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<Frame<DeltaDiscoveryRequest>>>) -> Self::Future {
        Box::pin(delta::serve(self.0.clone(), request))
    }
}
