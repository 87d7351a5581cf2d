//! Building blocks for tests, examples and benchmarks: Istio-shaped listeners and a test ADS
//! server standing in for istiod. Nothing here is used by the relay itself.

pub mod istio;
pub mod upstream;
