//! The dumps in `fixtures/istio/` converted and checked against their own JSON, both spellings
//! of every key, the accepted document shapes, and errors that point at the value at fault.

use std::path::PathBuf;

use envoy_types::pb::envoy::config::core::v3::{TrafficDirection, transport_socket};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use prost::{Message, Name};
use serde_json::{Map, Value, json};

use super::json::{camel_to_snake, snake_to_camel};
use super::*;

/// The folder of real listener dumps; CI lays `shared/` beside the repository.
pub(crate) fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/istio")
}

/// The text of fixture `name`.
pub(crate) fn fixture(name: &str) -> String {
    let path = fixtures_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures folder")
        .map(|entry| {
            entry
                .expect("fixture entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 5,
        "expected the five Istio fixtures, found {names:?}"
    );
    names
}

/// Field `name` of a JSON object in either spelling.
fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    value.get(name).or_else(|| value.get(snake_to_camel(name)))
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|s| s.as_str().expect("string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn decode(dumped: &DumpedListener) -> Listener {
    Listener::decode(dumped.bytes.as_ref()).expect("bytes decode as a v3 Listener")
}

fn tls_context(chain: &FilterChain) -> Option<DownstreamTlsContext> {
    let socket = chain.transport_socket.as_ref()?;
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        panic!("transport socket {} without typed_config", socket.name);
    };
    assert_eq!(any.type_url, DownstreamTlsContext::type_url());
    Some(DownstreamTlsContext::decode(any.value.as_slice()).expect("DownstreamTlsContext"))
}

fn has_hcm(chain: &FilterChain) -> bool {
    chain.filters.iter().any(|f| match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => {
            any.type_url == HttpConnectionManager::type_url()
        }
        _ => false,
    })
}

/// Checks a converted listener against the JSON it came from: chain count, names, matches,
/// ALPN lists, TLS and HCM presence and the TLS settings that matter.
fn check_against_json(json: &Value, dumped: &DumpedListener) {
    let listener = decode(dumped);
    assert_eq!(
        listener.name,
        field(json, "name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    );
    let json_chains = field(json, "filter_chains")
        .and_then(Value::as_array)
        .expect("chains");
    assert_eq!(
        listener.filter_chains.len(),
        json_chains.len(),
        "{}",
        listener.name
    );

    for (i, (chain, json_chain)) in listener.filter_chains.iter().zip(json_chains).enumerate() {
        let at = format!("{} chain {i}", listener.name);
        assert_eq!(
            chain.name,
            field(json_chain, "name")
                .and_then(Value::as_str)
                .unwrap_or("")
        );

        let json_match = field(json_chain, "filter_chain_match")
            .cloned()
            .unwrap_or(json!({}));
        let matched = chain.filter_chain_match.clone().unwrap_or_default();
        assert_eq!(
            matched.destination_port.map(|p| u64::from(p.value)),
            field(&json_match, "destination_port").and_then(Value::as_u64),
            "{at}"
        );
        assert_eq!(matched.transport_protocol, {
            field(&json_match, "transport_protocol")
                .and_then(Value::as_str)
                .unwrap_or("")
        });
        assert_eq!(
            matched.application_protocols,
            strings(field(&json_match, "application_protocols")),
            "{at}"
        );
        let json_prefixes = field(&json_match, "prefix_ranges").and_then(Value::as_array);
        let prefixes: Vec<(String, u64)> = json_prefixes
            .map(|ranges| {
                ranges
                    .iter()
                    .map(|r| {
                        let prefix = field(r, "address_prefix").and_then(Value::as_str);
                        let len = field(r, "prefix_len").and_then(Value::as_u64);
                        (prefix.unwrap_or("").to_owned(), len.unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let converted: Vec<(String, u64)> = matched
            .prefix_ranges
            .iter()
            .map(|r| {
                (
                    r.address_prefix.clone(),
                    r.prefix_len.map_or(0, |l| u64::from(l.value)),
                )
            })
            .collect();
        assert_eq!(converted, prefixes, "{at}");

        // TLS: v3 transport socket or v2 tls_context, with its ALPN and client-cert settings.
        let json_tls = field(json_chain, "transport_socket")
            .and_then(|s| field(s, "typed_config"))
            .or_else(|| field(json_chain, "tls_context"));
        let tls = tls_context(chain);
        assert_eq!(tls.is_some(), json_tls.is_some(), "{at}");
        if let (Some(tls), Some(json_tls)) = (tls, json_tls) {
            let common = tls.common_tls_context.clone().unwrap_or_default();
            let json_common = field(json_tls, "common_tls_context").expect("common_tls_context");
            assert_eq!(
                common.alpn_protocols,
                strings(field(json_common, "alpn_protocols"))
            );
            assert_eq!(
                tls.require_client_certificate.map(|b| b.value),
                field(json_tls, "require_client_certificate").and_then(Value::as_bool),
                "{at}"
            );
            let json_sds = field(json_common, "tls_certificate_sds_secret_configs")
                .and_then(Value::as_array)
                .map(|secrets| {
                    secrets
                        .iter()
                        .map(|s| s["name"].clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let sds: Vec<Value> = common
                .tls_certificate_sds_secret_configs
                .iter()
                .map(|s| json!(s.name))
                .collect();
            assert_eq!(sds, json_sds, "{at}");
            let json_ciphers = field(json_common, "tls_params")
                .map(|p| strings(field(p, "cipher_suites")))
                .unwrap_or_default();
            let ciphers = common
                .tls_params
                .map(|p| p.cipher_suites)
                .unwrap_or_default();
            assert_eq!(ciphers, json_ciphers, "{at}");
        }

        // Filter names: v2 names come out as their v3 names, in the same order.
        let json_filters = field(json_chain, "filters")
            .and_then(Value::as_array)
            .expect("filters");
        assert_eq!(chain.filters.len(), json_filters.len(), "{at}");
        let json_hcm = json_filters.iter().any(|f| {
            let name = f["name"].as_str().unwrap_or("");
            name == "envoy.http_connection_manager"
                || name == "envoy.filters.network.http_connection_manager"
        });
        assert_eq!(has_hcm(chain), json_hcm, "{at}");
    }

    let json_filters = field(json, "listener_filters")
        .and_then(Value::as_array)
        .expect("filters");
    assert_eq!(listener.listener_filters.len(), json_filters.len());
    for (filter, json_filter) in listener.listener_filters.iter().zip(json_filters) {
        let json_name = json_filter["name"].as_str().expect("name");
        let expected = json_name.replace("envoy.listener.", "envoy.filters.listener.");
        assert_eq!(filter.name, expected);
        assert_eq!(
            filter.filter_disabled.is_some(),
            field(json_filter, "filter_disabled").is_some()
        );
    }
    assert_eq!(
        listener.continue_on_listener_filters_timeout,
        field(json, "continue_on_listener_filters_timeout")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    );
}

/// The fragment fixture holds only `filter_chain_match` objects; wrapping each in a chain of a
/// listener is the setup its README asks for.
fn fragment_as_listener(fragment: &Value) -> Value {
    let mut chains = Vec::new();
    for key in [
        "generated_passthrough_filter_chain_matches",
        "desired_passthrough_filter_chain_matches_first_four_as_quoted",
    ] {
        for matched in fragment[key].as_array().expect("matches") {
            chains.push(json!({
                "filterChainMatch": matched,
                "filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "statPrefix": "InboundPassthroughClusterIpv4",
                    "cluster": "InboundPassthroughClusterIpv4"}}]
            }));
        }
    }
    json!({"name": "virtualInbound", "trafficDirection": "INBOUND", "filterChains": chains,
           "listenerFilters": []})
}

#[test]
fn every_fixture_converts_and_matches_its_json() {
    for name in fixture_names() {
        let text = fixture(&name);
        let json: Value = serde_json::from_str(&text).expect("fixture JSON");
        let json = if json.get("_note").is_some() {
            // Not a listener by itself: the document is refused, then read wrapped.
            let err = listeners_from_json(&text).unwrap_err();
            assert!(
                matches!(err, DumpError::UnknownDocument { .. }),
                "{name}: {err}"
            );
            fragment_as_listener(&json)
        } else {
            json
        };
        let dumped =
            listeners_from_json(&json.to_string()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(dumped.len(), 1, "{name}");
        assert_eq!(dumped[0].name, "virtualInbound");
        assert_eq!(dumped[0].version_info, None);
        check_against_json(&json, &dumped[0]);
        assert_eq!(
            decode(&dumped[0]).traffic_direction,
            TrafficDirection::Inbound as i32,
            "{name}"
        );
    }
}

#[test]
fn v2_dump_gets_v3_names_tls_sockets_and_an_inferred_direction() {
    let dumped = listeners_from_json(&fixture(
        "istio-1.3-permissive-istio-describe-testdata.json",
    ))
    .expect("1.3 dump");
    let listener = decode(&dumped[0]);
    let notes = dumped[0].notes.join("\n");
    assert!(notes.contains("INBOUND inferred"), "{notes}");
    assert!(notes.contains("v2 tls_context converted"), "{notes}");
    assert!(
        notes.contains("envoy.http_connection_manager renamed"),
        "{notes}"
    );
    assert!(
        notes.contains("http_connection_manager.v2.HttpConnectionManager mapped"),
        "{notes}"
    );

    let tls_chains: Vec<&FilterChain> = listener
        .filter_chains
        .iter()
        .filter(|c| c.transport_socket.is_some())
        .collect();
    assert_eq!(tls_chains.len(), 1);
    let socket = tls_chains[0].transport_socket.as_ref().expect("socket");
    assert_eq!(socket.name, "envoy.transport_sockets.tls");
    assert!(has_hcm(tls_chains[0]));
    assert!(
        listener
            .filter_chains
            .iter()
            .flat_map(|c| &c.filters)
            .all(|f| { f.name.starts_with("envoy.filters.network.") })
    );

    // A dump that states its direction gets no inferred one.
    let dumped = listeners_from_json(&fixture("istio-1.19-permissive-istio-authz-testdata.json"))
        .expect("1.19 dump");
    assert!(!dumped[0].notes.iter().any(|n| n.contains("inferred")));
}

#[test]
fn istio_types_are_kept_without_payload_and_noted() {
    let dumped = listeners_from_json(&fixture("istio-1.19-permissive-istio-authz-testdata.json"))
        .expect("1.19 dump");
    let notes = dumped[0].notes.join("\n");
    assert!(
        notes.contains("stats.PluginConfig kept without its payload"),
        "{notes}"
    );
    assert!(notes.contains("io.istio.network.authn.Config"), "{notes}");
    let listener = decode(&dumped[0]);
    let stats = listener.filter_chains[0]
        .filters
        .iter()
        .find(|f| f.name == "istio.stats");
    let Some(filter::ConfigType::TypedConfig(any)) = stats.and_then(|f| f.config_type.clone())
    else {
        panic!("istio.stats without typed_config");
    };
    assert_eq!(any.type_url, "type.googleapis.com/stats.PluginConfig");
    assert!(any.value.is_empty());
}

/// Rewrites every object key with `rename`, except `@type` and the keys of maps (metadata),
/// which protojson writes verbatim.
fn rename_keys(value: &Value, rename: fn(&str) -> String) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, item) in map {
                let is_map = ["filter_metadata", "filterMetadata", "typed_filter_metadata"]
                    .contains(&key.as_str());
                let item = if is_map {
                    item.clone()
                } else {
                    rename_keys(item, rename)
                };
                let key = if key == "@type" {
                    key.clone()
                } else {
                    rename(key)
                };
                out.insert(key, item);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| rename_keys(v, rename)).collect()),
        other => other.clone(),
    }
}

#[test]
fn camel_and_snake_case_give_identical_bytes() {
    for name in fixture_names()
        .into_iter()
        .filter(|n| !n.contains("fragment"))
    {
        let json: Value = serde_json::from_str(&fixture(&name)).expect("fixture JSON");
        let snake = rename_keys(&json, camel_to_snake);
        let camel = rename_keys(&json, snake_to_camel);
        assert_ne!(snake, camel, "{name}: the renaming changed nothing");
        let from_snake = listeners_from_json(&snake.to_string()).expect("snake");
        let from_camel = listeners_from_json(&camel.to_string()).expect("camel");
        let original = listeners_from_json(&json.to_string()).expect("original");
        assert_eq!(from_snake[0].bytes, from_camel[0].bytes, "{name}");
        assert_eq!(from_snake[0].bytes, original[0].bytes, "{name}");
        assert_eq!(from_snake[0].notes, from_camel[0].notes, "{name}");
    }
}

#[test]
fn istioctl_arrays_give_every_listener() {
    let a: Value = serde_json::from_str(&fixture("istio-1.6-permissive-myf5-blog.json")).unwrap();
    let b: Value =
        serde_json::from_str(&fixture("istio-1.4-strict-istio-describe-testdata.json")).unwrap();
    let dumped = listeners_from_json(&json!([a, b]).to_string()).expect("array");
    assert_eq!(dumped.len(), 2);
    check_against_json(&a, &dumped[0]);
    check_against_json(&b, &dumped[1]);
    assert!(listeners_from_json("[]").expect("empty array").is_empty());
}

fn outbound(name: &str, port: u32) -> Value {
    json!({"name": name, "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
           "traffic_direction": "OUTBOUND", "filter_chains": []})
}

#[test]
fn config_dumps_give_active_warming_and_static_listeners() {
    let inbound: Value =
        serde_json::from_str(&fixture("istio-1.19-permissive-istio-authz-testdata.json")).unwrap();
    let mut warming = inbound.clone();
    warming["filter_chains"].as_array_mut().unwrap().truncate(2);
    let dump = json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {}},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
         "version_info": "2023-06-20T09:07:41Z/3",
         "static_listeners": [{"listener": outbound("admin", 15000), "last_updated": "2023-06-20T09:00:00Z"}],
         "dynamic_listeners": [
            {"name": "0.0.0.0_80", "active_state": {"version_info": "v1", "listener": outbound("0.0.0.0_80", 80)}},
            {"name": "virtualInbound",
             "active_state": {"version_info": "2023-06-20T09:07:41Z/3", "listener": inbound},
             "warming_state": {"version_info": "2023-06-20T09:08:00Z/4", "listener": warming},
             "error_state": {"details": "duplicate matcher"}},
            {"name": "old", "draining_state": {"version_info": "v0", "listener": outbound("old", 81)}}
         ]}
    ]});
    let dumped = listeners_from_json(&dump.to_string()).expect("config dump");
    let names: Vec<&str> = dumped.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["admin", "0.0.0.0_80", "virtualInbound", "virtualInbound"]
    );
    assert_eq!(dumped[0].version_info, None);
    assert!(dumped[0].notes.iter().any(|n| n.contains("static")));
    assert_eq!(
        dumped[2].version_info.as_deref(),
        Some("2023-06-20T09:07:41Z/3")
    );
    assert!(
        dumped[2]
            .notes
            .iter()
            .any(|n| n.contains("duplicate matcher"))
    );
    check_against_json(&inbound, &dumped[2]);
    assert_eq!(
        dumped[3].version_info.as_deref(),
        Some("2023-06-20T09:08:00Z/4")
    );
    assert!(dumped[3].notes.iter().any(|n| n.contains("warming")));
    check_against_json(&warming, &dumped[3]);

    // The same section on its own, camelCase, and the per-listener form of
    // /config_dump?resource=dynamic_listeners.
    let section = rename_keys(&dump["configs"][1], snake_to_camel);
    let bare = listeners_from_json(&section.to_string()).expect("bare ListenersConfigDump");
    assert_eq!(bare, dumped);
    let per_listener = json!({"configs": [{
        "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump.DynamicListener",
        "name": "0.0.0.0_80", "activeState": {"versionInfo": "v1", "listener": outbound("0.0.0.0_80", 80)}
    }]});
    let one = listeners_from_json(&per_listener.to_string()).expect("resource=dynamic_listeners");
    assert_eq!(one, vec![dumped[1].clone()]);
}

#[test]
fn a_rejected_listener_without_active_state_is_read_from_its_failed_configuration() {
    let mut failed = outbound("virtualInbound", 15006);
    failed["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
    let dump = json!({"dynamic_listeners": [{"name": "virtualInbound", "error_state": {
        "failed_configuration": failed, "details": "error adding listener: duplicate matcher"}}]});
    let dumped = listeners_from_json(&dump.to_string()).expect("dump");
    assert_eq!(dumped.len(), 1);
    assert!(
        dumped[0].notes[0].contains("rejected update, not served"),
        "{:?}",
        dumped[0].notes
    );
}

#[test]
fn v2alpha_dumps_with_per_state_lists_are_read() {
    let dump = json!({"@type": "type.googleapis.com/envoy.admin.v2alpha.ListenersConfigDump",
        "dynamic_active_listeners": [{"version_info": "3", "listener": outbound("a", 1)}],
        "dynamic_warming_listeners": [{"version_info": "4", "listener": outbound("a", 1)}]});
    let dumped = listeners_from_json(&dump.to_string()).expect("v2alpha dump");
    assert_eq!(dumped.len(), 2);
    assert_eq!(dumped[0].version_info.as_deref(), Some("3"));
    assert!(dumped[1].notes.iter().any(|n| n.contains("warming")));
}

#[test]
fn unknown_types_and_fields_never_fail() {
    let listener = json!({
        "name": "virtualInbound", "trafficDirection": "INBOUND", "drainType": "MODIFY_ONLY",
        "listenerFilters": [{"name": "istio.custom", "typedConfig": {"@type": "type.googleapis.com/istio.Custom", "x": 1}}],
        "filterChains": [{
            "filters": [{"name": "x", "typedConfig": {"@type": "type.googleapis.com/some.unknown.v9.Thing", "deep": {"a": [1]}}},
                        {"name": "wasm", "typed_config": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                          "type_url": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm", "value": {}}},
                        {"name": "legacy", "config": {"anything": true}}],
            "transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "commonTlsContext": {"alpnProtocols": ["h2"], "tlsCertificateCertificateProvider": {}},
                "sessionTicketKeys": {"keys": []}}},
            "metadata": {"filterMetadata": {"pilot_meta": {"a": "b"}}}
        }]
    });
    let dumped = listeners_from_json(&listener.to_string()).expect("unknown types are fine");
    let notes = dumped[0].notes.join("\n");
    for expected in [
        "some.unknown.v9.Thing kept without its payload",
        "udpa.type.v1.TypedStruct wrapping type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
        "v2 config of filter legacy dropped",
        "Listener.drain_type",
        "FilterChain.metadata",
        "CommonTlsContext.tls_certificate_certificate_provider",
        "DownstreamTlsContext.session_ticket_keys",
    ] {
        assert!(notes.contains(expected), "missing {expected:?} in\n{notes}");
    }
    let decoded = decode(&dumped[0]);
    let tls = tls_context(&decoded.filter_chains[0]).expect("tls");
    assert_eq!(
        tls.common_tls_context.expect("common").alpn_protocols,
        ["h2"]
    );
    assert!(decoded.filter_chains[0].filters[2].config_type.is_none());
}

#[test]
fn every_filter_chain_match_field_is_converted() {
    let listener = json!({"name": "l", "filter_chains": [{"filter_chain_match": {
        "destination_port": 9080, "prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}],
        "direct_source_prefix_ranges": [{"address_prefix": "10.1.0.0", "prefix_len": "16"}],
        "source_type": "SAME_IP_OR_LOOPBACK",
        "source_prefix_ranges": [{"address_prefix": "::", "prefix_len": 0}],
        "source_ports": [1, "2"], "server_names": ["a.example", "*.b.example"],
        "transport_protocol": "tls", "application_protocols": ["istio", "h2"],
        "address_suffix": "::1", "suffix_len": 64}}]});
    let dumped = listeners_from_json(&listener.to_string()).expect("listener");
    assert!(dumped[0].notes.is_empty(), "{:?}", dumped[0].notes);
    let matched = decode(&dumped[0]).filter_chains[0]
        .filter_chain_match
        .clone()
        .expect("match");
    assert_eq!(matched.destination_port.map(|p| p.value), Some(9080));
    assert_eq!(
        matched.prefix_ranges[0].prefix_len.map(|l| l.value),
        Some(8)
    );
    assert_eq!(
        matched.direct_source_prefix_ranges[0]
            .prefix_len
            .map(|l| l.value),
        Some(16)
    );
    assert_eq!(matched.source_type, 1);
    assert_eq!(matched.source_prefix_ranges[0].address_prefix, "::");
    assert_eq!(matched.source_ports, [1, 2]);
    assert_eq!(matched.server_names, ["a.example", "*.b.example"]);
    assert_eq!(matched.transport_protocol, "tls");
    assert_eq!(matched.application_protocols, ["istio", "h2"]);
    assert_eq!(matched.address_suffix, "::1");
    assert_eq!(matched.suffix_len.map(|l| l.value), Some(64));
}

#[test]
fn listener_level_fields_are_converted() {
    let listener = json!({"name": "virtualInbound",
        "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 15006}},
        "additionalAddresses": [{"address": {"socketAddress": {"address": "::", "portValue": 15006}}}],
        "listenerFiltersTimeout": "0.5s", "continueOnListenerFiltersTimeout": true,
        "filterChainMatcher": {"matcherTree": {}}, "useOriginalDst": true,
        "trafficDirection": "INBOUND",
        "listenerFilters": [{"name": "envoy.filters.listener.tls_inspector",
            "filterDisabled": {"orMatch": {"rules": [
                {"destinationPortRange": {"start": 80, "end": 81}},
                {"notMatch": {"anyMatch": true}}]}}}],
        "filterChains": []});
    let dumped = listeners_from_json(&listener.to_string()).expect("listener");
    let decoded = decode(&dumped[0]);
    assert_eq!(decoded.additional_addresses.len(), 1);
    assert_eq!(
        decoded.listener_filters_timeout.map(|d| d.nanos),
        Some(500_000_000)
    );
    assert!(decoded.continue_on_listener_filters_timeout);
    assert!(decoded.filter_chain_matcher.is_some());
    assert_eq!(decoded.use_original_dst.map(|b| b.value), Some(true));
    assert!(
        dumped[0]
            .notes
            .iter()
            .any(|n| n.contains("filter_chain_matcher present"))
    );
    let predicate = decoded.listener_filters[0]
        .filter_disabled
        .clone()
        .expect("predicate");
    use envoy_types::pb::envoy::config::listener::v3::listener_filter_chain_match_predicate::Rule;
    let Some(Rule::OrMatch(set)) = predicate.rule else {
        panic!("or_match expected")
    };
    assert_eq!(set.rules.len(), 2);
    assert!(
        matches!(&set.rules[0].rule, Some(Rule::DestinationPortRange(r)) if r.start == 80 && r.end == 81)
    );
}

#[test]
fn malformed_values_are_reported_with_their_path() {
    let mut inbound: Value =
        serde_json::from_str(&fixture("istio-1.19-permissive-istio-authz-testdata.json")).unwrap();
    inbound["filter_chains"][4]["filter_chain_match"]["destination_port"] = json!("eighty");
    let dump = json!({"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "dynamic_listeners": [{}, {}, {"name": "virtualInbound", "active_state": {"listener": inbound}}]}]});
    let err = listeners_from_json(&dump.to_string())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "listener \"virtualInbound\" at configs[0].dynamic_listeners[2].active_state.listener.\
         filter_chains[4].filter_chain_match.destination_port: expected an integer, found the \
         string \"eighty\""
    );

    let cases = [
        (
            json!({"name": "l", "filterChains": {}}),
            "filterChains: expected an array",
        ),
        (
            json!({"name": "l", "trafficDirection": "SIDEWAYS"}),
            "\"SIDEWAYS\" is not a value of TrafficDirection",
        ),
        (
            json!({"name": "l", "listenerFiltersTimeout": "1m"}),
            "listenerFiltersTimeout: expected a duration",
        ),
        (
            json!({"name": "l", "filterChains": [{"filters": [{"name": "f", "typedConfig": {"a": 1}}]}]}),
            "filterChains[0].filters[0].typedConfig: typed_config without @type",
        ),
        (
            json!({"name": "l", "filterChains": [{"filterChainMatch": {"destinationPort": 70000.5}}]}),
            "destinationPort: expected an integer",
        ),
        (
            json!({"name": "l", "filterChains": [{"filterChainMatch": {"destinationPort": -1}}]}),
            "out of range for uint32",
        ),
        (
            json!({"name": "l", "filterChains": [{"tls_context": {}, "transport_socket": {"name": "tls"}}]}),
            "filterChains[0].tls_context: a chain may not have both",
        ),
        (
            json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c"}),
            "expected a Listener, found @type",
        ),
        (
            json!([{"name": "a"}, 7]),
            "[1]: expected an object, found 7",
        ),
    ];
    for (document, expected) in cases {
        let err = listeners_from_json(&document.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{document}: {err}");
    }
}

#[test]
fn documents_of_other_shapes_are_refused() {
    let err = listeners_from_json("{\"name\": ").unwrap_err();
    assert!(matches!(err, DumpError::Syntax(_)), "{err}");
    let err = listeners_from_json("\"virtualInbound\"").unwrap_err();
    assert!(err.to_string().contains("it is a string"), "{err}");
    let err = listeners_from_json(r#"{"clusters": []}"#).unwrap_err();
    assert!(
        err.to_string().contains("top-level keys: clusters"),
        "{err}"
    );
    let err = listeners_from_json(
        r#"{"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"}]}"#,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("envoy.admin.v3.ClustersConfigDump"),
        "{err}"
    );
}

#[test]
fn read_listeners_keeps_going_past_a_listener_that_cannot_be_read() {
    let names = |read: Vec<Result<DumpedListener, DumpError>>| -> Vec<Result<String, String>> {
        read.into_iter()
            .map(|r| r.map(|l| l.name).map_err(|e| e.to_string()))
            .collect()
    };

    let list = json!([{"name": "a"}, {"name": "b", "filterChains": {}}, {"name": "c"}]);
    let read = names(read_listeners(&list.to_string()).unwrap());
    assert_eq!(read[0], Ok("a".to_owned()));
    let error = read[1].as_ref().unwrap_err();
    assert!(
        error.starts_with("listener \"b\" at [1].filterChains"),
        "{error}"
    );
    assert_eq!(read[2], Ok("c".to_owned()));

    // In a config dump, an entry whose own fields are wrong is named by the entry's name.
    let dump = json!({"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "dynamic_listeners": [
            {"name": "bad", "active_state": {"version_info": 7, "listener": {"name": "bad"}}},
            {"name": "good", "active_state": {"listener": {"name": "good"}}}]}]});
    let read = names(read_listeners(&dump.to_string()).unwrap());
    let error = read[0].as_ref().unwrap_err();
    assert!(
        error.starts_with(
            "listener \"bad\" at configs[0].dynamic_listeners[0].active_state.version_info"
        ),
        "{error}"
    );
    assert_eq!(read[1], Ok("good".to_owned()));
    assert!(listeners_from_json(&dump.to_string()).is_err());

    // The document itself still fails as a whole.
    assert!(read_listeners("[").is_err());
    assert!(read_listeners(r#"{"configs": {}}"#).is_err());
}
