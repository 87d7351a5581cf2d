//! When Envoy rejects a listener the relay rewrote, the relay falls back to istiod's listeners
//! unchanged, and istiod never hears of the rejection; only when Envoy rejects istiod's own
//! listeners too does istiod see it. Real Envoy does the rejecting, in both ADS forms.
//!
//! How a real rejection of the rewrite is provoked: the relay checks a rewritten listener for
//! chains that would claim the same ALPN on the same match, keying destination CIDRs the way it
//! reads Envoy's `CidrRange` handling. A scoped IPv6 prefix (`fe80::1%1/64`) does not parse as
//! an address in the relay, which then compares it as written; Envoy parses it, truncates it to
//! its prefix length, drops the scope, and files it under `fe80::/64`. The upstream serves the
//! sidecar's listener with two extra chains on a port of their own: a copy of the declared
//! port's mTLS HTTP chain matching `fe80::1%1/64`, and a TLS chain matching `fe80::/64` that
//! claims `h2`. Envoy accepts that listener as istiod sends it (the mTLS chain lists only
//! Istio's ALPNs), and rejects it once the relay has appended `h2` to the mTLS chain
//! ("multiple filter chains with overlapping matching rules"), which the relay's check did not
//! see coming. The chains match only link-local IPv6, so the declared port serves as usual.
//!
//! That blind spot is a gap in the relay's check (DESIGN: the relay never sends a listener Envoy
//! would reject because of the rewrite). The only rejection a rewrite can cause is such an
//! overlap, so every real provocation of the fallback rests on some gap of this kind: once the
//! check keys scoped prefixes as Envoy does, these tests need another one, and say so when
//! Envoy no longer rejects anything.

mod support;

use alpn_xds::testkit::istio::{ALL_ISTIO_MTLS_ALPNS, VIRTUAL_INBOUND};
use alpn_xds::testkit::upstream::{LISTENER_TYPE_URL, Recording, RequestKind};
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use envoy_types::pb::google::protobuf::UInt32Value;
use serde_json::Value;
use support::envoy::AdsApi;
use support::mesh::{CONFIG_TIMEOUT, InboundPorts, LDS_VERSION, Mesh};
use support::scenarios::lds_answered;
use support::sidecar::{NAMESPACE_POLICY, Sidecar, assert_nothing_of_the_relay};
use support::{free_ports, wait_until};

/// Envoy's count of rejected LDS responses.
const REJECTED_STAT: &str = "listener_manager.lds.update_rejected";

/// The version under which istiod's stand-in pushes the same listeners again.
const REPUSH_VERSION: &str = "2025-01-01T00:00:00Z/2";

/// What Envoy says when two chains end up on one match.
const OVERLAP: &str = "overlapping matching rules";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rewrite_falls_back_to_istiods_listeners_sotw() {
    rejected_rewrite_falls_back(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rewrite_falls_back_to_istiods_listeners_delta() {
    rejected_rewrite_falls_back(AdsApi::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rewrite_is_not_sent_again_sotw() {
    rejected_rewrite_is_not_sent_again(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rewrite_is_not_sent_again_delta() {
    rejected_rewrite_is_not_sent_again(AdsApi::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_hears_envoys_rejection_of_its_own_listeners_sotw() {
    istiod_hears_rejection_of_its_own_listeners(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_hears_envoys_rejection_of_its_own_listeners_delta() {
    istiod_hears_rejection_of_its_own_listeners(AdsApi::Delta).await;
}

/// Envoy NACKs the rewritten listener; the relay sends istiod's unchanged, Envoy takes it, the
/// upstream gets Envoy's ACK of its own nonce and never the NACK, and `/debug/proxies` reports
/// the proxy as rewrite-rejected with Envoy's error and its last LDS push as the relay's.
async fn rejected_rewrite_falls_back(api: AdsApi) {
    let (sidecar, scoped_port) = start(api, ScopedPair::OverlapOnceRewritten).await;

    // The relay's last LDS push is its own (the fallback), and Envoy acknowledged it.
    let proxy = wait_until(
        "the relay's fallback to be acknowledged",
        CONFIG_TIMEOUT,
        || async {
            let proxy = sidecar.try_debug_proxy().await?;
            let relays = proxy["last_push"][LISTENER_TYPE_URL]["origin"] == "relay";
            (relays && lds_answered(&proxy)).then_some(proxy)
        },
    )
    .await;
    assert_eq!(proxy["xds"], sidecar.debug_form(), "{proxy}");
    assert_eq!(
        proxy["acks"][LISTENER_TYPE_URL]["nack"],
        Value::Null,
        "{proxy}"
    );

    // Envoy did reject once: the rewritten response. It runs istiod's listener as sent.
    let state = sidecar
        .envoy
        .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
        .await;
    assert_eq!(
        sidecar.envoy.stat(REJECTED_STAT).await,
        Some(1),
        "Envoy rejected the rewritten listener, and only that"
    );
    assert_eq!(state.error, None, "no error left after the fallback");
    let version = state.active_version.unwrap_or_default();
    assert_eq!(version, LDS_VERSION, "istiod's listener, istiod's version");
    assert_eq!(sidecar.declared_mtls_alpns().await, ALL_ISTIO_MTLS_ALPNS);
    let listener = state.active.expect("listener active");
    let scoped = scoped_mtls_alpns(&listener, scoped_port);
    assert_eq!(
        scoped, ALL_ISTIO_MTLS_ALPNS,
        "the scoped chain as istiod sent it"
    );

    // So h2 is refused again, and Istio's own clients get through.
    assert_eq!(sidecar.h2_accepted().await, Some(false));
    let ports = sidecar.mesh.ports;
    let mesh_client = sidecar
        .mtls(ports.http, "istio-http/1.1")
        .await
        .expect("istio-http/1.1");
    assert_eq!(mesh_client.status, 200, "{mesh_client:?}");

    // istiod's stand-in saw Envoy's ACK of its own response, and no NACK.
    let upstream = &sidecar.mesh.upstream;
    upstream
        .wait_for("Envoy's ACK of istiod's listeners", CONFIG_TIMEOUT, |r| {
            lds_answer(r, RequestKind::Ack).is_some()
        })
        .await
        .expect("the relay acknowledges istiod's response once Envoy took the fallback");
    let recording = upstream.recording();
    assert_eq!(
        recording.nacks().count(),
        0,
        "the rejection stayed with the relay"
    );
    assert_eq!(recording.streams.len(), 1);
    assert_nothing_of_the_relay(&recording);

    // The relay reports the proxy as rewrite-rejected, with Envoy's error.
    assert_rewrite_rejected(&sidecar.debug_proxy().await);
}

/// After the fallback, istiod pushes the same listener again under a new version: the relay
/// remembers that Envoy rejected its rewrite and sends it as istiod did, so Envoy has nothing to
/// reject and istiod gets Envoy's ACK of the new version.
async fn rejected_rewrite_is_not_sent_again(api: AdsApi) {
    let (sidecar, _) = start(api, ScopedPair::OverlapOnceRewritten).await;
    let upstream = &sidecar.mesh.upstream;
    upstream
        .wait_for("Envoy's ACK of istiod's listeners", CONFIG_TIMEOUT, |r| {
            lds_answer(r, RequestKind::Ack).is_some()
        })
        .await
        .expect("the relay acknowledges istiod's response once Envoy took the fallback");

    let listeners = upstream.snapshot().types[LISTENER_TYPE_URL]
        .resources
        .clone();
    upstream.push(LISTENER_TYPE_URL, REPUSH_VERSION, listeners);
    upstream
        .wait_for("Envoy's ACK of istiod's new version", CONFIG_TIMEOUT, |r| {
            r.acked(LISTENER_TYPE_URL, REPUSH_VERSION)
        })
        .await
        .expect("the unchanged listener is taken");
    assert_eq!(upstream.recording().nacks().count(), 0);
    assert_nothing_of_the_relay(&upstream.recording());
    sidecar
        .envoy
        .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
        .await;
    assert_eq!(sidecar.declared_mtls_alpns().await, ALL_ISTIO_MTLS_ALPNS);
    assert_eq!(
        sidecar.envoy.stat(REJECTED_STAT).await,
        Some(1),
        "the rewrite Envoy rejected was sent again"
    );
}

/// Envoy NACKs the rewritten listener and, after the fallback, istiod's own listener too: the
/// upstream then sees Envoy's rejection, of its own nonce.
async fn istiod_hears_rejection_of_its_own_listeners(api: AdsApi) {
    let (sidecar, _) = start(api, ScopedPair::OverlapAlways).await;

    let upstream = &sidecar.mesh.upstream;
    upstream
        .wait_for("Envoy's rejection to reach istiod", CONFIG_TIMEOUT, |r| {
            lds_answer(r, RequestKind::Nack).is_some()
        })
        .await
        .expect("istiod hears the rejection of its own listeners");
    let recording = upstream.recording();
    let nack = lds_answer(&recording, RequestKind::Nack).expect("checked above");
    let error = nack
        .request
        .error_detail
        .as_ref()
        .map(|status| status.message.clone())
        .unwrap_or_default();
    assert!(error.contains(OVERLAP), "the NACK istiod got: {error}");
    assert_eq!(
        recording.nacks().count(),
        1,
        "one rejection, of istiod's response"
    );
    assert_nothing_of_the_relay(&recording);

    // Envoy rejected both the rewrite and istiod's listener, and runs neither.
    assert_eq!(sidecar.envoy.stat(REJECTED_STAT).await, Some(2));
    let state = sidecar.envoy.listener_state(VIRTUAL_INBOUND).await;
    assert!(
        state.as_ref().is_none_or(|s| s.active.is_none()),
        "no virtualInbound runs: {state:?}"
    );
    let proxy = sidecar.debug_proxy().await;
    assert_eq!(
        proxy["last_push"][LISTENER_TYPE_URL]["origin"], "relay",
        "{proxy}"
    );
    let answer = &proxy["acks"][LISTENER_TYPE_URL];
    assert!(
        answer["nack"].as_str().is_some_and(|e| e.contains(OVERLAP)),
        "{proxy}"
    );
    assert_rewrite_rejected(&proxy);
}

/// `/debug/proxies` shows the proxy as rewrite-rejected, with Envoy's error.
fn assert_rewrite_rejected(proxy: &Value) {
    let rejection = proxy["rewrite_rejected"].as_str().unwrap_or_default();
    assert!(
        rejection.contains(OVERLAP),
        "/debug/proxies should show rewrite_rejected with Envoy's error: {proxy}"
    );
}

/// Starts a sidecar in `api` whose listener has the `pair` of extra chains on a port of their
/// own; returns it and that port.
async fn start(api: AdsApi, pair: ScopedPair) -> (Sidecar, u16) {
    let [scoped_port] = free_ports::<1>();
    let mesh =
        Mesh::start_with(|listener, ports| add_scoped_chains(listener, ports, scoped_port, pair))
            .await;
    let sidecar = Sidecar::launch(mesh, api, &[("shop.yaml", NAMESPACE_POLICY)]).await;
    wait_until(
        "Envoy to reject the rewritten listener (if it never does, the relay's check now sees \
         through the scoped prefix: this test needs another provocation, see its module docs)",
        CONFIG_TIMEOUT,
        || async {
            let rejected = sidecar.envoy.stat(REJECTED_STAT).await;
            rejected.filter(|&count| count > 0)
        },
    )
    .await;
    (sidecar, scoped_port)
}

/// Envoy's answer of `kind` to the upstream's first LDS response.
fn lds_answer(
    recording: &Recording,
    kind: RequestKind,
) -> Option<&alpn_xds::testkit::upstream::RecordedRequest> {
    let first = recording.responses_of(LISTENER_TYPE_URL).next()?;
    recording
        .requests_of(LISTENER_TYPE_URL)
        .find(|r| r.kind == kind && r.request.response_nonce == first.response.nonce)
}

/// Which pair of extra chains the listener gets.
#[derive(Clone, Copy)]
enum ScopedPair {
    /// Apart as istiod sends them, overlapping once `h2` is appended to the mTLS chain.
    OverlapOnceRewritten,
    /// The second chain also claims `istio`: they overlap as istiod sends them.
    OverlapAlways,
}

/// Adds the two chains on `port` that the module documentation describes.
fn add_scoped_chains(listener: &mut Listener, ports: &InboundPorts, port: u16, pair: ScopedPair) {
    let declared = listener
        .filter_chains
        .iter()
        .find(|chain| {
            let m = chain.filter_chain_match.as_ref();
            m.is_some_and(|m| {
                m.destination_port.as_ref().map(|p| p.value) == Some(u32::from(ports.http))
                    && m.transport_protocol == "tls"
                    && m.application_protocols.iter().any(|a| a == "istio")
            })
        })
        .cloned()
        .expect("the declared port's mTLS chain");

    let mut mtls = declared.clone();
    mtls.name = format!("scoped-mtls_{port}");
    set_match(&mut mtls, port, "fe80::1%1", None);
    let mut claims_h2 = declared;
    claims_h2.name = format!("scoped-h2_{port}");
    let alpns = match pair {
        ScopedPair::OverlapOnceRewritten => vec!["h2".to_owned()],
        ScopedPair::OverlapAlways => vec!["h2".to_owned(), "istio".to_owned()],
    };
    set_match(&mut claims_h2, port, "fe80::", Some(alpns));
    listener.filter_chains.push(mtls);
    listener.filter_chains.push(claims_h2);
}

fn set_match(chain: &mut FilterChain, port: u16, prefix: &str, alpns: Option<Vec<String>>) {
    let m = chain.filter_chain_match.as_mut().expect("a match");
    m.destination_port = Some(UInt32Value {
        value: u32::from(port),
    });
    m.prefix_ranges = vec![CidrRange {
        address_prefix: prefix.to_owned(),
        prefix_len: Some(UInt32Value { value: 64 }),
    }];
    if let Some(alpns) = alpns {
        m.application_protocols = alpns;
    }
}

/// The `application_protocols` of the scoped mTLS chain, as Envoy runs it.
fn scoped_mtls_alpns(listener: &Value, port: u16) -> Vec<String> {
    let chains = listener["filter_chains"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let chain = chains
        .iter()
        .find(|c| c["name"] == format!("scoped-mtls_{port}"))
        .expect("the scoped mTLS chain");
    chain["filter_chain_match"]["application_protocols"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}
