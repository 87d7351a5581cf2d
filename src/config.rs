//! Command-line configuration. Every flag has an `ALPN_XDS_*` environment fallback, so the same
//! binary is configured by flags on a laptop and by environment in a Deployment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::relay::DEFAULT_MAX_MESSAGE_SIZE;
use crate::relay::upstream::DEFAULT_STREAMS_PER_CONNECTION;

/// alpn-xds: an xDS relay in front of istiod that lets mTLS clients without a sidecar, speaking
/// h2 or http/1.1, reach PERMISSIVE workloads whose PeerAuthentication carries
/// `http-alpns.aspenmesh.io: "true"`.
#[derive(Debug, Parser)]
#[command(name = "alpn-xds", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,

    /// Log format: human-readable text or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "ALPN_XDS_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay sidecars' xDS streams to istiod, rewriting inbound listeners as policies say.
    Serve(ServeArgs),
    /// Offline: say what the relay would do to one workload's listeners, and why.
    Explain(ExplainArgs),
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Flags of `alpn-xds serve`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ServeArgs {
    /// Address sidecars connect to (their discovery address).
    #[arg(long, env = "ALPN_XDS_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// istiod's xDS address: `https://` for TLS (istiod's port 15012), `http://` for
    /// plaintext (port 15010).
    #[arg(
        long,
        env = "ALPN_XDS_UPSTREAM",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    pub upstream: String,

    /// CA bundle (PEM) that istiod's certificate must chain to, for an `https://` upstream:
    /// the mesh root, e.g. the `istio-ca-root-cert` ConfigMap.
    #[arg(long, env = "ALPN_XDS_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// The name istiod's certificate must carry.
    #[arg(
        long,
        env = "ALPN_XDS_UPSTREAM_SERVER_NAME",
        default_value = "istiod.istio-system.svc"
    )]
    pub upstream_server_name: String,

    /// Serving certificate chain (PEM) for the sidecars' TLS; a renewed file is picked up
    /// without dropping streams.
    #[arg(long, env = "ALPN_XDS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the serving certificate.
    #[arg(long, env = "ALPN_XDS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve sidecars over plaintext gRPC instead of TLS.
    #[arg(long, env = "ALPN_XDS_PLAINTEXT", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub plaintext: bool,

    /// Read PeerAuthentication YAML from this folder instead of the Kubernetes API.
    #[arg(long, env = "ALPN_XDS_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,

    /// Kubeconfig file for the Kubernetes API. Without it: `KUBECONFIG`, `~/.kube/config`,
    /// then the pod's service account. Ignored with `--policy-dir`.
    #[arg(long, env = "ALPN_XDS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Follow the live labels of connected proxies' pods, as current istiod does (needs get,
    /// list and watch on pods); `false` judges workloads by their node metadata's labels.
    #[arg(
        long,
        env = "ALPN_XDS_POD_LABELS",
        default_value_t = true,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub pod_labels: bool,

    /// How long a namespace's pod watch stays after the last proxy of the namespace left.
    #[arg(
        long,
        env = "ALPN_XDS_POD_WATCH_LINGER",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub pod_watch_linger: Duration,

    /// Post Kubernetes Events on PeerAuthentication objects whose annotation is ignored
    /// (needs create on events.k8s.io events).
    #[arg(
        long,
        env = "ALPN_XDS_EVENTS",
        default_value_t = true,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub events: bool,

    /// This replica's name in the Events it posts; the pod name in a Deployment.
    #[arg(long, env = "ALPN_XDS_POD_NAME", default_value = "alpn-xds")]
    pub pod_name: String,

    /// Longest wait between retries against an unreachable or failing Kubernetes API.
    #[arg(
        long,
        env = "ALPN_XDS_KUBE_BACKOFF_MAX",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub kube_backoff_max: Duration,

    /// Address of the admin HTTP endpoints (/healthz, /readyz, /debug/*).
    #[arg(long, env = "ALPN_XDS_ADMIN", default_value = "0.0.0.0:15014")]
    pub admin: SocketAddr,

    /// Istio's root namespace: mesh-wide policies live there.
    #[arg(long, env = "ALPN_XDS_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// Largest xDS message accepted or sent, in bytes, on either leg.
    #[arg(long, env = "ALPN_XDS_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,

    /// At most this many new streams to istiod a second, after a burst of as many, so that a
    /// mass reconnect reaches istiod as a trickle; 0 sets no limit.
    #[arg(long, env = "ALPN_XDS_UPSTREAM_CONNECT_RATE", default_value_t = 200)]
    pub upstream_connect_rate: u32,

    /// Sidecar streams that share one HTTP/2 connection to istiod (each keeps a stream of its
    /// own). 1 gives every sidecar its own connection, as pilot-agent does: about 50 KiB more
    /// per sidecar, and when istiod closes a connection only one sidecar reconnects.
    #[arg(
        long,
        env = "ALPN_XDS_UPSTREAM_STREAMS_PER_CONNECTION",
        default_value_t = DEFAULT_STREAMS_PER_CONNECTION,
        value_parser = clap::value_parser!(u16).range(1..).map(usize::from)
    )]
    pub upstream_streams_per_connection: usize,

    /// Streams older than this (±10%) are ended so that sidecars spread over replicas after a
    /// scale-up or a rollout; `0s` keeps them forever.
    #[arg(
        long,
        env = "ALPN_XDS_MAX_CONNECTION_AGE",
        default_value = "30m",
        value_parser = humantime::parse_duration
    )]
    pub max_connection_age: Duration,

    /// On SIGTERM, stream closes are spread over this window before the process exits.
    #[arg(
        long,
        env = "ALPN_XDS_DRAIN_WINDOW",
        default_value = "20s",
        value_parser = humantime::parse_duration
    )]
    pub drain_window: Duration,
}

/// Flags of `alpn-xds explain`. The workload is given either by `--namespace` (with `--pod` and
/// `--labels`) or by `--node-metadata`.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// PeerAuthentication YAML: a folder, read as `serve` reads it, or a single file.
    #[arg(long, env = "ALPN_XDS_POLICY_DIR")]
    pub policy_dir: PathBuf,

    /// The listener dump: `istioctl proxy-config listener -o json`, an Envoy `/config_dump`, its
    /// ListenersConfigDump, or one Listener; snake_case or camelCase.
    #[arg(long)]
    pub listeners: PathBuf,

    /// The workload's namespace.
    #[arg(
        long,
        required_unless_present = "node_metadata",
        conflicts_with = "node_metadata"
    )]
    pub namespace: Option<String>,

    /// The pod's name (shown only; matching uses the labels).
    #[arg(long, requires = "namespace", conflicts_with = "node_metadata")]
    pub pod: Option<String>,

    /// The pod's labels, `key=value,...` (the flag may be repeated).
    #[arg(
        long,
        requires = "namespace",
        conflicts_with = "node_metadata",
        value_delimiter = ',',
        value_parser = parse_label,
        value_name = "KEY=VALUE"
    )]
    pub labels: Vec<(String, String)>,

    /// A JSON file with the proxy's node metadata (`NAMESPACE`, `NAME`, `LABELS`, ...), a whole
    /// Envoy node (`{"id": ..., "metadata": {...}}`), or an Envoy `/config_dump` with its
    /// bootstrap section.
    #[arg(long)]
    pub node_metadata: Option<PathBuf>,

    /// Istio's root namespace: mesh-wide policies live there.
    #[arg(long, env = "ALPN_XDS_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// Output for people (`text`) or for programs (`json`).
    #[arg(long, default_value = "text")]
    pub output: OutputFormat,
}

/// Output formats of `alpn-xds explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A report for people.
    Text,
    /// One JSON document, described in the README.
    Json,
}

/// One `key=value` of `--labels`.
fn parse_label(item: &str) -> Result<(String, String), String> {
    match item.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.trim().to_string()))
        }
        Some(_) => Err(format!("label {item:?} has an empty key")),
        None => Err(format!("label {item:?} is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults() {
        let cli = Cli::try_parse_from(["alpn-xds", "serve", "--policy-dir", "/p"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve expected");
        };
        assert_eq!(args.listen.port(), 15012);
        assert!(args.upstream.starts_with("https://"));
        assert_eq!(args.max_connection_age, Duration::from_secs(1800));
        assert!(!args.plaintext);
        assert_eq!(args.admin.port(), 15014);
        assert_eq!(args.root_namespace, "istio-system");
        assert_eq!(args.policy_dir, Some(PathBuf::from("/p")));
        assert!(args.pod_labels && args.events);
        assert_eq!(args.kubeconfig, None);
    }

    #[test]
    fn kubernetes_flags() {
        let cli = Cli::try_parse_from([
            "alpn-xds",
            "serve",
            "--kubeconfig",
            "/k",
            "--pod-labels=false",
            "--events",
            "false",
            "--kube-backoff-max",
            "2s",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve expected");
        };
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/k")));
        assert!(!args.pod_labels && !args.events);
        assert_eq!(args.kube_backoff_max, Duration::from_secs(2));
        assert_eq!(args.policy_dir, None);
    }

    #[test]
    fn explain_takes_a_namespace_and_labels_or_node_metadata() {
        let cli = Cli::try_parse_from([
            "alpn-xds",
            "explain",
            "--policy-dir",
            "/p",
            "--listeners",
            "/l.json",
            "--namespace",
            "shop",
            "--labels",
            "app=web,version=v1",
            "--labels",
            "empty=",
        ])
        .unwrap();
        let Command::Explain(args) = cli.command else {
            panic!("explain expected");
        };
        assert_eq!(
            args.labels,
            [("app", "web"), ("version", "v1"), ("empty", "")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(args.output, OutputFormat::Text);
        assert_eq!(args.root_namespace, "istio-system");

        let base = [
            "alpn-xds",
            "explain",
            "--policy-dir",
            "/p",
            "--listeners",
            "/l",
        ];
        let with = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        assert!(with(&["--node-metadata", "/n.json", "--output", "json"]).is_ok());
        assert!(with(&[]).is_err(), "a workload is required");
        assert!(with(&["--namespace", "a", "--node-metadata", "/n"]).is_err());
        assert!(with(&["--labels", "app=web", "--node-metadata", "/n"]).is_err());
        assert!(with(&["--pod", "web-1", "--node-metadata", "/n"]).is_err());
        let bad = with(&["--namespace", "a", "--labels", "app"]).unwrap_err();
        assert!(bad.to_string().contains("not key=value"), "{bad}");
    }
}
