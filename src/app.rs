//! Wires the parts into a running relay: policies, the relay, its gRPC server and the admin
//! endpoints, and a shutdown on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing::{Instrument, info, info_span};

use crate::admin;
use crate::config::ServeArgs;
use crate::relay::{AdsServer, Limits, Relay, Upstream};
use crate::source::kube::{self, KubeOptions, KubeSource};
use crate::source::{PolicySnapshot, files};

/// How long streams get to finish after a shutdown signal before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A relay that is serving, with the addresses it bound.
#[derive(Debug)]
pub struct RunningRelay {
    /// Where sidecars connect.
    pub xds_addr: SocketAddr,
    /// Where the admin endpoints are.
    pub admin_addr: SocketAddr,
    /// The relay's shared state.
    pub relay: Arc<Relay>,
    /// Writes new policy snapshots; the relay's streams read them.
    pub policy_writer: watch::Sender<Arc<PolicySnapshot>>,
    /// The Kubernetes source, when policies come from the API; its watches stop with it.
    _kube_source: Option<KubeSource>,
    stop: watch::Sender<bool>,
    xds: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: JoinHandle<Result<(), admin::AdminError>>,
}

impl RunningRelay {
    /// Stops accepting, ends the servers and waits up to `grace` for them.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace, async {
            let _ = self.xds.await;
            let _ = self.admin.await;
        })
        .await;
    }
}

/// Loads policies, binds both listeners and starts serving in the background.
pub async fn start(args: &ServeArgs) -> anyhow::Result<RunningRelay> {
    info!(config = ?args, "starting alpn-xds");

    // Policies first. A folder must read before the relay accepts sidecars; the Kubernetes
    // source starts unsynced, and /readyz says so until its first complete list.
    let (policy_writer, policies, kube_source) = match &args.policy_dir {
        Some(dir) => {
            let (writer, policies) = files::watch_dir(dir, &args.root_namespace)
                .with_context(|| format!("loading policies from {}", dir.display()))?;
            (writer, policies, None)
        }
        None => {
            let client = kube::client(args.kubeconfig.as_deref()).await?;
            let source = KubeSource::start(client, &kube_options(args));
            (source.writer.clone(), source.policies.clone(), Some(source))
        }
    };

    let upstream = Upstream::new(&args.upstream)?;
    let limits = Limits {
        max_message_size: args.max_message_size,
    };
    let mut relay = Relay::new(upstream, policies, limits);
    if let Some(tracker) = kube_source.as_ref().and_then(KubeSource::tracker) {
        relay = relay.with_pod_tracker(tracker);
    }
    let relay = Arc::new(relay);

    let admin_listener = admin::bind(args.admin).await?;
    let xds_listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen for sidecars on {}", args.listen))?;
    let xds_addr = xds_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let (stop, stop_rx) = watch::channel(false);
    let admin = tokio::spawn(
        admin::serve(admin_listener, relay.clone(), stopped(stop_rx.clone()))
            .instrument(info_span!("admin")),
    );
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = serving_tls(args)? {
        server = server
            .tls_config(tls)
            .context("configuring TLS for sidecars")?;
    }
    let xds = tokio::spawn(
        server
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(AdsServer::new(relay.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(xds_listener), stopped(stop_rx))
            .instrument(info_span!("xds")),
    );

    info!(
        listen = %xds_addr,
        admin = %admin_addr,
        upstream = %relay.upstream.address(),
        "alpn-xds is serving"
    );
    Ok(RunningRelay {
        xds_addr,
        admin_addr,
        relay,
        policy_writer,
        _kube_source: kube_source,
        stop,
        xds,
        admin,
    })
}

/// The TLS identity sidecars see, when `--tls-cert` and `--tls-key` are given.
fn serving_tls(args: &ServeArgs) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let identity = Identity::from_pem(read(cert)?, read(key)?);
    info!(cert = %cert.display(), "serving sidecars over TLS");
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}

/// The Kubernetes source's options from the flags.
fn kube_options(args: &ServeArgs) -> KubeOptions {
    let mut options = KubeOptions::new(&args.root_namespace, &args.pod_name);
    options.pod_labels = args.pod_labels;
    options.events = args.events;
    options.pod_linger = Duration::from_secs(args.pod_watch_linger);
    options.backoff.max = Duration::from_secs(args.kube_backoff_max.max(1));
    options.backoff.initial = options.backoff.initial.min(options.backoff.max);
    options
}

/// Runs `alpn-xds serve` until SIGTERM or Ctrl-C.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut running = start(&args).await?;

    tokio::select! {
        result = &mut running.xds => {
            result.context("the xDS server task failed")?.context("the xDS server failed")?;
            bail!("the xDS server stopped unexpectedly");
        }
        () = shutdown_signal() => {
            info!(streams = running.relay.registry.len(), "shutting down");
            running.shutdown(SHUTDOWN_GRACE).await;
        }
    }
    Ok(())
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
