//! The product on real input: real Envoy gets its configuration through `alpn-xds serve` from
//! a test upstream serving an Istio-shaped PERMISSIVE `virtualInbound`. With
//! `http-alpns.aspenmesh.io: "true"` on the namespace's PeerAuthentication, mTLS clients without
//! a sidecar reach the application offering `h2` or `http/1.1`; sidecar-style and plaintext
//! clients still do; clients without a certificate still do not. A workload-level policy saying
//! `"false"` keeps `h2` out, whether it is there from the start or added while Envoy runs.

mod support;

use std::path::Path;

use alpn_xds::testkit::istio::{ALL_ISTIO_MTLS_ALPNS, VIRTUAL_INBOUND};
use alpn_xds::testkit::upstream::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL};
use serde_json::Value;
use support::envoy::{Bootstrap, Envoy};
use support::http::{ClientError, HttpReply};
use support::mesh::{BACKEND_NAME, CDS_VERSION, CONFIG_TIMEOUT, LDS_VERSION, Mesh};
use support::relay::RelayProcess;
use support::tls_client::{tls_get, tls12_handshake};
use support::{http, loopback, wait_until};

/// The standard ALPN values the relay appends to mTLS HTTP chains, in order.
const STANDARD_ALPNS: [&str; 3] = ["http/1.0", "http/1.1", "h2"];

/// Namespace `shop`, PERMISSIVE, asking for standard ALPNs.
const NAMESPACE_POLICY: &str = r#"
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

/// The `app=web` workload of `shop`, PERMISSIVE, refusing standard ALPNs.
const WORKLOAD_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: web
  namespace: shop
  annotations:
    http-alpns.aspenmesh.io: "false"
spec:
  selector:
    matchLabels:
      app: web
  mtls:
    mode: PERMISSIVE
"#;

/// A sidecar whose Envoy talks to the relay, which talks to the test upstream.
struct Sidecar {
    // Fields drop in this order: Envoy, then the relay, then what the relay reads.
    envoy: Envoy,
    relay: RelayProcess,
    policies: tempfile::TempDir,
    mesh: Mesh,
    bootstrap: Bootstrap,
}

impl Sidecar {
    /// Writes `policies` (file name, YAML), starts the relay, then Envoy, and waits for the
    /// inbound listener.
    async fn start(policies: &[(&str, &str)]) -> Self {
        let mesh = Mesh::start().await;
        let dir = tempfile::Builder::new()
            .prefix("policies-")
            .tempdir()
            .expect("tempdir");
        for (name, yaml) in policies {
            write_policy(dir.path(), name, yaml);
        }
        let relay = RelayProcess::start(&mesh.upstream.url(), dir.path()).await;
        let bootstrap = Bootstrap::sidecar(relay.listen());
        let envoy = Envoy::start(&bootstrap).await;
        envoy
            .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
            .await;
        Self {
            envoy,
            relay,
            policies: dir,
            mesh,
            bootstrap,
        }
    }

    /// `GET` over mTLS with the client certificate, offering `alpn`, on `port`.
    async fn mtls(&self, port: u16, alpn: &str) -> Result<HttpReply, ClientError> {
        let pki = &self.mesh.pki;
        tls_get(pki, port, Some(&pki.client), &[alpn], &format!("/{alpn}")).await
    }

    /// The `application_protocols` of the declared HTTP port's mTLS chain, as Envoy runs it.
    async fn declared_mtls_alpns(&self) -> Vec<String> {
        let state = self
            .envoy
            .listener_state(VIRTUAL_INBOUND)
            .await
            .expect("listener known");
        let listener = state.active.expect("listener active");
        mtls_chain_alpns(&listener, self.mesh.ports.http)
    }

    /// Envoy accepted every update: the listener is active at the upstream's version, with no
    /// error state, and no LDS update was rejected.
    async fn assert_listener_accepted(&self) {
        let state = self
            .envoy
            .listener_state(VIRTUAL_INBOUND)
            .await
            .expect("listener known");
        assert_eq!(
            state.error, None,
            "Envoy rejected an update of virtualInbound"
        );
        assert_eq!(state.active_version.as_deref(), Some(LDS_VERSION));
        assert_eq!(self.envoy.lds_version().await.as_deref(), Some(LDS_VERSION));
        assert_eq!(
            self.envoy
                .stat("listener_manager.lds.update_rejected")
                .await,
            Some(0)
        );
        assert_eq!(
            self.envoy.stat("cluster_manager.cds.update_rejected").await,
            Some(0)
        );
    }

    /// What istiod's stand-in saw: one stream, the sidecar's token and cluster id unchanged,
    /// the sidecar's node, ACKs of its versions, and nothing the relay made.
    async fn assert_upstream_saw_only_the_sidecar(&self) {
        let upstream = &self.mesh.upstream;
        upstream
            .wait_for("Envoy's LDS and CDS ACKs", CONFIG_TIMEOUT, |r| {
                r.acked(LISTENER_TYPE_URL, LDS_VERSION) && r.acked(CLUSTER_TYPE_URL, CDS_VERSION)
            })
            .await
            .expect("Envoy's ACKs reach the upstream");

        let recording = upstream.recording();
        assert_eq!(
            recording.streams.len(),
            1,
            "one upstream stream per Envoy stream"
        );
        let stream = &recording.streams[0];
        for (key, value) in &self.bootstrap.initial_metadata {
            let got = stream
                .metadata
                .get(key.as_str())
                .and_then(|v| v.to_str().ok());
            assert_eq!(
                got,
                Some(value.as_str()),
                "metadata {key} reached the upstream"
            );
        }
        let node = stream
            .node
            .as_ref()
            .expect("the first request carried the node");
        assert_eq!(node.id, self.bootstrap.node_id);
        assert_eq!(recording.nacks().count(), 0, "no NACK reached the upstream");
        let foreign: Vec<_> = recording
            .foreign_nonces()
            .iter()
            .map(|r| &r.request.response_nonce)
            .collect();
        assert!(
            foreign.is_empty(),
            "nonces the upstream never sent: {foreign:?}"
        );
        for request in &recording.requests {
            let version = request.request.version_info.as_str();
            assert!(
                ["", LDS_VERSION, CDS_VERSION].contains(&version),
                "a version the upstream never sent reached it: {version:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_alpns_reach_the_backend_when_the_namespace_asks() {
    let sidecar = Sidecar::start(&[("shop.yaml", NAMESPACE_POLICY)]).await;
    let ports = sidecar.mesh.ports;

    // The relay appended the standard ALPNs to the declared port's mTLS chain, and Envoy took it.
    let alpns = sidecar.declared_mtls_alpns().await;
    let expected: Vec<&str> = ALL_ISTIO_MTLS_ALPNS
        .iter()
        .chain(&STANDARD_ALPNS)
        .copied()
        .collect();
    assert_eq!(alpns, expected);
    sidecar.assert_listener_accepted().await;

    // mTLS clients without a sidecar, on the declared HTTP port.
    let h2 = sidecar
        .mtls(ports.http, "h2")
        .await
        .expect("h2 mTLS on the declared port");
    assert_eq!((h2.status, h2.alpn.as_deref()), (200, Some("h2")), "{h2:?}");
    assert_eq!(h2.version, ::http::Version::HTTP_2);
    assert!(h2.body.starts_with(BACKEND_NAME), "{h2:?}");
    let declared_tls = ports.declared_chain("tls");
    assert_eq!(h2.chain(), Some(declared_tls.as_str()), "{h2:?}");
    let h1 = sidecar
        .mtls(ports.http, "http/1.1")
        .await
        .expect("http/1.1 mTLS");
    assert_eq!(
        (h1.status, h1.alpn.as_deref()),
        (200, Some("http/1.1")),
        "{h1:?}"
    );
    assert_eq!(h1.version, ::http::Version::HTTP_11);
    assert_eq!(h1.chain(), Some(declared_tls.as_str()), "{h1:?}");

    // A sidecar's own ALPN still works, and so does the passthrough for h2.
    let mesh_client = sidecar
        .mtls(ports.http, "istio-http/1.1")
        .await
        .expect("istio-http/1.1");
    assert_eq!(
        (mesh_client.status, mesh_client.alpn.as_deref()),
        (200, None),
        "{mesh_client:?}"
    );
    let sniffed = sidecar
        .mtls(ports.passthrough, "h2")
        .await
        .expect("h2 on the passthrough");
    assert_eq!(
        (sniffed.status, sniffed.alpn.as_deref()),
        (200, Some("h2")),
        "{sniffed:?}"
    );
    let passthrough_tls = ports.passthrough_chain("tls");
    assert_eq!(
        sniffed.chain(),
        Some(passthrough_tls.as_str()),
        "{sniffed:?}"
    );

    // Plaintext still gets through; no certificate still means no connection.
    for port in [ports.http, ports.passthrough] {
        let plain = http::get(loopback(port), "/plain")
            .await
            .expect("plaintext request");
        assert_eq!(plain.status, 200, "plaintext on port {port}: {plain:?}");
    }
    let pki = &sidecar.mesh.pki;
    let anonymous = tls12_handshake(pki, ports.http, None, &["h2"]).await;
    assert!(
        matches!(anonymous, Err(ClientError::TlsAlert(_))),
        "a client without certificate: {anonymous:?}"
    );

    // Nothing was rejected, istiod's stand-in saw only the sidecar, the relay knows the proxy.
    sidecar.assert_listener_accepted().await;
    sidecar.assert_upstream_saw_only_the_sidecar().await;
    let proxies = sidecar.relay.admin_json("/debug/proxies").await;
    assert!(
        names_node(&proxies, &sidecar.bootstrap.node_id),
        "/debug/proxies does not name the node: {proxies}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_policy_false_keeps_h2_out() {
    let policies = [
        ("shop.yaml", NAMESPACE_POLICY),
        ("web.yaml", WORKLOAD_POLICY),
    ];
    let sidecar = Sidecar::start(&policies).await;
    let ports = sidecar.mesh.ports;

    assert_eq!(sidecar.declared_mtls_alpns().await, ALL_ISTIO_MTLS_ALPNS);
    let refused = sidecar.mtls(ports.http, "h2").await;
    match refused {
        Err(error) => assert!(matches!(error, ClientError::Handshake(_)), "{error}"),
        Ok(reply) => panic!("h2 got through although the workload says false: {reply:?}"),
    }
    let mesh_client = sidecar
        .mtls(ports.http, "istio-http/1.1")
        .await
        .expect("istio-http/1.1");
    assert_eq!(mesh_client.status, 200, "{mesh_client:?}");
    let plain = http::get(loopback(ports.http), "/plain")
        .await
        .expect("plaintext request");
    assert_eq!(plain.status, 200, "{plain:?}");

    sidecar.assert_listener_accepted().await;
    sidecar.assert_upstream_saw_only_the_sidecar().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_reaches_a_running_envoy_without_istiod() {
    let sidecar = Sidecar::start(&[("shop.yaml", NAMESPACE_POLICY)]).await;
    let ports = sidecar.mesh.ports;
    let h2 = sidecar
        .mtls(ports.http, "h2")
        .await
        .expect("h2 before the change");
    assert_eq!(h2.status, 200, "{h2:?}");
    let responses_before = sidecar.mesh.upstream.recording().responses.len();

    // The workload opts out while Envoy runs; istiod pushes nothing for such a change.
    write_policy(sidecar.policies.path(), "web.yaml", WORKLOAD_POLICY);
    wait_until(
        "the relay's push to take h2 off the chain",
        CONFIG_TIMEOUT,
        || async {
            let alpns = sidecar.declared_mtls_alpns().await;
            (alpns == ALL_ISTIO_MTLS_ALPNS).then_some(())
        },
    )
    .await;
    let refused = sidecar.mtls(ports.http, "h2").await;
    assert!(
        matches!(refused, Err(ClientError::Handshake(_))),
        "h2 after the workload opted out: {refused:?}"
    );
    let mesh_client = sidecar
        .mtls(ports.http, "istio-http/1.1")
        .await
        .expect("istio-http/1.1");
    assert_eq!(mesh_client.status, 200, "{mesh_client:?}");

    // The push was the relay's own: the upstream sent nothing new and saw nothing of it.
    assert_eq!(
        sidecar.mesh.upstream.recording().responses.len(),
        responses_before
    );
    let state = sidecar
        .envoy
        .listener_state(VIRTUAL_INBOUND)
        .await
        .expect("listener known");
    assert_eq!(state.error, None, "Envoy rejected the relay's push");
    assert_eq!(
        sidecar
            .envoy
            .stat("listener_manager.lds.update_rejected")
            .await,
        Some(0)
    );
    sidecar.assert_upstream_saw_only_the_sidecar().await;
}

/// Writes a policy file in one step, so that the relay never reads half of it.
fn write_policy(dir: &Path, name: &str, yaml: &str) {
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, yaml).expect("write policy");
    std::fs::rename(&partial, dir.join(name)).expect("move policy in place");
}

/// The `application_protocols` of the chain matching `port` with `transport_protocol: tls`
/// and an Istio mTLS ALPN, in a listener as Envoy's config dump shows it.
fn mtls_chain_alpns(listener: &Value, port: u16) -> Vec<String> {
    let chains = listener["filter_chains"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut matching = chains.iter().filter_map(|chain| {
        let m = &chain["filter_chain_match"];
        let alpns: Vec<String> = m["application_protocols"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let mtls = alpns.iter().any(|a| a.starts_with("istio"));
        (m["destination_port"] == u64::from(port) && m["transport_protocol"] == "tls" && mtls)
            .then_some(alpns)
    });
    let alpns = matching.next().expect("an mTLS chain on the declared port");
    assert!(
        matching.next().is_none(),
        "one mTLS chain on the declared port"
    );
    alpns
}

/// Whether any value in `json` is the string `node_id`.
fn names_node(json: &Value, node_id: &str) -> bool {
    match json {
        Value::String(s) => s == node_id,
        Value::Array(items) => items.iter().any(|v| names_node(v, node_id)),
        Value::Object(map) => map.values().any(|v| names_node(v, node_id)),
        _ => false,
    }
}
