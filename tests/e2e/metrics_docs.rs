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

/// Metric names with at least one sample in a scrape (histogram samples
/// under their own `_bucket`, `_sum` and `_count` names).
fn with_series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The label values docs/metrics.md lists in `metric`'s row: its
/// backticked lower-case words, less the metric's name and `labels`.
fn documented_values(metric: &str, labels: &[&str]) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo("docs/metrics.md")).expect("docs/metrics.md");
    let row = text.lines().find(|l| l.starts_with(&format!("| `{metric}`"))).expect(metric);
    row.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| *w != metric && !labels.contains(w))
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// Every metric the shipped rules and dashboard use has a series on a node
/// and an agent that just started, and the reason-keyed counters they watch
/// for a first incident carry every documented reason already, at zero: a
/// series that appears only at its first event makes `increase(x[5m]) > 0`
/// miss that first burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_rules_and_dashboards_watch_exist_before_the_first_incident() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let edge = Edge::start(dir.path(), Mqtt::Embedded(free_port()), &cloud.url()).await;
    let docs = documented();
    let mut used = BTreeSet::new();
    for file in ["deploy/prometheus/kappa-alerts.yml", "deploy/grafana/kappa-dashboard.json"] {
        used.extend(referenced(&std::fs::read_to_string(repo(file)).expect(file), &docs));
    }
    let scrape = || async {
        let get = |url: String| async move { reqwest::get(url).await.expect("metrics").text().await.expect("text") };
        let cloud_text = get(format!("{}/metrics", cloud.url())).await;
        cloud_text + &get(format!("http://127.0.0.1:{}/metrics", edge.http_port)).await
    };
    // Series keyed by a gateway appear when the agent's first heartbeat or
    // batch arrives: wait for that, not for a time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let (text, missing) = loop {
        let text = scrape().await;
        let live = with_series(&text);
        let has = |m: &String| {
            live.contains(m) || ["_bucket", "_sum", "_count"].iter().any(|s| live.contains(&format!("{m}{s}")))
        };
        let missing: Vec<String> = used.iter().filter(|m| !has(m)).cloned().collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break (text, missing);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(used.len() >= 10, "{used:?}");
    assert!(missing.is_empty(), "used by the rules or the dashboard, but no series on a fresh node: {missing:?}");

    for (metric, labels) in [
        ("kappa_edge_log_write_errors_total", &["kind"][..]),
        ("kappa_edge_forward_failures_total", &["reason"]),
        ("kappa_edge_readings_pruned_total", &["reason"]),
        ("kappa_edge_readings_shed_total", &["reason", "class"]),
        ("kappa_edge_readings_rolled_up_total", &["reason"]),
        ("kappa_cloud_ingest_rejected_total", &["reason"]),
    ] {
        let values = documented_values(metric, labels);
        assert!(values.len() >= 2, "{metric}: {values:?}");
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{metric}{{"))).collect();
        for v in &values {
            let present = series.iter().any(|l| labels.iter().any(|k| l.contains(&format!("{k}=\"{v}\""))));
            assert!(present, "{metric}: no series for the documented value {v:?} on a fresh node; it has {series:?}");
        }
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
