//! Parts 2 and 3 for one number of sidecars and one ADS form: the relay's added latency, CPU
//! and memory, measured side by side with the direct path, then the fan-out of policy changes.
//!
//! One run: the bench upstream and a fresh relay process start; sidecars connect in batches,
//! as many straight to the upstream as through the relay; the relay's memory is read with all
//! of them idle; pushes of each type go out spread over time, alternating between a direct and
//! a relayed sidecar, while the relay's CPU time is read; then the policy folder changes twice
//! and the time until every relayed sidecar has its new listener is taken.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use prost::Message;

use alpn_xds::relay::ListenerCache;
use alpn_xds::relay::listeners::Envelope;
use alpn_xds::rewrite::{ChainClass, RewritePlan, inspect_listener};
use alpn_xds::wire;

use crate::mesh::{Form, Mesh, SIDECARS_PER_WORKLOAD, XdsType};
use crate::relay_process::RelayProcess;
use crate::sidecars::{Fleet, RelayPush, Route, SidecarId};
use crate::upstream::BenchUpstream;

/// Sidecars connected at a time, per route, before waiting for them to be in sync.
const CONNECT_BATCH: usize = 100;
/// How long one batch may take to sync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long measured pushes may take to arrive after the last one is sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a policy change may take to reach every sidecar.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(60);
/// LDS pushes per route between two generations of istiod's listeners.
const PUSHES_PER_GENERATION: usize = 100;
/// How long the relay's CPU is watched with every stream idle.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// A prime that spreads the pushes over the sidecars.
const SPREAD: usize = 7919;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct RunSpec {
    /// Sidecars per route.
    pub streams: usize,
    /// Their ADS form.
    pub form: Form,
    /// Measured pushes of each type, per route.
    pub pushes_per_type: usize,
    /// Pushes per second, per route.
    pub rate: f64,
    /// Sidecar streams that share one connection, on both routes.
    pub sidecars_per_connection: usize,
}

/// Everything a run shares with the others.
pub struct RunContext {
    /// The `alpn-xds` binary.
    pub bin: PathBuf,
    /// What the upstream serves.
    pub mesh: Arc<Mesh>,
    /// Zero of every time stamp.
    pub epoch: Instant,
    /// Where policy folders and relay logs go.
    pub workdir: PathBuf,
}

/// One policy change and how long it took to reach every relayed sidecar.
#[derive(Clone, Debug)]
pub struct Fanout {
    /// The annotation before and after.
    pub change: &'static str,
    /// Sidecars that got their new listener.
    pub reached: usize,
    /// From the write of the policy file until the first sidecar had its listener, in ms.
    pub first_ms: f64,
    /// Until the last one had it; `None` if some never did.
    pub all_ms: Option<f64>,
    /// Sidecars whose new `virtualInbound` had the standard ALPNs as the policy says.
    pub correct: usize,
    /// Relay CPU seconds from the change until every sidecar had its listener.
    pub relay_cpu_seconds: f64,
}

/// The figures of one run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// What was run.
    pub spec: RunSpec,
    /// Time to connect and sync every sidecar of both routes, in seconds.
    pub connect_secs: f64,
    /// Relay RSS before any sidecar connected, bytes.
    pub rss_idle: u64,
    /// Relay RSS with every sidecar connected, in sync and idle, bytes.
    pub rss_streams: u64,
    /// Relay RSS added per stream from half the sidecars to all of them, beyond the listeners
    /// the added workloads brought into the cache, bytes.
    pub marginal_per_stream: f64,
    /// Relay CPU seconds per second with every stream idle (keepalives and timers).
    pub idle_cpu: f64,
    /// Proxies the relay reports connected.
    pub connected: u64,
    /// Entries in the relay's listener cache.
    pub cache_entries: u64,
    /// Entries expected: one per distinct listener.
    pub expected_entries: usize,
    /// Bytes of the listeners those entries hold (istiod's and the rewrite).
    pub cache_bytes: usize,
    /// Latencies of measured pushes, by route and type, in nanoseconds.
    pub latency: HashMap<(Route, XdsType), Vec<u64>>,
    /// Relay CPU seconds during each type's pushes, by [`XdsType::index`].
    pub cpu_seconds: [f64; 3],
    /// Responses relayed during those pushes.
    pub relayed: [u64; 3],
    /// Pushes the upstream could not queue.
    pub dropped: u64,
    /// The two policy changes.
    pub fanouts: Vec<Fanout>,
    /// Streams that failed, with the reason.
    pub failures: Vec<String>,
}

impl RunResult {
    /// Relay memory per sidecar stream beyond the shared listener cache, bytes.
    pub fn bytes_per_stream(&self) -> f64 {
        let beyond = self.rss_streams as f64 - self.rss_idle as f64 - self.cache_bytes as f64;
        beyond / self.spec.streams as f64
    }
}

/// Runs one spec.
pub async fn run(spec: RunSpec, ctx: &RunContext) -> anyhow::Result<RunResult> {
    let name = format!("{}-{}", spec.form.name().to_lowercase(), spec.streams);
    let policies = ctx.workdir.join(format!("policies-{name}"));
    std::fs::create_dir_all(&policies)?;
    write_policy(&policies, true)?;

    let upstream = BenchUpstream::start(ctx.mesh.clone(), ctx.epoch).await?;
    let log = ctx.workdir.join(format!("relay-{name}.log"));
    let relay = RelayProcess::start(&ctx.bin, &upstream.url(), &policies, &log).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = relay.rss_bytes()?;

    let mut direct = Fleet::new(Route::Direct, &spec, upstream.addr(), ctx.epoch);
    let mut relayed = Fleet::new(Route::Relay, &spec, relay.listen, ctx.epoch);
    // Half the sidecars, then all of them, each time idle and holding their listeners: the
    // difference is what the second half costs, without what the first stream costs once.
    let half = spec.streams / 2;
    let started = Instant::now();
    connect(&mut direct, &mut relayed, half).await?;
    let mut connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_half = relay.rss_bytes()?;
    let (_, cache_half) = expected_cache(&ctx.mesh, spec.form, half);

    let started = Instant::now();
    connect(&mut direct, &mut relayed, spec.streams).await?;
    connect_secs += started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_streams = relay.rss_bytes()?;
    let (cache_entries, connected) = relay.cache_and_connected().await?;
    let (expected_entries, cache_bytes) = expected_cache(&ctx.mesh, spec.form, spec.streams);
    let marginal = (rss_streams as f64 - rss_half as f64 - (cache_bytes - cache_half) as f64)
        / (spec.streams - half) as f64;
    let idle_before = relay.cpu_seconds()?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu = (relay.cpu_seconds()? - idle_before) / IDLE_WINDOW.as_secs_f64();

    let mut cpu_seconds = [0.0; 3];
    let mut relayed_count = [0; 3];
    let mut dropped = 0;
    for xds in [XdsType::Eds, XdsType::Cds, XdsType::Lds] {
        let cpu_before = relay.cpu_seconds()?;
        let pushed = push_phase(spec, xds, &upstream, &ctx.mesh, [&direct, &relayed]).await?;
        cpu_seconds[xds.index()] = relay.cpu_seconds()? - cpu_before;
        relayed_count[xds.index()] = pushed.relayed;
        dropped += pushed.dropped;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut latency: HashMap<(Route, XdsType), Vec<u64>> = HashMap::new();
    for (route, fleet) in [(Route::Direct, &direct), (Route::Relay, &relayed)] {
        for sample in fleet.stats.take_samples() {
            latency
                .entry((route, sample.xds))
                .or_default()
                .push(sample.latency_ns);
        }
    }

    let mut fanouts = Vec::new();
    for (change, on) in [("true → false", false), ("false → true", true)] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu_before = relay.cpu_seconds()?;
        let mut result = fanout(change, on, &policies, &relayed, spec, ctx.epoch).await?;
        result.relay_cpu_seconds = relay.cpu_seconds()? - cpu_before;
        fanouts.push(result);
    }

    let mut failures = direct.stats.failures();
    failures.extend(relayed.stats.failures());
    direct.close().await;
    relayed.close().await;
    drop(relay);
    drop(upstream);

    Ok(RunResult {
        spec,
        connect_secs,
        rss_idle,
        rss_streams,
        marginal_per_stream: marginal,
        idle_cpu,
        connected,
        cache_entries,
        expected_entries,
        cache_bytes,
        latency,
        cpu_seconds,
        relayed: relayed_count,
        dropped,
        fanouts,
        failures,
    })
}

/// Connects `streams` sidecars on each route, a batch at a time, each batch in sync before the
/// next: sidecars arrive over a few seconds, not in one instant.
async fn connect(direct: &mut Fleet, relayed: &mut Fleet, streams: usize) -> anyhow::Result<()> {
    while direct.len() < streams {
        let batch = CONNECT_BATCH.min(streams - direct.len());
        direct.add(batch).await?;
        relayed.add(batch).await?;
        let target = direct.len();
        let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
        loop {
            let synced = [&*direct, &*relayed].map(|f| f.stats.synced.load(Ordering::Relaxed));
            if synced.iter().all(|&s| s >= target) {
                break;
            }
            let failures = [&*direct, &*relayed].map(|f| f.stats.failures());
            if let Some(failure) = failures.iter().flatten().next() {
                bail!("a sidecar failed while connecting: {failure}");
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("sidecars not in sync after {SYNC_TIMEOUT:?}: {synced:?} of {target}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

struct Pushed {
    relayed: u64,
    dropped: u64,
}

/// Sends `pushes_per_type` pushes of `xds` to each route, alternating, spread evenly at the
/// spec's rate, and waits until they have arrived.
async fn push_phase(
    spec: RunSpec,
    xds: XdsType,
    upstream: &BenchUpstream,
    mesh: &Mesh,
    fleets: [&Fleet; 2],
) -> anyhow::Result<Pushed> {
    let before = fleets.map(|f| f.stats.received[xds.index()].load(Ordering::Relaxed));
    let mut sent = [0u64; 2];
    let mut dropped = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(0.5 / spec.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    for k in 0..2 * spec.pushes_per_type {
        ticker.tick().await;
        let (route_index, n) = (k % 2, k / 2);
        if xds == XdsType::Lds && route_index == 0 && n > 0 && n % PUSHES_PER_GENERATION == 0 {
            mesh.bump_generation();
        }
        let route = [Route::Direct, Route::Relay][route_index];
        let index = (n * SPREAD) % spec.streams;
        if upstream.push(SidecarId { route, index }, xds) {
            sent[route_index] += 1;
        } else {
            dropped += 1;
        }
    }

    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    loop {
        let arrived = [0, 1]
            .map(|i| fleets[i].stats.received[xds.index()].load(Ordering::Relaxed) - before[i]);
        if arrived[0] >= sent[0] && arrived[1] >= sent[1] {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{} pushes: {arrived:?} of {sent:?} arrived", xds.name());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Pushed {
        relayed: sent[1],
        dropped,
    })
}

/// Writes the namespace policy with the annotation `on`, and measures how long the relay
/// takes to push every relayed sidecar its new listener.
async fn fanout(
    change: &'static str,
    on: bool,
    policies: &Path,
    relayed: &Fleet,
    spec: RunSpec,
    epoch: Instant,
) -> anyhow::Result<Fanout> {
    let since = nanos(epoch);
    write_policy(policies, on)?;

    let deadline = tokio::time::Instant::now() + FANOUT_TIMEOUT;
    let pushes = loop {
        let pushes = relayed.stats.relay_pushes_since(since);
        let reached: BTreeSet<usize> = pushes.iter().map(|p| p.index).collect();
        if reached.len() >= spec.streams || tokio::time::Instant::now() >= deadline {
            break pushes;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // The first push each sidecar got after the change.
    let mut first: HashMap<usize, &RelayPush> = HashMap::new();
    for push in &pushes {
        first.entry(push.index).or_insert(push);
    }
    let ms = |at: u64| at.saturating_sub(since) as f64 / 1e6;
    let correct = first
        .values()
        .filter(|p| has_standard_alpns(spec.form, &p.inbound) == Some(on))
        .count();
    Ok(Fanout {
        change,
        reached: first.len(),
        first_ms: first
            .values()
            .map(|p| ms(p.at_ns))
            .fold(f64::INFINITY, f64::min),
        all_ms: (first.len() >= spec.streams)
            .then(|| first.values().map(|p| ms(p.at_ns)).fold(0.0, f64::max)),
        correct,
        relay_cpu_seconds: 0.0,
    })
}

/// Whether the mTLS HTTP chains of a pushed `virtualInbound` (wrapped as `form` wraps it) list
/// `h2`; `None` if it cannot be read.
fn has_standard_alpns(form: Form, wrapped: &Bytes) -> Option<bool> {
    let listener = match form {
        Form::Sotw => wire::Any::decode(wrapped.clone()).ok()?.value,
        Form::Delta => {
            wire::Resource::decode(wrapped.clone())
                .ok()?
                .resource?
                .value
        }
    };
    let chains = inspect_listener(&listener).ok()?;
    let mtls_http: Vec<_> = chains
        .iter()
        .filter(|c| matches!(c.kind, ChainClass::MtlsHttp(_)))
        .collect();
    if mtls_http.is_empty() {
        return None;
    }
    Some(mtls_http.iter().all(|c| c.alpns.iter().any(|a| a == "h2")))
}

/// The listener cache the relay should have after the sidecars connected: one entry per
/// distinct listener, and the bytes of istiod's listener and its rewrite in each. Computed with
/// the relay's own cache type on the same inputs.
fn expected_cache(mesh: &Mesh, form: Form, streams: usize) -> (usize, usize) {
    let envelope = match form {
        Form::Sotw => Envelope::Any,
        Form::Delta => Envelope::Resource,
    };
    let plan = RewritePlan {
        default: true,
        ports: Default::default(),
    };
    let cache = ListenerCache::default();
    let workloads = streams.div_ceil(SIDECARS_PER_WORKLOAD);
    let inbound = (0..workloads).map(|w| mesh.inbound(form, w));
    // Held, as the relay's streams hold theirs: the cache sweeps entries nobody refers to once
    // it holds 8 MiB, and would then count fewer than the relay must keep.
    let held: Vec<_> = inbound
        .chain(mesh.outbound(form).iter().cloned())
        .map(|listener| cache.rewrite(envelope, &plan, &listener))
        .collect();
    let bytes = held
        .iter()
        .map(|entry| entry.input.len() + entry.output.as_ref().map_or(0, Bytes::len))
        .sum();
    (cache.len(), bytes)
}

/// The namespace-level PeerAuthentication of namespace `bench`, annotated `on`, written in one
/// step so that the relay never reads half of it.
fn write_policy(dir: &Path, on: bool) -> anyhow::Result<()> {
    let yaml = format!(
        r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: bench
  creationTimestamp: "2026-01-01T00:00:00Z"
  annotations:
    http-alpns.aspenmesh.io: "{on}"
spec:
  mtls:
    mode: PERMISSIVE
"#
    );
    let partial = dir.join(".bench.yaml.partial");
    std::fs::write(&partial, yaml).context("writing the policy")?;
    std::fs::rename(&partial, dir.join("bench.yaml")).context("renaming the policy")?;
    Ok(())
}

fn nanos(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
