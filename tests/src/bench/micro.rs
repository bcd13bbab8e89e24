//! The criterion micro-benchmarks (`common/benches/codecs.rs`,
//! `cloud/benches/operators.rs`), run as child `cargo` processes from the
//! workspace root.
//!
//! * `--quick` (scale < 1): `cargo test --workspace --bench codecs --bench
//!   operators`, which builds them in the
//!   dev profile and runs each benchmark once, untimed (criterion's test
//!   mode): proof that they run, `{"mode": "test", "benches_ran": N}`.
//! * full: `cargo bench` of the same targets with `-- --noplot` (the bench profile), its
//!   results written to a private `CRITERION_HOME` and read back from every
//!   `new/estimates.json` and `new/benchmark.json`: per benchmark
//!   (`group/function`) the median and mean time of one iteration, the 95%
//!   confidence interval of the mean (ns), the elements one iteration
//!   handles, and elements per second at the median.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Map, Value, json};

/// The bench targets (in kappa-common and kappa-cloud). They are selected
/// across the whole workspace so that features resolve as for `cargo test
/// --workspace` and the dependencies it built are reused.
const TARGETS: [&str; 4] = ["--bench", "codecs", "--bench", "operators"];

pub fn run(scale: f64) -> Value {
    if scale < 1.0 { test_mode() } else { bench_mode() }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    c
}

/// Runs `cmd` with its output captured (cargo's own progress goes to the
/// terminal); a failure aborts the run with the suite's output.
fn checked(mut cmd: Command, what: &str) -> String {
    let Output { status, stdout, .. } = cmd.stderr(Stdio::inherit()).output().unwrap();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    assert!(status.success(), "micro: {what} failed ({status}):\n{stdout}");
    stdout
}

fn test_mode() -> Value {
    let mut cmd = cargo();
    cmd.args(["test", "--locked", "--workspace"]).args(TARGETS);
    let out = checked(cmd, "cargo test --bench codecs --bench operators");
    let ran = out.lines().filter(|l| l.trim() == "Success").count();
    assert!(ran > 0, "micro: the criterion suites ran no benchmark:\n{out}");
    println!("micro-benchmarks: test mode (each once, untimed, dev profile): {ran} ran");
    json!({ "mode": "test", "benches_ran": ran })
}

fn bench_mode() -> Value {
    let home = tempfile::Builder::new().prefix("kappa-criterion-").tempdir().unwrap();
    let mut cmd = cargo();
    cmd.args(["bench", "--locked", "--workspace"]).args(TARGETS).args(["--", "--noplot"]);
    cmd.env("CRITERION_HOME", home.path());
    checked(cmd, "cargo bench --bench codecs --bench operators");
    let mut files = Vec::new();
    find_new_results(home.path(), &mut files);
    files.sort();
    let mut results = Map::new();
    for dir in files {
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap())
                .unwrap_or_else(|e| panic!("micro: {}: {e}", dir.join(name).display()))
        };
        let (benchmark, estimates) = (read("benchmark.json"), read("estimates.json"));
        let id = benchmark["full_id"].as_str().unwrap().to_string();
        let median = estimates["median"]["point_estimate"].as_f64().unwrap();
        let mean = &estimates["mean"];
        let mut r = json!({
            "median_ns": median,
            "mean_ns": mean["point_estimate"],
            "ci_low": mean["confidence_interval"]["lower_bound"],
            "ci_high": mean["confidence_interval"]["upper_bound"],
        });
        if let Some(elements) = benchmark["throughput"]["Elements"].as_u64() {
            r["elements"] = json!(elements);
            r["ns_per_element"] = json!(median / elements as f64);
            r["elements_per_s"] = json!(elements as f64 / (median * 1e-9));
        }
        results.insert(id, r);
    }
    assert!(!results.is_empty(), "micro: criterion wrote no results under {}", home.path().display());
    println!("micro-benchmarks (criterion, bench profile; median of one iteration):");
    for (id, r) in &results {
        let per = r["ns_per_element"].as_f64().map_or(String::new(), |ns| {
            format!(
                "{ns:>10.1} ns/element {:>12.0} elements/s  ({} per iteration)",
                r["elements_per_s"].as_f64().unwrap_or(0.0),
                r["elements"]
            )
        });
        println!("  {id:<42} {:>12.0} ns {per}", r["median_ns"].as_f64().unwrap_or(0.0));
    }
    json!({ "mode": "bench", "benches_ran": results.len(), "results": results })
}

/// Every `new/` directory under `dir` holding a criterion result.
fn find_new_results(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == "new") {
            if path.join("estimates.json").is_file() && path.join("benchmark.json").is_file() {
                out.push(path);
            }
        } else {
            find_new_results(&path, out);
        }
    }
}
