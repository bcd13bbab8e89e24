//! The three Kappa binaries in one executable, for the end-to-end tests:
//! `kappa-proc edge ARGS` runs exactly what `kappa-edge ARGS` runs (both call
//! `kappa_edge::cli::main_from`), and likewise `cloud` and `sim`. Cargo
//! builds this binary fresh for the tests of this package, which it does not
//! promise for the binaries of other packages.

use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let role = args.next().unwrap_or_default();
    let with_name = |name: &str| std::iter::once(OsString::from(name)).chain(args);
    match role.to_str() {
        Some("edge") => kappa_edge::cli::main_from(with_name("kappa-edge")),
        Some("cloud") => kappa_cloud::cli::main_from(with_name("kappa-cloud")),
        Some("sim") => kappa_sim::cli::main_from(with_name("kappa-sim")),
        _ => {
            eprintln!("usage: kappa-proc edge|cloud|sim ARGS...");
            ExitCode::from(2)
        }
    }
}
