//! alpn-xds: an xDS relay between Istio sidecars and istiod that lets mTLS clients without a
//! sidecar, speaking plain `h2` or `http/1.1`, reach PERMISSIVE workloads whose
//! PeerAuthentication asks for it with `http-alpns.aspenmesh.io: "true"`.
//!
//! The crate reads as its architecture: [`policy`] decides per workload and port, [`rewrite`]
//! edits inbound listeners on the wire, [`relay`] carries every ADS stream to istiod and back,
//! [`source`] follows PeerAuthentication objects, [`admin`] serves health and debug endpoints,
//! [`dump`] reads listener dumps for offline use, [`explain`] says offline what the relay would
//! do to a workload's listeners, and [`app`] wires them together.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod dump;
pub mod explain;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod rewrite;
pub mod source;
pub mod testkit;
pub mod tls;

/// Protobuf envelopes of the ADS messages, compiled from `proto/` by `build.rs`.
pub mod wire {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/alpn_xds.wire.v1.rs"));
}
