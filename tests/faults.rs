//! Faults around the relay: istiod crashing mid-push and coming back, a sidecar going
//! away mid-push, a sidecar that stops reading, a thousand sidecars reconnecting after a
//! relay restart, and istiod closing a connection that several sidecars' streams share. Each test states the load it runs under and the bounds it holds the relay to;
//! the README's "Reliability" table sums them up.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alpn_xds::testkit::istio::VIRTUAL_INBOUND;
use alpn_xds::testkit::upstream::{LISTENER_TYPE_URL, Snapshot, TestUpstream};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use prost::Message;
use support::envoy::AdsApi;
use support::mesh::{CONFIG_TIMEOUT, LDS_VERSION};
use support::relay::RelayProcess;
use support::sidecar::{NAMESPACE_POLICY, STANDARD_ALPNS, Sidecar, istiod_version};
use support::wait_until;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

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

/// Sidecar streams connected to the relay, both forms summed, and its runtime's alive tasks.
async fn streams_and_tasks(relay: &RelayProcess) -> (u64, u64) {
    let text = relay.admin_get("/metrics").await.body;
    let streams = ["sotw", "delta"]
        .iter()
        .filter_map(|form| metric(&text, &format!("alpn_xds_streams{{form=\"{form}\"}}")))
        .sum::<f64>() as u64;
    let tasks = metric(&text, "alpn_xds_tasks").expect("alpn_xds_tasks in /metrics") as u64;
    (streams, tasks)
}

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("shop.yaml"), NAMESPACE_POLICY).expect("write policy");
    dir
}

/// A listener of about `size` bytes (padded in `stat_prefix`), named `virtualInbound`.
fn big_listener(size: usize, version: usize) -> Any {
    pack_any(Listener {
        name: VIRTUAL_INBOUND.to_string(),
        stat_prefix: format!("v{version}-{}", "p".repeat(size)),
        ..Default::default()
    })
}

fn lds_snapshot(version: &str, listener: Any) -> Snapshot {
    Snapshot::new().with(LISTENER_TYPE_URL, version, vec![listener])
}

async fn channel(relay: &RelayProcess) -> Channel {
    Endpoint::from_shared(format!("http://{}", relay.listen()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the relay")
}

/// A minimal SotW sidecar: opens an ADS stream on `channel` asking for LDS as node `web-<id>`.
/// The sender keeps the sidecar's side open; dropping both ends the stream.
async fn open_sotw(
    channel: Channel,
    id: usize,
) -> Result<
    (
        mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    tonic::Status,
> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(4);
    let first = DiscoveryRequest {
        node: Some(node(id)),
        type_url: LISTENER_TYPE_URL.to_string(),
        ..Default::default()
    };
    tx.send(first).await.expect("queue the first request");
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, responses))
}

/// Which ADS method a minimal sidecar speaks.
#[derive(Clone, Copy, Debug)]
enum Form {
    Sotw,
    Delta,
}

/// A minimal sidecar's stream: the versions of the LDS responses it receives. Holding it keeps
/// the sidecar's side open; dropping it ends the stream.
struct AdsClient {
    _requests: Box<dyn std::any::Any + Send>,
    versions: futures::stream::BoxStream<'static, Result<String, tonic::Status>>,
}

impl AdsClient {
    /// Opens a stream of `form` on `channel` as node `web-<id>`, asking for every listener.
    async fn open(form: Form, channel: Channel, id: usize) -> Result<Self, tonic::Status> {
        use futures::StreamExt;
        match form {
            Form::Sotw => {
                let (tx, responses) = open_sotw(channel, id).await?;
                Ok(Self {
                    _requests: Box::new(tx),
                    versions: responses.map(|r| r.map(|r| r.version_info)).boxed(),
                })
            }
            Form::Delta => {
                let mut client = AggregatedDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(64 * 1024 * 1024);
                let (tx, rx) = mpsc::channel(4);
                let first = DeltaDiscoveryRequest {
                    node: Some(node(id)),
                    type_url: LISTENER_TYPE_URL.to_string(),
                    ..Default::default()
                };
                tx.send(first).await.expect("queue the first request");
                let responses = client
                    .delta_aggregated_resources(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                Ok(Self {
                    _requests: Box::new(tx),
                    versions: responses.map(|r| r.map(|r| r.system_version_info)).boxed(),
                })
            }
        }
    }

    /// The next response's version; `None` when the stream ended or failed.
    async fn next(&mut self) -> Option<String> {
        use futures::StreamExt;
        self.versions.next().await.and_then(Result::ok)
    }
}

fn node(id: usize) -> Node {
    Node {
        id: format!("sidecar~127.0.0.1~web-{id}.shop~shop.svc.cluster.local"),
        ..Default::default()
    }
}

/// What one reading client saw: each version with the time it arrived.
type Seen = Arc<Mutex<Vec<(String, Instant)>>>;

/// Reads every response of a stream until it ends (or `limit` passes), noting versions.
fn spawn_reader(mut client: AdsClient, limit: Duration) -> Seen {
    let seen: Seen = Arc::default();
    tokio::spawn({
        let seen = seen.clone();
        async move {
            let deadline = tokio::time::Instant::now() + limit;
            while let Ok(Some(version)) = tokio::time::timeout_at(deadline, client.next()).await {
                let now = Instant::now();
                seen.lock().unwrap().push((version, now));
            }
        }
    });
    seen
}

fn has_version(seen: &Seen, version: &str) -> bool {
    seen.lock().unwrap().iter().any(|(v, _)| v == version)
}

// ---------------------------------------------------------------------------------------------
// 1. istiod goes away right after a push and comes back on the same address.

async fn istiod_crash_and_return(api: AdsApi) {
    const NEW_VERSION: &str = "2025-01-01T00:00:00Z/3";
    let mut sidecar = Sidecar::start(api, &[("shop.yaml", NAMESPACE_POLICY)]).await;
    sidecar.wait_upstream_acks().await;
    let addr = sidecar.mesh.upstream.addr();
    let snapshot = sidecar.mesh.upstream.snapshot();
    let listeners = snapshot.types[LISTENER_TYPE_URL].resources.clone();
    assert_ne!(NEW_VERSION, LDS_VERSION);

    // A push goes out, and istiod dies while it is on the wire: its listening socket and every
    // connection are cut.
    sidecar.mesh.upstream.push(
        LISTENER_TYPE_URL,
        "2025-01-01T00:00:00Z/2",
        listeners.clone(),
    );
    sidecar.mesh.upstream.kill();

    // The relay ends the sidecar's stream: no stream is left half-open without istiod behind it.
    wait_until(
        "the relay to drop the sidecar's stream",
        CONFIG_TIMEOUT,
        || async { (streams_and_tasks(&sidecar.relay).await.0 == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // istiod comes back where it was, with a newer version.
    // The newer listener differs (its stat prefix), so that Envoy must apply it.
    let mut newer = snapshot.clone();
    let lds = newer
        .types
        .get_mut(LISTENER_TYPE_URL)
        .expect("LDS in the snapshot");
    lds.version = NEW_VERSION.to_string();
    let mut listener: Listener =
        Listener::decode(lds.resources[0].value.as_slice()).expect("a Listener");
    listener.stat_prefix = "after_restart".to_string();
    lds.resources = vec![pack_any(listener)];
    sidecar.mesh.upstream = TestUpstream::start_on(addr, newer)
        .await
        .expect("restart the upstream on its old address");

    wait_until(
        "Envoy to run istiod's newer listener",
        CONFIG_TIMEOUT,
        || async {
            let active = sidecar.inbound().await.active_version.unwrap_or_default();
            (istiod_version(&active) == NEW_VERSION).then_some(())
        },
    )
    .await;
    let dump = sidecar.envoy.listeners_dump().await.to_string();
    assert!(
        dump.contains("after_restart"),
        "Envoy runs the old listener"
    );
    sidecar
        .mesh
        .upstream
        .wait_for("Envoy's ACK of the newer LDS", CONFIG_TIMEOUT, |r| {
            r.acked(LISTENER_TYPE_URL, NEW_VERSION)
        })
        .await
        .expect("the new istiod gets Envoy's ACK");
    // Accepted, nothing rejected on the way.
    assert_eq!(
        sidecar.inbound().await.error,
        None,
        "virtualInbound in error"
    );
    let rejected = sidecar
        .envoy
        .stat("listener_manager.lds.update_rejected")
        .await;
    assert_eq!(rejected, Some(0), "Envoy rejected an LDS update");
    let alpns = sidecar.declared_mtls_alpns().await;
    for alpn in STANDARD_ALPNS {
        assert!(alpns.iter().any(|a| a == alpn), "{alpn} missing: {alpns:?}");
    }
    let reply = sidecar
        .mtls(sidecar.mesh.ports.http, "h2")
        .await
        .expect("h2 mTLS client after istiod came back");
    assert_eq!(reply.status, 200, "{reply:?}");

    // One stream per Envoy again, in the registry, the metrics and at istiod.
    let proxies = sidecar.relay.admin_json("/debug/proxies").await;
    let count = proxies
        .as_array()
        .or_else(|| proxies["proxies"].as_array())
        .map(Vec::len);
    assert_eq!(count, Some(1), "{proxies}");
    assert_eq!(streams_and_tasks(&sidecar.relay).await.0, 1);
    assert_eq!(sidecar.mesh.upstream.open_streams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_crash_mid_push_sotw() {
    istiod_crash_and_return(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_crash_mid_push_delta() {
    istiod_crash_and_return(AdsApi::Delta).await;
}

// ---------------------------------------------------------------------------------------------
// 2. A sidecar goes away while istiod pushes large listeners to everyone.

/// Size of the listeners pushed in tests 2 and 3.
const BIG: usize = 300 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_gone_mid_push_leaves_nothing_behind_sotw() {
    sidecar_gone_mid_push(Form::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_gone_mid_push_leaves_nothing_behind_delta() {
    sidecar_gone_mid_push(Form::Delta).await;
}

async fn sidecar_gone_mid_push(form: Form) {
    // Load: 8 sidecars that stay, each its own connection; 10 rounds in which a ninth sidecar
    // connects, istiod pushes 8 versions of a 300 KiB listener to all nine, and the ninth goes
    // away while the pushes are on the wire (80 versions, 24 MiB of distinct listeners).
    const STAYING: usize = 8;
    const ROUNDS: usize = 10;
    const PUSHES_PER_ROUND: usize = 8;
    // What the relay's memory may grow by from the end of round 1 to the end of the last: the
    // listener cache's byte budget (8 MiB) plus 8 MiB.
    const RSS_GROWTH_KIB: u64 = 16 * 1024;
    let upstream = TestUpstream::start(lds_snapshot("v0", big_listener(BIG, 0)))
        .await
        .expect("start the upstream");
    let policies = policy_dir();
    let relay = RelayProcess::start(&upstream.url(), policies.path()).await;

    let mut staying = Vec::new();
    for id in 0..STAYING {
        let client = AdsClient::open(form, channel(&relay).await, id).await;
        staying.push(spawn_reader(
            client.expect("stream"),
            Duration::from_secs(120),
        ));
    }
    wait_until("every sidecar's first LDS", CONFIG_TIMEOUT, || async {
        staying
            .iter()
            .all(|seen| has_version(seen, "v0"))
            .then_some(())
    })
    .await;
    let (streams, baseline_tasks) = streams_and_tasks(&relay).await;
    assert_eq!(streams, STAYING as u64);
    assert_eq!(upstream.open_streams(), STAYING);

    let mut version = 0;
    let mut rss_after = Vec::new();
    for round in 0..ROUNDS {
        let mut leaving = AdsClient::open(form, channel(&relay).await, 1000 + round)
            .await
            .expect("the leaving sidecar's stream");
        let first = tokio::time::timeout(CONFIG_TIMEOUT, leaving.next()).await;
        assert!(matches!(first, Ok(Some(_))), "{first:?}");
        upstream
            .wait_for("the leaving sidecar's istiod stream", CONFIG_TIMEOUT, |r| {
                r.streams.iter().filter(|s| s.open).count() == STAYING + 1
            })
            .await
            .expect("one more istiod stream");

        // istiod pushes; the sidecar leaves (its connection closes) while they are on the wire.
        for _ in 0..PUSHES_PER_ROUND {
            version += 1;
            upstream.push(
                LISTENER_TYPE_URL,
                &format!("v{version}"),
                vec![big_listener(BIG, version)],
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(leaving);

        // Its istiod stream ends, and the relay is back to its baseline of streams and tasks.
        upstream
            .wait_for(
                "the leaving sidecar's istiod stream to end",
                CONFIG_TIMEOUT,
                |r| r.streams.iter().filter(|s| s.open).count() == STAYING,
            )
            .await
            .expect("istiod's stream for the sidecar that left ends");
        wait_until(
            "streams and tasks back to the baseline",
            CONFIG_TIMEOUT,
            || async {
                let (streams, tasks) = streams_and_tasks(&relay).await;
                (streams == STAYING as u64 && tasks <= baseline_tasks).then_some(())
            },
        )
        .await;
        let last = format!("v{version}");
        wait_until(
            "the staying sidecars to get the last push",
            CONFIG_TIMEOUT,
            || async {
                staying
                    .iter()
                    .all(|seen| has_version(seen, &last))
                    .then_some(())
            },
        )
        .await;
        rss_after.push(relay.rss_kib());
    }
    let growth = rss_after.last().unwrap().saturating_sub(rss_after[0]);
    let text = relay.admin_get("/metrics").await.body;
    let cached = metric(&text, "alpn_xds_cached_listeners");
    eprintln!(
        "relay RSS after each round (KiB): {rss_after:?}; baseline tasks {baseline_tasks}; \
         cached listeners {cached:?}"
    );
    assert!(
        growth <= RSS_GROWTH_KIB,
        "the relay's RSS grew by {growth} KiB over {ROUNDS} rounds: {rss_after:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A sidecar stops reading while istiod keeps pushing large listeners.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_stops_reading_slows_only_its_istiod_stream_sotw() {
    slow_reader(Form::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_stops_reading_slows_only_its_istiod_stream_delta() {
    slow_reader(Form::Delta).await;
}

async fn slow_reader(form: Form) {
    // Load: 4 reading sidecars and 1 that reads its first response and then nothing; istiod
    // pushes 120 versions of a 300 KiB listener, one every 50 ms (36 MiB per stream in all).
    const READING: usize = 4;
    const PUSHES: usize = 120;
    const EVERY: Duration = Duration::from_millis(50);
    // Each reading sidecar gets each version within this of its push.
    const PROMPT: Duration = Duration::from_secs(1);
    // What the relay's memory may grow by while the slow sidecar holds its stream: the listener
    // cache's byte budget (8 MiB), the slow stream's two HTTP/2 windows (2 MiB each), 8 MiB of
    // slack; buffering without end would take the 36 MiB pushed.
    const RSS_GROWTH_KIB: u64 = 20 * 1024;
    let upstream = TestUpstream::start(lds_snapshot("v0", big_listener(BIG, 0)))
        .await
        .expect("start the upstream");
    let policies = policy_dir();
    let relay = RelayProcess::start(&upstream.url(), policies.path()).await;

    let mut reading = Vec::new();
    for id in 0..READING {
        let client = AdsClient::open(form, channel(&relay).await, id).await;
        reading.push(spawn_reader(
            client.expect("stream"),
            Duration::from_secs(120),
        ));
    }
    let mut slow = AdsClient::open(form, channel(&relay).await, 99)
        .await
        .expect("stream");
    let first = tokio::time::timeout(CONFIG_TIMEOUT, slow.next()).await;
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    wait_until("every sidecar's first LDS", CONFIG_TIMEOUT, || async {
        reading
            .iter()
            .all(|seen| has_version(seen, "v0"))
            .then_some(())
    })
    .await;
    let slow_stream = upstream
        .recording()
        .streams
        .iter()
        .find(|s| s.node.as_ref().is_some_and(|n| n.id.contains("~web-99.")))
        .expect("the slow sidecar's istiod stream")
        .id;
    let rss_before = relay.rss_kib();

    let mut pushed_at = BTreeMap::new();
    let mut rss_max = rss_before;
    for version in 1..=PUSHES {
        let name = format!("v{version}");
        upstream.push(LISTENER_TYPE_URL, &name, vec![big_listener(BIG, version)]);
        pushed_at.insert(name, Instant::now());
        tokio::time::sleep(EVERY).await;
        rss_max = rss_max.max(relay.rss_kib());
    }
    let last = format!("v{PUSHES}");
    wait_until(
        "the reading sidecars to get the last push",
        CONFIG_TIMEOUT,
        || async {
            reading
                .iter()
                .all(|seen| has_version(seen, &last))
                .then_some(())
        },
    )
    .await;

    // Every reading sidecar got every version, each promptly.
    let mut worst = Duration::ZERO;
    for seen in &reading {
        let seen = seen.lock().unwrap();
        for (version, at) in &pushed_at {
            let got = seen
                .iter()
                .find(|(v, _)| v == version)
                .unwrap_or_else(|| panic!("version {version} never arrived"));
            worst = worst.max(got.1.saturating_duration_since(*at));
        }
    }
    assert!(
        worst <= PROMPT,
        "a reading sidecar waited {worst:?} for a push"
    );

    // istiod's stream for the slow sidecar is held back: what the upstream managed to send on
    // it stops growing well short of the pushes, and stays put. What it did send sits in fixed
    // buffers: the test upstream's queue of 16, the HTTP/2 windows of both legs (2 MiB each by
    // default, about 7 such listeners), the relay's queue of 1.
    let sent_on_slow = || upstream.recording().responses_on(slow_stream).count();
    let held = sent_on_slow();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sent_on_slow(),
        held,
        "istiod kept sending to the slow stream"
    );
    assert!(
        held < PUSHES / 2,
        "istiod sent {held} of {PUSHES} responses to a sidecar that reads nothing"
    );
    let growth = rss_max.saturating_sub(rss_before);
    eprintln!(
        "slow stream: istiod sent {held} of {} responses; relay RSS {rss_before} KiB, max {rss_max} KiB; worst delay {worst:?}",
        PUSHES + 1
    );
    assert!(
        growth <= RSS_GROWTH_KIB,
        "the relay's RSS grew by {growth} KiB"
    );

    // The slow sidecar, reading again, gets istiod's latest version: nothing is lost.
    let deadline = tokio::time::Instant::now() + CONFIG_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, slow.next()).await;
        let version = match next {
            Ok(Some(version)) => version,
            other => panic!("the slow sidecar never got {last}: {other:?}"),
        };
        if version == last {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A thousand sidecars reconnect at once after the relay is killed and restarted.

/// Runs one sidecar for the whole test: opens its stream on `channel`, counts each first LDS
/// response in `served` (once per connection), and reconnects with a small jittered backoff
/// whenever the stream ends. Bounded by `deadline` and a number of attempts.
async fn reconnecting_sidecar(
    channel: Channel,
    id: usize,
    served: Arc<Mutex<Vec<usize>>>,
    deadline: tokio::time::Instant,
) {
    let jitter = Duration::from_millis((id as u64 * 7919) % 250);
    for _ in 0..200 {
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        if let Ok(Ok((_tx, mut responses))) =
            tokio::time::timeout_at(deadline, open_sotw(channel.clone(), id)).await
        {
            let mut counted = false;
            while let Ok(Ok(Some(_))) = tokio::time::timeout_at(deadline, responses.message()).await
            {
                if !counted {
                    served.lock().unwrap()[id] += 1;
                    counted = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100) + jitter).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sidecars_reconnect_after_a_relay_restart() {
    // Load: 1000 SotW sidecars multiplexed over 10 HTTP/2 connections, one relay stream and one
    // istiod stream each, 16 istiod streams to a connection (the relay's default); the relay is
    // SIGKILLed and restarted on the same port.
    const SIDECARS: usize = 1000;
    const CONNECTIONS: usize = 10;
    // The relay's defaults: --upstream-connect-rate 200, after a burst of 200.
    const RATE: usize = 200;
    const BURST: usize = 200;
    // All sidecars served again within this of the restart: (1000 - burst) / rate = 4 s of
    // pacing, plus the relay's start and the sidecars' backoff.
    const RECONNECT_BOUND: Duration = Duration::from_secs(15);
    // The relay's memory per connected stream (one sidecar stream, one istiod stream, a
    // sixteenth of an istiod connection). A connection of its own per stream would add about
    // 50 KiB and fail this.
    const RSS_PER_STREAM_KIB: u64 = 40;

    let listener = big_listener(1024, 0);
    let upstream = TestUpstream::start(lds_snapshot("v0", listener))
        .await
        .expect("start the upstream");
    let policies = policy_dir();
    let mut relay = RelayProcess::start(&upstream.url(), policies.path()).await;
    let listen = relay.listen();
    let idle_rss = relay.rss_kib();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let served = Arc::new(Mutex::new(vec![0usize; SIDECARS]));
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        // Lazy: a channel reconnects by itself when the relay comes back.
        channels.push(
            Endpoint::from_shared(format!("http://{listen}"))
                .expect("endpoint")
                .connect_lazy(),
        );
    }
    let mut tasks = Vec::new();
    for id in 0..SIDECARS {
        let channel = channels[id % CONNECTIONS].clone();
        tasks.push(tokio::spawn(reconnecting_sidecar(
            channel,
            id,
            served.clone(),
            deadline,
        )));
    }
    let served_at_least = |n: usize| {
        let served = served.clone();
        move || {
            let all = served.lock().unwrap().iter().all(|&count| count >= n);
            async move { all.then_some(()) }
        }
    };
    wait_until(
        "every sidecar's first LDS",
        Duration::from_secs(30),
        served_at_least(1),
    )
    .await;
    let connected_rss = relay.rss_kib();

    // The relay dies and a new one starts where it was; every sidecar comes back at once.
    relay.kill();
    let restarted = Instant::now();
    relay =
        RelayProcess::start_on(listen, &upstream.url(), policies.path(), &["--plaintext"]).await;
    wait_until(
        "every sidecar served again",
        RECONNECT_BOUND,
        served_at_least(2),
    )
    .await;
    let took = restarted.elapsed();
    wait_until(
        "the relay to count every stream",
        CONFIG_TIMEOUT,
        || async { (streams_and_tasks(&relay).await.0 == SIDECARS as u64).then_some(()) },
    )
    .await;
    let reconnected_rss = relay.rss_kib();

    // istiod saw new connections no faster than the pacing allows: in any 1 s window, at most
    // the rate plus the burst.
    let recording = upstream.recording();
    let mut opened: Vec<Instant> = recording
        .streams
        .iter()
        .map(|s| s.opened_at)
        .filter(|at| *at >= restarted)
        .collect();
    opened.sort();
    assert_eq!(opened.len(), SIDECARS, "one istiod stream per sidecar");
    let mut busiest = 0;
    for (i, start) in opened.iter().enumerate() {
        let in_window = opened[i..]
            .iter()
            .take_while(|at| at.duration_since(*start) < Duration::from_secs(1))
            .count();
        busiest = busiest.max(in_window);
    }
    let per_stream = reconnected_rss.saturating_sub(idle_rss) / SIDECARS as u64;
    eprintln!(
        "{SIDECARS} sidecars served again {took:?} after the restart; busiest second at istiod: \
         {busiest} new streams; relay RSS idle {idle_rss} KiB, first start with all connected \
         {connected_rss} KiB, after the restart {reconnected_rss} KiB ({per_stream} KiB per stream)"
    );
    // Measured at istiod, after the handshakes of new connections, which bunch paced streams a
    // little: 10% of tolerance.
    assert!(
        busiest <= (RATE + BURST) * 11 / 10,
        "{busiest} new istiod streams in one second"
    );
    assert!(
        per_stream <= RSS_PER_STREAM_KIB,
        "{per_stream} KiB per stream"
    );
    for task in tasks {
        task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// 5. istiod closes a connection shared by several sidecars' streams (its MaxServerConnectionAge).

/// istiod sends a GOAWAY once a connection is 1 s old. Sidecars that connect afterwards must be
/// served on a new connection, not refused on the closing one, and the sidecars on the old
/// connection keep their streams and still get pushes. (istiod cutting the old connection after
/// its grace is the crash of part 1.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_closing_a_shared_connection_refuses_no_new_sidecar() {
    // Load: 4 SotW sidecars on one istiod connection (the relay's default puts up to 16 on one),
    // then 4 more after istiod's GOAWAY on it.
    const FIRST: usize = 4;
    const AGE: Duration = Duration::from_secs(1);

    let upstream =
        TestUpstream::start_with_connection_age(lds_snapshot("v0", big_listener(1024, 0)), AGE)
            .await
            .expect("start the upstream");
    let policies = policy_dir();
    let relay = RelayProcess::start(&upstream.url(), policies.path()).await;
    let channel = channel(&relay).await;
    let upstream_connections = || async {
        metric(
            &relay.admin_get("/metrics").await.body,
            "alpn_xds_upstream_connections",
        )
    };

    let started = Instant::now();
    let mut sidecars = Vec::new();
    for id in 0..FIRST {
        let mut client = AdsClient::open(Form::Sotw, channel.clone(), id)
            .await
            .expect("open a first sidecar");
        assert_eq!(client.next().await.as_deref(), Some("v0"), "sidecar {id}");
        sidecars.push(client);
    }
    assert_eq!(
        upstream_connections().await,
        Some(1.0),
        "the first four share one"
    );
    assert!(
        started.elapsed() < AGE,
        "the first four connected before the GOAWAY"
    );

    // Past the connection's age: istiod has sent its GOAWAY on it.
    tokio::time::sleep((AGE + Duration::from_millis(300)).saturating_sub(started.elapsed())).await;
    for id in FIRST..2 * FIRST {
        let opened = tokio::time::timeout(Duration::from_secs(2), async {
            let mut client = AdsClient::open(Form::Sotw, channel.clone(), id).await?;
            Ok::<_, tonic::Status>((client.next().await, client))
        })
        .await;
        let (version, client) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) => panic!("sidecar {id} refused after the GOAWAY: {status}"),
            Err(_) => panic!("sidecar {id} got nothing within 2 s after the GOAWAY"),
        };
        assert_eq!(version.as_deref(), Some("v0"), "sidecar {id}");
        sidecars.push(client);
    }
    // Each sidecar's stream reached istiod once: none was retried after a refusal.
    assert_eq!(upstream.recording().streams.len(), 2 * FIRST);
    let connections = upstream_connections().await;
    assert!(
        connections.is_some_and(|n| n >= 2.0),
        "a new connection after the GOAWAY: {connections:?}"
    );

    // Old and new streams alike still get istiod's pushes.
    upstream.push(LISTENER_TYPE_URL, "v1", vec![big_listener(1024, 1)]);
    for (id, client) in sidecars.iter_mut().enumerate() {
        let next = tokio::time::timeout(CONFIG_TIMEOUT, client.next()).await;
        assert_eq!(next, Ok(Some("v1".to_string())), "sidecar {id}");
    }
}
