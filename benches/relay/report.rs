//! The results as Markdown: the machine, the command, each target with its figure, the tables,
//! and how each number was taken. Written between two markers of `BENCHMARKS.md`, so that
//! anything written around them by hand stays.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::mesh::{Mesh, XdsType};
use crate::rewrite_cost::RewriteRow;
use crate::run::RunResult;
use crate::sidecars::Route;
use crate::stats::{ms, percentile};

/// Opens the generated part of the file.
pub const BEGIN: &str = "<!-- bench:begin (written by `cargo bench --bench relay`) -->";
/// Closes it.
pub const END: &str = "<!-- bench:end -->";

/// Streams at which the latency and fan-out targets are judged.
const TARGET_STREAMS: usize = 1000;
/// Added p99 latency allowed at [`TARGET_STREAMS`], ms.
const ADDED_P99_MS: f64 = 1.0;
/// Memory per stream allowed beyond the cache, bytes.
const BYTES_PER_STREAM: f64 = 64.0 * 1024.0;
/// Fan-out to [`TARGET_STREAMS`] proxies allowed, ms.
const FANOUT_MS: f64 = 1000.0;

/// Where and when the benchmark ran.
pub struct Machine {
    cpu: String,
    cores: usize,
    memory: String,
    os: String,
    rustc: String,
    commit: String,
    date: String,
    /// `/proc/loadavg` at the start.
    pub load_before: String,
    /// `/proc/loadavg` at the end.
    pub load_after: String,
}

impl Machine {
    /// Reads the machine's description.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .map_or_else(
                || "unknown".into(),
                |kib| format!("{:.1} GiB", kib / 1048576.0),
            );
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let os = os_release
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|l| l.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let dirty = !command("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            os: format!("{os}, Linux {}", kernel.trim()),
            rustc: command("rustc", &["--version"]),
            commit: format!(
                "{}{}",
                command("git", &["rev-parse", "--short", "HEAD"]),
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
            date: command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_before: load(),
            load_after: String::new(),
        }
    }
}

/// The load averages now.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// What was measured.
pub struct Results<'a> {
    /// The machine.
    pub machine: &'a Machine,
    /// The command line, as run.
    pub command: String,
    /// Part 1.
    pub rewrite: &'a [RewriteRow],
    /// Parts 2 and 3.
    pub runs: &'a [RunResult],
    /// The resources served.
    pub mesh: &'a Mesh,
    /// Simulated sidecar streams sharing one connection.
    pub sidecars_per_connection: usize,
    /// Total wall time, seconds.
    pub seconds: f64,
}

/// Writes `report` into `path` between the markers, or as a new file holding only them.
pub fn write_into(path: &Path, report: &str) -> anyhow::Result<()> {
    let block = format!("{BEGIN}\n{report}{END}\n");
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(begin), Some(end)) if begin < end => {
                format!(
                    "{}{block}{}",
                    &old[..begin],
                    old[end + END.len()..].trim_start_matches('\n')
                )
            }
            _ => format!("{}\n{block}", old.trim_end()),
        },
        Err(_) => format!("# Benchmarks\n\n{block}"),
    };
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The report.
pub fn render(r: &Results<'_>) -> String {
    let mut out = String::new();
    machine(&mut out, r);
    targets(&mut out, r);
    rewrite_table(&mut out, r.rewrite);
    latency_table(&mut out, r.runs);
    cpu_table(&mut out, r.runs);
    memory_table(&mut out, r.runs);
    fanout_table(&mut out, r.runs);
    method(&mut out, r);
    out
}

fn machine(out: &mut String, r: &Results<'_>) {
    let m = r.machine;
    let _ = writeln!(out, "## This run\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} |", m.cpu);
    let _ = writeln!(out, "| cores | {} |", m.cores);
    let _ = writeln!(out, "| memory | {} |", m.memory);
    let _ = writeln!(out, "| OS | {} |", m.os);
    let _ = writeln!(out, "| rustc | {} |", m.rustc);
    let _ = writeln!(out, "| commit | {} |", m.commit);
    let _ = writeln!(out, "| date | {} |", m.date);
    let _ = writeln!(out, "| command | `{}` |", r.command);
    let _ = writeln!(out, "| wall time | {:.0} s |", r.seconds);
    let _ = writeln!(
        out,
        "| load average (1, 5, 15 min) | {} at the start, {} at the end |",
        m.load_before, m.load_after
    );
    let _ = writeln!(
        out,
        "\nThe machine may have been shared with other work during the run (a load average \
         above the core count says it was): the relay, the upstream and the sidecars then \
         compete with it for the cores, which shows most in the p99 figures.\n"
    );
}

fn yes(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

fn targets(out: &mut String, r: &Results<'_>) {
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| target | measured | |\n|---|---|---|");
    if !r.rewrite.is_empty() {
        let worst = |f: fn(&RewriteRow) -> f64| r.rewrite.iter().map(f).fold(0.0, f64::max);
        let (de, copy) = (
            worst(RewriteRow::vs_decode_encode),
            worst(RewriteRow::vs_copy),
        );
        let sizes = list(r.rewrite.iter().map(|row| row.ports));
        let _ = writeln!(
            out,
            "| rewrite at most 0.5 × a prost decode and encode | at most {de:.2} × ({sizes} ports) | {} |",
            yes(de <= 0.5)
        );
        let _ = writeln!(
            out,
            "| rewrite at most 3 × a copy of the bytes | at most {copy:.2} × ({sizes} ports) | {} |",
            yes(copy <= 3.0)
        );
    }
    for run in r
        .runs
        .iter()
        .filter(|run| run.spec.streams == TARGET_STREAMS)
    {
        let form = run.spec.form.name();
        if let Some(added) = added(run, None, 99.0) {
            let lds = added_ms(run, Some(XdsType::Lds), 99.0);
            let _ = writeln!(
                out,
                "| p99 added latency at most 1 ms at 1,000 streams ({form}) | {added:.3} ms over all \
                 responses ({lds} ms for LDS alone) | {} |",
                yes(added <= ADDED_P99_MS)
            );
        }
    }
    for run in r.runs {
        let per_stream = run.bytes_per_stream();
        let shared = run.cache_entries as usize == run.expected_entries;
        let _ = writeln!(
            out,
            "| at most 64 KiB per stream beyond the listener cache, identical listeners stored \
             once ({} streams, {}) | {:.1} KiB per stream ({:.1} KiB for each stream of the \
             second half); cache {} entries for {} distinct listeners | {} |",
            run.spec.streams,
            run.spec.form.name(),
            per_stream / 1024.0,
            run.marginal_per_stream / 1024.0,
            run.cache_entries,
            run.expected_entries,
            yes(per_stream <= BYTES_PER_STREAM && shared)
        );
    }
    for run in r
        .runs
        .iter()
        .filter(|run| run.spec.streams == TARGET_STREAMS)
    {
        let worst = run
            .fanouts
            .iter()
            .map(|f| f.all_ms.unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max);
        let correct = run.fanouts.iter().all(|f| f.correct == run.spec.streams);
        let _ = writeln!(
            out,
            "| 1,000 proxies have their new listener within 1 s of a policy change ({}) | {} | {} |",
            run.spec.form.name(),
            if worst.is_finite() {
                format!("{worst:.0} ms (the slower of two changes)")
            } else {
                "not every proxy got it".into()
            },
            yes(worst <= FANOUT_MS && correct)
        );
    }
    let _ = writeln!(out);
}

fn list(items: impl Iterator<Item = usize>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

fn rewrite_table(out: &mut String, rows: &[RewriteRow]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "## 1. Rewrite cost per Listener\n");
    let _ = writeln!(
        out,
        "Istio-shaped `virtualInbound` listeners (testkit `virtual_inbound`, current layout, \
         `benchmark_ports(n)`: all PERMISSIVE, every third port TCP, every fifth undeclared), \
         rewritten with the standard ALPNs on every mTLS HTTP chain. Median time per listener.\n"
    );
    let _ = writeln!(
        out,
        "| ports | chains | bytes | rewritten bytes | rewrite | prost decode + encode | copy | \
         rewrite ÷ decode+encode | rewrite ÷ copy | relay cache hit |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} |",
            row.ports,
            row.chains,
            row.bytes,
            row.rewritten_bytes,
            us(row.rewrite_ns),
            us(row.decode_encode_ns),
            us(row.copy_ns),
            row.vs_decode_encode(),
            row.vs_copy(),
            us(row.cache_hit_ns),
        );
    }
    let _ = writeln!(out);
}

fn us(ns: f64) -> String {
    if ns >= 100_000.0 {
        format!("{:.0} µs", ns / 1000.0)
    } else {
        format!("{:.1} µs", ns / 1000.0)
    }
}

fn samples(run: &RunResult, route: Route, xds: Option<XdsType>) -> Vec<u64> {
    XdsType::ALL
        .into_iter()
        .filter(|t| xds.is_none_or(|x| x == *t))
        .flat_map(|t| run.latency.get(&(route, t)).cloned().unwrap_or_default())
        .collect()
}

/// Relay percentile minus direct percentile, ms.
fn added(run: &RunResult, xds: Option<XdsType>, p: f64) -> Option<f64> {
    let relay = percentile(&samples(run, Route::Relay, xds), p)?;
    let direct = percentile(&samples(run, Route::Direct, xds), p)?;
    Some(ms(relay) - ms(direct))
}

fn added_ms(run: &RunResult, xds: Option<XdsType>, p: f64) -> String {
    added(run, xds, p).map_or("–".into(), |v| format!("{v:.3}"))
}

fn latency_table(out: &mut String, runs: &[RunResult]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## 2. Relay overhead\n\n### Added latency per response\n"
    );
    let _ = writeln!(
        out,
        "From the upstream handing a push to HTTP/2 until the sidecar decoded it, in ms; \
         \"added\" is the relayed percentile minus the direct one.\n"
    );
    let _ = writeln!(
        out,
        "| sidecars | form | type | responses (each way) | direct p50 | direct p99 | relayed p50 | \
         relayed p99 | added p50 | added p99 |"
    );
    let _ = writeln!(out, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for run in runs {
        for xds in [
            None,
            Some(XdsType::Lds),
            Some(XdsType::Cds),
            Some(XdsType::Eds),
        ] {
            let direct = samples(run, Route::Direct, xds);
            let relay = samples(run, Route::Relay, xds);
            let p =
                |v: &[u64], q| percentile(v, q).map_or("–".into(), |x| format!("{:.3}", ms(x)));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                run.spec.streams,
                run.spec.form.name(),
                xds.map_or("all", XdsType::name),
                relay.len().min(direct.len()),
                p(&direct, 50.0),
                p(&direct, 99.0),
                p(&relay, 50.0),
                p(&relay, 99.0),
                added_ms(run, xds, 50.0),
                added_ms(run, xds, 99.0),
            );
        }
    }
    let dropped: u64 = runs.iter().map(|run| run.dropped).sum();
    let _ = writeln!(
        out,
        "\nPushes the upstream could not queue (and did not send): {dropped}.\n"
    );
}

fn cpu_table(out: &mut String, runs: &[RunResult]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(out, "### Relay CPU\n");
    let _ = writeln!(
        out,
        "CPU seconds (user + system) of the relay process while the pushes of one type went \
         through it and their ACKs came back, per 1,000 responses.\n"
    );
    let _ = writeln!(
        out,
        "| sidecars | form | type | responses relayed | relay CPU | CPU s per 1,000 responses |"
    );
    let _ = writeln!(out, "|---:|---|---|---:|---:|---:|");
    for run in runs {
        let all = (
            run.cpu_seconds.iter().sum::<f64>(),
            run.relayed.iter().sum::<u64>(),
        );
        let rows = [XdsType::Lds, XdsType::Cds, XdsType::Eds].map(|xds| {
            (
                xds.name(),
                run.cpu_seconds[xds.index()],
                run.relayed[xds.index()],
            )
        });
        for (name, cpu, count) in std::iter::once(("all", all.0, all.1)).chain(rows) {
            let _ = writeln!(
                out,
                "| {} | {} | {name} | {count} | {cpu:.2} s | {:.3} |",
                run.spec.streams,
                run.spec.form.name(),
                if count > 0 {
                    cpu * 1000.0 / count as f64
                } else {
                    f64::NAN
                },
            );
        }
    }
    let _ = writeln!(out);
}

fn memory_table(out: &mut String, runs: &[RunResult]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(out, "### Relay memory\n");
    let _ = writeln!(
        out,
        "| sidecars | form | connected | RSS, no stream | RSS, all streams idle | cache entries \
         (distinct listeners) | cache bytes | per stream beyond the cache | marginal per stream | \
         idle CPU | connect and sync |"
    );
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for run in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} MiB | {:.1} MiB | {} ({}) | {:.1} MiB | {:.1} KiB | {:.1} KiB | {:.1} % | {:.1} s |",
            run.spec.streams,
            run.spec.form.name(),
            run.connected,
            mib(run.rss_idle as f64),
            mib(run.rss_streams as f64),
            run.cache_entries,
            run.expected_entries,
            mib(run.cache_bytes as f64),
            run.bytes_per_stream() / 1024.0,
            run.marginal_per_stream / 1024.0,
            run.idle_cpu * 100.0,
            run.connect_secs,
        );
    }
    let _ = writeln!(out);
}

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

fn fanout_table(out: &mut String, runs: &[RunResult]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(out, "## 3. Fan-out of a policy change\n");
    let _ = writeln!(
        out,
        "From the write of the policy file until each relayed sidecar received the relay's push \
         of its new listener, in ms. The folder source waits 150 ms for the folder to settle \
         before reading it; that wait is included. \"Correct\" counts the sidecars whose new \
         `virtualInbound` has `h2` on its mTLS HTTP chains exactly when the policy says so.\n"
    );
    let _ = writeln!(
        out,
        "| sidecars | form | annotation | reached | correct | first | all | relay CPU |"
    );
    let _ = writeln!(out, "|---:|---|---|---:|---:|---:|---:|---:|");
    for run in runs {
        for f in &run.fanouts {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {:.2} s |",
                run.spec.streams,
                run.spec.form.name(),
                f.change,
                f.reached,
                f.correct,
                f.first_ms,
                f.all_ms.map_or("–".into(), |v| format!("{v:.0}")),
                f.relay_cpu_seconds,
            );
        }
    }
    let _ = writeln!(out);
}

fn method(out: &mut String, r: &Results<'_>) {
    let (lds, cds, eds) = r.mesh.sizes();
    let (nl, nc, ne) = r.mesh.counts();
    let spec = r.runs.first().map(|run| run.spec);
    let _ = writeln!(out, "## How each number is measured\n");
    let _ = writeln!(
        out,
        "- **Rewrite cost.** `rewrite_listener` (report included) against `Listener::decode` + \
         `encode_to_vec` (envoy-types 0.7.7, prost 0.14) and `to_vec` on the same bytes, in one \
         process, one thread. Each operation runs in batches of at least 20 ms (5 ms with \
         `--quick`); rounds interleave the operations; the figure is the median over the \
         rounds. \"Relay cache hit\" is the relay's `ListenerCache` lookup of a listener \
         already rewritten for another proxy, which is what most responses cost."
    );
    let _ = writeln!(
        out,
        "- **The mesh.** Each full response: LDS {nl} listeners, {lds} bytes (a 10-port \
         `virtualInbound` per workload plus shared outbound listeners: `virtualInbound`-shaped \
         stand-ins of two ports marked OUTBOUND, which the relay reads only at the top level); \
         CDS {nc} EDS clusters, {cds} bytes; EDS {ne} load assignments, {eds} bytes. Delta \
         pushes carry only what changed: the workload's `virtualInbound`, or 10 clusters or \
         load assignments. Ten sidecars share a workload, so they share one `virtualInbound` \
         and its rewrite. One namespace-level PeerAuthentication annotated `\"true\"` rewrites \
         every mTLS HTTP chain."
    );
    let _ = writeln!(
        out,
        "- **Processes.** The relay is the `alpn-xds serve` binary built by this command, in a \
         process of its own with its default log level (info, to a file). The benchmark \
         process holds the upstream (an ADS server playing istiod, without the test upstream's \
         recording) and the simulated sidecars. All on 127.0.0.1."
    );
    let sharing = match r.sidecars_per_connection {
        1 => "each has its own HTTP/2 connection, as real sidecars do".to_string(),
        n => format!(
            "{n} streams share one HTTP/2 connection (real sidecars each have their own, which \
             costs the relay the buffers of one connection more per sidecar)"
        ),
    };
    let _ = writeln!(
        out,
        "- **Sidecars.** Each is one ADS stream that subscribes to CDS, EDS and LDS with an \
         Istio node (namespace `bench`, pod, labels) and ACKs every response; {sharing}, on both \
         paths alike. The relay puts up to 16 of its streams to the upstream on one connection \
         (its default `--upstream-streams-per-connection`). As many sidecars connect straight \
         to the upstream as through the relay, 100 of each at a time, each batch in sync before \
         the next."
    );
    if let Some(spec) = spec {
        let _ = writeln!(
            out,
            "- **Added latency.** The upstream writes the moment it hands a push to HTTP/2 into \
             the nonce; the sidecar takes the difference on decoding it (one clock: both are in \
             the benchmark process). For each type, {} pushes go to relayed sidecars and {} to \
             direct ones, alternating, evenly spread at {:.0} per second each way, each to a \
             different sidecar in turn. During the LDS pushes istiod's listeners change every \
             {} pushes, so the first sidecar of each workload after a change pays for a \
             rewrite and the others find it in the cache. Added = relayed percentile minus \
             direct percentile.",
            spec.pushes_per_type, spec.pushes_per_type, spec.rate, 100
        );
    }
    let _ = writeln!(
        out,
        "- **CPU.** utime + stime of the relay from `/proc/<pid>/stat` (resolution 10 ms) \
         around each type's pushes, until the last of them arrived; this includes the ACKs."
    );
    let _ = writeln!(
        out,
        "- **Memory.** `VmRSS` of the relay from `/proc/<pid>/status`: once after start with no \
         stream, once with every sidecar connected, in sync and idle for 2 s. Per stream = \
         (RSS with streams − RSS without − cache bytes) ÷ streams. Cache bytes are the bytes of \
         the distinct listeners the relay's cache must hold (istiod's and the rewrite), \
         computed with the relay's own `ListenerCache` on the same inputs; the relay's \
         `cached_listeners` (from `/debug/proxies`) must equal their number for \"stored \
         once\". \"Marginal\" is the same with half the sidecars as the baseline instead of \
         none: what each of the second half added, without what the first batch left behind \
         in the allocator. \"Idle CPU\" is the relay's CPU over 5 s with every stream idle, \
         as a share of one core."
    );
    let _ = writeln!(
        out,
        "- **Fan-out.** The namespace policy file is replaced (write and rename) with the \
         annotation flipped; each relayed sidecar notes when the relay's own LDS push reaches \
         it. Then it is flipped back."
    );
    let _ = writeln!(out);
}
