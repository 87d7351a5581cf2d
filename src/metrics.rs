//! Prometheus metrics of the relay, served at `/metrics`.
//!
//! Every label takes a bounded set of values: xDS forms, a short name per known resource type,
//! origins, results. Node ids and policy names never become labels; `/debug/proxies` and
//! `/debug/policies` carry those.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::relay::registry::{PushOrigin, XdsForm};
use crate::source::PolicySnapshot;

/// The ADS form of a stream, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    /// State of the world.
    Sotw,
    /// Incremental.
    Delta,
}

impl From<XdsForm> for Form {
    fn from(form: XdsForm) -> Self {
        match form {
            XdsForm::StateOfTheWorld => Form::Sotw,
            XdsForm::Delta => Form::Delta,
        }
    }
}

/// Who made a response, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// istiod's response, relayed.
    Istiod,
    /// The relay's own response.
    Relay,
}

impl From<PushOrigin> for Origin {
    fn from(origin: PushOrigin) -> Self {
        match origin {
            PushOrigin::Istiod => Origin::Istiod,
            PushOrigin::Relay => Origin::Relay,
        }
    }
}

/// A resource type, as a label: the known xDS and Istio types by short name, the rest `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Kind {
    Listener,
    Cluster,
    Endpoints,
    Routes,
    Secret,
    ExtensionConfig,
    NameTable,
    HealthInformation,
    ProxyConfig,
    Other,
}

impl Kind {
    /// The label for a type URL.
    pub fn of(type_url: &str) -> Kind {
        let name = type_url.rsplit('/').next().unwrap_or(type_url);
        match name {
            "envoy.config.listener.v3.Listener" => Kind::Listener,
            "envoy.config.cluster.v3.Cluster" => Kind::Cluster,
            "envoy.config.endpoint.v3.ClusterLoadAssignment" => Kind::Endpoints,
            "envoy.config.route.v3.RouteConfiguration" => Kind::Routes,
            "envoy.extensions.transport_sockets.tls.v3.Secret" => Kind::Secret,
            "envoy.config.core.v3.TypedExtensionConfig" => Kind::ExtensionConfig,
            "istio.networking.nds.v1.NameTable" => Kind::NameTable,
            "istio.v1.HealthInformation" => Kind::HealthInformation,
            "istio.mesh.v1alpha1.ProxyConfig" => Kind::ProxyConfig,
            _ => Kind::Other,
        }
    }
}

/// Why the relay pushed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushReason {
    /// A policy or pod label change altered the proxy's listeners.
    Policy,
    /// Envoy rejected a rewrite; istiod's listeners went instead.
    Fallback,
}

/// Success or failure, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It worked.
    Ok,
    /// It failed.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FormLabel {
    form: Form,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResponseLabels {
    form: Form,
    kind: Kind,
    origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PushLabels {
    form: Form,
    reason: PushReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    streams: Family<FormLabel, Gauge>,
    responses: Family<ResponseLabels, Counter>,
    rejections: Family<ResponseLabels, Counter>,
    listeners_rewritten: Family<FormLabel, Counter>,
    relay_pushes: Family<PushLabels, Counter>,
    upstream_errors: Counter,
    policy_reloads: Family<OutcomeLabel, Counter>,
    policy_generation: Gauge,
    policy_count: Gauge,
    policy_document_errors: Gauge,
    policy_reports: Gauge,
    cached_listeners: Gauge,
    upstream_connections: Gauge,
    tasks: Gauge,
    rewrite_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `alpn_xds` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("alpn_xds");
        let metrics = Self {
            streams: Family::default(),
            responses: Family::default(),
            rejections: Family::default(),
            listeners_rewritten: Family::default(),
            relay_pushes: Family::default(),
            upstream_errors: Counter::default(),
            policy_reloads: Family::default(),
            policy_generation: Gauge::default(),
            policy_count: Gauge::default(),
            policy_document_errors: Gauge::default(),
            policy_reports: Gauge::default(),
            cached_listeners: Gauge::default(),
            upstream_connections: Gauge::default(),
            tasks: Gauge::default(),
            // 10 µs to about 0.3 s.
            rewrite_seconds: Histogram::new(exponential_buckets(1e-5, 2.0, 16)),
            registry: Registry::default(),
        };
        registry.register(
            "streams",
            "Sidecar streams connected now",
            metrics.streams.clone(),
        );
        registry.register(
            "responses",
            "Responses sent to sidecars, by resource type and by who made them",
            metrics.responses.clone(),
        );
        registry.register(
            "rejections",
            "Responses that sidecars rejected (NACK), by resource type and by who made them",
            metrics.rejections.clone(),
        );
        registry.register(
            "listeners_rewritten",
            "Listeners sent to sidecars with standard ALPNs added",
            metrics.listeners_rewritten.clone(),
        );
        registry.register(
            "relay_pushes",
            "Responses the relay made itself, by reason",
            metrics.relay_pushes.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failed attempts to open a stream to istiod",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            "policy_reloads",
            "Reads of the policy source, by outcome",
            metrics.policy_reloads.clone(),
        );
        registry.register(
            "policy_generation",
            "Generation of the policies in force",
            metrics.policy_generation.clone(),
        );
        registry.register(
            "policies",
            "PeerAuthentication objects in force",
            metrics.policy_count.clone(),
        );
        registry.register(
            "policy_document_errors",
            "PeerAuthentication documents that could not be loaded",
            metrics.policy_document_errors.clone(),
        );
        registry.register(
            "policy_reports",
            "Problems reported about loaded policies (bad annotation values, ignored placements)",
            metrics.policy_reports.clone(),
        );
        registry.register(
            "cached_listeners",
            "Rewritten listeners held in the shared cache",
            metrics.cached_listeners.clone(),
        );
        registry.register(
            "upstream_connections",
            "HTTP/2 connections to istiod open now, each carrying up to \
             --upstream-streams-per-connection sidecar streams",
            metrics.upstream_connections.clone(),
        );
        registry.register(
            "tasks",
            "Tasks alive in the relay's runtime at scrape time (a leak shows as growth)",
            metrics.tasks.clone(),
        );
        registry.register(
            "rewrite_duration_seconds",
            "Time to rewrite one listener (cache misses only)",
            metrics.rewrite_seconds.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// A stream opened; the returned guard counts it until dropped.
    pub fn stream_opened(self: &Arc<Self>, form: XdsForm) -> StreamGauge {
        let gauge = self
            .streams
            .get_or_create(&FormLabel { form: form.into() })
            .clone();
        gauge.inc();
        StreamGauge(gauge)
    }

    /// A response went to a sidecar.
    pub fn response(&self, form: XdsForm, type_url: &str, origin: PushOrigin) {
        self.responses
            .get_or_create(&ResponseLabels {
                form: form.into(),
                kind: Kind::of(type_url),
                origin: origin.into(),
            })
            .inc();
    }

    /// A sidecar rejected a response.
    pub fn rejection(&self, form: XdsForm, type_url: &str, origin: PushOrigin) {
        self.rejections
            .get_or_create(&ResponseLabels {
                form: form.into(),
                kind: Kind::of(type_url),
                origin: origin.into(),
            })
            .inc();
    }

    /// `count` listeners went out rewritten.
    pub fn listeners_rewritten(&self, form: XdsForm, count: usize) {
        if count > 0 {
            self.listeners_rewritten
                .get_or_create(&FormLabel { form: form.into() })
                .inc_by(count as u64);
        }
    }

    /// The relay pushed on its own.
    pub fn relay_push(&self, form: XdsForm, reason: PushReason) {
        self.relay_pushes
            .get_or_create(&PushLabels {
                form: form.into(),
                reason,
            })
            .inc();
    }

    /// Opening a stream to istiod failed.
    pub fn upstream_error(&self) {
        self.upstream_errors.inc();
    }

    /// The policy source was read, successfully or not.
    pub fn policy_reload(&self, outcome: Outcome) {
        self.policy_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// New policies are in force.
    pub fn policies_in_force(&self, snapshot: &PolicySnapshot) {
        self.policy_generation
            .set(gauge_value(snapshot.generation as usize));
        self.policy_count
            .set(gauge_value(snapshot.set.policies().count()));
        self.policy_document_errors
            .set(gauge_value(snapshot.errors.len()));
        self.policy_reports
            .set(gauge_value(snapshot.set.reports().len()));
    }

    /// One listener was rewritten (a cache miss), taking `took`.
    pub fn rewrite_took(&self, took: Duration) {
        self.rewrite_seconds.observe(took.as_secs_f64());
    }

    /// The metrics in Prometheus' text format, with the cache size and the connections to istiod
    /// as of now.
    pub fn encode(&self, cached_listeners: usize, upstream_connections: usize) -> String {
        self.cached_listeners.set(gauge_value(cached_listeners));
        self.upstream_connections
            .set(gauge_value(upstream_connections));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks
                .set(gauge_value(runtime.metrics().num_alive_tasks()));
        }
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            text = format!("# encoding the metrics failed: {e}\n");
        }
        text
    }
}

/// Label values in Prometheus' usual lower case.
macro_rules! lower_case_label {
    ($($ty:ty),*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                encoder.write_str(&format!("{self:?}").to_lowercase())
            }
        }
    )*};
}
lower_case_label!(Form, Origin, Kind, PushReason, Outcome);

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Counts one connected stream for as long as it lives.
#[derive(Debug)]
pub struct StreamGauge(Gauge);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_streams_are_counted() {
        let metrics = Arc::new(Metrics::new());
        assert_eq!(
            Kind::of("type.googleapis.com/envoy.config.listener.v3.Listener"),
            Kind::Listener
        );
        assert_eq!(Kind::of("type.googleapis.com/some.new.Type"), Kind::Other);

        let guard = metrics.stream_opened(XdsForm::Delta);
        metrics.response(
            XdsForm::Delta,
            "type.googleapis.com/x.y.Z",
            PushOrigin::Relay,
        );
        let text = metrics.encode(3, 2);
        assert!(
            text.contains("alpn_xds_streams{form=\"delta\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "alpn_xds_responses_total{form=\"delta\",kind=\"other\",origin=\"relay\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("alpn_xds_cached_listeners 3"), "{text}");
        assert!(text.contains("alpn_xds_upstream_connections 2"), "{text}");

        drop(guard);
        assert!(
            metrics
                .encode(0, 0)
                .contains("alpn_xds_streams{form=\"delta\"} 0")
        );
    }
}
