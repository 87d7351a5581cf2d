//! The application behind the sidecar: a plaintext HTTP/1.1 server on 127.0.0.1:0 that answers
//! every request with 200 and a body naming itself, and counts what it served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running backend; stops when dropped.
pub struct Backend {
    name: String,
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend called `name`.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let served = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(listener, name.to_owned(), Arc::clone(&served)));
        Self {
            name: name.to_owned(),
            addr,
            served,
            task,
        }
    }

    /// The backend's name, which every response body starts with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, name: String, served: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (name, served) = (name.clone(), Arc::clone(&served));
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            served.fetch_add(1, Ordering::SeqCst);
            let body = format!("{name}: {} {}", request.method(), request.uri().path());
            async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
        });
        tokio::spawn(async move {
            // A client (Envoy) hanging up mid-request is not the backend's failure.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
