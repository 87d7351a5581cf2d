//! The problem, shown on real Envoy without the relay: Envoy's ADS points straight at the test
//! upstream, which serves an Istio-shaped PERMISSIVE `virtualInbound`. Envoy accepts it;
//! plaintext and a sidecar-style mTLS client (ALPN `istio-http/1.1`) get through, while a
//! non-sidecar mTLS client offering `h2` or `http/1.1` finds no filter chain on the declared
//! HTTP port, and on an undeclared port its TLS is handed to an application that does not
//! speak TLS.

mod support;

use alpn_xds::testkit::istio::VIRTUAL_INBOUND;
use alpn_xds::testkit::upstream::LISTENER_TYPE_URL;
use support::envoy::{Bootstrap, Envoy};
use support::http::ClientError;
use support::mesh::{BACKEND_NAME, CONFIG_TIMEOUT, InboundPorts, LDS_VERSION, Mesh};
use support::tls_client::{tls_get, tls12_handshake};
use support::{http, loopback};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_the_listener_and_refuses_standard_alpns_on_mtls() {
    let Mesh {
        pki,
        backend,
        ports,
        upstream,
    } = Mesh::start().await;
    let envoy = Envoy::start(&Bootstrap::sidecar(upstream.addr())).await;

    // Envoy accepted the listener: active, no error, the upstream's version, an ACK upstream.
    let state = envoy
        .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
        .await;
    assert_eq!(state.error, None, "Envoy rejected virtualInbound");
    assert_eq!(state.active_version.as_deref(), Some(LDS_VERSION));
    assert_eq!(envoy.lds_version().await.as_deref(), Some(LDS_VERSION));
    assert_eq!(
        envoy.stat("listener_manager.lds.update_rejected").await,
        Some(0)
    );
    upstream
        .wait_for("Envoy's LDS ACK", CONFIG_TIMEOUT, |r| {
            r.acked(LISTENER_TYPE_URL, LDS_VERSION)
        })
        .await
        .expect("Envoy acknowledges the listener");
    assert_eq!(upstream.recording().nacks().count(), 0);

    // Plaintext HTTP, on the declared port and on an undeclared (sniffed) one.
    let plaintext = [
        (ports.http, ports.declared_chain("raw_buffer")),
        (ports.passthrough, ports.passthrough_chain("raw_buffer")),
    ];
    for (port, chain) in plaintext {
        let reply = http::get(loopback(port), "/plain")
            .await
            .expect("plaintext request");
        assert_eq!(reply.status, 200, "plaintext on port {port}: {reply:?}");
        assert_eq!(reply.chain(), Some(chain.as_str()), "{reply:?}");
        assert!(reply.body.starts_with(BACKEND_NAME), "{reply:?}");
    }

    // A sidecar's mTLS: Istio's own ALPN, no ALPN negotiated, HTTP/1.1 sniffed by the HCM.
    let client = Some(&pki.client);
    let sidecar = tls_get(
        &pki,
        ports.http,
        client,
        &["istio-http/1.1", "istio"],
        "/mesh",
    )
    .await
    .expect("a sidecar-style mTLS client gets through");
    assert_eq!(sidecar.status, 200, "{sidecar:?}");
    assert_eq!(sidecar.alpn, None);
    assert_eq!(sidecar.chain(), Some(ports.declared_chain("tls").as_str()));

    // The problem: standard ALPNs match no chain on the declared HTTP port.
    let refused_before = envoy.stat(&no_chain_stat(&ports)).await.unwrap_or(0);
    for alpn in ["h2", "http/1.1"] {
        let refused = tls_get(&pki, ports.http, client, &[alpn], "/standard").await;
        match refused {
            Err(error) => assert!(
                matches!(error, ClientError::Handshake(_)),
                "{alpn}: {error}"
            ),
            Ok(reply) => panic!("{alpn} on the declared port got through: {reply:?}"),
        }
    }
    let refused_after = envoy.stat(&no_chain_stat(&ports)).await.unwrap_or(0);
    assert_eq!(
        refused_after - refused_before,
        2,
        "both refusals were 'no filter chain'"
    );

    // On an undeclared port the TLS goes to the plaintext application, which cannot answer it.
    let passed_through = tls_get(&pki, ports.passthrough, client, &["h2"], "/standard").await;
    assert!(
        matches!(passed_through, Err(ClientError::Handshake(_))),
        "the plaintext backend should have answered the ClientHello: {passed_through:?}"
    );

    // mTLS means a client certificate: the sidecar's chain matches, then refuses the client.
    let anonymous = tls12_handshake(&pki, ports.http, None, &["istio-http/1.1"]).await;
    assert!(
        matches!(anonymous, Err(ClientError::TlsAlert(_))),
        "a client without certificate: {anonymous:?}"
    );

    assert!(backend.served() >= 3, "backend served {}", backend.served());
    let rejected = envoy.stat("listener_manager.lds.update_rejected").await;
    assert_eq!(rejected, Some(0), "no LDS update was rejected");
}

/// Envoy's counter of connections that matched no filter chain on the inbound listener.
fn no_chain_stat(ports: &InboundPorts) -> String {
    format!(
        "listener.127.0.0.1_{}.no_filter_chain_match",
        ports.passthrough
    )
}
