//! What a platform team relies on before putting the relay in front of every sidecar: TLS on
//! both legs with a certificate renewed under a live stream, metrics that tell what happened,
//! a drain on SIGTERM spread over the window, and streams that end at their maximum age.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alpn_xds::testkit::istio::VIRTUAL_INBOUND;
use alpn_xds::testkit::upstream::LISTENER_TYPE_URL;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use rustls::pki_types::ServerName;
use support::certs::{Identity, TestPki};
use support::envoy::{Bootstrap, Envoy};
use support::mesh::{CONFIG_TIMEOUT, Mesh};
use support::relay::RelayProcess;
use support::sidecar::{NAMESPACE_POLICY, WORKLOAD_POLICY};
use support::tls_client::tls_get;
use support::wait_until;
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;

/// The name the relay's serving certificate carries, as sidecars address it.
const RELAY_NAME: &str = "alpn-xds.istio-system.svc";
/// The name istiod's certificate carries.
const ISTIOD_NAME: &str = "istiod.istio-system.svc";

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_file(&dir.path().join("shop.yaml"), NAMESPACE_POLICY);
    dir
}

/// Replaces `path` in one step, as cert-manager and editors do.
fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Writes `identity`'s certificate and key into `dir`; returns their paths as strings.
fn write_identity(dir: &Path, identity: &Identity) -> (String, String) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    write_file(&key, &identity.key_pem);
    write_file(&cert, &identity.cert_pem);
    (cert.display().to_string(), key.display().to_string())
}

/// The leaf certificate `127.0.0.1:port` presents for `name`.
async fn served_certificate(pki: &TestPki, port: u16, name: &str) -> Vec<u8> {
    let config = Arc::new(pki.client_config(None, &["h2"]));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake with the relay");
    let leaf = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    leaf.as_ref().to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .as_ref()
        .to_vec()
}

/// Reads one metric's value from Prometheus text; `None` when the series is absent.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_legs_and_a_renewed_certificate_under_a_live_stream() {
    let mesh = Mesh::start().await;
    let policies = policy_dir();

    // istiod's side: a relay serving TLS as istiod would, in front of the test upstream, so
    // that the relay under test dials an https:// upstream checked against the mesh CA.
    let istiod_certs = tempfile::tempdir().unwrap();
    let istiod_identity = mesh.pki.issue(
        &[ISTIOD_NAME],
        "spiffe://cluster.local/ns/istio-system/sa/istiod",
    );
    let (cert, key) = write_identity(istiod_certs.path(), &istiod_identity);
    let istiod = RelayProcess::start_with(
        &mesh.upstream.url(),
        policies.path(),
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .await;

    // The relay under test: TLS towards Envoy, TLS towards "istiod".
    let certs = tempfile::tempdir().unwrap();
    let ca = certs.path().join("ca.pem");
    std::fs::write(&ca, &mesh.pki.ca_pem).unwrap();
    let first = mesh.pki.issue(
        &[RELAY_NAME],
        "spiffe://cluster.local/ns/istio-system/sa/alpn-xds",
    );
    let (cert, key) = write_identity(certs.path(), &first);
    let upstream = format!("https://{}", istiod.listen());
    let relay = RelayProcess::start_with(
        &upstream,
        policies.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--upstream-ca",
            &ca.display().to_string(),
            "--upstream-server-name",
            ISTIOD_NAME,
        ],
    )
    .await;

    let mut bootstrap = Bootstrap::sidecar(relay.listen());
    bootstrap.xds_tls = Some((mesh.pki.ca_pem.clone(), RELAY_NAME.to_string()));
    let envoy = Envoy::start(&bootstrap).await;
    envoy
        .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
        .await;
    let h2 = tls_get(
        &mesh.pki,
        mesh.ports.http,
        Some(&mesh.pki.client),
        &["h2"],
        "/h2",
    )
    .await;
    assert_eq!(h2.expect("h2 through both TLS legs").status, 200);
    assert_eq!(
        served_certificate(&mesh.pki, relay.listen().port(), RELAY_NAME).await,
        pem_der(&first.cert_pem)
    );
    let stream_before = relay.admin_json("/debug/proxies").await["proxies"][0]["stream_id"].clone();
    assert!(stream_before.is_u64(), "the sidecar's stream is registered");

    // cert-manager renews the certificate: new connections get it, the live stream stays.
    let renewed = mesh.pki.issue(
        &[RELAY_NAME],
        "spiffe://cluster.local/ns/istio-system/sa/alpn-xds",
    );
    write_identity(certs.path(), &renewed);
    let renewed_der = pem_der(&renewed.cert_pem);
    wait_until("the renewed certificate to be served", Duration::from_secs(20), || {
        let pki = &mesh.pki;
        let port = relay.listen().port();
        let renewed_der = renewed_der.clone();
        async move { (served_certificate(pki, port, RELAY_NAME).await == renewed_der).then_some(()) }
    })
    .await;
    let proxies = relay.admin_json("/debug/proxies").await;
    assert_eq!(proxies["connected"], 1, "{proxies}");
    assert_eq!(
        proxies["proxies"][0]["stream_id"], stream_before,
        "the live stream was not dropped"
    );
    assert_eq!(mesh.upstream.stream_count(), 1, "Envoy did not reconnect");

    // The live stream still carries the relay's pushes.
    write_file(&policies.path().join("web.yaml"), WORKLOAD_POLICY);
    wait_until(
        "the push over the old connection",
        CONFIG_TIMEOUT,
        || async {
            let refused = tls_get(
                &mesh.pki,
                mesh.ports.http,
                Some(&mesh.pki.client),
                &["h2"],
                "/",
            )
            .await;
            refused.is_err().then_some(())
        },
    )
    .await;
    assert_eq!(
        envoy.stat("listener_manager.lds.update_rejected").await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_tell_what_happened() {
    let mesh = Mesh::start().await;
    let policies = policy_dir();
    let relay = RelayProcess::start(&mesh.upstream.url(), policies.path()).await;
    let envoy = Envoy::start(&Bootstrap::sidecar(relay.listen())).await;
    envoy
        .wait_listener_active(VIRTUAL_INBOUND, CONFIG_TIMEOUT)
        .await;

    // One policy change that alters the sidecar's listener, one that does not.
    write_file(&policies.path().join("web.yaml"), WORKLOAD_POLICY);
    let scrape = || async { relay.admin_get("/metrics").await.body };
    wait_until("the relay's push", CONFIG_TIMEOUT, || async {
        metric(
            &scrape().await,
            "alpn_xds_relay_pushes_total{form=\"sotw\",reason=\"policy\"}",
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
    write_file(
        &policies.path().join("other.yaml"),
        &NAMESPACE_POLICY.replace("shop", "other"),
    );
    wait_until("the second reload", CONFIG_TIMEOUT, || async {
        metric(&scrape().await, "alpn_xds_policy_generation").filter(|g| *g >= 3.0)
    })
    .await;

    let text = scrape().await;
    let value =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    assert_eq!(value("alpn_xds_streams{form=\"sotw\"}"), 1.0);
    assert_eq!(
        value("alpn_xds_responses_total{form=\"sotw\",kind=\"listener\",origin=\"istiod\"}"),
        1.0
    );
    assert_eq!(
        value("alpn_xds_responses_total{form=\"sotw\",kind=\"cluster\",origin=\"istiod\"}"),
        1.0
    );
    // Only the first change altered the listener.
    assert_eq!(
        value("alpn_xds_relay_pushes_total{form=\"sotw\",reason=\"policy\"}"),
        1.0
    );
    assert_eq!(
        value("alpn_xds_responses_total{form=\"sotw\",kind=\"listener\",origin=\"relay\"}"),
        1.0
    );
    // istiod's listener went out rewritten; the relay's push took the rewrite away.
    assert_eq!(
        value("alpn_xds_listeners_rewritten_total{form=\"sotw\"}"),
        1.0
    );
    assert!(
        metric(
            &text,
            "alpn_xds_rejections_total{form=\"sotw\",kind=\"listener\",origin=\"istiod\"}"
        )
        .is_none()
    );
    assert_eq!(value("alpn_xds_policy_reloads_total{outcome=\"ok\"}"), 3.0);
    assert_eq!(value("alpn_xds_policies"), 3.0);
    assert_eq!(value("alpn_xds_upstream_connect_errors_total"), 0.0);
    assert!(value("alpn_xds_rewrite_duration_seconds_count") >= 1.0);
    // No label carries a node id, pod or policy name.
    for private in ["web-1", "sidecar~", "shop"] {
        assert!(
            !text.contains(private),
            "{private} leaked into the metrics:\n{text}"
        );
    }
}

/// A minimal sidecar: one SotW stream asking for listeners.
async fn ads_stream(
    relay: &RelayProcess,
    id: usize,
) -> (
    tokio::sync::mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", relay.listen()))
            .await
            .expect("connect to the relay");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: format!("sidecar~127.0.0.1~web-{id}.shop~shop.svc.cluster.local"),
            ..Default::default()
        }),
        type_url: LISTENER_TYPE_URL.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("the relay accepts the stream")
        .into_inner();
    let first = tokio::time::timeout(CONFIG_TIMEOUT, responses.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(_)))),
        "no LDS response: {first:?}"
    );
    (tx, responses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_over_the_window() {
    const STREAMS: usize = 16;
    const WINDOW: Duration = Duration::from_secs(3);
    let mesh = Mesh::start().await;
    let policies = policy_dir();
    let mut relay = RelayProcess::start_with(
        &mesh.upstream.url(),
        policies.path(),
        &["--plaintext", "--drain-window", "3s"],
    )
    .await;

    let mut streams = Vec::new();
    for id in 0..STREAMS {
        streams.push(ads_stream(&relay, id).await);
    }
    let started = Instant::now();
    relay.terminate();

    // Each stream ends on its own, within the window, with status OK.
    let ends =
        futures::future::join_all(streams.into_iter().map(|(tx, mut responses)| async move {
            // The sidecar keeps its side of the stream open.
            let _requests = tx;
            let end = tokio::time::timeout(WINDOW * 2, responses.message()).await;
            assert!(
                matches!(end, Ok(Ok(None))),
                "the stream did not end cleanly: {end:?}"
            );
            started.elapsed()
        }));
    let readiness = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        support::http::get(relay.admin(), "/readyz")
            .await
            .map(|r| r.status)
    };
    let (ends, readiness) = tokio::join!(ends, readiness);
    eprintln!("ends: {ends:?}\n{}", relay.log());
    assert_eq!(readiness.expect("admin answers while draining"), 503);
    let first = ends.iter().min().unwrap();
    let last = ends.iter().max().unwrap();
    assert!(
        *last <= WINDOW + Duration::from_millis(500),
        "last stream ended at {last:?}"
    );
    assert!(
        *last - *first >= WINDOW / 3,
        "closes were not spread: {ends:?}"
    );

    let status = relay.wait_exit(WINDOW + Duration::from_secs(10)).await;
    assert!(status.success(), "alpn-xds exited with {status}");
    assert!(
        TcpStream::connect(relay.listen()).await.is_err(),
        "still accepting after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_at_their_maximum_age() {
    let mesh = Mesh::start().await;
    let policies = policy_dir();
    let relay = RelayProcess::start_with(
        &mesh.upstream.url(),
        policies.path(),
        &["--plaintext", "--max-connection-age", "2s"],
    )
    .await;

    let started = Instant::now();
    let (_tx, mut responses) = ads_stream(&relay, 1).await;
    let end = tokio::time::timeout(Duration::from_secs(10), responses.message()).await;
    assert!(
        matches!(end, Ok(Ok(None))),
        "the stream did not end cleanly: {end:?}"
    );
    let age = started.elapsed();
    assert!(
        age >= Duration::from_millis(1700) && age <= Duration::from_millis(2600),
        "ended after {age:?}, expected 2 s ± 10%"
    );
}
