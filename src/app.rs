//! Wires the parts into a running relay: policies, the relay, its gRPC server (TLS or, when asked
//! for, plaintext) and the admin endpoints, and a drain on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span};

use crate::admin;
use crate::config::ServeArgs;
use crate::metrics::Metrics;
use crate::relay::upstream::UpstreamTls;
use crate::relay::{AdsServer, Limits, Relay, Upstream};
use crate::source::kube::{self, KubeOptions, KubeSource};
use crate::source::{PolicySnapshot, PolicyWatch, files};
use crate::tls;

/// After the drain window, how long the process waits for the last streams before it exits.
const EXIT_GRACE: Duration = Duration::from_secs(5);

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
    stop_accepting: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    stop_server: watch::Sender<bool>,
    xds: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: JoinHandle<Result<(), admin::AdminError>>,
}

impl RunningRelay {
    /// Stops accepting, ends every stream spread over `window`, waits for them (at most
    /// `window` plus a short grace), then stops the servers.
    pub async fn shutdown(self, window: Duration) {
        info!(streams = self.relay.registry.len(), ?window, "draining");
        let _ = self.stop_accepting.send(true);
        self.relay.drain(window);

        let registry = self.relay.registry.clone();
        let drained = async {
            while !registry.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(window + EXIT_GRACE, drained)
            .await
            .is_err()
        {
            info!(
                streams = self.relay.registry.len(),
                "streams still open after the drain window"
            );
        }

        let _ = self.stop_server.send(true);
        let _ = self.stop_admin.send(true);
        if tokio::time::timeout(EXIT_GRACE, self.xds).await.is_err() {
            info!("the xDS server did not stop in time");
        }
        let _ = tokio::time::timeout(EXIT_GRACE, self.admin).await;
    }
}

/// Loads policies, binds both listeners and starts serving in the background.
pub async fn start(args: &ServeArgs) -> anyhow::Result<RunningRelay> {
    // Logged once; the configuration holds file paths, never secrets.
    info!(config = ?args, "starting alpn-xds");
    let metrics = Arc::new(Metrics::new());

    // Policies first. A folder must read before the relay accepts sidecars; the Kubernetes
    // source starts unsynced, and /readyz says so until its first complete list.
    let (policy_writer, policies, kube_source) = match &args.policy_dir {
        Some(dir) => {
            let (writer, policies) =
                files::watch_dir(dir, &args.root_namespace, metrics.clone())
                    .with_context(|| format!("loading policies from {}", dir.display()))?;
            (writer, policies, None)
        }
        None => {
            let client = kube::client(args.kubeconfig.as_deref()).await?;
            let source = KubeSource::start(client, &kube_options(args), metrics.clone());
            (source.writer.clone(), source.policies.clone(), Some(source))
        }
    };
    tokio::spawn(
        observe_policies(policies.clone(), metrics.clone()).instrument(info_span!("policies")),
    );

    let upstream = Upstream::new(&args.upstream, upstream_tls(args)?)?
        .with_connect_rate(args.upstream_connect_rate)
        .with_streams_per_connection(args.upstream_streams_per_connection);
    let limits = Limits {
        max_message_size: args.max_message_size,
        max_stream_age: Some(args.max_connection_age).filter(|age| !age.is_zero()),
    };
    let mut relay = Relay::new(upstream, policies, limits, metrics);
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

    let (stop_admin, stop_admin_rx) = watch::channel(false);
    let admin = tokio::spawn(
        admin::serve(admin_listener, relay.clone(), stopped(stop_admin_rx))
            .instrument(info_span!("admin")),
    );

    // Accepting stops first, at the start of a drain; the server itself only once the streams
    // are gone, because stopping it ends every stream at once.
    let (stop_accepting, accepting_rx) = watch::channel(false);
    let (stop_server, stop_rx) = watch::channel(false);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AdsServer::new(relay.clone()));
    let xds = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let cert = tls::ReloadingCert::load(cert, key)?;
            let config =
                tls::server_config(cert.clone()).context("building the TLS configuration")?;
            tls::follow(cert);
            let incoming = tls::incoming(xds_listener, config, accepting_rx);
            tokio::spawn(
                server
                    .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
                    .instrument(info_span!("xds")),
            )
        }
        _ if args.plaintext => tokio::spawn(
            server
                .serve_with_incoming_shutdown(
                    plaintext_incoming(xds_listener, accepting_rx),
                    stopped(stop_rx),
                )
                .instrument(info_span!("xds")),
        ),
        _ => bail!(
            "no serving certificate: pass --tls-cert and --tls-key, or --plaintext to serve sidecars without TLS"
        ),
    };

    info!(
        listen = %xds_addr,
        tls = !args.plaintext,
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
        stop_accepting,
        stop_admin,
        stop_server,
        xds,
        admin,
    })
}

/// The Kubernetes source's options from the flags.
fn kube_options(args: &ServeArgs) -> KubeOptions {
    let mut options = KubeOptions::new(&args.root_namespace, &args.pod_name);
    options.pod_labels = args.pod_labels;
    options.events = args.events;
    options.pod_linger = args.pod_watch_linger;
    options.backoff.max = args.kube_backoff_max.max(Duration::from_millis(100));
    options.backoff.initial = options.backoff.initial.min(options.backoff.max);
    options
}

fn upstream_tls(args: &ServeArgs) -> anyhow::Result<Option<UpstreamTls>> {
    let Some(ca) = &args.upstream_ca else {
        return Ok(None);
    };
    let ca_pem = std::fs::read(ca)
        .with_context(|| format!("reading the upstream CA bundle {}", ca.display()))?;
    Ok(Some(UpstreamTls {
        ca_pem,
        server_name: args.upstream_server_name.clone(),
    }))
}

/// Runs `alpn-xds serve` until SIGTERM or Ctrl-C, then drains.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut running = start(&args).await?;

    tokio::select! {
        result = &mut running.xds => {
            result.context("the xDS server task failed")?.context("the xDS server failed")?;
            bail!("the xDS server stopped unexpectedly");
        }
        () = shutdown_signal() => running.shutdown(args.drain_window).await,
    }
    info!("alpn-xds stopped");
    Ok(())
}

/// Plaintext connections from `listener` until `stop` turns true; then the socket closes and
/// the stream stays open, so that the server keeps serving the connections it has.
fn plaintext_incoming(
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(Some((listener, stop)), |state| async move {
        let (listener, mut stop) = state?;
        let accepted = tokio::select! {
            () = stop.wait_for(|stop| *stop).map(|_| ()) => None,
            accepted = listener.accept() => Some(accepted),
        };
        let Some(accepted) = accepted else {
            drop(listener);
            std::future::pending::<()>().await;
            return None;
        };
        let item = accepted.map(|(tcp, _)| {
            let _ = tcp.set_nodelay(true);
            tcp
        });
        Some((item, Some((listener, stop))))
    })
}

/// Keeps the policy metrics in step with the policies in force.
async fn observe_policies(mut policies: PolicyWatch, metrics: Arc<Metrics>) {
    loop {
        let snapshot = policies.borrow_and_update().clone();
        metrics.policies_in_force(&snapshot);
        if policies.changed().await.is_err() {
            return;
        }
    }
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
