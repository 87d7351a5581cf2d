//! The product on real input, incremental xDS (Istio's default since 1.22): real Envoy with
//! `api_type: DELTA_GRPC` gets its configuration over `DeltaAggregatedResources` through
//! `alpn-xds serve` from a test upstream that answers Delta as istiod does. The scenarios are
//! the state-of-the-world ones (`tests/envoy_relay.rs`), described in
//! `tests/support/scenarios.rs`.

mod support;

use support::envoy::AdsApi;
use support::scenarios;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_alpns_reach_the_backend_when_the_namespace_asks() {
    scenarios::standard_alpns_reach_the_backend(AdsApi::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_policy_false_keeps_h2_out() {
    scenarios::workload_false_keeps_h2_out(AdsApi::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_reaches_a_running_envoy_without_istiod_both_ways() {
    scenarios::policy_toggles_both_ways_without_istiod(AdsApi::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_sees_its_own_versions_after_a_reconnect() {
    scenarios::reconnect_reports_istiod_versions_upstream(AdsApi::Delta).await;
}
