//! The real-Envoy scenarios that both ADS forms must pass, written once: the tests of each form
//! (`tests/envoy_relay.rs` for state of the world, `tests/envoy_delta.rs` for Delta) call them
//! with their form.

use alpn_xds::testkit::istio::ALL_ISTIO_MTLS_ALPNS;
use alpn_xds::testkit::upstream::{AdsForm, LISTENER_TYPE_URL};
use serde_json::Value;

use super::envoy::AdsApi;
use super::http::ClientError;
use super::mesh::{BACKEND_NAME, CONFIG_TIMEOUT, LDS_VERSION};
use super::sidecar::{
    NAMESPACE_POLICY, Sidecar, VERSION_MARK, WORKLOAD_POLICY, assert_nothing_of_the_relay,
    istiod_version, rewritten_alpns, wait_h2,
};
use super::tls_client::tls12_handshake;
use super::{http, loopback, wait_until};

/// With the namespace asking for standard ALPNs: `h2` and `http/1.1` mTLS clients without a
/// sidecar get 200 from the backend on the declared HTTP port, a sidecar's `istio-http/1.1`
/// still does, so do `h2` on the passthrough and plaintext; a client without certificate does
/// not. Envoy accepted everything, istiod's stand-in saw only the sidecar, and `/debug/proxies`
/// shows the proxy's form, istiod's LDS push, and Envoy's ACK of it.
pub async fn standard_alpns_reach_the_backend(api: AdsApi) {
    let sidecar = Sidecar::start(api, &[("shop.yaml", NAMESPACE_POLICY)]).await;
    let ports = sidecar.mesh.ports;

    // The relay appended the standard ALPNs to the declared port's mTLS chain, and Envoy took it.
    assert_eq!(sidecar.declared_mtls_alpns().await, rewritten_alpns());
    sidecar.assert_listener_accepted().await;
    assert_listener_version(&sidecar, api).await;

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

    // Nothing was rejected, istiod's stand-in saw only the sidecar on one stream of its form.
    sidecar.assert_listener_accepted().await;
    sidecar.assert_upstream_saw_only_the_sidecar().await;
    let recording = sidecar.mesh.upstream.recording();
    assert_eq!(
        recording.streams.len(),
        1,
        "one upstream stream per Envoy stream"
    );
    assert_eq!(recording.streams[0].form, upstream_form(api));

    // The relay shows the proxy, its form, istiod's LDS push and Envoy's ACK of it.
    let proxy = wait_lds_answered(&sidecar).await;
    assert_eq!(proxy["xds"], sidecar.debug_form(), "{proxy}");
    let push = &proxy["last_push"][LISTENER_TYPE_URL];
    assert_eq!(push["origin"], "istiod", "{proxy}");
    assert_eq!(push["version"], LDS_VERSION, "{proxy}");
    let answer = &proxy["acks"][LISTENER_TYPE_URL];
    assert_eq!(answer["nack"], Value::Null, "{proxy}");
    assert_eq!(proxy["rewrite_rejected"], Value::Null, "{proxy}");
    assert!(
        proxy["rewritten_chains"]
            .as_array()
            .is_some_and(|chains| !chains.is_empty()),
        "/debug/proxies names the rewritten chains: {proxy}"
    );
}

/// A workload-level policy saying `"false"` keeps `h2` out although the namespace says
/// `"true"`; Istio's own clients and plaintext still get through.
pub async fn workload_false_keeps_h2_out(api: AdsApi) {
    let policies = [
        ("shop.yaml", NAMESPACE_POLICY),
        ("web.yaml", WORKLOAD_POLICY),
    ];
    let sidecar = Sidecar::start(api, &policies).await;
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

/// While Envoy is connected and istiod's stand-in sends nothing more, toggling the annotation
/// in the policy folder turns the `h2` mTLS client from accepted to refused and back within
/// [`super::sidecar::POLICY_TIMEOUT`] each way. Both pushes are the relay's own: Envoy's config
/// dump shows the relay's version, `/debug/proxies` shows the relay as the origin of the last
/// LDS push and Envoy's ACK of it, and the upstream sent nothing and saw nothing of them.
pub async fn policy_toggles_both_ways_without_istiod(api: AdsApi) {
    let sidecar = Sidecar::start(api, &[("shop.yaml", NAMESPACE_POLICY)]).await;
    wait_h2(&sidecar, true, "h2 accepted before any change").await;
    sidecar.wait_upstream_acks().await;
    let responses_before = sidecar.mesh.upstream.recording().responses.len();

    // The workload opts out; istiod pushes nothing for such a change.
    sidecar.write_policy("web.yaml", WORKLOAD_POLICY);
    wait_h2(&sidecar, false, "h2 refused after the workload opted out").await;
    assert_eq!(sidecar.declared_mtls_alpns().await, ALL_ISTIO_MTLS_ALPNS);
    let after_opt_out = assert_relay_push_acked(&sidecar).await;

    // The opt-out goes away: h2 is back.
    sidecar.remove_policy("web.yaml");
    wait_h2(
        &sidecar,
        true,
        "h2 accepted again after the opt-out went away",
    )
    .await;
    assert_eq!(sidecar.declared_mtls_alpns().await, rewritten_alpns());
    let after_opt_in = assert_relay_push_acked(&sidecar).await;
    assert_ne!(after_opt_out, after_opt_in, "two pushes of the relay");

    // Istio's own clients kept working, Envoy took both pushes, the upstream sent nothing new.
    let mesh_client = sidecar
        .mtls(sidecar.mesh.ports.http, "istio-http/1.1")
        .await
        .expect("istio-http/1.1");
    assert_eq!(mesh_client.status, 200, "{mesh_client:?}");
    sidecar.assert_listener_accepted().await;
    assert_eq!(
        sidecar.mesh.upstream.recording().responses.len(),
        responses_before,
        "the upstream sent nothing during the toggles"
    );
    sidecar.assert_upstream_saw_only_the_sidecar().await;

    // Envoy's config dump shows versions of the relay's making. The LDS version is the last
    // response's (SotW `version_info`, Delta `system_version_info`): the relay's push. A
    // listener keeps the version it was added with through filter-chain-only updates: istiod's
    // in SotW, and in Delta the version the relay gave the rewritten resource.
    let lds = sidecar.envoy.lds_version().await.unwrap_or_default();
    assert!(lds.contains(VERSION_MARK), "LDS version {lds:?}");
    assert_eq!(istiod_version(&lds), LDS_VERSION);
    assert_listener_version(&sidecar, api).await;
}

/// The active listener's version: istiod's in SotW; in Delta, istiod's with the relay's mark
/// (the relay rewrote it from the start).
pub async fn assert_listener_version(sidecar: &Sidecar, api: AdsApi) {
    let version = sidecar.inbound().await.active_version.unwrap_or_default();
    match api {
        AdsApi::Sotw => assert_eq!(version, LDS_VERSION),
        AdsApi::Delta => {
            assert!(
                version.contains(VERSION_MARK),
                "listener version {version:?}"
            );
            assert_eq!(istiod_version(&version), LDS_VERSION);
        }
    }
}

/// The test upstream never sees a relay nonce or a relay version, even when Envoy reconnects
/// holding versions of the relay's making: when istiod's stand-in ends its streams, Envoy comes
/// back through the relay reporting what it holds (SotW `version_info`, Delta
/// `initial_resource_versions`), and those arrive upstream as istiod's own versions.
pub async fn reconnect_reports_istiod_versions_upstream(api: AdsApi) {
    let policies = [
        ("shop.yaml", NAMESPACE_POLICY),
        ("web.yaml", WORKLOAD_POLICY),
    ];
    let sidecar = Sidecar::start(api, &policies).await;
    sidecar.wait_upstream_acks().await;

    // A relay push that rewrites the listener, so that Envoy holds the relay's versions: the
    // version of the LDS response in SotW, the listener resource's version in Delta.
    sidecar.remove_policy("web.yaml");
    wait_h2(&sidecar, true, "h2 accepted after the opt-out went away").await;
    assert_relay_push_acked(&sidecar).await;
    let held = sidecar.envoy.lds_version().await.unwrap_or_default();
    assert!(held.contains(VERSION_MARK), "Envoy's LDS version {held:?}");

    // istiod goes away and comes back; Envoy reconnects through the relay.
    sidecar.mesh.upstream.close_streams();
    let upstream = &sidecar.mesh.upstream;
    upstream
        .wait_for("Envoy's LDS request on a new stream", CONFIG_TIMEOUT, |r| {
            r.streams.len() == 2 && r.requests_of(LISTENER_TYPE_URL).any(|q| q.stream == 2)
        })
        .await
        .expect("Envoy reconnects");
    let recording = upstream.recording();
    let reconnect = recording
        .requests_of(LISTENER_TYPE_URL)
        .find(|q| q.stream == 2)
        .expect("checked above");
    match api {
        AdsApi::Sotw => assert_eq!(reconnect.request.version_info, LDS_VERSION),
        AdsApi::Delta => {
            let delta = reconnect.delta.as_ref().expect("a Delta request");
            let versions = &delta.initial_resource_versions;
            assert_eq!(
                versions.get("virtualInbound").map(String::as_str),
                Some(LDS_VERSION),
                "initial_resource_versions: {versions:?}"
            );
        }
    }

    // After the reconnect the policy still holds, and nothing of the relay went upstream.
    sidecar.wait_upstream_acks().await;
    wait_h2(&sidecar, true, "h2 still accepted after the reconnect").await;
    sidecar.assert_listener_accepted().await;
    assert_nothing_of_the_relay(&upstream.recording());
    sidecar.assert_upstream_saw_only_the_sidecar().await;
}

/// Waits until `/debug/proxies` shows Envoy's answer (ACK or NACK) to the last LDS push, and
/// returns the proxy.
pub async fn wait_lds_answered(sidecar: &Sidecar) -> Value {
    wait_until(
        "Envoy's answer to the last LDS push",
        CONFIG_TIMEOUT,
        || async { sidecar.try_debug_proxy().await.filter(lds_answered) },
    )
    .await
}

/// Whether a `/debug/proxies` entry shows Envoy's answer to the last LDS push.
pub fn lds_answered(proxy: &Value) -> bool {
    let pushed = &proxy["last_push"][LISTENER_TYPE_URL]["nonce"];
    !pushed.is_null() && proxy["acks"][LISTENER_TYPE_URL]["nonce"] == *pushed
}

/// Asserts that the last LDS push was the relay's own and that Envoy acknowledged it; returns
/// its nonce.
pub async fn assert_relay_push_acked(sidecar: &Sidecar) -> String {
    let proxy = wait_lds_answered(sidecar).await;
    assert_eq!(proxy["xds"], sidecar.debug_form(), "{proxy}");
    let push = &proxy["last_push"][LISTENER_TYPE_URL];
    assert_eq!(push["origin"], "relay", "{proxy}");
    let nonce = push["nonce"].as_str().unwrap_or_default().to_owned();
    assert!(nonce.starts_with("alpn-xds-"), "relay nonce {nonce:?}");
    assert_eq!(
        proxy["acks"][LISTENER_TYPE_URL]["nack"],
        Value::Null,
        "Envoy rejected the relay's push: {proxy}"
    );
    nonce
}

/// The upstream's name for a form.
pub fn upstream_form(api: AdsApi) -> AdsForm {
    match api {
        AdsApi::Sotw => AdsForm::Sotw,
        AdsApi::Delta => AdsForm::Delta,
    }
}
