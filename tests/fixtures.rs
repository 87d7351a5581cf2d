//! The rewrite on every real Istio listener dump in `testdata/istio/`: which chains change is
//! decided here from the dump's JSON alone, by the structural rule of DESIGN.md, and checked
//! against what the rewrite does to the converted protobuf bytes.

use std::path::PathBuf;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;
use serde_json::{Value, json};

use alpn_xds::dump::listeners_from_json;
use alpn_xds::rewrite::{RewritePlan, STANDARD_ALPNS, rewrite_listener};

const ISTIO_MTLS_HTTP: [&str; 4] = ["istio-http/1.0", "istio-http/1.1", "istio-h2", "istio"];

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/istio")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn everywhere() -> RewritePlan {
    RewritePlan {
        default: true,
        ..Default::default()
    }
}

/// A key in snake_case or camelCase.
fn get<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    let camel: String = snake
        .split('_')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                w[..1].to_uppercase() + &w[1..]
            }
        })
        .collect();
    v.get(snake).or_else(|| v.get(&camel))
}

/// The standard ALPNs the rule of DESIGN.md adds to this JSON chain: TLS transport socket,
/// HTTP connection manager and an Istio mTLS value; nothing for any other chain.
fn expected_additions(chain: &Value) -> Vec<&'static str> {
    let has_tls = get(chain, "tls_context").is_some()
        || get(chain, "transport_socket")
            .and_then(|t| t.get("name"))
            .and_then(Value::as_str)
            .is_some_and(|n| n.contains("tls"));
    let has_hcm = get(chain, "filters")
        .and_then(Value::as_array)
        .is_some_and(|filters| {
            filters.iter().any(|f| {
                f.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.contains("http_connection_manager"))
            })
        });
    let alpns: Vec<&str> = get(chain, "filter_chain_match")
        .and_then(|m| get(m, "application_protocols"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let istio = alpns.iter().any(|a| ISTIO_MTLS_HTTP.contains(a));
    if !(has_tls && has_hcm && istio) {
        return Vec::new();
    }
    STANDARD_ALPNS
        .into_iter()
        .filter(|s| !alpns.contains(s))
        .collect()
}

/// Rewrites the one listener of `json` and checks the result against the JSON-derived rule.
/// Returns how many chains gained values.
fn check(json: &Value) -> usize {
    let listeners = listeners_from_json(&json.to_string()).expect("the dump converts");
    assert_eq!(listeners.len(), 1);
    let input = &listeners[0].bytes;
    let chains = get(json, "filter_chains")
        .and_then(Value::as_array)
        .unwrap();

    let rewrite = rewrite_listener(input, &everywhere()).expect("the rewrite reads the listener");
    let expected: Vec<Vec<&str>> = chains.iter().map(expected_additions).collect();
    let changed = expected.iter().filter(|e| !e.is_empty()).count();

    let Some(output) = rewrite.output.clone() else {
        assert_eq!(
            changed, 0,
            "the rewrite changed nothing, the rule expects {expected:?}"
        );
        return 0;
    };

    // Chain by chain: exactly the expected values appended, in order, nothing else.
    let before = Listener::decode(input.as_ref()).unwrap();
    let after = Listener::decode(output.as_ref()).unwrap();
    assert_eq!(before.filter_chains.len(), after.filter_chains.len());
    let mut stripped = after.clone();
    for (i, (b, a)) in before
        .filter_chains
        .iter()
        .zip(&after.filter_chains)
        .enumerate()
    {
        let b_alpns = &b.filter_chain_match.as_ref().unwrap().application_protocols;
        let a_alpns = &a.filter_chain_match.as_ref().unwrap().application_protocols;
        let mut want = b_alpns.clone();
        want.extend(expected[i].iter().map(|s| s.to_string()));
        assert_eq!(a_alpns, &want, "chain {i} ({})", b.name);
        stripped.filter_chains[i]
            .filter_chain_match
            .as_mut()
            .unwrap()
            .application_protocols
            .truncate(b_alpns.len());
    }
    assert_eq!(
        stripped, before,
        "the rewrite changed more than application_protocols"
    );

    // On the wire: the output grew by the added strings (tag, length, text) and at most a few
    // bytes of longer length prefixes per changed chain.
    let added_bytes: usize = expected.iter().flatten().map(|s| 2 + s.len()).sum();
    let grown = output.len() - input.len();
    assert!(
        grown >= added_bytes && grown <= added_bytes + 4 * changed,
        "grew {grown} bytes for {added_bytes} bytes of values"
    );
    // The bytes before the first changed chain and after the last one are istiod's, unchanged.
    let first = expected.iter().position(|e| !e.is_empty()).unwrap();
    let last = expected.iter().rposition(|e| !e.is_empty()).unwrap();
    let head: usize = before.filter_chains[..first]
        .iter()
        .map(Message::encoded_len)
        .sum();
    let tail: usize = before.filter_chains[last + 1..]
        .iter()
        .map(Message::encoded_len)
        .sum();
    let common_prefix = input
        .iter()
        .zip(output.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let common_suffix = input
        .iter()
        .rev()
        .zip(output.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common_prefix >= head, "prefix {common_prefix} < {head}");
    assert!(common_suffix >= tail, "suffix {common_suffix} < {tail}");

    // Deterministic, and a second pass changes nothing.
    let again = rewrite_listener(input, &everywhere()).unwrap();
    assert_eq!(again.output.as_ref(), Some(&output));
    let twice = rewrite_listener(&output, &everywhere()).unwrap();
    assert!(
        twice.output.is_none(),
        "a rewritten listener was rewritten again"
    );

    // The report names the same chains.
    let reported: Vec<usize> = rewrite
        .chains
        .iter()
        .filter(|c| !c.added.is_empty())
        .map(|c| c.index)
        .collect();
    let wanted: Vec<usize> = (0..expected.len())
        .filter(|&i| !expected[i].is_empty())
        .collect();
    assert_eq!(reported, wanted);
    changed
}

#[test]
fn istio_1_19_permissive_gains_standard_alpns_on_its_two_mtls_http_chains() {
    assert_eq!(
        check(&fixture("istio-1.19-permissive-istio-authz-testdata.json")),
        2
    );
}

#[test]
fn istio_1_3_permissive_gains_them_on_the_istio_alpn_chain() {
    assert!(
        check(&fixture(
            "istio-1.3-permissive-istio-describe-testdata.json"
        )) >= 1
    );
}

#[test]
fn istio_1_4_strict_is_left_alone() {
    assert_eq!(
        check(&fixture("istio-1.4-strict-istio-describe-testdata.json")),
        0
    );
}

#[test]
fn istio_1_6_permissive_catch_all_gains_only_what_it_lacks() {
    let json = fixture("istio-1.6-permissive-myf5-blog.json");
    assert!(check(&json) >= 1);
}

#[test]
fn istio_1_10_passthrough_fragment_gains_only_h2() {
    // The fragment holds only the matches of the passthrough chains istiod generated before
    // Istio 1.10. Each becomes a chain; the TLS ones carrying Istio ALPNs get the TLS socket and
    // HTTP connection manager that istiod gave them.
    let fragment = fixture("istio-1.10dev-permissive-issue31297-fragment.json");
    let chains: Vec<Value> = fragment["generated_passthrough_filter_chain_matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let tls = m["transportProtocol"] == "tls";
            let mut chain = json!({ "filter_chain_match": m, "filters": [] });
            if tls {
                chain["transport_socket"] = json!({ "name": "envoy.transport_sockets.tls" });
            }
            if m.to_string().contains("istio-http") {
                chain["filters"] =
                    json!([{ "name": "envoy.filters.network.http_connection_manager" }]);
            }
            chain
        })
        .collect();
    let listener = json!({
        "name": "virtualInbound",
        "traffic_direction": "INBOUND",
        "filter_chains": chains,
    });
    assert_eq!(check(&listener), 1);

    let rewrite = rewrite_listener(
        &listeners_from_json(&listener.to_string()).unwrap()[0].bytes,
        &everywhere(),
    )
    .unwrap();
    let chain = rewrite.chains.iter().find(|c| !c.added.is_empty()).unwrap();
    assert_eq!(chain.added.iter().collect::<Vec<_>>(), ["h2"]);
    assert_eq!(
        chain.already_present.iter().collect::<Vec<_>>(),
        ["http/1.0", "http/1.1"]
    );
}
