//! Command-line configuration. Every flag has an `ALPN_XDS_*` environment fallback, so the same
//! binary is configured by flags on a laptop and by environment in a Deployment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::relay::DEFAULT_MAX_MESSAGE_SIZE;

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

    /// istiod's xDS address; `http://` for plaintext.
    #[arg(
        long,
        env = "ALPN_XDS_UPSTREAM",
        default_value = "http://istiod.istio-system.svc:15010"
    )]
    pub upstream: String,

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

    /// Seconds a namespace's pod watch stays after the last proxy of the namespace left.
    #[arg(long, env = "ALPN_XDS_POD_WATCH_LINGER", default_value_t = 30)]
    pub pod_watch_linger: u64,

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

    /// Longest wait, in seconds, between retries against an unreachable or failing
    /// Kubernetes API.
    #[arg(long, env = "ALPN_XDS_KUBE_BACKOFF_MAX", default_value_t = 30)]
    pub kube_backoff_max: u64,

    /// PEM certificate chain served to sidecars; with `--tls-key`, the xDS listener speaks TLS
    /// (what pilot-agent expects on 15012). Read at start.
    #[arg(long, env = "ALPN_XDS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "ALPN_XDS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Address of the admin HTTP endpoints (/healthz, /readyz, /debug/*).
    #[arg(long, env = "ALPN_XDS_ADMIN", default_value = "0.0.0.0:15014")]
    pub admin: SocketAddr,

    /// Istio's root namespace: mesh-wide policies live there.
    #[arg(long, env = "ALPN_XDS_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// Largest xDS message accepted or sent, in bytes, on either leg.
    #[arg(long, env = "ALPN_XDS_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,
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
        let Command::Serve(args) = cli.command;
        assert_eq!(args.listen.port(), 15012);
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
            "2",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/k")));
        assert!(!args.pod_labels && !args.events);
        assert_eq!(args.kube_backoff_max, 2);
        assert_eq!(args.policy_dir, None);
    }
}
