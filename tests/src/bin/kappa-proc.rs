//! The three Kappa binaries in one executable, for the end-to-end tests:
//! `kappa-proc edge ARGS` runs exactly what `kappa-edge ARGS` runs (both call
//! `kappa_edge::cli::main_from`), and likewise `cloud` and `sim`. Cargo
//! builds this binary fresh for the tests of this package, which it does not
//! promise for the binaries of other packages.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let role = args.next().unwrap_or_default();
    kappa_tests::run_role(&role.to_string_lossy(), args).unwrap_or_else(|| {
        eprintln!("usage: kappa-proc edge|cloud|sim ARGS...");
        ExitCode::from(2)
    })
}
