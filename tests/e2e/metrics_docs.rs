//! docs/metrics.md, what the code registers, what the running processes
//! export on `/metrics`, and the shipped Prometheus alert rules and Grafana
//! dashboard agree: every registered metric is documented and every
//! documented one registered, everything exported is documented, and every
//! metric the rules and the dashboard use exists. (A labelled family shows
//! on `/metrics` only once it has a series, so registration is read from
//! the source.)

use std::collections::BTreeSet;
use std::path::Path;

use kappa_tests::harness::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Metric names as scraped (counters with `_total`), from the `# TYPE`
/// lines, so families with no series yet count too.
async fn exported(url: &str) -> BTreeSet<String> {
    let text = reqwest::get(url).await.expect("metrics").text().await.expect("metrics text");
    text.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("# TYPE ")?.split_whitespace();
            let (name, kind) = (f.next()?, f.next()?);
            Some(if kind == "counter" { format!("{name}_total") } else { name.to_string() })
        })
        .collect()
}

/// `{prefix}_{name}` for every `register("name", ...)` in a metrics module.
fn registered(file: &str, prefix: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo(file)).expect(file);
    text.split("register(")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(format!("{prefix}_{}", &rest[..rest.find('"')?]))
        })
        .collect()
}

fn documented() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo("docs/metrics.md")).expect("docs/metrics.md");
    text.lines().filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_string)).collect()
}

/// `kappa_...` identifiers in a text, with histogram sample suffixes
/// (`_bucket`, `_sum`, `_count`) mapped to their metric.
fn referenced(text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("kappa_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(*b)))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_exported_and_used_metrics_agree() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let edge = Edge::start(dir.path(), Mqtt::Embedded(free_port()), &cloud.url()).await;
    let mut live = exported(&format!("{}/metrics", cloud.url())).await;
    live.extend(exported(&format!("http://127.0.0.1:{}/metrics", edge.http_port)).await);
    let docs = documented();
    assert!(live.len() > 50, "{live:?}");
    let undocumented: Vec<_> = live.difference(&docs).collect();
    assert!(undocumented.is_empty(), "exported but not in docs/metrics.md: {undocumented:?}");

    let mut code = registered("cloud/src/metrics.rs", "kappa_cloud");
    code.extend(registered("edge/src/metrics.rs", "kappa_edge"));
    let base = |n: &String| n.strip_suffix("_total").unwrap_or(n).to_string();
    let docs_base: BTreeSet<String> = docs.iter().map(base).collect();
    let code_base: BTreeSet<String> = code.iter().map(base).collect();
    assert!(code_base.len() > 70, "{code_base:?}");
    let undocumented: Vec<_> = code_base.difference(&docs_base).collect();
    let unregistered: Vec<_> = docs_base.difference(&code_base).collect();
    assert!(undocumented.is_empty(), "registered but not in docs/metrics.md: {undocumented:?}");
    assert!(unregistered.is_empty(), "in docs/metrics.md but never registered: {unregistered:?}");

    for file in ["deploy/prometheus/kappa-alerts.yml", "deploy/grafana/kappa-dashboard.json"] {
        let text = std::fs::read_to_string(repo(file)).expect(file);
        let used = referenced(&text, &docs);
        assert!(used.len() >= 10, "{file} uses {used:?}");
        let unknown: Vec<_> = used.difference(&docs).collect();
        assert!(unknown.is_empty(), "{file} uses metrics that do not exist: {unknown:?}");
    }
}

/// The rule file is valid YAML in Prometheus's rule-group shape (read with
/// PyYAML; promtool cannot be installed here), and the dashboard is a Grafana
/// dashboard whose every panel queries something.
#[test]
fn the_alert_rules_and_the_dashboard_are_well_formed() {
    let rules = repo("deploy/prometheus/kappa-alerts.yml");
    let out = std::process::Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(&rules)
        .output()
        .expect("python3 with PyYAML");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let groups = doc["groups"].as_array().expect("groups");
    let mut names = BTreeSet::new();
    for g in groups {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("alert name");
            assert!(names.insert(name.to_string()), "{name} twice");
            assert!(r["expr"].as_str().is_some_and(|e| e.contains("kappa_")), "{name}: expr");
            assert!(matches!(r["labels"]["severity"].as_str(), Some("warning" | "critical")), "{name}: severity");
            assert!(r["annotations"]["summary"].as_str().is_some(), "{name}: summary");
        }
    }
    for needed in
        ["KappaProcessorLagHigh", "KappaStateTooLarge", "KappaProcessingRateDropped", "KappaIngestUnavailable"]
    {
        assert!(names.contains(needed), "the reference design's alert {needed} is missing");
    }

    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/kappa-dashboard.json")).unwrap()).unwrap();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())));
    }
}
