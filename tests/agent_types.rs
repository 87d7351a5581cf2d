//! Istio's agent types pass through the relay untouched. A gRPC client plays pilot-agent on the
//! sidecar's ADS stream, in both forms: it asks for listeners with the node, then for NDS name
//! tables (`istio.networking.nds.v1.NameTable`), ACKs both, and reports the application
//! unhealthy with a HealthInformation request carrying `error_detail`, as pilot-agent does.
//! Every request reaches istiod's stand-in with exactly the bytes the agent sent, the NDS
//! response reaches the agent with exactly the bytes the upstream sent, the health report is
//! taken for a NACK neither upstream nor by the relay, and `/debug/proxies` shows no NACK.

mod support;

use std::time::Duration;

use alpn_xds::testkit::upstream::{
    AdsForm, HEALTH_INFO_TYPE_URL, LISTENER_TYPE_URL, NAME_TABLE_TYPE_URL, RecordedResponse,
    RequestKind, Snapshot, TestUpstream,
};
use bytes::{Buf, Bytes};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Struct, Value as PbValue, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use envoy_types::util::pack_any;
use prost::Message;
use serde_json::Value;
use support::relay::RelayProcess;
use support::sidecar::{NAMESPACE_POLICY, write_policy};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::{Request, Status};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

const NODE_ID: &str = "sidecar~127.0.0.1~web-1.shop~shop.svc.cluster.local";
const LDS_VERSION: &str = "2025-01-01T00:00:00Z/1";
const NDS_VERSION: &str = "2025-01-01T00:00:00Z/1";
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_types_pass_through_sotw_untouched() {
    let world = World::start().await;
    // Listeners first, with the node, as Envoy's first request through the agent.
    let lds = DiscoveryRequest {
        node: Some(node()),
        type_url: LISTENER_TYPE_URL.to_owned(),
        ..Default::default()
    };
    let (mut agent, first) = Agent::open(&world.relay, SOTW_PATH, &lds).await;
    let mut sent = vec![first];
    let listeners = DiscoveryResponse::decode(agent.next().await).expect("an LDS response");
    sent.push(agent.send(&sotw_ack(&listeners)).await);

    // The agent's own types: a name table request and its ACK, then a health report.
    let nds = DiscoveryRequest {
        type_url: NAME_TABLE_TYPE_URL.to_owned(),
        ..Default::default()
    };
    sent.push(agent.send(&nds).await);
    let names_bytes = agent.next().await;
    let names = DiscoveryResponse::decode(names_bytes.clone()).expect("an NDS response");
    assert_eq!(names.type_url, NAME_TABLE_TYPE_URL);
    sent.push(agent.send(&sotw_ack(&names)).await);
    let health = DiscoveryRequest {
        type_url: HEALTH_INFO_TYPE_URL.to_owned(),
        error_detail: Some(unhealthy()),
        ..Default::default()
    };
    sent.push(agent.send(&health).await);

    world
        .assert_passed_through(AdsForm::Sotw, &sent, &names.nonce, &names_bytes)
        .await;
    world.assert_no_nack_in_debug("state_of_the_world").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_types_pass_through_delta_untouched() {
    let world = World::start().await;
    let lds = DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: LISTENER_TYPE_URL.to_owned(),
        ..Default::default()
    };
    let (mut agent, first) = Agent::open(&world.relay, DELTA_PATH, &lds).await;
    let mut sent = vec![first];
    let listeners = DeltaDiscoveryResponse::decode(agent.next().await).expect("an LDS response");
    sent.push(agent.send(&delta_ack(&listeners)).await);

    let nds = DeltaDiscoveryRequest {
        type_url: NAME_TABLE_TYPE_URL.to_owned(),
        ..Default::default()
    };
    sent.push(agent.send(&nds).await);
    let names_bytes = agent.next().await;
    let names = DeltaDiscoveryResponse::decode(names_bytes.clone()).expect("an NDS response");
    assert_eq!(names.type_url, NAME_TABLE_TYPE_URL);
    sent.push(agent.send(&delta_ack(&names)).await);
    let health = DeltaDiscoveryRequest {
        type_url: HEALTH_INFO_TYPE_URL.to_owned(),
        error_detail: Some(unhealthy()),
        ..Default::default()
    };
    sent.push(agent.send(&health).await);

    world
        .assert_passed_through(AdsForm::Delta, &sent, &names.nonce, &names_bytes)
        .await;
    world.assert_no_nack_in_debug("delta").await;
}

/// istiod's stand-in serving a listener and a name table, and the relay in front of it.
struct World {
    relay: RelayProcess,
    _policies: tempfile::TempDir,
    upstream: TestUpstream,
}

impl World {
    async fn start() -> Self {
        let listener = pack_any(Listener {
            name: "virtualOutbound".to_owned(),
            ..Default::default()
        });
        let snapshot = Snapshot::new()
            .with(LISTENER_TYPE_URL, LDS_VERSION, vec![listener])
            .with(NAME_TABLE_TYPE_URL, NDS_VERSION, vec![name_table()]);
        let upstream = TestUpstream::start(snapshot)
            .await
            .expect("start the test upstream");
        let policies = tempfile::Builder::new()
            .prefix("policies-")
            .tempdir()
            .expect("tempdir");
        write_policy(policies.path(), "shop.yaml", NAMESPACE_POLICY);
        let relay = RelayProcess::start(&upstream.url(), policies.path()).await;
        Self {
            relay,
            _policies: policies,
            upstream,
        }
    }

    /// The upstream recorded exactly `sent`, byte for byte, in order, on one stream of `form`:
    /// LDS and NDS requests and ACKs, and the health report as a health report, not a NACK.
    /// The NDS response the agent got (`names_bytes`, nonce `names_nonce`) is the upstream's.
    async fn assert_passed_through(
        &self,
        form: AdsForm,
        sent: &[Bytes],
        names_nonce: &str,
        names_bytes: &Bytes,
    ) {
        self.upstream
            .wait_for("every request of the agent", WAIT, |r| {
                r.requests.len() >= sent.len()
            })
            .await
            .expect("the agent's requests reach the upstream");
        let recording = self.upstream.recording();
        assert_eq!(recording.streams.len(), 1);
        assert_eq!(recording.streams[0].form, form);
        let raw: Vec<&Bytes> = recording.requests.iter().map(|r| &r.raw).collect();
        let sent: Vec<&Bytes> = sent.iter().collect();
        assert_eq!(raw, sent, "the upstream got the agent's bytes unchanged");

        let kinds: Vec<_> = recording.requests.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RequestKind::Initial,
                RequestKind::Ack,
                RequestKind::Initial,
                RequestKind::Ack,
                RequestKind::HealthReport
            ]
        );
        assert_eq!(recording.nacks().count(), 0, "no NACK upstream");
        assert!(recording.foreign_nonces().is_empty());

        let upstream_names = recording
            .response_with_nonce(names_nonce)
            .expect("the upstream sent the name table");
        assert_eq!(
            names_bytes,
            &encoded(upstream_names),
            "the agent got the upstream's NDS response unchanged"
        );
    }

    /// `/debug/proxies` shows the agent's stream in `form`, its ACKs of LDS and NDS, istiod as
    /// the origin of both pushes, and no NACK of any type.
    async fn assert_no_nack_in_debug(&self, form: &str) {
        let proxies = self.relay.admin_json("/debug/proxies").await;
        let proxy = &proxies["proxies"][0];
        assert_eq!(proxy["node_id"], NODE_ID, "{proxies}");
        assert_eq!(proxy["xds"], form, "{proxy}");
        for type_url in [LISTENER_TYPE_URL, NAME_TABLE_TYPE_URL] {
            let push = &proxy["last_push"][type_url];
            assert_eq!(push["origin"], "istiod", "{type_url}: {proxy}");
            let answer = &proxy["acks"][type_url];
            assert_eq!(answer["nonce"], push["nonce"], "{type_url}: {proxy}");
            assert_eq!(answer["nack"], Value::Null, "{type_url}: {proxy}");
        }
        let acks = proxy["acks"].as_object().cloned().unwrap_or_default();
        for (type_url, answer) in &acks {
            assert_eq!(answer["nack"], Value::Null, "{type_url} taken for a NACK");
        }
        assert_eq!(proxy["rewrite_rejected"], Value::Null, "{proxy}");
    }
}

/// The bytes the upstream sent for `response`: what its encoder wrote.
fn encoded(response: &RecordedResponse) -> Bytes {
    match &response.delta {
        Some(delta) => delta.encode_to_vec().into(),
        None => response.response.encode_to_vec().into(),
    }
}

/// The node pilot-agent sends for pod `web-1` of `shop`.
fn node() -> Node {
    let string = |s: &str| PbValue {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let mut metadata = Struct::default();
    metadata.fields.insert("NAMESPACE".into(), string("shop"));
    metadata.fields.insert("NAME".into(), string("web-1"));
    metadata
        .fields
        .insert("ISTIO_VERSION".into(), string("1.23.0"));
    Node {
        id: NODE_ID.to_owned(),
        cluster: "web.shop".to_owned(),
        metadata: Some(metadata),
        ..Default::default()
    }
}

/// A `NameTable` with one entry, `web.shop.svc.cluster.local` → `10.0.0.1`, written by hand:
/// this build has no Istio types. NameTable.table (1) is a map whose value NameInfo carries
/// `ips` (1).
fn name_table() -> Any {
    let host = b"web.shop.svc.cluster.local";
    let info = [&[0x0a, 8][..], b"10.0.0.1"].concat();
    let entry = [
        &[0x0a, host.len() as u8][..],
        host,
        &[0x12, info.len() as u8][..],
        &info,
    ]
    .concat();
    Any {
        type_url: NAME_TABLE_TYPE_URL.to_owned(),
        value: [&[0x0a, entry.len() as u8][..], &entry].concat(),
    }
}

/// What pilot-agent reports when the application's readiness probe fails.
fn unhealthy() -> RpcStatus {
    RpcStatus {
        code: 500,
        message: "readiness probe failed: connection refused".to_owned(),
        details: vec![],
    }
}

fn sotw_ack(response: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: response.version_info.clone(),
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

fn delta_ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

/// A client that sends and receives exact bytes on one ADS method, as pilot-agent's stream.
struct Agent {
    requests: mpsc::Sender<Bytes>,
    responses: Streaming<Bytes>,
}

impl Agent {
    /// Opens the stream with its first request, `first`; returns the agent and the bytes sent.
    /// The relay reads the first request (it carries the node) before it answers the call, so
    /// the request is queued before the call is awaited.
    async fn open(relay: &RelayProcess, path: &'static str, first: &impl Message) -> (Self, Bytes) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.listen()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the relay");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");

        let (requests, rx) = mpsc::channel(8);
        let first = Bytes::from(first.encode_to_vec());
        requests
            .send(first.clone())
            .await
            .expect("queue the first request");
        let mut call = Request::new(ReceiverStream::new(rx));
        call.metadata_mut().insert(
            "authorization",
            "Bearer agent-token".parse().expect("value"),
        );
        let path = http::uri::PathAndQuery::from_static(path);
        let responses = grpc
            .streaming(call, path, RawCodec)
            .await
            .expect("open the ADS stream")
            .into_inner();
        let agent = Self {
            requests,
            responses,
        };
        (agent, first)
    }

    /// Sends `message`; returns the bytes that went on the wire.
    async fn send(&self, message: &impl Message) -> Bytes {
        let bytes = Bytes::from(message.encode_to_vec());
        self.requests
            .send(bytes.clone())
            .await
            .expect("stream open");
        bytes
    }

    /// The next response's bytes.
    async fn next(&mut self) -> Bytes {
        tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response in time")
            .expect("no stream error")
            .expect("stream not ended")
    }
}

/// Sends and receives message bytes as they are.
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
