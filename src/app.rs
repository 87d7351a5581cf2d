//! Wires the parts into a running relay: policies, the relay, its gRPC server and the admin
//! endpoints, and a shutdown on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tracing::{Instrument, info, info_span};

use crate::admin;
use crate::config::ServeArgs;
use crate::relay::{AdsServer, Limits, Relay, Upstream};
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

    // Policies first: a relay that cannot decide must not accept sidecars.
    let Some(dir) = &args.policy_dir else {
        bail!(
            "no policy source: pass --policy-dir (the Kubernetes API source is not built into this version)"
        );
    };
    let (policy_writer, policies) = files::watch_dir(dir, &args.root_namespace)
        .with_context(|| format!("loading policies from {}", dir.display()))?;

    let upstream = Upstream::new(&args.upstream)?;
    let limits = Limits {
        max_message_size: args.max_message_size,
    };
    let relay = Arc::new(Relay::new(upstream, policies, limits));

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
    let xds = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(AdsServer::new(relay.clone()))
            .serve_with_incoming_shutdown(sidecar_connections(xds_listener), stopped(stop_rx))
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
        stop,
        xds,
        admin,
    })
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

/// Sidecars' connections, with Nagle's algorithm off: a response whose last segment is small
/// would otherwise wait for the sidecar's delayed ACK, about 40 ms.
fn sidecar_connections(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
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
