//! What the test upstream saw and sent.

use std::collections::BTreeSet;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tonic::metadata::MetadataMap;

/// Which ADS method a stream was opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdsForm {
    /// State of the world, `StreamAggregatedResources`.
    Sotw,
    /// Incremental, `DeltaAggregatedResources`.
    Delta,
}

/// How the upstream classified a request, following istiod's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Empty nonce, or a type this stream was never sent: answered with the type's snapshot,
    /// when there is one.
    Initial,
    /// The nonce of the latest response for this type, same resource names: not answered.
    Ack,
    /// The latest nonce with changed resource names, or in Delta a subscription change without
    /// a nonce: answered with the current snapshot.
    AckNamesChanged,
    /// `error_detail` set: recorded, not answered.
    Nack,
    /// A nonce other than the latest one sent on this stream for this type: ignored.
    Stale,
    /// Istio's health report (`istio.v1.HealthInformation`), which pilot-agent sends with
    /// `error_detail` when the application is unhealthy: as in istiod, never a NACK and never
    /// answered.
    HealthReport,
}

/// One stream that a client opened.
#[derive(Clone, Debug)]
pub struct RecordedStream {
    /// Stream number, from 1 in opening order.
    pub id: u64,
    /// The ADS method of the stream.
    pub form: AdsForm,
    /// The gRPC metadata (HTTP/2 headers) the client opened the stream with.
    pub metadata: MetadataMap,
    /// The node of the first request that carried one.
    pub node: Option<Node>,
    /// Whether the stream is still open.
    pub open: bool,
    /// The status the client's side ended with, when it ended with an error.
    pub error: Option<String>,
    /// When the stream was opened.
    pub opened_at: std::time::Instant,
}

/// One request received on a stream.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The stream it came on ([`RecordedStream::id`]).
    pub stream: u64,
    /// The ADS method of that stream.
    pub form: AdsForm,
    /// The gRPC metadata of that stream.
    pub metadata: MetadataMap,
    /// The message bytes exactly as they arrived, unknown fields included.
    pub raw: Bytes,
    /// The decoded request. For a Delta request, only the fields both forms share: type URL,
    /// `response_nonce`, `error_detail` and node; the request itself is in [`Self::delta`].
    pub request: DiscoveryRequest,
    /// The decoded Delta request, on Delta streams.
    pub delta: Option<DeltaDiscoveryRequest>,
    /// How it was classified.
    pub kind: RequestKind,
    /// Whether a response was sent for it.
    pub answered: bool,
}

impl RecordedRequest {
    /// The versions the request reports holding: SotW `version_info` (when not empty), or the
    /// values of Delta `initial_resource_versions`.
    pub fn versions(&self) -> Vec<&str> {
        match &self.delta {
            Some(delta) => delta
                .initial_resource_versions
                .values()
                .map(String::as_str)
                .collect(),
            None if self.request.version_info.is_empty() => Vec::new(),
            None => vec![self.request.version_info.as_str()],
        }
    }
}

/// One response sent on a stream.
#[derive(Clone, Debug)]
pub struct RecordedResponse {
    /// The stream it went to ([`RecordedStream::id`]).
    pub stream: u64,
    /// The response as sent. For a Delta response, the fields both forms share: type URL,
    /// nonce, `system_version_info` as `version_info`, and each resource's payload; the
    /// response itself is in [`Self::delta`].
    pub response: DiscoveryResponse,
    /// The Delta response as sent, on Delta streams.
    pub delta: Option<DeltaDiscoveryResponse>,
}

/// Everything the upstream saw and sent, in order.
#[derive(Clone, Debug, Default)]
pub struct Recording {
    /// Streams, in opening order.
    pub streams: Vec<RecordedStream>,
    /// Requests, in arrival order across all streams.
    pub requests: Vec<RecordedRequest>,
    /// Responses, in sending order across all streams.
    pub responses: Vec<RecordedResponse>,
}

impl Recording {
    /// Requests of one type URL.
    pub fn requests_of<'a>(
        &'a self,
        type_url: &'a str,
    ) -> impl Iterator<Item = &'a RecordedRequest> + 'a {
        self.requests
            .iter()
            .filter(move |r| r.request.type_url == type_url)
    }

    /// Whether some stream acknowledged `version` of `type_url`. A Delta ACK carries no
    /// version: it counts when it answers a response of that version.
    pub fn acked(&self, type_url: &str, version: &str) -> bool {
        self.requests_of(type_url).any(|r| {
            r.kind == RequestKind::Ack
                && match r.form {
                    AdsForm::Sotw => r.request.version_info == version,
                    AdsForm::Delta => self
                        .response_with_nonce(&r.request.response_nonce)
                        .is_some_and(|sent| sent.response.version_info == version),
                }
        })
    }

    /// Requests that carry `error_detail`.
    pub fn nacks(&self) -> impl Iterator<Item = &RecordedRequest> {
        self.requests.iter().filter(|r| r.kind == RequestKind::Nack)
    }

    /// Requests whose `response_nonce` this upstream never sent on any stream: a relay that
    /// leaks its own nonces upstream shows up here.
    pub fn foreign_nonces(&self) -> Vec<&RecordedRequest> {
        let sent: BTreeSet<&str> = self
            .responses
            .iter()
            .map(|r| r.response.nonce.as_str())
            .collect();
        self.requests
            .iter()
            .filter(|r| {
                let nonce = r.request.response_nonce.as_str();
                !nonce.is_empty() && !sent.contains(nonce)
            })
            .collect()
    }

    /// Responses sent on one stream.
    pub fn responses_on(&self, stream: u64) -> impl Iterator<Item = &RecordedResponse> {
        self.responses.iter().filter(move |r| r.stream == stream)
    }

    /// The response that carried `nonce`, on any stream.
    pub fn response_with_nonce(&self, nonce: &str) -> Option<&RecordedResponse> {
        self.responses.iter().find(|r| r.response.nonce == nonce)
    }

    /// Responses of one type URL, in sending order.
    pub fn responses_of<'a>(
        &'a self,
        type_url: &'a str,
    ) -> impl Iterator<Item = &'a RecordedResponse> + 'a {
        self.responses
            .iter()
            .filter(move |r| r.response.type_url == type_url)
    }
}
