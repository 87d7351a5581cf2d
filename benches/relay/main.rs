//! What the relay costs, against the direct path and the floor.
//!
//! ```sh
//! cargo bench --bench relay -- --out BENCHMARKS.md   # everything, about 10 minutes on 2 cores
//! cargo bench --bench relay -- --quick               # a subset, printed, about 2 minutes
//! ```
//!
//! 1. The rewrite of Istio-shaped `virtualInbound` listeners of 10, 100 and 500 ports, against a
//!    full prost decode and encode and a plain copy of the same bytes ([`rewrite_cost`]).
//! 2. 100, 1,000 and 5,000 simulated sidecars in both ADS forms, as many straight to a test
//!    upstream as through the real `alpn-xds serve` binary: added latency per response, relay
//!    CPU per 1,000 responses, relay memory per stream ([`run`]).
//! 3. The time from a policy change until every relayed sidecar has its new listener.
//!
//! Under `cargo test` (no `--bench` argument) it runs a few seconds' smoke version of each part
//! and checks that nothing failed, so that the benchmark keeps working.

mod grpc;
mod mesh;
mod relay_process;
mod report;
mod rewrite_cost;
mod run;
mod sidecars;
mod stats;
mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

use mesh::{Form, Mesh};
use report::{Machine, Results};
use rewrite_cost::Effort;
use run::{RunContext, RunResult, RunSpec};
use sidecars::DEFAULT_STREAMS_PER_CONNECTION;

/// Measures what alpn-xds costs.
#[derive(Debug, Parser)]
#[command(name = "relay-bench")]
struct Args {
    /// Write the results into this Markdown file, between its benchmark markers (the rest of
    /// the file is kept); without it they are printed.
    #[arg(long)]
    out: Option<PathBuf>,

    /// A quicker subset: 100 and 1,000 sidecars, fewer pushes, shorter timing batches.
    #[arg(long)]
    quick: bool,

    /// Sidecar counts to run (default 100,1000,5000; with --quick 100,1000).
    #[arg(long, value_delimiter = ',')]
    streams: Option<Vec<usize>>,

    /// Skip part 1, the rewrite cost.
    #[arg(long)]
    no_rewrite: bool,

    /// Skip parts 2 and 3, the relay runs.
    #[arg(long)]
    no_relay: bool,

    /// Simulated sidecar streams sharing one HTTP/2 connection (1: each its own, as real
    /// sidecars have; more sockets and more CPU in this process).
    #[arg(long, default_value_t = DEFAULT_STREAMS_PER_CONNECTION)]
    sidecars_per_connection: usize,

    /// ADS forms to run: sotw, delta (default both).
    #[arg(long, value_delimiter = ',')]
    forms: Option<Vec<String>>,

    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs this without `--bench`, with the test harness's arguments.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Runtime::new()?;
    if !benchmarking {
        return runtime.block_on(smoke());
    }
    let args = Args::parse();
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut machine = Machine::read();
    let streams = args.streams.clone().unwrap_or_else(|| {
        if args.quick {
            vec![100, 1000]
        } else {
            vec![100, 1000, 5000]
        }
    });
    let forms = forms(args.forms.as_deref())?;
    let per_connection = args.sidecars_per_connection.max(1);
    check_open_files(streams.iter().copied().max().unwrap_or(0), per_connection)?;

    let rewrite = if args.no_rewrite {
        Vec::new()
    } else {
        let effort = if args.quick {
            Effort {
                rounds: 7,
                batch: Duration::from_millis(5),
            }
        } else {
            Effort {
                rounds: 21,
                batch: Duration::from_millis(20),
            }
        };
        eprintln!("part 1: rewrite cost");
        rewrite_cost::measure(&[10, 100, 500], effort)?
    };

    let mesh = Arc::new(Mesh::new());
    let pushes_per_type = if args.quick { 300 } else { 1000 };
    let runs = if args.no_relay {
        Vec::new()
    } else {
        let specs: Vec<RunSpec> = streams
            .iter()
            .flat_map(|&n| {
                forms.iter().map(move |&form| RunSpec {
                    streams: n,
                    form,
                    pushes_per_type,
                    rate: 200.0,
                    sidecars_per_connection: per_connection,
                })
            })
            .collect();
        relay_runs(&specs, mesh.clone()).await?
    };

    machine.load_after = report::load();
    let command = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
        .join(" ");
    let results = Results {
        machine: &machine,
        command: format!("cargo bench --bench relay -- {command}")
            .trim()
            .to_string(),
        rewrite: &rewrite,
        runs: &runs,
        mesh: &mesh,
        sidecars_per_connection: per_connection,
        seconds: started.elapsed().as_secs_f64(),
    };
    let text = report::render(&results);
    match &args.out {
        Some(path) => {
            report::write_into(path, &text)?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{text}"),
    }
    Ok(())
}

/// Runs each spec with a fresh relay, keeping the relay logs if one fails.
async fn relay_runs(specs: &[RunSpec], mesh: Arc<Mesh>) -> anyhow::Result<Vec<RunResult>> {
    let workdir = tempfile::Builder::new()
        .prefix("alpn-xds-bench-")
        .tempdir()?;
    let ctx = RunContext {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_alpn-xds")),
        mesh,
        epoch: Instant::now(),
        workdir: workdir.path().to_path_buf(),
    };
    let mut results = Vec::new();
    for spec in specs {
        eprintln!(
            "parts 2 and 3: {} sidecars each way, {}",
            spec.streams,
            spec.form.name()
        );
        match run::run(*spec, &ctx).await {
            Ok(result) => {
                if !result.failures.is_empty() {
                    eprintln!(
                        "  {} streams failed, first: {}",
                        result.failures.len(),
                        result.failures[0]
                    );
                }
                results.push(result);
            }
            Err(e) => {
                let kept = workdir.keep();
                return Err(e.context(format!("relay logs kept in {}", kept.display())));
            }
        }
    }
    Ok(results)
}

fn forms(names: Option<&[String]>) -> anyhow::Result<Vec<Form>> {
    let Some(names) = names else {
        return Ok(vec![Form::Sotw, Form::Delta]);
    };
    names
        .iter()
        .map(|name| match name.as_str() {
            "sotw" => Ok(Form::Sotw),
            "delta" => Ok(Form::Delta),
            other => bail!("unknown form {other:?}: sotw or delta"),
        })
        .collect()
}

/// This process holds both ends of the direct connections, the sidecars' ends of the relayed
/// ones and the upstream's end of the relay's (16 streams to a connection by default).
fn check_open_files(streams: usize, per_connection: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft: Option<usize> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok());
    let needed = 3 * streams.div_ceil(per_connection) + streams / 16 + 256;
    match soft {
        Some(limit) if limit < needed => bail!(
            "{streams} streams need about {needed} open files and the limit is {limit}: \
             run `ulimit -n 65536` first"
        ),
        _ => Ok(()),
    }
}

/// A few seconds of each part, checking only that everything works.
async fn smoke() -> anyhow::Result<()> {
    let effort = Effort {
        rounds: 1,
        batch: Duration::from_millis(1),
    };
    let rows = rewrite_cost::measure(&[10], effort)?;
    let mesh = Arc::new(Mesh::new());
    let specs = [Form::Sotw, Form::Delta].map(|form| RunSpec {
        streams: 10,
        form,
        pushes_per_type: 5,
        rate: 100.0,
        sidecars_per_connection: DEFAULT_STREAMS_PER_CONNECTION,
    });
    let runs = relay_runs(&specs, mesh).await?;
    for run in &runs {
        let form = run.spec.form.name();
        if let Some(failure) = run.failures.first() {
            bail!("{form}: a sidecar failed: {failure}");
        }
        if run.fanouts.iter().any(|f| f.correct != run.spec.streams) {
            bail!(
                "{form}: a policy change did not reach every sidecar: {:?}",
                run.fanouts
            );
        }
        if run.cache_entries as usize != run.expected_entries {
            bail!(
                "{form}: the relay caches {} listeners, {} expected",
                run.cache_entries,
                run.expected_entries
            );
        }
    }
    let rewrite = rows.first().context("no rewrite figures")?;
    println!(
        "relay benchmark smoke run: ok (rewrite of a 10-port listener {:.0} ns; {} relay runs)",
        rewrite.rewrite_ns,
        runs.len()
    );
    Ok(())
}
