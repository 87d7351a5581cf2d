//! `alpn-xds explain`: offline, from files, what the relay would do to one workload's listeners
//! and why. It reads the policies as `serve` does, resolves them for the workload, builds the
//! same rewrite plan and runs the same rewrite on a listener dump, then reports the decision
//! with its reasons and every chain that would change, for people or as JSON.
//!
//! - `input`: the policies, the dump, and the workload from flags or node metadata.
//! - `model`: the [`Explanation`], everything found, as `--output json` prints it.
//! - `report`: building the explanation from the policy and the relay's own rewrite.
//! - `text`: the explanation for people.

mod input;
mod model;
mod report;
mod text;

use std::io::Write;
use std::process::ExitCode;

use crate::config::{ExplainArgs, OutputFormat};
use crate::dump::DumpError;
use crate::source::SourceError;

pub use input::WorkloadInfo;
pub use model::{
    ChainClassCounts, Decision, DumpSummary, ExplainedChain, Explanation, FORMAT_VERSION,
    Http10Note, Http10State, ListenerExplanation, PoliciesRead, PortExplanation, Warning,
    WarningKind,
};

/// The exit code of a usage or input error.
pub const EXIT_INPUT_ERROR: u8 = 2;

/// Why `explain` could not explain: an input it cannot use. Each names the flag and the file,
/// and the field at fault when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// An input file could not be read.
    #[error("{flag} {path}: cannot read it: {source}")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The policy folder could not be listed or one of its files read.
    #[error("--policy-dir: {0}")]
    PolicyDir(#[source] SourceError),
    /// The listener dump is not JSON, none of the accepted documents, or malformed around its
    /// listeners.
    #[error("--listeners {path}: {source}")]
    Dump {
        /// The dump file.
        path: String,
        /// What is wrong, with the JSON path of the value at fault.
        #[source]
        source: DumpError,
    },
    /// Not one listener of the dump could be read.
    #[error("--listeners {path}: none of its {count} listeners could be read; the first: {first}")]
    NoListenerReadable {
        /// The dump file.
        path: String,
        /// How many listeners failed.
        count: usize,
        /// The first failure.
        #[source]
        first: DumpError,
    },
    /// The node metadata file is not JSON.
    #[error("--node-metadata {path}: not valid JSON: {source}")]
    NodeMetadataSyntax {
        /// The file.
        path: String,
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field of the node metadata file has the wrong shape.
    #[error("--node-metadata {path}: {field}: {problem}")]
    NodeMetadata {
        /// The file.
        path: String,
        /// The field at fault, as a JSON path.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The node metadata gives no namespace, neither in `NAMESPACE` nor in the node id.
    #[error(
        "--node-metadata {path}: names no workload: neither the metadata's NAMESPACE nor the node \
         id {node_id:?} (expected sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local) gives a \
         namespace"
    )]
    NodeMetadataNamesNoWorkload {
        /// The file.
        path: String,
        /// The node id found, possibly empty.
        node_id: String,
    },
    /// Neither `--namespace` nor `--node-metadata` was given.
    #[error("no workload: pass --namespace (with --labels) or --node-metadata")]
    NoWorkloadFlags,
    /// `--labels` gives one key two values.
    #[error("--labels: label {key:?} is given twice, as {first:?} and as {second:?}")]
    LabelTwice {
        /// The label key.
        key: String,
        /// The first value.
        first: String,
        /// The second value.
        second: String,
    },
}

/// Runs `alpn-xds explain`: prints the explanation to stdout and returns the exit code, 0
/// whatever the decision, [`EXIT_INPUT_ERROR`] when an input cannot be used (the message, on
/// stderr, names the file and field at fault).
pub fn run(args: &ExplainArgs) -> ExitCode {
    let explanation = match explain(args) {
        Ok(explanation) => explanation,
        Err(error) => {
            eprintln!("alpn-xds explain: {error}");
            return ExitCode::from(EXIT_INPUT_ERROR);
        }
    };
    let output = match args.output {
        OutputFormat::Text => text::render(&explanation),
        OutputFormat::Json => explanation.to_json(),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("alpn-xds explain: cannot write the output: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the inputs named by `args` and explains the decision for the workload.
pub fn explain(args: &ExplainArgs) -> Result<Explanation, ExplainError> {
    let workload = input::workload(args)?;
    let policies = input::policies(&args.policy_dir, &args.root_namespace)?;
    let listeners = input::listeners(&args.listeners)?;
    let sources = PoliciesRead {
        path: args.policy_dir.display().to_string(),
        root_namespace: args.root_namespace.clone(),
        loaded: policies.set.len(),
        errors: policies.errors,
    };
    Ok(report::build(
        workload,
        &policies.set,
        sources,
        args.listeners.display().to_string(),
        listeners,
    ))
}

#[cfg(test)]
mod tests;
