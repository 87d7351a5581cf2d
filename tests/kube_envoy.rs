//! The Kubernetes source end to end: `alpn-xds serve` reads PeerAuthentication and pod labels
//! from a fake API server (through a kubeconfig, as `kubectl` would) and real Envoy takes
//! what the relay makes of them. A policy edited in the API, and a pod relabelled there,
//! change what the running Envoy accepts within seconds; the API server going away keeps the
//! last policies in force, and coming back loses none of the edits made meanwhile.

mod support;

use std::time::Duration;

use alpn_xds::testkit::istio::{ALL_ISTIO_MTLS_ALPNS, VIRTUAL_INBOUND};
use serde_json::{Value, json};
use support::envoy::{Bootstrap, Envoy};
use support::fake_kube::FakeKube;
use support::http::{ClientError, HttpReply};
use support::mesh::{CONFIG_TIMEOUT, Mesh};
use support::relay::RelayProcess;
use support::tls_client::tls_get;
use support::wait_until;

/// A sidecar of pod `shop/web-1` whose Envoy talks to a relay reading the fake API server.
struct Sidecar {
    // Fields drop in this order: Envoy, then the relay, then what the relay reads.
    envoy: Envoy,
    relay: RelayProcess,
    fake: FakeKube,
    mesh: Mesh,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts the relay on `fake` (ready once it has listed), then Envoy.
    async fn start(fake: FakeKube) -> Self {
        let mesh = Mesh::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = fake.write_kubeconfig(dir.path());
        let relay = RelayProcess::start_kube(&mesh.upstream.url(), &kubeconfig).await;
        let envoy = Envoy::start(&Bootstrap::sidecar(relay.listen())).await;
        envoy
            .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
            .await;
        Self {
            envoy,
            relay,
            fake,
            mesh,
            _dir: dir,
        }
    }

    /// `GET` over mTLS with the client certificate, offering `h2`, on the declared HTTP port.
    async fn h2(&self) -> Result<HttpReply, ClientError> {
        let pki = &self.mesh.pki;
        tls_get(pki, self.mesh.ports.http, Some(&pki.client), &["h2"], "/h2").await
    }

    /// Waits until the running Envoy's declared-port mTLS chain offers `h2` (or not), then
    /// checks that a real client sees the same.
    async fn wait_h2(&self, accepted: bool, why: &str) {
        wait_until(why, CONFIG_TIMEOUT, || async {
            let alpns = self.declared_mtls_alpns().await;
            (alpns.iter().any(|a| a == "h2") == accepted).then_some(())
        })
        .await;
        match self.h2().await {
            Ok(reply) if accepted => assert_eq!(reply.status, 200, "{why}: {reply:?}"),
            Err(ClientError::Handshake(_)) if !accepted => {}
            other => panic!("{why}: h2 should be {accepted}: {other:?}"),
        }
    }

    async fn declared_mtls_alpns(&self) -> Vec<String> {
        let Some(state) = self.envoy.listener_state(VIRTUAL_INBOUND).await else {
            return Vec::new();
        };
        state
            .active
            .map(|listener| mtls_chain_alpns(&listener, self.mesh.ports.http))
            .unwrap_or_default()
    }

    /// Envoy took every update the relay sent.
    async fn assert_nothing_rejected(&self) {
        let state = self
            .envoy
            .listener_state(VIRTUAL_INBOUND)
            .await
            .expect("listener known");
        assert_eq!(
            state.error, None,
            "Envoy rejected an update of virtualInbound"
        );
        assert_eq!(
            self.envoy
                .stat("listener_manager.lds.update_rejected")
                .await,
            Some(0)
        );
    }
}

fn namespace_policy(value: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "shop",
                     "annotations": {"http-alpns.aspenmesh.io": value}},
        "spec": {"mtls": {"mode": "PERMISSIVE"}},
    })
}

/// `tier=locked` workloads of `shop` refuse the standard ALPNs.
fn locked_tier_policy() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "locked", "namespace": "shop",
                     "annotations": {"http-alpns.aspenmesh.io": "false"}},
        "spec": {"selector": {"matchLabels": {"tier": "locked"}}, "mtls": {"mode": "PERMISSIVE"}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_in_the_api_reach_a_connected_envoy() {
    let fake = FakeKube::start(&["v1", "v1beta1"]).await;
    fake.apply_policy(namespace_policy("false"));
    fake.apply_pod("shop", "web-1", &[("app", "web"), ("version", "v1")]);
    let sidecar = Sidecar::start(fake).await;
    assert_eq!(sidecar.declared_mtls_alpns().await, ALL_ISTIO_MTLS_ALPNS);
    sidecar.wait_h2(false, "the namespace says false").await;

    // The platform team turns it on in the API; istiod would push nothing for that.
    sidecar.fake.apply_policy(namespace_policy("true"));
    sidecar
        .wait_h2(true, "the edit to true reaches Envoy")
        .await;

    // The API server goes away: the relay stays ready and keeps the last policies.
    sidecar.fake.stop().await;
    sidecar.fake.apply_policy(namespace_policy("false"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = sidecar.relay.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let h2 = sidecar.h2().await.expect("h2 while the API server is away");
    assert_eq!(h2.status, 200, "{h2:?}");

    // It comes back: the edit made while it was away arrives.
    sidecar.fake.restart().await;
    sidecar
        .wait_h2(false, "the edit made while away reaches Envoy")
        .await;
    sidecar.assert_nothing_rejected().await;
    let policies = sidecar.relay.admin_json("/debug/policies").await;
    assert!(
        policies["origin"]
            .as_str()
            .unwrap_or_default()
            .contains("security.istio.io/v1 "),
        "{policies}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relabelled_pod_changes_what_envoy_accepts() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    fake.apply_policy(namespace_policy("true"));
    fake.apply_policy(locked_tier_policy());
    fake.apply_pod("shop", "web-1", &[("app", "web"), ("version", "v1")]);
    fake.apply_pod("other", "db-0", &[("app", "db")]);
    let sidecar = Sidecar::start(fake).await;
    sidecar
        .wait_h2(true, "web-1 is not in the locked tier")
        .await;

    // Relabelled into the locked tier (its node metadata still says app=web, version=v1).
    sidecar.fake.apply_pod(
        "shop",
        "web-1",
        &[("app", "web"), ("version", "v1"), ("tier", "locked")],
    );
    sidecar
        .wait_h2(false, "the relabelled pod refuses h2")
        .await;

    sidecar
        .fake
        .apply_pod("shop", "web-1", &[("app", "web"), ("version", "v1")]);
    sidecar.wait_h2(true, "relabelled back").await;
    sidecar.assert_nothing_rejected().await;

    // Only the connected proxy's namespace was watched, metadata only.
    let pod_requests: Vec<_> = sidecar
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("pods"))
        .collect();
    assert!(!pod_requests.is_empty());
    for request in &pod_requests {
        assert_eq!(request.path, "/api/v1/namespaces/shop/pods", "{request:?}");
        assert!(
            request.accept.contains("as=PartialObjectMetadata"),
            "{request:?}"
        );
    }
}

/// The `application_protocols` of the chain matching `port` with `transport_protocol: tls`
/// and an Istio mTLS ALPN, in a listener as Envoy's config dump shows it.
fn mtls_chain_alpns(listener: &Value, port: u16) -> Vec<String> {
    let chains = listener["filter_chains"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    chains
        .iter()
        .find_map(|chain| {
            let m = &chain["filter_chain_match"];
            let alpns: Vec<String> = m["application_protocols"]
                .as_array()?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            let mtls = alpns.iter().any(|a| a.starts_with("istio"));
            (m["destination_port"] == u64::from(port) && m["transport_protocol"] == "tls" && mtls)
                .then_some(alpns)
        })
        .unwrap_or_default()
}
