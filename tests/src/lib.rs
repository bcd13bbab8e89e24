//! Support for the end-to-end tests and the benchmark harness.

// Test support: what the tests assert on may unwrap (a failure is the test's).
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod alert_kit;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod bench;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod chaos;
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub mod harness;
pub mod powercut;

use std::ffi::OsString;
use std::process::ExitCode;

/// Runs one of the product binaries by role: `edge`, `cloud` or `sim` run
/// exactly what `kappa-edge`, `kappa-cloud` and `kappa-sim` run. `None` for
/// any other role.
pub fn run_role(role: &str, args: impl Iterator<Item = OsString>) -> Option<ExitCode> {
    let with_name = |name: &str| std::iter::once(OsString::from(name)).chain(args);
    Some(match role {
        "edge" => kappa_edge::cli::main_from(with_name("kappa-edge")),
        "cloud" => kappa_cloud::cli::main_from(with_name("kappa-cloud")),
        "sim" => kappa_sim::cli::main_from(with_name("kappa-sim")),
        _ => return None,
    })
}

/// The tansu broker binary (a Kafka-protocol broker) for tests and
/// benchmarks: `KAPPA_TANSU`, or where `.ci/run` builds it once per machine
/// (`~/.cache/kappa-tools`). `None` when it is not there.
pub fn tansu_binary() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("KAPPA_TANSU").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/kappa-tools/tansu-0.6.0/bin/tansu")
    });
    path.exists().then_some(path)
}
