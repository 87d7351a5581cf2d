//! What a platform team applies (`examples/kubernetes/`) agrees with the binary: every
//! manifest parses, names a real kind and API version, and the ports, probe paths, flags,
//! names and permissions line up with each other and with `alpn-xds serve`'s own flags and
//! defaults. And the TLS the Service promises on 15012 is what the binary serves with
//! `--tls-cert` and `--tls-key`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use alpn_xds::config::{Cli, Command};
use clap::{CommandFactory, Parser};
use serde::Deserialize;
use serde_json::Value;
use support::certs::TestPki;
use support::mesh::Mesh;
use support::relay::RelayProcess;
use support::tls_client::tls12_handshake;

/// The kinds the manifests may use, by API version: all served by Kubernetes 1.25+,
/// cert-manager 1.x, trust-manager, Istio 1.22+ or kustomize.
const KNOWN_KINDS: &[(&str, &str)] = &[
    ("v1", "ServiceAccount"),
    ("v1", "Service"),
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("trust.cert-manager.io/v1alpha1", "Bundle"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];

/// The sidecar-side example, which the platform kustomization does not apply.
const WORKLOAD_EXAMPLE: &str = "workload-example.yaml";

/// Every document of every manifest, by file name.
fn manifests() -> BTreeMap<String, Vec<Value>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("examples/kubernetes") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        assert!(name.ends_with(".yaml"), "{name}: only YAML belongs here");
        let text = std::fs::read_to_string(&path).expect("read");
        let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|document| {
                let yaml = serde_yaml_ng::Value::deserialize(document)
                    .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
                serde_json::to_value(yaml).expect("JSON-compatible")
            })
            .filter(|v| !v.is_null())
            .collect();
        assert!(!documents.is_empty(), "{name} is empty");
        files.insert(name, documents);
    }
    files
}

/// The one object of `kind` named `name` in the platform's manifests.
fn object<'a>(all: &'a BTreeMap<String, Vec<Value>>, kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = all
        .iter()
        .filter(|(file, _)| *file != WORKLOAD_EXAMPLE)
        .flat_map(|(_, docs)| docs)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name}");
    found[0]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_manifest_parses_with_a_real_kind() {
    let all = manifests();
    for (file, documents) in &all {
        for document in documents {
            let api_version = document["apiVersion"].as_str().unwrap_or_default();
            let kind = document["kind"].as_str().unwrap_or_default();
            assert!(
                KNOWN_KINDS.contains(&(api_version, kind)),
                "{file}: {api_version} {kind} is not a kind this deployment may use"
            );
            if kind != "Kustomization" {
                assert!(
                    document["metadata"]["name"].is_string(),
                    "{file}: {kind} without a name"
                );
            }
        }
    }

    // The kustomization applies every platform file, and nothing else.
    let kustomization = &all["kustomization.yaml"][0];
    let listed: BTreeSet<&str> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<&str> = all
        .keys()
        .map(String::as_str)
        .filter(|f| *f != "kustomization.yaml" && *f != WORKLOAD_EXAMPLE)
        .collect();
    assert_eq!(listed, present);
}

#[test]
fn the_deployment_agrees_with_the_binary() {
    let all = manifests();
    let deployment = object(&all, "Deployment", "alpn-xds");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(
        pod["metadata"]["annotations"]["sidecar.istio.io/inject"],
        "false"
    );
    let spec = &pod["spec"];
    let container = &spec["containers"][0];

    // The arguments are ones `alpn-xds` takes; every ALPN_XDS_* variable is one it reads.
    let mut argv = vec!["alpn-xds"];
    argv.extend(strings(&container["args"]));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Serve(args) = cli.command else {
        panic!("{argv:?} is not serve");
    };
    let known_env = known_env_names();
    for env in container["env"].as_array().expect("env") {
        let name = env["name"].as_str().expect("env name");
        assert!(known_env.contains(name), "{name} is not read by alpn-xds");
    }
    assert!(
        args.policy_dir.is_none(),
        "the Kubernetes API is the source"
    );
    assert_eq!(args.upstream, "https://istiod.istio-system.svc:15012");
    assert!(!args.plaintext);
    assert!(args.pod_labels && args.events);

    // Ports: the container's named ports are the ones the binary listens on.
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    assert_eq!(port("grpc-xds-tls"), u64::from(args.listen.port()));
    assert_eq!(port("http-admin"), u64::from(args.admin.port()));
    assert_eq!(args.listen.port(), 15012);

    // Probes: the admin endpoints, on the admin port.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "http-admin", "{probe}");
    }

    // Requests and limits, non-root, read-only root filesystem.
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][kind][resource].is_string(),
                "{kind}.{resource}"
            );
        }
    }
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert!(
        spec["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u > 0)
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );

    // TLS: the certificate and key come from the serving Certificate's secret.
    let certificate = object(&all, "Certificate", "alpn-xds-serving");
    let secret = certificate["spec"]["secretName"]
        .as_str()
        .expect("secretName");
    let volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["secret"]["secretName"] == secret)
        .expect("a volume of the serving secret");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the serving secret is mounted");
    let dir = mount["mountPath"].as_str().expect("mountPath");
    let cert = args.tls_cert.expect("--tls-cert");
    let key = args.tls_key.expect("--tls-key");
    assert_eq!(cert, Path::new(dir).join("tls.crt"));
    assert_eq!(key, Path::new(dir).join("tls.key"));

    // The upstream CA is the mesh root istiod publishes in every namespace.
    let upstream_ca = args.upstream_ca.expect("--upstream-ca");
    let ca_volume = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"] == "istio-ca-root-cert")
        .expect("a volume of istio-ca-root-cert");
    let ca_mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == ca_volume["name"])
        .expect("istio-ca-root-cert is mounted");
    let ca_dir = ca_mount["mountPath"].as_str().expect("mountPath");
    assert_eq!(upstream_ca, Path::new(ca_dir).join("root-cert.pem"));
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace > args.drain_window.as_secs(),
        "killed before the drain ends"
    );

    // The service account is the one the role is bound to.
    let account = spec["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    object(&all, "ServiceAccount", account);
    let binding = object(&all, "ClusterRoleBinding", "alpn-xds");
    assert_eq!(binding["subjects"][0]["name"], account);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        deployment["metadata"]["namespace"]
    );

    // The budget and the Service select these pods.
    let pdb = object(&all, "PodDisruptionBudget", "alpn-xds");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let service = object(&all, "Service", "alpn-xds");
    assert_eq!(service["spec"]["selector"], *labels);
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["port"], 15012);
    assert_eq!(service_port["targetPort"], "grpc-xds-tls");
}

/// Every `ALPN_XDS_*` variable `alpn-xds serve` reads: its flags' fallbacks and the log filter.
fn known_env_names() -> BTreeSet<String> {
    let command = Cli::command();
    let serve = command.find_subcommand("serve").expect("serve");
    let mut names: BTreeSet<String> = command
        .get_arguments()
        .chain(serve.get_arguments())
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.insert("ALPN_XDS_LOG".to_string());
    names
}

#[test]
fn the_role_grants_what_the_source_uses_and_no_more() {
    let all = manifests();
    let role = object(&all, "ClusterRole", "alpn-xds");
    let rules: Vec<(String, String, BTreeSet<String>)> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|rule| {
            let verbs: BTreeSet<String> = strings(&rule["verbs"])
                .iter()
                .map(|v| v.to_string())
                .collect();
            let groups = strings(&rule["apiGroups"]);
            let resources = strings(&rule["resources"]);
            groups
                .into_iter()
                .flat_map(move |g| resources.clone().into_iter().map(move |r| (g, r)))
                .map(move |(g, r)| (g.to_string(), r.to_string(), verbs.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let set = |verbs: &[&str]| verbs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    let expected = vec![
        (
            "security.istio.io".to_string(),
            "peerauthentications".to_string(),
            set(&["get", "list", "watch"]),
        ),
        (
            String::new(),
            "pods".to_string(),
            set(&["get", "list", "watch"]),
        ),
        (
            "events.k8s.io".to_string(),
            "events".to_string(),
            set(&["create", "patch"]),
        ),
    ];
    assert_eq!(rules, expected);
}

#[test]
fn the_sidecar_side_trusts_the_relay() {
    let all = manifests();
    let certificate = object(&all, "Certificate", "alpn-xds-serving");
    let dns_names = strings(&certificate["spec"]["dnsNames"]);
    let service = object(&all, "Service", "alpn-xds");
    let service_host = format!(
        "{}.{}.svc",
        service["metadata"]["name"].as_str().expect("name"),
        service["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
    );
    assert!(dns_names.contains(&service_host.as_str()), "{dns_names:?}");

    let workload = all[WORKLOAD_EXAMPLE]
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the workload example's Deployment");
    let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
    let proxy_config: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        annotations["proxy.istio.io/config"]
            .as_str()
            .expect("proxy.istio.io/config"),
    )
    .expect("proxy.istio.io/config is YAML");
    let proxy_config = serde_json::to_value(proxy_config).expect("JSON");

    // The discovery address is the Service's TLS port, under a name the certificate holds
    // (what Istio 1.11, without ISTIOD_SAN, checks).
    let address = proxy_config["discoveryAddress"]
        .as_str()
        .expect("discoveryAddress");
    assert_eq!(address, format!("{service_host}:15012"));
    let metadata = &proxy_config["proxyMetadata"];
    let san = metadata["ISTIOD_SAN"].as_str().expect("ISTIOD_SAN");
    assert!(dns_names.contains(&san), "{san} is not in {dns_names:?}");

    // XDS_ROOT_CA is a file of the mounted CA bundle, which trust-manager writes.
    let root_ca = metadata["XDS_ROOT_CA"].as_str().expect("XDS_ROOT_CA");
    let volume: Value = serde_json::from_str(
        annotations["sidecar.istio.io/userVolume"]
            .as_str()
            .expect("userVolume"),
    )
    .expect("userVolume is JSON");
    let mounts: Value = serde_json::from_str(
        annotations["sidecar.istio.io/userVolumeMount"]
            .as_str()
            .expect("userVolumeMount"),
    )
    .expect("userVolumeMount is JSON");
    let (name, mount) = mounts
        .as_object()
        .and_then(|m| m.iter().next())
        .expect("a mount");
    let config_map = volume[name]["configMap"]["name"]
        .as_str()
        .expect("a ConfigMap volume");
    let bundle = object(&all, "Bundle", config_map);
    let key = bundle["spec"]["target"]["configMap"]["key"]
        .as_str()
        .expect("target key");
    let mount_path = mount["mountPath"].as_str().expect("mountPath");
    assert_eq!(root_ca, format!("{mount_path}/{key}"));
    // The bundle carries the CA's certificate, from the secret the CA Certificate fills.
    let ca = object(&all, "Certificate", "alpn-xds-ca");
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(
        bundle["spec"]["sources"][0]["secret"]["name"],
        ca["spec"]["secretName"]
    );
    assert_eq!(bundle["spec"]["sources"][0]["secret"]["key"], "ca.crt");
    let namespace = all[WORKLOAD_EXAMPLE]
        .iter()
        .find(|d| d["kind"] == "Namespace")
        .expect("the workload's Namespace");
    for (label, value) in bundle["spec"]["target"]["namespaceSelector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(namespace["metadata"]["labels"][label], *value, "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_tls_with_the_given_certificate() {
    let mesh = Mesh::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &pki.server.cert_pem).expect("write cert");
    std::fs::write(&key, &pki.server.key_pem).expect("write key");
    let policies = tempfile::tempdir().expect("policy folder");
    let (cert, key) = (cert.to_str().expect("UTF-8"), key.to_str().expect("UTF-8"));
    let args = ["--tls-cert", cert, "--tls-key", key];
    let relay = RelayProcess::start_with(&mesh.upstream.url(), policies.path(), &args).await;

    // A client trusting the CA completes the handshake and gets gRPC's h2.
    let port = relay.listen().port();
    let alpn = tls12_handshake(&pki, port, None, &["h2"]).await;
    assert_eq!(
        alpn.expect("TLS handshake with the relay").as_deref(),
        Some("h2")
    );
    // One trusting another CA does not.
    let stranger = TestPki::new();
    let refused = tls12_handshake(&stranger, port, None, &["h2"]).await;
    assert!(refused.is_err(), "{refused:?}");
}
