//! Part 1: what the rewrite costs per Listener, against a full prost decode and encode and a
//! plain copy of the same bytes, measured side by side.
//!
//! Each operation runs in batches long enough for the clock; the rounds interleave the
//! operations so that a busy moment of the machine hits all of them alike, and the figure is
//! the median time per operation over the rounds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;

use alpn_xds::relay::ListenerCache;
use alpn_xds::relay::listeners::{Envelope, LISTENER_TYPE};
use alpn_xds::rewrite::{RewritePlan, rewrite_listener};
use alpn_xds::testkit::istio::{Layout, Mode, benchmark_ports, virtual_inbound};
use alpn_xds::wire;

use crate::stats::median;

/// How long to time the operations.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    /// Rounds, each timing every operation once.
    pub rounds: usize,
    /// Length of one timed batch.
    pub batch: Duration,
}

/// The figures for one listener size; times in nanoseconds per listener.
#[derive(Clone, Debug)]
pub struct RewriteRow {
    /// Ports of the workload.
    pub ports: usize,
    /// Filter chains of the listener.
    pub chains: usize,
    /// Bytes of istiod's listener.
    pub bytes: usize,
    /// Bytes of the rewritten listener.
    pub rewritten_bytes: usize,
    /// The rewrite (`rewrite_listener`), report included.
    pub rewrite_ns: f64,
    /// `Listener::decode` and `encode_to_vec` with envoy-types.
    pub decode_encode_ns: f64,
    /// `to_vec` of the bytes.
    pub copy_ns: f64,
    /// The relay's lookup of a listener already rewritten for another proxy (its `Any` form).
    pub cache_hit_ns: f64,
}

impl RewriteRow {
    /// Rewrite time over decode-and-encode time.
    pub fn vs_decode_encode(&self) -> f64 {
        self.rewrite_ns / self.decode_encode_ns
    }

    /// Rewrite time over copy time.
    pub fn vs_copy(&self) -> f64 {
        self.rewrite_ns / self.copy_ns
    }
}

/// Measures Istio-shaped `virtualInbound` listeners of each port count in `sizes`.
pub fn measure(sizes: &[usize], effort: Effort) -> anyhow::Result<Vec<RewriteRow>> {
    sizes
        .iter()
        .map(|&ports| measure_one(ports, effort))
        .collect()
}

fn measure_one(ports: usize, effort: Effort) -> anyhow::Result<RewriteRow> {
    let listener = virtual_inbound(Layout::Current, Mode::Permissive, &benchmark_ports(ports));
    let chains = listener.filter_chains.len();
    let bytes = Bytes::from(listener.encode_to_vec());
    let plan = RewritePlan {
        default: true,
        ports: Default::default(),
    };
    let rewritten = rewrite_listener(&bytes, &plan)?
        .output
        .ok_or_else(|| anyhow::anyhow!("the {ports}-port listener was not rewritten"))?;

    let any = Bytes::from(
        wire::Any {
            type_url: LISTENER_TYPE.to_string(),
            value: bytes.clone(),
        }
        .encode_to_vec(),
    );
    let cache = ListenerCache::default();
    // The first lookup rewrites; the ones timed find it, as every proxy but the first does.
    cache.rewrite(Envelope::Any, &plan, &any);

    // Rewrite, decode and encode, copy, cache hit: the order of `RewriteRow`'s times.
    let mut ops: [Box<dyn FnMut()>; 4] = [
        Box::new(|| {
            black_box(rewrite_listener(black_box(&bytes), &plan).ok());
        }),
        Box::new(|| {
            let decoded = Listener::decode(black_box(&bytes[..])).ok();
            black_box(decoded.map(|l| l.encode_to_vec()));
        }),
        Box::new(|| {
            black_box(black_box(&bytes[..]).to_vec());
        }),
        Box::new(|| {
            black_box(cache.rewrite(Envelope::Any, &plan, black_box(&any)));
        }),
    ];

    // Warm up, and find how many runs fill a batch.
    let mut iterations = [1u64; 4];
    for (slot, op) in iterations.iter_mut().zip(ops.iter_mut()) {
        *slot = calibrate(op.as_mut(), effort.batch);
    }
    let mut per_op: [Vec<f64>; 4] = Default::default();
    for round in 0..effort.rounds {
        for k in 0..ops.len() {
            // A different operation leads each round.
            let i = (k + round) % ops.len();
            let op = ops[i].as_mut();
            per_op[i].push(time(op, iterations[i]));
        }
    }

    Ok(RewriteRow {
        ports,
        chains,
        bytes: bytes.len(),
        rewritten_bytes: rewritten.len(),
        rewrite_ns: median(&per_op[0]),
        decode_encode_ns: median(&per_op[1]),
        copy_ns: median(&per_op[2]),
        cache_hit_ns: median(&per_op[3]),
    })
}

/// Runs `op` until a batch of `target` is reached, doubling; returns the runs per batch.
fn calibrate(op: &mut dyn FnMut(), target: Duration) -> u64 {
    let mut iterations = 1u64;
    // At most 40 doublings; each batch is bounded by the target once reached.
    for _ in 0..40 {
        let start = Instant::now();
        for _ in 0..iterations {
            op();
        }
        if start.elapsed() >= target {
            return iterations;
        }
        iterations *= 2;
    }
    iterations
}

/// Nanoseconds per run of `op` over `iterations` runs.
fn time(op: &mut dyn FnMut(), iterations: u64) -> f64 {
    let start = Instant::now();
    for _ in 0..iterations {
        op();
    }
    start.elapsed().as_nanos() as f64 / iterations as f64
}
