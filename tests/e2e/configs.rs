//! Every example configuration in deploy/ parses and passes validation.

use std::path::{Path, PathBuf};

fn tomls(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    out.sort();
    out
}

#[test]
fn every_example_cloud_config_is_valid() {
    let files: Vec<PathBuf> =
        [tomls("cloud"), tomls("local").into_iter().filter(|p| p.ends_with("cloud.toml")).collect()].concat();
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        let cfg = kappa_cloud::config::CloudConfig::load(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.view_specs().unwrap().is_empty());
    }
}

#[test]
fn the_example_config_holds_the_reference_designs_views() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml");
    let specs = kappa_cloud::config::CloudConfig::load(&f).unwrap().view_specs().unwrap();
    let names: Vec<String> = specs.iter().map(|s| s.id()).collect();
    assert_eq!(names, ["device_metrics@1", "user_sessions@1", "device_lifetime@1"]);
}

#[test]
fn every_example_edge_config_is_valid() {
    let files: Vec<PathBuf> =
        [tomls("edge"), tomls("local").into_iter().filter(|p| p.ends_with("edge.toml")).collect()].concat();
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        kappa_edge::config::EdgeConfig::load(&f).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_example_configs_ship_the_rules_the_alert_tests_score() {
    let tested = kappa_cloud::config::CloudConfig::from_toml(crate::alerts::RULES).unwrap().rule_specs().unwrap();
    for f in ["../deploy/cloud/single-node.toml", "../deploy/local/cloud.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let shipped = kappa_cloud::config::CloudConfig::load(&path).unwrap().rule_specs().unwrap();
        assert_eq!(shipped, tested, "{f}");
    }
}
