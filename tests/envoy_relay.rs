//! The product on real input, state of the world: real Envoy gets its configuration over
//! `StreamAggregatedResources` through `alpn-xds serve` from a test upstream serving an
//! Istio-shaped PERMISSIVE `virtualInbound`. The scenarios are shared with the Delta tests
//! (`tests/envoy_delta.rs`) and described in `tests/support/scenarios.rs`.

mod support;

use support::envoy::AdsApi;
use support::scenarios;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_alpns_reach_the_backend_when_the_namespace_asks() {
    scenarios::standard_alpns_reach_the_backend(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_policy_false_keeps_h2_out() {
    scenarios::workload_false_keeps_h2_out(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_reaches_a_running_envoy_without_istiod_both_ways() {
    scenarios::policy_toggles_both_ways_without_istiod(AdsApi::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_sees_its_own_versions_after_a_reconnect() {
    scenarios::reconnect_reports_istiod_versions_upstream(AdsApi::Sotw).await;
}
