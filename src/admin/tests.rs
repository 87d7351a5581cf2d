use std::sync::Arc;

use axum::extract::{RawQuery, State};
use bytes::Bytes;
use prost::Message;
use serde_json::Value;
use tokio::sync::watch;

use super::proxies;
use crate::metrics::Metrics;
use crate::relay::listeners::{Envelope, LISTENER_TYPE};
use crate::relay::node::ProxyIdentity;
use crate::relay::registry::XdsForm;
use crate::relay::upstream::Upstream;
use crate::relay::{Limits, Relay};
use crate::rewrite::RewritePlan;
use crate::source::PolicySnapshot;
use crate::testkit::istio::{Layout, Mode, benchmark_ports, virtual_inbound};
use crate::wire;

fn relay() -> Arc<Relay> {
    let upstream = Upstream::new("http://127.0.0.1:1", None).unwrap();
    let (_, policies) = watch::channel(Arc::new(PolicySnapshot::empty("istio-system", "test")));
    Arc::new(Relay::new(
        upstream,
        policies,
        Limits::default(),
        Arc::new(Metrics::new()),
    ))
}

fn identity(node_id: &str) -> ProxyIdentity {
    ProxyIdentity {
        node_id: node_id.to_string(),
        workload: None,
        workload_from: "node id",
        istio_version: None,
    }
}

async fn get(relay: &Arc<Relay>, query: Option<&str>) -> Value {
    let response = proxies(State(relay.clone()), RawQuery(query.map(str::to_string))).await;
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// Two proxies, the first with a rewritten 3-port listener: the brief form counts its chains
/// without listing them, and `?node=` lists them for that node only.
#[tokio::test]
async fn proxies_are_brief_unless_one_node_is_asked_for() {
    let relay = relay();
    let rewritten = relay
        .registry
        .register(identity("sidecar~a~p.ns~ns"), XdsForm::Delta);
    let _plain = relay
        .registry
        .register(identity("sidecar~b~q.ns~ns"), XdsForm::StateOfTheWorld);
    let listener = virtual_inbound(Layout::Current, Mode::Permissive, &benchmark_ports(3));
    let any = Bytes::from(
        wire::Any {
            type_url: LISTENER_TYPE.to_string(),
            value: Bytes::from(listener.encode_to_vec()),
        }
        .encode_to_vec(),
    );
    let plan = RewritePlan {
        default: true,
        ports: Default::default(),
    };
    let cached = relay.cache.rewrite(Envelope::Any, &plan, &any);
    let changed = cached.report.as_ref().map_or(0, |r| {
        r.chains.iter().filter(|c| !c.added.is_empty()).count()
    });
    assert!(changed > 0, "the listener has chains to rewrite");
    rewritten.entry().status().listeners = vec![cached];

    let brief = get(&relay, None).await;
    assert_eq!(brief["connected"], 2, "{brief}");
    let listed = brief["proxies"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{brief}");
    let first = listed
        .iter()
        .find(|p| p["node_id"] == "sidecar~a~p.ns~ns")
        .unwrap();
    assert_eq!(first["listener_count"], 1, "{first}");
    assert_eq!(first["rewritten_chain_count"], changed, "{first}");
    assert!(first.get("listeners").is_none() && first.get("rewritten_chains").is_none());

    // `~` and `.` survive encoding; `%7E` is how some clients write `~`.
    let detail = get(&relay, Some("node=sidecar%7Ea%7Ep.ns%7Ens")).await;
    assert_eq!(detail["connected"], 2, "{detail}");
    let listed = detail["proxies"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{detail}");
    let chains = listed[0]["rewritten_chains"].as_array().unwrap();
    assert_eq!(chains.len(), changed, "{detail}");
    assert_eq!(chains[0]["added"][2], "h2", "{detail}");
    assert_eq!(
        listed[0]["listeners"][0]["name"], "virtualInbound",
        "{detail}"
    );

    let nobody = get(&relay, Some("node=sidecar~nobody")).await;
    assert_eq!(
        nobody["proxies"].as_array().map(Vec::len),
        Some(0),
        "{nobody}"
    );
}
