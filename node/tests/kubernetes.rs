//! The Kubernetes manifests (issue 4 §7): valid against the Kubernetes schemas, and wired
//! to the same start-up logic the compose tier runs (pod ordinal → node id, seeds from the
//! headless Service's per-pod DNS names).

use std::path::PathBuf;
use std::process::Command;

use strata_node::config::node_id_from_hostname;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn manifest(name: &str) -> String {
    std::fs::read_to_string(root().join("deploy/kubernetes").join(name)).expect("manifest exists")
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let output = Command::new(root().join("scripts/validate-k8s")).output().expect("run scripts/validate-k8s");
    assert!(
        output.status.success(),
        "validate-k8s failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn seeds_name_every_pod_and_ordinals_map_to_node_ids_one_to_three() {
    let statefulset = manifest("statefulset.yaml");
    assert!(statefulset.contains("replicas: 3"));
    assert!(statefulset.contains("\"--node-id-from-hostname\""), "node ids come from the pod ordinal");
    assert!(statefulset.contains("value: $(POD_NAME).strata-headless"), "each pod advertises its stable DNS name");
    assert!(statefulset.contains("\"step-down\""), "preStop hands leadership over");
    let config = manifest("configmap.yaml");
    let seeds = config.lines().find_map(|l| l.trim().strip_prefix("STRATA_SEEDS:")).expect("seeds configured").trim();
    let mut ids: Vec<u64> = seeds
        .split(',')
        .map(|seed| {
            let host = seed.rsplit_once(':').expect("host:port").0;
            assert!(host.ends_with(".strata-headless"), "seed {seed} is a headless-service name");
            node_id_from_hostname(host).expect("an ordinal host name")
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(config.contains("STRATA_INITIAL_CLUSTER_SIZE: \"3\""));
    let compose = std::fs::read_to_string(root().join("dev-env/docker-compose.yml")).expect("compose file");
    assert!(compose.contains("--node-id-from-hostname") && compose.contains("hostname: strata-2"), "compose runs the same start-up logic");
}
