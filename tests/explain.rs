//! `alpn-xds explain`, the real binary, on every real Istio dump in `testdata/istio/` (and a
//! camelCase config dump made from one): which chains it names as changing is decided here from
//! the dump's JSON alone, by the structural rule of DESIGN.md; the JSON output and the text
//! output must tell the same decision; bad inputs give exit code 2 and name the file.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Map, Value, json};
use tempfile::TempDir;

const ISTIO_MTLS_HTTP: [&str; 4] = ["istio-http/1.0", "istio-http/1.1", "istio-h2", "istio"];
const STANDARD: [&str; 3] = ["http/1.0", "http/1.1", "h2"];

/// The namespace-level policy of `shop`: `mode`, with the annotation set to `annotation`.
fn namespace_policy(mode: &str, annotation: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  \
         namespace: shop\n  annotations:\n    http-alpns.aspenmesh.io: \"{annotation}\"\nspec:\n  \
         mtls:\n    mode: {mode}\n"
    )
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn explain(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_alpn-xds"))
        .arg("explain")
        .args(args)
        .env_remove("ALPN_XDS_POLICY_DIR")
        .env_remove("ALPN_XDS_ROOT_NAMESPACE")
        .output()
        .expect("the binary runs");
    Run {
        code: output.status.code().expect("exited"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// A folder holding `policies` as one YAML file, and room for other inputs.
fn workspace(policies: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/pa.yaml"), policies).unwrap();
    dir
}

fn path(dir: &TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

fn write_json(dir: &TempDir, name: &str, value: &Value) -> String {
    let file = path(dir, name);
    std::fs::write(&file, serde_json::to_string_pretty(value).unwrap()).unwrap();
    file
}

/// Runs explain for workload `shop` (labels `app=productpage`) in both output formats; checks
/// that both succeed and tell the same decision and changed chains; returns the JSON.
fn explain_both(dir: &TempDir, listeners: &str, workload: &[&str]) -> (Value, String) {
    let policies = path(dir, "policies");
    let mut args = vec!["--policy-dir", &policies, "--listeners", listeners];
    args.extend_from_slice(workload);
    let text = explain(&args);
    assert_eq!(text.code, 0, "{}", text.stderr);
    args.extend_from_slice(&["--output", "json"]);
    let json_run = explain(&args);
    assert_eq!(json_run.code, 0, "{}", json_run.stderr);
    let json: Value = serde_json::from_str(&json_run.stdout).expect("the JSON output parses");

    let decision = text
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("Decision: "))
        .expect("a Decision line");
    assert_eq!(decision, json["decision"]["summary"], "{}", text.stdout);
    let changed_in_json: Vec<u64> = changed_chains(&json)
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        text_changes(&text.stdout),
        changed_in_json,
        "{}",
        text.stdout
    );
    assert_eq!(json["decision"]["rewrites"], !changed_in_json.is_empty());
    let warnings = json["warnings"].as_array().unwrap();
    let printed: Vec<&str> = text
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  ! "))
        .collect();
    let in_json: Vec<&str> = warnings
        .iter()
        .map(|w| w["message"].as_str().unwrap())
        .collect();
    assert_eq!(printed, in_json);
    (json, text.stdout)
}

const WORKLOAD: [&str; 4] = ["--namespace", "shop", "--labels", "app=productpage"];

/// Every chain the JSON output reports as changed, in every listener.
fn changed_chains(json: &Value) -> Vec<Value> {
    json["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["chains"].as_array().unwrap().clone())
        .filter(|c| c["changed"] == true)
        .collect()
}

/// The chain indices listed under "changes" in the text output.
fn text_changes(text: &str) -> Vec<u64> {
    let mut indices = Vec::new();
    let mut in_changes = false;
    for line in text.lines() {
        if line == "  changes" {
            in_changes = true;
        } else if !line.starts_with("    ") {
            in_changes = false;
        } else if in_changes && let Some(rest) = line.strip_prefix("    chain ") {
            let index = rest.split(' ').next().unwrap();
            indices.push(index.parse().unwrap());
        }
    }
    indices
}

/// A key in snake_case or camelCase.
fn get<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    v.get(snake).or_else(|| v.get(camel(snake)))
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// Every object key of `value` in camelCase, as protojson writes by default.
fn camel_case(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (camel(k), camel_case(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(camel_case).collect()),
        other => other.clone(),
    }
}

/// What the rule of DESIGN.md expects for one JSON chain, when it is an mTLS HTTP chain (TLS
/// transport socket, HTTP connection manager, an Istio mTLS ALPN): its kind and the values it
/// gains when its port is PERMISSIVE and the annotation asks.
struct Expected {
    index: usize,
    kind: &'static str,
    adds: Vec<&'static str>,
    requires_tls: bool,
}

fn expected_chains(listener: &Value) -> Vec<Expected> {
    let chains = get(listener, "filter_chains")
        .and_then(Value::as_array)
        .unwrap();
    let mut expected = Vec::new();
    for (index, chain) in chains.iter().enumerate() {
        let has_tls = get(chain, "tls_context").is_some()
            || get(chain, "transport_socket")
                .and_then(|t| t.get("name"))
                .and_then(Value::as_str)
                .is_some_and(|n| n.contains("tls"));
        let has_hcm = get(chain, "filters")
            .and_then(Value::as_array)
            .is_some_and(|fs| {
                fs.iter().any(|f| {
                    f["name"]
                        .as_str()
                        .is_some_and(|n| n.contains("http_connection_manager"))
                })
            });
        let matches = get(chain, "filter_chain_match");
        let alpns: Vec<&str> = matches
            .and_then(|m| get(m, "application_protocols"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !(has_tls && has_hcm && alpns.iter().any(|a| ISTIO_MTLS_HTTP.contains(a))) {
            continue;
        }
        let port = matches.and_then(|m| get(m, "destination_port"));
        let kind = match port {
            None => "Passthrough",
            Some(_) if alpns.contains(&"istio") => "DeclaredHttp",
            Some(_) => "Sniffed",
        };
        let transport = matches
            .and_then(|m| get(m, "transport_protocol"))
            .and_then(Value::as_str);
        expected.push(Expected {
            index,
            kind,
            adds: STANDARD
                .into_iter()
                .filter(|s| !alpns.contains(s))
                .collect(),
            requires_tls: transport == Some("tls"),
        });
    }
    expected
}

/// Checks the JSON output against the rule applied to `listener`'s JSON, for a PERMISSIVE
/// workload whose namespace policy says "true".
fn check_against_rule(json: &Value, listener: &Value) {
    let expected = expected_chains(listener);
    let reported = json["listeners"][0]["chains"].as_array().unwrap();
    let reported_indices: Vec<u64> = reported
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    let expected_indices: Vec<u64> = expected.iter().map(|e| e.index as u64).collect();
    assert_eq!(reported_indices, expected_indices, "the mTLS HTTP chains");

    for (chain, want) in reported.iter().zip(&expected) {
        assert_eq!(chain["kind"], want.kind, "chain {}", want.index);
        assert_eq!(chain["added"], json!(want.adds), "chain {}", want.index);
        assert_eq!(chain["changed"], !want.adds.is_empty());
        assert_eq!(chain["mode"], "PERMISSIVE");
    }

    // Each changed chain that is not a declared HTTP port is warned about, and so is each that
    // gains http/1.x without requiring TLS; no other chain is.
    let warned = |kind: &str| -> Vec<u64> {
        json["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["kind"] == kind)
            .map(|w| w["chain"].as_u64().unwrap())
            .collect()
    };
    let application_tls: Vec<u64> = expected
        .iter()
        .filter(|e| !e.adds.is_empty() && e.kind != "DeclaredHttp")
        .map(|e| e.index as u64)
        .collect();
    assert_eq!(warned("application_tls"), application_tls);
    let plaintext: Vec<u64> = expected
        .iter()
        .filter(|e| !e.requires_tls && e.adds.iter().any(|a| a.starts_with("http/1")))
        .map(|e| e.index as u64)
        .collect();
    assert_eq!(warned("may_capture_plaintext"), plaintext);

    // The HTTP/1.0 note appears exactly when some chain gains http/1.0.
    let gains_http10 = expected.iter().any(|e| e.adds.contains(&"http/1.0"));
    assert_eq!(json["http10"].is_object(), gains_http10);
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/istio")
}

/// Every JSON dump in `testdata/istio/`, by name.
fn fixtures() -> Vec<(String, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(fixtures_dir().join(&name)).unwrap();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// The 1.10 fragment holds only the matches of the passthrough chains; as in
/// `tests/fixtures.rs`, each becomes a chain, the TLS ones with a TLS socket and those with
/// Istio HTTP ALPNs with an HTTP connection manager, as istiod built them.
fn listener_from_fragment(fragment: &Value) -> Value {
    let chains: Vec<Value> = fragment["generated_passthrough_filter_chain_matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let mut chain = json!({ "filter_chain_match": m, "filters": [] });
            if m["transportProtocol"] == "tls" {
                chain["transport_socket"] = json!({ "name": "envoy.transport_sockets.tls" });
            }
            if m.to_string().contains("istio-http") {
                chain["filters"] =
                    json!([{ "name": "envoy.filters.network.http_connection_manager" }]);
            }
            chain
        })
        .collect();
    json!({"name": "virtualInbound", "traffic_direction": "INBOUND", "filter_chains": chains})
}

#[test]
fn explain_names_the_chains_the_rule_changes_on_every_fixture() {
    let dir = workspace(&namespace_policy("PERMISSIVE", "true"));
    let mut changing_fixtures = 0;
    for (name, document) in fixtures() {
        let (file, listener) = if document
            .get("generated_passthrough_filter_chain_matches")
            .is_some()
        {
            // Not a listener itself: explain says so, and explains the listener it describes.
            let raw = fixtures_dir().join(&name).display().to_string();
            let run = explain(&[
                "--policy-dir",
                &path(&dir, "policies"),
                "--listeners",
                &raw,
                "--namespace",
                "shop",
            ]);
            assert_eq!(run.code, 2, "{name}: {}", run.stdout);
            assert!(run.stderr.contains(&raw), "{}", run.stderr);
            let listener = listener_from_fragment(&document);
            (write_json(&dir, &name, &listener), listener)
        } else {
            (fixtures_dir().join(&name).display().to_string(), document)
        };

        let (json, text) = explain_both(&dir, &file, &WORKLOAD);
        check_against_rule(&json, &listener);
        assert_eq!(json["dump"]["inbound"], 1, "{name}");
        assert_eq!(json["workload"]["namespace"], "shop");
        assert_eq!(json["policy"]["alpn"]["enabled"], true);
        if !changed_chains(&json).is_empty() {
            changing_fixtures += 1;
            assert!(text.contains("\n  changes\n"), "{text}");
        }
    }
    // Every PERMISSIVE fixture changes; the STRICT one has no mTLS HTTP chain.
    assert_eq!(changing_fixtures, 4);
}

#[test]
fn a_camel_case_config_dump_gives_the_same_answer_and_its_own_node() {
    let dir = workspace(&namespace_policy("PERMISSIVE", "true"));
    let (_, snake) = fixtures()
        .into_iter()
        .find(|(name, _)| name.starts_with("istio-1.19"))
        .unwrap();
    let node = json!({
        "id": "sidecar~10.0.0.1~productpage-v1-abc.shop~shop.svc.cluster.local",
        "metadata": {"NAMESPACE": "shop", "NAME": "productpage-v1-abc",
                     "LABELS": {"app": "productpage"}, "ISTIO_VERSION": "1.19.0"}
    });
    let dump = json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
         "bootstrap": {"node": node}},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
         "versionInfo": "2023-06-20T09:07:41Z/3",
         "dynamicListeners": [
            {"name": "virtualOutbound", "activeState": {"listener":
                {"name": "virtualOutbound", "trafficDirection": "OUTBOUND"}}},
            {"name": "virtualInbound", "activeState": {"versionInfo": "v7",
                "listener": camel_case(&snake)}}]}]});
    let file = write_json(&dir, "config_dump.json", &dump);
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("filterChainMatch")
    );

    let (json, text) = explain_both(&dir, &file, &["--node-metadata", &file]);
    assert_eq!(json["listeners"][1]["name"], "virtualInbound");
    assert_eq!(json["listeners"][1]["version_info"], "v7");
    assert_eq!(json["listeners"][0]["skipped"], "NotInbound");
    assert_eq!(json["dump"]["not_inbound"], 1);
    assert_eq!(json["workload"]["name"], "productpage-v1-abc");
    assert_eq!(json["workload"]["from"], "metadata");
    assert!(text.contains("Skipped 1 listener(s) that are not INBOUND: \"virtualOutbound\""));

    let (from_snake, _) = explain_both(
        &dir,
        &fixtures_dir()
            .join("istio-1.19-permissive-istio-authz-testdata.json")
            .display()
            .to_string(),
        &WORKLOAD,
    );
    assert_eq!(changed_chains(&json), changed_chains(&from_snake));
    assert_eq!(
        json["listeners"][1]["chains"],
        from_snake["listeners"][0]["chains"]
    );
}

#[test]
fn a_strict_workload_changes_nothing_and_says_why() {
    let dir = workspace(&namespace_policy("STRICT", "true"));
    for (name, document) in fixtures() {
        if document
            .get("generated_passthrough_filter_chain_matches")
            .is_some()
        {
            continue;
        }
        let file = fixtures_dir().join(&name).display().to_string();
        let (json, text) = explain_both(&dir, &file, &WORKLOAD);
        assert_eq!(json["decision"]["rewrites"], false, "{name}");
        assert!(changed_chains(&json).is_empty());
        assert_eq!(json["policy"]["workload_mode"], "STRICT");
        let summary = json["decision"]["summary"].as_str().unwrap();
        assert!(summary.starts_with("nothing changes: "), "{summary}");
        assert!(summary.contains("STRICT"), "{name}: {summary}");
        for chain in json["listeners"][0]["chains"].as_array().unwrap() {
            let reason = chain["reason"].as_str().unwrap();
            assert!(
                reason.contains("STRICT already accepts any ALPN"),
                "{reason}"
            );
        }
        let reports = json["policy"]["reports"].as_array().unwrap();
        assert!(reports.iter().any(|r| r["kind"] == "mode_not_permissive"));
        assert!(text.contains("mTLS mode:  STRICT: namespace policy shop/default sets STRICT"));
    }
}

#[test]
fn labels_select_the_workload_policy_and_its_port_level_mode() {
    let policies = format!(
        "{}---\n{}",
        namespace_policy("PERMISSIVE", "true"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: httpbin\n  \
         namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: httpbin\n  \
         portLevelMtls:\n    80:\n      mode: STRICT\n"
    );
    let dir = workspace(&policies);
    let file = fixtures_dir()
        .join("istio-1.19-permissive-istio-authz-testdata.json")
        .display()
        .to_string();
    let ports_of_changed = |json: &Value| -> Vec<Value> {
        changed_chains(json)
            .iter()
            .map(|c| c["destination_port"].clone())
            .collect()
    };

    let (json, _) = explain_both(&dir, &file, &WORKLOAD);
    assert_eq!(ports_of_changed(&json), [Value::Null, json!(80)]);

    let httpbin = ["--namespace", "shop", "--labels", "app=httpbin,version=v1"];
    let (json, text) = explain_both(&dir, &file, &httpbin);
    assert_eq!(ports_of_changed(&json), [Value::Null]);
    assert_eq!(json["policy"]["selected"]["workload"]["name"], "httpbin");
    assert!(
        text.contains("port 80: STRICT (portLevelMtls of workload policy shop/httpbin"),
        "{text}"
    );
}

#[test]
fn a_listener_that_cannot_be_read_is_named_and_the_others_explained() {
    let dir = workspace(&namespace_policy("PERMISSIVE", "true"));
    let inbound: Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures_dir().join("istio-1.19-permissive-istio-authz-testdata.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dump = json!([{"name": "broken", "filterChains": {}}, inbound]);
    let file = write_json(&dir, "mixed.json", &dump);
    let (json, text) = explain_both(&dir, &file, &WORKLOAD);
    assert_eq!(json["listeners"][0]["name"], "broken");
    let error = json["listeners"][0]["error"].as_str().unwrap();
    assert!(error.contains("filterChains"), "{error}");
    assert_eq!(json["dump"]["unreadable"], 1);
    assert!(
        json["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["kind"] == "unreadable_listener" && w["listener"] == "broken")
    );
    assert_eq!(json["decision"]["rewrites"], true);
    assert!(text.contains("Listener \"broken\": could not be read"));
}

#[test]
fn bad_inputs_exit_2_and_name_the_file_and_field() {
    let dir = workspace(&namespace_policy("PERMISSIVE", "true"));
    let good = fixtures_dir()
        .join("istio-1.19-permissive-istio-authz-testdata.json")
        .display()
        .to_string();
    let policies = path(&dir, "policies");
    std::fs::write(path(&dir, "not-json.json"), "{ this is not json").unwrap();
    let one_bad_listener = write_json(
        &dir,
        "bad-listener.json",
        &json!({"name": "l",
        "filterChains": [{"filterChainMatch": {"destinationPort": "eighty"}}]}),
    );
    let labels_string = write_json(
        &dir,
        "node-labels.json",
        &json!({"NAMESPACE": "shop", "LABELS": "app=web"}),
    );
    let no_namespace = write_json(
        &dir,
        "node-anon.json",
        &json!({"id": "router~x", "metadata": {}}),
    );
    let missing = path(&dir, "missing");
    let not_json = path(&dir, "not-json.json");

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--listeners", &not_json, "--namespace", "shop"],
            vec!["--listeners", &not_json, "not valid JSON"],
        ),
        (
            vec!["--listeners", &one_bad_listener, "--namespace", "shop"],
            vec![
                &one_bad_listener,
                "filterChains[0].filterChainMatch.destinationPort",
            ],
        ),
        (
            vec!["--listeners", &missing, "--namespace", "shop"],
            vec!["--listeners", &missing, "cannot read it"],
        ),
        (
            vec!["--listeners", &good, "--node-metadata", &labels_string],
            vec![
                "--node-metadata",
                &labels_string,
                "LABELS: expected an object",
            ],
        ),
        (
            vec!["--listeners", &good, "--node-metadata", &no_namespace],
            vec![&no_namespace, "names no workload", "router~x"],
        ),
        (
            vec!["--listeners", &good, "--node-metadata", &not_json],
            vec!["--node-metadata", &not_json, "not valid JSON"],
        ),
    ];
    for (args, wanted) in cases {
        let mut all = vec!["--policy-dir", policies.as_str()];
        all.extend(args);
        let run = explain(&all);
        assert_eq!(run.code, 2, "{all:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        for want in wanted {
            assert!(run.stderr.contains(want), "{want:?} not in {}", run.stderr);
        }
    }

    let run = explain(&[
        "--policy-dir",
        &missing,
        "--listeners",
        &good,
        "--namespace",
        "shop",
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("--policy-dir") && run.stderr.contains(&missing),
        "{}",
        run.stderr
    );

    // A usage error is exit 2 too.
    let run = explain(&["--policy-dir", &policies, "--listeners", &good]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--namespace"), "{}", run.stderr);
}

#[test]
fn policies_may_be_one_file_or_come_from_the_environment() {
    let dir = workspace(&namespace_policy("PERMISSIVE", "true"));
    let file = fixtures_dir()
        .join("istio-1.19-permissive-istio-authz-testdata.json")
        .display()
        .to_string();
    let one_file = path(&dir, "policies/pa.yaml");
    let run = explain(&[
        "--policy-dir",
        &one_file,
        "--listeners",
        &file,
        "--namespace",
        "shop",
        "--output",
        "json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["policies"]["loaded"], 1);
    assert_eq!(json["decision"]["rewrites"], true);

    // As for serve: ALPN_XDS_POLICY_DIR and ALPN_XDS_ROOT_NAMESPACE stand in for the flags. With
    // `shop` as the root namespace, its policy is the mesh policy and its annotation is ignored.
    let output = Command::new(env!("CARGO_BIN_EXE_alpn-xds"))
        .args([
            "explain",
            "--listeners",
            &file,
            "--namespace",
            "shop",
            "--output",
            "json",
        ])
        .env("ALPN_XDS_POLICY_DIR", path(&dir, "policies"))
        .env("ALPN_XDS_ROOT_NAMESPACE", "shop")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["policies"]["root_namespace"], "shop");
    assert_eq!(json["decision"]["rewrites"], false);
    assert_eq!(json["policy"]["reports"][0]["kind"], "ignored_placement");
}
