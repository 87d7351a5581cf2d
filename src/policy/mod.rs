//! PeerAuthentication policy: reading the objects (from YAML files or the Kubernetes API) and
//! deciding, per workload and port, the mTLS mode exactly as istiod does and whether the
//! `http-alpns.aspenmesh.io` annotation asks for the standard ALPNs.
//!
//! - [`parse_yaml`] and [`PeerAuthentication::from_object`] read objects; a bad document is an
//!   error naming file, document, line, object and field, and never stops the others.
//! - [`PolicySet`] indexes a snapshot of all objects and reports problems found on the way.
//! - [`PolicySet::resolve`] gives a workload's [`EffectivePolicy`]: modes per port, the ALPN
//!   decision, and for any port a [`PortVerdict`] with a reason a human can follow.

mod error;
mod model;
mod object;
mod parse;
mod resolve;
mod set;
mod time;
mod yaml;

#[cfg(test)]
mod testutil;

pub use error::{FieldPath, PathSegment, PolicyError, Site};
pub use model::{MtlsMode, PeerAuthentication, PolicyRef, Workload};
pub use parse::{ParseOutcome, parse_yaml};
pub use resolve::{AlpnDecision, EffectivePolicy, PortVerdict, SelectedPolicies};
pub use set::{PolicyLevel, PolicyReport, PolicyReportKind, PolicySet, parse_annotation_value};
pub use time::Timestamp;

/// The annotation on a PeerAuthentication that asks for the standard ALPNs (`http/1.0`,
/// `http/1.1`, `h2`) on the mTLS chains of the workloads it governs.
pub const ALPN_ANNOTATION: &str = "http-alpns.aspenmesh.io";

/// Istio's root namespace unless meshConfig `rootNamespace` says otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Where Istio's control plane usually lives. The annotation is not supported on policies
/// here even when the root namespace is another one.
pub const ISTIO_SYSTEM_NAMESPACE: &str = "istio-system";
