//! Replays a real Istio inbound listener through alpn-xds and prints its filter chains as istiod
//! sent them and as the sidecar receives them.
//!
//! ```sh
//! cargo run --example replay                      # the embedded Istio 1.19 virtualInbound dump
//! cargo run --example replay -- DUMP.json [POLICY.yaml]
//! ```
//!
//! Everything runs in this process on loopback: a test upstream plays istiod and serves the
//! dump's listeners, the relay runs as `alpn-xds serve` would, and a client plays the sidecar
//! of `httpbin-1` in namespace `default` (labels `app=httpbin`). The embedded policy is a
//! namespace-level PeerAuthentication annotated `http-alpns.aspenmesh.io: "true"`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::Message;

use alpn_xds::app;
use alpn_xds::config::{Cli, Command};
use alpn_xds::dump::listeners_from_json;
use alpn_xds::relay::listeners::LISTENER_TYPE;
use alpn_xds::testkit::upstream::{Snapshot, TestUpstream};
use clap::Parser;

const EMBEDDED_DUMP: &str =
    include_str!("../testdata/istio/istio-1.19-permissive-istio-authz-testdata.json");

const EMBEDDED_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
  annotations:
    http-alpns.aspenmesh.io: "true"
spec:
  mtls:
    mode: PERMISSIVE
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dump, dump_name) = match args.first() {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
            path.clone(),
        ),
        None => (
            EMBEDDED_DUMP.to_string(),
            "embedded Istio 1.19 virtualInbound".to_string(),
        ),
    };
    let policy = match args.get(1) {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => EMBEDDED_POLICY.to_string(),
    };

    // istiod's side: the dump's listeners, served by a test upstream.
    let listeners = listeners_from_json(&dump).context("reading the listener dump")?;
    let resources: Vec<Any> = listeners
        .iter()
        .map(|l| Any {
            type_url: LISTENER_TYPE.to_string(),
            value: l.bytes.to_vec(),
        })
        .collect();
    let upstream =
        TestUpstream::start(Snapshot::new().with(LISTENER_TYPE, "replay-1", resources.clone()))
            .await?;

    // The relay, as `alpn-xds serve` runs it, with the policy in a folder of its own.
    let policy_dir = tempfile::tempdir()?;
    std::fs::write(policy_dir.path().join("policy.yaml"), policy)?;
    let cli = Cli::try_parse_from([
        "alpn-xds".as_ref(),
        "serve".as_ref(),
        "--listen=127.0.0.1:0".as_ref(),
        "--admin=127.0.0.1:0".as_ref(),
        "--plaintext".as_ref(),
        format!("--upstream={}", upstream.url()).as_ref(),
        "--policy-dir".as_ref(),
        policy_dir.path().as_os_str(),
    ])?;
    let Command::Serve(args) = cli.command else {
        anyhow::bail!("the arguments above are those of serve");
    };
    let relay = app::start(&args).await?;

    // The sidecar's side: one LDS request, as Envoy sends it.
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", relay.xds_addr)).await?;
    let request = DiscoveryRequest {
        node: Some(sidecar_node()),
        type_url: LISTENER_TYPE.to_string(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request).await?;
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .context("no LDS response within 10 s")??
        .context("the relay closed the stream")?;

    println!("dump: {dump_name}");
    if let Some(entry) = relay.relay.registry.snapshot().first() {
        let status = entry.status();
        if let Some(policy) = &status.policy {
            println!("decision: {}", policy.alpn.reason);
            for (port, verdict) in [None]
                .into_iter()
                .chain(policy.port_modes.keys().map(|p| Some(*p)))
                .map(|p| (p, policy.port_verdict(p)))
            {
                let port =
                    port.map_or("chains without a port".to_string(), |p| format!("port {p}"));
                println!("  {port}: {}", verdict.reason);
            }
        }
    }

    if response.resources.len() != resources.len() {
        bail!(
            "istiod sent {} listeners, the sidecar got {}",
            resources.len(),
            response.resources.len()
        );
    }
    for (before, after) in resources.iter().zip(&response.resources) {
        print_listener(
            &Listener::decode(&*before.value)?,
            &Listener::decode(&*after.value)?,
        );
    }

    relay.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

fn print_listener(before: &Listener, after: &Listener) {
    println!(
        "\nlistener {} ({} filter chains)",
        before.name,
        before.filter_chains.len()
    );
    println!(
        "  {:<3} {:<30} {:>6}  {:<10}  application_protocols",
        "#", "chain", "port", "transport"
    );
    for (index, (b, a)) in before
        .filter_chains
        .iter()
        .zip(&after.filter_chains)
        .enumerate()
    {
        let m = b.filter_chain_match.clone().unwrap_or_default();
        let port = m
            .destination_port
            .map_or("-".to_string(), |p| p.value.to_string());
        let transport = if m.transport_protocol.is_empty() {
            "-"
        } else {
            &m.transport_protocol
        };
        let after_alpns = a
            .filter_chain_match
            .clone()
            .unwrap_or_default()
            .application_protocols;
        let added: Vec<&String> = after_alpns
            .iter()
            .filter(|v| !m.application_protocols.contains(v))
            .collect();
        let alpns = if m.application_protocols.is_empty() {
            "-".to_string()
        } else {
            m.application_protocols.join(",")
        };
        let change = if added.is_empty() {
            String::new()
        } else {
            format!(
                "  + {}",
                added
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        println!(
            "  {index:<3} {:<30} {port:>6}  {transport:<10}  {alpns}{change}",
            b.name
        );
    }
}

fn sidecar_node() -> Node {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let labels = Struct {
        fields: BTreeMap::from([("app".to_string(), string("httpbin"))])
            .into_iter()
            .collect(),
    };
    let metadata = Struct {
        fields: [
            ("NAMESPACE".to_string(), string("default")),
            ("NAME".to_string(), string("httpbin-1")),
            (
                "LABELS".to_string(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            ),
            ("ISTIO_VERSION".to_string(), string("1.19.0")),
        ]
        .into_iter()
        .collect(),
    };
    Node {
        id: "sidecar~192.0.2.10~httpbin-1.default~default.svc.cluster.local".to_string(),
        metadata: Some(metadata),
        ..Default::default()
    }
}
