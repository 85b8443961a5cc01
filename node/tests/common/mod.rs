//! The integration tests' cluster harness lives in `tests/chaos` (`strata_chaos::cluster`),
//! shared with the chaos suite's runner: one harness for both.
#![allow(unused_imports)]

pub use strata_chaos::cluster::*;

/// The Prometheus text a node's `/metrics` serves.
#[allow(dead_code)] // not every test file reads metrics
pub async fn metrics_of(cluster: &TestCluster, node: u64) -> String {
    strata_node::http::check_health(&cluster.http_addr(node), "/metrics", std::time::Duration::from_secs(5)).await.expect("metrics")
}
