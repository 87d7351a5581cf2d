//! Incremental ADS streams, answered by istiod's rules (`pilot/pkg/xds/delta.go`).
//!
//! Per stream and type: the first request (wildcard, or naming resources, with or without
//! `initial_resource_versions`, which istiod ignores for LDS and CDS) gets every resource of the
//! type's snapshot that the stream subscribes to. A request carrying the latest nonce is an ACK
//! and gets nothing unless it changes the subscription; a request without a nonce after the
//! first is a subscription change; a NACK is recorded and gets nothing; any other nonce is stale
//! and ignored. Every response holds the full set in scope, as istiod's LDS and CDS pushes do,
//! with `removed_resources` naming what was sent before and is gone now.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use super::service::RawRequests;
use super::{
    HEALTH_INFO_TYPE_URL, RecordedRequest, RecordedResponse, RequestKind, Shared, TypeSnapshot,
};

/// The wildcard resource name.
const WILDCARD: &str = "*";

/// What one stream holds for one type URL.
#[derive(Debug, Default)]
struct TypeState {
    /// The nonce of the latest response of this type.
    nonce: String,
    /// The snapshot version of that response; `None` before the first.
    version: Option<String>,
    /// Whether the stream subscribes to every resource of the type.
    wildcard: bool,
    /// Names subscribed explicitly.
    names: BTreeSet<String>,
    /// Names sent and not removed since.
    sent: BTreeSet<String>,
}

impl TypeState {
    /// Applies a request's subscription changes; returns whether the subscription changed.
    fn subscribe(&mut self, request: &DeltaDiscoveryRequest) -> bool {
        let before = (self.wildcard, self.names.clone());
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
        }
        before != (self.wildcard, self.names.clone())
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One `DeltaAggregatedResources` call, run by its own task.
pub(super) struct DeltaStream {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    pub(super) metadata: MetadataMap,
    types: BTreeMap<String, TypeState>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaStream {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: u64,
        metadata: MetadataMap,
        out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Self {
        Self {
            shared,
            id,
            metadata,
            types: BTreeMap::new(),
            out,
        }
    }

    pub(super) async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        raw: RawRequests,
    ) {
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
    async fn on_request(&mut self, request: DeltaDiscoveryRequest, raw: Bytes) -> bool {
        let type_url = request.type_url.clone();
        let kind = self.classify(&request);
        if matches!(
            kind,
            RequestKind::Initial | RequestKind::Ack | RequestKind::AckNamesChanged
        ) {
            let state = self.types.entry(type_url.clone()).or_default();
            let first = kind == RequestKind::Initial;
            // The legacy wildcard: a first request that names nothing.
            if first
                && request.resource_names_subscribe.is_empty()
                && request.resource_names_unsubscribe.is_empty()
            {
                state.wildcard = true;
            }
            state.subscribe(&request);
        }
        let answer = match kind {
            RequestKind::Initial | RequestKind::AckNamesChanged => {
                self.shared.snapshot.borrow().types.get(&type_url).cloned()
            }
            _ => None,
        };

        let common = DiscoveryRequest {
            node: request.node.clone(),
            type_url: type_url.clone(),
            response_nonce: request.response_nonce.clone(),
            error_detail: request.error_detail.clone(),
            ..Default::default()
        };
        let recorded = RecordedRequest {
            stream: self.id,
            form: super::AdsForm::Delta,
            metadata: self.metadata.clone(),
            raw,
            request: common,
            delta: Some(request),
            kind,
            answered: answer.is_some(),
        };
        self.shared.record_request(recorded);
        match answer {
            Some(snapshot) => self.send(&type_url, snapshot).await,
            None => true,
        }
    }

    /// istiod's `shouldRespondDelta`, minus its bookkeeping.
    fn classify(&self, request: &DeltaDiscoveryRequest) -> RequestKind {
        if request.type_url == HEALTH_INFO_TYPE_URL {
            return RequestKind::HealthReport;
        }
        if request.error_detail.is_some() {
            return RequestKind::Nack;
        }
        let Some(state) = self.types.get(&request.type_url) else {
            return RequestKind::Initial;
        };
        if !request.response_nonce.is_empty() && request.response_nonce != state.nonce {
            return RequestKind::Stale;
        }
        let mut after = TypeState {
            wildcard: state.wildcard,
            names: state.names.clone(),
            ..Default::default()
        };
        if after.subscribe(request) {
            RequestKind::AckNamesChanged
        } else {
            RequestKind::Ack
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

    /// Sends the full set of `type_url` in the stream's scope, and the removal of what it was
    /// sent before and is no longer there.
    async fn send(&mut self, type_url: &str, snapshot: TypeSnapshot) -> bool {
        let nonce = self.shared.nonce();
        let state = self.types.entry(type_url.to_owned()).or_default();
        let resources: Vec<Resource> = snapshot
            .resources
            .iter()
            .enumerate()
            .map(|(index, any)| (resource_name(any, index), any))
            .filter(|(name, _)| state.wants(name))
            .map(|(name, any)| Resource {
                name,
                version: snapshot.version.clone(),
                resource: Some(any.clone()),
                ..Default::default()
            })
            .collect();
        let names: BTreeSet<String> = resources.iter().map(|r| r.name.clone()).collect();
        let removed: Vec<String> = state.sent.difference(&names).cloned().collect();
        state.sent = names;
        state.nonce = nonce.clone();
        state.version = Some(snapshot.version.clone());

        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.version.clone(),
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        let common = DiscoveryResponse {
            version_info: response.system_version_info.clone(),
            resources: response
                .resources
                .iter()
                .filter_map(|r| r.resource.clone())
                .collect(),
            type_url: response.type_url.clone(),
            nonce: response.nonce.clone(),
            ..Default::default()
        };
        self.shared.record_response(RecordedResponse {
            stream: self.id,
            response: common,
            delta: Some(response.clone()),
        });
        self.out.send(Ok(response)).await.is_ok()
    }
}

/// Envoy's types whose field 1 is the resource's name: `name` of a Listener, Cluster,
/// RouteConfiguration, ScopedRouteConfiguration, VirtualHost, Secret or Runtime, and
/// `cluster_name` of a ClusterLoadAssignment.
const NAMED_BY_FIELD_1: &[&str] = &[
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration",
    "type.googleapis.com/envoy.config.route.v3.VirtualHost",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    "type.googleapis.com/envoy.service.runtime.v3.Runtime",
];

/// The resource's name: for Envoy's named types the name in the message, otherwise (or when
/// it is empty) the resource's position in the snapshot.
fn resource_name(any: &Any, index: usize) -> String {
    #[derive(Clone, PartialEq, Message)]
    struct Named {
        #[prost(string, tag = "1")]
        name: String,
    }
    NAMED_BY_FIELD_1
        .contains(&any.type_url.as_str())
        .then(|| Named::decode(any.value.as_slice()).ok())
        .flatten()
        .map(|named| named.name)
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| index.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use envoy_types::util::pack_any;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Request;

    use super::super::{
        AdsForm, LISTENER_TYPE_URL, NAME_TABLE_TYPE_URL, NONCE_PREFIX, Snapshot, TestUpstream,
    };
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn listener(name: &str) -> Any {
        pack_any(Listener {
            name: name.to_owned(),
            ..Default::default()
        })
    }

    fn lds_snapshot() -> Snapshot {
        Snapshot::new().with(
            LISTENER_TYPE_URL,
            "v1",
            vec![listener("l1"), listener("l2")],
        )
    }

    fn request(type_url: &str, nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
        response.resources.iter().map(|r| r.name.as_str()).collect()
    }

    /// A Delta client stream: a sender of requests and the stream of responses.
    struct Client {
        requests: mpsc::Sender<DeltaDiscoveryRequest>,
        responses: Streaming<DeltaDiscoveryResponse>,
    }

    impl Client {
        async fn open(upstream: &TestUpstream) -> Self {
            let mut client = AggregatedDiscoveryServiceClient::connect(upstream.url())
                .await
                .expect("connect to the test upstream");
            let (requests, rx) = mpsc::channel(8);
            let mut call = Request::new(ReceiverStream::new(rx));
            call.metadata_mut()
                .insert("clusterid", "Kubernetes".parse().expect("header value"));
            let responses = client
                .delta_aggregated_resources(call)
                .await
                .expect("open the Delta ADS stream")
                .into_inner();
            Self {
                requests,
                responses,
            }
        }

        async fn send(&self, request: DeltaDiscoveryRequest) {
            self.requests.send(request).await.expect("stream open");
        }

        async fn next(&mut self) -> DeltaDiscoveryResponse {
            tokio::time::timeout(WAIT, self.responses.message())
                .await
                .expect("a response in time")
                .expect("no stream error")
                .expect("stream not ended")
        }

        async fn silent(&mut self) {
            let next = tokio::time::timeout(Duration::from_millis(200), self.responses.message());
            assert!(next.await.is_err(), "expected no response");
        }
    }

    #[tokio::test]
    async fn wildcard_request_gets_every_resource_and_ack_gets_nothing() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;

        client.send(request(LISTENER_TYPE_URL, "")).await;
        let first = client.next().await;
        assert_eq!(names(&first), ["l1", "l2"]);
        assert!(first.resources.iter().all(|r| r.version == "v1"));
        assert_eq!(first.resources[0].resource, Some(listener("l1")));
        assert_eq!(first.system_version_info, "v1");
        assert!(first.nonce.starts_with(NONCE_PREFIX));
        assert!(first.removed_resources.is_empty());

        client.send(request(LISTENER_TYPE_URL, &first.nonce)).await;
        client.silent().await;

        let recording = upstream.recording();
        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RequestKind::Initial, RequestKind::Ack]);
        assert!(recording.requests.iter().all(|r| r.form == AdsForm::Delta));
        assert_eq!(recording.streams[0].form, AdsForm::Delta);
        assert!(recording.acked(LISTENER_TYPE_URL, "v1"));
        assert!(recording.foreign_nonces().is_empty());
        let sent = &recording.responses[0];
        assert_eq!(sent.delta.as_ref(), Some(&first));
        assert_eq!(sent.response.version_info, "v1");
        assert_eq!(
            recording.requests[1].raw,
            Bytes::from(request(LISTENER_TYPE_URL, &first.nonce).encode_to_vec())
        );
        assert_eq!(
            recording.requests[0]
                .metadata
                .get("clusterid")
                .map(|v| v.as_bytes()),
            Some(&b"Kubernetes"[..])
        );
    }

    #[tokio::test]
    async fn initial_resource_versions_are_ignored_as_istiod_does_for_lds() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;

        let mut reconnect = request(LISTENER_TYPE_URL, "");
        reconnect
            .initial_resource_versions
            .insert("l1".into(), "v1".into());
        client.send(reconnect).await;
        let first = client.next().await;
        assert_eq!(names(&first), ["l1", "l2"]);

        let recording = upstream.recording();
        assert_eq!(recording.requests[0].versions(), ["v1"]);
        assert_eq!(recording.requests[0].kind, RequestKind::Initial);
    }

    #[tokio::test]
    async fn nack_and_stale_nonce_are_recorded_but_not_answered() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        client.send(request(LISTENER_TYPE_URL, "")).await;
        let first = client.next().await;

        let mut nack = request(LISTENER_TYPE_URL, &first.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        client.send(nack).await;
        client
            .send(request(LISTENER_TYPE_URL, "alpn-xds-1-1"))
            .await;
        client.silent().await;

        let recording = upstream.recording();
        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [RequestKind::Initial, RequestKind::Nack, RequestKind::Stale]
        );
        assert_eq!(recording.nacks().count(), 1);
        assert!(!recording.acked(LISTENER_TYPE_URL, "v1"));
        let foreign: Vec<_> = recording
            .foreign_nonces()
            .iter()
            .map(|r| r.request.response_nonce.clone())
            .collect();
        assert_eq!(foreign, ["alpn-xds-1-1"]);
    }

    #[tokio::test]
    async fn push_sends_the_full_set_and_removes_what_is_gone() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        client.send(request(LISTENER_TYPE_URL, "")).await;
        let first = client.next().await;
        client.send(request(LISTENER_TYPE_URL, &first.nonce)).await;

        upstream.push(
            LISTENER_TYPE_URL,
            "v2",
            vec![listener("l2"), listener("l3")],
        );
        let pushed = client.next().await;
        assert_eq!(names(&pushed), ["l2", "l3"]);
        assert!(pushed.resources.iter().all(|r| r.version == "v2"));
        assert_eq!(pushed.removed_resources, ["l1"]);
        assert_eq!(pushed.system_version_info, "v2");
        assert_ne!(pushed.nonce, first.nonce);
    }

    #[tokio::test]
    async fn explicit_subscriptions_scope_the_answer() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        let mut first = request(LISTENER_TYPE_URL, "");
        first.resource_names_subscribe = vec!["l2".into()];
        client.send(first).await;
        let answer = client.next().await;
        assert_eq!(names(&answer), ["l2"]);

        // A subscription change rides on no nonce: answered with the new scope.
        let mut more = request(LISTENER_TYPE_URL, "");
        more.resource_names_subscribe = vec!["l1".into()];
        client.send(more).await;
        let wider = client.next().await;
        assert_eq!(names(&wider), ["l1", "l2"]);

        let mut fewer = request(LISTENER_TYPE_URL, &wider.nonce);
        fewer.resource_names_unsubscribe = vec!["l2".into()];
        client.send(fewer).await;
        let narrower = client.next().await;
        assert_eq!(names(&narrower), ["l1"]);
        assert_eq!(narrower.removed_resources, ["l2"]);

        let kinds: Vec<_> = upstream
            .recording()
            .requests
            .iter()
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                RequestKind::Initial,
                RequestKind::AckNamesChanged,
                RequestKind::AckNamesChanged
            ]
        );
    }

    #[tokio::test]
    async fn istio_agent_types_are_recorded_byte_for_byte_and_not_answered() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        let names_request = request(NAME_TABLE_TYPE_URL, "");
        let mut health = request(HEALTH_INFO_TYPE_URL, "");
        health.error_detail = Some(RpcStatus {
            code: 13,
            message: "readiness probe failed".into(),
            details: vec![],
        });
        client.send(names_request.clone()).await;
        client.send(health.clone()).await;
        client.silent().await;

        let recording = upstream.recording();
        let raw: Vec<_> = recording.requests.iter().map(|r| r.raw.clone()).collect();
        assert_eq!(
            raw,
            [
                Bytes::from(names_request.encode_to_vec()),
                Bytes::from(health.encode_to_vec())
            ]
        );
        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RequestKind::Initial, RequestKind::HealthReport]);
        assert_eq!(recording.nacks().count(), 0);
        assert!(recording.requests.iter().all(|r| !r.answered));
        assert!(recording.responses.is_empty());
    }

    #[tokio::test]
    async fn close_streams_ends_delta_streams_too() {
        let upstream = TestUpstream::start(lds_snapshot()).await.expect("start");
        let mut client = Client::open(&upstream).await;
        client.send(request(LISTENER_TYPE_URL, "")).await;
        client.next().await;

        upstream.close_streams();
        let ended = tokio::time::timeout(WAIT, client.responses.message())
            .await
            .expect("in time");
        assert_eq!(
            ended.expect_err("an error status").code(),
            tonic::Code::Unavailable
        );
        upstream
            .wait_for("the stream to close", WAIT, |r| {
                r.streams.iter().all(|s| !s.open)
            })
            .await
            .expect("closed");
    }

    #[test]
    fn resources_are_named_by_their_message() {
        assert_eq!(
            resource_name(&listener("virtualInbound"), 3),
            "virtualInbound"
        );
        // An NDS name table holds a map in field 1, not a name.
        let table = Any {
            type_url: NAME_TABLE_TYPE_URL.to_owned(),
            value: vec![0x0a, 0x03, 0x0a, 0x01, b'a'],
        };
        assert_eq!(resource_name(&table, 3), "3");
    }
}
