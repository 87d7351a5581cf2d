//! `explain` on Istio-shaped listeners from the test kit: which chains change, the warnings and
//! the HTTP/1.0 note they call for, the reasons given when nothing changes, and the text output.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use prost::{Message, Name};

use super::input::WorkloadInfo;
use super::model::{Explanation, Http10State, PoliciesRead, WarningKind};
use super::{report, text};
use crate::dump::{DumpError, DumpedListener};
use crate::policy::{MtlsMode, PolicySet, Workload, parse_yaml};
use crate::rewrite::ChainKind;
use crate::testkit::istio::{InboundPort, Layout, Mode, PortProtocol, virtual_inbound};

const NAMESPACE_ON: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
  annotations:
    http-alpns.aspenmesh.io: "true"
spec:
  mtls:
    mode: PERMISSIVE
"#;

/// A declared HTTP port 8080 and an undeclared (sniffed) port 9090, all PERMISSIVE.
fn inbound() -> Listener {
    let port = |port, protocol| InboundPort {
        port,
        protocol,
        mode: Mode::Permissive,
    };
    virtual_inbound(
        Layout::Current,
        Mode::Permissive,
        &[
            port(8080, PortProtocol::Http),
            port(9090, PortProtocol::Auto),
        ],
    )
}

fn dumped(listener: &Listener) -> Result<DumpedListener, DumpError> {
    Ok(DumpedListener {
        name: listener.name.clone(),
        version_info: None,
        bytes: listener.encode_to_vec().into(),
        notes: vec!["stats.PluginConfig kept without its payload (type not converted)".into()],
    })
}

fn web() -> WorkloadInfo {
    WorkloadInfo {
        workload: Workload {
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        },
        from: "flags".into(),
        node_id: None,
        istio_version: None,
        http10_metadata: false,
    }
}

fn explain(policies: &str, workload: WorkloadInfo, listeners: &[Listener]) -> Explanation {
    let outcome = parse_yaml(policies, "test.yaml");
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    let set = PolicySet::new(outcome.policies, "istio-system");
    let read = PoliciesRead {
        path: "policies".into(),
        root_namespace: "istio-system".into(),
        loaded: set.len(),
        errors: vec![],
    };
    let listeners = listeners.iter().map(dumped).collect();
    report::build(workload, &set, read, "dump.json".into(), listeners)
}

/// Applies `edit` to the HTTP connection manager of every chain that has one.
fn edit_hcms(listener: &mut Listener, edit: impl Fn(&mut Vec<u8>)) {
    for chain in &mut listener.filter_chains {
        for f in &mut chain.filters {
            if let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type
                && any.type_url == HttpConnectionManager::type_url()
            {
                edit(&mut any.value);
            }
        }
    }
}

#[test]
fn every_permissive_mtls_http_chain_changes_and_undeclared_ports_are_warned() {
    let e = explain(NAMESPACE_ON, web(), &[inbound()]);
    let listener = &e.listeners[0];
    let mut changed: Vec<(Option<u32>, ChainKind)> = listener
        .chains
        .iter()
        .filter(|c| c.changed)
        .map(|c| (c.change.destination_port, c.change.kind))
        .collect();
    changed.sort_by_key(|(port, _)| *port);
    assert_eq!(
        changed,
        [
            (None, ChainKind::Passthrough),
            (Some(8080), ChainKind::DeclaredHttp),
            (Some(9090), ChainKind::Sniffed),
        ]
    );
    assert!(e.decision.rewrites);
    assert_eq!(e.decision.chains_changed, 3);
    assert_eq!(e.dump.inbound, 1);

    // The declared port is what the annotation is for; the others are the price, each named.
    let warned: Vec<Option<usize>> = e
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::ApplicationTls)
        .map(|w| w.chain)
        .collect();
    let undeclared: Vec<Option<usize>> = listener
        .chains
        .iter()
        .filter(|c| c.change.kind != ChainKind::DeclaredHttp)
        .map(|c| Some(c.change.index))
        .collect();
    assert_eq!(warned, undeclared);
    assert!(
        e.warnings
            .iter()
            .all(|w| w.kind == WarningKind::ApplicationTls)
    );

    // istiod's HTTP connection managers here do not accept HTTP/1.0.
    assert_eq!(e.http10.as_ref().map(|n| n.state), Some(Http10State::Off));
    for port in &e.ports {
        assert!(port.add && port.mode == MtlsMode::Permissive, "{port:?}");
    }
}

#[test]
fn the_http10_note_follows_the_dump_then_the_node_metadata() {
    let mut accepting = inbound();
    edit_hcms(&mut accepting, |value| {
        let mut hcm = HttpConnectionManager::decode(value.as_slice()).unwrap();
        hcm.http_protocol_options = Some(Http1ProtocolOptions {
            accept_http_10: true,
            ..Default::default()
        });
        *value = hcm.encode_to_vec();
    });
    let e = explain(NAMESPACE_ON, web(), &[accepting]);
    let note = e.http10.expect("http/1.0 is added");
    assert_eq!(note.state, Http10State::On);

    // A dump that does not carry the manager's settings shows nothing: it depends.
    let mut opaque = inbound();
    edit_hcms(&mut opaque, Vec::clear);
    let e = explain(NAMESPACE_ON, web(), std::slice::from_ref(&opaque));
    let note = e.http10.expect("http/1.0 is added");
    assert_eq!(note.state, Http10State::Unknown);
    assert!(note.message.contains("depends on"), "{}", note.message);

    let mut from_metadata = web();
    from_metadata.http10_metadata = true;
    let e = explain(NAMESPACE_ON, from_metadata, &[opaque]);
    let note = e.http10.expect("http/1.0 is added");
    assert_eq!(note.state, Http10State::On);
    assert!(note.message.contains("HTTP10=1"), "{}", note.message);
}

#[test]
fn without_the_annotation_nothing_changes_and_the_reason_says_so() {
    let policies = NAMESPACE_ON.replace("http-alpns.aspenmesh.io: \"true\"", "other: x");
    let e = explain(&policies, web(), &[inbound()]);
    assert!(!e.decision.rewrites);
    assert!(
        e.decision
            .summary
            .contains("no workload or namespace policy sets http-alpns.aspenmesh.io"),
        "{}",
        e.decision.summary
    );
    assert!(e.listeners[0].chains.iter().all(|c| !c.changed));
    assert!(e.http10.is_none());
    assert!(e.warnings.is_empty());
}

#[test]
fn a_strict_port_keeps_its_chains_and_says_which_policy_made_it_strict() {
    let policies = format!(
        "{NAMESPACE_ON}---\n{}",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  portLevelMtls:
    8080:
      mode: STRICT
"#
    );
    let e = explain(&policies, web(), &[inbound()]);
    let declared = e.listeners[0]
        .chains
        .iter()
        .find(|c| c.change.destination_port == Some(8080))
        .expect("the declared port's chain");
    assert!(!declared.changed);
    assert_eq!(declared.mode, MtlsMode::Strict);
    assert!(
        declared.reason.contains("portLevelMtls"),
        "{}",
        declared.reason
    );
    let port = e.ports.iter().find(|p| p.port == Some(8080)).unwrap();
    assert!(port.port_level && !port.add);
    assert_eq!(
        e.decision.chains_changed, 2,
        "the sniffed port and passthrough"
    );
}

#[test]
fn a_dump_without_inbound_listeners_is_reported() {
    let mut outbound = inbound();
    outbound.name = "0.0.0.0_80".into();
    outbound.traffic_direction = TrafficDirection::Outbound as i32;
    let e = explain(NAMESPACE_ON, web(), &[outbound]);
    assert_eq!((e.dump.inbound, e.dump.not_inbound), (0, 1));
    assert!(e.listeners[0].notes.is_empty() && e.listeners[0].chains.is_empty());
    assert!(
        e.warnings
            .iter()
            .any(|w| w.kind == WarningKind::NoInboundListener)
    );
    assert!(e.decision.summary.starts_with("nothing changes"));
}

#[test]
fn text_leads_with_the_decision_and_names_each_chain() {
    let e = explain(NAMESPACE_ON, web(), &[inbound()]);
    let out = text::render(&e);
    let first = out.lines().next().unwrap();
    assert_eq!(first, format!("Decision: {}", e.decision.summary));
    for chain in e.listeners[0].chains.iter().filter(|c| c.changed) {
        let line = format!(
            "    chain {} {:?} ({}",
            chain.change.index, chain.change.name, chain.change.kind
        );
        assert!(out.contains(&line), "{line} missing from\n{out}");
    }
    assert!(out.contains("kept opaque, not needed to classify chains: stats.PluginConfig"));
    assert!(out.contains("HTTP/1.0: not served"), "{out}");
    assert_eq!(
        out.matches("\n  ! ").count(),
        e.warnings.len(),
        "every warning printed"
    );

    let json: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
    assert_eq!(json["format_version"], 1);
    assert_eq!(json["decision"]["summary"], e.decision.summary.as_str());
    let chains = json["listeners"][0]["chains"].as_array().unwrap();
    assert_eq!(chains.len(), e.listeners[0].chains.len());
    for (json, chain) in chains.iter().zip(&e.listeners[0].chains) {
        assert_eq!(json["index"], chain.change.index);
        assert_eq!(json["kind"], format!("{:?}", chain.change.kind));
        assert_eq!(json["changed"], chain.changed);
    }
}
