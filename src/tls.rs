//! TLS on the relay's own listener: the serving certificate and key come from files, and a new
//! pair written over them (as cert-manager does when it renews) is picked up for new
//! connections without touching the streams already open.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{FutureExt, Stream};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, info, info_span, warn};

/// How often the certificate files are compared with what is being served.
const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the gRPC server to take them.
const ACCEPT_QUEUE: usize = 64;

/// Errors of the serving TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no usable private key.
    #[error("{path} holds no usable PEM private key: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why the key was refused.
        reason: String,
    },
}

/// A certificate and key read from files, swapped in place when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Vec<u8>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Reads the pair; fails when either file is missing or unusable.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let (fingerprint, key) = read_pair(cert_path, key_path)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new((fingerprint, key)),
        }))
    }

    /// Re-reads the files; swaps the pair when they changed and are usable. Returns whether it
    /// swapped. A half-written or broken pair is reported and the current one kept.
    pub fn reload(&self) -> bool {
        let (fingerprint, key) = match read_pair(&self.cert_path, &self.key_path) {
            Ok(pair) => pair,
            Err(error) => {
                warn!(%error, "cannot reload the serving certificate; keeping the current one");
                return false;
            }
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 == fingerprint {
            return false;
        }
        *current = (fingerprint, key);
        info!(cert = %self.cert_path.display(), "serving a renewed certificate");
        true
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Arc<CertifiedKey>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let bad_key = |reason: String| TlsError::BadKey {
        path: key_path.to_path_buf(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad_key(e.to_string()))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad_key(e.to_string()))?;

    let mut fingerprint = cert_pem;
    fingerprint.extend_from_slice(&key_pem);
    Ok((fingerprint, Arc::new(CertifiedKey::new(chain, signing))))
}

/// The rustls configuration of the listener: HTTP/2 only, as gRPC needs.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Keeps `cert` in step with its files until the process ends: at once when the file system
/// reports a change in their folders, and every [`RELOAD_EVERY`] in case it does not.
pub fn follow(cert: Arc<ReloadingCert>) {
    let span = info_span!("serving_cert", cert = %cert.cert_path.display());
    let (tx, mut changes) = mpsc::channel::<()>(1);
    let watcher = watch_folders(&[&cert.cert_path, &cert.key_path], tx);
    tokio::spawn(
        async move {
            // Owned by the task so that notifications last as long as it does.
            let _watcher = watcher;
            let mut every = tokio::time::interval(RELOAD_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    Some(()) = changes.recv() => {
                        // Both files are usually replaced together; read them once.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while changes.try_recv().is_ok() {}
                    }
                }
                cert.reload();
            }
        }
        .instrument(span),
    );
}

fn watch_folders(files: &[&Path], tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;

    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let is_change = event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
        if is_change {
            let _ = tx.try_send(());
        }
    })
    .inspect_err(|error| warn!(%error, "cannot watch the certificate files; polling them"))
    .ok()?;
    for file in files {
        // The folder, not the file: renewals replace files (and Kubernetes swaps a symlink).
        let folder = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Err(error) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
            warn!(%error, folder = %folder.display(), "cannot watch the certificate folder; polling it");
        }
    }
    Some(watcher)
}

/// Accepts TCP connections on `listener` and hands out those whose TLS handshake completed.
/// Handshakes run side by side, so a slow client delays nobody else. Once `stop` turns true
/// the listening socket is closed; the stream stays open so that the server keeps serving the
/// connections it has.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(
        async move {
            loop {
                // The listener closes as soon as the server stops taking connections.
                let accepted = tokio::select! {
                    () = tx.closed() => return,
                    () = stop.wait_for(|stop| *stop).map(|_| ()) => None,
                    accepted = listener.accept() => Some(accepted),
                };
                let Some(accepted) = accepted else {
                    drop(listener);
                    tx.closed().await;
                    return;
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                tokio::spawn(handshake(acceptor.clone(), tcp, peer, tx.clone()));
            }
        }
        .instrument(info_span!("tls_accept")),
    );
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
) {
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let _ = tx.send(Ok(stream)).await;
        }
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}
