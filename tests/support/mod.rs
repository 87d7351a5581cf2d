//! The harness shared by the integration tests: real Envoy started from the PyPI package, a test
//! PKI, TLS and plaintext HTTP clients, and a small HTTP backend.
//!
//! Every helper is bounded in time and binds loopback addresses only. A test that needs Envoy
//! and cannot find it fails; it never skips.

// Each test crate compiles this module and uses a different part of it.
#![allow(dead_code)]

pub mod backend;
pub mod certs;
pub mod envoy;
pub mod fake_kube;
pub mod http;
pub mod mesh;
pub mod relay;
pub mod scenarios;
pub mod sidecar;
pub mod tls_client;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// Polls `check` until it yields `Some`, every 50 ms, and panics naming `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ports of 127.0.0.1 that were free a moment ago, for listeners whose port must be known
/// before they bind (Envoy matches filter chains on the destination port).
pub fn free_ports<const N: usize>() -> [u16; N] {
    // All sockets are held until every port is read, so the N ports differ.
    let sockets: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let mut ports = [0; N];
    for (port, socket) in ports.iter_mut().zip(&sockets) {
        *port = socket.local_addr().expect("local address").port();
    }
    ports
}

/// `127.0.0.1:<port>`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
