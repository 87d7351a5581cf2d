//! One sidecar as the relay serves it: real Envoy (SotW or Delta) talking to `alpn-xds serve`,
//! which talks to the test upstream of a [`Mesh`], with a policy folder the test can edit while
//! everything runs. Also the checks every form shares: what Envoy runs, what istiod's stand-in
//! saw, and what `/debug/proxies` says about the proxy.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use alpn_xds::testkit::istio::{ALL_ISTIO_MTLS_ALPNS, VIRTUAL_INBOUND};
use alpn_xds::testkit::upstream::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL, Recording};
use serde_json::Value;

use super::envoy::{AdsApi, Bootstrap, Envoy, ListenerState};
use super::http::{ClientError, HttpReply};
use super::mesh::{CDS_VERSION, CONFIG_TIMEOUT, LDS_VERSION, Mesh};
use super::relay::RelayProcess;
use super::tls_client::tls_get;
use super::wait_until;

/// Every nonce the relay makes starts with this (the product's contract, written out here so
/// that the tests do not take it from the code they test).
pub const RELAY_NONCE_PREFIX: &str = "alpn-xds-";

/// Every version the relay makes holds istiod's version, this mark, and a tag of its own.
pub const VERSION_MARK: &str = "+alpn-xds.";

/// The standard ALPN values the relay appends to mTLS HTTP chains, in order.
pub const STANDARD_ALPNS: [&str; 3] = ["http/1.0", "http/1.1", "h2"];

/// How long a policy change may take to reach a running Envoy: file watch, the relay's own
/// push, Envoy's in-place filter chain update.
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(5);

/// Namespace `shop`, PERMISSIVE, asking for standard ALPNs.
pub const NAMESPACE_POLICY: &str = r#"
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
pub const WORKLOAD_POLICY: &str = r#"
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
pub struct Sidecar {
    // Fields drop in this order: Envoy, then the relay, then what the relay reads.
    pub envoy: Envoy,
    pub relay: RelayProcess,
    pub policies: tempfile::TempDir,
    pub mesh: Mesh,
    pub bootstrap: Bootstrap,
}

impl Sidecar {
    /// Writes `policies` (file name, YAML), starts the relay in front of a fresh [`Mesh`], then
    /// Envoy speaking `api`, and waits for the inbound listener.
    pub async fn start(api: AdsApi, policies: &[(&str, &str)]) -> Self {
        let sidecar = Self::launch(Mesh::start().await, api, policies).await;
        sidecar
            .envoy
            .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
            .await;
        sidecar
    }

    /// Like [`Sidecar::start`] on a given mesh, without waiting for anything but Envoy's admin.
    pub async fn launch(mesh: Mesh, api: AdsApi, policies: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("policies-")
            .tempdir()
            .expect("tempdir");
        for (name, yaml) in policies {
            write_policy(dir.path(), name, yaml);
        }
        let relay = RelayProcess::start(&mesh.upstream.url(), dir.path()).await;
        let mut bootstrap = Bootstrap::sidecar(relay.listen());
        bootstrap.api = api;
        let envoy = Envoy::start(&bootstrap).await;
        Self {
            envoy,
            relay,
            policies: dir,
            mesh,
            bootstrap,
        }
    }

    /// `GET` over mTLS with the client certificate, offering `alpn`, on `port`.
    pub async fn mtls(&self, port: u16, alpn: &str) -> Result<HttpReply, ClientError> {
        let pki = &self.mesh.pki;
        tls_get(pki, port, Some(&pki.client), &[alpn], &format!("/{alpn}")).await
    }

    /// Whether an `h2` mTLS client gets a 200 on the declared HTTP port (`Some(true)`), is
    /// refused in the handshake (`Some(false)`), or meets something else (`None`).
    pub async fn h2_accepted(&self) -> Option<bool> {
        match self.mtls(self.mesh.ports.http, "h2").await {
            Ok(reply) => {
                (reply.status == 200 && reply.alpn.as_deref() == Some("h2")).then_some(true)
            }
            Err(ClientError::Handshake(_)) => Some(false),
            Err(_) => None,
        }
    }

    /// The state of `virtualInbound` in Envoy's config dump.
    pub async fn inbound(&self) -> ListenerState {
        self.envoy
            .listener_state(VIRTUAL_INBOUND)
            .await
            .expect("Envoy knows virtualInbound")
    }

    /// The `application_protocols` of the declared HTTP port's mTLS chain, as Envoy runs it.
    pub async fn declared_mtls_alpns(&self) -> Vec<String> {
        let listener = self.inbound().await.active.expect("listener active");
        mtls_chain_alpns(&listener, self.mesh.ports.http)
    }

    /// Envoy accepted every update: the listener is active at the upstream's version (a Delta
    /// listener that the relay rewrote carries that version with the relay's mark), with no
    /// error state, and no LDS or CDS update was rejected.
    pub async fn assert_listener_accepted(&self) {
        let state = self.inbound().await;
        assert_eq!(
            state.error, None,
            "Envoy rejected an update of virtualInbound"
        );
        let version = state.active_version.unwrap_or_default();
        assert_eq!(istiod_version(&version), LDS_VERSION, "listener version");
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

    /// Waits for Envoy's ACKs of istiod's LDS and CDS responses to reach the upstream.
    pub async fn wait_upstream_acks(&self) {
        self.mesh
            .upstream
            .wait_for("Envoy's LDS and CDS ACKs", CONFIG_TIMEOUT, |r| {
                r.acked(LISTENER_TYPE_URL, LDS_VERSION) && r.acked(CLUSTER_TYPE_URL, CDS_VERSION)
            })
            .await
            .expect("Envoy's ACKs reach the upstream");
    }

    /// What istiod's stand-in saw on every stream: the sidecar's token and cluster id
    /// unchanged, the sidecar's node, no NACK, and nothing the relay made (see
    /// [`assert_nothing_of_the_relay`]).
    pub async fn assert_upstream_saw_only_the_sidecar(&self) {
        self.wait_upstream_acks().await;
        let recording = self.mesh.upstream.recording();
        for stream in &recording.streams {
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
        }
        assert_eq!(recording.nacks().count(), 0, "no NACK reached the upstream");
        assert_nothing_of_the_relay(&recording);
    }

    /// This proxy's entry in the relay's `/debug/proxies`: the newest stream of its node.
    pub async fn debug_proxy(&self) -> Value {
        match self.find_debug_proxy().await {
            Ok(proxy) => proxy,
            Err(proxies) => panic!("/debug/proxies does not name the node: {proxies}"),
        }
    }

    /// Like [`Sidecar::debug_proxy`], `None` while the proxy is not connected.
    pub async fn try_debug_proxy(&self) -> Option<Value> {
        self.find_debug_proxy().await.ok()
    }

    async fn find_debug_proxy(&self) -> Result<Value, Value> {
        let node: String =
            form_urlencoded::byte_serialize(self.bootstrap.node_id.as_bytes()).collect();
        let proxies = self
            .relay
            .admin_json(&format!("/debug/proxies?node={node}"))
            .await;
        proxies["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["node_id"] == self.bootstrap.node_id.as_str())
            .max_by_key(|p| p["stream_id"].as_u64())
            .cloned()
            .ok_or(proxies)
    }

    /// The `xds` value `/debug/proxies` shows for this sidecar's form.
    pub fn debug_form(&self) -> &'static str {
        match self.bootstrap.api {
            AdsApi::Sotw => "state_of_the_world",
            AdsApi::Delta => "delta",
        }
    }

    /// Writes a policy into the relay's folder.
    pub fn write_policy(&self, name: &str, yaml: &str) {
        write_policy(self.policies.path(), name, yaml);
    }

    /// Removes a policy from the relay's folder.
    pub fn remove_policy(&self, name: &str) {
        std::fs::remove_file(self.policies.path().join(name)).expect("remove policy");
    }
}

/// Asserts that no request the upstream received carries a nonce of the relay's making
/// (`alpn-xds-…`) or a version with the relay's mark (`+alpn-xds.`), in SotW `version_info` or
/// Delta `initial_resource_versions`, and that every version reported is one the upstream sent.
pub fn assert_nothing_of_the_relay(recording: &Recording) {
    let foreign: Vec<_> = recording
        .foreign_nonces()
        .iter()
        .map(|r| &r.request.response_nonce)
        .collect();
    assert!(
        foreign.is_empty(),
        "nonces the upstream never sent: {foreign:?}"
    );
    let sent_versions: BTreeSet<&str> = recording
        .responses
        .iter()
        .map(|r| r.response.version_info.as_str())
        .chain(
            recording
                .responses
                .iter()
                .filter_map(|r| r.delta.as_ref())
                .flat_map(|d| d.resources.iter().map(|r| r.version.as_str())),
        )
        .collect();
    for request in &recording.requests {
        let nonce = &request.request.response_nonce;
        assert!(
            !nonce.starts_with(RELAY_NONCE_PREFIX),
            "a relay nonce reached the upstream: {nonce}"
        );
        for version in request.versions() {
            assert!(
                !version.contains(VERSION_MARK),
                "a relay version reached the upstream: {version}"
            );
            assert!(
                sent_versions.contains(version),
                "a version the upstream never sent reached it: {version:?}"
            );
        }
    }
}

/// istiod's part of a version: everything before the relay's mark.
pub fn istiod_version(version: &str) -> &str {
    version
        .split_once(VERSION_MARK)
        .map_or(version, |(istiod, _)| istiod)
}

/// Writes a policy file in one step, so that the relay never reads half of it.
pub fn write_policy(dir: &Path, name: &str, yaml: &str) {
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, yaml).expect("write policy");
    std::fs::rename(&partial, dir.join(name)).expect("move policy in place");
}

/// The `application_protocols` of the chain matching `port` with `transport_protocol: tls`
/// and an Istio mTLS ALPN, in a listener as Envoy's config dump shows it.
pub fn mtls_chain_alpns(listener: &Value, port: u16) -> Vec<String> {
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

/// Istio's ALPNs followed by the standard ones: the declared chain once rewritten.
pub fn rewritten_alpns() -> Vec<&'static str> {
    ALL_ISTIO_MTLS_ALPNS
        .iter()
        .chain(&STANDARD_ALPNS)
        .copied()
        .collect()
}

/// Waits until an `h2` mTLS client on the declared port is accepted (`true`) or refused.
pub async fn wait_h2(sidecar: &Sidecar, accepted: bool, what: &str) {
    wait_until(what, POLICY_TIMEOUT, || async {
        (sidecar.h2_accepted().await == Some(accepted)).then_some(())
    })
    .await;
}
